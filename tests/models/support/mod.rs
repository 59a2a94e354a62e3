//! What the models tests share: where the fixtures live (tiny models, reference outputs,
//! images), running the built `vqclip` binary offline, the shape recorder and a local
//! stand-in for the Hugging Face hub.

pub mod hub;
pub mod shapes;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Tensor};

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

/// Asserts the command succeeded and returns its stdout.
pub fn succeeded(out: &Output) -> String {
    assert!(
        out.status.success(),
        "vqclip failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// f32 parity bound: max |ours - reference| relative to max |reference|.
pub const TOLERANCE: f32 = 1e-4;

/// Max |ours - reference| relative to max |reference|, in f32.
pub fn relative_error(ours: &Tensor, reference: &Tensor) -> f32 {
    assert_eq!(ours.dims(), reference.dims(), "shape mismatch");
    let ours = ours.to_dtype(DType::F32).unwrap();
    let reference = reference.to_dtype(DType::F32).unwrap();
    let diff = (ours - &reference)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    let scale = reference.abs().unwrap().max_all().unwrap();
    diff.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap().max(1e-12)
}

/// Fails with `what` when `ours` is not within [`TOLERANCE`] of `reference`.
pub fn assert_close(what: &str, ours: &Tensor, reference: &Tensor) {
    let err = relative_error(ours, reference);
    assert!(
        err <= TOLERANCE,
        "{what}: relative error {err:e} > {TOLERANCE:e}"
    );
}
