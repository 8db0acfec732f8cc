//! Event functions (`createOnEvent`): `post-connection-creation` runs after a connection
//! is created (its typical job: register the provider's webhook and keep the subscription
//! id with `setMetadata`); `pre-connection-deletion` runs before one is deleted, and the
//! deletion waits for it, at most [`EVENT_TIMEOUT`]. A failure is logged and the
//! deletion goes ahead. They run here, in the API, on JS threads of their own: one at a
//! time runs JavaScript, and up to [`RUNS_PER_TURN`] are in progress, so that a deletion's
//! function does not wait behind creations' functions waiting on their provider.
//!
//! A post-creation run is owed from the connection's commit on (the store's
//! `connection_events`): the API that created the connection claims it for [`CLAIM`]
//! and settles it once its functions ran, whatever their outcome. One whose claim ran
//! out (that API stopped or died mid-run) is run by an API's [`sweep_loop`]: at least
//! once, never lost.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;

use hookyard_core::config::Config;
use hookyard_core::keys::IntegrationKey;
use hookyard_core::providers::Catalog;
use hookyard_core::store::connection_events::OwedEvent;
use hookyard_core::store::{Environment, StoreError};
use hookyard_core::Store;
use hookyard_functions::pool::{Pool, Sizing, RUNS_PER_TURN};
use hookyard_functions::runs::{Actions, Call, RunError, Runner};
use tokio_util::sync::CancellationToken;

/// How long an event function may run (and a deletion waits for one).
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the API that created a connection holds its post-creation run; after this
/// another API's sweep may run it.
pub const CLAIM: Duration = Duration::from_secs(120);
/// How often an API looks for owed runs whose claim ran out.
const SWEEP_EVERY: Duration = Duration::from_secs(15);

pub struct Events {
    store: Store,
    pool: Pool,
    runner: Runner,
}

impl Events {
    /// Event functions that trigger actions run them on `actions`.
    pub fn new(store: Store, catalog: Arc<Catalog>, config: &Config, actions: Arc<Actions>) -> Events {
        let limits = hookyard_functions::Limits {
            cpu_budget: config.worker.exec_limits.cpu_budget.min(EVENT_TIMEOUT),
            timeout: EVENT_TIMEOUT,
            ..config.worker.exec_limits.clone()
        };
        Events {
            runner: Runner::new(store.clone(), catalog, config, Some(actions)),
            store,
            pool: Pool::sized(Sizing::of(1, RUNS_PER_TURN), limits),
        }
    }

    /// Runs an owed event's functions, then settles it, whatever their outcome. It stays
    /// owed (for the sweep) only when the database could not say what to run.
    pub async fn run_owed(&self, owed: &OwedEvent) {
        if let Err(error) = self.run_if_connected(owed).await {
            tracing::warn!(%error, event = owed.event, connection = owed.connection_id, "owed event functions not run; trying again later");
            return;
        }
        if let Err(error) = self.store.settle_event(owed).await {
            tracing::warn!(%error, event = owed.event, connection = owed.connection_id, "an event run could not be marked done; it may run again");
        }
    }

    async fn run_if_connected(&self, owed: &OwedEvent) -> Result<(), StoreError> {
        let Some(environment) = self.store.environment(&owed.environment).await? else {
            return Ok(());
        };
        let connection = self
            .store
            .connection(environment.id, &owed.integration, &owed.connection_id)
            .await?;
        // Deleted since: nothing to set up for it.
        if connection.is_some() {
            self.run(&environment, &owed.integration, &owed.connection_id, &owed.event)
                .await?;
        }
        Ok(())
    }

    /// Claims and runs the owed events whose claim ran out; how many it ran.
    pub async fn sweep(&self) -> Result<usize, StoreError> {
        let mut ran = 0;
        for owed in self.store.unclaimed_events(Utc::now(), 100).await? {
            // Claimed as it starts: the runs before it may have taken a while.
            if self.store.claim_event(&owed, Utc::now() + CLAIM).await? {
                tracing::info!(
                    event = owed.event,
                    connection = owed.connection_id,
                    "running event functions another API did not finish"
                );
                self.run_owed(&owed).await;
                ran += 1;
            }
        }
        Ok(ran)
    }

    /// Runs the integration's event functions for `event` on the connection, one after
    /// the other; each outcome is logged. Returns how many ran and how many failed, or
    /// why they could not be loaded.
    pub async fn run(
        &self,
        environment: &Environment,
        integration: &IntegrationKey,
        connection_id: &str,
        event: &str,
    ) -> Result<(usize, usize), StoreError> {
        let functions = self.store.functions(environment.id).await?;
        let mut outcome = (0, 0);
        for function in functions
            .into_iter()
            .filter(|f| &f.integration == integration && f.config["onEvent"] == true && f.config["event"] == event)
        {
            outcome.0 += 1;
            let started = std::time::Instant::now();
            match self.run_one(&function, connection_id).await {
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
        Ok(outcome)
    }

    async fn run_one(
        &self,
        function: &hookyard_core::store::functions::DeployedSync,
        connection_id: &str,
    ) -> Result<Vec<String>, String> {
        match self.runner.run(&self.pool, function, connection_id, Call::Event).await {
            Ok(effects) => Ok(effects.logs.into_iter().map(|l| l.message).collect()),
            Err(RunError::Store(error)) => Err(error.to_string()),
            Err(RunError::Setup(error)) => Err(error),
            Err(RunError::Function(error)) => Err(error.to_string()),
        }
    }
}

/// Runs [`Events::sweep`] now and every [`SWEEP_EVERY`] until `shutdown`.
pub async fn sweep_loop(events: Arc<Events>, shutdown: CancellationToken) {
    loop {
        match events.sweep().await {
            Ok(0) => {}
            Ok(ran) => tracing::info!(ran, "owed event functions run"),
            Err(error) => tracing::warn!(%error, "looking for owed event functions failed; trying again later"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(SWEEP_EVERY) => {}
        }
    }
}
