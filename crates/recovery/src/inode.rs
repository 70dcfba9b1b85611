//! Inode timestamps, which `ext4-view` does not expose: a minimal reader of the superblock,
//! the group descriptors and one inode, every field bounds-checked.

use crate::Error;
use crate::disk::BlockingReader;

/// Access and modification times of an inode (seconds since the epoch, nanoseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Times {
    /// Last access.
    pub atime: (i64, u32),
    /// Last modification.
    pub mtime: (i64, u32),
}

/// Finds inodes in an ext2/3/4 file system.
#[derive(Debug, Clone)]
pub(crate) struct Locator {
    block_size: u64,
    inodes_count: u32,
    inodes_per_group: u32,
    inode_size: u16,
    desc_size: u64,
    gdt_start: u64,
    has_hi_table: bool,
    fs_len: u64,
}

fn corrupt(disk: &str, why: String) -> Error {
    Error::Fs {
        disk: disk.to_string(),
        path: String::new(),
        why,
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2)
        .map_or(0, |s| u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// The most block groups a file system may claim (128 TiB with 4 KiB blocks and the usual
/// 32768 blocks per group). `ext4-view` allocates one descriptor per group, as the superblock
/// says, before reading any of them.
const MAX_GROUPS: u64 = 1 << 20;

/// Checks the superblock's geometry before `ext4-view` trusts it: the block count must fit in
/// the partition and the number of block groups must stay bounded. A damaged superblock made
/// the parser allocate 62 GB for group descriptors, aborting the process.
pub(crate) fn check_geometry(r: &BlockingReader) -> Result<(), Error> {
    let disk = r.disk().label();
    let mut sb = [0u8; 1024];
    r.read_at(1024, &mut sb)?;
    if u16_at(&sb, 0x38) != 0xEF53 {
        // Not ext2/3/4 at all: the parser says so in its own words.
        return Ok(());
    }
    let log = u32_at(&sb, 0x18);
    if log > 6 {
        return Err(corrupt(disk, format!("block size 2^(10+{log}) is invalid")));
    }
    let block_size = 1024u64 << log;
    let is_64bit = u32_at(&sb, 0x60) & 0x80 != 0;
    let hi = if is_64bit { u32_at(&sb, 0x150) } else { 0 };
    let blocks = (u64::from(hi) << 32) | u64::from(u32_at(&sb, 0x04));
    let first_data_block = u64::from(u32_at(&sb, 0x14));
    let per_group = u64::from(u32_at(&sb, 0x20));
    if blocks.saturating_mul(block_size) > r.len() {
        return Err(corrupt(
            disk,
            format!(
                "the superblock claims {blocks} blocks of {block_size} bytes, more than the \
                 partition's {} bytes",
                r.len()
            ),
        ));
    }
    if per_group == 0 || per_group > 8 * block_size {
        return Err(corrupt(
            disk,
            format!(
                "{per_group} blocks per group is invalid (1 to {})",
                8 * block_size
            ),
        ));
    }
    let groups = blocks.saturating_sub(first_data_block).div_ceil(per_group);
    if groups > MAX_GROUPS {
        return Err(corrupt(
            disk,
            format!("{groups} block groups, more than the {MAX_GROUPS} this reader accepts"),
        ));
    }
    Ok(())
}

impl Locator {
    pub(crate) fn new(r: &BlockingReader) -> Result<Locator, Error> {
        let disk = r.disk().label();
        let mut sb = [0u8; 1024];
        r.read_at(1024, &mut sb)?;
        if u16_at(&sb, 0x38) != 0xEF53 {
            return Err(corrupt(disk, "no ext2/3/4 superblock magic".into()));
        }
        let log = u32_at(&sb, 0x18);
        if log > 6 {
            return Err(corrupt(disk, format!("block size 2^(10+{log}) is invalid")));
        }
        let block_size = 1024u64 << log;
        let inodes_per_group = u32_at(&sb, 0x28);
        let inode_size = if u32_at(&sb, 0x4C) == 0 {
            128
        } else {
            u16_at(&sb, 0x58)
        };
        if inodes_per_group == 0
            || inode_size < 128
            || !inode_size.is_power_of_two()
            || u64::from(inode_size) > block_size
        {
            return Err(corrupt(
                disk,
                format!(
                    "inodes per group {inodes_per_group} or inode size {inode_size} is invalid"
                ),
            ));
        }
        let is_64bit = u32_at(&sb, 0x60) & 0x80 != 0;
        let desc_size = if is_64bit {
            u64::from(u16_at(&sb, 0xFE))
        } else {
            32
        };
        if !(32..=1024).contains(&desc_size) {
            return Err(corrupt(
                disk,
                format!("descriptor size {desc_size} is invalid"),
            ));
        }
        let first_data_block = u64::from(u32_at(&sb, 0x14));
        Ok(Locator {
            block_size,
            inodes_count: u32_at(&sb, 0),
            inodes_per_group,
            inode_size,
            desc_size,
            gdt_start: (first_data_block + 1) * block_size,
            has_hi_table: is_64bit && desc_size >= 64,
            fs_len: r.len(),
        })
    }

    /// The times of inode `ino`.
    pub(crate) fn times(&self, r: &BlockingReader, ino: u32) -> Result<Times, Error> {
        let disk = r.disk().label();
        if ino == 0 || ino > self.inodes_count {
            return Err(corrupt(disk, format!("inode {ino} is out of range")));
        }
        let group = u64::from((ino - 1) / self.inodes_per_group);
        let index = u64::from((ino - 1) % self.inodes_per_group);
        let mut desc = vec![0u8; self.desc_size as usize];
        r.read_at(self.gdt_start + group * self.desc_size, &mut desc)?;
        let mut table = u64::from(u32_at(&desc, 0x8));
        if self.has_hi_table {
            table |= u64::from(u32_at(&desc, 0x28)) << 32;
        }
        let at = table
            .checked_mul(self.block_size)
            .and_then(|t| t.checked_add(index * u64::from(self.inode_size)))
            .filter(|a| a.saturating_add(u64::from(self.inode_size)) <= self.fs_len)
            .ok_or_else(|| corrupt(disk, format!("inode {ino} lies outside the file system")))?;
        let mut inode = vec![0u8; usize::from(self.inode_size)];
        r.read_at(at, &mut inode)?;
        Ok(decode_times(&inode))
    }
}

/// Decodes the access and modification times of a raw inode (with the nanoseconds and
/// epoch bits of the extra fields when the inode has them).
pub(crate) fn decode_times(inode: &[u8]) -> Times {
    let extra = if inode.len() > 128 {
        usize::from(u16_at(inode, 0x80))
    } else {
        0
    };
    let field = |base: usize, extra_at: usize| {
        let secs = i64::from(u32_at(inode, base) as i32);
        if 128 + extra >= extra_at + 4 && inode.len() >= extra_at + 4 {
            let x = u32_at(inode, extra_at);
            (secs + (i64::from(x & 3) << 32), x >> 2)
        } else {
            (secs, 0)
        }
    };
    Times {
        atime: field(0x08, 0x8C),
        mtime: field(0x10, 0x88),
    }
}

/// The inode number `ext4-view` prints in the `Debug` form of a `File` or `DirEntry`
/// (`inode: N`), the only place that version exposes it. `None` if absent.
pub(crate) fn inode_from_debug(debug: &str) -> Option<u32> {
    // A DirEntry prints its file system first ("fs: Ext4 { .. }"), whose fields are numbers
    // and the label; the entry's own "inode: N" follows the file system's closing "}, ".
    let at = if let Some(rest) = debug.strip_prefix("File { ") {
        rest.strip_prefix("inode: ")?
    } else {
        let i = debug.find(".. }, inode: ")?;
        &debug[i + ".. }, inode: ".len()..]
    };
    let digits: String = at.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_with_and_without_extra_fields() {
        let mut inode = vec![0u8; 256];
        inode[0x10..0x14].copy_from_slice(&1_700_000_000u32.to_le_bytes());
        inode[0x08..0x0C].copy_from_slice(&(-5i32).to_le_bytes());
        assert_eq!(decode_times(&inode).mtime, (1_700_000_000, 0));
        assert_eq!(decode_times(&inode).atime, (-5, 0));
        inode[0x80..0x82].copy_from_slice(&32u16.to_le_bytes());
        inode[0x88..0x8C].copy_from_slice(&((123u32 << 2) | 1).to_le_bytes());
        assert_eq!(decode_times(&inode).mtime, (1_700_000_000 + (1 << 32), 123));
        assert_eq!(decode_times(&inode[..128]).mtime, (1_700_000_000, 0));
    }

    #[test]
    fn inode_numbers_from_debug() {
        assert_eq!(
            inode_from_debug("File { inode: 12, position: 0, .. }"),
            Some(12)
        );
        assert_eq!(
            inode_from_debug("DirEntry { fs: Ext4 { superblock: X, .. }, inode: 77, name: \"a\" }"),
            Some(77)
        );
        assert_eq!(inode_from_debug("garbage"), None);
    }
}
