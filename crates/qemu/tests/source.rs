//! `QemuSnapshotter` behind bulwark-snapshot's traits, on real QEMU 7.2: the readers give the
//! instant's bytes over NBD with holes skipped, `changes_since` gives the unchanged ranges from
//! the dirty bitmap, and a failed point gives its changes back.
#![allow(clippy::unwrap_used)]

mod common;

use std::ops::Range;
use std::sync::Arc;

use bulwark_blockdiff::BlockSource;
use bulwark_blockdiff::buffers::Pool;
use bulwark_qemu::{PREFIX, QemuOptions, QemuSnapshotter};
use bulwark_snapshot::{Changes, DiskSource, Outcome, PreviousDisk, Snapshotter};
use common::*;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 64 * 1024;

fn disks() -> Vec<DiskSpec> {
    os_and_data()
}

/// What a backup's scan would do: skip holes (next_data) and unchanged blocks, read the rest.
/// Returns the bytes as read (unread blocks taken from `base`) and the bytes read.
fn scan(reader: &Arc<dyn BlockSource>, unchanged: &[Range<u64>], base: &[u8]) -> (Vec<u8>, u64) {
    let size = reader.size();
    let pool = Pool::new(BLOCK as usize, 4);
    let mut out = vec![0u8; size as usize];
    let mut read = 0;
    let mut at = 0;
    while at < size {
        let next = reader.next_data(at).unwrap();
        assert!(next >= at && next <= size);
        at = next / BLOCK * BLOCK;
        if at >= size {
            break;
        }
        let end = (at + BLOCK).min(size);
        if unchanged.iter().any(|r| r.start <= at && end <= r.end) {
            out[at as usize..end as usize].copy_from_slice(&base[at as usize..end as usize]);
        } else {
            let data = reader.read(at, (end - at) as usize, &pool).unwrap();
            out[at as usize..end as usize].copy_from_slice(&data);
            read += end - at;
        }
        at = end;
    }
    (out, read)
}

fn complement(size: u64, unchanged: &[Range<u64>]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = 0;
    for r in unchanged {
        if r.start > at {
            out.push((at, r.start));
        }
        at = r.end;
    }
    if at < size {
        out.push((at, size));
    }
    out
}

fn previous_of(disk: &dyn DiskSource, point: &str) -> PreviousDisk {
    PreviousDisk {
        point: point.into(),
        manifest_digest: String::new(),
        size: disk.reader().size(),
        tracking: disk.tracking(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_vm_backs_up_through_the_disk_source_traits() {
    if !qemu_or_skip("a_running_vm_backs_up_through_the_disk_source_traits") {
        return;
    }
    let vm = Vm::start(&disks());
    let writer = vm.test_qmp().await;
    let mut want = [vec![0u8; 64 * MIB as usize], vec![0u8; 32 * MIB as usize]];
    let devices = ["os", "-d data"];
    let write = |disk: usize, pattern: u8, off: u64, len: u64| {
        let writer = writer.clone();
        async move { guest_write(&writer, devices[disk], pattern, off, len).await }
    };
    write(0, 0x41, 0, 3 * MIB).await;
    write_pattern(&mut want[0], 0x41, 0, 3 * MIB);
    write(1, 0x51, 4 * MIB, 2 * MIB).await;
    write_pattern(&mut want[1], 0x51, 4 * MIB, 2 * MIB);

    let snapshotter: Arc<dyn Snapshotter> = Arc::new(QemuSnapshotter::new(QemuOptions::new(
        format!("unix:{}", vm.qmp_socket.display()),
        vm.path(),
    )));

    // Point 1: full. `take` is all a frozen guest waits for.
    let pending = snapshotter.prepare("vm1", "p1").await.unwrap();
    let started = std::time::Instant::now();
    let sources = pending.take().await.unwrap();
    let took = started.elapsed();
    eprintln!("take (transaction, exports, NBD connections) of 2 disks: {took:?}");
    assert!(took.as_millis() < 1000, "take took {took:?}");
    assert_eq!(
        sources.iter().map(|s| s.name()).collect::<Vec<_>>(),
        ["os", "data"]
    );
    write(0, 0x42, 2 * MIB, 2 * MIB).await; // while point 1 is read
    write(1, 0x52, 5 * MIB, 64 * 1024).await;
    let mut previous = Vec::new();
    for (i, s) in sources.iter().enumerate() {
        let none = PreviousDisk {
            point: "p0".into(),
            manifest_digest: String::new(),
            size: s.reader().size(),
            tracking: None,
        };
        assert!(matches!(
            s.changes_since(&none).await.unwrap(),
            Changes::Unknown { .. }
        ));
        let (got, read) = scan(&s.reader(), &[], &want[i]);
        assert_same(&got, &want[i], s.name());
        // Holes are skipped: only the written megabytes are read.
        assert!(
            read <= 3 * MIB,
            "{}: read {read} bytes of a sparse disk",
            s.name()
        );
        assert!(s.reader().describe().starts_with("nbd+unix:///"));
        previous.push(previous_of(s.as_ref(), "p1"));
    }
    for s in sources {
        s.release(Outcome::Committed {
            point: "p1".into(),
            manifest_digest: String::new(),
            keep: false,
        })
        .await
        .unwrap();
    }
    write_pattern(&mut want[0], 0x42, 2 * MIB, 2 * MIB);
    write_pattern(&mut want[1], 0x52, 5 * MIB, 64 * 1024);
    let base = want.clone();

    // Point 2: incremental, then failed.
    write(0, 0x43, 40 * MIB + 4096, 4096).await;
    write_pattern(&mut want[0], 0x43, 40 * MIB + 4096, 4096);
    let sources = snapshotter
        .prepare("vm1", "p1")
        .await
        .unwrap()
        .take()
        .await
        .unwrap();
    write(0, 0x44, 50 * MIB, 64 * 1024).await; // while point 2 is read
    let expect_dirty = [
        vec![(2 * MIB, 4 * MIB), (40 * MIB, 40 * MIB + BLOCK)],
        vec![(5 * MIB, 5 * MIB + BLOCK)],
    ];
    for (i, s) in sources.iter().enumerate() {
        let Changes::Unchanged(unchanged) = s.changes_since(&previous[i]).await.unwrap() else {
            panic!("{}: the bitmap was not trusted", s.name());
        };
        assert_eq!(
            complement(s.reader().size(), &unchanged),
            expect_dirty[i],
            "{}",
            s.name()
        );
        let (got, read) = scan(&s.reader(), &unchanged, &base[i]);
        assert_same(&got, &want[i], s.name());
        let dirty: u64 = expect_dirty[i].iter().map(|(a, b)| b - a).sum();
        assert_eq!(
            read,
            dirty,
            "{}: an incremental reads only the dirty blocks",
            s.name()
        );
    }
    for s in sources {
        s.release(Outcome::Failed { keep: false }).await.unwrap();
    }
    write_pattern(&mut want[0], 0x44, 50 * MIB, 64 * 1024);

    // Point 3: still against point 1, and it covers the failed point's changes too.
    let sources = snapshotter
        .prepare("vm1", "p1")
        .await
        .unwrap()
        .take()
        .await
        .unwrap();
    let expect_dirty = [
        vec![
            (2 * MIB, 4 * MIB),
            (40 * MIB, 40 * MIB + BLOCK),
            (50 * MIB, 50 * MIB + BLOCK),
        ],
        vec![(5 * MIB, 5 * MIB + BLOCK)],
    ];
    for (i, s) in sources.iter().enumerate() {
        let Changes::Unchanged(unchanged) = s.changes_since(&previous[i]).await.unwrap() else {
            panic!("{}: the bitmap was not trusted", s.name());
        };
        assert_eq!(
            complement(s.reader().size(), &unchanged),
            expect_dirty[i],
            "{}",
            s.name()
        );
        let (got, _) = scan(&s.reader(), &unchanged, &base[i]);
        assert_same(&got, &want[i], s.name());
    }
    for s in sources {
        s.release(Outcome::Committed {
            point: "p3".into(),
            manifest_digest: String::new(),
            keep: false,
        })
        .await
        .unwrap();
    }
    let left: Vec<_> = std::fs::read_dir(vm.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(PREFIX))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(
        writer
            .run(qapi::qmp::query_block_exports {}, "")
            .await
            .unwrap()
            .is_empty()
    );
}

/// Cost follows the change, not the disk: on a 1 TiB qcow2 disk, the incremental's
/// `changes_since` after one 4 KiB write returns two unchanged runs, quickly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_on_a_terabyte_disk_cost_what_changed() {
    if !qemu_or_skip("changes_on_a_terabyte_disk_cost_what_changed") {
        return;
    }
    const TIB: u64 = 1 << 40;
    let vm = Vm::start(&[DiskSpec {
        drive: true,
        name: "big",
        format: "qcow2",
        size: TIB,
        read_only: false,
    }]);
    let writer = vm.test_qmp().await;
    let mut options = QemuOptions::new(format!("unix:{}", vm.qmp_socket.display()), vm.path());
    // This machine has no TiB free: the test writes 4 KiB, so it vouches for the room.
    options.fleece.require_space = false;
    let snapshotter = QemuSnapshotter::new(options);
    let sources = snapshotter
        .prepare("big", "p1")
        .await
        .unwrap()
        .take()
        .await
        .unwrap();
    let previous = previous_of(sources[0].as_ref(), "p1");
    for s in sources {
        s.release(Outcome::Committed {
            point: "p1".into(),
            manifest_digest: String::new(),
            keep: false,
        })
        .await
        .unwrap();
    }
    guest_write(&writer, "big", 0x77, 700 << 30, 4096).await;
    let sources = snapshotter
        .prepare("big", "p1")
        .await
        .unwrap()
        .take()
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let changes = sources[0].changes_since(&previous).await.unwrap();
    let took = started.elapsed();
    let Changes::Unchanged(unchanged) = changes else {
        panic!("not trusted: {changes:?}")
    };
    assert_eq!(unchanged, vec![0..700 << 30, (700 << 30) + BLOCK..TIB]);
    eprintln!("changes_since on 1 TiB after one 4 KiB write: {took:?}");
    assert!(took.as_secs_f64() < 2.0, "changes_since took {took:?}");
    // The first data after the write, found without reading the holes block by block.
    let started = std::time::Instant::now();
    assert_eq!(sources[0].reader().next_data(0).unwrap(), 700 << 30);
    assert_eq!(
        sources[0].reader().next_data((700 << 30) + BLOCK).unwrap(),
        TIB
    );
    eprintln!("next_data over 1 TiB of holes: {:?}", started.elapsed());
    for s in sources {
        s.release(Outcome::Committed {
            point: "p2".into(),
            manifest_digest: String::new(),
            keep: false,
        })
        .await
        .unwrap();
    }
}
