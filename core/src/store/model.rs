//! What the store holds, as the rest of hookyard sees it (secrets opened), and the raw
//! rows behind it (secrets sealed).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::types::Json;
use uuid::Uuid;

use super::StoreError;
use crate::keys::{EnvironmentName, IntegrationKey};
use crate::secrets::{Cipher, Purpose};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Environment {
    pub id: i64,
    pub name: EnvironmentName,
    /// The public id in webhook URLs: `/webhook/{webhook_id}/{integration}`.
    pub webhook_id: Uuid,
    #[serde(skip)]
    pub secret_key: String,
    #[serde(skip)]
    pub webhook_signing_key: String,
    pub created_at: DateTime<Utc>,
}

impl Environment {
    /// Where providers send `integration`'s webhooks, on ingest at `base`
    /// ([`Config::webhook_base_url`](crate::config::Config::webhook_base_url)).
    pub fn webhook_url(&self, base: &str, integration: &str) -> String {
        format!("{base}/webhook/{}/{integration}", self.webhook_id)
    }
}

/// One of an environment's variables (`nango.getEnvironmentVariables()`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct EnvironmentVariable {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Integration {
    pub id: i64,
    pub environment_id: i64,
    pub environment: EnvironmentName,
    pub unique_key: IntegrationKey,
    pub provider: String,
    pub display_name: Option<String>,
    #[serde(skip)]
    pub webhook_secret: Option<String>,
    /// The OAuth2 client secret connections' tokens are refreshed with.
    #[serde(skip)]
    pub oauth_client_secret: Option<String>,
    /// Whether webhooks of this integration are forwarded to the customer's app.
    pub forward_webhooks: bool,
    pub settings: Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct NewIntegration {
    pub unique_key: IntegrationKey,
    pub provider: String,
    pub display_name: Option<String>,
    pub webhook_secret: Option<String>,
    pub oauth_client_secret: Option<String>,
    pub forward_webhooks: bool,
    pub settings: Value,
}

impl NewIntegration {
    /// An integration with nothing but its key and provider set.
    pub fn new(unique_key: IntegrationKey, provider: impl Into<String>) -> NewIntegration {
        NewIntegration {
            unique_key,
            provider: provider.into(),
            display_name: None,
            webhook_secret: None,
            oauth_client_secret: None,
            forward_webhooks: true,
            settings: Value::Object(Default::default()),
        }
    }
}

/// A partial update; `None` leaves a field as it is, `Some(None)` clears it.
#[derive(Debug, Clone, Default)]
pub struct IntegrationChanges {
    pub provider: Option<String>,
    pub display_name: Option<Option<String>>,
    pub webhook_secret: Option<Option<String>>,
    pub oauth_client_secret: Option<Option<String>>,
    pub forward_webhooks: Option<bool>,
    /// Replaces the settings object.
    pub settings: Option<Value>,
}

/// How hookyard calls the provider's API for a connection (Nango's credential shapes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Credentials {
    #[serde(rename = "API_KEY")]
    ApiKey {
        #[serde(rename = "apiKey", alias = "api_key")]
        api_key: String,
    },
    #[serde(rename = "BASIC")]
    Basic {
        username: String,
        #[serde(default)]
        password: String,
    },
    #[serde(rename = "OAUTH2")]
    OAuth2 {
        access_token: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        refresh_token: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_at: Option<DateTime<Utc>>,
        /// The provider's token response as it came, for fields hookyard does not model.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        raw: Option<Value>,
    },
}

/// A customer's account at a provider, attributed webhooks by `connection_config`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Connection {
    #[serde(skip)]
    pub row_id: i64,
    #[serde(skip)]
    pub environment_id: i64,
    pub connection_id: String,
    pub provider_config_key: IntegrationKey,
    pub provider: String,
    /// The identifiers routing matches on (`portalId`, `team_id`, `installation_id`, …).
    pub connection_config: Value,
    pub metadata: Value,
    pub tags: Value,
    #[serde(skip)]
    pub credentials: Option<Credentials>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Its last OAuth2 refresh, refused by the token URL, until credentials are stored.
    pub refresh_failure: Option<RefreshFailure>,
    /// Until when the provider's rate limit holds its calls, as a process met it.
    #[serde(skip)]
    pub rate_limited_until: Option<DateTime<Utc>>,
}

/// An OAuth2 refresh the provider refused: the connection needs to be authorized again.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RefreshFailure {
    /// When the first refused refresh since the credentials were stored happened.
    pub failed_at: DateTime<Utc>,
    /// The token URL's answer (its status, `error` and `error_description`).
    pub error: String,
}

#[derive(Debug, Clone)]
pub struct NewConnection {
    pub integration: IntegrationKey,
    pub connection_id: String,
    pub connection_config: Value,
    pub metadata: Value,
    pub tags: Value,
    pub credentials: Option<Credentials>,
}

/// Which live connections to list, oldest first.
#[derive(Debug, Clone, Default)]
pub struct ConnectionQuery {
    pub integration: Option<IntegrationKey>,
    pub connection_id: Option<String>,
    /// A case-insensitive substring of the connection id.
    pub search: Option<String>,
    pub limit: u32,
    pub offset: u64,
}

#[derive(sqlx::FromRow)]
pub(super) struct EnvironmentRow {
    id: i64,
    name: String,
    webhook_id: String,
    secret_key: String,
    webhook_signing_key: String,
    created_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
pub(super) struct IntegrationRow {
    id: i64,
    environment_id: i64,
    environment: String,
    unique_key: String,
    provider: String,
    display_name: Option<String>,
    webhook_secret: Option<String>,
    oauth_client_secret: Option<String>,
    forward_webhooks: bool,
    settings: Json<Value>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
pub(super) struct ConnectionRow {
    id: i64,
    environment_id: i64,
    integration: String,
    provider: String,
    connection_id: String,
    connection_config: Json<Value>,
    metadata: Json<Value>,
    tags: Json<Value>,
    credentials: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    refresh_failed_at: Option<DateTime<Utc>>,
    refresh_error: Option<String>,
    rate_limited_until: Option<DateTime<Utc>>,
}

pub(super) fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

impl EnvironmentRow {
    pub(super) fn open(self, cipher: &Cipher) -> Result<Environment, StoreError> {
        Ok(Environment {
            id: self.id,
            name: self.name.try_into().map_err(|e| corrupt("environment name", e))?,
            webhook_id: self
                .webhook_id
                .parse()
                .map_err(|e| corrupt("environment webhook_id", e))?,
            secret_key: cipher.open(Purpose::EnvironmentSecretKey, &self.secret_key)?,
            webhook_signing_key: cipher.open(Purpose::EnvironmentSigningKey, &self.webhook_signing_key)?,
            created_at: self.created_at,
        })
    }
}

impl IntegrationRow {
    pub(super) fn open(self, cipher: &Cipher) -> Result<Integration, StoreError> {
        Ok(Integration {
            id: self.id,
            environment_id: self.environment_id,
            environment: self
                .environment
                .try_into()
                .map_err(|e| corrupt("environment name", e))?,
            unique_key: self.unique_key.try_into().map_err(|e| corrupt("integration key", e))?,
            provider: self.provider,
            display_name: self.display_name,
            webhook_secret: self
                .webhook_secret
                .map(|sealed| cipher.open(Purpose::WebhookSecret, &sealed))
                .transpose()?,
            oauth_client_secret: self
                .oauth_client_secret
                .map(|sealed| cipher.open(Purpose::OAuthClientSecret, &sealed))
                .transpose()?,
            forward_webhooks: self.forward_webhooks,
            settings: self.settings.0,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

impl ConnectionRow {
    pub(super) fn open(self, cipher: &Cipher) -> Result<Connection, StoreError> {
        let credentials = match self.credentials {
            Some(sealed) => {
                let json = cipher.open(Purpose::Credentials, &sealed)?;
                Some(serde_json::from_str(&json).map_err(|e| corrupt("connection credentials", e))?)
            }
            None => None,
        };
        Ok(Connection {
            row_id: self.id,
            environment_id: self.environment_id,
            connection_id: self.connection_id,
            provider_config_key: self.integration.try_into().map_err(|e| corrupt("integration key", e))?,
            provider: self.provider,
            connection_config: self.connection_config.0,
            metadata: self.metadata.0,
            tags: self.tags.0,
            credentials,
            created_at: self.created_at,
            updated_at: self.updated_at,
            refresh_failure: self.refresh_failed_at.map(|failed_at| RefreshFailure {
                failed_at,
                error: self.refresh_error.unwrap_or_default(),
            }),
            rate_limited_until: self.rate_limited_until,
        })
    }
}
