//! How the job reports read for people (`Display`): the CLI prints these.

use std::fmt;

use bulwark_vault::HumanBytes;

use crate::tiers::Tier;
use crate::{BackupReport, PruneReport, RestoreReport};

/// One line per disk: size, blocks, changed, read, uploaded, and the point compared with.
impl fmt::Display for BackupReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in &self.disks {
            let s = &d.stats;
            write!(
                f,
                "  {}: {} in {} blocks, {} changed, {} read, {} uploaded",
                d.name,
                HumanBytes(d.size),
                s.blocks,
                s.changed_blocks,
                HumanBytes(s.bytes_read),
                HumanBytes(s.bytes_uploaded),
            )?;
            if s.blocks_healed > 0 {
                write!(f, ", {} damaged block(s) healed", s.blocks_healed)?;
            }
            match &d.previous_point {
                Some(p) => writeln!(f, " (compared with {p})")?,
                None => writeln!(f)?,
            }
        }
        Ok(())
    }
}

/// Where the disk went, from which tier, verified or not, and how much was written.
impl fmt::Display for RestoreReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(why) = &self.snapshot_rejected {
            writeln!(f, "kept snapshot rejected ({why}); restored from the vault")?;
        }
        let source = match self.source {
            Tier::Snapshot => "kept snapshot (fast path)",
            _ => "vault",
        };
        let verified = if self.verified {
            "every block verified"
        } else {
            "NOT verified (the point never reached the vault)"
        };
        write!(
            f,
            "restored {}/{} disk {} to {} from the {source}, {verified}: {} ({} written, {} \
             blocks left as holes)",
            self.vm,
            self.point,
            self.disk,
            self.to.display(),
            HumanBytes(self.size),
            HumanBytes(self.bytes_written),
            self.zero_blocks
        )
    }
}

/// `keep`/`deleted`/`purged` per point, then a summary line.
impl fmt::Display for PruneReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (del, pur) = if self.dry_run {
            ("would delete", "would purge")
        } else {
            ("deleted", "purged")
        };
        for k in &self.kept {
            writeln!(f, "keep   {}  ({})", k.id, k.reasons.join(", "))?;
        }
        for id in &self.deleted {
            writeln!(f, "{del} {id}")?;
        }
        for id in &self.purged {
            writeln!(f, "{pur} {id}")?;
        }
        for k in &self.broken {
            writeln!(f, "BROKEN {k} (left alone)")?;
        }
        write!(
            f,
            "{}: {} kept, {} soft-deleted (kept {} days, `undelete` brings them back), {} purged",
            self.vm,
            self.kept.len(),
            self.deleted.len(),
            self.soft_delete_days,
            self.purged.len()
        )
    }
}

/// Every recovery point with its tier: the vault's points, and the points kept on the host
/// only (their transfer never finished). What `list --snapshot-dir` shows.
#[derive(Debug)]
pub struct TieredList {
    /// The vault's points.
    pub vault: bulwark_vault::PointList,
    /// Kept snapshots whose files are all present.
    pub kept: Vec<crate::tiers::KeptSnapshots>,
}

impl TieredList {
    /// Lists the points of `vault` (of `vm`, or all) and the kept snapshots in `store`.
    pub async fn load(
        vault: &bulwark_vault::Vault,
        store: &crate::tiers::SnapshotStore,
        vm: Option<&str>,
    ) -> Result<TieredList, crate::Error> {
        let list = vault.list_points_with_health(vm).await?;
        let kept = store
            .list(vm)?
            .into_iter()
            .filter(|k| k.present())
            .collect();
        Ok(TieredList { vault: list, kept })
    }

    fn tier(&self, p: &bulwark_vault::RecoveryPoint) -> Tier {
        let kept = self.kept.iter().any(|k| k.vm == p.vm && k.point == p.id);
        Tier::of(kept, true).unwrap_or(Tier::Vault)
    }

    fn snapshot_only(&self) -> impl Iterator<Item = &crate::tiers::KeptSnapshots> {
        let points = &self.vault.points;
        self.kept
            .iter()
            .filter(|k| !points.iter().any(|p| p.vm == k.vm && p.id == k.point))
    }

    /// `{"points": [... each with "tier"], "broken": [...]}`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = self.vault.to_json();
        let mut points = Vec::new();
        for p in &self.vault.points {
            let mut j = serde_json::to_value(p).unwrap_or_default();
            if let Some(o) = j.as_object_mut() {
                o.insert("tier".into(), serde_json::json!(self.tier(p)));
            }
            points.push(j);
        }
        for k in self.snapshot_only() {
            let disks: Vec<_> = k
                .disks
                .iter()
                .map(|d| serde_json::json!({"name": d.name, "size": d.size}))
                .collect();
            points.push(serde_json::json!({
                "id": k.point, "vm": k.vm, "created": k.created, "tier": Tier::Snapshot,
                "snapshot_state": k.state, "expires": k.expires, "disks": disks,
            }));
        }
        v["points"] = serde_json::Value::Array(points);
        v
    }

    /// Whether there is nothing to show.
    pub fn is_empty(&self) -> bool {
        self.vault.points.is_empty() && self.snapshot_only().next().is_none()
    }
}

/// One line per point with its tier, then the broken point objects.
impl fmt::Display for TieredList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let time = |t: jiff::Timestamp| t.strftime("%Y-%m-%d %H:%M:%S UTC").to_string();
        for p in &self.vault.points {
            let size = HumanBytes(p.disks.iter().map(|d| d.size).sum()).to_string();
            let (vm, id, reached) = (&p.vm, &p.id, &p.consistency.reached);
            let (created, tier) = (time(p.created), self.tier(p).as_str());
            writeln!(
                f,
                "{vm:<20} {id:<32} {created:<20} {reached:<12} {size:>10}  {tier}"
            )?;
            for r in self
                .vault
                .damaged
                .get(&format!("{vm}/{id}"))
                .into_iter()
                .flatten()
            {
                let on = r.disks_of(vm, id).join(",");
                writeln!(f, "  BROKEN: disk {on} needs {} ({})", r.key, r.why)?;
            }
        }
        for k in self.snapshot_only() {
            let size = HumanBytes(k.disks.iter().map(|d| d.size).sum()).to_string();
            let (vm, id, created) = (&k.vm, &k.point, time(k.created));
            writeln!(
                f,
                "{vm:<20} {id:<32} {created:<20} {:<12} {size:>10}  snapshot (transfer {:?})",
                "-", k.state
            )?;
        }
        self.vault
            .broken
            .iter()
            .try_for_each(|(k, e)| writeln!(f, "BROKEN {k}: {e}"))
    }
}
