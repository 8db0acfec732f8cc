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

struct Job {
    code: Arc<SyncCode>,
    invocation: Invocation,
    reply: oneshot::Sender<Result<Effects, FunctionError>>,
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
        let (reply, outcome) = oneshot::channel();
        let gone = || FunctionError::new(ErrorKind::Internal, "the JS threads stopped");
        self.jobs
            .send(Job {
                code,
                invocation,
                reply,
            })
            .map_err(|_| gone())?;
        outcome.await.map_err(|_| gone())?
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
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| execute(&mut loaded, &job, limits)))
            .unwrap_or_else(|_| {
                loaded.remove(&job.code.key);
                Err(FunctionError::new(ErrorKind::Internal, "the engine panicked"))
            });
        let _ = job.reply.send(outcome);
    }
}

fn execute(loaded: &mut HashMap<String, Loaded>, job: &Job, limits: &Limits) -> Result<Effects, FunctionError> {
    let code = &job.code;
    if !loaded.contains_key(&code.key) {
        if loaded.len() >= LOADED_PER_THREAD {
            loaded.clear();
        }
        let sync = Loaded::load(code.modules.clone(), &code.entry, limits)?;
        loaded.insert(code.key.clone(), sync);
    }
    let sync = loaded.get(&code.key).expect("loaded above");
    let outcome = sync.execute(&job.invocation, limits);
    if let Err(error) = &outcome {
        if error.kind.poisons_runtime() {
            loaded.remove(&code.key);
        }
    }
    outcome
}
