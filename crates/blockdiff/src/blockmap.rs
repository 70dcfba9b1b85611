//! The block map (manifest) of one disk at one recovery point, and its binary format.
//!
//! A block map is complete (a synthetic full): it lists every block of the disk, so a restore
//! reads one block map, never a chain of deltas.
//!
//! # Format, version 1 (all integers little-endian)
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `BWBLKMAP` |
//! | 8 | 2 | format version (1) |
//! | 10 | 2 | flags (reserved, 0) |
//! | 12 | 4 | block size in bytes (power of two, 64 KiB–16 MiB) |
//! | 16 | 8 | disk size in bytes |
//! | 24 | 8 | entry count (= ⌈disk size / block size⌉) |
//! | 32 | 49 × count | entries: tag (0 zero, 1 data), XXH3-128 of the block (16), address (32) |
//! | end − 32 | 32 | BLAKE3 of every byte before it |
//!
//! A zero entry has all-zero hash and address fields. The decoder checks every field and the
//! checksum and rejects anything else with an [`Error`](crate::Error): it never panics.

use std::fmt;

use crate::Error;

/// The smallest block size: 64 KiB.
pub const MIN_BLOCK_SIZE: u32 = 64 * 1024;
/// The largest block size: 16 MiB.
pub const MAX_BLOCK_SIZE: u32 = 16 * 1024 * 1024;
/// The default block size: 1 MiB (see `benches/` for the measurements behind it).
pub const DEFAULT_BLOCK_SIZE: u32 = 1024 * 1024;

const MAGIC: &[u8; 8] = b"BWBLKMAP";
/// The newest block-map format version this crate writes and reads.
pub const FORMAT_VERSION: u16 = 1;
const HEADER_LEN: usize = 32;
const ENTRY_LEN: usize = 1 + 16 + 32;
const CHECKSUM_LEN: usize = 32;

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

/// The complete block map of one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockMap {
    block_size: BlockSize,
    disk_size: u64,
    entries: Vec<Entry>,
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
        Ok(BlockMap {
            block_size,
            disk_size,
            entries,
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

    /// The entries, one per block.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The entry of block `index`, if the disk has that block.
    pub fn entry(&self, index: u64) -> Option<&Entry> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.entries.get(i))
    }

    /// Byte offset of block `index`.
    pub fn offset(&self, index: u64) -> u64 {
        index * self.block_size.bytes()
    }

    /// Length of block `index` (the last block may be short).
    pub fn block_len(&self, index: u64) -> u64 {
        self.block_size.block_len(self.disk_size, index)
    }

    /// The distinct addresses this map references.
    pub fn addresses(&self) -> impl Iterator<Item = &Address> {
        self.entries.iter().filter_map(|e| match e {
            Entry::Data { address, .. } => Some(address),
            Entry::Zero => None,
        })
    }

    /// Encodes the map in the current binary format.
    pub fn encode(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(HEADER_LEN + self.entries.len() * ENTRY_LEN + CHECKSUM_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&self.block_size.get().to_le_bytes());
        out.extend_from_slice(&self.disk_size.to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for e in &self.entries {
            match e {
                Entry::Zero => out.extend_from_slice(&[0u8; ENTRY_LEN]),
                Entry::Data { change, address } => {
                    out.push(1);
                    out.extend_from_slice(&change.to_le_bytes());
                    out.extend_from_slice(&address.0);
                }
            }
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// Decodes and validates a block map. Any malformed input is an error, never a panic.
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
        if version != FORMAT_VERSION {
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
        // The length check comes before any allocation sized by the header.
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
        let body_end = bytes.len() - CHECKSUM_LEN;
        if blake3::hash(&bytes[..body_end]).as_bytes() != &bytes[body_end..] {
            return Err(Error::ChecksumMismatch);
        }
        let mut entries = Vec::with_capacity(expected_count as usize);
        for (i, raw) in bytes[HEADER_LEN..body_end]
            .chunks_exact(ENTRY_LEN)
            .enumerate()
        {
            let entry = match raw[0] {
                0 if raw[1..].iter().all(|&b| b == 0) => Entry::Zero,
                1 => Entry::Data {
                    change: u128::from_le_bytes(le_array(&raw[1..17])),
                    address: Address(le_array(&raw[17..49])),
                },
                tag => {
                    return Err(Error::BadEntry {
                        index: i as u64,
                        tag,
                    });
                }
            };
            entries.push(entry);
        }
        Ok(BlockMap {
            block_size,
            disk_size,
            entries,
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

    proptest! {
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
