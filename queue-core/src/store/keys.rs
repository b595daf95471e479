//! API keys: created, looked up, listed, revoked. Only digests are stored.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::Store;
use crate::access::{Limits, NewKey, Scope};
use crate::error::Result;

/// A key as listings show it (never the key itself).
#[derive(Debug, Clone, Serialize)]
pub struct KeyRecord {
    pub id: String,
    pub tenant: String,
    pub name: String,
    pub scopes: Vec<Scope>,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// What a request's key resolves to: its digest to compare, who it is and
/// the tenant's limits as set (unset ones take the configured defaults).
#[derive(Debug, Clone)]
pub struct KeyGrant {
    pub id: String,
    pub tenant: String,
    pub scopes: Vec<Scope>,
    pub digest: Vec<u8>,
    pub revoked: bool,
    pub limits: Limits,
}

type KeyRow = (
    String,
    String,
    String,
    Vec<String>,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
);

fn scopes(names: &[String]) -> Vec<Scope> {
    names.iter().filter_map(|s| Scope::parse(s)).collect()
}

fn record(row: KeyRow) -> KeyRecord {
    let (id, tenant, name, scope_names, created_at, last_used_at, revoked_at) = row;
    KeyRecord {
        id,
        tenant,
        name,
        scopes: scopes(&scope_names),
        created_at,
        last_used_at,
        revoked_at,
    }
}

impl Store {
    /// Stores a new key's digest, with an audit entry in the same
    /// transaction.
    pub async fn create_key(
        &self,
        key: &NewKey,
        tenant: &str,
        name: &str,
        scopes: &[Scope],
        actor: &str,
    ) -> Result<KeyRecord> {
        let names: Vec<&str> = scopes.iter().map(|s| s.as_str()).collect();
        let mut tx = self.pool.begin().await?;
        let row: KeyRow = sqlx::query_as(
            "INSERT INTO api_keys (id, tenant, name, scopes, key_sha256) VALUES ($1, $2, $3, $4, $5)
             RETURNING id, tenant, name, scopes, created_at, last_used_at, revoked_at",
        )
        .bind(&key.id)
        .bind(tenant)
        .bind(name)
        .bind(&names)
        .bind(key.digest.as_slice())
        .fetch_one(&mut *tx)
        .await?;
        let details = serde_json::json!({ "tenant": tenant, "name": name, "scopes": names });
        super::audit::record(&mut *tx, actor, "key.create", Some(&key.id), Some(&details)).await?;
        tx.commit().await?;
        Ok(record(row))
    }

    /// The key with public id `id`, with its tenant's limits.
    pub async fn key_grant(&self, id: &str) -> Result<Option<KeyGrant>> {
        type Row = (
            String,
            String,
            Vec<String>,
            Vec<u8>,
            bool,
            Option<i32>,
            Option<i64>,
            Option<i64>,
        );
        let row: Option<Row> = sqlx::query_as(
            "SELECT k.id, k.tenant, k.scopes, k.key_sha256, k.revoked_at IS NOT NULL,
                    l.requests_per_second, l.tokens_per_minute, l.max_queued
               FROM api_keys k LEFT JOIN tenant_limits l ON l.tenant = k.tenant
              WHERE k.id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(
            |(id, tenant, scope_names, digest, revoked, rps, tpm, queued)| KeyGrant {
                id,
                tenant,
                scopes: scopes(&scope_names),
                digest,
                revoked,
                limits: Limits {
                    requests_per_second: rps.map(|n| n as u32),
                    tokens_per_minute: tpm.map(|n| n as u64),
                    max_queued: queued.map(|n| n as u64),
                },
            },
        ))
    }

    /// Keys, newest first; with `tenant`, only that tenant's.
    pub async fn list_keys(&self, tenant: Option<&str>) -> Result<Vec<KeyRecord>> {
        let rows: Vec<KeyRow> = sqlx::query_as(
            "SELECT id, tenant, name, scopes, created_at, last_used_at, revoked_at FROM api_keys
              WHERE ($1::text IS NULL OR tenant = $1) ORDER BY created_at DESC, id",
        )
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(record).collect())
    }

    /// Revokes a key (kept, marked revoked, so listings still show it).
    /// `None` if there is no such key; a key revoked before stays as it was.
    pub async fn revoke_key(&self, id: &str, actor: &str) -> Result<Option<KeyRecord>> {
        let mut tx = self.pool.begin().await?;
        let row: Option<KeyRow> = sqlx::query_as(
            "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1
             RETURNING id, tenant, name, scopes, created_at, last_used_at, revoked_at",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        if row.is_some() {
            super::audit::record(&mut *tx, actor, "key.revoke", Some(id), None).await?;
        }
        tx.commit().await?;
        Ok(row.map(record))
    }

    /// Notes that keys were used (the API calls this at most once a minute
    /// per key, so it is never a write per request).
    pub async fn touch_keys(&self, ids: &[String]) -> Result<()> {
        sqlx::query("UPDATE api_keys SET last_used_at = now() WHERE id = ANY($1)")
            .bind(ids)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
