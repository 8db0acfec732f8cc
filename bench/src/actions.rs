//! Actions through the API: `POST /action/trigger` of an action that checks its input
//! against a zod schema and answers at once (no provider call), so what is measured is
//! hookyard's own path: the route, the store reads (connection, functions, integration),
//! the JS thread and the answer. With a provider, the action first fetches a contact from
//! a local provider API that answers after a set time, as an action does in production.
//! Postgres, a fresh database; the API in this process.

use std::time::{Duration, Instant};

use hookyard_core::Config;
use hookyard_testkit::PgDatabase;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::load::{run_with, Plan};
use crate::setup::{
    cpu_seconds, deploy_files, postgres_cpu, postgres_cpu_since, start_provider, store_with_connection,
};

const ACTION: &str = "import { createAction } from 'nango';
import * as z from 'zod';
export default createAction({
  input: z.object({ n: z.number() }),
  output: z.object({ n: z.number(), connection: z.string() }),
  exec: async (nango, input) => ({ n: input.n, connection: nango.connectionId }),
});";

/// The same, after fetching contact `n` from the provider.
const FETCHING_ACTION: &str = "import { createAction } from 'nango';
import * as z from 'zod';
export default createAction({
  input: z.object({ n: z.number() }),
  output: z.object({ n: z.number(), email: z.string() }),
  exec: async (nango, input) => {
    const { data } = await nango.get({ endpoint: `/contacts/${input.n}` });
    return { n: input.n, email: data.email };
  },
});";

/// `provider_latency`: how long the provider API the action calls takes to answer (`None`:
/// it calls none).
pub async fn run(
    plan: &Plan,
    threads: usize,
    concurrent_runs: usize,
    provider_latency: Option<Duration>,
) -> anyhow::Result<()> {
    let pg = PgDatabase::create().await;
    let mut config = Config {
        database_url: pg.url.clone(),
        ..Config::default()
    };
    config.api.action_threads = threads;
    config.api.action_concurrent_runs = concurrent_runs;
    let api = match provider_latency {
        Some(latency) => Some(start_provider(latency).await?.0),
        None => None,
    };
    // The provider is on loopback.
    config.forwarding.allow_loopback = api.is_some();
    let (store, environment) = store_with_connection(&config, api.as_deref()).await?;
    let action = if api.is_some() { FETCHING_ACTION } else { ACTION };
    let files = [("crm/actions/echo.ts".to_string(), action.to_string())].into();
    deploy_files(&store, &environment, &config, files).await?;

    let (router, _) = hookyard_api::router(store, &config)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/action/trigger", listener.local_addr()?);
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(hookyard_api::serve(listener, router, shutdown.clone()));

    let key = environment.secret_key.clone();
    let request = move |n: u64| {
        let mut headers = reqwest::header::HeaderMap::new();
        let mut add = |name: &'static str, value: String| {
            headers.insert(name, value.parse().expect("a valid header value"));
        };
        add("authorization", format!("Bearer {key}"));
        add("connection-id", "c0".into());
        add("provider-config-key", "crm".into());
        add("content-type", "application/json".into());
        let body = json!({"action_name": "echo", "input": {"n": n}})
            .to_string()
            .into_bytes();
        (headers, body)
    };
    let (own, postgres, started) = (cpu_seconds("self"), postgres_cpu(), Instant::now());
    let report = run_with(&url, plan, request).await?;
    let (own, postgres) = (cpu_seconds("self") - own, postgres_cpu_since(&postgres));
    shutdown.cancel();
    let _ = server.await;

    let calls = match provider_latency {
        None => "no provider call".to_string(),
        Some(latency) => format!("one provider call answered in {} ms", latency.as_millis()),
    };
    let runs = concurrent_runs.max(threads);
    report.print(&format!(
        "actions: POST /action/trigger of an action that checks its input and answers ({calls}), Postgres, {threads} action thread(s), {runs} in progress at most"
    ));
    // Over the warm-up too: requests are counted over the measured span only, so the
    // figures per 1000 are a little high.
    let count = report.ok().max(1) as f64;
    println!(
        "  cpu per 1000 actions: bench process (API + load generator) {:.0} ms, Postgres {:.0} ms ({:.1}s of run)",
        own * 1e6 / count,
        postgres * 1e6 / count,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
