//! `hookyard config`: the configuration a service started here would run with, after
//! every layer and the same checks, printed as TOML with its secrets hidden. A way to
//! see what a container's file and variables add up to before a service starts on them.

use hookyard_core::config::EncryptionKey;
use hookyard_core::Config;

/// What a secret is shown as: it is set, and that is all.
const HIDDEN: &str = "(hidden)";

pub fn print(config: &Config) -> Result<(), String> {
    let mut shown = config.clone();
    let hide = |key: Option<EncryptionKey>| key.map(|_| EncryptionKey(HIDDEN.into()));
    shown.encryption_key = hide(shown.encryption_key);
    shown.decryption_keys = hide(shown.decryption_keys);
    shown.database_url = without_password(&shown.database_url);
    shown.nats_url = config.nats_url_shown();
    let text = toml::to_string(&shown).map_err(|e| format!("cannot print the configuration: {e}"))?;
    print!("{text}");
    Ok(())
}

/// `postgres://user:secret@host/db` as `postgres://user:(hidden)@host/db`.
fn without_password(database_url: &str) -> String {
    match url::Url::parse(database_url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some(HIDDEN));
            parsed.to_string()
        }
        _ => database_url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_password_is_hidden_and_the_rest_kept() {
        assert_eq!(
            without_password("postgres://hookyard:s3cret@db:5432/hookyard?sslmode=require"),
            "postgres://hookyard:(hidden)@db:5432/hookyard?sslmode=require"
        );
        assert_eq!(without_password("postgres://db/hookyard"), "postgres://db/hookyard");
        assert_eq!(
            without_password("sqlite://.hookyard/hookyard.db"),
            "sqlite://.hookyard/hookyard.db"
        );
    }
}
