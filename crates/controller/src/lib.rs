//! bulwark-controller: backup jobs and restores, composed from the lower crates.
//!
//! One entry point each: [`run_backup`] runs a [`BackupRequest`] (quiesce through the guest
//! agent when asked → snapshot every disk at one instant through a
//! [`bulwark_snapshot::Snapshotter`] → thaw → transfer every disk in parallel, only the changed
//! blocks → commit the recovery point → release the snapshots, kept for instant restore when
//! asked); [`run_restore`] runs a [`RestoreRequest`] (from the vault, or from a kept snapshot
//! verified against the vault). The CLI, the daemon and every other front end call only these.
//!
//! ```
//! use std::sync::Arc;
//! use bulwark_controller::{run_backup, run_restore, BackupRequest, RestoreRequest};
//! use bulwark_snapshot::{ImageDisk, ImageSnapshotter};
//! use bulwark_vault::{CreateOptions, Vault};
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let image = dir.path().join("disk.img");
//! std::fs::write(&image, vec![9u8; 5 << 20])?;
//!
//! let vault = Vault::create(dir.path().join("vault").to_str().ok_or("path")?, &CreateOptions::default()).await?;
//! let disks = ImageSnapshotter::new(vec![ImageDisk::parse(image.to_str().ok_or("path")?)?])?;
//! let report = run_backup(BackupRequest::new("web01", Arc::new(disks)), &vault).await?;
//! assert_eq!(report.disks[0].stats.changed_blocks, 5);
//!
//! let to = dir.path().join("restored.img");
//! run_restore(RestoreRequest::new("web01", "latest", "disk", &to), &vault).await?;
//! assert_eq!(std::fs::read(&to)?, std::fs::read(&image)?);
//! # Ok(()) }
//! ```

mod demo;
mod inplace;
pub mod instant;
mod job;
mod quiesce;
mod report;
mod restore;
mod retention;
pub mod sources;
pub mod tiers;
mod transfer;
mod verify;

use std::path::PathBuf;

pub use demo::{DemoReport, DemoRequest, run_demo};
pub use inplace::{InPlaceReport, run_restore_in_place};
pub use job::{BackupReport, BackupRequest, DiskReport, KeepSnapshots, Quiesce, run_backup};
pub use quiesce::{AgentAddress, AgentTarget, DEFAULT_FREEZE_TIMEOUT, QuiesceOptions};
pub use restore::{RestoreFrom, RestoreReport, RestoreRequest, run_restore};
pub use retention::{KeptPoint, PRUNE_LEASE_WAIT, PruneReport, gc, prune, prune_with, undelete};
/// The cancellation handle of [`BackupRequest::cancel`] (tokio-util's).
pub use tokio_util::sync::CancellationToken;
pub use verify::{HealthUpdate, verify};

/// Errors of the controller.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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
    /// Taking the VM's snapshot failed.
    #[error("VM {vm}: snapshot failed: {source}")]
    Snapshot {
        /// The VM.
        vm: String,
        /// The snapshotter's error.
        #[source]
        source: bulwark_snapshot::Error,
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
    /// What to back up was given wrongly (disks, QMP socket, snapshot mode, image format).
    #[error("{why}")]
    Source {
        /// What is wrong, naming the disk or option.
        why: String,
    },
    /// A point would need (or needs) blocks the vault holds damaged or not at all: a
    /// backup refuses to commit it, a restore refuses to read it.
    #[error("{what}: needs block(s) known bad in the vault: {}", blocks.join("; "))]
    KnownBad {
        /// The point (`vm/point`, and the disk) concerned.
        what: String,
        /// Each block's key and what is wrong with it.
        blocks: Vec<String>,
    },
    /// A worker task failed.
    #[error("worker failed: {0}")]
    Worker(String),
    /// An agent address that is neither `unix:PATH` nor `tcp:HOST:PORT`.
    #[error("{address:?}: {why}")]
    InvalidAgentAddress {
        /// The address given.
        address: String,
        /// What is wrong.
        why: String,
    },
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
    /// QEMU (QMP, `qemu-img`) failed during an instant recovery.
    #[error(transparent)]
    Qemu(#[from] bulwark_qemu::Error),
    /// Serving a point's disk failed.
    #[error(transparent)]
    Recovery(#[from] bulwark_recovery::Error),
    /// The job was cancelled through [`BackupRequest::cancel`]: it stopped at a safe point
    /// (after the thaw, before the commit), released its snapshots as failed and committed
    /// nothing.
    #[error("VM {vm}: backup cancelled ({at})")]
    Cancelled {
        /// The VM.
        vm: String,
        /// Where it stopped.
        at: String,
    },
}

/// A phase of a backup job, as [`Observer::phase`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Phase {
    /// Quiesce, snapshot every disk, thaw.
    Snapshot,
    /// Transfer into the vault and commit.
    Transfer,
}

/// What happened to a [`Phase`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PhaseEvent {
    /// It started.
    Started,
    /// It ended well.
    Completed,
    /// It failed (the job fails).
    Failed,
}

/// Watches a job: progress of long work (one bar per disk in the CLI) and the phases of a
/// backup (the daemon's job history). All methods default to doing nothing.
pub trait Observer: Send + Sync + std::fmt::Debug {
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
    /// A backup phase started or ended.
    fn phase(&self, phase: Phase, event: PhaseEvent) {
        let _ = (phase, event);
    }
    /// A quiesced backup tried its guest agent: `None` when it answered, else why not.
    fn agent(&self, unreachable: Option<&str>) {
        let _ = unreachable;
    }
}

/// An [`Observer`] that shows nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoObserver;

impl Observer for NoObserver {}
