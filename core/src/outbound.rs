//! Calls hookyard makes out to the world (forwards to customers' apps, exec's provider
//! API calls): which destinations may be called, and how long a `Retry-After` says to wait.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;

use crate::config::ForwardingConfig;

/// Why a destination is not called.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Never allowed: not http(s), or an address the configuration does not allow.
    Forbidden(String),
    /// Its name does not resolve now (the resolver is away, or the name is not
    /// registered yet): a later attempt may find it.
    Unresolved(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Forbidden(reason) | Refusal::Unresolved(reason) => f.write_str(reason),
        }
    }
}

/// Refuses a destination that is not http(s), or that resolves to an address the
/// configuration does not allow (loopback, private, link-local, metadata…): the check
/// before an attempt, which says why. The clients of [`client_builder`] check again, on
/// the addresses they connect to.
///
/// Through a proxy the proxy resolves the name: one that resolves here is still checked
/// (a name of the internal network is refused), one that does not is left to the proxy,
/// which is then what keeps calls from reaching internal addresses.
///
/// The lookup waits at most [`LOOKUP_LIMIT`]: where only the proxy reaches outside DNS,
/// this host's resolver may never answer for an outside name, and the system's own
/// timeouts (10 s and more) would hold every forward and provider call. A name that
/// did not resolve is then left to the proxy for [`UNRESOLVED_KEPT`] without asking again.
///
/// A name whose addresses were all allowed is not looked up again for [`ALLOWED_KEPT`]:
/// a burst of deliveries to one destination asks the resolver once every few seconds,
/// not once each. (The client's resolver still checks the addresses of every new
/// connection, so a name that moves meanwhile is refused there.)
pub async fn allowed_destination(url: &str, config: &ForwardingConfig) -> Result<(), Refusal> {
    allowed_after_lookup(url, config, |host, port| async move {
        tokio::net::lookup_host((host.as_str(), port))
            .await
            .map(|addresses| addresses.map(|a| a.ip()).collect())
    })
    .await
}

/// How long the check before a call out waits for its destination's name to resolve.
pub const LOOKUP_LIMIT: Duration = Duration::from_secs(5);
/// How long a name that did not resolve is left to the proxy without a lookup.
pub const UNRESOLVED_KEPT: Duration = Duration::from_secs(60);
/// How long a name whose addresses were all allowed is taken as allowed without a lookup.
pub const ALLOWED_KEPT: Duration = Duration::from_secs(5);

/// [`allowed_destination`] with the lookup given (tests give one that never answers).
async fn allowed_after_lookup<F, L>(url: &str, config: &ForwardingConfig, lookup: L) -> Result<(), Refusal>
where
    L: FnOnce(String, u16) -> F,
    F: std::future::Future<Output = std::io::Result<Vec<IpAddr>>>,
{
    let parsed = checked_url(url, config).map_err(Refusal::Forbidden)?;
    let Some(url::Host::Domain(host)) = parsed.host() else {
        return Ok(());
    };
    let proxied = || {
        Ok(Proxies::of(config)
            .map_err(Refusal::Forbidden)?
            .proxy_for(&parsed)
            .is_some())
    };
    match NAMES.seen(host, config) {
        Some(Seen::Allowed) => return Ok(()),
        Some(Seen::Unresolved) if proxied()? => return Ok(()),
        _ => {}
    }
    let port = parsed.port_or_known_default().unwrap_or(443);
    let failure = match tokio::time::timeout(LOOKUP_LIMIT, lookup(host.to_string(), port)).await {
        Ok(Ok(addresses)) => {
            check_addresses(host, addresses, config).map_err(Refusal::Forbidden)?;
            NAMES.remember(host, config, Seen::Allowed);
            return Ok(());
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no answer within {} s", LOOKUP_LIMIT.as_secs()),
    };
    if proxied()? {
        NAMES.remember(host, config, Seen::Unresolved);
        return Ok(());
    }
    Err(Refusal::Unresolved(format!("{host} does not resolve: {failure}")))
}

/// What the check before an attempt learned of each name lately.
static NAMES: Names = Names(std::sync::Mutex::new(None));

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seen {
    /// Its addresses were all allowed (by the configuration of the entry).
    Allowed,
    /// It did not resolve here, and was left to the proxy.
    Unresolved,
}

impl Seen {
    fn kept(self) -> Duration {
        match self {
            Seen::Allowed => ALLOWED_KEPT,
            Seen::Unresolved => UNRESOLVED_KEPT,
        }
    }
}

struct Names(std::sync::Mutex<Option<Book>>);

struct Book {
    entries: HashMap<String, Entry>,
    /// Expired entries are dropped at most once per [`ALLOWED_KEPT`], not at every
    /// insert: with many destinations that would be a scan of all of them per lookup.
    pruned: tokio::time::Instant,
}

/// When (tokio's clock: tests pause it), and under which of the configuration's allowances.
struct Entry {
    seen: Seen,
    at: tokio::time::Instant,
    allowances: (bool, bool),
}

impl Names {
    fn seen(&self, host: &str, config: &ForwardingConfig) -> Option<Seen> {
        let book = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let entry = book.as_ref()?.entries.get(host)?;
        let current = entry.at.elapsed() < entry.seen.kept() && entry.allowances == allowances(config);
        current.then_some(entry.seen)
    }

    fn remember(&self, host: &str, config: &ForwardingConfig, seen: Seen) {
        let mut book = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let now = tokio::time::Instant::now();
        let book = book.get_or_insert_with(|| Book {
            entries: HashMap::new(),
            pruned: now,
        });
        if now.duration_since(book.pruned) >= ALLOWED_KEPT {
            book.entries.retain(|_, entry| entry.at.elapsed() < entry.seen.kept());
            book.pruned = now;
        }
        let entry = Entry {
            seen,
            at: now,
            allowances: allowances(config),
        };
        book.entries.insert(host.to_string(), entry);
    }
}

fn allowances(config: &ForwardingConfig) -> (bool, bool) {
    (config.allow_loopback, config.allow_private)
}

/// What can be told of a destination without resolving its name: an absolute http(s)
/// URL with a host, and when the host is an address, one the configuration allows. The
/// API checks this when a destination is set; [`allowed_destination`] checks it again
/// before each attempt, with the name resolved.
pub fn checked_url(url: &str, config: &ForwardingConfig) -> Result<url::Url, String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("scheme {} is not http or https", parsed.scheme()));
    }
    let ip = match parsed.host().ok_or("no host")? {
        url::Host::Domain(_) => return Ok(parsed),
        url::Host::Ipv4(v4) => IpAddr::V4(v4),
        url::Host::Ipv6(v6) => IpAddr::V6(v6),
    };
    match forbidden(ip, config) {
        Some(what) => Err(format!("{ip} is {what}")),
        None => Ok(parsed),
    }
}

fn check_addresses(
    host: &str,
    addresses: impl IntoIterator<Item = IpAddr>,
    config: &ForwardingConfig,
) -> Result<(), String> {
    for ip in addresses {
        if let Some(what) = forbidden(ip, config) {
            return Err(format!("{host} resolves to {ip}, {what}"));
        }
    }
    Ok(())
}

/// Makes ring the process's rustls crypto provider, once. reqwest is built without a
/// provider of its own and panics building any client (https or not) before one is
/// installed; the NATS client's TLS takes it too. [`client_builder`], [`http_builder`]
/// and telemetry's start call this, so every client is built after it.
pub fn install_tls_provider() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        // An error means another provider was installed first, which serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// An HTTP client builder for calls that are not out to the world (the CLI to the API,
/// `hookyard dev`'s demo, tests): TLS set up, the environment's proxy as curl reads it
/// but never for loopback ([`Proxies::proxy_for`]), reqwest's defaults otherwise.
pub fn http_builder() -> reqwest::ClientBuilder {
    let builder = bare_builder();
    match environment_proxy() {
        Some(proxy) => builder.proxy(proxy),
        None => builder,
    }
}

/// The environment's proxies as curl reads them, never for loopback, as one reqwest
/// proxy: [`http_builder`]'s, and the OTLP exporter's (a collector on this host is
/// reached directly). `None` for a variable that names no http(s) proxy: reqwest then
/// reads the environment itself.
pub fn environment_proxy() -> Option<reqwest::Proxy> {
    let proxies = Proxies::of(&ForwardingConfig::default()).ok()?;
    Some(Arc::new(proxies).as_reqwest())
}

fn bare_builder() -> reqwest::ClientBuilder {
    install_tls_provider();
    #[allow(clippy::disallowed_methods)] // the one place it is built
    reqwest::Client::builder()
}

/// A client of [`http_builder`]'s defaults, or why there is none ([`build_client`]).
pub fn http_client() -> Result<reqwest::Client, String> {
    build_client(http_builder())
}

/// `builder`'s client. reqwest's own error says only "builder error": this one gives its
/// causes, and on a system without CA certificates (an image without `ca-certificates`,
/// `SSL_CERT_FILE` naming a file that is not there), where no client can be built at
/// all, what to do.
pub fn build_client(builder: reqwest::ClientBuilder) -> Result<reqwest::Client, String> {
    builder.build().map_err(|error| unbuilt(&error))
}

/// Why a client could not be built ([`build_client`]), for reqwest's blocking clients too.
pub fn unbuilt(error: &reqwest::Error) -> String {
    // reqwest's own text ("builder error") says nothing its causes do not.
    let first = std::error::Error::source(error).unwrap_or(error);
    let causes = std::iter::successors(Some(first), |e| e.source());
    let mut text = format!(
        "cannot make an HTTP client: {}",
        causes.map(ToString::to_string).collect::<Vec<_>>().join(": ")
    );
    if text.contains("No CA certificates") {
        text.push_str(
            " (install the ca-certificates package, or point SSL_CERT_FILE or SSL_CERT_DIR at \
             certificates that exist)",
        );
    }
    text
}

/// An HTTP client builder for calls out (forwards, provider APIs): no redirects, the
/// configured proxy ([`Proxies`]), and a resolver that refuses forbidden addresses. A
/// connection goes to the addresses that were checked, so a name that resolves elsewhere
/// after [`allowed_destination`] (DNS rebinding) is refused as well. (An IP in the URL is
/// not resolved: the check before the attempt covers it. The proxy's own name is
/// resolved unchecked.) Fails on a proxy setting [`Proxies::of`] refuses, which
/// `Config::validate` refuses at start.
pub fn client_builder(config: &ForwardingConfig) -> Result<reqwest::ClientBuilder, String> {
    let proxies = Arc::new(Proxies::of(config)?);
    let trusted = proxies.hosts();
    Ok(bare_builder()
        .proxy(proxies.as_reqwest())
        .redirect(reqwest::redirect::Policy::none())
        .dns_resolver(GuardedResolver {
            config: Arc::new(config.clone()),
            trusted,
        }))
}

struct GuardedResolver {
    config: Arc<ForwardingConfig>,
    /// The proxies' names: where the operator sends calls, often a private address.
    trusted: Vec<String>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let config = self.config.clone();
        let trusted = self.trusted.iter().any(|host| host.eq_ignore_ascii_case(name.as_str()));
        Box::pin(async move {
            let host = name.as_str();
            let addresses: Vec<SocketAddr> = tokio::net::lookup_host((host, 0)).await?.collect();
            if !trusted {
                check_addresses(host, addresses.iter().map(SocketAddr::ip), &config)?;
            }
            Ok(Box::new(addresses.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The proxies calls out go through: `forwarding.proxy` and `forwarding.no_proxy`, each
/// falling back to the environment as curl reads it (`HTTPS_PROXY` for https
/// destinations, `HTTP_PROXY` for http ones, `ALL_PROXY` for both, lower case too;
/// `NO_PROXY`).
pub struct Proxies {
    http: Option<Route>,
    https: Option<Route>,
    /// Decides `no_proxy` (hyper-util's matcher, curl's rules); built with both proxies.
    matcher: hyper_util::client::proxy::matcher::Matcher,
    /// `no_proxy` when it lists anything, and the setting or variable it came from.
    no: Option<(&'static str, String)>,
}

/// One scheme's proxy, and the setting or variable it came from ([`Proxies::describe`]).
#[derive(Clone)]
struct Route {
    url: url::Url,
    source: &'static str,
}

impl Proxies {
    /// From the configuration and this process's environment; an error names the
    /// setting or variable whose value is not an http(s) proxy URL.
    pub fn of(config: &ForwardingConfig) -> Result<Proxies, String> {
        Self::read(config, |name| std::env::var(name).ok())
    }

    fn read(config: &ForwardingConfig, var: impl Fn(&str) -> Option<String>) -> Result<Proxies, String> {
        let first = |names: [&'static str; 2]| {
            names
                .into_iter()
                .find_map(|name| Some((name, var(name).filter(|v| !v.is_empty())?)))
        };
        let route = |source: &'static str, value: &str| proxy_url(source, value).map(|url| Route { url, source });
        let env_route = |names| first(names).map(|(source, value)| route(source, &value)).transpose();
        let (http, https) = match config.proxy.as_deref() {
            Some("") => (None, None),
            Some(proxy) => {
                let both = route("forwarding.proxy", proxy)?;
                (Some(both.clone()), Some(both))
            }
            None => {
                let all = env_route(["ALL_PROXY", "all_proxy"])?;
                (
                    env_route(["HTTP_PROXY", "http_proxy"])?.or_else(|| all.clone()),
                    env_route(["HTTPS_PROXY", "https_proxy"])?.or(all),
                )
            }
        };
        let no = match &config.no_proxy {
            Some(no) => Some(("forwarding.no_proxy", no.clone())),
            None => first(["NO_PROXY", "no_proxy"]),
        };
        let text = |route: &Option<Route>| route.as_ref().map(|r| r.url.to_string()).unwrap_or_default();
        let matcher = hyper_util::client::proxy::matcher::Matcher::builder()
            .http(text(&http))
            .https(text(&https))
            .no(no.as_ref().map(|(_, list)| list.as_str()).unwrap_or_default())
            .build();
        Ok(Proxies {
            http,
            https,
            matcher,
            no: no.filter(|(_, list)| !list.is_empty()),
        })
    }

    /// What calls out do, in words, with where each setting came from (passwords
    /// hidden); nothing when no proxy is in effect.
    pub fn describe(&self) -> Vec<String> {
        if self.http.is_none() && self.https.is_none() {
            return Vec::new();
        }
        let said = |scheme: &str, route: &Option<Route>| match route {
            Some(Route { url, source }) => format!(
                "calls out to {scheme}:// destinations go through {} ({source})",
                proxy_shown(url.as_str()).trim_end_matches('/')
            ),
            None => format!("calls out to {scheme}:// destinations go direct"),
        };
        let mut lines = vec![said("https", &self.https), said("http", &self.http)];
        if let Some((source, list)) = &self.no {
            lines.push(format!("except to {list} ({source})"));
        }
        lines
    }

    /// The proxy a call to `url` goes through, if any. Never one for a loopback
    /// destination (`localhost`, `127.0.0.0/8`, `::1`, `::ffff:127.0.0.1`): this host's own, which no proxy
    /// reaches (Go's net/http decides the same), whatever `NO_PROXY` says; `hookyard dev`'s
    /// demo calls one.
    pub fn proxy_for(&self, url: &url::Url) -> Option<&url::Url> {
        let loopback = match url.host()? {
            url::Host::Domain(name) => {
                let name = name.trim_end_matches('.').to_ascii_lowercase();
                name == "localhost" || name.ends_with(".localhost")
            }
            url::Host::Ipv4(ip) => ip.is_loopback(),
            url::Host::Ipv6(ip) => unmapped(IpAddr::V6(ip)).is_loopback(),
        };
        if loopback {
            return None;
        }
        let uri: axum::http::Uri = url.as_str().parse().ok()?;
        self.matcher.intercept(&uri)?;
        let route = match url.scheme() {
            "https" => self.https.as_ref(),
            _ => self.http.as_ref(),
        };
        route.map(|route| &route.url)
    }

    /// As reqwest takes them: each request sent where [`Proxies::proxy_for`] says, so
    /// reqwest no longer reads the environment itself and there is one decision, ours.
    fn as_reqwest(self: Arc<Self>) -> reqwest::Proxy {
        reqwest::Proxy::custom(move |url| self.proxy_for(url).cloned())
    }

    /// The proxies' host names.
    fn hosts(&self) -> Vec<String> {
        [&self.http, &self.https]
            .into_iter()
            .flatten()
            .filter_map(|route| route.url.host_str().map(str::to_string))
            .collect()
    }
}

/// Logs which proxy calls out take ([`Proxies::describe`]): at the start of the services
/// that call out. Proxy settings were checked at start; one that no longer reads is
/// said too.
pub fn log_proxies(config: &ForwardingConfig) {
    match Proxies::of(config) {
        Ok(proxies) => proxies.describe().iter().for_each(|line| tracing::info!("{line}")),
        Err(error) => tracing::warn!(%error, "proxy settings"),
    }
}

/// A proxy setting as curl reads one: `http://` when it names no scheme.
fn with_scheme(value: &str) -> String {
    if value.contains("://") {
        value.to_string()
    } else {
        format!("http://{value}")
    }
}

/// A proxy setting as messages and `hookyard config` show it: its password hidden (`""`,
/// no proxy, as it is).
pub fn proxy_shown(value: &str) -> String {
    match value {
        "" => String::new(),
        _ => crate::config::without_password(&with_scheme(value)),
    }
}

fn proxy_url(setting: &str, value: &str) -> Result<url::Url, String> {
    let shown = proxy_shown(value);
    let url = url::Url::parse(&with_scheme(value)).map_err(|e| format!("{setting} {shown:?} is not a URL: {e}"))?;
    // The matcher takes it as an `http::Uri`; one it could not read would mean no proxy.
    let readable = url.as_str().parse::<axum::http::Uri>().is_ok();
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() || !readable {
        return Err(format!(
            "{setting} {shown:?} is not an http:// or https:// proxy (calls out support those; \
             set forwarding.proxy to one, or to \"\" for none)"
        ));
    }
    Ok(url)
}

/// What kind of address `ip` is when the configuration refuses it, with the key that
/// would allow it.
fn forbidden(ip: IpAddr, config: &ForwardingConfig) -> Option<&'static str> {
    let ip = unmapped(ip);
    let loopback = ip.is_loopback();
    if loopback {
        return (!config.allow_loopback).then_some("a loopback address (forwarding.allow_loopback allows it)");
    }
    let private = match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_private() || v4.is_link_local() || (a == 100 && (64..128).contains(&b))
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            (first & 0xfe00) == 0xfc00 || (first & 0xffc0) == 0xfe80
        }
    };
    if private {
        return (!config.allow_private)
            .then_some("a private, link-local or metadata address (forwarding.allow_private allows it)");
    }
    if ip.is_unspecified() || ip.is_multicast() || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast()) {
        return Some("a non-routable address");
    }
    None
}

/// An IPv4 address written as IPv6 (`::ffff:127.0.0.1`) as the IPv4 address it reaches.
fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// Seconds, or an HTTP date.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let wait = at.with_timezone(&Utc) - Utc::now();
    Some(wait.to_std().unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_refused_unless_allowed() {
        let strict = ForwardingConfig::default();
        for ip in [
            "127.0.0.1",
            "::1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "0.0.0.0",
            "224.0.0.1",
        ] {
            assert!(forbidden(ip.parse().unwrap(), &strict).is_some(), "{ip}");
        }
        for ip in ["93.184.216.34", "2606:2800:220:1::1"] {
            assert!(forbidden(ip.parse().unwrap(), &strict).is_none(), "{ip}");
        }
        let loopback = ForwardingConfig {
            allow_loopback: true,
            ..ForwardingConfig::default()
        };
        assert!(forbidden("127.0.0.1".parse().unwrap(), &loopback).is_none());
        assert!(forbidden("10.0.0.1".parse().unwrap(), &loopback).is_some());
    }

    fn env<'a>(vars: &'a [(&str, &str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| vars.iter().find(|(n, _)| *n == name).map(|(_, v)| v.to_string())
    }

    /// Where a call to `url` goes: its proxy, or "direct".
    fn route(proxies: &Proxies, url: &str) -> String {
        proxies
            .proxy_for(&url.parse().unwrap())
            .map_or("direct".into(), |p| p.to_string())
    }

    #[test]
    fn proxies_come_from_the_settings_or_else_the_environment_as_curl_reads_it() {
        let unset = ForwardingConfig::default();
        let from_env = Proxies::read(
            &unset,
            env(&[
                ("https_proxy", "proxy.corp:3128"),
                ("HTTP_PROXY", "http://plain:8080"),
                ("NO_PROXY", "internal.example, 10.0.0.0/8"),
            ]),
        )
        .unwrap();
        assert_eq!(route(&from_env, "https://api.example.com/x"), "http://proxy.corp:3128/");
        assert_eq!(route(&from_env, "http://api.example.com/x"), "http://plain:8080/");
        assert_eq!(route(&from_env, "https://a.internal.example/x"), "direct");
        assert_eq!(route(&from_env, "http://10.1.2.3/x"), "direct");
        for loopback in [
            "http://localhost:8080/",
            "https://LocalHost./",
            "http://127.0.0.2/",
            "http://[::1]:80/",
            "http://[::ffff:127.0.0.1]:80/",
        ] {
            assert_eq!(route(&from_env, loopback), "direct", "{loopback}");
        }
        assert_eq!(from_env.hosts(), ["plain", "proxy.corp"]);
        assert_eq!(
            from_env.describe(),
            [
                "calls out to https:// destinations go through http://proxy.corp:3128 (https_proxy)",
                "calls out to http:// destinations go through http://plain:8080 (HTTP_PROXY)",
                "except to internal.example, 10.0.0.0/8 (NO_PROXY)",
            ]
        );

        let all = Proxies::read(&unset, env(&[("ALL_PROXY", "https://u:p@all:8443")])).unwrap();
        assert_eq!(route(&all, "https://api.example.com/"), "https://u:p@all:8443/");
        assert_eq!(route(&all, "http://api.example.com/"), "https://u:p@all:8443/");

        let set = ForwardingConfig {
            proxy: Some("http://set:3128".into()),
            no_proxy: Some("example.com".into()),
            ..ForwardingConfig::default()
        };
        let vars = env(&[("HTTPS_PROXY", "http://env:1"), ("NO_PROXY", "other.org")]);
        let overridden = Proxies::read(&set, vars).unwrap();
        assert_eq!(overridden.describe()[2], "except to example.com (forwarding.no_proxy)");
        assert_eq!(route(&overridden, "https://api.example.com/"), "direct");
        assert_eq!(route(&overridden, "https://other.org/"), "http://set:3128/");

        let off = ForwardingConfig {
            proxy: Some(String::new()),
            ..ForwardingConfig::default()
        };
        let vars = env(&[("HTTPS_PROXY", "http://env:1"), ("HTTP_PROXY", "http://env:1")]);
        let off = Proxies::read(&off, vars).unwrap();
        assert_eq!(route(&off, "https://other.org/"), "direct");
        assert_eq!(route(&off, "http://other.org/"), "direct");
        assert!(off.describe().is_empty());
        assert_eq!(
            route(&Proxies::read(&unset, env(&[])).unwrap(), "https://other.org/"),
            "direct"
        );
    }

    #[test]
    fn a_proxy_that_is_not_http_is_refused_naming_its_setting_or_variable() {
        let unset = ForwardingConfig::default();
        let error = Proxies::read(&unset, env(&[("HTTPS_PROXY", "socks5h://u:secret@s:1080")]))
            .err()
            .unwrap();
        assert!(
            error.starts_with("HTTPS_PROXY \"socks5h://u:(hidden)@s:1080\" is not an http:// or https:// proxy"),
            "{error}"
        );
        let hostless = ForwardingConfig {
            proxy: Some("http://".into()),
            ..ForwardingConfig::default()
        };
        let error = Proxies::read(&hostless, env(&[])).err().unwrap();
        assert!(error.starts_with("forwarding.proxy \"http://\""), "{error}");
        assert_eq!(proxy_shown("u:pw@proxy:3128"), "http://u:(hidden)@proxy:3128");
        assert_eq!(proxy_shown(""), "");
    }

    /// The client's own resolver refuses a name that resolves to loopback, whatever was
    /// checked before: what a rebinding name would resolve to at connection time.
    #[tokio::test]
    async fn the_client_connects_only_to_addresses_it_checked() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://localhost:{}/", listener.local_addr().unwrap().port());
        tokio::spawn(async move {
            // Answers the first request on each connection (a GET fits in one read).
            while let Ok((mut socket, _)) = listener.accept().await {
                use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                let _ = socket.read(&mut [0; 4096]).await;
                let _ = socket
                    .write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
                    .await;
            }
        });
        let strict = client_builder(&ForwardingConfig::default()).unwrap().build().unwrap();
        let error = strict.get(&url).send().await.unwrap_err();
        let chain = std::iter::successors(Some(&error as &dyn std::error::Error), |e| e.source())
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join(": ");
        assert!(
            chain.contains("localhost resolves to") && chain.contains("loopback"),
            "{chain}"
        );

        let loopback = ForwardingConfig {
            allow_loopback: true,
            ..ForwardingConfig::default()
        };
        let allowed = client_builder(&loopback).unwrap().build().unwrap();
        assert_eq!(allowed.get(&url).send().await.unwrap().status(), 204);
    }

    /// A resolver that never answers holds the check [`LOOKUP_LIMIT`], no more: a call
    /// that goes direct fails (it is retried), one through a proxy is left to the proxy,
    /// and its name is for [`UNRESOLVED_KEPT`] without a lookup.
    #[tokio::test(start_paused = true)]
    async fn a_lookup_that_never_answers_is_given_up() {
        type Lookup = std::future::Ready<std::io::Result<Vec<IpAddr>>>;
        let never = |_: String, _: u16| std::future::pending::<std::io::Result<Vec<IpAddr>>>();
        let not_again = |_: String, _: u16| -> Lookup { panic!("looked up again") };
        let direct = ForwardingConfig {
            proxy: Some(String::new()),
            ..Default::default()
        };
        let through = ForwardingConfig {
            proxy: Some("http://proxy.corp:3128".into()),
            no_proxy: Some(String::new()),
            ..Default::default()
        };
        let started = tokio::time::Instant::now();
        match allowed_after_lookup("https://silent.example/hook", &direct, never).await {
            Err(Refusal::Unresolved(reason)) => {
                assert_eq!(reason, "silent.example does not resolve: no answer within 5 s")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(started.elapsed(), LOOKUP_LIMIT);

        assert_eq!(
            allowed_after_lookup("https://silent.example/hook", &through, never).await,
            Ok(())
        );
        assert_eq!(started.elapsed(), LOOKUP_LIMIT * 2);
        assert_eq!(
            allowed_after_lookup("https://silent.example/b", &through, not_again).await,
            Ok(())
        );
        // A call that goes direct still needs the name: it asks.
        let answered = |_: String, _: u16| std::future::ready(Ok(vec!["93.184.216.34".parse().unwrap()]));
        assert_eq!(
            allowed_after_lookup("https://silent.example/c", &direct, answered).await,
            Ok(())
        );
        // A name that resolves to an internal address is refused through the proxy too.
        let internal = |_: String, _: u16| std::future::ready(Ok(vec!["10.0.0.7".parse().unwrap()]));
        assert!(matches!(
            allowed_after_lookup("https://db.corp.example/", &through, internal).await,
            Err(Refusal::Forbidden(_))
        ));

        tokio::time::advance(UNRESOLVED_KEPT).await;
        let asked = std::sync::atomic::AtomicBool::new(false);
        let again = |_: String, _: u16| {
            asked.store(true, std::sync::atomic::Ordering::Relaxed);
            std::future::ready(Ok(vec!["10.0.0.8".parse().unwrap()]))
        };
        assert!(matches!(
            allowed_after_lookup("https://silent.example/hook", &through, again).await,
            Err(Refusal::Forbidden(_))
        ));
        assert!(asked.into_inner(), "looked up again once the name was kept a minute");
    }

    /// A name whose addresses were all allowed is taken as allowed for [`ALLOWED_KEPT`]
    /// under the same allowances, without a lookup; a refused one is looked up each time.
    #[tokio::test(start_paused = true)]
    async fn an_allowed_name_is_looked_up_once_every_few_seconds() {
        let lookups = &std::sync::atomic::AtomicUsize::new(0);
        let resolving_to = |ip: &'static str| {
            move |_: String, _: u16| {
                lookups.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                std::future::ready(Ok(vec![ip.parse::<IpAddr>().unwrap()]))
            }
        };
        let looked_up = || lookups.load(std::sync::atomic::Ordering::Relaxed);
        let url = "https://api.kept.example/x";
        let strict = ForwardingConfig::default();
        for _ in 0..3 {
            assert_eq!(
                allowed_after_lookup(url, &strict, resolving_to("93.184.216.34")).await,
                Ok(())
            );
        }
        assert_eq!(looked_up(), 1);

        // Moved to an internal address: refused at the next lookup, and looked up again.
        tokio::time::advance(ALLOWED_KEPT).await;
        for _ in 0..2 {
            let refused = allowed_after_lookup(url, &strict, resolving_to("10.0.0.9")).await;
            assert!(matches!(refused, Err(Refusal::Forbidden(_))), "{refused:?}");
        }
        assert_eq!(looked_up(), 3);
        // Allowed under other allowances is not allowed under these.
        let private = ForwardingConfig {
            allow_private: true,
            ..Default::default()
        };
        assert_eq!(
            allowed_after_lookup(url, &private, resolving_to("10.0.0.9")).await,
            Ok(())
        );
        let refused = allowed_after_lookup(url, &strict, resolving_to("10.0.0.9")).await;
        assert!(matches!(refused, Err(Refusal::Forbidden(_))), "{refused:?}");
        assert_eq!(looked_up(), 5);
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after("soon"), None);
        let later = (Utc::now() + chrono::Duration::seconds(30)).to_rfc2822();
        let wait = parse_retry_after(&later).unwrap();
        assert!(
            wait > Duration::from_secs(25) && wait <= Duration::from_secs(30),
            "{wait:?}"
        );
    }
}
