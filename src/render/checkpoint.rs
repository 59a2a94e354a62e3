//! Checkpoints: z, the optimiser state, the RNG state and the step, in one
//! safetensors file, so that a resumed job continues bit for bit where it stopped.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand_chacha::ChaCha20Rng;
use safetensors::tensor::{Dtype, TensorView};

use super::history::History;
use super::job::RenderError;
use super::optim::OptimizerState;
use super::spec::JobSpec;

/// Bumped when the layout changes; older files are refused with a clear error.
const FORMAT: &str = "vqclip-checkpoint-1";

/// One job's resumable state.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub step: u32,
    pub seed: u64,
    /// Identifies the render parameters; see [`spec_fingerprint`].
    pub spec_sha256: String,
    pub width: u32,
    pub height: u32,
    pub z: Tensor,
    pub z_orig: Tensor,
    pub optimizer: OptimizerState,
    pub rng: ChaCha20Rng,
    /// The number of the job's revision in force when it was written (0: none), so a
    /// resume starts under it even if the queue never heard where it took effect.
    pub revision: u32,
}

fn ckpt_err(path: &Path, reason: impl Into<String>) -> RenderError {
    RenderError::Checkpoint {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn f32_bytes(t: &Tensor) -> candle_core::Result<Vec<u8>> {
    let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect())
}

impl Checkpoint {
    /// Writes atomically (temp file, then rename) so a crash never leaves half a file.
    pub fn write(&self, path: &Path, history: &History) -> Result<(), RenderError> {
        let mut named: Vec<(String, Tensor)> = vec![
            ("z".into(), self.z.clone()),
            ("z_orig".into(), self.z_orig.clone()),
        ];
        for (i, b) in self.optimizer.buffers.iter().enumerate() {
            named.push((format!("optimizer.{i}"), b.clone()));
        }
        let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = named
            .iter()
            .map(|(n, t)| Ok((n.clone(), t.dims().to_vec(), f32_bytes(t)?)))
            .collect::<candle_core::Result<_>>()?;
        let views = bytes
            .iter()
            .map(|(n, shape, data)| {
                TensorView::new(Dtype::F32, shape.clone(), data)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| ckpt_err(path, e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let json = |v: &dyn erased::Ser| v.json().map_err(|e| ckpt_err(path, e));
        let mut meta = HashMap::new();
        meta.insert("format".to_owned(), FORMAT.to_owned());
        meta.insert("step".to_owned(), self.step.to_string());
        meta.insert("seed".to_owned(), self.seed.to_string());
        meta.insert("spec_sha256".to_owned(), self.spec_sha256.clone());
        meta.insert("width".to_owned(), self.width.to_string());
        meta.insert("height".to_owned(), self.height.to_string());
        meta.insert("revision".to_owned(), self.revision.to_string());
        meta.insert("optimizer_step".to_owned(), self.optimizer.step.to_string());
        meta.insert(
            "optimizer_buffers".to_owned(),
            self.optimizer.buffers.len().to_string(),
        );
        meta.insert("rng".to_owned(), json(&self.rng)?);
        meta.insert("history".to_owned(), json(history)?);
        let data =
            safetensors::serialize(views, Some(meta)).map_err(|e| ckpt_err(path, e.to_string()))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, data).map_err(|e| RenderError::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| RenderError::io(path, e))
    }

    pub fn read(path: &Path, device: &Device) -> Result<Self, RenderError> {
        let data = std::fs::read(path).map_err(|e| RenderError::io(path, e))?;
        let (meta, st) = parse(path, &data)?;
        let get = |k: &str| {
            meta.get(k)
                .ok_or_else(|| ckpt_err(path, format!("missing metadata {k:?}")))
        };
        let num = |k: &str| -> Result<u64, RenderError> {
            get(k)?
                .parse()
                .map_err(|_| ckpt_err(path, format!("metadata {k:?} is not a number")))
        };
        let tensor = |name: &str| -> Result<Tensor, RenderError> {
            let view = st
                .tensor(name)
                .map_err(|e| ckpt_err(path, format!("{name}: {e}")))?;
            if view.dtype() != Dtype::F32 {
                return Err(ckpt_err(path, format!("{name} is not f32")));
            }
            let v: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            Ok(Tensor::from_vec(v, view.shape(), device)?)
        };
        let buffers = (0..num("optimizer_buffers")?)
            .map(|i| tensor(&format!("optimizer.{i}")))
            .collect::<Result<Vec<_>, _>>()?;
        let rng: ChaCha20Rng =
            serde_json::from_str(get("rng")?).map_err(|e| ckpt_err(path, format!("rng: {e}")))?;
        Ok(Self {
            step: num("step")? as u32,
            seed: num("seed")?,
            spec_sha256: get("spec_sha256")?.clone(),
            width: num("width")? as u32,
            height: num("height")? as u32,
            // Absent in files written before steering: the job as submitted.
            revision: if meta.contains_key("revision") {
                num("revision")? as u32
            } else {
                0
            },
            z: tensor("z")?,
            z_orig: tensor("z_orig")?,
            optimizer: OptimizerState {
                step: num("optimizer_step")?,
                buffers,
            },
            rng,
        })
    }

    /// The loss and timing history recorded up to the checkpoint.
    pub fn read_history(path: &Path) -> Result<History, RenderError> {
        let data = std::fs::read(path).map_err(|e| RenderError::io(path, e))?;
        let (meta, _) = parse(path, &data)?;
        let text = meta
            .get("history")
            .ok_or_else(|| ckpt_err(path, "missing metadata \"history\""))?;
        serde_json::from_str(text).map_err(|e| ckpt_err(path, format!("history: {e}")))
    }

    /// Refuses a checkpoint written for another job: another seed, other render
    /// parameters than `spec` (the job's effective spec at the checkpoint's step), more
    /// steps than the job has, another size.
    pub fn check_matches(&self, spec: &JobSpec, seed: u64, path: &Path) -> Result<(), RenderError> {
        if self.seed != seed {
            return Err(ckpt_err(
                path,
                format!(
                    "written with seed {}, but this job's seed is {}",
                    self.seed, seed
                ),
            ));
        }
        if self.spec_sha256 != spec_fingerprint(spec) {
            return Err(ckpt_err(
                path,
                "was written for different render parameters (prompts, size, models, ...)",
            ));
        }
        if self.step > spec.steps {
            return Err(ckpt_err(
                path,
                format!(
                    "is at step {} but the job has only {} steps",
                    self.step, spec.steps
                ),
            ));
        }
        self.check_size(spec, path)
    }

    /// Refuses a state of another size than `spec` renders: a fork may change the
    /// prompts and settings, never the latent's shape.
    pub fn check_size(&self, spec: &JobSpec, path: &Path) -> Result<(), RenderError> {
        let (w, h) = (self.width, self.height);
        let (zw, zh) = (self.z.dim(3)?, self.z.dim(2)?);
        if zw == 0 || zh == 0 || w.abs_diff(spec.width) >= 16 || h.abs_diff(spec.height) >= 16 {
            return Err(ckpt_err(
                path,
                format!(
                    "is for {w}x{h}, but the job renders {}x{}",
                    spec.width, spec.height
                ),
            ));
        }
        Ok(())
    }
}

/// sha256 of the spec's render parameters: everything but the step count (a job may
/// be resumed with more steps) and the seed (checked on its own, since the resolved
/// seed may live outside the spec).
pub fn spec_fingerprint(spec: &JobSpec) -> String {
    use sha2::{Digest, Sha256};
    let mut render_part = spec.clone();
    render_part.steps = 0;
    render_part.seed = None;
    let mut json = serde_json::to_vec(&render_part).unwrap_or_default();
    // The spec used to carry the service's fields, hashed at these neutral values;
    // hashing them still keeps checkpoints written before the split resumable.
    if json.pop() == Some(b'}') {
        json.extend_from_slice(br#","priority":0,"keep":false,"webhook":null}"#);
    }
    hex::encode(Sha256::digest(json))
}

fn parse<'a>(
    path: &Path,
    data: &'a [u8],
) -> Result<(HashMap<String, String>, safetensors::SafeTensors<'a>), RenderError> {
    let st = safetensors::SafeTensors::deserialize(data)
        .map_err(|e| ckpt_err(path, format!("not a checkpoint file: {e}")))?;
    let (_, metadata) =
        safetensors::SafeTensors::read_metadata(data).map_err(|e| ckpt_err(path, e.to_string()))?;
    let meta = metadata.metadata().clone().unwrap_or_default();
    match meta.get("format") {
        Some(f) if f == FORMAT => Ok((meta, st)),
        Some(f) => Err(ckpt_err(
            path,
            format!("format {f:?}; this build reads {FORMAT:?}"),
        )),
        None => Err(ckpt_err(path, "not a vqclip checkpoint (no format tag)")),
    }
}

/// serde_json for the few types stored as metadata strings.
mod erased {
    pub trait Ser {
        fn json(&self) -> Result<String, String>;
    }
    impl<T: serde::Serialize> Ser for T {
        fn json(&self) -> Result<String, String> {
            serde_json::to_string(self).map_err(|e| e.to_string())
        }
    }
}
