//! The worker pool: take ids from Redis, claim them in PostgreSQL, run them
//! on the backend, record how each attempt ended.
//!
//! Two loops fetch: each waits for room, pops up to `claim_batch` ids (as
//! many as there is room for) across the served queues, claims them in one
//! UPDATE and spawns one task per claimed row. A slot (one of
//! `concurrency`) is a backend call; while attempts are short, as many
//! more tasks as the slots run in 50 ms (at most `prefetch`) are claimed
//! ahead and wait for a slot, so a fetch's round trips overlap the running
//! tasks; an ended attempt waits for room among the outcomes being written
//! before it frees its slot, so claims stop while writes fall behind. A
//! heartbeat loop renews the leases of everything in flight in one
//! statement, and stops any attempt that no longer holds its task.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::Retryable as _;
use futures::FutureExt as _;
use queue_core::config::WorkerConfig;
use queue_core::queue::events::Finished;
use queue_core::queue::stats::Outcome;
use queue_core::queue::{Popped, Queue, ReadyEntry};
use queue_core::retry::{RetryPolicy, io_backoff};
use queue_core::store::{Claim, ClaimedTask, Finish, Store};
use queue_core::task::Priority;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::backend::limit::Pull;
use crate::backend::route::Router;
use crate::backend::{Backend, BackendError, InferenceRequest};
use crate::completer::Ended;
use std::sync::atomic::{AtomicU64, Ordering};

/// How long the list of queues (for a worker serving all of them) is reused
/// before asking Redis again.
const QUEUE_LIST_TTL: Duration = Duration::from_secs(1);
/// How long the set of paused queues is reused: a pause takes effect within
/// about this long (plus tasks already running, which finish).
const PAUSED_TTL: Duration = Duration::from_millis(250);
/// How often in-flight tasks are checked for a cancel: a cancel stops the
/// backend call within about this long.
const CANCEL_POLL: Duration = Duration::from_millis(500);
/// Longest sleep between fetches while the stores are failing.
const MAX_ERROR_BACKOFF: Duration = Duration::from_secs(2);

/// An attempt in flight: its claim (the fence on its writes), what stops it,
/// and how far it has got (tokens streamed; written by the heartbeat).
struct InFlight {
    claim: Claim,
    stop: CancellationToken,
    progress: Arc<AtomicU64>,
    progress_written: u64,
}

struct Inner {
    store: Store,
    queue: Queue,
    router: Router,
    config: WorkerConfig,
    policy: RetryPolicy,
    in_flight: Mutex<HashMap<Uuid, InFlight>>,
    /// Fired when the grace period of a shutdown has run out.
    hard_stop: CancellationToken,
    /// Bumped when new work is announced (see `listen_for_work`).
    wake: Arc<tokio::sync::watch::Sender<u64>>,
    /// Bumped when work is announced for a queue not announced before, so
    /// a worker serving every queue looks its list up again at once
    /// instead of when the list's TTL runs out.
    new_queues: Arc<AtomicU64>,
    /// Successful attempts go to the completer, which writes them in
    /// batches; taken (once) by `run`.
    completions: crate::completer::Sender,
    completions_rx: Mutex<Option<tokio::sync::mpsc::Receiver<crate::completer::Done>>>,
    /// Per tenant: tokens the backends reported minus what was estimated
    /// at submission, not yet given to the tenants' token limits.
    usage: Mutex<HashMap<String, i64>>,
    /// Backend calls at once: `concurrency` permits.
    slots: Arc<Semaphore>,
    /// Recent attempts' mean duration in microseconds (a moving average;
    /// `u64::MAX` until the first one): whether to claim ahead.
    attempt_us: AtomicU64,
    /// Tasks claimed ahead that wait for a slot.
    waiting: std::sync::atomic::AtomicUsize,
    /// Room for every task the worker holds until its attempt ends, claimed
    /// ahead or running: `concurrency` plus [`Inner::ahead_allowed`],
    /// resized as attempts' durations change (see [`Inner::resize_room`]).
    room: Arc<Semaphore>,
    /// The room's permits, taken or not, as last resized.
    room_size: Mutex<usize>,
    /// [`RECORDING`] permits: ended attempts whose outcomes are written.
    recording: Arc<Semaphore>,
    /// The next pop's turn; held while popping, so turns follow the order
    /// in which Redis gave out ids.
    pop_turns: tokio::sync::Mutex<u64>,
    /// The turn whose tasks are handed on next, and its signal.
    turn: AtomicU64,
    turn_taken: tokio::sync::Notify,
}

/// Tasks are claimed ahead of free slots only while attempts take less
/// than this on average (the fetch round trips, a few ms, would otherwise
/// cost a noticeable share of each slot's time), and only as many as the
/// slots run in this time: a task claimed ahead waits at most about this
/// long for its slot.
const PREFETCH_BELOW: Duration = Duration::from_millis(50);

/// Ended attempts whose outcomes are being written at once (batched
/// successes and retries, and the rare failures and releases written
/// alone): two completer batches, one being written and the next
/// gathering.
const RECORDING: usize = 2 * crate::completer::MAX_BATCH;

/// What a claimed task holds: room in the worker, and, once it may call
/// the backend, a slot.
struct Held {
    _room: OwnedSemaphorePermit,
    slot: Option<OwnedSemaphorePermit>,
}

/// A worker process's pool. Cheap to clone.
#[derive(Clone)]
pub struct Worker {
    inner: Arc<Inner>,
}

impl Worker {
    /// A pool with one backend for every queue.
    pub fn new(
        store: Store,
        queue: Queue,
        backend: Arc<dyn Backend>,
        config: WorkerConfig,
    ) -> Worker {
        Worker::with_router(store, queue, Router::single(backend), config)
    }

    /// A pool that routes each queue to its configured backend.
    pub fn with_router(store: Store, queue: Queue, router: Router, config: WorkerConfig) -> Worker {
        let policy = config.retry_policy();
        let (completions, completions_rx) = crate::completer::channel();
        Worker {
            inner: Arc::new(Inner {
                completions,
                completions_rx: Mutex::new(Some(completions_rx)),
                store,
                queue,
                router,
                policy,
                in_flight: Mutex::new(HashMap::new()),
                hard_stop: CancellationToken::new(),
                wake: Arc::new(tokio::sync::watch::Sender::new(0)),
                new_queues: Arc::default(),
                usage: Mutex::new(HashMap::new()),
                slots: Arc::new(Semaphore::new(config.concurrency.max(1))),
                room: Arc::new(Semaphore::new(config.concurrency.max(1))),
                room_size: Mutex::new(config.concurrency.max(1)),
                recording: Arc::new(Semaphore::new(RECORDING)),
                attempt_us: AtomicU64::new(u64::MAX),
                waiting: Default::default(),
                pop_turns: tokio::sync::Mutex::new(0),
                turn: AtomicU64::new(0),
                turn_taken: tokio::sync::Notify::new(),
                config,
            }),
        }
    }

    /// Runs until `shutdown` fires, then drains: in-flight attempts get the
    /// grace period to finish, the rest are handed back uncharged.
    pub async fn run(&self, shutdown: CancellationToken) {
        let inner = &self.inner;
        let tracker = TaskTracker::new();
        // Not a child of `shutdown`: leases must stay renewed while
        // in-flight tasks drain, or the reaper would take them mid-drain.
        let heartbeat_stop = CancellationToken::new();
        let heartbeat = tokio::spawn(heartbeat(self.inner.clone(), heartbeat_stop.clone()));
        let sweeper = inner.config.sweep.then(|| {
            tokio::spawn(crate::sweeper::run(
                inner.store.clone(),
                inner.queue.clone(),
                Duration::from_millis(inner.config.sweep_ms.max(10)),
                inner.config.reconcile_page,
                Duration::from_secs(u64::from(inner.config.retention_days) * 86_400),
                shutdown.child_token(),
            ))
        });
        let completer = inner.completions_rx.lock().expect("lock").take().map(|rx| {
            tokio::spawn(crate::completer::run(
                inner.store.clone(),
                inner.queue.clone(),
                rx,
            ))
        });
        let wake_listener = tokio::spawn(listen_for_work(
            inner.queue.clone(),
            inner.wake.clone(),
            inner.new_queues.clone(),
            inner.config.queue_list(),
        ));
        tracing::info!(
            concurrency = inner.config.concurrency,
            prefetch = inner.config.prefetch,
            "worker started"
        );
        metrics::gauge!("inferq_worker_concurrency").set(inner.config.concurrency as f64);
        // Fetching is round trips (a pop, then a claim) while the CPU
        // idles: two loops overlap them. They share the room and the slots,
        // so together they never start more than `concurrency` calls.
        // Tasks claimed ahead wait here for slots, in the order claimed.
        let (ahead, waiting) = tokio::sync::mpsc::unbounded_channel();
        let dispatcher = tokio::spawn(hand_out_slots(
            self.inner.clone(),
            waiting,
            tracker.clone(),
            shutdown.clone(),
        ));
        let fetchers: Vec<_> = (0..FETCH_LOOPS)
            .map(|_| {
                tokio::spawn(fetch_loop(
                    self.inner.clone(),
                    tracker.clone(),
                    ahead.clone(),
                    shutdown.clone(),
                ))
            })
            .collect();
        drop(ahead);
        for f in fetchers {
            let _ = f.await;
        }
        // The fetchers' senders are gone: it hands back what waits, and ends.
        let _ = dispatcher.await;

        wake_listener.abort();
        tracker.close();
        let grace = Duration::from_secs(inner.config.shutdown_grace_secs);
        tracing::info!(
            in_flight = tracker.len(),
            grace_secs = grace.as_secs(),
            "draining"
        );
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::info!(
                in_flight = tracker.len(),
                "grace period over; handing the rest back"
            );
            inner.hard_stop.cancel();
            tracker.wait().await;
        }
        heartbeat_stop.cancel();
        let _ = heartbeat.await;
        // Every attempt has been recorded (each waited for its reply), so
        // the completer has nothing left: stop it.
        if let Some(c) = completer {
            c.abort();
        }
        if let Some(s) = sweeper {
            // Dropping the task drops its leader connection: the lock frees.
            s.abort();
            let _ = s.await;
        }
        tracing::info!("worker stopped");
    }
}

/// Fetch loops per worker process: two overlap their round trips (each
/// claim runs while the other loop pops or claims).
const FETCH_LOOPS: usize = 2;

/// Takes room (and, for long attempts, slots), fills it with claimed
/// tasks, and sleeps when there is nothing to do, until `shutdown`.
async fn fetch_loop(
    inner: Arc<Inner>,
    tracker: TaskTracker,
    ahead: Ahead,
    shutdown: CancellationToken,
) {
    let mut fetcher = Fetcher::new(inner.config.queue_list());
    let mut woken = inner.wake.subscribe();
    let target = inner
        .config
        .claim_batch
        .min(inner.config.concurrency + inner.config.prefetch)
        .max(1);
    loop {
        let claim_ahead = inner.claims_ahead();
        inner.resize_room();
        let first = tokio::select! {
            held = take_room(&inner, claim_ahead) => held,
            () = shutdown.cancelled() => break,
        };
        let mut held = vec![first];
        let gather = |held: &mut Vec<Held>| {
            while held.len() < target {
                let Ok(r) = inner.room.clone().try_acquire_owned() else {
                    break;
                };
                let slot = if claim_ahead {
                    None
                } else {
                    // Long attempts: only as many as there are free slots.
                    match inner.slots.clone().try_acquire_owned() {
                        Ok(s) => Some(s),
                        Err(_) => break,
                    }
                };
                held.push(Held { _room: r, slot });
            }
        };
        gather(&mut held);
        // Under load room frees one task at a time; while a backlog lasts a
        // millisecond lets a few gather, so one pop and one claim serve
        // several tasks. Without one it would only delay the new task.
        if held.len() < target / 4 && fetcher.more && !tracker.is_empty() {
            tokio::time::sleep(Duration::from_millis(1)).await;
            gather(&mut held);
        }
        // Announcements before this fetch are covered by it.
        woken.borrow_and_update();
        let wait = match fetcher.fetch(&inner, held, &tracker, &ahead).await {
            Ok(()) if fetcher.more => {
                fetcher.errors = 0;
                continue;
            }
            // Every queue came back short (or was held back by its
            // breaker): the next task comes with an announcement (or is a
            // retry falling due).
            Ok(()) => {
                fetcher.errors = 0;
                fetcher.idle_wait(&inner).await
            }
            Err(e) => {
                fetcher.errors += 1;
                let wait = Duration::from_millis(100 * 2u64.pow(fetcher.errors.min(5)))
                    .min(MAX_ERROR_BACKOFF);
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "fetch failed");
                wait
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            // Returns at once for an announcement made during the fetch:
            // none is lost.
            _ = woken.changed() => {}
            () = shutdown.cancelled() => break,
        }
    }
}

/// Where tasks claimed ahead go to wait for a slot.
type Ahead = tokio::sync::mpsc::UnboundedSender<(ClaimedTask, Held)>;

/// Gives tasks claimed ahead their slots, one at a time and in the order
/// they were claimed (so priority order holds), until the fetchers are
/// gone. After a shutdown, what still waits starts no call: it is handed
/// back at once, for another worker.
async fn hand_out_slots(
    inner: Arc<Inner>,
    mut waiting: tokio::sync::mpsc::UnboundedReceiver<(ClaimedTask, Held)>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    while let Some((task, mut held)) = waiting.recv().await {
        tokio::select! {
            slot = inner.slots.clone().acquire_owned() => {
                held.slot = Some(slot.expect("never closed"));
            }
            () = shutdown.cancelled() => {}
        }
        inner.waiting.fetch_sub(1, Ordering::SeqCst);
        tracker.spawn(run_attempt(inner.clone(), task, held));
    }
}

/// Room for one more task; for long attempts also a slot (taken after the
/// room: a task claimed ahead holds room while it waits for a slot, so the
/// other order could wait on each other).
async fn take_room(inner: &Inner, ahead: bool) -> Held {
    let r = inner
        .room
        .clone()
        .acquire_owned()
        .await
        .expect("never closed");
    let slot = if ahead {
        None
    } else {
        Some(
            inner
                .slots
                .clone()
                .acquire_owned()
                .await
                .expect("never closed"),
        )
    };
    Held { _room: r, slot }
}

impl Inner {
    /// Whether to claim tasks ahead of free slots now.
    fn claims_ahead(&self) -> bool {
        self.config.prefetch > 0
            && self.attempt_us.load(Ordering::Relaxed) < PREFETCH_BELOW.as_micros() as u64
    }

    /// How many tasks may wait ahead of a slot now: as many as every slot
    /// runs in [`PREFETCH_BELOW`] at the recent mean attempt, at most
    /// `prefetch`. A task claimed ahead then waits about that long at
    /// most, whatever the attempts' length (with a fixed count, the wait
    /// grew with them: 64 ahead of one slot is 3 s of 49 ms attempts),
    /// while attempts of a millisecond get enough ahead that claims of
    /// `claim_batch` keep overlapping.
    fn ahead_allowed(&self) -> usize {
        if !self.claims_ahead() {
            return 0;
        }
        let us = u128::from(self.attempt_us.load(Ordering::Relaxed).max(1));
        let by_time = self.config.concurrency.max(1) as u128 * PREFETCH_BELOW.as_micros() / us;
        by_time.min(self.config.prefetch as u128) as usize
    }

    /// Brings the room to `concurrency` plus [`Inner::ahead_allowed`].
    /// Growing adds permits at once; shrinking forgets the free ones, and
    /// later calls (each fetch makes one) forget more as they come free,
    /// unless a fetch waiting for room takes them first: the room shrinks
    /// over a few fetches, not at once.
    fn resize_room(&self) {
        let want = self.config.concurrency.max(1) + self.ahead_allowed();
        let mut size = self.room_size.lock().expect("lock");
        if want > *size {
            self.room.add_permits(want - *size);
            *size = want;
        } else if want < *size {
            *size -= self.room.forget_permits(*size - want);
        }
    }

    /// Waits until the pops before `ticket` have handed their tasks on.
    async fn wait_turn(&self, ticket: u64) {
        loop {
            let taken = self.turn_taken.notified();
            tokio::pin!(taken);
            taken.as_mut().enable();
            if self.turn.load(Ordering::SeqCst) == ticket {
                return;
            }
            taken.await;
        }
    }

    /// Lets the next pop hand its tasks on. Every ticket ends exactly once,
    /// after its own turn came.
    fn end_turn(&self, ticket: u64) {
        self.turn.store(ticket + 1, Ordering::SeqCst);
        self.turn_taken.notify_waiters();
    }

    /// Adds one attempt's duration to the moving average (weight 1/8).
    fn attempt_took(&self, took: Duration) {
        let us = took.as_micros().min(u128::from(u64::MAX / 2)) as u64;
        let old = self.attempt_us.load(Ordering::Relaxed);
        let new = if old == u64::MAX {
            us
        } else {
            old - old / 8 + us / 8
        };
        self.attempt_us.store(new, Ordering::Relaxed);
    }
}

/// Wakes the fetch loop whenever new work is announced, for as long as the
/// worker runs (resubscribing after a Redis outage).
async fn listen_for_work(
    queue: Queue,
    wake: Arc<tokio::sync::watch::Sender<u64>>,
    new_queues: Arc<AtomicU64>,
    served: Vec<String>,
) {
    let mut seen = std::collections::HashSet::new();
    loop {
        // Work for a queue this worker does not serve wakes nobody.
        let mut on_work = |q: Option<&str>| {
            if q.is_none_or(|q| served.is_empty() || served.iter().any(|s| s == q)) {
                // A (re)subscription (`None`) may have missed announcements
                // of new queues.
                if served.is_empty() && q.is_none_or(|q| !seen.contains(q)) {
                    if let Some(q) = q {
                        seen.insert(q.to_owned());
                    }
                    new_queues.fetch_add(1, Ordering::SeqCst);
                }
                wake.send_modify(|n| *n = n.wrapping_add(1));
            }
        };
        if let Err(e) = queue.listen_work(&mut on_work).await {
            tracing::debug!(error = %e, "work announcements unavailable; retrying");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// How often a worker looks again while a breaker holds its queues back.
const BREAKER_RECHECK: Duration = Duration::from_millis(20);

/// The fetch side of the loop: which queue to look at next.
struct Fetcher {
    configured: Vec<String>,
    known: Vec<String>,
    known_at: Option<Instant>,
    /// `Inner::new_queues` when `known` was read.
    known_new: u64,
    paused: Vec<String>,
    paused_at: Option<Instant>,
    next: usize,
    errors: u32,
    /// The last fetch skipped a queue because its breaker was open.
    held_back: bool,
    /// The last fetch may have left ready ids behind: a pop came back with
    /// all it asked for. A pop that came back short took everything there
    /// was (stale ids included), so new work can only come with an
    /// announcement, and the loop waits for one instead of popping again.
    more: bool,
    /// The last fetch popped every queue it serves (not held back), so
    /// `next_due_ms` is the soonest retry among them.
    due_known: bool,
    /// When the soonest retry of the queues popped in the last fetch falls
    /// due (ms), as their short pops told; `None`: none scheduled.
    next_due_ms: Option<i64>,
}

impl Fetcher {
    fn new(configured: Vec<String>) -> Fetcher {
        Fetcher {
            configured,
            known: Vec::new(),
            known_at: None,
            known_new: 0,
            paused: Vec::new(),
            paused_at: None,
            next: 0,
            errors: 0,
            held_back: false,
            more: false,
            due_known: false,
            next_due_ms: None,
        }
    }

    /// How long to sleep after a fetch found nothing, unless new work is
    /// announced first: until the soonest retry is due, at most
    /// `idle_ms`; briefly while a breaker holds queues back.
    async fn idle_wait(&mut self, inner: &Inner) -> Duration {
        let longest = Duration::from_millis(inner.config.idle_ms.max(1));
        if self.held_back {
            return BREAKER_RECHECK.min(longest);
        }
        let due = if self.due_known {
            Ok(self.next_due_ms)
        } else {
            let Ok(mut queues) = self.queues(inner).await else {
                return longest;
            };
            // Only queues this worker can run: another model's overdue
            // retry must not keep it awake.
            queues.retain(|q| inner.router.resolve(q).is_some());
            inner.queue.next_due_ms(&queues).await
        };
        match due {
            Ok(Some(due_ms)) => {
                let until = (due_ms - chrono::Utc::now().timestamp_millis()).max(1) as u64;
                Duration::from_millis(until).min(longest)
            }
            Ok(None) | Err(_) => longest,
        }
    }

    /// The queues to look at now: served, and not paused.
    async fn queues(&mut self, inner: &Inner) -> queue_core::Result<Vec<String>> {
        if self.paused_at.is_none_or(|t| t.elapsed() > PAUSED_TTL) {
            self.paused = inner.queue.paused().await?;
            self.paused_at = Some(Instant::now());
        }
        let mut names = self.served(inner).await?;
        names.retain(|q| !self.paused.contains(q));
        Ok(names)
    }

    async fn served(&mut self, inner: &Inner) -> queue_core::Result<Vec<String>> {
        if !self.configured.is_empty() {
            return Ok(self.configured.clone());
        }
        // An empty list, or work announced for a queue not seen before, is
        // looked up again at once: the first task of a new model should not
        // wait out the TTL.
        let new = inner.new_queues.load(Ordering::SeqCst);
        if self.known.is_empty()
            || new != self.known_new
            || self.known_at.is_none_or(|t| t.elapsed() > QUEUE_LIST_TTL)
        {
            self.known = inner.queue.queues().await?;
            self.known_at = Some(Instant::now());
            self.known_new = new;
        }
        Ok(self.known.clone())
    }

    /// Fills as much of `held` as there is work for; whether to fetch again
    /// at once is left in `more`. Unused room and slots are freed on
    /// return.
    async fn fetch(
        &mut self,
        inner: &Arc<Inner>,
        mut permits: Vec<Held>,
        tracker: &TaskTracker,
        ahead: &Ahead,
    ) -> queue_core::Result<()> {
        self.held_back = false;
        self.more = false;
        // Known once every queue it can run has been popped (a pop that
        // came back short says when its soonest retry falls due).
        self.due_known = false;
        self.next_due_ms = None;
        let queues = self.queues(inner).await?;
        if queues.is_empty() {
            return Ok(());
        }
        let now_ms = chrono::Utc::now().timestamp_millis();
        // Round-robin across queues so one deep queue cannot starve others;
        // within a queue the ready set gives strict priority.
        for i in 0..queues.len() {
            if permits.is_empty() {
                break;
            }
            let name = &queues[(self.next + i) % queues.len()];
            // Only queues a backend serves, and not while its breaker is
            // open: the tasks stay queued instead of burning attempts.
            let Some((route, _)) = inner.router.resolve(name) else {
                continue;
            };
            let pull = route.breaker.pull();
            let want = match pull {
                Pull::Any => permits.len(),
                Pull::Probe => 1,
                Pull::None => {
                    self.held_back = true;
                    continue;
                }
            };
            // A probe that sends nothing (no task, or only stale ids, or a
            // failed claim) gives its turn back, or the breaker would stay
            // half-open and the queue would never be fetched again.
            let probing = matches!(pull, Pull::Probe);
            // Pops are taken in turn; the claims of two fetchers overlap,
            // and their tasks are handed on in the order popped.
            let (ticket, popped) = {
                let mut next = inner.pop_turns.lock().await;
                let ticket = *next;
                *next += 1;
                (ticket, inner.queue.pop(name, want, now_ms).await)
            };
            if let Ok(pop) = &popped
                && let Some(due) = pop.next_due_ms
            {
                self.next_due_ms = Some(self.next_due_ms.map_or(due, |d| d.min(due)));
            }
            let claimed = claim_popped(inner, name, popped.map(|p| p.popped)).await;
            inner.wait_turn(ticket).await;
            let claimed = match claimed {
                Ok(c) => c,
                Err(e) => {
                    inner.end_turn(ticket);
                    if probing {
                        route.breaker.probe_unused();
                    }
                    return Err(e);
                }
            };
            self.more |= claimed.popped >= want;
            if probing && claimed.tasks.is_empty() {
                route.breaker.probe_unused();
            }
            if claimed.popped == 0 {
                inner.end_turn(ticket);
                continue;
            }
            for task in claimed.tasks {
                let mut permit = permits
                    .pop()
                    .expect("never claims more than there is room for");
                inner.in_flight.lock().expect("lock").insert(
                    task.id,
                    InFlight {
                        claim: task.claim(),
                        stop: CancellationToken::new(),
                        progress: Arc::default(),
                        progress_written: 0,
                    },
                );
                metrics::counter!("inferq_tasks_started_total", "queue" => task.model.clone())
                    .increment(1);
                let queued = (chrono::Utc::now() - task.created_at)
                    .to_std()
                    .unwrap_or_default();
                metrics::histogram!("inferq_task_queued_seconds", "queue" => task.model.clone())
                    .record(queued.as_secs_f64());
                if permit.slot.is_some() && inner.waiting.load(Ordering::SeqCst) == 0 {
                    tracker.spawn(run_attempt(inner.clone(), task, permit));
                } else {
                    // Behind tasks claimed ahead, which were popped first:
                    // it waits its turn (giving its slot to the first).
                    permit.slot = None;
                    inner.waiting.fetch_add(1, Ordering::SeqCst);
                    // Never fails: the dispatcher outlives the fetcher.
                    let _ = ahead.send((task, permit));
                }
                metrics::gauge!("inferq_worker_in_flight").increment(1.0);
            }
            inner.end_turn(ticket);
        }
        self.next = self.next.wrapping_add(1);
        // Every queue was popped: the loop stops early only once the room
        // ran out, after a full pop, and then `more` skips the idle wait.
        self.due_known = true;
        Ok(())
    }
}

/// What one pop gave: how many ids, and the tasks among them claimed, in
/// the order Redis gave them.
struct Claimed {
    popped: usize,
    tasks: Vec<ClaimedTask>,
}

/// Claims what a pop took (putting the ids back if the claim fails).
async fn claim_popped(
    inner: &Inner,
    name: &str,
    popped: queue_core::Result<Vec<Popped>>,
) -> queue_core::Result<Claimed> {
    let popped = popped?;
    if popped.is_empty() {
        return Ok(Claimed {
            popped: 0,
            tasks: Vec::new(),
        });
    }
    let ids: Vec<Uuid> = popped.iter().map(|p| p.id).collect();
    let mut tasks = match inner.store.claim(&ids, lease(&inner.config)).await {
        Ok(c) => c,
        Err(e) => {
            put_back(&inner.queue, name, &popped).await;
            return Err(e);
        }
    };
    // RETURNING order is arbitrary; run in the order Redis gave.
    tasks.sort_by_key(|t| ids.iter().position(|id| *id == t.id));
    Ok(Claimed {
        popped: popped.len(),
        tasks,
    })
}

fn lease(config: &WorkerConfig) -> Duration {
    Duration::from_secs(config.lease_secs.max(1))
}

async fn put_back(queue: &Queue, name: &str, popped: &[Popped]) {
    if let Err(e) = queue.unpop(name, popped).await {
        // The tasks are still queued in PostgreSQL; the reconciler
        // re-dispatches them.
        tracing::warn!(error = %e, tasks = popped.len(), "could not put ids back after a failed claim");
    }
}

/// Keeps the in-flight attempts honest: renews their leases every third of
/// a lease, and in between asks twice a second whether any was cancelled.
/// Either way, an attempt that no longer holds its task is stopped.
async fn heartbeat(inner: Arc<Inner>, stop: CancellationToken) {
    let lease = lease(&inner.config);
    let renew_every = lease / 3;
    let mut renewed = Instant::now();
    let mut tick = tokio::time::interval(CANCEL_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        correct_token_estimates(&inner).await;
        let held: Vec<(Uuid, Claim)> = inner
            .in_flight
            .lock()
            .expect("lock")
            .iter()
            .map(|(id, f)| (*id, f.claim))
            .collect();
        if held.is_empty() {
            continue;
        }
        // Each with the claim asked about: an attempt that ended meanwhile
        // may have been replaced here by a new claim of the same task.
        let lost: Vec<(Uuid, Claim)> = if renewed.elapsed() >= renew_every {
            match inner.store.renew_leases(&held, lease).await {
                Ok(kept) => {
                    renewed = Instant::now();
                    held.iter()
                        .filter(|(id, _)| !kept.contains(id))
                        .copied()
                        .collect()
                }
                Err(e) => {
                    tracing::warn!(error = %e, tasks = held.len(), "lease renewal failed");
                    continue;
                }
            }
        } else {
            write_progress(&inner).await;
            let ids: Vec<Uuid> = held.iter().map(|(id, _)| *id).collect();
            match inner.store.cancelled_among(&ids).await {
                Ok(cancelled) => held
                    .iter()
                    .filter(|(id, _)| cancelled.contains(id))
                    .copied()
                    .collect(),
                Err(e) => {
                    tracing::debug!(error = %e, "cancel check failed");
                    continue;
                }
            }
        };
        let map = inner.in_flight.lock().expect("lock");
        for (id, claim) in lost {
            if let Some(f) = map.get(&id).filter(|f| f.claim == claim) {
                tracing::info!(task_id = %id, "task cancelled or taken over; stopping its attempt");
                f.stop.cancel();
            }
        }
    }
}

/// Gives the tenants' token limits the difference between what their tasks
/// used and what was estimated for them, twice a second at most rather
/// than a Redis call per task.
async fn correct_token_estimates(inner: &Inner) {
    let deltas: Vec<(String, i64)> = {
        let mut usage = inner.usage.lock().expect("lock");
        usage.drain().filter(|(_, d)| *d != 0).collect()
    };
    let deltas: Vec<(&str, i64)> = deltas.iter().map(|(t, d)| (t.as_str(), *d)).collect();
    if let Err(e) = inner.queue.adjust("tpm", &deltas).await {
        // A limit then errs by the estimate's error for a minute.
        tracing::debug!(error = %e, "token estimates not corrected");
    }
}

/// Writes the progress of attempts that moved since the last write.
async fn write_progress(inner: &Inner) {
    let moved: Vec<(Uuid, Claim, serde_json::Value)> = {
        let mut map = inner.in_flight.lock().expect("lock");
        map.iter_mut()
            .filter_map(|(id, f)| {
                let now = f.progress.load(Ordering::Relaxed);
                (now != f.progress_written).then(|| {
                    f.progress_written = now;
                    (*id, f.claim, serde_json::json!({ "tokens": now }))
                })
            })
            .collect()
    };
    if let Err(e) = inner.store.record_progress(&moved).await {
        tracing::debug!(error = %e, "progress not recorded");
    }
}

/// Runs one attempt and records its outcome.
async fn run_attempt(inner: Arc<Inner>, task: ClaimedTask, held: Held) {
    let span = tracing::info_span!(
        "task",
        task_id = %task.id,
        model = %task.model,
        attempt = task.attempts,
    );
    async {
        let (stop, progress) = inner
            .in_flight
            .lock()
            .expect("lock")
            .get(&task.id)
            .map(|f| (f.stop.clone(), f.progress.clone()))
            .unwrap_or_default();
        if held.slot.is_none() {
            // Claimed ahead and not started before a shutdown.
            record(&inner, &task, shutdown_release()).await;
            forget(&inner, &task);
            return;
        }
        let started = Instant::now();
        let finish = match attempt(&inner, &task, &stop, progress).await {
            Some(finish) => finish,
            None => {
                // The task was taken from us (cancelled or re-leased):
                // there is nothing of ours left to record.
                forget(&inner, &task);
                return;
            }
        };
        let took = started.elapsed();
        inner.attempt_took(took);
        metrics::histogram!("inferq_task_running_seconds", "queue" => task.model.clone())
            .record(took.as_secs_f64());
        // A slot is a backend call: the next task may start while this
        // outcome is written (batched, a few ms). The task stays in flight
        // (lease renewed, drained on shutdown) until it is recorded. Its
        // slot and room are given back only once it has a place among the
        // outcomes being written, so a worker whose writes fall behind
        // stops claiming (without that bound, tasks of a backlog ran
        // faster than the completer wrote them and piled up in memory:
        // worker peak RSS 73 MiB in `inferq bench`'s W1 drain, 23 before
        // claims grew; 38 with the bound).
        let recording = inner
            .recording
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        drop(held);
        record(&inner, &task, finish).await;
        forget(&inner, &task);
        drop(recording);
    }
    .instrument(span)
    .await;
}

/// Drops this attempt from the in-flight set, unless a later attempt of
/// the same task (claimed again here after a quick retry) has replaced it:
/// that one must keep its lease renewals and cancel checks.
fn forget(inner: &Inner, task: &ClaimedTask) {
    let mut map = inner.in_flight.lock().expect("lock");
    if map.get(&task.id).is_some_and(|f| f.claim == task.claim()) {
        map.remove(&task.id);
    }
    metrics::gauge!("inferq_worker_in_flight").decrement(1.0);
}

/// The backend call of one attempt, turned into how the attempt ends;
/// `None` when the attempt lost its task meanwhile.
async fn attempt(
    inner: &Inner,
    task: &ClaimedTask,
    stop: &CancellationToken,
    progress: Arc<AtomicU64>,
) -> Option<Finish> {
    let Some((route, upstream_model)) = inner.router.resolve(&task.model) else {
        return Some(Finish::Failed {
            error: format!("no backend is configured for model {:?}", task.model),
        });
    };
    let fingerprint = task.cache.then(|| {
        queue_core::idempotency::fingerprint(
            "result-cache",
            &serde_json::json!({"model": task.model, "input": task.input.0, "params": task.params.0}),
        )
    });
    if let Some(fp) = &fingerprint {
        match inner
            .store
            .cached_result(fp, inner.config.cache_ttl_secs)
            .await
        {
            Ok(Some(mut result)) => {
                result["cached"] = serde_json::json!(true);
                return Some(Finish::Succeeded { result });
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "result cache unavailable; calling the backend"),
        }
    }
    let request = InferenceRequest {
        task_id: task.id,
        model: upstream_model,
        input: task.input.0.clone(),
        params: task.params.0.clone(),
        attempt: task.attempts.max(1) as u32,
        run: task.run.max(1) as u32,
        progress,
    };
    let call = AssertUnwindSafe(route.call(&request, stop)).catch_unwind();
    let called = tokio::select! {
        out = call => out,
        () = inner.hard_stop.cancelled() => return Some(shutdown_release()),
        () = stop.cancelled() => return None,
    };
    Some(match called {
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_owned());
            tracing::error!(panic = %what, "backend panicked");
            retry_or_fail(inner, task, format!("backend panicked: {what}"), None)
        }
        Ok(called) => match called.result {
            Ok(answer) => {
                if let Some(usage) = &answer.usage {
                    let estimate = queue_core::task::token_estimate(&task.input.0, &task.params.0);
                    let delta = usage.total_tokens as i64 - estimate as i64;
                    *inner
                        .usage
                        .lock()
                        .expect("lock")
                        .entry(task.tenant.clone())
                        .or_default() += delta;
                }
                let result = serde_json::to_value(&answer).unwrap_or_default();
                if let Some(fp) = &fingerprint
                    && let Err(e) = inner.store.cache_result(fp, &result).await
                {
                    tracing::warn!(error = %e, "result not cached");
                }
                Finish::Succeeded { result }
            }
            Err(BackendError::Cancelled) => {
                if inner.hard_stop.is_cancelled() {
                    shutdown_release()
                } else {
                    return None;
                }
            }
            Err(BackendError::Permanent { message }) => Finish::Failed { error: message },
            Err(BackendError::Retryable { message, .. }) if called.outage => {
                // The backend is down, not this task: hand it back
                // uncharged; the open breaker keeps it queued meanwhile.
                // Per task, so debug: the breaker logs the outage once, at warn.
                tracing::debug!(backend = %route.name, error = %message, "backend outage: task handed back uncharged");
                Finish::Released {
                    reason: format!("backend {} is failing ({message}); not charged", route.name),
                }
            }
            Err(BackendError::Retryable {
                message,
                retry_after,
            }) => retry_or_fail(inner, task, message, retry_after),
        },
    })
}

fn shutdown_release() -> Finish {
    Finish::Released {
        reason: "handed back on worker shutdown; not charged".to_owned(),
    }
}

fn retry_or_fail(
    inner: &Inner,
    task: &ClaimedTask,
    message: String,
    retry_after: Option<Duration>,
) -> Finish {
    if task.attempts >= task.max_attempts {
        return Finish::Failed {
            error: format!(
                "{message} (gave up after {} of {} attempts)",
                task.attempts, task.max_attempts
            ),
        };
    }
    let mut rng = queue_core::retry::Rng::new();
    let delay = inner
        .policy
        .delay_with_hint(task.attempts as u32, retry_after, &mut rng);
    Finish::Retry {
        error: message,
        run_at: chrono::Utc::now() + delay,
    }
}

/// Writes the outcome (retrying briefly through a PostgreSQL blip), then
/// tells Redis when the task should run again, if it should.
async fn record(inner: &Inner, task: &ClaimedTask, finish: Finish) {
    let counter = match &finish {
        Finish::Succeeded { .. } => "inferq_tasks_succeeded_total",
        Finish::Retry { .. } => "inferq_tasks_retried_total",
        Finish::Failed { .. } => "inferq_tasks_failed_total",
        Finish::Released { .. } => "inferq_tasks_released_total",
    };
    metrics::counter!(counter, "queue" => task.model.clone()).increment(1);
    if matches!(finish, Finish::Succeeded { .. } | Finish::Failed { .. }) {
        let e2e = (chrono::Utc::now() - task.created_at)
            .to_std()
            .unwrap_or_default();
        metrics::histogram!("inferq_task_end_to_end_seconds", "queue" => task.model.clone())
            .record(e2e.as_secs_f64());
    }
    // Successes and retries, the common outcomes, are written in batches.
    let batched = match finish {
        Finish::Succeeded { result } => Ok(Ended::Succeeded { result }),
        Finish::Retry { error, run_at } => Ok(Ended::Retry { error, run_at }),
        other => Err(other),
    };
    match batched {
        Ok(ended) => {
            let (reply, held) = tokio::sync::oneshot::channel();
            let done = crate::completer::Done {
                id: task.id,
                queue: task.model.clone(),
                priority: Priority::from_band(task.priority).unwrap_or(Priority::Normal),
                claim: task.claim(),
                batch_id: task.batch_id,
                ended,
                reply,
            };
            if inner.completions.send(done).await.is_err() || !held.await.unwrap_or(false) {
                tracing::warn!("outcome not recorded: this attempt no longer holds the task");
            }
        }
        // Boxed: inline, its PostgreSQL and Redis futures made this
        // function's future 7.3 KB and every attempt's 7.9 KB, moved at
        // each spawn and held by each task in flight, for outcomes that
        // are rare (a draining worker's CPU in memmove: 12 % before, 6 %
        // after).
        Err(other) => Box::pin(record_alone(inner, task, other)).await,
    }
}

/// Writes a failure or a release on its own, then tells Redis.
async fn record_alone(inner: &Inner, task: &ClaimedTask, finish: Finish) {
    let write = || inner.store.finish(task.id, task.claim(), &finish);
    let held = match write
        .retry(io_backoff())
        .when(queue_core::Error::is_unavailable)
        .await
    {
        Ok(held) => held,
        Err(e) => {
            // The lease will lapse and the attempt be retried elsewhere.
            tracing::error!(error = %e, "could not record the outcome");
            return;
        }
    };
    if !held {
        tracing::warn!("outcome not recorded: this attempt no longer holds the task");
        return;
    }
    let priority = Priority::from_band(task.priority).unwrap_or(Priority::Normal);
    let dispatch = match &finish {
        Finish::Succeeded { .. } | Finish::Retry { .. } => {
            unreachable!("the completer writes successes and retries")
        }
        Finish::Released { .. } => {
            inner
                .queue
                .push_ready(&[ReadyEntry {
                    queue: &task.model,
                    id: task.id,
                    priority,
                    order_ms: task.created_at.timestamp_millis(),
                }])
                .await
        }
        Finish::Failed { .. } => {
            // Wakes long-polling clients at once, and counts the failure for
            // the queue's throughput.
            inner
                .queue
                .after_outcomes(
                    &[],
                    &[Finished {
                        task: task.id,
                        batch: task.batch_id,
                    }],
                    &[(task.model.as_str(), Outcome::Failed, 1)],
                )
                .await
        }
    };
    // A released task's id is back in Redis or, failing that, the
    // reconciler's to restore; a failed one's waiters read it when their
    // wait ends, and its count is lost.
    if let Err(e) = dispatch {
        tracing::warn!(error = %e, "could not tell Redis how the attempt ended");
    }
}
