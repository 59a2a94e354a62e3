//! `x-request-id`: every request gets one (the client's, when it sent a usable one),
//! every log line of the request carries it in the `request` span, the response
//! echoes it, and a `problem+json` answer names it as its `instance`.

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

pub const HEADER: &str = "x-request-id";

tokio::task_local! {
    static CURRENT: String;
}

/// The id of the request being answered on this task, if any. Error responses read it
/// here so that `ApiError` need not be threaded through with the request.
pub fn current() -> Option<String> {
    CURRENT.try_with(Clone::clone).ok()
}

/// A client's id is kept when it is short and plain enough to paste into a log search
/// and a URN; anything else is replaced, so log lines cannot be forged through it.
fn usable(value: &HeaderValue) -> Option<String> {
    let s = value.to_str().ok()?.trim();
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':');
    (!s.is_empty() && s.len() <= 128 && s.chars().all(plain)).then(|| s.to_owned())
}

/// The job a `/v1/jobs/{id}...` path is about.
fn job_in_path(path: &str) -> Option<uuid::Uuid> {
    let rest = path.strip_prefix("/v1/jobs/")?;
    uuid::Uuid::parse_str(rest.split('/').next()?).ok()
}

/// The outermost layer: everything inside (auth, handlers, the panic guard) runs in
/// the request's span and sees its id.
pub(super) async fn assign(mut request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get(HEADER)
        .and_then(usable)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let value = HeaderValue::from_str(&id).expect("ids are visible ASCII");
    let name = HeaderName::from_static(HEADER);
    request.headers_mut().insert(name.clone(), value.clone());
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        method = %request.method(),
        path = %request.uri().path(),
        job_id = tracing::field::Empty,
    );
    // A job's lines in the API carry its id as the worker's do (the `job` span there).
    if let Some(job) = job_in_path(request.uri().path()) {
        span.record("job_id", tracing::field::display(job));
    }
    let started = std::time::Instant::now();
    let mut response = CURRENT
        .scope(id, next.run(request))
        .instrument(span.clone())
        .await;
    let status = response.status();
    let _entered = span.enter();
    let ms = started.elapsed().as_secs_f64() * 1e3;
    // Server faults are logged in full where they happen (ApiError::internal).
    if status.is_client_error() {
        tracing::info!(status = status.as_u16(), ms, "refused");
    } else {
        tracing::debug!(status = status.as_u16(), ms, "answered");
    }
    response.headers_mut().insert(name, value);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_ids_are_kept_and_others_replaced() {
        let keep = |s: &str| usable(&HeaderValue::from_str(s).unwrap());
        assert_eq!(keep("abc-123_x.y:z").as_deref(), Some("abc-123_x.y:z"));
        assert_eq!(keep(" trimmed ").as_deref(), Some("trimmed"));
        assert_eq!(keep(""), None);
        assert_eq!(keep("has space"), None);
        assert_eq!(keep("new\tline"), None);
        assert_eq!(keep(&"a".repeat(129)), None);
        assert!(keep(&"a".repeat(128)).is_some());
    }

    #[test]
    fn job_routes_name_their_job() {
        let id = "01936f3e-0000-7000-8000-000000000000";
        for path in [
            format!("/v1/jobs/{id}"),
            format!("/v1/jobs/{id}/frames/5.png"),
        ] {
            assert_eq!(job_in_path(&path).unwrap().to_string(), id);
        }
        assert_eq!(job_in_path("/v1/jobs"), None);
        assert_eq!(job_in_path("/v1/jobs/nope/events"), None);
        assert_eq!(job_in_path("/v1/uploads"), None);
    }
}
