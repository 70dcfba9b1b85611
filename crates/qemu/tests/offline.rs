//! Offline images (qcow2 through qemu-storage-daemon, raw read in place): the guest-visible
//! bytes, read-only and locked against a VM starting meanwhile, no copy of the disk written.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use bulwark_blockdiff::BlockSource;
use bulwark_blockdiff::buffers::Pool;
use bulwark_qemu::{OfflineOptions, OfflineSnapshotter, QemuOptions, QemuSnapshotter};
use bulwark_snapshot::{Changes, Outcome, PreviousDisk, Snapshotter};
use common::*;

const MIB: u64 = 1 << 20;

fn read_all(reader: &Arc<dyn BlockSource>) -> (Vec<u8>, u64) {
    let pool = Pool::new(MIB as usize, 2);
    let size = reader.size();
    let mut out = vec![0u8; size as usize];
    let mut read = 0;
    let mut at = 0;
    while at < size {
        at = reader.next_data(at).unwrap() / MIB * MIB;
        if at >= size {
            break;
        }
        let n = MIB.min(size - at);
        out[at as usize..(at + n) as usize]
            .copy_from_slice(&reader.read(at, n as usize, &pool).unwrap());
        read += n;
        at += n;
    }
    (out, read)
}

fn qemu_io(format: &str, image: &std::path::Path, command: &str) -> std::process::Output {
    std::process::Command::new("qemu-io")
        .args(["-f", format, "-c", command, image.to_str().unwrap()])
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_images_are_read_as_the_guest_sees_them_and_locked() {
    if !qemu_or_skip("offline_images_are_read_as_the_guest_sees_them_and_locked") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let qcow = dir.path().join("os.qcow2");
    let raw = dir.path().join("data,1.img"); // a comma: QEMU's option syntax must be escaped
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            qcow.to_str().unwrap(),
            "256M",
        ],
    );
    run(
        "qemu-img",
        &["create", "-q", "-f", "raw", raw.to_str().unwrap(), "64M"],
    );
    let mut want = [vec![0u8; 256 * MIB as usize], vec![0u8; 64 * MIB as usize]];
    assert!(
        qemu_io("qcow2", &qcow, "write -P 0x61 1M 2M")
            .status
            .success()
    );
    write_pattern(&mut want[0], 0x61, MIB, 2 * MIB);
    assert!(
        qemu_io("raw", &raw, "write -P 0x62 60M 1M")
            .status
            .success()
    );
    write_pattern(&mut want[1], 0x62, 60 * MIB, MIB);
    let files_before: u64 = std::fs::read_dir(dir.path()).unwrap().count() as u64;

    let snapshotter = OfflineSnapshotter::new(OfflineOptions::new(
        vec![("os".into(), qcow.clone()), ("data".into(), raw.clone())],
        dir.path(),
    ));
    let sources = snapshotter
        .prepare("vm1", "p1")
        .await
        .unwrap()
        .take()
        .await
        .unwrap();
    // Locked: a VM (here qemu-io) cannot open the images for writing meanwhile.
    let busy = qemu_io("qcow2", &qcow, "write -P 0x66 0 4k");
    assert!(
        !busy.status.success(),
        "the qcow2 image was writable during the backup"
    );
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("lock"),
        "{}",
        String::from_utf8_lossy(&busy.stderr)
    );
    // The raw image is read in place, locked by Bulwark itself (no daemon holds it): a QEMU
    // program opening it for writing fails with QEMU's own message.
    assert_eq!(
        sources.iter().map(|s| s.kind()).collect::<Vec<_>>(),
        ["in-place", "qemu-offline"]
    );
    let busy = qemu_io("raw", &raw, "write -P 0x66 0 4k");
    assert!(!busy.status.success(), "raw image not locked");
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("Failed to get \"write\" lock"),
        "{}",
        String::from_utf8_lossy(&busy.stderr)
    );
    // A reader that shares writing (`qemu-io -r`) may still open it: Bulwark shares reading.
    assert!(
        std::process::Command::new("qemu-io")
            .args(["-r", "-f", "raw", "-c", "read 0 4k", raw.to_str().unwrap()])
            .status()
            .unwrap()
            .success(),
        "a read-only QEMU reader was refused"
    );
    for s in sources.iter() {
        let want = &want[usize::from(s.name() == "data")];
        let (got, read) = read_all(&s.reader());
        assert_same(&got, want, s.name());
        assert!(
            read <= 3 * MIB,
            "{}: read {read} bytes, holes must be skipped",
            s.name()
        );
        let previous = PreviousDisk {
            point: "p".into(),
            manifest_digest: String::new(),
            size: got.len() as u64,
            tracking: None,
        };
        assert!(matches!(
            s.changes_since(&previous).await.unwrap(),
            Changes::Unknown { .. }
        ));
    }
    // The reads are over and nothing wrote the images: both sources end their reads.
    for s in sources.iter() {
        s.end_read().await.unwrap();
    }
    // A program that ignores QEMU's locks (a plain write(2)) writes the raw image after the
    // reads began: the in-place source says so at the end of the reads, so nothing is
    // committed from it.
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&raw)
        .unwrap()
        .write_all_at(&[0x67; 4096], 8 * MIB)
        .unwrap();
    let in_place = sources.iter().find(|s| s.kind() == "in-place").unwrap();
    let e = in_place.end_read().await.unwrap_err().to_string();
    assert!(
        e.contains("changed during the backup") && e.contains("data,1.img"),
        "{e}"
    );
    // Nothing of the disk's size was written beside the images: one socket, no copy.
    let mut extra: Vec<(String, u64)> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().len(),
            )
        })
        .filter(|(n, _)| n != "os.qcow2" && n != "data,1.img")
        // The daemon's pid record beside its socket (a few bytes, for cleanup after a crash).
        .filter(|(n, _)| !(n.starts_with("bulwark-offline-") && n.ends_with(".pid")))
        .collect();
    extra.retain(|(_, len)| *len > 0);
    assert!(extra.is_empty(), "{extra:?}");
    for s in sources {
        s.release(Outcome::Committed {
            point: "p".into(),
            manifest_digest: String::new(),
            keep: false,
        })
        .await
        .unwrap();
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count() as u64,
        files_before,
        "socket left"
    );
    // Released: the images are writable again.
    assert!(
        qemu_io("qcow2", &qcow, "write -P 0x66 0 4k")
            .status
            .success()
    );
    assert!(qemu_io("raw", &raw, "write -P 0x66 0 4k").status.success());

    // An image a VM holds is refused with a clear error naming it and the lock, the qcow2 as
    // the raw image (Bulwark's own lock: a probe before the daemon that opens the qcow2).
    let vm = Vm::start(&os_and_data());
    // QEMU creates its QMP socket before it opens its drives: its monitor answers once the
    // machine is built, with every drive open and locked (without this wait CI once locked
    // the raw image before QEMU did).
    vm.qmp()
        .await
        .run(qapi::qmp::query_status {}, "")
        .await
        .unwrap();
    for (name, format) in [("os", "qcow2"), ("data", "raw")] {
        let image = vm.image(name, format);
        let held = OfflineSnapshotter::new(OfflineOptions::new(
            vec![(name.into(), image.clone())],
            vm.path(),
        ));
        let err = held
            .prepare("vm2", "p1")
            .await
            .unwrap()
            .take()
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("lock") && err.contains("VM"), "{err}");
        assert!(
            err.contains(&image.display().to_string())
                && err.contains("the image is in use")
                && err.contains("\"write\" lock"),
            "{format}: {err}"
        );
    }
    let missing = OfflineSnapshotter::new(OfflineOptions::new(
        vec![("x".into(), dir.path().join("nope"))],
        dir.path(),
    ));
    let err = missing.prepare("vm3", "p1").await.unwrap_err().to_string();
    assert!(err.contains("nope"), "{err}");
}

/// One offline backup of `image` as disk `os`: what the source knew of the changes since
/// `previous`, the image as that point holds it (rebuilt from `base` plus what was read, as an
/// incremental in the vault would be), the bytes read, and the tracking record. `commit`: the
/// point is committed, else it fails (the bitmaps roll back).
async fn offline_backup(
    image: &std::path::Path,
    dir: &std::path::Path,
    previous: Option<&PreviousDisk>,
    base: &[u8],
    commit: bool,
) -> (Changes, Vec<u8>, u64, Option<bulwark_snapshot::Tracking>) {
    let snapshotter = OfflineSnapshotter::new(OfflineOptions::new(
        vec![("os".into(), image.to_path_buf())],
        dir,
    ));
    read_point(&snapshotter, previous, base, commit).await
}

/// One backup of the only disk `snapshotter` takes: see [`offline_backup`].
async fn read_point(
    snapshotter: &dyn Snapshotter,
    previous: Option<&PreviousDisk>,
    base: &[u8],
    commit: bool,
) -> (Changes, Vec<u8>, u64, Option<bulwark_snapshot::Tracking>) {
    let mut sources = snapshotter
        .prepare("vm1", "p")
        .await
        .unwrap()
        .take()
        .await
        .unwrap();
    let s = sources.pop().unwrap();
    let none = PreviousDisk {
        point: "p0".into(),
        manifest_digest: String::new(),
        size: 0,
        tracking: None,
    };
    let changes = s.changes_since(previous.unwrap_or(&none)).await.unwrap();
    let reader = s.reader();
    let size = reader.size();
    let pool = Pool::new(MIB as usize, 2);
    let (got, read) = match &changes {
        Changes::Unchanged(unchanged) => {
            assert_eq!(base.len() as u64, size);
            let mut got = base.to_vec();
            let mut read = 0;
            let mut at = 0;
            for r in unchanged.iter().chain(std::iter::once(&(size..size))) {
                while at < r.start {
                    let n = (r.start - at).min(MIB);
                    got[at as usize..(at + n) as usize]
                        .copy_from_slice(&reader.read(at, n as usize, &pool).unwrap());
                    read += n;
                    at += n;
                }
                at = at.max(r.end);
            }
            (got, read)
        }
        Changes::Unknown { .. } => read_all(&reader),
    };
    let tracking = s.tracking();
    let outcome = if commit {
        Outcome::Committed {
            point: "p".into(),
            manifest_digest: String::new(),
            keep: false,
        }
    } else {
        Outcome::Failed { keep: false }
    };
    s.release(outcome).await.unwrap();
    (changes, got, read, tracking)
}

fn previous(tracking: Option<bulwark_snapshot::Tracking>, size: u64) -> PreviousDisk {
    PreviousDisk {
        point: "p".into(),
        manifest_digest: String::new(),
        size,
        tracking,
    }
}

fn unknown(changes: &Changes) -> &str {
    match changes {
        Changes::Unknown { reason } => reason,
        Changes::Unchanged(_) => panic!("an incremental was trusted"),
    }
}

fn io_ok(image: &std::path::Path, command: &str) {
    let out = qemu_io("qcow2", image, command);
    assert!(
        out.status.success(),
        "{command}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn bitmaps_in(image: &std::path::Path) -> Vec<serde_json::Value> {
    let info: serde_json::Value = serde_json::from_str(&run(
        "qemu-img",
        &["info", "--output=json", image.to_str().unwrap()],
    ))
    .unwrap();
    info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Offline qcow2 change tracking: the image keeps a persistent bitmap between backups, an
/// incremental reads only the dirty clusters and rebuilds the image bit for bit; a failed
/// backup loses no change; a bitmap made inconsistent (QEMU killed with the image open), removed,
/// of another granularity, or an image resized gives a full read with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_qcow2_incrementals_read_only_the_dirty_clusters() {
    if !qemu_or_skip("offline_qcow2_incrementals_read_only_the_dirty_clusters") {
        return;
    }
    const GRAIN: u64 = 64 << 10; // qcow2's default cluster size: the bitmap's granularity
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("os.qcow2");
    let image_s = image.to_str().unwrap();
    run("qemu-img", &["create", "-q", "-f", "qcow2", image_s, "16M"]);
    let size = 16 * MIB;
    let mut want = vec![0u8; size as usize];
    io_ok(&image, "write -P 0x61 1M 2M");
    write_pattern(&mut want, 0x61, MIB, 2 * MIB);

    // Full: no previous record; the image now keeps one enabled bulwark- bitmap.
    let (changes, got, _, t1) = offline_backup(&image, dir.path(), None, &[], true).await;
    assert!(unknown(&changes).contains("recorded no dirty bitmap"));
    assert_same(&got, &want, "full");
    let full = got;
    let t1 = t1.expect("a tracking record");
    let name = t1.fields["bitmap"].clone();
    assert!(name.starts_with("bulwark-bitmap-"), "{name}");
    assert_eq!(t1.fields["granularity"], GRAIN.to_string());
    let stored = bitmaps_in(&image);
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0]["name"], name.as_str());
    // Stored cleanly: recording ("auto"), not left in use.
    assert_eq!(
        stored[0]["flags"],
        serde_json::json!(["auto"]),
        "{stored:?}"
    );

    // Writes by another QEMU program while no backup runs: recorded in the image's bitmap.
    let writes = [
        (0xabu8, 5 * MIB, 4096u64),
        (0xac, 12 * MIB + 4096, 100 << 10),
    ];
    for (p, off, len) in writes {
        io_ok(&image, &format!("write -P 0x{p:x} {off} {len}"));
        write_pattern(&mut want, p, off, len);
    }
    let dirty_clusters: u64 = writes
        .iter()
        .map(|(_, off, len)| (off + len).div_ceil(GRAIN) - off / GRAIN)
        .sum::<u64>()
        * GRAIN;
    let (changes, got, read, t2) = offline_backup(
        &image,
        dir.path(),
        Some(&previous(Some(t1), size)),
        &full,
        true,
    )
    .await;
    assert!(matches!(changes, Changes::Unchanged(_)), "{changes:?}");
    assert_same(&got, &want, "incremental");
    assert!(
        read <= 2 * dirty_clusters,
        "the incremental read {read} bytes for {dirty_clusters} bytes of dirty clusters"
    );
    assert!(read >= dirty_clusters, "read {read}");
    let t2 = t2.unwrap();
    assert_ne!(t2.fields["bitmap"], name);
    let names: Vec<_> = bitmaps_in(&image)
        .iter()
        .map(|b| b["name"].clone())
        .collect();
    assert_eq!(
        names,
        vec![serde_json::json!(t2.fields["bitmap"])],
        "the used bitmap stays"
    );

    // A failed backup in between loses no change: the next one, against the last committed
    // point, still sees the writes from before the failed one.
    let base2 = want.clone();
    io_ok(&image, "write -P 0xad 7M 64k");
    write_pattern(&mut want, 0xad, 7 * MIB, 64 << 10);
    let (_, _, _, _) = offline_backup(&image, dir.path(), None, &[], false).await;
    io_ok(&image, "write -P 0xae 9M 64k");
    write_pattern(&mut want, 0xae, 9 * MIB, 64 << 10);
    let (changes, got, read, t3) = offline_backup(
        &image,
        dir.path(),
        Some(&previous(Some(t2), size)),
        &base2,
        true,
    )
    .await;
    assert!(matches!(changes, Changes::Unchanged(_)), "{changes:?}");
    assert_same(&got, &want, "incremental after a failed backup");
    assert!(read <= 4 * GRAIN, "read {read}");
    let mut t3 = t3.unwrap();

    // QEMU killed with the image open read-write: the bitmap is left in use (inconsistent).
    let killed = qemu_io("qcow2", &image, "sigraise 9");
    assert!(!killed.status.success());
    assert!(
        bitmaps_in(&image)[0]["flags"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("in-use"))
    );
    let (changes, got, _, t4) = offline_backup(
        &image,
        dir.path(),
        Some(&previous(Some(t3.clone()), size)),
        &want,
        true,
    )
    .await;
    assert!(unknown(&changes).contains("inconsistent"), "{changes:?}");
    assert_same(&got, &want, "full read after an inconsistent bitmap");
    let t4 = t4.unwrap();

    // Removed by someone: full read.
    run(
        "qemu-img",
        &["bitmap", "--remove", image_s, &t4.fields["bitmap"]],
    );
    let (changes, got, _, t5) = offline_backup(
        &image,
        dir.path(),
        Some(&previous(Some(t4), size)),
        &want,
        true,
    )
    .await;
    assert!(
        unknown(&changes).contains("not a recording bitmap"),
        "{changes:?}"
    );
    assert_same(&got, &want, "full read after a removed bitmap");
    let t5 = t5.unwrap();

    // The same name with another granularity is not the bitmap the point started.
    run(
        "qemu-img",
        &["bitmap", "--remove", image_s, &t5.fields["bitmap"]],
    );
    run(
        "qemu-img",
        &[
            "bitmap",
            "--add",
            "--enable",
            "-g",
            "131072",
            image_s,
            &t5.fields["bitmap"],
        ],
    );
    let (changes, _, _, t6) = offline_backup(
        &image,
        dir.path(),
        Some(&previous(Some(t5), size)),
        &want,
        true,
    )
    .await;
    assert!(unknown(&changes).contains("granularity"), "{changes:?}");

    // Resized: full read.
    run("qemu-img", &["resize", "-q", image_s, "17M"]);
    want.resize(17 * MIB as usize, 0);
    let (changes, got, _, _) =
        offline_backup(&image, dir.path(), Some(&previous(t6, size)), &want, true).await;
    assert!(unknown(&changes).contains("resized"), "{changes:?}");
    assert_same(&got, &want, "full read after a resize");

    // A qcow2 v2 image cannot store bitmaps: read in full, with the reason, and no record.
    let v2 = dir.path().join("v2.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            v2.to_str().unwrap(),
            "4M",
        ],
    );
    io_ok(&v2, "write -P 0x71 1M 64k");
    let mut want_v2 = vec![0u8; 4 * MIB as usize];
    write_pattern(&mut want_v2, 0x71, MIB, 64 << 10);
    let (changes, got, _, t) = offline_backup(&v2, dir.path(), None, &[], true).await;
    assert!(
        unknown(&changes).contains("no dirty bitmap could be kept"),
        "{changes:?}"
    );
    assert!(t.is_none());
    assert_same(&got, &want_v2, "qcow2 v2");

    // A record that names another backing file (rebase -u): full read.
    t3.fields
        .insert("backing".into(), "/elsewhere/base.qcow2".into());
    let (changes, _, _, _) = offline_backup(
        &image,
        dir.path(),
        Some(&previous(Some(t3), 17 * MIB)),
        &want,
        true,
    )
    .await;
    assert!(unknown(&changes).contains("backing file"), "{changes:?}");
}

/// The bitmap is one chain whichever way the image is read: an offline backup, then a running
/// VM's backup (QMP fleecing) on the same image trusts the bitmap the offline one left, and an
/// offline backup after the VM stopped cleanly trusts the one the running backup left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_and_running_backups_continue_each_others_bitmaps() {
    if !qemu_or_skip("offline_and_running_backups_continue_each_others_bitmaps") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("os.qcow2");
    let size = 16 * MIB;
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            image.to_str().unwrap(),
            "16M",
        ],
    );
    let mut want = vec![0u8; size as usize];
    io_ok(&image, "write -P 0x61 1M 1M");
    write_pattern(&mut want, 0x61, MIB, MIB);
    let (_, full, _, t1) = offline_backup(&image, dir.path(), None, &[], true).await;
    assert_same(&full, &want, "offline full");

    let spec = [DiskSpec {
        drive: true,
        name: "os",
        format: "qcow2",
        size,
        read_only: false,
    }];
    let vm = Vm::start_in(dir, &spec);
    let test_qmp = vm.test_qmp().await;
    guest_write(&test_qmp, "os", 0xb1, 3 * MIB, 64 << 10).await;
    write_pattern(&mut want, 0xb1, 3 * MIB, 64 << 10);
    let running = QemuSnapshotter::new(QemuOptions::new(
        format!("unix:{}", vm.qmp_socket.display()),
        vm.path(),
    ));
    let (changes, got, read, t2) =
        read_point(&running, Some(&previous(t1, size)), &full, true).await;
    assert!(matches!(changes, Changes::Unchanged(_)), "{changes:?}");
    assert_same(&got, &want, "running incremental after an offline point");
    assert!(read <= 2 * (64 << 10), "read {read}");
    let at_running = got;

    guest_write(&test_qmp, "os", 0xb2, 6 * MIB, 64 << 10).await;
    write_pattern(&mut want, 0xb2, 6 * MIB, 64 << 10);
    test_qmp.run(qapi::qmp::quit {}, "").await.ok();
    drop(test_qmp);
    let dir = vm.wait_exit();
    let (changes, got, read, _) = offline_backup(
        &image,
        dir.path(),
        Some(&previous(t2, size)),
        &at_running,
        true,
    )
    .await;
    assert!(matches!(changes, Changes::Unchanged(_)), "{changes:?}");
    assert_same(&got, &want, "offline incremental after a running point");
    assert!(read <= 2 * (64 << 10), "read {read}");
}
