//! MBR and GPT partition tables: a small parser of hostile input (bounded reads, checked
//! arithmetic, CRCs verified, every partition inside the disk).
//!
//! A protective MBR (type `0xEE`) means GPT. Logical partitions inside an MBR extended
//! partition are not followed (the extended container itself is listed).

use serde::Serialize;

use crate::Error;
use crate::disk::PointDisk;

/// The sector size assumed for MBR and GPT (512-byte logical sectors; 4Kn disks are not read).
pub const SECTOR: u64 = 512;

/// Most GPT entry bytes read (the specification's minimum array is 16 KiB; 1 MiB is far more
/// than any real table).
const MAX_GPT_ENTRY_BYTES: u64 = 1 << 20;

/// The partitioning scheme found on a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    /// No partition table: the file system (if any) is on the whole disk.
    None,
    /// A DOS master boot record.
    Mbr,
    /// A GUID partition table (behind a protective MBR).
    Gpt,
}

/// One partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Partition {
    /// Its number: the MBR slot (1–4) or the GPT entry index + 1.
    pub number: u32,
    /// First byte on the disk.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// The MBR type byte (`0x83`) or the GPT type GUID.
    pub kind: String,
    /// The GPT partition name (empty for MBR).
    pub name: String,
}

/// The partition table of a disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionTable {
    /// The scheme.
    pub scheme: Scheme,
    /// The partitions, by number.
    pub partitions: Vec<Partition>,
}

impl PartitionTable {
    /// Partition `number`, or an error listing those there are.
    pub fn get(&self, disk: &str, number: u32) -> Result<&Partition, Error> {
        self.partitions
            .iter()
            .find(|p| p.number == number)
            .ok_or_else(|| Error::NoSuchPartition {
                disk: disk.to_string(),
                number,
                available: self
                    .partitions
                    .iter()
                    .map(|p| p.number.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

fn bad(disk: &str, why: impl Into<String>) -> Error {
    Error::PartitionTable {
        disk: disk.to_string(),
        why: why.into(),
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        v.copy_from_slice(s);
    }
    u32::from_le_bytes(v)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        v.copy_from_slice(s);
    }
    u64::from_le_bytes(v)
}

/// Checks that `start..start+len` lies inside a disk of `disk_size` bytes.
fn inside(disk: &str, what: &str, start: u64, len: u64, disk_size: u64) -> Result<(), Error> {
    match start.checked_add(len) {
        Some(end) if end <= disk_size => Ok(()),
        _ => Err(bad(
            disk,
            format!(
                "{what} at byte {start} ({len} bytes) reaches past the end of the disk ({disk_size} bytes)"
            ),
        )),
    }
}

/// What the first sector says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mbr {
    /// No boot signature: no partition table.
    Absent,
    /// A protective MBR: read the GPT.
    Protective,
    /// A DOS table with these partitions.
    Dos(Vec<Partition>),
}

/// Parses the first sector (`sector0`, at least 512 bytes) of a disk of `disk_size` bytes.
pub fn parse_mbr(disk: &str, sector0: &[u8], disk_size: u64) -> Result<Mbr, Error> {
    if sector0.len() < 512 {
        return Err(bad(disk, "the first sector is shorter than 512 bytes"));
    }
    if sector0[510] != 0x55 || sector0[511] != 0xAA {
        return Ok(Mbr::Absent);
    }
    let mut parts = Vec::new();
    let mut protective = false;
    for slot in 0..4usize {
        let e = &sector0[446 + slot * 16..446 + (slot + 1) * 16];
        let kind = e[4];
        let first = u64::from(u32_at(e, 8));
        let sectors = u64::from(u32_at(e, 12));
        if kind == 0 || sectors == 0 {
            continue;
        }
        if kind == 0xEE {
            protective = true;
            continue;
        }
        if e[0] != 0 && e[0] != 0x80 {
            return Err(bad(
                disk,
                format!(
                    "MBR entry {} has an invalid status byte {:#04x}",
                    slot + 1,
                    e[0]
                ),
            ));
        }
        // u32 sectors × 512 cannot overflow a u64.
        let start = first * SECTOR;
        let len = sectors * SECTOR;
        if first == 0 {
            return Err(bad(
                disk,
                format!("MBR partition {} starts at sector 0", slot + 1),
            ));
        }
        inside(
            disk,
            &format!("MBR partition {}", slot + 1),
            start,
            len,
            disk_size,
        )?;
        parts.push(Partition {
            number: slot as u32 + 1,
            start,
            len,
            kind: format!("{kind:#04x}"),
            name: String::new(),
        });
    }
    if protective {
        return Ok(Mbr::Protective);
    }
    check_overlaps(disk, &parts)?;
    Ok(Mbr::Dos(parts))
}

fn check_overlaps(disk: &str, parts: &[Partition]) -> Result<(), Error> {
    let mut sorted: Vec<&Partition> = parts.iter().collect();
    sorted.sort_by_key(|p| p.start);
    for w in sorted.windows(2) {
        if w[0].start + w[0].len > w[1].start {
            return Err(bad(
                disk,
                format!("partitions {} and {} overlap", w[0].number, w[1].number),
            ));
        }
    }
    Ok(())
}

/// The fields of a GPT header this reader uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GptHeader {
    /// First usable LBA.
    pub first_usable: u64,
    /// Last usable LBA.
    pub last_usable: u64,
    /// LBA of the entry array.
    pub entries_lba: u64,
    /// Number of entries.
    pub entries: u32,
    /// Bytes per entry.
    pub entry_size: u32,
    /// CRC32 of the entry array.
    pub entries_crc: u32,
}

impl GptHeader {
    /// Bytes of the entry array (bounded by the parser).
    pub fn array_bytes(&self) -> u64 {
        u64::from(self.entries) * u64::from(self.entry_size)
    }
}

/// Parses the GPT header in `sector1` (LBA 1) of a disk of `disk_size` bytes: signature,
/// CRC, and every LBA inside the disk.
pub fn parse_gpt_header(disk: &str, sector1: &[u8], disk_size: u64) -> Result<GptHeader, Error> {
    if sector1.len() < 92 || &sector1[..8] != b"EFI PART" {
        return Err(bad(
            disk,
            "protective MBR, but no GPT header signature at LBA 1",
        ));
    }
    let header_size = u32_at(sector1, 12) as usize;
    if !(92..=sector1.len().min(512)).contains(&header_size) {
        return Err(bad(
            disk,
            format!("GPT header size {header_size} is invalid"),
        ));
    }
    let mut h = sector1[..header_size].to_vec();
    let stored_crc = u32_at(&h, 16);
    h[16..20].fill(0);
    if crc32(&h) != stored_crc {
        return Err(bad(disk, "GPT header CRC mismatch"));
    }
    let hdr = GptHeader {
        first_usable: u64_at(sector1, 40),
        last_usable: u64_at(sector1, 48),
        entries_lba: u64_at(sector1, 72),
        entries: u32_at(sector1, 80),
        entry_size: u32_at(sector1, 84),
        entries_crc: u32_at(sector1, 88),
    };
    let sectors = disk_size / SECTOR;
    if hdr.first_usable > hdr.last_usable || hdr.last_usable >= sectors {
        return Err(bad(
            disk,
            format!(
                "GPT usable range LBA {}..={} is not inside the disk ({sectors} sectors)",
                hdr.first_usable, hdr.last_usable
            ),
        ));
    }
    if hdr.entry_size < 128 || hdr.entry_size % 8 != 0 || hdr.entry_size > 4096 {
        return Err(bad(
            disk,
            format!("GPT entry size {} is invalid", hdr.entry_size),
        ));
    }
    if hdr.array_bytes() > MAX_GPT_ENTRY_BYTES {
        return Err(bad(
            disk,
            format!(
                "GPT entry array of {} × {} bytes is larger than {MAX_GPT_ENTRY_BYTES} bytes",
                hdr.entries, hdr.entry_size
            ),
        ));
    }
    let start = hdr
        .entries_lba
        .checked_mul(SECTOR)
        .ok_or_else(|| bad(disk, "GPT entry array LBA overflows"))?;
    inside(
        disk,
        "the GPT entry array",
        start,
        hdr.array_bytes(),
        disk_size,
    )?;
    Ok(hdr)
}

/// Parses the GPT entry array (`array`, exactly [`GptHeader::array_bytes`] long): CRC
/// checked, every partition inside the usable range and the disk, none overlapping.
pub fn parse_gpt_entries(
    disk: &str,
    hdr: &GptHeader,
    array: &[u8],
    disk_size: u64,
) -> Result<Vec<Partition>, Error> {
    if array.len() as u64 != hdr.array_bytes() {
        return Err(bad(disk, "GPT entry array is short"));
    }
    if crc32(array) != hdr.entries_crc {
        return Err(bad(disk, "GPT entry array CRC mismatch"));
    }
    let mut parts = Vec::new();
    for (i, e) in array.chunks_exact(hdr.entry_size as usize).enumerate() {
        let type_guid = &e[..16];
        if type_guid.iter().all(|b| *b == 0) {
            continue;
        }
        let number = i as u32 + 1;
        let first = u64_at(e, 32);
        let last = u64_at(e, 40);
        if first > last || first < hdr.first_usable || last > hdr.last_usable {
            return Err(bad(
                disk,
                format!(
                    "GPT partition {number} (LBA {first}..={last}) is outside the usable range LBA {}..={}",
                    hdr.first_usable, hdr.last_usable
                ),
            ));
        }
        let start = first
            .checked_mul(SECTOR)
            .ok_or_else(|| bad(disk, format!("GPT partition {number} start overflows")))?;
        let len = (last - first + 1)
            .checked_mul(SECTOR)
            .ok_or_else(|| bad(disk, format!("GPT partition {number} length overflows")))?;
        inside(
            disk,
            &format!("GPT partition {number}"),
            start,
            len,
            disk_size,
        )?;
        let units: Vec<u16> = e[56..128]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|u| *u != 0)
            .collect();
        parts.push(Partition {
            number,
            start,
            len,
            kind: guid_string(type_guid),
            name: String::from_utf16_lossy(&units),
        });
    }
    check_overlaps(disk, &parts)?;
    Ok(parts)
}

/// A GUID in its mixed-endian text form.
fn guid_string(g: &[u8]) -> String {
    format!(
        "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{}",
        u32_at(g, 0),
        u16::from_le_bytes([g[4], g[5]]),
        u16::from_le_bytes([g[6], g[7]]),
        g[8],
        g[9],
        g[10..16]
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<String>()
    )
}

/// CRC-32 (IEEE 802.3, reflected), as GPT uses.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc = CRC_TABLE[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

const CRC_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// Reads the partition table of `disk` (at most the first two sectors and a bounded GPT
/// entry array).
pub async fn read_table(disk: &PointDisk) -> Result<PartitionTable, Error> {
    let size = disk.size();
    let label = disk.label();
    if size < 2 * SECTOR {
        return Ok(PartitionTable {
            scheme: Scheme::None,
            partitions: Vec::new(),
        });
    }
    let head = disk.read(0, 2 * SECTOR as usize).await?;
    match parse_mbr(label, &head[..512], size)? {
        Mbr::Absent => Ok(PartitionTable {
            scheme: Scheme::None,
            partitions: Vec::new(),
        }),
        Mbr::Dos(partitions) => Ok(PartitionTable {
            scheme: Scheme::Mbr,
            partitions,
        }),
        Mbr::Protective => {
            let hdr = parse_gpt_header(label, &head[512..], size)?;
            let array = disk
                .read(hdr.entries_lba * SECTOR, hdr.array_bytes() as usize)
                .await?;
            let partitions = parse_gpt_entries(label, &hdr, &array, size)?;
            Ok(PartitionTable {
                scheme: Scheme::Gpt,
                partitions,
            })
        }
    }
}

#[cfg(test)]
#[path = "partition_tests.rs"]
mod tests;
