//! Long-poll waiters: requests parked until a task (or a batch) finishes.
//!
//! One Redis subscription per API process (see `queue_core::queue::events`)
//! feeds this registry, which wakes every waiter of a finished task or of
//! its batch; a waiter then reads PostgreSQL once. An idle waiter costs a
//! parked future and a map entry, and no query at all until it is woken or
//! its wait ends.
//!
//! A waiter also reads once on arrival, in case its task finished before it
//! came, unless the task is one this process just submitted and has not
//! heard finish (see [`Fresh`]): the usual client submits, then waits at
//! once, and that first read was half of PostgreSQL's reads in W2.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use queue_core::queue::Queue;
use queue_core::queue::events::Event;
use tokio::sync::Notify;

use crate::error::ApiError;
use uuid::Uuid;

/// Longest `?wait=` honoured, in seconds; larger values are clamped.
pub const MAX_WAIT_SECS: f64 = 60.0;

#[derive(Debug, Default)]
pub struct Waiters {
    map: Mutex<HashMap<Uuid, Arc<Entry>>>,
    fresh: Mutex<Fresh>,
}

/// Tasks this process submitted in the last [`FRESH_FOR`] whose finish it
/// has not heard, by id, with their tenant. An id goes in before its task
/// is committed (so before any worker can run it) and only while the
/// completion subscription is up; it comes out when its finish is heard,
/// and everything comes out when the subscription breaks. So an id found
/// here belongs to a task that has not finished, or whose finish is still
/// on its way to this process and will wake whoever waits on it.
#[derive(Debug, Default)]
struct Fresh {
    /// The subscription is up (from its confirmation to its first error).
    live: bool,
    /// When each was noted, and its tenant.
    tasks: HashMap<Uuid, (std::time::Instant, String)>,
    /// Ids in the order noted, to forget the old ones (ids already gone
    /// from `tasks` are dropped as they come to the front).
    order: std::collections::VecDeque<Uuid>,
}

/// How long a submitted task is remembered: a client that waits later
/// than this reads first, as any other. Also bounds the harm of a finish
/// announcement that was lost on its way out of a worker (its waiters,
/// skipping the read, sleep until their wait ends, as do waiters that came
/// before the finish whatever this module does).
const FRESH_FOR: Duration = Duration::from_secs(2);

/// At most this many remembered (each an id, a time and the tenant's
/// name); past it the oldest is forgotten, and its waiter reads.
const FRESH_MAX: usize = 16_384;

/// What the waiters of one id share.
#[derive(Debug, Default)]
pub struct Entry {
    pub notify: Notify,
    /// The finished task's answer, read once for all its waiters: when a
    /// task with thousands of waiters finishes, PostgreSQL sees one read,
    /// not thousands.
    pub finished: tokio::sync::OnceCell<serde_json::Value>,
    /// A read since the last wake found the task unfinished, so a new
    /// waiter can park without reading again. Cleared by every wake, before
    /// the waiters are notified, so no finish can slip between.
    pub known_unfinished: std::sync::atomic::AtomicBool,
    /// Held while one waiter reads, so waiters arriving together wait for
    /// its answer instead of all reading.
    pub reading: tokio::sync::Mutex<()>,
    /// Whose task it is, from the first read: a waiter of another tenant
    /// gets its 404 at once rather than after the wait.
    pub tenant: std::sync::OnceLock<String>,
}

/// A registration; dropping it forgets the entry once no one else waits.
pub struct Watch<'a> {
    waiters: &'a Waiters,
    id: Uuid,
    pub entry: Arc<Entry>,
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        let mut map = self.waiters.map.lock().expect("lock");
        // The map holds one reference and this watch another: the last
        // watch of this id removes the entry.
        if Arc::strong_count(&self.entry) == 2 {
            map.remove(&self.id);
        }
    }
}

impl Waiters {
    pub fn watch(&self, id: Uuid) -> Watch<'_> {
        let entry = self
            .map
            .lock()
            .expect("lock")
            .entry(id)
            .or_default()
            .clone();
        Watch {
            waiters: self,
            id,
            entry,
        }
    }

    /// Remembers a task this process is about to commit (see [`Fresh`]);
    /// [`Waiters::forget`] it if the commit fails.
    pub fn submitting(&self, id: Uuid, tenant: &str) {
        let mut fresh = self.fresh.lock().expect("lock");
        let now = std::time::Instant::now();
        while let Some(&old) = fresh.order.front() {
            let young = fresh
                .tasks
                .get(&old)
                .is_some_and(|(at, _)| now.duration_since(*at) < FRESH_FOR);
            if young && fresh.order.len() < FRESH_MAX {
                break;
            }
            fresh.order.pop_front();
            fresh.tasks.remove(&old);
        }
        if fresh.live {
            fresh.tasks.insert(id, (now, tenant.to_owned()));
            fresh.order.push_back(id);
        }
    }

    /// Drops a task [`Waiters::submitting`] noted whose commit failed.
    pub fn forget(&self, id: Uuid) {
        self.fresh.lock().expect("lock").tasks.remove(&id);
    }

    /// The tenant of a task this process submitted and has not heard
    /// finish: its waiter need not read it first.
    pub fn unfinished_submission(&self, id: Uuid) -> Option<String> {
        let fresh = self.fresh.lock().expect("lock");
        // Old entries are pruned only as new ones come: an API that stops
        // taking submissions still forgets on time.
        let (at, tenant) = fresh.tasks.get(&id)?;
        (at.elapsed() < FRESH_FOR).then(|| tenant.clone())
    }

    /// Whether the completion subscription is up (tests).
    pub fn listening(&self) -> bool {
        self.fresh.lock().expect("lock").live
    }

    /// The subscription is confirmed (`true`) or broke (`false`): either
    /// way, what was remembered can no longer be trusted.
    fn subscribed(&self, live: bool) {
        let mut fresh = self.fresh.lock().expect("lock");
        fresh.live = live;
        fresh.tasks.clear();
        fresh.order.clear();
    }

    pub fn wake(&self, id: Uuid) {
        // Forgotten before waking: a waiter that still finds it registered
        // itself before this wake.
        self.fresh.lock().expect("lock").tasks.remove(&id);
        if let Some(e) = self.map.lock().expect("lock").get(&id) {
            e.known_unfinished
                .store(false, std::sync::atomic::Ordering::SeqCst);
            e.notify.notify_waiters();
        }
    }

    pub fn wake_all(&self) {
        for e in self.map.lock().expect("lock").values() {
            e.known_unfinished
                .store(false, std::sync::atomic::Ordering::SeqCst);
            e.notify.notify_waiters();
        }
    }

    /// Ids being waited on (tests and metrics).
    pub fn len(&self) -> usize {
        self.map.lock().expect("lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Keeps this process subscribed to completion events, reconnecting with
/// a short pause when Redis goes away.
pub fn spawn_listener(queue: Queue, waiters: Arc<Waiters>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // Even if this task ends without saying so (a panic), nothing
        // remembered is trusted afterwards.
        struct Unsubscribed<'a>(&'a Waiters);
        impl Drop for Unsubscribed<'_> {
            fn drop(&mut self) {
                self.0.subscribed(false);
            }
        }
        let _unsubscribed = Unsubscribed(&waiters);
        loop {
            let mut deliver = |event: Event| match event {
                Event::Finished(f) => {
                    waiters.wake(f.task);
                    if let Some(b) = f.batch {
                        waiters.wake(b);
                    }
                }
                Event::Resubscribed => {
                    waiters.subscribed(true);
                    waiters.wake_all();
                }
            };
            if let Err(e) = queue.listen(&mut deliver).await {
                tracing::debug!(error = %e, "completion events unavailable; retrying");
            }
            waiters.subscribed(false);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
}

/// `?wait=<seconds>` from a raw query: `None` when absent, clamped to
/// [`MAX_WAIT_SECS`], a 400 naming `wait` when it is not a non-negative
/// number.
pub fn wait_param(query: Option<&str>) -> Result<Option<Duration>, ApiError> {
    let Some(query) = query else { return Ok(None) };
    let Some(raw) = query
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find_map(|(k, v)| (k == "wait").then_some(v))
    else {
        return Ok(None);
    };
    match raw.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs >= 0.0 => {
            Ok(Some(Duration::from_secs_f64(secs.min(MAX_WAIT_SECS))))
        }
        _ => Err(ApiError::bad_query(
            "wait",
            "wait must be a number of seconds (0 to 60; larger values are clamped)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_is_parsed_clamped_and_checked() {
        assert_eq!(wait_param(None).unwrap(), None);
        assert_eq!(wait_param(Some("x=1")).unwrap(), None);
        assert_eq!(
            wait_param(Some("wait=2.5")).unwrap(),
            Some(Duration::from_millis(2500))
        );
        assert_eq!(
            wait_param(Some("a=b&wait=600")).unwrap(),
            Some(Duration::from_secs(60))
        );
        for bad in ["wait=soon", "wait=-1", "wait="] {
            assert!(
                matches!(
                    wait_param(Some(bad)),
                    Err(ApiError::BadQuery { field, .. }) if field == "wait"
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn submissions_are_remembered_only_while_the_subscription_is_up() {
        let w = Waiters::default();
        let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        w.submitting(a, "t");
        assert_eq!(w.unfinished_submission(a), None, "events may be missed");
        w.subscribed(true);
        w.submitting(a, "t");
        w.submitting(b, "u");
        w.submitting(c, "t");
        assert_eq!(w.unfinished_submission(b).as_deref(), Some("u"));
        w.wake(a);
        assert_eq!(w.unfinished_submission(a), None, "its finish was heard");
        w.forget(c);
        assert_eq!(w.unfinished_submission(c), None, "its commit failed");
        w.subscribed(false);
        assert_eq!(w.unfinished_submission(b), None, "finishes may be missed");
        w.subscribed(true);
        assert_eq!(
            w.unfinished_submission(b),
            None,
            "nor trusted once it is back"
        );
    }

    #[test]
    fn submissions_are_remembered_for_a_while_and_up_to_a_bound() {
        let w = Waiters::default();
        w.subscribed(true);
        let ids: Vec<Uuid> = (0..=FRESH_MAX).map(|_| Uuid::now_v7()).collect();
        for id in &ids {
            w.submitting(*id, "t");
        }
        assert_eq!(w.unfinished_submission(ids[0]), None, "the oldest goes");
        assert!(w.unfinished_submission(ids[FRESH_MAX]).is_some());
        std::thread::sleep(FRESH_FOR);
        assert_eq!(
            w.unfinished_submission(ids[FRESH_MAX]),
            None,
            "too old, with no submission since"
        );
        w.submitting(Uuid::now_v7(), "t");
        assert_eq!(w.unfinished_submission(ids[FRESH_MAX]), None, "too old");
    }

    #[test]
    fn entries_are_forgotten_with_their_last_watch() {
        let w = Waiters::default();
        let id = Uuid::now_v7();
        let a = w.watch(id);
        let b = w.watch(id);
        assert_eq!(w.len(), 1);
        drop(a);
        assert_eq!(w.len(), 1);
        drop(b);
        assert!(w.is_empty());
    }
}
