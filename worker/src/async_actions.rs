//! Asynchronous actions (`X-Async: true`): the API queues them in the store
//! ([`hookyard_core::store::action_runs`]); every worker claims due runs, as many as its
//! action threads have room for (`api.action_concurrent_runs`), for a lease (the
//! action's timeout and a minute), runs them on those threads and writes the outcome. A
//! failed run is tried again while `X-Max-Retries` allows, after
//! `api.async_retry_delay`, doubled each time.
//!
//! When a run ends, Nango's completion webhook (`type: "async_action"`, with the run's id
//! and status URL) goes to the connection's forwarding destinations through `HOOKS_FWD`.
//! A run whose webhook its worker did not queue (it died, NATS was away) is sent by the
//! sweep, as sync notices are.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use chrono::Utc;
use hookyard_core::store::action_runs::{ActionFailure, ActionOutcome, ActionRun};
use hookyard_core::store::{chrono_duration, StoreError};
use hookyard_core::Store;
use hookyard_functions::provider_api::Owner;
use hookyard_functions::rate_limit;
use hookyard_functions::runs::{action_failure, Actions, Origin, TriggerError};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::settings::Settings;
use crate::WorkerError;

/// How often a worker looks for due runs (and after each run it ends).
const POLL: Duration = Duration::from_millis(500);
/// The longest wait before a retry.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(300);
/// Finished runs whose webhooks are sent per pass of the sweep.
const SWEEP_BATCH: usize = 200;
/// How often a worker counts the runs waiting and running, for its metrics.
const COUNT_EVERY: Duration = Duration::from_secs(5);

pub struct AsyncActions {
    store: Store,
    actions: Arc<Actions>,
    settings: Arc<Settings>,
    jetstream: jetstream::Context,
    lease: Duration,
    retry_delay: Duration,
    results_kept: Duration,
    resend_after: Duration,
}

/// What became of one attempt.
#[derive(Debug, PartialEq)]
enum Next {
    Finish(ActionOutcome),
    /// Failed; retried after the delay.
    Retry(ActionFailure),
    /// Not run (the database or the threads were not there for it): again after the
    /// delay, not counted as an attempt.
    Again,
}

impl AsyncActions {
    pub fn new(
        store: Store,
        actions: Arc<Actions>,
        settings: Arc<Settings>,
        jetstream: jetstream::Context,
        config: &hookyard_core::Config,
    ) -> AsyncActions {
        AsyncActions {
            store,
            actions,
            settings,
            jetstream,
            lease: config.api.action_limits.timeout + Duration::from_secs(60),
            retry_delay: config.api.async_retry_delay,
            results_kept: config.api.async_results_kept,
            resend_after: config.forwarding.notices_resend_after,
        }
    }

    /// Claims and runs due runs until `shutdown`, then lets the ones under way end.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        // Runs taken at once: as many as the action threads have in progress.
        let free = Arc::new(Semaphore::new(self.actions.concurrent_runs()));
        let mut running = JoinSet::new();
        let mut swept = tokio::time::Instant::now();
        let mut counted: Option<tokio::time::Instant> = None;
        // While the store is away, said once (not twice a second), and when it is back.
        let mut unclaimable = false;
        loop {
            let room = free.available_permits();
            if room > 0 {
                match self.store.claim_action_runs(Utc::now(), self.lease, room).await {
                    Ok(claimed) => {
                        if std::mem::take(&mut unclaimable) {
                            tracing::info!("asynchronous actions can be claimed again");
                        }
                        for run in claimed {
                            let permit = free.clone().try_acquire_owned().expect("claimed no more than free");
                            let this = self.clone();
                            running.spawn(async move {
                                this.attempt(run).await;
                                drop(permit);
                            });
                        }
                    }
                    Err(error) if !unclaimable => {
                        unclaimable = true;
                        tracing::warn!(%error, "asynchronous actions cannot be claimed; trying again every {POLL:?} (said once)");
                    }
                    Err(_) => {}
                }
            }
            if counted.is_none_or(|at| at.elapsed() >= COUNT_EVERY) {
                counted = Some(tokio::time::Instant::now());
                self.count().await;
            }
            if swept.elapsed() >= self.resend_after / 2 {
                swept = tokio::time::Instant::now();
                self.sweep().await;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(POLL) => {}
                Some(_) = running.join_next() => {}
            }
        }
        if !running.is_empty() {
            tracing::info!(
                runs = running.len(),
                "waiting for the asynchronous actions under way to end"
            );
        }
        while running.join_next().await.is_some() {}
    }

    /// Sets the gauges of runs waiting (due, not taken) and running. With the database
    /// away they keep their last figures (the claim says it is away).
    async fn count(&self) {
        use hookyard_core::metrics::names;
        if let Ok((waiting, running)) = self.store.action_runs_in_flight(Utc::now()).await {
            metrics::gauge!(names::ASYNC_ACTIONS_WAITING).set(waiting as f64);
            metrics::gauge!(names::ASYNC_ACTIONS_RUNNING).set(running as f64);
        }
    }

    /// Runs one claimed attempt and writes what became of it.
    async fn attempt(&self, run: ActionRun) {
        let outcome = if run.attempts > run.request.max_retries + 1 {
            // Its last attempt's worker died mid-run: no retry remains.
            Next::Finish(ActionOutcome::Failed(ActionFailure {
                code: "action_script_failure".into(),
                message: "the run's worker stopped before it ended, and no retries remain".into(),
                payload: None,
            }))
        } else {
            let triggered = self
                .actions
                .trigger(
                    run.request.environment_id,
                    &run.request.integration,
                    &run.request.connection_id,
                    &run.request.action_name,
                    &run.request.input,
                    Origin::Async {
                        run_id: &run.id,
                        attempt: run.attempts,
                    },
                )
                .await;
            next(triggered, run.attempts, run.request.max_retries)
        };
        let now = Utc::now();
        let written = match &outcome {
            Next::Finish(outcome) => self.store.finish_action_run(&run.id, run.attempts, outcome, now).await,
            Next::Retry(failure) => {
                // Not before the provider's rate limit on the connection ends.
                let owner = Owner {
                    environment_id: run.request.environment_id,
                    integration: run.request.integration.clone(),
                    connection_id: run.request.connection_id.clone(),
                };
                let wait = rate_limit::not_before(&owner, retry_delay(self.retry_delay, run.attempts));
                let after = now + chrono_duration(wait);
                self.store
                    .defer_action_run(&run.id, run.attempts, Some(failure), after)
                    .await
            }
            Next::Again => {
                let after = now + chrono_duration(self.retry_delay);
                self.store.defer_action_run(&run.id, run.attempts, None, after).await
            }
        };
        match written {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(id = %run.id, attempt = run.attempts, "asynchronous action outlived its lease: another attempt took it; this one's outcome is dropped");
                return;
            }
            Err(error) => {
                // The lease lapses and the run is claimed again (one attempt more).
                tracing::warn!(id = %run.id, %error, "an asynchronous action's outcome could not be written");
                return;
            }
        }
        match &outcome {
            Next::Finish(ActionOutcome::Succeeded(_)) => {
                tracing::info!(id = %run.id, action = %run.request.action_name, connection = %run.request.connection_id, attempt = run.attempts, "asynchronous action succeeded");
            }
            Next::Finish(ActionOutcome::Failed(failure)) => {
                tracing::warn!(id = %run.id, action = %run.request.action_name, connection = %run.request.connection_id, attempt = run.attempts, code = %failure.code, message = %failure.message, "asynchronous action failed");
            }
            Next::Retry(failure) => {
                tracing::info!(id = %run.id, action = %run.request.action_name, attempt = run.attempts, code = %failure.code, message = %failure.message, "asynchronous action failed; it will be retried");
                return;
            }
            Next::Again => return,
        }
        if let Err(error) = self.notify(std::slice::from_ref(&run)).await {
            tracing::warn!(id = %run.id, %error, "the completion webhook could not be queued now; the sweep will");
        }
    }

    /// Queues the completion webhooks of finished `runs` and marks them sent.
    async fn notify(&self, runs: &[ActionRun]) -> Result<(), WorkerError> {
        let mut deliveries = Vec::new();
        for run in runs {
            let request = &run.request;
            let connection = (
                &request.environment,
                &request.integration,
                request.connection_id.as_str(),
            );
            let key = format!("async_action:{}", run.id);
            deliveries.extend(
                crate::forward::announcement(
                    &self.settings,
                    connection,
                    ("async_action", &key),
                    &completion_body(run),
                    |targets| targets.async_action_webhooks,
                )
                .await?,
            );
        }
        crate::forward::publish_deliveries(&self.jetstream, deliveries).await?;
        let ids: Vec<String> = runs.iter().map(|run| run.id.clone()).collect();
        self.store.action_runs_notified(&ids).await?;
        Ok(())
    }

    /// Sends the webhooks runs finished more than `forwarding.notices_resend_after` ago
    /// still owe, and forgets runs finished longer ago than `api.async_results_kept`.
    async fn sweep(&self) {
        let swept: Result<usize, WorkerError> = async {
            let before = Utc::now() - chrono_duration(self.resend_after);
            let mut sent = 0;
            loop {
                let owed = self.store.unnotified_action_runs(before, SWEEP_BATCH).await?;
                self.notify(&owed).await?;
                sent += owed.len();
                if owed.len() < SWEEP_BATCH {
                    return Ok(sent);
                }
            }
        }
        .await;
        match swept {
            Ok(0) => {}
            Ok(sent) => tracing::info!(
                sent,
                "completion webhooks of asynchronous actions left by a worker queued"
            ),
            Err(error) => tracing::warn!(%error, "queueing left-behind completion webhooks failed; trying again later"),
        }
        let kept_since = Utc::now() - chrono_duration(self.results_kept);
        match self.store.prune_action_runs(kept_since).await {
            Ok(0) => {}
            Ok(pruned) => tracing::debug!(pruned, "old asynchronous action outcomes forgotten"),
            Err(error) => tracing::warn!(%error, "old asynchronous action outcomes could not be pruned"),
        }
    }
}

/// What to do after attempt `attempt` (1 for the first) of a run that may be retried
/// `max_retries` times ended with `triggered`.
fn next(triggered: Result<Option<serde_json::Value>, TriggerError>, attempt: u32, max_retries: u32) -> Next {
    let failure = match triggered {
        Ok(output) => return Next::Finish(ActionOutcome::Succeeded(output)),
        Err(TriggerError::Function(error)) => action_failure(&error).1,
        // Undeployed, or the connection deleted, since it was queued: no retry helps.
        Err(TriggerError::UnknownAction(message)) => not_found(message),
        Err(TriggerError::Store(StoreError::NotFound(what))) => not_found(format!("{what} does not exist")),
        // The database or the threads were not there for it: it waits, uncounted.
        Err(error) if is_passing(&error) => {
            tracing::warn!(%error, "an asynchronous action could not be run now; it waits");
            return Next::Again;
        }
        // Its bundle does not load (or its run broke): an attempt, as the synchronous
        // call's 500 is, so that a run that can never start ends.
        Err(error) => ActionFailure {
            code: "internal".into(),
            message: error.to_string(),
            payload: None,
        },
    };
    // Its input will be refused again.
    let final_failure = failure.code == "invalid_action_input" || failure.code == "not_found";
    if attempt <= max_retries && !final_failure {
        Next::Retry(failure)
    } else {
        Next::Finish(ActionOutcome::Failed(failure))
    }
}

/// Whether what stopped a run will pass by itself: every thread busy, the database away.
fn is_passing(error: &TriggerError) -> bool {
    match error {
        TriggerError::Busy => true,
        TriggerError::Store(error) => error.is_unavailable(),
        _ => false,
    }
}

fn not_found(message: String) -> ActionFailure {
    ActionFailure {
        code: "not_found".into(),
        message,
        payload: None,
    }
}

/// The wait before the retry after attempt `attempt`: `first`, doubled for each attempt
/// since, at most [`MAX_RETRY_DELAY`].
fn retry_delay(first: Duration, attempt: u32) -> Duration {
    first
        .saturating_mul(1 << attempt.saturating_sub(1).min(16))
        .min(MAX_RETRY_DELAY)
}

/// Nango's `async_action` webhook body.
fn completion_body(run: &ActionRun) -> Vec<u8> {
    let body = serde_json::json!({
        "from": "hookyard",
        "type": "async_action",
        "connectionId": run.request.connection_id,
        "providerConfigKey": run.request.integration,
        "payload": {"id": run.id, "statusUrl": format!("/action/{}", run.id)},
    });
    serde_json::to_vec(&body).expect("JSON serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_wait_longer_each_time_up_to_a_bound() {
        let first = Duration::from_secs(5);
        assert_eq!(retry_delay(first, 1), first);
        assert_eq!(retry_delay(first, 2), Duration::from_secs(10));
        assert_eq!(retry_delay(first, 3), Duration::from_secs(20));
        assert_eq!(retry_delay(first, 40), MAX_RETRY_DELAY);
    }

    #[test]
    fn a_failure_is_retried_while_retries_remain_unless_retrying_cannot_help() {
        let unknown = || Err(TriggerError::UnknownAction("gone".into()));
        assert_eq!(next(Ok(None), 1, 0), Next::Finish(ActionOutcome::Succeeded(None)));
        assert!(matches!(next(unknown(), 1, 5), Next::Finish(ActionOutcome::Failed(f)) if f.code == "not_found"));
        assert_eq!(next(Err(TriggerError::Busy), 3, 0), Next::Again);
        let away = || Err(TriggerError::Store(StoreError::Database(sqlx::Error::PoolTimedOut)));
        assert_eq!(next(away(), 3, 0), Next::Again);
        // A bundle that does not load is an attempt: retried while retries remain, then the end.
        let broken = || {
            Err(TriggerError::Setup(
                "the action could not be run: bundle b no longer compiles".into(),
            ))
        };
        assert!(matches!(next(broken(), 1, 1), Next::Retry(f) if f.code == "internal"));
        assert!(
            matches!(next(broken(), 2, 1), Next::Finish(ActionOutcome::Failed(f)) if f.message.contains("no longer compiles"))
        );
        let sealed = Err(TriggerError::Store(StoreError::Corrupt("credentials".into())));
        assert!(matches!(next(sealed, 1, 0), Next::Finish(ActionOutcome::Failed(f)) if f.code == "internal"));
        let gone = Err(TriggerError::Store(StoreError::NotFound("connection c".into())));
        assert!(
            matches!(next(gone, 1, 5), Next::Finish(ActionOutcome::Failed(f)) if f.message == "connection c does not exist")
        );
    }
}
