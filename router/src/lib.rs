//! The router (`hookyard router`, and inside `hookyard dev`): a durable consumer on
//! `HOOKS_RAW`. For each webhook it splits the body into events (the provider catalog's
//! rules), resolves each event's connections ([`resolve`]), and publishes one message
//! per (event, connection) to `HOOKS_CONN`, or one under `hooks.unrouted.*` saying why
//! none matched. The raw message is acked only after every publish is acked; message ids
//! `{raw-seq}:{index}:{connection}` make a redelivery publish nothing twice.

mod fresh;
pub mod redrive;
pub mod replay;
pub mod resolve;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::{self, AckKind};
use hookyard_core::config::RouterConfig;
use hookyard_core::envelope::EnvelopeError;
use hookyard_core::oplog::OpLog;
use hookyard_core::providers::events::events;
use hookyard_core::providers::{Catalog, CatalogError, Inbound, Route};
use hookyard_core::routed::RoutedEvent;
use hookyard_core::store::logs::WebhookEntry;
use hookyard_core::store::StoreError;
use hookyard_core::streams::{consume, durable, with_heartbeat, Bus, Share, StreamsError, PULL_BATCH, RAW_STREAM};
use hookyard_core::trace_context::{continue_trace, current_traceparent};
use hookyard_core::{Config, Envelope, Store};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use resolve::Resolver;

/// The durable consumer's name: every router replica shares it (and the work).
pub const CONSUMER: &str = "router";
/// Raw messages handled at once per router.
const CONCURRENCY: usize = 64;
/// What one router takes of its consumer.
const SHARE: Share = Share {
    concurrency: CONCURRENCY,
    batch: PULL_BATCH,
};
/// Publishes of one webhook awaiting their acks at once. Each pending ack holds one of
/// the JetStream context's 5,000 ack permits until awaited: every webhook in flight
/// holding its window must fit, or all of them would wait on each other forever.
const PUBLISH_WINDOW: usize = 64;
const _: () = assert!(CONCURRENCY * PUBLISH_WINDOW < 5_000);
/// After a failure (NATS, the database), try the message again after this.
const RETRY_DELAY: Duration = Duration::from_secs(1);
/// An envelope newer than this router reads waits this long for another router (one
/// already upgraded, in a rolling upgrade) to take it.
const NEWER_FORMAT_DELAY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error(transparent)]
    Streams(#[from] StreamsError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A store error shared by every webhook that waited for the same read.
    #[error(transparent)]
    SharedStore(#[from] Arc<StoreError>),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("JetStream: {0}")]
    JetStream(String),
    /// A replay that cannot run as asked (retrying would not help).
    #[error("{0}")]
    Replay(String),
}

impl RouterError {
    /// Whether trying again later can succeed (NATS or the database away).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            RouterError::JetStream(_) | RouterError::Store(_) | RouterError::SharedStore(_) | RouterError::Streams(_)
        )
    }
}

fn jetstream_error(e: impl std::fmt::Display) -> RouterError {
    RouterError::JetStream(e.to_string())
}

/// What became of one raw message.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub routed: usize,
    pub unrouted: usize,
}

pub struct Router {
    store: Store,
    /// Each webhook's routing, for the operation log.
    oplog: OpLog,
    resolver: Resolver,
    jetstream: jetstream::Context,
    config: RouterConfig,
}

impl Router {
    pub fn new(store: Store, bus: &Bus, config: &Config) -> Result<Router, RouterError> {
        hookyard_core::metrics::install();
        Ok(Router {
            resolver: Resolver::new(store.clone(), Arc::new(Catalog::embedded()?)),
            oplog: OpLog::start(store.clone(), &config.logs),
            store,
            jetstream: bus.jetstream.clone(),
            config: config.router.clone(),
        })
    }

    /// Consumes `HOOKS_RAW` until `shutdown`; messages in progress finish first. Runs
    /// replays and carries out the dead letters' redrives meanwhile.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> Result<(), RouterError> {
        let redriver = redrive::Redriver::new(self.store.clone(), self.jetstream.clone());
        let redrives = tokio::spawn(redriver.run(shutdown.clone()));
        let replayer = replay::Replayer::new(self.clone(), self.store.clone(), self.config.replay_max_backlog);
        let replays = tokio::spawn(replayer.run(shutdown.clone()));
        // Create or update: a changed `router.ack_wait` takes effect at the next start.
        let config = durable(CONSUMER, "hookyard router", self.config.ack_wait, SHARE);
        let jetstream = self.jetstream.clone();
        consume(&jetstream, RAW_STREAM, config, SHARE, shutdown, |message| {
            let router = self.clone();
            async move { router.handle(message).await }
        })
        .await?;
        let _ = tokio::join!(redrives, replays);
        tracing::info!("router stopped");
        Ok(())
    }

    async fn handle(&self, message: jetstream::Message) {
        let sequence = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        let envelope = match Envelope::from_message(&message.subject, message.headers.as_ref(), message.payload.clone())
        {
            Ok(envelope) => envelope,
            Err(error @ EnvelopeError::Format(_)) => {
                tracing::error!(sequence, %error, "webhook from a newer ingest; upgrade this router (the webhook waits for one that reads it)");
                let _ = message.ack_with(AckKind::Nak(Some(NEWER_FORMAT_DELAY))).await;
                return;
            }
            Err(error) => {
                // Not ours and never will be: retrying cannot help.
                tracing::error!(sequence, subject = %message.subject, %error, "not a hookyard envelope; left in {RAW_STREAM}, not routed");
                let _ = message.ack_with(AckKind::Term).await;
                return;
            }
        };
        // One trace per webhook: the router's span continues ingest's.
        let span = tracing::info_span!(
            "route_webhook", raw_seq = sequence, integration = %envelope.integration, trace_id = tracing::field::Empty
        );
        continue_trace(&span, envelope.traceparent.as_deref());
        // The webhook stays this router's while it is routed, however long that takes
        // (a batch of thousands of events, a slow database): `ack_wait` need only cover
        // a router that died.
        let routing = self.route(sequence, &envelope).instrument(span);
        let routed = with_heartbeat(routing, self.config.ack_wait / 3, || async {
            let _ = message.ack_with(AckKind::Progress).await;
        })
        .await;
        match routed {
            Ok(outcome) => {
                tracing::debug!(
                    sequence,
                    routed = outcome.routed,
                    unrouted = outcome.unrouted,
                    "webhook routed"
                );
                if let Err(error) = message.double_ack().await {
                    tracing::warn!(sequence, %error, "ack failed; the webhook will be routed again (without duplicates)");
                }
            }
            Err(error) => {
                tracing::warn!(sequence, %error, "routing failed; retrying");
                let _ = message.ack_with(AckKind::Nak(Some(RETRY_DELAY))).await;
            }
        }
    }

    /// Routes one webhook (the envelope at `raw_seq` in `HOOKS_RAW`) and publishes its
    /// events, returning once every publish is acked.
    pub async fn route(&self, raw_seq: u64, envelope: &Envelope) -> Result<Outcome, RouterError> {
        let routed = self.resolve(raw_seq, envelope).await?;
        let mut acks = Vec::with_capacity(PUBLISH_WINDOW);
        let mut outcome = Outcome::default();
        for event in &routed {
            if acks.len() == PUBLISH_WINDOW {
                await_acks(&mut acks).await?;
            }
            if event.connection_id.is_some() {
                outcome.routed += 1;
            } else {
                outcome.unrouted += 1;
                tracing::info!(
                    raw_seq, index = event.index, integration = %event.integration,
                    reason = event.unrouted.as_deref().unwrap_or(""), "event unrouted"
                );
            }
            let (subject, headers, payload) = event.to_message();
            let ack = self
                .jetstream
                .publish_with_headers(subject, headers, payload)
                .await
                .map_err(jetstream_error)?;
            acks.push(ack);
        }
        await_acks(&mut acks).await?;
        self.log_routing(raw_seq, envelope, &routed);
        Ok(outcome)
    }

    /// The webhook's entry in the operation log (accepted, as ingest stored it), with its
    /// routing: the connections it reached, or why it reached none, and its event types.
    fn log_routing(&self, raw_seq: u64, envelope: &Envelope, routed: &[RoutedEvent]) {
        let mut connections: Vec<&str> = routed.iter().filter_map(|e| e.connection_id.as_deref()).collect();
        connections.sort_unstable();
        connections.dedup();
        let mut unrouted: Vec<&str> = routed.iter().filter_map(|e| e.unrouted.as_deref()).collect();
        unrouted.sort_unstable();
        unrouted.dedup();
        // The event types, so that a webhook no sync ran on can be told by its type.
        let mut types: Vec<&str> = routed.iter().filter_map(|e| e.event_type.as_deref()).collect();
        types.sort_unstable();
        types.dedup();
        let status = match (connections.is_empty(), unrouted.is_empty()) {
            (false, true) => "routed",
            (true, _) => "unrouted",
            (false, false) => "partly_routed",
        };
        self.oplog.webhook(WebhookEntry {
            environment: envelope.environment.to_string(),
            integration: envelope.integration.to_string(),
            raw_seq: Some(raw_seq as i64),
            delivery_id: Some(envelope.delivery_id.clone()),
            received_at: envelope.received_at,
            status: "accepted".into(),
            detail: Some(envelope.verification.as_str().into()),
            bytes: envelope.body.len() as i64,
            routing: Some(serde_json::json!({
                "at": chrono::Utc::now(),
                "status": status,
                "events": routed.len(),
                "connections": connections,
                "unrouted": unrouted,
                "types": types,
            })),
        });
    }

    /// The messages one webhook becomes.
    pub async fn resolve(&self, raw_seq: u64, envelope: &Envelope) -> Result<Vec<RoutedEvent>, RouterError> {
        self.resolve_within(raw_seq, envelope, Duration::ZERO).await
    }

    /// As [`Router::resolve`], with connections as of at most `staleness` ago.
    pub async fn resolve_within(
        &self,
        raw_seq: u64,
        envelope: &Envelope,
        staleness: Duration,
    ) -> Result<Vec<RoutedEvent>, RouterError> {
        let traceparent = current_traceparent();
        let unrouted =
            |index: u32, event_type: Option<String>, payload: serde_json::Value, reason: String| RoutedEvent {
                environment: envelope.environment.clone(),
                integration: envelope.integration.clone(),
                connection_id: None,
                unrouted: Some(reason),
                raw_seq,
                index,
                event_type,
                delivery_id: envelope.delivery_id.clone(),
                payload,
                traceparent: traceparent.clone(),
                origin: Default::default(),
            };
        let Some(state) = self
            .resolver
            .integration(&envelope.environment, &envelope.integration)
            .await?
        else {
            let body = serde_json::Value::String(String::from_utf8_lossy(&envelope.body).into_owned());
            return Ok(vec![unrouted(0, None, body, "the integration no longer exists".into())]);
        };
        let request = Inbound::from_envelope(envelope);
        let connections = self.resolver.connections_within(&state, staleness).await?;
        let mut out = Vec::new();
        for event in events(&state.rules, &request) {
            let chosen = connections.select(&event.route);
            if chosen.is_empty() {
                let reason = match &event.route {
                    Route::Missing => "the event names no account to route by".to_string(),
                    Route::Values(target, values) => format!("no live connection has {target:?} = {values:?}"),
                    Route::ConnectionIds(ids) => format!("no live connection has id {ids:?}"),
                    Route::All => "the integration has no live connections".to_string(),
                };
                out.push(unrouted(event.index, event.event_type, event.payload, reason));
                continue;
            }
            for connection_id in chosen {
                out.push(RoutedEvent {
                    environment: envelope.environment.clone(),
                    integration: envelope.integration.clone(),
                    connection_id: Some(connection_id),
                    unrouted: None,
                    raw_seq,
                    index: event.index,
                    event_type: event.event_type.clone(),
                    delivery_id: envelope.delivery_id.clone(),
                    payload: event.payload.clone(),
                    traceparent: traceparent.clone(),
                    origin: Default::default(),
                });
            }
        }
        Ok(out)
    }
}

async fn await_acks(acks: &mut Vec<async_nats::jetstream::context::PublishAckFuture>) -> Result<(), RouterError> {
    let pending = acks.drain(..).map(std::future::IntoFuture::into_future);
    for ack in futures::future::join_all(pending).await {
        ack.map_err(jetstream_error)?;
    }
    Ok(())
}

/// True once the routers have acked every webhook in `HOOKS_RAW` up to `sequence` and
/// hold none unacked: everything before it is in `HOOKS_CONN`. False while the durable
/// consumer does not exist yet.
pub async fn acked_through(jetstream: &jetstream::Context, sequence: u64) -> Result<bool, RouterError> {
    let stream = jetstream.get_stream(RAW_STREAM).await.map_err(jetstream_error)?;
    let Ok(mut consumer) = stream.get_consumer::<pull::Config>(CONSUMER).await else {
        return Ok(false);
    };
    let info = consumer.info().await.map_err(jetstream_error)?;
    Ok(info.ack_floor.stream_sequence >= sequence && info.num_ack_pending == 0)
}

/// `hookyard router`: connect, route until shutdown.
pub async fn run(config: &Config, shutdown: CancellationToken) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let store = Store::connect_with(&config.database_url, config.cipher()?, config.database_max_connections).await?;
    let bus = Bus::connect(config, "hookyard-router").await?;
    if !bus.set_up_streams(&config.streams, &store, &shutdown).await? {
        return Ok(());
    }
    hookyard_core::metrics::serve_configured(config, Some(bus.jetstream.clone()), &shutdown);
    Arc::new(Router::new(store, &bus, config)?).run(shutdown).await?;
    Ok(())
}
