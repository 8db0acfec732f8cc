//! `POST|GET|HEAD /webhook/{environment}/{integration}[/{*rest}]`.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::Utc;
use hookyard_core::keys::IntegrationKey;
use hookyard_core::metrics::names;
use hookyard_core::providers::handshake::{self, HandshakeAnswer, HandshakeRefused};
use hookyard_core::providers::Inbound;
use hookyard_core::store::logs::WebhookEntry;
use hookyard_core::Envelope;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::{Deserialize, Serialize};

use crate::error::IngestError;
use crate::publish::PublishFailure;
use crate::settings::{EnvironmentEntry, IntegrationEntry, Snapshot};
use crate::Ingest;

/// The routing part of the path. The trailing part is taken from the raw URI instead
/// (see [`trailing_path`]).
#[derive(Deserialize)]
pub struct WebhookPath {
    environment: String,
    integration: String,
}

/// What follows `/webhook/{environment}/{integration}/`, as received (percent-encoded):
/// the decoded `{*rest}` parameter could hold CR/LF, which must never reach a NATS header.
fn trailing_path(raw_path: &str) -> Option<String> {
    raw_path
        .splitn(5, '/')
        .nth(4)
        .filter(|rest| !rest.is_empty())
        .map(String::from)
}

/// What one request turned out to be, for the metrics and the operation log.
#[derive(Default)]
struct Seen {
    /// The environment's name, once known (webhooks of unknown environments are counted,
    /// not logged: no environment's API could show them).
    environment: Option<String>,
    /// The `accepted` count of the path's integration, once the environment is known to
    /// have it.
    accepted: Option<metrics::Counter>,
    delivery_id: Option<String>,
    raw_seq: Option<u64>,
    duplicate: bool,
    handshake: bool,
    /// A GET or HEAD that only checked the URL exists.
    probe: bool,
    bytes: usize,
}

#[tracing::instrument(name = "receive_webhook", skip_all, fields(integration = %path.integration, trace_id = tracing::field::Empty))]
pub async fn receive_webhook(
    State(ingest): State<Arc<Ingest>>,
    Path(path): Path<WebhookPath>,
    request: Request,
) -> Result<Response, IngestError> {
    hookyard_core::trace_context::record_trace_id(&tracing::Span::current());
    let received_at = Utc::now();
    let mut seen = Seen::default();
    let answer = receive(&ingest, &path, request, received_at, &mut seen).await;
    observe(&ingest, &path, &seen, &answer, received_at);
    answer
}

/// Counts the request, and logs it when it was not stored (off the hot path: the log
/// only queues it).
fn observe(
    ingest: &Ingest,
    path: &WebhookPath,
    seen: &Seen,
    answer: &Result<Response, IngestError>,
    received_at: chrono::DateTime<Utc>,
) {
    let (status, outcome, detail) = match answer {
        Ok(_) if seen.probe => return,
        Ok(_) if seen.handshake => ("handshake", "handshake", None),
        Ok(_) if seen.duplicate => (
            "duplicate",
            "duplicate",
            seen.raw_seq.map(|seq| format!("already stored as HOOKS_RAW #{seq}")),
        ),
        // The common case: counted through the handle the settings cache registered,
        // and logged by the router that routes it. Nothing more on this path.
        Ok(_) => {
            if let Some(accepted) = &seen.accepted {
                accepted.increment(1);
            }
            return;
        }
        Err(error @ (IngestError::Saturated { .. } | IngestError::Unavailable { .. })) => {
            ("unavailable", error.code(), Some(error.to_string()))
        }
        Err(error) => ("rejected", error.code(), Some(format!("{}: {error}", error.code()))),
    };
    let integration = if seen.accepted.is_some() {
        path.integration.as_str()
    } else {
        "unknown"
    };
    metrics::counter!(names::WEBHOOKS_RECEIVED, "integration" => integration.to_string(), "outcome" => outcome)
        .increment(1);
    if let Some(environment) = &seen.environment {
        ingest.oplog.webhook(WebhookEntry {
            environment: environment.clone(),
            integration: path.integration.clone(),
            // Only what was not stored is logged here (a duplicate's sequence is its
            // original's, whose entry the router writes).
            raw_seq: None,
            delivery_id: seen.delivery_id.clone(),
            received_at,
            status: status.into(),
            detail,
            bytes: seen.bytes as i64,
            routing: None,
        });
    }
}

/// The path's environment and integration in `snapshot`.
fn lookup<'a>(
    snapshot: &'a Snapshot,
    path: &WebhookPath,
) -> Result<(&'a EnvironmentEntry, &'a IntegrationEntry), IngestError> {
    let environment = path
        .environment
        .parse()
        .ok()
        .and_then(|id| snapshot.environment(&id))
        .ok_or_else(|| IngestError::UnknownEnvironment(path.environment.clone()))?;
    let entry = environment
        .integrations
        .get(&path.integration)
        .ok_or_else(|| IngestError::UnknownIntegration {
            environment: environment.name.to_string(),
            integration: path.integration.clone(),
        })?;
    Ok((environment, entry))
}

async fn receive(
    ingest: &Ingest,
    path: &WebhookPath,
    request: Request,
    received_at: chrono::DateTime<Utc>,
    seen: &mut Seen,
) -> Result<Response, IngestError> {
    // Taken apart rather than extracted piecewise: the header map is not cloned.
    let (parts, body) = request.into_parts();
    let (method, uri, headers) = (parts.method, parts.uri, parts.headers);
    let snapshot = ingest.settings.snapshot();
    let reloaded;
    let (environment, entry) = match lookup(&snapshot, path) {
        Ok(found) => found,
        // Not in the copy: perhaps created a moment ago.
        Err(_) => {
            reloaded = ingest.settings.after_miss().await;
            lookup(&reloaded, path).inspect_err(|error| {
                if let IngestError::UnknownIntegration { environment, .. } = error {
                    seen.environment = Some(environment.clone());
                }
            })?
        }
    };
    seen.environment = Some(environment.name.to_string());
    seen.accepted = Some(entry.accepted.clone());
    let integration = &entry.integration;
    let rules = entry.rules.as_ref().map_err(|reason| IngestError::Misconfigured {
        integration: integration.unique_key.to_string(),
        reason: reason.clone(),
    })?;
    let secret = integration.webhook_secret.as_deref();
    let headers = header_list(&headers);
    let query = uri.query().map(String::from);
    // Some providers sign the URL they called: the public address plus the path and
    // query exactly as received. Only built for them.
    let url = rules.signs_url().then(|| {
        format!(
            "{}{}",
            ingest.public_base_url,
            uri.path_and_query().map_or(uri.path(), |pq| pq.as_str())
        )
    });

    // GET and HEAD carry only handshakes (Meta's subscription check, Intercom's HEAD);
    // any other one just confirms the URL exists.
    if method != Method::POST {
        let inbound = Inbound::new(method.as_str(), url.as_deref(), &headers, query.as_deref(), b"");
        return match handshake::answer(&rules.handshakes, &inbound, secret, &integration.settings) {
            Some(answer) => {
                seen.handshake = true;
                handshake_response(answer, &integration.unique_key)
            }
            None => {
                seen.probe = true;
                Ok(StatusCode::OK.into_response())
            }
        };
    }

    let too_large = IngestError::TooLarge {
        limit: ingest.max_body_bytes,
    };
    let declared = headers
        .iter()
        .find(|(name, _)| name == "content-length")
        .and_then(|(_, v)| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > ingest.max_body_bytes as u64) {
        return Err(too_large);
    }
    let saturated = || IngestError::Saturated {
        retry_after: ingest.retry_after_secs,
    };
    let mut admitted = ingest.admission.admit().ok_or_else(saturated)?;
    let reading = tokio::time::timeout(
        ingest.body_read_timeout,
        Limited::new(body, ingest.max_body_bytes).collect(),
    );
    let body = match reading.await {
        Err(_elapsed) => return Err(IngestError::BodyTimeout(ingest.body_read_timeout)),
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(error)) if error.downcast_ref::<LengthLimitError>().is_some() => return Err(too_large),
        Ok(Err(error)) => return Err(IngestError::BadBody(error.to_string())),
    };
    seen.bytes = body.len();
    if !ingest.admission.hold_body(&mut admitted, body.len()) {
        return Err(saturated());
    }

    // Handshakes are answered here, synchronously and without publishing: they are
    // the provider checking the URL, not events. Then the signature, failing closed.
    let inbound = Inbound::new("POST", url.as_deref(), &headers, query.as_deref(), &body);
    if let Some(answer) = handshake::answer(&rules.handshakes, &inbound, secret, &integration.settings) {
        seen.handshake = true;
        return handshake_response(answer, &integration.unique_key);
    }
    let verification = rules.verify(&inbound, secret, received_at).map_err(|error| {
        tracing::warn!(integration = %integration.unique_key, %error, "webhook refused: bad signature");
        IngestError::BadSignature(error)
    })?;

    let path_rest = trailing_path(uri.path());
    let delivery_id = Envelope::derive_delivery_id(
        &integration.unique_key,
        &headers,
        path_rest.as_deref(),
        query.as_deref(),
        &body,
    );
    let envelope = Envelope {
        environment: environment.name.clone(),
        integration: integration.unique_key.clone(),
        received_at,
        delivery_id,
        method: method.to_string(),
        path: path_rest,
        query,
        headers,
        body,
        verification,
        traceparent: hookyard_core::trace_context::current_traceparent(),
    };

    seen.delivery_id = Some(envelope.delivery_id.clone());
    let publishing = std::time::Instant::now();
    let ack = ingest.publisher.publish_envelope(&envelope).await.map_err(|failure| {
        tracing::warn!(integration = %envelope.integration, delivery_id = %envelope.delivery_id, %failure, "webhook not accepted");
        match failure {
            PublishFailure::TooLarge => IngestError::TooLarge { limit: ingest.max_body_bytes },
            other => IngestError::Unavailable {
                reason: other.to_string(),
                retry_after: ingest.retry_after_secs,
            },
        }
    })?;
    ingest.publish_ack_seconds.record(publishing.elapsed().as_secs_f64());
    seen.raw_seq = Some(ack.sequence);
    seen.duplicate = ack.duplicate;
    tracing::debug!(
        environment = %envelope.environment,
        integration = %envelope.integration,
        delivery_id = %envelope.delivery_id,
        sequence = ack.sequence,
        duplicate = ack.duplicate,
        bytes = envelope.body.len(),
        "webhook accepted"
    );
    drop(admitted);
    let answer = Accepted {
        status: "accepted",
        delivery_id: &envelope.delivery_id,
        duplicate: ack.duplicate,
    };
    Ok((StatusCode::ACCEPTED, Json(answer)).into_response())
}

/// The request headers as (lower-case name, value) pairs, repeats kept.
pub fn header_list(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(name, value)| {
            let value = match value.to_str() {
                Ok(text) => text.to_string(),
                Err(_) => String::from_utf8_lossy(value.as_bytes()).into_owned(),
            };
            (name.as_str().to_string(), value)
        })
        .collect()
}

fn handshake_response(
    answer: Result<HandshakeAnswer, HandshakeRefused>,
    integration: &IntegrationKey,
) -> Result<Response, IngestError> {
    let answer = answer.map_err(|refused| {
        tracing::warn!(%integration, %refused, "handshake refused");
        IngestError::HandshakeRefused(refused)
    })?;
    tracing::info!(%integration, status = answer.status, "handshake answered");
    let mut response = Response::builder().status(answer.status);
    if let Some(content_type) = &answer.content_type {
        response = response.header(header::CONTENT_TYPE, content_type);
    }
    if !answer.body.is_empty() {
        // The body echoes what the request sent: no browser may read it as anything but
        // its type (Dropbox asks for this; it holds for every echo).
        response = response.header(header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    }
    for (name, value) in &answer.headers {
        response = response.header(name, value);
    }
    response
        .body(axum::body::Body::from(answer.body))
        .map_err(|e| IngestError::BadBody(format!("the handshake answer cannot be sent: {e}")))
}

/// The 202 body: which delivery this was, and whether it had been stored before.
#[derive(Serialize)]
struct Accepted<'a> {
    status: &'static str,
    delivery_id: &'a str,
    duplicate: bool,
}

#[cfg(test)]
mod tests {
    #[test]
    fn trailing_path_is_raw_and_optional() {
        use super::trailing_path;
        assert_eq!(trailing_path("/webhook/e/i"), None);
        assert_eq!(trailing_path("/webhook/e/i/"), None);
        assert_eq!(trailing_path("/webhook/e/i/a%0d%0a/b").as_deref(), Some("a%0d%0a/b"));
    }
}
