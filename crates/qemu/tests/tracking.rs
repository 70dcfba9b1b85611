//! Bitmap chain safety on real QEMU 7.2: the same QEMU, a clean restart (qcow2 bitmaps persist,
//! raw ones die), a crash (inconsistent bitmap), a resized disk.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use bulwark_qemu::{FleeceOptions, Fleecing, Qmp, TakenDisk, Trust};
use bulwark_snapshot::PreviousDisk;
use common::*;

const MIB: u64 = 1 << 20;

fn disks() -> Vec<DiskSpec> {
    os_and_data()
}

async fn take(qmp: &Arc<Qmp>, vm: &Vm) -> Vec<TakenDisk> {
    Fleecing::prepare(qmp.clone(), &FleeceOptions::new(vm.path()))
        .await
        .unwrap()
        .take()
        .await
        .unwrap()
}

/// Commits a point: returns what the next backup gets handed back per disk.
async fn commit(taken: Vec<TakenDisk>, point: &str) -> Vec<PreviousDisk> {
    let mut previous = Vec::new();
    for d in taken {
        previous.push(PreviousDisk {
            point: point.into(),
            manifest_digest: String::new(),
            size: d.info().disk.size,
            tracking: Some(d.record().to_tracking()),
        });
        d.release(true).await.unwrap();
    }
    previous
}

#[track_caller]
fn unknown(t: Trust, word: &str) {
    match t {
        Trust::Unknown(reason) => {
            assert!(reason.contains(word), "reason {reason:?} lacks {word:?}")
        }
        Trust::Bitmap(b) => panic!("trusted {b}, expected a full read because {word}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bitmaps_are_trusted_only_while_they_hold_every_change() {
    if !qemu_or_skip("bitmaps_are_trusted_only_while_they_hold_every_change") {
        return;
    }
    let vm = Vm::start(&disks());
    let qmp = vm.qmp().await;
    let first = take(&qmp, &vm).await;
    let no_record = PreviousDisk {
        point: "p0".into(),
        manifest_digest: String::new(),
        size: 64 * MIB,
        tracking: None,
    };
    unknown(first[0].judge(&no_record), "recorded no dirty bitmap");
    let p1 = commit(first, "p1").await;
    assert!(
        !p1[0]
            .tracking
            .as_ref()
            .unwrap()
            .fields
            .contains_key("qemu_pid"),
        "qcow2: persistent, no process identity"
    );
    assert!(
        p1[1]
            .tracking
            .as_ref()
            .unwrap()
            .fields
            .contains_key("qemu_pid"),
        "raw: bound to this QEMU"
    );

    // Same QEMU: both trusted.
    guest_write(&qmp, "os", 0x31, 0, 64 * 1024).await;
    let second = take(&qmp, &vm).await;
    for (d, p) in second.iter().zip(&p1) {
        let name = p.tracking.as_ref().unwrap().fields["bitmap"].clone();
        assert_eq!(d.judge(p), Trust::Bitmap(name));
    }
    let p2 = commit(second, "p2").await;

    // A clean restart: the qcow2 bitmap is saved in the image, the raw one is gone.
    qmp.run(qapi::qmp::quit {}, "").await.ok();
    drop(qmp);
    let dir = vm.wait_exit();
    let vm = Vm::start_in(dir, &disks());
    let qmp = vm.qmp().await;
    guest_write(&qmp, "os", 0x32, 5 * MIB, 64 * 1024).await;
    let third = take(&qmp, &vm).await;
    let os_bitmap = p2[0].tracking.as_ref().unwrap().fields["bitmap"].clone();
    assert_eq!(third[0].judge(&p2[0]), Trust::Bitmap(os_bitmap.clone()));
    unknown(third[1].judge(&p2[1]), "QEMU was restarted");
    assert_eq!(
        dirty_ranges(&third[0].uri(), &os_bitmap),
        vec![(5 * MIB, 5 * MIB + 65536)],
        "the persistent bitmap kept recording"
    );
    let p3 = commit(third, "p3").await;

    // A crash before QEMU saved the new persistent bitmap (it is written at close): gone.
    drop(qmp);
    let dir = vm.kill();
    let vm = Vm::start_in(dir, &disks());
    let qmp = vm.qmp().await;
    let fourth = take(&qmp, &vm).await;
    unknown(fourth[0].judge(&p3[0]), "not a recording bitmap");
    unknown(fourth[1].judge(&p3[1]), "QEMU was restarted");
    let p4 = commit(fourth, "p4").await;

    // A clean stop saves it; QEMU marks it in use when it loads it again, and a crash then
    // leaves it inconsistent.
    qmp.run(qapi::qmp::quit {}, "").await.ok();
    drop(qmp);
    let vm = Vm::start_in(vm.wait_exit(), &disks());
    let qmp = vm.qmp().await;
    drop(qmp);
    let vm = Vm::start_in(vm.kill(), &disks());
    let qmp = vm.qmp().await;
    let fifth = take(&qmp, &vm).await;
    unknown(fifth[0].judge(&p4[0]), "inconsistent");
    assert_eq!(
        fifth[0].info().inconsistent,
        vec![p4[0].tracking.as_ref().unwrap().fields["bitmap"].clone()]
    );
    let p4 = commit(fifth, "p5").await;

    // A resized disk.
    qmp.run(
        qapi::qmp::block_resize {
            device: Some("os".into()),
            node_name: None,
            size: 128 * MIB as i64,
        },
        "os",
    )
    .await
    .unwrap();
    let fifth = take(&qmp, &vm).await;
    unknown(fifth[0].judge(&p4[0]), "resized");
    assert_eq!(
        fifth[1].judge(&p4[1]),
        Trust::Bitmap(p4[1].tracking.as_ref().unwrap().fields["bitmap"].clone())
    );
    // A record of another kind is never trusted.
    let mut other = p4[1].clone();
    other.tracking.as_mut().unwrap().kind = "reflink-base".into();
    unknown(fifth[1].judge(&other), "reflink-base");
    commit(fifth, "p6").await;
}
