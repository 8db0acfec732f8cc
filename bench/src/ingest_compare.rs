//! hookyard's ingest against the simplest correct alternative: a bare axum handler that
//! publishes the body to JetStream and awaits the ack. Same NATS server, same machine,
//! same load, alternating rounds.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use bytes::Bytes;
use hookyard_core::embedded_nats::{server_bin, EmbeddedNats, ServerSpec};
use hookyard_core::store::NewIntegration;
use hookyard_core::streams::{Bus, RAW_STREAM};
use hookyard_core::{Config, Store};
use tokio_util::sync::CancellationToken;

use crate::load::{self, Plan, Report};

const BARE_STREAM: &str = "BARE";

pub async fn run(plan: &Plan, rounds: u32, duplicate_window: Duration) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let bin = server_bin();
    let nats = EmbeddedNats::start(
        &ServerSpec {
            bin: &bin,
            port,
            store_dir: &dir.path().join("js"),
            config_file: &dir.path().join("nats.conf"),
            max_payload_mb: 16,
        },
        Duration::from_secs(30),
    )?;
    let mut config = Config {
        nats_url: format!("nats://127.0.0.1:{port}"),
        database_url: format!("sqlite://{}", dir.path().join("hookyard.db").display()),
        ..Config::default()
    };
    config.ingest.max_in_flight = plan.connections.max(1024);
    config.streams.duplicate_window = duplicate_window;

    let store = Store::connect(&config.database_url).await?;
    let environment = store.ensure_environment(&"bench".parse()?).await?;
    store
        .create_integration(
            &environment,
            &NewIntegration {
                unique_key: "load".parse()?,
                provider: "generic".into(),
                webhook_secret: None,
                settings: serde_json::json!({}),
            },
        )
        .await?;
    let shutdown = CancellationToken::new();
    let bus = Bus::connect(&config, "bench-ingest").await?;
    let ingest = hookyard_ingest::Ingest::start(&config, store, bus.clone(), shutdown.clone()).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let hookyard_url = format!(
        "http://{}/webhook/{}/load",
        listener.local_addr()?,
        environment.webhook_id
    );
    tokio::spawn(hookyard_ingest::serve(listener, ingest, shutdown.clone()));

    let bare_url = start_bare(&bus).await?;

    println!(
        "ingest benchmark: {} connections, {} B bodies, {}s per round after {}s warm-up, {rounds} rounds each, duplicate window {:?}, nats-server {}\n",
        plan.connections,
        plan.body_bytes,
        plan.duration.as_secs(),
        plan.warmup.as_secs(),
        duplicate_window,
        bus.client.server_info().version
    );
    let nats_pid = nats.pid().context("nats-server pid")?;
    let (mut hookyard_total, mut bare_total) = (0.0, 0.0);
    for round in 1..=rounds {
        // Whichever target runs first in a round is measurably disadvantaged (about 7%
        // when both slots load the same server), so the order alternates.
        let hookyard_first = round % 2 == 1;
        for hookyard_turn in [hookyard_first, !hookyard_first] {
            if hookyard_turn {
                let before = stored(&bus.jetstream, RAW_STREAM).await?;
                let cpu = CpuMeter::start(nats_pid);
                let report = load::run(&hookyard_url, plan).await?;
                let cpu = cpu.stop();
                let after = stored(&bus.jetstream, RAW_STREAM).await?;
                report.print(&format!("round {round}: hookyard ingest"));
                cpu.print(&report);
                check_acked(&report, after - before)?;
                hookyard_total += report.throughput();
            } else {
                let cpu = CpuMeter::start(nats_pid);
                let report = load::run(&bare_url, plan).await?;
                let cpu = cpu.stop();
                report.print(&format!("round {round}: bare axum + JetStream publish"));
                cpu.print(&report);
                bare_total += report.throughput();
            }
        }
    }
    println!(
        "\nmean throughput: hookyard {:.0} req/s, bare {:.0} req/s, ratio {:.2}",
        hookyard_total / rounds as f64,
        bare_total / rounds as f64,
        hookyard_total / bare_total
    );
    shutdown.cancel();
    Ok(())
}

/// Every 2xx must correspond to a stored message (each body is unique, so extra stored
/// messages can only come from requests that failed on the client side after the ack).
fn check_acked(report: &Report, stored: u64) -> anyhow::Result<()> {
    let answered = report.ok();
    // Warm-up requests are stored but not counted in the report.
    anyhow::ensure!(
        stored >= answered,
        "{answered} requests were answered 2xx but only {stored} messages were stored"
    );
    println!("  ack check: {answered} answered 2xx (after warm-up), {stored} stored in {RAW_STREAM}: ok");
    Ok(())
}

async fn stored(jetstream: &jetstream::Context, stream: &str) -> anyhow::Result<u64> {
    let mut stream = jetstream.get_stream(stream).await.context("stream info")?;
    Ok(stream.info().await?.state.messages)
}

/// The baseline: read the body, publish it, await the ack, answer 202.
async fn start_bare(bus: &Bus) -> anyhow::Result<String> {
    bus.jetstream
        .create_or_update_stream(jetstream::stream::Config {
            name: BARE_STREAM.into(),
            subjects: vec!["bare.>".into()],
            ..Default::default()
        })
        .await?;
    let jetstream = Arc::new(bus.jetstream.clone());
    let app = axum::Router::new()
        .route(
            "/bare",
            post(|State(js): State<Arc<jetstream::Context>>, body: Bytes| async move {
                match js.publish("bare.load", body).await {
                    Ok(ack) => match ack.await {
                        Ok(_) => StatusCode::ACCEPTED,
                        Err(_) => StatusCode::SERVICE_UNAVAILABLE,
                    },
                    Err(_) => StatusCode::SERVICE_UNAVAILABLE,
                }
            }),
        )
        .with_state(jetstream);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/bare", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

/// CPU seconds used by this process (servers and load generator) and by nats-server.
struct CpuMeter {
    nats_pid: u32,
    own: f64,
    nats: f64,
}

struct CpuUsed {
    own: f64,
    nats: f64,
}

impl CpuMeter {
    fn start(nats_pid: u32) -> CpuMeter {
        CpuMeter {
            nats_pid,
            own: cpu_seconds("self"),
            nats: cpu_seconds(&nats_pid.to_string()),
        }
    }

    fn stop(self) -> CpuUsed {
        CpuUsed {
            own: cpu_seconds("self") - self.own,
            nats: cpu_seconds(&self.nats_pid.to_string()) - self.nats,
        }
    }
}

impl CpuUsed {
    fn print(&self, report: &Report) {
        // Includes the warm-up second: requests are counted over the same span.
        let requests = report.ok().max(1) as f64;
        println!(
            "  cpu: bench process (server + load generator) {:.1}s, nats-server {:.1}s; per 1000 requests {:.0} ms + {:.0} ms (incl. warm-up)",
            self.own,
            self.nats,
            self.own * 1e6 / requests,
            self.nats * 1e6 / requests
        );
    }
}

/// utime + stime of a process from /proc (Linux), in seconds; 0 where unavailable.
fn cpu_seconds(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest.split(' ').collect())
        .unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}
