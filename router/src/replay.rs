//! Replays (`POST /replay`, `hookyard replay`), run by the routers: a router takes a
//! queued replay (a lease on its row), reads its window of `HOOKS_RAW` through an
//! ordered consumer filtered to the environment (or integration), routes each webhook
//! again and publishes its events to `HOOKS_CONN` as a replay:
//!
//! - message ids of their own (`…:replay-{id}`), so neither JetStream's duplicate window
//!   nor the workers' markers take them for the originals;
//! - the original raw sequence as the version, so records never go back to an older
//!   state: a replayed event older than what is stored changes nothing;
//! - for the consumers the replay targets only (functions, forwarding or both).
//!
//! Progress goes to the row every quarter second (the API shows it; a cancel is seen
//! there). A replay waits while the workers have more than `router.replay_max_backlog`
//! events waiting, so live traffic never queues behind a whole replay.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::{self, stream::Stream};
use futures::StreamExt as _;
use hookyard_core::keys::{EnvironmentName, IntegrationKey};
use hookyard_core::metrics::names;
use hookyard_core::routed::{Origin, ReplayTarget};
use hookyard_core::store::replays::{Replay, ReplayProgress, ReplayStatus};
use hookyard_core::streams::{raw_subject, CONN_STREAM, FORWARDER_CONSUMER, FUNCTIONS_CONSUMER, RAW_STREAM};
use hookyard_core::{Envelope, Store};
use tokio_util::sync::CancellationToken;

use crate::{await_acks, jetstream_error, Router, RouterError};

/// How often a router looks for a replay to run.
const POLL: Duration = Duration::from_secs(1);
/// A replay's lease; renewed at every progress write.
const LEASE: Duration = Duration::from_secs(30);
/// After NATS or the database failed a replay, a router tries again after this.
const RETRY_AFTER: Duration = Duration::from_secs(5);
/// How often progress is written (and a cancel looked for).
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// How old the connections a replayed webhook is routed by may be.
const STALENESS: Duration = Duration::from_millis(250);
/// Publishes awaiting their acks at once.
const ACK_WINDOW: usize = 2048;

pub struct Replayer {
    router: Arc<Router>,
    store: Store,
    /// A context of its own: its acks in flight do not take from the live router's.
    jetstream: jetstream::Context,
    max_backlog: u64,
}

/// How one replay ended.
struct Ended {
    status: ReplayStatus,
    progress: ReplayProgress,
    error: Option<String>,
    /// The error can pass (NATS or the database away): try again later.
    transient: bool,
}

impl Replayer {
    pub fn new(router: Arc<Router>, store: Store, max_backlog: u64) -> Replayer {
        Replayer {
            jetstream: jetstream::new(router.jetstream.client()),
            router,
            store,
            max_backlog,
        }
    }

    pub async fn run(self, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            match self.store.claim_replay(LEASE).await {
                Ok(Some(replay)) => {
                    self.replay_and_record(&replay, &shutdown).await;
                    continue;
                }
                Ok(None) => {}
                Err(error) => tracing::warn!(%error, "looking for replays failed; retrying"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }

    /// Runs `replay` to its end and records how it ended. Stopped by `shutdown`, it
    /// writes how far it got and gives up its lease, so another router goes on from there
    /// at once (after a crash, once the lease has run out).
    pub async fn replay_and_record(&self, replay: &Replay, shutdown: &CancellationToken) {
        tracing::info!(replay = replay.id, since = %replay.request.since, until = %replay.request.until, "replay started");
        let running = metrics::gauge!(names::REPLAYS_RUNNING);
        running.increment(1.0);
        let ended = self.replay(replay, shutdown).await;
        running.decrement(1.0);
        let recorded = if ended.transient {
            let error = ended.error.as_deref().unwrap_or("");
            tracing::warn!(replay = replay.id, %error, "replay interrupted; it goes on in {RETRY_AFTER:?}");
            // From its last written progress: what was published after it is published
            // again under the same ids (the duplicate window drops it).
            self.store
                .retry_replay(replay.id, &format!("interrupted, going on: {error}"), RETRY_AFTER)
                .await
        } else if ended.status == ReplayStatus::Running {
            tracing::info!(
                replay = replay.id,
                read = ended.progress.read,
                "replay handed over (shutting down)"
            );
            // A lease that ends now: the next router to look takes it.
            self.store
                .replay_progress(replay.id, &ended.progress, Duration::ZERO)
                .await
                .map(|_| ())
        } else {
            tracing::info!(
                replay = replay.id, status = ?ended.status, read = ended.progress.read,
                published = ended.progress.published, error = ended.error.as_deref().unwrap_or(""), "replay ended"
            );
            self.store
                .finish_replay(replay.id, &ended.progress, ended.status, ended.error.as_deref())
                .await
        };
        if let Err(error) = recorded {
            tracing::warn!(replay = replay.id, %error, "recording a replay's progress failed; it will be resumed");
        }
    }

    async fn replay(&self, replay: &Replay, shutdown: &CancellationToken) -> Ended {
        let mut progress = replay.progress;
        let mut reported = replay.progress;
        let outcome = self.replay_window(replay, &mut progress, &mut reported, shutdown).await;
        report(&mut reported, &progress);
        match outcome {
            Ok(status) => Ended {
                status,
                progress,
                error: None,
                transient: false,
            },
            Err(error) => Ended {
                status: ReplayStatus::Failed,
                progress,
                transient: error.is_transient(),
                error: Some(error.to_string()),
            },
        }
    }

    async fn replay_window(
        &self,
        replay: &Replay,
        progress: &mut ReplayProgress,
        reported: &mut ReplayProgress,
        shutdown: &CancellationToken,
    ) -> Result<ReplayStatus, RouterError> {
        let environment: EnvironmentName =
            replay.request.environment.parse().map_err(|_| {
                RouterError::Replay(format!("{:?} is not an environment name", replay.request.environment))
            })?;
        let filter = match &replay.request.integration {
            Some(key) => {
                let key: IntegrationKey = key
                    .parse()
                    .map_err(|_| RouterError::Replay(format!("{key:?} is not an integration key")))?;
                raw_subject(&environment, &key)
            }
            None => format!("hooks.raw.{environment}.>"),
        };
        let stream = self.jetstream.get_stream(RAW_STREAM).await.map_err(jetstream_error)?;
        if progress.end_seq.is_none() {
            let window = window(&stream, &filter, replay).await?;
            progress.next_seq = Some(window.first as i64);
            progress.end_seq = Some(window.last as i64);
            progress.total = Some(window.count as i64);
        }
        let (next, end) = (
            progress.next_seq.unwrap_or(1) as u64,
            progress.end_seq.unwrap_or(0) as u64,
        );
        if next > end || progress.total == Some(0) {
            progress.total = Some(progress.read);
            return Ok(ReplayStatus::Done);
        }
        let mut messages = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: filter,
                deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: next },
                ..Default::default()
            })
            .await
            .map_err(jetstream_error)?
            .messages()
            .await
            .map_err(jetstream_error)?;

        let origin = Origin::Replay {
            id: replay.id,
            target: replay.request.target,
        };
        let started = Instant::now();
        let published_before = progress.published;
        let mut last_progress = Instant::now();
        let mut acks = Vec::with_capacity(ACK_WINDOW);
        loop {
            let Some(message) = messages.next().await else {
                return Err(RouterError::JetStream("the replay's consumer ended".into()));
            };
            let message = message.map_err(jetstream_error)?;
            let info = message.info().map_err(jetstream_error)?;
            let (seq, pending) = (info.stream_sequence, info.pending);
            if seq > end {
                break;
            }
            match Envelope::from_message(&message.subject, message.headers.as_ref(), message.payload.clone()) {
                Err(error) => {
                    tracing::warn!(replay = replay.id, seq, %error, "not a hookyard envelope; not replayed");
                    progress.skipped += 1;
                }
                Ok(envelope) => {
                    for mut event in self.router.resolve_within(seq, &envelope, STALENESS).await? {
                        if replay.request.connection_id.is_some() && event.connection_id != replay.request.connection_id
                        {
                            progress.skipped += 1;
                            continue;
                        }
                        progress.published += 1;
                        if replay.request.dry_run {
                            continue;
                        }
                        event.origin = origin.clone();
                        let (subject, headers, payload) = event.to_message();
                        if acks.len() == ACK_WINDOW {
                            await_acks(&mut acks).await?;
                        }
                        acks.push(
                            self.jetstream
                                .publish_with_headers(subject, headers, payload)
                                .await
                                .map_err(jetstream_error)?,
                        );
                        if let Some(rate) = replay.request.rate {
                            let due =
                                Duration::from_secs_f64((progress.published - published_before) as f64 / rate as f64);
                            if let Some(wait) = due.checked_sub(started.elapsed()) {
                                tokio::time::sleep(wait).await;
                            }
                        }
                    }
                }
            }
            progress.read += 1;
            progress.next_seq = Some(seq as i64 + 1);
            if seq >= end || pending == 0 {
                break;
            }
            if shutdown.is_cancelled() {
                // Left at a clean point: everything up to `next_seq` is published.
                await_acks(&mut acks).await?;
                return Ok(ReplayStatus::Running);
            }
            if last_progress.elapsed() >= PROGRESS_EVERY {
                // What the row says is done is stored: a resumed replay starts after it.
                await_acks(&mut acks).await?;
                report(reported, progress);
                if self.store.replay_progress(replay.id, progress, LEASE).await? {
                    return Ok(ReplayStatus::Cancelled);
                }
                if !replay.request.dry_run && self.hold_back(replay, progress, shutdown).await? {
                    return Ok(ReplayStatus::Cancelled);
                }
                last_progress = Instant::now();
            }
        }
        await_acks(&mut acks).await?;
        // Now exact: what the window held.
        progress.total = Some(progress.read);
        Ok(ReplayStatus::Done)
    }

    /// Waits while the consumers the replay feeds have more than `max_backlog` events
    /// waiting (or until shutdown), keeping the lease; true when the replay was cancelled
    /// meanwhile.
    async fn hold_back(
        &self,
        replay: &Replay,
        progress: &mut ReplayProgress,
        shutdown: &CancellationToken,
    ) -> Result<bool, RouterError> {
        let consumers: &[&str] = match replay.request.target {
            ReplayTarget::Functions => &[FUNCTIONS_CONSUMER],
            ReplayTarget::Forward => &[FORWARDER_CONSUMER],
            ReplayTarget::All => &[FUNCTIONS_CONSUMER, FORWARDER_CONSUMER],
        };
        let stream = self.jetstream.get_stream(CONN_STREAM).await.map_err(jetstream_error)?;
        loop {
            let mut backlog = 0;
            for name in consumers {
                // A consumer that does not exist yet holds nothing back.
                if let Ok(mut consumer) = stream.get_consumer::<pull::Config>(name).await {
                    if let Ok(info) = consumer.info().await {
                        backlog = backlog.max(info.num_pending);
                    }
                }
            }
            if backlog <= self.max_backlog || shutdown.is_cancelled() {
                progress.waiting = false;
                return Ok(false);
            }
            tracing::debug!(replay = replay.id, backlog, "replay waits for the workers");
            progress.waiting = true;
            tokio::time::sleep(PROGRESS_EVERY).await;
            if self.store.replay_progress(replay.id, progress, LEASE).await? {
                return Ok(true);
            }
        }
    }
}

/// Counts what `progress` has done since `reported` in the replay metrics.
fn report(reported: &mut ReplayProgress, progress: &ReplayProgress) {
    metrics::counter!(names::REPLAY_READ).increment((progress.read - reported.read).max(0) as u64);
    metrics::counter!(names::REPLAY_PUBLISHED).increment((progress.published - reported.published).max(0) as u64);
    *reported = *progress;
}

/// A replay's window in `HOOKS_RAW`: the first and last sequence, and how many webhooks
/// of the filter lie between.
struct Window {
    first: u64,
    last: u64,
    count: u64,
}

/// The webhooks of `filter` stored in `[since, until)`, up to what the stream held when
/// asked (webhooks that arrive during the replay are live traffic, not replayed).
async fn window(stream: &Stream, filter: &str, replay: &Replay) -> Result<Window, RouterError> {
    let last_now = stream.get_info().await.map_err(jetstream_error)?.state.last_sequence;
    let (from_since, first) = first_from(
        stream,
        filter,
        DeliverPolicy::ByStartTime {
            start_time: replay.request.since,
        },
    )
    .await?;
    let Some(first) = first.filter(|first| *first <= last_now) else {
        return Ok(Window {
            first: 1,
            last: 0,
            count: 0,
        });
    };
    let (from_until, boundary) = first_from(
        stream,
        filter,
        DeliverPolicy::ByStartTime {
            start_time: replay.request.until,
        },
    )
    .await?;
    let (last, count) = match boundary {
        Some(boundary) if boundary <= last_now => (boundary - 1, from_since.saturating_sub(from_until)),
        // Nothing stored at or after `until` yet: the window runs to what is stored now.
        _ => (last_now, from_since),
    };
    Ok(Window { first, last, count })
}

/// How many messages of `filter` a consumer starting at `policy` has pending, and the
/// sequence of the first.
async fn first_from(stream: &Stream, filter: &str, policy: DeliverPolicy) -> Result<(u64, Option<u64>), RouterError> {
    let mut consumer = stream
        .create_consumer(pull::Config {
            filter_subject: filter.to_string(),
            deliver_policy: policy,
            ack_policy: AckPolicy::None,
            inactive_threshold: Duration::from_secs(30),
            ..Default::default()
        })
        .await
        .map_err(jetstream_error)?;
    let pending = consumer.info().await.map_err(jetstream_error)?.num_pending;
    let first = if pending == 0 {
        None
    } else {
        let mut batch = consumer
            .fetch()
            .max_messages(1)
            .expires(Duration::from_secs(2))
            .messages()
            .await
            .map_err(jetstream_error)?;
        match batch.next().await {
            Some(Ok(message)) => Some(message.info().map_err(jetstream_error)?.stream_sequence),
            _ => None,
        }
    };
    let name = consumer.cached_info().name.clone();
    let _ = stream.delete_consumer(&name).await;
    Ok((pending, first))
}
