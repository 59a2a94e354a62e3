//! What the models tests share: where the fixtures live (tiny models, reference outputs,
//! images), running the built `vqclip` binary offline, the shape recorder and a local
//! stand-in for the Hugging Face hub.

pub mod hub;
pub mod shapes;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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
