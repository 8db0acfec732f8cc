//! `POST /action/trigger`, Nango's: runs a deployed action (`createAction`) for a
//! connection, here in the API, and answers with what it returned. The connection comes
//! in the `Connection-Id` and `Provider-Config-Key` headers, the action and its input in
//! the body. The caller waits for the run (at most `api.action_limits.timeout`).

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use hookyard_core::keys::IntegrationKey;
use hookyard_core::store::Environment;
use hookyard_functions::runs::TriggerError;
use hookyard_functions::{ErrorKind, FunctionError};
use serde::Deserialize;
use serde_json::Value;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, Body, ErrorBody};
use crate::records::header;
use crate::AppState;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(trigger))
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
    let output = state
        .actions
        .trigger(
            environment.id,
            &integration,
            connection_id,
            &request.action_name,
            &request.input,
        )
        .await
        .map_err(|error| match error {
            TriggerError::UnknownAction(message) => ApiError::not_found(message),
            TriggerError::Busy => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", error.to_string()),
            TriggerError::Store(error) => ApiError::from(error),
            TriggerError::Setup(message) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message),
            TriggerError::Function(error) => failed(error),
        })?;
    Ok(Json(output.unwrap_or(Value::Null)).into_response())
}

/// A failed run's answer: the thrown error's type and payload where it has them (Nango's
/// codes), its first line as the message (the stack is in the log).
fn failed(error: FunctionError) -> ApiError {
    let first_line = |text: &str| text.lines().next().unwrap_or_default().to_string();
    let Some(thrown) = error.thrown.clone().filter(|_| error.kind == ErrorKind::Thrown) else {
        return ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "action_script_failure",
            error.summary(),
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
