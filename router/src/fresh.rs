//! A value read from the store that callers may share only when the read began after
//! they asked: strictly as fresh as a read of their own, without one read each.
//!
//! Webhooks arrive at the router by the pull batch, and each must see the connections
//! as they were when it arrived (a connection deleted before then is never matched).
//! One read per webhook made that read the router's largest cost. Here reads of one
//! value run one at a time: every caller that asked while a read was running waits for
//! the next read, which answers all of them.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub struct FreshRead<T, E> {
    /// The last value read, and when the read that returned it began.
    value: Mutex<Option<(T, Instant)>>,
    /// The last read that failed, and when it began: the callers that waited for it
    /// fail with it rather than each trying again in turn (one after another, each
    /// bounded by the pool's timeout, they would wait minutes).
    failed: Mutex<Option<(Arc<E>, Instant)>>,
    /// Held for the length of one read.
    reading: tokio::sync::Mutex<()>,
}

impl<T, E> Default for FreshRead<T, E> {
    fn default() -> Self {
        FreshRead {
            value: Mutex::new(None),
            failed: Mutex::new(None),
            reading: tokio::sync::Mutex::new(()),
        }
    }
}

impl<T: Clone, E> FreshRead<T, E> {
    /// A new one that starts from this one's last value, as of when it was read: a
    /// caller that needs a fresher one reads again, with that value to reuse.
    pub fn carried(&self) -> FreshRead<T, E> {
        FreshRead {
            value: Mutex::new(lock(&self.value).clone()),
            ..FreshRead::default()
        }
    }

    /// The outcome of a read that began at or after `since` (`None`: any read will do).
    /// When there is none, `read` runs with the last value (to reuse what has not
    /// changed), unless another caller's read that began late enough ends first.
    pub async fn get<F, Fut>(&self, since: Option<Instant>, read: F) -> Result<T, Arc<E>>
    where
        F: FnOnce(Option<T>) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        if let Some(value) = recent(&self.value, since) {
            return Ok(value);
        }
        let _reading = self.reading.lock().await;
        if let Some(value) = recent(&self.value, since) {
            return Ok(value);
        }
        if let Some(error) = recent(&self.failed, since) {
            return Err(error);
        }
        let began = Instant::now();
        let previous = recent(&self.value, None);
        match read(previous).await {
            Ok(value) => {
                *lock(&self.value) = Some((value.clone(), began));
                Ok(value)
            }
            Err(error) => {
                let error = Arc::new(error);
                *lock(&self.failed) = Some((error.clone(), began));
                Err(error)
            }
        }
    }
}

fn lock<V>(slot: &Mutex<V>) -> std::sync::MutexGuard<'_, V> {
    slot.lock().unwrap_or_else(|e| e.into_inner())
}

/// What `slot` holds, if it came from a read that began at or after `since`.
fn recent<V: Clone>(slot: &Mutex<Option<(V, Instant)>>, since: Option<Instant>) -> Option<V> {
    lock(slot)
        .as_ref()
        .filter(|(_, began)| since.is_none_or(|since| *began >= since))
        .map(|(value, _)| value.clone())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    /// A read that takes `ms` and returns when it began.
    async fn timed_read(reads: &AtomicUsize, ms: u64) -> Result<Instant, ()> {
        reads.fetch_add(1, Ordering::SeqCst);
        let began = Instant::now();
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok(began)
    }

    #[tokio::test]
    async fn callers_share_reads_that_began_after_they_asked() {
        let shared = Arc::new(FreshRead::<Instant, ()>::default());
        let reads = Arc::new(AtomicUsize::new(0));
        let mut callers = tokio::task::JoinSet::new();
        for i in 0..50u64 {
            let (shared, reads) = (shared.clone(), reads.clone());
            callers.spawn(async move {
                // Callers arrive over ~25 ms, while 5 ms reads run.
                tokio::time::sleep(Duration::from_micros(500 * i)).await;
                let asked = Instant::now();
                let began = shared.get(Some(asked), |_| timed_read(&reads, 5)).await.unwrap();
                assert!(began >= asked, "caller {i} got a read that began before it asked");
            });
        }
        while let Some(joined) = callers.join_next().await {
            joined.unwrap();
        }
        let reads = reads.load(Ordering::SeqCst);
        assert!(reads < 25, "50 callers made {reads} reads");
    }

    #[tokio::test]
    async fn a_value_read_before_a_caller_asked_is_read_again() {
        let shared = FreshRead::<u32, ()>::default();
        assert_eq!(shared.get(None, |_| async { Ok::<_, ()>(1) }).await, Ok(1));
        // Any read will do: the last value.
        assert_eq!(shared.get(None, |_| async { Ok::<_, ()>(2) }).await, Ok(1));
        // Fresh from now: a new read, which is given the last value.
        let asked = Instant::now();
        let read = shared.get(
            Some(asked),
            |previous| async move { Ok::<_, ()>(previous.unwrap() + 10) },
        );
        assert_eq!(read.await, Ok(11));
        // A read that began after `asked` serves it.
        assert_eq!(shared.get(Some(asked), |_| async { Ok::<_, ()>(99) }).await, Ok(11));
        // Carried over, the value serves as it did, and is given to the next read.
        let carried = shared.carried();
        assert_eq!(carried.get(Some(asked), |_| async { Ok::<_, ()>(99) }).await, Ok(11));
        let read = carried.get(Some(Instant::now()), |previous| async move {
            Ok::<_, ()>(previous.unwrap() + 1)
        });
        assert_eq!(read.await, Ok(12));
    }

    #[tokio::test]
    async fn the_callers_waiting_for_a_failed_read_fail_with_it() {
        let shared = Arc::new(FreshRead::<u32, &str>::default());
        let reads = Arc::new(AtomicUsize::new(0));
        let mut callers = tokio::task::JoinSet::new();
        for _ in 0..10 {
            let (shared, reads) = (shared.clone(), reads.clone());
            callers.spawn(async move {
                let asked = Instant::now();
                let read = |_| async move {
                    reads.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Err("store away")
                };
                shared.get(Some(asked), read).await
            });
        }
        while let Some(joined) = callers.join_next().await {
            assert_eq!(joined.unwrap().map_err(|e| *e), Err("store away"));
        }
        // The first read, and at most one more by those that asked after it began.
        let reads = reads.load(Ordering::SeqCst);
        assert!(reads <= 2, "10 callers made {reads} reads of a store that is away");

        // A caller that asks after the failure reads again; nothing was kept from it.
        let read = shared.get(Some(Instant::now()), |previous| async move {
            assert_eq!(previous, None);
            Ok(7)
        });
        assert_eq!(read.await, Ok(7));
    }
}
