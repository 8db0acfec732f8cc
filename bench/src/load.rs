//! A closed-loop HTTP load generator: N connections, each with one request in flight.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

pub struct Plan {
    pub connections: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub body_bytes: usize,
    pub headers: Headers,
}

/// What each request carries besides the client's own `host`, `content-length` and
/// `accept`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Headers {
    /// Nothing more.
    Minimal,
    /// What GitHub sends with a delivery ([`GITHUB_HEADERS`]), with a fresh
    /// `x-github-delivery` per request.
    Github,
}

/// The headers GitHub sends with a webhook delivery (its documented set), values from
/// its documentation's example.
pub const GITHUB_HEADERS: &[(&str, &str)] = &[
    ("user-agent", "GitHub-Hookshot/9b3e2a1"),
    ("content-type", "application/json"),
    ("x-github-event", "installation"),
    ("x-github-delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958"),
    ("x-github-hook-id", "292430182"),
    ("x-github-hook-installation-target-id", "79929171"),
    ("x-github-hook-installation-target-type", "integration"),
    ("x-hub-signature", "sha1=7d38cdd689735b008b3c702edd92eea23791c5f6"),
    (
        "x-hub-signature-256",
        "sha256=d57c68ca6f92289e6987922ff26938930f6e66a2d161ef06abdf1859230aa23c",
    ),
];

/// The headers for request number `n`.
fn request_headers(headers: Headers, n: u64) -> reqwest::header::HeaderMap {
    let mut map = reqwest::header::HeaderMap::new();
    if let Headers::Github = headers {
        for (name, value) in GITHUB_HEADERS {
            let value = if *name == "x-github-delivery" {
                // One delivery per request: a repeated id is (rightly) stored once.
                format!("{:08x}-0000-4000-8000-{:012x}", n >> 48, n & 0xffff_ffff_ffff)
            } else {
                value.to_string()
            };
            map.insert(*name, value.parse().expect("a valid header value"));
        }
    }
    map
}

pub struct Report {
    pub plan_connections: usize,
    pub elapsed: Duration,
    pub latency_us: Histogram<u64>,
    pub statuses: BTreeMap<u16, u64>,
    pub errors: u64,
}

impl Report {
    pub fn ok(&self) -> u64 {
        self.statuses
            .iter()
            .filter(|(s, _)| (200..300).contains(*s))
            .map(|(_, n)| n)
            .sum()
    }

    pub fn not_ok(&self) -> u64 {
        self.statuses
            .iter()
            .filter(|(s, _)| !(200..300).contains(*s))
            .map(|(_, n)| n)
            .sum::<u64>()
            + self.errors
    }

    pub fn throughput(&self) -> f64 {
        self.ok() as f64 / self.elapsed.as_secs_f64()
    }

    pub fn print(&self, target: &str) {
        let ms = |q: f64| self.latency_us.value_at_quantile(q) as f64 / 1000.0;
        println!(
            "{target}\n  {} connections, {:.1}s: {} answered 2xx, {:.0} req/s\n  latency p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms\n  non-2xx {} (by status {:?}, transport errors {})",
            self.plan_connections,
            self.elapsed.as_secs_f64(),
            self.ok(),
            self.throughput(),
            ms(0.5),
            ms(0.9),
            ms(0.99),
            self.latency_us.max() as f64 / 1000.0,
            self.not_ok(),
            self.statuses.iter().filter(|(s, _)| !(200..300).contains(*s)).collect::<Vec<_>>(),
            self.errors,
        );
    }
}

/// A body of exactly `size` bytes that differs per request (so content-hash
/// deduplication does not fold requests together).
fn body(size: usize, n: u64) -> Vec<u8> {
    let mut body = format!("{{\"n\":{n},\"pad\":\"").into_bytes();
    let tail = b"\"}";
    body.resize(size.saturating_sub(tail.len()).max(body.len()), b'x');
    body.extend_from_slice(tail);
    body
}

pub async fn run(url: &str, plan: &Plan) -> anyhow::Result<Report> {
    let (body_bytes, headers) = (plan.body_bytes, plan.headers);
    run_with(url, plan, move |n| (request_headers(headers, n), body(body_bytes, n))).await
}

/// As [`run`], each request's headers and body made by `request` from its number.
pub async fn run_with(
    url: &str,
    plan: &Plan,
    request: impl Fn(u64) -> (reqwest::header::HeaderMap, Vec<u8>) + Send + Sync + 'static,
) -> anyhow::Result<Report> {
    let request = Arc::new(request);
    let client = hookyard_core::outbound::http_builder()
        .pool_max_idle_per_host(plan.connections)
        .tcp_nodelay(true)
        .build()?;
    // Numbered from a per-run nonce: a later run must not repeat an earlier run's bodies,
    // or content-hash deduplication (correctly) stores them once.
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let counter = Arc::new(AtomicU64::new(nonce));
    let start = Instant::now();
    let measure_from = start + plan.warmup;
    let stop_at = measure_from + plan.duration;
    let tasks: Vec<_> = (0..plan.connections)
        .map(|_| {
            let client = client.clone();
            let url = url.to_string();
            let counter = counter.clone();
            let request = request.clone();
            tokio::spawn(async move {
                let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
                let mut statuses = BTreeMap::new();
                let mut errors = 0u64;
                loop {
                    let sent = Instant::now();
                    if sent >= stop_at {
                        break;
                    }
                    let n = counter.fetch_add(1, Ordering::Relaxed);
                    let (headers, body) = request(n);
                    let result = client.post(&url).headers(headers).body(body).send().await;
                    let outcome = match result {
                        Ok(response) => {
                            let status = response.status().as_u16();
                            let _ = response.bytes().await;
                            Some(status)
                        }
                        Err(_) => None,
                    };
                    if sent < measure_from {
                        continue;
                    }
                    let _ = latency.record(sent.elapsed().as_micros() as u64);
                    match outcome {
                        Some(status) => *statuses.entry(status).or_insert(0) += 1,
                        None => errors += 1,
                    }
                }
                (latency, statuses, errors)
            })
        })
        .collect();
    let mut report = Report {
        plan_connections: plan.connections,
        elapsed: Duration::ZERO,
        latency_us: Histogram::new_with_bounds(1, 60_000_000, 3)?,
        statuses: BTreeMap::new(),
        errors: 0,
    };
    for task in tasks {
        let (latency, statuses, errors) = task.await?;
        report.latency_us.add(latency)?;
        for (status, n) in statuses {
            *report.statuses.entry(status).or_insert(0) += n;
        }
        report.errors += errors;
    }
    report.elapsed = Instant::now()
        .saturating_duration_since(measure_from)
        .min(plan.duration.max(Duration::from_millis(1)));
    Ok(report)
}

#[cfg(test)]
mod tests {
    #[test]
    fn bodies_have_the_asked_size_and_differ() {
        assert_eq!(super::body(1024, 7).len(), 1024);
        assert_ne!(super::body(64, 1), super::body(64, 2));
        assert!(serde_json::from_slice::<serde_json::Value>(&super::body(1024, 7)).is_ok());
    }
}
