//! Limits an admin set per tenant.

use super::Store;
use crate::access::Limits;
use crate::error::Result;

impl Store {
    /// The limits set for `tenant` (all `None` when none were).
    pub async fn tenant_limits(&self, tenant: &str) -> Result<Limits> {
        let row: Option<(Option<i32>, Option<i64>, Option<i64>)> = sqlx::query_as(
            "SELECT requests_per_second, tokens_per_minute, max_queued
               FROM tenant_limits WHERE tenant = $1",
        )
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map_or(Limits::default(), |(rps, tpm, queued)| Limits {
            requests_per_second: rps.map(|n| n as u32),
            tokens_per_minute: tpm.map(|n| n as u64),
            max_queued: queued.map(|n| n as u64),
        }))
    }

    /// Sets (replaces) a tenant's limits, with an audit entry in the same
    /// transaction.
    pub async fn set_tenant_limits(
        &self,
        tenant: &str,
        limits: &Limits,
        actor: &str,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO tenant_limits (tenant, requests_per_second, tokens_per_minute, max_queued)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (tenant) DO UPDATE SET
                requests_per_second = EXCLUDED.requests_per_second,
                tokens_per_minute = EXCLUDED.tokens_per_minute,
                max_queued = EXCLUDED.max_queued,
                updated_at = now()",
        )
        .bind(tenant)
        .bind(limits.requests_per_second.map(|n| n as i32))
        .bind(limits.tokens_per_minute.map(|n| n as i64))
        .bind(limits.max_queued.map(|n| n as i64))
        .execute(&mut *tx)
        .await?;
        let details = serde_json::to_value(limits).unwrap_or_default();
        super::audit::record(&mut *tx, actor, "limits.set", Some(tenant), Some(&details)).await?;
        tx.commit().await?;
        Ok(())
    }
}
