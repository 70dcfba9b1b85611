//! Which disk source a backup reads, chosen in one place for the CLI and the daemon:
//!
//! * a running VM (`qmp = unix:PATH`): [`bulwark_qemu::QemuSnapshotter`] — one QMP transaction
//!   for every disk, read over NBD, dirty-bitmap change tracking; `disks` are block device
//!   names as `query-block` reports them (none: every writable disk);
//! * image files (`disks` are `[NAME=]PATH`, no VM running):
//!   - a qcow2 image (found by its magic) always through [`bulwark_qemu::OfflineSnapshotter`]
//!     (`qemu-storage-daemon`, QEMU's image locks, a read-only export): the vault stores what
//!     the guest sees, never qcow2 file bytes; a persistent dirty bitmap left in the image
//!     tracks the changes for the next backup (off with `change_tracking: false`);
//!   - a raw image: with [`SnapshotMode::Auto`], a reflink snapshot with extent change tracking
//!     where the file system is XFS or btrfs ([`bulwark_snapshot::ImageSnapshotter`]), else read
//!     directly in place while Bulwark holds QEMU's image locks on it
//!     ([`bulwark_qemu::ImageLock`]; no copy of the disk is made, no qemu-storage-daemon);
//!     `reflink` and `copy` when asked for; `in-place` always in place.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use bulwark_qemu::{OfflineOptions, OfflineSnapshotter, QemuOptions, QemuSnapshotter};
use bulwark_snapshot::{
    DiskSource, ImageDisk, ImageSnapshotter, PendingSnapshot, Provider, Snapshotter,
};

use crate::Error;

/// How image files are snapshotted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SnapshotMode {
    /// qcow2 through QEMU's tools; raw: reflink on XFS/btrfs, else in place (locked), or a
    /// sparse copy when snapshots are to be kept.
    #[default]
    Auto,
    /// Reflink clone (raw images only); fails where the file system cannot.
    Reflink,
    /// Sparse copy of the image (raw images only): costs a disk's worth of writes.
    Copy,
    /// No snapshot: qcow2 through `qemu-storage-daemon`, raw read directly; either way locked
    /// the way QEMU locks images for as long as the backup reads.
    InPlace,
}

impl fmt::Display for SnapshotMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SnapshotMode::Auto => "auto",
            SnapshotMode::Reflink => "reflink",
            SnapshotMode::Copy => "copy",
            SnapshotMode::InPlace => "in-place",
        })
    }
}

impl FromStr for SnapshotMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "auto" => Ok(SnapshotMode::Auto),
            "reflink" => Ok(SnapshotMode::Reflink),
            "copy" => Ok(SnapshotMode::Copy),
            "in-place" => Ok(SnapshotMode::InPlace),
            other => Err(Error::Source {
                why: format!("unknown snapshot mode {other:?} (auto, reflink, copy or in-place)"),
            }),
        }
    }
}

/// What a backup reads: a running VM's QMP socket, or image files.
#[derive(Debug, Clone)]
pub struct SourceSpec {
    /// The VM's QMP socket (`unix:PATH`): back up the running VM through QEMU.
    pub qmp: Option<String>,
    /// With `qmp`: block device names (empty: every writable disk). Without: `[NAME=]PATH`.
    pub disks: Vec<String>,
    /// How image files are snapshotted (not for a running VM).
    pub mode: SnapshotMode,
    /// Where reflink/copy snapshots go (default: beside each image).
    pub snapshot_dir: Option<PathBuf>,
    /// Keep a base for extent change tracking (reflink snapshots).
    pub change_tracking: bool,
    /// Directory for the NBD sockets of QEMU's exports (a private runtime directory).
    pub socket_dir: PathBuf,
    /// Snapshots are to be kept on the host (instant-restore tier): `auto` then copies a raw
    /// image where it cannot reflink it, since an image read in place leaves no file to keep.
    pub keep_snapshots: bool,
}

impl SourceSpec {
    /// Image files `disks` (`[NAME=]PATH`), auto mode, sockets in `socket_dir`.
    pub fn images(disks: Vec<String>, socket_dir: impl Into<PathBuf>) -> Self {
        SourceSpec {
            qmp: None,
            disks,
            mode: SnapshotMode::Auto,
            snapshot_dir: None,
            change_tracking: true,
            socket_dir: socket_dir.into(),
            keep_snapshots: false,
        }
    }

    /// The running VM behind `qmp` (`unix:PATH`): its disks `disks` (empty: every writable one).
    pub fn vm(qmp: impl Into<String>, disks: Vec<String>, socket_dir: impl Into<PathBuf>) -> Self {
        SourceSpec {
            qmp: Some(qmp.into()),
            ..SourceSpec::images(disks, socket_dir)
        }
    }
}

fn is_qcow2(path: &Path) -> Result<bool, Error> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(f.read_exact(&mut magic).is_ok() && &magic == b"QFI\xfb")
}

/// XFS or btrfs: where a reflink is instant and its extents can be trusted for tracking.
fn reflink_fs(path: &Path) -> bool {
    const XFS: u64 = 0x5846_5342;
    const BTRFS: u64 = 0x9123_683e;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    rustix::fs::statfs(dir.unwrap_or(Path::new(".")))
        .map(|s| matches!(s.f_type as u64, XFS | BTRFS))
        .unwrap_or(false)
}

/// The snapshotter for `spec`. Errors name the disk or option that is wrong.
pub fn snapshotter(spec: &SourceSpec) -> Result<Arc<dyn Snapshotter>, Error> {
    if let Some(qmp) = &spec.qmp {
        if let Some(d) = spec
            .disks
            .iter()
            .find(|d| d.contains('=') || d.contains('/'))
        {
            return Err(Error::Source {
                why: format!(
                    "disk {d:?}: with a QMP socket, disks are the VM's block device names (e.g. --disk os), not NAME=PATH"
                ),
            });
        }
        if spec.mode != SnapshotMode::Auto {
            return Err(Error::Source {
                why: format!(
                    "--snapshot {} is for image files; a running VM's point in time comes from QEMU",
                    spec.mode
                ),
            });
        }
        let mut options = QemuOptions::new(qmp.clone(), &spec.socket_dir);
        options.fleece.disks = spec.disks.clone();
        return Ok(Arc::new(QemuSnapshotter::new(options)));
    }
    if spec.disks.is_empty() {
        return Err(Error::Source {
            why: "no disk given (--disk NAME=PATH, or --qmp for a running VM)".into(),
        });
    }
    let disks = spec
        .disks
        .iter()
        .map(|d| ImageDisk::parse(d))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| Error::Snapshot {
            vm: String::new(),
            source,
        })?;
    let mut in_place = Vec::new();
    let mut image = Vec::new();
    for d in disks {
        let qcow2 = is_qcow2(&d.path)?;
        match spec.mode {
            SnapshotMode::Reflink | SnapshotMode::Copy if qcow2 => {
                return Err(Error::Source {
                    why: format!(
                        "disk {}: {} is a qcow2 image; --snapshot {} would store its file bytes, not the guest's disk (use auto or in-place)",
                        d.name,
                        d.path.display(),
                        spec.mode
                    ),
                });
            }
            SnapshotMode::Reflink | SnapshotMode::Copy => image.push(d),
            SnapshotMode::InPlace => in_place.push(d),
            SnapshotMode::Auto if !qcow2 && (spec.keep_snapshots || reflink_fs(&d.path)) => {
                image.push(d)
            }
            SnapshotMode::Auto => in_place.push(d),
        }
    }
    let mut parts: Vec<Arc<dyn Snapshotter>> = Vec::new();
    if !image.is_empty() {
        let mut s = ImageSnapshotter::new(image).map_err(|source| Error::Snapshot {
            vm: String::new(),
            source,
        })?;
        s.provider = match spec.mode {
            SnapshotMode::Copy => Provider::Copy,
            SnapshotMode::Reflink => Provider::Reflink,
            _ => Provider::Auto,
        };
        s.dir = spec.snapshot_dir.clone();
        s.change_tracking = spec.change_tracking;
        parts.push(Arc::new(s));
    }
    if !in_place.is_empty() {
        let mut options = OfflineOptions::new(
            in_place.into_iter().map(|d| (d.name, d.path)).collect(),
            &spec.socket_dir,
        );
        // A qcow2 image keeps a persistent dirty bitmap for the next backup (raw: read in full).
        options.track_qcow2 = spec.change_tracking;
        parts.push(Arc::new(OfflineSnapshotter::new(options)));
    }
    Ok(match parts.len() {
        1 => parts.remove(0),
        _ => Arc::new(Several(parts)),
    })
}

/// Image files of one VM split over two snapshotters (no VM runs: any order is one instant).
#[derive(Debug)]
struct Several(Vec<Arc<dyn Snapshotter>>);

#[async_trait::async_trait]
impl Snapshotter for Several {
    async fn prepare(
        &self,
        vm: &str,
        point: &str,
    ) -> Result<Box<dyn PendingSnapshot>, bulwark_snapshot::Error> {
        let mut pending = Vec::new();
        for s in &self.0 {
            pending.push(s.prepare(vm, point).await?);
        }
        Ok(Box::new(SeveralPending(pending)))
    }
}

#[derive(Debug)]
struct SeveralPending(Vec<Box<dyn PendingSnapshot>>);

#[async_trait::async_trait]
impl PendingSnapshot for SeveralPending {
    async fn take(self: Box<Self>) -> Result<Vec<Box<dyn DiskSource>>, bulwark_snapshot::Error> {
        let mut all: Vec<Box<dyn DiskSource>> = Vec::new();
        for p in self.0 {
            match p.take().await {
                Ok(mut d) => all.append(&mut d),
                Err(e) => {
                    for d in all {
                        let _ = d
                            .release(bulwark_snapshot::Outcome::Failed { keep: false })
                            .await;
                    }
                    return Err(e);
                }
            }
        }
        Ok(all)
    }
}

/// Format of a restored image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImageFormat {
    /// A sparse raw image.
    #[default]
    Raw,
    /// qcow2 (through `qemu-img convert`; zero blocks stay unallocated).
    Qcow2,
}

impl FromStr for ImageFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "raw" => Ok(ImageFormat::Raw),
            "qcow2" => Ok(ImageFormat::Qcow2),
            other => Err(Error::Source {
                why: format!("unknown image format {other:?} (raw or qcow2)"),
            }),
        }
    }
}

/// Converts the restored raw image `raw` to a qcow2 image at `to` with `qemu_img`: written to a
/// hidden file beside `to`, renamed into place when `qemu-img` succeeded, `raw` removed then.
pub fn raw_to_qcow2(qemu_img: &Path, raw: &Path, to: &Path) -> Result<(), Error> {
    let name = to
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let partial = to.with_file_name(format!(".{name}.bulwark-qcow2-partial"));
    let out = std::process::Command::new(qemu_img)
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(raw)
        .arg(&partial)
        .output()
        .map_err(|source| Error::Io {
            path: qemu_img.to_path_buf(),
            source,
        })?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&partial);
        return Err(Error::Source {
            why: format!(
                "qemu-img convert {} to qcow2 failed ({}): {}",
                raw.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    std::fs::File::open(&partial)
        .and_then(|f| f.sync_all())
        .map_err(io(&partial))?;
    std::fs::rename(&partial, to).map_err(io(to))?;
    std::fs::remove_file(raw).map_err(io(raw))
}

/// [`crate::run_restore`] in the asked `format`. For qcow2, the verified raw restore goes to a
/// hidden file beside the target first, is converted with `qemu-img`, and is removed again
/// whatever happens; the target is replaced only with `force`.
pub async fn run_restore_as(
    mut req: crate::RestoreRequest,
    format: ImageFormat,
    vault: &bulwark_vault::Vault,
) -> Result<crate::RestoreReport, Error> {
    if format == ImageFormat::Raw {
        return crate::run_restore(req, vault).await;
    }
    let to = req.to.clone();
    crate::restore::check_target(&req)?;
    let name = to
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Error::RestoreTarget {
            path: to.clone(),
            why: "needs a file name".into(),
        })?;
    let raw = to.with_file_name(format!(".{name}.bulwark-raw"));
    req.to = raw.clone();
    // The hidden raw file is ours: a crashed earlier run may have left it.
    req.force = true;
    let result = match crate::run_restore(req, vault).await {
        Ok(mut report) => raw_to_qcow2(Path::new("qemu-img"), &raw, &to).map(|()| {
            report.to = to;
            report
        }),
        Err(e) => Err(e),
    };
    if result.is_err() {
        let _ = std::fs::remove_file(&raw);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("a.img");
        std::fs::write(&raw, vec![0u8; 4096]).unwrap();
        let qcow = dir.path().join("b.qcow2");
        let mut header = b"QFI\xfb".to_vec();
        header.resize(4096, 0);
        std::fs::write(&qcow, header).unwrap();
        let err = |spec: SourceSpec| snapshotter(&spec).unwrap_err().to_string();
        assert!(err(SourceSpec::vm("unix:/x", vec!["os=/a".into()], "/tmp")).contains("NAME=PATH"));
        let mut s = SourceSpec::vm("unix:/x", vec![], "/tmp");
        s.mode = SnapshotMode::Copy;
        assert!(err(s).contains("image files"));
        let mut s = SourceSpec::images(vec![format!("b={}", qcow.display())], "/tmp");
        s.mode = SnapshotMode::Copy;
        assert!(err(s).contains("qcow2"));
        assert!(err(SourceSpec::images(vec![], "/tmp")).contains("no disk"));
        assert!("sideways".parse::<SnapshotMode>().is_err());
        for m in ["auto", "reflink", "copy", "in-place"] {
            assert_eq!(m.parse::<SnapshotMode>().unwrap().to_string(), m);
        }
        // Mixed raw + qcow2 images make one snapshotter.
        let s = SourceSpec::images(
            vec![
                format!("a={}", raw.display()),
                format!("b={}", qcow.display()),
            ],
            "/tmp",
        );
        assert!(snapshotter(&s).is_ok());
        assert!(is_qcow2(&qcow).unwrap() && !is_qcow2(&raw).unwrap());
    }
}
