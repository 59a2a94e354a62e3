//! [`JobStore`] on SQLite (WAL, busy timeout). Multi-statement writes open with
//! `BEGIN IMMEDIATE` so that two writers queue on the lock instead of failing to upgrade.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::Row;
use tokio::sync::{broadcast, Notify};
use uuid::Uuid;

use super::*;

const JOB_COLUMNS: &str = "seq, id, state, priority, spec, owner_key_id, idempotency_key, keep, \
    attempts, max_attempts, lease_owner, lease_expires_at, cancel_requested, device, seed, step, \
    total, loss, eta_seconds, checkpoint, checkpoint_step, error, warnings, created_at, started_at, finished_at, \
    updated_at";

/// The claim: one atomic statement picks and takes the best queued job.
/// Owners (API keys; '' for jobs without one) take turns: the owner with the
/// fewest running jobs first, then the one whose turn came least recently
/// (`job_owner_turns`, kept by a trigger, migration 0004); within an owner,
/// higher priority first, then first in, first out. An owner at its running
/// bound (`api_keys.max_running`, else ?5; 0 is none) is skipped.
/// `filter` narrows the candidates further (batch packing, [`alongside_filter`]).
fn claim_sql(filter: &str) -> String {
    format!(
        "UPDATE jobs SET state = 'running', attempts = attempts + 1, \
    lease_owner = ?1, lease_expires_at = ?2, device = ?3, \
    started_at = COALESCE(started_at, ?4), updated_at = ?4 \
    WHERE seq = ( \
        WITH running AS ( \
            SELECT COALESCE(owner_key_id, '') AS owner, COUNT(*) AS n \
            FROM jobs WHERE state = 'running' GROUP BY 1) \
        SELECT q.seq FROM jobs q \
        LEFT JOIN running r ON r.owner = COALESCE(q.owner_key_id, '') \
        LEFT JOIN job_owner_turns t ON t.owner = COALESCE(q.owner_key_id, '') \
        LEFT JOIN api_keys k ON k.id = q.owner_key_id \
        WHERE q.state = 'queued' AND COALESCE(q.not_before, 0) <= ?4 {filter} \
          AND (COALESCE(k.max_running, ?5) = 0 OR COALESCE(r.n, 0) < COALESCE(k.max_running, ?5)) \
        ORDER BY COALESCE(r.n, 0), COALESCE(t.turn, 0), q.priority DESC, q.seq \
        LIMIT 1) \
    AND state = 'queued' \
    RETURNING {JOB_COLUMNS}"
    )
}

/// Candidates whose spec agrees with the leader's (id ?6) at each of `paths` JSON
/// paths, bound from ?7 on. Both sides are stored specs, serialised alike.
fn alongside_filter(paths: usize) -> String {
    (0..paths)
        .map(|i| {
            let p = 7 + i;
            format!(
                "AND json_extract(q.spec, ?{p}) IS (SELECT json_extract(spec, ?{p}) FROM jobs WHERE id = ?6) "
            )
        })
        .collect()
}

/// A worker row this old belongs to a dead process.
const STALE_WORKER_MS: i64 = 3_600_000;

/// Restricts a query to the jobs a [`Scope`] may see; binds `all` then `owner`.
const SCOPE_SQL: &str = "(?1 OR owner_key_id IS ?2)";

#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    events: broadcast::Sender<EventNotice>,
    cancels: broadcast::Sender<Uuid>,
    queued: Arc<Notify>,
    key_bounds: KeyBounds,
}

/// Per-API-key bounds on queued and running jobs, for keys that do not set
/// their own (`api_keys.max_queued`, `api_keys.max_running`). 0 is no bound.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeyBounds {
    pub max_queued: u32,
    pub max_running: u32,
}

pub(crate) fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn ts(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

fn lease_deadline(lease: Duration) -> i64 {
    now_ms() + lease.as_millis() as i64
}

impl SqliteStore {
    /// Opens (creating file and directory when missing) and migrates the database.
    pub async fn connect(
        url: &str,
        busy_timeout: Duration,
        max_connections: u32,
    ) -> QueueResult<SqliteStore> {
        ensure_parent_dir(url);
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(busy_timeout)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections)
            .connect_with(options)
            .await?;
        Self::migrate(&pool).await?;
        Ok(Self::from_pool(pool))
    }

    pub async fn migrate(pool: &SqlitePool) -> QueueResult<()> {
        sqlx::migrate!().run(pool).await?;
        Ok(())
    }

    pub fn from_pool(pool: SqlitePool) -> SqliteStore {
        let (events, _) = broadcast::channel(1024);
        let (cancels, _) = broadcast::channel(256);
        SqliteStore {
            pool,
            events,
            cancels,
            queued: Arc::new(Notify::new()),
            key_bounds: KeyBounds::default(),
        }
    }

    /// Sets the default per-key bounds (from `[auth]`).
    pub fn with_key_bounds(mut self, bounds: KeyBounds) -> SqliteStore {
        self.key_bounds = bounds;
        self
    }

    /// For the rooms that keep their own tables in the same database (auth, webhooks).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    fn notify(&self, event: &JobEvent) {
        let _ = self.events.send(EventNotice {
            job_id: event.job_id,
            event_id: event.id,
        });
    }

    async fn insert_event<'c, E>(
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

    async fn submit_impl(&self, new: NewJob, max_queued: u64) -> QueueResult<Submitted> {
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
        let queued: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM jobs WHERE state = 'queued'")
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
    }

    async fn get_impl(&self, id: Uuid, scope: &Scope) -> QueueResult<Job> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE {SCOPE_SQL} AND id = ?3");
        let row = sqlx::query(&sql)
            .bind(scope.all)
            .bind(&scope.owner_key_id)
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?
            .ok_or(QueueError::NotFound(id))?;
        job_from_row(&row)
    }

    async fn list_impl(&self, q: &ListQuery, scope: &Scope) -> QueueResult<Page> {
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
    }

    async fn position_impl(&self, job: &Job) -> QueueResult<Option<u64>> {
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
    }

    async fn cancel_impl(&self, id: Uuid, scope: &Scope) -> QueueResult<CancelOutcome> {
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
    }

    async fn delete_impl(&self, id: Uuid, scope: &Scope) -> QueueResult<Job> {
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
    }

    async fn prune_impl(&self, cutoff: DateTime<Utc>) -> QueueResult<Vec<Uuid>> {
        let ids: Vec<String> = sqlx::query_scalar(
            "DELETE FROM jobs WHERE state IN ('succeeded', 'failed', 'canceled') \
             AND keep = 0 AND finished_at IS NOT NULL AND finished_at < ? RETURNING id",
        )
        .bind(cutoff.timestamp_millis())
        .fetch_all(&self.pool)
        .await?;
        ids.iter()
            .map(|id| {
                Uuid::parse_str(id).map_err(|e| QueueError::Corrupt(format!("job id {id}: {e}")))
            })
            .collect()
    }

    async fn claim_impl(
        &self,
        worker_id: &str,
        device: &str,
        lease: Duration,
        alongside: Option<(Uuid, &[&str])>,
    ) -> QueueResult<Option<Job>> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
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
        if let Some((leader, paths)) = alongside {
            query = query.bind(leader.to_string());
            for path in paths {
                query = query.bind(*path);
            }
        }
        let row = query.fetch_optional(&mut *tx).await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let job = job_from_row(&row)?;
        let event = Self::insert_event(
            &mut *tx,
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

    async fn renew_impl(&self, job: Uuid, worker_id: &str, lease: Duration) -> QueueResult<Lease> {
        let cancel: Option<bool> = sqlx::query_scalar(
            "UPDATE jobs SET lease_expires_at = ? WHERE id = ? AND state = 'running' AND lease_owner = ? \
             RETURNING cancel_requested",
        )
        .bind(lease_deadline(lease))
        .bind(job.to_string())
        .bind(worker_id)
        .fetch_optional(&self.pool)
        .await?;
        lease_or_lost(cancel, job, worker_id)
    }

    async fn progress_impl(
        &self,
        job: Uuid,
        worker_id: &str,
        p: Progress,
        data: serde_json::Value,
    ) -> QueueResult<Lease> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let cancel: Option<bool> = sqlx::query_scalar(
            "UPDATE jobs SET step = ?, total = ?, loss = ?, eta_seconds = ?, updated_at = ? \
             WHERE id = ? AND state = 'running' AND lease_owner = ? RETURNING cancel_requested",
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
        let event = Self::insert_event(&mut *tx, job, EventKind::Progress, &data).await?;
        tx.commit().await?;
        self.notify(&event);
        Ok(lease)
    }

    async fn set_checkpoint_impl(
        &self,
        job: Uuid,
        worker_id: &str,
        checkpoint: &str,
        step: u32,
    ) -> QueueResult<()> {
        let done = sqlx::query(
            "UPDATE jobs SET checkpoint = ?, checkpoint_step = ? \
             WHERE id = ? AND state = 'running' AND lease_owner = ?",
        )
        .bind(checkpoint)
        .bind(step as i64)
        .bind(job.to_string())
        .bind(worker_id)
        .execute(&self.pool)
        .await?;
        lease_or_lost((done.rows_affected() > 0).then_some(false), job, worker_id).map(|_| ())
    }

    async fn finish_impl(&self, job: Uuid, worker_id: &str, finish: Finish) -> QueueResult<Job> {
        let (state, kind, error, data) = match finish {
            Finish::Retry { error, after } => {
                return self.retry_impl(job, worker_id, error, after).await
            }
            Finish::Succeeded { data } => (JobState::Succeeded, EventKind::Completed, None, data),
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
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let now = now_ms();
        let sql = format!(
            "UPDATE jobs SET state = ?1, error = ?2, finished_at = ?3, updated_at = ?3, \
             lease_owner = NULL, lease_expires_at = NULL, eta_seconds = NULL, \
             step = CASE WHEN ?1 = 'succeeded' THEN total ELSE step END \
             WHERE id = ?4 AND state = 'running' AND lease_owner = ?5 RETURNING {JOB_COLUMNS}"
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
        let event = Self::insert_event(&mut *tx, job, kind, &data).await?;
        tx.commit().await?;
        self.notify(&event);
        job_from_row(&row)
    }

    /// Back to the queue after a transient failure, claimable again after `after`;
    /// failed instead once the job has used its attempts.
    async fn retry_impl(
        &self,
        job: Uuid,
        worker_id: &str,
        error: String,
        after: Duration,
    ) -> QueueResult<Job> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let now = now_ms();
        let sql = format!(
            "UPDATE jobs SET \
               state = CASE WHEN attempts >= max_attempts THEN 'failed' ELSE 'queued' END, \
               finished_at = CASE WHEN attempts >= max_attempts THEN ?1 ELSE NULL END, \
               not_before = ?2, error = ?3, updated_at = ?1, \
               lease_owner = NULL, lease_expires_at = NULL, eta_seconds = NULL \
             WHERE id = ?4 AND state = 'running' AND lease_owner = ?5 RETURNING {JOB_COLUMNS}"
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
        let event = Self::insert_event(&mut *tx, job, kind, &data).await?;
        tx.commit().await?;
        self.notify(&event);
        Ok(updated)
    }

    async fn release_impl(&self, job: Uuid, worker_id: &str) -> QueueResult<()> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let step: Option<i64> = sqlx::query_scalar(
            "UPDATE jobs SET state = 'queued', attempts = MAX(attempts - 1, 0), lease_owner = NULL, \
             lease_expires_at = NULL, eta_seconds = NULL, updated_at = ? \
             WHERE id = ? AND state = 'running' AND lease_owner = ? RETURNING step",
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
            &mut *tx,
            job,
            EventKind::State,
            &serde_json::json!({ "state": "queued", "reason": "worker shut down", "step": step }),
        )
        .await?;
        tx.commit().await?;
        self.notify(&event);
        self.queued.notify_waiters();
        Ok(())
    }

    async fn rescue_impl(&self) -> QueueResult<Vec<Rescued>> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let now = now_ms();
        let rows = sqlx::query(
            "UPDATE jobs SET \
               state = CASE WHEN cancel_requested THEN 'canceled' \
                            WHEN attempts >= max_attempts THEN 'failed' ELSE 'queued' END, \
               error = CASE WHEN NOT cancel_requested AND attempts >= max_attempts \
                            THEN 'its worker stopped responding ' || attempts || ' times (lease expired)' \
                            ELSE error END, \
               finished_at = CASE WHEN cancel_requested OR attempts >= max_attempts THEN ?1 ELSE NULL END, \
               lease_owner = NULL, lease_expires_at = NULL, eta_seconds = NULL, updated_at = ?1 \
             WHERE state = 'running' AND lease_expires_at < ?1 \
             RETURNING id, state, attempts, step, error",
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
            events.push(Self::insert_event(&mut *tx, id, kind, &data).await?);
            rescued.push(Rescued {
                job_id: id,
                state,
                attempts: attempts as u32,
            });
        }
        // Workers that vanished without saying goodbye (SIGKILL) leave rows behind.
        sqlx::query("DELETE FROM workers WHERE heartbeat_at < ?")
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
    }

    async fn events_after_impl(
        &self,
        job: Uuid,
        after: i64,
        limit: u32,
    ) -> QueueResult<Vec<JobEvent>> {
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
    }

    async fn counts_impl(&self) -> QueueResult<Vec<(JobState, u64)>> {
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
    }

    async fn insert_upload_impl(&self, u: Upload) -> QueueResult<()> {
        sqlx::query(
            "INSERT INTO uploads (id, owner_key_id, file_name, content_type, width, height, bytes, sha256, created_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
    }

    async fn get_upload_impl(&self, id: Uuid, scope: &Scope) -> QueueResult<Upload> {
        let sql = format!(
            "SELECT id, owner_key_id, file_name, content_type, width, height, bytes, sha256, created_at \
             FROM uploads WHERE {SCOPE_SQL} AND id = ?3"
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
    }

    async fn worker_heartbeat_impl(
        &self,
        worker_id: &str,
        device: &str,
        job: Option<Uuid>,
    ) -> QueueResult<()> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO workers (id, device, host, pid, started_at, heartbeat_at, job_id) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6) \
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
    }

    async fn live_workers_impl(&self, within: Option<Duration>) -> QueueResult<Vec<WorkerInfo>> {
        let since = within.map_or(i64::MIN, |w| now_ms() - w.as_millis() as i64);
        let rows = sqlx::query(
            "SELECT id, device, job_id, heartbeat_at, host, pid FROM workers \
             WHERE heartbeat_at >= ? ORDER BY id",
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

    async fn expire_worker_impl(&self, worker_id: &str) -> QueueResult<u64> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let held = sqlx::query(
            "UPDATE jobs SET lease_expires_at = 0 WHERE state = 'running' AND lease_owner = ?",
        )
        .bind(worker_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query("DELETE FROM workers WHERE id = ?")
            .bind(worker_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(held)
    }
}

/// The host name workers register with (`workers.host`).
pub fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

fn lease_or_lost(cancel: Option<bool>, job: Uuid, worker_id: &str) -> QueueResult<Lease> {
    cancel
        .map(|cancel_requested| Lease { cancel_requested })
        .ok_or_else(|| QueueError::LeaseLost {
            job,
            worker: worker_id.to_owned(),
        })
}

/// `sqlite://data/vqclip.db` names a relative file whose directory may not exist yet.
fn ensure_parent_dir(url: &str) {
    let Some(rest) = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
    else {
        return;
    };
    let path = rest.split('?').next().unwrap_or_default();
    if path.is_empty() || path == ":memory:" {
        return;
    }
    if let Some(parent) = std::path::Path::new(path).parent() {
        if !parent.as_os_str().is_empty() {
            let _ = std::fs::create_dir_all(parent);
        }
    }
}

fn parse_uuid(s: &str) -> QueueResult<Uuid> {
    Uuid::parse_str(s).map_err(|e| QueueError::Corrupt(format!("id {s:?}: {e}")))
}

fn parse_state(s: &str) -> QueueResult<JobState> {
    JobState::parse(s).ok_or_else(|| QueueError::Corrupt(format!("job state {s:?}")))
}

/// Job `id` as `scope` may see it, read inside the caller's write transaction so that what it
/// decides from the state cannot race another writer.
async fn scoped_job_in(
    conn: &mut sqlx::SqliteConnection,
    id: Uuid,
    scope: &Scope,
) -> QueueResult<Job> {
    let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE {SCOPE_SQL} AND id = ?3");
    let row = sqlx::query(&sql)
        .bind(scope.all)
        .bind(&scope.owner_key_id)
        .bind(id.to_string())
        .fetch_optional(conn)
        .await?
        .ok_or(QueueError::NotFound(id))?;
    job_from_row(&row)
}

fn job_from_row(row: &SqliteRow) -> QueueResult<Job> {
    let spec: String = row.try_get("spec")?;
    let warnings: String = row.try_get("warnings")?;
    let opt_ts = |col: &str| -> QueueResult<Option<DateTime<Utc>>> {
        Ok(row.try_get::<Option<i64>, _>(col)?.map(ts))
    };
    Ok(Job {
        id: parse_uuid(&row.try_get::<String, _>("id")?)?,
        seq: row.try_get("seq")?,
        state: parse_state(&row.try_get::<String, _>("state")?)?,
        priority: row.try_get("priority")?,
        spec: serde_json::from_str(&spec)
            .map_err(|e| QueueError::Corrupt(format!("job spec: {e}")))?,
        owner_key_id: row.try_get("owner_key_id")?,
        idempotency_key: row.try_get("idempotency_key")?,
        keep: row.try_get("keep")?,
        attempts: row.try_get::<i64, _>("attempts")? as u32,
        max_attempts: row.try_get::<i64, _>("max_attempts")? as u32,
        lease_owner: row.try_get("lease_owner")?,
        lease_expires_at: opt_ts("lease_expires_at")?,
        cancel_requested: row.try_get("cancel_requested")?,
        device: row.try_get("device")?,
        seed: row.try_get::<Option<i64>, _>("seed")?.map(|s| s as u64),
        progress: Progress {
            step: row.try_get::<i64, _>("step")? as u32,
            total: row.try_get::<i64, _>("total")? as u32,
            loss: row.try_get("loss")?,
            eta_seconds: row.try_get("eta_seconds")?,
        },
        checkpoint: row.try_get("checkpoint")?,
        checkpoint_step: row.try_get::<i64, _>("checkpoint_step")? as u32,
        error: row.try_get("error")?,
        warnings: serde_json::from_str(&warnings)
            .map_err(|e| QueueError::Corrupt(format!("job warnings: {e}")))?,
        created_at: ts(row.try_get("created_at")?),
        started_at: opt_ts("started_at")?,
        finished_at: opt_ts("finished_at")?,
        updated_at: ts(row.try_get("updated_at")?),
    })
}

impl JobStore for SqliteStore {
    fn submit(&self, job: NewJob, max_queued: u64) -> QueueFuture<'_, Submitted> {
        Box::pin(self.submit_impl(job, max_queued))
    }
    fn get<'a>(&'a self, id: Uuid, scope: &'a Scope) -> QueueFuture<'a, Job> {
        Box::pin(self.get_impl(id, scope))
    }
    fn list<'a>(&'a self, query: &'a ListQuery, scope: &'a Scope) -> QueueFuture<'a, Page> {
        Box::pin(self.list_impl(query, scope))
    }
    fn position<'a>(&'a self, job: &'a Job) -> QueueFuture<'a, Option<u64>> {
        Box::pin(self.position_impl(job))
    }
    fn cancel<'a>(&'a self, id: Uuid, scope: &'a Scope) -> QueueFuture<'a, CancelOutcome> {
        Box::pin(self.cancel_impl(id, scope))
    }
    fn cancellations(&self) -> broadcast::Receiver<Uuid> {
        self.cancels.subscribe()
    }
    fn cancel_requested(&self, id: Uuid) -> QueueFuture<'_, bool> {
        Box::pin(async move {
            let flag: Option<bool> =
                sqlx::query_scalar("SELECT cancel_requested FROM jobs WHERE id = ?")
                    .bind(id.to_string())
                    .fetch_optional(&self.pool)
                    .await?;
            Ok(flag.unwrap_or(false))
        })
    }
    fn delete<'a>(&'a self, id: Uuid, scope: &'a Scope) -> QueueFuture<'a, Job> {
        Box::pin(self.delete_impl(id, scope))
    }
    fn prune_finished_before(&self, cutoff: DateTime<Utc>) -> QueueFuture<'_, Vec<Uuid>> {
        Box::pin(self.prune_impl(cutoff))
    }
    fn claim<'a>(
        &'a self,
        worker_id: &'a str,
        device: &'a str,
        lease: Duration,
    ) -> QueueFuture<'a, Option<Job>> {
        Box::pin(self.claim_impl(worker_id, device, lease, None))
    }
    fn claim_alongside<'a>(
        &'a self,
        worker_id: &'a str,
        device: &'a str,
        lease: Duration,
        leader: Uuid,
        same: &'a [&'a str],
    ) -> QueueFuture<'a, Option<Job>> {
        Box::pin(self.claim_impl(worker_id, device, lease, Some((leader, same))))
    }
    fn renew<'a>(
        &'a self,
        job: Uuid,
        worker_id: &'a str,
        lease: Duration,
    ) -> QueueFuture<'a, Lease> {
        Box::pin(self.renew_impl(job, worker_id, lease))
    }
    fn progress<'a>(
        &'a self,
        job: Uuid,
        worker_id: &'a str,
        progress: Progress,
        data: serde_json::Value,
    ) -> QueueFuture<'a, Lease> {
        Box::pin(self.progress_impl(job, worker_id, progress, data))
    }
    fn set_checkpoint<'a>(
        &'a self,
        job: Uuid,
        worker_id: &'a str,
        checkpoint: &'a str,
        step: u32,
    ) -> QueueFuture<'a, ()> {
        Box::pin(self.set_checkpoint_impl(job, worker_id, checkpoint, step))
    }
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
    fn finish<'a>(&'a self, job: Uuid, worker_id: &'a str, finish: Finish) -> QueueFuture<'a, Job> {
        Box::pin(self.finish_impl(job, worker_id, finish))
    }
    fn release<'a>(&'a self, job: Uuid, worker_id: &'a str) -> QueueFuture<'a, ()> {
        Box::pin(self.release_impl(job, worker_id))
    }
    fn rescue_expired(&self) -> QueueFuture<'_, Vec<Rescued>> {
        Box::pin(self.rescue_impl())
    }
    fn events_after(&self, job: Uuid, after: i64, limit: u32) -> QueueFuture<'_, Vec<JobEvent>> {
        Box::pin(self.events_after_impl(job, after, limit))
    }
    fn subscribe(&self) -> broadcast::Receiver<EventNotice> {
        self.events.subscribe()
    }
    fn job_queued(&self) -> Arc<Notify> {
        self.queued.clone()
    }
    fn counts_by_state(&self) -> QueueFuture<'_, Vec<(JobState, u64)>> {
        Box::pin(self.counts_impl())
    }
    fn ping(&self) -> QueueFuture<'_, ()> {
        Box::pin(async move {
            sqlx::query("SELECT 1").execute(&self.pool).await?;
            Ok(())
        })
    }
    fn insert_upload(&self, upload: Upload) -> QueueFuture<'_, ()> {
        Box::pin(self.insert_upload_impl(upload))
    }
    fn get_upload<'a>(&'a self, id: Uuid, scope: &'a Scope) -> QueueFuture<'a, Upload> {
        Box::pin(self.get_upload_impl(id, scope))
    }
    fn worker_heartbeat<'a>(
        &'a self,
        worker_id: &'a str,
        device: &'a str,
        job: Option<Uuid>,
    ) -> QueueFuture<'a, ()> {
        Box::pin(self.worker_heartbeat_impl(worker_id, device, job))
    }
    fn worker_gone<'a>(&'a self, worker_id: &'a str) -> QueueFuture<'a, ()> {
        Box::pin(async move {
            sqlx::query("DELETE FROM workers WHERE id = ?")
                .bind(worker_id)
                .execute(&self.pool)
                .await?;
            Ok(())
        })
    }
    fn live_workers(&self, within: Duration) -> QueueFuture<'_, Vec<WorkerInfo>> {
        Box::pin(self.live_workers_impl(Some(within)))
    }
    fn workers(&self) -> QueueFuture<'_, Vec<WorkerInfo>> {
        Box::pin(self.live_workers_impl(None))
    }
    fn expire_worker<'a>(&'a self, worker_id: &'a str) -> QueueFuture<'a, u64> {
        Box::pin(self.expire_worker_impl(worker_id))
    }
}

#[cfg(test)]
mod tests;
