//! bulwark-consistency: everything about consistency levels that the guest agent and the
//! controller need.
//!
//! * [`Level`]: `crash < file_system < application`.
//! * [`fallback`]: the pure planning and fallback logic — [`plan`] (which steps to run) and
//!   [`resolve`] (which level was reached, with human-readable reasons, or an error below the
//!   policy's minimum).
//! * [`freeze`]: FIFREEZE/FITHAW and [`FrozenSet`], a guard that freezes nested mounts first and
//!   always thaws.
//! * [`mounts`]: `/proc/self/mountinfo` parsing and discovery of freezable mounts.
//! * [`scripts`]: permission checks and a runner for pre/post scripts (timeouts that kill the
//!   process group, retries, bounded output).
//! * [`watchdog`]: [`WatchedFreeze`] (thaw at the deadline, "held continuously" report), the
//!   frozen-state file and [`recover_frozen_state`].
//! * [`guardian`]: a separate process that thaws at the deadline even if the agent is SIGKILLed.
//!
//! ```
//! use bulwark_consistency::{
//!     plan, resolve, AgentStatus, Capabilities, FreezeObserved, Level, Observed,
//!     ScriptsAvailability, Step,
//! };
//!
//! // The controller plans: the agent has fsfreeze but no pre-script.
//! let agent = AgentStatus::Reachable(Capabilities {
//!     freeze: true,
//!     pre_scripts: ScriptsAvailability::NotConfigured,
//!     post_scripts: false,
//! });
//! let p = plan(Level::Application, Level::FileSystem, &agent).unwrap();
//! assert_eq!(p.target, Level::FileSystem);
//! assert_eq!(p.steps, [Step::Freeze, Step::Snapshot, Step::Thaw]);
//!
//! // ... the watchdog fired before the thaw: the point is only crash consistent, which is
//! // below the policy's minimum, so the job fails.
//! let observed = Observed {
//!     freeze: FreezeObserved::NotHeldContinuously {
//!         reason: "the watchdog thawed at the 30s deadline, before the thaw".into(),
//!     },
//!     ..Observed::default()
//! };
//! let err = resolve(Level::FileSystem, Level::FileSystem, &observed).unwrap_err();
//! assert!(err.to_string().contains("below the policy's minimum"));
//! let ok = resolve(Level::FileSystem, Level::Crash, &observed).unwrap();
//! assert_eq!(ok.level, Level::Crash);
//! ```
#![warn(missing_docs)]

mod error;
pub mod fallback;
pub mod freeze;
pub mod guardian;
mod level;
pub mod mounts;
pub mod scripts;
pub mod watchdog;

pub use error::{Error, Result};
pub use fallback::{
    AgentStatus, Capabilities, FreezeObserved, Observed, Outcome, Plan, PreScripts,
    ScriptsAvailability, Step, after_pre_scripts, plan, resolve,
};
pub use freeze::{FrozenSet, ThawReport};
pub use level::{Level, UnknownLevel};
pub use watchdog::{FreezeOptions, FreezeReport, WatchedFreeze, recover_frozen_state};
