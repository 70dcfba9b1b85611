//! The error type of this crate.

use std::path::PathBuf;
use std::time::Duration;

/// Errors of this crate: freezing, thawing, the guardian, the state file, mounts and scripts.
///
/// Every variant names what it is about (a path, a mount, a script) and, for system calls, the
/// OS error, so that the message alone is enough to act on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file or directory could not be opened, read, written or inspected.
    #[error("{op} {}: {source}", .path.display())]
    Io {
        /// What was being done ("open", "read state file", ...).
        op: &'static str,
        /// The path concerned.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// FIFREEZE failed on a mount.
    #[error("cannot freeze {}: {errno}", .mount.display())]
    Freeze {
        /// The mount point.
        mount: PathBuf,
        /// The OS error.
        errno: rustix::io::Errno,
    },

    /// FIFREEZE returned EBUSY: the file system is already frozen (by someone else, or by an
    /// earlier agent that was killed). It is left as it is: it is not ours to thaw.
    #[error("cannot freeze {}: it is already frozen (EBUSY)", .mount.display())]
    AlreadyFrozen {
        /// The mount point.
        mount: PathBuf,
    },

    /// FITHAW failed on a mount (other than EINVAL, which means "was not frozen").
    #[error("cannot thaw {}: {errno}", .mount.display())]
    Thaw {
        /// The mount point.
        mount: PathBuf,
        /// The OS error.
        errno: rustix::io::Errno,
    },

    /// A mount point given to freeze is unsuitable (not absolute, `/`, not a directory, ...).
    #[error("refusing to freeze {}: {reason}", .mount.display())]
    UnsuitableMount {
        /// The mount point.
        mount: PathBuf,
        /// Why.
        reason: String,
    },

    /// `/proc/self/mountinfo` could not be parsed.
    #[error("cannot parse mountinfo line {line}: {reason}")]
    MountInfo {
        /// The 1-based line number.
        line: usize,
        /// Why.
        reason: String,
    },

    /// A config file or script has unsafe ownership or permissions: scripts are refused.
    #[error("refusing {}: {reason}", .path.display())]
    UnsafePermissions {
        /// The file or directory with the problem.
        path: PathBuf,
        /// What is wrong ("owned by uid 1000, expected 0", "writable by group", ...).
        reason: String,
    },

    /// A script could not be started.
    #[error("cannot start script {}: {source}", .script.display())]
    ScriptSpawn {
        /// The script.
        script: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// The persistent frozen-state file is malformed.
    #[error("frozen-state file {} is malformed: {reason}", .path.display())]
    StateFile {
        /// The state file.
        path: PathBuf,
        /// Why.
        reason: String,
    },

    /// The guardian process could not be started or did not arm itself in time.
    #[error("freeze guardian {}: {reason}", .program.display())]
    Guardian {
        /// The program that was run as the guardian.
        program: PathBuf,
        /// What went wrong.
        reason: String,
    },

    /// A freeze timeout is zero or larger than allowed.
    #[error("freeze timeout {given:?} is out of range (1 ms ..= {max:?})")]
    BadTimeout {
        /// The timeout given.
        given: Duration,
        /// The largest allowed.
        max: Duration,
    },
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

/// This crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
