//! Event functions owed a run. A connection's `post-connection-creation` is written with
//! the connection ([`Store::create_connection_owing`]), claimed by the API that created
//! it, and deleted once its functions ran. One whose claim ran out (that API stopped or
//! died mid-run) is claimed and run by an API's sweep: at least once, never lost.

use chrono::{DateTime, Utc};

use super::{Pool, Store, StoreError};
use crate::keys::{EnvironmentName, IntegrationKey};

/// The event owed to every connection created through the API.
pub const POST_CREATION: &str = "post-connection-creation";

/// One connection event whose functions are still to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwedEvent {
    pub environment: EnvironmentName,
    pub integration: IntegrationKey,
    pub connection_id: String,
    pub event: String,
}

const KEY: &str = "environment = $1 AND integration = $2 AND connection_id = $3 AND event = $4";

/// Binds an [`OwedEvent`]'s key as `$1`…`$4` (see [`KEY`]).
macro_rules! bind_key {
    ($query:expr, $owed:expr) => {
        $query
            .bind($owed.environment.as_str())
            .bind($owed.integration.as_str())
            .bind(&$owed.connection_id)
            .bind(&$owed.event)
    };
}

impl Store {
    /// Up to `limit` owed events whose claim ran out before `now`.
    pub async fn unclaimed_events(&self, now: DateTime<Utc>, limit: i64) -> Result<Vec<OwedEvent>, StoreError> {
        let rows: Vec<(String, String, String, String)> = on_pool!(self, |pool| sqlx::query_as(
            "SELECT environment, integration, connection_id, event FROM connection_events
             WHERE claimed_until < $1 ORDER BY claimed_until LIMIT $2"
        )
        .bind(now)
        .bind(limit)
        .fetch_all(pool)
        .await)?;
        rows.into_iter()
            .map(|(environment, integration, connection_id, event)| {
                let corrupt = |e: crate::keys::InvalidKey| StoreError::Corrupt(format!("owed connection event: {e}"));
                Ok(OwedEvent {
                    environment: environment.parse().map_err(corrupt)?,
                    integration: integration.parse().map_err(corrupt)?,
                    connection_id,
                    event,
                })
            })
            .collect()
    }

    /// Claims `owed` until `until`, if its claim ran out; false when another has it (or
    /// it is done).
    pub async fn claim_event(&self, owed: &OwedEvent, until: DateTime<Utc>) -> Result<bool, StoreError> {
        let update = format!("UPDATE connection_events SET claimed_until = $5 WHERE {KEY} AND claimed_until < $6");
        let claimed = on_pool!(self, |pool| bind_key!(sqlx::query(&update), owed)
            .bind(until)
            .bind(Utc::now())
            .execute(pool)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(claimed == 1)
    }

    /// `owed` has run: it is no longer owed.
    pub async fn settle_event(&self, owed: &OwedEvent) -> Result<(), StoreError> {
        let delete = format!("DELETE FROM connection_events WHERE {KEY}");
        on_pool!(self, |pool| bind_key!(sqlx::query(&delete), owed)
            .execute(pool)
            .await
            .map(|_| ()))?;
        Ok(())
    }
}

/// The statement that writes an owed event, claimed until `$5` (in the connection's
/// transaction). A connection id used again gets its event again.
pub(crate) const OWE: &str =
    "INSERT INTO connection_events (environment, integration, connection_id, event, claimed_until)
     VALUES ($1, $2, $3, $4, $5)
     ON CONFLICT (environment, integration, connection_id, event) DO UPDATE SET claimed_until = excluded.claimed_until";

pub(crate) use bind_key;
