//! `hookyard dryrun SYNC CONNECTION_ID`: runs a sync's `exec` (or, with `--webhook`, its
//! `onWebhook` on that payload) from the local functions folder against the real
//! connection and provider API, and prints the records it would save, update and delete
//! per model. Nothing is written unless `--save` (then NATS is needed too: writes take
//! their version from `HOOKS_RAW`). An action (`--input`) prints what it returns.

use std::path::PathBuf;
use std::sync::Arc;

use hookyard_core::keys::{EnvironmentName, IntegrationKey};
use hookyard_core::providers::Catalog;
use hookyard_core::store::syncs::SyncKey;
use hookyard_core::streams::Bus;
use hookyard_core::{Config, Store};
use hookyard_functions::compile::compile_project;
use hookyard_functions::host::{connection_api, exec_invocation, raw_version, Kind, Mode, Run, StoreHost};
use hookyard_functions::pool::{Pool, SyncCode};
use hookyard_functions::runs::Actions;
use hookyard_functions::{Handler, Invocation};
use serde_json::{json, Value};

#[derive(clap::Args)]
pub struct DryrunArgs {
    /// The sync's name (its file name under {integration}/syncs/), or an action's.
    sync: String,
    /// The connection to run it for.
    connection_id: String,
    /// The sync's integration, when several have a sync of that name.
    #[arg(long)]
    integration: Option<String>,
    /// Run onWebhook with this JSON payload instead of exec.
    #[arg(long)]
    webhook: Option<PathBuf>,
    /// An action's input, as JSON text (`'{"name": "Ada"}'`); none is `null`.
    #[arg(long)]
    input: Option<String>,
    /// Apply the writes (records, metadata, checkpoint) instead of only printing them.
    #[arg(long)]
    save: bool,
    /// The functions folder.
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// The environment the connection belongs to.
    #[arg(long, default_value = "dev")]
    environment: String,
}

pub async fn run(config: &Config, args: DryrunArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (files, _tests) = crate::deploy::collect(&args.dir)?;
    let limits = config.worker.exec_limits.clone();
    let project = compile_project(files, &limits).map_err(|e| format!("the functions do not compile: {e}"))?;
    let wanted: Option<IntegrationKey> = args.integration.as_deref().map(str::parse).transpose()?;
    let matching: Vec<_> = project
        .syncs
        .iter()
        .filter(|s| s.name == args.sync && wanted.as_ref().is_none_or(|w| &s.integration == w))
        .collect();
    let sync = match matching.as_slice() {
        [one] => *one,
        [] => {
            let known: Vec<String> = project
                .syncs
                .iter()
                .map(|s| format!("{}/{}", s.integration, s.name))
                .collect();
            let scope = wanted
                .as_ref()
                .map(|w| format!(" for integration {w}"))
                .unwrap_or_default();
            return Err(format!(
                "no sync {:?}{scope} in {} (it has: {})",
                args.sync,
                args.dir.display(),
                if known.is_empty() {
                    "none".into()
                } else {
                    known.join(", ")
                }
            )
            .into());
        }
        _ => {
            return Err(format!(
                "several integrations have a sync {:?}: say which with --integration",
                args.sync
            )
            .into())
        }
    };
    let is_action = sync.is_action();
    let input: Option<Value> = match (&args.input, is_action) {
        (Some(text), true) => Some(serde_json::from_str(text).map_err(|e| format!("--input: not JSON: {e}"))?),
        (None, true) => Some(Value::Null),
        (Some(_), false) => return Err(format!("--input is for actions; {} is not one", args.sync).into()),
        (None, false) => None,
    };
    if is_action && args.webhook.is_some() {
        return Err(format!("{} is an action, which takes --input, not --webhook", args.sync).into());
    }
    let payload: Option<Value> = match &args.webhook {
        Some(path) => Some(
            serde_json::from_str(&std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?)
                .map_err(|e| format!("{}: not JSON: {e}", path.display()))?,
        ),
        None => None,
    };

    let store = Store::connect_with(&config.database_url, config.cipher()?, config.database_max_connections).await?;
    let environment_name: EnvironmentName = args.environment.parse()?;
    let environment = store
        .environment(&environment_name)
        .await?
        .ok_or_else(|| format!("no environment {environment_name}"))?;
    let key = SyncKey {
        environment_id: environment.id,
        integration: sync.integration.clone(),
        sync: sync.name.clone(),
        connection_id: args.connection_id.clone(),
    };
    let catalog = Arc::new(Catalog::embedded()?);
    let (connection, api) = connection_api(&store, &catalog, &key, &config.forwarding).await?;
    // A dry run compares against everything stored; a saved run writes at the version
    // a worker would.
    let (jetstream, version, mode) = if args.save && is_action {
        // An action writes no records: no version to take.
        (None, 0, Mode::Apply)
    } else if args.save {
        let bus = Bus::connect(config, "hookyard-dryrun").await?;
        bus.ensure_streams(&config.streams, &store).await?;
        let version = raw_version(&bus.jetstream).await?;
        (Some(bus.jetstream), version, Mode::Apply)
    } else {
        (None, i64::MAX, Mode::DryRun)
    };
    let host = Arc::new(StoreHost::new(Run {
        store: store.clone(),
        jetstream,
        key,
        version,
        api,
        mode,
        kind: if is_action { Kind::Action } else { Kind::Sync },
        notice: None,
        webhook_base_url: config.webhook_base_url(),
        // A dry run's triggerAction is refused (it would run the action for real); a saved
        // run's runs the deployed action, which (for an action's, as everywhere) triggers
        // none itself.
        actions: args.save.then(|| {
            let (store, catalog) = (store.clone(), catalog.clone());
            Arc::new(match is_action {
                true => Actions::innermost(store, catalog, config, None),
                false => Actions::new(store, catalog, config, None),
            })
        }),
    }));
    let models: Vec<String> = sync.config["models"]
        .as_array()
        .map(|a| a.iter().filter_map(|m| m.as_str().map(String::from)).collect())
        .unwrap_or_default();
    let models = serde_json::to_string(&models)?.into();
    let exec = exec_invocation(&connection, models, host.clone(), config.worker.validate_records);
    let invocation = match &payload {
        // onWebhook's writes are collected, and applied (or planned) below; its provider
        // calls and reads go to the host, as exec's do.
        Some(payload) => Invocation {
            payload: payload.to_string().into(),
            handler: Handler::OnWebhook,
            environment_variables: serde_json::to_string(&store.environment_variables(environment.id).await?)?.into(),
            ..exec
        },
        None => match &input {
            Some(input) => Invocation {
                payload: input.to_string().into(),
                handler: Handler::Action,
                ..exec
            },
            None => exec,
        },
    };
    let code = Arc::new(SyncCode::new(
        &project.bundle.hash,
        &sync.entry,
        Arc::new(project.bundle.modules.clone()),
    ));
    let what = match (&payload, is_action) {
        (Some(_), _) => "onWebhook",
        (None, true) => "action",
        (None, false) => "exec",
    };
    eprintln!(
        "running {what} of {}/{} for {} …",
        sync.integration, sync.name, args.connection_id
    );
    let pool = Pool::new(1, limits);
    let effects = pool
        .execute(code, invocation)
        .await
        .map_err(|e| format!("{what} failed: {e}"));
    host.release_locks().await;
    let effects = effects?;
    // onWebhook's writes come back collected; they go the way exec's went.
    host.apply_effects(effects.writes, effects.metadata).await?;
    for line in &effects.logs {
        eprintln!("  log {}: {}", line.level, line.message);
    }
    if is_action {
        let output = effects.output.unwrap_or(Value::Null);
        println!("{}", serde_json::to_string_pretty(&output)?);
        let metadata = host.plan_so_far().metadata;
        if !args.save && !metadata.is_empty() {
            eprintln!("it would write metadata (--save writes): {}", Value::Array(metadata));
        }
    } else if args.save {
        println!("{}", serde_json::to_string_pretty(&json!({"saved": host.counts()}))?);
    } else {
        let plan = host.plan_so_far();
        for (model, writes) in &plan.records {
            eprintln!(
                "{model}: {} to save, {} to update, {} to delete",
                writes.save.len(),
                writes.update.len(),
                writes.delete.len()
            );
        }
        println!("{}", serde_json::to_string_pretty(&plan)?);
        eprintln!("nothing was written (--save writes)");
    }
    Ok(())
}
