//! One conformance suite, run against Postgres and SQLite.

use hookyard_core::keys::IntegrationKey;
use hookyard_core::store::connection_events::POST_CREATION;
use hookyard_core::store::forwarding::DeliveryAttempt;
use hookyard_core::store::syncs::SyncKey;
use hookyard_core::store::{
    Backend, ConnectionChanges, ConnectionQuery, Credentials, Environment, EnvironmentVariable, IntegrationChanges,
    MetadataWrite, NewConnection, NewIntegration, Store, StoreError,
};
use hookyard_testkit::{raw_execute, raw_texts, test_cipher, PgDatabase, SqliteFile};
use serde_json::json;

async fn conformance(store: Store, url: Option<&str>) {
    store.ping().await.unwrap();
    let dev = store.ensure_environment(&"dev".parse().unwrap()).await.unwrap();
    let again = store.ensure_environment(&"dev".parse().unwrap()).await.unwrap();
    assert_eq!(dev, again, "ensure_environment is idempotent and keeps the keys");
    assert!(dev.secret_key.starts_with("sk_"));
    let prod = store.ensure_environment(&"prod".parse().unwrap()).await.unwrap();
    assert_ne!(dev.webhook_id, prod.webhook_id);
    assert_ne!(dev.secret_key, prod.secret_key);
    assert_eq!(store.environments().await.unwrap().len(), 2);
    assert_eq!(
        store.environment_by_secret_key(&prod.secret_key).await.unwrap(),
        Some(prod.clone())
    );
    assert_eq!(store.environment_by_secret_key("sk_nope").await.unwrap(), None);
    let exists = store.create_environment(&"prod".parse().unwrap()).await.unwrap_err();
    assert!(matches!(exists, StoreError::Conflict(_)), "{exists}");
    let staging = store.create_environment(&"staging".parse().unwrap()).await.unwrap();
    let rotated = store.rotate_secret_key(&staging.name).await.unwrap();
    assert_ne!(rotated.secret_key, staging.secret_key);
    assert_eq!(rotated.webhook_id, staging.webhook_id, "its webhook URLs stay");
    assert_eq!(
        store.environment_by_secret_key(&staging.secret_key).await.unwrap(),
        None
    );
    assert_eq!(
        store.environment_by_secret_key(&rotated.secret_key).await.unwrap(),
        Some(rotated)
    );
    let missing = store.rotate_secret_key(&"nope".parse().unwrap()).await.unwrap_err();
    assert!(matches!(missing, StoreError::NotFound(_)), "{missing}");

    let new = NewIntegration {
        display_name: Some("GitHub".into()),
        webhook_secret: Some("whsec_s3cret".into()),
        settings: json!({"nested": {"a": [1, 2]}}),
        ..NewIntegration::new("github".parse().unwrap(), "github")
    };
    let created = store.create_integration(&dev, &new).await.unwrap();
    assert_eq!(created.unique_key.as_str(), "github");
    assert_eq!(created.environment, dev.name);
    assert_eq!(created.settings, new.settings, "settings JSON round-trips");
    assert_eq!(created.webhook_secret.as_deref(), Some("whsec_s3cret"));
    assert_eq!(created.display_name.as_deref(), Some("GitHub"));
    assert!(created.forward_webhooks);

    let duplicate = store.create_integration(&dev, &new).await.unwrap_err();
    assert!(matches!(duplicate, StoreError::Conflict(_)), "{duplicate}");
    // The same key in another environment is a different integration.
    store.create_integration(&prod, &new).await.unwrap();

    assert_eq!(store.integrations(None).await.unwrap().len(), 2);
    assert_eq!(store.integrations(Some(dev.id)).await.unwrap(), vec![created.clone()]);
    assert_eq!(
        store.integration(dev.id, &new.unique_key).await.unwrap().unwrap(),
        created
    );
    assert!(store
        .integration(dev.id, &"nope".parse().unwrap())
        .await
        .unwrap()
        .is_none());

    // Partial updates: unset fields stay, Some(None) clears.
    let changed = store
        .update_integration(
            dev.id,
            &new.unique_key,
            &IntegrationChanges {
                display_name: Some(None),
                forward_webhooks: Some(false),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(changed.display_name, None);
    assert!(!changed.forward_webhooks);
    assert_eq!(changed.webhook_secret.as_deref(), Some("whsec_s3cret"), "untouched");
    assert_eq!(changed.provider, "github");
    let rotated = store
        .update_integration(
            dev.id,
            &new.unique_key,
            &IntegrationChanges {
                webhook_secret: Some(Some("whsec_n3w".into())),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(rotated.webhook_secret.as_deref(), Some("whsec_n3w"));
    let missing = store
        .update_integration(dev.id, &"nope".parse().unwrap(), &IntegrationChanges::default())
        .await
        .unwrap_err();
    assert!(matches!(missing, StoreError::NotFound(_)), "{missing}");

    connections(&store, &dev, &prod).await;

    if let Some(url) = url {
        // At rest, secrets are ciphertext. (Each plaintext holds a `_`, which base64
        // never does: a short alphanumeric one turned up in random ciphertext.)
        for text in raw_texts(url, "SELECT secret_key FROM environments").await {
            assert!(text.starts_with("v1:") && !text.contains("sk_"), "{text}");
        }
        for text in raw_texts(url, "SELECT webhook_secret FROM integrations").await {
            assert!(
                text.starts_with("v1:") && !text.contains("whsec_s3cret") && !text.contains("whsec_n3w"),
                "{text}"
            );
        }
        for text in raw_texts(url, "SELECT credentials FROM connections WHERE credentials IS NOT NULL").await {
            assert!(text.starts_with("v1:") && !text.contains("tok_live"), "{text}");
        }
    }

    schedule_slots(&store, &dev).await;
    delivery_attempts(&store).await;
    locks(&store, &dev, &prod).await;
    action_runs(&store, &dev).await;

    assert!(store.delete_integration(dev.id, &new.unique_key).await.unwrap());
    assert!(!store.delete_integration(dev.id, &new.unique_key).await.unwrap());
    assert!(store.integration(dev.id, &new.unique_key).await.unwrap().is_none());
    assert!(store.integration(prod.id, &new.unique_key).await.unwrap().is_some());
    let gone = store
        .connections(
            dev.id,
            &ConnectionQuery {
                limit: 100,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(gone.is_empty(), "an integration's connections go with it");
}

async fn connections(store: &Store, dev: &Environment, prod: &Environment) {
    let github: IntegrationKey = "github".parse().unwrap();
    let new = |id: &str| NewConnection {
        integration: github.clone(),
        connection_id: id.into(),
        connection_config: json!({"installation_id": 42}),
        metadata: json!({"plan": "pro", "seats": 3}),
        tags: json!({"team": "a"}),
        credentials: Some(Credentials::OAuth2 {
            access_token: "tok_live".into(),
            refresh_token: None,
            expires_at: None,
            raw: None,
        }),
    };
    let created = store.create_connection(dev, &new("acme")).await.unwrap();
    assert_eq!(created.connection_id, "acme");
    assert_eq!(created.provider, "github");
    assert_eq!(created.connection_config, json!({"installation_id": 42}));
    assert!(
        matches!(&created.credentials, Some(Credentials::OAuth2 { access_token, .. }) if access_token == "tok_live")
    );
    let conflict = store.create_connection(dev, &new("acme")).await.unwrap_err();
    assert!(matches!(conflict, StoreError::Conflict(_)), "{conflict}");
    let unknown = NewConnection {
        integration: "nope".parse().unwrap(),
        ..new("x")
    };
    assert!(matches!(
        store.create_connection(dev, &unknown).await,
        Err(StoreError::NotFound(_))
    ));
    // The same id in another environment is another connection.
    store.create_connection(prod, &new("acme")).await.unwrap();
    for id in ["Beta_1", "beta%2", "gamma"] {
        store.create_connection(dev, &new(id)).await.unwrap();
    }

    let list = |query: ConnectionQuery| async move {
        store
            .connections(dev.id, &ConnectionQuery { limit: 100, ..query })
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.connection_id)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        list(ConnectionQuery::default()).await,
        ["acme", "Beta_1", "beta%2", "gamma"]
    );
    let search = |s: &str| ConnectionQuery {
        search: Some(s.into()),
        ..Default::default()
    };
    assert_eq!(list(search("BETA")).await, ["Beta_1", "beta%2"], "case-insensitive");
    assert_eq!(list(search("%")).await, ["beta%2"], "wildcards are literal");
    assert_eq!(list(search("a_")).await, ["Beta_1"]);
    let page = ConnectionQuery {
        limit: 2,
        offset: 1,
        ..Default::default()
    };
    let paged: Vec<_> = store
        .connections(dev.id, &page)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.connection_id)
        .collect();
    assert_eq!(paged, ["Beta_1", "beta%2"]);
    let other = ConnectionQuery {
        integration: Some("nope".parse().unwrap()),
        ..Default::default()
    };
    assert!(list(other).await.is_empty());

    // Metadata: replace, then merge top-level keys, for several connections at once.
    let ids = vec!["acme".to_string(), "gamma".to_string()];
    let object = |v: serde_json::Value| v.as_object().unwrap().clone();
    store
        .set_connection_metadata(
            dev.id,
            &github,
            &ids,
            &object(json!({"plan": "free"})),
            MetadataWrite::Replace,
        )
        .await
        .unwrap();
    store
        .set_connection_metadata(
            dev.id,
            &github,
            &ids,
            &object(json!({"region": {"eu": true}})),
            MetadataWrite::Merge,
        )
        .await
        .unwrap();
    for id in &ids {
        let c = store.existing_connection(dev.id, &github, id).await.unwrap();
        assert_eq!(c.metadata, json!({"plan": "free", "region": {"eu": true}}), "{id}");
    }
    // All or nothing: one unknown id leaves every connection as it was.
    let with_unknown = vec!["acme".to_string(), "ghost".to_string()];
    let err = store
        .set_connection_metadata(
            dev.id,
            &github,
            &with_unknown,
            &object(json!({})),
            MetadataWrite::Replace,
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("ghost"), "{err}");
    let acme = store.existing_connection(dev.id, &github, "acme").await.unwrap();
    assert_eq!(acme.metadata["plan"], "free");
    // Another environment's connection is untouched and unreachable.
    let theirs = store.existing_connection(prod.id, &github, "acme").await.unwrap();
    assert_eq!(theirs.metadata, json!({"plan": "pro", "seats": 3}));

    // Soft delete: gone from reads and lists, the id can be taken again.
    let integration_id = store.existing_integration(dev.id, &github).await.unwrap().id;
    let (before, live) = store.routing_connections(integration_id).await.unwrap();
    assert!(live.iter().any(|c| c.connection_id == "gamma"));
    assert!(store.delete_connection(dev.id, &github, "gamma").await.unwrap());
    let (after, live) = store.routing_connections(integration_id).await.unwrap();
    assert!(after > before, "a delete moves the connections version on");
    assert_eq!(store.connections_version(integration_id).await.unwrap(), after);
    assert!(
        !live.iter().any(|c| c.connection_id == "gamma"),
        "routing never sees a deleted connection"
    );
    assert!(!store.delete_connection(dev.id, &github, "gamma").await.unwrap());
    assert!(store.connection(dev.id, &github, "gamma").await.unwrap().is_none());
    assert!(!list(ConnectionQuery::default()).await.contains(&"gamma".to_string()));
    let again = store.create_connection(dev, &new("gamma")).await.unwrap();
    assert_ne!(
        again.row_id,
        store
            .existing_connection(prod.id, &github, "acme")
            .await
            .unwrap()
            .row_id
    );
    assert_eq!(
        again.metadata,
        json!({"plan": "pro", "seats": 3}),
        "a new connection, not the old one"
    );
    refresh_leases(store, dev, prod, &github).await;
    rate_limits(store, dev, prod, &github).await;
    owed_events(store, dev, &new).await;
}

/// A provider's rate limit on a connection, recorded for the other processes: the later
/// time kept, read with the connection.
async fn rate_limits(store: &Store, dev: &Environment, prod: &Environment, github: &IntegrationKey) {
    let now = chrono::Utc::now();
    let at = |seconds: i64| now + chrono::Duration::seconds(seconds);
    let until = |environment: &Environment| {
        let environment_id = environment.id;
        async move {
            let connection = store.existing_connection(environment_id, github, "acme").await.unwrap();
            connection.rate_limited_until.map(|t| t.timestamp_millis())
        }
    };
    assert_eq!(until(dev).await, None);
    store
        .rate_limit_connection(dev.id, github, "acme", at(60))
        .await
        .unwrap();
    assert_eq!(until(dev).await, Some(at(60).timestamp_millis()));
    store
        .rate_limit_connection(dev.id, github, "acme", at(30))
        .await
        .unwrap();
    assert_eq!(
        until(dev).await,
        Some(at(60).timestamp_millis()),
        "the later time stays"
    );
    store
        .rate_limit_connection(dev.id, github, "acme", at(90))
        .await
        .unwrap();
    assert_eq!(until(dev).await, Some(at(90).timestamp_millis()));
    assert_eq!(until(prod).await, None, "another environment's connection is another");
    let listed = store.connections_named(dev.id, github, &["acme"]).await.unwrap();
    assert_eq!(
        listed[0].rate_limited_until.map(|t| t.timestamp_millis()),
        Some(at(90).timestamp_millis())
    );
    // A connection that is not there: nothing to record, no error.
    store
        .rate_limit_connection(dev.id, github, "ghost", at(90))
        .await
        .unwrap();
}

/// A connection's OAuth2 refresh lease: one holder until it stores credentials, lets go,
/// or its time runs out; and a refresh the provider refused.
async fn refresh_leases(store: &Store, dev: &Environment, prod: &Environment, github: &IntegrationKey) {
    let now = chrono::Utc::now();
    let ttl = std::time::Duration::from_secs(45);
    let at = |seconds: i64| now + chrono::Duration::seconds(seconds);
    let take = |environment: &Environment, id: &'static str, holder: &'static str, when| {
        let environment_id = environment.id;
        async move {
            store
                .take_refresh_lease(environment_id, github, id, holder, when, ttl)
                .await
                .unwrap()
        }
    };
    assert!(take(dev, "acme", "r-a", now).await);
    assert!(!take(dev, "acme", "r-b", now).await, "another run holds it");
    assert!(
        take(dev, "Beta_1", "r-b", now).await,
        "another connection's is another lease"
    );
    assert!(take(prod, "acme", "r-b", now).await, "another environment's too");
    assert!(
        take(dev, "acme", "r-a", at(30)).await,
        "its holder takes it again, for longer"
    );
    assert!(!take(dev, "acme", "r-b", at(74)).await);
    assert!(take(dev, "acme", "r-b", at(75)).await, "its time ran out");
    store
        .release_refresh_lease(dev.id, github, "acme", "r-a")
        .await
        .unwrap();
    assert!(
        !take(dev, "acme", "r-c", at(76)).await,
        "not r-a's to let go of any more"
    );
    let refreshed = Credentials::OAuth2 {
        access_token: "tok_refreshed".into(),
        refresh_token: Some("rt_2".into()),
        expires_at: Some(at(3600)),
        raw: None,
    };
    assert!(store
        .update_credentials(dev.id, github, "acme", &refreshed)
        .await
        .unwrap());
    assert_eq!(
        store
            .existing_connection(dev.id, github, "acme")
            .await
            .unwrap()
            .credentials,
        Some(refreshed.clone())
    );
    assert!(
        take(dev, "acme", "r-c", at(76)).await,
        "storing credentials ended r-b's"
    );
    // A refresh token is refreshed a day after it was stored, to keep it alive.
    let day = |hours: i64, minutes: i64| chrono::Utc::now() + chrono::Duration::minutes(hours * 60 + minutes);
    let due = |when| async move {
        let claimed = store.claim_refresh_checks(when, 10).await.unwrap();
        claimed
            .into_iter()
            .map(|d| (d.environment_id, d.integration, d.connection_id))
            .collect::<Vec<_>>()
    };
    assert!(due(day(23, 0)).await.is_empty(), "not yet");
    let acme = (dev.id, "github".to_string(), "acme".to_string());
    assert_eq!(
        due(day(24, 1)).await,
        std::slice::from_ref(&acme),
        "only tokens with a refresh token"
    );
    assert!(due(day(24, 1)).await.is_empty(), "taken: not handed out twice");
    assert_eq!(due(day(24, 12)).await, [acme], "nothing stored since: looked at again");
    store.clear_refresh_check(dev.id, github, "acme").await.unwrap();
    assert!(due(day(48, 0)).await.is_empty(), "nothing to refresh through: never");
    // An integration changed (a token URL added, say): looked at again.
    store
        .update_integration(
            dev.id,
            github,
            &IntegrationChanges {
                settings: Some(json!({"api": {"token_url": "https://github.example/token"}})),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let again = due(day(0, 1)).await;
    let acme = (dev.id, "github".to_string(), "acme".to_string());
    assert!(again.contains(&acme), "{again:?}");
    store
        .release_refresh_lease(dev.id, github, "acme", "r-c")
        .await
        .unwrap();
    assert!(take(dev, "acme", "r-d", at(76)).await, "released");
    assert!(!take(dev, "acme", "r-a", at(77)).await);
    assert!(!take(dev, "ghost", "r-a", now).await, "no such connection");

    // A refused refresh: on the connection from the first refusal until credentials are
    // stored, its webhook owed once.
    let refuse = |id: &'static str, error: &'static str, when| async move {
        store.refresh_refused(dev.id, github, id, error, when).await.unwrap()
    };
    let failure = |id: &'static str| async move {
        store
            .existing_connection(dev.id, github, id)
            .await
            .unwrap()
            .refresh_failure
    };
    assert_eq!(failure("acme").await, None);
    refuse(
        "acme",
        "the token URL answered 400 Bad Request (invalid_grant)",
        at(100),
    )
    .await;
    refuse("acme", "the token URL answered 401 Unauthorized", at(101)).await;
    let first = failure("acme").await.expect("a failure");
    assert_eq!(first.error, "the token URL answered 401 Unauthorized");
    assert_eq!(
        first.failed_at.timestamp_millis(),
        at(100).timestamp_millis(),
        "since the first"
    );
    refuse("gamma", "refused", at(102)).await;
    assert!(store.delete_connection(dev.id, github, "gamma").await.unwrap());
    refuse("ghost", "refused", at(102)).await;
    let owed = store.owed_refresh_failures(10).await.unwrap();
    let owed_ids: Vec<_> = owed
        .iter()
        .map(|o| (o.environment.as_str(), o.connection_id.as_str()))
        .collect();
    assert_eq!(owed_ids, [("dev", "acme")], "a deleted connection is owed nothing");
    assert_eq!(
        (owed[0].provider.as_str(), owed[0].integration.as_str()),
        ("github", "github")
    );
    store.refresh_failures_notified(&owed, at(103)).await.unwrap();
    assert!(store.owed_refresh_failures(10).await.unwrap().is_empty());
    refuse("acme", "refused again", at(104)).await;
    assert!(
        store.owed_refresh_failures(10).await.unwrap().is_empty(),
        "the same failure"
    );
    assert!(store
        .update_credentials(dev.id, github, "acme", &refreshed)
        .await
        .unwrap());
    assert_eq!(failure("acme").await, None, "new credentials end it");
    store.refresh_failures_notified(&owed, at(105)).await.unwrap();
    refuse("acme", "refused anew", at(106)).await;
    let owed = store.owed_refresh_failures(10).await.unwrap();
    assert_eq!(owed.len(), 1, "a failure of its own, owed again");
    assert_eq!(owed[0].error, "refused anew");

    // An import of a connection that exists changes the fields given; new credentials end
    // its failure, and routing sees a changed connection_config.
    let integration_id = store.existing_integration(dev.id, github).await.unwrap().id;
    let version = store.connections_version(integration_id).await.unwrap();
    let change = |changes: ConnectionChanges| async move {
        store
            .update_connection(dev.id, github, "acme", &changes)
            .await
            .unwrap()
            .expect("acme is there")
    };
    let changed = change(ConnectionChanges {
        credentials: Some(Credentials::ApiKey { api_key: "k2".into() }),
        ..Default::default()
    })
    .await;
    assert_eq!(changed.credentials, Some(Credentials::ApiKey { api_key: "k2".into() }));
    assert_eq!(changed.refresh_failure, None);
    assert!(store.owed_refresh_failures(10).await.unwrap().is_empty());
    assert_eq!(
        changed.metadata,
        json!({"plan": "free", "region": {"eu": true}}),
        "not given: kept"
    );
    assert_eq!(store.connections_version(integration_id).await.unwrap(), version);
    let changed = change(ConnectionChanges {
        connection_config: Some(json!({"installation_id": 43})),
        tags: Some(json!({"team": "b"})),
        ..Default::default()
    })
    .await;
    assert_eq!(
        (changed.connection_config, changed.tags),
        (json!({"installation_id": 43}), json!({"team": "b"}))
    );
    assert_eq!(changed.credentials, Some(Credentials::ApiKey { api_key: "k2".into() }));
    assert!(store.connections_version(integration_id).await.unwrap() > version);
    let (_, live) = store.routing_connections(integration_id).await.unwrap();
    let acme = live.iter().find(|c| c.connection_id == "acme").unwrap();
    assert_eq!(acme.connection_config, json!({"installation_id": 43}));
    for (environment, id) in [(dev.id, "ghost"), (dev.id, "gamma"), (prod.id + 1000, "acme")] {
        let none = store
            .update_connection(environment, github, id, &ConnectionChanges::default())
            .await
            .unwrap();
        assert!(none.is_none(), "{id}: no such live connection");
    }
    assert!(!store
        .update_credentials(dev.id, github, "ghost", &Credentials::ApiKey { api_key: "k".into() })
        .await
        .unwrap());
}

/// Sync states are made once, whatever `started` says the second time; a slot is
/// claimed once, only for a started, unpaused sync, and moves `next_run_at` on; more
/// keys than one statement takes work alike.
async fn schedule_slots(store: &Store, dev: &Environment) {
    let key = |connection: &str| SyncKey {
        environment_id: dev.id,
        integration: "crm".parse().unwrap(),
        sync: "contacts".into(),
        connection_id: connection.into(),
    };
    let (a, b, c) = (key("a"), key("b"), key("c"));
    let made = [(a.clone(), true), (b.clone(), true), (c.clone(), false)];
    store.ensure_sync_states(&made).await.unwrap();
    store.ensure_sync_states(&[(c.clone(), true)]).await.unwrap();
    store.set_syncs_paused(std::slice::from_ref(&b), true).await.unwrap();
    let at = |minutes: i64| {
        chrono::DateTime::parse_from_rfc3339("2026-11-27T12:00:00.123Z")
            .unwrap()
            .to_utc()
            + chrono::Duration::minutes(minutes)
    };
    let claimed = store
        .claim_slots(&[(a.clone(), 1, at(1)), (b.clone(), 1, at(1)), (c.clone(), 1, at(1))])
        .await
        .unwrap();
    assert_eq!(claimed, [true, false, false], "only a started, unpaused sync");
    assert_eq!(
        store.claim_slots(&[(a.clone(), 1, at(1))]).await.unwrap(),
        [false],
        "once"
    );
    assert_eq!(store.claim_slots(&[(a.clone(), 2, at(2))]).await.unwrap(), [true]);
    let state = store.sync_state(&a).await.unwrap().unwrap();
    assert_eq!((state.last_slot, state.next_run_at), (2, Some(at(2))));
    assert!(!store.sync_state(&c).await.unwrap().unwrap().started, "made once");

    let many: Vec<SyncKey> = (0..2500).map(|n| key(&format!("many-{n}"))).collect();
    let made: Vec<(SyncKey, bool)> = many.iter().map(|k| (k.clone(), true)).collect();
    store.ensure_sync_states(&made).await.unwrap();
    let slots: Vec<_> = many.iter().map(|k| (k.clone(), 1, at(1))).collect();
    let claimed = store.claim_slots(&slots).await.unwrap();
    assert!(
        claimed.iter().all(|c| *c),
        "{} of 2500",
        claimed.iter().filter(|c| **c).count()
    );
    assert!(store.claim_slots(&slots).await.unwrap().iter().all(|c| !*c));
}

/// A connection created owing its post-creation run: the run is owed from the same
/// commit, claimed by its creator until it says, then claimable once; settled, it is gone.
/// Attempts come back as written, in order, and a batch larger than one statement
/// takes is written whole.
async fn delivery_attempts(store: &Store) {
    let attempt = |delivery: &str, n: i32, status: Option<i32>, error: Option<&str>| DeliveryAttempt {
        delivery_id: delivery.into(),
        environment: "dev".into(),
        url: "https://app.example/hooks?a=1".into(),
        attempt: n,
        at: "2026-11-27T10:00:00.123456Z".parse().unwrap(),
        status,
        latency_ms: 5000 + n,
        error: error.map(String::from),
    };
    let first = vec![
        attempt("d1", 1, None, Some("timed out after 5s: \"quoted\"")),
        attempt("d1", 2, Some(200), None),
    ];
    let mut all = first.clone();
    all.extend((1..=1500).map(|n| attempt("d2", n, Some(500), Some("server error"))));
    store.record_attempts(&all).await.unwrap();
    assert_eq!(store.delivery_attempts("d1").await.unwrap(), first);
    let bulk = store.delivery_attempts("d2").await.unwrap();
    assert_eq!(bulk.len(), 1500);
    assert_eq!(bulk[1499], all[1501], "in the order written");
}

/// One owner per key and environment until it lets go or its time runs out.
async fn locks(store: &Store, dev: &Environment, prod: &Environment) {
    let now = chrono::Utc::now();
    let minute = std::time::Duration::from_secs(60);
    let take = |environment: &Environment, owner: &'static str, at: chrono::DateTime<chrono::Utc>| {
        let id = environment.id;
        async move { store.try_acquire_lock(id, "ledger", owner, at, minute).await.unwrap() }
    };
    assert!(take(dev, "run-a", now).await);
    assert!(!take(dev, "run-b", now).await, "another run holds it");
    assert!(take(prod, "run-b", now).await, "another environment's is another lock");
    let half = now + chrono::Duration::seconds(30);
    assert!(take(dev, "run-a", half).await, "its owner takes it again, for longer");
    let later = now + chrono::Duration::seconds(90);
    assert!(!take(dev, "run-b", later - chrono::Duration::seconds(1)).await);
    assert!(
        take(dev, "run-b", later).await,
        "its time ran out: the next run takes it"
    );
    assert!(
        !store.release_lock(dev.id, "ledger", "run-a").await.unwrap(),
        "no longer run-a's"
    );
    assert!(store.release_lock(dev.id, "ledger", "run-b").await.unwrap());
    assert!(take(dev, "run-c", later).await, "released");
    store
        .try_acquire_lock(dev.id, "other", "run-c", later, minute)
        .await
        .unwrap();
    store
        .try_acquire_lock(dev.id, "stale", "run-d", now, minute)
        .await
        .unwrap();
    let released = store.release_all_locks(dev.id, "run-c", later).await.unwrap();
    assert_eq!(released, 2, "the run's two locks");
    assert!(take(dev, "run-e", later).await);
    assert!(
        !store.release_lock(dev.id, "stale", "run-d").await.unwrap(),
        "locks whose time ran out are cleared with them"
    );
    assert!(!take(prod, "run-e", now).await, "prod's holder kept its own");
}

async fn action_runs(store: &Store, dev: &Environment) {
    use chrono::SubsecRound as _;
    use hookyard_core::store::action_runs::{ActionFailure, ActionOutcome, ActionRunStatus, NewActionRun};
    // Both back ends keep milliseconds.
    let now = chrono::Utc::now().trunc_subsecs(3);
    let at = |seconds| now + chrono::Duration::seconds(seconds);
    let lease = std::time::Duration::from_secs(60);
    let new = |name: &str, max_retries| NewActionRun {
        environment_id: dev.id,
        environment: dev.name.clone(),
        integration: "crm".parse().unwrap(),
        connection_id: "c-1".into(),
        action_name: name.into(),
        input: json!({"email": "ada@example.com"}),
        max_retries,
    };
    assert_eq!(store.action_runs_in_flight(now).await.unwrap(), (0, 0));
    let first = store.queue_action_run(&new("first", 1), now).await.unwrap();
    let second = store.queue_action_run(&new("second", 0), at(1000)).await.unwrap();
    assert_eq!(store.action_runs_in_flight(now).await.unwrap(), (1, 0), "one is due");
    assert_eq!(store.action_runs_in_flight(at(1000)).await.unwrap(), (2, 0));
    assert_ne!(first.id, second.id);
    assert_eq!(first.request, new("first", 1), "as asked");
    assert_eq!(
        (first.status, first.attempts, first.request.max_retries),
        (ActionRunStatus::Waiting, 0, 1)
    );
    assert_eq!(store.action_run(dev.id, &first.id).await.unwrap(), first);
    assert!(
        matches!(
            store.action_run(dev.id + 1000, &first.id).await,
            Err(StoreError::NotFound(_))
        ),
        "another environment's run is not found"
    );

    assert!(
        store.claim_action_runs(at(-1), lease, 10).await.unwrap().is_empty(),
        "not due yet"
    );
    let claimed = store.claim_action_runs(now, lease, 10).await.unwrap();
    assert_eq!(claimed.len(), 1, "only the first is due");
    assert_eq!((claimed[0].status, claimed[0].attempts), (ActionRunStatus::Running, 1));
    assert_eq!(claimed[0].run_after, at(60), "its lease");
    assert_eq!(store.action_runs_in_flight(now).await.unwrap(), (0, 1));
    assert!(
        store.claim_action_runs(at(2), lease, 10).await.unwrap().is_empty(),
        "a leased run is not claimed twice"
    );

    // The first fails and waits for its retry; an attempt's writes are fenced.
    let failure = ActionFailure {
        code: "action_script_runtime_error".into(),
        message: "no".into(),
        payload: Some(json!({"why": 1})),
    };
    assert!(store
        .defer_action_run(&first.id, 1, Some(&failure), at(5))
        .await
        .unwrap());
    assert!(
        !store
            .defer_action_run(&first.id, 1, Some(&failure), at(5))
            .await
            .unwrap(),
        "no longer running"
    );
    let waiting = store.action_run(dev.id, &first.id).await.unwrap();
    assert_eq!(
        (waiting.status, waiting.attempts, waiting.error.as_ref()),
        (ActionRunStatus::Waiting, 1, Some(&failure))
    );
    let retried = store.claim_action_runs(at(5), lease, 10).await.unwrap();
    assert_eq!(retried.iter().map(|r| r.attempts).collect::<Vec<_>>(), [2]);
    // Its worker dies: once the lease lapses another claims it (a third attempt), and
    // the first worker's late outcome is refused.
    let again = store.claim_action_runs(at(65), lease, 10).await.unwrap();
    assert_eq!(
        again.iter().map(|r| (r.id.as_str(), r.attempts)).collect::<Vec<_>>(),
        [(first.id.as_str(), 3)]
    );
    let done = ActionOutcome::Succeeded(Some(json!({"id": "c_1"})));
    assert!(
        !store.finish_action_run(&first.id, 2, &done, at(65)).await.unwrap(),
        "fenced"
    );
    assert!(store.finish_action_run(&first.id, 3, &done, at(65)).await.unwrap());
    let finished = store.action_run(dev.id, &first.id).await.unwrap();
    assert_eq!(
        (finished.status, finished.output, finished.finished_at),
        (ActionRunStatus::Succeeded, Some(json!({"id": "c_1"})), Some(at(65)))
    );
    assert!(
        store.claim_action_runs(at(900), lease, 10).await.unwrap().is_empty(),
        "a finished run is never claimed"
    );

    // An attempt that did not run is not counted.
    let taken = store.claim_action_runs(at(1000), lease, 10).await.unwrap();
    assert_eq!(
        taken.iter().map(|r| (r.id.as_str(), r.attempts)).collect::<Vec<_>>(),
        [(second.id.as_str(), 1)]
    );
    assert!(store.defer_action_run(&second.id, 1, None, at(1000)).await.unwrap());
    assert_eq!(store.action_run(dev.id, &second.id).await.unwrap().attempts, 0);
    let taken = store.claim_action_runs(at(1000), lease, 10).await.unwrap();
    let failed = ActionOutcome::Failed(failure.clone());
    assert!(store
        .finish_action_run(&second.id, taken[0].attempts, &failed, at(1001))
        .await
        .unwrap());
    let second = store.action_run(dev.id, &second.id).await.unwrap();
    assert_eq!((second.status, second.error), (ActionRunStatus::Failed, Some(failure)));

    // Completion webhooks not queued yet, then pruning.
    let ids =
        |runs: Vec<hookyard_core::store::action_runs::ActionRun>| runs.into_iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(
        ids(store.unnotified_action_runs(at(1002), 10).await.unwrap()),
        [first.id.clone(), second.id.clone()]
    );
    assert!(
        store.unnotified_action_runs(at(65), 10).await.unwrap().is_empty(),
        "finished before"
    );
    store
        .action_runs_notified(std::slice::from_ref(&first.id))
        .await
        .unwrap();
    let owed = store.unnotified_action_runs(at(1002), 10).await.unwrap();
    assert_eq!(ids(owed), [second.id.as_str()]);
    let queued = store.queue_action_run(&new("third", 0), now).await.unwrap();

    // Listed newest first (queued at the same time: by id), filtered, paged.
    use hookyard_core::store::action_runs::ActionRunFilter;
    let listed = |filter: ActionRunFilter, limit| async move {
        let runs = store.action_runs(dev.id, &filter, limit).await.unwrap();
        runs.into_iter().map(|r| r.id).collect::<Vec<_>>()
    };
    let mut at_now = [first.id.clone(), queued.id.clone()];
    at_now.sort_by(|a, b| b.cmp(a));
    let everything = [second.id.clone(), at_now[0].clone(), at_now[1].clone()];
    assert_eq!(listed(ActionRunFilter::default(), 10).await, everything);
    let page = listed(ActionRunFilter::default(), 2).await;
    assert_eq!(page, everything[..2]);
    let rest = ActionRunFilter {
        before_id: page.last().cloned(),
        ..Default::default()
    };
    assert_eq!(listed(rest, 2).await, everything[2..]);
    let by = |status, action_name: Option<&str>| ActionRunFilter {
        status,
        action_name: action_name.map(String::from),
        ..Default::default()
    };
    assert_eq!(
        listed(by(Some(ActionRunStatus::Waiting), None), 10).await,
        [queued.id.as_str()]
    );
    assert_eq!(
        listed(by(Some(ActionRunStatus::Failed), None), 10).await,
        [second.id.as_str()]
    );
    assert_eq!(listed(by(None, Some("first")), 10).await, [first.id.as_str()]);
    let elsewhere = ActionRunFilter {
        connection_id: Some("c-2".into()),
        ..Default::default()
    };
    assert!(listed(elsewhere, 10).await.is_empty());
    assert!(store
        .action_runs(dev.id + 1000, &ActionRunFilter::default(), 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(store.prune_action_runs(at(66)).await.unwrap(), 1, "finished before");
    assert!(matches!(
        store.action_run(dev.id, &first.id).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(
        store.prune_action_runs(at(2000)).await.unwrap(),
        1,
        "unfinished runs stay"
    );
    assert_eq!(
        store.action_run(dev.id, &queued.id).await.unwrap().status,
        ActionRunStatus::Waiting
    );
}

async fn owed_events(store: &Store, dev: &Environment, new: &dyn Fn(&str) -> NewConnection) {
    let now = chrono::Utc::now();
    let owing = |id: &'static str, claimed_until| async move {
        store
            .create_connection_owing(dev, &new(id), POST_CREATION, claimed_until)
            .await
            .unwrap()
    };
    let (connection, held) = owing("owes-1", now + chrono::Duration::minutes(2)).await;
    assert_eq!(connection.connection_id, "owes-1");
    assert_eq!(
        (
            held.environment.as_str(),
            held.integration.as_str(),
            held.connection_id.as_str(),
            held.event.as_str()
        ),
        ("dev", "github", "owes-1", POST_CREATION)
    );
    let (_, lapsed) = owing("owes-2", now - chrono::Duration::seconds(1)).await;
    // A connection that already exists is refused, and owes nothing more.
    let conflict = store
        .create_connection_owing(dev, &new("owes-2"), POST_CREATION, now)
        .await
        .unwrap_err();
    assert!(matches!(conflict, StoreError::Conflict(_)), "{conflict}");

    assert_eq!(
        store.unclaimed_events(now, 10).await.unwrap(),
        std::slice::from_ref(&lapsed)
    );
    assert!(
        !store
            .claim_event(&held, now + chrono::Duration::minutes(5))
            .await
            .unwrap(),
        "its creator holds it"
    );
    assert!(store
        .claim_event(&lapsed, now + chrono::Duration::minutes(1))
        .await
        .unwrap());
    assert!(
        !store
            .claim_event(&lapsed, now + chrono::Duration::minutes(1))
            .await
            .unwrap(),
        "claimed once"
    );
    assert!(store.unclaimed_events(now, 10).await.unwrap().is_empty());
    let later = now + chrono::Duration::minutes(3);
    assert_eq!(
        store.unclaimed_events(later, 10).await.unwrap(),
        [lapsed.clone(), held.clone()]
    );

    store.settle_event(&held).await.unwrap();
    store.settle_event(&lapsed).await.unwrap();
    assert!(store.unclaimed_events(later, 10).await.unwrap().is_empty());
    assert!(
        !store.claim_event(&lapsed, later).await.unwrap(),
        "a settled event is gone"
    );
}

#[tokio::test]
async fn postgres() {
    let db = PgDatabase::create().await;
    let store = Store::connect(&db.url, test_cipher()).await.unwrap();
    assert_eq!(store.backend(), Backend::Postgres);
    conformance(store.clone(), Some(&db.url)).await;
    // Migrations are idempotent: a second start against the same database is fine.
    Store::connect(&db.url, test_cipher()).await.unwrap();
}

#[tokio::test]
async fn sqlite() {
    let file = SqliteFile::create();
    let store = Store::connect(&file.url, test_cipher()).await.unwrap();
    assert_eq!(store.backend(), Backend::Sqlite);
    conformance(store, Some(&file.url)).await;
    Store::connect(&file.url, test_cipher()).await.unwrap();
}

#[tokio::test]
async fn sqlite_in_memory() {
    let store = Store::connect("sqlite::memory:", test_cipher()).await.unwrap();
    conformance(store.clone(), None).await;
    // Concurrent readers make the pool open more connections; sqlx names in-memory
    // databases with a shared cache, so each sees the same data.
    let readers: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.environments().await.map(|e| e.len()) })
        })
        .collect();
    for reader in readers {
        // dev, prod and staging.
        assert_eq!(reader.await.unwrap().unwrap(), 3);
    }
}

#[tokio::test]
async fn sqlite_creates_missing_folders() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/a/b/hookyard.db", dir.path().display());
    Store::connect(&url, test_cipher()).await.unwrap();
    assert!(dir.path().join("a/b/hookyard.db").exists());
}

#[tokio::test]
async fn unreachable_postgres_is_a_clear_error() {
    // Port 1 on loopback: nothing listens there.
    let err = Store::connect("postgres://u:pw@127.0.0.1:1/db", test_cipher())
        .await
        .err()
        .expect("must fail");
    let message = err.to_string();
    assert!(
        message.contains("cannot open the database postgres://u:(hidden)@127.0.0.1:1/db"),
        "{message}"
    );
    assert!(!message.contains("pw"), "password leaked: {message}");
}

/// A database from before secrets were sealed: its plaintext keys are sealed at start,
/// and the environment is found by its old secret key.
async fn seals_legacy_plaintext(url: &str) {
    // Apply the migrations, then put a row back into the old, plaintext shape.
    Store::connect(url, test_cipher()).await.unwrap();
    raw_execute(
        url,
        "INSERT INTO environments (name, webhook_id, secret_key, webhook_signing_key, created_at)
         VALUES ('old', '6f1c2a52-0c4e-4c39-9d1b-1a2b3c4d5e6f', 'sk_plain', 'whsk_plain', '2026-01-01T00:00:00Z')",
    )
    .await;
    raw_execute(
        url,
        "INSERT INTO integrations (environment_id, unique_key, provider, webhook_secret, settings, created_at, updated_at)
         SELECT id, 'gh', 'github', 'plain-secret', '{}', created_at, created_at FROM environments WHERE name = 'old'",
    )
    .await;
    let store = Store::connect(url, test_cipher()).await.unwrap();
    let old = store
        .environment_by_secret_key("sk_plain")
        .await
        .unwrap()
        .expect("found by its key");
    assert_eq!(old.webhook_signing_key, "whsk_plain");
    let gh = store
        .existing_integration(old.id, &"gh".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(gh.webhook_secret.as_deref(), Some("plain-secret"));
    for text in raw_texts(url, "SELECT secret_key FROM environments").await {
        assert!(text.starts_with("v1:"), "{text}");
    }
    // Under another key the sealed secrets do not open: an error, not garbage.
    let other = Store::connect(url, hookyard_core::secrets::Cipher::from_bytes([9; 32]))
        .await
        .unwrap();
    let err = other.environments().await.unwrap_err();
    assert!(err.to_string().contains("another encryption key"), "{err}");
}

#[tokio::test]
async fn seals_legacy_plaintext_postgres() {
    let db = PgDatabase::create().await;
    seals_legacy_plaintext(&db.url).await;
}

#[tokio::test]
async fn seals_legacy_plaintext_sqlite() {
    let file = SqliteFile::create();
    seals_legacy_plaintext(&file.url).await;
}

/// Changing the encryption key: a store that also opens with the old key reads
/// everything the old one sealed; `reseal` moves each secret to the new key, after
/// which the new key alone opens everything and the old one nothing.
async fn reseals_under_a_new_key(url: &str) {
    use hookyard_core::secrets::Cipher;
    use hookyard_core::store::forwarding::{ForwardingScope, ForwardingSettings};

    let (old, new) = (Cipher::from_bytes([1; 32]), Cipher::from_bytes([2; 32]));
    let store = Store::connect(url, old.clone()).await.unwrap();
    let dev = store.ensure_environment(&"dev".parse().unwrap()).await.unwrap();
    let crm: IntegrationKey = "crm".parse().unwrap();
    let integration = NewIntegration {
        webhook_secret: Some("whsec_crm".into()),
        oauth_client_secret: Some("client-secret".into()),
        ..NewIntegration::new(crm.clone(), "hubspot")
    };
    store.create_integration(&dev, &integration).await.unwrap();
    let connection = |id: &str| NewConnection {
        integration: crm.clone(),
        connection_id: id.into(),
        connection_config: json!({}),
        metadata: json!({}),
        tags: json!({}),
        credentials: Some(Credentials::ApiKey {
            api_key: format!("key-{id}"),
        }),
    };
    // More connections than one page of the reseal.
    for n in 0..1_200 {
        store
            .create_connection(&dev, &connection(&format!("c{n}")))
            .await
            .unwrap();
    }
    let forwarding = ForwardingSettings {
        urls: vec!["https://app.example.com/hooks".into()],
        signing_key: Some("fwd-key".into()),
        always_notify: false,
        async_action_webhooks: false,
        auth_webhooks: false,
    };
    store
        .set_forwarding(dev.id, ForwardingScope::Environment, &forwarding)
        .await
        .unwrap();
    assert_eq!(
        store.forwarding(dev.id, ForwardingScope::Environment).await.unwrap(),
        Some(forwarding.clone()),
        "as set"
    );
    let variable = EnvironmentVariable {
        name: "TEAM_ID".into(),
        value: "team-1".into(),
    };
    store.set_environment_variables(dev.id, &[variable]).await.unwrap();
    let everything = |store: Store| async move {
        let env = store.environments().await?.remove(0);
        let integration = store.existing_integration(env.id, &"crm".parse().unwrap()).await?;
        let connection = store
            .connection(env.id, &"crm".parse().unwrap(), "c1199")
            .await?
            .expect("the connection");
        let forwarding = store.forwarding(env.id, ForwardingScope::Environment).await?;
        let variables = store.environment_variables(env.id).await?;
        Ok::<_, StoreError>((env, integration, connection.credentials, forwarding, variables))
    };
    let before = everything(store.clone()).await.unwrap();
    let sealed = || raw_texts(url, "SELECT credentials FROM connections ORDER BY id");

    let changing = Store::connect(url, new.clone().also_opening([old.clone()]))
        .await
        .unwrap();
    assert_eq!(
        everything(changing.clone()).await.unwrap(),
        before,
        "opens what the old key sealed"
    );
    let old_texts = sealed().await;
    let mut heard = 0;
    let planned = changing.reseal(true, |_| heard += 1).await.unwrap();
    assert!(heard >= 7, "progress for each column");
    assert_eq!(sealed().await, old_texts, "a dry run writes nothing");
    let counts = |report: &[hookyard_core::store::reseal::Resealed]| {
        report
            .iter()
            .map(|r| (r.column.clone(), r.total, r.resealed, r.current, r.unreadable))
            .collect::<Vec<_>>()
    };
    // (column, total, re-sealed, current, unreadable) when `connections` are all under
    // the old key (`stale`) or all under the new one.
    let expected = |connections: u64, stale: bool| {
        [
            ("environments.secret_key", 1),
            ("environments.webhook_signing_key", 1),
            ("integrations.webhook_secret", 1),
            ("integrations.oauth_client_secret", 1),
            ("connections.credentials", connections),
            ("forwarding.signing_key", 1),
            ("environment_variables.value", 1),
        ]
        .map(|(column, total)| {
            let (resealed, current) = if stale { (total, 0) } else { (0, total) };
            (column.to_string(), total, resealed, current, 0)
        })
        .to_vec()
    };
    assert_eq!(counts(&planned), expected(1_200, true));

    // A secret sealed under a key given to neither store is named, not skipped quietly.
    raw_execute(
        url,
        &format!(
            "UPDATE connections SET credentials = '{}' WHERE connection_id = 'c7'",
            Cipher::from_bytes([3; 32]).seal(hookyard_core::secrets::Purpose::Credentials, "{}")
        ),
    )
    .await;
    raw_execute(
        url,
        &format!(
            "UPDATE forwarding SET signing_key = '{}'",
            Cipher::from_bytes([3; 32]).seal(hookyard_core::secrets::Purpose::ForwardSigningKey, "x")
        ),
    )
    .await;
    let done = changing.reseal(false, |_| {}).await.unwrap();
    assert_eq!(
        (done[5].unreadable, done[5].unreadable_ids.len()),
        (1, 0),
        "counted, though it has no id"
    );
    changing
        .set_forwarding(dev.id, ForwardingScope::Environment, &forwarding)
        .await
        .unwrap();
    let credentials = &done[4];
    assert_eq!(credentials.column, "connections.credentials");
    assert_eq!((credentials.resealed, credentials.unreadable), (1_199, 1));
    let c7_id = raw_texts(
        url,
        "SELECT CAST(id AS TEXT) FROM connections WHERE connection_id = 'c7'",
    )
    .await;
    assert_eq!(credentials.unreadable_ids, vec![c7_id[0].parse::<i64>().unwrap()]);
    let c7 = changing.connection(dev.id, &crm, "c7").await.unwrap_err();
    assert!(c7.to_string().contains("another encryption key"), "{c7}");
    raw_execute(url, "DELETE FROM connections WHERE connection_id = 'c7'").await;

    let after = Store::connect(url, new.clone()).await.unwrap();
    assert_eq!(
        everything(after.clone()).await.unwrap(),
        before,
        "the new key alone opens everything"
    );
    let stale = Store::connect(url, old.clone()).await.unwrap();
    assert!(everything(stale).await.is_err(), "the old key alone opens nothing");
    let again = after.reseal(false, |_| {}).await.unwrap();
    assert_eq!(counts(&again), expected(1_199, false), "all under the new key");
}

#[tokio::test]
async fn reseals_under_a_new_key_postgres() {
    let db = PgDatabase::create().await;
    reseals_under_a_new_key(&db.url).await;
}

#[tokio::test]
async fn reseals_under_a_new_key_sqlite() {
    let file = SqliteFile::create();
    reseals_under_a_new_key(&file.url).await;
}

/// Nango's `lastSyncDate`: the start of the last run that succeeded, kept through a
/// failed run and one still going, forgotten by a reset with the checkpoint.
async fn last_sync_date_is_the_start_of_the_last_successful_run(url: &str) {
    use hookyard_core::store::syncs::RunOutcome;
    let store = Store::connect(url, test_cipher()).await.unwrap();
    let dev = store.ensure_environment(&"dev".parse().unwrap()).await.unwrap();
    assert_eq!(store.environment_by_id(dev.id).await.unwrap(), Some(dev.clone()));
    assert_eq!(store.environment_by_id(dev.id + 1000).await.unwrap(), None);
    let key = SyncKey {
        environment_id: dev.id,
        integration: "crm".parse().unwrap(),
        sync: "contacts".into(),
        connection_id: "c1".into(),
    };
    store.ensure_sync_states(&[(key.clone(), true)]).await.unwrap();
    let last = || store.last_sync_date(&key);
    assert_eq!(last().await.unwrap(), None, "before the first run");
    let start = |run_id: &'static str| {
        let (store, key) = (&store, &key);
        async move {
            assert!(store
                .claim_run(key, run_id, std::time::Duration::from_secs(60))
                .await
                .unwrap());
            store.sync_state(key).await.unwrap().unwrap().last_started_at.unwrap()
        }
    };
    let success = RunOutcome::Success(json!({}));

    let first = start("r1").await;
    store.finish_run(&key, "r1", &success).await.unwrap();
    assert_eq!(last().await.unwrap(), Some(first));
    start("r2").await;
    store
        .finish_run(&key, "r2", &RunOutcome::Error("boom".into()))
        .await
        .unwrap();
    assert_eq!(last().await.unwrap(), Some(first), "a failed run does not move it");
    let third = start("r3").await;
    assert!(third > first);
    assert_eq!(last().await.unwrap(), Some(first), "nor does one still going");
    store.finish_run(&key, "r3", &success).await.unwrap();
    assert_eq!(last().await.unwrap(), Some(third));

    store.set_checkpoint(&key, Some(&json!({"page": 3}))).await.unwrap();
    store.reset_sync_progress(&key).await.unwrap();
    assert_eq!(last().await.unwrap(), None);
    assert_eq!(store.checkpoint(&key).await.unwrap(), None);
}

#[tokio::test]
async fn last_sync_date_is_the_start_of_the_last_successful_run_postgres() {
    let db = PgDatabase::create().await;
    last_sync_date_is_the_start_of_the_last_successful_run(&db.url).await;
}

#[tokio::test]
async fn last_sync_date_is_the_start_of_the_last_successful_run_sqlite() {
    let file = SqliteFile::create();
    last_sync_date_is_the_start_of_the_last_successful_run(&file.url).await;
}

/// An environment's variables: replaced as a whole, sealed at rest, kept apart from
/// other environments', gone with their environment.
async fn environment_variables_are_replaced_whole_and_sealed(url: &str) {
    let store = Store::connect(url, test_cipher()).await.unwrap();
    let dev = store.ensure_environment(&"dev".parse().unwrap()).await.unwrap();
    let prod = store.ensure_environment(&"prod".parse().unwrap()).await.unwrap();
    let variable = |name: &str, value: &str| EnvironmentVariable {
        name: name.into(),
        value: value.into(),
    };
    assert_eq!(store.environment_variables(dev.id).await.unwrap(), []);
    let first = [variable("TEAM_ID", "team-1"), variable("API_TOKEN", "s3cret-token")];
    store.set_environment_variables(dev.id, &first).await.unwrap();
    store
        .set_environment_variables(prod.id, &[variable("TEAM_ID", "team-prod")])
        .await
        .unwrap();
    assert_eq!(
        store.environment_variables(dev.id).await.unwrap(),
        [variable("API_TOKEN", "s3cret-token"), variable("TEAM_ID", "team-1")],
        "by name"
    );
    let stored = raw_texts(url, "SELECT value FROM environment_variables").await;
    assert!(
        stored.iter().all(|v| !v.contains("s3cret") && !v.contains("team")),
        "sealed at rest: {stored:?}"
    );
    store
        .set_environment_variables(dev.id, &[variable("TEAM_ID", "team-2")])
        .await
        .unwrap();
    assert_eq!(
        store.environment_variables(dev.id).await.unwrap(),
        [variable("TEAM_ID", "team-2")]
    );
    assert_eq!(
        store.environment_variables(prod.id).await.unwrap(),
        [variable("TEAM_ID", "team-prod")],
        "another environment's are its own"
    );
    store.set_environment_variables(dev.id, &[]).await.unwrap();
    assert_eq!(store.environment_variables(dev.id).await.unwrap(), []);
    let twice = [variable("A", "1"), variable("A", "2")];
    assert!(store.set_environment_variables(prod.id, &twice).await.is_err());
    assert_eq!(
        store.environment_variables(prod.id).await.unwrap(),
        [variable("TEAM_ID", "team-prod")],
        "a failed replacement changes nothing"
    );
}

#[tokio::test]
async fn environment_variables_are_replaced_whole_and_sealed_postgres() {
    let db = PgDatabase::create().await;
    environment_variables_are_replaced_whole_and_sealed(&db.url).await;
}

#[tokio::test]
async fn environment_variables_are_replaced_whole_and_sealed_sqlite() {
    let file = SqliteFile::create();
    environment_variables_are_replaced_whole_and_sealed(&file.url).await;
}
