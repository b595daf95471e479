//! Batch rows and their progress.

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use super::Store;
use crate::error::Result;
use crate::task::{BatchRecord, TaskStatus};

impl Store {
    /// A batch with its task counts per status. Counting uses the
    /// `(batch_id, status)` index, so it costs a scan of that batch's index
    /// entries only.
    pub async fn batch(&self, id: Uuid) -> Result<Option<BatchRecord>> {
        let head: Option<(Uuid, i32, Option<Value>, DateTime<Utc>)> =
            sqlx::query_as("SELECT id, total, metadata, created_at FROM batches WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        let Some((id, total, metadata, created_at)) = head else {
            return Ok(None);
        };
        let rows: Vec<(TaskStatus, i64, Option<DateTime<Utc>>)> = sqlx::query_as(
            "SELECT status, count(*), max(finished_at) FROM tasks WHERE batch_id = $1 GROUP BY status",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        let last_finish = rows.iter().filter_map(|r| r.2).max();
        let mut batch = BatchRecord {
            id,
            total,
            metadata,
            created_at,
            counts: rows.into_iter().map(|(s, n, _)| (s, n)).collect(),
            completed_at: None,
        };
        if batch.is_complete() {
            batch.completed_at = last_finish;
        }
        Ok(Some(batch))
    }
}
