//! Exec runs: a durable consumer on `HOOKS_EXEC` that runs a sync's `exec(nango)` for one
//! connection, on JS threads of its own.
//!
//! At most one run per (sync, connection) lives at a time, across workers: a run holds a
//! lease in the database, extended while it goes; a job that arrives meanwhile is skipped
//! (and logged). Writes are applied as the function makes them, at the run's version: the
//! last `HOOKS_RAW` sequence when it began (× 2^16 + 0xFFFF), so they never overwrite a
//! webhook's write that came in after the run began. A failed run is not retried: the
//! next slot runs it again, and its error shows in `GET /sync/status`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use hookyard_core::config::{Config, ForwardingConfig};
use hookyard_core::exec_job::ExecJob;
use hookyard_core::providers::api::ApiSpec;
use hookyard_core::providers::Catalog;
use hookyard_core::store::records::{RecordScope, WriteCounts, WriteKind};
use hookyard_core::store::syncs::{RunOutcome, SyncKey};
use hookyard_core::store::MetadataWrite;
use hookyard_core::streams::{consume, durable, EXEC_STREAM, RAW_STREAM};
use hookyard_core::Store;
use hookyard_functions::pool::Pool;
use hookyard_functions::{Handler, Host, Invocation};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;

use crate::deployments::{Deployments, LiveSync};
use crate::provider_api::{Owner, ProviderApi, ProxyRequest};
use crate::{connection_json, jetstream_error, WorkerError};

/// The consumer's name, shared by every worker replica.
pub const CONSUMER: &str = "exec";
/// A run's lease; renewed every third of it while the run lives.
const LEASE: Duration = Duration::from_secs(90);

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
    catalog: Arc<Catalog>,
    guard: ForwardingConfig,
    ack_wait: Duration,
    threads: usize,
}

impl Executor {
    pub fn new(
        store: Store,
        jetstream: jetstream::Context,
        deployments: Arc<Deployments>,
        config: &Config,
    ) -> Result<Executor, WorkerError> {
        Ok(Executor {
            pool: Pool::new(config.worker.exec_threads, config.worker.exec_limits.clone()),
            catalog: Arc::new(Catalog::embedded().map_err(jetstream_error)?),
            store,
            jetstream,
            deployments,
            guard: config.forwarding.clone(),
            ack_wait: config.worker.ack_wait,
            threads: config.worker.exec_threads,
        })
    }

    /// Consumes `HOOKS_EXEC` until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> Result<(), WorkerError> {
        let config = async_nats::jetstream::consumer::pull::Config {
            filter_subject: "hooks.exec.>".into(),
            ..durable(CONSUMER, "hookyard worker: exec runs", self.ack_wait, self.threads * 2)
        };
        consume(&self.jetstream, EXEC_STREAM, config, self.threads, shutdown, |message| {
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
                tracing::error!(subject = %message.subject, %error, "not an exec job; dropped");
                let _ = message.ack().await;
                return;
            }
        };
        // The job stays ours while the run lasts.
        let every = self.ack_wait / 3;
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        let running = self.run_job(&job);
        tokio::pin!(running);
        let report = loop {
            tokio::select! {
                report = &mut running => break report,
                _ = ticker.tick() => { let _ = message.ack_with(AckKind::Progress).await; }
            }
        };
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
        let find = || {
            self.deployments
                .find(&job.environment, &job.integration, &job.sync)
                .filter(|s| s.sync.config["exec"] == true)
        };
        // A sync deployed a moment ago may not be loaded yet.
        let found = match find() {
            Some(sync) => Some(sync),
            None => {
                self.deployments.refresh().await?;
                find()
            }
        };
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
        if !self.store.claim_run(&key, &run_id, LEASE).await? {
            return Ok(RunReport::Skipped);
        }
        let running = self.execute(job, &sync, &key);
        tokio::pin!(running);
        let mut renew = tokio::time::interval_at(tokio::time::Instant::now() + LEASE / 3, LEASE / 3);
        let report = loop {
            tokio::select! {
                report = &mut running => break report,
                _ = renew.tick() => {
                    if let Err(error) = self.store.extend_run(&key, &run_id, LEASE).await {
                        tracing::warn!(%error, "renewing an exec run's lease failed");
                    }
                }
            }
        };
        let outcome = match &report {
            RunReport::Finished(counts) => RunOutcome::Success(counts.clone()),
            RunReport::Failed(error) => RunOutcome::Error(error.clone()),
            _ => RunOutcome::Error("not run".into()),
        };
        self.store.finish_run(&key, &run_id, &outcome).await?;
        Ok(report)
    }

    async fn execute(&self, job: &ExecJob, sync: &Arc<LiveSync>, key: &SyncKey) -> RunReport {
        match self.prepare(job, sync, key).await {
            Ok((host, invocation)) => {
                let outcome = self.pool.execute(sync.code.clone(), invocation).await;
                let logs = match &outcome {
                    Ok(effects) => &effects.logs,
                    Err(error) => &error.logs,
                };
                for line in logs {
                    tracing::debug!(sync = %job.sync, connection = %job.connection_id, level = %line.level, "exec log: {}", line.message);
                }
                match outcome {
                    Ok(_) => RunReport::Finished(host.counts()),
                    Err(error) => RunReport::Failed(error.to_string()),
                }
            }
            Err(error) => RunReport::Failed(error),
        }
    }

    /// The host and invocation of a run, after `emptyCache` and `reset` are done.
    async fn prepare(&self, job: &ExecJob, sync: &Arc<LiveSync>, key: &SyncKey) -> Result<(Arc<ExecHost>, Invocation), String> {
        let failed = |e: &dyn std::fmt::Display| e.to_string();
        let connection = self
            .store
            .connection(key.environment_id, &key.integration, &key.connection_id)
            .await
            .map_err(|e| failed(&e))?
            .ok_or_else(|| format!("connection {} no longer exists", key.connection_id))?;
        let integration = self
            .store
            .integration(key.environment_id, &key.integration)
            .await
            .map_err(|e| failed(&e))?
            .ok_or_else(|| format!("integration {} no longer exists", key.integration))?;
        let provider_api = self.catalog.get(&integration.provider).and_then(|p| p.api.as_ref());
        let api = ApiSpec::for_integration(provider_api, &integration.settings)
            .map_err(|e| failed(&e))
            .and_then(|spec| {
                ProviderApi::new(
                    spec,
                    connection.credentials.clone(),
                    Owner {
                        environment_id: key.environment_id,
                        integration: key.integration.clone(),
                        connection_id: key.connection_id.clone(),
                    },
                    self.store.clone(),
                    self.guard.clone(),
                )
            });
        let models: Vec<String> = serde_json::from_str(&sync.models).unwrap_or_default();
        let scope = |model: &str| RecordScope {
            environment_id: key.environment_id,
            integration: key.integration.clone(),
            connection_id: key.connection_id.clone(),
            model: model.to_string(),
        };
        if job.empty_cache {
            for model in &models {
                self.store.empty_records(&scope(model)).await.map_err(|e| failed(&e))?;
            }
        }
        if job.reset {
            self.store.set_checkpoint(key, None).await.map_err(|e| failed(&e))?;
        }
        let version = raw_version(&self.jetstream).await?;
        let (metadata, described) = connection_json(&connection);
        let host = Arc::new(ExecHost {
            runtime: tokio::runtime::Handle::current(),
            store: self.store.clone(),
            jetstream: self.jetstream.clone(),
            key: key.clone(),
            version,
            api,
            state: Mutex::default(),
        });
        let invocation = Invocation {
            payload: "null".into(),
            connection_id: key.connection_id.clone(),
            provider_config_key: key.integration.to_string(),
            metadata,
            connection: described,
            models: sync.models.clone(),
            handler: Handler::Exec,
            host: Some(host.clone()),
        };
        Ok((host, invocation))
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

/// The version a run writes at: after every webhook ingested so far, before any later.
async fn raw_version(jetstream: &jetstream::Context) -> Result<i64, String> {
    let mut stream = jetstream.get_stream(RAW_STREAM).await.map_err(|e| e.to_string())?;
    let last = stream.info().await.map_err(|e| e.to_string())?.state.last_sequence;
    Ok(((last as i64) << 16) | 0xFFFF)
}

/// What an exec's `nango` calls: applied as they come, from the run's JS thread.
struct ExecHost {
    runtime: tokio::runtime::Handle,
    store: Store,
    jetstream: jetstream::Context,
    key: SyncKey,
    version: i64,
    api: Result<ProviderApi, String>,
    state: Mutex<RunState>,
}

#[derive(Default)]
struct RunState {
    counts: HashMap<String, WriteCounts>,
    /// Per model whose deletes are tracked: the ids written since `trackDeletesStart`.
    seen: HashMap<String, HashSet<String>>,
}

#[derive(Deserialize)]
struct WriteArgs {
    strategy: String,
    kind: String,
    model: String,
    records: Vec<Value>,
}

#[derive(Deserialize)]
struct ModelArgs {
    model: String,
}

#[derive(Deserialize)]
struct MetadataArgs {
    how: String,
    value: Map<String, Value>,
}

impl Host for ExecHost {
    fn call(&self, op: &str, args: &str) -> Result<String, String> {
        self.runtime.block_on(self.dispatch(op, args))
    }
}

impl ExecHost {
    async fn dispatch(&self, op: &str, args: &str) -> Result<String, String> {
        let parse_error = |e: serde_json::Error| format!("{op}: {e}");
        let store_error = |e: hookyard_core::store::StoreError| format!("{op}: {e}");
        match op {
            "write" => {
                let args: WriteArgs = serde_json::from_str(args).map_err(parse_error)?;
                self.write(args).await?;
                Ok(String::new())
            }
            "metadata" => {
                let args: MetadataArgs = serde_json::from_str(args).map_err(parse_error)?;
                let how = if args.how == "replace" {
                    MetadataWrite::Replace
                } else {
                    MetadataWrite::Merge
                };
                let key = &self.key;
                self.store
                    .set_connection_metadata(key.environment_id, &key.integration, &[key.connection_id.clone()], &args.value, how)
                    .await
                    .map_err(store_error)?;
                Ok(String::new())
            }
            "proxy" => {
                let request: ProxyRequest = serde_json::from_str(args).map_err(parse_error)?;
                let api = self.api.as_ref().map_err(Clone::clone)?;
                let response = api.call(request).await?;
                serde_json::to_string(&response).map_err(|e| e.to_string())
            }
            "pagination" => Ok(self.api.as_ref().map(ProviderApi::pagination).unwrap_or(Value::Null).to_string()),
            "trackDeletesStart" => {
                let args: ModelArgs = serde_json::from_str(args).map_err(parse_error)?;
                self.state.lock().expect("run state").seen.insert(args.model, HashSet::new());
                Ok(String::new())
            }
            "trackDeletesEnd" => {
                let args: ModelArgs = serde_json::from_str(args).map_err(parse_error)?;
                let seen = self
                    .state
                    .lock()
                    .expect("run state")
                    .seen
                    .remove(&args.model)
                    .ok_or_else(|| format!("trackDeletesEnd({:?}) without trackDeletesStart", args.model))?;
                let counts = self
                    .store
                    .delete_unseen(&self.scope(&args.model), &seen, self.version)
                    .await
                    .map_err(store_error)?;
                self.count(&args.model, &counts);
                Ok(counts.deleted.to_string())
            }
            "getCheckpoint" => Ok(self
                .store
                .checkpoint(&self.key)
                .await
                .map_err(store_error)?
                .unwrap_or(Value::Null)
                .to_string()),
            "saveCheckpoint" => {
                let checkpoint: Value = serde_json::from_str(args).map_err(parse_error)?;
                self.store.set_checkpoint(&self.key, Some(&checkpoint)).await.map_err(store_error)?;
                Ok(String::new())
            }
            "clearCheckpoint" => {
                self.store.set_checkpoint(&self.key, None).await.map_err(store_error)?;
                Ok(String::new())
            }
            other => Err(format!("nango has no {other}")),
        }
    }

    async fn write(&self, args: WriteArgs) -> Result<(), String> {
        let kind = match args.kind.as_str() {
            "save" => WriteKind::Save,
            "update" => WriteKind::Update,
            _ => WriteKind::Delete,
        };
        // `override`: the write wins over every webhook ingested until now.
        let version = if args.strategy == "override" {
            raw_version(&self.jetstream).await?
        } else {
            self.version
        };
        let records: Vec<(String, Value)> = args
            .records
            .into_iter()
            .map(|record| {
                let id = match &record["id"] {
                    Value::String(id) => id.clone(),
                    other => other.to_string(),
                };
                (id, record)
            })
            .collect();
        {
            let mut state = self.state.lock().expect("run state");
            if let Some(seen) = state.seen.get_mut(&args.model) {
                seen.extend(records.iter().map(|(id, _)| id.clone()));
            }
        }
        let counts = self
            .store
            .write_records(&self.scope(&args.model), kind, records, version)
            .await
            .map_err(|e| format!("writing {} records: {e}", args.model))?;
        self.count(&args.model, &counts);
        Ok(())
    }

    fn scope(&self, model: &str) -> RecordScope {
        RecordScope {
            environment_id: self.key.environment_id,
            integration: self.key.integration.clone(),
            connection_id: self.key.connection_id.clone(),
            model: model.to_string(),
        }
    }

    fn count(&self, model: &str, counts: &WriteCounts) {
        let mut state = self.state.lock().expect("run state");
        let total = state.counts.entry(model.to_string()).or_default();
        *total = total.plus(counts);
    }

    /// Per model: added, updated, deleted (what `GET /sync/status` reports).
    fn counts(&self) -> Value {
        let state = self.state.lock().expect("run state");
        state
            .counts
            .iter()
            .map(|(model, c)| {
                (
                    model.clone(),
                    json!({"added": c.added, "updated": c.updated, "deleted": c.deleted}),
                )
            })
            .collect::<Map<String, Value>>()
            .into()
    }
}
