//! Exec's way to a provider's API (`nango.proxy`, `get`, `post`, …): calls against the
//! integration's base URL only, with the connection's credentials applied (API key,
//! Basic, OAuth2 Bearer refreshed through the token URL when expired or refused with
//! 401, one refresh at a time per connection: `token_refresh`), and 429 / 5xx retried
//! honouring `Retry-After` while the run has the time; a rate limit (a 429, or the
//! provider's own answer: `RateLimitSpec`) pauses the connection's other calls too
//! (`rate_limit`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use hookyard_core::config::ForwardingConfig;
use hookyard_core::keys::IntegrationKey;
use hookyard_core::outbound::parse_retry_after;
use hookyard_core::providers::api::{ApiSpec, RateLimitSpec, ResetIn};
use hookyard_core::providers::Catalog;
use hookyard_core::store::{Credentials, Integration};
use hookyard_core::Store;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, RETRY_AFTER};
use reqwest::{Method, Url};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::Mutex;

use crate::rate_limit::{self, Limit};
use crate::shared_reads;
use crate::token_refresh::{expiring, Refresher};

/// Retries of a 429 / 5xx / unreachable call unless the call says otherwise.
const DEFAULT_RETRIES: u32 = 3;
/// A `Retry-After` longer than this is not waited for: the call fails instead.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(120);
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);

/// What `nango.proxy` asks for.
#[derive(Debug, Deserialize)]
pub struct ProxyRequest {
    pub method: String,
    pub endpoint: String,
    #[serde(default)]
    pub params: Option<Map<String, Value>>,
    #[serde(default)]
    pub data: Option<Value>,
    #[serde(default)]
    pub headers: Option<Map<String, Value>>,
    #[serde(default)]
    pub retries: Option<u32>,
    /// Nango's `retryOn`: statuses retried besides 429 and 5xx (a 404 of a record the
    /// provider has not made readable everywhere yet, say).
    #[serde(default, rename = "retryOn")]
    pub retry_on: Option<Vec<u16>>,
    /// Nango's `retryHeader`: the headers that say how long to wait before a retry.
    #[serde(default, rename = "retryHeader")]
    pub retry_header: Option<RetryHeader>,
}

/// Where an answer says when to call again: `after`, a header with seconds to wait
/// (instead of `Retry-After`), and `at`, one with when, in UTC epoch seconds (instead of
/// the provider's `rate_limit.reset_header`).
#[derive(Debug, Default, Deserialize)]
pub struct RetryHeader {
    #[serde(default)]
    pub after: Option<String>,
    #[serde(default)]
    pub at: Option<String>,
}

/// What it gets back (a non-2xx is thrown by the prelude, with this as `response`).
#[derive(Debug, Clone, Serialize)]
pub struct ProxyResponse {
    pub status: u16,
    pub headers: Map<String, Value>,
    pub data: Value,
}

/// Whose credentials, so that a refreshed token can be stored.
#[derive(Debug, Clone)]
pub struct Owner {
    pub environment_id: i64,
    pub integration: IntegrationKey,
    pub connection_id: String,
}

pub struct ProviderApi {
    client: reqwest::Client,
    base: Url,
    spec: ApiSpec,
    /// The run's copy of the connection's credentials: replaced by a refresh.
    credentials: Mutex<Option<Credentials>>,
    owner: Owner,
    store: Store,
    /// Which addresses may be called (loopback and private ones are refused by default).
    guard: ForwardingConfig,
    /// Every event this API's runs are for came by then: a read of the connection sent
    /// since is as new as any of them, and may answer theirs ([`shared_reads`]).
    fresh_from: Instant,
}

/// The HTTP client for provider calls under `guard`: one per process and set of rules,
/// which every run shares. Making one per run (its TLS roots read, no connection kept
/// open) was most of the CPU of an onWebhook that fetches, and of every action.
pub(crate) fn shared_client(guard: &ForwardingConfig) -> Result<reqwest::Client, String> {
    static CLIENTS: std::sync::Mutex<Vec<(String, reqwest::Client)>> = std::sync::Mutex::new(Vec::new());
    let rules = serde_json::to_string(guard).map_err(|e| e.to_string())?;
    let mut clients = CLIENTS.lock().expect("provider clients");
    if let Some((_, client)) = clients.iter().find(|(made_for, _)| *made_for == rules) {
        return Ok(client.clone());
    }
    let client = hookyard_core::outbound::build_client(
        hookyard_core::outbound::client_builder(guard)?.timeout(ATTEMPT_TIMEOUT),
    )?;
    clients.push((rules, client.clone()));
    Ok(client)
}

/// The provider API an integration's calls use: the catalog provider's, with the
/// integration's `settings.api` laid over it and its OAuth2 client secret.
pub(crate) fn api_spec(catalog: &Catalog, integration: &Integration) -> Result<ApiSpec, String> {
    let provider = catalog.get(&integration.provider).and_then(|p| p.api.as_ref());
    ApiSpec::for_integration(
        provider,
        &integration.settings,
        integration.oauth_client_secret.as_deref(),
    )
    .map_err(|e| e.to_string())
}

impl Owner {
    /// The connection a sync's run is for.
    pub fn of(key: &hookyard_core::store::syncs::SyncKey) -> Owner {
        Owner {
            environment_id: key.environment_id,
            integration: key.integration.clone(),
            connection_id: key.connection_id.clone(),
        }
    }
}

impl ProviderApi {
    pub fn new(
        spec: ApiSpec,
        credentials: Option<Credentials>,
        owner: Owner,
        store: Store,
        guard: ForwardingConfig,
    ) -> Result<ProviderApi, String> {
        let base_text = spec.base_url.clone().ok_or_else(|| {
            format!(
                "integration {} has no API base URL: set settings.api.base_url",
                owner.integration
            )
        })?;
        let base = Url::parse(&base_text).map_err(|e| format!("API base URL {base_text:?}: {e}"))?;
        let client = shared_client(&guard)?;
        Ok(ProviderApi {
            client,
            base,
            spec,
            credentials: Mutex::new(credentials),
            owner,
            store,
            guard,
            fresh_from: Instant::now(),
        })
    }

    /// For runs of events that all came by `at` (before the API was made).
    pub fn fresh_from(self, at: Instant) -> ProviderApi {
        ProviderApi { fresh_from: at, ..self }
    }

    /// The integration's default pagination, for `nango.paginate`.
    pub fn pagination(&self) -> Value {
        self.spec.paginate.clone().unwrap_or(Value::Null)
    }

    /// Nango's `getToken`: an OAuth2 connection's access token (refreshed first when it
    /// expires within the margin), or the credentials of another kind as they are stored.
    pub async fn token(&self) -> Result<Value, String> {
        self.refresh_if_expired().await?;
        match &*self.credentials.lock().await {
            Some(Credentials::OAuth2 { access_token, .. }) => Ok(Value::String(access_token.clone())),
            Some(other) => serde_json::to_value(other).map_err(|e| e.to_string()),
            None => Err(format!("connection {} has no credentials", self.owner.connection_id)),
        }
    }

    /// One call, with its retries and at most one token refresh, within its run's
    /// `deadline`: a retry (or a rate limit's pause) the run cannot wait for ends it. A
    /// read may be answered by the same one in flight for another run ([`shared_reads`]).
    pub async fn call(&self, request: ProxyRequest, deadline: Instant) -> Result<ProxyResponse, String> {
        match self.read_key(&request) {
            Some(key) => shared_reads::read(key, self.fresh_from, || self.send_call(&request, deadline)).await,
            None => self.send_call(&request, deadline).await,
        }
    }

    /// What makes a read the same as another: the connection, the base URL and every part
    /// of the call. `None` for a call that is not a read (a GET or HEAD without a body).
    fn read_key(&self, request: &ProxyRequest) -> Option<String> {
        let read = ["GET", "HEAD"].iter().any(|m| request.method.eq_ignore_ascii_case(m));
        if !read || !matches!(request.data, None | Some(Value::Null)) {
            return None;
        }
        let owner = &self.owner;
        Some(format!(
            "{} {} {} {} {} {} {:?} {:?} {:?} {:?} {:?}",
            owner.environment_id,
            owner.integration,
            owner.connection_id,
            request.method.to_ascii_uppercase(),
            self.base,
            request.endpoint,
            request.params,
            request.headers,
            request.retries,
            request.retry_on,
            request.retry_header,
        ))
    }

    async fn send_call(&self, request: &ProxyRequest, deadline: Instant) -> Result<ProxyResponse, String> {
        let url = endpoint_url(&self.base, request)?;
        hookyard_core::outbound::allowed_destination(url.as_str(), &self.guard)
            .await
            .map_err(|e| format!("{}: {e}", url_for_errors(&url)))?;
        let method = Method::from_bytes(request.method.as_bytes())
            .map_err(|_| format!("{:?} is not an HTTP method", request.method))?;
        let retries = request.retries.unwrap_or(DEFAULT_RETRIES);
        let retry_on = request.retry_on.as_deref().unwrap_or_default();
        let asked = AskedWait::of(request.retry_header.as_ref(), self.spec.rate_limit.as_ref());
        self.refresh_if_expired().await?;
        let mut refreshed = false;
        let mut attempt = 0;
        loop {
            // A slot first: a pause met while waiting for it is still waited out.
            let slot = match self.spec.max_concurrent_calls {
                Some(bound) => Some(rate_limit::call_slot(&self.owner, bound, deadline).await?),
                None => None,
            };
            rate_limit::wait_for_turn(&self.owner, deadline).await?;
            let (auth, sent_with) = {
                let credentials = self.credentials.lock().await;
                let sent_with = refreshable(credentials.as_ref())
                    .then(|| oauth2_token(credentials.as_ref()).map(str::to_string))
                    .flatten();
                (auth_headers(credentials.as_ref(), &self.spec)?, sent_with)
            };
            let sent = self.send(&method, &url, request, auth).await;
            let (retry_in, limited) = match &sent {
                Ok(response)
                    if response.status().as_u16() == 401
                        && !refreshed
                        && sent_with.is_some()
                        && self.spec.token_url.is_some() =>
                {
                    refreshed = true;
                    self.refresh_refused(sent_with.as_deref()).await?;
                    continue;
                }
                Ok(response) => {
                    let (status, headers) = (response.status(), response.headers());
                    match rate_limited(status.as_u16(), headers, self.spec.rate_limit.as_ref(), &asked) {
                        Some(wait) => {
                            let wait = wait.unwrap_or_else(|| backoff(attempt));
                            self.rate_limited(wait, Limit::Refused).await;
                            (Some(wait), true)
                        }
                        None => {
                            if let Some(wait) = spent(headers, self.spec.rate_limit.as_ref(), &asked) {
                                self.rate_limited(wait, Limit::Spent).await;
                            }
                            let retried = status.is_server_error() || retry_on.contains(&status.as_u16());
                            let wait = || asked.wait(headers, false).unwrap_or_else(|| backoff(attempt));
                            (retried.then(wait), false)
                        }
                    }
                }
                Err(_) => (Some(backoff(attempt)), false),
            };
            match (retry_in, sent) {
                (Some(wait), _)
                    if attempt < retries && wait <= MAX_RETRY_AFTER && Instant::now() + wait <= deadline =>
                {
                    attempt += 1;
                    tracing::debug!(url = %url_for_errors(&url), attempt, ?wait, "provider call retried");
                    // Another of the connection's calls may go while this one waits.
                    drop(slot);
                    // A rate limit's pause is waited out at the loop's top, by this call
                    // and the connection's others.
                    if !limited {
                        tokio::time::sleep(wait).await;
                    }
                }
                (_, Ok(response)) => return read(response).await,
                (_, Err(error)) => {
                    return Err(format!(
                        "{} {} failed after {} attempts: {error}",
                        request.method,
                        url_for_errors(&url),
                        attempt + 1
                    ))
                }
            }
        }
    }

    /// The provider's rate limit met or spent: the connection's calls here wait `wait`,
    /// and the store says so to the other processes unless this process knew of as long
    /// a pause already (told by the store, or by another of its calls).
    async fn rate_limited(&self, wait: Duration, how: Limit) {
        if !rate_limit::pause(&self.owner, wait, how) {
            return;
        }
        let Ok(wait) = chrono::Duration::from_std(wait) else {
            return;
        };
        let owner = &self.owner;
        let until = chrono::Utc::now() + wait;
        if let Err(error) = self
            .store
            .rate_limit_connection(owner.environment_id, &owner.integration, &owner.connection_id, until)
            .await
        {
            tracing::warn!(%error, connection = %owner.connection_id, "a rate limit could not be recorded for the other processes");
        }
    }

    async fn send(
        &self,
        method: &Method,
        url: &Url,
        request: &ProxyRequest,
        auth: HeaderMap,
    ) -> Result<reqwest::Response, reqwest::Error> {
        let mut builder = self.client.request(method.clone(), url.clone()).headers(auth);
        for (name, value) in request.headers.iter().flatten() {
            let text = match value {
                Value::String(text) => text.clone(),
                other => other.to_string(),
            };
            if let (Ok(name), Ok(value)) = (HeaderName::try_from(name.as_str()), HeaderValue::try_from(text)) {
                builder = builder.header(name, value);
            }
        }
        builder = match &request.data {
            None | Some(Value::Null) => builder,
            Some(Value::String(text)) => builder.body(text.clone()),
            Some(json) => builder.json(json),
        };
        builder.send().await
    }

    /// What a refresh of this connection's token needs, made when one is (rarely).
    fn refresher(&self) -> Arc<Refresher> {
        Refresher::new(
            self.client.clone(),
            &self.spec,
            self.owner.clone(),
            self.store.clone(),
            self.guard.clone(),
        )
    }

    /// Refreshes an expiring OAuth2 token before it is used.
    async fn refresh_if_expired(&self) -> Result<(), String> {
        let mut credentials = self.credentials.lock().await;
        if self.spec.token_url.is_some() && refreshable(credentials.as_ref()) && expiring(credentials.as_ref()) {
            self.refresher()
                .refresh(&mut credentials)
                .await
                .map_err(|e| e.message)?;
        }
        Ok(())
    }

    /// After a 401 to `access_token`: refreshes, unless another call of this run did since.
    async fn refresh_refused(&self, access_token: Option<&str>) -> Result<(), String> {
        let mut credentials = self.credentials.lock().await;
        if oauth2_token(credentials.as_ref()) == access_token {
            self.refresher()
                .refresh(&mut credentials)
                .await
                .map_err(|e| e.message)?;
        }
        Ok(())
    }
}

/// OAuth2 credentials with a refresh token.
pub(crate) fn refreshable(credentials: Option<&Credentials>) -> bool {
    matches!(
        credentials,
        Some(Credentials::OAuth2 {
            refresh_token: Some(_),
            ..
        })
    )
}

fn oauth2_token(credentials: Option<&Credentials>) -> Option<&str> {
    match credentials {
        Some(Credentials::OAuth2 { access_token, .. }) => Some(access_token),
        _ => None,
    }
}

async fn read(response: reqwest::Response) -> Result<ProxyResponse, String> {
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .filter_map(|(name, value)| {
            Some((
                name.as_str().to_string(),
                Value::String(value.to_str().ok()?.to_string()),
            ))
        })
        .collect();
    let bytes = response.bytes().await.map_err(|e| format!("reading the answer: {e}"))?;
    let data =
        serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Ok(ProxyResponse { status, headers, data })
}

/// The headers an answer says how long to wait in: the call's `retryHeader`, else
/// `Retry-After` and the provider's reset header.
struct AskedWait<'a> {
    /// Seconds to wait (or, for `Retry-After`, a date).
    after: &'a str,
    /// The call's own `retryHeader.at`: when to call again, in UTC epoch seconds.
    at: Option<&'a str>,
    /// The provider's reset header, read only for a spent limit: GitHub sends it with
    /// every answer, and a 5xx's retry is not to wait out the hour.
    reset: Option<(&'a str, ResetIn)>,
}

impl<'a> AskedWait<'a> {
    fn of(call: Option<&'a RetryHeader>, provider: Option<&'a RateLimitSpec>) -> AskedWait<'a> {
        AskedWait {
            after: call.and_then(|c| c.after.as_deref()).unwrap_or(RETRY_AFTER.as_str()),
            at: call.and_then(|c| c.at.as_deref()),
            reset: provider.and_then(|p| Some((p.reset_header.as_deref()?, p.reset_in))),
        }
    }

    /// The wait `headers` ask for: `after`, else `at`, else (when `reset_too`) the reset.
    fn wait(&self, headers: &HeaderMap, reset_too: bool) -> Option<Duration> {
        self.after(headers)
            .or_else(|| until(headers, self.at.map(|at| (at, ResetIn::EpochSeconds))))
            .or_else(|| until(headers, self.reset.filter(|_| reset_too)))
    }

    /// The seconds `headers` ask to wait in `after`.
    fn after(&self, headers: &HeaderMap) -> Option<Duration> {
        header(headers, self.after).and_then(parse_retry_after)
    }
}

/// The wait until the time in the header `name`, written as `how` says.
fn until(headers: &HeaderMap, reset: Option<(&str, ResetIn)>) -> Option<Duration> {
    let (name, how) = reset?;
    let value: f64 = header(headers, name)?.parse().ok()?;
    let left = match how {
        ResetIn::Seconds => value,
        ResetIn::EpochSeconds => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64();
            value - now
        }
    };
    // At least a second: a clock a little ahead of the provider's would not wait.
    Some(Duration::from_secs_f64(left.clamp(1.0, 86_400.0)))
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name)?.to_str().ok().map(str::trim)
}

/// What the provider's remaining header says is left of its limit.
fn remaining<'h>(headers: &'h HeaderMap, spec: Option<&RateLimitSpec>) -> Option<&'h str> {
    header(headers, spec?.remaining_header.as_deref()?)
}

/// Whether an answer says the provider's rate limit is spent, and if so the wait it asks
/// for (`None`: the backoff's). A 429 always is one; the statuses `spec` names are one
/// with a wait asked in seconds or nothing remaining. The reset is taken only when
/// nothing remains or the provider names no remaining header.
fn rate_limited(
    status: u16,
    headers: &HeaderMap,
    spec: Option<&RateLimitSpec>,
    asked: &AskedWait,
) -> Option<Option<Duration>> {
    if status != 429 && !spec.is_some_and(|spec| spec.statuses.contains(&status)) {
        return None;
    }
    let remaining = remaining(headers, spec);
    let spent = remaining == Some("0");
    if status != 429 && asked.after(headers).is_none() && !spent {
        return None;
    }
    Some(asked.wait(headers, spent || remaining.is_none()))
}

/// An answer that is not a refusal but says nothing is left of the provider's limit
/// (GitHub's last call of the hour): the wait until its reset, so that the connection's
/// next call is not sent into a refusal. `None` when calls remain or no reset is given.
fn spent(headers: &HeaderMap, spec: Option<&RateLimitSpec>, asked: &AskedWait) -> Option<Duration> {
    (remaining(headers, spec)? == "0")
        .then(|| asked.wait(headers, true))
        .flatten()
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(500 * 2u64.pow(attempt.min(6)))
}

/// The endpoint against the base URL; an absolute URL must be on the base's origin.
fn endpoint_url(base: &Url, request: &ProxyRequest) -> Result<Url, String> {
    let endpoint = request.endpoint.as_str();
    let mut url = if endpoint.starts_with("http://") || endpoint.starts_with("https://") {
        let url = Url::parse(endpoint).map_err(|e| format!("endpoint {endpoint:?}: {e}"))?;
        if url.origin() != base.origin() {
            return Err(format!(
                "calls to {} are refused: only the integration's API ({}) can be called",
                url.origin().ascii_serialization(),
                base.origin().ascii_serialization()
            ));
        }
        url
    } else {
        let mut url = base.clone();
        let path = format!(
            "{}/{}",
            base.path().trim_end_matches('/'),
            endpoint.trim_start_matches('/')
        );
        let (path, query) = path.split_once('?').unwrap_or((&path, ""));
        url.set_path(path);
        url.set_query((!query.is_empty()).then_some(query));
        url
    };
    if let Some(params) = &request.params {
        let mut pairs = url.query_pairs_mut();
        for (name, value) in params {
            match value {
                Value::Null => {}
                Value::String(text) => {
                    pairs.append_pair(name, text);
                }
                other => {
                    pairs.append_pair(name, &other.to_string());
                }
            }
        }
    }
    Ok(url)
}

/// The headers that carry the connection's credentials.
fn auth_headers(credentials: Option<&Credentials>, spec: &ApiSpec) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::new();
    let value = |text: String| {
        HeaderValue::try_from(text).map_err(|_| "credentials hold a character a header cannot".to_string())
    };
    match credentials {
        None => {}
        Some(Credentials::ApiKey { api_key }) => match spec.api_key_header.as_deref() {
            None | Some("Authorization") | Some("authorization") => {
                headers.insert(AUTHORIZATION, value(format!("Bearer {api_key}"))?);
            }
            Some(header) => {
                let name = HeaderName::try_from(header)
                    .map_err(|_| format!("api_key_header {header:?} is not a header name"))?;
                headers.insert(name, value(api_key.clone())?);
            }
        },
        Some(Credentials::Basic { username, password }) => {
            use base64::Engine as _;
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
            headers.insert(AUTHORIZATION, value(format!("Basic {token}"))?);
        }
        Some(Credentials::OAuth2 { access_token, .. }) => {
            headers.insert(AUTHORIZATION, value(format!("Bearer {access_token}"))?);
        }
    }
    Ok(headers)
}

/// A URL without its query (which may carry tokens), for messages.
fn url_for_errors(url: &Url) -> String {
    let mut shown = url.clone();
    shown.set_query(None);
    shown.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, String)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| (HeaderName::from_static(name), HeaderValue::try_from(value).unwrap()))
            .collect()
    }

    #[test]
    fn a_calls_retry_header_names_where_the_wait_is() {
        let now = chrono::Utc::now().timestamp();
        let answer = headers(&[
            ("retry-after", "60".into()),
            ("x-wait", "3".into()),
            ("x-reset-at", (now + 300).to_string()),
        ]);
        let plain = AskedWait::of(None, None);
        assert_eq!(plain.wait(&answer, true), Some(Duration::from_secs(60)));
        let after = RetryHeader {
            after: Some("x-wait".into()),
            at: None,
        };
        assert_eq!(
            AskedWait::of(Some(&after), None).wait(&answer, true),
            Some(Duration::from_secs(3))
        );
        let at = RetryHeader {
            after: Some("x-none".into()),
            at: Some("x-reset-at".into()),
        };
        let wait = AskedWait::of(Some(&at), None).wait(&answer, true).unwrap();
        assert!(
            wait > Duration::from_secs(290) && wait <= Duration::from_secs(300),
            "{wait:?}"
        );
        // The provider's reset header is read for a spent limit only: GitHub sends one
        // with every answer, and a 5xx's retry is not to wait out the hour.
        let reset = RateLimitSpec {
            reset_header: Some("x-reset-at".into()),
            ..RateLimitSpec::default()
        };
        let provider = AskedWait::of(None, Some(&reset));
        let answer = headers(&[("x-reset-at", (now + 300).to_string())]);
        assert_eq!(provider.wait(&answer, false), None, "a 5xx's wait");
        assert!(provider.wait(&answer, true).is_some(), "a spent limit's wait");
    }

    /// GitHub's provider file's.
    fn github() -> RateLimitSpec {
        RateLimitSpec {
            statuses: vec![403],
            remaining_header: Some("x-ratelimit-remaining".into()),
            reset_header: Some("x-ratelimit-reset".into()),
            reset_in: ResetIn::EpochSeconds,
        }
    }

    #[test]
    fn rate_limits_are_read_from_429s_and_from_the_providers_own_answers() {
        let limited = |status, headers: &HeaderMap, spec: Option<&RateLimitSpec>| {
            rate_limited(status, headers, spec, &AskedWait::of(None, spec)).map(|wait| wait.unwrap_or(backoff(1)))
        };
        let none = HeaderMap::new();
        // A 429: its Retry-After, or the backoff.
        let after = headers(&[("retry-after", "7".into())]);
        assert_eq!(limited(429, &after, None), Some(Duration::from_secs(7)));
        assert_eq!(limited(429, &none, None), Some(backoff(1)));
        assert_eq!(limited(503, &after, None), None, "a 5xx is not a rate limit");

        // GitHub's: a 403 with nothing remaining, until its reset (epoch seconds).
        let github = github();
        let now = chrono::Utc::now().timestamp();
        let spent = headers(&[
            ("x-ratelimit-remaining", "0".into()),
            ("x-ratelimit-reset", (now + 600).to_string()),
        ]);
        let wait = limited(403, &spent, Some(&github)).expect("a rate limit");
        assert!(
            wait > Duration::from_secs(590) && wait <= Duration::from_secs(600),
            "{wait:?}"
        );
        assert_eq!(limited(403, &spent, None), None, "a plain 403 without the spec");
        let refused = headers(&[
            ("x-ratelimit-remaining", "4999".into()),
            ("x-ratelimit-reset", (now + 600).to_string()),
        ]);
        assert_eq!(limited(403, &refused, Some(&github)), None, "calls remain: a refusal");
        // A secondary limit: Retry-After wins over the reset.
        let secondary = headers(&[
            ("retry-after", "60".into()),
            ("x-ratelimit-remaining", "0".into()),
            ("x-ratelimit-reset", (now + 600).to_string()),
        ]);
        assert_eq!(limited(403, &secondary, Some(&github)), Some(Duration::from_secs(60)));
        // A reset already past (clocks apart) still waits a second.
        let past = headers(&[
            ("x-ratelimit-remaining", "0".into()),
            ("x-ratelimit-reset", (now - 5).to_string()),
        ]);
        assert_eq!(limited(429, &past, Some(&github)), Some(Duration::from_secs(1)));
    }

    #[test]
    fn an_answer_with_nothing_remaining_is_a_spent_limit_until_its_reset() {
        let github = github();
        let asked = AskedWait::of(None, Some(&github));
        let reset = (chrono::Utc::now().timestamp() + 600).to_string();
        let answer = |remaining: &str| {
            headers(&[
                ("x-ratelimit-remaining", remaining.into()),
                ("x-ratelimit-reset", reset.clone()),
            ])
        };
        let wait = spent(&answer("0"), Some(&github), &asked).expect("spent");
        assert!(wait > Duration::from_secs(590), "{wait:?}");
        assert_eq!(spent(&answer("1"), Some(&github), &asked), None, "one call left");
        assert_eq!(spent(&answer("0"), None, &asked), None, "no remaining header named");
        let no_reset = headers(&[("x-ratelimit-remaining", "0".into())]);
        assert_eq!(spent(&no_reset, Some(&github), &asked), None, "no reset to wait for");

        // Zendesk's reset is seconds from now.
        let zendesk = RateLimitSpec {
            remaining_header: Some("x-rate-limit-remaining".into()),
            reset_header: Some("ratelimit-reset".into()),
            reset_in: ResetIn::Seconds,
            ..RateLimitSpec::default()
        };
        let answer = headers(&[("x-rate-limit-remaining", "0".into()), ("ratelimit-reset", "41".into())]);
        let asked = AskedWait::of(None, Some(&zendesk));
        assert_eq!(spent(&answer, Some(&zendesk), &asked), Some(Duration::from_secs(41)));
        assert_eq!(
            rate_limited(429, &answer, Some(&zendesk), &asked),
            Some(Some(Duration::from_secs(41)))
        );
    }

    fn request(endpoint: &str, params: Value) -> ProxyRequest {
        ProxyRequest {
            method: "GET".into(),
            endpoint: endpoint.into(),
            params: params.as_object().cloned(),
            data: None,
            headers: None,
            retries: None,
            retry_on: None,
            retry_header: None,
        }
    }

    #[test]
    fn endpoints_resolve_against_the_base_and_other_hosts_are_refused() {
        let base = Url::parse("https://api.crm.test/v2/").unwrap();
        let url = endpoint_url(
            &base,
            &request(
                "/contacts?a=1",
                serde_json::json!({"limit": 2, "q": "x y", "none": null}),
            ),
        )
        .unwrap();
        assert_eq!(url.as_str(), "https://api.crm.test/v2/contacts?a=1&limit=2&q=x+y");
        let same = endpoint_url(&base, &request("https://api.crm.test/v2/contacts?page=2", Value::Null)).unwrap();
        assert_eq!(same.as_str(), "https://api.crm.test/v2/contacts?page=2");
        for other in [
            "https://evil.test/contacts",
            "http://api.crm.test/v2/contacts",
            "https://api.crm.test:8443/x",
        ] {
            let error = endpoint_url(&base, &request(other, Value::Null)).unwrap_err();
            assert!(error.contains("are refused"), "{other}: {error}");
        }
    }

    #[test]
    fn credentials_become_headers() {
        let header = |credentials: &Credentials, spec: &ApiSpec| {
            let headers = auth_headers(Some(credentials), spec).unwrap();
            headers
                .iter()
                .map(|(n, v)| format!("{}: {}", n, v.to_str().unwrap()))
                .collect::<Vec<_>>()
        };
        let key = Credentials::ApiKey { api_key: "k1".into() };
        assert_eq!(header(&key, &ApiSpec::default()), ["authorization: Bearer k1"]);
        let custom = ApiSpec {
            api_key_header: Some("X-API-Key".into()),
            ..ApiSpec::default()
        };
        assert_eq!(header(&key, &custom), ["x-api-key: k1"]);
        let basic = Credentials::Basic {
            username: "ada".into(),
            password: "pw".into(),
        };
        assert_eq!(header(&basic, &ApiSpec::default()), ["authorization: Basic YWRhOnB3"]);
        let oauth = Credentials::OAuth2 {
            access_token: "t1".into(),
            refresh_token: None,
            expires_at: None,
            raw: None,
        };
        assert_eq!(header(&oauth, &ApiSpec::default()), ["authorization: Bearer t1"]);
        assert!(auth_headers(None, &ApiSpec::default()).unwrap().is_empty());
        let broken = Credentials::ApiKey { api_key: "a\nb".into() };
        assert!(auth_headers(Some(&broken), &ApiSpec::default()).is_err());
    }
}
