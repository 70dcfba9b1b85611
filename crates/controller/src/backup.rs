//! The backup job: snapshot phase, then transfer phase, then commit.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bulwark_blockdiff::{Address, BlockEvent, BlockMap, Disk, scan_tracked};
use bulwark_snapshot::{Provider, Snapshot};
use bulwark_vault::{
    ConsistencyRecord, DiskRecord, DiskStats, Lease, LeaseKind, LeaseOptions, ManifestRef,
    RecoveryPoint, Vault, new_point_id, validate_name,
};
use futures::StreamExt;
use jiff::Timestamp;
use serde::Serialize;
use tracing::Instrument;

use crate::tracking::Base;
use crate::{Error, Progress};

/// One disk of a VM: a name within the VM and the image (or block device) path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// The disk's name within the VM (`[A-Za-z0-9._-]`).
    pub name: String,
    /// The live image.
    pub path: PathBuf,
}

impl DiskSpec {
    /// Parses `NAME=PATH` or `PATH` (the name is then the file name without its extension).
    pub fn parse(spec: &str) -> Result<DiskSpec, Error> {
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
        validate_name("disk", &name)?;
        if path.as_os_str().is_empty() {
            return Err(Error::InvalidDisk {
                spec: spec.into(),
                why: "no path given".into(),
            });
        }
        Ok(DiskSpec { name, path })
    }
}

/// Where and how snapshots are taken.
#[derive(Debug, Clone)]
pub struct SnapshotOptions {
    /// The provider.
    pub provider: Provider,
    /// Where snapshot files go. Default: a `.bulwark-snapshots` directory beside each image
    /// (reflinks need the same file system).
    pub dir: Option<PathBuf>,
    /// Keep a reflink clone of each disk's last snapshot (in `<dir>/<vm>/.base/`) so that the
    /// next backup reads only the blocks whose extents changed (see `tracking`). On by
    /// default; it has an effect only where the snapshot is a reflink.
    pub change_tracking: bool,
}

impl Default for SnapshotOptions {
    fn default() -> Self {
        SnapshotOptions {
            provider: Provider::default(),
            dir: None,
            change_tracking: true,
        }
    }
}

/// A backup to run.
#[derive(Debug, Clone)]
pub struct BackupRequest {
    /// The VM.
    pub vm: String,
    /// Its disks.
    pub disks: Vec<DiskSpec>,
    /// Snapshot settings.
    pub snapshot: SnapshotOptions,
    /// Blocks uploaded at once per disk.
    pub upload_concurrency: usize,
    /// The policy name to record, if any.
    pub policy: Option<String>,
    /// The shared backup lease held during the transfer (by default it waits up to 10
    /// minutes while a garbage collection runs).
    pub lease: LeaseOptions,
}

impl BackupRequest {
    /// A crash-consistent backup of `disks` with default settings.
    pub fn new(vm: impl Into<String>, disks: Vec<DiskSpec>) -> Self {
        BackupRequest {
            vm: vm.into(),
            disks,
            snapshot: SnapshotOptions::default(),
            upload_concurrency: 16,
            policy: None,
            lease: LeaseOptions::default().waiting(std::time::Duration::from_secs(600)),
        }
    }
}

/// The result of a backup, as printed by `backup --json`.
#[derive(Debug, Clone, Serialize)]
pub struct BackupReport {
    /// The committed point id.
    pub point: String,
    /// The VM.
    pub vm: String,
    /// The consistency reached (`crash`, `file_system`, `application`).
    pub consistency: bulwark_consistency::Level,
    /// The consistency wanted.
    pub consistency_wanted: bulwark_consistency::Level,
    /// Why the level reached differs from the level wanted.
    pub consistency_reasons: Vec<String>,
    /// How long the guest was frozen, if it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub freeze_window_ms: Option<u64>,
    /// How long the snapshot phase took, all disks.
    pub snapshot_ms: u64,
    /// How long the whole job took.
    pub duration_ms: u64,
    /// Per-disk results.
    pub disks: Vec<DiskReport>,
    /// Object-store requests and bytes of the transfer phase (GET/PUT/HEAD/LIST/DELETE).
    pub storage: bulwark_vault::StoreStats,
    /// Bytes uploaded per second of the transfer phase, MiB/s.
    pub upload_mib_per_s: f64,
}

/// One disk's result.
#[derive(Debug, Clone, Serialize)]
pub struct DiskReport {
    /// Disk name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// The previous point the comparison ran against, if any.
    pub previous_point: Option<String>,
    /// Snapshot provider used.
    pub snapshot: String,
    /// Statistics (blocks, changed_blocks, bytes_read, bytes_uploaded, …).
    #[serde(flatten)]
    pub stats: DiskStats,
}

/// A snapshot of each disk, taken in the snapshot phase.
#[derive(Debug)]
pub struct TakenSnapshots {
    /// The point id the snapshots belong to.
    pub point: String,
    /// When they were taken.
    pub created: Timestamp,
    /// One per disk, in request order.
    pub snapshots: Vec<(DiskSpec, Snapshot)>,
    /// How long it took.
    pub elapsed_ms: u64,
}

/// What a backup does with a disk's change-tracking base.
enum Tracking {
    /// Compare against it, then replace it with this backup's snapshot.
    Use(Arc<Base>),
    /// Tracking is off or impossible (no reflink): remove it.
    Remove(Base),
    /// Another backup of the disk holds it: leave it alone.
    Leave,
}

/// The directory of a VM's snapshots of `disk`.
fn snapshot_dir(req: &BackupRequest, disk: &DiskSpec) -> PathBuf {
    match &req.snapshot.dir {
        Some(d) => d.join(&req.vm),
        None => disk
            .path
            .parent()
            .unwrap_or(Path::new("."))
            .join(".bulwark-snapshots")
            .join(&req.vm),
    }
}

fn snapshot_path(req: &BackupRequest, disk: &DiskSpec, point: &str) -> PathBuf {
    snapshot_dir(req, disk).join(format!("{}-{point}.snap", disk.name))
}

/// Checks a request before anything is touched: names, distinct disks, images that exist.
pub fn check_request(req: &BackupRequest) -> Result<(), Error> {
    validate_name("vm", &req.vm)?;
    if req.disks.is_empty() {
        return Err(Error::NoDisks { vm: req.vm.clone() });
    }
    let mut names = HashSet::new();
    for d in &req.disks {
        validate_name("disk", &d.name)?;
        if !names.insert(&d.name) {
            return Err(Error::InvalidDisk {
                spec: d.name.clone(),
                why: "two disks have this name; name them with NAME=PATH".into(),
            });
        }
        let meta = std::fs::metadata(&d.path).map_err(|source| Error::Io {
            path: d.path.clone(),
            source,
        })?;
        if !meta.is_file() {
            return Err(Error::InvalidDisk {
                spec: d.path.display().to_string(),
                why: "not a regular file (a disk image is needed)".into(),
            });
        }
    }
    Ok(())
}

/// The snapshot phase: one snapshot per disk, as fast as the provider allows. Call it while
/// the guest is quiesced; thaw as soon as it returns.
pub fn take_snapshots(req: &BackupRequest) -> Result<TakenSnapshots, Error> {
    let start = Instant::now();
    let created = Timestamp::now();
    let point = new_point_id(created);
    let mut snapshots = Vec::with_capacity(req.disks.len());
    for d in &req.disks {
        let dest = snapshot_path(req, d, &point);
        let snap =
            bulwark_snapshot::take(&d.path, &dest, req.snapshot.provider).map_err(|source| {
                Error::Snapshot {
                    disk: d.name.clone(),
                    source,
                }
            })?;
        tracing::debug!(disk = %d.name, provider = %snap.provider(), ms = snap.elapsed().as_millis() as u64, "snapshot taken");
        snapshots.push((d.clone(), snap));
    }
    Ok(TakenSnapshots {
        point,
        created,
        snapshots,
        elapsed_ms: start.elapsed().as_millis() as u64,
    })
}

/// Runs a crash-consistent backup: snapshot every disk, transfer, commit the point.
pub async fn backup(
    vault: &Vault,
    req: &BackupRequest,
    progress: Arc<dyn Progress>,
) -> Result<BackupReport, Error> {
    let started = Instant::now();
    check_request(req)?;
    let span = tracing::info_span!("backup", vm = %req.vm);
    async move {
        let req2 = req.clone();
        let taken = tokio::task::spawn_blocking(move || take_snapshots(&req2))
            .await
            .map_err(|e| Error::Worker(e.to_string()))??;
        transfer(
            vault,
            req,
            taken,
            ConsistencyRecord::crash(),
            None,
            progress,
            started,
        )
        .await
    }
    .instrument(span)
    .await
}

/// The transfer phase: every disk in parallel, then the manifests' point is committed.
/// The snapshots are removed when it ends (unless the caller kept them).
///
/// It holds a shared backup lease throughout (`bulwark_vault::lease`): garbage collection
/// cannot start meanwhile, and the point is committed only while the lease is still held.
pub async fn transfer(
    vault: &Vault,
    req: &BackupRequest,
    taken: TakenSnapshots,
    consistency: ConsistencyRecord,
    agent: Option<serde_json::Value>,
    progress: Arc<dyn Progress>,
    started: Instant,
) -> Result<BackupReport, Error> {
    let holder = format!("backup of VM {}", req.vm);
    let lease = Lease::acquire(vault, LeaseKind::Backup, &holder, &req.lease).await?;
    let r = transfer_leased(
        vault,
        req,
        taken,
        consistency,
        agent,
        progress,
        started,
        &lease,
    )
    .await;
    if let Err(e) = lease.release().await {
        tracing::warn!(error = %e, "cannot release the backup lease; it will expire");
    }
    r
}

#[allow(clippy::too_many_arguments)]
async fn transfer_leased(
    vault: &Vault,
    req: &BackupRequest,
    taken: TakenSnapshots,
    consistency: ConsistencyRecord,
    agent: Option<serde_json::Value>,
    progress: Arc<dyn Progress>,
    started: Instant,
    lease: &Lease,
) -> Result<BackupReport, Error> {
    let storage_before = vault.store_stats();
    let transfer_started = Instant::now();
    let previous = vault.latest_point(&req.vm).await?;
    let point = taken.point.clone();
    tracing::info!(point = %point, previous = previous.as_ref().map(|p| p.id.as_str()), "transfer");
    // Change tracking per disk: its base, locked for this backup, where the snapshot is a
    // reflink and tracking is on; else whatever base there is goes (when no other backup of
    // the disk holds it).
    let bases: Vec<Tracking> = taken
        .snapshots
        .iter()
        .map(|(spec, snap)| {
            let want = req.snapshot.change_tracking && snap.provider() == Provider::Reflink;
            let dir = snapshot_dir(req, spec);
            if !want && !Base::exists(&dir, &spec.name) {
                return Tracking::Leave;
            }
            match Base::lock(&dir, &spec.name) {
                Ok(Some(b)) if want => Tracking::Use(Arc::new(b)),
                Ok(Some(b)) => Tracking::Remove(b),
                Ok(None) => {
                    tracing::info!(disk = %spec.name, "another backup of this disk holds its change-tracking base; reading all of it");
                    Tracking::Leave
                }
                Err(e) => {
                    tracing::warn!(disk = %spec.name, error = %e, "cannot lock the change-tracking base; reading all of the disk");
                    Tracking::Leave
                }
            }
        })
        .collect();
    let jobs = taken
        .snapshots
        .iter()
        .zip(&bases)
        .map(|((spec, snap), base)| {
            let prev = previous
                .as_ref()
                .and_then(|p| p.disk(&spec.name).map(|d| (p, d)));
            let span = tracing::info_span!("disk", disk = %spec.name);
            transfer_disk(
                vault,
                &req.vm,
                &point,
                spec,
                snap,
                prev,
                match base {
                    Tracking::Use(b) => Some(b.clone()),
                    _ => None,
                },
                req.upload_concurrency,
                progress.clone(),
            )
            .instrument(span)
        });
    let results = futures::future::try_join_all(jobs).await?;
    let mut disks = Vec::new();
    let mut reports = Vec::new();
    for ((_, snap), (record, prev_id)) in taken.snapshots.iter().zip(results) {
        reports.push(DiskReport {
            name: record.name.clone(),
            size: record.size,
            previous_point: prev_id,
            snapshot: snap.provider().to_string(),
            stats: record.stats.clone(),
        });
        disks.push(record);
    }
    let rp = RecoveryPoint {
        id: point.clone(),
        vm: req.vm.clone(),
        created: taken.created,
        committed: Timestamp::now(),
        consistency: consistency.clone(),
        disks,
        policy: req.policy.clone(),
        agent,
    };
    // Blocks this job found in the vault are safe only while GC is kept out.
    lease.ensure_held()?;
    vault.commit_point(&rp).await?;
    tracing::info!(point = %point, "recovery point committed");
    // The snapshots just committed become the bases of the next backup's change tracking.
    let mut taken = taken;
    for (((spec, snap), base), record) in taken.snapshots.iter_mut().zip(&bases).zip(&rp.disks) {
        let r = match base {
            Tracking::Use(b) => b.replace(snap, &point, &record.manifest_digest, record.block_size),
            Tracking::Remove(b) => b.remove(),
            Tracking::Leave => Ok(()),
        };
        if let Err(e) = r {
            tracing::warn!(disk = %spec.name, error = %e, "cannot keep the change-tracking base; the next backup of this disk reads all of it");
        }
    }
    Ok(BackupReport {
        point,
        vm: req.vm.clone(),
        consistency: consistency.reached,
        consistency_wanted: consistency.wanted,
        consistency_reasons: consistency.reasons,
        freeze_window_ms: consistency.freeze_window_ms,
        snapshot_ms: taken.elapsed_ms,
        duration_ms: started.elapsed().as_millis() as u64,
        disks: reports,
        storage: vault.store_stats().since(&storage_before),
        upload_mib_per_s: {
            let up = vault.store_stats().since(&storage_before).bytes_up as f64;
            up / (1 << 20) as f64 / transfer_started.elapsed().as_secs_f64().max(1e-6)
        },
    })
}

#[allow(clippy::too_many_arguments)]
async fn transfer_disk(
    vault: &Vault,
    vm: &str,
    point: &str,
    spec: &DiskSpec,
    snap: &Snapshot,
    prev: Option<(&RecoveryPoint, &DiskRecord)>,
    base: Option<Arc<Base>>,
    upload_concurrency: usize,
    progress: Arc<dyn Progress>,
) -> Result<(DiskRecord, Option<String>), Error> {
    let start = Instant::now();
    let disk = Disk::open(snap.path()).map_err(|source| Error::Scan {
        disk: spec.name.clone(),
        source,
    })?;
    let options = vault.scan_options();
    let bs = options.block_size;
    // The previous block map of the same disk: unchanged blocks are compared against it.
    let mut prev_id = None;
    let mut unchanged = Vec::new();
    let prev_map: Option<Arc<BlockMap>> = match prev {
        Some((p, d)) if d.block_size == bs.get() => {
            let m = ManifestRef {
                vm,
                disk: &spec.name,
                point: &p.id,
            };
            match vault.get_manifest(&m, &d.manifest_digest).await {
                Ok(map) => {
                    prev_id = Some(p.id.clone());
                    if let Some(base) = base {
                        let (snap_path, point, digest) = (
                            snap.path().to_path_buf(),
                            p.id.clone(),
                            d.manifest_digest.clone(),
                        );
                        let (block_size, size) = (d.block_size, disk.size());
                        unchanged = tokio::task::spawn_blocking(move || {
                            base.unchanged_ranges(&snap_path, &point, &digest, block_size, size)
                        })
                        .await
                        .map_err(|e| Error::Worker(e.to_string()))?;
                    }
                    Some(Arc::new(map))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "previous manifest unreadable: this disk is backed up in full");
                    None
                }
            }
        }
        _ => None,
    };
    // Blocks known to be in the vault: those of the previous map, and those stored by this job.
    let known: Arc<Mutex<HashSet<Address>>> = Arc::new(Mutex::new(
        prev_map
            .as_ref()
            .map(|m| m.addresses().copied().collect())
            .unwrap_or_default(),
    ));
    progress.start(&spec.name, disk.size());
    let mut stats = DiskStats {
        blocks: bs.block_count(disk.size()),
        ..Default::default()
    };
    let mut entries = Vec::with_capacity(stats.blocks as usize);
    let events = scan_tracked(&disk, prev_map, unchanged, &options);
    let mut stored = std::pin::pin!(
        events
            .map(|ev| {
                let known = known.clone();
                async move {
                    let ev = ev.map_err(|source| Error::Scan {
                        disk: spec.name.clone(),
                        source,
                    })?;
                    let outcome = match &ev {
                        BlockEvent::Changed { address, data, .. } => {
                            let seen = known.lock().map(|k| k.contains(address)).unwrap_or(false);
                            if seen {
                                Some(bulwark_vault::PutBlock {
                                    existed: true,
                                    stored_bytes: 0,
                                })
                            } else {
                                let r = vault.put_block(*address, data.clone()).await?;
                                if let Ok(mut k) = known.lock() {
                                    k.insert(*address);
                                }
                                Some(r)
                            }
                        }
                        _ => None,
                    };
                    Ok::<_, Error>((ev, outcome))
                }
            })
            .buffered(upload_concurrency.max(1))
    );
    while let Some(r) = stored.next().await {
        let (ev, outcome) = r?;
        let len = bs.block_len(disk.size(), ev.index());
        match &ev {
            BlockEvent::Zero { hole, .. } => {
                stats.zero_blocks += 1;
                if *hole {
                    stats.hole_blocks += 1;
                } else {
                    stats.bytes_read += len;
                }
            }
            BlockEvent::Unchanged { read, .. } => {
                stats.unchanged_blocks += 1;
                if *read {
                    stats.bytes_read += len;
                } else {
                    stats.blocks_not_read += 1;
                }
            }
            BlockEvent::Changed { .. } => {
                stats.changed_blocks += 1;
                stats.bytes_read += len;
                stats.bytes_changed += len;
                if let Some(o) = outcome {
                    if o.existed {
                        stats.blocks_deduplicated += 1;
                    } else {
                        stats.blocks_uploaded += 1;
                        stats.bytes_new += len;
                        stats.bytes_uploaded += o.stored_bytes;
                    }
                }
            }
        }
        progress.advance(&spec.name, len);
        entries.push(ev.entry());
    }
    let map = BlockMap::new(bs, disk.size(), entries).map_err(|source| Error::Scan {
        disk: spec.name.clone(),
        source,
    })?;
    let (digest, manifest_bytes) = vault
        .put_manifest(
            &ManifestRef {
                vm,
                disk: &spec.name,
                point,
            },
            &map,
        )
        .await?;
    stats.bytes_uploaded += manifest_bytes;
    stats.duration_ms = start.elapsed().as_millis() as u64;
    progress.finish(&spec.name);
    tracing::info!(
        blocks = stats.blocks,
        changed = stats.changed_blocks,
        uploaded = stats.blocks_uploaded,
        bytes_uploaded = stats.bytes_uploaded,
        "disk transferred"
    );
    Ok((
        DiskRecord {
            name: spec.name.clone(),
            size: disk.size(),
            block_size: bs.get(),
            manifest_digest: digest,
            source: spec.path.display().to_string(),
            stats,
        },
        prev_id,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_specs() {
        let d = DiskSpec::parse("os=/var/lib/vm/web.qcow").unwrap();
        assert_eq!(
            (d.name.as_str(), d.path.as_path()),
            ("os", Path::new("/var/lib/vm/web.qcow"))
        );
        let d = DiskSpec::parse("/images/web data.img").unwrap();
        assert_eq!(d.name, "web_data");
        assert!(DiskSpec::parse("..=/a").is_err());
        assert!(DiskSpec::parse("bad name=/a").is_err());
        // A slash before the "=" makes the whole argument a path.
        assert_eq!(DiskSpec::parse("../x=/a").unwrap().name, "a");
        assert!(DiskSpec::parse("a=").is_err());
    }
}
