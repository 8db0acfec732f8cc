//! Connecting to a NATS that asks for credentials or TLS: `nats_url`'s user and password
//! or token reach the server (async-nats itself reads none from a URL), a `tls://` server
//! is verified against the system's roots (which `SSL_CERT_FILE` names here), and no
//! message shows a secret.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hookyard_core::embedded_nats::{server_bin, ConfigFile, EmbeddedNats, ServerSpec};
use hookyard_core::streams::Bus;
use hookyard_core::Config;

/// A nats-server on a free port running `settings` (its configuration file's text).
struct Server {
    port: u16,
    _process: EmbeddedNats,
    _dir: tempfile::TempDir,
}

fn start(settings: &str) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("nats.conf");
    std::fs::write(&conf, settings).unwrap();
    let port = hookyard_testkit::free_port();
    let process = EmbeddedNats::start(
        &ServerSpec {
            bin: &server_bin(),
            port,
            store_dir: &dir.path().join("js"),
            config: ConfigFile::Given(&conf),
            cluster: None,
            monitor_port: None,
            own_process_group: false,
        },
        Duration::from_secs(20),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    Server {
        port,
        _process: process,
        _dir: dir,
    }
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls")
        .join(name)
}

async fn connect(nats_url: String) -> Result<Bus, String> {
    let config = Config {
        nats_url,
        ..Config::default()
    };
    Bus::connect(&config, "test").await.map_err(|e| e.to_string())
}

#[tokio::test]
async fn a_user_and_password_in_nats_url_reach_the_server_and_are_never_shown() {
    let server = start("authorization { user: hookyard, password: \"s3cr3t/pw\" }\n");
    // Percent-encoded in the URL, as any URL's password.
    let bus = connect(format!("nats://hookyard:s3cr3t%2Fpw@127.0.0.1:{}", server.port))
        .await
        .unwrap();
    bus.client.flush().await.unwrap();

    let refused = connect(format!("nats://hookyard:wrong-pw@127.0.0.1:{}", server.port))
        .await
        .err()
        .expect("a wrong password is refused");
    assert!(
        refused.contains("(hidden)") && !refused.contains("wrong-pw"),
        "{refused}"
    );
    let without = connect(format!("nats://127.0.0.1:{}", server.port)).await.err();
    assert!(without.is_some(), "the server let a client in without credentials");
}

#[tokio::test]
async fn a_token_in_nats_url_reaches_the_server() {
    let server = start("authorization { token: \"t0ken\" }\n");
    let bus = connect(format!("nats://t0ken@127.0.0.1:{}", server.port))
        .await
        .unwrap();
    bus.client.flush().await.unwrap();
    let refused = connect(format!("nats://other@127.0.0.1:{}", server.port))
        .await
        .err()
        .unwrap();
    assert!(!refused.contains("other"), "{refused}");
}

/// The only test of this binary that sets `SSL_CERT_FILE`: a process's roots are loaded
/// once.
#[tokio::test]
async fn a_tls_server_is_reached_and_verified() {
    std::env::set_var("SSL_CERT_FILE", fixture("ca.pem"));
    // A server presenting the fixture certificate `name`.pem.
    let tls_server = |name: &str| {
        start(&format!(
            "tls {{ cert_file: \"{}\", key_file: \"{}\" }}\n",
            fixture(&format!("{name}.pem")).display(),
            fixture(&format!("{name}.key")).display()
        ))
    };
    let server = tls_server("localhost");
    let bus = connect(format!("tls://localhost:{}", server.port)).await.unwrap();
    bus.client.flush().await.unwrap();

    let untrusted = tls_server("untrusted");
    let refused = connect(format!("tls://localhost:{}", untrusted.port)).await.err();
    assert!(refused.is_some(), "a server no root vouches for was trusted");
}
