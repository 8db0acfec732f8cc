//! The pipeline on a three-node NATS cluster with replicated streams
//! (`streams.replicas = 3`), through the loss of a node: killed (SIGKILL) while webhooks
//! are being posted (ingest and the router) or routed events published (the worker).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::jetstream::consumer::{self, pull};
use async_nats::jetstream::stream::ClusterInfo;
use common::pipeline::{harness_on, routed, sync, Harness};
use common::{demo_store, serve_ingest, test_config, Served};
use futures::FutureExt as _;
use hookyard_core::routed::RoutedEvent;
use hookyard_core::streams::{Bus, CONN_STREAM, RAW_STREAM};
use hookyard_core::{Config, Envelope};
use hookyard_router::Router;
use hookyard_testkit::{eventually, NatsCluster, PgDatabase, SqliteFile};
use serde_json::json;
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
            let http = hookyard_core::outbound::http_client().unwrap();
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
                    RAW.leader_now(&jetstream).await.filter(|leader| *leader != kill)
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

/// What JetStream elects a leader for: a stream, or a consumer of one.
#[derive(Clone, Copy, Debug)]
enum Replicated {
    Stream(&'static str),
    Consumer(&'static str, &'static str),
}

const RAW: Replicated = Replicated::Stream(RAW_STREAM);
const ROUTER: Replicated = Replicated::Consumer(RAW_STREAM, hookyard_router::CONSUMER);
const FUNCTIONS: Replicated = Replicated::Consumer(CONN_STREAM, hookyard_worker::CONSUMER);

impl Replicated {
    /// Its replicas as they are now; `None` while it has no leader that answers.
    async fn cluster(self, jetstream: &jetstream::Context) -> Option<ClusterInfo> {
        match self {
            Replicated::Stream(stream) => {
                let stream = jetstream.get_stream(stream).await.ok()?;
                stream.cached_info().cluster.clone()
            }
            Replicated::Consumer(..) => self.consumer_info(jetstream).await?.cluster,
        }
    }

    /// A consumer's info as the server gives it now; `None` for a stream, or while the
    /// consumer has no leader that answers.
    async fn consumer_info(self, jetstream: &jetstream::Context) -> Option<consumer::Info> {
        let Replicated::Consumer(stream, name) = self else {
            return None;
        };
        let stream = jetstream.get_stream(stream).await.ok()?;
        let consumer = stream.get_consumer::<pull::Config>(name).await.ok()?;
        Some(consumer.cached_info().clone())
    }

    /// What the server says of a consumer, for a failure's message.
    async fn state(self, bus: &Bus) -> String {
        match self.consumer_info(&bus.jetstream).await {
            Some(i) => format!(
                "{self:?}: {} pending, {} awaiting an ack, {} pull requests waiting, delivered {:?}, acked through {:?}, leader {:?}",
                i.num_pending,
                i.num_ack_pending,
                i.num_waiting,
                i.delivered,
                i.ack_floor,
                i.cluster.and_then(|c| c.leader),
            ),
            None => format!("{self:?}: no answer"),
        }
    }

    /// The server leading it, if it has one that answers.
    async fn leader_now(self, jetstream: &jetstream::Context) -> Option<String> {
        self.cluster(jetstream).await?.leader
    }

    /// The server leading it, once there is one.
    async fn leader(self, bus: &Bus) -> String {
        eventually(&format!("{self:?} to have a leader"), Duration::from_secs(30), || {
            self.leader_now(&bus.jetstream)
        })
        .await
    }

    /// Its leader, made to step down if it is `node`.
    async fn leader_other_than(self, bus: &Bus, node: &str) -> String {
        if self.leader(bus).await == node {
            let subject = match self {
                Replicated::Stream(stream) => format!("$JS.API.STREAM.LEADER.STEPDOWN.{stream}"),
                Replicated::Consumer(stream, consumer) => {
                    format!("$JS.API.CONSUMER.LEADER.STEPDOWN.{stream}.{consumer}")
                }
            };
            bus.client.request(subject, "".into()).await.unwrap();
        }
        eventually("a leader on another node", Duration::from_secs(30), || async {
            Some(self.leader(bus).await).filter(|leader| leader != node)
        })
        .await
    }

    /// Waits until it has a leader and both other replicas are current.
    async fn fully_replicated(self, bus: &Bus) {
        eventually(
            &format!("{self:?}'s replicas to be current"),
            Duration::from_secs(60),
            || async {
                let cluster = self.cluster(&bus.jetstream).await?;
                (cluster.leader.is_some() && cluster.replicas.len() == 2 && cluster.replicas.iter().all(|r| r.current))
                    .then_some(())
            },
        )
        .await
    }
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

/// A connection to `config`'s cluster, once the cluster has taken its replicated
/// streams: a new cluster elects its leaders first, and a service's setup waits for it.
async fn replicated_streams(config: &Config) -> Bus {
    let bus = Bus::connect(config, "test").await.unwrap();
    let never = CancellationToken::new();
    let sqlite = hookyard_testkit::SqliteFile::create();
    let store = hookyard_core::Store::connect(&sqlite.url, hookyard_testkit::test_cipher())
        .await
        .unwrap();
    let setup = bus.set_up_streams(&config.streams, &store, &never);
    let ready = tokio::time::timeout(Duration::from_secs(60), setup).await;
    assert!(matches!(ready, Ok(Ok(true))), "the streams were not set up: {ready:?}");
    bus
}

/// The pipeline harness (`connections` connections of `crm`) on a new three-node cluster,
/// once the cluster has taken its replicated streams.
async fn replicated_harness(database_url: Option<&str>, connections: usize) -> Harness<NatsCluster> {
    let cluster = NatsCluster::start(3);
    let urls = cluster.urls();
    let replicated = |config: &mut Config| {
        config.nats_url = urls.clone();
        config.streams.replicas = 3;
    };
    let mut config = Config::default();
    replicated(&mut config);
    replicated_streams(&config).await;
    harness_on(cluster, &urls, database_url, connections, replicated).await
}

/// Warnings (the pipeline's, async-nats's) in the test's output: shown when it fails.
fn show_warnings() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_test_writer()
        .try_init();
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
    show_warnings();
    let mut cluster = NatsCluster::start(3);
    let sqlite = SqliteFile::create();
    let mut config = test_config(&cluster.nodes[0], &sqlite.url);
    config.nats_url = cluster.urls();
    config.streams.replicas = 3;
    // Longer than an election (here 4–8 s after the leader dies).
    config.ingest.publish_timeout = Duration::from_secs(30);
    let bus = replicated_streams(&config).await;
    let (store, environment) = demo_store(&config, &[]).await;
    let Served {
        bus: ingest_bus,
        base,
        shutdown: stop_ingest,
        server: ingest,
    } = serve_ingest(&config, &store).await;
    // The router on a connection of its own; a webhook it took when its node died is
    // handed to it again after `router.ack_wait`.
    config.router.ack_wait = Duration::from_secs(5);
    let router_bus = Bus::connect(&config, "test-router").await.unwrap();
    let router = Arc::new(Router::new(store.clone(), &router_bus, &config).unwrap());
    let stop_router = CancellationToken::new();
    let routing = tokio::spawn(router.run(stop_router.clone()));
    // Consuming before any node dies: a consumer whose creation met an election stayed
    // without a leader here (its pulls answered "no responders" for over a minute).
    ROUTER.fully_replicated(&bus).await;
    let url = format!("{base}/webhook/{}/demo", environment.webhook_id);
    let http = hookyard_core::outbound::http_client().unwrap();
    assert_eq!(post_delivery(&http, &url, "failover-1").await["duplicate"], false);

    // 1. The stream's leader dies, on a node ingest is not connected to: a new leader is
    //    elected while publishes wait, and ingest's retries (same message id) reach it.
    let connected = ingest_bus.client.server_info().server_name;
    let leader = RAW.leader_other_than(&bus, &connected).await;
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
    assert_ne!(RAW.leader(&bus).await, leader);
    // The duplicate window lives on in the new leader.
    assert_eq!(post_delivery(&http, &url, "failover-1").await["duplicate"], true);

    // 2. The node ingest is connected to dies, not the leader: requests that find ingest
    //    disconnected are answered 503 with Retry-After, and a provider's retry of them
    //    is taken once ingest has reconnected to another node, without a restart.
    cluster.node(&leader).restart();
    RAW.fully_replicated(&bus).await;
    let connected = ingest_bus.client.server_info().server_name;
    RAW.leader_other_than(&bus, &connected).await;
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
    // Timed out outside, to say what the consumer looks like.
    let routed_all = eventually(
        "the router to have routed every webhook",
        Duration::from_secs(120),
        || async {
            assert!(!routing.is_finished(), "the router stopped");
            hookyard_router::acked_through(&bus.jetstream, stored_count)
                .await
                .ok()
                .filter(|done| *done)
        },
    );
    if tokio::time::timeout(Duration::from_secs(60), routed_all).await.is_err() {
        panic!(
            "the router has not routed every webhook within 60 s; {}",
            ROUTER.state(&bus).await
        );
    }
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
    stop_ingest.cancel();
    routing.await.unwrap().unwrap();
    ingest.await.unwrap().unwrap();
}

/// A node of `cluster` that is none of `not`.
fn node_other_than(cluster: &NatsCluster, not: &[&str]) -> String {
    let mut names = cluster.nodes.iter().map(|node| node.name());
    names.find(|name| !not.contains(name)).unwrap().to_string()
}

/// Connections the worker test's events are spread over.
const CONNECTIONS: u64 = 4;

/// Publishes the routed events `range` (payload `{"n": …}`) one at a time, each until it
/// is stored, from a client of node `via` alone, and kills node `kill` once `kill_after`
/// are stored. Returns when the kill was.
async fn publish_and_kill(
    h: &mut Harness<NatsCluster>,
    via: &str,
    range: std::ops::RangeInclusive<u64>,
    kill_after: usize,
    kill: &str,
) -> Instant {
    let client = async_nats::connect(h.nats.node(via).url.clone()).await.unwrap();
    let jetstream = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(1))
        .build(client);
    let mut killed_at = None;
    for (i, n) in range.enumerate() {
        if i == kill_after {
            h.nats.node(kill).stop();
            killed_at = Some(Instant::now());
        }
        let event = routed(n, &format!("c{}", n % CONNECTIONS), "contact.updated", json!({"n": n}));
        // Stored once however often it is sent: its message id is in the duplicate window.
        eventually("a routed event to be stored", Duration::from_secs(60), || async {
            let (subject, headers, payload) = event.to_message();
            jetstream
                .publish_with_headers(subject, headers, payload)
                .await
                .ok()?
                .await
                .ok()
        })
        .await;
    }
    killed_at.expect("the node was killed")
}

/// Waits for the worker to ack every event; each of `1..=total` applied once. Returns how
/// long after `killed_at` that was.
async fn applied_once(h: &Harness<NatsCluster>, total: u64, killed_at: Instant) -> Duration {
    // Within the harness's own 60 s, to say what the consumer looks like.
    if tokio::time::timeout(Duration::from_secs(50), h.drained())
        .await
        .is_err()
    {
        panic!(
            "the worker has not applied every event within 50 s; {}",
            FUNCTIONS.state(&h.bus).await
        );
    }
    let caught_up = killed_at.elapsed();
    let mut runs = h.runs().await;
    runs.sort();
    assert_eq!(runs, (1..=total).collect::<Vec<_>>(), "each event applied once");
    caught_up
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_routed_event_is_applied_once_through_the_loss_of_a_node() {
    const EACH: u64 = 400;
    show_warnings();
    let db = PgDatabase::create().await;
    // The harness's `worker.ack_wait` is 8 s: an event whose ack went down with a node is
    // delivered again after that.
    let mut h = replicated_harness(Some(&db.url), CONNECTIONS as usize).await;
    h.deploy(&[("crm/syncs/runs.js", sync("['*']", ""))]).await;
    // `hookyard worker`'s consumers, on a connection of their own.
    let worker_bus = Bus::connect(&h.config, "test-worker").await.unwrap();
    let worker_client = worker_bus.client.clone();
    let stop_worker = CancellationToken::new();
    let working = tokio::spawn({
        let (store, config, stop) = (h.store.clone(), h.config.clone(), stop_worker.clone());
        async move { hookyard_worker::run_all(store, &worker_bus, &config, stop).await }
    });

    // 1. The functions consumer's leader dies, not the worker's node: the worker's pull
    //    goes down with it, and the worker pulls again from the new leader.
    let on = worker_client.server_info().server_name;
    let leader = FUNCTIONS.leader_other_than(&h.bus, &on).await;
    let via = node_other_than(&h.nats, &[&leader]);
    let killed_at = publish_and_kill(&mut h, &via, 1..=EACH, EACH as usize / 3, &leader).await;
    let caught_up = applied_once(&h, EACH, killed_at).await;
    eprintln!("consumer leader {leader} killed: every event applied {caught_up:?} after");
    assert!(caught_up < Duration::from_secs(25), "the worker stalled: {caught_up:?}");

    // 2. The worker's node dies, not the consumer's leader: acks in flight are lost, and
    //    the events they were for come back and are recognised as done.
    h.nats.node(&leader).restart();
    Replicated::Stream(CONN_STREAM).fully_replicated(&h.bus).await;
    FUNCTIONS.fully_replicated(&h.bus).await;
    let on = worker_client.server_info().server_name;
    FUNCTIONS.leader_other_than(&h.bus, &on).await;
    let via = node_other_than(&h.nats, &[&on]);
    let killed_at = publish_and_kill(&mut h, &via, EACH + 1..=2 * EACH, EACH as usize / 3, &on).await;
    let caught_up = applied_once(&h, 2 * EACH, killed_at).await;
    eprintln!("worker's node {on} killed: every event applied {caught_up:?} after");
    assert!(caught_up < Duration::from_secs(25), "the worker stalled: {caught_up:?}");
    assert_ne!(worker_client.server_info().server_name, on);
    assert!(!working.is_finished(), "the worker stopped: {:?}", working.await);
    stop_worker.cancel();
    working.await.unwrap().unwrap();
}

/// Not hookyard's fault but nats-server's: looping the router test, a replicated consumer
/// whose creation met its stream's leader election stayed without a leader for over a
/// minute (nats-server 2.15.1; 2 of ~70 runs). This creates consumers while killing the
/// stream's leader, round after round, to reproduce it on its own for a report upstream.
/// Ignored (it is the server's behaviour, and slow); run it by hand:
/// `cargo nextest run -p hookyard-testkit --test cluster --run-ignored only --no-capture`
/// (`HOOKYARD_ROUNDS` rounds, 10 by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "reproduces a nats-server fault; run by hand"]
async fn a_consumer_created_during_its_streams_election_gets_a_leader() {
    use hookyard_core::streams::{durable, durable_consumer, Share};
    show_warnings();
    let rounds: usize = std::env::var("HOOKYARD_ROUNDS").map_or(10, |r| r.parse().unwrap());
    let mut cluster = NatsCluster::start(3);
    let mut config = Config {
        nats_url: cluster.urls(),
        ..Config::default()
    };
    config.streams.replicas = 3;
    let bus = replicated_streams(&config).await;
    for round in 1..=rounds {
        RAW.fully_replicated(&bus).await;
        let leader = RAW.leader(&bus).await;
        let name: &'static str = format!("during-election-{round}").leak();
        let consumer = durable(
            name,
            "created while the stream elects a leader",
            Duration::from_secs(30),
            Share {
                concurrency: 64,
                batch: 32,
            },
        );
        let (jetstream, stop) = (bus.jetstream.clone(), CancellationToken::new());
        let creating = tokio::spawn(async move { durable_consumer(&jetstream, RAW_STREAM, consumer, &stop).await });
        cluster.node(&leader).stop();
        let killed_at = Instant::now();
        let created = tokio::time::timeout(Duration::from_secs(60), creating).await;
        assert!(
            matches!(created, Ok(Ok(Ok(Some(_))))),
            "round {round}: not created: {:?}",
            created.map(|c| c.map(|c| c.map(|_| ())))
        );
        let created_after = killed_at.elapsed();
        let consumer = Replicated::Consumer(RAW_STREAM, name);
        let led = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                match consumer.leader_now(&bus.jetstream).await {
                    Some(leader) => return leader,
                    None => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        })
        .await;
        assert!(led.is_ok(), "round {round}: {}", consumer.state(&bus).await);
        eprintln!(
            "round {round}: {leader} killed; consumer created after {created_after:?}, led by {:?} after {:?}",
            led.unwrap(),
            killed_at.elapsed()
        );
        cluster.node(&leader).restart();
    }
}

/// `deploy/kubernetes/keda.yaml`'s triggers: (account, stream, consumer) each.
fn keda_triggers() -> Vec<(String, String, String)> {
    let path = hookyard_testkit::deploy_dir().join("kubernetes/keda.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let docs = yaml_rust2::YamlLoader::load_from_str(&text).unwrap();
    docs[0]["spec"]["triggers"]
        .as_vec()
        .expect("triggers")
        .iter()
        .map(|trigger| {
            assert_eq!(trigger["type"].as_str(), Some("nats-jetstream"));
            let field = |name: &str| trigger["metadata"][name].as_str().expect(name).to_string();
            (field("account"), field("stream"), field("consumer"))
        })
        .collect()
}

/// The probe paths of `deploy/kubernetes/nats.yaml`'s server container.
fn nats_probe_paths() -> Vec<String> {
    let path = hookyard_testkit::deploy_dir().join("kubernetes/nats.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let docs = yaml_rust2::YamlLoader::load_from_str(&text).unwrap();
    let set = docs
        .iter()
        .find(|d| d["kind"].as_str() == Some("StatefulSet"))
        .expect("a StatefulSet");
    let container = &set["spec"]["template"]["spec"]["containers"][0];
    ["startupProbe", "readinessProbe", "livenessProbe"]
        .iter()
        .map(|probe| container[*probe]["httpGet"]["path"].as_str().expect(probe).to_string())
        .collect()
}

/// What KEDA's NATS JetStream scaler reads for `(account, stream, consumer)`: each node's
/// `/jsz`, and on the node leading the consumer, its pending plus unacknowledged messages.
/// `None` until a node leading it reports it.
async fn keda_lag(
    http: &reqwest::Client,
    cluster: &NatsCluster,
    (account, stream, consumer): &(String, String, String),
) -> Option<i64> {
    for node in &cluster.nodes {
        let url = format!(
            "{}/jsz?acc={account}&consumers=true&config=true",
            node.monitor_url().unwrap()
        );
        let jsz: serde_json::Value = http.get(&url).send().await.ok()?.json().await.ok()?;
        assert_eq!(jsz["meta_cluster"]["cluster_size"], 3, "{jsz}");
        let found = jsz["account_details"]
            .as_array()?
            .iter()
            .filter(|a| a["name"] == account.as_str())
            .flat_map(|a| a["stream_detail"].as_array().into_iter().flatten())
            .filter(|s| s["name"] == stream.as_str())
            .flat_map(|s| s["consumer_detail"].as_array().into_iter().flatten())
            .find(|c| c["name"] == consumer.as_str() && c["cluster"]["leader"] == node.name());
        if let Some(found) = found {
            return Some(found["num_pending"].as_i64()? + found["num_ack_pending"].as_i64()?);
        }
    }
    None
}

/// The cluster the deployment files set up (every test here runs on
/// `deploy/nats/nats.conf`) answers the NATS pods' probes, and KEDA's triggers in
/// `deploy/kubernetes/keda.yaml` name consumers the workers create, whose backlog the
/// servers report as the scaler reads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deployed_cluster_answers_its_probes_and_reports_the_backlog_keda_scales_on() {
    const WAITING: i64 = 25;
    show_warnings();
    let h = replicated_harness(None, 1).await;

    let http = hookyard_core::outbound::http_client().unwrap();
    for node in &h.nats.nodes {
        for path in nats_probe_paths() {
            let url = format!("{}{path}", node.monitor_url().unwrap());
            let what = format!("{url} to answer 200");
            eventually(&what, Duration::from_secs(30), || async {
                let response = http.get(&url).send().await.ok()?;
                (response.status() == 200).then_some(())
            })
            .await;
        }
    }

    // The workers' consumers, as `hookyard worker` creates them; then no worker.
    let worker_bus = Bus::connect(&h.config, "test-worker").await.unwrap();
    let stop_worker = CancellationToken::new();
    let working = tokio::spawn({
        let (store, config, stop) = (h.store.clone(), h.config.clone(), stop_worker.clone());
        async move { hookyard_worker::run_all(store, &worker_bus, &config, stop).await }
    });
    let triggers = keda_triggers();
    assert!(
        triggers
            .iter()
            .any(|(_, stream, consumer)| stream == CONN_STREAM && consumer == hookyard_worker::CONSUMER),
        "KEDA does not scale on the functions consumer: {triggers:?}"
    );
    for trigger in &triggers {
        let what = format!("{trigger:?} to be reported");
        eventually(&what, Duration::from_secs(60), || keda_lag(&http, &h.nats, trigger)).await;
    }
    stop_worker.cancel();
    working.await.unwrap().unwrap();

    h.publish((1..=WAITING as u64).map(|seq| (seq, "c0", "contact.updated", json!({"n": seq}))))
        .await;
    for trigger in &triggers {
        let expected = if trigger.2 == hookyard_worker::CONSUMER {
            WAITING
        } else {
            0
        };
        let what = format!("{trigger:?} to report a backlog of {expected}");
        eventually(&what, Duration::from_secs(30), || async {
            keda_lag(&http, &h.nats, trigger).await.filter(|lag| *lag == expected)
        })
        .await;
    }
}
