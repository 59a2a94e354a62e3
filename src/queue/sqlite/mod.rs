//! The job store on SQLite (WAL, busy timeout): one file per concern of [`JobStore`],
//! each implementing its trait directly. Multi-statement writes open with
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

mod deliveries;
mod events;
mod jobs;
mod keys;
mod leases;
mod revisions;
mod uploads;
mod workers;

const JOB_COLUMNS: &str = "seq, id, state, priority, spec, owner_key_id, idempotency_key, keep, \
    attempts, max_attempts, lease_owner, lease_expires_at, cancel_requested, device, seed, step, \
    total, loss, eta_seconds, checkpoint, checkpoint_step, error, warnings, created_at, started_at, finished_at, \
    updated_at";

/// Restricts a query to the jobs a [`Scope`] may see; binds `all` then `owner`.
const SCOPE_SQL: &str = "(?1 OR owner_key_id IS ?2)";

#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    events: broadcast::Sender<EventNotice>,
    cancels: broadcast::Sender<Uuid>,
    steers: broadcast::Sender<Uuid>,
    queued: Arc<Notify>,
    key_bounds: KeyBounds,
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn ts(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
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
        sqlx::migrate!("./migrations/sqlite").run(pool).await?;
        Ok(())
    }

    pub fn from_pool(pool: SqlitePool) -> SqliteStore {
        let (events, _) = broadcast::channel(1024);
        let (cancels, _) = broadcast::channel(256);
        let (steers, _) = broadcast::channel(256);
        SqliteStore {
            pool,
            events,
            cancels,
            steers,
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

crate::queue::rows::row_readers!(SqliteRow);

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

#[cfg(test)]
mod tests;
