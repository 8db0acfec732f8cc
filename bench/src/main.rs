//! `hookyard-bench`: load generators and benchmarks that print their figures.

mod actions;
mod dev_memory;
mod forward;
mod ingest_compare;
mod load;
mod publish_modes;
mod pull_batches;
mod reconciler;
mod records;
mod replay;
mod router;
mod setup;
mod worker;

use std::time::Duration;

use clap::{Parser, Subcommand};

// The same allocator as the `hookyard` binary, so the servers measured here allocate as
// they do in production.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "hookyard-bench", about = "hookyard load generators and benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load a running ingest (or any URL) with POSTs and print throughput and latency.
    Ingest {
        #[arg(long)]
        url: String,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// Start NATS, hookyard's ingest and bare axum→JetStream handlers, load each in
    /// turn, and print hookyard's ratio to each. Checks that no 2xx came without a stored message.
    IngestCompare {
        #[command(flatten)]
        load: LoadArgs,
        /// Alternating rounds per target.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
        rounds: u32,
        /// HOOKS_RAW's duplicate window (how long message ids are remembered).
        #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
        duplicate_window: Duration,
    },
    /// Start `hookyard dev`, load its ingest in rounds, and print its resident memory
    /// before and after each round (once the pipeline has drained).
    DevMemory {
        /// The `hookyard` binary (default: the one next to this one).
        #[arg(long)]
        hookyard: Option<std::path::PathBuf>,
        /// Rounds of load.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
        rounds: u32,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// JetStream publishes with a message id, each awaiting its ack, against one
    /// fast-ingest batch: messages/s and CPU per message of client and nats-server.
    PublishModes {
        /// Seconds per mode.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Acked publishes in flight at once.
        #[arg(long, default_value_t = 256)]
        in_flight: usize,
    },
    /// A backlog taken through `consume` with each pull batch size, on a NATS connection
    /// busy with other traffic: time, and the pauses a small batch causes.
    PullBatches {
        /// Batch sizes to measure.
        #[arg(long, value_delimiter = ',', default_value = "1,2,32,200")]
        batch: Vec<usize>,
        /// Messages per batch size.
        #[arg(long, default_value_t = 20_000)]
        messages: usize,
    },
    /// Records write throughput on Postgres (a fresh database on the local server, or
    /// $HOOKYARD_TEST_POSTGRES_URL's) and SQLite, per batch size.
    Records {
        /// Batch sizes to measure.
        #[arg(long, value_delimiter = ',', default_value = "1,100,1000")]
        batch: Vec<usize>,
        /// Records written per batch size (at least one batch).
        #[arg(long, default_value_t = 20_000)]
        records: usize,
    },
    /// Reconciler tick time and Postgres CPU with N scheduled connections and nothing due.
    Reconciler {
        /// Connection counts to measure.
        #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
        connections: Vec<usize>,
        /// Ticks timed per count, after the first.
        #[arg(long, default_value_t = 20)]
        ticks: usize,
    },
    /// Router throughput: events/s for single-event and batched webhook bodies.
    Router {
        /// Events per webhook body.
        #[arg(long, value_delimiter = ',', default_value = "1,100")]
        batch: Vec<usize>,
        /// Events routed per batch size.
        #[arg(long, default_value_t = 20_000)]
        events: usize,
        /// The store the router reads connections from.
        #[arg(long, value_enum, default_value = "sqlite")]
        store: router::StoreKind,
    },
    /// Replay throughput: webhooks read from HOOKS_RAW and re-routed to HOOKS_CONN per
    /// second, by one router.
    Replay {
        /// Events per webhook body.
        #[arg(long, value_delimiter = ',', default_value = "1,10")]
        batch: Vec<usize>,
        /// Webhooks in the replayed window, per batch size.
        #[arg(long, default_value_t = 100_000)]
        webhooks: usize,
        /// Replays of the same window per batch size.
        #[arg(long, default_value_t = 2)]
        rounds: usize,
    },
    /// Worker throughput (a burst) and latency (a steady rate) for the example
    /// function on Postgres, with the worker's CPU per event.
    Worker {
        /// Events of the burst.
        #[arg(long, default_value_t = 50_000)]
        events: u64,
        /// Connections the events are spread over.
        #[arg(long, default_value_t = 100)]
        connections: usize,
        /// Seconds of the steady-rate phase.
        #[arg(long, default_value_t = 10)]
        latency_seconds: u64,
        /// Events/s of the steady-rate phase (0: half the burst throughput).
        #[arg(long, default_value_t = 0)]
        rate: u64,
        /// The worker's JS threads (0: one per CPU).
        #[arg(long, default_value_t = 0)]
        js_threads: usize,
        /// The worker's runs in progress at once, waiting ones included (0: 16 per JS
        /// thread; as many as JS threads: each run keeps its thread through its waits).
        #[arg(long, default_value_t = 0)]
        concurrent_runs: usize,
        /// Worker processes sharing the consumer, each with those threads and runs.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=16))]
        workers: u64,
        /// Also forward every event: nowhere (none), to a receiver answering 200 (fast),
        /// or to one that never answers (silent). Functions must not slow down for it.
        #[arg(long, value_enum, default_value = "none")]
        destination: worker::Destination,
        /// Make every Nth event (0: none) a `contact.slow.*` event, which another sync
        /// handles by waiting `slow_ms` on its JS thread (a function that hangs or loops
        /// until its limits stop it, but succeeds): what it costs the other events.
        #[arg(long, default_value_t = 0)]
        slow_every: u64,
        #[arg(long, default_value_t = 1000)]
        slow_ms: u64,
        /// Syncs the slow events go to in turn (each customer's function that hangs is
        /// one).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
        slow_syncs: u64,
        /// The sync's onWebhook fetches each event's contact from a local provider API
        /// (`nango.get`, the connection's API key) before saving it, as a port of a Nango
        /// handler for thin events does.
        #[arg(long)]
        fetch: bool,
        /// With `fetch`: how long the provider API takes to answer each call, in ms (a
        /// real one's 100–300), so that runs wait on it as they would in production.
        #[arg(long, default_value_t = 0, requires = "fetch")]
        provider_latency_ms: u64,
    },
    /// Forwarding throughput to a fast local receiver, deliveries/s.
    Forward {
        /// Events forwarded (one delivery each).
        #[arg(long, default_value_t = 20_000)]
        events: u64,
        /// Address the receiver as `localhost`, a name (looked up before each attempt,
        /// as a customer's URL is), rather than as 127.0.0.1.
        #[arg(long)]
        by_name: bool,
    },
    /// Actions through the API (`POST /action/trigger`, an action that answers at once, or
    /// after one call to a provider): throughput, latency and CPU per action, API and
    /// Postgres.
    Actions {
        #[command(flatten)]
        load: LoadArgs,
        /// The API's action threads (`api.action_threads`).
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Actions in progress at once (`api.action_concurrent_runs`; as many as
        /// `threads`: each run keeps its thread through its waits).
        #[arg(long, default_value_t = hookyard_core::Config::default().api.action_concurrent_runs)]
        concurrent_runs: usize,
        /// The action fetches a contact from a local provider API (`nango.get`, the
        /// connection's API key) before it answers.
        #[arg(long)]
        fetch: bool,
        /// With `fetch`: how long the provider API takes to answer each call, in ms.
        #[arg(long, default_value_t = 0, requires = "fetch")]
        provider_latency_ms: u64,
    },
    /// (Used by `worker`: the measured worker process.)
    #[command(hide = true)]
    WorkerProcess,
}

#[derive(clap::Args, Clone, Copy)]
pub struct LoadArgs {
    /// Concurrent connections, each sending one request at a time.
    #[arg(long, default_value_t = 256)]
    connections: usize,
    /// Seconds of measured load.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Seconds of unmeasured load first.
    #[arg(long, default_value_t = 1)]
    warmup: u64,
    /// Request body size in bytes.
    #[arg(long, default_value_t = 1024)]
    body_bytes: usize,
    /// Request headers: the client's own only, or also those GitHub sends.
    #[arg(long, value_enum, default_value = "minimal")]
    headers: load::Headers,
}

impl LoadArgs {
    fn plan(&self) -> load::Plan {
        load::Plan {
            connections: self.connections,
            duration: Duration::from_secs(self.duration),
            warmup: Duration::from_secs(self.warmup),
            body_bytes: self.body_bytes,
            headers: self.headers,
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        match cli.command {
            Command::Ingest { url, load } => {
                let report = load::run(&url, &load.plan()).await?;
                report.print(&url);
                Ok(())
            }
            Command::IngestCompare {
                load,
                rounds,
                duplicate_window,
            } => ingest_compare::run(&load.plan(), rounds, duplicate_window).await,
            Command::DevMemory { hookyard, rounds, load } => {
                let hookyard = match hookyard {
                    Some(path) => path,
                    None => std::env::current_exe()?.with_file_name("hookyard"),
                };
                dev_memory::run(&hookyard, &load.plan(), rounds).await
            }
            Command::PublishModes { seconds, in_flight } => publish_modes::run(seconds, in_flight).await,
            Command::PullBatches { batch, messages } => pull_batches::run(&batch, messages).await,
            Command::Records { batch, records } => records::run(&batch, records).await,
            Command::Reconciler { connections, ticks } => reconciler::run(&connections, ticks).await,
            Command::Router { batch, events, store } => router::run(&batch, events, store).await,
            Command::Replay {
                batch,
                webhooks,
                rounds,
            } => replay::run(&batch, webhooks, rounds).await,
            Command::Worker {
                events,
                connections,
                latency_seconds,
                rate,
                js_threads,
                concurrent_runs,
                workers,
                destination,
                slow_every,
                slow_ms,
                slow_syncs,
                fetch,
                provider_latency_ms,
            } => {
                worker::run(&worker::Plan {
                    events,
                    connections,
                    latency_seconds,
                    rate,
                    js_threads,
                    concurrent_runs,
                    workers: workers as usize,
                    destination,
                    slow: (slow_every > 0).then_some(worker::Slow {
                        every: slow_every,
                        ms: slow_ms,
                        syncs: slow_syncs,
                    }),
                    fetch,
                    provider_latency: Duration::from_millis(provider_latency_ms),
                })
                .await
            }
            Command::WorkerProcess => worker::run_process().await,
            Command::Forward { events, by_name } => forward::run(events, by_name).await,
            Command::Actions {
                load,
                threads,
                concurrent_runs,
                fetch,
                provider_latency_ms,
            } => {
                let latency = fetch.then(|| Duration::from_millis(provider_latency_ms));
                actions::run(&load.plan(), threads, concurrent_runs, latency).await
            }
        }
    })
}
