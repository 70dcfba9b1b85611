//! Files from a recovery point without restoring the disk: `list`, `cat` and `get` of paths in
//! an ext2/3/4 file system on the whole disk or on one of its partitions.
//!
//! The file system is read in user space by the read-only, memory-safe `ext4-view` parser,
//! through a [`PointDisk`]: only the vault blocks the request touches are fetched. The host
//! kernel never mounts it. [`get`] writes below its target directory only: every directory
//! is opened with `O_NOFOLLOW` relative to its parent, every new file and link is created
//! exclusively, guest names containing `/` or equal to `.`/`..` are refused, and symlinks are
//! recreated as symlinks (never followed on the host, whatever their target). Each requested
//! path is recreated under the target with its full guest path (`/etc/hosts` →
//! `TO/etc/hosts`).

use std::collections::HashSet;
use std::ffi::OsStr;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bulwark_vault::Vault;
use ext4_view::{Ext4, Ext4Error, FileType, Metadata};
use rustix::fs::{AtFlags, Mode, OFlags, Timespec, Timestamps};
use serde::Serialize;

use crate::Error;
use crate::disk::{BlockingReader, DiskOptions, FetchStats, PointDisk};
use crate::inode::{Locator, Times, check_geometry, inode_from_debug};
use crate::partition::{Scheme, read_table};

/// Most entries one `list` returns, and most nodes one `get` writes.
const MAX_ENTRIES: u64 = 10_000_000;
/// Deepest directory nesting `get` follows.
const MAX_DEPTH: u32 = 256;
/// The longest symlink target read (PATH_MAX).
const MAX_LINK: u64 = 4096;
/// Symlinks followed while resolving one path (Linux's limit).
const MAX_LINKS: u32 = 40;
/// ext4's root directory inode.
const ROOT_INODE: u32 = 2;
/// Bytes copied per write.
const COPY_CHUNK: usize = 256 << 10;

/// Which file system to read: one disk of one point, the whole disk or a partition.
#[derive(Debug, Clone)]
pub struct Source {
    /// The VM.
    pub vm: String,
    /// `latest` or a point id.
    pub point: String,
    /// The disk's name.
    pub disk: String,
    /// The partition number (MBR slot or GPT entry), or `None` for the whole disk.
    pub partition: Option<u32>,
    /// Cache and fetch settings of the disk reader.
    pub options: DiskOptions,
}

/// What `get` does with what it writes.
#[derive(Debug, Clone, Copy, Default)]
pub struct GetOptions {
    /// Give files their guest owner and group (needs root). Without it, set-user-ID and
    /// set-group-ID bits are dropped.
    pub owner: bool,
}

/// What a request did.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The VM.
    pub vm: String,
    /// The point read.
    pub point: String,
    /// The disk read.
    pub disk: String,
    /// The partition read, if any.
    pub partition: Option<u32>,
    /// Regular files written (`get`) or listed (`list`).
    pub files: u64,
    /// Directories.
    pub dirs: u64,
    /// Symbolic links.
    pub symlinks: u64,
    /// Guest paths skipped (devices, FIFOs, sockets), with why.
    pub skipped: Vec<String>,
    /// File bytes written (`get`, `cat`).
    pub bytes_written: u64,
    /// Vault blocks fetched and verified.
    pub fetch: FetchStats,
    /// Bytes received from the vault's store (manifest, blocks, as stored), when known.
    pub vault_bytes_down: u64,
}

/// What kind of node an [`Entry`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// A device, FIFO or socket.
    Other,
}

/// One listed node.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// Its guest path (lossy UTF-8).
    pub path: String,
    /// Its kind.
    pub kind: Kind,
    /// Permission bits (with set-ID and sticky bits).
    pub mode: u16,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, seconds since the epoch (when the inode could be read).
    pub mtime: Option<i64>,
    /// A symlink's target (lossy UTF-8).
    pub target: Option<String>,
}

fn kind_of(md: &Metadata) -> Kind {
    match md.file_type() {
        FileType::Regular => Kind::File,
        FileType::Directory => Kind::Dir,
        FileType::Symlink => Kind::Symlink,
        _ => Kind::Other,
    }
}

/// Lists `path`: the entries of a directory (without `.` and `..`), or the node itself.
pub async fn list(vault: &Vault, src: &Source, path: &str) -> Result<(Vec<Entry>, Report), Error> {
    let comps = guest_components(path)?;
    let opened = Opened::open(vault, src).await?;
    let (entries, mut report) = opened
        .with_fs(move |fs, mut report| {
            let gpath = fs.resolve(&comps, false)?;
            let md = fs.symlink_metadata(&gpath)?;
            let mut out = Vec::new();
            if md.is_dir() {
                for entry in fs.fs.read_dir(&gpath).map_err(|e| fs.err(&gpath, e))? {
                    let entry = entry.map_err(|e| fs.err(&gpath, e))?;
                    let name = entry.file_name();
                    if name.as_ref() == b"." || name.as_ref() == b".." {
                        continue;
                    }
                    if out.len() as u64 >= MAX_ENTRIES {
                        return Err(Error::Limit {
                            what: format!("entries in {}", gpath.display()),
                            limit: MAX_ENTRIES,
                        });
                    }
                    let child = entry.path();
                    let md = entry.metadata().map_err(|e| fs.err(&child, e))?;
                    let ino = inode_from_debug(&format!("{entry:?}"));
                    out.push(fs.entry(&child, &md, ino, &mut report)?);
                }
            } else {
                let ino = fs.inode_of(&gpath, &md);
                out.push(fs.entry(&gpath, &md, ino, &mut report)?);
            }
            Ok((out, report))
        })
        .await?;
    opened.finish(&mut report);
    Ok((entries, report))
}

/// Writes the regular file `path` to `writer` (returned back with the report).
pub async fn cat<W: Write + Send + 'static>(
    vault: &Vault,
    src: &Source,
    path: &str,
    writer: W,
) -> Result<(W, Report), Error> {
    let comps = guest_components(path)?;
    let opened = Opened::open(vault, src).await?;
    let (writer, mut report) = opened
        .with_fs(move |fs, mut report| {
            let gpath = fs.resolve(&comps, true)?;
            let mut writer = writer;
            let mut file = fs.fs.open(&gpath).map_err(|e| fs.err(&gpath, e))?;
            fs.check_size(&gpath, file.metadata().len())?;
            let mut buf = vec![0u8; COPY_CHUNK];
            loop {
                let n = fill(fs, &gpath, &mut file, &mut buf)?;
                if n == 0 {
                    break;
                }
                writer.write_all(&buf[..n]).map_err(|source| Error::Io {
                    path: PathBuf::from("-"),
                    source,
                })?;
                report.bytes_written += n as u64;
            }
            writer.flush().map_err(|source| Error::Io {
                path: PathBuf::from("-"),
                source,
            })?;
            report.files = 1;
            Ok((writer, report))
        })
        .await?;
    opened.finish(&mut report);
    Ok((writer, report))
}

/// Copies each of `paths` (files, symlinks, whole directories) to the directory `to`, which
/// must exist: `/a/b` becomes `to/a/b`. Keeps modes, times, symlinks and (with
/// [`GetOptions::owner`]) owners. Refuses to replace anything already there.
pub async fn get(
    vault: &Vault,
    src: &Source,
    paths: &[String],
    to: &Path,
    options: GetOptions,
) -> Result<Report, Error> {
    let wanted = paths
        .iter()
        .map(|p| guest_components(p))
        .collect::<Result<Vec<_>, _>>()?;
    let io = |source| Error::Io {
        path: to.to_path_buf(),
        source,
    };
    let root = rustix::fs::open(
        to,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io(e.into()))?;
    let to = to.to_path_buf();
    let opened = Opened::open(vault, src).await?;
    let mut report = opened
        .with_fs(move |fs, mut report| {
            let mut budget = MAX_ENTRIES;
            let mut dirs = HashSet::new();
            for comps in wanted {
                let mut w = Writer {
                    fs,
                    options,
                    report: &mut report,
                    budget: &mut budget,
                    dirs: &mut dirs,
                };
                let mut host = to.clone();
                let Some((last, parents)) = comps.split_last() else {
                    // The root directory: its contents go straight into `to`.
                    w.dirs.insert(ROOT_INODE);
                    let fd = root.try_clone().map_err(|source| Error::Io {
                        path: host.clone(),
                        source,
                    })?;
                    let frame = w.frame(to_guest(&[]), fd, host, 0, None)?;
                    w.walk(frame)?;
                    continue;
                };
                let mut dir = root.try_clone().map_err(|source| Error::Io {
                    path: host.clone(),
                    source,
                })?;
                for c in parents {
                    host.push(OsStr::from_bytes(c));
                    dir = host_dir(&dir, c, &host, true)?;
                }
                let gpath = fs.resolve(&comps, false)?;
                if let Some(frame) = w.node(&gpath, &dir, last, &host, None, 0)? {
                    w.walk(frame)?;
                }
            }
            Ok(report)
        })
        .await?;
    opened.finish(&mut report);
    Ok(report)
}

/// A disk opened for a request: the reader, the window of the file system, the report.
struct Opened {
    disk: PointDisk,
    vault: Vault,
    start: u64,
    len: u64,
    label: String,
    hint: Option<String>,
    report: Report,
    store_before: u64,
}

impl Opened {
    async fn open(vault: &Vault, src: &Source) -> Result<Opened, Error> {
        let store_before = vault.store_stats().bytes_down;
        let point = vault.resolve_point(&src.vm, &src.point).await?;
        let map = vault.disk_manifest(&point, &src.disk).await?;
        let mut label = format!("{}/{}/{}", src.vm, point.id, src.disk);
        let disk = PointDisk::from_map(vault.clone(), map, label.clone(), src.options.clone());
        let mut hint = None;
        let (start, len) = match src.partition {
            Some(n) => {
                let table = read_table(&disk).await?;
                let part = table.get(&label, n)?;
                label = format!("{label} partition {n}");
                (part.start, part.len)
            }
            None => {
                if let Ok(table) = read_table(&disk).await
                    && table.scheme != Scheme::None
                    && !table.partitions.is_empty()
                {
                    hint = Some(format!(
                        " (the disk has a partition table with partitions {}: choose one with --partition N)",
                        table
                            .partitions
                            .iter()
                            .map(|p| p.number.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
                (0, disk.size())
            }
        };
        let report = Report {
            vm: src.vm.clone(),
            point: point.id.clone(),
            disk: src.disk.clone(),
            partition: src.partition,
            files: 0,
            dirs: 0,
            symlinks: 0,
            skipped: Vec::new(),
            bytes_written: 0,
            fetch: FetchStats::default(),
            vault_bytes_down: 0,
        };
        Ok(Opened {
            disk,
            vault: vault.clone(),
            start,
            len,
            label,
            hint,
            report,
            store_before,
        })
    }

    /// Runs `f` on the loaded file system, on the blocking pool (the parser's reads are
    /// synchronous and its handle is not `Send`).
    async fn with_fs<T, F>(&self, f: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&Fs, Report) -> Result<T, Error> + Send + 'static,
    {
        let reader = self
            .disk
            .blocking(tokio::runtime::Handle::current(), self.start, self.len)?;
        let label = self.label.clone();
        let hint = self.hint.clone();
        let report = self.report.clone();
        let volume = self.len;
        tokio::task::spawn_blocking(move || {
            check_geometry(&reader)?;
            let fs = Ext4::load(Box::new(reader.clone())).map_err(|e| Error::Fs {
                disk: label.clone(),
                path: String::new(),
                why: format!(
                    "not a readable ext2/3/4 file system: {e}{}",
                    hint.unwrap_or_default()
                ),
            })?;
            let locator = Locator::new(&reader).ok();
            f(
                &Fs {
                    fs,
                    reader,
                    locator,
                    label,
                    volume,
                },
                report,
            )
        })
        .await
        .map_err(|e| Error::Worker(e.to_string()))?
    }

    fn finish(&self, report: &mut Report) {
        report.fetch = self.disk.stats();
        report.vault_bytes_down = self
            .vault
            .store_stats()
            .bytes_down
            .saturating_sub(self.store_before);
    }
}

/// The loaded file system, on a blocking thread.
struct Fs {
    fs: Ext4,
    reader: BlockingReader,
    locator: Option<Locator>,
    label: String,
    /// Bytes of the file system's volume (the disk, or the partition).
    volume: u64,
}

impl Fs {
    /// Refuses a regular file that claims more bytes than the whole volume holds: a damaged
    /// inode (or a hostile sparse file) would otherwise have `cat` and `get` stream zeros for
    /// hours. Checked before anything is written.
    fn check_size(&self, path: &ext4_view::PathBuf, size: u64) -> Result<(), Error> {
        if size > self.volume {
            return Err(Error::Fs {
                disk: self.label.clone(),
                path: path.display().to_string(),
                why: format!(
                    "the file claims {size} bytes, more than its whole file system ({} bytes): \
                     a damaged inode or a sparse file larger than the disk; refused",
                    self.volume
                ),
            });
        }
        Ok(())
    }

    /// The target of the symlink at `path`, refused before it is read when the inode claims
    /// more than a path can hold (the parser allocates the claimed size at once).
    fn read_link(
        &self,
        path: &ext4_view::PathBuf,
        md: &Metadata,
    ) -> Result<ext4_view::PathBuf, Error> {
        if md.len() > MAX_LINK {
            return Err(Error::Fs {
                disk: self.label.clone(),
                path: path.display().to_string(),
                why: format!(
                    "the symlink claims a {}-byte target, more than a path's {MAX_LINK}: a \
                     damaged inode; refused",
                    md.len()
                ),
            });
        }
        self.fs.read_link(path).map_err(|e| self.err(path, e))
    }

    /// Resolves a path asked for by the user into one without symlinks, reading each link
    /// through [`Fs::read_link`]: the parser would otherwise follow links itself, reading a
    /// damaged one whole. The last name is followed only with `follow_last`.
    fn resolve(&self, comps: &[Vec<u8>], follow_last: bool) -> Result<ext4_view::PathBuf, Error> {
        let mut out: Vec<Vec<u8>> = Vec::new();
        let mut todo: std::collections::VecDeque<Vec<u8>> = comps.iter().cloned().collect();
        let mut links = 0u32;
        while let Some(c) = todo.pop_front() {
            match c.as_slice() {
                b"" | b"." => continue,
                b".." => {
                    out.pop();
                    continue;
                }
                _ => out.push(c),
            }
            if todo.is_empty() && !follow_last {
                break;
            }
            let here = to_guest(&out);
            let md = self.symlink_metadata(&here)?;
            if md.file_type() != FileType::Symlink {
                continue;
            }
            links += 1;
            if links > MAX_LINKS {
                return Err(Error::Fs {
                    disk: self.label.clone(),
                    path: here.display().to_string(),
                    why: format!("more than {MAX_LINKS} symlinks on the way: a loop"),
                });
            }
            let target = self.read_link(&here, &md)?;
            let target: &[u8] = target.as_ref();
            out.pop();
            if target.starts_with(b"/") {
                out.clear();
            }
            for name in target.split(|b| *b == b'/').rev() {
                todo.push_front(name.to_vec());
            }
        }
        Ok(to_guest(&out))
    }

    fn err(&self, path: &ext4_view::PathBuf, e: Ext4Error) -> Error {
        Error::Fs {
            disk: self.label.clone(),
            path: path.display().to_string(),
            why: e.to_string(),
        }
    }

    fn symlink_metadata(&self, path: &ext4_view::PathBuf) -> Result<Metadata, Error> {
        self.fs
            .symlink_metadata(path)
            .map_err(|e| self.err(path, e))
    }

    fn times(&self, ino: Option<u32>) -> Option<Times> {
        let ino = ino?;
        self.locator.as_ref()?.times(&self.reader, ino).ok()
    }

    /// The inode number of `path`: from an opened file, or from its entry in its parent.
    fn inode_of(&self, path: &ext4_view::PathBuf, md: &Metadata) -> Option<u32> {
        if md.file_type() == FileType::Regular {
            let file = self.fs.open(path).ok()?;
            return inode_from_debug(&format!("{file:?}"));
        }
        let bytes: &[u8] = path.as_ref();
        let cut = bytes.iter().rposition(|b| *b == b'/')?;
        let (parent, name) = (&bytes[..cut.max(1)], &bytes[cut + 1..]);
        if name.is_empty() {
            return Some(ROOT_INODE);
        }
        let parent = ext4_view::PathBuf::try_from(parent).ok()?;
        let entries = self.fs.read_dir(&parent).ok()?;
        for entry in entries.take(MAX_ENTRIES as usize) {
            let entry = entry.ok()?;
            if entry.file_name().as_ref() == name {
                return inode_from_debug(&format!("{entry:?}"));
            }
        }
        None
    }

    fn entry(
        &self,
        path: &ext4_view::PathBuf,
        md: &Metadata,
        ino: Option<u32>,
        report: &mut Report,
    ) -> Result<Entry, Error> {
        let kind = kind_of(md);
        let target = if kind == Kind::Symlink {
            let t = self.read_link(path, md)?;
            Some(String::from_utf8_lossy(t.as_ref()).into_owned())
        } else {
            None
        };
        match kind {
            Kind::File => report.files += 1,
            Kind::Dir => report.dirs += 1,
            Kind::Symlink => report.symlinks += 1,
            Kind::Other => {}
        }
        Ok(Entry {
            path: path.display().to_string(),
            kind,
            mode: md.mode(),
            uid: md.uid(),
            gid: md.gid(),
            size: md.len(),
            mtime: self.times(ino).map(|t| t.mtime.0),
            target,
        })
    }
}

/// Fills `buf` from `file` (the parser returns at most one block per call); 0 at the end.
fn fill(
    fs: &Fs,
    path: &ext4_view::PathBuf,
    file: &mut ext4_view::File,
    buf: &mut [u8],
) -> Result<usize, Error> {
    let mut n = 0;
    while n < buf.len() {
        let got = file
            .read_bytes(&mut buf[n..])
            .map_err(|e| fs.err(path, e))?;
        if got == 0 {
            break;
        }
        n += got;
    }
    Ok(n)
}

/// Splits a guest path into its names: absolute or relative to the root, `.` and empty
/// names ignored, `..` refused (a path is never resolved upwards).
pub fn guest_components(path: &str) -> Result<Vec<Vec<u8>>, Error> {
    let mut out = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                return Err(Error::UnsafePath {
                    path: path.to_string(),
                    why: "`..` is not allowed".into(),
                });
            }
            c if c.contains('\0') => {
                return Err(Error::UnsafePath {
                    path: path.to_string(),
                    why: "contains a NUL byte".into(),
                });
            }
            c => out.push(c.as_bytes().to_vec()),
        }
    }
    Ok(out)
}

fn to_guest(comps: &[Vec<u8>]) -> ext4_view::PathBuf {
    let mut p = ext4_view::PathBuf::new("/");
    for c in comps {
        p.push(c);
    }
    p
}

/// Checks a name read from the guest before it names anything on the host.
fn safe_name(name: &[u8], parent: &Path) -> Result<(), Error> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(Error::UnsafePath {
            path: parent.join(OsStr::from_bytes(name)).display().to_string(),
            why: "the guest file system holds a name that is not a single path component".into(),
        });
    }
    Ok(())
}

/// Opens (creating it if needed, when `create`) the directory `name` in `parent`, never
/// following a symlink.
fn host_dir(parent: &OwnedFd, name: &[u8], host: &Path, create: bool) -> Result<OwnedFd, Error> {
    let io = |e: rustix::io::Errno| Error::Io {
        path: host.to_path_buf(),
        source: e.into(),
    };
    if create {
        match rustix::fs::mkdirat(parent, OsStr::from_bytes(name), Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(io(e)),
        }
    }
    rustix::fs::openat(
        parent,
        OsStr::from_bytes(name),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR => Error::UnsafePath {
            path: host.display().to_string(),
            why: "exists on the host and is not a directory (a symlink is never followed)".into(),
        },
        e => io(e),
    })
}

fn timespec((secs, nanos): (i64, u32)) -> Timespec {
    Timespec {
        tv_sec: secs,
        tv_nsec: i64::from(nanos.min(999_999_999)),
    }
}

struct Writer<'a> {
    fs: &'a Fs,
    options: GetOptions,
    report: &'a mut Report,
    budget: &'a mut u64,
    /// Inodes of the directories written so far. ext4 has no directory hard links, so a
    /// directory reached twice is a loop in a damaged file system: without this, two entries
    /// pointing back at an ancestor make `get` write 2^depth copies.
    dirs: &'a mut HashSet<u32>,
}

/// A guest directory being written by [`Writer::walk`].
struct Frame {
    entries: ext4_view::ReadDir,
    gpath: ext4_view::PathBuf,
    fd: OwnedFd,
    host: PathBuf,
    depth: u32,
    finish: Option<(Metadata, Option<u32>)>,
}

impl Writer<'_> {
    /// Writes the node at guest `gpath` as `name` in the host directory `dir` (`host` is its
    /// host path, for messages).
    fn node(
        &mut self,
        gpath: &ext4_view::PathBuf,
        dir: &OwnedFd,
        name: &[u8],
        host_parent: &Path,
        ino: Option<u32>,
        depth: u32,
    ) -> Result<Option<Frame>, Error> {
        safe_name(name, host_parent)?;
        if *self.budget == 0 {
            return Err(Error::Limit {
                what: "nodes written by one get".into(),
                limit: MAX_ENTRIES,
            });
        }
        *self.budget -= 1;
        let host = host_parent.join(OsStr::from_bytes(name));
        let md = self.fs.symlink_metadata(gpath)?;
        let io = |e: rustix::io::Errno| Error::Io {
            path: host.clone(),
            source: e.into(),
        };
        match md.file_type() {
            FileType::Regular => {
                self.fs.check_size(gpath, md.len())?;
                let mut file = self.fs.fs.open(gpath).map_err(|e| self.fs.err(gpath, e))?;
                let ino = ino.or_else(|| inode_from_debug(&format!("{file:?}")));
                let fd = rustix::fs::openat(
                    dir,
                    OsStr::from_bytes(name),
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(io)?;
                let out = std::fs::File::from(fd);
                let mut buf = vec![0u8; COPY_CHUNK];
                let mut at = 0u64;
                loop {
                    let n = fill(self.fs, gpath, &mut file, &mut buf)?;
                    if n == 0 {
                        break;
                    }
                    // All-zero chunks stay holes.
                    if buf[..n].iter().any(|b| *b != 0) {
                        out.write_all_at(&buf[..n], at)
                            .map_err(|source| Error::Io {
                                path: host.clone(),
                                source,
                            })?;
                    }
                    at += n as u64;
                }
                out.set_len(at).map_err(|source| Error::Io {
                    path: host.clone(),
                    source,
                })?;
                self.report.bytes_written += at;
                self.report.files += 1;
                self.apply_fd(out.as_fd(), &md, ino, &host)?;
            }
            FileType::Symlink => {
                let target = self.fs.read_link(gpath, &md)?;
                let target: &[u8] = target.as_ref();
                rustix::fs::symlinkat(OsStr::from_bytes(target), dir, OsStr::from_bytes(name))
                    .map_err(io)?;
                let ino = ino.or_else(|| self.fs.inode_of(gpath, &md));
                if self.options.owner {
                    rustix::fs::chownat(
                        dir,
                        OsStr::from_bytes(name),
                        Some(rustix::fs::Uid::from_raw(md.uid())),
                        Some(rustix::fs::Gid::from_raw(md.gid())),
                        AtFlags::SYMLINK_NOFOLLOW,
                    )
                    .map_err(io)?;
                }
                if let Some(t) = self.fs.times(ino) {
                    let ts = Timestamps {
                        last_access: timespec(t.atime),
                        last_modification: timespec(t.mtime),
                    };
                    rustix::fs::utimensat(
                        dir,
                        OsStr::from_bytes(name),
                        &ts,
                        AtFlags::SYMLINK_NOFOLLOW,
                    )
                    .map_err(io)?;
                }
                self.report.symlinks += 1;
            }
            FileType::Directory => {
                if depth >= MAX_DEPTH {
                    return Err(Error::Limit {
                        what: format!("directory depth at {}", gpath.display()),
                        limit: u64::from(MAX_DEPTH),
                    });
                }
                let ino = ino.or_else(|| self.fs.inode_of(gpath, &md));
                if let Some(ino) = ino {
                    if !self.dirs.insert(ino) {
                        self.report.skipped.push(format!(
                            "{}: directory inode {ino} was already copied (a directory loop or \
                             hard link: the file system is damaged); not copied again",
                            gpath.display()
                        ));
                        return Ok(None);
                    }
                }
                let sub = host_dir(dir, name, &host, true)?;
                return self
                    .frame(gpath.clone(), sub, host, depth + 1, Some((md, ino)))
                    .map(Some);
            }
            other => self
                .report
                .skipped
                .push(format!("{}: {other:?} not copied", gpath.display())),
        }
        Ok(None)
    }

    /// An open guest directory `gpath` whose entries go into the host directory `fd`.
    /// `finish` is the directory's own metadata, applied once its entries are written (`None`
    /// for the directory that `get` writes into).
    fn frame(
        &self,
        gpath: ext4_view::PathBuf,
        fd: OwnedFd,
        host: PathBuf,
        depth: u32,
        finish: Option<(Metadata, Option<u32>)>,
    ) -> Result<Frame, Error> {
        let entries = self
            .fs
            .fs
            .read_dir(&gpath)
            .map_err(|e| self.fs.err(&gpath, e))?;
        Ok(Frame {
            entries,
            gpath,
            fd,
            host,
            depth,
            finish,
        })
    }

    /// Writes the tree below `root`, depth first, with an explicit stack: a deep guest tree
    /// must not overflow the blocking thread's stack (a recursion did, at ~100 levels in a
    /// debug build, aborting the whole process).
    fn walk(&mut self, root: Frame) -> Result<(), Error> {
        let mut stack = vec![root];
        while let Some(top) = stack.last_mut() {
            let Some(entry) = top.entries.next() else {
                if let Some(done) = stack.pop() {
                    if let Some((md, ino)) = done.finish {
                        self.report.dirs += 1;
                        self.apply_fd(done.fd.as_fd(), &md, ino, &done.host)?;
                    }
                }
                continue;
            };
            let entry = entry.map_err(|e| self.fs.err(&top.gpath, e))?;
            let name = entry.file_name();
            let name: &[u8] = name.as_ref();
            if name == b"." || name == b".." {
                continue;
            }
            let ino = inode_from_debug(&format!("{entry:?}"));
            let next = self.node(&entry.path(), &top.fd, name, &top.host, ino, top.depth)?;
            if let Some(frame) = next {
                stack.push(frame);
            }
        }
        Ok(())
    }

    /// Owner, mode and times of a file or directory written through `fd`.
    fn apply_fd(
        &self,
        fd: std::os::fd::BorrowedFd<'_>,
        md: &Metadata,
        ino: Option<u32>,
        host: &Path,
    ) -> Result<(), Error> {
        let io = |e: rustix::io::Errno| Error::Io {
            path: host.to_path_buf(),
            source: e.into(),
        };
        let mut mode = u32::from(md.mode()) & 0o7777;
        if self.options.owner {
            rustix::fs::fchown(
                fd,
                Some(rustix::fs::Uid::from_raw(md.uid())),
                Some(rustix::fs::Gid::from_raw(md.gid())),
            )
            .map_err(io)?;
        } else {
            mode &= 0o1777;
        }
        rustix::fs::fchmod(fd, Mode::from_raw_mode(mode)).map_err(io)?;
        if let Some(t) = self.fs.times(ino) {
            let ts = Timestamps {
                last_access: timespec(t.atime),
                last_modification: timespec(t.mtime),
            };
            rustix::fs::futimens(fd, &ts).map_err(io)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_paths_never_go_up() {
        assert_eq!(
            guest_components("/etc//./hosts").unwrap(),
            vec![b"etc".to_vec(), b"hosts".to_vec()]
        );
        assert!(guest_components("/").unwrap().is_empty());
        assert!(matches!(
            guest_components("/etc/../../x"),
            Err(Error::UnsafePath { .. })
        ));
    }

    #[test]
    fn names_from_the_guest_are_single_components() {
        let p = Path::new("/t");
        assert!(safe_name(b"ok", p).is_ok());
        for bad in [&b""[..], b".", b"..", b"a/b", b"a\0b"] {
            assert!(safe_name(bad, p).is_err(), "{bad:?}");
        }
    }
}
