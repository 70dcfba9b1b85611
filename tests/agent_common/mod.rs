//! Helpers of the guest-agent scenarios: a guest ext4 image on a loop-mounted XFS (reflink)
//! datastore, the real `bulwark-agent` process, a writer that keeps writing into the guest, and
//! the checks on restored images.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bulwark_tests::*;
use serde_json::Value;

pub const MIB: u64 = 1 << 20;

/// A guest: an ext4 image on an XFS datastore with reflink, both loop-mounted.
/// Field order = drop order: the guest is unmounted before its datastore.
pub struct Guest {
    pub fs: LoopFs,
    pub ds: LoopFs,
}

impl Guest {
    /// An XFS datastore of `ds_size` under `dir/ds`, an ext4 image `guest.img` of `size` on it,
    /// mounted at `dir/mnt`.
    pub fn new(dir: &Path, size: u64, ds_size: u64) -> Guest {
        let ds = LoopFs::create(dir, "ds", ds_size, FsType::XfsReflink);
        let image = ds.path().join("guest.img");
        make_fs_image(&image, size, FsType::Ext4);
        let fs = LoopFs::mount_image(&image, &dir.join("mnt"));
        Guest { fs, ds }
    }

    pub fn mnt(&self) -> &Path {
        self.fs.path()
    }

    pub fn image(&self) -> &Path {
        self.fs.image()
    }

    pub fn disk_arg(&self) -> String {
        format!("guest={}", self.image().display())
    }
}

/// The real agent process. Dropping it sends SIGTERM (the agent thaws before exiting), then
/// SIGKILL if it does not exit in 10 s.
pub struct AgentProc {
    pub child: Child,
    /// What it listens on, from its first line of output: `unix:/...` or `tcp:127.0.0.1:PORT`.
    pub listen: String,
    pub log: PathBuf,
    pub config: PathBuf,
}

/// Writes `text` as the agent configuration `dir/<name>` with `mode`.
pub fn write_config(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

/// A typical configuration: a Unix socket in `dir`, the state in `dir/state`, freezing `mount`.
pub fn unix_config(dir: &Path, mount: &Path, extra: &str) -> String {
    format!(
        "listen = \"unix:{}\"\nstate_dir = \"{}\"\nhostname = \"guest-under-test\"\n\n[freeze]\nmounts = [\"{}\"]\n{extra}\n",
        dir.join("agent.sock").display(),
        dir.join("state").display(),
        mount.display()
    )
}

impl AgentProc {
    /// Starts `bulwark-agent --config <config>` and waits for its "listening on" line.
    pub fn start(config: &Path) -> AgentProc {
        let log = config.with_extension("log");
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut child = Command::new(agent_bin())
            .arg("--config")
            .arg(config)
            .env("BULWARK_LOG", "info,bulwark_agent=debug")
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .expect("start bulwark-agent");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(l)) = lines.next() {
                let _ = tx.send(l);
            }
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the agent did not start listening:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        };
        let listen = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        AgentProc {
            child,
            listen,
            log,
            config: config.to_owned(),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// SIGTERM and wait up to `limit`; returns whether it exited.
    pub fn term(&mut self, limit: Duration) -> bool {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .output();
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.child.try_wait().unwrap().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// The pids of the agent's child processes (the guardian while frozen).
    pub fn children(&self) -> Vec<i32> {
        let mut out = Vec::new();
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.pid())) {
            for t in tasks.flatten() {
                if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                    out.extend(s.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
                }
            }
        }
        out
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() && !self.term(Duration::from_secs(10)) {
            self.kill9();
        }
    }
}

/// Writes an executable script (mode `mode`) at `path`.
pub fn write_script(path: &Path, body: &str, mode: u32) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(body.as_bytes()).unwrap();
    f.sync_all().unwrap();
    drop(f);
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A thread that appends to a log and rewrites files (write a temporary file, fsync some,
/// rename over) in the guest until stopped. Dropping it thaws the guest first (so a test that
/// fails while frozen cannot hang on the join), then stops it.
pub struct Writer {
    stop: Arc<AtomicBool>,
    pub ops: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
    mnt: PathBuf,
}

impl Writer {
    pub fn start(mnt: &Path) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(AtomicU64::new(0));
        let root = mnt.join("work");
        std::fs::create_dir_all(&root).unwrap();
        let handle = {
            let (stop, ops) = (stop.clone(), ops.clone());
            std::thread::spawn(move || {
                let mut i: u64 = 0;
                let mut log = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(root.join("append.log"))
                    .unwrap();
                while !stop.load(Ordering::SeqCst) {
                    i += 1;
                    let line = format!("{i:012} {}\n", "x".repeat(1000));
                    log.write_all(line.as_bytes()).unwrap();
                    let name = root.join(format!("f{}", i % 32));
                    let tmp = root.join(format!(".f{}.tmp", i % 32));
                    std::fs::write(&tmp, pseudo_random(64 * 1024 + (i % 7) as usize * 4096, i))
                        .unwrap();
                    if i.is_multiple_of(8) {
                        std::fs::File::open(&tmp).unwrap().sync_all().unwrap();
                    }
                    std::fs::rename(&tmp, &name).unwrap();
                    ops.fetch_add(1, Ordering::SeqCst);
                }
            })
        };
        let w = Writer {
            stop,
            ops,
            handle: Some(handle),
            mnt: mnt.to_owned(),
        };
        assert!(
            w.progresses(Duration::from_secs(10)),
            "the writer never started"
        );
        w
    }

    /// Whether the writer completes an operation within `limit`.
    pub fn progresses(&self, limit: Duration) -> bool {
        let before = self.ops.load(Ordering::SeqCst);
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.ops.load(Ordering::SeqCst) > before + 1 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    pub fn stop(mut self) {
        self.finish();
    }

    fn finish(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if self.handle.is_some() {
            let _ = Command::new("fsfreeze")
                .arg("--unfreeze")
                .arg(&self.mnt)
                .output();
            self.finish();
        }
    }
}

/// `bulwark-controller backup --vault V --vm VM --disk D --snapshot reflink --json ARGS...`.
pub fn backup(vault: &Path, vm: &str, guest: &Guest, args: &[&str]) -> Output {
    let mut all: Vec<String> = [
        "backup",
        "--vault",
        vault.to_str().unwrap(),
        "--vm",
        vm,
        "--disk",
        &guest.disk_arg(),
        "--snapshot",
        "reflink",
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    all.extend(args.iter().map(|s| s.to_string()));
    controller(&all)
}

/// Like [`backup`], asserting success and parsing the report.
pub fn backup_json(vault: &Path, vm: &str, guest: &Guest, args: &[&str]) -> Value {
    let out = backup(vault, vm, guest, args);
    assert!(
        out.status.success(),
        "backup {args:?} failed ({}):\n{}",
        out.status,
        stderr_of(&out)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The points of `vm` (`list --json`).
pub fn points(vault: &Path, vm: &str) -> Vec<Value> {
    let out = controller([
        "list",
        "--vault",
        vault.to_str().unwrap(),
        "--vm",
        vm,
        "--json",
    ]);
    if !out.status.success() {
        return Vec::new();
    }
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["points"].as_array().cloned().unwrap_or_default()
}

/// Restores disk `guest` of `point` of `vm` to `to`.
pub fn restore(vault: &Path, vm: &str, point: &str, to: &Path) {
    controller_json([
        "restore",
        "--vault",
        vault.to_str().unwrap(),
        "--vm",
        vm,
        "--point",
        point,
        "--disk",
        "guest",
        "--to",
        to.to_str().unwrap(),
        "--json",
    ]);
}

/// The "Filesystem features" of an ext4 image (dumpe2fs -h).
pub fn ext4_features(image: &Path) -> String {
    let out = Command::new("dumpe2fs")
        .arg("-h")
        .arg(image)
        .output()
        .unwrap();
    let text = stdout_of(&out);
    text.lines()
        .find(|l| l.starts_with("Filesystem features:"))
        .unwrap_or_else(|| panic!("dumpe2fs -h {}: no features line:\n{text}", image.display()))
        .to_owned()
}

/// Runs `e2fsck -fn` and returns (success, output).
pub fn e2fsck(image: &Path) -> (bool, String) {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(image)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!("{}{}", stdout_of(&out), stderr_of(&out)),
    )
}

/// The reasons of a backup report, joined.
pub fn reasons(report: &Value) -> String {
    report["consistency_reasons"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str())
                .collect::<Vec<_>>()
                .join(" | ")
        })
        .unwrap_or_default()
}

pub fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}
