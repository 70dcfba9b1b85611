//! The error type of this crate.

use std::path::PathBuf;

use crate::Level;

/// Errors of this crate: planning and resolving a consistency level.
///
/// Every variant names what it is about (the levels, the script), so that the message alone is
/// enough to act on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The consistency level that could be reached is below the policy's minimum: the job fails.
    #[error("consistency level {reached} is below the policy's minimum {minimum}: {}", .reasons.join("; "))]
    BelowMinimum {
        /// The level that could be reached.
        reached: Level,
        /// The policy's minimum.
        minimum: Level,
        /// Why the wanted level could not be reached (fallback reasons, in order).
        reasons: Vec<String>,
    },

    /// The policy wants a level below its own minimum: a configuration error.
    #[error("the wanted consistency level {wanted} is below the policy's minimum {minimum}")]
    WantedBelowMinimum {
        /// The wanted level.
        wanted: Level,
        /// The policy's minimum.
        minimum: Level,
    },

    /// A pre-script failed and `continue_on_failure` is not set: the backup must not go on.
    #[error("{reason}; continue_on_failure is not set: the backup stops")]
    PreScriptFailed {
        /// The script.
        script: PathBuf,
        /// What happened, as text (the same as the fallback reason would say).
        reason: String,
    },
}

/// This crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
