//! Configuration in layers: compiled-in defaults, then an optional `hookyard.toml`
//! (or the file named by `HOOKYARD_CONFIG`), then `HOOKYARD_*` environment variables
//! (`__` separates sections: `HOOKYARD_INGEST__MAX_BODY_BYTES=1048576`).
//! Loaded and validated once at start; every error names the key at fault.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::secrets::Cipher;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// NATS server address, or several separated by commas (one cluster).
    pub nats_url: String,
    /// A NATS credentials file (`.creds`: a user JWT and its nkey seed, as `nsc`,
    /// Synadia Cloud and NATS's operator tooling hand out), for servers in operator
    /// mode. Instead of credentials in `nats_url`.
    pub nats_credentials: Option<PathBuf>,
    /// `postgres://…` in production; `sqlite://…` is the embedded single-node default.
    pub database_url: String,
    /// Postgres connections one process keeps at most (SQLite takes 4: one writer at a
    /// time). Every replica of every service counts against the server's own limit.
    pub database_max_connections: u32,
    /// Where `hookyard dev` keeps its SQLite file and its NATS store.
    pub data_dir: PathBuf,
    /// Seals the secrets kept in the database (base64 or hex of 32 bytes). Required by
    /// every service; `hookyard dev` keeps one under `data_dir` when none is given.
    pub encryption_key: Option<EncryptionKey>,
    /// While the encryption key changes: more keys, separated by commas, that secrets
    /// may be sealed under. They open secrets and never seal one (`hookyard reseal`).
    pub decryption_keys: Option<EncryptionKey>,
    pub ingest: IngestConfig,
    pub router: RouterConfig,
    pub worker: WorkerConfig,
    pub forwarding: ForwardingConfig,
    pub api: ApiConfig,
    pub streams: StreamsConfig,
    pub telemetry: TelemetryConfig,
    pub logs: LogsConfig,
}

/// The per-webhook operation log (`GET /logs`, `hookyard logs`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogsConfig {
    /// Entries older than this are deleted (hourly).
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// Entries waiting to be written, per process. When the database falls behind and
    /// this fills, further entries are dropped (and counted in
    /// `hookyard_log_entries_dropped_total`); webhooks never are.
    pub buffer: usize,
}

impl Default for LogsConfig {
    fn default() -> Self {
        LogsConfig {
            retention: Duration::from_secs(7 * 86400),
            buffer: 20_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    pub listen: SocketAddr,
    /// The base URL providers reach ingest at, used in the `webhook_url` the API hands
    /// out; `http://{listen}` when unset.
    pub public_url: Option<String>,
    /// Bodies above this are refused with 413 before they are published.
    pub max_body_bytes: usize,
    /// How long reading a request body may take before 408 (a client trickling its body
    /// would otherwise hold a place and a graceful shutdown forever).
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// How long a request may wait for the JetStream ack (retries included) before 503.
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
    /// Requests being published at once; beyond this ingest answers 503 instead of queueing.
    pub max_in_flight: usize,
    /// Bytes of request bodies held at once; beyond this ingest answers 503.
    pub max_in_flight_bytes: usize,
    /// The `Retry-After` given with every 503.
    #[serde(with = "humantime_serde")]
    pub retry_after: Duration,
    /// How often the environment and integration settings are reloaded from the store.
    #[serde(with = "humantime_serde")]
    pub settings_refresh: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouterConfig {
    /// A webhook a router took and did not finish (it died) goes to another after this.
    /// A router routing a webhook tells JetStream it is still at it every third of this.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// A replay waits while the workers have more events than this waiting: live traffic
    /// queues behind at most this many replayed events.
    pub replay_max_backlog: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Routed events taken at once: executed together, their writes committed together.
    pub batch: usize,
    /// Executions running JavaScript at once, at most 256; 0 means one per CPU.
    pub js_threads: usize,
    /// Executions in progress at once, each on a thread of its own (at least
    /// `js_threads`, at most 1024; 0 means 16 per JS thread). One waiting on the provider's API, the
    /// store or a timer leaves its JS thread's turn to another meanwhile.
    pub concurrent_runs: usize,
    /// Syncs not known to be quick (their last execution took 100 ms or more, waits
    /// included) share all those runs but one and all JS threads but one, so that however
    /// many customers' functions hang, the quick ones keep room. Off: any sync may take
    /// all of them.
    pub hold_back_slow_syncs: bool,
    /// An event a worker took and did not finish (it died) goes to another after this.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// The waits before each retry of a failed execution; after the last retry fails,
    /// the event goes to dead letters.
    pub retry_delays: Vec<humantime_serde::Serde<Duration>>,
    /// How often an idle worker checks for a new deploy (it also checks before each group).
    #[serde(with = "humantime_serde")]
    pub functions_refresh: Duration,
    pub limits: FunctionLimits,
    /// Exec runs (reconciliation runs) running JavaScript at once, on threads apart from
    /// the onWebhook ones, so a long run never holds webhooks back.
    pub exec_threads: usize,
    /// Exec runs one worker has in progress at once, each on a thread of its own (fewer
    /// than `exec_threads` count as `exec_threads`, at most 1024). One waiting on the
    /// provider's API leaves its turn to run JavaScript to another meanwhile.
    pub exec_concurrent_runs: usize,
    /// Per exec run: longer than a webhook's, since a run pages through the provider's
    /// API (the wait for the API does not count against `cpu_budget`).
    pub exec_limits: FunctionLimits,
    /// An exec run's lease, renewed every third of it while the run lives: a run whose
    /// worker died is seen as over once it lapses (another run may start, and the sync
    /// notification of what it wrote is sent).
    #[serde(with = "humantime_serde")]
    pub exec_lease: Duration,
    /// What `batchSave` does with a record its model (a zod schema) refuses, in onWebhook
    /// and exec alike.
    pub validate_records: RecordValidation,
}

/// What `batchSave` does with records that do not match their model's zod schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordValidation {
    /// Not checked (a zod parse per record saved, spared).
    Off,
    /// Saved all the same, with a warning in the execution's log, as Nango does.
    #[default]
    Warn,
    /// The call throws: the execution fails, and is retried and dead-lettered like any.
    Fail,
}

impl RecordValidation {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordValidation::Off => "off",
            RecordValidation::Warn => "warn",
            RecordValidation::Fail => "fail",
        }
    }
}

/// Delivery of forwards and sync notifications to customers' apps.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ForwardingConfig {
    /// Base waits before each retry; each wait is drawn between zero and its base (full
    /// jitter). After the last retry fails the delivery goes to dead letters.
    pub retry_delays: Vec<humantime_serde::Serde<Duration>>,
    /// Whether waits are jittered (off only for tests that time retries).
    pub jitter: bool,
    /// One attempt's time limit, connection to last byte.
    #[serde(with = "humantime_serde")]
    pub attempt_timeout: Duration,
    /// Attempts in flight to one destination at once.
    pub concurrency_per_destination: usize,
    /// Failed attempts in a row (5xx, timeouts, refused connections) that open a
    /// destination's circuit: its deliveries then wait `breaker_open`, and one probe
    /// decides whether it closes.
    pub breaker_failures: u32,
    #[serde(with = "humantime_serde")]
    pub breaker_open: Duration,
    /// Allow destinations on loopback (tests, `hookyard dev`).
    pub allow_loopback: bool,
    /// Allow private, link-local and cloud-metadata addresses.
    pub allow_private: bool,
    /// The proxy calls out (forwards, provider APIs, token refreshes) go through:
    /// `http://host:port` or `https://…`, credentials as `user:password@`. Unset: the
    /// environment's `HTTPS_PROXY`, `HTTP_PROXY` and `ALL_PROXY`, read as curl reads them;
    /// `""`: none, whatever the environment says. Its host is trusted past the address
    /// checks above.
    pub proxy: Option<String>,
    /// Destinations called directly, not through the proxy: curl's `NO_PROXY` rules
    /// (names with their subdomains, addresses, CIDR ranges, `*`). Unset: `NO_PROXY`.
    pub no_proxy: Option<String>,
    /// A delivery whose worker died mid-attempt goes to another after this.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// A sync notice still in the outbox this long after its run's commit (its worker
    /// died, or NATS was away) is queued by a worker's sweep, run every half of this.
    #[serde(with = "humantime_serde")]
    pub notices_resend_after: Duration,
}

impl Default for ForwardingConfig {
    fn default() -> Self {
        ForwardingConfig {
            // Ten attempts; with full jitter they spread over about a day (the bases sum to 56 h).
            retry_delays: [60, 300, 1800, 3600, 7200, 14400, 28800, 57600, 86400]
                .map(|s| humantime_serde::Serde::from(Duration::from_secs(s)))
                .to_vec(),
            jitter: true,
            attempt_timeout: Duration::from_secs(15),
            concurrency_per_destination: 16,
            breaker_failures: 5,
            breaker_open: Duration::from_secs(30),
            allow_loopback: false,
            allow_private: false,
            proxy: None,
            no_proxy: None,
            ack_wait: Duration::from_secs(60),
            notices_resend_after: Duration::from_secs(30),
        }
    }
}

/// What one execution of a function may use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FunctionLimits {
    /// Heap of the function's runtime (its loaded modules included).
    pub memory_bytes: usize,
    /// JavaScript stack; deeper recursion fails with `stack_overflow`.
    pub stack_bytes: usize,
    /// CPU time of the JS thread, checked by QuickJS's interrupt handler.
    #[serde(with = "humantime_serde")]
    pub cpu_budget: Duration,
    /// Wall-clock time, timers and waits included.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    /// Actions (`POST /action/trigger`; in a worker, exec's `triggerAction` and
    /// asynchronous actions) running JavaScript at once.
    pub action_threads: usize,
    /// Actions in progress at once, each on a thread of its own (fewer than
    /// `action_threads` count as `action_threads`, at most 1024); one waiting on the
    /// provider's API leaves its turn to run JavaScript to another. Four per action
    /// thread more may wait for one; past that they are refused (503). The actions these
    /// trigger run on as many threads again.
    pub action_concurrent_runs: usize,
    /// Per action run; the caller waits for it.
    pub action_limits: FunctionLimits,
    /// An asynchronous action (`X-Async: true`) that failed and may be retried
    /// (`X-Max-Retries`) waits this before its first retry, twice as long before each
    /// next one, at most 5 minutes.
    #[serde(with = "humantime_serde")]
    pub async_retry_delay: Duration,
    /// How long an asynchronous action's outcome stays readable (`GET /action/{id}`)
    /// after it finished.
    #[serde(with = "humantime_serde")]
    pub async_results_kept: Duration,
}

/// The encryption key's text; never printed.
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EncryptionKey(pub String);

impl std::fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EncryptionKey(***)")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamsConfig {
    /// How long `HOOKS_RAW` keeps webhooks: the window operators can replay from.
    #[serde(with = "humantime_serde")]
    pub raw_max_age: Duration,
    /// A message id seen again within this window is stored once (provider retries).
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// 1 on a single node, 3 in a cluster.
    pub replicas: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// `auto` (pretty in a terminal, JSON otherwise), `pretty` or `json`.
    pub log_format: LogFormat,
    /// A `tracing` filter; `RUST_LOG` takes precedence when set.
    pub log_filter: String,
    /// Where the service serves Prometheus' `GET /metrics`: a listener of its own, kept
    /// off the public ones. Unset: not served (`hookyard dev`: 127.0.0.1:3005).
    pub metrics_listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Auto,
    Pretty,
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_credentials: None,
            database_url: "sqlite://.hookyard/hookyard.db".into(),
            database_max_connections: 10,
            data_dir: PathBuf::from(".hookyard"),
            encryption_key: None,
            decryption_keys: None,
            ingest: IngestConfig::default(),
            router: RouterConfig::default(),
            worker: WorkerConfig::default(),
            forwarding: ForwardingConfig::default(),
            api: ApiConfig::default(),
            streams: StreamsConfig::default(),
            telemetry: TelemetryConfig::default(),
            logs: LogsConfig::default(),
        }
    }
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 3003)),
            public_url: None,
            max_body_bytes: 10 * 1024 * 1024,
            body_read_timeout: Duration::from_secs(30),
            publish_timeout: Duration::from_secs(2),
            max_in_flight: 1024,
            max_in_flight_bytes: 256 * 1024 * 1024,
            retry_after: Duration::from_secs(5),
            settings_refresh: Duration::from_secs(2),
        }
    }
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            ack_wait: Duration::from_secs(10),
            replay_max_backlog: 20_000,
        }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            batch: 256,
            js_threads: 0,
            concurrent_runs: 0,
            hold_back_slow_syncs: true,
            ack_wait: Duration::from_secs(60),
            retry_delays: [1, 10, 60, 300, 1800]
                .map(|s| humantime_serde::Serde::from(Duration::from_secs(s)))
                .to_vec(),
            functions_refresh: Duration::from_secs(1),
            limits: FunctionLimits::default(),
            exec_threads: 2,
            exec_concurrent_runs: 8,
            exec_limits: FunctionLimits {
                memory_bytes: 256 * 1024 * 1024,
                stack_bytes: 1024 * 1024,
                cpu_budget: Duration::from_secs(600),
                timeout: Duration::from_secs(3600),
            },
            exec_lease: Duration::from_secs(90),
            validate_records: RecordValidation::default(),
        }
    }
}

impl Default for FunctionLimits {
    fn default() -> Self {
        FunctionLimits {
            memory_bytes: 64 * 1024 * 1024,
            stack_bytes: 1024 * 1024,
            cpu_budget: Duration::from_secs(2),
            timeout: Duration::from_secs(10),
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 3004)),
            action_threads: 2,
            action_concurrent_runs: 32,
            action_limits: FunctionLimits {
                memory_bytes: 256 * 1024 * 1024,
                stack_bytes: 1024 * 1024,
                cpu_budget: Duration::from_secs(30),
                timeout: Duration::from_secs(60),
            },
            async_retry_delay: Duration::from_secs(5),
            async_results_kept: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl Default for StreamsConfig {
    fn default() -> Self {
        StreamsConfig {
            raw_max_age: Duration::from_secs(7 * 24 * 3600),
            // The server keeps every id of the window in memory (about 1.2M ids at
            // 10k webhooks/s); later repeats are caught by the router and worker markers.
            duplicate_window: Duration::from_secs(2 * 60),
            replicas: 1,
        }
    }
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            log_format: LogFormat::Auto,
            log_filter: DEFAULT_LOG_FILTER.into(),
            metrics_listen: None,
        }
    }
}

/// Info for hookyard; warnings only from the NATS client (its connection events repeat
/// hookyard's own) and sqlx (Postgres notices such as "relation … already exists,
/// skipping" at every start).
pub const DEFAULT_LOG_FILTER: &str = "info,async_nats=warn,sqlx=warn";

/// Why the configuration cannot be used; the message names the key and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Parse(String),
    #[error("configuration file {0} does not exist")]
    MissingFile(PathBuf),
    #[error("configuration is invalid:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
    #[error(
        "HOOKYARD_ENCRYPTION_KEY is not set: the database keeps secrets sealed under it. \
         Generate one with `hookyard keygen` and keep it safe: secrets sealed under a lost key cannot be read back"
    )]
    NoEncryptionKey,
}

/// `HOOKYARD_*` variables that are read elsewhere, not configuration keys.
const NOT_CONFIG_KEYS: &[&str] = &[
    "config",
    "nats_server_bin",
    // The tests' own: their Postgres, and the TypeScript compiler they check types with.
    "test_postgres_url",
    "tsc",
    // `hookyard deploy`'s own.
    "api_url",
    "secret_key",
    // Fault injection for the crash tests (worker).
    "fault",
];

impl Config {
    /// Defaults, then `hookyard.toml` (or `$HOOKYARD_CONFIG`), then `HOOKYARD_*`.
    pub fn load() -> Result<Config, ConfigError> {
        let explicit = std::env::var_os("HOOKYARD_CONFIG").map(PathBuf::from);
        if let Some(path) = &explicit {
            if !path.exists() {
                return Err(ConfigError::MissingFile(path.clone()));
            }
        }
        let file = explicit.unwrap_or_else(|| PathBuf::from("hookyard.toml"));
        Self::from_figment(
            Figment::from(Serialized::defaults(Config::default()))
                .merge(Toml::file(file))
                .merge(Env::prefixed("HOOKYARD_").split("__").ignore(NOT_CONFIG_KEYS)),
        )
    }

    /// Extracts and validates a configuration from any set of layers.
    pub fn from_figment(figment: Figment) -> Result<Config, ConfigError> {
        let config: Config = figment.extract().map_err(|e| ConfigError::Parse(described(&e)))?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if self.nats_servers().is_empty() {
            problems.push("nats_url is empty; give a server address such as nats://127.0.0.1:4222".into());
        }
        if let Err(problem) = self.nats_auth() {
            problems.push(problem);
        }
        if let Some(file) = &self.nats_credentials {
            if let Err(problem) = crate::nats_creds::read(file) {
                problems.push(problem);
            }
        }
        if !(self.database_url.starts_with("postgres://")
            || self.database_url.starts_with("postgresql://")
            || self.database_url.starts_with("sqlite:"))
        {
            problems.push(format!(
                "database_url {:?} is neither postgres://… nor sqlite:…",
                self.database_url
            ));
        }
        if !(1..=1000).contains(&self.database_max_connections) {
            problems.push("database_max_connections must be between 1 and 1000".into());
        }
        if let Some(key) = &self.encryption_key {
            if let Err(error) = Cipher::from_text(&key.0) {
                problems.push(format!("encryption_key: {error}"));
            }
        }
        if let Err(error) = self.decryption_ciphers() {
            problems.push(error);
        }
        if let Some(url) = &self.ingest.public_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                problems.push(format!("ingest.public_url {url:?} must start with http:// or https://"));
            }
        }
        if let Err(problem) = crate::outbound::Proxies::of(&self.forwarding) {
            problems.push(problem);
        }
        let ingest = &self.ingest;
        if !(1024..=64 * 1024 * 1024).contains(&ingest.max_body_bytes) {
            problems.push(format!(
                "ingest.max_body_bytes is {}; it must be between 1 KiB and 64 MiB",
                ingest.max_body_bytes
            ));
        }
        if ingest.max_in_flight == 0 {
            problems.push("ingest.max_in_flight must be at least 1".into());
        }
        if ingest.max_in_flight_bytes < ingest.max_body_bytes {
            problems.push(format!(
                "ingest.max_in_flight_bytes ({}) is smaller than ingest.max_body_bytes ({}): no large body could ever be accepted",
                ingest.max_in_flight_bytes, ingest.max_body_bytes
            ));
        }
        if ingest.body_read_timeout < Duration::from_millis(100) {
            problems.push("ingest.body_read_timeout must be at least 100ms".into());
        }
        if ingest.publish_timeout < Duration::from_millis(50) {
            problems.push("ingest.publish_timeout must be at least 50ms".into());
        }
        if ingest.retry_after < Duration::from_secs(1) {
            problems.push("ingest.retry_after must be at least 1s (Retry-After counts whole seconds)".into());
        }
        if ingest.settings_refresh < Duration::from_millis(100) {
            problems.push("ingest.settings_refresh must be at least 100ms".into());
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&self.router.ack_wait) {
            problems.push("router.ack_wait must be between 1s and 1h".into());
        }
        let worker = &self.worker;
        if !(1..=10_000).contains(&worker.batch) {
            problems.push("worker.batch must be between 1 and 10000".into());
        }
        for (name, limits) in [
            ("worker.limits", &worker.limits),
            ("worker.exec_limits", &worker.exec_limits),
            ("api.action_limits", &self.api.action_limits),
        ] {
            if limits.memory_bytes < 1024 * 1024 {
                problems.push(format!("{name}.memory_bytes must be at least 1 MiB"));
            }
            if !(64 * 1024..=64 * 1024 * 1024).contains(&limits.stack_bytes) {
                problems.push(format!("{name}.stack_bytes must be between 64 KiB and 64 MiB"));
            }
            if limits.cpu_budget < Duration::from_millis(1) || limits.timeout < limits.cpu_budget {
                problems.push(format!(
                    "{name}.cpu_budget must be at least 1ms and no more than {name}.timeout"
                ));
            }
        }
        // Each a thread; each thread keeps its own copies of the syncs it runs.
        if worker.js_threads > 256 {
            problems.push("worker.js_threads must be at most 256 (0: one per CPU)".into());
        }
        if worker.concurrent_runs > 1024 {
            problems.push("worker.concurrent_runs must be at most 1024 (0: 16 per JS thread)".into());
        }
        if !(1..=64).contains(&worker.exec_threads) {
            problems.push("worker.exec_threads must be between 1 and 64".into());
        }
        if !(1..=64).contains(&self.api.action_threads) {
            problems.push("api.action_threads must be between 1 and 64".into());
        }
        for (name, runs) in [
            ("worker.exec_concurrent_runs", worker.exec_concurrent_runs),
            ("api.action_concurrent_runs", self.api.action_concurrent_runs),
        ] {
            if runs > 1024 {
                problems.push(format!("{name} must be at most 1024"));
            }
        }
        if !(Duration::from_millis(10)..=Duration::from_secs(3600)).contains(&self.api.async_retry_delay) {
            problems.push("api.async_retry_delay must be between 10ms and 1h".into());
        }
        if self.api.async_results_kept < Duration::from_secs(60) {
            problems.push("api.async_results_kept must be at least 1m".into());
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&worker.exec_lease) {
            problems.push("worker.exec_lease must be between 1s and 1h".into());
        }
        let limits = &worker.limits;
        // A running execution must never be redelivered to another worker.
        if worker.ack_wait < limits.timeout * 2 + Duration::from_secs(5) {
            problems.push(format!(
                "worker.ack_wait ({:?}) must exceed twice worker.limits.timeout ({:?}) plus 5s",
                worker.ack_wait, limits.timeout
            ));
        }
        if worker.retry_delays.iter().any(|d| **d < Duration::from_millis(10)) {
            problems.push("worker.retry_delays must each be at least 10ms (a zero delay retries in a hot loop)".into());
        }
        if worker.functions_refresh < Duration::from_millis(100) {
            problems.push("worker.functions_refresh must be at least 100ms".into());
        }
        let forwarding = &self.forwarding;
        if forwarding.retry_delays.iter().any(|d| **d < Duration::from_millis(10)) {
            problems.push("forwarding.retry_delays must each be at least 10ms".into());
        }
        if forwarding.concurrency_per_destination == 0 || forwarding.breaker_failures == 0 {
            problems.push(
                "forwarding.concurrency_per_destination and forwarding.breaker_failures must be at least 1".into(),
            );
        }
        if forwarding.attempt_timeout < Duration::from_millis(100) {
            problems.push("forwarding.attempt_timeout must be at least 100ms".into());
        }
        if forwarding.ack_wait < forwarding.attempt_timeout * 2 {
            problems.push(format!(
                "forwarding.ack_wait ({:?}) must be at least twice forwarding.attempt_timeout ({:?})",
                forwarding.ack_wait, forwarding.attempt_timeout
            ));
        }
        if forwarding.notices_resend_after < Duration::from_millis(200) {
            problems.push("forwarding.notices_resend_after must be at least 200ms".into());
        }
        let streams = &self.streams;
        if streams.raw_max_age < Duration::from_secs(60) {
            problems.push("streams.raw_max_age must be at least 1m".into());
        }
        if streams.duplicate_window < Duration::from_secs(1) || streams.duplicate_window > streams.raw_max_age {
            problems.push("streams.duplicate_window must be between 1s and streams.raw_max_age".into());
        }
        if self.logs.retention < Duration::from_secs(60) {
            problems.push("logs.retention must be at least 1m".into());
        }
        if self.logs.buffer == 0 {
            problems.push("logs.buffer must be at least 1".into());
        }
        if ![1, 3, 5].contains(&streams.replicas) {
            problems.push(format!(
                "streams.replicas is {}; use 1 (single node), 3 or 5",
                streams.replicas
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// The cipher for secrets at rest (also opening with `decryption_keys`); an error
    /// naming the fix when no key is configured.
    pub fn cipher(&self) -> Result<Cipher, ConfigError> {
        let key = self.encryption_key.as_ref().ok_or(ConfigError::NoEncryptionKey)?;
        // validate() has parsed them already; a Config built in code may skip that.
        let cipher =
            Cipher::from_text(&key.0).map_err(|e| ConfigError::Invalid(vec![format!("encryption_key: {e}")]))?;
        let others = self.decryption_ciphers().map_err(|e| ConfigError::Invalid(vec![e]))?;
        Ok(cipher.also_opening(others))
    }

    /// The ciphers of `decryption_keys`; the error names the one that is not a key.
    fn decryption_ciphers(&self) -> Result<Vec<Cipher>, String> {
        let Some(keys) = &self.decryption_keys else {
            return Ok(Vec::new());
        };
        keys.0
            .split(',')
            .map(str::trim)
            .filter(|key| !key.is_empty())
            .enumerate()
            .map(|(n, key)| Cipher::from_text(key).map_err(|e| format!("decryption_keys: key {}: {e}", n + 1)))
            .collect()
    }

    /// Settings that are valid but probably not meant: logged as warnings at start and
    /// printed by `hookyard config`.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.ingest.public_url.is_none() && self.ingest.listen.ip().is_unspecified() {
            warnings.push(format!(
                "ingest.public_url is not set, so webhook URLs (the API's, `hookyard env`'s, \
                 getWebhookURL()) name {}, which no provider can reach: set it to the address \
                 providers reach ingest at",
                self.webhook_base_url()
            ));
        }
        warnings
    }

    /// Where providers send webhooks: `ingest.public_url`, or `http://{ingest.listen}`.
    pub fn webhook_base_url(&self) -> String {
        match &self.ingest.public_url {
            Some(url) => url.trim_end_matches('/').to_string(),
            None => format!("http://{}", self.ingest.listen),
        }
    }

    /// The server list for the NATS client: async-nats does not split `a,b` itself.
    pub fn nats_servers(&self) -> Vec<String> {
        self.nats_url
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    }

    /// How to sign in to NATS: `nats_credentials`' file, or the credentials `nats_url`
    /// carries (`nats://user:password@host`, or a token as `nats://token@host`), for the
    /// client's options: async-nats reads none from a URL (nats-io/nats.rs#1623). One set
    /// for every server; servers written without any get it too.
    pub fn nats_auth(&self) -> Result<Option<NatsAuth>, String> {
        match (&self.nats_credentials, self.nats_url_auth()?) {
            (Some(_), Some(_)) => Err("nats_url carries credentials and nats_credentials names a file: \
                                       give one of them"
                .into()),
            (Some(file), None) => Ok(Some(NatsAuth::CredentialsFile(file.clone()))),
            (None, auth) => Ok(auth),
        }
    }

    fn nats_url_auth(&self) -> Result<Option<NatsAuth>, String> {
        let mut found: Option<NatsAuth> = None;
        for server in self.nats_servers() {
            let Some(url) = nats_server_url(&server) else { continue };
            let decoded = |part: &str| {
                percent_encoding::percent_decode_str(part)
                    .decode_utf8_lossy()
                    .into_owned()
            };
            let auth = match (url.username(), url.password()) {
                ("", None) => continue,
                (user, Some(password)) => NatsAuth::UserPassword {
                    user: decoded(user),
                    password: decoded(password),
                },
                (token, None) => NatsAuth::Token(decoded(token)),
            };
            match &found {
                Some(other) if *other != auth => {
                    return Err(
                        "nats_url: its servers carry different credentials; hookyard connects to \
                                every server of the cluster with one set"
                            .into(),
                    )
                }
                _ => found = Some(auth),
            }
        }
        Ok(found)
    }

    /// `nats_url` as messages and `hookyard config` show it: passwords and tokens hidden.
    pub fn nats_url_shown(&self) -> String {
        self.nats_servers()
            .iter()
            .map(|server| match nats_server_url(server) {
                Some(mut url) if !url.username().is_empty() || url.password().is_some() => {
                    if url.password().is_some() {
                        let _ = url.set_password(Some(HIDDEN));
                    } else {
                        let _ = url.set_username(HIDDEN);
                    }
                    url.to_string().trim_end_matches('/').to_string()
                }
                _ => server.clone(),
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// What a secret is shown as in messages and `hookyard config`: it is set, and that is all.
pub const HIDDEN: &str = "(hidden)";

/// A URL with its password shown as [`HIDDEN`] (database, proxy): for messages and
/// `hookyard config`. Plain string work, so that a URL that does not parse keeps it
/// hidden too.
pub fn without_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:{HIDDEN}{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// How hookyard authenticates to NATS: what `nats_url` carries, or `nats_credentials`.
#[derive(Clone, PartialEq, Eq)]
pub enum NatsAuth {
    UserPassword {
        user: String,
        password: String,
    },
    Token(String),
    /// A `.creds` file, read at each connection (`nats_creds`).
    CredentialsFile(PathBuf),
}

impl std::fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NatsAuth::UserPassword { user, .. } => write!(f, "UserPassword({user}, ***)"),
            NatsAuth::Token(_) => f.write_str("Token(***)"),
            NatsAuth::CredentialsFile(file) => write!(f, "CredentialsFile({})", file.display()),
        }
    }
}

/// A server of `nats_url` as a URL (`nats://` assumed when it names no scheme, as
/// async-nats does); `None` when it does not parse, which the client reports.
fn nats_server_url(server: &str) -> Option<url::Url> {
    let full = if server.contains("://") {
        server.to_string()
    } else {
        format!("nats://{server}")
    };
    url::Url::parse(&full).ok()
}

/// A layer's error with its key as the user wrote it: `HOOKYARD_INGEST__LISTEN` for a
/// variable, `hookyard.toml: ingest.listen` for the file (figment's own wording shows
/// `INGEST.LISTEN` and `default.ingest.listen`).
fn described(error: &figment::Error) -> String {
    use figment::error::Kind;
    let what = match &error.kind {
        Kind::UnknownField(found, known) => format!("unknown key `{found}` (known: {})", known.join(", ")),
        Kind::UnknownVariant(found, known) => format!("unknown value `{found}` (one of: {})", known.join(", ")),
        other => other.to_string(),
    };
    let key = error.path.join(".");
    let Some(metadata) = &error.metadata else {
        return if key.is_empty() { what } else { format!("{key}: {what}") };
    };
    match &metadata.source {
        Some(figment::Source::File(file)) if key.is_empty() => format!("{}: {what}", file.display()),
        Some(figment::Source::File(file)) => format!("{}: {key}: {what}", file.display()),
        _ if metadata.name.contains("environment") => format!("{}: {what}", variable(&error.path)),
        _ => format!("{key}: {what}"),
    }
}

/// The `HOOKYARD_*` variable of a key path: the one set (an unknown section's path
/// stops at the section), else the name it would have.
fn variable(path: &[String]) -> String {
    let name = format!("HOOKYARD_{}", path.join("__").to_ascii_uppercase());
    std::env::vars()
        .map(|(set, _)| set)
        .find(|set| *set == name || set.starts_with(&format!("{name}__")))
        .unwrap_or(name)
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment's Jail closures return its (large) Error
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn nats_credentials_come_from_the_url_once_and_are_shown_hidden() {
        let with = |nats_url: &str| Config {
            nats_url: nats_url.into(),
            ..Config::default()
        };
        let cluster = with("nats://app:p%40ss@a:4222, nats://app:p%40ss@b:4222,c:4222");
        assert_eq!(
            cluster.nats_auth(),
            Ok(Some(NatsAuth::UserPassword {
                user: "app".into(),
                password: "p@ss".into()
            }))
        );
        assert_eq!(
            cluster.nats_url_shown(),
            "nats://app:(hidden)@a:4222,nats://app:(hidden)@b:4222,c:4222"
        );
        let token = with("tls://s3cr3t@nats.example.com");
        assert_eq!(token.nats_auth(), Ok(Some(NatsAuth::Token("s3cr3t".into()))));
        assert_eq!(token.nats_url_shown(), "tls://(hidden)@nats.example.com");
        assert_eq!(with("nats://127.0.0.1:4222").nats_auth(), Ok(None));

        let mixed = with("nats://app:one@a:4222,nats://app:two@b:4222");
        let problem = mixed.validate().unwrap_err().to_string();
        assert!(
            problem.contains("different credentials") && !problem.contains("two"),
            "{problem}"
        );
    }

    #[test]
    fn a_public_url_left_to_an_all_interfaces_listener_is_warned_of() {
        let mut config = Config::default();
        assert!(config.warnings().is_empty(), "{:?}", config.warnings());
        config.ingest.listen = "0.0.0.0:3003".parse().unwrap();
        let warnings = config.warnings();
        assert!(warnings[0].contains("name http://0.0.0.0:3003"), "{warnings:?}");
        config.ingest.public_url = Some("https://hooks.example.com".into());
        assert!(config.warnings().is_empty());
    }

    #[test]
    fn defaults_are_valid() {
        let config = Config::default();
        config.validate().unwrap();
        assert_eq!(config.streams.raw_max_age, Duration::from_secs(604800));
        assert_eq!(config.ingest.max_body_bytes, 10 * 1024 * 1024);
    }

    #[test]
    fn file_then_environment_apply_in_order() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "hookyard.toml",
                "nats_url = 'nats://a:4222, nats://b:4222'\n[ingest]\npublish_timeout = '750ms'\nmax_in_flight = 3\n[streams]\nraw_max_age = '3d'\n",
            )?;
            jail.set_env("HOOKYARD_INGEST__MAX_IN_FLIGHT", "7");
            let config = Config::load().expect("valid");
            assert_eq!(config.nats_servers(), vec!["nats://a:4222", "nats://b:4222"]);
            assert_eq!(config.ingest.publish_timeout, Duration::from_millis(750));
            assert_eq!(config.ingest.max_in_flight, 7, "environment wins over the file");
            assert_eq!(config.streams.raw_max_age, Duration::from_secs(3 * 86400));
            Ok(())
        });
    }

    #[test]
    fn hookyard_variables_that_are_not_keys_are_left_alone() {
        Jail::expect_with(|jail| {
            jail.set_env("HOOKYARD_NATS_SERVER_BIN", "/usr/local/bin/nats-server");
            jail.set_env("HOOKYARD_TEST_POSTGRES_URL", "postgres://x@y/z");
            jail.set_env("HOOKYARD_NATS_URL", "nats://10.0.0.1:4222");
            let config = Config::load().expect("valid");
            assert_eq!(config.nats_url, "nats://10.0.0.1:4222");
            Ok(())
        });
    }

    #[test]
    fn invalid_values_are_all_reported_with_their_keys() {
        Jail::expect_with(|jail| {
            jail.set_env("HOOKYARD_INGEST__MAX_BODY_BYTES", "10");
            jail.set_env("HOOKYARD_STREAMS__REPLICAS", "2");
            jail.set_env("HOOKYARD_WORKER__LIMITS__TIMEOUT", "1m");
            jail.set_env("HOOKYARD_WORKER__RETRY_DELAYS", "[\"0s\"]");
            jail.set_env("HOOKYARD_FORWARDING__ATTEMPT_TIMEOUT", "0s");
            jail.set_env("HOOKYARD_LOGS__RETENTION", "0s");
            jail.set_env("HOOKYARD_LOGS__BUFFER", "0");
            jail.set_env("HOOKYARD_DATABASE_MAX_CONNECTIONS", "0");
            jail.set_env("HOOKYARD_FORWARDING__PROXY", "socks5://u:pw@proxy:1080");
            jail.set_env("HOOKYARD_WORKER__CONCURRENT_RUNS", "5000");
            jail.set_env("HOOKYARD_API__ACTION_CONCURRENT_RUNS", "1025");
            let message = Config::load().unwrap_err().to_string();
            assert!(message.contains("ingest.max_body_bytes is 10"), "{message}");
            assert!(message.contains("streams.replicas is 2"), "{message}");
            assert!(
                message.contains("worker.ack_wait (60s) must exceed twice worker.limits.timeout (60s)"),
                "{message}"
            );
            assert!(
                message.contains("worker.retry_delays must each be at least 10ms"),
                "{message}"
            );
            for problem in [
                "forwarding.attempt_timeout must be at least 100ms",
                "logs.retention must be at least 1m",
                "logs.buffer must be at least 1",
                "database_max_connections must be between 1 and 1000",
                "worker.concurrent_runs must be at most 1024 (0: 16 per JS thread)",
                "api.action_concurrent_runs must be at most 1024",
                "forwarding.proxy \"socks5://u:(hidden)@proxy:1080\" is not an http:// or https:// proxy",
            ] {
                assert!(message.contains(problem), "{message}");
            }
            Ok(())
        });
    }

    #[test]
    fn passwords_are_hidden_and_the_rest_kept() {
        assert_eq!(
            without_password("postgres://u:s3cr:et@h:5432/db?sslmode=require"),
            "postgres://u:(hidden)@h:5432/db?sslmode=require"
        );
        assert_eq!(without_password("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(without_password("sqlite://x.db"), "sqlite://x.db");
    }

    #[test]
    fn record_validation_is_warn_fail_or_off() {
        Jail::expect_with(|jail| {
            assert_eq!(
                Config::load().expect("valid").worker.validate_records,
                RecordValidation::Warn
            );
            jail.set_env("HOOKYARD_WORKER__VALIDATE_RECORDS", "fail");
            assert_eq!(
                Config::load().expect("valid").worker.validate_records,
                RecordValidation::Fail
            );
            jail.set_env("HOOKYARD_WORKER__VALIDATE_RECORDS", "strict");
            let message = Config::load().unwrap_err().to_string();
            assert!(
                message.contains("HOOKYARD_WORKER__VALIDATE_RECORDS: unknown value `strict` (one of: off, warn, fail)"),
                "{message}"
            );
            Ok(())
        });
    }

    #[test]
    fn the_example_file_shows_the_defaults() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../hookyard.example.toml");
        let from_file: Config = Figment::from(Toml::file(path)).extract().expect("the example parses");
        let as_json = |c: &Config| serde_json::to_value(c).unwrap();
        assert_eq!(as_json(&from_file), as_json(&Config::default()));
    }

    #[test]
    fn the_encryption_key_is_checked_and_never_printed() {
        Jail::expect_with(|jail| {
            assert!(matches!(
                Config::load().expect("valid").cipher(),
                Err(ConfigError::NoEncryptionKey)
            ));
            jail.set_env("HOOKYARD_ENCRYPTION_KEY", "not-a-key");
            let message = Config::load().unwrap_err().to_string();
            assert!(
                message.contains("encryption_key") && !message.contains("not-a-key"),
                "{message}"
            );
            let key = Cipher::generate_key_text();
            jail.set_env("HOOKYARD_ENCRYPTION_KEY", &key);
            let config = Config::load().expect("valid");
            config.cipher().expect("a usable key");
            assert!(!format!("{config:?}").contains(&key));

            let old = Cipher::generate_key_text();
            jail.set_env("HOOKYARD_DECRYPTION_KEYS", format!("{old},not-a-key"));
            let message = Config::load().unwrap_err().to_string();
            assert!(
                message.contains("decryption_keys: key 2: the encryption key is invalid")
                    && !message.contains("not-a-key")
                    && !message.contains(&old),
                "{message}"
            );
            let sealed = Cipher::from_text(&old)
                .unwrap()
                .seal(crate::secrets::Purpose::Credentials, "{}");
            jail.set_env("HOOKYARD_DECRYPTION_KEYS", format!("{old}, "));
            let config = Config::load().expect("valid");
            assert!(!format!("{config:?}").contains(&old));
            let cipher = config.cipher().unwrap();
            assert_eq!(
                cipher
                    .open_telling(crate::secrets::Purpose::Credentials, &sealed)
                    .unwrap(),
                ("{}".to_string(), false),
                "opens what the old key sealed"
            );
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_bad_types_and_missing_files_are_errors() {
        Jail::expect_with(|jail| {
            jail.create_file("hookyard.toml", "[ingest]\nmax_bodybytes = 10\n")?;
            let message = Config::load().unwrap_err().to_string();
            assert!(
                message.contains("hookyard.toml: ingest.max_bodybytes: unknown key `max_bodybytes` (known: listen, "),
                "{message}"
            );
            jail.create_file("hookyard.toml", "[ingest]\npublish_timeout = 'soon'\n")?;
            let message = Config::load().unwrap_err().to_string();
            assert!(
                message.contains(
                    "hookyard.toml: ingest.publish_timeout: invalid value string \"soon\", expected a duration"
                ),
                "{message}"
            );
            jail.create_file("hookyard.toml", "")?;
            // A variable is named as it is set, not as figment's path.
            jail.set_env("HOOKYARD_INGEST__PUBLISH_TIMEOUT", "soon");
            let message = Config::load().unwrap_err().to_string();
            assert!(
                message.contains("HOOKYARD_INGEST__PUBLISH_TIMEOUT: invalid value"),
                "{message}"
            );
            jail.set_env("HOOKYARD_INGEST__PUBLISH_TIMEOUT", "1s");
            jail.set_env("HOOKYARD_INGST__LISTEN", "127.0.0.1:1");
            let message = Config::load().unwrap_err().to_string();
            assert!(
                message.contains("HOOKYARD_INGST__LISTEN: unknown key `ingst` (known: nats_url, "),
                "{message}"
            );
            jail.clear_env();
            jail.set_env("HOOKYARD_CONFIG", "missing.toml");
            let message = Config::load().unwrap_err().to_string();
            assert!(message.contains("missing.toml does not exist"), "{message}");
            Ok(())
        });
    }
}
