//! Change tracking from reflink extents: which byte ranges of two snapshots are provably the
//! same data, found from the file system's extent maps (`FS_IOC_FIEMAP`) without reading them.
//!
//! On a copy-on-write file system (XFS with reflink, btrfs), a reflink clone shares every
//! extent of its source. A write to a shared extent never changes it in place: the written range
//! moves to a new extent. So when the snapshot of the previous backup (the *base*) is kept, and
//! the new snapshot maps a range to the very same physical extent as the base, no write has
//! touched that range in between: its data is the base's data, block for block. Only the ranges
//! that moved need reading.
//!
//! The argument holds while the base itself is never written (it is read-only, and the caller
//! checks its ctime), and only for extents whose physical address means something: extents that
//! are delayed, encoded (compressed), inline, encrypted or of unknown location are treated as
//! changed. A range that is a hole in both files is the same too (zeros).

use std::fs::File;
use std::ops::Range;
use std::path::Path;

use crate::{Error, io};

/// `struct fiemap` from `<linux/fiemap.h>`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapHeader {
    fm_start: u64,
    fm_length: u64,
    fm_flags: u32,
    fm_mapped_extents: u32,
    fm_extent_count: u32,
    fm_reserved: u32,
}

/// `struct fiemap_extent` from `<linux/fiemap.h>`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    fe_logical: u64,
    fe_physical: u64,
    fe_length: u64,
    fe_reserved64: [u64; 2],
    fe_flags: u32,
    fe_reserved: [u32; 3],
}

/// Extents asked for per ioctl.
const BATCH: usize = 256;

/// A `struct fiemap` followed by room for `BATCH` extents, as the ioctl expects.
#[repr(C)]
struct FiemapBuf {
    header: FiemapHeader,
    extents: [FiemapExtent; BATCH],
}

const FIEMAP_FLAG_SYNC: u32 = 0x1;
const FIEMAP_EXTENT_LAST: u32 = 0x1;
const FIEMAP_EXTENT_UNWRITTEN: u32 = 0x800;
/// UNKNOWN, DELALLOC, ENCODED, DATA_ENCRYPTED, NOT_ALIGNED, DATA_INLINE, DATA_TAIL: the
/// physical address does not identify the data (or there is none yet).
const FIEMAP_EXTENT_OPAQUE: u32 = 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400;

/// `FS_IOC_FIEMAP` = `_IOWR('f', 11, struct fiemap)`.
const FS_IOC_FIEMAP: rustix::ioctl::Opcode =
    rustix::ioctl::opcode::read_write::<FiemapHeader>(b'f', 11);

/// One mapped extent of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Offset in the file.
    pub logical: u64,
    /// Offset on the device (file-system specific; comparable within one file system only).
    pub physical: u64,
    /// Length in bytes.
    pub length: u64,
    /// The address identifies the data (not delayed, encoded, inline, encrypted or unknown).
    pub addressable: bool,
    /// Allocated but unwritten (reads as zeros).
    pub unwritten: bool,
}

/// The extent map of `file` (flushed first, so that delayed allocations have a place).
/// `Ok(None)` when the file system has no FIEMAP.
pub fn extents(file: &File, path: &Path) -> Result<Option<Vec<Extent>>, Error> {
    let mut out = Vec::new();
    let mut start = 0u64;
    loop {
        let mut buf = FiemapBuf {
            header: FiemapHeader {
                fm_start: start,
                fm_length: u64::MAX - start,
                fm_flags: FIEMAP_FLAG_SYNC,
                fm_extent_count: BATCH as u32,
                ..FiemapHeader::default()
            },
            extents: [FiemapExtent::default(); BATCH],
        };
        // SAFETY: FS_IOC_FIEMAP reads the header and writes at most `fm_extent_count` (= BATCH)
        // `struct fiemap_extent` right after it; `FiemapBuf` is `repr(C)` with exactly that
        // layout and room, and lives until the call returns.
        let r = unsafe {
            rustix::ioctl::ioctl(
                file,
                rustix::ioctl::Updater::<FS_IOC_FIEMAP, FiemapBuf>::new(&mut buf),
            )
        };
        match r {
            Ok(()) => {}
            Err(
                rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOTTY | rustix::io::Errno::NOSYS,
            ) => return Ok(None),
            Err(e) => return Err(io(path)(e.into())),
        }
        let n = (buf.header.fm_mapped_extents as usize).min(BATCH);
        if n == 0 {
            return Ok(Some(out));
        }
        let mut last = false;
        for e in &buf.extents[..n] {
            out.push(Extent {
                logical: e.fe_logical,
                physical: e.fe_physical,
                length: e.fe_length,
                addressable: e.fe_flags & FIEMAP_EXTENT_OPAQUE == 0,
                unwritten: e.fe_flags & FIEMAP_EXTENT_UNWRITTEN != 0,
            });
            last |= e.fe_flags & FIEMAP_EXTENT_LAST != 0;
        }
        let end = buf.extents[n - 1]
            .fe_logical
            .saturating_add(buf.extents[n - 1].fe_length);
        if last {
            return Ok(Some(out));
        }
        if end <= start {
            // No progress: an extent map that cannot be walked is not trusted.
            return Ok(None);
        }
        start = end;
    }
}

/// What one byte range of a file is backed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backing {
    Hole,
    /// `physical - logical` (the same for every byte of one extent) and the unwritten flag.
    At(i128, bool),
    Opaque,
}

/// Splits `[0, len)` into pieces with their backing.
fn pieces(extents: &[Extent], len: u64) -> Vec<(u64, u64, Backing)> {
    let mut out = Vec::with_capacity(extents.len() * 2 + 1);
    let mut pos = 0u64;
    for e in extents {
        let start = e.logical.max(pos);
        let end = e.logical.saturating_add(e.length).min(len);
        if start >= end {
            continue;
        }
        if start > pos {
            out.push((pos, start, Backing::Hole));
        }
        let b = if e.addressable {
            Backing::At(i128::from(e.physical) - i128::from(e.logical), e.unwritten)
        } else {
            Backing::Opaque
        };
        out.push((start, end, b));
        pos = end;
    }
    if pos < len {
        out.push((pos, len, Backing::Hole));
    }
    out
}

/// The ranges of `[0, len)` where two extent maps are backed identically: the same physical
/// bytes (both written or both unwritten), or a hole in both. Sorted, disjoint, merged.
pub fn identical(a: &[Extent], b: &[Extent], len: u64) -> Vec<Range<u64>> {
    let pa = pieces(a, len);
    let pb = pieces(b, len);
    let mut out: Vec<Range<u64>> = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < pa.len() && j < pb.len() {
        let (sa, ea, ba) = pa[i];
        let (sb, eb, bb) = pb[j];
        let start = sa.max(sb);
        let end = ea.min(eb);
        let same = match (ba, bb) {
            (Backing::Hole, Backing::Hole) => true,
            (Backing::At(da, ua), Backing::At(db, ub)) => da == db && ua == ub,
            _ => false,
        };
        if same && start < end {
            match out.last_mut() {
                Some(last) if last.end == start => last.end = end,
                _ => out.push(start..end),
            }
        }
        if ea <= eb {
            i += 1;
        }
        if eb <= ea {
            j += 1;
        }
    }
    out
}

/// File systems whose extent addresses identify data and whose shared extents are never
/// written in place: XFS and btrfs. Others are not trusted: the CIFS client, for one, accepts
/// `FICLONE` and answers FIEMAP with the logical offset as the "physical" one.
const TRUSTED_FS: [(u64, &str); 2] = [(0x5846_5342, "xfs"), (0x9123_683e, "btrfs")];

/// The name of `file`'s file system if its extent maps can be trusted.
fn trusted_fs(file: &File) -> Option<&'static str> {
    let st = rustix::fs::fstatfs(file).ok()?;
    let magic = u64::try_from(st.f_type).ok()?;
    TRUSTED_FS
        .iter()
        .find(|(m, _)| *m == magic)
        .map(|(_, name)| *name)
}

/// The byte ranges where the open files `base` and `snap` provably hold the same data, from
/// their extent maps alone (see the module docs). Only the first
/// `min(len(base), len(snap))` bytes are compared. Empty (nothing known, read everything) when
/// they are on different file systems, on a file system other than XFS or btrfs, or the extent
/// maps are incomplete; and when the base's map changed while the snapshot's was read (a
/// defragmenter or deduplicator at work).
///
/// `base` must be a file that nothing has written since it was cloned: the caller vouches
/// for that (Bulwark keeps it read-only and checks its ctime on this open file).
pub fn identical_ranges(
    base: &File,
    base_path: &Path,
    snap: &File,
    snap_path: &Path,
) -> Result<Vec<Range<u64>>, Error> {
    use std::os::unix::fs::MetadataExt;
    let ma = base.metadata().map_err(io(base_path))?;
    let mb = snap.metadata().map_err(io(snap_path))?;
    if ma.dev() != mb.dev() || !ma.is_file() || !mb.is_file() || trusted_fs(snap).is_none() {
        return Ok(Vec::new());
    }
    let (Some(ea), Some(eb)) = (extents(base, base_path)?, extents(snap, snap_path)?) else {
        return Ok(Vec::new());
    };
    if extents(base, base_path)?.as_ref() != Some(&ea) {
        tracing::info!(base = %base_path.display(), "the base's extents moved meanwhile; nothing known");
        return Ok(Vec::new());
    }
    Ok(identical(&ea, &eb, ma.len().min(mb.len())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(logical: u64, physical: u64, length: u64) -> Extent {
        Extent {
            logical,
            physical,
            length,
            addressable: true,
            unwritten: false,
        }
    }

    #[test]
    fn header_layout_matches_the_kernel() {
        assert_eq!(std::mem::size_of::<FiemapHeader>(), 32);
        assert_eq!(std::mem::size_of::<FiemapExtent>(), 56);
        assert_eq!(
            std::mem::size_of::<FiemapBuf>(),
            32 + 56 * BATCH,
            "no padding between the header and the extents"
        );
    }

    #[test]
    fn same_physical_same_data() {
        // base: one extent; snap: the middle moved (a CoW write), a tail extent beyond len.
        let a = [ext(0, 1000, 300)];
        let b = [ext(0, 1000, 100), ext(100, 5000, 50), ext(150, 1150, 150)];
        assert_eq!(identical(&a, &b, 300), vec![0..100, 150..300]);
        // Holes in both are the same; a hole against data is not.
        let a = [ext(100, 1100, 100)];
        let b = [ext(100, 1100, 50)];
        assert_eq!(identical(&a, &b, 300), vec![0..150, 200..300]);
        // The same physical start at another logical offset is other data.
        assert_eq!(
            identical(&[ext(0, 1000, 100)], &[ext(0, 1010, 100)], 100),
            vec![]
        );
    }

    #[test]
    fn opaque_extents_are_not_trusted_and_unwritten_ones_must_match() {
        let mut opaque = ext(0, 1000, 100);
        opaque.addressable = false;
        assert_eq!(identical(&[opaque], &[opaque], 100), vec![]);
        let mut unwritten = ext(0, 1000, 100);
        unwritten.unwritten = true;
        assert_eq!(identical(&[unwritten], &[ext(0, 1000, 100)], 100), vec![]);
        assert_eq!(identical(&[unwritten], &[unwritten], 100), vec![0..100]);
    }

    #[test]
    fn only_xfs_and_btrfs_are_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
        let f = File::open(&path).unwrap();
        let same = identical_ranges(&f, &path, &f, &path).unwrap();
        match trusted_fs(&f) {
            // A file compared with itself: every byte is backed identically.
            Some(_) => assert_eq!(same, vec![0..1 << 20]),
            // Anywhere else (ext4, tmpfs, CIFS…) nothing is known, whatever FIEMAP says.
            None => assert!(same.is_empty(), "{same:?}"),
        }
    }

    proptest::proptest! {
        /// Whatever the maps, every byte said identical is backed the same way in both.
        #[test]
        fn identical_is_sound(
            a in proptest::collection::vec((0u64..8, 0u64..4, 1u64..5, 0u8..4), 0..6),
            b in proptest::collection::vec((0u64..8, 0u64..4, 1u64..5, 0u8..4), 0..6),
        ) {
            // Each extent: a gap before it, a physical base, a length, and flags (bit 0:
            // opaque, bit 1: unwritten).
            let build = |v: &[(u64, u64, u64, u8)]| {
                let mut pos = 0;
                let mut out = Vec::new();
                for &(gap, phys, len, flags) in v {
                    pos += gap;
                    let mut e = ext(pos * 10, phys * 100 + pos * 10, len * 10);
                    e.addressable = flags & 1 == 0;
                    e.unwritten = flags & 2 != 0;
                    out.push(e);
                    pos += len;
                }
                out
            };
            let (ea, eb) = (build(&a), build(&b));
            let len = 200;
            // What backs byte x: nothing (a hole), or an extent's physical byte and state.
            let at = |m: &[Extent], x: u64| {
                m.iter()
                    .find(|e| e.logical <= x && x < e.logical + e.length)
                    .map(|e| (e.physical + (x - e.logical), e.addressable, e.unwritten))
            };
            for r in identical(&ea, &eb, len) {
                for x in r {
                    let (pa, pb) = (at(&ea, x), at(&eb, x));
                    proptest::prop_assert_eq!(pa, pb, "byte {}", x);
                    proptest::prop_assert!(pa.is_none_or(|(_, addressable, _)| addressable), "byte {} opaque", x);
                }
            }
        }
    }
}
