//! A render job as the engine receives it, and what it hands back.

use std::collections::HashMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::spec::{JobSpec, SpecError};

/// Everything `render` needs besides the models.
#[derive(Debug, Clone)]
pub struct RenderJob {
    pub spec: JobSpec,
    /// The seed actually used: `spec.seed`, or one the caller drew and recorded.
    pub seed: u64,
    /// Where `image.png`, `frames/`, `video.mp4`, `metadata.json` and checkpoints go.
    pub out_dir: PathBuf,
    /// A checkpoint file to continue from.
    pub resume: Option<PathBuf>,
    /// Image bytes for every `upload:<id>` the spec refers to, keyed by the reference
    /// exactly as written in the spec. Inline `data:` images need no entry.
    pub inputs: HashMap<String, Vec<u8>>,
}

impl RenderJob {
    /// A job with the spec's seed, or a fresh random one when the spec has none.
    pub fn new(spec: JobSpec, out_dir: impl Into<PathBuf>) -> Self {
        let seed = spec.seed.unwrap_or_else(rand::random);
        Self {
            spec,
            seed,
            out_dir: out_dir.into(),
            resume: None,
            inputs: HashMap::new(),
        }
    }
}

/// The files a finished render wrote, relative paths resolved against `out_dir`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Artifacts {
    pub image: PathBuf,
    pub frames: Vec<PathBuf>,
    /// Absent when `video.enabled` is false or there were fewer than two frames.
    pub video: Option<PathBuf>,
    pub metadata: PathBuf,
}

/// How a render ended when it did not fail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RenderOutcome {
    Completed(Artifacts),
    /// Stopped by `CancelToken::cancel` after `step` steps.
    Canceled {
        step: u32,
    },
    /// Stopped by `CancelToken::interrupt` after `step` steps; resume from `checkpoint`.
    Interrupted {
        step: u32,
        checkpoint: PathBuf,
    },
}

/// Why a render failed.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("invalid job spec: {0}")]
    Spec(#[from] SpecError),
    #[error("image {reference:?}: {reason}")]
    Input { reference: String, reason: String },
    #[error("model: {0}")]
    Model(String),
    #[error("tensor computation failed: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("encoding {what} failed: {reason}")]
    Encode { what: &'static str, reason: String },
    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
    #[error("these jobs cannot share a batched step: {0}")]
    Incompatible(String),
    /// A step this job took together with others failed; every job in it fails alike.
    #[error("the batched step this job shared with others failed: {0}")]
    SharedStep(String),
}

impl RenderError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        RenderError::Io {
            path: path.into(),
            source,
        }
    }
}
