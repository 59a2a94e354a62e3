//! The HTTP API: axum routes under `/v1`, SSE progress, artifacts, `problem+json`
//! errors, health and metrics.
//!
//! Every route is one row of [`route_table`], which builds the router and which the
//! OpenAPI test compares with `openapi.yaml`, so the two cannot drift apart.

mod artifacts;
mod auth;
pub mod conn;
mod error;
mod events;
mod extract;
mod jobs;
pub mod links;
pub mod metrics;
mod ops;
pub mod request;
pub mod request_id;
mod steer;
mod uploads;
mod web;
mod webhooks;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, patch, post, MethodRouter};
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::queue::{JobStore, Metrics};
use crate::storage::ArtifactStore;
use crate::webhooks::WebhookEngine;

pub use error::ApiError;
pub use extract::Caller;
pub use ops::worker_router;
pub use uploads::{validate_image, ImageCheck, ImageLimits};

/// What every handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn JobStore>,
    pub artifacts: ArtifactStore,
    pub config: Arc<Config>,
    /// The workers' job-run series (shared with the workers in this process).
    pub metrics: Arc<Metrics>,
    /// This API's request series.
    pub http_metrics: Arc<metrics::HttpMetrics>,
    /// API keys and per-key rate limits; with no key created, everyone is let in.
    pub auth: Arc<Authenticator>,
    /// Checks job webhooks at submission and keeps their delivery history.
    pub webhooks: Arc<WebhookEngine>,
    /// Cancelled on SIGINT/SIGTERM; open SSE streams end so that shutdown is not held up.
    pub shutdown: CancellationToken,
}

/// One route: method, path template (axum syntax, same as OpenAPI's) and its handler.
pub struct RouteEntry {
    pub method: Method,
    pub path: &'static str,
    pub handler: MethodRouter<AppState>,
}

fn entry(method: Method, path: &'static str, handler: MethodRouter<AppState>) -> RouteEntry {
    RouteEntry {
        method,
        path,
        handler,
    }
}

/// Every route of the service.
pub fn route_table(config: &Config) -> Vec<RouteEntry> {
    let upload_limit = DefaultBodyLimit::max(config.server.max_upload_bytes);
    vec![
        entry(Method::POST, "/v1/jobs", post(jobs::submit)),
        entry(Method::GET, "/v1/jobs", get(jobs::list)),
        entry(Method::GET, "/v1/jobs/{id}", get(jobs::get_job)),
        entry(Method::DELETE, "/v1/jobs/{id}", delete(jobs::delete_job)),
        entry(Method::PATCH, "/v1/jobs/{id}", patch(steer::steer)),
        entry(Method::POST, "/v1/jobs/{id}/cancel", post(jobs::cancel)),
        entry(Method::POST, "/v1/jobs/{id}/fork", post(steer::fork)),
        entry(Method::GET, "/v1/jobs/{id}/events", get(events::stream)),
        entry(
            Method::GET,
            "/v1/jobs/{id}/webhooks",
            get(webhooks::history),
        ),
        entry(
            Method::GET,
            "/v1/jobs/{id}/image.png",
            get(artifacts::image),
        ),
        entry(Method::GET, "/v1/jobs/{id}/frames", get(artifacts::frames)),
        entry(
            Method::GET,
            "/v1/jobs/{id}/frames/{frame}",
            get(artifacts::frame),
        ),
        entry(
            Method::GET,
            "/v1/jobs/{id}/video.mp4",
            get(artifacts::video),
        ),
        entry(
            Method::GET,
            "/v1/jobs/{id}/metadata.json",
            get(artifacts::metadata),
        ),
        entry(
            Method::POST,
            "/v1/uploads",
            post(uploads::upload).layer(upload_limit),
        ),
        entry(Method::GET, "/v1/limits", get(jobs::limits_view)),
        entry(Method::GET, "/healthz", get(ops::healthz)),
        entry(Method::GET, "/readyz", get(ops::readyz)),
        entry(Method::GET, "/metrics", get(ops::metrics)),
        entry(Method::GET, "/openapi.yaml", get(ops::openapi)),
    ]
}

/// `(method, path)` of every route, for the OpenAPI comparison.
pub fn routes() -> Vec<(String, String)> {
    route_table(&Config::defaults())
        .into_iter()
        .map(|r| (r.method.as_str().to_owned(), r.path.to_owned()))
        .collect()
}

/// The whole application. The auth layer sits between the routes and the metrics
/// layer, inserting the caller's [`crate::queue::Scope`] as a request extension; CORS
/// is outside it, so browser preflights need no key.
pub fn router(state: AppState) -> Router {
    let mut router = Router::new();
    for r in route_table(&state.config) {
        router = router.route(r.path, r.handler);
    }
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.config.server.max_body_bytes))
        .layer(axum::Extension(uploads::DecodeBudget::new(
            &state.config.limits,
            state.config.server.retry_after_seconds,
        )))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ))
        // The page and /docs are added after the auth layer: they hold no data.
        .merge(web::routes())
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            track_requests,
        ))
        .layer(cors(&state.config.server.cors_allowed_origins))
        // Server faults are logged where they happen (ApiError::internal); a 503 from
        // /readyz is an answer, not an error, so failures log at debug here.
        .layer(
            tower_http::trace::TraceLayer::new_for_http().on_failure(
                tower_http::trace::DefaultOnFailure::new().level(tracing::Level::DEBUG),
            ),
        )
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked))
        // Outermost, so that the panic answer too carries the request id.
        .layer(axum::middleware::from_fn(request_id::assign))
        .with_state(state)
}

/// Serves until `state.shutdown` is cancelled, then lets open requests finish. The
/// connection settings of `[server]` (header and keep-alive deadlines, the bound on open
/// connections) apply; see [`conn`].
pub async fn serve(listener: tokio::net::TcpListener, state: AppState) -> std::io::Result<()> {
    let shutdown = state.shutdown.clone();
    let limits = conn::ConnLimits::from_config(&state.config.server);
    conn::serve(listener, router(state), limits, shutdown).await
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!(
        "no route {}; the routes are listed at /openapi.yaml",
        uri.path()
    ))
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        format!(
            "{method} is not allowed on {}; see /openapi.yaml",
            uri.path()
        ),
    )
}

fn panicked(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::internal("a request handler", "panicked").into_response()
}

async fn track_requests(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let response = next.run(request).await;
    state.http_metrics.request(
        method.as_str(),
        &route,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

/// No origins configured: no CORS layer at all, so responses carry no CORS headers.
fn cors(
    origins: &[String],
) -> tower::util::Either<tower_http::cors::CorsLayer, tower::layer::util::Identity> {
    use tower_http::cors::{AllowOrigin, Any, CorsLayer};
    if origins.is_empty() {
        return tower::util::option_layer(None);
    }
    let layer = CorsLayer::new()
        .allow_methods([Method::GET, Method::POST, Method::PATCH, Method::DELETE])
        .allow_headers(Any)
        .expose_headers(Any);
    let layer = if origins.iter().any(|o| o == "*") {
        layer.allow_origin(Any)
    } else {
        let list: Vec<HeaderValue> = origins
            .iter()
            .filter_map(|o| HeaderValue::from_str(o).ok())
            .collect();
        layer.allow_origin(AllowOrigin::list(list))
    };
    tower::util::option_layer(Some(layer))
}
