//! The worker (`hookyard worker`, and inside `hookyard dev`): a durable consumer on
//! `HOOKS_CONN` that runs the subscribed syncs' `onWebhook` for each routed event.
//!
//! Events are taken in groups ([`WorkerConfig::batch`]): their executions run at once on
//! the JS threads, and everything that succeeded is committed in one transaction, each
//! (event, sync) with its idempotency marker. Only then are the events acked, so a
//! redelivery (a crash between commit and ack, another worker) applies nothing twice.
//! A failed execution is retried after a growing delay and, after the last, committed
//! as a dead letter; it never holds back the others. Nor does a slow one: once the
//! group's executions stop finishing, those done are committed, and the events still
//! running commit on their own when they end.

pub mod async_actions;
mod auth_webhooks;
pub mod deliver;
pub mod deployments;
pub mod exec;
pub mod forward;
pub mod notify;
pub mod settings;
mod token_keepalive;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use hookyard_core::config::WorkerConfig;
use hookyard_core::envelope::header_pairs;
use hookyard_core::keys::IntegrationKey;
use hookyard_core::metrics::names;
use hookyard_core::oplog::OpLog;
use hookyard_core::providers::Catalog;
use hookyard_core::routed::{Origin, RoutedEvent};
use hookyard_core::store::commit::{DeadLetter, Marker, MetadataCall, RecordCall, Unit, UnitOutcome};
use hookyard_core::store::dead_letters::FailedAttempt;
use hookyard_core::store::notices::SyncNotice;
use hookyard_core::store::records::RecordScope;
use hookyard_core::store::records::WriteCounts;
use hookyard_core::store::StoreError;
use hookyard_core::streams::{durable, with_heartbeat, Bus, Pulls, Share, StreamsError, CONN_STREAM};
use hookyard_core::trace_context::continue_trace;
use hookyard_core::{Config, Store};
use hookyard_functions::host::{ApiSource, WebhookHost};
use hookyard_functions::pool::{Batch, Pool, Sizing};
use hookyard_functions::provider_api::Owner;
use hookyard_functions::rate_limit;
use hookyard_functions::{Effects, ErrorKind, FunctionError, Host, Invocation};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use deployments::{Deployments, LiveSync};

/// The durable consumer's name: every worker replica shares it (and the work).
pub const CONSUMER: &str = hookyard_core::streams::FUNCTIONS_CONSUMER;
/// Groups in flight at once: one executes while the one before commits.
const GROUPS_IN_FLIGHT: usize = 2;
/// How long a group waits for more events after its first.
const LINGER: Duration = Duration::from_millis(5);
/// Once a group's executions stop finishing for this long, those that finished are
/// committed without waiting for the rest.
const STRAGGLER_WAIT: Duration = Duration::from_millis(20);
/// After an infrastructure failure (the database, NATS), try the group again after this.
const RETRY_DELAY: Duration = Duration::from_secs(1);
/// The least a run a stopping worker left unrun waits to be delivered again (to another
/// worker, or to this one restarted).
const NOT_RUN_DELAY: Duration = Duration::from_secs(1);
/// Markers outlive any redelivery by far after this; pruned once an hour.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Streams(#[from] StreamsError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("JetStream: {0}")]
    JetStream(String),
    #[error("forwarding: {0}")]
    Forwarding(String),
    #[error(transparent)]
    Catalog(#[from] hookyard_core::providers::CatalogError),
}

pub(crate) fn jetstream_error(e: impl std::fmt::Display) -> WorkerError {
    WorkerError::JetStream(e.to_string())
}

pub struct Worker {
    store: Store,
    jetstream: jetstream::Context,
    pool: Pool,
    deployments: Arc<Deployments>,
    config: WorkerConfig,
    /// How long markers are kept: as long as `HOOKS_RAW` keeps what could be replayed.
    marker_ttl: Duration,
    /// (event, sync) executions committed by this worker since it started.
    committed: AtomicU64,
    settings: Arc<settings::Settings>,
    /// Each execution's entry in the operation log.
    oplog: OpLog,
    /// Where onWebhook's provider API calls find the connection's credentials.
    api_source: Arc<ApiSource>,
    /// Cancelled once a run of it stops taking events (a new one for each run): runs
    /// still waiting for a limited connection's turn are then left for the next worker,
    /// not waited for.
    stopping: std::sync::Mutex<CancellationToken>,
}

/// One (event, sync) to run.
struct Task {
    message: usize,
    sync: Arc<LiveSync>,
    marker: Marker,
}

impl Worker {
    pub fn new(store: Store, bus: &Bus, config: &Config) -> Result<Worker, WorkerError> {
        hookyard_core::metrics::install();
        let store_for_log = store.clone();
        let api_source = Arc::new(ApiSource {
            store: store.clone(),
            catalog: Arc::new(Catalog::embedded()?),
            guard: config.forwarding.clone(),
        });
        Ok(Worker {
            pool: Pool::sized(
                Sizing {
                    turns: config.worker.js_threads,
                    runs: config.worker.concurrent_runs,
                    hold_back_slow: config.worker.hold_back_slow_syncs,
                },
                config.worker.limits.clone(),
            ),
            deployments: Arc::new(Deployments::new(store.clone())),
            settings: Arc::new(settings::Settings::new(store.clone())),
            store,
            jetstream: bus.jetstream.clone(),
            config: config.worker.clone(),
            marker_ttl: config.streams.raw_max_age,
            committed: AtomicU64::new(0),
            oplog: OpLog::start(store_for_log, &config.logs),
            api_source,
            stopping: Default::default(),
        })
    }

    /// The current run's stop (see `stopping`).
    fn stopping(&self) -> CancellationToken {
        self.stopping
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Executions (and dead letters) this worker has committed since it started.
    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::Relaxed)
    }

    pub fn deployments(&self) -> &Deployments {
        &self.deployments
    }

    /// Consumes `HOOKS_CONN` until `shutdown`; groups in progress finish first.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> Result<(), WorkerError> {
        *self.stopping.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = CancellationToken::new();
        self.deployments.refresh().await?;
        let batch = self.config.batch;
        // A group's worth per pull. Held at once: as many events as the groups in flight
        // and the one gathered while they run, their stragglers included (see `consume`).
        let share = Share {
            concurrency: (GROUPS_IN_FLIGHT + 1) * batch,
            batch,
        };
        // Create or update: a changed `worker.ack_wait` takes effect at the next start.
        let config = pull::Config {
            filter_subject: "hooks.conn.>".into(),
            ..durable(
                CONSUMER,
                "hookyard worker: onWebhook functions",
                self.config.ack_wait,
                share,
            )
        };
        let refresher = tokio::spawn(self.clone().refresh_loop(shutdown.clone()));
        let in_flight = Arc::new(tokio::sync::Semaphore::new(GROUPS_IN_FLIGHT));
        let held = Arc::new(tokio::sync::Semaphore::new(share.concurrency));
        let mut groups = tokio::task::JoinSet::new();
        let mut pulls = Pulls::new(&self.jetstream, CONN_STREAM, config, batch, &shutdown);
        let outcome = loop {
            let messages = match pulls.next().await {
                Ok(Some(messages)) => messages,
                Ok(None) => break Ok(()),
                Err(error) => break Err(error.into()),
            };
            tracing::info!(threads = self.pool.threads(), batch, "worker consuming {CONN_STREAM}");
            self.clone()
                .consume(messages, &in_flight, &held, &mut groups, &shutdown)
                .await;
        };
        // Groups in progress finish (and ack) before the worker stops; their runs still
        // waiting for a turn give it up.
        self.stopping().cancel();
        while groups.join_next().await.is_some() {}
        refresher.abort();
        tracing::info!("worker stopped");
        outcome
    }

    /// Takes `messages` in groups and hands each to [`Worker::handle_with_progress`],
    /// [`GROUPS_IN_FLIGHT`] at once, until `shutdown` or the end of `messages`. Each
    /// event holds one of `held`'s permits until it is settled: a group's stragglers keep
    /// theirs after the next group starts, so a worker whose runs hang (a provider that
    /// does not answer) stops pulling at its bound, and the backlog goes to other workers.
    async fn consume(
        self: Arc<Self>,
        messages: impl futures::Stream<Item = Result<jetstream::Message, async_nats::Error>>,
        in_flight: &Arc<tokio::sync::Semaphore>,
        held: &Arc<tokio::sync::Semaphore>,
        groups: &mut tokio::task::JoinSet<()>,
        shutdown: &CancellationToken,
    ) {
        let batch = self.config.batch;
        let mut messages = Box::pin(messages);
        loop {
            // A group starts with the first event and takes what follows within LINGER,
            // up to `batch`: full groups under load, little wait when traffic is light.
            let first = tokio::select! {
                _ = shutdown.cancelled() => return,
                next = next_held(&mut messages, held) => next,
            };
            let Some(first) = first else { return };
            let mut group = Gathered::with_capacity(batch);
            group.take(first);
            let linger = tokio::time::sleep(LINGER);
            tokio::pin!(linger);
            let mut ended = false;
            while group.messages.len() < batch {
                tokio::select! {
                    biased;
                    next = next_held(&mut messages, held) => match next {
                        Some(next) => group.take(next),
                        None => { ended = true; break }
                    },
                    _ = &mut linger => break,
                }
            }
            let Gathered {
                messages: group,
                places,
            } = group;
            let Some(mut places) = places else {
                if ended {
                    return;
                }
                // Only errors (NATS away): wait before pulling again.
                tokio::time::sleep(RETRY_DELAY).await;
                continue;
            };
            let permit = in_flight
                .clone()
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            let worker = self.clone();
            groups.spawn(async move {
                let stragglers = worker.handle_with_progress(group).await;
                // The next group may start while the stragglers finish; they keep their
                // places, the settled events free theirs.
                drop(permit);
                let kept = stragglers.as_ref().and_then(|late| places.split(late.mine.len()));
                drop(places);
                if let Some(stragglers) = stragglers {
                    worker.finish_stragglers(stragglers).await;
                }
                drop(kept);
            });
            while groups.try_join_next().is_some() {}
            if ended {
                return;
            }
        }
    }

    /// Reloads deploys as they happen, and prunes old markers.
    async fn refresh_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let mut last_prune = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.config.functions_refresh) => {}
            }
            if let Err(error) = self.deployments.refresh().await {
                tracing::warn!(%error, "reloading functions failed; keeping the loaded ones");
            }
            if last_prune.elapsed() >= PRUNE_EVERY {
                last_prune = tokio::time::Instant::now();
                let before = chrono::Utc::now() - self.marker_ttl;
                match self.store.prune_processed(before).await {
                    Ok(pruned) => tracing::info!(pruned, "old idempotency markers pruned"),
                    Err(error) => tracing::warn!(%error, "pruning idempotency markers failed"),
                }
                if let Err(error) = self.store.prune_failed_attempts(before).await {
                    tracing::warn!(%error, "pruning failed attempts failed");
                }
            }
        }
    }

    /// [`Worker::handle`], telling JetStream the group is still in progress while it
    /// runs, so a long group is not redelivered to another worker meanwhile.
    async fn handle_with_progress(&self, group: Vec<jetstream::Message>) -> Option<Stragglers> {
        let all: Vec<usize> = (0..group.len()).collect();
        with_heartbeat(self.handle(&group), self.config.ack_wait / 3, || {
            answer(&group, &all, AckKind::Progress)
        })
        .await
    }

    /// Runs one group of messages to commit, then acks or naks each. A message with an
    /// execution still running once the others have stopped finishing (a function that
    /// hangs, or loops until its limits stop it) is left out of the commit and comes back
    /// in [`Stragglers`], for [`Worker::finish_stragglers`]: it does not hold back the rest.
    pub async fn handle(&self, group: &[jetstream::Message]) -> Option<Stragglers> {
        tracing::debug!(messages = group.len(), "group");
        let mut events: Vec<Option<RoutedEvent>> = Vec::with_capacity(group.len());
        let mut commit = Commit::default();
        for message in group {
            match RoutedEvent::from_message(&message.subject, message.headers.as_ref(), &message.payload) {
                Ok(event) => events.push(Some(event)),
                Err(error) => {
                    // Not ours and never will be: kept as a dead letter, not retried.
                    tracing::error!(subject = %message.subject, %error, "not a routed event");
                    commit
                        .units
                        .push(invalid_message(CONSUMER, CONN_STREAM, message, &error.to_string()));
                    commit.executed.push(false);
                    commit.logged.push(None);
                    events.push(None);
                }
            }
        }

        // A deploy that committed before this group is seen by it: a webhook sent right
        // after a deploy answered meets the new syncs (one query when nothing changed).
        if let Err(error) = self.deployments.refresh().await {
            tracing::warn!(%error, "checking for a new deploy failed; using the loaded functions");
        }
        let mut tasks = Vec::new();
        for (index, event) in events.iter().enumerate() {
            let Some(event) = event else { continue };
            if !event.origin.for_functions() {
                continue;
            }
            for sync in self
                .deployments
                .matching(&event.environment, &event.integration, event.event_type.as_deref())
            {
                // A redrive is for the one sync that gave up on the event.
                if let Origin::Redrive { consumer, .. } = &event.origin {
                    if *consumer != sync.consumer() {
                        continue;
                    }
                }
                tasks.push(Task {
                    message: index,
                    marker: Marker {
                        consumer: sync.consumer(),
                        message_id: event.message_id(),
                    },
                    sync,
                });
            }
        }
        let all: Vec<usize> = (0..group.len()).collect();
        if tasks.is_empty() {
            self.settle(group, &events, &all, commit, Vec::new()).await;
            return None;
        }
        let runnable = match self.prepare(group, &events, tasks).await {
            Ok(prepared) => prepared,
            Err(error) => {
                tracing::warn!(%error, "preparing a group failed; it will be retried");
                answer(group, &all, AckKind::Nak(Some(RETRY_DELAY))).await;
                return None;
            }
        };
        let (batch, mut executions) = self.start(runnable, &events);
        gather(&batch, &mut executions, Some(STRAGGLER_WAIT)).await;

        // Messages with an execution still running wait for it; the others commit now.
        let late: HashSet<usize> = executions
            .iter()
            .filter(|execution| execution.outcome.is_none())
            .map(|execution| execution.task.message)
            .collect();
        let (later, now): (Vec<Execution>, Vec<Execution>) = executions
            .into_iter()
            .partition(|execution| late.contains(&execution.task.message));
        let mine: Vec<usize> = all.into_iter().filter(|index| !late.contains(index)).collect();
        self.settle(group, &events, &mine, commit, now).await;
        if late.is_empty() {
            return None;
        }
        tracing::debug!(
            messages = late.len(),
            "executions still running; the rest of the group is committed without them"
        );
        let mut mine: Vec<usize> = late.into_iter().collect();
        mine.sort_unstable();
        let stragglers = Stragglers {
            group: group.to_vec(),
            events,
            mine,
            batch,
            executions: later,
        };
        Some(stragglers)
    }

    /// Waits for the stragglers' executions, then commits and acks them on their own,
    /// telling JetStream meanwhile that they are in progress.
    pub async fn finish_stragglers(&self, stragglers: Stragglers) {
        let Stragglers {
            group,
            events,
            mine,
            batch,
            executions,
        } = stragglers;
        let work = async {
            let mut executions = executions;
            gather(&batch, &mut executions, None).await;
            self.settle(&group, &events, &mine, Commit::default(), executions).await
        };
        with_heartbeat(work, self.config.ack_wait / 3, || {
            answer(&group, &mine, AckKind::Progress)
        })
        .await
    }

    /// Commits `commit` and what `executions` did, then acks the messages `mine` of
    /// `group` (or naks them: to retry a failed execution, or all of them when the commit
    /// failed).
    async fn settle(
        &self,
        group: &[jetstream::Message],
        events: &[Option<RoutedEvent>],
        mine: &[usize],
        mut commit: Commit,
        executions: Vec<Execution>,
    ) {
        // Every message whose tasks all commit (or that has none) is acked.
        let mut retry: HashMap<usize, Duration> = HashMap::new();
        // Attempts that failed and will be retried: a dead letter's history.
        let mut failed = Vec::new();
        for execution in executions {
            let Execution {
                task,
                mut span,
                outcome: result,
                ..
            } = execution;
            let result = result.expect("executions are settled once their outcome is in");
            observe(&task, &result, &mut span);
            let index = task.message;
            let event = events[index].as_ref().expect("tasks are of parsed events");
            let message = &group[index];
            let attempts = message.info().map_or(1, |i| i.delivered.max(1) as usize);
            let log = ExecutionLog::of(&task, event, attempts, &result);
            match result {
                Ok(effects) => {
                    commit.logged.push(Some(log));
                    commit.executed.push(true);
                    let notice = notify::wanted(&self.settings, &event.environment)
                        .await
                        .then(|| SyncNotice {
                            environment: event.environment.clone(),
                            integration: event.integration.clone(),
                            connection: event.connection_id.clone().unwrap_or_default(),
                            sync: task.sync.sync.name.clone(),
                            models: effects.writes.iter().map(|w| w.model.clone()).collect(),
                            message_id: event.message_id(),
                            sync_type: "WEBHOOK".into(),
                            modified_after: chrono::Utc::now(),
                            counts: Vec::new(),
                            error: None,
                        });
                    commit.units.push(Unit {
                        notice,
                        ..self.unit(task, event, effects)
                    });
                    commit.spans.push(span);
                }
                // Never ran (this worker is stopping): the next worker's, once the
                // connection's pause ends. Not a failure: nothing logged or recorded
                // (the delivery counts toward the schedule, as any redelivery does).
                Err(error) if error.kind == ErrorKind::NotRun => {
                    let delay = rate_limit::not_before(&owner_of(&task, event), NOT_RUN_DELAY);
                    tracing::info!(
                        sync = %task.sync.sync.name, message = %task.marker.message_id,
                        "{error}; left for another worker in {delay:?}"
                    );
                    retry_after(&mut retry, index, delay);
                }
                Err(error) => match self.config.retry_delays.get(attempts - 1) {
                    Some(delay) => {
                        // Not before the provider's rate limit on the connection ends.
                        let delay = rate_limit::not_before(&owner_of(&task, event), **delay);
                        tracing::warn!(
                            sync = %task.sync.sync.name, version = task.sync.sync.version,
                            message = %task.marker.message_id, attempts, error = %error,
                            "function failed; retrying in {delay:?}"
                        );
                        log.write(&self.oplog, "failed", None);
                        failed.push((
                            task.marker.clone(),
                            FailedAttempt {
                                attempt: attempts as i32,
                                error_kind: error.kind.as_str().into(),
                                error: error.message.clone(),
                                failed_at: chrono::Utc::now(),
                            },
                        ));
                        retry_after(&mut retry, index, delay);
                        continue;
                    }
                    None => {
                        tracing::error!(
                            sync = %task.sync.sync.name, version = task.sync.sync.version,
                            message = %task.marker.message_id, attempts, error = %error,
                            "function failed for the last time; dead-lettered"
                        );
                        commit.executed.push(false);
                        commit.logged.push(Some(log));
                        commit.units.push(dead_letter(task, event, message, &error, attempts));
                    }
                },
            }
        }
        let Commit {
            units,
            executed,
            logged,
            spans,
        } = commit;
        if !units.is_empty() {
            let commit_spans: Vec<tracing::Span> = spans
                .iter()
                .filter(|span| !span.is_none())
                .map(|span| tracing::info_span!(parent: span, "store_commit", units = units.len()))
                .collect();
            let result = self.store.commit(units).await;
            drop(commit_spans);
            match result {
                Ok(outcomes) => {
                    fault::after_commit();
                    let mut committed = 0;
                    let mut notices = Vec::new();
                    for ((unit_outcome, executed), log) in outcomes.into_iter().zip(executed).zip(logged) {
                        match unit_outcome {
                            UnitOutcome::Applied { total, notice, .. } => {
                                committed += 1;
                                count_writes(&total);
                                if let Some(log) = log {
                                    if executed {
                                        log.write(&self.oplog, "ok", Some(&total));
                                    } else {
                                        metrics::counter!(names::DEAD_LETTERS, "kind" => "function").increment(1);
                                        log.write(&self.oplog, "dead_lettered", None);
                                    }
                                }
                                notices.extend(notice.map(|notice| *notice));
                            }
                            UnitOutcome::AlreadyDone => {}
                        }
                    }
                    self.committed.fetch_add(committed, Ordering::Relaxed);
                    // The notices are committed with the changes: if this fails (or the
                    // process dies first) the sweep sends them later.
                    if let Err(error) = notify::send(&self.settings, &self.jetstream, &self.store, &notices).await {
                        tracing::warn!(%error, "sync notifications could not be queued now; the sweep will");
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, messages = mine.len(), "committing a group failed; it will be retried");
                    answer(group, mine, AckKind::Nak(Some(RETRY_DELAY))).await;
                    return;
                }
            }
        }
        if let Err(error) = self.store.record_failed_attempts(&failed).await {
            tracing::warn!(%error, "failed attempts could not be kept; their errors are in the log only");
        }
        for &index in mine {
            let message = &group[index];
            let result = match retry.get(&index) {
                Some(delay) => message.ack_with(AckKind::Nak(Some(*delay))).await,
                None => message.ack().await,
            };
            if let Err(error) = result {
                tracing::warn!(%error, "ack failed; the event will come back and be recognised as done");
            }
        }
    }

    /// The tasks still to run (those not done already) with what each is given.
    /// One query for the markers and one per integration for the connections.
    async fn prepare(
        &self,
        group: &[jetstream::Message],
        events: &[Option<RoutedEvent>],
        tasks: Vec<Task>,
    ) -> Result<Vec<(Task, Invocation)>, StoreError> {
        let markers: Vec<Marker> = tasks.iter().map(|t| t.marker.clone()).collect();
        let done = self.store.processed(&markers).await?;
        let mut wanted: HashMap<(i64, IntegrationKey), Vec<&str>> = HashMap::new();
        for task in &tasks {
            let event = events[task.message].as_ref().expect("tasks are of parsed events");
            let ids = wanted
                .entry((task.sync.sync.environment_id, event.integration.clone()))
                .or_default();
            let id = event.connection_id.as_deref().unwrap_or_default();
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        // Each connection's JSON is made once for all its events, as is its host (whose
        // provider API its events' runs share).
        // (environment, integration, connection id) → its metadata, its getConnection() JSON, its host
        type ConnectionKey = (i64, IntegrationKey, String);
        type ConnectionGiven = (Arc<str>, Arc<str>, Arc<dyn Host>);
        let mut connections: HashMap<ConnectionKey, ConnectionGiven> = HashMap::new();
        // Each environment's variables, once for all its events.
        let mut variables: HashMap<i64, Arc<str>> = HashMap::new();
        for ((environment_id, integration), ids) in &wanted {
            if !variables.contains_key(environment_id) {
                let json = self.settings.environment_variables(*environment_id).await?;
                variables.insert(*environment_id, json);
            }
            // For the provider API: read once a second, not per call.
            let settings = self
                .settings
                .integration(*environment_id, integration)
                .await?
                .map(Arc::new);
            for connection in self.store.connections_named(*environment_id, integration, ids).await? {
                let (metadata, described) = hookyard_functions::host::connection_texts(&connection);
                let owner = Owner {
                    environment_id: *environment_id,
                    integration: integration.clone(),
                    connection_id: connection.connection_id.clone(),
                };
                rate_limit::learn(&owner, connection.rate_limited_until);
                let host = WebhookHost::new(self.api_source.clone(), owner, connection.credentials, settings.clone());
                let host = Arc::new(host);
                connections.insert(
                    (*environment_id, integration.clone(), connection.connection_id),
                    (metadata, described, host),
                );
            }
        }
        let mut payloads: HashMap<usize, Arc<str>> = HashMap::new();
        let mut runnable = Vec::with_capacity(tasks.len());
        for task in tasks {
            if done.contains(&task.marker) {
                continue;
            }
            let event = events[task.message].as_ref().expect("tasks are of parsed events");
            let connection_id = event.connection_id.clone().unwrap_or_default();
            let key = (task.sync.sync.environment_id, event.integration.clone(), connection_id);
            let Some(connection) = connections.get(&key) else {
                // Deleted since it was routed: nothing of it is kept up to date any more.
                tracing::info!(connection = %key.2, sync = %task.sync.sync.name, "connection no longer exists; event skipped");
                continue;
            };
            let payload = payloads
                .entry(task.message)
                .or_insert_with(|| match std::str::from_utf8(&group[task.message].payload) {
                    Ok(text) => text.into(),
                    Err(_) => event.payload.to_string().into(),
                })
                .clone();
            let (metadata, connection, host) = connection.clone();
            let environment_variables = variables[&key.0].clone();
            let invocation = Invocation {
                payload,
                connection_id: key.2.clone(),
                provider_config_key: event.integration.to_string(),
                metadata,
                connection,
                models: task.sync.models.clone(),
                handler: Default::default(),
                host: Some(host),
                validation: self.config.validate_records,
                environment_variables,
            };
            runnable.push((task, invocation));
        }
        Ok(runnable)
    }

    /// Queues the tasks on the JS threads as one batch, each with its span: from the
    /// start for a traced webhook; for the others only once the function logged
    /// something (a span per execution would cost every event).
    fn start(&self, runnable: Vec<(Task, Invocation)>, events: &[Option<RoutedEvent>]) -> (Arc<Batch>, Vec<Execution>) {
        let mut runs = Vec::with_capacity(runnable.len());
        let executions = runnable
            .into_iter()
            .enumerate()
            .map(|(slot, (task, invocation))| {
                let event = events[task.message].as_ref().expect("tasks are of parsed events");
                let span = match event.traceparent.as_deref() {
                    Some(traceparent) => {
                        let span = execution_span(&task);
                        continue_trace(&span, Some(traceparent));
                        span
                    }
                    None => tracing::Span::none(),
                };
                // A connection its provider limited lately runs one event at a time.
                let turn = rate_limit::turn(|| owner_of(&task, event)).map(|turn| turn.unless(self.stopping()));
                runs.push((task.sync.code.clone(), invocation, turn));
                Execution {
                    task,
                    span,
                    slot,
                    outcome: None,
                }
            })
            .collect();
        (self.pool.submit_in_turn(runs), executions)
    }

    fn unit(&self, task: Task, event: &RoutedEvent, effects: Effects) -> Unit {
        let environment_id = task.sync.sync.environment_id;
        let connection_id = event.connection_id.clone().unwrap_or_default();
        let version = event.version();
        Unit {
            records: effects
                .writes
                .into_iter()
                .map(|write| RecordCall {
                    scope: RecordScope {
                        environment_id,
                        integration: event.integration.clone(),
                        connection_id: connection_id.clone(),
                        model: write.model,
                    },
                    kind: write.kind,
                    records: write.records,
                    version,
                })
                .collect(),
            metadata: effects
                .metadata
                .into_iter()
                .map(|(how, metadata)| MetadataCall {
                    environment_id,
                    integration: event.integration.clone(),
                    connection_id: connection_id.clone(),
                    metadata,
                    how,
                })
                .collect(),
            ..Unit::new(task.marker)
        }
    }
}

/// The connection whose provider API `task`'s run called.
fn owner_of(task: &Task, event: &RoutedEvent) -> Owner {
    Owner {
        environment_id: task.sync.sync.environment_id,
        integration: event.integration.clone(),
        connection_id: event.connection_id.clone().unwrap_or_default(),
    }
}

fn dead_letter(
    task: Task,
    event: &RoutedEvent,
    message: &jetstream::Message,
    error: &FunctionError,
    attempts: usize,
) -> Unit {
    let letter = DeadLetter {
        consumer: task.marker.consumer.clone(),
        environment: event.environment.to_string(),
        integration: event.integration.to_string(),
        connection_id: event.connection_id.clone(),
        subject: message.subject.to_string(),
        message_id: task.marker.message_id.clone(),
        stream_seq: message.info().map_or(0, |i| i.stream_sequence as i64),
        payload: event.payload.to_string(),
        function_name: Some(task.sync.sync.name.clone()),
        function_version: Some(task.sync.sync.version),
        error_kind: error.kind.as_str().into(),
        error: error.message.clone(),
        attempts: attempts as i32,
        headers: message
            .headers
            .as_ref()
            .map(|headers| serde_json::to_string(&header_pairs(headers)).expect("pairs serialise")),
    };
    Unit {
        dead_letter: Some(letter),
        ..Unit::new(task.marker)
    }
}

/// One execution as the operation log shows it.
struct ExecutionLog {
    raw_seq: u64,
    connection: Option<String>,
    detail: serde_json::Value,
}

impl ExecutionLog {
    fn of(task: &Task, event: &RoutedEvent, attempt: usize, result: &Result<Effects, FunctionError>) -> ExecutionLog {
        let (elapsed, logs, error) = match result {
            Ok(effects) => (effects.elapsed, &effects.logs, None),
            Err(error) => (error.elapsed, &error.logs, Some(error.to_string())),
        };
        let origin = match &event.origin {
            Origin::Live => None,
            Origin::Replay { id, .. } => Some(format!("replay {id}")),
            Origin::Redrive { id, .. } => Some(format!("redrive of dead letter {id}")),
        };
        ExecutionLog {
            raw_seq: event.raw_seq,
            connection: event.connection_id.clone(),
            detail: serde_json::json!({
                "sync": task.sync.sync.name,
                "version": task.sync.sync.version,
                "event_index": event.index,
                "attempt": attempt,
                "duration_ms": elapsed.as_secs_f64() * 1e3,
                "logs": logs,
                "error": error,
                "origin": origin,
            }),
        }
    }

    fn write(self, oplog: &OpLog, status: &str, counts: Option<&WriteCounts>) {
        let mut detail = self.detail;
        if let Some(counts) = counts {
            detail["records"] = serde_json::json!({
                "added": counts.added, "updated": counts.updated, "deleted": counts.deleted,
                "unchanged": counts.unchanged, "stale": counts.skipped_stale,
            });
        }
        oplog.step(self.raw_seq, "execution", self.connection.as_deref(), status, detail);
    }
}

/// Counts committed record writes in the metrics.
pub(crate) fn count_writes(counts: &WriteCounts) {
    for (action, n) in [
        ("added", counts.added),
        ("updated", counts.updated),
        ("deleted", counts.deleted),
    ] {
        if n > 0 {
            metrics::counter!(names::RECORD_WRITES, "action" => action).increment(n);
        }
    }
}

/// Answers `kind` for the messages at `indices` of `group` (a nak or an in-progress).
async fn answer(group: &[jetstream::Message], indices: &[usize], kind: AckKind) {
    for &index in indices {
        let _ = group[index].ack_with(kind).await;
    }
}

/// What a group commits besides its executions' writes, and what the commit is logged
/// with: per unit, whether it is an execution (not a dead letter) and its entry in the
/// operation log; the spans of the executions (the commit shows in each trace).
#[derive(Default)]
struct Commit {
    units: Vec<Unit>,
    executed: Vec<bool>,
    logged: Vec<Option<ExecutionLog>>,
    spans: Vec<tracing::Span>,
}

/// One (event, sync) on the JS threads.
struct Execution {
    task: Task,
    /// In its webhook's trace; holds the function's log lines.
    span: tracing::Span,
    /// Its place in its batch.
    slot: usize,
    outcome: Option<Result<Effects, FunctionError>>,
}

/// A group being gathered: its messages, and their places among the events the worker
/// holds.
struct Gathered {
    messages: Vec<jetstream::Message>,
    places: Option<OwnedSemaphorePermit>,
}

impl Gathered {
    fn with_capacity(batch: usize) -> Gathered {
        Gathered {
            messages: Vec::with_capacity(batch),
            places: None,
        }
    }

    /// Adds a pulled message; a failed pull is logged and gives its place back.
    fn take(&mut self, (message, place): (Result<jetstream::Message, async_nats::Error>, OwnedSemaphorePermit)) {
        match message {
            Ok(message) => {
                self.messages.push(message);
                match &mut self.places {
                    Some(places) => places.merge(place),
                    None => self.places = Some(place),
                }
            }
            Err(error) => tracing::warn!(%error, "pulling from {CONN_STREAM} failed; retrying"),
        }
    }
}

/// The next item of `messages` once the worker has a place to hold it: a worker holding
/// all it may pulls nothing more.
async fn next_held<S>(
    messages: &mut std::pin::Pin<Box<S>>,
    held: &Arc<tokio::sync::Semaphore>,
) -> Option<(Result<jetstream::Message, async_nats::Error>, OwnedSemaphorePermit)>
where
    S: futures::Stream<Item = Result<jetstream::Message, async_nats::Error>>,
{
    let place = held
        .clone()
        .acquire_owned()
        .await
        .expect("the semaphore is never closed");
    messages.next().await.map(|message| (message, place))
}

/// The messages of a group that waited for an execution, with what they need to commit.
pub struct Stragglers {
    group: Vec<jetstream::Message>,
    events: Vec<Option<RoutedEvent>>,
    /// Their places in `group`.
    mine: Vec<usize>,
    batch: Arc<Batch>,
    executions: Vec<Execution>,
}

/// Waits for `batch` (all of it, or with `quiet` as [`Batch::wait`] says) and gives
/// `executions` the outcomes that came.
async fn gather(batch: &Batch, executions: &mut [Execution], quiet: Option<Duration>) {
    batch.wait(quiet).await;
    let mut ended: HashMap<usize, Result<Effects, FunctionError>> = batch.take_ended().into_iter().collect();
    for execution in executions {
        if let Some(outcome) = ended.remove(&execution.slot) {
            execution.outcome = Some(outcome);
        }
    }
}

fn execution_span(task: &Task) -> tracing::Span {
    tracing::info_span!(
        "on_webhook", sync = %task.sync.sync.name, version = task.sync.sync.version,
        message = %task.marker.message_id, status = tracing::field::Empty, trace_id = tracing::field::Empty
    )
}

/// Message `index` is to be delivered again after `delay`, or later if another of its
/// executions asks for longer.
fn retry_after(retry: &mut HashMap<usize, Duration>, index: usize, delay: Duration) {
    let wait = retry.entry(index).or_insert(delay);
    *wait = (*wait).max(delay);
}

/// Counts an execution in the metrics and puts its log lines in its span.
fn observe(task: &Task, result: &Result<Effects, FunctionError>, span: &mut tracing::Span) {
    if matches!(result, Err(error) if error.kind == ErrorKind::NotRun) {
        return;
    }
    let (status, logs) = hookyard_functions::count_execution("on_webhook", result);
    if span.is_none() && !logs.is_empty() {
        *span = execution_span(task);
    }
    span.record("status", status);
    for line in logs {
        tracing::debug!(parent: &*span, level = %line.level, payload = ?line.payload, "function log: {}", line.message);
    }
}

/// A message that is not what `consumer` takes, kept as a dead letter (with its marker,
/// so that a redelivery is not kept twice) rather than retried or dropped.
pub(crate) fn invalid_message(consumer: &str, stream: &str, message: &jetstream::Message, error: &str) -> Unit {
    let info = message.info().ok();
    let seq = info.as_ref().map_or(0, |i| i.stream_sequence);
    let letter = DeadLetter {
        consumer: consumer.into(),
        environment: subject_token(&message.subject, 2),
        integration: subject_token(&message.subject, 3),
        connection_id: None,
        subject: message.subject.to_string(),
        message_id: format!("{stream}:{seq}"),
        stream_seq: seq as i64,
        payload: String::from_utf8_lossy(&message.payload).into_owned(),
        function_name: None,
        function_version: None,
        error_kind: "invalid_message".into(),
        error: error.to_string(),
        attempts: info.map_or(1, |i| i.delivered as i32),
        headers: None,
    };
    let marker = Marker {
        consumer: consumer.into(),
        message_id: letter.message_id.clone(),
    };
    Unit {
        dead_letter: Some(letter),
        ..Unit::new(marker)
    }
}

/// Token `n` of a subject, or `?`.
fn subject_token(subject: &str, n: usize) -> String {
    subject.split('.').nth(n).unwrap_or("?").to_string()
}

/// Fault injection for the crash tests: `HOOKYARD_FAULT=kill-after-commit` makes the
/// process SIGKILL itself right after its first commit, before its sync notifications
/// are queued and before any ack.
mod fault {
    use std::sync::OnceLock;

    pub fn after_commit() {
        static KILL: OnceLock<bool> = OnceLock::new();
        if *KILL.get_or_init(|| std::env::var("HOOKYARD_FAULT").as_deref() == Ok("kill-after-commit")) {
            // SAFETY: signals this process; nothing to uphold.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
    }
}

/// True once the workers' consumer exists and holds no event pending or unacked: every
/// event in `HOOKS_CONN` so far is applied (or dead-lettered) and acked.
pub async fn idle(jetstream: &jetstream::Context) -> Result<bool, WorkerError> {
    let stream = jetstream.get_stream(CONN_STREAM).await.map_err(jetstream_error)?;
    let Ok(mut consumer) = stream.get_consumer::<pull::Config>(CONSUMER).await else {
        return Ok(false);
    };
    let info = consumer.info().await.map_err(jetstream_error)?;
    Ok(info.num_pending == 0 && info.num_ack_pending == 0)
}

/// `hookyard worker`: connect, run functions, forwarding and deliveries until shutdown.
pub async fn run(config: &Config, shutdown: CancellationToken) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let store = Store::connect_with(&config.database_url, config.cipher()?, config.database_max_connections).await?;
    let bus = Bus::connect(config, "hookyard-worker").await?;
    if !bus.set_up_streams(&config.streams, &store, &shutdown).await? {
        return Ok(());
    }
    hookyard_core::metrics::serve_configured(config, Some(bus.jetstream.clone()), &shutdown);
    hookyard_core::outbound::log_proxies(&config.forwarding);
    run_all(store, &bus, config, shutdown).await?;
    Ok(())
}

/// The worker's four consumers (functions, exec, forwarder, deliverer), asynchronous
/// actions and the sweep of left-behind sync notices until shutdown; when a consumer stops on an error the others
/// are stopped too.
pub async fn run_all(store: Store, bus: &Bus, config: &Config, shutdown: CancellationToken) -> Result<(), WorkerError> {
    let worker = Arc::new(Worker::new(store.clone(), bus, config)?);
    let executor = Arc::new(exec::Executor::new(
        store.clone(),
        bus.jetstream.clone(),
        worker.deployments.clone(),
        worker.settings.clone(),
        worker.api_source.catalog.clone(),
        config,
        worker.oplog.clone(),
    ));
    // One cache of environments, integrations and targets for the consumers.
    let settings = worker.settings.clone();
    let forwarder = Arc::new(forward::Forwarder::new(settings.clone(), bus.jetstream.clone()));
    let deliverer = Arc::new(deliver::Deliverer::new(
        store,
        settings,
        bus.jetstream.clone(),
        &config.forwarding,
        worker.oplog.clone(),
    )?);
    let async_actions = Arc::new(async_actions::AsyncActions::new(
        worker.store.clone(),
        executor.actions(),
        worker.settings.clone(),
        bus.jetstream.clone(),
        config,
    ));
    let stopping = |outcome: Result<(), WorkerError>| {
        if outcome.is_err() {
            shutdown.cancel();
        }
        outcome
    };
    let (functions, execs, forwarding, deliveries, (), (), ()) = tokio::join!(
        async { stopping(worker.clone().run(shutdown.clone()).await) },
        async { stopping(executor.run(shutdown.clone()).await) },
        async { stopping(forwarder.run(shutdown.clone()).await) },
        async { stopping(deliverer.run(shutdown.clone()).await) },
        notify::sweep_loop(
            &worker.settings,
            &bus.jetstream,
            &worker.store,
            config.forwarding.notices_resend_after,
            shutdown.clone()
        ),
        token_keepalive::run(
            &worker.api_source,
            config.forwarding.notices_resend_after / 2,
            shutdown.clone()
        ),
        async_actions.run(shutdown.clone()),
    );
    functions.and(execs).and(forwarding).and(deliveries)
}
