//! Worker throughput and latency for the `examples/crm-contacts` function on Postgres.
//!
//! Routed events go straight into `HOOKS_CONN` (as the router publishes them), spread
//! over `connections` connections; each saves one Contact record. The workers run in
//! child processes (this binary, `worker-process`), so that their CPU is their own:
//!
//! 1. burst: `events` events are published first, then the worker is timed from the
//!    moment it starts consuming until it has acked the last one;
//! 2. latency: events are published at a steady rate below the burst throughput, and
//!    each one's time from publish ack to its record's commit is measured (the
//!    record's `first_seen_at`, stamped in the committing transaction).
//!
//! With `fetch`, the sync's onWebhook first fetches each event's contact from a local
//! provider API (`nango.get`), as a handler for a provider's thin events does.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use chrono::{DateTime, Utc};
use hdrhistogram::Histogram;
use hookyard_core::routed::RoutedEvent;
use hookyard_core::secrets::Cipher;
use hookyard_core::store::{NewConnection, NewIntegration};
use hookyard_core::streams::{Bus, CONN_STREAM};
use hookyard_core::{Config, Store};
use hookyard_testkit::PgDatabase;
use serde_json::json;

use crate::setup::{
    cpu_seconds, deploy_files, postgres_cpu, postgres_cpu_since, provider_settings, start_nats, start_provider,
};

pub struct Plan {
    pub events: u64,
    pub connections: usize,
    pub latency_seconds: u64,
    /// Events/s of the latency phase; half the burst throughput when 0.
    pub rate: u64,
    pub js_threads: usize,
    /// The worker's runs in progress at once (0: its default).
    pub concurrent_runs: usize,
    /// Worker processes on the consumer.
    pub workers: usize,
    /// Where every event is also forwarded: nowhere, a receiver answering 200 at once,
    /// or one that accepts connections and never answers.
    pub destination: Destination,
    /// Slow events, if any.
    pub slow: Option<Slow>,
    /// Whether onWebhook fetches each contact from the provider (a local one) first.
    pub fetch: bool,
    /// How long the provider takes to answer each fetch (a real API's 100–300 ms).
    pub provider_latency: Duration,
}

/// Every `every`th event (`every` > 0) is a `contact.slow.{i}` one, for `i` in turn
/// among `syncs` (> 0) syncs, each of which takes `ms` on its JS thread.
#[derive(Clone, Copy)]
pub struct Slow {
    pub every: u64,
    pub ms: u64,
    pub syncs: u64,
}

/// The events the plan publishes: which of them are slow.
#[derive(Clone, Copy)]
struct Mix(Option<Slow>);

impl Mix {
    /// The slow sync event `n` goes to, if it is slow.
    fn slow_sync(&self, n: u64) -> Option<u64> {
        self.0
            .filter(|slow| n % slow.every == 0)
            .map(|slow| (n / slow.every) % slow.syncs)
    }

    fn is_slow(&self, n: u64) -> bool {
        self.slow_sync(n).is_some()
    }

    fn event_type(&self, n: u64) -> String {
        match self.slow_sync(n) {
            Some(i) => format!("contact.slow.{i}"),
            None => "contact.updated".into(),
        }
    }

    /// Events among `range` that save a Contact.
    fn contacts(&self, range: std::ops::RangeInclusive<u64>) -> i64 {
        range.filter(|n| !self.is_slow(*n)).count() as i64
    }
}

/// A sync for `contact.slow.{i}` events that waits `ms` on its JS thread, then succeeds.
fn slow_sync(i: u64, ms: u64) -> String {
    format!(
        "import {{ createSync }} from 'nango';
         export default createSync({{
           models: {{ Slow: {{}} }},
           webhookSubscriptions: ['contact.slow.{i}'],
           onWebhook: async () => {{ await new Promise((done) => setTimeout(done, {ms})); }},
         }});"
    )
}

/// The example's sync, its onWebhook filling each event in from the provider.
const FETCHING_SYNC: &str = "import { createSync } from 'nango';
export default createSync({
  models: { Contact: {} },
  webhookSubscriptions: ['contact.updated'],
  onWebhook: async (nango, payload) => {
    const { data } = await nango.get({ endpoint: `/contacts/${payload.contact.id}` });
    await nango.batchSave([{ id: String(data.id), email: data.email }], 'Contact');
  },
});
";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Destination {
    None,
    Fast,
    Silent,
}

pub async fn run(plan: &Plan) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (nats, port) = start_nats(dir.path())?;
    let pg = PgDatabase::create().await;
    let key = Cipher::generate_key_text();
    let config = Config {
        nats_url: format!("nats://127.0.0.1:{port}"),
        database_url: pg.url.clone(),
        ..Config::default()
    };
    let store = Store::connect(&config.database_url, Cipher::from_text(&key)?).await?;
    let environment = store.ensure_environment(&"dev".parse()?).await?;
    let mut integration = NewIntegration::new("demo".parse()?, "generic");
    let provider = match plan.fetch {
        true => {
            let (url, calls) = start_provider(plan.provider_latency).await?;
            integration.settings = provider_settings(&url);
            Some(calls)
        }
        false => None,
    };
    store.create_integration(&environment, &integration).await?;
    let connections: Vec<String> = (0..plan.connections).map(|n| format!("conn-{n}")).collect();
    for id in &connections {
        let connection = NewConnection {
            integration: "demo".parse()?,
            connection_id: id.clone(),
            connection_config: json!({}),
            metadata: json!({}),
            tags: json!({}),
            credentials: plan.fetch.then(|| hookyard_core::store::Credentials::ApiKey {
                api_key: format!("key-{id}"),
            }),
        };
        store.create_connection(&environment, &connection).await?;
    }
    let mix = Mix(plan.slow);
    let mut files = hookyard_functions::examples::files(hookyard_functions::examples::CRM_CONTACTS);
    if plan.fetch {
        files.insert("demo/syncs/contacts.ts".into(), FETCHING_SYNC.into());
    }
    if let Some(slow) = plan.slow {
        for i in 0..slow.syncs {
            files.insert(format!("demo/syncs/slow{i}.js"), slow_sync(i, slow.ms));
            files
                .get_mut("index.ts")
                .expect("the example has an index")
                .push_str(&format!("import './demo/syncs/slow{i}.js';\n"));
        }
    }
    deploy_files(&store, &environment, &config, files).await?;
    if plan.destination != Destination::None {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/hook", listener.local_addr()?);
        if plan.destination == Destination::Silent {
            tokio::spawn(async move {
                let mut held = Vec::new();
                while let Ok((socket, _)) = listener.accept().await {
                    held.push(socket);
                }
            });
        } else {
            let app = axum::Router::new().route("/hook", axum::routing::post(|| std::future::ready("ok")));
            tokio::spawn(async move { axum::serve(listener, app).await });
        }
        let settings = hookyard_core::store::forwarding::ForwardingSettings {
            urls: vec![url],
            ..Default::default()
        };
        store
            .set_forwarding(
                environment.id,
                hookyard_core::store::forwarding::ForwardingScope::Environment,
                &settings,
            )
            .await?;
    }
    let bus = Bus::connect(&config, "bench-worker").await?;
    bus.ensure_streams(&config.streams, &store).await?;

    // Words that only several workers take.
    let several = |text: &'static str| if plan.workers > 1 { text } else { "" };
    println!(
        "worker benchmark: examples/crm-contacts (one Contact saved per event{}), routed events published \
         straight into {CONN_STREAM}, {} connections, Postgres, {} worker process{} (JS threads: {}; runs in progress: {}{}){}\n",
        match (plan.fetch, plan.provider_latency.as_millis()) {
            (false, _) => String::new(),
            (true, 0) => ", fetched from a local provider API first".to_string(),
            (true, ms) => format!(", fetched from a local provider API answering in {ms} ms first"),
        },
        plan.connections,
        plan.workers,
        several("es"),
        if plan.js_threads == 0 {
            "one per CPU".to_string()
        } else {
            plan.js_threads.to_string()
        },
        if plan.concurrent_runs == 0 {
            format!("{} per JS thread", hookyard_functions::pool::RUNS_PER_TURN)
        } else {
            plan.concurrent_runs.to_string()
        },
        several("; each"),
        match plan.slow {
            Some(Slow { every, ms, syncs }) =>
                format!("; every {every}th event is slow ({ms} ms), for {syncs} slow syncs in turn"),
            None => String::new(),
        }
    );

    // 1. Burst.
    let started = Instant::now();
    publish(&bus.jetstream, &connections, mix, 1..=plan.events, "burst").await?;
    println!(
        "published {} events in {:.1}s",
        plan.events,
        started.elapsed().as_secs_f64()
    );
    let mut workers = (0..plan.workers)
        .map(|_| spawn_worker(&config, &key, plan))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let pids: Vec<String> = workers.iter().map(|worker| worker.id().to_string()).collect();
    let stream = bus.jetstream.get_stream(CONN_STREAM).await?;
    let consumer_exists = || async {
        stream
            .get_consumer::<jetstream::consumer::pull::Config>(hookyard_worker::CONSUMER)
            .await
            .is_ok()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !consumer_exists().await {
        anyhow::ensure!(Instant::now() < deadline, "the worker did not start");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let cpu = Cpu::now(&pids, nats.pid().unwrap_or(0));
    let started = Instant::now();
    wait_acked(&bus.jetstream, &mut workers).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let used = cpu.since();
    let throughput = plan.events as f64 / elapsed;
    let saved: i64 = sqlx_count(&pg.url).await?;
    let expected = mix.contacts(1..=plan.events);
    anyhow::ensure!(saved == expected, "{saved} records saved for {expected} contact events");
    println!(
        "burst:   {} events in {elapsed:.2}s = {throughput:.0} events/s through {} worker{}\n         \
         CPU per 1,000 events: worker process{} {:.0} ms, Postgres {:.0} ms, nats-server {:.0} ms\n         \
         worker's peak memory (RSS): {:.0} MiB{}",
        plan.events,
        plan.workers,
        several("s"),
        several("es"),
        used.worker * 1e6 / plan.events as f64,
        used.postgres * 1e6 / plan.events as f64,
        used.nats * 1e6 / plan.events as f64,
        pids.iter().map(|pid| peak_rss_kib(pid)).max().unwrap_or(0) as f64 / 1024.0,
        several(" (the largest)"),
    );

    // 2. Latency at a steady rate.
    let rate = if plan.rate > 0 {
        plan.rate
    } else {
        (throughput / 2.0).max(100.0) as u64
    };
    let count = rate * plan.latency_seconds;
    let first = plan.events + 1;
    let acked = paced(&bus.jetstream, &connections, mix, first..=plan.events + count, rate).await?;
    wait_acked(&bus.jetstream, &mut workers).await?;
    let committed = commit_times(&pg.url).await?;
    let mut histogram = Histogram::<u64>::new(3)?;
    for (n, at) in acked.iter().filter(|(n, _)| !mix.is_slow(*n)) {
        let Some(done) = committed.get(n) else {
            anyhow::bail!("event {n} has no record");
        };
        let micros = (*done - *at).num_microseconds().unwrap_or(0).max(0) as u64;
        histogram.record(micros.max(1))?;
    }
    println!(
        "latency: {count} events at {rate}/s, publish ack to commit: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        histogram.value_at_quantile(0.5) as f64 / 1000.0,
        histogram.value_at_quantile(0.99) as f64 / 1000.0,
        histogram.max() as f64 / 1000.0
    );
    if plan.destination != Destination::None {
        let mut consumer = bus
            .jetstream
            .get_stream(hookyard_core::streams::FWD_STREAM)
            .await?
            .get_consumer::<jetstream::consumer::pull::Config>(hookyard_worker::deliver::DELIVERER)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let info = consumer.info().await?;
        println!(
            "forwarding at the end: {} deliveries waiting or in flight",
            info.num_pending + info.num_ack_pending as u64
        );
    }
    if let Some(calls) = provider {
        let calls = calls.load(std::sync::atomic::Ordering::Relaxed);
        let contacts = mix.contacts(1..=plan.events + count) as u64;
        anyhow::ensure!(
            calls >= contacts,
            "{calls} provider calls for {contacts} contact events"
        );
        println!("provider calls: {calls} for {contacts} contact events");
    }
    for (pid, mut worker) in pids.iter().zip(workers) {
        let _ = Command::new("kill").args(["-TERM", pid]).status();
        let _ = worker.wait();
    }
    Ok(())
}

fn event(n: u64, connections: &[String], mix: Mix, phase: &str) -> RoutedEvent {
    let event_type = mix.event_type(n);
    RoutedEvent {
        environment: "dev".parse().expect("a valid name"),
        integration: "demo".parse().expect("a valid key"),
        connection_id: Some(connections[n as usize % connections.len()].clone()),
        unrouted: None,
        raw_seq: n,
        index: 0,
        event_type: Some(event_type.clone()),
        delivery_id: format!("{phase}-{n}"),
        payload: json!({
            "type": event_type,
            "contact": {"id": n, "email": format!("person{n}@example.com"), "first_name": "Ada", "last_name": "Lovelace",
                        "updated_at": "2026-11-26T10:00:00Z"}
        }),
        traceparent: None,
        origin: Default::default(),
    }
}

async fn publish(
    jetstream: &jetstream::Context,
    connections: &[String],
    mix: Mix,
    range: std::ops::RangeInclusive<u64>,
    phase: &str,
) -> anyhow::Result<()> {
    let mut acks = Vec::with_capacity(1024);
    for n in range {
        let (subject, headers, payload) = event(n, connections, mix, phase).to_message();
        acks.push(jetstream.publish_with_headers(subject, headers, payload).await?);
        if acks.len() == 1024 {
            for ack in acks.drain(..) {
                ack.await?;
            }
        }
    }
    for ack in acks {
        ack.await?;
    }
    Ok(())
}

/// Publishes one event every 1/rate s; returns each one's publish-ack time.
async fn paced(
    jetstream: &jetstream::Context,
    connections: &[String],
    mix: Mix,
    range: std::ops::RangeInclusive<u64>,
    rate: u64,
) -> anyhow::Result<Vec<(u64, DateTime<Utc>)>> {
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut pending = Vec::new();
    for n in range {
        ticker.tick().await;
        let (subject, headers, payload) = event(n, connections, mix, "paced").to_message();
        let ack = jetstream.publish_with_headers(subject, headers, payload).await?;
        pending.push(tokio::spawn(async move { ack.await.map(|_| (n, Utc::now())) }));
    }
    let mut acked = Vec::with_capacity(pending.len());
    for task in pending {
        acked.push(task.await??);
    }
    Ok(acked)
}

/// Waits until the workers have applied and acked every event published so far.
async fn wait_acked(jetstream: &jetstream::Context, workers: &mut [Child]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    while !hookyard_worker::idle(jetstream).await? {
        for worker in workers.iter_mut() {
            if let Some(status) = worker.try_wait()? {
                anyhow::bail!("a worker exited: {status}");
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "the worker did not finish within 10 minutes");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

fn spawn_worker(config: &Config, key: &str, plan: &Plan) -> anyhow::Result<Child> {
    Ok(Command::new(std::env::current_exe()?)
        .arg("worker-process")
        .env("HOOKYARD_NATS_URL", &config.nats_url)
        .env("HOOKYARD_DATABASE_URL", &config.database_url)
        .env("HOOKYARD_ENCRYPTION_KEY", key)
        .env("HOOKYARD_WORKER__JS_THREADS", plan.js_threads.to_string())
        .env("HOOKYARD_WORKER__CONCURRENT_RUNS", plan.concurrent_runs.to_string())
        .env("HOOKYARD_FORWARDING__ALLOW_LOOPBACK", "true")
        .env(
            "HOOKYARD_TELEMETRY__LOG_FILTER",
            std::env::var("BENCH_WORKER_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .spawn()?)
}

/// `worker-process`: one worker on the configuration in the environment, until SIGTERM.
pub async fn run_process() -> anyhow::Result<()> {
    let config = Config::load()?;
    let _telemetry = hookyard_core::telemetry::init(&config.telemetry, "hookyard-bench-worker")?;
    hookyard_worker::run(&config, hookyard_core::shutdown::on_signal())
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
}

struct Cpu {
    worker_pids: Vec<String>,
    nats_pid: String,
    worker: f64,
    nats: f64,
    postgres: HashMap<String, f64>,
}

struct CpuDelta {
    worker: f64,
    nats: f64,
    postgres: f64,
}

impl Cpu {
    /// All workers' CPU counts as the worker's.
    fn now(worker_pids: &[String], nats_pid: u32) -> Cpu {
        let nats_pid = nats_pid.to_string();
        Cpu {
            worker: worker_pids.iter().map(|pid| cpu_seconds(pid)).sum(),
            nats: cpu_seconds(&nats_pid),
            postgres: postgres_cpu(),
            worker_pids: worker_pids.to_vec(),
            nats_pid,
        }
    }

    fn since(&self) -> CpuDelta {
        CpuDelta {
            worker: self.worker_pids.iter().map(|pid| cpu_seconds(pid)).sum::<f64>() - self.worker,
            nats: cpu_seconds(&self.nats_pid) - self.nats,
            postgres: postgres_cpu_since(&self.postgres),
        }
    }
}

/// A process's peak resident memory (`VmHWM`), in KiB; 0 when it cannot be read.
fn peak_rss_kib(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmHWM:"))
                .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

async fn sqlx_count(url: &str) -> anyhow::Result<i64> {
    let rows = hookyard_testkit::raw_texts(url, "SELECT COUNT(*)::text FROM records WHERE model = 'Contact'").await;
    Ok(rows.first().and_then(|r| r.parse().ok()).unwrap_or(0))
}

/// Each Contact's commit time, by event number (its id).
async fn commit_times(url: &str) -> anyhow::Result<HashMap<u64, DateTime<Utc>>> {
    let rows = hookyard_testkit::raw_texts(
        url,
        "SELECT id || ' ' || to_char(first_seen_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') FROM records WHERE model = 'Contact'",
    )
    .await;
    let mut times = HashMap::with_capacity(rows.len());
    for row in rows {
        let (id, at) = row.split_once(' ').ok_or_else(|| anyhow::anyhow!("bad row {row}"))?;
        times.insert(id.parse()?, at.parse()?);
    }
    Ok(times)
}
