//! bulwark-consistency: the consistency model the controller, the vault, the policy, the
//! protocol and the guest agent share. Pure data and decisions: no system calls, no I/O.
//!
//! * [`Level`]: `crash < file_system < application`.
//! * [`fallback`]: the planning and fallback logic — [`plan`] (which steps to run) and
//!   [`resolve`] (which level was reached, with human-readable reasons, or an error below the
//!   policy's minimum).
//! * [`scripts`]: what a pre/post script did ([`ScriptReport`](scripts::ScriptReport)), as the
//!   agent reports it and the controller records it.
//!
//! The guest-side code that carries a plan out (fsfreeze, watchdog, guardian process, mount
//! discovery, the script runner) is the `bulwark-quiesce` crate, used only by the agent.
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

mod error;
pub mod fallback;
mod level;
pub mod scripts;

pub use error::{Error, Result};
pub use fallback::{
    AgentStatus, Capabilities, FreezeObserved, Observed, Outcome, Plan, PreScripts,
    ScriptsAvailability, Step, after_pre_scripts, plan, resolve,
};
pub use level::{Level, UnknownLevel};
