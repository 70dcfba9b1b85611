//! `bulwark-controller export` with the real CLI: a small sparse image is backed up, served
//! over NBD from the vault by a child process, and read back by real NBD clients: two
//! `qemu-img compare` runs at once against the original image, and `nbdinfo --map` for the
//! holes. SIGTERM stops it with exit status 0 and the socket removed; `verify` passes after.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bulwark_tests::{
    controller, controller_bin, controller_json, root_or_skip, run, stderr_of, write_random,
};

const MIB: u64 = 1 << 20;

/// Kills the export child (by its pid) if the test ends early.
struct Export(Option<Child>);

impl Drop for Export {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait_for(path: &Path, child: &mut Child) {
    let start = Instant::now();
    while !path.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("export exited early: {status}");
        }
        assert!(start.elapsed() < Duration::from_secs(60), "no socket");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn export_serves_the_point_over_nbd_and_stops_on_sigterm() {
    if !root_or_skip(
        "export_serves_the_point_over_nbd_and_stops_on_sigterm",
        &["qemu-img", "nbdinfo", "kill"],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("disk.img");
    // 32 MiB sparse: data at the start, in the middle (unaligned) and in the last block.
    File::create(&image).unwrap().set_len(32 * MIB).unwrap();
    write_random(&image, 0, MIB as usize, 1);
    write_random(&image, 10 * MIB + 12_345, 300_000, 2);
    write_random(&image, 32 * MIB - 4096, 4096, 3);

    let vault = tmp.path().join("vault");
    let v = vault.to_str().unwrap();
    let out = controller(["init", "--vault", v, "--block-size", "64KiB"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let disk = format!("os={}", image.display());
    controller_json([
        "backup", "--vault", v, "--vm", "vm", "--disk", &disk, "--json",
    ]);

    // Non-loopback TCP is refused.
    let out = controller([
        "export",
        "--vault",
        v,
        "--vm",
        "vm",
        "--disk",
        "os",
        "--nbd",
        "tcp:0.0.0.0:0",
    ]);
    assert!(!out.status.success());
    assert!(stderr_of(&out).contains("loopback"), "{}", stderr_of(&out));

    let sock = tmp.path().join("nbd.sock");
    let child = Command::new(controller_bin())
        .args([
            "export", "--vault", v, "--vm", "vm", "--disk", "os", "--nbd",
        ])
        .arg(format!("unix:{}", sock.display()))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut export = Export(Some(child));
    wait_for(&sock, export.0.as_mut().unwrap());
    let uri = format!("nbd+unix:///os?socket={}", sock.display());

    // Two clients at once, each comparing every byte with the original.
    let compares: Vec<Child> = (0..2)
        .map(|_| {
            Command::new("qemu-img")
                .args(["compare", "-f", "raw", "-F", "raw"])
                .arg(&image)
                .arg(&uri)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in compares {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "qemu-img compare: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Block status: the zero blocks are holes, the data blocks are data.
    let map = run("nbdinfo", ["--map", &uri]);
    let map = String::from_utf8_lossy(&map.stdout).to_string();
    let mut extents = Vec::new();
    for line in map.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (off, len, ty): (u64, u64, u32) = (
            f[0].parse().unwrap(),
            f[1].parse().unwrap(),
            f[2].parse().unwrap(),
        );
        extents.push((off, len, ty));
    }
    let state_at = |pos: u64| {
        extents
            .iter()
            .find(|(o, l, _)| (*o..o + l).contains(&pos))
            .map(|e| e.2)
            .unwrap_or_else(|| panic!("no extent at {pos}: {map}"))
    };
    assert_eq!(extents.iter().map(|e| e.1).sum::<u64>(), 32 * MIB, "{map}");
    for data in [0, MIB - 1, 10 * MIB + 12_345, 32 * MIB - 1] {
        assert_eq!(state_at(data), 0, "data at {data}: {map}");
    }
    for hole in [2 * MIB, 20 * MIB, 32 * MIB - 65_537] {
        assert_eq!(state_at(hole), 3, "hole at {hole}: {map}");
    }

    // SIGTERM: exit status 0, socket removed.
    let pid = export.0.as_ref().unwrap().id().to_string();
    run("kill", ["-TERM", &pid]);
    let mut child = export.0.take().unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("export did not stop within 30 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "export exited with {status}");
    assert!(!sock.exists(), "the socket is still there");

    // The point is unchanged.
    let out = controller(["verify", "--vault", v]);
    assert!(out.status.success(), "verify: {}", stderr_of(&out));
}
