//! How exec reaches a provider's API: its base URL, how an API key is sent, where an
//! OAuth2 token is refreshed, its default pagination and how it says a rate limit is
//! spent. From the provider's file (`[api]`), field by field overridden by an
//! integration's `settings.api`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::CatalogError;

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSpec {
    /// Every call's URL starts with this; calls to other hosts are refused.
    #[serde(default)]
    pub base_url: Option<String>,
    /// The header an `API_KEY` credential goes in; `Authorization` (the default) sends
    /// `Bearer {key}`.
    #[serde(default)]
    pub api_key_header: Option<String>,
    /// Where an expired OAuth2 access token is refreshed.
    #[serde(default)]
    pub token_url: Option<String>,
    #[serde(default)]
    pub client_id: Option<String>,
    /// Not in settings: the integration's `oauth_client_secret`, sealed at rest.
    #[serde(skip)]
    pub client_secret: Option<String>,
    /// Nango's pagination config, used by `nango.paginate` unless the call gives its own.
    #[serde(default)]
    pub paginate: Option<Value>,
    /// How the provider answers a spent rate limit, besides a 429 with `Retry-After`.
    #[serde(default)]
    pub rate_limit: Option<RateLimitSpec>,
    /// Calls of one connection in flight at once, per process (GitHub asks for one at a
    /// time); more wait for one to end. None: no bound but the runs in progress.
    #[serde(default)]
    pub max_concurrent_calls: Option<u32>,
}

/// A provider's rate-limit answers beyond the standard 429 with `Retry-After`: GitHub,
/// for one, answers a spent limit with a 403 just as often, and says when it resets in
/// a header of its own.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSpec {
    /// Statuses besides 429 that are a rate limit when the answer has a `Retry-After`
    /// or `remaining_header` says `0` (GitHub: 403; without either it is a refusal).
    #[serde(default)]
    pub statuses: Vec<u16>,
    /// The header with the calls left in the limit's window. Any answer, refused or
    /// not, that says `0` pauses the connection's calls until the reset: the next
    /// call is not sent into a refusal.
    #[serde(default)]
    pub remaining_header: Option<String>,
    /// The header with when the window starts again (`reset_in` says how): waited for
    /// when no `Retry-After` says otherwise and nothing is left (or no remaining header
    /// is named). Not read for other retries (a 5xx's): GitHub sends it with every
    /// answer.
    #[serde(default)]
    pub reset_header: Option<String>,
    /// What `reset_header` holds.
    #[serde(default)]
    pub reset_in: ResetIn,
}

/// How a provider writes when its rate limit starts again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ResetIn {
    /// UTC epoch seconds (GitHub, GitLab, Intercom).
    #[default]
    EpochSeconds,
    /// Seconds from now (Zendesk; the IETF draft's `RateLimit-Reset`).
    Seconds,
}

impl ApiSpec {
    /// The provider's spec with the integration's `settings.api` laid over it, and its
    /// OAuth2 client secret.
    pub fn for_integration(
        provider: Option<&ApiSpec>,
        settings: &Value,
        client_secret: Option<&str>,
    ) -> Result<ApiSpec, CatalogError> {
        let base = ApiSpec {
            client_secret: client_secret.map(str::to_string),
            ..provider.cloned().unwrap_or_default()
        };
        let Some(over) = settings.get("api") else {
            return Ok(base);
        };
        if over.get("client_secret").is_some() {
            return Err(CatalogError::Settings(
                "api.client_secret does not belong in settings (they are not sealed): \
                 give it as the integration's oauth_client_secret"
                    .into(),
            ));
        }
        let over: ApiSpec =
            serde_json::from_value(over.clone()).map_err(|e| CatalogError::Settings(format!("api: {e}")))?;
        Ok(ApiSpec {
            base_url: over.base_url.or(base.base_url),
            api_key_header: over.api_key_header.or(base.api_key_header),
            token_url: over.token_url.or(base.token_url),
            client_id: over.client_id.or(base.client_id),
            client_secret: base.client_secret,
            paginate: over.paginate.or(base.paginate),
            rate_limit: over.rate_limit.or(base.rate_limit),
            max_concurrent_calls: match over.max_concurrent_calls {
                Some(0) => {
                    return Err(CatalogError::Settings(
                        "api.max_concurrent_calls must be at least 1".into(),
                    ))
                }
                over => over.or(base.max_concurrent_calls),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn settings_bound_a_connections_calls_at_once_but_never_to_none() {
        let provider = ApiSpec {
            max_concurrent_calls: Some(4),
            ..ApiSpec::default()
        };
        let spec = |settings: Value| ApiSpec::for_integration(Some(&provider), &settings, None);
        assert_eq!(spec(json!({})).unwrap().max_concurrent_calls, Some(4));
        let one = spec(json!({"api": {"max_concurrent_calls": 1}})).unwrap();
        assert_eq!(one.max_concurrent_calls, Some(1));
        let error = spec(json!({"api": {"max_concurrent_calls": 0}})).unwrap_err();
        assert_eq!(
            error.to_string(),
            "integration settings: api.max_concurrent_calls must be at least 1"
        );
    }
}
