//! [`Deliveries`] on PostgreSQL: events reach the senders through `webhook_outbox`, filled
//! in each event's own transaction (migration 0003), so no node can read past an event that
//! commits late; delivery claims lock their rows with `FOR UPDATE SKIP LOCKED`.

use sqlx::Row;

use super::{attempt_from_row, claimed_from_row, delivery_from_row, PgStore};
use crate::queue::*;

impl Deliveries for PgStore {
    fn unbridged_events(&self, limit: u32) -> QueueFuture<'_, HookEvents> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT o.job_id, o.event_id, e.kind, e.data, e.created_at,
                        (j.spec::jsonb -> 'webhook')::text AS webhook
                   FROM webhook_outbox o
                   JOIN job_events e ON e.job_id = o.job_id AND e.id = o.event_id
                   JOIN jobs j ON j.id = o.job_id
                  ORDER BY o.gid LIMIT $1",
            )
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
            let events = rows
                .iter()
                .map(|r| -> QueueResult<_> {
                    Ok(HookEvent {
                        job_id: r.try_get("job_id")?,
                        event_id: r.try_get("event_id")?,
                        kind: r.try_get("kind")?,
                        data: r.try_get("data")?,
                        created_at_ms: r.try_get("created_at")?,
                        webhook: r.try_get("webhook")?,
                    })
                })
                .collect::<QueueResult<Vec<_>>>()?;
            Ok(HookEvents {
                read: events.len(),
                events,
                through: 0,
            })
        })
    }

    fn bridged<'a>(&'a self, events: &'a HookEvents) -> QueueFuture<'a, ()> {
        Box::pin(async move {
            let (jobs, ids): (Vec<String>, Vec<i64>) = events
                .events
                .iter()
                .map(|e| (e.job_id.clone(), e.event_id))
                .unzip();
            sqlx::query(
                "DELETE FROM webhook_outbox
                  WHERE (job_id, event_id) IN (SELECT * FROM UNNEST($1::text[], $2::bigint[]))",
            )
            .bind(jobs)
            .bind(ids)
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
            let mut tx = self.pool.begin().await?;
            if throttle_ms.is_some() {
                // Two nodes throttling one job's progress would each see no recent delivery
                // (READ COMMITTED); the job's lock makes the second see the first.
                sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
                    .bind(d.job_id)
                    .execute(&mut *tx)
                    .await?;
            }
            let inserted = sqlx::query(
                "INSERT INTO webhook_deliveries
                     (id, job_id, event, event_id, url, payload, status, attempts,
                      created_at, next_attempt_at, updated_at)
                 SELECT $1, $2, $3, $4, $5, $6, 'pending', 0, $7, $8, $8
                  WHERE $9::BIGINT IS NULL OR NOT EXISTS (
                        SELECT 1 FROM webhook_deliveries
                         WHERE job_id = $2 AND event = 'progress' AND created_at > $7 - $9)
                 ON CONFLICT DO NOTHING",
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
            .execute(&mut *tx)
            .await?
            .rows_affected();
            tx.commit().await?;
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
                    SET claimed_by = $1, lease_until = $2, updated_at = $3
                  WHERE id IN (
                        SELECT d.id FROM webhook_deliveries d
                         WHERE d.status = 'pending' AND d.next_attempt_at <= $3
                           AND (d.lease_until IS NULL OR d.lease_until <= $3)
                           AND NOT EXISTS (
                               SELECT 1 FROM webhook_deliveries p
                                WHERE p.job_id = d.job_id AND p.status = 'pending'
                                  AND p.lease_until > $3 AND p.created_at <= d.created_at)
                         ORDER BY d.next_attempt_at, d.created_at, d.id
                         LIMIT $4
                         FOR UPDATE SKIP LOCKED)
              RETURNING id, job_id, url, payload, attempts, created_at",
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
                    Ok((r.try_get::<i64, _>("created_at")?, claimed_from_row(r)?))
                })
                .collect::<QueueResult<Vec<_>>>()?;
            // RETURNING has no order; ids are time-ordered (UUIDv7) within one millisecond.
            claimed.sort_by(|(a, x), (b, y)| (a, &x.id).cmp(&(b, &y.id)));
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
            let mut tx = self.pool.begin().await?;
            let held = sqlx::query(
                "UPDATE webhook_deliveries
                    SET status = $1, attempts = $2, next_attempt_at = $3, updated_at = $4,
                        claimed_by = NULL, lease_until = NULL
                  WHERE id = $5 AND claimed_by = $6",
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
                 VALUES ($1, $2, $3, $4, $5, $6)",
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
                "SELECT MIN(GREATEST(next_attempt_at, COALESCE(lease_until, 0)))
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
                   FROM webhook_deliveries WHERE job_id = $1 ORDER BY created_at, id",
            )
            .bind(job_id)
            .fetch_all(&self.pool)
            .await?;
            let attempts = sqlx::query(
                "SELECT a.delivery_id, a.attempt, a.at, a.status_code, a.error, a.duration_ms
                   FROM webhook_attempts a JOIN webhook_deliveries d ON d.id = a.delivery_id
                  WHERE d.job_id = $1 ORDER BY a.delivery_id, a.attempt",
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
