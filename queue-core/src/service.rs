//! The operations clients ask for, composed from the store and the queue in
//! the order the invariants need: commit to PostgreSQL first, then push to
//! Redis, so an accepted task can never exist only in Redis.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::error::Result;
use crate::idempotency::IdempotencyKey;
use crate::queue::events::Finished;
use crate::queue::{Queue, ReadyEntry};
use crate::store::{CancelOutcome, ExistingKey, Inserted, Row, Store};
use crate::task::{AttemptRecord, BatchRecord, NewBatch, NewTask, TaskRecord, TaskStatus};

/// The core's front door, shared by the API handlers and the tests.
#[derive(Debug, Clone)]
pub struct Service {
    pub store: Store,
    pub queue: Queue,
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
    pub fn new(store: Store, queue: Queue) -> Service {
        Service { store, queue }
    }

    /// Commits one task, then makes it ready.
    pub async fn submit(&self, task: &NewTask) -> Result<Accepted> {
        match self.submit_with_key(task, None).await? {
            Submission::New(a) => Ok(a),
            Submission::Replay(_) | Submission::KeyReused => {
                unreachable!("no key, no replay")
            }
        }
    }

    /// [`Service::submit`] under an optional idempotency key.
    pub async fn submit_with_key(
        &self,
        task: &NewTask,
        key: Option<&IdempotencyKey>,
    ) -> Result<Submission> {
        self.insert_and_push(None, std::slice::from_ref(task), key)
            .await
    }

    /// Commits a batch and all its tasks in one transaction (all or none),
    /// then makes them ready. Returns the batch id with the task ids in the
    /// order of `batch.tasks`.
    pub async fn submit_batch(&self, batch: &NewBatch) -> Result<(Uuid, Accepted)> {
        let batch_id = Uuid::now_v7();
        match self
            .insert_and_push(
                Some((batch_id, batch.metadata.as_ref())),
                &batch.tasks,
                None,
            )
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
        batch_id: Uuid,
        batch: &NewBatch,
        key: Option<&IdempotencyKey>,
    ) -> Result<Submission> {
        self.insert_and_push(Some((batch_id, batch.metadata.as_ref())), &batch.tasks, key)
            .await
    }

    async fn insert_and_push(
        &self,
        batch: Option<(Uuid, Option<&serde_json::Value>)>,
        tasks: &[NewTask],
        key: Option<&IdempotencyKey>,
    ) -> Result<Submission> {
        // v7 ids from one process are strictly increasing, which the ready
        // set relies on to keep FIFO order between tasks of the same ms.
        let rows: Vec<Row<'_>> = tasks
            .iter()
            .map(|task| Row {
                id: Uuid::now_v7(),
                task,
            })
            .collect();
        let created_at = match self.store.insert_tasks(batch, &rows, key).await? {
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
        if let Err(e) = self.queue.push_ready(&entries).await {
            tracing::warn!(error = %e, tasks = entries.len(), "push to redis failed after commit; the reconciler will dispatch");
        }
        Ok(Submission::New(Accepted {
            ids: rows.iter().map(|r| r.id).collect(),
            created_at,
        }))
    }

    pub async fn task(&self, id: Uuid) -> Result<Option<(TaskRecord, Vec<AttemptRecord>)>> {
        let Some(task) = self.store.task(id).await? else {
            return Ok(None);
        };
        let history = self.store.history(id).await?;
        Ok(Some((task, history)))
    }

    pub async fn batch(&self, id: Uuid) -> Result<Option<BatchRecord>> {
        self.store.batch(id).await
    }

    /// Cancels a task that has not started and drops its ready id.
    pub async fn cancel(&self, id: Uuid) -> Result<CancelOutcome> {
        let outcome = self.store.cancel(id).await?;
        if let CancelOutcome::Cancelled(task) = &outcome {
            if let Err(e) = self.queue.remove_ready(&task.model, id).await {
                // Harmless: the claim skips cancelled tasks.
                tracing::debug!(task_id = %id, error = %e, "could not drop cancelled id from redis");
            }
            let finished = Finished {
                task: id,
                batch: task.batch_id,
            };
            if let Err(e) = self.queue.publish_finished(&[finished]).await {
                tracing::debug!(task_id = %id, error = %e, "could not announce the cancel");
            }
        }
        Ok(outcome)
    }

    /// Tasks per status across the whole store.
    pub async fn counts(&self) -> Result<Vec<(TaskStatus, i64)>> {
        self.store.count_by_status().await
    }
}
