//! [`Leases`] on PostgreSQL: the claim (one statement, `FOR UPDATE SKIP LOCKED`), lease
//! renewal, progress, checkpoints, the end of a run and the rescue of jobs whose worker
//! vanished.

use std::sync::Arc;
use std::time::Duration;

use sqlx::Row;
use tokio::sync::{broadcast, Notify};
use uuid::Uuid;

use super::{job_from_row, now_ms, parse_state, parse_uuid, PgStore, JOB_COLUMNS};
use crate::queue::*;

/// The claim, with the same order as SQLite's: owners take turns (fewest running jobs first,
/// then the one whose turn came least recently, `job_owner_turns`); within an owner, higher
/// priority first, then first in, first out; an owner at its running bound is skipped.
/// `SKIP LOCKED` passes over jobs another claimer is taking this instant, so claimers never
/// wait on each other; a pick that another claim committed first fails the recheck of
/// `state = 'queued'` and the next candidate is taken. Two claims for one owner that both read
/// its running count below the bound are told apart by the `jobs_claimed` trigger (migration
/// 0001), which fails the second with SQLSTATE VQ001; the claim then runs again.
fn claim_sql(filter: &str) -> String {
    format!(
        "WITH running AS ( \
             SELECT COALESCE(owner_key_id, '') AS owner, COUNT(*) AS n \
             FROM jobs WHERE state = 'running' GROUP BY 1), \
         pick AS ( \
             SELECT q.seq FROM jobs q \
             LEFT JOIN running r ON r.owner = COALESCE(q.owner_key_id, '') \
             LEFT JOIN job_owner_turns t ON t.owner = COALESCE(q.owner_key_id, '') \
             LEFT JOIN api_keys k ON k.id = q.owner_key_id \
             WHERE q.state = 'queued' AND COALESCE(q.not_before, 0) <= $4 {filter} \
               AND (COALESCE(k.max_running, $5) = 0 OR COALESCE(r.n, 0) < COALESCE(k.max_running, $5)) \
             ORDER BY COALESCE(r.n, 0), COALESCE(t.turn, 0), q.priority DESC, q.seq \
             LIMIT 1 \
             FOR UPDATE OF q SKIP LOCKED) \
         UPDATE jobs SET state = 'running', attempts = attempts + 1, \
             lease_owner = $1, lease_expires_at = $2, device = $3, \
             started_at = COALESCE(started_at, $4), updated_at = $4 \
         FROM pick WHERE jobs.seq = pick.seq AND jobs.state = 'queued' \
         RETURNING {}",
        JOB_COLUMNS
            .split(", ")
            .map(|c| format!("jobs.{}", c.trim()))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Candidates whose spec agrees with the leader's (id $6) at each JSON path, bound from $7 on.
/// SQLite's `json_extract` paths (`$.width`) are valid SQL/JSON paths as they stand.
fn alongside_filter(paths: usize) -> String {
    (0..paths)
        .map(|i| {
            let p = 7 + i;
            format!(
                "AND jsonb_path_query_first(q.spec::jsonb, ${p}::jsonpath) IS NOT DISTINCT FROM \
                 (SELECT jsonb_path_query_first(spec::jsonb, ${p}::jsonpath) FROM jobs WHERE id = $6) "
            )
        })
        .collect()
}

/// A worker row this old belongs to a dead process.
const STALE_WORKER_MS: i64 = 3_600_000;

/// How often a claim that lost the race for an owner's last running slot picks again.
const CLAIM_RETRIES: usize = 16;

fn lease_deadline(lease: Duration) -> i64 {
    now_ms() + lease.as_millis() as i64
}

fn lease_or_lost(cancel: Option<bool>, job: Uuid, worker_id: &str) -> QueueResult<Lease> {
    cancel
        .map(|cancel_requested| Lease { cancel_requested })
        .ok_or_else(|| QueueError::LeaseLost {
            job,
            worker: worker_id.to_owned(),
        })
}

/// The `jobs_claimed` trigger's refusal: another claim took the owner's last running slot.
fn is_bound_race(err: &QueueError) -> bool {
    match err {
        QueueError::Database(sqlx::Error::Database(db)) => db.code().as_deref() == Some("VQ001"),
        _ => false,
    }
}

impl PgStore {
    async fn claim_where(
        &self,
        worker_id: &str,
        device: &str,
        lease: Duration,
        alongside: Option<(Uuid, &[String])>,
    ) -> QueueResult<Option<Job>> {
        let mut tries = 0;
        loop {
            match self.claim_once(worker_id, device, lease, alongside).await {
                Err(e) if is_bound_race(&e) && tries < CLAIM_RETRIES => tries += 1,
                other => return other,
            }
        }
    }

    async fn claim_once(
        &self,
        worker_id: &str,
        device: &str,
        lease: Duration,
        alongside: Option<(Uuid, &[String])>,
    ) -> QueueResult<Option<Job>> {
        let mut tx = self.pool.begin().await?;
        if self.key_bounds.max_running > 0 {
            // The trigger's default bound for owners without one of their own.
            sqlx::query("SELECT set_config('vqclip.max_running', $1, true)")
                .bind(self.key_bounds.max_running.to_string())
                .execute(&mut *tx)
                .await?;
        }
        let now = now_ms();
        let sql = match alongside {
            Some((_, paths)) => claim_sql(&alongside_filter(paths.len())),
            None => claim_sql(""),
        };
        let mut query = sqlx::query(&sql)
            .bind(worker_id)
            .bind(now + lease.as_millis() as i64)
            .bind(device)
            .bind(now)
            .bind(self.key_bounds.max_running as i64);
        // PostgreSQL refuses parameters a statement does not use: with no paths to agree
        // on, the leader is not referenced and not bound.
        if let Some((leader, paths)) = alongside.filter(|(_, paths)| !paths.is_empty()) {
            query = query.bind(leader.to_string());
            for path in paths {
                query = query.bind(path);
            }
        }
        let row = query.fetch_optional(&mut *tx).await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let job = job_from_row(&row)?;
        let event = Self::insert_event(
            &mut tx,
            job.id,
            EventKind::State,
            &serde_json::json!({
                "state": "running",
                "attempt": job.attempts,
                "device": device,
                "resumed_from": job.checkpoint.as_ref().map(|_| job.checkpoint_step),
            }),
        )
        .await?;
        tx.commit().await?;
        self.notify(&event);
        Ok(Some(job))
    }

    /// Back to the queue after a transient failure, claimable again after `after`;
    /// failed instead once the job has used its attempts.
    async fn retry(
        &self,
        job: Uuid,
        worker_id: &str,
        error: String,
        after: Duration,
    ) -> QueueResult<Job> {
        let mut tx = self.pool.begin().await?;
        let now = now_ms();
        let sql = format!(
            "UPDATE jobs SET \
               state = CASE WHEN attempts >= max_attempts THEN 'failed' ELSE 'queued' END, \
               finished_at = CASE WHEN attempts >= max_attempts THEN $1 ELSE NULL END, \
               not_before = $2, error = $3, updated_at = $1, \
               lease_owner = NULL, lease_expires_at = NULL, eta_seconds = NULL \
             WHERE id = $4 AND state = 'running' AND lease_owner = $5 RETURNING {JOB_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(now)
            .bind(now + after.as_millis() as i64)
            .bind(&error)
            .bind(job.to_string())
            .bind(worker_id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| QueueError::LeaseLost {
                job,
                worker: worker_id.to_owned(),
            })?;
        let updated = job_from_row(&row)?;
        let (kind, data) = if updated.state == JobState::Failed {
            (
                EventKind::Failed,
                serde_json::json!({ "state": "failed", "error": error }),
            )
        } else {
            (
                EventKind::State,
                serde_json::json!({
                    "state": "queued",
                    "reason": error,
                    "retry_in_seconds": after.as_secs_f64(),
                    "attempt": updated.attempts,
                    "max_attempts": updated.max_attempts,
                }),
            )
        };
        let event = Self::insert_event(&mut tx, job, kind, &data).await?;
        tx.commit().await?;
        self.notify(&event);
        Ok(updated)
    }
}

impl Leases for PgStore {
    fn claim<'a>(
        &'a self,
        worker_id: &'a str,
        device: &'a str,
        lease: Duration,
    ) -> QueueFuture<'a, Option<Job>> {
        Box::pin(self.claim_where(worker_id, device, lease, None))
    }

    fn claim_alongside<'a>(
        &'a self,
        worker_id: &'a str,
        device: &'a str,
        lease: Duration,
        leader: Uuid,
        same: &'a [String],
    ) -> QueueFuture<'a, Option<Job>> {
        Box::pin(self.claim_where(worker_id, device, lease, Some((leader, same))))
    }

    fn job_queued(&self) -> Arc<Notify> {
        self.queued.clone()
    }

    fn renew<'a>(
        &'a self,
        job: Uuid,
        worker_id: &'a str,
        lease: Duration,
    ) -> QueueFuture<'a, Lease> {
        Box::pin(async move {
            let cancel: Option<bool> = sqlx::query_scalar(
                "UPDATE jobs SET lease_expires_at = $1 WHERE id = $2 AND state = 'running' \
                 AND lease_owner = $3 RETURNING cancel_requested",
            )
            .bind(lease_deadline(lease))
            .bind(job.to_string())
            .bind(worker_id)
            .fetch_optional(&self.pool)
            .await?;
            lease_or_lost(cancel, job, worker_id)
        })
    }

    fn progress<'a>(
        &'a self,
        job: Uuid,
        worker_id: &'a str,
        p: Progress,
        data: serde_json::Value,
    ) -> QueueFuture<'a, Lease> {
        Box::pin(async move {
            let mut tx = self.pool.begin().await?;
            let cancel: Option<bool> = sqlx::query_scalar(
                "UPDATE jobs SET step = $1, total = $2, loss = $3, eta_seconds = $4, updated_at = $5 \
                 WHERE id = $6 AND state = 'running' AND lease_owner = $7 RETURNING cancel_requested",
            )
            .bind(p.step as i64)
            .bind(p.total as i64)
            .bind(p.loss)
            .bind(p.eta_seconds)
            .bind(now_ms())
            .bind(job.to_string())
            .bind(worker_id)
            .fetch_optional(&mut *tx)
            .await?;
            let lease = lease_or_lost(cancel, job, worker_id)?;
            let event = Self::insert_event(&mut tx, job, EventKind::Progress, &data).await?;
            tx.commit().await?;
            self.notify(&event);
            Ok(lease)
        })
    }

    fn set_checkpoint<'a>(
        &'a self,
        job: Uuid,
        worker_id: &'a str,
        checkpoint: &'a str,
        step: u32,
    ) -> QueueFuture<'a, ()> {
        Box::pin(async move {
            let done = sqlx::query(
                "UPDATE jobs SET checkpoint = $1, checkpoint_step = $2 \
                 WHERE id = $3 AND state = 'running' AND lease_owner = $4",
            )
            .bind(checkpoint)
            .bind(step as i64)
            .bind(job.to_string())
            .bind(worker_id)
            .execute(&self.pool)
            .await?;
            lease_or_lost((done.rows_affected() > 0).then_some(false), job, worker_id).map(|_| ())
        })
    }

    fn finish<'a>(&'a self, job: Uuid, worker_id: &'a str, finish: Finish) -> QueueFuture<'a, Job> {
        Box::pin(async move {
            let (state, kind, error, data) = match finish {
                Finish::Retry { error, after } => {
                    return self.retry(job, worker_id, error, after).await
                }
                Finish::Succeeded { data } => {
                    (JobState::Succeeded, EventKind::Completed, None, data)
                }
                Finish::Failed { error } => (
                    JobState::Failed,
                    EventKind::Failed,
                    Some(error.clone()),
                    serde_json::json!({ "state": "failed", "error": error }),
                ),
                Finish::Canceled { step } => (
                    JobState::Canceled,
                    EventKind::Canceled,
                    None,
                    serde_json::json!({ "state": "canceled", "step": step }),
                ),
            };
            let mut tx = self.pool.begin().await?;
            let now = now_ms();
            let sql = format!(
                "UPDATE jobs SET state = $1, error = $2, finished_at = $3, updated_at = $3, \
                 lease_owner = NULL, lease_expires_at = NULL, eta_seconds = NULL, \
                 step = CASE WHEN $1 = 'succeeded' THEN total ELSE step END \
                 WHERE id = $4 AND state = 'running' AND lease_owner = $5 RETURNING {JOB_COLUMNS}"
            );
            let row = sqlx::query(&sql)
                .bind(state.as_str())
                .bind(&error)
                .bind(now)
                .bind(job.to_string())
                .bind(worker_id)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or_else(|| QueueError::LeaseLost {
                    job,
                    worker: worker_id.to_owned(),
                })?;
            let event = Self::insert_event(&mut tx, job, kind, &data).await?;
            tx.commit().await?;
            self.notify(&event);
            job_from_row(&row)
        })
    }

    fn release<'a>(&'a self, job: Uuid, worker_id: &'a str) -> QueueFuture<'a, ()> {
        Box::pin(async move {
            let mut tx = self.pool.begin().await?;
            let step: Option<i64> = sqlx::query_scalar(
                "UPDATE jobs SET state = 'queued', attempts = GREATEST(attempts - 1, 0), \
                 lease_owner = NULL, lease_expires_at = NULL, eta_seconds = NULL, updated_at = $1 \
                 WHERE id = $2 AND state = 'running' AND lease_owner = $3 RETURNING step",
            )
            .bind(now_ms())
            .bind(job.to_string())
            .bind(worker_id)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(step) = step else {
                return Err(QueueError::LeaseLost {
                    job,
                    worker: worker_id.to_owned(),
                });
            };
            let event = Self::insert_event(
                &mut tx,
                job,
                EventKind::State,
                &serde_json::json!({ "state": "queued", "reason": "worker shut down", "step": step }),
            )
            .await?;
            tx.commit().await?;
            self.notify(&event);
            self.queued.notify_waiters();
            Ok(())
        })
    }

    fn rescue_expired(&self) -> QueueFuture<'_, Vec<Rescued>> {
        Box::pin(async move {
            let mut tx = self.pool.begin().await?;
            let now = now_ms();
            // SKIP LOCKED: a job whose row another node is rescuing (or whose worker is
            // finishing it) this instant is left to that transaction.
            let rows = sqlx::query(
                "WITH expired AS ( \
                     SELECT seq FROM jobs WHERE state = 'running' AND lease_expires_at < $1 \
                     ORDER BY seq FOR UPDATE SKIP LOCKED) \
                 UPDATE jobs SET \
                   state = CASE WHEN cancel_requested THEN 'canceled' \
                                WHEN attempts >= max_attempts THEN 'failed' ELSE 'queued' END, \
                   error = CASE WHEN NOT cancel_requested AND attempts >= max_attempts \
                                THEN 'its worker stopped responding ' || attempts || ' times (lease expired)' \
                                ELSE error END, \
                   finished_at = CASE WHEN cancel_requested OR attempts >= max_attempts THEN $1 ELSE NULL END, \
                   lease_owner = NULL, lease_expires_at = NULL, eta_seconds = NULL, updated_at = $1 \
                 FROM expired WHERE jobs.seq = expired.seq AND jobs.state = 'running' \
                 RETURNING jobs.id, jobs.state, jobs.attempts, jobs.step, jobs.error",
            )
            .bind(now)
            .fetch_all(&mut *tx)
            .await?;
            let mut rescued = Vec::with_capacity(rows.len());
            let mut events = Vec::with_capacity(rows.len());
            for row in rows {
                let id = parse_uuid(&row.try_get::<String, _>("id")?)?;
                let state = parse_state(&row.try_get::<String, _>("state")?)?;
                let attempts: i64 = row.try_get("attempts")?;
                let step: i64 = row.try_get("step")?;
                let (kind, data) = match state {
                    JobState::Queued => (
                        EventKind::State,
                        serde_json::json!({ "state": "queued", "reason": "worker lost; requeued", "step": step }),
                    ),
                    JobState::Canceled => (
                        EventKind::Canceled,
                        serde_json::json!({ "state": "canceled", "step": step }),
                    ),
                    _ => (
                        EventKind::Failed,
                        serde_json::json!({ "state": "failed", "error": row.try_get::<Option<String>, _>("error")? }),
                    ),
                };
                events.push(Self::insert_event(&mut tx, id, kind, &data).await?);
                rescued.push(Rescued {
                    job_id: id,
                    state,
                    attempts: attempts as u32,
                });
            }
            // Workers that vanished without saying goodbye (SIGKILL) leave rows behind.
            sqlx::query("DELETE FROM workers WHERE heartbeat_at < $1")
                .bind(now - STALE_WORKER_MS)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            for event in &events {
                self.notify(event);
            }
            if rescued.iter().any(|r| r.state == JobState::Queued) {
                self.queued.notify_waiters();
            }
            Ok(rescued)
        })
    }

    fn cancellations(&self) -> broadcast::Receiver<Uuid> {
        self.cancels.subscribe()
    }

    fn cancel_requested(&self, id: Uuid) -> QueueFuture<'_, bool> {
        Box::pin(async move {
            let flag: Option<bool> =
                sqlx::query_scalar("SELECT cancel_requested FROM jobs WHERE id = $1")
                    .bind(id.to_string())
                    .fetch_optional(&self.pool)
                    .await?;
            Ok(flag.unwrap_or(false))
        })
    }
}
