//! Two ways of getting messages with ids into a stream and knowing they are stored:
//! a JetStream publish per message awaiting its own ack (what ingest does, many in
//! flight), and one fast-ingest batch (nats-server 2.14+, `allow_batched`), acked by
//! the server every `FLOW` messages. No HTTP: what each costs NATS and its client per
//! message, and what a duplicate id inside a batch tells the publisher (nothing).
//! Between them, the per-message publish of what ingest really sends: hookyard's
//! envelope of a GitHub delivery (its twelve request headers and our metadata).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, message::PublishMessage};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt as _;
use hookyard_core::providers::Verification;
use hookyard_core::Envelope;
use serde::Deserialize;

use crate::load::GITHUB_HEADERS;
use crate::setup::{start_nats, CpuMeter};

/// The server acks a fast batch every this many messages; the publisher stalls when two
/// acks are outstanding.
const FLOW: u64 = 100;

pub async fn run(seconds: u64, in_flight: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (nats, port) = start_nats(dir.path())?;
    let client = async_nats::connect(format!("nats://127.0.0.1:{port}")).await?;
    let jetstream = jetstream::new(client.clone());
    let nats_pid = nats.pid().context("nats-server pid")?;
    let body = Bytes::from(vec![b'x'; 1024]);
    let duration = Duration::from_secs(seconds);
    println!(
        "1 KiB messages, each with a Nats-Msg-Id, for {seconds}s per mode; nats-server {}\n",
        client.server_info().version
    );
    let github = github_envelope(&body);
    for (stream, batched, envelope) in [
        ("ACKED", false, None),
        ("ACKED_ENVELOPE", false, Some(&github)),
        ("BATCHED", true, None),
    ] {
        // As JSON: async-nats knows `allow_batched` only under a feature we do not build.
        let config = serde_json::json!({
            "name": stream,
            "subjects": [format!("{}.x", stream.to_lowercase())],
            "storage": "file",
            "num_replicas": 1,
            "allow_batched": batched,
        });
        let created = client
            .request(
                format!("$JS.API.STREAM.CREATE.{stream}"),
                serde_json::to_vec(&config)?.into(),
            )
            .await?;
        anyhow::ensure!(
            !String::from_utf8_lossy(&created.payload).contains("\"error\""),
            "creating {stream}: {}",
            String::from_utf8_lossy(&created.payload)
        );
        let subject = format!("{}.x", stream.to_lowercase());
        let cpu = CpuMeter::start(nats_pid);
        let started = Instant::now();
        let (sent, duplicates) = if batched {
            fast_batch(&client, &subject, &body, duration).await?
        } else {
            (
                acked(&jetstream, &subject, &body, envelope, duration, in_flight).await?,
                0,
            )
        };
        let elapsed = started.elapsed().as_secs_f64();
        let cpu = cpu.stop();
        let stored = jetstream.get_stream(stream).await?.info().await?.state.messages;
        let name = match (batched, envelope) {
            (true, _) => format!("one fast-ingest batch, ack every {FLOW}"),
            (false, None) => format!("publish + ack per message, {in_flight} in flight"),
            (false, Some(_)) => "the same, each message hookyard's envelope of a GitHub delivery".to_string(),
        };
        let (own, nats) = cpu.per_thousand(sent);
        println!(
            "{name}\n  {:.0} messages/s; CPU per 1000: client {:.1} ms, nats-server {:.1} ms",
            sent as f64 / elapsed,
            own,
            nats,
        );
        println!("  {sent} sent ({duplicates} of them repeating an earlier id), {stored} stored");
        if batched {
            // `fast_batch` checked that the commit's count included the repeat.
            println!("  the commit ack counted all {sent}: no answer said which one was a duplicate");
        }
        anyhow::ensure!(stored == sent - duplicates, "stored {stored} of {sent} sent");
    }
    Ok(())
}

/// `envelope`: send each message as this envelope (with the message's own delivery id)
/// instead of the body with a bare id.
async fn acked(
    jetstream: &jetstream::Context,
    subject: &str,
    body: &Bytes,
    envelope: Option<&Envelope>,
    duration: Duration,
    in_flight: usize,
) -> anyhow::Result<u64> {
    let next = Arc::new(AtomicU64::new(0));
    let stop_at = Instant::now() + duration;
    let publishers: Vec<_> = (0..in_flight)
        .map(|_| {
            let (jetstream, subject, body, next) = (jetstream.clone(), subject.to_string(), body.clone(), next.clone());
            let envelope = envelope.cloned();
            tokio::spawn(async move {
                while Instant::now() < stop_at {
                    let id = next.fetch_add(1, Ordering::Relaxed).to_string();
                    let message = match &envelope {
                        None => PublishMessage::build().message_id(id).payload(body.clone()),
                        // As ingest does: the request's headers copied out, then encoded.
                        Some(template) => {
                            let envelope = Envelope {
                                delivery_id: id,
                                ..template.clone()
                            };
                            PublishMessage::build()
                                .headers(envelope.to_headers())
                                .payload(body.clone())
                        }
                    };
                    jetstream.send_publish(subject.clone(), message).await?.await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for publisher in publishers {
        publisher.await??;
    }
    Ok(next.load(Ordering::Relaxed))
}

/// A GitHub delivery as ingest stores it: the headers GitHub sends, and the client's.
fn github_envelope(body: &Bytes) -> Envelope {
    let client = [
        ("host", "hooks.example.com"),
        ("content-length", "1024"),
        ("accept", "*/*"),
    ];
    Envelope {
        environment: "bench".parse().expect("a valid name"),
        integration: "github".parse().expect("a valid key"),
        received_at: chrono::Utc::now(),
        delivery_id: String::new(),
        method: "POST".into(),
        path: None,
        query: None,
        headers: client
            .iter()
            .chain(GITHUB_HEADERS)
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect(),
        body: body.clone(),
        verification: Verification::Verified,
        traceparent: None,
    }
}

/// What the server sends a fast batch's inbox: flow acks, gaps and errors carry a
/// `type`; the final pub ack carries `batch` and `count`.
#[derive(Deserialize)]
struct Reply {
    #[serde(rename = "type")]
    kind: Option<String>,
    seq: Option<u64>,
    batch: Option<String>,
    count: Option<u64>,
}

/// Publishes for `duration` in one batch, then one message repeating the first id,
/// then commits. Returns (messages sent, of which duplicates).
async fn fast_batch(
    client: &async_nats::Client,
    subject: &str,
    body: &Bytes,
    duration: Duration,
) -> anyhow::Result<(u64, u64)> {
    // The reply subject is parsed from the right: <prefix>.<batch>.<flow>.<gap>.<seq>.<op>.$FI
    let inbox = format!("_INBOX.{}", hex::encode(hookyard_core::secrets::random_bytes::<12>()));
    let mut replies = client.subscribe(format!("{inbox}.>")).await?;
    let reply = |seq: u64, op: u8| format!("{inbox}.{FLOW}.fail.{seq}.{op}.$FI");
    let (mut seq, mut acked) = (0u64, 0u64);
    let stop_at = Instant::now() + duration;
    let publish = |seq: u64, id: u64| {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", id.to_string().as_str());
        client.publish_with_reply_and_headers(
            subject.to_string(),
            reply(seq, u8::from(seq > 1)),
            headers,
            body.clone(),
        )
    };
    while Instant::now() < stop_at {
        seq += 1;
        publish(seq, seq).await?;
        while acked + 2 * FLOW <= seq {
            let message = replies.next().await.context("inbox closed")?;
            apply_reply(&message, &mut acked)?;
        }
    }
    seq += 1;
    publish(seq, 1).await?;
    client
        .publish_with_reply(subject.to_string(), reply(seq + 1, 3), Bytes::new())
        .await?;
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), replies.next())
            .await
            .context("no commit ack")?
            .context("inbox closed")?;
        if let Some(count) = apply_reply(&message, &mut acked)? {
            anyhow::ensure!(count == seq, "the batch counted {count} of {seq}");
            return Ok((seq, 1));
        }
    }
}

/// Moves `acked` on for a flow ack; returns the batch's count for its final pub ack.
fn apply_reply(message: &async_nats::Message, acked: &mut u64) -> anyhow::Result<Option<u64>> {
    let reply: Reply = serde_json::from_slice(&message.payload)?;
    let shown = || String::from_utf8_lossy(&message.payload).into_owned();
    match reply.kind.as_deref() {
        Some("ack") => *acked = (*acked).max(reply.seq.unwrap_or(0)),
        Some(other) => anyhow::bail!("fast batch {other}: {}", shown()),
        None if reply.batch.is_some() => return Ok(reply.count),
        None => anyhow::bail!("fast batch refused: {}", shown()),
    }
    Ok(None)
}
