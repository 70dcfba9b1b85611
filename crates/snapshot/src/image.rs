//! [`ImageSnapshotter`]: the disks of a VM are image files (or `NAME=PATH` arguments); a
//! snapshot is a reflink clone or a sparse copy of each, and change tracking compares the
//! extents of the new clone with those of the previous one (the *base*, see `tracking`).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bulwark_blockdiff::{BlockSource, Disk, Tracking};

use crate::source::{Changes, DiskSource, Outcome, PendingSnapshot, PreviousDisk, Released};
use crate::tracking::Base;
use crate::{Error, Provider, Snapshot, Snapshotter};

/// The `kind` of the [`Tracking`] record an image disk writes when its base is in use.
pub const REFLINK_TRACKING: &str = "reflink-extents";

/// One disk of a VM: a name within the VM and the image file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageDisk {
    /// The disk's name within the VM (`[A-Za-z0-9._-]`, not starting with `.` or `-`).
    pub name: String,
    /// The live image.
    pub path: PathBuf,
}

impl ImageDisk {
    /// Parses `NAME=PATH` or `PATH` (the name is then the file name without its extension,
    /// other characters replaced by `_`).
    pub fn parse(spec: &str) -> Result<ImageDisk, Error> {
        let (name, path) = match spec.split_once('=') {
            Some((n, p)) if !n.is_empty() && !n.contains('/') => (n.to_string(), PathBuf::from(p)),
            _ => {
                let path = PathBuf::from(spec);
                let stem = path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let name: String = stem
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || "._-".contains(c) {
                            c
                        } else {
                            '_'
                        }
                    })
                    .collect();
                (name.trim_start_matches(['.', '-']).to_string(), path)
            }
        };
        check_name(&name).map_err(|why| Error::InvalidDisk {
            spec: spec.into(),
            why: format!("disk name {name:?} {why}"),
        })?;
        if path.as_os_str().is_empty() {
            return Err(Error::InvalidDisk {
                spec: spec.into(),
                why: "no path given".into(),
            });
        }
        Ok(ImageDisk { name, path })
    }
}

/// The vault's naming rule for VMs and disks.
fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        Err("is empty")
    } else if name.len() > 128 {
        Err("is longer than 128 characters")
    } else if name.starts_with('.') || name.starts_with('-') {
        Err("starts with '.' or '-'")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        Err("may only contain letters, digits, '.', '_' and '-'")
    } else {
        Ok(())
    }
}

/// Snapshots of image files: `FICLONE` reflinks (XFS with reflink, btrfs) or sparse copies.
///
/// Snapshot files go to `<dir>/<vm>/<disk>-<point>.snap` (`dir` defaults to
/// `.bulwark-snapshots` beside each image: a reflink needs the same file system). With
/// `change_tracking`, each committed reflink snapshot becomes the disk's base
/// (`<dir>/<vm>/.base/<disk>.img`) and the next backup reads only the blocks whose extents
/// changed since; without it, any base is removed.
#[derive(Debug, Clone)]
pub struct ImageSnapshotter {
    disks: Vec<ImageDisk>,
    /// Reflink, copy, or auto (reflink, else a copy with a warning).
    pub provider: Provider,
    /// Where snapshot files go (see the type's documentation).
    pub dir: Option<PathBuf>,
    /// Keep a base per disk for change tracking (on by default).
    pub change_tracking: bool,
}

impl ImageSnapshotter {
    /// A snapshotter of `disks` with default settings. Checks them before anything is touched:
    /// at least one, distinct names, and each an existing regular file.
    pub fn new(disks: Vec<ImageDisk>) -> Result<ImageSnapshotter, Error> {
        if disks.is_empty() {
            return Err(Error::InvalidDisk {
                spec: String::new(),
                why: "no disks to back up".into(),
            });
        }
        let mut names = HashSet::new();
        for d in &disks {
            check_name(&d.name).map_err(|why| Error::InvalidDisk {
                spec: d.name.clone(),
                why: format!("disk name {why}"),
            })?;
            if !names.insert(&d.name) {
                return Err(Error::InvalidDisk {
                    spec: d.name.clone(),
                    why: "two disks have this name; name them with NAME=PATH".into(),
                });
            }
            let meta = std::fs::metadata(&d.path).map_err(crate::io(&d.path))?;
            if !meta.is_file() {
                return Err(Error::NotAFile {
                    path: d.path.clone(),
                });
            }
        }
        Ok(ImageSnapshotter {
            disks,
            provider: Provider::default(),
            dir: None,
            change_tracking: true,
        })
    }

    /// The disks.
    pub fn disks(&self) -> &[ImageDisk] {
        &self.disks
    }

    /// The directory of a VM's snapshots of `disk`.
    fn vm_dir(&self, vm: &str, disk: &ImageDisk) -> PathBuf {
        match &self.dir {
            Some(d) => d.join(vm),
            None => disk
                .path
                .parent()
                .unwrap_or(Path::new("."))
                .join(".bulwark-snapshots")
                .join(vm),
        }
    }
}

#[async_trait::async_trait]
impl Snapshotter for ImageSnapshotter {
    async fn prepare(&self, vm: &str, point: &str) -> Result<Box<dyn PendingSnapshot>, Error> {
        check_name(vm).map_err(|why| Error::InvalidDisk {
            spec: vm.into(),
            why: format!("VM name {why}"),
        })?;
        let disks = self
            .disks
            .iter()
            .map(|d| {
                let dir = self.vm_dir(vm, d);
                let dest = dir.join(format!("{}-{point}.snap", d.name));
                (d.clone(), dir, dest)
            })
            .collect();
        Ok(Box::new(PendingImages {
            disks,
            provider: self.provider,
            change_tracking: self.change_tracking,
        }))
    }
}

/// Prepared image snapshots: where each goes.
#[derive(Debug)]
struct PendingImages {
    /// Disk, its VM snapshot directory, its snapshot file.
    disks: Vec<(ImageDisk, PathBuf, PathBuf)>,
    provider: Provider,
    change_tracking: bool,
}

#[async_trait::async_trait]
impl PendingSnapshot for PendingImages {
    async fn take(self: Box<Self>) -> Result<Vec<Box<dyn DiskSource>>, Error> {
        tokio::task::spawn_blocking(move || self.take_all())
            .await
            .map_err(|e| Error::Worker(e.to_string()))?
    }
}

impl PendingImages {
    fn take_all(self) -> Result<Vec<Box<dyn DiskSource>>, Error> {
        // All snapshots first (the guest may be frozen), then the bookkeeping.
        let mut taken = Vec::with_capacity(self.disks.len());
        for (disk, dir, dest) in self.disks {
            let snap = crate::take(&disk.path, &dest, self.provider)?;
            tracing::debug!(disk = %disk.name, provider = %snap.provider(), ms = snap.elapsed().as_millis() as u64, "snapshot taken");
            taken.push((disk, dir, snap));
        }
        let mut out: Vec<Box<dyn DiskSource>> = Vec::with_capacity(taken.len());
        for (disk, dir, snap) in taken {
            let reader = Disk::open(snap.path()).map_err(|e| Error::Io {
                path: snap.path().to_path_buf(),
                source: std::io::Error::other(e),
            })?;
            let want = self.change_tracking && snap.provider() == Provider::Reflink;
            let base = base_use(&dir, &disk.name, want);
            out.push(Box::new(ImageSource {
                reader: Arc::new(reader),
                kind: snap.provider().to_string(),
                disk,
                snapshot: snap,
                base,
            }));
        }
        Ok(out)
    }
}

/// What a backup does with a disk's change-tracking base.
#[derive(Debug)]
enum BaseUse {
    /// Compare against it, then replace it with this backup's snapshot.
    Use(Arc<Base>),
    /// Tracking is off or impossible (no reflink): remove it.
    Remove(Base),
    /// Another backup of the disk holds it, or there is none to remove: leave it alone.
    Leave,
}

/// The base of `disk`, locked for this backup, where tracking is wanted; else whatever base
/// there is goes (when no other backup of the disk holds it).
fn base_use(dir: &Path, disk: &str, want: bool) -> BaseUse {
    if !want && !Base::exists(dir, disk) {
        return BaseUse::Leave;
    }
    match Base::lock(dir, disk) {
        Ok(Some(b)) if want => BaseUse::Use(Arc::new(b)),
        Ok(Some(b)) => BaseUse::Remove(b),
        Ok(None) => {
            tracing::info!(
                disk,
                "another backup of this disk holds its change-tracking base; reading all of it"
            );
            BaseUse::Leave
        }
        Err(e) => {
            tracing::warn!(disk, error = %e, "cannot lock the change-tracking base; reading all of the disk");
            BaseUse::Leave
        }
    }
}

/// One snapshotted image disk.
#[derive(Debug)]
struct ImageSource {
    disk: ImageDisk,
    kind: String,
    snapshot: Snapshot,
    reader: Arc<Disk>,
    base: BaseUse,
}

#[async_trait::async_trait]
impl DiskSource for ImageSource {
    fn name(&self) -> &str {
        &self.disk.name
    }

    fn kind(&self) -> &str {
        &self.kind
    }

    fn origin(&self) -> String {
        self.disk.path.display().to_string()
    }

    fn file(&self) -> Option<PathBuf> {
        Some(self.snapshot.path().to_path_buf())
    }

    fn reader(&self) -> Arc<dyn BlockSource> {
        self.reader.clone()
    }

    async fn changes_since(&self, previous: &PreviousDisk) -> Result<Changes, Error> {
        let BaseUse::Use(base) = &self.base else {
            return Ok(Changes::Unknown {
                reason: match self.base {
                    BaseUse::Leave if self.kind == "reflink" => {
                        "the change-tracking base is busy or unusable".into()
                    }
                    _ => format!("no change tracking for a {} snapshot", self.kind),
                },
            });
        };
        let size = self.reader.size();
        if size != previous.size {
            return Ok(Changes::Unknown {
                reason: format!("the disk was {} bytes, is {size}", previous.size),
            });
        }
        let (base, snap, previous) = (
            base.clone(),
            self.snapshot.path().to_path_buf(),
            previous.clone(),
        );
        let r = tokio::task::spawn_blocking(move || {
            base.unchanged_ranges(&snap, &previous.point, &previous.manifest_digest, size)
        })
        .await
        .map_err(|e| Error::Worker(e.to_string()))?;
        Ok(match r {
            Ok(ranges) => Changes::Unchanged(ranges),
            Err(reason) => Changes::Unknown { reason },
        })
    }

    fn tracking(&self) -> Option<Tracking> {
        matches!(self.base, BaseUse::Use(_)).then(|| Tracking {
            kind: REFLINK_TRACKING.into(),
            fields: BTreeMap::from([("base".into(), format!("{}.img", self.disk.name))]),
        })
    }

    async fn release(self: Box<Self>, outcome: Outcome) -> Result<Released, Error> {
        tokio::task::spawn_blocking(move || self.release_now(outcome))
            .await
            .map_err(|e| Error::Worker(e.to_string()))
    }
}

impl ImageSource {
    fn release_now(self, outcome: Outcome) -> Released {
        let ImageSource {
            disk,
            mut snapshot,
            base,
            ..
        } = self;
        let keep = match &outcome {
            Outcome::Committed { keep, .. } | Outcome::Failed { keep } => *keep,
        };
        snapshot.set_keep(keep);
        if let Outcome::Committed {
            point,
            manifest_digest,
            ..
        } = &outcome
        {
            // The snapshot just committed becomes the base of the next backup's tracking.
            let r = match &base {
                BaseUse::Use(b) => b.replace(&mut snapshot, point, manifest_digest),
                BaseUse::Remove(b) => b.remove(),
                BaseUse::Leave => Ok(()),
            };
            if let Err(e) = r {
                tracing::warn!(disk = %disk.name, error = %e, "cannot keep the change-tracking base; the next backup of this disk reads all of it");
            }
        }
        // A failed job leaves the base alone: it still holds the last committed point.
        Released {
            kept: keep.then(|| snapshot.path().to_path_buf()),
        }
        // `snapshot` drops here: its file goes unless kept or moved into the base.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_specs() {
        let d = ImageDisk::parse("os=/var/lib/vm/web.qcow").unwrap();
        assert_eq!(
            (d.name.as_str(), d.path.as_path()),
            ("os", Path::new("/var/lib/vm/web.qcow"))
        );
        let d = ImageDisk::parse("/images/web data.img").unwrap();
        assert_eq!(d.name, "web_data");
        assert!(ImageDisk::parse("..=/a").is_err());
        assert!(ImageDisk::parse("bad name=/a").is_err());
        // A slash before the "=" makes the whole argument a path.
        assert_eq!(ImageDisk::parse("../x=/a").unwrap().name, "a");
        assert!(ImageDisk::parse("a=").is_err());
    }

    #[test]
    fn bad_disk_sets_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.img");
        std::fs::write(&img, b"x").unwrap();
        let d = |s: &str| ImageDisk::parse(s).unwrap();
        let a = format!("a={}", img.display());
        assert!(ImageSnapshotter::new(vec![]).is_err());
        assert!(ImageSnapshotter::new(vec![d(&a), d(&a)]).is_err());
        let missing = format!("b={}", dir.path().join("none").display());
        assert!(ImageSnapshotter::new(vec![d(&missing)]).is_err());
        let not_file = format!("c={}", dir.path().display());
        assert!(ImageSnapshotter::new(vec![d(&not_file)]).is_err());
        assert!(ImageSnapshotter::new(vec![d(&a)]).is_ok());
    }

    /// A copy snapshot: the reader sees the image as it was, nothing is known unchanged, and
    /// release removes the file unless it is kept.
    #[tokio::test]
    async fn copy_snapshot_reads_releases_and_keeps() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("os.img");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&img, &data).unwrap();
        let mut s = ImageSnapshotter::new(vec![ImageDisk {
            name: "os".into(),
            path: img.clone(),
        }])
        .unwrap();
        s.provider = Provider::Copy;
        s.dir = Some(dir.path().join("snaps"));
        for (i, keep) in [(1, false), (2, true)] {
            let point = format!("p{i}");
            let pending = s.prepare("vm1", &point).await.unwrap();
            let mut sources = pending.take().await.unwrap();
            std::fs::write(&img, b"the guest goes on").unwrap();
            let src = sources.pop().unwrap();
            assert_eq!((src.name(), src.kind()), ("os", "copy"));
            assert_eq!(src.origin(), img.display().to_string());
            let file = src.file().unwrap();
            assert_eq!(file, dir.path().join(format!("snaps/vm1/os-{point}.snap")));
            let reader = src.reader();
            assert_eq!(reader.size(), data.len() as u64);
            let pool = bulwark_blockdiff::buffers::Pool::new(1 << 16, 4);
            let got = reader.read(4096, 1000, &pool).unwrap();
            assert_eq!(&got[..], &data[4096..5096]);
            let prev = PreviousDisk {
                point: "p0".into(),
                manifest_digest: "d".into(),
                size: data.len() as u64,
                tracking: None,
            };
            assert!(matches!(
                src.changes_since(&prev).await.unwrap(),
                Changes::Unknown { .. }
            ));
            assert!(src.tracking().is_none());
            let released = src
                .release(Outcome::Committed {
                    point: point.clone(),
                    manifest_digest: "d".into(),
                    keep,
                })
                .await
                .unwrap();
            assert_eq!(released.kept.is_some(), keep);
            assert_eq!(file.exists(), keep, "kept only when asked");
            std::fs::write(&img, &data).unwrap();
        }
    }
}
