//! Shared test helpers: tool gating, a qemu-nbd guard that kills only the process it started.
#![allow(dead_code, clippy::unwrap_used)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// True when every tool is on the PATH. Otherwise prints why the test skips, or panics when
/// BULWARK_REQUIRE_SERVERS=1 or BULWARK_REQUIRE_ROOT_TESTS=1 (CI must not pass by skipping).
pub fn tools_or_skip(test: &str, tools: &[&str]) -> bool {
    let missing: Vec<_> = tools.iter().filter(|t| which(t).is_none()).collect();
    if missing.is_empty() {
        return true;
    }
    let strict = ["BULWARK_REQUIRE_SERVERS", "BULWARK_REQUIRE_ROOT_TESTS"]
        .iter()
        .any(|v| std::env::var(v).is_ok_and(|v| v == "1"));
    let why =
        format!("{test}: needs {missing:?} (qemu-utils, libnbd-bin; tests/run.sh installs them)");
    if strict {
        panic!("{why}, and skipping is forbidden here");
    }
    eprintln!("SKIPPED {why}");
    false
}

/// Finds an executable on the PATH.
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin", "/usr/sbin", "/bin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Runs a command, panicking with its output when it fails.
pub fn run<I, S>(program: &str, args: I) -> std::process::Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let out = Command::new(program).args(&args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A free TCP port on loopback (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `qemu-nbd` this test started; `Drop` kills it by its pid and reaps it.
pub struct QemuNbd {
    child: Child,
    /// Its Unix socket (for Unix-socket servers).
    pub socket: PathBuf,
}

impl QemuNbd {
    /// `qemu-nbd --read-only --persistent -e 8 -k DIR/nbd.sock -x EXPORT EXTRA... IMAGE`.
    pub fn start(dir: &Path, export: &str, extra: &[&str], image: &Path) -> QemuNbd {
        let socket = dir.join(format!("{export}.sock"));
        let child = Command::new("qemu-nbd")
            .args(["--read-only", "--persistent", "--shared=8", "-k"])
            .arg(&socket)
            .args(["-x", export])
            .args(extra)
            .arg(image)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let guard = QemuNbd { child, socket };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&guard.socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "qemu-nbd did not listen on {:?}",
                guard.socket
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        guard
    }

    /// The same on TCP `127.0.0.1:port`.
    pub fn start_tcp(port: u16, export: &str, extra: &[&str], image: &Path) -> QemuNbd {
        let child = Command::new("qemu-nbd")
            .args([
                "--read-only",
                "--persistent",
                "--shared=8",
                "-b",
                "127.0.0.1",
                "-p",
            ])
            .arg(port.to_string())
            .args(["-x", export])
            .args(extra)
            .arg(image)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let guard = QemuNbd {
            child,
            socket: PathBuf::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "qemu-nbd did not listen on port {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        guard
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        // Child::kill signals exactly this pid.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
