//! The job store on PostgreSQL, for several API and worker nodes on one database: one file per
//! concern of [`JobStore`], as `sqlite/`. What differs from SQLite, and why:
//! - claims lock their pick with `FOR UPDATE SKIP LOCKED`, so many workers claim at once
//!   without blocking each other or taking one job twice;
//! - submissions take a transaction-scoped advisory lock, so the queue-full and per-key bounds
//!   are checked and the job inserted with no other submission in between, on any node;
//! - event ids are allocated per job under the job's row lock (`jobs.last_event_id`), so they
//!   grow in commit order and an SSE resume never skips a late commit;
//! - triggers `NOTIFY` queued jobs, events and cancel requests; a listener task turns them into
//!   this process's wake-ups, so nodes wake each other at once instead of by polling.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::Row;
use tokio::sync::{broadcast, Notify};
use tokio_util::sync::{CancellationToken, DropGuard};
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

/// Restricts a query to the jobs a [`Scope`] may see; binds `all` then `owner` as $1, $2.
const SCOPE_SQL: &str = "($1 OR owner_key_id IS NOT DISTINCT FROM $2)";

/// The advisory lock every submission holds until it commits (an arbitrary constant, "vqsb").
const SUBMIT_LOCK: i64 = 0x7671_7362;

#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    events: broadcast::Sender<EventNotice>,
    cancels: broadcast::Sender<Uuid>,
    steers: broadcast::Sender<Uuid>,
    queued: Arc<Notify>,
    key_bounds: KeyBounds,
    /// Events already announced here, by the writer or the listener, whichever came first:
    /// a local event also comes back by `NOTIFY`, and subscribers hear of each event once.
    announced: Arc<Announced>,
    /// Stops the LISTEN task when the last clone of the store goes.
    _listener: Arc<DropGuard>,
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn ts(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

impl PgStore {
    /// Connects to `postgres://…`, runs the migrations and starts listening for other nodes'
    /// notifications.
    pub async fn connect(url: &str, max_connections: u32) -> QueueResult<PgStore> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await?;
        Self::migrate(&pool).await?;
        Self::from_pool(pool).await
    }

    pub async fn migrate(pool: &PgPool) -> QueueResult<()> {
        sqlx::migrate!("./migrations/postgres").run(pool).await?;
        Ok(())
    }

    pub async fn from_pool(pool: PgPool) -> QueueResult<PgStore> {
        let (events, _) = broadcast::channel(1024);
        let (cancels, _) = broadcast::channel(256);
        let (steers, _) = broadcast::channel(256);
        let queued = Arc::new(Notify::new());
        let announced = Arc::new(Announced::default());
        let stop = CancellationToken::new();
        // Subscribed before returning, so nothing committed after `connect` is missed.
        let mut listener = PgListener::connect_with(&pool).await?;
        listener
            .listen_all([
                "vqclip_queued",
                "vqclip_events",
                "vqclip_cancels",
                "vqclip_steers",
            ])
            .await?;
        tokio::spawn(listen(
            pool.clone(),
            listener,
            events.clone(),
            Wakeups {
                cancels: cancels.clone(),
                steers: steers.clone(),
            },
            queued.clone(),
            announced.clone(),
            stop.clone(),
        ));
        Ok(PgStore {
            pool,
            events,
            cancels,
            steers,
            queued,
            key_bounds: KeyBounds::default(),
            announced,
            _listener: Arc::new(stop.drop_guard()),
        })
    }

    /// Sets the default per-key bounds (from `[auth]`).
    pub fn with_key_bounds(mut self, bounds: KeyBounds) -> PgStore {
        self.key_bounds = bounds;
        self
    }

    /// For the rooms that keep their own tables in the same database (auth, webhooks).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// The per-job wake-ups the listener hands on: cancel requests and revisions.
struct Wakeups {
    cancels: broadcast::Sender<Uuid>,
    steers: broadcast::Sender<Uuid>,
}

/// Turns notifications from every node into this process's wake-ups. `PgListener` reconnects
/// by itself after a dropped connection; what was sent meanwhile is lost, which the pollers
/// (workers, SSE streams) cover.
async fn listen(
    pool: PgPool,
    mut listener: PgListener,
    events: broadcast::Sender<EventNotice>,
    jobs: Wakeups,
    queued: Arc<Notify>,
    announced: Arc<Announced>,
    stop: CancellationToken,
) {
    loop {
        let received = tokio::select! {
            _ = stop.cancelled() => return,
            n = listener.recv() => n,
        };
        let note = match received {
            Ok(note) => note,
            // The store is closing (shutdown, `vqclip migrate`): nothing left to listen for.
            Err(_) if pool.is_closed() => return,
            Err(e) => {
                tracing::warn!("PostgreSQL LISTEN connection: {e}; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        match note.channel() {
            "vqclip_queued" => queued.notify_waiters(),
            "vqclip_cancels" => {
                if let Ok(id) = Uuid::parse_str(note.payload()) {
                    let _ = jobs.cancels.send(id);
                }
            }
            "vqclip_steers" => {
                if let Ok(id) = Uuid::parse_str(note.payload()) {
                    let _ = jobs.steers.send(id);
                }
            }
            "vqclip_events" => {
                let mut parts = note.payload().split(' ');
                let job = parts.next().and_then(|s| Uuid::parse_str(s).ok());
                let id = parts.next().and_then(|s| s.parse::<i64>().ok());
                if let (Some(job_id), Some(event_id)) = (job, id) {
                    if announced.first(job_id, event_id) {
                        let _ = events.send(EventNotice { job_id, event_id });
                    }
                }
            }
            _ => {}
        }
    }
}

/// An event by its job and id.
type EventKey = (Uuid, i64);

/// The most recent events announced in this process (bounded: a notice older than this many
/// events would at worst be announced twice, which subscribers read past by id): a set to
/// look them up, and their order to forget the oldest.
#[derive(Default)]
pub(super) struct Announced {
    recent: std::sync::Mutex<(
        std::collections::HashSet<EventKey>,
        std::collections::VecDeque<EventKey>,
    )>,
}

impl Announced {
    const CAPACITY: usize = 8192;

    /// True the first time an event is seen here.
    pub(super) fn first(&self, job: Uuid, id: i64) -> bool {
        let mut guard = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let (set, order) = &mut *guard;
        if !set.insert((job, id)) {
            return false;
        }
        order.push_back((job, id));
        if order.len() > Self::CAPACITY {
            if let Some(old) = order.pop_front() {
                set.remove(&old);
            }
        }
        true
    }
}

crate::queue::rows::row_readers!(PgRow);

fn parse_uuid(s: &str) -> QueueResult<Uuid> {
    Uuid::parse_str(s).map_err(|e| QueueError::Corrupt(format!("id {s:?}: {e}")))
}

fn parse_state(s: &str) -> QueueResult<JobState> {
    JobState::parse(s).ok_or_else(|| QueueError::Corrupt(format!("job state {s:?}")))
}

/// Job `id` as `scope` may see it, locked for the rest of the caller's transaction so that
/// what it decides from the state cannot race another writer.
async fn scoped_job_in(conn: &mut sqlx::PgConnection, id: Uuid, scope: &Scope) -> QueueResult<Job> {
    let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE {SCOPE_SQL} AND id = $3 FOR UPDATE");
    let row = sqlx::query(&sql)
        .bind(scope.all)
        .bind(&scope.owner_key_id)
        .bind(id.to_string())
        .fetch_optional(conn)
        .await?
        .ok_or(QueueError::NotFound(id))?;
    job_from_row(&row)
}

fn job_from_row(row: &PgRow) -> QueueResult<Job> {
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
pub(crate) mod testdb;
#[cfg(test)]
mod tests;
