//! `hookyard streams advance [--yes]`: moves a `HOOKS_RAW` that is behind the store (a
//! NATS server restored from an older backup, the stream created again by hand) past
//! the store's clock, which the services refuse to start without. Without `--yes` it
//! only says what it would do.

use hookyard_core::streams::{Bus, RAW_STREAM};
use hookyard_core::{Config, Store};

#[derive(clap::Args)]
pub struct StreamsArgs {
    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Subcommand)]
enum Action {
    /// Purge HOOKS_RAW up to one past the highest sequence the store has seen, when it
    /// is behind it: the services refuse to start until then. Deletes the messages it
    /// holds; without --yes, only says what it would do.
    Advance {
        /// Purge (otherwise only print what would be purged).
        #[arg(long)]
        yes: bool,
    },
}

pub async fn run(config: &Config, args: StreamsArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let Action::Advance { yes } = args.action;
    let store = Store::connect_with(&config.database_url, config.cipher()?, config.database_max_connections).await?;
    let bus = Bus::connect(config, "hookyard-streams").await?;
    let Some(standing) = bus.raw_standing(&store).await? else {
        println!(
            "{RAW_STREAM} does not exist: the next service to start creates it to begin at sequence {}.",
            store.raw_sequence_seen().await? + 1
        );
        return Ok(());
    };
    let (last, seen, next) = (standing.last, standing.seen, standing.seen + 1);
    if !standing.behind() {
        println!("{RAW_STREAM} ends at sequence {last}; the store has seen sequences up to {seen}: nothing to do.");
        return Ok(());
    }
    if !yes {
        println!(
            "{RAW_STREAM} ends at sequence {last}, behind the store, which has seen sequences up to {seen}. \
             With --yes its {} messages are purged and its next message gets sequence {next}.",
            standing.messages
        );
        return Ok(());
    }
    let purged = bus.advance_raw_stream(&standing).await?;
    println!("purged {purged} messages from {RAW_STREAM}: its next message gets sequence {next}.");
    Ok(())
}
