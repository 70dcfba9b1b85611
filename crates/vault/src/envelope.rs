//! The envelope every vault object (block, manifest, point) is stored in.
//!
//! # Format, version 1
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `BWOB` |
//! | 4 | 1 | envelope version (1) |
//! | 5 | 1 | kind: 1 block, 2 manifest, 3 point |
//! | 6 | 1 | flags: bit 0 = payload is zstd-compressed; other bits reserved (0) |
//! | 7 | 1 | reserved (0) |
//! | 8 | 8 | plain length (little-endian) |
//! | 16 | 32 | BLAKE3 of the plain content |
//! | 48 | … | payload |
//!
//! For a block the digest is its content address, so a block stored under the wrong key, or
//! corrupted in any way, fails to open. Decoding checks every field, bounds the plain length
//! before decompressing, and compares the digest: a mismatch is an error, never wrong bytes.
//!
//! ## Encrypted objects (flag bit 1)
//!
//! In an encrypted vault the flags have bit 1 set, the digest is the *keyed* BLAKE3 of the
//! plain content (see [`crate::crypto`]), and the payload is `nonce (24) ‖ XChaCha20-Poly1305
//! ciphertext of the (compressed) content ‖ tag (16)`, authenticated together with the 48
//! header bytes and the object's key. The format version stays 1: unencrypted objects are
//! byte-for-byte what they were, and an older build refuses an encrypted one (unknown flag)
//! instead of misreading it.

use crate::Error;
use crate::crypto::ObjectCipher;
use bulwark_blockdiff::buffers::{AlignedBuf, Pool};

const MAGIC: &[u8; 4] = b"BWOB";
const VERSION: u8 = 1;
const HEADER_LEN: usize = 48;
const FLAG_ZSTD: u8 = 1;
const FLAG_ENCRYPTED: u8 = 2;

/// What an object holds; stored in its header so that one kind is never read as another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A disk block.
    Block = 1,
    /// A block map.
    Manifest = 2,
    /// A recovery point.
    Point = 3,
}

impl Kind {
    /// The largest plain content this kind may have: a bound checked before decompressing.
    fn max_plain_len(self) -> u64 {
        match self {
            Kind::Block => u64::from(bulwark_blockdiff::MAX_BLOCK_SIZE),
            // 49 bytes per block: 1 GiB covers a 20 TiB disk at 1 MiB blocks.
            Kind::Manifest => 1 << 30,
            Kind::Point => 16 << 20,
        }
    }

    /// The largest stored object of this kind a Bulwark writer produces: the header, the
    /// encryption overhead and at most `max_plain_len` of payload (a compressed payload is
    /// kept only when it is smaller than the plain content). Reads refuse anything larger
    /// before downloading it (see [`crate::bounded`]).
    pub(crate) fn max_stored_len(self) -> u64 {
        stored_len_for(self.max_plain_len())
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Block => "block",
            Kind::Manifest => "manifest",
            Kind::Point => "point",
        }
    }
}

/// Nonce and tag of an encrypted payload.
const ENCRYPTION_OVERHEAD: u64 = 24 + 16;

/// The largest stored object whose plain content is at most `plain` bytes.
pub(crate) fn stored_len_for(plain: u64) -> u64 {
    plain.saturating_add(HEADER_LEN as u64 + ENCRYPTION_OVERHEAD)
}

/// The result of sealing: the stored bytes and the digest of the plain content.
#[derive(Debug)]
pub struct Sealed {
    /// The bytes to store.
    pub bytes: Vec<u8>,
    /// BLAKE3 of the plain content.
    pub digest: [u8; 32],
}

/// Seals `plain` as an object of `kind`, zstd-compressed at `level` unless that does not make
/// it smaller (then stored raw). `digest` is the BLAKE3 of `plain` when the caller knows it.
pub fn seal(kind: Kind, plain: &[u8], level: Option<i32>, digest: Option<[u8; 32]>) -> Sealed {
    let digest = digest.unwrap_or_else(|| *blake3::hash(plain).as_bytes());
    let compressed = level
        .and_then(|l| compress(plain, l))
        .filter(|c| c.len() < plain.len());
    let (flags, payload): (u8, &[u8]) = match &compressed {
        Some(c) => (FLAG_ZSTD, c),
        None => (0, plain),
    };
    let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
    bytes.extend_from_slice(MAGIC);
    bytes.push(VERSION);
    bytes.push(kind as u8);
    bytes.push(flags);
    bytes.push(0);
    bytes.extend_from_slice(&(plain.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&digest);
    bytes.extend_from_slice(payload);
    Sealed { bytes, digest }
}

/// Seals `plain` as an encrypted object to be stored under `key`: compressed like [`seal`],
/// then encrypted with the header and `key` as associated data. `digest` is the keyed BLAKE3
/// of `plain` when the caller knows it (a block's address).
pub fn seal_encrypted(
    kind: Kind,
    key: &str,
    plain: &[u8],
    level: Option<i32>,
    digest: Option<[u8; 32]>,
    cipher: &ObjectCipher,
) -> Result<Sealed, Error> {
    let digest = digest.unwrap_or_else(|| cipher.digest(plain));
    let compressed = level
        .and_then(|l| compress(plain, l))
        .filter(|c| c.len() < plain.len());
    let (flags, payload): (u8, &[u8]) = match &compressed {
        Some(c) => (FLAG_ZSTD | FLAG_ENCRYPTED, c),
        None => (FLAG_ENCRYPTED, plain),
    };
    let mut bytes = Vec::with_capacity(HEADER_LEN + 24 + payload.len() + 16);
    bytes.extend_from_slice(MAGIC);
    bytes.push(VERSION);
    bytes.push(kind as u8);
    bytes.push(flags);
    bytes.push(0);
    bytes.extend_from_slice(&(plain.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&digest);
    let aad = associated_data(&bytes, key);
    let sealed = cipher.seal(payload, &aad).ok_or_else(|| Error::Corrupt {
        key: key.to_string(),
        why: "encryption failed".into(),
    })?;
    bytes.extend_from_slice(&sealed);
    Ok(Sealed { bytes, digest })
}

fn associated_data(header: &[u8], key: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(HEADER_LEN + key.len());
    aad.extend_from_slice(&header[..HEADER_LEN]);
    aad.extend_from_slice(key.as_bytes());
    aad
}

fn compress(plain: &[u8], level: i32) -> Option<Vec<u8>> {
    thread_local! {
        static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = zstd::bulk::Compressor::new(level).ok();
        }
        let comp = c.as_mut()?;
        comp.set_compression_level(level).ok()?;
        comp.compress(plain).ok()
    })
}

/// Opens an object read from `key`: checks the header, decompresses within the kind's bound and
/// verifies the digest. Returns the plain content and its digest.
pub fn open(kind: Kind, key: &str, bytes: &[u8]) -> Result<(Vec<u8>, [u8; 32]), Error> {
    open_with(kind, key, bytes, None)
}

/// Like [`open`], for a vault that may be encrypted: with `cipher`, the object must be
/// encrypted (an unencrypted object in an encrypted vault is refused), is decrypted with `key`
/// as associated data, and its digest is checked as keyed BLAKE3.
pub fn open_with(
    kind: Kind,
    key: &str,
    bytes: &[u8],
    cipher: Option<&ObjectCipher>,
) -> Result<(Vec<u8>, [u8; 32]), Error> {
    let p = parse(kind, key, bytes, cipher)?;
    let plain = if p.compressed {
        let plain = zstd::bulk::decompress(&p.payload, p.plain_len as usize)
            .map_err(|e| corrupt(key, format!("payload does not decompress: {e}")))?;
        check_len(key, plain.len(), p.plain_len)?;
        plain
    } else {
        check_stored_len(key, p.payload.len(), p.plain_len)?;
        p.payload.into_owned()
    };
    check_digest(key, &plain, &p.digest, cipher)?;
    Ok((plain, p.digest))
}

/// Like [`open_with`], with the plaintext in a page-aligned buffer from `pool` (for direct
/// writes without a copy).
pub(crate) fn open_aligned(
    kind: Kind,
    key: &str,
    bytes: &[u8],
    cipher: Option<&ObjectCipher>,
    pool: &std::sync::Arc<Pool>,
) -> Result<(AlignedBuf, [u8; 32]), Error> {
    let p = parse(kind, key, bytes, cipher)?;
    let mut buf = pool.take(p.plain_len as usize);
    if p.compressed {
        let n = zstd::bulk::Decompressor::new()
            .and_then(|mut d| d.decompress_to_buffer(&p.payload, &mut Out(&mut buf)))
            .map_err(|e| corrupt(key, format!("payload does not decompress: {e}")))?;
        check_len(key, n, p.plain_len)?;
    } else {
        check_stored_len(key, p.payload.len(), p.plain_len)?;
        buf.extend_from_slice(&p.payload);
    }
    check_digest(key, buf.as_ref(), &p.digest, cipher)?;
    Ok((buf, p.digest))
}

/// zstd's view of an [`AlignedBuf`]: it decompresses into the spare capacity.
struct Out<'a>(&'a mut AlignedBuf);

// SAFETY: zstd writes at most `capacity()` bytes from `as_mut_ptr()` and then reports how many
// it initialised through `filled_until`; `as_slice` only exposes the initialised prefix.
unsafe impl zstd::zstd_safe::WriteBuf for Out<'_> {
    fn as_slice(&self) -> &[u8] {
        self.0.as_ref()
    }
    fn capacity(&self) -> usize {
        self.0.capacity()
    }
    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.0.as_mut_ptr()
    }
    unsafe fn filled_until(&mut self, n: usize) {
        // SAFETY: zstd initialised the first `n <= capacity()` bytes (its contract above).
        unsafe { self.0.set_len(n) }
    }
}

fn corrupt(key: &str, why: String) -> Error {
    Error::Corrupt {
        key: key.to_string(),
        why,
    }
}

fn check_len(key: &str, got: usize, plain_len: u64) -> Result<(), Error> {
    if got as u64 != plain_len {
        return Err(corrupt(
            key,
            format!("payload decompresses to {got} bytes, header says {plain_len}"),
        ));
    }
    Ok(())
}

fn check_stored_len(key: &str, got: usize, plain_len: u64) -> Result<(), Error> {
    if got as u64 != plain_len {
        return Err(corrupt(
            key,
            format!("payload is {got} bytes, header says {plain_len} (truncated?)"),
        ));
    }
    Ok(())
}

fn check_digest(
    key: &str,
    plain: &[u8],
    digest: &[u8; 32],
    cipher: Option<&ObjectCipher>,
) -> Result<(), Error> {
    let actual = match cipher {
        Some(c) => c.digest(plain),
        None => *blake3::hash(plain).as_bytes(),
    };
    if &actual != digest {
        return Err(corrupt(key, "content does not match its digest".into()));
    }
    Ok(())
}

/// A checked header and the (decrypted) payload.
struct Parsed<'a> {
    compressed: bool,
    plain_len: u64,
    digest: [u8; 32],
    payload: std::borrow::Cow<'a, [u8]>,
}

fn parse<'a>(
    kind: Kind,
    key: &str,
    bytes: &'a [u8],
    cipher: Option<&ObjectCipher>,
) -> Result<Parsed<'a>, Error> {
    let corrupt = |why: String| corrupt(key, why);
    if bytes.len() < HEADER_LEN {
        return Err(corrupt(format!(
            "object is truncated: {} bytes, shorter than the {HEADER_LEN}-byte header",
            bytes.len()
        )));
    }
    if &bytes[0..4] != MAGIC {
        return Err(corrupt("not a Bulwark object (bad magic)".into()));
    }
    if bytes[4] != VERSION {
        return Err(Error::UnsupportedObjectVersion {
            key: key.to_string(),
            found: bytes[4],
        });
    }
    if bytes[5] != kind as u8 {
        return Err(corrupt(format!(
            "object kind {} where a {} was expected",
            bytes[5],
            kind.name()
        )));
    }
    let flags = bytes[6];
    if flags & !(FLAG_ZSTD | FLAG_ENCRYPTED) != 0 || bytes[7] != 0 {
        return Err(corrupt(format!("unknown flags {flags:#04x}")));
    }
    let encrypted = flags & FLAG_ENCRYPTED != 0;
    match (encrypted, cipher) {
        (true, None) => {
            return Err(corrupt(
                "object is encrypted but the vault was opened without a key".into(),
            ));
        }
        (false, Some(_)) => {
            return Err(corrupt(
                "object is not encrypted in an encrypted vault (replaced?)".into(),
            ));
        }
        _ => {}
    }
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&bytes[8..16]);
    let plain_len = u64::from_le_bytes(len8);
    if plain_len > kind.max_plain_len() {
        return Err(corrupt(format!(
            "plain length {plain_len} exceeds the {} limit of {}",
            kind.name(),
            kind.max_plain_len()
        )));
    }
    let mut digest = [0u8; 32];
    digest.copy_from_slice(&bytes[16..48]);
    let payload = match cipher {
        Some(c) => {
            let decrypted = c
                .open(&bytes[HEADER_LEN..], &associated_data(bytes, key))
                .ok_or_else(|| {
                    corrupt(
                        "does not decrypt: modified, truncated, moved from another key, or \
                         sealed with another key"
                            .into(),
                    )
                })?;
            std::borrow::Cow::Owned(decrypted)
        }
        None => std::borrow::Cow::Borrowed(&bytes[HEADER_LEN..]),
    };
    Ok(Parsed {
        compressed: flags & FLAG_ZSTD != 0,
        plain_len,
        digest,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn seal_open_round_trip_compressed_and_raw() {
        let text = b"hello hello hello hello hello hello hello hello".repeat(100);
        let s = seal(Kind::Manifest, &text, Some(1), None);
        assert!(
            s.bytes.len() < text.len(),
            "compressible content is compressed"
        );
        assert_eq!(open(Kind::Manifest, "k", &s.bytes).unwrap().0, text);

        let noise: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let s = seal(Kind::Block, &noise, Some(1), None);
        assert_eq!(open(Kind::Block, "k", &s.bytes).unwrap().0, noise);
    }

    #[test]
    fn wrong_kind_and_version_are_errors() {
        let s = seal(Kind::Point, b"{}", None, None);
        let e = open(Kind::Block, "points/x", &s.bytes).unwrap_err();
        assert!(e.to_string().contains("points/x"), "{e}");
        let mut b = s.bytes.clone();
        b[4] = 7;
        assert!(matches!(
            open(Kind::Point, "k", &b),
            Err(Error::UnsupportedObjectVersion { found: 7, .. })
        ));
    }

    #[test]
    fn oversized_plain_length_is_rejected_before_decompressing() {
        let mut s = seal(Kind::Block, &[1u8; 100_000], Some(1), None).bytes;
        s[8..16].copy_from_slice(&(u64::MAX).to_le_bytes());
        let e = open(Kind::Block, "k", &s).unwrap_err();
        assert!(e.to_string().contains("exceeds"), "{e}");
    }

    #[test]
    fn encrypted_round_trip_binds_key_and_refuses_mixing() {
        let c = crate::crypto::MasterKey::generate().cipher();
        let data = b"secret secret secret secret secret".repeat(50);
        let s = seal_encrypted(Kind::Block, "blocks/aa/x", &data, Some(1), None, &c).unwrap();
        assert!(!s.bytes.windows(6).any(|w| w == b"secret"), "no plain text");
        assert_eq!(
            open_with(Kind::Block, "blocks/aa/x", &s.bytes, Some(&c))
                .unwrap()
                .0,
            data
        );
        let e = open_with(Kind::Block, "blocks/aa/y", &s.bytes, Some(&c)).unwrap_err();
        assert!(
            e.to_string()
                .contains("blocks/aa/y: corrupt: does not decrypt"),
            "{e}"
        );
        assert!(open_with(Kind::Block, "blocks/aa/x", &s.bytes, None).is_err());
        let other = crate::crypto::MasterKey::generate().cipher();
        assert!(open_with(Kind::Block, "blocks/aa/x", &s.bytes, Some(&other)).is_err());
        let plain = seal(Kind::Block, &data, Some(1), None);
        assert!(open_with(Kind::Block, "k", &plain.bytes, Some(&c)).is_err());
    }

    proptest! {
        #[test]
        fn prop_encrypted_flip_or_truncation_is_detected(
            data in proptest::collection::vec(any::<u8>(), 1..2000),
            pos in any::<prop::sample::Index>(),
            bit in 0u8..8,
            cut in any::<prop::sample::Index>(),
        ) {
            let c = crate::crypto::MasterKey::from_bytes([9; 32]).cipher();
            let s = seal_encrypted(Kind::Manifest, "m", &data, Some(3), None, &c).unwrap().bytes;
            let mut flipped = s.clone();
            let i = pos.index(flipped.len());
            flipped[i] ^= 1 << bit;
            prop_assert!(open_with(Kind::Manifest, "m", &flipped, Some(&c)).is_err());
            let n = cut.index(s.len());
            prop_assert!(open_with(Kind::Manifest, "m", &s[..n], Some(&c)).is_err());
        }
    }

    proptest! {
        #[test]
        fn prop_any_flip_or_truncation_is_detected(
            data in proptest::collection::vec(any::<u8>(), 1..3000),
            compress in any::<bool>(),
            pos in any::<prop::sample::Index>(),
            bit in 0u8..8,
            cut in any::<prop::sample::Index>(),
        ) {
            let s = seal(Kind::Block, &data, compress.then_some(3), None).bytes;
            let mut flipped = s.clone();
            let i = pos.index(flipped.len());
            flipped[i] ^= 1 << bit;
            prop_assert!(open(Kind::Block, "k", &flipped).is_err());
            let c = cut.index(s.len());
            prop_assert!(open(Kind::Block, "k", &s[..c]).is_err());
            prop_assert_eq!(open(Kind::Block, "k", &s).unwrap().0, data);
        }

        #[test]
        fn prop_random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = open(Kind::Manifest, "k", &bytes);
        }
    }
}
