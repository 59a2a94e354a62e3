//! [`Events`] on SQLite: rows in `job_events`, announced on a broadcast channel once
//! committed.

use sqlx::Row;
use tokio::sync::broadcast;
use uuid::Uuid;

use super::{now_ms, ts, SqliteStore};
use crate::queue::*;

impl SqliteStore {
    /// Tells this process's subscribers (SSE streams, the webhook sender) about a
    /// committed event.
    pub(super) fn notify(&self, event: &JobEvent) {
        let _ = self.events.send(EventNotice {
            job_id: event.job_id,
            event_id: event.id,
        });
    }

    /// Appends an event inside the caller's transaction (or on the pool); the caller
    /// calls [`SqliteStore::notify`] once it commits.
    pub(super) async fn insert_event<'c, E>(
        exec: E,
        job: Uuid,
        kind: EventKind,
        data: &serde_json::Value,
    ) -> QueueResult<JobEvent>
    where
        E: sqlx::Executor<'c, Database = sqlx::Sqlite>,
    {
        let now = now_ms();
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO job_events (job_id, kind, data, created_at) VALUES (?, ?, ?, ?) RETURNING id",
        )
        .bind(job.to_string())
        .bind(kind.as_str())
        .bind(data.to_string())
        .bind(now)
        .fetch_one(exec)
        .await?;
        Ok(JobEvent {
            id,
            job_id: job,
            kind,
            data: data.clone(),
            created_at: ts(now),
        })
    }
}

impl Events for SqliteStore {
    fn append_event(
        &self,
        job: Uuid,
        kind: EventKind,
        data: serde_json::Value,
    ) -> QueueFuture<'_, JobEvent> {
        Box::pin(async move {
            let event = Self::insert_event(&self.pool, job, kind, &data).await?;
            self.notify(&event);
            Ok(event)
        })
    }

    fn events_after(&self, job: Uuid, after: i64, limit: u32) -> QueueFuture<'_, Vec<JobEvent>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT id, kind, data, created_at FROM job_events WHERE job_id = ? AND id > ? \
                 ORDER BY id LIMIT ?",
            )
            .bind(job.to_string())
            .bind(after)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
            rows.iter()
                .map(|row| {
                    let kind: String = row.try_get("kind")?;
                    let data: String = row.try_get("data")?;
                    Ok(JobEvent {
                        id: row.try_get("id")?,
                        job_id: job,
                        kind: EventKind::parse(&kind)
                            .ok_or_else(|| QueueError::Corrupt(format!("event kind {kind:?}")))?,
                        data: serde_json::from_str(&data)
                            .map_err(|e| QueueError::Corrupt(format!("event data: {e}")))?,
                        created_at: ts(row.try_get("created_at")?),
                    })
                })
                .collect()
        })
    }

    fn subscribe(&self) -> broadcast::Receiver<EventNotice> {
        self.events.subscribe()
    }
}
