//! Health, readiness, Prometheus metrics and the OpenAPI document.

use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::{ApiError, AppState};
use crate::queue::Metrics;

/// The committed spec, served as is.
pub const OPENAPI_YAML: &str = include_str!("../../openapi.yaml");

pub(super) async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

fn worker_window(st: &AppState) -> Duration {
    Duration::from_secs(st.config.workers.heartbeat_seconds.max(1) * 3)
}

/// Ready when the database answers and at least one worker (here or in a
/// `vqclip worker` process) has sent a heartbeat recently. Says too whether the
/// default models are on disk: when they are not, the first job downloads them.
pub(super) async fn readyz(State(st): State<AppState>) -> Result<Json<Value>, ApiError> {
    st.store
        .ping()
        .await
        .map_err(|e| ApiError::unavailable(format!("the database is not reachable: {e}")))?;
    let workers = st
        .store
        .live_workers(worker_window(&st))
        .await
        .map_err(|e| ApiError::unavailable(format!("the database is not reachable: {e}")))?;
    if workers.is_empty() {
        return Err(ApiError::unavailable(
            "no worker is running; start `vqclip serve` with workers.count >= 1 or run `vqclip worker`",
        ));
    }
    let list: Vec<_> = workers
        .iter()
        .map(|w| json!({ "id": w.id, "device": w.device, "job": w.job_id }))
        .collect();
    // Names only: the client learns what is missing, not where the server keeps it.
    let config = st.config.clone();
    let models = tokio::task::spawn_blocking(move || {
        crate::worker::default_models_presence(&config)
            .into_iter()
            .map(|(kind, spec, presence)| {
                json!({
                    "kind": kind.to_string(),
                    "name": spec,
                    "present": presence.is_present(),
                    "status": presence.as_str(),
                })
            })
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| ApiError::internal("checking the default models", e))?;
    let models_ready = models.iter().all(|m| m["present"] == true);
    Ok(Json(json!({
        "status": "ready",
        "workers": list,
        "models": models,
        "models_ready": models_ready,
    })))
}

/// The routes a `vqclip worker` process serves on `workers.metrics_bind`: `/healthz`, and
/// `/metrics` with that process's own series (job and step timings). The store-wide
/// gauges (queue depth, live workers) come from the API nodes, once, not from each worker.
pub fn worker_router(metrics: Arc<Metrics>) -> Router {
    let scrape = move || {
        let metrics = metrics.clone();
        async move {
            let mut out = String::new();
            metrics.render(&mut out);
            (
                [(
                    header::CONTENT_TYPE,
                    "text/plain; version=0.0.4; charset=utf-8",
                )],
                out,
            )
        }
    };
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(scrape))
}

pub(super) async fn metrics(State(st): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let counts = st.store.counts_by_state().await?;
    let workers = st.store.live_workers(worker_window(&st)).await?;
    let mut out = String::new();
    out.push_str("# HELP vqclip_jobs Jobs in the store by state.\n# TYPE vqclip_jobs gauge\n");
    for (state, n) in &counts {
        let _ = writeln!(out, "vqclip_jobs{{state=\"{state}\"}} {n}");
    }
    let queued = counts
        .iter()
        .find(|(s, _)| *s == crate::queue::JobState::Queued)
        .map_or(0, |c| c.1);
    let _ = writeln!(
        out,
        "# HELP vqclip_queue_depth Jobs waiting for a worker.\n# TYPE vqclip_queue_depth gauge\nvqclip_queue_depth {queued}"
    );
    let busy = workers.iter().filter(|w| w.job_id.is_some()).count();
    let _ = writeln!(
        out,
        "# HELP vqclip_workers Live workers (heartbeat within 3 intervals), and those running a job.\n# TYPE vqclip_workers gauge\nvqclip_workers{{status=\"live\"}} {}\nvqclip_workers{{status=\"busy\"}} {busy}",
        workers.len()
    );
    st.http_metrics.render(&mut out);
    st.metrics.render(&mut out);
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    ))
}

pub(super) async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI_YAML)
}
