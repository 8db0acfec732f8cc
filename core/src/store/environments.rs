//! Environments: `dev`, `prod`, … each with its public webhook id and its keys.

use chrono::Utc;

use super::model::EnvironmentRow;
use super::{random_key, Environment, EnvironmentVariable, Pool, Store, StoreError};
use crate::keys::EnvironmentName;
use crate::secrets::{key_hash, Purpose};

const SELECT: &str = "SELECT id, name, webhook_id, secret_key, webhook_signing_key, created_at FROM environments";

impl Store {
    /// The environment called `name`, created with fresh keys if it does not exist yet.
    /// Safe to race: concurrent callers all get the one row.
    pub async fn ensure_environment(&self, name: &EnvironmentName) -> Result<Environment, StoreError> {
        let webhook_id = uuid::Uuid::new_v4().to_string();
        let secret_key = random_key("sk_");
        let sealed_secret = self.cipher.seal(Purpose::EnvironmentSecretKey, &secret_key);
        let sealed_signing = self.cipher.seal(Purpose::EnvironmentSigningKey, &random_key("whsk_"));
        on_pool!(self, |pool| sqlx::query(
            "INSERT INTO environments (name, webhook_id, secret_key, secret_key_hash, webhook_signing_key, created_at)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name) DO NOTHING"
        )
        .bind(name.as_str())
        .bind(&webhook_id)
        .bind(&sealed_secret)
        .bind(key_hash(&secret_key))
        .bind(&sealed_signing)
        .bind(Utc::now())
        .execute(pool)
        .await
        .map(|_| ()))?;
        self.environment(name)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("environment {name} vanished after insert")))
    }

    /// A new environment `name` with fresh keys; `Conflict` when it exists.
    pub async fn create_environment(&self, name: &EnvironmentName) -> Result<Environment, StoreError> {
        if self.environment(name).await?.is_some() {
            return Err(StoreError::Conflict(format!("environment {name}")));
        }
        self.ensure_environment(name).await
    }

    /// Gives environment `name` a new secret key; the old one stops working at once (the
    /// API looks keys up per request). Its webhook URLs stay.
    pub async fn rotate_secret_key(&self, name: &EnvironmentName) -> Result<Environment, StoreError> {
        let secret_key = random_key("sk_");
        let sealed = self.cipher.seal(Purpose::EnvironmentSecretKey, &secret_key);
        on_pool!(self, |pool| sqlx::query(
            "UPDATE environments SET secret_key = $1, secret_key_hash = $2 WHERE name = $3"
        )
        .bind(&sealed)
        .bind(key_hash(&secret_key))
        .bind(name.as_str())
        .execute(pool)
        .await
        .map(|_| ()))?;
        // No row updated: the read finds none either.
        self.environment(name)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("environment {name}")))
    }

    pub async fn environment(&self, name: &EnvironmentName) -> Result<Option<Environment>, StoreError> {
        let query = format!("{SELECT} WHERE name = $1");
        let row: Option<EnvironmentRow> = on_pool!(self, |pool| sqlx::query_as(&query)
            .bind(name.as_str())
            .fetch_optional(pool)
            .await)?;
        row.map(|row| row.open(&self.cipher)).transpose()
    }

    pub async fn environment_by_id(&self, id: i64) -> Result<Option<Environment>, StoreError> {
        let query = format!("{SELECT} WHERE id = $1");
        let row: Option<EnvironmentRow> =
            on_pool!(self, |pool| sqlx::query_as(&query).bind(id).fetch_optional(pool).await)?;
        row.map(|row| row.open(&self.cipher)).transpose()
    }

    /// The environment's variables, by name (byte order: the same on both back ends,
    /// whatever Postgres' collation).
    pub async fn environment_variables(&self, environment_id: i64) -> Result<Vec<EnvironmentVariable>, StoreError> {
        let rows: Vec<(String, String)> = on_pool!(self, |pool| sqlx::query_as(
            "SELECT name, value FROM environment_variables WHERE environment_id = $1"
        )
        .bind(environment_id)
        .fetch_all(pool)
        .await)?;
        let mut variables = rows
            .into_iter()
            .map(|(name, sealed)| {
                let value = self.cipher.open(Purpose::EnvironmentVariable, &sealed)?;
                Ok(EnvironmentVariable { name, value })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        variables.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(variables)
    }

    /// Replaces the environment's variables with `variables` (names unique), at once.
    pub async fn set_environment_variables(
        &self,
        environment_id: i64,
        variables: &[EnvironmentVariable],
    ) -> Result<(), StoreError> {
        in_transaction!(self, |tx| {
            sqlx::query("DELETE FROM environment_variables WHERE environment_id = $1")
                .bind(environment_id)
                .execute(&mut *tx)
                .await?;
            for variable in variables {
                sqlx::query("INSERT INTO environment_variables (environment_id, name, value) VALUES ($1, $2, $3)")
                    .bind(environment_id)
                    .bind(&variable.name)
                    .bind(self.cipher.seal(Purpose::EnvironmentVariable, &variable.value))
                    .execute(&mut *tx)
                    .await?;
            }
            Ok::<_, StoreError>(())
        })
    }

    /// The environment whose secret key this is (API authentication).
    pub async fn environment_by_secret_key(&self, secret_key: &str) -> Result<Option<Environment>, StoreError> {
        let query = format!("{SELECT} WHERE secret_key_hash = $1");
        let hash = key_hash(secret_key);
        let row: Option<EnvironmentRow> = on_pool!(self, |pool| sqlx::query_as(&query)
            .bind(&hash)
            .fetch_optional(pool)
            .await)?;
        row.map(|row| row.open(&self.cipher)).transpose()
    }

    pub async fn environments(&self) -> Result<Vec<Environment>, StoreError> {
        let query = format!("{SELECT} ORDER BY id");
        let rows: Vec<EnvironmentRow> = on_pool!(self, |pool| sqlx::query_as(&query).fetch_all(pool).await)?;
        rows.into_iter().map(|row| row.open(&self.cipher)).collect()
    }

    /// Databases created before secrets were sealed hold plaintext environment keys (and
    /// webhook secrets) and no key hash. Seal them, once, under this store's key.
    pub(super) async fn seal_legacy_environments(&self) -> Result<(), StoreError> {
        in_transaction!(self, |tx| {
            let legacy: Vec<(i64, String, String)> = sqlx::query_as(
                "SELECT id, secret_key, webhook_signing_key FROM environments WHERE secret_key_hash IS NULL",
            )
            .fetch_all(&mut *tx)
            .await?;
            for (id, secret_key, signing_key) in legacy {
                tracing::info!(
                    environment_id = id,
                    "sealing the keys of an environment stored in plaintext"
                );
                sqlx::query(
                    "UPDATE environments SET secret_key = $1, secret_key_hash = $2, webhook_signing_key = $3
                     WHERE id = $4",
                )
                .bind(self.cipher.seal(Purpose::EnvironmentSecretKey, &secret_key))
                .bind(key_hash(&secret_key))
                .bind(self.cipher.seal(Purpose::EnvironmentSigningKey, &signing_key))
                .bind(id)
                .execute(&mut *tx)
                .await?;
                let secrets: Vec<(i64, String)> = sqlx::query_as(
                    "SELECT id, webhook_secret FROM integrations
                     WHERE environment_id = $1 AND webhook_secret IS NOT NULL",
                )
                .bind(id)
                .fetch_all(&mut *tx)
                .await?;
                for (integration_id, secret) in secrets {
                    sqlx::query("UPDATE integrations SET webhook_secret = $1 WHERE id = $2")
                        .bind(self.cipher.seal(Purpose::WebhookSecret, &secret))
                        .bind(integration_id)
                        .execute(&mut *tx)
                        .await?;
                }
            }
            Ok::<(), StoreError>(())
        })
    }
}
