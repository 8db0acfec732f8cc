//! Connecting to a NATS that asks for credentials or TLS: `nats_url`'s user and password
//! or token reach the server (async-nats itself reads none from a URL), a `.creds` file
//! (`nats_credentials`) signs in to a server in operator mode, a `tls://` server is
//! verified against the system's roots (which `SSL_CERT_FILE` names here), and no
//! message shows a secret.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hookyard_core::embedded_nats::{server_bin, ConfigFile, EmbeddedNats, ServerSpec};
use hookyard_core::streams::Bus;
use hookyard_core::Config;
use nkeys::KeyPair;
use serde_json::{json, Value};

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

/// A JWT as NATS's operator tooling signs one: `nats` claims of a kind, issued by
/// `issuer` for `subject`.
fn jwt(issuer: &KeyPair, subject: &str, nats: Value) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let claims = json!({
        "jti": format!("test-{subject}"),
        "iat": chrono::Utc::now().timestamp(),
        "iss": issuer.public_key(),
        "sub": subject,
        "name": subject,
        "nats": nats,
    });
    let input = format!(
        "{}.{}",
        b64.encode(r#"{"typ":"JWT","alg":"ed25519-nkey"}"#),
        b64.encode(claims.to_string())
    );
    let signature = issuer.sign(input.as_bytes()).unwrap();
    format!("{input}.{}", b64.encode(signature))
}

/// A user of `account` in the `.creds` layout `nsc` writes.
fn creds(account: &KeyPair) -> String {
    let user = KeyPair::new_user();
    let user_jwt = jwt(
        account,
        &user.public_key(),
        json!({"type": "user", "version": 2, "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}),
    );
    format!(
        "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\n\
         -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
        user.seed().unwrap()
    )
}

/// A server in operator mode (a memory resolver holding an account with JetStream and
/// the system account); a user's `.creds` file signs in and has JetStream, nothing else
/// does.
#[tokio::test]
async fn a_creds_file_signs_in_to_a_server_in_operator_mode() {
    let operator = KeyPair::new_operator();
    let (account, system) = (KeyPair::new_account(), KeyPair::new_account());
    let unlimited = json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": true,
        "conn": -1, "leaf": -1, "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
    });
    let server = start(&format!(
        "operator: {}\nsystem_account: {}\nresolver: MEMORY\nresolver_preload: {{\n  {}: {}\n  {}: {}\n}}\n",
        jwt(
            &operator,
            &operator.public_key(),
            json!({"type": "operator", "version": 2})
        ),
        system.public_key(),
        account.public_key(),
        jwt(
            &operator,
            &account.public_key(),
            json!({"type": "account", "version": 2, "limits": unlimited})
        ),
        system.public_key(),
        jwt(
            &operator,
            &system.public_key(),
            json!({"type": "account", "version": 2})
        ),
    ));
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let connect_with = |file: Option<PathBuf>| {
        let config = Config {
            nats_url: format!("nats://127.0.0.1:{}", server.port),
            nats_credentials: file,
            ..Config::default()
        };
        async move {
            config.validate().map_err(|e| e.to_string())?;
            Bus::connect(&config, "test").await.map_err(|e| e.to_string())
        }
    };

    let user = write("user.creds", &creds(&account));
    let bus = connect_with(Some(user)).await.unwrap();
    let info = bus.jetstream.query_account().await.unwrap();
    assert_eq!(info.streams, 0, "{info:?}");

    let refused = connect_with(None).await.err().unwrap();
    assert!(refused.contains("authorization violation"), "{refused}");
    let stranger = write("stranger.creds", &creds(&KeyPair::new_account()));
    let refused = connect_with(Some(stranger)).await.err().unwrap();
    assert!(refused.contains("authorization violation"), "{refused}");
}

/// What the start refuses: a file that is not there or not a `.creds` file, and a file
/// given beside credentials in `nats_url`; no message shows the seed.
#[test]
fn a_creds_file_is_checked_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let check = |nats_url: &str, file: PathBuf| {
        let config = Config {
            nats_url: nats_url.into(),
            nats_credentials: Some(file),
            ..Config::default()
        };
        config.validate().err().map(|e| e.to_string())
    };
    let missing = dir.path().join("missing.creds");
    let said = check("nats://h:4222", missing.clone()).unwrap();
    assert!(
        said.contains(&format!("nats_credentials: cannot read {}", missing.display())),
        "{said}"
    );
    let seed = KeyPair::new_user().seed().unwrap();
    let garbled = dir.path().join("garbled.creds");
    std::fs::write(
        &garbled,
        format!("-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"),
    )
    .unwrap();
    let said = check("nats://h:4222", garbled).unwrap();
    assert!(said.contains("is not a NATS credentials file"), "{said}");
    assert!(!said.contains(&seed), "{said}");
    let valid = dir.path().join("user.creds");
    std::fs::write(&valid, creds(&KeyPair::new_account())).unwrap();
    assert_eq!(check("nats://h:4222", valid.clone()), None);
    let said = check("nats://app:pw@h:4222", valid).unwrap();
    assert!(said.contains("give one of them"), "{said}");
}
