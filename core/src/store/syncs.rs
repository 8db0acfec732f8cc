//! Scheduled exec runs per (sync, connection): whether the sync is started or paused, the
//! schedule slots handed out, the run in progress (a lease, so two never overlap), the
//! last run's outcome, and the sync's checkpoint.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::types::Json;

use super::{Pool, Store, StoreError};
use crate::keys::IntegrationKey;

/// One sync for one connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SyncKey {
    pub environment_id: i64,
    pub integration: IntegrationKey,
    pub sync: String,
    pub connection_id: String,
}

impl SyncKey {
    /// The records of `model` this sync keeps for this connection.
    pub fn scope(&self, model: &str) -> super::records::RecordScope {
        super::records::RecordScope {
            environment_id: self.environment_id,
            integration: self.integration.clone(),
            connection_id: self.connection_id.clone(),
            model: model.to_string(),
        }
    }
}

/// What `GET /sync/status` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SyncStatus {
    Running,
    Success,
    Error,
    Paused,
    /// Not started: `autoStart: false` and no `POST /sync/start` yet.
    Stopped,
    /// Started, and its first run has not finished yet.
    Pending,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SyncState {
    pub key: SyncKey,
    pub started: bool,
    pub paused: bool,
    pub last_slot: i64,
    pub next_run_at: Option<DateTime<Utc>>,
    pub running: bool,
    pub last_started_at: Option<DateTime<Utc>>,
    pub last_ended_at: Option<DateTime<Utc>>,
    pub last_outcome: Option<String>,
    pub last_result: Option<Value>,
    pub last_error: Option<String>,
    pub pending_trigger: Option<Trigger>,
}

impl SyncState {
    pub fn status(&self) -> SyncStatus {
        match (self.running, self.paused, self.started, self.last_outcome.as_deref()) {
            (true, ..) => SyncStatus::Running,
            (_, true, ..) => SyncStatus::Paused,
            (_, _, false, _) => SyncStatus::Stopped,
            (.., Some("ERROR")) => SyncStatus::Error,
            (.., Some(_)) => SyncStatus::Success,
            (.., None) => SyncStatus::Pending,
        }
    }
}

/// A run asked for through the API, waiting for the reconciler to queue it.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Trigger {
    /// Names this request: the job's message id carries it.
    pub token: String,
    #[serde(default)]
    pub reset: bool,
    #[serde(default, rename = "emptyCache")]
    pub empty_cache: bool,
}

impl Trigger {
    /// A new request, with a token of its own.
    pub fn new(reset: bool, empty_cache: bool) -> Trigger {
        Trigger {
            token: hex::encode(crate::secrets::random_bytes::<8>()),
            reset,
            empty_cache,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum RunOutcome {
    /// Its counts per model.
    Success(Value),
    Error(String),
}

type StateRow = (
    i64,
    String,
    String,
    String,
    bool,
    bool,
    i64,
    Option<DateTime<Utc>>,
    Option<i64>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
);

const STATE_COLUMNS: &str = "environment_id, integration, sync_name, connection_id, started, paused, last_slot, \
     next_run_at, running_until, last_started_at, last_ended_at, last_outcome, last_result, last_error, pending_trigger";

const KEY_MATCH: &str = "environment_id = $1 AND integration = $2 AND sync_name = $3 AND connection_id = $4";

fn state_of(row: StateRow, now_ms: i64) -> Result<SyncState, StoreError> {
    let (environment_id, integration, sync, connection_id, started, paused, last_slot, next_run_at, until, ..) = row;
    let (.., last_started_at, last_ended_at, last_outcome, last_result, last_error, trigger) = row;
    Ok(SyncState {
        key: SyncKey {
            environment_id,
            integration: integration
                .parse()
                .map_err(|e| StoreError::Corrupt(format!("sync state integration {integration:?}: {e}")))?,
            sync,
            connection_id,
        },
        started,
        paused,
        last_slot,
        next_run_at,
        running: until.is_some_and(|until| until > now_ms),
        last_started_at,
        last_ended_at,
        last_outcome,
        last_result: last_result.and_then(|text| serde_json::from_str(&text).ok()),
        last_error,
        pending_trigger: trigger.and_then(|text| serde_json::from_str(&text).ok()),
    })
}

/// Keys (with more values) per statement, as one JSON parameter.
const BULK: usize = 1000;

/// A [`SyncKey`] as the columns of a JSON row.
#[derive(Serialize)]
struct KeyColumns<'a> {
    environment_id: i64,
    integration: &'a str,
    sync_name: &'a str,
    connection_id: &'a str,
}

impl<'a> KeyColumns<'a> {
    fn of(key: &'a SyncKey) -> KeyColumns<'a> {
        KeyColumns {
            environment_id: key.environment_id,
            integration: key.integration.as_str(),
            sync_name: &key.sync,
            connection_id: &key.connection_id,
        }
    }
}

/// `$query` with a [`SyncKey`] bound as `$1..$4`.
macro_rules! bind_key {
    ($query:expr, $key:expr) => {
        $query
            .bind($key.environment_id)
            .bind($key.integration.as_str())
            .bind(&$key.sync)
            .bind(&$key.connection_id)
    };
}

impl Store {
    /// Every sync state, or one environment's (optionally one integration's).
    pub async fn sync_states(
        &self,
        environment_id: Option<i64>,
        integration: Option<&IntegrationKey>,
    ) -> Result<Vec<SyncState>, StoreError> {
        let sql = format!(
            "SELECT {STATE_COLUMNS} FROM sync_states
             WHERE ($1 IS NULL OR environment_id = $1) AND ($2 IS NULL OR integration = $2)
             ORDER BY environment_id, integration, sync_name, connection_id"
        );
        let rows: Vec<StateRow> = on_pool!(self, |pool| sqlx::query_as(&sql)
            .bind(environment_id)
            .bind(integration.map(IntegrationKey::as_str))
            .fetch_all(pool)
            .await)?;
        let now = now_ms();
        rows.into_iter().map(|row| state_of(row, now)).collect()
    }

    /// What a tick between the reconciler's full passes looks at: the states that are
    /// started, not paused, due by `now` (or never scheduled) and of a live connection;
    /// then those with a trigger waiting. (Two queries, so that each can use its index.)
    pub async fn due_sync_states(&self, now: DateTime<Utc>) -> Result<(Vec<SyncState>, Vec<SyncState>), StoreError> {
        let due = format!(
            "SELECT {STATE_COLUMNS} FROM sync_states s
             WHERE (next_run_at <= $1 OR next_run_at IS NULL) AND started AND NOT paused
               AND EXISTS (SELECT 1 FROM connections c JOIN integrations i ON i.id = c.integration_id
                           WHERE c.environment_id = s.environment_id AND i.unique_key = s.integration
                             AND c.connection_id = s.connection_id AND c.deleted_at IS NULL)"
        );
        let triggered = format!("SELECT {STATE_COLUMNS} FROM sync_states WHERE pending_trigger IS NOT NULL");
        let due: Vec<StateRow> = on_pool!(self, |pool| sqlx::query_as(&due).bind(now).fetch_all(pool).await)?;
        let triggered: Vec<StateRow> = on_pool!(self, |pool| sqlx::query_as(&triggered).fetch_all(pool).await)?;
        let now = now_ms();
        let states = |rows: Vec<StateRow>| -> Result<Vec<SyncState>, StoreError> {
            rows.into_iter().map(|row| state_of(row, now)).collect()
        };
        Ok((states(due)?, states(triggered)?))
    }

    /// Moves a due state's next run to `until`: one no frequency schedules (its sync has
    /// none now, or is gone) is then not looked at by every tick. (A full pass schedules
    /// by slot, whatever this says.)
    pub async fn defer_sync_state(
        &self,
        key: &SyncKey,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let sql = format!(
            "UPDATE sync_states SET next_run_at = $5 WHERE {KEY_MATCH} AND (next_run_at IS NULL OR next_run_at <= $6)"
        );
        on_pool!(self, |pool| bind_key!(sqlx::query(&sql), key)
            .bind(until)
            .bind(now)
            .execute(pool)
            .await
            .map(|_| ()))?;
        Ok(())
    }

    /// One sync state.
    pub async fn sync_state(&self, key: &SyncKey) -> Result<Option<SyncState>, StoreError> {
        let sql = format!("SELECT {STATE_COLUMNS} FROM sync_states WHERE {KEY_MATCH}");
        let row: Option<StateRow> = on_pool!(self, |pool| bind_key!(sqlx::query_as(&sql), key)
            .fetch_optional(pool)
            .await)?;
        row.map(|row| state_of(row, now_ms())).transpose()
    }

    /// Makes the states that do not exist yet, started or not (a sync's `autoStart`).
    /// One statement per [`BULK`] keys, in key order (as another replica would).
    pub async fn ensure_sync_states(&self, keys: &[(SyncKey, bool)]) -> Result<(), StoreError> {
        #[derive(Serialize)]
        struct Row<'a> {
            #[serde(flatten)]
            key: KeyColumns<'a>,
            started: bool,
        }
        let insert = match self.pool {
            Pool::Postgres(_) => {
                "INSERT INTO sync_states (environment_id, integration, sync_name, connection_id, started)
                 SELECT k.environment_id, k.integration, k.sync_name, k.connection_id, k.started
                 FROM jsonb_to_recordset($1::jsonb)
                   AS k(environment_id bigint, integration text, sync_name text, connection_id text, started boolean)
                 ON CONFLICT (environment_id, integration, sync_name, connection_id) DO NOTHING"
            }
            Pool::Sqlite(_) => {
                "INSERT INTO sync_states (environment_id, integration, sync_name, connection_id, started)
                 SELECT k.value ->> '$.environment_id', k.value ->> '$.integration', k.value ->> '$.sync_name',
                        k.value ->> '$.connection_id', k.value ->> '$.started'
                 FROM json_each($1) AS k WHERE true
                 ON CONFLICT (environment_id, integration, sync_name, connection_id) DO NOTHING"
            }
        };
        let mut sorted: Vec<&(SyncKey, bool)> = keys.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        let mut tx = self.begin().await?;
        for chunk in sorted.chunks(BULK) {
            let rows: Vec<Row> = chunk
                .iter()
                .map(|(key, started)| Row {
                    key: KeyColumns::of(key),
                    started: *started,
                })
                .collect();
            super::tx::on_tx!(&mut tx, |conn| sqlx::query(insert)
                .bind(Json(&rows))
                .execute(&mut *conn)
                .await
                .map(|_| ()))?;
        }
        tx.commit().await
    }

    /// Pauses (`paused`) or starts the syncs of `keys`, making their states if need be.
    pub async fn set_syncs_paused(&self, keys: &[SyncKey], paused: bool) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        for key in keys {
            super::tx::on_tx!(&mut tx, |conn| bind_key!(
                sqlx::query(
                    "INSERT INTO sync_states (environment_id, integration, sync_name, connection_id, started, paused)
                     VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (environment_id, integration, sync_name, connection_id)
                     DO UPDATE SET paused = $6, started = (sync_states.started OR $5)",
                ),
                key
            )
            .bind(!paused)
            .bind(paused)
            .execute(&mut *conn)
            .await
            .map(|_| ()))?;
        }
        tx.commit().await
    }

    /// Asks for a run of each of `keys` (made if need be, started or not as given: a
    /// trigger does not start a schedule), queued by the reconciler.
    pub async fn request_trigger(&self, keys: &[(SyncKey, bool)], trigger: &Trigger) -> Result<(), StoreError> {
        let text = serde_json::to_string(trigger).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut tx = self.begin().await?;
        for (key, started) in keys {
            super::tx::on_tx!(&mut tx, |conn| {
                bind_key!(
                sqlx::query(
                    "INSERT INTO sync_states (environment_id, integration, sync_name, connection_id, started, pending_trigger)
                     VALUES ($1, $2, $3, $4, $6, $5)
                     ON CONFLICT (environment_id, integration, sync_name, connection_id)
                     DO UPDATE SET pending_trigger = $5",
                ),
                key
            )
            .bind(&text)
            .bind(*started)
            .execute(&mut *conn)
            .await
            .map(|_| ())
            })?;
        }
        tx.commit().await
    }

    /// Forgets a trigger once it is queued (unless a newer one replaced it meanwhile);
    /// true for the one caller that did.
    pub async fn clear_trigger(&self, key: &SyncKey, token: &str) -> Result<bool, StoreError> {
        let rows: Vec<(Option<String>,)> = {
            let sql = format!("SELECT pending_trigger FROM sync_states WHERE {KEY_MATCH}");
            on_pool!(self, |pool| bind_key!(sqlx::query_as(&sql), key).fetch_all(pool).await)?
        };
        let Some(text) = rows.into_iter().next().and_then(|(text,)| text) else {
            return Ok(false);
        };
        let still_ours = serde_json::from_str::<Trigger>(&text).is_ok_and(|t| t.token == token);
        if still_ours {
            let sql =
                format!("UPDATE sync_states SET pending_trigger = NULL WHERE {KEY_MATCH} AND pending_trigger = $5");
            let cleared = on_pool!(self, |pool| bind_key!(sqlx::query(&sql), key)
                .bind(&text)
                .execute(pool)
                .await
                .map(|r| r.rows_affected()))?;
            return Ok(cleared == 1);
        }
        Ok(false)
    }

    /// Hands out schedule slots: each `(key, slot, next slot's start)` of a started,
    /// unpaused sync is claimed by the one caller (of any replica) that moves `last_slot`
    /// on to it. One transaction for all, two statements per [`BULK`] slots; whether
    /// each was claimed now.
    pub async fn claim_slots(&self, slots: &[(SyncKey, i64, DateTime<Utc>)]) -> Result<Vec<bool>, StoreError> {
        #[derive(Serialize)]
        struct Row<'a> {
            #[serde(flatten)]
            key: KeyColumns<'a>,
            slot: i64,
            /// [`super::json_timestamp`].
            next_run_at: String,
        }
        const WANTED: &str = "jsonb_to_recordset($1::jsonb) AS w(environment_id bigint, integration text, \
             sync_name text, connection_id text, slot bigint, next_run_at timestamptz)";
        const MATCH: &str = "s.environment_id = w.environment_id AND s.integration = w.integration \
             AND s.sync_name = w.sync_name AND s.connection_id = w.connection_id";
        let (lock, claim) = match self.pool {
            // Rows are locked in key order first: two replicas claiming at once never
            // deadlock.
            Pool::Postgres(_) => (
                Some(format!(
                    "SELECT 1 FROM sync_states s JOIN {WANTED} ON {MATCH}
                     ORDER BY s.environment_id, s.integration, s.sync_name, s.connection_id FOR UPDATE OF s"
                )),
                format!(
                    "UPDATE sync_states s SET last_slot = w.slot, next_run_at = w.next_run_at FROM {WANTED}
                     WHERE {MATCH} AND s.last_slot < w.slot AND s.started AND NOT s.paused
                     RETURNING s.environment_id, s.integration, s.sync_name, s.connection_id"
                ),
            ),
            // One writer at a time: nothing to order. (RETURNING names only the updated
            // table's columns, unqualified.)
            Pool::Sqlite(_) => (
                None,
                format!(
                    "UPDATE sync_states AS s SET last_slot = w.slot, next_run_at = w.next_run_at
                     FROM (SELECT k.value ->> '$.environment_id' AS environment_id,
                                  k.value ->> '$.integration' AS integration,
                                  k.value ->> '$.sync_name' AS sync_name,
                                  k.value ->> '$.connection_id' AS connection_id,
                                  k.value ->> '$.slot' AS slot,
                                  k.value ->> '$.next_run_at' AS next_run_at
                           FROM json_each($1) AS k) AS w
                     WHERE {MATCH} AND s.last_slot < w.slot AND s.started AND NOT s.paused
                     RETURNING environment_id, integration, sync_name, connection_id"
                ),
            ),
        };
        let mut claimed_keys: std::collections::HashSet<(i64, String, String, String)> = Default::default();
        let mut tx = self.begin().await?;
        for chunk in slots.chunks(BULK) {
            let rows: Vec<Row> = chunk
                .iter()
                .map(|(key, slot, next_run_at)| Row {
                    key: KeyColumns::of(key),
                    slot: *slot,
                    next_run_at: super::json_timestamp(next_run_at),
                })
                .collect();
            if let Some(lock) = &lock {
                super::tx::on_tx!(&mut tx, |conn| sqlx::query(lock)
                    .bind(Json(&rows))
                    .execute(&mut *conn)
                    .await
                    .map(|_| ()))?;
            }
            let claimed: Vec<(i64, String, String, String)> =
                super::tx::on_tx!(&mut tx, |conn| sqlx::query_as(&claim)
                    .bind(Json(&rows))
                    .fetch_all(&mut *conn)
                    .await)?;
            claimed_keys.extend(claimed);
        }
        tx.commit().await?;
        Ok(slots
            .iter()
            .map(|(key, ..)| {
                let row = (
                    key.environment_id,
                    key.integration.to_string(),
                    key.sync.clone(),
                    key.connection_id.clone(),
                );
                claimed_keys.contains(&row)
            })
            .collect())
    }

    /// Takes the run lease: false while another run of this sync and connection lives.
    pub async fn claim_run(&self, key: &SyncKey, run_id: &str, lease: std::time::Duration) -> Result<bool, StoreError> {
        let now = now_ms();
        let sql = format!(
            "UPDATE sync_states SET run_id = $5, running_until = $6, last_started_at = $7
             WHERE {KEY_MATCH} AND (running_until IS NULL OR running_until < $8)"
        );
        let done = on_pool!(self, |pool| bind_key!(sqlx::query(&sql), key)
            .bind(run_id)
            .bind(now + lease.as_millis() as i64)
            .bind(Utc::now())
            .bind(now)
            .execute(pool)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(done == 1)
    }

    /// Keeps the lease of a run that is still going.
    pub async fn extend_run(&self, key: &SyncKey, run_id: &str, lease: std::time::Duration) -> Result<(), StoreError> {
        let sql = format!("UPDATE sync_states SET running_until = $6 WHERE {KEY_MATCH} AND run_id = $5");
        on_pool!(self, |pool| bind_key!(sqlx::query(&sql), key)
            .bind(run_id)
            .bind(now_ms() + lease.as_millis() as i64)
            .execute(pool)
            .await
            .map(|_| ()))?;
        Ok(())
    }

    /// Ends a run: its lease is given back and its outcome kept.
    pub async fn finish_run(&self, key: &SyncKey, run_id: &str, outcome: &RunOutcome) -> Result<(), StoreError> {
        let (label, result, error) = match outcome {
            RunOutcome::Success(counts) => ("SUCCESS", Some(counts.to_string()), None),
            RunOutcome::Error(message) => ("ERROR", None, Some(message.as_str())),
        };
        // A success is when the sync last caught up: its start, not its end, so that
        // what changed while it ran is asked for again.
        let sql = format!(
            "UPDATE sync_states SET run_id = NULL, running_until = NULL, last_ended_at = $6,
                    last_outcome = $7, last_result = COALESCE($8, last_result), last_error = $9,
                    last_success_started_at = CASE WHEN $7 = 'SUCCESS' THEN last_started_at
                                                   ELSE last_success_started_at END
             WHERE {KEY_MATCH} AND run_id = $5"
        );
        on_pool!(self, |pool| bind_key!(sqlx::query(&sql), key)
            .bind(run_id)
            .bind(Utc::now())
            .bind(label)
            .bind(result.as_deref())
            .bind(error)
            .execute(pool)
            .await
            .map(|_| ()))?;
        Ok(())
    }

    /// When the last successful run started (`nango.lastSyncDate`); none before the first
    /// or after a reset.
    pub async fn last_sync_date(&self, key: &SyncKey) -> Result<Option<DateTime<Utc>>, StoreError> {
        let sql = format!("SELECT last_success_started_at FROM sync_states WHERE {KEY_MATCH}");
        let row: Option<(Option<DateTime<Utc>>,)> = on_pool!(self, |pool| bind_key!(sqlx::query_as(&sql), key)
            .fetch_optional(pool)
            .await)?;
        Ok(row.and_then(|(at,)| at))
    }

    /// A reset trigger's start from nothing: no checkpoint and no last sync date.
    pub async fn reset_sync_progress(&self, key: &SyncKey) -> Result<(), StoreError> {
        let sql = format!("UPDATE sync_states SET checkpoint = NULL, last_success_started_at = NULL WHERE {KEY_MATCH}");
        on_pool!(self, |pool| bind_key!(sqlx::query(&sql), key)
            .execute(pool)
            .await
            .map(|_| ()))?;
        Ok(())
    }

    /// The sync's checkpoint for the connection (`nango.getCheckpoint`).
    pub async fn checkpoint(&self, key: &SyncKey) -> Result<Option<Value>, StoreError> {
        let sql = format!("SELECT checkpoint FROM sync_states WHERE {KEY_MATCH}");
        let row: Option<(Option<String>,)> = on_pool!(self, |pool| bind_key!(sqlx::query_as(&sql), key)
            .fetch_optional(pool)
            .await)?;
        Ok(row
            .and_then(|(text,)| text)
            .and_then(|text| serde_json::from_str(&text).ok()))
    }

    /// Saves (or, with `None`, clears) the checkpoint.
    pub async fn set_checkpoint(&self, key: &SyncKey, checkpoint: Option<&Value>) -> Result<(), StoreError> {
        let sql = format!("UPDATE sync_states SET checkpoint = $5 WHERE {KEY_MATCH}");
        on_pool!(self, |pool| bind_key!(sqlx::query(&sql), key)
            .bind(checkpoint.map(Value::to_string))
            .execute(pool)
            .await
            .map(|_| ()))?;
        Ok(())
    }
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}
