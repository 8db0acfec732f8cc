//! A pipeline from `HOOKS_CONN` on: NATS, the store (Postgres or SQLite), the API, a
//! `crm` integration with connections, and workers started in-process. Events are
//! published straight to `HOOKS_CONN`, as the router publishes them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use hookyard_core::routed::RoutedEvent;
use hookyard_core::store::{Environment, NewConnection, NewIntegration};
use hookyard_core::streams::Bus;
use hookyard_core::{Config, Store};
use hookyard_testkit::{eventually, raw_texts, test_cipher, NatsServer, SqliteFile};
use hookyard_worker::Worker;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// `N` is the NATS it runs on: a [`NatsServer`], or a cluster.
pub struct Harness<N = NatsServer> {
    pub nats: N,
    pub _sqlite: Option<SqliteFile>,
    pub config: Config,
    pub store: Store,
    pub bus: Bus,
    pub environment: Environment,
    pub api: String,
    pub http: reqwest::Client,
    pub shutdown: CancellationToken,
}

impl<N> Drop for Harness<N> {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// NATS, the store (SQLite unless a Postgres URL is given), the API, a `crm`
/// integration with `connections` connections named `c0`, `c1`, …
pub async fn harness(database_url: Option<&str>, connections: usize) -> Harness {
    harness_with(database_url, connections, |_| {}).await
}

/// As [`harness`], with the configuration changed by `tweak` first.
pub async fn harness_with(database_url: Option<&str>, connections: usize, tweak: impl FnOnce(&mut Config)) -> Harness {
    let nats = NatsServer::start();
    let url = nats.url.clone();
    harness_on(nats, &url, database_url, connections, tweak).await
}

/// As [`harness_with`], on `nats` reached at `nats_url` (its streams must be creatable
/// at once: a new cluster has to elect its leaders first).
pub async fn harness_on<N>(
    nats: N,
    nats_url: &str,
    database_url: Option<&str>,
    connections: usize,
    tweak: impl FnOnce(&mut Config),
) -> Harness<N> {
    let sqlite = database_url.is_none().then(SqliteFile::create);
    let url = database_url
        .map(String::from)
        .unwrap_or_else(|| sqlite.as_ref().unwrap().url.clone());
    let mut config = Config {
        nats_url: nats_url.to_string(),
        database_url: url,
        ..Config::default()
    };
    config.worker.retry_delays = [100, 300].map(|ms| Duration::from_millis(ms).into()).to_vec();
    config.worker.functions_refresh = Duration::from_millis(100);
    config.worker.limits.cpu_budget = Duration::from_millis(200);
    config.worker.limits.timeout = Duration::from_secs(1);
    config.worker.limits.memory_bytes = 16 * 1024 * 1024;
    config.worker.ack_wait = Duration::from_secs(8);
    tweak(&mut config);
    config.validate().unwrap();
    let store = Store::connect(&config.database_url, test_cipher()).await.unwrap();
    let environment = store.ensure_environment(&"dev".parse().unwrap()).await.unwrap();
    store
        .create_integration(&environment, &NewIntegration::new("crm".parse().unwrap(), "generic"))
        .await
        .unwrap();
    for n in 0..connections {
        store
            .create_connection(
                &environment,
                &NewConnection {
                    integration: "crm".parse().unwrap(),
                    connection_id: format!("c{n}"),
                    connection_config: json!({}),
                    metadata: json!({"n": n}),
                    tags: json!({}),
                    credentials: None,
                },
            )
            .await
            .unwrap();
    }
    let bus = Bus::connect(&config, "test-worker").await.unwrap();
    bus.ensure_streams(&config.streams, &store).await.unwrap();
    let (router, _) = hookyard_api::router(store.clone(), &config).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    tokio::spawn(hookyard_api::serve(listener, router, shutdown.clone()));
    Harness {
        nats,
        _sqlite: sqlite,
        config,
        store,
        bus,
        environment,
        api,
        http: hookyard_core::outbound::http_client().unwrap(),
        shutdown,
    }
}

/// The event the router would publish for webhook `raw_seq` of `crm`, routed to
/// `connection`.
pub fn routed(raw_seq: u64, connection: &str, event_type: &str, payload: Value) -> RoutedEvent {
    RoutedEvent {
        environment: "dev".parse().unwrap(),
        integration: "crm".parse().unwrap(),
        connection_id: Some(connection.to_string()),
        unrouted: None,
        raw_seq,
        index: 0,
        event_type: Some(event_type.to_string()),
        delivery_id: format!("d{raw_seq}"),
        payload,
        traceparent: None,
        origin: Default::default(),
    }
}

/// A sync of `crm` subscribed to `subscriptions` whose onWebhook body is `body`. Every
/// execution also saves a `Run` record with a random id: two rows for one event would
/// mean it was applied twice.
pub fn sync(subscriptions: &str, body: &str) -> String {
    format!(
        "import {{ createSync }} from 'nango';
         export default createSync({{
           models: {{ Contact: {{}}, Run: {{}} }},
           webhookSubscriptions: {subscriptions},
           onWebhook: async (nango, payload) => {{
             {body}
             await nango.batchSave([{{ id: payload.n + ':' + Math.random(), n: payload.n }}], 'Run');
           }},
         }});"
    )
}

impl<N> Harness<N> {
    /// A request to the API at `path` as the `dev` environment (its secret key).
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.api))
            .bearer_auth(&self.environment.secret_key)
    }

    /// `POST /functions/deploy` with these files.
    pub async fn post_deploy(&self, files: &[(&str, String)]) -> reqwest::Response {
        let files: BTreeMap<&str, &str> = files.iter().map(|(p, s)| (*p, s.as_str())).collect();
        self.request(reqwest::Method::POST, "/functions/deploy")
            .json(&json!({ "files": files }))
            .send()
            .await
            .unwrap()
    }

    /// A deploy that must succeed; its answer.
    pub async fn deploy(&self, files: &[(&str, String)]) -> Value {
        let response = self.post_deploy(files).await;
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert_eq!(status, 200, "{body}");
        body
    }

    /// The worker's three consumers (functions, forwarder, deliverer), as `hookyard worker` runs them.
    pub fn start_all(&self) {
        let (store, bus, config, shutdown) = (
            self.store.clone(),
            self.bus.clone(),
            self.config.clone(),
            self.shutdown.clone(),
        );
        tokio::spawn(async move { hookyard_worker::run_all(store, &bus, &config, shutdown).await });
    }

    /// A `generic-hmac` integration `key` signed with `secret`, and its connection `c0`
    /// (webhooks reach it with `?connection_id=c0`).
    pub async fn add_signed_integration(&self, key: &str, secret: &str) {
        let mut integration = NewIntegration::new(key.parse().unwrap(), "generic-hmac");
        integration.webhook_secret = Some(secret.into());
        self.store
            .create_integration(&self.environment, &integration)
            .await
            .unwrap();
        self.store
            .create_connection(
                &self.environment,
                &NewConnection {
                    integration: key.parse().unwrap(),
                    connection_id: "c0".into(),
                    connection_config: json!({}),
                    metadata: json!({}),
                    tags: json!({}),
                    credentials: None,
                },
            )
            .await
            .unwrap();
    }

    /// Ingest and the router, in-process; ingest's base URL for `dev`'s webhooks
    /// (`{base}/{integration}`).
    pub async fn start_edge(&self) -> String {
        let base = self.start_ingest().await;
        self.start_router(self.shutdown.clone());
        base
    }

    /// Ingest alone, in-process; its base URL for `dev`'s webhooks.
    pub async fn start_ingest(&self) -> String {
        self.start_ingest_until(self.shutdown.clone()).await.0
    }

    /// Ingest until `stop`: its base URL, and its server's task.
    async fn start_ingest_until(
        &self,
        stop: CancellationToken,
    ) -> (String, tokio::task::JoinHandle<std::io::Result<()>>) {
        let ingest = hookyard_ingest::Ingest::start(&self.config, self.store.clone(), self.bus.clone(), stop.clone())
            .await
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!(
            "http://{}/webhook/{}",
            listener.local_addr().unwrap(),
            self.environment.webhook_id
        );
        (base, tokio::spawn(hookyard_ingest::serve(listener, ingest, stop)))
    }

    /// Ingest, the router and the worker's consumers until `stop`, each started as its
    /// service starts (streams set up first); ingest's base URL, and a task that ends
    /// when all of them have stopped, each without an error.
    pub async fn start_services(&self, stop: &CancellationToken) -> (String, tokio::task::JoinHandle<()>) {
        let (base, ingest) = self.start_ingest_until(stop.clone()).await;
        let router = self.start_router(stop.clone());
        let (store, bus, config, stop) = (self.store.clone(), self.bus.clone(), self.config.clone(), stop.clone());
        let all = tokio::spawn(async move {
            let worker = hookyard_worker::run_all(store, &bus, &config, stop).await;
            worker.unwrap();
            router.await.unwrap().unwrap();
            ingest.await.unwrap().unwrap();
        });
        (base, all)
    }

    /// A router (with its replays and redrives) until `stop`.
    pub fn start_router(
        &self,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<Result<(), hookyard_router::RouterError>> {
        let router = Arc::new(hookyard_router::Router::new(self.store.clone(), &self.bus, &self.config).unwrap());
        tokio::spawn(router.run(stop))
    }

    /// Runs a worker until it has acked everything, then stops it: its consumer exists,
    /// and what comes next waits there.
    pub async fn run_worker_once(&self) {
        let stop = CancellationToken::new();
        let worker = Arc::new(Worker::new(self.store.clone(), &self.bus, &self.config).expect("worker"));
        let running = tokio::spawn(worker.run(stop.clone()));
        self.drained().await;
        stop.cancel();
        running.await.unwrap().unwrap();
    }

    pub fn start_worker(&self) -> Arc<Worker> {
        let worker = Arc::new(Worker::new(self.store.clone(), &self.bus, &self.config).expect("worker"));
        tokio::spawn(worker.clone().run(self.shutdown.clone()));
        worker
    }

    /// Publishes routed events of `crm` and waits for their acks.
    pub async fn publish(&self, events: impl IntoIterator<Item = (u64, &str, &str, Value)>) {
        let mut acks = Vec::new();
        for (raw_seq, connection, event_type, payload) in events {
            let (subject, headers, payload) = routed(raw_seq, connection, event_type, payload).to_message();
            acks.push(
                self.bus
                    .jetstream
                    .publish_with_headers(subject, headers, payload)
                    .await
                    .unwrap(),
            );
            if acks.len() == 256 {
                for ack in acks.drain(..) {
                    ack.await.unwrap();
                }
            }
        }
        for ack in acks {
            ack.await.unwrap();
        }
    }

    /// Waits until the workers have applied and acked every event.
    pub async fn drained(&self) {
        eventually("the worker to ack every event", Duration::from_secs(60), || async {
            hookyard_worker::idle(&self.bus.jetstream)
                .await
                .ok()
                .filter(|idle| *idle)
        })
        .await;
    }

    /// `GET {path}` on the API as the `dev` environment; the JSON answer.
    pub async fn api_get(&self, path: &str) -> Value {
        self.request(reqwest::Method::GET, path)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// A connection's records of `model`, read through `GET /records`.
    pub async fn records(&self, connection: &str, model: &str) -> Vec<Value> {
        let response = self
            .request(reqwest::Method::GET, &format!("/records?model={model}&limit=1000"))
            .header("Connection-Id", connection)
            .header("Provider-Config-Key", "crm")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        body["records"].as_array().cloned().unwrap_or_default()
    }

    /// `n` of every `Run` record in the database (one per applied execution).
    pub async fn runs(&self) -> Vec<u64> {
        raw_texts(&self.config.database_url, "SELECT id FROM records WHERE model = 'Run'")
            .await
            .iter()
            .map(|id| id.split(':').next().unwrap().parse().unwrap())
            .collect()
    }
}
