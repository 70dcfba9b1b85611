//! Two tiers: host-side snapshots kept for instant restore, and the vault.
//!
//! A job that keeps its snapshots ([`crate::BackupRequest::keep_snapshots`]) takes them into a
//! [`SnapshotStore`] directory and records them there in a small index file per point,
//! `<root>/<vm>/<point>.json`, next to the snapshot files `<root>/<vm>/<disk>-<point>.snap`.
//! The index is written right after the snapshot phase (state `transfer_pending`: the point
//! exists on the host only, tier "snapshot") and updated after the transfer (`in_vault`: tier
//! "snapshot and vault", or `transfer_failed`). Snapshots older than the policy's
//! instant-restore days are removed by [`SnapshotStore::expire`] (the daemon calls it).
//!
//! [`crate::run_restore`] restores from a kept snapshot when there is one (a reflink or sparse
//! copy: fast), and **verifies the copy** block by block against the point's manifest in the
//! vault (BLAKE3 content address of every data block, zeros for zero blocks) before it is
//! renamed into place. A kept snapshot that differs in any block (corrupted or tampered) is
//! rejected, and the disk is restored from the vault instead; the report says which tier was
//! used and why a snapshot was rejected.
//!
//! The index is a local file, and a file is trusted only where the store keeps its own: a
//! kept snapshot is used only when its recorded path is a regular file (not a symbolic link)
//! whose canonical path lies directly in the store's directory of its VM
//! (`<root>/<vm>/`, the root canonicalized too). Anything else is rejected, never read.
//!
//! A point that exists only as a snapshot (its transfer never finished) has no manifest to
//! verify against, so it is **refused** by default: nothing is restored unverified. Only a
//! store made [`SnapshotStore::trusting_unverified`] (the CLI's
//! `--trust-unverified-snapshot`, for the operator whose vault copy never happened and who
//! takes the host's copy as it is) restores it, with `verified: false` in the report and a
//! warning. A flag rather than nothing at all: in a disaster where the transfer failed, the
//! host snapshot may be the only copy, and the operator should not have to dig the file out
//! by hand; a flag rather than a default: an index anyone with write access to the snapshot
//! directory could have written must not decide silently what lands on a disk.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bulwark_blockdiff::{BlockMap, Entry, content_address, is_zero};
use bulwark_vault::{Error as VaultError, Vault, validate_name};
use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};

use bulwark_snapshot::DiskSource;

pub use crate::report::TieredList;
use crate::restore::Partial;
use crate::{Error, KeepSnapshots, RestoreReport, RestoreRequest};

/// Where a recovery point can be restored from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Tier {
    /// Only a kept host snapshot (the transfer is pending or failed).
    #[serde(rename = "snapshot")]
    Snapshot,
    /// A kept host snapshot and the vault.
    #[serde(rename = "snapshot and vault")]
    SnapshotAndVault,
    /// The vault only.
    #[serde(rename = "vault")]
    Vault,
}

impl Tier {
    /// The name `list` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Snapshot => "snapshot",
            Tier::SnapshotAndVault => "snapshot and vault",
            Tier::Vault => "vault",
        }
    }

    /// The tier of a point: `kept` is its kept snapshot, if any (and all its files are
    /// present), `in_vault` whether the vault has the point.
    pub fn of(kept: bool, in_vault: bool) -> Option<Tier> {
        match (kept, in_vault) {
            (true, true) => Some(Tier::SnapshotAndVault),
            (true, false) => Some(Tier::Snapshot),
            (false, true) => Some(Tier::Vault),
            (false, false) => None,
        }
    }
}

/// Where a kept point stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeptState {
    /// Snapshot phase done, transfer not (yet) done.
    TransferPending,
    /// The point is committed in the vault too.
    InVault,
    /// The transfer failed: the snapshot is the only copy.
    TransferFailed,
}

/// One kept disk snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptDiskSnapshot {
    /// The disk's name.
    pub name: String,
    /// The snapshot file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// The provider that made it.
    pub provider: String,
}

/// The kept snapshots of one point (the index file's content).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptSnapshots {
    /// The VM.
    pub vm: String,
    /// The point id (the same as in the vault).
    pub point: String,
    /// When the snapshots were taken.
    pub created: Timestamp,
    /// When they are removed.
    pub expires: Timestamp,
    /// Transfer state.
    pub state: KeptState,
    /// One per disk.
    pub disks: Vec<KeptDiskSnapshot>,
}

impl KeptSnapshots {
    /// The kept snapshot of `disk`.
    pub fn disk(&self, disk: &str) -> Option<&KeptDiskSnapshot> {
        self.disks.iter().find(|d| d.name == disk)
    }

    /// Whether every snapshot file is still there.
    pub fn present(&self) -> bool {
        self.disks.iter().all(|d| d.path.is_file())
    }
}

/// A directory of kept snapshots and their index files.
#[derive(Debug, Clone)]
pub struct SnapshotStore {
    root: PathBuf,
    trust_unverified: bool,
}

impl SnapshotStore {
    /// A store rooted at `root` (created when first written).
    pub fn new(root: impl Into<PathBuf>) -> SnapshotStore {
        SnapshotStore {
            root: root.into(),
            trust_unverified: false,
        }
    }

    /// This store, restoring a point that is not in the vault from its kept snapshot,
    /// unverified (there is no manifest to verify against). Off by default: such a point is
    /// refused (see the module documentation).
    pub fn trusting_unverified(mut self, trust: bool) -> SnapshotStore {
        self.trust_unverified = trust;
        self
    }

    /// The canonical path of `disk`'s snapshot file of a point of `vm`, if it may be read:
    /// a regular file, not a symbolic link, directly in this store's directory of `vm`.
    pub fn trusted_file(&self, vm: &str, disk: &KeptDiskSnapshot) -> Result<PathBuf, String> {
        validate_name("vm", vm).map_err(|e| e.to_string())?;
        let shown = disk.path.display();
        let meta = std::fs::symlink_metadata(&disk.path)
            .map_err(|e| format!("kept snapshot {shown}: {e}"))?;
        if meta.file_type().is_symlink() {
            return Err(format!(
                "kept snapshot {shown} is a symbolic link: not trusted"
            ));
        }
        if !meta.is_file() {
            return Err(format!(
                "kept snapshot {shown} is not a regular file: not trusted"
            ));
        }
        let dir = std::fs::canonicalize(self.root.join(vm))
            .map_err(|e| format!("snapshot directory {}: {e}", self.root.join(vm).display()))?;
        let real =
            std::fs::canonicalize(&disk.path).map_err(|e| format!("kept snapshot {shown}: {e}"))?;
        if real.parent() != Some(dir.as_path()) {
            return Err(format!(
                "kept snapshot {shown} is outside the snapshot directory {}: not trusted",
                dir.display()
            ));
        }
        Ok(real)
    }

    /// The root directory (also the snapshot directory of the jobs that keep snapshots).
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn index_path(&self, vm: &str, point: &str) -> PathBuf {
        self.root.join(vm).join(format!("{point}.json"))
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |source| Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Writes (or replaces) the index file of a kept point, atomically.
    pub fn record(&self, kept: &KeptSnapshots) -> Result<(), Error> {
        validate_name("vm", &kept.vm)?;
        validate_name("point", &kept.point)?;
        let path = self.index_path(&kept.vm, &kept.point);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(Self::io(dir))?;
        }
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(kept).map_err(|e| Error::Io {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        std::fs::write(&tmp, text).map_err(Self::io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(Self::io(&path))
    }

    /// The kept point `vm`/`point`, if recorded.
    pub fn get(&self, vm: &str, point: &str) -> Result<Option<KeptSnapshots>, Error> {
        validate_name("vm", vm)?;
        validate_name("point", point)?;
        let path = self.index_path(vm, point);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::Io {
                    path: path.clone(),
                    source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Self::io(&path)(e)),
        }
    }

    /// Every kept point (of one VM, or all), oldest first. Unreadable index files are logged
    /// and left out.
    pub fn list(&self, vm: Option<&str>) -> Result<Vec<KeptSnapshots>, Error> {
        let vms: Vec<String> = match vm {
            Some(v) => {
                validate_name("vm", v)?;
                vec![v.to_string()]
            }
            None => match std::fs::read_dir(&self.root) {
                Ok(rd) => rd
                    .filter_map(|e| e.ok())
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| validate_name("vm", n).is_ok())
                    .collect(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(Self::io(&self.root)(e)),
            },
        };
        let mut out = Vec::new();
        for vm in vms {
            let dir = self.root.join(&vm);
            let rd = match std::fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Self::io(&dir)(e)),
            };
            for entry in rd.filter_map(|e| e.ok()) {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(point) = name.strip_suffix(".json") else {
                    continue;
                };
                match self.get(&vm, point) {
                    Ok(Some(k)) if k.vm == vm && k.point == point => out.push(k),
                    Ok(_) => {
                        tracing::warn!(file = %entry.path().display(), "kept-snapshot index names another point; ignored")
                    }
                    Err(e) => tracing::warn!(error = %e, "unreadable kept-snapshot index; ignored"),
                }
            }
        }
        out.sort_by(|a, b| (&a.vm, &a.point).cmp(&(&b.vm, &b.point)));
        Ok(out)
    }

    /// Removes a kept point: its snapshot files (only those inside this store's VM
    /// directory) and its index file.
    pub fn remove(&self, kept: &KeptSnapshots) -> Result<(), Error> {
        validate_name("vm", &kept.vm)?;
        let dir = self.root.join(&kept.vm);
        for d in &kept.disks {
            if d.path.parent() != Some(dir.as_path()) {
                tracing::warn!(path = %d.path.display(), "kept snapshot outside the store; not removed");
                continue;
            }
            match std::fs::remove_file(&d.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Self::io(&d.path)(e)),
            }
        }
        let index = self.index_path(&kept.vm, &kept.point);
        match std::fs::remove_file(&index) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Self::io(&index)(e)),
        }
    }

    /// Removes every kept point whose expiry is at or before `now`; returns them.
    pub fn expire(&self, now: Timestamp) -> Result<Vec<KeptSnapshots>, Error> {
        let mut removed = Vec::new();
        for k in self.list(None)? {
            if k.expires <= now {
                self.remove(&k)?;
                tracing::info!(vm = %k.vm, point = %k.point, "kept snapshot expired and removed");
                removed.push(k);
            }
        }
        Ok(removed)
    }
}

/// Records the point-in-time copies of a job that keeps them (state `transfer_pending`: the
/// point exists on the host only), before the transfer. `None` when a source has no file to
/// keep or the index cannot be written: the snapshots are then removed after the transfer.
pub(crate) fn record_kept(
    keep: &KeepSnapshots,
    vm: &str,
    point: &str,
    created: Timestamp,
    sources: &[Box<dyn DiskSource>],
) -> Option<KeptSnapshots> {
    let expires = created
        .checked_add(SignedDuration::from_hours(i64::from(keep.days) * 24))
        .unwrap_or(Timestamp::MAX);
    let mut disks = Vec::with_capacity(sources.len());
    for s in sources {
        let Some(path) = s.file() else {
            tracing::warn!(disk = %s.name(), kind = %s.kind(), "this kind of snapshot cannot be kept on the host; none are kept");
            return None;
        };
        disks.push(KeptDiskSnapshot {
            name: s.name().to_string(),
            size: std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0),
            path,
            provider: s.kind().to_string(),
        });
    }
    let kept = KeptSnapshots {
        vm: vm.to_string(),
        point: point.to_string(),
        created,
        expires,
        state: KeptState::TransferPending,
        disks,
    };
    match keep.store.record(&kept) {
        Ok(()) => Some(kept),
        Err(e) => {
            tracing::warn!(error = %e, "cannot record the kept snapshots; they are removed after the transfer");
            None
        }
    }
}

/// Checks an image against a block map: same size, every data block hashes to its address,
/// every zero block is zero. Returns the number of blocks checked, or what differs.
pub(crate) fn verify_image(
    path: &Path,
    map: &BlockMap,
    key: Option<[u8; 32]>,
) -> Result<u64, String> {
    let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let len = file
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    if len != map.disk_size() {
        return Err(format!(
            "size is {len} bytes, the point's disk is {}",
            map.disk_size()
        ));
    }
    let count = map.block_count() as usize;
    let bs = map.block_size().bytes();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(4)
        .clamp(1, 8);
    let failed = AtomicBool::new(false);
    let results: Vec<Result<(), String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let file = &file;
                let failed = &failed;
                s.spawn(move || {
                    let mut buf = vec![0u8; bs as usize];
                    let mut i = t;
                    while i < count {
                        if failed.load(Ordering::Relaxed) {
                            return Ok(());
                        }
                        let index = i as u64;
                        let n = map.block_len(index) as usize;
                        let block = &mut buf[..n];
                        file.read_exact_at(block, index * bs)
                            .map_err(|e| format!("block {index}: {e}"))?;
                        let ok = match map.entry(index).unwrap_or(Entry::Zero) {
                            Entry::Zero => is_zero(block),
                            Entry::Data { address, .. } => {
                                content_address(block, key.as_ref()) == address
                            }
                        };
                        if !ok {
                            failed.store(true, Ordering::Relaxed);
                            return Err(format!(
                                "block {index} (offset {}) differs from the point's manifest",
                                index * bs
                            ));
                        }
                        i += threads;
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("verify worker panicked".into()))
            })
            .collect()
    });
    for r in results {
        r?;
    }
    Ok(count as u64)
}

fn same_device(a: &Path, b: &Path) -> bool {
    let dir = b
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    match (std::fs::metadata(a), std::fs::metadata(dir)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev(),
        _ => false,
    }
}

/// Copies a kept snapshot to `to` (reflink when on the same file system), verifying it
/// against `map` when given. The copy is made beside the target and renamed into place only
/// when verified.
fn restore_from_snapshot(
    snapshot: &Path,
    to: &Path,
    map: Option<&BlockMap>,
    key: Option<[u8; 32]>,
) -> Result<Result<(u64, u64, u64), String>, Error> {
    let name = to
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = to.with_file_name(format!(
        ".{name}.bulwark-snapshot-partial-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    // A reflink when the target is on the snapshot's file system, else a sparse copy (quietly:
    // unlike a backup, no guest waits on it).
    use bulwark_snapshot::{Error as SnapError, Provider, take};
    let reflinked = if same_device(snapshot, to) {
        match take(snapshot, &tmp, Provider::Reflink) {
            Err(SnapError::ReflinkUnsupported { .. }) => None,
            r => Some(r),
        }
    } else {
        None
    };
    let taken = reflinked.unwrap_or_else(|| take(snapshot, &tmp, Provider::Copy));
    let copy = match taken {
        Ok(s) => s.keep(),
        Err(e) => return Ok(Err(format!("cannot copy the kept snapshot: {e}"))),
    };
    let mut guard = Partial {
        path: copy.clone(),
        armed: true,
    };
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        Error::Io {
            path: copy.clone(),
            source,
        }
    })?;
    let (data, zero) = match map {
        Some(m) => {
            if let Err(why) = verify_image(&copy, m, key) {
                return Ok(Err(why));
            }
            let data = m.data_blocks().len() as u64;
            (data, m.block_count() - data)
        }
        None => (0, 0),
    };

    let f = File::open(&copy).map_err(|source| Error::Io {
        path: copy.clone(),
        source,
    })?;
    f.sync_all().map_err(|source| Error::Io {
        path: copy.clone(),
        source,
    })?;
    let size = f.metadata().map(|m| m.len()).unwrap_or(0);
    std::fs::rename(&copy, to).map_err(|source| Error::Io {
        path: to.to_path_buf(),
        source,
    })?;
    guard.armed = false;
    Ok(Ok((size, data, zero)))
}

/// Restores one disk from a kept snapshot in `store` when there is one (verified against the
/// vault's manifest; a mismatch falls back to the vault when `fallback`, else fails), else
/// from the vault (when `fallback`). A point that exists only as a kept snapshot is refused,
/// unless the store trusts unverified snapshots (see the module documentation).
pub(crate) async fn restore_tiered(
    vault: &Vault,
    store: &SnapshotStore,
    req: &RestoreRequest,
    fallback: bool,
) -> Result<RestoreReport, Error> {
    let start = Instant::now();
    crate::restore::check_target(req)?;
    let point = match vault.resolve_point(&req.vm, &req.point).await {
        Ok(p) => Some(p),
        Err(VaultError::NoSuchPoint { .. }) if req.point != "latest" => None,
        Err(e) => return Err(e.into()),
    };
    let point_id = point
        .as_ref()
        .map(|p| p.id.clone())
        .unwrap_or_else(|| req.point.clone());
    let kept = store
        .get(&req.vm, &point_id)?
        .filter(|k| k.present())
        .and_then(|k| k.disk(&req.disk).cloned());
    let report = |size, data_blocks, zero_blocks, verified| RestoreReport {
        point: point_id.clone(),
        vm: req.vm.clone(),
        disk: req.disk.clone(),
        to: req.to.clone(),
        size,
        data_blocks,
        zero_blocks,
        bytes_written: size,
        duration_ms: start.elapsed().as_millis() as u64,
        source: Tier::Snapshot,
        verified,
        snapshot_rejected: None,
    };
    let Some(point) = point else {
        // Snapshot tier only: nothing in the vault to verify against.
        let Some(k) = kept else {
            return Err(VaultError::NoSuchPoint {
                vm: req.vm.clone(),
                point: req.point.clone(),
            }
            .into());
        };
        let path = store
            .trusted_file(&req.vm, &k)
            .map_err(|why| Error::RestoreTarget {
                path: req.to.clone(),
                why: format!("the point is not in the vault and {why}"),
            })?;
        if !store.trust_unverified {
            return Err(Error::RestoreTarget {
                path: req.to.clone(),
                why: format!(
                    "point {point_id} is not in the vault: its kept snapshot {} has no manifest \
                     to verify against, so it is not restored (to take it unverified, as it \
                     is, say --trust-unverified-snapshot)",
                    path.display()
                ),
            });
        }
        let to = req.to.clone();
        let copied =
            tokio::task::spawn_blocking(move || restore_from_snapshot(&path, &to, None, None))
                .await
                .map_err(|e| Error::Worker(e.to_string()))??;
        return match copied {
            Ok((size, _, _)) => {
                tracing::warn!(point = %point_id, "restored from a kept snapshot whose transfer never finished, as asked (--trust-unverified-snapshot): NOT verified");
                Ok(report(size, 0, 0, false))
            }
            Err(why) => Err(Error::RestoreTarget {
                path: req.to.clone(),
                why: format!("the point exists only as a kept snapshot, which failed: {why}"),
            }),
        };
    };
    let mut rejected = None;
    let kept = match kept.map(|k| store.trusted_file(&req.vm, &k)) {
        Some(Err(why)) => {
            tracing::warn!(point = %point.id, disk = %req.disk, %why, "kept snapshot rejected");
            rejected = Some(why);
            None
        }
        Some(Ok(path)) => Some(path),
        None => None,
    };
    if let Some(path) = kept {
        match from_kept(vault, &point, &path, req).await? {
            Ok((size, data, zero, data_bytes)) => {
                let mut r = report(size, data, zero, true);
                r.bytes_written = data_bytes;
                return Ok(r);
            }
            Err(why) => {
                tracing::warn!(point = %point.id, disk = %req.disk, %why, "kept snapshot rejected");
                rejected = Some(why);
            }
        }
    }
    if !fallback {
        let why = rejected.unwrap_or_else(|| "there is none of this point and disk".into());
        return Err(Error::RestoreTarget {
            path: req.to.clone(),
            why: format!("cannot restore from a kept snapshot: {why}"),
        });
    }
    let mut vreq = req.clone();
    vreq.point = point.id.clone();
    let mut report = crate::restore::from_vault(vault, &vreq).await?;
    report.snapshot_rejected = rejected;
    Ok(report)
}

/// Copies the kept snapshot `path` of `point` to the target, verified against the point's
/// manifest: `(size, data blocks, zero blocks, data bytes)`, or why it was rejected.
async fn from_kept(
    vault: &Vault,
    point: &bulwark_vault::RecoveryPoint,
    path: &Path,
    req: &RestoreRequest,
) -> Result<Result<(u64, u64, u64, u64), String>, Error> {
    let map = vault.disk_manifest(point, &req.disk).await?;
    let key = vault.scan_options().address_key;
    let data_bytes: u64 = map.data_blocks().map(|(i, _)| map.block_len(i)).sum();
    let progress = &req.observer;
    progress.start(&req.disk, map.disk_size());
    let (path, to) = (path.to_path_buf(), req.to.clone());
    let copied =
        tokio::task::spawn_blocking(move || restore_from_snapshot(&path, &to, Some(&map), key))
            .await
            .map_err(|e| Error::Worker(e.to_string()))??;
    Ok(copied.map(|(size, data, zero)| {
        progress.advance(&req.disk, size);
        progress.finish(&req.disk);
        (size, data, zero, data_bytes)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(root: &Path, vm: &str, point: &str, expires: &str) -> KeptSnapshots {
        let dir = root.join(vm);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("os-{point}.snap"));
        std::fs::write(&path, b"snap").unwrap();
        KeptSnapshots {
            vm: vm.into(),
            point: point.into(),
            created: "2026-11-20T00:00:00Z".parse().unwrap(),
            expires: expires.parse().unwrap(),
            state: KeptState::InVault,
            disks: vec![KeptDiskSnapshot {
                name: "os".into(),
                path,
                size: 4,
                provider: "copy".into(),
            }],
        }
    }

    #[test]
    fn store_records_lists_and_expires() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::new(dir.path().join("snaps"));
        assert!(store.list(None).unwrap().is_empty());
        let a = kept(store.root(), "web01", "p1", "2026-11-22T00:00:00Z");
        let b = kept(store.root(), "web01", "p2", "2026-11-24T00:00:00Z");
        let c = kept(store.root(), "db01", "p3", "2026-11-23T00:00:00Z");
        for k in [&a, &b, &c] {
            store.record(k).unwrap();
        }
        assert_eq!(store.list(None).unwrap().len(), 3);
        assert_eq!(
            store.list(Some("web01")).unwrap(),
            vec![a.clone(), b.clone()]
        );
        assert_eq!(store.get("web01", "p2").unwrap(), Some(b.clone()));
        assert!(b.present());
        let gone = store
            .expire("2026-11-23T00:00:00Z".parse().unwrap())
            .unwrap();
        let mut ids: Vec<_> = gone.iter().map(|k| k.point.as_str()).collect();
        ids.sort();
        assert_eq!(ids, ["p1", "p3"]);
        assert!(!a.disks[0].path.exists());
        assert!(!c.disks[0].path.exists());
        assert!(b.disks[0].path.exists());
        assert_eq!(store.list(None).unwrap(), vec![b]);
    }

    #[test]
    fn tiers() {
        assert_eq!(Tier::of(true, true), Some(Tier::SnapshotAndVault));
        assert_eq!(Tier::of(true, false), Some(Tier::Snapshot));
        assert_eq!(Tier::of(false, true), Some(Tier::Vault));
        assert_eq!(
            serde_json::to_string(&Tier::SnapshotAndVault).unwrap(),
            "\"snapshot and vault\""
        );
    }
}
