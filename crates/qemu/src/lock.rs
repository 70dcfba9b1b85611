//! [`ImageLock`]: QEMU's own image locking, taken by Bulwark while it reads an image file that
//! no QEMU process has open, so that a VM cannot start writing it meanwhile (and a VM that
//! already writes it makes the backup fail, never read a torn disk).
//!
//! QEMU's `file` driver (block/file-posix.c, the same in QEMU 7.2 as today) marks the block-layer
//! permissions of every open image with open-file-description (OFD) byte-range locks, all of
//! them shared (`F_RDLCK`) so that many processes can hold each byte:
//!
//! * byte `100 + bit` is held by a process that *has* permission `bit`;
//! * byte `200 + bit` is held by a process that *does not share* permission `bit` with others.
//!
//! Bits: 0 consistent read, 1 write, 2 write unchanged, 3 resize (bit 4, the removed
//! "graph-mod", is unused). To open, QEMU first takes its bytes, then tests for a conflict with
//! an exclusive `F_OFD_GETLK` (which passes over the caller's own locks): for each permission it
//! wants, byte `200 + bit` must be free; for each permission it does not share, byte
//! `100 + bit` must be free. Else it fails with `Failed to get "write" lock` (or the permission
//! in question) and lets its bytes go.
//!
//! Bulwark is a reader that wants a consistent read and shares neither write nor resize: it
//! holds bytes 100, 201 and 203, and tests 200, 101 and 103. A QEMU that opens the image for
//! writing afterwards tests 201 and fails; one that already writes it holds 101 and Bulwark
//! fails. Taking first and testing after (as QEMU does) means two openers racing always see
//! each other. The locks belong to the open file description, so other descriptors of the same
//! file (the reader's own) neither release nor conflict with them; they go when the
//! [`ImageLock`] is dropped.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::Error;

/// QEMU's first "has permission" byte.
const PERM_BASE: i64 = 100;
/// QEMU's first "does not share permission" byte.
const SHARED_BASE: i64 = 200;

/// QEMU's block-layer permission bits (their index: the byte offset from a base).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Perm {
    ConsistentRead = 0,
    Write = 1,
    Resize = 3,
}

impl Perm {
    /// QEMU's name of the permission, as its error messages spell it.
    fn name(self) -> &'static str {
        match self {
            Perm::ConsistentRead => "consistent read",
            Perm::Write => "write",
            Perm::Resize => "resize",
        }
    }
}

/// What Bulwark takes: a consistent read.
const TAKES: [Perm; 1] = [Perm::ConsistentRead];
/// What Bulwark does not share with others (everything else is shared: consistent read, and
/// write-unchanged, which never changes what the guest sees).
const UNSHARED: [Perm; 2] = [Perm::Write, Perm::Resize];

/// QEMU's image locks on one file, held as a read-only consistent reader that shares neither
/// write nor resize (see the module docs). Released when dropped.
///
/// ```no_run
/// # fn f() -> Result<(), bulwark_qemu::Error> {
/// let lock = bulwark_qemu::ImageLock::read_only(std::path::Path::new("/var/lib/vm/data.img"))?;
/// // ... read the image: no QEMU can open it for writing until `lock` is dropped ...
/// drop(lock);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct ImageLock {
    path: PathBuf,
    file: File,
}

impl ImageLock {
    /// Opens `path` read-only and takes QEMU's locks of a consistent reader that shares
    /// neither write nor resize. Fails with [`Error::ImageLocked`] naming the path when a QEMU
    /// process holds a conflicting permission (a VM writing the image), with [`Error::File`]
    /// when the file cannot be opened or locked.
    pub fn read_only(path: &Path) -> Result<ImageLock, Error> {
        let io = |source| Error::File {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // Take first, then test (QEMU's order): of two openers racing, one sees the other.
        for perm in TAKES {
            set_read_lock(&file, PERM_BASE + perm as i64).map_err(io)?;
        }
        for perm in UNSHARED {
            set_read_lock(&file, SHARED_BASE + perm as i64).map_err(io)?;
        }
        // On a conflict, `file` drops here with its locks.
        for perm in TAKES {
            if !lock_free(&file, SHARED_BASE + perm as i64).map_err(io)? {
                return Err(Error::ImageLocked {
                    path: path.to_path_buf(),
                    why: format!(
                        "another process holds QEMU's lock against sharing \"{}\" (byte {})",
                        perm.name(),
                        SHARED_BASE + perm as i64
                    ),
                });
            }
        }
        for perm in UNSHARED {
            if !lock_free(&file, PERM_BASE + perm as i64).map_err(io)? {
                return Err(Error::ImageLocked {
                    path: path.to_path_buf(),
                    why: format!(
                        "QEMU's \"{}\" lock (byte {}) is held by another process: a QEMU process (a running VM?) has it open for writing",
                        perm.name(),
                        PERM_BASE + perm as i64
                    ),
                });
            }
        }
        tracing::debug!(path = %path.display(), "QEMU image locks taken");
        Ok(ImageLock {
            path: path.to_path_buf(),
            file,
        })
    }

    /// The locked image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The descriptor that holds the locks (open read-only).
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// A one-byte `flock` record at `byte` of type `kind`.
fn record(byte: i64, kind: libc::c_int) -> libc::flock {
    // SAFETY: `flock` is a plain C struct of integers; all-zero is a valid value (and the
    // `l_pid` of 0 that OFD commands require).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    fl
}

/// Takes a shared OFD lock on `byte` (QEMU's `qemu_lock_fd(.., exclusive=false)`). Never
/// waits: a conflicting exclusive lock gives an error.
fn set_read_lock(file: &File, byte: i64) -> std::io::Result<()> {
    let fl = record(byte, libc::F_RDLCK);
    // SAFETY: the descriptor is open for the call's duration (borrowed from `file`), and `fl`
    // is a valid `flock` the kernel only reads for F_OFD_SETLK.
    let r = unsafe {
        libc::fcntl(
            file.as_raw_fd(),
            libc::F_OFD_SETLK,
            &fl as *const libc::flock,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether an exclusive OFD lock on `byte` could be taken (QEMU's `qemu_lock_fd_test(..,
/// exclusive=true)`): no other open file description holds any lock there.
fn lock_free(file: &File, byte: i64) -> std::io::Result<bool> {
    let mut fl = record(byte, libc::F_WRLCK);
    // SAFETY: the descriptor is open for the call's duration, and `fl` is a valid, exclusively
    // borrowed `flock` the kernel reads and overwrites for F_OFD_GETLK.
    let r = unsafe {
        libc::fcntl(
            file.as_raw_fd(),
            libc::F_OFD_GETLK,
            &mut fl as *mut libc::flock,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fl.l_type == libc::F_UNLCK as libc::c_short)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes held by open file descriptions other than `file`'s.
    fn held_by_others(file: &File) -> Vec<i64> {
        (90..210)
            .filter(|b| !lock_free(file, *b).unwrap())
            .collect()
    }

    #[test]
    fn holds_qemus_bytes_and_lets_go_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.img");
        std::fs::write(&img, vec![0u8; 4096]).unwrap();
        let probe = File::open(&img).unwrap();
        let lock = ImageLock::read_only(&img).unwrap();
        assert_eq!(held_by_others(&probe), vec![100, 201, 203]);
        assert_eq!(lock.path(), img.as_path());
        // Two readers share: a second lock is granted.
        let second = ImageLock::read_only(&img).unwrap();
        drop(lock);
        drop(second);
        assert!(held_by_others(&probe).is_empty());
    }

    #[test]
    fn a_writer_is_refused_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("b.img");
        std::fs::write(&img, vec![0u8; 4096]).unwrap();
        // What a QEMU writer holds: write permission (101).
        let writer = File::open(&img).unwrap();
        set_read_lock(&writer, 101).unwrap();
        let err = ImageLock::read_only(&img).unwrap_err().to_string();
        assert!(err.contains("b.img") && err.contains("\"write\""), "{err}");
        // The refused attempt left nothing behind.
        let probe = File::open(&img).unwrap();
        assert_eq!(held_by_others(&probe), vec![101]);
        drop(writer);
        assert!(ImageLock::read_only(&img).is_ok());
    }
}
