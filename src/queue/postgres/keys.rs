//! [`ApiKeys`] on PostgreSQL.

use super::{key_from_row, PgStore};
use crate::queue::*;

const COLUMNS: &str = "id, name, key_prefix, admin, created_at, revoked_at, \
                       requests_per_second, burst, max_queued, max_running";

impl PgStore {
    /// The key whose `column` (a unique one) holds `value`.
    async fn one_key(&self, column: &str, value: &str) -> QueueResult<Option<ApiKey>> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM api_keys WHERE {column} = $1"
        ))
        .bind(value)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(key_from_row).transpose()
    }
}

impl ApiKeys for PgStore {
    fn insert_key<'a>(&'a self, k: &'a KeyRow) -> QueueFuture<'a, Option<ApiKey>> {
        Box::pin(async move {
            let l = &k.limits;
            let row = sqlx::query(&format!(
                "INSERT INTO api_keys (id, name, key_hash, key_prefix, admin, created_at,
                                       requests_per_second, burst, max_queued, max_running)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                 ON CONFLICT (name) DO NOTHING RETURNING {COLUMNS}"
            ))
            .bind(&k.id)
            .bind(&k.name)
            .bind(&k.key_hash)
            .bind(&k.prefix)
            .bind(k.admin)
            .bind(k.created_at.timestamp_millis())
            .bind(l.requests_per_second)
            .bind(l.burst.map(i64::from))
            .bind(l.max_queued.map(i64::from))
            .bind(l.max_running.map(i64::from))
            .fetch_optional(&self.pool)
            .await?;
            row.as_ref().map(key_from_row).transpose()
        })
    }

    fn list_keys(&self) -> QueueFuture<'_, Vec<ApiKey>> {
        Box::pin(async move {
            let rows = sqlx::query(&format!(
                "SELECT {COLUMNS} FROM api_keys ORDER BY created_at, name"
            ))
            .fetch_all(&self.pool)
            .await?;
            rows.iter().map(key_from_row).collect()
        })
    }

    fn revoke_key<'a>(&'a self, id_or_name: &'a str) -> QueueFuture<'a, Option<ApiKey>> {
        Box::pin(async move {
            let row = sqlx::query(&format!(
                "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $1)
                  WHERE id = $2 OR name = $2 RETURNING {COLUMNS}"
            ))
            .bind(super::now_ms())
            .bind(id_or_name)
            .fetch_optional(&self.pool)
            .await?;
            row.as_ref().map(key_from_row).transpose()
        })
    }

    fn key_by_hash<'a>(&'a self, key_hash: &'a str) -> QueueFuture<'a, Option<ApiKey>> {
        Box::pin(self.one_key("key_hash", key_hash))
    }

    fn key_by_id<'a>(&'a self, id: &'a str) -> QueueFuture<'a, Option<ApiKey>> {
        Box::pin(self.one_key("id", id))
    }

    fn any_key(&self) -> QueueFuture<'_, bool> {
        Box::pin(async move {
            Ok(sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM api_keys)")
                .fetch_one(&self.pool)
                .await?)
        })
    }
}
