use proptest::prelude::*;

use super::*;

const DISK: u64 = 64 << 20;

fn mbr(entries: &[(u8, u32, u32)]) -> Vec<u8> {
    let mut s = vec![0u8; 512];
    for (i, (kind, first, sectors)) in entries.iter().enumerate() {
        let e = &mut s[446 + i * 16..446 + (i + 1) * 16];
        e[4] = *kind;
        e[8..12].copy_from_slice(&first.to_le_bytes());
        e[12..16].copy_from_slice(&sectors.to_le_bytes());
    }
    s[510] = 0x55;
    s[511] = 0xAA;
    s
}

/// A valid GPT header (LBA 1) and entry array for partitions given as (first, last) LBAs.
fn gpt(parts: &[(u64, u64)]) -> (Vec<u8>, Vec<u8>) {
    let mut array = vec![0u8; 128 * 128];
    for (i, (first, last)) in parts.iter().enumerate() {
        let e = &mut array[i * 128..(i + 1) * 128];
        e[..16].copy_from_slice(&[0xAF; 16]);
        e[32..40].copy_from_slice(&first.to_le_bytes());
        e[40..48].copy_from_slice(&last.to_le_bytes());
        e[56] = b'p';
    }
    let mut h = vec![0u8; 512];
    h[..8].copy_from_slice(b"EFI PART");
    h[12..16].copy_from_slice(&92u32.to_le_bytes());
    h[40..48].copy_from_slice(&34u64.to_le_bytes());
    h[48..56].copy_from_slice(&(DISK / 512 - 34).to_le_bytes());
    h[72..80].copy_from_slice(&2u64.to_le_bytes());
    h[80..84].copy_from_slice(&128u32.to_le_bytes());
    h[84..88].copy_from_slice(&128u32.to_le_bytes());
    h[88..92].copy_from_slice(&crc32(&array).to_le_bytes());
    let crc = crc32(&h[..92]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    (h, array)
}

#[test]
fn crc32_matches_the_standard_check_value() {
    assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
}

#[test]
fn mbr_partitions_inside_the_disk_are_listed() {
    let s = mbr(&[(0x83, 2048, 4096), (0x82, 8192, 2048)]);
    let Mbr::Dos(parts) = parse_mbr("d", &s, DISK).unwrap() else {
        panic!("not DOS");
    };
    assert_eq!(parts.len(), 2);
    assert_eq!((parts[0].start, parts[0].len), (2048 * 512, 4096 * 512));
    assert_eq!(parts[1].kind, "0x82");
}

#[test]
fn mbr_partition_past_the_end_is_refused() {
    let sectors = (DISK / 512) as u32;
    let s = mbr(&[(0x83, 2048, sectors)]);
    let err = parse_mbr("d", &s, DISK).unwrap_err();
    assert!(matches!(err, Error::PartitionTable { .. }), "{err}");
    assert!(err.to_string().contains("past the end"), "{err}");
}

#[test]
fn protective_mbr_means_gpt_and_gpt_is_read() {
    let s = mbr(&[(0xEE, 1, u32::MAX)]);
    assert_eq!(parse_mbr("d", &s, DISK).unwrap(), Mbr::Protective);
    let (h, array) = gpt(&[(2048, 4095), (4096, 8191)]);
    let hdr = parse_gpt_header("d", &h, DISK).unwrap();
    let parts = parse_gpt_entries("d", &hdr, &array, DISK).unwrap();
    assert_eq!(parts.len(), 2);
    assert_eq!(parts[1].number, 2);
    assert_eq!(parts[1].start, 4096 * 512);
    assert_eq!(parts[0].name, "p");
}

#[test]
fn gpt_partition_past_the_end_is_refused() {
    // A header whose usable range claims more than the disk has.
    let (h, array) = gpt(&[(2048, DISK / 512 + 10)]);
    let hdr = parse_gpt_header("d", &h, DISK).unwrap();
    let err = parse_gpt_entries("d", &hdr, &array, DISK).unwrap_err();
    assert!(matches!(err, Error::PartitionTable { .. }), "{err}");
    // The same table on a disk half the size: the header itself is refused.
    assert!(parse_gpt_header("d", &h, DISK / 2).is_err());
}

#[test]
fn gpt_crc_mismatch_and_overlap_are_refused() {
    let (mut h, array) = gpt(&[(2048, 4095)]);
    h[40] ^= 1;
    assert!(parse_gpt_header("d", &h, DISK).is_err());
    let (h, array2) = gpt(&[(2048, 4095), (4000, 5000)]);
    let hdr = parse_gpt_header("d", &h, DISK).unwrap();
    assert!(parse_gpt_entries("d", &hdr, &array2, DISK).is_err());
    assert!(parse_gpt_entries("d", &hdr, &array, DISK).is_err()); // CRC of another array
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// Any first sector: an answer or an error, never a panic; every partition inside.
    #[test]
    fn any_mbr_parses_or_errs(s in proptest::collection::vec(any::<u8>(), 512), size in 0u64..(1 << 40)) {
        let mut s = s;
        s[510] = 0x55;
        s[511] = 0xAA;
        if let Ok(Mbr::Dos(parts)) = parse_mbr("d", &s, size) {
            for p in parts {
                prop_assert!(p.start + p.len <= size);
            }
        }
    }

    /// Random damage to a valid GPT header and array: never a panic, never a partition
    /// outside the disk, never an array larger than the bound.
    #[test]
    fn damaged_gpt_parses_or_errs(
        flips in proptest::collection::vec((0usize..512 + 128 * 128, any::<u8>()), 1..8),
        fix_crc in any::<bool>(),
        size in (1u64 << 20)..(1 << 30),
    ) {
        let (mut h, mut array) = gpt(&[(2048, 4095), (4096, 8191)]);
        for (at, v) in flips {
            if at < 512 { h[at] = v } else { array[at - 512] = v }
        }
        if fix_crc {
            let c = crc32(&array);
            h[88..92].copy_from_slice(&c.to_le_bytes());
            h[16..20].fill(0);
            let c = crc32(&h[..92]);
            h[16..20].copy_from_slice(&c.to_le_bytes());
        }
        if let Ok(hdr) = parse_gpt_header("d", &h, size) {
            prop_assert!(hdr.array_bytes() <= MAX_GPT_ENTRY_BYTES);
            let mut arr = array.clone();
            arr.resize(hdr.array_bytes() as usize, 0);
            if let Ok(parts) = parse_gpt_entries("d", &hdr, &arr, size) {
                for p in parts {
                    prop_assert!(p.start + p.len <= size);
                }
            }
        }
    }
}
