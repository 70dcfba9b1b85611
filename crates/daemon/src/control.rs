//! The running daemon's control handle, for front ends (the HTTP API): start a VM's backup now,
//! cancel a running job, read the live progress of running jobs, and hear of every job that
//! ends.
//!
//! A [`Control`] is cheap to clone. Run-now requests go to the scheduler loop through a bounded
//! queue and are answered with the new job's id (or why it was refused); each running job has
//! a [`CancellationToken`] the backup checks at its safe points.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::history::JobRecord;

/// Why a run-now request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RunNowRefused {
    /// No VM of this name is configured.
    #[error("no VM {0:?} is configured")]
    UnknownVm(String),
    /// A job of the VM is running (its id).
    #[error("VM {vm}: job {job} is still running")]
    AlreadyRunning {
        /// The VM.
        vm: String,
        /// The running job.
        job: i64,
    },
    /// The daemon is stopping (or not running).
    #[error("the daemon is not accepting jobs (stopping)")]
    NotRunning,
    /// The job could not be recorded.
    #[error("cannot start the job: {0}")]
    Failed(String),
}

/// One disk of a running job: bytes to go through and done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DiskProgress {
    /// Bytes of the disk.
    pub total: u64,
    /// Bytes scanned so far.
    pub done: u64,
    /// The disk's transfer is done.
    pub finished: bool,
}

/// What a job's end tells listeners ([`Control::subscribe`]).
#[derive(Debug, Clone)]
pub struct JobEnded {
    /// The job as recorded at its end.
    pub record: JobRecord,
    /// How long the guest was frozen, if it was.
    pub freeze_window_ms: Option<u64>,
    /// The consistency the VM's policy wants.
    pub consistency_wanted: String,
}

pub(crate) struct RunNow {
    pub(crate) vm: String,
    pub(crate) reply: oneshot::Sender<Result<i64, RunNowRefused>>,
}

struct Live {
    vm: String,
    cancel: CancellationToken,
    disks: BTreeMap<String, DiskProgress>,
}

struct Inner {
    requests: mpsc::Sender<RunNow>,
    jobs: Mutex<HashMap<i64, Live>>,
    ended: broadcast::Sender<JobEnded>,
    ends: AtomicU64,
    lease_conflicts: Mutex<BTreeMap<String, u64>>,
    agents: Mutex<BTreeMap<String, AgentSeen>>,
}

/// What the last quiesce attempt of a VM found of its guest agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentSeen {
    /// It answered.
    pub reachable: bool,
    /// When it was tried.
    pub at: jiff::Timestamp,
    /// Why it did not answer.
    pub reason: Option<String>,
}

/// The control handle of one daemon (see the module docs).
#[derive(Clone)]
pub struct Control {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").finish_non_exhaustive()
    }
}

/// The scheduler's end of the run-now queue.
pub(crate) type Inbox = mpsc::Receiver<RunNow>;

impl Control {
    pub(crate) fn new() -> (Control, Inbox) {
        let (tx, rx) = mpsc::channel(64);
        let (ended, _) = broadcast::channel(256);
        let c = Control {
            inner: Arc::new(Inner {
                requests: tx,
                jobs: Mutex::new(HashMap::new()),
                ended,
                ends: AtomicU64::new(0),
                lease_conflicts: Mutex::new(BTreeMap::new()),
                agents: Mutex::new(BTreeMap::new()),
            }),
        };
        (c, rx)
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Live>> {
        self.inner.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a backup of `vm` now (trigger `manual`); returns the job id.
    pub async fn run_now(&self, vm: &str) -> Result<i64, RunNowRefused> {
        let (reply, answer) = oneshot::channel();
        let req = RunNow {
            vm: vm.to_string(),
            reply,
        };
        self.inner
            .requests
            .send(req)
            .await
            .map_err(|_| RunNowRefused::NotRunning)?;
        answer.await.map_err(|_| RunNowRefused::NotRunning)?
    }

    /// Asks running job `id` to stop at its next safe point. False when no such job runs.
    pub fn cancel(&self, id: i64) -> bool {
        match self.jobs().get(&id) {
            Some(live) => {
                tracing::warn!(job = id, vm = %live.vm, "cancel requested");
                live.cancel.cancel();
                true
            }
            None => false,
        }
    }

    /// Whether a cancel was asked for running job `id`.
    pub fn cancel_requested(&self, id: i64) -> bool {
        self.jobs()
            .get(&id)
            .is_some_and(|l| l.cancel.is_cancelled())
    }

    /// The ids of the running jobs.
    pub fn running(&self) -> Vec<i64> {
        let mut ids: Vec<i64> = self.jobs().keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// The per-disk progress of running job `id` (`None` when it does not run).
    pub fn progress(&self, id: i64) -> Option<BTreeMap<String, DiskProgress>> {
        self.jobs().get(&id).map(|l| l.disks.clone())
    }

    /// How many jobs ended since the daemon started. Each end is recorded in the history
    /// before it counts here, so a reader of the history that saw this count first also sees
    /// those ends (the HTTP API's view uses it to never serve a job as running after its end
    /// was announced).
    pub fn ends(&self) -> u64 {
        self.inner.ends.load(Ordering::Acquire)
    }

    /// Every job end from now on (a lagging listener misses the oldest).
    pub fn subscribe(&self) -> broadcast::Receiver<JobEnded> {
        self.inner.ended.subscribe()
    }

    /// Counts a refusal of the vault's lease to `operation` (`backup`, `prune`, `gc`).
    pub fn lease_conflict(&self, operation: &str) {
        let mut m = self
            .inner
            .lease_conflicts
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *m.entry(operation.to_string()).or_default() += 1;
    }

    /// Lease refusals since the daemon started, per operation.
    pub fn lease_conflicts(&self) -> BTreeMap<String, u64> {
        self.inner
            .lease_conflicts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records what a quiesce attempt of `vm` found of its agent.
    pub fn agent_seen(&self, vm: &str, unreachable: Option<&str>) {
        let seen = AgentSeen {
            reachable: unreachable.is_none(),
            at: jiff::Timestamp::now(),
            reason: unreachable.map(String::from),
        };
        self.inner
            .agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(vm.to_string(), seen);
    }

    /// Per VM with an agent, the last quiesce attempt since the daemon started.
    pub fn agents(&self) -> BTreeMap<String, AgentSeen> {
        self.inner
            .agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn register(&self, id: i64, vm: &str) -> CancellationToken {
        let cancel = CancellationToken::new();
        self.jobs().insert(
            id,
            Live {
                vm: vm.to_string(),
                cancel: cancel.clone(),
                disks: BTreeMap::new(),
            },
        );
        cancel
    }

    pub(crate) fn unregister(&self, id: i64) {
        self.jobs().remove(&id);
    }

    pub(crate) fn ended(&self, e: JobEnded) {
        self.inner.ends.fetch_add(1, Ordering::AcqRel);
        // No listener is fine.
        let _ = self.inner.ended.send(e);
    }

    pub(crate) fn disk(&self, id: i64, disk: &str, f: impl FnOnce(&mut DiskProgress)) {
        if let Some(live) = self.jobs().get_mut(&id) {
            f(live.disks.entry(disk.to_string()).or_default());
        }
    }
}
