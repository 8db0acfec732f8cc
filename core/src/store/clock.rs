//! The raw clock as the store has seen it. Record versions, the operation log and the
//! functions' idempotency markers all carry `HOOKS_RAW` sequences, so a `HOOKS_RAW`
//! created again (a NATS server that lost its store, a stream deleted by hand) must
//! start past them: from 1, a new webhook's writes would be older than what they
//! update and be ignored, and its events would meet the markers of old ones.

use super::{Pool, Store, StoreError};

impl Store {
    /// The highest `HOOKS_RAW` sequence the store refers to; 0 for none. Scans the
    /// records: for a stream's creation, not for a hot path.
    pub async fn raw_sequence_seen(&self) -> Result<u64, StoreError> {
        // An exec run's version is `last_seq × 2^16 + 0xFFFF`, a webhook's
        // `raw_seq × 2^16 + index`: either way the sequence is the version's high bits.
        // Markers of onWebhook functions are `{raw_seq}:{index}:{connection}`.
        let query = match self.pool {
            Pool::Postgres(_) => {
                "SELECT GREATEST(
                     (SELECT COALESCE(MAX(version), 0) >> 16 FROM records),
                     (SELECT COALESCE(MAX(raw_seq), 0) FROM webhook_log),
                     (SELECT COALESCE(MAX(raw_seq), 0) FROM webhook_log_steps),
                     (SELECT COALESCE(MAX(split_part(message_id, ':', 1)::bigint), 0) FROM processed_messages
                      WHERE consumer LIKE 'onWebhook:%' AND message_id ~ '^[0-9]{1,18}:'))"
            }
            Pool::Sqlite(_) => {
                "SELECT MAX(
                     (SELECT COALESCE(MAX(version), 0) >> 16 FROM records),
                     (SELECT COALESCE(MAX(raw_seq), 0) FROM webhook_log),
                     (SELECT COALESCE(MAX(raw_seq), 0) FROM webhook_log_steps),
                     (SELECT COALESCE(MAX(CAST(substr(message_id, 1, instr(message_id, ':') - 1) AS INTEGER)), 0)
                      FROM processed_messages WHERE consumer LIKE 'onWebhook:%' AND message_id GLOB '[0-9]*:*'))"
            }
        };
        let (seen,): (i64,) = on_pool!(self, |pool| sqlx::query_as(query).fetch_one(pool).await)?;
        Ok(seen.max(0) as u64)
    }

    /// The highest `HOOKS_RAW` sequence of a webhook in the operation log (the router
    /// logs each one it routes) or of a record write (each scope keeps its highest
    /// version); 0 for none. One index lookup and a scan of the scopes, not of the
    /// records: cheap enough for every start, to tell a `HOOKS_RAW` that is behind the
    /// store, also once the log is pruned.
    pub async fn raw_sequence_recorded(&self) -> Result<u64, StoreError> {
        // The same query but for the dialect's two-argument maximum.
        macro_rules! recorded {
            ($greatest:literal) => {
                concat!(
                    "SELECT ",
                    $greatest,
                    "((SELECT COALESCE(MAX(raw_seq), 0) FROM webhook_log),
                      (SELECT COALESCE(MAX(max_version), 0) >> 16 FROM record_scopes))"
                )
            };
        }
        let query = match self.pool {
            Pool::Postgres(_) => recorded!("GREATEST"),
            Pool::Sqlite(_) => recorded!("MAX"),
        };
        let (recorded,): (i64,) = on_pool!(self, |pool| sqlx::query_as(query).fetch_one(pool).await)?;
        Ok(recorded.max(0) as u64)
    }
}
