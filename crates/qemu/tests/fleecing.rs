//! Real QEMU 7.2 (TCG, paused CPU): discovery, the fleecing point in time, NBD exports with the
//! frozen dirty bitmap, release (commit and roll-back) and leftovers.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bulwark_qemu::{Error, FleeceOptions, Fleecing, PREFIX, Qmp, bitmaps, discover, select};
use common::*;

const MIB: u64 = 1 << 20;

fn two_disks() -> Vec<DiskSpec> {
    vec![
        DiskSpec { drive: true, name: "os", format: "qcow2", size: 64 * MIB, read_only: false },
        DiskSpec { drive: false, name: "data", format: "raw", size: 32 * MIB, read_only: false },
        DiskSpec { drive: true, name: "cdrom", format: "raw", size: MIB, read_only: true },
    ]
}

/// Everything named bulwark- that QEMU still holds, and bulwark- files in the VM's directory.
async fn bulwark_objects(qmp: &Qmp, dir: &std::path::Path) -> Vec<String> {
    let mut found = Vec::new();
    for e in qmp.run(qapi::qmp::query_block_exports {}, "").await.unwrap() {
        found.push(format!("export {}", e.id));
    }
    for j in qmp.run(qapi::qmp::query_jobs {}, "").await.unwrap() {
        found.push(format!("job {}", j.id));
    }
    for n in qmp.run(qapi::qmp::query_named_block_nodes { flat: Some(true) }, "").await.unwrap() {
        if let Some(name) = n.node_name
            && name.starts_with(PREFIX)
        {
            found.push(format!("node {name}"));
        }
    }
    for f in std::fs::read_dir(dir).unwrap() {
        let name = f.unwrap().file_name().to_string_lossy().into_owned();
        if name.starts_with(PREFIX) {
            found.push(format!("file {name}"));
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovers_writable_disks_with_clear_errors() {
    if !qemu_or_skip("discovers_writable_disks_with_clear_errors") {
        return;
    }
    let vm = Vm::start(&two_disks());
    let qmp = vm.qmp().await;
    assert_eq!(qmp.version().0, 7, "these tests are written against QEMU 7.2");
    assert_eq!(qmp.identity().unwrap().pid, vm.pid());
    let disks = discover(&qmp).await.unwrap();
    let names: Vec<_> = disks.iter().map(|d| (d.name.as_str(), d.format.as_str(), d.size)).collect();
    assert_eq!(names, vec![("os", "qcow2", 64 * MIB), ("data", "raw", 32 * MIB)], "{disks:#?}");
    assert_eq!(disks[1].node, "data-fmt");
    assert_eq!(disks[0].file, vm.image("os", "qcow2").to_str().unwrap());
    assert!(disks[0].persistent_bitmaps() && !disks[1].persistent_bitmaps());

    let chosen = select(&qmp, disks.clone(), &["data".to_string()]).unwrap();
    assert_eq!(chosen.len(), 1);
    match select(&qmp, disks, &["cdrom".to_string()]) {
        Err(e @ Error::NoSuchDisk { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("\"cdrom\"") && msg.contains("os, data"), "{msg}");
        }
        other => panic!("expected NoSuchDisk, got {other:?}"),
    }
    let missing = vm.path().join("nope.sock");
    match Qmp::connect(&format!("unix:{}", missing.display()), Duration::from_secs(2)).await {
        Err(e @ Error::Connect { .. }) => assert!(e.to_string().contains("nope.sock")),
        other => panic!("expected Connect error, got {other:?}"),
    }
    let err = qmp
        .run(qapi::qmp::blockdev_del { node_name: "no-such-node".into() }, "no-such-node")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("blockdev-del no-such-node failed"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_holds_the_instant_and_bitmaps_hand_over() {
    if !qemu_or_skip("export_holds_the_instant_and_bitmaps_hand_over") {
        return;
    }
    let vm = Vm::start(&two_disks());
    let qmp = vm.qmp().await;
    let options = FleeceOptions::new(vm.path());
    let mut os = vec![0u8; 64 * MIB as usize];
    let mut data = vec![0u8; 32 * MIB as usize];
    guest_write(&qmp, "os", 0x11, 0, 4 * MIB).await;
    write_pattern(&mut os, 0x11, 0, 4 * MIB);
    guest_write(&qmp, "-d data", 0x21, MIB, MIB).await;
    write_pattern(&mut data, 0x21, MIB, MIB);

    // Point 1 (full): no base yet.
    let fleecing = Fleecing::prepare(qmp.clone(), &options).await.unwrap();
    assert!(fleecing.disks().iter().all(|d| d.frozen.is_empty()));
    let taken = fleecing.take().await.unwrap();
    assert_eq!(taken.len(), 2);
    // The guest goes on writing: the export must not see it.
    guest_write(&qmp, "os", 0x12, 2 * MIB, 4 * MIB).await;
    guest_write(&qmp, "-d data", 0x22, 0, 3 * MIB).await;
    assert_same(&read_export(&taken[0].uri(), vm.path()), &os, "os export");
    assert_same(&read_export(&taken[1].uri(), vm.path()), &data, "data export");
    // Holes stay holes in base:allocation (the tail of the os disk was never written).
    let alloc = nbd_map(&taken[0].uri(), "base:allocation");
    assert!(alloc.iter().any(|(o, _, d)| *o >= 4 * MIB && d.contains("hole")), "{alloc:?}");
    for d in &taken {
        d.check_job().await.unwrap();
    }
    let new_os = taken[0].info().new_bitmap.clone();
    for d in taken {
        d.release(true).await.unwrap();
    }
    assert!(bulwark_objects(&qmp, vm.path()).await.is_empty());
    write_pattern(&mut os, 0x12, 2 * MIB, 4 * MIB);
    write_pattern(&mut data, 0x22, 0, 3 * MIB);

    // Writes between the points: exactly what the next point's frozen bitmap must hold.
    guest_write(&qmp, "os", 0x13, 40 * MIB, 64 * 1024).await;
    write_pattern(&mut os, 0x13, 40 * MIB, 64 * 1024);
    guest_write(&qmp, "-d data", 0x23, 8 * MIB + 4096, 4096).await;
    write_pattern(&mut data, 0x23, 8 * MIB + 4096, 4096);

    let fleecing = Fleecing::prepare(qmp.clone(), &options).await.unwrap();
    assert_eq!(fleecing.disks()[0].frozen.len(), 1);
    assert_eq!(fleecing.disks()[0].frozen[0].name, new_os);
    assert!(fleecing.disks()[0].frozen[0].persistent && !fleecing.disks()[1].frozen[0].persistent);
    let taken = fleecing.take().await.unwrap();
    guest_write(&qmp, "os", 0x14, 50 * MIB, MIB).await;
    assert_same(&read_export(&taken[0].uri(), vm.path()), &os, "os export 2");
    assert_same(&read_export(&taken[1].uri(), vm.path()), &data, "data export 2");
    // The frozen bitmap holds every write since point 1's instant (those made while point 1
    // was read, and those after), rounded to its 64 KiB granularity; not the write after point 2.
    assert_eq!(
        dirty_ranges(&taken[0].uri(), &new_os),
        vec![(2 * MIB, 6 * MIB), (40 * MIB, 40 * MIB + 65536)]
    );
    let data_base = &taken[1].info().frozen[0].name;
    assert_eq!(
        dirty_ranges(&taken[1].uri(), data_base),
        vec![(0, 3 * MIB), (8 * MIB, 8 * MIB + 65536)]
    );
    // At the instant the old bitmaps froze and the new ones started.
    let on_os = bitmaps(&qmp, "#block").await;
    assert!(on_os.is_err(), "unknown node must be an error");
    let node = taken[0].info().disk.node.clone();
    let bms = bitmaps(&qmp, &node).await.unwrap();
    let frozen = bms.iter().find(|b| b.name == new_os).unwrap();
    let current = bms.iter().find(|b| b.name == taken[0].info().new_bitmap).unwrap();
    assert!(!frozen.recording && current.recording && current.persistent);
    assert_eq!(current.count, MIB, "the new bitmap holds the write after the instant");
    for d in taken {
        d.release(true).await.unwrap();
    }
    let bms = bitmaps(&qmp, &node).await.unwrap();
    assert_eq!(bms.len(), 1, "committed: only the new base is left: {bms:?}");
    assert!(bms[0].recording);
}
