//! The library's error type: every failure a user can cause (bad config, corrupt
//! checkpoint, missing corpus, ...) maps to a variant with a message that names the
//! offending field, tensor or file.

use std::path::PathBuf;

/// Result alias used across the library.
pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A config field failed to parse or validate; `field` is its JSON path.
    #[error("config field `{field}`: {message}")]
    Config { field: String, message: String },

    /// A checkpoint or weight file is malformed, truncated or does not match the config.
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },

    /// A corpus directory or source could not be read or obtained.
    #[error("corpus: {0}")]
    Corpus(String),

    /// Tokenizer training, loading or encoding failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A chat template failed to compile or render.
    #[error("chat template: {0}")]
    Template(String),

    /// Invalid argument to a library call (sizes, options).
    #[error("{0}")]
    Invalid(String),

    /// A GGUF file is malformed; `offset` is the byte where the problem was found.
    #[error("GGUF file {path}: {message} (at byte {offset})")]
    Gguf {
        path: PathBuf,
        offset: u64,
        message: String,
    },

    /// A named model could not be obtained (package client, checksum, cache).
    #[error("model {name}: {message}")]
    Fetch { name: String, message: String },

    /// The cause is part of the message (not a `source`, which `{:#}` would print a
    /// second time).
    #[error("I/O error on {path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },

    #[error("JSON error in {path}: {message}")]
    Json { path: PathBuf, message: String },

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            cause: source,
        }
    }

    pub(crate) fn checkpoint(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.into(),
            message: message.into(),
        }
    }

    pub(crate) fn gguf(path: impl Into<PathBuf>, offset: u64, message: impl Into<String>) -> Self {
        Error::Gguf {
            path: path.into(),
            offset,
            message: message.into(),
        }
    }

    pub(crate) fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Config {
            field: field.into(),
            message: message.into(),
        }
    }
}
