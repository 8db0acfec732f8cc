//! `hookyard env create NAME | list | show NAME | rotate-key NAME`: environments, on the
//! store directly. The API takes an environment's secret key, so the first one of a
//! deployment cannot come from it (`hookyard dev` makes its own `dev`).

use hookyard_core::keys::EnvironmentName;
use hookyard_core::store::Environment;
use hookyard_core::{Config, Store};

type Error = Box<dyn std::error::Error + Send + Sync>;

#[derive(clap::Args)]
pub struct EnvArgs {
    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Subcommand)]
enum Action {
    /// Create an environment (prod, staging, …) and print its webhook URLs and secret key.
    Create { name: EnvironmentName },
    /// List the environments: names and webhook ids, no keys.
    List,
    /// Print an environment's webhook URLs and secret key.
    Show { name: EnvironmentName },
    /// Give an environment a new secret key. The old one stops working at once, and
    /// forwards without a signing key of their own are signed with the new one.
    RotateKey { name: EnvironmentName },
}

pub async fn run(config: &Config, args: EnvArgs) -> Result<(), Error> {
    let store = Store::connect_with(&config.database_url, config.cipher()?, config.database_max_connections).await?;
    match args.action {
        Action::Create { name } => print(config, &store.create_environment(&name).await?),
        Action::List => {
            let environments = store.environments().await?;
            if environments.is_empty() {
                println!("no environments: `hookyard env create prod` makes one");
            }
            for environment in environments {
                println!(
                    "{:<16}  {}  created {}",
                    environment.name.to_string(),
                    environment.webhook_id,
                    environment.created_at.format("%Y-%m-%d %H:%M:%S UTC")
                );
            }
        }
        Action::Show { name } => {
            let environment = store
                .environment(&name)
                .await?
                .ok_or_else(|| format!("environment {name} does not exist"))?;
            print(config, &environment);
        }
        Action::RotateKey { name } => print(config, &store.rotate_secret_key(&name).await?),
    }
    Ok(())
}

fn print(config: &Config, environment: &Environment) {
    println!("environment   {}", environment.name);
    let urls = environment.webhook_url(&config.webhook_base_url(), "{integration}");
    println!("webhook URLs  {urls}");
    println!("secret key    {}", environment.secret_key);
}
