//! The operations clients ask for, composed from the store and the queue in
//! the order the invariants need: commit to PostgreSQL first, then push to
//! Redis, so an accepted task can never exist only in Redis.

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::error::Result;
use crate::idempotency::IdempotencyKey;
use crate::queue::events::Finished;
use crate::queue::{Queue, ReadyEntry};
use crate::store::{CancelOutcome, DeadFilter, ExistingKey, Inserted, Row, Store};
use crate::task::{AttemptRecord, BatchRecord, NewBatch, NewTask, TaskRecord, TaskStatus};

/// The tenant of everything while authentication is off, and of tasks
/// submitted with the admin token.
pub const DEFAULT_TENANT: &str = "default";

/// The core's front door, shared by the API handlers and the tests.
#[derive(Debug, Clone)]
pub struct Service {
    pub store: Store,
    pub queue: Queue,
    /// Single submissions go through the group-commit writer.
    group: mpsc::Sender<Pending>,
    /// Reads of one task go through the gathering reader.
    reads: mpsc::Sender<Read>,
}

/// Reads of one task each that wait while earlier ones run are made with
/// one query, up to this many, with at most [`READS_IN_FLIGHT`] queries at
/// once. Nothing waits for company: an idle reader reads at once.
const READ_MAX: usize = 512;
const READS_IN_FLIGHT: usize = crate::store::PLANNED_ONCE_CONNECTIONS as usize;

type TaskWithHistory = (TaskRecord, Vec<AttemptRecord>);

struct Read {
    id: Uuid,
    reply: oneshot::Sender<Result<Option<TaskWithHistory>>>,
}

/// The most one group commit holds. Each request is answered only after
/// its row committed.
const GROUP_MAX: usize = 1_000;

struct Pending {
    id: Uuid,
    tenant: String,
    task: NewTask,
    reply: oneshot::Sender<Result<Accepted>>,
}

/// What a submission answers with.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub ids: Vec<Uuid>,
    pub created_at: DateTime<Utc>,
}

/// What a submission with an idempotency key did.
#[derive(Debug, Clone)]
pub enum Submission {
    /// Committed now.
    New(Accepted),
    /// The key was used before, with the same body: this is what it made.
    Replay(ExistingKey),
    /// The key was used before with a different body: nothing was done.
    KeyReused,
}

impl Service {
    /// Builds the service and starts its group-commit writer (so it must
    /// be called within a Tokio runtime).
    pub fn new(store: Store, queue: Queue) -> Service {
        let (group, rx) = mpsc::channel(GROUP_MAX * 4);
        tokio::spawn(group_writer(store.clone(), queue.clone(), rx));
        let (reads, rx) = mpsc::channel(READ_MAX * 4);
        tokio::spawn(gathering_reader(store.clone(), rx));
        Service {
            store,
            queue,
            group,
            reads,
        }
    }

    /// Commits one task, then makes it ready. Concurrent submissions are
    /// committed together (group commit): one multi-row INSERT and one Redis
    /// pipeline for the requests that arrived while the previous group was
    /// being written. If the shared statement fails, every request in it
    /// fails; none is answered without its row.
    pub async fn submit_for(&self, tenant: &str, task: &NewTask) -> Result<Accepted> {
        self.submit_as(Uuid::now_v7(), tenant, task).await
    }

    /// [`Service::submit_for`] with the task's id chosen by the caller (a
    /// v7 id, so that ids stay in time order), who may then note it before
    /// any worker can see the task.
    pub async fn submit_as(&self, id: Uuid, tenant: &str, task: &NewTask) -> Result<Accepted> {
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            id,
            tenant: tenant.to_owned(),
            task: task.clone(),
            reply,
        };
        if self.group.send(pending).await.is_err() {
            return self.submit_alone(id, tenant, task).await;
        }
        match answer.await {
            Ok(result) => result,
            // The writer went away with our request: it was not committed.
            Err(_) => self.submit_alone(id, tenant, task).await,
        }
    }

    /// [`Service::submit_for`] the `default` tenant (everything belongs to
    /// it while authentication is off).
    pub async fn submit(&self, task: &NewTask) -> Result<Accepted> {
        self.submit_for(DEFAULT_TENANT, task).await
    }

    /// A group of one, written by the caller.
    async fn submit_alone(&self, id: Uuid, tenant: &str, task: &NewTask) -> Result<Accepted> {
        commit_group(&self.store, &self.queue, vec![Row { id, tenant, task }]).await
    }

    /// [`Service::submit`] under an optional idempotency key.
    pub async fn submit_with_key(
        &self,
        tenant: &str,
        task: &NewTask,
        key: Option<&IdempotencyKey>,
    ) -> Result<Submission> {
        let row = Row {
            id: Uuid::now_v7(),
            tenant,
            task,
        };
        insert_and_push(&self.store, &self.queue, None, vec![row], key).await
    }

    /// Commits a batch and all its tasks in one transaction (all or none),
    /// then makes them ready. Returns the batch id with the task ids in the
    /// order of `batch.tasks`.
    pub async fn submit_batch(&self, batch: &NewBatch) -> Result<(Uuid, Accepted)> {
        let batch_id = Uuid::now_v7();
        match self
            .submit_batch_with_key(DEFAULT_TENANT, batch_id, batch, None)
            .await?
        {
            Submission::New(a) => Ok((batch_id, a)),
            Submission::Replay(_) | Submission::KeyReused => {
                unreachable!("no key, no replay")
            }
        }
    }

    /// [`Service::submit_batch`] under an optional idempotency key; a new
    /// batch's id is `batch_id`.
    pub async fn submit_batch_with_key(
        &self,
        tenant: &str,
        batch_id: Uuid,
        batch: &NewBatch,
        key: Option<&IdempotencyKey>,
    ) -> Result<Submission> {
        // v7 ids made in order are strictly increasing, which the ready
        // set relies on to keep a batch's tasks in order within its ms.
        let rows: Vec<Row<'_>> = batch
            .tasks
            .iter()
            .map(|task| Row {
                id: Uuid::now_v7(),
                tenant,
                task,
            })
            .collect();
        insert_and_push(
            &self.store,
            &self.queue,
            Some((batch_id, batch.metadata.as_ref())),
            rows,
            key,
        )
        .await
    }

    /// A task and its attempts. Under load, concurrent reads (long-polls
    /// woken by one batch of completions, most of all) share one query.
    pub async fn task(&self, id: Uuid) -> Result<Option<TaskWithHistory>> {
        let (reply, answer) = oneshot::channel();
        if self.reads.send(Read { id, reply }).await.is_ok()
            && let Ok(result) = answer.await
        {
            return result;
        }
        self.store.task_with_history(id).await
    }

    pub async fn batch(&self, id: Uuid) -> Result<Option<BatchRecord>> {
        self.store.batch(id).await
    }

    /// Cancels a task that has not finished and drops its ready id. With
    /// `tenant`, another tenant's task is `NotFound`.
    pub async fn cancel(&self, id: Uuid, tenant: Option<&str>) -> Result<CancelOutcome> {
        let outcome = self.store.cancel(id, tenant).await?;
        if let CancelOutcome::Cancelled(task) = &outcome {
            // Announced first: waiters are what the caller cannot redo if
            // this future is dropped midway (a stale ready id is skipped
            // by the claim anyway).
            let finished = Finished {
                task: id,
                batch: task.batch_id,
            };
            if let Err(e) = self.queue.publish_finished(&[finished]).await {
                tracing::debug!(task_id = %id, error = %e, "could not announce the cancel");
            }
            if let Err(e) = self.queue.remove_ready(&task.model, id).await {
                // Harmless: the claim skips cancelled tasks.
                tracing::debug!(task_id = %id, error = %e, "could not drop cancelled id from redis");
            }
        }
        Ok(outcome)
    }

    /// Re-drives every dead letter matching `filter`, in chunks of
    /// `REDRIVE_CHUNK` (each chunk committed, then pushed), so a re-drive of
    /// a million failures never holds one huge transaction. Returns how many.
    pub async fn redrive(&self, filter: &DeadFilter) -> Result<u64> {
        const REDRIVE_CHUNK: i64 = 1_000;
        // Only failures from before the re-drive began: a task that fails
        // again meanwhile is not taken twice by one re-drive.
        let mut filter = filter.clone();
        // PostgreSQL's clock, which stamped `finished_at`, not this host's.
        let now = self.store.now().await?;
        filter.finished_before = Some(filter.finished_before.map_or(now, |b| b.min(now)));
        let filter = &filter;
        let mut total = 0;
        loop {
            let chunk = self.store.redrive(filter, REDRIVE_CHUNK).await?;
            let entries: Vec<ReadyEntry<'_>> = chunk
                .iter()
                .map(|r| ReadyEntry {
                    queue: &r.model,
                    id: r.id,
                    priority: crate::task::Priority::from_band(r.priority)
                        .unwrap_or(crate::task::Priority::Normal),
                    order_ms: r.created_at.timestamp_millis(),
                })
                .collect();
            if let Err(e) = self.queue.push_ready(&entries).await {
                // Queued in PostgreSQL: the reconciler dispatches them.
                tracing::warn!(error = %e, "could not push re-driven tasks");
            }
            total += chunk.len() as u64;
            if (chunk.len() as i64) < REDRIVE_CHUNK {
                return Ok(total);
            }
        }
    }

    /// Tasks per status across the whole store.
    pub async fn counts(&self) -> Result<Vec<(TaskStatus, i64)>> {
        self.store.count_by_status().await
    }
}

/// `rows` with their tenants: a group commit mixes tenants; a batch or
/// a keyed submission has one.
async fn insert_and_push(
    store: &Store,
    queue: &Queue,
    batch: Option<(Uuid, Option<&serde_json::Value>)>,
    rows: Vec<Row<'_>>,
    key: Option<&IdempotencyKey>,
) -> Result<Submission> {
    let created_at = match store.insert_tasks(batch, &rows, key).await? {
        Inserted::New(at) => at,
        Inserted::Existing(existing) if existing.same_body => {
            return Ok(Submission::Replay(existing));
        }
        Inserted::Existing(_) => return Ok(Submission::KeyReused),
    };
    let order_ms = created_at.timestamp_millis();
    let entries: Vec<ReadyEntry<'_>> = rows
        .iter()
        .map(|r| ReadyEntry {
            queue: &r.task.model,
            id: r.id,
            priority: r.task.priority,
            order_ms,
        })
        .collect();
    // The tasks are committed: from here on a failure must not turn into
    // an error the client would retry (and so duplicate). A task whose
    // push failed stays queued in PostgreSQL and the reconciler
    // dispatches it.
    if let Err(e) = queue.push_ready(&entries).await {
        tracing::warn!(error = %e, tasks = entries.len(), "push to redis failed after commit; the reconciler will dispatch");
    }
    Ok(Submission::New(Accepted {
        ids: rows.iter().map(|r| r.id).collect(),
        created_at,
    }))
}

/// Commits `tasks` as one group; a failure is every task's failure.
async fn commit_group(store: &Store, queue: &Queue, rows: Vec<Row<'_>>) -> Result<Accepted> {
    match insert_and_push(store, queue, None, rows, None).await? {
        Submission::New(a) => Ok(a),
        Submission::Replay(_) | Submission::KeyReused => unreachable!("no key, no replay"),
    }
}

/// Takes the reads waiting now (up to [`READ_MAX`]) and makes them with
/// one query, while the next ones gather. Runs until every `Service` clone
/// is dropped.
async fn gathering_reader(store: Store, mut rx: mpsc::Receiver<Read>) {
    let in_flight = std::sync::Arc::new(tokio::sync::Semaphore::new(READS_IN_FLIGHT));
    loop {
        // A free query first: reads that arrive meanwhile join this one.
        let permit = in_flight
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        let Some(first) = rx.recv().await else { return };
        let mut reads = vec![first];
        while reads.len() < READ_MAX {
            match rx.try_recv() {
                Ok(r) => reads.push(r),
                Err(_) => break,
            }
        }
        let store = store.clone();
        tokio::spawn(async move {
            let mut ids: Vec<Uuid> = reads.iter().map(|r| r.id).collect();
            ids.sort_unstable();
            ids.dedup();
            match store.tasks_with_history(&ids).await {
                Ok(found) => {
                    let mut found: std::collections::HashMap<Uuid, TaskWithHistory> =
                        found.into_iter().map(|t| (t.0.id, t)).collect();
                    let mut readers: std::collections::HashMap<Uuid, usize> = Default::default();
                    for r in &reads {
                        *readers.entry(r.id).or_default() += 1;
                    }
                    // Copied only for a task read more than once; the last
                    // of its readers takes it (a result can be large).
                    for r in reads {
                        let left = readers.get_mut(&r.id).expect("counted");
                        *left -= 1;
                        let task = if *left == 0 {
                            found.remove(&r.id)
                        } else {
                            found.get(&r.id).cloned()
                        };
                        let _ = r.reply.send(Ok(task));
                    }
                }
                Err(e) => {
                    let shared = std::sync::Arc::new(e);
                    for r in reads {
                        let _ = r.reply.send(Err(crate::Error::Shared(shared.clone())));
                    }
                }
            }
            drop(permit);
        });
    }
}

/// Commits what waits, as one group with one statement, and again. A
/// submission to an idle writer is written at once; under load, those that
/// arrive during a commit form the next group, so groups grow with the
/// load and nobody waits for company. (A 1 ms window for company, before:
/// 13,897 [12,811-14,589] single POSTs/s on 64 connections, against
/// 15,106 [15,050-15,423] without; with the window a profile showed 35 %
/// of the CPU idle: the window was latency, not saved work.) Runs until every `Service`
/// clone is dropped.
async fn group_writer(store: Store, queue: Queue, mut rx: mpsc::Receiver<Pending>) {
    while let Some(first) = rx.recv().await {
        let mut group = vec![first];
        while group.len() < GROUP_MAX {
            match rx.try_recv() {
                Ok(p) => group.push(p),
                Err(_) => break,
            }
        }
        // Moved, not cloned again: the request already gave its own copy.
        let (tasks, replies): (Vec<(Uuid, String, NewTask)>, Vec<_>) = group
            .into_iter()
            .map(|p| ((p.id, p.tenant, p.task), p.reply))
            .unzip();
        let rows: Vec<Row<'_>> = tasks
            .iter()
            .map(|(id, tenant, task)| Row {
                id: *id,
                tenant,
                task,
            })
            .collect();
        match commit_group(&store, &queue, rows).await {
            Ok(accepted) => {
                for (reply, id) in replies.into_iter().zip(accepted.ids) {
                    let _ = reply.send(Ok(Accepted {
                        ids: vec![id],
                        created_at: accepted.created_at,
                    }));
                }
            }
            Err(e) => {
                let shared = std::sync::Arc::new(e);
                for reply in replies {
                    let _ = reply.send(Err(crate::Error::Shared(shared.clone())));
                }
            }
        }
    }
}
