//! Helpers shared by the root tests. Every file system frozen here is a `LoopFs` the test made
//! itself; `/` and host mounts are never touched.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bulwark_tests::{FsType, LoopFs};

/// A child process that writes into a file system; killed and reaped on drop.
pub struct Writer {
    child: Option<Child>,
    pub file: PathBuf,
}

impl Writer {
    /// Starts `sh -c 'echo <text> > <dir>/<name>'` in a child process.
    pub fn start(dir: &Path, name: &str) -> Writer {
        let file = dir.join(name);
        let child = Command::new("/bin/sh")
            .arg("-c")
            .arg(format!("echo written > '{}'", file.display()))
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn writer");
        Writer {
            child: Some(child),
            file,
        }
    }

    /// True when the writer is still running after `d` (it is blocked on a frozen fs).
    pub fn blocked_for(&mut self, d: Duration) -> bool {
        std::thread::sleep(d);
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    /// Waits up to `d` for the writer to finish; true when it finished successfully and the
    /// file holds what it wrote.
    pub fn finishes_within(&mut self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status.success()
                    && std::fs::read_to_string(&self.file).unwrap() == "written\n";
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            // Do not wait: a writer blocked on a frozen fs only dies once it is thawed, and the
            // LoopFs guard (dropped after us) thaws it.
        }
    }
}

/// Asserts that writes to `dir` go through at once (it is not frozen).
pub fn assert_writable(dir: &Path, name: &str) {
    let mut w = Writer::start(dir, name);
    assert!(
        w.finishes_within(Duration::from_secs(10)),
        "{} is still frozen",
        dir.display()
    );
}

/// Asserts that writes to `dir` block (it is frozen); returns the blocked writer.
pub fn assert_frozen(dir: &Path, name: &str) -> Writer {
    let mut w = Writer::start(dir, name);
    assert!(
        w.blocked_for(Duration::from_millis(400)),
        "{} is not frozen: a write went through",
        dir.display()
    );
    w
}

/// A 64 MiB loop-mounted file system of the test's own, in `dir`.
pub fn loop_fs(dir: &Path, name: &str, fs: FsType) -> LoopFs {
    let size = if fs == FsType::Ext4 {
        64 << 20
    } else {
        320 << 20
    };
    LoopFs::create(dir, name, size, fs)
}

/// A child process that is SIGKILLed and reaped when dropped.
pub struct KillOnDrop(pub Option<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A loop-mounted file system of `size` bytes (a sparse image).
pub fn loop_fs_sized(dir: &Path, name: &str, fs: FsType, size: u64) -> LoopFs {
    LoopFs::create(dir, name, size, fs)
}
