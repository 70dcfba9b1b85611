//! Real QEMU 7.2 (TCG, paused CPU): discovery, the fleecing point in time, NBD exports with the
//! frozen dirty bitmap, release (commit and roll-back) and leftovers.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use bulwark_qemu::{
    Error, FleeceOptions, Fleecing, PREFIX, Qmp, bitmaps, cleanup_leftovers, discover, select,
};
use common::*;

const MIB: u64 = 1 << 20;

/// [`os_and_data`], then a read-only `cdrom` (a `-drive`, raw, 1 MiB).
fn two_disks() -> Vec<DiskSpec> {
    let mut disks = os_and_data();
    disks.extend([DiskSpec {
        drive: true,
        name: "cdrom",
        format: "raw",
        size: MIB,
        read_only: true,
    }]);
    disks
}

/// Everything named bulwark- that QEMU still holds, and bulwark- files in the VM's directory.
async fn bulwark_objects(qmp: &Qmp, dir: &std::path::Path) -> Vec<String> {
    let mut found = Vec::new();
    for e in qmp
        .run(qapi::qmp::query_block_exports {}, "")
        .await
        .unwrap()
    {
        found.push(format!("export {}", e.id));
    }
    for j in qmp.run(qapi::qmp::query_jobs {}, "").await.unwrap() {
        found.push(format!("job {}", j.id));
    }
    for n in qmp
        .run(qapi::qmp::query_named_block_nodes { flat: Some(true) }, "")
        .await
        .unwrap()
    {
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
    assert_eq!(
        qmp.version().0,
        7,
        "these tests are written against QEMU 7.2"
    );
    assert_eq!(qmp.identity().unwrap().pid, vm.pid());
    let disks = discover(&qmp).await.unwrap();
    let names: Vec<_> = disks
        .iter()
        .map(|d| (d.name.as_str(), d.format.as_str(), d.size))
        .collect();
    assert_eq!(
        names,
        vec![("os", "qcow2", 64 * MIB), ("data", "raw", 32 * MIB)],
        "{disks:#?}"
    );
    assert_eq!(disks[1].node, "data-fmt");
    assert_eq!(disks[0].file, vm.image("os", "qcow2").to_str().unwrap());
    assert!(disks[0].persistent_bitmaps() && !disks[1].persistent_bitmaps());

    let chosen = select(&qmp, disks.clone(), &["data".to_string()]).unwrap();
    assert_eq!(chosen.len(), 1);
    match select(&qmp, disks, &["cdrom".to_string()]) {
        Err(e @ Error::NoSuchDisk { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("\"cdrom\"") && msg.contains("os, data"),
                "{msg}"
            );
        }
        other => panic!("expected NoSuchDisk, got {other:?}"),
    }
    let missing = vm.path().join("nope.sock");
    match Qmp::connect(
        &format!("unix:{}", missing.display()),
        Duration::from_secs(2),
    )
    .await
    {
        Err(e @ Error::Connect { .. }) => assert!(e.to_string().contains("nope.sock")),
        other => panic!("expected Connect error, got {other:?}"),
    }
    // The monitor is taken (this session holds it): a second client is told why it waits.
    match Qmp::connect(
        &format!("unix:{}", vm.qmp_socket.display()),
        Duration::from_secs(2),
    )
    .await
    {
        Err(e @ Error::Timeout { .. }) => assert!(e.to_string().contains("another client"), "{e}"),
        other => panic!("expected a timeout, got {other:?}"),
    }
    let err = qmp
        .run(
            qapi::qmp::blockdev_del {
                node_name: "no-such-node".into(),
            },
            "no-such-node",
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("blockdev-del no-such-node failed"),
        "{err}"
    );
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
    assert_same(
        &read_export(&taken[1].uri(), vm.path()),
        &data,
        "data export",
    );
    // Holes stay holes in base:allocation (the tail of the os disk was never written).
    let alloc = nbd_map(&taken[0].uri(), "base:allocation");
    assert!(
        alloc
            .iter()
            .any(|(o, _, d)| *o >= 4 * MIB && d.contains("hole")),
        "{alloc:?}"
    );
    // The reads are over: the job is checked, and the export, the job, the fleecing nodes,
    // their files and the NBD socket go before the commit; the bitmaps wait for the release.
    for d in &taken {
        d.end_read().await.unwrap();
        assert!(d.read_ended());
    }
    taken[0].end_read().await.unwrap();
    assert_eq!(bulwark_objects(&qmp, vm.path()).await, Vec::<String>::new());
    assert!(!taken[0].socket().exists());
    for d in &taken {
        let names: Vec<String> = bitmaps(&qmp, &d.info().disk.node)
            .await
            .unwrap()
            .into_iter()
            .map(|b| b.name)
            .collect();
        assert!(names.contains(&d.info().new_bitmap), "{names:?}");
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
    assert_same(
        &read_export(&taken[1].uri(), vm.path()),
        &data,
        "data export 2",
    );
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
    let current = bms
        .iter()
        .find(|b| b.name == taken[0].info().new_bitmap)
        .unwrap();
    assert!(!frozen.recording && current.recording && current.persistent);
    assert_eq!(
        current.count, MIB,
        "the new bitmap holds the write after the instant"
    );
    for d in taken {
        d.release(true).await.unwrap();
    }
    let bms = bitmaps(&qmp, &node).await.unwrap();
    assert_eq!(
        bms.len(),
        1,
        "committed: only the new base is left: {bms:?}"
    );
    assert!(bms[0].recording);
}

async fn bitmap_names(qmp: &Qmp, node: &str) -> Vec<(String, bool)> {
    bitmaps(qmp, node)
        .await
        .unwrap()
        .into_iter()
        .map(|b| (b.name, b.recording))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_point_gives_its_changes_back_to_the_base() {
    if !qemu_or_skip("a_failed_point_gives_its_changes_back_to_the_base") {
        return;
    }
    let vm = Vm::start(&two_disks()[..1]);
    let qmp = vm.qmp().await;
    let options = FleeceOptions::new(vm.path());
    let taken = Fleecing::prepare(qmp.clone(), &options)
        .await
        .unwrap()
        .take()
        .await
        .unwrap();
    let node = taken[0].info().disk.node.clone();
    let b1 = taken[0].info().new_bitmap.clone();
    for d in taken {
        d.release(true).await.unwrap();
    }
    guest_write(&qmp, "os", 0x01, MIB, 64 * 1024).await; // W1: after point 1

    let taken = Fleecing::prepare(qmp.clone(), &options)
        .await
        .unwrap()
        .take()
        .await
        .unwrap();
    let b2 = taken[0].info().new_bitmap.clone();
    assert_eq!(taken[0].info().frozen[0].name, b1);
    guest_write(&qmp, "os", 0x02, 10 * MIB, 64 * 1024).await; // W2: while point 2 is read
    // The copy-before-write job stops during the reads (as when the fleecing image's file
    // system fills up): the export stopped holding the point, so the end of the reads fails
    // and the point must not be committed.
    let job = taken[0].info().job.clone();
    qmp.run(
        qapi::qmp::block_job_cancel {
            device: job.clone(),
            force: Some(true),
        },
        &job,
    )
    .await
    .unwrap();
    for _ in 0..500 {
        let jobs = qmp.run(qapi::qmp::query_jobs {}, &job).await.unwrap();
        if !jobs.iter().any(|j| j.id == job) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let err = taken[0].end_read().await.unwrap_err();
    assert!(
        matches!(err, Error::Job { .. }) && err.to_string().contains(&job),
        "{err}"
    );
    assert!(!taken[0].read_ended());
    for d in taken {
        d.release(false).await.unwrap();
    }
    assert!(bulwark_objects(&qmp, vm.path()).await.is_empty());
    assert_eq!(
        bitmap_names(&qmp, &node).await,
        vec![(b1.clone(), true)],
        "b2 merged into b1 and gone"
    );
    guest_write(&qmp, "os", 0x03, 20 * MIB, 64 * 1024).await; // W3: after the failed point

    let taken = Fleecing::prepare(qmp.clone(), &options)
        .await
        .unwrap()
        .take()
        .await
        .unwrap();
    assert_eq!(taken[0].info().frozen.len(), 1);
    assert_eq!(
        dirty_ranges(&taken[0].uri(), &b1),
        vec![
            (MIB, MIB + 65536),
            (10 * MIB, 10 * MIB + 65536),
            (20 * MIB, 20 * MIB + 65536)
        ],
        "the base still covers every change since point 1"
    );
    let b3 = taken[0].info().new_bitmap.clone();
    assert_ne!(b3, b2);
    for d in taken {
        d.release(true).await.unwrap();
    }
    assert_eq!(bitmap_names(&qmp, &node).await, vec![(b3, true)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_taken_point_cleans_up_and_rolls_back() {
    if !qemu_or_skip("dropping_a_taken_point_cleans_up_and_rolls_back") {
        return;
    }
    let vm = Vm::start(&two_disks()[..2]);
    let qmp = vm.qmp().await;
    let options = FleeceOptions::new(vm.path());
    for d in Fleecing::prepare(qmp.clone(), &options)
        .await
        .unwrap()
        .take()
        .await
        .unwrap()
    {
        d.release(true).await.unwrap();
    }
    let node = discover(&qmp).await.unwrap()[0].node.clone();
    let before = bitmap_names(&qmp, &node).await;
    // A prepared point dropped before the instant: its nodes and files go.
    let prepared = Fleecing::prepare(qmp.clone(), &options).await.unwrap();
    let objects = bulwark_objects(&qmp, vm.path()).await;
    assert!(!objects.is_empty());
    // A second run on this QEMU (through a second QMP socket, say) is refused while the first
    // holds it, before its cleanup could take the first run's objects for leftovers.
    let err = Fleecing::prepare(qmp.clone(), &options).await.unwrap_err();
    assert!(matches!(err, Error::Busy { .. }), "{err}");
    assert_eq!(
        bulwark_objects(&qmp, vm.path()).await,
        objects,
        "nothing touched"
    );
    // QEMU made each fleecing image itself (no qemu-img): a qcow2 of the disk's size, opened
    // through a `bulwark-file-` node.
    for d in prepared.disks() {
        let header = std::fs::read(&d.fleece_file).unwrap();
        assert_eq!(&header[..4], b"QFI\xfb", "{}", d.fleece_file.display());
        let size = u64::from_be_bytes(header[24..32].try_into().unwrap());
        assert_eq!(
            size,
            d.disk.size,
            "virtual size of {}",
            d.fleece_file.display()
        );
        let file_node = d.fleece_node.replace("bulwark-fleece-", "bulwark-file-");
        let nodes = qmp
            .run(qapi::qmp::query_named_block_nodes { flat: Some(true) }, "")
            .await
            .unwrap();
        let node = nodes
            .iter()
            .find(|n| n.node_name.as_deref() == Some(file_node.as_str()))
            .unwrap_or_else(|| panic!("no node {file_node}"));
        // Scratch space: never flushed (nor the guest's flushes slowed by it).
        assert!(node.cache.no_flush, "{file_node} flushes");
    }
    drop(prepared);
    wait_clean(&qmp, vm.path()).await;
    // A taken point dropped without release: as a failed one.
    let taken = Fleecing::prepare(qmp.clone(), &options)
        .await
        .unwrap()
        .take()
        .await
        .unwrap();
    guest_write(&qmp, "os", 0x05, 30 * MIB, 64 * 1024).await;
    drop(taken);
    wait_clean(&qmp, vm.path()).await;
    let mut after = bitmap_names(&qmp, &node).await;
    for _ in 0..100 {
        if after == before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        after = bitmap_names(&qmp, &node).await;
    }
    assert_eq!(after, before, "the base is back and recording");
    let count = bitmaps(&qmp, &node).await.unwrap()[0].count;
    assert_eq!(
        count, 65536,
        "the write during the dropped point is in the base"
    );
}

async fn wait_clean(qmp: &Qmp, dir: &std::path::Path) {
    let mut left = bulwark_objects(qmp, dir).await;
    for _ in 0..100 {
        if left.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        left = bulwark_objects(qmp, dir).await;
    }
    panic!("left behind: {left:?}");
}

/// The child half of `a_killed_controller_leaves_only_what_the_next_backup_removes`: runs only
/// when the parent starts this test binary with BULWARK_QEMU_CHILD_QMP set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_takes_a_point_and_waits_to_be_killed() {
    let Ok(socket) = std::env::var("BULWARK_QEMU_CHILD_QMP") else {
        return;
    };
    let dir = std::env::var("BULWARK_QEMU_CHILD_DIR").unwrap();
    let qmp = Arc::new(
        Qmp::connect(&socket, Duration::from_secs(20))
            .await
            .unwrap(),
    );
    let taken = Fleecing::prepare(qmp.clone(), &FleeceOptions::new(&dir))
        .await
        .unwrap()
        .take()
        .await
        .unwrap();
    println!("\nTAKEN {}", taken[0].info().new_bitmap);
    use std::io::Write;
    std::io::stdout().flush().unwrap();
    tokio::time::sleep(Duration::from_secs(120)).await;
    drop(taken);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_controller_leaves_only_what_the_next_backup_removes() {
    if !qemu_or_skip("a_killed_controller_leaves_only_what_the_next_backup_removes") {
        return;
    }
    let vm = Vm::start(&two_disks()[..2]);
    let options = FleeceOptions::new(vm.path());
    let node;
    let b1;
    {
        let qmp = vm.qmp().await;
        let taken = Fleecing::prepare(qmp.clone(), &options)
            .await
            .unwrap()
            .take()
            .await
            .unwrap();
        node = taken[0].info().disk.node.clone();
        b1 = taken[0].info().new_bitmap.clone();
        for d in taken {
            d.release(true).await.unwrap();
        }
    } // QEMU takes one QMP client at a time: this one closes here.

    use std::io::BufRead;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_takes_a_point_and_waits_to_be_killed",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            "BULWARK_QEMU_CHILD_QMP",
            format!("unix:{}", vm.qmp_socket.display()),
        )
        .env("BULWARK_QEMU_CHILD_DIR", vm.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let b2 = loop {
        let line = lines
            .next()
            .expect("child ended before taking its point")
            .unwrap();
        // libtest prints the test's name on the same line first.
        if let Some(at) = line.find("TAKEN ") {
            break line[at + 6..].trim().to_string();
        }
    };
    // SIGKILL, by the child's own pid: no destructor runs.
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    child.wait().unwrap();

    let qmp = vm.qmp().await;
    assert_eq!(
        qmp.identity().unwrap().pid,
        vm.pid(),
        "the VM keeps running"
    );
    let status = qmp.run(qapi::qmp::query_status {}, "").await.unwrap();
    assert_eq!(
        format!("{:?}", status.status),
        "prelaunch",
        "never paused by us (the test VM starts with -S)"
    );
    guest_write(&qmp, "os", 0x07, 7 * MIB, 64 * 1024).await;
    let left = bulwark_objects(&qmp, vm.path()).await;
    assert!(
        left.iter().any(|l| l.starts_with("export")) && left.iter().any(|l| l.starts_with("job")),
        "{left:?}"
    );
    // A run killed between creating its fleecing file and handing it to QEMU leaves a file no
    // node holds: next to the images, or in the configured fleecing directory. Named after
    // this QEMU, it is removed; another QEMU's (a pid and start time not this one's, in the
    // same directory) and a file not named bulwark- are left alone.
    let id = qmp.identity().unwrap().clone();
    let fleece_dir = tempfile::tempdir().unwrap();
    let stray = vm.path().join(format!(
        "bulwark-fleece-{}-{}-0123456789ab-0.qcow2",
        id.pid, id.start_time
    ));
    let stray_in_dir = fleece_dir.path().join(format!(
        "bulwark-fleece-{}-{}-0123456789ab-1.qcow2",
        id.pid, id.start_time
    ));
    let other_vm = vm.path().join(format!(
        "bulwark-fleece-{}-{}-0123456789ab-0.qcow2",
        id.pid,
        id.start_time + 1
    ));
    let not_ours = vm.path().join(format!(
        "fleece-{}-{}-0123456789ab-0.qcow2",
        id.pid, id.start_time
    ));
    for f in [&stray, &stray_in_dir, &other_vm, &not_ours] {
        std::fs::File::create_new(f).unwrap();
    }
    let mut cleanup_options = FleeceOptions::new(vm.path());
    cleanup_options.fleece_dir = Some(fleece_dir.path().to_path_buf());
    let removed = cleanup_leftovers(&qmp, &cleanup_options).await.unwrap();
    assert!(!stray.exists() && !stray_in_dir.exists(), "{removed:?}");
    assert!(removed.files.contains(&stray), "{removed:?}");
    assert!(removed.files.contains(&stray_in_dir), "{removed:?}");
    assert!(other_vm.exists() && not_ours.exists(), "{removed:?}");
    assert!(!removed.files.contains(&other_vm));
    std::fs::remove_file(&other_vm).unwrap();
    std::fs::remove_file(&not_ours).unwrap();
    assert_eq!(removed.exports.len(), 2, "{removed:?}");
    assert_eq!(removed.jobs.len(), 2);
    // Per disk the qcow2 fleecing node and the `file` node under it.
    assert_eq!(removed.nodes.len(), 4, "{removed:?}");
    assert!(removed.nbd_server);
    assert_eq!(removed.bitmaps.iter().filter(|(_, b)| b == &b2).count(), 2);
    let left = bulwark_objects(&qmp, vm.path()).await;
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(bitmap_names(&qmp, &node).await, vec![(b1.clone(), true)]);
    assert!(
        cleanup_leftovers(&qmp, &FleeceOptions::new(vm.path()))
            .await
            .unwrap()
            .is_empty(),
        "idempotent"
    );

    // And the next backup succeeds, with the write made after the kill in its base.
    let taken = Fleecing::prepare(qmp.clone(), &options)
        .await
        .unwrap()
        .take()
        .await
        .unwrap();
    assert_eq!(
        dirty_ranges(&taken[0].uri(), &b1),
        vec![(7 * MIB, 7 * MIB + 65536)]
    );
    for d in taken {
        d.release(true).await.unwrap();
    }
}

/// QEMU 7.2 fails the guest's own write when the fleecing image cannot grow: a fleecing
/// directory without room for the whole disk is refused up front, and nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleecing_directory_without_room_is_refused() {
    if !qemu_or_skip("a_fleecing_directory_without_room_is_refused") {
        return;
    }
    let vm = Vm::start(&[DiskSpec {
        drive: true,
        name: "huge",
        format: "qcow2",
        size: 64 << 40,
        read_only: false,
    }]);
    let qmp = vm.qmp().await;
    let err = Fleecing::prepare(qmp.clone(), &FleeceOptions::new(vm.path()))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("bytes free") && msg.contains(vm.path().to_str().unwrap()),
        "{msg}"
    );
    assert!(bulwark_objects(&qmp, vm.path()).await.is_empty());
    // Asked explicitly, it goes ahead (the administrator vouches for the room).
    let mut options = FleeceOptions::new(vm.path());
    options.require_space = false;
    let taken = Fleecing::prepare(qmp.clone(), &options)
        .await
        .unwrap()
        .take()
        .await
        .unwrap();
    for d in taken {
        d.release(false).await.unwrap();
    }
}

/// A transaction QEMU refuses changes nothing (it is atomic), and everything prepared goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_transaction_leaves_the_bitmaps_and_nothing_else() {
    if !qemu_or_skip("a_refused_transaction_leaves_the_bitmaps_and_nothing_else") {
        return;
    }
    let vm = Vm::start(&two_disks()[..2]);
    let qmp = vm.qmp().await;
    let other = vm.test_qmp().await;
    let options = FleeceOptions::new(vm.path());
    for d in Fleecing::prepare(qmp.clone(), &options)
        .await
        .unwrap()
        .take()
        .await
        .unwrap()
    {
        d.release(true).await.unwrap();
    }
    let nodes: Vec<String> = discover(&qmp)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.node)
        .collect();
    let before = [
        bitmap_names(&qmp, &nodes[0]).await,
        bitmap_names(&qmp, &nodes[1]).await,
    ];
    let prepared = Fleecing::prepare(qmp.clone(), &options).await.unwrap();
    // Someone removes the second disk's fleecing node behind Bulwark's back.
    other
        .run(
            qapi::qmp::blockdev_del {
                node_name: prepared.disks()[1].fleece_node.clone(),
            },
            "",
        )
        .await
        .unwrap();
    let err = prepared.take().await.unwrap_err();
    assert!(err.to_string().contains("transaction"), "{err}");
    let left = bulwark_objects(&qmp, vm.path()).await;
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(
        [
            bitmap_names(&qmp, &nodes[0]).await,
            bitmap_names(&qmp, &nodes[1]).await
        ],
        before
    );
    // A fleecing directory that does not exist: a clear error, nothing left.
    let mut bad = FleeceOptions::new(vm.path());
    bad.fleece_dir = Some(vm.path().join("missing"));
    bad.require_space = false;
    let err = Fleecing::prepare(qmp.clone(), &bad).await.unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
    assert!(bulwark_objects(&qmp, vm.path()).await.is_empty());
}
