//! A sync loaded into its own sandbox, and one execution of its `onWebhook`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hookyard_core::store::records::WriteKind;
use hookyard_core::store::MetadataWrite;
use rquickjs::function::Args;
use rquickjs::{CatchResultExt, CaughtError, Ctx, Function, Module, Object, Persistent, Promise, Value};
use serde::Deserialize;

use crate::sandbox::{describe, with_host, Budget, Sandbox};
use crate::{Effects, ErrorKind, FunctionError, Handler, Invocation, Limits, LogLine, Write};

/// A sync's module evaluated once; its handler runs many times. Field order is drop
/// order: the saved functions go before the sandbox that owns them.
pub(crate) struct Loaded {
    on_webhook: Option<Persistent<Function<'static>>>,
    exec: Option<Persistent<Function<'static>>>,
    /// The default export: the runner reads its `models` (zod schemas by name, when they
    /// are) for `batchSave` to check records against, an action's `input` and `output`.
    definition: Persistent<Object<'static>>,
    /// Nango's older `trackDeletes: true` (of a full sync, as in Nango): each exec run
    /// tracks the deletes of every model.
    track_deletes: bool,
    run: Persistent<Function<'static>>,
    sandbox: Sandbox,
}

impl Drop for Loaded {
    fn drop(&mut self) {
        metrics::gauge!(hookyard_core::metrics::names::SYNCS_LOADED).decrement(1.0);
    }
}

impl Loaded {
    /// Evaluates `entry` from `code` and keeps its `onWebhook` and `exec`.
    pub(crate) fn load(
        code: Arc<BTreeMap<String, Vec<u8>>>,
        entry: &str,
        limits: &Limits,
    ) -> Result<Loaded, FunctionError> {
        let sandbox = Sandbox::new(code, limits)?;
        let (on_webhook, exec, definition, track_deletes, run) = sandbox.context.with(|ctx| {
            let export = evaluate_entry(&ctx, &sandbox, entry, limits)?;
            let handler = |name: &str| export.get::<_, Function>(name).ok().map(|h| Persistent::save(&ctx, h));
            let (on_webhook, exec) = (handler("onWebhook"), handler("exec"));
            let track_deletes = export.get::<_, Option<bool>>("trackDeletes").ok().flatten() == Some(true)
                && export.get::<_, Option<String>>("syncType").ok().flatten().as_deref() != Some("incremental");
            let engine: Object = ctx
                .globals()
                .get("__hookyard")
                .map_err(|e| FunctionError::new(ErrorKind::Internal, format!("engine prelude missing: {e}")))?;
            let run: Function = engine
                .get("run")
                .map_err(|e| FunctionError::new(ErrorKind::Internal, format!("engine runner missing: {e}")))?;
            let definition = Persistent::save(&ctx, export);
            Ok::<_, FunctionError>((on_webhook, exec, definition, track_deletes, Persistent::save(&ctx, run)))
        })?;
        metrics::gauge!(hookyard_core::metrics::names::SYNCS_LOADED).increment(1.0);
        Ok(Loaded {
            on_webhook,
            exec,
            definition,
            track_deletes,
            run,
            sandbox,
        })
    }

    /// Runs `onWebhook(nango, payload)`, `exec(nango)` or an action's `exec(nango, input)`
    /// to completion; its effects, or why it failed.
    pub(crate) fn execute(&self, invocation: &Invocation, limits: &Limits) -> Result<Effects, FunctionError> {
        let (handler, name) = match invocation.handler {
            Handler::OnWebhook => (&self.on_webhook, "onWebhook"),
            Handler::Exec | Handler::Action => (&self.exec, "exec"),
        };
        let Some(handler) = handler else {
            return Err(FunctionError::new(
                ErrorKind::Thrown,
                format!("the function has no {name} handler"),
            ));
        };
        with_host(invocation.host.clone(), || self.run(handler, invocation, limits))
    }

    fn run(
        &self,
        handler: &Persistent<Function<'static>>,
        invocation: &Invocation,
        limits: &Limits,
    ) -> Result<Effects, FunctionError> {
        let budget = &self.sandbox.budget;
        budget.arm(limits);
        let result = self.sandbox.context.with(|ctx| {
            let handler = handler.clone().restore(&ctx).map_err(internal)?;
            let run = self.run.clone().restore(&ctx).map_err(internal)?;
            let definition = self.definition.clone().restore(&ctx).map_err(internal)?;
            // More arguments than a tuple carries.
            let mut args = Args::new(ctx.clone(), 12);
            let pushed = (|| {
                args.push_arg(handler)?;
                for text in [
                    &*invocation.payload,
                    invocation.connection_id.as_str(),
                    invocation.provider_config_key.as_str(),
                    &*invocation.metadata,
                    &*invocation.connection,
                    &*invocation.models,
                ] {
                    args.push_arg(text)?;
                }
                args.push_arg(invocation.handler.mode())?;
                args.push_arg(definition)?;
                args.push_arg(invocation.validation.as_str())?;
                args.push_arg(&*invocation.environment_variables)?;
                args.push_arg(self.track_deletes)
            })();
            pushed.map_err(internal)?;
            let outcome = run
                .call_arg::<Promise>(args)
                .catch(&ctx)
                .map_err(|e| describe(&ctx, e, budget, limits))
                .and_then(|promise| settle(&ctx, &promise, budget, limits));
            match outcome {
                Ok(value) => {
                    let text: String = value.get().map_err(internal)?;
                    parse_effects(&text)
                }
                Err(mut error) => {
                    error.logs = logs(&ctx);
                    Err(error)
                }
            }
        });
        budget.disarm();
        result
    }
}

fn internal(e: rquickjs::Error) -> FunctionError {
    FunctionError::new(ErrorKind::Internal, e.to_string())
}

/// Evaluates the entry module (its top level runs under the budget) and returns its
/// default export.
pub(crate) fn evaluate_entry<'js>(
    ctx: &Ctx<'js>,
    sandbox: &Sandbox,
    entry: &str,
    limits: &Limits,
) -> Result<Object<'js>, FunctionError> {
    if !sandbox.modules.code.contains_key(entry) {
        return Err(FunctionError::new(
            ErrorKind::Internal,
            format!("module {entry} is not in the bundle"),
        ));
    }
    let budget = &sandbox.budget;
    budget.arm(limits);
    let evaluated = (|| {
        // Through the loader, as an import from the host: QuickJS links the module's own
        // imports before it runs (bytecode read directly would not be linked).
        let promise = Module::import(ctx, entry)
            .catch(ctx)
            .map_err(|e| describe(ctx, e, budget, limits))?;
        let namespace = settle(ctx, &promise, budget, limits)?;
        let export: Value = namespace
            .as_object()
            .map(|n| n.get("default"))
            .transpose()
            .catch(ctx)
            .map_err(|e| describe(ctx, e, budget, limits))?
            .unwrap_or_else(|| Value::new_undefined(ctx.clone()));
        match export.into_object() {
            Some(object) => Ok(object),
            None => Err(FunctionError::new(
                ErrorKind::Thrown,
                "its default export is not an object: export default createSync({...})",
            )),
        }
    })();
    budget.disarm();
    evaluated
}

/// Runs jobs and timers until `promise` settles, the budget runs out, or nothing is
/// left that could settle it.
fn settle<'js>(
    ctx: &Ctx<'js>,
    promise: &Promise<'js>,
    budget: &Budget,
    limits: &Limits,
) -> Result<Value<'js>, FunctionError> {
    loop {
        while ctx.execute_pending_job() {}
        if let Some(result) = promise.result::<Value>() {
            return result.catch(ctx).map_err(|e| describe(ctx, e, budget, limits));
        }
        if let Some(timeout) = budget.tripped(limits) {
            return Err(timeout);
        }
        // An exception no promise took (out of memory inside a job, say).
        let pending = ctx.catch();
        if !pending.type_of().is_void() {
            return Err(describe(
                ctx,
                CaughtError::from_error(ctx, ctx.throw(pending)),
                budget,
                limits,
            ));
        }
        let timers: Object = ctx.globals().get("__hookyard").map_err(internal)?;
        let next: f64 = timers
            .get::<_, Function>("nextTimer")
            .and_then(|f| f.call(()))
            .map_err(internal)?;
        if next < 0.0 {
            return Err(FunctionError::new(
                ErrorKind::Thrown,
                "its promise can never settle: it awaits something that no job or timer will complete",
            ));
        }
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as f64;
        let wait = Duration::from_millis((next - now_ms).max(0.0) as u64);
        let remaining = budget.remaining();
        if wait >= remaining {
            crate::pool::off_turn(|| std::thread::sleep(remaining));
            budget.expire_wall();
            return Err(budget.tripped(limits).expect("just expired"));
        }
        if !wait.is_zero() {
            crate::pool::off_turn(|| std::thread::sleep(wait));
        }
        timers
            .get::<_, Function>("fireTimers")
            .and_then(|f| f.call::<_, ()>(()))
            .catch(ctx)
            .map_err(|e| describe(ctx, e, budget, limits))?;
    }
}

fn logs(ctx: &Ctx<'_>) -> Vec<LogLine> {
    let text: Option<String> = ctx
        .globals()
        .get::<_, Object>("__hookyard")
        .and_then(|e| e.get::<_, Function>("logs"))
        .and_then(|f| f.call(()))
        .ok();
    text.and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default()
}

#[derive(Deserialize)]
struct RawEffects {
    writes: Vec<RawWrite>,
    metadata: Vec<RawMetadata>,
    logs: Vec<LogLine>,
    /// An action's output; absent for other handlers.
    #[serde(default)]
    output: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct RawWrite {
    kind: String,
    model: String,
    records: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct RawMetadata {
    how: String,
    value: serde_json::Map<String, serde_json::Value>,
}

/// The runner's JSON, typed. The prelude checked ids already; numbers become strings.
fn parse_effects(text: &str) -> Result<Effects, FunctionError> {
    let raw: RawEffects =
        serde_json::from_str(text).map_err(|e| FunctionError::new(ErrorKind::Internal, format!("effects: {e}")))?;
    let writes = raw
        .writes
        .into_iter()
        .map(|w| {
            let kind = match w.kind.as_str() {
                "save" => WriteKind::Save,
                "update" => WriteKind::Update,
                _ => WriteKind::Delete,
            };
            let records = w
                .records
                .into_iter()
                .map(|record| (crate::host::record_id(&record), record))
                .collect();
            Write {
                kind,
                model: w.model,
                records,
            }
        })
        .collect();
    let metadata = raw
        .metadata
        .into_iter()
        .map(|m| {
            let how = if m.how == "replace" {
                MetadataWrite::Replace
            } else {
                MetadataWrite::Merge
            };
            (how, m.value)
        })
        .collect();
    Ok(Effects {
        writes,
        metadata,
        logs: raw.logs,
        elapsed: std::time::Duration::ZERO,
        output: raw.output,
    })
}
