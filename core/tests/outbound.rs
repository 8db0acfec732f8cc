//! Calls out (forwards to customers' apps, provider APIs, OAuth2 token refreshes: every
//! client made by `outbound::client_builder`) reach https destinations, verifying their
//! certificates against the system's roots, which `SSL_CERT_FILE` can name; and they go
//! through the configured proxy, which resolves the names this host cannot.

use std::path::PathBuf;
use std::sync::Arc;

use hookyard_core::config::ForwardingConfig;
use hookyard_core::outbound::{allowed_destination, client_builder, http_client, Refusal};
use hookyard_testkit::proxy::ForwardProxy;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls")
        .join(name)
}

/// A TLS acceptor presenting the fixture certificate `name`.pem.
fn acceptor(name: &str) -> TlsAcceptor {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(fixture(&format!("{name}.pem")))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(fixture(&format!("{name}.key"))).unwrap();
    let config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    TlsAcceptor::from(Arc::new(config))
}

/// An https server on loopback presenting `name`.pem; answers each request 200 `ok`.
/// Returns its URL (by name, so the certificate's name is checked too).
async fn https_server(name: &str) -> String {
    let acceptor = acceptor(name);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://localhost:{}/hook", listener.local_addr().unwrap().port());
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A refused handshake (the client distrusting the certificate) ends here.
                let Ok(mut tls) = acceptor.accept(socket).await else {
                    return;
                };
                let _ = tls.read(&mut [0; 4096]).await;
                let _ = tls
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                    .await;
                let _ = tls.shutdown().await;
            });
        }
    });
    url
}

/// What the proxy tests call: an https server on loopback (the test CA trusted), by its
/// loopback URL and as `app.invalid`, a name only the tests' proxy resolves.
struct App {
    url: String,
    outside: String,
    port: u16,
}

async fn app() -> App {
    trust_the_test_ca();
    let url = https_server("localhost").await;
    let port = url::Url::parse(&url).unwrap().port().unwrap();
    App {
        url,
        outside: format!("https://app.invalid:{port}/hook"),
        port,
    }
}

fn error_chain(error: &reqwest::Error) -> String {
    std::iter::successors(Some(error as &dyn std::error::Error), |e| e.source())
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}

/// Sets the process's `SSL_CERT_FILE` to the test CA, as an operator trusting a private
/// CA would; before any client of the test exists (nextest runs each test in a process
/// of its own).
fn trust_the_test_ca() {
    std::env::set_var("SSL_CERT_FILE", fixture("ca.pem"));
}

#[tokio::test]
async fn calls_out_reach_https_destinations_and_check_their_certificates() {
    trust_the_test_ca();
    let config = ForwardingConfig {
        allow_loopback: true,
        ..ForwardingConfig::default()
    };
    let client = client_builder(&config).unwrap().build().unwrap();

    let trusted = https_server("localhost").await;
    let response = client.post(&trusted).body("{}").send().await.unwrap_or_else(|e| {
        panic!(
            "an https destination whose certificate the roots vouch for: {}",
            error_chain(&e)
        )
    });
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "ok");

    // Verification is on: a certificate no root vouches for is refused, saying why.
    let untrusted = https_server("untrusted").await;
    let error = client.post(&untrusted).body("{}").send().await.unwrap_err();
    let chain = error_chain(&error);
    assert!(chain.contains("invalid peer certificate"), "{chain}");
}

/// https through the proxy is a `CONNECT` tunnel, the certificate still checked end to
/// end (`app.invalid`: a name only the proxy resolves); a loopback destination is called
/// directly whatever the proxy settings.
#[tokio::test]
async fn https_goes_through_the_proxys_tunnel_and_loopback_destinations_go_direct() {
    let App { url, outside, port } = app().await;
    let proxy = ForwardProxy::start(([127, 0, 0, 1], port).into()).await;
    let through = ForwardingConfig {
        proxy: Some(format!("http://{}", proxy.address)),
        ..ForwardingConfig::default()
    };
    assert_eq!(allowed_destination(&outside, &through).await, Ok(()));
    let client = client_builder(&through).unwrap().build().unwrap();
    let response = client.post(&outside).body("{}").send().await.unwrap_or_else(|e| {
        panic!("through the proxy: {}", error_chain(&e));
    });
    assert_eq!(response.text().await.unwrap(), "ok");
    let requests = proxy.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0].line, format!("CONNECT app.invalid:{port} HTTP/1.1"));
    assert_eq!(requests[0].authorization, None);

    let loopback = ForwardingConfig {
        allow_loopback: true,
        ..through
    };
    let client = client_builder(&loopback).unwrap().build().unwrap();
    let response = client.post(&url).body("{}").send().await.unwrap();
    assert_eq!(response.text().await.unwrap(), "ok");
    assert_eq!(proxy.requests().len(), 1, "a loopback call went through the proxy");
}

/// The clients of calls that are not out to the world (the CLI to the API, `hookyard
/// dev`'s demo) take the environment's proxy too, but call loopback directly: a
/// developer's `HTTPS_PROXY` does not take them to the proxy.
#[tokio::test]
async fn internal_calls_to_loopback_skip_the_environments_proxy() {
    let App { url, outside, port } = app().await;
    let proxy = ForwardProxy::start(([127, 0, 0, 1], port).into()).await;
    // Before any client of this test exists.
    std::env::set_var("HTTPS_PROXY", format!("http://{}", proxy.address));
    let client = http_client().unwrap();
    let response = client.post(&url).body("{}").send().await.unwrap_or_else(|e| {
        panic!("a loopback call with a proxy in the environment: {}", error_chain(&e));
    });
    assert_eq!(response.text().await.unwrap(), "ok");
    assert!(proxy.requests().is_empty(), "{:?}", proxy.requests());
    // Elsewhere the environment's proxy is used.
    let response = client.post(&outside).send().await.unwrap();
    assert_eq!(response.text().await.unwrap(), "ok");
    assert_eq!(proxy.requests()[0].line, format!("CONNECT app.invalid:{port} HTTP/1.1"));
}

/// An `https://` proxy is reached over TLS, its certificate checked as any other; the
/// destination's TLS runs inside.
#[tokio::test]
async fn an_https_proxy_is_reached_over_tls_and_its_certificate_checked() {
    let App { outside, port, .. } = app().await;
    let upstream = ([127, 0, 0, 1], port).into();
    let through = |proxy: &ForwardProxy| {
        let config = ForwardingConfig {
            proxy: Some(format!("https://{}", proxy.address)),
            ..ForwardingConfig::default()
        };
        client_builder(&config).unwrap().build().unwrap()
    };
    let proxy = ForwardProxy::start_tls(upstream, acceptor("localhost")).await;
    let response = through(&proxy)
        .post(&outside)
        .body("{}")
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!("through an https proxy: {}", error_chain(&e));
        });
    assert_eq!(response.text().await.unwrap(), "ok");
    assert_eq!(proxy.requests()[0].line, format!("CONNECT app.invalid:{port} HTTP/1.1"));

    let untrusted = ForwardProxy::start_tls(upstream, acceptor("untrusted")).await;
    let error = through(&untrusted).post(&outside).body("{}").send().await.unwrap_err();
    assert!(untrusted.requests().is_empty(), "{:?}", untrusted.requests());
    let chain = error_chain(&error);
    assert!(chain.contains("invalid peer certificate"), "{chain}");
}

/// Through a proxy, a destination's name that resolves here is still checked (a name of
/// the internal network stays refused); one that does not resolve here is the proxy's
/// to resolve. Without a proxy, or for a `no_proxy` name, it is refused.
#[tokio::test]
async fn through_a_proxy_names_resolved_here_are_checked_and_the_rest_left_to_it() {
    let direct = ForwardingConfig {
        proxy: Some(String::new()),
        ..ForwardingConfig::default()
    };
    let through = ForwardingConfig {
        proxy: Some("http://localhost:9".into()),
        ..ForwardingConfig::default()
    };
    let bypassed = ForwardingConfig {
        no_proxy: Some("app.invalid".into()),
        ..through.clone()
    };
    let outside = "https://app.invalid/hook";
    assert_eq!(allowed_destination(outside, &through).await, Ok(()));
    for config in [&direct, &bypassed] {
        match allowed_destination(outside, config).await {
            Err(Refusal::Unresolved(error)) => assert!(error.starts_with("app.invalid does not resolve"), "{error}"),
            other => panic!("{other:?}"),
        }
    }
    for (url, why) in [
        ("http://localhost:8080/", "a loopback address"),
        ("http://10.0.0.1/", "a private, link-local or metadata address"),
    ] {
        match allowed_destination(url, &through).await {
            Err(Refusal::Forbidden(error)) => assert!(error.contains(why), "{error}"),
            other => panic!("{url}: {other:?}"),
        }
    }
}
