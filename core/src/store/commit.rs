//! The worker's commit: the effects of many handled messages (record writes, metadata
//! writes, dead letters) with an idempotency marker for each, in one transaction. A
//! message whose marker is already there (a redelivery after a crash between commit and
//! ack, or another worker that got it too) has nothing applied again.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value};
use sqlx::types::Json;

use super::connections::write_metadata;
use super::dead_letters::insert_dead_letter;
pub use super::dead_letters::DeadLetter;
use super::notices::{insert_notices, SyncNotice};
use super::records::{RecordScope, WriteBatch, WriteCounts, WriteKind};
use super::tx::on_tx;
use super::{MetadataWrite, Pool, Store, StoreError};
use crate::keys::IntegrationKey;

/// "This consumer has committed the effects of this message."
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Marker {
    pub consumer: String,
    pub message_id: String,
}

/// One `batchSave` / `batchUpdate` / `batchDelete` call.
#[derive(Debug, Clone)]
pub struct RecordCall {
    pub scope: RecordScope,
    pub kind: WriteKind,
    pub records: Vec<(String, Value)>,
    pub version: i64,
}

/// One `setMetadata` / `updateMetadata` call.
#[derive(Debug, Clone)]
pub struct MetadataCall {
    pub environment_id: i64,
    pub integration: IntegrationKey,
    pub connection_id: String,
    pub metadata: Map<String, Value>,
    pub how: MetadataWrite,
}

/// What one message's handling committed.
#[derive(Debug, Clone)]
pub struct Unit {
    pub marker: Marker,
    pub records: Vec<RecordCall>,
    pub metadata: Vec<MetadataCall>,
    pub dead_letter: Option<DeadLetter>,
    /// Its run's sync notice, when its environment is told of changes: written with the
    /// changes (its counts filled in), as an outbox.
    pub notice: Option<SyncNotice>,
}

impl Unit {
    pub fn new(marker: Marker) -> Unit {
        Unit {
            marker,
            records: Vec::new(),
            metadata: Vec::new(),
            dead_letter: None,
            notice: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnitOutcome {
    /// Committed now: the record write counts of all its calls together, and of each,
    /// and its notice as written, to be queued.
    Applied {
        total: WriteCounts,
        per_call: Vec<WriteCounts>,
        notice: Option<Box<SyncNotice>>,
    },
    /// Its marker was there already: nothing was applied.
    AlreadyDone,
}

impl Store {
    /// Commits `units` in one transaction; each outcome is at its unit's index.
    pub async fn commit(&self, units: Vec<Unit>) -> Result<Vec<UnitOutcome>, StoreError> {
        if units.is_empty() {
            return Ok(Vec::new());
        }
        let mut markers: Vec<&Marker> = units.iter().map(|u| &u.marker).collect();
        // One order for every transaction: two commits never wait on each other in a cycle.
        markers.sort();
        markers.dedup();
        let insert = match self.pool {
            Pool::Postgres(_) => {
                "INSERT INTO processed_messages (consumer, message_id, processed_at)
                 SELECT m.consumer, m.message_id, $2 FROM jsonb_to_recordset($1::jsonb) AS m(consumer text, message_id text)
                 ON CONFLICT DO NOTHING RETURNING consumer, message_id"
            }
            Pool::Sqlite(_) => {
                "INSERT INTO processed_messages (consumer, message_id, processed_at)
                 SELECT m.value ->> '$.consumer', m.value ->> '$.message_id', $2 FROM json_each($1) AS m WHERE true
                 ON CONFLICT DO NOTHING RETURNING consumer, message_id"
            }
        };
        let now = Utc::now();
        let mut tx = self.begin().await?;
        let claimed: HashSet<(String, String)> = on_tx!(&mut tx, |conn| {
            sqlx::query_as::<_, (String, String)>(insert)
                .bind(Json(&markers))
                .bind(now)
                .fetch_all(&mut *conn)
                .await
        })?
        .into_iter()
        .collect();

        let mut batch = WriteBatch::default();
        let mut calls_of: Vec<Option<(Vec<usize>, Option<SyncNotice>)>> = Vec::with_capacity(units.len());
        let mut metadata: Vec<MetadataCall> = Vec::new();
        let mut seen = HashSet::new();
        for unit in units {
            let key = (unit.marker.consumer.clone(), unit.marker.message_id.clone());
            // A unit listed twice is applied once.
            if !claimed.contains(&key) || !seen.insert(key) {
                calls_of.push(None);
                continue;
            }
            let calls = unit
                .records
                .into_iter()
                .map(|call| batch.add(&call.scope, call.kind, call.records, call.version))
                .collect();
            calls_of.push(Some((calls, unit.notice)));
            metadata.extend(unit.metadata);
            if let Some(letter) = &unit.dead_letter {
                insert_dead_letter(&mut tx, letter, now).await?;
            }
        }
        let counts = self.apply_writes(&mut tx, batch).await?;
        let outcomes: Vec<UnitOutcome> = calls_of
            .into_iter()
            .map(|applied| match applied {
                None => UnitOutcome::AlreadyDone,
                Some((calls, notice)) => {
                    let per_call: Vec<WriteCounts> = calls.iter().map(|call| counts[*call]).collect();
                    UnitOutcome::Applied {
                        total: per_call.iter().fold(WriteCounts::default(), |sum, c| sum.plus(c)),
                        notice: notice.map(|notice| {
                            Box::new(SyncNotice {
                                counts: per_call.clone(),
                                ..notice
                            })
                        }),
                        per_call,
                    }
                }
            })
            .collect();
        let notices: Vec<SyncNotice> = outcomes
            .iter()
            .filter_map(|outcome| match outcome {
                UnitOutcome::Applied { notice, .. } => notice.as_deref().cloned(),
                UnitOutcome::AlreadyDone => None,
            })
            .collect();
        insert_notices(&mut tx, &notices, now).await?;
        metadata.sort_by(|a, b| {
            (a.environment_id, a.integration.as_str(), &a.connection_id).cmp(&(
                b.environment_id,
                b.integration.as_str(),
                &b.connection_id,
            ))
        });
        for call in metadata {
            let ids = [call.connection_id.clone()];
            match write_metadata(
                &mut tx,
                call.environment_id,
                &call.integration,
                &ids,
                &call.metadata,
                call.how,
            )
            .await
            {
                // The connection was deleted since: its metadata is gone with it.
                Err(StoreError::NotFound(what)) => tracing::info!("metadata write skipped: {what} no longer exists"),
                other => other?,
            }
        }
        tx.commit().await?;
        Ok(outcomes)
    }

    /// The markers among `markers` that are committed already.
    pub async fn processed(&self, markers: &[Marker]) -> Result<HashSet<Marker>, StoreError> {
        if markers.is_empty() {
            return Ok(HashSet::new());
        }
        let query = match self.pool {
            // One primary-key probe per marker (as records' `existing`): as a join, a plan
            // kept from when the table was small (a new database, not yet analyzed) goes
            // on hashing all of it for every group (8 ms at 50,000 markers, against 0.5).
            Pool::Postgres(_) => {
                "SELECT p.consumer, p.message_id FROM jsonb_to_recordset($1::jsonb) AS m(consumer text, message_id text)
                 CROSS JOIN LATERAL (
                     SELECT consumer, message_id FROM processed_messages p
                     WHERE p.consumer = m.consumer AND p.message_id = m.message_id LIMIT 1) AS p"
            }
            Pool::Sqlite(_) => {
                "SELECT p.consumer, p.message_id FROM json_each($1) AS m
                 JOIN processed_messages p ON p.consumer = m.value ->> '$.consumer' AND p.message_id = m.value ->> '$.message_id'"
            }
        };
        let rows: Vec<(String, String)> = on_pool!(self, |pool| sqlx::query_as(query)
            .bind(Json(markers))
            .fetch_all(pool)
            .await)?;
        Ok(rows
            .into_iter()
            .map(|(consumer, message_id)| Marker { consumer, message_id })
            .collect())
    }

    /// Drops markers older than `before` (their messages can no longer be redelivered).
    pub async fn prune_processed(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let done = on_pool!(self, |pool| sqlx::query(
            "DELETE FROM processed_messages WHERE processed_at < $1"
        )
        .bind(before)
        .execute(pool)
        .await
        .map(|r| r.rows_affected()))?;
        Ok(done)
    }
}
