//! The `bulwark-agent` Debian package as a real service in a real Debian guest (issue 16, item 2):
//! one guest for the whole file, booted under TCG from the image of `tests/guest/debian.sh`
//! (minbase bookworm/trixie with systemd as PID 1, cached under `target/guest/debian-KEY`), on
//! a qcow2 overlay of its own, with an ext4 `data` disk (the point-in-time writer's slot files)
//! and a `payload` disk carrying the `.deb` that `packaging/build-debs.sh --profile dev --only
//! agent` builds.
//!
//! 1. `dpkg -i` the package: the unit is enabled and not started (there is no configuration yet);
//!    with `/etc/bulwark/agent.toml` (virtio-serial port `org.bulwark.agent.0`, freezing
//!    `/mnt/data`) and the data disk in fstab, the guest reboots (`systemctl reboot`): systemd
//!    starts the agent, which listens on the port and answers a hello from the host.
//! 2. `bulwark-controller backup --qmp ... --agent virtio-serial:unix:SOCK --min-consistency
//!    file_system` reaches `file_system`; the restored data disk is fsck-clean and holds one
//!    instant of the writer.
//! 3. While the guest is frozen (deadline 5 s), each of these leaves it thawed within the
//!    deadline + 1 s, measured by the writer's longest stall:
//!    * `systemctl stop bulwark-agent` (SIGTERM: the agent thaws);
//!    * `systemctl kill -s KILL bulwark-agent` (the agent *and* its guardian: systemd restarts
//!      the agent, `Restart=on-failure`, which thaws from the frozen-state file it finds in the
//!      preserved `RuntimeDirectory`);
//!    * `systemctl kill --kill-whom=main -s KILL bulwark-agent` (the agent only: the guardian
//!      thaws at once, and says so in the journal);
//!    * `systemctl stop` with the stop signal made SIGKILL (a drop-in `KillSignal=SIGKILL`, as
//!      when the stop times out on a hung agent): with the shipped `KillMode=process` systemd
//!      leaves the guardian alone, and it thaws.
//! 4. `apt-get purge bulwark-agent`: no bulwark-agent process is left, the unit is gone.
//!
//! Boot time (first boot and reboot) and, when it was built in this run, the image build time
//! are printed. Root only (mmdebstrap, QEMU); skips otherwise, fails instead under
//! `BULWARK_REQUIRE_ROOT_TESTS=1`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bulwark_protocol::{Client, connect_virtio_serial};
use bulwark_tests::guest::{
    DiskFormat, GUEST_TOOLS, Guest, GuestSpec, WriterSpec, WriterTarget, build_debian_guest,
    create_overlay, create_payload_disk, create_slot_fs_disk, last_generation, stalls,
    verify_point,
};
use bulwark_tests::{
    agent_bin, controller_bin, controller_json, root_or_skip, shell_cargo_env, stdout_of,
};

const AGENT_PORT: &str = "org.bulwark.agent.0";
const SLOTS: u32 = 64;
const DATA_SIZE: u64 = 64 << 20;
/// The freeze deadline of the kill checks.
const DEADLINE_MS: u64 = 5000;

const AGENT_TOML: &str = "listen = \"virtio-serial:org.bulwark.agent.0\"\n\
state_dir = \"/run/bulwark-agent\"\n\n[freeze]\nmounts = [\"/mnt/data\"]\nmax_timeout_ms = 60000\n";

fn writer_spec() -> WriterSpec {
    WriterSpec {
        targets: vec![WriterTarget::Ext4Files {
            disk: "data".into(),
            slots: SLOTS,
        }],
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Builds the agent's package (debug binary) into `out`; returns its path.
fn build_agent_deb(out: &Path) -> PathBuf {
    let _ = (controller_bin(), agent_bin());
    // As from a shell: the test's CARGO_* variables would make its cargo build rebuild ring and
    // everything above it (see shell_cargo_env).
    let o = shell_cargo_env(&mut Command::new("bash"))
        .arg(root().join("packaging/build-debs.sh"))
        .args(["--profile", "dev", "--only", "agent", "--out"])
        .arg(out)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "build-debs.sh failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    stdout_of(&o)
        .lines()
        .map(PathBuf::from)
        .find(|p| {
            p.file_name()
                .is_some_and(|f| f.to_string_lossy().starts_with("bulwark-agent_"))
        })
        .expect("build-debs.sh printed no bulwark-agent package")
}

/// Waits until the agent unit is active and has said it listens (in its journal since `since`,
/// a count of earlier "listening on" lines).
fn wait_listening(guest: &mut Guest, since: usize) {
    let t = Instant::now();
    loop {
        let (_, out) = guest.sh(
            "systemctl is-active bulwark-agent; journalctl -u bulwark-agent -o cat --no-pager | grep -c 'listening on virtio-serial:org.bulwark.agent.0'",
        );
        let mut lines = out.lines();
        let active = lines.next().unwrap_or_default() == "active";
        let n: usize = lines.next().unwrap_or("0").trim().parse().unwrap_or(0);
        if active && n > since {
            return;
        }
        if t.elapsed() > Duration::from_secs(120) {
            let (_, st) = guest.sh(
                "systemctl status bulwark-agent --no-pager; journalctl -u bulwark-agent -o cat --no-pager | tail -30",
            );
            panic!("the agent is not listening 120 s after its start:\n{out}\n{st}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn listening_count(guest: &mut Guest) -> usize {
    let (_, out) = guest.sh(
        "journalctl -u bulwark-agent -o cat --no-pager | grep -c 'listening on virtio-serial:org.bulwark.agent.0'",
    );
    out.trim().parse().unwrap_or(0)
}

async fn client(socket: &Path) -> Client<tokio::net::UnixStream> {
    let mut c = Client::new(connect_virtio_serial(socket).await.unwrap());
    c.set_reply_timeout(Some(Duration::from_secs(60)));
    let hello = c.hello("debian-guest-test", "0", &[]).await.unwrap();
    assert_eq!(hello.agent.hostname, "debian-guest");
    c
}

/// Freezes `/mnt/data` through the agent (deadline [`DEADLINE_MS`]), runs `action` in the guest
/// while frozen, then waits for the writer's next generation (at most the deadline + 2.5 s after
/// the freeze). Returns how long the guest was frozen (the writer's longest new stall),
/// panicking when the writer is still blocked.
fn frozen_then(
    rt: &tokio::runtime::Runtime,
    guest: &mut Guest,
    socket: &Path,
    what: &str,
    action: &str,
) -> u64 {
    let before = stalls(&guest.writer_log()).len();
    let t = Instant::now();
    rt.block_on(async {
        let mut c = client(socket).await;
        let frozen = c.freeze(Duration::from_millis(DEADLINE_MS)).await.unwrap();
        assert_eq!(frozen.mounts, ["/mnt/data"]);
        // The connection stays open while the action runs: its end is not what thaws.
        guest.sh_ok(action);
        drop(c);
    });
    let acted = t.elapsed();
    // Polled, not a fixed wait to the deadline: once the writer completes a generation after
    // the action, the guest is thawed and the write that the freeze blocked has logged its
    // stall. Bounded by the deadline + 2.5 s after the freeze (the old fixed wait's end).
    let g0 = last_generation(&guest.writer_log());
    let log = loop {
        let log = guest.writer_log();
        let g1 = last_generation(&log);
        if g1 > g0 {
            break log;
        }
        assert!(
            t.elapsed() < Duration::from_millis(DEADLINE_MS + 2500),
            "{what}: the writer made no progress ({g0} -> {g1}): the guest is still frozen \
             {:?} after the freeze (deadline {DEADLINE_MS} ms)",
            t.elapsed()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    // A thaw quicker than the writer's 100 ms stall threshold logs no stall.
    let window = stalls(&log)[before..].iter().copied().max().unwrap_or(0);
    eprintln!("{what}: the guest was frozen {window} ms (action done after {acted:.1?})");
    assert!(
        window <= DEADLINE_MS + 1000,
        "{what}: the guest stayed frozen {window} ms (deadline {DEADLINE_MS} ms)"
    );
    window
}

fn journal(guest: &mut Guest) -> String {
    guest.sh("journalctl -u bulwark-agent -o cat --no-pager").1
}

#[test]
fn agent_package_as_a_service_in_a_debian_guest() {
    if !root_or_skip(
        "debian_guest",
        &[GUEST_TOOLS, &["mmdebstrap", "dpkg-deb", "cargo-deb"]].concat(),
    ) {
        return;
    }
    let image = build_debian_guest();
    if image.build_time > Duration::ZERO {
        eprintln!("Debian guest image built in {:.1?}", image.build_time);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let t = tmp.path();

    // Disks: an overlay of the cached root, the writer's data disk, the payload.
    let overlay = t.join("root.qcow2");
    create_overlay(&overlay, &image.root);
    let spec = writer_spec();
    let data = t.join("data.raw");
    create_slot_fs_disk(
        &data,
        DiskFormat::Raw,
        DATA_SIZE,
        SLOTS,
        spec.index_of("data"),
    );
    let payload_dir = t.join("payload");
    std::fs::create_dir_all(&payload_dir).unwrap();
    let deb = build_agent_deb(&t.join("debs"));
    std::fs::copy(&deb, payload_dir.join("bulwark-agent.deb")).unwrap();
    std::fs::copy(
        env!("CARGO_BIN_EXE_bulwark-guest-writer"),
        payload_dir.join("bulwark-guest-writer"),
    )
    .unwrap();
    std::fs::write(payload_dir.join("agent.toml"), AGENT_TOML).unwrap();
    let payload = t.join("payload.raw");
    create_payload_disk(&payload_dir, &payload, 64 << 20);
    std::fs::remove_dir_all(&payload_dir).unwrap();

    let mut guest = Guest::boot(
        &GuestSpec {
            memory_mib: 512,
            boot_timeout: Duration::from_secs(300),
            system: Some(image.system.clone()),
            ..GuestSpec::default()
        }
        .disk("root", &overlay, DiskFormat::Qcow2)
        .disk("data", &data, DiskFormat::Raw)
        .disk("payload", &payload, DiskFormat::Raw)
        .port(AGENT_PORT),
    );
    eprintln!(
        "Debian guest booted (QEMU start to the command channel's ready marker) in {:.1?}, QEMU \
         CPU time {:?}",
        guest.boot_time(),
        guest.boot_cpu_time()
    );
    let pid1 = guest.sh_ok("readlink /proc/1/exe; . /etc/os-release; echo $PRETTY_NAME");
    assert!(pid1.contains("/systemd"), "PID 1 is not systemd: {pid1}");
    eprintln!("guest: {}", pid1.replace('\n', " "));

    // ---- 1. install, enable, reboot: the agent is listening ---------------------------------
    let installed = guest.sh_ok(
        "set -e; mkdir -p /mnt/payload; mount -o ro /dev/disk/by-id/virtio-payload /mnt/payload; \
         cp /mnt/payload/bulwark-guest-writer /usr/bin/; \
         dpkg -i /mnt/payload/bulwark-agent.deb >/dev/null; \
         echo enabled=$(systemctl is-enabled bulwark-agent); \
         echo active=$(systemctl is-active bulwark-agent || true)",
    );
    assert!(
        installed.contains("enabled=enabled"),
        "the package did not enable its unit: {installed}"
    );
    assert!(
        installed.contains("active=inactive"),
        "the package started its unit without a configuration: {installed}"
    );
    guest.sh_ok(
        "set -e; install -m 0600 /mnt/payload/agent.toml /etc/bulwark/agent.toml; \
         umount /mnt/payload; mkdir -p /mnt/data; \
         echo '/dev/disk/by-id/virtio-data /mnt/data ext4 defaults 0 2' >> /etc/fstab; sync",
    );
    let reboot = guest.reboot(Duration::from_secs(300));
    eprintln!("reboot (systemctl reboot to the ready marker): {reboot:.1?}");
    wait_listening(&mut guest, 0);
    let (_, mounted) = guest.sh("grep ' /mnt/data ' /proc/mounts");
    assert!(
        mounted.contains("ext4"),
        "/mnt/data is not mounted: {mounted}"
    );
    let socket = guest.port_socket(AGENT_PORT);
    rt.block_on(async {
        let mut c = client(&socket).await;
        c.ping().await.unwrap();
    });
    guest.start_writer(&spec);

    // ---- 2. a backup through it reaches file_system -----------------------------------------
    let vault = t.join("vault");
    let run_dir = t.join("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    let qmp = format!("unix:{}", guest.qmp_socket().display());
    let agent = format!("virtio-serial:unix:{}", socket.display());
    let started = Instant::now();
    let report = controller_json([
        "backup",
        "--vault",
        vault.to_str().unwrap(),
        "--vm",
        "debian",
        "--qmp",
        &qmp,
        "--disk",
        "data",
        "--runtime-dir",
        run_dir.to_str().unwrap(),
        "--agent",
        &agent,
        "--consistency",
        "file_system",
        "--min-consistency",
        "file_system",
        "--json",
    ]);
    eprintln!("backup through the agent in {:.1?}", started.elapsed());
    assert_eq!(report["consistency"], "file_system", "{report:#}");
    let point = report["point"].as_str().unwrap().to_string();
    let restored = t.join("data.restored.raw");
    let out = bulwark_tests::controller([
        "restore",
        "--vault",
        vault.to_str().unwrap(),
        "--vm",
        "debian",
        "--point",
        &point,
        "--disk",
        "data",
        "--to",
        restored.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "restore: {}",
        bulwark_tests::stderr_of(&out)
    );
    let check = tempfile::tempdir_in(t).unwrap();
    let cut = verify_point(
        &spec,
        &HashMap::from([("data".to_string(), (restored.clone(), DiskFormat::Raw))]),
        check.path(),
    )
    .unwrap_or_else(|e| panic!("the file_system point {point} is not one clean instant: {e}"));
    eprintln!("point {point}: file_system, restored data disk fsck-clean at cut {cut:?}");
    std::fs::remove_file(&restored).unwrap();

    // ---- 3. stop and kill while frozen ------------------------------------------------------
    frozen_then(
        &rt,
        &mut guest,
        &socket,
        "systemctl stop",
        "systemctl stop bulwark-agent",
    );
    let n = listening_count(&mut guest);
    guest.sh_ok("systemctl start bulwark-agent");
    wait_listening(&mut guest, n);

    let n = listening_count(&mut guest);
    frozen_then(
        &rt,
        &mut guest,
        &socket,
        "systemctl kill -s KILL (agent and guardian)",
        "systemctl kill -s KILL bulwark-agent",
    );
    wait_listening(&mut guest, n);
    let j = journal(&mut guest);
    assert!(
        j.contains("found the frozen state of a previous agent"),
        "the restarted agent did not find the frozen state:\n{j}"
    );

    let n = listening_count(&mut guest);
    frozen_then(
        &rt,
        &mut guest,
        &socket,
        "systemctl kill --kill-whom=main -s KILL (agent only)",
        "systemctl kill --kill-whom=main -s KILL bulwark-agent",
    );
    wait_listening(&mut guest, n);
    let j = journal(&mut guest);
    assert!(
        j.contains("bulwark freeze guardian") && j.contains("thawed /mnt/data"),
        "the guardian did not report its thaw:\n{j}"
    );

    // A stop whose signal is SIGKILL (what a stop that times out on a hung agent ends with):
    // KillMode=process spares the guardian, which thaws.
    guest.sh_ok(
        "mkdir -p /run/systemd/system/bulwark-agent.service.d && \
         printf '[Service]\\nKillSignal=SIGKILL\\n' > /run/systemd/system/bulwark-agent.service.d/kill.conf && \
         systemctl daemon-reload",
    );
    let guardian_lines = journal(&mut guest).matches("thawed /mnt/data").count();
    frozen_then(
        &rt,
        &mut guest,
        &socket,
        "systemctl stop with KillSignal=SIGKILL",
        "systemctl stop bulwark-agent",
    );
    let j = journal(&mut guest);
    assert!(
        j.matches("thawed /mnt/data").count() > guardian_lines,
        "the guardian did not thaw after the SIGKILL stop:\n{j}"
    );
    let n = listening_count(&mut guest);
    guest.sh_ok(
        "rm -r /run/systemd/system/bulwark-agent.service.d && systemctl daemon-reload && \
         systemctl start bulwark-agent",
    );
    wait_listening(&mut guest, n);

    let summary = guest.writer_stop();
    eprintln!("writer: {summary:?}");

    // ---- 4. purge: nothing left running -----------------------------------------------------
    let purged = guest.sh_ok(
        "apt-get purge -y -q bulwark-agent >/dev/null 2>&1 || dpkg -P bulwark-agent; \
         for p in /proc/[0-9]*; do readlink $p/exe 2>/dev/null; done | grep -c bulwark-agent || true; \
         systemctl cat bulwark-agent >/dev/null 2>&1 && echo unit-present || echo unit-gone; \
         dpkg-query -W -f='${db:Status-Abbrev}' bulwark-agent 2>/dev/null || echo not-installed",
    );
    let mut lines = purged.lines();
    let left: u32 = lines.next().unwrap_or("?").trim().parse().unwrap();
    assert_eq!(
        left, 0,
        "bulwark-agent processes left after the purge: {purged}"
    );
    assert_eq!(lines.next(), Some("unit-gone"), "{purged}");
    let status = lines.next().unwrap_or_default();
    assert!(
        status.starts_with("un") || status.contains("not-installed"),
        "the package is still installed: {purged}"
    );

    guest.shutdown();
    drop(guest);
}
