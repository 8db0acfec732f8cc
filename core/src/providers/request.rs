//! A received webhook as the provider rules see it. The body is parsed once, lazily:
//! JSON when it is JSON; a form (`a=1&b=2`) becomes an object of its fields, and a form
//! whose `payload` field holds JSON (Slack's interactive requests) becomes that JSON.

use std::sync::OnceLock;

use serde_json::{Map, Value};

use crate::Envelope;

pub struct Inbound<'a> {
    pub method: &'a str,
    /// The URL the provider called, as it called it (scheme, host, path, query); some
    /// providers sign it.
    pub url: Option<&'a str>,
    /// Names lower-case.
    pub headers: &'a [(String, String)],
    pub query: Option<&'a str>,
    pub body: &'a [u8],
    parsed: OnceLock<Option<Value>>,
}

impl<'a> Inbound<'a> {
    pub fn new(
        method: &'a str,
        url: Option<&'a str>,
        headers: &'a [(String, String)],
        query: Option<&'a str>,
        body: &'a [u8],
    ) -> Inbound<'a> {
        Inbound {
            method,
            url,
            headers,
            query,
            body,
            parsed: OnceLock::new(),
        }
    }

    pub fn from_envelope(envelope: &'a Envelope) -> Inbound<'a> {
        Inbound::new(
            &envelope.method,
            None,
            &envelope.headers,
            envelope.query.as_deref(),
            &envelope.body,
        )
    }

    /// The first value of a header (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&'a str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of a header, in order.
    pub fn header_values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'a str> + 's {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The first value of a query parameter, decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        form_urlencoded::parse(self.query?.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }

    /// The body's form fields (decoded), when it is a form.
    pub fn form(&self) -> Vec<(String, String)> {
        if !self.is_form() {
            return Vec::new();
        }
        form_urlencoded::parse(self.body)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    }

    fn is_form(&self) -> bool {
        self.header("content-type")
            .is_some_and(|t| t.trim_start().starts_with("application/x-www-form-urlencoded"))
    }

    /// The parsed body (see the module comment); `None` when it is neither.
    pub fn json(&self) -> Option<&Value> {
        self.parsed
            .get_or_init(|| parse_body(self.body, self.is_form()))
            .as_ref()
    }
}

fn parse_body(body: &[u8], is_form: bool) -> Option<Value> {
    if let Ok(value) = serde_json::from_slice::<Value>(body) {
        return Some(value);
    }
    if !is_form {
        return None;
    }
    let mut fields = Map::new();
    for (key, value) in form_urlencoded::parse(body) {
        fields.insert(key.into_owned(), Value::String(value.into_owned()));
    }
    if let Some(Value::String(payload)) = fields.get("payload") {
        if let Ok(json) = serde_json::from_str::<Value>(payload) {
            return Some(json);
        }
    }
    Some(Value::Object(fields))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form_headers() -> Vec<(String, String)> {
        vec![("content-type".into(), "application/x-www-form-urlencoded".into())]
    }

    #[test]
    fn bodies_parse_as_json_forms_and_form_payloads() {
        let none: Vec<(String, String)> = vec![];
        let json = Inbound::new("POST", None, &none, None, br#"{"a":{"b":1}}"#);
        assert_eq!(json.json().unwrap()["a"]["b"], 1);
        let headers = form_headers();
        let form = Inbound::new("POST", None, &headers, None, b"team_id=T1&text=a+b%21");
        assert_eq!(form.json().unwrap()["text"], "a b!");
        let payload = Inbound::new(
            "POST",
            None,
            &headers,
            None,
            b"payload=%7B%22team%22%3A%7B%22id%22%3A%22T9%22%7D%7D",
        );
        assert_eq!(payload.json().unwrap()["team"]["id"], "T9");
        let binary = Inbound::new("POST", None, &none, None, b"\xff\x00");
        assert!(binary.json().is_none());
    }
}
