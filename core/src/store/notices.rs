//! The outbox of sync notifications. A notice is written in the transaction that commits
//! its run's record changes (see [`Store::commit`]), so a worker that dies, or loses NATS,
//! before queueing its notifications does not lose them: the worker that committed
//! queues them and deletes the notice at once, and a worker's sweep queues those left
//! behind.
//!
//! An exec run commits as it goes, so its notice is kept up to date by each of its
//! writes ([`HeldNotice`]) and held from the sweep while the run lives. A run that dies
//! leaves a notice of what it wrote, which the sweep sends once the hold lapses, under
//! an identity of its own ([`SyncNotice::notification_key`]).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::types::Json;

use super::records::WriteCounts;
use super::tx::{on_tx, Tx};
use super::{Pool, Store, StoreError};
use crate::keys::{EnvironmentName, IntegrationKey};

/// A committed run whose changes are to be notified: one notification per model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncNotice {
    pub environment: EnvironmentName,
    pub integration: IntegrationKey,
    pub connection: String,
    pub sync: String,
    /// The model of each record call, in call order.
    pub models: Vec<String>,
    /// The event's message id (or the exec run's id): with the sync and model, the
    /// notification's identity.
    pub message_id: String,
    /// Nango's `syncType`: `WEBHOOK` for onWebhook, `INITIAL` / `INCREMENTAL` for exec.
    pub sync_type: String,
    /// Records changed after this are the run's (`modifiedAfter`).
    pub modified_after: DateTime<Utc>,
    /// What each record call did, in call order; filled in by the commit.
    pub counts: Vec<WriteCounts>,
    /// Why the run did not succeed, when its writes are notified all the same (an exec
    /// run that failed or died after writing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The error of a held notice that the sweep sends: its run never settled it.
pub const UNFINISHED: &str = "the run did not finish: its worker stopped before the end";

/// A running exec run's notice: each write adds its counts to the stored copy in the
/// write's transaction, and holds it from the sweep for `hold` (the run's lease; the
/// run's heartbeat extends it with [`Store::hold_notice`]).
#[derive(Debug, Clone)]
pub struct HeldNotice {
    /// The run's notice before any write (no models; `error` says [`UNFINISHED`]).
    pub notice: SyncNotice,
    pub hold: std::time::Duration,
}

/// A stored notice that does not parse (written by another version, or edited by hand).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnreadableNotice {
    pub key: String,
    pub error: String,
}

impl SyncNotice {
    /// One notice per (message, sync): a run is committed once.
    pub fn key(&self) -> String {
        format!("{}:{}", self.message_id, self.sync)
    }

    /// The identity of `model`'s notification: one per (message, sync, model). The
    /// sweep's notification of an unfinished run has its own, so that the run's final one,
    /// should the run be alive after all (its heartbeat could not reach the database for
    /// a whole lease), is not taken for a duplicate of it.
    pub fn notification_key(&self, model: &str) -> String {
        let unfinished = if self.error.as_deref() == Some(UNFINISHED) {
            ":unfinished"
        } else {
            ""
        };
        format!("{}:{model}:sync{unfinished}", self.key())
    }

    /// Adds `counts` to `model`'s entry (one entry per model, however many writes).
    pub fn add(&mut self, model: &str, counts: &WriteCounts) {
        match self.models.iter().position(|m| m == model) {
            Some(i) => self.counts[i] = self.counts[i].plus(counts),
            None => {
                self.models.push(model.to_string());
                self.counts.push(*counts);
            }
        }
    }
}

/// Writes `notices` in `tx`; one already there (same key) is left as it is.
pub(crate) async fn insert_notices(tx: &mut Tx, notices: &[SyncNotice], now: DateTime<Utc>) -> Result<(), StoreError> {
    if notices.is_empty() {
        return Ok(());
    }
    #[derive(Serialize)]
    struct Row {
        key: String,
        notice: String,
    }
    let rows = notices
        .iter()
        .map(|notice| {
            Ok(Row {
                key: notice.key(),
                notice: serde_json::to_string(notice)?,
            })
        })
        .collect::<Result<Vec<Row>, serde_json::Error>>()
        .map_err(|e| StoreError::Invalid(format!("sync notice: {e}")))?;
    let insert = match tx {
        Tx::Postgres(_) => {
            "INSERT INTO sync_notices (key, notice, created_at)
             SELECT n.key, n.notice, $2 FROM jsonb_to_recordset($1::jsonb) AS n(key text, notice text)
             ON CONFLICT DO NOTHING"
        }
        Tx::Sqlite(_) => {
            "INSERT INTO sync_notices (key, notice, created_at)
             SELECT n.value ->> '$.key', n.value ->> '$.notice', $2 FROM json_each($1) AS n WHERE true
             ON CONFLICT DO NOTHING"
        }
    };
    on_tx!(tx, |conn| sqlx::query(insert)
        .bind(Json(&rows))
        .bind(now)
        .execute(&mut *conn)
        .await
        .map(|_| ()))?;
    Ok(())
}

/// Adds one write's `counts` for `model` to `held`'s stored notice, in the write's `tx`.
pub(crate) async fn add_to_held(
    tx: &mut Tx,
    held: &HeldNotice,
    model: &str,
    counts: &WriteCounts,
) -> Result<(), StoreError> {
    let key = held.notice.key();
    let stored: Option<(String,)> = on_tx!(tx, |conn| sqlx::query_as(
        "SELECT notice FROM sync_notices WHERE key = $1"
    )
    .bind(&key)
    .fetch_optional(&mut *conn)
    .await)?;
    let mut notice = match stored {
        Some((text,)) => {
            serde_json::from_str(&text).map_err(|e| StoreError::Invalid(format!("stored sync notice {key}: {e}")))?
        }
        None => held.notice.clone(),
    };
    notice.add(model, counts);
    let held_until = Utc::now() + held.hold;
    put_notice(tx, &notice, Some(held_until)).await
}

/// Writes `notice` whole, over the stored one of its key if any, held until `held_until`.
async fn put_notice(tx: &mut Tx, notice: &SyncNotice, held_until: Option<DateTime<Utc>>) -> Result<(), StoreError> {
    let text = serde_json::to_string(notice).map_err(|e| StoreError::Invalid(format!("sync notice: {e}")))?;
    on_tx!(tx, |conn| sqlx::query(
        "INSERT INTO sync_notices (key, notice, created_at, held_until) VALUES ($1, $2, $3, $4)
         ON CONFLICT (key) DO UPDATE
         SET notice = excluded.notice, created_at = excluded.created_at, held_until = excluded.held_until"
    )
    .bind(notice.key())
    .bind(text)
    .bind(Utc::now())
    .bind(held_until)
    .execute(&mut *conn)
    .await
    .map(|_| ()))?;
    Ok(())
}

impl Store {
    /// Writes a finished exec run's `notice` (its writes were committed as it ran), over
    /// the copy its writes kept: no longer held, it is the sweep's after the usual wait.
    pub async fn settle_notice(&self, notice: &SyncNotice) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        put_notice(&mut tx, notice, None).await?;
        tx.commit().await
    }

    /// Keeps the notice of `key`, if its run wrote one yet, from the sweep until `until`.
    pub async fn hold_notice(&self, key: &str, until: DateTime<Utc>) -> Result<(), StoreError> {
        on_pool!(self, |pool| sqlx::query(
            "UPDATE sync_notices SET held_until = $2 WHERE key = $1 AND held_until IS NOT NULL"
        )
        .bind(key)
        .bind(until)
        .execute(pool)
        .await
        .map(|_| ()))?;
        Ok(())
    }

    /// Up to `limit` notices written before `before` and not held, oldest first: those
    /// their worker did not get to queue. One that cannot be read comes back as its key
    /// and why.
    pub async fn notices_before(
        &self,
        before: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<Result<SyncNotice, UnreadableNotice>>, StoreError> {
        let rows: Vec<(String, String)> = on_pool!(self, |pool| sqlx::query_as(
            "SELECT key, notice FROM sync_notices
             WHERE created_at < $1 AND (held_until IS NULL OR held_until < $3)
             ORDER BY created_at LIMIT $2"
        )
        .bind(before)
        .bind(limit)
        .bind(Utc::now())
        .fetch_all(pool)
        .await)?;
        Ok(rows
            .into_iter()
            .map(|(key, notice)| {
                serde_json::from_str(&notice).map_err(|e| UnreadableNotice {
                    key,
                    error: e.to_string(),
                })
            })
            .collect())
    }

    /// Deletes the notices of `keys` (queued now).
    pub async fn delete_notices(&self, keys: &[String]) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        let delete = match self.pool {
            Pool::Postgres(_) => "DELETE FROM sync_notices WHERE key IN (SELECT jsonb_array_elements_text($1::jsonb))",
            Pool::Sqlite(_) => "DELETE FROM sync_notices WHERE key IN (SELECT value FROM json_each($1))",
        };
        on_pool!(self, |pool| sqlx::query(delete)
            .bind(Json(keys))
            .execute(pool)
            .await
            .map(|_| ()))?;
        Ok(())
    }
}
