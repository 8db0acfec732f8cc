//! Asynchronous actions (`POST /action/trigger` with `X-Async: true`, Nango's): the API
//! queues a run here, a worker claims it for a lease, runs it and writes its outcome,
//! which `GET /action/{id}` answers. A run whose worker died is claimed again once its
//! lease lapses; every claim is an attempt, and a worker's writes are fenced by the
//! attempt it claimed, so one that comes back late changes nothing.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{chrono_duration, Pool, Store, StoreError};
use crate::keys::{EnvironmentName, IntegrationKey};

/// What to run.
#[derive(Debug, Clone, PartialEq)]
pub struct NewActionRun {
    pub environment_id: i64,
    pub environment: EnvironmentName,
    pub integration: IntegrationKey,
    pub connection_id: String,
    pub action_name: String,
    pub input: Value,
    /// Runs after a failed one, at most (`X-Max-Retries`).
    pub max_retries: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ActionRunStatus {
    /// Queued, or waiting to be retried.
    Waiting,
    Running,
    Succeeded,
    Failed,
}

impl ActionRunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ActionRunStatus::Waiting => "waiting",
            ActionRunStatus::Running => "running",
            ActionRunStatus::Succeeded => "succeeded",
            ActionRunStatus::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Result<ActionRunStatus, StoreError> {
        Ok(match text {
            "waiting" => ActionRunStatus::Waiting,
            "running" => ActionRunStatus::Running,
            "succeeded" => ActionRunStatus::Succeeded,
            "failed" => ActionRunStatus::Failed,
            other => return Err(StoreError::Corrupt(format!("action run status {other:?}"))),
        })
    }
}

/// Why a run failed, as `POST /action/trigger` would have answered it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionFailure {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
}

/// How a claimed run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum ActionOutcome {
    /// What it returned (`None`: nothing).
    Succeeded(Option<Value>),
    Failed(ActionFailure),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ActionRun {
    pub id: String,
    /// What was asked for.
    pub request: NewActionRun,
    /// Claims so far: the one running now included.
    pub attempts: u32,
    pub status: ActionRunStatus,
    /// When a waiting run may start; when a running one's lease ends.
    pub run_after: DateTime<Utc>,
    pub output: Option<Value>,
    /// Why it failed; while it waits for a retry, why the last attempt did.
    pub error: Option<ActionFailure>,
    /// Its completion webhook is queued (or nothing forwards).
    pub notified: bool,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// Which of an environment's runs [`Store::action_runs`] lists (all when empty).
#[derive(Debug, Clone, Default)]
pub struct ActionRunFilter {
    pub status: Option<ActionRunStatus>,
    pub integration: Option<String>,
    pub connection_id: Option<String>,
    pub action_name: Option<String>,
    /// Only runs queued before this one (a page's last), newest first.
    pub before_id: Option<String>,
}

#[derive(sqlx::FromRow)]
struct ActionRunRow {
    id: String,
    environment_id: i64,
    environment: String,
    integration: String,
    connection_id: String,
    action_name: String,
    input: String,
    max_retries: i32,
    attempts: i32,
    status: String,
    run_after: DateTime<Utc>,
    output: Option<String>,
    error: Option<String>,
    notified: bool,
    created_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
}

const COLUMNS: &str = "id, environment_id, environment, integration, connection_id, action_name, input, max_retries,
    attempts, status, run_after, output, error, notified, created_at, finished_at";

/// Claimable: waiting and due, or running with a lapsed lease.
const DUE: &str = "status IN ('waiting', 'running') AND run_after <= $1";

impl TryFrom<ActionRunRow> for ActionRun {
    type Error = StoreError;

    fn try_from(row: ActionRunRow) -> Result<ActionRun, StoreError> {
        let id = &row.id;
        let corrupt =
            |what: &str, e: &dyn std::fmt::Display| StoreError::Corrupt(format!("action run {id}: {what}: {e}"));
        fn json<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, serde_json::Error> {
            serde_json::from_str(text)
        }
        Ok(ActionRun {
            request: NewActionRun {
                environment_id: row.environment_id,
                environment: row.environment.parse().map_err(|e| corrupt("environment", &e))?,
                integration: row.integration.parse().map_err(|e| corrupt("integration", &e))?,
                connection_id: row.connection_id,
                action_name: row.action_name,
                input: json(&row.input).map_err(|e| corrupt("input", &e))?,
                max_retries: row.max_retries.max(0) as u32,
            },
            output: row
                .output
                .as_deref()
                .map(json)
                .transpose()
                .map_err(|e| corrupt("output", &e))?,
            error: row
                .error
                .as_deref()
                .map(json)
                .transpose()
                .map_err(|e| corrupt("error", &e))?,
            status: ActionRunStatus::parse(&row.status)?,
            attempts: row.attempts.max(0) as u32,
            id: row.id,
            run_after: row.run_after,
            notified: row.notified,
            created_at: row.created_at,
            finished_at: row.finished_at,
        })
    }
}

fn runs(rows: Vec<ActionRunRow>) -> Result<Vec<ActionRun>, StoreError> {
    rows.into_iter().map(ActionRun::try_from).collect()
}

fn to_text(value: &impl Serialize) -> String {
    serde_json::to_string(value).expect("JSON serialises")
}

impl Store {
    /// Queues a run, to start at once; it is given its id.
    pub async fn queue_action_run(&self, new: &NewActionRun, now: DateTime<Utc>) -> Result<ActionRun, StoreError> {
        let sql = format!(
            "INSERT INTO action_runs (id, environment_id, environment, integration, connection_id, action_name, input,
                                      max_retries, status, run_after, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'waiting', $9, $9) RETURNING {COLUMNS}"
        );
        let row: ActionRunRow = on_pool!(self, |pool| sqlx::query_as(&sql)
            .bind(uuid::Uuid::new_v4().to_string())
            .bind(new.environment_id)
            .bind(new.environment.as_str())
            .bind(new.integration.as_str())
            .bind(&new.connection_id)
            .bind(&new.action_name)
            .bind(to_text(&new.input))
            .bind(new.max_retries as i32)
            .bind(now)
            .fetch_one(pool)
            .await)?;
        row.try_into()
    }

    /// The environment's run `id`.
    pub async fn action_run(&self, environment_id: i64, id: &str) -> Result<ActionRun, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM action_runs WHERE environment_id = $1 AND id = $2");
        let row: Option<ActionRunRow> = on_pool!(self, |pool| sqlx::query_as(&sql)
            .bind(environment_id)
            .bind(id)
            .fetch_optional(pool)
            .await)?;
        row.ok_or_else(|| StoreError::NotFound(format!("action run {id}")))?
            .try_into()
    }

    /// The environment's runs that `filter` selects, newest first, `limit` at most. A
    /// `before_id` that is not the environment's run (pruned since) gives none.
    pub async fn action_runs(
        &self,
        environment_id: i64,
        filter: &ActionRunFilter,
        limit: u32,
    ) -> Result<Vec<ActionRun>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM action_runs
             WHERE environment_id = $1
               AND (CAST($2 AS TEXT) IS NULL OR status = $2)
               AND (CAST($3 AS TEXT) IS NULL OR integration = $3)
               AND (CAST($4 AS TEXT) IS NULL OR connection_id = $4)
               AND (CAST($5 AS TEXT) IS NULL OR action_name = $5)
               AND (CAST($6 AS TEXT) IS NULL OR (created_at, id) <
                    (SELECT created_at, id FROM action_runs WHERE environment_id = $1 AND id = $6))
             ORDER BY created_at DESC, id DESC LIMIT $7"
        );
        let rows: Vec<ActionRunRow> = on_pool!(self, |pool| sqlx::query_as(&sql)
            .bind(environment_id)
            .bind(filter.status.map(ActionRunStatus::as_str))
            .bind(&filter.integration)
            .bind(&filter.connection_id)
            .bind(&filter.action_name)
            .bind(&filter.before_id)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await)?;
        runs(rows)
    }

    /// Takes up to `limit` due runs, oldest due first, for `lease` each: one attempt more.
    /// A run another caller claims at the same moment is not handed out twice (the outer
    /// condition is checked again on the locked row).
    pub async fn claim_action_runs(
        &self,
        now: DateTime<Utc>,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<ActionRun>, StoreError> {
        let sql = format!(
            "UPDATE action_runs SET status = 'running', attempts = attempts + 1, run_after = $2
             WHERE id IN (SELECT id FROM action_runs WHERE {DUE} ORDER BY run_after LIMIT $3) AND {DUE}
             RETURNING {COLUMNS}"
        );
        let rows: Vec<ActionRunRow> = on_pool!(self, |pool| sqlx::query_as(&sql)
            .bind(now)
            .bind(now + chrono_duration(lease))
            .bind(limit as i64)
            .fetch_all(pool)
            .await)?;
        runs(rows)
    }

    /// Writes how the run's attempt `attempt` ended; false when the run is no longer that
    /// attempt's (its lease lapsed and another claimed it).
    pub async fn finish_action_run(
        &self,
        id: &str,
        attempt: u32,
        outcome: &ActionOutcome,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let (status, output, error) = match outcome {
            ActionOutcome::Succeeded(output) => (ActionRunStatus::Succeeded, output.as_ref().map(to_text), None),
            ActionOutcome::Failed(failure) => (ActionRunStatus::Failed, None, Some(to_text(failure))),
        };
        let done = on_pool!(self, |pool| sqlx::query(
            "UPDATE action_runs SET status = $3, output = $4, error = $5, finished_at = $6, run_after = $6
             WHERE id = $1 AND attempts = $2 AND status = 'running'"
        )
        .bind(id)
        .bind(attempt as i32)
        .bind(status.as_str())
        .bind(output)
        .bind(error)
        .bind(now)
        .execute(pool)
        .await
        .map(|r| r.rows_affected()))?;
        Ok(done == 1)
    }

    /// Puts the attempt's run back to wait until `run_after`: a retry after `failure`, or
    /// (with none) an attempt that did not run, which is then not counted.
    pub async fn defer_action_run(
        &self,
        id: &str,
        attempt: u32,
        failure: Option<&ActionFailure>,
        run_after: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let sql = match failure {
            Some(_) => {
                "UPDATE action_runs SET status = 'waiting', run_after = $3, error = $4
                        WHERE id = $1 AND attempts = $2 AND status = 'running'"
            }
            None => {
                "UPDATE action_runs SET status = 'waiting', run_after = $3, attempts = attempts - 1
                     WHERE id = $1 AND attempts = $2 AND status = 'running'"
            }
        };
        let deferred = on_pool!(self, |pool| {
            let query = sqlx::query(sql).bind(id).bind(attempt as i32).bind(run_after);
            match failure {
                Some(failure) => query.bind(to_text(failure)),
                None => query,
            }
            .execute(pool)
            .await
            .map(|r| r.rows_affected())
        })?;
        Ok(deferred == 1)
    }

    /// Finished runs whose completion webhook is not queued, finished before `before`
    /// (their worker did not get to it), oldest first.
    pub async fn unnotified_action_runs(
        &self,
        before: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<ActionRun>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM action_runs WHERE finished_at IS NOT NULL AND NOT notified AND finished_at < $1
             ORDER BY finished_at LIMIT $2"
        );
        let rows: Vec<ActionRunRow> = on_pool!(self, |pool| sqlx::query_as(&sql)
            .bind(before)
            .bind(limit as i64)
            .fetch_all(pool)
            .await)?;
        runs(rows)
    }

    pub async fn action_runs_notified(&self, ids: &[String]) -> Result<(), StoreError> {
        for id in ids {
            on_pool!(self, |pool| sqlx::query(
                "UPDATE action_runs SET notified = TRUE WHERE id = $1"
            )
            .bind(id)
            .execute(pool)
            .await
            .map(|_| ()))?;
        }
        Ok(())
    }

    /// Runs waiting and due at `now` (the backlog no worker has taken yet), and runs
    /// running, across the environments.
    pub async fn action_runs_in_flight(&self, now: DateTime<Utc>) -> Result<(i64, i64), StoreError> {
        let (due, running): (i64, i64) = on_pool!(self, |pool| sqlx::query_as(
            "SELECT COALESCE(SUM(CASE WHEN status = 'waiting' AND run_after <= $1 THEN 1 ELSE 0 END), 0),
                    COALESCE(SUM(CASE WHEN status = 'running' THEN 1 ELSE 0 END), 0)
             FROM action_runs WHERE status IN ('waiting', 'running')"
        )
        .bind(now)
        .fetch_one(pool)
        .await)?;
        Ok((due, running))
    }

    /// Forgets the runs that finished before `before`; how many.
    pub async fn prune_action_runs(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        Ok(on_pool!(self, |pool| sqlx::query(
            "DELETE FROM action_runs WHERE finished_at < $1"
        )
        .bind(before)
        .execute(pool)
        .await
        .map(|r| r.rows_affected()))?)
    }
}
