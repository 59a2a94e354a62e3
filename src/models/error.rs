//! The one error type of `models`: every failure names the file and says how to fix it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A required file is absent; `hint` says what was looked for and where it should go.
    #[error("{path}: not found. {hint}")]
    Missing { path: PathBuf, hint: String },

    /// A config file exists but does not describe a model we can build.
    #[error("{path}: invalid model config: {detail}")]
    Config { path: PathBuf, detail: String },

    /// The weights file could not be read, or lacks a tensor the config calls for.
    #[error("{path}: cannot load weights: {detail}")]
    Weights { path: PathBuf, detail: String },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A caller passed a tensor of the wrong shape or kind.
    #[error("invalid input: {0}")]
    Input(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn config(path: impl Into<PathBuf>, detail: impl std::fmt::Display) -> Self {
        Self::Config {
            path: path.into(),
            detail: detail.to_string(),
        }
    }

    pub(crate) fn weights(path: impl Into<PathBuf>, detail: impl std::fmt::Display) -> Self {
        Self::Weights {
            path: path.into(),
            detail: detail.to_string(),
        }
    }
}
