//! The JS threads' queue, and the turns to run JavaScript. Each run in progress has a
//! thread of its own; of those runs, `turns` run JavaScript at a time (one per CPU by
//! default). A run that waits (on its host: the provider's API, the store; or for a
//! timer) gives its turn back and takes one again once its wait ends, ahead of the runs
//! not started yet: threads are sized for the waits, turns for the CPUs, so a burst of
//! runs that each wait 200 ms on a provider does not run two at a time on two CPUs.
//!
//! First in, first out, except that runs whose sync is not known to be quick hold at most
//! all threads but one and all turns but one (in a shared pool). Known to be quick: the
//! sync's last execution took less than [`SLOW`] (waits included), and none of it has
//! been running for that long. However many customers' functions hang, or loop until
//! their limits stop them (a provider's API that stops answering makes every sync that
//! calls it slow at once), a thread and a turn are left to the syncs that are quick.
//!
//! A sync never seen may always run one execution (so a deploy's new syncs are not held
//! back by slow ones); its second waits for room like a slow sync's. What this cannot
//! bound: executions that started quick and then hang, and the first execution of each
//! new sync, take a thread (and a turn, while they compute) each until they end or reach
//! their limits.

use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// An execution this long makes its sync slow, until one of its executions is quicker.
pub const SLOW: Duration = Duration::from_millis(100);
/// Syncs remembered; past this, those not running are forgotten (each deploy makes new
/// ones).
const REMEMBERED: usize = 4096;
/// Items after the first that a thread looks through for one of a sync it has loaded.
const AFFINITY_WINDOW: usize = 64;

/// How many there are of threads or of turns, and how many of them runs of syncs not
/// known to be quick may hold at once.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Share {
    pub all: usize,
    pub doubtful: usize,
}

impl Share {
    /// `all`, of which syncs not known to be quick hold all but one when `held_back`.
    pub(crate) fn of(all: usize, held_back: bool) -> Share {
        let doubtful = if held_back { all.saturating_sub(1).max(1) } else { all };
        Share { all, doubtful }
    }
}

pub(crate) struct Queue<T> {
    state: Mutex<State<T>>,
    /// By thread: where it waits, idle for an item or for its run's turn back. Each is
    /// woken alone, never all at once.
    signals: Vec<Condvar>,
    /// `all` is the pool's thread count: no more than that call [`Queue::next`] at once.
    threads: Share,
    turns: Share,
}

/// An item not started yet.
struct Waiting<T> {
    key: String,
    item: T,
    /// How often a thread took a later item of a sync it had loaded instead of this one.
    passed_over: usize,
}

/// A run in progress, on its thread.
struct Run {
    id: u64,
    key: String,
    started: Instant,
    thread: usize,
    /// Whether it holds a turn (runs JavaScript).
    turn: bool,
    /// While it waits to take a turn back: its place in line.
    resuming: Option<u64>,
    /// A turn is kept for it and its thread woken to take it.
    nudged: bool,
}

impl Run {
    /// Holds a turn, or has one kept for it.
    fn holds(&self) -> bool {
        self.turn || self.nudged
    }
}

struct State<T> {
    /// Items by the key of their sync's code, in the order they came.
    waiting: VecDeque<Waiting<T>>,
    /// Threads waiting for an item, the last to go idle last.
    idle: Vec<usize>,
    /// Threads woken for an item that have not looked yet: the turns they will want.
    woken: usize,
    /// Runs in progress: one per busy thread, so a few dozen at most.
    runs: Vec<Run>,
    /// Syncs seen: whether their last execution took less than [`SLOW`].
    quick: HashMap<String, bool>,
    closed: bool,
    next_id: u64,
    next_in_line: u64,
}

/// An item taken from the queue, with the id its run is known by until it ends.
pub(crate) struct Started<T> {
    pub id: u64,
    pub started: Instant,
    pub item: T,
}

/// What the conditions of the runs in progress allow: counted once per look.
struct Room {
    turns_held: usize,
    doubtful_threads: usize,
    doubtful_turns: usize,
}

impl<T> State<T> {
    /// Known to be quick: its last execution was, and none of it runs for long now.
    fn known_quick(&self, key: &str) -> bool {
        self.quick.get(key) == Some(&true)
            && self
                .runs
                .iter()
                .all(|run| run.key != key || run.started.elapsed() < SLOW)
    }

    fn room(&self) -> Room {
        let mut room = Room {
            turns_held: 0,
            doubtful_threads: 0,
            doubtful_turns: 0,
        };
        for run in &self.runs {
            room.turns_held += usize::from(run.holds());
            if !self.known_quick(&run.key) {
                room.doubtful_threads += 1;
                room.doubtful_turns += usize::from(run.holds());
            }
        }
        room
    }

    /// A sync never seen none of whose runs is `busy`: it may have one more.
    fn first_of_new(&self, key: &str, busy: impl Fn(&Run) -> bool) -> bool {
        !self.quick.contains_key(key) && !self.runs.iter().any(|run| run.key == key && busy(run))
    }

    /// Whether a run of `key` may take a turn.
    fn may_take_turn(&self, key: &str, room: &Room, turns: Share) -> bool {
        room.turns_held < turns.all
            && (room.doubtful_turns < turns.doubtful || self.known_quick(key) || self.first_of_new(key, Run::holds))
    }

    /// Whether a run not started yet of `key` may start (on the thread asking).
    fn may_start(&self, key: &str, room: &Room, threads: Share, turns: Share) -> bool {
        self.may_take_turn(key, room, turns)
            && (room.doubtful_threads < threads.doubtful || self.known_quick(key) || self.first_of_new(key, |_| true))
    }

    /// The first in line of the runs waiting to take their turn back that may take one
    /// now (and have none kept for them yet): those go before runs not started.
    fn next_resumer(&self, turns: Share) -> Option<usize> {
        let in_line = |run: &&Run| run.resuming.is_some() && !run.nudged;
        if !self.runs.iter().any(|run| in_line(&run)) {
            return None;
        }
        let room = self.room();
        self.runs
            .iter()
            .enumerate()
            .filter(|(_, run)| in_line(run) && self.may_take_turn(&run.key, &room, turns))
            .min_by_key(|(_, run)| run.resuming)
            .map(|(index, _)| index)
    }
}

impl<T> Queue<T> {
    /// A queue for `threads.all` threads (numbered from 0) of which `turns.all` run
    /// JavaScript at once.
    pub(crate) fn new(threads: Share, turns: Share) -> Queue<T> {
        Queue {
            state: Mutex::new(State {
                waiting: VecDeque::new(),
                idle: Vec::new(),
                woken: 0,
                runs: Vec::new(),
                quick: HashMap::new(),
                closed: false,
                next_id: 0,
                next_in_line: 0,
            }),
            signals: (0..threads.all).map(|_| Condvar::new()).collect(),
            threads,
            turns,
        }
    }

    fn state(&self) -> MutexGuard<'_, State<T>> {
        // Nothing that holds the lock can panic.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn wait<'a>(&self, condvar: &Condvar, state: MutexGuard<'a, State<T>>) -> MutexGuard<'a, State<T>> {
        condvar.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Wakes the thread that went idle last: at a steady trickle the same few threads run
    /// everything, and only they load the syncs they run.
    fn wake_one(&self, state: &mut State<T>) {
        if let Some(thread) = state.idle.pop() {
            state.woken += 1;
            self.signals[thread].notify_one();
        }
    }

    fn wake_all(&self, state: &mut State<T>) {
        state.woken += state.idle.len();
        for thread in state.idle.drain(..) {
            self.signals[thread].notify_one();
        }
    }

    pub(crate) fn push(&self, key: String, item: T) {
        let mut state = self.state();
        state.waiting.push_back(Waiting {
            key,
            item,
            passed_over: 0,
        });
        // With every turn held, the thread that gives one up takes the item itself (or
        // wakes one to); waking another now would only race it.
        if self.turn_free(&state) {
            self.wake_one(&mut state);
        }
    }

    /// Whether a turn is free that no thread woken already will take.
    fn turn_free(&self, state: &State<T>) -> bool {
        self.turns_free(state) > 0
    }

    /// Turns free that no thread woken already will take.
    fn turns_free(&self, state: &State<T>) -> usize {
        let held = state.runs.iter().filter(|run| run.holds()).count();
        self.turns.all.saturating_sub(held + state.woken)
    }

    /// Ends run `ended` of thread `thread`, if given, and takes the thread's next item:
    /// the first whose sync is not held back, started with a turn, or a later one of a
    /// sync the thread has `loaded` (see [`Queue::start`]). At once, so no other thread
    /// takes the turn the ended run gave up. `None` once the queue is closed and empty.
    /// Blocks until there is one.
    pub(crate) fn next(&self, ended: Option<u64>, thread: usize, loaded: impl Fn(&str) -> bool) -> Option<Started<T>> {
        let mut state = self.state();
        if let Some(id) = ended {
            self.end(&mut state, id);
        }
        loop {
            if let Some(started) = self.start(&mut state, thread, &loaded) {
                return Some(started);
            }
            if state.closed && state.waiting.is_empty() {
                return None;
            }
            state.idle.push(thread);
            state = self.wait(&self.signals[thread], state);
            // Still listed: woken spuriously. If not, a wake took it off and counted it.
            match state.idle.iter().position(|idle| *idle == thread) {
                Some(index) => {
                    state.idle.remove(index);
                }
                None => state.woken -= 1,
            }
        }
    }

    /// Starts an item that may start now, if any: the first, unless one of the next
    /// [`AFFINITY_WINDOW`] is of a sync `loaded` on this thread and the first is not, which
    /// spares loading another copy of a sync (a few MB with its zod models). The first is
    /// passed over at most once per thread, so it waits at most a round of them.
    fn start(&self, state: &mut State<T>, thread: usize, loaded: &dyn Fn(&str) -> bool) -> Option<Started<T>> {
        // A run waiting for its turn back goes first.
        if self.nudge_resumer(state) {
            return None;
        }
        let (found, passed_over) = self.choose(state, loaded)?;
        if let Some(first) = passed_over {
            state.waiting[first].passed_over += 1;
        }
        let Waiting { key, item, .. } = state.waiting.remove(found).expect("found above");
        let (id, started) = (state.next_id, Instant::now());
        state.next_id += 1;
        state.runs.push(Run {
            id,
            key,
            started,
            thread,
            turn: true,
            resuming: None,
            nudged: false,
        });
        Some(Started { id, started, item })
    }

    /// The item [`Queue::start`] starts, and the first it passes over if it does.
    fn choose(&self, state: &State<T>, loaded: &dyn Fn(&str) -> bool) -> Option<(usize, Option<usize>)> {
        if state.waiting.is_empty() {
            return None;
        }
        let room = state.room();
        let may_start = |waiting: &Waiting<T>| state.may_start(&waiting.key, &room, self.threads, self.turns);
        let first = state.waiting.iter().position(may_start)?;
        let head = &state.waiting[first];
        if loaded(&head.key) || head.passed_over >= self.threads.all {
            return Some((first, None));
        }
        let ours = state
            .waiting
            .iter()
            .enumerate()
            .skip(first + 1)
            .take(AFFINITY_WINDOW)
            .find(|(_, waiting)| loaded(&waiting.key) && may_start(waiting));
        Some(match ours {
            Some((index, _)) => (index, Some(first)),
            None => (first, None),
        })
    }

    /// Keeps a turn for the first run in line to take its turn back, if one may, and
    /// wakes its thread.
    fn nudge_resumer(&self, state: &mut State<T>) -> bool {
        let Some(index) = state.next_resumer(self.turns) else {
            return false;
        };
        let run = &mut state.runs[index];
        run.nudged = true;
        self.signals[run.thread].notify_one();
        true
    }

    /// Run `id` waits: its turn goes to a run waiting to take its own back, or to one
    /// not started yet.
    pub(crate) fn pause(&self, id: u64) {
        let mut state = self.state();
        if let Some(run) = state.runs.iter_mut().find(|run| run.id == id) {
            run.turn = false;
        }
        if !self.nudge_resumer(&mut state) && !state.waiting.is_empty() && self.turn_free(&state) {
            self.wake_one(&mut state);
        }
    }

    /// Run `id`'s wait ended: blocks until it has a turn again.
    pub(crate) fn resume(&self, id: u64) {
        let mut state = self.state();
        let Some(thread) = state.runs.iter().find(|run| run.id == id).map(|run| run.thread) else {
            return;
        };
        while !self.take_turn(&mut state, id) {
            state = self.wait(&self.signals[thread], state);
        }
        // Runs not started wait while a resuming one may go: this one went.
        if !state.waiting.is_empty() && self.turn_free(&state) {
            self.wake_one(&mut state);
        }
    }

    /// Gives run `id` its turn back if one was kept for it or it may take one; if not,
    /// puts it in line for one.
    fn take_turn(&self, state: &mut State<T>, id: u64) -> bool {
        let room = state.room();
        let Some(index) = state.runs.iter().position(|run| run.id == id) else {
            return true;
        };
        let run = &state.runs[index];
        let may = run.nudged || state.may_take_turn(&run.key, &room, self.turns);
        let in_line = state.next_in_line;
        let run = &mut state.runs[index];
        if may {
            run.turn = true;
            run.nudged = false;
            run.resuming = None;
        } else if run.resuming.is_none() {
            run.resuming = Some(in_line);
            state.next_in_line += 1;
        }
        may
    }

    /// Run `id` has ended. Its thread takes the next item itself: others are woken only
    /// when more than its turn may have come free.
    #[cfg(test)]
    pub(crate) fn ended(&self, id: u64) {
        self.end(&mut self.state(), id);
    }

    fn end(&self, state: &mut State<T>, id: u64) {
        let Some(index) = state.runs.iter().position(|run| run.id == id) else {
            return;
        };
        let run = state.runs.swap_remove(index);
        let quick = run.started.elapsed() < SLOW;
        // Ending slow, it may have held its sync (or others) back.
        let mut changed = !quick;
        match state.quick.get_mut(&run.key) {
            Some(known) => {
                changed |= *known != quick;
                *known = quick;
            }
            None => {
                changed = true;
                state.quick.insert(run.key, quick);
            }
        }
        if state.quick.len() > REMEMBERED {
            let State { quick, runs, .. } = &mut *state;
            quick.retain(|key, _| runs.iter().any(|run| run.key == *key));
        }
        // Its turn goes to the first run in line for one; when it ended slow, or its sync
        // changed from quick to slow or back (the caps moved), more may go.
        while self.nudge_resumer(state) && changed {}
        // Its thread takes a turn itself if it may; more may start now only when the caps
        // moved.
        if changed && !state.waiting.is_empty() {
            for _ in 1..self.turns_free(state) {
                self.wake_one(state);
            }
        }
    }

    /// No more items will come: threads stop once the queue is empty.
    pub(crate) fn close(&self) {
        let mut state = self.state();
        state.closed = true;
        self.wake_all(&mut state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As many as a test asks for: only the other share is tested.
    const PLENTY: Share = Share {
        all: 100,
        doubtful: 100,
    };

    impl<T> Queue<T> {
        fn try_next(&self) -> Option<(u64, T)> {
            self.try_next_on(&|_| false)
        }

        /// As a thread with the syncs that `loaded` says loaded.
        fn try_next_on(&self, loaded: &dyn Fn(&str) -> bool) -> Option<(u64, T)> {
            self.start(&mut self.state(), 0, loaded)
                .map(|started| (started.id, started.item))
        }

        fn try_resume(&self, id: u64) -> bool {
            self.take_turn(&mut self.state(), id)
        }
    }

    fn held_back(all: usize) -> Share {
        Share::of(all, true)
    }

    #[test]
    fn a_sync_not_known_to_be_quick_leaves_a_thread_to_the_others() {
        let queue = Queue::new(held_back(2), PLENTY);
        for item in ["s1", "s2", "f1", "s3"] {
            queue.push(item[..1].to_string(), item);
        }
        // Unknown: one at a time while another sync waits.
        let (first, _) = queue.try_next().unwrap();
        let (quick, item) = queue.try_next().unwrap();
        assert_eq!(item, "f1");
        queue.ended(quick);
        // Quick once an execution ended within SLOW: every thread.
        queue.ended(first);
        let (second, item) = queue.try_next().unwrap();
        assert_eq!(item, "s2");
        let (third, item) = queue.try_next().unwrap();
        assert_eq!(item, "s3");
        // Running for SLOW makes it slow again: one at a time while another waits.
        queue.ended(third);
        queue.push("s".into(), "s4");
        queue.push("f".into(), "f2");
        std::thread::sleep(SLOW);
        assert_eq!(queue.try_next().unwrap().1, "f2");
        queue.ended(second);
        assert_eq!(
            queue.try_next().unwrap().1,
            "s4",
            "its last execution was slow, but none runs"
        );
    }

    /// Makes `a` and `b` known to be slow and `f` quick.
    fn known(queue: &Queue<&'static str>) {
        for key in ["a", "b"] {
            queue.push(key.into(), key);
        }
        let (a, _) = queue.try_next().unwrap();
        let (b, _) = queue.try_next().unwrap();
        std::thread::sleep(SLOW);
        queue.ended(a);
        queue.ended(b);
        queue.push("f".into(), "f0");
        let (f, _) = queue.try_next().unwrap();
        queue.ended(f);
    }

    #[test]
    fn slow_syncs_share_all_threads_but_one() {
        let queue = Queue::new(held_back(2), PLENTY);
        known(&queue);
        for item in ["a1", "b1", "n1", "n2", "f1", "b2"] {
            queue.push(item[..1].to_string(), item);
        }
        assert_eq!(queue.try_next().unwrap().1, "a1");
        // b1 waits for a1, though b runs nothing: the slow ones share one thread. A sync
        // never seen may run one execution, and a quick one runs.
        let (n1, item) = queue.try_next().unwrap();
        assert_eq!(item, "n1");
        assert_eq!(queue.try_next().unwrap().1, "f1");
        // n2 waits while n1, not yet known to be quick, runs; f runs again.
        queue.push("f".into(), "f2");
        assert_eq!(queue.try_next().unwrap().1, "f2");
        queue.ended(n1);
        assert_eq!(queue.try_next().unwrap().1, "n2", "n is quick now");
    }

    #[test]
    fn slow_syncs_share_all_turns_but_one_though_threads_are_free() {
        let queue = Queue::new(PLENTY, held_back(2));
        known(&queue);
        for item in ["a1", "b1", "f1", "f2"] {
            queue.push(item[..1].to_string(), item);
        }
        let (a1, item) = queue.try_next().unwrap();
        assert_eq!(item, "a1");
        assert_eq!(
            queue.try_next().unwrap().1,
            "f1",
            "b1 waits: a1 holds the slow ones' turn"
        );
        assert!(queue.try_next().is_none(), "both turns are held");
        // a1 waits on its provider: its turn goes to b1, slow as it is.
        queue.pause(a1);
        assert_eq!(queue.try_next().unwrap().1, "b1");
        assert!(!queue.try_resume(a1), "b1 holds the slow ones' turn, f1 the other");
    }

    #[test]
    fn a_run_that_waits_gives_its_turn_and_takes_one_back_before_new_runs() {
        let queue = Queue::new(PLENTY, Share::of(1, false));
        for item in ["a", "b", "c"] {
            queue.push(item.into(), item);
        }
        let (a, _) = queue.try_next().unwrap();
        assert!(queue.try_next().is_none(), "one turn, held by a");
        queue.pause(a);
        let (b, item) = queue.try_next().unwrap();
        assert_eq!(item, "b");
        assert!(!queue.try_resume(a), "b holds the turn");
        queue.pause(b);
        assert!(
            queue.try_next().is_none(),
            "a waits to take its turn back: c does not start"
        );
        assert!(queue.try_resume(a));
        queue.ended(a);
        let (c, item) = queue.try_next().unwrap();
        assert_eq!(item, "c", "b still waits on its host: the turn is free");
        assert!(!queue.try_resume(b));
        queue.ended(c);
        assert!(queue.try_resume(b));
    }

    #[test]
    fn a_resuming_run_blocks_until_a_turn_is_free() {
        let queue = std::sync::Arc::new(Queue::new(PLENTY, Share::of(1, false)));
        for item in ["a", "b"] {
            queue.push(item.into(), item);
        }
        let (a, _) = queue.try_next().unwrap();
        queue.pause(a);
        let (b, _) = queue.try_next().unwrap();
        let (resumed, took) = std::sync::mpsc::channel();
        let resuming = {
            let queue = queue.clone();
            std::thread::spawn(move || {
                queue.resume(a);
                resumed.send(()).unwrap();
            })
        };
        // Once it waits, b's end is what lets it go.
        while !queue.state().runs.iter().any(|run| run.resuming.is_some()) {
            std::thread::yield_now();
        }
        assert!(took.try_recv().is_err());
        queue.ended(b);
        took.recv().unwrap();
        resuming.join().unwrap();
    }

    #[test]
    fn a_thread_takes_a_later_item_of_a_sync_it_has_loaded_but_passes_the_first_over_once_per_thread() {
        let queue = Queue::new(Share::of(2, false), PLENTY);
        for item in ["a1", "b1", "b2", "b3", "a2"] {
            queue.push(item[..1].to_string(), item);
        }
        let has_b = |key: &str| key == "b";
        // Each ends at once, leaving the room it took.
        let take = |loaded: &dyn Fn(&str) -> bool| {
            let (id, item) = queue.try_next_on(loaded).unwrap();
            queue.ended(id);
            item
        };
        assert_eq!(take(&has_b), "b1");
        assert_eq!(take(&has_b), "b2");
        assert_eq!(take(&has_b), "a1", "passed over twice, by two threads' worth");
        assert_eq!(take(&|key| key == "a"), "a2", "its own, passing b3 over once");
        assert_eq!(take(&|_| false), "b3", "nothing loaded: the first");
    }

    #[test]
    fn next_returns_none_once_closed_and_empty() {
        let queue: Queue<()> = Queue::new(held_back(1), held_back(1));
        queue.push("a".into(), ());
        queue.close();
        let started = queue.next(None, 0, |_| false).unwrap();
        assert!(queue.next(Some(started.id), 0, |_| false).is_none());
    }
}
