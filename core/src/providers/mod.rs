//! The provider catalog: what hookyard knows about each provider's webhooks, as data.
//!
//! One TOML file per provider under `providers/` (embedded in the binary) says how its
//! webhooks are signed, which requests are handshakes and what answers them, where the
//! event type is, which body path holds a batch of events, and how an event finds its
//! connection. This module is the one engine that reads those files:
//!
//! - [`request`]: the received webhook as the rules see it (headers, query, parsed body);
//! - [`extract`]: sources (`body:a.b`, `header:X`, `query:q`) and templates over them;
//! - [`signature`]: verification, constant-time, several signatures per header accepted;
//! - [`handshake`]: challenges answered synchronously by ingest;
//! - [`events`]: batch splitting, event types and routing values, for the router.
//!
//! An integration's `settings` may override `signature`, `event_type`, `batch` and
//! `routing` (same shapes as the files), so a custom integration needs no code.

pub mod api;
pub mod events;
pub mod extract;
pub mod handshake;
pub mod request;
pub mod signature;

use std::collections::HashMap;
use std::sync::Arc;

use serde::Deserialize;

pub use events::{Event, OrderSpec, Route, RoutingSpec, RoutingTarget};
pub use extract::{Source, Template};
pub use handshake::{HandshakeAnswer, HandshakeSpec};
pub use request::Inbound;
pub use signature::{Algorithm, SignatureSpec, Verification, VerifyError};

impl Provider {
    /// Whether verification needs the URL the provider called (it signs it).
    pub fn signs_url(&self) -> bool {
        self.signature.as_ref().is_some_and(|s| s.signed.contains("{url}"))
    }

    /// Checks a received webhook's signature against the integration's secret: fails
    /// closed when there is a secret, says `Unverified` when the provider signs but there
    /// is no secret to check with.
    pub fn verify(
        &self,
        request: &Inbound<'_>,
        secret: Option<&str>,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Verification, VerifyError> {
        match (&self.signature, secret) {
            (None, _) => Ok(Verification::Unsigned),
            (Some(_), None) => Ok(Verification::Unverified),
            (Some(spec), Some(secret)) => {
                let elements = match spec.algorithm {
                    Algorithm::ClientState => events::batch_elements(self, request),
                    _ => Vec::new(),
                };
                spec.verify(request, secret, &elements, now)
                    .map(|()| Verification::Verified)
            }
        }
    }
}

/// One provider's rules, as written in its file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provider {
    pub name: String,
    pub display_name: String,
    /// Where the provider documents its webhooks.
    #[serde(default)]
    pub docs: Option<String>,
    #[serde(default)]
    pub signature: Option<SignatureSpec>,
    #[serde(default)]
    pub handshakes: Vec<HandshakeSpec>,
    /// A template over sources: `{header:X-GitHub-Event}.{body:action}`; a part whose
    /// source is absent is left out with its separator.
    #[serde(default)]
    pub event_type: Option<Template>,
    /// A body path whose array elements are separate events; `$` is the body itself.
    #[serde(default)]
    pub batch: Option<String>,
    /// How one batch's events are put in order, when the provider's order is not the
    /// order they happened in.
    #[serde(default)]
    pub order: Option<OrderSpec>,
    #[serde(default)]
    pub routing: RoutingSpec,
    /// The provider's API, for exec (`nango.get`, `nango.paginate`, …).
    #[serde(default)]
    pub api: Option<api::ApiSpec>,
}

/// The parts of a provider an integration's settings may replace.
#[derive(Debug, Default, Deserialize)]
struct Overrides {
    signature: Option<SignatureSpec>,
    event_type: Option<Template>,
    batch: Option<String>,
    routing: Option<RoutingSpec>,
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("provider file {file}: {message}")]
    Invalid { file: String, message: String },
    #[error("integration settings: {0}")]
    Settings(String),
}

macro_rules! embedded {
    ($($name:literal),* $(,)?) => {
        &[$(($name, include_str!(concat!("../../../providers/", $name, ".toml")))),*]
    };
}

/// Every provider file, compiled in.
const FILES: &[(&str, &str)] = embedded!(
    "airtable",
    "asana",
    "attio",
    "calendly",
    "dropbox",
    "generic",
    "generic-hmac",
    "github",
    "gitlab",
    "hubspot",
    "intercom",
    "jira",
    "linear",
    "meta",
    "microsoft-graph",
    "notion",
    "quickbooks",
    "shopify",
    "slack",
    "standard-webhooks",
    "stripe",
    "twilio",
    "zendesk",
    "zoom",
);

/// The loaded catalog, by provider name.
#[derive(Debug, Clone)]
pub struct Catalog {
    providers: HashMap<String, Arc<Provider>>,
}

impl Catalog {
    /// Loads and checks the embedded provider files.
    pub fn embedded() -> Result<Catalog, CatalogError> {
        let mut providers = HashMap::new();
        for (file, text) in FILES {
            let provider = parse(file, text)?;
            providers.insert(provider.name.clone(), Arc::new(provider));
        }
        Ok(Catalog { providers })
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Provider>> {
        self.providers.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.providers.keys().map(String::as_str)
    }

    /// For a name the catalog does not have, the catalog name it may have meant and how
    /// far it is: 0 when only case and separators differ (`GitHub`, `microsoft_graph`),
    /// else up to two edits (`gitub`).
    pub fn closest(&self, name: &str) -> Option<(&str, usize)> {
        if self.get(name).is_some() {
            return None;
        }
        let folded = |s: &str| -> String {
            s.chars()
                .filter(char::is_ascii_alphanumeric)
                .map(|c| c.to_ascii_lowercase())
                .collect()
        };
        let wanted = folded(name);
        self.names()
            .map(|known| (strsim::damerau_levenshtein(&wanted, &folded(known)), known))
            .filter(|(distance, _)| *distance <= 2)
            .min()
            .map(|(distance, known)| (known, distance))
    }

    /// The rules for an integration: its provider's (or `generic` for one the catalog
    /// does not know), with the integration's settings' overrides applied.
    pub fn resolve(&self, provider: &str, settings: &serde_json::Value) -> Result<Arc<Provider>, CatalogError> {
        let base = self
            .get(provider)
            .or_else(|| self.get("generic"))
            .cloned()
            .ok_or_else(|| CatalogError::Settings("the catalog has no generic provider".into()))?;
        let overrides: Overrides = match settings {
            serde_json::Value::Object(map)
                if ["signature", "event_type", "batch", "routing"]
                    .iter()
                    .any(|k| map.contains_key(*k)) =>
            {
                serde_json::from_value(settings.clone()).map_err(|e| CatalogError::Settings(e.to_string()))?
            }
            _ => return Ok(base),
        };
        let mut provider = (*base).clone();
        if let Some(signature) = overrides.signature {
            signature.check().map_err(CatalogError::Settings)?;
            provider.signature = Some(signature);
        }
        if let Some(event_type) = overrides.event_type {
            provider.event_type = Some(event_type);
        }
        if let Some(batch) = overrides.batch {
            provider.batch = Some(batch);
        }
        if let Some(routing) = overrides.routing {
            routing.check().map_err(CatalogError::Settings)?;
            provider.routing = routing;
        }
        Ok(Arc::new(provider))
    }
}

fn parse(file: &str, text: &str) -> Result<Provider, CatalogError> {
    let invalid = |message: String| CatalogError::Invalid {
        file: format!("{file}.toml"),
        message,
    };
    let provider: Provider = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
    if provider.name != *file {
        return Err(invalid(format!("name {:?} differs from the file name", provider.name)));
    }
    if let Some(signature) = &provider.signature {
        signature.check().map_err(invalid)?;
    }
    provider.routing.check().map_err(invalid)?;
    for handshake in &provider.handshakes {
        handshake.check().map_err(invalid)?;
    }
    Ok(provider)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_embedded_file_loads() {
        let catalog = Catalog::embedded().unwrap();
        assert_eq!(catalog.names().count(), FILES.len());
        assert!(catalog.get("github").unwrap().signature.is_some());
    }

    #[test]
    fn unknown_providers_fall_back_to_generic_and_settings_override() {
        let catalog = Catalog::embedded().unwrap();
        let plain = catalog.resolve("my-own", &serde_json::json!({})).unwrap();
        assert_eq!(plain.name, "generic");
        let custom = catalog
            .resolve(
                "my-own",
                &serde_json::json!({
                    "signature": {"algorithm": "hmac-sha256", "header": "X-Sig", "encoding": "hex"},
                    "routing": {"by": "value", "source": ["body:account"], "match": "connection_config.account"}
                }),
            )
            .unwrap();
        assert_eq!(custom.signature.as_ref().unwrap().header, "X-Sig");
        let bad = catalog.resolve("x", &serde_json::json!({"routing": {"by": "value"}}));
        assert!(bad.is_err());
    }
}
