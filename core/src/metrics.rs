//! Prometheus metrics. Each process installs one recorder; `GET /metrics` renders it on
//! `telemetry.metrics_listen`, a listener of its own (ingest's faces the internet, and
//! integration keys are labels), for every service; `hookyard dev` serves it on
//! 127.0.0.1:3005 unless told otherwise.
//!
//! Besides what the code counts as it goes (see [`names`]), a scrape reads the
//! JetStream consumers' pending and ack-pending counts, so a stopped worker's backlog
//! shows on any process that is still up.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt as _;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::sync::Mutex;

use crate::streams::{CONN_STREAM, EXEC_STREAM, FWD_STREAM, RAW_STREAM};

/// The metric names, in one place.
pub mod names {
    /// Webhooks that reached ingest, by `integration` and `outcome`.
    pub const WEBHOOKS_RECEIVED: &str = "hookyard_webhooks_received_total";
    /// From publishing a webhook to JetStream's ack.
    pub const PUBLISH_ACK_SECONDS: &str = "hookyard_publish_ack_seconds";
    /// Per durable consumer (`stream`, `consumer`): messages not delivered yet, and
    /// delivered but not acked.
    pub const CONSUMER_PENDING: &str = "hookyard_consumer_pending";
    pub const CONSUMER_ACK_PENDING: &str = "hookyard_consumer_ack_pending";
    /// Function executions by `kind` (on_webhook, exec, event, action) and `status` (ok,
    /// failed).
    pub const EXECUTIONS: &str = "hookyard_executions_total";
    pub const EXECUTION_SECONDS: &str = "hookyard_execution_seconds";
    /// Record writes committed, by `action` (added, updated, deleted).
    pub const RECORD_WRITES: &str = "hookyard_record_writes_total";
    /// Delivery attempts to customers' apps, by `status` (2xx, 4xx, 5xx, error).
    pub const FORWARD_ATTEMPTS: &str = "hookyard_forward_attempts_total";
    /// Dead letters written, by `kind` (function, forward, exec).
    pub const DEAD_LETTERS: &str = "hookyard_dead_letters_total";
    /// Replays: webhooks read and events published.
    pub const REPLAY_READ: &str = "hookyard_replay_webhooks_read_total";
    pub const REPLAY_PUBLISHED: &str = "hookyard_replay_events_published_total";
    pub const REPLAYS_RUNNING: &str = "hookyard_replays_running";
    /// Asynchronous actions due and not taken by a worker yet (the backlog), and those
    /// running, across the environments: the same figures from every worker.
    pub const ASYNC_ACTIONS_WAITING: &str = "hookyard_async_actions_waiting";
    pub const ASYNC_ACTIONS_RUNNING: &str = "hookyard_async_actions_running";
    /// OAuth2 token refreshes a run needed, by `outcome`: `refreshed` (it traded the
    /// refresh token), `shared` (another run's refresh, stored meanwhile, was taken),
    /// `failed`.
    pub const OAUTH2_REFRESHES: &str = "hookyard_oauth2_refreshes_total";
    /// Refreshes that found another run refreshing the same connection and waited for it.
    pub const OAUTH2_REFRESH_WAITS: &str = "hookyard_oauth2_refresh_waits_total";
    /// Provider rate limits, by `outcome`: `limited` (a rate-limit answer, a 429 or the
    /// provider's own, paused its connection's calls), `spent` (an answer with nothing
    /// remaining paused them before any refusal), `waited` (a call held until the pause
    /// ended), `gave_up` (a call failed because the pause outlasted its run), `held` (a
    /// webhook run of a connection limited lately that took its turn).
    pub const PROVIDER_RATE_LIMITS: &str = "hookyard_provider_rate_limits_total";
    /// Provider reads (GETs) answered by an identical one of the same connection already
    /// in flight, sent after the run's events came, instead of a request of their own.
    pub const PROVIDER_READS_SHARED: &str = "hookyard_provider_reads_shared_total";
    /// Copies of syncs loaded on the process's JS threads: one QuickJS runtime each (some
    /// 3 MB with zod models), kept by each thread for the syncs it runs.
    pub const SYNCS_LOADED: &str = "hookyard_js_syncs_loaded";
    /// Provider calls that waited for another of their connection's to end, its
    /// integration bounding the calls in flight at once (`api.max_concurrent_calls`).
    pub const PROVIDER_CALLS_QUEUED: &str = "hookyard_provider_calls_queued_total";
}

/// Latency buckets (seconds) for every `_seconds` histogram.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Consumer counts are read from JetStream at most this often.
const CONSUMERS_EVERY: Duration = Duration::from_secs(1);

/// How often histogram samples are folded into their buckets. The recorder keeps every
/// sample until then (a scrape folds them too), so without this a process nobody
/// scrapes would grow by about 16 bytes per sample: per webhook in ingest, per execution
/// in a worker.
pub const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// The process's recorder, installed on first use.
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
            .expect("the buckets are not empty");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("another metrics recorder is installed; /metrics shows nothing of it");
        }
        spawn_upkeep(handle.clone());
        handle
    })
}

/// A thread rather than a task: the recorder can be installed outside a runtime, and
/// the upkeep must outlive any one of them.
fn spawn_upkeep(handle: PrometheusHandle) {
    let upkeep = move || loop {
        std::thread::sleep(UPKEEP_EVERY);
        handle.run_upkeep();
    };
    if let Err(error) = std::thread::Builder::new().name("metrics-upkeep".into()).spawn(upkeep) {
        tracing::warn!(%error, "no metrics upkeep thread: histogram samples are only folded by a scrape");
    }
}

/// Installs the recorder now, so that what is counted before the first scrape counts.
pub fn install() {
    handle();
}

/// The text exposition, with the consumer counts read fresh (when `jetstream` is given).
pub async fn render(jetstream: Option<&jetstream::Context>) -> String {
    if let Some(jetstream) = jetstream {
        observe_consumers(jetstream).await;
    }
    handle().render()
}

/// Sets the pending gauges of every durable consumer of hookyard's streams.
async fn observe_consumers(jetstream: &jetstream::Context) {
    static LAST: Mutex<Option<Instant>> = Mutex::const_new(None);
    let mut last = LAST.lock().await;
    if last.is_some_and(|at| at.elapsed() < CONSUMERS_EVERY) {
        return;
    }
    for stream_name in [RAW_STREAM, CONN_STREAM, FWD_STREAM, EXEC_STREAM] {
        let Ok(stream) = jetstream.get_stream(stream_name).await else {
            continue;
        };
        let mut consumers = stream.consumers();
        while let Some(Ok(info)) = consumers.next().await {
            let Some(name) = info.config.durable_name.clone() else {
                continue;
            };
            let labels = [("stream", stream_name.to_string()), ("consumer", name)];
            metrics::gauge!(names::CONSUMER_PENDING, &labels).set(info.num_pending as f64);
            metrics::gauge!(names::CONSUMER_ACK_PENDING, &labels).set(info.num_ack_pending as f64);
        }
    }
    *last = Some(Instant::now());
}

/// `GET /metrics`, and the probes of services that have no listener of their own
/// (router, worker, reconciler): `/healthz` (the process is up) and, with NATS,
/// `/readyz` (connected to it).
fn route(jetstream: Option<jetstream::Context>) -> axum::Router {
    use axum::routing::get;
    let router = axum::Router::new()
        .route(
            "/healthz",
            get(|| async { axum::Json(serde_json::json!({"status": "up"})) }),
        )
        .route(
            "/metrics",
            get({
                let jetstream = jetstream.clone();
                move || {
                    let jetstream = jetstream.clone();
                    async move {
                        (
                            [(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                            render(jetstream.as_ref()).await,
                        )
                    }
                }
            }),
        );
    let Some(jetstream) = jetstream else {
        return router;
    };
    let client = jetstream.client();
    router.route(
        "/readyz",
        get(move || {
            let connected = client.connection_state() == async_nats::connection::State::Connected;
            let status = if connected {
                axum::http::StatusCode::OK
            } else {
                axum::http::StatusCode::SERVICE_UNAVAILABLE
            };
            async move {
                (
                    status,
                    axum::Json(serde_json::json!({"ready": connected, "nats_connected": connected})),
                )
            }
        }),
    )
}

/// Serves `GET /metrics` on `listen` until `shutdown`.
pub async fn serve(
    listen: std::net::SocketAddr,
    jetstream: Option<jetstream::Context>,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {listen} for metrics: {e}")))?;
    tracing::info!(%listen, "metrics on /metrics, probes on /healthz and /readyz");
    axum::serve(listener, route(jetstream))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// Serves `GET /metrics` on `telemetry.metrics_listen`, when it is set, until `shutdown`.
pub fn serve_configured(
    config: &crate::Config,
    jetstream: Option<jetstream::Context>,
    shutdown: &tokio_util::sync::CancellationToken,
) {
    let Some(listen) = config.telemetry.metrics_listen else {
        return;
    };
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        if let Err(error) = serve(listen, jetstream, shutdown).await {
            tracing::error!(%error, "metrics are not served");
        }
    });
}
