//! [`Uploads`] on PostgreSQL.

use sqlx::Row;
use uuid::Uuid;

use super::{ts, PgStore, SCOPE_SQL};
use crate::queue::*;

impl Uploads for PgStore {
    fn insert_upload(&self, u: Upload) -> QueueFuture<'_, ()> {
        Box::pin(async move {
            sqlx::query(
                "INSERT INTO uploads (id, owner_key_id, file_name, content_type, width, height, bytes, sha256, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            )
            .bind(u.id.to_string())
            .bind(&u.owner_key_id)
            .bind(&u.file_name)
            .bind(&u.content_type)
            .bind(u.width as i64)
            .bind(u.height as i64)
            .bind(u.bytes as i64)
            .bind(&u.sha256)
            .bind(u.created_at.timestamp_millis())
            .execute(&self.pool)
            .await?;
            Ok(())
        })
    }

    fn get_upload<'a>(&'a self, id: Uuid, scope: &'a Scope) -> QueueFuture<'a, Upload> {
        Box::pin(async move {
            let sql = format!(
                "SELECT id, owner_key_id, file_name, content_type, width, height, bytes, sha256, created_at \
                 FROM uploads WHERE {SCOPE_SQL} AND id = $3"
            );
            let row = sqlx::query(&sql)
                .bind(scope.all)
                .bind(&scope.owner_key_id)
                .bind(id.to_string())
                .fetch_optional(&self.pool)
                .await?
                .ok_or(QueueError::NotFound(id))?;
            Ok(Upload {
                id,
                owner_key_id: row.try_get("owner_key_id")?,
                file_name: row.try_get("file_name")?,
                content_type: row.try_get("content_type")?,
                width: row.try_get::<i64, _>("width")? as u32,
                height: row.try_get::<i64, _>("height")? as u32,
                bytes: row.try_get::<i64, _>("bytes")? as u64,
                sha256: row.try_get("sha256")?,
                created_at: ts(row.try_get("created_at")?),
            })
        })
    }
}
