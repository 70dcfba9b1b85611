//! Quiesced backups of a running VM through the real CLI and the daemon (issues 11 and 12), on
//! ONE real TCG guest for the whole file: `os` = qcow2 holding ext4 with the point-in-time
//! writer's slot files, `data` = raw with block slots, both on a loop-mounted ext4 host
//! directory; the writer runs throughout. In order:
//!
//! 1. `bulwark-agent` in the guest on the virtio-serial port `org.bulwark.agent.0`:
//!    `backup --qmp unix:QMP --agent virtio-serial:unix:SOCK` gives a `file_system` point with
//!    a freeze window, the agent recorded (kind, address); the restored `os` has no journal
//!    recovery pending (`needs_recovery` clear: the freeze flushed the journal) and passes
//!    `e2fsck -fn` as it is, and both disks hold one instant of the writer;
//! 2. the agent stopped: the same command commits a `crash` point whose reason says the agent
//!    at that address was unreachable;
//! 3. only qemu-ga in the guest: `--agent qga:unix:SOCK` gives a `file_system` point (which
//!    needs the controller's QGA watchdog process: `main` dispatches it), the agent recorded as
//!    qemu-ga with its version; `os` has no journal recovery pending and passes `e2fsck -fn`;
//! 4. a freeze held past `--freeze-timeout-ms` (the hidden snapshot-delay hook): the watchdog
//!    process thaws the guest (the writer stalls at most deadline + 1 s), and the point is
//!    `crash` with that reason;
//! 5. qemu-ga stopped: a `crash` point whose reason says it was unreachable;
//! 6. the daemon (`serve --run-now`) with `qmp = "unix:QMP"` and the virtio-serial agent in its
//!    configuration: the job completes at `file_system`, and its point's `os` has no journal
//!    recovery pending and passes `e2fsck -fn`.
//!
//! Root only (loop mount); about 1.5 minutes here once built (2 cores, TCG).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bulwark_tests::guest::{
    DiskFormat, GUEST_TOOLS, Guest, GuestSpec, WriterSpec, create_os_and_data_disks, image_fs,
    last_generation, qemu_ga_binary, stalls, start_guest_agent, stop_guest_agent, stripped,
    verify_point,
};
use bulwark_tests::{
    TestEnv, agent_bin, controller, controller_bin, controller_json, root_or_skip,
};
use serde_json::Value;

const VM: &str = "vm1";
const SLOTS: u32 = 64;
const DISK_SIZE: u64 = 64 << 20;
const AGENT_PORT: &str = "org.bulwark.agent.0";
const QGA_PORT: &str = "org.qemu.guest_agent.0";

fn writer_spec() -> WriterSpec {
    WriterSpec::os_files_and_data_blocks(SLOTS)
}

fn target_tmpdir() -> &'static Path {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
}

/// The writer makes progress within `within` (the guest is not frozen).
fn writer_progresses(guest: &mut Guest, within: Duration) -> bool {
    let g0 = last_generation(&guest.writer_log());
    let t = Instant::now();
    while t.elapsed() < within {
        std::thread::sleep(Duration::from_millis(250));
        if last_generation(&guest.writer_log()) > g0 {
            return true;
        }
    }
    false
}

struct Env {
    env: TestEnv,
    qmp: String,
    run: PathBuf,
}

impl Env {
    /// `backup --qmp QMP --agent AGENT EXTRA... --json`, asserting success.
    fn backup(&self, agent: &str, extra: &[&str]) -> Value {
        let run = self.run.display().to_string();
        let mut args = vec![
            "backup",
            "--vault",
            &self.env.vault,
            "--vm",
            VM,
            "--qmp",
            &self.qmp,
            "--agent",
            agent,
            "--runtime-dir",
            &run,
            "--json",
        ];
        args.extend(extra);
        let t = Instant::now();
        let report = controller_json(&args);
        eprintln!(
            "backup --agent {agent} {extra:?}: {} in {:.1?}: consistency {} {}, freeze window {} ms",
            report["point"],
            t.elapsed(),
            report["consistency"],
            report["consistency_reasons"],
            report["freeze_window_ms"]
        );
        report
    }

    /// The committed point `id` as `list --json` shows it.
    fn point(&self, id: &str) -> Value {
        let list = controller_json(["list", "--vault", &self.env.vault, "--vm", VM, "--json"]);
        list["points"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("no point {id} in {list}"))
    }

    /// Restores both disks of `point`: the raw `os` must pass `e2fsck -fn` as it is (a frozen
    /// file system needs no journal recovery), and both disks must hold one instant of the
    /// writer.
    fn check_file_system_point(&self, point: &str, spec: &WriterSpec) {
        let mut images = HashMap::new();
        for disk in ["os", "data"] {
            let to = self.env.path(&format!("{point}-{disk}.raw"));
            let out = self.env.restore(VM, point, disk, &to, &[]);
            assert!(
                out.status.success(),
                "restore {point} {disk}: {}",
                bulwark_tests::stderr_of(&out)
            );
            images.insert(disk.to_string(), (to, DiskFormat::Raw));
        }
        let os = &images["os"].0;
        // A frozen ext4 has its journal flushed and `needs_recovery` cleared (ext4_freeze); a
        // snapshot of a mounted, unfrozen one always has it set.
        let dump = Command::new("dumpe2fs").arg("-h").arg(os).output().unwrap();
        let header = String::from_utf8_lossy(&dump.stdout);
        let features = header
            .lines()
            .find(|l| l.starts_with("Filesystem features:"))
            .unwrap_or_else(|| panic!("point {point}: no features in dumpe2fs -h:\n{header}"));
        assert!(
            !features.contains("needs_recovery"),
            "point {point}: the restored os disk has journal recovery pending (not frozen): {features}"
        );
        let fsck = Command::new("e2fsck").arg("-fn").arg(os).output().unwrap();
        assert!(
            fsck.status.success(),
            "point {point}: the restored os disk is not clean as it is (e2fsck -fn, {}):\n{}{}",
            fsck.status,
            String::from_utf8_lossy(&fsck.stdout),
            String::from_utf8_lossy(&fsck.stderr)
        );
        let scratch = tempfile::tempdir_in(&self.env.root).unwrap();
        let cut = verify_point(spec, &images, scratch.path())
            .unwrap_or_else(|e| panic!("point {point} is not one instant: {e}"));
        eprintln!(
            "point {point}: no journal recovery pending, e2fsck -fn clean, one instant (cut {})",
            cut.cut
        );
        for (to, _) in images.values() {
            let _ = std::fs::remove_file(to);
        }
    }
}

fn assert_level(report: &Value, level: &str) {
    assert_eq!(report["consistency"], level, "{report}");
}

fn reasons(report: &Value) -> String {
    report["consistency_reasons"].to_string()
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        // Only our own child, by pid.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn jobs(state: &Path) -> Vec<Value> {
    let out = controller(["jobs", "--state-dir", state.to_str().unwrap(), "--json"]);
    if !out.status.success() {
        return Vec::new();
    }
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v["jobs"].as_array().cloned().unwrap_or_default()
}

#[test]
fn quiesced_backups_of_a_running_vm_through_its_guest_agents() {
    if !root_or_skip("guest_quiesce", GUEST_TOOLS) {
        return;
    }
    let started = Instant::now();
    let tmp = tempfile::tempdir_in(target_tmpdir()).unwrap();
    let fs = image_fs(tmp.path(), 512 << 20);
    let spec = writer_spec();
    let (os, data) = create_os_and_data_disks(fs.path(), &spec, DISK_SIZE, DISK_SIZE);

    let mut guest = Guest::boot(
        &GuestSpec {
            memory_mib: 384,
            ..GuestSpec::default()
        }
        .disk("os", &os, DiskFormat::Qcow2)
        .disk("data", &data, DiskFormat::Raw)
        .port(AGENT_PORT)
        .port(QGA_PORT)
        .binary(
            &stripped(&agent_bin(), target_tmpdir()),
            "/bin/bulwark-agent",
        )
        .binary(&qemu_ga_binary(target_tmpdir()), "/bin/qemu-ga")
        .with_writer(Path::new(env!("CARGO_BIN_EXE_bulwark-guest-writer"))),
    );
    eprintln!("guest booted in {:.1?}", guest.boot_time());
    guest.start_writer(&spec);
    let run = tempfile::tempdir_in(tmp.path()).unwrap();
    let e = Env {
        env: TestEnv::init(&["--block-size", "64KiB"]),
        qmp: format!("unix:{}", guest.qmp_socket().display()),
        run: run.path().to_path_buf(),
    };
    let virtio = format!(
        "virtio-serial:unix:{}",
        guest.port_socket(AGENT_PORT).display()
    );
    let qga = format!("qga:unix:{}", guest.port_socket(QGA_PORT).display());

    // ---- 1. bulwark-agent over virtio-serial: file_system ---------------------------------
    start_guest_agent(
        &mut guest,
        &format!(
            "listen = \"virtio-serial:{AGENT_PORT}\"\nstate_dir = \"/run/bulwark-agent\"\n\
             hostname = \"guest-under-test\"\n\n[freeze]\nmounts = [\"/mnt/os\"]\n"
        ),
    );
    let r = e.backup(&virtio, &[]);
    assert_level(&r, "file_system");
    assert_eq!(r["consistency_reasons"], serde_json::json!([]), "{r}");
    assert!(r["freeze_window_ms"].is_u64(), "{r}");
    let point = r["point"].as_str().unwrap();
    let p = e.point(point);
    assert_eq!(p["agent"]["kind"], "bulwark-agent", "{p}");
    assert_eq!(p["agent"]["hostname"], "guest-under-test", "{p}");
    assert_eq!(p["agent"]["address"], virtio.as_str(), "{p}");
    e.check_file_system_point(point, &spec);

    // ---- 2. the agent stopped: crash, with the reason --------------------------------------
    stop_guest_agent(&mut guest);
    let r = e.backup(&virtio, &[]);
    assert_level(&r, "crash");
    assert_eq!(r["consistency_wanted"], "file_system", "{r}");
    let why = reasons(&r);
    assert!(
        why.contains("agent unreachable") && why.contains(&virtio),
        "the reason does not name the unreachable agent: {why}"
    );
    assert!(r["freeze_window_ms"].is_null(), "{r}");

    // ---- 3. only qemu-ga: file_system --------------------------------------------------------
    guest.sh_ok(&format!(
        "mkdir -p /run/qga && (setsid /bin/qemu-ga -m virtio-serial -p /dev/virtio-ports/{QGA_PORT} \
         -t /run/qga </dev/null >/run/qga/out 2>&1 & echo $! > /run/qga.pid)"
    ));
    let r = e.backup(&qga, &[]);
    assert_level(&r, "file_system");
    assert!(r["freeze_window_ms"].is_u64(), "{r}");
    let point = r["point"].as_str().unwrap();
    let p = e.point(point);
    assert_eq!(p["agent"]["kind"], "qemu-ga", "{p}");
    assert!(
        p["agent"]["agent_version"]
            .as_str()
            .is_some_and(|v| v.starts_with(char::is_numeric)),
        "{p}"
    );
    assert_eq!(p["agent"]["address"], qga.as_str(), "{p}");
    e.check_file_system_point(point, &spec);
    assert!(
        writer_progresses(&mut guest, Duration::from_secs(5)),
        "the guest is still frozen after the qga backup"
    );

    // ---- 4. frozen past the deadline: the watchdog process thaws, the point is crash -------
    let stalls_before = stalls(&guest.writer_log()).len();
    let r = e.backup(
        &qga,
        &[
            "--freeze-timeout-ms",
            "1500",
            "--test-snapshot-delay-ms",
            "4000",
        ],
    );
    assert_level(&r, "crash");
    let why = reasons(&r);
    assert!(
        why.contains("QGA watchdog thawed the guest at the 1500 ms freeze deadline"),
        "{why}"
    );
    assert!(
        writer_progresses(&mut guest, Duration::from_secs(5)),
        "the guest is still frozen after the watchdog's deadline"
    );
    // The controller held its "snapshot" 4 s; the guest was frozen at most deadline + 1 s.
    let frozen = stalls(&guest.writer_log())[stalls_before..]
        .iter()
        .copied()
        .max()
        .unwrap_or(0);
    eprintln!("freeze held past its 1500 ms deadline: the guest's writer stalled {frozen} ms");
    assert!(frozen <= 2500, "the guest stayed frozen {frozen} ms");

    // ---- 5. qemu-ga stopped: crash, with the reason ----------------------------------------
    guest.sh_ok(
        "p=$(cat /run/qga.pid); [ -n \"$p\" ] && kill -TERM $p && i=0 && while kill -0 $p 2>/dev/null; do \
         i=$((i+1)); [ $i -lt 300 ] || exit 1; usleep 100000; done",
    );
    let r = e.backup(&qga, &[]);
    assert_level(&r, "crash");
    let why = reasons(&r);
    assert!(
        why.contains("agent unreachable") && why.contains(&qga),
        "the reason does not name the unreachable qemu-ga: {why}"
    );

    // ---- 6. the daemon with qmp = and the virtio-serial agent ------------------------------
    start_guest_agent(
        &mut guest,
        &format!(
            "listen = \"virtio-serial:{AGENT_PORT}\"\nstate_dir = \"/run/bulwark-agent\"\n\
             hostname = \"guest-under-test\"\n\n[freeze]\nmounts = [\"/mnt/os\"]\n"
        ),
    );
    let state = e.env.path("state");
    let config = e.env.path("controller.toml");
    std::fs::write(
        &config,
        format!(
            r#"vault = "{vault}"
state_dir = "{state}"
runtime_dir = "{run}"
prune = false
gc_interval_hours = 0

[[vm]]
name = "{VM}"
qmp = "{qmp}"
agent = "{virtio}"
schedule_override_seconds = 86400
policy = {{ time_zone = "UTC", schedule = {{ frequency = "daily", times = ["02:00"] }}, retention = {{ daily = 7 }}, consistency = {{ wanted = "file_system", minimum = "file_system" }} }}
"#,
            vault = e.env.vault,
            state = state.display(),
            run = e.run.display(),
            qmp = e.qmp,
        ),
    )
    .unwrap();
    let log_path = e.env.path("serve.log");
    let daemon = Daemon(
        Command::new(controller_bin())
            .args(["serve", "--run-now", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap(),
    );
    let t = Instant::now();
    let job = loop {
        if let Some(j) = jobs(&state)
            .into_iter()
            .find(|j| j["state"] != "InProgress" && j["state"] != "Pending")
        {
            break j;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "no finished job in 120 s: {:?}\n{}",
            jobs(&state),
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    drop(daemon);
    eprintln!("daemon job: {job}");
    assert_eq!(
        job["state"],
        "Completed",
        "{job}\n{}",
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );
    assert_eq!(job["consistency"], "file_system", "{job}");
    let point = job["point"].as_str().unwrap();
    let p = e.point(point);
    assert_eq!(p["agent"]["address"], virtio.as_str(), "{p}");
    assert!(p["consistency"]["freeze_window_ms"].is_u64(), "{p}");
    e.check_file_system_point(point, &spec);
    stop_guest_agent(&mut guest);

    let summary = guest.writer_stop();
    eprintln!("writer: {summary:?}");
    guest.shutdown();
    drop(guest);
    drop(fs);
    eprintln!("guest_quiesce took {:.1?}", started.elapsed());
}
