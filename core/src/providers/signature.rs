//! Signature verification, one engine for every provider's scheme. A scheme says the
//! algorithm, where the signature is and how it is written, the exact signed string
//! (a template over `{body}`, `{timestamp}`, `{id}`, `{method}`, `{url}`,
//! `{form_sorted}`, `{secret}`), how the secret is decoded, and where a timestamp is and
//! how old it may be. Comparisons are constant-time; when a header carries several
//! signatures (key rotation), any one matching is enough.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha1::Sha1;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::extract::{at_path, Source};
use super::request::Inbound;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    HmacSha256,
    HmacSha1,
    /// Plain SHA-256 of the signed string (which then holds `{secret}`): HubSpot v1/v2.
    Sha256,
    /// The header holds the secret itself: GitLab's `X-Gitlab-Token`.
    Token,
    /// Each event's `field` equals the secret: Microsoft Graph's `clientState`.
    ClientState,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    #[default]
    Hex,
    Base64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SecretFormat {
    /// The secret's bytes as configured.
    #[default]
    Raw,
    /// Base64 of the key bytes (Airtable).
    Base64,
    /// `whsec_` + base64 (Standard Webhooks).
    Whsec,
}

/// How the signature header is written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeaderFormat {
    /// `prefix` + signature; several separated by whitespace.
    #[default]
    Plain,
    /// `t=…,v1=…,v1=…` (Stripe, Calendly): the timestamp and signatures by key.
    Keyed,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimeUnit {
    #[default]
    Seconds,
    Milliseconds,
    /// An RFC 3339 date-time.
    Rfc3339,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimestampSpec {
    /// A source (`header:X-Slack-Request-Timestamp`, `body:webhookTimestamp`), or
    /// `signature` for the `t=` of a keyed header.
    pub from: String,
    #[serde(default)]
    pub unit: TimeUnit,
    /// How far from now the timestamp may be; default 5 minutes.
    #[serde(default = "default_tolerance", with = "humantime_serde")]
    pub tolerance: Duration,
}

fn default_tolerance() -> Duration {
    Duration::from_secs(300)
}

fn default_signed() -> String {
    "{body}".into()
}

fn default_keyed_signature() -> String {
    "v1".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureSpec {
    pub algorithm: Algorithm,
    /// The header carrying the signature (for `client-state`: none).
    #[serde(default)]
    pub header: String,
    /// Text before each signature (`sha256=`, `v0=`, `v1,`).
    #[serde(default)]
    pub prefix: String,
    #[serde(default)]
    pub encoding: Encoding,
    #[serde(default)]
    pub format: HeaderFormat,
    /// For `keyed`: the key of the signatures.
    #[serde(default = "default_keyed_signature")]
    pub keyed_signature: String,
    /// The signed string.
    #[serde(default = "default_signed")]
    pub signed: String,
    #[serde(default)]
    pub secret: SecretFormat,
    #[serde(default)]
    pub timestamp: Option<TimestampSpec>,
    /// The header whose value is `{id}`.
    #[serde(default)]
    pub id_header: Option<String>,
    /// For `client-state`: the field of each event that must equal the secret.
    #[serde(default)]
    pub field: Option<String>,
}

/// What verification concluded about an accepted webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verification {
    /// Signed, and the signature matched the integration's secret.
    Verified,
    /// The provider signs, but the integration has no secret to check with.
    Unverified,
    /// The provider does not sign its webhooks.
    Unsigned,
}

impl Verification {
    pub fn as_str(self) -> &'static str {
        match self {
            Verification::Verified => "verified",
            Verification::Unverified => "unverified",
            Verification::Unsigned => "unsigned",
        }
    }

    pub fn parse(text: &str) -> Option<Verification> {
        match text {
            "verified" => Some(Verification::Verified),
            "unverified" => Some(Verification::Unverified),
            "unsigned" => Some(Verification::Unsigned),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("the {0} header is missing")]
    Missing(String),
    #[error("the signature does not match")]
    Mismatch,
    #[error("the timestamp is missing or unreadable")]
    BadTimestamp,
    #[error("the timestamp is {0} seconds from now, beyond the tolerance")]
    Stale(i64),
    #[error("the secret is not valid for this scheme: {0}")]
    BadSecret(&'static str),
    #[error("this scheme signs the URL, and ingest.public_url is not known")]
    NoUrl,
}

impl SignatureSpec {
    /// Checks the spec once, at load.
    pub fn check(&self) -> Result<(), String> {
        if self.algorithm == Algorithm::ClientState {
            if self.field.is_none() {
                return Err("signature: client-state needs `field`".into());
            }
        } else if self.header.is_empty() {
            return Err("signature: `header` is required".into());
        }
        if let Some(ts) = &self.timestamp {
            if ts.from != "signature" {
                ts.from
                    .parse::<Source>()
                    .map_err(|e| format!("signature.timestamp.from: {e}"))?;
            } else if self.format != HeaderFormat::Keyed {
                return Err("signature.timestamp.from = \"signature\" needs format = \"keyed\"".into());
            }
        }
        let mut rest = self.signed.as_str();
        while let Some(open) = rest.find('{') {
            let close = rest[open..].find('}').ok_or("signature.signed has an unclosed {")?;
            let name = &rest[open + 1..open + close];
            if !["body", "timestamp", "id", "method", "url", "form_sorted", "secret"].contains(&name) {
                return Err(format!("signature.signed: unknown placeholder {{{name}}}"));
            }
            rest = &rest[open + close + 1..];
        }
        Ok(())
    }

    /// Verifies `request` against `secret`. `events` are the batch elements (for
    /// `client-state`); `now` is the clock.
    pub fn verify(
        &self,
        request: &Inbound<'_>,
        secret: &str,
        events: &[&serde_json::Value],
        now: DateTime<Utc>,
    ) -> Result<(), VerifyError> {
        match self.algorithm {
            Algorithm::Token => {
                let given = request
                    .header(&self.header)
                    .ok_or_else(|| VerifyError::Missing(self.header.clone()))?;
                return equal(given.trim().as_bytes(), secret.as_bytes());
            }
            Algorithm::ClientState => {
                let field = self.field.as_deref().unwrap_or_default();
                if events.is_empty() {
                    return Err(VerifyError::Mismatch);
                }
                for event in events {
                    let given = at_path(event, field).and_then(|v| v.as_str()).unwrap_or("");
                    equal(given.as_bytes(), secret.as_bytes())?;
                }
                return Ok(());
            }
            _ => {}
        }
        let headers: Vec<&str> = request.header_values(&self.header).collect();
        if headers.is_empty() {
            return Err(VerifyError::Missing(self.header.clone()));
        }
        let (keyed_timestamp, candidates) = self.candidates(&headers);
        let timestamp = match &self.timestamp {
            Some(spec) => {
                let text = if spec.from == "signature" {
                    keyed_timestamp
                } else {
                    spec.from.parse::<Source>().ok().and_then(|s| s.first(request, None))
                }
                .ok_or(VerifyError::BadTimestamp)?;
                check_age(&text, spec, now)?;
                Some(text)
            }
            None => None,
        };
        let key = self.key(secret)?;
        let signed = self.signed_bytes(request, timestamp.as_deref(), secret)?;
        let expected = self.digest(&key, &signed);
        for candidate in candidates {
            let decoded = match self.encoding {
                Encoding::Hex => hex::decode(candidate.trim().to_ascii_lowercase()).ok(),
                Encoding::Base64 => STANDARD.decode(candidate.trim()).ok(),
            };
            if let Some(given) = decoded {
                if equal(&given, &expected).is_ok() {
                    return Ok(());
                }
            }
        }
        Err(VerifyError::Mismatch)
    }

    /// The signatures in the header values (prefix removed), and a keyed timestamp.
    fn candidates<'h>(&self, headers: &[&'h str]) -> (Option<String>, Vec<&'h str>) {
        let mut timestamp = None;
        let mut found = Vec::new();
        for value in headers {
            match self.format {
                HeaderFormat::Plain => {
                    for part in value.split_whitespace() {
                        if let Some(signature) = strip_prefix_ignore_case(part, &self.prefix) {
                            found.push(signature);
                        }
                    }
                }
                HeaderFormat::Keyed => {
                    for pair in value.split(',') {
                        let Some((key, val)) = pair.trim().split_once('=') else {
                            continue;
                        };
                        if key == "t" {
                            timestamp = Some(val.to_string());
                        } else if key == self.keyed_signature {
                            found.push(val);
                        }
                    }
                }
            }
        }
        (timestamp, found)
    }

    fn key(&self, secret: &str) -> Result<Vec<u8>, VerifyError> {
        match self.secret {
            SecretFormat::Raw => Ok(secret.as_bytes().to_vec()),
            SecretFormat::Base64 => STANDARD
                .decode(secret.trim())
                .map_err(|_| VerifyError::BadSecret("expected base64")),
            SecretFormat::Whsec => STANDARD
                .decode(secret.trim().trim_start_matches("whsec_"))
                .map_err(|_| VerifyError::BadSecret("expected whsec_ followed by base64")),
        }
    }

    fn signed_bytes(
        &self,
        request: &Inbound<'_>,
        timestamp: Option<&str>,
        secret: &str,
    ) -> Result<Vec<u8>, VerifyError> {
        let mut out = Vec::with_capacity(request.body.len() + 64);
        let mut rest = self.signed.as_str();
        while let Some(open) = rest.find('{') {
            out.extend_from_slice(&rest.as_bytes()[..open]);
            let close = open + rest[open..].find('}').unwrap_or(rest.len() - open);
            match &rest[open + 1..close] {
                "body" => out.extend_from_slice(request.body),
                "timestamp" => out.extend_from_slice(timestamp.unwrap_or_default().as_bytes()),
                "id" => {
                    let name = self.id_header.as_deref().unwrap_or("webhook-id");
                    let id = request
                        .header(name)
                        .ok_or_else(|| VerifyError::Missing(name.to_string()))?;
                    out.extend_from_slice(id.as_bytes());
                }
                "method" => out.extend_from_slice(request.method.as_bytes()),
                "url" => out.extend_from_slice(request.url.ok_or(VerifyError::NoUrl)?.as_bytes()),
                "form_sorted" => {
                    let mut fields = request.form();
                    fields.sort();
                    for (key, value) in fields {
                        out.extend_from_slice(key.as_bytes());
                        out.extend_from_slice(value.as_bytes());
                    }
                }
                "secret" => out.extend_from_slice(secret.as_bytes()),
                _ => {}
            }
            rest = &rest[(close + 1).min(rest.len())..];
        }
        out.extend_from_slice(rest.as_bytes());
        Ok(out)
    }

    fn digest(&self, key: &[u8], signed: &[u8]) -> Vec<u8> {
        match self.algorithm {
            Algorithm::HmacSha256 => {
                let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
                mac.update(signed);
                mac.finalize().into_bytes().to_vec()
            }
            Algorithm::HmacSha1 => {
                let mut mac = Hmac::<Sha1>::new_from_slice(key).expect("HMAC takes keys of any length");
                mac.update(signed);
                mac.finalize().into_bytes().to_vec()
            }
            Algorithm::Sha256 => Sha256::digest(signed).to_vec(),
            Algorithm::Token | Algorithm::ClientState => Vec::new(),
        }
    }
}

/// The signature that `spec` would carry for this request: for tests and for senders
/// (the forwarder signs with the same engine).
pub fn sign(
    spec: &SignatureSpec,
    request: &Inbound<'_>,
    secret: &str,
    timestamp: Option<&str>,
) -> Result<String, VerifyError> {
    let key = spec.key(secret)?;
    let signed = spec.signed_bytes(request, timestamp, secret)?;
    let digest = spec.digest(&key, &signed);
    Ok(match spec.encoding {
        Encoding::Hex => hex::encode(digest),
        Encoding::Base64 => STANDARD.encode(digest),
    })
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    if text.len() >= prefix.len()
        && text.is_char_boundary(prefix.len())
        && text[..prefix.len()].eq_ignore_ascii_case(prefix)
    {
        Some(&text[prefix.len()..])
    } else {
        None
    }
}

fn equal(given: &[u8], expected: &[u8]) -> Result<(), VerifyError> {
    if given.len() == expected.len() && bool::from(given.ct_eq(expected)) {
        Ok(())
    } else {
        Err(VerifyError::Mismatch)
    }
}

fn check_age(text: &str, spec: &TimestampSpec, now: DateTime<Utc>) -> Result<(), VerifyError> {
    let at = match spec.unit {
        TimeUnit::Seconds => text
            .trim()
            .parse::<i64>()
            .ok()
            .and_then(|s| DateTime::from_timestamp(s, 0)),
        TimeUnit::Milliseconds => text
            .trim()
            .parse::<i64>()
            .ok()
            .and_then(DateTime::from_timestamp_millis),
        TimeUnit::Rfc3339 => DateTime::parse_from_rfc3339(text.trim())
            .ok()
            .map(|t| t.with_timezone(&Utc)),
    }
    .ok_or(VerifyError::BadTimestamp)?;
    let skew = (now - at).num_seconds();
    if skew.unsigned_abs() > spec.tolerance.as_secs() {
        return Err(VerifyError::Stale(skew));
    }
    Ok(())
}
