//! The models a render uses: one VQGAN and an ensemble of CLIPs, loaded once and
//! shared by every job that names them.

use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::models::catalogue;

// What the workers need of the model catalogue reaches them through render, the room
// they depend on: devices, the cache (one resolver of its directory) and model presence.
pub use crate::models::catalogue::{
    cache_root, ensure_models, parse_device, presence, DownloadProgress, DownloadWatcher,
    ModelCache, ModelKind, ModelsUnavailable, Presence,
};
/// The CPU ops' thread pool, sized once by the workers (`workers.cpu_threads`).
pub use crate::models::cpu::{set_threads as set_cpu_threads, threads as cpu_threads};
use crate::models::{Clip, Vqgan};

use super::job::RenderError;
use super::spec::ModelsSpec;

/// Which model a render used, for the outputs' metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelIdentity {
    /// The name or path as the spec gave it.
    pub name: String,
    /// The file the weights came from.
    pub path: PathBuf,
    /// sha256 of the weights file.
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelIdentities {
    pub vqgan: ModelIdentity,
    pub clip: Vec<ModelIdentity>,
}

/// A VQGAN and the CLIP ensemble whose losses are summed.
pub struct ModelSet {
    pub vqgan: Vqgan,
    pub clips: Vec<Clip>,
    pub identities: ModelIdentities,
}

impl ModelSet {
    /// Resolves each name through the catalogue (or takes it as a path) and loads it.
    pub fn load(
        spec: &ModelsSpec,
        cache: &ModelCache,
        device: &Device,
    ) -> Result<Self, RenderError> {
        let model_err = |e: &dyn std::fmt::Display| RenderError::Model(e.to_string());
        let vqgan_path = catalogue::resolve_vqgan(&spec.vqgan, cache).map_err(|e| model_err(&e))?;
        let vqgan = Vqgan::load(&vqgan_path, device).map_err(|e| model_err(&e))?;
        let vqgan_id = identify(&spec.vqgan, &vqgan_weights(&vqgan_path)?)?;
        let mut clips = Vec::with_capacity(spec.clip.len());
        let mut clip_ids = Vec::with_capacity(spec.clip.len());
        for name in &spec.clip {
            let path = catalogue::resolve_clip(name, cache).map_err(|e| model_err(&e))?;
            clips.push(Clip::load(&path, device).map_err(|e| model_err(&e))?);
            clip_ids.push(identify(name, &clip_weights(&path)?)?);
        }
        Ok(Self {
            vqgan,
            clips,
            identities: ModelIdentities {
                vqgan: vqgan_id,
                clip: clip_ids,
            },
        })
    }

    /// Wraps models loaded elsewhere (the bench, tests).
    pub fn from_loaded(vqgan: Vqgan, clips: Vec<Clip>, identities: ModelIdentities) -> Self {
        Self {
            vqgan,
            clips,
            identities,
        }
    }

    /// Loads a VQGAN and CLIPs from paths, identifying them by those paths.
    pub fn load_paths(
        vqgan: &Path,
        clips: &[PathBuf],
        device: &Device,
    ) -> Result<Self, RenderError> {
        let model_err = |e: &dyn std::fmt::Display| RenderError::Model(e.to_string());
        let vqgan_model = Vqgan::load(vqgan, device).map_err(|e| model_err(&e))?;
        let vqgan_id = identify(&vqgan.display().to_string(), &vqgan_weights(vqgan)?)?;
        let mut loaded = Vec::new();
        let mut ids = Vec::new();
        for path in clips {
            loaded.push(Clip::load(path, device).map_err(|e| model_err(&e))?);
            ids.push(identify(&path.display().to_string(), &clip_weights(path)?)?);
        }
        Ok(Self::from_loaded(
            vqgan_model,
            loaded,
            ModelIdentities {
                vqgan: vqgan_id,
                clip: ids,
            },
        ))
    }

    pub fn device(&self) -> &Device {
        self.vqgan.codebook().device()
    }
}

fn vqgan_weights(path: &Path) -> Result<PathBuf, RenderError> {
    crate::models::vqgan::VqganFiles::locate(path)
        .map(|f| f.weights)
        .map_err(|e| RenderError::Model(e.to_string()))
}

fn clip_weights(path: &Path) -> Result<PathBuf, RenderError> {
    crate::models::clip::weights_file(path).map_err(|e| RenderError::Model(e.to_string()))
}

fn identify(name: &str, weights: &Path) -> Result<ModelIdentity, RenderError> {
    Ok(ModelIdentity {
        name: name.to_owned(),
        path: weights.to_owned(),
        sha256: sha256_file(weights)?,
    })
}

/// Streams a file through sha256; weights files run to gigabytes.
pub fn sha256_file(path: &Path) -> Result<String, RenderError> {
    let mut file = std::fs::File::open(path).map_err(|e| RenderError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| RenderError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}
