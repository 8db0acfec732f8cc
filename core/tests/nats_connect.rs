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
    let port = hookyard_testkit::free_port();
    Server {
        port,
        _process: run(port, dir.path(), settings),
        _dir: dir,
    }
}

/// A nats-server on `port` running `settings`, its files under `dir` (a restart on the
/// same port and store is another call).
fn run(port: u16, dir: &Path, settings: &str) -> EmbeddedNats {
    let conf = dir.join("nats.conf");
    std::fs::write(&conf, settings).unwrap();
    EmbeddedNats::start(
        &ServerSpec {
            bin: &server_bin(),
            port,
            store_dir: &dir.join("js"),
            config: ConfigFile::Given(&conf),
            cluster: None,
            monitor_port: None,
            own_process_group: false,
        },
        Duration::from_secs(20),
    )
    .unwrap_or_else(|e| panic!("{e}"))
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

/// A user of `account` in the `.creds` layout `nsc` writes, and the user's public key.
fn creds(account: &KeyPair) -> (String, String) {
    let user = KeyPair::new_user();
    let user_jwt = jwt(
        account,
        &user.public_key(),
        json!({"type": "user", "version": 2, "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}),
    );
    let text = format!(
        "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\n\
         -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
        user.seed().unwrap()
    );
    (text, user.public_key())
}

/// An operator with an account that has JetStream, and the system account: what a
/// server in operator mode with a memory resolver is configured with.
struct Operator {
    operator: KeyPair,
    account: KeyPair,
    system: KeyPair,
}

impl Operator {
    fn new() -> Operator {
        Operator {
            operator: KeyPair::new_operator(),
            account: KeyPair::new_account(),
            system: KeyPair::new_account(),
        }
    }

    /// The server's settings; `revoked` users of the account are refused.
    fn settings(&self, revoked: &[&str]) -> String {
        let unlimited = json!({
            "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": true,
            "conn": -1, "leaf": -1, "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
        });
        // Revoked: their JWTs issued up to a minute from now.
        let until = chrono::Utc::now().timestamp() + 60;
        let revocations: serde_json::Map<String, Value> =
            revoked.iter().map(|user| (user.to_string(), json!(until))).collect();
        let account = |key: &KeyPair, nats: Value| {
            format!("{}: {}", key.public_key(), jwt(&self.operator, &key.public_key(), nats))
        };
        format!(
            "operator: {}\nsystem_account: {}\nresolver: MEMORY\nresolver_preload: {{\n  {}\n  {}\n}}\n",
            jwt(
                &self.operator,
                &self.operator.public_key(),
                json!({"type": "operator", "version": 2})
            ),
            self.system.public_key(),
            account(
                &self.account,
                json!({"type": "account", "version": 2, "limits": unlimited, "revocations": revocations})
            ),
            account(&self.system, json!({"type": "account", "version": 2})),
        )
    }
}

/// A `Bus` to the server on `port` signing in with `file` (checked as at a start).
async fn connect_with_creds(port: u16, file: Option<PathBuf>) -> Result<Bus, String> {
    let config = Config {
        nats_url: format!("nats://127.0.0.1:{port}"),
        nats_credentials: file,
        ..Config::default()
    };
    config.validate().map_err(|e| e.to_string())?;
    Bus::connect(&config, "test").await.map_err(|e| e.to_string())
}

/// A server in operator mode; a user's `.creds` file signs in and has JetStream, nothing
/// else does.
#[tokio::test]
async fn a_creds_file_signs_in_to_a_server_in_operator_mode() {
    let operator = Operator::new();
    let server = start(&operator.settings(&[]));
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };

    let user = write("user.creds", &creds(&operator.account).0);
    let bus = connect_with_creds(server.port, Some(user)).await.unwrap();
    let info = bus.jetstream.query_account().await.unwrap();
    assert_eq!(info.streams, 0, "{info:?}");

    let refused = connect_with_creds(server.port, None).await.err().unwrap();
    assert!(refused.contains("authorization violation"), "{refused}");
    let stranger = write("stranger.creds", &creds(&KeyPair::new_account()).0);
    let refused = connect_with_creds(server.port, Some(stranger)).await.err().unwrap();
    assert!(refused.contains("authorization violation"), "{refused}");
}

/// The file is read again at each connection: the server restarted with the first user
/// revoked, the service reconnects as the user its rotated file now names, without a
/// restart of its own.
#[tokio::test]
async fn a_rotated_creds_file_is_read_again_when_reconnecting() {
    let operator = Operator::new();
    let dir = tempfile::tempdir().unwrap();
    let port = hookyard_testkit::free_port();
    let server = run(port, dir.path(), &operator.settings(&[]));
    let (first, first_user) = creds(&operator.account);
    let file = dir.path().join("user.creds");
    std::fs::write(&file, first).unwrap();
    let bus = connect_with_creds(port, Some(file.clone())).await.unwrap();
    bus.client.flush().await.unwrap();

    std::fs::write(&file, creds(&operator.account).0).unwrap();
    drop(server);
    let _server = run(port, dir.path(), &operator.settings(&[&first_user]));
    hookyard_testkit::eventually("a reconnection as the second user", Duration::from_secs(30), || async {
        let connected = bus.client.connection_state() == async_nats::connection::State::Connected;
        let answered = connected && bus.jetstream.query_account().await.is_ok();
        answered.then_some(())
    })
    .await;
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
    std::fs::write(&valid, creds(&KeyPair::new_account()).0).unwrap();
    assert_eq!(check("nats://h:4222", valid.clone()), None);
    let said = check("nats://app:pw@h:4222", valid).unwrap();
    assert!(said.contains("give one of them"), "{said}");
}
