//! bulwark-snapshot: point-in-time copies of disk images on the host.
//!
//! A backup never reads the live image: it takes a snapshot first (while the guest is
//! quiesced, when it is), and reads the snapshot at leisure.
//!
//! * [`Provider::Reflink`] clones the file with `FICLONE` (XFS with reflink, btrfs): it shares
//!   the extents, so it takes milliseconds whatever the disk size.
//! * [`Provider::Copy`] copies the data extents (SEEK_DATA/SEEK_HOLE, `copy_file_range`) and
//!   keeps holes as holes. Its time grows with the data, so it lengthens any freeze window.
//! * [`Provider::Auto`] tries a reflink and falls back to a copy, saying so.
//!
//! [`identical_ranges`] compares the extent maps of two reflink snapshots: the ranges that
//! still share their physical extents hold the same data and need not be read again (change
//! tracking for incremental backups, without a hypervisor's dirty bitmap).
//!
//! ```
//! use bulwark_snapshot::{take, Provider};
//! # fn main() -> Result<(), bulwark_snapshot::Error> {
//! let dir = tempfile::tempdir().expect("tempdir");
//! let image = dir.path().join("disk.img");
//! std::fs::write(&image, b"guest data").expect("write");
//! let snap = take(&image, &dir.path().join("disk.snap"), Provider::Auto)?;
//! std::fs::write(&image, b"changed!!!").expect("write");       // the guest goes on writing
//! assert_eq!(std::fs::read(snap.path()).expect("read"), b"guest data");
//! drop(snap);                                                   // removes the snapshot file
//! # Ok(()) }
//! ```

use std::fmt;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use rustix::fs::SeekFrom;
use rustix::io::Errno;

mod extents;
mod source;
pub use extents::identical_ranges;
mod image;
mod tracking;
pub use bulwark_blockdiff::Tracking;
pub use image::{ImageDisk, ImageSnapshotter};
pub use source::{
    Changes, DiskSource, Outcome, PendingSnapshot, PreviousDisk, Released, Snapshotter,
};

/// Errors of the snapshot providers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A disk argument that cannot be used (bad name, two disks of one name, no path).
    #[error("disk {spec}: {why}")]
    InvalidDisk {
        /// The argument (or the disk's name).
        spec: String,
        /// What is wrong.
        why: String,
    },
    /// A worker thread failed (panicked or was cancelled).
    #[error("snapshot worker failed: {0}")]
    Worker(String),
    /// The source is not a regular file.
    #[error("{path}: not a regular file (snapshots need a disk image file)")]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// The file system cannot reflink this file to that place.
    #[error(
        "cannot reflink {source_path} to {dest}: {errno} (the file system needs reflink support, e.g. XFS with reflink=1 or btrfs, and both on the same file system)"
    )]
    ReflinkUnsupported {
        /// The image.
        source_path: PathBuf,
        /// The snapshot path.
        dest: PathBuf,
        /// What the kernel said.
        errno: Errno,
    },
    /// The snapshot file exists already.
    #[error("{path}: a snapshot file already exists there")]
    Exists {
        /// The path.
        path: PathBuf,
    },
    /// An I/O error on a path.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// An unknown provider name.
    #[error("unknown snapshot provider {0:?}: expected auto, reflink or copy")]
    UnknownProvider(String),
    /// A snapshot provider's own error (e.g. QEMU's), shown as it is: it names what failed and
    /// where (the QMP socket, the image) itself.
    #[error(transparent)]
    Provider(Box<dyn std::error::Error + Send + Sync>),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How to take a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Provider {
    /// Reflink if the file system can, else copy.
    #[default]
    Auto,
    /// Reflink only (`FICLONE`); fails where it is not supported.
    Reflink,
    /// Sparse-aware copy.
    Copy,
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Provider::Auto => "auto",
            Provider::Reflink => "reflink",
            Provider::Copy => "copy",
        })
    }
}

impl FromStr for Provider {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "auto" => Ok(Provider::Auto),
            "reflink" => Ok(Provider::Reflink),
            "copy" => Ok(Provider::Copy),
            other => Err(Error::UnknownProvider(other.to_string())),
        }
    }
}

/// A snapshot file. Dropping it removes the file, unless [`Snapshot::keep`] was called.
#[derive(Debug)]
pub struct Snapshot {
    path: PathBuf,
    provider: Provider,
    elapsed: Duration,
    keep: bool,
}

impl Snapshot {
    /// The snapshot file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The provider that made it (`Reflink` or `Copy`, never `Auto`).
    pub fn provider(&self) -> Provider {
        self.provider
    }

    /// How long taking it took.
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }

    /// Keeps the file on drop (for instant restore); returns its path.
    pub fn keep(mut self) -> PathBuf {
        self.keep = true;
        self.path.clone()
    }

    /// Decides whether the file stays on drop, without giving the snapshot up: a job that keeps
    /// its snapshots for instant restore marks them before the transfer phase consumes them.
    pub fn set_keep(&mut self, keep: bool) {
        self.keep = keep;
    }

    /// Whether the file stays on drop.
    pub fn is_kept(&self) -> bool {
        self.keep
    }

    /// Removes the file now.
    pub fn remove(mut self) -> Result<(), Error> {
        self.keep = true;
        std::fs::remove_file(&self.path).map_err(io(&self.path))
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        if !self.keep
            && let Err(e) = std::fs::remove_file(&self.path)
        {
            tracing::warn!(path = %self.path.display(), error = %e, "could not remove snapshot");
        }
    }
}

/// Takes a snapshot of the image `source` into the new file `dest` (which must not exist).
/// The snapshot is read-only (mode 0400) so that nothing changes it by mistake.
pub fn take(source: &Path, dest: &Path, provider: Provider) -> Result<Snapshot, Error> {
    let start = Instant::now();
    let meta = std::fs::metadata(source).map_err(io(source))?;
    if !meta.is_file() {
        return Err(Error::NotAFile {
            path: source.to_path_buf(),
        });
    }
    let src = File::open(source).map_err(io(source))?;
    let used = match provider {
        Provider::Reflink => {
            reflink(&src, source, dest)?;
            Provider::Reflink
        }
        Provider::Copy => {
            copy(&src, source, dest, meta.len())?;
            Provider::Copy
        }
        Provider::Auto => match reflink(&src, source, dest) {
            Ok(()) => Provider::Reflink,
            Err(Error::ReflinkUnsupported { errno, .. }) => {
                tracing::warn!(
                    source = %source.display(),
                    %errno,
                    "reflink not supported here; copying the image instead (the freeze window grows with the disk's data)"
                );
                copy(&src, source, dest, meta.len())?;
                Provider::Copy
            }
            Err(e) => return Err(e),
        },
    };
    Ok(Snapshot {
        path: dest.to_path_buf(),
        provider: used,
        elapsed: start.elapsed(),
        keep: false,
    })
}

fn create_dest(dest: &Path) -> Result<File, Error> {
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dest)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => Error::Exists {
                path: dest.to_path_buf(),
            },
            _ => Error::Io {
                path: dest.to_path_buf(),
                source: e,
            },
        })
}

fn finish(file: File, dest: &Path) -> Result<(), Error> {
    file.sync_all().map_err(io(dest))?;
    std::fs::set_permissions(dest, std::os::unix::fs::PermissionsExt::from_mode(0o400))
        .map_err(io(dest))
}

fn reflink(src: &File, source: &Path, dest: &Path) -> Result<(), Error> {
    let out = create_dest(dest)?;
    match rustix::fs::ioctl_ficlone(&out, src) {
        Ok(()) => finish(out, dest),
        Err(errno) => {
            drop(out);
            let _ = std::fs::remove_file(dest);
            match errno {
                Errno::OPNOTSUPP | Errno::XDEV | Errno::INVAL | Errno::NOSYS | Errno::NOTTY => {
                    Err(Error::ReflinkUnsupported {
                        source_path: source.to_path_buf(),
                        dest: dest.to_path_buf(),
                        errno,
                    })
                }
                e => Err(Error::Io {
                    path: dest.to_path_buf(),
                    source: e.into(),
                }),
            }
        }
    }
}

/// Copies the data extents of `src` into a new sparse file.
fn copy(src: &File, source: &Path, dest: &Path, len: u64) -> Result<(), Error> {
    let out = create_dest(dest)?;
    let result = copy_extents(src, source, &out, dest, len);
    match result {
        Ok(()) => finish(out, dest),
        Err(e) => {
            drop(out);
            let _ = std::fs::remove_file(dest);
            Err(e)
        }
    }
}

fn copy_extents(src: &File, source: &Path, out: &File, dest: &Path, len: u64) -> Result<(), Error> {
    out.set_len(len).map_err(io(dest))?;
    let mut pos = 0u64;
    while pos < len {
        let data = match rustix::fs::seek(src, SeekFrom::Data(pos)) {
            Ok(d) => d,
            Err(Errno::NXIO) => break,
            Err(_) => pos, // no SEEK_DATA here: treat everything as data
        };
        if data >= len {
            break;
        }
        let hole = match rustix::fs::seek(src, SeekFrom::Hole(data)) {
            Ok(h) => h.min(len),
            Err(_) => len,
        };
        copy_range(src, source, out, dest, data, hole - data)?;
        pos = hole;
    }
    Ok(())
}

fn copy_range(
    src: &File,
    source: &Path,
    out: &File,
    dest: &Path,
    start: u64,
    len: u64,
) -> Result<(), Error> {
    let mut done = 0u64;
    while done < len {
        let mut off_in = start + done;
        let mut off_out = start + done;
        let want = usize::try_from(len - done)
            .unwrap_or(usize::MAX)
            .min(1 << 30);
        match rustix::fs::copy_file_range(src, Some(&mut off_in), out, Some(&mut off_out), want) {
            Ok(0) => break, // the source shrank
            Ok(n) => done += n as u64,
            Err(_) => return copy_range_rw(src, source, out, dest, start + done, len - done),
        }
    }
    Ok(())
}

/// Plain read/write, for kernels or file systems without `copy_file_range`.
fn copy_range_rw(
    src: &File,
    source: &Path,
    out: &File,
    dest: &Path,
    start: u64,
    len: u64,
) -> Result<(), Error> {
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        let got = src
            .read_at(&mut buf[..n], start + done)
            .map_err(io(source))?;
        if got == 0 {
            break;
        }
        out.write_all_at(&buf[..got], start + done)
            .map_err(io(dest))?;
        done += got as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom as StdSeek, Write};

    #[test]
    fn copy_keeps_content_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        let mut f = File::create(&img).unwrap();
        f.set_len(64 << 20).unwrap();
        f.seek(StdSeek::Start(10 << 20)).unwrap();
        f.write_all(&[1u8; 4096]).unwrap();
        f.seek(StdSeek::Start((64 << 20) - 10)).unwrap();
        f.write_all(b"0123456789").unwrap();
        drop(f);
        let snap = take(&img, &dir.path().join("s/disk.snap"), Provider::Copy).unwrap();
        assert_eq!(snap.provider(), Provider::Copy);
        assert_eq!(
            std::fs::read(&img).unwrap(),
            std::fs::read(snap.path()).unwrap()
        );
        let blocks = rustix::fs::stat(snap.path()).unwrap().st_blocks as u64 * 512;
        assert!(
            blocks < 1 << 20,
            "snapshot is sparse: {blocks} bytes allocated"
        );
        let p = snap.path().to_path_buf();
        drop(snap);
        assert!(!p.exists(), "drop removes the snapshot");
    }

    #[test]
    fn keep_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        std::fs::write(&img, b"abc").unwrap();
        let kept = take(&img, &dir.path().join("k.snap"), Provider::Auto)
            .unwrap()
            .keep();
        assert!(kept.exists());
        let e = take(&img, &kept, Provider::Copy).unwrap_err();
        assert!(matches!(e, Error::Exists { .. }), "{e}");
        let e = take(dir.path(), &dir.path().join("x"), Provider::Copy).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        assert!("zfs".parse::<Provider>().is_err());
    }
}
