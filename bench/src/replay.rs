//! Replay throughput: webhooks are put in `HOOKS_RAW`, then one router replays the whole
//! window (read through an ordered consumer, routed again, published to `HOOKS_CONN` with
//! replay ids) and is timed to the end. No live router or worker runs meanwhile.

use std::sync::Arc;
use std::time::Instant;

use hookyard_core::routed::ReplayTarget;
use hookyard_core::store::replays::{NewReplay, ReplayStatus};
use hookyard_router::replay::Replayer;
use hookyard_router::Router;
use tokio_util::sync::CancellationToken;

use crate::router::HubspotBench;
use crate::setup::CpuMeter;

pub async fn run(batches: &[usize], webhooks: usize, rounds: usize) -> anyhow::Result<()> {
    let bench = HubspotBench::start(crate::router::StoreKind::Sqlite).await?;
    let nats_pid = bench.nats.pid().unwrap_or(0);
    let router = Arc::new(Router::new(bench.store.clone(), &bench.bus, &bench.config)?);
    println!("replay benchmark: HubSpot webhooks over two connections, SQLite store, one router replaying\n");
    println!(
        "{:>6} {:>9} {:>6} {:>11} {:>12} {:>15} {:>19}",
        "batch", "webhooks", "round", "webhooks/s", "events/s", "router CPU/evt", "nats-server CPU/evt"
    );
    for &batch in batches {
        let since = chrono::Utc::now() - chrono::Duration::seconds(1);
        bench.fill(batch, webhooks).await?;
        let until = chrono::Utc::now() + chrono::Duration::seconds(1);
        for round in 1..=rounds {
            let before = bench.routed().await?;
            bench
                .store
                .create_replay(&NewReplay {
                    environment: bench.environment.name.to_string(),
                    integration: None,
                    connection_id: None,
                    since,
                    until,
                    target: ReplayTarget::All,
                    dry_run: false,
                    rate: None,
                })
                .await?;
            let replay = bench
                .store
                .claim_replay(std::time::Duration::from_secs(30))
                .await?
                .ok_or_else(|| anyhow::anyhow!("the replay was not queued"))?;
            let replayer = Replayer::new(router.clone(), bench.store.clone(), u64::MAX);
            let cpu = CpuMeter::start(nats_pid);
            let started = Instant::now();
            replayer.replay_and_record(&replay, &CancellationToken::new()).await;
            let elapsed = started.elapsed().as_secs_f64();
            let cpu = cpu.stop();
            let done = bench.store.replay(&replay.request.environment, replay.id).await?;
            anyhow::ensure!(
                done.status == ReplayStatus::Done,
                "replay ended {:?}: {:?}",
                done.status,
                done.error
            );
            let published = bench.routed().await? - before;
            anyhow::ensure!(
                done.progress.read as usize == webhooks && published == webhooks * batch,
                "expected {webhooks} webhooks read and {} events published; read {}, published {published}",
                webhooks * batch,
                done.progress.read
            );
            let (own, server) = cpu.per_thousand(published as u64);
            println!(
                "{batch:>6} {webhooks:>9} {round:>6} {:>11.0} {:>12.0} {:>12.1} µs {:>16.1} µs",
                webhooks as f64 / elapsed,
                published as f64 / elapsed,
                own,
                server,
            );
        }
    }
    Ok(())
}
