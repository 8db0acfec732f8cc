//! A connection's OAuth2 refreshes: the lease that lets one run at a time trade its
//! refresh token (see `hookyard_functions::token_refresh`), and the refresh the token URL
//! refused, kept on the connection until credentials are stored again and owed, once, to
//! the forwarding destinations as an `auth` webhook.

use chrono::{DateTime, Utc};

use super::{Pool, Store, StoreError};
use crate::keys::{EnvironmentName, IntegrationKey};

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
        self.environment
            .parse()
            .map_err(|e| StoreError::Corrupt(format!("environment name: {e}")))
    }

    pub fn integration(&self) -> Result<IntegrationKey, StoreError> {
        self.integration
            .parse()
            .map_err(|e| StoreError::Corrupt(format!("integration key: {e}")))
    }
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
