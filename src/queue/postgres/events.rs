//! [`Events`] on PostgreSQL: rows in `job_events` whose ids each job allocates under its row
//! lock, announced by a trigger's `NOTIFY` to every node and on this process's channel.

use sqlx::Row;
use tokio::sync::broadcast;
use uuid::Uuid;

use super::{now_ms, ts, PgStore};
use crate::queue::*;

impl PgStore {
    /// Tells this process's subscribers about a committed event at once, unless the listener
    /// was first; other nodes hear of it through `NOTIFY`.
    pub(super) fn notify(&self, event: &JobEvent) {
        if !self.announced.first(event.job_id, event.id) {
            return;
        }
        let _ = self.events.send(EventNotice {
            job_id: event.job_id,
            event_id: event.id,
        });
    }

    /// Appends an event inside the caller's transaction; the caller calls
    /// [`PgStore::notify`] once it commits. Bumping `jobs.last_event_id` locks the job row
    /// until commit, so a second writer's event for the job gets the next id only after this
    /// one is visible.
    pub(super) async fn insert_event(
        conn: &mut sqlx::PgConnection,
        job: Uuid,
        kind: EventKind,
        data: &serde_json::Value,
    ) -> QueueResult<JobEvent> {
        let now = now_ms();
        let id: Option<i64> = sqlx::query_scalar(
            "WITH n AS (UPDATE jobs SET last_event_id = last_event_id + 1 WHERE id = $1 \
                        RETURNING last_event_id) \
             INSERT INTO job_events (job_id, id, kind, data, created_at) \
             SELECT $1, last_event_id, $2, $3, $4 FROM n RETURNING id",
        )
        .bind(job.to_string())
        .bind(kind.as_str())
        .bind(data.to_string())
        .bind(now)
        .fetch_optional(conn)
        .await?;
        let id = id.ok_or(QueueError::NotFound(job))?;
        Ok(JobEvent {
            id,
            job_id: job,
            kind,
            data: data.clone(),
            created_at: ts(now),
        })
    }
}

impl Events for PgStore {
    fn append_event(
        &self,
        job: Uuid,
        kind: EventKind,
        data: serde_json::Value,
    ) -> QueueFuture<'_, JobEvent> {
        Box::pin(async move {
            let mut tx = self.pool.begin().await?;
            let event = Self::insert_event(&mut tx, job, kind, &data).await?;
            tx.commit().await?;
            self.notify(&event);
            Ok(event)
        })
    }

    fn events_after(&self, job: Uuid, after: i64, limit: u32) -> QueueFuture<'_, Vec<JobEvent>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT id, kind, data, created_at FROM job_events WHERE job_id = $1 AND id > $2 \
                 ORDER BY id LIMIT $3",
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
