//! OAuth2 token refreshes, one at a time per connection across runs and processes.
//!
//! Many providers rotate refresh tokens: each is good for one use, a second use is
//! refused, and some revoke the whole grant when they see one used again. Two runs of
//! one connection refreshing at once (two groups of webhooks, onWebhook beside exec, an
//! action) would break it. So a refresh first looks at what is stored (another run may
//! have refreshed since this one read the credentials), and trades the refresh token only
//! under the connection's lease in the store; the others wait for what it stores.
//!
//! The trade and the store run in a task of their own: a run given up meanwhile (its
//! time ran out) neither leaves a rotated token unstored nor keeps the lease.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use hookyard_core::config::ForwardingConfig;
use hookyard_core::metrics::names;
use hookyard_core::providers::api::ApiSpec;
use hookyard_core::providers::Catalog;
use hookyard_core::store::{Connection, Credentials, Integration};
use hookyard_core::Store;
use reqwest::StatusCode;
use serde_json::Value;

use crate::provider_api::{api_spec, refreshable, shared_client, Owner};

/// An OAuth2 token this close to expiring is refreshed before it is used.
const EXPIRY_MARGIN: chrono::Duration = chrono::Duration::seconds(30);
/// How long a refresh may hold the lease: the token URL's lookup and answer (at most
/// the client's 30 s), with room to store what it got. A holder that died is waited for
/// this long.
const LEASE: Duration = Duration::from_secs(45);
/// A refresh waiting for another's looks at the store again after this, doubling...
const FIRST_POLL: Duration = Duration::from_millis(25);
/// ...up to this.
const LAST_POLL: Duration = Duration::from_millis(400);
/// A refresh the token URL refused holds the lease this long: runs meanwhile fail at
/// once with its answer, and the token URL is asked again after it (a fixed client
/// secret mends without new credentials).
const REFUSED_HOLD: Duration = Duration::from_secs(60);

/// What a refresh needs, owned by its own task.
pub(crate) struct Refresher {
    client: reqwest::Client,
    token_url: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    owner: Owner,
    store: Store,
    guard: ForwardingConfig,
}

/// Why a trade of the refresh token (or the refresh around it) failed.
enum Trade {
    /// The grant is refused (the token URL's answer): the connection needs new
    /// credentials. Keeps the lease for [`REFUSED_HOLD`].
    Refused(String),
    /// Anything else (the token URL unreachable, a server error, the store): another try
    /// may pass. Lets go of the lease.
    Failed(String),
}

/// An OAuth2 error answer's `error` and `error_description` (RFC 6749, 5.2), as
/// ` (error: description)`; empty when it has none.
fn oauth_error(body: &Value) -> String {
    let text = |key: &str| {
        body[key]
            .as_str()
            .map(|text| text.chars().take(300).collect::<String>())
    };
    match (text("error"), text("error_description")) {
        (Some(error), Some(description)) => format!(" ({error}: {description})"),
        (Some(error), None) => format!(" ({error})"),
        (None, Some(description)) => format!(" ({description})"),
        (None, None) => String::new(),
    }
}

/// Why a refresh gave no fresh credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshError {
    pub message: String,
    /// The provider refused the grant: only new credentials mend it.
    pub refused: bool,
}

impl RefreshError {
    fn failed(message: String) -> RefreshError {
        RefreshError {
            message,
            refused: false,
        }
    }

    /// A refusal, with the token URL's `answer`.
    fn refused(answer: &str) -> RefreshError {
        RefreshError {
            message: format!("refreshing the OAuth2 token: {answer}; the connection needs to be authorized again"),
            refused: true,
        }
    }
}

impl std::fmt::Display for RefreshError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// What one try under the lease came to.
enum Attempt {
    /// Credentials newer than the run's: another run's refresh, or (true) this one's.
    Fresh(Option<Credentials>, bool),
    /// Another run holds the lease.
    Busy,
}

/// OAuth2 credentials that expire within the margin.
pub(crate) fn expiring(credentials: Option<&Credentials>) -> bool {
    matches!(credentials, Some(Credentials::OAuth2 { expires_at: Some(at), .. }) if *at <= Utc::now() + EXPIRY_MARGIN)
}

fn count(outcome: &'static str) {
    metrics::counter!(names::OAUTH2_REFRESHES, "outcome" => outcome).increment(1);
}

/// `stored` replaces the run's `held` credentials without a refresh: they were changed
/// since the run read them and are not about to expire.
fn newer(stored: &Option<Credentials>, held: &Option<Credentials>) -> bool {
    stored != held && !expiring(stored.as_ref())
}

/// A connection's credentials, fresh, for `GET /connections/{id}` (Nango's refreshes an
/// expired token before it answers, so that a caller can use it at once) and the
/// workers' keep-alive (`force`): an OAuth2 token that expires within the margin, or any
/// with `force`, refreshed as a run's is (one refresh at a time per connection). Other
/// credentials, and tokens without a refresh token or a token URL, as they are.
pub async fn fresh_credentials(
    store: &Store,
    catalog: &Catalog,
    integration: &Integration,
    connection: &Connection,
    guard: &ForwardingConfig,
    force: bool,
) -> Result<Option<Credentials>, RefreshError> {
    let mut credentials = connection.credentials.clone();
    if !refreshable(credentials.as_ref()) || !(force || expiring(credentials.as_ref())) {
        return Ok(credentials);
    }
    let spec = api_spec(catalog, integration).map_err(RefreshError::failed)?;
    if spec.token_url.is_none() {
        return Ok(credentials);
    }
    let owner = Owner {
        environment_id: connection.environment_id,
        integration: integration.unique_key.clone(),
        connection_id: connection.connection_id.clone(),
    };
    let client = shared_client(guard).map_err(RefreshError::failed)?;
    Refresher::new(client, &spec, owner, store.clone(), guard.clone())
        .refresh(&mut credentials)
        .await?;
    Ok(credentials)
}

impl Refresher {
    pub(crate) fn new(
        client: reqwest::Client,
        spec: &ApiSpec,
        owner: Owner,
        store: Store,
        guard: ForwardingConfig,
    ) -> Arc<Refresher> {
        Arc::new(Refresher {
            client,
            token_url: spec.token_url.clone(),
            client_id: spec.client_id.clone(),
            client_secret: spec.client_secret.clone(),
            owner,
            store,
            guard,
        })
    }

    /// Replaces a run's `credentials` (expiring, or refused by the provider) with fresher
    /// ones: those another run stored since they were read, or a refresh of its own.
    pub(crate) async fn refresh(self: &Arc<Self>, credentials: &mut Option<Credentials>) -> Result<(), RefreshError> {
        let mut wait = FIRST_POLL;
        loop {
            let (this, held) = (self.clone(), credentials.clone());
            let attempt = tokio::spawn(async move { this.attempt(held).await })
                .await
                .unwrap_or_else(|e| Err(RefreshError::failed(format!("refreshing the OAuth2 token: {e}"))));
            match attempt {
                Ok(Attempt::Fresh(fresh, refreshed)) => {
                    count(if refreshed { "refreshed" } else { "shared" });
                    *credentials = fresh;
                    return Ok(());
                }
                Ok(Attempt::Busy) => {
                    if wait == FIRST_POLL {
                        metrics::counter!(names::OAUTH2_REFRESH_WAITS).increment(1);
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(LAST_POLL);
                }
                Err(error) => {
                    count("failed");
                    return Err(error);
                }
            }
        }
    }

    async fn attempt(&self, held: Option<Credentials>) -> Result<Attempt, RefreshError> {
        let connection = self.connection().await.map_err(RefreshError::failed)?;
        let stored = connection.credentials;
        if newer(&stored, &held) {
            return Ok(Attempt::Fresh(stored, false));
        }
        let holder = hex::encode(hookyard_core::secrets::random_bytes::<12>());
        if self.lease(&holder, LEASE).await.map_err(RefreshError::failed)? {
            return self.under_lease(&held, &holder).await;
        }
        // A refusal holds the lease a while: the runs meanwhile fail at once with it
        // rather than each asking the token URL again.
        match connection.refresh_failure {
            Some(failure) if stored == held => Err(RefreshError::refused(&failure.error)),
            _ => Ok(Attempt::Busy),
        }
    }

    /// With the lease held: what is stored now (another run may have stored a refresh
    /// between the first read and the lease), or a refresh of it, stored (which ends the
    /// lease). A refusal is recorded and keeps the lease for [`REFUSED_HOLD`]; anything
    /// else lets go of it.
    async fn under_lease(&self, held: &Option<Credentials>, holder: &str) -> Result<Attempt, RefreshError> {
        let owner = &self.owner;
        let result = self.refresh_leased(held, holder).await;
        if !matches!(result, Ok(Attempt::Fresh(_, true)) | Err(Trade::Refused(_))) {
            let released = self
                .store
                .release_refresh_lease(owner.environment_id, &owner.integration, &owner.connection_id, holder)
                .await;
            if let Err(error) = released {
                tracing::warn!(connection = %owner.connection_id, %error, "the OAuth2 refresh lease is kept until it runs out");
            }
        }
        result.map_err(|error| match error {
            Trade::Refused(answer) => RefreshError::refused(&answer),
            Trade::Failed(error) => RefreshError::failed(error),
        })
    }

    /// [`Self::under_lease`]'s work, the lease aside.
    async fn refresh_leased(&self, held: &Option<Credentials>, holder: &str) -> Result<Attempt, Trade> {
        let owner = &self.owner;
        let stored = self.connection().await.map_err(Trade::Failed)?.credentials;
        if newer(&stored, held) {
            return Ok(Attempt::Fresh(stored, false));
        }
        let refreshed = match self.trade(stored.as_ref()).await {
            Ok(refreshed) => refreshed,
            Err(Trade::Failed(error)) => return Err(Trade::Failed(format!("refreshing the OAuth2 token: {error}"))),
            Err(Trade::Refused(error)) => {
                let recorded = async {
                    self.store
                        .refresh_refused(
                            owner.environment_id,
                            &owner.integration,
                            &owner.connection_id,
                            &error,
                            Utc::now(),
                        )
                        .await
                        .map_err(|e| e.to_string())?;
                    self.lease(holder, REFUSED_HOLD).await
                };
                if let Err(store_error) = recorded.await {
                    tracing::warn!(connection = %owner.connection_id, error = %store_error, "a refused OAuth2 refresh could not be recorded");
                }
                return Err(Trade::Refused(error));
            }
        };
        let updated = self
            .store
            .update_credentials(
                owner.environment_id,
                &owner.integration,
                &owner.connection_id,
                &refreshed,
            )
            .await
            .map_err(|e| Trade::Failed(format!("storing the refreshed OAuth2 token: {e}")))?;
        if !updated {
            return Err(Trade::Failed(format!("connection {} was deleted", owner.connection_id)));
        }
        tracing::info!(connection = %owner.connection_id, integration = %owner.integration, "OAuth2 token refreshed");
        Ok(Attempt::Fresh(Some(refreshed), true))
    }

    /// Takes (or, held by `holder`, extends) the connection's refresh lease for `ttl`.
    async fn lease(&self, holder: &str, ttl: Duration) -> Result<bool, String> {
        let owner = &self.owner;
        self.store
            .take_refresh_lease(
                owner.environment_id,
                &owner.integration,
                &owner.connection_id,
                holder,
                Utc::now(),
                ttl,
            )
            .await
            .map_err(|e| format!("refreshing the OAuth2 token: {e}"))
    }

    async fn connection(&self) -> Result<Connection, String> {
        let owner = &self.owner;
        self.store
            .existing_connection(owner.environment_id, &owner.integration, &owner.connection_id)
            .await
            .map_err(|e| format!("reading the connection's credentials: {e}"))
    }

    /// Trades the refresh token for a new access token at the token URL.
    async fn trade(&self, credentials: Option<&Credentials>) -> Result<Credentials, Trade> {
        let Some(Credentials::OAuth2 {
            refresh_token: Some(refresh_token),
            ..
        }) = credentials
        else {
            return Err(Trade::Refused(
                "the token needs refreshing and there is no refresh token".into(),
            ));
        };
        let token_url = self
            .token_url
            .as_deref()
            .ok_or_else(|| Trade::Failed("the integration has no token_url".into()))?;
        let form = {
            let mut form = form_urlencoded::Serializer::new(String::new());
            form.append_pair("grant_type", "refresh_token");
            form.append_pair("refresh_token", refresh_token);
            if let Some(id) = &self.client_id {
                form.append_pair("client_id", id);
            }
            if let Some(secret) = &self.client_secret {
                form.append_pair("client_secret", secret);
            }
            form.finish()
        };
        hookyard_core::outbound::allowed_destination(token_url, &self.guard)
            .await
            .map_err(|e| Trade::Failed(format!("token URL: {e}")))?;
        let response = self
            .client
            .post(token_url)
            .header("content-type", "application/x-www-form-urlencoded")
            .header("accept", "application/json")
            .body(form)
            .send()
            .await
            .map_err(|e| Trade::Failed(e.to_string()))?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let Some(access_token) = body["access_token"].as_str().filter(|_| status.is_success()) else {
            let answer = format!("the token URL answered {status}{}", oauth_error(&body));
            // A client error is the grant refused (revoked, expired, unknown): only new
            // credentials mend it. A server error, a 429 or a 408 may pass.
            let passing = [StatusCode::TOO_MANY_REQUESTS, StatusCode::REQUEST_TIMEOUT].contains(&status);
            return Err(if status.is_client_error() && !passing {
                Trade::Refused(answer)
            } else {
                Trade::Failed(answer)
            });
        };
        Ok(Credentials::OAuth2 {
            access_token: access_token.to_string(),
            refresh_token: body["refresh_token"]
                .as_str()
                .map(str::to_string)
                .or_else(|| Some(refresh_token.clone())),
            expires_at: body["expires_in"]
                .as_i64()
                .map(|seconds| Utc::now() + chrono::Duration::seconds(seconds)),
            raw: Some(body),
        })
    }
}
