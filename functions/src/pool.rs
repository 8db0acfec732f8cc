//! The threads that run function code. JavaScript never runs on the async runtime's
//! threads: each execution is queued here and its outcome sent back. Every thread keeps
//! the syncs it has loaded (one QuickJS runtime each) and throws a runtime away after a
//! timeout, out-of-memory or stack overflow, whose state cannot be trusted after.

use std::collections::{BTreeMap, HashMap};
use std::panic::AssertUnwindSafe;
use std::sync::{mpsc, Arc, Mutex};

use tokio::sync::oneshot;

use crate::engine::Loaded;
use crate::{Effects, ErrorKind, FunctionError, Invocation, Limits};

/// Syncs a thread keeps loaded; past this it starts again from none.
const LOADED_PER_THREAD: usize = 64;

/// One sync's code: the bundle's modules and the entry module.
#[derive(Debug)]
pub struct SyncCode {
    /// The bundle hash and entry: what a thread's loaded copy is kept under.
    pub key: String,
    pub modules: Arc<BTreeMap<String, Vec<u8>>>,
    pub entry: String,
}

impl SyncCode {
    /// A deployed function's code, from its bundle's modules.
    pub fn of(
        sync: &hookyard_core::store::functions::DeployedSync,
        modules: Arc<BTreeMap<String, Vec<u8>>>,
    ) -> SyncCode {
        SyncCode::new(&sync.bundle_hash, &sync.entry, modules)
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

/// Executions handed to one thread at once (one wake-up for all of them).
struct Job {
    runs: Vec<(Arc<SyncCode>, Invocation)>,
    reply: oneshot::Sender<Vec<Result<Effects, FunctionError>>>,
}

#[derive(Clone)]
pub struct Pool {
    jobs: mpsc::Sender<Job>,
    threads: usize,
}

impl Pool {
    /// Starts `threads` JS threads (0: one per CPU).
    pub fn new(threads: usize, limits: Limits) -> Pool {
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        } else {
            threads
        };
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        let limits = Arc::new(limits);
        for n in 0..threads {
            let queue = queue.clone();
            let limits = limits.clone();
            std::thread::Builder::new()
                .name(format!("hookyard-js-{n}"))
                // QuickJS's own stack limit must be hit well before the thread's.
                .stack_size(limits.stack_bytes + 8 * 1024 * 1024)
                .spawn(move || run_thread(&queue, &limits))
                .expect("spawning a JS thread");
        }
        Pool { jobs, threads }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs the sync's `onWebhook` with `invocation` on a JS thread.
    pub async fn execute(&self, code: Arc<SyncCode>, invocation: Invocation) -> Result<Effects, FunctionError> {
        self.execute_all(vec![(code, invocation)])
            .await
            .pop()
            .expect("one outcome per execution")
    }

    /// Runs each `onWebhook` of `runs`, spread over the JS threads in one job per thread;
    /// the outcomes are in the order of `runs`.
    pub async fn execute_all(&self, runs: Vec<(Arc<SyncCode>, Invocation)>) -> Vec<Result<Effects, FunctionError>> {
        let count = runs.len();
        let per_thread = count.div_ceil(self.threads).max(1);
        let mut pending = Vec::with_capacity(self.threads);
        let mut runs = runs.into_iter();
        loop {
            let chunk: Vec<_> = runs.by_ref().take(per_thread).collect();
            if chunk.is_empty() {
                break;
            }
            let size = chunk.len();
            let (reply, outcome) = oneshot::channel();
            let sent = self.jobs.send(Job { runs: chunk, reply }).is_ok();
            pending.push((size, sent.then_some(outcome)));
        }
        let gone = || Err(FunctionError::new(ErrorKind::Internal, "the JS threads stopped"));
        let mut outcomes = Vec::with_capacity(count);
        for (size, outcome) in pending {
            match outcome {
                Some(outcome) => match outcome.await {
                    Ok(results) => outcomes.extend(results),
                    Err(_) => outcomes.extend((0..size).map(|_| gone())),
                },
                None => outcomes.extend((0..size).map(|_| gone())),
            }
        }
        outcomes
    }
}

fn run_thread(queue: &Mutex<mpsc::Receiver<Job>>, limits: &Limits) {
    let mut loaded: HashMap<String, Loaded> = HashMap::new();
    loop {
        let job = match queue.lock().map(|q| q.recv()) {
            Ok(Ok(job)) => job,
            // The pool is gone.
            _ => return,
        };
        let outcomes = job
            .runs
            .iter()
            .map(|(code, invocation)| {
                let started = std::time::Instant::now();
                let mut outcome =
                    std::panic::catch_unwind(AssertUnwindSafe(|| execute(&mut loaded, code, invocation, limits)))
                        .unwrap_or_else(|_| {
                            loaded.remove(&code.key);
                            Err(FunctionError::new(ErrorKind::Internal, "the engine panicked"))
                        });
                match &mut outcome {
                    Ok(effects) => effects.elapsed = started.elapsed(),
                    Err(error) => error.elapsed = started.elapsed(),
                }
                outcome
            })
            .collect();
        let _ = job.reply.send(outcomes);
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
