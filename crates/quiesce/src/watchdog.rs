//! Freeze with a deadline: [`WatchedFreeze`] thaws at its deadline even if nobody calls thaw,
//! and reports afterwards whether the freeze was held continuously. Plus the persistent
//! frozen-state file and [`recover_frozen_state`] for agent start.
//!
//! Layers of protection against a file system that stays frozen:
//! 1. the caller's [`WatchedFreeze::thaw`] (idempotent), or its drop;
//! 2. the in-process watchdog thread, at the deadline;
//! 3. the guardian process ([`crate::guardian`]), at the deadline or as soon as the agent dies,
//!    even by SIGKILL;
//! 4. the state file, thawed by [`recover_frozen_state`] when the agent starts again.
//!
//! Keep the state file on a file system that is never frozen (e.g. `/run`, a tmpfs): removing it
//! while its file system is frozen would block.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bulwark_consistency::FreezeObserved;
use serde::{Deserialize, Serialize};

use crate::freeze::{FrozenSet, ThawReport};
use crate::guardian::{Guardian, GuardianCommand, GuardianExit, spawn_guardian};
use crate::{Error, Result};

/// The longest freeze allowed.
pub const MAX_FREEZE_TIMEOUT: Duration = Duration::from_secs(600);

/// Options of a [`WatchedFreeze`].
#[derive(Debug, Clone)]
pub struct FreezeOptions {
    /// How long the file systems may stay frozen (1 ms ..= [`MAX_FREEZE_TIMEOUT`]).
    pub timeout: Duration,
    /// Where to write the frozen-state file, if anywhere.
    pub state_file: Option<PathBuf>,
    /// The guardian process to arm, if any.
    pub guardian: Option<GuardianCommand>,
}

impl FreezeOptions {
    /// A freeze of at most `timeout`, with no state file and no guardian.
    pub fn new(timeout: Duration) -> Self {
        FreezeOptions {
            timeout,
            state_file: None,
            guardian: None,
        }
    }

    /// Writes the frozen-state file at `path` before freezing (removed after the thaw).
    pub fn state_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.state_file = Some(path.into());
        self
    }

    /// Arms a guardian process before freezing.
    pub fn guardian(mut self, cmd: GuardianCommand) -> Self {
        self.guardian = Some(cmd);
        self
    }
}

/// The contents of the frozen-state file (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrozenState {
    /// Format version (1).
    pub version: u32,
    /// The agent's process id.
    pub pid: u32,
    /// The mounts, in freeze order.
    pub mounts: Vec<PathBuf>,
    /// When the file was written (Unix milliseconds).
    pub written_unix_ms: u64,
    /// The freeze deadline (Unix milliseconds).
    pub deadline_unix_ms: u64,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl FrozenState {
    /// The state of this process freezing `mounts` for `timeout` from now.
    pub fn new(mounts: Vec<PathBuf>, timeout: Duration) -> Self {
        let now = SystemTime::now();
        FrozenState {
            version: 1,
            pid: std::process::id(),
            mounts,
            written_unix_ms: unix_ms(now),
            deadline_unix_ms: unix_ms(now + timeout),
        }
    }
}

/// Writes the state file atomically (temporary file, fsync, rename, fsync of the directory).
pub fn write_frozen_state(path: &Path, state: &FrozenState) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let json = serde_json::to_vec_pretty(state).map_err(|e| Error::StateFile {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
    f.write_all(&json)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io("write", &tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| Error::io("rename into place", path, e))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Reads the state file: `Ok(None)` when there is none.
pub fn read_frozen_state(path: &Path) -> Result<Option<FrozenState>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("read", path, e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| Error::StateFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

fn remove_state(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", path, e)),
    }
}

/// What [`recover_frozen_state`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    /// What the state file said.
    pub state: FrozenState,
    /// Mounts that were still frozen and are now thawed.
    pub thawed: Vec<PathBuf>,
    /// Mounts that were not frozen (or no longer exist).
    pub not_frozen: Vec<PathBuf>,
    /// Mounts that could not be thawed: the state file is kept for a later try.
    pub failed: Vec<(PathBuf, String)>,
}

/// At agent start: thaws whatever a killed agent left frozen according to the state file at
/// `path`, then removes the file (kept if a thaw failed). `Ok(None)` when there is no file.
///
/// Call it while holding the agent's single-instance lock, before serving anything.
pub fn recover_frozen_state(path: &Path) -> Result<Option<RecoveryReport>> {
    let Some(state) = read_frozen_state(path)? else {
        return Ok(None);
    };
    let mut report = RecoveryReport {
        state: state.clone(),
        thawed: Vec::new(),
        not_frozen: Vec::new(),
        failed: Vec::new(),
    };
    for m in state.mounts.iter().rev() {
        match crate::freeze::thaw(m) {
            Ok(true) => report.thawed.push(m.clone()),
            Ok(false) => report.not_frozen.push(m.clone()),
            Err(Error::Io { source, .. })
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) =>
            {
                report.not_frozen.push(m.clone())
            }
            Err(e) => report.failed.push((m.clone(), e.to_string())),
        }
    }
    if !report.thawed.is_empty() {
        tracing::warn!(thawed = ?report.thawed, pid = state.pid, "thawed file systems a previous agent left frozen");
    }
    if report.failed.is_empty() {
        remove_state(path)?;
    }
    Ok(Some(report))
}

/// The result of a watched freeze, known after the thaw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreezeReport {
    /// True when every mount stayed frozen from the freeze until the thaw: the snapshot taken in
    /// between is file-system consistent.
    pub held_continuously: bool,
    /// Why not, when it was not (empty otherwise).
    pub reasons: Vec<String>,
    /// True when the in-process watchdog thawed at the deadline.
    pub watchdog_fired: bool,
    /// How the guardian ended, if there was one.
    pub guardian: Option<GuardianExit>,
    /// The thaws (watchdog's and caller's together).
    pub thaw: ThawReport,
    /// From the start of the freeze to the thaw (or the watchdog's thaw).
    pub frozen_for: Duration,
}

impl FreezeReport {
    /// For the fallback plan.
    pub fn observed(&self) -> FreezeObserved {
        if self.held_continuously {
            FreezeObserved::Held
        } else {
            FreezeObserved::NotHeldContinuously {
                reason: self.reasons.join("; "),
            }
        }
    }
}

#[derive(Debug)]
struct State {
    set: FrozenSet,
    thaw_requested: bool,
    fired: Option<(ThawReport, Instant)>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    shared.state.lock().unwrap_or_else(|e| e.into_inner())
}

/// Mounts frozen with a deadline, a watchdog thread, and optionally a state file and a guardian.
///
/// Thaw with [`thaw`](WatchedFreeze::thaw) (idempotent; dropping also thaws). The calls block
/// (FIFREEZE syncs): from async code use `spawn_blocking`.
#[derive(Debug)]
pub struct WatchedFreeze {
    shared: Arc<Shared>,
    watchdog: Option<JoinHandle<()>>,
    guardian: Option<Guardian>,
    state_file: Option<PathBuf>,
    mounts: Vec<PathBuf>,
    timeout: Duration,
    started: Instant,
    deadline: Instant,
    report: Option<FreezeReport>,
}

impl WatchedFreeze {
    /// Arms the guardian (if any), writes the state file (if any), freezes `mounts` (nested first)
    /// and starts the watchdog. On any failure nothing stays frozen, the state file is removed
    /// and the guardian disarmed.
    pub fn start<P: AsRef<Path>>(mounts: &[P], opts: FreezeOptions) -> Result<Self> {
        if opts.timeout.is_zero() || opts.timeout > MAX_FREEZE_TIMEOUT {
            return Err(Error::BadTimeout {
                given: opts.timeout,
                max: MAX_FREEZE_TIMEOUT,
            });
        }
        let mut set = FrozenSet::new(mounts)?;
        let mounts = set.mounts();
        let started = Instant::now();
        let deadline = started + opts.timeout;
        let guardian = match &opts.guardian {
            Some(cmd) => Some(spawn_guardian(cmd, &mounts, opts.timeout)?),
            None => None,
        };
        let undo = |guardian: Option<Guardian>, state: bool| {
            if let Some(g) = guardian {
                let _ = g.disarm();
            }
            if let (true, Some(p)) = (state, &opts.state_file) {
                let _ = remove_state(p);
            }
        };
        if let Some(p) = &opts.state_file {
            if let Err(e) = write_frozen_state(p, &FrozenState::new(mounts.clone(), opts.timeout)) {
                undo(guardian, true);
                return Err(e);
            }
        }
        if let Err(e) = set.freeze() {
            undo(guardian, true);
            return Err(e);
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                set,
                thaw_requested: false,
                fired: None,
            }),
            wake: Condvar::new(),
        });
        let watchdog = {
            let shared = shared.clone();
            let state_file = opts.state_file.clone();
            std::thread::Builder::new()
                .name("bulwark-freeze-watchdog".into())
                .spawn(move || watchdog(&shared, deadline, state_file.as_deref()))
        };
        let watchdog = match watchdog {
            Ok(h) => h,
            Err(e) => {
                let report = lock(&shared).set.thaw_with_retries(5);
                undo(guardian, report.is_clean());
                return Err(Error::io("start the watchdog thread", "(thread)", e));
            }
        };
        Ok(WatchedFreeze {
            shared,
            watchdog: Some(watchdog),
            guardian,
            state_file: opts.state_file,
            mounts,
            timeout: opts.timeout,
            started,
            deadline,
            report: None,
        })
    }

    /// The mounts, in freeze order.
    pub fn mounts(&self) -> &[PathBuf] {
        &self.mounts
    }

    /// The guardian process's id, while it is armed.
    pub fn guardian_pid(&self) -> Option<u32> {
        self.guardian.as_ref().and_then(Guardian::pid)
    }

    /// When the watchdog thaws.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Whether the watchdog has already thawed.
    pub fn watchdog_fired(&self) -> bool {
        lock(&self.shared).fired.is_some()
    }

    /// Thaws (if the watchdog did not already), stops the watchdog, disarms the guardian, removes
    /// the state file, and reports whether the freeze was held continuously. Idempotent: later
    /// calls return the same report.
    pub fn thaw(&mut self) -> FreezeReport {
        if let Some(r) = &self.report {
            return r.clone();
        }
        let (mine, fired) = {
            let mut st = lock(&self.shared);
            st.thaw_requested = true;
            let mine = st.set.thaw_with_retries(5);
            self.shared.wake.notify_all();
            (mine, st.fired.take())
        };
        let thawed_at = Instant::now();
        if let Some(h) = self.watchdog.take() {
            let _ = h.join();
        }
        let guardian = self.guardian.take().map(Guardian::disarm);
        let mut reasons = Vec::new();
        let mut thaw = ThawReport::default();
        let mut frozen_until = thawed_at;
        let watchdog_fired = fired.is_some();
        if let Some((r, at)) = fired {
            reasons.push(format!(
                "the watchdog thawed at the {:?} deadline, before the thaw",
                self.timeout
            ));
            frozen_until = at;
            thaw = r;
        }
        if !mine.thawed_by_someone_else.is_empty() && !watchdog_fired {
            let list: Vec<String> = mine
                .thawed_by_someone_else
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            reasons.push(format!(
                "{} thawed by someone else before the thaw",
                list.join(", ")
            ));
        }
        if guardian == Some(GuardianExit::Fired) && !watchdog_fired {
            reasons.push("the guardian process thawed before the thaw".into());
        }
        thaw.thawed.extend(mine.thawed);
        thaw.thawed_by_someone_else
            .extend(mine.thawed_by_someone_else);
        thaw.failed = mine.failed;
        if !thaw.is_clean() {
            tracing::error!(failed = ?thaw.failed, "some file systems could not be thawed");
        }
        if let (true, Some(p)) = (thaw.is_clean(), &self.state_file) {
            if let Err(e) = remove_state(p) {
                tracing::warn!(error = %e, "cannot remove the frozen-state file");
            }
        }
        let report = FreezeReport {
            held_continuously: reasons.is_empty(),
            reasons,
            watchdog_fired,
            guardian,
            thaw,
            frozen_for: frozen_until.saturating_duration_since(self.started),
        };
        self.report = Some(report.clone());
        report
    }
}

impl Drop for WatchedFreeze {
    fn drop(&mut self) {
        if self.report.is_none() {
            let _ = self.thaw();
        }
    }
}

fn watchdog(shared: &Shared, deadline: Instant, state_file: Option<&Path>) {
    let mut st = lock(shared);
    loop {
        if st.thaw_requested {
            return;
        }
        let now = Instant::now();
        if now >= deadline {
            // Thaw first; log only after (a log file may live on a frozen file system).
            let report = st.set.thaw_with_retries(5);
            let clean = report.is_clean();
            st.fired = Some((report.clone(), Instant::now()));
            drop(st);
            if let (true, Some(p)) = (clean, state_file) {
                let _ = remove_state(p);
            }
            tracing::warn!(?report, "freeze deadline reached: the watchdog thawed");
            return;
        }
        st = match shared.wake.wait_timeout(st, deadline - now) {
            Ok((g, _)) => g,
            Err(e) => e.into_inner().0,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Nothing here freezes or thaws a real file system: the state files list only paths that do
    // not exist.

    #[test]
    fn state_file_round_trips_and_is_replaced_atomically() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("frozen.json");
        assert_eq!(read_frozen_state(&p).unwrap(), None);
        let st = FrozenState::new(vec!["/nonexistent/a".into()], Duration::from_secs(30));
        assert_eq!(st.version, 1);
        assert_eq!(st.deadline_unix_ms - st.written_unix_ms, 30_000);
        write_frozen_state(&p, &st).unwrap();
        assert_eq!(read_frozen_state(&p).unwrap(), Some(st.clone()));
        let st2 = FrozenState {
            mounts: vec!["/nonexistent/b".into()],
            ..st
        };
        write_frozen_state(&p, &st2).unwrap();
        assert_eq!(read_frozen_state(&p).unwrap(), Some(st2));
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["frozen.json"], "no temporary file left behind");
    }

    #[test]
    fn recovery_of_vanished_mounts_removes_the_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("frozen.json");
        assert!(recover_frozen_state(&p).unwrap().is_none());
        let gone = d.path().join("gone");
        write_frozen_state(
            &p,
            &FrozenState::new(vec![gone.clone()], Duration::from_secs(5)),
        )
        .unwrap();
        let r = recover_frozen_state(&p).unwrap().unwrap();
        assert_eq!(r.not_frozen, [gone]);
        assert!(r.thawed.is_empty() && r.failed.is_empty());
        assert!(!p.exists());
    }

    #[test]
    fn malformed_state_is_an_error_and_kept() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("frozen.json");
        std::fs::write(&p, b"{\"version\": 1").unwrap();
        let e = recover_frozen_state(&p).unwrap_err();
        assert!(matches!(e, Error::StateFile { .. }), "{e}");
        assert!(e.to_string().contains("frozen.json"));
        assert!(p.exists());
    }

    #[test]
    fn bad_timeouts_and_bad_mounts_are_refused_before_anything_happens() {
        for t in [
            Duration::ZERO,
            MAX_FREEZE_TIMEOUT + Duration::from_millis(1),
        ] {
            let e = WatchedFreeze::start(&["/nonexistent"], FreezeOptions::new(t)).unwrap_err();
            assert!(matches!(e, Error::BadTimeout { .. }), "{e}");
        }
        let e = WatchedFreeze::start(
            &["relative/dir"],
            FreezeOptions::new(Duration::from_secs(1)),
        )
        .unwrap_err();
        assert!(matches!(e, Error::UnsuitableMount { .. }), "{e}");
        let e = WatchedFreeze::start(
            &["/nonexistent/bulwark"],
            FreezeOptions::new(Duration::from_secs(1)),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("open mount point /nonexistent/bulwark: "),
            "{e}"
        );
    }
}
