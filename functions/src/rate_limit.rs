//! Provider rate limits, per connection. A 429 (or the provider's own
//! rate-limit answer: `RateLimitSpec`) pauses every call of its connection until the
//! provider's `Retry-After`, its reset, or the backoff when it gives neither:
//! the runs that share a connection wait once instead of each being refused in turn, and
//! a provider that counts refused calls against the limit (GitHub's secondary limits)
//! is not pushed further. A call whose run would end before the pause does fails at once
//! rather than holding its JS thread until the run's time is up; the worker retries its
//! event, and an asynchronous action its run, no sooner than the pause ends.
//!
//! The process that meets a limit records it on the connection (`rate_limited_until`);
//! the others learn of it as they read the connection for a run (a worker once per
//! group of events), so a scaled-out deployment holds the connection's calls everywhere
//! after one refusal, not one per process.
//!
//! For a while after a limit, a worker runs the connection's webhook events one at a
//! time ([`turn`]), each after any pause, keeping the others off the JS threads.
//!
//! Where the integration bounds a connection's calls in flight at once
//! (`api.max_concurrent_calls`), a call takes a slot first ([`call_slot`]).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use hookyard_core::keys::IntegrationKey;
use hookyard_core::metrics::names;
use tokio_util::sync::CancellationToken;

use crate::provider_api::Owner;

type Key = (i64, IntegrationKey, String);

/// How long after its last limit a connection's webhook runs take turns.
const TURNS_FOR: Duration = Duration::from_secs(120);
/// The longest a run waits for its turn, pauses included, before it runs anyway.
const TURN_WAIT_AT_MOST: Duration = Duration::from_secs(60);

/// A connection limited lately.
struct Limited {
    /// When its pause ends.
    ends: Instant,
    /// When it was last limited.
    last: Instant,
    /// Its webhook runs' turn: one at a time while it is limited lately.
    turn: Arc<tokio::sync::Mutex<()>>,
}

/// Each connection limited within [`TURNS_FOR`] (or paused longer). Older entries are
/// dropped as others are added and, at most once a second, as runs ask for turns, so
/// that a worker whose connections are no longer limited finds it empty again.
static PAUSES: LazyLock<Mutex<Pauses>> = LazyLock::new(|| {
    Mutex::new(Pauses {
        limited: HashMap::new(),
        pruned: Instant::now(),
    })
});

struct Pauses {
    limited: HashMap<Key, Limited>,
    pruned: Instant,
}

impl Pauses {
    fn prune(&mut self, now: Instant) {
        self.limited
            .retain(|_, limited| limited.ends > now || now.duration_since(limited.last) < TURNS_FOR);
        self.pruned = now;
    }
}

fn key(owner: &Owner) -> Key {
    (
        owner.environment_id,
        owner.integration.clone(),
        owner.connection_id.clone(),
    )
}

/// A connection's slots for calls in flight in this process, under one bound.
type Slots = Arc<tokio::sync::Semaphore>;

/// Each connection's slots, by connection and bound. Those no call holds are dropped once
/// there are many.
static SLOTS: LazyLock<Mutex<HashMap<(Key, u32), Slots>>> = LazyLock::new(Mutex::default);

/// Slots kept before those no call holds are dropped.
const SLOTS_KEPT: usize = 1024;

/// A slot for one call of `owner`'s, `bound` of which may be in flight at once: waits for
/// one to end if need be, up to `deadline`.
pub async fn call_slot(
    owner: &Owner,
    bound: u32,
    deadline: Instant,
) -> Result<tokio::sync::OwnedSemaphorePermit, String> {
    let slots = {
        let mut all = SLOTS.lock().expect("call slots");
        if all.len() >= SLOTS_KEPT {
            all.retain(|_, slots| Arc::strong_count(slots) > 1);
        }
        let bound_usize = usize::try_from(bound).unwrap_or(usize::MAX);
        all.entry((key(owner), bound))
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(bound_usize)))
            .clone()
    };
    if let Ok(slot) = slots.clone().try_acquire_owned() {
        return Ok(slot);
    }
    metrics::counter!(names::PROVIDER_CALLS_QUEUED).increment(1);
    match tokio::time::timeout_at(deadline.into(), slots.acquire_owned()).await {
        Ok(Ok(slot)) => Ok(slot),
        _ => Err(format!(
            "the run's time was up while its call waited for one of the connection's {bound} calls at once \
             (the integration's api.max_concurrent_calls) to end"
        )),
    }
}

/// How a provider said its limit was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// A call was refused for it (a 429, or the provider's own answer).
    Refused,
    /// An answer said nothing is left until the reset: paused before any refusal.
    Spent,
}

/// A rate limit for `owner` met by this process: its calls wait `wait` from now (a
/// longer pause already set stays). Whether none was in force or this one ends a second
/// or more later than it: then the caller records it in the store for the others (the
/// many calls of a burst refused at once write it once).
pub fn pause(owner: &Owner, wait: Duration, how: Limit) -> bool {
    let lengthened = hold_until(owner, Instant::now() + wait);
    let outcome = match how {
        Limit::Refused => "limited",
        Limit::Spent => "spent",
    };
    metrics::counter!(names::PROVIDER_RATE_LIMITS, "outcome" => outcome).increment(1);
    lengthened
}

/// A rate limit another process met, read with the connection (`rate_limited_until`).
pub fn learn(owner: &Owner, until: Option<DateTime<Utc>>) {
    let left = until.and_then(|until| (until - Utc::now()).to_std().ok());
    if let Some(left) = left.filter(|left| !left.is_zero()) {
        hold_until(owner, Instant::now() + left);
    }
}

/// Pauses `owner` until `until` (or later, if it already is); whether it was not paused,
/// or is now paused a second or more longer.
fn hold_until(owner: &Owner, until: Instant) -> bool {
    let mut pauses = PAUSES.lock().expect("rate-limit pauses");
    let now = Instant::now();
    pauses.prune(now);
    let limited = pauses.limited.entry(key(owner)).or_insert_with(|| Limited {
        ends: now,
        last: now,
        turn: Arc::default(),
    });
    let lengthened = limited.ends <= now || until.saturating_duration_since(limited.ends) >= Duration::from_secs(1);
    limited.ends = limited.ends.max(until);
    limited.last = now;
    lengthened
}

/// A run's turn on a connection limited lately ([`turn`]).
pub struct Turn {
    owner: Owner,
    lock: Arc<tokio::sync::Mutex<()>>,
    /// The worker's stop: a run still waiting then is not run ([`Turn::unless`]).
    stop: Option<CancellationToken>,
}

/// A run waiting for its turn when its worker stopped ([`Turn::take`]).
#[derive(Debug)]
pub struct Stopped;

/// The turn a webhook run of `owner` takes before it is handed to a JS thread, when the
/// connection was limited lately: its runs go one at a time, each after any pause, so
/// that a burst for it waits in memory rather than on the JS threads (each run waiting
/// out the pause on one), and only the run that meets the next refusal fails for it.
/// (`owner` is made only when some connection was limited: this is asked per event.)
pub fn turn(owner: impl FnOnce() -> Owner) -> Option<Turn> {
    let mut pauses = PAUSES.lock().expect("rate-limit pauses");
    if pauses.limited.is_empty() {
        return None;
    }
    let now = Instant::now();
    if now.duration_since(pauses.pruned) >= Duration::from_secs(1) {
        pauses.prune(now);
    }
    let owner = owner();
    let limited = pauses.limited.get(&key(&owner))?;
    (limited.last.elapsed() < TURNS_FOR).then(|| Turn {
        lock: limited.turn.clone(),
        owner,
        stop: None,
    })
}

impl Turn {
    /// A turn given up when `stop` is cancelled (a worker stopping does not wait for the
    /// runs still waiting: another worker takes their events).
    pub fn unless(self, stop: CancellationToken) -> Turn {
        Turn {
            stop: Some(stop),
            ..self
        }
    }

    /// Waits for the connection's other runs taking turns, then for its pause to end;
    /// at most [`TURN_WAIT_AT_MOST`] in all (then `Ok(None)`: the run goes anyway, and
    /// its calls meet the pause themselves). [`Stopped`] if the worker stops meanwhile.
    pub async fn take(self) -> Result<Option<tokio::sync::OwnedMutexGuard<()>>, Stopped> {
        metrics::counter!(names::PROVIDER_RATE_LIMITS, "outcome" => "held").increment(1);
        let stop = self.stop.clone().unwrap_or_default();
        tokio::select! {
            taken = self.wait() => Ok(taken),
            _ = stop.cancelled() => Err(Stopped),
        }
    }

    async fn wait(self) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        let started = Instant::now();
        let guard = tokio::time::timeout(TURN_WAIT_AT_MOST, self.lock.lock_owned())
            .await
            .ok()?;
        while let Some(left) = paused_for(&self.owner) {
            if started.elapsed() + left > TURN_WAIT_AT_MOST {
                return None;
            }
            tokio::time::sleep(left).await;
        }
        Some(guard)
    }
}

/// How long `owner`'s calls are still paused, if they are.
pub fn paused_for(owner: &Owner) -> Option<Duration> {
    let pauses = PAUSES.lock().expect("rate-limit pauses");
    if pauses.limited.is_empty() {
        return None;
    }
    let ends = pauses.limited.get(&key(owner))?.ends;
    ends.checked_duration_since(Instant::now())
        .filter(|left| !left.is_zero())
}

/// `wait`, or longer if `owner`'s pause lasts longer: when to retry a failed run.
pub fn not_before(owner: &Owner, wait: Duration) -> Duration {
    paused_for(owner).map_or(wait, |left| left.max(wait))
}

/// Waits out `owner`'s pause before a call, or fails at once when the run's `deadline`
/// comes first: waiting would only hold the run's thread until its time ran out.
pub(crate) async fn wait_for_turn(owner: &Owner, deadline: Instant) -> Result<(), String> {
    let Some(left) = paused_for(owner) else {
        return Ok(());
    };
    if Instant::now() + left > deadline {
        metrics::counter!(names::PROVIDER_RATE_LIMITS, "outcome" => "gave_up").increment(1);
        return Err(format!(
            "rate limited: {}'s API limit holds the calls of connection {} for {:.1} s more, \
             longer than this run has left",
            owner.integration,
            owner.connection_id,
            left.as_secs_f64()
        ));
    }
    metrics::counter!(names::PROVIDER_RATE_LIMITS, "outcome" => "waited").increment(1);
    tracing::debug!(connection = %owner.connection_id, ?left, "provider call waits out its connection's rate limit");
    tokio::time::sleep(left).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(connection: &str) -> Owner {
        Owner {
            environment_id: 1,
            integration: "crm".parse().unwrap(),
            connection_id: connection.into(),
        }
    }

    #[test]
    fn a_pause_is_per_connection_and_the_longer_one_stays() {
        let (a, b) = (owner("pause-a"), owner("pause-b"));
        assert_eq!(paused_for(&a), None);
        assert!(
            pause(&a, Duration::from_secs(60), Limit::Refused),
            "a new pause is recorded"
        );
        assert!(
            !pause(&a, Duration::from_secs(1), Limit::Refused),
            "a shorter one is not"
        );
        assert!(
            !pause(&a, Duration::from_secs(60), Limit::Refused),
            "nor the same again"
        );
        assert!(pause(&a, Duration::from_secs(90), Limit::Refused), "a longer one is");
        let left = paused_for(&a).expect("paused");
        assert!(left > Duration::from_secs(50), "the longer pause stays: {left:?}");
        assert_eq!(paused_for(&b), None, "another connection is not paused");
    }

    #[test]
    fn a_limit_read_with_the_connection_pauses_it_until_then() {
        let e = owner("pause-e");
        learn(&e, Some(Utc::now() - chrono::Duration::seconds(5)));
        learn(&e, None);
        assert_eq!(paused_for(&e), None, "a limit that ended, or none");
        learn(&e, Some(Utc::now() + chrono::Duration::seconds(30)));
        let left = paused_for(&e).expect("paused");
        assert!(left > Duration::from_secs(25), "{left:?}");
    }

    #[tokio::test]
    async fn runs_of_a_connection_limited_lately_take_turns_after_its_pause() {
        let f = owner("turn-f");
        assert!(turn(|| f.clone()).is_none(), "never limited: no turns");
        pause(&f, Duration::from_millis(200), Limit::Refused);
        let started = Instant::now();
        let first = turn(|| f.clone())
            .expect("limited lately")
            .take()
            .await
            .unwrap()
            .expect("its turn");
        assert!(started.elapsed() >= Duration::from_millis(150), "after the pause");
        let mut second = tokio::spawn(turn(|| f.clone()).expect("limited lately").take());
        let early = tokio::time::timeout(Duration::from_millis(100), &mut second).await;
        assert!(early.is_err(), "not while the first holds the turn");
        drop(first);
        assert!(second.await.unwrap().unwrap().is_some(), "then its own");
    }

    #[tokio::test]
    async fn a_run_waiting_for_its_turn_gives_it_up_when_its_worker_stops() {
        let g = owner("turn-g");
        pause(&g, Duration::from_secs(30), Limit::Refused);
        let stop = CancellationToken::new();
        let waiting = tokio::spawn(turn(|| g.clone()).expect("limited lately").unless(stop.clone()).take());
        tokio::task::yield_now().await;
        stop.cancel();
        let taken = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert!(matches!(taken, Ok(Ok(Err(Stopped)))), "{taken:?}");
    }

    #[tokio::test]
    async fn a_call_fails_at_once_when_the_pause_outlasts_its_run() {
        let c = owner("pause-c");
        pause(&c, Duration::from_secs(30), Limit::Refused);
        let started = Instant::now();
        let error = wait_for_turn(&c, Instant::now() + Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(error.contains("rate limited") && error.contains("pause-c"), "{error}");
        assert!(started.elapsed() < Duration::from_secs(5), "did not wait");

        let d = owner("pause-d");
        pause(&d, Duration::from_millis(200), Limit::Refused);
        let started = Instant::now();
        wait_for_turn(&d, Instant::now() + Duration::from_secs(5))
            .await
            .unwrap();
        assert!(started.elapsed() >= Duration::from_millis(150), "waited out the pause");
        assert_eq!(paused_for(&d), None);
    }
}
