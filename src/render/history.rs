//! What a job's steps leave behind for `metadata.json` and checkpoints.

use serde::{Deserialize, Serialize};

/// Per-step record kept for `metadata.json` and carried through checkpoints.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    pub losses: Vec<Vec<f32>>,
    pub step_seconds: Vec<f64>,
}
