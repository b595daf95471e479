//! What the sweeper (one leader at a time) does in PostgreSQL: take the
//! lead, reap lapsed leases, page through waiting tasks for the reconciler,
//! expire old idempotency keys.

use chrono::{DateTime, Utc};
use sqlx::Connection as _;
use sqlx::postgres::PgConnection;
use uuid::Uuid;

use super::Store;
use crate::error::Result;
use crate::task::TaskStatus;

/// Key of the session advisory lock that makes one process the sweeper.
const LEADER_LOCK: i64 = 0x696e_6665_7271; // "inferq"

/// The lead, held as a session advisory lock on a connection of its own
/// (detached from the pool, so dropping it closes the session and frees the
/// lock: a leader that dies or is killed lets another take over at once).
pub struct Leader {
    conn: PgConnection,
}

impl Leader {
    /// Still leading: the session holding the lock answers. After a
    /// PostgreSQL restart it does not, and the lead must be taken again.
    pub async fn alive(&mut self) -> bool {
        self.conn.ping().await.is_ok()
    }
}

/// A running task whose lease lapsed, and what became of it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Reaped {
    pub id: Uuid,
    pub batch_id: Option<Uuid>,
    pub model: String,
    pub priority: i16,
    /// `queued` to run again, or `failed` when that was its last attempt.
    pub status: TaskStatus,
    pub created_at: DateTime<Utc>,
}

/// A task PostgreSQL says is waiting; Redis should have its id.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Waiting {
    pub id: Uuid,
    pub model: String,
    pub priority: i16,
    pub status: TaskStatus,
    pub run_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

impl Store {
    /// Tries to become the sweeper; `None` if another process leads.
    pub async fn try_lead(&self) -> Result<Option<Leader>> {
        let mut conn = self.pool.acquire().await?.detach();
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(LEADER_LOCK)
            .fetch_one(&mut conn)
            .await?;
        Ok(got.then_some(Leader { conn }))
    }

    /// Ends lapsed leases, oldest first, at most `limit` per call. The lost
    /// attempt counts: a task whose worker keeps dying ends `failed` after
    /// `max_attempts` instead of looping.
    pub async fn reap_expired(&self, limit: i64) -> Result<Vec<Reaped>> {
        Ok(sqlx::query_as::<_, Reaped>(
            "WITH expired AS (
                SELECT id FROM tasks
                 WHERE status = 'running' AND lease_until < now()
                 ORDER BY lease_until LIMIT $1
                 FOR UPDATE SKIP LOCKED
             ), t AS (
                UPDATE tasks SET
                       status = CASE WHEN attempts >= max_attempts THEN 'failed' ELSE 'queued' END,
                       error = 'lease expired: the worker running it stopped answering',
                       finished_at = CASE WHEN attempts >= max_attempts THEN now() END,
                       lease_until = NULL
                  FROM expired WHERE tasks.id = expired.id
             RETURNING tasks.id, tasks.batch_id, tasks.model, tasks.priority, tasks.status, tasks.run,
                       tasks.attempts, tasks.attempt_started_at, tasks.created_at
             ), h AS (
                -- Requeued: the lost attempt joins the stored history. Failed:
                -- the task row keeps describing it (see `store::tasks`).
                INSERT INTO task_attempts (task_id, run, attempt, started_at, finished_at, outcome, error)
                SELECT id, run, attempts, attempt_started_at, now(), 'lease_expired',
                       'lease expired: the worker running it stopped answering'
                  FROM t WHERE status = 'queued'
             )
             SELECT id, batch_id, model, priority, status, created_at FROM t",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// One page of waiting (queued or scheduled) tasks after `after`, in id
    /// order, created at least `grace` ago: the reconciler walks the whole
    /// set a page at a time.
    pub async fn waiting_page(
        &self,
        after: Uuid,
        limit: i64,
        grace: std::time::Duration,
    ) -> Result<Vec<Waiting>> {
        let mut tx = self.pool.begin().await?;
        // Walk `tasks_waiting` in id order and stop at the page's end. On a
        // table never analyzed (no autovacuum yet, or none at all) the
        // planner guesses a few dozen waiting rows and picks a bitmap scan
        // that reads every waiting task, then sorts: 20 ms for 20,000
        // waiting tasks here, about a second for W5's million, every sweep.
        sqlx::query("SET LOCAL enable_bitmapscan = off")
            .execute(&mut *tx)
            .await?;
        let page = sqlx::query_as::<_, Waiting>(
            "SELECT id, model, priority, status, run_at, created_at FROM tasks
              WHERE status IN ('queued', 'scheduled') AND id > $1
                AND created_at < now() - make_interval(secs => $3)
              ORDER BY id LIMIT $2",
        )
        .bind(after)
        .bind(limit)
        .bind(grace.as_secs_f64())
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(page)
    }

    /// Deletes finished tasks (with their attempts) that finished more than
    /// `max_age_secs` ago, at most `limit` per call, oldest first. Nothing
    /// unfinished is touched. Batches whose every task is gone go too.
    pub async fn delete_finished_before(&self, max_age_secs: i64, limit: i64) -> Result<u64> {
        let done = sqlx::query(
            "WITH old AS (
                SELECT id FROM tasks
                 WHERE status IN ('succeeded', 'failed', 'cancelled')
                   AND finished_at < now() - make_interval(secs => $1)
                 ORDER BY finished_at LIMIT $2
                 FOR UPDATE SKIP LOCKED
             )
             DELETE FROM tasks WHERE id IN (SELECT id FROM old)",
        )
        .bind(max_age_secs as f64)
        .bind(limit)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() > 0 {
            sqlx::query(
                "DELETE FROM batches b WHERE b.created_at < now() - make_interval(secs => $1)
                   AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.batch_id = b.id)",
            )
            .bind(max_age_secs as f64)
            .execute(&self.pool)
            .await?;
        }
        Ok(done.rows_affected())
    }

    /// Deletes idempotency keys older than `max_age_secs`, at most `limit`.
    pub async fn expire_idempotency_keys(&self, max_age_secs: i64, limit: i64) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM idempotency_keys WHERE (tenant, key) IN (
                SELECT tenant, key FROM idempotency_keys
                 WHERE created_at < now() - make_interval(secs => $1)
                 LIMIT $2)",
        )
        .bind(max_age_secs as f64)
        .bind(limit)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}
