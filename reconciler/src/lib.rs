//! The reconciler (`hookyard reconciler`, and inside `hookyard dev`): turns each deployed
//! sync's `frequency` into exec jobs on `HOOKS_EXEC`, one per connection and schedule
//! slot, and queues the runs asked for through `POST /sync/trigger`.
//!
//! Slots are spread: a (sync, connection)'s slots start at an offset within the interval
//! taken from a hash of its name, so "every hour" does not mean every connection at :00.
//! Several replicas may run. A job's message id names its slot, so JetStream stores the
//! copies two replicas queue at once only once; and the slot is then claimed in the
//! database, so a replica that starts later does not queue it again after the duplicate
//! window has passed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use chrono::{DateTime, TimeZone, Utc};
use hookyard_core::envelope::insert_checked;
use hookyard_core::exec_job::{ExecJob, ExecReason};
use hookyard_core::frequency::parse_frequency;
use hookyard_core::keys::{EnvironmentName, IntegrationKey};
use hookyard_core::store::functions::DeployedSync;
use hookyard_core::store::syncs::{SyncKey, SyncState, Trigger};
use hookyard_core::store::StoreError;
use hookyard_core::streams::{exec_subject, Bus, StreamsError};
use hookyard_core::{Config, Store};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

/// How often the schedule is looked at: the lateness of a run at most.
pub const TICK: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ReconcilerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Streams(#[from] StreamsError),
    #[error("queueing an exec job: {0}")]
    Publish(String),
}

/// What one tick queued.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tick {
    pub scheduled: usize,
    pub triggered: usize,
}

/// Scheduled jobs whose publishes are in flight at once.
const QUEUE_CHUNK: usize = 256;
/// Scheduled jobs whose slots are claimed in one transaction, once all are queued: a
/// commit per [`QUEUE_CHUNK`] cost a first tick over many connections more than its
/// publishes did.
const CLAIM_GROUP: usize = 4096;

/// Ticks between full passes read only what is due; a full pass runs at least this often.
pub const FULL_PASS_EVERY: Duration = Duration::from_secs(60);

pub struct Reconciler {
    store: Store,
    jetstream: jetstream::Context,
    /// What the last full pass saw (the deploy revision and every integration's
    /// connections version), and when.
    last_full_pass: std::sync::Mutex<Option<(Changes, std::time::Instant)>>,
}

type Changes = (i64, Vec<(i64, i64)>);

/// The states a tick looks at, and the (sync, connection) pairs it schedules.
type Candidates<'a> = (HashMap<SyncKey, SyncState>, Vec<(&'a Runnable<'a>, SyncKey)>);

/// A sync that can run exec, with its interval when it has a frequency.
struct Runnable<'a> {
    sync: &'a DeployedSync,
    every: Option<Duration>,
    auto_start: bool,
}

impl Reconciler {
    pub fn new(store: Store, jetstream: jetstream::Context) -> Reconciler {
        Reconciler {
            store,
            jetstream,
            last_full_pass: std::sync::Mutex::new(None),
        }
    }

    /// Ticks every [`TICK`] until `shutdown`. A failed tick is logged and the next one
    /// tries again: a slot missed while the database or NATS was away runs when they are
    /// back (the current slot of each sync is queued then, not every missed one).
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        tracing::info!("reconciler scheduling exec runs");
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => {}
            }
            match self.tick(Utc::now()).await {
                Ok(tick) if tick != Tick::default() => {
                    tracing::debug!(
                        scheduled = tick.scheduled,
                        triggered = tick.triggered,
                        "exec jobs queued"
                    )
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "reconciler tick failed; trying again"),
            }
        }
        tracing::info!("reconciler stopped");
    }

    /// Queues what is due at `now`: slots that came round, and pending triggers.
    ///
    /// A full pass looks at every (sync, connection): it gives new pairs their state and
    /// schedules each by its slot. It runs on the first tick, after any deploy or any
    /// connection created or deleted, and every [`FULL_PASS_EVERY`]. The ticks between
    /// read only the states that are due or triggered, so an idle schedule costs little
    /// however many connections it has.
    pub async fn tick(&self, now: DateTime<Utc>) -> Result<Tick, ReconcilerError> {
        let deployed = self.store.all_functions().await?;
        let runnable: Vec<Runnable> = deployed
            .iter()
            .filter(|sync| sync.has_exec())
            .map(|sync| Runnable {
                sync,
                every: sync.config["frequency"]
                    .as_str()
                    .and_then(|text| parse_frequency(text).ok()),
                auto_start: sync.auto_start(),
            })
            .collect();
        let changes = (
            self.store.functions_revision().await?,
            self.store.connections_versions().await?,
        );
        let full = match &*self.last_full_pass.lock().expect("full pass lock") {
            Some((seen, at)) => *seen != changes || at.elapsed() >= FULL_PASS_EVERY,
            None => true,
        };
        let (states, scheduled_keys) = if full {
            self.everything(&runnable).await?
        } else {
            self.due(&runnable, now).await?
        };

        let mut tick = Tick::default();
        let mut due = Vec::new();
        for (runnable, key) in &scheduled_keys {
            let Some(state) = states.get(key) else { continue };
            if !state.started || state.paused {
                continue;
            }
            let every = runnable.every.expect("filtered above");
            let (slot, next_run_at) = slot_at(key, every, now);
            if slot <= state.last_slot {
                continue;
            }
            let job = ExecJob {
                environment: runnable.sync.environment.clone(),
                integration: key.integration.clone(),
                sync: key.sync.clone(),
                connection_id: key.connection_id.clone(),
                reason: ExecReason::Schedule,
                slot: Some(slot),
                reset: false,
                empty_cache: false,
            };
            due.push((job, (key.clone(), slot, next_run_at)));
        }
        // Queued first, claimed after: a crash in between queues the same message ids
        // again, which JetStream drops. A chunk's publishes are in flight together, and
        // a group of chunks shares the transaction of its claims (a deploy to many
        // connections queues them all).
        for group in due.chunks(CLAIM_GROUP) {
            for chunk in group.chunks(QUEUE_CHUNK) {
                let mut acks = Vec::with_capacity(chunk.len());
                for (job, _) in chunk {
                    acks.push(self.send(job, "").await?);
                }
                for ack in acks {
                    ack.await.map_err(|e| ReconcilerError::Publish(e.to_string()))?;
                }
            }
            let slots: Vec<_> = group.iter().map(|(_, slot)| slot.clone()).collect();
            tick.scheduled += self.store.claim_slots(&slots).await?.into_iter().filter(|c| *c).count();
        }

        // Triggers, for any sync with an exec (a frequency is not needed).
        let environments: HashMap<(i64, &IntegrationKey, &str), &EnvironmentName> = runnable
            .iter()
            .map(|r| {
                (
                    (r.sync.environment_id, &r.sync.integration, r.sync.name.as_str()),
                    &r.sync.environment,
                )
            })
            .collect();
        for state in states.values() {
            let Some(trigger) = &state.pending_trigger else {
                continue;
            };
            let key = &state.key;
            let Some(environment) = environments.get(&(key.environment_id, &key.integration, key.sync.as_str())) else {
                // The sync is gone (or has no exec): nothing to run.
                self.store.clear_trigger(key, &trigger.token).await?;
                continue;
            };
            let job = trigger_job(environment, key, trigger);
            self.publish(&job, &trigger.token).await?;
            if self.store.clear_trigger(key, &trigger.token).await? {
                tick.triggered += 1;
            }
        }
        if full {
            *self.last_full_pass.lock().expect("full pass lock") = Some((changes, std::time::Instant::now()));
        }
        Ok(tick)
    }

    /// Every (sync with a frequency, live connection), each given its state if new (as
    /// its sync's autoStart says), and every state.
    async fn everything<'a>(&self, runnable: &'a [Runnable<'a>]) -> Result<Candidates<'a>, ReconcilerError> {
        let mut states: HashMap<SyncKey, SyncState> = self
            .store
            .sync_states(None, None)
            .await?
            .into_iter()
            .map(|state| (state.key.clone(), state))
            .collect();
        let mut connections: HashMap<(i64, &IntegrationKey), Vec<String>> = HashMap::new();
        let mut missing = Vec::new();
        let mut scheduled_keys = Vec::new();
        for runnable in runnable.iter().filter(|r| r.every.is_some()) {
            let sync = runnable.sync;
            let ids = match connections.entry((sync.environment_id, &sync.integration)) {
                std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
                std::collections::hash_map::Entry::Vacant(entry) => entry.insert(
                    self.store
                        .live_connection_ids(sync.environment_id, &sync.integration)
                        .await?,
                ),
            };
            for connection_id in ids.iter() {
                let key = key_of(sync, connection_id);
                if !states.contains_key(&key) {
                    missing.push((key.clone(), runnable.auto_start));
                }
                scheduled_keys.push((runnable, key));
            }
        }
        if !missing.is_empty() {
            self.store.ensure_sync_states(&missing).await?;
            let fresh: HashSet<&SyncKey> = missing.iter().map(|(key, _)| key).collect();
            for state in self.store.sync_states(None, None).await? {
                if fresh.contains(&state.key) {
                    states.insert(state.key.clone(), state);
                }
            }
        }
        Ok((states, scheduled_keys))
    }

    /// The states due at `now` or triggered. A due one that no frequency schedules (its
    /// sync has none now, or is gone) is deferred until the next full pass would have
    /// looked at it anyway.
    async fn due<'a>(
        &self,
        runnable: &'a [Runnable<'a>],
        now: DateTime<Utc>,
    ) -> Result<Candidates<'a>, ReconcilerError> {
        let scheduling: HashMap<(i64, &IntegrationKey, &str), &Runnable> = runnable
            .iter()
            .filter(|r| r.every.is_some())
            .map(|r| ((r.sync.environment_id, &r.sync.integration, r.sync.name.as_str()), r))
            .collect();
        let (due, triggered) = self.store.due_sync_states(now).await?;
        let mut scheduled_keys = Vec::new();
        for state in &due {
            let key = &state.key;
            match scheduling.get(&(key.environment_id, &key.integration, key.sync.as_str())) {
                Some(runnable) => scheduled_keys.push((*runnable, key.clone())),
                None => {
                    let until = now + chrono::Duration::from_std(FULL_PASS_EVERY).expect("a short interval");
                    self.store.defer_sync_state(key, now, until).await?;
                }
            }
        }
        let states = due
            .into_iter()
            .chain(triggered)
            .map(|state| (state.key.clone(), state))
            .collect();
        Ok((states, scheduled_keys))
    }

    async fn publish(&self, job: &ExecJob, token: &str) -> Result<(), ReconcilerError> {
        self.send(job, token)
            .await?
            .await
            .map_err(|e| ReconcilerError::Publish(e.to_string()))?;
        Ok(())
    }

    /// Publishes `job`; the ack is to be awaited.
    async fn send(&self, job: &ExecJob, token: &str) -> Result<jetstream::context::PublishAckFuture, ReconcilerError> {
        let failed = |e: &dyn std::fmt::Display| ReconcilerError::Publish(e.to_string());
        let mut headers = async_nats::HeaderMap::new();
        insert_checked(&mut headers, "Nats-Msg-Id", &job.message_id(token));
        let payload = serde_json::to_vec(job).map_err(|e| failed(&e))?;
        self.jetstream
            .publish_with_headers(
                exec_subject(&job.environment, &job.integration, &job.connection_id),
                headers,
                payload.into(),
            )
            .await
            .map_err(|e| failed(&e))
    }
}

fn key_of(sync: &DeployedSync, connection_id: &str) -> SyncKey {
    SyncKey {
        environment_id: sync.environment_id,
        integration: sync.integration.clone(),
        sync: sync.name.clone(),
        connection_id: connection_id.to_string(),
    }
}

fn trigger_job(environment: &EnvironmentName, key: &SyncKey, trigger: &Trigger) -> ExecJob {
    ExecJob {
        environment: environment.clone(),
        integration: key.integration.clone(),
        sync: key.sync.clone(),
        connection_id: key.connection_id.clone(),
        reason: ExecReason::Trigger,
        slot: None,
        reset: trigger.reset,
        empty_cache: trigger.empty_cache,
    }
}

/// The slot `now` falls in for `key` every `every`, and when the next one starts. Slot
/// `n` starts at `offset + n × every`, the offset (under `every`) from a hash of the key.
pub fn slot_at(key: &SyncKey, every: Duration, now: DateTime<Utc>) -> (i64, DateTime<Utc>) {
    let every_ms = every.as_millis().max(1) as i64;
    let mut digest = Sha256::new();
    for part in [
        key.environment_id.to_string().as_str(),
        key.integration.as_str(),
        &key.sync,
        &key.connection_id,
    ] {
        digest.update((part.len() as u64).to_le_bytes());
        digest.update(part.as_bytes());
    }
    let hash = digest.finalize();
    let offset = (u64::from_le_bytes(hash[..8].try_into().expect("8 bytes")) % every_ms as u64) as i64;
    let slot = (now.timestamp_millis() - offset).div_euclid(every_ms);
    let next = Utc
        .timestamp_millis_opt(offset + (slot + 1) * every_ms)
        .single()
        .unwrap_or(now);
    (slot, next)
}

/// `hookyard reconciler`: connect and schedule until shutdown.
pub async fn run(config: &Config, shutdown: CancellationToken) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let store = Store::connect_with(&config.database_url, config.cipher()?, config.database_max_connections).await?;
    let bus = Bus::connect(config, "hookyard-reconciler").await?;
    if !bus.set_up_streams(&config.streams, &store, &shutdown).await? {
        return Ok(());
    }
    hookyard_core::metrics::install();
    hookyard_core::metrics::serve_configured(config, Some(bus.jetstream.clone()), &shutdown);
    Arc::new(Reconciler::new(store, bus.jetstream.clone()))
        .run(shutdown)
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(connection: &str) -> SyncKey {
        SyncKey {
            environment_id: 1,
            integration: "crm".parse().unwrap(),
            sync: "contacts".into(),
            connection_id: connection.into(),
        }
    }

    #[test]
    fn slots_are_spread_over_the_interval_and_follow_each_other() {
        let hour = Duration::from_secs(3600);
        let now = Utc.timestamp_millis_opt(1_800_000_000_000).unwrap();
        let offsets: HashSet<i64> = (0..50)
            .map(|n| {
                let (_, next) = slot_at(&key(&format!("c{n}")), hour, now);
                next.timestamp_millis() % 3_600_000
            })
            .collect();
        assert!(
            offsets.len() > 45,
            "connections start at different times: {}",
            offsets.len()
        );

        let (slot, next) = slot_at(&key("c1"), hour, now);
        let (same, _) = slot_at(&key("c1"), hour, next - chrono::Duration::milliseconds(1));
        let (after, after_next) = slot_at(&key("c1"), hour, next);
        assert_eq!(same, slot, "the slot lasts until the next one starts");
        assert_eq!(after, slot + 1);
        assert_eq!(after_next - next, chrono::Duration::hours(1));
    }
}
