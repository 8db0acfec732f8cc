//! What the benchmarks share: a nats-server of their own and CPU accounting.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use hookyard_core::embedded_nats::{server_bin, ConfigFile, EmbeddedNats, ServerSpec};

use crate::load::Report;

/// A nats-server on a free loopback port with its store under `dir`.
pub fn start_nats(dir: &Path) -> anyhow::Result<(EmbeddedNats, u16)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let bin = server_bin();
    let nats = EmbeddedNats::start(
        &ServerSpec {
            bin: &bin,
            port,
            store_dir: &dir.join("js"),
            config: ConfigFile::Written {
                path: &dir.join("nats.conf"),
                max_payload_mb: 16,
            },
            cluster: None,
            monitor_port: None,
            own_process_group: false,
        },
        Duration::from_secs(30),
    )?;
    Ok((nats, port))
}

/// A provider API answering `GET /contacts/{id}` after `latency`; its address and a count
/// of the calls it answered.
pub async fn start_provider(
    latency: Duration,
) -> anyhow::Result<(String, std::sync::Arc<std::sync::atomic::AtomicU64>)> {
    use std::sync::atomic::{AtomicU64, Ordering};
    let calls = std::sync::Arc::new(AtomicU64::new(0));
    let counted = calls.clone();
    let app = axum::Router::new().route(
        "/contacts/{id}",
        axum::routing::get(move |axum::extract::Path(id): axum::extract::Path<u64>| {
            counted.fetch_add(1, Ordering::Relaxed);
            async move {
                if !latency.is_zero() {
                    tokio::time::sleep(latency).await;
                }
                axum::Json(serde_json::json!({"id": id, "email": format!("person{id}@example.com")}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((url, calls))
}

/// An integration's settings that point it at the provider API at `url`, the connection's
/// API key in `X-API-Key`.
pub fn provider_settings(url: &str) -> serde_json::Value {
    serde_json::json!({"api": {"base_url": url, "api_key_header": "X-API-Key"}})
}

/// The store at `config.database_url` with a `dev` environment, a generic `crm`
/// integration and its connection `c0`: without credentials, or with an API key for the
/// provider API at `provider` (the integration's base URL).
pub async fn store_with_connection(
    config: &hookyard_core::Config,
    provider: Option<&str>,
) -> anyhow::Result<(hookyard_core::Store, hookyard_core::store::Environment)> {
    use hookyard_core::secrets::{random_bytes, Cipher};
    use hookyard_core::store::{Credentials, NewConnection, NewIntegration};
    let store = hookyard_core::Store::connect(&config.database_url, Cipher::from_bytes(random_bytes())).await?;
    let environment = store.ensure_environment(&"dev".parse()?).await?;
    let mut integration = NewIntegration::new("crm".parse()?, "generic");
    if let Some(url) = provider {
        integration.settings = provider_settings(url);
    }
    store.create_integration(&environment, &integration).await?;
    store
        .create_connection(
            &environment,
            &NewConnection {
                integration: "crm".parse()?,
                connection_id: "c0".into(),
                connection_config: serde_json::json!({}),
                metadata: serde_json::json!({}),
                tags: serde_json::json!({}),
                credentials: provider.map(|_| Credentials::ApiKey {
                    api_key: "key-c0".into(),
                }),
            },
        )
        .await?;
    Ok((store, environment))
}

/// Deploys `examples/crm-contacts` to `environment`.
pub async fn deploy_example(
    store: &hookyard_core::Store,
    environment: &hookyard_core::store::Environment,
    config: &hookyard_core::Config,
) -> anyhow::Result<()> {
    let files = hookyard_functions::examples::files(hookyard_functions::examples::CRM_CONTACTS);
    deploy_files(store, environment, config, files).await
}

/// Compiles and deploys the project of `files`.
pub async fn deploy_files(
    store: &hookyard_core::Store,
    environment: &hookyard_core::store::Environment,
    config: &hookyard_core::Config,
    files: std::collections::BTreeMap<String, String>,
) -> anyhow::Result<()> {
    let project = hookyard_functions::compile::compile_project(files, &config.worker.limits)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    store
        .deploy_functions(environment, &project.bundle, &project.syncs)
        .await?;
    Ok(())
}

/// CPU seconds used by this process (servers and load generator) and by nats-server.
pub struct CpuMeter {
    nats_pid: u32,
    own: f64,
    nats: f64,
}

pub struct CpuUsed {
    own: f64,
    nats: f64,
}

impl CpuMeter {
    pub fn start(nats_pid: u32) -> CpuMeter {
        CpuMeter {
            nats_pid,
            own: cpu_seconds("self"),
            nats: cpu_seconds(&nats_pid.to_string()),
        }
    }

    pub fn stop(self) -> CpuUsed {
        CpuUsed {
            own: cpu_seconds("self") - self.own,
            nats: cpu_seconds(&self.nats_pid.to_string()) - self.nats,
        }
    }
}

impl CpuUsed {
    pub fn print(&self, report: &Report) {
        // Includes the warm-up second: requests are counted over the same span.
        let (own, nats) = self.per_thousand(report.ok());
        println!(
            "  cpu: bench process (server + load generator) {:.1}s, nats-server {:.1}s; per 1000 requests {own:.0} ms + {nats:.0} ms (incl. warm-up)",
            self.own, self.nats,
        );
    }

    /// Milliseconds of CPU per 1000 of `count`: this process's, then nats-server's.
    pub fn per_thousand(&self, count: u64) -> (f64, f64) {
        let count = count.max(1) as f64;
        (self.own * 1e6 / count, self.nats * 1e6 / count)
    }
}

/// utime + stime of a process from /proc (Linux), in seconds; 0 where unavailable.
pub fn cpu_seconds(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest.split(' ').collect())
        .unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// CPU seconds of each `postgres` process on the machine (the server and its backends),
/// by pid.
pub fn postgres_cpu() -> HashMap<String, f64> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return HashMap::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(String::from))
        .filter(|pid| pid.chars().all(|c| c.is_ascii_digit()))
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim() == "postgres"))
        .map(|pid| {
            let seconds = cpu_seconds(&pid);
            (pid, seconds)
        })
        .collect()
}

/// CPU seconds the `postgres` processes used since `before` was read. One that exited
/// meanwhile is left out (its last seconds can no longer be read); one started since
/// counts whole.
pub fn postgres_cpu_since(before: &HashMap<String, f64>) -> f64 {
    postgres_cpu()
        .into_iter()
        .map(|(pid, now)| now - before.get(&pid).copied().unwrap_or(0.0))
        .sum()
}
