//! NATS `.creds` files (`nats_credentials`): a user JWT and its nkey seed, as `nsc`,
//! Synadia Cloud and NATS's operator tooling write them. The file is read again at each
//! connection, reconnections included, so a rotated file (a Kubernetes Secret updated in
//! place, a JWT renewed before it expires) is taken up without a restart.

use std::path::{Path, PathBuf};

use async_nats::{Auth, AuthError, ConnectOptions};
use nkeys::KeyPair;

/// A `.creds` file's user JWT and key.
pub struct Creds {
    jwt: String,
    key: KeyPair,
}

/// Reads and parses `file`. Errors name the file, never what it holds.
pub fn read(file: &Path) -> Result<Creds, String> {
    let text =
        std::fs::read_to_string(file).map_err(|e| format!("nats_credentials: cannot read {}: {e}", file.display()))?;
    let refused = |why: String| {
        format!(
            "nats_credentials: {} is not a NATS credentials file (a user JWT and its nkey seed): {why}",
            file.display()
        )
    };
    let jwt = block_after(&text, "BEGIN NATS USER JWT")
        .filter(|jwt| jwt.split('.').count() == 3)
        .ok_or_else(|| refused("no user JWT in it".into()))?;
    let seed = block_after(&text, "BEGIN USER NKEY SEED").ok_or_else(|| refused("no nkey seed in it".into()))?;
    let key = KeyPair::from_seed(seed).map_err(|e| refused(format!("its seed does not read: {e}")))?;
    Ok(Creds {
        jwt: jwt.to_string(),
        key,
    })
}

/// The line after the decoration line naming `what` (`-----BEGIN … -----`).
fn block_after<'a>(text: &'a str, what: &str) -> Option<&'a str> {
    let mut lines = text.lines().skip_while(|line| !line.contains(what));
    lines.next()?;
    lines
        .next()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with("---"))
}

/// Client options that sign each connection's nonce with `file` as it is then.
pub fn connect_options(file: PathBuf) -> ConnectOptions {
    ConnectOptions::with_auth_callback(move |nonce| {
        let creds = read(&file);
        async move {
            let creds = creds.map_err(AuthError::new)?;
            let mut auth = Auth::new();
            auth.signature = Some(creds.key.sign(&nonce).map_err(AuthError::new)?);
            auth.jwt = Some(creds.jwt);
            Ok(auth)
        }
    })
}
