//! `POST /v1/uploads`: images for init images and image prompts, and MP4 videos
//! for video styling.

use std::io::Cursor;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use base64::Engine;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

use super::extract::{media_type, parse_json, Body, Caller};
use super::{ApiError, AppState};
use crate::config::LimitsConfig;
use crate::queue::Upload;

/// Bounds on a decoded image, so that a small file cannot demand gigabytes.
#[derive(Debug, Clone)]
pub struct ImageLimits {
    pub max_pixels: u64,
    pub max_alloc: u64,
}

impl From<&LimitsConfig> for ImageLimits {
    fn from(l: &LimitsConfig) -> Self {
        ImageLimits {
            max_pixels: l.max_upload_pixels,
            // RGBA8 of the largest allowed image, with room for the decoder's buffers.
            max_alloc: l.max_upload_pixels.saturating_mul(8),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ImageCheck {
    pub format: image::ImageFormat,
    pub width: u32,
    pub height: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageRejection {
    #[error("not an image vqclip can read; send PNG, JPEG or WebP")]
    UnknownFormat,
    #[error("the image is {width}x{height}, more than the {max} pixels allowed (limits.max_upload_pixels)")]
    TooLarge { width: u32, height: u32, max: u64 },
    #[error("the image cannot be decoded: {0}")]
    Corrupt(String),
}

/// Reads the header for the size, refuses oversized images before decoding (the
/// decompression-bomb guard), then decodes fully under allocation limits.
pub fn validate_image(bytes: &[u8], limits: &ImageLimits) -> Result<ImageCheck, ImageRejection> {
    let check = image_header(bytes, limits)?;
    decode_image(bytes, &check, limits)?;
    Ok(check)
}

fn reader(bytes: &[u8]) -> Result<image::ImageReader<Cursor<&[u8]>>, ImageRejection> {
    image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageRejection::Corrupt(e.to_string()))
}

/// Format and size from the header alone; refuses oversized images (cheap, no decode).
pub fn image_header(bytes: &[u8], limits: &ImageLimits) -> Result<ImageCheck, ImageRejection> {
    let reader = || reader(bytes);
    let format = reader()?.format().ok_or(ImageRejection::UnknownFormat)?;
    if !matches!(
        format,
        image::ImageFormat::Png | image::ImageFormat::Jpeg | image::ImageFormat::WebP
    ) {
        return Err(ImageRejection::UnknownFormat);
    }
    let (width, height) = reader()?
        .into_dimensions()
        .map_err(|e| ImageRejection::Corrupt(e.to_string()))?;
    if width as u64 * height as u64 > limits.max_pixels {
        return Err(ImageRejection::TooLarge {
            width,
            height,
            max: limits.max_pixels,
        });
    }
    Ok(ImageCheck {
        format,
        width,
        height,
    })
}

/// Decodes the whole image under allocation limits: a corrupt body fails here.
fn decode_image(
    bytes: &[u8],
    check: &ImageCheck,
    limits: &ImageLimits,
) -> Result<(), ImageRejection> {
    let mut decoder = reader(bytes)?;
    let mut l = image::Limits::default();
    l.max_image_width = Some(check.width);
    l.max_image_height = Some(check.height);
    l.max_alloc = Some(limits.max_alloc);
    decoder.limits(l);
    decoder
        .decode()
        .map_err(|e| ImageRejection::Corrupt(e.to_string()))?;
    Ok(())
}

/// Bytes a decode of a `width` x `height` image may hold at its peak: the RGBA8 output
/// and the decoder's own buffers (the same bound as [`ImageLimits::max_alloc`]).
fn decode_cost(width: u32, height: u32) -> u64 {
    u64::from(width) * u64::from(height) * 8
}

/// The memory all image decodes in flight may take together (limits.max_decode_bytes).
/// Each image is capped on its own too, but without this many parallel uploads of small
/// files with huge headers would take gigabytes between them.
#[derive(Clone)]
pub struct DecodeBudget {
    /// One permit per KiB: `acquire_many` counts in u32.
    permits: Arc<Semaphore>,
    total_kib: u32,
    wait: Duration,
    retry_after: u64,
}

impl DecodeBudget {
    pub fn new(limits: &LimitsConfig, retry_after_seconds: u64) -> DecodeBudget {
        let total_kib = (limits.max_decode_bytes / 1024).clamp(1, u64::from(u32::MAX)) as u32;
        DecodeBudget {
            permits: Arc::new(Semaphore::new(total_kib as usize)),
            total_kib,
            wait: Duration::from_millis(limits.decode_wait_ms),
            retry_after: retry_after_seconds.max(1),
        }
    }

    /// Reserves the decode memory of an image; waits at most the configured time, then
    /// answers 503 with Retry-After. An image larger than the whole budget waits until
    /// it can decode alone.
    pub async fn reserve(&self, width: u32, height: u32) -> Result<OwnedSemaphorePermit, ApiError> {
        let kib = decode_cost(width, height)
            .div_ceil(1024)
            .clamp(1, u64::from(self.total_kib)) as u32;
        let acquire = self.permits.clone().acquire_many_owned(kib);
        match tokio::time::timeout(self.wait, acquire).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(closed)) => Err(ApiError::internal("the image decode budget", closed)),
            Err(_) => {
                let mut problem = ApiError::unavailable(
                    "the server is decoding as many images as its memory budget allows (limits.max_decode_bytes); retry after Retry-After seconds",
                );
                problem.kind = "decode-busy";
                problem.retry_after = Some(self.retry_after);
                Err(problem)
            }
        }
    }
}

/// Checks an image within the decode budget: the header first (refusing oversized
/// images at once), then the full decode on the blocking pool while holding its share.
pub async fn check_image_within_budget(
    bytes: Vec<u8>,
    limits: ImageLimits,
    budget: &DecodeBudget,
) -> Result<(Vec<u8>, Result<ImageCheck, ImageRejection>), ApiError> {
    let check = match image_header(&bytes, &limits) {
        Ok(check) => check,
        Err(e) => return Ok((bytes, Err(e))),
    };
    let permit = budget.reserve(check.width, check.height).await?;
    tokio::task::spawn_blocking(move || {
        let decoded = decode_image(&bytes, &check, &limits).map(|()| check);
        drop(permit);
        (bytes, decoded)
    })
    .await
    .map_err(|e| ApiError::internal("checking an image", e))
}

/// The image bytes of an upload request: multipart (the first file field), a raw
/// image body, or JSON `{"image": "<base64 or data: URL>"}`.
async fn image_bytes(request: Request, st: &AppState) -> Result<Vec<u8>, ApiError> {
    let headers: HeaderMap = request.headers().clone();
    match media_type(&headers).as_deref() {
        Some("multipart/form-data") => {
            let mut form = Multipart::from_request(request, st)
                .await
                .map_err(|e| ApiError::bad_request("invalid-multipart", e.body_text()))?;
            loop {
                let field = form.next_field().await.map_err(multipart_error)?;
                let Some(field) = field else {
                    return Err(ApiError::bad_request(
                        "invalid-multipart",
                        "the form has no file field; send the image as a field named `file`",
                    ));
                };
                if field.file_name().is_some() || field.name() == Some("file") {
                    return Ok(field.bytes().await.map_err(multipart_error)?.to_vec());
                }
            }
        }
        Some("application/json") => {
            let Body(body) = Body::from_request(request, st).await?;
            let value = parse_json(&body)?;
            let text = value
                .get("image")
                .and_then(|v| v.as_str())
                .ok_or_else(|| {
                    ApiError::unprocessable(
                        "invalid-upload",
                        "a JSON upload is {\"image\": \"<base64>\"} or {\"image\": \"data:image/png;base64,...\"}",
                    )
                })?;
            let data = text
                .strip_prefix("data:")
                .and_then(|rest| rest.split_once(','))
                .map_or(text, |(_, d)| d);
            base64::engine::general_purpose::STANDARD
                .decode(data.trim())
                .map_err(|e| ApiError::unprocessable("invalid-upload", format!("image: invalid base64: {e}")))
        }
        Some(t) if t.starts_with("image/") || t == "video/mp4" || t == "application/octet-stream" => {
            let Body(body) = Body::from_request(request, st).await?;
            Ok(body.to_vec())
        }
        other => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            format!(
                "send the image as multipart/form-data, a raw image/* body or JSON; got Content-Type {}",
                other.unwrap_or("none")
            ),
        )),
    }
}

fn multipart_error(e: axum::extract::multipart::MultipartError) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body-too-large",
            "the upload is larger than server.max_upload_bytes",
        )
    } else {
        ApiError::bad_request("invalid-multipart", e.body_text())
    }
}

pub(super) async fn upload(
    State(st): State<AppState>,
    Caller(scope): Caller,
    Extension(budget): Extension<DecodeBudget>,
    request: Request,
) -> Result<Response, ApiError> {
    let declared_video = media_type(request.headers()).as_deref() == Some("video/mp4");
    let bytes = image_bytes(request, &st).await?;
    if bytes.is_empty() {
        return Err(ApiError::unprocessable(
            "invalid-upload",
            "the upload is empty",
        ));
    }
    if declared_video || crate::render::video::looks_like_mp4(&bytes) {
        return upload_video(st, scope, bytes).await;
    }
    let limits = crate::api::ImageLimits::from(&st.config.limits);
    let (bytes, check) = check_image_within_budget(bytes, limits, &budget).await?;
    let check = check.map_err(|e| match e {
        ImageRejection::TooLarge { .. } => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "image-too-large",
            e.to_string(),
        ),
        ImageRejection::UnknownFormat => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "not-an-image",
            e.to_string(),
        ),
        ImageRejection::Corrupt(_) => ApiError::unprocessable("not-an-image", e.to_string()),
    })?;
    let id = Uuid::now_v7();
    let extension = check
        .format
        .extensions_str()
        .first()
        .copied()
        .unwrap_or("img");
    let artifacts = st.artifacts.clone();
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let size = bytes.len() as u64;
    let file_name = artifacts
        .put_upload(id, extension, bytes::Bytes::from(bytes))
        .await?;
    let upload = Upload {
        id,
        owner_key_id: scope.owner_key_id.clone(),
        file_name,
        content_type: check.format.to_mime_type().to_owned(),
        width: check.width,
        height: check.height,
        bytes: size,
        sha256,
        created_at: chrono::Utc::now(),
    };
    st.store.insert_upload(upload.clone()).await?;
    Ok(created(&upload, None))
}

/// The 201 answer to an upload; a video's adds its frame count and rate.
fn created(upload: &Upload, video: Option<(usize, f32)>) -> Response {
    let mut body = json!({
        "id": upload.id,
        "ref": format!("upload:{}", upload.id),
        "content_type": upload.content_type,
        "width": upload.width,
        "height": upload.height,
        "bytes": upload.bytes,
        "sha256": upload.sha256,
        "created_at": upload.created_at,
    });
    if let Some((frames, fps)) = video {
        body["frames"] = json!(frames);
        body["fps"] = json!(fps);
    }
    (
        StatusCode::CREATED,
        [(header::CACHE_CONTROL, "no-store")],
        Json(body),
    )
        .into_response()
}

/// The video limits of a deployment: frames (`limits.max_video_frames`) and frame
/// size (`limits.max_upload_pixels`).
pub fn video_limits(l: &LimitsConfig) -> crate::render::VideoLimits {
    crate::render::VideoLimits {
        max_frames: l.max_video_frames as usize,
        max_pixels: l.max_upload_pixels,
    }
}

/// A video problem: 422 with the limit that was broken, when one was.
pub fn video_problem(e: crate::render::VideoError) -> ApiError {
    use crate::render::VideoError;
    let problem = ApiError::unprocessable("invalid-video", e.to_string());
    match e {
        VideoError::TooManyFrames { max, .. } => problem
            .with("limit", "limits.max_video_frames")
            .with("max", max as u64),
        VideoError::TooLarge { max, .. } => problem
            .with("limit", "limits.max_upload_pixels")
            .with("max", max),
        _ => problem,
    }
}

/// An MP4 for video styling: every frame is decoded (in process) before it is
/// accepted, so a job never starts on a video it cannot read.
async fn upload_video(
    st: AppState,
    scope: crate::queue::Scope,
    bytes: Vec<u8>,
) -> Result<Response, ApiError> {
    let limits = video_limits(&st.config.limits);
    let (bytes, check) = tokio::task::spawn_blocking(move || {
        let check = crate::render::video::validate_mp4(&bytes, &limits);
        (bytes, check)
    })
    .await
    .map_err(|e| ApiError::internal("checking a video upload", e))?;
    let info = check.map_err(video_problem)?;
    let id = Uuid::now_v7();
    let artifacts = st.artifacts.clone();
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let size = bytes.len() as u64;
    let file_name = artifacts
        .put_upload(id, "mp4", bytes::Bytes::from(bytes))
        .await?;
    let upload = Upload {
        id,
        owner_key_id: scope.owner_key_id.clone(),
        file_name,
        content_type: "video/mp4".to_owned(),
        width: info.width,
        height: info.height,
        bytes: size,
        sha256,
        created_at: chrono::Utc::now(),
    };
    st.store.insert_upload(upload.clone()).await?;
    Ok(created(&upload, Some((info.frames, info.fps))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let img = image::RgbImage::from_pixel(width, height, image::Rgb([10, 20, 30]));
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    /// A valid PNG header claiming a huge size, with a tiny body.
    pub(crate) fn bomb_header(width: u32, height: u32) -> Vec<u8> {
        let mut bytes = png(1, 1);
        // IHDR data starts at byte 16: width, height (big endian); fix its CRC.
        bytes[16..20].copy_from_slice(&width.to_be_bytes());
        bytes[20..24].copy_from_slice(&height.to_be_bytes());
        let crc = crc32(&bytes[12..29]);
        bytes[29..33].copy_from_slice(&crc.to_be_bytes());
        bytes
    }

    /// PNG chunk CRC (CRC-32/ISO-HDLC), as flate2 computes it.
    fn crc32(data: &[u8]) -> u32 {
        let mut crc = flate2::Crc::new();
        crc.update(data);
        crc.sum()
    }

    #[tokio::test]
    async fn the_decode_budget_bounds_decodes_in_flight() {
        let mut config = crate::config::Config::defaults().limits;
        // Room for one 1024x1024 decode (8 MiB), not two.
        config.max_decode_bytes = 12 << 20;
        config.decode_wait_ms = 50;
        let budget = DecodeBudget::new(&config, 7);
        let first = budget.reserve(1024, 1024).await.unwrap();
        let refused = budget.reserve(1024, 1024).await.unwrap_err();
        assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(refused.retry_after, Some(7));
        // Small images still fit beside it; the big one fits again once the first ends.
        let small = budget.reserve(256, 256).await.unwrap();
        drop(first);
        let second = budget.reserve(1024, 1024).await.unwrap();
        drop((small, second));
        // An image larger than the whole budget decodes alone rather than never.
        let _alone = budget.reserve(4096, 4096).await.unwrap();
    }

    #[test]
    fn accepts_images_and_refuses_the_rest() {
        let limits = ImageLimits {
            max_pixels: 1 << 20,
            max_alloc: 1 << 24,
        };
        let ok = validate_image(&png(32, 16), &limits).unwrap();
        assert_eq!((ok.width, ok.height), (32, 16));
        assert!(matches!(
            validate_image(b"hello, not an image", &limits),
            Err(ImageRejection::UnknownFormat)
        ));
        assert!(matches!(
            validate_image(&bomb_header(100_000, 100_000), &limits),
            Err(ImageRejection::TooLarge { .. })
        ));
        let mut truncated = png(32, 32);
        truncated.truncate(truncated.len() - 20);
        assert!(matches!(
            validate_image(&truncated, &limits),
            Err(ImageRejection::Corrupt(_))
        ));
    }
}
