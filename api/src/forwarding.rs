//! `/forwarding`: where the environment's events and sync notifications are forwarded
//! (up to two URLs) and the key they are signed with; `/connections/{id}/forwarding`:
//! one connection's override of them. A URL set again after it answered 410 is enabled
//! again.

use axum::extract::{Path, State};
use axum::{Extension, Json};
use hookyard_core::config::ForwardingConfig;
use hookyard_core::keys::IntegrationKey;
use hookyard_core::outbound::{allowed_destination, checked_url, Refusal};
use hookyard_core::store::forwarding::{ForwardingScope, ForwardingSettings, MAX_URLS};
use hookyard_core::store::Environment;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::connections::{required_key, KeyParam};
use crate::error::{ApiError, Body, ErrorBody, Params};
use crate::fields::present;
use crate::{AppState, Data};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(get_environment, set_environment))
        .routes(routes!(get_connection, set_connection))
}

#[derive(Deserialize, ToSchema)]
pub struct ForwardingRequest {
    /// Up to two http(s) URLs; empty turns forwarding off.
    urls: Vec<String>,
    /// The key forwards are signed with; absent or `null`: the environment's secret key
    /// (for a connection: the environment's signing key).
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    webhook_signing_key: Option<Option<String>>,
    /// Send sync notifications after runs that changed nothing too (environment only).
    #[serde(default)]
    always_notify: bool,
    /// Announce each finished asynchronous action (`type: "async_action"`; environment
    /// only). Default true.
    #[serde(default = "yes")]
    async_action_webhooks: bool,
    /// Announce each OAuth2 refresh a provider refused (`type: "auth"`, `operation:
    /// "refresh"`; environment only). Default true.
    #[serde(default = "yes")]
    auth_webhooks: bool,
}

fn yes() -> bool {
    true
}

#[derive(Serialize, ToSchema)]
pub struct ForwardingView {
    urls: Vec<String>,
    /// Whether a signing key of its own is set (it is never returned).
    has_signing_key: bool,
    always_notify: bool,
    async_action_webhooks: bool,
    auth_webhooks: bool,
    /// After a `PUT`: the URLs whose deliveries would not go through as their names
    /// resolve now (a name that does not resolve, or resolves to an address the
    /// configuration refuses), and why. They are set all the same: names change.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    warnings: Vec<String>,
}

/// The settings of a request, each URL checked as far as it can be without resolving
/// its name (a name is checked before each attempt).
fn settings(body: ForwardingRequest, allowed: &ForwardingConfig) -> Result<ForwardingSettings, ApiError> {
    if body.urls.len() > MAX_URLS {
        return Err(ApiError::invalid("urls", format!("at most {MAX_URLS} URLs")));
    }
    let mut seen = Vec::with_capacity(body.urls.len());
    for url in &body.urls {
        let parsed = checked_url(url, allowed).map_err(|e| ApiError::invalid("urls", format!("{url:?}: {e}")))?;
        if seen.contains(&parsed) {
            return Err(ApiError::invalid("urls", format!("{url:?} is given twice")));
        }
        seen.push(parsed);
    }
    let signing_key = body.webhook_signing_key.flatten();
    if signing_key.as_deref().is_some_and(|k| k.len() < 16) {
        return Err(ApiError::invalid(
            "webhook_signing_key",
            "must be at least 16 characters",
        ));
    }
    Ok(ForwardingSettings {
        urls: body.urls,
        signing_key,
        always_notify: body.always_notify,
        async_action_webhooks: body.async_action_webhooks,
        auth_webhooks: body.auth_webhooks,
    })
}

fn view(settings: Option<ForwardingSettings>) -> ForwardingView {
    let settings = settings.unwrap_or_default();
    ForwardingView {
        urls: settings.urls,
        has_signing_key: settings.signing_key.is_some(),
        always_notify: settings.always_notify,
        async_action_webhooks: settings.async_action_webhooks,
        auth_webhooks: settings.auth_webhooks,
        warnings: Vec::new(),
    }
}

/// [`view`] of settings just set, with the check each delivery makes before its
/// attempt run on them now: a typo in a name, or a name of the internal network, is
/// said when it is set rather than found in the dead letters.
async fn view_of_set(settings: ForwardingSettings, allowed: &ForwardingConfig) -> ForwardingView {
    let mut warnings = Vec::new();
    for url in &settings.urls {
        match allowed_destination(url, allowed).await {
            Ok(()) => {}
            Err(Refusal::Forbidden(why)) => warnings.push(format!(
                "{url}: {why}; deliveries to it are refused (dead-lettered) while it does"
            )),
            Err(Refusal::Unresolved(why)) => warnings.push(format!(
                "{url}: {why}; deliveries to it fail and are retried until it does"
            )),
        }
    }
    ForwardingView {
        warnings,
        ..view(Some(settings))
    }
}

/// The environment's forwarding.
#[utoipa::path(get, operation_id = "get_forwarding", path = "/forwarding", tag = "forwarding",
    responses((status = 200, body = Data<ForwardingView>), (status = 401, body = ErrorBody)))]
async fn get_environment(
    State(state): State<AppState>,
    Extension(environment): Extension<Environment>,
) -> Result<Json<Data<ForwardingView>>, ApiError> {
    let settings = state
        .store
        .forwarding(environment.id, ForwardingScope::Environment)
        .await?;
    Ok(Json(Data { data: view(settings) }))
}

/// Set the environment's forwarding URLs, signing key and notifications.
#[utoipa::path(put, operation_id = "set_forwarding", path = "/forwarding", tag = "forwarding",
    request_body = ForwardingRequest,
    responses((status = 200, body = Data<ForwardingView>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
async fn set_environment(
    State(state): State<AppState>,
    Extension(environment): Extension<Environment>,
    Body(body): Body<ForwardingRequest>,
) -> Result<Json<Data<ForwardingView>>, ApiError> {
    let settings = settings(body, &state.forwarding)?;
    state
        .store
        .set_forwarding(environment.id, ForwardingScope::Environment, &settings)
        .await?;
    Ok(Json(Data {
        data: view_of_set(settings, &state.forwarding).await,
    }))
}

/// The integration of a connection that exists (400 without one, 404 when it does not).
async fn existing_connection(
    state: &AppState,
    environment: &Environment,
    connection_id: &str,
    param: KeyParam,
) -> Result<IntegrationKey, ApiError> {
    let key = required_key(param)?;
    state
        .store
        .existing_connection(environment.id, &key, connection_id)
        .await?;
    Ok(key)
}

/// One connection's forwarding override (`urls: []` and no key when it has none).
#[utoipa::path(get, operation_id = "get_connection_forwarding", path = "/connections/{connection_id}/forwarding",
    tag = "forwarding", params(("connection_id" = String, Path), KeyParam),
    responses((status = 200, body = Data<ForwardingView>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 404, body = ErrorBody)))]
async fn get_connection(
    State(state): State<AppState>,
    Extension(environment): Extension<Environment>,
    Path(connection_id): Path<String>,
    Params(param): Params<KeyParam>,
) -> Result<Json<Data<ForwardingView>>, ApiError> {
    let key = existing_connection(&state, &environment, &connection_id, param).await?;
    let settings = state
        .store
        .forwarding(environment.id, ForwardingScope::Connection(&key, &connection_id))
        .await?;
    Ok(Json(Data { data: view(settings) }))
}

/// Forward this connection's events to its own URLs (and sign them with its own key).
#[utoipa::path(put, operation_id = "set_connection_forwarding", path = "/connections/{connection_id}/forwarding",
    tag = "forwarding", params(("connection_id" = String, Path), KeyParam), request_body = ForwardingRequest,
    responses((status = 200, body = Data<ForwardingView>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 404, body = ErrorBody)))]
async fn set_connection(
    State(state): State<AppState>,
    Extension(environment): Extension<Environment>,
    Path(connection_id): Path<String>,
    Params(param): Params<KeyParam>,
    Body(body): Body<ForwardingRequest>,
) -> Result<Json<Data<ForwardingView>>, ApiError> {
    let key = existing_connection(&state, &environment, &connection_id, param).await?;
    let settings = settings(body, &state.forwarding)?;
    state
        .store
        .set_forwarding(
            environment.id,
            ForwardingScope::Connection(&key, &connection_id),
            &settings,
        )
        .await?;
    Ok(Json(Data {
        data: view_of_set(settings, &state.forwarding).await,
    }))
}
