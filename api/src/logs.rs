//! The operation log: `GET /logs` lists the webhooks that reached ingest (newest first,
//! or oldest first after an id, to follow it), `GET /logs/{id}` shows one with what
//! followed: its routing, each function execution and each forwarding attempt.
//! `GET /logs/actions` lists the action runs, in the same two orders.

use axum::extract::{Path, State};
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use hookyard_core::store::logs::{ActionLogFilter, LogFilter, LogStep, LoggedAction, LoggedWebhook};
use hookyard_core::store::Environment;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, ErrorBody, Params};
use crate::fields;
use crate::{AppState, Data};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(show))
        .routes(routes!(list_actions))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogQuery {
    integration: Option<String>,
    /// Webhooks routed to this connection.
    connection: Option<String>,
    /// `accepted`, `duplicate`, `handshake`, `rejected`, `unavailable`, or `failed` (a
    /// function execution or a forward of it failed).
    status: Option<String>,
    /// Received at or after this (RFC 3339).
    #[serde(default, deserialize_with = "fields::optional_time")]
    since: Option<DateTime<Utc>>,
    /// Received before this.
    #[serde(default, deserialize_with = "fields::optional_time")]
    until: Option<DateTime<Utc>>,
    /// At most this many (default 50, at most 1000).
    limit: Option<u32>,
    /// From `next_cursor`: older entries.
    cursor: Option<i64>,
    /// Entries after this id, oldest first (to follow the log).
    after: Option<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct LogPage {
    #[schema(value_type = Vec<Object>)]
    data: Vec<LoggedWebhook>,
    /// Pass back as `cursor` for older entries; null on the last page.
    next_cursor: Option<i64>,
}

/// The webhooks that reached ingest, newest first.
#[utoipa::path(operation_id = "logs_list", get, path = "/logs", tag = "logs", params(LogQuery),
    responses((status = 200, body = LogPage), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
async fn list(
    State(state): State<AppState>,
    Extension(environment): Extension<Environment>,
    Params(query): Params<LogQuery>,
) -> Result<Json<LogPage>, ApiError> {
    let limit = page_limit(query.limit, query.cursor, query.after)?;
    const STATUSES: &[&str] = &[
        "accepted",
        "duplicate",
        "handshake",
        "rejected",
        "unavailable",
        "failed",
    ];
    if let Some(status) = query.status.as_deref().filter(|s| !STATUSES.contains(s)) {
        return Err(ApiError::invalid(
            "status",
            format!("{status:?} is not one of {}", STATUSES.join(", ")),
        ));
    }
    let filter = LogFilter {
        integration: query.integration,
        connection_id: query.connection,
        status: query.status,
        since: query.since,
        until: query.until,
        before_id: query.cursor,
        after_id: query.after,
    };
    let data = state
        .store
        .logged_webhooks(environment.name.as_str(), &filter, limit)
        .await?;
    let next_cursor = next_cursor(filter.after_id, limit, data.last().map(|w| w.id), data.len());
    Ok(Json(LogPage { data, next_cursor }))
}

#[derive(Serialize, ToSchema)]
pub struct LoggedView {
    #[serde(flatten)]
    #[schema(value_type = Object)]
    webhook: LoggedWebhook,
    /// In order: `route`, then per connection each `execution` and `forward` attempt.
    #[schema(value_type = Vec<Object>)]
    steps: Vec<LogStep>,
}

/// One webhook and everything that followed it.
#[utoipa::path(operation_id = "logs_show", get, path = "/logs/{id}", tag = "logs",
    params(("id" = i64, Path, description = "the log entry's id")),
    responses((status = 200, body = Data<LoggedView>), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn show(
    State(state): State<AppState>,
    Extension(environment): Extension<Environment>,
    Path(id): Path<i64>,
) -> Result<Json<Data<LoggedView>>, ApiError> {
    let (webhook, steps) = state.store.logged_webhook(environment.name.as_str(), id).await?;
    Ok(Json(Data {
        data: LoggedView { webhook, steps },
    }))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ActionLogQuery {
    integration: Option<String>,
    connection: Option<String>,
    /// The action's name.
    action: Option<String>,
    /// `succeeded` or `failed`.
    status: Option<String>,
    /// Started at or after this (RFC 3339).
    #[serde(default, deserialize_with = "fields::optional_time")]
    since: Option<DateTime<Utc>>,
    /// Started before this.
    #[serde(default, deserialize_with = "fields::optional_time")]
    until: Option<DateTime<Utc>>,
    /// At most this many (default 50, at most 1000).
    limit: Option<u32>,
    /// From `next_cursor`: older entries.
    cursor: Option<i64>,
    /// Entries after this id, oldest first (to follow the log).
    after: Option<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct ActionLogPage {
    /// Each run: `origin` (`api`, `async` with its `run_id` and `attempt`, `function`),
    /// `status`, `duration_ms`, `error` (`{code, message, payload?}`) and the function's
    /// `logs`.
    #[schema(value_type = Vec<Object>)]
    data: Vec<LoggedAction>,
    /// Pass back as `cursor` for older entries; null on the last page.
    next_cursor: Option<i64>,
}

/// The action runs, newest first (`POST /action/trigger`, asynchronous runs' attempts,
/// `nango.triggerAction`).
#[utoipa::path(operation_id = "logs_actions", get, path = "/logs/actions", tag = "logs", params(ActionLogQuery),
    responses((status = 200, body = ActionLogPage), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
async fn list_actions(
    State(state): State<AppState>,
    Extension(environment): Extension<Environment>,
    Params(query): Params<ActionLogQuery>,
) -> Result<Json<ActionLogPage>, ApiError> {
    let limit = page_limit(query.limit, query.cursor, query.after)?;
    if let Some(status) = query.status.as_deref().filter(|s| !["succeeded", "failed"].contains(s)) {
        return Err(ApiError::invalid(
            "status",
            format!("{status:?} is not one of succeeded, failed"),
        ));
    }
    let filter = ActionLogFilter {
        integration: query.integration,
        connection_id: query.connection,
        action_name: query.action,
        status: query.status,
        since: query.since,
        until: query.until,
        before_id: query.cursor,
        after_id: query.after,
    };
    let data = state
        .store
        .logged_actions(environment.name.as_str(), &filter, limit)
        .await?;
    let next_cursor = next_cursor(filter.after_id, limit, data.last().map(|a| a.id), data.len());
    Ok(Json(ActionLogPage { data, next_cursor }))
}

/// The page size asked for, checked with the two ways of paging.
fn page_limit(limit: Option<u32>, cursor: Option<i64>, after: Option<i64>) -> Result<u32, ApiError> {
    let limit = fields::page_size(limit, 50)?;
    if cursor.is_some() && after.is_some() {
        return Err(ApiError::invalid("after", "give cursor or after, not both"));
    }
    Ok(limit)
}

/// The cursor of the page after a full one, newest first (none when following).
fn next_cursor(after: Option<i64>, limit: u32, last_id: Option<i64>, len: usize) -> Option<i64> {
    (after.is_none() && len == limit as usize).then_some(last_id).flatten()
}
