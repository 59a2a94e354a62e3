//! Artifact downloads, streamed from the artifact store (a directory or a bucket). Every
//! file is served with its content type, the store's `ETag` (answering `If-None-Match`
//! with 304) and single byte ranges (206/416), which video players need for seeking. The
//! body is passed on chunk by chunk, so memory stays bounded whatever the file's size.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::extract::{job_id, Caller, PathParams};
use super::links;
use super::{ApiError, AppState};
use crate::queue::{Job, JobState};
use crate::storage::Artifact;

async fn finished_job(
    st: &AppState,
    scope: &crate::queue::Scope,
    id: &str,
) -> Result<Job, ApiError> {
    let job = st.store.get(job_id(id)?, scope).await?;
    if job.state != JobState::Succeeded {
        return Err(ApiError::not_found(format!(
            "job {} is {}; its image, video and metadata exist once it has succeeded",
            job.id, job.state
        ))
        .with("state", job.state.as_str()));
    }
    Ok(job)
}

async fn finished_file(
    st: AppState,
    scope: crate::queue::Scope,
    id: String,
    name: &'static str,
    content_type: &'static str,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let job = finished_job(&st, &scope, &id).await?;
    let artifact = st.artifacts.artifact(job.id, name).await.map_err(|e| match e {
        crate::storage::StorageError::Missing(_) if name == "video.mp4" => ApiError::not_found(format!(
            "job {} has no video: it was disabled (video.enabled = false) or there were fewer than two frames",
            job.id
        )),
        e => e.into(),
    })?;
    serve_artifact(&st, artifact, content_type, &headers).await
}

pub(super) async fn image(
    State(st): State<AppState>,
    Caller(scope): Caller,
    PathParams(id): PathParams<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    finished_file(st, scope, id, "image.png", "image/png", headers).await
}

pub(super) async fn video(
    State(st): State<AppState>,
    Caller(scope): Caller,
    PathParams(id): PathParams<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    finished_file(st, scope, id, "video.mp4", "video/mp4", headers).await
}

pub(super) async fn metadata(
    State(st): State<AppState>,
    Caller(scope): Caller,
    PathParams(id): PathParams<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    finished_file(st, scope, id, "metadata.json", "application/json", headers).await
}

/// Frames exist while the job runs, so they are listed in any state.
pub(super) async fn frames(
    State(st): State<AppState>,
    Caller(scope): Caller,
    PathParams(id): PathParams<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let job = st.store.get(job_id(&id)?, &scope).await?;
    let frames = st.artifacts.frames(job.id).await?;
    let list: Vec<_> = frames
        .iter()
        .map(|f| json!({ "step": f.step, "url": links::frame(job.id, f.step) }))
        .collect();
    Ok(Json(json!({ "frames": list })))
}

pub(super) async fn frame(
    State(st): State<AppState>,
    Caller(scope): Caller,
    PathParams((id, frame)): PathParams<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let job = st.store.get(job_id(&id)?, &scope).await?;
    let digits = frame
        .strip_suffix(".png")
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid-artifact-name",
                format!("{frame:?} is not a frame name; frames are named <step>.png, e.g. 50.png"),
            )
        })?;
    // A well-formed name past any step a job can have (u32) names no frame: 404, as
    // the spec's pattern promises, not 400.
    let step = digits
        .parse::<u32>()
        .map_err(|_| ApiError::not_found(format!("job {} has no frame {frame}", job.id)))?;
    let artifact = st.artifacts.frame(job.id, step).await?;
    serve_artifact(&st, artifact, "image/png", &headers).await
}

/// `If-None-Match` uses the weak comparison (RFC 9110 §13.1.2): `W/"x"` matches `"x"`.
fn none_match(header: &str, etag: &str) -> bool {
    let opaque = |tag: &str| tag.trim().trim_start_matches("W/").to_owned();
    let ours = opaque(etag);
    header
        .split(',')
        .any(|t| t.trim() == "*" || opaque(t) == ours)
}

enum Range {
    Full,
    Part(u64, u64),
    Unsatisfiable,
}

/// One `bytes=` range; several ranges, or a stale `If-Range`, get the whole file.
fn parse_range(headers: &HeaderMap, len: u64, etag: &str) -> Range {
    let Some(value) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return Range::Full;
    };
    if let Some(if_range) = headers.get(header::IF_RANGE).and_then(|v| v.to_str().ok()) {
        if if_range != etag {
            return Range::Full;
        }
    }
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return Range::Full;
    };
    if spec.contains(',') {
        return Range::Full;
    }
    let Some((start, end)) = spec.split_once('-') else {
        return Range::Full;
    };
    let (start, end) = (start.trim(), end.trim());
    let parsed = match (start.is_empty(), end.is_empty()) {
        (true, false) => end.parse::<u64>().ok().map(|n| {
            if n == 0 {
                None
            } else {
                Some((len.saturating_sub(n), len.saturating_sub(1)))
            }
        }),
        (false, true) => start
            .parse::<u64>()
            .ok()
            .map(|s| Some((s, len.saturating_sub(1)))),
        (false, false) => match (start.parse::<u64>(), end.parse::<u64>()) {
            (Ok(s), Ok(e)) if s <= e => Some(Some((s, e.min(len.saturating_sub(1))))),
            _ => None,
        },
        (true, true) => None,
    };
    match parsed {
        None => Range::Full,
        Some(Some((s, e))) if len > 0 && s < len && s <= e => Range::Part(s, e),
        Some(_) => Range::Unsatisfiable,
    }
}

async fn serve_artifact(
    st: &AppState,
    artifact: Artifact,
    content_type: &'static str,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let (len, etag) = (artifact.size, artifact.etag.as_str());
    let etag_value = HeaderValue::from_str(etag).map_err(|e| ApiError::internal("an ETag", e))?;
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| none_match(v, etag));
    if matches {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag_value)]).into_response());
    }
    let (status, start, end) = match parse_range(headers, len, etag) {
        Range::Full => (StatusCode::OK, 0, len.saturating_sub(1)),
        Range::Part(s, e) => (StatusCode::PARTIAL_CONTENT, s, e),
        Range::Unsatisfiable => {
            let mut problem = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range-not-satisfiable",
                format!("the file is {len} bytes long"),
            )
            .into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                problem.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return Ok(problem);
        }
    };
    let count = if len == 0 { 0 } else { end - start + 1 };
    let range = (status == StatusCode::PARTIAL_CONTENT).then_some(start..end + 1);
    let chunks = st.artifacts.read(&artifact, range).await?;
    let mut response = (status, Body::from_stream(chunks)).into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(count));
    h.insert(header::ETAG, etag_value);
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if status == StatusCode::PARTIAL_CONTENT {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{len}")) {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::none_match;

    #[test]
    fn if_none_match_compares_weakly() {
        let etag = "\"1a-2b\"";
        assert!(none_match("\"1a-2b\"", etag));
        assert!(none_match("W/\"1a-2b\"", etag));
        assert!(none_match("\"other\", W/\"1a-2b\"", etag));
        assert!(none_match("*", etag));
        assert!(!none_match("W/\"1a-2c\"", etag));
        assert!(!none_match("1a-2b", etag));
    }
}
