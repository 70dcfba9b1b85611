//! The NBD (Network Block Device) protocol, both sides, for Bulwark.
//!
//! * [`Client`]: a blocking client for reading QEMU's point-in-time exports from scanner
//!   threads. Fixed newstyle handshake, structured replies, `NBD_OPT_SET_META_CONTEXT`
//!   (`base:allocation`, `qemu:dirty-bitmap:NAME`), `NBD_OPT_GO`; READ into a caller's buffer
//!   (data and hole chunks), BLOCK_STATUS per context; a small pool of connections shared by
//!   threads. Every length the server sends is checked against the request, option replies and
//!   chunk counts are capped, so a broken or hostile server gives an [`Error`] naming the export,
//!   the offset and what was wrong, never a panic, unbounded memory or wrong bytes.
//! * [`Server`]: a read-only async (tokio) server for exporting recovery points. Data comes
//!   from a [`Backend`]; holes are sent as OFFSET_HOLE chunks and reported by BLOCK_STATUS
//!   (`base:allocation`). Writes are refused (EPERM), reads past the end get EINVAL, garbage
//!   ends only the connection that sent it; connections, handshake time, request length and
//!   buffered read bytes are capped; a [`ShutdownHandle`] stops it cleanly.
//!
//! The wire format follows the NBD protocol specification (`doc/proto.md` of the reference
//! implementation); meta contexts follow QEMU's `docs/interop/nbd.txt`.
//!
//! # Example
//!
//! Serve 1 MiB (data in the first 4 KiB, a hole after) on a Unix socket, and read it back
//! with the client:
//!
//! ```
//! use std::sync::Arc;
//! use bulwark_nbd::{Address, Backend, Client, ClientOptions, Extent, Piece, Server,
//!                   ServerOptions, BASE_ALLOCATION, STATE_HOLE, STATE_ZERO};
//!
//! #[derive(Debug)]
//! struct Disk;
//!
//! #[bulwark_nbd::async_trait]
//! impl Backend for Disk {
//!     fn size(&self) -> u64 { 1 << 20 }
//!     async fn read(&self, offset: u64, len: u32) -> std::io::Result<Vec<Piece>> {
//!         // Bytes below 4096 are 0xAB, the rest is a hole.
//!         let (start, end) = (offset, offset + u64::from(len));
//!         let data = end.min(4096).saturating_sub(start);
//!         let mut pieces = Vec::new();
//!         if data > 0 { pieces.push(Piece::Data(vec![0xAB; data as usize].into())); }
//!         if (data as u32) < len { pieces.push(Piece::Hole(len - data as u32)); }
//!         Ok(pieces)
//!     }
//!     async fn block_status(&self, offset: u64, len: u32) -> std::io::Result<Vec<Extent>> {
//!         let flags = if offset < 4096 { 0 } else { STATE_HOLE | STATE_ZERO };
//!         let end = if offset < 4096 { 4096 } else { offset + u64::from(len) };
//!         Ok(vec![Extent { offset, length: end - offset, flags }])
//!     }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let socket = Address::Unix(dir.path().join("disk.sock"));
//! let rt = tokio::runtime::Runtime::new()?;
//! let server = rt.block_on(Server::bind(&socket, Arc::new(Disk), ServerOptions::new("disk")))?;
//! let stop = server.shutdown_handle();
//! let running = rt.spawn(server.run());
//!
//! // The client is blocking: call it from ordinary (or tokio's blocking) threads.
//! let client = Client::connect(socket, ClientOptions::new("disk").meta_context(BASE_ALLOCATION))?;
//! let mut buf = vec![0u8; 8192];
//! let stats = client.read(0, &mut buf)?;
//! assert!(buf[..4096].iter().all(|&b| b == 0xAB) && buf[4096..].iter().all(|&b| b == 0));
//! assert_eq!((stats.data_bytes, stats.hole_bytes), (4096, 4096));
//! let map = client.map(BASE_ALLOCATION, 0, client.size())?;
//! assert_eq!(map.len(), 2);
//! assert_eq!(map[1].flags, STATE_HOLE | STATE_ZERO);
//!
//! drop(client);
//! stop.shutdown();
//! rt.block_on(running)??;
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod client;
mod error;
mod proto;
mod server;
#[cfg(test)]
mod testing;

/// Re-exported for implementing [`Backend`] (`#[bulwark_nbd::async_trait]`).
pub use async_trait::async_trait;
pub use client::{
    Address, BASE_ALLOCATION, BlockStatus, Client, ClientOptions, ExportInfo, Extent, ReadStats,
    STATE_DIRTY, STATE_HOLE, STATE_ZERO, dirty_bitmap_context,
};
pub use error::{Error, Result};
pub use server::{Backend, Piece, Server, ServerOptions, ShutdownHandle};
