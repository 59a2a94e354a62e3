//! From job events to deliveries: the sender reads the job events its store has not yet
//! bridged (a persisted cursor on SQLite, an outbox filled in each event's transaction on
//! PostgreSQL).
//!
//! Reading the table rather than listening to an in-process channel is what
//! makes webhooks survive restarts and work for workers in other processes
//! (`vqclip worker`): an event committed by anyone is seen by the server's
//! sender, and a crash between the event and its delivery row loses nothing,
//! because an event is marked bridged only after its deliveries are written,
//! and each event is delivered at most once (a delivery is unique per event),
//! however many API nodes read it.

use super::engine::OutgoingEvent;
use super::{EventKind, WebhookEngine, WebhookError, WebhookSpec};

/// Events read per pass.
const BATCH: u32 = 500;

impl WebhookEngine {
    /// Turns the job events committed since the last pass into deliveries.
    /// Returns how many events were read.
    pub async fn pump_events(&self) -> Result<usize, WebhookError> {
        let mut total = 0;
        loop {
            let batch = self.store.unbridged_events(BATCH).await?;
            if batch.read == 0 {
                return Ok(total);
            }
            for e in &batch.events {
                let Some(webhook) = &e.webhook else {
                    continue;
                };
                // The spec was validated at submission; a row that no longer
                // parses is skipped rather than blocking every later event.
                let Ok(spec) = serde_json::from_str::<WebhookSpec>(webhook) else {
                    tracing::warn!(job = %e.job_id, event_id = e.event_id, "job has an unreadable webhook spec; skipped");
                    continue;
                };
                let Ok(kind) = e.kind.parse::<EventKind>() else {
                    continue;
                };
                let event = OutgoingEvent {
                    job_id: e.job_id.clone(),
                    kind,
                    data: serde_json::from_str(&e.data).unwrap_or(serde_json::Value::Null),
                    event_id: Some(e.event_id),
                    at_ms: e.created_at_ms,
                };
                self.publish(&spec, event).await?;
            }
            self.store.bridged(&batch).await?;
            total += batch.read;
            if batch.read < BATCH as usize {
                return Ok(total);
            }
        }
    }
}
