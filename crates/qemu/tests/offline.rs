//! Offline qcow2 and raw images through qemu-storage-daemon: the guest-visible bytes, read-only
//! and locked against a VM starting meanwhile, no copy of the disk written.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use bulwark_blockdiff::BlockSource;
use bulwark_blockdiff::buffers::Pool;
use bulwark_qemu::{OfflineOptions, OfflineSnapshotter};
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
    assert!(
        !qemu_io("raw", &raw, "write -P 0x66 0 4k").status.success(),
        "raw image not locked"
    );
    for (i, s) in sources.iter().enumerate() {
        let (got, read) = read_all(&s.reader());
        assert_same(&got, &want[i], s.name());
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

    // An image a VM holds is refused with a clear error.
    let vm = Vm::start(&[DiskSpec {
        drive: true,
        name: "os",
        format: "qcow2",
        size: 64 * MIB,
        read_only: false,
    }]);
    let held = OfflineSnapshotter::new(OfflineOptions::new(
        vec![("os".into(), vm.image("os", "qcow2"))],
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
    let missing = OfflineSnapshotter::new(OfflineOptions::new(
        vec![("x".into(), dir.path().join("nope"))],
        dir.path(),
    ));
    let err = missing.prepare("vm3", "p1").await.unwrap_err().to_string();
    assert!(err.contains("nope"), "{err}");
}
