//! The pipelined, parallel scanner: reads a disk image block by block and says, for each block,
//! whether it is a hole or zero, unchanged since the previous block map, or changed (with its
//! content address and data).

use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use xxhash_rust::xxh3::xxh3_128_with_seed;

use crate::Error;
use crate::blockmap::{Address, BlockMap, BlockSize, Entry};
use crate::buffers::Pool;
use crate::source::BlockSource;

/// How to scan a disk.
#[derive(Debug, Clone)]
pub struct ScanOptions {
    /// The block size.
    pub block_size: BlockSize,
    /// The seed of the XXH3-128 change hash (per vault: a guest cannot precompute collisions
    /// against a seed it does not know).
    pub change_seed: u64,
    /// Key for keyed BLAKE3 addresses (encrypted vaults), or `None` for plain BLAKE3.
    pub address_key: Option<[u8; 32]>,
    /// How many batches of blocks are read and hashed at once. Memory in flight is at most
    /// `parallelism × max(block size, 4 MiB)`.
    pub parallelism: usize,
}

impl Default for ScanOptions {
    fn default() -> Self {
        ScanOptions {
            block_size: BlockSize::default(),
            change_seed: 0,
            address_key: None,
            parallelism: default_parallelism(),
        }
    }
}

/// Two batches per core keep every core busy while one batch waits for I/O.
pub fn default_parallelism() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get() * 2)
}

/// What the scanner found for one block, or for a run of blocks it did not need to visit.
#[derive(Debug, Clone)]
pub enum BlockEvent {
    /// The blocks are all zero. `hole` is true when they were not read at all (SEEK_DATA or
    /// the source's allocation status says they hold no data; a run of such blocks is one
    /// event), false for one block read as zeros.
    Zero {
        /// The block indexes.
        blocks: Range<u64>,
        /// True when the blocks were not read.
        hole: bool,
    },
    /// The blocks lie wholly in ranges known unchanged since the previous block map (see
    /// [`scan_tracked`]): they are not read, and their entries are the previous map's
    /// ([`crate::BlockMapBuilder::carry`] copies them in bulk). One event per run.
    Carried {
        /// The block indexes.
        blocks: Range<u64>,
    },
    /// The block was read and has the same length and change hash as in the previous block
    /// map: its entry is reused and nothing needs storing.
    Unchanged {
        /// Block index.
        index: u64,
        /// The entry reused from the previous block map.
        entry: Entry,
    },
    /// The block is new or changed.
    Changed {
        /// Block index.
        index: u64,
        /// XXH3-128 of the data (seeded).
        change: u128,
        /// The content address (BLAKE3, keyed if the options say so).
        address: Address,
        /// The block's bytes.
        data: Bytes,
    },
}

impl BlockEvent {
    /// The block indexes the event covers.
    pub fn blocks(&self) -> Range<u64> {
        match self {
            BlockEvent::Zero { blocks, .. } | BlockEvent::Carried { blocks } => blocks.clone(),
            BlockEvent::Unchanged { index, .. } | BlockEvent::Changed { index, .. } => {
                *index..index + 1
            }
        }
    }
}

/// An open disk image (or block device) to scan: the first [`BlockSource`]. It finds holes
/// with `SEEK_DATA` and reads with `O_DIRECT` where the file system allows it (else buffered,
/// silently): a snapshot (a fresh reflink clone) never shares page cache with its image, so
/// buffered reads of it are cold anyway; direct reads skip a copy, are 2–5× faster on the
/// loop-mounted XFS of the benchmarks, and do not evict the running VMs' page cache.
#[derive(Debug, Clone)]
pub struct Disk {
    path: PathBuf,
    file: Arc<File>,
    /// The same file opened with `O_DIRECT`, when the file system supports it.
    direct: Option<Arc<File>>,
    /// Set when a direct read failed with EINVAL (alignment the device does not accept): the
    /// rest reads buffered.
    direct_failed: Arc<AtomicBool>,
    size: u64,
}

impl Disk {
    /// Opens `path` read-only. It must be a regular file or a block device.
    pub fn open(path: &Path) -> Result<Disk, Error> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        use std::os::unix::fs::FileTypeExt;
        let ft = meta.file_type();
        if !(ft.is_file() || ft.is_block_device()) {
            return Err(Error::NotADiskImage {
                path: path.to_path_buf(),
            });
        }
        let file = File::open(path).map_err(io)?;
        let size = if ft.is_block_device() {
            rustix::fs::seek(&file, rustix::fs::SeekFrom::End(0))
                .map_err(|e| io(std::io::Error::from(e)))?
        } else {
            meta.len()
        };
        let direct = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
                .open(path)
                .ok()
                .map(Arc::new)
        };
        Ok(Disk {
            path: path.to_path_buf(),
            file: Arc::new(file),
            direct,
            direct_failed: Arc::new(AtomicBool::new(false)),
            size,
        })
    }

    /// Reads with `O_DIRECT` where possible (`true`, the default) or always through the page
    /// cache (`false`).
    pub fn with_direct_io(mut self, direct: bool) -> Disk {
        if !direct {
            self.direct = None;
        }
        self
    }

    /// The size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A buffered read into the spare capacity of a fresh vector.
    fn read_buffered(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let mut buf = Vec::with_capacity(len);
        while buf.len() < len {
            let at = offset + buf.len() as u64;
            match rustix::io::pread(&*self.file, rustix::buffer::spare_capacity(&mut buf), at) {
                Ok(0) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("the disk ended {} bytes into the block", buf.len()),
                    ));
                }
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        // `with_capacity` may round up; bytes past the block are not part of it.
        buf.truncate(len);
        Ok(buf)
    }
}

impl BlockSource for Disk {
    fn size(&self) -> u64 {
        self.size
    }

    /// Direct when possible (into an aligned buffer from `pool`, returned without copying),
    /// else buffered. Neither path zero-fills its buffer first (a 1 MiB memset per block was a
    /// few per cent of a full backup's CPU time).
    fn read(&self, offset: u64, len: usize, pool: &Arc<Pool>) -> std::io::Result<Bytes> {
        if let Some(direct) = &self.direct
            && !self.direct_failed.load(Ordering::Relaxed)
        {
            match read_direct(direct, offset, len, pool) {
                Ok(Some(b)) => return Ok(b),
                // Short (the file changed size?): the buffered read below reports it exactly.
                Ok(None) => {}
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                    tracing::debug!(path = %self.path.display(), "O_DIRECT read refused: reading buffered");
                    self.direct_failed.store(true, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        self.read_buffered(offset, len).map(Bytes::from)
    }

    /// `SEEK_DATA`. File systems without it (or any error) report `offset` itself, so the
    /// block is read: correctness never depends on hole detection.
    fn next_data(&self, offset: u64) -> std::io::Result<u64> {
        Ok(
            match rustix::fs::seek(&*self.file, rustix::fs::SeekFrom::Data(offset)) {
                Ok(d) => d,
                Err(rustix::io::Errno::NXIO) => self.size,
                Err(_) => offset,
            },
        )
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// Scans `source` against the block map of its previous backup (if any, and if its block size
/// matches) and yields, in block order, one [`BlockEvent`] per block read and one per run of
/// holes.
///
/// Reading and hashing run on tokio's blocking pool, `options.parallelism` batches at a time;
/// the stream is ordered and bounded, so memory stays flat however large the disk.
pub fn scan(
    source: Arc<dyn BlockSource>,
    previous: Option<Arc<BlockMap>>,
    options: &ScanOptions,
) -> impl Stream<Item = Result<BlockEvent, Error>> + Send + 'static {
    scan_tracked(source, previous, Vec::new(), options)
}

/// [`scan`] with change tracking: `unchanged` lists byte ranges that are known to hold the same
/// data as when `previous` was made (for instance from the extent maps of two reflink
/// snapshots, or a hypervisor's dirty bitmap). Blocks that lie wholly inside them (their
/// union), and have the same length in `previous`, are not read: each run of them is one
/// [`BlockEvent::Carried`]. The work of an incremental follows the blocks outside those
/// ranges and the number of ranges, never the disk's size.
///
/// The caller vouches for `unchanged`: a wrong range makes the new map describe old data.
pub fn scan_tracked(
    source: Arc<dyn BlockSource>,
    previous: Option<Arc<BlockMap>>,
    unchanged: Vec<Range<u64>>,
    options: &ScanOptions,
) -> impl Stream<Item = Result<BlockEvent, Error>> + Send + 'static {
    let bs = options.block_size;
    let previous = previous.filter(|p| p.block_size() == bs);
    let size = source.size();
    let count = bs.block_count(size);
    let carry = match &previous {
        Some(p) => carried_runs(unchanged, p, bs, size),
        None => Vec::new(),
    };
    // Small blocks are grouped so that each blocking task handles about 4 MiB.
    let per_batch = (4 * 1024 * 1024 / bs.bytes()).max(1);
    let parallelism = options.parallelism.max(1);
    let ctx = Arc::new(Ctx {
        source,
        size,
        previous,
        // Enough for every block in flight: the scan's batches and the consumer's queue.
        pool: Pool::new(bs.bytes() as usize, per_batch as usize * parallelism + 32),
        options: options.clone(),
    });
    let planner = Planner {
        ctx: ctx.clone(),
        carry: carry.into_iter().peekable(),
        pos: 0,
        count,
        per_batch,
    };
    let work = futures::stream::unfold(Some(planner), move |state| async move {
        let mut planner = state?;
        let stepped = tokio::task::spawn_blocking(move || {
            let items = planner.step(parallelism);
            (planner, items)
        })
        .await;
        match stepped {
            Ok((_, items)) if items.is_empty() => None,
            Ok((planner, items)) => Some((
                futures::stream::iter(items.into_iter().map(Ok)).left_stream(),
                Some(planner),
            )),
            Err(e) => Some((
                futures::stream::once(async move { Err(Error::Worker(e.to_string())) })
                    .right_stream(),
                None,
            )),
        }
    })
    .flatten();
    work.map(move |w| {
        let ctx = ctx.clone();
        async move {
            match w? {
                Work::Carry(blocks) => Ok(vec![BlockEvent::Carried { blocks }]),
                Work::Holes(blocks) => Ok(vec![BlockEvent::Zero { blocks, hole: true }]),
                Work::Read { blocks, data_at } => {
                    tokio::task::spawn_blocking(move || ctx.scan_range(blocks, data_at))
                        .await
                        .map_err(|e| Error::Worker(e.to_string()))?
                }
            }
        }
    })
    .buffered(parallelism)
    .flat_map(|r| match r {
        Ok(events) => futures::stream::iter(events.into_iter().map(Ok)).left_stream(),
        Err(e) => futures::stream::once(async move { Err(e) }).right_stream(),
    })
}

/// The union of `ranges` (in any order, overlapping or touching, empty ones ignored) as
/// sorted, disjoint, non-touching ranges: the form [`scan_tracked`]'s callers can search.
pub fn union_of(mut ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    ranges.retain(|r| r.start < r.end);
    ranges.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

fn carried_runs(
    mut unchanged: Vec<Range<u64>>,
    previous: &BlockMap,
    bs: BlockSize,
    size: u64,
) -> Vec<Range<u64>> {
    unchanged.retain(|r| r.start < r.end);
    unchanged.sort_by_key(|r| r.start);
    let count = bs.block_count(size);
    let prev_count = previous.block_count();
    // Blocks below this are whole on both disks.
    let whole = (size / bs.bytes()).min(previous.disk_size() / bs.bytes());
    let mut runs: Vec<Range<u64>> = Vec::new();
    let mut add = |r: Range<u64>| {
        if r.start >= r.end {
            return;
        }
        match runs.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => runs.push(r),
        }
    };
    let mut flush = |r: Range<u64>| {
        // Block i lies wholly inside r when i·bs ≥ r.start and min((i+1)·bs, size) ≤ r.end.
        let first = r.start.div_ceil(bs.bytes());
        let last = if r.end >= size {
            count
        } else {
            r.end / bs.bytes()
        };
        if first >= last {
            return;
        }
        add(first..last.min(whole));
        // At most one block past `whole` is on both disks (a short last block).
        for i in first.max(whole)..last.min(prev_count) {
            if previous.block_len(i) == bs.block_len(size, i) {
                add(i..i + 1);
            }
        }
    };
    for r in union_of(unchanged) {
        flush(r);
    }
    runs
}

/// One unit of the scan's work, in block order.
#[derive(Debug)]
enum Work {
    /// Blocks carried over from the previous map.
    Carry(Range<u64>),
    /// Blocks that hold no data.
    Holes(Range<u64>),
    /// Blocks to read; the source said data may start at `data_at`.
    Read { blocks: Range<u64>, data_at: u64 },
}

/// Cuts the disk into [`Work`]: the carried runs as they are, holes as runs (one `next_data`
/// call per run), the rest into read batches.
struct Planner {
    ctx: Arc<Ctx>,
    carry: std::iter::Peekable<std::vec::IntoIter<Range<u64>>>,
    pos: u64,
    count: u64,
    per_batch: u64,
}

impl Planner {
    /// The next items: at most `reads` read batches and 64 items in all (memory stays bounded
    /// and the planner never runs far ahead of the readers). Empty at the end of the disk.
    /// Blocking: it asks the source where data starts.
    fn step(&mut self, reads: usize) -> Vec<Work> {
        let bs = self.ctx.options.block_size.bytes();
        let size = self.ctx.size;
        let mut out = Vec::new();
        let mut read = 0;
        while self.pos < self.count && read < reads && out.len() < 64 {
            if let Some(run) = self.carry.next_if(|r| r.start == self.pos) {
                self.pos = run.end;
                out.push(Work::Carry(run));
                continue;
            }
            let limit = self.carry.peek().map_or(self.count, |r| r.start);
            let offset = self.pos * bs;
            // An error or a nonsense answer means "read it": never trusted as a hole.
            let data_at = match self.ctx.source.next_data(offset) {
                Ok(d) if d >= offset => d,
                _ => offset,
            };
            let holes_end = if data_at >= size {
                self.count
            } else {
                data_at / bs
            }
            .min(limit);
            if holes_end > self.pos {
                out.push(Work::Holes(self.pos..holes_end));
                self.pos = holes_end;
                continue;
            }
            let end = (self.pos + self.per_batch).min(limit);
            out.push(Work::Read {
                blocks: self.pos..end,
                data_at,
            });
            self.pos = end;
            read += 1;
        }
        out
    }
}

struct Ctx {
    source: Arc<dyn BlockSource>,
    size: u64,
    previous: Option<Arc<BlockMap>>,
    /// Aligned buffers for direct reads.
    pool: Arc<Pool>,
    options: ScanOptions,
}

impl Ctx {
    /// Reads and classifies `blocks` (none of them carried); the source said data may start
    /// at `data_at` (at or after the first block's offset).
    fn scan_range(&self, blocks: Range<u64>, data_at: u64) -> Result<Vec<BlockEvent>, Error> {
        let bs = self.options.block_size;
        let mut out = Vec::with_capacity((blocks.end - blocks.start) as usize);
        // The next offset known to hold data, so that a run of hole blocks costs one call (one
        // SEEK_DATA), not one per block.
        let mut next_data: Option<u64> = Some(data_at);
        for index in blocks {
            let offset = index * bs.bytes();
            let len = bs.block_len(self.size, index);
            let end = offset + len;
            let data_at = match next_data {
                Some(d) if d >= offset => d,
                _ => {
                    // An error or a nonsense answer means "read it": never trusted as a hole.
                    let d = match self.source.next_data(offset) {
                        Ok(d) if d >= offset => d,
                        _ => offset,
                    };
                    next_data = Some(d);
                    d
                }
            };
            if data_at >= end {
                // Consecutive holes are one event.
                match out.last_mut() {
                    Some(BlockEvent::Zero { blocks, hole: true }) if blocks.end == index => {
                        blocks.end = index + 1;
                    }
                    _ => out.push(BlockEvent::Zero {
                        blocks: index..index + 1,
                        hole: true,
                    }),
                }
                continue;
            }
            let read_error = |source| Error::Read {
                source_name: self.source.describe(),
                index,
                offset,
                source,
            };
            let buf = self
                .source
                .read(offset, len as usize, &self.pool)
                .map_err(read_error)?;
            if buf.len() as u64 != len {
                return Err(read_error(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "the source returned {} bytes for a {len}-byte block",
                        buf.len()
                    ),
                )));
            }
            out.push(self.classify(index, buf));
        }
        Ok(out)
    }

    fn classify(&self, index: u64, buf: Bytes) -> BlockEvent {
        if is_zero(&buf) {
            return BlockEvent::Zero {
                blocks: index..index + 1,
                hole: false,
            };
        }
        let change = xxh3_128_with_seed(&buf, self.options.change_seed);
        if let Some(prev) = &self.previous
            && let Some(Entry::Data {
                change: prev_change,
                address,
            }) = prev.entry(index)
            && prev_change == change
            && prev.block_len(index) == buf.len() as u64
        {
            return BlockEvent::Unchanged {
                index,
                entry: Entry::Data { change, address },
            };
        }
        let address = content_address(&buf, self.options.address_key.as_ref());
        BlockEvent::Changed {
            index,
            change,
            address,
            data: buf,
        }
    }
}

/// Alignment of direct reads: buffer, offset and length (4 KiB covers 512-byte and 4 KiB
/// logical sectors). Block offsets are multiples of the block size (≥ 64 KiB).
const DIRECT_ALIGN: usize = 4096;

/// Reads a block with `O_DIRECT` into an aligned buffer from `pool` and returns it without
/// copying (the buffer goes back to the pool when the block is dropped). `Ok(None)` when the
/// read came back short.
fn read_direct(
    file: &File,
    offset: u64,
    len: usize,
    pool: &Arc<Pool>,
) -> std::io::Result<Option<Bytes>> {
    let want = len.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
    let mut buf = pool.take(want);
    let n = loop {
        // SAFETY: `as_mut_ptr` points at an allocation of `capacity() >= want` bytes that `buf`
        // owns and nothing else borrows; viewing it as uninitialised bytes is always sound.
        let spare = unsafe {
            std::slice::from_raw_parts_mut(
                buf.as_mut_ptr().cast::<std::mem::MaybeUninit<u8>>(),
                want,
            )
        };
        match rustix::io::pread(file, spare, offset) {
            Ok((read, _)) => break read.len(),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    if n < len {
        return Ok(None);
    }
    // SAFETY: `pread` initialised the first `n <= want <= capacity()` bytes (it returned them
    // as an initialised slice).
    unsafe { buf.set_len(n) };
    Ok(Some(Bytes::from_owner(buf).slice(..len)))
}

/// The content address of `data`: BLAKE3, or keyed BLAKE3 when `key` is given.
pub fn content_address(data: &[u8], key: Option<&[u8; 32]>) -> Address {
    let hash = match key {
        Some(k) => blake3::keyed_hash(k, data),
        None => blake3::hash(data),
    };
    Address(*hash.as_bytes())
}

/// True when every byte of `buf` is zero. Checks 64-byte chunks so the compiler vectorises it,
/// and stops at the first chunk holding data.
pub fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(64);
    for c in &mut chunks {
        if c.iter().fold(0u8, |acc, &b| acc | b) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blockmap::MIN_BLOCK_SIZE;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn union_of_sorts_and_merges_overlapping_and_touching_ranges() {
        assert_eq!(
            union_of(vec![10..20, 0..5, 5..7, 15..30, 40..40, 35..36]),
            vec![0..7, 10..30, 35..36]
        );
        assert!(union_of(Vec::new()).is_empty());
    }

    fn opts() -> ScanOptions {
        ScanOptions {
            block_size: BlockSize::new(MIN_BLOCK_SIZE).unwrap(),
            change_seed: 42,
            address_key: None,
            parallelism: 3,
        }
    }

    fn src(disk: &Disk) -> Arc<dyn BlockSource> {
        Arc::new(disk.clone())
    }

    async fn collect(disk: &Disk, prev: Option<Arc<BlockMap>>) -> Vec<BlockEvent> {
        let mut s = std::pin::pin!(scan(src(disk), prev, &opts()));
        let mut v = Vec::new();
        while let Some(e) = s.next().await {
            v.push(e.unwrap());
        }
        v
    }

    fn map_of(events: &[BlockEvent], size: u64) -> Arc<BlockMap> {
        map_against(events, size, None)
    }

    fn map_against(events: &[BlockEvent], size: u64, prev: Option<Arc<BlockMap>>) -> Arc<BlockMap> {
        let mut b = crate::BlockMapBuilder::new(opts().block_size, size, prev);
        for e in events {
            b.push_event(e).unwrap();
        }
        Arc::new(b.finish().unwrap())
    }

    #[tokio::test]
    async fn known_unchanged_ranges_are_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let bs = u64::from(MIN_BLOCK_SIZE);
        let size = 6 * bs + 100;
        let mut data = vec![1u8; size as usize];
        data[(2 * bs) as usize..(3 * bs) as usize].fill(0);
        std::fs::write(&path, &data).unwrap();
        let disk = Disk::open(&path).unwrap();
        let prev = map_of(&collect(&disk, None).await, size);

        // Rewrite blocks 1 and 4. Claim 0..3 blocks and the short tail unchanged: block 1's
        // change goes unseen (proof that it was not read), block 4's is found.
        data[(bs + 5) as usize] = 9;
        data[(4 * bs + 5) as usize] = 9;
        std::fs::write(&path, &data).unwrap();
        let disk = Disk::open(&path).unwrap();
        let ranges = vec![6 * bs..size, 0..3 * bs, 3 * bs..3 * bs + 10];
        let mut s = std::pin::pin!(scan_tracked(
            src(&disk),
            Some(prev.clone()),
            ranges,
            &opts()
        ));
        let mut ev = Vec::new();
        while let Some(e) = s.next().await {
            ev.push(e.unwrap());
        }
        // Blocks 0..3 carried (block 1's change unseen: proof it was not read), 3 read and
        // unchanged, 4 changed, 5 read, the short tail (6) carried.
        assert!(
            matches!(&ev[0], BlockEvent::Carried { blocks } if *blocks == (0..3)),
            "{:?}",
            ev[0]
        );
        assert!(
            matches!(ev[1], BlockEvent::Unchanged { index: 3, .. }),
            "{:?}",
            ev[1]
        );
        assert!(
            matches!(ev[2], BlockEvent::Changed { index: 4, .. }),
            "{:?}",
            ev[2]
        );
        assert!(
            matches!(ev[3], BlockEvent::Unchanged { index: 5, .. }),
            "{:?}",
            ev[3]
        );
        assert!(
            matches!(&ev[4], BlockEvent::Carried { blocks } if *blocks == (6..7)),
            "{:?}",
            ev[4]
        );
        assert_eq!(ev.len(), 5);
        let map = map_against(&ev, size, Some(prev.clone()));
        assert_eq!(map.entry(1), prev.entry(1), "carried over, not read");
        assert_ne!(map.entry(4), prev.entry(4));

        // Without a previous map, ranges mean nothing: everything is read.
        let mut s = std::pin::pin!(scan_tracked(
            src(&disk),
            None,
            std::iter::once(0..size).collect(),
            &opts()
        ));
        while let Some(e) = s.next().await {
            assert!(!matches!(e.unwrap(), BlockEvent::Unchanged { .. }));
        }
    }

    #[tokio::test]
    async fn holes_zeros_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let bs = u64::from(MIN_BLOCK_SIZE);
        let size = 10 * bs + 123;
        let mut f = File::create(&path).unwrap();
        f.set_len(size).unwrap();
        // Block 1: data. Block 3: written zeros (allocated, not a hole). Last block: short data.
        f.seek(SeekFrom::Start(bs)).unwrap();
        f.write_all(&vec![7u8; bs as usize]).unwrap();
        f.seek(SeekFrom::Start(3 * bs)).unwrap();
        f.write_all(&vec![0u8; bs as usize]).unwrap();
        f.seek(SeekFrom::Start(10 * bs)).unwrap();
        f.write_all(&[9u8; 123]).unwrap();
        f.sync_all().unwrap();
        drop(f);

        let disk = Disk::open(&path).unwrap();
        let ev = collect(&disk, None).await;
        // In order, every block once; the holes after block 3 are one event.
        let covered: Vec<Range<u64>> = ev.iter().map(BlockEvent::blocks).collect();
        assert_eq!(covered, vec![0..1, 1..2, 2..3, 3..4, 4..10, 10..11]);
        assert!(matches!(ev[0], BlockEvent::Zero { hole: true, .. }));
        assert!(matches!(ev[1], BlockEvent::Changed { .. }));
        assert!(
            matches!(ev[3], BlockEvent::Zero { hole: false, .. }),
            "{:?}",
            ev[3]
        );
        assert!(matches!(ev[4], BlockEvent::Zero { hole: true, .. }));
        match &ev[5] {
            BlockEvent::Changed { data, .. } => assert_eq!(data.len(), 123),
            other => panic!("{other:?}"),
        }

        // Same content again: everything unchanged, nothing to store.
        let prev = map_of(&ev, size);
        let ev2 = collect(&disk, Some(prev.clone())).await;
        assert!(ev2.iter().all(|e| !matches!(e, BlockEvent::Changed { .. })));
        assert_eq!(map_of(&ev2, size), prev);

        // Change one block: exactly that block is changed.
        let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.seek(SeekFrom::Start(bs + 10)).unwrap();
        f.write_all(b"x").unwrap();
        drop(f);
        let ev3 = collect(&disk, Some(prev)).await;
        let changed: Vec<u64> = ev3
            .iter()
            .filter(|e| matches!(e, BlockEvent::Changed { .. }))
            .map(|e| e.blocks().start)
            .collect();
        assert_eq!(changed, vec![1]);
    }

    #[tokio::test]
    async fn grown_last_block_is_changed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![5u8; 1000]).unwrap();
        let disk = Disk::open(&path).unwrap();
        let ev = collect(&disk, None).await;
        let prev = map_of(&ev, 1000);
        // Grow by appending the same byte: the block's bytes differ in length only.
        std::fs::write(&path, vec![5u8; 2000]).unwrap();
        let disk = Disk::open(&path).unwrap();
        let ev = collect(&disk, Some(prev)).await;
        assert!(matches!(ev[0], BlockEvent::Changed { .. }));
    }

    #[tokio::test]
    async fn direct_and_buffered_reads_agree() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let bs = u64::from(MIN_BLOCK_SIZE) as usize;
        // Unaligned size: the last block is 777 bytes, read past its end with O_DIRECT.
        let image: Vec<u8> = (0..3 * bs + 777).map(|i| (i * 31 % 251) as u8).collect();
        std::fs::write(&path, &image).unwrap();
        let disk = Disk::open(&path).unwrap();
        for direct_io in [true, false] {
            let source: Arc<dyn BlockSource> = Arc::new(disk.clone().with_direct_io(direct_io));
            let mut s = std::pin::pin!(scan(source, None, &opts()));
            let mut indexes = Vec::new();
            while let Some(e) = s.next().await {
                match e.unwrap() {
                    BlockEvent::Changed { data, index, .. } => {
                        let at = index as usize * bs;
                        let end = (at + bs).min(image.len());
                        assert_eq!(&data[..], &image[at..end], "direct_io {direct_io}");
                        indexes.push(index);
                    }
                    other => panic!("{other:?}"),
                }
            }
            assert_eq!(indexes, vec![0, 1, 2, 3]);
        }
    }

    /// A source that is not a file: bytes in memory, no hole information, and optionally one
    /// block that comes back short.
    #[derive(Debug)]
    struct Memory {
        data: Vec<u8>,
        short_at: Option<u64>,
    }

    impl BlockSource for Memory {
        fn size(&self) -> u64 {
            self.data.len() as u64
        }
        fn read(&self, offset: u64, len: usize, _: &Arc<Pool>) -> std::io::Result<Bytes> {
            let at = offset as usize;
            let len = if self.short_at == Some(offset) {
                len - 1
            } else {
                len
            };
            Ok(Bytes::copy_from_slice(&self.data[at..at + len]))
        }
        fn describe(&self) -> String {
            "memory".into()
        }
    }

    #[tokio::test]
    async fn any_source_scans_like_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let bs = u64::from(MIN_BLOCK_SIZE) as usize;
        let mut image: Vec<u8> = (0..5 * bs + 99).map(|i| (i * 7 % 253) as u8).collect();
        image[bs..2 * bs].fill(0);
        std::fs::write(&path, &image).unwrap();
        let disk = Disk::open(&path).unwrap();
        let from_file = map_of(&collect(&disk, None).await, image.len() as u64);
        let memory: Arc<dyn BlockSource> = Arc::new(Memory {
            data: image.clone(),
            short_at: None,
        });
        let mut s = std::pin::pin!(scan(memory, None, &opts()));
        let mut ev = Vec::new();
        while let Some(e) = s.next().await {
            ev.push(e.unwrap());
        }
        // Without hole information the zero block is read (not a hole), same entry.
        assert!(matches!(ev[1], BlockEvent::Zero { hole: false, .. }));
        assert_eq!(map_of(&ev, image.len() as u64), from_file);

        // A source that returns fewer bytes than asked is an error naming it, never a block.
        let short: Arc<dyn BlockSource> = Arc::new(Memory {
            data: image,
            short_at: Some(2 * bs as u64),
        });
        let mut s = std::pin::pin!(scan(short, None, &opts()));
        let mut err = None;
        while let Some(e) = s.next().await {
            if let Err(e) = e {
                err = Some(e);
                break;
            }
        }
        let err = err.expect("a short read must fail the scan").to_string();
        assert!(err.contains("memory") && err.contains("block 2"), "{err}");
    }

    /// A disk that exists only as a few data blocks (each filled with one byte) in a huge
    /// virtual size: reports holes like SEEK_DATA, and counts every call the scan makes.
    #[derive(Debug, Default)]
    struct Sparse {
        size: u64,
        block: u64,
        data: std::collections::BTreeMap<u64, u8>,
        reads: std::sync::atomic::AtomicU64,
        next_data_calls: std::sync::atomic::AtomicU64,
    }

    impl BlockSource for Sparse {
        fn size(&self) -> u64 {
            self.size
        }
        fn read(&self, offset: u64, len: usize, _: &Arc<Pool>) -> std::io::Result<Bytes> {
            self.reads.fetch_add(1, Ordering::Relaxed);
            let fill = self.data.get(&(offset / self.block)).copied().unwrap_or(0);
            Ok(Bytes::from(vec![fill; len]))
        }
        fn next_data(&self, offset: u64) -> std::io::Result<u64> {
            self.next_data_calls.fetch_add(1, Ordering::Relaxed);
            let at = offset / self.block;
            Ok(self
                .data
                .range(at..)
                .next()
                .map_or(self.size, |(i, _)| (i * self.block).max(offset)))
        }
        fn describe(&self) -> String {
            "sparse".into()
        }
    }

    /// Scans into a map, failing as soon as the scan yields more than `max_events` events
    /// (a per-block scan of a huge disk fails fast instead of running for minutes).
    async fn scan_counted(
        source: Arc<dyn BlockSource>,
        prev: Option<Arc<BlockMap>>,
        unchanged: Vec<Range<u64>>,
        options: &ScanOptions,
        max_events: usize,
    ) -> (BlockMap, usize) {
        let mut b = crate::BlockMapBuilder::new(options.block_size, source.size(), prev.clone());
        let mut s = std::pin::pin!(scan_tracked(source, prev, unchanged, options));
        let mut n = 0;
        while let Some(e) = s.next().await {
            n += 1;
            assert!(
                n <= max_events,
                "more than {max_events} events: the scan visits blocks one by one"
            );
            b.push_event(&e.unwrap()).unwrap();
        }
        (b.finish().unwrap(), n)
    }

    /// The cost of an incremental follows the change, not the disk: on a 1 TiB disk (1 M
    /// blocks of 1 MiB) holding 64 blocks of data, an incremental after one 4 KiB write reads
    /// one block, asks for holes at most twice and yields three events; the full backup before
    /// it reads the 64 data blocks and makes one event per data block and hole run, the hole
    /// runs cut by the read batches.
    #[tokio::test]
    async fn an_incremental_costs_the_change_not_the_disk() {
        let options = ScanOptions::default();
        let bs = options.block_size.bytes();
        let size = 1u64 << 40;
        let mut disk = Sparse {
            size,
            block: bs,
            ..Default::default()
        };
        for i in 0..64u64 {
            disk.data.insert(i * 16_001 + 7, i as u8 + 1);
        }
        let disk = Arc::new(disk);
        let (full, events) = scan_counted(disk.clone(), None, Vec::new(), &options, 200).await;
        assert_eq!(disk.reads.load(Ordering::Relaxed), 64);
        // Per data block: the holes before it, the block, the holes after it in its batch.
        assert!(events <= 3 * 64 + 1, "{events} events");
        let calls = disk.next_data_calls.load(Ordering::Relaxed);
        assert!(calls <= 3 * 64 + 1, "{calls} hole look-ups");
        assert_eq!(full.data_blocks().len(), 64);
        let full = Arc::new(full);

        // One 4 KiB write into block 5000 (a hole until now): the tracker says everything else
        // is unchanged.
        let mut changed = Sparse {
            size,
            block: bs,
            data: disk.data.clone(),
            ..Default::default()
        };
        changed.data.insert(5000, 99);
        let changed = Arc::new(changed);
        let write = 5000 * bs + 8192..5000 * bs + 12288;
        let unchanged = vec![0..write.start, write.end..size];
        let (map, events) =
            scan_counted(changed.clone(), Some(full.clone()), unchanged, &options, 3).await;
        assert_eq!(events, 3, "carried, changed, carried");
        assert_eq!(changed.reads.load(Ordering::Relaxed), 1);
        assert!(changed.next_data_calls.load(Ordering::Relaxed) <= 2);
        assert_eq!(map.data_blocks().len(), 65);
        assert!(matches!(map.entry(5000), Some(Entry::Data { .. })));
        assert_eq!(map.entry(7), full.entry(7));
        assert_eq!(map.entry(63 * 16_001 + 7), full.entry(63 * 16_001 + 7));
    }

    /// Memory with optional hole reporting (blocks of zeros are holes).
    #[derive(Debug)]
    struct Holey {
        data: Vec<u8>,
        block: u64,
        holes: bool,
    }

    impl BlockSource for Holey {
        fn size(&self) -> u64 {
            self.data.len() as u64
        }
        fn read(&self, offset: u64, len: usize, _: &Arc<Pool>) -> std::io::Result<Bytes> {
            let at = offset as usize;
            Ok(Bytes::copy_from_slice(&self.data[at..at + len]))
        }
        fn next_data(&self, offset: u64) -> std::io::Result<u64> {
            if !self.holes {
                return Ok(offset);
            }
            let mut at = offset;
            while at < self.size() {
                let end = ((at / self.block + 1) * self.block).min(self.size());
                if !is_zero(&self.data[at as usize..end as usize]) {
                    return Ok(at);
                }
                at = end;
            }
            Ok(self.size())
        }
        fn describe(&self) -> String {
            "holey".into()
        }
    }

    /// The block-by-block reference of a tracked scan: a block lying wholly inside the union
    /// of `unchanged`, with the same length in `prev`, takes `prev`'s entry; every other block
    /// is read and classified.
    fn reference(data: &[u8], prev: &BlockMap, unchanged: &[Range<u64>]) -> BlockMap {
        let o = opts();
        let bs = o.block_size;
        let size = data.len() as u64;
        let covered = |start: u64, end: u64| {
            // Walk the union from `start`.
            let mut at = start;
            loop {
                let next = unchanged
                    .iter()
                    .filter(|r| r.start <= at && r.end > at)
                    .map(|r| r.end)
                    .max();
                match next {
                    Some(e) if e >= end => return true,
                    Some(e) => at = e,
                    None => return false,
                }
            }
        };
        let entries = (0..bs.block_count(size))
            .map(|i| {
                let start = i * bs.bytes();
                let len = bs.block_len(size, i);
                if i < prev.block_count() && prev.block_len(i) == len && covered(start, start + len)
                {
                    return prev.entry(i).unwrap();
                }
                let block = &data[start as usize..(start + len) as usize];
                if is_zero(block) {
                    return Entry::Zero;
                }
                let change = xxh3_128_with_seed(block, o.change_seed);
                match prev.entry(i) {
                    Some(e @ Entry::Data { change: c, .. })
                        if c == change && prev.block_len(i) == len =>
                    {
                        e
                    }
                    _ => Entry::Data {
                        change,
                        address: content_address(block, None),
                    },
                }
            })
            .collect();
        BlockMap::new(bs, size, entries).unwrap()
    }

    fn disk_of(fills: &[u8], tail: u64) -> Vec<u8> {
        let bs = u64::from(MIN_BLOCK_SIZE);
        let mut data = Vec::new();
        for &f in fills {
            data.extend(std::iter::repeat_n(f % 3, bs as usize));
        }
        data.truncate((data.len() as u64).saturating_sub(tail) as usize);
        data
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        /// Carrying runs gives exactly the map of the block-by-block reference, for random
        /// disks, previous maps (other sizes too) and change sets (overlapping, unaligned,
        /// past the end), with and without hole reporting.
        #[test]
        fn prop_tracked_scan_is_block_by_block(
            before in proptest::collection::vec(0u8..4, 0..10),
            after in proptest::collection::vec(0u8..4, 0..10),
            tails in (0u64..3000, 0u64..3000),
            ranges in proptest::collection::vec((0u64..11 * 65536, 0u64..4 * 65536), 0..6),
            holes in proptest::bool::ANY,
        ) {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .build()
                .unwrap();
            let bs = u64::from(MIN_BLOCK_SIZE);
            let old = disk_of(&before, tails.0);
            let new = disk_of(&after, tails.1);
            let unchanged: Vec<Range<u64>> = ranges.iter().map(|&(s, l)| s..s + l).collect();
            let (prev, got) = rt.block_on(async {
                let src = |d: &Vec<u8>| -> Arc<dyn BlockSource> {
                    Arc::new(Holey { data: d.clone(), block: bs, holes })
                };
                let (prev, _) = scan_counted(src(&old), None, Vec::new(), &opts(), 1000).await;
                let prev = Arc::new(prev);
                let (got, _) =
                    scan_counted(src(&new), Some(prev.clone()), unchanged.clone(), &opts(), 1000)
                        .await;
                (prev, got)
            });
            proptest::prop_assert_eq!(got, reference(&new, &prev, &unchanged));
        }
    }

    #[test]
    fn directory_is_not_a_disk() {
        let dir = tempfile::tempdir().unwrap();
        let err = Disk::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("not a disk image"), "{err}");
        assert!(
            err.to_string().contains(&dir.path().display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 1000]));
        let mut v = vec![0u8; 1000];
        v[999] = 1;
        assert!(!is_zero(&v));
        v[999] = 0;
        v[3] = 1;
        assert!(!is_zero(&v));
    }

    #[test]
    fn keyed_addresses_differ() {
        let a = content_address(b"hello", None);
        let b = content_address(b"hello", Some(&[1; 32]));
        assert_ne!(a, b);
        assert_eq!(a.0, *blake3::hash(b"hello").as_bytes());
    }
}
