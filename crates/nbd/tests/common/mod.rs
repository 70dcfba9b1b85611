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

/// Blocks of this size that are all zero are served as holes by [`MemBackend`].
pub const BLOCK: usize = 64 << 10;

/// An in-memory disk served by the test servers: all-zero 64 KiB blocks are holes.
#[derive(Debug)]
pub struct MemBackend {
    data: bytes::Bytes,
    /// Per block: all zero.
    zero: Vec<bool>,
}

impl MemBackend {
    pub fn new(data: Vec<u8>) -> Self {
        let zero = data
            .chunks(BLOCK)
            .map(|b| b.iter().all(|&x| x == 0))
            .collect();
        MemBackend {
            data: data.into(),
            zero,
        }
    }
}

#[bulwark_nbd::async_trait]
impl bulwark_nbd::Backend for MemBackend {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
    async fn read(&self, offset: u64, len: u32) -> std::io::Result<Vec<bulwark_nbd::Piece>> {
        use bulwark_nbd::Piece;
        let (mut at, end) = (offset as usize, offset as usize + len as usize);
        let mut out = Vec::new();
        while at < end {
            let next = ((at / BLOCK + 1) * BLOCK).min(end);
            let slice = self.data.slice(at..next);
            if self.zero[at / BLOCK] {
                out.push(Piece::Hole((next - at) as u32));
            } else {
                out.push(Piece::Data(slice));
            }
            at = next;
        }
        Ok(out)
    }
    async fn block_status(
        &self,
        offset: u64,
        len: u32,
    ) -> std::io::Result<Vec<bulwark_nbd::Extent>> {
        let (mut at, end) = (offset, offset + u64::from(len));
        let mut out = Vec::new();
        // A few extents per answer, as a real backend would: the client asks again.
        while at < end && out.len() < 64 {
            let next = ((at / BLOCK as u64 + 1) * BLOCK as u64).min(end);
            let zero = self.zero[at as usize / BLOCK];
            out.push(bulwark_nbd::Extent {
                offset: at,
                length: next - at,
                flags: if zero {
                    bulwark_nbd::STATE_HOLE | bulwark_nbd::STATE_ZERO
                } else {
                    0
                },
            });
            at = next;
        }
        Ok(out)
    }
}

/// A 32 MiB disk: data in some 64 KiB blocks (pseudo-random), holes elsewhere.
pub fn sparse_disk() -> Vec<u8> {
    let mut data = vec![0u8; 32 << 20];
    for (i, block) in data.chunks_mut(BLOCK).enumerate() {
        if i % 7 == 0 || (100..140).contains(&i) || i == 511 {
            block.copy_from_slice(&pattern(BLOCK, i as u64 + 1));
        }
    }
    data
}

/// Our server on a runtime of its own, shut down and awaited on drop.
pub struct TestServer {
    pub rt: tokio::runtime::Runtime,
    pub address: bulwark_nbd::Address,
    stop: bulwark_nbd::ShutdownHandle,
    running: Option<tokio::task::JoinHandle<bulwark_nbd::Result<()>>>,
}

impl TestServer {
    pub fn start(
        address: bulwark_nbd::Address,
        data: Vec<u8>,
        options: bulwark_nbd::ServerOptions,
    ) -> TestServer {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let backend = std::sync::Arc::new(MemBackend::new(data));
        let server = rt
            .block_on(bulwark_nbd::Server::bind(&address, backend, options))
            .unwrap();
        let address = server.address().clone();
        let stop = server.shutdown_handle();
        let running = Some(rt.spawn(server.run()));
        TestServer {
            rt,
            address,
            stop,
            running,
        }
    }

    /// `nbd+unix:///disk?socket=...` or `nbd://127.0.0.1:PORT/disk`.
    pub fn uri(&self, export: &str) -> String {
        match &self.address {
            bulwark_nbd::Address::Unix(p) => format!("nbd+unix:///{export}?socket={}", p.display()),
            bulwark_nbd::Address::Tcp(a) => format!("nbd://{a}/{export}"),
            _ => unreachable!(),
        }
    }

    /// Stops the server and waits for `run` to return.
    pub fn stop(&mut self) {
        self.stop.shutdown();
        if let Some(r) = self.running.take() {
            self.rt.block_on(r).unwrap().unwrap();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.shutdown();
        if let Some(r) = self.running.take() {
            let _ = self.rt.block_on(r);
        }
    }
}

/// Resident memory of this process, in bytes.
pub fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}
