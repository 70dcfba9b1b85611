//! The fallback plan: which steps to run for the level wanted, and which level was reached.
//!
//! Both functions are pure: the controller (and the agent) feed them what they know and get a
//! level and human-readable reasons back. The chain is
//!
//! * `application` → `file_system` when a pre-script failed or timed out and
//!   `continue_on_failure` is set, when scripts were refused for unsafe permissions, or when no
//!   pre-script is configured;
//! * → `crash` when the agent is absent, fsfreeze is disabled, the freeze failed, or the freeze was
//!   not held continuously until the thaw (the watchdog fired first).
//!
//! A pre-script failure without `continue_on_failure` stops the backup
//! ([`Error::PreScriptFailed`]); a result below the policy's minimum is [`Error::BelowMinimum`].

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::scripts::{ScriptFailure, ScriptReport};
use crate::{Error, Level, Result};

/// Whether the agent has pre-scripts it may run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ScriptsAvailability {
    /// Pre-scripts are configured and their permissions were checked.
    Configured,
    /// No pre-script is configured.
    #[default]
    NotConfigured,
    /// Scripts are configured but refused (unsafe ownership or permissions of the config file or
    /// a script).
    Refused {
        /// Why, e.g. "refusing /etc/bulwark/pre.sh: writable by group".
        reason: String,
    },
}

/// What a reachable agent can do, as it announces it (`Hello` capabilities).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Capabilities {
    /// fsfreeze is enabled and there is at least one mount to freeze.
    pub freeze: bool,
    /// Whether pre-scripts are available.
    pub pre_scripts: ScriptsAvailability,
    /// Post-scripts are configured (and allowed).
    pub post_scripts: bool,
}

/// Whether the agent can be used for this job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum AgentStatus {
    /// Reachable and authenticated, with these capabilities.
    Reachable(Capabilities),
    /// Not reachable, not authenticated, or too old.
    Unreachable {
        /// Why, e.g. "connection refused (10.0.0.5:7070)".
        reason: String,
    },
}

/// One step of a backup's quiesce phase, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// The agent runs its pre-scripts (`Prepare`).
    PreScripts,
    /// The agent freezes its mounts and arms the watchdog (`Freeze`).
    Freeze,
    /// The host snapshots every disk.
    Snapshot,
    /// The agent thaws and reports whether the freeze was held continuously (`Thaw`).
    Thaw,
    /// The agent runs its post-scripts.
    PostScripts,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::PreScripts => "pre_scripts",
            Step::Freeze => "freeze",
            Step::Snapshot => "snapshot",
            Step::Thaw => "thaw",
            Step::PostScripts => "post_scripts",
        })
    }
}

/// What to do for a job, decided before it starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// The level the plan aims at (at most the wanted level).
    pub target: Level,
    /// The steps, in order. Always contains [`Step::Snapshot`].
    pub steps: Vec<Step>,
    /// Why the target is below the wanted level (empty when it is not).
    pub reasons: Vec<String>,
}

impl Plan {
    /// Whether the plan contains `step`.
    pub fn has(&self, step: Step) -> bool {
        self.steps.contains(&step)
    }
}

/// Plans a job: the target level and the steps to run, given the level wanted, the policy's
/// minimum and the agent's status.
///
/// Fails early with [`Error::BelowMinimum`] when even the plan cannot reach the minimum (for
/// example the agent is unreachable and the minimum is `file_system`).
pub fn plan(wanted: Level, minimum: Level, agent: &AgentStatus) -> Result<Plan> {
    check_wanted(wanted, minimum)?;
    let mut reasons = Vec::new();
    let mut target = wanted;
    let caps = match agent {
        AgentStatus::Reachable(caps) => Some(caps),
        AgentStatus::Unreachable { reason } => {
            if target > Level::Crash {
                reasons.push(format!(
                    "agent unreachable: {reason}; falling back to crash"
                ));
                target = Level::Crash;
            }
            None
        }
    };
    let mut run_scripts = false;
    if let Some(caps) = caps {
        if target == Level::Application {
            match &caps.pre_scripts {
                ScriptsAvailability::Configured => run_scripts = true,
                ScriptsAvailability::NotConfigured => {
                    reasons.push(
                        "application consistency wanted but the agent has no pre-script \
                         configured; falling back to file_system"
                            .to_string(),
                    );
                    target = Level::FileSystem;
                }
                ScriptsAvailability::Refused { reason } => {
                    reasons.push(format!(
                        "scripts refused: {reason}; falling back to file_system"
                    ));
                    target = Level::FileSystem;
                }
            }
        }
        if target >= Level::FileSystem && !caps.freeze {
            reasons.push(format!(
                "fsfreeze is disabled on the agent (or it has no mount to freeze); \
                 falling back to crash from {target}"
            ));
            target = Level::Crash;
            run_scripts = false;
        }
    }
    check_minimum(target, minimum, &reasons)?;
    let mut steps = Vec::new();
    if run_scripts {
        steps.push(Step::PreScripts);
    }
    if target >= Level::FileSystem {
        steps.push(Step::Freeze);
    }
    steps.push(Step::Snapshot);
    if target >= Level::FileSystem {
        steps.push(Step::Thaw);
    }
    if run_scripts && caps.is_some_and(|c| c.post_scripts) {
        steps.push(Step::PostScripts);
    }
    Ok(Plan {
        target,
        steps,
        reasons,
    })
}

/// How the pre-scripts went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum PreScripts {
    /// Not run: none configured, or the level wanted does not need them.
    #[default]
    NotRun,
    /// All pre-scripts succeeded.
    Succeeded,
    /// A pre-script failed, timed out, could not start, or scripts were refused for unsafe
    /// permissions ([`ScriptFailure::Refused`]).
    Failed(ScriptReport),
}

/// How the freeze went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum FreezeObserved {
    /// Not attempted (the job never got that far, or the level did not need it).
    #[default]
    NotAttempted,
    /// fsfreeze is disabled in the agent's configuration.
    Disabled,
    /// FIFREEZE failed on some mount.
    Failed {
        /// Why, e.g. "cannot freeze /data: Operation not supported".
        reason: String,
    },
    /// Frozen, but not held continuously until the thaw: the watchdog (or the guardian, or
    /// someone else) thawed first, so the snapshot may be inconsistent.
    NotHeldContinuously {
        /// Why, e.g. "the watchdog thawed at the 30s deadline before the thaw".
        reason: String,
    },
    /// Frozen during the whole snapshot and thawed by the thaw.
    Held,
}

/// What happened during a job's quiesce phase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Observed {
    /// `Some(reason)` when the agent was unreachable (or not authenticated).
    pub agent_unreachable: Option<String>,
    /// How the pre-scripts went (only looked at when `application` was wanted).
    pub pre_scripts: PreScripts,
    /// The agent's `continue_on_failure` setting for pre-scripts.
    pub continue_on_failure: bool,
    /// How the freeze went (looked at when `file_system` or more was wanted).
    pub freeze: FreezeObserved,
    /// Post-scripts that failed: warnings only, the snapshot was already taken.
    pub post_script_failures: Vec<ScriptReport>,
}

/// The level reached, and why it is what it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// The level reached (never above the wanted level, never below the minimum).
    pub level: Level,
    /// Every fallback, in order (empty when the wanted level was reached).
    pub reasons: Vec<String>,
    /// Problems that did not lower the level (failed post-scripts).
    pub warnings: Vec<String>,
}

/// The decision after the pre-scripts: the level still reachable and the reasons so far, or
/// [`Error::PreScriptFailed`] when the backup must stop.
///
/// The agent uses it to decide whether to go on to the freeze; [`resolve`] applies the same rule.
pub fn after_pre_scripts(
    wanted: Level,
    pre: &PreScripts,
    continue_on_failure: bool,
) -> Result<(Level, Vec<String>)> {
    if wanted < Level::Application {
        return Ok((wanted, Vec::new()));
    }
    match pre {
        PreScripts::Succeeded => Ok((wanted, Vec::new())),
        PreScripts::NotRun => Ok((
            Level::FileSystem,
            vec![
                "application consistency wanted but no pre-script ran; falling back to file_system"
                    .to_string(),
            ],
        )),
        PreScripts::Failed(report) => {
            if matches!(report.failure, Some(ScriptFailure::Refused { .. })) {
                // Refusal is a configuration problem on the guest, not a failing application:
                // the design drops to file_system whatever continue_on_failure says.
                return Ok((
                    Level::FileSystem,
                    vec![format!(
                        "{}; falling back to file_system",
                        report.describe()
                    )],
                ));
            }
            if continue_on_failure {
                Ok((
                    Level::FileSystem,
                    vec![format!(
                        "{}; continue_on_failure is set: falling back to file_system",
                        report.describe()
                    )],
                ))
            } else {
                Err(Error::PreScriptFailed {
                    script: report.path.clone(),
                    reason: report.describe(),
                })
            }
        }
    }
}

/// Computes the level reached from the level wanted, the policy's minimum and what happened.
///
/// ```
/// use bulwark_consistency::{resolve, FreezeObserved, Level, Observed, PreScripts};
/// use bulwark_consistency::scripts::{Phase, ScriptFailure, ScriptReport};
///
/// let observed = Observed {
///     pre_scripts: PreScripts::Failed(ScriptReport::failed(
///         Phase::Pre,
///         "/etc/bulwark/pre.sh",
///         ScriptFailure::Exited { code: 3 },
///     )),
///     continue_on_failure: true,
///     freeze: FreezeObserved::Held,
///     ..Observed::default()
/// };
/// let outcome = resolve(Level::Application, Level::Crash, &observed).unwrap();
/// assert_eq!(outcome.level, Level::FileSystem);
/// assert_eq!(
///     outcome.reasons,
///     ["pre-script /etc/bulwark/pre.sh exited with status 3; \
///       continue_on_failure is set: falling back to file_system"]
/// );
///
/// // The same with a policy minimum of `application` fails the job.
/// assert!(resolve(Level::Application, Level::Application, &observed).is_err());
/// ```
pub fn resolve(wanted: Level, minimum: Level, observed: &Observed) -> Result<Outcome> {
    check_wanted(wanted, minimum)?;
    let warnings = observed
        .post_script_failures
        .iter()
        .map(|r| {
            format!(
                "{} (the snapshot was already taken; level unchanged)",
                r.describe()
            )
        })
        .collect();
    if wanted == Level::Crash {
        return Ok(Outcome {
            level: Level::Crash,
            reasons: Vec::new(),
            warnings,
        });
    }
    if let Some(reason) = &observed.agent_unreachable {
        let reasons = vec![format!(
            "agent unreachable: {reason}; falling back to crash"
        )];
        check_minimum(Level::Crash, minimum, &reasons)?;
        return Ok(Outcome {
            level: Level::Crash,
            reasons,
            warnings,
        });
    }
    let (mut level, mut reasons) =
        after_pre_scripts(wanted, &observed.pre_scripts, observed.continue_on_failure)?;
    let freeze_reason = match &observed.freeze {
        FreezeObserved::Held => None,
        FreezeObserved::NotAttempted => Some("the file systems were not frozen".to_string()),
        FreezeObserved::Disabled => {
            Some("fsfreeze is disabled in the agent's configuration".to_string())
        }
        FreezeObserved::Failed { reason } => Some(format!("freeze failed: {reason}")),
        FreezeObserved::NotHeldContinuously { reason } => Some(format!(
            "the freeze was not held continuously until the thaw: {reason}"
        )),
    };
    if let Some(why) = freeze_reason {
        reasons.push(format!("{why}; falling back to crash from {level}"));
        level = Level::Crash;
    }
    check_minimum(level, minimum, &reasons)?;
    Ok(Outcome {
        level,
        reasons,
        warnings,
    })
}

fn check_wanted(wanted: Level, minimum: Level) -> Result<()> {
    if wanted < minimum {
        return Err(Error::WantedBelowMinimum { wanted, minimum });
    }
    Ok(())
}

fn check_minimum(reached: Level, minimum: Level, reasons: &[String]) -> Result<()> {
    if reached < minimum {
        return Err(Error::BelowMinimum {
            reached,
            minimum,
            reasons: reasons.to_vec(),
        });
    }
    Ok(())
}

#[cfg(test)]
#[path = "fallback_tests.rs"]
mod tests;
