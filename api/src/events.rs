//! Event functions (`createOnEvent`): `post-connection-creation` runs after a connection
//! is created (its typical job: register the provider's webhook and keep the subscription
//! id with `setMetadata`); `pre-connection-deletion` runs before one is deleted, and the
//! deletion waits for it, at most [`EVENT_TIMEOUT`]. A failure is logged and the
//! deletion goes ahead. They run here, in the API, on a JS thread of their own.

use std::sync::Arc;
use std::time::Duration;

use hookyard_core::config::{Config, ForwardingConfig};
use hookyard_core::keys::IntegrationKey;
use hookyard_core::providers::Catalog;
use hookyard_core::store::syncs::SyncKey;
use hookyard_core::store::Environment;
use hookyard_core::Store;
use hookyard_functions::compile::stored_modules;
use hookyard_functions::host::{connection_api, exec_invocation, Kind, Mode, Run, StoreHost};
use hookyard_functions::pool::{Pool, SyncCode};

/// How long an event function may run (and a deletion waits for one).
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Events {
    store: Store,
    pool: Pool,
    catalog: Arc<Catalog>,
    guard: ForwardingConfig,
}

impl Events {
    pub fn new(store: Store, catalog: Arc<Catalog>, config: &Config) -> Events {
        let limits = hookyard_functions::Limits {
            cpu_budget: config.worker.exec_limits.cpu_budget.min(EVENT_TIMEOUT),
            timeout: EVENT_TIMEOUT,
            ..config.worker.exec_limits.clone()
        };
        Events {
            store,
            pool: Pool::new(1, limits),
            catalog,
            guard: config.forwarding.clone(),
        }
    }

    /// Runs the integration's event functions for `event` on the connection, one after
    /// the other; each outcome is logged. Returns how many ran and how many failed.
    pub async fn run(
        &self,
        environment: &Environment,
        integration: &IntegrationKey,
        connection_id: &str,
        event: &str,
    ) -> (usize, usize) {
        let functions = match self.store.functions(environment.id).await {
            Ok(functions) => functions,
            Err(error) => {
                tracing::warn!(%error, event, connection = connection_id, "event functions could not be loaded");
                return (0, 1);
            }
        };
        let mut outcome = (0, 0);
        for function in functions
            .into_iter()
            .filter(|f| &f.integration == integration && f.config["onEvent"] == true && f.config["event"] == event)
        {
            outcome.0 += 1;
            let started = std::time::Instant::now();
            match self.run_one(environment, &function, connection_id).await {
                Ok(logs) => tracing::info!(
                    function = %function.name, event, connection = connection_id, %integration,
                    ms = started.elapsed().as_millis() as u64, logs = ?logs, "event function ran"
                ),
                Err(error) => {
                    outcome.1 += 1;
                    tracing::warn!(
                        function = %function.name, event, connection = connection_id, %integration, %error,
                        "event function failed"
                    );
                }
            }
        }
        outcome
    }

    async fn run_one(
        &self,
        environment: &Environment,
        function: &hookyard_core::store::functions::DeployedSync,
        connection_id: &str,
    ) -> Result<Vec<String>, String> {
        let key = SyncKey {
            environment_id: environment.id,
            integration: function.integration.clone(),
            sync: function.name.clone(),
            connection_id: connection_id.to_string(),
        };
        let (connection, api) = connection_api(&self.store, &self.catalog, &key, &self.guard).await?;
        let modules = stored_modules(&self.store, &function.bundle_hash)
            .await
            .map_err(|e| e.to_string())?;
        let code = Arc::new(SyncCode::of(function, Arc::new(modules)));
        // Event functions write no records: their version does not matter.
        let host = StoreHost::new(Run {
            store: self.store.clone(),
            jetstream: None,
            key,
            version: 0,
            api,
            mode: Mode::Apply,
            kind: Kind::Event,
        });
        let invocation = exec_invocation(&connection, "[]".into(), Arc::new(host));
        match self.pool.execute(code, invocation).await {
            Ok(effects) => Ok(effects.logs.into_iter().map(|l| l.message).collect()),
            Err(error) => Err(error.to_string()),
        }
    }
}
