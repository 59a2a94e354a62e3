//! [`Jobs`] on SQLite: submission (with the queue bounds and idempotency keys checked in
//! the insert's transaction), reads, cancel, deletion and retention.

use chrono::{DateTime, Utc};
use sqlx::Row;
use uuid::Uuid;

use super::{
    job_from_row, now_ms, parse_state, scoped_job_in, SqliteStore, JOB_COLUMNS, SCOPE_SQL,
};
use crate::queue::*;

impl SqliteStore {
    /// Submission, and a fork's submission with its link to the parent in the same
    /// transaction.
    pub(super) fn submit_linked(
        &self,
        new: NewJob,
        max_queued: u64,
        parent: Option<ForkLink>,
    ) -> QueueFuture<'_, Submitted> {
        Box::pin(async move {
            let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
            if let Some(key) = &new.idempotency_key {
                let sql = format!(
                    "SELECT {JOB_COLUMNS}, request_hash FROM jobs \
                     WHERE COALESCE(owner_key_id, '') = COALESCE(?, '') AND idempotency_key = ?"
                );
                let row = sqlx::query(&sql)
                    .bind(&new.owner_key_id)
                    .bind(key)
                    .fetch_optional(&mut *tx)
                    .await?;
                if let Some(row) = row {
                    let hash: Option<String> = row.try_get("request_hash")?;
                    if hash.as_deref() != Some(new.request_hash.as_str()) {
                        return Err(QueueError::IdempotencyMismatch { key: key.clone() });
                    }
                    return Ok(Submitted::Existing(job_from_row(&row)?));
                }
            }
            let queued: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM jobs WHERE state = 'queued'")
                    .fetch_one(&mut *tx)
                    .await?;
            if queued as u64 >= max_queued {
                return Err(QueueError::QueueFull {
                    queued: queued as u64,
                    limit: max_queued,
                });
            }
            if let Some(owner) = &new.owner_key_id {
                // Checked in the same transaction as the insert, so concurrent
                // submissions of one key cannot overshoot its bound.
                let (owned, limit): (i64, i64) = sqlx::query_as(
                    "SELECT (SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND owner_key_id = ?1), \
                            COALESCE((SELECT max_queued FROM api_keys WHERE id = ?1), ?2)",
                )
                .bind(owner)
                .bind(self.key_bounds.max_queued as i64)
                .fetch_one(&mut *tx)
                .await?;
                if limit > 0 && owned >= limit {
                    return Err(QueueError::KeyQueueFull {
                        queued: owned as u64,
                        limit: limit as u64,
                    });
                }
            }
            let id = Uuid::now_v7();
            let now = now_ms();
            let sql = format!(
                "INSERT INTO jobs (id, state, priority, spec, owner_key_id, idempotency_key, request_hash, \
                 keep, max_attempts, total, warnings, seed, created_at, updated_at) \
                 VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING {JOB_COLUMNS}"
            );
            let row = sqlx::query(&sql)
                .bind(id.to_string())
                .bind(new.priority)
                .bind(new.spec.to_string())
                .bind(&new.owner_key_id)
                .bind(&new.idempotency_key)
                .bind(&new.request_hash)
                .bind(new.keep)
                .bind(new.max_attempts as i64)
                .bind(new.total_steps as i64)
                .bind(serde_json::to_string(&new.warnings).unwrap_or_else(|_| "[]".into()))
                // SQLite integers are signed; a seed above i64::MAX keeps its bits.
                .bind(new.seed.map(|s| s as i64))
                .bind(now)
                .bind(now)
                .fetch_one(&mut *tx)
                .await?;
            let job = job_from_row(&row)?;
            if let Some(parent) = parent {
                sqlx::query("INSERT INTO job_forks (child_id, parent_id, step) VALUES (?, ?, ?)")
                    .bind(id.to_string())
                    .bind(parent.job.to_string())
                    .bind(i64::from(parent.step))
                    .execute(&mut *tx)
                    .await?;
            }
            let event = Self::insert_event(
                &mut *tx,
                id,
                EventKind::State,
                &serde_json::json!({ "state": "queued" }),
            )
            .await?;
            tx.commit().await?;
            self.notify(&event);
            self.queued.notify_waiters();
            Ok(Submitted::Created(job))
        })
    }
}

impl Jobs for SqliteStore {
    fn submit(&self, new: NewJob, max_queued: u64) -> QueueFuture<'_, Submitted> {
        self.submit_linked(new, max_queued, None)
    }

    fn get<'a>(&'a self, id: Uuid, scope: &'a Scope) -> QueueFuture<'a, Job> {
        Box::pin(async move {
            let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE {SCOPE_SQL} AND id = ?3");
            let row = sqlx::query(&sql)
                .bind(scope.all)
                .bind(&scope.owner_key_id)
                .bind(id.to_string())
                .fetch_optional(&self.pool)
                .await?
                .ok_or(QueueError::NotFound(id))?;
            job_from_row(&row)
        })
    }

    fn list<'a>(&'a self, q: &'a ListQuery, scope: &'a Scope) -> QueueFuture<'a, Page> {
        Box::pin(async move {
            let limit = q.limit.clamp(1, 1000);
            // Positions come from the same statement (one snapshot) as the rows: a job
            // listed as queued always has one, and a page costs one query, not one per row.
            // The window counts as `position_impl` does: within the owner, by priority, then seq.
            let sql = format!(
                "WITH queue AS ( \
                     SELECT seq AS qseq, ROW_NUMBER() OVER ( \
                         PARTITION BY COALESCE(owner_key_id, '') ORDER BY priority DESC, seq) AS position \
                     FROM jobs WHERE state = 'queued') \
                 SELECT {JOB_COLUMNS}, queue.position FROM jobs \
                 LEFT JOIN queue ON queue.qseq = jobs.seq \
                 WHERE {SCOPE_SQL} \
                 AND (?3 IS NULL OR state = ?3) AND (?4 IS NULL OR seq < ?4) \
                 ORDER BY seq DESC LIMIT ?5"
            );
            let rows = sqlx::query(&sql)
                .bind(scope.all)
                .bind(&scope.owner_key_id)
                .bind(q.state.map(JobState::as_str))
                .bind(q.before)
                .bind(limit as i64 + 1)
                .fetch_all(&self.pool)
                .await?;
            let mut jobs = rows
                .iter()
                .map(job_from_row)
                .collect::<QueueResult<Vec<_>>>()?;
            let mut positions = rows
                .iter()
                .map(|r| Ok(r.try_get::<Option<i64>, _>("position")?.map(|p| p as u64)))
                .collect::<QueueResult<Vec<_>>>()?;
            let next_cursor = if jobs.len() > limit as usize {
                jobs.truncate(limit as usize);
                positions.truncate(limit as usize);
                jobs.last().map(|j| j.seq)
            } else {
                None
            };
            Ok(Page {
                jobs,
                next_cursor,
                positions,
            })
        })
    }

    fn position<'a>(&'a self, job: &'a Job) -> QueueFuture<'a, Option<u64>> {
        Box::pin(async move {
            // Counted for the job as the caller read it, so a job shown as queued always
            // has a position (even if a worker took it a moment later).
            if job.state != JobState::Queued {
                return Ok(None);
            }
            // Among the owner's own jobs: owners take turns, and another key's
            // backlog is none of this caller's business.
            let ahead: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND owner_key_id IS ?1 \
                   AND (priority > ?2 OR (priority = ?2 AND seq < ?3))",
            )
            .bind(&job.owner_key_id)
            .bind(job.priority)
            .bind(job.seq)
            .fetch_one(&self.pool)
            .await?;
            Ok(Some(ahead as u64 + 1))
        })
    }

    fn cancel<'a>(&'a self, id: Uuid, scope: &'a Scope) -> QueueFuture<'a, CancelOutcome> {
        Box::pin(async move {
            let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
            let job = scoped_job_in(&mut tx, id, scope).await?;
            let now = now_ms();
            let sql = format!(
                "UPDATE jobs SET state = 'canceled', cancel_requested = 1, finished_at = ?1, updated_at = ?1 \
                 WHERE id = ?2 RETURNING {JOB_COLUMNS}"
            );
            match job.state {
                JobState::Queued => {
                    let row = sqlx::query(&sql)
                        .bind(now)
                        .bind(id.to_string())
                        .fetch_one(&mut *tx)
                        .await?;
                    let event = Self::insert_event(
                        &mut *tx,
                        id,
                        EventKind::Canceled,
                        &serde_json::json!({ "state": "canceled", "step": 0 }),
                    )
                    .await?;
                    tx.commit().await?;
                    self.notify(&event);
                    Ok(CancelOutcome::Canceled(job_from_row(&row)?))
                }
                JobState::Running => {
                    let sql = format!(
                        "UPDATE jobs SET cancel_requested = 1, updated_at = ?1 WHERE id = ?2 RETURNING {JOB_COLUMNS}"
                    );
                    let row = sqlx::query(&sql)
                        .bind(now)
                        .bind(id.to_string())
                        .fetch_one(&mut *tx)
                        .await?;
                    tx.commit().await?;
                    let _ = self.cancels.send(id);
                    Ok(CancelOutcome::Requested(job_from_row(&row)?))
                }
                JobState::Canceled => Ok(CancelOutcome::AlreadyCanceled(job)),
                state @ (JobState::Succeeded | JobState::Failed) => Err(QueueError::Conflict {
                    id,
                    state,
                    detail: "a finished job cannot be canceled; DELETE it to remove it",
                }),
            }
        })
    }

    fn delete<'a>(&'a self, id: Uuid, scope: &'a Scope) -> QueueFuture<'a, Job> {
        Box::pin(async move {
            let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
            let job = scoped_job_in(&mut tx, id, scope).await?;
            if !job.state.is_terminal() {
                return Err(QueueError::Conflict {
                    id,
                    state: job.state,
                    detail: "only finished jobs can be deleted; cancel it first",
                });
            }
            sqlx::query("DELETE FROM jobs WHERE id = ?")
                .bind(id.to_string())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(job)
        })
    }

    fn prune_finished_before(&self, cutoff: DateTime<Utc>) -> QueueFuture<'_, Vec<Uuid>> {
        Box::pin(async move {
            let ids: Vec<String> = sqlx::query_scalar(
                "DELETE FROM jobs WHERE state IN ('succeeded', 'failed', 'canceled') \
                 AND keep = 0 AND finished_at IS NOT NULL AND finished_at < ? RETURNING id",
            )
            .bind(cutoff.timestamp_millis())
            .fetch_all(&self.pool)
            .await?;
            ids.iter()
                .map(|id| {
                    Uuid::parse_str(id)
                        .map_err(|e| QueueError::Corrupt(format!("job id {id}: {e}")))
                })
                .collect()
        })
    }

    fn counts_by_state(&self) -> QueueFuture<'_, Vec<(JobState, u64)>> {
        Box::pin(async move {
            let rows = sqlx::query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
                .fetch_all(&self.pool)
                .await?;
            let mut counts: Vec<(JobState, u64)> = JobState::ALL.iter().map(|s| (*s, 0)).collect();
            for row in rows {
                let state = parse_state(&row.try_get::<String, _>("state")?)?;
                let n: i64 = row.try_get("n")?;
                if let Some(c) = counts.iter_mut().find(|(s, _)| *s == state) {
                    c.1 = n as u64;
                }
            }
            Ok(counts)
        })
    }

    fn ping(&self) -> QueueFuture<'_, ()> {
        Box::pin(async move {
            sqlx::query("SELECT 1").execute(&self.pool).await?;
            Ok(())
        })
    }
}
