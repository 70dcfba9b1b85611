//! Soft delete, undelete and purge of recovery points.
//!
//! Pruning moves a point from `points/<vm>/<id>.json` to a tombstone
//! `deleted/points/<vm>/<id>.json`: a JSON record with the time and reason of the deletion
//! and the original point object, byte for byte. The move is a copy (`PutMode::Create`) then a
//! delete of the original, so at every instant the point is in at least one place; **a point
//! found in both places is live** (the move, or an undelete, was interrupted) and its
//! tombstone is stale. Moving again is harmless: every step is idempotent.
//!
//! A soft-deleted point cannot be restored or listed as a recovery point, but its manifests
//! and blocks are kept (GC marks them) until it is purged, when the policy's soft-delete days
//! have passed: then the tombstone is deleted first and its manifests after it, so a purge
//! cut short leaves only orphan manifests, which GC removes.
//!
//! Every function that moves or purges points takes a held [`LeaseKind::Prune`] lease, so
//! GC (which must see every point, live or deleted) never runs in between.

use futures::{StreamExt, TryStreamExt};
use jiff::Timestamp;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use crate::envelope::Kind;
use crate::lease::{Lease, LeaseKind};
use crate::{Error, ManifestRef, RecoveryPoint, Vault, manifest_key, point_key, validate_name};

const TOMBSTONE_FORMAT: &str = "bulwark-deleted-point";
const TOMBSTONE_VERSION: u32 = 1;
/// The largest tombstone read: the point object hex-encoded (twice its size) and a little
/// JSON around it.
fn tombstone_limit() -> u64 {
    2 * Kind::Point.max_stored_len() + (64 << 10)
}

/// The key of the tombstone of a soft-deleted point.
pub fn deleted_key(vm: &str, id: &str) -> ObjPath {
    ObjPath::from(format!("deleted/points/{vm}/{id}.json"))
}

#[derive(Debug, Serialize, Deserialize)]
struct Tombstone {
    format: String,
    version: u32,
    vm: String,
    id: String,
    deleted: Timestamp,
    reason: String,
    /// The original `points/` object, hex: undelete puts it back byte for byte.
    point_object: String,
}

/// A soft-deleted point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeletedPoint {
    /// The point as it was committed.
    pub point: RecoveryPoint,
    /// When it was soft-deleted.
    pub deleted: Timestamp,
    /// Why (e.g. the policy that pruned it).
    pub reason: String,
}

/// The soft-deleted points of a vault.
#[derive(Debug, Default)]
pub struct DeletedList {
    /// Readable tombstones of points that are not live, by VM then time.
    pub points: Vec<DeletedPoint>,
    /// Tombstones of points that are live too (an interrupted move): `(vm, id)`.
    pub stale: Vec<(String, String)>,
    /// Tombstones that could not be read, with the error.
    pub broken: Vec<(String, Error)>,
}

impl Vault {
    async fn exists(&self, key: &ObjPath) -> Result<bool, Error> {
        match self.store.head(key).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(Error::store(key, e)),
        }
    }

    async fn delete_key(&self, key: &ObjPath) -> Result<(), Error> {
        match self.store.delete(key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Error::store(key, e)),
        }
    }

    /// Soft-deletes one point (see the module documentation). Returns false when it was not
    /// live (already deleted: nothing to do).
    pub async fn soft_delete(
        &self,
        lease: &Lease,
        vm: &str,
        id: &str,
        reason: &str,
        now: Timestamp,
    ) -> Result<bool, Error> {
        lease.ensure_kind(LeaseKind::Prune)?;
        validate_name("vm", vm)?;
        validate_name("point", id)?;
        let key = point_key(vm, id);
        let raw = match self.get_raw(&key, Kind::Point).await {
            Ok(raw) => raw,
            Err(Error::Missing { .. }) => return Ok(false),
            Err(e) => return Err(e),
        };
        // Only a readable point is moved: it is checked before anything changes.
        self.parse_point(key.as_ref(), vm, id, &raw)?;
        let tomb = Tombstone {
            format: TOMBSTONE_FORMAT.into(),
            version: TOMBSTONE_VERSION,
            vm: vm.into(),
            id: id.into(),
            deleted: now,
            reason: reason.into(),
            point_object: hex::encode(&raw),
        };
        let dkey = deleted_key(vm, id);
        let mut json =
            serde_json::to_vec_pretty(&tomb).map_err(|e| Error::Worker(e.to_string()))?;
        json.push(b'\n');
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&dkey, PutPayload::from(json), opts)
            .await
        {
            // An earlier prune was cut short after the copy: its tombstone stands.
            Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => {}
            Err(e) => return Err(Error::store(&dkey, e)),
        }
        lease
            .held("deleting the live point", self.delete_key(&key))
            .await?;
        tracing::info!(vm, point = id, reason, "point soft-deleted");
        Ok(true)
    }

    fn parse_tombstone(
        &self,
        key: &str,
        vm: &str,
        id: &str,
        raw: &[u8],
    ) -> Result<(DeletedPoint, Vec<u8>), Error> {
        let corrupt = |why: String| Error::Corrupt {
            key: key.into(),
            why,
        };
        let t: Tombstone = serde_json::from_slice(raw)
            .map_err(|e| corrupt(format!("invalid deleted-point record: {e}")))?;
        if t.format != TOMBSTONE_FORMAT || t.version != TOMBSTONE_VERSION {
            return Err(corrupt(format!(
                "format {:?} version {} is not a deleted-point record this build reads",
                t.format, t.version
            )));
        }
        let object = hex::decode(&t.point_object)
            .map_err(|e| corrupt(format!("point object is not hex: {e}")))?;
        let point = self.parse_point(key, vm, id, &object)?;
        Ok((
            DeletedPoint {
                point,
                deleted: t.deleted,
                reason: t.reason,
            },
            object,
        ))
    }

    /// Reads one soft-deleted point.
    pub async fn get_deleted(&self, vm: &str, id: &str) -> Result<DeletedPoint, Error> {
        Ok(self.get_deleted_raw(vm, id).await?.0)
    }

    pub(crate) async fn get_deleted_raw(
        &self,
        vm: &str,
        id: &str,
    ) -> Result<(DeletedPoint, Vec<u8>), Error> {
        validate_name("vm", vm)?;
        validate_name("point", id)?;
        let key = deleted_key(vm, id);
        match self
            .get_raw_within(&key, "tombstone", tombstone_limit())
            .await
        {
            Ok(raw) => self.parse_tombstone(key.as_ref(), vm, id, &raw),
            Err(Error::Missing { .. }) => {
                let hint = if self.exists(&point_key(vm, id)).await? {
                    ": it is live, not deleted".to_string()
                } else {
                    String::new()
                };
                Err(Error::NoSuchDeletedPoint {
                    vm: vm.into(),
                    point: id.into(),
                    hint,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Brings a soft-deleted point back: its original object is written to `points/` again
    /// (`PutMode::Create`; an existing live copy is kept), then the tombstone is deleted.
    pub async fn undelete(
        &self,
        lease: &Lease,
        vm: &str,
        id: &str,
    ) -> Result<RecoveryPoint, Error> {
        lease.ensure_kind(LeaseKind::Prune)?;
        let (deleted, object) = self.get_deleted_raw(vm, id).await?;
        let key = point_key(vm, id);
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&key, PutPayload::from(object), opts)
            .await
        {
            Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => {}
            Err(e) => return Err(Error::store(&key, e)),
        }
        let tomb = deleted_key(vm, id);
        lease
            .held("deleting the tombstone", self.delete_key(&tomb))
            .await?;
        tracing::info!(vm, point = id, "point undeleted");
        Ok(deleted.point)
    }

    /// Lists soft-deleted points of one VM or of all, oldest first within each VM.
    pub async fn list_deleted(&self, vm: Option<&str>) -> Result<DeletedList, Error> {
        if let Some(vm) = vm {
            validate_name("vm", vm)?;
        }
        let prefix = ObjPath::from(match vm {
            Some(vm) => format!("deleted/points/{vm}"),
            None => "deleted/points".to_string(),
        });
        let metas: Vec<_> = self
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| Error::store(&prefix, e))?;
        let mut ids = Vec::new();
        let mut list = DeletedList::default();
        for meta in metas {
            let parts: Vec<_> = meta.location.parts().collect();
            if let [_, _, vm, file] = parts.as_slice()
                && let Some(id) = file.as_ref().strip_suffix(".json")
                && validate_name("vm", vm.as_ref()).is_ok()
                && validate_name("point", id).is_ok()
            {
                ids.push((vm.as_ref().to_string(), id.to_string()));
            } else {
                let key = meta.location.to_string();
                list.broken.push((
                    key.clone(),
                    Error::Corrupt {
                        key,
                        why: "not a deleted-point key (deleted/points/<vm>/<id>.json)".into(),
                    },
                ));
            }
        }
        let loaded: Vec<_> = futures::stream::iter(ids)
            .map(|(vm, id)| async move {
                let key = deleted_key(&vm, &id).to_string();
                let live = self.exists(&point_key(&vm, &id)).await;
                let r = self.get_deleted(&vm, &id).await;
                (vm, id, key, live, r)
            })
            .buffer_unordered(self.concurrency)
            .collect()
            .await;
        for (vm, id, key, live, r) in loaded {
            match (live, r) {
                (Err(e), _) => list.broken.push((key, e)),
                (Ok(true), _) => list.stale.push((vm, id)),
                (Ok(false), Ok(p)) => list.points.push(p),
                (Ok(false), Err(e)) => list.broken.push((key, e)),
            }
        }
        list.points.sort_by(|a, b| {
            (&a.point.vm, a.point.created, &a.point.id).cmp(&(
                &b.point.vm,
                b.point.created,
                &b.point.id,
            ))
        });
        list.stale.sort();
        list.broken.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(list)
    }

    /// Removes the stale tombstone of a point that is live (an interrupted move).
    pub async fn drop_stale_tombstone(
        &self,
        lease: &Lease,
        vm: &str,
        id: &str,
    ) -> Result<(), Error> {
        lease.ensure_kind(LeaseKind::Prune)?;
        if self.exists(&point_key(vm, id)).await? {
            self.delete_key(&deleted_key(vm, id)).await?;
        }
        Ok(())
    }

    /// Purges a soft-deleted point for good: its tombstone, then its manifests. The blocks
    /// are left to GC. Returns how many manifests were deleted.
    pub async fn purge_deleted(&self, lease: &Lease, vm: &str, id: &str) -> Result<usize, Error> {
        lease.ensure_kind(LeaseKind::Prune)?;
        let deleted = self.get_deleted(vm, id).await?;
        if self.exists(&point_key(vm, id)).await? {
            // Live after all: only the stale tombstone goes.
            self.delete_key(&deleted_key(vm, id)).await?;
            return Ok(0);
        }
        self.delete_key(&deleted_key(vm, id)).await?;
        let mut n = 0;
        for d in &deleted.point.disks {
            let key = manifest_key(&ManifestRef {
                vm,
                disk: &d.name,
                point: id,
            });
            lease
                .held("deleting a purged manifest", self.delete_key(&key))
                .await?;
            n += 1;
        }
        tracing::info!(vm, point = id, manifests = n, "soft-deleted point purged");
        Ok(n)
    }
}
