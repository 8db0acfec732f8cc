//! Router throughput: webhooks are put in `HOOKS_RAW` first, then a router is started
//! and timed until it has acked the last one. Bodies are HubSpot batches of `batch`
//! events over two portals, each portal a connection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hookyard_core::secrets::{random_bytes, Cipher};
use hookyard_core::store::{NewConnection, NewIntegration};
use hookyard_core::streams::{Bus, CONN_STREAM, RAW_STREAM};
use hookyard_core::{Config, Envelope, Store};
use hookyard_router::Router;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::setup::{start_nats, CpuMeter};

/// Where the bench's store is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    Sqlite,
    Postgres,
}

/// NATS, a store and a HubSpot integration with two portal connections.
pub(crate) struct HubspotBench {
    _dir: tempfile::TempDir,
    /// Dropped with the bench.
    _postgres: Option<hookyard_testkit::PgDatabase>,
    pub nats: hookyard_core::embedded_nats::EmbeddedNats,
    pub config: Config,
    pub store: Store,
    pub environment: hookyard_core::store::Environment,
    pub bus: Bus,
}

impl HubspotBench {
    pub async fn start(kind: StoreKind) -> anyhow::Result<HubspotBench> {
        let dir = tempfile::tempdir()?;
        let (nats, port) = start_nats(dir.path())?;
        let postgres = match kind {
            StoreKind::Sqlite => None,
            StoreKind::Postgres => Some(hookyard_testkit::PgDatabase::create().await),
        };
        let database_url = match &postgres {
            Some(db) => db.url.clone(),
            None => format!("sqlite://{}", dir.path().join("hookyard.db").display()),
        };
        let config = Config {
            nats_url: format!("nats://127.0.0.1:{port}"),
            database_url,
            ..Config::default()
        };
        let store = Store::connect(&config.database_url, Cipher::from_bytes(random_bytes())).await?;
        let environment = store.ensure_environment(&"bench".parse()?).await?;
        store
            .create_integration(&environment, &NewIntegration::new("hubspot".parse()?, "hubspot"))
            .await?;
        for portal in [1, 2] {
            let connection = NewConnection {
                integration: "hubspot".parse()?,
                connection_id: format!("portal-{portal}"),
                connection_config: json!({"portalId": portal}),
                metadata: json!({}),
                tags: json!({}),
                credentials: None,
            };
            store.create_connection(&environment, &connection).await?;
        }
        let bus = Bus::connect(&config, "bench-router").await?;
        bus.ensure_streams(&config.streams, &store).await?;
        Ok(HubspotBench {
            _dir: dir,
            _postgres: postgres,
            nats,
            config,
            store,
            environment,
            bus,
        })
    }

    /// Empties the streams, then puts `webhooks` HubSpot bodies of `batch` events each
    /// (alternating portals) into `HOOKS_RAW`; the last one's sequence.
    pub async fn fill(&self, batch: usize, webhooks: usize) -> anyhow::Result<u64> {
        let stream = self.bus.jetstream.get_stream(RAW_STREAM).await?;
        stream.purge().await?;
        self.bus.jetstream.get_stream(CONN_STREAM).await?.purge().await?;
        let _ = stream.delete_consumer(hookyard_router::CONSUMER).await;
        let mut acks = Vec::with_capacity(1000);
        let mut last = 0;
        for w in 0..webhooks {
            let events: Vec<_> = (0..batch)
                .map(|i| json!({"objectId": w * batch + i, "portalId": 1 + (w + i) % 2, "subscriptionType": "contact.propertyChange", "occurredAt": i, "propertyName": "email", "propertyValue": "ada@example.com"}))
                .collect();
            let envelope = Envelope {
                environment: self.environment.name.clone(),
                integration: "hubspot".parse()?,
                received_at: chrono::Utc::now(),
                delivery_id: format!("bench-{batch}-{w}"),
                method: "POST".into(),
                path: None,
                query: None,
                headers: vec![("content-type".into(), "application/json".into())],
                body: Bytes::from(serde_json::to_vec(&events)?),
                verification: hookyard_core::providers::Verification::Unsigned,
                traceparent: None,
            };
            acks.push(
                self.bus
                    .jetstream
                    .publish_with_headers(envelope.subject(), envelope.to_headers(), envelope.body.clone())
                    .await?,
            );
            // Each pending ack holds one of the context's 5,000 permits until awaited.
            if acks.len() == 1000 || w + 1 == webhooks {
                for ack in acks.drain(..) {
                    last = ack.await?.sequence;
                }
            }
        }
        Ok(last)
    }

    /// Messages in `HOOKS_CONN`.
    pub async fn routed(&self) -> anyhow::Result<usize> {
        Ok(self
            .bus
            .jetstream
            .get_stream(CONN_STREAM)
            .await?
            .info()
            .await?
            .state
            .messages as usize)
    }
}

pub async fn run(batches: &[usize], events_per_size: usize, store_kind: StoreKind) -> anyhow::Result<()> {
    let bench = HubspotBench::start(store_kind).await?;
    let HubspotBench {
        nats,
        config,
        store,
        bus,
        ..
    } = &bench;
    let nats_pid = nats.pid().unwrap_or(0);

    println!(
        "router benchmark: HubSpot batches over two connections, {store_kind:?} store, one router (64 webhooks in flight)\n"
    );
    println!(
        "{:>6} {:>9} {:>11} {:>12} {:>15} {:>17}",
        "batch", "webhooks", "webhooks/s", "events/s", "router CPU/evt", "nats-server CPU/evt"
    );
    for &batch in batches {
        let webhooks = (events_per_size / batch).max(1);
        let last = bench.fill(batch, webhooks).await?;

        let shutdown = CancellationToken::new();
        let router = Arc::new(Router::new(store.clone(), bus, config)?);
        let cpu = CpuMeter::start(nats_pid);
        let started = Instant::now();
        let task = tokio::spawn(router.run(shutdown.clone()));
        while !hookyard_router::acked_through(&bus.jetstream, last).await? {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let cpu = cpu.stop();
        shutdown.cancel();
        let _ = task.await;
        let routed = bench.routed().await?;
        anyhow::ensure!(
            routed == webhooks * batch,
            "expected {} routed events, found {routed}",
            webhooks * batch
        );
        let (own, server) = cpu.per_thousand(routed as u64);
        println!(
            "{batch:>6} {webhooks:>9} {:>11.0} {:>12.0} {:>12.1} µs {:>14.1} µs",
            webhooks as f64 / elapsed,
            routed as f64 / elapsed,
            own,
            server,
        );
    }
    Ok(())
}
