//! Running the built `vqclip` binary as a user would. Shared by the CLI tests.
#![allow(dead_code)]

#[path = "../fixture_support/mod.rs"]
mod fixture_support;
#[allow(unused_imports)]
pub use fixture_support::fixture;

use std::process::{Command, Output};

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
