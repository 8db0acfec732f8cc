//! A deployed function run for one connection on a pool of the caller's: the API's event
//! functions, and actions ([`Actions`]: `POST /action/trigger`, `nango.triggerAction`,
//! and the asynchronous actions workers take from the store).
//! Each run gets the provider API and the store through a host of its own, as an exec run
//! does.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hookyard_core::config::{Config, ForwardingConfig};
use hookyard_core::keys::IntegrationKey;
use hookyard_core::oplog::OpLog;
use hookyard_core::providers::Catalog;
use hookyard_core::store::action_runs::{ActionFailure, ActionRun, NewActionRun};
use hookyard_core::store::functions::DeployedSync;
use hookyard_core::store::logs::ActionEntry;
use hookyard_core::store::syncs::SyncKey;
use hookyard_core::store::StoreError;
use hookyard_core::Store;
use serde_json::Value;
use tokio::sync::Semaphore;

use crate::compile::stored_modules;
use crate::host::{connection_api, exec_invocation, Kind, Mode, Run, StoreHost};
use crate::pool::{Pool, Sizing, SyncCode};
use crate::{Effects, ErrorKind, FunctionError, Handler, Invocation, RecordValidation};

/// Bundles kept decoded (a bundle never changes under its hash): a function run often
/// does not read its bytecode from the database each time.
const BUNDLES_KEPT: usize = 8;

/// How many action runs may wait for a thread, per action thread (turn).
const WAITING_PER_THREAD: usize = 4;

/// A bundle's modules, by path.
type Modules = Arc<BTreeMap<String, Vec<u8>>>;

/// What to run.
pub enum Call {
    /// An event function's `exec(nango)`.
    Event,
    /// An action's `exec(nango, input)`, the input as JSON.
    Action(Arc<str>),
}

/// Why a run did not happen, or failed.
pub enum RunError {
    /// The connection or its integration is not there, or could not be read.
    Store(StoreError),
    /// The bundle could not be loaded.
    Setup(String),
    Function(FunctionError),
}

pub struct Runner {
    store: Store,
    catalog: Arc<Catalog>,
    guard: ForwardingConfig,
    webhook_base_url: String,
    /// How an action's output is checked against its schema.
    validation: RecordValidation,
    /// What the functions run here may trigger with `nango.triggerAction`.
    actions: Option<Arc<Actions>>,
    bundles: Mutex<Vec<(String, Modules)>>,
}

impl Runner {
    /// A runner whose functions trigger actions on `actions` (`None`: they cannot).
    pub fn new(store: Store, catalog: Arc<Catalog>, config: &Config, actions: Option<Arc<Actions>>) -> Runner {
        Runner {
            store,
            catalog,
            guard: config.forwarding.clone(),
            webhook_base_url: config.webhook_base_url(),
            validation: config.worker.validate_records,
            actions,
            bundles: Mutex::new(Vec::new()),
        }
    }

    /// Runs `function` for the connection on `pool`.
    pub async fn run(
        &self,
        pool: &Pool,
        function: &DeployedSync,
        connection_id: &str,
        call: Call,
    ) -> Result<Effects, RunError> {
        let key = SyncKey {
            environment_id: function.environment_id,
            integration: function.integration.clone(),
            sync: function.name.clone(),
            connection_id: connection_id.to_string(),
        };
        let (connection, api) = connection_api(&self.store, &self.catalog, &key, &self.guard)
            .await
            .map_err(RunError::Store)?;
        let code = Arc::new(SyncCode::of(function, self.modules(&function.bundle_hash).await?));
        let (kind, label) = match call {
            Call::Event => (Kind::Event, "event"),
            Call::Action(_) => (Kind::Action, "action"),
        };
        // Neither writes records: their version does not matter.
        let host = Arc::new(StoreHost::new(Run {
            store: self.store.clone(),
            jetstream: None,
            key,
            version: 0,
            api,
            mode: Mode::Apply,
            kind,
            notice: None,
            webhook_base_url: self.webhook_base_url.clone(),
            actions: self.actions.clone(),
        }));
        let exec = exec_invocation(&connection, "[]".into(), host.clone(), RecordValidation::Off);
        let invocation = match call {
            Call::Event => exec,
            Call::Action(input) => Invocation {
                payload: input,
                handler: Handler::Action,
                validation: self.validation,
                ..exec
            },
        };
        let outcome = pool.execute(code, invocation).await;
        host.release_locks().await;
        crate::count_execution(label, &outcome);
        outcome.map_err(RunError::Function)
    }

    async fn modules(&self, hash: &str) -> Result<Modules, RunError> {
        let kept = self
            .bundles
            .lock()
            .expect("bundle cache")
            .iter()
            .find(|(h, _)| h == hash)
            .map(|(_, m)| m.clone());
        if let Some(modules) = kept {
            return Ok(modules);
        }
        // A database away is worth waiting for; a bundle that is gone or no longer
        // compiles is not.
        let modules = Arc::new(stored_modules(&self.store, hash).await.map_err(|e| match e {
            e if e.is_unavailable() => RunError::Store(e),
            e => RunError::Setup(e.to_string()),
        })?);
        let mut bundles = self.bundles.lock().expect("bundle cache");
        if bundles.len() >= BUNDLES_KEPT {
            bundles.remove(0);
        }
        bundles.push((hash.to_string(), modules.clone()));
        Ok(modules)
    }
}

/// Actions run on JS threads of their own (`api.action_concurrent_runs` in progress,
/// `api.action_threads` of them running JavaScript at once, each within
/// `api.action_limits`), and the room left to wait for one. An action triggers others
/// (`nango.triggerAction`) on a second set of threads, whose actions trigger none: one
/// waiting on the threads of its own set could wait for ever once actions hold them all.
pub struct Actions {
    runner: Runner,
    pool: Pool,
    room: Arc<Semaphore>,
    /// Where each run is logged (`hookyard logs --actions`).
    oplog: Option<OpLog>,
}

/// How an action run was called, for the operation log.
#[derive(Debug, Clone, Copy)]
pub enum Origin<'a> {
    /// `POST /action/trigger`.
    Api,
    /// An attempt of an asynchronous run.
    Async { run_id: &'a str, attempt: u32 },
    /// `nango.triggerAction`.
    Function,
}

/// Why an action did not answer.
#[derive(Debug)]
pub enum TriggerError {
    /// No such action (the message names the integration's actions).
    UnknownAction(String),
    /// Every thread is busy and enough runs wait.
    Busy,
    /// The connection is not there, or the store could not say.
    Store(StoreError),
    /// The action's bundle could not be loaded.
    Setup(String),
    /// It ran and failed.
    Function(FunctionError),
}

impl std::fmt::Display for TriggerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TriggerError::UnknownAction(message) | TriggerError::Setup(message) => f.write_str(message),
            TriggerError::Busy => f.write_str(
                "every action thread is busy and enough runs wait for one (api.action_concurrent_runs); retry later",
            ),
            TriggerError::Store(error) => write!(f, "{error}"),
            TriggerError::Function(error) => f.write_str(&error.summary()),
        }
    }
}

impl Actions {
    /// Actions whose runs are logged to `oplog` (`None`: only to the process's log), and
    /// that trigger others on threads of their own ([`Actions::innermost`]).
    pub fn new(store: Store, catalog: Arc<Catalog>, config: &Config, oplog: Option<OpLog>) -> Actions {
        let inner = Arc::new(Actions::innermost(
            store.clone(),
            catalog.clone(),
            config,
            oplog.clone(),
        ));
        Actions::with(store, catalog, config, oplog, Some(inner))
    }

    /// Actions that trigger none: those an action triggers (and a dry run of an action).
    pub fn innermost(store: Store, catalog: Arc<Catalog>, config: &Config, oplog: Option<OpLog>) -> Actions {
        Actions::with(store, catalog, config, oplog, None)
    }

    fn with(
        store: Store,
        catalog: Arc<Catalog>,
        config: &Config,
        oplog: Option<OpLog>,
        inner: Option<Arc<Actions>>,
    ) -> Actions {
        let turns = config.api.action_threads;
        let pool = Pool::sized(
            Sizing::of(turns, config.api.action_concurrent_runs),
            config.api.action_limits.clone(),
        );
        Actions {
            runner: Runner::new(store, catalog, config, inner),
            room: Arc::new(Semaphore::new(pool.threads() + turns * WAITING_PER_THREAD)),
            pool,
            oplog,
        }
    }

    /// How many runs are in progress at once, at most.
    pub fn concurrent_runs(&self) -> usize {
        self.pool.threads()
    }

    /// The deployed action `name` of `integration`.
    pub async fn find(
        &self,
        environment_id: i64,
        integration: &IntegrationKey,
        name: &str,
    ) -> Result<DeployedSync, TriggerError> {
        let functions = self
            .runner
            .store
            .functions(environment_id)
            .await
            .map_err(TriggerError::Store)?;
        let of_integration: Vec<&DeployedSync> = functions.iter().filter(|f| &f.integration == integration).collect();
        match of_integration.iter().find(|f| f.name == name && f.is_action()) {
            Some(action) => Ok((*action).clone()),
            None => Err(TriggerError::UnknownAction(unknown_action(
                integration,
                name,
                &of_integration,
            ))),
        }
    }

    /// Queues `new` for a worker to run (an asynchronous action), once its action and its
    /// connection are known to be there.
    pub async fn queue(&self, new: &NewActionRun) -> Result<ActionRun, TriggerError> {
        self.find(new.environment_id, &new.integration, &new.action_name)
            .await?;
        let store = &self.runner.store;
        store
            .existing_connection(new.environment_id, &new.integration, &new.connection_id)
            .await
            .map_err(TriggerError::Store)?;
        store
            .queue_action_run(new, chrono::Utc::now())
            .await
            .map_err(TriggerError::Store)
    }

    /// Runs the action `name` of `integration` for the connection with `input`; what it
    /// returned (`None` for nothing or `null`).
    pub async fn trigger(
        self: &Arc<Self>,
        environment_id: i64,
        integration: &IntegrationKey,
        connection_id: &str,
        name: &str,
        input: &Value,
        origin: Origin<'_>,
    ) -> Result<Option<Value>, TriggerError> {
        // The connection is read with the run (a missing one is a `Store` error then).
        let action = self.find(environment_id, integration, name).await?;
        let Ok(room) = self.room.clone().try_acquire_owned() else {
            return Err(TriggerError::Busy);
        };
        let (started, started_at) = (Instant::now(), chrono::Utc::now());
        let action_environment = action.environment.to_string();
        // A task of its own, which holds its room until the run ends: a caller that goes
        // away (an HTTP client that hangs up) leaves the run on its thread, and must not
        // leave room for one more meanwhile.
        let (actions, connection, input) = (self.clone(), connection_id.to_string(), input.to_string());
        let outcome = tokio::spawn(async move {
            let _room = room;
            let call = Call::Action(input.into());
            actions.runner.run(&actions.pool, &action, &connection, call).await
        })
        .await
        .map_err(|e| TriggerError::Setup(format!("the action's run stopped: {e}")))?;
        let elapsed = started.elapsed();
        let ms = elapsed.as_millis() as u64;
        let logged = |status: &str, logs: &[crate::LogLine], error: Option<Value>| {
            let Some(oplog) = &self.oplog else { return };
            let (run_id, attempt) = match origin {
                Origin::Async { run_id, attempt } => (Some(run_id.to_string()), Some(attempt as i32)),
                Origin::Api | Origin::Function => (None, None),
            };
            oplog.action(ActionEntry {
                environment: action_environment.clone(),
                integration: integration.to_string(),
                connection_id: connection_id.to_string(),
                action_name: name.to_string(),
                origin: origin.as_str().into(),
                run_id,
                attempt,
                started_at,
                duration_ms: elapsed.as_secs_f64() * 1e3,
                status: status.into(),
                error,
                logs: serde_json::to_value(logs).unwrap_or_default(),
            });
        };
        match outcome {
            Ok(effects) => {
                logged("succeeded", &effects.logs, None);
                let logs: Vec<&str> = effects.logs.iter().map(|l| l.message.as_str()).collect();
                tracing::info!(action = name, connection = connection_id, %integration, ms, ?logs, "action ran");
                Ok(effects.output)
            }
            Err(RunError::Store(error)) => Err(TriggerError::Store(error)),
            Err(RunError::Setup(error)) => {
                tracing::warn!(action = name, connection = connection_id, %integration, %error, "action not run");
                Err(TriggerError::Setup(format!("the action could not be run: {error}")))
            }
            Err(RunError::Function(error)) => {
                let failure = serde_json::to_value(action_failure(&error).1).ok();
                logged("failed", &error.logs, failure);
                tracing::warn!(action = name, connection = connection_id, %integration, ms, %error, "action failed");
                Err(TriggerError::Function(error))
            }
        }
    }
}

impl Origin<'_> {
    fn as_str(self) -> &'static str {
        match self {
            Origin::Api => "api",
            Origin::Async { .. } => "async",
            Origin::Function => "function",
        }
    }
}

/// How a failed action answers, as Nango's: the HTTP status `POST /action/trigger` gives
/// it, and the thrown error's type and payload where it has them, its first line as the
/// message (the stack is in the log).
pub fn action_failure(error: &FunctionError) -> (u16, ActionFailure) {
    let first_line = |text: &str| text.lines().next().unwrap_or_default().to_string();
    let Some(thrown) = error.thrown.as_ref().filter(|_| error.kind == ErrorKind::Thrown) else {
        let failure = ActionFailure {
            code: "action_script_failure".into(),
            message: error.summary(),
            payload: None,
        };
        return (500, failure);
    };
    let (status, code) = match thrown.error_type.as_str() {
        "invalid_action_input" => (400, "invalid_action_input"),
        "invalid_action_output" => (500, "invalid_action_output"),
        "script_http_error" => (424, "script_http_error"),
        "action_script_runtime_error" => (500, "action_script_runtime_error"),
        _ => (500, "action_script_failure"),
    };
    let failure = ActionFailure {
        code: code.into(),
        message: first_line(&error.message),
        payload: thrown.payload.clone(),
    };
    (status, failure)
}

/// The action is not deployed; what is, said.
fn unknown_action(integration: &IntegrationKey, name: &str, deployed: &[&DeployedSync]) -> String {
    if deployed.iter().any(|f| f.name == name) {
        return format!("{integration}'s {name} is a sync or event function, not an action (createAction)");
    }
    let actions: Vec<&str> = deployed
        .iter()
        .filter(|f| f.is_action())
        .map(|f| f.name.as_str())
        .collect();
    let known = match actions[..] {
        [] => "it has none".to_string(),
        _ => format!("its actions: {}", actions.join(", ")),
    };
    format!("integration {integration} has no action named {name:?} ({known})")
}
