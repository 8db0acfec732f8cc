//! ingest: the HTTP edge. A webhook is answered 2xx only after JetStream has acked it;
//! when that cannot happen in time the answer is 503 with `Retry-After`, so the
//! provider retries. Nothing else happens here: no database on the hot path (settings
//! are cached), no routing, no function code.
//!
//! One request, top to bottom: [`receive::receive_webhook`] → [`settings`] lookup →
//! [`admission`] → [`publish::Publisher::publish_envelope`].

pub mod admission;
pub mod error;
pub mod health;
pub mod publish;
pub mod receive;
pub mod settings;

use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, on, MethodFilter};
use axum::serve::ListenerExt;
use axum::Router;
use hookyard_core::oplog::OpLog;
use hookyard_core::providers::Catalog;
use hookyard_core::streams::Bus;
use hookyard_core::{Config, Store};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use admission::Admission;
use error::IngestError;
use publish::Publisher;
use settings::SettingsCache;

/// Room left in a NATS message for the envelope's headers beyond the body.
const HEADER_ALLOWANCE: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Streams(#[from] hookyard_core::streams::StreamsError),
    #[error(transparent)]
    Store(#[from] hookyard_core::store::StoreError),
    #[error(transparent)]
    Catalog(#[from] hookyard_core::providers::CatalogError),
    #[error(
        "the NATS server accepts messages up to {max_payload} bytes, but ingest.max_body_bytes is {max_body}; \
         set `max_payload: {suggest}MB` in the nats-server configuration or lower HOOKYARD_INGEST__MAX_BODY_BYTES"
    )]
    PayloadLimit {
        max_payload: usize,
        max_body: usize,
        suggest: usize,
    },
    #[error("stopped before the streams were set up")]
    Stopped,
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Everything a request needs, shared by all of them.
pub struct Ingest {
    pub settings: SettingsCache,
    /// Where providers reach ingest (`ingest.public_url`), for schemes that sign the URL.
    pub public_base_url: String,
    pub admission: Admission,
    pub publisher: Publisher,
    pub bus: Bus,
    pub max_body_bytes: usize,
    pub body_read_timeout: std::time::Duration,
    pub retry_after_secs: u64,
    /// Where each webhook's entry in the operation log goes (queued, never awaited).
    pub oplog: OpLog,
    /// Registered once: a lookup per webhook costs more than the recording.
    pub publish_ack_seconds: metrics::Histogram,
}

impl Ingest {
    /// Checks the bus can carry the largest body, sets up the streams (waiting for a
    /// server that does not answer yet; [`StartError::Stopped`] if `shutdown` comes
    /// first) and loads the settings cache (which then refreshes itself until `shutdown`).
    pub async fn start(
        config: &Config,
        store: Store,
        bus: Bus,
        shutdown: CancellationToken,
    ) -> Result<Arc<Ingest>, StartError> {
        let max_payload = bus.client.server_info().max_payload;
        let max_body = config.ingest.max_body_bytes;
        if max_body + HEADER_ALLOWANCE > max_payload {
            return Err(StartError::PayloadLimit {
                max_payload,
                max_body,
                suggest: (max_body + HEADER_ALLOWANCE).div_ceil(1024 * 1024),
            });
        }
        if !bus.set_up_streams(&config.streams, &store, &shutdown).await? {
            return Err(StartError::Stopped);
        }
        let catalog = Arc::new(Catalog::embedded()?);
        hookyard_core::metrics::install();
        let oplog = OpLog::start(store.clone(), &config.logs);
        let settings = SettingsCache::load(store, catalog, config.ingest.settings_refresh, shutdown).await?;
        Ok(Arc::new(Ingest {
            settings,
            public_base_url: config.webhook_base_url(),
            admission: Admission::new(config.ingest.max_in_flight, config.ingest.max_in_flight_bytes),
            publisher: Publisher::new(&bus, config.ingest.publish_timeout),
            bus,
            max_body_bytes: max_body,
            body_read_timeout: config.ingest.body_read_timeout,
            retry_after_secs: config.ingest.retry_after.as_secs().max(1),
            oplog,
            publish_ack_seconds: metrics::histogram!(hookyard_core::metrics::names::PUBLISH_ACK_SECONDS),
        }))
    }
}

/// The routes: webhooks (with or without a trailing path) and health. Metrics are not
/// served here (this listener faces the internet) but on `telemetry.metrics_listen`.
pub fn app(ingest: Arc<Ingest>) -> Router {
    let methods = MethodFilter::POST.or(MethodFilter::GET).or(MethodFilter::HEAD);
    Router::new()
        .route(
            "/webhook/{environment}/{integration}",
            on(methods, receive::receive_webhook),
        )
        .route(
            "/webhook/{environment}/{integration}/{*rest}",
            on(methods, receive::receive_webhook),
        )
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .fallback(|| async { IngestError::NoRoute })
        .method_not_allowed_fallback(|| async { IngestError::MethodNotAllowed })
        .with_state(ingest)
}

/// Serves until `shutdown`, then stops accepting and waits for every in-flight request
/// (each bounded by the publish timeout) before flushing the NATS connection.
/// How long the stop waits for NATS to take the client's last writes.
const SHUTDOWN_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

pub async fn serve(listener: TcpListener, ingest: Arc<Ingest>, shutdown: CancellationToken) -> std::io::Result<()> {
    let client = ingest.bus.client.clone();
    // Webhook answers are small; Nagle's algorithm would hold them back.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app(ingest))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    // Every accepted webhook has its ack already; the flush only sends what is left in
    // the client's buffer, and must not hold the exit while NATS is away (it would wait
    // for a reconnection that may never come).
    match tokio::time::timeout(SHUTDOWN_FLUSH_TIMEOUT, client.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(%error, "flushing NATS at shutdown failed"),
        Err(_) => tracing::warn!(
            timeout = ?SHUTDOWN_FLUSH_TIMEOUT,
            "NATS did not take the last writes at shutdown; stopping without them"
        ),
    }
    tracing::info!("ingest stopped");
    Ok(())
}

/// `hookyard ingest`: connect, start, serve until shutdown.
pub async fn run(config: &Config, shutdown: CancellationToken) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let store = Store::connect_with(&config.database_url, config.cipher()?, config.database_max_connections).await?;
    let bus = Bus::connect(config, "hookyard-ingest").await?;
    let ingest = match Ingest::start(config, store, bus.clone(), shutdown.clone()).await {
        Err(StartError::Stopped) => return Ok(()),
        started => started?,
    };
    hookyard_core::metrics::serve_configured(config, Some(bus.jetstream), &shutdown);
    let addr = config.ingest.listen;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Listen { addr, source })?;
    tracing::info!(%addr, "ingest listening");
    serve(listener, ingest, shutdown).await?;
    Ok(())
}
