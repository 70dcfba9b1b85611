//! The backup job: one request, one entry point ([`run_backup`]). Its phases are private:
//! quiesce (with an agent) → snapshot (prepare, take) → thaw → transfer → commit → release.

use std::sync::Arc;
use std::time::Instant;

use bulwark_consistency::Level;
use bulwark_snapshot::{DiskSource, Outcome, Snapshotter};
use bulwark_vault::{
    ConsistencyRecord, DiskStats, LeaseOptions, RecoveryPoint, Vault, new_point_id, validate_name,
};
use jiff::Timestamp;
use serde::Serialize;
use tracing::Instrument;

use crate::quiesce::{AgentTarget, QuiesceOptions};
use crate::tiers::{KeptState, SnapshotStore};
use crate::{Error, NoObserver, Observer, Phase, PhaseEvent};

/// Quiesce the guest through its agent around the snapshot.
#[derive(Debug, Clone)]
pub struct Quiesce {
    /// The VM's guest agent.
    pub agent: AgentTarget,
    /// Levels wanted and accepted, freeze timeout.
    pub options: QuiesceOptions,
}

/// Keep the job's point-in-time copies on the host for instant restore.
#[derive(Debug, Clone)]
pub struct KeepSnapshots {
    /// The store that indexes them. The snapshotter must put its files in the store's root
    /// (for [`bulwark_snapshot::ImageSnapshotter`]: `dir = store.root()`).
    pub store: SnapshotStore,
    /// How many days they stay (the policy's instant-restore days).
    pub days: u32,
}

/// Everything one backup job needs. Build it with [`BackupRequest::new`] and set what differs
/// from the defaults.
#[derive(Debug, Clone)]
pub struct BackupRequest {
    /// The VM.
    pub vm: String,
    /// Takes the VM's disks at one instant (image files: [`bulwark_snapshot::ImageSnapshotter`]).
    pub snapshotter: Arc<dyn Snapshotter>,
    /// Quiesce through the guest agent; `None`: crash-consistent.
    pub quiesce: Option<Quiesce>,
    /// Without an agent: the level the policy wanted, recorded in the point with the reason it
    /// was not reached when above `crash`. Ignored with an agent (its options say it).
    pub consistency_wanted: Level,
    /// Keep the snapshots for instant restore.
    pub keep_snapshots: Option<KeepSnapshots>,
    /// Blocks uploaded at once per disk.
    pub upload_concurrency: usize,
    /// The policy name to record, if any.
    pub policy: Option<String>,
    /// The shared backup lease held during the transfer (by default it waits up to 10
    /// minutes while a garbage collection runs).
    pub lease: LeaseOptions,
    /// Before reusing the previous point's blocks unread, ask the vault (HEAD) whether each
    /// one is still there; a missing one is read from the disk again and re-uploaded. Blocks
    /// `verify` recorded as bad are always re-read, with or without this.
    pub check_known: bool,
    /// Take the VM over from the controller that owns it in the vault (see
    /// [`bulwark_vault::owner`]); without it a VM owned by another host is refused.
    pub take_over: bool,
    /// Progress and phase events.
    pub observer: Arc<dyn Observer>,
    /// Cancels the job when triggered. The job stops at its next safe point: never inside
    /// the quiesce/snapshot/thaw sequence (the guest is always thawed first), between blocks
    /// of the transfer, and at the latest just before the commit. A cancelled job commits no
    /// point, releases its snapshots as failed (change tracking keeps the previous base) and
    /// returns [`Error::Cancelled`].
    pub cancel: tokio_util::sync::CancellationToken,
}

impl BackupRequest {
    /// A crash-consistent backup of the disks `snapshotter` takes, with default settings.
    pub fn new(vm: impl Into<String>, snapshotter: Arc<dyn Snapshotter>) -> Self {
        BackupRequest {
            vm: vm.into(),
            snapshotter,
            quiesce: None,
            consistency_wanted: Level::Crash,
            keep_snapshots: None,
            upload_concurrency: 16,
            policy: None,
            lease: LeaseOptions::default().waiting(std::time::Duration::from_secs(600)),
            check_known: false,
            take_over: false,
            observer: Arc::new(NoObserver),
            cancel: tokio_util::sync::CancellationToken::new(),
        }
    }
}

/// The result of a backup, as printed by `backup --json`.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct BackupReport {
    /// The committed point id.
    pub point: String,
    /// The VM.
    pub vm: String,
    /// The consistency reached (`crash`, `file_system`, `application`).
    pub consistency: Level,
    /// The consistency wanted.
    pub consistency_wanted: Level,
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
#[non_exhaustive]
pub struct DiskReport {
    /// Disk name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// The previous point the comparison ran against, if any.
    pub previous_point: Option<String>,
    /// The kind of snapshot read (`reflink`, `copy`, ...).
    pub snapshot: String,
    /// Why no ranges were known unchanged, when the source could not say.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub change_tracking: Option<String>,
    /// Statistics (blocks, changed_blocks, bytes_read, bytes_uploaded, …).
    #[serde(flatten)]
    pub stats: DiskStats,
}

/// The snapshot phase's result: the point-in-time disks and how consistent they are.
pub(crate) struct Snapped {
    pub(crate) sources: Vec<Box<dyn DiskSource>>,
    pub(crate) consistency: ConsistencyRecord,
    /// The agent's identity for the point's `agent` field.
    pub(crate) agent: Option<serde_json::Value>,
    pub(crate) elapsed_ms: u64,
}

/// Runs one backup job: quiesce (when asked), snapshot every disk at one instant, thaw,
/// transfer the changed blocks of every disk in parallel, commit the recovery point, release
/// the snapshots (kept for instant restore when asked; their change tracking becomes the next
/// backup's base only when the point was committed).
///
/// Errors: a bad VM name; the level reachable is below the minimum ([`Error::Consistency`],
/// nothing committed); a pre-script failed without `continue_on_failure` ([`Error::Agent`]);
/// the snapshot, the transfer or the commit failed.
pub async fn run_backup(req: BackupRequest, vault: &Vault) -> Result<BackupReport, Error> {
    let started = Instant::now();
    validate_name("vm", &req.vm)?;
    let span = match &req.quiesce {
        Some(q) => tracing::info_span!("backup", vm = %req.vm, agent = %q.agent.address),
        None => tracing::info_span!("backup", vm = %req.vm),
    };
    run(&req, vault, started).instrument(span).await
}

async fn run(req: &BackupRequest, vault: &Vault, started: Instant) -> Result<BackupReport, Error> {
    // Only the VM's owner backs it up: checked before the guest is touched.
    vault
        .claim_vm(&req.vm, req.take_over)
        .instrument(tracing::info_span!("claim_vm"))
        .await?;
    let created = Timestamp::now();
    let point = new_point_id(created);
    let observer = &req.observer;
    observer.phase(Phase::Snapshot, PhaseEvent::Started);
    let snapped = match snapshot_phase(req, vault, &point).await {
        Ok(s) => s,
        Err(e) => {
            observer.phase(Phase::Snapshot, PhaseEvent::Failed);
            return Err(e);
        }
    };
    observer.phase(Phase::Snapshot, PhaseEvent::Completed);
    if req.cancel.is_cancelled() {
        tracing::warn!("cancelled after the snapshot: nothing is transferred");
        release(snapped.sources, None, false).await;
        return Err(crate::Error::Cancelled {
            vm: req.vm.clone(),
            at: "after the snapshot, before the transfer".into(),
        });
    }
    let kept = req
        .keep_snapshots
        .as_ref()
        .and_then(|k| crate::tiers::record_kept(k, &req.vm, &point, created, &snapped.sources));
    observer.phase(Phase::Transfer, PhaseEvent::Started);
    let result = crate::transfer::transfer(vault, req, &point, created, &snapped, started).await;
    observer.phase(
        Phase::Transfer,
        if result.is_ok() {
            PhaseEvent::Completed
        } else {
            PhaseEvent::Failed
        },
    );
    let keep = kept.is_some();
    release(snapped.sources, result.as_ref().ok(), keep)
        .instrument(tracing::info_span!("release"))
        .await;
    if let (Some(k), Some(mut record)) = (&req.keep_snapshots, kept) {
        record.state = if result.is_ok() {
            KeptState::InVault
        } else {
            KeptState::TransferFailed
        };
        if let Err(e) = k.store.record(&record) {
            tracing::warn!(error = %e, "cannot update the kept-snapshot index");
        }
    }
    result.map(|(report, _)| report)
}

/// The snapshot phase: quiesced through the agent when the request says so, else just
/// prepare and take.
async fn snapshot_phase(req: &BackupRequest, vault: &Vault, point: &str) -> Result<Snapped, Error> {
    if let Some(q) = &req.quiesce {
        return crate::quiesce::snapshot(req, vault, q, point).await;
    }
    let start = Instant::now();
    let sources = take(req, point).await?;
    let mut consistency = ConsistencyRecord::crash();
    consistency.wanted = req.consistency_wanted.max(Level::Crash);
    if consistency.wanted > Level::Crash {
        consistency.reasons.push(format!(
            "no guest agent: crash-consistent instead of {}",
            consistency.wanted
        ));
    }
    Ok(Snapped {
        sources,
        consistency,
        agent: None,
        elapsed_ms: start.elapsed().as_millis() as u64,
    })
}

/// Prepares the snapshot (the slow part) and takes it.
pub(crate) async fn take(
    req: &BackupRequest,
    point: &str,
) -> Result<Vec<Box<dyn DiskSource>>, Error> {
    let snap_err = |source| Error::Snapshot {
        vm: req.vm.clone(),
        source,
    };
    let pending = req
        .snapshotter
        .prepare(&req.vm, point)
        .instrument(tracing::info_span!("prepare"))
        .await
        .map_err(snap_err)?;
    pending
        .take()
        .instrument(tracing::info_span!("take"))
        .await
        .map_err(snap_err)
}

/// Ends every source: committed (with its manifest) or failed; kept when asked.
async fn release(
    sources: Vec<Box<dyn DiskSource>>,
    committed: Option<&(BackupReport, RecoveryPoint)>,
    keep: bool,
) {
    for source in sources {
        let name = source.name().to_string();
        let outcome = match committed.and_then(|(_, p)| p.disk(&name).map(|d| (p, d))) {
            Some((p, d)) => Outcome::Committed {
                point: p.id.clone(),
                manifest_digest: d.manifest_digest.clone(),
                keep,
            },
            None => Outcome::Failed { keep },
        };
        if let Err(e) = source.release(outcome).await {
            tracing::warn!(disk = %name, error = %e, "cannot release the snapshot");
        }
    }
}
