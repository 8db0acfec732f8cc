//! A routed event: one event of one webhook for one connection, as the router
//! publishes it to `HOOKS_CONN` and the worker reads it. The payload is the event's
//! JSON; the rest is in `Hookyard-*` headers. An event that matched no connection is
//! published the same way under `hooks.unrouted.*`, with the reason.
//!
//! The message id `{raw-seq}:{index}:{connection}` makes a redelivered raw message
//! (a router crash mid-batch) publish nothing twice. A replayed or redriven event
//! ([`Origin`]) has a suffix on its id, so that neither JetStream's duplicate window nor
//! the consumers' idempotency markers take it for the original; its version stays the
//! raw sequence's, so records never go back to an older state.

use async_nats::header::HeaderMap;
use bytes::Bytes;
use serde_json::Value;

use crate::envelope::insert_checked;
use crate::keys::{EnvironmentName, IntegrationKey};
use crate::streams::{conn_subject, unrouted_subject};

const H_MESSAGE_ID: &str = "Nats-Msg-Id";
const H_RAW_SEQ: &str = "Hookyard-Raw-Seq";
const H_INDEX: &str = "Hookyard-Index";
const H_EVENT_TYPE: &str = "Hookyard-Event-Type";
const H_DELIVERY_ID: &str = "Hookyard-Delivery-Id";
const H_CONNECTION: &str = "Hookyard-Connection";
const H_UNROUTED: &str = "Hookyard-Unrouted";
const H_TRACEPARENT: &str = "traceparent";
const H_REPLAY: &str = "Hookyard-Replay";
const H_REPLAY_TARGET: &str = "Hookyard-Replay-Target";
const H_REDRIVE: &str = "Hookyard-Redrive";
const H_REDRIVE_CONSUMER: &str = "Hookyard-Redrive-Consumer";

/// Where an event comes from, besides live traffic.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Origin {
    #[default]
    Live,
    /// Replay `id`, for `target`'s consumers.
    Replay { id: i64, target: ReplayTarget },
    /// Dead letter `id`, redriven for the one consumer that gave up on it.
    Redrive { id: i64, consumer: String },
}

impl Origin {
    /// Whether the functions consumer takes it.
    pub fn for_functions(&self) -> bool {
        !matches!(
            self,
            Origin::Replay {
                target: ReplayTarget::Forward,
                ..
            }
        )
    }

    /// Whether the forwarder takes it (a redrive is a function's only).
    pub fn for_forwarding(&self) -> bool {
        match self {
            Origin::Live => true,
            Origin::Replay { target, .. } => *target != ReplayTarget::Functions,
            Origin::Redrive { .. } => false,
        }
    }

    /// What it adds to message ids and delivery keys.
    pub fn suffix(&self) -> String {
        match self {
            Origin::Live => String::new(),
            Origin::Replay { id, .. } => format!(":replay-{id}"),
            Origin::Redrive { id, .. } => format!(":redrive-{id}"),
        }
    }
}

/// Which consumers a replay is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplayTarget {
    Functions,
    Forward,
    All,
}

impl ReplayTarget {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplayTarget::Functions => "functions",
            ReplayTarget::Forward => "forward",
            ReplayTarget::All => "all",
        }
    }
}

impl std::str::FromStr for ReplayTarget {
    type Err = String;
    fn from_str(text: &str) -> Result<ReplayTarget, String> {
        match text {
            "functions" => Ok(ReplayTarget::Functions),
            "forward" => Ok(ReplayTarget::Forward),
            "all" => Ok(ReplayTarget::All),
            other => Err(format!("{other:?} is not a target (functions, forward or all)")),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RoutedEvent {
    pub environment: EnvironmentName,
    pub integration: IntegrationKey,
    /// `None` for an unrouted event.
    pub connection_id: Option<String>,
    /// Why no connection took it (unrouted events only).
    pub unrouted: Option<String>,
    /// The webhook's sequence in `HOOKS_RAW`: with `index`, the version of the record
    /// writes it causes.
    pub raw_seq: u64,
    pub index: u32,
    pub event_type: Option<String>,
    pub delivery_id: String,
    pub payload: Value,
    /// The router's span for this webhook, in the webhook's trace.
    pub traceparent: Option<String>,
    pub origin: Origin,
}

#[derive(Debug, thiserror::Error)]
pub enum RoutedError {
    #[error("routed event header {0} is missing or invalid")]
    Header(&'static str),
    #[error("routed event subject {0:?} is not hooks.conn.* or hooks.unrouted.*")]
    Subject(String),
    #[error("routed event payload is not JSON: {0}")]
    Payload(String),
}

impl RoutedEvent {
    /// Versions of record writes: `raw_seq × 2^16 + index` (DESIGN.md, "Records").
    pub fn version(&self) -> i64 {
        ((self.raw_seq as i64) << 16) + i64::from(self.index.min(0xFFFE))
    }

    pub fn subject(&self) -> String {
        match &self.connection_id {
            Some(id) => conn_subject(&self.environment, &self.integration, id),
            None => unrouted_subject(&self.environment, &self.integration),
        }
    }

    pub fn message_id(&self) -> String {
        format!(
            "{}:{}:{}{}",
            self.raw_seq,
            self.index,
            self.connection_id.as_deref().unwrap_or("-"),
            self.origin.suffix()
        )
    }

    pub fn to_message(&self) -> (String, HeaderMap, Bytes) {
        let mut headers = HeaderMap::new();
        // Values come from providers and customers: each goes through the CR/LF check.
        let mut put = |name: &str, value: &str| insert_checked(&mut headers, name, value);
        put(H_MESSAGE_ID, &self.message_id());
        put(H_RAW_SEQ, &self.raw_seq.to_string());
        put(H_INDEX, &self.index.to_string());
        put(H_DELIVERY_ID, &self.delivery_id);
        if let Some(event_type) = &self.event_type {
            put(H_EVENT_TYPE, event_type);
        }
        if let Some(connection) = &self.connection_id {
            put(H_CONNECTION, connection);
        }
        if let Some(reason) = &self.unrouted {
            put(H_UNROUTED, reason);
        }
        if let Some(traceparent) = &self.traceparent {
            put(H_TRACEPARENT, traceparent);
        }
        match &self.origin {
            Origin::Live => {}
            Origin::Replay { id, target } => {
                put(H_REPLAY, &id.to_string());
                put(H_REPLAY_TARGET, target.as_str());
            }
            Origin::Redrive { id, consumer } => {
                put(H_REDRIVE, &id.to_string());
                put(H_REDRIVE_CONSUMER, consumer);
            }
        }
        let payload = serde_json::to_vec(&self.payload).expect("a JSON value serialises");
        (self.subject(), headers, Bytes::from(payload))
    }

    pub fn from_message(
        subject: &str,
        headers: Option<&HeaderMap>,
        payload: &[u8],
    ) -> Result<RoutedEvent, RoutedError> {
        let get = |name: &'static str| headers.and_then(|h| h.get(name)).map(|v| v.as_str().to_string());
        let need = |name: &'static str| get(name).ok_or(RoutedError::Header(name));
        let tokens: Vec<&str> = subject.split('.').collect();
        let bad_subject = || RoutedError::Subject(subject.to_string());
        let (environment, integration, routed) = match tokens[..] {
            ["hooks", "conn", env, integration, _] => (env, integration, true),
            ["hooks", "unrouted", env, integration] => (env, integration, false),
            _ => return Err(bad_subject()),
        };
        Ok(RoutedEvent {
            environment: environment.parse().map_err(|_| bad_subject())?,
            integration: integration.parse().map_err(|_| bad_subject())?,
            connection_id: if routed { Some(need(H_CONNECTION)?) } else { None },
            unrouted: get(H_UNROUTED),
            raw_seq: need(H_RAW_SEQ)?.parse().map_err(|_| RoutedError::Header(H_RAW_SEQ))?,
            index: need(H_INDEX)?.parse().map_err(|_| RoutedError::Header(H_INDEX))?,
            event_type: get(H_EVENT_TYPE),
            delivery_id: need(H_DELIVERY_ID)?,
            payload: serde_json::from_slice(payload).map_err(|e| RoutedError::Payload(e.to_string()))?,
            traceparent: get(H_TRACEPARENT),
            origin: origin(&get)?,
        })
    }
}

fn origin(get: &impl Fn(&'static str) -> Option<String>) -> Result<Origin, RoutedError> {
    let id = |name: &'static str| -> Result<Option<i64>, RoutedError> {
        get(name)
            .map(|v| v.parse().map_err(|_| RoutedError::Header(name)))
            .transpose()
    };
    if let Some(id) = id(H_REPLAY)? {
        let target = get(H_REPLAY_TARGET)
            .and_then(|t| t.parse().ok())
            .ok_or(RoutedError::Header(H_REPLAY_TARGET))?;
        return Ok(Origin::Replay { id, target });
    }
    if let Some(id) = id(H_REDRIVE)? {
        let consumer = get(H_REDRIVE_CONSUMER).ok_or(RoutedError::Header(H_REDRIVE_CONSUMER))?;
        return Ok(Origin::Redrive { id, consumer });
    }
    Ok(Origin::Live)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_versions_order_by_raw_sequence_then_index() {
        let event = RoutedEvent {
            environment: "dev".parse().unwrap(),
            integration: "hubspot".parse().unwrap(),
            connection_id: Some("portal 62515".into()),
            unrouted: None,
            raw_seq: 42,
            index: 3,
            event_type: Some("contact.creation".into()),
            delivery_id: "h:abc".into(),
            payload: serde_json::json!({"objectId": 123}),
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            origin: Origin::Live,
        };
        let (subject, headers, payload) = event.to_message();
        assert_eq!(subject, "hooks.conn.dev.hubspot.~cG9ydGFsIDYyNTE1");
        assert_eq!(headers.get("Nats-Msg-Id").unwrap().as_str(), "42:3:portal 62515");
        assert_eq!(
            RoutedEvent::from_message(&subject, Some(&headers), &payload).unwrap(),
            event
        );
        let later = RoutedEvent {
            raw_seq: 43,
            index: 0,
            ..event.clone()
        };
        assert!(later.version() > event.version());
        let unrouted = RoutedEvent {
            connection_id: None,
            unrouted: Some("no connection matches".into()),
            ..event
        };
        let (subject, headers, payload) = unrouted.to_message();
        assert_eq!(subject, "hooks.unrouted.dev.hubspot");
        assert_eq!(
            RoutedEvent::from_message(&subject, Some(&headers), &payload).unwrap(),
            unrouted
        );
    }

    #[test]
    fn replays_and_redrives_have_ids_of_their_own_and_the_same_version() {
        let live = RoutedEvent {
            environment: "dev".parse().unwrap(),
            integration: "crm".parse().unwrap(),
            connection_id: Some("c0".into()),
            unrouted: None,
            raw_seq: 7,
            index: 1,
            event_type: None,
            delivery_id: "d".into(),
            payload: serde_json::json!({}),
            traceparent: None,
            origin: Origin::Live,
        };
        for origin in [
            Origin::Replay {
                id: 3,
                target: ReplayTarget::Functions,
            },
            Origin::Redrive {
                id: 9,
                consumer: "fn:1:crm:contacts".into(),
            },
        ] {
            let event = RoutedEvent {
                origin: origin.clone(),
                ..live.clone()
            };
            assert_eq!(event.version(), live.version());
            assert_ne!(event.message_id(), live.message_id());
            let (subject, headers, payload) = event.to_message();
            assert_eq!(headers.get("Nats-Msg-Id").unwrap().as_str(), event.message_id());
            assert_eq!(
                RoutedEvent::from_message(&subject, Some(&headers), &payload).unwrap(),
                event
            );
        }
        assert_eq!(
            RoutedEvent {
                origin: Origin::Replay {
                    id: 3,
                    target: ReplayTarget::All
                },
                ..live.clone()
            }
            .message_id(),
            "7:1:c0:replay-3"
        );
        assert!(!Origin::Replay {
            id: 1,
            target: ReplayTarget::Functions
        }
        .for_forwarding());
        assert!(!Origin::Replay {
            id: 1,
            target: ReplayTarget::Forward
        }
        .for_functions());
        assert!(!Origin::Redrive {
            id: 1,
            consumer: String::new()
        }
        .for_forwarding());
        assert!(Origin::Live.for_forwarding() && Origin::Live.for_functions());
    }
}
