//! `POST /action/trigger`, Nango's: runs a deployed action (`createAction`) for a
//! connection, here in the API, and answers with what it returned. The connection comes
//! in the `Connection-Id` and `Provider-Config-Key` headers, the action and its input in
//! the body. The caller waits for the run (at most `api.action_limits.timeout`).

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use hookyard_core::keys::IntegrationKey;
use hookyard_core::providers::Catalog;
use hookyard_core::store::Environment;
use hookyard_core::{Config, Store};
use hookyard_functions::pool::Pool;
use hookyard_functions::{ErrorKind, FunctionError};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::Semaphore;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, Body, ErrorBody};
use crate::records::header;
use crate::runs::{Call, RunError, Runner};
use crate::AppState;

/// How many runs may wait for a thread, per thread.
const WAITING_PER_THREAD: usize = 4;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(trigger))
}

/// Actions' JS threads, and the room left to wait for one.
pub struct Actions {
    runner: Runner,
    pool: Pool,
    room: Semaphore,
}

impl Actions {
    pub fn new(store: Store, catalog: Arc<Catalog>, config: &Config) -> Actions {
        let threads = config.api.action_threads;
        Actions {
            runner: Runner::new(store, catalog, config),
            pool: Pool::new(threads, config.api.action_limits.clone()),
            room: Semaphore::new(threads * (1 + WAITING_PER_THREAD)),
        }
    }
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
#[utoipa::path(post, operation_id = "trigger_action", path = "/action/trigger", tag = "actions",
    params(
        ("Connection-Id" = String, Header),
        ("Provider-Config-Key" = String, Header),
        ("X-Async" = Option<bool>, Header, description = "not supported: the answer is always the run's outcome"),
    ),
    request_body = TriggerRequest,
    responses((status = 200, description = "the action's output", body = Object),
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
    if headers
        .get("X-Async")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
    {
        return Err(ApiError::invalid(
            "X-Async",
            "asynchronous actions are not supported: call without it and the answer is the action's output",
        ));
    }
    let actions = &state.actions;
    let store = actions.runner.store();
    store
        .existing_connection(environment.id, &integration, connection_id)
        .await?;
    let functions = store.functions(environment.id).await?;
    let of_integration: Vec<_> = functions.iter().filter(|f| f.integration == integration).collect();
    let Some(action) = of_integration
        .iter()
        .find(|f| f.name == request.action_name && f.config["type"] == "action")
    else {
        return Err(unknown_action(&integration, &request.action_name, &of_integration));
    };
    let Ok(_room) = actions.room.try_acquire() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "every action thread is busy and enough runs wait for one (api.action_threads); retry later",
        ));
    };
    let input: Arc<str> = request.input.to_string().into();
    let started = Instant::now();
    let outcome = actions
        .runner
        .run(&actions.pool, &environment, action, connection_id, Call::Action(input))
        .await;
    let ms = started.elapsed().as_millis() as u64;
    let name = &action.name;
    match outcome {
        Ok(effects) => {
            let logs: Vec<&str> = effects.logs.iter().map(|l| l.message.as_str()).collect();
            tracing::info!(action = %name, connection = connection_id, %integration, ms, ?logs, "action ran");
            Ok(Json(effects.output.unwrap_or(Value::Null)).into_response())
        }
        Err(RunError::Setup(error)) => {
            tracing::warn!(action = %name, connection = connection_id, %integration, %error, "action not run");
            Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("the action could not be run: {error}"),
            ))
        }
        Err(RunError::Function(error)) => {
            tracing::warn!(action = %name, connection = connection_id, %integration, ms, %error, "action failed");
            Err(failed(error))
        }
    }
}

/// The action is not deployed; what is, said.
fn unknown_action(
    integration: &IntegrationKey,
    name: &str,
    deployed: &[&hookyard_core::store::functions::DeployedSync],
) -> ApiError {
    if deployed.iter().any(|f| f.name == name) {
        return ApiError::not_found(format!(
            "{integration}'s {name} is a sync or event function, not an action (createAction)"
        ));
    }
    let actions: Vec<&str> = deployed
        .iter()
        .filter(|f| f.config["type"] == "action")
        .map(|f| f.name.as_str())
        .collect();
    let known = match actions[..] {
        [] => "it has none".to_string(),
        _ => format!("its actions: {}", actions.join(", ")),
    };
    ApiError::not_found(format!(
        "integration {integration} has no action named {name:?} ({known})"
    ))
}

/// A failed run's answer: the thrown error's type and payload where it has them (Nango's
/// codes), its first line as the message (the stack is in the log).
fn failed(error: FunctionError) -> ApiError {
    let first_line = |text: &str| text.lines().next().unwrap_or_default().to_string();
    let Some(thrown) = error.thrown.filter(|_| error.kind == ErrorKind::Thrown) else {
        return ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "action_script_failure",
            format!("{}: {}", error.kind.as_str(), first_line(&error.message)),
        );
    };
    let (status, code) = match thrown.error_type.as_str() {
        "invalid_action_input" => (StatusCode::BAD_REQUEST, "invalid_action_input"),
        "invalid_action_output" => (StatusCode::INTERNAL_SERVER_ERROR, "invalid_action_output"),
        "script_http_error" => (StatusCode::FAILED_DEPENDENCY, "script_http_error"),
        "action_script_runtime_error" => (StatusCode::INTERNAL_SERVER_ERROR, "action_script_runtime_error"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "action_script_failure"),
    };
    ApiError::new(status, code, first_line(&error.message)).with_payload(thrown.payload)
}
