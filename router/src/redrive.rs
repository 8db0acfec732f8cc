//! Redrives of dead letters, asked for through the API (`POST /dead-letters/redrive`)
//! and carried out here, in every router (a letter is redriven once: the message ids
//! make a second router's copy a duplicate).
//!
//! - A function's letter: its event, as the letter keeps it (headers and payload; read
//!   back from `HOOKS_CONN` for letters older than that), is published again as a
//!   redrive for that one sync: a message id of its own (the original's marker says
//!   "done" since the letter was committed), the original version.
//! - A forward's letter: the delivery goes back into `HOOKS_FWD`, with its attempts
//!   counted afresh and the same `webhook-id`.
//!
//! A letter whose message cannot be had records why it could not be redriven.

use std::time::Duration;

use async_nats::jetstream;
use hookyard_core::delivery::Delivery;
use hookyard_core::envelope::headers_from_pairs;
use hookyard_core::routed::{Origin, RoutedEvent};
use hookyard_core::store::dead_letters::{DeadLetterKind, StoredDeadLetter};
use hookyard_core::streams::CONN_STREAM;
use hookyard_core::Store;
use tokio_util::sync::CancellationToken;

use crate::{jetstream_error, RouterError};

/// How often the store is asked for requested redrives.
const POLL: Duration = Duration::from_secs(1);
/// Letters taken per pass.
const PASS: u32 = 500;

pub struct Redriver {
    store: Store,
    jetstream: jetstream::Context,
}

impl Redriver {
    pub fn new(store: Store, jetstream: jetstream::Context) -> Redriver {
        Redriver { store, jetstream }
    }

    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            match self.pass().await {
                // A full pass: there may be more right away.
                Ok(done) if done == PASS as usize => continue,
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "redriving dead letters failed; retrying"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }

    /// Carries out the redrives asked for so far; how many letters it went through.
    pub async fn pass(&self) -> Result<usize, RouterError> {
        let letters = self.store.redrives_requested(PASS).await?;
        for letter in &letters {
            let requested = letter.redrive_requested_at.expect("only requested letters are listed");
            let outcome = self.redrive(letter).await;
            match &outcome {
                Ok(()) => {
                    tracing::info!(letter = letter.id, consumer = %letter.letter.consumer, "dead letter redriven")
                }
                Err(why) => tracing::warn!(letter = letter.id, %why, "dead letter cannot be redriven"),
            }
            // A publish that failed (NATS away) is tried again at the next pass.
            if let Err(RedriveError::Publish(error)) = &outcome {
                return Err(RouterError::JetStream(error.clone()));
            }
            let error = outcome.err().map(|e| e.to_string());
            self.store
                .finish_redrive(letter.id, requested, error.as_deref())
                .await?;
        }
        Ok(letters.len())
    }

    async fn redrive(&self, letter: &StoredDeadLetter) -> Result<(), RedriveError> {
        let (subject, headers, payload) = match letter.kind {
            DeadLetterKind::Function => {
                let mut event = match &letter.letter.headers {
                    Some(headers) => self.kept_event(letter, headers)?,
                    // Letters written before they kept their headers.
                    None => self.stream_event(letter).await?,
                };
                event.origin = Origin::Redrive {
                    id: letter.id,
                    consumer: letter.letter.consumer.clone(),
                };
                event.to_message()
            }
            DeadLetterKind::Forward => {
                let mut delivery: Delivery =
                    serde_json::from_str(&letter.letter.payload).map_err(|e| RedriveError::Unusable(e.to_string()))?;
                delivery.redrive = Some(letter.id);
                delivery.to_message()
            }
            DeadLetterKind::Exec => {
                return Err(RedriveError::Unusable("an exec job message that was no job".into()));
            }
        };
        self.jetstream
            .publish_with_headers(subject, headers, payload)
            .await
            .map_err(jetstream_error)
            .map_err(|e| RedriveError::Publish(e.to_string()))?
            .await
            .map_err(|e| RedriveError::Publish(e.to_string()))?;
        Ok(())
    }
}

impl Redriver {
    /// The event as the letter keeps it.
    fn kept_event(&self, letter: &StoredDeadLetter, headers: &str) -> Result<RoutedEvent, RedriveError> {
        let pairs: Vec<(String, String)> =
            serde_json::from_str(headers).map_err(|e| RedriveError::Unusable(format!("its headers: {e}")))?;
        RoutedEvent::from_message(
            &letter.letter.subject,
            Some(&headers_from_pairs(&pairs)),
            letter.letter.payload.as_bytes(),
        )
        .map_err(|e| RedriveError::Unusable(e.to_string()))
    }

    /// The event read back from `HOOKS_CONN`, while the stream keeps it.
    async fn stream_event(&self, letter: &StoredDeadLetter) -> Result<RoutedEvent, RedriveError> {
        let stream = self
            .jetstream
            .get_stream(CONN_STREAM)
            .await
            .map_err(|e| RedriveError::Publish(e.to_string()))?;
        let message = stream
            .get_raw_message(letter.letter.stream_seq as u64)
            .await
            .map_err(|e| RedriveError::Gone(format!("{CONN_STREAM} no longer holds its event ({e})")))?;
        RoutedEvent::from_message(&message.subject, Some(&message.headers), &message.payload)
            .map_err(|e| RedriveError::Unusable(e.to_string()))
    }
}

#[derive(Debug, thiserror::Error)]
enum RedriveError {
    #[error("{0}")]
    Gone(String),
    #[error("its message cannot be redriven: {0}")]
    Unusable(String),
    #[error("publishing failed: {0}")]
    Publish(String),
}
