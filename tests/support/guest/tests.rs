//! Unit tests of the point-in-time checker, on synthetic slot states and synthetic images
//! (raw, qcow2, ext4 made with `mkfs.ext4 -d`), including states that must fail.
#![allow(clippy::unwrap_used)]

use super::slots::{self, Layout, SLOT_SIZE, SlotState};
use super::*;

fn two_disks(n: u32) -> WriterSpec {
    WriterSpec::os_files_and_data_blocks(n)
}

/// The states of every slot after the writes `1..=cut` (per target: `cuts[t]`), from a
/// simulation of the writer's order.
fn simulate(layout: &Layout, cuts: &[u64]) -> Vec<Vec<u64>> {
    let order = layout.order();
    let mut gens: Vec<Vec<u64>> = layout
        .targets
        .iter()
        .map(|(_, n)| vec![0; *n as usize])
        .collect();
    let max = cuts.iter().copied().max().unwrap_or(0);
    for g in 1..=max {
        let (t, s) = layout.slot_of(&order, g);
        if g <= cuts[t] {
            gens[t][s as usize] = g;
        }
    }
    gens
}

fn states(gens: &[Vec<u64>]) -> Vec<Vec<SlotState>> {
    gens.iter()
        .map(|v| {
            v.iter()
                .map(|&g| {
                    if g == 0 {
                        SlotState::Zero
                    } else {
                        SlotState::Generation(g)
                    }
                })
                .collect()
        })
        .collect()
}

#[test]
fn order_alternates_between_disks() {
    let l = Layout::new([("a", 3), ("b", 2)]);
    assert_eq!(l.order(), vec![(0, 0), (1, 0), (0, 1), (1, 1), (0, 2)]);
    let o = l.order();
    assert_eq!(l.slot_of(&o, 1), (0, 0));
    assert_eq!(l.slot_of(&o, 5), (0, 2));
    assert_eq!(l.slot_of(&o, 6), (0, 0));
}

#[test]
fn encode_decode_round_trip_and_reject_other_slots() {
    let mut b = vec![0u8; SLOT_SIZE];
    slots::encode(&mut b, 42, 1, 7);
    assert_eq!(slots::decode(&b, 1, 7), SlotState::Generation(42));
    assert_eq!(slots::decode(&b, 0, 7), SlotState::Corrupt);
    assert_eq!(slots::decode(&b, 1, 6), SlotState::Corrupt);
    assert_eq!(slots::decode(&[0u8; SLOT_SIZE], 1, 7), SlotState::Zero);
    b[3000] ^= 1;
    assert_eq!(slots::decode(&b, 1, 7), SlotState::Corrupt);
    assert_eq!(slots::decode(&b[..100], 1, 7), SlotState::Corrupt);
}

#[test]
fn every_prefix_passes() {
    let l = Layout::new([("os", 5), ("data", 4)]);
    for cut in [0, 1, 2, 8, 9, 10, 17, 9 * 7 + 3] {
        let s = states(&simulate(&l, &[cut, cut]));
        assert_eq!(slots::check(&l, &s), Ok(slots::Cut { cut }), "cut {cut}");
    }
}

#[test]
fn one_disk_behind_fails() {
    let l = Layout::new([("os", 8), ("data", 8)]);
    // "data" stopped 10 writes before "os": a torn cut across the disks.
    // (Odd generations go to "os", even ones to "data": the newest write seen is 99.)
    let s = states(&simulate(&l, &[100, 90]));
    let err = slots::check(&l, &s).unwrap_err();
    assert_eq!(err.cut, 99);
    assert!(err.mismatches.iter().all(|m| m.target == "data"), "{err}");
    assert_eq!(err.mismatches.len(), 4, "{err}"); // 92, 94, 96, 98
    let msg = err.to_string();
    assert!(msg.contains("not one point in time"), "{msg}");
    assert!(msg.contains("data slot"), "{msg}");
}

#[test]
fn one_disk_ahead_fails() {
    let l = Layout::new([("os", 8), ("data", 8)]);
    let s = states(&simulate(&l, &[100, 104]));
    let err = slots::check(&l, &s).unwrap_err();
    assert_eq!(err.cut, 104);
    assert!(err.mismatches.iter().all(|m| m.target == "os"), "{err}");
}

#[test]
fn a_lost_write_in_the_middle_fails() {
    let l = Layout::new([("os", 4), ("data", 4)]);
    let mut g = simulate(&l, &[50, 50]);
    // Write 45 never arrived; its slot still holds the previous round's 37.
    let (t, s) = l.slot_of(&l.order(), 45);
    assert_eq!(g[t][s as usize], 45);
    g[t][s as usize] = 37;
    let err = slots::check(&l, &states(&g)).unwrap_err();
    assert_eq!(err.mismatches.len(), 1);
    assert_eq!(err.mismatches[0].expected, 45);
}

#[test]
fn a_torn_block_fails() {
    let l = Layout::new([("os", 4), ("data", 4)]);
    let mut st = states(&simulate(&l, &[20, 20]));
    st[1][2] = SlotState::Corrupt;
    let err = slots::check(&l, &st).unwrap_err();
    assert!(err.to_string().contains("torn"), "{err}");
}

#[test]
fn wrong_shape_fails() {
    let l = Layout::new([("os", 4), ("data", 4)]);
    let st = states(&simulate(&Layout::new([("os", 4), ("data", 3)]), &[5, 5]));
    assert!(slots::check(&l, &st).unwrap_err().shape.is_some());
    assert!(slots::check(&l, &st[..1]).unwrap_err().shape.is_some());
}

#[test]
fn base64_round_trip() {
    for s in ["", "a", "ab", "abc", "abcd", "echo 'x' | y\n\u{e9}"] {
        let e = base64_encode(s.as_bytes());
        assert_eq!(base64_decode(&e), s.as_bytes(), "{s:?} -> {e}");
    }
    assert_eq!(base64_encode(b"hello"), "aGVsbG8=");
}

#[test]
fn writer_log_lines_parse() {
    assert_eq!(
        WriterEvent::parse("gen=12 t=1000"),
        Some(WriterEvent::Progress {
            generation: 12,
            t_ns: 1000
        })
    );
    assert!(matches!(
        WriterEvent::parse("summary last_gen=9 writes=9 secs=1.5 rate=6.0 max_gap_ms=3 t=5"),
        Some(WriterEvent::Summary(WriterSummary { writes: 9, .. }))
    ));
    assert_eq!(WriterEvent::parse("garbage"), None);
}

#[test]
fn stalls_and_last_generation_of_a_log() {
    let log: Vec<WriterEvent> = [
        "start gen=4 t=1",
        "gen=7 t=2",
        "stall gen=9 gap_ms=150 t=3",
        "gen=12 t=4",
        "paused gen=12 t=5",
        "stall gen=13 gap_ms=900 t=6",
        "resumed gen=13 t=7",
    ]
    .iter()
    .filter_map(|l| WriterEvent::parse(l))
    .collect();
    assert_eq!(log.len(), 7);
    assert_eq!(stalls(&log), vec![150, 900]);
    assert_eq!(last_generation(&log), 13);
    assert_eq!(last_generation(&log[..4]), 12);
    assert_eq!(last_generation(&log[..1]), 0, "a start line is no progress");
    assert_eq!(stalls(&log[..2]), Vec::<u64>::new());
}

// ---- synthetic images ---------------------------------------------------------------------

/// The two disks [`create_os_and_data_disks`] makes hold the writer's generation 0: the
/// checker finds the cut before the first write.
#[test]
fn new_os_and_data_disks_hold_generation_zero() {
    if !tools_or_skip("new_os_and_data_disks_hold_generation_zero") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let spec = two_disks(6);
    let (os, data) = create_os_and_data_disks(dir.path(), &spec, 32 << 20, 8 << 20);
    assert_eq!(std::fs::metadata(&data).unwrap().len(), 8 << 20);
    let images = HashMap::from([
        ("os".to_string(), (os, DiskFormat::Qcow2)),
        ("data".to_string(), (data, DiskFormat::Raw)),
    ]);
    assert_eq!(verify_point(&spec, &images, dir.path()).unwrap().cut, 0);
}

fn tools_or_skip(test: &str) -> bool {
    let missing: Vec<_> = ["qemu-img", "mkfs.ext4", "e2fsck", "debugfs"]
        .into_iter()
        .filter(|t| crate::which(t).is_none())
        .collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var(crate::REQUIRE_ROOT_ENV).is_err(),
        "{test}: needs {missing:?}, and {} forbids skipping",
        crate::REQUIRE_ROOT_ENV
    );
    eprintln!("SKIPPED {test}: needs {missing:?}");
    false
}

/// Writes images of the two-disk spec as if the writer had reached `cuts[t]` on disk t: "os" is
/// an ext4 file system in a qcow2 image, "data" a raw image.
fn make_images(
    dir: &Path,
    spec: &WriterSpec,
    cuts: &[u64],
) -> HashMap<String, (PathBuf, DiskFormat)> {
    let layout = spec.layout();
    let gens = simulate(&layout, cuts);
    let mut buf = vec![0u8; SLOT_SIZE];
    // os: ext4 with the slot files, via mkfs.ext4 -d, then qcow2.
    let root = dir.join("root");
    let sd = root.join(SLOT_DIR);
    std::fs::create_dir_all(&sd).unwrap();
    for (s, &g) in gens[0].iter().enumerate() {
        slots::encode(&mut buf, g, 0, s as u32);
        std::fs::write(sd.join(slots::slot_file_name(s as u32)), &buf).unwrap();
    }
    let fs_raw = dir.join("os.raw");
    std::fs::File::create(&fs_raw)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    run(
        "mkfs.ext4",
        [
            OsStr::new("-q"),
            OsStr::new("-F"),
            OsStr::new("-d"),
            root.as_os_str(),
            fs_raw.as_os_str(),
        ],
    );
    let os = dir.join("os.qcow2");
    convert(&fs_raw, "raw", &os, "qcow2");
    // data: raw block slots.
    let data = dir.join("data.raw");
    let f = std::fs::File::create(&data).unwrap();
    f.set_len(8 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    for (s, &g) in gens[1].iter().enumerate() {
        if g > 0 {
            slots::encode(&mut buf, g, 1, s as u32);
            f.write_all_at(&buf, slots::BLOCK_BASE + s as u64 * SLOT_SIZE as u64)
                .unwrap();
        }
    }
    HashMap::from([
        ("os".to_string(), (os, DiskFormat::Qcow2)),
        ("data".to_string(), (data, DiskFormat::Raw)),
    ])
}

fn convert(from: &Path, ff: &str, to: &Path, tf: &str) {
    run(
        "qemu-img",
        [
            OsStr::new("convert"),
            OsStr::new("-q"),
            OsStr::new("-f"),
            OsStr::new(ff),
            OsStr::new("-O"),
            OsStr::new(tf),
            from.as_os_str(),
            to.as_os_str(),
        ],
    );
}

#[test]
fn images_of_one_point_pass() {
    if !tools_or_skip("images_of_one_point_pass") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let spec = two_disks(6);
    let images = make_images(dir.path(), &spec, &[77, 77]);
    assert_eq!(
        verify_point(&spec, &images, dir.path()),
        Ok(slots::Cut { cut: 77 })
    );
}

#[test]
fn images_of_a_torn_cut_fail() {
    if !tools_or_skip("images_of_a_torn_cut_fail") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let spec = two_disks(6);
    // The raw disk was captured 4 writes later than the ext4 disk.
    let images = make_images(dir.path(), &spec, &[77, 81]);
    let err = verify_point(&spec, &images, dir.path()).unwrap_err();
    assert!(err.contains("not one point in time"), "{err}");
    assert!(err.contains("os slot"), "{err}");
}

#[test]
fn a_torn_block_in_an_image_fails() {
    if !tools_or_skip("a_torn_block_in_an_image_fails") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let spec = two_disks(6);
    let images = make_images(dir.path(), &spec, &[40, 40]);
    // Half of one raw slot holds the next round's write.
    let (data, _) = &images["data"];
    let layout = spec.layout();
    let (t, s) = layout.slot_of(&layout.order(), 40);
    assert_eq!(t, 1);
    let mut newer = vec![0u8; SLOT_SIZE];
    slots::encode(&mut newer, 40 + 12, 1, s);
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(data)
        .unwrap()
        .write_all_at(
            &newer[..SLOT_SIZE / 2],
            slots::BLOCK_BASE + u64::from(s) * SLOT_SIZE as u64,
        )
        .unwrap();
    let err = verify_point(&spec, &images, dir.path()).unwrap_err();
    assert!(err.contains("torn"), "{err}");
}

#[test]
fn a_damaged_file_system_fails() {
    if !tools_or_skip("a_damaged_file_system_fails") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let spec = two_disks(6);
    let mut images = make_images(dir.path(), &spec, &[30, 30]);
    // Zero the first block-group descriptors and inode table area of the ext4 disk.
    let raw = dir.path().join("os-damaged.raw");
    convert(&images["os"].0, "qcow2", &raw, "raw");
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
    f.write_all_at(&vec![0u8; 64 << 10], 4096).unwrap();
    images.insert("os".into(), (raw, DiskFormat::Raw));
    let err = verify_point(&spec, &images, dir.path()).unwrap_err();
    assert!(err.contains("disk os"), "{err}");
}
