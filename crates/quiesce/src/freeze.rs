//! Linux fsfreeze: FIFREEZE/FITHAW on an open directory of the mount point, and [`FrozenSet`],
//! a guard that freezes a list of mounts and always thaws them.
//!
//! These calls block: FIFREEZE syncs the file system first. From async code, call them in
//! `tokio::task::spawn_blocking`.
//!
//! While a file system is frozen, any write to it blocks, including a log line written to a file
//! on it. Code that runs while frozen (the watchdog, the guardian) thaws first and logs after.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::ioctl::Opcode;
use rustix::ioctl::opcode;

use crate::mounts::freeze_order;
use crate::{Error, Result};

/// `FIFREEZE`, `_IOWR('X', 119, int)` in `<linux/fs.h>`.
const FIFREEZE: Opcode = opcode::read_write::<libc::c_int>(b'X', 119);
/// `FITHAW`, `_IOWR('X', 120, int)` in `<linux/fs.h>`.
const FITHAW: Opcode = opcode::read_write::<libc::c_int>(b'X', 120);

/// Opens a mount point (read-only, as a directory, close-on-exec) for FIFREEZE/FITHAW.
pub fn open_mount(mount: &Path) -> Result<OwnedFd> {
    if !mount.is_absolute() {
        return Err(Error::UnsuitableMount {
            mount: mount.to_path_buf(),
            reason: "not an absolute path".into(),
        });
    }
    rustix::fs::open(
        mount,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::io("open mount point", mount, e.into()))
}

fn fs_ioctl(fd: BorrowedFd<'_>, op: Opcode) -> std::result::Result<(), Errno> {
    // SAFETY: FIFREEZE and FITHAW take no pointer argument (the kernel ignores the third
    // argument), so passing 0 cannot make the kernel read or write our memory; `fd` is a valid
    // open descriptor for the duration of the call because we hold a `BorrowedFd` to it.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), op as _, 0 as libc::c_ulong) };
    if rc == -1 {
        let raw = std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO);
        Err(Errno::from_raw_os_error(raw))
    } else {
        Ok(())
    }
}

/// Freezes the file system of the open directory `fd` (named `mount` in errors).
///
/// EBUSY (already frozen) is [`Error::AlreadyFrozen`]: it is not ours, so we will not thaw it.
pub fn freeze_fd(fd: BorrowedFd<'_>, mount: &Path) -> Result<()> {
    match fs_ioctl(fd, FIFREEZE) {
        Ok(()) => Ok(()),
        Err(Errno::BUSY) => Err(Error::AlreadyFrozen {
            mount: mount.to_path_buf(),
        }),
        Err(errno) => Err(Error::Freeze {
            mount: mount.to_path_buf(),
            errno,
        }),
    }
}

/// Thaws the file system of the open directory `fd`: `Ok(true)` when it was frozen and is now
/// thawed, `Ok(false)` when it was not frozen (EINVAL).
pub fn thaw_fd(fd: BorrowedFd<'_>, mount: &Path) -> Result<bool> {
    match fs_ioctl(fd, FITHAW) {
        Ok(()) => Ok(true),
        Err(Errno::INVAL) => Ok(false),
        Err(errno) => Err(Error::Thaw {
            mount: mount.to_path_buf(),
            errno,
        }),
    }
}

/// Freezes the file system mounted at (or containing) `mount`. Prefer [`FrozenSet`], which
/// cannot forget to thaw.
pub fn freeze(mount: &Path) -> Result<()> {
    let fd = open_mount(mount)?;
    freeze_fd(fd.as_fd(), mount)
}

/// Thaws the file system at `mount`: `Ok(false)` when it was not frozen.
pub fn thaw(mount: &Path) -> Result<bool> {
    let fd = open_mount(mount)?;
    thaw_fd(fd.as_fd(), mount)
}

/// What a thaw did, mount by mount.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ThawReport {
    /// Thawed now.
    pub thawed: Vec<PathBuf>,
    /// We had frozen them, but they were no longer frozen: someone else (the guardian, an admin
    /// running `fsfreeze -u`) thawed them first. The freeze was not held continuously.
    pub thawed_by_someone_else: Vec<PathBuf>,
    /// FITHAW failed: they may still be frozen (a later thaw or the drop retries).
    pub failed: Vec<(PathBuf, String)>,
}

impl ThawReport {
    /// True when nothing failed.
    pub fn is_clean(&self) -> bool {
        self.failed.is_empty()
    }

    fn merge(&mut self, other: ThawReport) {
        self.thawed.extend(other.thawed);
        self.thawed_by_someone_else
            .extend(other.thawed_by_someone_else);
        self.failed = other.failed;
    }
}

#[derive(Debug)]
struct Entry {
    path: PathBuf,
    fd: OwnedFd,
    frozen: bool,
}

/// A set of mounts frozen together: frozen in order (nested mounts before their parents),
/// thawed in the opposite order, and always thawed on drop.
///
/// Both [`freeze`](FrozenSet::freeze) and [`thaw`](FrozenSet::thaw) are idempotent. Mounts that
/// are the same file system (bind mounts, or two directories of one file system) are frozen once.
#[derive(Debug)]
pub struct FrozenSet {
    entries: Vec<Entry>,
}

impl FrozenSet {
    /// Opens every mount (nothing is frozen yet), ordered by [`freeze_order`] and deduplicated by
    /// device.
    pub fn new<P: AsRef<Path>>(mounts: &[P]) -> Result<Self> {
        let mut entries = Vec::new();
        let mut devices = Vec::new();
        for path in freeze_order(mounts) {
            let fd = open_mount(&path)?;
            let st = rustix::fs::fstat(&fd).map_err(|e| Error::io("stat", &path, e.into()))?;
            if devices.contains(&st.st_dev) {
                continue;
            }
            devices.push(st.st_dev);
            entries.push(Entry {
                path,
                fd,
                frozen: false,
            });
        }
        Ok(FrozenSet { entries })
    }

    /// [`new`](FrozenSet::new) then [`freeze`](FrozenSet::freeze).
    pub fn freeze_all<P: AsRef<Path>>(mounts: &[P]) -> Result<Self> {
        let mut set = Self::new(mounts)?;
        set.freeze()?;
        Ok(set)
    }

    /// The mounts, in freeze order.
    pub fn mounts(&self) -> Vec<PathBuf> {
        self.entries.iter().map(|e| e.path.clone()).collect()
    }

    /// Whether any mount is frozen by us.
    pub fn is_frozen(&self) -> bool {
        self.entries.iter().any(|e| e.frozen)
    }

    /// Freezes every mount not yet frozen, in order. On the first failure, thaws what this set
    /// froze and returns the error (so a failed freeze leaves nothing frozen).
    pub fn freeze(&mut self) -> Result<()> {
        for i in 0..self.entries.len() {
            let e = &mut self.entries[i];
            if e.frozen {
                continue;
            }
            match freeze_fd(e.fd.as_fd(), &e.path) {
                Ok(()) => e.frozen = true,
                Err(err) => {
                    let report = self.thaw();
                    if !report.is_clean() {
                        tracing::error!(?report, "thaw after a failed freeze was incomplete");
                    }
                    return Err(err);
                }
            }
        }
        Ok(())
    }

    /// Thaws every mount this set froze, in reverse order. Idempotent: a second call does nothing.
    /// Never stops early: every mount is tried.
    pub fn thaw(&mut self) -> ThawReport {
        let mut report = ThawReport::default();
        for e in self.entries.iter_mut().rev() {
            if !e.frozen {
                continue;
            }
            match thaw_fd(e.fd.as_fd(), &e.path) {
                Ok(true) => {
                    e.frozen = false;
                    report.thawed.push(e.path.clone());
                }
                Ok(false) => {
                    e.frozen = false;
                    report.thawed_by_someone_else.push(e.path.clone());
                }
                Err(err) => report.failed.push((e.path.clone(), err.to_string())),
            }
        }
        report
    }

    /// Thaws, retrying the failed mounts a few times (with short pauses).
    pub fn thaw_with_retries(&mut self, attempts: u32) -> ThawReport {
        let mut report = self.thaw();
        for i in 1..attempts.max(1) {
            if report.is_clean() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50 * u64::from(i)));
            report.merge(self.thaw());
        }
        report
    }
}

impl Drop for FrozenSet {
    fn drop(&mut self) {
        if self.is_frozen() {
            let report = self.thaw_with_retries(5);
            if !report.is_clean() {
                tracing::error!(?report, "could not thaw every file system on drop");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Error paths only: unit tests never freeze anything (root tests in tests/ use loop mounts).

    #[test]
    fn opcodes_match_linux_fs_h() {
        if cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) {
            assert_eq!(FIFREEZE as u64, 0xC004_5877);
            assert_eq!(FITHAW as u64, 0xC004_5878);
        }
    }

    #[test]
    fn bad_mount_paths_are_errors() {
        assert!(matches!(
            freeze(Path::new("rel")),
            Err(Error::UnsuitableMount { .. })
        ));
        assert!(matches!(
            thaw(Path::new("rel")),
            Err(Error::UnsuitableMount { .. })
        ));
        assert!(matches!(
            FrozenSet::new(&["/nonexistent/bulwark-test"]),
            Err(Error::Io {
                op: "open mount point",
                ..
            })
        ));
        let f = tempfile::NamedTempFile::new().unwrap();
        assert!(
            FrozenSet::new(&[f.path()]).is_err(),
            "a file is not a mount point"
        );
    }

    #[test]
    fn error_messages_name_the_mount_and_errno() {
        let e = Error::Freeze {
            mount: "/data".into(),
            errno: Errno::OPNOTSUPP,
        };
        assert!(e.to_string().starts_with("cannot freeze /data: "), "{e}");
        let e = Error::AlreadyFrozen {
            mount: "/data".into(),
        };
        assert_eq!(
            e.to_string(),
            "cannot freeze /data: it is already frozen (EBUSY)"
        );
    }

    #[test]
    fn an_empty_set_is_fine() {
        let mut s = FrozenSet::new::<&Path>(&[]).unwrap();
        s.freeze().unwrap();
        assert!(!s.is_frozen());
        assert_eq!(s.thaw(), ThawReport::default());
    }
}
