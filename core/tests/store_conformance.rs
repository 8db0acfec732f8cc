//! One conformance suite, run against Postgres and SQLite.

use hookyard_core::store::{Backend, NewIntegration, Store, StoreError};
use hookyard_testkit::{PgDatabase, SqliteFile};
use serde_json::json;

async fn conformance(store: Store) {
    store.ping().await.unwrap();
    let dev = store.ensure_environment(&"dev".parse().unwrap()).await.unwrap();
    let again = store.ensure_environment(&"dev".parse().unwrap()).await.unwrap();
    assert_eq!(dev, again, "ensure_environment is idempotent and keeps the keys");
    assert!(dev.secret_key.starts_with("sk_"));
    let prod = store.ensure_environment(&"prod".parse().unwrap()).await.unwrap();
    assert_ne!(dev.webhook_id, prod.webhook_id);
    assert_ne!(dev.secret_key, prod.secret_key);
    assert_eq!(store.environments().await.unwrap().len(), 2);

    let new = NewIntegration {
        unique_key: "github".parse().unwrap(),
        provider: "github".into(),
        webhook_secret: Some("s3cret".into()),
        settings: json!({"forward_webhooks": true, "nested": {"a": [1, 2]}}),
    };
    let created = store.create_integration(&dev, &new).await.unwrap();
    assert_eq!(created.unique_key.as_str(), "github");
    assert_eq!(created.environment, dev.name);
    assert_eq!(created.settings, new.settings, "settings JSON round-trips");
    assert_eq!(created.webhook_secret.as_deref(), Some("s3cret"));

    let duplicate = store.create_integration(&dev, &new).await.unwrap_err();
    assert!(matches!(duplicate, StoreError::Conflict(_)), "{duplicate}");
    // The same key in another environment is a different integration.
    store.create_integration(&prod, &new).await.unwrap();

    let all = store.integrations().await.unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(
        store.integration(dev.id, &new.unique_key).await.unwrap().unwrap(),
        created
    );
    assert!(store
        .integration(dev.id, &"nope".parse().unwrap())
        .await
        .unwrap()
        .is_none());

    assert!(store.delete_integration(dev.id, &new.unique_key).await.unwrap());
    assert!(!store.delete_integration(dev.id, &new.unique_key).await.unwrap());
    assert!(store.integration(dev.id, &new.unique_key).await.unwrap().is_none());
    assert!(store.integration(prod.id, &new.unique_key).await.unwrap().is_some());
}

#[tokio::test]
async fn postgres() {
    let db = PgDatabase::create().await;
    let store = Store::connect(&db.url).await.unwrap();
    assert_eq!(store.backend(), Backend::Postgres);
    conformance(store.clone()).await;
    // Migrations are idempotent: a second start against the same database is fine.
    Store::connect(&db.url).await.unwrap();
}

#[tokio::test]
async fn sqlite() {
    let file = SqliteFile::create();
    let store = Store::connect(&file.url).await.unwrap();
    assert_eq!(store.backend(), Backend::Sqlite);
    conformance(store).await;
    Store::connect(&file.url).await.unwrap();
}

#[tokio::test]
async fn sqlite_in_memory() {
    let store = Store::connect("sqlite::memory:").await.unwrap();
    conformance(store.clone()).await;
    // Concurrent readers make the pool open more connections; sqlx names in-memory
    // databases with a shared cache, so each sees the same data.
    let readers: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.environments().await.map(|e| e.len()) })
        })
        .collect();
    for reader in readers {
        assert_eq!(reader.await.unwrap().unwrap(), 2);
    }
}

#[tokio::test]
async fn sqlite_creates_missing_folders() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/a/b/hookyard.db", dir.path().display());
    Store::connect(&url).await.unwrap();
    assert!(dir.path().join("a/b/hookyard.db").exists());
}

#[tokio::test]
async fn unreachable_postgres_is_a_clear_error() {
    // Port 1 on loopback: nothing listens there.
    let err = Store::connect("postgres://u:pw@127.0.0.1:1/db")
        .await
        .err()
        .expect("must fail");
    let message = err.to_string();
    assert!(
        message.contains("cannot open the database postgres://u:***@127.0.0.1:1/db"),
        "{message}"
    );
    assert!(!message.contains("pw"), "password leaked: {message}");
}
