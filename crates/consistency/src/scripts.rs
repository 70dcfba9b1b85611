//! What a pre- or post-script did, as the controller and the agent both see it: the
//! [`Phase`], why a script failed ([`ScriptFailure`]) and the [`ScriptReport`] the agent sends.
//!
//! The runner itself (permission checks, process groups, timeouts, bounded output) is guest-side
//! code and lives in the `bulwark-quiesce` crate.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Whether a script runs before the freeze or after the thaw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Before the freeze: quiesce the application.
    Pre,
    /// After the thaw: resume the application.
    Post,
}

impl Phase {
    /// "pre" or "post" (also the value of `BULWARK_SCRIPT_PHASE` in the script's environment).
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pre => "pre",
            Phase::Post => "post",
        }
    }
}

/// Why a script did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ScriptFailure {
    /// It exited with a non-zero status.
    Exited {
        /// The exit status.
        code: i32,
    },
    /// It was killed by a signal (not by our timeout).
    Signaled {
        /// The signal number.
        signal: i32,
    },
    /// It ran past its timeout; its process group was killed.
    TimedOut {
        /// The timeout, in milliseconds.
        after_ms: u64,
    },
    /// It could not be started.
    SpawnFailed {
        /// The OS error, as text.
        error: String,
    },
    /// It was not run: unsafe ownership or permissions.
    Refused {
        /// What is wrong.
        reason: String,
    },
}

impl fmt::Display for ScriptFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScriptFailure::Exited { code } => write!(f, "exited with status {code}"),
            ScriptFailure::Signaled { signal } => write!(f, "was killed by signal {signal}"),
            ScriptFailure::TimedOut { after_ms } => write!(
                f,
                "timed out after {:?} and was killed with its process group",
                Duration::from_millis(*after_ms)
            ),
            ScriptFailure::SpawnFailed { error } => write!(f, "could not be started: {error}"),
            ScriptFailure::Refused { reason } => write!(f, "was refused: {reason}"),
        }
    }
}

/// What running one script did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScriptReport {
    /// Pre or post.
    pub phase: Phase,
    /// The script (or the config file, when the whole configuration was refused).
    pub path: PathBuf,
    /// Attempts made (0 when refused).
    pub attempts: u32,
    /// `None` on success; otherwise how the last attempt failed.
    pub failure: Option<ScriptFailure>,
    /// The last bytes of stdout of the last attempt (lossy UTF-8).
    pub stdout_tail: String,
    /// The last bytes of stderr of the last attempt (lossy UTF-8).
    pub stderr_tail: String,
    /// Total bytes the last attempt wrote to stdout and stderr (may exceed the tails).
    pub output_bytes: u64,
    /// Wall time of all attempts, in milliseconds.
    pub duration_ms: u64,
}

impl ScriptReport {
    /// A report of a failure with no output, e.g. for a refusal or in tests.
    pub fn failed(phase: Phase, path: impl Into<PathBuf>, failure: ScriptFailure) -> Self {
        let attempts = u32::from(!matches!(failure, ScriptFailure::Refused { .. }));
        ScriptReport {
            phase,
            path: path.into(),
            attempts,
            failure: Some(failure),
            stdout_tail: String::new(),
            stderr_tail: String::new(),
            output_bytes: 0,
            duration_ms: 0,
        }
    }

    /// Whether the script succeeded.
    pub fn succeeded(&self) -> bool {
        self.failure.is_none()
    }

    /// One line for a reason text, e.g. "pre-script /etc/bulwark/pre.sh exited with status 3
    /// after 2 attempts (stderr: database is locked)".
    pub fn describe(&self) -> String {
        let mut s = format!("{}-script {}", self.phase.as_str(), self.path.display());
        match &self.failure {
            None => s.push_str(" succeeded"),
            Some(f) => {
                s.push(' ');
                s.push_str(&f.to_string());
            }
        }
        if self.attempts > 1 {
            s.push_str(&format!(" after {} attempts", self.attempts));
        }
        let (name, tail) = if self.stderr_tail.trim().is_empty() {
            ("stdout", &self.stdout_tail)
        } else {
            ("stderr", &self.stderr_tail)
        };
        let snippet = one_line_tail(tail, 200);
        if !snippet.is_empty() {
            s.push_str(&format!(" ({name}: {snippet})"));
        }
        s
    }
}

/// The last `max` characters of `text` on one line: trimmed, newlines shown as " | ".
fn one_line_tail(text: &str, max: usize) -> String {
    let joined = text
        .trim()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>();
    let joined = joined.join(" | ");
    let count = joined.chars().count();
    if count <= max {
        return joined;
    }
    let tail: String = joined.chars().skip(count - max).collect();
    format!("…{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_tail_is_bounded() {
        assert_eq!(one_line_tail("a\n\n b \nc\n", 100), "a | b | c");
        let long = "x".repeat(500);
        let t = one_line_tail(&long, 10);
        assert_eq!(t.chars().count(), 11);
    }
}
