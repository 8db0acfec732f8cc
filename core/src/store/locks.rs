//! Locks functions take (`nango.tryAcquireLock({key, ttlMs})`, Nango's): per environment
//! and key, one owner (a run) at a time until it releases the lock, its run ends (the
//! host releases what the run holds) or the lock's time runs out.

use chrono::{DateTime, Utc};

use super::{Pool, Store, StoreError};

impl Store {
    /// Takes `key` for `owner` until `now + ttl`: when nobody holds it, its holder's time
    /// ran out, or `owner` holds it already (its time is then extended). False when
    /// another owner holds it.
    pub async fn try_acquire_lock(
        &self,
        environment_id: i64,
        key: &str,
        owner: &str,
        now: DateTime<Utc>,
        ttl: std::time::Duration,
    ) -> Result<bool, StoreError> {
        let expires_at = now
            + chrono::Duration::from_std(ttl)
                .map_err(|_| StoreError::Invalid(format!("lock ttl {ttl:?} is too long")))?;
        let taken = on_pool!(self, |pool| sqlx::query(
            "INSERT INTO function_locks (environment_id, lock_key, owner, expires_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (environment_id, lock_key) DO UPDATE
             SET owner = excluded.owner, expires_at = excluded.expires_at
             WHERE function_locks.owner = excluded.owner OR function_locks.expires_at <= $5"
        )
        .bind(environment_id)
        .bind(key)
        .bind(owner)
        .bind(expires_at)
        .bind(now)
        .execute(pool)
        .await
        .map(|r| r.rows_affected()))?;
        Ok(taken == 1)
    }

    /// Lets go of `key` if `owner` holds it; whether it did.
    pub async fn release_lock(&self, environment_id: i64, key: &str, owner: &str) -> Result<bool, StoreError> {
        let released = on_pool!(self, |pool| sqlx::query(
            "DELETE FROM function_locks WHERE environment_id = $1 AND lock_key = $2 AND owner = $3"
        )
        .bind(environment_id)
        .bind(key)
        .bind(owner)
        .execute(pool)
        .await
        .map(|r| r.rows_affected()))?;
        Ok(released == 1)
    }

    /// Lets go of every lock `owner` holds, and of the environment's locks whose time ran
    /// out before `now` (nobody else clears them); how many of `owner`'s it released.
    pub async fn release_all_locks(
        &self,
        environment_id: i64,
        owner: &str,
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        let released = on_pool!(self, |pool| sqlx::query(
            "DELETE FROM function_locks WHERE environment_id = $1 AND owner = $2"
        )
        .bind(environment_id)
        .bind(owner)
        .execute(pool)
        .await
        .map(|r| r.rows_affected()))?;
        on_pool!(self, |pool| sqlx::query(
            "DELETE FROM function_locks WHERE environment_id = $1 AND expires_at < $2"
        )
        .bind(environment_id)
        .bind(now)
        .execute(pool)
        .await
        .map(|_| ()))?;
        Ok(released)
    }
}
