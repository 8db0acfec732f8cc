//! Sync notifications: after an execution (onWebhook or exec) that changed records, one POST per
//! model to the connection's forwarding destinations (Nango's `type: "sync"` body),
//! delivered like forwards. Runs that changed nothing send nothing, unless the
//! environment asks to always be told. An exec run that failed or died after writing
//! is notified of what it wrote, with `success: false` and why.
//!
//! A run's [`SyncNotice`] is written with its changes (the store's outbox). [`send`]
//! queues its notifications on `HOOKS_FWD` and deletes it; [`sweep`] sends the notices a
//! worker left behind (it died, or NATS was away). A notice sent twice makes the same
//! deliveries, which `HOOKS_FWD`'s duplicate window and the deliverer's markers drop.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream;
use chrono::SecondsFormat;
use hookyard_core::keys::EnvironmentName;
use hookyard_core::store::notices::SyncNotice;
use hookyard_core::store::records::WriteCounts;
use hookyard_core::Store;
use tokio_util::sync::CancellationToken;

use crate::forward::Delivery;
use crate::settings::Settings;
use crate::WorkerError;

/// Notices read by one pass of the sweep.
const SWEEP_BATCH: i64 = 500;

/// Whether runs in `environment` need a notice: only where something forwards. A
/// lookup that fails counts as yes; [`send`] decides later.
pub async fn wanted(settings: &Settings, environment: &EnvironmentName) -> bool {
    match settings.forwarding_environment(environment).await {
        Ok(found) => found.is_some(),
        Err(error) => {
            tracing::warn!(%error, "forwarding settings unreadable; keeping the run's sync notice");
            true
        }
    }
}

/// Queues the notifications of `notices` on `HOOKS_FWD`, then deletes the notices. On an
/// error they stay in the outbox, for the sweep.
pub async fn send(
    settings: &Settings,
    jetstream: &jetstream::Context,
    store: &Store,
    notices: &[SyncNotice],
) -> Result<(), WorkerError> {
    if notices.is_empty() {
        return Ok(());
    }
    let mut deliveries = Vec::new();
    for notice in notices {
        deliveries.extend(deliveries_of(settings, notice).await?);
    }
    crate::forward::publish_deliveries(jetstream, deliveries).await?;
    let keys: Vec<String> = notices.iter().map(SyncNotice::key).collect();
    store.delete_notices(&keys).await?;
    Ok(())
}

/// The deliveries of one notice: one per (changed model, destination).
async fn deliveries_of(settings: &Settings, notice: &SyncNotice) -> Result<Vec<Delivery>, WorkerError> {
    // The environment stopped forwarding (or is gone) since: nothing to send.
    let Some(environment) = settings.forwarding_environment(&notice.environment).await? else {
        return Ok(Vec::new());
    };
    let mut by_model: BTreeMap<&str, WriteCounts> = BTreeMap::new();
    for (model, count) in notice.models.iter().zip(notice.counts.iter()) {
        let sum = by_model.entry(model).or_default();
        *sum = sum.plus(count);
    }
    if by_model.is_empty() {
        return Ok(Vec::new());
    }
    let targets = settings
        .targets(&environment, Some((&notice.integration, &notice.connection)))
        .await?;
    let modified_after = notice.modified_after.to_rfc3339_opts(SecondsFormat::Millis, true);
    let mut deliveries = Vec::new();
    for (model, count) in by_model {
        if count.added + count.updated + count.deleted == 0 && !targets.always_notify {
            continue;
        }
        let mut body = serde_json::json!({
            "from": "hookyard",
            "type": "sync",
            "connectionId": notice.connection,
            "providerConfigKey": notice.integration,
            "syncName": notice.sync,
            "model": model,
            "syncType": notice.sync_type,
            "success": notice.error.is_none(),
            "modifiedAfter": modified_after,
            "responseResults": {"added": count.added, "updated": count.updated, "deleted": count.deleted},
        });
        if let Some(error) = &notice.error {
            // The run failed or died after these writes: they are in the cache all the same.
            body["error"] = serde_json::json!({"type": "run_failed", "description": error});
        }
        let body = serde_json::to_vec(&body).expect("JSON serialises");
        let key = notice.notification_key(model);
        for url in &targets.urls {
            deliveries.push(Delivery::new(
                &key,
                notice.environment.as_str(),
                notice.integration.as_str(),
                Some(&notice.connection),
                url,
                "sync",
                &body,
                Vec::new(),
            ));
        }
    }
    Ok(deliveries)
}

/// Sends the notices written more than `after` ago: those whose worker did not. How many.
pub async fn sweep(
    settings: &Settings,
    jetstream: &jetstream::Context,
    store: &Store,
    after: Duration,
) -> Result<usize, WorkerError> {
    let before = chrono::Utc::now() - after;
    let mut sent = 0;
    loop {
        let found = store.notices_before(before, SWEEP_BATCH).await?;
        let complete = found.len() < SWEEP_BATCH as usize;
        let mut notices = Vec::with_capacity(found.len());
        let mut unreadable = Vec::new();
        for notice in found {
            match notice {
                Ok(notice) => notices.push(notice),
                Err(bad) => {
                    tracing::error!(key = %bad.key, error = %bad.error, "a stored sync notice cannot be read; dropped");
                    unreadable.push(bad.key);
                }
            }
        }
        store.delete_notices(&unreadable).await?;
        send(settings, jetstream, store, &notices).await?;
        sent += notices.len();
        if complete {
            return Ok(sent);
        }
    }
}

/// Runs [`sweep`] and the sweep of refused refreshes' webhooks
/// ([`crate::auth_webhooks`]) every half `after` until `shutdown`.
pub async fn sweep_loop(
    settings: &Settings,
    jetstream: &jetstream::Context,
    store: &Store,
    after: Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(after / 2) => {}
        }
        report(
            sweep(settings, jetstream, store, after).await,
            "sync notices left by a worker queued",
            "queueing left-behind sync notices failed; trying again later",
        );
        report(
            crate::auth_webhooks::sweep(settings, jetstream, store).await,
            "webhooks of refused OAuth2 refreshes queued",
            "queueing webhooks of refused OAuth2 refreshes failed; trying again later",
        );
    }
}

/// Logs what one sweep did: `done` when it did something, `failed` when it could not.
pub(crate) fn report(outcome: Result<usize, WorkerError>, done: &str, failed: &str) {
    match outcome {
        Ok(0) => {}
        Ok(count) => tracing::info!(count, "{done}"),
        Err(error) => tracing::warn!(%error, "{failed}"),
    }
}
