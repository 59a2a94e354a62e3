//! The one error type of the API: every failure leaves as `application/problem+json`
//! (RFC 9457) with a stable `type`, a human `title` and a `detail` that says what to fix.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

use crate::queue::QueueError;
use crate::storage::StorageError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    /// Short slug; the problem `type` is `urn:vqclip:problem:<slug>`.
    pub kind: &'static str,
    pub detail: String,
    /// Extension members, e.g. the spec field that broke a rule.
    pub extra: Map<String, Value>,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, detail: impl Into<String>) -> ApiError {
        ApiError {
            status,
            kind,
            detail: detail.into(),
            extra: Map::new(),
            retry_after: None,
        }
    }

    pub fn with(mut self, key: &str, value: impl Into<Value>) -> ApiError {
        self.extra.insert(key.to_owned(), value.into());
        self
    }

    pub fn bad_request(kind: &'static str, detail: impl Into<String>) -> ApiError {
        Self::new(StatusCode::BAD_REQUEST, kind, detail)
    }

    pub fn unprocessable(kind: &'static str, detail: impl Into<String>) -> ApiError {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, kind, detail)
    }

    pub fn not_found(detail: impl Into<String>) -> ApiError {
        Self::new(StatusCode::NOT_FOUND, "not-found", detail)
    }

    /// Internal failures are logged in full and answered without internals.
    pub fn internal(context: &str, err: impl std::fmt::Display) -> ApiError {
        tracing::error!("{context}: {err}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("{context} failed on the server; the error is in the server log"),
        )
    }

    pub fn unavailable(detail: impl Into<String>) -> ApiError {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail)
    }

    fn title(&self) -> &'static str {
        self.status.canonical_reason().unwrap_or("Error")
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.kind, self.detail)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({
            "type": format!("urn:vqclip:problem:{}", self.kind),
            "title": self.title(),
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        if let Value::Object(map) = &mut body {
            map.extend(self.extra);
            // The request id ties the answer to the server's log lines.
            if let Some(id) = super::request_id::current() {
                map.insert("instance".into(), format!("urn:vqclip:request:{id}").into());
            }
        }
        let mut response = (self.status, ascii_json(&body.to_string())).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(seconds) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// JSON with every non-ASCII character written as `\uXXXX`. A problem often quotes
/// the client's own input (an id, a prompt); JSON has no charset parameter, and clients
/// that guess the encoding of a short body guess wrong, so the body is kept ASCII.
fn ascii_json(json: &str) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            // Outside strings JSON has only ASCII, so every such character is in one.
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                let _ = write!(out, "\\u{unit:04x}");
            }
        }
    }
    out
}

impl From<QueueError> for ApiError {
    fn from(err: QueueError) -> ApiError {
        match err {
            QueueError::NotFound(id) => {
                ApiError::not_found(format!("no job or upload with id {id}"))
            }
            e @ QueueError::QueueFull { .. } => {
                let mut problem =
                    ApiError::new(StatusCode::TOO_MANY_REQUESTS, "queue-full", e.to_string());
                // The handler knows the configured wait; this is the fallback.
                problem.retry_after = Some(5);
                problem
            }
            e @ QueueError::KeyQueueFull { .. } => {
                let mut problem = ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "key-queue-full",
                    e.to_string(),
                );
                problem.retry_after = Some(5);
                problem
            }
            e @ QueueError::IdempotencyMismatch { .. } => {
                ApiError::unprocessable("idempotency-key-reused", e.to_string())
            }
            QueueError::Conflict { id, state, detail } => ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("job {id} is {state}; {detail}"),
            )
            .with("state", state.as_str()),
            e @ QueueError::Busy(_) => {
                // Saturation, not a fault: the client may retry (issue 9, defect 1).
                tracing::warn!("answering 503: {e}");
                let mut problem = ApiError::unavailable(
                    "the server's database is momentarily saturated; retry after the Retry-After delay",
                );
                problem.kind = "database-busy";
                problem.retry_after = Some(1);
                problem
            }
            e => ApiError::internal("the job store", e),
        }
    }
}

impl From<StorageError> for ApiError {
    fn from(err: StorageError) -> ApiError {
        match err {
            e @ StorageError::InvalidName(_) => {
                ApiError::bad_request("invalid-artifact-name", e.to_string())
            }
            e @ StorageError::Missing(_) => ApiError::not_found(e.to_string()),
            e => ApiError::internal("the artifact store", e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_are_ascii_json_that_reads_back_the_same() {
        let detail = "no job with id \"A\u{a1}\u{903}\" \u{1f600}";
        let response = ApiError::not_found(detail).into_response();
        let bytes =
            futures::executor::block_on(axum::body::to_bytes(response.into_body(), 1 << 16))
                .unwrap();
        assert!(bytes.is_ascii(), "{bytes:?}");
        let problem: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(problem["detail"], detail);
    }
}
