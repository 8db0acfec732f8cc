//! The JS threads' queue: first in, first out, except that executions whose sync is not
//! known to be quick share `cap` threads (all but one, in a shared pool). Known to be
//! quick: the sync's last execution took less than [`SLOW`], and none of it has been
//! running for that long. However many customers' functions hang, or loop until their
//! limits stop them (a provider's API that stops answering makes every sync that calls
//! it slow at once), one thread is left to the syncs that are quick.
//!
//! A sync never seen may always run one execution (so a deploy's new syncs are not held
//! back by slow ones); its second waits for room among the `cap` like a slow sync's.
//! What this cannot bound: executions that started quick and then hang, and the first
//! execution of each new sync, take a thread each until they end or reach their limits.

use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// An execution this long makes its sync slow, until one of its executions is quicker.
pub const SLOW: Duration = Duration::from_millis(100);
/// Syncs remembered; past this, those not running are forgotten (each deploy makes new
/// ones).
const REMEMBERED: usize = 4096;

pub(crate) struct Queue<T> {
    state: Mutex<State<T>>,
    changed: Condvar,
    /// Threads that executions of syncs not known to be quick may use at once.
    cap: usize,
}

struct State<T> {
    /// Items by the key of their sync's code, in the order they came.
    waiting: VecDeque<(String, T)>,
    /// Executions running now: their sync's key and when they started (one per busy
    /// thread, so a handful).
    running: Vec<(String, Instant)>,
    /// Syncs seen: whether their last execution took less than [`SLOW`].
    quick: HashMap<String, bool>,
    closed: bool,
}

impl<T> State<T> {
    /// Known to be quick: its last execution was, and none of it runs for long now.
    fn known_quick(&self, key: &str) -> bool {
        self.quick.get(key) == Some(&true)
            && self
                .running
                .iter()
                .all(|(running, started)| running != key || started.elapsed() < SLOW)
    }

    /// Threads busy with executions of syncs not known to be quick.
    fn doubtful(&self) -> usize {
        self.running.iter().filter(|(key, _)| !self.known_quick(key)).count()
    }

    /// A sync never seen, none of whose executions runs: it may run one.
    fn first_of_new(&self, key: &str) -> bool {
        !self.quick.contains_key(key) && self.running.iter().all(|(running, _)| running != key)
    }
}

impl<T> Queue<T> {
    /// A queue whose executions of syncs not known to be quick share `cap` threads.
    pub(crate) fn new(cap: usize) -> Queue<T> {
        Queue {
            state: Mutex::new(State {
                waiting: VecDeque::new(),
                running: Vec::new(),
                quick: HashMap::new(),
                closed: false,
            }),
            changed: Condvar::new(),
            cap,
        }
    }

    fn state(&self) -> MutexGuard<'_, State<T>> {
        // Nothing that holds the lock can panic.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn push(&self, key: String, item: T) {
        self.state().waiting.push_back((key, item));
        self.changed.notify_one();
    }

    /// The first item whose sync is not held back, its key and when it started; `None`
    /// once the queue is closed and empty. Blocks until there is one.
    pub(crate) fn next(&self) -> Option<(String, Instant, T)> {
        let mut state = self.state();
        loop {
            let found = {
                let state = &*state;
                // Counted once, and only when the first waiting sync is not quick.
                let mut doubtful = None;
                state.waiting.iter().position(|(key, _)| {
                    state.known_quick(key)
                        || *doubtful.get_or_insert_with(|| state.doubtful()) < self.cap
                        || state.first_of_new(key)
                })
            };
            if let Some(index) = found {
                let (key, item) = state.waiting.remove(index).expect("found above");
                let started = Instant::now();
                state.running.push((key.clone(), started));
                return Some((key, started, item));
            }
            if state.closed && state.waiting.is_empty() {
                return None;
            }
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    /// The item of `key` that started at `started` has ended.
    pub(crate) fn ended(&self, key: &str, started: Instant) {
        {
            let mut state = self.state();
            if let Some(index) = state.running.iter().position(|(k, at)| k == key && *at == started) {
                state.running.swap_remove(index);
            }
            let quick = started.elapsed() < SLOW;
            match state.quick.get_mut(key) {
                Some(known) => *known = quick,
                None => {
                    state.quick.insert(key.to_string(), quick);
                }
            }
            if state.quick.len() > REMEMBERED {
                let State { quick, running, .. } = &mut *state;
                quick.retain(|key, _| running.iter().any(|(k, _)| k == key));
            }
        }
        // Waiting items may run now: of this sync, or of any other once it was slow.
        self.changed.notify_all();
    }

    /// No more items will come: threads stop once the queue is empty.
    pub(crate) fn close(&self) {
        self.state().closed = true;
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sync_not_known_to_be_quick_leaves_a_thread_to_the_others() {
        let queue = Queue::new(1);
        for item in ["s1", "s2", "f1", "s3"] {
            queue.push(item[..1].to_string(), item);
        }
        // Unknown: one at a time while another sync waits.
        let (_, first, _) = queue.next().unwrap();
        let (_, quick, item) = queue.next().unwrap();
        assert_eq!(item, "f1");
        queue.ended("f", quick);
        // Quick once an execution ended within SLOW: every thread.
        queue.ended("s", first);
        let (_, second, item) = queue.next().unwrap();
        assert_eq!(item, "s2");
        let (_, third, item) = queue.next().unwrap();
        assert_eq!(item, "s3");
        // Running for SLOW makes it slow again: one at a time while another waits.
        queue.ended("s", third);
        queue.push("s".into(), "s4");
        queue.push("f".into(), "f2");
        std::thread::sleep(SLOW);
        assert_eq!(queue.next().unwrap().2, "f2");
        queue.ended("s", second);
        assert_eq!(
            queue.next().unwrap().2,
            "s4",
            "its last execution was slow, but none runs"
        );
    }

    #[test]
    fn slow_syncs_share_all_threads_but_one() {
        let queue = Queue::new(1);
        // a and b known to be slow, f to be quick.
        for key in ["a", "b"] {
            queue.push(key.into(), key);
        }
        let (_, a, _) = queue.next().unwrap();
        let (_, b, _) = queue.next().unwrap();
        queue.push("f".into(), "f0");
        std::thread::sleep(SLOW);
        let (_, f, _) = queue.next().unwrap();
        queue.ended("f", f);
        queue.ended("a", a);
        queue.ended("b", b);

        for item in ["a1", "b1", "n1", "n2", "f1", "b2"] {
            queue.push(item[..1].to_string(), item);
        }
        assert_eq!(queue.next().unwrap().2, "a1");
        // b1 waits for a1, though b runs nothing: the slow ones share one thread. A sync
        // never seen may run one execution, and a quick one runs.
        let (_, n1, item) = queue.next().unwrap();
        assert_eq!(item, "n1");
        assert_eq!(queue.next().unwrap().2, "f1");
        // n2 waits while n1, not yet known to be quick, runs; f runs again.
        queue.push("f".into(), "f2");
        assert_eq!(queue.next().unwrap().2, "f2");
        queue.ended("n", n1);
        assert_eq!(queue.next().unwrap().2, "n2", "n is quick now");
    }

    #[test]
    fn next_returns_none_once_closed_and_empty() {
        let queue: Queue<()> = Queue::new(1);
        queue.push("a".into(), ());
        queue.close();
        assert!(queue.next().is_some());
        assert!(queue.next().is_none());
    }
}
