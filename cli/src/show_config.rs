//! `hookyard config`: the configuration a service started here would run with, after
//! every layer and the same checks, printed as TOML with its secrets hidden. A way to
//! see what a container's file and variables add up to before a service starts on them.

use hookyard_core::config::{without_password, EncryptionKey, HIDDEN};
use hookyard_core::Config;

pub fn print(config: &Config) -> Result<(), String> {
    let mut shown = config.clone();
    let hide = |key: Option<EncryptionKey>| key.map(|_| EncryptionKey(HIDDEN.into()));
    shown.encryption_key = hide(shown.encryption_key);
    shown.decryption_keys = hide(shown.decryption_keys);
    shown.database_url = without_password(&config.database_url);
    shown.forwarding.proxy = config
        .forwarding
        .proxy
        .as_deref()
        .map(hookyard_core::outbound::proxy_shown);
    shown.nats_url = config.nats_url_shown();
    let text = toml::to_string(&shown).map_err(|e| format!("cannot print the configuration: {e}"))?;
    print!("{text}");
    Ok(())
}
