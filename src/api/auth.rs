//! The auth layer: who is calling, may they, and how fast.
//!
//! It turns `Authorization: Bearer vq_...` into the request's [`Scope`] (which
//! the handlers' `Caller` extractor reads), spends one token of the key's
//! request rate, and guards `/metrics` by its own setting. `/healthz`,
//! `/readyz` and `/openapi.yaml` stay open so probes and clients need no key.

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, AppState};
use crate::auth::AuthError;
use crate::queue::Scope;

const OPEN_PATHS: [&str; 3] = ["/healthz", "/readyz", "/openapi.yaml"];

pub(super) async fn authenticate(
    State(st): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    if OPEN_PATHS.contains(&path) {
        return next.run(request).await;
    }
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or("?"));
    if path == "/metrics" {
        return match st.auth.check_metrics(authorization).await {
            Ok(()) => next.run(request).await,
            Err(e) => problem(e).into_response(),
        };
    }
    let caller = match st.auth.identify(authorization).await {
        Ok(c) => c,
        Err(e) => return problem(e).into_response(),
    };
    if let Err(e) = st.auth.check_rate(&caller) {
        return problem(e).into_response();
    }
    let scope = match (&caller.key_id, caller.admin) {
        (Some(id), false) => Scope::key(id.clone()),
        _ => Scope::unrestricted(),
    };
    request.extensions_mut().insert(scope);
    next.run(request).await
}

/// The HTTP answer to an auth error: the auth room knows keys, the API knows statuses.
fn problem(e: AuthError) -> Response {
    let (status, kind) = match &e {
        AuthError::MissingKey | AuthError::MalformedHeader => {
            (StatusCode::UNAUTHORIZED, "unauthorized")
        }
        AuthError::InvalidKey | AuthError::RevokedKey(_) => {
            (StatusCode::UNAUTHORIZED, "invalid-key")
        }
        AuthError::AdminOnly => (StatusCode::FORBIDDEN, "forbidden"),
        AuthError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate-limited"),
        AuthError::Key(_) => return ApiError::internal("checking the API key", e).into_response(),
    };
    let mut p = ApiError::new(status, kind, e.to_string());
    p.retry_after = e.retry_after();
    let mut response = p.into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"vqclip\""),
        );
    }
    response
}
