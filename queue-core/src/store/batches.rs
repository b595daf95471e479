//! Batch rows and their progress.

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use super::Store;
use crate::error::Result;
use crate::task::{BatchRecord, TaskStatus};

/// A batch's own row: id, total, metadata, created_at, tenant.
type Head = (Uuid, i32, Option<Value>, DateTime<Utc>, String);

/// Tasks of a batch in one status: how many, the last finish, the first
/// start.
type Counted = (
    TaskStatus,
    i64,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
);

impl Store {
    /// A batch with its task counts per status. Counting uses the
    /// `(batch_id, status)` index, so it costs a scan of that batch's index
    /// entries only.
    pub async fn batch(&self, id: Uuid) -> Result<Option<BatchRecord>> {
        let head: Option<Head> = sqlx::query_as(
            "SELECT id, total, metadata, created_at, tenant FROM batches WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let Some((id, total, metadata, created_at, tenant)) = head else {
            return Ok(None);
        };
        let rows: Vec<Counted> = sqlx::query_as(
            "SELECT status, count(*), max(finished_at), min(started_at)
                   FROM tasks WHERE batch_id = $1 GROUP BY status",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        let last_finish = rows.iter().filter_map(|r| r.2).max();
        let mut batch = BatchRecord {
            id,
            tenant,
            total,
            metadata,
            created_at,
            started_at: rows.iter().filter_map(|r| r.3).min(),
            counts: rows.into_iter().map(|(s, n, _, _)| (s, n)).collect(),
            completed_at: None,
        };
        if batch.is_complete() {
            batch.completed_at = last_finish;
        }
        Ok(Some(batch))
    }

    /// Whether any task of the batch has yet to finish: what a batch
    /// long-poll asks on each burst of completions. It stops at the first
    /// unfinished task in the `(batch_id, status)` index, where a full
    /// count reads every task of the batch (about 23 ms for 50,000 here,
    /// which, once per burst, took a third of a core from the workers).
    pub async fn batch_unfinished(&self, id: Uuid) -> Result<bool> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM tasks
                             WHERE batch_id = $1 AND status IN ('scheduled', 'queued', 'running'))",
        )
        .bind(id)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Batches newest first, after the cursor, each with its counts: one
    /// query for the page and one grouped count over its tasks (by the
    /// `tasks_batch` index).
    /// With `tenant`, only that tenant's batches.
    pub async fn list_batches(
        &self,
        tenant: Option<&str>,
        before: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<BatchRecord>> {
        let heads: Vec<Head> = sqlx::query_as(
            "SELECT id, total, metadata, created_at, tenant FROM batches
              WHERE ($1::uuid IS NULL OR id < $1) AND ($3::text IS NULL OR tenant = $3)
              ORDER BY id DESC LIMIT $2",
        )
        .bind(before)
        .bind(limit)
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        let ids: Vec<Uuid> = heads.iter().map(|h| h.0).collect();
        type Row = (
            Uuid,
            TaskStatus,
            i64,
            Option<DateTime<Utc>>,
            Option<DateTime<Utc>>,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT batch_id, status, count(*), max(finished_at), min(started_at) FROM tasks
              WHERE batch_id = ANY($1) GROUP BY batch_id, status",
        )
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?;
        Ok(heads
            .into_iter()
            .map(|(id, total, metadata, created_at, tenant)| {
                let mine = rows.iter().filter(|r| r.0 == id);
                let mut batch = BatchRecord {
                    id,
                    tenant,
                    total,
                    metadata,
                    created_at,
                    counts: mine.clone().map(|r| (r.1, r.2)).collect(),
                    started_at: mine.clone().filter_map(|r| r.4).min(),
                    completed_at: None,
                };
                if batch.is_complete() {
                    batch.completed_at = mine.filter_map(|r| r.3).max();
                }
                batch
            })
            .collect())
    }
}
