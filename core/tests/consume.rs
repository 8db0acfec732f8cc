//! Processes sharing one durable consumer (`streams::consume`), as a stage's replicas
//! do: each takes its share of a backlog, and none holds, unstarted, what another
//! could be handling.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::message::PublishMessage;
use hookyard_core::streams::{consume, durable, Share};
use hookyard_testkit::{eventually, Busy, NatsServer};
use tokio_util::sync::CancellationToken;

const STREAM: &str = "SHARED";
const SHARE: Share = Share {
    concurrency: 2,
    batch: 2,
};

/// What one process is doing.
#[derive(Default)]
struct Counts {
    in_progress: AtomicUsize,
    handled: AtomicUsize,
}

/// A process on the consumer, with a connection of its own: each message is held in
/// progress until `release`, then acked.
fn start_process(url: String, release: CancellationToken, shutdown: CancellationToken) -> Arc<Counts> {
    let counts = Arc::new(Counts::default());
    let counted = counts.clone();
    tokio::spawn(async move {
        let jetstream = jetstream::new(async_nats::connect(url).await.expect("NATS"));
        let config = durable("shared", "a stage's replicas", Duration::from_secs(30), SHARE);
        consume(&jetstream, STREAM, config, SHARE, shutdown, |message| {
            let (counts, release) = (counted.clone(), release.clone());
            async move {
                counts.in_progress.fetch_add(1, Ordering::SeqCst);
                release.cancelled().await;
                message.ack().await.expect("acked");
                counts.in_progress.fetch_sub(1, Ordering::SeqCst);
                counts.handled.fetch_add(1, Ordering::SeqCst);
            }
        })
        .await
        .expect("consumed");
    });
    counts
}

async fn all_in_progress(what: &str, processes: &[Arc<Counts>]) {
    eventually(what, Duration::from_secs(5), || async {
        let busy = processes
            .iter()
            .all(|p| p.in_progress.load(Ordering::SeqCst) == SHARE.concurrency);
        busy.then_some(())
    })
    .await;
}

#[tokio::test]
async fn replicas_on_one_consumer_each_take_their_share_of_a_backlog() {
    let nats = NatsServer::start();
    let (_, jetstream) = with_stream(&nats, STREAM).await;
    let stream = jetstream.get_stream(STREAM).await.unwrap();
    // Far more than three processes hold.
    const BACKLOG: usize = 60;
    for i in 0..BACKLOG {
        jetstream
            .publish(format!("shared.{i}"), "m".into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let (release, shutdown) = (CancellationToken::new(), CancellationToken::new());
    let _stop = shutdown.clone().drop_guard();
    let start = || start_process(nats.url.clone(), release.clone(), shutdown.clone());

    // The first replica alone takes what it handles, and no more than its share.
    let first = start();
    all_in_progress("the first replica's messages in progress", std::slice::from_ref(&first)).await;
    // Two more come while it is busy: each gets messages of its own at once, not those
    // the first let go of (none, until released).
    let processes = [first, start(), start()];
    all_in_progress("every replica's messages in progress", &processes).await;
    let out = stream.consumer_info("shared").await.unwrap().num_ack_pending;
    assert!(
        out <= 3 * SHARE.holds(),
        "{out} messages out to three replicas, each holding at most {}",
        SHARE.holds()
    );

    release.cancel();
    eventually("the backlog handled", Duration::from_secs(10), || async {
        let handled: usize = processes.iter().map(|p| p.handled.load(Ordering::SeqCst)).sum();
        (handled == BACKLOG).then_some(())
    })
    .await;
}

/// A client of `nats`, and the stream `name` it created, on the subjects `{name}.>` in
/// lower case.
async fn with_stream(nats: &NatsServer, name: &str) -> (async_nats::Client, jetstream::Context) {
    let client = async_nats::connect(&nats.url).await.unwrap();
    let jetstream = jetstream::new(client.clone());
    let stream = jetstream::stream::Config {
        name: name.into(),
        subjects: vec![format!("{}.>", name.to_lowercase())],
        ..Default::default()
    };
    jetstream.create_stream(stream).await.unwrap();
    (client, jetstream)
}

/// A process on `config` of `stream` that acks each message as it comes, until `stop`:
/// the count of messages it has acked.
fn acking(
    jetstream: &jetstream::Context,
    stream: &'static str,
    config: jetstream::consumer::pull::Config,
    share: Share,
    stop: CancellationToken,
) -> Arc<AtomicUsize> {
    let (handled, jetstream) = (Arc::new(AtomicUsize::new(0)), jetstream.clone());
    let counted = handled.clone();
    tokio::spawn(async move {
        consume(&jetstream, stream, config, share, stop, |message| {
            let counted = counted.clone();
            async move {
                message.ack().await.expect("acked");
                counted.fetch_add(1, Ordering::SeqCst);
            }
        })
        .await
        .expect("consumed");
    });
    handled
}

/// Consumers that ask for few messages at a time (exec's one job; the functions
/// consumer's when `worker.batch` is set low) on a connection busy with other traffic,
/// as a worker's is, take a backlog without pausing: async-nats' pull stream, asked for
/// one or two at a time, stopped asking now and then until its missed heartbeat (4 s)
/// started a fresh pull.
// Threads of its own, as a worker's runtime has: the pause comes from a race between
// them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_batches_on_a_busy_connection_take_a_backlog_without_pausing() {
    let nats = NatsServer::start();
    let (client, jetstream) = with_stream(&nats, "FEW").await;
    let _busy = Busy::start(&client, 4);
    for batch in [1, 2] {
        const BACKLOG: usize = 3000;
        let subject = format!("few.{batch}");
        for i in 0..BACKLOG {
            jetstream.publish(subject.clone(), i.to_string().into()).await.unwrap();
        }
        jetstream
            .publish(subject.clone(), "last".into())
            .await
            .unwrap()
            .await
            .unwrap();
        let stop = CancellationToken::new();
        let _stop = stop.clone().drop_guard();
        let few = Share {
            concurrency: batch,
            batch,
        };
        let config = jetstream::consumer::pull::Config {
            filter_subject: subject,
            ..durable(&format!("few-{batch}"), "a few at a time", Duration::from_secs(30), few)
        };
        let handled = acking(&jetstream, "FEW", config, few, stop.clone());
        // A pause is the missed heartbeat's 4 s; the messages come every few milliseconds.
        let (mut seen, mut moved_at) = (0, tokio::time::Instant::now());
        while seen < BACKLOG + 1 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = handled.load(Ordering::SeqCst);
            if now != seen {
                (seen, moved_at) = (now, tokio::time::Instant::now());
            }
            assert!(
                moved_at.elapsed() < Duration::from_secs(3),
                "batch {batch}: no message for 3 s after {seen} of {}",
                BACKLOG + 1
            );
        }
    }
}

/// A pull request that is lost with its server (restarted: the request is gone, and no
/// word of it comes) is taken for lost once its heartbeats stop, and a new one is sent:
/// a message published after the restart is handled.
#[tokio::test]
async fn a_pull_lost_with_its_server_is_sent_again() {
    let mut nats = NatsServer::start();
    let (client, jetstream) = with_stream(&nats, "LOST").await;
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let config = durable("lost", "a few at a time", Duration::from_secs(30), SHARE);
    let handled = acking(&jetstream, "LOST", config, SHARE, stop.clone());
    eventually("a pull request waiting", Duration::from_secs(10), || async {
        let stream = jetstream.get_stream("LOST").await.ok()?;
        let info = stream.consumer_info("lost").await.ok()?;
        (info.num_waiting >= 1).then_some(())
    })
    .await;

    nats.restart();
    eventually("the client back", Duration::from_secs(10), || async {
        (client.connection_state() == async_nats::connection::State::Connected).then_some(())
    })
    .await;
    // JetStream takes publishes again once its stream is recovered; the id keeps a
    // publish retried after a lost ack from being stored twice.
    eventually("the message stored", Duration::from_secs(20), || async {
        let message = PublishMessage::build().message_id("after").payload("after".into());
        jetstream.send_publish("lost.job", message).await.ok()?.await.ok()
    })
    .await;
    // Two missed heartbeats (4 s), a look at whether the consumer is gone and a pause
    // of a second: a new request within some 7 s.
    eventually("the message handled", Duration::from_secs(15), || async {
        (handled.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
}
