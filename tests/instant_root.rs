//! Instant recovery of a guest's ROOT disk: the Debian test guest's root image (systemd as PID
//! 1, `tests/guest/debian.sh`) is backed up; `bulwark-controller instant-restore` serves the
//! point over NBD and creates a qcow2 overlay backed by that export; QEMU (TCG) boots the
//! guest with the overlay as its root disk, so the kernel, systemd and everything else the
//! guest runs is read from the vault on demand. Measured from the command's start: the overlay
//! ready, QEMU started, systemd (the init of the served disk) running, the ready marker that
//! the guest's own service prints on the serial console. Then the guest writes a file: after
//! it shut down, the file is in the overlay (read back from the overlay plus its backing export
//! with `qemu-img convert` and `debugfs`), not a byte of the vault changed (every object's
//! size and mtime as before) and `verify` passes. The stream into the overlay is
//! `tests/instant_restore.rs`'s part. Root only (the guest kit and mmdebstrap).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use bulwark_tests::guest::{DiskFormat, GUEST_TOOLS, Guest, GuestSpec, build_debian_guest};
use bulwark_tests::{ChildLines, TestEnv, controller, controller_bin, root_or_skip, run};

/// Every file under `dir` with its size and modification time.
fn listing(dir: &Path) -> BTreeMap<PathBuf, (u64, SystemTime)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else {
                out.insert(e.path(), (m.len(), m.modified().unwrap()));
            }
        }
    }
    out
}

#[test]
fn instant_restore_boots_a_guest_from_its_served_root_disk() {
    let mut tools = GUEST_TOOLS.to_vec();
    tools.extend(["mmdebstrap", "sha256sum"]);
    if !root_or_skip("instant_root", &tools) {
        return;
    }
    let t_test = Instant::now();
    let phase = |what: &str| {
        eprintln!(
            "instant_root: {what} at {} ms",
            t_test.elapsed().as_millis()
        )
    };
    let image = build_debian_guest();
    if image.build_time > Duration::ZERO {
        eprintln!("Debian guest image built in {:.1?}", image.build_time);
    }
    phase("guest image ready");

    // The point: the guest's root disk as it is in the image cache (raw ext4, 1 GiB).
    let env = TestEnv::init(&["--block-size", "256KiB"]);
    env.backup("deb", &[format!("root={}", image.root.display())], &[]);
    phase("root disk backed up");
    let vault_dir = PathBuf::from(&env.vault);
    let before = listing(&vault_dir);

    // instant-restore without --qmp: serve and keep serving until SIGTERM.
    let overlay = env.path("root.qcow2");
    let socket = env.path("root.qcow2.nbd");
    let t0 = Instant::now();
    let mut cmd = ChildLines::spawn(
        Command::new(controller_bin())
            .args(["instant-restore", "--vault", &env.vault, "--vm", "deb"])
            .args(["--disk", "root", "--overlay"])
            .arg(&overlay),
        "instant-restore",
    );
    let first = cmd
        .line(Duration::from_secs(120))
        .unwrap_or_else(|| panic!("no ready line: {}", cmd.stderr()));
    assert_eq!(first, format!("ready {}", overlay.display()));
    let t_ready = t0.elapsed();
    assert!(socket.exists(), "no export socket");

    // Boot: the overlay is the root disk (serial "root": the initramfs mounts it and
    // switch_roots to its /sbin/init).
    let t_qemu = t0.elapsed();
    let mut guest = Guest::boot(
        &GuestSpec {
            memory_mib: 512,
            boot_timeout: Duration::from_secs(300),
            system: Some(image.system.clone()),
            ..GuestSpec::default()
        }
        .disk("root", &overlay, DiskFormat::Qcow2),
    );
    let t_marker = t_qemu + guest.boot_time();
    phase("guest ready");

    // PID 1 is systemd from the served disk; when it started, on the guest's clock (µs since
    // the kernel started).
    let out = guest.sh_ok(
        "readlink /proc/1/exe; findmnt -n -o SOURCE /; echo \"$(cat /sys/block/$(basename $(findmnt -n -o SOURCE /))/serial)\"; \
         systemctl show -p UserspaceTimestampMonotonic --value",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].contains("systemd"), "PID 1 is not systemd: {out}");
    assert_eq!(
        lines.get(2).copied(),
        Some("root"),
        "/ is not the served disk: {out}"
    );
    let systemd_us: u64 = lines[3].trim().parse().unwrap();
    let t_init = t_qemu + Duration::from_micros(systemd_us);

    // A write in the guest, then shut it down (its writes flushed to the overlay).
    let proof = format!(
        "written by the instantly restored guest {}",
        std::process::id()
    );
    guest.sh_ok(&format!(
        "echo '{proof}' > /root/instant-proof && sync && sha256sum /root/instant-proof"
    ));
    guest.shutdown();
    drop(guest);
    phase("guest shut down");

    // The write is in the overlay: the overlay over its (still served) backing export holds
    // the file.
    let merged = env.path("merged.raw");
    run(
        "qemu-img",
        [
            "convert".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-O".as_ref(),
            "raw".as_ref(),
            overlay.as_os_str(),
            merged.as_os_str(),
        ],
    );
    let cat = run(
        "debugfs",
        [
            "-R".as_ref(),
            "cat /root/instant-proof".as_ref(),
            merged.as_os_str(),
        ],
    );
    assert_eq!(String::from_utf8_lossy(&cat.stdout).trim(), proof);
    std::fs::remove_file(&merged).unwrap();
    let info = run(
        "qemu-img",
        ["info", "--output=json", overlay.to_str().unwrap()],
    );
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert!(
        info["backing-filename"].as_str().is_some_and(
            |b| b.contains(r#""driver":"nbd""#) && b.contains(socket.to_str().unwrap())
        ),
        "the overlay's backing file is not the export: {info}"
    );

    // SIGTERM stops the export; the vault is untouched and verifies.
    run("kill", ["-TERM", &cmd.pid().to_string()]);
    let status = cmd.wait(Duration::from_secs(300));
    assert!(
        status.success(),
        "instant-restore: {status}\n{}",
        cmd.stderr()
    );
    assert_eq!(
        listing(&vault_dir),
        before,
        "the vault changed while the guest ran"
    );
    let out = controller(["verify", "--vault", &env.vault]);
    assert!(out.status.success(), "verify: {out:?}");
    phase("done");

    eprintln!(
        "instant_root timings from the command's start: overlay ready {} ms, QEMU started {} \
         ms, systemd (PID 1 from the served disk) started {} ms (QEMU start + {} ms on the \
         guest's clock since its kernel started), guest's ready marker on the serial console \
         {} ms",
        t_ready.as_millis(),
        t_qemu.as_millis(),
        t_init.as_millis(),
        systemd_us / 1000,
        t_marker.as_millis(),
    );
}
