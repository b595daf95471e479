//! The audit log of admin actions: who, what, when.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use super::Store;
use crate::error::Result;

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct AuditEntry {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub action: String,
    pub target: Option<String>,
    pub details: Option<Value>,
}

/// Appends an entry, inside the caller's transaction when it has one, so
/// an action and its entry commit together.
pub(super) async fn record<'e, E: sqlx::PgExecutor<'e>>(
    executor: E,
    actor: &str,
    action: &str,
    target: Option<&str>,
    details: Option<&Value>,
) -> Result<()> {
    sqlx::query("INSERT INTO audit_log (actor, action, target, details) VALUES ($1, $2, $3, $4)")
        .bind(actor)
        .bind(action)
        .bind(target)
        .bind(details)
        .execute(executor)
        .await?;
    Ok(())
}

impl Store {
    /// Records an admin action that has no transaction of its own in
    /// PostgreSQL (pausing a queue is a Redis write).
    pub async fn audit(
        &self,
        actor: &str,
        action: &str,
        target: Option<&str>,
        details: Option<&Value>,
    ) -> Result<()> {
        record(&self.pool, actor, action, target, details).await
    }

    /// Entries newest first, before the cursor (an entry id).
    pub async fn audit_log(&self, before: Option<i64>, limit: i64) -> Result<Vec<AuditEntry>> {
        Ok(sqlx::query_as(
            "SELECT id, at, actor, action, target, details FROM audit_log
              WHERE ($1::bigint IS NULL OR id < $1) ORDER BY id DESC LIMIT $2",
        )
        .bind(before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }
}
