//! The store: one interface over Postgres (production) and SQLite (the embedded
//! single-node default). Each operation is written once; `on_pool!` runs the same
//! query text against whichever back end is configured. Dialect differences live in
//! the two migration folders, not in the queries.

mod model;

use std::str::FromStr;
use std::time::Duration;

use chrono::Utc;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::types::Json;

pub use model::{Environment, Integration, NewIntegration};
use model::{EnvironmentRow, IntegrationRow};

use crate::keys::{EnvironmentName, IntegrationKey};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the database {url}: {source}")]
    Connect { url: String, source: sqlx::Error },
    #[error("migrating the database failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("{0} already exists")]
    Conflict(String),
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

#[derive(Clone)]
enum Pool {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

#[derive(Clone)]
pub struct Store {
    pool: Pool,
}

/// Runs `$body` with `$pool` bound to the configured back end's pool.
macro_rules! on_pool {
    ($store:expr, |$pool:ident| $body:expr) => {
        match &$store.pool {
            Pool::Postgres($pool) => $body,
            Pool::Sqlite($pool) => $body,
        }
    };
}

pub mod records;

impl Store {
    /// Opens the database named by `url` (`postgres://…` or `sqlite://path`) and brings
    /// its schema up to date. A SQLite file and its folder are created when missing.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        let connect_error = |source| StoreError::Connect {
            url: redact(url),
            source,
        };
        let pool = if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)
                .map_err(connect_error)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(5))
                .foreign_keys(true);
            if let Some(dir) = options.get_filename().parent() {
                if !dir.as_os_str().is_empty() {
                    std::fs::create_dir_all(dir).map_err(|e| connect_error(sqlx::Error::Io(e)))?;
                }
            }
            let pool = SqlitePoolOptions::new()
                .max_connections(4)
                .acquire_timeout(Duration::from_secs(5))
                .connect_with(options)
                .await
                .map_err(connect_error)?;
            sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
            Pool::Sqlite(pool)
        } else {
            let pool = PgPoolOptions::new()
                .max_connections(10)
                .acquire_timeout(Duration::from_secs(5))
                .connect(url)
                .await
                .map_err(connect_error)?;
            sqlx::migrate!("./migrations/postgres").run(&pool).await?;
            Pool::Postgres(pool)
        };
        Ok(Store { pool })
    }

    pub fn backend(&self) -> Backend {
        match self.pool {
            Pool::Postgres(_) => Backend::Postgres,
            Pool::Sqlite(_) => Backend::Sqlite,
        }
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        on_pool!(self, |pool| sqlx::query("SELECT 1").execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    /// The environment called `name`, created with fresh keys if it does not exist yet.
    /// Safe to race: concurrent callers all get the one row.
    pub async fn ensure_environment(&self, name: &EnvironmentName) -> Result<Environment, StoreError> {
        let webhook_id = uuid::Uuid::new_v4().to_string();
        let (secret_key, signing_key) = (random_key("sk_"), random_key("whsk_"));
        on_pool!(self, |pool| sqlx::query(
            "INSERT INTO environments (name, webhook_id, secret_key, webhook_signing_key, created_at)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO NOTHING"
        )
        .bind(name.as_str())
        .bind(&webhook_id)
        .bind(&secret_key)
        .bind(&signing_key)
        .bind(Utc::now())
        .execute(pool)
        .await
        .map(|_| ()))?;
        self.environment(name)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("environment {name} vanished after insert")))
    }

    pub async fn environment(&self, name: &EnvironmentName) -> Result<Option<Environment>, StoreError> {
        let row: Option<EnvironmentRow> = on_pool!(self, |pool| sqlx::query_as(
            "SELECT id, name, webhook_id, secret_key, webhook_signing_key, created_at
             FROM environments WHERE name = $1"
        )
        .bind(name.as_str())
        .fetch_optional(pool)
        .await)?;
        row.map(Environment::try_from).transpose()
    }

    pub async fn environments(&self) -> Result<Vec<Environment>, StoreError> {
        let rows: Vec<EnvironmentRow> = on_pool!(self, |pool| sqlx::query_as(
            "SELECT id, name, webhook_id, secret_key, webhook_signing_key, created_at
             FROM environments ORDER BY id"
        )
        .fetch_all(pool)
        .await)?;
        rows.into_iter().map(Environment::try_from).collect()
    }

    pub async fn create_integration(
        &self,
        environment: &Environment,
        new: &NewIntegration,
    ) -> Result<Integration, StoreError> {
        let now = Utc::now();
        let inserted = on_pool!(self, |pool| {
            sqlx::query(
            "INSERT INTO integrations (environment_id, unique_key, provider, webhook_secret, settings, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $6)"
        )
        .bind(environment.id)
        .bind(new.unique_key.as_str())
        .bind(&new.provider)
        .bind(&new.webhook_secret)
        .bind(Json(&new.settings))
        .bind(now)
        .execute(pool)
        .await
        .map(|_| ())
        });
        match inserted {
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                return Err(StoreError::Conflict(format!(
                    "integration {} in environment {}",
                    new.unique_key, environment.name
                )))
            }
            other => other?,
        };
        self.integration(environment.id, &new.unique_key)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("integration {} vanished after insert", new.unique_key)))
    }

    pub async fn integration(
        &self,
        environment_id: i64,
        key: &IntegrationKey,
    ) -> Result<Option<Integration>, StoreError> {
        let row: Option<IntegrationRow> = on_pool!(self, |pool| sqlx::query_as(
            "SELECT i.id, i.environment_id, e.name AS environment, i.unique_key, i.provider, i.webhook_secret,
                    i.settings, i.created_at, i.updated_at
             FROM integrations i JOIN environments e ON e.id = i.environment_id
             WHERE i.environment_id = $1 AND i.unique_key = $2"
        )
        .bind(environment_id)
        .bind(key.as_str())
        .fetch_optional(pool)
        .await)?;
        row.map(Integration::try_from).transpose()
    }

    /// Every integration of every environment (what ingest caches).
    pub async fn integrations(&self) -> Result<Vec<Integration>, StoreError> {
        let rows: Vec<IntegrationRow> = on_pool!(self, |pool| sqlx::query_as(
            "SELECT i.id, i.environment_id, e.name AS environment, i.unique_key, i.provider, i.webhook_secret,
                    i.settings, i.created_at, i.updated_at
             FROM integrations i JOIN environments e ON e.id = i.environment_id
             ORDER BY i.id"
        )
        .fetch_all(pool)
        .await)?;
        rows.into_iter().map(Integration::try_from).collect()
    }

    /// Deletes an integration; false when there was none.
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
}

/// A random secret: `prefix` + 32 bytes from the OS, hex.
fn random_key(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the OS random source is unavailable");
    format!("{prefix}{}", hex::encode(bytes))
}

/// The URL without its password, for error messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact("sqlite://x.db"), "sqlite://x.db");
    }

    #[test]
    fn keys_are_random_and_prefixed() {
        let (a, b) = (random_key("sk_"), random_key("sk_"));
        assert!(a.starts_with("sk_") && a.len() == 67);
        assert_ne!(a, b);
    }
}
