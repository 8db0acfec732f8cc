//! The outbox of sync notifications. A notice is written in the transaction that commits
//! its run's record changes (see [`Store::commit`]), so a worker that dies, or loses NATS,
//! before queueing its notifications does not lose them: the worker that committed
//! queues them and deletes the notice at once, and a worker's sweep queues those left
//! behind.

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

impl Store {
    /// Writes `notices` on their own (an exec run's, whose writes were made as it ran).
    pub async fn add_notices(&self, notices: &[SyncNotice]) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        insert_notices(&mut tx, notices, Utc::now()).await?;
        tx.commit().await
    }

    /// Up to `limit` notices written before `before`, oldest first: those their worker
    /// did not get to queue. One that cannot be read comes back as its key and why.
    pub async fn notices_before(
        &self,
        before: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<Result<SyncNotice, UnreadableNotice>>, StoreError> {
        let rows: Vec<(String, String)> = on_pool!(self, |pool| sqlx::query_as(
            "SELECT key, notice FROM sync_notices WHERE created_at < $1 ORDER BY created_at LIMIT $2"
        )
        .bind(before)
        .bind(limit)
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
