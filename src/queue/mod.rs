//! The job store: job states, claiming with leases, persisted events and uploads.
//!
//! [`JobStore`] is the seam: five traits, one per concern ([`Jobs`], [`Leases`],
//! [`Events`], [`Uploads`], [`Workers`]); [`SqliteStore`] implements them in `sqlite/`, one
//! file per concern, and [`PgStore`] does the same in `postgres/` (several nodes, one database). SQL never
//! leaves the backend's folder. Nothing here knows candle, HTTP, the artifact storage or
//! the render engine: a job's spec is opaque JSON that the worker interprets.
//!
//! State machine:
//! ```text
//! queued ──claim──► running ──finish──► succeeded | failed | canceled
//!   ▲  │               │ lease expired / graceful release
//!   │  └──cancel──► canceled
//!   └──────────────────┘  (failed instead once attempts reach max_attempts)
//! ```

mod deliveries;
mod keys;
pub mod metrics;
mod postgres;
#[cfg(test)]
pub(crate) mod rooms_suite;
mod rows;
mod sqlite;
#[cfg(test)]
pub(crate) mod suite;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use uuid::Uuid;

pub(crate) use deliveries::attach_attempt;
pub use deliveries::{
    Attempt, AttemptRecord, ClaimedDelivery, Deliveries, Delivery, DeliveryStatus, HookEvent,
    HookEvents, NewDelivery,
};
pub use keys::{ApiKey, ApiKeys, KeyRow, LimitOverrides};
pub use metrics::Metrics;
pub use postgres::PgStore;
pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("database error: {0}")]
    Database(sqlx::Error),
    /// Every connection waited `busy_timeout` for the write lock (SQLITE_BUSY/LOCKED) or
    /// for a pooled connection: the database is saturated, not broken; retry shortly.
    #[error("the database is busy ({0}); retry shortly")]
    Busy(sqlx::Error),
    #[error("cannot run database migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("the queue is full ({queued} jobs queued, limit {limit}); retry later")]
    QueueFull { queued: u64, limit: u64 },
    #[error("this API key already has {queued} queued jobs, its limit of {limit}; wait for some to start or cancel some")]
    KeyQueueFull { queued: u64, limit: u64 },
    #[error("Idempotency-Key {key:?} was already used with a different request body; use a new key for a new job")]
    IdempotencyMismatch { key: String },
    #[error("no job with id {0}")]
    NotFound(Uuid),
    #[error("job {id} is {state}; {detail}")]
    Conflict {
        id: Uuid,
        state: JobState,
        detail: &'static str,
    },
    #[error("worker {worker} no longer holds the lease on job {job}")]
    LeaseLost { job: Uuid, worker: String },
    #[error("corrupt row in the job store: {0}")]
    Corrupt(String),
}

impl From<sqlx::Error> for QueueError {
    fn from(err: sqlx::Error) -> QueueError {
        if is_busy(&err) {
            QueueError::Busy(err)
        } else {
            QueueError::Database(err)
        }
    }
}

/// SQLITE_BUSY (5) and SQLITE_LOCKED (6), in any of their extended forms; on PostgreSQL a
/// serialization failure, a deadlock, a lock not available, too many connections or a server
/// starting up; and a pool that had no connection to give within its acquire timeout.
fn is_busy(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::PoolTimedOut => true,
        sqlx::Error::Database(db)
            if db
                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .is_some() =>
        {
            matches!(
                db.code().as_deref(),
                Some("40001" | "40P01" | "55P03" | "53300" | "57P03")
            )
        }
        sqlx::Error::Database(db) => db
            .code()
            .and_then(|c| c.parse::<i32>().ok())
            .is_some_and(|code| matches!(code & 0xff, 5 | 6)),
        _ => false,
    }
}

pub type QueueResult<T> = Result<T, QueueError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Canceled,
}

impl JobState {
    pub const ALL: [JobState; 5] = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Canceled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Canceled => "canceled",
        }
    }

    pub fn parse(s: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Canceled
        )
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The kinds of event a client sees on `GET /v1/jobs/{id}/events`; webhooks subscribe to
/// the same names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    State,
    Progress,
    Frame,
    Completed,
    Failed,
    Canceled,
    /// A revision took effect: `{revision, step, changes}`.
    Steered,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::State => "state",
            EventKind::Progress => "progress",
            EventKind::Frame => "frame",
            EventKind::Completed => "completed",
            EventKind::Failed => "failed",
            EventKind::Canceled => "canceled",
            EventKind::Steered => "steered",
        }
    }

    pub const ALL: [EventKind; 7] = [
        EventKind::State,
        EventKind::Progress,
        EventKind::Frame,
        EventKind::Completed,
        EventKind::Failed,
        EventKind::Canceled,
        EventKind::Steered,
    ];

    pub fn parse(s: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The last event of a job's stream.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            EventKind::Completed | EventKind::Failed | EventKind::Canceled
        )
    }
}

/// Whose jobs a request may see. The auth layer narrows it to one API key; without
/// keys every request sees every job.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    /// `None` with `all == false` means jobs submitted without a key.
    pub owner_key_id: Option<String>,
    /// Admins and key-less deployments see all jobs.
    pub all: bool,
}

impl Scope {
    pub fn unrestricted() -> Scope {
        Scope {
            owner_key_id: None,
            all: true,
        }
    }

    pub fn key(key_id: impl Into<String>) -> Scope {
        Scope {
            owner_key_id: Some(key_id.into()),
            all: false,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Progress {
    pub step: u32,
    pub total: u32,
    pub loss: Option<f64>,
    pub eta_seconds: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub id: Uuid,
    /// Insertion order; the pagination cursor.
    pub seq: i64,
    pub state: JobState,
    pub priority: i32,
    pub spec: serde_json::Value,
    pub owner_key_id: Option<String>,
    pub idempotency_key: Option<String>,
    pub keep: bool,
    pub attempts: u32,
    pub max_attempts: u32,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub cancel_requested: bool,
    pub device: Option<String>,
    pub seed: Option<u64>,
    pub progress: Progress,
    /// The latest resumable checkpoint, relative to the job's artifact directory.
    pub checkpoint: Option<String>,
    /// The step the checkpoint was taken after; a resume continues from the next one.
    pub checkpoint_step: u32,
    pub error: Option<String>,
    pub warnings: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct NewJob {
    pub spec: serde_json::Value,
    pub priority: i32,
    pub keep: bool,
    pub total_steps: u32,
    pub owner_key_id: Option<String>,
    pub idempotency_key: Option<String>,
    /// Hash of the request body, to tell a retry from a different request with a reused key.
    pub request_hash: String,
    pub max_attempts: u32,
    pub warnings: Vec<String>,
    /// Drawn at submission when the spec has none, so that every attempt renders alike.
    pub seed: Option<u64>,
}

#[derive(Debug, Clone)]
pub enum Submitted {
    Created(Job),
    /// An earlier submission with the same Idempotency-Key and body.
    Existing(Job),
}

impl Submitted {
    pub fn job(&self) -> &Job {
        match self {
            Submitted::Created(j) | Submitted::Existing(j) => j,
        }
    }
}

#[derive(Debug, Clone)]
pub struct JobEvent {
    pub id: i64,
    pub job_id: Uuid,
    pub kind: EventKind,
    pub data: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

/// Sent on the store's broadcast channel after an event row is committed.
#[derive(Debug, Clone, Copy)]
pub struct EventNotice {
    pub job_id: Uuid,
    pub event_id: i64,
}

#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub state: Option<JobState>,
    /// Only jobs older than this cursor (a job's `seq`).
    pub before: Option<i64>,
    pub limit: u32,
}

#[derive(Debug, Clone)]
pub struct Page {
    pub jobs: Vec<Job>,
    /// Pass as `before` to get the next (older) page; `None` on the last page.
    pub next_cursor: Option<i64>,
    /// Each job's queue position (as [`JobStore::position`]), read in the same query
    /// as the page, so a job listed as queued always has one.
    pub positions: Vec<Option<u64>>,
}

#[derive(Debug, Clone)]
pub enum CancelOutcome {
    /// A queued job: canceled at once.
    Canceled(Job),
    /// A running job: its worker stops it within one step.
    Requested(Job),
    /// It was canceled before; canceling is idempotent.
    AlreadyCanceled(Job),
}

/// How a worker's run of a job ended.
#[derive(Debug, Clone)]
pub enum Finish {
    Succeeded {
        data: serde_json::Value,
    },
    Failed {
        error: String,
    },
    Canceled {
        step: u32,
    },
    /// A transient failure (the network, while fetching models): back to the queue, not
    /// claimable for `after`, unless the job has used all its attempts (then failed).
    Retry {
        error: String,
        after: Duration,
    },
}

/// The answer to a lease renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub cancel_requested: bool,
}

/// A job whose worker vanished, handed back to the queue or failed.
#[derive(Debug, Clone)]
pub struct Rescued {
    pub job_id: Uuid,
    pub state: JobState,
    pub attempts: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    pub id: Uuid,
    pub owner_key_id: Option<String>,
    pub file_name: String,
    pub content_type: String,
    pub width: u32,
    pub height: u32,
    pub bytes: u64,
    pub sha256: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct WorkerInfo {
    pub id: String,
    pub device: String,
    pub job_id: Option<Uuid>,
    pub heartbeat_at: DateTime<Utc>,
    /// The machine and process the worker runs in, as it registered them.
    pub host: String,
    pub pid: u32,
}

pub type QueueFuture<'a, T> = BoxFuture<'a, QueueResult<T>>;

/// One numbered change of a queued or running job's render parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRevision {
    /// 1 for a job's first revision, then 2, ...
    pub number: u32,
    /// The fields the client sent.
    pub changes: serde_json::Value,
    /// The job's whole stored document after the change (opaque to the queue).
    pub spec: serde_json::Value,
    /// The step it took effect at; `None` until a worker applied it.
    pub step: Option<u32>,
    pub created_at: DateTime<Utc>,
}

/// A fork's source: the job, and the step of the saved frame it started from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ForkLink {
    pub job: Uuid,
    pub step: u32,
}

/// A job's place among forks: where it came from, and the jobs forked from it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lineage {
    pub parent: Option<ForkLink>,
    /// Oldest first; each link names the fork (`job`) and the step it started from.
    pub forks: Vec<ForkLink>,
}

/// Per-API-key bounds on queued and running jobs, for keys that do not set their own
/// (`api_keys.max_queued`, `api_keys.max_running`). 0 is no bound.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeyBounds {
    pub max_queued: u32,
    pub max_running: u32,
}

/// The host name workers register with (`workers.host`).
pub fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

// The store is five traits, one per concern, so that each backend implements them in one
// file per concern (`sqlite/jobs.rs`, `sqlite/leases.rs`, ...) with no forwarding layer.
// Every state change is a database write; nothing lives only in memory.

/// Jobs as clients see them: submission, reads, cancel, deletion and retention.
pub trait Jobs: Send + Sync + 'static {
    /// Inserts a queued job unless `max_queued` jobs are already queued. With an
    /// idempotency key already used by the same owner, returns that job instead.
    fn submit(&self, job: NewJob, max_queued: u64) -> QueueFuture<'_, Submitted>;
    fn get<'a>(&'a self, id: Uuid, scope: &'a Scope) -> QueueFuture<'a, Job>;
    /// Newest first.
    fn list<'a>(&'a self, query: &'a ListQuery, scope: &'a Scope) -> QueueFuture<'a, Page>;
    /// 1 for the job claimed next; `None` unless queued.
    fn position<'a>(&'a self, job: &'a Job) -> QueueFuture<'a, Option<u64>>;
    fn cancel<'a>(&'a self, id: Uuid, scope: &'a Scope) -> QueueFuture<'a, CancelOutcome>;
    /// Removes a terminal job and its events; the caller removes its artifacts.
    fn delete<'a>(&'a self, id: Uuid, scope: &'a Scope) -> QueueFuture<'a, Job>;
    /// Retention: removes the terminal jobs (and their events) that finished
    /// before `cutoff`, except those with `keep`; returns their ids so the
    /// caller can remove their artifacts.
    fn prune_finished_before(&self, cutoff: DateTime<Utc>) -> QueueFuture<'_, Vec<Uuid>>;
    fn counts_by_state(&self) -> QueueFuture<'_, Vec<(JobState, u64)>>;
    fn ping(&self) -> QueueFuture<'_, ()>;
}

/// A worker's side of a job: claiming, the lease and its renewal, progress and the end.
pub trait Leases: Send + Sync + 'static {
    /// Atomically takes the next queued job (priority, then first in first out).
    fn claim<'a>(
        &'a self,
        worker_id: &'a str,
        device: &'a str,
        lease: Duration,
    ) -> QueueFuture<'a, Option<Job>>;
    /// As [`Leases::claim`] (same order, same per-key bounds), among only the queued
    /// jobs whose spec agrees with job `leader`'s at every JSON path in `same`, e.g.
    /// `["$.width", "$.height", "$.models"]` (render's batch key names them). A worker
    /// packing a batch takes each job after the first this way: one atomic claim per job.
    fn claim_alongside<'a>(
        &'a self,
        worker_id: &'a str,
        device: &'a str,
        lease: Duration,
        leader: Uuid,
        same: &'a [String],
    ) -> QueueFuture<'a, Option<Job>>;
    /// Woken whenever a job is queued (or requeued) by this process.
    fn job_queued(&self) -> std::sync::Arc<tokio::sync::Notify>;
    fn renew<'a>(
        &'a self,
        job: Uuid,
        worker_id: &'a str,
        lease: Duration,
    ) -> QueueFuture<'a, Lease>;
    /// Records progress on the job and appends a `progress` event, in one transaction.
    fn progress<'a>(
        &'a self,
        job: Uuid,
        worker_id: &'a str,
        progress: Progress,
        data: serde_json::Value,
    ) -> QueueFuture<'a, Lease>;
    fn set_checkpoint<'a>(
        &'a self,
        job: Uuid,
        worker_id: &'a str,
        checkpoint: &'a str,
        step: u32,
    ) -> QueueFuture<'a, ()>;
    fn finish<'a>(&'a self, job: Uuid, worker_id: &'a str, finish: Finish) -> QueueFuture<'a, Job>;
    /// Graceful shutdown: back to the queue without spending an attempt.
    fn release<'a>(&'a self, job: Uuid, worker_id: &'a str) -> QueueFuture<'a, ()>;
    /// Requeues (or fails, at max attempts) running jobs whose lease has expired.
    fn rescue_expired(&self) -> QueueFuture<'_, Vec<Rescued>>;
    /// Cancel requests for running jobs made through this store, the moment they commit,
    /// so a worker in this process stops within the step it is on.
    fn cancellations(&self) -> tokio::sync::broadcast::Receiver<Uuid>;
    /// Whether a cancel was requested for the job: one indexed read, cheap enough for a
    /// worker in another process to ask every few hundred milliseconds.
    fn cancel_requested(&self, id: Uuid) -> QueueFuture<'_, bool>;
}

/// A job's persisted events, in id order, and the wake-up when one commits.
pub trait Events: Send + Sync + 'static {
    fn append_event(
        &self,
        job: Uuid,
        kind: EventKind,
        data: serde_json::Value,
    ) -> QueueFuture<'_, JobEvent>;
    fn events_after(&self, job: Uuid, after: i64, limit: u32) -> QueueFuture<'_, Vec<JobEvent>>;
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<EventNotice>;
}

/// Uploaded init and target images' records (their bytes are artifacts).
pub trait Uploads: Send + Sync + 'static {
    fn insert_upload(&self, upload: Upload) -> QueueFuture<'_, ()>;
    fn get_upload<'a>(&'a self, id: Uuid, scope: &'a Scope) -> QueueFuture<'a, Upload>;
}

/// The worker registry: heartbeats, and the dead workers whose leases are handed back.
pub trait Workers: Send + Sync + 'static {
    fn worker_heartbeat<'a>(
        &'a self,
        worker_id: &'a str,
        device: &'a str,
        job: Option<Uuid>,
    ) -> QueueFuture<'a, ()>;
    fn worker_gone<'a>(&'a self, worker_id: &'a str) -> QueueFuture<'a, ()>;
    /// Workers whose heartbeat is newer than `within`.
    fn live_workers(&self, within: Duration) -> QueueFuture<'_, Vec<WorkerInfo>>;
    /// Every registered worker, however old its heartbeat.
    fn workers(&self) -> QueueFuture<'_, Vec<WorkerInfo>>;
    /// A worker known to be dead (its process is gone): its leases expire now and its
    /// row goes, so [`Leases::rescue_expired`] requeues its jobs at once instead of
    /// after a full lease. Returns how many leases it held.
    fn expire_worker<'a>(&'a self, worker_id: &'a str) -> QueueFuture<'a, u64>;
}

/// Steering and forking: a job's numbered revisions and its fork links.
pub trait Revisions: Send + Sync + 'static {
    /// Records revision n+1 of a queued or running job `scope` may see: `changes` as
    /// sent, `spec` the whole document after them. A finished job is a
    /// [`QueueError::Conflict`].
    fn steer<'a>(
        &'a self,
        id: Uuid,
        scope: &'a Scope,
        changes: serde_json::Value,
        spec: serde_json::Value,
    ) -> QueueFuture<'a, JobRevision>;
    /// Every revision of the job, in number order.
    fn revisions(&self, id: Uuid) -> QueueFuture<'_, Vec<JobRevision>>;
    /// The worker holding the job's lease applied revision `number` before step
    /// `step + 1`: records the step and appends a `steered` event with `data`, in one
    /// transaction. A revision already applied is left as it is.
    fn revision_applied<'a>(
        &'a self,
        job: Uuid,
        worker_id: &'a str,
        number: u32,
        step: u32,
        data: serde_json::Value,
    ) -> QueueFuture<'a, ()>;
    /// As [`Jobs::submit`], for a job that starts from `from`'s saved frame; the link is
    /// written in the insert's transaction.
    fn fork(&self, job: NewJob, from: ForkLink, max_queued: u64) -> QueueFuture<'_, Submitted>;
    /// The job's parent (when it is a fork) and its forks.
    fn lineage(&self, id: Uuid) -> QueueFuture<'_, Lineage>;
    /// The ids of jobs steered through this store (on PostgreSQL, through any node) the
    /// moment the revision commits, so a worker takes it at the very next step boundary;
    /// workers also poll [`Revisions::revisions`], for what a dropped notice misses.
    fn steerings(&self) -> tokio::sync::broadcast::Receiver<Uuid>;
}

/// The whole job store, as the API and the workers hold it (`Arc<dyn JobStore>`):
/// every backend that implements the six concerns is one.
pub trait JobStore: Jobs + Leases + Events + Uploads + Workers + Revisions {}

impl<T: Jobs + Leases + Events + Uploads + Workers + Revisions> JobStore for T {}
