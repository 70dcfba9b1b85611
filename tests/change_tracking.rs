//! Change tracking from reflink extents, on real loop-mounted XFS (reflink=1) and btrfs: an
//! incremental reads only the blocks the guest wrote since the last backup (the others share
//! their extents with the kept base), every point restores bit-exact, and a base that cannot
//! be trusted (written to, or of another point) is ignored: the disk is read in full.

// Test helpers, like the tests themselves, panic on failure.
#![allow(clippy::unwrap_used)]

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::PathBuf;

use bulwark_tests::{
    FsType, LoopFs, controller, controller_json, file_digest, pseudo_random, root_or_skip,
    stderr_of,
};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const TAIL: usize = 12 * 1024;

struct Env {
    _fs: LoopFs,
    _dir: tempfile::TempDir,
    vault: String,
    image: PathBuf,
    restores: PathBuf,
}

fn env(fs: FsType) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let lfs = LoopFs::create(dir.path(), "store", 512 * MIB, fs);
    let image = lfs.path().join("os.img");
    // 40 MiB of data in 1 MiB blocks, a 16 MiB hole, 8 MiB more, and a short last block of
    // 12 KiB: 65 blocks, 49 of them data.
    let f = std::fs::File::create(&image).unwrap();
    f.set_len(64 * MIB + TAIL as u64).unwrap();
    f.write_all_at(&pseudo_random(TAIL, 3), 64 * MIB).unwrap();
    f.write_all_at(&pseudo_random((40 * MIB) as usize, 1), 0)
        .unwrap();
    f.write_all_at(&pseudo_random((8 * MIB) as usize, 2), 56 * MIB)
        .unwrap();
    // Block 3 holds text (compressible): stored as zstd frames, which an incremental reuses.
    f.write_all_at(&text(MIB as usize), 3 * MIB).unwrap();
    f.sync_all().unwrap();
    let restores = dir.path().join("restores");
    std::fs::create_dir(&restores).unwrap();
    Env {
        vault: lfs.path().join("vault").display().to_string(),
        image,
        restores,
        _fs: lfs,
        _dir: dir,
    }
}

impl Env {
    fn backup(&self, extra: &[&str]) -> Value {
        let disk = format!("os={}", self.image.display());
        let mut args = vec![
            "backup",
            "--vault",
            &self.vault,
            "--vm",
            "vm1",
            "--disk",
            &disk,
            "--snapshot",
            "reflink",
            "--json",
        ];
        args.extend_from_slice(extra);
        controller_json(args)
    }

    fn write(&self, offset: u64, len: usize, seed: u64) {
        let f = OpenOptions::new().write(true).open(&self.image).unwrap();
        f.write_all_at(&pseudo_random(len, seed), offset).unwrap();
        f.sync_all().unwrap();
    }

    /// Restores `point` and checks it against the digest of the image when it was taken.
    fn check_restore(&self, point: &str, want: &str) {
        let to = self.restores.join(point);
        let out = controller([
            "restore",
            "--vault",
            &self.vault,
            "--vm",
            "vm1",
            "--point",
            point,
            "--disk",
            "os",
            "--to",
            to.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "restore: {}", stderr_of(&out));
        assert_eq!(file_digest(&to), want, "point {point} restores bit-exact");
    }

    fn base(&self) -> PathBuf {
        self.image
            .parent()
            .unwrap()
            .join(".bulwark-snapshots/vm1/.base/os.img")
    }
}

/// `len` bytes of numbered lines: compressible, and different in every line.
fn text(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut i = 0u64;
    while out.len() < len {
        out.extend_from_slice(format!("line {i:>12} of the text block\n").as_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

fn stats(report: &Value) -> &Value {
    &report["disks"][0]
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("{k} in {v}"))
}

fn scenario(fs: FsType) {
    let e = env(fs);
    let full = e.backup(&[]);
    let s = stats(&full);
    assert_eq!(u(s, "changed_blocks"), 49, "{s}");
    assert_eq!(u(s, "blocks_not_read"), 0);
    let d1 = file_digest(&e.image);
    assert!(e.base().exists(), "the snapshot is kept as the base");
    let mode = std::fs::metadata(e.base()).unwrap().permissions().mode();
    assert_eq!(mode & 0o222, 0, "the base is read-only");

    // The guest writes 64 KiB in block 3, 4 KiB across the 9/10 boundary, a block in the
    // hole (which was a hole in the base) and into the short last block.
    e.write(3 * MIB + 4096, 65536, 10);
    e.write(10 * MIB - 2048, 4096, 11);
    e.write(45 * MIB, 4096, 12);
    e.write(64 * MIB + 4096, 100, 16);
    let inc = e.backup(&[]);
    let s = stats(&inc);
    assert_eq!(u(s, "changed_blocks"), 5, "blocks 3, 9, 10, 45 and 64: {s}");
    assert_eq!(
        u(s, "bytes_read"),
        4 * MIB + TAIL as u64,
        "only the changed blocks are read: {s}"
    );
    assert_eq!(u(s, "blocks_not_read"), 45, "{s}");
    // Block 3 was compressed in 128 KiB frames; the 64 KiB write touched the first only, so
    // the others are taken from the old object, not compressed again (the random blocks are
    // stored raw: nothing to take). Tracking's extents may round the write up, never down.
    let reused = u(s, "bytes_reused");
    assert!(
        (5 * 128 * 1024..=7 * 128 * 1024).contains(&reused),
        "most of block 3's frames reused: {s}"
    );
    let d2 = file_digest(&e.image);

    // Somebody writes to the base (after making it writable): its ctime moves, the base is
    // no longer trusted, and the next backup reads the whole disk and still sees every change.
    let base = e.base();
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o600)).unwrap();
    OpenOptions::new()
        .write(true)
        .open(&base)
        .unwrap()
        .write_all_at(&[0xAA; 4096], 20 * MIB)
        .unwrap();
    e.write(20 * MIB, 4096, 13);
    let after_tamper = e.backup(&[]);
    let s = stats(&after_tamper);
    assert_eq!(u(s, "blocks_not_read"), 0, "a written base is ignored: {s}");
    assert_eq!(
        u(s, "bytes_reused"),
        0,
        "block 20 is random, stored raw: no frames to take: {s}"
    );
    assert_eq!(u(s, "changed_blocks"), 1, "{s}");
    let d3 = file_digest(&e.image);

    // Without change tracking the base is removed; the next backup reads everything. The
    // write lands in the second 128 KiB of block 3: the vault compares the other seven spans
    // with the old object's frames and takes them, as nothing vouches for them.
    e.write(3 * MIB + 200 * 1024, 4096, 14);
    let off = e.backup(&["--no-change-tracking"]);
    assert!(!e.base().exists(), "--no-change-tracking removes the base");
    assert_eq!(u(stats(&off), "changed_blocks"), 1);
    assert_eq!(
        u(stats(&off), "bytes_reused"),
        7 * 128 * 1024,
        "block 3's unchanged frames, found by comparing: {}",
        stats(&off)
    );
    let d4 = file_digest(&e.image);
    let again = e.backup(&[]);
    assert_eq!(u(stats(&again), "blocks_not_read"), 0);
    assert_eq!(u(stats(&again), "changed_blocks"), 0);
    // ...and the one after that tracks again.
    e.write(0, 4096, 15);
    let tracked = e.backup(&[]);
    assert_eq!(u(stats(&tracked), "changed_blocks"), 1);
    assert_eq!(u(stats(&tracked), "blocks_not_read"), 49);
    let d5 = file_digest(&e.image);

    for (r, d) in [
        (&full, &d1),
        (&inc, &d2),
        (&after_tamper, &d3),
        (&off, &d4),
        (&tracked, &d5),
    ] {
        e.check_restore(r["point"].as_str().unwrap(), d);
    }
    let out = controller(["verify", "--vault", &e.vault]);
    assert!(out.status.success(), "verify: {}", stderr_of(&out));
}

#[test]
fn xfs_incremental_reads_only_changed_extents() {
    if !root_or_skip(
        "xfs_incremental_reads_only_changed_extents",
        &["mkfs.xfs", "losetup"],
    ) {
        return;
    }
    scenario(FsType::XfsReflink);
}

#[test]
fn btrfs_incremental_reads_only_changed_extents() {
    if !root_or_skip(
        "btrfs_incremental_reads_only_changed_extents",
        &["mkfs.btrfs", "losetup"],
    ) {
        return;
    }
    scenario(FsType::Btrfs);
}

/// A base that claims another point (the vault's latest point is not the one it holds) is not
/// trusted.
#[test]
fn base_of_another_point_is_ignored() {
    if !root_or_skip("base_of_another_point_is_ignored", &["mkfs.xfs", "losetup"]) {
        return;
    }
    let e = env(FsType::XfsReflink);
    e.backup(&[]);
    let info = e.base().with_extension("json");
    let text = std::fs::read_to_string(&info).unwrap();
    let mut v: Value = serde_json::from_str(&text).unwrap();
    v["point"] = Value::from("20200101T000000Z-0000");
    std::fs::write(&info, v.to_string()).unwrap();
    e.write(5 * MIB, 4096, 20);
    let inc = e.backup(&[]);
    assert_eq!(u(stats(&inc), "blocks_not_read"), 0);
    assert_eq!(u(stats(&inc), "changed_blocks"), 1);
    e.check_restore(inc["point"].as_str().unwrap(), &file_digest(&e.image));
    // A garbled info file is no better.
    std::fs::write(&info, b"{not json").unwrap();
    e.write(6 * MIB, 4096, 21);
    let inc = e.backup(&[]);
    assert_eq!(u(stats(&inc), "blocks_not_read"), 0);
    assert_eq!(u(stats(&inc), "changed_blocks"), 1);
    e.check_restore(inc["point"].as_str().unwrap(), &file_digest(&e.image));
}

/// A snapshot kept for instant restore stays where it is; the base is a clone of it, and the
/// next backup still tracks changes.
#[test]
fn kept_snapshots_and_change_tracking() {
    if !root_or_skip(
        "kept_snapshots_and_change_tracking",
        &["mkfs.xfs", "losetup"],
    ) {
        return;
    }
    let e = env(FsType::XfsReflink);
    let snaps = e.image.parent().unwrap().join("snaps");
    let dir = snaps.display().to_string();
    let keep = ["--snapshot-dir", dir.as_str(), "--keep-snapshot-days", "1"];
    let first = e.backup(&keep);
    let point = first["point"].as_str().unwrap();
    let kept = snaps.join(format!("vm1/os-{point}.snap"));
    assert!(kept.exists(), "the kept snapshot stays: {}", kept.display());
    assert!(
        snaps.join("vm1/.base/os.img").exists(),
        "the base is a clone beside it"
    );
    e.write(7 * MIB, 8192, 30);
    let second = e.backup(&keep);
    assert_eq!(u(stats(&second), "changed_blocks"), 1);
    assert_eq!(u(stats(&second), "blocks_not_read"), 48);
    assert!(kept.exists(), "the first kept snapshot is untouched");
    e.check_restore(second["point"].as_str().unwrap(), &file_digest(&e.image));
}

/// While another backup of the disk holds its base (the lock), a backup reads the whole disk
/// and leaves the base alone; tracking resumes once the base is the latest point's again.
#[test]
fn locked_base_is_left_alone() {
    if !root_or_skip("locked_base_is_left_alone", &["mkfs.xfs", "losetup"]) {
        return;
    }
    let e = env(FsType::XfsReflink);
    e.backup(&[]);
    let info = e.base().with_extension("json");
    let record = std::fs::read(&info).unwrap();
    let lock = std::fs::File::open(e.base().with_extension("lock")).unwrap();
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).unwrap();
    e.write(5 * MIB, 4096, 40);
    let busy = e.backup(&[]);
    assert_eq!(
        u(stats(&busy), "blocks_not_read"),
        0,
        "base busy: read it all"
    );
    assert_eq!(u(stats(&busy), "changed_blocks"), 1);
    assert_eq!(
        std::fs::read(&info).unwrap(),
        record,
        "the base was left alone"
    );
    drop(lock);
    // The base still holds the first point, not the latest: not trusted, replaced.
    e.write(6 * MIB, 4096, 41);
    let stale = e.backup(&[]);
    assert_eq!(u(stats(&stale), "blocks_not_read"), 0);
    assert_eq!(u(stats(&stale), "changed_blocks"), 1);
    e.write(7 * MIB, 4096, 42);
    let tracked = e.backup(&[]);
    assert_eq!(u(stats(&tracked), "blocks_not_read"), 48);
    assert_eq!(u(stats(&tracked), "changed_blocks"), 1);
    for r in [&busy, &stale] {
        let p = r["point"].as_str().unwrap();
        let to = e.restores.join(p);
        let out = controller([
            "restore",
            "--vault",
            &e.vault,
            "--vm",
            "vm1",
            "--point",
            p,
            "--disk",
            "os",
            "--to",
            to.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "restore: {}", stderr_of(&out));
    }
    e.check_restore(tracked["point"].as_str().unwrap(), &file_digest(&e.image));
}
