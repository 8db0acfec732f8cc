//! What an operator uses during and after an incident, end to end: one trace per
//! webhook, dead letters (list, show, redrive, purge), replay and metrics.

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
    let mut request = h
        .http
        .request(method, format!("{}{path}", h.api))
        .bearer_auth(&h.environment.secret_key);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn start_router(h: &Harness) {
    let router = Arc::new(hookyard_router::Router::new(h.store.clone(), &h.bus, &h.config.router).unwrap());
    tokio::spawn(router.run(h.shutdown.clone()));
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
    start_router(&h);
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

/// `POST /replay` with `body`; the replay once it has finished.
async fn replayed(h: &Harness, body: Value) -> Value {
    let (status, answer) = call(h, reqwest::Method::POST, "/replay", Some(body)).await;
    assert_eq!(status, 202, "{answer}");
    let id = answer["data"]["id"].as_i64().unwrap();
    eventually("the replay to finish", Duration::from_secs(30), || async {
        let (_, shown) = call(h, reqwest::Method::GET, &format!("/replay/{id}"), None).await;
        let status = shown["data"]["status"].as_str()?.to_string();
        ["done", "cancelled", "failed"]
            .contains(&status.as_str())
            .then(|| shown["data"].clone())
    })
    .await
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
    assert_eq!(
        (dry["total"].as_i64(), dry["read"].as_i64(), dry["published"].as_i64()),
        (Some(3), Some(3), Some(3)),
        "{dry}"
    );
    assert_eq!(conn_messages(&h).await, before);
    let other = replayed(
        &h,
        json!({"since": since, "until": until, "dry_run": true, "integration": "crm", "connection_id": "c9"}),
    )
    .await;
    assert_eq!(
        (
            other["read"].as_i64(),
            other["published"].as_i64(),
            other["skipped"].as_i64()
        ),
        (Some(3), Some(0), Some(3))
    );

    // The replay runs the functions again on the window's three webhooks: p1's older
    // payload does not win over the newer one live traffic wrote.
    let mut body = window.clone();
    body["target"] = json!("functions");
    let done = replayed(&h, body).await;
    assert_eq!(done["status"], "done", "{done}");
    assert_eq!(
        (
            done["total"].as_i64(),
            done["read"].as_i64(),
            done["published"].as_i64()
        ),
        (Some(3), Some(3), Some(3)),
        "{done}"
    );
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
    let (status, answer) = call(
        &h,
        reqwest::Method::POST,
        "/replay",
        Some(json!({"since": since, "rate": 2, "target": "functions"})),
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    let id = answer["data"]["id"].as_i64().unwrap();
    eventually("the replay to publish", Duration::from_secs(20), || async {
        let (_, shown) = call(&h, reqwest::Method::GET, &format!("/replay/{id}"), None).await;
        (shown["data"]["published"].as_i64()? >= 1).then_some(())
    })
    .await;
    let (status, _) = call(&h, reqwest::Method::POST, &format!("/replay/{id}/cancel"), None).await;
    assert_eq!(status, 200);
    let cancelled = eventually("the replay to stop", Duration::from_secs(20), || async {
        let (_, shown) = call(&h, reqwest::Method::GET, &format!("/replay/{id}"), None).await;
        (shown["data"]["status"] == "cancelled").then(|| shown["data"].clone())
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
        (json!({"since": "yesterday"}), 400, "since"),
        (json!({"since": since, "integration": "nope"}), 404, ""),
        (json!({"since": since, "target": "everything"}), 400, "target"),
    ] {
        let (got, answer) = call(&h, reqwest::Method::POST, "/replay", Some(body.clone())).await;
        assert_eq!(got, status, "{body} → {answer}");
        assert!(answer["error"]["message"].as_str().unwrap().contains(field), "{answer}");
    }
    let (status, _) = call(&h, reqwest::Method::GET, "/replay/999", None).await;
    assert_eq!(status, 404);
}
