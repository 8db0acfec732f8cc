//! The forwarder: a durable consumer (`forwarder`) on `HOOKS_CONN`, independent of the
//! functions consumer, so a slow customer app never delays functions and the reverse.
//! For each event whose integration forwards, it puts one delivery per destination into
//! `HOOKS_FWD` (with a message id, so a redelivered event adds none twice), then acks.
//! [`crate::deliver`] sends them.
//!
//! An attributed event is forwarded as Nango's `{from, type: "forward", connectionId,
//! providerConfigKey, payload}` (keys sorted); an unrouted one as the raw provider body,
//! once per webhook.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
pub use hookyard_core::delivery::Delivery;
use hookyard_core::keys::{EnvironmentName, IntegrationKey};
use hookyard_core::routed::RoutedEvent;
use hookyard_core::store::forwarding::ForwardTargets;
use hookyard_core::streams::{consume, durable, Share, CONN_STREAM, PULL_BATCH, RAW_STREAM};
use hookyard_core::trace_context::continue_trace;
use hookyard_core::Envelope;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::settings::Settings;
use crate::{jetstream_error, WorkerError};

pub const FORWARDER: &str = hookyard_core::streams::FORWARDER_CONSUMER;
/// Events handled at once per worker; [`PULL_BATCH`] asked for per pull.
const SHARE: Share = Share {
    concurrency: 64,
    batch: PULL_BATCH,
};
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// Puts `deliveries` into `HOOKS_FWD`, returning once every one is stored.
pub async fn publish_deliveries(jetstream: &jetstream::Context, deliveries: Vec<Delivery>) -> Result<(), WorkerError> {
    let mut acks = Vec::with_capacity(deliveries.len());
    for delivery in &deliveries {
        let (subject, headers, payload) = delivery.to_message();
        acks.push(
            jetstream
                .publish_with_headers(subject, headers, payload)
                .await
                .map_err(jetstream_error)?,
        );
    }
    for ack in acks {
        ack.await.map_err(jetstream_error)?;
    }
    Ok(())
}

/// One connection's announcement (an `async_action` or `auth` webhook): one delivery of
/// `body` to each of the connection's forwarding destinations, if its environment
/// forwards and `wanted` (the environment's setting for that kind) says so.
pub async fn announcement(
    settings: &Settings,
    (environment, integration, connection): (&EnvironmentName, &IntegrationKey, &str),
    (kind, key): (&str, &str),
    body: &[u8],
    wanted: fn(&ForwardTargets) -> bool,
) -> Result<Vec<Delivery>, WorkerError> {
    let Some(forwarding) = settings.forwarding_environment(environment).await? else {
        return Ok(Vec::new());
    };
    let targets = settings.targets(&forwarding, Some((integration, connection))).await?;
    if !wanted(&targets) {
        return Ok(Vec::new());
    }
    Ok(targets
        .urls
        .iter()
        .map(|url| {
            Delivery::new(
                key,
                environment.as_str(),
                integration.as_str(),
                Some(connection),
                url,
                kind,
                body,
                Vec::new(),
            )
        })
        .collect())
}

/// Request headers of the provider's that are not passed on.
const NOT_FORWARDED: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "authorization",
    "cookie",
    "content-length",
    // Ours are set on the forward; the provider's of the same name would contradict them.
    "x-nango-hmac-sha256",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
];

pub fn forwarded_headers(envelope: &Envelope, keep_content_type: bool) -> Vec<(String, String)> {
    envelope
        .headers
        .iter()
        .filter(|(name, _)| !NOT_FORWARDED.contains(&name.as_str()))
        .filter(|(name, _)| keep_content_type || name != "content-type")
        .cloned()
        .collect()
}

pub struct Forwarder {
    settings: Arc<Settings>,
    jetstream: jetstream::Context,
    /// Envelopes by `HOOKS_RAW` sequence: a webhook's events arrive together.
    envelopes: Mutex<HashMap<u64, Option<Arc<Envelope>>>>,
    raw: tokio::sync::OnceCell<jetstream::stream::Stream>,
}

impl Forwarder {
    pub fn new(settings: Arc<Settings>, jetstream: jetstream::Context) -> Forwarder {
        Forwarder {
            settings,
            jetstream,
            envelopes: Mutex::new(HashMap::new()),
            raw: tokio::sync::OnceCell::new(),
        }
    }

    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> Result<(), WorkerError> {
        let config = durable(
            FORWARDER,
            "hookyard worker: forwarding to customers' apps",
            Duration::from_secs(30),
            SHARE,
        );
        let jetstream = self.jetstream.clone();
        consume(&jetstream, CONN_STREAM, config, SHARE, shutdown, |message| {
            let forwarder = self.clone();
            async move { forwarder.handle(message).await }
        })
        .await?;
        Ok(())
    }

    async fn handle(&self, message: jetstream::Message) {
        // Most environments forward nothing: settle those from the subject alone.
        let environment = message.subject.split('.').nth(2).and_then(|name| name.parse().ok());
        if let Some(environment) = environment {
            if let Ok(None) = self.settings.forwarding_environment(&environment).await {
                let _ = message.ack().await;
                return;
            }
        }
        let event = match RoutedEvent::from_message(&message.subject, message.headers.as_ref(), &message.payload) {
            Ok(event) => event,
            Err(error) => {
                tracing::error!(subject = %message.subject, %error, "not a routed event; not forwarded");
                let _ = message.ack_with(AckKind::Term).await;
                return;
            }
        };
        let span = tracing::info_span!(
            "forward_event", message = %event.message_id(), trace_id = tracing::field::Empty
        );
        continue_trace(&span, event.traceparent.as_deref());
        match self.forward(&event).instrument(span).await {
            Ok(()) => {
                let _ = message.ack().await;
            }
            Err(error) => {
                tracing::warn!(%error, message = %event.message_id(), "forwarding failed; retrying");
                let _ = message.ack_with(AckKind::Nak(Some(RETRY_DELAY))).await;
            }
        }
    }

    /// Puts the event's deliveries into `HOOKS_FWD`, returning once they are stored.
    pub async fn forward(&self, event: &RoutedEvent) -> Result<(), WorkerError> {
        if !event.origin.for_forwarding() {
            return Ok(());
        }
        let Some(environment) = self.settings.forwarding_environment(&event.environment).await? else {
            return Ok(());
        };
        let Some(integration) = self.settings.integration(environment.id, &event.integration).await? else {
            return Ok(());
        };
        if !integration.forward_webhooks {
            return Ok(());
        }
        let connection = event.connection_id.as_deref().map(|c| (&event.integration, c));
        let targets = self.settings.targets(&environment, connection).await?;
        if targets.urls.is_empty() {
            return Ok(());
        }
        let envelope = self.envelope(event.raw_seq).await;
        let (key, body, headers) = match &event.connection_id {
            Some(connection_id) => {
                let body = serde_json::json!({
                    "from": integration.provider,
                    "type": "forward",
                    "connectionId": connection_id,
                    "providerConfigKey": event.integration,
                    "payload": event.payload,
                });
                let headers = envelope
                    .as_deref()
                    .map(|e| forwarded_headers(e, false))
                    .unwrap_or_default();
                (
                    event.message_id(),
                    serde_json::to_vec(&body).expect("JSON serialises"),
                    headers,
                )
            }
            // The raw body, once per webhook (its unrouted events share the key).
            None => match envelope.as_deref() {
                Some(envelope) => (
                    format!("{}:raw{}", event.raw_seq, event.origin.suffix()),
                    envelope.body.to_vec(),
                    forwarded_headers(envelope, true),
                ),
                None => (
                    format!("{}:raw{}", event.raw_seq, event.origin.suffix()),
                    event.payload.to_string().into_bytes(),
                    Vec::new(),
                ),
            },
        };
        let deliveries = targets
            .urls
            .iter()
            .map(|url| Delivery {
                raw_seq: Some(event.raw_seq),
                ..Delivery::new(
                    &key,
                    environment.name.as_str(),
                    event.integration.as_str(),
                    event.connection_id.as_deref(),
                    url,
                    "forward",
                    &body,
                    headers.clone(),
                )
            })
            .collect();
        publish_deliveries(&self.jetstream, deliveries).await
    }

    /// The webhook at `sequence` in `HOOKS_RAW` (its headers and raw body), if still kept.
    async fn envelope(&self, sequence: u64) -> Option<Arc<Envelope>> {
        if let Some(hit) = self.envelopes.lock().expect("envelope cache").get(&sequence) {
            return hit.clone();
        }
        let envelope = async {
            let stream = self
                .raw
                .get_or_try_init(|| self.jetstream.get_stream(RAW_STREAM))
                .await
                .ok()?;
            let message = stream.get_raw_message(sequence).await.ok()?;
            Envelope::from_message(&message.subject, Some(&message.headers), message.payload).ok()
        }
        .await
        .map(Arc::new);
        let mut cache = self.envelopes.lock().expect("envelope cache");
        if cache.len() > 1024 {
            cache.clear();
        }
        cache.insert(sequence, envelope.clone());
        envelope
    }
}
