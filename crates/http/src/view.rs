//! The read side of the API: an in-memory view of the job history and of the vault, kept by
//! one task, so that read requests touch neither SQLite nor the vault (and never wait for a
//! lock a running backup holds).
//!
//! * The history part (the latest [`VM_JOBS`] jobs of each configured VM, the latest
//!   [`RECENT_JOBS`] jobs, the per-VM totals, the storage samples) is read again, on a blocking
//!   thread, whenever [`History::changes`] moved; that counter is checked every
//!   [`HISTORY_TICK`]. A job that starts, changes phase or ends shows within that tick (plus
//!   the time of the read itself).
//! * The vault part (the points of each VM, with whether a kept snapshot exists, and the
//!   leases) is read again when a job starts or ends, after an API action that changes the
//!   vault (prune), and at least every [`VAULT_EVERY`] for changes made outside this daemon
//!   (a CLI prune, the daemon's own retention, another controller). Point objects already
//!   loaded are reused while their size, modification time and ETag are unchanged, so a
//!   refresh of a big vault costs one listing plus the new points.
//!
//! Memory: the history part is bounded by the constants above times the configured VMs; the
//! vault part holds one decoded point per point in the vault (what each request used to load).
//! Live data (running jobs' progress, cancel requests, verify results, now-dependent fields
//! such as `next_run` and `overdue`) is still read per request.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bulwark_controller::tiers::SnapshotStore;
use bulwark_daemon::history::{History, JobRecord, JobState, JobTotals, StorageSample};
use bulwark_vault::{LeaseRecord, RecoveryPoint, Vault};
use futures::{StreamExt, TryStreamExt};

/// How often the history's change counter is looked at.
pub(crate) const HISTORY_TICK: Duration = Duration::from_millis(250);
/// The longest the vault part goes without a refresh.
pub(crate) const VAULT_EVERY: Duration = Duration::from_secs(10);
/// Jobs kept per configured VM (newest first): the VM resources and their protection state
/// read these, and `GET /jobs?vm=` with a limit up to this.
pub(crate) const VM_JOBS: usize = 200;
/// Jobs kept over all VMs (newest first): `GET /jobs` with a limit up to this.
pub(crate) const RECENT_JOBS: usize = 1000;
/// Storage samples kept (oldest first), for the console's plot.
pub(crate) const SAMPLES: usize = 2000;
/// Point objects read at once during a refresh.
const LOAD_CONCURRENCY: usize = 8;

/// The history part of the view.
#[derive(Debug, Default)]
pub(crate) struct HistoryView {
    /// Per configured VM, its latest jobs, newest first (at most [`VM_JOBS`]).
    pub(crate) by_vm: HashMap<String, Vec<JobRecord>>,
    /// The latest jobs of all VMs, newest first (at most [`RECENT_JOBS`]).
    pub(crate) recent: Vec<JobRecord>,
    /// Totals per VM and state.
    pub(crate) totals: Vec<JobTotals>,
    /// Storage measurements, oldest first (at most [`SAMPLES`]).
    pub(crate) samples: Vec<StorageSample>,
    /// An error of the last read, when it failed (the data above is then the read before).
    pub(crate) error: Option<String>,
}

impl HistoryView {
    /// The latest jobs of `vm` (empty for a VM without jobs or not configured).
    pub(crate) fn jobs_of(&self, vm: &str) -> &[JobRecord] {
        self.by_vm.get(vm).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Job `id`, if the view holds it.
    pub(crate) fn job(&self, id: i64) -> Option<&JobRecord> {
        self.recent
            .iter()
            .chain(self.by_vm.values().flatten())
            .find(|j| j.id == id)
    }

    /// Reads the view from `history` (blocking: call it on a blocking thread).
    fn read(history: &History, vms: &[String]) -> Result<HistoryView, bulwark_daemon::Error> {
        let mut by_vm = HashMap::with_capacity(vms.len());
        for vm in vms {
            by_vm.insert(vm.clone(), history.jobs(Some(vm), VM_JOBS)?);
        }
        Ok(HistoryView {
            by_vm,
            recent: history.jobs(None, RECENT_JOBS)?,
            totals: history.totals()?,
            samples: history.storage_samples(SAMPLES)?,
            error: None,
        })
    }
}

/// One point of a VM as the view holds it.
#[derive(Debug, Clone)]
pub(crate) struct PointEntry {
    /// The point.
    pub(crate) point: RecoveryPoint,
    /// A kept snapshot of it exists on this host (the `snapshot` tier).
    pub(crate) kept: bool,
}

/// The points of one VM.
#[derive(Debug, Default)]
pub(crate) struct VmPoints {
    /// Readable points, oldest first.
    pub(crate) points: Vec<PointEntry>,
    /// Point objects that failed to load: key and error.
    pub(crate) broken: Vec<(String, String)>,
}

/// The vault part of the view.
#[derive(Debug, Default)]
pub(crate) struct VaultView {
    /// Per VM (every VM with a point object in the vault).
    pub(crate) points: HashMap<String, VmPoints>,
    /// The leases, by key.
    pub(crate) leases: Vec<(String, Result<LeaseRecord, String>)>,
    /// An error of the last refresh, when it failed (the data above is then the read before).
    pub(crate) error: Option<String>,
}

/// When the parts of the view are due for a read (the refresh task's bookkeeping; pure, so
/// that its rules are unit-tested).
#[derive(Debug, Default)]
pub(crate) struct Freshness {
    history_seen: Option<u64>,
    running_seen: Option<Vec<i64>>,
    vault_at: Option<Instant>,
    vault_dirty: bool,
}

impl Freshness {
    /// The history part is due when its change counter moved since the last good read.
    #[cfg(test)]
    fn history_due(&self, changes: u64) -> bool {
        Freshness::due(self.history_seen, changes)
    }

    fn due(seen: Option<u64>, changes: u64) -> bool {
        seen != Some(changes)
    }

    /// The history was read completely, and the counter was `changes` before the read began.
    pub(crate) fn history_read(&mut self, changes: u64) {
        self.history_seen = Some(changes);
    }

    /// Something changed the vault (a job ended, an API prune).
    pub(crate) fn invalidate_vault(&mut self) {
        self.vault_dirty = true;
    }

    /// Whether the vault part is due at `now`, with `running` the ids of the running jobs
    /// (sorted): when it was invalidated, when the running jobs changed since the last look
    /// (a job started or ended: leases and points move), or when the last read is
    /// [`VAULT_EVERY`] old.
    pub(crate) fn vault_due(&mut self, running: &[i64], now: Instant) -> bool {
        if self.running_seen.as_deref() != Some(running) {
            self.running_seen = Some(running.to_vec());
            self.vault_dirty = true;
        }
        self.vault_dirty
            || self
                .vault_at
                .is_none_or(|at| now.saturating_duration_since(at) >= VAULT_EVERY)
    }

    /// The vault was read, from `began` on (an invalidation during the read was seen by the
    /// read only if it came before `began`: the caller invalidates again for later ones).
    pub(crate) fn vault_read(&mut self, began: Instant) {
        self.vault_dirty = false;
        self.vault_at = Some(began);
    }
}

/// What a loaded point object was, to reuse it while its object is unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    size: u64,
    modified: i64,
    e_tag: Option<String>,
}

/// The vault part's reader, with the point objects it already decoded.
#[derive(Debug, Default)]
pub(crate) struct VaultReader {
    loaded: HashMap<String, (Stamp, Result<RecoveryPoint, String>)>,
    /// Point objects read and decoded so far (to show that unchanged ones are not).
    decoded: u64,
}

impl VaultReader {
    /// Lists `points/` and `locks/` of `vault` and decodes the point objects not seen before
    /// (or changed since); `store` says which points have kept snapshots.
    pub(crate) async fn read(
        &mut self,
        vault: &Vault,
        store: &SnapshotStore,
    ) -> Result<VaultView, String> {
        let prefix = object_store::path::Path::from("points");
        let metas: Vec<_> = vault
            .store()
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| format!("list {prefix}: {e}"))?;
        let mut wanted: Vec<(String, String, String, Stamp)> = Vec::new();
        for m in metas {
            let parts: Vec<_> = m.location.parts().collect();
            // points/<vm>/<id>.json; anything else (a staging file) is not a point.
            if let [_, vm, file] = parts.as_slice()
                && let Some(id) = file.as_ref().strip_suffix(".json")
                && bulwark_vault::validate_name("point", id).is_ok()
            {
                let stamp = Stamp {
                    size: m.size,
                    modified: m.last_modified.timestamp_millis(),
                    e_tag: m.e_tag.clone(),
                };
                wanted.push((
                    m.location.to_string(),
                    vm.as_ref().to_string(),
                    id.to_string(),
                    stamp,
                ));
            }
        }
        let mut old = std::mem::take(&mut self.loaded);
        let mut fresh = HashMap::with_capacity(wanted.len());
        let mut to_load = Vec::new();
        for (key, vm, id, stamp) in wanted {
            match old.remove(&key) {
                Some((s, p)) if s == stamp => {
                    fresh.insert(key, (s, p));
                }
                _ => to_load.push((key, vm, id, stamp)),
            }
        }
        let loaded: Vec<_> = futures::stream::iter(to_load)
            .map(|(key, vm, id, stamp)| async move {
                let p = vault.get_point(&vm, &id).await.map_err(|e| e.to_string());
                (key, stamp, p)
            })
            .buffer_unordered(LOAD_CONCURRENCY)
            .collect()
            .await;
        for (key, stamp, p) in loaded {
            self.decoded += 1;
            fresh.insert(key, (stamp, p));
        }
        self.loaded = fresh;

        // Which points have kept snapshots: small files on this host, read off the async
        // threads.
        let points: Vec<RecoveryPoint> = self
            .loaded
            .values()
            .filter_map(|(_, p)| p.as_ref().ok().cloned())
            .collect();
        let store = store.clone();
        let entries = tokio::task::spawn_blocking(move || {
            points
                .into_iter()
                .map(|point| {
                    let kept = store.get(&point.vm, &point.id).ok().flatten().is_some();
                    PointEntry { point, kept }
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| format!("kept snapshots: {e}"))?;
        let mut by_vm: HashMap<String, VmPoints> = HashMap::new();
        for e in entries {
            by_vm.entry(e.point.vm.clone()).or_default().points.push(e);
        }
        for (key, (_, p)) in &self.loaded {
            if let Err(e) = p {
                let vm = key.split('/').nth(1).unwrap_or_default().to_string();
                by_vm
                    .entry(vm)
                    .or_default()
                    .broken
                    .push((key.clone(), e.clone()));
            }
        }
        for v in by_vm.values_mut() {
            v.points.sort_by(|a, b| {
                (a.point.created, &a.point.id).cmp(&(b.point.created, &b.point.id))
            });
            v.broken.sort();
        }
        let leases = bulwark_vault::lease::list_leases(vault)
            .await
            .map_err(|e| format!("leases: {e}"))?
            .into_iter()
            .map(|(k, r)| (k, r.map_err(|e| e.to_string())))
            .collect();
        Ok(VaultView {
            points: by_vm,
            leases,
            error: None,
        })
    }
}

/// The view every read handler uses.
#[derive(Debug)]
pub(crate) struct View {
    history: RwLock<Arc<HistoryView>>,
    vault: RwLock<Arc<VaultView>>,
    vault_changed: tokio::sync::Notify,
    /// How many job ends ([`bulwark_daemon::control::Control::ends`]) the history part
    /// includes.
    covered: tokio::sync::watch::Sender<u64>,
}

impl Default for View {
    fn default() -> View {
        View {
            history: RwLock::default(),
            vault: RwLock::default(),
            vault_changed: tokio::sync::Notify::new(),
            covered: tokio::sync::watch::channel(0).0,
        }
    }
}

/// The longest a request waits for the history part to include a job end announced before
/// it; then it is served what there is.
pub(crate) const CATCH_UP: Duration = Duration::from_secs(2);

impl View {
    /// Waits (at most `limit`) until the history part includes the first `ends` job ends, so
    /// that a job whose end was announced (to a notification, a job-end listener) is never
    /// served as still running. The refresh task reads the history at once after each end,
    /// so this wait is one read of the history at most.
    pub(crate) async fn caught_up(&self, ends: u64, limit: Duration) {
        let mut rx = self.covered.subscribe();
        if *rx.borrow_and_update() >= ends {
            return;
        }
        let _ = tokio::time::timeout(limit, rx.wait_for(|c| *c >= ends)).await;
    }

    /// The history part as last read.
    pub(crate) fn history(&self) -> Arc<HistoryView> {
        self.history
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The vault part as last read.
    pub(crate) fn vault(&self) -> Arc<VaultView> {
        self.vault.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Asks for a read of the vault part now (after an action that changed the vault).
    pub(crate) fn invalidate_vault(&self) {
        self.vault_changed.notify_one();
    }

    fn set_history(&self, v: HistoryView) {
        *self.history.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(v);
    }

    fn set_vault(&self, v: VaultView) {
        *self.vault.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(v);
    }

    /// Reads the history part if it is due. Returns whether it read. `ends` is the count of
    /// job ends taken before: once the read is done (or found needless), the view includes
    /// them.
    pub(crate) async fn refresh_history(
        &self,
        history: &History,
        vms: &Arc<Vec<String>>,
        ends: u64,
        fresh: &mut Freshness,
    ) -> bool {
        let (h, names) = (history.clone(), vms.clone());
        let seen = fresh.history_seen;
        let read = tokio::task::spawn_blocking(move || {
            let changes = h.changes();
            let due = Freshness::due(seen, changes);
            (changes, due.then(|| HistoryView::read(&h, &names)))
        })
        .await;
        // The count only grows.
        let covered = |c: &mut u64| {
            let grew = ends > *c;
            *c = (*c).max(ends);
            grew
        };
        match read {
            Ok((_, None)) => {
                self.covered.send_if_modified(covered);
                false
            }
            Ok((changes, Some(Ok(v)))) => {
                self.set_history(v);
                fresh.history_read(changes);
                self.covered.send_if_modified(covered);
                true
            }
            Ok((_, Some(Err(e)))) => {
                tracing::warn!(error = %e, "API view: cannot read the job history");
                let old = self.history();
                self.set_history(HistoryView {
                    by_vm: old.by_vm.clone(),
                    recent: old.recent.clone(),
                    totals: old.totals.clone(),
                    samples: old.samples.clone(),
                    error: Some(e.to_string()),
                });
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "API view: history reader failed");
                false
            }
        }
    }

    /// Reads the vault part if it is due. Returns whether it read.
    pub(crate) async fn refresh_vault(
        &self,
        reader: &mut VaultReader,
        vault: &Vault,
        store: &SnapshotStore,
        running: &[i64],
        fresh: &mut Freshness,
    ) -> bool {
        let began = Instant::now();
        if !fresh.vault_due(running, began) {
            return false;
        }
        match reader.read(vault, store).await {
            Ok(v) => {
                self.set_vault(v);
                fresh.vault_read(began);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "API view: cannot read the vault");
                let old = self.vault();
                let mut points = HashMap::new();
                for (vm, p) in &old.points {
                    points.insert(
                        vm.clone(),
                        VmPoints {
                            points: p.points.clone(),
                            broken: p.broken.clone(),
                        },
                    );
                }
                self.set_vault(VaultView {
                    points,
                    leases: old.leases.clone(),
                    error: Some(e),
                });
                // Tried: the next try comes after VAULT_EVERY or the next event.
                fresh.vault_read(began);
                false
            }
        }
    }
}

/// Reads both parts once (before the API serves), then starts the task that keeps them
/// fresh.
pub(crate) async fn start(app: crate::api::Shared) {
    let vms: Arc<Vec<String>> = Arc::new(app.h.config.vms.iter().map(|v| v.name.clone()).collect());
    let mut fresh = Freshness::default();
    let mut reader = VaultReader::default();
    refresh_both(&app, &vms, &mut reader, &mut fresh).await;
    let mut ended = app.h.control.subscribe();
    tokio::spawn(async move {
        use tokio::sync::broadcast::error::RecvError;
        let mut tick = tokio::time::interval(HISTORY_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut listening = true;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = app.view.vault_changed.notified() => fresh.invalidate_vault(),
                e = ended.recv(), if listening => match e {
                    Ok(e) if e.record.state == JobState::Skipped => {}
                    Ok(_) | Err(RecvError::Lagged(_)) => fresh.invalidate_vault(),
                    Err(RecvError::Closed) => listening = false,
                },
            }
            refresh_both(&app, &vms, &mut reader, &mut fresh).await;
        }
    });
}

/// Refreshes the history part, then the vault part, each only when it is due.
async fn refresh_both(
    app: &crate::api::Shared,
    vms: &Arc<Vec<String>>,
    reader: &mut VaultReader,
    fresh: &mut Freshness,
) {
    app.view
        .refresh_history(&app.h.history, vms, app.h.control.ends(), fresh)
        .await;
    app.view
        .refresh_vault(
            reader,
            &app.h.vault,
            &app.h.store,
            &app.h.control.running(),
            fresh,
        )
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulwark_daemon::history::Trigger;
    use jiff::Timestamp;

    #[test]
    fn history_is_due_exactly_when_its_counter_moved() {
        let mut f = Freshness::default();
        assert!(f.history_due(0), "never read: due");
        f.history_read(0);
        assert!(!f.history_due(0));
        assert!(f.history_due(3));
        f.history_read(3);
        assert!(!f.history_due(3));
    }

    #[test]
    fn vault_is_due_on_invalidation_job_start_or_end_and_age() {
        let t0 = Instant::now();
        let mut f = Freshness::default();
        assert!(f.vault_due(&[], t0), "never read: due");
        f.vault_read(t0);
        assert!(!f.vault_due(&[], t0 + Duration::from_secs(1)));
        // A job starts: due once.
        assert!(f.vault_due(&[7], t0 + Duration::from_secs(2)));
        f.vault_read(t0 + Duration::from_secs(2));
        assert!(!f.vault_due(&[7], t0 + Duration::from_secs(3)));
        // It ends.
        assert!(f.vault_due(&[], t0 + Duration::from_secs(4)));
        f.vault_read(t0 + Duration::from_secs(4));
        // An action invalidates.
        f.invalidate_vault();
        assert!(f.vault_due(&[], t0 + Duration::from_secs(5)));
        f.vault_read(t0 + Duration::from_secs(5));
        // Age alone.
        assert!(!f.vault_due(&[], t0 + Duration::from_secs(5) + VAULT_EVERY / 2));
        assert!(f.vault_due(&[], t0 + Duration::from_secs(5) + VAULT_EVERY));
    }

    use object_store::ObjectStoreExt;

    fn point(vm: &str, id: &str) -> RecoveryPoint {
        RecoveryPoint {
            id: id.into(),
            vm: vm.into(),
            created: Timestamp::now(),
            committed: Timestamp::now(),
            consistency: bulwark_vault::ConsistencyRecord::crash(),
            disks: Vec::new(),
            policy: None,
            agent: None,
        }
    }

    #[tokio::test]
    async fn the_vault_part_follows_new_removed_and_broken_points_and_reuses_the_rest() {
        let store: Arc<dyn object_store::ObjectStore> =
            Arc::new(object_store::memory::InMemory::new());
        let vault = Vault::create_store(store.clone(), "mem", &Default::default())
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let kept = SnapshotStore::new(dir.path().to_path_buf());
        let mut r = VaultReader::default();
        let v = r.read(&vault, &kept).await.unwrap();
        assert!(v.points.is_empty());

        vault.commit_point(&point("a", "p1")).await.unwrap();
        vault.commit_point(&point("b", "p1")).await.unwrap();
        let v = r.read(&vault, &kept).await.unwrap();
        assert_eq!(v.points["a"].points.len(), 1);
        assert_eq!(v.points["b"].points.len(), 1);
        assert_eq!(r.decoded, 2);

        // A new point: only it is decoded.
        vault.commit_point(&point("a", "p2")).await.unwrap();
        let v = r.read(&vault, &kept).await.unwrap();
        let ids: Vec<_> = v.points["a"]
            .points
            .iter()
            .map(|e| e.point.id.as_str())
            .collect();
        assert_eq!(ids, ["p1", "p2"], "oldest first");
        assert!(!v.points["a"].points[0].kept);
        assert_eq!(r.decoded, 3);
        // Nothing changed: nothing decoded.
        r.read(&vault, &kept).await.unwrap();
        assert_eq!(r.decoded, 3);

        // A removed point goes; a damaged one shows as broken.
        let key =
            |vm: &str, id: &str| object_store::path::Path::from(format!("points/{vm}/{id}.json"));
        store.delete(&key("b", "p1")).await.unwrap();
        store
            .put(
                &key("a", "p3"),
                bytes::Bytes::from_static(b"not a point").into(),
            )
            .await
            .unwrap();
        let v = r.read(&vault, &kept).await.unwrap();
        assert!(v.points.get("b").is_none_or(|p| p.points.is_empty()));
        assert_eq!(v.points["a"].points.len(), 2);
        assert_eq!(v.points["a"].broken.len(), 1);
        assert_eq!(v.points["a"].broken[0].0, "points/a/p3.json");
        // A rewritten object is decoded again.
        store.delete(&key("a", "p3")).await.unwrap();
        let before = r.decoded;
        vault.commit_point(&point("a", "p3")).await.unwrap();
        let v = r.read(&vault, &kept).await.unwrap();
        assert_eq!(r.decoded, before + 1);
        assert_eq!(v.points["a"].points.len(), 3);
        assert!(v.points["a"].broken.is_empty());
    }

    fn start(h: &History, vm: &str) -> i64 {
        h.start_job(vm, Trigger::Manual, None, Timestamp::now())
            .unwrap()
    }

    #[tokio::test]
    async fn a_new_job_shows_after_one_refresh_and_nothing_is_read_without_a_change() {
        let h = History::in_memory().unwrap();
        let vms = Arc::new(vec!["a".to_string(), "b".to_string()]);
        let view = View::default();
        let mut f = Freshness::default();
        assert!(view.refresh_history(&h, &vms, 0, &mut f).await);
        assert!(view.history().recent.is_empty());
        assert!(
            !view.refresh_history(&h, &vms, 0, &mut f).await,
            "no change, no read"
        );
        let id = start(&h, "a");
        assert!(view.refresh_history(&h, &vms, 0, &mut f).await);
        let v = view.history();
        assert_eq!(v.recent.first().map(|j| j.id), Some(id));
        assert_eq!(
            v.jobs_of("a").first().map(|j| j.state),
            Some(JobState::InProgress)
        );
        assert!(v.jobs_of("b").is_empty());
        // Its end shows too.
        h.finish(
            id,
            Timestamp::now(),
            &bulwark_daemon::history::JobEnd {
                state: Some(JobState::Completed),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(view.refresh_history(&h, &vms, 0, &mut f).await);
        assert_eq!(
            view.history().job(id).map(|j| j.state),
            Some(JobState::Completed)
        );
    }

    #[tokio::test]
    async fn a_request_waits_until_the_view_includes_an_announced_end() {
        let h = History::in_memory().unwrap();
        let vms = Arc::new(vec!["a".to_string()]);
        let view = Arc::new(View::default());
        let mut f = Freshness::default();
        view.refresh_history(&h, &vms, 0, &mut f).await;
        let id = start(&h, "a");
        h.finish(id, Timestamp::now(), &Default::default()).unwrap();
        // The end is announced (ends = 1): a reader waits for the refresh that includes it.
        let reader = {
            let view = view.clone();
            tokio::spawn(async move {
                view.caught_up(1, Duration::from_secs(30)).await;
                view.history().job(id).map(|j| j.state)
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !reader.is_finished(),
            "served before the view includes the end"
        );
        view.refresh_history(&h, &vms, 1, &mut f).await;
        assert_eq!(reader.await.unwrap(), Some(JobState::Failed));
        // A refresh that finds nothing new still says the view includes the ends counted
        // before it (their writes came first).
        let t0 = Instant::now();
        let waiter = {
            let view = view.clone();
            tokio::spawn(async move { view.caught_up(2, Duration::from_secs(30)).await })
        };
        assert!(!view.refresh_history(&h, &vms, 2, &mut f).await);
        waiter.await.unwrap();
        assert!(t0.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn the_history_part_is_bounded() {
        let h = History::in_memory().unwrap();
        for i in 0..(RECENT_JOBS + 50) {
            start(&h, if i % 2 == 0 { "a" } else { "b" });
        }
        let vms = Arc::new(vec!["a".to_string(), "b".to_string()]);
        let view = View::default();
        view.refresh_history(&h, &vms, 0, &mut Freshness::default())
            .await;
        let v = view.history();
        assert_eq!(v.recent.len(), RECENT_JOBS);
        assert_eq!(v.jobs_of("a").len(), VM_JOBS);
        assert_eq!(v.jobs_of("b").len(), VM_JOBS);
        assert!(
            v.recent.windows(2).all(|w| w[0].id > w[1].id),
            "newest first"
        );
    }
}
