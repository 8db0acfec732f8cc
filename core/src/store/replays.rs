//! Replays of `HOOKS_RAW`: asked for through the API, run by a router that holds a lease
//! on the row while it works and writes its progress there (so the API can show it, a
//! cancel reaches the router at its next progress write, and a replay whose router died
//! is resumed by another from where it got to).

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{chrono_duration, Pool, Store, StoreError};
use crate::routed::ReplayTarget;

/// What to replay.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NewReplay {
    pub environment: String,
    pub integration: Option<String>,
    /// Only the events routed to this connection (needs `integration`).
    pub connection_id: Option<String>,
    pub since: DateTime<Utc>,
    pub until: DateTime<Utc>,
    pub target: ReplayTarget,
    /// Count what would be replayed; publish nothing.
    pub dry_run: bool,
    /// Events published per second at most.
    pub rate: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplayStatus {
    Queued,
    Running,
    Done,
    Cancelled,
    Failed,
}

impl ReplayStatus {
    fn as_str(self) -> &'static str {
        match self {
            ReplayStatus::Queued => "queued",
            ReplayStatus::Running => "running",
            ReplayStatus::Done => "done",
            ReplayStatus::Cancelled => "cancelled",
            ReplayStatus::Failed => "failed",
        }
    }

    fn parse(text: &str) -> ReplayStatus {
        match text {
            "queued" => ReplayStatus::Queued,
            "running" => ReplayStatus::Running,
            "done" => ReplayStatus::Done,
            "cancelled" => ReplayStatus::Cancelled,
            _ => ReplayStatus::Failed,
        }
    }

    pub fn finished(self) -> bool {
        matches!(
            self,
            ReplayStatus::Done | ReplayStatus::Cancelled | ReplayStatus::Failed
        )
    }
}

/// How far a replay got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ReplayProgress {
    /// Webhooks in the window (known once the replay started).
    pub total: Option<i64>,
    /// Webhooks read from `HOOKS_RAW` so far.
    pub read: i64,
    /// Events published again (or, in a dry run, that would be).
    pub published: i64,
    /// Events left out (another connection than the one asked for).
    pub skipped: i64,
    /// Held back: the workers have more than `router.replay_max_backlog` events waiting.
    pub waiting: bool,
    /// The `HOOKS_RAW` sequence to go on from, and the last one in the window.
    pub next_seq: Option<i64>,
    pub end_seq: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Replay {
    pub id: i64,
    #[serde(flatten)]
    pub request: NewReplay,
    pub status: ReplayStatus,
    #[serde(flatten)]
    pub progress: ReplayProgress,
    pub error: Option<String>,
    pub cancel_requested: bool,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
struct ReplayRow {
    id: i64,
    environment: String,
    integration: Option<String>,
    connection_id: Option<String>,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
    target: String,
    dry_run: bool,
    rate: Option<i32>,
    status: String,
    total: Option<i64>,
    read: i64,
    published: i64,
    skipped: i64,
    waiting: bool,
    next_seq: Option<i64>,
    end_seq: Option<i64>,
    error: Option<String>,
    cancel_requested: bool,
    created_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
}

impl From<ReplayRow> for Replay {
    fn from(row: ReplayRow) -> Replay {
        Replay {
            id: row.id,
            request: NewReplay {
                environment: row.environment,
                integration: row.integration,
                connection_id: row.connection_id,
                since: row.since,
                until: row.until,
                target: row.target.parse().unwrap_or(ReplayTarget::All),
                dry_run: row.dry_run,
                rate: row.rate.map(|r| r as u32),
            },
            status: ReplayStatus::parse(&row.status),
            progress: ReplayProgress {
                total: row.total,
                read: row.read,
                published: row.published,
                skipped: row.skipped,
                waiting: row.waiting,
                next_seq: row.next_seq,
                end_seq: row.end_seq,
            },
            error: row.error,
            cancel_requested: row.cancel_requested,
            created_at: row.created_at,
            started_at: row.started_at,
            finished_at: row.finished_at,
        }
    }
}

const COLUMNS: &str = "id, environment, integration, connection_id, since, until, target, dry_run, rate, status,
    total, read, published, skipped, waiting, next_seq, end_seq, error, cancel_requested, created_at, started_at, finished_at";

impl Store {
    pub async fn create_replay(&self, new: &NewReplay) -> Result<Replay, StoreError> {
        let sql = format!(
            "INSERT INTO replays (environment, integration, connection_id, since, until, target, dry_run, rate, status, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'queued', $9) RETURNING {COLUMNS}"
        );
        let row: ReplayRow = on_pool!(self, |pool| sqlx::query_as(&sql)
            .bind(&new.environment)
            .bind(&new.integration)
            .bind(&new.connection_id)
            .bind(new.since)
            .bind(new.until)
            .bind(new.target.as_str())
            .bind(new.dry_run)
            .bind(new.rate.map(|r| r as i32))
            .bind(Utc::now())
            .fetch_one(pool)
            .await)?;
        Ok(row.into())
    }

    /// The environment's replays, newest first.
    pub async fn replays(&self, environment: &str, limit: u32) -> Result<Vec<Replay>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM replays WHERE environment = $1 ORDER BY id DESC LIMIT $2");
        let rows: Vec<ReplayRow> = on_pool!(self, |pool| sqlx::query_as(&sql)
            .bind(environment)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await)?;
        Ok(rows.into_iter().map(Replay::from).collect())
    }

    pub async fn replay(&self, environment: &str, id: i64) -> Result<Replay, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM replays WHERE environment = $1 AND id = $2");
        let row: Option<ReplayRow> = on_pool!(self, |pool| sqlx::query_as(&sql)
            .bind(environment)
            .bind(id)
            .fetch_optional(pool)
            .await)?;
        row.map(Replay::from)
            .ok_or_else(|| StoreError::NotFound(format!("replay {id}")))
    }

    /// Asks a replay to stop: one not started yet is cancelled at once, a running one
    /// at its router's next progress write. A finished one is left as it is.
    pub async fn cancel_replay(&self, environment: &str, id: i64) -> Result<Replay, StoreError> {
        on_pool!(self, |pool| sqlx::query(
            "UPDATE replays SET cancel_requested = TRUE,
                    status = CASE status WHEN 'queued' THEN 'cancelled' ELSE status END,
                    finished_at = CASE status WHEN 'queued' THEN $3 ELSE finished_at END
             WHERE environment = $1 AND id = $2 AND status IN ('queued', 'running')"
        )
        .bind(environment)
        .bind(id)
        .bind(Utc::now())
        .execute(pool)
        .await
        .map(|_| ()))?;
        self.replay(environment, id).await
    }

    /// Takes the oldest replay that is queued, or running with a lapsed lease (its router
    /// died), for `lease`; `None` when there is none.
    pub async fn claim_replay(&self, lease: Duration) -> Result<Option<Replay>, StoreError> {
        let now = Utc::now();
        let sql = format!(
            "UPDATE replays SET status = 'running', lease_until = $2, started_at = COALESCE(started_at, $1)
             WHERE id = (SELECT id FROM replays
                         WHERE status = 'queued' OR (status = 'running' AND lease_until < $1)
                         ORDER BY id LIMIT 1)
               AND (status = 'queued' OR (status = 'running' AND lease_until < $1))
             RETURNING {COLUMNS}"
        );
        let row: Option<ReplayRow> = on_pool!(self, |pool| sqlx::query_as(&sql)
            .bind(now)
            .bind(now + chrono_duration(lease))
            .fetch_optional(pool)
            .await)?;
        Ok(row.map(Replay::from))
    }

    /// Writes a running replay's progress and extends its lease; whether a cancel was
    /// asked for since.
    pub async fn replay_progress(
        &self,
        id: i64,
        progress: &ReplayProgress,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let cancel: Option<bool> = on_pool!(self, |pool| sqlx::query_scalar(
            "UPDATE replays SET total = $2, read = $3, published = $4, skipped = $5, next_seq = $6, end_seq = $7,
                    lease_until = $8, waiting = $9
             WHERE id = $1 RETURNING cancel_requested"
        )
        .bind(id)
        .bind(progress.total)
        .bind(progress.read)
        .bind(progress.published)
        .bind(progress.skipped)
        .bind(progress.next_seq)
        .bind(progress.end_seq)
        .bind(Utc::now() + chrono_duration(lease))
        .bind(progress.waiting)
        .fetch_optional(pool)
        .await)?;
        // A replay deleted meanwhile stops too.
        Ok(cancel.unwrap_or(true))
    }

    /// Leaves a running replay, interrupted by `error`, for a router to take up again
    /// after `after`, from its last written progress.
    pub async fn retry_replay(&self, id: i64, error: &str, after: Duration) -> Result<(), StoreError> {
        on_pool!(self, |pool| sqlx::query(
            "UPDATE replays SET error = $2, lease_until = $3 WHERE id = $1 AND status = 'running'"
        )
        .bind(id)
        .bind(error)
        .bind(Utc::now() + chrono_duration(after))
        .execute(pool)
        .await
        .map(|_| ()))?;
        Ok(())
    }

    pub async fn finish_replay(
        &self,
        id: i64,
        progress: &ReplayProgress,
        status: ReplayStatus,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        self.replay_progress(id, progress, Duration::ZERO).await?;
        on_pool!(self, |pool| sqlx::query(
            "UPDATE replays SET status = $2, error = $3, finished_at = $4, lease_until = NULL WHERE id = $1"
        )
        .bind(id)
        .bind(status.as_str())
        .bind(error)
        .bind(Utc::now())
        .execute(pool)
        .await
        .map(|_| ()))?;
        Ok(())
    }
}
