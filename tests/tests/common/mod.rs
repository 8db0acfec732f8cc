//! Starts ingest in-process against a real nats-server and a real store.
// Each test binary uses a part of this module.
#![allow(dead_code)]

pub mod pipeline;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use hookyard_core::store::{Environment, NewIntegration};
use hookyard_core::streams::{Bus, RAW_STREAM};
use hookyard_core::{Config, Envelope, Store};
use hookyard_ingest::Ingest;
use hookyard_testkit::{test_cipher, NatsServer, SqliteFile};
use tokio_util::sync::CancellationToken;

pub struct Running {
    pub nats: NatsServer,
    pub config: Config,
    pub bus: Bus,
    pub store: Store,
    pub environment: Environment,
    pub base: String,
    pub http: reqwest::Client,
    pub jetstream: jetstream::Context,
    pub shutdown: CancellationToken,
    pub server: tokio::task::JoinHandle<std::io::Result<()>>,
    _sqlite: Option<SqliteFile>,
}

pub fn test_config(nats: &NatsServer, database_url: &str) -> Config {
    let mut config = Config {
        nats_url: nats.url.clone(),
        database_url: database_url.to_string(),
        ..Config::default()
    };
    config.ingest.settings_refresh = Duration::from_millis(100);
    config
}

/// Ingest on a free port with a `dev` environment and a `demo` integration, on SQLite
/// unless `database_url` is given.
pub async fn start_ingest(database_url: Option<&str>, tweak: impl FnOnce(&mut Config)) -> Running {
    start_ingest_with(database_url, tweak, Vec::new()).await
}

/// As [`start_ingest`], with these integrations in the `dev` environment too.
pub async fn start_ingest_with(
    database_url: Option<&str>,
    tweak: impl FnOnce(&mut Config),
    integrations: Vec<NewIntegration>,
) -> Running {
    let nats = NatsServer::start();
    let sqlite = database_url.is_none().then(SqliteFile::create);
    let url = database_url
        .map(String::from)
        .unwrap_or_else(|| sqlite.as_ref().unwrap().url.clone());
    let mut config = test_config(&nats, &url);
    tweak(&mut config);
    let (store, environment) = demo_store(&config, &integrations).await;
    let Served {
        bus,
        base,
        shutdown,
        server,
    } = serve_ingest(&config, &store).await;
    Running {
        nats,
        config,
        bus: bus.clone(),
        store,
        environment,
        base,
        http: hookyard_core::outbound::http_client().unwrap(),
        jetstream: bus.jetstream,
        shutdown,
        server,
        _sqlite: sqlite,
    }
}

/// The store of `config` with a `dev` environment holding a `demo` integration and
/// `integrations`.
pub async fn demo_store(config: &Config, integrations: &[NewIntegration]) -> (Store, Environment) {
    let store = Store::connect(&config.database_url, test_cipher()).await.unwrap();
    let environment = store.ensure_environment(&"dev".parse().unwrap()).await.unwrap();
    add_integration(&store, &environment, "demo").await;
    for integration in integrations {
        store.create_integration(&environment, integration).await.unwrap();
    }
    (store, environment)
}

/// Ingest serving on a free loopback port until `shutdown`.
pub struct Served {
    pub bus: Bus,
    /// `http://127.0.0.1:port`.
    pub base: String,
    pub shutdown: CancellationToken,
    pub server: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Starts ingest with `config` on `store` (it creates or updates the streams).
pub async fn serve_ingest(config: &Config, store: &Store) -> Served {
    let bus = Bus::connect(config, "test-ingest").await.unwrap();
    let shutdown = CancellationToken::new();
    let ingest: Arc<Ingest> = Ingest::start(config, store.clone(), bus.clone(), shutdown.clone())
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(hookyard_ingest::serve(listener, ingest, shutdown.clone()));
    Served {
        bus,
        base,
        shutdown,
        server,
    }
}

pub async fn add_integration(store: &Store, environment: &Environment, key: &str) {
    store
        .create_integration(environment, &NewIntegration::new(key.parse().unwrap(), "generic"))
        .await
        .unwrap();
}

impl Running {
    pub fn webhook_url(&self, integration: &str) -> String {
        format!("{}/webhook/{}/{integration}", self.base, self.environment.webhook_id)
    }

    pub async fn post(&self, integration: &str, body: &'static [u8]) -> reqwest::Response {
        self.http
            .post(self.webhook_url(integration))
            .body(body)
            .send()
            .await
            .unwrap()
    }

    /// Messages in `HOOKS_RAW`.
    pub async fn raw_count(&self) -> u64 {
        let mut stream = self.jetstream.get_stream(RAW_STREAM).await.unwrap();
        stream.info().await.unwrap().state.messages
    }

    /// The envelope stored at `sequence` in `HOOKS_RAW`, read through a consumer as the
    /// router reads it. (async-nats's direct get keeps only the last value of a repeated
    /// header; consumer delivery keeps them all.)
    pub async fn raw_envelope(&self, sequence: u64) -> Envelope {
        use futures::StreamExt;
        let stream = self.jetstream.get_stream(RAW_STREAM).await.unwrap();
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::Config {
                deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: sequence,
                },
                ack_policy: jetstream::consumer::AckPolicy::None,
                ..Default::default()
            })
            .await
            .unwrap();
        let mut messages = consumer.fetch().max_messages(1).messages().await.unwrap();
        let message = messages.next().await.expect("a message").unwrap();
        assert_eq!(message.info().unwrap().stream_sequence, sequence);
        Envelope::from_message(&message.subject, message.headers.as_ref(), message.payload.clone()).unwrap()
    }
}

/// Asserts a JSON error answer: status, code, and a `Retry-After` on 503.
pub async fn assert_error(response: reqwest::Response, status: u16, code: &str) {
    assert_eq!(response.status().as_u16(), status);
    if status == 503 {
        let retry = response.headers().get("retry-after").expect("503 without Retry-After");
        assert!(retry.to_str().unwrap().parse::<u64>().unwrap() >= 1);
    }
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}
