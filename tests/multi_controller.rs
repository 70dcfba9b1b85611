//! Several controllers on one vault: separate `bulwark-controller` processes (standing in for
//! two hosts, each with its own snapshot directory) back up different VMs and the same VM at
//! the same moment while a garbage collection (grace 0) runs against them, round after round,
//! on a local vault and on the S3 test server. Afterwards `verify` passes and every point
//! restores to exactly the image it was taken of. Also: `gc`/`prune --single-writer` on a
//! vault whose store ignores conditional writes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod vault_servers;

use std::collections::BTreeMap;
use std::process::{Child, Output, Stdio};

use bulwark_tests::{file_digest, stderr_of, write_random};
use vault_servers::{Backend, Place, place};

const MIB: u64 = 1 << 20;

fn spawn(place: &Place, args: &[&str]) -> Child {
    place
        .controller(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn bulwark-controller")
}

fn finish(child: Child, what: &str) -> Output {
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{what} failed: {}", stderr_of(&out));
    out
}

fn scenario(backend: Backend, rounds: u64) {
    let Some(place) = place(backend, "multi_controller") else {
        return;
    };
    let root = place.dir.path();
    let v = place.location.as_str();
    let init = place
        .controller(&["init", "--vault", v, "--block-size", "256KiB"])
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", stderr_of(&init));
    let a = root.join("a.img");
    let b = root.join("b.img");
    // Shared content between the two VMs: the same blocks deduplicate across controllers.
    write_random(&a, 0, (4 * MIB) as usize, 1);
    write_random(&b, 0, (4 * MIB) as usize, 1);
    write_random(&b, 2 * MIB, (2 * MIB) as usize, 2);
    let host = |h: &str| root.join(format!("host-{h}")).display().to_string();
    let (h1, h2) = (host("1"), host("2"));
    // point id -> (vm, digest of the image it was taken of)
    let mut points: BTreeMap<String, (String, String)> = BTreeMap::new();
    for round in 0..rounds {
        let (da, db) = (file_digest(&a), file_digest(&b));
        let disk_a = format!("os={}", a.display());
        let disk_b = format!("os={}", b.display());
        let backup = |vm: &str, disk: &str, snaps: &str| {
            spawn(
                &place,
                &place.copy_backup_args(vm, disk, snaps, &["--lease-wait", "2m"]),
            )
        };
        // Host 1 backs up vm-a, host 2 vm-b and vm-a too, GC runs meanwhile.
        let children: Vec<(&str, String, Child)> = vec![
            ("vm-a", da.clone(), backup("vm-a", &disk_a, &h1)),
            ("vm-b", db.clone(), backup("vm-b", &disk_b, &h2)),
            ("vm-a", da.clone(), backup("vm-a", &disk_a, &h2)),
        ];
        // GC (grace 0) again and again while any backup runs: each waits for the backups'
        // leases, and must never free a block one of them stored or reuses.
        let mut children = children;
        let mut gcs = 0;
        while children
            .iter_mut()
            .any(|(_, _, c)| c.try_wait().unwrap().is_none())
        {
            let gc = spawn(
                &place,
                &["gc", "--vault", v, "--grace", "0", "--wait", "2m"],
            );
            finish(gc, &format!("round {round}: gc"));
            gcs += 1;
        }
        assert!(gcs > 0, "round {round}: no GC overlapped the backups");
        for (vm, digest, child) in children {
            let out = finish(child, &format!("round {round}: backup of {vm}"));
            let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
            points.insert(id, (vm.to_string(), digest));
        }
        // Both VMs change between rounds (and their shared half too).
        write_random(&a, (round % 4) * MIB, MIB as usize, 100 + round);
        write_random(&b, ((round + 1) % 4) * MIB, MIB as usize, 200 + round);
        write_random(&b, 0, (MIB / 2) as usize, 100 + round);
    }
    // One more GC after everything, then every point must verify and restore.
    finish(
        spawn(&place, &["gc", "--vault", v, "--grace", "0"]),
        "final gc",
    );
    let out = place
        .controller(&["verify", "--vault", v])
        .output()
        .unwrap();
    assert!(out.status.success(), "verify: {}", stderr_of(&out));
    assert_eq!(
        points.len() as u64,
        3 * rounds,
        "point ids must be distinct"
    );
    for (id, (vm, digest)) in &points {
        let to = root.join("restored.img");
        let to_s = to.display().to_string();
        let out = place
            .controller(&[
                "restore", "--vault", v, "--vm", vm, "--point", id, "--disk", "os", "--to", &to_s,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "restore {vm}/{id}: {}",
            stderr_of(&out)
        );
        assert_eq!(&file_digest(&to), digest, "{vm}/{id}");
        std::fs::remove_file(&to).unwrap();
    }
}

#[test]
fn concurrent_controllers_and_gc_local() {
    scenario(Backend::Local, 4);
}

#[test]
fn concurrent_controllers_and_gc_s3() {
    scenario(Backend::S3, 3);
}

/// A vault whose store was found to ignore conditional writes (`conditional_writes: false`
/// in its configuration): GC and prune are refused without `--single-writer`, run with it.
#[test]
fn single_writer_flag_on_a_store_without_conditional_writes() {
    let Some(place) = place(Backend::Local, "single_writer") else {
        return;
    };
    let root = place.dir.path();
    let v = place.location.as_str();
    let img = root.join("d.img");
    write_random(&img, 0, MIB as usize, 5);
    let disk = format!("d={}", img.display());
    let snaps = root.join("snaps").display().to_string();
    let run = |args: &[&str]| place.controller(args).output().unwrap();
    let backup = place.copy_backup_args("vm", &disk, &snaps, &[]);
    assert!(run(&backup).status.success());
    let config = std::path::Path::new(v).join("bulwark-vault.json");
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    json["conditional_writes"] = serde_json::Value::Bool(false);
    std::fs::write(&config, serde_json::to_vec_pretty(&json).unwrap()).unwrap();

    let out = run(&["gc", "--vault", v, "--grace", "0"]);
    assert!(!out.status.success(), "gc ran without --single-writer");
    assert!(
        stderr_of(&out).contains("--single-writer"),
        "{}",
        stderr_of(&out)
    );
    let policy = root.join("p.toml");
    std::fs::write(
        &policy,
        "name = \"p\"\ntime_zone = \"UTC\"\n[schedule]\nfrequency = \"daily\"\ntimes = [\"02:30\"]\n[retention]\ndaily = 1\n",
    )
    .unwrap();
    let policy = policy.display().to_string();
    let prune = ["prune", "--vault", v, "--vm", "vm", "--policy", &policy];
    let out = run(&prune);
    assert!(!out.status.success(), "prune ran without --single-writer");
    assert!(
        stderr_of(&out).contains("--single-writer"),
        "{}",
        stderr_of(&out)
    );

    // Backups still work there (with the warning); with the flag, GC and prune run.
    let out = run(&backup);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let out = run(&["gc", "--vault", v, "--grace", "0", "--single-writer"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let mut with = prune.to_vec();
    with.push("--single-writer");
    let out = run(&with);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(run(&["verify", "--vault", v]).status.success());
}
