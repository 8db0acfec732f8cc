//! `hookyard connections [--integration K] [--search S] [--broken]`: the environment's
//! connections (`GET /connections`, every page), one line each, oldest first; one whose
//! OAuth2 refresh the provider refused says so, and `--broken` shows only those: the
//! connections to authorize again. One whose provider's rate limit holds its calls
//! says until when.

use serde_json::Value;

use crate::client::{query, ApiArgs, Client};

/// Connections asked for per request (the API's most).
const PAGE: &str = "1000";

#[derive(clap::Args)]
pub struct ConnectionsArgs {
    #[arg(long)]
    integration: Option<String>,
    /// A part of the connection id (any case).
    #[arg(long)]
    search: Option<String>,
    /// Only connections that need new credentials (the provider refused their refresh).
    #[arg(long)]
    broken: bool,
    #[command(flatten)]
    api: ApiArgs,
}

pub async fn run(args: ConnectionsArgs) -> Result<(), String> {
    let client = Client::new(args.api.clone())?;
    let (mut page, mut shown) = (0, 0);
    loop {
        let filters = query(&[
            ("integrationId", args.integration.clone()),
            ("search", args.search.clone()),
            ("limit", Some(PAGE.into())),
            ("page", Some(page.to_string())),
        ]);
        let answer = client.get(&format!("/connections{filters}")).await?;
        for connection in answer["connections"].as_array().into_iter().flatten() {
            let broken = connection["errors"].as_array().is_some_and(|errors| !errors.is_empty());
            if broken || !args.broken {
                println!("{}", line(connection));
                shown += 1;
            }
        }
        match answer["next_page"].as_u64() {
            Some(next) => page = next,
            None => break,
        }
    }
    if shown == 0 {
        println!(
            "{}",
            if args.broken {
                "no connection needs authorizing again"
            } else {
                "no connections"
            }
        );
    }
    Ok(())
}

/// One connection on one line: when it was made, which, its provider and what stops or
/// holds it.
fn line(connection: &Value) -> String {
    let text = |value: &Value| value.as_str().unwrap_or("-").to_string();
    let time = |value: &Value| text(value).chars().take(23).collect::<String>();
    let mut line = format!(
        "{}  {}/{}  {}",
        time(&connection["created_at"]),
        text(&connection["provider_config_key"]),
        text(&connection["connection_id"]),
        text(&connection["provider"]),
    );
    if connection["rate_limited_until"].is_string() {
        line.push_str(&format!(
            "  rate limited until {}",
            time(&connection["rate_limited_until"])
        ));
    }
    for error in connection["errors"].as_array().into_iter().flatten() {
        line.push_str(&format!(
            "  {} refused since {}, authorize again: {}",
            text(&error["type"]),
            time(&error["failed_at"]),
            text(&error["description"]),
        ));
    }
    line
}
