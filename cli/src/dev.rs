//! `hookyard dev`: every stage in one process on embedded defaults, a `dev` environment,
//! a `demo` integration with the `crm-contacts` example function deployed to it, a demo
//! CRM on loopback whose contacts the example's `exec` reads, and a demo webhook sent
//! through it on start (shown as the record it becomes).

use std::path::Path;
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use hookyard_core::config::EncryptionKey;
use hookyard_core::keys::IntegrationKey;
use hookyard_core::routed::RoutedEvent;
use hookyard_core::secrets::Cipher;
use hookyard_core::store::{Credentials, Environment, IntegrationChanges, NewConnection, NewIntegration, StoreError};
use hookyard_core::streams::{Bus, CONN_STREAM, RAW_STREAM};
use hookyard_core::{Config, Envelope, Store};
use hookyard_ingest::Ingest;
use hookyard_testkit::fake_provider::{cursor_pagination, FakeCrm, API_KEY};
use tokio_util::sync::CancellationToken;

use crate::dev_nats::DevNats;

pub type Error = Box<dyn std::error::Error + Send + Sync>;

#[derive(clap::Args)]
pub struct DevArgs {
    /// Do not send the demo webhook at start.
    #[arg(long)]
    no_demo: bool,
}

const DEMO_INTEGRATION: &str = "demo";
const DEMO_CONNECTION: &str = "demo-connection";
/// Where `hookyard dev` serves `/metrics` unless `telemetry.metrics_listen` says otherwise.
const DEV_METRICS_LISTEN: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 3005);
const DEMO_BODY: &str = r#"{"type":"contact.updated","contact":{"id":"c_1","email":"ada@example.com"}}"#;
pub async fn run(mut config: Config, args: DevArgs, shutdown: CancellationToken) -> Result<(), Error> {
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| format!("cannot create {}: {e}", config.data_dir.display()))?;
    let _lock = lock_data_dir(&config.data_dir)?;
    // First, so that a taken port fails before NATS and the store are set up.
    let ingest_listener = listen(config.ingest.listen, "HOOKYARD_INGEST__LISTEN").await?;
    let api_listener = listen(config.api.listen, "HOOKYARD_API__LISTEN").await?;
    if config.encryption_key.is_none() {
        config.encryption_key = Some(dev_encryption_key(&config.data_dir)?);
    }
    let nats = if std::env::var_os("HOOKYARD_NATS_URL").is_some() {
        None
    } else {
        let nats = DevNats::start(&config)?;
        config.nats_url = nats.url.clone();
        Some(nats)
    };

    let store = Store::connect_with(&config.database_url, config.cipher()?, config.database_max_connections).await?;
    let environment = store.ensure_environment(&"dev".parse()?).await?;
    let crm = demo_crm().await;
    ensure_demo_integration(&store, &environment, &crm.url).await?;
    deploy_example(&store, &environment, &config).await?;
    let bus = Bus::connect(&config, "hookyard-dev").await?;
    let ingest = match Ingest::start(&config, store.clone(), bus.clone(), shutdown.clone()).await {
        Err(hookyard_ingest::StartError::Stopped) => return Ok(()),
        started => started?,
    };
    let router = std::sync::Arc::new(hookyard_router::Router::new(store.clone(), &bus, &config)?);
    // Forwarding to an app on this machine is what dev is for.
    config.forwarding.allow_loopback = true;
    let api = hookyard_api::Api::new(store.clone(), &config)?;
    let owed_events = api.owed_event_sweep(shutdown.clone());
    let webhook_url = environment.webhook_url(&config.webhook_base_url(), DEMO_INTEGRATION);
    let api_url = format!("http://{}", config.api.listen);
    let metrics_listen = *config.telemetry.metrics_listen.get_or_insert(DEV_METRICS_LISTEN);
    println!(
        "\nhookyard dev is running\n\
         \n  webhook URL   {webhook_url}\
         \n  API           {api_url} (OpenAPI document at {api_url}/openapi.json)\
         \n  environment   dev (secret key {})\
         \n  NATS          {}\
         \n  database      {}\
         \n\nSend a webhook:\n\n  curl -i -X POST '{webhook_url}' -H 'content-type: application/json' -d '{DEMO_BODY}'\n\
         \nSee the record the example function made of it:\n\n  curl -s '{api_url}/records?model=Contact' -H 'Authorization: Bearer {}' \\\n    -H 'Connection-Id: {DEMO_CONNECTION}' -H 'Provider-Config-Key: {DEMO_INTEGRATION}'\n\
         \nFollow what becomes of each webhook, replay the last hour, list dead letters:\n\
         \n  export HOOKYARD_API_URL={api_url} HOOKYARD_SECRET_KEY={}\
         \n  hookyard logs --follow\
         \n  hookyard replay --since 1h --dry-run\
         \n  hookyard dlq list\n\
         \nPrometheus metrics: http://{}/metrics\n\
         \nPress Ctrl-C to stop.\n",
        environment.secret_key,
        config.nats_url_shown(),
        config.database_url,
        environment.secret_key,
        environment.secret_key,
        metrics_listen,
    );
    hookyard_core::metrics::serve_configured(&config, Some(bus.jetstream.clone()), &shutdown);
    let nats = spawn_stopping_all(
        {
            let shutdown = shutdown.clone();
            async move {
                match nats {
                    Some(nats) => nats.supervise(shutdown).await.map(Some),
                    None => Ok(None),
                }
            }
        },
        shutdown.clone(),
    );
    let ingest_server = spawn_stopping_all(
        hookyard_ingest::serve(ingest_listener, ingest, shutdown.clone()),
        shutdown.clone(),
    );
    let api_server = spawn_stopping_all(
        hookyard_api::serve(api_listener, api.router, shutdown.clone()),
        shutdown.clone(),
    );
    let events = spawn_stopping_all(
        {
            async move {
                owed_events.await;
                Ok::<(), std::io::Error>(())
            }
        },
        shutdown.clone(),
    );
    let router = spawn_stopping_all(router.run(shutdown.clone()), shutdown.clone());
    let worker = spawn_stopping_all(
        {
            let (store, bus, config, shutdown) = (store.clone(), bus.clone(), config.clone(), shutdown.clone());
            async move { hookyard_worker::run_all(store, &bus, &config, shutdown).await }
        },
        shutdown.clone(),
    );
    let reconciler = spawn_stopping_all(
        {
            let reconciler = std::sync::Arc::new(hookyard_reconciler::Reconciler::new(
                store.clone(),
                bus.jetstream.clone(),
            ));
            let shutdown = shutdown.clone();
            async move {
                reconciler.run(shutdown).await;
                Ok::<(), std::io::Error>(())
            }
        },
        shutdown.clone(),
    );
    if !args.no_demo {
        // The example's first exec run, then the webhook: sent while that run reads the
        // demo CRM, the webhook would race it for the same contact, and its write could
        // come out stale (the run read the CRM after the webhook was stored).
        if let Err(error) = show_demo_sync(&api_url, &environment.secret_key, &crm.url).await {
            eprintln!("demo sync status failed: {error}");
        }
        let demo_seq = match send_demo_webhook(&webhook_url, &bus.jetstream).await {
            Ok(seq) => Some(seq),
            Err(error) => {
                eprintln!("demo webhook failed: {error}");
                None
            }
        };
        // The log first: it waits for the execution, logged once committed, so the record
        // read next is the webhook's copy, not the exec run's.
        if let Some(seq) = demo_seq {
            if let Err(error) = show_demo_log(&api_url, &environment.secret_key, seq).await {
                eprintln!("demo log failed: {error}");
            }
        }
        if let Err(error) = show_demo_record(&api_url, &environment.secret_key).await {
            eprintln!("demo API call failed: {error}");
        }
        if let Err(error) = show_demo_action(&api_url, &environment.secret_key).await {
            eprintln!("demo action failed: {error}");
        }
    }
    let (ingest_result, api_result, events_result, router_result, worker_result, reconciler_result) =
        tokio::join!(ingest_server, api_server, events, router, worker, reconciler);
    // Last, once the services have drained (their final acks and publishes need it),
    // and after the client has let go, which would otherwise try to reconnect.
    if let Some(nats) = nats.await?? {
        let _ = tokio::time::timeout(Duration::from_secs(2), bus.client.drain()).await;
        nats.stop().await;
    }
    ingest_result??;
    api_result??;
    events_result??;
    router_result??;
    worker_result??;
    reconciler_result??;
    Ok(())
}

/// Runs a server; when it stops (on an error too) the others are told to stop as well.
fn spawn_stopping_all<F>(server: F, shutdown: CancellationToken) -> tokio::task::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(async move {
        let outcome = server.await;
        shutdown.cancel();
        outcome
    })
}

async fn listen(addr: std::net::SocketAddr, variable: &str) -> Result<tokio::net::TcpListener, Error> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e} (set {variable} to another address)").into())
}

/// Reads the record the example function made of the demo webhook through the API,
/// waiting (bounded) for the worker to commit it.
async fn show_demo_record(api_url: &str, secret_key: &str) -> Result<(), Error> {
    let url = format!("{api_url}/records?model=Contact");
    let client = hookyard_core::outbound::http_client()?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let response = client
            .get(&url)
            .bearer_auth(secret_key)
            .header("Connection-Id", DEMO_CONNECTION)
            .header("Provider-Config-Key", DEMO_INTEGRATION)
            .send()
            .await?;
        let status = response.status();
        let body: serde_json::Value = response.json().await?;
        // The demo webhook's contact (the exec run may have saved others first).
        let demo: serde_json::Value = serde_json::from_str(DEMO_BODY)?;
        let record = body["records"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["id"] == demo["contact"]["id"]);
        let found = record.is_some();
        if found || tokio::time::Instant::now() >= deadline {
            let shown = match record {
                Some(record) => record.to_string(),
                None => body.to_string(),
            };
            println!("demo: worker -> GET {url}\n      -> {status} {shown}\n");
            if !found {
                println!("demo: the record did not appear within 10 s\n");
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Shows the demo webhook's operation log: accepted, routed, executed (the log is
/// written a moment after the work it records, so this waits for the execution).
async fn show_demo_log(api_url: &str, secret_key: &str, raw_seq: u64) -> Result<(), Error> {
    let client = hookyard_core::outbound::http_client()?;
    let get = |path: String| {
        let request = client.get(format!("{api_url}{path}")).bearer_auth(secret_key);
        async move { request.send().await?.json::<serde_json::Value>().await }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let latest = get("/logs?limit=100".into()).await?;
        let demo = latest["data"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|entry| entry["raw_seq"].as_u64() == Some(raw_seq));
        if let Some(id) = demo.and_then(|entry| entry["id"].as_i64()) {
            let shown = get(format!("/logs/{id}")).await?;
            let steps = shown["data"]["steps"].as_array().cloned().unwrap_or_default();
            let executed = steps.iter().any(|s| s["stage"] == "execution");
            if executed || tokio::time::Instant::now() >= deadline {
                println!(
                    "demo: the webhook's operation log (GET {api_url}/logs/{id}, or `hookyard logs {id}`):\n      {} {}",
                    shown["data"]["status"],
                    shown["data"]["detail"]
                );
                for step in &steps {
                    println!(
                        "      {} {} {} {}",
                        step["stage"].as_str().unwrap_or("?"),
                        step["connection_id"].as_str().unwrap_or(""),
                        step["status"].as_str().unwrap_or("?"),
                        step["detail"]
                    );
                }
                println!();
                return Ok(());
            }
        }
        if tokio::time::Instant::now() >= deadline {
            println!("demo: the webhook did not appear in the operation log within 10 s\n");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs the example's action for the demo connection, as an app would: waiting for its
/// output, then queued (`X-Async: true`) and its outcome read back.
async fn show_demo_action(api_url: &str, secret_key: &str) -> Result<(), Error> {
    let client = hookyard_core::outbound::http_client()?;
    let url = format!("{api_url}/action/trigger");
    let trigger = |email: &str, asynchronous: bool| {
        let body = serde_json::json!({"action_name": "find-contact", "input": {"email": email}});
        let request = client
            .post(&url)
            .bearer_auth(secret_key)
            .header("Connection-Id", DEMO_CONNECTION)
            .header("Provider-Config-Key", DEMO_INTEGRATION)
            .header("X-Async", asynchronous.to_string())
            .json(&body);
        async move {
            let response = request.send().await?;
            Ok::<_, Error>((body, response.status(), response.text().await?))
        }
    };
    let (body, status, answer) = trigger("grace@example.com", false).await?;
    println!("demo: action -> POST {url} {body}\n      -> {status} {answer}\n");

    let (body, status, answer) = trigger("nobody@example.com", true).await?;
    println!("demo: asynchronous action -> POST {url} (X-Async: true) {body}\n      -> {status} {answer}");
    let queued: serde_json::Value = serde_json::from_str(&answer)?;
    let Some(status_url) = queued["statusUrl"].as_str() else {
        return Ok(());
    };
    let result_url = format!("{api_url}{status_url}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let response = client.get(&result_url).bearer_auth(secret_key).send().await?;
        let status = response.status();
        let answer = response.text().await?;
        let pending = answer.contains("action_pending");
        if !pending || tokio::time::Instant::now() >= deadline {
            let said = if pending {
                "not run within 10 s"
            } else {
                "the worker ran it"
            };
            println!("      -> GET {result_url} ({said})\n      -> {status} {answer}\n");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Deploys `examples/crm-contacts` to the demo integration, unless the environment has
/// functions already (a deploy of your own is never replaced).
async fn deploy_example(store: &Store, environment: &Environment, config: &Config) -> Result<(), Error> {
    if !store.functions(environment.id).await?.is_empty() {
        return Ok(());
    }
    let files = hookyard_functions::examples::files(hookyard_functions::examples::CRM_CONTACTS);
    let limits = config.worker.limits.clone();
    let project = tokio::task::spawn_blocking(move || hookyard_functions::compile::compile_project(files, &limits))
        .await?
        .map_err(|e| format!("the example function does not deploy: {e}"))?;
    for change in store
        .deploy_functions(environment, &project.bundle, &project.syncs)
        .await?
    {
        println!(
            "deployed examples/crm-contacts: {}/{} v{}",
            change.integration, change.name, change.version
        );
    }
    Ok(())
}

/// Holds `{data_dir}/dev.lock` for the life of the process (the kernel lets go when it
/// ends, however it ends). A second dev on the same folder would take the first one's
/// nats-server for one left behind, stop it, and run another on the same store.
fn lock_data_dir(data_dir: &Path) -> Result<std::fs::File, Error> {
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;
    let path = data_dir.join("dev.lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    // SAFETY: flock(2) on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        return Err(format!(
            "another hookyard dev (pid {}) is running on {}; stop it first, or give this one a folder of its own (HOOKYARD_DATA_DIR)",
            holder.trim(),
            data_dir.display()
        )
        .into());
    }
    file.set_len(0)?;
    file.rewind()?;
    write!(file, "{}", std::process::id())?;
    Ok(file)
}

/// The key `dev` seals its secrets under, kept in `{data_dir}/encryption.key` (readable
/// by this user only) and made on first start.
fn dev_encryption_key(data_dir: &Path) -> Result<EncryptionKey, Error> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = data_dir.join("encryption.key");
    match std::fs::read_to_string(&path) {
        Ok(text) => return Ok(EncryptionKey(text.trim().to_string())),
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(format!("cannot read {}: {e}", path.display()).into())
        }
        Err(_) => {}
    }
    let key = Cipher::generate_key_text();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    writeln!(file, "{key}").map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    tracing::info!(path = %path.display(), "made an encryption key for dev");
    Ok(EncryptionKey(key))
}

/// A CRM on loopback for the demo: the contacts the example's exec lists (the one the
/// demo webhook changes among them).
async fn demo_crm() -> FakeCrm {
    let crm = FakeCrm::start().await;
    for (id, email) in [
        ("c_1", "ada@example.com"),
        ("c_2", "grace@example.com"),
        ("c_3", "linus@example.com"),
    ] {
        crm.put_contact(id, email);
    }
    crm
}

/// The `demo` integration (generic: every webhook goes to every connection), its API at
/// the demo CRM, and its one connection, `demo-connection`, with the CRM's API key.
async fn ensure_demo_integration(store: &Store, environment: &Environment, crm_url: &str) -> Result<(), Error> {
    let key: IntegrationKey = DEMO_INTEGRATION.parse()?;
    let settings = serde_json::json!({"api": {
        "base_url": crm_url, "api_key_header": "X-API-Key", "paginate": cursor_pagination()
    }});
    let demo = NewIntegration {
        settings: settings.clone(),
        ..NewIntegration::new(key.clone(), "generic")
    };
    match store.create_integration(environment, &demo).await {
        Ok(_) => {}
        Err(StoreError::Conflict(_)) => {
            // The demo CRM has a new port at every start.
            let changes = IntegrationChanges {
                settings: Some(settings),
                ..Default::default()
            };
            store.update_integration(environment.id, &key, &changes).await?;
        }
        Err(error) => return Err(error.into()),
    }
    let credentials = Credentials::ApiKey {
        api_key: API_KEY.into(),
    };
    let connection = NewConnection {
        integration: key.clone(),
        connection_id: DEMO_CONNECTION.into(),
        connection_config: serde_json::json!({}),
        metadata: serde_json::json!({}),
        tags: serde_json::json!({}),
        credentials: Some(credentials.clone()),
    };
    match store.create_connection(environment, &connection).await {
        Ok(_) => Ok(()),
        Err(StoreError::Conflict(_)) => {
            store
                .update_credentials(environment.id, &key, DEMO_CONNECTION, &credentials)
                .await?;
            Ok(())
        }
        Err(error) => Err(error.into()),
    }
}

/// Shows the example's first exec run (started by the reconciler: the sync has
/// `autoStart`), waiting for it at most 10 s.
async fn show_demo_sync(api_url: &str, secret_key: &str, crm_url: &str) -> Result<(), Error> {
    let url = format!("{api_url}/sync/status?syncs=contacts&provider_config_key={DEMO_INTEGRATION}");
    let client = hookyard_core::outbound::http_client()?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let body: serde_json::Value = client.get(&url).bearer_auth(secret_key).send().await?.json().await?;
        let sync = &body["syncs"][0];
        let done = matches!(sync["status"].as_str(), Some("SUCCESS" | "ERROR"));
        if done || tokio::time::Instant::now() >= deadline {
            println!(
                "demo: reconciler -> exec of demo/contacts read the demo CRM at {crm_url}\n      -> GET {url}\n      -> {sync}\n"
            );
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends the demo webhook and shows it stored and routed; its `HOOKS_RAW` sequence.
async fn send_demo_webhook(url: &str, jetstream: &jetstream::Context) -> Result<u64, Error> {
    let routed_subject = format!("hooks.conn.dev.{DEMO_INTEGRATION}.{DEMO_CONNECTION}");
    let watcher = jetstream
        .get_stream(CONN_STREAM)
        .await?
        .create_consumer(jetstream::consumer::pull::Config {
            filter_subject: routed_subject.clone(),
            deliver_policy: jetstream::consumer::DeliverPolicy::New,
            ack_policy: jetstream::consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(30),
            ..Default::default()
        })
        .await?;
    let response = hookyard_core::outbound::http_client()?
        .post(url)
        .header("content-type", "application/json")
        .header("webhook-id", format!("demo-{}", uuid::Uuid::new_v4()))
        .body(DEMO_BODY)
        .send()
        .await?;
    let status = response.status();
    let answer = response.text().await?;
    println!("demo: POST {url}\n      -> {status} {answer}");
    let stream = jetstream.get_stream(RAW_STREAM).await?;
    let stored = stream.get_last_raw_message_by_subject("hooks.raw.dev.demo").await?;
    let envelope = Envelope::from_message(&stored.subject, Some(&stored.headers), stored.payload)?;
    println!(
        "demo: {RAW_STREAM} #{}: {} {} bytes, delivery {}\n      {}\n",
        stored.sequence,
        envelope.method,
        envelope.body.len(),
        envelope.delivery_id,
        String::from_utf8_lossy(&envelope.body)
    );
    let mut routed = watcher
        .fetch()
        .max_messages(1)
        .expires(Duration::from_secs(10))
        .messages()
        .await?;
    match routed.next().await {
        Some(message) => {
            let message = message?;
            let event = RoutedEvent::from_message(&message.subject, message.headers.as_ref(), &message.payload)?;
            println!(
                "demo: router -> {routed_subject}: event {}, version {}\n",
                event.event_type.as_deref().unwrap_or("(none)"),
                event.version()
            );
        }
        None => println!("demo: the router did not deliver the webhook within 10 s\n"),
    }
    Ok(stored.sequence)
}
