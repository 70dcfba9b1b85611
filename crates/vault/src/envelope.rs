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
//!
//! ## Block payloads: one zstd frame per 128 KiB
//!
//! A compressed block's payload is a sequence of independent zstd frames, one for each
//! [`FRAME_LEN`] bytes of the block, each with its content size and zstd's content checksum
//! (the low 32 bits of XXH64). Any zstd decoder reads concatenated frames as one stream, so the
//! format is unchanged for readers (blocks written before, as one frame, read the same way).
//! What it buys is the incremental's cost: when a guest rewrote 64 KiB of a 1 MiB block, the
//! new block's object takes the compressed frames of the old one for every 128 KiB that change
//! tracking says is untouched *and* whose checksum matches the new bytes, and compresses only
//! the rest ([`compress_block_reusing`]). A span tracking does not vouch for (a raw image
//! scanned without tracking, a dirty range) is taken only when its checksum matches and the
//! old frame decompresses to exactly the new bytes: decompressing and comparing costs a
//! fraction of compressing. The new object's digest is still the BLAKE3 of the whole new
//! block, read from the snapshot: a frame taken wrongly could not open.

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
    let compressed = level.and_then(|l| compress_kind(kind, plain, l));
    seal_compressed(kind, plain, compressed, digest)
}

/// Like [`seal`], with the compressed payload already made (`None`: store `plain` raw). It is
/// kept only when smaller than `plain`.
pub(crate) fn seal_compressed(
    kind: Kind,
    plain: &[u8],
    compressed: Option<Vec<u8>>,
    digest: Option<[u8; 32]>,
) -> Sealed {
    let digest = digest.unwrap_or_else(|| *blake3::hash(plain).as_bytes());
    let compressed = compressed.filter(|c| c.len() < plain.len());
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
    let compressed = level.and_then(|l| compress_kind(kind, plain, l));
    seal_encrypted_compressed(kind, key, plain, compressed, digest, cipher)
}

/// Like [`seal_encrypted`], with the compressed payload already made (see [`seal_compressed`]).
pub(crate) fn seal_encrypted_compressed(
    kind: Kind,
    key: &str,
    plain: &[u8],
    compressed: Option<Vec<u8>>,
    digest: Option<[u8; 32]>,
    cipher: &ObjectCipher,
) -> Result<Sealed, Error> {
    let digest = digest.unwrap_or_else(|| cipher.digest(plain));
    let compressed = compressed.filter(|c| c.len() < plain.len());
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

/// The plain bytes of each zstd frame of a compressed block (the last may be shorter).
pub const FRAME_LEN: usize = 128 << 10;

/// Compresses `plain` as `kind` is stored: a block as one frame per [`FRAME_LEN`] bytes with
/// checksums, anything else as one frame.
pub(crate) fn compress_kind(kind: Kind, plain: &[u8], level: i32) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(plain.len() / 2);
    match kind {
        Kind::Block => {
            for chunk in plain.chunks(FRAME_LEN) {
                compress_frame(chunk, level, &mut out)?;
            }
        }
        Kind::Manifest | Kind::Point => compress_into(plain, level, false, &mut out)?,
    }
    Some(out)
}

/// Appends one zstd frame of `plain` (with its content size; with zstd's checksum if
/// `checksum`) to `out`. The context and its output buffer are reused per thread.
fn compress_into(plain: &[u8], level: i32, checksum: bool, out: &mut Vec<u8>) -> Option<()> {
    type Ctx = (zstd::bulk::Compressor<'static>, Vec<u8>);
    thread_local! {
        static COMPRESSOR: std::cell::RefCell<Option<Ctx>> = const { std::cell::RefCell::new(None) };
    }
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = zstd::bulk::Compressor::new(level)
                .ok()
                .map(|z| (z, Vec::new()));
        }
        let (comp, scratch) = c.as_mut()?;
        comp.set_compression_level(level).ok()?;
        comp.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(checksum))
            .ok()?;
        scratch.clear();
        scratch.reserve(zstd::zstd_safe::compress_bound(plain.len()));
        let n = comp.compress_to_buffer(plain, scratch).ok()?;
        out.extend_from_slice(scratch.get(..n)?);
        Some(())
    })
}

/// Appends the frame of one [`FRAME_LEN`] span of a block (with its checksum) to `out`. An
/// all-zero span, common in a block the guest wrote only part of, takes the frame compressing
/// zeroes makes, kept per thread for the last level used: byte for byte what
/// [`compress_into`] gives, for a zero test instead of a compression and a checksum (measured
/// here for a MiB of zeroes: 16 µs instead of 336 µs).
fn compress_frame(chunk: &[u8], level: i32, out: &mut Vec<u8>) -> Option<()> {
    thread_local! {
        static ZERO_FRAME: std::cell::RefCell<Option<(i32, Vec<u8>)>> = const { std::cell::RefCell::new(None) };
    }
    if chunk.len() != FRAME_LEN || !bulwark_blockdiff::is_zero(chunk) {
        return compress_into(chunk, level, true, out);
    }
    ZERO_FRAME.with(|z| {
        let mut z = z.borrow_mut();
        if z.as_ref().is_none_or(|(l, _)| *l != level) {
            let mut frame = Vec::new();
            compress_into(chunk, level, true, &mut frame)?;
            *z = Some((level, frame));
        }
        out.extend_from_slice(&z.as_ref()?.1);
        Some(())
    })
}

/// What [`compress_block_reusing`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reused {
    /// Plain bytes whose compressed frames were taken from the old object.
    pub bytes: u64,
    /// Spans change tracking called untouched whose checksum did not match the new bytes
    /// (compressed anew: tracking missed a write, or the old object is damaged).
    pub mismatched: u64,
    /// Of [`Reused::bytes`], those of spans tracking did not vouch for, taken because the old
    /// frame decompressed to exactly the new bytes.
    pub compared: u64,
}

/// The frames of a block payload written by [`compress_kind`]: `(frame bytes, checksum)` for
/// each [`FRAME_LEN`] of a block of `plain_len` bytes, or `None` if `payload` is not laid out
/// that way (a block written as one frame before frames existed, a frame without a checksum,
/// trailing bytes, damage).
fn block_frames(payload: &[u8], plain_len: usize) -> Option<Vec<(&[u8], u32)>> {
    let count = plain_len.div_ceil(FRAME_LEN);
    let mut frames = Vec::with_capacity(count);
    let mut rest = payload;
    for i in 0..count {
        let n = zstd::zstd_safe::find_frame_compressed_size(rest).ok()?;
        let frame = rest.get(..n)?;
        let want = (plain_len - i * FRAME_LEN).min(FRAME_LEN) as u64;
        if zstd::zstd_safe::get_frame_content_size(frame).ok()?? != want {
            return None;
        }
        // The frame header descriptor follows the 4-byte magic: bit 2 is the checksum flag,
        // and the checksum is then the frame's last 4 bytes.
        if frame.get(4)? & 0b100 == 0 || n < 8 {
            return None;
        }
        let sum = u32::from_le_bytes(frame.get(n - 4..)?.try_into().ok()?);
        frames.push((frame, sum));
        rest = rest.get(n..)?;
    }
    rest.is_empty().then_some(frames)
}

/// Compresses the block `plain` as [`seal`] does, taking frames from `old_payload` (the
/// decrypted, compressed payload of the block this one replaces, of the same length) where
/// they hold `plain`'s bytes, and compressing every other [`FRAME_LEN`] span:
/// - a span `untouched` marks (change tracking's word that span `i` did not change since the
///   old block) takes the old frame when its zstd checksum matches `plain`'s bytes there;
/// - any other span takes it only when the checksum matches *and* the old frame decompresses
///   to exactly those bytes (a 32-bit checksum alone is not proof of equal content).
///
/// `None` when `old_payload` is not a framed payload of a block that size (then the whole
/// block is compressed).
pub fn compress_block_reusing(
    plain: &[u8],
    level: i32,
    old_payload: &[u8],
    untouched: &[bool],
) -> Option<(Vec<u8>, Reused)> {
    let frames = block_frames(old_payload, plain.len())?;
    let mut out = Vec::with_capacity(old_payload.len() + FRAME_LEN / 2);
    let mut reused = Reused::default();
    for (i, (chunk, (frame, sum))) in plain.chunks(FRAME_LEN).zip(frames).enumerate() {
        let same_sum = xxhash_rust::xxh64::xxh64(chunk, 0) as u32 == sum;
        if untouched.get(i).copied().unwrap_or(false) {
            if same_sum {
                out.extend_from_slice(frame);
                reused.bytes += chunk.len() as u64;
                continue;
            }
            reused.mismatched += 1;
        } else if same_sum && frame_holds(frame, chunk) {
            out.extend_from_slice(frame);
            reused.bytes += chunk.len() as u64;
            reused.compared += chunk.len() as u64;
            continue;
        }
        compress_frame(chunk, level, &mut out)?;
    }
    Some((out, reused))
}

/// Whether the zstd frame `frame` decompresses to exactly `chunk` (at most [`FRAME_LEN`]
/// bytes). It is decompressed into a buffer of that size, kept per thread: a frame that holds
/// more, or does not decompress, is not equal.
fn frame_holds(frame: &[u8], chunk: &[u8]) -> bool {
    type Ctx = (zstd::bulk::Decompressor<'static>, Vec<u8>);
    thread_local! {
        static DECOMPRESSOR: std::cell::RefCell<Option<Ctx>> = const { std::cell::RefCell::new(None) };
    }
    if chunk.len() > FRAME_LEN {
        return false;
    }
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = zstd::bulk::Decompressor::new()
                .ok()
                .map(|z| (z, Vec::with_capacity(FRAME_LEN)));
        }
        let Some((dec, scratch)) = d.as_mut() else {
            return false;
        };
        scratch.clear();
        matches!(dec.decompress_to_buffer(frame, scratch), Ok(n) if n == chunk.len())
            && scratch.as_slice() == chunk
    })
}

/// The compressed payload of a stored block (decrypted) and its plain length, for
/// [`compress_block_reusing`]: `None` if the block is stored raw or does not parse (then the
/// new block is compressed whole).
///
/// The payload is borrowed from `bytes` unless it had to be decrypted.
pub(crate) fn block_payload<'a>(
    key: &str,
    bytes: &'a [u8],
    cipher: Option<&ObjectCipher>,
) -> Option<(std::borrow::Cow<'a, [u8]>, u64)> {
    let p = parse(Kind::Block, key, bytes, cipher).ok()?;
    p.compressed.then_some((p.payload, p.plain_len))
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

    /// Compressible, varied content: every 64-byte line differs (`seed` picks the set).
    fn text(len: usize, seed: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 64);
        let mut i = 0u64;
        while out.len() < len {
            out.extend_from_slice(
                format!(
                    "line {i:>10} of set {seed:>4}: {:>16x}\n",
                    i.wrapping_mul(seed | 1) ^ 0x5bd1_e995
                )
                .as_bytes(),
            );
            i += 1;
        }
        out.truncate(len);
        out
    }

    fn payload_of(s: &Sealed) -> Vec<u8> {
        assert_eq!(s.bytes[6] & FLAG_ZSTD, FLAG_ZSTD, "compressed");
        s.bytes[HEADER_LEN..].to_vec()
    }

    #[test]
    fn a_block_is_stored_as_checksummed_frames_that_any_reader_opens() {
        let plain = text((1 << 20) + 5000, 1);
        let s = seal(Kind::Block, &plain, Some(1), None);
        let frames = block_frames(&s.bytes[HEADER_LEN..], plain.len()).expect("framed");
        assert_eq!(frames.len(), 9, "8 full frames and a short one");
        assert_eq!(open(Kind::Block, "k", &s.bytes).unwrap().0, plain);
        let pool = Pool::new(2 << 20, 1);
        let (buf, _) = open_aligned(Kind::Block, "k", &s.bytes, None, &pool).unwrap();
        assert_eq!(buf.as_ref(), &plain[..]);
        // A manifest stays one frame, without a checksum.
        let m = seal(Kind::Manifest, &plain, Some(1), None);
        assert!(block_frames(&m.bytes[HEADER_LEN..], plain.len()).is_none());
        assert_eq!(open(Kind::Manifest, "k", &m.bytes).unwrap().0, plain);
    }

    /// The frames of `plain` as compressing every span gives them, without the zero shortcut.
    fn frames_compressed_one_by_one(plain: &[u8], level: i32) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in plain.chunks(FRAME_LEN) {
            compress_into(chunk, level, true, &mut out).unwrap();
        }
        out
    }

    #[test]
    fn a_zero_span_takes_the_frame_compressing_zeroes_gives() {
        // A block the guest wrote a little of: zero spans, a span zero but for its last byte,
        // and a short zero tail.
        let mut block = vec![0u8; (1 << 20) + 4096];
        block[300 << 10..364 << 10].copy_from_slice(&text(64 << 10, 9));
        block[(5 * FRAME_LEN) - 1] = 1;
        // Levels in turn, as two vaults in one process would use them.
        for level in [1, 3, 1, 19] {
            let got = compress_kind(Kind::Block, &block, level).unwrap();
            assert_eq!(
                got,
                frames_compressed_one_by_one(&block, level),
                "level {level}"
            );
        }
        let s = seal(Kind::Block, &block, Some(1), None);
        assert_eq!(open(Kind::Block, "k", &s.bytes).unwrap().0, block);
        // Reuse compresses a changed zero span the same way.
        let old = text(1 << 20, 10);
        let old_payload = payload_of(&seal(Kind::Block, &old, Some(1), None));
        let mut new = old.clone();
        new[..2 * FRAME_LEN].fill(0);
        let untouched: Vec<bool> = (0..8).map(|i| i >= 2).collect();
        let (payload, _) = compress_block_reusing(&new, 1, &old_payload, &untouched).unwrap();
        assert_eq!(payload, frames_compressed_one_by_one(&new, 1));
    }

    #[test]
    fn reuse_takes_the_untouched_frames_and_compresses_the_rest() {
        let old = text(1 << 20, 2);
        let old_payload = payload_of(&seal(Kind::Block, &old, Some(1), None));
        let mut new = old.clone();
        // A 64 KiB write at 300 KiB: inside frame 2 (256..384 KiB).
        new[300 << 10..364 << 10].copy_from_slice(&text(64 << 10, 3));
        let untouched: Vec<bool> = (0..8).map(|i| i != 2).collect();
        let (payload, reused) = compress_block_reusing(&new, 1, &old_payload, &untouched).unwrap();
        assert_eq!(
            reused,
            Reused {
                bytes: 7 * FRAME_LEN as u64,
                mismatched: 0,
                compared: 0
            }
        );
        let s = seal_compressed(Kind::Block, &new, Some(payload.clone()), None);
        assert_eq!(open(Kind::Block, "k", &s.bytes).unwrap().0, new);
        // The reused object is what compressing the whole block makes: the frames are
        // deterministic, so it is byte for byte the same.
        assert_eq!(payload, payload_of(&seal(Kind::Block, &new, Some(1), None)));
    }

    #[test]
    fn a_span_tracking_wrongly_calls_untouched_is_compressed_anew() {
        let old = text(1 << 20, 4);
        let old_payload = payload_of(&seal(Kind::Block, &old, Some(1), None));
        let mut new = old.clone();
        new[700 << 10] ^= 0x55; // frame 5, which tracking below says is untouched
        let (payload, reused) = compress_block_reusing(&new, 1, &old_payload, &[true; 8]).unwrap();
        assert_eq!(
            reused,
            Reused {
                bytes: 7 * FRAME_LEN as u64,
                mismatched: 1,
                compared: 0
            }
        );
        let s = seal_compressed(Kind::Block, &new, Some(payload), None);
        assert_eq!(open(Kind::Block, "k", &s.bytes).unwrap().0, new);
    }

    /// Two different spans of [`FRAME_LEN`] bytes with the same zstd checksum (the low 32
    /// bits of XXH64): `base` with its last 8 bytes replaced, found by a birthday search.
    fn colliding_spans(base: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let head = &base[..FRAME_LEN - 8];
        let mut prefix = xxhash_rust::xxh64::Xxh64::new(0);
        prefix.update(head);
        let mut seen = std::collections::HashMap::new();
        for tail in 0u64.. {
            let mut h = prefix.clone();
            h.update(&tail.to_le_bytes());
            if let Some(other) = seen.insert(h.digest() as u32, tail) {
                let with = |t: u64| [head, &t.to_le_bytes()[..]].concat();
                return (with(other), with(tail));
            }
        }
        unreachable!()
    }

    #[test]
    fn a_span_tracking_does_not_vouch_for_is_taken_only_when_its_bytes_are_equal() {
        let old = text(1 << 20, 6);
        let old_payload = payload_of(&seal(Kind::Block, &old, Some(1), None));
        let mut new = old.clone();
        new[300 << 10..364 << 10].copy_from_slice(&text(64 << 10, 7)); // inside frame 2
        // No tracking at all: every span is compared with the old frame.
        let (payload, reused) = compress_block_reusing(&new, 1, &old_payload, &[false; 8]).unwrap();
        let seven = 7 * FRAME_LEN as u64;
        assert_eq!(
            reused,
            Reused {
                bytes: seven,
                mismatched: 0,
                compared: seven
            }
        );
        assert_eq!(payload, payload_of(&seal(Kind::Block, &new, Some(1), None)));

        // Frame 2 old and new differ in their last 8 bytes, with the same checksum: equal
        // checksums are not taken as equal bytes.
        let (a, b) = colliding_spans(&old[2 * FRAME_LEN..3 * FRAME_LEN]);
        assert_ne!(a, b);
        let mut old = old;
        old[2 * FRAME_LEN..3 * FRAME_LEN].copy_from_slice(&a);
        let old_payload = payload_of(&seal(Kind::Block, &old, Some(1), None));
        let mut new = old.clone();
        new[2 * FRAME_LEN..3 * FRAME_LEN].copy_from_slice(&b);
        let (payload, reused) = compress_block_reusing(&new, 1, &old_payload, &[false; 8]).unwrap();
        assert_eq!(reused.compared, seven, "frame 2 compressed anew");
        let s = seal_compressed(Kind::Block, &new, Some(payload), None);
        assert_eq!(open(Kind::Block, "k", &s.bytes).unwrap().0, new);
        // Where tracking vouches for the span, its checksum is trusted; a frame taken wrongly
        // then makes an object that fails to open, never one that opens to wrong bytes.
        let (payload, reused) = compress_block_reusing(&new, 1, &old_payload, &[true; 8]).unwrap();
        assert_eq!(reused.bytes, 8 * FRAME_LEN as u64);
        let s = seal_compressed(Kind::Block, &new, Some(payload), None);
        assert!(open(Kind::Block, "k", &s.bytes).is_err());
    }

    #[test]
    fn an_old_payload_not_framed_that_way_is_not_reused() {
        let old = text(1 << 20, 5);
        let mut one_frame = Vec::new();
        compress_into(&old, 1, false, &mut one_frame).unwrap();
        assert!(
            compress_block_reusing(&old, 1, &one_frame, &[true; 8]).is_none(),
            "a block written as one frame"
        );
        let framed = payload_of(&seal(Kind::Block, &old, Some(1), None));
        assert!(
            compress_block_reusing(&old[..old.len() - 1], 1, &framed, &[true; 8]).is_none(),
            "another length"
        );
        let mut trailing = framed.clone();
        trailing.push(0);
        assert!(
            compress_block_reusing(&old, 1, &trailing, &[true; 8]).is_none(),
            "trailing bytes"
        );
        assert!(
            compress_block_reusing(&old, 1, &framed[..framed.len() - 3], &[true; 8]).is_none(),
            "truncated"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Whatever tracking says (right or wrong) and whatever changed, the new object opens
        /// to the new bytes; of the spans not called untouched, exactly those with unchanged
        /// bytes are reused.
        #[test]
        fn prop_reuse_always_opens_to_the_new_block(
            len in 1usize..(600 << 10),
            seed in any::<u64>(),
            writes in proptest::collection::vec((any::<prop::sample::Index>(), 1usize..70_000, any::<u8>()), 0..6),
            untouched in proptest::collection::vec(any::<bool>(), 5),
        ) {
            let old = text(len, seed);
            let old_payload = payload_of(&seal(Kind::Block, &old, Some(1), None));
            let mut new = old.clone();
            for (at, n, v) in writes {
                let at = at.index(len);
                let end = (at + n).min(len);
                new[at..end].iter_mut().for_each(|b| *b = b.wrapping_add(v | 1));
            }
            let (payload, reused) = compress_block_reusing(&new, 1, &old_payload, &untouched).unwrap();
            let marked: u64 = new.chunks(FRAME_LEN).zip(&untouched).filter(|(_, u)| **u).map(|(c, _)| c.len() as u64).sum();
            let equal_unmarked: u64 = new.chunks(FRAME_LEN).zip(old.chunks(FRAME_LEN)).zip(&untouched)
                .filter(|((n, o), u)| !**u && n == o).map(|((n, _), _)| n.len() as u64).sum();
            prop_assert!(reused.bytes - reused.compared <= marked);
            prop_assert_eq!(reused.compared, equal_unmarked);
            let s = seal_compressed(Kind::Block, &new, Some(payload), None);
            prop_assert_eq!(open(Kind::Block, "k", &s.bytes).unwrap().0, new);
        }

        /// A damaged old payload (any byte flipped, cut short, or random bytes) is refused or
        /// yields an object that opens to the new block: never a panic, never wrong bytes.
        #[test]
        fn prop_a_damaged_old_payload_never_gives_wrong_bytes(
            len in 1usize..(300 << 10),
            seed in any::<u64>(),
            pos in any::<prop::sample::Index>(),
            bit in 0u8..8,
            cut in any::<prop::sample::Index>(),
            noise in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let block = text(len, seed);
            let good = payload_of(&seal(Kind::Block, &block, Some(1), None));
            let mut flipped = good.clone();
            let i = pos.index(flipped.len());
            flipped[i] ^= 1 << bit;
            let cut = good[..cut.index(good.len())].to_vec();
            let mut spliced = good.clone();
            spliced.splice(i..i, noise.iter().copied());
            for old in [flipped, cut, noise.clone(), spliced] {
                if let Some((payload, _)) = compress_block_reusing(&block, 1, &old, &[true; 3]) {
                    let s = seal_compressed(Kind::Block, &block, Some(payload), None);
                    if let Ok((plain, _)) = open(Kind::Block, "k", &s.bytes) {
                        prop_assert_eq!(plain, block.clone());
                    }
                }
            }
        }
    }
}
