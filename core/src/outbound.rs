//! Calls hookyard makes out to the world (forwards to customers' apps, exec's provider
//! API calls): which destinations may be called, and how long a `Retry-After` says to wait.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;

use crate::config::ForwardingConfig;

/// Refuses a destination that is not http(s), or that resolves to an address the
/// configuration does not allow (loopback, private, link-local, metadata…): the check
/// before an attempt, which says why. The clients of [`client_builder`] check again, on
/// the addresses they connect to.
pub async fn allowed_destination(url: &str, config: &ForwardingConfig) -> Result<(), String> {
    let parsed = checked_url(url, config)?;
    let Some(url::Host::Domain(host)) = parsed.host() else {
        return Ok(());
    };
    let port = parsed.port_or_known_default().unwrap_or(443);
    let addresses = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("{host} does not resolve: {e}"))?
        .map(|a| a.ip());
    check_addresses(host, addresses, config)
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
/// tests): TLS set up, reqwest's defaults otherwise.
pub fn http_builder() -> reqwest::ClientBuilder {
    install_tls_provider();
    #[allow(clippy::disallowed_methods)] // the one place it is built
    reqwest::Client::builder()
}

/// A client of [`http_builder`]'s defaults.
pub fn http_client() -> reqwest::Client {
    http_builder().build().expect("a client with reqwest's defaults builds")
}

/// An HTTP client builder for calls out (forwards, provider APIs): no redirects, and a
/// resolver that refuses forbidden addresses. A connection goes to the addresses that
/// were checked, so a name that resolves elsewhere after [`allowed_destination`] (DNS
/// rebinding) is refused as well. (An IP in the URL is not resolved: the check before
/// the attempt covers it.)
pub fn client_builder(config: &ForwardingConfig) -> reqwest::ClientBuilder {
    http_builder()
        .redirect(reqwest::redirect::Policy::none())
        .dns_resolver(GuardedResolver(Arc::new(config.clone())))
}

struct GuardedResolver(Arc<ForwardingConfig>);

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let config = self.0.clone();
        Box::pin(async move {
            let host = name.as_str();
            let addresses: Vec<SocketAddr> = tokio::net::lookup_host((host, 0)).await?.collect();
            check_addresses(host, addresses.iter().map(SocketAddr::ip), &config)?;
            Ok(Box::new(addresses.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// What kind of address `ip` is when the configuration refuses it, with the key that
/// would allow it.
fn forbidden(ip: IpAddr, config: &ForwardingConfig) -> Option<&'static str> {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
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
        let strict = client_builder(&ForwardingConfig::default()).build().unwrap();
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
        let allowed = client_builder(&loopback).build().unwrap();
        assert_eq!(allowed.get(&url).send().await.unwrap().status(), 204);
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
