//! The worker's side of the store, against Postgres and SQLite: one commit for many
//! messages (markers, record writes over many scopes in version order, metadata, dead
//! letters), and function deploys.

use std::collections::BTreeMap;
use std::time::Duration;

use hookyard_core::store::commit::{DeadLetter, Marker, MetadataCall, RecordCall, Unit, UnitOutcome};
use hookyard_core::store::functions::{FunctionBundle, NewSync, SyncChange};
use hookyard_core::store::notices::{HeldNotice, SyncNotice, UNFINISHED};
use hookyard_core::store::records::{LastAction, RecordQuery, RecordScope, WriteKind};
use hookyard_core::store::{MetadataWrite, NewConnection, NewIntegration, Store};
use hookyard_testkit::{eventually, raw_execute, raw_texts, test_cipher, PgDatabase, SqliteFile};
use serde_json::{json, Value};

fn scope(env: i64, connection: &str) -> RecordScope {
    RecordScope {
        environment_id: env,
        integration: "crm".parse().unwrap(),
        connection_id: connection.into(),
        model: "Contact".into(),
    }
}

fn save(env: i64, connection: &str, id: &str, payload: Value, version: i64) -> RecordCall {
    RecordCall {
        scope: scope(env, connection),
        kind: WriteKind::Save,
        records: vec![(id.into(), payload)],
        version,
    }
}

fn unit(message: &str, records: Vec<RecordCall>) -> Unit {
    Unit {
        records,
        ..Unit::new(Marker {
            consumer: "onWebhook:contacts".into(),
            message_id: message.into(),
        })
    }
}

async fn records(store: &Store, connection: &str, env: i64) -> BTreeMap<String, (Value, LastAction)> {
    let page = store
        .list_records(
            &scope(env, connection),
            &RecordQuery {
                limit: 1000,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    page.records
        .into_iter()
        .map(|r| (r.id, (r.payload, r.last_action)))
        .collect()
}

async fn commits_apply_once_in_version_order(store: &Store) {
    let env = store.ensure_environment(&"dev".parse().unwrap()).await.unwrap();
    let integration = store
        .create_integration(&env, &NewIntegration::new("crm".parse().unwrap(), "generic"))
        .await
        .unwrap();
    store
        .create_connection(
            &env,
            &NewConnection {
                integration: integration.unique_key.clone(),
                connection_id: "a".into(),
                connection_config: json!({}),
                metadata: json!({"keep": 1}),
                tags: json!({}),
                credentials: None,
            },
        )
        .await
        .unwrap();
    // Three messages over two connections; two of them write record 1 of `a`, the newer
    // one listed first; one sets metadata.
    let mut with_metadata = unit(
        "3:0:a",
        vec![save(env.id, "a", "1", json!({"id": "1", "v": "new"}), 3 << 16)],
    );
    with_metadata.metadata.push(MetadataCall {
        environment_id: env.id,
        integration: integration.unique_key.clone(),
        connection_id: "a".into(),
        metadata: json!({"cursor": "x"}).as_object().unwrap().clone(),
        how: MetadataWrite::Merge,
    });
    let outcomes = store
        .commit(vec![
            with_metadata,
            unit(
                "2:0:a",
                vec![save(env.id, "a", "1", json!({"id": "1", "v": "old"}), 2 << 16)],
            ),
            unit("2:0:b", vec![save(env.id, "b", "9", json!({"id": "9"}), 2 << 16)]),
        ])
        .await
        .unwrap();
    assert!(
        outcomes.iter().all(|o| matches!(o, UnitOutcome::Applied { .. })),
        "{outcomes:?}"
    );
    let UnitOutcome::Applied { total: older, .. } = &outcomes[1] else {
        unreachable!()
    };
    assert_eq!(older.added, 1, "the older write came first, and added the record");
    let UnitOutcome::Applied {
        total: newer, per_call, ..
    } = &outcomes[0]
    else {
        unreachable!()
    };
    assert_eq!(newer.updated, 1, "the newer one then updated it");
    assert_eq!(per_call.len(), 1);
    let a = records(store, "a", env.id).await;
    assert_eq!(
        a["1"],
        (json!({"id": "1", "v": "new"}), LastAction::Added),
        "added then updated reads as added"
    );
    assert_eq!(records(store, "b", env.id).await.len(), 1);
    let connection = store
        .existing_connection(env.id, &integration.unique_key, "a")
        .await
        .unwrap();
    assert_eq!(connection.metadata, json!({"keep": 1, "cursor": "x"}));

    // Redelivered (same markers): nothing applied, even with other content.
    let again = store
        .commit(vec![
            unit(
                "2:0:a",
                vec![save(env.id, "a", "1", json!({"id": "1", "v": "replayed"}), 9 << 16)],
            ),
            unit("4:0:a", vec![save(env.id, "a", "2", json!({"id": "2"}), 4 << 16)]),
        ])
        .await
        .unwrap();
    assert_eq!(again[0], UnitOutcome::AlreadyDone);
    assert!(matches!(again[1], UnitOutcome::Applied { .. }));
    let a = records(store, "a", env.id).await;
    assert_eq!(a["1"].0["v"], "new");
    assert!(a.contains_key("2"));
    let markers = [
        Marker {
            consumer: "onWebhook:contacts".into(),
            message_id: "2:0:a".into(),
        },
        Marker {
            consumer: "onWebhook:contacts".into(),
            message_id: "7:0:a".into(),
        },
    ];
    let done = store.processed(&markers).await.unwrap();
    assert!(done.contains(&markers[0]) && !done.contains(&markers[1]));

    // An older write after a newer one is stale; metadata of a deleted connection is skipped.
    store
        .delete_connection(env.id, &integration.unique_key, "a")
        .await
        .unwrap();
    let mut late = unit(
        "1:0:a",
        vec![save(env.id, "a", "1", json!({"id": "1", "v": "oldest"}), 1 << 16)],
    );
    late.metadata.push(MetadataCall {
        environment_id: env.id,
        integration: integration.unique_key.clone(),
        connection_id: "a".into(),
        metadata: Default::default(),
        how: MetadataWrite::Replace,
    });
    let outcome = store.commit(vec![late]).await.unwrap();
    assert!(
        matches!(&outcome[0], UnitOutcome::Applied { total, .. } if total.skipped_stale == 1),
        "{outcome:?}"
    );
    assert_eq!(records(store, "a", env.id).await["1"].0["v"], "new");

    // A dead letter is committed with its marker.
    let letter = DeadLetter {
        consumer: "onWebhook:contacts".into(),
        environment: "dev".into(),
        integration: "crm".into(),
        connection_id: Some("b".into()),
        subject: "hooks.conn.dev.crm.b".into(),
        message_id: "5:0:b".into(),
        stream_seq: 12,
        payload: "{}".into(),
        function_name: Some("contacts".into()),
        function_version: Some(2),
        error_kind: "thrown".into(),
        error: "Error: no".into(),
        attempts: 4,
        headers: None,
    };
    let dead = Unit {
        dead_letter: Some(letter.clone()),
        ..unit("5:0:b", vec![])
    };
    store.commit(vec![dead.clone()]).await.unwrap();
    assert_eq!(store.commit(vec![dead]).await.unwrap()[0], UnitOutcome::AlreadyDone);
    let letters = store.dead_letters("dev", &Default::default(), 10).await.unwrap();
    assert_eq!(letters.len(), 1, "a redelivered dead letter is not stored twice");
    assert_eq!(letters[0].letter, letter);

    assert_eq!(
        store
            .prune_processed(chrono::Utc::now() + chrono::Duration::seconds(1))
            .await
            .unwrap(),
        6
    );
    assert!(store.processed(&markers).await.unwrap().is_empty());
}

async fn deploys_version_changed_syncs(store: &Store) {
    let env = store.ensure_environment(&"deploys".parse().unwrap()).await.unwrap();
    let bundle = |tag: &str| FunctionBundle {
        hash: format!("bundle-{tag}"),
        engine: "test".into(),
        sources: [("crm/syncs/a.js".to_string(), tag.to_string())].into(),
        modules: [("crm/syncs/a.js".to_string(), vec![1, 2, 3])].into(),
    };
    let sync = |name: &str, code: &str| NewSync {
        integration: "crm".parse().unwrap(),
        name: name.into(),
        entry: format!("crm/syncs/{name}.js"),
        code_hash: code.into(),
        config: json!({"webhookSubscriptions": ["*"]}),
    };
    let revision = store.functions_revision().await.unwrap();
    let changes = store
        .deploy_functions(&env, &bundle("1"), &[sync("a", "h1"), sync("b", "h1")])
        .await
        .unwrap();
    assert!(changes.iter().all(|c| c.change == SyncChange::Added && c.version == 1));
    assert!(store.functions_revision().await.unwrap() > revision);
    let changes = store
        .deploy_functions(&env, &bundle("2"), &[sync("a", "h2"), sync("c", "h1")])
        .await
        .unwrap();
    let summary: Vec<(&str, i32, SyncChange)> =
        changes.iter().map(|c| (c.name.as_str(), c.version, c.change)).collect();
    assert_eq!(
        summary,
        vec![
            ("a", 2, SyncChange::Updated),
            ("c", 1, SyncChange::Added),
            ("b", 1, SyncChange::Removed)
        ]
    );
    let changes = store
        .deploy_functions(&env, &bundle("2"), &[sync("a", "h2"), sync("c", "h1")])
        .await
        .unwrap();
    assert!(changes.iter().all(|c| c.change == SyncChange::Unchanged), "{changes:?}");
    let live = store.functions(env.id).await.unwrap();
    assert_eq!(
        live.iter().map(|f| (f.name.as_str(), f.version)).collect::<Vec<_>>(),
        vec![("a", 2), ("c", 1)]
    );
    let stored = store.function_bundle("bundle-2").await.unwrap();
    assert_eq!(stored, bundle("2"));
    assert!(store.all_functions().await.unwrap().len() >= 2);
}

/// A sync notice is written with its run's changes, its counts filled in by the commit;
/// a redelivered unit writes none; the sweep's read sees only old ones; delete drops them.
/// An exec run's notice grows with its writes and is held from the sweep until its hold
/// lapses or it is settled.
async fn notices_are_committed_with_their_changes(store: &Store) {
    let env = store.ensure_environment(&"notices".parse().unwrap()).await.unwrap();
    let notice = |message: &str| SyncNotice {
        environment: "notices".parse().unwrap(),
        integration: "crm".parse().unwrap(),
        connection: "a".into(),
        sync: "contacts".into(),
        models: vec!["Contact".into(), "Contact".into()],
        message_id: message.into(),
        sync_type: "WEBHOOK".into(),
        modified_after: chrono::Utc::now(),
        counts: Vec::new(),
        error: None,
    };
    let with_notice = |message: &str, records| Unit {
        notice: Some(notice(message)),
        ..unit(message, records)
    };
    let first = with_notice(
        "n1",
        vec![
            save(env.id, "a", "p1", json!({"n": 1}), 10),
            save(env.id, "a", "p1", json!({"n": 1}), 11),
        ],
    );
    let outcomes = store
        .commit(vec![first.clone(), with_notice("n2", vec![]), unit("n3", vec![])])
        .await
        .unwrap();
    let UnitOutcome::Applied {
        notice: Some(written),
        per_call,
        ..
    } = &outcomes[0]
    else {
        panic!("{outcomes:?}");
    };
    assert_eq!(written.counts, *per_call);
    assert_eq!((per_call[0].added, per_call[1].unchanged), (1, 1), "{per_call:?}");
    assert!(matches!(&outcomes[2], UnitOutcome::Applied { notice: None, .. }));

    let all = |store: &Store| {
        let store = store.clone();
        async move {
            let later = chrono::Utc::now() + chrono::Duration::seconds(1);
            let found = store.notices_before(later, 100).await.unwrap();
            let mut found: Vec<SyncNotice> = found.into_iter().map(Result::unwrap).collect();
            found.sort_by(|a, b| a.message_id.cmp(&b.message_id));
            found
        }
    };
    let stored = all(store).await;
    assert_eq!(
        stored.iter().map(|n| n.message_id.as_str()).collect::<Vec<_>>(),
        ["n1", "n2"]
    );
    assert_eq!(&stored[0], &**written, "read back as written");
    let earlier = chrono::Utc::now() - chrono::Duration::seconds(60);
    assert!(
        store.notices_before(earlier, 100).await.unwrap().is_empty(),
        "none is that old"
    );

    // A redelivery is already done: no second notice, the first one untouched.
    assert_eq!(store.commit(vec![first]).await.unwrap()[0], UnitOutcome::AlreadyDone);
    assert_eq!(all(store).await, stored);
    // An exec run's notice: each write adds to it, and the sweep does not see it while
    // it is held.
    let held = HeldNotice {
        notice: SyncNotice {
            models: Vec::new(),
            error: Some(UNFINISHED.into()),
            ..notice("exec-1")
        },
        hold: std::time::Duration::from_secs(60),
    };
    let scope = RecordScope {
        environment_id: env.id,
        integration: "crm".parse().unwrap(),
        connection_id: "a".into(),
        model: "Contact".into(),
    };
    for (id, version) in [("e1", 20), ("e2", 21)] {
        let records = vec![(id.to_string(), json!({"id": id}))];
        store
            .write_records(&scope, WriteKind::Save, records, version, Some(&held))
            .await
            .unwrap();
    }
    assert_eq!(all(store).await, stored, "held while its run lives");
    // Its run died: once the hold lapses, the sweep reads what it wrote.
    let lapsed = chrono::Utc::now() - chrono::Duration::seconds(1);
    store.hold_notice(&held.notice.key(), lapsed).await.unwrap();
    let found = all(store).await;
    assert_eq!(found.len(), 3);
    assert_eq!(found[0].key(), "exec-1:contacts");
    assert_eq!(
        (&found[0].models, found[0].error.as_deref()),
        (&vec!["Contact".to_string()], Some(UNFINISHED))
    );
    assert_eq!(
        (found[0].counts.len(), found[0].counts[0].added),
        (1, 2),
        "{:?}",
        found[0].counts
    );
    // A run that finishes settles its notice over the kept one.
    let settled = SyncNotice {
        error: None,
        ..found[0].clone()
    };
    store.settle_notice(&settled).await.unwrap();
    assert_eq!(all(store).await[0], settled);

    let keys: Vec<String> = all(store).await.iter().map(SyncNotice::key).collect();
    store.delete_notices(&keys[..2]).await.unwrap();
    assert_eq!(
        all(store).await.iter().map(SyncNotice::key).collect::<Vec<_>>(),
        ["n2:contacts"]
    );
}

/// The highest `HOOKS_RAW` sequence the store refers to, which a new `HOOKS_RAW` must
/// start past: in record versions, the operation log, and onWebhook markers. And the
/// part of it every start checks: the log and the record scopes, also once the log is
/// pruned.
async fn the_raw_clock_covers_versions_log_and_markers(store: &Store) {
    use hookyard_core::store::logs::{LogStep, LogWrite, WebhookEntry};
    let env = store.ensure_environment(&"dev".parse().unwrap()).await.unwrap();
    let before = store.raw_sequence_seen().await.unwrap();
    assert!(before > 0, "the records committed before carry versions");
    let recorded = store.raw_sequence_recorded().await.unwrap();
    assert_eq!(recorded, before, "only records carry sequences so far");
    let marker = |consumer: &str, id: String| {
        Unit::new(Marker {
            consumer: consumer.into(),
            message_id: id,
        })
    };
    store
        .commit(vec![
            marker("onWebhook:dev/crm/contacts", format!("{}:0:a", before + 100)),
            // Not an onWebhook marker, nor a routed event's id: not a raw sequence.
            marker("exec", format!("{}:a:1", before + 900)),
            marker("onWebhook:dev/crm/contacts", "not-a-sequence:0:a".into()),
        ])
        .await
        .unwrap();
    assert_eq!(store.raw_sequence_seen().await.unwrap(), before + 100);
    let step = LogStep {
        raw_seq: (before + 200) as i64,
        at: chrono::Utc::now(),
        stage: "routed".into(),
        connection_id: None,
        status: "ok".into(),
        detail: json!({}),
    };
    store.write_log(&[LogWrite::Step(step)]).await.unwrap();
    assert_eq!(store.raw_sequence_seen().await.unwrap(), before + 200);
    assert_eq!(
        store.raw_sequence_recorded().await.unwrap(),
        before,
        "markers and steps are not checked at start"
    );
    let entry = WebhookEntry {
        environment: "dev".into(),
        integration: "crm".into(),
        raw_seq: Some((before + 300) as i64),
        delivery_id: None,
        received_at: chrono::Utc::now(),
        status: "accepted".into(),
        detail: None,
        bytes: 2,
        routing: None,
    };
    store.write_log(&[LogWrite::Webhook(entry)]).await.unwrap();
    assert_eq!(store.raw_sequence_seen().await.unwrap(), before + 300);
    assert_eq!(store.raw_sequence_recorded().await.unwrap(), before + 300);
    // An exec run's write: the last sequence when it started, in the version's high bits.
    let exec_version = (((before + 400) << 16) + 0xFFFF) as i64;
    store
        .commit(vec![unit(
            "exec-run-clock",
            vec![save(env.id, "a", "clock", json!({"n": 1}), exec_version)],
        )])
        .await
        .unwrap();
    assert_eq!(store.raw_sequence_seen().await.unwrap(), before + 400);
    assert_eq!(store.raw_sequence_recorded().await.unwrap(), before + 400);
    let everything = chrono::Utc::now() + chrono::Duration::hours(1);
    store.prune_log(everything).await.unwrap();
    assert_eq!(
        store.raw_sequence_recorded().await.unwrap(),
        before + 400,
        "the record scopes keep the clock when the log is gone"
    );
}

async fn conformance(store: Store) {
    commits_apply_once_in_version_order(&store).await;
    the_raw_clock_covers_versions_log_and_markers(&store).await;
    notices_are_committed_with_their_changes(&store).await;
    deploys_version_changed_syncs(&store).await;
}

#[tokio::test]
async fn postgres() {
    let db = PgDatabase::create().await;
    conformance(Store::connect(&db.url, test_cipher()).await.unwrap()).await;
}

#[tokio::test]
async fn sqlite() {
    let file = SqliteFile::create();
    conformance(Store::connect(&file.url, test_cipher()).await.unwrap()).await;
}

/// Postgres: the worker's marker lookup goes by the index however small the table was
/// when a connection first ran it. A plan kept from a new, empty database would read
/// the whole table for every group once it has grown, until autovacuum analyzed it.
#[tokio::test]
async fn postgres_marker_lookups_use_the_index_as_the_table_grows() {
    let db = PgDatabase::create().await;
    let store = Store::connect(&db.url, test_cipher()).await.unwrap();
    let markers = |from: usize| -> Vec<Marker> {
        (from..from + 256)
            .map(|n| Marker {
                consumer: "onWebhook:contacts".into(),
                message_id: format!("m{n}"),
            })
            .collect()
    };
    let insert = |from: u32, to: u32| {
        format!(
            "INSERT INTO processed_messages (consumer, message_id, processed_at)
             SELECT 'onWebhook:contacts', 'm' || g, now() FROM generate_series({from}, {to}) g"
        )
    };
    // The first groups' markers: a page of the table.
    raw_execute(&db.url, &insert(0, 99)).await;
    // Postgres keeps a plan for a statement once it has planned it five times; the pool
    // spreads these over its connections.
    for _ in 0..60 {
        assert!(store.processed(&markers(100_000)).await.unwrap().is_empty());
    }
    raw_execute(&db.url, &insert(100, 49_999)).await;
    for _ in 0..10 {
        assert_eq!(store.processed(&markers(1000)).await.unwrap().len(), 256);
    }
    // A backend's table statistics arrive within seconds of its going idle, all at once.
    let stats = "SELECT idx_scan::text || ' ' || seq_tup_read::text FROM pg_stat_user_tables WHERE relname = 'processed_messages'";
    let seq_read = eventually(
        "the lookups' index scans in the statistics",
        Duration::from_secs(30),
        || async {
            let row = raw_texts(&db.url, stats).await.pop()?;
            let (index_scans, seq_read) = row.split_once(' ')?;
            (index_scans.parse::<u64>().ok()? >= 10 * 256).then(|| seq_read.parse::<u64>().unwrap())
        },
    )
    .await;
    assert!(seq_read < 50_000, "{seq_read} markers were read by scanning the table");
}
