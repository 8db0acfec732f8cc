//! The live syncs, as a worker sees them: reloaded whenever a deploy moves the store's
//! functions revision on. A reload swaps the whole set at once; an execution that has
//! its sync keeps running on that version.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use hookyard_core::keys::{EnvironmentName, IntegrationKey};
use hookyard_core::store::functions::DeployedSync;
use hookyard_core::store::StoreError;
use hookyard_core::Store;
use hookyard_functions::compile::stored_modules;
use hookyard_functions::pool::SyncCode;

/// One live sync with its code.
#[derive(Debug)]
pub struct LiveSync {
    pub sync: DeployedSync,
    pub code: Arc<SyncCode>,
    pub subscriptions: Vec<String>,
    /// The model names as a JSON array, as executions are given them.
    pub models: Arc<str>,
}

impl LiveSync {
    /// Exact event type, or `'*'`.
    pub fn subscribes_to(&self, event_type: Option<&str>) -> bool {
        self.subscriptions
            .iter()
            .any(|s| s == "*" || Some(s.as_str()) == event_type)
    }

    /// The idempotency marker's consumer: one per sync, so that each sync of an event
    /// commits (and is retried) on its own.
    pub fn consumer(&self) -> String {
        format!(
            "onWebhook:{}/{}/{}",
            self.sync.environment, self.sync.integration, self.sync.name
        )
    }
}

#[derive(Default)]
struct Snapshot {
    revision: i64,
    syncs: HashMap<(EnvironmentName, IntegrationKey), Vec<Arc<LiveSync>>>,
    /// Bundles by hash, so that a reload does not decode unchanged ones again.
    bundles: HashMap<String, Arc<BTreeMap<String, Vec<u8>>>>,
}

pub struct Deployments {
    store: Store,
    current: RwLock<Arc<Snapshot>>,
}

impl Deployments {
    pub fn new(store: Store) -> Deployments {
        Deployments {
            store,
            current: RwLock::new(Arc::new(Snapshot {
                revision: -1,
                ..Default::default()
            })),
        }
    }

    /// The syncs of the integration subscribed to `event_type`.
    pub fn matching(
        &self,
        environment: &EnvironmentName,
        integration: &IntegrationKey,
        event_type: Option<&str>,
    ) -> Vec<Arc<LiveSync>> {
        let snapshot = self.current.read().expect("deployments lock").clone();
        snapshot
            .syncs
            .get(&(environment.clone(), integration.clone()))
            .map(|syncs| syncs.iter().filter(|s| s.subscribes_to(event_type)).cloned().collect())
            .unwrap_or_default()
    }

    /// One live sync by name.
    pub fn find(
        &self,
        environment: &EnvironmentName,
        integration: &IntegrationKey,
        name: &str,
    ) -> Option<Arc<LiveSync>> {
        let snapshot = self.current.read().expect("deployments lock").clone();
        snapshot
            .syncs
            .get(&(environment.clone(), integration.clone()))
            .and_then(|syncs| syncs.iter().find(|s| s.sync.name == name).cloned())
    }

    pub fn revision(&self) -> i64 {
        self.current.read().expect("deployments lock").revision
    }

    /// Reloads when a deploy happened since the last load; true when it did.
    pub async fn refresh(&self) -> Result<bool, StoreError> {
        let revision = self.store.functions_revision().await?;
        let previous = self.current.read().expect("deployments lock").clone();
        if revision == previous.revision {
            return Ok(false);
        }
        let mut next = Snapshot {
            revision,
            ..Default::default()
        };
        for sync in self.store.all_functions().await? {
            let modules = match next
                .bundles
                .get(&sync.bundle_hash)
                .or(previous.bundles.get(&sync.bundle_hash))
            {
                Some(modules) => modules.clone(),
                None => Arc::new(stored_modules(&self.store, &sync.bundle_hash).await?),
            };
            next.bundles.insert(sync.bundle_hash.clone(), modules.clone());
            let strings = |key: &str| -> Vec<String> {
                sync.config[key]
                    .as_array()
                    .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
                    .unwrap_or_default()
            };
            let live = LiveSync {
                code: Arc::new(SyncCode::of(&sync, modules)),
                subscriptions: strings("webhookSubscriptions"),
                models: serde_json::to_string(&strings("models"))
                    .expect("strings serialise")
                    .into(),
                sync,
            };
            next.syncs
                .entry((live.sync.environment.clone(), live.sync.integration.clone()))
                .or_default()
                .push(Arc::new(live));
        }
        tracing::info!(
            revision,
            syncs = next.syncs.values().map(Vec::len).sum::<usize>(),
            "functions loaded"
        );
        *self.current.write().expect("deployments lock") = Arc::new(next);
        Ok(true)
    }
}
