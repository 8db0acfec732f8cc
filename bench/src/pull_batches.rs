//! How the pull batch a consumer asks for (`Share::batch`) behaves on a NATS connection
//! that is busy with other traffic, as a worker's is (its other consumers' acks and
//! publishes): `streams::consume` takes a backlog of messages and acks each at once,
//! while other tasks publish on the same connection. async-nats' pull stream, which
//! `streams::pull` used before, could count messages the server would not send at a
//! small batch, and then paused until the missed heartbeat started a fresh pull; a
//! request at a time, as now, cannot (see `streams::pull`). Prints the time per batch
//! size and the pauses of over a second.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use hookyard_core::streams::{consume, durable, Share};
use hookyard_testkit::Busy;
use tokio_util::sync::CancellationToken;

use crate::setup::start_nats;

/// Tasks publishing other traffic on the consumer's connection.
const NOISE_TASKS: usize = 4;

pub async fn run(batches: &[usize], messages: usize) -> anyhow::Result<()> {
    anyhow::ensure!(
        batches.iter().all(|&batch| batch >= 1),
        "a pull asks for 1 message at least"
    );
    let dir = tempfile::tempdir()?;
    let (_nats, port) = start_nats(dir.path())?;
    let client = async_nats::connect(format!("nats://127.0.0.1:{port}")).await?;
    let jetstream = jetstream::new(client.clone());
    let stream = jetstream::stream::Config {
        name: "PULLS".into(),
        subjects: vec!["pulls.>".into()],
        ..Default::default()
    };
    jetstream.create_stream(stream).await?;
    let _busy = Busy::start(&client, NOISE_TASKS);
    println!(
        "{messages} messages per batch size, each acked as it comes, one at a time for a batch of 1 \
         (exec) and 64 at a time otherwise; {NOISE_TASKS} tasks publish other traffic on the same connection\n"
    );
    println!(
        "{:>6} {:>10} {:>12} {:>18}",
        "batch", "seconds", "messages/s", "pauses over 1 s"
    );
    for &batch in batches {
        let subject = format!("pulls.{batch}");
        for i in 0..messages {
            jetstream.publish(subject.clone(), i.to_string().into()).await?;
        }
        jetstream.publish(subject.clone(), "last".into()).await?.await?;
        let share = Share {
            concurrency: if batch == 1 { 1 } else { 64 },
            batch,
        };
        let mut config = durable(
            &format!("batch-{batch}"),
            "pull batches",
            Duration::from_secs(30),
            share,
        );
        config.filter_subject = subject;
        let (handled, stop) = (Arc::new(AtomicUsize::new(0)), CancellationToken::new());
        let consuming = {
            let (jetstream, handled, stop) = (jetstream.clone(), handled.clone(), stop.clone());
            tokio::spawn(async move {
                consume(&jetstream, "PULLS", config, share, stop, |message| {
                    let handled = handled.clone();
                    async move {
                        let _ = message.ack().await;
                        handled.fetch_add(1, Ordering::Relaxed);
                    }
                })
                .await
            })
        };
        let started = Instant::now();
        let (mut pauses, mut seen, mut moved_at) = (0, 0, Instant::now());
        let total = messages + 1;
        while handled.load(Ordering::Relaxed) < total {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(300),
                "batch {batch}: not done in 5 minutes"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = handled.load(Ordering::Relaxed);
            if now != seen {
                (seen, moved_at) = (now, Instant::now());
            } else if moved_at.elapsed() > Duration::from_secs(1) {
                pauses += 1;
                moved_at = Instant::now();
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        println!(
            "{batch:>6} {seconds:>10.2} {:>12.0} {pauses:>18}",
            total as f64 / seconds
        );
        stop.cancel();
        consuming.await??;
    }
    Ok(())
}
