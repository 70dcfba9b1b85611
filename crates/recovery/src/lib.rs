//! Ways back from a recovery point without a full restore.
//!
//! * [`PointDisk`]: random-access reads of one disk of one point, straight from the vault.
//!   Every block is fetched on demand and verified against its content address; zero
//!   blocks cost nothing; a bounded LRU cache, read-ahead for sequential readers, parallel
//!   fetches for large reads, and counts of what was fetched ([`FetchStats`]).
//! * [`export`]: serves a point's disk read-only over NBD ([`NbdBackend`]: reads from a
//!   [`PointDisk`], zero blocks sent as holes and reported as holes in block status).
//! * [`partition`]: MBR and GPT tables, parsed as hostile input (every partition must lie
//!   inside the disk).
//! * [`files`]: `ls`, `cat` and `get` of files in an ext4 (or ext2/3) file system on a point's
//!   disk, read in user space with the read-only, memory-safe `ext4-view` parser. The guest's
//!   file system is untrusted: it is never mounted by the host kernel, damage gives errors,
//!   and `get` never writes outside its target directory.
//!
//! # Example
//!
//! Random access to a disk of two blocks, one of them zero, in an in-memory vault:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use bulwark_blockdiff::{BlockMap, BlockSize, Entry, MIN_BLOCK_SIZE};
//! use bulwark_recovery::{DiskOptions, PointDisk};
//! use bulwark_vault::{CreateOptions, Vault};
//!
//! let store = Arc::new(object_store::memory::InMemory::new());
//! let vault = Vault::create_store(store, "memory:", &CreateOptions::default()).await?;
//! let bs = BlockSize::new(MIN_BLOCK_SIZE)?;
//! let block = vec![7u8; bs.bytes() as usize];
//! let address = vault.address_of(&block);
//! vault.put_block(address, block.into()).await?;
//! let entries = vec![Entry::Data { change: 0, address }, Entry::Zero];
//! let map = BlockMap::new(bs, 2 * bs.bytes(), entries)?;
//!
//! let disk = PointDisk::from_map(vault, map, "demo".into(), DiskOptions::default());
//! let bytes = disk.read(bs.bytes() - 2, 4).await?; // spans the data and the zero block
//! assert_eq!(bytes, [7, 7, 0, 0]);
//! assert_eq!(disk.stats().blocks_fetched, 1);
//! assert!(disk.read(2 * bs.bytes() - 1, 2).await.is_err()); // past the end
//! # Ok(()) }
//! ```

mod disk;
mod export;
pub mod files;
mod inode;
mod lru;
pub mod partition;

pub use disk::{BlockingReader, DiskOptions, Extent, FetchStats, PointDisk};
pub use export::{ExportOptions, NbdBackend, export};
pub use inode::Times;

/// Errors of recovery reads.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The vault failed, or a block or manifest in it did not verify.
    #[error(transparent)]
    Vault(#[from] bulwark_vault::Error),
    /// A read reaches past the end of a disk (or of the partition read).
    #[error("{disk}: read of {len} bytes at offset {offset} reaches past the end ({size} bytes)")]
    ReadPastEnd {
        /// The disk (`vm/point/disk`).
        disk: String,
        /// Offset of the read.
        offset: u64,
        /// Length of the read.
        len: u64,
        /// Size of the disk or partition.
        size: u64,
    },
    /// A partition table that is damaged, or describes partitions outside the disk.
    #[error("{disk}: partition table refused: {why}")]
    PartitionTable {
        /// The disk.
        disk: String,
        /// What is wrong.
        why: String,
    },
    /// No partition of that number.
    #[error("{disk}: no partition {number} (partitions: {available})")]
    NoSuchPartition {
        /// The disk.
        disk: String,
        /// The number asked for.
        number: u32,
        /// The numbers there are.
        available: String,
    },
    /// The guest's file system cannot be read there: damaged, unsupported, or no such path.
    #[error("{disk}: {path}: {why}")]
    Fs {
        /// The disk (and partition).
        disk: String,
        /// The path in the guest file system (empty for the file system as a whole).
        path: String,
        /// What went wrong.
        why: String,
    },
    /// A path that would escape the target directory, or is not a plain absolute path.
    #[error("refused path {path:?}: {why}")]
    UnsafePath {
        /// The path.
        path: String,
        /// Why.
        why: String,
    },
    /// A local file could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The local path.
        path: std::path::PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A limit on the work a request may cause (entries, depth).
    #[error("{what}: more than {limit}")]
    Limit {
        /// What grew too large.
        what: String,
        /// The limit.
        limit: u64,
    },
    /// The NBD server could not start (address in use, bad options).
    #[error("nbd export of {disk}: {source}")]
    Nbd {
        /// The disk (`vm/point/disk`).
        disk: String,
        /// The server's error (boxed: it is large).
        source: Box<bulwark_nbd::Error>,
    },
    /// A worker task failed.
    #[error("worker task failed: {0}")]
    Worker(String),
}
