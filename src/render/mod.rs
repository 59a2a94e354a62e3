//! The VQGAN+CLIP optimisation: job spec, prompts, cutouts, augmentations, loss,
//! optimisers, the step loop, checkpoints and the output files.
//!
//! It knows nothing of HTTP or SQL: `vqclip render` and the service's workers run the
//! same code, reporting through a [`ProgressSink`] and stopping on a [`CancelToken`].

pub mod augment;
pub mod batch;
pub mod batch_key;
mod check;
pub mod checkpoint;
pub mod cutouts;
pub mod engine;
#[cfg(test)]
mod gradcheck;
pub mod history;
pub mod job;
pub mod models;
pub mod ops;
pub mod optim;
pub mod output;
pub mod progress;
pub mod prompts;
pub mod spec;
pub mod steer;
pub mod video;

pub use batch::{render, render_batch, render_batch_hosted, BatchHost, BatchJob};
pub use batch_key::BatchKey;
pub use engine::{check_batchable, step_batch, RenderSession, StepStats};
pub use history::History;
pub use job::{Artifacts, RenderError, RenderJob, RenderOutcome};
pub use models::{ModelIdentities, ModelIdentity, ModelSet};
pub use progress::{CancelToken, NoProgress, ProgressEvent, ProgressSink};
pub use prompts::{PromptSet, TextPrompt};
pub use spec::{
    Augment, CutMethod, ImageInput, ImagePromptSpec, ImageRef, ImageSource, InitNoise,
    InitRegulariser, JobSpec, Limits, ModelsSpec, NoisePromptSpec, OptimizerKind, PromptsSpec,
    SpecError, TextPromptSpec, Validated, VideoSpec, VideoStyleSpec, ZoomSpec, SPEC_VERSION,
    VALIDATION_VERSION,
};
pub use steer::{AppliedRevision, ForkStart, Revision, Steering};
pub use video::{SourceVideo, VideoError, VideoInfo, VideoLimits};
