//! From job events to deliveries: the sender tails the queue's `job_events`
//! table with a persisted cursor.
//!
//! Reading the table rather than listening to an in-process channel is what
//! makes webhooks survive restarts and work for workers in other processes
//! (`vqclip worker`): an event committed by anyone is seen by the server's
//! sender, and a crash between the event and its delivery row loses nothing,
//! because the cursor only moves after the deliveries are written and an
//! event is delivered at most once (`event_id` is unique).

use super::engine::OutgoingEvent;
use super::{EventKind, WebhookEngine, WebhookError, WebhookSpec};
use sqlx::Row;

/// Events read per pass.
const BATCH: i64 = 500;

impl WebhookEngine {
    /// Turns the job events committed since the last pass into deliveries.
    /// Returns how many events were read.
    pub async fn pump_events(&self) -> Result<usize, WebhookError> {
        let pool = self.store.pool();
        let mut total = 0;
        loop {
            let cursor: i64 =
                sqlx::query_scalar("SELECT last_event_id FROM webhook_cursor WHERE id = 1")
                    .fetch_one(pool)
                    .await?;
            let rows = sqlx::query(
                "SELECT e.id, e.job_id, e.kind, e.data, e.created_at,
                        json_extract(j.spec, '$.webhook') AS webhook
                   FROM job_events e LEFT JOIN jobs j ON j.id = e.job_id
                  WHERE e.id > ? ORDER BY e.id LIMIT ?",
            )
            .bind(cursor)
            .bind(BATCH)
            .fetch_all(pool)
            .await?;
            let Some(last) = rows.last().map(|r| r.get::<i64, _>("id")) else {
                return Ok(total);
            };
            for r in &rows {
                let Some(webhook) = r.get::<Option<String>, _>("webhook") else {
                    continue;
                };
                let event_id: i64 = r.get("id");
                // The spec was validated at submission; a row that no longer
                // parses is skipped rather than blocking every later event.
                let Ok(spec) = serde_json::from_str::<WebhookSpec>(&webhook) else {
                    tracing::warn!(event_id, "job has an unreadable webhook spec; skipped");
                    continue;
                };
                let Ok(kind) = r.get::<&str, _>("kind").parse::<EventKind>() else {
                    continue;
                };
                let data = serde_json::from_str(r.get::<&str, _>("data"))
                    .unwrap_or(serde_json::Value::Null);
                let event = OutgoingEvent {
                    job_id: r.get("job_id"),
                    kind,
                    data,
                    event_id: Some(event_id),
                    at_ms: r.get("created_at"),
                };
                self.publish(&spec, event).await?;
            }
            // Only forward: two senders racing never move it back.
            sqlx::query(
                "UPDATE webhook_cursor SET last_event_id = MAX(last_event_id, ?) WHERE id = 1",
            )
            .bind(last)
            .execute(pool)
            .await?;
            total += rows.len();
            if (rows.len() as i64) < BATCH {
                return Ok(total);
            }
        }
    }
}
