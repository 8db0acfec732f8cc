//! Ingest and the router on a three-node NATS cluster with replicated streams
//! (`streams.replicas = 3`), through the loss of a node: killed (SIGKILL) while webhooks
//! are being posted.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use common::{demo_store, serve_ingest, test_config, Served};
use futures::FutureExt as _;
use hookyard_core::routed::RoutedEvent;
use hookyard_core::streams::{Bus, CONN_STREAM, RAW_STREAM};
use hookyard_core::Envelope;
use hookyard_router::Router;
use hookyard_testkit::{eventually, NatsCluster, SqliteFile};
use tokio_util::sync::CancellationToken;

/// How one post was answered.
struct Answer {
    index: usize,
    status: u16,
    retry_after: bool,
    sent: Instant,
    took: Duration,
}

/// What a run of posts through a node's death saw.
struct Outage {
    answers: Vec<Answer>,
    killed_at: Instant,
    /// How long after the kill `HOOKS_RAW` was seen led by another node.
    led_again_after: Duration,
}

/// Posts webhooks `range` (body `webhook {i}`) from 8 senders at once and kills the node
/// `kill` once `kill_after` of them are answered.
async fn post_and_kill(
    url: &str,
    range: std::ops::Range<usize>,
    kill_after: usize,
    cluster: &mut NatsCluster,
    kill: &str,
    bus: &Bus,
) -> Outage {
    let next = Arc::new(AtomicUsize::new(range.start));
    let (answers_tx, mut answers_rx) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..8 {
        let (next, answers, url, end) = (next.clone(), answers_tx.clone(), url.to_string(), range.end);
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= end {
                    return;
                }
                let sent = Instant::now();
                let response = http.post(&url).body(format!("webhook {index}")).send().await.unwrap();
                let _ = answers.send(Answer {
                    index,
                    status: response.status().as_u16(),
                    retry_after: response.headers().contains_key("retry-after"),
                    sent,
                    took: sent.elapsed(),
                });
            }
        });
    }
    drop(answers_tx);
    let mut answers = Vec::new();
    let mut killed = None;
    while let Some(answer) = answers_rx.recv().await {
        answers.push(answer);
        if answers.len() == kill_after {
            cluster.node(kill).stop();
            let killed_at = Instant::now();
            // Asked every 25 ms, each question given up after 200 ms: the election's end
            // is seen within about a quarter second.
            let jetstream = jetstream::ContextBuilder::new()
                .timeout(Duration::from_millis(200))
                .build(bus.client.clone());
            let kill = kill.to_string();
            let led_again = tokio::spawn(async move {
                eventually("HOOKS_RAW to be led again", Duration::from_secs(60), || async {
                    raw_leader_now(&jetstream).await.filter(|leader| *leader != kill)
                })
                .await;
                killed_at.elapsed()
            });
            killed = Some((killed_at, led_again));
        }
    }
    let (killed_at, led_again) = killed.expect("the node was killed");
    Outage {
        answers,
        killed_at,
        led_again_after: led_again.await.unwrap(),
    }
}

impl Outage {
    /// How long after the kill the first post sent after it was answered 202.
    fn first_taken_after_kill(&self) -> Option<Duration> {
        self.answers
            .iter()
            .filter(|a| a.sent > self.killed_at && a.status == 202)
            .map(|a| a.sent + a.took - self.killed_at)
            .min()
    }

    /// How long after the kill the last answer came.
    fn last_answer_after_kill(&self) -> Duration {
        self.answers
            .iter()
            .map(|a| (a.sent + a.took).saturating_duration_since(self.killed_at))
            .max()
            .unwrap()
    }

    fn describe(&self) -> String {
        format!(
            "led again after {:?}; the first post sent after the kill taken after {:?}, the last answer after {:?}; {} of {} answered 503",
            self.led_again_after,
            self.first_taken_after_kill(),
            self.last_answer_after_kill(),
            self.answers.iter().filter(|a| a.status == 503).count(),
            self.answers.len()
        )
    }
}

/// The server leading `HOOKS_RAW`, if it has one that answers.
async fn raw_leader_now(jetstream: &jetstream::Context) -> Option<String> {
    let stream = jetstream.get_stream(RAW_STREAM).await.ok()?;
    stream.cached_info().cluster.as_ref()?.leader.clone()
}

/// The server leading `HOOKS_RAW`, once there is one.
async fn raw_leader(bus: &Bus) -> String {
    eventually("HOOKS_RAW to have a leader", Duration::from_secs(30), || {
        raw_leader_now(&bus.jetstream)
    })
    .await
}

/// The leader of `HOOKS_RAW`, made to step down if it is `node`.
async fn leader_other_than(bus: &Bus, node: &str) -> String {
    if raw_leader(bus).await == node {
        bus.client
            .request(format!("$JS.API.STREAM.LEADER.STEPDOWN.{RAW_STREAM}"), "".into())
            .await
            .unwrap();
    }
    eventually("a leader on another node", Duration::from_secs(30), || async {
        Some(raw_leader(bus).await).filter(|leader| leader != node)
    })
    .await
}

/// Waits until `HOOKS_RAW` has a leader and both other replicas are current.
async fn fully_replicated(bus: &Bus) {
    eventually(
        "HOOKS_RAW's replicas to be current",
        Duration::from_secs(60),
        || async {
            let mut stream = bus.jetstream.get_stream(RAW_STREAM).await.ok()?;
            let info = stream.info().await.ok()?;
            let cluster = info.cluster.as_ref()?;
            (cluster.leader.is_some() && cluster.replicas.len() == 2 && cluster.replicas.iter().all(|r| r.current))
                .then_some(())
        },
    )
    .await
}

/// Every message stored in `stream`, in order. (A stream that lost its leader with a
/// node answers 503 until it has elected another.)
async fn stored(bus: &Bus, stream: &str) -> Vec<jetstream::message::StreamMessage> {
    let within = Duration::from_secs(30);
    let stream = eventually("the stream to answer", within, || {
        bus.jetstream.get_stream(stream).map(Result::ok)
    })
    .await;
    let last = stream.cached_info().state.last_sequence;
    let mut messages = Vec::new();
    for sequence in 1..=last {
        let read = || stream.get_raw_message(sequence).map(Result::ok);
        messages.push(eventually("a stored message", within, read).await);
    }
    messages
}

async fn post_delivery(http: &reqwest::Client, url: &str, id: &str) -> serde_json::Value {
    let response = http
        .post(url)
        .header("webhook-id", id)
        .body("the same delivery")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);
    response.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_webhook_is_kept_and_routed_once_through_the_loss_of_a_node() {
    const EACH: usize = 300;
    let mut cluster = NatsCluster::start(3);
    let sqlite = SqliteFile::create();
    let mut config = test_config(&cluster.nodes[0], &sqlite.url);
    config.nats_url = cluster.urls();
    config.streams.replicas = 3;
    // Longer than an election (here 4–8 s after the leader dies).
    config.ingest.publish_timeout = Duration::from_secs(30);
    let bus = Bus::connect(&config, "test").await.unwrap();
    eventually(
        "the cluster to take replicated streams",
        Duration::from_secs(60),
        || async { bus.ensure_streams(&config.streams).await.ok() },
    )
    .await;
    let (store, environment) = demo_store(&config, &[]).await;
    let Served {
        bus: ingest_bus, base, ..
    } = serve_ingest(&config, &store).await;
    // The router on a connection of its own; a webhook it took when its node died is
    // handed to it again after `router.ack_wait`.
    config.router.ack_wait = Duration::from_secs(5);
    let router_bus = Bus::connect(&config, "test-router").await.unwrap();
    let router = Arc::new(Router::new(store.clone(), &router_bus, &config).unwrap());
    let stop_router = CancellationToken::new();
    let routing = tokio::spawn(router.run(stop_router.clone()));
    let url = format!("{base}/webhook/{}/demo", environment.webhook_id);
    let http = reqwest::Client::new();
    assert_eq!(post_delivery(&http, &url, "failover-1").await["duplicate"], false);

    // 1. The stream's leader dies, on a node ingest is not connected to: a new leader is
    //    elected while publishes wait, and ingest's retries (same message id) reach it.
    let connected = ingest_bus.client.server_info().server_name;
    let leader = leader_other_than(&bus, &connected).await;
    let outage = post_and_kill(&url, 0..EACH, EACH / 3, &mut cluster, &leader, &bus).await;
    eprintln!("leader {leader} killed: {}", outage.describe());
    let refused: Vec<usize> = outage
        .answers
        .iter()
        .filter(|a| a.status != 202)
        .map(|a| a.index)
        .collect();
    assert!(
        refused.is_empty(),
        "answered other than 202 through an election: {refused:?}"
    );
    assert!(
        outage.first_taken_after_kill() > Some(Duration::from_millis(500)),
        "no publish waited for the election: the kill tested nothing"
    );
    // An attempt the old leader's followers took unanswered is retried after at most a
    // second: every webhook held up by the election is answered soon after it (not
    // after half the publish timeout).
    assert!(
        outage.last_answer_after_kill() < outage.led_again_after + Duration::from_secs(3),
        "answers lagged the election: {}",
        outage.describe()
    );
    assert_ne!(raw_leader(&bus).await, leader);
    // The duplicate window lives on in the new leader.
    assert_eq!(post_delivery(&http, &url, "failover-1").await["duplicate"], true);

    // 2. The node ingest is connected to dies, not the leader: requests that find ingest
    //    disconnected are answered 503 with Retry-After, and a provider's retry of them
    //    is taken once ingest has reconnected to another node, without a restart.
    cluster.node(&leader).restart();
    fully_replicated(&bus).await;
    let connected = ingest_bus.client.server_info().server_name;
    leader_other_than(&bus, &connected).await;
    let outage = post_and_kill(&url, EACH..2 * EACH, EACH / 3, &mut cluster, &connected, &bus).await;
    let mut retried = 0;
    for answer in &outage.answers {
        assert!(
            answer.status == 202 || (answer.status == 503 && answer.retry_after),
            "webhook {} answered {}",
            answer.index,
            answer.status
        );
        if answer.status == 503 {
            retried += 1;
            let body = format!("webhook {}", answer.index);
            eventually("a retried webhook to be accepted", Duration::from_secs(30), || async {
                let response = http.post(&url).body(body.clone()).send().await.ok()?;
                (response.status().as_u16() == 202).then_some(())
            })
            .await;
        }
    }
    assert_ne!(ingest_bus.client.server_info().server_name, connected);
    eprintln!("{connected} killed under ingest: {}", outage.describe());

    // Every webhook once, whichever node took it; the delivery posted twice once.
    let raw = stored(&bus, RAW_STREAM).await;
    let mut bodies: Vec<String> = raw
        .into_iter()
        .map(|m| {
            let envelope = Envelope::from_message(&m.subject, Some(&m.headers), m.payload).unwrap();
            String::from_utf8(envelope.body.to_vec()).unwrap()
        })
        .collect();
    let stored_count = bodies.len() as u64;
    bodies.sort();
    let mut expected: Vec<String> = (0..2 * EACH).map(|i| format!("webhook {i}")).collect();
    expected.push("the same delivery".into());
    expected.sort();
    assert_eq!(bodies, expected, "{retried} webhooks were retried after a 503");

    // And each routed once, though the router's connection or its consumer's leader
    // went down with a node.
    eventually(
        "the router to have routed every webhook",
        Duration::from_secs(60),
        || async {
            hookyard_router::acked_through(&bus.jetstream, stored_count)
                .await
                .ok()
                .filter(|done| *done)
        },
    )
    .await;
    // Here 3–13 s with `router.ack_wait` at 5 s. A lost pull request used to leave the
    // router idle until the pull expired, 35 s (see `streams::pull`).
    let caught_up = outage.killed_at.elapsed();
    eprintln!("every webhook routed {caught_up:?} after the kill");
    assert!(caught_up < Duration::from_secs(25), "the router stalled: {caught_up:?}");
    assert!(!routing.is_finished(), "the router stopped: {:?}", routing.await);
    let mut routed: Vec<u64> = stored(&bus, CONN_STREAM)
        .await
        .into_iter()
        .map(|m| {
            RoutedEvent::from_message(&m.subject, Some(&m.headers), &m.payload)
                .unwrap()
                .raw_seq
        })
        .collect();
    routed.sort();
    assert_eq!(routed, (1..=stored_count).collect::<Vec<_>>());
    stop_router.cancel();
}
