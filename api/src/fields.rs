//! Checks of request fields, each failing with a 400 that names the field.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

use crate::error::ApiError;

/// The most entries a page of a list gives.
pub const MAX_PAGE: u32 = 1000;

/// A list's `limit`: `default` when not given, else 1 to [`MAX_PAGE`].
pub fn page_size(limit: Option<u32>, default: u32) -> Result<u32, ApiError> {
    match limit.unwrap_or(default) {
        limit @ 1..=MAX_PAGE => Ok(limit),
        _ => Err(ApiError::invalid("limit", format!("must be 1 to {MAX_PAGE}"))),
    }
}

/// A required text of 1 to `max` characters without control characters.
pub fn text(field: &str, value: String, max: usize) -> Result<String, ApiError> {
    if value.is_empty() {
        return Err(ApiError::invalid(field, "must not be empty"));
    }
    if value.chars().count() > max {
        return Err(ApiError::invalid(field, format!("is longer than {max} characters")));
    }
    if value.chars().any(char::is_control) {
        return Err(ApiError::invalid(field, "must not contain control characters"));
    }
    Ok(value)
}

pub fn optional_text(field: &str, value: Option<String>, max: usize) -> Result<Option<String>, ApiError> {
    value.map(|v| text(field, v, max)).transpose()
}

/// A JSON object (absent: empty).
pub fn object(field: &str, value: Option<Value>) -> Result<Map<String, Value>, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(map)) => Ok(map),
        Some(_) => Err(ApiError::invalid(field, "must be a JSON object")),
    }
}

/// Tags: an object of string values (absent: empty).
pub fn tags(value: Option<Value>) -> Result<Map<String, Value>, ApiError> {
    let map = object("tags", value)?;
    if let Some((key, _)) = map.iter().find(|(_, v)| !v.is_string()) {
        return Err(ApiError::invalid(&format!("tags.{key}"), "must be a string"));
    }
    Ok(map)
}

/// For `Option<Option<T>>` fields: absent stays `None`, `null` becomes `Some(None)`.
pub fn present<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

/// An RFC 3339 time, parsed with a message that says what is expected (serde's own is
/// chrono's bare "input contains invalid characters").
pub fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(text)
        .map(|at| at.with_timezone(&Utc))
        .map_err(|e| format!("{text:?} is not an RFC 3339 time such as 2026-11-27T10:00:00Z ({e})"))
}

/// `deserialize_with` for a required time.
pub fn time<'de, D: Deserializer<'de>>(deserializer: D) -> Result<DateTime<Utc>, D::Error> {
    parse_time(&String::deserialize(deserializer)?).map_err(serde::de::Error::custom)
}

/// `deserialize_with` for an optional time (with `#[serde(default)]`).
pub fn optional_time<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<DateTime<Utc>>, D::Error> {
    Option::<String>::deserialize(deserializer)?
        .map(|text| parse_time(&text).map_err(serde::de::Error::custom))
        .transpose()
}
