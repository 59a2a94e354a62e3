//! Command-line edges. `anyhow` lives here and in `main`, nowhere else.

pub mod bench;
pub mod healthcheck;
pub mod keys;
pub mod models;
pub mod render;
pub mod serve;
pub mod tools;

/// Logs go to stderr so that `--json` output on stdout stays machine-readable.
/// Colour codes only when stderr is a terminal: piped into a file or a log
/// collector they are noise.
pub fn init_tracing(format: vqclip::config::LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("VQCLIP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        vqclip::config::LogFormat::Text => builder.try_init(),
        vqclip::config::LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .try_init(),
    };
}

/// `logging.format` from the configuration the command will load. Logging starts
/// before the subcommand reads its configuration, so the file is found here from
/// `--config` or `VQCLIP_CONFIG`; a configuration that does not load logs as text
/// and the subcommand reports why.
pub fn log_format() -> vqclip::config::LogFormat {
    let mut args = std::env::args_os().skip(1);
    let mut file = None;
    while let Some(arg) = args.next() {
        let arg = arg.to_string_lossy().into_owned();
        if arg == "--config" {
            file = args.next().map(std::path::PathBuf::from);
        } else if let Some(path) = arg.strip_prefix("--config=") {
            file = Some(path.into());
        }
    }
    let file = file.or_else(|| std::env::var_os("VQCLIP_CONFIG").map(Into::into));
    vqclip::config::Config::load(file.as_deref(), &Default::default())
        .map(|c| c.logging.format)
        .unwrap_or(vqclip::config::LogFormat::Text)
}
