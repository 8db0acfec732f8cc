//! ingest against a real nats-server and real stores: durability before the answer,
//! deduplication, the error answers, NATS outages and saturation.

mod common;

use std::time::{Duration, Instant};

use futures::StreamExt;

use common::{add_integration, assert_error, start_ingest};
use hookyard_core::streams::RAW_STREAM;
use hookyard_testkit::{eventually, PgDatabase};

#[tokio::test]
async fn webhook_is_stored_exactly_before_the_answer() {
    let ingest = start_ingest(None, |_| {}).await;
    let body: &[u8] = b"{\"zen\": \"Keep it logically awesome.\"}\n\x00\xff raw bytes";
    let response = ingest
        .http
        .post(format!(
            "{}/extra/part?installation=42&b=%20x",
            ingest.webhook_url("demo")
        ))
        .header("content-type", "application/json")
        .header("x-github-event", "ping")
        .header("x-github-delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958")
        .header("x-repeated", "one")
        .header("x-repeated", "two")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);
    let answer: serde_json::Value = response.json().await.unwrap();
    assert_eq!(answer["delivery_id"], "72d3162e-cc78-11e3-81ab-4c9367dc0958");
    assert_eq!(answer["duplicate"], false);

    // The 2xx came after the ack, so the envelope is already in the stream.
    assert_eq!(ingest.raw_count().await, 1);
    let envelope = ingest.raw_envelope(1).await;
    assert_eq!(&envelope.body[..], body, "body bytes kept exactly");
    assert_eq!(envelope.environment.as_str(), "dev");
    assert_eq!(envelope.integration.as_str(), "demo");
    assert_eq!(envelope.method, "POST");
    assert_eq!(envelope.path.as_deref(), Some("extra/part"));
    assert_eq!(envelope.query.as_deref(), Some("installation=42&b=%20x"));
    let header = |name: &str| -> Vec<&str> {
        envelope
            .headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    assert_eq!(header("x-github-event"), vec!["ping"]);
    assert_eq!(header("content-type"), vec!["application/json"]);
    assert_eq!(header("x-repeated"), vec!["one", "two"]);
}

#[tokio::test]
async fn one_delivery_is_stored_once() {
    let ingest = start_ingest(None, |_| {}).await;
    let send = |delivery: &'static str, body: &'static [u8]| {
        ingest
            .http
            .post(ingest.webhook_url("demo"))
            .header("x-github-delivery", delivery)
            .body(body)
            .send()
    };
    assert_eq!(send("d-1", b"first").await.unwrap().status().as_u16(), 202);
    let retry = send("d-1", b"first").await.unwrap();
    assert_eq!(retry.status().as_u16(), 202, "a provider retry is still acknowledged");
    assert_eq!(retry.json::<serde_json::Value>().await.unwrap()["duplicate"], true);
    assert_eq!(ingest.raw_count().await, 1);

    // Without a delivery id, identical requests are one delivery; different ones are not.
    assert_eq!(ingest.post("demo", b"same").await.status().as_u16(), 202);
    assert_eq!(ingest.post("demo", b"same").await.status().as_u16(), 202);
    assert_eq!(ingest.raw_count().await, 2);
    assert_eq!(ingest.post("demo", b"other").await.status().as_u16(), 202);
    assert_eq!(ingest.raw_count().await, 3);
}

#[tokio::test]
async fn unknown_environment_or_integration_is_404() {
    let ingest = start_ingest(None, |_| {}).await;
    let unknown_env = format!("{}/webhook/{}/demo", ingest.base, uuid_like());
    let response = ingest.http.post(unknown_env).body("x").send().await.unwrap();
    assert_error(response, 404, "unknown_environment").await;
    let not_a_uuid = format!("{}/webhook/dev/demo", ingest.base);
    let response = ingest.http.post(not_a_uuid).body("x").send().await.unwrap();
    assert_error(response, 404, "unknown_environment").await;
    assert_error(ingest.post("nope", b"x").await, 404, "unknown_integration").await;
    // Other paths and methods answer JSON errors too; a 405 says which methods.
    let elsewhere = format!("{}/webhooks/demo", ingest.base);
    let response = ingest.http.post(elsewhere).body("x").send().await.unwrap();
    assert_error(response, 404, "not_found").await;
    let response = ingest
        .http
        .put(ingest.webhook_url("demo"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["allow"], "GET,HEAD,POST");
    assert_error(response, 405, "method_not_allowed").await;
    assert_eq!(ingest.raw_count().await, 0, "nothing published");
}

#[tokio::test]
async fn oversized_body_is_413() {
    let ingest = start_ingest(None, |c| {
        c.ingest.max_body_bytes = 4096;
        c.ingest.max_in_flight_bytes = 1 << 20;
    })
    .await;
    let big = vec![b'x'; 4097];
    let response = ingest
        .http
        .post(ingest.webhook_url("demo"))
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_error(response, 413, "payload_too_large").await;

    // Without a Content-Length (chunked), the limit holds while reading.
    let chunks = futures::stream::iter(
        big.chunks(1000)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let response = ingest
        .http
        .post(ingest.webhook_url("demo"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_error(response, 413, "payload_too_large").await;

    let exactly = vec![b'y'; 4096];
    let response = ingest
        .http
        .post(ingest.webhook_url("demo"))
        .body(exactly)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202, "a body at the limit is accepted");
    assert_eq!(ingest.raw_count().await, 1);
}

#[tokio::test]
async fn get_and_head_reach_the_handler() {
    let ingest = start_ingest(None, |_| {}).await;
    let url = format!("{}/sub/path?challenge=abc", ingest.webhook_url("demo"));
    assert_eq!(ingest.http.get(&url).send().await.unwrap().status().as_u16(), 200);
    assert_eq!(ingest.http.head(&url).send().await.unwrap().status().as_u16(), 200);
    let unknown = ingest.http.get(ingest.webhook_url("nope")).send().await.unwrap();
    assert_error(unknown, 404, "unknown_integration").await;
    let put = ingest.http.put(ingest.webhook_url("demo")).send().await.unwrap();
    assert_eq!(put.status().as_u16(), 405);
}

#[tokio::test]
async fn nats_down_is_503_and_ingest_recovers_when_it_returns() {
    let mut ingest = start_ingest(None, |c| c.ingest.publish_timeout = Duration::from_millis(500)).await;
    assert_eq!(ingest.post("demo", b"before").await.status().as_u16(), 202);

    ingest.nats.stop();
    for body in [&b"during-1"[..], b"during-2", b"during-3"] {
        let response = ingest
            .http
            .post(ingest.webhook_url("demo"))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_error(response, 503, "unavailable").await;
    }
    let ready = ingest.http.get(format!("{}/readyz", ingest.base)).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 503);

    ingest.nats.restart();
    let url = format!("{}/readyz", ingest.base);
    eventually("ingest to be ready again", Duration::from_secs(20), || async {
        let status = ingest.http.get(&url).send().await.ok()?.status();
        (status == 200).then_some(())
    })
    .await;
    assert_eq!(ingest.post("demo", b"after").await.status().as_u16(), 202);
    // The store survived the restart; nothing answered 503 was stored.
    assert_eq!(ingest.raw_count().await, 2);
    assert_eq!(&ingest.raw_envelope(2).await.body[..], b"after");
}

/// A cluster that is still electing its leaders, or a server too busy to answer, lets a
/// stream request time out. Ingest used to exit on that; now it asks again until
/// the streams are set up, and still stops at once when told to.
#[tokio::test]
async fn an_ingest_started_while_nats_does_not_answer_starts_when_it_does() {
    use hookyard_ingest::{Ingest, StartError};
    use tokio_util::sync::CancellationToken;
    let ingest = start_ingest(None, |_| {}).await;
    ingest.nats.pause();
    let start = |shutdown: &CancellationToken| {
        let (config, store, bus, shutdown) = (
            ingest.config.clone(),
            ingest.store.clone(),
            ingest.bus.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move { Ingest::start(&config, store, bus, shutdown).await })
    };
    let (stop_first, stop_second) = (CancellationToken::new(), CancellationToken::new());
    let (mut first, mut second) = (start(&stop_first), start(&stop_second));
    // Past the first request's failure: it timed out after 10 s, and start used to
    // return that error.
    let waited = tokio::time::timeout(Duration::from_secs(12), &mut first).await;
    assert!(
        waited.is_err(),
        "start gave up: {:?}",
        waited.map(|r| r.map(|s| s.err()))
    );
    assert!(
        !second.is_finished(),
        "start gave up: {:?}",
        (&mut second).await.map(|s| s.err())
    );
    // Told to stop, it does not wait out a request.
    stop_first.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(3), first).await;
    assert!(
        matches!(stopped, Ok(Ok(Err(StartError::Stopped)))),
        "{:?}",
        stopped.map(|r| r.map(|s| s.err()))
    );

    ingest.nats.resume();
    let started = tokio::time::timeout(Duration::from_secs(20), second)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let serving = tokio::spawn(hookyard_ingest::serve(listener, started, stop_second.clone()));
    let url = ingest.webhook_url("demo").replace(&ingest.base, &base);
    let response = ingest.http.post(url).body("after the wait").send().await.unwrap();
    assert_eq!(response.status().as_u16(), 202);
    assert_eq!(&ingest.raw_envelope(1).await.body[..], b"after the wait");
    stop_second.cancel();
    serving.await.unwrap().unwrap();
}

/// During a stream-leader election a publish can go unanswered. Ingest gives up on an
/// ack at half the publish timeout and publishes again with the same message id, so
/// the webhook is answered 202 once the stream answers again, and stored once.
#[tokio::test]
async fn an_unanswered_publish_is_retried_with_the_same_id_within_the_timeout() {
    let ingest = start_ingest(None, |c| c.ingest.publish_timeout = Duration::from_secs(3)).await;
    // Every attempt is also seen by a plain subscriber on the subject. (Its interest
    // also means the server answers "no responders" to nobody: with the stream gone,
    // an attempt simply goes unanswered, as during an election.)
    let mut attempts = ingest.bus.client.subscribe("hooks.raw.>").await.unwrap();
    ingest.bus.client.flush().await.unwrap();
    ingest.jetstream.delete_stream(RAW_STREAM).await.unwrap();

    let sending = tokio::spawn(ingest.http.post(ingest.webhook_url("demo")).body("retried").send());
    let within = Duration::from_secs(10);
    let first = tokio::time::timeout(within, attempts.next()).await.unwrap().unwrap();
    // The server had already found no stream for that attempt when it reached us.
    let started = std::time::Instant::now();
    ingest
        .bus
        .ensure_streams(&ingest.config.streams, &ingest.store)
        .await
        .unwrap();

    let response = tokio::time::timeout(within, sending).await.unwrap().unwrap().unwrap();
    assert_eq!(response.status().as_u16(), 202);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "answered within the publish timeout"
    );
    let retry = tokio::time::timeout(within, attempts.next()).await.unwrap().unwrap();
    let id = |m: &async_nats::Message| {
        m.headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.to_string())
    };
    assert!(id(&first).is_some());
    assert_eq!(id(&first), id(&retry), "a retry keeps the message id");
    assert_eq!(ingest.raw_count().await, 1);
    assert_eq!(&ingest.raw_envelope(1).await.body[..], b"retried");
}

#[tokio::test]
async fn unanswered_publish_is_503_never_2xx() {
    let ingest = start_ingest(None, |c| c.ingest.publish_timeout = Duration::from_millis(300)).await;
    ingest.nats.pause();
    let response = ingest.post("demo", b"frozen").await;
    ingest.nats.resume();
    assert_error(response, 503, "unavailable").await;
}

#[tokio::test]
async fn saturated_ingest_refuses_instead_of_queueing() {
    let ingest = start_ingest(None, |c| {
        c.ingest.max_in_flight = 4;
        c.ingest.publish_timeout = Duration::from_secs(30);
    })
    .await;
    ingest.nats.pause();
    let stuck: Vec<_> = (0..4)
        .map(|i| {
            let request = ingest.http.post(ingest.webhook_url("demo")).body(format!("stuck-{i}"));
            tokio::spawn(request.send())
        })
        .collect();
    let health = format!("{}/healthz", ingest.base);
    eventually("4 requests in flight", Duration::from_secs(10), || async {
        let body: serde_json::Value = ingest.http.get(&health).send().await.ok()?.json().await.ok()?;
        (body["in_flight"] == 4).then_some(())
    })
    .await;
    for i in 0..20 {
        let response = ingest
            .http
            .post(ingest.webhook_url("demo"))
            .body(format!("extra-{i}"))
            .send()
            .await
            .unwrap();
        assert_error(response, 503, "saturated").await;
    }
    ingest.nats.resume();
    for request in stuck {
        assert_eq!(request.await.unwrap().unwrap().status().as_u16(), 202);
    }
    assert_eq!(ingest.raw_count().await, 4, "only the admitted requests were stored");
}

#[tokio::test]
async fn settings_changes_are_seen_without_a_restart_and_survive_a_store_outage() {
    let db = PgDatabase::create().await;
    let ingest = start_ingest(Some(&db.url), |_| {}).await;
    assert_error(ingest.post("late", b"x").await, 404, "unknown_integration").await;
    add_integration(&ingest.store, &ingest.environment, "late").await;
    eventually("the new integration to be served", Duration::from_secs(10), || async {
        (ingest.post("late", b"y").await.status() == 202).then_some(())
    })
    .await;
    ingest
        .store
        .delete_integration(ingest.environment.id, &"late".parse().unwrap())
        .await
        .unwrap();
    eventually(
        "the deleted integration to be refused",
        Duration::from_secs(10),
        || async { (ingest.post("late", b"z").await.status() == 404).then_some(()) },
    )
    .await;

    // Postgres gone: the hot path never needed it, so webhooks keep being accepted.
    db.drop_now().await;
    for body in [&b"pg-down-1"[..], b"pg-down-2"] {
        let response = ingest
            .http
            .post(ingest.webhook_url("demo"))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 202);
    }
}

/// An integration created a moment ago is served at once (a provider pings its new URL
/// right away), without waiting for the settings' next refresh: a miss reloads them.
/// Misses reload at most once a second, so a scan of made-up paths is no query each.
#[tokio::test]
async fn an_integration_created_a_moment_ago_is_served_at_once() {
    let ingest = start_ingest(None, |config| {
        config.ingest.settings_refresh = Duration::from_secs(3600)
    })
    .await;
    add_integration(&ingest.store, &ingest.environment, "fresh").await;
    let first_miss = Instant::now();
    assert_eq!(ingest.post("fresh", b"ping").await.status().as_u16(), 202);

    // The miss just now reloaded; the next one within the second does not. (A machine
    // so loaded that the second is over by then cannot show it: the reload is due.)
    assert_error(ingest.post("made-up", b"x").await, 404, "unknown_integration").await;
    add_integration(&ingest.store, &ingest.environment, "second").await;
    let second = ingest.post("second", b"x").await;
    if first_miss.elapsed() < Duration::from_secs(1) {
        assert_error(second, 404, "unknown_integration").await;
    }
    eventually("a later miss to reload", Duration::from_secs(10), || async {
        (ingest.post("second", b"y").await.status() == 202).then_some(())
    })
    .await;
}

#[tokio::test]
async fn shutdown_waits_for_in_flight_publishes() {
    let ingest = start_ingest(None, |c| c.ingest.publish_timeout = Duration::from_secs(30)).await;
    ingest.nats.pause();
    let in_flight = tokio::spawn(ingest.http.post(ingest.webhook_url("demo")).body("draining").send());
    let health = format!("{}/healthz", ingest.base);
    eventually("the request to be in flight", Duration::from_secs(10), || async {
        let body: serde_json::Value = ingest.http.get(&health).send().await.ok()?.json().await.ok()?;
        (body["in_flight"] == 1).then_some(())
    })
    .await;
    ingest.shutdown.cancel();
    ingest.nats.resume();
    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(response.status().as_u16(), 202, "the in-flight request finished");
    assert_eq!(ingest.raw_count().await, 1);
    ingest.server.await.unwrap().unwrap();
}

fn uuid_like() -> &'static str {
    "00000000-0000-4000-8000-000000000000"
}

#[tokio::test]
async fn the_path_is_kept_as_received_and_cannot_inject_headers() {
    let ingest = start_ingest(None, |_| {}).await;
    let url = format!(
        "{}/a%0d%0aNats-Msg-Id:%20forged/b%20c?x=%0d%0a",
        ingest.webhook_url("demo")
    );
    let response = ingest.http.post(url).body("payload").send().await.unwrap();
    assert_eq!(response.status().as_u16(), 202);
    let envelope = ingest.raw_envelope(1).await;
    assert_eq!(envelope.path.as_deref(), Some("a%0d%0aNats-Msg-Id:%20forged/b%20c"));
    assert_eq!(envelope.query.as_deref(), Some("x=%0d%0a"));
    assert!(envelope.delivery_id.starts_with("h:"), "{}", envelope.delivery_id);
    assert_eq!(&envelope.body[..], b"payload");
}

#[tokio::test]
async fn a_trickling_body_times_out_with_408_and_frees_its_place() {
    let ingest = start_ingest(None, |c| {
        c.ingest.body_read_timeout = Duration::from_millis(300);
        c.ingest.max_in_flight = 1;
    })
    .await;
    // One chunk, then nothing: the stream never ends.
    let stalled =
        futures::stream::iter([Ok::<_, std::io::Error>(b"{\"partial\":".to_vec())]).chain(futures::stream::pending());
    let response = ingest
        .http
        .post(ingest.webhook_url("demo"))
        .body(reqwest::Body::wrap_stream(stalled))
        .send()
        .await
        .unwrap();
    assert_error(response, 408, "body_timeout").await;
    // Its place is free again (max_in_flight is 1).
    assert_eq!(ingest.post("demo", b"next").await.status().as_u16(), 202);
    assert_eq!(ingest.raw_count().await, 1);
}
