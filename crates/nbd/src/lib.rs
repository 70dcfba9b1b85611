//! The NBD (Network Block Device) protocol, both sides, for Bulwark.
//!
//! * [`Client`]: a blocking client for reading QEMU's point-in-time exports from scanner
//!   threads. Fixed newstyle handshake, structured replies, `NBD_OPT_SET_META_CONTEXT`
//!   (`base:allocation`, `qemu:dirty-bitmap:NAME`), `NBD_OPT_GO`; READ into a caller's buffer
//!   (data and hole chunks), BLOCK_STATUS per context; a small pool of connections shared by
//!   threads. Every length the server sends is checked against the request, option replies and
//!   chunk counts are capped, so a broken or hostile server gives an [`Error`] naming the export,
//!   the offset and what was wrong, never a panic, unbounded memory or wrong bytes.
//!
//! The wire format follows the NBD protocol specification (`doc/proto.md` of the reference
//! implementation); meta contexts follow QEMU's `docs/interop/nbd.txt`.
//!
//! # Example
//!
//! ```no_run
//! use bulwark_nbd::{Address, Client, ClientOptions, BASE_ALLOCATION, STATE_HOLE};
//!
//! # fn main() -> Result<(), bulwark_nbd::Error> {
//! let client = Client::connect(
//!     Address::Unix("/run/bulwark/os.sock".into()),
//!     ClientOptions::new("os").meta_context(BASE_ALLOCATION),
//! )?;
//! let mut buf = vec![0u8; 65536];
//! for extent in client.map(BASE_ALLOCATION, 0, client.size())? {
//!     if extent.flags & STATE_HOLE == 0 {
//!         let n = extent.length.min(buf.len() as u64) as usize;
//!         client.read(extent.offset, &mut buf[..n])?;
//!     }
//! }
//! # Ok(())
//! # }
//! ```

mod client;
mod error;
#[allow(dead_code)] // The server half, which uses the rest, comes next.
mod proto;
#[cfg(test)]
mod testing;

pub use client::{
    Address, BASE_ALLOCATION, BlockStatus, Client, ClientOptions, ExportInfo, Extent, ReadStats,
    STATE_DIRTY, STATE_HOLE, STATE_ZERO, dirty_bitmap_context,
};
pub use error::{Error, Result};
