//! What the scanner reads: any point-in-time disk that can be read at offsets.

use std::sync::Arc;

use bytes::Bytes;

use crate::buffers::Pool;

/// A readable disk, as the scanner needs it: a file or block device ([`crate::Disk`]), an NBD
/// export of a running VM's point in time, or anything else that can be read at offsets.
///
/// Calls are blocking: the scanner makes them on tokio's blocking pool, several at once (hence
/// `Sync`). Implementations keep their own memory bounded whatever they are asked.
pub trait BlockSource: Send + Sync + std::fmt::Debug {
    /// The guest-visible size in bytes.
    fn size(&self) -> u64;

    /// Exactly `len` bytes at `offset` (`offset + len <= size()`), or an error: never fewer
    /// bytes, never other bytes. An implementation may take an aligned buffer from `pool`.
    fn read(&self, offset: u64, len: usize, pool: &Arc<Pool>) -> std::io::Result<Bytes>;

    /// The first offset at or after `offset` that may hold data; `size()` when none does. The
    /// default says `offset` itself (read everything): correctness never depends on holes being
    /// reported, only speed does.
    fn next_data(&self, offset: u64) -> std::io::Result<u64> {
        Ok(offset)
    }

    /// Where it reads from, for error messages (a path, an NBD URI).
    fn describe(&self) -> String;
}
