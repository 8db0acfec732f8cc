//! Webhook functions: a deploy's JavaScript compiled once to QuickJS bytecode
//! ([`compile`]), and handlers run from it in a sandbox on dedicated threads ([`pool`]).
//!
//! A function is Nango-style: a module whose default export is `createSync({...})` from
//! the built-in module `nango`. Its `onWebhook(nango, payload)` gets a `nango` object
//! whose record and metadata writes are collected, not applied: the worker commits them
//! (or, when the execution fails, drops them).

mod allocator;
pub mod compile;
mod engine;
pub mod examples;
mod globals;
pub mod host;
pub mod pool;
pub mod provider_api;
mod queue;
pub mod rate_limit;
pub mod runs;
mod sandbox;
mod shared_reads;
pub mod token_refresh;
pub mod typescript;

use hookyard_core::store::records::WriteKind;
use hookyard_core::store::MetadataWrite;
use std::sync::Arc;

use serde::Serialize;
use serde_json::{Map, Value};

pub use hookyard_core::config::FunctionLimits as Limits;
pub use hookyard_core::config::RecordValidation;

/// Names the engine that wrote a bundle's bytecode; a bundle written by another one is
/// compiled again from its sources.
pub const ENGINE: &str = "quickjs-ng 0.16 via rquickjs 0.14, bytecode 1";

/// Why an execution failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The function threw (or its promise rejected).
    Thrown,
    /// It ran past its CPU budget or its wall-clock timeout.
    Timeout,
    OutOfMemory,
    StackOverflow,
    /// The engine could not run it (a bundle that does not load, for one).
    Internal,
    /// It never ran: the worker stopped while it waited for its connection's turn
    /// (`rate_limit::Turn`). Left for the next worker, not a failure.
    NotRun,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Thrown => "thrown",
            ErrorKind::Timeout => "timeout",
            ErrorKind::OutOfMemory => "out_of_memory",
            ErrorKind::StackOverflow => "stack_overflow",
            ErrorKind::Internal => "internal",
            ErrorKind::NotRun => "not_run",
        }
    }

    /// After these the runtime's state cannot be trusted: it is thrown away.
    fn poisons_runtime(self) -> bool {
        !matches!(self, ErrorKind::Thrown)
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}: {message}", kind.as_str())]
pub struct FunctionError {
    pub kind: ErrorKind,
    pub message: String,
    /// What the function logged before it failed.
    pub logs: Vec<LogLine>,
    /// How long it ran.
    pub elapsed: std::time::Duration,
    /// The thrown error's `type` and `payload`, when it has a `type`: Nango's
    /// `ActionError` (`action_script_runtime_error`, the payload its caller is meant to
    /// see), a provider API call's failure (`script_http_error`), an action's input or
    /// output that its schema refuses.
    pub thrown: Option<Box<Thrown>>,
}

/// What a thrown error says of itself, for an action's caller.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Thrown {
    #[serde(rename = "type")]
    pub error_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
}

impl FunctionError {
    /// Its kind and the message's first line (the stack left out).
    pub fn summary(&self) -> String {
        format!(
            "{}: {}",
            self.kind.as_str(),
            self.message.lines().next().unwrap_or_default()
        )
    }

    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> FunctionError {
        FunctionError {
            kind,
            message: message.into(),
            logs: Vec::new(),
            elapsed: std::time::Duration::ZERO,
            thrown: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct LogLine {
    pub level: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
}

/// One `batchSave` / `batchUpdate` / `batchDelete` call.
#[derive(Debug, Clone, PartialEq)]
pub struct Write {
    pub kind: WriteKind,
    pub model: String,
    pub records: Vec<(String, Value)>,
}

/// What a successful execution asks for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Effects {
    pub writes: Vec<Write>,
    pub metadata: Vec<(MetadataWrite, Map<String, Value>)>,
    pub logs: Vec<LogLine>,
    /// How long it ran.
    pub elapsed: std::time::Duration,
    /// What an action returned; `None` when that was nothing (or `null`), and for other
    /// handlers.
    pub output: Option<Value>,
}

/// Counts an execution of `kind` (`on_webhook`, `exec`, `event`, `action`) in the
/// metrics; its status (`ok`, `failed`) and its log lines.
pub fn count_execution<'a>(
    kind: &'static str,
    outcome: &'a Result<Effects, FunctionError>,
) -> (&'static str, &'a [LogLine]) {
    use hookyard_core::metrics::names;
    let (logs, status, elapsed) = match outcome {
        Ok(effects) => (&effects.logs, "ok", effects.elapsed),
        Err(error) => (&error.logs, "failed", error.elapsed),
    };
    metrics::counter!(names::EXECUTIONS, "kind" => kind, "status" => status).increment(1);
    metrics::histogram!(names::EXECUTION_SECONDS, "kind" => kind).record(elapsed.as_secs_f64());
    (status, logs)
}

/// The handler an execution runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Handler {
    /// `onWebhook(nango, payload)`: its writes are collected and committed by the worker.
    #[default]
    OnWebhook,
    /// `exec(nango)`: a reconciliation run. Its `nango` calls out to a [`Host`] as it goes
    /// (writes are applied at once, the provider's API is reachable).
    Exec,
    /// An action's `exec(nango, input)`: the invocation's payload is the input, checked
    /// against the action's `input` schema; what it returns is the output.
    Action,
}

impl Handler {
    /// The name the runner knows it by.
    fn mode(self) -> &'static str {
        match self {
            Handler::OnWebhook => "webhook",
            Handler::Exec => "exec",
            Handler::Action => "action",
        }
    }
}

/// What a run's `nango` calls out to: for exec the store, the provider's API and
/// checkpoints; for onWebhook the provider's API. Called on the JS thread and may block
/// it (the thread is the run's own).
pub trait Host: Send + Sync {
    /// One call: `op` names it and `args` is JSON; the answer is JSON (or empty for
    /// nothing), or a message the function sees thrown. `time_left` is the run's until
    /// its timeout: a call that takes longer is given up, not waited out (QuickJS can
    /// stop only code it runs).
    fn call(&self, op: &str, args: &str, time_left: std::time::Duration) -> Result<String, String>;
}

/// What an execution is given. The JSON texts are shared (`Arc<str>`): a
/// connection's are made once for all its events in a group, a sync's models once.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// The event (an action's input), as JSON.
    pub payload: Arc<str>,
    pub connection_id: String,
    pub provider_config_key: String,
    /// The connection's metadata, as JSON (`getMetadata`).
    pub metadata: Arc<str>,
    /// What `nango.getConnection()` answers, as JSON.
    pub connection: Arc<str>,
    /// The sync's model names as a JSON array: writes to other models are refused.
    pub models: Arc<str>,
    pub handler: Handler,
    /// What its `nango` calls out to (exec's everything, onWebhook's the provider API).
    pub host: Option<Arc<dyn Host>>,
    /// Whether `batchSave` checks records against their model's zod schema.
    pub validation: RecordValidation,
    /// The environment's variables as JSON, for onWebhook's `getEnvironmentVariables()`
    /// (exec asks its host, for them as they are now).
    pub environment_variables: Arc<str>,
}

impl std::fmt::Debug for dyn Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Host")
    }
}
