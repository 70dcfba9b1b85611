//! [`PointDisk`]: random-access reads of one disk of one recovery point, straight from the vault.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bulwark_blockdiff::{BlockMap, Entry};
use bulwark_vault::{Error as VaultError, Vault};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::{OnceCell, Semaphore};

use crate::Error;
use crate::lru::BlockLru;

/// How a [`PointDisk`] caches and fetches.
#[derive(Debug, Clone)]
pub struct DiskOptions {
    /// Bytes of verified blocks kept in the LRU cache (at least one block is always kept).
    pub cache_bytes: u64,
    /// Blocks fetched ahead of a sequential reader (0: no read-ahead).
    pub readahead_blocks: u32,
    /// Blocks fetched at once for one large read.
    pub concurrency: usize,
}

impl Default for DiskOptions {
    fn default() -> Self {
        DiskOptions {
            cache_bytes: 64 << 20,
            readahead_blocks: 4,
            concurrency: 8,
        }
    }
}

/// What a [`PointDisk`] has read so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FetchStats {
    /// Blocks fetched from the vault and verified (read-ahead included).
    pub blocks_fetched: u64,
    /// Plain bytes of those blocks.
    pub bytes_fetched: u64,
    /// Of the blocks fetched, those fetched by read-ahead.
    pub readahead_blocks: u64,
    /// Block reads answered from the cache.
    pub cache_hits: u64,
    /// Block reads of zero blocks, answered without any fetch.
    pub zero_blocks: u64,
}

/// A contiguous run of a disk that is either all data or all zero (a hole in the point).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Start, in bytes.
    pub offset: u64,
    /// Length, in bytes.
    pub len: u64,
    /// True when the run is zero: reads of it fetch nothing.
    pub zero: bool,
}

/// One disk of one recovery point, readable at any offset without restoring it.
///
/// Each block is fetched from the vault on first use and verified against its content
/// address; zero blocks are served without any fetch. Verified blocks stay in a bounded LRU
/// cache; concurrent reads of one block share one fetch; a read spanning several blocks
/// fetches them in parallel; a sequential reader gets the next blocks fetched ahead.
/// Cloning is cheap and shares the cache and the statistics.
#[derive(Debug, Clone)]
pub struct PointDisk {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    vault: Vault,
    map: BlockMap,
    label: String,
    options: DiskOptions,
    cache: Mutex<BlockLru>,
    inflight: Mutex<HashMap<u64, Arc<OnceCell<Bytes>>>>,
    /// End of the previous read, to recognise a sequential reader.
    last_end: AtomicU64,
    readahead: Semaphore,
    blocks_fetched: AtomicU64,
    bytes_fetched: AtomicU64,
    readahead_blocks: AtomicU64,
    cache_hits: AtomicU64,
    zero_blocks: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks leaves consistent data (plain maps): keep going.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl PointDisk {
    /// Opens disk `disk` of point `point` (`latest` or a point id) of `vm`: reads and checks
    /// the manifest the point pinned. No block is read yet.
    pub async fn open(
        vault: &Vault,
        vm: &str,
        point: &str,
        disk: &str,
        options: DiskOptions,
    ) -> Result<PointDisk, Error> {
        let p = vault.resolve_point(vm, point).await?;
        let map = vault.disk_manifest(&p, disk).await?;
        Ok(Self::from_map(
            vault.clone(),
            map,
            format!("{vm}/{}/{disk}", p.id),
            options,
        ))
    }

    /// A disk described by a block map already read (and checked) from `vault`. `label`
    /// names the disk in errors.
    pub fn from_map(vault: Vault, map: BlockMap, label: String, options: DiskOptions) -> PointDisk {
        let permits = (options.readahead_blocks as usize).max(1);
        PointDisk {
            inner: Arc::new(Inner {
                vault,
                cache: Mutex::new(BlockLru::new(options.cache_bytes)),
                map,
                label,
                options,
                inflight: Mutex::new(HashMap::new()),
                last_end: AtomicU64::new(u64::MAX),
                readahead: Semaphore::new(permits),
                blocks_fetched: AtomicU64::new(0),
                bytes_fetched: AtomicU64::new(0),
                readahead_blocks: AtomicU64::new(0),
                cache_hits: AtomicU64::new(0),
                zero_blocks: AtomicU64::new(0),
            }),
        }
    }

    /// Size of the disk in bytes.
    pub fn size(&self) -> u64 {
        self.inner.map.disk_size()
    }

    /// Block size of the point's manifest, in bytes.
    pub fn block_size(&self) -> u64 {
        self.inner.map.block_size().bytes()
    }

    /// The disk's name in errors: `vm/point/disk`.
    pub fn label(&self) -> &str {
        &self.inner.label
    }

    /// The counts so far.
    pub fn stats(&self) -> FetchStats {
        let i = &self.inner;
        FetchStats {
            blocks_fetched: i.blocks_fetched.load(Ordering::Relaxed),
            bytes_fetched: i.bytes_fetched.load(Ordering::Relaxed),
            readahead_blocks: i.readahead_blocks.load(Ordering::Relaxed),
            cache_hits: i.cache_hits.load(Ordering::Relaxed),
            zero_blocks: i.zero_blocks.load(Ordering::Relaxed),
        }
    }

    /// Bytes held in the block cache now (never much more than
    /// [`DiskOptions::cache_bytes`]).
    pub fn cached_bytes(&self) -> u64 {
        lock(&self.inner.cache).held()
    }

    /// The data and zero runs within `offset..offset+len` (clipped to the disk), merged, at
    /// most `max` of them (the last one is cut short when there would be more). For NBD
    /// block status.
    pub fn extents(&self, offset: u64, len: u64, max: usize) -> Vec<Extent> {
        let map = &self.inner.map;
        let end = offset.saturating_add(len).min(map.disk_size());
        let bs = self.block_size();
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let index = pos / bs;
            let zero = matches!(map.entry(index), Some(Entry::Zero) | None);
            let run_end = ((index + 1) * bs).min(end);
            let full = out.len() >= max.max(1);
            match out.last_mut() {
                Some(last) if last.zero == zero => last.len += run_end - pos,
                _ if full => break,
                _ => out.push(Extent {
                    offset: pos,
                    len: run_end - pos,
                    zero,
                }),
            }
            pos = run_end;
        }
        out
    }

    /// Reads exactly `buf.len()` bytes at `offset`. Reading past the end of the disk is an
    /// error, as is a block whose bytes do not match its address.
    pub async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        let size = self.size();
        let len = buf.len() as u64;
        let end = offset
            .checked_add(len)
            .filter(|e| *e <= size)
            .ok_or_else(|| Error::ReadPastEnd {
                disk: self.inner.label.clone(),
                offset,
                len,
                size,
            })?;
        if len == 0 {
            return Ok(());
        }
        let bs = self.block_size();
        let first = offset / bs;
        let last = (end - 1) / bs;
        let mut blocks = futures::stream::iter(first..=last)
            .map(|index| {
                let inner = self.inner.clone();
                async move { inner.block(index).await.map(|b| (index, b)) }
            })
            .buffered(self.inner.options.concurrency.max(1));
        while let Some(r) = blocks.next().await {
            let (index, block) = r?;
            let block_start = index * bs;
            let from = offset.max(block_start);
            let to = end.min(block_start + bs);
            let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
            match block {
                None => dst.fill(0),
                Some(data) => {
                    let src = (from - block_start) as usize..(to - block_start) as usize;
                    // Length checked on fetch: every data block is exactly its manifest length.
                    match data.get(src) {
                        Some(src) => dst.copy_from_slice(src),
                        None => return Err(self.inner.short_block(index, data.len())),
                    }
                }
            }
        }
        drop(blocks);
        let sequential = self.inner.last_end.swap(end, Ordering::Relaxed) == offset;
        if sequential {
            self.inner.clone().read_ahead(last + 1);
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset` into a new buffer.
    pub async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, Error> {
        let mut buf = vec![0u8; len];
        self.read_at(offset, &mut buf).await?;
        Ok(buf)
    }

    /// A blocking reader of `start..start+len` of this disk (a partition, or the whole disk),
    /// for parsers with a synchronous reader trait. Its reads run `handle.block_on`, so use it
    /// only on a thread outside the async runtime (`spawn_blocking`).
    pub fn blocking(
        &self,
        handle: tokio::runtime::Handle,
        start: u64,
        len: u64,
    ) -> Result<BlockingReader, Error> {
        let size = self.size();
        if start.checked_add(len).is_none_or(|e| e > size) {
            return Err(Error::ReadPastEnd {
                disk: self.inner.label.clone(),
                offset: start,
                len,
                size,
            });
        }
        Ok(BlockingReader {
            disk: self.clone(),
            handle,
            start,
            len,
        })
    }
}

impl Inner {
    fn short_block(&self, index: u64, got: usize) -> Error {
        Error::Vault(VaultError::Corrupt {
            key: format!("{} block {index}", self.label),
            why: format!(
                "block is {got} bytes, the manifest needs {}",
                self.map.block_len(index)
            ),
        })
    }

    /// Block `index`: `None` for a zero block, else its verified bytes.
    async fn block(self: Arc<Self>, index: u64) -> Result<Option<Bytes>, Error> {
        let address = match self.map.entry(index) {
            Some(Entry::Zero) => {
                self.zero_blocks.fetch_add(1, Ordering::Relaxed);
                return Ok(None);
            }
            Some(Entry::Data { address, .. }) => address,
            None => {
                return Err(Error::ReadPastEnd {
                    disk: self.label.clone(),
                    offset: index.saturating_mul(self.map.block_size().bytes()),
                    len: 0,
                    size: self.map.disk_size(),
                });
            }
        };
        if let Some(data) = lock(&self.cache).get(index) {
            self.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Some(data));
        }
        let cell = lock(&self.inflight)
            .entry(index)
            .or_insert_with(|| Arc::new(OnceCell::new()))
            .clone();
        let result = cell
            .get_or_try_init(|| async {
                let data = self.vault.get_block(address).await?;
                if data.len() as u64 != self.map.block_len(index) {
                    return Err(self.short_block(index, data.len()));
                }
                self.blocks_fetched.fetch_add(1, Ordering::Relaxed);
                self.bytes_fetched
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                lock(&self.cache).insert(index, data.clone());
                Ok(data)
            })
            .await
            .cloned();
        {
            let mut inflight = lock(&self.inflight);
            if inflight.get(&index).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                inflight.remove(&index);
            }
        }
        result.map(Some)
    }

    /// Fetches the data blocks from `next` on in the background, up to the read-ahead depth,
    /// skipping blocks cached or being fetched, and never more fetches at once than the depth.
    fn read_ahead(self: Arc<Self>, next: u64) {
        let depth = u64::from(self.options.readahead_blocks);
        let count = self.map.block_size().block_count(self.map.disk_size());
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        for index in next..next.saturating_add(depth).min(count) {
            if !matches!(self.map.entry(index), Some(Entry::Data { .. }))
                || lock(&self.cache).contains(index)
                || lock(&self.inflight).contains_key(&index)
            {
                continue;
            }
            let Ok(permit) = self.clone().readahead_permit() else {
                return;
            };
            let inner = self.clone();
            handle.spawn(async move {
                let _permit = permit;
                if let Ok(Some(_)) = inner.clone().block(index).await {
                    inner.readahead_blocks.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    }

    fn readahead_permit(self: Arc<Self>) -> Result<ReadaheadPermit, ()> {
        match self.readahead.try_acquire() {
            Ok(p) => {
                p.forget();
                Ok(ReadaheadPermit(self.clone()))
            }
            Err(_) => Err(()),
        }
    }
}

/// A read-ahead slot, given back when the fetch ends.
struct ReadaheadPermit(Arc<Inner>);

impl Drop for ReadaheadPermit {
    fn drop(&mut self) {
        self.0.readahead.add_permits(1);
    }
}

/// A blocking view of `start..start+len` of a [`PointDisk`] (see [`PointDisk::blocking`]).
#[derive(Debug, Clone)]
pub struct BlockingReader {
    disk: PointDisk,
    handle: tokio::runtime::Handle,
    start: u64,
    len: u64,
}

impl BlockingReader {
    /// Length of the view in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when the view is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The disk viewed.
    pub fn disk(&self) -> &PointDisk {
        &self.disk
    }

    /// Reads exactly `buf.len()` bytes at `offset` within the view; past its end is an error.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        let len = buf.len() as u64;
        if offset.checked_add(len).is_none_or(|e| e > self.len) {
            return Err(Error::ReadPastEnd {
                disk: self.disk.label().to_string(),
                offset: self.start.saturating_add(offset),
                len,
                size: self.start.saturating_add(self.len),
            });
        }
        self.handle
            .block_on(self.disk.read_at(self.start + offset, buf))
    }
}

impl ext4_view::Ext4Read for BlockingReader {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        BlockingReader::read_at(self, start_byte, dst).map_err(|e| Box::new(e) as _)
    }
}

#[cfg(test)]
#[path = "disk_tests.rs"]
mod tests;
