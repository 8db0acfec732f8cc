//! Sync control, in Nango's shapes: `POST /sync/trigger`, `/sync/pause`, `/sync/start`
//! and `GET /sync/status`. The API writes to the database only; the reconciler queues
//! the runs a trigger asks for, and leaves paused syncs out of the schedule.

use std::collections::HashMap;

use axum::extract::State;
use axum::{Extension, Json};
use hookyard_core::keys::IntegrationKey;
use hookyard_core::store::functions::DeployedSync;
use hookyard_core::store::syncs::{SyncKey, SyncState, SyncStatus, Trigger};
use hookyard_core::store::Environment;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, Body, ErrorBody, Params};
use crate::AppState;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(trigger))
        .routes(routes!(pause))
        .routes(routes!(start))
        .routes(routes!(status))
}

#[derive(Deserialize, ToSchema)]
pub struct SyncsRequest {
    /// Sync names (an empty list: every sync of the integration that has an exec).
    #[serde(default)]
    syncs: Vec<String>,
    provider_config_key: String,
    /// One connection; absent: every connection of the integration.
    #[serde(default)]
    connection_id: Option<String>,
    #[serde(default)]
    opts: TriggerOptions,
}

impl SyncsRequest {
    /// The (sync, connection) pairs it names; see [`resolve`].
    async fn resolve(
        &self,
        state: &AppState,
        environment: &Environment,
    ) -> Result<(Vec<SyncKey>, HashMap<String, DeployedSync>), ApiError> {
        resolve(
            state,
            environment,
            &self.provider_config_key,
            &self.syncs,
            self.connection_id.as_deref(),
        )
        .await
    }
}

#[derive(Deserialize, Default, ToSchema)]
pub struct TriggerOptions {
    /// Forget the checkpoint: a full run.
    #[serde(default)]
    reset: bool,
    /// Remove the sync's records for the connection before the run.
    #[serde(default, rename = "emptyCache")]
    empty_cache: bool,
}

#[derive(Serialize, ToSchema)]
pub struct Done {
    success: bool,
    /// (sync, connection) pairs it applies to.
    count: usize,
}

#[derive(Deserialize, IntoParams)]
pub struct StatusQuery {
    /// Comma-separated sync names, or `*` for all.
    syncs: String,
    provider_config_key: String,
    connection_id: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct StatusList {
    syncs: Vec<SyncStatusView>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SyncStatusView {
    name: String,
    #[serde(rename = "connection_id")]
    connection_id: String,
    /// RUNNING, SUCCESS, ERROR, PAUSED, STOPPED (not started), or PENDING (started,
    /// first run not finished).
    #[schema(value_type = String)]
    status: SyncStatus,
    frequency: Option<String>,
    next_scheduled_sync_at: Option<chrono::DateTime<chrono::Utc>>,
    started_at: Option<chrono::DateTime<chrono::Utc>>,
    finished_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Per model: added, updated, deleted, of the last successful run.
    #[schema(value_type = Option<Object>)]
    latest_result: Option<Value>,
    /// Why the last run failed, when it did.
    error: Option<String>,
}

/// Queue an exec run of the syncs now (for one connection or all of the integration's).
#[utoipa::path(post, path = "/sync/trigger", tag = "syncs", request_body = SyncsRequest,
    responses((status = 200, body = Done), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 404, body = ErrorBody)))]
async fn trigger(
    State(state): State<AppState>,
    Extension(environment): Extension<Environment>,
    Body(body): Body<SyncsRequest>,
) -> Result<Json<Done>, ApiError> {
    let (keys, syncs) = body.resolve(&state, &environment).await?;
    let keys: Vec<(SyncKey, bool)> = keys
        .into_iter()
        .map(|key| {
            let auto_start = syncs[&key.sync].auto_start();
            (key, auto_start)
        })
        .collect();
    let trigger = Trigger::new(body.opts.reset, body.opts.empty_cache);
    state.store.request_trigger(&keys, &trigger).await?;
    Ok(Json(Done {
        success: true,
        count: keys.len(),
    }))
}

/// Stop scheduling the syncs (a run in progress finishes).
#[utoipa::path(post, path = "/sync/pause", tag = "syncs", request_body = SyncsRequest,
    responses((status = 200, body = Done), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 404, body = ErrorBody)))]
async fn pause(
    State(state): State<AppState>,
    Extension(environment): Extension<Environment>,
    Body(body): Body<SyncsRequest>,
) -> Result<Json<Done>, ApiError> {
    set_paused(state, environment, body, true).await
}

/// Start (or resume) scheduling the syncs.
#[utoipa::path(post, path = "/sync/start", tag = "syncs", request_body = SyncsRequest,
    responses((status = 200, body = Done), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 404, body = ErrorBody)))]
async fn start(
    State(state): State<AppState>,
    Extension(environment): Extension<Environment>,
    Body(body): Body<SyncsRequest>,
) -> Result<Json<Done>, ApiError> {
    set_paused(state, environment, body, false).await
}

async fn set_paused(
    state: AppState,
    environment: Environment,
    body: SyncsRequest,
    paused: bool,
) -> Result<Json<Done>, ApiError> {
    let (keys, _) = body.resolve(&state, &environment).await?;
    state.store.set_syncs_paused(&keys, paused).await?;
    Ok(Json(Done {
        success: true,
        count: keys.len(),
    }))
}

/// Each sync's state per connection: status, schedule and last run.
#[utoipa::path(get, path = "/sync/status", tag = "syncs", params(StatusQuery),
    responses((status = 200, body = StatusList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 404, body = ErrorBody)))]
async fn status(
    State(state): State<AppState>,
    Extension(environment): Extension<Environment>,
    Params(query): Params<StatusQuery>,
) -> Result<Json<StatusList>, ApiError> {
    let names: Vec<String> = if query.syncs.trim() == "*" {
        Vec::new()
    } else {
        query
            .syncs
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    };
    let (keys, syncs) = resolve(
        &state,
        &environment,
        &query.provider_config_key,
        &names,
        query.connection_id.as_deref(),
    )
    .await?;
    let integration = keys.first().map(|k| k.integration.clone());
    let states: HashMap<SyncKey, SyncState> = state
        .store
        .sync_states(Some(environment.id), integration.as_ref())
        .await?
        .into_iter()
        .map(|s| (s.key.clone(), s))
        .collect();
    let views = keys
        .into_iter()
        .map(|key| {
            let sync = syncs.get(&key.sync).expect("keys are of these syncs");
            let view_of = |state: Option<&SyncState>| SyncStatusView {
                name: key.sync.clone(),
                connection_id: key.connection_id.clone(),
                status: state.map_or_else(
                    || {
                        if sync.auto_start() {
                            SyncStatus::Pending
                        } else {
                            SyncStatus::Stopped
                        }
                    },
                    SyncState::status,
                ),
                frequency: sync.config["frequency"].as_str().map(str::to_string),
                next_scheduled_sync_at: state.filter(|s| s.started && !s.paused).and_then(|s| s.next_run_at),
                started_at: state.and_then(|s| s.last_started_at),
                finished_at: state.and_then(|s| s.last_ended_at),
                latest_result: state.and_then(|s| s.last_result.clone()),
                error: state.and_then(|s| s.last_error.clone()),
            };
            view_of(states.get(&key))
        })
        .collect();
    Ok(Json(StatusList { syncs: views }))
}

/// The (sync, connection) pairs a request names, and the syncs by name. Unknown syncs,
/// integrations and connections are 404s, naming what is missing.
async fn resolve(
    state: &AppState,
    environment: &Environment,
    provider_config_key: &str,
    names: &[String],
    connection_id: Option<&str>,
) -> Result<(Vec<SyncKey>, HashMap<String, DeployedSync>), ApiError> {
    let integration: IntegrationKey = provider_config_key
        .parse()
        .map_err(|e| ApiError::invalid("provider_config_key", e))?;
    state.store.existing_integration(environment.id, &integration).await?;
    let deployed: HashMap<String, DeployedSync> = state
        .store
        .functions(environment.id)
        .await?
        .into_iter()
        .filter(|s| s.integration == integration && s.has_exec())
        .map(|s| (s.name.clone(), s))
        .collect();
    let chosen: Vec<String> = if names.is_empty() {
        let mut all: Vec<String> = deployed.keys().cloned().collect();
        all.sort();
        all
    } else {
        for name in names {
            if !deployed.contains_key(name) {
                return Err(ApiError::not_found(format!(
                    "no sync {name:?} with an exec is deployed for integration {integration}"
                )));
            }
        }
        names.to_vec()
    };
    let connections = match connection_id {
        Some(id) => {
            state
                .store
                .existing_connection(environment.id, &integration, id)
                .await?;
            vec![id.to_string()]
        }
        None => state.store.live_connection_ids(environment.id, &integration).await?,
    };
    let keys = chosen
        .iter()
        .flat_map(|sync| {
            connections.iter().map(|connection_id| SyncKey {
                environment_id: environment.id,
                integration: integration.clone(),
                sync: sync.clone(),
                connection_id: connection_id.clone(),
            })
        })
        .collect();
    Ok((keys, deployed))
}
