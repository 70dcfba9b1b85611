//! Test kit for Bulwark's cross-crate scenarios (`tests/*.rs`) and benchmarks.
//!
//! * [`root_or_skip`] gates tests that need root: they skip with a clear message when not root,
//!   and fail instead when `BULWARK_REQUIRE_ROOT_TESTS=1` (CI sets it). Every skip, for root or
//!   for a server, goes through [`skip`]: it fails under `BULWARK_REQUIRE_ROOT_TESTS=1` /
//!   `BULWARK_REQUIRE_SERVERS=1`, and appends `<test>: <reason>` to the file named by
//!   `BULWARK_SKIP_LOG`, which `tests/run.sh` sums up at the end of a run.
//! * [`LoopFs`] makes a file system of the test's own (ext4, XFS with reflink, btrfs) on a loop
//!   device under the test's temporary directory. Its `Drop` always thaws, unmounts and detaches,
//!   also when the test panics. Nothing here ever touches `/` or a mount it did not create.
//! * [`controller_bin`] and [`agent_bin`] give the paths of the built binaries (building them once
//!   per test process if needed), for tests that run the real programs.
//! * [`daemon`]: the real daemon (`serve`) as a child process killed in `Drop`, and a plain
//!   HTTP/1.1 client for its API; [`browser`]: headless Chromium driven through the DevTools
//!   protocol, collecting the page's errors (the web console's test).

use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

pub mod browser;
pub mod daemon;
pub mod guest;
/// The environment variable that turns a skipped root test into a failure.
pub const REQUIRE_ROOT_ENV: &str = "BULWARK_REQUIRE_ROOT_TESTS";
/// The environment variable that turns a test skipped for lack of a server into a failure.
pub const REQUIRE_SERVERS_ENV: &str = "BULWARK_REQUIRE_SERVERS";
/// The environment variable naming the file every skip is appended to (`tests/run.sh` sets it).
pub const SKIP_LOG_ENV: &str = "BULWARK_SKIP_LOG";

/// What a skipped test lacked: it decides which `BULWARK_REQUIRE_*` variable forbids the skip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// Root privileges or a system tool the root tests use (`BULWARK_REQUIRE_ROOT_TESTS`).
    Root,
    /// A test server or a tool the server tests use (`BULWARK_REQUIRE_SERVERS`).
    Servers,
}

fn env_is_one(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "1")
}

/// Skips (all or part of) `test` because `reason`: panics instead when the `BULWARK_REQUIRE_*`
/// variable for `needs` is `1`, so that CI cannot pass by skipping; otherwise prints
/// `SKIPPED <test>: <reason>` and appends `<test>: <reason>` to the `BULWARK_SKIP_LOG` file.
/// The caller returns (or leaves out the part) after it.
pub fn skip(test: &str, needs: Needs, reason: &str) {
    let var = match needs {
        Needs::Root => REQUIRE_ROOT_ENV,
        Needs::Servers => REQUIRE_SERVERS_ENV,
    };
    if env_is_one(var) {
        panic!("{test}: {reason}, and {var}=1 forbids skipping");
    }
    eprintln!("SKIPPED {test}: {reason}");
    if let Some(log) = std::env::var_os(SKIP_LOG_ENV).filter(|l| !l.is_empty()) {
        let line = format!("{test}: {}\n", reason.replace('\n', " "));
        // One write of one line in append mode: lines from parallel tests do not interleave.
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            eprintln!(
                "cannot append to the skip log {}: {e}",
                Path::new(&log).display()
            );
        }
    }
}

/// Returns true when the test may run as root, with every tool in `tools` on the PATH.
///
/// When not root (or a tool is missing) it prints why the test is skipped and returns false,
/// unless `BULWARK_REQUIRE_ROOT_TESTS=1`, in which case it panics so that CI cannot pass
/// by skipping.
pub fn root_or_skip(test: &str, tools: &[&str]) -> bool {
    let mut missing = Vec::new();
    if !rustix::process::geteuid().is_root() {
        missing.push("root privileges".to_string());
    }
    for tool in tools {
        if which(tool).is_none() {
            missing.push(format!("the `{tool}` command"));
        }
    }
    if missing.is_empty() {
        return true;
    }
    skip(test, Needs::Root, &format!("needs {}", missing.join(", ")));
    false
}

/// Finds an executable on the PATH (and in /sbin, /usr/sbin, where root's tools live).
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

/// Runs a command, panicking with its output when it fails.
pub fn run<I, S>(program: &str, args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let out = Command::new(program)
        .args(&args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {:?} failed ({}):\nstdout: {}\nstderr: {}",
        args,
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A file-system type that [`LoopFs`] can make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsType {
    /// ext4 (`mkfs.ext4`).
    Ext4,
    /// XFS with reflink enabled (`mkfs.xfs -m reflink=1`): the datastore for reflink snapshots.
    XfsReflink,
    /// btrfs (`mkfs.btrfs`), which also supports reflinks.
    Btrfs,
}

impl FsType {
    /// The mkfs command this type needs.
    pub fn mkfs(self) -> &'static str {
        match self {
            FsType::Ext4 => "mkfs.ext4",
            FsType::XfsReflink => "mkfs.xfs",
            FsType::Btrfs => "mkfs.btrfs",
        }
    }
}

/// Makes a file system of `fs` in the image file `image` (created sparse, `size` bytes).
pub fn make_fs_image(image: &Path, size: u64, fs: FsType) {
    let f = File::create(image).expect("create image file");
    f.set_len(size).expect("size image file");
    drop(f);
    let img = image.as_os_str();
    match fs {
        FsType::Ext4 => run("mkfs.ext4", [OsStr::new("-q"), OsStr::new("-F"), img]),
        FsType::XfsReflink => run(
            "mkfs.xfs",
            [
                OsStr::new("-q"),
                OsStr::new("-f"),
                OsStr::new("-m"),
                OsStr::new("reflink=1"),
                img,
            ],
        ),
        FsType::Btrfs => run("mkfs.btrfs", [OsStr::new("-q"), OsStr::new("-f"), img]),
    };
}

/// A file system on a loop device, mounted under a directory of the test's own.
///
/// Dropping it thaws the file system (in case a test froze it), unmounts it and detaches the
/// loop device, also while a panic unwinds.
#[derive(Debug)]
pub struct LoopFs {
    image: PathBuf,
    mountpoint: PathBuf,
    device: String,
    mounted: bool,
}

impl LoopFs {
    /// Makes an image of `size` bytes at `<dir>/<name>.img`, formats it as `fs` and mounts it at
    /// `<dir>/<name>`.
    pub fn create(dir: &Path, name: &str, size: u64, fs: FsType) -> LoopFs {
        let image = dir.join(format!("{name}.img"));
        make_fs_image(&image, size, fs);
        Self::mount_image(&image, &dir.join(name))
    }

    /// Mounts an existing file-system image at `mountpoint` (created if missing).
    pub fn mount_image(image: &Path, mountpoint: &Path) -> LoopFs {
        std::fs::create_dir_all(mountpoint).expect("create mountpoint");
        let out = run(
            "losetup",
            [
                OsStr::new("--find"),
                OsStr::new("--show"),
                image.as_os_str(),
            ],
        );
        let device = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let mut fs = LoopFs {
            image: image.to_path_buf(),
            mountpoint: mountpoint.to_path_buf(),
            device,
            mounted: false,
        };
        run("mount", [OsStr::new(&fs.device), mountpoint.as_os_str()]);
        fs.mounted = true;
        fs
    }

    /// Where the file system is mounted.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// The image file that holds the file system.
    pub fn image(&self) -> &Path {
        &self.image
    }

    /// The loop device.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Syncs, unmounts and detaches now (a second call, and the later drop, do nothing).
    pub fn unmount(&mut self) {
        if !self.mounted {
            return;
        }
        self.mounted = false;
        // Thaw first: unmounting a frozen file system blocks. Failure means "was not frozen".
        let _ = Command::new("fsfreeze")
            .arg("--unfreeze")
            .arg(&self.mountpoint)
            .output();
        let mut unmounted = false;
        for attempt in 0..50 {
            let ok = Command::new("umount")
                .arg(&self.mountpoint)
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                unmounted = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20 * (attempt + 1).min(10)));
        }
        if !unmounted {
            eprintln!(
                "warning: {} is busy; lazy unmount",
                self.mountpoint.display()
            );
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .output();
        }
        let _ = Command::new("losetup").arg("-d").arg(&self.device).output();
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// Writes `len` bytes of deterministic pseudo-random data (from `seed`) at `offset` of `path`.
pub fn write_random(path: &Path, offset: u64, len: usize, seed: u64) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .expect("open for write");
    f.seek(SeekFrom::Start(offset)).expect("seek");
    f.write_all(&pseudo_random(len, seed)).expect("write");
}

/// `len` bytes of deterministic pseudo-random data (xorshift), incompressible enough for tests.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// SHA-256 of a whole file (with `sha256sum`), to compare a restore with its source.
pub fn file_digest(path: &Path) -> String {
    let out = run("sha256sum", [path.as_os_str()]);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Reads a whole file.
pub fn read_all(path: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut v))
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    v
}

/// Bytes of `path` actually allocated on disk (st_blocks × 512): small for sparse files.
pub fn allocated_bytes(path: &Path) -> u64 {
    let st = rustix::fs::stat(path).expect("stat");
    st.st_blocks as u64 * 512
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The build's target directory (`CARGO_TARGET_DIR`, else `target/` of the workspace): where
/// tests keep artefacts worth looking at (e.g. the console's screenshots).
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        let dir = PathBuf::from(dir);
        return if dir.is_absolute() {
            dir
        } else {
            workspace_root().join(dir)
        };
    }
    workspace_root().join("target")
}

fn built_binaries() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // Build both binaries with the same profile the tests run under, once per process.
        // When `cargo test --workspace` already built them this is a quick no-op.
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let profile_dir = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().and_then(Path::parent).map(Path::to_path_buf))
            .unwrap_or_else(|| target_dir().join("debug"));
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace_root()).args([
            "build",
            "--quiet",
            "-p",
            "bulwark-controller-bin",
            "-p",
            "bulwark-agent-bin",
        ]);
        if release {
            cmd.arg("--release");
        }
        let status = shell_cargo_env(&mut cmd)
            .status()
            .expect("run cargo build for the binaries");
        assert!(status.success(), "building the bulwark binaries failed");
        profile_dir
    })
}

/// Removes from `cmd` the variables `cargo test` sets for the test process (CARGO_MANIFEST_DIR,
/// CARGO_PKG_*, ...), so that a `cargo build` it runs, directly or through a script such as
/// `packaging/build-debs.sh`, sees the environment of a shell. Passed on, they reach build
/// scripts that watch them (ring's watches CARGO_MANIFEST_DIR), so that build and the next one
/// from a shell or another test would each see a changed environment and rebuild ring, rustls,
/// reqwest and everything above them: minutes each time.
pub fn shell_cargo_env(cmd: &mut Command) -> &mut Command {
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key == "CARGO_MANIFEST_DIR"
            || key == "CARGO_MANIFEST_PATH"
            || key == "CARGO_CRATE_NAME"
            || key == "CARGO_PRIMARY_PACKAGE"
            || key == "CARGO_TARGET_TMPDIR"
            || key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_")
        {
            cmd.env_remove(key.as_ref());
        }
    }
    cmd
}

/// Path of the built `bulwark-controller` binary.
pub fn controller_bin() -> PathBuf {
    built_binaries().join("bulwark-controller")
}

/// Path of the built `bulwark-agent` binary.
pub fn agent_bin() -> PathBuf {
    built_binaries().join("bulwark-agent")
}

/// Runs `bulwark-controller` with `args` and returns its output, whatever the exit status.
pub fn controller<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Command::new(controller_bin())
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("run bulwark-controller")
}

/// Runs `bulwark-controller` with `args` (which should include `--json`), asserts success and
/// parses its standard output as JSON.
pub fn controller_json<I, S>(args: I) -> serde_json::Value
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let out = controller(&args);
    assert!(
        out.status.success(),
        "bulwark-controller {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bulwark-controller {args:?}: stdout is not JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// A long-running command of the test's own (e.g. `instant-restore`): its standard output is
/// read line by line into a channel ([`ChildLines::line`]), its standard error is echoed with a
/// prefix and kept ([`ChildLines::stderr`]). Dropping it kills the command (by its pid) and
/// reaps it, unless it already exited.
#[derive(Debug)]
pub struct ChildLines {
    child: Option<std::process::Child>,
    lines: std::sync::mpsc::Receiver<String>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl ChildLines {
    /// Starts `cmd` (its stdin null, stdout and stderr piped); `label` prefixes the echoed
    /// standard error lines.
    pub fn spawn(cmd: &mut Command, label: &str) -> ChildLines {
        use std::io::{BufRead, BufReader};
        use std::process::Stdio;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {label}: {e}"));
        let (stdout, stderr) = match (child.stdout.take(), child.stderr.take()) {
            (Some(o), Some(e)) => (o, e),
            _ => panic!("{label}: no pipes"),
        };
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let kept = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let kept2 = kept.clone();
        let label = label.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{label}: {line}");
                kept2
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push_str(&(line + "\n"));
            }
        });
        ChildLines {
            child: Some(child),
            lines,
            stderr: kept,
        }
    }

    /// The next line of standard output, waiting `timeout` at most (None: none came, or the
    /// command closed its output).
    pub fn line(&self, timeout: std::time::Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// Standard error so far.
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The command's pid (panics once it has been waited for).
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(|c| c.id())
            .expect("the command was waited for already")
    }

    /// Waits for the command to exit, polling every 100 ms; panics with its standard error
    /// when it still runs after `limit`.
    pub fn wait(&mut self, limit: std::time::Duration) -> std::process::ExitStatus {
        let start = std::time::Instant::now();
        let child = self
            .child
            .as_mut()
            .expect("the command was waited for already");
        loop {
            if let Some(status) = child.try_wait().expect("wait for the command") {
                self.child = None;
                return status;
            }
            assert!(
                start.elapsed() < limit,
                "the command did not exit within {limit:?}: {}",
                self.stderr()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

impl Drop for ChildLines {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Standard error of a command, as text.
pub fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Standard output of a command, as text.
pub fn stdout_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The environment of a CLI test: a temporary directory (removed on drop) and the location of a
/// vault in it, `<root>/vault`. Every test that drives `bulwark-controller` builds one.
#[derive(Debug)]
pub struct TestEnv {
    _dir: tempfile::TempDir,
    /// The temporary directory.
    pub root: PathBuf,
    /// The vault's location (`<root>/vault`; created by the first backup, or by [`TestEnv::init`]).
    pub vault: String,
}

impl Default for TestEnv {
    fn default() -> Self {
        TestEnv::new()
    }
}

impl TestEnv {
    /// A new temporary directory with no vault yet.
    pub fn new() -> TestEnv {
        let dir = tempfile::tempdir().expect("temporary directory");
        let root = dir.path().to_path_buf();
        let vault = root.join("vault").display().to_string();
        TestEnv {
            _dir: dir,
            root,
            vault,
        }
    }

    /// A new environment whose vault is created with `init` and the extra `args`
    /// (`--block-size 64KiB`, ...).
    pub fn init(args: &[&str]) -> TestEnv {
        let env = TestEnv::new();
        let mut all = vec!["init", "--vault", &env.vault];
        all.extend(args);
        let out = controller(&all);
        assert!(out.status.success(), "init: {}", stderr_of(&out));
        env
    }

    /// A path in the temporary directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Commits a test point: `backup --vault <vault> --vm VM --disk D... EXTRA... --json`,
    /// asserting success. Returns the backup report (`point`, `disks`, ...).
    pub fn backup(&self, vm: &str, disks: &[String], extra: &[&str]) -> serde_json::Value {
        let mut args = vec!["backup", "--vault", &self.vault, "--vm", vm, "--json"];
        for d in disks {
            args.extend(["--disk", d.as_str()]);
        }
        args.extend(extra);
        controller_json(&args)
    }

    /// `restore --vault <vault> --vm VM --point POINT --disk DISK --to TO EXTRA...`, whatever
    /// its exit status.
    pub fn restore(&self, vm: &str, point: &str, disk: &str, to: &Path, extra: &[&str]) -> Output {
        let to = to.display().to_string();
        let mut args = vec![
            "restore",
            "--vault",
            &self.vault,
            "--vm",
            vm,
            "--point",
            point,
        ];
        args.extend(["--disk", disk, "--to", &to]);
        args.extend(extra);
        controller(&args)
    }
}
