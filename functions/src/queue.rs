//! The JS threads' queue: first in, first out, except that a sync runs on `cap` threads
//! at most (all but one, in a shared pool) unless it is known to be quick: its last
//! execution took less than [`SLOW`], and none of it has been running for that long. One
//! customer's function that hangs, or loops until its limits stop it, thus leaves a
//! thread to every other sync, from its first execution on; a quick sync may use every
//! thread.

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
    /// Threads a slow sync may use at once.
    cap: usize,
}

struct State<T> {
    /// Items by the key of their sync's code, in the order they came.
    waiting: VecDeque<(String, T)>,
    /// Syncs seen: running now, or how their last execution went.
    syncs: HashMap<String, Load>,
    closed: bool,
}

#[derive(Default)]
struct Load {
    /// When each of its running executions started.
    running: Vec<Instant>,
    /// Its last execution took less than [`SLOW`].
    quick: bool,
}

impl Load {
    fn held_back(&self, cap: usize) -> bool {
        self.running.len() >= cap && !(self.quick && self.running.iter().all(|at| at.elapsed() < SLOW))
    }
}

impl<T> Queue<T> {
    /// A queue whose syncs not known to be quick run on `cap` threads at most.
    pub(crate) fn new(cap: usize) -> Queue<T> {
        Queue {
            state: Mutex::new(State {
                waiting: VecDeque::new(),
                syncs: HashMap::new(),
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
                state
                    .waiting
                    .iter()
                    .position(|(key, _)| !state.syncs.get(key).is_some_and(|load| load.held_back(self.cap)))
            };
            if let Some(index) = found {
                let (key, item) = state.waiting.remove(index).expect("found above");
                let started = Instant::now();
                state.syncs.entry(key.clone()).or_default().running.push(started);
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
            if let Some(load) = state.syncs.get_mut(key) {
                if let Some(index) = load.running.iter().position(|at| *at == started) {
                    load.running.swap_remove(index);
                }
                load.quick = started.elapsed() < SLOW;
            }
            if state.syncs.len() > REMEMBERED {
                state.syncs.retain(|_, load| !load.running.is_empty());
            }
        }
        // Waiting items of this sync may run now.
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
    fn next_returns_none_once_closed_and_empty() {
        let queue: Queue<()> = Queue::new(1);
        queue.push("a".into(), ());
        queue.close();
        assert!(queue.next().is_some());
        assert!(queue.next().is_none());
    }
}
