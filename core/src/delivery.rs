//! A delivery: one webhook to send to one customer destination, as the forwarder (and
//! the sync notifications) put it into `HOOKS_FWD` and the deliverer sends it. A
//! redriven dead letter is the same delivery again (same `webhook-id`, so the receiver
//! can still tell) with attempts counted afresh.

use async_nats::header::HeaderMap;
use base64::Engine as _;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::envelope::insert_checked;
use crate::streams::fwd_subject;

/// What to send where. The body is sent exactly as these bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    /// The Standard Webhooks `webhook-id`: the same on every attempt.
    pub id: String,
    pub environment: String,
    pub integration: String,
    pub connection: Option<String>,
    pub url: String,
    /// `forward`, `sync`, `async_action` or `auth`.
    pub kind: String,
    /// The body, base64.
    pub body: String,
    /// Headers to send along (the provider's, for a forward).
    pub headers: Vec<(String, String)>,
    /// The span that made it, so its attempts join the webhook's trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The dead letter this is a redrive of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redrive: Option<i64>,
    /// The forwarded webhook's `HOOKS_RAW` sequence (its operation log's key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_seq: Option<u64>,
}

impl Delivery {
    /// A delivery of `body` to `url`; its id follows from `key` (what is delivered) and
    /// the url, so the same event for the same destination always has the same id.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        key: &str,
        environment: &str,
        integration: &str,
        connection: Option<&str>,
        url: &str,
        kind: &str,
        body: &[u8],
        headers: Vec<(String, String)>,
    ) -> Delivery {
        let digest = Sha256::digest(format!("{key}\n{url}").as_bytes());
        Delivery {
            id: format!("msg_{}", hex::encode(&digest[..12])),
            environment: environment.into(),
            integration: integration.into(),
            connection: connection.map(String::from),
            url: url.into(),
            kind: kind.into(),
            body: base64::engine::general_purpose::STANDARD.encode(body),
            headers,
            traceparent: crate::trace_context::current_traceparent(),
            redrive: None,
            raw_seq: None,
        }
    }

    pub fn body_bytes(&self) -> Result<Vec<u8>, base64::DecodeError> {
        base64::engine::general_purpose::STANDARD.decode(&self.body)
    }

    /// What its attempts, its message id and its idempotency marker go by: the id, and
    /// for a redrive the id with the dead letter's.
    pub fn attempt_key(&self) -> String {
        match self.redrive {
            None => self.id.clone(),
            Some(letter) => format!("{}:redrive-{letter}", self.id),
        }
    }

    pub fn to_message(&self) -> (String, HeaderMap, Bytes) {
        let mut headers = HeaderMap::new();
        insert_checked(&mut headers, "Nats-Msg-Id", &self.attempt_key());
        let payload = serde_json::to_vec(self).expect("a delivery serialises");
        (fwd_subject(&self.environment, &self.kind), headers, payload.into())
    }
}
