//! Environments, integrations and forwarding targets as the forwarder, the deliverer and
//! sync notifications read them, and environment variables as onWebhook reads them:
//! from the store, kept for a second so that a burst does not query it per event (a
//! change is seen within that second).

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hookyard_core::keys::{EnvironmentName, IntegrationKey};
use hookyard_core::store::forwarding::ForwardTargets;
use hookyard_core::store::{Environment, Integration, StoreError};
use hookyard_core::Store;

const TTL: Duration = Duration::from_secs(1);

struct Cached<K, V>(Mutex<HashMap<K, (Instant, V)>>);

impl<K: Eq + Hash, V: Clone> Cached<K, V> {
    fn new() -> Self {
        Cached(Mutex::new(HashMap::new()))
    }

    fn get(&self, key: &K) -> Option<V> {
        let map = self.0.lock().expect("cache lock");
        map.get(key)
            .filter(|(at, _)| at.elapsed() < TTL)
            .map(|(_, v)| v.clone())
    }

    fn put(&self, key: K, value: V) -> V {
        let mut map = self.0.lock().expect("cache lock");
        if map.len() > 10_000 {
            map.retain(|_, (at, _)| at.elapsed() < TTL);
        }
        map.insert(key, (Instant::now(), value.clone()));
        value
    }
}

pub struct Settings {
    store: Store,
    environments: Cached<String, Option<Environment>>,
    integrations: Cached<(i64, String), Option<Integration>>,
    targets: Cached<(i64, Option<(String, String)>), ForwardTargets>,
    disabled: Cached<i64, Arc<HashSet<String>>>,
    /// Moved on by every [`Settings::forget_disabled`]: a load that began before it does
    /// not put its (stale) set back in the cache.
    disabled_generation: std::sync::atomic::AtomicU64,
    forwarding_set: Cached<i64, bool>,
    /// Each environment's variables as the JSON `getEnvironmentVariables()` answers.
    variables: Cached<i64, Arc<str>>,
}

impl Settings {
    pub fn new(store: Store) -> Settings {
        Settings {
            store,
            environments: Cached::new(),
            integrations: Cached::new(),
            targets: Cached::new(),
            disabled: Cached::new(),
            disabled_generation: std::sync::atomic::AtomicU64::new(0),
            forwarding_set: Cached::new(),
            variables: Cached::new(),
        }
    }

    /// The environment's variables, as JSON (`[{name, value}]`).
    pub async fn environment_variables(&self, environment_id: i64) -> Result<Arc<str>, StoreError> {
        if let Some(hit) = self.variables.get(&environment_id) {
            return Ok(hit);
        }
        let variables = self.store.environment_variables(environment_id).await?;
        let json = serde_json::to_string(&variables).expect("variables serialise");
        Ok(self.variables.put(environment_id, json.into()))
    }

    pub async fn environment(&self, name: &EnvironmentName) -> Result<Option<Environment>, StoreError> {
        let key = name.to_string();
        if let Some(hit) = self.environments.get(&key) {
            return Ok(hit);
        }
        Ok(self.environments.put(key, self.store.environment(name).await?))
    }

    pub async fn integration(
        &self,
        environment_id: i64,
        key: &IntegrationKey,
    ) -> Result<Option<Integration>, StoreError> {
        let cache_key = (environment_id, key.to_string());
        if let Some(hit) = self.integrations.get(&cache_key) {
            return Ok(hit);
        }
        Ok(self
            .integrations
            .put(cache_key, self.store.integration(environment_id, key).await?))
    }

    /// The environment, when it (or one of its connections) forwards anywhere.
    pub async fn forwarding_environment(&self, name: &EnvironmentName) -> Result<Option<Environment>, StoreError> {
        let Some(environment) = self.environment(name).await? else {
            return Ok(None);
        };
        let set = match self.forwarding_set.get(&environment.id) {
            Some(set) => set,
            None => self
                .forwarding_set
                .put(environment.id, self.store.forwarding_set(environment.id).await?),
        };
        Ok(set.then_some(environment))
    }

    /// The environment's destinations disabled by a 410.
    pub async fn disabled(&self, environment_id: i64) -> Result<Arc<HashSet<String>>, StoreError> {
        use std::sync::atomic::Ordering;
        if let Some(hit) = self.disabled.get(&environment_id) {
            return Ok(hit);
        }
        let generation = self.disabled_generation.load(Ordering::SeqCst);
        let disabled = Arc::new(self.store.disabled_destinations(environment_id).await?);
        // Read before a destination was disabled: good for this caller, not for the cache.
        if self.disabled_generation.load(Ordering::SeqCst) != generation {
            return Ok(disabled);
        }
        Ok(self.disabled.put(environment_id, disabled))
    }

    /// Drops the cached disabled destinations (after this process disabled one), and
    /// keeps loads already under way from caching what they read.
    pub fn forget_disabled(&self, environment_id: i64) {
        self.disabled_generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.disabled.0.lock().expect("cache lock").remove(&environment_id);
    }

    /// Where a connection's forwards go (`None`: an unrouted event's).
    pub async fn targets(
        &self,
        environment: &Environment,
        connection: Option<(&IntegrationKey, &str)>,
    ) -> Result<ForwardTargets, StoreError> {
        let key = (environment.id, connection.map(|(i, c)| (i.to_string(), c.to_string())));
        if let Some(hit) = self.targets.get(&key) {
            return Ok(hit);
        }
        Ok(self
            .targets
            .put(key, self.store.forward_targets(environment, connection).await?))
    }
}
