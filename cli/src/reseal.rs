//! `hookyard reseal [--dry-run]`: seals every secret in the store again under
//! `HOOKYARD_ENCRYPTION_KEY`, opening those still under a key of
//! `HOOKYARD_DECRYPTION_KEYS`: the step of changing the key that moves the data
//! (deploy/README.md, "Changing the encryption key").

use hookyard_core::{Config, Store};

type Error = Box<dyn std::error::Error + Send + Sync>;

#[derive(clap::Args)]
pub struct ResealArgs {
    /// Count what would be sealed again, and check that every secret opens; write nothing.
    #[arg(long)]
    dry_run: bool,
}

pub async fn run(config: &Config, args: ResealArgs) -> Result<(), Error> {
    let store = Store::connect_with(&config.database_url, config.cipher()?, config.database_max_connections).await?;
    let (bar, _) = crate::progress::bar("{wide_bar} {pos}/{len} {msg}");
    let report = store
        .reseal(args.dry_run, |column| {
            if bar.message() != column.column {
                bar.set_message(column.column.clone());
                bar.set_length(column.total);
            }
            bar.set_position(column.resealed + column.current + column.changed + column.unreadable);
        })
        .await?;
    bar.finish_and_clear();
    let verb = if args.dry_run { "to seal again" } else { "sealed again" };
    let mut unreadable = 0;
    for column in &report {
        println!(
            "{:<34} {:>8} {verb}, {:>8} under the current key{}{}",
            column.column,
            column.resealed,
            column.current,
            said(column.changed, "changed meanwhile (left as written)"),
            said(column.unreadable, "that no key opens"),
        );
        unreadable += column.unreadable;
        if !column.unreadable_ids.is_empty() {
            let ids: Vec<String> = column.unreadable_ids.iter().take(20).map(i64::to_string).collect();
            let more = if column.unreadable_ids.len() > 20 { ", …" } else { "" };
            println!("{:<34} no key opens the rows with id {}{more}", "", ids.join(", "));
        }
    }
    if unreadable > 0 {
        return Err(format!(
            "{unreadable} secret(s) open with neither HOOKYARD_ENCRYPTION_KEY nor HOOKYARD_DECRYPTION_KEYS: \
             add the key they were sealed under to HOOKYARD_DECRYPTION_KEYS and run this again"
        )
        .into());
    }
    if !args.dry_run {
        println!("every secret is under the current key: restart the services without HOOKYARD_DECRYPTION_KEYS");
    }
    Ok(())
}

/// `, N what` for a count that is not zero.
fn said(count: u64, what: &str) -> String {
    if count == 0 {
        String::new()
    } else {
        format!(", {count} {what}")
    }
}
