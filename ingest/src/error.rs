//! The one mapping from what went wrong to the HTTP answer. Every error is JSON:
//! `{"error": {"code": …, "message": …}}`; every 503 carries `Retry-After`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("no environment has webhook id {0:?}")]
    UnknownEnvironment(String),
    #[error("environment {environment} has no integration {integration:?}")]
    UnknownIntegration { environment: String, integration: String },
    #[error("the signature check failed: {0}")]
    BadSignature(hookyard_core::providers::VerifyError),
    #[error("the handshake was refused: {0}")]
    HandshakeRefused(hookyard_core::providers::handshake::HandshakeRefused),
    #[error("integration {integration} cannot take webhooks: {reason}")]
    Misconfigured { integration: String, reason: String },
    #[error("the body is larger than the limit of {limit} bytes")]
    TooLarge { limit: usize },
    #[error("the request body could not be read: {0}")]
    BadBody(String),
    #[error("the request body did not arrive within {0:?}")]
    BodyTimeout(std::time::Duration),
    #[error("ingest is at its in-flight limit; retry later")]
    Saturated { retry_after: u64 },
    #[error("the message bus is unavailable: {reason}; retry later")]
    Unavailable { reason: String, retry_after: u64 },
    #[error("no such route: webhooks go to /webhook/{{environment webhook id}}/{{integration}}")]
    NoRoute,
    #[error("webhooks are POSTed (GET and HEAD answer handshakes)")]
    MethodNotAllowed,
}

impl IngestError {
    fn status(&self) -> StatusCode {
        match self {
            Self::UnknownEnvironment(_) | Self::UnknownIntegration { .. } | Self::NoRoute => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::BadSignature(_) => StatusCode::UNAUTHORIZED,
            Self::HandshakeRefused(_) => StatusCode::FORBIDDEN,
            Self::Misconfigured { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BadBody(_) => StatusCode::BAD_REQUEST,
            Self::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::Saturated { .. } | Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::UnknownEnvironment(_) => "unknown_environment",
            Self::UnknownIntegration { .. } => "unknown_integration",
            Self::BadSignature(_) => "bad_signature",
            Self::HandshakeRefused(_) => "handshake_refused",
            Self::Misconfigured { .. } => "integration_misconfigured",
            Self::TooLarge { .. } => "payload_too_large",
            Self::BadBody(_) => "bad_body",
            Self::BodyTimeout(_) => "body_timeout",
            Self::Saturated { .. } => "saturated",
            Self::Unavailable { .. } => "unavailable",
            Self::NoRoute => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            Self::Saturated { retry_after } | Self::Unavailable { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}

impl IntoResponse for IngestError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code(), "message": self.to_string()}});
        let mut response = (self.status(), axum::Json(body)).into_response();
        if let Some(seconds) = self.retry_after() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}
