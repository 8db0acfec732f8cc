//! From one received webhook to its events: split a batched body, order the events
//! where the provider asks for it, read each event's type, and read what routes it.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::Value;

use super::extract::{at_path, Source};
use super::request::Inbound;
use super::Provider;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RouteBy {
    /// A value read from the event matched against each connection's `match` key.
    Value,
    /// The connection id itself is in the request (a query parameter, a header).
    ConnectionId,
    /// The provider names no account: every connection of the integration.
    #[default]
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transform {
    /// `https://acme.atlassian.net/rest/api/2/issue/1` → `https://acme.atlassian.net`.
    UrlOrigin,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingSpec {
    #[serde(default)]
    pub by: RouteBy,
    /// Where the value is, tried in order.
    #[serde(default)]
    pub source: Vec<Source>,
    /// `connection_config.{key}` or `metadata.{key}`: what a `value` is matched against
    /// (equal as text, or a member when the connection holds an array).
    #[serde(default, rename = "match")]
    pub target: Option<String>,
    #[serde(default)]
    pub transform: Option<Transform>,
}

/// Where a connection keeps the value an event is matched against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RoutingTarget {
    ConnectionConfig(String),
    Metadata(String),
}

impl RoutingSpec {
    pub fn check(&self) -> Result<(), String> {
        match self.by {
            RouteBy::All => Ok(()),
            RouteBy::ConnectionId if self.source.is_empty() => Err("routing: connection-id needs `source`".into()),
            RouteBy::ConnectionId => Ok(()),
            RouteBy::Value if self.source.is_empty() => Err("routing: value needs `source`".into()),
            RouteBy::Value => self.target().map(|_| ()),
        }
    }

    /// The parsed `match`.
    pub fn target(&self) -> Result<RoutingTarget, String> {
        let text = self.target.as_deref().ok_or("routing: value needs `match`")?;
        match text.split_once('.') {
            Some(("connection_config", key)) if !key.is_empty() => Ok(RoutingTarget::ConnectionConfig(key.into())),
            Some(("metadata", key)) if !key.is_empty() => Ok(RoutingTarget::Metadata(key.into())),
            _ => Err(format!(
                "routing.match {text:?} is not connection_config.KEY or metadata.KEY"
            )),
        }
    }
}

/// Which connections an event goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// The connections whose target holds one of these values.
    Values(RoutingTarget, Vec<String>),
    /// These connection ids.
    ConnectionIds(Vec<String>),
    /// Every live connection of the integration.
    All,
    /// The rule found nothing to route by in this event.
    Missing,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The event's place in the output (batch order, after any reordering).
    pub index: u32,
    pub event_type: Option<String>,
    pub payload: Value,
    pub route: Route,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderSpec {
    /// Events with the same value here are one object's events.
    pub group: String,
    /// A body path and a suffix: one object's events whose value ends with it go first
    /// (HubSpot: `subscriptionType` ending in `.creation`).
    #[serde(default)]
    pub first: Option<(String, String)>,
    /// Then by this numeric body path (HubSpot: `occurredAt`).
    pub by: String,
}

/// The elements of a batched body (the body itself when the provider does not batch).
pub fn batch_elements<'r>(provider: &Provider, request: &'r Inbound<'_>) -> Vec<&'r Value> {
    match (&provider.batch, request.json()) {
        (Some(path), Some(body)) => match at_path(body, path) {
            Some(Value::Array(items)) if !items.is_empty() => items.iter().collect(),
            _ => vec![body],
        },
        (None, Some(body)) => vec![body],
        (_, None) => Vec::new(),
    }
}

/// The events of `request` under `provider`'s rules.
pub fn events(provider: &Provider, request: &Inbound<'_>) -> Vec<Event> {
    let payloads: Vec<Value> = match request.json() {
        Some(_) => batch_elements(provider, request).into_iter().cloned().collect(),
        None => vec![Value::String(String::from_utf8_lossy(request.body).into_owned())],
    };
    let payloads = match &provider.order {
        Some(order) => reorder(payloads, order),
        None => payloads,
    };
    payloads
        .into_iter()
        .enumerate()
        .map(|(index, payload)| {
            let event_type = provider
                .event_type
                .as_ref()
                .and_then(|t| t.render(request, Some(&payload)));
            let route = route(&provider.routing, request, &payload);
            Event {
                index: index as u32,
                event_type,
                payload,
                route,
            }
        })
        .collect()
}

fn route(spec: &RoutingSpec, request: &Inbound<'_>, event: &Value) -> Route {
    let found = || {
        spec.source
            .iter()
            .map(|source| source.values(request, Some(event)))
            .find(|values| !values.is_empty())
            .map(|values| match spec.transform {
                Some(Transform::UrlOrigin) => values.iter().filter_map(|v| url_origin(v)).collect(),
                None => values,
            })
            .filter(|values: &Vec<String>| !values.is_empty())
    };
    match spec.by {
        RouteBy::All => Route::All,
        RouteBy::ConnectionId => found().map_or(Route::Missing, Route::ConnectionIds),
        RouteBy::Value => match (spec.target(), found()) {
            (Ok(target), Some(values)) => Route::Values(target, values),
            _ => Route::Missing,
        },
    }
}

fn url_origin(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let host = rest.split(['/', '?', '#']).next()?;
    (!host.is_empty()).then(|| format!("{scheme}://{host}"))
}

/// Within each group, `first` events then the rest by `by`; every group keeps the
/// places its events had, so the batch order between objects does not change.
fn reorder(payloads: Vec<Value>, order: &OrderSpec) -> Vec<Value> {
    let group_of = |v: &Value| at_path(v, &order.group).map(|g| g.to_string()).unwrap_or_default();
    let mut places: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, payload) in payloads.iter().enumerate() {
        places.entry(group_of(payload)).or_default().push(i);
    }
    let mut out: Vec<Option<Value>> = vec![None; payloads.len()];
    let mut slots = payloads.into_iter().map(Some).collect::<Vec<_>>();
    for positions in places.values() {
        let mut members: Vec<Value> = positions.iter().filter_map(|&i| slots[i].take()).collect();
        members.sort_by_key(|v| {
            let later = order.first.as_ref().is_some_and(|(path, suffix)| {
                !at_path(v, path)
                    .and_then(Value::as_str)
                    .is_some_and(|s| s.ends_with(suffix.as_str()))
            });
            let at = at_path(v, &order.by).and_then(Value::as_i64).unwrap_or(i64::MAX);
            (later, at)
        });
        for (&place, member) in positions.iter().zip(members) {
            out[place] = Some(member);
        }
    }
    out.into_iter().flatten().collect()
}
