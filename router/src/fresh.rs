//! A value read from the store that callers may share only when the read began after
//! they asked: strictly as fresh as a read of their own, without one read each.
//!
//! Webhooks arrive at the router by the pull batch, and each must see the connections
//! as they were when it arrived (a connection deleted before then is never matched).
//! One read per webhook made that read the router's largest cost. Here reads of one
//! value run one at a time: every caller that asked while a read was running waits for
//! the next read, which answers all of them.

use std::future::Future;
use std::sync::Mutex;
use std::time::Instant;

pub struct FreshRead<T> {
    /// The last value read, and when the read that returned it began.
    last: Mutex<Option<(T, Instant)>>,
    /// Held for the length of one read.
    reading: tokio::sync::Mutex<()>,
}

impl<T> Default for FreshRead<T> {
    fn default() -> Self {
        FreshRead {
            last: Mutex::new(None),
            reading: tokio::sync::Mutex::new(()),
        }
    }
}

impl<T: Clone> FreshRead<T> {
    /// A value from a read that began at or after `since` (`None`: any read will do).
    /// When the last one is older, `read` runs with it (to reuse what has not changed),
    /// unless another caller's read that began late enough finishes first.
    pub async fn get<F, Fut, E>(&self, since: Option<Instant>, read: F) -> Result<T, E>
    where
        F: FnOnce(Option<T>) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        if let Some(value) = self.recent(since) {
            return Ok(value);
        }
        let _reading = self.reading.lock().await;
        if let Some(value) = self.recent(since) {
            return Ok(value);
        }
        let began = Instant::now();
        let previous = self.last().map(|(value, _)| value);
        let value = read(previous).await?;
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some((value.clone(), began));
        Ok(value)
    }

    fn last(&self) -> Option<(T, Instant)> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn recent(&self, since: Option<Instant>) -> Option<T> {
        self.last()
            .filter(|(_, began)| since.is_none_or(|since| *began >= since))
            .map(|(value, _)| value)
    }
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
        let shared = Arc::new(FreshRead::<Instant>::default());
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
        let shared = FreshRead::<u32>::default();
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
    }

    #[tokio::test]
    async fn a_failed_read_is_its_callers_error_and_the_next_caller_reads() {
        let shared = FreshRead::<u32>::default();
        let failed = shared.get(Some(Instant::now()), |_| async { Err::<u32, _>("store away") });
        assert_eq!(failed.await, Err("store away"));
        let read = shared.get(Some(Instant::now()), |previous| async move {
            assert_eq!(previous, None, "nothing was kept from the failed read");
            Ok::<_, &str>(7)
        });
        assert_eq!(read.await, Ok(7));
    }
}
