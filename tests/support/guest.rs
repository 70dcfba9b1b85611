//! Real test guests: QEMU under TCG booting Debian's kernel with the initramfs that
//! `tests/guest/build.sh` makes, a command channel into the guest, the point-in-time writer and
//! its checker.
//!
//! * [`build_guest`] runs the builder (once per set of added binaries and process; the script
//!   itself caches under `target/guest/`).
//! * [`Guest::boot`] starts `qemu-system-x86_64` (TCG, `-nodefaults`, serial console to a log
//!   file, `-pidfile`, a QMP Unix socket at [`Guest::qmp_socket`]), one virtio-blk disk per
//!   [`Disk`] (`-drive id=NAME,...,if=none` + `-device virtio-blk-pci,drive=NAME,serial=NAME`, so
//!   `query-block` names it NAME and the guest sees it as `/dev/disk/by-serial/NAME`), optional
//!   extra virtio-serial ports (host side: a Unix socket, [`Guest::port_socket`]) and optional
//!   user networking with TCP ports forwarded to 127.0.0.1 ([`Guest::forwarded_port`]). It waits
//!   for the guest's ready marker. [`Guest::sh`] runs a shell command in the guest over the
//!   virtio-serial port `org.bulwark.cmd.0`. Dropping a `Guest` kills its QEMU by pid (only the
//!   process it started; QEMU also gets SIGKILL if the test process dies).
//! * [`WriterSpec`] describes the point-in-time writer's targets; [`Guest::start_writer`],
//!   [`Guest::writer_pause`], [`Guest::writer_resume`], [`Guest::writer_stop`] and
//!   [`Guest::writer_log`] drive it; [`verify_point`] checks restored images: every slot of every
//!   disk must hold the newest generation not after one cut, and ext4 disks must pass `e2fsck`
//!   after their journal replays.
//! * [`create_disk`] and [`create_slot_fs_disk`] make qcow2/raw disks (put them on an ext4
//!   [`crate::LoopFs`], see [`image_fs`]).

pub mod slots;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fmt;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use slots::{Layout, SLOT_SIZE, SlotState};

use crate::{FsType, LoopFs, run};

/// The tools a real-guest test needs on the PATH (for [`crate::root_or_skip`]).
pub const GUEST_TOOLS: &[&str] = &[
    "qemu-system-x86_64",
    "qemu-img",
    "busybox",
    "mkfs.ext4",
    "e2fsck",
    "debugfs",
    "losetup",
];

/// Where the guest mounts an ext4 disk NAME.
pub fn guest_mountpoint(disk: &str) -> String {
    format!("/mnt/{disk}")
}

/// The directory of slot files on an ext4 disk (relative to its root).
pub const SLOT_DIR: &str = "bulwark-slots";

/// Path of the guest writer inside the guest.
pub const WRITER_GUEST_PATH: &str = "/bin/bulwark-guest-writer";

/// The writer's control directory inside the guest.
pub const WRITER_CONTROL: &str = "/run/bulwark-writer";

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Builds (or finds in the cache) the guest kernel and initramfs with `binaries` added
/// (`(host path, guest path)`, each with its shared libraries). Returns the directory holding
/// `vmlinuz` and `initrd.gz`. Panics with the builder's output when it fails.
pub fn build_guest(binaries: &[(PathBuf, String)]) -> PathBuf {
    type Built = HashMap<Vec<(PathBuf, String)>, PathBuf>;
    static BUILT: OnceLock<Mutex<Built>> = OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(dir) = built.get(binaries) {
        return dir.clone();
    }
    let mut cmd = Command::new("bash");
    cmd.arg(workspace_root().join("tests/guest/build.sh"));
    for (host, guest) in binaries {
        cmd.arg("--add").arg(format!("{}:{guest}", host.display()));
    }
    let out = cmd.output().expect("run tests/guest/build.sh");
    assert!(
        out.status.success(),
        "tests/guest/build.sh failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .trim(),
    );
    assert!(
        dir.join("vmlinuz").is_file() && dir.join("initrd.gz").is_file(),
        "tests/guest/build.sh gave no kernel and initramfs in {}",
        dir.display()
    );
    built.insert(binaries.to_vec(), dir.clone());
    dir
}

/// Debian's qemu-ga, unpacked (not installed) under `<target>/guest/qga` like the guest
/// kernel; `target_tmpdir` is the test's `CARGO_TARGET_TMPDIR`.
pub fn qemu_ga_binary(target_tmpdir: &Path) -> PathBuf {
    let dir = target_tmpdir
        .parent()
        .unwrap_or(target_tmpdir)
        .join("guest/qga");
    let bin = dir.join("x/usr/sbin/qemu-ga");
    if bin.is_file() {
        return bin;
    }
    std::fs::create_dir_all(&dir).expect("create the qemu-ga directory");
    let out = Command::new("sh")
        .arg("-c")
        .arg("rm -rf x ./*.deb && apt-get download qemu-guest-agent && dpkg -x qemu-guest-agent_*.deb x && rm -f ./*.deb")
        .current_dir(&dir)
        .output()
        .expect("run apt-get download");
    assert!(
        bin.is_file(),
        "could not fetch Debian's qemu-guest-agent into {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    bin
}

/// A copy of `bin` without debug info under `<target>/guest/stripped` (a debug build is
/// ~90 MB: too much for the initramfs).
pub fn stripped(bin: &Path, target_tmpdir: &Path) -> PathBuf {
    let dir = target_tmpdir
        .parent()
        .unwrap_or(target_tmpdir)
        .join("guest/stripped");
    std::fs::create_dir_all(&dir).expect("create the stripped directory");
    let out = dir.join(bin.file_name().unwrap_or_default());
    let st = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&out)
        .arg(bin)
        .status()
        .expect("run strip");
    assert!(st.success(), "strip {}", bin.display());
    out
}

/// Where [`start_guest_agent`] writes the agent's configuration in the guest.
pub const GUEST_AGENT_CONFIG: &str = "/etc/bulwark-agent/agent.toml";

/// Starts `/bin/bulwark-agent` in the guest with configuration `config` and waits (30 s at
/// most) until it says it is listening. Its pid goes to `/run/agent.pid`.
pub fn start_guest_agent(guest: &mut Guest, config: &str) {
    guest.sh_ok(&format!(
        "mkdir -p /etc/bulwark-agent && printf '%s' '{config}' > {GUEST_AGENT_CONFIG} && chmod 600 {GUEST_AGENT_CONFIG} && \
         rm -f /run/agent.out && (BULWARK_LOG=debug setsid /bin/bulwark-agent --config {GUEST_AGENT_CONFIG} \
         >/run/agent.out 2>>/run/agent.err </dev/null & echo $! > /run/agent.pid)"
    ));
    for _ in 0..300 {
        let (_, out) = guest.sh("cat /run/agent.out 2>/dev/null");
        if out.contains("listening on") {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, err) = guest.sh("cat /run/agent.err");
    panic!("the agent did not start in the guest: {err}");
}

/// Stops the agent [`start_guest_agent`] started (SIGTERM, waits 30 s at most).
pub fn stop_guest_agent(guest: &mut Guest) {
    guest.sh_ok(
        "p=$(cat /run/agent.pid); kill -TERM $p; i=0; while kill -0 $p 2>/dev/null; do \
         i=$((i+1)); [ $i -lt 300 ] || exit 1; { usleep 100000 2>/dev/null || sleep 0.1; }; done",
    );
}

/// Image format of a guest disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DiskFormat {
    /// qcow2.
    Qcow2,
    /// Raw.
    Raw,
}

impl DiskFormat {
    /// The name QEMU uses (`format=`).
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }
}

/// One virtio disk of a guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// Drive id: the block device name `query-block` reports, and the serial the guest sees.
    pub name: String,
    /// Image file on the host.
    pub path: PathBuf,
    /// Its format.
    pub format: DiskFormat,
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    /// The disks, in PCI order.
    pub disks: Vec<Disk>,
    /// Extra virtio-serial port names (e.g. `org.bulwark.agent.0`, `org.qemu.guest_agent.0`).
    pub ports: Vec<String>,
    /// Guest TCP ports to forward from 127.0.0.1 (turns on user networking).
    pub forwards: Vec<u16>,
    /// Host binaries to put in the initramfs: `(host path, guest path)`.
    pub binaries: Vec<(PathBuf, String)>,
    /// Guest memory.
    pub memory_mib: u32,
    /// How long to wait for the ready marker.
    pub boot_timeout: Duration,
    /// Boot this kernel and initramfs (e.g. [`build_debian_guest`]'s, which mount the disk whose
    /// serial is `root` and run systemd from it) instead of the busybox guest; `binaries` are
    /// then ignored, and a reboot in the guest restarts it in the same QEMU ([`Guest::reboot`]).
    pub system: Option<SystemImage>,
    /// Empty PCIe root ports for disks added while the guest runs ([`Guest::hot_add_disk`]).
    pub hotplug_slots: u32,
}

/// The kernel and initramfs of a guest that boots from a root disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemImage {
    /// The kernel (`vmlinux`, booted through PVH, or `vmlinuz`).
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
}

/// The Debian guest of `tests/guest/debian.sh`: a raw ext4 root image (minbase, systemd, udev,
/// e2fsprogs; use it as the read-only backing file of an overlay) and how to boot it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebianImage {
    /// The root file system image (raw ext4, shared: never boot it directly).
    pub root: PathBuf,
    /// Kernel and initramfs.
    pub system: SystemImage,
    /// How long building it took (zero when it came from the cache).
    pub build_time: Duration,
}

/// Builds (or finds in the cache, `target/guest/debian-KEY`) the Debian guest image with
/// `tests/guest/debian.sh` (root and mmdebstrap needed). Panics with the builder's output when it
/// fails.
pub fn build_debian_guest() -> DebianImage {
    let started = Instant::now();
    let out = Command::new("bash")
        .arg(workspace_root().join("tests/guest/debian.sh"))
        .output()
        .expect("run tests/guest/debian.sh");
    assert!(
        out.status.success(),
        "tests/guest/debian.sh failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let built = String::from_utf8_lossy(&out.stderr).contains("debian.sh: built ");
    let dir = PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .trim(),
    );
    let kernel = ["vmlinux", "vmlinuz"]
        .iter()
        .map(|k| dir.join(k))
        .find(|k| k.is_file())
        .unwrap_or_else(|| panic!("no kernel in {}", dir.display()));
    assert!(
        dir.join("root.img").is_file() && dir.join("initrd.gz").is_file(),
        "tests/guest/debian.sh gave no root.img and initrd.gz in {}",
        dir.display()
    );
    DebianImage {
        root: dir.join("root.img"),
        system: SystemImage {
            kernel,
            initrd: dir.join("initrd.gz"),
        },
        build_time: if built {
            started.elapsed()
        } else {
            Duration::ZERO
        },
    }
}

impl Default for GuestSpec {
    fn default() -> Self {
        GuestSpec {
            disks: Vec::new(),
            ports: Vec::new(),
            forwards: Vec::new(),
            binaries: Vec::new(),
            memory_mib: 256,
            boot_timeout: Duration::from_secs(90),
            system: None,
            hotplug_slots: 0,
        }
    }
}

impl GuestSpec {
    /// Adds a disk.
    pub fn disk(mut self, name: &str, path: &Path, format: DiskFormat) -> Self {
        self.disks.push(Disk {
            name: name.to_string(),
            path: path.to_path_buf(),
            format,
        });
        self
    }
    /// Adds a virtio-serial port.
    pub fn port(mut self, name: &str) -> Self {
        self.ports.push(name.to_string());
        self
    }
    /// Forwards a guest TCP port from 127.0.0.1 (and turns on user networking).
    pub fn forward(mut self, guest_port: u16) -> Self {
        self.forwards.push(guest_port);
        self
    }
    /// Adds a host binary (with its libraries) at `guest_path`.
    pub fn binary(mut self, host: &Path, guest_path: &str) -> Self {
        self.binaries
            .push((host.to_path_buf(), guest_path.to_string()));
        self
    }
    /// Adds the point-in-time writer (pass `env!("CARGO_BIN_EXE_bulwark-guest-writer")`).
    pub fn with_writer(self, writer_bin: &Path) -> Self {
        self.binary(writer_bin, WRITER_GUEST_PATH)
    }
}

/// The exit status of QEMU, set by the thread that waits for it.
type Exit = Arc<(Mutex<Option<ExitStatus>>, Condvar)>;

/// A running guest. Dropping it kills its QEMU (by the pid it started) and removes its files.
pub struct Guest {
    dir: tempfile::TempDir,
    pid: i32,
    exit: Exit,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
    boot_time: Duration,
    boot_cpu: Option<Duration>,
    forwards: HashMap<u16, u16>,
    ports: Vec<String>,
    disks: Vec<Disk>,
    hotplug_slots: u32,
    hot_added: usize,
    writer_spec: Option<WriterSpec>,
}

impl fmt::Debug for Guest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guest")
            .field("pid", &self.pid)
            .field("dir", &self.dir.path())
            .field("disks", &self.disks)
            .finish()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("find a free port on 127.0.0.1")
}

impl Guest {
    /// Boots a guest and waits for its ready marker. Panics (with the serial console log) when it
    /// does not come up within `spec.boot_timeout`.
    pub fn boot(spec: &GuestSpec) -> Guest {
        let (kernel, initrd) = match &spec.system {
            Some(system) => (system.kernel.clone(), system.initrd.clone()),
            None => {
                let image = build_guest(&spec.binaries);
                // The uncompressed kernel boots through PVH, about twice as fast under TCG.
                let kernel = if image.join("vmlinux").is_file() {
                    image.join("vmlinux")
                } else {
                    image.join("vmlinuz")
                };
                (kernel, image.join("initrd.gz"))
            }
        };
        let dir = tempfile::Builder::new()
            .prefix("bw-guest")
            .tempdir()
            .expect("guest runtime dir");
        let d = dir.path();
        let mut args: Vec<String> = vec![
            "-machine".into(),
            "q35".into(),
            "-accel".into(),
            "tcg".into(),
            "-m".into(),
            spec.memory_mib.to_string(),
            "-smp".into(),
            "1".into(),
            "-nodefaults".into(),
            "-display".into(),
            "none".into(),
            "-kernel".into(),
            kernel.display().to_string(),
            "-initrd".into(),
            initrd.display().to_string(),
            "-append".into(),
            "console=ttyS0 panic=-1 quiet".into(),
            "-serial".into(),
            format!("file:{}", d.join("serial.log").display()),
            "-pidfile".into(),
            d.join("qemu.pid").display().to_string(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", d.join("qmp.sock").display()),
        ];
        if spec.system.is_none() {
            // The busybox guest's reboot is a power-off (its tests expect QEMU to exit).
            args.push("-no-reboot".into());
        }
        for disk in &spec.disks {
            args.push("-drive".into());
            args.push(format!(
                "id={},file={},format={},if=none",
                disk.name,
                disk.path.display(),
                disk.format.as_str()
            ));
            args.push("-device".into());
            args.push(format!(
                "virtio-blk-pci,drive={0},serial={0},id=dev-{0}",
                disk.name
            ));
        }
        for i in 0..spec.hotplug_slots {
            args.push("-device".into());
            args.push(format!(
                "pcie-root-port,id=hp{i},bus=pcie.0,chassis={}",
                i + 1
            ));
        }
        args.extend(["-device".into(), "virtio-serial-pci,id=vser0".into()]);
        let mut ports = vec!["org.bulwark.cmd.0".to_string()];
        ports.extend(spec.ports.iter().cloned());
        for (i, name) in ports.iter().enumerate() {
            args.push("-chardev".into());
            args.push(format!(
                "socket,id=port{i},path={},server=on,wait=off",
                d.join(format!("{name}.sock")).display()
            ));
            args.push("-device".into());
            args.push(format!(
                "virtserialport,bus=vser0.0,chardev=port{i},name={name}"
            ));
        }
        let mut forwards = HashMap::new();
        if !spec.forwards.is_empty() {
            let mut netdev = "user,id=net0".to_string();
            for &gp in &spec.forwards {
                let hp = free_port();
                netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{hp}-:{gp}"));
                forwards.insert(gp, hp);
            }
            args.extend([
                "-netdev".into(),
                netdev,
                "-device".into(),
                "virtio-net-pci,netdev=net0".into(),
            ]);
        }
        std::fs::write(d.join("qemu.args"), args.join("\n")).expect("write qemu.args");

        let started = Instant::now();
        let (pid, exit) = spawn_qemu(&args, &d.join("qemu.err"));
        let guest_fail = |why: String| -> ! {
            let serial = std::fs::read_to_string(d.join("serial.log")).unwrap_or_default();
            let err = std::fs::read_to_string(d.join("qemu.err")).unwrap_or_default();
            kill_and_reap(pid, &exit);
            panic!(
                "guest boot failed: {why}\nqemu stderr:\n{err}\nserial console:\n{}",
                tail(&serial, 60)
            );
        };
        // Connect to the command channel at once (QEMU listens before the guest runs), so that
        // the guest's side of the port sees the host connected.
        let cmd_sock = d.join("org.bulwark.cmd.0.sock");
        let stream = loop {
            if let Ok(s) = UnixStream::connect(&cmd_sock) {
                break s;
            }
            if exited(&exit) {
                guest_fail("QEMU exited before opening its sockets".into());
            }
            if started.elapsed() > Duration::from_secs(30) {
                guest_fail(format!("no socket at {}", cmd_sock.display()));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        loop {
            let serial = std::fs::read_to_string(d.join("serial.log")).unwrap_or_default();
            if serial.contains("BULWARK-GUEST-READY") {
                break;
            }
            if exited(&exit) {
                guest_fail("QEMU exited before the guest was ready".into());
            }
            if started.elapsed() > spec.boot_timeout {
                guest_fail(format!("no ready marker after {:?}", spec.boot_timeout));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let boot_time = started.elapsed();
        let boot_cpu = process_cpu_time(pid);
        let writer = stream.try_clone().expect("clone command socket");
        let mut guest = Guest {
            dir,
            pid,
            exit,
            reader: BufReader::new(stream),
            writer,
            next_id: 0,
            boot_time,
            boot_cpu,
            forwards,
            ports: spec.ports.clone(),
            disks: spec.disks.clone(),
            hotplug_slots: spec.hotplug_slots,
            hot_added: 0,
            writer_spec: None,
        };
        let (st, out) = guest.sh("echo channel-ok");
        assert!(
            st == 0 && out.trim() == "channel-ok",
            "command channel does not answer: {st} {out:?}"
        );
        guest
    }

    /// Wall-clock time from starting QEMU to the ready marker.
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    /// CPU time QEMU used from its start to the ready marker (user + system): the boot's cost
    /// independent of how loaded the machine is. None when /proc cannot tell.
    pub fn boot_cpu_time(&self) -> Option<Duration> {
        self.boot_cpu
    }

    /// QEMU's pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// QEMU's `-pidfile`.
    pub fn pidfile(&self) -> PathBuf {
        self.dir.path().join("qemu.pid")
    }

    /// QEMU's QMP Unix socket (no client is connected; it is free for the test to use).
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.path().join("qmp.sock")
    }

    /// The host Unix socket of the extra virtio-serial port `name`.
    pub fn port_socket(&self, name: &str) -> PathBuf {
        assert!(
            self.ports.iter().any(|p| p == name),
            "guest has no virtio-serial port {name}"
        );
        self.dir.path().join(format!("{name}.sock"))
    }

    /// The 127.0.0.1 port that forwards to `guest_port`.
    pub fn forwarded_port(&self, guest_port: u16) -> u16 {
        *self
            .forwards
            .get(&guest_port)
            .unwrap_or_else(|| panic!("guest port {guest_port} is not forwarded"))
    }

    /// The guest's disks.
    pub fn disks(&self) -> &[Disk] {
        &self.disks
    }

    /// Plugs the image `path` into the running guest as a new virtio disk `name` (serial `name`,
    /// so `/dev/disk/by-id/virtio-NAME` under udev), in the next free root port of
    /// [`GuestSpec::hotplug_slots`]: QMP `blockdev-add` and `device_add` on [`Guest::qmp_socket`]
    /// (which must be free: no backup running). The disk stays plugged until the guest stops.
    pub fn hot_add_disk(&mut self, name: &str, path: &Path, format: DiskFormat) {
        let used = self.hot_added;
        assert!(
            (used as u32) < self.hotplug_slots,
            "no free hotplug slot for disk {name} ({} slots)",
            self.hotplug_slots
        );
        let mut qmp = QmpSession::connect(&self.qmp_socket());
        qmp.execute(
            "blockdev-add",
            serde_json::json!({
                "driver": format.as_str(),
                "node-name": name,
                "file": {"driver": "file", "filename": path.display().to_string()},
            }),
        );
        qmp.execute(
            "device_add",
            serde_json::json!({
                "driver": "virtio-blk-pci",
                "id": format!("dev-{name}"),
                "drive": name,
                "serial": name,
                "bus": format!("hp{used}"),
            }),
        );
        self.hot_added += 1;
        self.disks.push(Disk {
            name: name.to_string(),
            path: path.to_path_buf(),
            format,
        });
    }

    /// The serial console so far.
    pub fn serial_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serial.log")).unwrap_or_default()
    }

    /// True while QEMU runs.
    pub fn is_running(&self) -> bool {
        !exited(&self.exit)
    }

    /// Runs `cmd` with the guest's `/bin/sh`; returns its exit status and standard output.
    /// Panics (with the console log) when the guest does not answer within 5 minutes.
    pub fn sh(&mut self, cmd: &str) -> (i32, String) {
        let r = self.sh_full(cmd, Duration::from_secs(300));
        (r.status, r.stdout)
    }

    /// Runs `cmd` and panics unless it exits 0; returns its standard output.
    pub fn sh_ok(&mut self, cmd: &str) -> String {
        let r = self.sh_full(cmd, Duration::from_secs(300));
        assert!(
            r.status == 0,
            "guest command failed ({}): {cmd}\nstdout: {}\nstderr: {}",
            r.status,
            r.stdout,
            r.stderr
        );
        r.stdout
    }

    /// Runs `cmd` with a timeout; returns status, stdout and stderr.
    pub fn sh_full(&mut self, cmd: &str, timeout: Duration) -> ShOutput {
        self.next_id += 1;
        let id = self.next_id;
        let line = format!("{id} {}\n", base64_encode(cmd.as_bytes()));
        if let Err(e) = self.writer.write_all(line.as_bytes()) {
            panic!("send to guest: {e}\n{}", tail(&self.serial_log(), 30));
        }
        let deadline = Instant::now() + timeout;
        let prefix = format!("BWRESULT {id} ");
        // Kept across read timeouts: `read_line` appends what it read before timing out, and a
        // slow guest (TCG on a loaded host) can take seconds between the writes of one reply
        // line. Dropping those bytes lost the reply's start, and the reply with it.
        let mut buf = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!(
                    "guest did not answer {cmd:?} within {timeout:?}\n{}",
                    tail(&self.serial_log(), 30)
                );
            }
            let _ = self
                .reader
                .get_ref()
                .set_read_timeout(Some(left.min(Duration::from_secs(1))));
            match self.reader.read_line(&mut buf) {
                Ok(0) => panic!(
                    "guest command channel closed during {cmd:?}\n{}",
                    tail(&self.serial_log(), 30)
                ),
                Ok(_) => {
                    if !buf.ends_with('\n') {
                        continue;
                    }
                    let whole = std::mem::take(&mut buf);
                    // The reply may follow the cut-off start of an older one (a reply the guest's
                    // reboot interrupted): look for ours anywhere in the line.
                    let line = whole.trim_end_matches('\n');
                    let Some(at) = line.rfind(&prefix) else {
                        continue;
                    };
                    let rest = &line[at + prefix.len()..];
                    let mut parts = rest.splitn(3, ' ');
                    let status = parts.next().and_then(|s| s.parse().ok()).unwrap_or(-1);
                    let stdout = parts.next().unwrap_or("");
                    let stderr = parts.next().unwrap_or("");
                    return ShOutput {
                        status,
                        stdout: String::from_utf8_lossy(&base64_decode(stdout)).into_owned(),
                        stderr: String::from_utf8_lossy(&base64_decode(stderr)).into_owned(),
                    };
                }
                Err(e) if is_timeout(&e) => {
                    if exited(&self.exit) {
                        panic!(
                            "QEMU exited during {cmd:?}\n{}",
                            tail(&self.serial_log(), 30)
                        );
                    }
                }
                Err(e) => panic!("read from guest: {e}"),
            }
        }
    }

    /// Mounts the ext4 disk `name` at [`guest_mountpoint`] (a no-op when mounted).
    pub fn mount_ext4(&mut self, name: &str) {
        let mp = guest_mountpoint(name);
        self.sh_ok(&format!(
            "grep -q ' {mp} ' /proc/mounts || {{ mkdir -p {mp} && mount -t ext4 /dev/disk/by-serial/{name} {mp}; }}"
        ));
    }

    /// Starts the point-in-time writer in the background (mounting its ext4 disks first) and
    /// waits until it has checked the slots and begun. Returns the generation it starts after.
    pub fn start_writer(&mut self, spec: &WriterSpec) -> u64 {
        for t in &spec.targets {
            if let WriterTarget::Ext4Files { disk, .. } = t {
                self.mount_ext4(disk);
            }
        }
        let args: Vec<String> = spec.targets.iter().map(WriterTarget::guest_arg).collect();
        self.sh_ok(&format!(
            "rm -f {c}/log {c}/pause {c}/stop {c}/stopped; mkdir -p {c}; \
             setsid {WRITER_GUEST_PATH} --control {c} {} >{c}/out 2>&1 </dev/null &",
            args.join(" "),
            c = WRITER_CONTROL
        ));
        self.writer_spec = Some(spec.clone());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let log = self.writer_log();
            if let Some(WriterEvent::Start { generation, .. }) = log.first() {
                return *generation;
            }
            let (_, out) = self.sh(&format!("cat {WRITER_CONTROL}/out"));
            assert!(
                Instant::now() < deadline && out.trim().is_empty(),
                "the writer did not start: {out}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Pauses the writer between two writes; returns the last generation it completed.
    pub fn writer_pause(&mut self) -> u64 {
        let out = self.sh_ok(&format!(
            "touch {c}/pause; i=0; while [ ! -e {c}/paused ]; do \
               i=$((i+1)); [ $i -lt 3000 ] || exit 1; {{ usleep 10000 2>/dev/null || sleep 0.01; }}; done; cat {c}/paused",
            c = WRITER_CONTROL
        ));
        out.trim().parse().expect("paused generation")
    }

    /// Resumes a paused writer.
    pub fn writer_resume(&mut self) {
        self.sh_ok(&format!(
            "rm -f {c}/pause; while [ -e {c}/paused ]; do {{ usleep 10000 2>/dev/null || sleep 0.01; }}; done",
            c = WRITER_CONTROL
        ));
    }

    /// Stops the writer and returns its summary.
    pub fn writer_stop(&mut self) -> WriterSummary {
        self.sh_ok(&format!(
            "touch {c}/stop; i=0; while [ ! -e {c}/stopped ]; do \
               i=$((i+1)); [ $i -lt 3000 ] || {{ cat {c}/out; exit 1; }}; {{ usleep 10000 2>/dev/null || sleep 0.01; }}; done",
            c = WRITER_CONTROL
        ));
        self.writer_log()
            .into_iter()
            .rev()
            .find_map(|e| match e {
                WriterEvent::Summary(s) => Some(s),
                _ => None,
            })
            .expect("the writer's log has no summary")
    }

    /// The writer's log: progress (generation, guest time) every 100 ms, stalls, pauses.
    pub fn writer_log(&mut self) -> Vec<WriterEvent> {
        let (_, out) = self.sh(&format!("cat {WRITER_CONTROL}/log 2>/dev/null"));
        out.lines().filter_map(WriterEvent::parse).collect()
    }

    /// Reboots a guest booted with [`GuestSpec::system`] (`systemctl reboot` through the command
    /// channel) and waits for the ready marker of the new boot, at most `timeout`. Returns the
    /// time from the request to the marker. Panics (with the console log) when it does not come.
    pub fn reboot(&mut self, timeout: Duration) -> Duration {
        let marker = "BULWARK-GUEST-READY";
        let before = self.serial_log().matches(marker).count();
        let started = Instant::now();
        self.next_id += 1;
        // Not waited for: the command loop is stopped by the reboot (its reply, if any, is
        // skipped by the next command, which waits for its own id).
        let line = format!("{} {}\n", self.next_id, base64_encode(b"systemctl reboot"));
        self.writer
            .write_all(line.as_bytes())
            .expect("send the reboot to the guest");
        loop {
            if self.serial_log().matches(marker).count() > before {
                break;
            }
            assert!(
                !exited(&self.exit),
                "QEMU exited during the reboot\n{}",
                tail(&self.serial_log(), 60)
            );
            assert!(
                started.elapsed() < timeout,
                "no ready marker {timeout:?} after the reboot\n{}",
                tail(&self.serial_log(), 60)
            );
            std::thread::sleep(Duration::from_millis(25));
        }
        let took = started.elapsed();
        let (st, out) = self.sh("echo channel-ok");
        assert!(
            st == 0 && out.trim() == "channel-ok",
            "command channel does not answer after the reboot: {st} {out:?}"
        );
        took
    }

    /// Unmounts the guest's ext4 disks, syncs and powers the guest off; waits for QEMU to exit
    /// (killing it after 60 s).
    pub fn shutdown(&mut self) {
        if exited(&self.exit) {
            return;
        }
        self.sh_ok(
            "for m in $(awk '$2 ~ \"^/mnt/\" {print $2}' /proc/mounts); do umount $m || exit 1; done; sync",
        );
        self.next_id += 1;
        let line = format!("{} {}\n", self.next_id, base64_encode(b"poweroff"));
        let _ = self.writer.write_all(line.as_bytes());
        if !wait_exit(&self.exit, Duration::from_secs(60)) {
            eprintln!("guest did not power off in 60 s; killing QEMU {}", self.pid);
            kill_and_reap(self.pid, &self.exit);
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        kill_and_reap(self.pid, &self.exit);
    }
}

/// A minimal synchronous QMP session for the harness's own commands (the controller under test
/// has its own client): greeting, `qmp_capabilities`, then one command at a time; events are
/// skipped. Panics on any error: it only serves tests.
struct QmpSession {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl QmpSession {
    fn connect(socket: &Path) -> QmpSession {
        let stream = UnixStream::connect(socket)
            .unwrap_or_else(|e| panic!("connect to QMP {}: {e}", socket.display()));
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("QMP read timeout");
        let writer = stream.try_clone().expect("clone the QMP socket");
        let mut qmp = QmpSession {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read_message();
        assert!(greeting.get("QMP").is_some(), "no QMP greeting: {greeting}");
        qmp.execute("qmp_capabilities", serde_json::json!({}));
        qmp
    }

    fn read_message(&mut self) -> serde_json::Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read from QMP");
        assert!(n > 0, "QMP closed the connection");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP sent {line:?}: {e}"))
    }

    fn execute(&mut self, command: &str, arguments: serde_json::Value) -> serde_json::Value {
        let msg = serde_json::json!({"execute": command, "arguments": arguments});
        self.writer
            .write_all(format!("{msg}\n").as_bytes())
            .expect("write to QMP");
        loop {
            let reply = self.read_message();
            if reply.get("event").is_some() {
                continue;
            }
            if let Some(r) = reply.get("return") {
                return r.clone();
            }
            panic!("QMP {command} {arguments} failed: {reply}");
        }
    }
}

/// Output of a guest command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShOutput {
    /// Exit status.
    pub status: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// User + system CPU time of process `pid`, from /proc/PID/stat.
fn process_cpu_time(pid: i32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // /proc reports clock ticks of USER_HZ, which is 100 on x86-64 (a fixed ABI).
    Some(Duration::from_millis(ticks * 10))
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Starts QEMU from a thread that lives exactly as long as QEMU: it waits for (reaps) QEMU, and
/// QEMU gets SIGKILL when that thread ends, so a test process that dies never leaves it behind.
fn spawn_qemu(args: &[String], stderr: &Path) -> (i32, Exit) {
    let exit: Exit = Arc::new((Mutex::new(None), Condvar::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let args = args.to_vec();
    let stderr = std::fs::File::create(stderr).expect("create qemu.err");
    let exit2 = exit.clone();
    std::thread::spawn(move || {
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        // SAFETY: the closure runs in the child between fork and exec and only calls prctl
        // (async-signal-safe), touching no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                rustix::process::set_parent_process_death_signal(Some(
                    rustix::process::Signal::KILL,
                ))
                .map_err(std::io::Error::from)
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        let _ = tx.send(Ok(child.id() as i32));
        let status = child.wait();
        let (lock, cv) = &*exit2;
        let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
        *st = Some(status.unwrap_or_else(|_| ExitStatus::default()));
        cv.notify_all();
    });
    match rx.recv() {
        Ok(Ok(pid)) => (pid, exit),
        Ok(Err(e)) => panic!("cannot start qemu-system-x86_64: {e}"),
        Err(_) => panic!("the QEMU thread died"),
    }
}

fn exited(exit: &Exit) -> bool {
    exit.0.lock().unwrap_or_else(|e| e.into_inner()).is_some()
}

fn wait_exit(exit: &Exit, timeout: Duration) -> bool {
    let (lock, cv) = &**exit;
    let st = lock.lock().unwrap_or_else(|e| e.into_inner());
    let (st, _) = cv
        .wait_timeout_while(st, timeout, |s| s.is_none())
        .unwrap_or_else(|e| e.into_inner());
    st.is_some()
}

/// Kills our QEMU (by the pid we started; it is not reaped before its status is recorded, so the
/// pid cannot be someone else's) and waits for it.
fn kill_and_reap(pid: i32, exit: &Exit) {
    {
        let st = exit.0.lock().unwrap_or_else(|e| e.into_inner());
        if st.is_some() {
            return;
        }
        if let Some(p) = rustix::process::Pid::from_raw(pid) {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
        }
    }
    if !wait_exit(exit, Duration::from_secs(30)) {
        eprintln!("warning: QEMU {pid} did not exit after SIGKILL");
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard base64 (ignores padding and anything outside the alphabet).
pub fn base64_decode(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let Some(v) = B64.iter().position(|&x| x == c) else {
            continue;
        };
        acc = acc << 6 | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

// ---- the writer ---------------------------------------------------------------------------

/// One target of the writer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriterTarget {
    /// Slots on the raw block device of disk `disk`, from [`slots::BLOCK_BASE`].
    Block {
        /// Disk name.
        disk: String,
        /// Number of slots.
        slots: u32,
    },
    /// Slot files in [`SLOT_DIR`] of the ext4 file system on disk `disk` (see
    /// [`create_slot_fs_disk`]).
    Ext4Files {
        /// Disk name.
        disk: String,
        /// Number of slots.
        slots: u32,
    },
}

impl WriterTarget {
    /// Disk name.
    pub fn disk(&self) -> &str {
        match self {
            WriterTarget::Block { disk, .. } | WriterTarget::Ext4Files { disk, .. } => disk,
        }
    }
    /// Number of slots.
    pub fn slots(&self) -> u32 {
        match self {
            WriterTarget::Block { slots, .. } | WriterTarget::Ext4Files { slots, .. } => *slots,
        }
    }
    fn guest_arg(&self) -> String {
        match self {
            WriterTarget::Block { disk, slots } => {
                format!("block:/dev/disk/by-serial/{disk}:{slots}")
            }
            WriterTarget::Ext4Files { disk, slots } => {
                format!("dir:{}/{SLOT_DIR}:{slots}", guest_mountpoint(disk))
            }
        }
    }
}

/// The writer's targets, in write order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriterSpec {
    /// Targets, in order.
    pub targets: Vec<WriterTarget>,
}

impl WriterSpec {
    /// The slot layout (target names are the disk names).
    pub fn layout(&self) -> Layout {
        Layout::new(
            self.targets
                .iter()
                .map(|t| (t.disk().to_string(), t.slots())),
        )
    }
    /// The index of the target on disk `disk`.
    pub fn index_of(&self, disk: &str) -> usize {
        self.targets
            .iter()
            .position(|t| t.disk() == disk)
            .unwrap_or_else(|| panic!("the writer has no target on disk {disk}"))
    }
    /// The usual two targets: `slots` slot files on the ext4 disk `os`, then `slots` slots on
    /// the raw block device of disk `data` (make them with [`create_os_and_data_disks`]).
    pub fn os_files_and_data_blocks(slots: u32) -> WriterSpec {
        WriterSpec {
            targets: vec![
                WriterTarget::Ext4Files {
                    disk: "os".into(),
                    slots,
                },
                WriterTarget::Block {
                    disk: "data".into(),
                    slots,
                },
            ],
        }
    }
    /// Bytes a write of generation `g` dirties on the guest's disk (one slot).
    pub fn slot_bytes(&self) -> u64 {
        SLOT_SIZE as u64
    }
}

/// The writer's final line.
#[derive(Debug, Clone, PartialEq)]
pub struct WriterSummary {
    /// Last generation written.
    pub last_generation: u64,
    /// Writes in this run.
    pub writes: u64,
    /// Seconds it ran.
    pub secs: f64,
    /// Writes per second.
    pub rate: f64,
    /// Longest time between two completed writes (pauses excluded).
    pub max_gap_ms: u64,
}

/// One line of the writer's log. Times are the guest's clock, in ns since the Unix epoch.
#[derive(Debug, Clone, PartialEq)]
pub enum WriterEvent {
    /// Started after `generation` (the state it found).
    Start {
        /// Generation found.
        generation: u64,
        /// Guest time.
        t_ns: u128,
    },
    /// `generation` was complete at `t_ns` (every 100 ms).
    Progress {
        /// Generation.
        generation: u64,
        /// Guest time.
        t_ns: u128,
    },
    /// The write of `generation` completed `gap_ms` after the previous one.
    Stall {
        /// Generation.
        generation: u64,
        /// Gap.
        gap_ms: u64,
        /// Guest time.
        t_ns: u128,
    },
    /// Paused after `generation`.
    Paused {
        /// Generation.
        generation: u64,
        /// Guest time.
        t_ns: u128,
    },
    /// Resumed after `generation`.
    Resumed {
        /// Generation.
        generation: u64,
        /// Guest time.
        t_ns: u128,
    },
    /// Stopped.
    Summary(WriterSummary),
}

impl WriterEvent {
    /// Parses one log line.
    pub fn parse(line: &str) -> Option<WriterEvent> {
        let mut words = line.split_whitespace();
        let kind = words.next()?;
        let kv: HashMap<&str, &str> = line
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .collect();
        let num = |k: &str| kv.get(k).and_then(|v| v.parse::<u64>().ok());
        let t_ns = kv.get("t").and_then(|v| v.parse::<u128>().ok())?;
        Some(match kind {
            "start" => WriterEvent::Start {
                generation: num("gen")?,
                t_ns,
            },
            "stall" => WriterEvent::Stall {
                generation: num("gen")?,
                gap_ms: num("gap_ms")?,
                t_ns,
            },
            "paused" => WriterEvent::Paused {
                generation: num("gen")?,
                t_ns,
            },
            "resumed" => WriterEvent::Resumed {
                generation: num("gen")?,
                t_ns,
            },
            "summary" => WriterEvent::Summary(WriterSummary {
                last_generation: num("last_gen")?,
                writes: num("writes")?,
                secs: kv.get("secs")?.parse().ok()?,
                rate: kv.get("rate")?.parse().ok()?,
                max_gap_ms: num("max_gap_ms")?,
            }),
            _ if kind.starts_with("gen=") => WriterEvent::Progress {
                generation: num("gen")?,
                t_ns,
            },
            _ => return None,
        })
    }
}

/// The writer's stalls (gaps over its 100 ms threshold) in a log, in ms, oldest first.
pub fn stalls(log: &[WriterEvent]) -> Vec<u64> {
    log.iter()
        .filter_map(|e| match e {
            WriterEvent::Stall { gap_ms, .. } => Some(*gap_ms),
            _ => None,
        })
        .collect()
}

/// The newest generation a log reports complete (progress or stall lines; 0 without any).
pub fn last_generation(log: &[WriterEvent]) -> u64 {
    log.iter()
        .rev()
        .find_map(|e| match e {
            WriterEvent::Progress { generation, .. } | WriterEvent::Stall { generation, .. } => {
                Some(*generation)
            }
            _ => None,
        })
        .unwrap_or(0)
}

// ---- host-side disks and the checker ------------------------------------------------------

/// The disks of `spec` (a [`WriterSpec::os_files_and_data_blocks`]) in `dir`: `os.qcow2`, ext4
/// with the writer's generation-0 slot files ([`create_slot_fs_disk`]), and an empty
/// `data.raw`. Returns their paths (os, data).
pub fn create_os_and_data_disks(
    dir: &Path,
    spec: &WriterSpec,
    os_size: u64,
    data_size: u64,
) -> (PathBuf, PathBuf) {
    let os = dir.join("os.qcow2");
    let data = dir.join("data.raw");
    let index = spec.index_of("os");
    create_slot_fs_disk(
        &os,
        DiskFormat::Qcow2,
        os_size,
        spec.targets[index].slots(),
        index,
    );
    create_disk(&data, DiskFormat::Raw, data_size);
    (os, data)
}

/// A loop-mounted ext4 file system for guest images, at `<dir>/images` (root only). Dropping it
/// unmounts and detaches (see [`LoopFs`]); drop every [`Guest`] using it first.
pub fn image_fs(dir: &Path, size: u64) -> LoopFs {
    LoopFs::create(dir, "images", size, FsType::Ext4)
}

/// Creates an empty disk image (`qemu-img create`, sparse).
pub fn create_disk(path: &Path, format: DiskFormat, size: u64) {
    run(
        "qemu-img",
        [
            OsStr::new("create"),
            OsStr::new("-q"),
            OsStr::new("-f"),
            OsStr::new(format.as_str()),
            path.as_os_str(),
            OsStr::new(&size.to_string()),
        ],
    );
}

/// Creates a disk holding an ext4 file system (whole disk, no partition table) with
/// generation-0 slot files for writer target number `target_index` in [`SLOT_DIR`]
/// (`mkfs.ext4 -d`; for qcow2 through a raw scratch file next to `path`).
pub fn create_slot_fs_disk(
    path: &Path,
    format: DiskFormat,
    size: u64,
    slots_n: u32,
    target_index: usize,
) {
    let parent = path.parent().unwrap_or(Path::new("."));
    let staging = tempfile::tempdir_in(parent).expect("staging dir");
    let sd = staging.path().join(SLOT_DIR);
    std::fs::create_dir_all(&sd).expect("mkdir slots");
    let mut buf = vec![0u8; SLOT_SIZE];
    for i in 0..slots_n {
        slots::encode(&mut buf, 0, target_index as u32, i);
        std::fs::write(sd.join(slots::slot_file_name(i)), &buf).expect("write slot file");
    }
    let raw = match format {
        DiskFormat::Raw => path.to_path_buf(),
        DiskFormat::Qcow2 => staging.path().join("fs.raw"),
    };
    let f = std::fs::File::create(&raw).expect("create fs image");
    f.set_len(size).expect("size fs image");
    drop(f);
    let data_dir = staging.path().join("root");
    std::fs::create_dir_all(&data_dir).expect("mkdir root");
    std::fs::rename(&sd, data_dir.join(SLOT_DIR)).expect("move slots");
    run(
        "mkfs.ext4",
        [
            OsStr::new("-q"),
            OsStr::new("-F"),
            OsStr::new("-d"),
            data_dir.as_os_str(),
            raw.as_os_str(),
        ],
    );
    if format == DiskFormat::Qcow2 {
        run(
            "qemu-img",
            [
                OsStr::new("convert"),
                OsStr::new("-q"),
                OsStr::new("-f"),
                OsStr::new("raw"),
                OsStr::new("-O"),
                OsStr::new("qcow2"),
                raw.as_os_str(),
                path.as_os_str(),
            ],
        );
    }
}

/// Creates a qcow2 overlay at `overlay` whose backing file is the raw image `backing` (e.g.
/// [`DebianImage::root`], which a guest must never write).
pub fn create_overlay(overlay: &Path, backing: &Path) {
    run(
        "qemu-img",
        [
            OsStr::new("create"),
            OsStr::new("-q"),
            OsStr::new("-f"),
            OsStr::new("qcow2"),
            OsStr::new("-F"),
            OsStr::new("raw"),
            OsStr::new("-b"),
            backing.as_os_str(),
            overlay.as_os_str(),
        ],
    );
}

/// Creates a raw ext4 disk `image` holding the files of `dir` (`mkfs.ext4 -d`; the files' sizes
/// plus `headroom` bytes).
pub fn create_payload_disk(dir: &Path, image: &Path, headroom: u64) {
    let bytes: u64 = std::fs::read_dir(dir)
        .expect("read the payload directory")
        .map(|e| {
            e.and_then(|e| e.metadata())
                .expect("stat a payload file")
                .len()
        })
        .sum();
    let f = std::fs::File::create(image).expect("create the payload disk");
    f.set_len(bytes + headroom).expect("size the payload disk");
    drop(f);
    run(
        "mkfs.ext4",
        [
            OsStr::new("-q"),
            OsStr::new("-F"),
            OsStr::new("-d"),
            dir.as_os_str(),
            image.as_os_str(),
        ],
    );
}

/// Copies any image to a raw file (`qemu-img convert`), e.g. a qcow2 restore before checking.
pub fn convert_to_raw(image: &Path, format: DiskFormat, out: &Path) -> Result<(), String> {
    let o = Command::new("qemu-img")
        .args(["convert", "-q", "-f", format.as_str(), "-O", "raw"])
        .arg(image)
        .arg(out)
        .output()
        .map_err(|e| format!("run qemu-img: {e}"))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "qemu-img convert {} failed: {}",
            image.display(),
            String::from_utf8_lossy(&o.stderr)
        ))
    }
}

/// Reads the slots of block target `target_index` from a raw image.
pub fn read_block_slots(raw: &Path, target_index: usize, n: u32) -> Result<Vec<SlotState>, String> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(raw).map_err(|e| format!("open {}: {e}", raw.display()))?;
    let mut buf = vec![0u8; SLOT_SIZE];
    (0..n)
        .map(|s| {
            let off = slots::BLOCK_BASE + u64::from(s) * SLOT_SIZE as u64;
            f.read_exact_at(&mut buf, off)
                .map_err(|e| format!("read {} at {off}: {e}", raw.display()))?;
            Ok(slots::decode(&buf, target_index as u32, s))
        })
        .collect()
}

/// Replays the journal of the ext4 file system in raw image `raw` (modifying it), then runs
/// `e2fsck -fn`; Err with e2fsck's output unless it is clean.
pub fn fsck_after_replay(raw: &Path) -> Result<(), String> {
    let replay = Command::new("e2fsck")
        .args(["-E", "journal_only", "-p"])
        .arg(raw)
        .output()
        .map_err(|e| format!("run e2fsck: {e}"))?;
    // 0: nothing to do, 1: journal replayed ("errors corrected").
    if !matches!(replay.status.code(), Some(0 | 1)) {
        return Err(format!(
            "e2fsck journal replay of {} failed ({}): {}{}",
            raw.display(),
            replay.status,
            String::from_utf8_lossy(&replay.stdout),
            String::from_utf8_lossy(&replay.stderr)
        ));
    }
    let check = Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(raw)
        .output()
        .map_err(|e| format!("run e2fsck: {e}"))?;
    if check.status.success() {
        Ok(())
    } else {
        Err(format!(
            "e2fsck -fn {} is not clean after the journal replay ({}):\n{}{}",
            raw.display(),
            check.status,
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        ))
    }
}

/// Reads the slot files of ext4 target `target_index` from a raw ext4 image (with `debugfs`,
/// read-only, no mount; replay its journal first with [`fsck_after_replay`]).
pub fn read_ext4_slots(
    raw: &Path,
    target_index: usize,
    n: u32,
    scratch: &Path,
) -> Result<Vec<SlotState>, String> {
    let out = tempfile::tempdir_in(scratch).map_err(|e| format!("scratch dir: {e}"))?;
    let o = Command::new("debugfs")
        .arg("-R")
        .arg(format!("rdump /{SLOT_DIR} {}", out.path().display()))
        .arg(raw)
        .output()
        .map_err(|e| format!("run debugfs: {e}"))?;
    let dir = out.path().join(SLOT_DIR);
    if !dir.is_dir() {
        return Err(format!(
            "debugfs found no /{SLOT_DIR} in {}: {}",
            raw.display(),
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    (0..n)
        .map(|s| {
            let p = dir.join(slots::slot_file_name(s));
            let data = std::fs::read(&p).map_err(|e| {
                format!(
                    "{}: slot file {} unreadable: {e}",
                    raw.display(),
                    p.display()
                )
            })?;
            Ok(slots::decode(&data, target_index as u32, s))
        })
        .collect()
}

/// Checks that `images` (disk name → (image, format)) hold one point in time of the writer
/// described by `spec`: each image is copied to raw in `scratch`, ext4 disks get their journal
/// replayed and must pass `e2fsck -fn`, then every slot of every disk must hold the newest
/// generation not after one cut. Returns the cut.
pub fn verify_point(
    spec: &WriterSpec,
    images: &HashMap<String, (PathBuf, DiskFormat)>,
    scratch: &Path,
) -> Result<slots::Cut, String> {
    let mut observed = Vec::new();
    for (i, t) in spec.targets.iter().enumerate() {
        let (image, format) = images
            .get(t.disk())
            .ok_or_else(|| format!("no image given for disk {}", t.disk()))?;
        let raw = scratch.join(format!("{}.check.raw", t.disk()));
        convert_to_raw(image, *format, &raw)?;
        let states = match t {
            WriterTarget::Block { slots, .. } => read_block_slots(&raw, i, *slots),
            WriterTarget::Ext4Files { slots, .. } => {
                fsck_after_replay(&raw).and_then(|()| read_ext4_slots(&raw, i, *slots, scratch))
            }
        };
        let _ = std::fs::remove_file(&raw);
        observed.push(states.map_err(|e| format!("disk {}: {e}", t.disk()))?);
    }
    slots::check(&spec.layout(), &observed).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests;
