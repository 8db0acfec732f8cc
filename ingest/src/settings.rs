//! The environments and integrations ingest needs, held in memory and reloaded from the
//! store in the background, so that a webhook costs no database query. A store that is
//! down leaves the last good copy in place.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use hookyard_core::keys::EnvironmentName;
use hookyard_core::metrics::names;
use hookyard_core::providers::{Catalog, Provider};
use hookyard_core::store::{Integration, StoreError};
use hookyard_core::Store;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// One environment as ingest sees it: its name and its integrations by key.
pub struct EnvironmentEntry {
    pub name: EnvironmentName,
    pub integrations: HashMap<String, IntegrationEntry>,
}

/// An integration with the provider rules that apply to it (its settings' overrides
/// included), or why they could not be put together.
pub struct IntegrationEntry {
    pub integration: Arc<Integration>,
    pub rules: Result<Arc<Provider>, String>,
    /// Its `accepted` count, registered once here rather than looked up per webhook.
    pub accepted: metrics::Counter,
}

#[derive(Default)]
pub struct Snapshot {
    by_webhook_id: HashMap<Uuid, EnvironmentEntry>,
}

impl Snapshot {
    pub fn environment(&self, webhook_id: &Uuid) -> Option<&EnvironmentEntry> {
        self.by_webhook_id.get(webhook_id)
    }
}

#[derive(Clone)]
pub struct SettingsCache {
    current: Arc<RwLock<Arc<Snapshot>>>,
    store: Store,
    catalog: Arc<Catalog>,
    /// When a miss last reloaded the copy (see [`SettingsCache::after_miss`]).
    miss_reloaded: Arc<tokio::sync::Mutex<Option<Instant>>>,
}

/// A miss reloads the copy at most this often…
const MISS_RELOAD_EVERY: Duration = Duration::from_secs(1);
/// …and waits this long at most for the store.
const MISS_RELOAD_TIMEOUT: Duration = Duration::from_secs(1);

impl SettingsCache {
    /// Loads the settings once (an error here stops the start) and keeps them fresh
    /// every `refresh` until `shutdown`.
    pub async fn load(
        store: Store,
        catalog: Arc<Catalog>,
        refresh: Duration,
        shutdown: CancellationToken,
    ) -> Result<SettingsCache, StoreError> {
        let cache = SettingsCache {
            current: Arc::new(RwLock::new(Arc::new(read_snapshot(&store, &catalog).await?))),
            store,
            catalog,
            miss_reloaded: Arc::default(),
        };
        let refreshed = cache.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(refresh);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                refreshed.reload("refresh").await;
            }
        });
        Ok(cache)
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The copy after a webhook for an environment or integration it does not have:
    /// reloaded now, so that one created a moment ago (a provider pings its new URL at
    /// once) is found without waiting for the next refresh. At most one reload a
    /// second, one at a time, bounded by [`MISS_RELOAD_TIMEOUT`], so a scan of made-up
    /// paths cannot turn into a query per request.
    pub async fn after_miss(&self) -> Arc<Snapshot> {
        let mut last = self.miss_reloaded.lock().await;
        if last.is_some_and(|at| at.elapsed() < MISS_RELOAD_EVERY) {
            return self.snapshot();
        }
        *last = Some(Instant::now());
        if tokio::time::timeout(MISS_RELOAD_TIMEOUT, self.reload("miss"))
            .await
            .is_err()
        {
            tracing::warn!("reloading integration settings after a miss timed out; keeping the last copy");
        }
        self.snapshot()
    }

    /// Reads the settings again; a store that fails leaves the last copy in place.
    async fn reload(&self, after: &'static str) {
        match read_snapshot(&self.store, &self.catalog).await {
            Ok(snapshot) => *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(snapshot),
            Err(error) => {
                tracing::warn!(%error, after, "reloading integration settings failed; keeping the last copy")
            }
        }
    }
}

async fn read_snapshot(store: &Store, catalog: &Catalog) -> Result<Snapshot, StoreError> {
    let environments = store.environments().await?;
    let mut by_id: HashMap<i64, EnvironmentEntry> = HashMap::new();
    let mut webhook_ids = HashMap::new();
    for environment in environments {
        webhook_ids.insert(environment.id, environment.webhook_id);
        by_id.insert(
            environment.id,
            EnvironmentEntry {
                name: environment.name,
                integrations: HashMap::new(),
            },
        );
    }
    for integration in store.integrations(None).await? {
        if let Some(entry) = by_id.get_mut(&integration.environment_id) {
            let rules = catalog
                .resolve(&integration.provider, &integration.settings)
                .map_err(|e| e.to_string());
            if let Err(error) = &rules {
                tracing::warn!(integration = %integration.unique_key, %error, "integration settings are invalid; its webhooks are refused");
            }
            let key = integration.unique_key.as_str().to_string();
            let accepted =
                metrics::counter!(names::WEBHOOKS_RECEIVED, "integration" => key.clone(), "outcome" => "accepted");
            entry.integrations.insert(
                key,
                IntegrationEntry {
                    integration: Arc::new(integration),
                    rules,
                    accepted,
                },
            );
        }
    }
    Ok(Snapshot {
        by_webhook_id: by_id.into_iter().map(|(id, entry)| (webhook_ids[&id], entry)).collect(),
    })
}
