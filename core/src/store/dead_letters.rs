//! Dead letters: messages a consumer gave up on, with why, the errors of the attempts
//! before, and their redrives. The worker writes them (in its commit); the API lists,
//! shows, asks for redrives and purges; the router carries redrives out.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::tx::on_tx;
use super::{Pool, Store, StoreError};

/// The consumer names of the kinds that are not functions.
pub const FORWARD_CONSUMER: &str = "deliveries";
pub const EXEC_CONSUMER: &str = "exec";

/// A message given up on, with why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetter {
    pub consumer: String,
    pub environment: String,
    pub integration: String,
    pub connection_id: Option<String>,
    pub subject: String,
    pub message_id: String,
    pub stream_seq: i64,
    pub payload: String,
    pub function_name: Option<String>,
    pub function_version: Option<i32>,
    pub error_kind: String,
    pub error: String,
    pub attempts: i32,
    /// The message's headers (JSON `[[name, value], …]`) when it can be published again
    /// from the letter alone: a function's event, however long ago its stream dropped it.
    pub headers: Option<String>,
}

/// `function` (an `onWebhook` execution, or a message the functions consumer could not
/// read), `forward` (a delivery to a customer's app) or `exec` (an exec job message).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeadLetterKind {
    Function,
    Forward,
    Exec,
}

impl DeadLetterKind {
    pub fn of_consumer(consumer: &str) -> DeadLetterKind {
        match consumer {
            FORWARD_CONSUMER => DeadLetterKind::Forward,
            EXEC_CONSUMER => DeadLetterKind::Exec,
            _ => DeadLetterKind::Function,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            DeadLetterKind::Function => "function",
            DeadLetterKind::Forward => "forward",
            DeadLetterKind::Exec => "exec",
        }
    }
}

/// The SQL of [`DeadLetterKind::of_consumer`].
const KIND_SQL: &str = "CASE consumer WHEN 'deliveries' THEN 'forward' WHEN 'exec' THEN 'exec' ELSE 'function' END";

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredDeadLetter {
    pub id: i64,
    pub kind: DeadLetterKind,
    #[serde(flatten)]
    pub letter: DeadLetter,
    pub created_at: DateTime<Utc>,
    /// Asked for and not carried out yet.
    pub redrive_requested_at: Option<DateTime<Utc>>,
    pub redriven_at: Option<DateTime<Utc>>,
    pub redrives: i32,
    /// Why the last redrive could not be made.
    pub redrive_error: Option<String>,
}

/// One failed attempt of a function execution.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FailedAttempt {
    pub attempt: i32,
    pub error_kind: String,
    pub error: String,
    pub failed_at: DateTime<Utc>,
}

/// Which dead letters of an environment; every part that is set must match.
#[derive(Debug, Clone, Default)]
pub struct DeadLetterFilter {
    pub ids: Option<Vec<i64>>,
    pub kind: Option<DeadLetterKind>,
    pub integration: Option<String>,
    pub connection_id: Option<String>,
    /// A part of the error message (case-insensitive).
    pub error: Option<String>,
    /// Only letters with a smaller id (the cursor of a listing, newest first).
    pub before_id: Option<i64>,
}

#[derive(sqlx::FromRow)]
struct DeadLetterRow {
    id: i64,
    consumer: String,
    environment: String,
    integration: String,
    connection_id: Option<String>,
    subject: String,
    message_id: String,
    stream_seq: i64,
    payload: String,
    function_name: Option<String>,
    function_version: Option<i32>,
    error_kind: String,
    error: String,
    attempts: i32,
    headers: Option<String>,
    created_at: DateTime<Utc>,
    redrive_requested_at: Option<DateTime<Utc>>,
    redriven_at: Option<DateTime<Utc>>,
    redrives: i32,
    redrive_error: Option<String>,
}

impl From<DeadLetterRow> for StoredDeadLetter {
    fn from(row: DeadLetterRow) -> StoredDeadLetter {
        StoredDeadLetter {
            id: row.id,
            kind: DeadLetterKind::of_consumer(&row.consumer),
            created_at: row.created_at,
            redrive_requested_at: row.redrive_requested_at,
            redriven_at: row.redriven_at,
            redrives: row.redrives,
            redrive_error: row.redrive_error,
            letter: DeadLetter {
                consumer: row.consumer,
                environment: row.environment,
                integration: row.integration,
                connection_id: row.connection_id,
                subject: row.subject,
                message_id: row.message_id,
                stream_seq: row.stream_seq,
                payload: row.payload,
                function_name: row.function_name,
                function_version: row.function_version,
                error_kind: row.error_kind,
                error: row.error,
                attempts: row.attempts,
                headers: row.headers,
            },
        }
    }
}

const COLUMNS: &str = "id, consumer, environment, integration, connection_id, subject, message_id, stream_seq,
    payload, function_name, function_version, error_kind, error, attempts, headers, created_at,
    redrive_requested_at, redriven_at, redrives, redrive_error";

/// Binds `$1`..`$7` of [`Store::dead_letter_filter`] to `$query` (any query type, either
/// back end).
macro_rules! bind_filter {
    ($query:expr, $environment:expr, $filter:expr) => {{
        let (ids, kind, integration, connection_id, error, before_id) = filter_params($filter);
        $query
            .bind($environment)
            .bind(ids)
            .bind(kind)
            .bind(integration)
            .bind(connection_id)
            .bind(error)
            .bind(before_id)
    }};
}

impl Store {
    /// The environment's dead letters that `filter` selects, newest first.
    pub async fn dead_letters(
        &self,
        environment: &str,
        filter: &DeadLetterFilter,
        limit: u32,
    ) -> Result<Vec<StoredDeadLetter>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM dead_letters WHERE {} ORDER BY id DESC LIMIT $8",
            self.dead_letter_filter()
        );
        let rows: Vec<DeadLetterRow> = on_pool!(self, |pool| bind_filter!(sqlx::query_as(&sql), environment, filter)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await)?;
        Ok(rows.into_iter().map(StoredDeadLetter::from).collect())
    }

    pub async fn dead_letter(&self, environment: &str, id: i64) -> Result<StoredDeadLetter, StoreError> {
        let filter = DeadLetterFilter {
            ids: Some(vec![id]),
            ..Default::default()
        };
        self.dead_letters(environment, &filter, 1)
            .await?
            .pop()
            .ok_or_else(|| StoreError::NotFound(format!("dead letter {id}")))
    }

    /// Marks the selected letters for redrive (the router carries it out); their ids.
    /// Letters of exec job messages are left out: they were never jobs, and would fail
    /// the same way again.
    pub async fn request_redrive(&self, environment: &str, filter: &DeadLetterFilter) -> Result<Vec<i64>, StoreError> {
        let sql = format!(
            "UPDATE dead_letters SET redrive_requested_at = $8, redrive_error = NULL
             WHERE {} AND consumer <> 'exec' AND error_kind <> 'invalid_message' RETURNING id",
            self.dead_letter_filter()
        );
        let now = Utc::now();
        let mut ids: Vec<i64> = on_pool!(self, |pool| bind_filter!(sqlx::query_scalar(&sql), environment, filter)
            .bind(now)
            .fetch_all(pool)
            .await)?;
        ids.sort_unstable();
        Ok(ids)
    }

    /// Deletes the selected letters (and their attempts); how many.
    pub async fn delete_dead_letters(&self, environment: &str, filter: &DeadLetterFilter) -> Result<u64, StoreError> {
        let sql = format!("DELETE FROM dead_letters WHERE {}", self.dead_letter_filter());
        Ok(on_pool!(self, |pool| bind_filter!(
            sqlx::query(&sql),
            environment,
            filter
        )
        .execute(pool)
        .await
        .map(|r| r.rows_affected()))?)
    }

    /// Letters of every environment whose redrive is asked for, oldest request first.
    pub async fn redrives_requested(&self, limit: u32) -> Result<Vec<StoredDeadLetter>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM dead_letters WHERE redrive_requested_at IS NOT NULL
             ORDER BY redrive_requested_at, id LIMIT $1"
        );
        let rows: Vec<DeadLetterRow> = on_pool!(self, |pool| sqlx::query_as(&sql)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await)?;
        Ok(rows.into_iter().map(StoredDeadLetter::from).collect())
    }

    /// Records that the redrive of letter `id` asked for at `requested` was made
    /// (`error: None`) or could not be. A newer request is left in place.
    pub async fn finish_redrive(
        &self,
        id: i64,
        requested: DateTime<Utc>,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        let made = i32::from(error.is_none());
        on_pool!(self, |pool| sqlx::query(
            "UPDATE dead_letters SET redrive_requested_at = NULL, redrive_error = $3,
                    redriven_at = CASE WHEN $4 = 1 THEN $5 ELSE redriven_at END, redrives = redrives + $4
             WHERE id = $1 AND redrive_requested_at = $2"
        )
        .bind(id)
        .bind(requested)
        .bind(error)
        .bind(made)
        .bind(Utc::now())
        .execute(pool)
        .await
        .map(|_| ()))?;
        Ok(())
    }

    /// Keeps the failed attempts of function executions (a retry follows each).
    pub async fn record_failed_attempts(
        &self,
        attempts: &[(super::commit::Marker, FailedAttempt)],
    ) -> Result<(), StoreError> {
        for (marker, attempt) in attempts {
            on_pool!(self, |pool| sqlx::query(
                "INSERT INTO failed_attempts (consumer, message_id, attempt, error_kind, error, failed_at)
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING"
            )
            .bind(&marker.consumer)
            .bind(&marker.message_id)
            .bind(attempt.attempt)
            .bind(&attempt.error_kind)
            .bind(&attempt.error)
            .bind(attempt.failed_at)
            .execute(pool)
            .await
            .map(|_| ()))?;
        }
        Ok(())
    }

    /// The failed attempts of one execution, in order.
    pub async fn failed_attempts(&self, consumer: &str, message_id: &str) -> Result<Vec<FailedAttempt>, StoreError> {
        let rows: Vec<(i32, String, String, DateTime<Utc>)> = on_pool!(self, |pool| sqlx::query_as(
            "SELECT attempt, error_kind, error, failed_at FROM failed_attempts
             WHERE consumer = $1 AND message_id = $2 ORDER BY attempt"
        )
        .bind(consumer)
        .bind(message_id)
        .fetch_all(pool)
        .await)?;
        Ok(rows
            .into_iter()
            .map(|(attempt, error_kind, error, failed_at)| FailedAttempt {
                attempt,
                error_kind,
                error,
                failed_at,
            })
            .collect())
    }

    /// Drops failed attempts older than `before`.
    pub async fn prune_failed_attempts(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        Ok(on_pool!(self, |pool| sqlx::query(
            "DELETE FROM failed_attempts WHERE failed_at < $1"
        )
        .bind(before)
        .execute(pool)
        .await
        .map(|r| r.rows_affected()))?)
    }

    /// The WHERE clause of a [`DeadLetterFilter`], binding `$1`..`$7` (`bind_filter!`).
    fn dead_letter_filter(&self) -> String {
        let ids = match self.pool {
            Pool::Postgres(_) => "id IN (SELECT value::bigint FROM jsonb_array_elements_text($2::jsonb))",
            Pool::Sqlite(_) => "id IN (SELECT value FROM json_each($2))",
        };
        format!(
            "environment = $1
             AND (CAST($2 AS TEXT) IS NULL OR {ids})
             AND (CAST($3 AS TEXT) IS NULL OR {KIND_SQL} = $3)
             AND (CAST($4 AS TEXT) IS NULL OR integration = $4)
             AND (CAST($5 AS TEXT) IS NULL OR connection_id = $5)
             AND (CAST($6 AS TEXT) IS NULL OR LOWER(error) LIKE '%' || LOWER($6) || '%')
             AND (CAST($7 AS BIGINT) IS NULL OR id < $7)"
        )
    }
}

/// The parameters of a [`DeadLetterFilter`] as bound to `$2`..`$7`.
type FilterParams = (
    Option<String>,
    Option<&'static str>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i64>,
);

fn filter_params(filter: &DeadLetterFilter) -> FilterParams {
    (
        filter
            .ids
            .as_ref()
            .map(|ids| serde_json::to_string(ids).expect("ids serialise")),
        filter.kind.map(DeadLetterKind::as_str),
        filter.integration.clone(),
        filter.connection_id.clone(),
        filter.error.clone(),
        filter.before_id,
    )
}

pub(crate) async fn insert_dead_letter(
    tx: &mut super::tx::Tx,
    letter: &DeadLetter,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    on_tx!(tx, |conn| {
        sqlx::query(
            "INSERT INTO dead_letters (consumer, environment, integration, connection_id, subject, message_id, stream_seq,
                                       payload, function_name, function_version, error_kind, error, attempts, created_at,
                                       headers)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
        )
        .bind(&letter.consumer)
        .bind(&letter.environment)
        .bind(&letter.integration)
        .bind(&letter.connection_id)
        .bind(&letter.subject)
        .bind(&letter.message_id)
        .bind(letter.stream_seq)
        .bind(&letter.payload)
        .bind(&letter.function_name)
        .bind(letter.function_version)
        .bind(&letter.error_kind)
        .bind(&letter.error)
        .bind(letter.attempts)
        .bind(now)
        .bind(&letter.headers)
        .execute(&mut *conn)
        .await
        .map(|_| ())
    })?;
    Ok(())
}
