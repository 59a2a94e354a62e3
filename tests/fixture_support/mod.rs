//! Where the test fixtures live (tiny models, reference outputs, images).

use std::path::{Path, PathBuf};

/// A file or folder in tests/fixtures.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}
