//! The public paths of a job's resources. The API owns its URL space; workers, which
//! know no HTTP, record these paths in events through the functions the command line
//! hands them (`worker::ArtifactUrls`), so both agree on one spelling.

use uuid::Uuid;

pub fn job(id: Uuid) -> String {
    format!("/v1/jobs/{id}")
}

/// `name` is one of `image.png`, `video.mp4`, `metadata.json`, `frames`, `events`.
pub fn artifact(id: Uuid, name: &str) -> String {
    format!("/v1/jobs/{id}/{name}")
}

pub fn frame(id: Uuid, step: u32) -> String {
    format!("/v1/jobs/{id}/frames/{step}.png")
}
