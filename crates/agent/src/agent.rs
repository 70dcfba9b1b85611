//! The protocol [`Handler`]: what `Hello`, `Prepare`, `Freeze`, `Thaw`, `Status` and `Ping` do.
//!
//! State shared by every connection ([`AgentCore`]): one state machine `Idle → Prepared →
//! Frozen → Idle` behind one lock, so there is one freeze at a time. Each connection gets an
//! [`AgentConnection`]; if the connection that froze goes away without a `Thaw`, the freeze is
//! thawed at once (the watchdog and the guardian remain the guards against a hung agent).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bulwark_consistency::scripts::{Phase, ScriptFailure, ScriptReport};
use bulwark_consistency::{Level, PreScripts, after_pre_scripts};
use bulwark_protocol::{
    AgentIdentity, AgentState, CAP_FSFREEZE, CAP_SCRIPTS, CAP_WATCHDOG, ErrorCode, ErrorReply,
    Frozen, Handler, Hello, HelloOk, Prepared, Request, Response, ScriptOutcome, ScriptStatus,
    StatusReport, Thawed,
};
use bulwark_quiesce::guardian::GuardianCommand;
use bulwark_quiesce::mounts::{FREEZABLE_FS_TYPES, discover_freezable, read_mountinfo};
use bulwark_quiesce::scripts::{
    RunOptions, ScriptSpec, check_config_file, check_script, run_script,
};
use bulwark_quiesce::{FreezeOptions, WatchedFreeze};
use tokio::sync::Mutex;

use crate::config::Config;

/// The agent program version announced in `Hello`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

enum Stage {
    Idle,
    Prepared {
        owner: u64,
    },
    Frozen {
        freeze: Box<WatchedFreeze>,
        owner: u64,
        mounts: Vec<String>,
        deadline_unix_ms: u64,
        prepared: bool,
    },
}

struct Inner {
    phase: Stage,
    last_thawed: Option<Thawed>,
}

/// The agent's shared state: configuration, the freeze lock and the state machine.
pub struct AgentCore {
    config: Config,
    guardian: Option<GuardianCommand>,
    script_owner: u32,
    inner: Mutex<Inner>,
    next_conn: AtomicU64,
}

impl std::fmt::Debug for AgentCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentCore")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn outcome(report: &ScriptReport) -> ScriptOutcome {
    let (status, exit_code, message) = match &report.failure {
        None => (ScriptStatus::Succeeded, Some(0), None),
        Some(ScriptFailure::Exited { code }) => (ScriptStatus::Failed, Some(*code), None),
        Some(ScriptFailure::Signaled { .. } | ScriptFailure::SpawnFailed { .. }) => {
            (ScriptStatus::Failed, None, Some(report.describe()))
        }
        Some(ScriptFailure::TimedOut { .. }) => (ScriptStatus::TimedOut, None, None),
        Some(ScriptFailure::Refused { reason }) => {
            (ScriptStatus::Refused, None, Some(reason.clone()))
        }
    };
    ScriptOutcome {
        path: report.path.display().to_string(),
        status,
        exit_code,
        attempts: report.attempts,
        duration_ms: report.duration_ms,
        message,
    }
}

/// The last `max` characters of `text`, trimmed.
fn last_chars(text: &str, max: usize) -> String {
    let t = text.trim();
    let n = t.chars().count();
    t.chars().skip(n.saturating_sub(max)).collect()
}

/// Runs a script and keeps its output on this host: the tails (already bounded by the
/// runner) go to the agent's own log, at most 400 characters of each, and are removed from
/// the report, so that nothing the script printed (passwords, paths, data) reaches the
/// controller, its reasons or the recovery point in the vault.
async fn run_local(phase: Phase, spec: &ScriptSpec, opts: &RunOptions) -> ScriptReport {
    let mut report = run_script(phase, spec, opts).await;
    let stdout = last_chars(&report.stdout_tail, 400);
    let stderr = last_chars(&report.stderr_tail, 400);
    if !stdout.is_empty() || !stderr.is_empty() {
        tracing::info!(
            script = %report.path.display(),
            phase = phase.as_str(),
            %stdout,
            %stderr,
            "script output (kept on this host)"
        );
    }
    report.stdout_tail.clear();
    report.stderr_tail.clear();
    report
}

fn skipped(spec: &ScriptSpec, why: &str) -> ScriptOutcome {
    ScriptOutcome {
        path: spec.path.display().to_string(),
        status: ScriptStatus::Skipped,
        exit_code: None,
        attempts: 0,
        duration_ms: 0,
        message: Some(why.to_owned()),
    }
}

impl AgentCore {
    /// The shared state of an agent with `config`. `guardian` re-executes the agent binary as
    /// the freeze guardian (normally [`GuardianCommand::current_exe`]); `None` runs without one
    /// (the in-process watchdog and the state file remain).
    pub fn new(config: Config, guardian: Option<GuardianCommand>) -> Arc<AgentCore> {
        Arc::new(AgentCore {
            config,
            guardian,
            script_owner: 0,
            inner: Mutex::new(Inner {
                phase: Stage::Idle,
                last_thawed: None,
            }),
            next_conn: AtomicU64::new(1),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// A handler for one new connection.
    pub fn connection(self: &Arc<Self>) -> AgentConnection {
        AgentConnection {
            core: self.clone(),
            id: self.next_conn.fetch_add(1, Ordering::Relaxed),
        }
    }

    fn run_options(&self) -> RunOptions {
        RunOptions {
            expected_owner: self.script_owner,
            max_timeout: self.config.scripts.max_timeout(),
            ..RunOptions::default()
        }
    }

    /// Why the scripts may not run (unsafe config file or script), if so.
    pub fn scripts_refused(&self) -> Option<String> {
        if let Err(e) = check_config_file(&self.config.path, self.script_owner) {
            return Some(format!("configuration file: {e}"));
        }
        for s in self
            .config
            .scripts
            .pre
            .iter()
            .chain(&self.config.scripts.post)
        {
            if let Err(e) = check_script(&s.path, self.script_owner) {
                return Some(e.to_string());
            }
        }
        None
    }

    /// The mounts a freeze would freeze now, in freeze order. Configured mounts must be mount
    /// points of a freezable type (a plain directory would freeze the file system holding it,
    /// e.g. `/`).
    pub fn freeze_mounts(&self) -> Result<Vec<PathBuf>, String> {
        let f = &self.config.freeze;
        if !f.enabled {
            return Err("fsfreeze is disabled in the agent's configuration".into());
        }
        let mounts = if f.mounts.is_empty() {
            discover_freezable(&f.skip).map_err(|e| e.to_string())?
        } else {
            let table = read_mountinfo().map_err(|e| e.to_string())?;
            let mut out = Vec::new();
            for m in &f.mounts {
                if f.skip.contains(m) {
                    continue;
                }
                let canon =
                    std::fs::canonicalize(m).map_err(|e| format!("mount {}: {e}", m.display()))?;
                // The last mount on a point hides the earlier ones.
                match table.iter().rev().find(|i| i.mount_point == canon) {
                    None => return Err(format!("{} is not a mount point", m.display())),
                    Some(i) if !FREEZABLE_FS_TYPES.contains(&i.fs_type.as_str()) => {
                        return Err(format!(
                            "{} is a {} file system, which cannot be frozen",
                            m.display(),
                            i.fs_type
                        ));
                    }
                    Some(i) if i.read_only() => {
                        return Err(format!("{} is mounted read-only", m.display()));
                    }
                    Some(_) => out.push(canon),
                }
            }
            bulwark_quiesce::mounts::freeze_order(&out)
        };
        if mounts.is_empty() {
            return Err("no mount to freeze".into());
        }
        Ok(mounts)
    }

    fn hostname(&self) -> String {
        if let Some(h) = &self.config.hostname {
            return h.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into())
    }

    /// The `Hello` answer: identity, capabilities and the levels reachable right now.
    pub fn hello_ok(&self, version: u16) -> HelloOk {
        let mut capabilities = vec![CAP_WATCHDOG.to_owned()];
        let mut levels = vec![Level::Crash];
        let can_freeze = self.freeze_mounts().is_ok();
        if can_freeze {
            capabilities.push(CAP_FSFREEZE.to_owned());
            levels.push(Level::FileSystem);
        }
        if !self.config.scripts.pre.is_empty() {
            // Announced even when refused: `Prepare` then says why.
            capabilities.push(CAP_SCRIPTS.to_owned());
            if can_freeze && self.scripts_refused().is_none() {
                levels.push(Level::Application);
            }
        }
        HelloOk {
            version,
            agent: AgentIdentity {
                hostname: self.hostname(),
                agent_version: AGENT_VERSION.to_owned(),
            },
            capabilities,
            levels,
        }
    }

    async fn prepare(&self, owner: u64) -> Response {
        let Ok(mut inner) = self.inner.try_lock() else {
            return Response::error(ErrorCode::Busy, "another request is in progress");
        };
        match inner.phase {
            Stage::Idle => {}
            Stage::Prepared { .. } => {
                return Response::error(
                    ErrorCode::InvalidState,
                    "already prepared: thaw first to run the post-scripts",
                );
            }
            Stage::Frozen { .. } => {
                return Response::error(ErrorCode::InvalidState, "frozen: thaw first");
            }
        }
        let pre = &self.config.scripts.pre;
        let opts = self.run_options();
        let mut outcomes = Vec::new();
        let result = if pre.is_empty() {
            PreScripts::NotRun
        } else if let Some(reason) = self.scripts_refused() {
            tracing::warn!(%reason, "scripts refused");
            let report = ScriptReport::failed(
                Phase::Pre,
                &pre[0].path,
                ScriptFailure::Refused {
                    reason: reason.clone(),
                },
            );
            outcomes.extend(pre.iter().map(|s| ScriptOutcome {
                status: ScriptStatus::Refused,
                message: Some(reason.clone()),
                ..skipped(s, "")
            }));
            PreScripts::Failed(report)
        } else {
            let mut failed = None;
            for s in pre {
                if failed.is_some() {
                    outcomes.push(skipped(s, "an earlier pre-script failed"));
                    continue;
                }
                let report = run_local(Phase::Pre, s, &opts).await;
                outcomes.push(outcome(&report));
                if !report.succeeded() {
                    failed = Some(report);
                }
            }
            failed.map_or(PreScripts::Succeeded, PreScripts::Failed)
        };
        match after_pre_scripts(
            Level::Application,
            &result,
            self.config.scripts.continue_on_failure,
        ) {
            Ok((level, reasons)) => {
                inner.phase = Stage::Prepared { owner };
                inner.last_thawed = None;
                tracing::info!(%level, ?reasons, "prepared");
                Response::Prepared(Prepared {
                    scripts: outcomes,
                    level,
                    reasons,
                })
            }
            Err(e) => {
                // The application may be half-quiesced: resume it before giving up.
                let post = self.post_scripts().await;
                tracing::warn!(error = %e, ?post, "pre-scripts failed; the backup stops");
                Response::error(ErrorCode::PrepareFailed, e.to_string())
            }
        }
    }

    async fn post_scripts(&self) -> Vec<ScriptOutcome> {
        let post = &self.config.scripts.post;
        if post.is_empty() {
            return Vec::new();
        }
        if let Some(reason) = self.scripts_refused() {
            return post
                .iter()
                .map(|s| ScriptOutcome {
                    status: ScriptStatus::Refused,
                    message: Some(reason.clone()),
                    ..skipped(s, "")
                })
                .collect();
        }
        let opts = self.run_options();
        let mut out = Vec::new();
        for s in post {
            out.push(outcome(&run_local(Phase::Post, s, &opts).await));
        }
        out
    }

    async fn freeze(&self, timeout_ms: u64, owner: u64) -> Response {
        let Ok(mut inner) = self.inner.try_lock() else {
            return Response::error(ErrorCode::Busy, "another request is in progress");
        };
        let prepared = match inner.phase {
            Stage::Frozen { .. } => {
                return Response::error(ErrorCode::Busy, "a freeze is already in progress");
            }
            Stage::Prepared { .. } => true,
            Stage::Idle => false,
        };
        let mounts = match self.freeze_mounts() {
            Ok(m) => m,
            Err(why) if !self.config.freeze.enabled => {
                return Response::error(ErrorCode::Unsupported, why);
            }
            Err(why) => return Response::error(ErrorCode::FreezeFailed, why),
        };
        let cap = u64::try_from(bulwark_quiesce::watchdog::MAX_FREEZE_TIMEOUT.as_millis())
            .unwrap_or(u64::MAX)
            .min(self.config.freeze.max_timeout_ms);
        let ms = timeout_ms.clamp(1, cap);
        let timeout = Duration::from_millis(ms);
        let mut opts = FreezeOptions::new(timeout).state_file(self.config.state_file());
        if let Some(g) = &self.guardian {
            opts = opts.guardian(g.clone());
        }
        let to_freeze = mounts.clone();
        let started_unix = unix_ms();
        let started = tokio::task::spawn_blocking(move || WatchedFreeze::start(&to_freeze, opts))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        match started {
            Ok(freeze) => {
                let mounts: Vec<String> = freeze
                    .mounts()
                    .iter()
                    .map(|m| m.display().to_string())
                    .collect();
                let deadline_unix_ms = started_unix + ms;
                inner.phase = Stage::Frozen {
                    freeze: Box::new(freeze),
                    owner,
                    mounts: mounts.clone(),
                    deadline_unix_ms,
                    prepared,
                };
                inner.last_thawed = None;
                Response::Frozen(Frozen {
                    mounts,
                    timeout_ms: ms,
                    deadline_unix_ms,
                })
            }
            Err(why) => {
                tracing::warn!(%why, "freeze failed");
                Response::error(ErrorCode::FreezeFailed, why)
            }
        }
    }

    /// Thaws (if frozen) and runs the post-scripts (if `Prepare` ran). `only_owner`: thaw only a
    /// freeze made by that connection (used when a connection closes).
    async fn thaw(&self, only_owner: Option<u64>, why_not_held: Option<&str>) -> Response {
        let mut inner = self.inner.lock().await;
        let phase = std::mem::replace(&mut inner.phase, Stage::Idle);
        let thawed = match phase {
            Stage::Frozen { owner, .. } if only_owner.is_some_and(|o| o != owner) => {
                inner.phase = phase;
                return Response::error(ErrorCode::InvalidState, "not this connection's freeze");
            }
            Stage::Frozen {
                mut freeze,
                prepared,
                ..
            } => {
                let report = tokio::task::spawn_blocking(move || freeze.thaw()).await;
                let post = if prepared {
                    self.post_scripts().await
                } else {
                    Vec::new()
                };
                match report {
                    Ok(r) => {
                        let mut reasons = r.reasons.clone();
                        if let Some(w) = why_not_held {
                            reasons.push(w.to_owned());
                        }
                        for (m, e) in &r.thaw.failed {
                            reasons.push(format!("cannot thaw {}: {e}", m.display()));
                        }
                        Thawed {
                            held_continuously: reasons.is_empty(),
                            reason: (!reasons.is_empty()).then(|| reasons.join("; ")),
                            frozen_for_ms: r.frozen_for.as_millis() as u64,
                            post_scripts: post,
                        }
                    }
                    Err(e) => Thawed {
                        held_continuously: false,
                        reason: Some(format!("the thaw task failed: {e}")),
                        frozen_for_ms: 0,
                        post_scripts: post,
                    },
                }
            }
            Stage::Prepared { owner } if only_owner.is_none_or(|o| o == owner) => Thawed {
                held_continuously: false,
                reason: Some("nothing was frozen".into()),
                frozen_for_ms: 0,
                post_scripts: self.post_scripts().await,
            },
            Stage::Prepared { .. } => {
                inner.phase = phase;
                return Response::error(ErrorCode::InvalidState, "not this connection's prepare");
            }
            Stage::Idle => {
                return Response::Thawed(inner.last_thawed.clone().unwrap_or(Thawed {
                    held_continuously: false,
                    reason: Some("nothing was frozen".into()),
                    frozen_for_ms: 0,
                    post_scripts: Vec::new(),
                }));
            }
        };
        tracing::info!(held = thawed.held_continuously, reason = ?thawed.reason, ms = thawed.frozen_for_ms, "thawed");
        inner.last_thawed = Some(thawed.clone());
        Response::Thawed(thawed)
    }

    /// Thaws whatever is frozen and runs the post-scripts if `Prepare` ran: for SIGTERM.
    pub async fn shutdown(&self) {
        let busy = !matches!(self.inner.lock().await.phase, Stage::Idle);
        if busy {
            tracing::warn!("shutting down while prepared or frozen: thawing first");
            let _ = self.thaw(None, Some("the agent was stopped")).await;
        }
    }

    async fn status(&self) -> Response {
        // A thaw holds the lock for milliseconds; pre/post-scripts may hold it for minutes.
        let Ok(inner) = tokio::time::timeout(Duration::from_secs(2), self.inner.lock()).await
        else {
            return Response::error(ErrorCode::Busy, "another request (scripts) is in progress");
        };
        Response::Status(match &inner.phase {
            Stage::Idle => StatusReport {
                state: AgentState::Idle,
                deadline_unix_ms: None,
                mounts: Vec::new(),
            },
            Stage::Prepared { .. } => StatusReport {
                state: AgentState::Prepared,
                deadline_unix_ms: None,
                mounts: Vec::new(),
            },
            Stage::Frozen {
                mounts,
                deadline_unix_ms,
                ..
            } => StatusReport {
                state: AgentState::Frozen,
                deadline_unix_ms: Some(*deadline_unix_ms),
                mounts: mounts.clone(),
            },
        })
    }
}

/// The [`Handler`] of one connection.
#[derive(Debug)]
pub struct AgentConnection {
    core: Arc<AgentCore>,
    id: u64,
}

impl Handler for AgentConnection {
    async fn hello(&mut self, _hello: &Hello, version: u16) -> Result<HelloOk, ErrorReply> {
        Ok(self.core.hello_ok(version))
    }

    async fn handle(&mut self, request: Request) -> Response {
        match request {
            Request::Ping => Response::Pong,
            Request::Status => self.core.status().await,
            Request::Prepare => self.core.prepare(self.id).await,
            Request::Freeze { timeout_ms } => self.core.freeze(timeout_ms, self.id).await,
            // Only the connection that prepared or froze may thaw: another controller (or a
            // second connection of the same one) gets `invalid_state`. A connection that goes
            // away thaws its own freeze (Drop below); SIGTERM thaws whatever is frozen.
            Request::Thaw => self.core.thaw(Some(self.id), None).await,
            Request::Hello(_) => Response::error(ErrorCode::BadRequest, "hello again"),
        }
    }
}

impl Drop for AgentConnection {
    fn drop(&mut self) {
        // A controller that froze (or prepared) and vanished: thaw now rather than at the
        // deadline, and resume the application with the post-scripts.
        let core = self.core.clone();
        let id = self.id;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let mine = matches!(
                    core.inner.lock().await.phase,
                    Stage::Frozen { owner, .. } | Stage::Prepared { owner } if owner == id
                );
                if mine {
                    tracing::warn!(
                        connection = id,
                        "the controller closed its connection while prepared or frozen: thawing"
                    );
                    let _ = core
                        .thaw(
                            Some(id),
                            Some("the controller's connection closed before the thaw"),
                        )
                        .await;
                }
            });
        }
    }
}
