//! One disk of a recovery point, mounted with FUSE as a read-only image file.
//!
//! [`mount`] puts a directory at a mountpoint that holds one regular file, for example
//! `os.img`, whose bytes are the disk's: tools that want an image file (`e2fsck -fn`,
//! `qemu-img`, `sha256sum`, a loop device) can read the point without restoring it. Every
//! read goes through the same [`PointDisk`] reader as `export` and `files`: each block is
//! fetched from the vault on first use and verified against its content address, zero blocks
//! cost nothing, verified blocks stay in a bounded cache, sequential readers get read-ahead.
//!
//! * **Read-only.** Mounted `ro,nosuid,nodev,noexec`; the file is mode 0444; an open for
//!   writing, a write, a truncate, a new file are refused with `EROFS`.
//! * **Never wrong bytes.** A block that does not verify (damaged, missing, unreadable vault)
//!   fails the read with `EIO`; nothing is ever served in its place.
//! * **Bounded memory.** The block cache ([`bulwark_recovery::DiskOptions::cache_bytes`]),
//!   plus one kernel request buffer (16 MiB, touched only as far as requests fill it) and at
//!   most one read (the kernel's `max_read`) per worker thread.
//! * **Unmount.** [`Mounted::unmount`] (and dropping the [`Mounted`]) unmounts; when the
//!   file is still open, the mount is detached lazily and disappears when it is closed.
//!
//! Mounting needs root (then `mount(2)` is called directly, no helper), or else the
//! `fusermount3` helper of the fuse3 package.
//!
//! The guest's file system inside the image is untrusted input: loop-mounting it on the host
//! hands the host kernel a file system the guest controlled. Read files with the user-space
//! `files` command instead where possible; mount it only at your own risk.
//!
//! # Example
//!
//! Mounting needs root and `/dev/fuse`, so this example is only compiled:
//!
//! ```no_run
//! # async fn f(vault: bulwark_vault::Vault) -> Result<(), Box<dyn std::error::Error>> {
//! use bulwark_fuse::{MountOptions, mount};
//! use bulwark_recovery::{DiskOptions, PointDisk};
//!
//! let disk = PointDisk::open(&vault, "web01", "latest", "os", DiskOptions::default()).await?;
//! let handle = tokio::runtime::Handle::current();
//! let mountpoint = std::path::PathBuf::from("/mnt/web01");
//! let mounted = tokio::task::spawn_blocking(move || {
//!     mount(disk, &mountpoint, handle, MountOptions::new("os.img"))
//! })
//! .await??;
//! println!("{}", mounted.image_path().display()); // /mnt/web01/os.img
//! tokio::task::spawn_blocking(move || mounted.unmount()).await??;
//! # Ok(()) }
//! ```

use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use bulwark_recovery::PointDisk;
use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, LockOwner, MountOption, OpenAccMode, OpenFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, WriteFlags,
};

/// The inode of the image file (the root directory is [`INodeNo::ROOT`]).
const IMAGE_INO: INodeNo = INodeNo(2);
/// How long the kernel may cache names and attributes: they never change.
const TTL: Duration = Duration::from_secs(3600);
/// Largest read answered at once (the kernel asks for at most its `max_read`, far less).
const MAX_READ: u64 = 16 << 20;

/// Errors of mounting and unmounting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The mountpoint is not usable (missing, not a directory).
    #[error("mountpoint {mountpoint}: {why}")]
    Mountpoint {
        /// The mountpoint.
        mountpoint: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The image file's name is not a plain file name.
    #[error("image file name {name:?}: {why}")]
    FileName {
        /// The name asked for.
        name: String,
        /// What is wrong.
        why: String,
    },
    /// The kernel or the helper refused the mount.
    #[error("mounting {disk} at {mountpoint}: {source}")]
    Mount {
        /// The disk (`vm/point/disk`).
        disk: String,
        /// The mountpoint.
        mountpoint: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Unmounting failed.
    #[error("unmounting {mountpoint}: {source}")]
    Unmount {
        /// The mountpoint.
        mountpoint: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// How [`mount`] mounts.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MountOptions {
    /// The image file's name in the mounted directory (a plain name: no `/`, not `.`/`..`).
    pub file_name: String,
    /// Threads answering the kernel's requests (each has one read in flight at most).
    pub threads: usize,
    /// The image file's modification time (default: the Unix epoch; the command line passes
    /// the point's time).
    pub mtime: SystemTime,
}

impl MountOptions {
    /// Options for an image file named `file_name`: 4 threads, mtime at the Unix epoch.
    pub fn new(file_name: impl Into<String>) -> MountOptions {
        MountOptions {
            file_name: file_name.into(),
            threads: 4,
            mtime: SystemTime::UNIX_EPOCH,
        }
    }
}

/// A mounted point disk; unmounted by [`Mounted::unmount`] or when dropped.
#[derive(Debug)]
pub struct Mounted {
    session: Option<BackgroundSession>,
    mountpoint: PathBuf,
    image: PathBuf,
    disk: PointDisk,
}

/// Mounts `disk` at `mountpoint` (an existing directory) as one read-only file named
/// `options.file_name`. Reads run on `runtime` (the caller's tokio runtime); the kernel's
/// requests are answered on threads of their own until the file system is unmounted.
///
/// This blocks while the kernel sets the mount up: from async code, call it in
/// `spawn_blocking`.
pub fn mount(
    disk: PointDisk,
    mountpoint: &Path,
    runtime: tokio::runtime::Handle,
    options: MountOptions,
) -> Result<Mounted, Error> {
    check_file_name(&options.file_name)?;
    match std::fs::metadata(mountpoint) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(Error::Mountpoint {
                mountpoint: mountpoint.to_path_buf(),
                why: "not a directory".into(),
            });
        }
        Err(e) => {
            return Err(Error::Mountpoint {
                mountpoint: mountpoint.to_path_buf(),
                why: e.to_string(),
            });
        }
    }
    let label = disk.label().to_string();
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::NoSuid,
        MountOption::NoDev,
        MountOption::NoExec,
        MountOption::NoAtime,
        MountOption::DefaultPermissions,
        MountOption::FSName(format!("bulwark:{label}")),
        MountOption::Subtype("bulwark".into()),
    ];
    config.n_threads = Some(options.threads.max(1));
    let fs = ImageFs::new(disk.clone(), runtime, &options);
    let session = fuser::spawn_mount2(fs, mountpoint, &config).map_err(|source| Error::Mount {
        disk: label.clone(),
        mountpoint: mountpoint.to_path_buf(),
        source,
    })?;
    tracing::info!(disk = %label, mountpoint = %mountpoint.display(), "mounted");
    Ok(Mounted {
        session: Some(session),
        image: mountpoint.join(&options.file_name),
        mountpoint: mountpoint.to_path_buf(),
        disk,
    })
}

impl Mounted {
    /// The image file: `<mountpoint>/<file name>`.
    pub fn image_path(&self) -> &Path {
        &self.image
    }

    /// The mountpoint.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The disk served (for its [`PointDisk::stats`]).
    pub fn disk(&self) -> &PointDisk {
        &self.disk
    }

    /// True once the file system has gone away without [`Mounted::unmount`] (someone ran
    /// `umount` on it).
    pub fn is_finished(&self) -> bool {
        self.session.as_ref().is_none_or(|s| s.guard.is_finished())
    }

    /// Unmounts and waits for the request threads to end. When the image file is still open
    /// (`EBUSY`), the mount is detached lazily instead: it leaves the mount table now and its
    /// open files keep working until they are closed.
    pub fn unmount(mut self) -> Result<(), Error> {
        self.unmount_now()
    }

    fn unmount_now(&mut self) -> Result<(), Error> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        match session.umount_and_join() {
            Ok(()) => {
                tracing::info!(mountpoint = %self.mountpoint.display(), "unmounted");
                Ok(())
            }
            Err(e) if e.raw_os_error() == Some(libc_ebusy()) => {
                tracing::warn!(
                    mountpoint = %self.mountpoint.display(),
                    "the image is still open: detaching the mount lazily"
                );
                rustix::mount::unmount(&self.mountpoint, rustix::mount::UnmountFlags::DETACH)
                    .map_err(|errno| Error::Unmount {
                        mountpoint: self.mountpoint.clone(),
                        source: errno.into(),
                    })
            }
            Err(source) => Err(Error::Unmount {
                mountpoint: self.mountpoint.clone(),
                source,
            }),
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_now() {
            tracing::warn!("{e}");
        }
    }
}

fn libc_ebusy() -> i32 {
    rustix::io::Errno::BUSY.raw_os_error()
}

fn check_file_name(name: &str) -> Result<(), Error> {
    let why = if name.is_empty() {
        "empty"
    } else if name == "." || name == ".." {
        "not a file name"
    } else if name.contains('/') || name.contains('\0') {
        "contains '/' or NUL"
    } else if name.len() > 255 {
        "longer than 255 bytes"
    } else {
        return Ok(());
    };
    Err(Error::FileName {
        name: name.into(),
        why: why.into(),
    })
}

/// The part of a read of `size` bytes at `offset` that lies inside a disk of `disk_size`
/// bytes (capped at [`MAX_READ`]): its length, 0 at or past the end.
fn clip_read(offset: u64, size: u32, disk_size: u64) -> usize {
    let len = disk_size
        .saturating_sub(offset)
        .min(u64::from(size))
        .min(MAX_READ);
    // At most MAX_READ, so it fits in usize.
    usize::try_from(len).unwrap_or(0)
}

/// The file system: a root directory with the image file in it.
#[derive(Debug)]
struct ImageFs {
    disk: PointDisk,
    runtime: tokio::runtime::Handle,
    name: String,
    root: FileAttr,
    image: FileAttr,
}

impl ImageFs {
    fn new(disk: PointDisk, runtime: tokio::runtime::Handle, options: &MountOptions) -> ImageFs {
        let uid = rustix::process::getuid().as_raw();
        let gid = rustix::process::getgid().as_raw();
        let t = options.mtime;
        let size = disk.size();
        let blksize = u32::try_from(disk.block_size().clamp(4096, 1 << 20)).unwrap_or(4096);
        let attr = |ino, kind, perm, nlink, size: u64| FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind,
            perm,
            nlink,
            uid,
            gid,
            rdev: 0,
            blksize,
            flags: 0,
        };
        ImageFs {
            root: attr(INodeNo::ROOT, FileType::Directory, 0o555, 2, 0),
            image: attr(IMAGE_INO, FileType::RegularFile, 0o444, 1, size),
            name: options.file_name.clone(),
            disk,
            runtime,
        }
    }

    fn attr_of(&self, ino: INodeNo) -> Option<&FileAttr> {
        if ino == INodeNo::ROOT {
            Some(&self.root)
        } else if ino == IMAGE_INO {
            Some(&self.image)
        } else {
            None
        }
    }
}

impl Filesystem for ImageFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == INodeNo::ROOT && name == OsStr::new(&self.name) {
            reply.entry(&TTL, &self.image, Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr_of(ino) {
            Some(attr) => reply.attr(&TTL, attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino != IMAGE_INO {
            reply.error(Errno::EISDIR);
        } else if flags.acc_mode() != OpenAccMode::O_RDONLY {
            reply.error(Errno::EROFS);
        } else {
            // The bytes never change: the kernel may keep its page cache across opens.
            reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino != IMAGE_INO {
            reply.error(Errno::EISDIR);
            return;
        }
        let len = clip_read(offset, size, self.disk.size());
        if len == 0 {
            reply.data(&[]);
            return;
        }
        let mut buf = vec![0u8; len];
        // A thread of the FUSE session, outside the runtime: blocking on it is allowed.
        match self.runtime.block_on(self.disk.read_at(offset, &mut buf)) {
            Ok(()) => reply.data(&buf),
            Err(e) => {
                tracing::error!(offset, len, "read failed: {e}");
                reply.error(Errno::EIO);
            }
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS);
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Nothing is ever written: nothing to sync.
        reply.ok();
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::NO_XATTR);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // Not a device: no ioctl (BLKGETSIZE and the like) applies.
        reply.error(Errno::ENOTTY);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            reply.error(Errno::ENOTDIR);
            return;
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
            (IMAGE_INO, FileType::RegularFile, self.name.as_str()),
        ];
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(skip) {
            // The offset given is that of the next entry.
            if reply.add(ino, (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.disk.size().div_ceil(4096);
        reply.statfs(blocks, 0, 0, 2, 0, 4096, 255, 4096);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_clipped_to_the_disk() {
        assert_eq!(clip_read(0, 4096, 10_000), 4096);
        assert_eq!(clip_read(8192, 4096, 10_000), 10_000 - 8192);
        assert_eq!(clip_read(10_000, 4096, 10_000), 0);
        assert_eq!(clip_read(u64::MAX, u32::MAX, 10_000), 0);
        assert_eq!(clip_read(0, u32::MAX, u64::MAX), MAX_READ as usize);
    }

    #[test]
    fn file_names_are_plain() {
        assert!(check_file_name("os.img").is_ok());
        for bad in ["", ".", "..", "a/b", "/x", "a\0b", &"x".repeat(256)] {
            assert!(check_file_name(bad).is_err(), "{bad:?}");
        }
    }
}
