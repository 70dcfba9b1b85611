//! Bringing back what plain deletes hid in an immutable S3 vault.
//!
//! On a bucket with Object Lock (see [`crate::immutable`]), a DELETE with the vault's
//! credentials cannot destroy a locked version: it adds a delete marker, and the object
//! disappears from listings and reads while its locked version stays in the bucket.
//! [`Vault::unhide`] undoes that: it lists the versions of points, manifests and blocks
//! (`ListObjectVersions`), finds every key whose newest versions are delete markers above a
//! data version that is still under retention, and deletes those markers
//! (`DeleteObject?versionId=` of the marker: markers are never locked). Blocks first, then
//! manifests, then points, the vault's own write order, so a point reappears only after what
//! it references.
//!
//! What it leaves alone:
//! - a point that Bulwark's prune moved away: a tombstone (`deleted/points/...`) exists for
//!   it, visible or hidden; `undelete --point` brings back a soft-deleted point, and a purged
//!   one was meant to go;
//! - a version whose retention has ended (anyone may delete it now; GC sweeps such versions).
//!
//! Blocks are shared by every VM, so `vm` narrows points and manifests only; a block hidden
//! by GC (unreferenced, still locked) reappears too, and the next GC hides it again.

use std::collections::{BTreeMap, BTreeSet};

use jiff::Timestamp;
use object_store::ObjectStoreExt;
use serde::Serialize;

use crate::immutable::ObjectVersion;
use crate::{Error, Vault, validate_name};

/// What [`Vault::unhide`] does.
#[derive(Debug, Clone, Default)]
pub struct UnhideOptions {
    /// Only this VM's points and manifests (blocks: all).
    pub vm: Option<String>,
    /// Report what would be brought back; remove nothing.
    pub dry_run: bool,
}

/// What [`Vault::unhide`] found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct UnhideReport {
    /// Nothing was removed.
    pub dry_run: bool,
    /// The points brought back (`vm/id`).
    pub points: Vec<String>,
    /// Manifests brought back.
    pub manifests: usize,
    /// Blocks brought back.
    pub blocks: usize,
    /// Delete markers removed (or that would be).
    pub markers_removed: usize,
    /// Hidden points left alone: Bulwark's prune moved them (a tombstone exists).
    pub pruned: Vec<String>,
    /// Hidden keys left alone: their newest data version is no longer locked.
    pub unlocked: Vec<String>,
}

impl std::fmt::Display for UnhideReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verb = if self.dry_run {
            "would bring back"
        } else {
            "brought back"
        };
        writeln!(
            f,
            "{verb} {} point(s), {} manifest(s), {} block(s) ({} delete marker(s))",
            self.points.len(),
            self.manifests,
            self.blocks,
            self.markers_removed
        )?;
        for p in &self.points {
            writeln!(f, "  point {p}")?;
        }
        for p in &self.pruned {
            writeln!(f, "  left alone (pruned by Bulwark; see list-deleted): {p}")?;
        }
        for k in &self.unlocked {
            writeln!(f, "  left alone (retention ended): {k}")?;
        }
        Ok(())
    }
}

/// A key hidden by delete markers: the markers above its newest data version, and that
/// version.
struct Hidden {
    markers: Vec<String>,
    data: String,
}

/// The hidden keys among `versions` (each key's versions newest first, as S3 lists them).
fn hidden_keys(versions: Vec<ObjectVersion>) -> BTreeMap<String, Hidden> {
    let mut by_key: BTreeMap<String, Vec<ObjectVersion>> = BTreeMap::new();
    for v in versions {
        by_key.entry(v.key.clone()).or_default().push(v);
    }
    let mut out = BTreeMap::new();
    for (key, mut vs) in by_key {
        // Newest first: the latest one, then the rest in listing order.
        vs.sort_by_key(|v| !v.is_latest);
        if !vs.first().is_some_and(|v| v.delete_marker) {
            continue;
        }
        let markers: Vec<String> = vs
            .iter()
            .take_while(|v| v.delete_marker)
            .map(|v| v.version_id.clone())
            .collect();
        if let Some(data) = vs.iter().find(|v| !v.delete_marker) {
            let data = data.version_id.clone();
            out.insert(key, Hidden { markers, data });
        }
    }
    out
}

impl Vault {
    /// Removes the delete markers that hide still-locked versions of points, manifests and
    /// blocks in an immutable S3 vault (see [the module docs](crate::unhide)).
    ///
    /// Errors: the vault is not an immutable S3 vault opened from its location
    /// ([`Error::Immutable`]); an Object Lock request failed ([`Error::ObjectLock`]).
    pub async fn unhide(&self, options: &UnhideOptions) -> Result<UnhideReport, Error> {
        let Some(client) = self.object_lock().cloned() else {
            return Err(Error::Immutable {
                location: self.location().into(),
                why: "bringing back hidden objects needs an immutable S3 vault (Object Lock, \
                      versioned), opened from its s3:// location"
                    .into(),
            });
        };
        if let Some(vm) = &options.vm {
            validate_name("vm", vm)?;
        }
        let now = Timestamp::now();
        let scoped = |what: &str| match &options.vm {
            Some(vm) => format!("{what}/{vm}/"),
            None => format!("{what}/"),
        };
        // Tombstones, visible or hidden: the points Bulwark's prune moved away.
        let tombstones: BTreeSet<String> = client
            .list_versions(&scoped("deleted/points"))
            .await?
            .into_iter()
            .map(|v| v.key)
            .collect();
        let mut report = UnhideReport {
            dry_run: options.dry_run,
            ..UnhideReport::default()
        };
        for what in ["blocks", "manifests", "points"] {
            let prefix = if what == "blocks" {
                "blocks/".to_string()
            } else {
                scoped(what)
            };
            let hidden = hidden_keys(client.list_versions(&prefix).await?);
            for (key, h) in hidden {
                if what == "points" {
                    let tombstone = format!("deleted/{key}");
                    let visible = self
                        .store
                        .head(&object_store::path::Path::from(tombstone.as_str()))
                        .await
                        .is_ok();
                    if visible || tombstones.contains(&tombstone) {
                        report.pruned.push(point_name(&key));
                        continue;
                    }
                }
                let locked = client
                    .retention(&key, Some(&h.data))
                    .await?
                    .is_some_and(|until| until > now);
                if !locked {
                    report.unlocked.push(key);
                    continue;
                }
                if !options.dry_run {
                    for marker in &h.markers {
                        // A marker is never locked: a refusal here is an error.
                        match client.delete_version(&key, marker).await? {
                            crate::immutable::VersionDelete::Deleted => {}
                            crate::immutable::VersionDelete::Retained => {
                                return Err(Error::ObjectLock {
                                    key,
                                    why: format!(
                                        "the store refused to remove delete marker {marker}"
                                    ),
                                });
                            }
                        }
                    }
                }
                report.markers_removed += h.markers.len();
                match what {
                    "blocks" => report.blocks += 1,
                    "manifests" => report.manifests += 1,
                    _ => report.points.push(point_name(&key)),
                }
                tracing::info!(
                    key,
                    markers = h.markers.len(),
                    dry_run = options.dry_run,
                    "hidden object brought back"
                );
            }
        }
        Ok(report)
    }
}

/// `vm/id` of point key `points/vm/id.json`.
fn point_name(key: &str) -> String {
    key.strip_prefix("points/")
        .and_then(|k| k.strip_suffix(".json"))
        .unwrap_or(key)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(key: &str, id: &str, latest: bool, marker: bool) -> ObjectVersion {
        ObjectVersion {
            key: key.into(),
            version_id: id.into(),
            is_latest: latest,
            delete_marker: marker,
            size: if marker { 0 } else { 10 },
        }
    }

    #[test]
    fn only_keys_whose_newest_versions_are_markers_over_data_are_hidden() {
        let h = hidden_keys(vec![
            // Hidden twice: both markers go.
            v("a", "m2", true, true),
            v("a", "m1", false, true),
            v("a", "d1", false, false),
            v("a", "d0", false, false),
            // Visible.
            v("b", "d1", true, false),
            v("b", "m1", false, true),
            v("b", "d0", false, false),
            // Only markers: nothing to bring back.
            v("c", "m1", true, true),
        ]);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["a"]);
        assert_eq!(h["a"].markers, ["m2", "m1"]);
        assert_eq!(h["a"].data, "d1");
        assert_eq!(point_name("points/web/1.json"), "web/1");
    }
}
