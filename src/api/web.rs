//! The page at `/` and the API documentation at `/docs`, both compiled into the binary.
//!
//! These routes are not part of the API (they are not in `openapi.yaml`) and sit outside
//! the auth layer: the page itself holds no data, and every call it makes to `/v1`
//! carries the key the person typed in. Nothing here is fetched from the internet:
//! the page is plain HTML/CSS/JS and Swagger UI's files are vendored by
//! `utoipa-swagger-ui` at build time.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::{ApiError, AppState};
use crate::render::spec::ModelPolicy;

const INDEX_HTML: &str = include_str!("web/index.html");
const APP_JS: &str = include_str!("web/app.js");
const APP_CSS: &str = include_str!("web/app.css");

/// The page may talk only to this server; a stray third-party URL fails loudly.
const PAGE_CSP: &str = "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; \
     connect-src 'self'; style-src 'self'; script-src 'self'; object-src 'none'; \
     base-uri 'none'; frame-ancestors 'none'";

/// The page and docs routes, added by [`super::router`] outside the auth layer.
pub(super) fn routes() -> Router<AppState> {
    // No online validator: its badge would call validator.swagger.io.
    let docs = Arc::new(utoipa_swagger_ui::Config::from("/openapi.yaml").validator_url("none"));
    let docs_tail = docs.clone();
    Router::new()
        .route(
            "/",
            get(|| async { asset(INDEX_HTML, "text/html; charset=utf-8") }),
        )
        .route(
            "/ui/app.js",
            get(|| async { asset(APP_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/ui/app.css",
            get(|| async { asset(APP_CSS, "text/css; charset=utf-8") }),
        )
        .route("/ui/config.json", get(page_config))
        .route("/docs", get(|| async { Redirect::permanent("/docs/") }))
        .route(
            "/docs/",
            get(move || docs_file(String::new(), docs.clone())),
        )
        .route(
            "/docs/{*tail}",
            get(move |Path(tail): Path<String>| docs_file(tail, docs_tail.clone())),
        )
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Assets change with the binary; revalidation is cheap on loopback and LAN.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(PAGE_CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// What the form offers: the catalogue's models, the server's defaults and limits,
/// and whether keys are on (so that the page asks for one before the first 401).
async fn page_config(State(st): State<AppState>) -> Result<Json<Value>, ApiError> {
    let (vqgan, clip) = ModelPolicy::catalogue();
    let keys = st
        .auth
        .enabled()
        .await
        .map_err(|e| ApiError::internal("checking whether API keys are on", e))?;
    let (m, l) = (&st.config.models, &st.config.limits);
    Ok(Json(json!({
        "keys": keys || st.auth.config().required,
        "models": {
            "vqgan": vqgan,
            "clip": clip,
            "default_vqgan": m.vqgan,
            "default_clip": m.clip,
        },
        "limits": {
            "max_side": l.max_side,
            "max_pixels": l.max_pixels,
            "max_steps": l.max_steps,
            "max_cutn": l.max_cutn,
            "max_prompts": l.max_prompts,
        },
    })))
}

async fn docs_file(tail: String, config: Arc<utoipa_swagger_ui::Config<'static>>) -> Response {
    match utoipa_swagger_ui::serve(&tail, config) {
        Ok(Some(file)) => {
            let mut response = (StatusCode::OK, file.bytes.into_owned()).into_response();
            if let Ok(v) = HeaderValue::from_str(&file.content_type) {
                response.headers_mut().insert(header::CONTENT_TYPE, v);
            }
            response
        }
        Ok(None) => ApiError::not_found(format!(
            "no file /docs/{tail}; the documentation starts at /docs/"
        ))
        .into_response(),
        Err(e) => ApiError::internal("serving the API documentation", e).into_response(),
    }
}
