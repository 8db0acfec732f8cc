//! The store: one interface over Postgres (production) and SQLite (the embedded
//! single-node default). Each operation is written once; `on_pool!` runs the same
//! query text against whichever back end is configured. Dialect differences live in
//! the two migration folders, not in the queries.

//!
//! Secrets (environment keys, webhook secrets, connection credentials) are sealed by the
//! store's [`Cipher`] on the way in and opened on the way out; the rest of hookyard
//! only ever sees plaintext, the database only ever ciphertext.

mod model;

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};

pub use model::{
    Connection, ConnectionQuery, Credentials, Environment, EnvironmentVariable, Integration, IntegrationChanges,
    NewConnection, NewIntegration, RefreshFailure,
};

use crate::secrets::{Cipher, SecretError};

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
    #[error("{0} does not exist")]
    NotFound(String),
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Invalid(String),
}

impl StoreError {
    /// The database could not be reached (as opposed to refusing the request): worth a
    /// retry later, a 503 rather than a 500.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Connect { .. } => true,
            StoreError::Database(
                sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) | sqlx::Error::Tls(_),
            ) => true,
            // Postgres's connection exceptions (08), resource shortages (53), operator
            // intervention such as a shutdown (57), and a database that is gone (3D000).
            StoreError::Database(sqlx::Error::Database(e)) => e
                .code()
                .is_some_and(|code| ["08", "53", "57"].iter().any(|class| code.starts_with(class)) || code == "3D000"),
            _ => false,
        }
    }
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
    cipher: Cipher,
}

/// The `WHERE` condition of the live connection `$2` of integration `$3` in environment
/// `$1`, as a literal for `concat!`.
macro_rules! live_connection {
    () => {
        "environment_id = $1 AND connection_id = $2 AND deleted_at IS NULL
         AND integration_id = (SELECT id FROM integrations WHERE environment_id = $1 AND unique_key = $3)"
    };
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

/// Runs `$body` inside a transaction on the configured back end, committed when the
/// body finishes; an early return (`?`) rolls it back.
macro_rules! in_transaction {
    ($store:expr, |$tx:ident| $body:expr) => {
        match &$store.pool {
            Pool::Postgres(pool) => {
                let mut $tx = pool.begin().await?;
                let result = $body;
                $tx.commit().await?;
                result
            }
            Pool::Sqlite(pool) => {
                let mut $tx = pool.begin().await?;
                let result = $body;
                $tx.commit().await?;
                result
            }
        }
    };
}

pub mod action_runs;
mod clock;
mod connections;
pub(crate) mod tx;
pub use connections::{ConnectionChanges, MetadataWrite};
pub mod commit;
pub mod connection_events;
pub mod dead_letters;
mod environments;
pub mod forwarding;
pub mod functions;
mod integrations;
mod locks;
pub mod logs;
pub mod notices;
pub mod records;
pub mod refresh;
pub mod replays;
pub mod reseal;
pub mod syncs;

impl Store {
    /// Opens the database named by `url` (`postgres://…` or `sqlite://path`) and brings
    /// its schema up to date; secrets are sealed under `cipher`. A SQLite file and its
    /// folder are created when missing.
    pub async fn connect(url: &str, cipher: Cipher) -> Result<Store, StoreError> {
        Self::connect_with(url, cipher, 10).await
    }

    /// [`Store::connect`] keeping at most `max_connections` Postgres connections
    /// (`database_max_connections`).
    pub async fn connect_with(url: &str, cipher: Cipher, max_connections: u32) -> Result<Store, StoreError> {
        let connect_error = |source| StoreError::Connect {
            url: crate::config::without_password(url),
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
                .max_connections(max_connections)
                .acquire_timeout(Duration::from_secs(5))
                .connect(url)
                .await
                .map_err(connect_error)?;
            sqlx::migrate!("./migrations/postgres").run(&pool).await?;
            Pool::Postgres(pool)
        };
        let store = Store { pool, cipher };
        store.seal_legacy_environments().await?;
        Ok(store)
    }

    pub fn backend(&self) -> Backend {
        match self.pool {
            Pool::Postgres(_) => Backend::Postgres,
            Pool::Sqlite(_) => Backend::Sqlite,
        }
    }

    /// Statements the pool's connections keep prepared, all together. It holds every
    /// connection of the pool for a moment, so it is for tests and diagnostics: a count
    /// that grows with traffic means a statement whose text varies (each text is
    /// prepared and kept on its own).
    pub async fn prepared_statements(&self) -> Result<usize, StoreError> {
        use sqlx::Connection as _;
        on_pool!(self, |pool| {
            let all = (0..pool.options().get_max_connections()).map(|_| pool.acquire());
            let connections = futures::future::try_join_all(all).await?;
            Ok(connections.iter().map(|c| c.cached_statements_size()).sum())
        })
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        on_pool!(self, |pool| sqlx::query("SELECT 1").execute(pool).await.map(|_| ()))?;
        Ok(())
    }
}

/// A lease or a wait as chrono's (one too long to say is as long as it gets).
pub fn chrono_duration(duration: std::time::Duration) -> chrono::Duration {
    chrono::Duration::from_std(duration).unwrap_or(chrono::Duration::MAX)
}

/// A timestamp in a JSON parameter: as the SQLite driver writes one (so that stored ones
/// still compare as text), which Postgres reads too.
fn json_timestamp(at: &chrono::DateTime<chrono::Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false)
}

/// A random secret: `prefix` + 32 bytes from the OS, hex.
fn random_key(prefix: &str) -> String {
    format!("{prefix}{}", hex::encode(crate::secrets::random_bytes::<32>()))
}

/// Maps a unique violation to `Conflict(what)`.
fn conflict_on_unique<T>(result: Result<T, sqlx::Error>, what: impl FnOnce() -> String) -> Result<T, StoreError> {
    match result {
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(StoreError::Conflict(what())),
        other => Ok(other?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_random_and_prefixed() {
        let (a, b) = (random_key("sk_"), random_key("sk_"));
        assert!(a.starts_with("sk_") && a.len() == 67);
        assert_ne!(a, b);
    }
}
