//! GC's part on an immutable vault: extending the locks of what is still referenced, and
//! sweeping the versions that deletes only hid (see [`crate::immutable`]).

use std::collections::HashSet;
use std::sync::Arc;

use bulwark_blockdiff::Address;
use futures::{StreamExt, TryStreamExt};
use jiff::Timestamp;
use object_store::path::Path as ObjPath;
use object_store::{ObjectMeta, ObjectStoreExt};
use serde::Serialize;

use crate::immutable::{Immutability, ObjectLockClient, ObjectVersion, VersionDelete};
use crate::lease::{Lease, minus, plus};
use crate::{CONFIG_KEY, Error, Vault};

/// What GC did on an immutable vault (part of [`crate::GcReport`]).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ImmutableGcReport {
    /// Referenced objects whose lock was extended to now + the retention.
    pub locks_extended: usize,
    /// Object versions deleted for good (their retention had ended).
    pub versions_freed: usize,
    /// Stored bytes of those versions: the space actually given back.
    pub version_bytes_freed: u64,
    /// Old versions of leases and probes deleted (never locked; not counted above).
    pub lease_versions_freed: usize,
    /// Versions of deleted objects still under retention: kept, retried by the next GC.
    pub versions_retained: usize,
    /// Objects hidden behind a delete marker Bulwark did not write (a point prune never moved,
    /// or an object a live or hidden point references): kept, with their locked versions, and
    /// named in the log. GC marks the blocks of such points as referenced.
    pub hidden: Vec<String>,
    /// Write-once objects with more than one version (overwritten): the older versions are
    /// kept, and named in the log.
    pub overwritten: Vec<String>,
}

/// What GC's mark phase found, as the sweep needs it.
pub(crate) struct Referenced<'a> {
    pub(crate) blocks: &'a HashSet<Address>,
    pub(crate) manifests: &'a HashSet<String>,
}

impl Referenced<'_> {
    /// Whether a key whose newest version is a delete marker may have its versions deleted.
    fn purgeable(&self, key: &str, tombstones: &HashSet<String>) -> bool {
        if key == CONFIG_KEY {
            false
        } else if let Some(rest) = key.strip_prefix("blocks/") {
            match rest.rsplit('/').next().and_then(Address::from_hex) {
                Some(a) => !self.blocks.contains(&a),
                None => false,
            }
        } else if key.starts_with("manifests/") {
            !self.manifests.contains(key)
        } else if key.starts_with("points/") {
            // Only a point that prune moved (its tombstone was written once).
            tombstones.contains(&format!("deleted/{key}"))
        } else {
            true
        }
    }
}

impl Vault {
    fn locker_for_gc(&self) -> Result<Arc<ObjectLockClient>, Error> {
        self.locker.clone().ok_or_else(|| Error::Immutable {
            location: self.location.clone(),
            why: "the vault was opened without its s3:// location, so GC has no Object Lock \
                  client to extend locks and sweep versions with (open it with Vault::open_with)"
                .into(),
        })
    }

    /// Points whose newest version is a delete marker although prune never moved them (no
    /// tombstone): their newest data version, read by its version id. Any that cannot be
    /// read aborts GC.
    pub(crate) async fn hidden_points(&self) -> Result<Vec<crate::RecoveryPoint>, Error> {
        let client = self.locker_for_gc()?;
        let versions = client.list_versions("points/").await?;
        let tombstones: HashSet<String> = client
            .list_versions("deleted/points/")
            .await?
            .into_iter()
            .map(|v| v.key)
            .collect();
        let mut groups: std::collections::BTreeMap<String, Vec<ObjectVersion>> =
            std::collections::BTreeMap::new();
        for v in versions {
            groups.entry(v.key.clone()).or_default().push(v);
        }
        let mut out = Vec::new();
        for (key, group) in groups {
            let hidden = group.iter().any(|v| v.is_latest && v.delete_marker);
            if !hidden || tombstones.contains(&format!("deleted/{key}")) {
                continue;
            }
            // Newest data version first (the store lists each key's versions newest first).
            let Some(data) = group.iter().find(|v| !v.delete_marker) else {
                continue;
            };
            let parts: Vec<&str> = key.split('/').collect();
            let [_, vm, file] = parts.as_slice() else {
                continue;
            };
            let Some(id) = file.strip_suffix(".json") else {
                continue;
            };
            let raw = client.get_version(&key, &data.version_id).await?;
            let point = self
                .parse_point(&key, vm, id, &raw)
                .map_err(|e| Error::GcAborted {
                    key: key.clone(),
                    why: format!("a hidden point's version does not read: {e}"),
                })?;
            tracing::warn!(
                key,
                "point hidden by a foreign delete marker: its blocks are kept"
            );
            out.push(point);
        }
        Ok(out)
    }

    /// Extends the locks of referenced objects, then sweeps hidden versions.
    pub(crate) async fn gc_immutable(
        &self,
        lease: &Lease,
        imm: &Immutability,
        referenced: &Referenced<'_>,
        dry_run: bool,
    ) -> Result<ImmutableGcReport, Error> {
        let client = self.locker_for_gc()?;
        let mut report = ImmutableGcReport::default();
        let now = lease.store_now();
        report.locks_extended = self
            .extend_locks(&client, imm, referenced, now, dry_run)
            .await?;
        self.sweep_versions(lease, &client, referenced, dry_run, &mut report)
            .await?;
        tracing::info!(
            locks_extended = report.locks_extended,
            versions_freed = report.versions_freed,
            version_bytes_freed = report.version_bytes_freed,
            versions_retained = report.versions_retained,
            hidden = report.hidden.len(),
            overwritten = report.overwritten.len(),
            "immutable vault: locks extended, versions swept"
        );
        Ok(report)
    }

    /// Extends to `now + retention` the lock of every referenced object written more than
    /// half a retention ago (a lock set at its write could end within half a retention).
    async fn extend_locks(
        &self,
        client: &ObjectLockClient,
        imm: &Immutability,
        referenced: &Referenced<'_>,
        now: Timestamp,
        dry_run: bool,
    ) -> Result<usize, Error> {
        let retention = imm.retention();
        let old = minus(now, retention / 2);
        let until = plus(now, retention);
        let is_old = |m: &ObjectMeta| {
            Timestamp::from_millisecond(m.last_modified.timestamp_millis())
                .map(|t| t < old)
                .unwrap_or(true)
        };
        let mut keys: Vec<String> = Vec::new();
        for prefix in ["points", "deleted/points", "manifests", "blocks"] {
            let p = ObjPath::from(prefix);
            let mut list = self.store.list(Some(&p));
            while let Some(meta) = list.try_next().await.map_err(|e| Error::store(&p, e))? {
                let key = meta.location.as_ref();
                let wanted = match prefix {
                    "manifests" => referenced.manifests.contains(key),
                    "blocks" => meta
                        .location
                        .filename()
                        .and_then(Address::from_hex)
                        .is_some_and(|a| referenced.blocks.contains(&a)),
                    _ => true,
                };
                if wanted && is_old(&meta) {
                    keys.push(key.to_string());
                }
            }
        }
        let config = ObjPath::from(CONFIG_KEY);
        let meta = self
            .store
            .head(&config)
            .await
            .map_err(|e| Error::store(&config, e))?;
        if is_old(&meta) {
            keys.push(CONFIG_KEY.into());
        }
        if dry_run {
            return Ok(keys.len());
        }
        let n = keys.len();
        let mut puts = futures::stream::iter(keys)
            .map(|key| async move { client.put_retention(&key, until).await })
            .buffer_unordered(self.concurrency());
        while let Some(r) = puts.next().await {
            r?;
        }
        Ok(n)
    }

    /// Deletes, version by version, what deletes only hid: every version of a key whose
    /// newest version is a delete marker and that nothing references, and the old versions
    /// of leases. A version under retention is refused by the store, counted and kept.
    async fn sweep_versions(
        &self,
        lease: &Lease,
        client: &ObjectLockClient,
        referenced: &Referenced<'_>,
        dry_run: bool,
        report: &mut ImmutableGcReport,
    ) -> Result<(), Error> {
        let versions = client.list_versions("").await?;
        let tombstones: HashSet<String> = versions
            .iter()
            .filter(|v| v.key.starts_with("deleted/points/"))
            .map(|v| v.key.clone())
            .collect();
        // By key: servers list delete markers and versions in separate runs.
        let mut groups: std::collections::BTreeMap<String, Vec<ObjectVersion>> =
            std::collections::BTreeMap::new();
        for v in versions {
            groups.entry(v.key.clone()).or_default().push(v);
        }
        for group in groups.into_values() {
            let key = group[0].key.clone();
            let latest_marker = group
                .iter()
                .find(|v| v.is_latest)
                .is_some_and(|v| v.delete_marker);
            let doomed: Vec<&ObjectVersion> = if !crate::immutable::locked_key(&key) {
                // Leases and probes: every version but a live current one.
                group
                    .iter()
                    .filter(|v| latest_marker || !v.is_latest)
                    .collect()
            } else if latest_marker {
                if referenced.purgeable(&key, &tombstones) {
                    group.iter().collect()
                } else {
                    tracing::warn!(
                        key,
                        "a referenced object is hidden by a delete marker Bulwark did not write; its locked versions are kept"
                    );
                    report.hidden.push(key);
                    continue;
                }
            } else {
                // Ownership records: older vaults rewrote them at a take-over (now each
                // take-over is a new key); nothing else is rewritten.
                if group.iter().filter(|v| !v.delete_marker).count() > 1
                    && !key.starts_with("owners/")
                {
                    tracing::warn!(
                        key,
                        "a write-once object was overwritten; its older versions are kept"
                    );
                    report.overwritten.push(key);
                }
                continue;
            };
            if dry_run {
                continue;
            }
            let locked = crate::immutable::locked_key(&key);
            let mut all_data_gone = true;
            for v in doomed.iter().filter(|v| !v.delete_marker) {
                let r = lease
                    .held(
                        "a version delete",
                        client.delete_version(&key, &v.version_id),
                    )
                    .await?;
                match r {
                    VersionDelete::Deleted if locked => {
                        report.versions_freed += 1;
                        report.version_bytes_freed += v.size;
                    }
                    VersionDelete::Deleted => report.lease_versions_freed += 1,
                    VersionDelete::Retained => {
                        report.versions_retained += 1;
                        all_data_gone = false;
                    }
                }
            }
            if all_data_gone {
                for v in doomed.iter().filter(|v| v.delete_marker) {
                    lease
                        .held(
                            "a marker delete",
                            client.delete_version(&key, &v.version_id),
                        )
                        .await?;
                }
            }
        }
        Ok(())
    }
}
