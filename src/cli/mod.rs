//! Command-line edges. `anyhow` lives here and in `main`, nowhere else.

pub mod bench;
pub mod keys;
pub mod models;
pub mod render;
pub mod serve;
pub mod tools;

/// Logs go to stderr so that `--json` output on stdout stays machine-readable.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VQCLIP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
