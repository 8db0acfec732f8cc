//! `hookyard logs [ID] [--follow] [filters]`: the operation log, one line per webhook
//! (newest last), or one webhook with everything that followed it; with `--actions`,
//! one line per action run, the function's log lines under it.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;

use async_nats::jetstream::stream::RawMessageErrorKind;
use hookyard_core::streams::{raw_subject, Bus, RAW_STREAM};
use hookyard_core::Config;

use crate::client::{query, ApiArgs, Client};
use crate::when::{rfc3339, when};

#[derive(clap::Args)]
pub struct LogsArgs {
    /// Show this webhook (its log id) with its routing, executions and forwards.
    id: Option<i64>,
    /// Write that webhook's body, byte for byte as received, to stdout: read from
    /// `HOOKS_RAW` through NATS (`nats_url`, as the services take it).
    #[arg(long, requires = "id")]
    body: bool,
    /// Keep printing webhooks (or action runs) as they arrive.
    #[arg(long, short)]
    follow: bool,
    /// Action runs instead of webhooks: POST /action/trigger, asynchronous runs' attempts,
    /// nango.triggerAction.
    #[arg(long, conflicts_with = "id")]
    actions: bool,
    /// With --actions: this action's runs.
    #[arg(long, requires = "actions")]
    action: Option<String>,
    #[arg(long)]
    integration: Option<String>,
    /// Webhooks routed to this connection (action runs for it).
    #[arg(long)]
    connection: Option<String>,
    /// accepted, duplicate, handshake, rejected, unavailable, or failed (action runs:
    /// succeeded or failed).
    #[arg(long)]
    status: Option<String>,
    /// Received at or after this: RFC 3339 (2026-11-27T10:00:00Z) or a time ago (2h, 30m).
    #[arg(long, value_parser = when)]
    since: Option<DateTime<Utc>>,
    /// Received before this. Same forms as --since.
    #[arg(long, value_parser = when)]
    until: Option<DateTime<Utc>>,
    /// How many of the latest to show first.
    #[arg(long, default_value_t = 20)]
    limit: u32,
    #[command(flatten)]
    api: ApiArgs,
}

pub async fn run(args: LogsArgs) -> Result<(), String> {
    let client = Client::new(args.api.clone())?;
    if let Some(id) = args.id {
        let shown = client.get(&format!("/logs/{id}")).await?;
        match args.body {
            true => write_body(&shown["data"]).await?,
            false => print_one(&shown["data"]),
        }
        return Ok(());
    }
    let (path, line, none): (_, fn(&Value) -> String, _) = match args.actions {
        true => ("/logs/actions", action_line, "no action runs logged"),
        false => ("/logs", line, "no webhooks logged"),
    };
    let filters = |extra: Vec<(&'static str, Option<String>)>| {
        let mut pairs = vec![
            ("integration", args.integration.clone()),
            ("connection", args.connection.clone()),
            ("action", args.action.clone()),
            ("status", args.status.clone()),
            ("since", args.since.map(rfc3339)),
            ("until", args.until.map(rfc3339)),
        ];
        pairs.extend(extra);
        query(&pairs)
    };
    let page = client
        .get(&format!(
            "{path}{}",
            filters(vec![("limit", Some(args.limit.to_string()))])
        ))
        .await?;
    let mut latest: Vec<Value> = page["data"].as_array().cloned().unwrap_or_default();
    latest.reverse();
    if latest.is_empty() && !args.follow {
        println!("{none}");
    }
    let mut last = 0;
    for entry in &latest {
        println!("{}", line(entry));
        last = last.max(entry["id"].as_i64().unwrap_or(0));
    }
    if !args.follow {
        return Ok(());
    }
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let next = format!(
            "{path}{}",
            filters(vec![("after", Some(last.to_string())), ("limit", Some("500".into()))])
        );
        let answer = client.get_waiting(&next, &|notice| eprintln!("{notice}")).await?;
        for entry in answer["data"].as_array().into_iter().flatten() {
            println!("{}", line(entry));
            last = last.max(entry["id"].as_i64().unwrap_or(0));
        }
    }
}

/// One webhook on one line.
fn line(entry: &Value) -> String {
    let text = |key: &str| entry[key].as_str().unwrap_or("-").to_string();
    format!(
        "{:>7}  {}  {:<16}  {:<11}  {:>7}  {}  {}",
        entry["id"],
        text("received_at").chars().take(23).collect::<String>(),
        text("integration"),
        text("status"),
        entry["bytes"].as_i64().map_or("-".into(), |b| format!("{b}B")),
        entry["raw_seq"].as_i64().map_or("-".into(), |s| format!("seq {s}")),
        text("detail"),
    )
}

/// One action run on one line, the function's log lines under it.
fn action_line(entry: &Value) -> String {
    let text = |key: &str| entry[key].as_str().unwrap_or("-").to_string();
    let origin = match (entry["run_id"].as_str(), entry["attempt"].as_i64()) {
        (Some(run), Some(attempt)) => format!("async {run} attempt {attempt}"),
        _ => text("origin"),
    };
    let outcome = failure(&entry["error"]);
    let mut line = format!(
        "{:>7}  {}  {}/{}  {}  {:<9}  {:>7}  {}  {}",
        entry["id"],
        text("started_at").chars().take(23).collect::<String>(),
        text("integration"),
        text("action_name"),
        text("connection_id"),
        text("status"),
        entry["duration_ms"]
            .as_f64()
            .map_or("-".into(), |ms| format!("{ms:.0}ms")),
        origin,
        outcome,
    );
    line.truncate(line.trim_end().len());
    for log in entry["logs"].as_array().into_iter().flatten() {
        line.push_str(&format!(
            "\n           [{}] {}",
            log["level"].as_str().unwrap_or("info"),
            log["message"].as_str().unwrap_or_default()
        ));
    }
    line
}

/// An action's failure as `code: message` (empty when it did not fail).
pub fn failure(error: &Value) -> String {
    match error["code"].as_str() {
        Some(code) => format!("{code}: {}", error["message"].as_str().unwrap_or_default()),
        None => String::new(),
    }
}

fn joined(values: &[Value]) -> String {
    values.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", ")
}

fn print_one(webhook: &Value) {
    println!("{}", line(webhook));
    println!("  delivery {}", webhook["delivery_id"].as_str().unwrap_or("-"));
    let steps = webhook["steps"].as_array().cloned().unwrap_or_default();
    if steps.is_empty() && webhook["status"] == "accepted" {
        println!("  (not routed yet)");
    }
    for step in &steps {
        let detail = &step["detail"];
        let what = match step["stage"].as_str() {
            Some("route") => {
                let mut text = match detail["connections"].as_array().filter(|c| !c.is_empty()) {
                    Some(connections) => format!("to {}", joined(connections)),
                    None => format!("nowhere: {}", detail["unrouted"]),
                };
                if let Some(types) = detail["types"].as_array().filter(|t| !t.is_empty()) {
                    text += &format!(" (event {})", joined(types));
                }
                text
            }
            Some("execution") => {
                let mut text = format!(
                    "{} v{} attempt {} in {:.1} ms",
                    detail["sync"].as_str().unwrap_or("?"),
                    detail["version"],
                    detail["attempt"],
                    detail["duration_ms"].as_f64().unwrap_or(0.0)
                );
                if let Some(records) = detail["records"].as_object() {
                    text += &format!(
                        ", records +{} ~{} -{}",
                        records["added"], records["updated"], records["deleted"]
                    );
                }
                if let Some(error) = detail["error"].as_str() {
                    text += &format!(": {error}");
                }
                if let Some(origin) = detail["origin"].as_str() {
                    text += &format!(" ({origin})");
                }
                text
            }
            Some("forward") => format!(
                "{} attempt {} → {} in {:.0} ms{}",
                detail["url"].as_str().unwrap_or("?"),
                detail["attempt"],
                detail["status_code"],
                detail["latency_ms"].as_f64().unwrap_or(0.0),
                detail["error"].as_str().map(|e| format!(": {e}")).unwrap_or_default()
            ),
            _ => detail.to_string(),
        };
        println!(
            "  {}  {:<9} {:<14} {:<10} {}",
            step["at"].as_str().unwrap_or("").chars().take(23).collect::<String>(),
            step["stage"].as_str().unwrap_or("?"),
            step["connection_id"].as_str().unwrap_or(""),
            step["status"].as_str().unwrap_or("?"),
            what
        );
        if step["stage"] == "execution" {
            for log in detail["logs"].as_array().into_iter().flatten() {
                println!(
                    "      {} {}",
                    log["level"].as_str().unwrap_or("info"),
                    log["message"].as_str().unwrap_or("")
                );
            }
        }
    }
}

/// Writes the body of the webhook `entry` (an operation log entry) as `HOOKS_RAW` holds
/// it. A webhook that was not stored (rejected, a handshake) has none; one older than
/// the stream keeps is gone.
async fn write_body(entry: &Value) -> Result<(), String> {
    use std::io::Write;
    let id = &entry["id"];
    let Some(seq) = entry["raw_seq"].as_u64() else {
        let status = entry["status"].as_str().unwrap_or("not stored");
        return Err(format!(
            "webhook {id} was not stored ({status}): it has no body in {RAW_STREAM}"
        ));
    };
    let subject = match (entry["environment"].as_str(), entry["integration"].as_str()) {
        (Some(environment), Some(integration)) => raw_subject(
            &environment.parse().map_err(|e| format!("{e}"))?,
            &integration.parse().map_err(|e| format!("{e}"))?,
        ),
        _ => {
            return Err(format!(
                "webhook {id}: the API's entry names no environment and integration"
            ))
        }
    };
    let config = Config::load().map_err(|e| e.to_string())?;
    let bus = Bus::connect(&config, "hookyard-logs")
        .await
        .map_err(|e| e.to_string())?;
    let stream = bus
        .jetstream
        .get_stream(RAW_STREAM)
        .await
        .map_err(|e| format!("{RAW_STREAM}: {e}"))?;
    let message = stream.get_raw_message(seq).await.map_err(|e| match e.kind() {
        RawMessageErrorKind::NoMessageFound => {
            format!("{RAW_STREAM} no longer holds #{seq}, webhook {id}'s (it keeps webhooks for streams.raw_max_age)")
        }
        _ => format!("{RAW_STREAM} #{seq}: {e}"),
    })?;
    if message.subject.as_str() != subject {
        return Err(format!(
            "{RAW_STREAM} #{seq} is a webhook of {}, not webhook {id} of {subject} (was the stream moved past the store?)",
            message.subject
        ));
    }
    let mut out = std::io::stdout().lock();
    out.write_all(&message.payload)
        .and_then(|()| out.flush())
        .map_err(|e| format!("writing the body: {e}"))
}
