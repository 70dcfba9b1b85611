//! Real guest file systems (root): an ext4 guest image made with mkfs.ext4 and loop-mounted,
//! backed up, changed, backed up again; both points restored and checked with `e2fsck -fn`
//! and file checksums. One run keeps the guest image on a loop-mounted XFS with reflink, so
//! the reflink snapshot provider is exercised for real (and one on btrfs).
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use bulwark_tests::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// Writes a small "system": text files, a binary blob, nested directories.
fn populate(root: &Path, seed: u64) {
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::create_dir_all(root.join("var/lib/db")).unwrap();
    for i in 0..20 {
        let text = format!("config {i} seed {seed}\n").repeat(200 + i as usize);
        std::fs::write(root.join(format!("etc/file{i}.conf")), text).unwrap();
    }
    std::fs::write(
        root.join("var/lib/db/blob.bin"),
        pseudo_random(6 * MIB as usize, seed),
    )
    .unwrap();
}

/// Changes some files, adds one, removes one.
fn mutate(root: &Path, seed: u64) {
    std::fs::write(root.join("etc/file3.conf"), format!("rewritten {seed}\n")).unwrap();
    std::fs::remove_file(root.join("etc/file7.conf")).unwrap();
    std::fs::write(
        root.join("var/lib/db/new.bin"),
        pseudo_random(3 * MIB as usize, seed + 1),
    )
    .unwrap();
    write_random(&root.join("var/lib/db/blob.bin"), 2 * MIB, 8192, seed + 2);
}

/// Relative path → SHA-256 of every regular file under `root` (lost+found excluded).
fn checksums(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if rel == "lost+found" {
                continue;
            }
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(rel, file_digest(&p));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn e2fsck_clean(image: &Path) {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "e2fsck -fn {} failed:\n{}{}",
        image.display(),
        stdout_of(&out),
        stderr_of(&out)
    );
}

struct Cycle {
    points: Vec<(String, BTreeMap<String, String>, String)>,
}

/// Backs up the guest image `image` (an unmounted ext4), changes it, backs up again, and
/// returns the points with the file checksums and image digest each must restore to.
fn two_backups(vault: &str, image: &Path, mnt: &Path, snapshot: &str) -> (Cycle, Vec<Value>) {
    let mut points = Vec::new();
    let mut reports = Vec::new();
    for round in 0..2u64 {
        let mut fs = LoopFs::mount_image(image, mnt);
        if round == 0 {
            populate(fs.path(), 7);
        } else {
            mutate(fs.path(), 11);
        }
        let sums = checksums(fs.path());
        fs.unmount();
        let r = controller_json([
            "backup",
            "--vault",
            vault,
            "--vm",
            "guest",
            "--disk",
            &format!("root={}", image.display()),
            "--snapshot",
            snapshot,
            "--json",
        ]);
        points.push((
            r["point"].as_str().unwrap().to_string(),
            sums,
            file_digest(image),
        ));
        reports.push(r);
    }
    (Cycle { points }, reports)
}

fn restore_and_check(vault: &str, cycle: &Cycle, work: &Path) {
    for (i, (point, sums, digest)) in cycle.points.iter().enumerate() {
        let to = work.join(format!("restored-{i}.img"));
        let out = controller([
            "restore",
            "--vault",
            vault,
            "--vm",
            "guest",
            "--point",
            point,
            "--disk",
            "root",
            "--to",
            to.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", stderr_of(&out));
        assert_eq!(
            &file_digest(&to),
            digest,
            "image of point {point} is bit-identical"
        );
        e2fsck_clean(&to);
        let fs = LoopFs::mount_image(&to, &work.join(format!("mnt-restored-{i}")));
        assert_eq!(&checksums(fs.path()), sums, "files of point {point}");
    }
}

#[test]
fn ext4_guest_backup_change_backup_restore_both() {
    if !root_or_skip(
        "ext4_guest_backup_change_backup_restore_both",
        &["mkfs.ext4", "e2fsck", "losetup"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("guest.img");
    make_fs_image(&image, 96 * MIB, FsType::Ext4);
    let vault = dir.path().join("vault");
    let (cycle, reports) = two_backups(
        vault.to_str().unwrap(),
        &image,
        &dir.path().join("mnt"),
        "auto",
    );
    // The incremental read the disk but uploaded a fraction of it.
    let inc = &reports[1]["disks"][0];
    assert!(
        inc["changed_blocks"].as_u64().unwrap() < inc["blocks"].as_u64().unwrap() / 4,
        "{inc}"
    );
    assert!(inc["unchanged_blocks"].as_u64().unwrap() > 0, "{inc}");
    restore_and_check(vault.to_str().unwrap(), &cycle, dir.path());
}

fn on_reflink_datastore(fs_type: FsType, name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let datastore = LoopFs::create(dir.path(), "datastore", 600 * MIB, fs_type);
    let image: PathBuf = datastore.path().join("guest.img");
    make_fs_image(&image, 128 * MIB, FsType::Ext4);
    let vault = dir.path().join("vault");
    let (cycle, reports) = two_backups(
        vault.to_str().unwrap(),
        &image,
        &dir.path().join("mnt"),
        "reflink",
    );
    // The incremental knew the unchanged blocks from the extents and did not read them.
    let inc = &reports[1]["disks"][0];
    assert!(
        inc["blocks_not_read"].as_u64().unwrap() > 0,
        "{name}: {inc}"
    );
    // (A block the guest rewrote with the same bytes is read and found unchanged: allow a few.)
    let (not_read, unchanged) = (
        inc["blocks_not_read"].as_u64().unwrap(),
        inc["unchanged_blocks"].as_u64().unwrap(),
    );
    assert!(
        not_read * 10 >= unchanged * 9,
        "{name}: nearly every unchanged block was known from the extents: {inc}"
    );
    for r in &reports {
        assert_eq!(r["disks"][0]["snapshot"], "reflink", "{name}: {r}");
        // A reflink clone is metadata only: milliseconds whatever the size.
        assert!(r["snapshot_ms"].as_u64().unwrap() < 2000, "{r}");
    }
    // The snapshots were removed after the transfer; only the last one stays, moved into
    // .base/ as the change-tracking base of the next backup.
    let snaps = datastore.path().join(".bulwark-snapshots/guest");
    let left: Vec<_> = std::fs::read_dir(&snaps)
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert_eq!(left, [".base"], "snapshots left behind: {left:?}");
    let mut base: Vec<_> = std::fs::read_dir(snaps.join(".base"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    base.sort();
    assert_eq!(
        base,
        ["root.img", "root.json", "root.lock"],
        "{name}: one base and its record"
    );
    restore_and_check(vault.to_str().unwrap(), &cycle, dir.path());
}

#[test]
fn xfs_reflink_datastore() {
    if !root_or_skip(
        "xfs_reflink_datastore",
        &["mkfs.xfs", "mkfs.ext4", "e2fsck", "losetup"],
    ) {
        return;
    }
    on_reflink_datastore(FsType::XfsReflink, "xfs");
}

#[test]
fn btrfs_reflink_datastore() {
    if !root_or_skip(
        "btrfs_reflink_datastore",
        &["mkfs.btrfs", "mkfs.ext4", "e2fsck", "losetup"],
    ) {
        return;
    }
    on_reflink_datastore(FsType::Btrfs, "btrfs");
}

#[test]
fn reflink_refused_on_ext4_datastore_is_a_clear_error() {
    if !root_or_skip(
        "reflink_refused_on_ext4_datastore_is_a_clear_error",
        &["mkfs.ext4", "losetup"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let datastore = LoopFs::create(dir.path(), "ds", 64 * MIB, FsType::Ext4);
    let image = datastore.path().join("disk.img");
    write_random(&image, 0, MIB as usize, 1);
    let vault = dir.path().join("vault");
    let out = controller([
        "backup",
        "--vault",
        vault.to_str().unwrap(),
        "--vm",
        "v",
        "--disk",
        image.to_str().unwrap(),
        "--snapshot",
        "reflink",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("cannot reflink"),
        "{}",
        stderr_of(&out)
    );
}
