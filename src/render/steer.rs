//! Steering a render while it runs, and starting one from a saved frame's state.
//!
//! A [`Revision`] is the job's whole effective spec after one change (the API merged
//! and validated it), numbered 1, 2, ... It takes effect at a step boundary, never
//! mid-step, and the step it took effect at is part of the job's state: a resumed job
//! applies the revisions recorded at or before its checkpoint's step before its first
//! step, and the later ones again at exactly their steps, so a steered run stays
//! reproducible from its seed and its revision list.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::prompts::PromptSet;
use super::spec::{JobSpec, SpecError};

/// The spec fields a revision may change; every other field is fixed for the job's life
/// (its size, models, optimiser, seed, ... and with them its batch key).
pub const STEERABLE: &[&str] = &[
    "prompts",
    "image_prompts",
    "noise_prompts",
    "noise_prompt_seeds",
    "noise_prompt_weights",
    "lr",
    "cutn",
    "cut_pow",
    "augments",
    "init_weight",
    "steps",
];

/// One numbered change of a job's render parameters.
#[derive(Debug, Clone)]
pub struct Revision {
    /// 1 for the first change of the job, then 2, ...
    pub number: u32,
    /// The step it took effect at (before that step ran); `None` until it has.
    pub step: Option<u32>,
    /// The job's effective spec from this revision on.
    pub spec: JobSpec,
    /// `spec`'s text prompts, parsed by whoever validated the revision.
    pub prompts: PromptSet,
    /// The fields the client sent, as sent: what metadata and events show.
    pub changes: serde_json::Value,
    /// Image bytes for the `upload:<id>` references this revision brings in, keyed as
    /// [`super::RenderJob::inputs`] is.
    pub inputs: HashMap<String, Vec<u8>>,
}

/// A revision as `metadata.json` lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AppliedRevision {
    pub number: u32,
    pub step: u32,
    pub changes: serde_json::Value,
}

impl Revision {
    pub fn applied(&self, step: u32) -> AppliedRevision {
        AppliedRevision {
            number: self.number,
            step,
            changes: self.changes.clone(),
        }
    }
}

/// Where revisions that arrive while a job renders wait for its next step boundary.
/// Clones share one inbox: the worker keeps one, the render reads the other.
#[derive(Debug, Clone, Default)]
pub struct Steering(Arc<Mutex<Vec<Revision>>>);

impl Steering {
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues a revision for the next boundary.
    pub fn send(&self, revision: Revision) {
        if let Ok(mut inbox) = self.0.lock() {
            inbox.push(revision);
        }
    }

    /// The highest number waiting; 0 when none is.
    pub fn last_number(&self) -> u32 {
        self.0
            .lock()
            .map(|inbox| inbox.iter().map(|r| r.number).max().unwrap_or(0))
            .unwrap_or(0)
    }

    /// The revisions waiting, in number order.
    pub(crate) fn take(&self) -> Vec<Revision> {
        let mut taken = match self.0.lock() {
            Ok(mut inbox) => std::mem::take(&mut *inbox),
            Err(_) => Vec::new(),
        };
        taken.sort_by_key(|r| r.number);
        taken
    }
}

/// A job that starts from a saved frame's state (z, z_orig, optimiser, RNG, step)
/// rather than from its seed: a fork.
#[derive(Debug, Clone, PartialEq)]
pub struct ForkStart {
    /// A checkpoint file, as written beside each frame (`frames/NNNNN.ckpt`).
    pub path: PathBuf,
    /// Start Adam (or the job's optimiser) afresh instead of carrying its moments over.
    pub reset_optimizer: bool,
}

/// The spec with every steerable field at its default: two specs with equal fixed
/// parts differ only in what a revision may change.
pub fn fixed_part(spec: &JobSpec) -> JobSpec {
    let d = JobSpec::default();
    JobSpec {
        prompts: d.prompts,
        image_prompts: d.image_prompts,
        noise_prompts: d.noise_prompts,
        noise_prompt_seeds: d.noise_prompt_seeds,
        noise_prompt_weights: d.noise_prompt_weights,
        lr: d.lr,
        cutn: d.cutn,
        cut_pow: d.cut_pow,
        augments: d.augments,
        init_weight: d.init_weight,
        steps: d.steps,
        ..spec.clone()
    }
}

/// Refuses a revision that changes more than [`STEERABLE`] names.
pub fn check_steerable(current: &JobSpec, revised: &JobSpec) -> Result<(), SpecError> {
    if fixed_part(current) == fixed_part(revised) {
        return Ok(());
    }
    Err(SpecError::new(
        "revision",
        "may change only the steerable fields",
        format!("the steerable fields are {}", STEERABLE.join(", ")),
    ))
}

/// The seed of the stream that embeds image prompts through cutouts: its own per
/// revision, so a revision applied live and the same revision replayed on resume see
/// the very same targets.
pub(crate) fn setup_seed(seed: u64, revision: u32) -> u64 {
    seed ^ 0x5eed_5e70_0000_0001 ^ (u64::from(revision) << 40)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_steerable_fields_may_change() {
        let base = JobSpec::default();
        let mut steered = base.clone();
        steered.lr = 0.5;
        steered.cutn = 3;
        steered.steps = 99;
        assert!(check_steerable(&base, &steered).is_ok());
        steered.width = 64;
        assert_eq!(
            check_steerable(&base, &steered).unwrap_err().field,
            "revision"
        );
    }

    #[test]
    fn the_inbox_hands_out_revisions_in_number_order_once() {
        let inbox = Steering::new();
        let other = inbox.clone();
        for n in [2, 1] {
            other.send(Revision {
                number: n,
                step: None,
                spec: JobSpec::default(),
                prompts: PromptSet::default(),
                changes: serde_json::json!({}),
                inputs: HashMap::new(),
            });
        }
        let taken: Vec<u32> = inbox.take().iter().map(|r| r.number).collect();
        assert_eq!(taken, vec![1, 2]);
        assert!(inbox.take().is_empty());
        assert_ne!(setup_seed(7, 0), setup_seed(7, 1));
    }
}
