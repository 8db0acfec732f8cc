//! Exec runs: a durable consumer on `HOOKS_EXEC` that runs a sync's `exec(nango)` for one
//! connection, on JS threads of its own.
//!
//! At most one run per (sync, connection) lives at a time, across workers: a run holds a
//! lease in the database, extended while it goes; a job that arrives meanwhile is skipped
//! (and logged). Writes are applied as the function makes them, at the run's version: the
//! last `HOOKS_RAW` sequence when it began (× 2^16 + 0xFFFF), so they never overwrite a
//! webhook's write that came in after the run began. A failed run is not retried: the
//! next slot runs it again, and its error shows in `GET /sync/status`.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use hookyard_core::config::{Config, ForwardingConfig};
use hookyard_core::exec_job::ExecJob;
use hookyard_core::oplog::OpLog;
use hookyard_core::providers::Catalog;
use hookyard_core::store::notices::{HeldNotice, SyncNotice, UNFINISHED};
use hookyard_core::store::records::WriteCounts;
use hookyard_core::store::syncs::{RunOutcome, SyncKey};
use hookyard_core::streams::{consume, durable, with_heartbeat, Share, EXEC_STREAM};
use hookyard_core::Store;
use hookyard_functions::host::{connection_api, exec_invocation, raw_version, Kind, Mode, Run, StoreHost};
use hookyard_functions::pool::{Pool, Sizing};
use hookyard_functions::runs::Actions;
use hookyard_functions::Invocation;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::deployments::{Deployments, LiveSync};
use crate::notify;
use crate::settings::Settings;
use crate::WorkerError;

/// The consumer's name, shared by every worker replica.
pub const CONSUMER: &str = hookyard_core::store::dead_letters::EXEC_CONSUMER;

/// Why a run did not happen, or how it ended.
#[derive(Debug, Clone, PartialEq)]
pub enum RunReport {
    /// Counts per model.
    Finished(Value),
    Failed(String),
    /// Another run of the same sync and connection was in progress.
    Skipped,
    /// The sync is not deployed (any more) or has no exec.
    NotDeployed,
}

pub struct Executor {
    store: Store,
    jetstream: jetstream::Context,
    pool: Pool,
    deployments: Arc<Deployments>,
    /// For the sync notifications of runs that changed records.
    settings: Arc<Settings>,
    catalog: Arc<Catalog>,
    guard: ForwardingConfig,
    ack_wait: Duration,
    /// A run's lease (and its notice's hold); renewed every third of it while it lives.
    lease: Duration,
    webhook_base_url: String,
    validation: hookyard_functions::RecordValidation,
    /// Where exec's `nango.triggerAction` runs actions: threads of their own
    /// (`api.action_threads`, `api.action_concurrent_runs`), as in the API.
    actions: Arc<Actions>,
}

impl Executor {
    pub fn new(
        store: Store,
        jetstream: jetstream::Context,
        deployments: Arc<Deployments>,
        settings: Arc<Settings>,
        catalog: Arc<Catalog>,
        config: &Config,
        oplog: OpLog,
    ) -> Executor {
        Executor {
            settings,
            pool: Pool::sized(
                Sizing::of(config.worker.exec_threads, config.worker.exec_concurrent_runs),
                config.worker.exec_limits.clone(),
            ),
            actions: Arc::new(Actions::new(store.clone(), catalog.clone(), config, Some(oplog))),
            catalog,
            store,
            jetstream,
            deployments,
            guard: config.forwarding.clone(),
            ack_wait: config.worker.ack_wait,
            lease: config.worker.exec_lease,
            webhook_base_url: config.webhook_base_url(),
            validation: config.worker.validate_records,
        }
    }

    /// The action threads, which asynchronous actions run on too.
    pub(crate) fn actions(&self) -> Arc<Actions> {
        self.actions.clone()
    }

    /// Consumes `HOOKS_EXEC` until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> Result<(), WorkerError> {
        // Runs in progress at once (`worker.exec_concurrent_runs`); jobs asked for one at a
        // time, while a run is free, so that this worker holds at most one job unstarted
        // that another worker could run.
        let share = Share {
            concurrency: self.pool.threads(),
            batch: 1,
        };
        let config = async_nats::jetstream::consumer::pull::Config {
            filter_subject: "hooks.exec.>".into(),
            ..durable(CONSUMER, "hookyard worker: exec runs", self.ack_wait, share)
        };
        consume(&self.jetstream, EXEC_STREAM, config, share, shutdown, |message| {
            let executor = self.clone();
            async move { executor.handle(message).await }
        })
        .await?;
        Ok(())
    }

    async fn handle(&self, message: jetstream::Message) {
        let job: ExecJob = match serde_json::from_slice(&message.payload) {
            Ok(job) => job,
            Err(error) => {
                // Kept as a dead letter; acked only once it is.
                tracing::error!(subject = %message.subject, %error, "not an exec job; dead-lettered");
                let letter = crate::invalid_message(CONSUMER, EXEC_STREAM, &message, &error.to_string());
                match self.store.commit(vec![letter]).await {
                    Ok(_) => {
                        let _ = message.ack().await;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "keeping a dead letter failed; retrying");
                        let _ = message.ack_with(AckKind::Nak(Some(Duration::from_secs(5)))).await;
                    }
                }
                return;
            }
        };
        // The job stays ours while the run lasts.
        let report = with_heartbeat(self.run_job(&job), self.ack_wait / 3, || async {
            let _ = message.ack_with(AckKind::Progress).await;
        })
        .await;
        match report {
            Ok(report) => {
                log_report(&job, &report);
                let _ = message.ack().await;
            }
            Err(error) => {
                tracing::warn!(%error, sync = %job.sync, connection = %job.connection_id, "exec job could not be run; retrying");
                let _ = message.ack_with(AckKind::Nak(Some(Duration::from_secs(5)))).await;
            }
        }
    }

    /// Runs one job: claims the run, prepares it (`emptyCache`, `reset`), executes and
    /// records the outcome. `Err` only when the database or NATS failed around it.
    pub async fn run_job(&self, job: &ExecJob) -> Result<RunReport, WorkerError> {
        // The latest deploy runs (one query when nothing changed; jobs are few).
        self.deployments.refresh().await?;
        let found = self
            .deployments
            .find(&job.environment, &job.integration, &job.sync)
            .filter(|s| s.sync.has_exec());
        let Some(sync) = found else {
            return Ok(RunReport::NotDeployed);
        };
        let key = SyncKey {
            environment_id: sync.sync.environment_id,
            integration: job.integration.clone(),
            sync: job.sync.clone(),
            connection_id: job.connection_id.clone(),
        };
        let run_id = hex::encode(hookyard_core::secrets::random_bytes::<8>());
        self.store.ensure_sync_states(&[(key.clone(), true)]).await?;
        let first = self
            .store
            .sync_state(&key)
            .await?
            .is_none_or(|s| s.last_outcome.is_none());
        let started = chrono::Utc::now();
        if !self.store.claim_run(&key, &run_id, self.lease).await? {
            return Ok(RunReport::Skipped);
        }
        // Each write keeps this notice current, so a run that dies midway leaves one.
        let held = notify::wanted(&self.settings, &job.environment)
            .await
            .then(|| HeldNotice {
                notice: unfinished_notice(job, &run_id, first, started),
                hold: self.lease,
            });
        let notice_key = held.as_ref().map(|held| held.notice.key());
        let running = self.execute(job, &sync, &key, held.clone());
        let report = with_heartbeat(running, self.lease / 3, || async {
            if let Err(error) = self.store.extend_run(&key, &run_id, self.lease).await {
                tracing::warn!(%error, "renewing an exec run's lease failed");
            }
            if let Some(notice_key) = &notice_key {
                if let Err(error) = self
                    .store
                    .hold_notice(notice_key, chrono::Utc::now() + self.lease)
                    .await
                {
                    tracing::warn!(%error, "holding an exec run's sync notice failed");
                }
            }
        })
        .await;
        let (outcome, per_model) = match report {
            Ok((counts, per_model)) => (RunOutcome::Success(counts), per_model),
            Err((error, per_model)) => (RunOutcome::Error(error), per_model),
        };
        if let Some(held) = held {
            // What the run wrote is notified whether or not it succeeded.
            let (models, counts) = per_model.into_iter().unzip();
            let error = match &outcome {
                RunOutcome::Success(_) => None,
                RunOutcome::Error(error) => Some(error.clone()),
            };
            self.notify(SyncNotice {
                models,
                counts,
                error,
                ..held.notice
            })
            .await;
        }
        self.store.finish_run(&key, &run_id, &outcome).await?;
        Ok(match outcome {
            RunOutcome::Success(counts) => RunReport::Finished(counts),
            RunOutcome::Error(error) => RunReport::Failed(error),
        })
    }

    /// Settles the run's notice in the outbox (over the copy its writes kept), then
    /// queues its notifications; what fails here is left to the sweep.
    async fn notify(&self, notice: SyncNotice) {
        if let Err(error) = self.store.settle_notice(&notice).await {
            tracing::warn!(%error, "the exec run's sync notice could not be settled; queueing it directly");
        }
        let notices = [notice];
        if let Err(error) = notify::send(&self.settings, &self.jetstream, &self.store, &notices).await {
            tracing::warn!(%error, "the exec run's sync notifications could not be queued now; the sweep will");
        }
    }

    /// One run: its counts per model (as reported, and as notified), or why it failed
    /// with the counts of what it wrote before.
    async fn execute(
        &self,
        job: &ExecJob,
        sync: &Arc<LiveSync>,
        key: &SyncKey,
        notice: Option<HeldNotice>,
    ) -> Result<(Value, PerModel), (String, PerModel)> {
        let (host, invocation) = self
            .prepare(job, sync, key, notice)
            .await
            .map_err(|e| (e, Vec::new()))?;
        let outcome = self.pool.execute(sync.code.clone(), invocation).await;
        host.release_locks().await;
        let (_, logs) = hookyard_functions::count_execution("exec", &outcome);
        for line in logs {
            tracing::debug!(sync = %job.sync, connection = %job.connection_id, level = %line.level, "exec log: {}", line.message);
        }
        match outcome {
            Ok(_) => Ok((host.counts(), host.counts_per_model())),
            Err(error) => Err((error.to_string(), host.counts_per_model())),
        }
    }

    /// The host and invocation of a run, after `emptyCache` and `reset` are done.
    async fn prepare(
        &self,
        job: &ExecJob,
        sync: &Arc<LiveSync>,
        key: &SyncKey,
        notice: Option<HeldNotice>,
    ) -> Result<(Arc<StoreHost>, Invocation), String> {
        let failed = |e: &dyn std::fmt::Display| e.to_string();
        let (connection, api) = connection_api(&self.store, &self.catalog, key, &self.guard)
            .await
            .map_err(|e| failed(&e))?;
        let models: Vec<String> = serde_json::from_str(&sync.models).unwrap_or_default();
        if job.empty_cache {
            for model in &models {
                self.store
                    .empty_records(&key.scope(model))
                    .await
                    .map_err(|e| failed(&e))?;
            }
        }
        if job.reset {
            self.store.reset_sync_progress(key).await.map_err(|e| failed(&e))?;
        }
        let version = raw_version(&self.jetstream).await?;
        let host = Arc::new(StoreHost::new(Run {
            store: self.store.clone(),
            jetstream: Some(self.jetstream.clone()),
            key: key.clone(),
            version,
            api,
            mode: Mode::Apply,
            kind: Kind::Sync,
            notice,
            webhook_base_url: self.webhook_base_url.clone(),
            actions: Some(self.actions.clone()),
        }));
        let invocation = exec_invocation(&connection, sync.models.clone(), host.clone(), self.validation);
        Ok((host, invocation))
    }
}

/// Each written model's counts.
type PerModel = Vec<(String, WriteCounts)>;

/// The notice of run `run_id` before it writes, as the sweep sends it if the run dies.
fn unfinished_notice(job: &ExecJob, run_id: &str, first: bool, started: chrono::DateTime<chrono::Utc>) -> SyncNotice {
    SyncNotice {
        environment: job.environment.clone(),
        integration: job.integration.clone(),
        connection: job.connection_id.clone(),
        sync: job.sync.clone(),
        models: Vec::new(),
        message_id: format!("exec-{run_id}"),
        sync_type: if first { "INITIAL" } else { "INCREMENTAL" }.into(),
        modified_after: started,
        counts: Vec::new(),
        error: Some(UNFINISHED.into()),
    }
}

fn log_report(job: &ExecJob, report: &RunReport) {
    let (sync, connection) = (&job.sync, &job.connection_id);
    match report {
        RunReport::Finished(counts) => tracing::info!(%sync, %connection, %counts, "exec run finished"),
        RunReport::Failed(error) => tracing::warn!(%sync, %connection, %error, "exec run failed"),
        RunReport::Skipped => tracing::info!(%sync, %connection, "exec job skipped: a run of it is in progress"),
        RunReport::NotDeployed => tracing::info!(%sync, %connection, "exec job skipped: the sync has no deployed exec"),
    }
}
