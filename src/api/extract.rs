//! Extractors that turn every malformed request into a problem, never a plain-text
//! rejection or a panic.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use uuid::Uuid;

use super::ApiError;
use crate::queue::Scope;

/// Whose jobs this request may see: the [`Scope`] an auth layer put in the request's
/// extensions, or every job when no auth layer is installed (keys are off).
pub struct Caller(pub Scope);

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        Ok(Caller(
            parts
                .extensions
                .get::<Scope>()
                .cloned()
                .unwrap_or_else(Scope::unrestricted),
        ))
    }
}

/// A request body within the route's size limit.
pub struct Body(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        Bytes::from_request(req, state)
            .await
            .map(Body)
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "body-too-large",
                        "the request body is larger than this server accepts (server.max_body_bytes, or server.max_upload_bytes for uploads)",
                    )
                } else {
                    ApiError::bad_request("unreadable-body", rejection.body_text())
                }
            })
    }
}

/// Path parameters. axum's own `Path` answers a path it cannot decode (e.g. `%FF`,
/// not UTF-8) with `text/plain`; this one answers with a problem like every other error.
pub struct PathParams<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> FromRequestParts<S> for PathParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(PathParams(value)),
            Err(rejection) => Err(ApiError::bad_request(
                "invalid-path",
                format!(
                    "the path {:?} cannot be read: {}; ids and frame names are plain ASCII",
                    parts.uri.path(),
                    rejection.body_text()
                ),
            )),
        }
    }
}

/// Job ids are UUIDs; anything else cannot name a job.
pub fn job_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| {
        ApiError::not_found(format!(
            "no job with id {raw:?}; job ids are UUIDs as returned by POST /v1/jobs"
        ))
    })
}

/// The media type of the request without parameters, lower case.
pub fn media_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
}

pub fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    match media_type(headers).as_deref() {
        Some("application/json") => Ok(()),
        Some(t) if t.starts_with("application/") && t.ends_with("+json") => Ok(()),
        other => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            format!(
                "expected Content-Type: application/json, got {}",
                other.unwrap_or("none")
            ),
        )),
    }
}

/// Parses JSON, saying where the syntax broke.
pub fn parse_json(body: &[u8]) -> Result<serde_json::Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request("malformed-json", format!("the body is not valid JSON: {e}"))
            .with("line", e.line())
            .with("column", e.column())
    })
}
