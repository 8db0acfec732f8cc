//! One QuickJS runtime and context set up for function code: the memory (metered by its
//! allocator) and stack limits, the interrupt handler that enforces the CPU budget and
//! the deadline, the module loader over a deploy's bytecode (plus the built-in `nango`,
//! `zod`, `crypto`, `url` and `buffer`), and the prelude.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rquickjs::loader::{ImportAttributes, Loader, Resolver};
use rquickjs::module::Declared;
use rquickjs::{CatchResultExt, CaughtError, Context, Ctx, Module, Runtime};

use crate::allocator::{Meter, Metered};
use crate::{ErrorKind, FunctionError, Host, Limits, Thrown};

const NANGO: &str = include_str!("js/nango.js");
const PRELUDE: &str = include_str!("js/prelude.js");
/// zod, which Nango's functions declare their models with: a bundle of the npm package
/// (`scripts/vendor-zod`).
const ZOD: &str = include_str!("js/vendor/zod.js");

/// The Node.js modules Nango's runtime lets its functions import, by either name.
const NODE_MODULES: [(&str, &str); 3] = [
    ("crypto", include_str!("js/node/crypto.js")),
    ("url", include_str!("js/node/url.js")),
    ("buffer", include_str!("js/node/buffer.js")),
];

/// What a function may import besides its deploy's own files.
fn is_builtin(name: &str) -> bool {
    matches!(name, "nango" | "zod") || node_module(name).is_some()
}

fn node_module(name: &str) -> Option<&'static str> {
    let bare = name.strip_prefix("node:").unwrap_or(name);
    NODE_MODULES
        .iter()
        .find(|(module, _)| *module == bare)
        .map(|(_, source)| *source)
}

/// A built-in module declared in `ctx`; `None` for any other name.
fn builtin<'js>(ctx: &Ctx<'js>, name: &str) -> Option<rquickjs::Result<Module<'js, Declared>>> {
    match name {
        "nango" => Some(Module::declare(ctx.clone(), "nango", NANGO)),
        // SAFETY: bytecode this process's engine wrote (zod_bytecode).
        "zod" => Some(zod_bytecode().and_then(|code| unsafe { Module::load(ctx.clone(), code) })),
        _ => node_module(name).map(|source| Module::declare(ctx.clone(), name, source)),
    }
}

/// zod compiled once per process: 450 KB of source is not parsed again for each runtime.
fn zod_bytecode() -> rquickjs::Result<&'static [u8]> {
    static CODE: OnceLock<Result<Vec<u8>, String>> = OnceLock::new();
    CODE.get_or_init(|| {
        let runtime = Runtime::new().map_err(|e| e.to_string())?;
        let context = Context::full(&runtime).map_err(|e| e.to_string())?;
        context.with(|ctx| {
            Module::declare(ctx.clone(), "zod", ZOD)
                .and_then(|module| module.write(rquickjs::module::WriteOptions::default()))
                .map_err(|e| e.to_string())
        })
    })
    .as_deref()
    .map_err(|e| rquickjs::Error::new_loading_message("zod", e.clone()))
}

/// Why an execution was interrupted, if it was.
const NOT_TRIPPED: u8 = 0;
const TRIPPED_CPU: u8 = 1;
const TRIPPED_WALL: u8 = 2;

/// The current execution's budget, read by the interrupt handler on the JS thread.
#[derive(Default)]
pub(crate) struct Budget {
    /// Thread CPU time (ns) past which the execution is stopped; 0 when none runs.
    cpu_deadline: AtomicU64,
    /// Wall-clock deadline, in ns since [`epoch`]; 0 when none runs.
    wall_deadline: AtomicU64,
    tripped: AtomicU8,
    /// The runtime's memory, metered by its allocator.
    pub memory: Arc<Meter>,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn wall_now() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

/// CPU time this thread has used: only the JS thread's own work counts against a budget.
fn thread_cpu_now() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given and nothing else.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Budget {
    pub(crate) fn arm(&self, limits: &Limits) {
        self.tripped.store(NOT_TRIPPED, Ordering::Relaxed);
        self.memory.reset();
        self.cpu_deadline.store(
            thread_cpu_now() + limits.cpu_budget.as_nanos() as u64,
            Ordering::Relaxed,
        );
        self.wall_deadline
            .store(wall_now() + limits.timeout.as_nanos() as u64, Ordering::Relaxed);
    }

    pub(crate) fn disarm(&self) {
        self.cpu_deadline.store(0, Ordering::Relaxed);
        self.wall_deadline.store(0, Ordering::Relaxed);
    }

    /// Time left before the wall-clock deadline.
    pub(crate) fn remaining(&self) -> Duration {
        let deadline = self.wall_deadline.load(Ordering::Relaxed);
        Duration::from_nanos(deadline.saturating_sub(wall_now()))
    }

    pub(crate) fn expire_wall(&self) {
        self.tripped.store(TRIPPED_WALL, Ordering::Relaxed);
    }

    fn check(&self) -> bool {
        let wall = self.wall_deadline.load(Ordering::Relaxed);
        if wall == 0 {
            return false;
        }
        if wall_now() > wall {
            self.tripped.store(TRIPPED_WALL, Ordering::Relaxed);
            return true;
        }
        if thread_cpu_now() > self.cpu_deadline.load(Ordering::Relaxed) {
            self.tripped.store(TRIPPED_CPU, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// The timeout error, when the budget ran out.
    pub(crate) fn tripped(&self, limits: &Limits) -> Option<FunctionError> {
        let message = match self.tripped.load(Ordering::Relaxed) {
            TRIPPED_CPU => format!("used more than its CPU budget of {:?}", limits.cpu_budget),
            TRIPPED_WALL => format!("did not finish within {:?}", limits.timeout),
            _ => return None,
        };
        Some(FunctionError::new(ErrorKind::Timeout, message))
    }
}

/// The modules a runtime may load, and which it did load.
#[derive(Clone)]
pub(crate) struct Modules {
    pub code: Arc<BTreeMap<String, Vec<u8>>>,
    pub loaded: Arc<Mutex<BTreeSet<String>>>,
}

impl Resolver for Modules {
    fn resolve<'js>(
        &mut self,
        _ctx: &Ctx<'js>,
        base: &str,
        name: &str,
        _attributes: Option<ImportAttributes<'js>>,
    ) -> rquickjs::Result<String> {
        // The engine's own import of an entry module names it by its deploy path.
        if base.is_empty() && self.code.contains_key(name) {
            return Ok(name.to_string());
        }
        resolved(base, name, |candidate| self.code.contains_key(candidate))
    }
}

impl Loader for Modules {
    fn load<'js>(
        &mut self,
        ctx: &Ctx<'js>,
        name: &str,
        _attributes: Option<ImportAttributes<'js>>,
    ) -> rquickjs::Result<Module<'js, Declared>> {
        if let Some(module) = builtin(ctx, name) {
            return module;
        }
        let code = self
            .code
            .get(name)
            .ok_or_else(|| rquickjs::Error::new_loading_message(name, "not in this deploy"))?;
        self.loaded.lock().expect("loader lock").insert(name.to_string());
        // SAFETY: the bytecode was written by this engine at deploy time (the bundle's
        // engine is checked before it is used).
        unsafe { Module::load(ctx.clone(), code) }
    }
}

/// A deploy's sources, for compiling: QuickJS loads a module's imports as it compiles it.
#[derive(Clone)]
pub(crate) struct Sources(pub Arc<BTreeMap<String, String>>);

impl Resolver for Sources {
    fn resolve<'js>(
        &mut self,
        _ctx: &Ctx<'js>,
        base: &str,
        name: &str,
        _attributes: Option<ImportAttributes<'js>>,
    ) -> rquickjs::Result<String> {
        resolved(base, name, |candidate| self.0.contains_key(candidate))
    }
}

impl Loader for Sources {
    fn load<'js>(
        &mut self,
        ctx: &Ctx<'js>,
        name: &str,
        _attributes: Option<ImportAttributes<'js>>,
    ) -> rquickjs::Result<Module<'js, Declared>> {
        if let Some(module) = builtin(ctx, name) {
            return module;
        }
        let source = self
            .0
            .get(name)
            .ok_or_else(|| rquickjs::Error::new_loading_message(name, "not in this deploy"))?;
        Module::declare(ctx.clone(), name, source.as_str())
    }
}

/// [`resolve_import`] for a module loader: what it cannot resolve is an engine error
/// saying what a function may import.
fn resolved(base: &str, name: &str, exists: impl Fn(&str) -> bool) -> rquickjs::Result<String> {
    resolve_import(base, name, exists)
        .ok_or_else(|| rquickjs::Error::new_resolving_message(base, name, import_help(name)))
}

fn import_help(name: &str) -> String {
    format!(
        "cannot import {name:?}: a function may import 'nango', 'zod', 'crypto', 'url', 'buffer' and the files of its own deploy (./ or ../ paths)"
    )
}

/// The module an `import name` in module `base` means: a built-in, or a path of the deploy
/// relative to `base`. As TypeScript resolves it: the extension may be left out, and
/// `./x.js` is `./x.ts` when only that is in the deploy.
pub(crate) fn resolve_import(base: &str, name: &str, exists: impl Fn(&str) -> bool) -> Option<String> {
    if is_builtin(name) {
        return Some(name.into());
    }
    if !(name.starts_with("./") || name.starts_with("../")) {
        return None;
    }
    let mut parts: Vec<&str> = base.split('/').collect();
    parts.pop();
    for part in name.split('/') {
        match part {
            "." | "" => {}
            ".." => {
                parts.pop()?;
            }
            other => parts.push(other),
        }
    }
    let path = parts.join("/");
    let typescript = [(".js", ".ts"), (".mjs", ".mts")]
        .into_iter()
        .find_map(|(js, ts)| Some(format!("{}{ts}", path.strip_suffix(js)?)));
    std::iter::once(path.clone())
        .chain(typescript)
        .chain(
            ["", "/index"]
                .into_iter()
                .flat_map(|tail| [".js", ".ts"].map(|ext| format!("{path}{tail}{ext}"))),
        )
        .find(|candidate| exists(candidate))
}

/// A runtime (held by its context) ready for function code. Values saved out of the
/// context must be dropped before it (see `engine::Loaded`).
pub(crate) struct Sandbox {
    pub context: Context,
    pub budget: Arc<Budget>,
    pub modules: Modules,
}

impl Sandbox {
    pub(crate) fn new(code: Arc<BTreeMap<String, Vec<u8>>>, limits: &Limits) -> Result<Sandbox, FunctionError> {
        let setup = |e: rquickjs::Error| FunctionError::new(ErrorKind::Internal, format!("engine setup: {e}"));
        let budget = Arc::new(Budget::default());
        let runtime = Runtime::new_with_alloc(Metered(budget.memory.clone())).map_err(setup)?;
        runtime.set_max_stack_size(limits.stack_bytes);
        let handler_budget = budget.clone();
        runtime.set_interrupt_handler(Some(Box::new(move || handler_budget.check())));
        let modules = Modules {
            code,
            loaded: Arc::default(),
        };
        runtime.set_loader(modules.clone(), modules.clone());
        let context = Context::full(&runtime).map_err(setup)?;
        context.with(|ctx| {
            seed_math_random(&ctx).map_err(setup)?;
            install_host_call(&ctx, budget.clone()).map_err(setup)?;
            crate::globals::install_loader(&ctx).map_err(setup)?;
            ctx.eval::<(), _>(PRELUDE)
                .catch(&ctx)
                .map_err(|e| FunctionError::new(ErrorKind::Internal, format!("engine prelude: {e}")))
        })?;
        // After the prelude, so that setting it up cannot fail on the limit.
        budget.memory.set_limit(limits.memory_bytes);
        Ok(Sandbox {
            context,
            budget,
            modules,
        })
    }
}

thread_local! {
    /// The host of the execution running on this thread, if it has one.
    static HOST: std::cell::RefCell<Option<Arc<dyn Host>>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` with `host` as what `__hookyardHost` calls on this thread.
pub(crate) fn with_host<T>(host: Option<Arc<dyn Host>>, f: impl FnOnce() -> T) -> T {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            HOST.with(|h| h.borrow_mut().take());
        }
    }
    HOST.with(|h| *h.borrow_mut() = host);
    let _reset = Reset;
    f()
}

/// `__hookyardHost(op, argsJson)`: the prelude's way out to the execution's [`Host`].
/// Taken out of reach of function code by the prelude.
fn install_host_call(ctx: &Ctx<'_>, budget: Arc<Budget>) -> rquickjs::Result<()> {
    let call = rquickjs::Function::new(
        ctx.clone(),
        move |ctx: Ctx<'_>, op: String, args: String| -> rquickjs::Result<String> {
            let host = HOST.with(|h| h.borrow().clone());
            let Some(host) = host else {
                return Err(rquickjs::Exception::throw_message(
                    &ctx,
                    &format!("{op}: this run has nothing to call it on (no host)"),
                ));
            };
            let time_left = budget.remaining();
            // A panic must not unwind into QuickJS (that aborts the process): one here (the
            // host's async runtime shutting down under it, say) fails the function instead.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                // The call waits (on the provider, the store): another run may compute.
                crate::pool::off_turn(|| host.call(&op, &args, time_left))
            }))
            .unwrap_or_else(|_| Err(format!("{op}: the host failed; the service may be stopping")))
            .map_err(|message| rquickjs::Exception::throw_message(&ctx, &message))
        },
    )?;
    ctx.globals().set("__hookyardHost", call)
}

/// QuickJS seeds each context's `Math.random` from the clock in microseconds, so that
/// contexts made in the same microsecond (one per JS thread) draw the same numbers. This
/// one draws from a per-thread generator seeded by the OS.
fn seed_math_random(ctx: &Ctx<'_>) -> rquickjs::Result<()> {
    thread_local! {
        static STATE: std::cell::Cell<u64> =
            std::cell::Cell::new(u64::from_le_bytes(hookyard_core::secrets::random_bytes::<8>()) | 1);
    }
    let random = rquickjs::Function::new(ctx.clone(), || {
        STATE.with(|state| {
            // xorshift64*: 53 high bits make a double in [0, 1).
            let mut x = state.get();
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            state.set(x);
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
        })
    })?;
    let math: rquickjs::Object = ctx.globals().get("Math")?;
    math.set("random", random)
}

/// Describes a caught JS error (or the limit it hit) as a function error.
pub(crate) fn describe<'js>(
    ctx: &Ctx<'js>,
    error: CaughtError<'js>,
    budget: &Budget,
    limits: &Limits,
) -> FunctionError {
    if let Some(timeout) = budget.tripped(limits) {
        return timeout;
    }
    if budget.memory.refused() {
        return out_of_memory(limits);
    }
    let mut thrown = None;
    let (text, stack) = match &error {
        CaughtError::Exception(e) => {
            thrown = thrown_of(ctx, e.as_object());
            let name: Option<String> = e.as_object().get("name").ok();
            let message = e.message().unwrap_or_default();
            let text = match name {
                Some(name) if !name.is_empty() => format!("{name}: {message}"),
                _ => message,
            };
            // The prelude's own frames (evaluated as `eval_script`) say nothing to the
            // function's author.
            let stack = e.stack().map(|stack| {
                stack
                    .lines()
                    .filter(|line| !line.contains("(eval_script:"))
                    .collect::<Vec<_>>()
                    .join("\n")
            });
            (text, stack.filter(|s| !s.is_empty()))
        }
        CaughtError::Value(value) => {
            let text = ctx
                .json_stringify(value.clone())
                .ok()
                .flatten()
                .and_then(|s| s.to_string().ok())
                .unwrap_or_else(|| format!("{value:?}"));
            (format!("thrown value: {text}"), None)
        }
        CaughtError::Error(rquickjs::Error::Allocation) => ("out of memory".to_string(), None),
        CaughtError::Error(e) => (e.to_string(), None),
    };
    let lower = text.to_lowercase();
    let kind = if lower.contains("out of memory") {
        ErrorKind::OutOfMemory
    } else if lower.contains("stack overflow") || lower.contains("maximum call stack size exceeded") {
        ErrorKind::StackOverflow
    } else {
        ErrorKind::Thrown
    };
    let message = match (kind, stack) {
        (ErrorKind::OutOfMemory, _) => return out_of_memory(limits),
        (ErrorKind::StackOverflow, _) => format!("overflowed its stack ({text})"),
        (_, Some(stack)) => format!("{text}\n{}", stack.trim_end()),
        (_, None) => text,
    };
    FunctionError {
        thrown,
        ..FunctionError::new(kind, message)
    }
}

/// The error's `type` and `payload` (as JSON), when it has a `type`.
fn thrown_of<'js>(ctx: &Ctx<'js>, error: &rquickjs::Object<'js>) -> Option<Box<Thrown>> {
    // A getter that throws, or a payload JSON cannot show (a cycle), is left out; the
    // exception it raised is not the function's.
    let read = |name: &str| match error.get::<_, rquickjs::Value>(name) {
        Ok(value) => Some(value),
        Err(_) => {
            ctx.catch();
            None
        }
    };
    let error_type = read("type")?.as_string()?.to_string().ok()?;
    let payload = read("payload")
        .filter(|p| !p.type_of().is_void())
        .and_then(|p| match ctx.json_stringify(p) {
            Ok(text) => text.and_then(|t| t.to_string().ok()),
            Err(_) => {
                ctx.catch();
                None
            }
        })
        .and_then(|text| serde_json::from_str(&text).ok());
    Some(Box::new(Thrown { error_type, payload }))
}

fn out_of_memory(limits: &Limits) -> FunctionError {
    FunctionError::new(
        ErrorKind::OutOfMemory,
        format!("ran out of memory (limit {} bytes)", limits.memory_bytes),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imports_resolve_within_the_deploy_only() {
        let files = [
            "hubspot/syncs/contacts.js",
            "hubspot/models.js",
            "lib/index.js",
            "util.js",
        ];
        let exists = |p: &str| files.contains(&p);
        let resolve = |base, name| resolve_import(base, name, exists);
        assert_eq!(resolve("hubspot/syncs/contacts.js", "nango").as_deref(), Some("nango"));
        assert_eq!(resolve("hubspot/syncs/contacts.js", "zod").as_deref(), Some("zod"));
        assert_eq!(resolve("hubspot/syncs/contacts.js", "zod/mini"), None);
        for node in ["crypto", "node:crypto", "url", "node:url", "buffer", "node:buffer"] {
            assert_eq!(resolve("hubspot/syncs/contacts.js", node).as_deref(), Some(node));
        }
        assert_eq!(resolve("hubspot/syncs/contacts.js", "node:fs"), None);
        assert_eq!(resolve("hubspot/syncs/contacts.js", "node:"), None);
        assert_eq!(
            resolve("hubspot/syncs/contacts.js", "../models.js").as_deref(),
            Some("hubspot/models.js")
        );
        assert_eq!(
            resolve("hubspot/syncs/contacts.js", "../models").as_deref(),
            Some("hubspot/models.js")
        );
        assert_eq!(
            resolve("hubspot/syncs/contacts.js", "../../lib").as_deref(),
            Some("lib/index.js")
        );
        assert_eq!(resolve("index.js", "./util.js").as_deref(), Some("util.js"));
        assert_eq!(resolve("index.js", "../escape.js"), None, "no way out of the deploy");
        assert_eq!(resolve("index.js", "fs"), None);
        assert_eq!(resolve("index.js", "/etc/passwd"), None);
    }

    #[test]
    fn typescript_imports_resolve_as_typescript_resolves_them() {
        let files = [
            "crm/syncs/contacts.ts",
            "crm/models.ts",
            "lib/index.ts",
            "util.mts",
            "both.js",
            "both.ts",
        ];
        let exists = |p: &str| files.contains(&p);
        let resolve = |name| resolve_import("crm/syncs/contacts.ts", name, exists);
        assert_eq!(resolve("../models.js").as_deref(), Some("crm/models.ts"));
        assert_eq!(resolve("../models").as_deref(), Some("crm/models.ts"));
        assert_eq!(resolve("../models.ts").as_deref(), Some("crm/models.ts"));
        assert_eq!(resolve("../../lib").as_deref(), Some("lib/index.ts"));
        assert_eq!(resolve("../../util.mjs").as_deref(), Some("util.mts"));
        assert_eq!(
            resolve("../../both.js").as_deref(),
            Some("both.js"),
            "the file named comes first"
        );
        assert_eq!(resolve("../../both").as_deref(), Some("both.js"));
    }
}
