//! `/v1/jobs`: submit, read, list, cancel, delete.

use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::extract::{job_id, parse_json, require_json, Body, Caller, PathParams};
use super::request::{self, JobRequest, RequestDefaults, ValidJob};
use super::uploads::{check_image_within_budget, DecodeBudget, ImageLimits};
use super::{links, ApiError, AppState};
use crate::config::Config;
use crate::queue::{CancelOutcome, Job, JobState, ListQuery, NewJob, QueueError, Scope, Submitted};
use crate::render::spec::ModelPolicy;
use crate::render::{ImageSource, Limits};

/// The JSON shape of a job. `spec` is left out of list pages to keep them small.
pub(super) fn job_view(job: &Job, position: Option<u64>, with_spec: bool) -> Value {
    let mut link_map = json!({
        "self": links::job(job.id),
        "events": links::artifact(job.id, "events"),
        "frames": links::artifact(job.id, "frames"),
    });
    if job.state == JobState::Succeeded {
        for (name, path) in [
            ("image", "image.png"),
            ("video", "video.mp4"),
            ("metadata", "metadata.json"),
        ] {
            link_map[name] = json!(links::artifact(job.id, path));
        }
    }
    let mut view = json!({
        "id": job.id,
        "state": job.state,
        "position": position,
        "priority": job.priority,
        "progress": {
            "step": job.progress.step,
            "total": job.progress.total,
            "loss": job.progress.loss,
            "eta_seconds": job.progress.eta_seconds,
        },
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "cancel_requested": job.cancel_requested,
        "device": job.device,
        "seed": job.seed,
        "keep": job.keep,
        "error": job.error,
        "warnings": job.warnings,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "links": link_map,
    });
    if with_spec {
        view["spec"] = request::echo(&job.spec);
    }
    view
}

pub(super) fn limits(config: &Config) -> Limits {
    let l = &config.limits;
    Limits {
        max_pixels: l.max_pixels,
        max_side: l.max_side,
        max_steps: l.max_steps,
        max_cutn: l.max_cutn,
        max_prompts: l.max_prompts as usize,
        ..Limits::default()
    }
}

/// Catalogue names, the configured defaults, and paths inside the model cache or
/// `models.dirs`.
pub(super) fn model_policy(config: &Config) -> ModelPolicy {
    let m = &config.models;
    let fixed = std::iter::once(m.vqgan.clone())
        .chain(m.clip.iter().cloned())
        .collect();
    let mut dirs = vec![crate::render::models::cache_root(&m.cache_dir)];
    dirs.extend(m.dirs.iter().cloned());
    ModelPolicy::new(fixed, &dirs)
}

/// What a request leaves out, the deployment fills in.
pub(super) fn request_defaults(config: &Config) -> RequestDefaults {
    RequestDefaults {
        vqgan: config.models.vqgan.clone(),
        clip: config.models.clip.clone(),
        checkpoint_every: config.workers.checkpoint_every,
    }
}

/// `GET /v1/limits`: the bounds this server puts on jobs and uploads, and the models a
/// job may name. They are the server's configuration, so they differ between servers.
pub(super) async fn limits_view(State(st): State<AppState>) -> Json<Value> {
    let l = &st.config.limits;
    let (vqgan, clip) = ModelPolicy::catalogue();
    Json(json!({
        "max_width": l.max_side,
        "max_height": l.max_side,
        "max_pixels": l.max_pixels,
        "max_steps": l.max_steps,
        "max_cutn": l.max_cutn,
        "max_prompts": l.max_prompts,
        "max_prompt_tokens": limits(&st.config).max_prompt_tokens,
        "max_queued_jobs": l.max_queued_jobs,
        "max_upload_pixels": l.max_upload_pixels,
        "max_body_bytes": st.config.server.max_body_bytes,
        "max_upload_bytes": st.config.server.max_upload_bytes,
        "models": {
            "vqgan": vqgan,
            "clip": clip,
        },
    }))
}

/// Every image a spec names must exist (uploads) or be a valid image (inline). The
/// source video of `video_style` is checked by [`check_video`].
pub(super) async fn check_images(
    st: &AppState,
    scope: &Scope,
    budget: &DecodeBudget,
    job: &ValidJob,
) -> Result<(), ApiError> {
    let images = job
        .validated
        .images
        .iter()
        .filter(|i| i.field != "video_style.video");
    for image in images {
        let field = &image.field;
        let bad = |detail: String| {
            ApiError::unprocessable("invalid-spec", format!("{field}: {detail}"))
                .with("field", field.clone())
        };
        match &image.source {
            ImageSource::Upload(id) => match st.store.get_upload(*id, scope).await {
                Ok(upload) if upload.content_type == "video/mp4" => {
                    return Err(bad(format!(
                        "upload {id} is a video; videos are styled with video_style.video"
                    )))
                }
                Ok(_) => {}
                Err(QueueError::NotFound(_)) => {
                    return Err(bad(format!(
                        "no upload with id {id}; upload the image with POST /v1/uploads first"
                    )))
                }
                Err(e) => return Err(e.into()),
            },
            ImageSource::Inline { bytes, .. } => {
                let limits = ImageLimits::from(&st.config.limits);
                check_image_within_budget(bytes.clone(), limits, budget)
                    .await?
                    .1
                    .map_err(|e| bad(e.to_string()))?;
            }
        }
    }
    Ok(())
}

/// A video-styling job's source must be an MP4 upload of the caller's within the
/// deployment's limits. Returns the job's total steps (frames x steps per frame).
async fn check_video(
    st: &AppState,
    scope: &Scope,
    job: &ValidJob,
) -> Result<Option<u32>, ApiError> {
    let spec = &job.request.spec;
    let Some(style) = &spec.video_style else {
        return Ok(None);
    };
    let bad = |field: &str, detail: String| {
        ApiError::unprocessable("invalid-spec", format!("{field}: {detail}")).with("field", field)
    };
    let limits = super::uploads::video_limits(&st.config.limits);
    if let Some(max) = style.max_frames {
        if max as usize > limits.max_frames {
            return Err(bad(
                "video_style.max_frames",
                format!(
                    "got {max}, allowed 1..={} (limits.max_video_frames)",
                    limits.max_frames
                ),
            )
            .with("max", limits.max_frames as u64));
        }
    }
    let source = job
        .validated
        .images
        .iter()
        .find(|i| i.field == "video_style.video")
        .map(|i| &i.source);
    let id = match source {
        Some(ImageSource::Upload(id)) => *id,
        _ => {
            return Err(bad(
                "video_style.video",
                "must be `upload:<id>` of an MP4 sent to POST /v1/uploads".into(),
            ))
        }
    };
    let upload = match st.store.get_upload(id, scope).await {
        Ok(u) => u,
        Err(QueueError::NotFound(_)) => {
            return Err(bad(
                "video_style.video",
                format!("no upload with id {id}; upload the MP4 with POST /v1/uploads first"),
            ))
        }
        Err(e) => return Err(e.into()),
    };
    if upload.content_type != "video/mp4" {
        return Err(bad(
            "video_style.video",
            format!("upload {id} is {}, not video/mp4", upload.content_type),
        ));
    }
    let bytes = st.artifacts.read_upload(&upload.file_name).await?;
    let info =
        tokio::task::spawn_blocking(move || crate::render::video::probe_mp4(&bytes, &limits))
            .await
            .map_err(|e| ApiError::internal("reading a video upload", e))?
            .map_err(super::uploads::video_problem)?;
    let frames = style
        .max_frames
        .map_or(info.frames, |m| (m as usize).min(info.frames));
    let total = frames as u64 * u64::from(style.steps_per_frame(spec.steps));
    Ok(Some(u32::try_from(total).unwrap_or(u32::MAX)))
}

/// A webhook needs a signing secret on the server and a public target (SSRF).
async fn check_webhook(st: &AppState, request: &JobRequest) -> Result<(), ApiError> {
    let Some(hook) = &request.webhook else {
        return Ok(());
    };
    st.webhooks.validate(hook).await.map_err(|e| {
        let field = match e {
            crate::webhooks::WebhookError::NoSecret => "webhook",
            _ => "webhook.url",
        };
        ApiError::unprocessable("invalid-webhook", e.to_string()).with("field", field)
    })
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(key) if !key.is_empty() && key.len() <= 255 => Ok(Some(key.to_owned())),
        _ => Err(ApiError::bad_request(
            "invalid-idempotency-key",
            "Idempotency-Key must be 1 to 255 visible ASCII characters, e.g. a UUID",
        )),
    }
}

pub(super) async fn submit(
    State(st): State<AppState>,
    Caller(scope): Caller,
    Extension(budget): Extension<DecodeBudget>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Response, ApiError> {
    require_json(&headers)?;
    let raw = parse_json(&body)?;
    let key = idempotency_key(&headers)?;
    let job = JobRequest::from_json(&raw, &request_defaults(&st.config))?
        .validate(&limits(&st.config), &model_policy(&st.config))?;
    check_images(&st, &scope, &budget, &job).await?;
    let video_steps = check_video(&st, &scope, &job).await?;
    check_webhook(&st, &job.request).await?;
    let new = NewJob {
        spec: job.document()?,
        priority: job.request.priority,
        keep: job.request.keep,
        total_steps: video_steps.unwrap_or(job.request.spec.steps),
        owner_key_id: scope.owner_key_id.clone(),
        idempotency_key: key,
        request_hash: hex::encode(Sha256::digest(raw.to_string().as_bytes())),
        max_attempts: st.config.workers.max_attempts,
        warnings: vec![],
        seed: Some(job.seed),
    };
    let submitted = st
        .store
        .submit(new, st.config.limits.max_queued_jobs.into())
        .await
        .map_err(|e| {
            let mut problem = ApiError::from(e);
            if problem.retry_after.is_some() {
                problem.retry_after = Some(st.config.server.retry_after_seconds);
            }
            problem
        })?;
    let status = match submitted {
        Submitted::Created(_) => StatusCode::CREATED,
        Submitted::Existing(_) => StatusCode::OK,
    };
    let job = submitted.job();
    let position = st.store.position(job).await?;
    let location = links::job(job.id);
    Ok((
        status,
        [(header::LOCATION, location)],
        Json(job_view(job, position, true)),
    )
        .into_response())
}

pub(super) async fn get_job(
    State(st): State<AppState>,
    Caller(scope): Caller,
    PathParams(id): PathParams<String>,
) -> Result<Json<Value>, ApiError> {
    let job = st.store.get(job_id(&id)?, &scope).await?;
    let position = st.store.position(&job).await?;
    let mut view = job_view(&job, position, true);
    super::steer::add_steering(&st, &job, &mut view).await?;
    Ok(Json(view))
}

fn list_query(raw: Option<&str>) -> Result<ListQuery, ApiError> {
    let mut q = ListQuery {
        limit: 20,
        ..Default::default()
    };
    for (key, value) in url::form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        match key.as_ref() {
            "state" => {
                q.state = Some(JobState::parse(&value).ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid-query",
                        format!("state {value:?} is not one of queued, running, succeeded, failed, canceled"),
                    )
                })?)
            }
            "cursor" => {
                q.before = Some(value.parse().map_err(|_| {
                    ApiError::bad_request(
                        "invalid-query",
                        "cursor must be a next_cursor value from an earlier page",
                    )
                })?)
            }
            "limit" => {
                q.limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=100).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request("invalid-query", "limit must be between 1 and 100")
                    })?
            }
            other => {
                return Err(ApiError::bad_request(
                    "invalid-query",
                    format!("unknown query parameter {other:?}; use state, cursor or limit"),
                ))
            }
        }
    }
    Ok(q)
}

pub(super) async fn list(
    State(st): State<AppState>,
    Caller(scope): Caller,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let query = list_query(raw.as_deref())?;
    let page = st.store.list(&query, &scope).await?;
    let mut jobs = Vec::with_capacity(page.jobs.len());
    for (job, position) in page.jobs.iter().zip(&page.positions) {
        jobs.push(job_view(job, *position, false));
    }
    Ok(Json(json!({
        "jobs": jobs,
        "next_cursor": page.next_cursor.map(|c| c.to_string()),
    })))
}

/// Queued: canceled at once. Running: the worker stops within one step (the answer
/// shows `cancel_requested`). Canceled already: 200 again. Succeeded or failed: 409.
pub(super) async fn cancel(
    State(st): State<AppState>,
    Caller(scope): Caller,
    PathParams(id): PathParams<String>,
) -> Result<Json<Value>, ApiError> {
    let job = match st.store.cancel(job_id(&id)?, &scope).await? {
        CancelOutcome::Canceled(j) => {
            // A queued job may hold a checkpoint from a graceful shutdown; it never resumes.
            if let Err(e) = st.artifacts.remove_checkpoint(j.id).await {
                tracing::warn!(job = %j.id, "removing the checkpoint: {e}");
            }
            j
        }
        CancelOutcome::Requested(j) | CancelOutcome::AlreadyCanceled(j) => j,
    };
    Ok(Json(job_view(&job, None, false)))
}

pub(super) async fn delete_job(
    State(st): State<AppState>,
    Caller(scope): Caller,
    PathParams(id): PathParams<String>,
) -> Result<StatusCode, ApiError> {
    let job = st.store.delete(job_id(&id)?, &scope).await?;
    if let Err(e) = st.artifacts.delete_job(job.id).await {
        // The job is gone; leftover files are logged for the operator rather than
        // turning a completed delete into an error.
        tracing::error!(job = %job.id, "removing artifacts: {e}");
    }
    Ok(StatusCode::NO_CONTENT)
}
