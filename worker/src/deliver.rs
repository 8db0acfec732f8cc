//! The deliverer: a durable consumer (`deliveries`) on `HOOKS_FWD` that sends each
//! delivery to its destination, signed, and keeps at it on a schedule that spans hours.
//!
//! - 2xx: done. 410: the destination is disabled, no more retries. Another 4xx (but 408
//!   and 429) is final after one retry. 429 and 503 wait their `Retry-After` (clamped to
//!   the schedule's bounds); the rest wait the schedule's next delay with full jitter.
//!   After the last attempt the delivery goes to dead letters.
//! - A retry is a `nak` with that delay: the server keeps the schedule, so a worker that
//!   dies mid-schedule leaves it to be picked up where it was. Attempts are counted in
//!   the store, not by JetStream's delivery count (which waits and crashes inflate).
//! - Per destination: at most `concurrency_per_destination` attempts at once, and a
//!   circuit breaker that, after `breaker_failures` failures in a row, holds deliveries
//!   back for `breaker_open` and then lets one probe through.
//! - Destinations on loopback, private, link-local or metadata addresses are refused
//!   unless the configuration allows them (checked on every attempt, after resolving).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind};
use chrono::Utc;
use hmac::{Hmac, Mac};
use hookyard_core::config::ForwardingConfig;
use hookyard_core::metrics::names;
use hookyard_core::oplog::OpLog;
use hookyard_core::outbound::Refusal;
use hookyard_core::store::commit::{DeadLetter, Marker, Unit};
use hookyard_core::store::forwarding::DeliveryAttempt;
use hookyard_core::streams::{consume, durable, Share, FWD_STREAM, PULL_BATCH};
use hookyard_core::Store;
use sha2::Sha256;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::forward::Delivery;
use crate::settings::Settings;
use crate::WorkerError;

pub const DELIVERER: &str = hookyard_core::store::dead_letters::FORWARD_CONSUMER;
/// Deliveries in flight at once per worker, over all destinations; [`PULL_BATCH`] asked
/// for per pull.
const SHARE: Share = Share {
    concurrency: 256,
    batch: PULL_BATCH,
};

pub struct Deliverer {
    store: Store,
    /// Each forward's attempts, in its webhook's operation log.
    oplog: OpLog,
    /// Attempts are written in batches by a task of their own (one commit per batch).
    attempts: tokio::sync::mpsc::UnboundedSender<DeliveryAttempt>,
    /// Attempts made by this process, by delivery: the count for a delivery whose
    /// attempts are not written yet. Dropped when a delivery is done with.
    made: Mutex<HashMap<String, i64>>,
    settings: Arc<Settings>,
    jetstream: jetstream::Context,
    http: reqwest::Client,
    config: ForwardingConfig,
    destinations: Mutex<HashMap<String, Arc<Destination>>>,
}

/// One URL's concurrency limit and circuit breaker.
/// What an attempt came to.
struct Answer {
    status: Option<u16>,
    retry_after: Option<Duration>,
    error: Option<String>,
    latency: Duration,
}

impl Answer {
    /// No answer: the request failed, or was not sent.
    fn failed(error: String) -> Answer {
        Answer {
            status: None,
            retry_after: None,
            error: Some(error),
            latency: Duration::ZERO,
        }
    }
}

struct Destination {
    slots: Semaphore,
    breaker: Mutex<Breaker>,
}

#[derive(Default)]
struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
    probing: bool,
}

enum Admit {
    Go,
    Wait(Duration),
}

impl Breaker {
    /// Whether an attempt may go now. The waits are spread over up to another open
    /// period, so that the deliveries held back do not all come back at one instant.
    fn admit(&mut self, now: Instant, open_for: Duration) -> Admit {
        match self.open_until {
            None => Admit::Go,
            Some(until) if now < until => Admit::Wait(until - now + full_jitter(open_for)),
            // Open time is over: one probe decides, the others wait for it.
            Some(_) if self.probing => Admit::Wait(open_for / 2 + full_jitter(open_for)),
            Some(_) => {
                self.probing = true;
                Admit::Go
            }
        }
    }

    fn record(&mut self, healthy: bool, threshold: u32, open_for: Duration) {
        self.probing = false;
        if healthy {
            self.failures = 0;
            self.open_until = None;
        } else {
            self.failures += 1;
            if self.failures >= threshold {
                self.open_until = Some(Instant::now() + open_for);
            }
        }
    }
}

/// What became of one attempt.
#[derive(Debug, PartialEq)]
enum Verdict {
    Delivered,
    Gone,
    Retry(Duration),
    Final(String),
}

impl Deliverer {
    pub fn new(
        store: Store,
        settings: Arc<Settings>,
        jetstream: jetstream::Context,
        config: &ForwardingConfig,
        oplog: OpLog,
    ) -> Result<Deliverer, WorkerError> {
        let builder = hookyard_core::outbound::client_builder(config).map_err(WorkerError::Forwarding)?;
        let http = hookyard_core::outbound::build_client(builder.timeout(config.attempt_timeout))
            .map_err(WorkerError::Forwarding)?;
        let (attempts, pending) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(write_attempts(store.clone(), pending));
        Ok(Deliverer {
            oplog,
            attempts,
            made: Mutex::new(HashMap::new()),
            store,
            settings,
            jetstream,
            http,
            config: config.clone(),
            destinations: Mutex::new(HashMap::new()),
        })
    }

    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> Result<(), WorkerError> {
        let config = durable(
            DELIVERER,
            "hookyard worker: deliveries to customers' apps",
            self.config.ack_wait,
            SHARE,
        );
        let jetstream = self.jetstream.clone();
        consume(&jetstream, FWD_STREAM, config, SHARE, shutdown, |message| {
            let deliverer = self.clone();
            async move { deliverer.handle(message).await }
        })
        .await?;
        Ok(())
    }

    fn destination(&self, url: &str) -> Arc<Destination> {
        self.destinations
            .lock()
            .expect("destinations lock")
            .entry(url.to_string())
            .or_insert_with(|| {
                Arc::new(Destination {
                    slots: Semaphore::new(self.config.concurrency_per_destination),
                    breaker: Mutex::new(Breaker::default()),
                })
            })
            .clone()
    }

    async fn handle(&self, message: jetstream::Message) {
        let delivery: Delivery = match serde_json::from_slice(&message.payload) {
            Ok(delivery) => delivery,
            Err(error) => {
                tracing::error!(%error, "not a delivery; dropped from the schedule");
                let _ = message.ack_with(AckKind::Term).await;
                return;
            }
        };
        let delivered = message.info().map_or(1, |i| i.delivered);
        let span = tracing::info_span!(
            "deliver", delivery = %delivery.id, attempt = delivered, trace_id = tracing::field::Empty
        );
        hookyard_core::trace_context::continue_trace(&span, delivery.traceparent.as_deref());
        let outcome = tracing::Instrument::instrument(self.attempt(&delivery, delivered), span).await;
        if matches!(outcome, Ok(None)) {
            self.made.lock().expect("attempts lock").remove(&delivery.attempt_key());
        }
        match outcome {
            Ok(Some(delay)) => {
                let _ = message.ack_with(AckKind::Nak(Some(delay))).await;
            }
            Ok(None) => {
                let _ = message.ack().await;
            }
            Err(error) => {
                tracing::warn!(%error, delivery = %delivery.id, "delivery bookkeeping failed; retrying");
                let _ = message.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
            }
        }
    }

    /// One attempt of `delivery` (or a wait for its destination's circuit); the delay
    /// before the next one, or `None` when it is done with.
    async fn attempt(&self, delivery: &Delivery, delivered: i64) -> Result<Option<Duration>, WorkerError> {
        let Ok(name) = delivery.environment.parse() else {
            return Ok(None);
        };
        let Some(environment) = self.settings.environment(&name).await? else {
            tracing::info!(delivery = %delivery.id, "environment gone; delivery dropped");
            return Ok(None);
        };
        if self.settings.disabled(environment.id).await?.contains(&delivery.url) {
            tracing::info!(delivery = %delivery.id, url = %delivery.url, "destination disabled (410); not sent");
            return Ok(None);
        }
        let destination = self.destination(&delivery.url);
        let admitted = destination
            .breaker
            .lock()
            .expect("breaker lock")
            .admit(Instant::now(), self.config.breaker_open);
        if let Admit::Wait(wait) = admitted {
            return Ok(Some(wait));
        }
        // A first delivery is a first attempt; later ones ask the store (attempts survive
        // restarts there) and this process's own count (not all written yet).
        let made_here = self
            .made
            .lock()
            .expect("attempts lock")
            .get(&delivery.attempt_key())
            .copied()
            .unwrap_or(0);
        let made = if delivered <= 1 && made_here == 0 {
            0
        } else {
            made_here.max(self.store.attempts_made(&delivery.attempt_key()).await?)
        };
        let attempt = made + 1;
        self.made
            .lock()
            .expect("attempts lock")
            .insert(delivery.attempt_key(), attempt);
        let unresolved = match hookyard_core::outbound::allowed_destination(&delivery.url, &self.config).await {
            Ok(()) => None,
            Err(Refusal::Unresolved(reason)) => Some(reason),
            Err(Refusal::Forbidden(reason)) => {
                self.refuse(delivery, attempt, &destination, &reason).await?;
                return Ok(None);
            }
        };
        let integration_key = delivery.integration.parse().ok();
        let connection = match (&integration_key, &delivery.connection) {
            (Some(integration), Some(connection)) => Some((integration, connection.as_str())),
            _ => None,
        };
        let signing_key = self.settings.targets(&environment, connection).await?.signing_key;
        let body = delivery
            .body_bytes()
            .map_err(|e| WorkerError::JetStream(format!("delivery body: {e}")))?;

        let answer = match unresolved {
            // As a refused connection: a failed attempt, tried again on the schedule.
            Some(reason) => Answer::failed(format!("not sent: {reason}")),
            None => match self.send(delivery, &destination, &signing_key, body).await {
                Some(answer) => answer,
                // No slot in time: back, to come again a little later.
                None => {
                    destination.breaker.lock().expect("breaker lock").probing = false;
                    return Ok(Some(Duration::from_secs(1) + full_jitter(self.config.attempt_timeout)));
                }
            },
        };
        let Answer {
            status,
            retry_after,
            error,
            latency,
        } = answer;
        self.record(delivery, attempt, status.map(i32::from), latency, error.clone())?;
        let healthy = status.is_some_and(|s| s < 500);
        destination.breaker.lock().expect("breaker lock").record(
            healthy,
            self.config.breaker_failures,
            self.config.breaker_open,
        );
        let verdict = verdict(&self.config, attempt, status, retry_after);
        let outcome = match &verdict {
            Verdict::Delivered => "delivered",
            Verdict::Gone => "gone",
            Verdict::Retry(_) => "failed",
            Verdict::Final(_) => "gave_up",
        };
        self.observe(delivery, attempt, status, latency, error.as_deref(), outcome);
        match verdict {
            Verdict::Delivered => Ok(None),
            Verdict::Gone => {
                tracing::warn!(url = %delivery.url, "destination answered 410 Gone; disabled");
                self.store
                    .disable_destination(environment.id, &delivery.url, "answered 410 Gone")
                    .await?;
                self.settings.forget_disabled(environment.id);
                Ok(None)
            }
            Verdict::Retry(delay) => {
                tracing::debug!(delivery = %delivery.id, attempt, ?status, ?error, "delivery failed; retrying in {delay:?}");
                Ok(Some(delay))
            }
            Verdict::Final(why) => {
                tracing::warn!(delivery = %delivery.id, attempt, url = %delivery.url, "delivery given up: {why}");
                let detail = error.unwrap_or_else(|| format!("answered {}", status.unwrap_or(0)));
                self.dead_letter(delivery, attempt, &why, &detail).await?;
                Ok(None)
            }
        }
    }

    /// Sends one attempt once the destination has a slot for it; `None` when none freed
    /// up within half the ack wait (past the ack wait the delivery would be handed out a
    /// second time).
    async fn send(
        &self,
        delivery: &Delivery,
        destination: &Destination,
        signing_key: &str,
        body: Vec<u8>,
    ) -> Option<Answer> {
        let slot = tokio::time::timeout(self.config.ack_wait / 2, destination.slots.acquire())
            .await
            .ok()?;
        let _slot = slot.expect("never closed");
        let started = Instant::now();
        let mut request = self.http.post(&delivery.url);
        for (name, value) in &delivery.headers {
            request = request.header(name, value);
        }
        if !delivery.headers.iter().any(|(n, _)| n == "content-type") {
            request = request.header("content-type", "application/json");
        }
        for (name, value) in signature_headers(signing_key, &delivery.id, Utc::now().timestamp(), &body) {
            request = request.header(name, value);
        }
        let sent = request.body(body).send().await;
        let latency = started.elapsed();
        Some(match &sent {
            Ok(response) => Answer {
                status: Some(response.status().as_u16()),
                retry_after: response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(hookyard_core::outbound::parse_retry_after),
                error: None,
                latency,
            },
            Err(e) => Answer {
                latency,
                ..Answer::failed(describe_send_error(e))
            },
        })
    }

    /// A destination the configuration forbids: recorded and dead-lettered at once, as no
    /// later attempt would be allowed either.
    async fn refuse(
        &self,
        delivery: &Delivery,
        attempt: i64,
        destination: &Destination,
        reason: &str,
    ) -> Result<(), WorkerError> {
        tracing::warn!(delivery = %delivery.id, url = %delivery.url, %reason, "destination refused");
        self.record(
            delivery,
            attempt,
            None,
            Duration::ZERO,
            Some(format!("refused: {reason}")),
        )?;
        destination.breaker.lock().expect("breaker lock").probing = false;
        self.observe(delivery, attempt, None, Duration::ZERO, Some(reason), "refused");
        self.dead_letter(delivery, attempt, "refused", reason).await
    }

    fn record(
        &self,
        delivery: &Delivery,
        attempt: i64,
        status: Option<i32>,
        latency: Duration,
        error: Option<String>,
    ) -> Result<(), WorkerError> {
        let _ = self.attempts.send(DeliveryAttempt {
            delivery_id: delivery.attempt_key(),
            environment: delivery.environment.clone(),
            url: delivery.url.clone(),
            attempt: attempt as i32,
            at: Utc::now(),
            status,
            latency_ms: latency.as_millis() as i32,
            error,
        });
        Ok(())
    }

    /// Counts an attempt, and adds it to its webhook's operation log (forwards only:
    /// sync notifications belong to no webhook).
    fn observe(
        &self,
        delivery: &Delivery,
        attempt: i64,
        status: Option<u16>,
        latency: Duration,
        error: Option<&str>,
        outcome: &str,
    ) {
        let class = match status {
            Some(status) => format!("{}xx", status / 100),
            None => "error".into(),
        };
        metrics::counter!(names::FORWARD_ATTEMPTS, "status" => class).increment(1);
        if let Some(raw_seq) = delivery.raw_seq {
            let detail = serde_json::json!({
                "url": delivery.url, "delivery": delivery.id, "attempt": attempt, "status_code": status,
                "latency_ms": latency.as_secs_f64() * 1e3, "error": error,
            });
            self.oplog
                .step(raw_seq, "forward", delivery.connection.as_deref(), outcome, detail);
        }
    }

    async fn dead_letter(
        &self,
        delivery: &Delivery,
        attempts: i64,
        kind: &str,
        error: &str,
    ) -> Result<(), WorkerError> {
        let letter = DeadLetter {
            consumer: DELIVERER.into(),
            environment: delivery.environment.clone(),
            integration: delivery.integration.clone(),
            connection_id: delivery.connection.clone(),
            subject: delivery.url.clone(),
            message_id: delivery.attempt_key(),
            stream_seq: 0,
            payload: serde_json::to_string(delivery).expect("a delivery serialises"),
            function_name: None,
            function_version: None,
            error_kind: kind.into(),
            error: error.into(),
            attempts: attempts as i32,
            headers: None,
        };
        metrics::counter!(names::DEAD_LETTERS, "kind" => "forward").increment(1);
        let marker = Marker {
            consumer: DELIVERER.into(),
            message_id: delivery.attempt_key(),
        };
        self.store
            .commit(vec![Unit {
                dead_letter: Some(letter),
                ..Unit::new(marker)
            }])
            .await?;
        Ok(())
    }
}

/// What to do after attempt number `attempt` got `status` (`None`: no answer).
fn verdict(config: &ForwardingConfig, attempt: i64, status: Option<u16>, retry_after: Option<Duration>) -> Verdict {
    let delays: Vec<Duration> = config.retry_delays.iter().map(|d| **d).collect();
    match status {
        Some(s) if (200..300).contains(&s) => return Verdict::Delivered,
        Some(410) => return Verdict::Gone,
        Some(s) if (400..500).contains(&s) && s != 408 && s != 429 && attempt >= 2 => {
            return Verdict::Final(format!("answered {s} twice"))
        }
        _ => {}
    }
    let Some(&base) = delays.get(attempt as usize - 1) else {
        return Verdict::Final(format!("no 2xx answer in {attempt} attempts"));
    };
    let (shortest, longest) = (
        delays.iter().min().copied().unwrap_or(base),
        delays.iter().max().copied().unwrap_or(base),
    );
    let last = attempt as usize == delays.len();
    match (status, retry_after) {
        (Some(429 | 503), Some(asked)) => Verdict::Retry(asked.clamp(shortest, longest)),
        // The last wait is whole, so that the schedule spans at least its last base.
        _ if config.jitter && !last => Verdict::Retry(full_jitter(base)),
        _ => Verdict::Retry(base),
    }
}

/// Writes attempts as they come, up to 500 per transaction; a failed write is retried.
/// (Attempts of the last moments before a crash may be lost: their deliveries are
/// tried once more than their schedule says, never less.)
async fn write_attempts(store: Store, mut pending: tokio::sync::mpsc::UnboundedReceiver<DeliveryAttempt>) {
    let mut batch = Vec::with_capacity(500);
    while pending.recv_many(&mut batch, 500).await > 0 {
        while let Err(error) = store.record_attempts(&batch).await {
            tracing::warn!(%error, attempts = batch.len(), "recording delivery attempts failed; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        batch.clear();
    }
}

/// `X-Nango-Hmac-Sha256` (hex HMAC-SHA256 of the body) and the Standard Webhooks
/// headers (`v1,` + base64 HMAC-SHA256 of `{id}.{timestamp}.{body}`), both under the
/// signing key's UTF-8 bytes. (A Standard Webhooks library takes the key base64-encoded:
/// `whsec_` + base64 of the signing key.)
pub fn signature_headers(key: &str, id: &str, timestamp: i64, body: &[u8]) -> [(&'static str, String); 4] {
    use base64::Engine as _;
    let mac = |parts: &[&[u8]]| {
        let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("HMAC takes any key");
        for part in parts {
            mac.update(part);
        }
        mac.finalize().into_bytes()
    };
    let nango = hex::encode(mac(&[body]));
    let standard = mac(&[id.as_bytes(), b".", timestamp.to_string().as_bytes(), b".", body]);
    [
        ("x-nango-hmac-sha256", nango),
        ("webhook-id", id.to_string()),
        ("webhook-timestamp", timestamp.to_string()),
        (
            "webhook-signature",
            format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(standard)),
        ),
    ]
}

/// A wait drawn uniformly between zero and `base` (at least 10 ms).
fn full_jitter(base: Duration) -> Duration {
    let draw = u64::from_le_bytes(hookyard_core::secrets::random_bytes::<8>());
    let fraction = (draw >> 11) as f64 / (1u64 << 53) as f64;
    base.mul_f64(fraction).max(Duration::from_millis(10))
}

fn describe_send_error(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        "timed out".into()
    } else if error.is_connect() {
        format!("could not connect: {error}")
    } else {
        error.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_follow_the_policy() {
        let config = ForwardingConfig {
            retry_delays: [1, 2, 3].map(|s| Duration::from_secs(s).into()).to_vec(),
            jitter: false,
            ..ForwardingConfig::default()
        };
        let v = |attempt, status, retry_after| verdict(&config, attempt, status, retry_after);
        assert_eq!(v(1, Some(204), None), Verdict::Delivered);
        assert_eq!(v(1, Some(410), None), Verdict::Gone);
        assert_eq!(v(1, Some(500), None), Verdict::Retry(Duration::from_secs(1)));
        assert_eq!(v(2, None, None), Verdict::Retry(Duration::from_secs(2)));
        assert_eq!(
            v(1, Some(404), None),
            Verdict::Retry(Duration::from_secs(1)),
            "one retry for a 4xx"
        );
        assert!(matches!(v(2, Some(404), None), Verdict::Final(_)), "then final");
        assert_eq!(
            v(2, Some(408), None),
            Verdict::Retry(Duration::from_secs(2)),
            "a timeout is not final"
        );
        assert_eq!(
            v(1, Some(429), Some(Duration::from_secs(2))),
            Verdict::Retry(Duration::from_secs(2))
        );
        assert_eq!(
            v(1, Some(503), Some(Duration::from_secs(60))),
            Verdict::Retry(Duration::from_secs(3)),
            "clamped"
        );
        assert_eq!(
            v(1, Some(429), Some(Duration::ZERO)),
            Verdict::Retry(Duration::from_secs(1)),
            "clamped"
        );
        assert!(
            matches!(v(4, Some(500), None), Verdict::Final(_)),
            "after the last attempt"
        );
        let jittered = ForwardingConfig {
            jitter: true,
            ..config.clone()
        };
        for _ in 0..100 {
            let Verdict::Retry(wait) = verdict(&jittered, 1, Some(500), None) else {
                panic!()
            };
            assert!(wait <= Duration::from_secs(1));
        }
        assert_eq!(
            verdict(&jittered, 3, Some(500), None),
            Verdict::Retry(Duration::from_secs(3)),
            "the last is whole"
        );
        let default = ForwardingConfig::default();
        let last: Duration = **default.retry_delays.last().unwrap();
        assert!(
            default.retry_delays.len() + 1 >= 8 && last >= Duration::from_secs(24 * 3600),
            "≥ 8 attempts over ≥ 24 h"
        );
    }

    #[test]
    fn breaker_opens_and_probes() {
        let mut breaker = Breaker::default();
        for _ in 0..3 {
            assert!(matches!(
                breaker.admit(Instant::now(), Duration::from_secs(60)),
                Admit::Go
            ));
            breaker.record(false, 3, Duration::from_secs(60));
        }
        assert!(
            matches!(breaker.admit(Instant::now(), Duration::from_secs(60)), Admit::Wait(w) if w >= Duration::from_secs(59)),
            "open after 3 failures"
        );
        let later = Instant::now() + Duration::from_secs(61);
        assert!(
            matches!(breaker.admit(later, Duration::from_secs(60)), Admit::Go),
            "one probe"
        );
        assert!(
            matches!(breaker.admit(later, Duration::from_secs(60)), Admit::Wait(_)),
            "the others wait for it"
        );
        breaker.record(true, 3, Duration::from_secs(60));
        assert!(
            matches!(breaker.admit(later, Duration::from_secs(60)), Admit::Go),
            "closed again"
        );
    }
}
