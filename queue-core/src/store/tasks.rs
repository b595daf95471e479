//! Task rows: insert, claim, finish, cancel, read.
//!
//! Writes of tasks by id (outcomes, lease renewals, progress, cancels) run
//! on the store's `by_id` connections, which plan them at each run, claims
//! on connections planned alike that commit without waiting for the WAL
//! flush (see [`Store::claim`]), and completions of a few tasks with one
//! generic plan on the connections the reads use (see
//! [`Store::finish_succeeded_many`]).
//! Where their status test could match a partial index's predicate it is
//! written `(...) IS TRUE`: the same test for a `NOT NULL` column, but one
//! the planner of PostgreSQL 15 cannot match (a newer planner may learn
//! to), so they reach their rows through the primary key (see
//! [`Store::new`]).

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use sqlx::Row as _;
use sqlx::types::Json;
use uuid::Uuid;

use super::Store;
use crate::error::Result;
use crate::idempotency::IdempotencyKey;
use crate::task::{AttemptRecord, Input, NewTask, TaskRecord, TaskStatus};

/// Rows per INSERT statement. A 100,000-task batch is several statements in
/// one transaction, so it is still accepted all or none.
const INSERT_CHUNK: usize = 5_000;

/// From this many rows (a batch), tasks are written with `COPY`, which
/// PostgreSQL parses far faster than a statement's arrays; a group commit
/// of a few hundred single submissions stays one UNNEST statement.
const COPY_MIN_ROWS: usize = 1_000;
/// Bytes of COPY data sent at a time.
const COPY_BUFFER: usize = 1 << 20;

/// Writes `rows` (all `queued`) with one `COPY ... FROM STDIN`, in the
/// caller's transaction, which must have read `now()` as the tasks'
/// `created_at`: the column is left to its default, `now()`, the same
/// instant within one transaction, so PostgreSQL parses no timestamp per
/// row.
async fn copy_tasks(
    conn: &mut sqlx::PgConnection,
    batch_id: Option<Uuid>,
    rows: &[Row<'_>],
) -> Result<()> {
    use std::io::Write as _;
    let mut copy = conn
        .copy_in_raw(
            "COPY tasks (id, tenant, batch_id, model, priority, status, input, params, metadata, max_attempts, cache)
             FROM STDIN",
        )
        .await?;
    let batch = batch_id.map_or_else(|| "\\N".to_owned(), |b| b.to_string());
    let mut buf: Vec<u8> = Vec::with_capacity(COPY_BUFFER + 4096);
    // JSON text of one value at a time, reused: one allocation per COPY,
    // not one per row.
    let mut json: Vec<u8> = Vec::with_capacity(1024);
    let mut uuid = Uuid::encode_buffer();
    for row in rows {
        let t = row.task;
        buf.extend_from_slice(row.id.hyphenated().encode_lower(&mut uuid).as_bytes());
        buf.push(b'\t');
        copy_text(&mut buf, row.tenant.as_bytes());
        buf.push(b'\t');
        buf.extend_from_slice(batch.as_bytes());
        buf.push(b'\t');
        copy_text(&mut buf, t.model.as_bytes());
        buf.push(b'\t');
        buf.push(b'0' + t.priority.band() as u8);
        buf.extend_from_slice(b"\tqueued\t");
        json.clear();
        serde_json::to_writer(&mut json, &t.input).expect("JSON into memory");
        copy_text(&mut buf, &json);
        buf.push(b'\t');
        copy_text(&mut buf, t.params.json().as_bytes());
        buf.push(b'\t');
        match &t.metadata {
            Some(m) => {
                json.clear();
                serde_json::to_writer(&mut json, m).expect("JSON into memory");
                copy_text(&mut buf, &json);
            }
            None => buf.extend_from_slice(b"\\N"),
        }
        let cache = if t.cache { 't' } else { 'f' };
        let _ = writeln!(buf, "\t{}\t{cache}", t.max_attempts);
        if buf.len() >= COPY_BUFFER {
            copy.send(buf.as_slice()).await?;
            buf.clear();
        }
    }
    if !buf.is_empty() {
        copy.send(buf.as_slice()).await?;
    }
    copy.finish().await?;
    Ok(())
}

/// A value in COPY's text format: backslash, tab, newline and carriage
/// return escaped (validation refuses NUL, which it cannot carry). Runs
/// without any of them, nearly all of a prompt, are copied whole.
fn copy_text(buf: &mut Vec<u8>, s: &[u8]) {
    let mut from = 0;
    for (i, &b) in s.iter().enumerate() {
        let escaped: &[u8] = match b {
            b'\\' => b"\\\\",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            _ => continue,
        };
        buf.extend_from_slice(&s[from..i]);
        buf.extend_from_slice(escaped);
        from = i + 1;
    }
    buf.extend_from_slice(&s[from..]);
}

/// The dead letters a [`DeadFilter`] names ($1 task, $2 batch, $3 model,
/// $4 error substring), shared by re-drive and purge.
const DEAD_MATCH: &str = "status = 'failed'
                   AND ($1::uuid IS NULL OR id = $1)
                   AND ($2::uuid IS NULL OR batch_id = $2)
                   AND ($3::text IS NULL OR model = $3)
                   AND ($4::text IS NULL OR strpos(error, $4) > 0)
                   AND ($5::timestamptz IS NULL OR finished_at >= $5)
                   AND ($6::timestamptz IS NULL OR finished_at < $6)";

const TASK_COLUMNS: &str = "id, tenant, batch_id, model, priority, status, input, params, metadata, \
     attempts, max_attempts, run, result, error, run_at, cache, progress, created_at, started_at, finished_at";

/// Whether the task row in scope as `tasks` describes an attempt no stored
/// attempt row does: the one running, or the one that ended the task.
/// `task_attempts` keeps only attempts that ended without ending their task
/// (retried, lease expired, released), so the common case, a task that
/// succeeds at once, costs two row writes: its claim and its completion.
/// (A released attempt's row shares its number with the attempt after it.)
const ROW_ATTEMPT: &str = "tasks.attempts > 0 AND tasks.attempt_started_at IS NOT NULL
    AND tasks.status IN ('running', 'succeeded', 'failed', 'cancelled')
    AND NOT EXISTS (SELECT 1 FROM task_attempts s
                     WHERE s.task_id = tasks.id AND s.run = tasks.run AND s.attempt = tasks.attempts
                       AND s.outcome IS DISTINCT FROM 'released')";

/// Every attempt of the task in scope as `tasks`: the stored rows, then the
/// one its own row describes; ordered by `seq` (nulls last).
fn history_sql() -> String {
    format!(
        "SELECT a.run, a.attempt, a.started_at, a.finished_at, a.outcome, a.error, a.id AS seq
           FROM task_attempts a WHERE a.task_id = tasks.id
         UNION ALL
         SELECT tasks.run, tasks.attempts, tasks.attempt_started_at,
                CASE WHEN tasks.status <> 'running' THEN tasks.finished_at END,
                CASE WHEN tasks.status <> 'running' THEN tasks.status END,
                CASE WHEN tasks.status = 'failed' THEN tasks.error END,
                NULL
          WHERE {ROW_ATTEMPT}"
    )
}

/// What fences every write of one attempt (lease renewals, progress, the
/// outcome): the token its claim wrote into the task's row, and its attempt
/// number. A worker that lost its task (its lease lapsed and another claim
/// took it, or its claim was lost in a crash of PostgreSQL: see
/// [`Store::claim`]) cannot write over the claim that holds it now. The
/// number alone is not enough: a claim that a crash loses and the claim
/// after it share theirs. The token alone is not either, while workers
/// from before migration 0008 run: their claims leave the row's token as
/// it was, so the number must have moved on too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Claim {
    pub token: Uuid,
    pub attempt: i32,
}

/// A task a worker now holds, with what it needs to run it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ClaimedTask {
    pub id: Uuid,
    /// Whose task it is: its token usage is charged to this tenant.
    pub tenant: String,
    pub batch_id: Option<Uuid>,
    pub model: String,
    pub priority: i16,
    pub input: Json<Input>,
    pub params: Json<Map<String, Value>>,
    /// This attempt's number (1-based).
    pub attempts: i32,
    pub max_attempts: i32,
    /// The token this claim wrote (see [`Claim`]).
    #[sqlx(rename = "claim")]
    pub token: Uuid,
    /// 1, and one more per re-drive from the dead letters.
    pub run: i32,
    /// The client opted into the result cache.
    pub cache: bool,
    /// Orders the task within its band when it goes back to the queue.
    pub created_at: DateTime<Utc>,
}

impl ClaimedTask {
    /// The fence on every later write of this attempt.
    pub fn claim(&self) -> Claim {
        Claim {
            token: self.token,
            attempt: self.attempts,
        }
    }
}

/// How an attempt ended.
#[derive(Debug, Clone)]
pub enum Finish {
    Succeeded {
        result: Value,
    },
    /// Retryable failure: wait until `run_at`, then run again.
    Retry {
        error: String,
        run_at: DateTime<Utc>,
    },
    /// Permanent failure or attempts used up: the dead-letter state.
    Failed {
        error: String,
    },
    /// Handed back unfinished (graceful shutdown, backend outage); the
    /// attempt is not charged. `reason` goes into the attempt's history.
    Released {
        reason: String,
    },
}

#[derive(Debug)]
pub enum CancelOutcome {
    Cancelled(Box<TaskRecord>),
    NotFound,
    /// The task is running or already finished.
    Conflict(TaskStatus),
}

/// Which dead letters (failed tasks) a re-drive takes; `None` matches all.
#[derive(Debug, Clone, Default)]
pub struct DeadFilter {
    pub task_id: Option<Uuid>,
    pub batch_id: Option<Uuid>,
    pub model: Option<String>,
    /// Substring of the task's last error.
    pub error_contains: Option<String>,
    /// Failed at or after this time.
    pub finished_after: Option<DateTime<Utc>>,
    /// Failed before this time (a re-drive caps it at its own start).
    pub finished_before: Option<DateTime<Utc>>,
}

impl DeadFilter {
    fn bind<'q, O>(
        &'q self,
        q: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
        q.bind(self.task_id)
            .bind(self.batch_id)
            .bind(self.model.as_deref())
            .bind(self.error_contains.as_deref())
            .bind(self.finished_after)
            .bind(self.finished_before)
    }
}

/// A re-driven task, to make ready again.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Redriven {
    pub id: Uuid,
    pub model: String,
    pub priority: i16,
    pub created_at: DateTime<Utc>,
}

/// Which tasks a listing returns; `None` matches all.
#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    /// Only this tenant's tasks (`None`: every tenant's, for operators).
    pub tenant: Option<String>,
    pub status: Option<TaskStatus>,
    pub model: Option<String>,
    pub batch_id: Option<Uuid>,
    pub priority: Option<crate::task::Priority>,
    /// Substring of the task's last error.
    pub error_contains: Option<String>,
    pub finished_after: Option<DateTime<Utc>>,
    pub finished_before: Option<DateTime<Utc>>,
}

/// What an insert did.
#[derive(Debug)]
pub(crate) enum Inserted {
    New(DateTime<Utc>),
    /// The idempotency key was already used; nothing was written.
    Existing(ExistingKey),
}

/// What an idempotency key already points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExistingKey {
    /// The earlier request had the same body (as a JSON value).
    pub same_body: bool,
    pub task_id: Option<Uuid>,
    pub batch_id: Option<Uuid>,
}

/// Writes `rows` (all `queued`, at most [`INSERT_CHUNK`]) with one UNNEST
/// statement, stamped with the transaction's time, which it returns.
async fn insert_chunk<'e, E: sqlx::PgExecutor<'e>>(
    exec: E,
    batch_id: Option<Uuid>,
    rows: &[Row<'_>],
) -> Result<DateTime<Utc>> {
    let mut ids = Vec::with_capacity(rows.len());
    let mut models = Vec::with_capacity(rows.len());
    let mut priorities = Vec::with_capacity(rows.len());
    let mut inputs = Vec::with_capacity(rows.len());
    let mut params = Vec::with_capacity(rows.len());
    let mut metadata = Vec::with_capacity(rows.len());
    let mut max_attempts = Vec::with_capacity(rows.len());
    let mut caches = Vec::with_capacity(rows.len());
    let mut tenants = Vec::with_capacity(rows.len());
    for row in rows {
        ids.push(row.id);
        tenants.push(row.tenant);
        models.push(row.task.model.as_str());
        priorities.push(row.task.priority.band());
        inputs.push(Json(&row.task.input));
        params.push(Json(&row.task.params));
        metadata.push(row.task.metadata.as_ref());
        max_attempts.push(row.task.max_attempts);
        caches.push(row.task.cache);
    }
    Ok(sqlx::query_scalar(
        "WITH ins AS (
            INSERT INTO tasks (id, tenant, batch_id, model, priority, status, input, params, metadata, max_attempts, cache, created_at)
            SELECT u.id, u.tenant, $2, u.model, u.priority, 'queued', u.input, u.params, u.metadata, u.max_attempts, u.cache, now()
            FROM UNNEST($1::uuid[], $3::text[], $4::int2[], $5::jsonb[], $6::jsonb[], $7::jsonb[], $8::int4[], $9::bool[], $10::text[])
              AS u(id, model, priority, input, params, metadata, max_attempts, cache, tenant)
         )
         SELECT now()",
    )
    .bind(&ids)
    .bind(batch_id)
    .bind(&models)
    .bind(&priorities)
    .bind(&inputs)
    .bind(&params)
    .bind(&metadata)
    .bind(&max_attempts)
    .bind(&caches)
    .bind(&tenants)
    .fetch_one(exec)
    .await?)
}

/// The part of a new task that is stored; ids are given by the caller so the
/// API can answer with them and push them to Redis after the commit.
pub(crate) struct Row<'a> {
    pub id: Uuid,
    pub tenant: &'a str,
    pub task: &'a NewTask,
}

impl Store {
    /// Inserts tasks (all `queued`), optionally with their batch, in one
    /// transaction.
    ///
    /// With an idempotency key, the key is inserted first in the same
    /// transaction: if it exists (or another request is committing it right
    /// now; the insert waits for that one), nothing is written and what the
    /// key points at is returned instead.
    pub(crate) async fn insert_tasks(
        &self,
        batch: Option<(Uuid, Option<&Value>)>,
        rows: &[Row<'_>],
        key: Option<&IdempotencyKey>,
    ) -> Result<Inserted> {
        // A group commit of single submissions (no key, no batch) is one
        // statement, committed on its own: one round trip, not four.
        if key.is_none() && batch.is_none() && rows.len() <= INSERT_CHUNK.min(COPY_MIN_ROWS - 1) {
            let mut conn = self.held.inserts.acquire().await?;
            let created_at = insert_chunk(&mut *conn, None, rows).await?;
            conn.keep();
            return Ok(Inserted::New(created_at));
        }
        let mut tx = self.pool.begin().await?;
        let created_at: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
            .fetch_one(&mut *tx)
            .await?;
        let batch_id = batch.map(|(id, _)| id);
        // Every row of one call belongs to one tenant, except in a group
        // commit (no key, no batch), where each row says its own.
        let tenant = rows.first().map_or("default", |r| r.tenant);
        if let Some(key) = key {
            let task_id = if batch_id.is_none() {
                rows.first().map(|r| r.id)
            } else {
                None
            };
            let fresh: Option<String> = sqlx::query_scalar(
                "INSERT INTO idempotency_keys (tenant, key, body_sha256, task_id, batch_id)
                 VALUES ($5, $1, $2, $3, $4) ON CONFLICT (tenant, key) DO NOTHING RETURNING key",
            )
            .bind(&key.key)
            .bind(key.fingerprint.as_slice())
            .bind(task_id)
            .bind(batch_id)
            .bind(tenant)
            .fetch_optional(&mut *tx)
            .await?;
            if fresh.is_none() {
                let (sha, task_id, batch_id): (Vec<u8>, Option<Uuid>, Option<Uuid>) =
                    sqlx::query_as(
                        "SELECT body_sha256, task_id, batch_id FROM idempotency_keys
                          WHERE tenant = $2 AND key = $1",
                    )
                    .bind(&key.key)
                    .bind(tenant)
                    .fetch_one(&mut *tx)
                    .await?;
                tx.rollback().await?;
                return Ok(Inserted::Existing(ExistingKey {
                    same_body: sha == key.fingerprint,
                    task_id,
                    batch_id,
                }));
            }
        }
        if let Some((id, metadata)) = batch {
            sqlx::query(
                "INSERT INTO batches (id, total, metadata, created_at, tenant) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(id)
            .bind(rows.len() as i32)
            .bind(metadata)
            .bind(created_at)
            .bind(tenant)
            .execute(&mut *tx)
            .await?;
        }
        if rows.len() >= COPY_MIN_ROWS {
            copy_tasks(&mut tx, batch_id, rows).await?;
            tx.commit().await?;
            return Ok(Inserted::New(created_at));
        }
        for chunk in rows.chunks(INSERT_CHUNK) {
            insert_chunk(&mut *tx, batch_id, chunk).await?;
        }
        tx.commit().await?;
        Ok(Inserted::New(created_at))
    }

    /// The task ids of a batch, in the order they were submitted (v7 ids are
    /// generated in that order).
    pub async fn batch_task_ids(&self, batch_id: Uuid) -> Result<Vec<Uuid>> {
        Ok(
            sqlx::query_scalar("SELECT id FROM tasks WHERE batch_id = $1 ORDER BY id")
                .bind(batch_id)
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// Takes the tasks among `ids` that are still waiting to run and marks
    /// them running under a lease (the attempt is described by the task row
    /// until it ends: see [`HISTORY`]). Ids already
    /// claimed, cancelled or finished are skipped, which is what makes a
    /// duplicate id in Redis harmless. A scheduled task is claimable once it
    /// is due (with a second of grace for clock skew between hosts).
    ///
    /// Committed without waiting for the WAL flush (the `claims`
    /// connections' `synchronous_commit = off`): a claim lost in a crash of
    /// PostgreSQL itself leaves the task queued, and the reconciler
    /// dispatches it again, as after a worker's crash. The worker still
    /// running it cannot write over the next claim, whose token differs
    /// ([`Claim`]), and any outcome it does record is committed
    /// synchronously, which flushes its claim first. Such an attempt is not
    /// counted (its claim is gone with the crash). BENCHMARKS.md
    /// (2026-12-04, fifth session) has what it is worth.
    pub async fn claim(&self, ids: &[Uuid], lease: Duration) -> Result<Vec<ClaimedTask>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.held.claims.acquire().await?;
        let rows = sqlx::query_as::<_, ClaimedTask>(
            "WITH claimed AS (
                UPDATE tasks
                   SET status = 'running', attempts = attempts + 1, run_at = NULL, claim = $3,
                       started_at = coalesce(started_at, now()), attempt_started_at = now(),
                       lease_until = now() + make_interval(secs => $2)
                 WHERE id = ANY($1)
                   AND (status = 'queued'
                        OR (status = 'scheduled' AND run_at <= now() + interval '1 second')) IS TRUE
             RETURNING id, tenant, batch_id, model, priority, input, params, attempts, max_attempts, claim, cache, created_at, run
             )
             SELECT * FROM claimed",
        )
        .bind(ids)
        .bind(lease.as_secs_f64())
        // One token per statement: random, so no two claims share one.
        .bind(Uuid::new_v4())
        .fetch_all(&mut *conn)
        .await?;
        conn.keep();
        Ok(rows)
    }

    /// Records how the attempt that `claim` started on task `id` ended.
    /// Fenced: it changes nothing unless that claim still holds the task
    /// (running, same token and attempt number), so a worker whose lease
    /// lapsed cannot overwrite the attempt that replaced it. Returns
    /// whether the write took effect.
    pub async fn finish(&self, id: Uuid, claim: Claim, finish: &Finish) -> Result<bool> {
        let query = match finish {
            Finish::Succeeded { result } => sqlx::query(
                "WITH t AS (
                    UPDATE tasks SET status = 'succeeded', result = $3, error = NULL, progress = NULL,
                                     finished_at = now(), lease_until = NULL
                     WHERE id = $1 AND claim = $2 AND attempts = $4 AND (status = 'running') IS TRUE
                 RETURNING id
                 )
                 SELECT count(*) FROM t",
            )
            .bind(id)
            .bind(claim.token)
            .bind(result)
            .bind(claim.attempt),
            // The store, not only the caller, refuses a retry past
            // max_attempts: such a retry becomes the dead letter it must be.
            Finish::Retry { error, run_at } => sqlx::query(
                "WITH t AS (
                    UPDATE tasks SET
                           status = CASE WHEN attempts >= max_attempts THEN 'failed' ELSE 'scheduled' END,
                           run_at = CASE WHEN attempts >= max_attempts THEN NULL ELSE $4 END,
                           finished_at = CASE WHEN attempts >= max_attempts THEN now() END,
                           error = $3, lease_until = NULL
                     WHERE id = $1 AND claim = $2 AND attempts = $5 AND (status = 'running') IS TRUE
                 RETURNING id, run, attempts, attempt_started_at, status
                 ), h AS (
                    INSERT INTO task_attempts (task_id, run, attempt, started_at, finished_at, outcome, error)
                    SELECT id, run, attempts, attempt_started_at, now(), 'retry', $3 FROM t
                     WHERE status <> 'failed'
                 )
                 SELECT count(*) FROM t",
            )
            .bind(id)
            .bind(claim.token)
            .bind(error)
            .bind(run_at)
            .bind(claim.attempt),
            Finish::Failed { error } => sqlx::query(
                "WITH t AS (
                    UPDATE tasks SET status = 'failed', error = $3, finished_at = now(), lease_until = NULL
                     WHERE id = $1 AND claim = $2 AND attempts = $4 AND (status = 'running') IS TRUE
                 RETURNING id
                 )
                 SELECT count(*) FROM t",
            )
            .bind(id)
            .bind(claim.token)
            .bind(error)
            .bind(claim.attempt),
            Finish::Released { reason } => sqlx::query(
                "WITH t AS (
                    UPDATE tasks SET status = 'queued', attempts = attempts - 1, lease_until = NULL,
                                     claim = NULL
                     WHERE id = $1 AND claim = $2 AND attempts = $4 AND (status = 'running') IS TRUE
                 RETURNING id, run, attempts + 1 AS attempt, attempt_started_at
                 ), h AS (
                    INSERT INTO task_attempts (task_id, run, attempt, started_at, finished_at, outcome, error)
                    SELECT id, run, attempt, attempt_started_at, now(), 'released', $3 FROM t
                 )
                 SELECT count(*) FROM t",
            )
            .bind(id)
            .bind(claim.token)
            .bind(reason)
            .bind(claim.attempt),
        };
        let n: i64 = query.fetch_one(&self.by_id).await?.try_get(0)?;
        Ok(n == 1)
    }

    /// Records how far running attempts have got (tokens streamed so far),
    /// in one statement; fenced like every other write of an attempt.
    pub async fn record_progress(&self, progress: &[(Uuid, Claim, Value)]) -> Result<()> {
        if progress.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = progress.iter().map(|p| p.0).collect();
        let tokens: Vec<Uuid> = progress.iter().map(|p| p.1.token).collect();
        let attempts: Vec<i32> = progress.iter().map(|p| p.1.attempt).collect();
        let values: Vec<&Value> = progress.iter().map(|p| &p.2).collect();
        // Skips rows another statement holds, like `renew_leases`: progress
        // is a hint, and waiting could deadlock with a batch of completions.
        sqlx::query(
            "WITH free AS MATERIALIZED (
                SELECT id FROM tasks WHERE id = ANY($1) FOR UPDATE SKIP LOCKED
             )
             UPDATE tasks t SET progress = u.progress
               FROM UNNEST($1::uuid[], $2::uuid[], $3::int4[], $4::jsonb[]) AS u(id, claim, attempt, progress), free
              WHERE t.id = u.id AND t.id = free.id AND t.claim = u.claim AND t.attempts = u.attempt
                AND (t.status = 'running') IS TRUE",
        )
        .bind(&ids)
        .bind(&tokens)
        .bind(&attempts)
        .bind(&values)
        .execute(&self.by_id)
        .await?;
        Ok(())
    }

    /// A cached result for this fingerprint, if one is younger than
    /// `ttl_secs`.
    pub async fn cached_result(
        &self,
        fingerprint: &[u8; 32],
        ttl_secs: i64,
    ) -> Result<Option<Value>> {
        Ok(sqlx::query_scalar(
            "SELECT result FROM result_cache
              WHERE fingerprint = $1 AND created_at > now() - make_interval(secs => $2)",
        )
        .bind(fingerprint.as_slice())
        .bind(ttl_secs as f64)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Stores (or refreshes) a result for this fingerprint.
    pub async fn cache_result(&self, fingerprint: &[u8; 32], result: &Value) -> Result<()> {
        sqlx::query(
            "INSERT INTO result_cache (fingerprint, result) VALUES ($1, $2)
             ON CONFLICT (fingerprint) DO UPDATE SET result = EXCLUDED.result, created_at = now()",
        )
        .bind(fingerprint.as_slice())
        .bind(result)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Extends the leases of tasks a worker still runs (its heartbeat), in
    /// one statement. Returns the ids whose lease was extended: a task
    /// missing from the answer is no longer this attempt's (cancelled, or
    /// its lease lapsed and another attempt took it), so its worker stops.
    pub async fn renew_leases(&self, held: &[(Uuid, Claim)], lease: Duration) -> Result<Vec<Uuid>> {
        if held.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = held.iter().map(|h| h.0).collect();
        let tokens: Vec<Uuid> = held.iter().map(|h| h.1.token).collect();
        let attempts: Vec<i32> = held.iter().map(|h| h.1.attempt).collect();
        // Rows another statement holds (a batch of completions, most
        // likely) are skipped, not waited for: this statement and that one
        // lock their rows in no particular order, and waiting could
        // deadlock them, which PostgreSQL breaks only after a second. A
        // skipped row is reported held (it is being written now); it is
        // renewed, or found lost, next time.
        Ok(sqlx::query_scalar(
            "WITH free AS MATERIALIZED (
                SELECT id FROM tasks WHERE id = ANY($1) FOR UPDATE SKIP LOCKED
             ), renewed AS (
                UPDATE tasks t SET lease_until = now() + make_interval(secs => $3)
                  FROM UNNEST($1::uuid[], $2::uuid[], $4::int4[]) AS u(id, claim, attempt), free
                 WHERE t.id = u.id AND t.id = free.id AND t.claim = u.claim AND t.attempts = u.attempt
                   AND (t.status = 'running') IS TRUE
             RETURNING t.id
             )
             SELECT id FROM renewed
             UNION ALL
             SELECT id FROM tasks WHERE id = ANY($1) AND id NOT IN (SELECT id FROM free)",
        )
        .bind(&ids)
        .bind(&tokens)
        .bind(lease.as_secs_f64())
        .bind(&attempts)
        .fetch_all(&self.by_id)
        .await?)
    }

    /// Records many retryable failures in one statement, each fenced like
    /// [`Store::finish`]: the task waits until its run-at, or, past
    /// `max_attempts`, becomes the dead letter it must be. Returns the ids
    /// whose write took effect, with the status each now has.
    pub async fn finish_retry_many(
        &self,
        retries: &[(Uuid, Claim, &str, DateTime<Utc>)],
    ) -> Result<Vec<(Uuid, TaskStatus)>> {
        if retries.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = retries.iter().map(|r| r.0).collect();
        let tokens: Vec<Uuid> = retries.iter().map(|r| r.1.token).collect();
        let attempts: Vec<i32> = retries.iter().map(|r| r.1.attempt).collect();
        let errors: Vec<&str> = retries.iter().map(|r| r.2).collect();
        let run_at: Vec<DateTime<Utc>> = retries.iter().map(|r| r.3).collect();
        let mut conn = self.held.by_id.acquire().await?;
        let rows = sqlx::query_as(
            "WITH u AS (
                SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $5::int4[], $3::text[], $4::timestamptz[])
                           AS u(id, claim, attempt, error, run_at)
             ), t AS (
                UPDATE tasks SET
                       status = CASE WHEN tasks.attempts >= tasks.max_attempts THEN 'failed' ELSE 'scheduled' END,
                       run_at = CASE WHEN tasks.attempts >= tasks.max_attempts THEN NULL ELSE u.run_at END,
                       finished_at = CASE WHEN tasks.attempts >= tasks.max_attempts THEN now() END,
                       error = u.error, lease_until = NULL
                  FROM u WHERE tasks.id = u.id AND tasks.claim = u.claim AND tasks.attempts = u.attempt
                   AND (tasks.status = 'running') IS TRUE
             RETURNING tasks.id, tasks.run, tasks.attempts, tasks.attempt_started_at, tasks.status, u.error
             ), h AS (
                INSERT INTO task_attempts (task_id, run, attempt, started_at, finished_at, outcome, error)
                SELECT id, run, attempts, attempt_started_at, now(), 'retry', error FROM t
                 WHERE status <> 'failed'
             )
             SELECT id, status FROM t",
        )
        .bind(&ids)
        .bind(&tokens)
        .bind(&errors)
        .bind(&run_at)
        .bind(&attempts)
        .fetch_all(&mut *conn)
        .await?;
        conn.keep();
        Ok(rows)
    }

    /// Records many successful attempts in one statement (the worker's
    /// completions, collected for a millisecond or two). Fenced per row like
    /// [`Store::finish`]; returns the ids whose write took effect.
    ///
    /// A few at a time (a queue under light load), planning took longer
    /// than the write: those run on connections with one generic plan per
    /// statement, where `tasks.id = ANY($1)`, redundant with the join, keeps
    /// the primary key the way into `tasks` (without it, a plan made on a
    /// small table scanned the whole primary key at each run). That plan
    /// joins in a nested loop, every id against every unnested row, so
    /// larger batches are planned at each run for their size (with every
    /// completion on the generic plan, W1's drain measured 7,905 jobs/s
    /// against 21,410 to 22,926 for the builds before and after in the same
    /// slow hour: a 512-task completion is 262,144 pairs).
    pub async fn finish_succeeded_many(&self, done: &[(Uuid, Claim, &Value)]) -> Result<Vec<Uuid>> {
        /// The most written with the generic plan: 64 pairs.
        const PLANNED_ONCE_UP_TO: usize = 8;
        if done.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = done.iter().map(|d| d.0).collect();
        let tokens: Vec<Uuid> = done.iter().map(|d| d.1.token).collect();
        let attempts: Vec<i32> = done.iter().map(|d| d.1.attempt).collect();
        let results: Vec<&Value> = done.iter().map(|d| d.2).collect();
        let mut conn = if done.len() <= PLANNED_ONCE_UP_TO {
            self.held.planned_once.acquire().await?
        } else {
            self.held.by_id.acquire().await?
        };
        let ids = sqlx::query_scalar(
            "WITH u AS (
                SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $4::int4[], $3::jsonb[])
                           AS u(id, claim, attempt, result)
             ), t AS (
                UPDATE tasks SET status = 'succeeded', result = u.result, error = NULL, progress = NULL,
                                 finished_at = now(), lease_until = NULL
                  FROM u WHERE tasks.id = ANY($1) AND tasks.id = u.id AND tasks.claim = u.claim
                   AND tasks.attempts = u.attempt
                   AND (tasks.status = 'running') IS TRUE
             RETURNING tasks.id
             )
             SELECT id FROM t",
        )
        .bind(&ids)
        .bind(&tokens)
        .bind(&results)
        .bind(&attempts)
        .fetch_all(&mut *conn)
        .await?;
        conn.keep();
        Ok(ids)
    }

    /// Re-drives dead letters matching `filter` (at most `limit` per call):
    /// each starts a new run with fresh attempts, its earlier attempts kept
    /// in its history. Returns what to push back to Redis.
    pub async fn redrive(&self, filter: &DeadFilter, limit: i64) -> Result<Vec<Redriven>> {
        let sql = format!(
            "WITH picked AS (
                SELECT id FROM tasks
                 WHERE {DEAD_MATCH}
                 ORDER BY id LIMIT $7
                 FOR UPDATE SKIP LOCKED
             ), kept AS (
                -- The attempt that dead-lettered it moves from the task row
                -- into the stored history before the new run starts.
                INSERT INTO task_attempts (task_id, run, attempt, started_at, finished_at, outcome, error)
                SELECT tasks.id, tasks.run, tasks.attempts, tasks.attempt_started_at, tasks.finished_at,
                       'failed', tasks.error
                  FROM tasks JOIN picked USING (id) WHERE {ROW_ATTEMPT}
             )
             UPDATE tasks SET status = 'queued', attempts = 0, run = run + 1, error = NULL,
                              result = NULL, finished_at = NULL, run_at = NULL,
                              attempt_started_at = NULL
               FROM picked WHERE tasks.id = picked.id
             RETURNING tasks.id, tasks.model, tasks.priority, tasks.created_at"
        );
        Ok(filter
            .bind(sqlx::query_as::<_, Redriven>(sqlx::AssertSqlSafe(sql)))
            .bind(limit)
            .fetch_all(&self.pool)
            .await?)
    }

    /// Deletes dead letters matching `filter`, with their history, at most
    /// `limit` per call. Returns how many went.
    pub async fn purge_dead(&self, filter: &DeadFilter, limit: i64) -> Result<u64> {
        let sql = format!(
            "WITH gone AS (
                DELETE FROM tasks WHERE id IN (
                    SELECT id FROM tasks
                     WHERE {DEAD_MATCH}
                     ORDER BY id LIMIT $7
                     FOR UPDATE SKIP LOCKED)
                RETURNING 1)
             SELECT count(*) FROM gone"
        );
        let (n,): (i64,) = filter
            .bind(sqlx::query_as(sqlx::AssertSqlSafe(sql)))
            .bind(limit)
            .fetch_one(&self.pool)
            .await?;
        Ok(n as u64)
    }

    /// Dead letters matching `filter`, newest first, after the cursor.
    pub async fn list_dead(
        &self,
        filter: &DeadFilter,
        before: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<TaskRecord>> {
        let sql = format!(
            "SELECT {TASK_COLUMNS} FROM tasks
              WHERE {DEAD_MATCH} AND ($7::uuid IS NULL OR id < $7)
              ORDER BY id DESC LIMIT $8"
        );
        Ok(filter
            .bind(sqlx::query_as::<_, TaskRecord>(sqlx::AssertSqlSafe(sql)))
            .bind(before)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?)
    }

    /// Dead letters per queue: the partial index `tasks_failed` holds only
    /// failed tasks, so this reads no other row.
    pub async fn dead_by_queue(&self) -> Result<Vec<(String, i64)>> {
        Ok(sqlx::query_as(
            "SELECT model, count(*) FROM tasks WHERE status = 'failed' GROUP BY model",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Cancels a task that has not finished. A running attempt is closed as
    /// `cancelled` here; its worker notices (see [`Store::cancelled_among`]),
    /// stops the backend call, and its late result is refused by the fence.
    /// With `tenant`, only that tenant's task (another's is `NotFound`).
    pub async fn cancel(&self, id: Uuid, tenant: Option<&str>) -> Result<CancelOutcome> {
        let sql = format!(
            "WITH t AS (
                UPDATE tasks SET status = 'cancelled', finished_at = now(), run_at = NULL, lease_until = NULL
                 WHERE id = $1 AND (status IN ('queued', 'scheduled', 'running')) IS TRUE
                   AND ($2::text IS NULL OR tenant = $2)
             RETURNING {TASK_COLUMNS}
             )
             SELECT * FROM t"
        );
        let cancelled = sqlx::query_as::<_, TaskRecord>(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .bind(tenant)
            .fetch_optional(&self.by_id)
            .await?;
        if let Some(task) = cancelled {
            return Ok(CancelOutcome::Cancelled(Box::new(task)));
        }
        Ok(match self.task(id).await? {
            None => CancelOutcome::NotFound,
            Some(t) if tenant.is_some_and(|mine| mine != t.tenant) => CancelOutcome::NotFound,
            Some(t) => CancelOutcome::Conflict(t.status),
        })
    }

    /// Which of `ids` have been cancelled. Workers ask this about their
    /// in-flight tasks twice a second: a read of a few primary keys, cheap
    /// next to renewing leases that often.
    pub async fn cancelled_among(&self, ids: &[Uuid]) -> Result<Vec<Uuid>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        Ok(
            sqlx::query_scalar("SELECT id FROM tasks WHERE id = ANY($1) AND status = 'cancelled'")
                .bind(ids)
                .fetch_all(&self.by_id)
                .await?,
        )
    }

    /// A page of tasks, newest first, keyed on the (time-ordered) id: tasks
    /// inserted while a client pages have larger ids than its cursor, so
    /// they do not shift the pages it has yet to read. (An id is made as
    /// its request arrives, a moment before its commit, and several API
    /// processes make their own: a task committed just after a page was
    /// read may still sort just below its cursor and show on the next.)
    pub async fn list_tasks(
        &self,
        filter: &TaskFilter,
        before: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<TaskRecord>> {
        let sql = format!(
            "SELECT {TASK_COLUMNS} FROM tasks
              WHERE ($1::text IS NULL OR status = $1)
                AND ($2::text IS NULL OR model = $2)
                AND ($3::uuid IS NULL OR batch_id = $3)
                AND ($4::int2 IS NULL OR priority = $4)
                AND ($5::uuid IS NULL OR id < $5)
                AND ($7::text IS NULL OR strpos(error, $7) > 0)
                AND ($8::timestamptz IS NULL OR finished_at >= $8)
                AND ($9::timestamptz IS NULL OR finished_at < $9)
                AND ($10::text IS NULL OR tenant = $10)
              ORDER BY id DESC LIMIT $6"
        );
        Ok(sqlx::query_as::<_, TaskRecord>(sqlx::AssertSqlSafe(sql))
            .bind(filter.status.map(|s| s.as_str()))
            .bind(filter.model.as_deref())
            .bind(filter.batch_id)
            .bind(filter.priority.map(|p| p.band()))
            .bind(before)
            .bind(limit)
            .bind(filter.error_contains.as_deref())
            .bind(filter.finished_after)
            .bind(filter.finished_before)
            .bind(filter.tenant.as_deref())
            .fetch_all(&self.pool)
            .await?)
    }

    pub async fn task(&self, id: Uuid) -> Result<Option<TaskRecord>> {
        let sql = format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1");
        Ok(sqlx::query_as::<_, TaskRecord>(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// A task with every attempt of it, oldest first, in one query.
    pub async fn task_with_history(
        &self,
        id: Uuid,
    ) -> Result<Option<(TaskRecord, Vec<AttemptRecord>)>> {
        Ok(self.tasks_with_history(&[id]).await?.pop())
    }

    /// Tasks with every attempt of each, oldest first, in one query (the
    /// long-polls' reads, gathered while the previous reads ran: the hot
    /// path). Unknown ids are left out.
    pub async fn tasks_with_history(
        &self,
        ids: &[Uuid],
    ) -> Result<Vec<(TaskRecord, Vec<AttemptRecord>)>> {
        #[derive(sqlx::FromRow)]
        struct WithHistory {
            #[sqlx(flatten)]
            task: TaskRecord,
            history: Json<Vec<AttemptRecord>>,
        }
        // Built once: this runs for every read, and the prepared statement
        // is found by its text.
        static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            format!(
                "SELECT {TASK_COLUMNS},
                        coalesce((SELECT json_agg(json_build_object(
                                    'run', h.run, 'attempt', h.attempt, 'started_at', h.started_at,
                                    'finished_at', h.finished_at, 'outcome', h.outcome, 'error', h.error)
                                  ORDER BY h.seq NULLS LAST)
                             FROM ({history}) h), '[]') AS history
                   FROM tasks WHERE id = ANY($1)",
                history = history_sql()
            )
        });
        // On the connections that plan no sequential scan (see
        // `Store::new`), so its cached plan stays an index lookup.
        Ok(
            sqlx::query_as::<_, WithHistory>(sqlx::AssertSqlSafe(SQL.as_str()))
                .bind(ids)
                .fetch_all(&self.planned_once)
                .await?
                .into_iter()
                .map(|r| (r.task, r.history.0))
                .collect(),
        )
    }

    /// Every attempt of a task, oldest first.
    pub async fn history(&self, id: Uuid) -> Result<Vec<AttemptRecord>> {
        let sql = format!(
            "SELECT h.run, h.attempt, h.started_at, h.finished_at, h.outcome, h.error
               FROM tasks, LATERAL ({history}) h
              WHERE tasks.id = $1 ORDER BY h.seq NULLS LAST",
            history = history_sql()
        );
        Ok(sqlx::query_as::<_, AttemptRecord>(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_all(&self.pool)
            .await?)
    }

    /// Running tasks per queue. Uses the partial index over running tasks,
    /// so it costs what is running, not what is stored.
    pub async fn running_by_queue(&self) -> Result<Vec<(String, i64)>> {
        Ok(sqlx::query_as(
            "SELECT model, count(*) FROM tasks WHERE status = 'running' GROUP BY model",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// How many of a tenant's tasks are unfinished, counting at most
    /// `up_to` (the cap it is checked against, plus one): the partial index
    /// `tasks_tenant_unfinished` holds only unfinished tasks.
    pub async fn unfinished_count(&self, tenant: &str, up_to: i64) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM (
                SELECT 1 FROM tasks
                 WHERE tenant = $1 AND status IN ('scheduled', 'queued', 'running')
                 LIMIT $2) AS t",
        )
        .bind(tenant)
        .bind(up_to)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Number of tasks in each status (tests and the CLI use this).
    pub async fn count_by_status(&self) -> Result<Vec<(TaskStatus, i64)>> {
        Ok(
            sqlx::query_as("SELECT status, count(*) FROM tasks GROUP BY status")
                .fetch_all(&self.pool)
                .await?,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A group commit of 1,000 single submissions (no batch, no key) takes
    /// the COPY path, whose batch column is then COPY's null marker.
    #[sqlx::test(migrator = "crate::MIGRATOR")]
    async fn a_copied_group_without_a_batch_stores_no_batch(pool: sqlx::PgPool) {
        let svc = crate::testkit::service(pool);
        let tasks: Vec<NewTask> = (0..COPY_MIN_ROWS)
            .map(|i| {
                let body = serde_json::json!({"model": "m", "prompt": format!("p\t{i}")});
                NewTask::from_json(&body, "").unwrap()
            })
            .collect();
        let rows: Vec<Row<'_>> = tasks
            .iter()
            .enumerate()
            .map(|(i, task)| Row {
                id: Uuid::now_v7(),
                tenant: if i % 2 == 0 { "a" } else { "b" },
                task,
            })
            .collect();
        let Inserted::New(created_at) = svc.store.insert_tasks(None, &rows, None).await.unwrap()
        else {
            panic!("no key, so new");
        };
        for (i, row) in rows.iter().enumerate() {
            let stored = svc.store.task(row.id).await.unwrap().unwrap();
            assert_eq!(stored.batch_id, None);
            assert_eq!(stored.tenant, row.tenant, "each row keeps its own tenant");
            assert_eq!(stored.input.0, row.task.input);
            assert_eq!(stored.created_at, created_at);
            assert_eq!(stored.status, TaskStatus::Queued, "task {i}");
        }
    }
}
