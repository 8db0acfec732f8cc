//! Calls out (forwards to customers' apps, provider APIs, OAuth2 token refreshes: every
//! client made by `outbound::client_builder`) reach https destinations, verifying their
//! certificates against the system's roots, which `SSL_CERT_FILE` can name.

use std::path::PathBuf;
use std::sync::Arc;

use hookyard_core::config::ForwardingConfig;
use hookyard_core::outbound::client_builder;
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

/// An https server on loopback presenting `name`.pem; answers each request 200 `ok`.
/// Returns its URL (by name, so the certificate's name is checked too).
async fn https_server(name: &str) -> String {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(fixture(&format!("{name}.pem")))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(fixture(&format!("{name}.key"))).unwrap();
    let config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
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

fn error_chain(error: &reqwest::Error) -> String {
    std::iter::successors(Some(error as &dyn std::error::Error), |e| e.source())
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}

/// One test in this binary: it sets the process's `SSL_CERT_FILE` before any client
/// exists, as an operator trusting a private CA would.
#[tokio::test]
async fn calls_out_reach_https_destinations_and_check_their_certificates() {
    std::env::set_var("SSL_CERT_FILE", fixture("ca.pem"));
    let config = ForwardingConfig {
        allow_loopback: true,
        ..ForwardingConfig::default()
    };
    let client = client_builder(&config).build().unwrap();

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
