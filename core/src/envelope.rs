//! The envelope: one received webhook as it is stored in `HOOKS_RAW`.
//!
//! The NATS message payload is the provider's body, byte for byte (what every
//! signature is computed over, and what an operator sees in `nats stream view`).
//! The subject `hooks.raw.{environment}.{integration}` says where it came in, and the
//! message id `{environment}:{integration}:{delivery id}` which delivery it is.
//! The rest travels in NATS headers: our metadata under `Hookyard-*`, and the request's
//! HTTP headers together in one, `Hookyard-Http-Headers`, as a JSON array of
//! `[name, value]` pairs in the order received (repeats kept). One header rather than
//! one per request header (format 1, still read): each NATS header costs the client a
//! map entry and the server a scan, and providers send a dozen; packed, publishing a
//! GitHub delivery costs its client a quarter less CPU (README, Performance). Packing also
//! keeps a sender from injecting `Nats-Msg-Id`, and JSON escapes what HTTP should never
//! have let through (CR, LF).
//! Nothing is said twice: every header is bytes the server scans on every message.

use std::str::FromStr;

use async_nats::header::{HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use sha2::{Digest, Sha256};

use crate::keys::{EnvironmentName, IntegrationKey};
use crate::providers::Verification;

pub const FORMAT_VERSION: &str = "2";
/// Each request header in a NATS header of its own, `Http-{name}`. Read, not written:
/// `HOOKS_RAW` keeps messages for days, and a replay after an upgrade reads them.
const FORMAT_PER_HEADER: &str = "1";

const H_FORMAT: &str = "Hookyard-Envelope";
const H_MESSAGE_ID: &str = "Nats-Msg-Id";
const H_RECEIVED_AT: &str = "Hookyard-Received-At";
/// Only present when the method is not POST.
const H_METHOD: &str = "Hookyard-Method";
const H_PATH: &str = "Hookyard-Path";
const H_QUERY: &str = "Hookyard-Query";
/// Only present when not `unsigned`.
const H_VERIFICATION: &str = "Hookyard-Verification";
const H_TRACEPARENT: &str = "traceparent";
/// Absent when the request had no headers.
const H_HTTP_HEADERS: &str = "Hookyard-Http-Headers";
/// Format 1's prefix for each request header.
const HTTP_PREFIX: &str = "Http-";

/// Request headers that carry the provider's own id for one delivery; a retry of the
/// delivery repeats it. First match wins. (The provider catalog refines this per
/// provider; these are the ones that need no provider knowledge.)
pub const DELIVERY_ID_HEADERS: &[&str] = &[
    "x-github-delivery",
    "webhook-id",
    "svix-id",
    "x-shopify-webhook-id",
    "linear-delivery",
    "x-gitlab-event-uuid",
    "x-atlassian-webhook-identifier",
    "x-zendesk-webhook-invocation-id",
    "i-twilio-idempotency-token",
];

/// A webhook as received: exact body bytes, headers, query string and where it came in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub environment: EnvironmentName,
    pub integration: IntegrationKey,
    pub received_at: DateTime<Utc>,
    /// The provider's delivery id, or `h:{hex}` (a SHA-256 over what was received, cut
    /// to 128 bits) when it sent none.
    pub delivery_id: String,
    pub method: String,
    /// The part of the URL after `/webhook/{environment}/{integration}/`, if any, as
    /// received (percent-encoded).
    pub path: Option<String>,
    /// The raw query string, as received.
    pub query: Option<String>,
    /// Request headers, names lower-case; repeated headers keep their order.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// What ingest concluded about the signature.
    pub verification: Verification,
    /// The W3C trace context of the request's span, when traces are exported.
    pub traceparent: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("message has no headers; it is not a hookyard envelope")]
    NoHeaders,
    #[error("subject {0:?} is not hooks.raw.{{environment}}.{{integration}}")]
    Subject(String),
    #[error("envelope header {0} is missing")]
    Missing(&'static str),
    #[error(
        "envelope format {0:?} is not supported by this version (it reads {FORMAT_PER_HEADER} and {FORMAT_VERSION})"
    )]
    Format(String),
    #[error("envelope header {0} is invalid: {1}")]
    Invalid(&'static str, String),
}

impl Envelope {
    /// The subject this envelope is published on.
    pub fn subject(&self) -> String {
        crate::streams::raw_subject(&self.environment, &self.integration)
    }

    /// The JetStream message id: the same delivery published twice is stored once.
    pub fn message_id(&self) -> String {
        let (environment, integration) = (self.environment.as_str(), self.integration.as_str());
        let mut id = String::with_capacity(environment.len() + integration.len() + self.delivery_id.len() + 2);
        id.push_str(environment);
        id.push(':');
        id.push_str(integration);
        id.push(':');
        id.push_str(&self.delivery_id);
        id
    }

    /// The delivery id of a request: the provider's own when a known header carries one,
    /// else a hash over everything that distinguishes one delivery from another.
    pub fn derive_delivery_id(
        integration: &IntegrationKey,
        headers: &[(String, String)],
        path: Option<&str>,
        query: Option<&str>,
        body: &[u8],
    ) -> String {
        let provided = DELIVERY_ID_HEADERS.iter().find_map(|wanted| {
            headers
                .iter()
                .find(|(name, value)| name == wanted && !value.trim().is_empty())
                .map(|(_, value)| value.trim().to_string())
        });
        provided.unwrap_or_else(|| {
            let mut hash = Sha256::new();
            for part in [
                integration.as_str().as_bytes(),
                path.unwrap_or("").as_bytes(),
                query.unwrap_or("").as_bytes(),
            ] {
                hash.update((part.len() as u64).to_be_bytes());
                hash.update(part);
            }
            hash.update(body);
            // 128 bits of the hash are plenty to tell deliveries apart, and the id is
            // held in the server's duplicate map for the whole window: keep it short.
            let mut hex = [0u8; 32];
            hex::encode_to_slice(&hash.finalize()[..16], &mut hex).expect("32 hex digits for 16 bytes");
            let mut id = String::with_capacity(2 + hex.len());
            id.push_str("h:");
            id.push_str(std::str::from_utf8(&hex).expect("hex digits are ASCII"));
            id
        })
    }

    /// NATS headers for this envelope; the payload is `self.body` unchanged.
    ///
    /// On ingest's hot path: our own names are static (no allocation, no validation),
    /// each value is copied once, and names that occur once are inserted (one hash)
    /// rather than appended (two).
    pub fn to_headers(&self) -> HeaderMap {
        let mut map = HeaderMap::new();
        let mut ours = |name: &'static str, value: String| {
            if let Some(value) = checked_value(name, value) {
                map.insert(HeaderName::from_static(name), value);
            }
        };
        ours(H_FORMAT, FORMAT_VERSION.to_string());
        ours(H_MESSAGE_ID, self.message_id());
        ours(
            H_RECEIVED_AT,
            self.received_at.to_rfc3339_opts(SecondsFormat::Micros, true),
        );
        if self.method != "POST" {
            ours(H_METHOD, self.method.clone());
        }
        if let Some(path) = &self.path {
            ours(H_PATH, path.clone());
        }
        if let Some(query) = &self.query {
            ours(H_QUERY, query.clone());
        }
        if self.verification != Verification::Unsigned {
            ours(H_VERIFICATION, self.verification.as_str().to_string());
        }
        if let Some(traceparent) = &self.traceparent {
            ours(H_TRACEPARENT, traceparent.clone());
        }
        if !self.headers.is_empty() {
            // Pairs of strings always serialize; JSON escapes every control character,
            // so the value never needs `checked_value`'s refusal.
            let packed = serde_json::to_string(&self.headers).expect("string pairs serialize");
            map.insert(HeaderName::from_static(H_HTTP_HEADERS), packed);
        }
        map
    }

    /// Decodes a message of `HOOKS_RAW` (its subject, headers and payload).
    pub fn from_message(subject: &str, headers: Option<&HeaderMap>, payload: Bytes) -> Result<Envelope, EnvelopeError> {
        let map = headers.ok_or(EnvelopeError::NoHeaders)?;
        let get = |name: &'static str| map.get(name).map(|v| v.as_str());
        let need = |name: &'static str| get(name).ok_or(EnvelopeError::Missing(name));
        let format = need(H_FORMAT)?;
        if format != FORMAT_VERSION && format != FORMAT_PER_HEADER {
            return Err(EnvelopeError::Format(format.to_string()));
        }
        let bad_subject = || EnvelopeError::Subject(subject.to_string());
        let (environment, integration) = match subject.split('.').collect::<Vec<_>>()[..] {
            ["hooks", "raw", environment, integration] => (
                environment.parse::<EnvironmentName>().map_err(|_| bad_subject())?,
                integration.parse::<IntegrationKey>().map_err(|_| bad_subject())?,
            ),
            _ => return Err(bad_subject()),
        };
        let prefix = format!("{environment}:{integration}:");
        let delivery_id = need(H_MESSAGE_ID)?
            .strip_prefix(&prefix)
            .ok_or_else(|| EnvelopeError::Invalid(H_MESSAGE_ID, format!("does not start with {prefix}")))?
            .to_string();
        let received_at = DateTime::parse_from_rfc3339(need(H_RECEIVED_AT)?)
            .map_err(|e| EnvelopeError::Invalid(H_RECEIVED_AT, e.to_string()))?
            .with_timezone(&Utc);
        let headers = if format == FORMAT_PER_HEADER {
            per_header_http(map)
        } else {
            match get(H_HTTP_HEADERS) {
                None => Vec::new(),
                Some(packed) => {
                    serde_json::from_str(packed).map_err(|e| EnvelopeError::Invalid(H_HTTP_HEADERS, e.to_string()))?
                }
            }
        };
        Ok(Envelope {
            environment,
            integration,
            received_at,
            delivery_id,
            method: get(H_METHOD).unwrap_or("POST").to_string(),
            path: get(H_PATH).map(String::from),
            query: get(H_QUERY).map(String::from),
            headers,
            body: payload,
            verification: match get(H_VERIFICATION) {
                None => Verification::Unsigned,
                Some(text) => {
                    Verification::parse(text).ok_or_else(|| EnvelopeError::Invalid(H_VERIFICATION, text.to_string()))?
                }
            },
            traceparent: get(H_TRACEPARENT).map(String::from),
        })
    }
}

/// Format 1's request headers: each `Http-{name}` header, repeats kept.
fn per_header_http(map: &HeaderMap) -> Vec<(String, String)> {
    let mut headers = Vec::new();
    for (name, values) in map.iter() {
        if let Some(http_name) = AsRef::<str>::as_ref(name).strip_prefix(HTTP_PREFIX) {
            for value in values {
                headers.push((http_name.to_string(), value.as_str().to_string()));
            }
        }
    }
    headers
}

/// Every header value hookyard puts on a NATS message goes through here: async-nats
/// asserts (panics) on CR or LF in a header value, and CR/LF would otherwise split the
/// NATS header block. HTTP cannot deliver them in a header or a raw path; a value that
/// somehow holds one is logged and left out rather than failing the message.
pub fn insert_checked(map: &mut HeaderMap, name: &str, value: &str) {
    match HeaderName::from_str(name) {
        Ok(header) => {
            if let Some(value) = checked_value(name, value.to_string()) {
                map.append(header, value)
            }
        }
        Err(_) => left_out(name),
    }
}

/// `value` as a header value, or `None` (logged) when it holds CR or LF.
fn checked_value(name: &str, value: String) -> Option<HeaderValue> {
    HeaderValue::try_from(value).map_err(|_| left_out(name)).ok()
}

fn left_out(name: &str) {
    tracing::warn!(header = %name, "header cannot be carried in a NATS message; left out");
}

/// A message's headers as (name, value) pairs, repeats kept: to keep a message outside
/// NATS (a dead letter) and publish it again later ([`headers_from_pairs`]).
pub fn header_pairs(map: &HeaderMap) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = map
        .iter()
        .flat_map(|(name, values)| values.iter().map(move |v| (name.to_string(), v.as_str().to_string())))
        .collect();
    pairs.sort();
    pairs
}

pub fn headers_from_pairs(pairs: &[(String, String)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        insert_checked(&mut map, name, value);
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Envelope {
        Envelope {
            environment: "dev".parse().unwrap(),
            integration: "github".parse().unwrap(),
            received_at: "2026-11-26T17:30:00.123456Z".parse().unwrap(),
            delivery_id: "d-1".into(),
            method: "POST".into(),
            path: Some("extra/part".into()),
            query: Some("a=1&b=%20x".into()),
            headers: vec![
                ("content-type".into(), "application/json".into()),
                ("x-dup".into(), "one".into()),
                ("x-dup".into(), "two".into()),
                ("nats-msg-id".into(), "forged".into()),
            ],
            body: Bytes::from_static(b"{\"a\": 1}\n\x00\xff"),
            verification: Verification::Verified,
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        }
    }

    #[test]
    fn round_trips_through_nats_headers() {
        let envelope = sample();
        let headers = envelope.to_headers();
        assert_eq!(headers.get("Nats-Msg-Id").unwrap().as_str(), "dev:github:d-1");
        let back = Envelope::from_message(&envelope.subject(), Some(&headers), envelope.body.clone()).unwrap();
        assert_eq!(back.environment, envelope.environment);
        assert_eq!(back.integration, envelope.integration);
        assert_eq!(back.delivery_id, envelope.delivery_id);
        assert_eq!(back.method, "POST");
        assert_eq!(back.received_at, envelope.received_at);
        assert_eq!(back.path, envelope.path);
        assert_eq!(back.query, envelope.query);
        assert_eq!(back.body, envelope.body);
        assert_eq!(back.verification, Verification::Verified);
        assert_eq!(back.traceparent, envelope.traceparent);
        assert_eq!(
            back.headers, envelope.headers,
            "every header survives, repeats included, in the order received"
        );
    }

    #[test]
    fn request_headers_travel_in_one_nats_header() {
        let headers = sample().to_headers();
        let names: Vec<String> = headers.iter().map(|(name, _)| name.to_string()).collect();
        assert!(names.iter().all(|name| !name.starts_with(HTTP_PREFIX)), "{names:?}");
        assert_eq!(
            headers.get(H_HTTP_HEADERS).unwrap().as_str(),
            r#"[["content-type","application/json"],["x-dup","one"],["x-dup","two"],["nats-msg-id","forged"]]"#
        );
        let none = Envelope {
            headers: vec![],
            ..sample()
        };
        assert!(none.to_headers().get(H_HTTP_HEADERS).is_none());
        let back = Envelope::from_message(&none.subject(), Some(&none.to_headers()), Bytes::new()).unwrap();
        assert!(back.headers.is_empty());
    }

    /// What ingest wrote before format 2, as `HOOKS_RAW` may still hold it.
    #[test]
    fn format_1_messages_are_still_read() {
        let mut headers = HeaderMap::new();
        headers.insert(H_FORMAT, "1");
        headers.insert(H_MESSAGE_ID, "dev:github:d-1");
        headers.insert(H_RECEIVED_AT, "2026-11-26T17:30:00.123456Z");
        headers.insert(H_QUERY, "a=1");
        headers.append("Http-content-type", "application/json");
        headers.append("Http-x-dup", "one");
        headers.append("Http-x-dup", "two");
        let back = Envelope::from_message("hooks.raw.dev.github", Some(&headers), Bytes::from_static(b"{}")).unwrap();
        assert_eq!(back.delivery_id, "d-1");
        assert_eq!(back.query.as_deref(), Some("a=1"));
        let mut got = back.headers;
        got.sort();
        let want: Vec<(String, String)> = [("content-type", "application/json"), ("x-dup", "one"), ("x-dup", "two")]
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_garbled_header_list_is_refused_by_name() {
        let mut headers = sample().to_headers();
        headers.insert(H_HTTP_HEADERS, "[[\"content-type\"");
        let garbled = Envelope::from_message(&sample().subject(), Some(&headers), Bytes::new());
        assert!(
            matches!(garbled, Err(EnvelopeError::Invalid(H_HTTP_HEADERS, _))),
            "{garbled:?}"
        );
    }

    #[test]
    fn provider_headers_cannot_forge_nats_ones() {
        let headers = sample().to_headers();
        let ids: Vec<_> = headers.get_all("Nats-Msg-Id").map(|v| v.as_str().to_string()).collect();
        assert_eq!(ids, vec!["dev:github:d-1"]);
    }

    /// A line break would end the NATS header block (and async-nats asserts against
    /// one): in a header of our own the value is left out, in the request's headers
    /// JSON escapes it and it survives.
    #[test]
    fn values_with_line_breaks_are_left_out_or_escaped_not_a_panic() {
        let evil = "v\r\nNats-Msg-Id: forged";
        let envelope = Envelope {
            path: Some("a\r\nNats-Msg-Id: forged".into()),
            headers: vec![("x-evil".into(), evil.into())],
            ..sample()
        };
        let headers = envelope.to_headers();
        assert!(headers.get("Hookyard-Path").is_none());
        let packed = headers.get(H_HTTP_HEADERS).unwrap().as_str();
        assert!(!packed.contains(['\r', '\n']), "{packed:?}");
        let ids: Vec<_> = headers.get_all("Nats-Msg-Id").map(|v| v.as_str().to_string()).collect();
        assert_eq!(ids, vec!["dev:github:d-1"]);
        let back = Envelope::from_message(&envelope.subject(), Some(&headers), Bytes::new()).unwrap();
        assert_eq!(back.headers, vec![("x-evil".to_string(), evil.to_string())]);
    }

    #[test]
    fn other_methods_round_trip() {
        let envelope = Envelope {
            method: "GET".into(),
            ..sample()
        };
        let back = Envelope::from_message(&envelope.subject(), Some(&envelope.to_headers()), Bytes::new()).unwrap();
        assert_eq!(back.method, "GET");
        let unsigned = Envelope {
            verification: Verification::Unsigned,
            ..sample()
        };
        let headers = unsigned.to_headers();
        assert!(
            headers.get("Hookyard-Verification").is_none(),
            "the common case costs no header"
        );
        let back = Envelope::from_message(&unsigned.subject(), Some(&headers), Bytes::new()).unwrap();
        assert_eq!(back.verification, Verification::Unsigned);
    }

    #[test]
    fn rejects_foreign_messages() {
        let subject = sample().subject();
        let none = Envelope::from_message(&subject, None, Bytes::new());
        assert!(matches!(none, Err(EnvelopeError::NoHeaders)));
        let mut headers = sample().to_headers();
        let wrong_subject = Envelope::from_message("hooks.conn.dev.github", Some(&headers), Bytes::new());
        assert!(matches!(wrong_subject, Err(EnvelopeError::Subject(_))));
        let other_integration = Envelope::from_message("hooks.raw.dev.gitlab", Some(&headers), Bytes::new());
        assert!(matches!(
            other_integration,
            Err(EnvelopeError::Invalid("Nats-Msg-Id", _))
        ));
        headers.insert(H_FORMAT, "9");
        let future = Envelope::from_message(&subject, Some(&headers), Bytes::new());
        assert!(matches!(future, Err(EnvelopeError::Format(_))));
    }

    #[test]
    fn delivery_id_prefers_the_providers_and_hashes_otherwise() {
        let key: IntegrationKey = "gh".parse().unwrap();
        let with_id = vec![("x-github-delivery".to_string(), "72d3162e".to_string())];
        assert_eq!(
            Envelope::derive_delivery_id(&key, &with_id, None, None, b"x"),
            "72d3162e"
        );
        let a = Envelope::derive_delivery_id(&key, &[], None, None, b"body");
        assert!(a.starts_with("h:") && a.len() == 34, "{a}");
        assert_eq!(a, Envelope::derive_delivery_id(&key, &[], None, None, b"body"));
        assert_ne!(
            a,
            Envelope::derive_delivery_id(&key, &[], None, Some("connection_id=2"), b"body")
        );
        assert_ne!(a, Envelope::derive_delivery_id(&key, &[], None, None, b"body2"));
        let other: IntegrationKey = "gl".parse().unwrap();
        assert_ne!(a, Envelope::derive_delivery_id(&other, &[], None, None, b"body"));
    }
}
