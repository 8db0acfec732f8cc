//! Identical provider reads in flight, shared. A burst of thin webhooks about one object
//! (HubSpot sends a contact's property changes as one batch of events, each an id) makes
//! every event's run fetch the same record at once: one request answers them all,
//! sparing the provider's rate limit. A run joins a read of its connection only if that
//! read was sent after the run's events came (`since`), so its answer is at least as new
//! as any of them; and only while it is in flight: a read sent again later (a function
//! polling until something changes) is a request of its own.
//!
//! Only GETs (and HEADs) without a body are shared, keyed by connection, URL and every
//! option of the call; per process.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Instant;

use hookyard_core::metrics::names;
use tokio::sync::OnceCell;

use crate::provider_api::ProxyResponse;

type Answer = Result<ProxyResponse, String>;

/// A read in flight: when it was sent, and its answer once it comes.
struct Read {
    sent: Instant,
    answer: OnceCell<Answer>,
}

static IN_FLIGHT: LazyLock<Mutex<HashMap<String, Arc<Read>>>> = LazyLock::new(Default::default);

fn in_flight() -> std::sync::MutexGuard<'static, HashMap<String, Arc<Read>>> {
    // Nothing that holds the lock can panic.
    IN_FLIGHT.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The answer to the read `key` (the connection's, with the call's URL and options):
/// that of the same read in flight if it was sent at `since` or after, else `send`'s.
/// If the run whose request is in flight ends first (its time ran out), the next
/// waiting run sends its own. A call that failed (no answer: the provider unreachable,
/// a rate limit's pause longer than its run had) is not shared: a run that joined it
/// makes its own, with its own time.
pub async fn read<F: Future<Output = Answer>>(key: String, since: Instant, send: impl Fn() -> F) -> Answer {
    let read = {
        let mut reads = in_flight();
        match reads.get(&key) {
            Some(read) if read.sent >= since => {
                metrics::counter!(names::PROVIDER_READS_SHARED).increment(1);
                read.clone()
            }
            // None, or one sent before this run's events came: its answer may be older.
            _ => {
                let read = Arc::new(Read {
                    sent: Instant::now(),
                    answer: OnceCell::new(),
                });
                reads.insert(key.clone(), read.clone());
                read
            }
        }
    };
    let done = Done { key, read };
    let mut sent_here = false;
    let answer = done
        .read
        .answer
        .get_or_init(|| {
            sent_here = true;
            send()
        })
        .await
        .clone();
    match answer {
        Err(_) if !sent_here => send().await,
        answer => answer,
    }
}

/// Takes a read out of the map once a run has its answer, or gave up waiting (its time
/// ran out): a read sent from then on is a request of its own, and a key read once is
/// not kept.
struct Done {
    key: String,
    read: Arc<Read>,
}

impl Drop for Done {
    fn drop(&mut self) {
        let mut reads = in_flight();
        if reads
            .get(&self.key)
            .is_some_and(|current| Arc::ptr_eq(current, &self.read))
        {
            reads.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    fn answer(n: usize) -> Answer {
        Ok(ProxyResponse {
            status: 200,
            headers: Default::default(),
            data: serde_json::json!(n),
        })
    }

    /// A request that takes `ms` and answers with its number.
    async fn request(sent: &AtomicUsize, ms: u64) -> Answer {
        let n = sent.fetch_add(1, Ordering::SeqCst) + 1;
        tokio::time::sleep(Duration::from_millis(ms)).await;
        answer(n)
    }

    #[tokio::test]
    async fn reads_in_flight_are_shared_with_runs_whose_events_came_before_they_were_sent() {
        let sent = AtomicUsize::new(0);
        let since = Instant::now();
        let key = || "shared-a GET /contacts/1".to_string();
        let (a, b) = tokio::join!(read(key(), since, || request(&sent, 50)), async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            read(key(), since, || request(&sent, 50)).await
        });
        assert_eq!(sent.load(Ordering::SeqCst), 1, "one request");
        assert_eq!(a.unwrap().data, b.unwrap().data);

        // Answered: the same read again is sent again.
        let again = read(key(), since, || request(&sent, 1)).await.unwrap();
        assert_eq!((again.data, sent.load(Ordering::SeqCst)), (serde_json::json!(2), 2));
    }

    #[tokio::test]
    async fn a_read_sent_before_a_runs_events_came_is_not_shared_with_it() {
        let sent = AtomicUsize::new(0);
        let key = || "shared-b GET /contacts/1".to_string();
        let (early, late) = tokio::join!(read(key(), Instant::now(), || request(&sent, 50)), async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            // Its events came after the first read was sent.
            read(key(), Instant::now(), || request(&sent, 50)).await
        });
        assert_eq!(sent.load(Ordering::SeqCst), 2);
        assert_ne!(early.unwrap().data, late.unwrap().data);
    }

    #[tokio::test]
    async fn a_waiting_run_sends_its_own_read_when_the_first_is_dropped() {
        let sent = AtomicUsize::new(0);
        let since = Instant::now();
        let key = || "shared-c GET /contacts/1".to_string();
        let first = tokio::time::timeout(Duration::from_millis(20), read(key(), since, || request(&sent, 1000)));
        let (dropped, second) = tokio::join!(first, async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            read(key(), since, || request(&sent, 10)).await
        });
        assert!(dropped.is_err(), "the first run's time ran out");
        assert_eq!(
            second.unwrap().data,
            serde_json::json!(2),
            "its own request answered it"
        );
    }

    #[tokio::test]
    async fn a_run_that_joined_a_failed_call_makes_its_own() {
        let sent = AtomicUsize::new(0);
        let since = Instant::now();
        let key = || "shared-e GET /contacts/1".to_string();
        let counted = &sent;
        let failing = move || async move {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            Err("rate limited: longer than this run has left".to_string())
        };
        let (first, second) = tokio::join!(read(key(), since, failing), async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            read(key(), since, || request(&sent, 1)).await
        });
        assert!(first.is_err());
        assert_eq!(second.unwrap().data, serde_json::json!(2), "its own call answered it");
        assert_eq!(sent.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn other_reads_are_not_shared() {
        let sent = AtomicUsize::new(0);
        let since = Instant::now();
        let (_, _) = tokio::join!(
            read("shared-d GET /contacts/1".into(), since, || request(&sent, 30)),
            read("shared-d GET /contacts/2".into(), since, || request(&sent, 30)),
        );
        assert_eq!(sent.load(Ordering::SeqCst), 2);
    }
}
