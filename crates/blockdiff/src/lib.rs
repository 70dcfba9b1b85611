//! bulwark-blockdiff: the block-diff engine of Bulwark.
//!
//! A disk image is cut into fixed-size blocks (a power of two, 64 KiB–16 MiB, default 1 MiB).
//! For each block the [`scan`] engine decides, in parallel and with bounded memory:
//!
//! * **hole** — SEEK_DATA says the block holds no data: it is not even read (a run of holes is
//!   one event);
//! * **zero** — the block reads as all zeros: nothing is stored;
//! * **unchanged** — its XXH3-128 equals the one in the previous [`BlockMap`] of the same disk:
//!   the old entry is reused, no cryptographic hash is computed, nothing is stored;
//! * **changed** — its BLAKE3 content address is computed and the data handed on for storage;
//! * **carried** — with change tracking ([`scan_tracked`]), runs of blocks known unchanged are
//!   not read: one event per run, whose entries [`BlockMapBuilder::carry`] copies from the
//!   previous map in bulk. An incremental costs what changed, not what the disk holds.
//!
//! The crate does no network I/O: storing blocks is the vault's job.
//!
//! ```
//! use std::sync::Arc;
//! use bulwark_blockdiff::{scan, BlockEvent, BlockMapBuilder, BlockSource, Disk, ScanOptions};
//! use futures::StreamExt;
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("disk.img");
//! std::fs::write(&path, vec![42u8; 3 << 20])?;           // a 3 MiB "disk"
//!
//! let disk: Arc<dyn BlockSource> = Arc::new(Disk::open(&path)?); // or any other source
//! let options = ScanOptions::default();
//! let mut map = BlockMapBuilder::new(options.block_size, disk.size(), None);
//! let mut events = std::pin::pin!(scan(disk.clone(), None, &options));
//! while let Some(event) = events.next().await {
//!     let event = event?;
//!     if let BlockEvent::Changed { address, data, .. } = &event {
//!         // A real backup stores `data` under `address` here.
//!         assert_eq!(data.len(), 1 << 20);
//!         let _ = address;
//!     }
//!     map.push_event(&event)?;
//! }
//! let map = map.finish()?;
//! assert_eq!(bulwark_blockdiff::BlockMap::decode(&map.encode())?, map);
//!
//! // Nothing changed since: the next scan against `map` reports no changed block.
//! let previous = Some(Arc::new(map));
//! let mut again = std::pin::pin!(scan(disk.clone(), previous, &options));
//! while let Some(event) = again.next().await {
//!     assert!(!matches!(event?, BlockEvent::Changed { .. }));
//! }
//! # Ok(()) }
//! ```

mod blockmap;
pub mod buffers;
mod scan;
mod source;

use std::path::PathBuf;

pub use blockmap::{
    Address, BlockMap, BlockMapBuilder, BlockSize, DEFAULT_BLOCK_SIZE, Entry, FORMAT_VERSION,
    MAX_BLOCK_SIZE, MIN_BLOCK_SIZE,
};
pub use scan::{
    BlockEvent, Disk, ScanOptions, content_address, default_parallelism, is_zero, scan,
    scan_tracked, union_of,
};
pub use source::{BlockSource, Tracking};

/// Errors of the block-diff engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A block size that is not a power of two from 64 KiB to 16 MiB.
    #[error("invalid block size {bytes}: must be a power of two from 64 KiB to 16 MiB")]
    InvalidBlockSize {
        /// The size given.
        bytes: u64,
    },
    /// The number of entries does not match the disk size.
    #[error("block map has {found} entries, but its disk size needs {expected}")]
    EntryCount {
        /// Entries the disk size needs.
        expected: u64,
        /// Entries present.
        found: u64,
    },
    /// The block map is shorter or longer than its header says.
    #[error(
        "block map is truncated or has trailing bytes: expected {expected} bytes, found {found}"
    )]
    Truncated {
        /// Bytes expected.
        expected: u64,
        /// Bytes found.
        found: u64,
    },
    /// Not a block map at all.
    #[error("not a block map (bad magic)")]
    BadMagic,
    /// A format version this build does not know.
    #[error(
        "block map format version {found} is not supported (this build reads version {supported})"
    )]
    UnsupportedVersion {
        /// The version found.
        found: u16,
        /// The version supported.
        supported: u16,
    },
    /// Reserved flags are set.
    #[error("block map has unknown flags {flags:#06x}")]
    UnknownFlags {
        /// The flags found.
        flags: u16,
    },
    /// The checksum does not match: the block map is corrupt.
    #[error("block map checksum mismatch: the block map is corrupt")]
    ChecksumMismatch,
    /// An entry with an unknown tag, or a zero entry with non-zero fields.
    #[error("block map entry {index} is malformed (tag {tag})")]
    BadEntry {
        /// Block index.
        index: u64,
        /// The tag found.
        tag: u8,
    },
    /// The path is not a regular file or block device.
    #[error("{path}: not a disk image (expected a regular file or a block device)")]
    NotADiskImage {
        /// The path.
        path: PathBuf,
    },
    /// Opening or inspecting a disk failed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Reading a block failed (for example, the file shrank while being read).
    #[error("{source_name}: reading block {index} at offset {offset}: {source}")]
    Read {
        /// What was read ([`BlockSource::describe`]: a path, an NBD URI).
        source_name: String,
        /// Block index.
        index: u64,
        /// Byte offset.
        offset: u64,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Blocks added to a [`BlockMapBuilder`] out of order.
    #[error("block map: blocks added out of order (expected block {expected}, got {found})")]
    OutOfOrder {
        /// The next block the map needed.
        expected: u64,
        /// The block given.
        found: u64,
    },
    /// Blocks carried over from a previous map that does not have them (or has another block
    /// size).
    #[error(
        "block map: cannot carry over blocks {start}..{end}: the previous map does not have them"
    )]
    CarryOutside {
        /// First block of the run.
        start: u64,
        /// End of the run (exclusive).
        end: u64,
    },
    /// A worker thread panicked or was cancelled.
    #[error("scan worker failed: {0}")]
    Worker(String),
}
