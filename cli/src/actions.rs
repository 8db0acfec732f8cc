//! `hookyard actions [filters]`: the environment's asynchronous action runs
//! (`GET /action/runs`), one line each, newest last: what waits, what runs, how the
//! others ended.

use serde_json::Value;

use crate::client::{query, ApiArgs, Client};

#[derive(clap::Args)]
pub struct ActionsArgs {
    /// waiting (queued, or waiting to be retried), running, succeeded or failed.
    #[arg(long)]
    status: Option<String>,
    /// This action's runs.
    #[arg(long)]
    action: Option<String>,
    #[arg(long)]
    integration: Option<String>,
    #[arg(long)]
    connection: Option<String>,
    /// How many of the latest to show.
    #[arg(long, default_value_t = 20)]
    limit: u32,
    #[command(flatten)]
    api: ApiArgs,
}

pub async fn run(args: ActionsArgs) -> Result<(), String> {
    let client = Client::new(args.api.clone())?;
    let filters = query(&[
        ("status", args.status),
        ("action", args.action),
        ("integration", args.integration),
        ("connection", args.connection),
        ("limit", Some(args.limit.to_string())),
    ]);
    let page = client.get(&format!("/action/runs{filters}")).await?;
    let mut runs: Vec<Value> = page["data"].as_array().cloned().unwrap_or_default();
    if runs.is_empty() {
        println!("no asynchronous action runs");
    }
    runs.reverse();
    for run in &runs {
        println!("{}", line(run));
    }
    if page["next_cursor"].is_string() {
        eprintln!("(older runs not shown: --limit for more)");
    }
    Ok(())
}

/// One run on one line: when it was queued, what, its state and what comes next (or how
/// it ended).
fn line(run: &Value) -> String {
    let text = |key: &str| run[key].as_str().unwrap_or("-").to_string();
    let time = |key: &str| text(key).chars().take(23).collect::<String>();
    let attempts = format!(
        "attempt {} of {}",
        run["attempts"].as_u64().unwrap_or(0),
        run["max_retries"].as_u64().unwrap_or(0) + 1
    );
    let state = match text("status").as_str() {
        "waiting" => format!("next at {}", time("run_after")),
        "running" => format!("lease until {}", time("run_after")),
        _ => format!("ended {}", time("finished_at")),
    };
    let why = crate::logs::failure(&run["error"]);
    let mut line = format!(
        "{}  {}  {}/{}  {}  {:<9}  {}  {}  {}",
        time("created_at"),
        text("id"),
        text("integration"),
        text("action_name"),
        text("connection_id"),
        text("status"),
        attempts,
        state,
        why,
    );
    line.truncate(line.trim_end().len());
    line
}
