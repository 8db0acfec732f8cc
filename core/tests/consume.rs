//! Processes sharing one durable consumer (`streams::consume`), as a stage's replicas
//! do: each takes its share of a backlog, and none holds, unstarted, what another
//! could be handling.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use hookyard_core::streams::{consume, durable, Share};
use hookyard_testkit::{eventually, NatsServer};
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
    let jetstream = jetstream::new(async_nats::connect(&nats.url).await.unwrap());
    let stream = jetstream::stream::Config {
        name: STREAM.into(),
        subjects: vec!["shared.>".into()],
        ..Default::default()
    };
    let stream = jetstream.create_stream(stream).await.unwrap();
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
