//! Refresh tokens kept alive. Some providers revoke a refresh token left unused for
//! weeks (Xero after 60 days, QuickBooks after 100), and a connection whose functions
//! never call the provider's API (webhooks only) would find its grant gone the day one
//! does. So, as Nango does, every token is refreshed at least once a day: each worker's
//! sweep takes the connections whose credentials were stored longer ago than
//! [`KEEPALIVE`](hookyard_core::store::refresh::KEEPALIVE) and refreshes them through the
//! same one-at-a-time refresh as runs (a refusal is recorded and notified as theirs is).
//! It runs in a loop of its own: a slow token URL does not hold the notice sweeps.

use std::time::Duration;

use chrono::Utc;
use hookyard_functions::host::ApiSource;
use hookyard_functions::token_refresh::fresh_credentials;
use tokio_util::sync::CancellationToken;

use crate::WorkerError;

/// Connections taken per pass.
const BATCH: i64 = 50;

/// Refreshes the tokens due; how many it refreshed.
pub async fn sweep(source: &ApiSource) -> Result<usize, WorkerError> {
    let store = &source.store;
    let mut refreshed = 0;
    for due in store.claim_refresh_checks(Utc::now(), BATCH).await? {
        let key = due.integration()?;
        let (environment_id, id) = (due.environment_id, due.connection_id.as_str());
        let Some(connection) = store.connection(environment_id, &key, id).await? else {
            continue;
        };
        let integration = store.existing_integration(environment_id, &key).await?;
        let fresh = fresh_credentials(store, &source.catalog, &integration, &connection, &source.guard, true).await;
        match fresh {
            // Stored, with its next check.
            Ok(credentials) if credentials != connection.credentials => refreshed += 1,
            // Nothing to refresh (another kind of credentials, no token URL).
            Ok(_) => store.clear_refresh_check(environment_id, &key, id).await?,
            // A refusal is on the connection now; anything else is tried again later.
            Err(error) => {
                tracing::warn!(connection = id, integration = %key, %error, "keeping the OAuth2 token alive failed")
            }
        }
    }
    Ok(refreshed)
}

/// Runs [`sweep`] every `every` until `shutdown`.
pub async fn run(source: &ApiSource, every: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        crate::notify::report(
            sweep(source).await,
            "OAuth2 tokens refreshed to keep them alive",
            "keeping OAuth2 tokens alive failed; trying again later",
        );
    }
}
