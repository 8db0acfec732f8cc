//! The threads that run function code. JavaScript never runs on the async runtime's
//! threads: each execution is queued here and taken by the first free thread, in order,
//! once it may have a turn to run JavaScript (a run waiting on its host or a timer gives
//! its turn to another: [`off_turn`]; in a pool that holds slow syncs back, syncs not
//! known to be quick never take every thread or turn: `queue.rs`; a run of a connection
//! its provider limited lately waits for its connection's turn before it is queued:
//! [`Pool::submit_in_turn`]). Its outcome is gathered in its [`Batch`]. Every thread
//! keeps the syncs it has loaded (one QuickJS runtime each) and throws a runtime away
//! after a timeout, out-of-memory or stack overflow, whose state cannot be trusted after.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::engine::Loaded;
use crate::queue::{Queue, Share, Started};
use crate::rate_limit::Turn;
use crate::{Effects, ErrorKind, FunctionError, Invocation, Limits};

/// Syncs a thread keeps loaded; past this it starts again from none.
const LOADED_PER_THREAD: usize = 64;

/// One sync's code: the bundle's modules and the entry module.
#[derive(Debug)]
pub struct SyncCode {
    /// What a thread's loaded copy is kept under: the bundle hash and entry (and the
    /// environment, for a deployed sync).
    pub key: String,
    pub modules: Arc<BTreeMap<String, Vec<u8>>>,
    pub entry: String,
}

impl SyncCode {
    /// A deployed function's code, from its bundle's modules. Kept per environment: a
    /// loaded copy keeps its module-level state between executions, and the same code
    /// deployed to two environments (dev and prod) must not share it.
    pub fn of(
        sync: &hookyard_core::store::functions::DeployedSync,
        modules: Arc<BTreeMap<String, Vec<u8>>>,
    ) -> SyncCode {
        let mut code = SyncCode::new(&sync.bundle_hash, &sync.entry, modules);
        code.key = format!("{}/{}", sync.environment, code.key);
        code
    }

    /// The code of module `entry` of the bundle `bundle_hash`.
    pub fn new(bundle_hash: &str, entry: &str, modules: Arc<BTreeMap<String, Vec<u8>>>) -> SyncCode {
        SyncCode {
            key: format!("{bundle_hash}/{entry}"),
            modules,
            entry: entry.to_string(),
        }
    }
}

/// One execution of a [`Batch`]. Dropped before it ran (its thread gone, or the pool),
/// it ends as [`stopped`], so that its batch never waits for it in vain.
struct Job {
    batch: Arc<Batch>,
    slot: usize,
    run: Option<(Arc<SyncCode>, Invocation)>,
}

impl Drop for Job {
    fn drop(&mut self) {
        if self.run.is_some() {
            self.batch.end(self.slot, Err(stopped()));
        }
    }
}

impl Job {
    /// Ends it unrun: its worker stopped while it waited for its turn.
    fn not_run(mut self) {
        self.run = None;
        let error = FunctionError::new(
            ErrorKind::NotRun,
            "not run: the worker stopped while it waited for its connection's turn",
        );
        self.batch.end(self.slot, Err(error));
    }
}

/// The outcome of an execution whose thread went away.
pub fn stopped() -> FunctionError {
    FunctionError::new(ErrorKind::Internal, "the JS threads stopped")
}

/// Executions submitted together. Each is run by whichever thread is free, so a slow one
/// holds back none queued after it while another thread is free. Their outcomes are
/// gathered here, and the task that waits is woken once for the batch (and once per
/// `quiet` it waits for), not once per execution.
pub struct Batch {
    state: Mutex<Outcomes>,
    ended: Notify,
    /// Told of every end, for a turn waiting on its run ([`Pool::submit_in_turn`]).
    each_end: Notify,
}

struct Outcomes {
    /// By slot: the outcome, once ended and until taken.
    slots: Vec<Option<Result<Effects, FunctionError>>>,
    /// By slot: whether it ended.
    done: Vec<bool>,
    running: usize,
    /// Of those running, the ones waiting for their turn, not queued yet.
    held: usize,
    last_end: Option<Instant>,
}

impl Batch {
    fn new(size: usize) -> Batch {
        Batch {
            state: Mutex::new(Outcomes {
                slots: (0..size).map(|_| None).collect(),
                done: vec![false; size],
                running: size,
                held: 0,
                last_end: None,
            }),
            ended: Notify::new(),
            each_end: Notify::new(),
        }
    }

    fn outcomes(&self) -> std::sync::MutexGuard<'_, Outcomes> {
        // Nothing that holds the lock can panic.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn end(&self, slot: usize, outcome: Result<Effects, FunctionError>) {
        let mut outcomes = self.outcomes();
        outcomes.slots[slot] = Some(outcome);
        outcomes.done[slot] = true;
        outcomes.running -= 1;
        outcomes.last_end = Some(Instant::now());
        if outcomes.running == outcomes.held {
            self.ended.notify_one();
        }
        drop(outcomes);
        self.each_end.notify_waiters();
    }

    /// Waits until every execution ended, or (with `quiet`) until those not waiting for
    /// their turn did, or none has ended for that long after at least one did.
    pub async fn wait(&self, quiet: Option<Duration>) {
        loop {
            let ended = self.ended.notified();
            let (running, held, last_end) = {
                let outcomes = self.outcomes();
                (outcomes.running, outcomes.held, outcomes.last_end)
            };
            if running == 0 || (quiet.is_some() && running == held) {
                return;
            }
            let Some(quiet) = quiet else {
                ended.await;
                continue;
            };
            // Quiet since the last end: done. Before the first end: look again later.
            let look_again = match last_end.map(|at| at.elapsed()) {
                Some(since) if since >= quiet => return,
                Some(since) => quiet - since,
                None => quiet,
            };
            tokio::select! {
                _ = ended => {}
                _ = tokio::time::sleep(look_again) => {}
            }
        }
    }

    /// Waits until the execution in `slot` ended.
    async fn slot_ended(&self, slot: usize) {
        loop {
            let notified = self.each_end.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.outcomes().done[slot] {
                return;
            }
            notified.await;
        }
    }

    /// The outcomes that ended since the last call, by slot.
    pub fn take_ended(&self) -> Vec<(usize, Result<Effects, FunctionError>)> {
        self.outcomes()
            .slots
            .iter_mut()
            .enumerate()
            .filter_map(|(slot, outcome)| outcome.take().map(|outcome| (slot, outcome)))
            .collect()
    }
}

#[derive(Clone)]
pub struct Pool {
    queue: Arc<Closing>,
    threads: usize,
}

/// Closes the queue when the last clone of its pool is dropped, so the threads stop.
struct Closing(Arc<Queue<Job>>);

impl Drop for Closing {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// How many runs a pool runs at once.
#[derive(Debug, Clone, Copy)]
pub struct Sizing {
    /// Runs executing JavaScript at once (0: one per CPU).
    pub turns: usize,
    /// Runs in progress at once, each on a thread of its own, those waiting on their host
    /// or a timer included; at least `turns` (0: [`RUNS_PER_TURN`] per turn).
    pub runs: usize,
    /// Whether syncs not known to be quick share all threads but one, and all turns but
    /// one (`queue.rs`): for many customers' functions, where those that hang must not
    /// hold back the others.
    pub hold_back_slow: bool,
}

/// Runs in progress per turn by default: at a provider's 100–300 ms a call and a
/// millisecond or so of JavaScript per run, this many keep a CPU busy for a sync that
/// calls its provider once a run.
pub const RUNS_PER_TURN: usize = 16;

impl Sizing {
    /// `runs` in progress (fewer count as `turns`), `turns` of them running JavaScript at
    /// once, none held back: for runs of one kind that all wait alike (exec, actions).
    pub fn of(turns: usize, runs: usize) -> Sizing {
        Sizing {
            turns,
            runs: runs.max(turns),
            hold_back_slow: false,
        }
    }
}

impl Pool {
    /// Starts `threads` JS threads (0: one per CPU), which take executions in order, each
    /// to its end: a run's waits keep its thread and its turn.
    pub fn new(threads: usize, limits: Limits) -> Pool {
        let threads = or_one_per_cpu(threads);
        Pool::sized(Sizing::of(threads, threads), limits)
    }

    /// A pool of `sizing.runs` threads, `sizing.turns` of which run JavaScript at once.
    pub fn sized(sizing: Sizing, limits: Limits) -> Pool {
        let turns = or_one_per_cpu(sizing.turns);
        let threads = if sizing.runs == 0 {
            turns * RUNS_PER_TURN
        } else {
            sizing.runs.max(turns)
        };
        let queue = Arc::new(Queue::new(
            Share::of(threads, sizing.hold_back_slow),
            Share::of(turns, sizing.hold_back_slow),
        ));
        let limits = Arc::new(limits);
        // A run gives its turn back while it waits only where another thread can use it.
        let turns_to_give = threads > turns;
        for n in 0..threads {
            let queue = queue.clone();
            let limits = limits.clone();
            std::thread::Builder::new()
                .name(format!("hookyard-js-{n}"))
                // QuickJS's own stack limit must be hit well before the thread's.
                .stack_size(limits.stack_bytes + 8 * 1024 * 1024)
                .spawn(move || run_thread(n, &queue, &limits, turns_to_give))
                .expect("spawning a JS thread");
        }
        Pool {
            queue: Arc::new(Closing(queue)),
            threads,
        }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs the sync's `onWebhook` with `invocation` on a JS thread.
    pub async fn execute(&self, code: Arc<SyncCode>, invocation: Invocation) -> Result<Effects, FunctionError> {
        let batch = self.submit(vec![(code, invocation)]);
        batch.wait(None).await;
        batch
            .take_ended()
            .pop()
            .map_or_else(|| Err(stopped()), |(_, outcome)| outcome)
    }

    /// Queues `runs` as one batch, slot `n` for `runs[n]`.
    pub fn submit(&self, runs: Vec<(Arc<SyncCode>, Invocation)>) -> Arc<Batch> {
        self.submit_in_turn(
            runs.into_iter()
                .map(|(code, invocation)| (code, invocation, None))
                .collect(),
        )
    }

    /// [`Pool::submit`], except that a run with a [`Turn`] (its connection's provider
    /// limited it lately) is queued only once it has its turn, which it keeps until it
    /// ends; one whose worker stops first ends unrun ([`ErrorKind::NotRun`]). Must be
    /// called on the async runtime.
    pub fn submit_in_turn(&self, runs: Vec<(Arc<SyncCode>, Invocation, Option<Turn>)>) -> Arc<Batch> {
        let batch = Arc::new(Batch::new(runs.len()));
        for (slot, (code, invocation, turn)) in runs.into_iter().enumerate() {
            let key = code.key.clone();
            let job = Job {
                batch: batch.clone(),
                slot,
                run: Some((code, invocation)),
            };
            let Some(turn) = turn else {
                self.queue.0.push(key, job);
                continue;
            };
            batch.outcomes().held += 1;
            let (queue, batch) = (self.queue.clone(), batch.clone());
            tokio::spawn(async move {
                let turn = turn.take().await;
                {
                    let mut outcomes = batch.outcomes();
                    outcomes.held -= 1;
                }
                let Ok(turn) = turn else {
                    job.not_run();
                    return;
                };
                queue.0.push(key, job);
                batch.slot_ended(slot).await;
                drop(turn);
            });
        }
        batch
    }
}

/// `n`, or one per CPU for 0.
fn or_one_per_cpu(n: usize) -> usize {
    match n {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    }
}

thread_local! {
    /// The run on this thread, when it may give its turn back while it waits.
    static WAITING: RefCell<Option<(Arc<Queue<Job>>, u64)>> = const { RefCell::new(None) };
}

/// Runs `wait` (a host call, a timer) without a turn to run JavaScript: another run in
/// progress may have it meanwhile. This run takes one back before it goes on.
pub(crate) fn off_turn<R>(wait: impl FnOnce() -> R) -> R {
    struct Resume(Arc<Queue<Job>>, u64);
    impl Drop for Resume {
        fn drop(&mut self) {
            self.0.resume(self.1);
        }
    }
    let Some((queue, id)) = WAITING.with(|waiting| waiting.borrow().clone()) else {
        return wait();
    };
    queue.pause(id);
    let _resume = Resume(queue, id);
    wait()
}

fn run_thread(thread: usize, queue: &Arc<Queue<Job>>, limits: &Limits, turns_to_give: bool) {
    let mut loaded: HashMap<String, Loaded> = HashMap::new();
    let mut ended = None;
    while let Some(Started {
        id,
        started,
        item: mut job,
    }) = queue.next(ended, thread, |key| loaded.contains_key(key))
    {
        if turns_to_give {
            WAITING.with(|waiting| *waiting.borrow_mut() = Some((queue.clone(), id)));
        }
        let mut outcome = match &job.run {
            Some((code, invocation)) => {
                std::panic::catch_unwind(AssertUnwindSafe(|| execute(&mut loaded, code, invocation, limits)))
                    .unwrap_or_else(|_| {
                        loaded.remove(&code.key);
                        Err(FunctionError::new(ErrorKind::Internal, "the engine panicked"))
                    })
            }
            // Never: a job is queued once, with its run.
            None => Err(stopped()),
        };
        WAITING.with(|waiting| waiting.borrow_mut().take());
        match &mut outcome {
            Ok(effects) => effects.elapsed = started.elapsed(),
            Err(error) => error.elapsed = started.elapsed(),
        }
        // Ended here, not by the drop guard; in the queue as the thread takes its next.
        job.run = None;
        job.batch.end(job.slot, outcome);
        ended = Some(id);
    }
}

fn execute(
    loaded: &mut HashMap<String, Loaded>,
    code: &SyncCode,
    invocation: &Invocation,
    limits: &Limits,
) -> Result<Effects, FunctionError> {
    if !loaded.contains_key(&code.key) {
        if loaded.len() >= LOADED_PER_THREAD {
            loaded.clear();
        }
        let sync = Loaded::load(code.modules.clone(), &code.entry, limits)?;
        loaded.insert(code.key.clone(), sync);
    }
    let sync = loaded.get(&code.key).expect("loaded above");
    let outcome = sync.execute(invocation, limits);
    if let Err(error) = &outcome {
        if error.kind.poisons_runtime() {
            loaded.remove(&code.key);
        }
    }
    outcome
}
