//! The operation log's store and writer, against Postgres and SQLite: filters, one entry
//! per stored webhook, steps in order, retention; and a full queue that drops and counts
//! rather than waits.

use std::time::Duration;

use chrono::{DateTime, Utc};
use hookyard_core::config::LogsConfig;
use hookyard_core::oplog::OpLog;
use hookyard_core::store::logs::{ActionEntry, ActionLogFilter, LogFilter, LogStep, LogWrite, WebhookEntry};
use hookyard_core::store::Store;
use hookyard_testkit::{eventually, test_cipher, PgDatabase, SqliteFile};
use serde_json::json;

fn entry(raw_seq: Option<i64>, integration: &str, status: &str, at: DateTime<Utc>) -> LogWrite {
    LogWrite::Webhook(WebhookEntry {
        environment: "dev".into(),
        integration: integration.into(),
        raw_seq,
        delivery_id: Some(format!("d{raw_seq:?}")),
        received_at: at,
        status: status.into(),
        detail: None,
        bytes: 10,
        routing: raw_seq.map(|_| json!({"status": "routed", "connections": ["c0"], "at": at})),
    })
}

fn step(raw_seq: i64, connection: &str, status: &str, at: DateTime<Utc>) -> LogWrite {
    LogWrite::Step(LogStep {
        raw_seq,
        at,
        stage: "execution".into(),
        connection_id: Some(connection.into()),
        status: status.into(),
        detail: json!({"sync": "contacts"}),
    })
}

async fn log_conformance(store: Store) {
    let now = Utc::now();
    let old = now - chrono::Duration::days(10);
    store
        .write_log(&[
            entry(Some(1), "crm", "accepted", old),
            entry(Some(2), "crm", "accepted", now),
            entry(None, "crm", "rejected", now),
            entry(Some(3), "other", "accepted", now),
            step(1, "c0", "ok", old),
            step(2, "c0", "failed", now),
            step(2, "c0", "ok", now),
            step(3, "c9", "ok", now),
        ])
        .await
        .unwrap();
    // A webhook routed twice (a redelivery) keeps one entry.
    store
        .write_log(&[entry(Some(2), "crm", "accepted", now)])
        .await
        .unwrap();

    let ids = |filter: LogFilter| {
        let store = store.clone();
        async move {
            let found = store.logged_webhooks("dev", &filter, 100).await.unwrap();
            found.iter().map(|w| w.entry.raw_seq).collect::<Vec<_>>()
        }
    };
    assert_eq!(
        ids(LogFilter::default()).await,
        [Some(3), None, Some(2), Some(1)],
        "newest first"
    );
    let crm = LogFilter {
        integration: Some("crm".into()),
        ..Default::default()
    };
    assert_eq!(ids(crm.clone()).await, [None, Some(2), Some(1)]);
    let failed = LogFilter {
        status: Some("failed".into()),
        ..Default::default()
    };
    assert_eq!(ids(failed).await, [Some(2)], "a failed step marks its webhook");
    let rejected = LogFilter {
        status: Some("rejected".into()),
        ..Default::default()
    };
    assert_eq!(ids(rejected).await, [None]);
    let c9 = LogFilter {
        connection_id: Some("c9".into()),
        ..Default::default()
    };
    assert_eq!(ids(c9).await, [Some(3)]);
    let recent = LogFilter {
        since: Some(now - chrono::Duration::days(1)),
        ..Default::default()
    };
    assert_eq!(ids(recent).await.len(), 3);
    let all = store.logged_webhooks("dev", &LogFilter::default(), 100).await.unwrap();
    let after_first = LogFilter {
        after_id: Some(all[3].id),
        ..Default::default()
    };
    assert_eq!(
        ids(after_first).await,
        [Some(2), None, Some(3)],
        "oldest first after an id"
    );
    let page = store.logged_webhooks("dev", &LogFilter::default(), 2).await.unwrap();
    let next = LogFilter {
        before_id: Some(page[1].id),
        ..Default::default()
    };
    assert_eq!(ids(next).await, [Some(2), Some(1)]);
    assert!(store
        .logged_webhooks("prod", &LogFilter::default(), 100)
        .await
        .unwrap()
        .is_empty());

    let second = all.iter().find(|w| w.entry.raw_seq == Some(2)).unwrap();
    let (shown, steps) = store.logged_webhook("dev", second.id).await.unwrap();
    assert_eq!(shown.entry.integration, "crm");
    let stages: Vec<(&str, &str)> = steps.iter().map(|s| (s.stage.as_str(), s.status.as_str())).collect();
    assert_eq!(
        stages,
        [("route", "routed"), ("execution", "failed"), ("execution", "ok")]
    );
    assert!(store.logged_webhook("prod", second.id).await.is_err());

    // Retention: what is older than the cut goes, entries and steps.
    let pruned = store.prune_log(now - chrono::Duration::days(1)).await.unwrap();
    assert_eq!(pruned, 2, "webhook 1 and its step");
    assert_eq!(ids(LogFilter::default()).await, [Some(3), None, Some(2)]);

    // Every field comes back as written, and a batch larger than one statement takes
    // is written whole.
    let written = WebhookEntry {
        environment: "bulk".into(),
        integration: "crm".into(),
        raw_seq: Some(100),
        delivery_id: Some("d100".into()),
        received_at: "2026-11-27T10:00:00.123456Z".parse().unwrap(),
        status: "accepted".into(),
        detail: Some("a \"quoted\" detail".into()),
        bytes: 1234,
        routing: Some(json!({"status": "routed", "connections": ["c0"]})),
    };
    let mut batch = vec![LogWrite::Webhook(written.clone())];
    batch.extend((101..2600).map(|n| {
        LogWrite::Webhook(WebhookEntry {
            raw_seq: Some(n),
            routing: None,
            detail: None,
            delivery_id: None,
            ..written.clone()
        })
    }));
    store.write_log(&batch).await.unwrap();
    let bulk = store
        .logged_webhooks("bulk", &LogFilter::default(), 3000)
        .await
        .unwrap();
    assert_eq!(bulk.len(), 2500);
    assert_eq!(bulk.last().unwrap().entry, written, "the oldest, as written");
    assert_eq!(bulk[0].entry.raw_seq, Some(2599));
    assert_eq!(bulk[0].entry.routing, None);

    // Batches of every size from 1 to 40 rows leave one statement prepared on each
    // connection that ran one (ten at most), not one per size: sqlx keeps each text
    // prepared, and a text per size would fill memory with traffic.
    let before = store.prepared_statements().await.unwrap();
    for rows in 1..=40 {
        let batch: Vec<LogWrite> = (0..rows)
            .map(|n| {
                LogWrite::Webhook(WebhookEntry {
                    raw_seq: Some(10_000 + rows * 100 + n),
                    ..written.clone()
                })
            })
            .collect();
        store.write_log(&batch).await.unwrap();
    }
    let after = store.prepared_statements().await.unwrap();
    assert!(
        after < before + 20,
        "{before} statements prepared before, {after} after forty batch sizes"
    );
}

/// Action runs: every field as written, each filter, both orders, retention.
async fn action_log_conformance(store: &Store) {
    let t0: DateTime<Utc> = "2026-11-27T10:00:00.123456Z".parse().unwrap();
    let at = |ms: i64| t0 + chrono::Duration::milliseconds(ms);
    let run = |environment: &str, integration: &str, name: &str, ms: i64| ActionEntry {
        environment: environment.into(),
        integration: integration.into(),
        connection_id: "c0".into(),
        action_name: name.into(),
        origin: "api".into(),
        run_id: None,
        attempt: None,
        started_at: at(ms),
        duration_ms: 12.5,
        status: "succeeded".into(),
        error: None,
        logs: json!([]),
    };
    let failed = ActionEntry {
        origin: "async".into(),
        run_id: Some("3f1c".into()),
        attempt: Some(2),
        status: "failed".into(),
        error: Some(
            json!({"code": "action_script_runtime_error", "message": "ActionError: no", "payload": {"why": "quoted \"no\""}}),
        ),
        logs: json!([{"level": "info", "message": "looking up ada@example.com"}]),
        ..run("dev", "crm", "find", 1000)
    };
    let writes = [
        run("dev", "crm", "find", 0),
        failed.clone(),
        ActionEntry {
            origin: "function".into(),
            ..run("dev", "other", "sync-now", 2000)
        },
        run("prod", "crm", "find", 0),
    ];
    store
        .write_log(&writes.iter().cloned().map(LogWrite::Action).collect::<Vec<_>>())
        .await
        .unwrap();
    let names = |filter: ActionLogFilter, limit: u32| async move {
        let logged = store.logged_actions("dev", &filter, limit).await.unwrap();
        logged
            .iter()
            .map(|a| {
                format!(
                    "{}/{}@{}",
                    a.entry.integration,
                    a.entry.action_name,
                    (a.entry.started_at - t0).num_milliseconds()
                )
            })
            .collect::<Vec<_>>()
    };
    let all = store
        .logged_actions("dev", &ActionLogFilter::default(), 10)
        .await
        .unwrap();
    assert_eq!(all.len(), 3, "dev's only");
    assert_eq!(all[1].entry, failed, "as written");
    let (first, second) = (all[2].id, all[1].id);
    for (filter, expected) in [
        (
            ActionLogFilter::default(),
            vec!["other/sync-now@2000", "crm/find@1000", "crm/find@0"],
        ),
        (
            ActionLogFilter {
                status: Some("failed".into()),
                ..Default::default()
            },
            vec!["crm/find@1000"],
        ),
        (
            ActionLogFilter {
                action_name: Some("find".into()),
                ..Default::default()
            },
            vec!["crm/find@1000", "crm/find@0"],
        ),
        (
            ActionLogFilter {
                integration: Some("other".into()),
                ..Default::default()
            },
            vec!["other/sync-now@2000"],
        ),
        (
            ActionLogFilter {
                connection_id: Some("c9".into()),
                ..Default::default()
            },
            vec![],
        ),
        (
            ActionLogFilter {
                since: Some(at(1000)),
                ..Default::default()
            },
            vec!["other/sync-now@2000", "crm/find@1000"],
        ),
        (
            ActionLogFilter {
                until: Some(at(1000)),
                ..Default::default()
            },
            vec!["crm/find@0"],
        ),
        (
            ActionLogFilter {
                before_id: Some(second),
                ..Default::default()
            },
            vec!["crm/find@0"],
        ),
        (
            ActionLogFilter {
                after_id: Some(first),
                ..Default::default()
            },
            vec!["crm/find@1000", "other/sync-now@2000"],
        ),
    ] {
        let shown = format!("{filter:?}");
        assert_eq!(names(filter, 10).await, expected, "{shown}");
    }
    assert_eq!(names(ActionLogFilter::default(), 1).await, ["other/sync-now@2000"]);
    let prod = store
        .logged_actions("prod", &ActionLogFilter::default(), 10)
        .await
        .unwrap();
    assert_eq!(prod.len(), 1);

    let pruned = store.prune_log(at(1500)).await.unwrap();
    assert_eq!(pruned, 3, "two of dev's runs and prod's");
    assert_eq!(names(ActionLogFilter::default(), 10).await, ["other/sync-now@2000"]);
    store.prune_log(at(3000)).await.unwrap();
}

#[tokio::test]
async fn log_store_on_sqlite() {
    let file = SqliteFile::create();
    let store = Store::connect(&file.url, test_cipher()).await.unwrap();
    action_log_conformance(&store).await;
    log_conformance(store).await;
}

#[tokio::test]
async fn log_store_on_postgres() {
    let db = PgDatabase::create().await;
    let store = Store::connect(&db.url, test_cipher()).await.unwrap();
    action_log_conformance(&store).await;
    log_conformance(store).await;
}

// Current-thread: the writer cannot run between the entries handed over below.
#[tokio::test(flavor = "current_thread")]
async fn a_full_queue_drops_entries_and_counts_them_and_never_waits() {
    let file = SqliteFile::create();
    let store = Store::connect(&file.url, test_cipher()).await.unwrap();
    hookyard_core::metrics::install();
    let oplog = OpLog::start(
        store.clone(),
        &LogsConfig {
            buffer: 5,
            ..LogsConfig::default()
        },
    );
    let now = Utc::now();
    for n in 0..50 {
        let LogWrite::Webhook(webhook) = entry(Some(n), "crm", "accepted", now) else {
            unreachable!()
        };
        oplog.webhook(webhook);
    }
    let text = hookyard_core::metrics::render(None).await;
    assert!(text.contains("hookyard_log_entries_dropped_total 45"), "{text}");
    // What fit is written.
    eventually("the queued entries written", Duration::from_secs(10), || async {
        let written = store.logged_webhooks("dev", &LogFilter::default(), 100).await.unwrap();
        (written.len() == 5).then_some(())
    })
    .await;
}
