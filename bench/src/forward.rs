//! Forwarding throughput: routed events are put in `HOOKS_CONN` first, then the
//! forwarder and the deliverer are started (in this process) and timed until a fast
//! local receiver has answered every delivery. Each event goes to one destination.
//! Postgres's CPU is counted until every attempt is recorded (written in batches, after
//! the answers).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hookyard_core::routed::RoutedEvent;
use hookyard_core::store::forwarding::{ForwardingScope, ForwardingSettings};
use hookyard_core::streams::Bus;
use hookyard_core::Config;
use hookyard_testkit::{raw_texts, PgDatabase};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::setup::{postgres_cpu, postgres_cpu_since, start_nats, store_with_connection, CpuMeter};

pub async fn run(events: u64, by_name: bool) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (nats, port) = start_nats(dir.path())?;
    let pg = PgDatabase::create().await;
    let mut config = Config {
        nats_url: format!("nats://127.0.0.1:{port}"),
        database_url: pg.url.clone(),
        ..Config::default()
    };
    config.forwarding.allow_loopback = true;
    let (store, environment) = store_with_connection(&config, None).await?;

    // The receiver: answers 200 and counts.
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            counter.fetch_add(1, Ordering::Relaxed);
            std::future::ready("ok")
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let receiver_port = listener.local_addr()?.port();
    let url = match by_name {
        true => format!("http://localhost:{receiver_port}/hook"),
        false => format!("http://127.0.0.1:{receiver_port}/hook"),
    };
    tokio::spawn(async move { axum::serve(listener, app).await });
    let settings = ForwardingSettings {
        urls: vec![url.clone()],
        ..Default::default()
    };
    store
        .set_forwarding(environment.id, ForwardingScope::Environment, &settings)
        .await?;

    let bus = Bus::connect(&config, "bench-forward").await?;
    bus.ensure_streams(&config.streams, &store).await?;
    let mut acks = Vec::with_capacity(1024);
    for n in 1..=events {
        let event = RoutedEvent {
            environment: "dev".parse()?,
            integration: "crm".parse()?,
            connection_id: Some("c0".into()),
            unrouted: None,
            raw_seq: n,
            index: 0,
            event_type: Some("contact.updated".into()),
            delivery_id: format!("d{n}"),
            payload: json!({"type": "contact.updated", "contact": {"id": n, "email": format!("p{n}@example.com")}}),
            traceparent: None,
            origin: Default::default(),
        };
        let (subject, headers, payload) = event.to_message();
        acks.push(bus.jetstream.publish_with_headers(subject, headers, payload).await?);
        if acks.len() == 1024 {
            for ack in acks.drain(..) {
                ack.await?;
            }
        }
    }
    for ack in acks {
        ack.await?;
    }
    println!(
        "forwarding benchmark: {events} routed events in {}, one destination ({url}, a local receiver answering 200), \
         forwarder and deliverer in this process, Postgres\n",
        hookyard_core::streams::CONN_STREAM
    );
    let shutdown = CancellationToken::new();
    let settings = Arc::new(hookyard_worker::settings::Settings::new(store.clone()));
    let forwarder = Arc::new(hookyard_worker::forward::Forwarder::new(
        settings.clone(),
        bus.jetstream.clone(),
    ));
    let deliverer = Arc::new(hookyard_worker::deliver::Deliverer::new(
        store.clone(),
        settings,
        bus.jetstream.clone(),
        &config.forwarding,
        hookyard_core::oplog::OpLog::start(store.clone(), &config.logs),
    )?);
    let cpu = CpuMeter::start(nats.pid().unwrap_or(0));
    let postgres = postgres_cpu();
    let started = Instant::now();
    tokio::spawn(forwarder.run(shutdown.clone()));
    tokio::spawn(deliverer.run(shutdown.clone()));
    let deadline = Instant::now() + Duration::from_secs(600);
    while received.load(Ordering::Relaxed) < events {
        anyhow::ensure!(
            Instant::now() < deadline,
            "not every delivery arrived within 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (own, nats_cpu) = cpu.stop().per_thousand(events);
    let recorded = "SELECT COUNT(*)::text FROM delivery_attempts";
    while raw_texts(&pg.url, recorded).await[0].parse::<u64>()? < events {
        anyhow::ensure!(
            Instant::now() < deadline,
            "not every attempt was recorded within 10 minutes"
        );
        // Each check is a connection of its own, whose backend's CPU counts: not often.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let postgres_cpu = postgres_cpu_since(&postgres) * 1e6 / events as f64;
    shutdown.cancel();
    println!(
        "{events} deliveries in {elapsed:.2}s = {:.0} deliveries/s\n\
         CPU per 1,000 deliveries: this process (forwarder, deliverer, receiver) {:.0} ms, nats-server {:.0} ms, \
         Postgres (until every attempt is recorded) {postgres_cpu:.0} ms",
        events as f64 / elapsed,
        own,
        nats_cpu,
    );
    Ok(())
}
