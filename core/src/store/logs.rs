//! The operation log: what became of each webhook. The router writes the entry of each
//! webhook it routes (from the envelope in `HOOKS_RAW`: one entry however often it is
//! routed) and ingest the entry of each one it did not store (rejected, a handshake, a
//! duplicate, NATS unavailable), so ingest's hot path writes nothing for an accepted
//! webhook. The router, the worker and the deliverer add steps to an accepted one,
//! found by its `HOOKS_RAW` sequence. Written in bulk by [`crate::oplog`].

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

#[derive(Debug, Clone, PartialEq)]
pub enum LogWrite {
    Webhook(WebhookEntry),
    Step(LogStep),
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
        let mut webhooks = Vec::new();
        let mut steps = Vec::new();
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
            }
        }
        let (insert_webhooks, insert_steps) = match self.pool {
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
            ),
        };
        let mut tx = self.begin().await?;
        tx.insert_json_rows(insert_webhooks, &webhooks).await?;
        tx.insert_json_rows(insert_steps, &steps).await?;
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

    /// Deletes log entries and steps from before `before`; how many.
    pub async fn prune_log(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let mut pruned = 0;
        for sql in [
            "DELETE FROM webhook_log WHERE received_at < $1",
            "DELETE FROM webhook_log_steps WHERE at < $1",
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
