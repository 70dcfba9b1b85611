//! Disk sources: the point-in-time disks a backup reads, whatever provides them.
//!
//! A [`Snapshotter`] takes every disk of one VM at one instant; each disk it gives is a
//! [`DiskSource`]: a reader at offsets (with holes), optionally the ranges known unchanged since
//! the previous recovery point, a tracking record for the next backup, and a release step. The
//! transfer never knows which kind it reads (a reflink clone, a sparse copy, an NBD export of a
//! running QEMU's point in time, an offline qcow2 image).

use std::fmt::Debug;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use bulwark_blockdiff::{BlockSource, Tracking};

use crate::Error;

/// What the previous recovery point recorded of a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreviousDisk {
    /// The previous point's id.
    pub point: String,
    /// The BLAKE3 digest (hex) of that point's manifest of this disk.
    pub manifest_digest: String,
    /// The disk's size at that point.
    pub size: u64,
    /// The tracking record the source gave at that point, if any.
    pub tracking: Option<Tracking>,
}

/// What a source knows of the changes since a previous point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changes {
    /// Byte ranges known to hold the same data as at the previous point (sorted, disjoint).
    /// Blocks wholly inside them are not read.
    Unchanged(Vec<Range<u64>>),
    /// Not known: every block is read. The reason goes into the disk's report.
    Unknown {
        /// Why (no base, base of another point, disk resized, bitmap missing, ...).
        reason: String,
    },
}

/// How the job that read a source ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The recovery point was committed: the source's tracking state becomes the base of the
    /// next backup, and the snapshot is kept when `keep` says so.
    Committed {
        /// The committed point's id.
        point: String,
        /// The BLAKE3 digest (hex) of this disk's manifest in that point: what the next
        /// backup's [`PreviousDisk::manifest_digest`] will say.
        manifest_digest: String,
        /// Keep the point-in-time copy on the host (instant-restore tier), where the kind can.
        keep: bool,
    },
    /// The job failed or was cancelled: nothing was committed. The source rolls back so that
    /// the next backup still sees every change since the last committed point.
    Failed {
        /// Keep the point-in-time copy anyway, where the kind can (it is then the only copy of
        /// a point whose transfer failed: the instant-restore tier).
        keep: bool,
    },
}

/// What a release left behind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Released {
    /// The kept snapshot file, when one was kept.
    pub kept: Option<PathBuf>,
}

/// One point-in-time disk of a VM.
#[async_trait::async_trait]
pub trait DiskSource: Send + Sync + Debug {
    /// The disk's name (as in the vault).
    fn name(&self) -> &str;

    /// What kind of point-in-time copy it is (`reflink`, `copy`, `qemu-fleece`, ...), for the
    /// job's report.
    fn kind(&self) -> &str;

    /// What the disk is a copy of (the live image's path, a QEMU node), recorded in the point.
    fn origin(&self) -> String {
        self.reader().describe()
    }

    /// The file holding the point-in-time copy, when the kind has one that can be kept on the
    /// host for instant restore (see [`Outcome`]'s `keep`). Default: none.
    fn file(&self) -> Option<PathBuf> {
        None
    }

    /// The reader the transfer scans.
    fn reader(&self) -> Arc<dyn BlockSource>;

    /// The ranges known unchanged since `previous`, or why that is not known. A source must
    /// answer [`Changes::Unknown`] unless it can prove the ranges hold `previous`'s data.
    async fn changes_since(&self, previous: &PreviousDisk) -> Result<Changes, Error>;

    /// The record to store in the new point, for the next backup's [`DiskSource::changes_since`].
    fn tracking(&self) -> Option<Tracking>;

    /// Called once the transfer has read all it needs from [`DiskSource::reader`], before the
    /// point is committed. A source whose point in time may not have held for the whole read
    /// fails here, so nothing read from it is committed. It may also free what served the
    /// reads (the reader is not used again); [`DiskSource::release`] still follows. Default:
    /// nothing to check or free.
    async fn end_read(&self) -> Result<(), Error> {
        Ok(())
    }

    /// Ends the source's life after the job: see [`Outcome`]. Called exactly once; a source
    /// dropped without it cleans up as for [`Outcome::Failed`] without `keep`.
    async fn release(self: Box<Self>, outcome: Outcome) -> Result<Released, Error>;
}

/// Takes every disk of one VM at one instant.
#[async_trait::async_trait]
pub trait Snapshotter: Send + Sync + Debug {
    /// The slow part, done before any guest is frozen: find the disks, check them, create
    /// temporary images, connect. `point` is the id the recovery point will get (sources may
    /// name their files after it).
    async fn prepare(&self, vm: &str, point: &str) -> Result<Box<dyn PendingSnapshot>, Error>;
}

/// A prepared snapshot: [`PendingSnapshot::take`] is the only call made while the guest is
/// frozen, so it must be fast (a reflink per disk, one QMP transaction). Dropping it without
/// taking cleans up what `prepare` made.
#[async_trait::async_trait]
pub trait PendingSnapshot: Send + Debug {
    /// Takes all disks at one instant.
    async fn take(self: Box<Self>) -> Result<Vec<Box<dyn DiskSource>>, Error>;
}
