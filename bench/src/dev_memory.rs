//! The memory of a `hookyard dev` process under load: its resident set before, and after
//! each round of webhooks once everything they caused is done. What a round leaves
//! behind shows up as growth from round to round.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hookyard_testkit::free_port;

use crate::load::{self, Plan};

/// How long a round's webhooks may take to go through the pipeline.
const DRAIN_LIMIT: Duration = Duration::from_secs(300);

pub async fn run(hookyard: &Path, plan: &Plan, rounds: u32) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (ingest, api, metrics) = (free_port(), free_port(), free_port());
    let mut child = Command::new(hookyard)
        .arg("dev")
        .arg("--no-demo")
        .current_dir(dir.path())
        .env("HOOKYARD_INGEST__LISTEN", format!("127.0.0.1:{ingest}"))
        .env("HOOKYARD_API__LISTEN", format!("127.0.0.1:{api}"))
        .env("HOOKYARD_TELEMETRY__METRICS_LISTEN", format!("127.0.0.1:{metrics}"))
        // Its log of each accepted webhook is not what is measured.
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| {
            format!(
                "starting {} (build it with `cargo build --release -p hookyard-cli`)",
                hookyard.display()
            )
        })?;
    let pid = child.id();
    let stdout = child.stdout.take().context("the child's stdout")?;
    let url = tokio::task::spawn_blocking(move || webhook_url(stdout)).await??;
    let metrics = format!("http://127.0.0.1:{metrics}/metrics");

    println!(
        "hookyard dev memory: {} ({pid}), {} connections, {} B bodies, {}s rounds\n",
        hookyard.display(),
        plan.connections,
        plan.body_bytes,
        plan.duration.as_secs()
    );
    println!("resident at start: {:.1} MiB", rss_mib(pid)?);
    let client = hookyard_core::outbound::http_client().map_err(anyhow::Error::msg)?;
    for round in 1..=rounds {
        let report = load::run(&url, plan).await?;
        report.print(&format!("round {round}"));
        let drained = drain(&client, &metrics).await?;
        println!(
            "  resident after the pipeline drained ({:.0}s): {:.1} MiB",
            drained.as_secs_f64(),
            rss_mib(pid)?
        );
    }
    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let _ = child.wait();
    Ok(())
}

/// Reads the dev banner up to its last line; the webhook URL it prints.
fn webhook_url(stdout: std::process::ChildStdout) -> anyhow::Result<String> {
    let mut url = None;
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let line = line?;
        if let Some(found) = line.trim().strip_prefix("webhook URL") {
            url = Some(found.trim().to_string());
        }
        if line.contains("Press Ctrl-C") {
            break;
        }
    }
    // Keep reading, so the child never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    url.context("hookyard dev ended before printing its webhook URL")
}

/// Waits until no consumer has messages pending or unacked (`/metrics` reads them fresh).
async fn drain(client: &reqwest::Client, metrics: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut quiet = 0;
    while started.elapsed() < DRAIN_LIMIT {
        let text = client.get(metrics).send().await?.text().await?;
        let waiting: f64 = text
            .lines()
            .filter(|line| {
                line.starts_with("hookyard_consumer_pending") || line.starts_with("hookyard_consumer_ack_pending")
            })
            .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum();
        // Twice in a row: one reading can fall between a message's ack and the next
        // stage's publish.
        quiet = if waiting == 0.0 { quiet + 1 } else { 0 };
        if quiet == 2 {
            return Ok(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    anyhow::bail!("the pipeline did not drain within {DRAIN_LIMIT:?}")
}

fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).context("the child's /proc status")?;
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS in /proc status")?;
    Ok(kib / 1024.0)
}
