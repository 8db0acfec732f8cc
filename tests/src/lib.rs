//! Test harness: real services per test, cleaned up when dropped (also on panic).
//!
//! - [`NatsServer`]: a `nats-server` (2.11 or newer) on a free loopback port with its
//!   own temporary JetStream store; it can be stopped, restarted on the same port and
//!   store, and paused (SIGSTOP) to play a server that no longer answers.
//! - [`NatsCluster`]: such servers clustered on 127.0.0.1, 127.0.0.2, …, whose nodes
//!   can be killed and started again.
//! - [`PgDatabase`]: a freshly created Postgres database, dropped afterwards.
//! - [`SqliteFile`]: a fresh SQLite file in a temporary folder.
//! - [`receiver::Receiver`]: an HTTP receiver on loopback that records what it is sent.
//! - [`proxy::ForwardProxy`]: an egress proxy on loopback that records what it is asked.
//! - [`Busy`]: tasks keeping a NATS connection busy with other traffic.
//!
//! nextest runs every test in its own process, so every test gets its own services.

pub mod fake_provider;
mod nats;
mod postgres;
pub mod proxy;
pub mod receiver;

pub use nats::{deploy_dir, nats_server_bin, NatsCluster, NatsServer};
pub use postgres::PgDatabase;

use std::future::Future;
use std::net::TcpListener;
use std::time::{Duration, Instant};

/// The encryption key every test store and test process uses (base64 of 32 bytes).
pub const TEST_ENCRYPTION_KEY: &str = "aG9va3lhcmQtdGVzdC1rZXktMzItYnl0ZXMtbG9uZyE=";

/// Tasks publishing other traffic on a NATS connection, as a worker's carries its other
/// consumers' acks and publishes; stopped when dropped.
pub struct Busy(Vec<tokio::task::AbortHandle>);

impl Busy {
    /// Starts `tasks` tasks, each publishing 512 bytes to `noise` on `client` in a loop.
    pub fn start(client: &async_nats::Client, tasks: usize) -> Busy {
        let handles = (0..tasks)
            .map(|_| {
                let client = client.clone();
                tokio::spawn(async move {
                    loop {
                        let _ = client.publish("noise", vec![0u8; 512].into()).await;
                        tokio::task::yield_now().await;
                    }
                })
                .abort_handle()
            })
            .collect();
        Busy(handles)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// The cipher of [`TEST_ENCRYPTION_KEY`].
pub fn test_cipher() -> hookyard_core::secrets::Cipher {
    hookyard_core::secrets::Cipher::from_text(TEST_ENCRYPTION_KEY).expect("a valid test key")
}

/// A SQLite database file in its own temporary folder.
pub struct SqliteFile {
    _dir: tempfile::TempDir,
    pub url: String,
}

impl SqliteFile {
    pub fn create() -> SqliteFile {
        let dir = tempfile::tempdir().expect("temporary folder");
        let url = format!("sqlite://{}", dir.path().join("hookyard.db").display());
        SqliteFile { _dir: dir, url }
    }
}

/// Every text `sql` returns, read past the store: what is at rest, on either back end.
pub async fn raw_texts(database_url: &str, sql: &str) -> Vec<String> {
    if database_url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(database_url).await.expect("opening SQLite");
        sqlx::query_scalar(sql).fetch_all(&pool).await.expect(sql)
    } else {
        let pool = sqlx::PgPool::connect(database_url)
            .await
            .expect("connecting to Postgres");
        sqlx::query_scalar(sql).fetch_all(&pool).await.expect(sql)
    }
}

/// Runs `sql` past the store (to shape data as an older version left it).
pub async fn raw_execute(database_url: &str, sql: &str) {
    if database_url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(database_url).await.expect("opening SQLite");
        sqlx::query(sql).execute(&pool).await.expect(sql);
    } else {
        let pool = sqlx::PgPool::connect(database_url)
            .await
            .expect("connecting to Postgres");
        sqlx::query(sql).execute(&pool).await.expect(sql);
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding an ephemeral port")
        .port()
}

/// `N` distinct ports on `host` that were free a moment ago.
pub fn free_ports<const N: usize>(host: &str) -> [u16; N] {
    // All held at once, so they differ.
    let held = [(); N].map(|()| TcpListener::bind((host, 0)).expect("binding an ephemeral port"));
    held.map(|l| l.local_addr().expect("a bound address").port())
}

/// Polls `check` until it yields `Some`, or panics with `what` after `timeout`.
/// For conditions that have no event to await (a reconnect, a cache refresh).
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
