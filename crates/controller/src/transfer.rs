//! The transfer and commit steps of a backup: every disk in parallel through the block-diff
//! engine against its previous block map, then the manifests, then the recovery point. It
//! reads every disk through [`DiskSource`] and never knows which kind it reads.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bulwark_blockdiff::{
    Address, BlockEvent, BlockMap, BlockMapBuilder, Entry, scan_tracked, union_of,
};
use bulwark_snapshot::{Changes, DiskSource, PreviousDisk};
use bulwark_vault::{
    DiskRecord, DiskStats, Lease, LeaseKind, ManifestRef, PutBlock, RecoveryPoint, Replaced, Vault,
};
use futures::StreamExt;
use jiff::Timestamp;
use tracing::Instrument;

use crate::job::{BackupReport, BackupRequest, DiskReport, Snapped};
use crate::{Error, Observer};

/// The transfer phase: holds a shared backup lease throughout (`bulwark_vault::lease`), so
/// that garbage collection cannot start meanwhile, and commits the point only while the lease
/// is still held. Returns the report and the committed point.
pub(crate) async fn transfer(
    vault: &Vault,
    req: &BackupRequest,
    point: &str,
    created: Timestamp,
    snapped: &Snapped,
    started: Instant,
) -> Result<(BackupReport, RecoveryPoint), Error> {
    let holder = format!("backup of VM {}", req.vm);
    let lease = Lease::acquire(vault, LeaseKind::Backup, &holder, &req.lease)
        .instrument(tracing::info_span!("lease"))
        .await?;
    let r = if req.cancel.is_cancelled() {
        Err(cancelled(req, "before the transfer"))
    } else {
        transfer_leased(vault, req, point, created, snapped, started, &lease).await
    };
    if let Err(e) = lease
        .release()
        .instrument(tracing::info_span!("lease_release"))
        .await
    {
        tracing::warn!(error = %e, "cannot release the backup lease; it will expire");
    }
    r
}

async fn transfer_leased(
    vault: &Vault,
    req: &BackupRequest,
    point: &str,
    created: Timestamp,
    snapped: &Snapped,
    started: Instant,
    lease: &Lease,
) -> Result<(BackupReport, RecoveryPoint), Error> {
    let storage_before = vault.store_stats();
    let transfer_started = Instant::now();
    let previous = vault
        .latest_point(&req.vm)
        .instrument(tracing::info_span!("latest_point"))
        .await?;
    tracing::info!(
        point,
        previous = previous.as_ref().map(|p| p.id.as_str()),
        "transfer"
    );
    // Blocks `verify` found damaged or missing: never reused unread, healed from the disk.
    let bad: BTreeMap<Address, String> = vault
        .known_bad_blocks()
        .await?
        .into_iter()
        .map(|(a, r)| (a, format!("{} ({})", r.key, r.why)))
        .collect();
    if !bad.is_empty() {
        tracing::warn!(
            blocks = bad.len(),
            "the vault has blocks known bad: this backup re-reads them"
        );
    }
    let job = DiskJob {
        vault,
        vm: &req.vm,
        point,
        upload_concurrency: req.upload_concurrency,
        observer: req.observer.as_ref(),
        bad: Mutex::new(bad),
        check_known: req.check_known,
        cancel: &req.cancel,
    };
    let transfers = snapped.sources.iter().map(|source| {
        let prev = previous
            .as_ref()
            .and_then(|p| p.disk(source.name()).map(|d| (p, d)));
        let span = tracing::info_span!("disk", disk = %source.name());
        job.run(source.as_ref(), prev).instrument(span)
    });
    let results = futures::future::try_join_all(transfers).await?;
    let (disks, reports): (Vec<_>, Vec<_>) = results.into_iter().unzip();
    job.refuse_known_bad(&disks).await?;
    let rp = RecoveryPoint {
        id: point.to_string(),
        vm: req.vm.clone(),
        created,
        committed: Timestamp::now(),
        consistency: snapped.consistency.clone(),
        disks,
        policy: req.policy.clone(),
        agent: snapped.agent.clone(),
    };
    // The last safe point: a cancel that came during the manifests commits nothing.
    if req.cancel.is_cancelled() {
        return Err(cancelled(req, "before the commit"));
    }
    // Blocks this job found in the vault are safe only while GC is kept out: the commit runs
    // under the lease, with a deadline no retry can outlive.
    vault
        .commit_point_held(lease, &rp)
        .instrument(tracing::info_span!("commit"))
        .await?;
    tracing::info!(point, "recovery point committed");
    let storage = vault.store_stats().since(&storage_before);
    let c = &snapped.consistency;
    let report = BackupReport {
        point: point.to_string(),
        vm: req.vm.clone(),
        consistency: c.reached,
        consistency_wanted: c.wanted,
        consistency_reasons: c.reasons.clone(),
        freeze_window_ms: c.freeze_window_ms,
        snapshot_ms: snapped.elapsed_ms,
        duration_ms: started.elapsed().as_millis() as u64,
        disks: reports,
        upload_mib_per_s: storage.bytes_up as f64
            / (1 << 20) as f64
            / transfer_started.elapsed().as_secs_f64().max(1e-6),
        storage,
    };
    Ok((report, rp))
}

fn cancelled(req: &BackupRequest, at: &str) -> Error {
    tracing::warn!(at, "backup cancelled: nothing is committed");
    Error::Cancelled {
        vm: req.vm.clone(),
        at: at.to_string(),
    }
}

/// What every disk of one job shares.
struct DiskJob<'a> {
    vault: &'a Vault,
    vm: &'a str,
    point: &'a str,
    upload_concurrency: usize,
    observer: &'a dyn Observer,
    /// Blocks known bad (address → key and why), less those this job healed.
    bad: Mutex<BTreeMap<Address, String>>,
    /// HEAD each block of the previous map before reusing it.
    check_known: bool,
    cancel: &'a tokio_util::sync::CancellationToken,
}

/// What the previous point gives a disk's transfer.
#[derive(Default)]
struct Baseline {
    /// The previous point's id, when its manifest was usable.
    point: Option<String>,
    map: Option<Arc<BlockMap>>,
    unchanged: Vec<std::ops::Range<u64>>,
    /// Why nothing is known unchanged, when the source said.
    unknown: Option<String>,
}

impl DiskJob<'_> {
    /// One disk: compare against the previous map, store what changed, write the manifest.
    async fn run(
        &self,
        source: &dyn DiskSource,
        prev: Option<(&RecoveryPoint, &DiskRecord)>,
    ) -> Result<(DiskRecord, DiskReport), Error> {
        let start = Instant::now();
        let baseline = self
            .baseline(source, prev)
            .instrument(tracing::info_span!("baseline"))
            .await?;
        let (map, mut stats) = self
            .scan_and_store(source, &baseline)
            .instrument(tracing::info_span!("scan"))
            .await?;
        let name = source.name();
        // The reads are over: the source says whether its point in time held throughout (and
        // frees what served them) while the manifest is written. Both must succeed before
        // the commit.
        let manifest_ref = ManifestRef {
            vm: self.vm,
            disk: name,
            point: self.point,
        };
        let (ended, manifest) = tokio::join!(
            source
                .end_read()
                .instrument(tracing::info_span!("end_read")),
            self.vault
                .put_manifest(&manifest_ref, &map)
                .instrument(tracing::info_span!("manifest")),
        );
        ended.map_err(|source| Error::Snapshot {
            vm: self.vm.to_string(),
            source,
        })?;
        let (digest, manifest_bytes) = manifest?;
        stats.bytes_uploaded += manifest_bytes;
        stats.duration_ms = start.elapsed().as_millis() as u64;
        self.observer.finish(name);
        tracing::info!(
            blocks = stats.blocks,
            changed = stats.changed_blocks,
            uploaded = stats.blocks_uploaded,
            bytes_uploaded = stats.bytes_uploaded,
            "disk transferred"
        );
        let record = DiskRecord {
            name: name.to_string(),
            size: map.disk_size(),
            block_size: map.block_size().get(),
            manifest_digest: digest,
            source: source.origin(),
            stats: stats.clone(),
            tracking: source.tracking(),
        };
        let report = DiskReport {
            name: name.to_string(),
            size: map.disk_size(),
            previous_point: baseline.point,
            snapshot: source.kind().to_string(),
            change_tracking: baseline.unknown,
            stats,
        };
        Ok((record, report))
    }

    /// The previous block map of the same disk (unchanged blocks are compared against it), and
    /// what the source knows unchanged since.
    async fn baseline(
        &self,
        source: &dyn DiskSource,
        prev: Option<(&RecoveryPoint, &DiskRecord)>,
    ) -> Result<Baseline, Error> {
        let bs = self.vault.scan_options().block_size;
        let Some((p, d)) = prev.filter(|(_, d)| d.block_size == bs.get()) else {
            return Ok(Baseline::default());
        };
        let m = ManifestRef {
            vm: self.vm,
            disk: source.name(),
            point: &p.id,
        };
        let map = match self
            .vault
            .get_manifest(&m, &d.manifest_digest)
            .instrument(tracing::info_span!("previous_manifest"))
            .await
        {
            Ok(map) => map,
            Err(e) => {
                tracing::warn!(error = %e, "previous manifest unreadable: this disk is backed up in full");
                return Ok(Baseline::default());
            }
        };
        if self.check_known {
            self.check_addresses(&map).await?;
        }
        let previous = PreviousDisk {
            point: p.id.clone(),
            manifest_digest: d.manifest_digest.clone(),
            size: d.size,
            tracking: d.tracking.clone(),
        };
        let (unchanged, unknown) = match source
            .changes_since(&previous)
            .instrument(tracing::info_span!("changes_since"))
            .await
        {
            Ok(Changes::Unchanged(r)) => (r, None),
            Ok(Changes::Unknown { reason }) => (Vec::new(), Some(reason)),
            // Tracking is an optimisation: its failure means a full read, never a failed job.
            Err(e) => {
                tracing::warn!(error = %e, "change tracking failed; reading the whole disk");
                (Vec::new(), Some(format!("change tracking failed: {e}")))
            }
        };
        let (map, unchanged) = self.without_bad(map, unchanged)?;
        Ok(Baseline {
            point: Some(p.id.clone()),
            map: Some(Arc::new(map)),
            unchanged,
            unknown,
        })
    }

    /// `--check-known`: HEADs every distinct block of `map`; a missing one joins the
    /// known-bad set (it is read from the disk again and stored anew).
    async fn check_addresses(&self, map: &BlockMap) -> Result<(), Error> {
        let distinct: HashSet<Address> = map.addresses().copied().collect();
        let mut heads = futures::stream::iter(distinct)
            .map(|a| async move { (a, self.vault.has_block(&a).await) })
            .buffer_unordered(self.vault.concurrency());
        while let Some((a, r)) = heads.next().await {
            if !r? {
                tracing::warn!(block = %a.to_hex(), "a block of the previous point is missing from the vault");
                if let Ok(mut bad) = self.bad.lock() {
                    bad.entry(a).or_insert_with(|| {
                        format!("blocks/{}/{} (missing)", &a.to_hex()[..2], a.to_hex())
                    });
                }
            }
        }
        Ok(())
    }

    /// The previous map and the ranges known unchanged, with every block known bad taken out
    /// of both: such a block is read again, and its data re-stored when it still matches.
    fn without_bad(
        &self,
        map: BlockMap,
        unchanged: Vec<std::ops::Range<u64>>,
    ) -> Result<(BlockMap, Vec<std::ops::Range<u64>>), Error> {
        let bad = self.bad.lock().map(|b| b.clone()).unwrap_or_default();
        let bs = map.block_size();
        let holes: Vec<std::ops::Range<u64>> = map
            .data_blocks()
            .filter(|(_, e)| matches!(e, Entry::Data { address, .. } if bad.contains_key(address)))
            .map(|(i, _)| {
                let start = i * bs.bytes();
                start..start + map.block_len(i)
            })
            .collect();
        if holes.is_empty() {
            return Ok((map, unchanged));
        }
        // No previous entry for those: they are read and hashed like new blocks. Only the data
        // blocks are visited.
        let scan_err = |source| Error::Scan {
            disk: "previous map".into(),
            source,
        };
        let mut kept = BlockMapBuilder::new(bs, map.disk_size(), None);
        let mut at = 0;
        for (i, e) in map.data_blocks() {
            kept.push_zeros(at..i).map_err(scan_err)?;
            let is_bad = matches!(e, Entry::Data { address, .. } if bad.contains_key(&address));
            kept.push(if is_bad { Entry::Zero } else { e })
                .map_err(scan_err)?;
            at = i + 1;
        }
        kept.push_zeros(at..map.block_count()).map_err(scan_err)?;
        let map = kept.finish().map_err(scan_err)?;
        tracing::info!(blocks = holes.len(), "re-reading blocks known bad");
        Ok((map, cut_ranges(unchanged, &holes)))
    }

    /// Fails when a manifest of this job still references a block known bad (its data was
    /// not on the disk any more): such a point is never committed.
    async fn refuse_known_bad(&self, disks: &[DiskRecord]) -> Result<(), Error> {
        let bad = self.bad.lock().map(|b| b.clone()).unwrap_or_default();
        if bad.is_empty() {
            return Ok(());
        }
        for d in disks {
            let m = ManifestRef {
                vm: self.vm,
                disk: &d.name,
                point: self.point,
            };
            let map = self.vault.get_manifest(&m, &d.manifest_digest).await?;
            let hits: std::collections::BTreeSet<&Address> =
                map.addresses().filter(|a| bad.contains_key(*a)).collect();
            if !hits.is_empty() {
                return Err(Error::KnownBad {
                    what: format!("VM {} point {} disk {}", self.vm, self.point, d.name),
                    blocks: hits.into_iter().map(|a| bad[a].clone()).collect(),
                });
            }
        }
        Ok(())
    }

    /// Scans the source and stores every changed block the vault does not hold yet; returns
    /// the new block map and the statistics.
    async fn scan_and_store(
        &self,
        source: &dyn DiskSource,
        baseline: &Baseline,
    ) -> Result<(BlockMap, DiskStats), Error> {
        let name = source.name();
        let reader = source.reader();
        let size = reader.size();
        let options = self.vault.scan_options();
        let bs = options.block_size;
        let scan_err = |source| Error::Scan {
            disk: name.to_string(),
            source,
        };
        // Blocks known to be in the vault: those of the previous map (bad ones were taken out
        // of it), and those stored here.
        let known: Arc<Mutex<HashSet<Address>>> = Arc::new(Mutex::new(
            baseline
                .map
                .as_ref()
                .map(|m| m.addresses().copied().collect())
                .unwrap_or_default(),
        ));
        self.observer.start(name, size);
        let mut stats = DiskStats {
            blocks: bs.block_count(size),
            ..Default::default()
        };
        let mut map = BlockMapBuilder::new(bs, size, baseline.map.clone());
        // What tracking says is unchanged, sorted and merged: a changed block's untouched
        // spans let the vault reuse the replaced block's compressed frames without comparing
        // their bytes.
        let untouched = Arc::new(union_of(baseline.unchanged.clone()));
        let events = scan_tracked(
            reader,
            baseline.map.clone(),
            baseline.unchanged.clone(),
            &options,
        );
        let mut stored = std::pin::pin!(
            events
                .map(|ev| {
                    let known = known.clone();
                    let untouched = untouched.clone();
                    async move {
                        let ev = ev.map_err(scan_err)?;
                        let replaced = replaced(&ev, baseline.map.as_deref(), &untouched, bs);
                        let put = self.store(&ev, &known, replaced).await?;
                        Ok::<_, Error>((ev, put))
                    }
                })
                .buffered(self.upload_concurrency.max(1))
        );
        loop {
            // Between blocks is a safe point: what was stored stays unreferenced until GC.
            let next = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => None,
                n = stored.next() => Some(n),
            };
            let Some(next) = next else {
                return Err(Error::Cancelled {
                    vm: self.vm.to_string(),
                    at: format!("during the transfer of disk {name}"),
                });
            };
            let Some(r) = next else { break };
            let (ev, put) = r?;
            let blocks = ev.blocks();
            // The bytes of the event's blocks (the last block of the disk may be short).
            let len = (blocks.end * bs.bytes()).min(size) - (blocks.start * bs.bytes()).min(size);
            count(&mut stats, &ev, put, len, baseline.map.as_deref());
            self.observer.advance(name, len);
            map.push_event(&ev).map_err(scan_err)?;
        }
        let map = map.finish().map_err(scan_err)?;
        Ok((map, stats))
    }

    /// Stores a changed block unless the vault holds it already (a block known bad is
    /// stored anew: `true` beside the outcome says it was healed).
    async fn store(
        &self,
        ev: &BlockEvent,
        known: &Mutex<HashSet<Address>>,
        replaced: Option<Replaced>,
    ) -> Result<Option<(PutBlock, bool)>, Error> {
        let BlockEvent::Changed { address, data, .. } = ev else {
            return Ok(None);
        };
        if known.lock().map(|k| k.contains(address)).unwrap_or(false) {
            return Ok(Some((
                PutBlock {
                    existed: true,
                    ..PutBlock::default()
                },
                false,
            )));
        }
        let is_bad = self
            .bad
            .lock()
            .map(|b| b.contains_key(address))
            .unwrap_or(false);
        if is_bad {
            // The disk still holds the block's data: store it over the damaged object (or in
            // place of the missing one), read back verified, and clear its record.
            let stored = self.vault.repair_block(*address, data.clone()).await?;
            tracing::info!(block = %address.to_hex(), "healed a block known bad");
            if let Ok(mut b) = self.bad.lock() {
                b.remove(address);
            }
            if let Ok(mut k) = known.lock() {
                k.insert(*address);
            }
            return Ok(Some((
                PutBlock {
                    existed: false,
                    stored_bytes: stored,
                    ..PutBlock::default()
                },
                true,
            )));
        }
        let r = self
            .vault
            .put_block_replacing(*address, data.clone(), replaced)
            .await?;
        if let Ok(mut k) = known.lock() {
            k.insert(*address);
        }
        Ok(Some((r, false)))
    }
}

/// For a changed block that had data at the previous point: that block, and the spans of it
/// that `untouched` (sorted, merged; disk offsets) covers, relative to the block's start (none
/// without tracking: the vault then compares every span's bytes). `None` when the block had no
/// data at the previous point (nothing to reuse).
fn replaced(
    ev: &BlockEvent,
    previous: Option<&BlockMap>,
    untouched: &[std::ops::Range<u64>],
    bs: bulwark_blockdiff::BlockSize,
) -> Option<Replaced> {
    let BlockEvent::Changed { index, data, .. } = ev else {
        return None;
    };
    let Some(Entry::Data { address, .. }) = previous?.entry(*index) else {
        return None;
    };
    let start = index.checked_mul(bs.bytes())?;
    let end = start.checked_add(data.len() as u64)?;
    let first = untouched.partition_point(|r| r.end <= start);
    let spans: Vec<std::ops::Range<u64>> = untouched[first..]
        .iter()
        .take_while(|r| r.start < end)
        .map(|r| r.start.max(start) - start..r.end.min(end) - start)
        .collect();
    Some(Replaced {
        address,
        untouched: spans,
    })
}

/// `ranges` less every range of `holes`.
fn cut_ranges(
    ranges: Vec<std::ops::Range<u64>>,
    holes: &[std::ops::Range<u64>],
) -> Vec<std::ops::Range<u64>> {
    let mut out = ranges;
    for h in holes {
        out = out
            .into_iter()
            .flat_map(|r| {
                let left = r.start..r.end.min(h.start);
                let right = r.start.max(h.end)..r.end;
                [left, right].into_iter().filter(|x| x.start < x.end)
            })
            .collect();
    }
    out
}

/// Adds the outcome of one event (one block, or a run of `len` bytes of blocks) to the disk's
/// statistics; `previous` is the map carried-over runs come from.
fn count(
    stats: &mut DiskStats,
    ev: &BlockEvent,
    put: Option<(PutBlock, bool)>,
    len: u64,
    previous: Option<&BlockMap>,
) {
    match ev {
        BlockEvent::Zero { blocks, hole } => {
            let n = blocks.end - blocks.start;
            stats.zero_blocks += n;
            if *hole {
                stats.hole_blocks += n;
            } else {
                stats.bytes_read += len;
            }
        }
        // Not read: the previous map's data blocks count as unchanged, its zero blocks as
        // holes (what they were before runs were carried over whole).
        BlockEvent::Carried { blocks } => {
            let n = blocks.end - blocks.start;
            let data = previous.map_or(0, |p| p.data_in(blocks.clone()));
            stats.unchanged_blocks += data;
            stats.blocks_not_read += data;
            stats.zero_blocks += n - data;
            stats.hole_blocks += n - data;
        }
        BlockEvent::Unchanged { .. } => {
            stats.unchanged_blocks += 1;
            stats.bytes_read += len;
        }
        BlockEvent::Changed { .. } => {
            stats.changed_blocks += 1;
            stats.bytes_read += len;
            stats.bytes_changed += len;
            if let Some((o, healed)) = put {
                if healed {
                    stats.blocks_healed += 1;
                }
                if o.existed {
                    stats.blocks_deduplicated += 1;
                } else {
                    stats.blocks_uploaded += 1;
                    stats.bytes_new += len;
                    stats.bytes_reused += o.reused_bytes;
                    stats.bytes_uploaded += o.stored_bytes;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulwark_blockdiff::BlockSize;
    use bytes::Bytes;

    fn changed(index: u64, len: usize) -> BlockEvent {
        BlockEvent::Changed {
            index,
            change: 0,
            address: Address([index as u8; 32]),
            data: Bytes::from(vec![0u8; len]),
        }
    }

    #[test]
    fn a_changed_block_names_the_block_it_replaces_and_its_untouched_spans() {
        let bs = BlockSize::new(1 << 20).unwrap();
        let old = |i: u8| Entry::Data {
            change: 1,
            address: Address([100 + i; 32]),
        };
        // Blocks 0 and 2 had data, block 1 was zero; the last block (3) is 4 KiB short.
        let map = BlockMap::new(
            bs,
            (4 << 20) - 4096,
            vec![old(0), Entry::Zero, old(2), old(3)],
        )
        .unwrap();
        let mib = 1u64 << 20;
        let untouched = union_of(vec![
            0..100,
            mib / 2..2 * mib + 4096,
            3 * mib + 8192..4 * mib,
        ]);
        let r = replaced(&changed(0, 1 << 20), Some(&map), &untouched, bs).unwrap();
        assert_eq!(r.address, Address([100; 32]));
        assert_eq!(r.untouched, vec![0..100, mib / 2..mib]);
        let r = replaced(&changed(2, 1 << 20), Some(&map), &untouched, bs).unwrap();
        assert_eq!(
            r.untouched,
            vec![0..4096],
            "the range across the boundary, cut to the block"
        );
        let r = replaced(&changed(3, (1 << 20) - 4096), Some(&map), &untouched, bs).unwrap();
        assert_eq!(
            r.untouched,
            vec![8192..mib - 4096],
            "cut to the short last block"
        );
        assert_eq!(
            replaced(&changed(1, 1 << 20), Some(&map), &untouched, bs),
            None,
            "was zero"
        );
        assert_eq!(
            replaced(&changed(0, 1 << 20), None, &untouched, bs),
            None,
            "no previous map"
        );
        assert_eq!(
            replaced(&changed(0, 1 << 20), Some(&map), &[], bs),
            Some(Replaced {
                address: Address([100; 32]),
                untouched: Vec::new()
            }),
            "nothing untouched: the vault compares every span"
        );
        let unchanged = BlockEvent::Unchanged {
            index: 0,
            entry: old(0),
        };
        assert_eq!(replaced(&unchanged, Some(&map), &untouched, bs), None);
    }

    /// Image snapshots whose sources say, at the end of the reads, that their point in time
    /// did not hold (as a QEMU source whose copy-before-write job stopped).
    #[derive(Debug)]
    struct NotHeld(bulwark_snapshot::ImageSnapshotter);

    #[derive(Debug)]
    struct NotHeldPending(Box<dyn bulwark_snapshot::PendingSnapshot>);

    #[derive(Debug)]
    struct NotHeldDisk(Box<dyn DiskSource>);

    #[async_trait::async_trait]
    impl bulwark_snapshot::Snapshotter for NotHeld {
        async fn prepare(
            &self,
            vm: &str,
            point: &str,
        ) -> Result<Box<dyn bulwark_snapshot::PendingSnapshot>, bulwark_snapshot::Error> {
            Ok(Box::new(NotHeldPending(self.0.prepare(vm, point).await?)))
        }
    }

    #[async_trait::async_trait]
    impl bulwark_snapshot::PendingSnapshot for NotHeldPending {
        async fn take(
            self: Box<Self>,
        ) -> Result<Vec<Box<dyn DiskSource>>, bulwark_snapshot::Error> {
            Ok(self
                .0
                .take()
                .await?
                .into_iter()
                .map(|d| Box::new(NotHeldDisk(d)) as Box<dyn DiskSource>)
                .collect())
        }
    }

    #[async_trait::async_trait]
    impl DiskSource for NotHeldDisk {
        fn name(&self) -> &str {
            self.0.name()
        }
        fn kind(&self) -> &str {
            self.0.kind()
        }
        fn reader(&self) -> Arc<dyn bulwark_blockdiff::BlockSource> {
            self.0.reader()
        }
        async fn changes_since(
            &self,
            previous: &PreviousDisk,
        ) -> Result<Changes, bulwark_snapshot::Error> {
            self.0.changes_since(previous).await
        }
        fn tracking(&self) -> Option<bulwark_snapshot::Tracking> {
            self.0.tracking()
        }
        async fn end_read(&self) -> Result<(), bulwark_snapshot::Error> {
            Err(bulwark_snapshot::Error::Io {
                path: "not-held".into(),
                source: std::io::Error::other("the point in time did not hold"),
            })
        }
        async fn release(
            self: Box<Self>,
            outcome: bulwark_snapshot::Outcome,
        ) -> Result<bulwark_snapshot::Released, bulwark_snapshot::Error> {
            self.0.release(outcome).await
        }
    }

    #[tokio::test]
    async fn a_source_whose_point_did_not_hold_commits_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("os.img");
        std::fs::write(&img, vec![7u8; 3 << 20]).unwrap();
        let disk = bulwark_snapshot::ImageDisk::parse(&format!("os={}", img.display())).unwrap();
        let images = bulwark_snapshot::ImageSnapshotter::new(vec![disk]).unwrap();
        let vault = Vault::create("memory:", &Default::default()).await.unwrap();
        let req = BackupRequest::new("vm1", Arc::new(NotHeld(images.clone())));
        let err = crate::run_backup(req, &vault).await.unwrap_err();
        assert!(
            err.to_string().contains("the point in time did not hold"),
            "{err}"
        );
        assert!(vault.list_points(None).await.unwrap().points.is_empty());
        // The same disk through the plain source commits.
        let req = BackupRequest::new("vm1", Arc::new(images));
        crate::run_backup(req, &vault).await.unwrap();
        assert_eq!(vault.list_points(None).await.unwrap().points.len(), 1);
    }
}
