//! The operation log: what became of each webhook, and each action run. The router writes the entry of each
//! webhook it routes (from the envelope in `HOOKS_RAW`: one entry however often it is
//! routed) and ingest the entry of each one it did not store (rejected, a handshake, a
//! duplicate, NATS unavailable), so ingest's hot path writes nothing for an accepted
//! webhook. The router, the worker and the deliverer add steps to an accepted one,
//! found by its `HOOKS_RAW` sequence. Each action run is an entry of its own
//! ([`ActionEntry`]), written by the process that ran it. Written in bulk by
//! [`crate::oplog`].

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use super::{json_timestamp, Pool, Store, StoreError};

/// One webhook as ingest saw it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WebhookEntry {
    pub environment: String,
    pub integration: String,
    /// Its place in `HOOKS_RAW`, once stored there.
    pub raw_seq: Option<i64>,
    pub delivery_id: Option<String>,
    pub received_at: DateTime<Utc>,
    /// `accepted`, `duplicate`, `handshake`, `rejected` or `unavailable`.
    pub status: String,
    /// The signature check's result, or why the webhook was refused.
    pub detail: Option<String>,
    pub bytes: i64,
    /// Where the router sent it (`{at, status, events, connections, unrouted, types}`): kept
    /// in the entry itself, one row per webhook; shown as its first step.
    #[serde(skip)]
    pub routing: Option<Value>,
}

/// One thing that happened to an accepted webhook.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogStep {
    pub raw_seq: i64,
    pub at: DateTime<Utc>,
    /// `route`, `execution` or `forward`.
    pub stage: String,
    pub connection_id: Option<String>,
    pub status: String,
    pub detail: Value,
}

/// One run of an action.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ActionEntry {
    pub environment: String,
    pub integration: String,
    pub connection_id: String,
    pub action_name: String,
    /// How it was called: `api` (`POST /action/trigger`), `async` (an attempt of an
    /// asynchronous run) or `function` (`nango.triggerAction`).
    pub origin: String,
    /// The asynchronous run's id and this attempt's number.
    pub run_id: Option<String>,
    pub attempt: Option<i32>,
    pub started_at: DateTime<Utc>,
    pub duration_ms: f64,
    /// `succeeded` or `failed`.
    pub status: String,
    /// Why it failed: `{code, message, payload?}` as its caller was answered.
    pub error: Option<Value>,
    /// What the function logged.
    pub logs: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoggedAction {
    pub id: i64,
    #[serde(flatten)]
    pub entry: ActionEntry,
}

/// Which action runs of an environment; every part that is set must match.
#[derive(Debug, Clone, Default)]
pub struct ActionLogFilter {
    pub integration: Option<String>,
    pub connection_id: Option<String>,
    pub action_name: Option<String>,
    /// `succeeded` or `failed`.
    pub status: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub before_id: Option<i64>,
    pub after_id: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum LogWrite {
    Webhook(WebhookEntry),
    Step(LogStep),
    Action(ActionEntry),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoggedWebhook {
    pub id: i64,
    #[serde(flatten)]
    pub entry: WebhookEntry,
}

/// Which log entries of an environment; every part that is set must match.
#[derive(Debug, Clone, Default)]
pub struct LogFilter {
    pub integration: Option<String>,
    /// Webhooks with a step for this connection.
    pub connection_id: Option<String>,
    /// The webhook's status, or `failed`: a step of it failed.
    pub status: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// Newest first, older than this id (a page's cursor).
    pub before_id: Option<i64>,
    /// Oldest first, newer than this id (following the log).
    pub after_id: Option<i64>,
}

#[derive(sqlx::FromRow)]
struct EntryRow {
    id: i64,
    environment: String,
    integration: String,
    raw_seq: Option<i64>,
    delivery_id: Option<String>,
    received_at: DateTime<Utc>,
    status: String,
    detail: Option<String>,
    bytes: i64,
    routing: Option<String>,
}

#[derive(sqlx::FromRow)]
struct StepRead {
    raw_seq: i64,
    at: DateTime<Utc>,
    stage: String,
    connection_id: Option<String>,
    status: String,
    detail: String,
}

impl From<EntryRow> for LoggedWebhook {
    fn from(row: EntryRow) -> LoggedWebhook {
        LoggedWebhook {
            id: row.id,
            entry: WebhookEntry {
                environment: row.environment,
                integration: row.integration,
                raw_seq: row.raw_seq,
                delivery_id: row.delivery_id,
                received_at: row.received_at,
                status: row.status,
                detail: row.detail,
                bytes: row.bytes,
                routing: row.routing.and_then(|text| serde_json::from_str(&text).ok()),
            },
        }
    }
}

#[derive(sqlx::FromRow)]
struct ActionRow {
    id: i64,
    environment: String,
    integration: String,
    connection_id: String,
    action_name: String,
    origin: String,
    run_id: Option<String>,
    attempt: Option<i32>,
    started_at: DateTime<Utc>,
    duration_ms: f64,
    status: String,
    error: Option<String>,
    logs: String,
}

impl From<ActionRow> for LoggedAction {
    fn from(row: ActionRow) -> LoggedAction {
        let json = |text: String| serde_json::from_str(&text).unwrap_or(Value::String(text));
        LoggedAction {
            id: row.id,
            entry: ActionEntry {
                environment: row.environment,
                integration: row.integration,
                connection_id: row.connection_id,
                action_name: row.action_name,
                origin: row.origin,
                run_id: row.run_id,
                attempt: row.attempt,
                started_at: row.started_at,
                duration_ms: row.duration_ms,
                status: row.status,
                error: row.error.map(json),
                logs: json(row.logs),
            },
        }
    }
}

const ACTION_COLUMNS: &str = "id, environment, integration, connection_id, action_name, origin, run_id, attempt, \
     started_at, duration_ms, status, error, logs";

const ENTRY_COLUMNS: &str =
    "id, environment, integration, raw_seq, delivery_id, received_at, status, detail, bytes, routing";

impl Store {
    /// Writes log entries and steps in one transaction, the rows of each table in JSON
    /// parameters ([`super::tx::Tx::insert_json_rows`]).
    pub async fn write_log(&self, writes: &[LogWrite]) -> Result<(), StoreError> {
        #[derive(Serialize)]
        struct EntryJson<'a> {
            environment: &'a str,
            integration: &'a str,
            raw_seq: Option<i64>,
            delivery_id: Option<&'a str>,
            received_at: String,
            status: &'a str,
            detail: Option<&'a str>,
            bytes: i64,
            routing: Option<String>,
        }
        #[derive(Serialize)]
        struct StepJson<'a> {
            raw_seq: i64,
            at: String,
            stage: &'a str,
            connection_id: Option<&'a str>,
            status: &'a str,
            detail: String,
        }
        #[derive(Serialize)]
        struct ActionJson<'a> {
            environment: &'a str,
            integration: &'a str,
            connection_id: &'a str,
            action_name: &'a str,
            origin: &'a str,
            run_id: Option<&'a str>,
            attempt: Option<i32>,
            started: String,
            duration_ms: f64,
            status: &'a str,
            error_text: Option<String>,
            logs_text: String,
        }
        let mut webhooks = Vec::new();
        let mut steps = Vec::new();
        let mut actions = Vec::new();
        for write in writes {
            match write {
                LogWrite::Webhook(e) => webhooks.push(EntryJson {
                    environment: &e.environment,
                    integration: &e.integration,
                    raw_seq: e.raw_seq,
                    delivery_id: e.delivery_id.as_deref(),
                    received_at: json_timestamp(&e.received_at),
                    status: &e.status,
                    detail: e.detail.as_deref(),
                    bytes: e.bytes,
                    routing: e.routing.as_ref().map(Value::to_string),
                }),
                LogWrite::Step(s) => steps.push(StepJson {
                    raw_seq: s.raw_seq,
                    at: json_timestamp(&s.at),
                    stage: &s.stage,
                    connection_id: s.connection_id.as_deref(),
                    status: &s.status,
                    detail: s.detail.to_string(),
                }),
                LogWrite::Action(a) => actions.push(ActionJson {
                    environment: &a.environment,
                    integration: &a.integration,
                    connection_id: &a.connection_id,
                    action_name: &a.action_name,
                    origin: &a.origin,
                    run_id: a.run_id.as_deref(),
                    attempt: a.attempt,
                    started: json_timestamp(&a.started_at),
                    duration_ms: a.duration_ms,
                    status: &a.status,
                    error_text: a.error.as_ref().map(Value::to_string),
                    logs_text: a.logs.to_string(),
                }),
            }
        }
        let (insert_webhooks, insert_steps, insert_actions) = match self.pool {
            Pool::Postgres(_) => (
                "INSERT INTO webhook_log (environment, integration, raw_seq, delivery_id, received_at, status, detail,
                                          bytes, routing)
                 SELECT e.environment, e.integration, e.raw_seq, e.delivery_id, e.received_at, e.status, e.detail,
                        e.bytes, e.routing
                 FROM jsonb_to_recordset($1::jsonb) AS e(environment text, integration text, raw_seq bigint,
                      delivery_id text, received_at timestamptz, status text, detail text, bytes bigint, routing text)
                 ON CONFLICT DO NOTHING",
                "INSERT INTO webhook_log_steps (raw_seq, at, stage, connection_id, status, detail)
                 SELECT s.raw_seq, s.at, s.stage, s.connection_id, s.status, s.detail
                 FROM jsonb_to_recordset($1::jsonb) AS s(raw_seq bigint, at timestamptz, stage text,
                      connection_id text, status text, detail text)",
                "INSERT INTO action_log (environment, integration, connection_id, action_name, origin, run_id, attempt,
                                         started_at, duration_ms, status, error, logs)
                 SELECT a.environment, a.integration, a.connection_id, a.action_name, a.origin, a.run_id, a.attempt,
                        a.started, a.duration_ms, a.status, a.error_text, a.logs_text
                 FROM jsonb_to_recordset($1::jsonb) AS a(environment text, integration text, connection_id text,
                      action_name text, origin text, run_id text, attempt integer, started timestamptz,
                      duration_ms double precision, status text, error_text text, logs_text text)",
            ),
            Pool::Sqlite(_) => (
                "INSERT INTO webhook_log (environment, integration, raw_seq, delivery_id, received_at, status, detail,
                                          bytes, routing)
                 SELECT e.value ->> '$.environment', e.value ->> '$.integration', e.value ->> '$.raw_seq',
                        e.value ->> '$.delivery_id', e.value ->> '$.received_at', e.value ->> '$.status',
                        e.value ->> '$.detail', e.value ->> '$.bytes', e.value ->> '$.routing'
                 FROM json_each($1) AS e WHERE true
                 ON CONFLICT DO NOTHING",
                "INSERT INTO webhook_log_steps (raw_seq, at, stage, connection_id, status, detail)
                 SELECT s.value ->> '$.raw_seq', s.value ->> '$.at', s.value ->> '$.stage',
                        s.value ->> '$.connection_id', s.value ->> '$.status', s.value ->> '$.detail'
                 FROM json_each($1) AS s WHERE true",
                "INSERT INTO action_log (environment, integration, connection_id, action_name, origin, run_id, attempt,
                                         started_at, duration_ms, status, error, logs)
                 SELECT a.value ->> '$.environment', a.value ->> '$.integration', a.value ->> '$.connection_id',
                        a.value ->> '$.action_name', a.value ->> '$.origin', a.value ->> '$.run_id',
                        a.value ->> '$.attempt', a.value ->> '$.started', a.value ->> '$.duration_ms',
                        a.value ->> '$.status', a.value ->> '$.error_text', a.value ->> '$.logs_text'
                 FROM json_each($1) AS a WHERE true",
            ),
        };
        let mut tx = self.begin().await?;
        tx.insert_json_rows(insert_webhooks, &webhooks).await?;
        tx.insert_json_rows(insert_steps, &steps).await?;
        tx.insert_json_rows(insert_actions, &actions).await?;
        tx.commit().await
    }

    /// The environment's logged webhooks that `filter` selects: newest first, or oldest
    /// first after `after_id`.
    pub async fn logged_webhooks(
        &self,
        environment: &str,
        filter: &LogFilter,
        limit: u32,
    ) -> Result<Vec<LoggedWebhook>, StoreError> {
        let order = if filter.after_id.is_some() { "ASC" } else { "DESC" };
        let sql = format!(
            "SELECT {ENTRY_COLUMNS} FROM webhook_log w
             WHERE environment = $1
               AND (CAST($2 AS TEXT) IS NULL OR integration = $2)
               AND (CAST($3 AS TEXT) IS NULL OR EXISTS (SELECT 1 FROM webhook_log_steps s
                        WHERE s.raw_seq = w.raw_seq AND s.connection_id = $3))
               AND (CAST($4 AS TEXT) IS NULL OR status = $4
                    OR ($4 = 'failed' AND EXISTS (SELECT 1 FROM webhook_log_steps s
                        WHERE s.raw_seq = w.raw_seq AND s.status IN ('failed', 'dead_lettered', 'gave_up'))))
               AND ($5 IS NULL OR received_at >= $5)
               AND ($6 IS NULL OR received_at < $6)
               AND (CAST($7 AS BIGINT) IS NULL OR id < $7)
               AND (CAST($8 AS BIGINT) IS NULL OR id > $8)
             ORDER BY id {order} LIMIT $9"
        );
        let rows: Vec<EntryRow> = on_pool!(self, |pool| sqlx::query_as(&sql)
            .bind(environment)
            .bind(&filter.integration)
            .bind(&filter.connection_id)
            .bind(&filter.status)
            .bind(filter.since)
            .bind(filter.until)
            .bind(filter.before_id)
            .bind(filter.after_id)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await)?;
        Ok(rows.into_iter().map(LoggedWebhook::from).collect())
    }

    /// One logged webhook and its steps, in order.
    pub async fn logged_webhook(
        &self,
        environment: &str,
        id: i64,
    ) -> Result<(LoggedWebhook, Vec<LogStep>), StoreError> {
        let sql = format!("SELECT {ENTRY_COLUMNS} FROM webhook_log WHERE environment = $1 AND id = $2");
        let row: Option<EntryRow> = on_pool!(self, |pool| sqlx::query_as(&sql)
            .bind(environment)
            .bind(id)
            .fetch_optional(pool)
            .await)?;
        let webhook = LoggedWebhook::from(row.ok_or_else(|| StoreError::NotFound(format!("webhook {id}")))?);
        let Some(raw_seq) = webhook.entry.raw_seq else {
            return Ok((webhook, Vec::new()));
        };
        let rows: Vec<StepRead> = on_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT raw_seq, at, stage, connection_id, status, detail FROM webhook_log_steps
                 WHERE raw_seq = $1 ORDER BY id",
            )
            .bind(raw_seq)
            .fetch_all(pool)
            .await
        })?;
        let routing = webhook.entry.routing.iter().map(|routing| LogStep {
            raw_seq,
            at: routing["at"]
                .as_str()
                .and_then(|at| at.parse().ok())
                .unwrap_or(webhook.entry.received_at),
            stage: "route".into(),
            connection_id: None,
            status: routing["status"].as_str().unwrap_or("routed").into(),
            detail: routing.clone(),
        });
        let steps = routing
            .collect::<Vec<_>>()
            .into_iter()
            .chain(rows.into_iter().map(|row| LogStep {
                raw_seq: row.raw_seq,
                at: row.at,
                stage: row.stage,
                connection_id: row.connection_id,
                status: row.status,
                detail: serde_json::from_str(&row.detail).unwrap_or(Value::String(row.detail)),
            }))
            .collect();
        Ok((webhook, steps))
    }

    /// The environment's action runs that `filter` selects: newest first, or oldest first
    /// after `after_id`.
    pub async fn logged_actions(
        &self,
        environment: &str,
        filter: &ActionLogFilter,
        limit: u32,
    ) -> Result<Vec<LoggedAction>, StoreError> {
        let order = if filter.after_id.is_some() { "ASC" } else { "DESC" };
        let sql = format!(
            "SELECT {ACTION_COLUMNS} FROM action_log
             WHERE environment = $1
               AND (CAST($2 AS TEXT) IS NULL OR integration = $2)
               AND (CAST($3 AS TEXT) IS NULL OR connection_id = $3)
               AND (CAST($4 AS TEXT) IS NULL OR action_name = $4)
               AND (CAST($5 AS TEXT) IS NULL OR status = $5)
               AND ($6 IS NULL OR started_at >= $6)
               AND ($7 IS NULL OR started_at < $7)
               AND (CAST($8 AS BIGINT) IS NULL OR id < $8)
               AND (CAST($9 AS BIGINT) IS NULL OR id > $9)
             ORDER BY id {order} LIMIT $10"
        );
        let rows: Vec<ActionRow> = on_pool!(self, |pool| sqlx::query_as(&sql)
            .bind(environment)
            .bind(&filter.integration)
            .bind(&filter.connection_id)
            .bind(&filter.action_name)
            .bind(&filter.status)
            .bind(filter.since)
            .bind(filter.until)
            .bind(filter.before_id)
            .bind(filter.after_id)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await)?;
        Ok(rows.into_iter().map(LoggedAction::from).collect())
    }

    /// Deletes log entries, steps and action runs from before `before`; how many.
    pub async fn prune_log(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let mut pruned = 0;
        for sql in [
            "DELETE FROM webhook_log WHERE received_at < $1",
            "DELETE FROM webhook_log_steps WHERE at < $1",
            "DELETE FROM action_log WHERE started_at < $1",
        ] {
            pruned += on_pool!(self, |pool| sqlx::query(sql)
                .bind(before)
                .execute(pool)
                .await
                .map(|r| r.rows_affected()))?;
        }
        Ok(pruned)
    }
}
