//! Change tracking between backups of a disk, from reflink extents.
//!
//! After a point is committed, the snapshot each disk was read from becomes the disk's *base*
//! (moved there; a reflink clone when the snapshot is kept for instant restore):
//! `<snapshot dir>/<vm>/.base/<disk>.img`, with `<disk>.json` saying which point and which
//! manifest it holds. The next backup of the disk compares its new snapshot's extent map with
//! the base's ([`crate::identical_ranges`]): blocks whose extents are still shared
//! are known unchanged and are not read. An incremental then costs in proportion to what the
//! guest wrote, not to the size of the disk.
//!
//! The base is trusted only when everything matches: the same point and manifest digest as
//! the previous point of the disk in the vault, the same disk size, the same
//! file (device, inode) with an unchanged ctime (nothing wrote to it; it is also read-only).
//! Anything else, and any error, means a full read: correctness never depends on the base.
//! The identity is checked on the very file descriptor whose extents are then read, and one
//! backup at a time uses and replaces a disk's base (`<disk>.lock`, a non-blocking `flock`
//! held from before the comparison until after the replacement): a second backup of the same
//! disk meanwhile reads it in full and leaves the base alone.
//!
//! Cost: the base holds on to the blocks the guest has overwritten since the last backup (as
//! any snapshot does), until the next backup replaces it. It exists only where the snapshot
//! was a reflink.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::{Provider, Snapshot};
use serde::{Deserialize, Serialize};

/// What a base holds, stored beside it. (Bases written before the block size stopped being
/// recorded carry a `block_size` too: unknown fields are ignored. The manifest digest pins
/// the block size anyway.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct BaseInfo {
    point: String,
    manifest_digest: String,
    size: u64,
    dev: u64,
    ino: u64,
    ctime_ns: i128,
}

/// The base of one disk, locked for this backup.
#[derive(Debug)]
pub(crate) struct Base {
    image: PathBuf,
    info: PathBuf,
    /// Holds the exclusive `flock` until dropped.
    _lock: File,
}

impl Base {
    /// Whether `disk` has a base (or the record of one).
    pub(crate) fn exists(vm_dir: &Path, disk: &str) -> bool {
        let dir = vm_dir.join(".base");
        dir.join(format!("{disk}.img")).exists() || dir.join(format!("{disk}.json")).exists()
    }

    /// Locks the base of `disk` of the VM whose snapshots are in `vm_dir`. `Ok(None)` when
    /// another backup holds it.
    pub(crate) fn lock(vm_dir: &Path, disk: &str) -> std::io::Result<Option<Base>> {
        let dir = vm_dir.join(".base");
        std::fs::create_dir_all(&dir)?;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(format!("{disk}.lock")))?;
        match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        Ok(Some(Base {
            image: dir.join(format!("{disk}.img")),
            info: dir.join(format!("{disk}.json")),
            _lock: lock,
        }))
    }

    /// The byte ranges of `snapshot` known to hold the same data as the previous point's
    /// snapshot (point `point`, manifest `digest`, disk size `size`). `Err(reason)` when the
    /// base does not match or anything fails: then nothing is known.
    pub(crate) fn unchanged_ranges(
        &self,
        snapshot: &Path,
        point: &str,
        digest: &str,
        size: u64,
    ) -> Result<Vec<Range<u64>>, String> {
        let read = match std::fs::read(&self.info) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err("no change-tracking base yet".into());
            }
            r => r
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<BaseInfo>(&b).map_err(|e| e.to_string())),
        };
        let info = match read {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(file = %self.info.display(), error = %e, "unreadable change-tracking base; reading the whole disk");
                return Err(format!("unreadable change-tracking base: {e}"));
            }
        };
        let (Ok(base), Ok(snap)) = (File::open(&self.image), File::open(snapshot)) else {
            tracing::info!(base = %self.image.display(), "no change-tracking base; reading the whole disk");
            return Err("no change-tracking base".into());
        };
        let matches = info.point == point
            && info.manifest_digest == digest
            && info.size == size
            && base
                .metadata()
                .is_ok_and(|m| identity(&m) == (info.dev, info.ino, info.ctime_ns));
        if !matches {
            tracing::info!(base = %self.image.display(), "change-tracking base is not the previous point's snapshot; reading the whole disk");
            return Err("the change-tracking base is not the previous point's snapshot".into());
        }
        match crate::identical_ranges(&base, &self.image, &snap, snapshot) {
            Ok(r) => {
                let same: u64 = r.iter().map(|r| r.end - r.start).sum();
                tracing::debug!(
                    bytes_known_unchanged = same,
                    ranges = r.len(),
                    "change tracking"
                );
                Ok(r)
            }
            Err(e) => {
                tracing::warn!(error = %e, "change tracking failed; reading the whole disk");
                Err(format!("change tracking failed: {e}"))
            }
        }
    }

    /// Makes `snapshot` (a reflink snapshot of committed point `point`) the base: the file
    /// itself moves there when nothing else keeps it (no copy, no clone), else a reflink clone
    /// of it does. The old base stops being trusted first, so a crash anywhere in between
    /// leaves no base or the old one unclaimed, never a base that claims the wrong point. The
    /// identity recorded is that of the file moved, read from its own descriptor.
    pub(crate) fn replace(
        &self,
        snapshot: &mut Snapshot,
        point: &str,
        digest: &str,
    ) -> std::io::Result<()> {
        remove_if_exists(&self.info)?;
        let pid = std::process::id();
        let file = if snapshot.is_kept() {
            // Kept for instant restore: the base is a clone of it.
            let tmp = self.image.with_extension(format!("img.tmp-{pid}"));
            remove_if_exists(&tmp)?;
            let taken = crate::take(snapshot.path(), &tmp, Provider::Reflink)
                .map_err(std::io::Error::other)?;
            let tmp = taken.keep();
            let file = File::open(&tmp)?;
            std::fs::rename(&tmp, &self.image)?;
            file
        } else {
            let file = File::open(snapshot.path())?;
            std::fs::rename(snapshot.path(), &self.image)?;
            // Moved: nothing is left to remove when the snapshot is dropped.
            snapshot.set_keep(true);
            file
        };
        let meta = file.metadata()?;
        let (dev, ino, ctime_ns) = identity(&meta);
        let info = BaseInfo {
            point: point.to_string(),
            manifest_digest: digest.to_string(),
            size: meta.len(),
            dev,
            ino,
            ctime_ns,
        };
        let json = serde_json::to_vec_pretty(&info).map_err(std::io::Error::other)?;
        let tmp_info = self.info.with_extension(format!("json.tmp-{pid}"));
        {
            use std::io::Write;
            let mut f = File::create(&tmp_info)?;
            f.write_all(&json)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp_info, &self.info)?;
        let dir = self.image.parent().unwrap_or(Path::new("."));
        File::open(dir)?.sync_all()
    }

    /// Removes the base (the disk's snapshot was not a reflink, or tracking is off).
    pub(crate) fn remove(&self) -> std::io::Result<()> {
        remove_if_exists(&self.info)?;
        remove_if_exists(&self.image)
    }
}

fn identity(m: &std::fs::Metadata) -> (u64, u64, i128) {
    (
        m.dev(),
        m.ino(),
        i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
    )
}

fn remove_if_exists(p: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
