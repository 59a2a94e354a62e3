//! Steering and forking: `PATCH /v1/jobs/{id}` changes a queued or running job's render
//! parameters from its next step on; `POST /v1/jobs/{id}/fork` starts a new job from one
//! of a job's saved frames. Both merge the client's changes onto the job's effective
//! request and validate the result exactly as a submission is validated.

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::extract::{job_id, parse_json, require_json, Body, Caller, PathParams};
use super::jobs::{check_images, job_view, limits, model_policy, request_defaults};
use super::request::{self, JobRequest, ValidJob};
use super::uploads::DecodeBudget;
use super::{links, ApiError, AppState};
use crate::queue::{ForkLink, Job, JobRevision, NewJob, Scope, Submitted};
use crate::render::steer::STEERABLE;

/// A revision as the API shows it.
pub(super) fn revision_view(r: &JobRevision) -> Value {
    json!({
        "revision": r.number,
        "changes": r.changes,
        "step": r.step,
        "created_at": r.created_at,
    })
}

/// The job's revisions and fork links, added to its view.
pub(super) async fn add_steering(
    st: &AppState,
    job: &Job,
    view: &mut Value,
) -> Result<(), ApiError> {
    let revisions = st.store.revisions(job.id).await?;
    let lineage = st.store.lineage(job.id).await?;
    let link = |l: &ForkLink| json!({ "id": l.job, "step": l.step, "href": links::job(l.job) });
    view["revisions"] = revisions.iter().map(revision_view).collect();
    view["parent"] = lineage.parent.as_ref().map_or(Value::Null, link);
    view["forks"] = lineage.forks.iter().map(link).collect();
    Ok(())
}

fn unprocessable(field: &str, detail: String) -> ApiError {
    ApiError::unprocessable("invalid-spec", format!("{field}: {detail}")).with("field", field)
}

/// The changes as an object of steerable fields only.
fn steerable(changes: &Value, at: &str) -> Result<Map<String, Value>, ApiError> {
    let Some(fields) = changes.as_object() else {
        return Err(unprocessable(
            at,
            "must be a JSON object of the fields to change, e.g. {\"prompts\": \"a blue apple\"}"
                .into(),
        ));
    };
    if let Some(other) = fields.keys().find(|k| !STEERABLE.contains(&k.as_str())) {
        return Err(unprocessable(
            other,
            format!(
                "cannot be changed on a job; the fields that can are {}",
                STEERABLE.join(", ")
            ),
        ));
    }
    Ok(fields.clone())
}

/// `changes` merged onto a stored document's request, validated as at submit.
fn merged(
    st: &AppState,
    document: &Value,
    changes: &Map<String, Value>,
) -> Result<ValidJob, ApiError> {
    let mut request = request::echo(document);
    if request.get("video_style").is_some_and(|v| !v.is_null()) {
        return Err(unprocessable(
            "video_style",
            "a video-styling job renders each frame from its own init; it cannot be steered or forked".into(),
        ));
    }
    if let Value::Object(fields) = &mut request {
        for (k, v) in changes {
            fields.insert(k.clone(), v.clone());
        }
    }
    JobRequest::from_json(&request, &request_defaults(&st.config))?
        .validate(&limits(&st.config), &model_policy(&st.config))
}

/// Steps must stay ahead of where the job is.
fn check_steps(valid: &ValidJob, at: u32) -> Result<(), ApiError> {
    let steps = valid.request.spec.steps;
    if steps <= at {
        return Err(unprocessable(
            "steps",
            format!("is the total, and must stay above the job's step {at}; got {steps}"),
        )
        .with("min", u64::from(at) + 1));
    }
    Ok(())
}

/// The job `scope` may see (404 otherwise) and the JSON body sent about it.
async fn job_and_body(
    st: &AppState,
    scope: &Scope,
    headers: &HeaderMap,
    id: &str,
    body: &[u8],
) -> Result<(Job, Value), ApiError> {
    let id = job_id(id)?;
    require_json(headers)?;
    let body = parse_json(body)?;
    Ok((st.store.get(id, scope).await?, body))
}

/// `PATCH /v1/jobs/{id}`: 202 with the revision; it takes effect at the job's next step
/// boundary (a queued job's at its start), where its `steered` event says which step.
pub(super) async fn steer(
    State(st): State<AppState>,
    Caller(scope): Caller,
    Extension(budget): Extension<DecodeBudget>,
    headers: HeaderMap,
    PathParams(id): PathParams<String>,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let (job, changes) = job_and_body(&st, &scope, &headers, &id, &body).await?;
    let id = job.id;
    if job.state.is_terminal() {
        // The store decides again under its lock; this answers before any validation.
        return Err(crate::queue::QueueError::Conflict {
            id,
            state: job.state,
            detail: "only a queued or running job can be steered; fork it to go on from one of its frames",
        }
        .into());
    }
    let fields = steerable(&changes, "body")?;
    if fields.is_empty() {
        return Err(unprocessable("body", "names no field to change".into()));
    }
    let revisions = st.store.revisions(id).await?;
    let current = revisions.last().map_or(&job.spec, |r| &r.spec);
    let valid = merged(&st, current, &fields)?;
    if fields.contains_key("steps") {
        check_steps(&valid, job.progress.step)?;
    }
    check_images(&st, &scope, &budget, &valid).await?;
    let mut document = valid.document()?;
    if let Some(fork) = current.get(request::FORK_KEY) {
        document[request::FORK_KEY] = fork.clone();
    }
    let revision = st
        .store
        .steer(id, &scope, Value::Object(fields), document)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(revision_view(&revision))).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ForkRequest {
    from_step: u32,
    #[serde(default)]
    changes: Option<Value>,
    /// Start the optimiser afresh instead of carrying its moments over.
    #[serde(default)]
    reset_optimizer: bool,
}

/// The saved steps nearest `step`, at most two either side.
fn nearest(saved: &[u32], step: u32) -> Vec<u32> {
    let at = saved.partition_point(|s| *s < step);
    saved[at.saturating_sub(2)..(at + 2).min(saved.len())].to_vec()
}

/// `POST /v1/jobs/{id}/fork`: 201 with the new job, which starts from the state saved
/// with the frame of `from_step` (z, optimiser, RNG; the step counter goes on from
/// there) and renders the source's effective spec at that step with `changes` on top.
pub(super) async fn fork(
    State(st): State<AppState>,
    Caller(scope): Caller,
    Extension(budget): Extension<DecodeBudget>,
    headers: HeaderMap,
    PathParams(id): PathParams<String>,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let (parent, raw) = job_and_body(&st, &scope, &headers, &id, &body).await?;
    let id = parent.id;
    let wanted = ForkRequest::deserialize(&raw)
        .map_err(|e| ApiError::unprocessable("invalid-fork", format!("fork request: {e}")))?;
    let step = wanted.from_step;
    let changes = match &wanted.changes {
        Some(c) => steerable(c, "changes")?,
        None => Map::new(),
    };
    let saved = st.artifacts.fork_points(id).await?;
    if saved.binary_search(&step).is_err() {
        let near = nearest(&saved, step);
        let listed: Vec<String> = near.iter().map(u32::to_string).collect();
        return Err(unprocessable(
            "from_step",
            format!(
                "no frame with saved state at step {step}; the nearest saved steps are {}",
                if listed.is_empty() {
                    "none (the job has saved no frame yet)".into()
                } else {
                    listed.join(", ")
                }
            ),
        )
        .with("nearest", near));
    }
    // The spec in force at that step: the last revision applied at or before it.
    let revisions = st.store.revisions(id).await?;
    let source = revisions
        .iter()
        .rfind(|r| r.step.is_some_and(|s| s <= step))
        .map_or(&parent.spec, |r| &r.spec);
    let valid = merged(&st, source, &changes)?;
    check_steps(&valid, step)?;
    check_images(&st, &scope, &budget, &valid).await?;
    let child = submit_fork(
        &st,
        &scope,
        &valid,
        &raw,
        ForkLink { job: id, step },
        wanted.reset_optimizer,
    )
    .await?;
    if let Err(e) = st.artifacts.copy_fork_point(id, step, child.id).await {
        // The worker that claims the fork makes the copy itself.
        tracing::warn!(job = %child.id, parent = %id, step, "copying the fork point: {e}");
    }
    let mut view = job_view(&child, st.store.position(&child).await?, true);
    add_steering(&st, &child, &mut view).await?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, links::job(child.id))],
        Json(view),
    )
        .into_response())
}

async fn submit_fork(
    st: &AppState,
    scope: &Scope,
    valid: &ValidJob,
    raw: &Value,
    from: ForkLink,
    reset_optimizer: bool,
) -> Result<Job, ApiError> {
    let mut spec = valid.document()?;
    spec[request::FORK_KEY] =
        json!({ "job": from.job, "step": from.step, "reset_optimizer": reset_optimizer });
    let new = NewJob {
        spec,
        priority: valid.request.priority,
        keep: valid.request.keep,
        total_steps: valid.request.spec.steps,
        owner_key_id: scope.owner_key_id.clone(),
        idempotency_key: None,
        request_hash: hex::encode(Sha256::digest(raw.to_string().as_bytes())),
        max_attempts: st.config.workers.max_attempts,
        warnings: vec![],
        seed: Some(valid.seed),
    };
    let submitted = st
        .store
        .fork(new, from, st.config.limits.max_queued_jobs.into())
        .await?;
    Ok(match submitted {
        Submitted::Created(job) | Submitted::Existing(job) => job,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_lists_up_to_two_saved_steps_each_side() {
        let saved = [0, 5, 10, 15, 20, 25];
        assert_eq!(nearest(&saved, 12), vec![5, 10, 15, 20]);
        assert_eq!(nearest(&saved, 1), vec![0, 5, 10]);
        assert_eq!(nearest(&saved, 99), vec![20, 25]);
        assert!(nearest(&[], 3).is_empty());
    }

    #[test]
    fn only_steerable_fields_pass() {
        assert!(steerable(&json!({"prompts": "a", "lr": 0.2}), "body").is_ok());
        let err = steerable(&json!({"width": 64}), "body").unwrap_err();
        assert_eq!(err.extra.get("field"), Some(&json!("width")));
        let err = steerable(&json!(["a"]), "changes").unwrap_err();
        assert_eq!(err.extra.get("field"), Some(&json!("changes")));
    }
}
