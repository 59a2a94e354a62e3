//! [`Workers`] on PostgreSQL: the registry of worker processes and their heartbeats.

use std::time::Duration;

use sqlx::Row;
use uuid::Uuid;

use super::{now_ms, parse_uuid, ts, PgStore};
use crate::queue::*;

impl PgStore {
    async fn workers_since(&self, within: Option<Duration>) -> QueueResult<Vec<WorkerInfo>> {
        let since = within.map_or(i64::MIN, |w| now_ms() - w.as_millis() as i64);
        let rows = sqlx::query(
            "SELECT id, device, job_id, heartbeat_at, host, pid FROM workers \
             WHERE heartbeat_at >= $1 ORDER BY id",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let job: Option<String> = row.try_get("job_id")?;
                Ok(WorkerInfo {
                    id: row.try_get("id")?,
                    device: row.try_get("device")?,
                    job_id: job.as_deref().map(parse_uuid).transpose()?,
                    heartbeat_at: ts(row.try_get("heartbeat_at")?),
                    host: row
                        .try_get::<Option<String>, _>("host")?
                        .unwrap_or_default(),
                    pid: row.try_get::<Option<i64>, _>("pid")?.unwrap_or(0) as u32,
                })
            })
            .collect()
    }
}

impl Workers for PgStore {
    fn worker_heartbeat<'a>(
        &'a self,
        worker_id: &'a str,
        device: &'a str,
        job: Option<Uuid>,
    ) -> QueueFuture<'a, ()> {
        Box::pin(async move {
            let now = now_ms();
            sqlx::query(
                "INSERT INTO workers (id, device, host, pid, started_at, heartbeat_at, job_id) \
                 VALUES ($1, $2, $3, $4, $5, $5, $6) \
                 ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at, job_id = excluded.job_id",
            )
            .bind(worker_id)
            .bind(device)
            .bind(hostname())
            .bind(std::process::id() as i64)
            .bind(now)
            .bind(job.map(|j| j.to_string()))
            .execute(&self.pool)
            .await?;
            Ok(())
        })
    }

    fn worker_gone<'a>(&'a self, worker_id: &'a str) -> QueueFuture<'a, ()> {
        Box::pin(async move {
            sqlx::query("DELETE FROM workers WHERE id = $1")
                .bind(worker_id)
                .execute(&self.pool)
                .await?;
            Ok(())
        })
    }

    fn live_workers(&self, within: Duration) -> QueueFuture<'_, Vec<WorkerInfo>> {
        Box::pin(self.workers_since(Some(within)))
    }

    fn workers(&self) -> QueueFuture<'_, Vec<WorkerInfo>> {
        Box::pin(self.workers_since(None))
    }

    fn expire_worker<'a>(&'a self, worker_id: &'a str) -> QueueFuture<'a, u64> {
        Box::pin(async move {
            let mut tx = self.pool.begin().await?;
            let held = sqlx::query(
                "UPDATE jobs SET lease_expires_at = 0 WHERE state = 'running' AND lease_owner = $1",
            )
            .bind(worker_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            sqlx::query("DELETE FROM workers WHERE id = $1")
                .bind(worker_id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(held)
        })
    }
}
