//! The store reaches Postgres over TLS, as managed databases require (`sslmode=require`
//! in the URL; `verify-full` with `sslrootcert` to check the server's certificate). The
//! server here is Debian's PostgreSQL, which offers TLS with its own self-signed
//! certificate: what is checked is that the session is encrypted.

use hookyard_core::Store;
use hookyard_testkit::{test_cipher, PgDatabase};

#[tokio::test]
async fn the_store_reaches_postgres_over_tls() {
    let db = PgDatabase::create().await;
    let joiner = if db.url.contains('?') { '&' } else { '?' };
    let url = format!("{}{joiner}sslmode=require", db.url);
    let store = Store::connect(&url, test_cipher())
        .await
        .unwrap_or_else(|e| panic!("connecting with sslmode=require: {e}"));
    let environment = store.ensure_environment(&"prod".parse().unwrap()).await.unwrap();
    assert_eq!(environment.name.as_str(), "prod");

    let mut session = <sqlx::PgConnection as sqlx::Connection>::connect(&url).await.unwrap();
    let (encrypted, version): (bool, Option<String>) =
        sqlx::query_as("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(&mut session)
            .await
            .unwrap();
    assert!(encrypted, "the session is not encrypted");
    assert!(version.is_some_and(|v| v.starts_with("TLS")));
}
