//! A connection's OAuth2 refreshes: the lease that lets one run at a time trade its
//! refresh token (see `hookyard_functions::token_refresh`); the refresh the token URL
//! refused, kept on the connection until credentials are stored again and owed, once, to
//! the forwarding destinations as an `auth` webhook; and when a worker next refreshes
//! the token to keep it alive.

use chrono::{DateTime, Utc};

use super::model::corrupt;
use super::{Credentials, Pool, Store, StoreError};
use crate::keys::{EnvironmentName, IntegrationKey};

/// A refresh token is used at least this often, whether or not runs need it (as Nango
/// does): some providers revoke one left unused for weeks.
pub const KEEPALIVE: chrono::Duration = chrono::Duration::hours(24);
/// A keep-alive check that stored no credentials (the token URL away) is made again
/// after this.
const CHECK_AGAIN: chrono::Duration = chrono::Duration::minutes(10);

/// Which connections are due a keep-alive refresh: checked again on the locked row too,
/// so that two workers do not both take one.
const CHECK_DUE: &str =
    "refresh_check_at IS NOT NULL AND refresh_check_at <= $1 AND deleted_at IS NULL AND refresh_failed_at IS NULL";

/// When a worker should next refresh `credentials` stored at `now`: a day on for an
/// OAuth2 token with a refresh token; never for the others.
pub fn refresh_check_after(credentials: Option<&Credentials>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    matches!(
        credentials,
        Some(Credentials::OAuth2 {
            refresh_token: Some(_),
            ..
        })
    )
    .then(|| now + KEEPALIVE)
}

/// A connection whose token is due a keep-alive refresh.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct DueRefresh {
    pub environment_id: i64,
    pub integration: String,
    pub connection_id: String,
}

/// A refused refresh whose webhook is owed.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct OwedRefreshFailure {
    pub row_id: i64,
    pub environment: String,
    pub integration: String,
    pub provider: String,
    pub connection_id: String,
    pub failed_at: DateTime<Utc>,
    pub error: String,
}

impl OwedRefreshFailure {
    pub fn environment(&self) -> Result<EnvironmentName, StoreError> {
        self.environment.parse().map_err(|e| corrupt("environment name", e))
    }

    pub fn integration(&self) -> Result<IntegrationKey, StoreError> {
        integration_key(&self.integration)
    }
}

impl DueRefresh {
    pub fn integration(&self) -> Result<IntegrationKey, StoreError> {
        integration_key(&self.integration)
    }
}

fn integration_key(text: &str) -> Result<IntegrationKey, StoreError> {
    text.parse().map_err(|e| corrupt("integration key", e))
}

impl Store {
    /// Takes the connection's refresh lease for `holder` until `now + ttl`: when nobody
    /// holds it, its holder's time ran out, or `holder` has it already. False when another
    /// holds it or the connection is gone. Storing credentials
    /// ([`Store::update_credentials`]) ends it.
    pub async fn take_refresh_lease(
        &self,
        environment_id: i64,
        integration: &IntegrationKey,
        connection_id: &str,
        holder: &str,
        now: DateTime<Utc>,
        ttl: std::time::Duration,
    ) -> Result<bool, StoreError> {
        let until = now
            + chrono::Duration::from_std(ttl)
                .map_err(|_| StoreError::Invalid(format!("lease ttl {ttl:?} is too long")))?;
        const TAKE: &str = concat!(
            "UPDATE connections SET refresh_holder = $4, refresh_until = $5 WHERE ",
            live_connection!(),
            " AND (refresh_until IS NULL OR refresh_until <= $6 OR refresh_holder = $4)"
        );
        let taken = on_pool!(self, |pool| sqlx::query(TAKE)
            .bind(environment_id)
            .bind(connection_id)
            .bind(integration.as_str())
            .bind(holder)
            .bind(until)
            .bind(now)
            .execute(pool)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(taken == 1)
    }

    /// Lets go of the refresh lease if `holder` has it (a refresh that failed).
    pub async fn release_refresh_lease(
        &self,
        environment_id: i64,
        integration: &IntegrationKey,
        connection_id: &str,
        holder: &str,
    ) -> Result<(), StoreError> {
        const RELEASE: &str = concat!(
            "UPDATE connections SET refresh_holder = NULL, refresh_until = NULL WHERE ",
            live_connection!(),
            " AND refresh_holder = $4"
        );
        on_pool!(self, |pool| sqlx::query(RELEASE)
            .bind(environment_id)
            .bind(connection_id)
            .bind(integration.as_str())
            .bind(holder)
            .execute(pool)
            .await
            .map(|_| ()))?;
        Ok(())
    }

    /// Records that the token URL refused a refresh of the connection's token, with its
    /// answer. The first since its credentials were stored starts a failure, whose webhook
    /// is then owed; a later one only replaces the error.
    pub async fn refresh_refused(
        &self,
        environment_id: i64,
        integration: &IntegrationKey,
        connection_id: &str,
        error: &str,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        const REFUSED: &str = concat!(
            "UPDATE connections SET refresh_failed_at = COALESCE(refresh_failed_at, $4), refresh_error = $5 WHERE ",
            live_connection!()
        );
        on_pool!(self, |pool| sqlx::query(REFUSED)
            .bind(environment_id)
            .bind(connection_id)
            .bind(integration.as_str())
            .bind(at)
            .bind(error)
            .execute(pool)
            .await
            .map(|_| ()))?;
        Ok(())
    }

    /// Takes up to `limit` connections due a keep-alive refresh, the longest due first;
    /// each is due again in [`CHECK_AGAIN`] unless credentials are stored meanwhile.
    pub async fn claim_refresh_checks(&self, now: DateTime<Utc>, limit: i64) -> Result<Vec<DueRefresh>, StoreError> {
        let sql = format!(
            "UPDATE connections SET refresh_check_at = $2
             WHERE id IN (SELECT id FROM connections WHERE {CHECK_DUE} ORDER BY refresh_check_at LIMIT $3)
               AND {CHECK_DUE}
             RETURNING environment_id, connection_id,
                       (SELECT unique_key FROM integrations i WHERE i.id = connections.integration_id) AS integration"
        );
        Ok(on_pool!(self, |pool| sqlx::query_as(&sql)
            .bind(now)
            .bind(now + CHECK_AGAIN)
            .bind(limit)
            .fetch_all(pool)
            .await)?)
    }

    /// The connection has nothing a keep-alive could refresh (another kind of
    /// credentials, or an integration without a token URL): not looked at again until
    /// credentials are stored.
    pub async fn clear_refresh_check(
        &self,
        environment_id: i64,
        integration: &IntegrationKey,
        connection_id: &str,
    ) -> Result<(), StoreError> {
        const CLEAR: &str = concat!(
            "UPDATE connections SET refresh_check_at = NULL WHERE ",
            live_connection!()
        );
        on_pool!(self, |pool| sqlx::query(CLEAR)
            .bind(environment_id)
            .bind(connection_id)
            .bind(integration.as_str())
            .execute(pool)
            .await
            .map(|_| ()))?;
        Ok(())
    }

    /// Up to `limit` refused refreshes whose webhook is owed, across the environments,
    /// oldest connection first.
    pub async fn owed_refresh_failures(&self, limit: i64) -> Result<Vec<OwedRefreshFailure>, StoreError> {
        Ok(on_pool!(self, |pool| sqlx::query_as(
            "SELECT c.id AS row_id, e.name AS environment, i.unique_key AS integration, i.provider,
                    c.connection_id, c.refresh_failed_at AS failed_at, COALESCE(c.refresh_error, '') AS error
             FROM connections c
             JOIN integrations i ON i.id = c.integration_id
             JOIN environments e ON e.id = c.environment_id
             WHERE c.refresh_failed_at IS NOT NULL AND c.refresh_failure_notified_at IS NULL
               AND c.deleted_at IS NULL
             ORDER BY c.id LIMIT $1"
        )
        .bind(limit)
        .fetch_all(pool)
        .await)?)
    }

    /// Marks the webhooks of `failures` sent: those of a failure that ended meanwhile (new
    /// credentials) or began again since are left as they are.
    pub async fn refresh_failures_notified(
        &self,
        failures: &[OwedRefreshFailure],
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        for failure in failures {
            on_pool!(self, |pool| sqlx::query(
                "UPDATE connections SET refresh_failure_notified_at = $1 WHERE id = $2 AND refresh_failed_at = $3"
            )
            .bind(at)
            .bind(failure.row_id)
            .bind(failure.failed_at)
            .execute(pool)
            .await
            .map(|_| ()))?;
        }
        Ok(())
    }
}
