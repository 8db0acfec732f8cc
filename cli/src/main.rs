//! The `hookyard` binary: a thin CLI over the stage crates.

mod actions;
mod client;
mod connections;
mod deploy;
mod dev;
mod dev_nats;
mod dlq;
mod dryrun;
mod env;
mod logs;
mod progress;
mod replay;
mod reseal;
mod show_config;
mod streams;
mod when;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use futures::FutureExt as _;
use hookyard_core::{shutdown, telemetry, Config};

// glibc's allocator contends on its arena locks under many concurrent requests; with
// mimalloc the ingest benchmark runs about 60% faster (README, Performance).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "hookyard", version, about = "Webhook processing on NATS JetStream")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run everything in one process on embedded defaults: SQLite under ./.hookyard and
    /// a nats-server of its own (unless HOOKYARD_NATS_URL is set).
    Dev(dev::DevArgs),
    /// Run the ingest service: take webhooks in over HTTP, answer once they are durable.
    Ingest,
    /// Run the router: webhooks in HOOKS_RAW to events per connection in HOOKS_CONN.
    Router,
    /// Run a worker: the deployed functions' onWebhook for each event in HOOKS_CONN, exec
    /// runs from HOOKS_EXEC, and forwarding.
    Worker,
    /// Run the reconciler: syncs' frequencies and API triggers to exec runs in HOOKS_EXEC.
    Reconciler,
    /// Run the control-plane API: integrations, connections, records, function deploys.
    Api,
    /// Run a sync's exec (or onWebhook) from the local functions folder against a real
    /// connection and print the records it would write; `--save` writes them.
    Dryrun(dryrun::DryrunArgs),
    /// Deploy a functions project (default: the current folder) through the API.
    Deploy(deploy::DeployArgs),
    /// Dead letters: list, show, redrive or purge them through the API.
    Dlq(dlq::DlqArgs),
    /// The operation log: what became of each webhook (--follow to keep watching;
    /// an id shows one webhook with its routing, executions and forwards).
    Logs(logs::LogsArgs),
    /// The environment's asynchronous action runs (X-Async): what waits, what runs, how
    /// the others ended.
    Actions(actions::ActionsArgs),
    /// The environment's connections; `--broken`: those to authorize again (the provider
    /// refused their OAuth2 refresh).
    Connections(connections::ConnectionsArgs),
    /// Replay received webhooks (from HOOKS_RAW) through the functions and/or forwarding,
    /// with progress; Ctrl-C cancels. Also: replay list|watch ID|cancel ID.
    Replay(replay::ReplayArgs),
    /// HOOKS_RAW against the store's clock: `streams advance` moves a HOOKS_RAW that is
    /// behind the store (restored from an older backup) past it.
    Streams(streams::StreamsArgs),
    /// Environments (prod, staging, …) on the store: create, list, show or rotate-key.
    /// Prints the webhook URLs and the secret key the API and CLI take.
    Env(env::EnvArgs),
    /// Seal every secret in the store again under HOOKYARD_ENCRYPTION_KEY, opening those
    /// still under a key of HOOKYARD_DECRYPTION_KEYS: the step of changing the key that
    /// moves the data. Safe while the services run.
    Reseal(reseal::ResealArgs),
    /// Check the configuration as a service would load it (hookyard.toml or
    /// HOOKYARD_CONFIG, then HOOKYARD_* variables) and print it as TOML, secrets hidden;
    /// exit status 2 naming each problem.
    Config,
    /// Print a new random encryption key for HOOKYARD_ENCRYPTION_KEY.
    Keygen,
    /// Print the TypeScript declarations of the `nango` module and the sandbox's globals,
    /// for `tsc --noEmit` and editors: `hookyard types > nango.d.ts`.
    Types,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (service, dev_mode) = match &cli.command {
        Command::Dev(_) => ("hookyard-dev", true),
        Command::Ingest => ("hookyard-ingest", false),
        Command::Router => ("hookyard-router", false),
        Command::Worker => ("hookyard-worker", false),
        Command::Reconciler => ("hookyard-reconciler", false),
        Command::Api => ("hookyard-api", false),
        Command::Keygen => {
            println!("{}", hookyard_core::secrets::Cipher::generate_key_text());
            return ExitCode::SUCCESS;
        }
        Command::Types => {
            print!("{}", hookyard_functions::typescript::DECLARATIONS);
            return ExitCode::SUCCESS;
        }
        Command::Dryrun(_) => ("hookyard-dryrun", false),
        Command::Streams(_) => ("hookyard-streams", false),
        Command::Env(_) => ("hookyard-env", false),
        Command::Reseal(_) => ("hookyard-reseal", false),
        Command::Config => ("hookyard-config", false),
        Command::Deploy(_)
        | Command::Dlq(_)
        | Command::Replay(_)
        | Command::Logs(_)
        | Command::Actions(_)
        | Command::Connections(_) => ("hookyard-client", false),
    };
    // Clients of the API: no configuration, no key of their own.
    let (client, command) = match cli.command {
        Command::Deploy(args) => (Some(("deploy", deploy::run(args).boxed())), None),
        Command::Dlq(args) => (Some(("dlq", dlq::run(args).boxed())), None),
        Command::Replay(args) => (Some(("replay", replay::run(args).boxed())), None),
        Command::Logs(args) => (Some(("logs", logs::run(args).boxed())), None),
        Command::Actions(args) => (Some(("actions", actions::run(args).boxed())), None),
        Command::Connections(args) => (Some(("connections", connections::run(args).boxed())), None),
        command => (None, Some(command)),
    };
    if let Some((name, command)) = client {
        let outcome = tokio::runtime::Runtime::new()
            .map_err(|e| e.to_string())
            .and_then(|runtime| runtime.block_on(command));
        return match outcome {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("hookyard {name}: {error}");
                ExitCode::FAILURE
            }
        };
    }
    let command = command.expect("every client command returned above");
    let config = match Config::load() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("hookyard: {error}");
            return ExitCode::from(2);
        }
    };
    // Services refuse to start without the key that seals secrets; say so before anything runs.
    if !dev_mode {
        if let Err(error) = config.cipher() {
            eprintln!("hookyard: {error}");
            return ExitCode::from(2);
        }
    }
    if let Command::Config = command {
        for warning in config.warnings() {
            eprintln!("hookyard config: warning: {warning}");
        }
        // Validated above: the proxies read.
        if let Ok(proxies) = hookyard_core::outbound::Proxies::of(&config.forwarding) {
            for line in proxies.describe() {
                eprintln!("hookyard config: {line}");
            }
        }
        return match show_config::print(&config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("hookyard config: {error}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("hookyard: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let mut telemetry_config = config.telemetry.clone();
        let default_filter = hookyard_core::config::DEFAULT_LOG_FILTER;
        if dev_mode && std::env::var_os("RUST_LOG").is_none() && telemetry_config.log_filter == default_filter {
            // In dev, show each accepted webhook.
            telemetry_config.log_filter = format!("{default_filter},hookyard_ingest=debug");
        }
        let _telemetry = match telemetry::init(&telemetry_config, service) {
            Ok(guard) => guard,
            Err(error) => {
                eprintln!("hookyard: {error}");
                return ExitCode::from(2);
            }
        };
        for warning in config.warnings() {
            tracing::warn!("{warning}");
        }
        let shutdown = shutdown::on_signal();
        let outcome = match command {
            Command::Dev(args) => dev::run(config, args, shutdown).await,
            Command::Ingest => hookyard_ingest::run(&config, shutdown).await,
            Command::Router => hookyard_router::run(&config, shutdown).await,
            Command::Worker => hookyard_worker::run(&config, shutdown).await,
            Command::Reconciler => hookyard_reconciler::run(&config, shutdown).await,
            Command::Api => hookyard_api::run(&config, shutdown).await,
            Command::Dryrun(args) => return said("dryrun", dryrun::run(&config, args).await),
            Command::Streams(args) => return said("streams", streams::run(&config, args).await),
            Command::Env(args) => return said("env", env::run(&config, args).await),
            Command::Reseal(args) => return said("reseal", reseal::run(&config, args).await),
            Command::Keygen
            | Command::Types
            | Command::Config
            | Command::Deploy(_)
            | Command::Dlq(_)
            | Command::Replay(_)
            | Command::Logs(_)
            | Command::Actions(_)
            | Command::Connections(_) => Ok(()), // answered above
        };
        match outcome {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!(%error, "hookyard stopped on an error");
                ExitCode::FAILURE
            }
        }
    })
}

/// A command's outcome, not a service's: its error is a line for the user.
fn said(name: &str, outcome: Result<(), Box<dyn std::error::Error + Send + Sync>>) -> ExitCode {
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("hookyard {name}: {error}");
            ExitCode::FAILURE
        }
    }
}
