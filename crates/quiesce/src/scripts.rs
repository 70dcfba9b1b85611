//! Pre- and post-scripts: permission checks and a runner with timeouts, retries and bounded
//! output capture.
//!
//! Scripts come only from the agent's own configuration (a path and parameters), never from the
//! network. Before anything runs, the configuration file and every script are checked
//! ([`check_config_file`], [`check_script`]): owned by the expected owner (root, uid 0, unless a
//! test says otherwise), not writable by group or others, scripts executable, and their directory
//! not writable by others. A failed check refuses the scripts ([`ScriptFailure::Refused`]), which
//! the fallback plan turns into `file_system` with the reason.
//!
//! Each script runs in its own process group, with a minimal environment, stdin from
//! `/dev/null`, and stdout/stderr drained into bounded tails. At its timeout the whole process
//! group is killed with SIGKILL (so a `sleep` the script started dies with it).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bulwark_consistency::{PreScripts, ScriptsAvailability};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};

pub use bulwark_consistency::scripts::{Phase, ScriptFailure, ScriptReport};

use crate::{Error, Result};

/// The default timeout of one script attempt.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// The default cap on any script's timeout (a config asking for more gets this).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(600);
/// The default number of bytes kept from the end of each of stdout and stderr.
pub const DEFAULT_OUTPUT_TAIL: usize = 4096;
/// The `PATH` scripts run with.
pub const SCRIPT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// One script from the agent's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptSpec {
    /// Absolute path of the script.
    pub path: PathBuf,
    /// Parameters, passed as separate arguments (no shell).
    #[serde(default)]
    pub params: Vec<String>,
    /// Timeout of one attempt, in seconds (fractions allowed); capped by
    /// [`RunOptions::max_timeout`].
    #[serde(default = "default_timeout", with = "secs")]
    pub timeout: Duration,
    /// Extra attempts after a failure or timeout.
    #[serde(default)]
    pub retries: u32,
}

fn default_timeout() -> Duration {
    DEFAULT_TIMEOUT
}

mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v = f64::deserialize(d)?;
        Duration::try_from_secs_f64(v).map_err(serde::de::Error::custom)
    }
}

impl ScriptSpec {
    /// A script with no parameters, the default timeout and no retries.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        ScriptSpec {
            path: path.into(),
            params: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            retries: 0,
        }
    }

    /// Sets the parameters.
    pub fn params<I, S>(mut self, params: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.params = params.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the timeout of one attempt.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the number of extra attempts.
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }
}

/// How scripts are checked and run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The uid that must own the config file, the scripts and their directories (root: 0).
    pub expected_owner: u32,
    /// Cap on any script's timeout.
    pub max_timeout: Duration,
    /// Bytes kept from the end of each of stdout and stderr.
    pub output_tail: usize,
    /// Pause between a failed attempt and the next.
    pub retry_delay: Duration,
    /// How long to wait for the output pipes to close after the script exited (a daemon the
    /// script left behind may hold them open).
    pub output_grace: Duration,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            expected_owner: 0,
            max_timeout: MAX_TIMEOUT,
            output_tail: DEFAULT_OUTPUT_TAIL,
            retry_delay: Duration::from_secs(1),
            output_grace: Duration::from_secs(1),
        }
    }
}

fn check_owner_mode(path: &Path, md: &std::fs::Metadata, expected_owner: u32) -> Result<()> {
    let refuse = |reason: String| {
        Err(Error::UnsafePermissions {
            path: path.to_path_buf(),
            reason,
        })
    };
    if md.uid() != expected_owner {
        return refuse(format!(
            "owned by uid {}, expected uid {expected_owner}",
            md.uid()
        ));
    }
    let mode = md.permissions().mode();
    if mode & 0o020 != 0 {
        return refuse(format!("writable by group (mode {:04o})", mode & 0o7777));
    }
    if mode & 0o002 != 0 {
        return refuse(format!("writable by others (mode {:04o})", mode & 0o7777));
    }
    Ok(())
}

fn check_parent(path: &Path, expected_owner: u32) -> Result<()> {
    let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(());
    };
    let md = std::fs::metadata(dir).map_err(|e| Error::io("inspect directory", dir, e))?;
    let mode = md.permissions().mode();
    if mode & 0o002 != 0 {
        return Err(Error::UnsafePermissions {
            path: dir.to_path_buf(),
            reason: format!(
                "directory of {} is writable by others (mode {:04o})",
                path.display(),
                mode & 0o7777
            ),
        });
    }
    if md.uid() != expected_owner && md.uid() != 0 {
        return Err(Error::UnsafePermissions {
            path: dir.to_path_buf(),
            reason: format!(
                "directory of {} is owned by uid {}, expected uid {expected_owner} or root",
                path.display(),
                md.uid()
            ),
        });
    }
    Ok(())
}

/// Resolves symlinks and checks both the link's directory and the real file's directory.
fn check_file(path: &Path, expected_owner: u32, executable: bool) -> Result<()> {
    if !path.is_absolute() {
        return Err(Error::UnsafePermissions {
            path: path.to_path_buf(),
            reason: "not an absolute path".into(),
        });
    }
    let real = std::fs::canonicalize(path).map_err(|e| Error::io("resolve", path, e))?;
    let md = std::fs::metadata(&real).map_err(|e| Error::io("inspect", &real, e))?;
    if !md.is_file() {
        return Err(Error::UnsafePermissions {
            path: real,
            reason: "not a regular file".into(),
        });
    }
    check_owner_mode(&real, &md, expected_owner)?;
    if executable && md.permissions().mode() & 0o100 == 0 {
        return Err(Error::UnsafePermissions {
            path: real,
            reason: "not executable by its owner".into(),
        });
    }
    check_parent(&real, expected_owner)?;
    if real != path {
        check_parent(path, expected_owner)?;
    }
    Ok(())
}

/// Checks the agent's configuration file: a regular file owned by `expected_owner` (0 for root),
/// not writable by group or others, in a directory not writable by others.
pub fn check_config_file(path: &Path, expected_owner: u32) -> Result<()> {
    check_file(path, expected_owner, false)
}

/// Checks a script: like [`check_config_file`], and executable by its owner.
pub fn check_script(path: &Path, expected_owner: u32) -> Result<()> {
    check_file(path, expected_owner, true)
}

/// Whether the agent may run its pre-scripts: checks the config file they came from (when
/// given) and every script, for the `Hello` capabilities. The first problem refuses them all.
pub fn availability(
    config_file: Option<&Path>,
    pre: &[ScriptSpec],
    expected_owner: u32,
) -> ScriptsAvailability {
    if pre.is_empty() {
        return ScriptsAvailability::NotConfigured;
    }
    let checked = config_file
        .map_or(Ok(()), |c| check_config_file(c, expected_owner))
        .and_then(|()| {
            pre.iter()
                .try_for_each(|s| check_script(&s.path, expected_owner))
        });
    match checked {
        Ok(()) => ScriptsAvailability::Configured,
        Err(e) => ScriptsAvailability::Refused {
            reason: e.to_string(),
        },
    }
}

/// A bounded tail of a byte stream.
#[derive(Debug, Default)]
struct Tail {
    buf: Vec<u8>,
    cap: usize,
    total: u64,
}

impl Tail {
    fn push(&mut self, data: &[u8]) {
        self.total += data.len() as u64;
        self.buf.extend_from_slice(data);
        if self.buf.len() > self.cap.saturating_mul(2).max(1024) {
            let cut = self.buf.len() - self.cap;
            self.buf.drain(..cut);
        }
    }

    fn text(&self) -> String {
        let start = self.buf.len().saturating_sub(self.cap);
        String::from_utf8_lossy(&self.buf[start..]).into_owned()
    }
}

async fn drain<R: AsyncRead + Unpin>(mut r: R, tail: Arc<Mutex<Tail>>) {
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if let Ok(mut t) = tail.lock() {
                    t.push(&chunk[..n]);
                }
            }
        }
    }
}

/// Kills a process group when dropped, unless disarmed: so that a cancelled run leaves nothing
/// behind.
struct GroupKiller(Option<rustix::process::Pid>);

impl GroupKiller {
    fn kill(&mut self) {
        if let Some(pid) = self.0.take() {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Attempt {
    failure: Option<ScriptFailure>,
    stdout: String,
    stderr: String,
    bytes: u64,
}

async fn attempt(phase: Phase, spec: &ScriptSpec, timeout: Duration, opts: &RunOptions) -> Attempt {
    let mut cmd = tokio::process::Command::new(&spec.path);
    cmd.args(&spec.params)
        .env_clear()
        .env("PATH", SCRIPT_PATH)
        .env("LANG", "C")
        .env("BULWARK_SCRIPT_PHASE", phase.as_str())
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    // ETXTBSY: another thread of this process forked while the script file was open for
    // writing (typical right after a test or an installer wrote it): transient, retry briefly.
    let mut spawned = cmd.spawn();
    for _ in 0..20 {
        match &spawned {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                spawned = cmd.spawn();
            }
            _ => break,
        }
    }
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            return Attempt {
                failure: Some(ScriptFailure::SpawnFailed {
                    error: e.to_string(),
                }),
                stdout: String::new(),
                stderr: String::new(),
                bytes: 0,
            };
        }
    };
    // The child leads its own process group, whose id is its pid.
    let mut killer = GroupKiller(
        child
            .id()
            .and_then(|id| rustix::process::Pid::from_raw(id as i32)),
    );
    // Armed only while the script runs: once it has exited normally, what it left in the
    // background (e.g. a session holding a database lock until the post-script) is its business.
    let out = Arc::new(Mutex::new(Tail {
        cap: opts.output_tail,
        ..Tail::default()
    }));
    let err = Arc::new(Mutex::new(Tail {
        cap: opts.output_tail,
        ..Tail::default()
    }));
    let mut readers = Vec::new();
    if let Some(s) = child.stdout.take() {
        readers.push(tokio::spawn(drain(s, out.clone())));
    }
    if let Some(s) = child.stderr.take() {
        readers.push(tokio::spawn(drain(s, err.clone())));
    }
    let failure = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => {
            killer.0 = None;
            if status.success() {
                None
            } else if let Some(code) = status.code() {
                Some(ScriptFailure::Exited { code })
            } else {
                Some(ScriptFailure::Signaled {
                    signal: status.signal().unwrap_or(0),
                })
            }
        }
        Ok(Err(e)) => {
            killer.kill();
            Some(ScriptFailure::SpawnFailed {
                error: format!("wait failed: {e}"),
            })
        }
        Err(_) => {
            killer.kill();
            let _ = child.start_kill();
            let _ = child.wait().await;
            Some(ScriptFailure::TimedOut {
                after_ms: timeout.as_millis() as u64,
            })
        }
    };
    for r in readers {
        let abort = r.abort_handle();
        if tokio::time::timeout(opts.output_grace, r).await.is_err() {
            abort.abort();
        }
    }
    let (stdout, so) = out.lock().map(|t| (t.text(), t.total)).unwrap_or_default();
    let (stderr, se) = err.lock().map(|t| (t.text(), t.total)).unwrap_or_default();
    Attempt {
        failure,
        stdout,
        stderr,
        bytes: so + se,
    }
}

/// Checks and runs one script, with its retries. Never fails: what went wrong is in the report.
pub async fn run_script(phase: Phase, spec: &ScriptSpec, opts: &RunOptions) -> ScriptReport {
    let started = Instant::now();
    if let Err(e) = check_script(&spec.path, opts.expected_owner) {
        tracing::warn!(script = %spec.path.display(), error = %e, "script refused");
        return ScriptReport::failed(
            phase,
            &spec.path,
            ScriptFailure::Refused {
                reason: e.to_string(),
            },
        );
    }
    let timeout = spec
        .timeout
        .min(opts.max_timeout)
        .max(Duration::from_millis(1));
    let mut attempts = 0;
    loop {
        attempts += 1;
        let a = attempt(phase, spec, timeout, opts).await;
        let done = a.failure.is_none() || attempts > spec.retries;
        if let Some(f) = &a.failure {
            tracing::warn!(script = %spec.path.display(), attempt = attempts, failure = %f, "script failed");
        }
        if done {
            return ScriptReport {
                phase,
                path: spec.path.clone(),
                attempts,
                failure: a.failure,
                stdout_tail: a.stdout,
                stderr_tail: a.stderr,
                output_bytes: a.bytes,
                duration_ms: started.elapsed().as_millis() as u64,
            };
        }
        tokio::time::sleep(opts.retry_delay).await;
    }
}

/// Checks every script first (one refused script refuses them all: nothing runs), then runs the
/// pre-scripts in order and stops at the first failure.
pub async fn run_pre_scripts(scripts: &[ScriptSpec], opts: &RunOptions) -> PreScripts {
    if scripts.is_empty() {
        return PreScripts::NotRun;
    }
    for s in scripts {
        if let Err(e) = check_script(&s.path, opts.expected_owner) {
            return PreScripts::Failed(ScriptReport::failed(
                Phase::Pre,
                &s.path,
                ScriptFailure::Refused {
                    reason: e.to_string(),
                },
            ));
        }
    }
    for s in scripts {
        let report = run_script(Phase::Pre, s, opts).await;
        if !report.succeeded() {
            return PreScripts::Failed(report);
        }
    }
    PreScripts::Succeeded
}

/// Runs every post-script (a failure does not stop the others) and returns the reports of those
/// that did not succeed.
pub async fn run_post_scripts(scripts: &[ScriptSpec], opts: &RunOptions) -> Vec<ScriptReport> {
    let mut failed = Vec::new();
    for s in scripts {
        let report = run_script(Phase::Post, s, opts).await;
        if !report.succeeded() {
            failed.push(report);
        }
    }
    failed
}

#[cfg(test)]
#[path = "scripts_tests.rs"]
mod tests;
