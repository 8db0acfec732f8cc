//! Routed events → worker → records, with a real nats-server and Postgres (SQLite for
//! the single-node path): subscriptions, retries and dead letters, sandbox failures,
//! version order, two workers on one consumer, a deploy during traffic, and the
//! consumer deleted under a running worker. Events are
//! published straight to `HOOKS_CONN`, as the router publishes them.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use hookyard_core::streams::CONN_STREAM;
use hookyard_testkit::{eventually, raw_texts, PgDatabase};
use serde_json::{json, Value};

use common::pipeline::{harness, harness_with, sync};

fn contact(n: u64, id: &str, name: &str) -> Value {
    json!({"n": n, "contact": {"id": id, "name": name}})
}

const SAVE_CONTACT: &str =
    "await nango.batchSave([{ id: payload.contact.id, name: payload.contact.name }], 'Contact');";

async fn subscriptions_decide_what_runs(database_url: Option<&str>) {
    let h = harness(database_url, 2).await;
    let body = h
        .deploy(&[
            ("crm/syncs/contacts.js", sync("['contact.updated']", SAVE_CONTACT)),
            ("crm/syncs/audit.js", sync("['*']", "")),
            ("crm/syncs/deals.js", sync("['deal.created']", "")),
        ])
        .await;
    assert_eq!(body["data"]["changes"].as_array().unwrap().len(), 3, "{body}");
    let listed = h.api_get("/functions").await;
    let contacts = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "contacts")
        .unwrap();
    assert_eq!(contacts["webhook_subscriptions"], json!(["contact.updated"]));
    assert_eq!(contacts["models"], json!(["Contact", "Run"]));
    assert_eq!(contacts["version"], 1);

    h.start_worker();
    h.publish([
        (1, "c0", "contact.updated", contact(1, "p1", "Ada")),
        (2, "c0", "ticket.closed", json!({"n": 2})),
        (3, "c1", "contact.updated", contact(3, "p2", "Grace")),
    ])
    .await;
    h.drained().await;
    let c0 = h.records("c0", "Contact").await;
    assert_eq!(c0.len(), 1);
    assert_eq!(
        (c0[0]["id"].as_str(), c0[0]["name"].as_str()),
        (Some("p1"), Some("Ada"))
    );
    assert_eq!(c0[0]["_nango_metadata"]["last_action"], "ADDED");
    assert_eq!(h.records("c1", "Contact").await[0]["name"], "Grace");
    // Event 1 ran two syncs (contacts and '*'), event 2 only '*', event 3 two; deals none.
    let mut runs = h.runs().await;
    runs.sort();
    assert_eq!(runs, vec![1, 1, 2, 3, 3]);
}

#[tokio::test]
async fn subscriptions_decide_what_runs_on_sqlite() {
    subscriptions_decide_what_runs(None).await;
}

#[tokio::test]
async fn subscriptions_decide_what_runs_on_postgres() {
    let db = PgDatabase::create().await;
    subscriptions_decide_what_runs(Some(&db.url)).await;
}

/// onWebhook reads the environment's variables; a change is seen within the worker's
/// one-second cache.
#[tokio::test]
async fn on_webhook_reads_the_environment_variables() {
    use hookyard_core::store::EnvironmentVariable;
    let h = harness(None, 1).await;
    let team = |value: &str| {
        [EnvironmentVariable {
            name: "TEAM_ID".into(),
            value: value.into(),
        }]
    };
    h.store
        .set_environment_variables(h.environment.id, &team("team-1"))
        .await
        .unwrap();
    let body = "const vars = await nango.getEnvironmentVariables();
                await nango.batchSave([{ id: 'v', team: vars.find((v) => v.name === 'TEAM_ID')?.value ?? null, n: payload.n }], 'Contact');";
    h.deploy(&[("crm/syncs/vars.js", sync("['*']", body))]).await;
    h.start_worker();
    h.publish([(1, "c0", "team.read", json!({"n": 1}))]).await;
    h.drained().await;
    assert_eq!(h.records("c0", "Contact").await[0]["team"], "team-1");

    h.store
        .set_environment_variables(h.environment.id, &team("team-2"))
        .await
        .unwrap();
    let mut n = 1;
    eventually("an event to see the new value", Duration::from_secs(10), || {
        n += 1;
        let seq = n;
        let h = &h;
        async move {
            h.publish([(seq, "c0", "team.read", json!({"n": seq}))]).await;
            h.drained().await;
            (h.records("c0", "Contact").await[0]["team"] == "team-2").then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn failures_are_retried_then_dead_lettered_and_the_rest_goes_on() {
    let db = PgDatabase::create().await;
    let h = harness(Some(&db.url), 1).await;
    h.deploy(&[
        (
            "crm/syncs/throws.js",
            sync("['throw']", "throw new Error('the provider said no');"),
        ),
        ("crm/syncs/loops.js", sync("['loop']", "while (true) {}")),
        (
            "crm/syncs/allocates.js",
            sync(
                "['allocate']",
                "const keep = []; while (true) keep.push(new Array(100000).fill(1));",
            ),
        ),
        (
            "crm/syncs/allocates_strings.js",
            sync(
                "['allocate_strings']",
                "const keep = []; while (true) keep.push('x'.repeat(1000));",
            ),
        ),
        (
            "crm/syncs/recurses.js",
            sync("['recurse']", "const f = (n) => f(n + 1) + 1; f(0);"),
        ),
        ("crm/syncs/fine.js", sync("['fine']", "")),
    ])
    .await;
    let started = Instant::now();
    h.start_worker();
    h.publish([
        (1, "c0", "throw", json!({"n": 1})),
        (2, "c0", "loop", json!({"n": 2})),
        (3, "c0", "allocate", json!({"n": 3})),
        (4, "c0", "recurse", json!({"n": 4})),
        (5, "c0", "allocate_strings", json!({"n": 5})),
    ])
    .await;
    h.publish((10..60).map(|n| (n, "c0", "fine", json!({"n": n})))).await;
    h.drained().await;
    // The fine events all ran, once, while the others were failing.
    let mut runs = h.runs().await;
    runs.sort();
    assert_eq!(runs, (10..60).collect::<Vec<_>>());
    let letters = h.store.dead_letters("dev", &Default::default(), 10).await.unwrap();
    let by_function: BTreeMap<&str, _> = letters
        .iter()
        .map(|l| (l.letter.function_name.as_deref().unwrap(), &l.letter))
        .collect();
    assert_eq!(by_function.len(), 5, "{letters:#?}");
    for (function, kind, text) in [
        ("throws", "thrown", "the provider said no"),
        ("loops", "timeout", "CPU budget"),
        ("allocates", "out_of_memory", "out of memory"),
        ("allocates_strings", "out_of_memory", "out of memory"),
        ("recurses", "stack_overflow", "stack"),
    ] {
        let letter = by_function[function];
        assert_eq!(letter.error_kind, kind, "{letter:?}");
        assert!(letter.error.contains(text), "{letter:?}");
        assert_eq!(letter.attempts, 3, "two retries, then the dead letter: {letter:?}");
        assert_eq!(letter.function_version, Some(1));
        assert_eq!(letter.connection_id.as_deref(), Some("c0"));
    }
    // Two retries, 100 ms and 300 ms after the failures before them.
    assert!(started.elapsed() >= Duration::from_millis(400));
}

#[tokio::test]
async fn an_older_event_never_overwrites_a_newer_one() {
    let h = harness(None, 1).await;
    h.deploy(&[("crm/syncs/contacts.js", sync("['contact.updated']", SAVE_CONTACT))])
        .await;
    h.start_worker();
    // The newer webhook (HOOKS_RAW #20) is handled first, the older (#10) after it.
    h.publish([(20, "c0", "contact.updated", contact(20, "p1", "newer"))])
        .await;
    h.drained().await;
    h.publish([(10, "c0", "contact.updated", contact(10, "p1", "older"))])
        .await;
    h.drained().await;
    let records = h.records("c0", "Contact").await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["name"], "newer");
    assert_eq!(
        h.runs().await.len(),
        2,
        "both events ran; the older one's save was stale"
    );
}

#[tokio::test]
async fn two_workers_apply_ten_thousand_events_exactly_once() {
    let db = PgDatabase::create().await;
    let h = harness(Some(&db.url), 50).await;
    h.deploy(&[("crm/syncs/contacts.js", sync("['contact.updated']", SAVE_CONTACT))])
        .await;
    let workers = [h.start_worker(), h.start_worker()];
    let connections: Vec<String> = (0..50).map(|n| format!("c{n}")).collect();
    h.publish((1..=10_000u64).map(|n| {
        let connection = connections[(n % 50) as usize].as_str();
        (n, connection, "contact.updated", contact(n, &format!("p{n}"), "x"))
    }))
    .await;
    h.drained().await;
    let runs = h.runs().await;
    assert_eq!(runs.len(), 10_000, "each event applied once");
    assert_eq!(runs.iter().collect::<HashSet<_>>().len(), 10_000);
    let committed: Vec<u64> = workers.iter().map(|w| w.committed()).collect();
    assert_eq!(committed.iter().sum::<u64>(), 10_000, "{committed:?}");
    assert!(
        committed.iter().all(|c| *c > 0),
        "both workers took a share: {committed:?}"
    );
}

#[tokio::test]
async fn a_deploy_during_traffic_switches_versions_without_losing_or_repeating_events() {
    let db = PgDatabase::create().await;
    let h = harness(Some(&db.url), 10).await;
    let versioned = |v: u32| {
        sync("['*']", &format!("payload.version = {v};"))
            .replace("n: payload.n }", "n: payload.n, version: payload.version }")
    };
    h.deploy(&[("crm/syncs/runs.js", versioned(1))]).await;
    let worker = h.start_worker();
    let event = |n: u64| {
        (
            n,
            ["c0", "c1", "c2", "c3", "c4"][(n % 5) as usize],
            "any",
            json!({"n": n}),
        )
    };
    h.publish((1..=1500).map(event)).await;
    eventually("a third of the events to run", Duration::from_secs(60), || async {
        (h.runs().await.len() >= 500).then_some(())
    })
    .await;
    let before = worker.deployments().revision();
    let body = h.deploy(&[("crm/syncs/runs.js", versioned(2))]).await;
    assert_eq!(body["data"]["changes"][0]["change"], "updated", "{body}");
    assert_eq!(body["data"]["changes"][0]["version"], 2, "{body}");
    eventually("the worker to load version 2", Duration::from_secs(10), || async {
        (worker.deployments().revision() > before).then_some(())
    })
    .await;
    h.publish((1501..=3000).map(event)).await;
    h.drained().await;
    let rows = raw_texts(
        &h.config.database_url,
        "SELECT (payload->>'n') || ':' || (payload->>'version') FROM records WHERE model = 'Run'",
    )
    .await;
    let runs: Vec<(u64, u32)> = rows
        .iter()
        .map(|r| {
            let (n, v) = r.split_once(':').unwrap();
            (n.parse().unwrap(), v.parse().unwrap())
        })
        .collect();
    assert_eq!(runs.len(), 3000, "every event ran once");
    assert_eq!(runs.iter().map(|(n, _)| n).collect::<HashSet<_>>().len(), 3000);
    assert!(runs.iter().any(|(_, v)| *v == 1));
    assert!(
        runs.iter().filter(|(n, _)| *n > 1500).all(|(_, v)| *v == 2),
        "events published after the deploy was loaded ran version 2"
    );
}

#[tokio::test]
async fn bad_deploys_are_refused_naming_the_file_and_store_nothing() {
    let h = harness(None, 0).await;
    h.deploy(&[("crm/syncs/ok.js", sync("['*']", ""))]).await;
    let cases: Vec<(Vec<(&str, String)>, &str)> = vec![
        (
            vec![
                ("crm/syncs/ok.js", sync("['*']", "")),
                ("crm/syncs/bad.js", "export default {".into()),
            ],
            "crm/syncs/bad.js: ",
        ),
        (
            vec![("other/syncs/x.js", sync("['*']", ""))],
            "other/syncs/x.js: integration other does not exist in environment dev",
        ),
        (
            vec![("crm/syncs/ok.js", sync("'contact.updated'", ""))],
            "crm/syncs/ok.js: webhookSubscriptions must be an array",
        ),
        (
            vec![(
                "crm/syncs/typed.ts",
                format!("enum Kind {{ Contact }}\n{}", sync("['*']", "")),
            )],
            "crm/syncs/typed.ts: TypeScript that cannot be deployed:\n1:1: TypeScript enum",
        ),
        (vec![], "the deploy holds no JavaScript or TypeScript files"),
    ];
    for (files, expected) in cases {
        let response = h.post_deploy(&files).await;
        assert_eq!(response.status(), 400);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_function", "{body}");
        assert!(
            body["error"]["message"].as_str().unwrap().starts_with(expected),
            "{body}"
        );
    }
    let live = h.store.functions(h.environment.id).await.unwrap();
    assert_eq!(live.len(), 1);
    assert_eq!(
        (live[0].name.as_str(), live[0].version),
        ("ok", 1),
        "nothing of the refused deploys was stored"
    );
}

#[tokio::test]
async fn events_wait_out_a_postgres_outage_and_apply_once() {
    let db = PgDatabase::create().await;
    let h = harness(Some(&db.url), 1).await;
    h.deploy(&[("crm/syncs/runs.js", sync("['*']", ""))]).await;
    h.start_worker();
    h.publish((1..=20).map(|n| (n, "c0", "any", json!({"n": n})))).await;
    h.drained().await;
    db.close_for_now().await;
    h.publish((21..=60).map(|n| (n, "c0", "any", json!({"n": n})))).await;
    // The worker cannot commit: its events are nak'd and delivered again, not acked.
    let stream = h.bus.jetstream.get_stream(CONN_STREAM).await.unwrap();
    eventually("the worker to fail and retry", Duration::from_secs(30), || {
        let stream = stream.clone();
        async move {
            let mut consumer = stream
                .get_consumer::<jetstream::consumer::pull::Config>(hookyard_worker::CONSUMER)
                .await
                .ok()?;
            let info = consumer.info().await.ok()?;
            (info.num_redelivered > 0).then_some(())
        }
    })
    .await;
    assert!(h.store.ping().await.is_err(), "the database is away");
    db.reopen().await;
    h.drained().await;
    let mut runs = h.runs().await;
    runs.sort();
    assert_eq!(
        runs,
        (1..=60).collect::<Vec<_>>(),
        "every event applied once after the outage"
    );
}

/// An operator who deletes the functions consumer (to reset it) does not stop the
/// worker: it creates the consumer again, as a restart would, and goes on; the events it
/// had applied come again and are recognised as done. (Its consuming used to end, and
/// `hookyard worker` to exit 0.)
#[tokio::test]
async fn a_worker_whose_consumer_is_deleted_creates_it_again_and_goes_on() {
    let h = harness(None, 1).await;
    h.deploy(&[("crm/syncs/runs.js", sync("['*']", ""))]).await;
    let worker = std::sync::Arc::new(hookyard_worker::Worker::new(h.store.clone(), &h.bus, &h.config).expect("worker"));
    let stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(worker.run(stop.clone()));
    h.publish((1..=5).map(|n| (n, "c0", "any", json!({"n": n})))).await;
    h.drained().await;

    let stream = h.bus.jetstream.get_stream(CONN_STREAM).await.unwrap();
    stream.delete_consumer(hookyard_worker::CONSUMER).await.unwrap();
    h.publish((6..=10).map(|n| (n, "c0", "any", json!({"n": n})))).await;
    h.drained().await;
    let mut runs = h.runs().await;
    runs.sort();
    assert_eq!(runs, (1..=10).collect::<Vec<_>>(), "every event applied once");
    assert!(!running.is_finished(), "the worker stopped: {:?}", running.await);
    stop.cancel();
    running.await.unwrap().unwrap();
}

/// Two JS threads; a sync for `slow` events that waits `wait_ms`, and one for `fine`
/// events that does nothing (both save their `Run`).
async fn slow_and_fine(wait_ms: u64) -> common::pipeline::Harness {
    let wait = format!("await new Promise((done) => setTimeout(done, {wait_ms}));");
    two_threads_with(&[
        ("crm/syncs/slow.js", sync("['slow']", &wait)),
        ("crm/syncs/fine.js", sync("['fine']", "")),
    ])
    .await
}

/// A worker configuration with two JS threads and these functions deployed, and two runs
/// in progress at most: a run that waits keeps one of the two threads, as a run that
/// computes does.
async fn two_threads_with(files: &[(&str, String)]) -> common::pipeline::Harness {
    let h = harness_with(None, 1, |config| {
        config.worker.js_threads = 2;
        config.worker.concurrent_runs = 2;
        config.worker.limits.timeout = Duration::from_secs(10);
        config.worker.ack_wait = Duration::from_secs(30);
    })
    .await;
    h.deploy(files).await;
    h
}

/// Queues `slow` slow events, then `fine` fine ones, all before the worker starts (so
/// that its first group takes them); starts it and waits up to `within` for every fine
/// one to commit. When the worker started.
async fn fine_events_commit_within(h: &common::pipeline::Harness, slow: u64, fine: u64, within: Duration) -> Instant {
    h.publish((1..=slow).map(|n| (n, "c0", "slow", json!({"n": n})))).await;
    h.publish((slow + 1..=slow + fine).map(|n| (n, "c0", "fine", json!({"n": n}))))
        .await;
    let started = Instant::now();
    h.start_worker();
    runs_after_commit(h, slow, fine, within).await;
    started
}

/// Waits up to `within` for `count` events numbered above `after` to commit.
async fn runs_after_commit(h: &common::pipeline::Harness, after: u64, count: u64, within: Duration) {
    eventually("the fine events to commit", within, || async {
        let runs = h.runs().await;
        (runs.iter().filter(|n| **n > after).count() == count as usize).then_some(())
    })
    .await;
}

/// Waits for the worker to ack everything; each of events `1..=total` applied once.
async fn each_applied_once(h: &common::pipeline::Harness, total: u64) {
    h.drained().await;
    let mut runs = h.runs().await;
    runs.sort();
    assert_eq!(runs, (1..=total).collect::<Vec<_>>(), "each event once");
}

/// A function that hangs holds back only its own event: the rest of its group is
/// committed while it still runs, and it commits on its own once it ends.
#[tokio::test]
async fn a_slow_function_holds_back_only_its_own_event() {
    let h = slow_and_fine(8000).await;
    let started = fine_events_commit_within(&h, 1, 40, Duration::from_secs(6)).await;
    assert!(
        !h.runs().await.contains(&1),
        "the slow event is still running when the others have committed"
    );
    each_applied_once(&h, 41).await;
    assert!(started.elapsed() >= Duration::from_secs(8));
}

/// The fine events committed before either of two 3 s slow executions, queued at
/// `started`, ended; then each of events `1..=total` is applied once, the slow ones one
/// after the other.
async fn two_slow_ones_ran_one_after_the_other(h: &common::pipeline::Harness, started: Instant, total: u64) {
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "before either slow execution ended"
    );
    each_applied_once(h, total).await;
    assert!(
        started.elapsed() >= Duration::from_secs(6),
        "the slow ones ran one after the other"
    );
}

/// A sync whose executions hang never takes every JS thread, from its first execution
/// on: with two of its events queued ahead of the others on two threads, the others
/// still run at once.
#[tokio::test]
async fn a_hanging_sync_never_takes_every_js_thread() {
    let h = slow_and_fine(3000).await;
    let started = fine_events_commit_within(&h, 2, 20, Duration::from_millis(2500)).await;
    two_slow_ones_ran_one_after_the_other(&h, started, 22).await;
}

/// However many syncs are slow, one JS thread is left to the others: two syncs known to
/// be slow (as when a provider's API stops answering every sync that calls it), one
/// hanging event of each queued ahead of the others, two threads, and the others still
/// run at once.
#[tokio::test]
async fn slow_syncs_together_never_take_every_js_thread() {
    let wait = "await new Promise((done) => setTimeout(done, payload.wait));";
    let h = two_threads_with(&[
        ("crm/syncs/slow.js", sync("['slow']", wait)),
        ("crm/syncs/slower.js", sync("['slower']", wait)),
        ("crm/syncs/fine.js", sync("['fine']", "")),
    ])
    .await;
    h.start_worker();
    // An execution of 150 ms each makes both known to be slow.
    h.publish([
        (1, "c0", "slow", json!({"n": 1, "wait": 150})),
        (2, "c0", "slower", json!({"n": 2, "wait": 150})),
    ])
    .await;
    runs_after_commit(&h, 0, 2, Duration::from_secs(10)).await;

    let started = Instant::now();
    h.publish([
        (3, "c0", "slow", json!({"n": 3, "wait": 3000})),
        (4, "c0", "slower", json!({"n": 4, "wait": 3000})),
    ])
    .await;
    h.publish((5..=24).map(|n| (n, "c0", "fine", json!({"n": n})))).await;
    runs_after_commit(&h, 4, 20, Duration::from_millis(2500)).await;
    two_slow_ones_ran_one_after_the_other(&h, started, 24).await;
}
