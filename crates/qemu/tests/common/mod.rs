//! Real QEMU (TCG, paused CPU: a real block layer, no guest) for the tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bulwark_qemu::Qmp;

/// Set to 1 (CI does) to make a missing tool a failure instead of a skip.
pub const REQUIRE_SERVERS_ENV: &str = "BULWARK_REQUIRE_SERVERS";

pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

/// True when QEMU and the NBD tools are installed; otherwise a visible skip, or a panic under
/// BULWARK_REQUIRE_SERVERS=1.
pub fn qemu_or_skip(test: &str) -> bool {
    let missing: Vec<&str> = [
        "qemu-system-x86_64",
        "qemu-img",
        "qemu-io",
        "qemu-storage-daemon",
        "nbdinfo",
        "nbdcopy",
    ]
    .into_iter()
    .filter(|t| which(t).is_none())
    .collect();
    if missing.is_empty() {
        return true;
    }
    let why = format!("{test}: needs {}", missing.join(", "));
    if std::env::var(REQUIRE_SERVERS_ENV).is_ok_and(|v| v == "1") {
        panic!("{why}, and {REQUIRE_SERVERS_ENV}=1 forbids skipping");
    }
    eprintln!("SKIPPED {why} (install qemu-system-x86, qemu-utils, libnbd-bin)");
    false
}

pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A QEMU process of the test's own, killed by pid on drop.
pub struct Vm {
    pub dir: tempfile::TempDir,
    pub qmp_socket: PathBuf,
    pid: Option<u32>,
    child: Option<std::process::Child>,
}

pub struct DiskSpec {
    /// `-drive id=NAME` (true) or `-blockdev` + `-device id=NAME` (false).
    pub drive: bool,
    pub name: &'static str,
    pub format: &'static str,
    pub size: u64,
    pub read_only: bool,
}

/// The tests' usual two disks: `os`, a 64 MiB qcow2 `-drive`, and `data`, a 32 MiB raw
/// `-blockdev` on a SCSI disk.
pub fn os_and_data() -> Vec<DiskSpec> {
    const MIB: u64 = 1 << 20;
    vec![
        DiskSpec {
            drive: true,
            name: "os",
            format: "qcow2",
            size: 64 * MIB,
            read_only: false,
        },
        DiskSpec {
            drive: false,
            name: "data",
            format: "raw",
            size: 32 * MIB,
            read_only: false,
        },
    ]
}

impl Vm {
    pub fn start(disks: &[DiskSpec]) -> Vm {
        let dir = tempfile::tempdir().unwrap();
        Vm::start_in(dir, disks)
    }

    pub fn start_in(dir: tempfile::TempDir, disks: &[DiskSpec]) -> Vm {
        let qmp_socket = dir.path().join("qmp.sock");
        let _ = std::fs::remove_file(&qmp_socket);
        let mut args: Vec<String> = [
            "-M",
            "q35",
            "-S",
            "-nodefaults",
            "-display",
            "none",
            "-accel",
            "tcg",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        args.push("-qmp".into());
        args.push(format!("unix:{},server=on,wait=off", qmp_socket.display()));
        // A second monitor for the test's own guest writes while Bulwark holds the first
        // (QEMU serves one client per monitor).
        args.push("-qmp".into());
        args.push(format!(
            "unix:{},server=on,wait=off",
            dir.path().join("qmp-test.sock").display()
        ));
        if disks.iter().any(|d| !d.drive) {
            args.push("-device".into());
            args.push("virtio-scsi-pci,id=scsi0".into());
        }
        for d in disks {
            let img = dir.path().join(format!("{}.{}", d.name, d.format));
            if !img.exists() {
                run(
                    "qemu-img",
                    &[
                        "create",
                        "-q",
                        "-f",
                        d.format,
                        img.to_str().unwrap(),
                        &d.size.to_string(),
                    ],
                );
            }
            let ro = if d.read_only { "on" } else { "off" };
            if d.drive {
                args.push("-drive".into());
                args.push(format!(
                    "id={},file={},format={},if=none,read-only={ro}",
                    d.name,
                    img.display(),
                    d.format
                ));
                args.push("-device".into());
                args.push(format!("virtio-blk-pci,drive={}", d.name));
            } else {
                args.push("-blockdev".into());
                args.push(format!(
                    "driver=file,filename={},node-name={}-file,read-only={ro}",
                    img.display(),
                    d.name
                ));
                args.push("-blockdev".into());
                args.push(format!(
                    "driver={},file={}-file,node-name={}-fmt,read-only={ro}",
                    d.format, d.name, d.name
                ));
                args.push("-device".into());
                // A SCSI disk holds its block backend itself, so `qemu-io -d ID` writes
                // through it as the guest would.
                args.push(format!("scsi-hd,drive={}-fmt,id={}", d.name, d.name));
            }
        }
        let child = Command::new("qemu-system-x86_64")
            .args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        for _ in 0..500 {
            if qmp_socket.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            qmp_socket.exists(),
            "QEMU did not create its QMP socket: {args:?}"
        );
        Vm {
            dir,
            qmp_socket,
            pid: Some(pid),
            child: Some(child),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn image(&self, name: &str, format: &str) -> PathBuf {
        self.path().join(format!("{name}.{format}"))
    }

    pub fn pid(&self) -> u32 {
        self.pid.unwrap()
    }

    pub async fn qmp(&self) -> Arc<Qmp> {
        Arc::new(connect(&self.qmp_socket).await)
    }

    /// A session on the second monitor, for guest writes beside Bulwark's session.
    pub async fn test_qmp(&self) -> Arc<Qmp> {
        let socket = self.path().join("qmp-test.sock");
        Arc::new(connect(&socket).await)
    }

    /// Kills QEMU (by its pid) and gives the directory back, for a restart on the same images.
    pub fn kill(mut self) -> tempfile::TempDir {
        self.stop();
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, dir)
    }

    /// Waits (up to 20 s) for QEMU to exit by itself (after QMP `quit`), and gives the
    /// directory back.
    pub fn wait_exit(mut self) -> tempfile::TempDir {
        if let Some(child) = self.child.as_mut() {
            for _ in 0..400 {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.stop();
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, dir)
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.pid = None;
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A guest write through QEMU's block layer (qemu-io on the device, via HMP): `device` is a
/// `-drive` id, or `-d ID` for a `-blockdev` disk's guest device.
pub async fn guest_write(qmp: &Qmp, device: &str, pattern: u8, offset: u64, len: u64) {
    let out = qmp
        .hmp(&format!(
            "qemu-io {device} \"write -P 0x{pattern:02x} {offset} {len}\""
        ))
        .await
        .unwrap();
    // qemu-io prints its report on QEMU's stdout; HMP returns only errors.
    assert!(out.trim().is_empty(), "qemu-io {device}: {out}");
}

pub fn write_pattern(buf: &mut [u8], pattern: u8, offset: u64, len: u64) {
    buf[offset as usize..(offset + len) as usize].fill(pattern);
}

/// The whole export, read with nbdcopy.
pub fn read_export(uri: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join("export.raw");
    let _ = std::fs::remove_file(&out);
    run("nbdcopy", &[uri, out.to_str().unwrap()]);
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    data
}

/// `(offset, length, description)` of an NBD meta context, from nbdinfo --map.
pub fn nbd_map(uri: &str, context: &str) -> Vec<(u64, u64, String)> {
    let out = run("nbdinfo", &[&format!("--map={context}"), uri]);
    out.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let off = f.next()?.parse().ok()?;
            let len = f.next()?.parse().ok()?;
            let _ty = f.next()?;
            Some((off, len, f.collect::<Vec<_>>().join(" ")))
        })
        .collect()
}

/// The dirty ranges of an exported bitmap.
pub fn dirty_ranges(uri: &str, bitmap: &str) -> Vec<(u64, u64)> {
    nbd_map(uri, &format!("qemu:dirty-bitmap:{bitmap}"))
        .into_iter()
        .filter(|(_, _, d)| d == "dirty")
        .map(|(o, l, _)| (o, o + l))
        .collect()
}

/// Asserts two disk images are equal, naming the first differing offset (never printing MiBs).
#[track_caller]
pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: size differs");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i}: got 0x{:02x}, want 0x{:02x}",
            got[i], want[i]
        );
    }
}

/// Connects to a QMP socket of a QEMU this file started. `Vm::start` waits for the first
/// monitor's socket only; the second one comes a moment later, and QEMU creates each socket
/// file when it binds, a moment before it listens (CI hit both windows once on a loaded
/// machine). So a missing socket and a refused connection are retried for up to 10 s.
async fn connect(socket: &Path) -> Qmp {
    let addr = format!("unix:{}", socket.display());
    let mut tries = 0;
    loop {
        match Qmp::connect(&addr, Duration::from_secs(20)).await {
            Ok(q) => return q,
            Err(bulwark_qemu::Error::Connect { source, .. })
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                ) && tries < 200 =>
            {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("QMP {}: {e}", socket.display()),
        }
    }
}
