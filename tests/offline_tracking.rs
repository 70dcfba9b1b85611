//! Offline qcow2 change tracking through the CLI, on a loop-mounted ext4 datastore (root): a
//! full backup leaves a persistent dirty bitmap in the image; writes by another QEMU program
//! (`qemu-io`) while no VM runs are recorded in it; the next backup reads only the dirty
//! clusters, restores bit for bit, and writes nothing of the disk's size beside the image. A
//! bitmap made inconsistent (a QEMU program killed with the image open) or removed gives a full
//! read with the reason in the report; a raw image is always read in full, with its reason.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bulwark_tests::{FsType, LoopFs, TestEnv, controller_bin, root_or_skip, stderr_of};

const MIB: u64 = 1 << 20;
/// The bitmap's granularity (qcow2's cluster size) and the vault's block size here.
const GRAIN: u64 = 64 << 10;

fn qemu_io(format: &str, image: &Path, command: &str) -> std::process::Output {
    Command::new("qemu-io")
        .args(["-f", format, "-c", command])
        .arg(image)
        .output()
        .unwrap()
}

fn io_ok(format: &str, image: &Path, command: &str) {
    let out = qemu_io(format, image, command);
    assert!(out.status.success(), "{command}: {}", stderr_of(&out));
}

fn used_bytes(dir: &Path) -> u64 {
    let st = rustix::fs::statvfs(dir).unwrap();
    (st.f_blocks - st.f_bfree) * st.f_frsize
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    out.sort();
    out
}

struct Setup {
    env: TestEnv,
    fs: LoopFs,
    run: PathBuf,
}

impl Setup {
    /// A vault with 64 KiB blocks and a 160 MiB loop-mounted ext4 datastore; `None` (the test
    /// skips) without root or QEMU's tools.
    fn new(test: &str) -> Option<Setup> {
        let tools = [
            "mkfs.ext4",
            "losetup",
            "qemu-img",
            "qemu-io",
            "qemu-storage-daemon",
        ];
        if !root_or_skip(test, &tools) {
            return None;
        }
        let env = TestEnv::init(&["--block-size", "64KiB"]);
        let fs = LoopFs::create(&env.root, "datastore", 160 * MIB, FsType::Ext4);
        let run = env.path("run");
        std::fs::create_dir_all(&run).unwrap();
        Some(Setup { env, fs, run })
    }

    /// `backup --disk os=IMAGE [--disk data=RAW]`, watching the datastore's used bytes while
    /// it runs: nothing of the disk's size may be written there.
    fn backup(&self, disks: &[(&str, &Path)]) -> serde_json::Value {
        let used_before = used_bytes(self.fs.path());
        let files_before = files_under(self.fs.path());
        let mut args: Vec<String> = ["backup", "--vault", &self.env.vault, "--vm", "vm1"]
            .map(String::from)
            .to_vec();
        for (name, path) in disks {
            args.push("--disk".into());
            args.push(format!("{name}={}", path.display()));
        }
        args.extend(["--runtime-dir".into(), self.run.display().to_string()]);
        args.push("--json".into());
        let mut child = Command::new(controller_bin())
            .args(&args)
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut peak = used_before;
        while child.try_wait().unwrap().is_none() {
            peak = peak.max(used_bytes(self.fs.path()));
            std::thread::sleep(Duration::from_millis(2));
        }
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "backup: {}", stderr_of(&out));
        assert!(
            peak - used_before < 4 * MIB,
            "{} bytes were written beside the images during an offline backup",
            peak - used_before
        );
        assert_eq!(files_under(self.fs.path()), files_before, "files appeared");
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// A QEMU process with `image` open for writing (a writable NBD export of it), as a
    /// running VM has; it lets go when dropped.
    fn hold_for_writing(&self, image: &Path, format: &str) -> bulwark_tests::ChildLines {
        let socket = self.env.path(&format!("qsd-{format}.sock"));
        let mut daemon = Command::new("qemu-storage-daemon");
        daemon.args([
            "--blockdev",
            &format!("driver=file,node-name=f,filename={}", image.display()),
            "--blockdev",
            &format!("driver={format},node-name=d,file=f"),
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", socket.display()),
            "--export",
            "type=nbd,id=e,node-name=d,writable=on",
        ]);
        let holder = bulwark_tests::ChildLines::spawn(&mut daemon, "qemu-storage-daemon");
        for _ in 0..500 {
            if socket.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(socket.exists(), "{}", holder.stderr());
        holder
    }

    /// `backup --disk NAME=IMAGE` of an image a QEMU process writes: refused, nothing
    /// committed, and the error names the image and the lock, saying each thing once (each
    /// error layer used to repeat its cause's text, so the reason came two or three times).
    fn assert_refused_once(&self, name: &str, image: &Path) {
        let points = point_count(&self.env);
        let out = Command::new(controller_bin())
            .args([
                "backup",
                "--vault",
                &self.env.vault,
                "--vm",
                "vm1",
                "--disk",
            ])
            .arg(format!("{name}={}", image.display()))
            .arg("--runtime-dir")
            .arg(&self.run)
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        let err = stderr_of(&out);
        assert!(!out.status.success(), "backed up an image a QEMU writes");
        assert!(
            err.contains(&image.display().to_string()) && err.contains("\"write\" lock"),
            "{err}"
        );
        for once in [
            "the image is in use",
            "\"write\" lock",
            "an offline backup needs the VM stopped",
        ] {
            assert_eq!(err.matches(once).count(), 1, "{once:?} not once in:\n{err}");
        }
        assert_eq!(point_count(&self.env), points, "a point was committed");
    }

    /// Restores `disk` of the point and compares it with the image (`qemu-img compare`).
    fn assert_restores(&self, report: &serde_json::Value, disk: &str, image: &Path, format: &str) {
        let point = report["point"].as_str().unwrap();
        let to = self.env.path(&format!("restored-{disk}.raw"));
        let out = self.env.restore("vm1", point, disk, &to, &[]);
        assert!(out.status.success(), "restore: {}", stderr_of(&out));
        let same = Command::new("qemu-img")
            .args(["compare", "-q", "-f", "raw", "-F", format])
            .arg(&to)
            .arg(image)
            .status()
            .unwrap();
        assert!(
            same.success(),
            "{disk}: the restore of {point} differs from the image"
        );
        std::fs::remove_file(&to).unwrap();
    }
}

fn disk<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("no disk {name} in {report}"))
}

fn reason<'a>(report: &'a serde_json::Value, name: &str) -> &'a str {
    disk(report, name)["change_tracking"]
        .as_str()
        .unwrap_or_else(|| panic!("{name} was read as an incremental: {report}"))
}

fn bitmap_names(image: &Path) -> Vec<String> {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(image)
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|b| b["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn offline_qcow2_on_ext4_incrementals_read_only_the_dirty_clusters() {
    let Some(s) = Setup::new("offline_qcow2_on_ext4_incrementals_read_only_the_dirty_clusters")
    else {
        return;
    };
    let os = s.fs.path().join("os.qcow2");
    let data = s.fs.path().join("data.img");
    let made = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&os)
        .arg("128M")
        .status()
        .unwrap();
    assert!(made.success());
    std::fs::File::create(&data)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    io_ok("qcow2", &os, "write -P 0x61 1M 24M");
    io_ok("raw", &data, "write -P 0x62 1M 1M");
    let disks = [("os", os.as_path()), ("data", data.as_path())];

    // Full: no previous point.
    let full = s.backup(&disks);
    assert_eq!(disk(&full, "os")["snapshot"], "qemu-offline");
    assert!(disk(&full, "os")["previous_point"].is_null(), "{full}");
    s.assert_restores(&full, "os", &os, "qcow2");
    assert_eq!(bitmap_names(&os).len(), 1, "the image keeps one bitmap");

    // Writes while no VM runs, recorded by qemu-io in the image's bitmap.
    let writes = [
        (0xab_u8, 5 * MIB, 4096_u64),
        (0xac, 70 * MIB + 4096, 100 << 10),
        (0xad, 100 * MIB + GRAIN - 1, 2), // straddles two clusters
    ];
    for (p, off, len) in writes {
        io_ok("qcow2", &os, &format!("write -P 0x{p:x} {off} {len}"));
    }
    io_ok("raw", &data, "write -P 0x63 3M 4k");
    let dirty: u64 = writes
        .iter()
        .map(|(_, off, len)| (off + len).div_ceil(GRAIN) - off / GRAIN)
        .sum::<u64>()
        * GRAIN;
    let incr = s.backup(&disks);
    let os_report = disk(&incr, "os");
    assert!(
        os_report.get("change_tracking").is_none(),
        "the offline qcow2 was read in full: {incr}"
    );
    let read = os_report["bytes_read"].as_u64().unwrap();
    eprintln!(
        "incremental of the offline qcow2: {read} bytes read for {dirty} bytes of dirty clusters"
    );
    assert!(read <= 2 * dirty, "read {read} bytes for {dirty} dirty");
    s.assert_restores(&incr, "os", &os, "qcow2");
    // The raw image has nowhere to keep a bitmap: read in full, and the report says why.
    assert!(reason(&incr, "data").contains("raw image"), "{incr}");
    s.assert_restores(&incr, "data", &data, "raw");

    // A QEMU program killed with the image open leaves the bitmap in use: full read.
    io_ok("qcow2", &os, "write -P 0xae 9M 64k");
    let killed = qemu_io("qcow2", &os, "sigraise 9");
    assert!(!killed.status.success());
    let after_kill = s.backup(&disks);
    assert!(
        reason(&after_kill, "os").contains("inconsistent"),
        "{after_kill}"
    );
    assert!(disk(&after_kill, "os")["bytes_read"].as_u64().unwrap() >= 24 * MIB);
    s.assert_restores(&after_kill, "os", &os, "qcow2");

    // Removed by someone: full read, and the chain starts again after it.
    for name in bitmap_names(&os) {
        let removed = Command::new("qemu-img")
            .args(["bitmap", "--remove"])
            .arg(&os)
            .arg(&name)
            .status()
            .unwrap();
        assert!(removed.success());
    }
    io_ok("qcow2", &os, "write -P 0xaf 11M 64k");
    let after_remove = s.backup(&disks);
    assert!(
        reason(&after_remove, "os").contains("not a recording bitmap"),
        "{after_remove}"
    );
    s.assert_restores(&after_remove, "os", &os, "qcow2");
    io_ok("qcow2", &os, "write -P 0xb0 12M 4k");
    let again = s.backup(&disks);
    assert!(
        disk(&again, "os").get("change_tracking").is_none(),
        "{again}"
    );
    assert!(disk(&again, "os")["bytes_read"].as_u64().unwrap() <= 2 * GRAIN);
    s.assert_restores(&again, "os", &os, "qcow2");

    // Written by a QEMU process meanwhile: refused, saying why once.
    let holder = s.hold_for_writing(&os, "qcow2");
    s.assert_refused_once("os", &os);
    drop(holder);
}

/// The `points` of VM `vm1` as `list --json` gives them.
fn point_count(env: &TestEnv) -> usize {
    let list =
        bulwark_tests::controller_json(["list", "--vault", &env.vault, "--vm", "vm1", "--json"]);
    list["points"].as_array().map_or(0, |p| p.len())
}

/// A raw image on ext4 (no reflink) is read directly in place under QEMU's image locks that
/// Bulwark takes itself: no copy (nothing of the disk's size written beside the image), the
/// restore is bit for bit; while a QEMU process holds the image open for writing, the backup
/// fails with an error naming the image and the lock, and commits nothing.
#[test]
fn offline_raw_on_ext4_is_read_in_place_under_qemus_locks() {
    let Some(s) = Setup::new("offline_raw_on_ext4_is_read_in_place_under_qemus_locks") else {
        return;
    };
    let raw = s.fs.path().join("data.img");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    // 40 MiB of data: a copy of it would show on the datastore (Setup::backup allows 4 MiB).
    io_ok("raw", &raw, "write -P 0x71 4M 40M");
    let disks = [("data", raw.as_path())];

    let full = s.backup(&disks);
    assert_eq!(disk(&full, "data")["snapshot"], "in-place", "{full}");
    assert!(disk(&full, "data")["bytes_read"].as_u64().unwrap() >= 40 * MIB);
    s.assert_restores(&full, "data", &raw, "raw");
    io_ok("raw", &raw, "write -P 0x72 20M 4k");
    let incr = s.backup(&disks);
    assert!(reason(&incr, "data").contains("raw image"), "{incr}");
    s.assert_restores(&incr, "data", &raw, "raw");

    let holder = s.hold_for_writing(&raw, "raw");
    let used = used_bytes(s.fs.path());
    s.assert_refused_once("data", &raw);
    assert!(used_bytes(s.fs.path()) < used + MIB, "bytes were written");
    drop(holder);
    // The writer gone, the image backs up again.
    let after = s.backup(&disks);
    s.assert_restores(&after, "data", &raw, "raw");
}
