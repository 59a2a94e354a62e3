//! Workers: each claims jobs from the queue and runs `render` on its own OS thread,
//! pinned to one device, turning progress into persisted events.
//!
//! The async side (claim, heartbeat, events) never blocks on tensors; the render thread
//! never touches the database. They talk over channels.
//!
//! With `workers.batch_size` above 1 a worker packs queued jobs of the same size and
//! models into one batch that the render thread steps together (`render::batch`), and
//! refills the batch as its jobs end.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::Config;
use crate::queue::{
    EventKind, Finish, Job, JobRevision, JobStore, Metrics, Progress, QueueError, Scope,
};
use crate::render::models::{
    self as catalogue, DownloadProgress, DownloadWatcher, ModelCache, ModelKind, Presence,
};
use crate::render::spec::StoredSpec;
use crate::render::{
    render_batch_hosted, BatchHost, BatchJob, BatchKey, CancelToken, ForkStart, ModelSet,
    ModelsSpec, ProgressEvent, RenderError, RenderJob, RenderOutcome, Revision, Steering,
    Validated,
};
use crate::storage::{ArtifactStore, FORK_POINT_FILE};

pub mod retention;

/// Where clients fetch a job's artifacts, as events record it. The API owns that
/// spelling (`api::links`); the command line hands it to the workers, which know no HTTP.
#[derive(Debug, Clone, Copy)]
pub struct ArtifactUrls {
    /// A job's artifact by name: `image.png`, `metadata.json`, `frames`, `video.mp4`.
    pub artifact: fn(Uuid, &str) -> String,
    /// One frame, by the step it was taken after.
    pub frame: fn(Uuid, u32) -> String,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("device {device:?}: {reason}")]
    Device { device: String, reason: String },
    #[error("cannot start a render thread: {0}")]
    Thread(std::io::Error),
}

/// `cpu`, `cuda:N` or `auto`, parsed as the CLI parses `--device`. A build without the
/// `cuda` feature refuses `cuda:N` up front rather than failing on the first job.
pub fn parse_device(name: &str) -> Result<Device, WorkerError> {
    catalogue::parse_device(name).map_err(|e| WorkerError::Device {
        device: name.to_owned(),
        reason: e.to_string(),
    })
}

/// The model cache the workers read: `models.cache_dir`, else the environment's.
pub fn model_cache(config: &Config) -> ModelCache {
    ModelCache::configured(&config.models.cache_dir)
}

/// What each worker needs besides its device.
#[derive(Clone)]
pub struct WorkerContext {
    pub store: Arc<dyn JobStore>,
    pub artifacts: ArtifactStore,
    pub metrics: Arc<Metrics>,
    pub urls: ArtifactUrls,
    pub models: ModelCache,
    pub lease: Duration,
    pub heartbeat: Duration,
    pub poll: Duration,
    /// Jobs rendered together as one batch (`workers.batch_size`); 1 is no packing.
    pub batch_size: usize,
    /// How often a running job's cancel flag is read, for cancels made by another
    /// process (this process's own cancels arrive at once).
    pub cancel_check: Duration,
    /// The configured default models, reported at start.
    pub default_models: Vec<(ModelKind, String)>,
    /// `workers.cpu_threads`: the CPU op thread pool's size (0: one thread per core).
    pub cpu_threads: usize,
}

impl WorkerContext {
    pub fn new(
        store: Arc<dyn JobStore>,
        artifacts: ArtifactStore,
        metrics: Arc<Metrics>,
        urls: ArtifactUrls,
        config: &Config,
    ) -> WorkerContext {
        let w = &config.workers;
        WorkerContext {
            store,
            artifacts,
            metrics,
            urls,
            models: model_cache(config),
            lease: Duration::from_secs(w.lease_seconds),
            heartbeat: Duration::from_secs(w.heartbeat_seconds),
            poll: Duration::from_millis(w.poll_interval_ms.max(10)),
            batch_size: w.batch_size.max(1),
            cancel_check: Duration::from_millis(w.poll_interval_ms.clamp(10, 200)),
            default_models: default_models(config),
            cpu_threads: w.cpu_threads,
        }
    }
}

/// The models a job gets when it names none.
pub fn default_models(config: &Config) -> Vec<(ModelKind, String)> {
    std::iter::once((ModelKind::Vqgan, config.models.vqgan.clone()))
        .chain(
            config
                .models
                .clip
                .iter()
                .map(|c| (ModelKind::Clip, c.clone())),
        )
        .collect()
}

/// Whether each default model can be loaded without the network.
pub fn default_models_presence(config: &Config) -> Vec<(ModelKind, String, Presence)> {
    let cache = model_cache(config);
    default_models(config)
        .into_iter()
        .map(|(kind, spec)| {
            let presence = catalogue::presence(&spec, kind, &cache);
            (kind, spec, presence)
        })
        .collect()
}

/// Worker ids alive in this process. A worker row from this host whose process is
/// gone, or that claims this process's pid without being in here (the pid of a
/// restarted container's first process repeats), belongs to a dead run.
static LIVE_IN_PROCESS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

fn set_live(id: &str, live: bool) {
    let mut ids = LIVE_IN_PROCESS.lock().unwrap_or_else(|e| e.into_inner());
    ids.retain(|i| i != id);
    if live {
        ids.push(id.to_owned());
    }
}

/// Whether process `pid` of this host still exists (a zombie counts). Read from `/proc`,
/// so elsewhere every process is taken for alive and its jobs wait for their leases.
fn process_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        std::path::Path::new(&format!("/proc/{pid}")).exists()
    } else {
        true
    }
}

/// Workers of this host that died without saying goodbye (kill -9, a crash): their
/// leases expire now, so their jobs are requeued at once instead of after a lease.
async fn reclaim_dead_local_workers(store: &dyn JobStore) {
    let host = crate::queue::hostname();
    let own_pid = std::process::id();
    let workers = match store.workers().await {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!("listing workers to reclaim: {e}");
            return;
        }
    };
    for w in workers {
        if w.host != host {
            continue;
        }
        let dead = if w.pid == own_pid {
            !LIVE_IN_PROCESS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&w.id)
        } else {
            !process_alive(w.pid)
        };
        if !dead {
            continue;
        }
        match store.expire_worker(&w.id).await {
            Ok(held) => tracing::warn!(
                worker = %w.id,
                pid = w.pid,
                jobs = held,
                "worker of an earlier run on this host is gone; requeueing its jobs now"
            ),
            Err(e) => tracing::warn!(worker = %w.id, "reclaiming a dead worker: {e}"),
        }
    }
}

/// The running workers and the lease rescuer.
pub struct WorkerPool {
    tasks: Vec<JoinHandle<()>>,
}

impl WorkerPool {
    /// Starts one worker per device. Devices are checked before anything starts, and
    /// every worker has written its first heartbeat when this returns, so `/readyz`
    /// counts it from the moment the API answers.
    pub async fn start(
        ctx: WorkerContext,
        devices: &[String],
        shutdown: CancellationToken,
    ) -> Result<WorkerPool, WorkerError> {
        let parsed = devices
            .iter()
            .map(|d| parse_device(d).map(|dev| (d.trim().to_owned(), dev)))
            .collect::<Result<Vec<_>, _>>()?;
        log_default_models(&ctx);
        if ctx.cpu_threads > 0 && !catalogue::set_cpu_threads(ctx.cpu_threads) {
            tracing::warn!(
                "workers.cpu_threads = {}: the CPU thread pool was already running with {} threads",
                ctx.cpu_threads,
                catalogue::cpu_threads()
            );
        }
        let mut ids = Vec::with_capacity(parsed.len());
        for i in 0..parsed.len() {
            let id = format!("{}-{}-{i}", hostname_hint(), Uuid::now_v7().simple());
            set_live(&id, true);
            ids.push(id);
        }
        let mut tasks = vec![spawn_rescuer(ctx.clone(), shutdown.clone())];
        for (id, (name, device)) in ids.into_iter().zip(parsed) {
            let render = RenderThread::spawn(&id, device, ctx.models.clone())?;
            if let Err(e) = ctx.store.worker_heartbeat(&id, &name, None).await {
                tracing::warn!(worker = %id, "first heartbeat: {e}");
            }
            let worker = Worker {
                id,
                device: name,
                ctx: ctx.clone(),
                render,
                shutdown: shutdown.clone(),
            };
            tasks.push(tokio::spawn(worker.run()));
        }
        Ok(WorkerPool { tasks })
    }

    /// Waits until every worker has handed back its job and stopped (after shutdown).
    pub async fn join(self) {
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

fn log_default_models(ctx: &WorkerContext) {
    for (kind, spec) in &ctx.default_models {
        let presence = catalogue::presence(spec, *kind, &ctx.models);
        if presence.is_present() {
            tracing::info!(kind = %kind, model = %spec, presence = presence.as_str(), "default model ready");
        } else if ctx.models.is_offline() {
            tracing::warn!(kind = %kind, model = %spec, presence = presence.as_str(), cache = %ctx.models.root().display(),
                "default model not in the model cache and offline mode is on: jobs using it fail until `vqclip models pull` puts it there");
        } else {
            tracing::warn!(kind = %kind, model = %spec, presence = presence.as_str(), cache = %ctx.models.root().display(),
                "default model not in the model cache: the first job downloads it (or run `vqclip models pull` now)");
        }
    }
}

fn hostname_hint() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().chars().take(24).collect())
        .unwrap_or_else(|_| "worker".into())
}

/// Hands jobs of dead workers back to the queue. Any process with workers runs one.
fn spawn_rescuer(ctx: WorkerContext, shutdown: CancellationToken) -> JoinHandle<()> {
    tokio::spawn(async move {
        reclaim_dead_local_workers(ctx.store.as_ref()).await;
        let mut tick = tokio::time::interval(ctx.heartbeat);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match ctx.store.rescue_expired().await {
                Ok(rescued) => {
                    for r in rescued {
                        tracing::warn!(job = %r.job_id, state = %r.state, attempts = r.attempts, "lease expired; job rescued");
                        if r.state == crate::queue::JobState::Canceled {
                            remove_checkpoint(&ctx.artifacts, r.job_id).await;
                        }
                    }
                }
                Err(e) => tracing::warn!("rescuing expired leases: {e}"),
            }
        }
    })
}

/// Why a render gave no outcome.
#[derive(Debug, Clone)]
struct JobFailure {
    message: String,
    /// It may pass by itself (the network): requeue with a backoff, not fail.
    transient: bool,
}

impl JobFailure {
    fn permanent(message: impl Into<String>) -> JobFailure {
        JobFailure {
            message: message.into(),
            transient: false,
        }
    }
}

type RenderReply = Result<RenderOutcome, JobFailure>;

/// A canceled job's checkpoint is of no further use; a finished one's the render removes.
async fn remove_checkpoint(artifacts: &ArtifactStore, job: Uuid) {
    match artifacts.remove_checkpoint(job).await {
        Ok(()) => tracing::debug!(job = %job, "checkpoint removed"),
        Err(e) => tracing::warn!(job = %job, "removing the checkpoint: {e}"),
    }
}

/// How long a job waits after a transient failure on attempt `attempt`: 5 s, 10 s,
/// 20 s, … up to a minute.
fn retry_backoff(attempt: u32) -> Duration {
    let doublings = attempt.saturating_sub(1).min(4);
    Duration::from_secs((5u64 << doublings).min(60))
}

/// One job for the render thread. A worker sends a batch of them at once.
struct RenderRequest {
    job: RenderJob,
    progress: mpsc::UnboundedSender<ProgressEvent>,
    /// Model downloads the job waits on.
    downloads: mpsc::UnboundedSender<DownloadProgress>,
    cancel: CancelToken,
    /// Answered the moment this job ends, while the rest of its batch may go on.
    reply: oneshot::Sender<RenderReply>,
}

/// The OS thread that owns a worker's models and runs its renders.
struct RenderThread {
    requests: std::sync::mpsc::Sender<Vec<RenderRequest>>,
}

impl RenderThread {
    fn spawn(id: &str, device: Device, cache: ModelCache) -> Result<RenderThread, WorkerError> {
        let (tx, rx) = std::sync::mpsc::channel::<Vec<RenderRequest>>();
        std::thread::Builder::new()
            .name(format!("render-{id}"))
            .spawn(move || render_loop(device, cache, rx))
            .map_err(WorkerError::Thread)?;
        Ok(RenderThread { requests: tx })
    }
}

fn render_loop(
    device: Device,
    cache: ModelCache,
    requests: std::sync::mpsc::Receiver<Vec<RenderRequest>>,
) {
    // Models stay loaded while consecutive jobs name the same ones.
    let mut loaded: Option<(ModelsSpec, ModelSet)> = None;
    let mut deferred: VecDeque<Vec<RenderRequest>> = VecDeque::new();
    loop {
        let batch = match deferred.pop_front() {
            Some(batch) => batch,
            None => match requests.recv() {
                Ok(batch) => batch,
                Err(_) => return,
            },
        };
        for group in batchable_groups(batch) {
            render_group(
                group,
                &mut loaded,
                &device,
                &cache,
                &requests,
                &mut deferred,
            );
        }
    }
}

fn batch_key(r: &RenderRequest) -> BatchKey {
    BatchKey::of(&r.job.spec)
}

/// The stored spec's fields the batch claim compares: render's [`BatchKey`], spelled as
/// JSON paths once per process.
static BATCH_KEY_PATHS: std::sync::LazyLock<Vec<String>> =
    std::sync::LazyLock::new(BatchKey::json_paths);

/// The claim packs only jobs of one size and one model set; should anything else
/// arrive together, it renders in a batch of its own rather than failing.
fn batchable_groups(mut batch: Vec<RenderRequest>) -> Vec<Vec<RenderRequest>> {
    let mut groups = Vec::new();
    while let Some(first) = batch.first().map(batch_key) {
        let (same, rest) = batch.into_iter().partition(|r| batch_key(r) == first);
        groups.push(same);
        batch = rest;
    }
    groups
}

/// The render thread's side of a running batch: answers each job the moment it
/// ends, and lets in the jobs the worker claims to take the place of ended ones.
struct BatchOnThread<'r> {
    key: BatchKey,
    replies: Vec<Option<oneshot::Sender<RenderReply>>>,
    downloads: Vec<mpsc::UnboundedSender<DownloadProgress>>,
    requests: &'r std::sync::mpsc::Receiver<Vec<RenderRequest>>,
    /// Requests for another batch, rendered after this one.
    deferred: &'r mut VecDeque<Vec<RenderRequest>>,
}

impl BatchOnThread<'_> {
    fn join(&mut self, request: RenderRequest) -> BatchJob<'static> {
        self.replies.push(Some(request.reply));
        self.downloads.push(request.downloads);
        BatchJob::new(Cow::Owned(request.job), request.progress, request.cancel)
    }
}

impl BatchHost<'static> for BatchOnThread<'_> {
    fn admit(&mut self) -> Vec<BatchJob<'static>> {
        let mut joining = Vec::new();
        while let Ok(batch) = self.requests.try_recv() {
            let (same, other): (Vec<_>, Vec<_>) =
                batch.into_iter().partition(|r| batch_key(r) == self.key);
            if !other.is_empty() {
                self.deferred.push_back(other);
            }
            for request in same {
                joining.push(self.join(request));
            }
        }
        joining
    }

    fn ended(&mut self, index: usize, outcome: Result<RenderOutcome, RenderError>) {
        if let Some(reply) = self.replies.get_mut(index).and_then(Option::take) {
            let _ = reply.send(outcome.map_err(|e| JobFailure::permanent(e.to_string())));
        }
    }
}

fn render_group(
    group: Vec<RenderRequest>,
    loaded: &mut Option<(ModelsSpec, ModelSet)>,
    device: &Device,
    cache: &ModelCache,
    requests: &std::sync::mpsc::Receiver<Vec<RenderRequest>>,
    deferred: &mut VecDeque<Vec<RenderRequest>>,
) {
    let Some(key) = group.first().map(batch_key) else {
        return;
    };
    let mut host = BatchOnThread {
        key: key.clone(),
        replies: Vec::with_capacity(group.len()),
        downloads: Vec::with_capacity(group.len()),
        requests,
        deferred,
    };
    let jobs: Vec<BatchJob<'static>> = group.into_iter().map(|r| host.join(r)).collect();
    let styles_video = key.styles_video();
    let models_spec = key.models;
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| -> Result<(), JobFailure> {
        if loaded.as_ref().map(|(spec, _)| spec) != Some(&models_spec) {
            *loaded = None;
            // Every model first, so that a job that cannot get them says which are
            // missing, why and what to do, and downloads show in its events.
            let watched = cache
                .clone()
                .with_download_watcher(download_watcher(host.downloads.clone()));
            let wanted: Vec<(ModelKind, &str)> =
                std::iter::once((ModelKind::Vqgan, models_spec.vqgan.as_str()))
                    .chain(
                        models_spec
                            .clip
                            .iter()
                            .map(|c| (ModelKind::Clip, c.as_str())),
                    )
                    .collect();
            catalogue::ensure_models(&wanted, &watched).map_err(|u| JobFailure {
                message: u.message,
                transient: u.transient,
            })?;
            let set = ModelSet::load(&models_spec, cache, device)
                .map_err(|e| JobFailure::permanent(format!("loading models: {e}")))?;
            *loaded = Some((models_spec.clone(), set));
        }
        let Some((_, models)) = loaded.as_ref() else {
            return Err(JobFailure::permanent("models are not loaded"));
        };
        if styles_video {
            for (i, mut entry) in jobs.into_iter().enumerate() {
                let outcome = crate::render::video::render_video(
                    &entry.job,
                    models,
                    entry.progress.as_mut(),
                    &entry.cancel,
                );
                host.ended(i, outcome);
            }
        } else {
            render_batch_hosted(jobs, models, &mut host);
        }
        Ok(())
    }));
    let failure = match result {
        Ok(Ok(())) => JobFailure::permanent("the render ended without an outcome"),
        Ok(Err(e)) => e,
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            *loaded = None;
            JobFailure::permanent(format!("the render crashed: {what}"))
        }
    };
    // Jobs the render did not answer (models failed to load, a panic) fail alike.
    for reply in host.replies.into_iter().flatten() {
        let _ = reply.send(Err(failure.clone()));
    }
}

/// Forwards model download progress to every job waiting on it.
fn download_watcher(jobs: Vec<mpsc::UnboundedSender<DownloadProgress>>) -> DownloadWatcher {
    DownloadWatcher(Arc::new(move |p: &DownloadProgress| {
        for job in &jobs {
            let _ = job.send(p.clone());
        }
    }))
}

struct Worker {
    id: String,
    device: String,
    ctx: WorkerContext,
    render: RenderThread,
    shutdown: CancellationToken,
}

/// What a running batch's futures report to its loop.
enum BatchEvent {
    /// A job's run ended and was recorded.
    Ended,
    /// The refill claim: a job to join the batch, or none.
    Joined(Option<Box<(Job, RenderRequest, Pending)>>),
}

/// How a run ended, from the queue's point of view.
enum RunEnd {
    Finished(Finish),
    /// Graceful shutdown: back to the queue, to resume from the checkpoint.
    Interrupted {
        checkpoint: Option<String>,
        step: u32,
    },
    /// Another worker owns the job now; touch nothing.
    LeaseLost,
}

impl Worker {
    async fn run(self) {
        tracing::info!(worker = %self.id, device = %self.device, "worker started");
        let queued = self.ctx.store.job_queued();
        while !self.shutdown.is_cancelled() {
            if let Err(e) = self
                .ctx
                .store
                .worker_heartbeat(&self.id, &self.device, None)
                .await
            {
                tracing::warn!(worker = %self.id, "heartbeat: {e}");
            }
            // Registered before the claim so that a job queued in between still wakes us.
            let notified = queued.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self
                .ctx
                .store
                .claim(&self.id, &self.device, self.ctx.lease)
                .await
            {
                Ok(Some(job)) => {
                    let batch = self.pack(job).await;
                    self.run_batch(batch).await
                }
                Ok(None) => {
                    tokio::select! {
                        _ = &mut notified => {}
                        _ = tokio::time::sleep(self.ctx.poll) => {}
                        _ = self.shutdown.cancelled() => {}
                    }
                }
                Err(e) => {
                    tracing::warn!(worker = %self.id, "claiming: {e}");
                    tokio::time::sleep(self.ctx.poll).await;
                }
            }
        }
        let _ = self.ctx.store.worker_gone(&self.id).await;
        set_live(&self.id, false);
        tracing::info!(worker = %self.id, "worker stopped");
    }

    /// The claimed job plus up to `batch_size - 1` queued jobs that can share its
    /// steps: same width, height and models, each taken by its own atomic claim.
    async fn pack(&self, leader: Job) -> Vec<Job> {
        let mut batch = vec![leader];
        while batch.len() < self.ctx.batch_size {
            let claim = self.ctx.store.claim_alongside(
                &self.id,
                &self.device,
                self.ctx.lease,
                batch[0].id,
                &BATCH_KEY_PATHS,
            );
            match claim.await {
                Ok(Some(job)) => batch.push(job),
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(worker = %self.id, "claiming a job to batch: {e}");
                    break;
                }
            }
        }
        batch
    }

    /// Renders the jobs as one batch on the render thread and follows each to its
    /// end: every job keeps its own lease, events, cancellation and outcome. When a
    /// job ends while others go on, a compatible queued job takes its place.
    async fn run_batch(&self, jobs: Vec<Job>) {
        let Some(leader) = jobs.first().map(|j| j.id) else {
            return;
        };
        let mut requests = Vec::with_capacity(jobs.len());
        let mut followed = Vec::with_capacity(jobs.len());
        for job in jobs {
            if let Some((request, pending)) = self.start_job(&job).await {
                requests.push(request);
                followed.push((job, pending));
            }
        }
        if followed.is_empty() {
            return;
        }
        if followed.len() > 1 {
            tracing::info!(worker = %self.id, jobs = followed.len(), "rendering a batch");
        }
        if self.render.requests.send(requests).is_err() {
            for (job, _) in &followed {
                self.render_thread_gone(job).await;
            }
            return;
        }
        // Every job's follower and the refill claim are polled together. Awaiting the
        // claim outside this set (as once done) left the followers unpolled, one of them
        // possibly inside a write transaction: the claim then waited on a lock that
        // could not be released, and every writer hit `busy_timeout` (issue 9, defect 1).
        let mut running: FuturesUnordered<BoxFuture<'_, BatchEvent>> = FuturesUnordered::new();
        for (job, pending) in followed {
            running.push(Box::pin(async move {
                self.see_through(job, pending).await;
                BatchEvent::Ended
            }));
        }
        let mut claiming = false;
        while let Some(event) = running.next().await {
            let ended = match event {
                BatchEvent::Ended => true,
                BatchEvent::Joined(joined) => {
                    claiming = false;
                    if let Some(joined) = joined {
                        let (job, request, pending) = *joined;
                        tracing::info!(worker = %self.id, job = %job.id, "job joins the running batch");
                        // Should the batch have ended meanwhile, the render thread starts a new one.
                        let sent = self.render.requests.send(vec![request]).is_ok();
                        running.push(Box::pin(async move {
                            if sent {
                                self.see_through(job, pending).await;
                            } else {
                                self.render_thread_gone(&job).await;
                            }
                            BatchEvent::Ended
                        }));
                    }
                    false
                }
            };
            // A place freed by an ended job is offered to one compatible queued job.
            let refill = ended
                && !claiming
                && !running.is_empty()
                && running.len() < self.ctx.batch_size
                && !self.shutdown.is_cancelled();
            if refill {
                claiming = true;
                running.push(Box::pin(async move {
                    BatchEvent::Joined(self.claim_to_join(leader).await.map(Box::new))
                }));
            }
        }
    }

    /// A queued job that can share the running batch's steps, ready to render.
    async fn claim_to_join(&self, leader: Uuid) -> Option<(Job, RenderRequest, Pending)> {
        let claim = self.ctx.store.claim_alongside(
            &self.id,
            &self.device,
            self.ctx.lease,
            leader,
            &BATCH_KEY_PATHS,
        );
        let job = match claim.await {
            Ok(Some(job)) => job,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(worker = %self.id, "claiming a job to batch: {e}");
                return None;
            }
        };
        let (request, pending) = self.start_job(&job).await?;
        Some((job, request, pending))
    }

    /// A claimed job's render request, or `None` when it failed before rendering.
    async fn start_job(&self, job: &Job) -> Option<(RenderRequest, Pending)> {
        tracing::info!(worker = %self.id, job = %job.id, attempt = job.attempts, "job started");
        match self.prepare(job).await {
            Ok(render_job) => Some(Pending::new(render_job, job.cancel_requested)),
            Err(error) => {
                let end = RunEnd::Finished(Finish::Failed { error });
                self.conclude(job, Instant::now(), end).await;
                None
            }
        }
    }

    async fn render_thread_gone(&self, job: &Job) {
        let error = "the worker's render thread has stopped".to_string();
        self.conclude(
            job,
            Instant::now(),
            RunEnd::Finished(Finish::Failed { error }),
        )
        .await;
    }

    /// Follows one job to its end and records it.
    async fn see_through(&self, job: Job, pending: Pending) {
        // Every line logged while following the job carries its id (a span, for JSON logs).
        let span = tracing::info_span!("job", job_id = %job.id);
        tracing::Instrument::instrument(
            async {
                let started = Instant::now();
                let end = self.follow(&job, pending).await;
                self.conclude(&job, started, end).await;
            },
            span,
        )
        .await
    }

    /// Records how a job's run ended.
    async fn conclude(&self, job: &Job, started: Instant, end: RunEnd) {
        let store = &self.ctx.store;
        let mut failure = None;
        let outcome = match end {
            RunEnd::Finished(finish) => {
                let state = match &finish {
                    Finish::Succeeded { .. } => "succeeded",
                    Finish::Failed { error } => {
                        failure = Some(error.clone());
                        "failed"
                    }
                    Finish::Retry { error, .. } => {
                        failure = Some(error.clone());
                        "requeued after a transient failure"
                    }
                    Finish::Canceled { .. } => "canceled",
                };
                let canceled = matches!(finish, Finish::Canceled { .. });
                let recorded = store.finish(job.id, &self.id, finish).await;
                let state = match &recorded {
                    // Out of attempts: the retry became a failure.
                    Ok(j) if j.state == crate::queue::JobState::Failed => "failed",
                    _ => state,
                };
                if state != "requeued after a transient failure" {
                    self.ctx
                        .metrics
                        .job_finished(state, started.elapsed().as_secs_f64());
                }
                if canceled && recorded.is_ok() {
                    remove_checkpoint(&self.ctx.artifacts, job.id).await;
                }
                // Requeued jobs keep theirs: they may resume here.
                if recorded.as_ref().is_ok_and(|j| j.state.is_terminal()) {
                    if let Err(e) = self.ctx.artifacts.drop_scratch(job.id).await {
                        tracing::warn!(job = %job.id, "removing the scratch copy: {e}");
                    }
                }
                recorded.map(|_| state)
            }
            RunEnd::Interrupted { checkpoint, step } => {
                // The checkpoint and frames go to the store before the queue hears of
                // them, so whichever machine claims the job next can resume it.
                let stored = self.ctx.artifacts.persist_job(job.id).await;
                if let Err(e) = &stored {
                    tracing::warn!(worker = %self.id, job = %job.id, "storing the checkpoint: {e}");
                }
                let saved = match &checkpoint {
                    Some(c) if stored.is_ok() => {
                        store.set_checkpoint(job.id, &self.id, c, step).await
                    }
                    _ => Ok(()),
                };
                match saved {
                    Ok(()) => store.release(job.id, &self.id).await.map(|_| "requeued"),
                    Err(e) => Err(e),
                }
            }
            RunEnd::LeaseLost => Ok("abandoned (lease lost)"),
        };
        match (outcome, failure) {
            (Ok(state), Some(error)) => tracing::warn!(
                worker = %self.id,
                job = %job.id,
                attempt = job.attempts,
                max_attempts = job.max_attempts,
                // Debug keeps a multi-line reason on the one log line.
                error = ?error,
                "job {state}"
            ),
            (Ok(state), None) => tracing::info!(worker = %self.id, job = %job.id, "job {state}"),
            (Err(e), failure) => tracing::warn!(
                worker = %self.id,
                job = %job.id,
                error = failure.as_deref().unwrap_or("none"),
                "recording the end of the job: {e}"
            ),
        }
    }

    /// Everything the render needs: the spec, its images, where to write, where to resume.
    async fn prepare(&self, job: &Job) -> Result<RenderJob, String> {
        // Validated at submit; validated again only if stored by another version.
        let (spec, validated) = <StoredSpec as serde::Deserialize>::deserialize(&job.spec)
            .map_err(|e| format!("the stored job spec cannot be read by this version: {e}"))?
            .into_validated()
            .map_err(|e| format!("the stored job spec is not valid for this version: {e}"))?;
        let out_dir = self
            .ctx
            .artifacts
            .create_job_dir(job.id)
            .map_err(|e| e.to_string())?;
        let stored = self
            .ctx
            .store
            .revisions(job.id)
            .await
            .map_err(|e| format!("reading the job's revisions: {e}"))?;
        let mut revisions = Vec::with_capacity(stored.len());
        let mut images = validated
            .uploads()
            .map(|(r, id)| (r.to_owned(), id))
            .collect::<Vec<_>>();
        for r in &stored {
            let (revision, checked) = render_revision(r)?;
            images.extend(checked.uploads().map(|(r, id)| (r.to_owned(), id)));
            revisions.push(revision);
        }
        let inputs = self.read_uploads(images).await?;
        let lineage = self
            .ctx
            .store
            .lineage(job.id)
            .await
            .map_err(|e| format!("reading the job's parent: {e}"))?;
        let fork_point = out_dir.join(FORK_POINT_FILE);
        if let Some(parent) = lineage.parent.filter(|_| job.checkpoint.is_none()) {
            // The API copies the fork point right after the submit; a worker that
            // claimed the fork in between makes the same copy itself.
            if self
                .ctx
                .artifacts
                .artifact(job.id, FORK_POINT_FILE)
                .await
                .is_err()
            {
                self.ctx
                    .artifacts
                    .copy_fork_point(parent.job, parent.step, job.id)
                    .await
                    .map_err(|e| {
                        format!(
                            "the fork point (job {}, step {}): {e}",
                            parent.job, parent.step
                        )
                    })?;
            }
        }
        // A job that ran elsewhere (or a fork) starts from what the store holds.
        if job.checkpoint.is_some() || lineage.parent.is_some() {
            match self.ctx.artifacts.restore_job(job.id).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(worker = %self.id, job = %job.id, files = n, "fetched the job's checkpoint and frames from the artifact store")
                }
                Err(e) => {
                    tracing::warn!(worker = %self.id, job = %job.id, "fetching the checkpoint: {e}; starting over")
                }
            }
        }
        let resume = job
            .checkpoint
            .as_ref()
            .map(|c| out_dir.join(c))
            .filter(|p| p.is_file());
        // Drawn at submit; only jobs stored before that have neither.
        let seed = job.seed.or(spec.seed).unwrap_or_else(rand::random);
        let reset_optimizer = job.spec["fork"]["reset_optimizer"].as_bool() == Some(true);
        let fork = (lineage.parent.is_some() && fork_point.is_file()).then_some(ForkStart {
            path: fork_point,
            reset_optimizer,
        });
        if lineage.parent.is_some() && fork.is_none() && resume.is_none() {
            return Err("the fork point could not be fetched from the artifact store".into());
        }
        let mut render = RenderJob::validated(spec, validated, seed, out_dir);
        render.resume = resume;
        render.fork = fork;
        render.inputs = inputs;
        // Applied revisions replay at their steps; pending ones wait at the first boundary.
        // All are listed: a checkpoint names the one in force when it was written.
        for revision in &revisions {
            if revision.step.is_none() {
                render.steering.send(revision.clone());
            }
        }
        render.revisions = revisions;
        Ok(render)
    }

    /// The bytes of the uploads a spec names, keyed by the reference as written.
    async fn read_uploads(
        &self,
        uploads: Vec<(String, Uuid)>,
    ) -> Result<HashMap<String, Vec<u8>>, String> {
        let mut inputs = HashMap::new();
        for (reference, id) in uploads {
            let upload = self
                .ctx
                .store
                .get_upload(id, &Scope::unrestricted())
                .await
                .map_err(|e| format!("{reference}: {e}"))?;
            let bytes = self
                .ctx
                .artifacts
                .read_upload(&upload.file_name)
                .await
                .map_err(|e| format!("{reference}: {e}"))?;
            inputs.insert(reference, bytes);
        }
        Ok(inputs)
    }

    /// Hands a running render the revisions made since the last look, each once, with
    /// the uploads they name.
    async fn feed_revisions(&self, job: &Job, feed: &mut SteerFeed) {
        let revisions = match self.ctx.store.revisions(job.id).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(worker = %self.id, job = %job.id, "reading revisions: {e}");
                return;
            }
        };
        let known = feed.known;
        for r in revisions
            .iter()
            .filter(|r| r.number > known && r.step.is_none())
        {
            let revision = match render_revision(r) {
                Ok((mut revision, validated)) => {
                    let uploads = validated
                        .uploads()
                        .map(|(r, id)| (r.to_owned(), id))
                        .collect();
                    match self.read_uploads(uploads).await {
                        Ok(inputs) => {
                            revision.inputs = inputs;
                            Ok(revision)
                        }
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(e),
            };
            match revision {
                Ok(revision) => feed.steering.send(revision),
                // Validated at PATCH by this service; skipped rather than failing the job.
                Err(e) => {
                    tracing::warn!(worker = %self.id, job = %job.id, "skipping revision {}: {e}", r.number)
                }
            }
            feed.known = r.number;
        }
    }

    /// Follows one job of a batch until the render thread answers for it: records its
    /// progress, renews its lease, passes on cancellation and shutdown.
    async fn follow(&self, job: &Job, pending: Pending) -> RunEnd {
        let Pending {
            out_dir,
            mut progress,
            mut downloads,
            mut reply,
            cancel,
            steering,
            known_revision,
        } = pending;
        let mut lease_lost = false;
        let mut interrupted = false;
        let mut progress_open = true;
        let mut downloads_open = true;
        let mut last_download_note: Option<Instant> = None;
        let mut last_elapsed = 0.0;
        let mut heartbeat = tokio::time::interval(self.ctx.heartbeat);
        heartbeat.tick().await;
        let mut cancels = self.ctx.store.cancellations();
        let mut cancels_open = true;
        let mut cancel_check = tokio::time::interval(self.ctx.cancel_check);
        cancel_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut steered = SteerFeed {
            steering,
            known: known_revision,
        };
        let mut steers = self.ctx.store.steerings();
        let mut steers_open = true;
        let mut result = loop {
            tokio::select! {
                biased;
                // A cancel made in this process: the render stops before its next step.
                id = cancels.recv(), if cancels_open && !cancel.is_canceled() => match id {
                    Ok(id) if id == job.id => cancel.cancel(),
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        if matches!(self.ctx.store.cancel_requested(job.id).await, Ok(true)) {
                            cancel.cancel();
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => cancels_open = false,
                },
                // A revision: handed to the render before its next step boundary.
                id = steers.recv(), if steers_open => match id {
                    Ok(id) if id == job.id => self.feed_revisions(job, &mut steered).await,
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        self.feed_revisions(job, &mut steered).await
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => steers_open = false,
                },
                event = progress.recv(), if progress_open => match event {
                    Some(event) => {
                        if let Err(e) = self.record(job, &out_dir, event, &cancel, &mut last_elapsed).await {
                            lease_lost |= self.lease_error(job, e, &cancel);
                        }
                    }
                    None => progress_open = false,
                },
                answer = &mut reply => {
                    // The render thread sends a job's events before its answer.
                    while let Ok(event) = progress.try_recv() {
                        if let Err(e) = self.record(job, &out_dir, event, &cancel, &mut last_elapsed).await {
                            lease_lost |= self.lease_error(job, e, &cancel);
                        }
                    }
                    break answer.unwrap_or_else(|_| Err(JobFailure::permanent("the render thread stopped mid-job")));
                }
                note = downloads.recv(), if downloads_open => match note {
                    Some(note) => {
                        let done = note.total == Some(note.bytes);
                        let due = last_download_note.is_none_or(|t| t.elapsed() >= DOWNLOAD_NOTE_EVERY);
                        if done || due {
                            last_download_note = Some(Instant::now());
                            let data = json!({
                                "state": "running",
                                "phase": "downloading models",
                                "model": note.model,
                                "file": note.file,
                                "bytes": note.bytes,
                                "total_bytes": note.total,
                            });
                            if let Err(e) = self.ctx.store.append_event(job.id, EventKind::State, data).await {
                                tracing::warn!(worker = %self.id, job = %job.id, "recording download progress: {e}");
                            }
                        }
                    }
                    None => downloads_open = false,
                },
                // A cancel made by another process, read without waiting for a progress
                // write; and revisions made since the last look, by any node.
                _ = cancel_check.tick(), if !cancel.is_canceled() => {
                    if matches!(self.ctx.store.cancel_requested(job.id).await, Ok(true)) {
                        cancel.cancel();
                    }
                    self.feed_revisions(job, &mut steered).await;
                }
                _ = heartbeat.tick() => {
                    let _ = self.ctx.store.worker_heartbeat(&self.id, &self.device, Some(job.id)).await;
                    match self.ctx.store.renew(job.id, &self.id, self.ctx.lease).await {
                        Ok(lease) if lease.cancel_requested => cancel.cancel(),
                        Ok(_) => {}
                        Err(e) => lease_lost |= self.lease_error(job, e, &cancel),
                    }
                }
                _ = self.shutdown.cancelled(), if !interrupted => {
                    interrupted = true;
                    cancel.interrupt();
                }
            }
        };
        if lease_lost {
            return RunEnd::LeaseLost;
        }
        // Succeeded is reported only once image, video, metadata and frames are stored;
        // a store that fails now may work on the next attempt.
        if matches!(result, Ok(RenderOutcome::Completed(_))) {
            let stored = match self.ctx.artifacts.persist_job(job.id).await {
                Ok(_) => self.ctx.artifacts.remove_checkpoint(job.id).await,
                Err(e) => Err(e),
            };
            if let Err(e) = stored {
                result = Err(JobFailure {
                    message: format!("storing the job's artifacts: {e}"),
                    transient: true,
                });
            }
        }
        match result {
            Ok(RenderOutcome::Completed(artifacts)) => {
                let link = |name| (self.ctx.urls.artifact)(job.id, name);
                RunEnd::Finished(Finish::Succeeded {
                    data: json!({
                        "state": "succeeded",
                        "image": link("image.png"),
                        "metadata": link("metadata.json"),
                        "frames": link("frames"),
                        "frame_count": artifacts.frames.len(),
                        "video": artifacts.video.as_ref().map(|_| link("video.mp4")),
                    }),
                })
            }
            Ok(RenderOutcome::Canceled { step }) => RunEnd::Finished(Finish::Canceled { step }),
            Ok(RenderOutcome::Interrupted { checkpoint, step }) => RunEnd::Interrupted {
                checkpoint: relative(&out_dir, &checkpoint),
                step,
            },
            Err(JobFailure {
                message,
                transient: true,
            }) if job.attempts < job.max_attempts => {
                let after = retry_backoff(job.attempts);
                RunEnd::Finished(Finish::Retry {
                    error: format!(
                        "{message}\nThis looks temporary: attempt {} of {} failed; the job is retried in {} s.",
                        job.attempts,
                        job.max_attempts,
                        after.as_secs()
                    ),
                    after,
                })
            }
            Err(JobFailure { message, .. }) => RunEnd::Finished(Finish::Failed { error: message }),
        }
    }

    /// A lease error means another worker owns the job: stop rendering it.
    fn lease_error(&self, job: &Job, e: QueueError, cancel: &CancelToken) -> bool {
        match e {
            QueueError::LeaseLost { .. } => {
                tracing::warn!(worker = %self.id, job = %job.id, "lease lost; stopping the render");
                cancel.cancel();
                true
            }
            e => {
                tracing::warn!(worker = %self.id, job = %job.id, "recording progress: {e}");
                false
            }
        }
    }

    async fn record(
        &self,
        job: &Job,
        out_dir: &Path,
        event: ProgressEvent,
        cancel: &CancelToken,
        last_elapsed: &mut f64,
    ) -> Result<(), QueueError> {
        let store = &self.ctx.store;
        match event {
            ProgressEvent::Step {
                step,
                total,
                loss,
                losses,
                elapsed_s,
                eta_s,
            } => {
                if elapsed_s > *last_elapsed {
                    self.ctx
                        .metrics
                        .step_duration
                        .observe(elapsed_s - *last_elapsed);
                }
                *last_elapsed = elapsed_s;
                let finite = |x: f32| x.is_finite().then_some(x as f64);
                let progress = Progress {
                    step,
                    total,
                    loss: finite(loss),
                    eta_seconds: eta_s.is_finite().then_some(eta_s),
                };
                let mut data = json!({
                    "step": step,
                    "total": total,
                    "loss": progress.loss,
                    "losses": losses.iter().map(|l| finite(*l)).collect::<Vec<_>>(),
                    "elapsed_seconds": elapsed_s,
                    "eta_seconds": progress.eta_seconds,
                });
                add_video_frame(&mut data, &job.spec, step, total);
                if store
                    .progress(job.id, &self.id, progress, data)
                    .await?
                    .cancel_requested
                {
                    cancel.cancel();
                }
            }
            ProgressEvent::Frame { step, path } => {
                // The saved state beside the frame first: a frame the store holds can be
                // forked from.
                let state = path.with_extension("ckpt");
                if state.is_file() {
                    if let Err(e) = self.ctx.artifacts.persist(job.id, &state).await {
                        tracing::warn!(worker = %self.id, job = %job.id, step, "storing a frame's state: {e}");
                    }
                }
                // An event names only a frame the store holds.
                if let Err(e) = self.ctx.artifacts.persist(job.id, &path).await {
                    tracing::warn!(worker = %self.id, job = %job.id, step, "storing a frame: {e}");
                    return Ok(());
                }
                let url = (self.ctx.urls.frame)(job.id, step);
                store
                    .append_event(
                        job.id,
                        EventKind::Frame,
                        json!({ "step": step, "url": url }),
                    )
                    .await?;
            }
            ProgressEvent::Steered {
                revision,
                step,
                changes,
            } => {
                let data = json!({ "revision": revision, "step": step, "changes": changes });
                store
                    .revision_applied(job.id, &self.id, revision, step, data)
                    .await?;
            }
            ProgressEvent::Checkpoint { path, step } => {
                // The queue points at a checkpoint only once the store holds it.
                if let Err(e) = self.ctx.artifacts.persist(job.id, &path).await {
                    tracing::warn!(worker = %self.id, job = %job.id, step, "storing a checkpoint: {e}");
                    return Ok(());
                }
                if let Some(rel) = relative(out_dir, &path) {
                    store.set_checkpoint(job.id, &self.id, &rel, step).await?;
                }
            }
        }
        Ok(())
    }
}

/// A video-styling job's progress also says which frame (0-based, of `frames`) and
/// which step of that frame (1-based) the job is at.
fn add_video_frame(data: &mut serde_json::Value, spec: &serde_json::Value, step: u32, total: u32) {
    let Some(style) = spec.get("video_style").filter(|v| v.is_object()) else {
        return;
    };
    let per_frame = style
        .get("steps_per_frame")
        .and_then(|v| v.as_u64())
        .or_else(|| spec.get("steps").and_then(|v| v.as_u64()))
        .unwrap_or(1)
        .max(1);
    let done = u64::from(step.saturating_sub(1));
    data["frame"] = json!(done / per_frame);
    data["frames"] = json!(u64::from(total) / per_frame);
    data["frame_step"] = json!(done % per_frame + 1);
}

/// Download progress is recorded as an event at most this often (and when a file is done).
const DOWNLOAD_NOTE_EVERY: Duration = Duration::from_millis(500);

/// The worker's side of one job handed to the render thread.
struct Pending {
    out_dir: std::path::PathBuf,
    progress: mpsc::UnboundedReceiver<ProgressEvent>,
    downloads: mpsc::UnboundedReceiver<DownloadProgress>,
    reply: oneshot::Receiver<RenderReply>,
    cancel: CancelToken,
    /// Where revisions made while the job renders go.
    steering: Steering,
    /// The highest revision number the render already has.
    known_revision: u32,
}

impl Pending {
    fn new(job: RenderJob, cancel_requested: bool) -> (RenderRequest, Pending) {
        let (progress_tx, progress_rx) = mpsc::unbounded_channel();
        let (downloads_tx, downloads_rx) = mpsc::unbounded_channel();
        let (reply_tx, reply_rx) = oneshot::channel();
        let cancel = CancelToken::new();
        if cancel_requested {
            cancel.cancel();
        }
        let known_revision = job
            .revisions
            .iter()
            .map(|r| r.number)
            .chain([job.steering.last_number()])
            .max()
            .unwrap_or(0);
        let pending = Pending {
            out_dir: job.out_dir.clone(),
            progress: progress_rx,
            downloads: downloads_rx,
            reply: reply_rx,
            cancel: cancel.clone(),
            steering: job.steering.clone(),
            known_revision,
        };
        let request = RenderRequest {
            job,
            progress: progress_tx,
            downloads: downloads_tx,
            cancel,
            reply: reply_tx,
        };
        (request, pending)
    }
}

/// A stored revision as the render takes it: its document read and trusted as at submit.
fn render_revision(r: &JobRevision) -> Result<(Revision, Validated), String> {
    let (spec, validated) = <StoredSpec as serde::Deserialize>::deserialize(&r.spec)
        .map_err(|e| format!("revision {} cannot be read by this version: {e}", r.number))?
        .into_validated()
        .map_err(|e| format!("revision {} is not valid for this version: {e}", r.number))?;
    let revision = Revision {
        number: r.number,
        step: r.step,
        spec,
        prompts: validated.prompts.clone(),
        changes: r.changes.clone(),
        inputs: HashMap::new(),
    };
    Ok((revision, validated))
}

/// Where a running render's new revisions go, and the last one it was given.
struct SteerFeed {
    steering: Steering,
    known: u32,
}

/// Checkpoints are stored relative to the job directory, so the artifact root can move.
fn relative(out_dir: &Path, path: &Path) -> Option<String> {
    let rel = path.strip_prefix(out_dir).unwrap_or(path);
    rel.to_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_are_checked_up_front() {
        assert!(matches!(parse_device("cpu"), Ok(Device::Cpu)));
        if !candle_core::utils::cuda_is_available() {
            assert!(matches!(parse_device("auto"), Ok(Device::Cpu)));
        }
        let err = parse_device("gpu0").unwrap_err().to_string();
        assert!(err.contains("cuda:N"), "{err}");
        if !candle_core::utils::cuda_is_available() {
            let err = parse_device("cuda:0").unwrap_err().to_string();
            assert!(err.contains("without CUDA"), "{err}");
        }
    }

    fn request(width: u32, clip: &str) -> RenderRequest {
        let spec: crate::render::JobSpec = serde_json::from_value(json!({
            "prompts": "x", "width": width, "height": 32,
            "models": { "vqgan": "v", "clip": [clip] }
        }))
        .unwrap();
        let (request, _pending) = Pending::new(RenderJob::new(spec, "/nonexistent"), false);
        request
    }

    #[test]
    fn only_jobs_of_one_size_and_models_render_as_one_batch() {
        let batch = vec![
            request(32, "a"),
            request(48, "a"),
            request(32, "b"),
            request(32, "a"),
        ];
        let groups: Vec<Vec<(u32, String)>> = batchable_groups(batch)
            .into_iter()
            .map(|g| {
                g.iter()
                    .map(|r| (r.job.spec.width, r.job.spec.models.clip[0].clone()))
                    .collect()
            })
            .collect();
        let key = |w: u32, c: &str| (w, c.to_owned());
        assert_eq!(
            groups,
            vec![
                vec![key(32, "a"), key(32, "a")],
                vec![key(48, "a")],
                vec![key(32, "b")]
            ]
        );
    }
}
