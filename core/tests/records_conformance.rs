//! The records cache's conformance suite, run against Postgres and SQLite.

use std::collections::{BTreeMap, HashSet};

use hookyard_core::store::records::{LastAction, RecordQuery, RecordScope, WriteCounts, WriteKind};
use hookyard_core::store::{Store, StoreError};
use hookyard_testkit::{test_cipher, PgDatabase, SqliteFile};
use serde_json::{json, Value};

async fn scope(store: &Store, connection: &str) -> RecordScope {
    let env = store.ensure_environment(&"dev".parse().unwrap()).await.unwrap();
    RecordScope {
        environment_id: env.id,
        integration: "crm".parse().unwrap(),
        connection_id: connection.into(),
        model: "Contact".into(),
    }
}

fn records(items: &[(&str, Value)]) -> Vec<(String, Value)> {
    items.iter().map(|(id, v)| (id.to_string(), v.clone())).collect()
}

async fn all(store: &Store, scope: &RecordScope) -> BTreeMap<String, (Value, LastAction)> {
    let page = store
        .list_records(
            scope,
            &RecordQuery {
                limit: 10_000,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(page.next_cursor.is_none());
    page.records
        .into_iter()
        .map(|r| (r.id, (r.payload, r.last_action)))
        .collect()
}

/// One `write_records` call that must succeed.
async fn write(
    store: &Store,
    scope: &RecordScope,
    kind: WriteKind,
    items: &[(&str, Value)],
    version: i64,
) -> WriteCounts {
    store
        .write_records(scope, kind, records(items), version, None)
        .await
        .unwrap()
}

fn counts(added: u64, updated: u64, deleted: u64, unchanged: u64, skipped_stale: u64) -> WriteCounts {
    WriteCounts {
        added,
        updated,
        deleted,
        unchanged,
        skipped_stale,
        ..Default::default()
    }
}

async fn save_update_delete(store: &Store) {
    let s = scope(store, "c1").await;
    let first = write(
        store,
        &s,
        WriteKind::Save,
        &[
            (
                "1",
                json!({"id": "1", "name": {"first": "Ada", "last": "L"}, "tags": [1, 2]}),
            ),
            ("2", json!({"id": "2", "n": 1})),
        ],
        100,
    )
    .await;
    assert_eq!(first, counts(2, 0, 0, 0, 0));

    // Same content with keys in another order: unchanged. A real change: updated.
    let again = write(
        store,
        &s,
        WriteKind::Save,
        &[
            (
                "1",
                json!({"tags": [1, 2], "name": {"last": "L", "first": "Ada"}, "id": "1"}),
            ),
            ("2", json!({"id": "2", "n": 2})),
        ],
        101,
    )
    .await;
    assert_eq!(again, counts(0, 1, 0, 1, 0));

    // Deep merge: objects merge, arrays replace; unknown ids are ignored.
    let merged = write(
        store,
        &s,
        WriteKind::Update,
        &[
            ("1", json!({"name": {"last": "Lovelace"}, "tags": [3]})),
            ("nope", json!({"x": 1})),
        ],
        102,
    )
    .await;
    assert_eq!(
        merged,
        WriteCounts {
            updated: 1,
            ignored: 1,
            ..Default::default()
        }
    );
    let state = all(store, &s).await;
    assert_eq!(
        state["1"].0,
        json!({"id": "1", "name": {"first": "Ada", "last": "Lovelace"}, "tags": [3]})
    );
    assert_eq!(state["1"].1, LastAction::Updated);
    assert!(!state.contains_key("nope"));

    // Soft delete keeps the last payload; an unknown id leaves a tombstone.
    let deleted = write(
        store,
        &s,
        WriteKind::Delete,
        &[("2", Value::Null), ("ghost", Value::Null)],
        103,
    )
    .await;
    assert_eq!(deleted, counts(0, 0, 2, 0, 0));
    let page = store
        .list_records(
            &s,
            &RecordQuery {
                limit: 100,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let two = page.records.iter().find(|r| r.id == "2").unwrap();
    assert_eq!(two.payload, json!({"id": "2", "n": 2}));
    assert_eq!(two.last_action, LastAction::Deleted);
    assert!(two.deleted_at.is_some());
    let ghost = page.records.iter().find(|r| r.id == "ghost").unwrap();
    assert_eq!(ghost.payload, json!({"id": "ghost"}));
    assert!(ghost.deleted_at.is_some());

    // An update does not touch deleted records; a later save brings one back as added.
    let on_deleted = write(store, &s, WriteKind::Update, &[("2", json!({"n": 9}))], 104).await;
    assert_eq!(on_deleted.ignored, 1);
    let back = write(store, &s, WriteKind::Save, &[("2", json!({"id": "2", "n": 3}))], 105).await;
    assert_eq!(back.added, 1);
    let page = store
        .list_records(
            &s,
            &RecordQuery {
                limit: 100,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let two = page.records.iter().find(|r| r.id == "2").unwrap();
    assert!(two.deleted_at.is_none());
    assert!(
        two.first_seen_at < two.last_modified_at,
        "first_seen_at survives delete and re-add"
    );
}

async fn versions(store: &Store) {
    let s = scope(store, "c-versions").await;
    let save = |id: &'static str, v: Value, version| {
        let s = s.clone();
        async move { write(store, &s, WriteKind::Save, &[(id, v)], version).await }
    };
    save("1", json!({"v": "ten"}), 10).await;
    assert_eq!(save("1", json!({"v": "five"}), 5).await, counts(0, 0, 0, 0, 1));
    assert_eq!(
        save("1", json!({"v": "ten-again"}), 10).await,
        counts(0, 1, 0, 0, 0),
        "equal versions apply"
    );
    // An unchanged save still moves the version on: a write between the two is stale.
    assert_eq!(save("1", json!({"v": "ten-again"}), 20).await, counts(0, 0, 0, 1, 0));
    assert_eq!(save("1", json!({"v": "fifteen"}), 15).await.skipped_stale, 1);

    // A tombstone is versioned too: a stale save after a delete does not resurrect.
    write(store, &s, WriteKind::Delete, &[("1", Value::Null)], 30).await;
    assert_eq!(save("1", json!({"v": "old"}), 25).await.skipped_stale, 1);
    let stale_delete = write(store, &s, WriteKind::Delete, &[("2", Value::Null)], 50).await;
    assert_eq!(stale_delete.deleted, 1);
    assert_eq!(save("2", json!({"v": "before the delete"}), 40).await.skipped_stale, 1);
    let state = all(store, &s).await;
    assert_eq!(state["1"].1, LastAction::Deleted);
    assert_eq!(state["1"].0, json!({"v": "ten-again"}));
    assert_eq!(state["2"].1, LastAction::Deleted);
}

async fn duplicates_in_a_batch(store: &Store) {
    let s = scope(store, "c-dup").await;
    let result = write(
        store,
        &s,
        WriteKind::Save,
        &[
            ("1", json!({"n": 1})),
            ("2", json!({"n": 1})),
            ("1", json!({"n": 2})),
            ("1", json!({"n": 3})),
        ],
        1,
    )
    .await;
    assert_eq!(result.added, 2);
    assert_eq!(result.duplicates_in_batch, 2);
    assert_eq!(all(store, &s).await["1"].0, json!({"n": 3}), "the last occurrence wins");
}

async fn filters_ids_and_modified_after(store: &Store) {
    let s = scope(store, "c-filter").await;
    write(
        store,
        &s,
        WriteKind::Save,
        &[("a", json!({"x": 1})), ("u", json!({"x": 1})), ("d", json!({"x": 1}))],
        1,
    )
    .await;
    write(store, &s, WriteKind::Save, &[("u", json!({"x": 2}))], 2).await;
    write(store, &s, WriteKind::Delete, &[("d", Value::Null)], 3).await;
    let by_action = [
        (LastAction::Added, "a"),
        (LastAction::Updated, "u"),
        (LastAction::Deleted, "d"),
    ];
    for mask in 0..8u8 {
        let filter: Vec<LastAction> = by_action
            .iter()
            .enumerate()
            .filter(|(i, _)| mask & (1 << i) != 0)
            .map(|(_, (a, _))| *a)
            .collect();
        let expected: HashSet<&str> = if filter.is_empty() {
            ["a", "u", "d"].into()
        } else {
            by_action
                .iter()
                .filter(|(a, _)| filter.contains(a))
                .map(|(_, id)| *id)
                .collect()
        };
        let page = store
            .list_records(
                &s,
                &RecordQuery {
                    limit: 100,
                    filter,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let got: HashSet<&str> = page.records.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(got, expected, "filter mask {mask}");
    }
    let some = store
        .list_records(
            &s,
            &RecordQuery {
                limit: 100,
                ids: Some(vec!["a".into(), "d".into(), "zz".into()]),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        some.records.iter().map(|r| r.id.as_str()).collect::<HashSet<_>>(),
        ["a", "d"].into()
    );

    let all_page = store
        .list_records(
            &s,
            &RecordQuery {
                limit: 100,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let d = all_page.records.iter().find(|r| r.id == "d").unwrap();
    let since = store
        .list_records(
            &s,
            &RecordQuery {
                limit: 100,
                modified_after: Some(d.last_modified_at),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(since.records.iter().any(|r| r.id == "d"), "modified_after is inclusive");
    assert!(since.records.iter().all(|r| r.last_modified_at >= d.last_modified_at));

    let bad = store
        .list_records(
            &s,
            &RecordQuery {
                limit: 10,
                cursor: Some("not-a-cursor".into()),
                ..Default::default()
            },
        )
        .await;
    assert!(matches!(bad, Err(StoreError::Invalid(_))));
    // Another connection's records are not visible.
    let other = scope(store, "someone-else").await;
    assert!(all(store, &other).await.is_empty());
}

async fn paging_with_interleaved_writes(store: &Store) {
    let s = scope(store, "c-paging").await;
    let initial: Vec<(String, Value)> = (0..5).map(|i| (format!("r{i}"), json!({"v": 0}))).collect();
    store
        .write_records(&s, WriteKind::Save, initial, 1, None)
        .await
        .unwrap();
    let mut seen: Vec<(String, Value)> = Vec::new();
    let mut cursor = None;
    let mut version = 2;
    loop {
        let page = store
            .list_records(
                &s,
                &RecordQuery {
                    limit: 2,
                    cursor: cursor.clone(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        seen.extend(page.records.iter().map(|r| (r.id.clone(), r.payload.clone())));
        // Between pages: change a record already read and add a new one.
        if version < 4 {
            let changed = seen[0].0.clone();
            write(
                store,
                &s,
                WriteKind::Save,
                &[
                    (&changed, json!({"v": version})),
                    (&format!("new{version}"), json!({"v": 0})),
                ],
                version,
            )
            .await;
            version += 1;
        }
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    // Every record's final state was seen, and a record shows up again only after it changed.
    let final_state = all(store, &s).await;
    let mut last_seen: BTreeMap<String, Value> = BTreeMap::new();
    let mut appearances: BTreeMap<String, usize> = BTreeMap::new();
    for (id, payload) in seen {
        *appearances.entry(id.clone()).or_default() += 1;
        last_seen.insert(id, payload);
    }
    for (id, (payload, _)) in &final_state {
        assert_eq!(last_seen.get(id), Some(payload), "{id} skipped or seen stale");
    }
    // r0 changed twice after it was first read, both times before the reader came
    // round to it again: it shows up once more, with its latest value.
    assert_eq!(appearances["r0"], 2, "{appearances:?}");
    assert_eq!(last_seen["r0"], json!({"v": 3}));
    assert!(
        appearances.iter().filter(|(id, _)| *id != "r0").all(|(_, n)| *n == 1),
        "{appearances:?}"
    );
}

/// Writers and a paging reader at the same time: after the writers stop, the reader's
/// view (its pages, then the pages after its last cursor) equals the final state.
async fn paging_during_concurrent_writes(store: &Store) {
    let s = scope(store, "c-concurrent").await;
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (store, s) = (store.clone(), s.clone());
            tokio::spawn(async move {
                for round in 0..15i64 {
                    let batch: Vec<(String, Value)> = (0..10)
                        .map(|i| {
                            (
                                format!("w{w}-{}", (round * 3 + i) % 25),
                                json!({"w": w, "round": round}),
                            )
                        })
                        .collect();
                    store
                        .write_records(&s, WriteKind::Save, batch, round * 10 + w, None)
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    let mut view: BTreeMap<String, Value> = BTreeMap::new();
    let mut cursor = None;
    let read_page = |cursor: Option<String>| {
        let (store, s) = (store.clone(), s.clone());
        async move {
            store
                .list_records(
                    &s,
                    &RecordQuery {
                        limit: 7,
                        cursor,
                        ..Default::default()
                    },
                )
                .await
                .unwrap()
        }
    };
    while writers.iter().any(|w| !w.is_finished()) {
        let page = read_page(cursor.clone()).await;
        for r in &page.records {
            view.insert(r.id.clone(), r.payload.clone());
        }
        if let Some(last) = page.records.last() {
            cursor = Some(last.cursor.clone());
        }
        tokio::task::yield_now().await;
    }
    for w in writers {
        w.await.unwrap();
    }
    loop {
        let page = read_page(cursor.clone()).await;
        for r in &page.records {
            view.insert(r.id.clone(), r.payload.clone());
        }
        match page.records.last() {
            Some(last) => cursor = Some(last.cursor.clone()),
            None => break,
        }
    }
    let final_state: BTreeMap<String, Value> = all(store, &s).await.into_iter().map(|(id, (v, _))| (id, v)).collect();
    assert_eq!(view, final_state);
}

async fn large_batch(store: &Store) {
    let s = scope(store, "c-large").await;
    let batch: Vec<(String, Value)> = (0..1000)
        .map(|i| (format!("id-{i}"), json!({"i": i, "name": format!("n{i}")})))
        .collect();
    let result = store
        .write_records(&s, WriteKind::Save, batch.clone(), 1, None)
        .await
        .unwrap();
    assert_eq!(result.added, 1000);
    assert_eq!(
        store
            .write_records(&s, WriteKind::Save, batch, 2, None)
            .await
            .unwrap()
            .unchanged,
        1000
    );
    let mut cursor = None;
    let mut count = 0;
    loop {
        let page = store
            .list_records(
                &s,
                &RecordQuery {
                    limit: 300,
                    cursor,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        count += page.records.len();
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(count, 1000);
}

async fn conformance(store: Store) {
    save_update_delete(&store).await;
    versions(&store).await;
    duplicates_in_a_batch(&store).await;
    filters_ids_and_modified_after(&store).await;
    paging_with_interleaved_writes(&store).await;
    paging_during_concurrent_writes(&store).await;
    large_batch(&store).await;
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
