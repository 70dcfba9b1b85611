//! What the scanner reads: any point-in-time disk that can be read at offsets.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

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

/// A source's change-tracking record, stored with the disk in the recovery point and handed
/// back on the next backup (for example kind `qemu-dirty-bitmap` with the bitmap's name, the
/// point it started at, the disk size, and the identity of the QEMU process holding it).
///
/// It lives here, below both the vault (which stores it) and the snapshot crate (whose sources
/// write it); `bulwark_snapshot::Tracking` is the same type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tracking {
    /// Which tracker wrote it.
    pub kind: String,
    /// The tracker's own fields.
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
}
