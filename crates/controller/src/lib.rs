//! bulwark-controller: backup jobs, restore and verification, composed from the lower crates.
//!
//! A backup job has two phases:
//!
//! 1. **snapshot** ([`take_snapshots`]): a point-in-time copy of every disk of the VM, as fast
//!    as the provider allows (a reflink clone takes milliseconds). This is the only phase
//!    during which a guest needs to stay quiesced.
//! 2. **transfer** ([`transfer`]): every disk in parallel, each through the block-diff engine
//!    against its previous block map; only changed blocks are uploaded, then the manifests,
//!    then the recovery point.
//!
//! [`backup`] runs both for a crash-consistent point.
//!
//! ```
//! use std::sync::Arc;
//! use bulwark_controller::{backup, restore, BackupRequest, DiskSpec, NoProgress, RestoreRequest};
//! use bulwark_vault::{CreateOptions, Vault};
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let image = dir.path().join("disk.img");
//! std::fs::write(&image, vec![9u8; 5 << 20])?;
//!
//! let vault = Vault::create(dir.path().join("vault").to_str().ok_or("path")?, &CreateOptions::default()).await?;
//! let request = BackupRequest::new("web01", vec![DiskSpec::parse(image.to_str().ok_or("path")?)?]);
//! let report = backup(&vault, &request, Arc::new(NoProgress)).await?;
//! assert_eq!(report.disks[0].stats.changed_blocks, 5);
//!
//! let to = dir.path().join("restored.img");
//! restore(&vault, &RestoreRequest {
//!     vm: "web01".into(), point: "latest".into(), disk: "disk".into(),
//!     to: to.clone(), force: false, concurrency: 8,
//! }, Arc::new(NoProgress)).await?;
//! assert_eq!(std::fs::read(&to)?, std::fs::read(&image)?);
//! # Ok(()) }
//! ```

mod backup;
pub mod config;
pub mod daemon;
pub mod history;
pub mod quiesce;
mod restore;
mod retention;
mod tracking;

use std::path::PathBuf;

pub use backup::{
    BackupReport, BackupRequest, DiskReport, DiskSpec, SnapshotOptions, TakenSnapshots, backup,
    check_request, take_snapshots, transfer,
};
pub use quiesce::{
    AgentAddress, AgentTarget, QuiesceOptions, Quiesced, backup_with_agent, snapshot_with_agent,
};
pub use restore::{RestoreReport, RestoreRequest, restore};
pub mod tiers;
pub use retention::{KeptPoint, PRUNE_LEASE_WAIT, PruneReport, gc, prune, prune_with, undelete};

/// Errors of the controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A vault operation failed.
    #[error(transparent)]
    Vault(#[from] bulwark_vault::Error),
    /// Reading or diffing a disk failed.
    #[error("disk {disk}: {source}")]
    Scan {
        /// The disk.
        disk: String,
        /// The engine's error.
        #[source]
        source: bulwark_blockdiff::Error,
    },
    /// Taking a snapshot failed.
    #[error("disk {disk}: snapshot failed: {source}")]
    Snapshot {
        /// The disk.
        disk: String,
        /// The provider's error.
        #[source]
        source: bulwark_snapshot::Error,
    },
    /// A disk argument that cannot be used.
    #[error("disk {spec}: {why}")]
    InvalidDisk {
        /// The argument.
        spec: String,
        /// What is wrong.
        why: String,
    },
    /// A backup without disks.
    #[error("VM {vm}: no disks to back up")]
    NoDisks {
        /// The VM.
        vm: String,
    },
    /// The restore target cannot be used.
    #[error("restore target {path}: {why}")]
    RestoreTarget {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// An I/O error on a path.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A worker task failed.
    #[error("worker failed: {0}")]
    Worker(String),
    /// The guest agent refused or failed a step the job cannot do without.
    #[error("agent {agent}: {message}")]
    Agent {
        /// The agent's address.
        agent: String,
        /// What happened.
        message: String,
    },
    /// The consistency level reachable is below the minimum (nothing is committed), or the
    /// levels asked for are contradictory.
    #[error(transparent)]
    Consistency(#[from] bulwark_consistency::Error),
    /// The daemon's configuration file is not usable.
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
}

/// Receives progress of long work (one bar per disk in the CLI). All methods default to
/// doing nothing.
pub trait Progress: Send + Sync {
    /// Work on `item` (a disk) starts; `total` bytes to go.
    fn start(&self, item: &str, total: u64) {
        let _ = (item, total);
    }
    /// `bytes` more of `item` are done.
    fn advance(&self, item: &str, bytes: u64) {
        let _ = (item, bytes);
    }
    /// `item` is done.
    fn finish(&self, item: &str) {
        let _ = item;
    }
}

/// A [`Progress`] that shows nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {}
