//! Deployed webhook functions. A deploy stores its compiled bundle once (by content
//! hash) and a new version of each sync whose code or configuration changed; syncs left
//! out of the deploy are retired. Workers keep the live set and reload it when
//! [`Store::functions_revision`] moves on.

use std::collections::BTreeMap;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::types::Json;

use super::model::corrupt;
use super::tx::on_tx;
use super::{conflict_on_unique, Environment, Pool, Store, StoreError};
use crate::keys::{EnvironmentName, IntegrationKey};

/// A deploy's files, compiled: module name → QuickJS bytecode, written by `engine`.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionBundle {
    /// Hash of the sources and the engine: the same project compiled by the same engine
    /// is stored once.
    pub hash: String,
    pub engine: String,
    pub sources: BTreeMap<String, String>,
    pub modules: BTreeMap<String, Vec<u8>>,
}

/// One sync as a deploy describes it.
#[derive(Debug, Clone)]
pub struct NewSync {
    pub integration: IntegrationKey,
    pub name: String,
    /// The module whose default export is the sync.
    pub entry: String,
    /// Hash of the modules the sync loads: equal hashes and configs mean unchanged.
    pub code_hash: String,
    /// What the sync declares (`webhookSubscriptions`, `models`, `frequency`, …).
    pub config: Value,
}

/// A live sync.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeployedSync {
    #[serde(skip)]
    pub id: i64,
    #[serde(skip)]
    pub environment_id: i64,
    #[serde(skip)]
    pub environment: EnvironmentName,
    pub integration: IntegrationKey,
    pub name: String,
    pub version: i32,
    #[serde(skip)]
    pub bundle_hash: String,
    #[serde(skip)]
    pub entry: String,
    pub code_hash: String,
    pub config: Value,
    pub deployed_at: DateTime<Utc>,
}

/// What a function's stored configuration says of it, read in one place.
fn is_action(config: &Value) -> bool {
    config["type"] == "action"
}

impl NewSync {
    /// An action (`createAction`): run when triggered, never scheduled.
    pub fn is_action(&self) -> bool {
        is_action(&self.config)
    }
}

impl DeployedSync {
    /// An action (`createAction`): run when triggered, never scheduled.
    pub fn is_action(&self) -> bool {
        is_action(&self.config)
    }

    /// A sync with an `exec`: scheduled and triggered per connection.
    pub fn has_exec(&self) -> bool {
        self.config["exec"] == true
    }

    /// Whether a connection's schedule starts by itself (`autoStart`, unless false).
    pub fn auto_start(&self) -> bool {
        self.config["autoStart"] != false
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncChange {
    Added,
    Updated,
    Unchanged,
    Removed,
}

/// What a deploy did to one sync.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeployedChange {
    pub integration: String,
    pub name: String,
    /// The live version after the deploy (the last one, for a removed sync).
    pub version: i32,
    pub change: SyncChange,
}

#[derive(sqlx::FromRow)]
struct SyncRow {
    id: i64,
    environment_id: i64,
    environment: String,
    integration: String,
    name: String,
    version: i32,
    bundle_hash: String,
    entry: String,
    code_hash: String,
    config: Json<Value>,
    created_at: DateTime<Utc>,
}

impl SyncRow {
    fn open(self) -> Result<DeployedSync, StoreError> {
        Ok(DeployedSync {
            id: self.id,
            environment_id: self.environment_id,
            environment: self
                .environment
                .try_into()
                .map_err(|e| corrupt("function environment", e))?,
            integration: self
                .integration
                .parse()
                .map_err(|e| corrupt("function integration", e))?,
            name: self.name,
            version: self.version,
            bundle_hash: self.bundle_hash,
            entry: self.entry,
            code_hash: self.code_hash,
            config: self.config.0,
            deployed_at: self.created_at,
        })
    }
}

const LIVE: &str =
    "SELECT f.id, f.environment_id, e.name AS environment, f.integration, f.name, f.version, f.bundle_hash,
        f.entry, f.code_hash, f.config, f.created_at
    FROM functions f JOIN environments e ON e.id = f.environment_id
    WHERE f.superseded_at IS NULL";

impl Store {
    /// Stores `bundle` and makes `syncs` the environment's live syncs: changed ones get a
    /// new version, unchanged ones keep theirs, the others are retired. One transaction.
    pub async fn deploy_functions(
        &self,
        environment: &Environment,
        bundle: &FunctionBundle,
        syncs: &[NewSync],
    ) -> Result<Vec<DeployedChange>, StoreError> {
        let now = Utc::now();
        let live = self.functions(environment.id).await?;
        let modules: BTreeMap<&str, String> = bundle
            .modules
            .iter()
            .map(|(name, code)| (name.as_str(), base64::engine::general_purpose::STANDARD.encode(code)))
            .collect();
        let mut tx = self.begin().await?;
        on_tx!(&mut tx, |conn| {
            sqlx::query(
                "INSERT INTO function_bundles (hash, engine, sources, modules, created_at) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (hash) DO NOTHING",
            )
            .bind(&bundle.hash)
            .bind(&bundle.engine)
            .bind(Json(&bundle.sources))
            .bind(Json(&modules))
            .bind(now)
            .execute(&mut *conn)
            .await
            .map(|_| ())
        })?;
        let mut changes = Vec::new();
        for sync in syncs {
            let current = live
                .iter()
                .find(|f| f.integration == sync.integration && f.name == sync.name);
            let change = match current {
                Some(f) if f.code_hash == sync.code_hash && f.config == sync.config && f.bundle_hash == bundle.hash => {
                    SyncChange::Unchanged
                }
                // Same code, another bundle (a sibling changed): point at the new bundle
                // without a new version.
                Some(f) if f.code_hash == sync.code_hash && f.config == sync.config => {
                    on_tx!(&mut tx, |conn| {
                        sqlx::query("UPDATE functions SET bundle_hash = $1 WHERE id = $2")
                            .bind(&bundle.hash)
                            .bind(f.id)
                            .execute(&mut *conn)
                            .await
                            .map(|_| ())
                    })?;
                    SyncChange::Unchanged
                }
                Some(_) => SyncChange::Updated,
                None => SyncChange::Added,
            };
            let version = match change {
                SyncChange::Unchanged => current.map(|f| f.version).unwrap_or(1),
                _ => {
                    if let Some(f) = current {
                        retire(&mut tx, f.id, now).await?;
                    }
                    let version: i32 = on_tx!(&mut tx, |conn| {
                        sqlx::query_scalar(
                            "SELECT COALESCE(MAX(version), 0) + 1 FROM functions
                             WHERE environment_id = $1 AND integration = $2 AND name = $3",
                        )
                        .bind(environment.id)
                        .bind(sync.integration.as_str())
                        .bind(&sync.name)
                        .fetch_one(&mut *conn)
                        .await
                    })?;
                    let inserted = on_tx!(&mut tx, |conn| {
                        sqlx::query(
                            "INSERT INTO functions (environment_id, integration, name, version, bundle_hash, entry,
                                                    code_hash, config, created_at)
                             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                        )
                        .bind(environment.id)
                        .bind(sync.integration.as_str())
                        .bind(&sync.name)
                        .bind(version)
                        .bind(&bundle.hash)
                        .bind(&sync.entry)
                        .bind(&sync.code_hash)
                        .bind(Json(&sync.config))
                        .bind(now)
                        .execute(&mut *conn)
                        .await
                        .map(|_| ())
                    });
                    conflict_on_unique(inserted, || {
                        format!("a concurrent deploy of {}/{}", sync.integration, sync.name)
                    })?;
                    version
                }
            };
            changes.push(DeployedChange {
                integration: sync.integration.to_string(),
                name: sync.name.clone(),
                version,
                change,
            });
        }
        for f in &live {
            if !syncs.iter().any(|s| s.integration == f.integration && s.name == f.name) {
                retire(&mut tx, f.id, now).await?;
                changes.push(DeployedChange {
                    integration: f.integration.to_string(),
                    name: f.name.clone(),
                    version: f.version,
                    change: SyncChange::Removed,
                });
            }
        }
        on_tx!(&mut tx, |conn| {
            sqlx::query("INSERT INTO function_deploys (environment_id, summary, created_at) VALUES ($1, $2, $3)")
                .bind(environment.id)
                .bind(Json(&changes))
                .bind(now)
                .execute(&mut *conn)
                .await
                .map(|_| ())
        })?;
        tx.commit().await?;
        Ok(changes)
    }

    /// The environment's live syncs, by integration and name.
    pub async fn functions(&self, environment_id: i64) -> Result<Vec<DeployedSync>, StoreError> {
        let query = format!("{LIVE} AND f.environment_id = $1 ORDER BY f.integration, f.name");
        let rows: Vec<SyncRow> = on_pool!(self, |pool| sqlx::query_as(&query)
            .bind(environment_id)
            .fetch_all(pool)
            .await)?;
        rows.into_iter().map(SyncRow::open).collect()
    }

    /// Every environment's live syncs.
    pub async fn all_functions(&self) -> Result<Vec<DeployedSync>, StoreError> {
        let query = format!("{LIVE} ORDER BY f.id");
        let rows: Vec<SyncRow> = on_pool!(self, |pool| sqlx::query_as(&query).fetch_all(pool).await)?;
        rows.into_iter().map(SyncRow::open).collect()
    }

    /// Moves on with every deploy: a worker whose copy is older reloads.
    pub async fn functions_revision(&self) -> Result<i64, StoreError> {
        Ok(on_pool!(self, |pool| sqlx::query_scalar::<_, i64>(
            "SELECT COALESCE(MAX(id), 0) FROM function_deploys"
        )
        .fetch_one(pool)
        .await)?)
    }

    pub async fn function_bundle(&self, hash: &str) -> Result<FunctionBundle, StoreError> {
        // engine, sources by path, bytecode (base64) by module name
        type Row = (String, Json<BTreeMap<String, String>>, Json<BTreeMap<String, String>>);
        let row: Option<Row> = on_pool!(self, |pool| sqlx::query_as(
            "SELECT engine, sources, modules FROM function_bundles WHERE hash = $1"
        )
        .bind(hash)
        .fetch_optional(pool)
        .await)?;
        let (engine, Json(sources), Json(modules)) =
            row.ok_or_else(|| StoreError::NotFound(format!("function bundle {hash}")))?;
        let modules = modules
            .into_iter()
            .map(|(name, code)| {
                let code = base64::engine::general_purpose::STANDARD
                    .decode(code)
                    .map_err(|e| corrupt("function bytecode", e))?;
                Ok((name, code))
            })
            .collect::<Result<_, StoreError>>()?;
        Ok(FunctionBundle {
            hash: hash.to_string(),
            engine,
            sources,
            modules,
        })
    }
}

async fn retire(tx: &mut super::tx::Tx, id: i64, now: DateTime<Utc>) -> Result<(), StoreError> {
    on_tx!(tx, |conn| {
        sqlx::query("UPDATE functions SET superseded_at = $1 WHERE id = $2")
            .bind(now)
            .bind(id)
            .execute(&mut *conn)
            .await
            .map(|_| ())
    })?;
    Ok(())
}
