//! Garbage collection: frees the blocks and manifests no recovery point needs any more.
//!
//! 1. Take the exclusive `gc` [lease](crate::lease): no backup, prune or undelete runs while
//!    GC does (GC refuses to start while one holds a lease).
//! 2. **Mark**: read every live point and every soft-deleted point, and every manifest they
//!    pin; the blocks referenced are marked. If any point, tombstone or manifest cannot be
//!    read, GC stops with [`Error::GcAborted`] before deleting anything: blocks are never
//!    freed on partial knowledge.
//! 3. **Sweep**: delete every block that is not marked *and* older than the grace period
//!    (its last-modified time is before `now - grace`), and every manifest that belongs to no
//!    point and is older than the grace period. The grace period protects objects written by
//!    a writer that does not take leases (or whose clock is off) and not yet referenced by a
//!    committed point; the lease is what protects a running backup, which may reuse (dedup)
//!    an old unreferenced block without rewriting it.
//!
//! GC checks its lease before every delete, and stops if it was lost.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bulwark_blockdiff::Address;
use futures::{StreamExt, TryStreamExt};
use jiff::Timestamp;
use object_store::path::Path as ObjPath;
use object_store::{ObjectMeta, ObjectStoreExt};
use serde::Serialize;
use tracing::Instrument;

use crate::lease::{Lease, LeaseKind, LeaseOptions, minus};
use crate::{Error, ManifestRef, Vault, manifest_key};

/// Options of [`Vault::gc`].
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Unreferenced objects younger than this are kept.
    pub grace: Duration,
    /// Only count what would be freed.
    pub dry_run: bool,
    /// How to take the gc lease (by default: refuse at once if a backup or prune runs).
    pub lease: LeaseOptions,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            grace: Duration::from_secs(3600),
            dry_run: false,
            lease: LeaseOptions::default(),
        }
    }
}

/// What GC did (or, with `dry_run`, would do).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct GcReport {
    /// Nothing was deleted.
    pub dry_run: bool,
    /// The grace period, seconds.
    pub grace_secs: u64,
    /// Live points read.
    pub live_points: usize,
    /// Soft-deleted points read.
    pub deleted_points: usize,
    /// Manifests read (all of them pinned by a live or soft-deleted point).
    pub manifests_read: usize,
    /// Distinct blocks referenced.
    pub blocks_referenced: usize,
    /// Blocks found in the vault.
    pub blocks_seen: usize,
    /// Unreferenced blocks freed.
    pub blocks_freed: usize,
    /// Stored bytes of the blocks freed.
    pub bytes_freed: u64,
    /// Unreferenced blocks kept because they are younger than the grace period.
    pub blocks_young: usize,
    /// Orphan manifests (of no point) freed.
    pub manifests_freed: usize,
    /// Stored bytes of the manifests freed.
    pub manifest_bytes_freed: u64,
    /// Orphan manifests kept because they are younger than the grace period.
    pub manifests_young: usize,
    /// Expired leases removed.
    pub expired_leases_removed: usize,
    /// Wall time, milliseconds.
    pub duration_ms: u64,
    /// On an immutable vault: the locks extended and the versions swept. There, the frees
    /// above are deletes that only hide an object (a delete marker); its space comes back
    /// when a sweep deletes its versions after the retention (`version_bytes_freed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub immutable: Option<crate::immutable_gc::ImmutableGcReport>,
}

/// What the mark phase found.
struct Marked {
    /// Keys of the manifests some point pins.
    manifests: HashSet<String>,
    /// Blocks those manifests reference.
    blocks: HashSet<Address>,
}

/// Whether `meta` was modified at or after `cutoff` (unknown times count as young).
fn young(meta: &ObjectMeta, cutoff: Timestamp) -> bool {
    Timestamp::from_millisecond(meta.last_modified.timestamp_millis())
        .map(|t| t >= cutoff)
        .unwrap_or(true)
}

/// What to do with one object.
enum Verdict {
    Keep,
    Young,
    Free,
}

impl Vault {
    /// Runs garbage collection (see the module documentation).
    pub async fn gc(&self, options: &GcOptions) -> Result<GcReport, Error> {
        let started = Instant::now();
        let span = tracing::info_span!("gc", vault = %self.location, dry_run = options.dry_run);
        async move {
            let lease = Lease::acquire(self, LeaseKind::Gc, "bulwark gc", &options.lease).await?;
            let r = self.gc_locked(&lease, options, started).await;
            let released = lease.release().await;
            let report = r?;
            released?;
            Ok(report)
        }
        .instrument(span)
        .await
    }

    async fn gc_locked(
        &self,
        lease: &Lease,
        options: &GcOptions,
        started: Instant,
    ) -> Result<GcReport, Error> {
        let mut report = GcReport {
            dry_run: options.dry_run,
            grace_secs: options.grace.as_secs(),
            ..Default::default()
        };
        let marked = self.gc_mark(&mut report).await?;
        // Sweep.
        // On the store's clock, like `last_modified`: a host whose clock runs ahead must not
        // take a young block for an old one.
        let cutoff = minus(lease.store_now(), options.grace);
        let mut doomed = self
            .gc_sweep_blocks(&marked.blocks, cutoff, &mut report)
            .await?;
        doomed.extend(
            self.gc_sweep_manifests(&marked.manifests, cutoff, &mut report)
                .await?,
        );
        if !options.dry_run {
            self.gc_delete(lease, doomed, &mut report).await?;
        }
        if let Some(imm) = self.config.immutable.clone() {
            let referenced = crate::immutable_gc::Referenced {
                blocks: &marked.blocks,
                manifests: &marked.manifests,
            };
            report.immutable = Some(
                self.gc_immutable(lease, &imm, &referenced, options.dry_run)
                    .await?,
            );
        }
        report.duration_ms = started.elapsed().as_millis() as u64;
        tracing::info!(
            blocks_freed = report.blocks_freed,
            bytes_freed = report.bytes_freed,
            manifests_freed = report.manifests_freed,
            "gc done"
        );
        Ok(report)
    }

    /// Mark: every manifest key a live or soft-deleted point pins, and every block they
    /// reference. Any unreadable point, tombstone or manifest aborts GC.
    async fn gc_mark(&self, report: &mut GcReport) -> Result<Marked, Error> {
        // Mark. Live points first, then tombstones: a point being moved is always in one of
        // the two (and no prune moves points while GC holds its lease anyway).
        let live = self.list_points(None).await?;
        if let Some((key, e)) = live.broken.first() {
            return Err(Error::GcAborted {
                key: key.clone(),
                why: e.to_string(),
            });
        }
        let deleted = self.list_deleted(None).await?;
        if let Some((key, e)) = deleted.broken.first() {
            return Err(Error::GcAborted {
                key: key.clone(),
                why: e.to_string(),
            });
        }
        report.live_points = live.points.len();
        report.deleted_points = deleted.points.len();
        // On an immutable vault, points hidden by a delete marker prune did not write (no
        // tombstone) keep their blocks: a stolen credential must not erase them by way of GC.
        let hidden = if self.config.immutable.is_some() {
            self.hidden_points().await?
        } else {
            Vec::new()
        };
        let points: Vec<_> = live
            .points
            .iter()
            .chain(deleted.points.iter().map(|d| &d.point))
            .chain(hidden.iter())
            .collect();
        let mut manifests = HashSet::new();
        let mut wanted = Vec::new();
        for p in &points {
            for d in &p.disks {
                let key = manifest_key(&ManifestRef {
                    vm: &p.vm,
                    disk: &d.name,
                    point: &p.id,
                });
                if manifests.insert(key.to_string()) {
                    wanted.push((
                        p.vm.clone(),
                        d.name.clone(),
                        p.id.clone(),
                        d.manifest_digest.clone(),
                    ));
                }
            }
        }
        let mut maps = futures::stream::iter(wanted)
            .map(|(vm, disk, id, digest)| async move {
                let m = ManifestRef {
                    vm: &vm,
                    disk: &disk,
                    point: &id,
                };
                let r = self.get_manifest(&m, &digest).await;
                (m.to_string(), r)
            })
            .buffer_unordered(self.concurrency());
        let mut marked: HashSet<Address> = HashSet::new();
        while let Some((key, r)) = maps.next().await {
            match r {
                Ok(map) => {
                    report.manifests_read += 1;
                    marked.extend(map.addresses().copied());
                }
                Err(e) => {
                    return Err(Error::GcAborted {
                        key,
                        why: e.to_string(),
                    });
                }
            }
        }
        drop(maps);
        report.blocks_referenced = marked.len();
        tracing::info!(
            points = report.live_points,
            deleted = report.deleted_points,
            blocks = marked.len(),
            "gc mark done"
        );
        Ok(Marked {
            manifests,
            blocks: marked,
        })
    }

    /// The unreferenced blocks older than `cutoff`. Blocks are streamed, not collected:
    /// memory grows with the blocks to free only.
    async fn gc_sweep_blocks(
        &self,
        marked: &HashSet<Address>,
        cutoff: Timestamp,
        report: &mut GcReport,
    ) -> Result<Vec<ObjPath>, Error> {
        let prefix = ObjPath::from("blocks");
        let mut blocks = self.store.list(Some(&prefix));
        let mut doomed = Vec::new();
        while let Some(meta) = blocks
            .try_next()
            .await
            .map_err(|e| Error::store(&prefix, e))?
        {
            let address = meta.location.filename().and_then(Address::from_hex);
            let Some(address) = address else {
                tracing::warn!(key = %meta.location, "not a block key; left alone");
                continue;
            };
            report.blocks_seen += 1;
            let verdict = if marked.contains(&address) {
                Verdict::Keep
            } else if young(&meta, cutoff) {
                Verdict::Young
            } else {
                Verdict::Free
            };
            match verdict {
                Verdict::Keep => {}
                Verdict::Young => report.blocks_young += 1,
                Verdict::Free => {
                    report.blocks_freed += 1;
                    report.bytes_freed += meta.size;
                    doomed.push(meta.location);
                }
            }
        }
        Ok(doomed)
    }

    /// The manifests of no point older than `cutoff`.
    async fn gc_sweep_manifests(
        &self,
        pinned: &HashSet<String>,
        cutoff: Timestamp,
        report: &mut GcReport,
    ) -> Result<Vec<ObjPath>, Error> {
        let mut doomed = Vec::new();
        let prefix = ObjPath::from("manifests");
        let metas: Vec<ObjectMeta> = self
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| Error::store(&prefix, e))?;
        for meta in metas {
            if pinned.contains(meta.location.as_ref()) {
                continue;
            }
            if !meta.location.as_ref().ends_with(".bmap") {
                tracing::warn!(key = %meta.location, "not a manifest key; left alone");
                continue;
            }
            if young(&meta, cutoff) {
                report.manifests_young += 1;
            } else {
                report.manifests_freed += 1;
                report.manifest_bytes_freed += meta.size;
                doomed.push(meta.location);
            }
        }
        Ok(doomed)
    }

    /// Deletes `doomed` (each under the lease, with a deadline it cannot outlive), then the expired leases seen.
    async fn gc_delete(
        &self,
        lease: &Lease,
        doomed: Vec<ObjPath>,
        report: &mut GcReport,
    ) -> Result<(), Error> {
        let mut deletes = futures::stream::iter(doomed)
            .map(|key| async move {
                let delete = async {
                    match self.store.delete(&key).await {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                        Err(e) => Err(Error::store(&key, e)),
                    }
                };
                lease.held("a delete", delete).await
            })
            .buffer_unordered(self.concurrency());
        while let Some(r) = deletes.next().await {
            r?;
        }
        for key in lease.expired_seen() {
            let key = ObjPath::from(key.as_str());
            if self.store.delete(&key).await.is_ok() {
                report.expired_leases_removed += 1;
            }
        }
        Ok(())
    }
}
