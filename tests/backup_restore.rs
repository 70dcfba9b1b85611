//! Backup, incremental backup, restore and verify through the real `bulwark-controller`
//! binary on plain image files (no root needed).
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use bulwark_tests::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn restore_ok(env: &TestEnv, vm: &str, point: &str, disk: &str, to: &Path) {
    let out = env.restore(vm, point, disk, to, &[]);
    assert!(out.status.success(), "restore failed: {}", stderr_of(&out));
}

fn disk_stats<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name)
        .unwrap()
}

fn make_image(path: &Path, size: u64, data_blocks: &[u64], seed: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for &b in data_blocks {
        f.write_all_at(&pseudo_random(MIB as usize, seed + b), b * MIB)
            .unwrap();
    }
}

fn write_at(path: &Path, offset: u64, data: &[u8]) {
    OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .write_all_at(data, offset)
        .unwrap();
}

#[test]
fn full_then_incremental_restores_each_point_bit_exact() {
    let env = TestEnv::new();
    let os = env.path("os.img");
    let data = env.path("data.img");
    make_image(&os, 24 * MIB, &(0..24).collect::<Vec<_>>(), 1);
    make_image(&data, 16 * MIB + 4096, &[0, 3, 7, 15], 2);
    write_at(&data, 16 * MIB, &pseudo_random(4096, 77));
    let disks = vec![
        format!("os={}", os.display()),
        format!("data={}", data.display()),
    ];

    let full = env.backup("vm1", &disks, &[]);
    assert_eq!(full["vm"], "vm1");
    assert_eq!(full["consistency"], "crash");
    let os1 = file_digest(&os);
    let data1 = file_digest(&data);
    assert_eq!(disk_stats(&full, "os")["changed_blocks"], 24);
    assert_eq!(disk_stats(&full, "os")["blocks"], 24);
    assert_eq!(disk_stats(&full, "data")["blocks"], 17);
    assert_eq!(disk_stats(&full, "data")["size"], 16 * MIB + 4096);

    // Scattered 4 KiB writes into 5 distinct blocks of os and 1 of data.
    for (i, block) in [2u64, 5, 9, 13, 21].iter().enumerate() {
        write_at(
            &os,
            block * MIB + 4096 * i as u64,
            &pseudo_random(4096, 100 + i as u64),
        );
    }
    write_at(&data, 7 * MIB + 12345, b"changed");
    let inc = env.backup("vm1", &disks, &[]);
    let os2 = file_digest(&os);
    let data2 = file_digest(&data);
    let s = disk_stats(&inc, "os");
    assert_eq!(s["changed_blocks"], 5, "{s}");
    assert_eq!(s["blocks_uploaded"], 5, "{s}");
    assert_eq!(s["unchanged_blocks"], 19, "{s}");
    assert_eq!(s["previous_point"], full["point"]);
    // Only the changed blocks (incompressible 1 MiB each) and the manifest were uploaded.
    let uploaded = s["bytes_uploaded"].as_u64().unwrap();
    assert!(uploaded < 5 * MIB + 64 * 1024, "uploaded {uploaded}");
    assert!(uploaded >= 5 * MIB, "uploaded {uploaded}");
    assert_eq!(disk_stats(&inc, "data")["changed_blocks"], 1);

    for (point, disk, expected) in [
        (&full["point"], "os", &os1),
        (&full["point"], "data", &data1),
        (&inc["point"], "os", &os2),
        (&inc["point"], "data", &data2),
    ] {
        let to = env.path(&format!("r-{disk}-{}.img", point.as_str().unwrap()));
        restore_ok(&env, "vm1", point.as_str().unwrap(), disk, &to);
        assert_eq!(&file_digest(&to), expected, "{disk} at {point}");
    }
    // `latest` is the incremental.
    let to = env.path("latest.img");
    restore_ok(&env, "vm1", "latest", "os", &to);
    assert_eq!(file_digest(&to), os2);

    let out = controller(["verify", "--vault", &env.vault]);
    assert!(out.status.success(), "{}", stdout_of(&out));
    assert!(
        stdout_of(&out).contains("OK: 2 points"),
        "{}",
        stdout_of(&out)
    );

    let list = controller_json(["list", "--vault", &env.vault, "--vm", "vm1", "--json"]);
    let ids: Vec<_> = list["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].clone())
        .collect();
    assert_eq!(ids, vec![full["point"].clone(), inc["point"].clone()]);
}

#[test]
fn holes_are_not_read_zeros_not_uploaded_and_restored_as_holes() {
    let env = TestEnv::new();
    let img = env.path("sparse.img");
    // 64 MiB: block 0 data, block 10 written zeros (allocated), the rest holes.
    make_image(&img, 64 * MIB, &[0], 3);
    write_at(&img, 10 * MIB, &vec![0u8; MIB as usize]);
    let r = env.backup("vm", &[img.display().to_string()], &[]);
    let s = disk_stats(&r, "sparse");
    assert_eq!(s["blocks"], 64);
    assert_eq!(s["zero_blocks"], 63, "{s}");
    assert_eq!(s["hole_blocks"], 62, "{s}");
    assert_eq!(s["bytes_read"], 2 * MIB, "holes are not read: {s}");
    assert_eq!(s["blocks_uploaded"], 1, "{s}");

    let to = env.path("restored.img");
    restore_ok(&env, "vm", "latest", "sparse", &to);
    assert_eq!(file_digest(&to), file_digest(&img));
    let allocated = allocated_bytes(&to);
    assert!(
        allocated <= 2 * MIB,
        "restore writes zero blocks as holes: {allocated} bytes allocated"
    );
}

#[test]
fn a_disk_that_grows_and_shrinks() {
    let env = TestEnv::new();
    let img = env.path("d.img");
    make_image(&img, 8 * MIB, &[0, 1, 2, 3, 4, 5, 6, 7], 4);
    let p1 = env.backup("vm", &[format!("d={}", img.display())], &[]);
    let d1 = file_digest(&img);
    // Grow by 3.5 MiB with new data at the end.
    let f = OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len(11 * MIB + MIB / 2).unwrap();
    f.write_all_at(&pseudo_random(MIB as usize, 9), 10 * MIB)
        .unwrap();
    drop(f);
    let p2 = env.backup("vm", &[format!("d={}", img.display())], &[]);
    let d2 = file_digest(&img);
    let s = disk_stats(&p2, "d");
    assert_eq!(s["blocks"], 12);
    assert_eq!(s["unchanged_blocks"], 8, "{s}");
    // Shrink to 5.25 MiB: the short last block is new content.
    OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(5 * MIB + MIB / 4)
        .unwrap();
    let p3 = env.backup("vm", &[format!("d={}", img.display())], &[]);
    let d3 = file_digest(&img);
    let s = disk_stats(&p3, "d");
    assert_eq!(s["blocks"], 6);
    assert_eq!(s["unchanged_blocks"], 5, "{s}");
    assert_eq!(s["changed_blocks"], 1, "{s}");

    for (p, d) in [(&p1, &d1), (&p2, &d2), (&p3, &d3)] {
        let to = env.path(&format!("r-{}.img", p["point"].as_str().unwrap()));
        restore_ok(&env, "vm", p["point"].as_str().unwrap(), "d", &to);
        assert_eq!(&file_digest(&to), d);
        assert_eq!(
            std::fs::metadata(&to).unwrap().len(),
            p["disks"][0]["size"].as_u64().unwrap()
        );
    }
}

#[test]
fn the_same_data_on_two_vms_is_stored_once() {
    let env = TestEnv::new();
    let a = env.path("a.img");
    make_image(&a, 4 * MIB, &[0, 1, 2, 3], 5);
    let b = env.path("b.img");
    std::fs::copy(&a, &b).unwrap();
    env.backup("vm-a", &[a.display().to_string()], &[]);
    let r = env.backup("vm-b", &[b.display().to_string()], &[]);
    let s = disk_stats(&r, "b");
    assert_eq!(s["blocks_deduplicated"], 4, "{s}");
    assert_eq!(s["blocks_uploaded"], 0, "{s}");
}
