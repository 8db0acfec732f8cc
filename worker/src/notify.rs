//! Sync notifications: after an execution (onWebhook or exec) that changed records, one POST per
//! model to the connection's forwarding destinations (Nango's `type: "sync"` body),
//! delivered like forwards. Runs that changed nothing send nothing, unless the
//! environment asks to always be told.

use std::collections::BTreeMap;

use async_nats::jetstream;
use chrono::{SecondsFormat, Utc};
use hookyard_core::keys::{EnvironmentName, IntegrationKey};
use hookyard_core::store::records::WriteCounts;

use crate::forward::Delivery;
use crate::settings::Settings;
use crate::WorkerError;

/// One committed execution, as a notification describes it.
pub struct Run {
    pub environment: EnvironmentName,
    pub integration: IntegrationKey,
    pub connection: String,
    pub sync: String,
    /// The model of each record call, in call order.
    pub models: Vec<String>,
    /// The event's message id (or the exec run's id): with the sync and model, the
    /// notification's identity.
    pub message_id: String,
    /// Nango's `syncType`: `WEBHOOK` for onWebhook, `INITIAL` / `INCREMENTAL` for exec.
    pub sync_type: &'static str,
    /// Records changed after this are the run's (`modifiedAfter`).
    pub modified_after: chrono::DateTime<Utc>,
}

/// Puts the notifications of `runs` (each with its calls' counts) into `HOOKS_FWD`.
pub async fn notify(
    settings: &Settings,
    jetstream: &jetstream::Context,
    runs: &[(&Run, &[WriteCounts])],
) -> Result<(), WorkerError> {
    let mut deliveries = Vec::new();
    for (run, counts) in runs {
        // Most environments forward nothing: nothing else to look at for those.
        let Some(environment) = settings.forwarding_environment(&run.environment).await? else {
            continue;
        };
        let mut by_model: BTreeMap<&str, WriteCounts> = BTreeMap::new();
        for (model, count) in run.models.iter().zip(counts.iter()) {
            let sum = by_model.entry(model).or_default();
            *sum = sum.plus(count);
        }
        if by_model.is_empty() {
            continue;
        }
        let targets = settings
            .targets(&environment, Some((&run.integration, &run.connection)))
            .await?;
        if targets.urls.is_empty() {
            continue;
        }
        let modified_after = run.modified_after.to_rfc3339_opts(SecondsFormat::Millis, true);
        for (model, count) in by_model {
            if count.added + count.updated + count.deleted == 0 && !targets.always_notify {
                continue;
            }
            let body = serde_json::json!({
                "from": "hookyard",
                "type": "sync",
                "connectionId": run.connection,
                "providerConfigKey": run.integration,
                "syncName": run.sync,
                "model": model,
                "syncType": run.sync_type,
                "success": true,
                "modifiedAfter": modified_after,
                "responseResults": {"added": count.added, "updated": count.updated, "deleted": count.deleted},
            });
            let body = serde_json::to_vec(&body).expect("JSON serialises");
            let key = format!("{}:{}:{model}:sync", run.message_id, run.sync);
            for url in &targets.urls {
                deliveries.push(Delivery::new(
                    &key,
                    run.environment.as_str(),
                    run.integration.as_str(),
                    Some(&run.connection),
                    url,
                    "sync",
                    &body,
                    Vec::new(),
                ));
            }
        }
    }
    crate::forward::publish_deliveries(jetstream, deliveries).await
}
