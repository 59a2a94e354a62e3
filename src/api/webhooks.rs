//! `GET /v1/jobs/{id}/webhooks`: a job's delivery history.

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use super::extract::{job_id, Caller, PathParams};
use super::{ApiError, AppState};

/// Every delivery of the job's webhook, oldest first, with each attempt's
/// response code or error. Another key's job is a 404, like everywhere.
pub(super) async fn history(
    State(st): State<AppState>,
    Caller(scope): Caller,
    PathParams(id): PathParams<String>,
) -> Result<Json<Value>, ApiError> {
    let job = st.store.get(job_id(&id)?, &scope).await?;
    let deliveries = st
        .webhooks
        .history(&job.id.to_string())
        .await
        .map_err(|e| ApiError::internal("reading the webhook deliveries", e))?;
    Ok(Json(json!({
        "job_id": job.id,
        "webhook": job.spec.get("webhook"),
        "deliveries": deliveries,
    })))
}
