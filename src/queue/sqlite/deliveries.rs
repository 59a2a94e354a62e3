//! [`Deliveries`] on SQLite: the sender tails `job_events` with a persisted cursor. Writers
//! are serialised here, so event ids grow in commit order and a cursor never skips one.

use sqlx::Row;

use super::{attempt_from_row, claimed_from_row, delivery_from_row, SqliteStore};
use crate::queue::*;

impl Deliveries for SqliteStore {
    fn unbridged_events(&self, limit: u32) -> QueueFuture<'_, HookEvents> {
        Box::pin(async move {
            let cursor: i64 =
                sqlx::query_scalar("SELECT last_event_id FROM webhook_cursor WHERE id = 1")
                    .fetch_one(&self.pool)
                    .await?;
            let rows = sqlx::query(
                "SELECT e.id, e.job_id, e.kind, e.data, e.created_at,
                        json_extract(j.spec, '$.webhook') AS webhook
                   FROM job_events e LEFT JOIN jobs j ON j.id = e.job_id
                  WHERE e.id > ? ORDER BY e.id LIMIT ?",
            )
            .bind(cursor)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
            let mut out = HookEvents {
                read: rows.len(),
                through: cursor,
                events: Vec::new(),
            };
            for r in rows {
                out.through = r.try_get("id")?;
                let Some(webhook) = r.try_get::<Option<String>, _>("webhook")? else {
                    continue;
                };
                out.events.push(HookEvent {
                    job_id: r.try_get("job_id")?,
                    event_id: out.through,
                    kind: r.try_get("kind")?,
                    data: r.try_get("data")?,
                    created_at_ms: r.try_get("created_at")?,
                    webhook: Some(webhook),
                });
            }
            Ok(out)
        })
    }

    fn bridged<'a>(&'a self, events: &'a HookEvents) -> QueueFuture<'a, ()> {
        Box::pin(async move {
            // Only forward: two senders racing never move it back.
            sqlx::query(
                "UPDATE webhook_cursor SET last_event_id = MAX(last_event_id, ?) WHERE id = 1",
            )
            .bind(events.through)
            .execute(&self.pool)
            .await?;
            Ok(())
        })
    }

    fn insert_delivery<'a>(
        &'a self,
        d: &'a NewDelivery<'a>,
        throttle_ms: Option<i64>,
        now_ms: i64,
    ) -> QueueFuture<'a, bool> {
        Box::pin(async move {
            let inserted = sqlx::query(
                "INSERT OR IGNORE INTO webhook_deliveries
                     (id, job_id, event, event_id, url, payload, status, attempts,
                      created_at, next_attempt_at, updated_at)
                 SELECT ?1, ?2, ?3, ?4, ?5, ?6, 'pending', 0, ?7, ?8, ?8
                  WHERE ?9 IS NULL OR NOT EXISTS (
                        SELECT 1 FROM webhook_deliveries
                         WHERE job_id = ?2 AND event = 'progress' AND created_at > ?7 - ?9)",
            )
            .bind(d.id)
            .bind(d.job_id)
            .bind(d.event)
            .bind(d.event_id)
            .bind(d.url)
            .bind(d.payload)
            .bind(d.at_ms)
            .bind(now_ms)
            .bind(throttle_ms)
            .execute(&self.pool)
            .await?
            .rows_affected();
            Ok(inserted == 1)
        })
    }

    fn claim_deliveries<'a>(
        &'a self,
        sender: &'a str,
        now_ms: i64,
        lease_until_ms: i64,
        limit: u32,
    ) -> QueueFuture<'a, Vec<ClaimedDelivery>> {
        Box::pin(async move {
            // A job's later delivery waits while another sender holds an earlier one, so a
            // receiver sees `running` before `completed`.
            let rows = sqlx::query(
                "UPDATE webhook_deliveries
                    SET claimed_by = ?1, lease_until = ?2, updated_at = ?3
                  WHERE id IN (
                        SELECT d.id FROM webhook_deliveries d
                         WHERE d.status = 'pending' AND d.next_attempt_at <= ?3
                           AND (d.lease_until IS NULL OR d.lease_until <= ?3)
                           AND NOT EXISTS (
                               SELECT 1 FROM webhook_deliveries p
                                WHERE p.job_id = d.job_id AND p.status = 'pending'
                                  AND p.lease_until > ?3 AND p.created_at <= d.created_at)
                         ORDER BY d.next_attempt_at, d.created_at, d.rowid
                         LIMIT ?4)
              RETURNING id, job_id, url, payload, attempts, created_at, rowid AS seq",
            )
            .bind(sender)
            .bind(lease_until_ms)
            .bind(now_ms)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
            let mut claimed = rows
                .iter()
                .map(|r| -> QueueResult<_> {
                    let order: (i64, i64) = (r.try_get("created_at")?, r.try_get("seq")?);
                    Ok((order, claimed_from_row(r)?))
                })
                .collect::<QueueResult<Vec<_>>>()?;
            // RETURNING has no order; the sender wants each job's events in order.
            claimed.sort_by_key(|(order, _)| *order);
            Ok(claimed.into_iter().map(|(_, c)| c).collect())
        })
    }

    fn record_attempt<'a>(
        &'a self,
        id: &'a str,
        sender: &'a str,
        a: &'a AttemptRecord<'a>,
    ) -> QueueFuture<'a, bool> {
        Box::pin(async move {
            let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
            let held = sqlx::query(
                "UPDATE webhook_deliveries
                    SET status = ?, attempts = ?, next_attempt_at = ?, updated_at = ?,
                        claimed_by = NULL, lease_until = NULL
                  WHERE id = ? AND claimed_by = ?",
            )
            .bind(a.next.as_str())
            .bind(i64::from(a.attempt))
            .bind(a.next_attempt_at_ms)
            .bind(a.at_ms)
            .bind(id)
            .bind(sender)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if held == 0 {
                return Ok(false);
            }
            sqlx::query(
                "INSERT INTO webhook_attempts (delivery_id, attempt, at, status_code, error, duration_ms)
                 VALUES (?, ?, ?, ?, ?, ?)",
            )
            .bind(id)
            .bind(i64::from(a.attempt))
            .bind(a.at_ms)
            .bind(a.status_code.map(i64::from))
            .bind(a.error)
            .bind(a.duration_ms as i64)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(true)
        })
    }

    fn next_delivery_due(&self) -> QueueFuture<'_, Option<i64>> {
        Box::pin(async move {
            Ok(sqlx::query_scalar(
                "SELECT MIN(MAX(next_attempt_at, COALESCE(lease_until, 0)))
                   FROM webhook_deliveries WHERE status = 'pending'",
            )
            .fetch_one(&self.pool)
            .await?)
        })
    }

    fn deliveries_for_job<'a>(&'a self, job_id: &'a str) -> QueueFuture<'a, Vec<Delivery>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT id, job_id, event, url, payload, status, created_at, next_attempt_at
                   FROM webhook_deliveries WHERE job_id = ? ORDER BY created_at, rowid",
            )
            .bind(job_id)
            .fetch_all(&self.pool)
            .await?;
            let attempts = sqlx::query(
                "SELECT a.delivery_id, a.attempt, a.at, a.status_code, a.error, a.duration_ms
                   FROM webhook_attempts a JOIN webhook_deliveries d ON d.id = a.delivery_id
                  WHERE d.job_id = ? ORDER BY a.delivery_id, a.attempt",
            )
            .bind(job_id)
            .fetch_all(&self.pool)
            .await?;
            let mut out = rows
                .iter()
                .map(delivery_from_row)
                .collect::<QueueResult<Vec<_>>>()?;
            for a in &attempts {
                let (delivery, attempt) = attempt_from_row(a)?;
                attach_attempt(&mut out, &delivery, attempt);
            }
            Ok(out)
        })
    }
}
