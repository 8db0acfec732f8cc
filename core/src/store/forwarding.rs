//! Forwarding destinations: the environment's URLs (up to two) and signing key, a
//! connection's override of them, destinations disabled by a 410, and the record of
//! every delivery attempt.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::types::Json;

use super::{Environment, Pool, Store, StoreError};
use crate::keys::IntegrationKey;
use crate::secrets::Purpose;

/// At most this many URLs per environment or connection.
pub const MAX_URLS: usize = 2;

/// Forwarding as set on the environment or on one connection.
#[derive(Debug, Clone, PartialEq)]
pub struct ForwardingSettings {
    pub urls: Vec<String>,
    /// `None`: the environment's (for a connection), the secret key (for the environment).
    pub signing_key: Option<String>,
    /// Send sync notifications after runs that changed nothing too.
    pub always_notify: bool,
    /// Announce each finished asynchronous action (the environment's setting).
    pub async_action_webhooks: bool,
    /// Announce each refresh a provider refused (the environment's setting).
    pub auth_webhooks: bool,
}

impl Default for ForwardingSettings {
    fn default() -> Self {
        ForwardingSettings {
            urls: Vec::new(),
            signing_key: None,
            always_notify: false,
            async_action_webhooks: true,
            auth_webhooks: true,
        }
    }
}

/// Where one connection's (or an unrouted event's) forwards go, and how they are signed.
#[derive(Debug, Clone, PartialEq)]
pub struct ForwardTargets {
    pub urls: Vec<String>,
    pub signing_key: String,
    pub always_notify: bool,
    pub async_action_webhooks: bool,
    pub auth_webhooks: bool,
}

/// Whose settings: the environment's, or one connection's.
#[derive(Debug, Clone, Copy)]
pub enum ForwardingScope<'a> {
    Environment,
    Connection(&'a IntegrationKey, &'a str),
}

impl ForwardingScope<'_> {
    fn key(&self) -> (&str, &str) {
        match self {
            ForwardingScope::Environment => ("", ""),
            ForwardingScope::Connection(integration, connection) => (integration.as_str(), connection),
        }
    }
}

/// One delivery attempt.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeliveryAttempt {
    pub delivery_id: String,
    pub environment: String,
    pub url: String,
    pub attempt: i32,
    pub at: DateTime<Utc>,
    /// The HTTP status, when an answer came.
    pub status: Option<i32>,
    pub latency_ms: i32,
    pub error: Option<String>,
}

#[derive(sqlx::FromRow)]
struct SettingsRow {
    urls: Json<Vec<String>>,
    signing_key: Option<String>,
    always_notify: bool,
    async_action_webhooks: bool,
    auth_webhooks: bool,
}

#[derive(sqlx::FromRow)]
struct AttemptRow {
    delivery_id: String,
    environment: String,
    url: String,
    attempt: i32,
    at: DateTime<Utc>,
    status: Option<i32>,
    latency_ms: i32,
    error: Option<String>,
}

impl Store {
    pub async fn set_forwarding(
        &self,
        environment_id: i64,
        scope: ForwardingScope<'_>,
        settings: &ForwardingSettings,
    ) -> Result<(), StoreError> {
        if settings.urls.len() > MAX_URLS {
            return Err(StoreError::Invalid(format!("at most {MAX_URLS} forwarding URLs")));
        }
        let (integration, connection) = scope.key();
        let sealed = settings
            .signing_key
            .as_deref()
            .map(|key| self.cipher.seal(Purpose::ForwardSigningKey, key));
        let now = Utc::now();
        let mut tx = self.begin().await?;
        super::tx::on_tx!(&mut tx, |conn| {
            sqlx::query(
                "INSERT INTO forwarding (environment_id, integration, connection_id, urls, signing_key, always_notify,
                                         updated_at, async_action_webhooks, auth_webhooks)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                 ON CONFLICT (environment_id, integration, connection_id) DO UPDATE SET
                     urls = excluded.urls, signing_key = excluded.signing_key,
                     always_notify = excluded.always_notify, updated_at = excluded.updated_at,
                     async_action_webhooks = excluded.async_action_webhooks, auth_webhooks = excluded.auth_webhooks",
            )
            .bind(environment_id)
            .bind(integration)
            .bind(connection)
            .bind(Json(&settings.urls))
            .bind(&sealed)
            .bind(settings.always_notify)
            .bind(now)
            .bind(settings.async_action_webhooks)
            .bind(settings.auth_webhooks)
            .execute(&mut *conn)
            .await
            .map(|_| ())
        })?;
        // Setting a URL again is how a disabled destination is turned back on.
        for url in &settings.urls {
            super::tx::on_tx!(&mut tx, |conn| {
                sqlx::query("DELETE FROM disabled_destinations WHERE environment_id = $1 AND url = $2")
                    .bind(environment_id)
                    .bind(url)
                    .execute(&mut *conn)
                    .await
                    .map(|_| ())
            })?;
        }
        tx.commit().await
    }

    /// The settings made on this scope, if any.
    pub async fn forwarding(
        &self,
        environment_id: i64,
        scope: ForwardingScope<'_>,
    ) -> Result<Option<ForwardingSettings>, StoreError> {
        let (integration, connection) = scope.key();
        let row: Option<SettingsRow> = on_pool!(self, |pool| sqlx::query_as(
            "SELECT urls, signing_key, always_notify, async_action_webhooks, auth_webhooks FROM forwarding
             WHERE environment_id = $1 AND integration = $2 AND connection_id = $3"
        )
        .bind(environment_id)
        .bind(integration)
        .bind(connection)
        .fetch_optional(pool)
        .await)?;
        row.map(|row| {
            Ok(ForwardingSettings {
                urls: row.urls.0,
                signing_key: row
                    .signing_key
                    .map(|sealed| self.cipher.open(Purpose::ForwardSigningKey, &sealed))
                    .transpose()?,
                always_notify: row.always_notify,
                async_action_webhooks: row.async_action_webhooks,
                auth_webhooks: row.auth_webhooks,
            })
        })
        .transpose()
    }

    /// Whether the environment or any of its connections has forwarding set: when not,
    /// nothing of it needs looking at.
    pub async fn forwarding_set(&self, environment_id: i64) -> Result<bool, StoreError> {
        let rows: i64 = on_pool!(self, |pool| sqlx::query_scalar(
            "SELECT COUNT(*) FROM forwarding WHERE environment_id = $1"
        )
        .bind(environment_id)
        .fetch_one(pool)
        .await)?;
        Ok(rows > 0)
    }

    /// Where forwards of this connection (or, with `None`, of an unrouted event) go: the
    /// connection's settings where it has them, else the environment's; destinations
    /// disabled by a 410 left out.
    pub async fn forward_targets(
        &self,
        environment: &Environment,
        connection: Option<(&IntegrationKey, &str)>,
    ) -> Result<ForwardTargets, StoreError> {
        let own = self
            .forwarding(environment.id, ForwardingScope::Environment)
            .await?
            .unwrap_or_default();
        let overriding = match connection {
            Some((integration, id)) => {
                self.forwarding(environment.id, ForwardingScope::Connection(integration, id))
                    .await?
            }
            None => None,
        };
        let environment_key = own
            .signing_key
            .clone()
            .unwrap_or_else(|| environment.secret_key.clone());
        let (urls, signing_key) = match overriding {
            Some(o) => (o.urls, o.signing_key.unwrap_or(environment_key)),
            None => (own.urls, environment_key),
        };
        let disabled = self.disabled_destinations(environment.id).await?;
        Ok(ForwardTargets {
            urls: urls.into_iter().filter(|u| !disabled.contains(u)).collect(),
            signing_key,
            always_notify: own.always_notify,
            async_action_webhooks: own.async_action_webhooks,
            auth_webhooks: own.auth_webhooks,
        })
    }

    pub async fn disable_destination(&self, environment_id: i64, url: &str, reason: &str) -> Result<(), StoreError> {
        on_pool!(self, |pool| sqlx::query(
            "INSERT INTO disabled_destinations (environment_id, url, reason, disabled_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (environment_id, url) DO NOTHING"
        )
        .bind(environment_id)
        .bind(url)
        .bind(reason)
        .bind(Utc::now())
        .execute(pool)
        .await
        .map(|_| ()))?;
        Ok(())
    }

    pub async fn disabled_destinations(&self, environment_id: i64) -> Result<HashSet<String>, StoreError> {
        let rows: Vec<(String,)> = on_pool!(self, |pool| sqlx::query_as(
            "SELECT url FROM disabled_destinations WHERE environment_id = $1"
        )
        .bind(environment_id)
        .fetch_all(pool)
        .await)?;
        Ok(rows.into_iter().map(|(url,)| url).collect())
    }

    /// Records attempts, all in one transaction, the rows in JSON parameters
    /// ([`super::tx::Tx::insert_json_rows`]).
    pub async fn record_attempts(&self, attempts: &[DeliveryAttempt]) -> Result<(), StoreError> {
        #[derive(Serialize)]
        struct Row<'a> {
            delivery_id: &'a str,
            environment: &'a str,
            url: &'a str,
            attempt: i32,
            at: String,
            status: Option<i32>,
            latency_ms: i32,
            error: Option<&'a str>,
        }
        let rows: Vec<Row> = attempts
            .iter()
            .map(|a| Row {
                delivery_id: &a.delivery_id,
                environment: &a.environment,
                url: &a.url,
                attempt: a.attempt,
                at: super::json_timestamp(&a.at),
                status: a.status,
                latency_ms: a.latency_ms,
                error: a.error.as_deref(),
            })
            .collect();
        let insert = match self.pool {
            Pool::Postgres(_) => {
                "INSERT INTO delivery_attempts (delivery_id, environment, url, attempt, at, status, latency_ms, error)
                 SELECT a.delivery_id, a.environment, a.url, a.attempt, a.at, a.status, a.latency_ms, a.error
                 FROM jsonb_to_recordset($1::jsonb) AS a(delivery_id text, environment text, url text, attempt int,
                      at timestamptz, status int, latency_ms int, error text)"
            }
            Pool::Sqlite(_) => {
                "INSERT INTO delivery_attempts (delivery_id, environment, url, attempt, at, status, latency_ms, error)
                 SELECT a.value ->> '$.delivery_id', a.value ->> '$.environment', a.value ->> '$.url',
                        a.value ->> '$.attempt', a.value ->> '$.at', a.value ->> '$.status',
                        a.value ->> '$.latency_ms', a.value ->> '$.error'
                 FROM json_each($1) AS a"
            }
        };
        let mut tx = self.begin().await?;
        tx.insert_json_rows(insert, &rows).await?;
        tx.commit().await
    }

    /// Attempts of one delivery, oldest first.
    pub async fn delivery_attempts(&self, delivery_id: &str) -> Result<Vec<DeliveryAttempt>, StoreError> {
        let rows: Vec<AttemptRow> = on_pool!(self, |pool| sqlx::query_as(
            "SELECT delivery_id, environment, url, attempt, at, status, latency_ms, error
             FROM delivery_attempts WHERE delivery_id = $1 ORDER BY id"
        )
        .bind(delivery_id)
        .fetch_all(pool)
        .await)?;
        Ok(rows
            .into_iter()
            .map(|r| DeliveryAttempt {
                delivery_id: r.delivery_id,
                environment: r.environment,
                url: r.url,
                attempt: r.attempt,
                at: r.at,
                status: r.status,
                latency_ms: r.latency_ms,
                error: r.error,
            })
            .collect())
    }

    /// How many attempts a delivery has had.
    pub async fn attempts_made(&self, delivery_id: &str) -> Result<i64, StoreError> {
        Ok(on_pool!(self, |pool| sqlx::query_scalar::<_, i64>(
            "SELECT COUNT(*) FROM delivery_attempts WHERE delivery_id = $1"
        )
        .bind(delivery_id)
        .fetch_one(pool)
        .await)?)
    }
}
