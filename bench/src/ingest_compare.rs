//! hookyard's ingest against bare axum handlers that publish to JetStream and await the
//! ack: the body alone; the body with a content-hash message id (the least that stores
//! one delivery once); and hookyard's own envelope (the same NATS message ingest
//! publishes, headers and id included). Same NATS server, same machine, same load,
//! rotating order. The steps between them say what each part of the work costs.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use async_nats::jetstream::message::PublishMessage;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use bytes::Bytes;
use hookyard_core::keys::{EnvironmentName, IntegrationKey};
use hookyard_core::providers::Verification;
use hookyard_core::secrets::{random_bytes, Cipher};
use hookyard_core::store::NewIntegration;
use hookyard_core::streams::{Bus, RAW_STREAM};
use hookyard_core::{Config, Envelope, Store};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::load::{self, Plan, Report};
use crate::setup::{start_nats, CpuMeter};

const BARE_STREAM: &str = "BARE";
const BARE_ID_STREAM: &str = "BARE_ID";
const BARE_ENVELOPE_STREAM: &str = "BARE_ENVELOPE";

/// What a bare handler publishes.
#[derive(Clone, Copy)]
enum Bare {
    Body,
    ContentHashId,
    Envelope,
}

pub async fn run(plan: &Plan, rounds: u32, duplicate_window: Duration) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (nats, port) = start_nats(dir.path())?;
    let mut config = Config {
        nats_url: format!("nats://127.0.0.1:{port}"),
        database_url: format!("sqlite://{}", dir.path().join("hookyard.db").display()),
        ..Config::default()
    };
    config.ingest.max_in_flight = plan.connections.max(1024);
    config.streams.duplicate_window = duplicate_window;

    let store = Store::connect(&config.database_url, Cipher::from_bytes(random_bytes())).await?;
    let environment = store.ensure_environment(&"bench".parse()?).await?;
    store
        .create_integration(&environment, &NewIntegration::new("load".parse()?, "generic"))
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

    let targets = [
        Target {
            name: "hookyard ingest",
            url: hookyard_url,
            stream: RAW_STREAM,
        },
        Target {
            name: "bare axum + JetStream publish",
            url: start_bare(&bus, BARE_STREAM, Bare::Body, duplicate_window).await?,
            stream: BARE_STREAM,
        },
        Target {
            name: "bare + content-hash Nats-Msg-Id",
            url: start_bare(&bus, BARE_ID_STREAM, Bare::ContentHashId, duplicate_window).await?,
            stream: BARE_ID_STREAM,
        },
        Target {
            name: "bare + hookyard's envelope (headers and id)",
            url: start_bare(&bus, BARE_ENVELOPE_STREAM, Bare::Envelope, duplicate_window).await?,
            stream: BARE_ENVELOPE_STREAM,
        },
    ];

    println!(
        "ingest benchmark: {} connections, {} B bodies, {:?} request headers, {}s per round after {}s warm-up, {rounds} rounds, duplicate window {:?}, nats-server {}\n",
        plan.connections,
        plan.body_bytes,
        plan.headers,
        plan.duration.as_secs(),
        plan.warmup.as_secs(),
        duplicate_window,
        bus.client.server_info().version
    );
    let nats_pid = nats.pid().context("nats-server pid")?;
    // Throughput per target, one entry per round.
    let mut rounds_of: [Vec<f64>; 4] = Default::default();
    for round in 0..rounds as usize {
        // Whichever target runs first in a round is measurably disadvantaged (about 7%
        // when two slots load the same server), so the order rotates.
        for turn in 0..targets.len() {
            let i = (round + turn) % targets.len();
            let target = &targets[i];
            let before = stored(&bus.jetstream, target.stream).await?;
            let cpu = CpuMeter::start(nats_pid);
            let report = load::run(&target.url, plan).await?;
            let cpu = cpu.stop();
            let after = stored(&bus.jetstream, target.stream).await?;
            report.print(&format!("round {}: {}", round + 1, target.name));
            cpu.print(&report);
            check_acked(&report, after - before, target.stream)?;
            rounds_of[i].push(report.throughput());
        }
    }
    let mean = |i: usize| rounds_of[i].iter().sum::<f64>() / rounds as f64;
    println!("\nmean throughput; hookyard's ratio to each, of the means and per round (median, range):");
    for (i, target) in targets.iter().enumerate() {
        let mut ratios: Vec<f64> = rounds_of[0].iter().zip(&rounds_of[i]).map(|(h, t)| h / t).collect();
        ratios.sort_by(f64::total_cmp);
        println!(
            "  {:>7.0} req/s  {:.2}  {:.2} ({:.2}–{:.2})  {}",
            mean(i),
            mean(0) / mean(i),
            median(&ratios),
            ratios[0],
            ratios[ratios.len() - 1],
            target.name
        );
    }
    shutdown.cancel();
    Ok(())
}

/// The middle of sorted `values` (the mean of the middle two for an even count).
fn median(values: &[f64]) -> f64 {
    let mid = values.len() / 2;
    if values.len() % 2 == 0 {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}

struct Target {
    name: &'static str,
    url: String,
    stream: &'static str,
}

/// Every 2xx must correspond to a stored message (each body is unique, so extra stored
/// messages can only come from requests that failed on the client side after the ack).
fn check_acked(report: &Report, stored: u64, stream: &str) -> anyhow::Result<()> {
    let answered = report.ok();
    // Warm-up requests are stored but not counted in the report.
    anyhow::ensure!(
        stored >= answered,
        "{answered} requests were answered 2xx but only {stored} messages were stored"
    );
    println!("  ack check: {answered} answered 2xx (after warm-up), {stored} stored in {stream}: ok");
    Ok(())
}

async fn stored(jetstream: &jetstream::Context, stream: &str) -> anyhow::Result<u64> {
    let mut stream = jetstream.get_stream(stream).await.context("stream info")?;
    Ok(stream.info().await?.state.messages)
}

/// A baseline: read the body, publish it (as `bare` says), await the ack, answer 202.
async fn start_bare(bus: &Bus, stream: &'static str, bare: Bare, duplicate_window: Duration) -> anyhow::Result<String> {
    let subject = format!("{}.load", stream.to_lowercase());
    bus.jetstream
        .create_or_update_stream(jetstream::stream::Config {
            name: stream.into(),
            subjects: vec![subject.clone()],
            duplicate_window,
            ..Default::default()
        })
        .await?;
    let state = Arc::new((bus.jetstream.clone(), subject));
    let app = axum::Router::new()
        .route(
            "/bare",
            post(
                move |State(state): State<Arc<(jetstream::Context, String)>>, headers: HeaderMap, body: Bytes| async move {
                    let (js, subject) = &*state;
                    let message = match bare {
                        Bare::Body => PublishMessage::build().payload(body),
                        Bare::ContentHashId => PublishMessage::build()
                            .message_id(hex::encode(&Sha256::digest(&body)[..16]))
                            .payload(body),
                        Bare::Envelope => {
                            let envelope = envelope(&headers, body);
                            PublishMessage::build().headers(envelope.to_headers()).payload(envelope.body)
                        }
                    };
                    match js.send_publish(subject.clone(), message).await {
                        Ok(ack) => match ack.await {
                            Ok(_) => StatusCode::ACCEPTED,
                            Err(_) => StatusCode::SERVICE_UNAVAILABLE,
                        },
                        Err(_) => StatusCode::SERVICE_UNAVAILABLE,
                    }
                },
            ),
        )
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/bare", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

/// The envelope ingest would publish for this request, made the way ingest makes it.
fn envelope(headers: &HeaderMap, body: Bytes) -> Envelope {
    static ENVIRONMENT: std::sync::LazyLock<EnvironmentName> =
        std::sync::LazyLock::new(|| "bench".parse().expect("a valid name"));
    static INTEGRATION: std::sync::LazyLock<IntegrationKey> =
        std::sync::LazyLock::new(|| "load".parse().expect("a valid key"));
    let headers = hookyard_ingest::receive::header_list(headers);
    Envelope {
        environment: ENVIRONMENT.clone(),
        integration: INTEGRATION.clone(),
        received_at: chrono::Utc::now(),
        delivery_id: Envelope::derive_delivery_id(&INTEGRATION, &headers, None, None, &body),
        method: "POST".into(),
        path: None,
        query: None,
        headers,
        body,
        verification: Verification::Unsigned,
        traceparent: None,
    }
}
