//! `/functions`: deploying a functions project and listing the live syncs. A deploy is
//! compiled here (QuickJS bytecode, configs read) and stored in one transaction; workers
//! pick the new versions up without a restart.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use hookyard_core::store::functions::{DeployedChange, DeployedSync};
use hookyard_core::store::Environment;
use hookyard_functions::compile::compile_project;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, Body, ErrorBody};
use crate::{AppState, Data};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(deploy))
        // A project's sources, larger than the 2 MiB axum allows a body by default.
        .layer(axum::extract::DefaultBodyLimit::max(MAX_DEPLOY_BYTES))
}

/// The largest deploy request.
const MAX_DEPLOY_BYTES: usize = 16 * 1024 * 1024;

#[derive(Deserialize, ToSchema)]
pub struct DeployRequest {
    /// The project's files: path (such as `hubspot/syncs/contacts.ts`) → source,
    /// JavaScript or TypeScript (types erased in place). A sync lives at
    /// `{integration}/syncs/{name}.ts` (or `.js`); an optional `index.ts` (or `index.js`)
    /// imports the syncs to deploy.
    files: BTreeMap<String, String>,
}

#[derive(Serialize, ToSchema)]
pub struct SyncView {
    integration: String,
    name: String,
    /// `sync`, `action` (run by `POST /action/trigger`) or `on-event`.
    #[serde(rename = "type")]
    kind: String,
    version: i32,
    /// Event types (or `*`) whose webhooks run `onWebhook`.
    webhook_subscriptions: Vec<String>,
    frequency: Option<String>,
    models: Vec<String>,
    description: Option<String>,
    code_hash: String,
    deployed_at: DateTime<Utc>,
}

impl From<DeployedSync> for SyncView {
    fn from(sync: DeployedSync) -> SyncView {
        let strings = |key: &str| -> Vec<String> {
            sync.config[key]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
                .unwrap_or_default()
        };
        let text = |key: &str| sync.config[key].as_str().map(String::from);
        SyncView {
            kind: text("type").unwrap_or_else(|| "sync".into()),
            webhook_subscriptions: strings("webhookSubscriptions"),
            models: strings("models"),
            frequency: text("frequency"),
            description: text("description"),
            integration: sync.integration.to_string(),
            name: sync.name,
            version: sync.version,
            code_hash: sync.code_hash,
            deployed_at: sync.deployed_at,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct ChangeView {
    integration: String,
    name: String,
    version: i32,
    /// `added`, `updated`, `unchanged` or `removed`.
    change: String,
}

impl From<DeployedChange> for ChangeView {
    fn from(change: DeployedChange) -> ChangeView {
        ChangeView {
            change: serde_json::to_value(change.change)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
            integration: change.integration,
            name: change.name,
            version: change.version,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct DeployView {
    changes: Vec<ChangeView>,
    syncs: Vec<SyncView>,
}

/// The environment's live syncs.
#[utoipa::path(get, operation_id = "list_functions", path = "/functions", tag = "functions",
    responses((status = 200, body = Data<Vec<SyncView>>), (status = 401, body = ErrorBody)))]
async fn list(
    State(state): State<AppState>,
    Extension(environment): Extension<Environment>,
) -> Result<Json<Data<Vec<SyncView>>>, ApiError> {
    let syncs = state.store.functions(environment.id).await?;
    Ok(Json(Data {
        data: syncs.into_iter().map(SyncView::from).collect(),
    }))
}

/// Deploy a functions project: every sync in it becomes live (a new version when its
/// code or configuration changed); syncs not in it are removed. Nothing is stored when
/// any file fails to compile or declares a bad configuration.
#[utoipa::path(post, operation_id = "deploy_functions", path = "/functions/deploy", tag = "functions",
    request_body = DeployRequest,
    responses((status = 200, body = Data<DeployView>), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn deploy(
    State(state): State<AppState>,
    Extension(environment): Extension<Environment>,
    Body(body): Body<DeployRequest>,
) -> Result<Json<Data<DeployView>>, ApiError> {
    let limits = state.function_limits.clone();
    let project = tokio::task::spawn_blocking(move || compile_project(body.files, &limits))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_function", e.to_string()))?;
    for sync in &project.syncs {
        if state
            .store
            .integration(environment.id, &sync.integration)
            .await?
            .is_none()
        {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_function",
                format!(
                    "{}: integration {} does not exist in environment {}; create it first",
                    sync.entry, sync.integration, environment.name
                ),
            ));
        }
    }
    let changes = state
        .store
        .deploy_functions(&environment, &project.bundle, &project.syncs)
        .await?;
    let syncs = state.store.functions(environment.id).await?;
    Ok(Json(Data {
        data: DeployView {
            changes: changes.into_iter().map(ChangeView::from).collect(),
            syncs: syncs.into_iter().map(SyncView::from).collect(),
        },
    }))
}
