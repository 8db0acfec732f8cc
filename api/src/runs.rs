//! A deployed function run for one connection here in the API, on a JS thread pool of the
//! caller's: event functions (`events`) and actions (`actions`). Each run gets the
//! provider API and the store through a host of its own, as an exec run does.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use hookyard_core::config::{Config, ForwardingConfig};
use hookyard_core::metrics::names;
use hookyard_core::providers::Catalog;
use hookyard_core::store::functions::DeployedSync;
use hookyard_core::store::syncs::SyncKey;
use hookyard_core::store::Environment;
use hookyard_core::Store;
use hookyard_functions::compile::stored_modules;
use hookyard_functions::host::{connection_api, exec_invocation, Kind, Mode, Run, StoreHost};
use hookyard_functions::pool::{Pool, SyncCode};
use hookyard_functions::{Effects, FunctionError, Handler, Invocation, RecordValidation};

/// Bundles kept decoded (a bundle never changes under its hash): an action called often
/// does not read its bytecode from the database each time.
const BUNDLES_KEPT: usize = 8;

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
    /// The connection, its integration or the bundle could not be read.
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
    bundles: Mutex<Vec<(String, Modules)>>,
}

impl Runner {
    pub fn new(store: Store, catalog: Arc<Catalog>, config: &Config) -> Runner {
        Runner {
            store,
            catalog,
            guard: config.forwarding.clone(),
            webhook_base_url: config.webhook_base_url(),
            validation: config.worker.validate_records,
            bundles: Mutex::new(Vec::new()),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Runs `function` for the connection on `pool`.
    pub async fn run(
        &self,
        pool: &Pool,
        environment: &Environment,
        function: &DeployedSync,
        connection_id: &str,
        call: Call,
    ) -> Result<Effects, RunError> {
        let key = SyncKey {
            environment_id: environment.id,
            integration: function.integration.clone(),
            sync: function.name.clone(),
            connection_id: connection_id.to_string(),
        };
        let (connection, api) = connection_api(&self.store, &self.catalog, &key, &self.guard)
            .await
            .map_err(RunError::Setup)?;
        let code = Arc::new(SyncCode::of(function, self.modules(&function.bundle_hash).await?));
        let (kind, label) = match call {
            Call::Event => (Kind::Event, "event"),
            Call::Action(_) => (Kind::Action, "action"),
        };
        // Neither writes records: their version does not matter.
        let host = StoreHost::new(Run {
            store: self.store.clone(),
            jetstream: None,
            key,
            version: 0,
            api,
            mode: Mode::Apply,
            kind,
            notice: None,
            webhook_base_url: self.webhook_base_url.clone(),
        });
        let exec = exec_invocation(&connection, "[]".into(), Arc::new(host), RecordValidation::Off);
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
        let (status, elapsed) = match &outcome {
            Ok(effects) => ("ok", effects.elapsed),
            Err(error) => ("failed", error.elapsed),
        };
        metrics::counter!(names::EXECUTIONS, "kind" => label, "status" => status).increment(1);
        metrics::histogram!(names::EXECUTION_SECONDS, "kind" => label).record(elapsed.as_secs_f64());
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
        let modules = Arc::new(
            stored_modules(&self.store, hash)
                .await
                .map_err(|e| RunError::Setup(e.to_string()))?,
        );
        let mut bundles = self.bundles.lock().expect("bundle cache");
        if bundles.len() >= BUNDLES_KEPT {
            bundles.remove(0);
        }
        bundles.push((hash.to_string(), modules.clone()));
        Ok(modules)
    }
}
