//! Integrations: one provider set up in one environment, under a unique key (Nango's
//! provider config key).

use chrono::Utc;
use sqlx::types::Json;

use super::model::IntegrationRow;
use super::{
    conflict_on_unique, Environment, Integration, IntegrationChanges, NewIntegration, Pool, Store, StoreError,
};
use crate::keys::IntegrationKey;
use crate::secrets::Purpose;

const SELECT: &str = "SELECT i.id, i.environment_id, e.name AS environment, i.unique_key, i.provider, i.display_name,
        i.webhook_secret, i.oauth_client_secret, i.forward_webhooks, i.settings, i.created_at, i.updated_at
    FROM integrations i JOIN environments e ON e.id = i.environment_id";

impl Store {
    pub async fn create_integration(
        &self,
        environment: &Environment,
        new: &NewIntegration,
    ) -> Result<Integration, StoreError> {
        let sealed = self.seal(Purpose::WebhookSecret, new.webhook_secret.as_deref());
        let client_secret = self.seal(Purpose::OAuthClientSecret, new.oauth_client_secret.as_deref());
        let inserted = on_pool!(self, |pool| sqlx::query(
            "INSERT INTO integrations (environment_id, unique_key, provider, display_name, webhook_secret,
                                       forward_webhooks, settings, created_at, updated_at, oauth_client_secret)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $9)"
        )
        .bind(environment.id)
        .bind(new.unique_key.as_str())
        .bind(&new.provider)
        .bind(&new.display_name)
        .bind(&sealed)
        .bind(new.forward_webhooks)
        .bind(Json(&new.settings))
        .bind(Utc::now())
        .bind(&client_secret)
        .execute(pool)
        .await
        .map(|_| ()));
        conflict_on_unique(inserted, || {
            format!("integration {} in environment {}", new.unique_key, environment.name)
        })?;
        self.existing_integration(environment.id, &new.unique_key).await
    }

    pub async fn integration(
        &self,
        environment_id: i64,
        key: &IntegrationKey,
    ) -> Result<Option<Integration>, StoreError> {
        let query = format!("{SELECT} WHERE i.environment_id = $1 AND i.unique_key = $2");
        let row: Option<IntegrationRow> = on_pool!(self, |pool| sqlx::query_as(&query)
            .bind(environment_id)
            .bind(key.as_str())
            .fetch_optional(pool)
            .await)?;
        row.map(|row| row.open(&self.cipher)).transpose()
    }

    /// The integration, or `NotFound` naming it.
    pub async fn existing_integration(
        &self,
        environment_id: i64,
        key: &IntegrationKey,
    ) -> Result<Integration, StoreError> {
        self.integration(environment_id, key)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("integration {key}")))
    }

    /// Every integration of every environment (what ingest caches), or of one.
    pub async fn integrations(&self, environment_id: Option<i64>) -> Result<Vec<Integration>, StoreError> {
        let query = format!("{SELECT} WHERE ($1 IS NULL OR i.environment_id = $1) ORDER BY i.id");
        let rows: Vec<IntegrationRow> = on_pool!(self, |pool| sqlx::query_as(&query)
            .bind(environment_id)
            .fetch_all(pool)
            .await)?;
        rows.into_iter().map(|row| row.open(&self.cipher)).collect()
    }

    /// Applies `changes`; `NotFound` when there is no such integration.
    pub async fn update_integration(
        &self,
        environment_id: i64,
        key: &IntegrationKey,
        changes: &IntegrationChanges,
    ) -> Result<Integration, StoreError> {
        // One statement, no read first: concurrent updates of different fields both land.
        let (set_name, name) = split_change(&changes.display_name);
        let (set_secret, secret) = split_change(&changes.webhook_secret);
        let (set_client_secret, client_secret) = split_change(&changes.oauth_client_secret);
        let now = Utc::now();
        let updated = in_transaction!(self, |tx| {
            let updated = sqlx::query(
                "UPDATE integrations SET
                 provider = COALESCE($1, provider),
                 display_name = CASE WHEN $2 THEN $3 ELSE display_name END,
                 webhook_secret = CASE WHEN $4 THEN $5 ELSE webhook_secret END,
                 forward_webhooks = COALESCE($6, forward_webhooks),
                 updated_at = $7,
                 settings = COALESCE($10, settings),
                 oauth_client_secret = CASE WHEN $11 THEN $12 ELSE oauth_client_secret END
             WHERE environment_id = $8 AND unique_key = $9",
            )
            .bind(&changes.provider)
            .bind(set_name)
            .bind(name)
            .bind(set_secret)
            .bind(self.seal(Purpose::WebhookSecret, secret))
            .bind(changes.forward_webhooks)
            .bind(now)
            .bind(environment_id)
            .bind(key.as_str())
            .bind(changes.settings.as_ref().map(Json))
            .bind(set_client_secret)
            .bind(self.seal(Purpose::OAuthClientSecret, client_secret))
            .execute(&mut *tx)
            .await?
            .rows_affected();
            // What refreshes tokens may have changed (a token URL, a client secret): the
            // keep-alive looks again at the connections it had found nothing to refresh in.
            if changes.provider.is_some() || changes.settings.is_some() || set_client_secret {
                sqlx::query(
                    "UPDATE connections SET refresh_check_at = $1
                     WHERE refresh_check_at IS NULL AND credentials IS NOT NULL AND deleted_at IS NULL
                       AND integration_id = (SELECT id FROM integrations WHERE environment_id = $2 AND unique_key = $3)",
                )
                .bind(now)
                .bind(environment_id)
                .bind(key.as_str())
                .execute(&mut *tx)
                .await?;
            }
            Ok::<u64, StoreError>(updated)
        })?;
        if updated == 0 {
            return Err(StoreError::NotFound(format!("integration {key}")));
        }
        self.existing_integration(environment_id, key).await
    }

    /// Deletes an integration and its connections; false when there was none.
    pub async fn delete_integration(&self, environment_id: i64, key: &IntegrationKey) -> Result<bool, StoreError> {
        let done = on_pool!(self, |pool| sqlx::query(
            "DELETE FROM integrations WHERE environment_id = $1 AND unique_key = $2"
        )
        .bind(environment_id)
        .bind(key.as_str())
        .execute(pool)
        .await
        .map(|r| r.rows_affected()))?;
        Ok(done > 0)
    }

    fn seal(&self, purpose: Purpose, secret: Option<&str>) -> Option<String> {
        secret.map(|s| self.cipher.seal(purpose, s))
    }
}

/// A clearable change as (whether to set, the new value).
fn split_change(change: &Option<Option<String>>) -> (bool, Option<&str>) {
    match change {
        Some(value) => (true, value.as_deref()),
        None => (false, None),
    }
}
