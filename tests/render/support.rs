//! What the render tests share: where the fixtures live, and running the built `vqclip`
//! binary as a user would.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use candle_core::Device;
use vqclip::render::ModelSet;

/// A file or folder in tests/fixtures.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Runs vqclip with an empty, offline model cache, so nothing can be downloaded.
pub fn offline_vqclip(args: &[&str]) -> Output {
    let cache = tempfile::tempdir().unwrap();
    Command::new(env!("CARGO_BIN_EXE_vqclip"))
        .args(args)
        .env("VQCLIP_MODEL_CACHE", cache.path())
        .env("VQCLIP_OFFLINE", "1")
        .output()
        .unwrap()
}

/// The tiny VQGAN and CLIP on the CPU, loaded once per test binary.
pub fn tiny_models() -> &'static ModelSet {
    static MODELS: OnceLock<ModelSet> = OnceLock::new();
    MODELS.get_or_init(|| {
        ModelSet::load_paths(
            &fixture("vqgan-tiny"),
            &[fixture("clip-tiny")],
            &Device::Cpu,
        )
        .expect("tiny fixtures load")
    })
}
