//! `POST /action/trigger`, Nango's: runs a deployed action (`createAction`) for a
//! connection, here in the API, and answers with what it returned. The connection comes
//! in the `Connection-Id` and `Provider-Config-Key` headers, the action and its input in
//! the body. The caller waits for the run (at most `api.action_limits.timeout`), or with
//! `X-Async: true` it is queued for a worker (`hookyard_core::store::action_runs`) and
//! `GET /action/{id}` answers its outcome; `GET /action/runs` lists them.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use hookyard_core::keys::IntegrationKey;
use hookyard_core::store::action_runs::{ActionFailure, ActionRun, ActionRunFilter, ActionRunStatus, NewActionRun};
use hookyard_core::store::Environment;
use hookyard_functions::runs::{action_failure, Origin, TriggerError};
use hookyard_functions::FunctionError;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, Body, ErrorBody, Params};
use crate::records::header;
use crate::AppState;

/// Nango's bound on `X-Max-Retries`.
const MAX_RETRIES: u32 = 5;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(trigger))
        .routes(routes!(result))
        .routes(routes!(list))
}

#[derive(Deserialize, ToSchema)]
pub struct TriggerRequest {
    /// The action's name: its file's, `{integration}/actions/{name}.ts`.
    action_name: String,
    /// Given to the action's `exec(nango, input)`; checked against its `input` schema.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    input: Value,
}

/// Runs an action for a connection and answers with its output, as it returned it.
/// A failed run answers 500 (`action_script_runtime_error` with the payload of the
/// `ActionError` it threw; `action_script_failure` otherwise), or 424
/// (`script_http_error`) when a provider API call it did not catch failed.
///
/// With `X-Async: true` the run is queued for a worker instead and the answer is 202
/// with its id and `statusUrl` (`GET /action/{id}`); `X-Max-Retries` (0 to 5, default 0)
/// runs it again after a failure, as long as retries remain.
#[utoipa::path(post, operation_id = "trigger_action", path = "/action/trigger", tag = "actions",
    params(
        ("Connection-Id" = String, Header),
        ("Provider-Config-Key" = String, Header),
        ("X-Async" = Option<bool>, Header, description = "queue the run for a worker; answered 202 with its id"),
        ("X-Max-Retries" = Option<u32>, Header, description = "with X-Async: runs after a failed one, 0 to 5 (default 0)"),
    ),
    request_body = TriggerRequest,
    responses((status = 200, description = "the action's output", body = Object),
              (status = 202, description = "queued (X-Async)", body = Queued),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 424, body = ErrorBody), (status = 500, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn trigger(
    State(state): State<AppState>,
    Extension(environment): Extension<Environment>,
    headers: HeaderMap,
    Body(request): Body<TriggerRequest>,
) -> Result<Response, ApiError> {
    let connection_id = header(&headers, "Connection-Id")?;
    let integration: IntegrationKey = header(&headers, "Provider-Config-Key")?
        .parse()
        .map_err(|e| ApiError::invalid("Provider-Config-Key", e))?;
    let max_retries = match headers.get("X-Max-Retries") {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u32>().ok())
                .filter(|n| *n <= MAX_RETRIES)
                .ok_or_else(|| {
                    ApiError::invalid("X-Max-Retries", format!("must be a number from 0 to {MAX_RETRIES}"))
                })?,
        ),
    };
    let asynchronous = match headers.get("X-Async").map(|v| v.to_str().map(str::trim)) {
        None => false,
        Some(Ok(v)) if v.eq_ignore_ascii_case("true") => true,
        Some(Ok(v)) if v.eq_ignore_ascii_case("false") => false,
        Some(_) => return Err(ApiError::invalid("X-Async", "must be true or false")),
    };
    if !asynchronous {
        if max_retries.is_some() {
            return Err(ApiError::invalid(
                "X-Max-Retries",
                "only with X-Async: true (a synchronous action is not retried: its caller sees the failure)",
            ));
        }
        let output = state
            .actions
            .trigger(
                environment.id,
                &integration,
                connection_id,
                &request.action_name,
                &request.input,
                Origin::Api,
            )
            .await
            .map_err(not_run)?;
        return Ok(Json(output.unwrap_or(Value::Null)).into_response());
    }
    let run = state
        .actions
        .queue(&NewActionRun {
            environment_id: environment.id,
            environment: environment.name.clone(),
            integration,
            connection_id: connection_id.to_string(),
            action_name: request.action_name,
            input: request.input,
            max_retries: max_retries.unwrap_or(0),
        })
        .await
        .map_err(not_run)?;
    let queued = Queued {
        status_url: format!("/action/{}", run.id),
        id: run.id,
    };
    Ok((StatusCode::ACCEPTED, Json(queued)).into_response())
}

/// An asynchronous action's outcome: 200 with its output once it succeeded, 500 with
/// its error once it failed (after its retries), 404 (`action_pending`) until then.
#[utoipa::path(get, operation_id = "action_result", path = "/action/{id}", tag = "actions",
    params(("id" = String, Path, description = "the id `POST /action/trigger` answered with X-Async")),
    responses((status = 200, description = "the action's output", body = Object),
              (status = 401, body = ErrorBody),
              (status = 404, description = "not finished yet (`action_pending`), or no such run", body = ErrorBody),
              (status = 500, description = "it failed", body = ErrorBody)))]
async fn result(
    State(state): State<AppState>,
    Extension(environment): Extension<Environment>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let run = state.store.action_run(environment.id, &id).await?;
    match run.status {
        ActionRunStatus::Succeeded => Ok(Json(run.output.unwrap_or(Value::Null)).into_response()),
        ActionRunStatus::Failed => {
            let failure = run.error.unwrap_or_else(|| ActionFailure {
                code: "action_script_failure".into(),
                message: "the run failed".into(),
                payload: None,
            });
            Err(ApiError::from_failure(StatusCode::INTERNAL_SERVER_ERROR, failure))
        }
        ActionRunStatus::Waiting | ActionRunStatus::Running => {
            let status = if run.status == ActionRunStatus::Running {
                "running"
            } else if run.attempts == 0 {
                "queued"
            } else {
                "waiting to be retried"
            };
            let message = format!(
                "action run {id} ({} for connection {}) has not finished: {status}, attempt {} of {}",
                run.request.action_name,
                run.request.connection_id,
                run.attempts.max(1),
                run.request.max_retries + 1
            );
            Err(ApiError::new(StatusCode::NOT_FOUND, "action_pending", message))
        }
    }
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RunsQuery {
    /// `waiting` (queued, or waiting to be retried), `running`, `succeeded` or `failed`.
    status: Option<String>,
    integration: Option<String>,
    connection: Option<String>,
    /// The action's name.
    action: Option<String>,
    /// At most this many (default 50, at most 1000).
    limit: Option<u32>,
    /// From `next_cursor`: runs queued before.
    cursor: Option<String>,
}

/// One asynchronous run, without its input and output (`GET /action/{id}` answers the
/// output).
#[derive(Serialize, ToSchema)]
pub struct RunView {
    id: String,
    integration: String,
    connection_id: String,
    action_name: String,
    /// `waiting`, `running`, `succeeded` or `failed`.
    status: &'static str,
    /// Claims so far (a running one's included).
    attempts: u32,
    max_retries: u32,
    created_at: chrono::DateTime<chrono::Utc>,
    /// A waiting run's next attempt; a running one's lease end.
    #[serde(skip_serializing_if = "Option::is_none")]
    run_after: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    finished_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Why it failed; while it waits for a retry, why the last attempt did.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    error: Option<ActionFailure>,
}

impl From<ActionRun> for RunView {
    fn from(run: ActionRun) -> RunView {
        let unfinished = matches!(run.status, ActionRunStatus::Waiting | ActionRunStatus::Running);
        RunView {
            id: run.id,
            integration: run.request.integration.to_string(),
            connection_id: run.request.connection_id,
            action_name: run.request.action_name,
            status: run.status.as_str(),
            attempts: run.attempts,
            max_retries: run.request.max_retries,
            created_at: run.created_at,
            run_after: unfinished.then_some(run.run_after),
            finished_at: run.finished_at,
            error: run.error,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct RunsPage {
    data: Vec<RunView>,
    /// Pass back as `cursor` for older runs; null on the last page.
    next_cursor: Option<String>,
}

/// The environment's asynchronous action runs, newest first: what waits (a backlog
/// building up), what runs, and how the others ended, for `api.async_results_kept`.
#[utoipa::path(get, operation_id = "action_runs", path = "/action/runs", tag = "actions", params(RunsQuery),
    responses((status = 200, body = RunsPage), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
async fn list(
    State(state): State<AppState>,
    Extension(environment): Extension<Environment>,
    Params(query): Params<RunsQuery>,
) -> Result<Json<RunsPage>, ApiError> {
    let limit = crate::fields::page_size(query.limit, 50)?;
    let status = query
        .status
        .as_deref()
        .map(|status| {
            ActionRunStatus::parse(status).map_err(|_| {
                ApiError::invalid(
                    "status",
                    format!("{status:?} is not one of waiting, running, succeeded, failed"),
                )
            })
        })
        .transpose()?;
    let filter = ActionRunFilter {
        status,
        integration: query.integration,
        connection_id: query.connection,
        action_name: query.action,
        before_id: query.cursor,
    };
    let runs = state.store.action_runs(environment.id, &filter, limit).await?;
    let next_cursor = (runs.len() == limit as usize)
        .then(|| runs.last().map(|run| run.id.clone()))
        .flatten();
    let data = runs.into_iter().map(RunView::from).collect();
    Ok(Json(RunsPage { data, next_cursor }))
}

/// `X-Async`'s answer.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Queued {
    id: String,
    /// Where its outcome will be: `/action/{id}`.
    status_url: String,
}

/// Why an action was not run, or failed.
fn not_run(error: TriggerError) -> ApiError {
    match error {
        TriggerError::UnknownAction(message) => ApiError::not_found(message),
        TriggerError::Busy => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", error.to_string()),
        TriggerError::Store(error) => ApiError::from(error),
        TriggerError::Setup(message) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message),
        TriggerError::Function(error) => failed(error),
    }
}

/// A failed run's answer.
fn failed(error: FunctionError) -> ApiError {
    let (status, failure) = action_failure(&error);
    ApiError::from_failure(
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        failure,
    )
}
