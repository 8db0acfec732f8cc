//! Which connections an event goes to. Integrations and their live connections are
//! cached; each webhook is routed with the integration's `connections_version` as read
//! after it arrived (one primary-key lookup, shared by the webhooks that arrived while
//! the previous one ran: [`FreshRead`]), and the connections are reloaded when it
//! moved: a connection deleted before a webhook arrives is never matched by it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hookyard_core::keys::{EnvironmentName, IntegrationKey};
use hookyard_core::providers::extract::scalars;
use hookyard_core::providers::{Catalog, Provider, Route, RoutingTarget};
use hookyard_core::store::{Connection, Integration, StoreError};
use hookyard_core::Store;

use crate::fresh::FreshRead;

/// How long an integration's settings (provider, routing overrides) are trusted.
const INTEGRATION_TTL: Duration = Duration::from_secs(5);

/// An integration with its rules and its connections as of `version`.
pub struct IntegrationState {
    pub integration: Integration,
    pub rules: Arc<Provider>,
    /// The index, as of its last version check.
    connections: FreshRead<Arc<ConnectionIndex>, StoreError>,
    loaded_at: Instant,
}

/// The live connections of one integration, indexed by what routing matches on.
pub struct ConnectionIndex {
    version: i64,
    /// What `by_value` is keyed by (the integration's settings can change it).
    target: Option<RoutingTarget>,
    /// In creation order (what `Route::All` delivers to).
    ids: Vec<String>,
    /// The same ids, for `Route::ConnectionIds` lookups.
    live: HashSet<String>,
    by_value: HashMap<(RoutingTarget, String), Vec<String>>,
}

impl ConnectionIndex {
    fn build(version: i64, connections: Vec<Connection>, target: Option<&RoutingTarget>) -> ConnectionIndex {
        let mut by_value: HashMap<(RoutingTarget, String), Vec<String>> = HashMap::new();
        if let Some(target) = target {
            for connection in &connections {
                let holder = match target {
                    RoutingTarget::ConnectionConfig(key) => connection.connection_config.get(key),
                    RoutingTarget::Metadata(key) => connection.metadata.get(key),
                };
                for value in scalars(holder) {
                    by_value
                        .entry((target.clone(), value))
                        .or_default()
                        .push(connection.connection_id.clone());
                }
            }
        }
        let ids: Vec<String> = connections.into_iter().map(|c| c.connection_id).collect();
        ConnectionIndex {
            version,
            target: target.cloned(),
            live: ids.iter().cloned().collect(),
            ids,
            by_value,
        }
    }

    /// The connection ids `route` selects; an empty list means none matched.
    pub fn select(&self, route: &Route) -> Vec<String> {
        let mut chosen: Vec<String> = match route {
            Route::All => self.ids.clone(),
            Route::ConnectionIds(wanted) => wanted.iter().filter(|id| self.live.contains(*id)).cloned().collect(),
            Route::Values(target, values) => values
                .iter()
                .flat_map(|v| self.by_value.get(&(target.clone(), v.clone())).into_iter().flatten())
                .cloned()
                .collect(),
            Route::Missing => Vec::new(),
        };
        // One event reaches a connection once, even when several of its values match.
        let mut seen = HashSet::new();
        chosen.retain(|id| seen.insert(id.clone()));
        chosen
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

type IntegrationCache = HashMap<(EnvironmentName, IntegrationKey), Arc<IntegrationState>>;

#[derive(Clone)]
pub struct Resolver {
    store: Store,
    catalog: Arc<Catalog>,
    integrations: Arc<Mutex<IntegrationCache>>,
}

impl Resolver {
    pub fn new(store: Store, catalog: Arc<Catalog>) -> Resolver {
        Resolver {
            store,
            catalog,
            integrations: Arc::default(),
        }
    }

    /// The integration's state; `None` when it no longer exists.
    pub async fn integration(
        &self,
        environment: &EnvironmentName,
        key: &IntegrationKey,
    ) -> Result<Option<Arc<IntegrationState>>, StoreError> {
        let cache_key = (environment.clone(), key.clone());
        if let Some(state) = self.cached(&cache_key) {
            return Ok(Some(state));
        }
        let Some(env) = self.store.environment(environment).await? else {
            return Ok(None);
        };
        let Some(integration) = self.store.integration(env.id, key).await? else {
            return Ok(None);
        };
        let rules = self
            .catalog
            .resolve(&integration.provider, &integration.settings)
            .map_err(|e| StoreError::Invalid(format!("integration {key}: {e}")))?;
        // The expired state's connections are kept for the version check to confirm:
        // reloading every connection of a large integration each time would be wasted.
        let connections = match self
            .integrations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&cache_key)
        {
            Some(expired) if expired.integration.id == integration.id => expired.connections.carried(),
            _ => FreshRead::default(),
        };
        let state = Arc::new(IntegrationState {
            integration,
            rules,
            connections,
            loaded_at: Instant::now(),
        });
        self.integrations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(cache_key, state.clone());
        Ok(Some(state))
    }

    fn cached(&self, key: &(EnvironmentName, IntegrationKey)) -> Option<Arc<IntegrationState>> {
        let map = self.integrations.lock().unwrap_or_else(|e| e.into_inner());
        map.get(key)
            .filter(|s| s.loaded_at.elapsed() < INTEGRATION_TTL)
            .cloned()
    }

    /// The integration's live connections as of at most `staleness` ago (zero: as of a
    /// version check that began after this call). A replay routes thousands of webhooks
    /// a second, and need not ask the store for each.
    pub async fn connections_within(
        &self,
        state: &IntegrationState,
        staleness: Duration,
    ) -> Result<Arc<ConnectionIndex>, Arc<StoreError>> {
        let since = Instant::now().checked_sub(staleness);
        let id = state.integration.id;
        // Only when a read runs: a webhook that shares one does no work of its own.
        let check = |current: Option<Arc<ConnectionIndex>>| async move {
            let target = state.rules.routing.target().ok();
            let version = self.store.connections_version(id).await?;
            if let Some(index) = current.filter(|index| index.version == version && index.target == target) {
                return Ok(index);
            }
            let (version, connections) = self.store.routing_connections(id).await?;
            Ok(Arc::new(ConnectionIndex::build(version, connections, target.as_ref())))
        };
        state.connections.get(since, check).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn connection(id: &str, config: Value) -> Connection {
        Connection {
            row_id: 0,
            environment_id: 1,
            connection_id: id.into(),
            provider_config_key: "x".parse().unwrap(),
            provider: "x".into(),
            connection_config: config,
            metadata: json!({}),
            tags: json!({}),
            credentials: None,
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
            refresh_failure: None,
            rate_limited_until: None,
        }
    }

    #[test]
    fn selects_by_value_membership_id_and_all() {
        let target = RoutingTarget::ConnectionConfig("portalId".into());
        let index = ConnectionIndex::build(
            1,
            vec![
                connection("a", json!({"portalId": 11})),
                connection("b", json!({"portalId": "22"})),
                connection("c", json!({"portalId": [11, 33]})),
                connection("d", json!({})),
            ],
            Some(&target),
        );
        let by = |values: &[&str]| Route::Values(target.clone(), values.iter().map(|v| v.to_string()).collect());
        assert_eq!(index.select(&by(&["11"])), ["a", "c"]);
        assert_eq!(index.select(&by(&["22"])), ["b"], "numbers and strings compare as text");
        assert_eq!(index.select(&by(&["11", "33"])), ["a", "c"], "each connection once");
        assert!(index.select(&by(&["99"])).is_empty());
        assert_eq!(
            index.select(&Route::ConnectionIds(vec!["d".into(), "zz".into()])),
            ["d"]
        );
        assert_eq!(index.select(&Route::All).len(), 4);
        assert!(index.select(&Route::Missing).is_empty());
    }
}
