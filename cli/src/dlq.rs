//! `hookyard dlq list|show|redrive|purge`: the dead letters, through the API.

use serde_json::{json, Value};

use crate::client::{query, ApiArgs, Client};

#[derive(clap::Args)]
pub struct DlqArgs {
    #[command(subcommand)]
    command: DlqCommand,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(clap::Subcommand)]
enum DlqCommand {
    /// List dead letters, newest first.
    List {
        #[command(flatten)]
        filter: Filter,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Show one dead letter: its message and every attempt's error.
    Show { id: i64 },
    /// Handle the selected letters' messages again, by the consumer that gave up on each.
    Redrive {
        /// Letter ids (none: the filter selects).
        ids: Vec<i64>,
        #[command(flatten)]
        filter: Filter,
        /// Select every letter when no id or filter is given.
        #[arg(long)]
        all: bool,
    },
    /// Delete the selected letters.
    Purge {
        ids: Vec<i64>,
        #[command(flatten)]
        filter: Filter,
        #[arg(long)]
        all: bool,
    },
}

#[derive(clap::Args)]
struct Filter {
    /// function, forward or exec.
    #[arg(long)]
    kind: Option<String>,
    #[arg(long)]
    integration: Option<String>,
    #[arg(long)]
    connection: Option<String>,
    /// A part of the error message.
    #[arg(long)]
    error: Option<String>,
}

impl Filter {
    fn is_empty(&self) -> bool {
        self.kind.is_none() && self.integration.is_none() && self.connection.is_none() && self.error.is_none()
    }

    fn pairs(&self, ids: &[i64], all: bool) -> Vec<(&'static str, Option<String>)> {
        let ids = (!ids.is_empty()).then(|| ids.iter().map(i64::to_string).collect::<Vec<_>>().join(","));
        vec![
            ("ids", ids),
            ("kind", self.kind.clone()),
            ("integration", self.integration.clone()),
            ("connection_id", self.connection.clone()),
            ("error", self.error.clone()),
            ("all", all.then(|| "true".to_string())),
        ]
    }
}

pub async fn run(args: DlqArgs) -> Result<(), String> {
    let client = Client::new(args.api)?;
    match args.command {
        DlqCommand::List { filter, limit } => {
            let mut pairs = filter.pairs(&[], false);
            pairs.push(("limit", Some(limit.to_string())));
            let page = client.get(&format!("/dead-letters{}", query(&pairs))).await?;
            let letters = page["data"].as_array().cloned().unwrap_or_default();
            if letters.is_empty() {
                println!("no dead letters");
                return Ok(());
            }
            println!(
                "{:>6}  {:<8}  {:<20}  {:<16}  {:<20}  {:>3}  {:<12}  ERROR",
                "ID", "KIND", "AT", "CONNECTION", "WHAT", "TRY", "REDRIVE"
            );
            for letter in &letters {
                println!("{}", row(letter));
            }
            if page["next_cursor"].is_i64() {
                println!("(more: raise --limit or narrow the filter)");
            }
        }
        DlqCommand::Show { id } => {
            let letter = client.get(&format!("/dead-letters/{id}")).await?;
            println!(
                "{}",
                serde_json::to_string_pretty(&letter["data"]).expect("JSON prints")
            );
        }
        DlqCommand::Redrive { ids, filter, all } => {
            let mut body = serde_json::Map::new();
            for (name, value) in filter.pairs(&ids, all) {
                if let Some(value) = value {
                    body.insert(name.into(), json!(value));
                }
            }
            if all {
                body.insert("all".into(), json!(true));
            }
            let answer = client
                .call(
                    reqwest::Method::POST,
                    "/dead-letters/redrive",
                    Some(&Value::Object(body)),
                )
                .await?;
            let taken: Vec<i64> = answer["data"]["redriving"]
                .as_array()
                .map(|ids| ids.iter().filter_map(Value::as_i64).collect())
                .unwrap_or_default();
            if taken.is_empty() {
                println!("no letter to redrive");
            } else {
                println!("{} letter(s) to redrive: {}", taken.len(), joined(&taken));
                println!("the routers publish them within seconds; `hookyard dlq show ID` tells how it went");
            }
            // Ids asked for by themselves (a filter narrows on purpose) and not taken.
            let left: Vec<i64> = ids.into_iter().filter(|id| !taken.contains(id)).collect();
            if !left.is_empty() && filter.is_empty() {
                return Err(format!(
                    "not redriven: {} (no such letter, or an exec run or a message that was no event: those are not redriven)",
                    joined(&left)
                ));
            }
        }
        DlqCommand::Purge { ids, filter, all } => {
            let path = format!("/dead-letters{}", query(&filter.pairs(&ids, all)));
            let answer = client.call(reqwest::Method::DELETE, &path, None).await?;
            let deleted = answer["data"]["deleted"].as_u64().unwrap_or(0);
            println!("{deleted} letter(s) deleted");
            if !ids.is_empty() && deleted < ids.len() as u64 && filter.is_empty() {
                return Err(format!(
                    "{} of the letters {} did not exist",
                    ids.len() as u64 - deleted,
                    joined(&ids)
                ));
            }
        }
    }
    Ok(())
}

fn joined(ids: &[i64]) -> String {
    ids.iter().map(i64::to_string).collect::<Vec<_>>().join(" ")
}

/// One line of `dlq list`.
fn row(letter: &Value) -> String {
    let text = |key: &str| letter[key].as_str().unwrap_or("-").to_string();
    let what = match letter["function_name"].as_str() {
        Some(name) => format!("{}/{name}", text("integration")),
        None => text("subject"),
    };
    let redrive = if letter["redrive_requested_at"].is_string() {
        "requested".to_string()
    } else if let Some(error) = letter["redrive_error"].as_str() {
        format!("failed: {error}")
    } else if letter["redrives"].as_i64().unwrap_or(0) > 0 {
        format!("done ×{}", letter["redrives"])
    } else {
        "-".into()
    };
    format!(
        "{:>6}  {:<8}  {:<20}  {:<16}  {:<20}  {:>3}  {:<12}  {}",
        letter["id"],
        text("kind"),
        text("created_at").chars().take(19).collect::<String>(),
        clip(&text("connection_id"), 16),
        clip(&what, 20),
        letter["attempts"],
        clip(&redrive, 12),
        clip(&format!("{}: {}", text("error_kind"), text("error")), 80)
    )
}

fn clip(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        text.to_string()
    } else {
        let mut out: String = text.chars().take(width - 1).collect();
        out.push('…');
        out
    }
}
