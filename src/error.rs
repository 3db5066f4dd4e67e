//! The crate's error type. Every error that stems from user input (a config field, a flag, a file)
//! maps to exit code 2 and names the field and the rule it broke.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A field of a config or a flag breaks a rule.
    #[error("invalid `{field}`: {reason}")]
    Invalid { field: String, reason: String },
    /// A config file could not be parsed.
    #[error("cannot parse {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    /// A file that must exist could not be read.
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// An output could not be written.
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    /// A resource (corpus, driver library, GPU) is not available on this machine.
    #[error("{what} is not available: {reason}")]
    Unavailable { what: String, reason: String },
    /// A run diverged (NaN or inf); the run's outputs record where.
    #[error("diverged at step {step}: {reason}")]
    Diverged { step: usize, reason: String },
    /// Anything else: a bug or an internal failure.
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// Shorthand for [`Error::Invalid`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Invalid { field: field.into(), reason: reason.into() }
    }

    /// Exit code for the command line: 2 for bad input or missing resources, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Invalid { .. } | Error::Parse { .. } | Error::Read { .. } | Error::Unavailable { .. } => 2,
            Error::Write { .. } | Error::Diverged { .. } | Error::Internal(_) => 1,
        }
    }
}
