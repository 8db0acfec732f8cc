//! What an operator uses during and after an incident, end to end: one trace per
//! webhook, dead letters (list, show, redrive, purge), replay and metrics; and a NATS
//! server that comes back without its store.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hookyard_testkit::eventually;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use serde_json::{json, Value};
use tracing_subscriber::layer::SubscriberExt as _;

use common::pipeline::{harness, sync, Harness};
use hookyard_core::streams::RAW_STREAM;

/// Keeps every finished span in memory.
#[derive(Debug, Clone, Default)]
struct Spans(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Spans {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.0.lock().unwrap().extend(batch);
        Ok(())
    }
}

impl Spans {
    /// Installs this process's subscriber: every span goes to `self`.
    fn install(&self) {
        let provider = SdkTracerProvider::builder().with_simple_exporter(self.clone()).build();
        let subscriber =
            tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::set_global_default(subscriber).unwrap();
    }

    fn named(&self, name: &str) -> Vec<SpanData> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|span| span.name == name)
            .cloned()
            .collect()
    }
}

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.as_str().into_owned())
}

async fn post_webhook(http: &reqwest::Client, url: &str, body: &Value) -> u16 {
    http.post(url).json(body).send().await.unwrap().status().as_u16()
}

#[tokio::test]
async fn one_trace_follows_a_webhook_through_ingest_the_router_the_worker_and_its_commit() {
    let spans = Spans::default();
    spans.install();
    let h = harness(None, 1).await;
    h.deploy(&[(
        "crm/syncs/contacts.js",
        sync("['contact.updated']", "nango.log('saving', payload.n);"),
    )])
    .await;
    h.start_all();
    let webhooks = h.start_edge().await;
    let body = json!({"type": "contact.updated", "n": 7});
    assert_eq!(post_webhook(&h.http, &format!("{webhooks}/crm"), &body).await, 202);

    let commit = eventually("the worker's commit span", Duration::from_secs(20), || async {
        spans.named("store_commit").into_iter().next()
    })
    .await;
    let trace = commit.span_context.trace_id();
    let execution = eventually("the execution's span", Duration::from_secs(5), || async {
        spans.named("on_webhook").into_iter().next()
    })
    .await;
    for (name, span) in [
        ("receive_webhook", spans.named("receive_webhook")[0].clone()),
        ("route_webhook", spans.named("route_webhook")[0].clone()),
        ("on_webhook", execution.clone()),
    ] {
        assert_eq!(span.span_context.trace_id(), trace, "{name} is in the webhook's trace");
        // The id is in the span's fields too: log lines written inside it carry it.
        assert_eq!(attribute(&span, "trace_id"), Some(trace.to_string()), "{name}");
    }
    assert_eq!(commit.parent_span_id, execution.span_context.span_id());
    assert_eq!(attribute(&execution, "status").as_deref(), Some("ok"));
    assert_eq!(attribute(&execution, "sync").as_deref(), Some("contacts"));
    let route = &spans.named("route_webhook")[0];
    assert_eq!(
        route.parent_span_id,
        spans.named("receive_webhook")[0].span_context.span_id()
    );
    assert_eq!(execution.parent_span_id, route.span_context.span_id());
}

/// `method path` on the API as `dev`, with a JSON body when given; status and answer.
async fn call(h: &Harness, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut request = h.request(method, path);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_dead_lettered_execution_is_redriven_after_the_fix_and_applied_once() {
    let h = harness(None, 1).await;
    // Two syncs on every event: one fails, one succeeds. A redrive is the failed one's only.
    h.deploy(&[
        (
            "crm/syncs/contacts.js",
            sync("['*']", "throw new Error('boom ' + payload.n);"),
        ),
        ("crm/syncs/audit.js", sync("['*']", "")),
    ])
    .await;
    h.start_worker();
    h.start_router(h.shutdown.clone());
    h.publish([(1, "c0", "contact.updated", json!({"n": 1}))]).await;
    let letters = eventually("the dead letter", Duration::from_secs(20), || async {
        let (_, page) = call(&h, reqwest::Method::GET, "/dead-letters?kind=function", None).await;
        page["data"].as_array().filter(|l| !l.is_empty()).cloned()
    })
    .await;
    assert_eq!(letters.len(), 1);
    let id = letters[0]["id"].as_i64().unwrap();
    assert_eq!(letters[0]["function_name"], "contacts");
    assert_eq!(letters[0]["attempts"], 3);
    h.drained().await;
    assert_eq!(h.runs().await, vec![1], "audit ran; contacts did not");

    let (status, shown) = call(&h, reqwest::Method::GET, &format!("/dead-letters/{id}"), None).await;
    assert_eq!(status, 200, "{shown}");
    let attempts = shown["data"]["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 3, "{shown}");
    for (n, attempt) in attempts.iter().enumerate() {
        assert_eq!(attempt["attempt"], n as i64 + 1);
        assert!(attempt["error"].as_str().unwrap().contains("boom 1"), "{attempt}");
    }
    assert_eq!(shown["data"]["message"]["n"], 1);

    // Nothing selected is refused; other filters select nothing.
    let (status, body) = call(&h, reqwest::Method::POST, "/dead-letters/redrive", Some(json!({}))).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_request")));
    let (_, none) = call(&h, reqwest::Method::GET, "/dead-letters?kind=forward", None).await;
    assert_eq!(none["data"], json!([]));
    let (_, none) = call(&h, reqwest::Method::GET, "/dead-letters?error=nothing-like-it", None).await;
    assert_eq!(none["data"], json!([]));

    // The stream has dropped the event meanwhile (as its max_age would): the letter's own
    // copy is what is redriven.
    h.bus
        .jetstream
        .get_stream(hookyard_core::streams::CONN_STREAM)
        .await
        .unwrap()
        .purge()
        .await
        .unwrap();

    // Fixed, then redriven: applied once, by contacts only.
    h.deploy(&[
        ("crm/syncs/contacts.js", sync("['*']", "")),
        ("crm/syncs/audit.js", sync("['*']", "")),
    ])
    .await;
    let (status, body) = call(
        &h,
        reqwest::Method::POST,
        "/dead-letters/redrive",
        Some(json!({"ids": [id]})),
    )
    .await;
    assert_eq!((status, &body["data"]["redriving"]), (200, &json!([id])), "{body}");
    let redriven = |times: i64| {
        let h = &h;
        async move {
            eventually("the redrive to be made", Duration::from_secs(20), || async {
                let (_, shown) = call(h, reqwest::Method::GET, &format!("/dead-letters/{id}"), None).await;
                (shown["data"]["redrives"] == times).then_some(shown)
            })
            .await
        }
    };
    let shown = redriven(1).await;
    assert!(shown["data"]["redriven_at"].is_string());
    assert!(shown["data"]["redrive_error"].is_null());
    eventually("the redriven execution", Duration::from_secs(20), || async {
        (h.runs().await.len() == 2).then_some(())
    })
    .await;
    h.drained().await;

    // Asked again: the same redrive, applied already; nothing runs twice.
    call(
        &h,
        reqwest::Method::POST,
        "/dead-letters/redrive",
        Some(json!({"ids": [id]})),
    )
    .await;
    redriven(2).await;
    h.drained().await;
    assert_eq!(h.runs().await, vec![1, 1], "each sync applied the event once");
    let (_, letters) = call(&h, reqwest::Method::GET, "/dead-letters", None).await;
    assert_eq!(letters["data"].as_array().unwrap().len(), 1, "no new letter");

    // Purged.
    let (status, _) = call(&h, reqwest::Method::DELETE, "/dead-letters", None).await;
    assert_eq!(status, 400, "a purge of everything must say all=true");
    let (status, body) = call(&h, reqwest::Method::DELETE, "/dead-letters?kind=function", None).await;
    assert_eq!((status, &body["data"]["deleted"]), (200, &json!(1)));
    let (status, _) = call(&h, reqwest::Method::GET, &format!("/dead-letters/{id}"), None).await;
    assert_eq!(status, 404);
}

const SAVE_CONTACT: &str =
    "await nango.batchSave([{ id: payload.contact.id, name: payload.contact.name }], 'Contact');";

fn contact(n: u64, id: &str, name: &str) -> Value {
    json!({"type": "contact.updated", "n": n, "contact": {"id": id, "name": name}})
}

/// `POST /replay` with `body`, which must be taken; the replay's id.
async fn start_replay(h: &Harness, body: Value) -> i64 {
    let (status, answer) = call(h, reqwest::Method::POST, "/replay", Some(body)).await;
    assert_eq!(status, 202, "{answer}");
    answer["data"]["id"].as_i64().unwrap()
}

/// `GET /replay/{id}`: the replay as it stands.
async fn replay_state(h: &Harness, id: i64) -> Value {
    let (_, shown) = call(h, reqwest::Method::GET, &format!("/replay/{id}"), None).await;
    shown["data"].clone()
}

/// Posts `count` contact webhooks of `crm` and waits until the worker applied them; when
/// they started, and how many messages `HOOKS_CONN` holds then.
async fn live_webhooks(h: &Harness, webhooks: &str, count: u64) -> (chrono::DateTime<chrono::Utc>, u64) {
    let since = chrono::Utc::now();
    for n in 0..count {
        assert_eq!(post_webhook(&h.http, webhooks, &contact(n, "p", "x")).await, 202);
    }
    eventually("the live events applied", Duration::from_secs(20), || async {
        (h.runs().await.len() as u64 == count).then_some(())
    })
    .await;
    h.drained().await;
    (since, conn_messages(h).await)
}

/// `POST /replay` with `body`; the replay once it has finished.
async fn replayed(h: &Harness, body: Value) -> Value {
    let id = start_replay(h, body).await;
    eventually("the replay to finish", Duration::from_secs(30), || async {
        let shown = replay_state(h, id).await;
        let status = shown["status"].as_str()?.to_string();
        ["done", "cancelled", "failed"]
            .contains(&status.as_str())
            .then_some(shown)
    })
    .await
}

/// The replay `id` once it is done, waiting up to `within`.
async fn replay_done(h: &Harness, id: i64, within: Duration) -> Value {
    eventually("the replay to be done", within, || async {
        let shown = replay_state(h, id).await;
        (shown["status"] == "done").then_some(shown)
    })
    .await
}

/// A replay's (total, read, published).
fn counts(replay: &Value) -> (Option<i64>, Option<i64>, Option<i64>) {
    (
        replay["total"].as_i64(),
        replay["read"].as_i64(),
        replay["published"].as_i64(),
    )
}

async fn conn_messages(h: &Harness) -> u64 {
    let mut stream = h
        .bus
        .jetstream
        .get_stream(hookyard_core::streams::CONN_STREAM)
        .await
        .unwrap();
    stream.info().await.unwrap().state.messages
}

async fn names(h: &Harness) -> Vec<(String, String)> {
    let mut names: Vec<(String, String)> = h
        .records("c0", "Contact")
        .await
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap().to_string(),
                r["name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn a_replay_of_an_earlier_window_never_takes_records_back_and_counts_what_the_stream_holds() {
    let h = harness(None, 1).await;
    h.deploy(&[("crm/syncs/contacts.js", sync("['*']", SAVE_CONTACT))])
        .await;
    h.start_all();
    let webhooks = format!("{}/crm", h.start_edge().await);
    let since = chrono::Utc::now();
    for (n, id, name) in [(1, "p1", "Ada v1"), (2, "p2", "Grace v1"), (3, "p3", "Alan v1")] {
        assert_eq!(post_webhook(&h.http, &webhooks, &contact(n, id, name)).await, 202);
    }
    let until = chrono::Utc::now();
    assert_eq!(post_webhook(&h.http, &webhooks, &contact(4, "p1", "Ada v2")).await, 202);
    let live = vec![
        ("p1".to_string(), "Ada v2".to_string()),
        ("p2".to_string(), "Grace v1".to_string()),
        ("p3".to_string(), "Alan v1".to_string()),
    ];
    eventually("live traffic's records", Duration::from_secs(20), || async {
        (names(&h).await == live).then_some(())
    })
    .await;
    h.drained().await;
    assert_eq!(h.runs().await.len(), 4);
    let window = json!({"since": since, "until": until});

    // A dry run counts and publishes nothing.
    let before = conn_messages(&h).await;
    let dry = replayed(&h, json!({"since": since, "until": until, "dry_run": true})).await;
    assert_eq!(dry["status"], "done", "{dry}");
    assert_eq!(counts(&dry), (Some(3), Some(3), Some(3)), "{dry}");
    assert_eq!(conn_messages(&h).await, before);
    let one = replayed(
        &h,
        json!({"since": since, "until": until, "dry_run": true, "integration": "crm", "connection_id": "c0"}),
    )
    .await;
    assert_eq!(counts(&one), (Some(3), Some(3), Some(3)), "{one}");
    assert_eq!(one["connection_id"], "c0", "{one}");

    // The replay runs the functions again on the window's three webhooks: p1's older
    // payload does not win over the newer one live traffic wrote.
    let mut body = window.clone();
    body["target"] = json!("functions");
    let done = replayed(&h, body).await;
    assert_eq!(done["status"], "done", "{done}");
    assert_eq!(counts(&done), (Some(3), Some(3), Some(3)), "{done}");
    assert_eq!(conn_messages(&h).await, before + 3);
    h.drained().await;
    assert_eq!(h.runs().await.len(), 7, "the replayed events were executed");
    assert_eq!(names(&h).await, live, "no record went back to an older state");
}

#[tokio::test]
async fn a_replay_can_be_cancelled_and_bad_requests_are_refused() {
    let h = harness(None, 1).await;
    let webhooks = format!("{}/crm", h.start_edge().await);
    let since = chrono::Utc::now();
    for n in 0..6 {
        assert_eq!(post_webhook(&h.http, &webhooks, &contact(n, "p", "x")).await, 202);
    }
    let id = start_replay(&h, json!({"since": since, "rate": 2, "target": "functions"})).await;
    eventually("the replay to publish", Duration::from_secs(20), || async {
        (replay_state(&h, id).await["published"].as_i64()? >= 1).then_some(())
    })
    .await;
    let (status, _) = call(&h, reqwest::Method::POST, &format!("/replay/{id}/cancel"), None).await;
    assert_eq!(status, 200);
    let cancelled = eventually("the replay to stop", Duration::from_secs(20), || async {
        let shown = replay_state(&h, id).await;
        (shown["status"] == "cancelled").then_some(shown)
    })
    .await;
    assert!(cancelled["published"].as_i64().unwrap() < 6, "{cancelled}");
    assert_eq!(cancelled["total"], 6);
    let (_, listed) = call(&h, reqwest::Method::GET, "/replay", None).await;
    assert_eq!(listed["data"][0]["id"], id);

    for (body, status, field) in [
        (json!({"since": since, "until": since}), 400, "since"),
        (json!({"since": since, "connection_id": "c0"}), 400, "connection_id"),
        (json!({"since": since, "rate": 0}), 400, "rate"),
        (
            json!({"since": "yesterday"}),
            400,
            "since: \"yesterday\" is not an RFC 3339 time",
        ),
        (
            json!({"since": since, "until": "soon"}),
            400,
            "until: \"soon\" is not an RFC 3339 time",
        ),
        (
            json!({"since": since, "integration": "nope"}),
            404,
            "integration nope does not exist",
        ),
        (
            json!({"since": since, "integration": "crm", "connection_id": "c9"}),
            404,
            "connection c9 of integration crm does not exist",
        ),
        (json!({"since": since, "target": "everything"}), 400, "target"),
    ] {
        let (got, answer) = call(&h, reqwest::Method::POST, "/replay", Some(body.clone())).await;
        assert_eq!(got, status, "{body} → {answer}");
        assert!(answer["error"]["message"].as_str().unwrap().contains(field), "{answer}");
    }
    let (status, _) = call(&h, reqwest::Method::GET, "/replay/999", None).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn every_webhook_of_a_burst_taken_while_the_worker_was_stopped_logs_its_execution() {
    use hookyard_testkit::fake_provider::FakeCrm;
    let h = harness(None, 0).await;
    h.add_signed_integration("crmhooks", "whsec-test").await;
    h.deploy(&[(
        "crmhooks/syncs/contacts.js",
        sync(
            "['*']",
            "nango.log('saving ' + payload.contact.id);".to_owned().as_str(),
        )
        .replace(
            "await nango.batchSave([{ id: payload.n",
            &format!("{SAVE_CONTACT}\n await nango.batchSave([{{ id: payload.n"),
        ),
    )])
    .await;
    // Ingest and the router run; the worker does not, yet.
    let url = format!("{}/crmhooks?connection_id=c0", h.start_edge().await);
    const BURST: u64 = 20;
    for n in 0..BURST {
        let body = contact(n, &format!("p{n}"), "Ada");
        assert_eq!(FakeCrm::send_webhook(&url, "whsec-test", &body).await, 202);
    }
    assert_eq!(
        FakeCrm::send_webhook(&url, "not-the-secret", &contact(99, "p99", "Eve")).await,
        401
    );
    // The provider sends the first one again: stored once, logged as a duplicate.
    assert_eq!(
        FakeCrm::send_webhook(&url, "whsec-test", &contact(0, "p0", "Ada")).await,
        202
    );
    let routed = || async {
        let (_, page) = call(&h, reqwest::Method::GET, "/logs?integration=crmhooks&limit=100", None).await;
        page["data"].as_array().cloned().unwrap_or_default()
    };
    let entries = eventually("every webhook in the log", Duration::from_secs(20), || async {
        let entries = routed().await;
        (entries.len() as u64 == BURST + 2).then_some(entries)
    })
    .await;
    let duplicate: Vec<&Value> = entries.iter().filter(|e| e["status"] == "duplicate").collect();
    assert_eq!(duplicate.len(), 1, "{entries:?}");
    assert_eq!(duplicate[0]["detail"], "already stored as HOOKS_RAW #1");
    let rejected: Vec<&Value> = entries.iter().filter(|e| e["status"] == "rejected").collect();
    assert_eq!(rejected.len(), 1, "{entries:?}");
    assert!(
        rejected[0]["detail"].as_str().unwrap().starts_with("bad_signature"),
        "{}",
        rejected[0]
    );
    assert!(rejected[0]["raw_seq"].is_null());
    let (_, only) = call(&h, reqwest::Method::GET, "/logs?status=rejected", None).await;
    assert_eq!(only["data"].as_array().unwrap().len(), 1);

    h.start_all();
    h.drained().await;
    let accepted: Vec<&Value> = entries.iter().filter(|e| e["status"] == "accepted").collect();
    assert_eq!(accepted.len() as u64, BURST);
    for entry in accepted {
        assert_eq!(entry["detail"], "verified");
        let id = entry["id"].as_i64().unwrap();
        let shown = eventually(
            "the webhook's execution in its log",
            Duration::from_secs(20),
            || async {
                let (_, shown) = call(&h, reqwest::Method::GET, &format!("/logs/{id}"), None).await;
                let steps = shown["data"]["steps"].as_array()?.clone();
                steps.iter().any(|s| s["stage"] == "execution").then_some(shown)
            },
        )
        .await;
        let steps = shown["data"]["steps"].as_array().unwrap();
        assert_eq!(steps[0]["stage"], "route");
        assert_eq!(steps[0]["status"], "routed");
        assert_eq!(steps[0]["detail"]["connections"], json!(["c0"]));
        assert_eq!(steps[0]["detail"]["types"], json!(["contact.updated"]));
        let execution = steps.iter().find(|s| s["stage"] == "execution").unwrap();
        assert_eq!(execution["status"], "ok", "{shown}");
        assert_eq!(execution["connection_id"], "c0");
        assert_eq!(execution["detail"]["sync"], "contacts");
        assert_eq!(
            execution["detail"]["records"]["added"], 2,
            "a Contact and a Run: {execution}"
        );
        let n = shown["data"]["raw_seq"].as_i64().unwrap() - 1;
        assert_eq!(
            execution["detail"]["logs"][0]["message"],
            format!("saving p{n}"),
            "{execution}"
        );
    }
    let (_, for_c0) = call(&h, reqwest::Method::GET, "/logs?connection=c0&limit=100", None).await;
    assert_eq!(for_c0["data"].as_array().unwrap().len() as u64, BURST);
    let (status, _) = call(&h, reqwest::Method::GET, "/logs?status=sideways", None).await;
    assert_eq!(status, 400);
    let (status, answer) = call(&h, reqwest::Method::GET, "/logs?since=yesterday", None).await;
    assert_eq!(status, 400);
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("since: \"yesterday\" is not an RFC 3339 time such as"),
        "{answer}"
    );
}

/// The value of `name` with `labels` in a Prometheus text exposition, parsed.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("valid exposition");
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

#[tokio::test]
async fn metrics_parse_and_the_pending_gauge_rises_while_the_worker_is_stopped() {
    let h = harness(None, 1).await;
    h.deploy(&[("crm/syncs/contacts.js", sync("['*']", SAVE_CONTACT))])
        .await;
    let webhooks = h.start_edge().await;
    // This process's metrics (ingest, router and worker run in it), as a service serves them.
    let base = format!("http://127.0.0.1:{}", hookyard_testkit::free_port());
    tokio::spawn(hookyard_core::metrics::serve(
        base.trim_start_matches("http://").parse().unwrap(),
        Some(h.bus.jetstream.clone()),
        h.shutdown.clone(),
    ));
    // The exposition once the functions consumer's pending gauge reads `count`.
    let when_pending = |count: f64| {
        let (http, url) = (h.http.clone(), format!("{base}/metrics"));
        async move {
            eventually(
                &format!("a pending count of {count}"),
                Duration::from_secs(10),
                || async {
                    let text = http.get(&url).send().await.ok()?.text().await.ok()?;
                    let pending = sample(
                        &text,
                        "hookyard_consumer_pending",
                        &[("stream", "HOOKS_CONN"), ("consumer", "functions")],
                    );
                    (pending == Some(count)).then_some(text)
                },
            )
            .await
        }
    };

    // The worker runs once (its consumer exists), then stops.
    h.run_worker_once().await;
    when_pending(0.0).await;

    for n in 0..5 {
        assert_eq!(
            post_webhook(&h.http, &format!("{webhooks}/crm"), &contact(n, "p", "x")).await,
            202
        );
    }
    let status = h
        .http
        .post(format!("{webhooks}/nope"))
        .body("{}")
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 404);
    let text = when_pending(5.0).await;
    assert_eq!(
        sample(
            &text,
            "hookyard_webhooks_received_total",
            &[("integration", "crm"), ("outcome", "accepted")]
        ),
        Some(5.0)
    );
    assert_eq!(
        sample(
            &text,
            "hookyard_webhooks_received_total",
            &[("integration", "unknown"), ("outcome", "unknown_integration")]
        ),
        Some(1.0)
    );
    let scrape_parsed = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    let acks = scrape_parsed
        .samples
        .iter()
        .find(|s| s.metric == "hookyard_publish_ack_seconds")
        .expect("the ack histogram");
    match &acks.value {
        prometheus_parse::Value::Histogram(buckets) => {
            assert_eq!(
                buckets.last().unwrap().count,
                5.0,
                "one per accepted webhook: {buckets:?}"
            )
        }
        other => panic!("not a histogram: {other:?}"),
    }

    // Started again, it works the backlog off.
    h.start_all();
    h.drained().await;
    let text = when_pending(0.0).await;
    assert!(
        sample(
            &text,
            "hookyard_executions_total",
            &[("kind", "on_webhook"), ("status", "ok")]
        )
        .unwrap()
            >= 5.0
    );
    assert!(sample(&text, "hookyard_record_writes_total", &[("action", "added")]).unwrap() >= 1.0);
}

/// The metrics listener also answers the probes of the services that have no listener
/// of their own (router, worker, reconciler): up, and ready while NATS is connected.
#[tokio::test]
async fn the_metrics_listener_answers_liveness_and_readiness_probes() {
    let mut nats = hookyard_testkit::NatsServer::start();
    let client = async_nats::connect(&nats.url).await.unwrap();
    let addr = format!("127.0.0.1:{}", hookyard_testkit::free_port());
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(hookyard_core::metrics::serve(
        addr.parse().unwrap(),
        Some(async_nats::jetstream::new(client)),
        shutdown.clone(),
    ));
    let http = hookyard_core::outbound::http_client().unwrap();
    let probe = |path: &'static str| {
        let (http, url) = (http.clone(), format!("http://{addr}{path}"));
        async move {
            let response = http.get(url).send().await.ok()?;
            let status = response.status().as_u16();
            Some((status, response.json::<Value>().await.ok()?))
        }
    };
    let (status, up) = eventually("the listener", Duration::from_secs(10), || probe("/healthz")).await;
    assert_eq!((status, up), (200, json!({"status": "up"})));
    assert_eq!(
        probe("/readyz").await.unwrap(),
        (200, json!({"ready": true, "nats_connected": true}))
    );

    nats.stop();
    let not_ready = eventually("not ready without NATS", Duration::from_secs(10), || async {
        probe("/readyz").await.filter(|(status, _)| *status == 503)
    })
    .await;
    assert_eq!(not_ready.1, json!({"ready": false, "nats_connected": false}));
    assert_eq!(probe("/healthz").await.unwrap().0, 200, "still up");
    shutdown.cancel();
}

#[tokio::test]
async fn a_replay_waits_while_the_workers_have_too_much_waiting_then_goes_on() {
    let h = common::pipeline::harness_with(None, 1, |config| config.router.replay_max_backlog = 3).await;
    h.deploy(&[("crm/syncs/contacts.js", sync("['*']", SAVE_CONTACT))])
        .await;
    // The worker ran once (its consumer exists) and is stopped: live webhooks pile up.
    h.run_worker_once().await;
    let webhooks = format!("{}/crm", h.start_edge().await);
    let since = chrono::Utc::now();
    for n in 0..8 {
        assert_eq!(post_webhook(&h.http, &webhooks, &contact(n, "p", "x")).await, 202);
    }
    let id = start_replay(&h, json!({"since": since, "target": "functions", "rate": 8})).await;
    let held = eventually(
        "the replay to wait for the workers",
        Duration::from_secs(20),
        || async {
            let shown = replay_state(&h, id).await;
            (shown["waiting"] == true).then_some(shown)
        },
    )
    .await;
    assert_eq!(held["status"], "running");
    assert!(held["published"].as_i64().unwrap() < 8, "{held}");

    // The workers catch up: the replay goes on to the end.
    h.start_all();
    let done = replay_done(&h, id, Duration::from_secs(30)).await;
    assert_eq!(
        (done["published"].as_i64(), done["waiting"].as_bool()),
        (Some(8), Some(false)),
        "{done}"
    );
    h.drained().await;
    assert_eq!(h.runs().await.len(), 16, "eight live executions and eight replayed");
}

#[tokio::test]
async fn a_replay_left_by_a_router_that_stops_is_finished_by_another_exactly() {
    let h = harness(None, 1).await;
    h.deploy(&[("crm/syncs/contacts.js", sync("['*']", SAVE_CONTACT))])
        .await;
    h.start_all();
    let webhooks = format!("{}/crm", h.start_ingest().await);
    let first = tokio_util::sync::CancellationToken::new();
    let first_router = h.start_router(first.clone());
    let (since, before) = live_webhooks(&h, &webhooks, 8).await;

    let id = start_replay(&h, json!({"since": since, "target": "functions", "rate": 4})).await;
    eventually("the replay under way", Duration::from_secs(20), || async {
        (replay_state(&h, id).await["published"].as_i64()? >= 2).then_some(())
    })
    .await;
    // The first router stops: it writes how far it got and lets go.
    first.cancel();
    first_router.await.unwrap().unwrap();
    let left = replay_state(&h, id).await;
    assert_eq!(left["status"], "running", "{left}");
    assert!(left["read"].as_i64().unwrap() < 8, "{left}");

    // Another takes it up at once and finishes it.
    h.start_router(h.shutdown.clone());
    let done = replay_done(&h, id, Duration::from_secs(20)).await;
    assert_eq!(counts(&done), (Some(8), Some(8), Some(8)), "{done}");
    assert_eq!(conn_messages(&h).await, before + 8, "each event replayed once");
    h.drained().await;
    assert_eq!(h.runs().await.len(), 16);
}

#[tokio::test]
async fn a_replay_interrupted_by_nats_going_away_goes_on_when_it_is_back() {
    let mut h = harness(None, 1).await;
    h.deploy(&[("crm/syncs/contacts.js", sync("['*']", SAVE_CONTACT))])
        .await;
    h.start_all();
    let webhooks = format!("{}/crm", h.start_edge().await);
    let (since, before) = live_webhooks(&h, &webhooks, 8).await;
    let id = start_replay(&h, json!({"since": since, "target": "functions", "rate": 4})).await;
    eventually("the replay under way", Duration::from_secs(20), || async {
        (replay_state(&h, id).await["published"].as_i64()? >= 2).then_some(())
    })
    .await;
    h.nats.stop();
    let interrupted = eventually(
        "the replay to say it was interrupted",
        Duration::from_secs(30),
        || async {
            let shown = replay_state(&h, id).await;
            shown["error"]
                .as_str()
                .is_some_and(|e| e.starts_with("interrupted"))
                .then_some(shown)
        },
    )
    .await;
    assert_eq!(interrupted["status"], "running", "{interrupted}");
    h.nats.restart();
    let done = replay_done(&h, id, Duration::from_secs(60)).await;
    assert_eq!(
        (done["read"].as_i64(), done["total"].as_i64()),
        (Some(8), Some(8)),
        "{done}"
    );
    assert!(done["error"].is_null(), "{done}");
    assert_eq!(conn_messages(&h).await, before + 8, "each event replayed once");
    h.drained().await;
    assert_eq!(h.runs().await.len(), 16);
}

/// Webhook `n` sent to `webhooks` names p1 `name`: answered 202, and p1's record then
/// says so.
async fn saves(h: &Harness, webhooks: &str, n: u64, name: &str) {
    let status = post_webhook(&h.http, &format!("{webhooks}/crm"), &contact(n, "p1", name)).await;
    assert_eq!(status, 202);
    eventually(
        &format!("p1's record to name {name}"),
        Duration::from_secs(20),
        || async { (names(h).await == [("p1".to_string(), name.to_string())]).then_some(()) },
    )
    .await;
}

/// A pipeline whose services, started and then stopped, saved p1 "Ada v1" from
/// webhook 1.
async fn saved_once_by_the_services() -> Harness {
    let h = harness(None, 1).await;
    h.deploy(&[("crm/syncs/contacts.js", sync("['*']", SAVE_CONTACT))])
        .await;
    let stop = tokio_util::sync::CancellationToken::new();
    let (webhooks, services) = h.start_services(&stop).await;
    saves(&h, &webhooks, 1, "Ada v1").await;
    stop.cancel();
    services.await.unwrap();
    h
}

/// A `HOOKS_RAW` behind the store (a NATS server restored from an older backup; here
/// deleted and created again by hand) is refused at start also once the operation log
/// is pruned: the record scopes keep the highest version written, and the records are
/// what its sequences would have been ignored against.
#[tokio::test]
async fn a_hooks_raw_behind_the_records_is_refused_once_the_log_is_pruned() {
    let h = saved_once_by_the_services().await;
    let env = h.environment.name.to_string();
    let no_filter = hookyard_core::store::logs::LogFilter::default();
    eventually("the webhook's log entry", Duration::from_secs(20), || async {
        let logged = h.store.logged_webhooks(&env, &no_filter, 10).await.unwrap();
        (!logged.is_empty()).then_some(())
    })
    .await;
    let everything = chrono::Utc::now() + chrono::Duration::hours(1);
    h.store.prune_log(everything).await.unwrap();
    h.bus.jetstream.delete_stream(RAW_STREAM).await.unwrap();
    let by_hand = hookyard_core::streams::raw_stream_config(&h.config.streams);
    h.bus.jetstream.create_stream(by_hand).await.unwrap();

    let starting = hookyard_ingest::Ingest::start(
        &h.config,
        h.store.clone(),
        h.bus.clone(),
        tokio_util::sync::CancellationToken::new(),
    );
    let refused = match starting.await {
        Ok(_) => panic!("ingest started on a HOOKS_RAW behind the records"),
        Err(error) => error.to_string(),
    };
    assert!(
        refused.contains("ends at sequence 0, but the store has recorded sequences up to 1"),
        "{refused}"
    );
}

/// A NATS server that comes back without its store (a container restarted without its
/// volume) has no streams; the next service to start creates them, and `HOOKS_RAW`
/// starts past the sequences the store has seen: a webhook sent after it updates the
/// record one sent before wrote. (From sequence 1 again, its write was no newer than
/// the stored one and its event met the first one's idempotency marker: both ignored.)
#[tokio::test]
async fn webhooks_after_nats_lost_its_store_still_update_records() {
    let mut h = saved_once_by_the_services().await;

    h.nats.restart_empty();
    let second = tokio_util::sync::CancellationToken::new();
    let (webhooks, services) = h.start_services(&second).await;
    saves(&h, &webhooks, 2, "Ada v2").await;
    let raw = h
        .bus
        .jetstream
        .get_stream(RAW_STREAM)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .clone();
    assert_eq!((raw.first_sequence, raw.last_sequence), (2, 2), "{raw:?}");
    h.drained().await;
    assert_eq!(h.runs().await.len(), 2, "each webhook executed once");
    second.cancel();
    services.await.unwrap();
}
