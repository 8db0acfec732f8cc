//! Replays of `HOOKS_RAW`: `POST /replay` asks for one, `GET /replay` and `GET
//! /replay/{id}` show them with their progress, `POST /replay/{id}/cancel` stops one.
//! The routers run them (the API writes rows only).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use hookyard_core::keys::IntegrationKey;
use hookyard_core::routed::ReplayTarget;
use hookyard_core::store::replays::{NewReplay, Replay};
use hookyard_core::store::Environment;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, Body, ErrorBody, Params};
use crate::fields;
use crate::{AppState, Data};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(start, list))
        .routes(routes!(show))
        .routes(routes!(cancel))
}

#[derive(Deserialize, ToSchema)]
pub struct ReplayRequest {
    /// Webhooks received at or after this (RFC 3339).
    #[serde(deserialize_with = "fields::time")]
    since: DateTime<Utc>,
    /// … and before this (default: now).
    #[serde(default, deserialize_with = "fields::optional_time")]
    until: Option<DateTime<Utc>>,
    /// One integration's webhooks (default: every integration's).
    integration: Option<String>,
    /// Only the events that route to this connection (needs `integration`).
    connection_id: Option<String>,
    /// `functions`, `forward` or `all` (default).
    #[schema(value_type = Option<String>)]
    target: Option<ReplayTarget>,
    /// Count what would be replayed, publish nothing.
    #[serde(default)]
    dry_run: bool,
    /// At most this many events per second.
    rate: Option<u32>,
}

/// A replay as stored, with its progress.
#[derive(Serialize, ToSchema)]
#[schema(value_type = Object)]
pub struct ReplayView(Replay);

/// Replay a window of received webhooks: route them again and run them through the
/// targeted consumers. Records never go back to an older state (the original versions
/// are kept). Answered at once; the replay runs in a router.
#[utoipa::path(operation_id = "replay_start", post, path = "/replay", tag = "replay", request_body = ReplayRequest,
    responses((status = 202, body = Data<ReplayView>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 404, body = ErrorBody)))]
async fn start(
    State(state): State<AppState>,
    Extension(environment): Extension<Environment>,
    Body(request): Body<ReplayRequest>,
) -> Result<(StatusCode, Json<Data<ReplayView>>), ApiError> {
    let until = request.until.unwrap_or_else(Utc::now);
    if request.since >= until {
        return Err(ApiError::invalid("since", "must be before until"));
    }
    if request.connection_id.is_some() && request.integration.is_none() {
        return Err(ApiError::invalid("connection_id", "needs integration"));
    }
    if request.rate == Some(0) {
        return Err(ApiError::invalid(
            "rate",
            "must be at least 1 (leave it out for no limit)",
        ));
    }
    if let Some(key) = &request.integration {
        let key: IntegrationKey = key.parse().map_err(|e| ApiError::invalid("integration", e))?;
        if state.store.integration(environment.id, &key).await?.is_none() {
            return Err(ApiError::not_found(format!("integration {key} does not exist")));
        }
        // A replay routes with today's connections: one that does not exist gets nothing.
        if let Some(connection_id) = &request.connection_id {
            state
                .store
                .existing_connection(environment.id, &key, connection_id)
                .await?;
        }
    }
    let replay = state
        .store
        .create_replay(&NewReplay {
            environment: environment.name.to_string(),
            integration: request.integration,
            connection_id: request.connection_id,
            since: request.since,
            until,
            target: request.target.unwrap_or(ReplayTarget::All),
            dry_run: request.dry_run,
            rate: request.rate,
        })
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(Data {
            data: ReplayView(replay),
        }),
    ))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// At most this many, newest first (default 20).
    limit: Option<u32>,
}

/// The environment's replays, newest first.
#[utoipa::path(operation_id = "replay_list", get, path = "/replay", tag = "replay", params(ListQuery),
    responses((status = 200, body = Data<Vec<ReplayView>>), (status = 401, body = ErrorBody)))]
async fn list(
    State(state): State<AppState>,
    Extension(environment): Extension<Environment>,
    Params(query): Params<ListQuery>,
) -> Result<Json<Data<Vec<ReplayView>>>, ApiError> {
    let limit = query.limit.unwrap_or(20).clamp(1, 1000);
    let replays = state.store.replays(environment.name.as_str(), limit).await?;
    Ok(Json(Data {
        data: replays.into_iter().map(ReplayView).collect(),
    }))
}

/// One replay and its progress.
#[utoipa::path(operation_id = "replay_show", get, path = "/replay/{id}", tag = "replay", params(("id" = i64, Path, description = "the replay's id")),
    responses((status = 200, body = Data<ReplayView>), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn show(
    State(state): State<AppState>,
    Extension(environment): Extension<Environment>,
    Path(id): Path<i64>,
) -> Result<Json<Data<ReplayView>>, ApiError> {
    let replay = state.store.replay(environment.name.as_str(), id).await?;
    Ok(Json(Data {
        data: ReplayView(replay),
    }))
}

/// Stop a replay: at once when it has not started, within a second when it runs.
/// What it published so far stays published.
#[utoipa::path(operation_id = "replay_cancel", post, path = "/replay/{id}/cancel", tag = "replay", params(("id" = i64, Path, description = "the replay's id")),
    responses((status = 200, body = Data<ReplayView>), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn cancel(
    State(state): State<AppState>,
    Extension(environment): Extension<Environment>,
    Path(id): Path<i64>,
) -> Result<Json<Data<ReplayView>>, ApiError> {
    let replay = state.store.cancel_replay(environment.name.as_str(), id).await?;
    Ok(Json(Data {
        data: ReplayView(replay),
    }))
}
