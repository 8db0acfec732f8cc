//! Publishing an envelope and waiting for JetStream's ack, within one deadline.
//!
//! During a stream-leader election async-nats reports "stream not found", "timed out"
//! or "broken pipe"; those are retried with the same `Nats-Msg-Id` (so a publish that
//! did land is not stored twice) until the deadline. Every ack is awaited: a dropped
//! ack future would lose its error.

use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::{self, Context};
use backon::{ExponentialBuilder, Retryable};
use hookyard_core::streams::Bus;
use hookyard_core::Envelope;

#[derive(Debug, thiserror::Error)]
pub enum PublishFailure {
    #[error("NATS is not connected")]
    Disconnected,
    #[error("no JetStream ack within {0:?}")]
    Deadline(Duration),
    #[error("the message is larger than the server's max_payload")]
    TooLarge,
    #[error("publish failed: {0}")]
    Failed(String),
}

pub struct Publisher {
    client: async_nats::Client,
    jetstream: Context,
    timeout: Duration,
}

impl Publisher {
    pub fn new(bus: &Bus, timeout: Duration) -> Publisher {
        let jetstream = jetstream::ContextBuilder::new()
            .timeout(ack_wait(timeout))
            .build(bus.client.clone());
        Publisher {
            client: bus.client.clone(),
            jetstream,
            timeout,
        }
    }

    /// Publishes `envelope` and returns JetStream's ack (`duplicate` when this delivery
    /// was already stored).
    pub async fn publish_envelope(&self, envelope: &Envelope) -> Result<PublishAck, PublishFailure> {
        // While disconnected the client would buffer the publish for later: answer now
        // instead, so the provider retries rather than waiting on us.
        if self.client.connection_state() != State::Connected {
            return Err(PublishFailure::Disconnected);
        }
        let subject = envelope.subject();
        let attempt = |headers| {
            let message = PublishMessage::build().payload(envelope.body.clone()).headers(headers);
            let subject = subject.clone();
            async move { self.jetstream.send_publish(subject, message).await?.await }
        };
        // The first attempt goes out directly; only a transient failure pays for the
        // retry machinery (each retry encodes the headers again).
        let publishing = async {
            match attempt(envelope.to_headers()).await {
                Err(error) if is_transient(error.kind()) => {
                    tracing::debug!(%error, "retrying publish");
                    let retries = ExponentialBuilder::default()
                        .with_min_delay(Duration::from_millis(10))
                        .with_max_delay(Duration::from_millis(250))
                        .with_jitter()
                        .without_max_times();
                    (|| attempt(envelope.to_headers()))
                        .retry(retries)
                        .when(|e: &async_nats::jetstream::context::PublishError| is_transient(e.kind()))
                        .notify(|error, after| tracing::debug!(%error, ?after, "retrying publish"))
                        .await
                }
                other => other,
            }
        };
        let outcome = tokio::time::timeout(self.timeout, publishing).await;
        match outcome {
            Err(_elapsed) => Err(PublishFailure::Deadline(self.timeout)),
            Ok(Ok(ack)) => Ok(ack),
            Ok(Err(error)) => Err(match error.kind() {
                PublishErrorKind::MaxPayloadExceeded => PublishFailure::TooLarge,
                _ => PublishFailure::Failed(error.to_string()),
            }),
        }
    }
}

/// How long one attempt waits for its ack: half the deadline, leaving time for a retry,
/// and at most a second. While a stream elects a new leader its followers take publishes
/// without answering, so only this ends an attempt; kept short, the retry reaches the
/// new leader soon after the election (measured in `tests/tests/cluster.rs`).
fn ack_wait(deadline: Duration) -> Duration {
    (deadline / 2).min(Duration::from_secs(1))
}

/// Errors a stream-leader election or a reconnect produces, which a retry can outlast.
fn is_transient(kind: PublishErrorKind) -> bool {
    matches!(
        kind,
        PublishErrorKind::StreamNotFound
            | PublishErrorKind::TimedOut
            | PublishErrorKind::BrokenPipe
            | PublishErrorKind::MaxAckPending
    )
}
