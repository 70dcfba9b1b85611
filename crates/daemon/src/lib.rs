//! bulwark-daemon: the scheduled daemon of `bulwark-controller serve`.
//!
//! * [`config`]: the serve configuration (TOML: vault, state directory, VMs with their disks,
//!   agents and policies), checked whole before anything starts.
//! * [`history`]: the job history in SQLite (`<state_dir>/jobs.sqlite`): every job, its
//!   phases and its outcome; jobs left running by a killed daemon are marked failed at start.
//! * [`alerts`]: what the daemon tells its notifier (`[notify]`): failed jobs, warnings,
//!   consistency below the policy, overdue VMs.
//! * [`daemon`]: the scheduler: each VM at its policy's times (missed runs caught up within a
//!   window, one job per VM at a time, a global concurrency limit), the retention and garbage
//!   collection of the vault between jobs, and the expiry of kept snapshots.
//!
//! Every job is one [`bulwark_controller::run_backup`] call, like a backup from the CLI; the
//! controller library knows nothing of the daemon.
//!
//! ```
//! use bulwark_daemon::history::History;
//! # fn main() -> Result<(), bulwark_daemon::Error> {
//! let dir = tempfile::tempdir().map_err(|e| bulwark_daemon::Error::Io { path: "tmp".into(), source: e })?;
//! let (history, recovered) = History::open(dir.path(), jiff::Timestamp::now())?;
//! assert_eq!(recovered, 0);
//! assert!(history.jobs(None, 10)?.is_empty());
//! # Ok(()) }
//! ```

pub mod alerts;
pub mod config;
pub mod control;
pub mod daemon;
pub mod history;
mod serve;

pub use serve::{Handles, Plan, ServeOptions, Server};

use std::path::PathBuf;

/// Errors of the daemon.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A job-library error (vault, snapshot, agent, ...).
    #[error(transparent)]
    Controller(#[from] bulwark_controller::Error),
    /// The configuration file is not usable.
    #[error("{at}: {message}")]
    Config {
        /// `file:line` (or the file).
        at: String,
        /// What is wrong.
        message: String,
    },
    /// The job history database failed.
    #[error("job history {path}: {source}")]
    History {
        /// The database file.
        path: PathBuf,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// Another daemon holds the state directory.
    #[error("{path}: another bulwark-controller daemon (pid {pid}) uses this state directory")]
    StateDirLocked {
        /// The lock file.
        path: PathBuf,
        /// The pid written in it, as text.
        pid: String,
    },
    /// The notifier could not start.
    #[error(transparent)]
    Notify(#[from] bulwark_notify::Error),
    /// An I/O error on a path.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}
