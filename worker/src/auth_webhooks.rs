//! Nango's `auth` webhook for a refresh the provider refused (`operation: "refresh"`,
//! `success: false`): the connection needs to be authorized again. One per failure (from
//! the first refused refresh until credentials are stored again), to the connection's
//! forwarding destinations. The run that met the refusal may be in an API process, which
//! has no NATS connection, so the store keeps the failure and every worker's sweep sends
//! what is owed; two sweeps sending the same one make the same deliveries, which
//! `HOOKS_FWD`'s duplicate window and the deliverer's markers drop.

use async_nats::jetstream;
use chrono::Utc;
use hookyard_core::store::refresh::OwedRefreshFailure;
use hookyard_core::Store;

use crate::forward::Delivery;
use crate::settings::Settings;
use crate::WorkerError;

/// Failures read per pass.
const BATCH: i64 = 200;

/// Queues the webhooks of the refused refreshes owed, and marks them sent; how many.
pub async fn sweep(settings: &Settings, jetstream: &jetstream::Context, store: &Store) -> Result<usize, WorkerError> {
    let mut sent = 0;
    loop {
        let owed = store.owed_refresh_failures(BATCH).await?;
        let mut deliveries = Vec::new();
        for failure in &owed {
            deliveries.extend(deliveries_of(settings, failure).await?);
        }
        crate::forward::publish_deliveries(jetstream, deliveries).await?;
        store.refresh_failures_notified(&owed, Utc::now()).await?;
        sent += owed.len();
        if owed.len() < BATCH as usize {
            return Ok(sent);
        }
    }
}

async fn deliveries_of(settings: &Settings, failure: &OwedRefreshFailure) -> Result<Vec<Delivery>, WorkerError> {
    let body = serde_json::to_vec(&body(failure)).expect("JSON serialises");
    let key = format!(
        "auth_refresh:{}:{}",
        failure.row_id,
        failure.failed_at.timestamp_micros()
    );
    let connection = (
        &failure.environment()?,
        &failure.integration()?,
        failure.connection_id.as_str(),
    );
    crate::forward::announcement(settings, connection, ("auth", &key), &body, |targets| {
        targets.auth_webhooks
    })
    .await
}

/// Nango's auth webhook body, for a refresh.
fn body(failure: &OwedRefreshFailure) -> serde_json::Value {
    serde_json::json!({
        "from": "hookyard",
        "type": "auth",
        "operation": "refresh",
        "connectionId": failure.connection_id,
        "authMode": "OAUTH2",
        "providerConfigKey": failure.integration,
        "provider": failure.provider,
        "environment": failure.environment,
        "success": false,
        "failedAt": failure.failed_at,
        "error": {"type": "refresh_token_external_error", "description": failure.error},
    })
}
