//! The scheduled controller daemon (`bulwark-controller serve`).
//!
//! * Each VM's next run comes from its policy ([`bulwark_policy::Policy::runs_after`]) or, for
//!   tests and ad-hoc use, from `schedule_override_seconds` (every N seconds, aligned to the
//!   Unix epoch): [`VmSchedule`].
//! * At its time a job is recorded in the [`History`] and run by a [`JobRunner`] (the real one,
//!   [`BackupRunner`], is snapshot + transfer keeping the snapshots for the policy's
//!   instant-restore days). Disks of one VM are transferred in parallel; at most `concurrency`
//!   VMs run at once (a semaphore; a job waiting for a slot is `InProgress`).
//! * A run that comes while the previous job of the same VM is still running (or waiting for a
//!   slot) is not started: it is recorded as `Skipped` with the reason.
//! * **Catch-up**: at start, for each VM, the latest run time after the last scheduled time in
//!   the job history and at or before now is made up once (trigger `catch-up`), if it is at
//!   most `catch_up` old (default 24 hours, `catch_up_hours` in the config; 0 disables). Older
//!   missed runs, and all but the latest, are not made up: the next regular run comes soon
//!   enough. A VM without history has nothing to catch up. The catch-up job records the missed
//!   run time as its scheduled time, so a second restart does not repeat it.
//! * If the daemon falls behind while running (a suspended host), it runs the latest due run
//!   once and goes on from now; it never fires a burst.
//! * **Shutdown**: when the shutdown future completes (SIGTERM/SIGINT in the CLI) no new job
//!   starts; running jobs get `shutdown_timeout`, then they are aborted and recorded as
//!   `Cancelled` (their snapshots are removed, or kept as tier "snapshot" if already recorded).
//! * **Housekeeping** at start, every `housekeeping_interval` and after each job: expired kept
//!   snapshots are removed, then the [`Maintenance`] hook runs (retention/prune and garbage
//!   collection, [`RetentionMaintenance`]). It runs in a task of its own, one pass at a time,
//!   so a slow pass (GC waiting on a lease) never delays or hides a scheduled run; requests
//!   made during a pass are served by one more pass after it.
//! * The clock is a [`Clock`], so tests drive days of schedule in milliseconds with tokio's
//!   paused time ([`TokioClock`]).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bulwark_consistency::Level;
use bulwark_policy::Policy;
use std::path::PathBuf;

use bulwark_controller::sources::{self, SourceSpec};
use bulwark_snapshot::{ImageSnapshotter, Provider, Snapshotter};
use bulwark_vault::Vault;
use jiff::{SignedDuration, Timestamp};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::Error;
use crate::config::{Config, VmConfig};
use crate::control::{Control, Inbox, JobEnded, RunNowRefused};
use crate::history::{History, JobEnd, JobOutcome, JobState, Phase, PhaseState, Trigger};
use bulwark_controller::tiers::SnapshotStore;
use bulwark_controller::{
    BackupRequest, KeepSnapshots, Observer, PhaseEvent, Quiesce, QuiesceOptions,
};

/// A boxed future, as the object-safe traits here return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The daemon's notion of time.
pub trait Clock: Send + Sync {
    /// Now.
    fn now(&self) -> Timestamp;
    /// Completes at (or soon after) `t`.
    fn sleep_until(&self, t: Timestamp) -> BoxFuture<'_, ()>;
}

/// Wall-clock time. Sleeps in steps of at most 30 seconds and re-reads the clock, so a clock
/// step (NTP, suspend) delays a run by at most that much.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }

    fn sleep_until(&self, t: Timestamp) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            loop {
                let now = Timestamp::now();
                if now >= t {
                    return;
                }
                let left = Duration::try_from(t.duration_since(now)).unwrap_or_default();
                tokio::time::sleep(left.min(Duration::from_secs(30))).await;
            }
        })
    }
}

/// Time that follows tokio's clock from a chosen start: with `tokio::time::pause` (tests), days
/// of schedule pass instantly and deterministically.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    base: Timestamp,
    start: tokio::time::Instant,
}

impl TokioClock {
    /// A clock that reads `base` now.
    pub fn starting_at(base: Timestamp) -> TokioClock {
        TokioClock {
            base,
            start: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Timestamp {
        let elapsed = SignedDuration::try_from(self.start.elapsed()).unwrap_or(SignedDuration::MAX);
        self.base.checked_add(elapsed).unwrap_or(Timestamp::MAX)
    }

    fn sleep_until(&self, t: Timestamp) -> BoxFuture<'_, ()> {
        let offset = Duration::try_from(t.duration_since(self.base)).unwrap_or_default();
        let deadline = self.start + offset;
        Box::pin(tokio::time::sleep_until(deadline))
    }
}

/// The daemon's exclusive hold on its state directory (`<state_dir>/daemon.lock`, an `flock`
/// released when the process ends, however it ends).
#[derive(Debug)]
pub struct StateLock {
    _file: std::fs::File,
}

/// Takes the state directory's lock (creating the directory), or says which daemon holds it.
pub fn lock_state_dir(state_dir: &std::path::Path) -> Result<StateLock, Error> {
    use std::io::Write;
    std::fs::create_dir_all(state_dir).map_err(|source| Error::Io {
        path: state_dir.to_path_buf(),
        source,
    })?;
    let path = state_dir.join("daemon.lock");
    let io = |source| Error::Io {
        path: path.clone(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        let pid = std::fs::read_to_string(&path).unwrap_or_default();
        return Err(Error::StateDirLocked {
            path,
            pid: pid.trim().to_string(),
        });
    }
    file.set_len(0).map_err(io)?;
    write!(file, "{}", std::process::id()).map_err(io)?;
    Ok(StateLock { _file: file })
}

/// When a VM's jobs run.
#[derive(Debug, Clone)]
pub enum VmSchedule {
    /// The policy's schedule.
    Policy(Arc<Policy>),
    /// Every this often, aligned to the Unix epoch (tests, ad-hoc; at least 1 second).
    Every(Duration),
}

impl VmSchedule {
    /// The schedule of a configured VM.
    pub fn of(vm: &VmConfig) -> VmSchedule {
        match vm.schedule_override {
            Some(d) => VmSchedule::Every(d),
            None => VmSchedule::Policy(vm.policy.clone()),
        }
    }

    fn every_ms(d: Duration) -> i64 {
        i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1000)
    }

    /// The first run strictly after `t`.
    pub fn next_after(&self, t: Timestamp) -> Option<Timestamp> {
        match self {
            VmSchedule::Policy(p) => p.runs_after(t).next(),
            VmSchedule::Every(d) => {
                let n = Self::every_ms(*d);
                let k = t.as_millisecond().div_euclid(n).checked_add(1)?;
                Timestamp::from_millisecond(k.checked_mul(n)?).ok()
            }
        }
    }

    /// The latest run strictly after `after` and at or before `now`.
    pub fn latest_in(&self, after: Timestamp, now: Timestamp) -> Option<Timestamp> {
        match self {
            VmSchedule::Every(d) => {
                let n = Self::every_ms(*d);
                let t = Timestamp::from_millisecond(now.as_millisecond().div_euclid(n) * n).ok()?;
                (t > after).then_some(t)
            }
            VmSchedule::Policy(p) => p.runs_after(after).take_while(|r| *r <= now).last(),
        }
    }
}

/// A job to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    /// The VM.
    pub vm: String,
    /// The run time it stands for.
    pub scheduled: Option<Timestamp>,
    /// Why it runs.
    pub trigger: Trigger,
}

/// The pure scheduling state: each VM's next run.
#[derive(Debug, Clone)]
pub struct Scheduler {
    slots: Vec<(String, VmSchedule, Option<Timestamp>)>,
}

impl Scheduler {
    /// Each VM's first run strictly after `now`.
    pub fn new(vms: Vec<(String, VmSchedule)>, now: Timestamp) -> Scheduler {
        Scheduler {
            slots: vms
                .into_iter()
                .map(|(vm, s)| {
                    let next = s.next_after(now);
                    (vm, s, next)
                })
                .collect(),
        }
    }

    /// The run to make up at start: the latest run after `last` (the last scheduled time in
    /// the history) and at or before `now`, if it is at most `window` old.
    pub fn catch_up(
        schedule: &VmSchedule,
        last: Option<Timestamp>,
        now: Timestamp,
        window: Duration,
    ) -> Option<Timestamp> {
        let last = last?;
        if window.is_zero() {
            return None;
        }
        let window = SignedDuration::try_from(window).unwrap_or(SignedDuration::MAX);
        let oldest = now.checked_sub(window).unwrap_or(Timestamp::MIN);
        // Runs older than the window do not count, so start there (bounded work).
        let from = if last > oldest {
            last
        } else {
            oldest
                .checked_sub(SignedDuration::from_nanos(1))
                .unwrap_or(oldest)
        };
        schedule.latest_in(from, now).filter(|r| *r > last)
    }

    /// When the next run of any VM is due.
    pub fn next_wake(&self) -> Option<Timestamp> {
        self.slots.iter().filter_map(|s| s.2).min()
    }

    /// The VMs' runs due at `now`, each VM's next run moved past `now`.
    pub fn take_due(&mut self, now: Timestamp) -> Vec<Due> {
        let mut due = Vec::new();
        for (vm, schedule, next) in &mut self.slots {
            let Some(t) = *next else { continue };
            if t > now {
                continue;
            }
            // Fell behind by more than one run: make the latest once, never a burst.
            let run = schedule.latest_in(t, now).unwrap_or(t);
            if run != t {
                tracing::warn!(vm = %vm, from = %t, to = %run, "the daemon fell behind; runs in between are not made");
            }
            due.push(Due {
                vm: vm.clone(),
                scheduled: Some(run),
                trigger: Trigger::Scheduled,
            });
            *next = schedule.next_after(now);
        }
        due
    }
}

/// A job handed to a [`JobRunner`].
#[derive(Debug, Clone)]
pub struct Job {
    /// The job id in the history.
    pub id: i64,
    /// The VM.
    pub vm: Arc<VmConfig>,
    /// Why it runs.
    pub trigger: Trigger,
    /// The run time it stands for.
    pub scheduled: Option<Timestamp>,
    /// The history, for phase updates.
    pub history: History,
    /// Triggered by [`Control::cancel`]: the job stops at its next safe point.
    pub cancel: tokio_util::sync::CancellationToken,
    /// The daemon's control handle (live progress).
    pub control: Control,
}

/// Runs one job and says how it ended (the daemon records it).
pub trait JobRunner: Send + Sync {
    /// Runs `job`.
    fn run<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, JobEnd>;
}

/// Work the daemon runs on its own schedule, after expiring kept snapshots.
///
/// [`RetentionMaintenance`] (prune and garbage collection) is the one `serve` uses.
pub trait Maintenance: Send + Sync {
    /// Runs once; an error is logged, the daemon goes on.
    fn run<'a>(
        &'a self,
        vms: &'a [Arc<VmConfig>],
        now: Timestamp,
    ) -> BoxFuture<'a, Result<(), String>>;
}

/// The retention the daemon applies at housekeeping: after each job and every housekeeping
/// interval it prunes every VM by its policy (soft-deletes the points the policy does not keep,
/// purges those soft-deleted longer than its soft-delete days, through [`bulwark_controller::prune`]) and
/// removes the kept snapshots of the points it soft-deleted; every `gc_every` it runs garbage
/// collection ([`bulwark_controller::gc`], which refuses while a backup or prune holds its lease; it is then
/// tried again at the next housekeeping).
#[derive(Debug)]
pub struct RetentionMaintenance {
    vault: Vault,
    store: Option<SnapshotStore>,
    prune: bool,
    gc_every: Option<Duration>,
    gc_options: bulwark_vault::GcOptions,
    last_gc: std::sync::Mutex<Timestamp>,
    control: Option<Control>,
}

impl RetentionMaintenance {
    /// Prunes when `prune`; collects garbage every `gc_every` (the first time `gc_every` after
    /// `started`).
    pub fn new(
        vault: Vault,
        store: Option<SnapshotStore>,
        prune: bool,
        gc_every: Option<Duration>,
        started: Timestamp,
    ) -> RetentionMaintenance {
        RetentionMaintenance {
            vault,
            store,
            prune,
            gc_every,
            gc_options: bulwark_vault::GcOptions::default(),
            last_gc: std::sync::Mutex::new(started),
            control: None,
        }
    }

    /// Count lease refusals of prune and GC in `control` (metrics).
    pub fn counting_in(mut self, control: Control) -> RetentionMaintenance {
        self.control = Some(control);
        self
    }

    fn conflict(&self, e: &bulwark_controller::Error, operation: &str) {
        if is_lease_conflict(e)
            && let Some(c) = &self.control
        {
            c.lease_conflict(operation);
        }
    }
}

impl Maintenance for RetentionMaintenance {
    fn run<'a>(
        &'a self,
        vms: &'a [Arc<VmConfig>],
        now: Timestamp,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let mut errors = Vec::new();
            if self.prune {
                for vm in vms {
                    match bulwark_controller::prune(&self.vault, &vm.name, &vm.policy, now, false)
                        .await
                    {
                        Ok(r) => {
                            if !r.deleted.is_empty() || !r.purged.is_empty() {
                                tracing::info!(vm = %vm.name, soft_deleted = r.deleted.len(), purged = r.purged.len(), "retention applied");
                            }
                            if let Some(store) = &self.store {
                                for id in &r.deleted {
                                    if let Ok(Some(k)) = store.get(&vm.name, id)
                                        && let Err(e) = store.remove(&k)
                                    {
                                        errors.push(format!("vm {}: {e}", vm.name));
                                    }
                                }
                            }
                        }
                        Err(e) => {
                            self.conflict(&e, "prune");
                            errors.push(format!("vm {}: prune: {e}", vm.name))
                        }
                    }
                }
            }
            if let Some(every) = self.gc_every {
                let last = *self.last_gc.lock().unwrap_or_else(|p| p.into_inner());
                let due = SignedDuration::try_from(every)
                    .ok()
                    .and_then(|d| last.checked_add(d).ok())
                    .is_some_and(|t| t <= now);
                if due {
                    match bulwark_controller::gc(&self.vault, &self.gc_options).await {
                        Ok(r) => {
                            tracing::info!(report = ?r, "garbage collection done");
                            *self.last_gc.lock().unwrap_or_else(|p| p.into_inner()) = now;
                        }
                        Err(e) => {
                            self.conflict(&e, "gc");
                            errors.push(format!("gc: {e}"))
                        }
                    }
                }
            }
            if errors.is_empty() {
                Ok(())
            } else {
                Err(errors.join("; "))
            }
        })
    }
}

/// Whether the vault refused an operation its lease (another operation held a conflicting
/// one).
pub fn is_lease_conflict(e: &bulwark_controller::Error) -> bool {
    matches!(
        e,
        bulwark_controller::Error::Vault(bulwark_vault::Error::LeaseConflict { .. })
    )
}

/// The real job: snapshot (quiesced through the VM's guest agent when it has one) + transfer
/// through the controller library, keeping the snapshots for the policy's instant-restore days.
#[derive(Debug, Clone)]
pub struct BackupRunner {
    /// The vault.
    pub vault: Vault,
    /// Where snapshots are taken and kept.
    pub store: SnapshotStore,
    /// Snapshot provider.
    pub provider: Provider,
    /// Blocks uploaded at once per disk.
    pub upload_concurrency: usize,
    /// Directory for the NBD sockets of QEMU's exports (`qmp` VMs).
    pub runtime_dir: PathBuf,
    /// The program that runs the watchdog of `qga:` agents (see
    /// [`QuiesceOptions::qga_watchdog`]).
    pub qga_watchdog: Option<PathBuf>,
}

impl JobRunner for BackupRunner {
    fn run<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, JobEnd> {
        Box::pin(async move {
            let vm = &job.vm;
            let c = vm.policy.consistency();
            if vm.agent.is_none() && c.minimum > Level::Crash {
                return JobEnd::with_error(
                    JobState::Failed,
                    format!(
                        "policy {} requires at least {} consistency, and VM {} has no guest agent configured (crash consistency only)",
                        vm.policy.file_name(),
                        c.minimum,
                        vm.name
                    ),
                );
            }
            let result = match self.request(job) {
                Ok(req) => bulwark_controller::run_backup(req, &self.vault)
                    .await
                    .map_err(Error::from),
                Err(e) => Err(e),
            };
            match result {
                Ok(r) => JobEnd {
                    state: Some(if r.consistency_reasons.is_empty() {
                        JobState::Completed
                    } else {
                        JobState::CompletedWithWarnings
                    }),
                    outcome: JobOutcome {
                        point: Some(r.point.clone()),
                        consistency: Some(r.consistency.to_string()),
                        consistency_reasons: r.consistency_reasons.clone(),
                        bytes_read: r.disks.iter().map(|d| d.stats.bytes_read).sum(),
                        bytes_new: r.disks.iter().map(|d| d.stats.bytes_new).sum(),
                        bytes_uploaded: r.disks.iter().map(|d| d.stats.bytes_uploaded).sum(),
                        error: None,
                    },
                    freeze_window_ms: r.freeze_window_ms,
                },
                Err(e @ Error::Controller(bulwark_controller::Error::Cancelled { .. })) => {
                    JobEnd::with_error(JobState::Cancelled, e.to_string())
                }
                Err(e) => {
                    if let Error::Controller(c) = &e
                        && is_lease_conflict(c)
                    {
                        job.control.lease_conflict("backup");
                    }
                    JobEnd::with_error(JobState::Failed, e.to_string())
                }
            }
        })
    }
}

impl BackupRunner {
    /// The request of one job: the VM's image disks snapshotted into the store, quiesced
    /// through its agent (as far as the policy's levels allow) when it has one, the snapshots
    /// kept for the policy's instant-restore days when the VM says so, and every phase
    /// recorded in the job history.
    fn request(&self, job: &Job) -> Result<BackupRequest, Error> {
        let vm = &job.vm;
        let c = vm.policy.consistency();
        let snapshotter: Arc<dyn Snapshotter> = match &vm.qmp {
            // A running VM: QEMU's point in time (one transaction), read over NBD.
            Some(q) => sources::snapshotter(&SourceSpec::vm(
                q.socket.clone(),
                q.disks.clone(),
                &self.runtime_dir,
            ))?,
            None => {
                let mut s = ImageSnapshotter::new(vm.disks.clone()).map_err(|source| {
                    bulwark_controller::Error::Snapshot {
                        vm: vm.name.clone(),
                        source,
                    }
                })?;
                s.provider = self.provider;
                s.dir = Some(self.store.root().to_path_buf());
                Arc::new(s)
            }
        };
        let mut req = BackupRequest::new(vm.name.clone(), snapshotter);
        req.quiesce = vm.agent.clone().map(|agent| Quiesce {
            agent,
            options: QuiesceOptions {
                wanted: Some(c.wanted),
                minimum: c.minimum,
                qga_watchdog: self.qga_watchdog.clone(),
                ..QuiesceOptions::default()
            },
        });
        req.consistency_wanted = c.wanted;
        let keep = vm.keep_snapshots && vm.qmp.is_none();
        req.keep_snapshots = keep.then(|| KeepSnapshots {
            store: self.store.clone(),
            days: vm.policy.retention().instant_restore_days,
        });
        req.upload_concurrency = self.upload_concurrency;
        req.policy = Some(
            vm.policy
                .name()
                .unwrap_or(vm.policy.file_name())
                .to_string(),
        );
        req.observer = Arc::new(PhaseRecorder {
            history: job.history.clone(),
            job: job.id,
            vm: vm.name.clone(),
            control: job.control.clone(),
        });
        req.cancel = job.cancel.clone();
        Ok(req)
    }
}

/// Records a job's phases in the history.
#[derive(Debug)]
struct PhaseRecorder {
    history: History,
    job: i64,
    vm: String,
    control: Control,
}

impl Observer for PhaseRecorder {
    fn agent(&self, unreachable: Option<&str>) {
        self.control.agent_seen(&self.vm, unreachable);
    }

    fn start(&self, item: &str, total: u64) {
        self.control.disk(self.job, item, |d| d.total = total);
    }

    fn advance(&self, item: &str, bytes: u64) {
        self.control.disk(self.job, item, |d| d.done += bytes);
    }

    fn finish(&self, item: &str) {
        self.control.disk(self.job, item, |d| d.finished = true);
    }

    fn phase(&self, phase: bulwark_controller::Phase, event: PhaseEvent) {
        let phase = match phase {
            bulwark_controller::Phase::Snapshot => Phase::Snapshot,
            _ => Phase::Transfer,
        };
        let state = match event {
            PhaseEvent::Started => PhaseState::Running,
            PhaseEvent::Completed => PhaseState::Completed,
            _ if self.control.cancel_requested(self.job) => PhaseState::Cancelled,
            _ => PhaseState::Failed,
        };
        if let Err(e) = self.history.set_phase(self.job, phase, state) {
            tracing::error!(error = %e, job = self.job, "cannot record the phase");
        }
    }
}

/// Daemon settings.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// VMs backed up at once.
    pub concurrency: usize,
    /// How old a missed run may be and still be made up at start.
    pub catch_up: Duration,
    /// How long running jobs get at shutdown.
    pub shutdown_timeout: Duration,
    /// How often expired snapshots are removed and the maintenance hook runs.
    pub housekeeping_interval: Duration,
    /// Run every VM once at start (trigger `manual`), besides the schedule.
    pub run_now: bool,
}

impl DaemonOptions {
    /// The settings of a configuration file.
    pub fn from_config(c: &Config) -> DaemonOptions {
        DaemonOptions {
            concurrency: c.concurrency,
            catch_up: c.catch_up,
            shutdown_timeout: c.shutdown_timeout,
            housekeeping_interval: Duration::from_secs(600),
            run_now: false,
        }
    }
}

/// What a daemon run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DaemonSummary {
    /// Jobs started.
    pub started: u64,
    /// Runs skipped (previous job still running).
    pub skipped: u64,
    /// Jobs cancelled at shutdown.
    pub cancelled: u64,
}

/// The scheduled daemon.
pub struct Daemon {
    vms: Arc<[Arc<VmConfig>]>,
    history: History,
    clock: Arc<dyn Clock>,
    runner: Arc<dyn JobRunner>,
    store: Option<SnapshotStore>,
    maintenance: Option<Arc<dyn Maintenance>>,
    options: DaemonOptions,
    control: Control,
    inbox: std::sync::Mutex<Option<Inbox>>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("vms", &self.vms.iter().map(|v| &v.name).collect::<Vec<_>>())
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

type TaskOutput = (i64, String, JobEnd);

struct RunState {
    sem: Arc<Semaphore>,
    tasks: JoinSet<TaskOutput>,
    running: HashMap<String, i64>,
    ids: HashMap<tokio::task::Id, (String, i64)>,
    summary: DaemonSummary,
}

/// Housekeeping (expiring kept snapshots, then the [`Maintenance`] hook) runs as a task of its
/// own, one at a time: retention and GC may wait on vault leases for minutes, and the
/// scheduler must go on starting (and skipping) runs meanwhile. A request while one runs is
/// remembered and served once when it ends.
#[derive(Clone)]
struct Housekeeper {
    vms: Arc<[Arc<VmConfig>]>,
    clock: Arc<dyn Clock>,
    store: Option<SnapshotStore>,
    maintenance: Option<Arc<dyn Maintenance>>,
}

impl Housekeeper {
    async fn run(self) {
        let now = self.clock.now();
        if let Some(store) = self.store {
            match tokio::task::spawn_blocking(move || store.expire(now)).await {
                Ok(Ok(gone)) if !gone.is_empty() => {
                    tracing::info!(count = gone.len(), "expired kept snapshots removed")
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "cannot expire kept snapshots"),
                Err(e) => tracing::error!(error = %e, "snapshot expiry worker failed"),
            }
        }
        if let Some(m) = &self.maintenance
            && let Err(e) = m.run(&self.vms, now).await
        {
            tracing::error!(error = %e, "maintenance failed");
        }
    }
}

/// The one housekeeping task and whether another pass was asked for while it ran.
#[derive(Default)]
struct HouseState {
    task: Option<tokio::task::JoinHandle<()>>,
    again: bool,
}

impl HouseState {
    fn request(&mut self, keeper: &Housekeeper) {
        if self.task.is_some() {
            self.again = true;
        } else {
            self.task = Some(tokio::spawn(keeper.clone().run()));
        }
    }

    /// Completes when the running pass ends (never when none runs).
    async fn finished(&mut self) {
        match self.task.as_mut() {
            Some(t) => {
                if let Err(e) = t.await {
                    tracing::error!(error = %e, "housekeeping task failed");
                }
                self.task = None;
            }
            None => std::future::pending().await,
        }
    }
}

impl Daemon {
    /// A daemon over `vms`.
    pub fn new(
        vms: Vec<VmConfig>,
        history: History,
        clock: Arc<dyn Clock>,
        runner: Arc<dyn JobRunner>,
        options: DaemonOptions,
    ) -> Daemon {
        let (control, inbox) = Control::new();
        Daemon {
            vms: vms.into_iter().map(Arc::new).collect::<Vec<_>>().into(),
            history,
            clock,
            runner,
            store: None,
            maintenance: None,
            options,
            control,
            inbox: std::sync::Mutex::new(Some(inbox)),
        }
    }

    /// The control handle: run now, cancel, live progress, job ends.
    pub fn control(&self) -> Control {
        self.control.clone()
    }

    /// A run-now request from the control handle: refused for an unknown VM or one whose
    /// job is running, else dispatched (trigger `manual`).
    fn run_now(&self, st: &mut RunState, vm: &str) -> Result<i64, RunNowRefused> {
        if !self.vms.iter().any(|v| v.name == vm) {
            return Err(RunNowRefused::UnknownVm(vm.to_string()));
        }
        if let Some(job) = st.running.get(vm) {
            return Err(RunNowRefused::AlreadyRunning {
                vm: vm.to_string(),
                job: *job,
            });
        }
        let due = Due {
            vm: vm.to_string(),
            scheduled: None,
            trigger: Trigger::Manual,
        };
        self.dispatch(st, due)
            .ok_or_else(|| RunNowRefused::Failed("see the daemon's log".into()))
    }

    /// Expire kept snapshots in `store` at housekeeping.
    pub fn with_snapshot_store(mut self, store: SnapshotStore) -> Daemon {
        self.store = Some(store);
        self
    }

    /// Run `hook` at housekeeping (retention, GC).
    pub fn with_maintenance(mut self, hook: Arc<dyn Maintenance>) -> Daemon {
        self.maintenance = Some(hook);
        self
    }

    fn dispatch(&self, st: &mut RunState, due: Due) -> Option<i64> {
        let now = self.clock.now();
        if let Some(id) = st.running.get(&due.vm) {
            let reason = format!("the previous job ({id}) of this VM is still running");
            tracing::warn!(vm = %due.vm, scheduled = ?due.scheduled, "{reason}: run skipped");
            if let Err(e) =
                self.history
                    .record_skipped(&due.vm, due.trigger, due.scheduled, now, &reason)
            {
                tracing::error!(error = %e, "cannot record the skipped run");
            }
            st.summary.skipped += 1;
            return None;
        }
        let vm = self.vms.iter().find(|v| v.name == due.vm).cloned()?;
        let id = match self
            .history
            .start_job(&due.vm, due.trigger, due.scheduled, now)
        {
            Ok(id) => id,
            Err(e) => {
                tracing::error!(error = %e, vm = %due.vm, "cannot record the job; it does not run");
                return None;
            }
        };
        tracing::info!(vm = %due.vm, job = id, trigger = %due.trigger, scheduled = ?due.scheduled, "job starts");
        let job = Job {
            id,
            vm,
            trigger: due.trigger,
            scheduled: due.scheduled,
            history: self.history.clone(),
            cancel: self.control.register(id, &due.vm),
            control: self.control.clone(),
        };
        let sem = st.sem.clone();
        let runner = self.runner.clone();
        let handle = st.tasks.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let end = runner.run(&job).await;
            (job.id, job.vm.name.clone(), end)
        });
        st.ids.insert(handle.id(), (due.vm.clone(), id));
        st.running.insert(due.vm, id);
        st.summary.started += 1;
        Some(id)
    }

    fn reap(
        &self,
        st: &mut RunState,
        res: Result<(tokio::task::Id, TaskOutput), tokio::task::JoinError>,
    ) {
        let (vm, id, end) = match res {
            Ok((tid, (id, vm, end))) => {
                st.ids.remove(&tid);
                (vm, id, end)
            }
            Err(e) => {
                let Some((vm, id)) = st.ids.remove(&e.id()) else {
                    return;
                };
                let end = if e.is_cancelled() {
                    st.summary.cancelled += 1;
                    JobEnd::with_error(
                        JobState::Cancelled,
                        format!(
                            "cancelled at shutdown: it did not finish within {}s",
                            self.options.shutdown_timeout.as_secs()
                        ),
                    )
                } else {
                    JobEnd::with_error(JobState::Failed, format!("the job panicked: {e}"))
                };
                (vm, id, end)
            }
        };
        tracing::info!(vm = %vm, job = id, state = ?end.state, error = ?end.outcome.error, "job ended");
        if let Err(e) = self.history.finish(id, self.clock.now(), &end) {
            tracing::error!(error = %e, job = id, "cannot record the end of the job");
        }
        if st.running.get(&vm) == Some(&id) {
            st.running.remove(&vm);
        }
        self.control.unregister(id);
        match self.history.job(id) {
            Ok(Some(record)) => self.control.ended(JobEnded {
                record,
                freeze_window_ms: end.freeze_window_ms,
                consistency_wanted: self
                    .vms
                    .iter()
                    .find(|v| v.name == vm)
                    .map(|v| v.policy.consistency().wanted.to_string())
                    .unwrap_or_default(),
            }),
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, job = id, "cannot read the ended job back"),
        }
    }

    /// What housekeeping needs, owned, so that it runs beside the scheduler.
    fn housekeeper(&self) -> Housekeeper {
        Housekeeper {
            vms: self.vms.clone(),
            clock: self.clock.clone(),
            store: self.store.clone(),
            maintenance: self.maintenance.clone(),
        }
    }

    /// Runs until `shutdown` completes, then lets running jobs finish within the shutdown
    /// timeout and cancels the rest.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<DaemonSummary, Error> {
        let mut st = RunState {
            sem: Arc::new(Semaphore::new(self.options.concurrency.max(1))),
            tasks: JoinSet::new(),
            running: HashMap::new(),
            ids: HashMap::new(),
            summary: DaemonSummary::default(),
        };
        let now = self.clock.now();
        let mut sched = Scheduler::new(
            self.vms
                .iter()
                .map(|v| (v.name.clone(), VmSchedule::of(v)))
                .collect(),
            now,
        );
        for vm in self.vms.iter() {
            let last = self.history.last_scheduled(&vm.name)?;
            if let Some(t) =
                Scheduler::catch_up(&VmSchedule::of(vm), last, now, self.options.catch_up)
            {
                tracing::info!(vm = %vm.name, missed = %t, "a run missed while the daemon was down is made now");
                self.dispatch(
                    &mut st,
                    Due {
                        vm: vm.name.clone(),
                        scheduled: Some(t),
                        trigger: Trigger::CatchUp,
                    },
                );
            }
        }
        if self.options.run_now {
            for vm in self.vms.iter() {
                if !st.running.contains_key(&vm.name) {
                    self.dispatch(
                        &mut st,
                        Due {
                            vm: vm.name.clone(),
                            scheduled: None,
                            trigger: Trigger::Manual,
                        },
                    );
                }
            }
        }
        let keeper = self.housekeeper();
        let mut house = HouseState::default();
        house.request(&keeper);
        let interval = SignedDuration::try_from(self.options.housekeeping_interval)
            .unwrap_or(SignedDuration::from_hours(1));
        let mut next_house = now.checked_add(interval).unwrap_or(Timestamp::MAX);
        let mut shutdown = std::pin::pin!(shutdown);
        let mut inbox = self.inbox.lock().unwrap_or_else(|p| p.into_inner()).take();
        loop {
            let wake = sched.next_wake().map_or(next_house, |w| w.min(next_house));
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                Some(res) = st.tasks.join_next_with_id(), if !st.tasks.is_empty() => {
                    self.reap(&mut st, res);
                    house.request(&keeper);
                    continue;
                }
                _ = house.finished() => {
                    if std::mem::take(&mut house.again) {
                        house.request(&keeper);
                    }
                    continue;
                }
                Some(req) = async { inbox.as_mut()?.recv().await }, if inbox.is_some() => {
                    let r = self.run_now(&mut st, &req.vm);
                    let _ = req.reply.send(r);
                    continue;
                }
                _ = self.clock.sleep_until(wake) => {}
            }
            let now = self.clock.now();
            for due in sched.take_due(now) {
                self.dispatch(&mut st, due);
            }
            if now >= next_house {
                house.request(&keeper);
                next_house = now.checked_add(interval).unwrap_or(Timestamp::MAX);
            }
        }
        // Run-now requests from now on are refused.
        drop(inbox);
        if !st.tasks.is_empty() {
            tracing::info!(
                jobs = st.tasks.len(),
                timeout_s = self.options.shutdown_timeout.as_secs(),
                "shutting down: waiting for running jobs"
            );
        }
        let deadline = tokio::time::sleep(self.options.shutdown_timeout);
        let mut deadline = std::pin::pin!(deadline);
        while !st.tasks.is_empty() || house.task.is_some() {
            tokio::select! {
                Some(res) = st.tasks.join_next_with_id(), if !st.tasks.is_empty() => {
                    self.reap(&mut st, res);
                    // "After each job" holds for a job that ends during the shutdown too.
                    house.request(&keeper);
                }
                _ = house.finished() => {
                    // A pass asked for while one ran (a job that ended meanwhile) still runs.
                    if std::mem::take(&mut house.again) {
                        house.request(&keeper);
                    }
                }
                _ = &mut deadline => break,
            }
        }
        if let Some(t) = house.task.take() {
            // Retention and GC are crash safe: a pass cut short is redone at the next start.
            tracing::warn!("housekeeping did not finish in time: stopping it");
            t.abort();
        }
        if !st.tasks.is_empty() {
            tracing::warn!(
                jobs = st.tasks.len(),
                "jobs did not finish in time: cancelling them"
            );
            st.tasks.abort_all();
            while let Some(res) = st.tasks.join_next_with_id().await {
                self.reap(&mut st, res);
            }
        }
        Ok(st.summary)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::history::PhaseState;
    use bulwark_snapshot::ImageDisk as DiskSpec;

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn policy(text: &str) -> Arc<Policy> {
        Arc::new(Policy::from_toml_str(text, "test.toml").unwrap())
    }

    fn vm(name: &str, policy: Arc<Policy>, every: Option<u64>) -> VmConfig {
        VmConfig {
            name: name.into(),
            disks: vec![DiskSpec {
                name: "os".into(),
                path: "/nonexistent".into(),
            }],
            qmp: None,
            agent: None,
            policy,
            schedule_override: every.map(Duration::from_secs),
            keep_snapshots: true,
        }
    }

    fn daily(time: &str) -> Arc<Policy> {
        policy(&format!(
            "time_zone = \"UTC\"\n[schedule]\nfrequency = \"daily\"\ntimes = [\"{time}\"]\n[retention]\ndaily = 7\n"
        ))
    }

    /// Records when each job started and takes `duration` (on the test's clock).
    struct Recorder {
        clock: Arc<dyn Clock>,
        durations: HashMap<String, Duration>,
        log: Mutex<Vec<(String, Timestamp, Trigger)>>,
    }

    impl JobRunner for Recorder {
        fn run<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, JobEnd> {
            Box::pin(async move {
                self.log
                    .lock()
                    .unwrap()
                    .push((job.vm.name.clone(), self.clock.now(), job.trigger));
                job.history
                    .set_phase(job.id, crate::history::Phase::Snapshot, PhaseState::Running)
                    .unwrap();
                let d = self
                    .durations
                    .get(&job.vm.name)
                    .copied()
                    .unwrap_or_default();
                tokio::time::sleep(d).await;
                JobEnd {
                    state: Some(JobState::Completed),
                    ..JobEnd::default()
                }
            })
        }
    }

    fn options() -> DaemonOptions {
        DaemonOptions {
            concurrency: 4,
            catch_up: Duration::from_secs(24 * 3600),
            shutdown_timeout: Duration::from_secs(10),
            housekeeping_interval: Duration::from_secs(3600),
            run_now: false,
        }
    }

    async fn run_until(
        vms: Vec<VmConfig>,
        history: &History,
        start: Timestamp,
        end: Timestamp,
        durations: &[(&str, u64)],
        opts: DaemonOptions,
    ) -> (Vec<(String, Timestamp, Trigger)>, DaemonSummary) {
        let clock: Arc<dyn Clock> = Arc::new(TokioClock::starting_at(start));
        let runner = Arc::new(Recorder {
            clock: clock.clone(),
            durations: durations
                .iter()
                .map(|(v, s)| (v.to_string(), Duration::from_secs(*s)))
                .collect(),
            log: Mutex::new(Vec::new()),
        });
        let daemon = Daemon::new(vms, history.clone(), clock.clone(), runner.clone(), opts);
        let c2 = clock.clone();
        let summary = daemon
            .run(async move { c2.sleep_until(end).await })
            .await
            .unwrap();
        let log = runner.log.lock().unwrap().clone();
        (log, summary)
    }

    fn starts(log: &[(String, Timestamp, Trigger)], vm: &str) -> Vec<String> {
        log.iter()
            .filter(|(v, _, _)| v == vm)
            // The paused clock fires timers on millisecond ticks: round to the second.
            .map(|(_, at, _)| {
                Timestamp::from_second(at.as_second() + i64::from(at.subsec_millisecond() >= 500))
                    .unwrap()
                    .to_string()
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn several_vms_over_simulated_days() {
        let hourly = policy(
            "time_zone = \"UTC\"\n[schedule]\nfrequency = \"hourly\"\nevery_hours = 6\n[retention]\ndaily = 7\n",
        );
        let weekly = policy(
            "time_zone = \"Europe/Berlin\"\n[schedule]\nfrequency = \"weekly\"\nweekdays = [\"monday\", \"wednesday\"]\ntimes = [\"03:30\"]\n[retention]\ndaily = 7\n",
        );
        let vms = vec![
            vm("daily", daily("02:00"), None),
            vm("hourly", hourly, None),
            vm("weekly", weekly, None),
        ];
        let h = History::in_memory().unwrap();
        // Monday 2026-11-23 00:30 UTC for three days.
        let (log, summary) = run_until(
            vms,
            &h,
            t("2026-11-23T00:30:00Z"),
            t("2026-11-26T00:30:00Z"),
            &[("daily", 600), ("hourly", 60), ("weekly", 60)],
            options(),
        )
        .await;
        assert_eq!(
            starts(&log, "daily"),
            [
                "2026-11-23T02:00:00Z",
                "2026-11-24T02:00:00Z",
                "2026-11-25T02:00:00Z"
            ]
        );
        assert_eq!(
            starts(&log, "hourly"),
            [
                "2026-11-23T06:00:00Z",
                "2026-11-23T12:00:00Z",
                "2026-11-23T18:00:00Z",
                "2026-11-24T00:00:00Z",
                "2026-11-24T06:00:00Z",
                "2026-11-24T12:00:00Z",
                "2026-11-24T18:00:00Z",
                "2026-11-25T00:00:00Z",
                "2026-11-25T06:00:00Z",
                "2026-11-25T12:00:00Z",
                "2026-11-25T18:00:00Z",
                "2026-11-26T00:00:00Z"
            ]
        );
        // 03:30 CET is 02:30 UTC; Tuesday has no run.
        assert_eq!(
            starts(&log, "weekly"),
            ["2026-11-23T02:30:00Z", "2026-11-25T02:30:00Z"]
        );
        assert_eq!(summary.started, 17);
        assert_eq!(summary.skipped, 0);
        let jobs = h.jobs(None, 100).unwrap();
        assert_eq!(jobs.len(), 17);
        assert!(jobs.iter().all(|j| j.state == JobState::Completed
            && j.trigger == Trigger::Scheduled
            && j.snapshot == PhaseState::Completed));
        let daily_job = jobs.iter().find(|j| j.vm == "daily").unwrap();
        assert_eq!(daily_job.scheduled, Some(t("2026-11-25T02:00:00Z")));
        assert!(daily_job.ended.unwrap() >= t("2026-11-25T02:10:00Z"));
    }

    #[tokio::test(start_paused = true)]
    async fn overlapping_runs_are_skipped_and_recorded() {
        let h = History::in_memory().unwrap();
        // Every 60 s; each job takes 150 s.
        let (log, summary) = run_until(
            vec![vm("busy", daily("02:00"), Some(60))],
            &h,
            t("2026-11-23T00:00:00Z"),
            t("2026-11-23T00:09:50Z"),
            &[("busy", 150)],
            options(),
        )
        .await;
        assert_eq!(
            starts(&log, "busy"),
            [
                "2026-11-23T00:01:00Z",
                "2026-11-23T00:04:00Z",
                "2026-11-23T00:07:00Z"
            ]
        );
        assert_eq!(summary.skipped, 6);
        let jobs = h.jobs(Some("busy"), 100).unwrap();
        let skipped: Vec<_> = jobs
            .iter()
            .filter(|j| j.state == JobState::Skipped)
            .collect();
        assert_eq!(skipped.len(), 6);
        assert!(
            skipped[0]
                .outcome
                .error
                .as_deref()
                .unwrap()
                .contains("is still running")
        );
        assert_eq!(
            jobs.iter()
                .filter(|j| j.state == JobState::Completed)
                .count(),
            3
        );
    }

    /// Housekeeping that counts its passes, each taking `pass_takes`.
    struct CountingMaintenance {
        passes: Mutex<u32>,
        pass_takes: Duration,
    }

    impl Maintenance for CountingMaintenance {
        fn run<'a>(
            &'a self,
            _vms: &'a [Arc<VmConfig>],
            _now: Timestamp,
        ) -> BoxFuture<'a, Result<(), String>> {
            Box::pin(async move {
                *self.passes.lock().unwrap() += 1;
                tokio::time::sleep(self.pass_takes).await;
                Ok(())
            })
        }
    }

    /// A daemon from 2026-11-23T00:00:00Z over one VM `busy` due every 60 s whose jobs take
    /// 150 s, with housekeeping passes of `pass_takes`, stopped at `stop`: its summary, the
    /// job starts and the number of housekeeping passes.
    async fn busy_vm_with_housekeeping(
        pass_takes: Duration,
        stop: Timestamp,
        shutdown_timeout: Duration,
    ) -> (DaemonSummary, Vec<(String, Timestamp, Trigger)>, u32) {
        let h = History::in_memory().unwrap();
        let clock: Arc<dyn Clock> = Arc::new(TokioClock::starting_at(t("2026-11-23T00:00:00Z")));
        let runner = Arc::new(Recorder {
            clock: clock.clone(),
            durations: [("busy".to_string(), Duration::from_secs(150))].into(),
            log: Mutex::new(Vec::new()),
        });
        let counting = Arc::new(CountingMaintenance {
            passes: Mutex::new(0),
            pass_takes,
        });
        let daemon = Daemon::new(
            vec![vm("busy", daily("02:00"), Some(60))],
            h,
            clock.clone(),
            runner.clone(),
            DaemonOptions {
                shutdown_timeout,
                ..options()
            },
        )
        .with_maintenance(counting.clone());
        let summary = daemon
            .run(async move { clock.sleep_until(stop).await })
            .await
            .unwrap();
        let log = runner.log.lock().unwrap().clone();
        let passes = *counting.passes.lock().unwrap();
        (summary, log, passes)
    }

    #[tokio::test(start_paused = true)]
    async fn slow_housekeeping_never_holds_up_the_schedule() {
        // Each pass takes 1000 s (a GC waiting on a lease).
        let (summary, log, passes) = busy_vm_with_housekeeping(
            Duration::from_secs(1000),
            t("2026-11-23T00:09:50Z"),
            Duration::from_secs(5),
        )
        .await;
        // The same runs and skips as with no housekeeping at all.
        assert_eq!(
            starts(&log, "busy"),
            [
                "2026-11-23T00:01:00Z",
                "2026-11-23T00:04:00Z",
                "2026-11-23T00:07:00Z"
            ]
        );
        assert_eq!(summary.skipped, 6);
        // One pass at start, still running when the daemon stops: passes never overlap, and
        // the requests made meanwhile wait for it instead of starting more.
        assert_eq!(passes, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_that_ends_during_shutdown_still_gets_its_housekeeping() {
        // The only job starts at 00:01:00 and runs 150 s: the shutdown comes at 00:01:30,
        // while it runs.
        let (summary, _, passes) = busy_vm_with_housekeeping(
            Duration::ZERO,
            t("2026-11-23T00:01:30Z"),
            Duration::from_secs(300),
        )
        .await;
        assert_eq!(summary.started, 1);
        // One pass at start, one after the job that ended during the shutdown.
        assert_eq!(passes, 2);
    }

    #[test]
    fn catch_up_rule() {
        let s = VmSchedule::Policy(daily("02:00"));
        let day = Duration::from_secs(24 * 3600);
        // Down from day 1 03:00 to day 3 05:00: the day-3 run is made once.
        assert_eq!(
            Scheduler::catch_up(
                &s,
                Some(t("2026-11-21T02:00:00Z")),
                t("2026-11-23T05:00:00Z"),
                day
            ),
            Some(t("2026-11-23T02:00:00Z"))
        );
        // Nothing missed since.
        assert_eq!(
            Scheduler::catch_up(
                &s,
                Some(t("2026-11-23T02:00:00Z")),
                t("2026-11-23T06:00:00Z"),
                day
            ),
            None
        );
        // Too old for a 2-hour window.
        assert_eq!(
            Scheduler::catch_up(
                &s,
                Some(t("2026-11-21T02:00:00Z")),
                t("2026-11-23T05:00:00Z"),
                Duration::from_secs(7200)
            ),
            None
        );
        // No history, or catch-up off.
        assert_eq!(
            Scheduler::catch_up(&s, None, t("2026-11-23T05:00:00Z"), day),
            None
        );
        assert_eq!(
            Scheduler::catch_up(
                &s,
                Some(t("2026-11-21T02:00:00Z")),
                t("2026-11-23T05:00:00Z"),
                Duration::ZERO
            ),
            None
        );
        let every = VmSchedule::Every(Duration::from_secs(10));
        assert_eq!(
            Scheduler::catch_up(
                &every,
                Some(t("2026-11-23T00:00:10Z")),
                t("2026-11-23T00:00:35Z"),
                day
            ),
            Some(t("2026-11-23T00:00:30Z"))
        );
        assert_eq!(
            every.next_after(t("2026-11-23T00:00:30Z")),
            Some(t("2026-11-23T00:00:40Z"))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn catch_up_after_downtime_runs_once() {
        let h = History::in_memory().unwrap();
        let vms = || vec![vm("web", daily("02:00"), None)];
        // First life: day 1, one run at 02:00, then the daemon stops at 03:00.
        let (log, _) = run_until(
            vms(),
            &h,
            t("2026-11-21T01:00:00Z"),
            t("2026-11-21T03:00:00Z"),
            &[],
            options(),
        )
        .await;
        assert_eq!(starts(&log, "web"), ["2026-11-21T02:00:00Z"]);
        // Down for two days; back on day 3 at 05:00: the 02:00 run of day 3 is made once, now.
        let (log, _) = run_until(
            vms(),
            &h,
            t("2026-11-23T05:00:00Z"),
            t("2026-11-23T06:00:00Z"),
            &[],
            options(),
        )
        .await;
        assert_eq!(starts(&log, "web"), ["2026-11-23T05:00:00Z"]);
        assert_eq!(log[0].2, Trigger::CatchUp);
        // Restarted again an hour later: nothing more to catch up.
        let (log, _) = run_until(
            vms(),
            &h,
            t("2026-11-23T07:00:00Z"),
            t("2026-11-23T08:00:00Z"),
            &[],
            options(),
        )
        .await;
        assert!(log.is_empty());
        let jobs = h.jobs(Some("web"), 10).unwrap();
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[0].trigger, Trigger::CatchUp);
        assert_eq!(jobs[0].scheduled, Some(t("2026-11-23T02:00:00Z")));
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_waits_then_cancels() {
        let h = History::in_memory().unwrap();
        let mut opts = options();
        opts.run_now = true;
        opts.shutdown_timeout = Duration::from_secs(30);
        // "quick" finishes within the shutdown timeout, "slow" does not.
        let (log, summary) = run_until(
            vec![
                vm("quick", daily("02:00"), None),
                vm("slow", daily("02:00"), None),
            ],
            &h,
            t("2026-11-23T00:00:00Z"),
            t("2026-11-23T00:00:05Z"),
            &[("quick", 20), ("slow", 3600)],
            opts,
        )
        .await;
        assert_eq!(log.len(), 2);
        assert_eq!(summary.cancelled, 1);
        let quick = &h.jobs(Some("quick"), 1).unwrap()[0];
        assert_eq!(quick.state, JobState::Completed);
        assert_eq!(quick.trigger, Trigger::Manual);
        let slow = &h.jobs(Some("slow"), 1).unwrap()[0];
        assert_eq!(slow.state, JobState::Cancelled);
        assert_eq!(slow.snapshot, PhaseState::Cancelled);
        assert!(
            slow.outcome
                .error
                .as_deref()
                .unwrap()
                .contains("cancelled at shutdown")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_bounds_vms_at_once() {
        let h = History::in_memory().unwrap();
        let mut opts = options();
        opts.concurrency = 1;
        opts.run_now = true;
        let (log, _) = run_until(
            vec![vm("a", daily("02:00"), None), vm("b", daily("02:00"), None)],
            &h,
            t("2026-11-23T00:00:00Z"),
            t("2026-11-23T00:10:00Z"),
            &[("a", 100), ("b", 100)],
            opts,
        )
        .await;
        // One slot: the second VM starts when the first is done.
        let mut at: Vec<String> = starts(&log, "a");
        at.extend(starts(&log, "b"));
        at.sort();
        assert_eq!(at, ["2026-11-23T00:00:00Z", "2026-11-23T00:01:40Z"]);
    }

    #[tokio::test]
    async fn lease_refusals_of_gc_are_counted() {
        use bulwark_vault::{CreateOptions, Lease, LeaseKind, LeaseOptions};
        let dir = tempfile::tempdir().unwrap();
        let vault = Vault::create(dir.path().to_str().unwrap(), &CreateOptions::default())
            .await
            .unwrap();
        let (control, _inbox) = Control::new();
        let m = RetentionMaintenance::new(
            vault.clone(),
            None,
            false,
            Some(Duration::ZERO),
            Timestamp::now(),
        )
        .counting_in(control.clone());
        // A backup holds its lease: GC refuses, and the refusal is counted.
        let backup = Lease::acquire(&vault, LeaseKind::Backup, "b", &LeaseOptions::default())
            .await
            .unwrap();
        let e = m.run(&[], Timestamp::now()).await.unwrap_err();
        assert!(e.contains("gc:"), "{e}");
        assert_eq!(control.lease_conflicts().get("gc"), Some(&1));
        backup.release().await.unwrap();
        // Without a conflicting lease GC runs, and nothing more is counted.
        m.run(&[], Timestamp::now()).await.unwrap();
        assert_eq!(control.lease_conflicts().get("gc"), Some(&1));
        assert!(control.agents().is_empty());
        control.agent_seen("web01", Some("connection refused"));
        assert!(!control.agents()["web01"].reachable);
    }
}
