//! Bulwark's QEMU side: the point in time of a running VM's disks through QMP.
//!
//! * [`Qmp`]: a QMP session on a Unix socket (the `qapi` crate's typed commands).
//! * [`discover`]: the VM's writable disks (`query-block`).
//! * [`Fleecing`]: fleecing images, one `transaction` over all disks (copy-before-write jobs
//!   and the dirty-bitmap handover), NBD exports of the point in time, release and roll-back.
//! * [`cleanup_leftovers`]: removes what a killed run left (everything is named `bulwark-`).
//! * [`judge`], [`BitmapRecord`]: bitmap chain safety, when an incremental may trust a bitmap.
//! * [`QemuSnapshotter`]: all of it behind `bulwark-snapshot`'s `Snapshotter` / `DiskSource`
//!   traits, each disk read over NBD ([`NbdReader`]) with change tracking from the bitmap.
//! * [`qga`]: a qemu-guest-agent client (fsfreeze, `guest-info`) and the out-of-process
//!   watchdog that enforces the freeze deadline qemu-ga does not have.
//! * [`OfflineSnapshotter`]: images with no VM running, under QEMU's image locks: a qcow2
//!   through `qemu-storage-daemon` (a read-only export), a raw image read directly in place
//!   while [`ImageLock`] holds QEMU's locks on it. A qcow2 image keeps a persistent dirty
//!   bitmap between backups, handed over as for a running VM, so its incrementals read only
//!   the dirty clusters ([`judge_bitmaps`] decides); a raw image has nowhere to keep one and is
//!   read in full ([`RAW_UNTRACKED`]).
//! * [`create_overlay`], [`stream`]: instant recovery: a qcow2 overlay backed by an NBD export
//!   of a recovery point, and the `block-stream` job that makes it standalone while the VM runs.
//!
//! ```no_run
//! # async fn f() -> Result<(), bulwark_qemu::Error> {
//! use std::{sync::Arc, time::Duration};
//! let qmp = Arc::new(bulwark_qemu::Qmp::connect("unix:/run/vm1.qmp", Duration::from_secs(10)).await?);
//! for disk in bulwark_qemu::discover(&qmp).await? {
//!     println!("{} {} {} bytes", disk.name, disk.format, disk.size);
//! }
//! let fleecing = bulwark_qemu::Fleecing::prepare(qmp, &bulwark_qemu::FleeceOptions::new("/run/bulwark")).await?;
//! let disks = fleecing.take().await?;
//! for d in disks {
//!     println!("{} is exported at {}", d.info().disk.name, d.uri());
//!     d.release(true).await?;
//! }
//! # Ok(()) }
//! ```

mod disks;
mod error;
mod fleece;
mod lock;
mod offline;
pub mod qga;
mod qmp;
mod source;
mod stream;
mod tied;
mod tracking;

pub use disks::{VmDisk, discover, select};
pub use error::Error;
pub use fleece::{
    BitmapInfo, FleeceDisk, FleeceOptions, Fleecing, Leftovers, PREFIX, TakenDisk, bitmaps,
    cleanup_leftovers,
};
pub use lock::ImageLock;
pub use offline::{OfflineOptions, OfflineSnapshotter, RAW_UNTRACKED};
pub use qmp::{MAX_LINE, QemuIdentity, Qmp};
pub use source::{MAX_UNCHANGED_RANGES, NbdReader, QemuDisk, QemuOptions, QemuSnapshotter};
pub use stream::{
    NBD_RECONNECT_DELAY_SECS, StreamOptions, StreamReport, backing_file, cancel_stream,
    create_overlay, find_disk, nbd_backing_name, stream,
};
pub use tracking::{
    BitmapRecord, KIND, Trust, UnchangedBuilder, judge, judge_bitmaps, unchanged_ranges,
};
