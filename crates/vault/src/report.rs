//! How the vault's reports read, for people (`Display`) and for programs (`to_json`): the
//! `list`, `list-deleted`, `verify`, `gc` and `locks` output of the CLI.

use std::fmt;

use jiff::Timestamp;
use serde_json::{Value, json};

use crate::{DeletedList, Error, GcReport, LeaseRecord, PointList, VerifyReport};

/// A size for people: `1.5 GiB` (binary units), `10 B`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanBytes(pub u64);

impl fmt::Display for HumanBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut v = self.0 as f64;
        let mut u = 0;
        while v >= 1024.0 && u < UNITS.len() - 1 {
            v /= 1024.0;
            u += 1;
        }
        if u == 0 {
            write!(f, "{} B", self.0)
        } else {
            write!(f, "{v:.1} {}", UNITS[u])
        }
    }
}

/// The time format of every listing.
pub(crate) fn when(t: Timestamp) -> impl fmt::Display {
    t.strftime("%Y-%m-%d %H:%M:%S UTC")
}

fn broken_json(broken: &[(String, Error)]) -> Vec<Value> {
    broken
        .iter()
        .map(|(k, e)| json!({"key": k, "error": e.to_string()}))
        .collect()
}

impl PointList {
    /// `{"points": [...], "broken": [{"key", "error"}]}`.
    pub fn to_json(&self) -> Value {
        let damaged: serde_json::Map<String, Value> = self
            .damaged
            .iter()
            .map(|(point, records)| {
                let (vm, id) = point.split_once('/').unwrap_or((point, ""));
                let needs: Vec<_> = records
                    .iter()
                    .map(|r| json!({"key": r.key, "why": r.why, "disks": r.disks_of(vm, id)}))
                    .collect();
                (point.clone(), Value::Array(needs))
            })
            .collect();
        json!({"points": self.points, "broken": broken_json(&self.broken), "damaged": damaged})
    }
}

/// One line per point (VM, id, time, consistency, size, disks), then one per broken object.
impl fmt::Display for PointList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.points {
            let size: u64 = p.disks.iter().map(|d| d.size).sum();
            let disks: Vec<_> = p.disks.iter().map(|d| d.name.as_str()).collect();
            let (vm, id, reached) = (&p.vm, &p.id, &p.consistency.reached);
            let size = HumanBytes(size).to_string();
            writeln!(
                f,
                "{vm:<20} {id:<32} {:<20} {reached:<12} {size:>10}  {}",
                when(p.created),
                disks.join(",")
            )?;
            for r in self
                .damaged
                .get(&format!("{vm}/{id}"))
                .into_iter()
                .flatten()
            {
                let on = r.disks_of(vm, id).join(",");
                let on = if on.is_empty() { "?".into() } else { on };
                writeln!(
                    f,
                    "  BROKEN: disk {on} needs {} ({}); a backup of the disk heals it",
                    r.key, r.why
                )?;
            }
        }
        self.broken
            .iter()
            .try_for_each(|(k, e)| writeln!(f, "BROKEN {k}: {e}"))
    }
}

impl DeletedList {
    /// `{"deleted": [...], "broken": [{"key", "error"}]}`.
    pub fn to_json(&self) -> Value {
        json!({"deleted": self.points, "broken": broken_json(&self.broken)})
    }
}

/// One line per soft-deleted point, then one per broken tombstone.
impl fmt::Display for DeletedList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in &self.points {
            let (vm, id) = (&d.point.vm, &d.point.id);
            writeln!(
                f,
                "{vm:<20} {id:<32} {:<20} deleted {}  {}",
                when(d.point.created),
                when(d.deleted),
                d.reason
            )?;
        }
        self.broken
            .iter()
            .try_for_each(|(k, e)| writeln!(f, "BROKEN {k}: {e}"))
    }
}

impl VerifyReport {
    /// The report with `ok` and every problem (`key`, `error`, `points`).
    pub fn to_json(&self) -> Value {
        let problems: Vec<_> = self
            .problems
            .iter()
            .map(
                |p| json!({"key": p.key, "error": p.message, "points": p.points, "disks": p.disks}),
            )
            .collect();
        json!({
            "ok": self.is_ok(), "points": self.points, "manifests": self.manifests,
            "blocks": self.blocks, "bytes": self.bytes, "problems": problems,
        })
    }
}

/// `BAD key: why (breaks points)` per problem, then `OK: …` or `FAILED: …`.
impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.problems {
            let points = p.points.join(", ");
            writeln!(f, "BAD {}: {} (breaks {points})", p.key, p.message)?;
        }
        let verdict = if self.is_ok() { "OK" } else { "FAILED" };
        write!(
            f,
            "{verdict}: {} points, {} manifests, {} blocks ({}) verified; {} problems",
            self.points,
            self.manifests,
            self.blocks,
            HumanBytes(self.bytes),
            self.problems.len()
        )
    }
}

/// One sentence: what was (or would be) freed and what was kept.
impl fmt::Display for GcReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = if self.dry_run { "would free" } else { "freed" };
        write!(
            f,
            "{verb} {} blocks ({}) and {} orphan manifests ({}); kept {} referenced blocks of {} \
             live and {} soft-deleted points, {} unreferenced blocks younger than {}s",
            self.blocks_freed,
            HumanBytes(self.bytes_freed),
            self.manifests_freed,
            HumanBytes(self.manifest_bytes_freed),
            self.blocks_referenced,
            self.live_points,
            self.deleted_points,
            self.blocks_young,
            self.grace_secs
        )?;
        if let Some(i) = &self.immutable {
            write!(
                f,
                "\nimmutable vault: the frees above are hidden (delete markers); {} locked \
                 versions deleted ({}), {} kept until their retention ends; {} locks extended",
                i.versions_freed,
                HumanBytes(i.version_bytes_freed),
                i.versions_retained,
                i.locks_extended
            )?;
            if !i.hidden.is_empty() {
                write!(
                    f,
                    "\nhidden by a foreign delete marker (kept): {}",
                    i.hidden.join(", ")
                )?;
            }
            if !i.overwritten.is_empty() {
                write!(
                    f,
                    "\noverwritten (older versions kept): {}",
                    i.overwritten.join(", ")
                )?;
            }
        }
        Ok(())
    }
}

/// The leases of a vault at an instant, as `locks` shows them.
#[derive(Debug)]
pub struct LeaseListing {
    /// Each lease object's key and its record (or why it cannot be read).
    pub leases: Vec<(String, Result<LeaseRecord, Error>)>,
    /// The instant that decides which leases are live.
    pub now: Timestamp,
}

impl LeaseListing {
    /// `[{"key", "lease", "live"} | {"key", "error"}]`.
    pub fn to_json(&self) -> Value {
        let items: Vec<_> = self
            .leases
            .iter()
            .map(|(k, r)| match r {
                Ok(r) => json!({"key": k, "lease": r, "live": r.is_live(self.now)}),
                Err(e) => json!({"key": k, "error": e.to_string()}),
            })
            .collect();
        Value::Array(items)
    }
}

/// One line per lease (`key: what (expired)`), `BROKEN error` for unreadable ones.
impl fmt::Display for LeaseListing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (k, r) in &self.leases {
            match r {
                Ok(r) => {
                    let expired = if r.is_live(self.now) {
                        ""
                    } else {
                        " (expired)"
                    };
                    writeln!(f, "{k}: {}{expired}", r.describe())?;
                }
                Err(e) => writeln!(f, "BROKEN {e}")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::HumanBytes;

    #[test]
    fn human_sizes() {
        assert_eq!(HumanBytes(1536).to_string(), "1.5 KiB");
        assert_eq!(HumanBytes(10).to_string(), "10 B");
        assert_eq!(HumanBytes(3 << 30).to_string(), "3.0 GiB");
    }
}
