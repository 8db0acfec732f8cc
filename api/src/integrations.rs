//! `/integrations`: one provider set up in the environment. Responses wrap in `{data}`
//! as Nango's public API does.

use axum::extract::{Path, State};
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use hookyard_core::keys::IntegrationKey;
use hookyard_core::store::{Environment, Integration, IntegrationChanges, NewIntegration};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, Body, ErrorBody};
use crate::fields::{self, present};
use crate::{AppState, Data, Success};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(get, update, delete))
}

#[derive(Serialize, ToSchema)]
pub struct IntegrationView {
    unique_key: String,
    provider: String,
    display_name: Option<String>,
    #[schema(value_type = Object)]
    settings: serde_json::Value,
    /// Whether this integration's webhooks are forwarded to your app.
    forward_webhooks: bool,
    /// Whether a webhook secret is set (the secret itself is never returned).
    has_webhook_secret: bool,
    /// Whether an OAuth2 client secret is set (never returned either).
    has_oauth_client_secret: bool,
    /// Where the provider must send this integration's webhooks.
    webhook_url: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl IntegrationView {
    fn new(state: &AppState, environment: &Environment, integration: Integration) -> IntegrationView {
        IntegrationView {
            webhook_url: environment.webhook_url(&state.webhook_base_url, integration.unique_key.as_str()),
            unique_key: integration.unique_key.into(),
            provider: integration.provider,
            display_name: integration.display_name,
            settings: integration.settings,
            forward_webhooks: integration.forward_webhooks,
            has_webhook_secret: integration.webhook_secret.is_some(),
            has_oauth_client_secret: integration.oauth_client_secret.is_some(),
            created_at: integration.created_at,
            updated_at: integration.updated_at,
        }
    }
}

#[derive(Deserialize, ToSchema)]
pub struct CreateIntegration {
    /// 1–64 characters from a-z, A-Z, 0-9, `-` and `_`; the provider config key.
    unique_key: String,
    /// The provider catalog entry (`github`, `hubspot`, …) or `generic`.
    provider: String,
    display_name: Option<String>,
    /// The secret the provider signs webhooks with.
    webhook_secret: Option<String>,
    /// The OAuth2 client secret exec refreshes connections' tokens with (sealed at rest;
    /// the client id and token URL go in `settings.api`).
    oauth_client_secret: Option<String>,
    /// Default true.
    forward_webhooks: Option<bool>,
    /// Provider settings; a custom integration may give its own `signature`,
    /// `routing`, `event_type` and `batch` here (same shapes as `providers/*.toml`).
    #[schema(value_type = Option<Object>)]
    settings: Option<serde_json::Value>,
}

/// Every field optional; `null` clears `display_name`, `webhook_secret` or
/// `oauth_client_secret`.
#[derive(Deserialize, ToSchema)]
pub struct UpdateIntegration {
    provider: Option<String>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    display_name: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    webhook_secret: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    oauth_client_secret: Option<Option<String>>,
    forward_webhooks: Option<bool>,
    /// Replaces the settings (see `CreateIntegration`).
    #[schema(value_type = Option<Object>)]
    settings: Option<serde_json::Value>,
    /// Cannot change: webhook URLs and records are keyed by it. Sending a different one is a 400.
    unique_key: Option<String>,
}

fn key(text: &str) -> Result<IntegrationKey, ApiError> {
    text.parse().map_err(|e| ApiError::invalid("unique_key", e))
}

/// A provider name: one of the catalog's, or a custom provider's own. A catalog name
/// written otherwise (`GitHub`) is refused: as a custom name it would get the generic
/// provider's rules (no signature, every connection) without a word.
fn provider_name(state: &AppState, text: String) -> Result<String, ApiError> {
    let provider = fields::text("provider", text, 64)?;
    if let Some((known, 0)) = state.catalog.closest(&provider) {
        return Err(ApiError::invalid(
            "provider",
            format!("{provider:?} is not in the catalog; did you mean {known:?}?"),
        ));
    }
    Ok(provider)
}

/// A webhook secret is refused where nothing would check it (the generic provider, or a
/// custom one without `settings.signature`): every webhook would be accepted while its
/// owner takes them for verified.
fn check_secret_is_checked(state: &AppState, provider: &str, settings: &serde_json::Value) -> Result<(), ApiError> {
    let rules = state
        .catalog
        .resolve(provider, settings)
        .map_err(|e| ApiError::invalid("settings", e))?;
    if rules.signature.is_some() {
        return Ok(());
    }
    let known = match state.catalog.closest(provider) {
        Some((near, _)) => format!(", which is not in the catalog (did you mean {near:?}?),"),
        None if state.catalog.get(provider).is_none() => ", which is not in the catalog,".into(),
        None => String::new(),
    };
    Err(ApiError::invalid(
        "webhook_secret",
        format!(
            "provider {provider:?}{known} verifies no signature, so the secret would never be checked; \
             a custom provider declares settings.signature (as generic-hmac does)"
        ),
    ))
}

/// Settings must be an object the provider catalog accepts (a custom `signature` or
/// `routing` is checked here, not when the first webhook arrives).
fn checked_settings(
    state: &AppState,
    provider: &str,
    settings: Option<serde_json::Value>,
) -> Result<Option<serde_json::Value>, ApiError> {
    let Some(settings) = settings else { return Ok(None) };
    if !settings.is_object() {
        return Err(ApiError::invalid("settings", "must be a JSON object"));
    }
    state
        .catalog
        .resolve(provider, &settings)
        .map_err(|e| ApiError::invalid("settings", e))?;
    // `settings.api` is checked now too, not when the first exec runs.
    let provider_api = state.catalog.get(provider).and_then(|p| p.api.as_ref());
    hookyard_core::providers::api::ApiSpec::for_integration(provider_api, &settings, None)
        .map_err(|e| ApiError::invalid("settings", e))?;
    Ok(Some(settings))
}

/// List the environment's integrations.
#[utoipa::path(get, operation_id = "list_integrations", path = "/integrations", tag = "integrations",
    responses((status = 200, body = Data<Vec<IntegrationView>>), (status = 401, body = ErrorBody)))]
async fn list(
    State(state): State<AppState>,
    Extension(environment): Extension<Environment>,
) -> Result<Json<Data<Vec<IntegrationView>>>, ApiError> {
    let integrations = state.store.integrations(Some(environment.id)).await?;
    let views = integrations
        .into_iter()
        .map(|i| IntegrationView::new(&state, &environment, i))
        .collect();
    Ok(Json(Data { data: views }))
}

/// Create an integration.
#[utoipa::path(post, operation_id = "create_integration", path = "/integrations", tag = "integrations", request_body = CreateIntegration,
    responses((status = 200, body = Data<IntegrationView>), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn create(
    State(state): State<AppState>,
    Extension(environment): Extension<Environment>,
    Body(body): Body<CreateIntegration>,
) -> Result<Json<Data<IntegrationView>>, ApiError> {
    let provider = provider_name(&state, body.provider)?;
    let settings = checked_settings(&state, &provider, body.settings)?.unwrap_or_else(|| serde_json::json!({}));
    let webhook_secret = fields::optional_text("webhook_secret", body.webhook_secret, 1024)?;
    if webhook_secret.is_some() {
        check_secret_is_checked(&state, &provider, &settings)?;
    }
    let new = NewIntegration {
        display_name: fields::optional_text("display_name", body.display_name, 255)?,
        settings,
        webhook_secret,
        oauth_client_secret: fields::optional_text("oauth_client_secret", body.oauth_client_secret, 1024)?,
        forward_webhooks: body.forward_webhooks.unwrap_or(true),
        ..NewIntegration::new(key(&body.unique_key)?, provider)
    };
    let integration = state.store.create_integration(&environment, &new).await?;
    Ok(Json(Data {
        data: IntegrationView::new(&state, &environment, integration),
    }))
}

/// Get one integration, with the URL its webhooks go to.
#[utoipa::path(get, operation_id = "get_integration", path = "/integrations/{unique_key}", tag = "integrations",
    params(("unique_key" = String, Path)),
    responses((status = 200, body = Data<IntegrationView>), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn get(
    State(state): State<AppState>,
    Extension(environment): Extension<Environment>,
    Path(unique_key): Path<String>,
) -> Result<Json<Data<IntegrationView>>, ApiError> {
    let integration = state
        .store
        .existing_integration(environment.id, &key(&unique_key)?)
        .await?;
    Ok(Json(Data {
        data: IntegrationView::new(&state, &environment, integration),
    }))
}

/// Change an integration's provider, display name, webhook secret or forwarding.
#[utoipa::path(patch, operation_id = "update_integration", path = "/integrations/{unique_key}", tag = "integrations",
    params(("unique_key" = String, Path)), request_body = UpdateIntegration,
    responses((status = 200, body = Data<IntegrationView>), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn update(
    State(state): State<AppState>,
    Extension(environment): Extension<Environment>,
    Path(unique_key): Path<String>,
    Body(body): Body<UpdateIntegration>,
) -> Result<Json<Data<IntegrationView>>, ApiError> {
    let current = key(&unique_key)?;
    if body.unique_key.as_deref().is_some_and(|k| k != current.as_str()) {
        return Err(ApiError::invalid(
            "unique_key",
            "an integration's key cannot change; create a new integration instead",
        ));
    }
    let existing = state.store.existing_integration(environment.id, &current).await?;
    let provider = body.provider.map(|p| provider_name(&state, p)).transpose()?;
    let settings = checked_settings(&state, provider.as_deref().unwrap_or(&existing.provider), body.settings)?;
    let webhook_secret = body
        .webhook_secret
        .map(|secret| fields::optional_text("webhook_secret", secret, 1024))
        .transpose()?;
    // What the integration becomes, when this changes what checks its webhooks.
    if provider.is_some() || settings.is_some() || webhook_secret.is_some() {
        let has_secret = webhook_secret
            .as_ref()
            .map_or(existing.webhook_secret.is_some(), Option::is_some);
        if has_secret {
            check_secret_is_checked(
                &state,
                provider.as_deref().unwrap_or(&existing.provider),
                settings.as_ref().unwrap_or(&existing.settings),
            )?;
        }
    }
    let changes = IntegrationChanges {
        provider,
        settings,
        display_name: body
            .display_name
            .map(|name| fields::optional_text("display_name", name, 255))
            .transpose()?,
        webhook_secret,
        oauth_client_secret: body
            .oauth_client_secret
            .map(|secret| fields::optional_text("oauth_client_secret", secret, 1024))
            .transpose()?,
        forward_webhooks: body.forward_webhooks,
    };
    let integration = state
        .store
        .update_integration(environment.id, &current, &changes)
        .await?;
    Ok(Json(Data {
        data: IntegrationView::new(&state, &environment, integration),
    }))
}

/// Delete an integration and its connections.
#[utoipa::path(delete, operation_id = "delete_integration", path = "/integrations/{unique_key}", tag = "integrations",
    params(("unique_key" = String, Path)),
    responses((status = 200, body = Success), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn delete(
    State(state): State<AppState>,
    Extension(environment): Extension<Environment>,
    Path(unique_key): Path<String>,
) -> Result<Json<Success>, ApiError> {
    let key = key(&unique_key)?;
    if !state.store.delete_integration(environment.id, &key).await? {
        return Err(ApiError::not_found(format!("integration {key} does not exist")));
    }
    Ok(Json(Success { success: true }))
}
