//! The sweeper: keeps PostgreSQL (the truth) and Redis (the dispatch index)
//! in step. One process leads at a time (a PostgreSQL advisory lock); any
//! worker may take over when the leader dies.
//!
//! Each sweep
//! - reaps running tasks whose lease lapsed (their worker died) and queues
//!   them again, or fails them if that was their last attempt;
//! - reconciles one page of waiting tasks: every queued or scheduled task
//!   created at least [`GRACE`] ago gets its id back in Redis if Redis
//!   lacks it (the API died between commit and push, Redis was flushed or
//!   restarted). Pages are bounded, and
//!   the walk goes on at once while it keeps finding missing ids, so a
//!   flushed Redis is rebuilt quickly without one huge command;
//! - deletes idempotency keys past their retention, and finished tasks
//!   older than the configured retention (bounded chunks, looked for once a
//!   minute unless a chunk came back full).

use std::time::Duration;

use queue_core::queue::events::Finished;
use queue_core::queue::{Queue, ReadyEntry, ScheduledEntry};
use queue_core::store::{Leader, Store};
use queue_core::task::{Priority, TaskStatus};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Lapsed leases handled per sweep.
const REAP_LIMIT: i64 = 1000;
/// Pages walked back to back while ids keep turning out missing.
const MAX_PAGES_PER_SWEEP: usize = 20;
/// Idempotency keys are kept at least this long.
pub const IDEMPOTENCY_TTL_SECS: i64 = 24 * 3600;

/// What one sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    pub requeued: usize,
    pub failed: usize,
    pub redispatched: u64,
    /// Finished tasks deleted by retention.
    pub deleted: u64,
}

/// Finished tasks deleted per sweep at most.
const RETENTION_CHUNK: i64 = 5_000;

/// How often retention looks for old tasks once it found fewer than a
/// chunk. Its query reads every finished task (no index on `finished_at`,
/// which would cost a write per completion), so once a second would scan a
/// million-task table every second; retention is counted in days.
const RETENTION_EVERY: Duration = Duration::from_secs(60);

/// The reconciler's place in its walk over waiting tasks.
#[derive(Debug)]
pub struct Sweeper {
    cursor: Uuid,
    page: i64,
    /// Finished tasks older than this are deleted; `None` keeps them.
    retention: Option<Duration>,
    /// When retention looks next (`None`: at the next sweep).
    retention_due: Option<std::time::Instant>,
    /// Tasks younger than this are left out of the walk (see [`GRACE`]).
    grace: Duration,
}

/// The reconciler leaves alone tasks created less than this ago. A task
/// just committed whose id the API is still pushing, or whose id a fetcher
/// popped and is claiming, is waiting in PostgreSQL and missing from Redis
/// for a millisecond or so; re-added, its id ran twice through the fetchers,
/// and two claims of one id at once could deadlock (each locking its rows
/// in its own order) until PostgreSQL broke it a second later, every claim
/// of the worker stalled meanwhile: W2's p99 at 2,000/s was 970 ms in such
/// a run (BENCHMARKS.md, 2026-12-04, fifth session). A push that was really
/// lost is repaired this much later.
pub const GRACE: Duration = Duration::from_secs(2);

fn priority(band: i16) -> Priority {
    Priority::from_band(band).unwrap_or(Priority::Normal)
}

impl Sweeper {
    pub fn new(page: i64) -> Sweeper {
        Sweeper {
            cursor: Uuid::nil(),
            page: page.max(1),
            retention: None,
            retention_due: None,
            grace: GRACE,
        }
    }

    /// Walks tasks however young (tests: "the API died between commit and
    /// push" is simulated by dropping the id at once).
    pub fn with_grace(mut self, grace: Duration) -> Sweeper {
        self.grace = grace;
        self
    }

    /// Also deletes finished tasks older than `retention` (0 keeps all).
    pub fn with_retention(mut self, retention: Duration) -> Sweeper {
        self.retention = (!retention.is_zero()).then_some(retention);
        self
    }

    /// Retention's first look waits `delay`: a worker that starts (and
    /// takes the lead) does not begin with a scan of every finished task
    /// while it starts draining.
    pub fn first_retention_in(mut self, delay: Duration) -> Sweeper {
        self.retention_due = Some(std::time::Instant::now() + delay);
        self
    }

    /// One sweep. Call it only while leading.
    pub async fn sweep(&mut self, store: &Store, queue: &Queue) -> queue_core::Result<SweepReport> {
        let mut report = SweepReport::default();

        let reaped = store.reap_expired(REAP_LIMIT).await?;
        let requeue: Vec<ReadyEntry<'_>> = reaped
            .iter()
            .filter(|r| r.status == TaskStatus::Queued)
            .map(|r| ReadyEntry {
                queue: &r.model,
                id: r.id,
                priority: priority(r.priority),
                order_ms: r.created_at.timestamp_millis(),
            })
            .collect();
        report.requeued = requeue.len();
        for r in &reaped {
            metrics::counter!("inferq_tasks_lease_expired_total", "queue" => r.model.clone())
                .increment(1);
        }
        report.failed = reaped.len() - requeue.len();
        let failed: Vec<Finished> = reaped
            .iter()
            .filter(|r| r.status == TaskStatus::Failed)
            .map(|r| Finished {
                task: r.id,
                batch: r.batch_id,
            })
            .collect();
        if let Err(e) = queue.publish_finished(&failed).await {
            tracing::debug!(error = %e, "could not announce reaped failures");
        }
        if let Err(e) = queue.push_ready(&requeue).await {
            // They are queued in PostgreSQL; the walk below re-adds them.
            tracing::warn!(error = %e, "could not push reaped tasks");
        }

        for _ in 0..MAX_PAGES_PER_SWEEP {
            let page = store
                .waiting_page(self.cursor, self.page, self.grace)
                .await?;
            self.cursor = if (page.len() as i64) < self.page {
                Uuid::nil()
            } else {
                page.last().map_or(Uuid::nil(), |w| w.id)
            };
            let mut ready = Vec::new();
            let mut scheduled = Vec::new();
            for w in &page {
                match (w.status, w.run_at) {
                    (TaskStatus::Scheduled, Some(run_at)) => scheduled.push(ScheduledEntry {
                        queue: &w.model,
                        id: w.id,
                        priority: priority(w.priority),
                        run_at_ms: run_at.timestamp_millis(),
                    }),
                    _ => ready.push(ReadyEntry {
                        queue: &w.model,
                        id: w.id,
                        priority: priority(w.priority),
                        order_ms: w.created_at.timestamp_millis(),
                    }),
                }
            }
            let added = queue.redispatch(&ready, &scheduled).await?;
            report.redispatched += added;
            if added == 0 || self.cursor.is_nil() {
                break;
            }
        }

        store
            .expire_idempotency_keys(IDEMPOTENCY_TTL_SECS, 1000)
            .await?;
        let now = std::time::Instant::now();
        if let Some(age) = self.retention
            && self.retention_due.is_none_or(|due| now >= due)
        {
            report.deleted = store
                .delete_finished_before(age.as_secs() as i64, RETENTION_CHUNK)
                .await?;
            // A full chunk: more are waiting, so the next sweep goes on.
            self.retention_due =
                ((report.deleted as i64) < RETENTION_CHUNK).then_some(now + RETENTION_EVERY);
        }
        Ok(report)
    }
}

/// Sweeps every `interval` while this process leads; tries to take the
/// lead otherwise.
pub async fn run(
    store: Store,
    queue: Queue,
    interval: Duration,
    page: i64,
    retention: Duration,
    stop: CancellationToken,
) {
    let mut sweeper = Sweeper::new(page)
        .with_retention(retention)
        .first_retention_in(RETENTION_EVERY);
    let mut leader: Option<Leader> = None;
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = stop.cancelled() => return,
        }
        if leader.is_none() {
            match store.try_lead().await {
                Ok(Some(l)) => {
                    tracing::info!("this process now leads the sweeps");
                    leader = Some(l);
                }
                Ok(None) => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot try for the sweeper lead");
                    continue;
                }
            }
        }
        let Some(l) = leader.as_mut() else { continue };
        if !l.alive().await {
            tracing::warn!("lost the sweeper lead (its PostgreSQL session ended)");
            leader = None;
            continue;
        }
        match sweeper.sweep(&store, &queue).await {
            Ok(r) if r != SweepReport::default() => tracing::info!(
                requeued = r.requeued,
                failed = r.failed,
                redispatched = r.redispatched,
                deleted = r.deleted,
                "sweep"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "sweep failed"),
        }
    }
}
