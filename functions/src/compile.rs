//! A deploy: a functions project's files compiled once to QuickJS bytecode, and each
//! sync's configuration read by evaluating its module.
//!
//! Layout, as in Nango: a sync lives at `{integration}/syncs/{name}.js` (the integration
//! is the folder, the sync name the file), an event function (`createOnEvent`) at
//! `{integration}/on-events/{name}.js`, an action (`createAction`) at
//! `{integration}/actions/{name}.js`; `.ts` as well (see `typescript`). When the project
//! has an `index.js` (or `index.ts`), the functions are the files it imports from those
//! places; otherwise every file there is one. All three are stored as syncs, their kind in
//! their configuration's `type`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use hookyard_core::keys::IntegrationKey;
use hookyard_core::store::functions::{FunctionBundle, NewSync};
use hookyard_core::store::StoreError;
use rquickjs::module::WriteOptions;
use rquickjs::{CatchResultExt, Context, Module, Object, Runtime, Value};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::engine::evaluate_entry;
use crate::sandbox::{Sandbox, Sources};
use crate::typescript::{is_typescript, strip_types};
use crate::{Limits, ENGINE};

/// What a deploy stores: the bundle and its functions (syncs, event functions, actions).
#[derive(Debug, Clone)]
pub struct Project {
    pub bundle: FunctionBundle,
    pub syncs: Vec<NewSync>,
}

/// Why a project cannot be deployed, naming the file when one is at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}{message}", file.as_deref().map(|f| format!("{f}: ")).unwrap_or_default())]
pub struct DeployError {
    pub file: Option<String>,
    pub message: String,
}

fn at(file: &str, message: impl Into<String>) -> DeployError {
    DeployError {
        file: Some(file.to_string()),
        message: message.into(),
    }
}

fn whole(message: impl Into<String>) -> DeployError {
    DeployError {
        file: None,
        message: message.into(),
    }
}

/// Compiles `files` (path → source) and reads every sync's configuration.
pub fn compile_project(files: BTreeMap<String, String>, limits: &Limits) -> Result<Project, DeployError> {
    let mut sources = BTreeMap::new();
    for (path, source) in files {
        let path = normalise(&path)?;
        if is_declaration(&path) {
            continue;
        }
        if !is_module(&path) {
            return Err(at(
                &path,
                "only JavaScript and TypeScript modules (.js, .mjs, .ts, .mts) are deployed",
            ));
        }
        sources.insert(path, source);
    }
    if sources.is_empty() {
        return Err(whole("the deploy holds no JavaScript or TypeScript files"));
    }
    let modules = Arc::new(compile_modules(&sources)?);
    let mut syncs = Vec::new();
    for (entry, integration, name) in function_entries(&sources, &modules, limits)? {
        let sandbox = Sandbox::new(modules.clone(), limits).map_err(|e| at(&entry, e.message))?;
        let config = sandbox.context.with(|ctx| {
            let export = evaluate_entry(&ctx, &sandbox, &entry, limits).map_err(|e| unrunnable(&entry, e))?;
            read_config(&export).map_err(|message| at(&entry, message))
        })?;
        let in_actions = function_place(&entry, &["actions"]).is_some();
        if in_actions != (config["type"] == "action") {
            return Err(at(
                &entry,
                match in_actions {
                    true => "a file in actions/ must export createAction({...})",
                    false => "an action (createAction) lives at {integration}/actions/{name}.js",
                },
            ));
        }
        let loaded = sandbox.modules.loaded.lock().expect("loader lock").clone();
        syncs.push(NewSync {
            integration,
            name,
            code_hash: hash(loaded.iter().map(|m| (m.as_str(), sources[m].as_str()))),
            entry,
            config,
        });
    }
    Ok(Project {
        bundle: FunctionBundle {
            hash: hash(sources.iter().map(|(p, s)| (p.as_str(), s.as_str()))),
            engine: ENGINE.to_string(),
            sources,
            modules: Arc::try_unwrap(modules).unwrap_or_else(|shared| (*shared).clone()),
        },
        syncs,
    })
}

/// What a module's file name may end with.
const MODULE_EXTENSIONS: [&str; 4] = [".js", ".mjs", ".ts", ".mts"];

/// Whether `path` is a JavaScript or TypeScript module (declarations included).
pub fn is_module(path: &str) -> bool {
    MODULE_EXTENSIONS.iter().any(|ext| path.ends_with(ext))
}

/// Whether `path` holds TypeScript declarations only, which a deploy leaves out: nothing
/// in them runs, and `import type` is erased.
pub fn is_declaration(path: &str) -> bool {
    path.ends_with(".d.ts") || path.ends_with(".d.mts")
}

/// Compiles every module to bytecode (no code runs), TypeScript once its types are
/// erased. Each in a runtime of its own: QuickJS loads (compiles) a module's imports
/// along with it.
pub fn compile_modules(sources: &BTreeMap<String, String>) -> Result<BTreeMap<String, Vec<u8>>, DeployError> {
    let javascript = sources
        .iter()
        .map(|(path, source)| match is_typescript(path) {
            true => strip_types(path, source)
                .map(|code| (path.clone(), code))
                .map_err(|problems| at(path, format!("TypeScript that cannot be deployed:\n{problems}"))),
            false => Ok((path.clone(), source.clone())),
        })
        .collect::<Result<BTreeMap<_, _>, _>>()?;
    let shared = Sources(Arc::new(javascript.clone()));
    javascript
        .iter()
        .map(|(path, source)| {
            let runtime = Runtime::new().map_err(|e| whole(format!("engine: {e}")))?;
            runtime.set_loader(shared.clone(), shared.clone());
            let context = Context::full(&runtime).map_err(|e| whole(format!("engine: {e}")))?;
            context.with(|ctx| {
                let module = Module::declare(ctx.clone(), path.as_str(), source.as_str())
                    .catch(&ctx)
                    .map_err(|e| at(path, e.to_string()))?;
                let code = module
                    .write(WriteOptions::default())
                    .map_err(|e| at(path, e.to_string()))?;
                Ok((path.clone(), code))
            })
        })
        .collect()
}

/// A stored bundle's bytecode; compiled again from its sources when another engine
/// wrote it.
pub async fn stored_modules(store: &hookyard_core::Store, hash: &str) -> Result<BTreeMap<String, Vec<u8>>, StoreError> {
    let bundle = store.function_bundle(hash).await?;
    if bundle.engine == ENGINE {
        return Ok(bundle.modules);
    }
    tracing::info!(bundle = hash, engine = %bundle.engine, "bundle written by another engine; compiling it again");
    let hash = hash.to_string();
    tokio::task::spawn_blocking(move || compile_modules(&bundle.sources))
        .await
        .map_err(|e| StoreError::Invalid(format!("compiling bundle {hash}: {e}")))?
        .map_err(|e| StoreError::Invalid(format!("bundle {hash} no longer compiles: {e}")))
}

/// A function's entry module, integration and name.
type Entry = (String, IntegrationKey, String);

/// Where functions live: `{integration}/{folder}/{name}.js`.
const FUNCTION_FOLDERS: [&str; 3] = ["syncs", "on-events", "actions"];

/// The functions to deploy.
fn function_entries(
    sources: &BTreeMap<String, String>,
    modules: &Arc<BTreeMap<String, Vec<u8>>>,
    limits: &Limits,
) -> Result<Vec<Entry>, DeployError> {
    let indexes: Vec<&String> = sources
        .keys()
        .filter(|path| module_stem(path) == Some("index"))
        .collect();
    let functions: Vec<String> = match indexes[..] {
        [] => sources.keys().cloned().collect(),
        [index] => {
            // The function files the index imports, directly or not.
            let sandbox = Sandbox::new(modules.clone(), limits).map_err(|e| at(index, e.message))?;
            sandbox
                .context
                .with(|ctx| evaluate_entry(&ctx, &sandbox, index, limits).map(|_| ()))
                .or_else(|e| {
                    // The index has no default export of its own: only its imports count.
                    if e.message.contains("default export") {
                        Ok(())
                    } else {
                        Err(unrunnable(index, e))
                    }
                })?;
            let loaded: BTreeSet<String> = sandbox.modules.loaded.lock().expect("loader lock").clone();
            loaded.into_iter().collect()
        }
        _ => {
            let names: Vec<&str> = indexes.iter().map(|p| p.as_str()).collect();
            return Err(whole(format!(
                "the deploy has {} index files ({}): keep one",
                names.len(),
                names.join(", ")
            )));
        }
    };
    let candidates: Vec<String> = functions
        .into_iter()
        .filter(|m| function_place(m, &FUNCTION_FOLDERS).is_some())
        .collect();
    if candidates.is_empty() {
        return Err(whole(
            "no functions found: put each sync at {integration}/syncs/{name}.js, event functions at \
             {integration}/on-events/{name}.js, actions at {integration}/actions/{name}.js (or .ts; and \
             import them from the index if there is one)",
        ));
    }
    // Syncs and actions share their names, as in Nango: an action is triggered by name.
    let mut names = BTreeSet::new();
    for entry in &candidates {
        let (integration, name) = function_place(entry, &FUNCTION_FOLDERS).expect("filtered above");
        if !names.insert((integration, name)) {
            return Err(at(entry, format!("{integration} has two functions named {name:?}")));
        }
    }
    let entries = candidates
        .into_iter()
        .map(|entry| {
            let (integration, name) = function_place(&entry, &FUNCTION_FOLDERS).expect("filtered above");
            let integration: IntegrationKey = integration.parse().map_err(|e| {
                at(
                    &entry,
                    format!("the folder {integration:?} is not an integration key: {e}"),
                )
            })?;
            Ok((entry.clone(), integration, name.to_string()))
        })
        .collect::<Result<_, _>>()?;
    Ok(entries)
}

/// `{integration}/{folder}/{name}.js` with `folder` one of `folders` → `(integration, name)`.
fn function_place<'a>(path: &'a str, folders: &[&str]) -> Option<(&'a str, &'a str)> {
    let mut parts = path.split('/');
    let (integration, folder, file) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !folders.contains(&folder) {
        return None;
    }
    let name = module_stem(file)?;
    (!name.is_empty()).then_some((integration, name))
}

/// A top-level module's name without its extension: `index.ts` → `index`; `None` for a
/// path in a folder or one that is no module.
fn module_stem(file: &str) -> Option<&str> {
    if file.contains('/') {
        return None;
    }
    MODULE_EXTENSIONS.iter().find_map(|ext| file.strip_suffix(ext))
}

/// An entry module that fails to load or run; an import of a name its module does not
/// export may be a TypeScript type imported as a value, which erasing types leaves.
fn unrunnable(entry: &str, error: crate::FunctionError) -> DeployError {
    let mut message = error.to_string();
    if message.contains("Could not find export") {
        message.push_str(
            " (if it is a TypeScript type, import it with `import type { … }` or `import { type … }`: \
             only those are erased with the types)",
        );
    }
    at(entry, message)
}

/// A deploy path, relative and without `.`/`..` segments.
fn normalise(path: &str) -> Result<String, DeployError> {
    let trimmed = path.trim_start_matches("./");
    let bad = trimmed.is_empty()
        || trimmed.starts_with('/')
        || trimmed.contains('\\')
        || trimmed
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..");
    if bad {
        return Err(at(path, "file paths must be relative, without . or .. segments"));
    }
    Ok(trimmed.to_string())
}

/// The connection events an event function can run on.
pub const EVENTS: [&str; 2] = ["post-connection-creation", "pre-connection-deletion"];

/// Reads what a sync or event function declares; the message says which option is wrong.
fn read_config(export: &Object<'_>) -> Result<serde_json::Value, String> {
    if export.is_function() {
        // Nango's older format: the script's default export is `fetchData(nango)` and
        // nango.yaml holds what createSync now declares.
        return Err(
            "its default export is a function (Nango's older nango.yaml format, which is not read): \
             export default createSync({ exec, onWebhook, models, frequency, webhookSubscriptions }) \
             with what nango.yaml declared"
                .into(),
        );
    }
    let kind: Option<String> = export.get("type").map_err(|_| "type must be a string".to_string())?;
    let text = |name: &str| -> Result<Option<String>, String> {
        export
            .get::<_, Option<String>>(name)
            .map_err(|_| format!("{name} must be a string"))
    };
    let function = |name: &str| -> Result<bool, String> {
        let value: Value = export.get(name).map_err(|e| e.to_string())?;
        match value.type_of() {
            t if t.is_void() => Ok(false),
            _ if value.is_function() => Ok(true),
            _ => Err(format!("{name} must be a function")),
        }
    };
    match kind.as_deref() {
        None | Some("sync") => {}
        Some("on-event") => {
            // Runs its `exec` when a connection is created or is about to be deleted.
            let event = text("event")?.unwrap_or_default();
            if !EVENTS.contains(&event.as_str()) {
                return Err(format!("event must be one of {}", EVENTS.join(", ")));
            }
            if !function("exec")? {
                return Err("an event function needs an exec".into());
            }
            return Ok(json!({
                "type": "on-event",
                "event": event,
                "description": text("description")?,
                "version": text("version")?,
                "onEvent": true,
                "exec": false,
                "onWebhook": false,
            }));
        }
        Some("action") => {
            // Run by `POST /action/trigger`, with its input; never scheduled, never on a webhook.
            if !function("exec")? {
                return Err("an action needs an exec".into());
            }
            return Ok(json!({
                "type": "action",
                "description": text("description")?,
                "version": text("version")?,
                "exec": false,
                "onWebhook": false,
            }));
        }
        Some(other) => {
            return Err(format!(
                "its default export is a {other}; syncs (createSync), actions (createAction) and event functions \
                 (createOnEvent) are deployed"
            ))
        }
    }
    let subscriptions: Vec<String> = export
        .get::<_, Option<Vec<String>>>("webhookSubscriptions")
        .map_err(|_| "webhookSubscriptions must be an array of strings (event types, or '*')".to_string())?
        .unwrap_or_default();
    if subscriptions.iter().any(|s| s.is_empty()) {
        return Err("webhookSubscriptions holds an empty event type".into());
    }
    let models_value: Value = export.get("models").map_err(|e| e.to_string())?;
    let models: Vec<String> = if models_value.type_of().is_void() {
        Vec::new()
    } else if let Some(array) = models_value.as_array() {
        array
            .iter::<String>()
            .collect::<Result<_, _>>()
            .map_err(|_| "models must be an object keyed by model name (or an array of names)".to_string())?
    } else if let Some(object) = models_value.as_object().filter(|_| !models_value.is_function()) {
        object
            .keys::<String>()
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?
    } else {
        return Err("models must be an object keyed by model name (or an array of names)".into());
    };
    let on_webhook = function("onWebhook")?;
    if !subscriptions.is_empty() && !on_webhook {
        return Err("it subscribes to webhooks (webhookSubscriptions) but has no onWebhook".into());
    }
    let exec = function("exec")?;
    let auto_start: Option<bool> = export
        .get("autoStart")
        .map_err(|_| "autoStart must be true or false".to_string())?;
    let metadata: Value = export.get("metadata").map_err(|e| e.to_string())?;
    let track_deletes: Option<bool> = export
        .get("trackDeletes")
        .map_err(|_| "trackDeletes must be true or false".to_string())?;
    let frequency = text("frequency")?;
    if let Some(frequency) = &frequency {
        hookyard_core::frequency::parse_frequency(frequency)?;
        if !exec {
            return Err("it has a frequency but no exec to run on it".into());
        }
    }
    if !exec && !on_webhook {
        return Err("it has neither an exec nor an onWebhook: nothing of it would ever run".into());
    }
    Ok(json!({
        "description": text("description")?,
        "version": text("version")?,
        "frequency": frequency,
        "models": models,
        "webhookSubscriptions": subscriptions,
        "autoStart": auto_start.unwrap_or(true),
        "trackDeletes": track_deletes.unwrap_or(false),
        "metadata": !metadata.type_of().is_void(),
        "exec": exec,
        "onWebhook": on_webhook,
    }))
}

/// SHA-256 over the engine and `(path, source)` pairs, hex.
fn hash<'a>(files: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    let mut digest = Sha256::new();
    digest.update(ENGINE.as_bytes());
    for (path, source) in files {
        for part in [path, source] {
            digest.update((part.len() as u64).to_le_bytes());
            digest.update(part.as_bytes());
        }
    }
    hex::encode(digest.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_places() {
        let place = |path| function_place(path, &FUNCTION_FOLDERS);
        assert_eq!(place("hubspot/syncs/contacts.js"), Some(("hubspot", "contacts")));
        assert_eq!(place("hubspot/contacts.js"), None);
        assert_eq!(place("hubspot/syncs/deep/contacts.js"), None);
        assert_eq!(place("hubspot/actions/x.ts"), Some(("hubspot", "x")));
        assert_eq!(place("hubspot/helpers/x.ts"), None);
        assert_eq!(place("hubspot/on-events/setup.ts"), Some(("hubspot", "setup")));
        assert_eq!(place("hubspot/syncs/contacts.json"), None);
        assert_eq!(module_stem("index.mts"), Some("index"));
        assert_eq!(module_stem("lib/index.ts"), None);
        assert_eq!(normalise("./a/b.js").unwrap(), "a/b.js");
        for bad in ["/etc/x.js", "a/../b.js", "a//b.js", "", "a\\b.js"] {
            assert!(normalise(bad).is_err(), "{bad}");
        }
    }
}
