//! `/connections`: customer accounts under an integration, in Nango's shapes. Older
//! clients use the singular `/connection…` paths; `lib.rs` maps those onto these.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use hookyard_core::keys::IntegrationKey;
use hookyard_core::store::connection_events::POST_CREATION;
use hookyard_core::store::{
    Connection, ConnectionChanges, ConnectionQuery, Credentials, Environment, MetadataWrite, NewConnection, StoreError,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::time::Duration;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, Body, ErrorBody, Params};
use crate::fields;
use crate::{AppState, Success};
use hookyard_functions::token_refresh::fresh_credentials;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(get, delete))
        .routes(routes!(replace_metadata, merge_metadata))
}

const MAX_CONNECTION_ID: usize = 255;
const MAX_METADATA_TARGETS: usize = 1000;

#[derive(Serialize, ToSchema)]
pub struct ConnectionView {
    id: i64,
    connection_id: String,
    provider_config_key: String,
    provider: String,
    /// The identifiers webhooks are routed by (`portalId`, `team_id`, `installation_id`, …).
    #[schema(value_type = Object)]
    connection_config: Value,
    #[schema(value_type = Object)]
    metadata: Value,
    #[schema(value_type = Object)]
    tags: Value,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    /// Only when one connection is read.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    credentials: Option<Credentials>,
    /// What stops it working (as Nango lists them): `auth`, an OAuth2 refresh the
    /// provider refused, until credentials are stored again.
    errors: Vec<ConnectionError>,
    /// While the provider's rate limit holds the connection's calls (a 429 or the
    /// provider's own limit answer): when it ends. Null otherwise.
    rate_limited_until: Option<DateTime<Utc>>,
}

#[derive(Serialize, ToSchema)]
pub struct ConnectionError {
    /// `auth`.
    #[serde(rename = "type")]
    kind: &'static str,
    /// The token URL's answer.
    description: String,
    /// The first refused refresh since the credentials were stored.
    failed_at: DateTime<Utc>,
}

impl ConnectionView {
    fn new(connection: Connection, with_credentials: bool) -> ConnectionView {
        ConnectionView {
            id: connection.row_id,
            connection_id: connection.connection_id,
            provider_config_key: connection.provider_config_key.into(),
            provider: connection.provider,
            connection_config: connection.connection_config,
            metadata: connection.metadata,
            tags: connection.tags,
            created_at: connection.created_at,
            updated_at: connection.updated_at,
            credentials: if with_credentials { connection.credentials } else { None },
            errors: connection
                .refresh_failure
                .into_iter()
                .map(|failure| ConnectionError {
                    kind: "auth",
                    description: failure.error,
                    failed_at: failure.failed_at,
                })
                .collect(),
            rate_limited_until: connection.rate_limited_until.filter(|until| *until > Utc::now()),
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct ConnectionList {
    connections: Vec<ConnectionView>,
    /// The `page` to ask for next; null on the last page.
    next_page: Option<u64>,
}

#[derive(Deserialize, ToSchema)]
pub struct CreateConnection {
    provider_config_key: String,
    /// Up to 255 characters; a UUID is made when absent.
    connection_id: Option<String>,
    #[schema(value_type = Option<Object>)]
    connection_config: Option<Value>,
    #[schema(value_type = Option<Object>)]
    metadata: Option<Value>,
    /// `{type: "API_KEY", apiKey}`, `{type: "BASIC", username, password}` or
    /// `{type: "OAUTH2", access_token, refresh_token?, expires_at?, raw?}`. Stored encrypted.
    #[schema(value_type = Option<Object>)]
    credentials: Option<Value>,
    /// String values only.
    #[schema(value_type = Option<Object>)]
    tags: Option<Value>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Only connections of this integration (also accepted as `integrationId`, `provider_config_key`).
    #[serde(alias = "integrationId", alias = "provider_config_key")]
    integration_id: Option<String>,
    /// Only this connection id (also `connectionId`).
    #[serde(alias = "connectionId")]
    connection_id: Option<String>,
    /// A case-insensitive part of the connection id.
    search: Option<String>,
    /// 1–1000, default 100.
    limit: Option<u32>,
    /// 0-based page of `limit` connections.
    page: Option<u64>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct GetParams {
    /// The integration the connection belongs to (required).
    provider_config_key: Option<String>,
    /// Refresh an OAuth2 token even if it does not expire soon.
    force_refresh: Option<bool>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct KeyParam {
    /// The integration the connection belongs to (required).
    provider_config_key: Option<String>,
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, ToSchema)]
pub struct MetadataRequest {
    #[schema(value_type = OneOrMany)]
    connection_id: OneOrMany,
    provider_config_key: String,
    #[schema(value_type = Object)]
    metadata: Value,
}

#[derive(Serialize, ToSchema)]
pub struct MetadataResponse {
    connection_id: OneOrMany,
    provider_config_key: String,
    #[schema(value_type = Object)]
    metadata: Map<String, Value>,
}

fn integration_key(field: &str, text: &str) -> Result<IntegrationKey, ApiError> {
    text.parse().map_err(|e| ApiError::invalid(field, e))
}

pub(crate) fn required_key(param: KeyParam) -> Result<IntegrationKey, ApiError> {
    let text = param
        .provider_config_key
        .ok_or_else(|| ApiError::invalid("provider_config_key", "is required"))?;
    integration_key("provider_config_key", &text)
}

/// List the environment's live connections, oldest first.
#[utoipa::path(get, operation_id = "list_connections", path = "/connections", tag = "connections", params(ListParams),
    responses((status = 200, body = ConnectionList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
async fn list(
    State(state): State<AppState>,
    Extension(environment): Extension<Environment>,
    Params(params): Params<ListParams>,
) -> Result<Json<ConnectionList>, ApiError> {
    let limit = crate::fields::page_size(params.limit, 100)?;
    let page = params.page.unwrap_or(0);
    let query = ConnectionQuery {
        integration: params
            .integration_id
            .map(|key| integration_key("integration_id", &key))
            .transpose()?,
        connection_id: params.connection_id,
        search: params.search.filter(|s| !s.is_empty()),
        // One more than asked tells whether a next page exists.
        limit: limit + 1,
        offset: page.saturating_mul(u64::from(limit)),
    };
    let mut connections = state.store.connections(environment.id, &query).await?;
    let more = connections.len() > limit as usize;
    connections.truncate(limit as usize);
    Ok(Json(ConnectionList {
        connections: connections.into_iter().map(|c| ConnectionView::new(c, false)).collect(),
        next_page: more.then_some(page + 1),
    }))
}

/// Create (import) a connection, or change one that exists (an upsert, as Nango's
/// import: each field given replaces the stored one; new credentials are how a connection
/// whose refresh was refused is authorized again).
#[utoipa::path(post, operation_id = "create_connection", path = "/connections", tag = "connections", request_body = CreateConnection,
    responses((status = 201, body = ConnectionView, description = "created"),
              (status = 200, body = ConnectionView, description = "an existing connection changed"),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 404, body = ErrorBody, description = "unknown integration"), (status = 409, body = ErrorBody)))]
async fn create(
    State(state): State<AppState>,
    Extension(environment): Extension<Environment>,
    Body(body): Body<CreateConnection>,
) -> Result<(StatusCode, Json<ConnectionView>), ApiError> {
    let credentials = body.credentials.filter(|c| !c.is_null());
    // Said with the time expected: chrono's own text names neither field nor format.
    if let Some(at) = credentials.as_ref().and_then(|c| c.get("expires_at")?.as_str()) {
        fields::parse_time(at).map_err(|e| ApiError::invalid("credentials.expires_at", e))?;
    }
    let credentials = credentials
        .map(serde_json::from_value::<Credentials>)
        .transpose()
        .map_err(|e| ApiError::invalid("credentials", e))?;
    let given = |value: &Option<Value>| value.as_ref().is_some_and(|v| !v.is_null());
    let given = (given(&body.connection_config), given(&body.metadata), given(&body.tags));
    let new = NewConnection {
        integration: integration_key("provider_config_key", &body.provider_config_key)?,
        connection_id: match body.connection_id {
            Some(id) => fields::text("connection_id", id, MAX_CONNECTION_ID)?,
            None => uuid_v4(),
        },
        connection_config: Value::Object(fields::object("connection_config", body.connection_config)?),
        metadata: Value::Object(fields::object("metadata", body.metadata)?),
        tags: Value::Object(fields::tags(body.tags)?),
        credentials,
    };
    let changes = ConnectionChanges {
        connection_config: given.0.then(|| new.connection_config.clone()),
        metadata: given.1.then(|| new.metadata.clone()),
        tags: given.2.then(|| new.tags.clone()),
        credentials: new.credentials.clone(),
    };
    // Twice at most: a connection created by another request between the two is changed.
    for _ in 0..2 {
        if let Some(changed) = state
            .store
            .update_connection(environment.id, &new.integration, &new.connection_id, &changes)
            .await?
        {
            return Ok((StatusCode::OK, Json(ConnectionView::new(changed, false))));
        }
        let claimed_until = Utc::now() + crate::events::CLAIM;
        match state
            .store
            .create_connection_owing(&environment, &new, POST_CREATION, claimed_until)
            .await
        {
            Ok((connection, owed)) => {
                // After the answer is on its way: registering a webhook need not hold the
                // caller. Owed since the commit, so an API that stops meanwhile leaves it
                // to another's sweep.
                let events = state.events.clone();
                tokio::spawn(async move { events.run_owed(&owed).await });
                return Ok((StatusCode::CREATED, Json(ConnectionView::new(connection, false))));
            }
            Err(StoreError::Conflict(_)) => continue,
            Err(error) => return Err(error.into()),
        }
    }
    Err(ApiError::new(
        StatusCode::CONFLICT,
        "conflict",
        "the connection was created and deleted by other requests meanwhile; try again",
    ))
}

/// Get one connection, with its credentials: an OAuth2 token that expires within 30 s
/// (or any, with `force_refresh=true`) is refreshed first, as Nango does, so that the
/// caller can use it at once.
#[utoipa::path(get, operation_id = "get_connection", path = "/connections/{connection_id}", tag = "connections",
    params(("connection_id" = String, Path), GetParams),
    responses((status = 200, body = ConnectionView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 404, body = ErrorBody),
              (status = 424, body = ErrorBody, description = "the provider refused the refresh: the connection needs new credentials"),
              (status = 502, body = ErrorBody, description = "the token URL could not refresh the token now")))]
async fn get(
    State(state): State<AppState>,
    Extension(environment): Extension<Environment>,
    Path(connection_id): Path<String>,
    Params(params): Params<GetParams>,
) -> Result<Json<ConnectionView>, ApiError> {
    let key = required_key(KeyParam {
        provider_config_key: params.provider_config_key,
    })?;
    let mut connection = state
        .store
        .existing_connection(environment.id, &key, &connection_id)
        .await?;
    let integration = state.store.existing_integration(environment.id, &key).await?;
    let force = params.force_refresh.unwrap_or(false);
    connection.credentials = fresh_credentials(
        &state.store,
        &state.catalog,
        &integration,
        &connection,
        &state.forwarding,
        force,
    )
    .await
    .map_err(|e| {
        let (status, code) = if e.refused {
            (StatusCode::FAILED_DEPENDENCY, "refresh_token_external_error")
        } else {
            (StatusCode::BAD_GATEWAY, "refresh_failed")
        };
        ApiError::new(status, code, e.message)
    })?;
    Ok(Json(ConnectionView::new(connection, true)))
}

/// Delete a connection: it is never routed to again.
#[utoipa::path(delete, operation_id = "delete_connection", path = "/connections/{connection_id}", tag = "connections",
    params(("connection_id" = String, Path), KeyParam),
    responses((status = 200, body = Success), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 404, body = ErrorBody)))]
async fn delete(
    State(state): State<AppState>,
    Extension(environment): Extension<Environment>,
    Path(connection_id): Path<String>,
    Params(param): Params<KeyParam>,
) -> Result<Json<Success>, ApiError> {
    let key = required_key(param)?;
    // While the connection still exists, so that it can unregister what it registered.
    if state
        .store
        .connection(environment.id, &key, &connection_id)
        .await?
        .is_some()
    {
        let events = state
            .events
            .run(&environment, &key, &connection_id, "pre-connection-deletion");
        match tokio::time::timeout(crate::events::EVENT_TIMEOUT + Duration::from_secs(1), events).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, connection = %connection_id, "pre-connection-deletion functions could not be loaded; deleting anyway")
            }
            Err(_) => {
                tracing::warn!(connection = %connection_id, "pre-connection-deletion functions did not finish; deleting anyway")
            }
        }
    }
    if !state
        .store
        .delete_connection(environment.id, &key, &connection_id)
        .await?
    {
        return Err(ApiError::not_found(format!(
            "connection {connection_id} of integration {key} does not exist"
        )));
    }
    Ok(Json(Success { success: true }))
}

/// Replace the metadata of one or more connections (all or none).
#[utoipa::path(post, operation_id = "set_connection_metadata", path = "/connections/metadata", tag = "connections", request_body = MetadataRequest,
    responses((status = 200, body = MetadataResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 404, body = ErrorBody)))]
async fn replace_metadata(
    state: State<AppState>,
    environment: Extension<Environment>,
    body: Body<MetadataRequest>,
) -> Result<Json<MetadataResponse>, ApiError> {
    write_metadata(state, environment, body, MetadataWrite::Replace).await
}

/// Merge top-level keys into the metadata of one or more connections (all or none).
#[utoipa::path(patch, operation_id = "update_connection_metadata", path = "/connections/metadata", tag = "connections", request_body = MetadataRequest,
    responses((status = 200, body = MetadataResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 404, body = ErrorBody)))]
async fn merge_metadata(
    state: State<AppState>,
    environment: Extension<Environment>,
    body: Body<MetadataRequest>,
) -> Result<Json<MetadataResponse>, ApiError> {
    write_metadata(state, environment, body, MetadataWrite::Merge).await
}

async fn write_metadata(
    State(state): State<AppState>,
    Extension(environment): Extension<Environment>,
    Body(body): Body<MetadataRequest>,
    how: MetadataWrite,
) -> Result<Json<MetadataResponse>, ApiError> {
    let key = integration_key("provider_config_key", &body.provider_config_key)?;
    let metadata = match body.metadata {
        Value::Object(map) => map,
        _ => return Err(ApiError::invalid("metadata", "must be a JSON object")),
    };
    let ids = match &body.connection_id {
        OneOrMany::One(id) => vec![id.clone()],
        OneOrMany::Many(ids) => ids.clone(),
    };
    if ids.is_empty() || ids.len() > MAX_METADATA_TARGETS {
        return Err(ApiError::invalid(
            "connection_id",
            format!("give 1 to {MAX_METADATA_TARGETS} connection ids"),
        ));
    }
    state
        .store
        .set_connection_metadata(environment.id, &key, &ids, &metadata, how)
        .await?;
    Ok(Json(MetadataResponse {
        connection_id: body.connection_id,
        provider_config_key: key.into(),
        metadata,
    }))
}

fn uuid_v4() -> String {
    uuid::Uuid::new_v4().to_string()
}
