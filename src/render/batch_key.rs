//! What two jobs must share to be stepped as one batch: the one definition. The step
//! checks it ([`super::check_batchable`]), the worker groups claimed jobs by it, and the
//! queue's batch claim compares stored specs at its [`BatchKey::json_paths`], so the
//! queue never needs to know render.

use serde::Serialize;

use super::spec::{JobSpec, ModelsSpec, VideoStyleSpec};

/// The latent's shape (width and height), the loaded models, and the video being
/// styled (a video-styling job renders its frames one after another, never alongside
/// jobs of another kind). Each field is the spec's field of the same name.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BatchKey {
    pub width: u32,
    pub height: u32,
    pub models: ModelsSpec,
    pub video_style: Option<VideoStyleSpec>,
}

impl BatchKey {
    pub fn of(spec: &JobSpec) -> BatchKey {
        BatchKey {
            width: spec.width,
            height: spec.height,
            models: spec.models.clone(),
            video_style: spec.video_style.clone(),
        }
    }

    /// The key's fields as JSON paths into a stored spec (`$.width`, ...), read off the
    /// key's own serialised form so that a field added to the key is compared by the
    /// claim too.
    pub fn json_paths() -> Vec<String> {
        let key = serde_json::to_value(BatchKey::of(&JobSpec::default()));
        key.ok()
            .as_ref()
            .and_then(serde_json::Value::as_object)
            .map(|fields| fields.keys().map(|f| format!("$.{f}")).collect())
            .unwrap_or_default()
    }

    pub fn styles_video(&self) -> bool {
        self.video_style.is_some()
    }

    /// Why a job with key `other` cannot join a batch keyed `self`, if it cannot.
    pub fn mismatch(&self, other: &BatchKey) -> Option<String> {
        if (self.width, self.height) != (other.width, other.height) {
            return Some(format!(
                "it renders {}x{} but the batch renders {}x{}; only jobs of one size can be batched",
                other.width, other.height, self.width, self.height
            ));
        }
        if self.models != other.models {
            return Some(format!(
                "it uses the models {:?} but the batch uses {:?}; only jobs of one model set can be batched",
                other.models, self.models
            ));
        }
        if self.video_style != other.video_style {
            return Some(
                "it styles another video than the batch (or none); video styling is batched only with the same video"
                    .into(),
            );
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_paths_name_the_spec_fields_the_key_is_made_of() {
        let mut paths = BatchKey::json_paths();
        paths.sort();
        assert_eq!(paths, ["$.height", "$.models", "$.video_style", "$.width"]);
        // Each path reads, from a stored spec, what the key holds.
        let mut spec = JobSpec {
            width: 48,
            height: 32,
            ..JobSpec::default()
        };
        spec.models.vqgan = "some-vqgan".into();
        let stored = serde_json::to_value(&spec).unwrap();
        let key = serde_json::to_value(BatchKey::of(&spec)).unwrap();
        for path in &paths {
            let field = path.trim_start_matches("$.");
            let in_spec = stored
                .get(field)
                .cloned()
                .unwrap_or(serde_json::Value::Null);
            assert_eq!(in_spec, key[field], "{path}");
        }
    }

    #[test]
    fn a_mismatch_says_what_differs() {
        let a = BatchKey::of(&JobSpec::default());
        assert_eq!(a.mismatch(&a.clone()), None);
        let wide = BatchKey {
            width: a.width * 2,
            ..a.clone()
        };
        let why = a.mismatch(&wide).unwrap();
        assert!(why.contains("one size"), "{why}");
        let mut models = a.clone();
        models.models.clip.push("RN50".into());
        assert!(a.mismatch(&models).unwrap().contains("model set"));
    }
}
