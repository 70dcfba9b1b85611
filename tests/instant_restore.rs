//! `bulwark-controller instant-restore` with a real TCG guest: a 64 MiB disk (an ext4 file
//! system in its first 32 MiB holding a marker and a script, random bytes after) is backed up;
//! the command serves the point over NBD and creates a qcow2 overlay backed by it; a guest boots
//! with the overlay as its disk, runs the script from it and writes a file and a raw MiB; the
//! command streams the point into the overlay through the guest's QMP socket (`block-stream`)
//! and stops the export. Then: the overlay has no backing file, the socket is gone, the guest
//! reads its whole disk after dropping its caches, the guest's writes are there, the unwritten
//! raw part equals the point (`qemu-img compare`), the file system is clean (`e2fsck -fn`), and
//! the point itself restores unchanged and verifies. Root only (the guest kit).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bulwark_tests::guest::{DiskFormat, GUEST_TOOLS, Guest, GuestSpec};
use bulwark_tests::{ChildLines, TestEnv, controller_bin, file_digest, root_or_skip, run};

const MIB: u64 = 1 << 20;
const DISK: u64 = 64 * MIB;
const FS: u64 = 32 * MIB;
/// Where the guest writes one raw MiB (in the random part, after the file system).
const RAW_AT_MIB: u64 = 40;

/// `len` bytes from /dev/urandom (the test's pseudo-random generator is slow in debug builds).
fn random_bytes(len: u64) -> Vec<u8> {
    let mut v = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(std::fs::File::open("/dev/urandom").unwrap(), len),
        &mut v,
    )
    .unwrap();
    v
}

fn sha256_of(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("b");
    std::fs::write(&p, bytes).unwrap();
    file_digest(&p)
}

/// `qemu-img compare` of `len` bytes at `offset` of two raw images.
fn compare_range(a: &Path, b: &Path, offset: u64, len: u64) -> std::process::Output {
    let opts = |p: &Path| {
        format!(
            "driver=raw,offset={offset},size={len},file.driver=file,file.filename={}",
            p.display()
        )
    };
    Command::new("qemu-img")
        .args(["compare", "--image-opts", &opts(a), &opts(b)])
        .output()
        .unwrap()
}

#[test]
fn instant_restore_runs_a_guest_from_the_vault_and_streams_its_disk_local() {
    let mut tools = GUEST_TOOLS.to_vec();
    tools.push("sha256sum");
    if !root_or_skip("instant_restore", &tools) {
        return;
    }
    let t_test = Instant::now();
    let phase = |what: &str| {
        eprintln!(
            "instant_restore: {what} at {} ms",
            t_test.elapsed().as_millis()
        )
    };
    let env = TestEnv::init(&["--block-size", "64KiB"]);
    phase("vault made");

    // The disk: ext4 made from a directory (no mount), then random bytes after the fs.
    let content = env.path("content");
    std::fs::create_dir_all(content.join("etc")).unwrap();
    std::fs::create_dir_all(content.join("bin")).unwrap();
    std::fs::create_dir_all(content.join("data")).unwrap();
    std::fs::write(content.join("etc/marker"), "instant-marker-7f3a\n").unwrap();
    std::fs::write(
        content.join("bin/app.sh"),
        "#!/bin/sh\necho \"APP-FROM-DISK-OK $(cat /mnt/os/etc/marker)\"\n",
    )
    .unwrap();
    let blob = random_bytes(3 * MIB);
    std::fs::write(content.join("data/blob"), &blob).unwrap();
    let image = env.path("os.img");
    let out = run(
        "mkfs.ext4",
        [
            "-q",
            "-F",
            "-d",
            content.to_str().unwrap(),
            image.to_str().unwrap(),
            &format!("{}k", FS / 1024),
        ],
    );
    assert!(out.status.success(), "mkfs.ext4: {out:?}");
    std::fs::File::options()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(DISK)
        .unwrap();
    let mut f = std::fs::File::options().write(true).open(&image).unwrap();
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(FS)).unwrap();
    std::io::Write::write_all(&mut f, &random_bytes(DISK - FS)).unwrap();
    drop(f);
    let original = file_digest(&image);
    phase("disk made");
    env.backup("vm", &[format!("os={}", image.display())], &[]);
    phase("backed up");

    // instant-restore, waiting for the guest's QMP socket (linked below once QEMU made it).
    let overlay = env.path("os.qcow2");
    let socket = env.path("os.qcow2.nbd");
    let qmp_link = env.path("qmp.sock");
    let t0 = Instant::now();
    let mut cmd = ChildLines::spawn(
        Command::new(controller_bin())
            .args(["instant-restore", "--vault", &env.vault, "--vm", "vm"])
            .args(["--disk", "os", "--json", "--overlay"])
            .arg(&overlay)
            .arg("--qmp")
            .arg(format!("unix:{}", qmp_link.display())),
        "instant-restore",
    );
    let first = cmd
        .line(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("no ready line: {}", cmd.stderr()));
    assert_eq!(first, format!("ready {}", overlay.display()));
    let t_ready = t0.elapsed();
    assert!(socket.exists(), "no export socket");

    // The guest boots with the overlay (backed by the vault) as its disk `os`.
    let spec = GuestSpec::default().disk("os", &overlay, DiskFormat::Qcow2);
    let mut guest = Guest::boot(&spec);
    let t_boot = t0.elapsed();
    let app = guest.sh_ok(
        "mkdir -p /mnt/os && mount -t ext4 /dev/disk/by-serial/os /mnt/os && sh /mnt/os/bin/app.sh",
    );
    let t_app = t0.elapsed();
    assert_eq!(app.trim(), "APP-FROM-DISK-OK instant-marker-7f3a");

    // The guest writes a file and one raw MiB after the file system.
    let guest_file = guest
        .sh_ok("head -c 1048576 /dev/urandom > /mnt/os/data/guest.bin && sync && sha256sum /mnt/os/data/guest.bin")
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let guest_raw = guest
        .sh_ok(&format!(
            "head -c 1048576 /dev/urandom > /tmp/raw && dd if=/tmp/raw of=/dev/disk/by-serial/os bs=1M seek={RAW_AT_MIB} conv=fsync 2>/dev/null && sha256sum /tmp/raw"
        ))
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();

    // Let the command reach QEMU: it streams, then stops the export and exits.
    std::os::unix::fs::symlink(guest.qmp_socket(), &qmp_link).unwrap();
    let status = cmd.wait(Duration::from_secs(300));
    let t_done = t0.elapsed();
    assert!(
        status.success(),
        "instant-restore: {status}\n{}",
        cmd.stderr()
    );
    let report: serde_json::Value =
        serde_json::from_str(&cmd.line(Duration::from_secs(5)).expect("the JSON report")).unwrap();
    assert_eq!(report["streamed"], true, "{report}");
    assert!(!socket.exists(), "the export's socket is still there");
    assert!(
        std::os::unix::net::UnixStream::connect(&socket).is_err(),
        "the export still answers"
    );

    // The overlay is standalone, and the guest reads its whole disk with the export gone.
    let info = run(
        "qemu-img",
        ["info", "-U", "--output=json", overlay.to_str().unwrap()],
    );
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert!(
        info.get("backing-filename").is_none() && info.get("full-backing-filename").is_none(),
        "the overlay still has a backing file: {info}"
    );
    let after = guest.sh_ok(&format!(
        "echo 3 > /proc/sys/vm/drop_caches && dd if=/dev/disk/by-serial/os of=/dev/null bs=1M 2>/dev/null && \
         sha256sum /mnt/os/data/guest.bin /mnt/os/data/blob && \
         dd if=/dev/disk/by-serial/os bs=1M skip={RAW_AT_MIB} count=1 2>/dev/null | sha256sum && sh /mnt/os/bin/app.sh"
    ));
    let lines: Vec<&str> = after.lines().collect();
    assert!(lines[0].starts_with(&guest_file), "{after}");
    assert!(lines[1].starts_with(&sha256_of(&blob)), "{after}");
    assert!(lines[2].starts_with(&guest_raw), "{after}");
    assert_eq!(lines[3], "APP-FROM-DISK-OK instant-marker-7f3a");
    phase("guest checked");
    guest.shutdown();
    drop(guest);
    phase("guest shut down");

    // Offline: the overlay is the point plus the guest's writes.
    let local = env.path("local.raw");
    let out = run(
        "qemu-img",
        [
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            overlay.to_str().unwrap(),
            local.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "qemu-img convert: {out:?}");
    let point = env.path("point.raw");
    let out = env.restore("vm", "latest", "os", &point, &[]);
    assert!(out.status.success(), "restore: {out:?}");
    assert_eq!(file_digest(&point), original, "the point changed");
    for (from, to) in [(FS, RAW_AT_MIB * MIB), ((RAW_AT_MIB + 1) * MIB, DISK)] {
        let out = compare_range(&local, &point, from, to - from);
        assert!(
            out.status.success(),
            "bytes {from}..{to} differ from the point: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let raw = bulwark_tests::read_all(&local);
    let at = (RAW_AT_MIB * MIB) as usize;
    assert_eq!(sha256_of(&raw[at..at + MIB as usize]), guest_raw);
    let fsck = run("e2fsck", ["-fn", local.to_str().unwrap()]);
    assert!(fsck.status.success(), "e2fsck: {fsck:?}");
    let dump = env.path("guest.bin");
    let out = run(
        "debugfs",
        [
            "-R",
            &format!("dump /data/guest.bin {}", dump.display()),
            local.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "debugfs: {out:?}");
    assert_eq!(file_digest(&dump), guest_file);
    let out = bulwark_tests::controller(["verify", "--vault", &env.vault]);
    assert!(out.status.success(), "verify: {out:?}");

    phase("offline checks done");
    eprintln!(
        "instant-restore timings from the command's start: overlay ready {} ms, guest ready \
         marker {} ms, app run from the restored disk {} ms, stream done and export stopped {} ms \
         (vault fetches {} blocks, {} bytes)",
        t_ready.as_millis(),
        t_boot.as_millis(),
        t_app.as_millis(),
        t_done.as_millis(),
        report["blocks_fetched"],
        report["bytes_fetched"]
    );
}
