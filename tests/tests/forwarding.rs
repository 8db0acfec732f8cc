//! Forwarding to a receiver on loopback, end to end with real NATS: the exact body and
//! both signatures (the Standard Webhooks one checked by the `standardwebhooks` library
//! from PyPI), retries keeping one `webhook-id`, `Retry-After`, 410, the SSRF guard,
//! independence from functions, sync notifications, and an egress proxy.

mod common;

use std::time::Duration;

use hmac::{Hmac, Mac};
use hookyard_core::store::forwarding::{ForwardingScope, ForwardingSettings};
use hookyard_core::{Config, Envelope};
use hookyard_testkit::proxy::ForwardProxy;
use hookyard_testkit::receiver::{Hit, Receiver};
use hookyard_testkit::{eventually, PgDatabase};
use reqwest::Method;
use serde_json::{json, Value};
use sha2::Sha256;

use common::pipeline::{harness_with, sync, Harness};

/// Fast retries, loopback allowed, no jitter (the tests time retries).
fn forwarding_config(config: &mut Config) {
    config.forwarding.allow_loopback = true;
    config.forwarding.jitter = false;
    config.forwarding.retry_delays = [100, 200, 300, 5000]
        .map(|ms| Duration::from_millis(ms).into())
        .to_vec();
    config.forwarding.attempt_timeout = Duration::from_secs(2);
    config.forwarding.ack_wait = Duration::from_secs(4);
}

/// As [`forwarding_config`], giving up after three quick attempts.
fn three_attempts(config: &mut Config) {
    forwarding_config(config);
    config.forwarding.retry_delays = [50, 50].map(|ms| Duration::from_millis(ms).into()).to_vec();
}

/// The first dead letter of a delivery, once there is one.
async fn delivery_letter(h: &Harness) -> hookyard_core::store::dead_letters::StoredDeadLetter {
    eventually("a delivery's dead letter", Duration::from_secs(30), || async {
        let letters = h.store.dead_letters("dev", &Default::default(), 10).await.unwrap();
        letters.into_iter().find(|l| l.letter.consumer == "deliveries")
    })
    .await
}

async fn forward_to(h: &Harness, urls: &[&str]) {
    let settings = ForwardingSettings {
        urls: urls.iter().map(|u| u.to_string()).collect(),
        ..Default::default()
    };
    h.store
        .set_forwarding(h.environment.id, ForwardingScope::Environment, &settings)
        .await
        .unwrap();
}

/// A webhook as ingest stores it in `HOOKS_RAW`; its sequence.
async fn store_raw(h: &Harness, body: &[u8], headers: &[(&str, &str)]) -> u64 {
    let envelope = Envelope {
        environment: "dev".parse().unwrap(),
        integration: "crm".parse().unwrap(),
        received_at: chrono::Utc::now(),
        delivery_id: format!("d-{}", uuid::Uuid::new_v4()),
        method: "POST".into(),
        path: None,
        query: None,
        headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        body: body.to_vec().into(),
        verification: hookyard_core::providers::Verification::Unsigned,
        traceparent: None,
    };
    h.bus
        .jetstream
        .publish_with_headers(envelope.subject(), envelope.to_headers(), envelope.body.clone())
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence
}

/// A webhook stored in `HOOKS_RAW`, then its routed event for `c0`.
async fn webhook(h: &Harness, body: &Value, headers: &[(&str, &str)]) {
    let sequence = store_raw(h, &serde_json::to_vec(body).unwrap(), headers).await;
    h.publish([(sequence, "c0", "contact.updated", body.clone())]).await;
}

/// Waits until the forwarder and the deliverer hold nothing pending or unacked.
async fn forwarding_idle(h: &Harness) {
    use async_nats::jetstream::consumer::pull::Config as Pull;
    use hookyard_core::streams::{CONN_STREAM, FWD_STREAM};
    eventually("forwarding to settle", Duration::from_secs(30), || async {
        for (stream, consumer) in [
            (CONN_STREAM, hookyard_worker::forward::FORWARDER),
            (FWD_STREAM, hookyard_worker::deliver::DELIVERER),
        ] {
            let stream = h.bus.jetstream.get_stream(stream).await.ok()?;
            let info = stream
                .get_consumer::<Pull>(consumer)
                .await
                .ok()?
                .info()
                .await
                .ok()?
                .clone();
            if info.num_pending > 0 || info.num_ack_pending > 0 {
                return None;
            }
        }
        Some(())
    })
    .await;
}

#[tokio::test]
async fn an_attributed_forward_carries_the_event_and_verifies_both_ways() {
    let db = PgDatabase::create().await;
    let h = harness_with(Some(&db.url), 1, forwarding_config).await;
    let receiver = Receiver::start(&[]).await;
    forward_to(&h, &[&receiver.url]).await;
    h.start_all();
    let event = json!({"type": "contact.updated", "n": 1, "contact": {"id": "p1"}});
    webhook(
        &h,
        &event,
        &[
            ("content-type", "application/json"),
            ("x-provider-signature", "abc"),
            ("authorization", "Bearer secret"),
            ("user-agent", "CRM-Hooks/1.0"),
        ],
    )
    .await;
    let hit = receiver.wait_hits(1).await.remove(0);
    let expected = format!(
        r#"{{"connectionId":"c0","from":"generic","payload":{},"providerConfigKey":"crm","type":"forward"}}"#,
        serde_json::to_string(&event).unwrap()
    );
    assert_eq!(String::from_utf8(hit.body.clone()).unwrap(), expected);
    // Signed with the environment's secret key, the default.
    let key = h.environment.secret_key.as_bytes();
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(&hit.body);
    assert_eq!(
        hit.header("x-nango-hmac-sha256"),
        hex::encode(mac.finalize().into_bytes())
    );
    assert_eq!(
        hit.header("x-provider-signature"),
        "abc",
        "the provider's headers come along"
    );
    assert_eq!(hit.header("user-agent"), "CRM-Hooks/1.0");
    assert_eq!(hit.header("authorization"), "", "but not its credentials");
    assert_eq!(hit.header("content-type"), "application/json");
    standard_webhooks_verifies(key, &hit);
}

/// Checks the Standard Webhooks signature with the reference Python library.
fn standard_webhooks_verifies(key: &[u8], hit: &Hit) {
    use base64::Engine as _;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("body"), &hit.body).unwrap();
    let headers = json!({
        "webhook-id": hit.header("webhook-id"),
        "webhook-timestamp": hit.header("webhook-timestamp"),
        "webhook-signature": hit.header("webhook-signature"),
    });
    std::fs::write(dir.path().join("headers.json"), headers.to_string()).unwrap();
    let secret = format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(key));
    let script = "import json, sys\n\
        from standardwebhooks.webhooks import Webhook\n\
        body = open(sys.argv[1], 'rb').read()\n\
        headers = json.load(open(sys.argv[2]))\n\
        Webhook(sys.argv[3]).verify(body, headers)\n\
        print('verified')\n";
    let output = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(dir.path().join("body"))
        .arg(dir.path().join("headers.json"))
        .arg(&secret)
        .output()
        .expect("python3");
    assert!(
        output.status.success() && String::from_utf8_lossy(&output.stdout).contains("verified"),
        "standardwebhooks did not verify (pip install standardwebhooks): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // And a tampered body does not verify.
    std::fs::write(dir.path().join("body"), b"{}").unwrap();
    let tampered = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(dir.path().join("body"))
        .arg(dir.path().join("headers.json"))
        .arg(&secret)
        .output()
        .unwrap();
    assert!(!tampered.status.success());
}

#[tokio::test]
async fn failures_are_retried_with_one_webhook_id_and_retry_after_is_respected() {
    let h = harness_with(None, 1, forwarding_config).await;
    let receiver = Receiver::start(&[(500, None), (500, None), (500, None), (200, None)]).await;
    let patient = Receiver::start(&[(429, Some("2"))]).await;
    forward_to(&h, &[&receiver.url, &patient.url]).await;
    h.start_all();
    webhook(&h, &json!({"n": 1}), &[]).await;
    let hits = receiver.wait_hits(4).await;
    let id = hits[0].header("webhook-id");
    assert!(id.starts_with("msg_"));
    assert!(
        hits.iter().all(|hit| hit.header("webhook-id") == id),
        "one webhook-id throughout"
    );
    assert!(hits.iter().all(|hit| hit.body == hits[0].body));
    let attempts = eventually("the four attempts recorded", Duration::from_secs(10), || async {
        let attempts = h.store.delivery_attempts(&id).await.unwrap();
        (attempts.len() == 4).then_some(attempts)
    })
    .await;
    let statuses: Vec<Option<i32>> = attempts.iter().map(|a| a.status).collect();
    assert_eq!(statuses, vec![Some(500), Some(500), Some(500), Some(200)]);

    let hits = patient.wait_hits(2).await;
    let waited = hits[1].at - hits[0].at;
    assert!(
        waited >= Duration::from_secs(2),
        "Retry-After: 2 respected, waited {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(5),
        "and not the schedule's 5 s: {waited:?}"
    );
}

#[tokio::test]
async fn a_410_disables_the_destination() {
    let h = harness_with(None, 1, forwarding_config).await;
    let gone = Receiver::start(&[(410, None)]).await;
    let fine = Receiver::start(&[]).await;
    forward_to(&h, &[&gone.url, &fine.url]).await;
    h.start_all();
    webhook(&h, &json!({"n": 1}), &[]).await;
    gone.wait_hits(1).await;
    fine.wait_hits(1).await;
    eventually("the destination to be disabled", Duration::from_secs(10), || async {
        let disabled = h.store.disabled_destinations(h.environment.id).await.unwrap();
        disabled.contains(&gone.url).then_some(())
    })
    .await;
    // Later events go only to the destination that is still on (a delivery queued to the
    // disabled one before the forwarder's settings refresh is dropped unsent).
    webhook(&h, &json!({"n": 2}), &[]).await;
    fine.wait_hits(2).await;
    assert_eq!(
        gone.hits().len(),
        1,
        "nothing more was sent to the disabled destination"
    );
}

#[tokio::test]
async fn loopback_destinations_are_refused_unless_allowed() {
    let h = harness_with(None, 1, |config| {
        forwarding_config(config);
        config.forwarding.allow_loopback = false;
    })
    .await;
    let receiver = Receiver::start(&[]).await;
    forward_to(&h, &[&receiver.url]).await;
    h.start_all();
    webhook(&h, &json!({"n": 1}), &[]).await;
    let letter = delivery_letter(&h).await;
    assert_eq!(letter.letter.error_kind, "refused");
    assert!(
        letter
            .letter
            .error
            .contains("127.0.0.1 is a loopback address (forwarding.allow_loopback allows it)"),
        "{letter:?}"
    );
    let attempts = eventually("the refused attempt recorded", Duration::from_secs(10), || async {
        let attempts = h.store.delivery_attempts(&letter.letter.message_id).await.unwrap();
        (!attempts.is_empty()).then_some(attempts)
    })
    .await;
    assert!(
        attempts[0].error.as_deref().unwrap().starts_with("refused: "),
        "{attempts:?}"
    );
    assert!(receiver.hits().is_empty());
}

/// Through `forwarding.proxy` (with credentials): the app is reached by a name only the
/// proxy resolves, and the proxy, on loopback itself, is trusted while loopback
/// destinations stay refused.
#[tokio::test]
async fn a_forward_goes_through_the_configured_proxy() {
    let receiver = Receiver::start(&[]).await;
    let app = receiver.url.trim_start_matches("http://").trim_end_matches("/hook");
    let proxy = ForwardProxy::start(app.parse().unwrap()).await;
    let proxy_url = format!("http://hookyard:se%2Fcret@{}", proxy.address);
    let h = harness_with(None, 1, |config| {
        forwarding_config(config);
        config.forwarding.allow_loopback = false;
        config.forwarding.proxy = Some(proxy_url);
    })
    .await;
    forward_to(&h, &["http://app.invalid/hook"]).await;
    h.start_all();
    let event = json!({"type": "contact.updated", "n": 1});
    webhook(&h, &event, &[]).await;
    let hit = receiver.wait_hits(1).await.remove(0);
    assert_eq!(hit.json()["payload"], event);
    assert_eq!(hit.header("host"), "app.invalid");
    let requests = proxy.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0].line, "POST http://app.invalid/hook HTTP/1.1");
    use base64::Engine as _;
    let credentials = base64::engine::general_purpose::STANDARD.encode("hookyard:se/cret");
    assert_eq!(requests[0].authorization, Some(format!("Basic {credentials}")));
    forwarding_idle(&h).await;
    let letters = h.store.dead_letters("dev", &Default::default(), 10).await.unwrap();
    assert!(letters.is_empty(), "{letters:?}");
}

/// A name that does not resolve (a DNS outage, a domain not registered yet) is a failed
/// attempt, tried again on the schedule like a refused connection, not a refusal.
#[tokio::test]
async fn a_destination_that_does_not_resolve_is_retried_not_refused() {
    let h = harness_with(None, 1, three_attempts).await;
    forward_to(&h, &["http://app.invalid/hook"]).await;
    h.start_all();
    webhook(&h, &json!({"n": 1}), &[]).await;
    let letter = delivery_letter(&h).await;
    assert_ne!(letter.letter.error_kind, "refused", "{letter:?}");
    assert_eq!(letter.letter.attempts, 3, "{letter:?}");
    let attempts = eventually("the three attempts recorded", Duration::from_secs(10), || async {
        let attempts = h.store.delivery_attempts(&letter.letter.message_id).await.unwrap();
        (attempts.len() == 3).then_some(attempts)
    })
    .await;
    for attempt in &attempts {
        let error = attempt.error.as_deref().unwrap_or_default();
        assert!(
            error.starts_with("not sent: app.invalid does not resolve"),
            "{attempts:?}"
        );
    }
}

#[tokio::test]
async fn a_down_receiver_does_not_hold_back_functions() {
    let db = PgDatabase::create().await;
    let h = harness_with(Some(&db.url), 1, forwarding_config).await;
    // Accepts connections and never answers: every attempt waits out its timeout.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("http://{}/hook", silent.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    forward_to(&h, &[&silent_url]).await;
    h.deploy(&[("crm/syncs/runs.js", sync("['*']", ""))]).await;
    h.start_all();
    h.publish((1..=500).map(|n| (n, "c0", "any", json!({"n": n})))).await;
    h.drained().await;
    assert_eq!(h.runs().await.len(), 500, "every function ran");
    // …while not one forward has been delivered.
    let attempts = hookyard_testkit::raw_texts(
        &h.config.database_url,
        "SELECT COUNT(*)::text FROM delivery_attempts WHERE status BETWEEN 200 AND 299",
    )
    .await;
    assert_eq!(attempts, vec!["0".to_string()]);
}

/// A receiver that every forward goes to, and a sync on `contact.updated` running `body`.
async fn notified_receiver(h: &Harness, body: &str) -> Receiver {
    let receiver = Receiver::start(&[]).await;
    forward_to(h, &[&receiver.url]).await;
    h.deploy(&[("crm/syncs/contacts.js", sync("['contact.updated']", body))])
        .await;
    receiver
}

#[tokio::test]
async fn a_notification_follows_a_run_that_changed_records_and_only_then() {
    let h = harness_with(None, 1, forwarding_config).await;
    let receiver = notified_receiver(
        &h,
        "await nango.batchSave([{ id: payload.contact.id, name: payload.contact.name }], 'Contact');",
    )
    .await;
    h.start_all();
    let contact = |n: u64, name: &str| json!({"n": n, "contact": {"id": "p1", "name": name}});
    webhook(&h, &contact(1, "Ada"), &[]).await;
    h.drained().await;
    webhook(&h, &contact(2, "Ada"), &[]).await; // changes nothing in Contact
    h.drained().await;
    webhook(&h, &contact(3, "Ada L."), &[]).await;
    h.drained().await;
    // Each webhook is forwarded (3); Contact notifications come for 1 and 3 only. (Every
    // run also adds one Run record, so Run notifications come for each.)
    let hits = eventually("forwards and notifications", Duration::from_secs(30), || async {
        let hits = receiver.hits();
        let bodies: Vec<Value> = hits.iter().map(|h| serde_json::from_slice(&h.body).unwrap()).collect();
        let contacts: Vec<Value> = bodies
            .iter()
            .filter(|b| b["type"] == "sync" && b["model"] == "Contact")
            .cloned()
            .collect();
        let runs = bodies
            .iter()
            .filter(|b| b["type"] == "sync" && b["model"] == "Run")
            .count();
        let forwards = bodies.iter().filter(|b| b["type"] == "forward").count();
        (forwards == 3 && runs == 3 && contacts.len() >= 2).then_some(contacts)
    })
    .await;
    assert_eq!(hits.len(), 2, "{hits:?}");
    let mut results: Vec<Value> = hits.iter().map(|b| b["responseResults"].clone()).collect();
    results.sort_by_key(|r| r["added"].as_u64());
    assert_eq!(
        results,
        vec![
            json!({"added": 0, "updated": 1, "deleted": 0}),
            json!({"added": 1, "updated": 0, "deleted": 0})
        ]
    );
    let first = &hits[0];
    assert_eq!(first["from"], "hookyard");
    assert_eq!(first["connectionId"], "c0");
    assert_eq!(first["providerConfigKey"], "crm");
    assert_eq!(first["syncName"], "contacts");
    assert_eq!(first["syncType"], "WEBHOOK");
    assert_eq!(first["success"], true);
}

/// The notices in the outbox (committed, not yet queued).
async fn outbox(h: &Harness) -> Vec<String> {
    let later = chrono::Utc::now() + chrono::Duration::seconds(1);
    let found = h.store.notices_before(later, 100).await.unwrap();
    found.into_iter().map(|n| n.unwrap().key()).collect()
}

#[tokio::test]
async fn a_notification_that_could_not_be_queued_is_sent_by_the_sweep() {
    let h = harness_with(None, 1, |config| {
        forwarding_config(config);
        config.forwarding.notices_resend_after = Duration::from_millis(300);
    })
    .await;
    let receiver = notified_receiver(&h, "await nango.batchSave([{ id: 'p1' }], 'Contact');").await;
    // HOOKS_FWD is gone: the worker commits the run, and queueing its notification fails.
    h.bus
        .jetstream
        .delete_stream(hookyard_core::streams::FWD_STREAM)
        .await
        .unwrap();
    h.start_worker();
    webhook(&h, &json!({"contact": {"id": "p1"}}), &[]).await;
    h.drained().await;
    let contacts = h.records("c0", "Contact").await;
    assert_eq!(contacts.len(), 1, "{contacts:?}");
    let kept = outbox(&h).await;
    assert_eq!(kept.len(), 1, "the notice is kept: {kept:?}");
    assert!(receiver.hits().is_empty());

    // NATS takes it again: the sweep of a running worker sends it (one notification per
    // model the run changed), once. The forwarder, started now, forwards the event too.
    h.bus.ensure_streams(&h.config.streams, &h.store).await.unwrap();
    h.start_all();
    let notifications = || {
        let hits = receiver.hits().into_iter().map(|hit| hit.json());
        let mut sent: Vec<(String, Value)> = hits
            .filter(|body| body["type"] == "sync")
            .map(|body| {
                (
                    body["model"].as_str().unwrap().to_string(),
                    body["responseResults"].clone(),
                )
            })
            .collect();
        sent.sort_by(|a, b| a.0.cmp(&b.0));
        sent
    };
    eventually("the notifications", Duration::from_secs(30), || async {
        (notifications().len() >= 2).then_some(())
    })
    .await;
    eventually("the outbox to be empty", Duration::from_secs(10), || async {
        outbox(&h).await.is_empty().then_some(())
    })
    .await;
    forwarding_idle(&h).await;
    let added = json!({"added": 1, "updated": 0, "deleted": 0});
    assert_eq!(
        notifications(),
        vec![("Contact".to_string(), added.clone()), ("Run".to_string(), added)]
    );
}

/// A name is checked as it is set, as before each attempt: one that does not resolve,
/// or resolves to an address the configuration refuses, is set with a warning.
#[tokio::test]
async fn setting_a_destination_warns_of_a_name_its_deliveries_would_fail_on() {
    let h = harness_with(None, 1, |_| {}).await;
    // The answer to setting `urls` at `path`.
    let set = |path: &'static str, urls: Value| {
        let request = h.request(Method::PUT, path).json(&json!({ "urls": urls }));
        async move { request.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let answer = set(
        "/forwarding",
        json!(["http://app.invalid/hook", "http://localhost:9/x"]),
    )
    .await;
    let data = &answer["data"];
    assert_eq!(
        data["urls"],
        json!(["http://app.invalid/hook", "http://localhost:9/x"]),
        "{answer}"
    );
    let warnings: Vec<&str> = data["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap())
        .collect();
    assert_eq!(warnings.len(), 2, "{answer}");
    assert!(
        warnings[0].starts_with("http://app.invalid/hook: app.invalid does not resolve: ")
            && warnings[0].ends_with("; deliveries to it fail and are retried until it does"),
        "{answer}"
    );
    assert!(
        warnings[1].starts_with("http://localhost:9/x: localhost resolves to ")
            && warnings[1]
                .contains("a loopback address (forwarding.allow_loopback allows it); deliveries to it are refused"),
        "{answer}"
    );
    // Only when set: reading the settings does not resolve anything.
    let shown = h.api_get("/forwarding").await;
    assert!(shown["data"].get("warnings").is_none(), "{shown}");
    let answer = set(
        "/connections/c0/forwarding?provider_config_key=crm",
        json!(["http://93.184.216.34/x"]),
    )
    .await;
    assert_eq!(answer["data"]["urls"], json!(["http://93.184.216.34/x"]), "{answer}");
    assert!(
        answer["data"].get("warnings").is_none(),
        "an address has no name to resolve: {answer}"
    );
    let answer = set(
        "/connections/c0/forwarding?provider_config_key=crm",
        json!(["https://app.invalid/c0"]),
    )
    .await;
    assert!(
        answer["data"]["warnings"][0]
            .as_str()
            .unwrap()
            .starts_with("https://app.invalid/c0: app.invalid does not resolve"),
        "{answer}"
    );
}

#[tokio::test]
async fn destinations_are_set_through_the_api_and_a_connection_may_override_them() {
    let h = harness_with(None, 2, forwarding_config).await;
    let environment_receiver = Receiver::start(&[]).await;
    let connection_receiver = Receiver::start(&[]).await;
    let put = |path: &str, body: Value| h.request(Method::PUT, path).json(&body).send();
    for (body, field) in [
        (
            json!({"urls": ["http://a.example/1", "http://a.example/2", "http://a.example/3"]}),
            "urls: at most 2",
        ),
        (json!({"urls": ["ftp://a.example/"]}), "scheme ftp is not http or https"),
        (json!({"urls": ["not a url"]}), "not a URL"),
        (
            json!({"urls": ["http://a example/"]}),
            "invalid international domain name",
        ),
        (json!({"urls": ["http://a.example:99999/"]}), "invalid port number"),
        (json!({"urls": ["http://"]}), "empty host"),
        (
            json!({"urls": ["http://a.example/1", "HTTP://A.example/1"]}),
            "\"HTTP://A.example/1\" is given twice",
        ),
        // An address is checked as it is set; a name before each attempt.
        (
            json!({"urls": ["http://169.254.169.254/latest"]}),
            "169.254.169.254 is a private, link-local or metadata address",
        ),
        (
            json!({"urls": [], "webhook_signing_key": "short"}),
            "webhook_signing_key",
        ),
    ] {
        let response = put("/forwarding", body).await.unwrap();
        assert_eq!(response.status(), 400);
        let answer: Value = response.json().await.unwrap();
        assert!(answer["error"]["message"].as_str().unwrap().contains(field), "{answer}");
    }
    let set = put("/forwarding", json!({"urls": [environment_receiver.url]}))
        .await
        .unwrap();
    assert_eq!(set.status(), 200);
    let own_key = "connection-c1-signing-key";
    let set = put(
        "/connections/c1/forwarding?provider_config_key=crm",
        json!({"urls": [connection_receiver.url], "webhook_signing_key": own_key}),
    )
    .await
    .unwrap();
    assert_eq!(set.status(), 200);
    let missing = put(
        "/connections/nobody/forwarding?provider_config_key=crm",
        json!({"urls": []}),
    )
    .await
    .unwrap();
    assert_eq!(missing.status(), 404);
    let shown = h.api_get("/connections/c1/forwarding?provider_config_key=crm").await;
    assert_eq!(
        shown["data"],
        json!({"urls": [connection_receiver.url], "has_signing_key": true, "always_notify": false, "async_action_webhooks": true, "auth_webhooks": true})
    );

    h.start_all();
    h.publish([(1, "c0", "any", json!({"n": 1})), (2, "c1", "any", json!({"n": 2}))])
        .await;
    let to_environment = environment_receiver.wait_hits(1).await;
    let to_connection = connection_receiver.wait_hits(1).await;
    assert_eq!(
        serde_json::from_slice::<Value>(&to_environment[0].body).unwrap()["connectionId"],
        "c0"
    );
    let hit = &to_connection[0];
    assert_eq!(
        serde_json::from_slice::<Value>(&hit.body).unwrap()["connectionId"],
        "c1"
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(own_key.as_bytes()).unwrap();
    mac.update(&hit.body);
    assert_eq!(
        hit.header("x-nango-hmac-sha256"),
        hex::encode(mac.finalize().into_bytes()),
        "signed with its own key"
    );
}

#[tokio::test]
async fn an_unrouted_webhook_goes_raw_and_once() {
    let h = harness_with(None, 1, forwarding_config).await;
    let receiver = Receiver::start(&[]).await;
    forward_to(&h, &[&receiver.url]).await;
    h.start_all();
    // A webhook of two events that matched no connection: its raw body goes once.
    let raw = br#"[{"id":1},  {"id":2}]"#;
    let sequence = store_raw(&h, raw, &[("content-type", "application/json; charset=utf-8")]).await;
    for index in 0..2 {
        let event = hookyard_core::routed::RoutedEvent {
            environment: "dev".parse().unwrap(),
            integration: "crm".parse().unwrap(),
            connection_id: None,
            unrouted: Some("no connection matches".into()),
            raw_seq: sequence,
            index,
            event_type: None,
            delivery_id: "raw-1".into(),
            payload: json!({"id": index + 1}),
            traceparent: None,
            origin: Default::default(),
        };
        let (subject, headers, payload) = event.to_message();
        h.bus
            .jetstream
            .publish_with_headers(subject, headers, payload)
            .await
            .unwrap()
            .await
            .unwrap();
    }
    receiver.wait_hits(1).await;
    forwarding_idle(&h).await;
    let hits = receiver.hits();
    assert_eq!(hits.len(), 1, "one forward for the webhook, not one per unrouted event");
    assert_eq!(hits[0].body, raw.to_vec(), "the provider's body, byte for byte");
    assert_eq!(hits[0].header("content-type"), "application/json; charset=utf-8");
}

#[tokio::test]
async fn an_integration_with_forwarding_off_forwards_nothing() {
    let h = harness_with(None, 1, forwarding_config).await;
    let receiver = Receiver::start(&[]).await;
    forward_to(&h, &[&receiver.url]).await;
    let off = hookyard_core::store::IntegrationChanges {
        forward_webhooks: Some(false),
        ..Default::default()
    };
    h.store
        .update_integration(h.environment.id, &"crm".parse().unwrap(), &off)
        .await
        .unwrap();
    h.start_all();
    h.publish((1..=5).map(|n| (n, "c0", "any", json!({"n": n})))).await;
    forwarding_idle(&h).await;
    let mut deliveries = h
        .bus
        .jetstream
        .get_stream(hookyard_core::streams::FWD_STREAM)
        .await
        .unwrap();
    assert_eq!(
        deliveries.info().await.unwrap().state.messages,
        0,
        "no delivery was queued"
    );
    assert!(receiver.hits().is_empty());
}

#[tokio::test]
async fn each_forwarding_attempt_shows_in_the_webhooks_operation_log() {
    let h = harness_with(None, 1, forwarding_config).await;
    let receiver = Receiver::start(&[(500, None)]).await;
    forward_to(&h, &[&receiver.url]).await;
    h.start_all();
    let webhooks = h.start_edge().await;
    let sent = h
        .http
        .post(format!("{webhooks}/crm"))
        .json(&json!({"type": "contact.updated", "n": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 202);
    receiver.wait_hits(2).await;
    let steps = eventually("both attempts in the log", Duration::from_secs(20), || async {
        let listed = h.api_get("/logs").await;
        let id = listed["data"][0]["id"].as_i64()?;
        let shown = h.api_get(&format!("/logs/{id}")).await;
        let forwards: Vec<Value> = shown["data"]["steps"]
            .as_array()?
            .iter()
            .filter(|s| s["stage"] == "forward")
            .cloned()
            .collect();
        (forwards.len() == 2).then_some(forwards)
    })
    .await;
    assert_eq!(
        (steps[0]["status"].as_str(), steps[0]["detail"]["status_code"].as_u64()),
        (Some("failed"), Some(500))
    );
    assert_eq!(
        (steps[1]["status"].as_str(), steps[1]["detail"]["status_code"].as_u64()),
        (Some("delivered"), Some(200))
    );
    for step in &steps {
        assert_eq!(step["connection_id"], "c0");
        assert_eq!(step["detail"]["url"], receiver.url);
    }
    assert_eq!(steps[1]["detail"]["attempt"], 2);
    let failed = h.api_get("/logs?status=failed").await;
    assert_eq!(
        failed["data"].as_array().unwrap().len(),
        1,
        "a webhook with a failed attempt is found by status=failed"
    );
}

#[tokio::test]
async fn a_given_up_delivery_is_redriven_with_the_same_webhook_id_and_delivered_once() {
    let h = harness_with(None, 1, three_attempts).await;
    // Three attempts, all refused: the delivery is given up.
    let receiver = Receiver::start(&[(500, None), (500, None), (500, None)]).await;
    forward_to(&h, &[&receiver.url]).await;
    h.start_all();
    h.start_router(h.shutdown.clone());
    webhook(&h, &json!({"n": 1}), &[]).await;
    let letter = eventually("the given-up delivery's letter", Duration::from_secs(30), || async {
        let listed = h.api_get("/dead-letters?kind=forward").await;
        listed["data"].as_array().and_then(|l| l.first().cloned())
    })
    .await;
    assert_eq!(letter["attempts"], 3, "{letter}");
    let id = letter["id"].as_i64().unwrap();
    // Attempts are recorded by a writer of their own, so the letter can show before
    // its last attempt does.
    let shown = eventually("the letter's three attempts", Duration::from_secs(10), || async {
        let shown = h.api_get(&format!("/dead-letters/{id}")).await;
        (shown["data"]["attempts"].as_array()?.len() == 3).then_some(shown)
    })
    .await;
    assert_eq!(shown["data"]["attempts"][2]["status"], 500);

    // The receiver is fixed (it answers 200 from now on); the letter is redriven.
    let redrive = h
        .request(Method::POST, "/dead-letters/redrive")
        .json(&json!({"kind": "forward"}))
        .send()
        .await
        .unwrap();
    assert_eq!(redrive.status(), 200);
    let hits = receiver.wait_hits(4).await;
    forwarding_idle(&h).await;
    assert_eq!(receiver.hits().len(), 4, "delivered once more, no more");
    assert_eq!(
        hits[3].header("webhook-id"),
        hits[0].header("webhook-id"),
        "the same webhook-id"
    );
    assert_eq!(hits[3].body, hits[0].body);
    let shown = eventually("the redrive recorded", Duration::from_secs(10), || async {
        let shown = h.api_get(&format!("/dead-letters/{id}")).await;
        (shown["data"]["redrives"] == 1).then_some(shown)
    })
    .await;
    assert!(shown["data"]["redrive_error"].is_null(), "{shown}");
    let letters = h.api_get("/dead-letters").await;
    assert_eq!(
        letters["data"].as_array().unwrap().len(),
        1,
        "the redrive succeeded: no new letter"
    );
}
