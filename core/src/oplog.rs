//! The operation log's writer: each stage hands entries to an [`OpLog`] (a bounded
//! queue; handing over never waits), and one task per process writes what has queued
//! up in one transaction, up to a thousand at a time. A slow or absent database never
//! slows a webhook: when the queue is full, entries are dropped and counted
//! (`hookyard_log_entries_dropped_total`).

use std::time::Duration;

use chrono::Utc;
use tokio::sync::mpsc;

use crate::config::LogsConfig;
use crate::store::logs::{ActionEntry, LogStep, LogWrite, WebhookEntry};
use crate::Store;

/// Entries written per transaction at most.
const BATCH: usize = 1000;
/// After the first entry of a batch, wait this long for more: one transaction for many
/// entries costs far less than many small ones (and the log is read by people).
const LINGER: Duration = Duration::from_millis(100);
/// After a failed write, wait this long before the next try.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// How often old entries are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

pub const DROPPED: &str = "hookyard_log_entries_dropped_total";

/// Hands entries to the writer. Cheap to clone; the writer ends (after writing what is
/// queued) once every clone is dropped.
#[derive(Clone)]
pub struct OpLog {
    queue: mpsc::Sender<LogWrite>,
}

impl OpLog {
    /// Starts a writer into `store`.
    pub fn start(store: Store, config: &LogsConfig) -> OpLog {
        let (sender, receiver) = mpsc::channel(config.buffer.max(1));
        tokio::spawn(write_loop(store, receiver, config.retention));
        OpLog { queue: sender }
    }

    pub fn webhook(&self, entry: WebhookEntry) {
        self.record(LogWrite::Webhook(entry));
    }

    pub fn action(&self, entry: ActionEntry) {
        self.record(LogWrite::Action(entry));
    }

    pub fn step(
        &self,
        raw_seq: u64,
        stage: &str,
        connection_id: Option<&str>,
        status: &str,
        detail: serde_json::Value,
    ) {
        self.record(LogWrite::Step(LogStep {
            raw_seq: raw_seq as i64,
            at: Utc::now(),
            stage: stage.into(),
            connection_id: connection_id.map(String::from),
            status: status.into(),
            detail,
        }));
    }

    fn record(&self, write: LogWrite) {
        if self.queue.try_send(write).is_err() {
            metrics::counter!(DROPPED).increment(1);
        }
    }
}

async fn write_loop(store: Store, mut queue: mpsc::Receiver<LogWrite>, retention: Duration) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut last_prune = tokio::time::Instant::now();
    // Ends once every sender is gone and the queue is empty.
    while queue.recv_many(&mut batch, BATCH).await > 0 {
        if batch.len() < BATCH {
            tokio::time::sleep(LINGER).await;
            while batch.len() < BATCH {
                match queue.try_recv() {
                    Ok(write) => batch.push(write),
                    Err(_) => break,
                }
            }
        }
        loop {
            match store.write_log(&batch).await {
                Ok(()) => break,
                Err(error) => {
                    tracing::warn!(%error, entries = batch.len(), "writing the operation log failed; retrying");
                    tokio::time::sleep(RETRY_AFTER).await;
                }
            }
        }
        batch.clear();
        if last_prune.elapsed() >= PRUNE_EVERY {
            last_prune = tokio::time::Instant::now();
            let before = Utc::now() - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::days(7));
            match store.prune_log(before).await {
                Ok(pruned) => tracing::info!(pruned, "old operation log entries pruned"),
                Err(error) => tracing::warn!(%error, "pruning the operation log failed"),
            }
        }
    }
}
