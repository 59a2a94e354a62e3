//! A render job as the engine receives it, and what it hands back.

use std::collections::HashMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::prompts::{self, PromptSet};
use super::spec::{JobSpec, SpecError, Validated};
use super::steer::{ForkStart, Revision, Steering};

/// Everything `render` needs besides the models.
#[derive(Debug, Clone)]
pub struct RenderJob {
    pub spec: JobSpec,
    /// The spec's text prompts, parsed once by whoever built the job; a spec whose
    /// prompts do not parse keeps the reason, and its render fails with it.
    pub(crate) prompts: Result<PromptSet, SpecError>,
    /// The seed actually used: `spec.seed`, or one the caller drew and recorded.
    pub seed: u64,
    /// Where `image.png`, `frames/`, `video.mp4`, `metadata.json` and checkpoints go.
    pub out_dir: PathBuf,
    /// A checkpoint file to continue from.
    pub resume: Option<PathBuf>,
    /// Image bytes for every `upload:<id>` the spec refers to, keyed by the reference
    /// exactly as written in the spec. Inline `data:` images need no entry.
    pub inputs: HashMap<String, Vec<u8>>,
    /// The job's recorded revisions, in number order: those with a step are replayed
    /// there (or before the first step, when a resume starts past it); those without
    /// take effect at the first step boundary.
    pub revisions: Vec<Revision>,
    /// Revisions that arrive while the job renders.
    pub steering: Steering,
    /// Start from a saved frame's state instead of the seed; a resume wins over it.
    pub fork: Option<ForkStart>,
}

impl RenderJob {
    /// A job from a spec nobody validated (tests, benchmarks): its prompts are parsed
    /// here. The seed is the spec's, or a fresh random one when the spec has none.
    pub fn new(spec: JobSpec, out_dir: impl Into<PathBuf>) -> Self {
        let prompts = prompts::prompt_set(&spec.prompts);
        let seed = spec.seed.unwrap_or_else(rand::random);
        Self {
            spec,
            prompts,
            seed,
            out_dir: out_dir.into(),
            resume: None,
            inputs: HashMap::new(),
            revisions: Vec::new(),
            steering: Steering::new(),
            fork: None,
        }
    }

    /// A job from a validated spec: nothing is parsed again.
    pub fn validated(
        spec: JobSpec,
        validated: Validated,
        seed: u64,
        out_dir: impl Into<PathBuf>,
    ) -> Self {
        Self {
            spec,
            prompts: Ok(validated.prompts),
            seed,
            out_dir: out_dir.into(),
            resume: None,
            inputs: HashMap::new(),
            revisions: Vec::new(),
            steering: Steering::new(),
            fork: None,
        }
    }

    /// The parsed text prompts.
    pub fn prompts(&self) -> Result<&PromptSet, RenderError> {
        self.prompts
            .as_ref()
            .map_err(|e| RenderError::Spec(e.clone()))
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
