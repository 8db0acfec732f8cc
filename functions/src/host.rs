//! The [`Host`] behind exec and event functions: record writes at the run's version,
//! delete tracking, checkpoints and metadata on the store, and the provider's API.
//!
//! In [`Mode::DryRun`] nothing is written: writes, deletes a `trackDeletesEnd` would make,
//! metadata and checkpoints are collected in a [`Plan`] instead (the provider's API is
//! still called for real, and a refreshed OAuth2 token is still stored: it is not the
//! connection's data).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use hookyard_core::store::notices::HeldNotice;
use hookyard_core::store::records::{LastAction, RecordQuery, RecordScope, StoredRecord, WriteCounts, WriteKind};
use hookyard_core::store::syncs::{SyncKey, Trigger};
use hookyard_core::store::MetadataWrite;
use hookyard_core::streams::RAW_STREAM;
use hookyard_core::Store;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use hookyard_core::config::ForwardingConfig;
use hookyard_core::keys::IntegrationKey;
use hookyard_core::providers::Catalog;
use hookyard_core::store::{Connection, Credentials, Integration, StoreError};

use crate::provider_api::{api_spec, Owner, ProviderApi, ProxyRequest};
use crate::Host;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Apply,
    DryRun,
}

/// What runs on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A sync's exec (or, in a dry run, its onWebhook): writes records.
    Sync,
    /// An event function (`createOnEvent`): no records, only metadata and the API.
    Event,
    /// An action (`createAction`), run by `POST /action/trigger`: as an event function.
    Action,
}

/// What a dry run would have done.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Plan {
    /// Per model: the records each kind of write would send, in call order.
    pub records: BTreeMap<String, PlannedWrites>,
    pub metadata: Vec<Value>,
    /// The checkpoint it would leave (`null`: cleared), if it touched it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PlannedWrites {
    pub save: Vec<Value>,
    pub update: Vec<Value>,
    /// Deleted by `batchDelete`, and by delete tracking (`{"id": …}`).
    pub delete: Vec<Value>,
}

/// The version an exec run writes at: after every webhook ingested so far (the last
/// `HOOKS_RAW` sequence), before any later one.
pub async fn raw_version(jetstream: &jetstream::Context) -> Result<i64, String> {
    let mut stream = jetstream.get_stream(RAW_STREAM).await.map_err(|e| e.to_string())?;
    let last = stream.info().await.map_err(|e| e.to_string())?.state.last_sequence;
    Ok(((last as i64) << 16) | 0xFFFF)
}

/// A run's connection (live), and its provider API (or why there is none: a run that
/// never calls it does not need one). A connection or integration that is not there is
/// [`StoreError::NotFound`].
pub async fn connection_api(
    store: &Store,
    catalog: &Catalog,
    key: &SyncKey,
    guard: &ForwardingConfig,
) -> Result<(Connection, Result<ProviderApi, String>), StoreError> {
    let connection = store
        .existing_connection(key.environment_id, &key.integration, &key.connection_id)
        .await?;
    let integration = store.existing_integration(key.environment_id, &key.integration).await?;
    let credentials = connection.credentials.clone();
    let owner = Owner::of(key);
    crate::rate_limit::learn(&owner, connection.rate_limited_until);
    let api = provider_api(store, catalog, &integration, credentials, owner, guard);
    Ok((connection, api))
}

/// The provider API of `integration` with a connection's `credentials`, or why there is
/// none (no base URL, a provider without an API).
fn provider_api(
    store: &Store,
    catalog: &Catalog,
    integration: &Integration,
    credentials: Option<Credentials>,
    owner: Owner,
    guard: &ForwardingConfig,
) -> Result<ProviderApi, String> {
    api_spec(catalog, integration)
        .and_then(|spec| ProviderApi::new(spec, credentials, owner, store.clone(), guard.clone()))
}

/// Blocks the JS thread on `call` for at most `time_left`, the run's time: a provider
/// that does not answer fails the call when the run's time is up. `call` is given the
/// instant that is, so as not to start waits it could not finish.
fn within<F: std::future::Future<Output = Result<String, String>>>(
    runtime: &tokio::runtime::Handle,
    op: &str,
    time_left: Duration,
    call: impl FnOnce(Instant) -> F,
) -> Result<String, String> {
    let now = Instant::now();
    let call = call(now.checked_add(time_left).unwrap_or(now + Duration::from_secs(86_400)));
    runtime.block_on(async {
        tokio::time::timeout(time_left, call)
            .await
            .unwrap_or_else(|_| Err(format!("{op}: the run's time ran out while it waited for the answer")))
    })
}

/// The provider API's calls (`proxy`, `getToken`, `pagination`), exec's and onWebhook's;
/// `None` for any other.
async fn provider_call<'a>(
    api: impl FnOnce() -> Result<&'a ProviderApi, String>,
    op: &str,
    args: &str,
    deadline: Instant,
) -> Option<Result<String, String>> {
    let answer = match op {
        "proxy" => match serde_json::from_str::<ProxyRequest>(args) {
            Ok(request) => match api() {
                Ok(api) => api
                    .call(request, deadline)
                    .await
                    .and_then(|response| serde_json::to_string(&response).map_err(|e| e.to_string())),
                Err(error) => Err(error),
            },
            Err(e) => Err(format!("{op}: {e}")),
        },
        "getToken" => match api() {
            Ok(api) => api.token().await.map(|token| token.to_string()),
            Err(error) => Err(error),
        },
        // No API: no pagination rules either (its calls say why).
        "pagination" => Ok(api().map(ProviderApi::pagination).unwrap_or(Value::Null).to_string()),
        _ => return None,
    };
    Some(answer)
}

/// `getRecordsByIds`: the cached records of a model with these ids (a hundred at most a
/// call) as committed now, with their `_nango_metadata`; deleted ones are not there.
async fn records_by_ids(store: &Store, scope: impl FnOnce(&str) -> RecordScope, args: &str) -> Result<String, String> {
    let op = "getRecordsByIds";
    let args: IdsArgs = serde_json::from_str(args).map_err(|e| format!("{op}: {e}"))?;
    if args.ids.len() > IDS_PER_CALL {
        return Err(format!("{op}: at most {IDS_PER_CALL} ids a call"));
    }
    let query = RecordQuery {
        cursor: None,
        modified_after: None,
        limit: IDS_PER_CALL as u32,
        filter: vec![LastAction::Added, LastAction::Updated],
        ids: Some(args.ids),
    };
    let page = store
        .list_records(&scope(&args.model), &query)
        .await
        .map_err(|e| format!("{op}: {e}"))?;
    let records: Vec<Value> = page.records.into_iter().map(StoredRecord::into_nango).collect();
    Ok(Value::Array(records).to_string())
}

/// What onWebhook's `nango` calls out to: the provider's API and reads of the records
/// cache, nothing else (its writes are collected and committed with the event). Made
/// from what the worker read for the group (the connection's credentials, the
/// integration), so that a provider call asks the store nothing; its API is made at the
/// first call, which most webhook functions never make. One per connection in a group
/// of events: its runs share a token refresh.
pub struct WebhookHost {
    runtime: tokio::runtime::Handle,
    source: std::sync::Arc<ApiSource>,
    owner: Owner,
    credentials: Option<Credentials>,
    /// `None`: deleted since the event was routed.
    integration: Option<std::sync::Arc<Integration>>,
    api: std::sync::OnceLock<Result<ProviderApi, String>>,
    /// When it was made: after every event of its group came.
    made: Instant,
}

/// What every onWebhook host of a worker shares: the store (for record reads and
/// refreshed tokens), the provider catalog, the rules for calls out.
pub struct ApiSource {
    pub store: Store,
    pub catalog: std::sync::Arc<Catalog>,
    pub guard: ForwardingConfig,
}

impl WebhookHost {
    /// A host for `owner`'s runs. Must be made on the async runtime its calls will block on.
    pub fn new(
        source: std::sync::Arc<ApiSource>,
        owner: Owner,
        credentials: Option<Credentials>,
        integration: Option<std::sync::Arc<Integration>>,
    ) -> WebhookHost {
        WebhookHost {
            runtime: tokio::runtime::Handle::current(),
            source,
            owner,
            credentials,
            integration,
            api: std::sync::OnceLock::new(),
            made: Instant::now(),
        }
    }

    fn api(&self) -> Result<&ProviderApi, String> {
        let api = self.api.get_or_init(|| {
            let integration = self
                .integration
                .as_deref()
                .ok_or_else(|| format!("integration {} does not exist", self.owner.integration))?;
            let source = &self.source;
            provider_api(
                &source.store,
                &source.catalog,
                integration,
                self.credentials.clone(),
                self.owner.clone(),
                &source.guard,
            )
            .map(|api| api.fresh_from(self.made))
        });
        api.as_ref().map_err(Clone::clone)
    }
}

impl Host for WebhookHost {
    fn call(&self, op: &str, args: &str, time_left: Duration) -> Result<String, String> {
        within(&self.runtime, op, time_left, |deadline| async move {
            if op == "getRecordsByIds" {
                let owner = &self.owner;
                let scope = |model: &str| RecordScope {
                    environment_id: owner.environment_id,
                    integration: owner.integration.clone(),
                    connection_id: owner.connection_id.clone(),
                    model: model.to_string(),
                };
                return records_by_ids(&self.source.store, scope, args).await;
            }
            provider_call(|| self.api(), op, args, deadline)
                .await
                .unwrap_or_else(|| Err(format!("{op}: only available in exec, not in onWebhook")))
        })
    }
}

/// What a host serves: one run of one function for one connection.
pub struct Run {
    pub store: Store,
    /// For `override` writes, which take the version at the time of the write.
    pub jetstream: Option<jetstream::Context>,
    pub key: SyncKey,
    /// The version the run writes at.
    pub version: i64,
    pub api: Result<ProviderApi, String>,
    pub mode: Mode,
    pub kind: Kind,
    /// An exec run's sync notice, kept current by each of its writes (`None`: nothing
    /// forwards, or not an exec run).
    pub notice: Option<HeldNotice>,
    /// Ingest's address for providers ([`Config::webhook_base_url`]), for `getWebhookURL`.
    ///
    /// [`Config::webhook_base_url`]: hookyard_core::config::Config::webhook_base_url
    pub webhook_base_url: String,
    /// Where `nango.triggerAction` runs actions (`None`: it cannot here).
    pub actions: Option<std::sync::Arc<crate::runs::Actions>>,
}

pub struct StoreHost {
    runtime: tokio::runtime::Handle,
    run: Run,
    state: Mutex<RunState>,
    /// Whose the run's locks are (`tryAcquireLock`): this run's, and no other's.
    owner: String,
}

#[derive(Default)]
struct RunState {
    counts: HashMap<String, WriteCounts>,
    /// Per model whose deletes are tracked: the ids written since `trackDeletesStart`.
    seen: HashMap<String, HashSet<String>>,
    plan: Plan,
    /// Whether the run took a lock: its locks are released when it ends.
    locked: bool,
}

#[derive(Deserialize)]
struct WriteArgs {
    strategy: String,
    kind: String,
    model: String,
    records: Vec<Value>,
}

#[derive(Deserialize)]
struct ModelArgs {
    model: String,
}

/// `getRecordsByIds` sends the ids a hundred at a time.
const IDS_PER_CALL: usize = 100;

#[derive(Deserialize)]
struct IdsArgs {
    model: String,
    ids: Vec<String>,
}

#[derive(Deserialize)]
struct IntegrationArgs {
    #[serde(default)]
    include: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LockArgs {
    key: Option<Value>,
    #[serde(default)]
    ttl_ms: Option<Value>,
}

/// The longest lock key, as Nango's.
const LOCK_KEY_MAX: usize = 255;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SyncTriggerArgs {
    provider_config_key: String,
    connection_id: String,
    sync_name: String,
    #[serde(default)]
    full_resync: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TriggerArgs {
    provider_config_key: String,
    connection_id: String,
    action_name: String,
    #[serde(default)]
    input: Value,
}

#[derive(Deserialize)]
struct MetadataArgs {
    how: String,
    value: Map<String, Value>,
}

impl Host for StoreHost {
    fn call(&self, op: &str, args: &str, time_left: Duration) -> Result<String, String> {
        within(&self.runtime, op, time_left, |deadline| {
            self.dispatch(op, args, deadline)
        })
    }
}

impl StoreHost {
    /// A host for `run`. Must be made on the async runtime its calls will block on.
    pub fn new(run: Run) -> StoreHost {
        StoreHost {
            runtime: tokio::runtime::Handle::current(),
            run,
            state: Mutex::default(),
            owner: hex::encode(hookyard_core::secrets::random_bytes::<12>()),
        }
    }

    async fn dispatch(&self, op: &str, args: &str, deadline: Instant) -> Result<String, String> {
        let parse_error = |e: serde_json::Error| format!("{op}: {e}");
        let store_error = |e: hookyard_core::store::StoreError| format!("{op}: {e}");
        let dry = self.run.mode == Mode::DryRun;
        if let Some(answer) = provider_call(|| self.run.api.as_ref().map_err(Clone::clone), op, args, deadline).await {
            return answer;
        }
        match op {
            "write" => {
                let args: WriteArgs = serde_json::from_str(args).map_err(parse_error)?;
                self.write(args).await?;
                Ok(String::new())
            }
            "metadata" => self.metadata(serde_json::from_str(args).map_err(parse_error)?).await,
            "lastSyncDate" => {
                let at = self
                    .run
                    .store
                    .last_sync_date(&self.run.key)
                    .await
                    .map_err(store_error)?;
                // In milliseconds, which is what a JS Date holds and parses.
                let text = at.map(|at| at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
                Ok(json!(text).to_string())
            }
            "getEnvironmentVariables" => {
                let variables = self
                    .run
                    .store
                    .environment_variables(self.run.key.environment_id)
                    .await
                    .map_err(store_error)?;
                serde_json::to_string(&variables).map_err(|e| e.to_string())
            }
            "getWebhookURL" => Ok(Value::String(self.webhook_url(op).await?).to_string()),
            "triggerAction" => {
                let args: TriggerArgs = serde_json::from_str(args).map_err(parse_error)?;
                self.trigger_action(args).await
            }
            "triggerSync" => {
                let args: SyncTriggerArgs = serde_json::from_str(args).map_err(parse_error)?;
                self.trigger_sync(args).await?;
                Ok(String::new())
            }
            "tryAcquireLock" | "releaseLock" => {
                let args: LockArgs = serde_json::from_str(args).map_err(parse_error)?;
                let key = match &args.key {
                    Some(Value::String(key)) if !key.is_empty() && key.chars().count() <= LOCK_KEY_MAX => key,
                    _ => return Err(format!("{op}: key must be a string of 1 to {LOCK_KEY_MAX} characters")),
                };
                let environment_id = self.run.key.environment_id;
                let done = if op == "releaseLock" {
                    self.run.store.release_lock(environment_id, key, &self.owner).await
                } else {
                    let ttl = match args.ttl_ms.as_ref().and_then(Value::as_f64) {
                        Some(ms) if ms >= 1.0 && ms.is_finite() => std::time::Duration::from_millis(ms as u64),
                        _ => return Err(format!("{op}: ttlMs must be a number of milliseconds, 1 or more")),
                    };
                    let taken = self
                        .run
                        .store
                        .try_acquire_lock(environment_id, key, &self.owner, chrono::Utc::now(), ttl)
                        .await;
                    if matches!(taken, Ok(true)) {
                        self.state().locked = true;
                    }
                    taken
                };
                Ok(done.map_err(store_error)?.to_string())
            }
            "releaseAllLocks" => {
                self.release_all_locks().await.map_err(store_error)?;
                Ok(String::new())
            }
            "getIntegration" => {
                let args: IntegrationArgs = serde_json::from_str(args).map_err(parse_error)?;
                let key = &self.run.key;
                let integration = self
                    .run
                    .store
                    .existing_integration(key.environment_id, &key.integration)
                    .await
                    .map_err(store_error)?;
                // Nango's shape (no `logo`: there is none here).
                let mut shown = json!({
                    "unique_key": integration.unique_key,
                    "provider": integration.provider,
                    "display_name": integration.display_name,
                    "forward_webhooks": integration.forward_webhooks,
                    "created_at": integration.created_at,
                    "updated_at": integration.updated_at,
                });
                for include in &args.include {
                    match include.as_str() {
                        "webhook" => shown["webhook_url"] = Value::String(self.webhook_url(op).await?),
                        "credentials" => {
                            return Err(format!(
                                "{op}: include 'credentials' is not served: functions are not given the \
                                 integration's OAuth client secret (getToken gives the connection's token)"
                            ))
                        }
                        other => return Err(format!("{op}: include {other:?} is not 'webhook' or 'credentials'")),
                    }
                }
                Ok(shown.to_string())
            }
            "getRecordsByIds" => records_by_ids(&self.run.store, |model| self.scope(model), args).await,
            "trackDeletesStart" => {
                let args: ModelArgs = serde_json::from_str(args).map_err(parse_error)?;
                self.state().seen.insert(args.model, HashSet::new());
                Ok(String::new())
            }
            "trackDeletesEnd" => {
                let args: ModelArgs = serde_json::from_str(args).map_err(parse_error)?;
                let seen = self
                    .state()
                    .seen
                    .remove(&args.model)
                    .ok_or_else(|| format!("trackDeletesEnd({:?}) without trackDeletesStart", args.model))?;
                let scope = self.scope(&args.model);
                if dry {
                    let gone = self
                        .run
                        .store
                        .unseen_records(&scope, &seen, self.run.version)
                        .await
                        .map_err(store_error)?;
                    let count = gone.len();
                    let mut state = self.state();
                    let planned = state.plan.records.entry(args.model).or_default();
                    planned.delete.extend(gone.into_iter().map(|id| json!({ "id": id })));
                    return Ok(count.to_string());
                }
                let counts = self
                    .run
                    .store
                    .delete_unseen(&scope, &seen, self.run.version, self.run.notice.as_ref())
                    .await
                    .map_err(store_error)?;
                self.count(&args.model, &counts);
                Ok(counts.deleted.to_string())
            }
            "getCheckpoint" => {
                if let Some(planned) = self.state().plan.checkpoint.clone() {
                    return Ok(planned.to_string());
                }
                Ok(self
                    .run
                    .store
                    .checkpoint(&self.run.key)
                    .await
                    .map_err(store_error)?
                    .unwrap_or(Value::Null)
                    .to_string())
            }
            "saveCheckpoint" | "clearCheckpoint" => {
                let checkpoint: Option<Value> = if op == "saveCheckpoint" {
                    Some(serde_json::from_str(args).map_err(parse_error)?)
                } else {
                    None
                };
                if dry {
                    self.state().plan.checkpoint = Some(checkpoint.unwrap_or(Value::Null));
                    return Ok(String::new());
                }
                self.run
                    .store
                    .set_checkpoint(&self.run.key, checkpoint.as_ref())
                    .await
                    .map_err(store_error)?;
                Ok(String::new())
            }
            other => Err(format!("nango has no {other}")),
        }
    }

    /// Releases every lock the run took, as the run ends, whatever its outcome; one it
    /// could not release (logged) runs out at its time.
    pub async fn release_locks(&self) {
        if let Err(error) = self.release_all_locks().await {
            let key = &self.run.key;
            tracing::warn!(%error, function = %key.sync, connection = %key.connection_id, "the run's locks were not released; they run out at their time");
        }
    }

    /// `releaseAllLocks`: every lock the run holds (none taken: no query).
    async fn release_all_locks(&self) -> Result<(), StoreError> {
        if !std::mem::take(&mut self.state().locked) {
            return Ok(());
        }
        self.run
            .store
            .release_all_locks(self.run.key.environment_id, &self.owner, chrono::Utc::now())
            .await
            .map(|_| ())
    }

    /// Nango's `triggerSync`: asks for a run of a sync with an exec for a connection of
    /// this environment, as `POST /sync/trigger` does (the reconciler queues it at its
    /// next tick); `fullResync` is its `reset`.
    async fn trigger_sync(&self, args: SyncTriggerArgs) -> Result<(), String> {
        let failed = |problem: String| format!("triggerSync({}): {problem}", args.sync_name);
        if self.run.mode == Mode::DryRun {
            return Err(failed("not in a dry run: it would queue a run for real".into()));
        }
        let environment_id = self.run.key.environment_id;
        let integration: IntegrationKey = args
            .provider_config_key
            .parse()
            .map_err(|e| failed(format!("providerConfigKey: {e}")))?;
        let store = &self.run.store;
        let functions = store
            .functions(environment_id)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let sync = functions
            .iter()
            .find(|f| f.integration == integration && f.name == args.sync_name && f.has_exec())
            .ok_or_else(|| {
                failed(format!(
                    "no sync with an exec of that name is deployed for integration {integration}"
                ))
            })?;
        store
            .existing_connection(environment_id, &integration, &args.connection_id)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let key = SyncKey {
            environment_id,
            integration,
            sync: args.sync_name.clone(),
            connection_id: args.connection_id.clone(),
        };
        let trigger = Trigger::new(args.full_resync, false);
        let auto_start = sync.auto_start();
        store
            .request_trigger(&[(key, auto_start)], &trigger)
            .await
            .map_err(|e| failed(e.to_string()))
    }

    /// Nango's `triggerAction`: runs an action of this environment for a connection and
    /// answers its output (JSON); its failure is thrown, with its message.
    async fn trigger_action(&self, args: TriggerArgs) -> Result<String, String> {
        let failed = |problem: String| format!("triggerAction({}): {problem}", args.action_name);
        if self.run.mode == Mode::DryRun {
            return Err(failed("not in a dry run: it would run the action for real".into()));
        }
        let Some(actions) = &self.run.actions else {
            return Err(failed(match self.run.kind {
                Kind::Action => {
                    "an action triggered by another cannot trigger a third (actions nest one level: \
                                 a deeper one could wait for ever on threads actions hold): call its code from this one"
                        .into()
                }
                _ => "actions cannot be triggered from here".into(),
            }));
        };
        let integration: IntegrationKey = args
            .provider_config_key
            .parse()
            .map_err(|e| failed(format!("providerConfigKey: {e}")))?;
        let output = actions
            .trigger(
                self.run.key.environment_id,
                &integration,
                &args.connection_id,
                &args.action_name,
                &args.input,
                crate::runs::Origin::Function,
            )
            .await
            .map_err(|e| failed(e.to_string()))?;
        Ok(output.unwrap_or(Value::Null).to_string())
    }

    async fn write(&self, args: WriteArgs) -> Result<(), String> {
        match self.run.kind {
            Kind::Sync => {}
            Kind::Event => return Err("event functions do not write records: use a sync".into()),
            Kind::Action => return Err("actions do not write records: use a sync".into()),
        }
        let kind = match args.kind.as_str() {
            "save" => WriteKind::Save,
            "update" => WriteKind::Update,
            _ => WriteKind::Delete,
        };
        {
            let mut state = self.state();
            if let Some(seen) = state.seen.get_mut(&args.model) {
                seen.extend(args.records.iter().map(record_id));
            }
        }
        if self.run.mode == Mode::DryRun {
            self.plan(&args.model, kind, args.records);
            return Ok(());
        }
        // `override`: the write wins over every webhook ingested until now.
        let version = match (&self.run.jetstream, args.strategy.as_str()) {
            (Some(jetstream), "override") => raw_version(jetstream).await?,
            _ => self.run.version,
        };
        let records: Vec<(String, Value)> = args.records.into_iter().map(|r| (record_id(&r), r)).collect();
        let counts = self
            .run
            .store
            .write_records(
                &self.scope(&args.model),
                kind,
                records,
                version,
                self.run.notice.as_ref(),
            )
            .await
            .map_err(|e| format!("writing {} records: {e}", args.model))?;
        self.count(&args.model, &counts);
        Ok(())
    }

    /// `setMetadata` / `updateMetadata` (or, dry, planned).
    async fn metadata(&self, args: MetadataArgs) -> Result<String, String> {
        if self.run.mode == Mode::DryRun {
            self.state()
                .plan
                .metadata
                .push(json!({"how": args.how, "value": args.value}));
            return Ok(String::new());
        }
        let how = if args.how == "replace" {
            MetadataWrite::Replace
        } else {
            MetadataWrite::Merge
        };
        let key = &self.run.key;
        self.run
            .store
            .set_connection_metadata(
                key.environment_id,
                &key.integration,
                std::slice::from_ref(&key.connection_id),
                &args.value,
                how,
            )
            .await
            .map_err(|e| format!("metadata: {e}"))?;
        Ok(String::new())
    }

    /// Applies (or, dry, plans) what an onWebhook collected, as exec's calls would.
    pub async fn apply_effects(
        &self,
        writes: Vec<crate::Write>,
        metadata: Vec<(MetadataWrite, Map<String, Value>)>,
    ) -> Result<(), String> {
        for write in writes {
            let kind = match write.kind {
                WriteKind::Save => "save",
                WriteKind::Update => "update",
                WriteKind::Delete => "delete",
            };
            self.write(WriteArgs {
                strategy: "ignore_if_modified_after".into(),
                kind: kind.into(),
                model: write.model,
                records: write.records.into_iter().map(|(_, record)| record).collect(),
            })
            .await?;
        }
        for (how, value) in metadata {
            let how = if how == MetadataWrite::Replace {
                "replace"
            } else {
                "merge"
            };
            self.metadata(MetadataArgs { how: how.into(), value }).await?;
        }
        Ok(())
    }

    fn plan(&self, model: &str, kind: WriteKind, records: Vec<Value>) {
        let mut state = self.state();
        let planned = state.plan.records.entry(model.to_string()).or_default();
        match kind {
            WriteKind::Save => planned.save.extend(records),
            WriteKind::Update => planned.update.extend(records),
            WriteKind::Delete => planned.delete.extend(records),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, RunState> {
        self.state.lock().expect("run state")
    }

    /// Where the provider sends this integration's webhooks for the run's environment.
    async fn webhook_url(&self, op: &str) -> Result<String, String> {
        let key = &self.run.key;
        let environment = self
            .run
            .store
            .environment_by_id(key.environment_id)
            .await
            .map_err(|e| format!("{op}: {e}"))?
            .ok_or_else(|| format!("{op}: the environment is gone"))?;
        Ok(environment.webhook_url(&self.run.webhook_base_url, key.integration.as_str()))
    }

    fn scope(&self, model: &str) -> RecordScope {
        self.run.key.scope(model)
    }

    fn count(&self, model: &str, counts: &WriteCounts) {
        let mut state = self.state();
        let total = state.counts.entry(model.to_string()).or_default();
        *total = total.plus(counts);
    }

    /// Per model: added, updated, deleted (what `GET /sync/status` reports).
    pub fn counts(&self) -> Value {
        self.counts_per_model()
            .into_iter()
            .map(|(model, c)| {
                (
                    model,
                    json!({"added": c.added, "updated": c.updated, "deleted": c.deleted}),
                )
            })
            .collect::<Map<String, Value>>()
            .into()
    }

    /// Each model's counts, by model name.
    pub fn counts_per_model(&self) -> Vec<(String, WriteCounts)> {
        let mut counts: Vec<(String, WriteCounts)> = self.state().counts.iter().map(|(m, c)| (m.clone(), *c)).collect();
        counts.sort_by(|a, b| a.0.cmp(&b.0));
        counts
    }

    /// What a dry run would have done.
    pub fn plan_so_far(&self) -> Plan {
        self.state().plan.clone()
    }
}

/// A connection's metadata, and the connection as `getConnection()` answers it (with
/// its credentials), as JSON.
pub fn connection_texts(connection: &Connection) -> (std::sync::Arc<str>, std::sync::Arc<str>) {
    let mut described = serde_json::to_value(connection).unwrap_or_default();
    described["credentials"] = serde_json::to_value(&connection.credentials).unwrap_or_default();
    (connection.metadata.to_string().into(), described.to_string().into())
}

/// What an exec (or event function) run of `connection` is given: its `nango` calls
/// `host`, and writes are refused outside `models` (a JSON array of names).
pub fn exec_invocation(
    connection: &Connection,
    models: std::sync::Arc<str>,
    host: std::sync::Arc<dyn Host>,
    validation: crate::RecordValidation,
) -> crate::Invocation {
    let (metadata, described) = connection_texts(connection);
    crate::Invocation {
        payload: "null".into(),
        connection_id: connection.connection_id.clone(),
        provider_config_key: connection.provider_config_key.to_string(),
        metadata,
        connection: described,
        models,
        handler: crate::Handler::Exec,
        host: Some(host),
        validation,
        environment_variables: "[]".into(),
    }
}

/// A record's id as stored: strings as they are, numbers as their text.
pub fn record_id(record: &Value) -> String {
    match &record["id"] {
        Value::String(id) => id.clone(),
        other => other.to_string(),
    }
}
