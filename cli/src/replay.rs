//! `hookyard replay`: asks the API for a replay of received webhooks and follows it with
//! a progress bar (webhooks read of the window, events published, rate, time left);
//! Ctrl-C cancels it. `list`, `watch ID` and `cancel ID` work on replays already asked for.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use crate::client::{ApiArgs, Client};
use crate::when::when;

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ReplayArgs {
    #[command(subcommand)]
    command: Option<ReplayCommand>,
    #[command(flatten)]
    start: StartArgs,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(clap::Subcommand)]
enum ReplayCommand {
    /// The environment's replays, newest first.
    List,
    /// Follow a replay until it ends.
    Watch { id: i64 },
    /// Stop a replay.
    Cancel { id: i64 },
}

#[derive(clap::Args)]
struct StartArgs {
    /// Webhooks received at or after this: RFC 3339 (2026-11-27T10:00:00Z) or a time ago (2h, 30m).
    #[arg(long, value_parser = when)]
    since: Option<DateTime<Utc>>,
    /// … and before this (default: now). Same forms as --since.
    #[arg(long, value_parser = when)]
    until: Option<DateTime<Utc>>,
    /// One integration's webhooks only.
    #[arg(long)]
    integration: Option<String>,
    /// Only the events that route to this connection (needs --integration).
    #[arg(long)]
    connection: Option<String>,
    /// Which consumers get the replayed events: functions, forward or all.
    #[arg(long, default_value = "all", value_parser = ["functions", "forward", "all"])]
    target: String,
    /// Count what would be replayed; publish nothing.
    #[arg(long)]
    dry_run: bool,
    /// At most this many events per second (500 or 500/s).
    #[arg(long, value_parser = rate)]
    rate: Option<u32>,
    /// Ask for the replay and return, without following it.
    #[arg(long)]
    detach: bool,
}

/// `--rate`: events per second, `500` or `500/s`.
fn rate(text: &str) -> Result<u32, String> {
    let number = text.trim_end_matches("/s");
    match number.parse::<u32>() {
        Ok(rate) if rate > 0 => Ok(rate),
        _ => Err(format!("{text:?} is not a rate such as 500/s")),
    }
}

pub async fn run(args: ReplayArgs) -> Result<(), String> {
    let client = Client::new(args.api)?;
    match args.command {
        Some(ReplayCommand::List) => {
            let replays = client.get("/replay").await?;
            let replays = replays["data"].as_array().cloned().unwrap_or_default();
            if replays.is_empty() {
                println!("no replays");
            }
            for replay in &replays {
                println!("{}", summary(replay));
            }
            Ok(())
        }
        Some(ReplayCommand::Watch { id }) => follow(&client, id).await,
        Some(ReplayCommand::Cancel { id }) => {
            let replay = client
                .call(reqwest::Method::POST, &format!("/replay/{id}/cancel"), None)
                .await?;
            println!("{}", summary(&replay["data"]));
            Ok(())
        }
        None => {
            let start = args.start;
            let Some(since) = start.since else {
                return Err("--since is required to start a replay (or: list, watch ID, cancel ID)".into());
            };
            let body = json!({
                "since": since,
                "until": start.until,
                "integration": start.integration,
                "connection_id": start.connection,
                "target": start.target,
                "dry_run": start.dry_run,
                "rate": start.rate,
            });
            let replay = client.call(reqwest::Method::POST, "/replay", Some(&body)).await?;
            let id = replay["data"]["id"]
                .as_i64()
                .ok_or("the API answered without a replay id")?;
            eprintln!("replay {id} queued");
            if start.detach {
                println!("{}", summary(&replay["data"]));
                return Ok(());
            }
            follow(&client, id).await
        }
    }
}

/// Shows the replay's progress until it ends; Ctrl-C asks for a cancel and goes on
/// showing until the router has stopped it.
async fn follow(client: &Client, id: i64) -> Result<(), String> {
    let (bar, terminal) = crate::progress::bar(
        "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} webhooks · {per_sec} · ETA {eta} · {msg}",
    );
    let say = |notice: &str| {
        if terminal {
            bar.println(notice)
        } else {
            eprintln!("{notice}")
        }
    };
    let mut last_line = Instant::now();
    // Ctrl-C asks for a cancel once; after it, the signal is not listened to again.
    let mut interrupt_seen = false;
    let mut cancel_sent = false;
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    let replay = loop {
        let path = format!("/replay/{id}");
        let asked = client.get_waiting(&path, &say);
        tokio::pin!(asked);
        let answer = tokio::select! {
            answer = &mut asked => answer,
            _ = &mut interrupted, if !interrupt_seen => {
                interrupt_seen = true;
                // The cancel goes out once this answer is in; an API that is away (the
                // answer does not come) is not waited for: the cancel needs it.
                match tokio::time::timeout(Duration::from_secs(2), &mut asked).await {
                    Ok(answer) => answer,
                    Err(_) => return Err(format!(
                        "stopped following replay {id}, which goes on: `hookyard replay cancel {id}` stops it once the API answers"
                    )),
                }
            }
        };
        let replay = answer?["data"].clone();
        if let Some(total) = replay["total"].as_u64() {
            bar.set_length(total);
        }
        bar.set_position(replay["read"].as_u64().unwrap_or(0));
        bar.set_message(format!(
            "{}{} events {}",
            if replay["waiting"] == true {
                "waiting for the workers · "
            } else {
                ""
            },
            replay["published"],
            if replay["dry_run"] == true {
                "would be published"
            } else {
                "published"
            }
        ));
        if !terminal && last_line.elapsed() >= Duration::from_secs(2) {
            eprintln!("{}", summary(&replay));
            last_line = Instant::now();
        }
        if ["done", "cancelled", "failed"].contains(&replay["status"].as_str().unwrap_or("")) {
            break replay;
        }
        if !interrupt_seen {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
                _ = &mut interrupted => interrupt_seen = true,
            }
        }
        if !cancel_sent {
            cancel_sent = true;
            say("cancelling…");
            client
                .call(reqwest::Method::POST, &format!("/replay/{id}/cancel"), None)
                .await?;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    bar.finish_and_clear();
    println!("{}", summary(&replay));
    match replay["status"].as_str() {
        Some("done") => Ok(()),
        Some("cancelled") => Err(format!("replay {id} was cancelled")),
        _ => Err(format!(
            "replay {id} failed: {}",
            replay["error"].as_str().unwrap_or("no reason given")
        )),
    }
}

/// One line about a replay.
fn summary(replay: &Value) -> String {
    let scope = match (replay["integration"].as_str(), replay["connection_id"].as_str()) {
        (Some(integration), Some(connection)) => format!("{integration}/{connection}"),
        (Some(integration), None) => integration.to_string(),
        _ => "every integration".to_string(),
    };
    format!(
        "replay {} {}{}{}: {} → {} of {}, target {}: read {} of {} webhooks, {} events {}, {} skipped{}",
        replay["id"],
        replay["status"].as_str().unwrap_or("?"),
        if replay["waiting"] == true {
            " (waiting for the workers)"
        } else {
            ""
        },
        if replay["dry_run"] == true { " (dry run)" } else { "" },
        replay["since"].as_str().unwrap_or("?"),
        replay["until"].as_str().unwrap_or("?"),
        scope,
        replay["target"].as_str().unwrap_or("?"),
        replay["read"],
        replay["total"].as_i64().map_or("?".to_string(), |t| t.to_string()),
        replay["published"],
        if replay["dry_run"] == true {
            "would be published"
        } else {
            "published"
        },
        replay["skipped"],
        replay["error"].as_str().map(|e| format!(" ({e})")).unwrap_or_default(),
    )
}
