//! Handshakes: requests a provider sends to check the URL, answered synchronously by
//! ingest and never published (they are not events). Each rule says which requests it
//! takes (`method`, `when`) and how to answer (`with`).

use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::Value;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::extract::Source;
use super::request::Inbound;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandshakeSpec {
    /// Only requests of this method.
    #[serde(default)]
    pub method: Option<String>,
    /// Only when this source is present; `source=value` when it must equal `value`.
    #[serde(default)]
    pub when: Option<String>,
    pub respond: Respond,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "with", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Respond {
    /// 200 with `value` as the body, or in the response header `header`.
    Echo {
        value: Source,
        #[serde(default = "text_plain")]
        content_type: String,
        #[serde(default)]
        header: Option<String>,
    },
    /// Zoom: `{"plainToken": value, "encryptedToken": hex HMAC-SHA256(secret, value)}`.
    HmacToken { value: Source },
    /// Meta: echo `value` when `token` equals the integration setting `setting`.
    VerifyToken {
        value: Source,
        token: Source,
        setting: String,
    },
    /// Just a status.
    Status { status: u16 },
}

fn text_plain() -> String {
    "text/plain".into()
}

/// The synchronous answer to a handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeAnswer {
    pub status: u16,
    pub content_type: Option<String>,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeRefused {
    #[error("the handshake needs the integration's webhook secret, and none is set")]
    NoSecret,
    #[error("the handshake's verify token does not match the integration setting {0:?}")]
    WrongToken(String),
    #[error("the handshake request lacks {0}")]
    Incomplete(String),
}

impl HandshakeSpec {
    pub fn check(&self) -> Result<(), String> {
        if let Some(when) = &self.when {
            let source = when.split_once('=').map_or(when.as_str(), |(s, _)| s);
            source.parse::<Source>().map_err(|e| format!("handshake.when: {e}"))?;
        }
        Ok(())
    }

    fn matches(&self, request: &Inbound<'_>) -> bool {
        if self
            .method
            .as_deref()
            .is_some_and(|m| !m.eq_ignore_ascii_case(request.method))
        {
            return false;
        }
        let Some(when) = &self.when else { return true };
        let (source, wanted) = match when.split_once('=') {
            Some((source, value)) => (source, Some(value)),
            None => (when.as_str(), None),
        };
        let Ok(source) = source.parse::<Source>() else {
            return false;
        };
        match (source.first(request, None), wanted) {
            (Some(found), Some(wanted)) => found == wanted,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }

    fn answer(
        &self,
        request: &Inbound<'_>,
        secret: Option<&str>,
        settings: &Value,
    ) -> Result<HandshakeAnswer, HandshakeRefused> {
        let read = |source: &Source| {
            source
                .first(request, None)
                .ok_or_else(|| HandshakeRefused::Incomplete(source.to_string()))
        };
        Ok(match &self.respond {
            Respond::Echo {
                value,
                content_type,
                header,
            } => {
                let value = read(value)?;
                match header {
                    Some(name) => HandshakeAnswer {
                        status: 200,
                        content_type: None,
                        headers: vec![(name.clone(), value)],
                        body: Vec::new(),
                    },
                    None => HandshakeAnswer {
                        status: 200,
                        content_type: Some(content_type.clone()),
                        headers: Vec::new(),
                        body: value.into_bytes(),
                    },
                }
            }
            Respond::HmacToken { value } => {
                let plain = read(value)?;
                let secret = secret.ok_or(HandshakeRefused::NoSecret)?;
                let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
                mac.update(plain.as_bytes());
                let encrypted = hex::encode(mac.finalize().into_bytes());
                let body = serde_json::json!({"plainToken": plain, "encryptedToken": encrypted});
                HandshakeAnswer {
                    status: 200,
                    content_type: Some("application/json".into()),
                    headers: Vec::new(),
                    body: serde_json::to_vec(&body).expect("JSON serialises"),
                }
            }
            Respond::VerifyToken { value, token, setting } => {
                let expected = settings.get(setting).and_then(Value::as_str).unwrap_or_default();
                let given = read(token)?;
                if expected.is_empty() || !bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
                    return Err(HandshakeRefused::WrongToken(setting.clone()));
                }
                HandshakeAnswer {
                    status: 200,
                    content_type: Some("text/plain".into()),
                    headers: Vec::new(),
                    body: read(value)?.into_bytes(),
                }
            }
            Respond::Status { status } => HandshakeAnswer {
                status: *status,
                content_type: None,
                headers: Vec::new(),
                body: Vec::new(),
            },
        })
    }
}

/// The answer of the first handshake rule that takes `request`; `None` when the request
/// is not a handshake.
pub fn answer(
    rules: &[HandshakeSpec],
    request: &Inbound<'_>,
    secret: Option<&str>,
    settings: &Value,
) -> Option<Result<HandshakeAnswer, HandshakeRefused>> {
    rules
        .iter()
        .find(|rule| rule.matches(request))
        .map(|rule| rule.answer(request, secret, settings))
}
