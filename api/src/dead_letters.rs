//! Dead letters: `GET /dead-letters` (filters, newest first, paged), `GET
//! /dead-letters/{id}` (the message and every attempt's error), `POST
//! /dead-letters/redrive` (by ids or filter; a router carries it out) and `DELETE
//! /dead-letters` / `DELETE /dead-letters/{id}`.

use axum::extract::{Path, State};
use axum::{Extension, Json};
use hookyard_core::store::dead_letters::{DeadLetterFilter, DeadLetterKind, StoredDeadLetter};
use hookyard_core::store::Environment;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, Body, ErrorBody, Params};
use crate::{AppState, Data};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, purge))
        .routes(routes!(show, delete_one))
        .routes(routes!(redrive))
}

const DEFAULT_LIMIT: u32 = 100;

/// Which letters: by ids, or by what they are. Every part given must match.
#[derive(Deserialize, IntoParams, ToSchema, Default)]
#[into_params(parameter_in = Query)]
pub struct Selection {
    /// Comma-separated letter ids (in a JSON body, a list works too).
    #[serde(default, deserialize_with = "ids")]
    #[param(value_type = Option<String>)]
    #[schema(value_type = Option<Vec<i64>>)]
    ids: Option<Vec<i64>>,
    /// `function`, `forward` or `exec`.
    #[param(value_type = Option<String>)]
    #[schema(value_type = Option<String>)]
    kind: Option<DeadLetterKind>,
    integration: Option<String>,
    connection_id: Option<String>,
    /// A part of the error message (case-insensitive).
    error: Option<String>,
    /// Say so to select every letter when nothing else is given.
    #[serde(default)]
    all: bool,
}

impl Selection {
    fn filter(self) -> DeadLetterFilter {
        DeadLetterFilter {
            ids: self.ids,
            kind: self.kind,
            integration: self.integration,
            connection_id: self.connection_id,
            error: self.error,
            before_id: None,
        }
    }

    /// The filter of a redrive or purge: refuses an empty selection unless `all` says so.
    fn chosen(self) -> Result<DeadLetterFilter, ApiError> {
        let all = self.all;
        let filter = self.filter();
        let empty = filter.ids.is_none()
            && filter.kind.is_none()
            && filter.integration.is_none()
            && filter.connection_id.is_none()
            && filter.error.is_none();
        if empty && !all {
            return Err(ApiError::invalid(
                "ids",
                "give ids or a filter (kind, integration, connection_id, error), or all=true",
            ));
        }
        Ok(filter)
    }
}

/// Ids as a list or as comma-separated text.
fn ids<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Vec<i64>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Ids {
        List(Vec<i64>),
        Text(String),
    }
    match Option::<Ids>::deserialize(deserializer)? {
        None => Ok(None),
        Some(Ids::List(ids)) => Ok(Some(ids)),
        Some(Ids::Text(text)) => text
            .split(',')
            .filter(|part| !part.trim().is_empty())
            .map(|part| {
                part.trim()
                    .parse()
                    .map_err(|_| serde::de::Error::custom(format!("{part:?} is not a letter id")))
            })
            .collect::<Result<Vec<i64>, _>>()
            .map(Some),
    }
}

/// A page of the listing (read beside the [`Selection`] from the same query).
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct Paging {
    /// At most this many (default 100, at most 1000).
    limit: Option<u32>,
    /// From `next_cursor`.
    cursor: Option<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct Page {
    #[schema(value_type = Vec<Object>)]
    data: Vec<StoredDeadLetter>,
    /// Pass back as `cursor` for older letters; null on the last page.
    next_cursor: Option<i64>,
}

/// The environment's dead letters, newest first.
#[utoipa::path(operation_id = "dead_letters_list", get, path = "/dead-letters", tag = "dead letters", params(Selection, Paging),
    responses((status = 200, body = Page), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
async fn list(
    State(state): State<AppState>,
    Extension(environment): Extension<Environment>,
    Params(selection): Params<Selection>,
    Params(paging): Params<Paging>,
) -> Result<Json<Page>, ApiError> {
    let limit = crate::fields::page_size(paging.limit, DEFAULT_LIMIT)?;
    let filter = DeadLetterFilter {
        before_id: paging.cursor,
        ..selection.filter()
    };
    let data = state
        .store
        .dead_letters(environment.name.as_str(), &filter, limit)
        .await?;
    let next_cursor = (data.len() == limit as usize)
        .then(|| data.last().map(|l| l.id))
        .flatten();
    Ok(Json(Page { data, next_cursor }))
}

#[derive(Serialize, ToSchema)]
pub struct Shown {
    #[serde(flatten)]
    #[schema(value_type = Object)]
    letter: StoredDeadLetter,
    /// The message as JSON, when it is JSON (`payload` has it as text).
    #[schema(value_type = Option<Object>)]
    message: Option<Value>,
    /// Every attempt, oldest first, each with its error.
    #[schema(value_type = Vec<Object>)]
    attempts: Vec<Value>,
}

/// One dead letter: the message, and every attempt's error.
#[utoipa::path(operation_id = "dead_letters_show", get, path = "/dead-letters/{id}", tag = "dead letters",
    params(("id" = i64, Path, description = "the letter's id")),
    responses((status = 200, body = Data<Shown>), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn show(
    State(state): State<AppState>,
    Extension(environment): Extension<Environment>,
    Path(id): Path<i64>,
) -> Result<Json<Data<Shown>>, ApiError> {
    let letter = state.store.dead_letter(environment.name.as_str(), id).await?;
    let attempts = match letter.kind {
        DeadLetterKind::Forward => {
            let message: Option<hookyard_core::delivery::Delivery> = serde_json::from_str(&letter.letter.payload).ok();
            let key = message.map_or(letter.letter.message_id.clone(), |d| d.attempt_key());
            state
                .store
                .delivery_attempts(&key)
                .await?
                .into_iter()
                .map(|a| {
                    serde_json::json!({
                        "attempt": a.attempt, "at": a.at, "status": a.status,
                        "latency_ms": a.latency_ms, "error": a.error,
                    })
                })
                .collect()
        }
        DeadLetterKind::Function | DeadLetterKind::Exec => {
            let mut attempts: Vec<Value> = state
                .store
                .failed_attempts(&letter.letter.consumer, &letter.letter.message_id)
                .await?
                .into_iter()
                .filter(|a| a.attempt < letter.letter.attempts)
                .map(|a| serde_json::to_value(a).expect("an attempt serialises"))
                .collect();
            // The last attempt is the letter's own error.
            attempts.push(serde_json::json!({
                "attempt": letter.letter.attempts,
                "error_kind": letter.letter.error_kind,
                "error": letter.letter.error,
                "failed_at": letter.created_at,
            }));
            attempts
        }
    };
    let message = serde_json::from_str(&letter.letter.payload).ok();
    Ok(Json(Data {
        data: Shown {
            letter,
            message,
            attempts,
        },
    }))
}

#[derive(Serialize, ToSchema)]
pub struct Redriving {
    /// The letters that will be redriven (a router publishes them within a second or so;
    /// `redriven_at` or `redrive_error` then says how it went).
    redriving: Vec<i64>,
}

/// Redrive dead letters: their messages are handled again, each by the consumer that
/// gave up on it only, with the version it had (records never go back). Exec job
/// messages that were no jobs are left out.
#[utoipa::path(operation_id = "dead_letters_redrive", post, path = "/dead-letters/redrive", tag = "dead letters", request_body = Selection,
    responses((status = 200, body = Data<Redriving>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
async fn redrive(
    State(state): State<AppState>,
    Extension(environment): Extension<Environment>,
    Body(selection): Body<Selection>,
) -> Result<Json<Data<Redriving>>, ApiError> {
    let filter = selection.chosen()?;
    let redriving = state.store.request_redrive(environment.name.as_str(), &filter).await?;
    Ok(Json(Data {
        data: Redriving { redriving },
    }))
}

#[derive(Serialize, ToSchema)]
pub struct Purged {
    deleted: u64,
}

/// Delete the selected dead letters.
#[utoipa::path(operation_id = "dead_letters_purge", delete, path = "/dead-letters", tag = "dead letters", params(Selection),
    responses((status = 200, body = Data<Purged>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
async fn purge(
    State(state): State<AppState>,
    Extension(environment): Extension<Environment>,
    Params(selection): Params<Selection>,
) -> Result<Json<Data<Purged>>, ApiError> {
    let filter = selection.chosen()?;
    let deleted = state
        .store
        .delete_dead_letters(environment.name.as_str(), &filter)
        .await?;
    Ok(Json(Data {
        data: Purged { deleted },
    }))
}

/// Delete one dead letter.
#[utoipa::path(operation_id = "dead_letters_delete_one", delete, path = "/dead-letters/{id}", tag = "dead letters",
    params(("id" = i64, Path, description = "the letter's id")),
    responses((status = 200, body = Data<Purged>), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn delete_one(
    State(state): State<AppState>,
    Extension(environment): Extension<Environment>,
    Path(id): Path<i64>,
) -> Result<Json<Data<Purged>>, ApiError> {
    let filter = DeadLetterFilter {
        ids: Some(vec![id]),
        ..Default::default()
    };
    let deleted = state
        .store
        .delete_dead_letters(environment.name.as_str(), &filter)
        .await?;
    if deleted == 0 {
        return Err(ApiError::not_found(format!("dead letter {id} does not exist")));
    }
    Ok(Json(Data {
        data: Purged { deleted },
    }))
}
