//! `/healthz`: the process is up (with what it is doing). `/readyz`: it can take
//! webhooks: NATS is connected and `HOOKS_RAW` exists.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use crate::Ingest;

pub async fn healthz(State(ingest): State<Arc<Ingest>>) -> Json<Value> {
    Json(json!({"status": "ok", "in_flight": ingest.admission.in_flight()}))
}

pub async fn readyz(State(ingest): State<Arc<Ingest>>) -> (StatusCode, Json<Value>) {
    let connected = ingest.bus.client.connection_state() == async_nats::connection::State::Connected;
    let streams = connected && ingest.bus.raw_stream_ready(Duration::from_secs(1)).await;
    let status = if streams {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({"ready": streams, "nats_connected": connected, "streams_present": streams})),
    )
}
