//! Reconciler tick cost. With N connections under a deployed exec sync (daily), the
//! first tick queues one job per connection; the ticks after it find next to nothing
//! due (slots are spread over the day). That steady state is what every reconciler pays once a
//! second (`hookyard_reconciler::TICK`), so its time and Postgres CPU are measured here.

use std::time::{Duration, Instant};

use chrono::Utc;
use hookyard_core::secrets::Cipher;
use hookyard_core::store::NewIntegration;
use hookyard_core::streams::Bus;
use hookyard_core::{Config, Store};
use hookyard_reconciler::Reconciler;
use hookyard_testkit::{raw_execute, raw_texts, PgDatabase};

use crate::setup::{cpu_seconds, deploy_example, postgres_cpu, postgres_cpu_since, start_nats};

pub async fn run(sizes: &[usize], ticks: usize) -> anyhow::Result<()> {
    anyhow::ensure!(ticks > 0, "--ticks must be at least 1");
    let dir = tempfile::tempdir()?;
    let (_nats, port) = start_nats(dir.path())?;
    println!(
        "reconciler benchmark: N connections under one exec sync (examples/crm-contacts, daily), Postgres; \
         the first tick queues a job per connection, then {ticks} ticks with nothing due\n"
    );
    println!(
        "{:>11} {:>12} {:>10} {:>10} {:>18} {:>22} {:>8}",
        "connections", "first tick", "tick p50", "tick max", "bench CPU / tick", "Postgres CPU / tick", "queued"
    );
    for &connections in sizes {
        let pg = PgDatabase::create().await;
        let config = Config {
            nats_url: format!("nats://127.0.0.1:{port}"),
            database_url: pg.url.clone(),
            ..Config::default()
        };
        let store = Store::connect(&pg.url, Cipher::from_text(&Cipher::generate_key_text())?).await?;
        let environment = store.ensure_environment(&"dev".parse()?).await?;
        let integration = store
            .create_integration(&environment, &NewIntegration::new("demo".parse()?, "generic"))
            .await?;
        // One statement: creating them one by one would take longer than the measurement.
        raw_execute(
            &pg.url,
            &format!(
                "INSERT INTO connections (environment_id, integration_id, connection_id, connection_config, metadata, tags, created_at, updated_at)
                 SELECT {}, {}, 'conn-' || g, '{{}}', '{{}}', '{{}}', now(), now() FROM generate_series(1, {connections}) g",
                environment.id, integration.id
            ),
        )
        .await;
        deploy_example(&store, &environment, &config).await?;
        let bus = Bus::connect(&config, "bench-reconciler").await?;
        bus.ensure_streams(&config.streams, &store).await?;
        // A fresh stream per size: the jobs of the size before are not counted again.
        bus.jetstream
            .get_stream(hookyard_core::streams::EXEC_STREAM)
            .await?
            .purge()
            .await?;
        let reconciler = Reconciler::new(store.clone(), bus.jetstream.clone());

        let started = Instant::now();
        let first = reconciler.tick(Utc::now()).await?;
        let first_took = started.elapsed();
        anyhow::ensure!(
            first.scheduled == connections,
            "the first tick queued {} jobs for {connections} connections",
            first.scheduled
        );
        let jobs = bus
            .jetstream
            .get_stream(hookyard_core::streams::EXEC_STREAM)
            .await?
            .info()
            .await?
            .state
            .messages;
        anyhow::ensure!(
            jobs == connections as u64,
            "the first tick put {jobs} jobs in HOOKS_EXEC for {connections} connections"
        );

        // The first tick wrote a state per connection; autovacuum would analyze the table
        // within a minute, and the steady state is what is measured.
        raw_execute(&pg.url, "ANALYZE").await;
        let (own, postgres) = (cpu_seconds("self"), postgres_cpu());
        let mut took: Vec<Duration> = Vec::with_capacity(ticks);
        // Slots are spread over the day: a few come round while the ticks are timed.
        let mut queued = 0;
        for _ in 0..ticks {
            let started = Instant::now();
            queued += reconciler.tick(Utc::now()).await?.scheduled;
            took.push(started.elapsed());
        }
        let per_tick = |seconds: f64| seconds * 1e3 / ticks as f64;
        let own = per_tick(cpu_seconds("self") - own);
        let postgres = per_tick(postgres_cpu_since(&postgres));
        took.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "{connections:>11} {:>10.0}ms {:>8.1}ms {:>8.1}ms {:>16.1}ms {:>20.1}ms {queued:>8}",
            ms(first_took),
            ms(took[took.len() / 2]),
            ms(took[took.len() - 1]),
            own,
            postgres
        );
        let states = raw_texts(&pg.url, "SELECT COUNT(*)::text FROM sync_states").await;
        anyhow::ensure!(
            states.first().map(String::as_str) == Some(connections.to_string().as_str()),
            "one sync state per connection: {states:?}"
        );
    }
    Ok(())
}
