//! Where a rule reads a value: a source is `body:a.b.0.c` (the event: a batch element,
//! or the whole body), `root:a.b` (the whole body, even inside a batch),
//! `header:X-Name`, `query:name`, `form:name` or `fixed:text`. `a | b` tries each in
//! turn. A template embeds sources in text: `{header:X-GitHub-Event}.{body:action}`.

use std::fmt;

use serde::Deserialize;
use serde_json::Value;

use super::request::Inbound;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Body,
    Root,
    Header,
    Query,
    Form,
    Fixed,
}

/// One or more alternative places to read a value from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Source {
    alternatives: Vec<(Kind, String)>,
}

impl TryFrom<String> for Source {
    type Error = String;
    fn try_from(text: String) -> Result<Source, String> {
        text.parse()
    }
}

impl std::str::FromStr for Source {
    type Err = String;
    fn from_str(text: &str) -> Result<Source, String> {
        let mut alternatives = Vec::new();
        for part in text.split('|').map(str::trim) {
            let (kind, name) = part
                .split_once(':')
                .ok_or_else(|| format!("source {part:?} has no kind (body:, root:, header:, query:, form:, fixed:)"))?;
            let kind = match kind {
                "body" => Kind::Body,
                "root" => Kind::Root,
                "header" => Kind::Header,
                "query" => Kind::Query,
                "form" => Kind::Form,
                "fixed" => Kind::Fixed,
                other => {
                    return Err(format!(
                        "source kind {other:?} is not one of body, root, header, query, form, fixed"
                    ))
                }
            };
            if name.is_empty() && kind != Kind::Fixed {
                return Err(format!("source {part:?} names nothing"));
            }
            alternatives.push((kind, name.to_string()));
        }
        Ok(Source { alternatives })
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (kind, name)) in self.alternatives.iter().enumerate() {
            let kind = format!("{kind:?}").to_lowercase();
            write!(f, "{}{kind}:{name}", if i > 0 { " | " } else { "" })?;
        }
        Ok(())
    }
}

impl Source {
    /// The first alternative present, as text(s): a scalar gives one value, an array of
    /// scalars its elements; objects give nothing.
    pub fn values(&self, request: &Inbound<'_>, event: Option<&Value>) -> Vec<String> {
        for (kind, name) in &self.alternatives {
            let found: Vec<String> = match kind {
                Kind::Body => event
                    .or(request.json())
                    .map(|v| scalars(at_path(v, name)))
                    .unwrap_or_default(),
                Kind::Root => request.json().map(|v| scalars(at_path(v, name))).unwrap_or_default(),
                Kind::Header => request.header(name).map(|v| vec![v.to_string()]).unwrap_or_default(),
                Kind::Query => request.query_param(name).into_iter().collect(),
                Kind::Form => request
                    .form()
                    .into_iter()
                    .filter(|(k, _)| k == name)
                    .map(|(_, v)| v)
                    .collect(),
                Kind::Fixed => vec![name.clone()],
            };
            if !found.is_empty() {
                return found;
            }
        }
        Vec::new()
    }

    pub fn first(&self, request: &Inbound<'_>, event: Option<&Value>) -> Option<String> {
        self.values(request, event).into_iter().next()
    }
}

/// The value at a dot path (`a.b.0.c`; `$` or empty is the value itself).
pub fn at_path<'v>(value: &'v Value, path: &str) -> Option<&'v Value> {
    if path.is_empty() || path == "$" {
        return Some(value);
    }
    path.split('.').try_fold(value, |current, key| match current {
        Value::Object(map) => map.get(key),
        Value::Array(items) => key.parse::<usize>().ok().and_then(|i| items.get(i)),
        _ => None,
    })
}

fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A value as text(s): a scalar as itself, an array by its scalar members; objects and
/// null give nothing.
pub fn scalars(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::Array(items)) => items.iter().filter_map(scalar).collect(),
        Some(other) => scalar(other).into_iter().collect(),
        None => Vec::new(),
    }
}

/// Text with `{source}` placeholders. A placeholder whose source is absent is left
/// out together with the separator before it (`{a}.{b}` with no `b` gives `a`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Template {
    /// Literal text before each placeholder, the placeholders, and the text after the last.
    parts: Vec<(String, Source)>,
    tail: String,
}

impl TryFrom<String> for Template {
    type Error = String;
    fn try_from(text: String) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = text.as_str();
        while let Some(open) = rest.find('{') {
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("template {text:?} has an unclosed {{"))?;
            let source: Source = rest[open + 1..open + close].parse()?;
            parts.push((rest[..open].to_string(), source));
            rest = &rest[open + close + 1..];
        }
        Ok(Template {
            parts,
            tail: rest.to_string(),
        })
    }
}

impl Template {
    /// The rendered text; `None` when no placeholder had a value.
    pub fn render(&self, request: &Inbound<'_>, event: Option<&Value>) -> Option<String> {
        let mut out = String::new();
        let mut any = false;
        for (i, (literal, source)) in self.parts.iter().enumerate() {
            let Some(value) = source.first(request, event) else {
                continue;
            };
            if i == 0 || any {
                out.push_str(literal);
            }
            out.push_str(&value);
            any = true;
        }
        if !any && !self.parts.is_empty() {
            return None;
        }
        out.push_str(&self.tail);
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sources_read_bodies_headers_and_queries() {
        let headers = vec![("x-github-event".to_string(), "issues".to_string())];
        let request = Inbound::new(
            "POST",
            None,
            &headers,
            Some("connection_id=c%201&x=1"),
            br#"{"installation":{"id":957387},"tags":["a","b"],"events":[{"n":1}]}"#,
        );
        let source = |s: &str| s.parse::<Source>().unwrap();
        assert_eq!(source("body:installation.id").values(&request, None), ["957387"]);
        assert_eq!(source("body:missing | body:tags").values(&request, None), ["a", "b"]);
        assert_eq!(source("body:events.0.n").values(&request, None), ["1"]);
        assert_eq!(source("header:X-GitHub-Event").first(&request, None).unwrap(), "issues");
        assert_eq!(source("query:connection_id").first(&request, None).unwrap(), "c 1");
        let element = json!({"portalId": 62515});
        assert_eq!(
            source("body:portalId").first(&request, Some(&element)).unwrap(),
            "62515"
        );
        assert_eq!(
            source("root:installation.id").first(&request, Some(&element)).unwrap(),
            "957387"
        );
        assert!("nokind".parse::<Source>().is_err());
        assert!("disk:x".parse::<Source>().is_err());
    }

    #[test]
    fn templates_drop_absent_parts_with_their_separator() {
        let headers = vec![("x-github-event".to_string(), "issues".to_string())];
        let with = Inbound::new("POST", None, &headers, None, br#"{"action":"opened"}"#);
        let without = Inbound::new("POST", None, &headers, None, br#"{}"#);
        let template = Template::try_from("{header:x-github-event}.{body:action}".to_string()).unwrap();
        assert_eq!(template.render(&with, None).unwrap(), "issues.opened");
        assert_eq!(template.render(&without, None).unwrap(), "issues");
        let nothing = Template::try_from("{body:type}".to_string()).unwrap();
        assert_eq!(nothing.render(&without, None), None);
        assert!(Template::try_from("{body:x".to_string()).is_err());
    }
}
