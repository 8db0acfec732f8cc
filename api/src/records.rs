//! `GET /records`, compatible with Nango's: the connection comes in the `Connection-Id`
//! and `Provider-Config-Key` headers, and each record carries `_nango_metadata`.

use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::{Extension, Json};
use hookyard_core::keys::IntegrationKey;
use hookyard_core::store::records::{decode_cursor, LastAction, RecordQuery, RecordScope, StoredRecord};
use hookyard_core::store::Environment;
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, ErrorBody};
use crate::fields;
use crate::AppState;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list))
}

const MAX_LIMIT: u32 = 10_000;
const DEFAULT_LIMIT: u32 = 100;
const MAX_IDS: usize = 100;

#[derive(Serialize, ToSchema)]
pub struct RecordList {
    /// Each record's own fields, its `id`, and `_nango_metadata`.
    #[schema(value_type = Vec<Object>)]
    records: Vec<Value>,
    /// Pass back as `cursor` for the next page; null on the last page.
    next_cursor: Option<String>,
}

/// The query string, read by hand: `ids` may repeat (`ids=a&ids=b`), which serde's
/// query parsing cannot take, and every bad value must name its parameter.
struct ListQuery {
    model: String,
    query: RecordQuery,
}

fn parse_query(raw: Option<&str>) -> Result<ListQuery, ApiError> {
    let mut model = None;
    let mut query = RecordQuery {
        limit: DEFAULT_LIMIT,
        ..Default::default()
    };
    let mut ids = Vec::new();
    for (name, value) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        match name.as_ref() {
            "model" => model = Some(value.into_owned()),
            "cursor" if !value.is_empty() => {
                decode_cursor(&value).map_err(|e| ApiError::invalid("cursor", e))?;
                query.cursor = Some(value.into_owned());
            }
            // `delta` is the older name.
            "modified_after" | "delta" if !value.is_empty() => {
                query.modified_after = Some(fields::parse_time(&value).map_err(|e| ApiError::invalid(&name, e))?);
            }
            "limit" => {
                query.limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| {
                        ApiError::invalid("limit", format!("{value:?} is not a number from 1 to {MAX_LIMIT}"))
                    })?;
            }
            "filter" => {
                for word in value.split(',').map(str::trim).filter(|w| !w.is_empty()) {
                    let action = match word.to_ascii_lowercase().as_str() {
                        "added" => LastAction::Added,
                        "updated" => LastAction::Updated,
                        "deleted" => LastAction::Deleted,
                        _ => {
                            return Err(ApiError::invalid(
                                "filter",
                                format!("{word:?} is not one of added, updated, deleted"),
                            ))
                        }
                    };
                    if !query.filter.contains(&action) {
                        query.filter.push(action);
                    }
                }
            }
            "ids" | "ids[]" => ids.push(value.into_owned()),
            _ => {} // Unknown parameters are ignored: newer clients keep working.
        }
    }
    if ids.len() > MAX_IDS {
        return Err(ApiError::invalid("ids", format!("at most {MAX_IDS} ids per request")));
    }
    query.ids = (!ids.is_empty()).then_some(ids);
    let model = model
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::invalid("model", "is required"))?;
    Ok(ListQuery { model, query })
}

/// A header's value, trimmed; a 400 naming it when it is missing or empty.
pub(crate) fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<&'a str, ApiError> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| ApiError::invalid(name, "header is required"))
}

/// A page of a connection's records of one model, in the order they last changed.
#[utoipa::path(get, operation_id = "list_records", path = "/records", tag = "records",
    params(
        ("Connection-Id" = String, Header),
        ("Provider-Config-Key" = String, Header),
        ("model" = String, Query),
        ("cursor" = Option<String>, Query, description = "exclusive; from `next_cursor` or a record's `_nango_metadata.cursor`"),
        ("modified_after" = Option<String>, Query, description = "ISO 8601, inclusive"),
        ("limit" = Option<u32>, Query, description = "1–10000, default 100"),
        ("filter" = Option<String>, Query, description = "comma list of added, updated, deleted"),
        ("ids" = Option<Vec<String>>, Query, description = "repeat for several, at most 100"),
    ),
    responses((status = 200, body = RecordList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 404, body = ErrorBody)))]
async fn list(
    State(state): State<AppState>,
    Extension(environment): Extension<Environment>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Json<RecordList>, ApiError> {
    let connection_id = header(&headers, "Connection-Id")?;
    let integration: IntegrationKey = header(&headers, "Provider-Config-Key")?
        .parse()
        .map_err(|e| ApiError::invalid("Provider-Config-Key", e))?;
    let ListQuery { model, query } = parse_query(raw.as_deref())?;
    // Records are only served for a live connection of this environment.
    state
        .store
        .existing_connection(environment.id, &integration, connection_id)
        .await?;
    let scope = RecordScope {
        environment_id: environment.id,
        integration,
        connection_id: connection_id.to_string(),
        model,
    };
    let page = state.store.list_records(&scope, &query).await?;
    Ok(Json(RecordList {
        records: page.records.into_iter().map(StoredRecord::into_nango).collect(),
        next_cursor: page.next_cursor,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nango_queries() {
        let q = parse_query(Some(
            "model=Contact&limit=5&filter=Updated,%20DELETED&ids=a&ids=b%2Cc&extra=1",
        ))
        .unwrap();
        assert_eq!(q.model, "Contact");
        assert_eq!(q.query.limit, 5);
        assert_eq!(q.query.filter, vec![LastAction::Updated, LastAction::Deleted]);
        assert_eq!(q.query.ids, Some(vec!["a".to_string(), "b,c".to_string()]));
        let q = parse_query(Some("model=M&delta=2026-01-02T03:04:05Z")).unwrap();
        assert_eq!(
            q.query.modified_after.unwrap().to_rfc3339(),
            "2026-01-02T03:04:05+00:00"
        );
    }

    #[test]
    fn bad_values_name_their_parameter() {
        for (query, field) in [
            ("limit=5", "model"),
            ("model=M&limit=0", "limit"),
            ("model=M&limit=10001", "limit"),
            ("model=M&limit=x", "limit"),
            ("model=M&filter=added,gone", "filter"),
            ("model=M&cursor=nope", "cursor"),
            ("model=M&modified_after=yesterday", "modified_after"),
        ] {
            let error = parse_query(Some(query))
                .err()
                .unwrap_or_else(|| panic!("{query} must fail"));
            let text = format!("{error:?}");
            assert!(text.contains(&format!("{field}:")), "{query}: {text}");
        }
        let many: String = (0..101).map(|i| format!("&ids={i}")).collect();
        assert!(parse_query(Some(&format!("model=M{many}"))).is_err());
    }
}
