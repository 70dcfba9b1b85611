//! A recovery point's disk served read-only over NBD.

use std::io;
use std::sync::Arc;

use bulwark_nbd::{Address, Backend, Piece, STATE_HOLE, STATE_ZERO, Server, ServerOptions};
use bulwark_vault::Vault;

use crate::{DiskOptions, Error, PointDisk};

/// Most extents one block-status answer carries.
const MAX_STATUS_EXTENTS: usize = 4096;

/// A [`PointDisk`] as an NBD [`Backend`]: data blocks are fetched (and verified) on demand,
/// zero blocks are sent as holes without touching the vault.
#[derive(Debug, Clone)]
pub struct NbdBackend {
    disk: PointDisk,
}

impl NbdBackend {
    /// Serves `disk`.
    pub fn new(disk: PointDisk) -> NbdBackend {
        NbdBackend { disk }
    }

    /// The disk served (for its [`PointDisk::stats`]).
    pub fn disk(&self) -> &PointDisk {
        &self.disk
    }
}

#[bulwark_nbd::async_trait]
impl Backend for NbdBackend {
    fn size(&self) -> u64 {
        self.disk.size()
    }

    async fn read(&self, offset: u64, len: u32) -> io::Result<Vec<Piece>> {
        let mut pieces = Vec::new();
        for e in self.disk.extents(offset, u64::from(len), usize::MAX) {
            // Each extent lies within the request, so its length fits in a u32.
            let elen = u32::try_from(e.len).map_err(io::Error::other)?;
            if e.zero {
                pieces.push(Piece::Hole(elen));
            } else {
                let bytes = self
                    .disk
                    .read(e.offset, elen as usize)
                    .await
                    .map_err(io::Error::other)?;
                pieces.push(Piece::Data(bytes.into()));
            }
        }
        Ok(pieces)
    }

    async fn block_status(&self, offset: u64, len: u32) -> io::Result<Vec<bulwark_nbd::Extent>> {
        Ok(self
            .disk
            .extents(offset, u64::from(len), MAX_STATUS_EXTENTS)
            .into_iter()
            .map(|e| bulwark_nbd::Extent {
                offset: e.offset,
                length: e.len,
                flags: if e.zero { STATE_HOLE | STATE_ZERO } else { 0 },
            })
            .collect())
    }
}

/// How [`export`] serves.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct ExportOptions {
    /// Cache, read-ahead and fetch concurrency of the disk reader.
    pub disk: DiskOptions,
    /// Most clients connected at once (0: the server's default).
    pub max_connections: usize,
}

/// Opens disk `disk` of point `point` (`latest` or an id) of `vm` and binds a read-only NBD
/// server for it on `address` (export name: the disk's name). Nothing is served until the
/// caller runs [`Server::run`]; stop it with [`Server::shutdown_handle`] (the Unix socket is
/// removed when `run` returns).
pub async fn export(
    vault: &Vault,
    vm: &str,
    point: &str,
    disk: &str,
    address: &Address,
    options: ExportOptions,
) -> Result<(Server, NbdBackend), Error> {
    let point_disk = PointDisk::open(vault, vm, point, disk, options.disk).await?;
    let label = point_disk.label().to_string();
    let backend = NbdBackend::new(point_disk);
    let mut server_options = ServerOptions::new(disk);
    server_options.description = Some(format!("bulwark {label} (read-only)"));
    if options.max_connections > 0 {
        server_options.max_connections = options.max_connections;
    }
    let server = Server::bind(address, Arc::new(backend.clone()), server_options)
        .await
        .map_err(|source| Error::Nbd {
            disk: label,
            source: Box::new(source),
        })?;
    Ok((server, backend))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use bulwark_blockdiff::{BlockMap, BlockSize, Entry, MIN_BLOCK_SIZE};
    use bulwark_vault::CreateOptions;

    #[tokio::test]
    async fn zero_blocks_are_holes_and_data_is_the_blocks() {
        let store = Arc::new(object_store::memory::InMemory::new());
        let vault = Vault::create_store(store, "memory:", &CreateOptions::default())
            .await
            .unwrap();
        let bs = BlockSize::new(MIN_BLOCK_SIZE).unwrap();
        let n = bs.bytes();
        let block: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
        let address = vault.address_of(&block);
        vault
            .put_block(address, block.clone().into())
            .await
            .unwrap();
        let entries = vec![Entry::Zero, Entry::Data { change: 0, address }, Entry::Zero];
        let map = BlockMap::new(bs, 3 * n, entries).unwrap();
        let b = NbdBackend::new(PointDisk::from_map(
            vault,
            map,
            "t".into(),
            DiskOptions::default(),
        ));
        assert_eq!(b.size(), 3 * n);
        let pieces = b.read(n - 4, (n + 8) as u32).await.unwrap();
        assert_eq!(
            pieces,
            vec![
                Piece::Hole(4),
                Piece::Data(block.clone().into()),
                Piece::Hole(4)
            ]
        );
        let st = b.block_status(0, (3 * n) as u32).await.unwrap();
        let flags: Vec<(u64, u64, u32)> =
            st.iter().map(|e| (e.offset, e.length, e.flags)).collect();
        assert_eq!(
            flags,
            vec![
                (0, n, STATE_HOLE | STATE_ZERO),
                (n, n, 0),
                (2 * n, n, STATE_HOLE | STATE_ZERO)
            ]
        );
    }
}
