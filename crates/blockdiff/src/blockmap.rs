//! The block map (manifest) of one disk at one recovery point, and its binary format.
//!
//! A block map is complete (a synthetic full): it lists every block of the disk, so a restore
//! reads one block map, never a chain of deltas. In memory it holds only the data blocks (in
//! block order); every block not listed is zero. Its size, and the cost of building, encoding
//! and carrying it over from one backup to the next, follow the data, not the disk: a 1 TiB
//! disk holding 64 blocks of data is 64 entries.
//!
//! # Format, version 2 (written; all integers little-endian)
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `BWBLKMAP` |
//! | 8 | 2 | format version (2) |
//! | 10 | 2 | flags (reserved, 0) |
//! | 12 | 4 | block size in bytes (power of two, 64 KiB–16 MiB) |
//! | 16 | 8 | disk size in bytes |
//! | 24 | 8 | entry count (= ⌈disk size / block size⌉) |
//! | 32 | … | records, in block order, covering exactly `count` blocks (below) |
//! | end − 32 | 32 | BLAKE3 of every byte before it |
//!
//! A record is either a run of zero blocks: tag 0, then the run's length in blocks (8 bytes,
//! at least 1; two zero runs never follow each other), or one data block: tag 1, XXH3-128 of
//! the block (16), address (32). A record is never longer than version 1's 49 bytes per block,
//! so an encoded map is never larger than in version 1.
//!
//! # Format, version 1 (still read)
//!
//! The same header (version 1), then exactly `count` entries of 49 bytes: tag (0 zero, 1 data),
//! XXH3-128 (16), address (32); a zero entry has all-zero hash and address fields.
//!
//! The decoder checks every field and the checksum and rejects anything else with an
//! [`Error`](crate::Error): it never panics, and what it allocates is bounded by the input's
//! length (zero runs take no memory).

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use crate::Error;
use crate::scan::BlockEvent;

/// The smallest block size: 64 KiB.
pub const MIN_BLOCK_SIZE: u32 = 64 * 1024;
/// The largest block size: 16 MiB.
pub const MAX_BLOCK_SIZE: u32 = 16 * 1024 * 1024;
/// The default block size: 1 MiB (see `benches/` for the measurements behind it).
pub const DEFAULT_BLOCK_SIZE: u32 = 1024 * 1024;

const MAGIC: &[u8; 8] = b"BWBLKMAP";
/// The block-map format version this crate writes (it reads this one and version 1).
pub const FORMAT_VERSION: u16 = 2;
const HEADER_LEN: usize = 32;
/// A version 1 entry; a version 2 data record.
const ENTRY_LEN: usize = 1 + 16 + 32;
/// A version 2 zero-run record.
const ZERO_RUN_LEN: usize = 1 + 8;
const CHECKSUM_LEN: usize = 32;
const TAG_ZERO: u8 = 0;
const TAG_DATA: u8 = 1;

/// A validated block size: a power of two from [`MIN_BLOCK_SIZE`] to [`MAX_BLOCK_SIZE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockSize(u32);

impl BlockSize {
    /// Validates `bytes` as a block size.
    pub fn new(bytes: u32) -> Result<Self, Error> {
        if bytes.is_power_of_two() && (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bytes) {
            Ok(BlockSize(bytes))
        } else {
            Err(Error::InvalidBlockSize {
                bytes: u64::from(bytes),
            })
        }
    }

    /// The size in bytes.
    pub fn get(self) -> u32 {
        self.0
    }

    /// The size in bytes, as u64 for offset arithmetic.
    pub fn bytes(self) -> u64 {
        u64::from(self.0)
    }

    /// How many blocks a disk of `disk_size` bytes has (the last one may be short).
    pub fn block_count(self, disk_size: u64) -> u64 {
        disk_size.div_ceil(self.bytes())
    }

    /// Length of block `index` of a disk of `disk_size` bytes (the last block may be short;
    /// 0 past the end).
    pub fn block_len(self, disk_size: u64, index: u64) -> u64 {
        let start = index.saturating_mul(self.bytes());
        disk_size.saturating_sub(start).min(self.bytes())
    }
}

impl Default for BlockSize {
    fn default() -> Self {
        BlockSize(DEFAULT_BLOCK_SIZE)
    }
}

impl fmt::Display for BlockSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 >= 1024 * 1024 {
            write!(f, "{} MiB", self.0 / (1024 * 1024))
        } else {
            write!(f, "{} KiB", self.0 / 1024)
        }
    }
}

/// A content address: the BLAKE3 hash (keyed BLAKE3 in an encrypted vault) of a block.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Address(pub [u8; 32]);

impl Address {
    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 15)]));
        }
        s
    }

    /// Parses 64 hex characters.
    pub fn from_hex(s: &str) -> Option<Address> {
        let bytes = s.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            out[i] = (hex_val(pair[0])? << 4) | hex_val(pair[1])?;
        }
        Some(Address(out))
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Address({})", self.to_hex())
    }
}

/// One block of a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// All zero (or a hole): nothing stored, restored as a hole.
    Zero,
    /// Data stored in the vault under `address`.
    Data {
        /// XXH3-128 of the block (seeded per vault), for cheap change detection.
        change: u128,
        /// The content address of the block.
        address: Address,
    },
}

/// One data block of a map: its index and entry fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DataBlock {
    index: u64,
    change: u128,
    address: Address,
}

impl DataBlock {
    fn entry(&self) -> Entry {
        Entry::Data {
            change: self.change,
            address: self.address,
        }
    }
}

/// The complete block map of one disk: every block is zero except the data blocks it lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockMap {
    block_size: BlockSize,
    disk_size: u64,
    /// The data blocks, by increasing index.
    data: Vec<DataBlock>,
}

impl BlockMap {
    /// Makes a block map; `entries` must have exactly one entry per block.
    pub fn new(block_size: BlockSize, disk_size: u64, entries: Vec<Entry>) -> Result<Self, Error> {
        let expected = block_size.block_count(disk_size);
        if entries.len() as u64 != expected {
            return Err(Error::EntryCount {
                expected,
                found: entries.len() as u64,
            });
        }
        let data = entries
            .iter()
            .enumerate()
            .filter_map(|(i, e)| match e {
                Entry::Zero => None,
                Entry::Data { change, address } => Some(DataBlock {
                    index: i as u64,
                    change: *change,
                    address: *address,
                }),
            })
            .collect();
        Ok(BlockMap {
            block_size,
            disk_size,
            data,
        })
    }

    /// The block size.
    pub fn block_size(&self) -> BlockSize {
        self.block_size
    }

    /// The disk size in bytes.
    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    /// How many blocks the disk has (zero and data).
    pub fn block_count(&self) -> u64 {
        self.block_size.block_count(self.disk_size)
    }

    /// Every block's entry, in block order (one item per block: for a walk over the whole
    /// disk; [`BlockMap::data_blocks`] visits only the data).
    pub fn iter(&self) -> impl Iterator<Item = Entry> + '_ {
        let mut data = self.data.iter().peekable();
        (0..self.block_count()).map(move |i| match data.next_if(|d| d.index == i) {
            Some(d) => d.entry(),
            None => Entry::Zero,
        })
    }

    /// The data blocks (index and entry), in block order; every other block is zero.
    pub fn data_blocks(&self) -> impl ExactSizeIterator<Item = (u64, Entry)> + '_ {
        self.data.iter().map(|d| (d.index, d.entry()))
    }

    /// How many of `blocks` are data blocks (the rest are zero), without visiting them.
    pub fn data_in(&self, blocks: Range<u64>) -> u64 {
        let (lo, hi) = self.data_range(blocks);
        (hi - lo) as u64
    }

    /// The positions in `data` of the data blocks with an index in `blocks`.
    fn data_range(&self, blocks: Range<u64>) -> (usize, usize) {
        let lo = self.data.partition_point(|d| d.index < blocks.start);
        let hi = lo + self.data[lo..].partition_point(|d| d.index < blocks.end);
        (lo, hi)
    }

    /// The entry of block `index`, if the disk has that block.
    pub fn entry(&self, index: u64) -> Option<Entry> {
        if index >= self.block_count() {
            return None;
        }
        let i = self.data.partition_point(|d| d.index < index);
        Some(match self.data.get(i) {
            Some(d) if d.index == index => d.entry(),
            _ => Entry::Zero,
        })
    }

    /// Byte offset of block `index`.
    pub fn offset(&self, index: u64) -> u64 {
        index * self.block_size.bytes()
    }

    /// Length of block `index` (the last block may be short).
    pub fn block_len(&self, index: u64) -> u64 {
        self.block_size.block_len(self.disk_size, index)
    }

    /// The addresses this map references, once per data block.
    pub fn addresses(&self) -> impl Iterator<Item = &Address> {
        self.data.iter().map(|d| &d.address)
    }

    /// Encodes the map in the current binary format ([`FORMAT_VERSION`]): one record per data
    /// block and per run of zero blocks.
    pub fn encode(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(HEADER_LEN + (self.data.len() + 1) * (ENTRY_LEN + ZERO_RUN_LEN));
        out.extend_from_slice(&self.header(FORMAT_VERSION));
        let mut at = 0u64;
        for d in &self.data {
            if d.index > at {
                out.push(TAG_ZERO);
                out.extend_from_slice(&(d.index - at).to_le_bytes());
            }
            out.push(TAG_DATA);
            out.extend_from_slice(&d.change.to_le_bytes());
            out.extend_from_slice(&d.address.0);
            at = d.index + 1;
        }
        let count = self.block_count();
        if count > at {
            out.push(TAG_ZERO);
            out.extend_from_slice(&(count - at).to_le_bytes());
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    fn header(&self, version: u16) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(MAGIC);
        h[8..10].copy_from_slice(&version.to_le_bytes());
        h[12..16].copy_from_slice(&self.block_size.get().to_le_bytes());
        h[16..24].copy_from_slice(&self.disk_size.to_le_bytes());
        h[24..32].copy_from_slice(&self.block_count().to_le_bytes());
        h
    }

    /// Decodes and validates a block map (format version 1 or 2). Any malformed input is an
    /// error, never a panic.
    pub fn decode(bytes: &[u8]) -> Result<Self, Error> {
        if bytes.len() < HEADER_LEN + CHECKSUM_LEN {
            return Err(Error::Truncated {
                expected: (HEADER_LEN + CHECKSUM_LEN) as u64,
                found: bytes.len() as u64,
            });
        }
        if &bytes[0..8] != MAGIC {
            return Err(Error::BadMagic);
        }
        let version = u16::from_le_bytes([bytes[8], bytes[9]]);
        if version != 1 && version != FORMAT_VERSION {
            return Err(Error::UnsupportedVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let flags = u16::from_le_bytes([bytes[10], bytes[11]]);
        if flags != 0 {
            return Err(Error::UnknownFlags { flags });
        }
        let block_size = BlockSize::new(u32::from_le_bytes(le_array(&bytes[12..16])))?;
        let disk_size = u64::from_le_bytes(le_array(&bytes[16..24]));
        let count = u64::from_le_bytes(le_array(&bytes[24..32]));
        let expected_count = block_size.block_count(disk_size);
        if count != expected_count {
            return Err(Error::EntryCount {
                expected: expected_count,
                found: count,
            });
        }
        if version == 1 {
            // The length check comes before anything is allocated.
            let expected_len = usize::try_from(count)
                .ok()
                .and_then(|c| c.checked_mul(ENTRY_LEN))
                .and_then(|n| n.checked_add(HEADER_LEN + CHECKSUM_LEN));
            if expected_len != Some(bytes.len()) {
                return Err(Error::Truncated {
                    expected: expected_len.map_or(u64::MAX, |n| n as u64),
                    found: bytes.len() as u64,
                });
            }
        }
        let body_end = bytes.len() - CHECKSUM_LEN;
        if blake3::hash(&bytes[..body_end]).as_bytes() != &bytes[body_end..] {
            return Err(Error::ChecksumMismatch);
        }
        let body = &bytes[HEADER_LEN..body_end];
        let data = if version == 1 {
            decode_v1(body)?
        } else {
            decode_v2(body, count)?
        };
        Ok(BlockMap {
            block_size,
            disk_size,
            data,
        })
    }
}

/// Version 1 entries (their number was checked against the header).
fn decode_v1(body: &[u8]) -> Result<Vec<DataBlock>, Error> {
    let mut data = Vec::new();
    for (i, raw) in body.chunks_exact(ENTRY_LEN).enumerate() {
        match raw[0] {
            TAG_ZERO if raw[1..].iter().all(|&b| b == 0) => {}
            TAG_DATA => data.push(DataBlock {
                index: i as u64,
                change: u128::from_le_bytes(le_array(&raw[1..17])),
                address: Address(le_array(&raw[17..49])),
            }),
            tag => {
                return Err(Error::BadEntry {
                    index: i as u64,
                    tag,
                });
            }
        }
    }
    Ok(data)
}

/// Version 2 records, which must cover exactly `count` blocks. Memory: one entry per data
/// record present in `body`.
fn decode_v2(body: &[u8], count: u64) -> Result<Vec<DataBlock>, Error> {
    let mut data = Vec::new();
    let mut at = 0u64;
    let mut pos = 0usize;
    let mut after_zero_run = false;
    while pos < body.len() {
        let tag = body[pos];
        let index = at;
        let bad = move || Error::BadEntry { index, tag };
        match tag {
            TAG_ZERO => {
                let raw = body.get(pos + 1..pos + ZERO_RUN_LEN).ok_or_else(bad)?;
                let run = u64::from_le_bytes(le_array(raw));
                if run == 0 || after_zero_run || run > count - at {
                    return Err(bad());
                }
                at += run;
                pos += ZERO_RUN_LEN;
                after_zero_run = true;
            }
            TAG_DATA => {
                let raw = body.get(pos..pos + ENTRY_LEN).ok_or_else(bad)?;
                if at >= count {
                    return Err(bad());
                }
                data.push(DataBlock {
                    index: at,
                    change: u128::from_le_bytes(le_array(&raw[1..17])),
                    address: Address(le_array(&raw[17..49])),
                });
                at += 1;
                pos += ENTRY_LEN;
                after_zero_run = false;
            }
            _ => return Err(bad()),
        }
    }
    if at != count {
        return Err(Error::EntryCount {
            expected: count,
            found: at,
        });
    }
    Ok(data)
}

/// Builds a [`BlockMap`] block by block, or run by run: a scan's events in order
/// ([`BlockMapBuilder::push_event`]), zero runs, and runs of blocks carried over from the
/// previous map in bulk (a slice copy of its data blocks in the run, however long the run).
#[derive(Debug)]
pub struct BlockMapBuilder {
    block_size: BlockSize,
    disk_size: u64,
    count: u64,
    /// The next block to add.
    next: u64,
    data: Vec<DataBlock>,
    previous: Option<Arc<BlockMap>>,
}

impl BlockMapBuilder {
    /// A builder for a disk of `disk_size` bytes; `previous` is the map that carried-over runs
    /// come from (see [`crate::scan_tracked`]).
    pub fn new(block_size: BlockSize, disk_size: u64, previous: Option<Arc<BlockMap>>) -> Self {
        BlockMapBuilder {
            block_size,
            disk_size,
            count: block_size.block_count(disk_size),
            next: 0,
            data: Vec::new(),
            previous,
        }
    }

    /// Checks that `blocks` are the next blocks, within the disk.
    fn expect(&self, blocks: &Range<u64>) -> Result<(), Error> {
        if blocks.start != self.next || blocks.end < blocks.start {
            return Err(Error::OutOfOrder {
                expected: self.next,
                found: blocks.start,
            });
        }
        if blocks.end > self.count {
            return Err(Error::EntryCount {
                expected: self.count,
                found: blocks.end,
            });
        }
        Ok(())
    }

    /// Adds the entry of the next block.
    pub fn push(&mut self, entry: Entry) -> Result<(), Error> {
        self.expect(&(self.next..self.next + 1))?;
        if let Entry::Data { change, address } = entry {
            self.data.push(DataBlock {
                index: self.next,
                change,
                address,
            });
        }
        self.next += 1;
        Ok(())
    }

    /// Adds `blocks` (the next ones) as zero blocks.
    pub fn push_zeros(&mut self, blocks: Range<u64>) -> Result<(), Error> {
        self.expect(&blocks)?;
        self.next = blocks.end;
        Ok(())
    }

    /// Adds `blocks` (the next ones) with the previous map's entries: a copy of its data
    /// blocks in the run, never a visit of each block.
    pub fn carry(&mut self, blocks: Range<u64>) -> Result<(), Error> {
        self.expect(&blocks)?;
        let prev = self
            .previous
            .as_ref()
            .filter(|p| p.block_size == self.block_size && blocks.end <= p.block_count())
            .ok_or(Error::CarryOutside {
                start: blocks.start,
                end: blocks.end,
            })?;
        let (lo, hi) = prev.data_range(blocks.clone());
        self.data.extend_from_slice(&prev.data[lo..hi]);
        self.next = blocks.end;
        Ok(())
    }

    /// Adds what a scan event says of its blocks (they must be the next ones).
    pub fn push_event(&mut self, event: &BlockEvent) -> Result<(), Error> {
        match event {
            BlockEvent::Zero { blocks, .. } => self.push_zeros(blocks.clone()),
            BlockEvent::Carried { blocks } => self.carry(blocks.clone()),
            BlockEvent::Unchanged { index, entry } => {
                self.expect(&(*index..index + 1))?;
                self.push(*entry)
            }
            BlockEvent::Changed {
                index,
                change,
                address,
                ..
            } => {
                self.expect(&(*index..index + 1))?;
                self.push(Entry::Data {
                    change: *change,
                    address: *address,
                })
            }
        }
    }

    /// The map, once every block has been added.
    pub fn finish(self) -> Result<BlockMap, Error> {
        if self.next != self.count {
            return Err(Error::EntryCount {
                expected: self.count,
                found: self.next,
            });
        }
        Ok(BlockMap {
            block_size: self.block_size,
            disk_size: self.disk_size,
            data: self.data,
        })
    }
}

fn le_array<const N: usize>(s: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&s[..N]);
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> BlockMap {
        let bs = BlockSize::new(MIN_BLOCK_SIZE).unwrap();
        let disk = 3 * bs.bytes() + 100;
        let entries = vec![
            Entry::Zero,
            Entry::Data {
                change: 7,
                address: Address([1; 32]),
            },
            Entry::Zero,
            Entry::Data {
                change: u128::MAX,
                address: Address([0xab; 32]),
            },
        ];
        BlockMap::new(bs, disk, entries).unwrap()
    }

    #[test]
    fn round_trip() {
        let m = sample();
        assert_eq!(BlockMap::decode(&m.encode()).unwrap(), m);
        assert_eq!(m.block_len(3), 100);
        assert_eq!(m.block_len(0), u64::from(MIN_BLOCK_SIZE));
    }

    #[test]
    fn empty_disk_round_trips() {
        let m = BlockMap::new(BlockSize::default(), 0, vec![]).unwrap();
        assert_eq!(BlockMap::decode(&m.encode()).unwrap(), m);
    }

    #[test]
    fn block_size_bounds() {
        assert!(BlockSize::new(32 * 1024).is_err());
        assert!(BlockSize::new(3 * 1024 * 1024).is_err());
        assert!(BlockSize::new(32 * 1024 * 1024).is_err());
        assert!(BlockSize::new(MAX_BLOCK_SIZE).is_ok());
    }

    #[test]
    fn every_truncation_is_rejected() {
        let bytes = sample().encode();
        for len in 0..bytes.len() {
            assert!(
                BlockMap::decode(&bytes[..len]).is_err(),
                "accepted a prefix of {len}"
            );
        }
    }

    #[test]
    fn unknown_version_is_named() {
        let mut bytes = sample().encode();
        bytes[8] = 9;
        let err = BlockMap::decode(&bytes).unwrap_err();
        assert!(
            matches!(err, Error::UnsupportedVersion { found: 9, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("version 9"), "{err}");
    }

    #[test]
    fn huge_count_is_rejected_without_allocating() {
        let mut bytes = sample().encode();
        bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        bytes[24..32].copy_from_slice(&(u64::MAX / u64::from(MIN_BLOCK_SIZE) + 1).to_le_bytes());
        assert!(BlockMap::decode(&bytes).is_err());
    }

    #[test]
    fn address_hex_round_trip() {
        let a = Address([0x5a; 32]);
        assert_eq!(Address::from_hex(&a.to_hex()), Some(a));
        assert_eq!(Address::from_hex("zz"), None);
        assert_eq!(Address::from_hex(&"G".repeat(64)), None);
    }

    fn arb_map() -> impl Strategy<Value = BlockMap> {
        (0u32..=8, 0u64..(40 * 64 * 1024)).prop_flat_map(|(shift, disk)| {
            let bs = BlockSize::new(MIN_BLOCK_SIZE << shift).unwrap();
            let n = bs.block_count(disk) as usize;
            let entry = prop_oneof![
                Just(Entry::Zero),
                (any::<u128>(), any::<[u8; 32]>()).prop_map(|(c, a)| Entry::Data {
                    change: c,
                    address: Address(a)
                }),
            ];
            proptest::collection::vec(entry, n)
                .prop_map(move |entries| BlockMap::new(bs, disk, entries).unwrap())
        })
    }

    /// Version 1, as earlier builds wrote it.
    fn encode_v1(m: &BlockMap) -> Vec<u8> {
        let mut out = m.header(1).to_vec();
        for e in m.iter() {
            match e {
                Entry::Zero => out.extend_from_slice(&[0u8; ENTRY_LEN]),
                Entry::Data { change, address } => {
                    out.push(TAG_DATA);
                    out.extend_from_slice(&change.to_le_bytes());
                    out.extend_from_slice(&address.0);
                }
            }
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// A version 2 map of `blocks` 64 KiB blocks with `body` as its records, checksummed.
    fn v2_with_body(blocks: u64, body: &[u8]) -> Vec<u8> {
        let bs = BlockSize::new(MIN_BLOCK_SIZE).unwrap();
        let m = BlockMap::new(bs, blocks * bs.bytes(), vec![Entry::Zero; blocks as usize]).unwrap();
        let mut out = m.header(FORMAT_VERSION).to_vec();
        out.extend_from_slice(body);
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    fn zero_run(n: u64) -> Vec<u8> {
        let mut r = vec![TAG_ZERO];
        r.extend_from_slice(&n.to_le_bytes());
        r
    }

    #[test]
    fn v2_records_are_checked() {
        let data = {
            let mut d = vec![TAG_DATA];
            d.extend_from_slice(&[7u8; 48]);
            d
        };
        assert!(BlockMap::decode(&v2_with_body(3, &zero_run(3))).is_ok());
        assert!(BlockMap::decode(&v2_with_body(3, &[zero_run(2), data.clone()].concat())).is_ok());
        for (what, body) in [
            (
                "two zero runs in a row",
                [zero_run(1), zero_run(2)].concat(),
            ),
            ("an empty zero run", [zero_run(0), zero_run(3)].concat()),
            ("a run past the disk", zero_run(4)),
            ("too few blocks", zero_run(2)),
            ("data past the disk", [zero_run(3), data.clone()].concat()),
            ("a cut record", zero_run(3)[..5].to_vec()),
            (
                "a cut data record",
                [zero_run(2), data[..20].to_vec()].concat(),
            ),
            ("an unknown tag", [vec![2u8], zero_run(3)].concat()),
        ] {
            assert!(
                BlockMap::decode(&v2_with_body(3, &body)).is_err(),
                "accepted {what}"
            );
        }
    }

    #[test]
    fn a_huge_sparse_map_is_as_small_as_its_data() {
        // 1 TiB in 1 MiB blocks (1 M blocks), 64 of them data: 64 entries in memory, one
        // record per data block and zero run on disk. Per-block encoding would be 49 MiB.
        let bs = BlockSize::default();
        let size = 1u64 << 40;
        let mut b = BlockMapBuilder::new(bs, size, None);
        for i in 0..64u64 {
            b.push_zeros(b.next..i * 16_000).unwrap();
            b.push(Entry::Data {
                change: u128::from(i),
                address: Address([i as u8; 32]),
            })
            .unwrap();
        }
        b.push_zeros(b.next..bs.block_count(size)).unwrap();
        let m = b.finish().unwrap();
        assert_eq!(m.block_count(), 1 << 20);
        assert_eq!(m.data_blocks().len(), 64);
        let bytes = m.encode();
        assert!(
            bytes.len() <= 32 + 64 * 49 + 65 * 9 + 32,
            "{} bytes",
            bytes.len()
        );
        assert_eq!(BlockMap::decode(&bytes).unwrap(), m);
        assert_eq!(m.data_in(16_000..32_001), 2);
        assert_eq!(
            m.entry(16_000),
            Some(Entry::Data {
                change: 1,
                address: Address([1; 32])
            })
        );
        assert_eq!(m.entry(16_001), Some(Entry::Zero));
        assert_eq!(m.entry(1 << 20), None);
    }

    #[test]
    fn builder_refuses_what_does_not_fit() {
        let bs = BlockSize::new(MIN_BLOCK_SIZE).unwrap();
        let prev = Arc::new(sample());
        let mut b = BlockMapBuilder::new(bs, 10 * bs.bytes(), Some(prev));
        assert!(matches!(
            b.push_zeros(1..2),
            Err(Error::OutOfOrder {
                expected: 0,
                found: 1
            })
        ));
        assert!(matches!(b.carry(0..5), Err(Error::CarryOutside { .. })));
        b.carry(0..4).unwrap();
        assert!(b.push_zeros(4..11).is_err());
        b.push_zeros(4..9).unwrap();
        assert!(matches!(
            b.finish(),
            Err(Error::EntryCount {
                expected: 10,
                found: 9
            })
        ));
        let mut none = BlockMapBuilder::new(bs, 10 * bs.bytes(), None);
        assert!(none.carry(0..1).is_err());
    }

    /// A new map of `n` blocks cut into segments: carried from the previous map, zero, or new
    /// data.
    fn arb_segments() -> impl Strategy<Value = Vec<(u8, u64, u128)>> {
        proptest::collection::vec((0u8..3, 1u64..12, any::<u128>()), 0..12)
    }

    proptest! {
        /// Carrying runs in bulk gives exactly the map that copying the previous entries
        /// block by block gives.
        #[test]
        fn prop_carry_is_block_by_block(prev in arb_map(), segments in arb_segments()) {
            let prev = Arc::new(prev);
            let bs = prev.block_size();
            let blocks: u64 = segments.iter().map(|s| s.1).sum();
            let size = blocks * bs.bytes();
            let mut runs = BlockMapBuilder::new(bs, size, Some(prev.clone()));
            let mut reference = Vec::new();
            let mut at = 0u64;
            for &(kind, len, change) in &segments {
                let blocks = at..at + len;
                match kind {
                    0 if blocks.end <= prev.block_count() => {
                        runs.carry(blocks.clone()).unwrap();
                        reference.extend(blocks.clone().map(|i| prev.entry(i).unwrap()));
                    }
                    0 | 1 => {
                        runs.push_zeros(blocks.clone()).unwrap();
                        reference.extend(blocks.clone().map(|_| Entry::Zero));
                    }
                    _ => for _ in blocks.clone() {
                        let e = Entry::Data { change, address: Address([len as u8; 32]) };
                        runs.push(e).unwrap();
                        reference.push(e);
                    },
                }
                at = blocks.end;
            }
            let runs = runs.finish().unwrap();
            let reference = BlockMap::new(bs, size, reference).unwrap();
            prop_assert_eq!(runs.iter().collect::<Vec<_>>(), reference.iter().collect::<Vec<_>>());
            prop_assert_eq!(runs.encode(), reference.encode());
            prop_assert_eq!(&runs, &reference);
        }

        #[test]
        fn prop_version_1_still_decodes(m in arb_map()) {
            prop_assert_eq!(BlockMap::decode(&encode_v1(&m)).unwrap(), m.clone());
            prop_assert!(m.encode().len() <= encode_v1(&m).len());
        }

        #[test]
        fn prop_round_trip(m in arb_map()) {
            prop_assert_eq!(BlockMap::decode(&m.encode()).unwrap(), m);
        }

        #[test]
        fn prop_any_single_byte_flip_is_detected(m in arb_map(), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut bytes = m.encode();
            let i = pos.index(bytes.len());
            bytes[i] ^= 1 << bit;
            prop_assert!(BlockMap::decode(&bytes).is_err());
        }

        #[test]
        fn prop_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = BlockMap::decode(&bytes);
        }

        #[test]
        fn prop_valid_header_random_body_never_panics(m in arb_map(), junk in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut bytes = m.encode();
            let keep = bytes.len().min(32);
            bytes.truncate(keep);
            bytes.extend_from_slice(&junk);
            let _ = BlockMap::decode(&bytes);
        }
    }
}
