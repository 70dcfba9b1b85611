//! Retention driven by a policy: prune (soft-delete what the policy does not keep, purge what
//! was soft-deleted long enough ago), undelete, and garbage collection.
//!
//! Prune and undelete hold a `prune` lease (`bulwark_vault::lease`) while they move points,
//! so garbage collection never runs in between; GC holds the exclusive `gc` lease.

use std::time::Duration;

use bulwark_policy::{PointInfo, Policy};
use bulwark_vault::{GcOptions, GcReport, Lease, LeaseKind, LeaseOptions, RecoveryPoint, Vault};
use jiff::Timestamp;
use serde::Serialize;

use crate::Error;

/// How long prune and undelete wait by default for a GC (or another prune) to finish.
pub const PRUNE_LEASE_WAIT: Duration = Duration::from_secs(60);

/// One point prune keeps, and why.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct KeptPoint {
    /// The point id.
    pub id: String,
    /// When it was taken.
    pub created: Timestamp,
    /// The rules that keep it (`"daily 2026-11-24"`, `"newest"`, …).
    pub reasons: Vec<String>,
}

/// What [`prune`] did (or, with `dry_run`, would do).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PruneReport {
    /// The VM.
    pub vm: String,
    /// Nothing was changed.
    pub dry_run: bool,
    /// The instant retention was evaluated at.
    pub now: Timestamp,
    /// The policy's soft-delete days.
    pub soft_delete_days: u32,
    /// Live points kept.
    pub kept: Vec<KeptPoint>,
    /// Points soft-deleted now.
    pub deleted: Vec<String>,
    /// Soft-deleted points purged for good (deleted `soft_delete_days` or more before `now`).
    pub purged: Vec<String>,
    /// Manifests deleted with the purged points.
    pub manifests_purged: usize,
    /// Point objects that could not be read (left alone).
    pub broken: Vec<String>,
}

/// Applies `policy`'s retention to the points of `vm` at `now`: soft-deletes every live point
/// not in the policy's keep-set, and purges soft-deleted points deleted at least
/// `soft_delete_days` before `now`. Waits up to [`PRUNE_LEASE_WAIT`] for a running GC.
pub async fn prune(
    vault: &Vault,
    vm: &str,
    policy: &Policy,
    now: Timestamp,
    dry_run: bool,
) -> Result<PruneReport, Error> {
    prune_with(
        vault,
        vm,
        policy,
        now,
        dry_run,
        &LeaseOptions::default().waiting(PRUNE_LEASE_WAIT),
    )
    .await
}

/// [`prune`] with explicit lease options.
pub async fn prune_with(
    vault: &Vault,
    vm: &str,
    policy: &Policy,
    now: Timestamp,
    dry_run: bool,
    lease: &LeaseOptions,
) -> Result<PruneReport, Error> {
    bulwark_vault::validate_name("vm", vm)?;
    // A dry run writes nothing, not even a lease.
    let lease = if dry_run {
        None
    } else {
        Some(Lease::acquire(vault, LeaseKind::Prune, &format!("prune of VM {vm}"), lease).await?)
    };
    let r = prune_locked(vault, vm, policy, now, lease.as_ref()).await;
    if let Some(lease) = lease
        && let Err(e) = lease.release().await
    {
        tracing::warn!(error = %e, "cannot release the prune lease; it will expire");
    }
    r
}

async fn prune_locked(
    vault: &Vault,
    vm: &str,
    policy: &Policy,
    now: Timestamp,
    lease: Option<&Lease>,
) -> Result<PruneReport, Error> {
    let list = vault.list_points(Some(vm)).await?;
    let infos: Vec<PointInfo> = list
        .points
        .iter()
        .map(|p| PointInfo::new(p.id.clone(), p.created))
        .collect();
    let keep = policy.keep_set(&infos, now);
    let days = policy.retention().soft_delete_days;
    let mut report = PruneReport {
        vm: vm.into(),
        dry_run: lease.is_none(),
        now,
        soft_delete_days: days,
        kept: Vec::new(),
        deleted: Vec::new(),
        purged: Vec::new(),
        manifests_purged: 0,
        broken: list.broken.iter().map(|(k, _)| k.clone()).collect(),
    };
    let reason = format!(
        "pruned by policy {} at {now}",
        policy.name().unwrap_or(policy.file_name())
    );
    for p in &list.points {
        match keep.reasons(&p.id) {
            Some(reasons) => report.kept.push(KeptPoint {
                id: p.id.clone(),
                created: p.created,
                reasons: reasons.iter().map(|r| r.to_string()).collect(),
            }),
            None => {
                if let Some(lease) = lease {
                    vault.soft_delete(lease, vm, &p.id, &reason, now).await?;
                }
                report.deleted.push(p.id.clone());
            }
        }
    }
    let purge_before = now
        .checked_sub(Duration::from_secs(u64::from(days) * 86_400))
        .unwrap_or(Timestamp::MIN);
    let deleted = vault.list_deleted(Some(vm)).await?;
    for d in &deleted.points {
        if d.deleted <= purge_before {
            if let Some(lease) = lease {
                report.manifests_purged += vault.purge_deleted(lease, vm, &d.point.id).await?;
            }
            report.purged.push(d.point.id.clone());
        }
    }
    if let Some(lease) = lease {
        for (vm, id) in &deleted.stale {
            vault.drop_stale_tombstone(lease, vm, id).await?;
        }
    }
    tracing::info!(
        vm,
        kept = report.kept.len(),
        deleted = report.deleted.len(),
        purged = report.purged.len(),
        "prune done"
    );
    Ok(report)
}

/// Brings back a soft-deleted point (holding a prune lease, waiting up to
/// [`PRUNE_LEASE_WAIT`] for a running GC).
pub async fn undelete(vault: &Vault, vm: &str, id: &str) -> Result<RecoveryPoint, Error> {
    let options = LeaseOptions::default().waiting(PRUNE_LEASE_WAIT);
    let lease = Lease::acquire(
        vault,
        LeaseKind::Prune,
        &format!("undelete of {vm}/{id}"),
        &options,
    )
    .await?;
    let r = vault.undelete(&lease, vm, id).await;
    if let Err(e) = lease.release().await {
        tracing::warn!(error = %e, "cannot release the prune lease; it will expire");
    }
    Ok(r?)
}

/// Runs garbage collection on the vault (see `bulwark_vault::Vault::gc`).
pub async fn gc(vault: &Vault, options: &GcOptions) -> Result<GcReport, Error> {
    Ok(vault.gc(options).await?)
}
