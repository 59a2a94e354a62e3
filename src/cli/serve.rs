//! `vqclip serve | worker | migrate`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use vqclip::api::{self, AppState};
use vqclip::auth::Authenticator;
use vqclip::config::{Config, Overrides};
use vqclip::queue::{ApiKeys, Deliveries, JobStore, KeyBounds, Metrics, PgStore, SqliteStore};
use vqclip::storage::ArtifactStore;
use vqclip::webhooks::WebhookEngine;
use vqclip::worker::retention::spawn_pruner;
use vqclip::worker::{ArtifactUrls, WorkerContext, WorkerPool};

#[derive(clap::Args)]
pub struct CommonArgs {
    /// A TOML file layered over the defaults (config/default.toml documents every setting).
    #[arg(long, env = "VQCLIP_CONFIG")]
    config: Option<PathBuf>,
    /// Database URL, e.g. sqlite://data/vqclip.db [database.url].
    #[arg(long)]
    database_url: Option<String>,
    /// Directory for artifacts and uploads [storage.artifact_dir].
    #[arg(long)]
    artifact_dir: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Address to listen on, e.g. 127.0.0.1:8080 [server.bind].
    #[arg(long)]
    bind: Option<std::net::SocketAddr>,
    /// Number of workers in this process; 0 serves the API only [workers.count].
    #[arg(long)]
    workers: Option<usize>,
    /// Device of every worker: cpu or cuda:N [workers.device].
    #[arg(long)]
    device: Option<String>,
}

#[derive(clap::Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Number of workers [workers.count].
    #[arg(long)]
    workers: Option<usize>,
    /// Device of every worker: cpu or cuda:N [workers.device].
    #[arg(long)]
    device: Option<String>,
}

#[derive(clap::Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    common: CommonArgs,
}

fn load_config(common: &CommonArgs, mut overrides: Overrides) -> anyhow::Result<Config> {
    overrides.database_url = common.database_url.clone();
    overrides.artifact_dir = common.artifact_dir.clone();
    Ok(Config::load(common.config.as_deref(), &overrides)?)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The job store `database.url` names: `sqlite://…` (one machine, the default) or
/// `postgres://…` (several API and worker nodes on one database).
#[derive(Clone)]
pub(super) enum Store {
    Sqlite(Arc<SqliteStore>),
    Postgres(Arc<PgStore>),
}

impl Store {
    fn jobs(&self) -> Arc<dyn JobStore> {
        match self {
            Store::Sqlite(s) => s.clone(),
            Store::Postgres(s) => s.clone(),
        }
    }

    pub(super) fn keys(&self) -> Arc<dyn ApiKeys> {
        match self {
            Store::Sqlite(s) => s.clone(),
            Store::Postgres(s) => s.clone(),
        }
    }

    fn deliveries(&self) -> Arc<dyn Deliveries> {
        match self {
            Store::Sqlite(s) => s.clone(),
            Store::Postgres(s) => s.clone(),
        }
    }

    async fn close(&self) {
        match self {
            Store::Sqlite(s) => s.pool().close().await,
            Store::Postgres(s) => s.pool().close().await,
        }
    }
}

fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

pub(super) async fn open_store(config: &Config) -> anyhow::Result<Store> {
    let db = &config.database;
    // Claims (here and in `vqclip worker`) honour the per-key running bound.
    let bounds = KeyBounds {
        max_queued: config.auth.max_queued_per_key,
        max_running: config.auth.max_running_per_key,
    };
    if is_postgres(&db.url) {
        let store = PgStore::connect(&db.url, db.max_connections)
            .await
            .with_context(|| format!("opening the PostgreSQL database {}", redact(&db.url)))?;
        return Ok(Store::Postgres(Arc::new(store.with_key_bounds(bounds))));
    }
    let store = SqliteStore::connect(
        &db.url,
        std::time::Duration::from_millis(db.busy_timeout_ms),
        db.max_connections,
    )
    .await
    .with_context(|| format!("opening the database {}", db.url))?;
    Ok(Store::Sqlite(Arc::new(store.with_key_bounds(bounds))))
}

/// A database URL for logs and errors, without its password.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            let user = creds.split(':').next().unwrap_or_default();
            format!("{}{user}{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// The first SIGINT/SIGTERM asks for a graceful stop; a second one exits at once.
fn watch_signals(shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!("cannot listen for SIGTERM: {e}");
                    return;
                }
            };
        for round in 0..2 {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            if round == 0 {
                tracing::info!("shutting down: no new jobs; running jobs checkpoint and return to the queue (signal again to exit at once)");
                shutdown.cancel();
            } else {
                tracing::warn!("second signal: exiting without waiting");
                std::process::exit(130);
            }
        }
    });
}

async fn start_workers(
    config: &Config,
    store: Arc<dyn JobStore>,
    artifacts: ArtifactStore,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<WorkerPool> {
    // Events record the API's spelling of artifact URLs, whichever process writes them.
    let urls = ArtifactUrls {
        artifact: api::links::artifact,
        frame: api::links::frame,
    };
    let ctx = WorkerContext::new(store, artifacts, metrics, urls, config);
    Ok(WorkerPool::start(ctx, &config.workers.worker_devices(), shutdown).await?)
}

pub fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let config = load_config(
        &a.common,
        Overrides {
            bind: a.bind,
            workers: a.workers,
            device: a.device,
            ..Default::default()
        },
    )?;
    runtime()?.block_on(async move {
        let store = open_store(&config).await?;
        let artifacts = ArtifactStore::from_config(&config.storage)?;
        let metrics = Arc::new(Metrics::default());
        // Bound before the workers start, so a busy port fails before any job is claimed.
        let listener = tokio::net::TcpListener::bind(config.server.bind)
            .await
            .with_context(|| format!("listening on {}", config.server.bind))?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        watch_signals(shutdown.clone());
        let pool = start_workers(
            &config,
            store.jobs(),
            artifacts.clone(),
            metrics.clone(),
            shutdown.clone(),
        )
        .await?;
        println!("vqclip listening on http://{addr}");
        tracing::info!(
            "{} worker(s) on {:?}; database {}; artifacts in {}",
            config.workers.worker_devices().len(),
            config.workers.worker_devices(),
            redact(&config.database.url),
            artifacts.location()
        );
        let auth = Arc::new(Authenticator::new(store.keys(), config.auth.clone()));
        let webhooks = WebhookEngine::new(store.deliveries(), config.webhooks.clone())?;
        let sender = webhooks.spawn(shutdown.clone());
        wake_on_events(store.jobs(), &webhooks, shutdown.clone());
        let pruner = spawn_pruner(
            store.jobs(),
            artifacts.clone(),
            std::time::Duration::from_secs(config.retention.max_age_hours * 3600),
            std::time::Duration::from_secs(config.retention.prune_interval_seconds),
            shutdown.clone(),
        );
        let state = AppState {
            store: store.jobs(),
            artifacts,
            config: Arc::new(config),
            metrics,
            http_metrics: Arc::default(),
            auth,
            webhooks,
            shutdown: shutdown.clone(),
        };
        api::serve(listener, state).await?;
        shutdown.cancel();
        pool.join().await;
        // The sender finishes its current batch; what is left stays pending in the
        // database for the next start.
        let _ = sender.await;
        if let Some(p) = pruner {
            let _ = p.await;
        }
        store.close().await;
        tracing::info!("stopped");
        Ok(())
    })
}

/// Events committed in this process wake the webhook sender at once; those from
/// `vqclip worker` processes too on PostgreSQL (LISTEN/NOTIFY), by its polling on SQLite.
fn wake_on_events(
    store: Arc<dyn JobStore>,
    webhooks: &Arc<WebhookEngine>,
    shutdown: CancellationToken,
) {
    let mut notices = store.subscribe();
    let webhooks = webhooks.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                notice = notices.recv() => match notice {
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => webhooks.wake(),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                },
            }
        }
    });
}

pub fn worker(a: WorkerArgs) -> anyhow::Result<()> {
    let config = load_config(
        &a.common,
        Overrides {
            workers: a.workers,
            device: a.device,
            ..Default::default()
        },
    )?;
    if config.workers.worker_devices().is_empty() {
        anyhow::bail!(
            "no workers configured; pass --workers N or set workers.count / workers.devices"
        );
    }
    runtime()?.block_on(async move {
        let store = open_store(&config).await?;
        let artifacts = ArtifactStore::from_config(&config.storage)?;
        let shutdown = CancellationToken::new();
        watch_signals(shutdown.clone());
        let metrics = Arc::new(Metrics::default());
        let endpoint = serve_worker_metrics(&config, metrics.clone(), shutdown.clone()).await?;
        let pool = start_workers(&config, store.jobs(), artifacts, metrics, shutdown).await?;
        pool.join().await;
        if let Some(endpoint) = endpoint {
            let _ = endpoint.await;
        }
        store.close().await;
        Ok(())
    })
}

/// `/metrics` and `/healthz` of a worker process, on `workers.metrics_bind` when set.
/// Bound before any job is claimed, so a busy port fails the start.
async fn serve_worker_metrics(
    config: &Config,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let bind = config.workers.metrics_bind.trim();
    if bind.is_empty() {
        return Ok(None);
    }
    let addr: std::net::SocketAddr = bind.parse().with_context(|| {
        format!("workers.metrics_bind {bind:?} is not an address such as 0.0.0.0:9464")
    })?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr} (workers.metrics_bind)"))?;
    println!(
        "vqclip worker metrics on http://{}/metrics",
        listener.local_addr()?
    );
    let app = api::worker_router(metrics);
    Ok(Some(tokio::spawn(async move {
        let stop = shutdown.cancelled_owned();
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::warn!("worker metrics endpoint: {e}");
        }
    })))
}

pub fn migrate(a: MigrateArgs) -> anyhow::Result<()> {
    let config = load_config(&a.common, Overrides::default())?;
    runtime()?.block_on(async move {
        let store = open_store(&config).await?;
        store.close().await;
        println!("database {} is migrated", redact(&config.database.url));
        Ok(())
    })
}
