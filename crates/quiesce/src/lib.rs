//! bulwark-quiesce: the guest side of consistency, used only by the agent. It carries out what
//! the `bulwark-consistency` model plans.
//!
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
//! use bulwark_quiesce::mounts::{freezable_mounts, parse_mountinfo};
//!
//! // Which mounts would the agent freeze? Writable ext3/ext4/xfs/btrfs, nested ones first.
//! let text = "\
//! 22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
//! 23 22 8:2 / /srv/db rw,relatime shared:2 - xfs /dev/sda2 rw
//! 24 22 0:5 / /proc rw,nosuid shared:3 - proc proc rw
//! ";
//! let mounts = parse_mountinfo(text).unwrap();
//! assert_eq!(freezable_mounts(&mounts, &[]), [std::path::PathBuf::from("/srv/db"), "/".into()]);
//! ```

mod error;
pub mod freeze;
pub mod guardian;
pub mod mounts;
pub mod scripts;
pub mod watchdog;

pub use error::{Error, Result};
pub use freeze::{FrozenSet, ThawReport};
pub use watchdog::{FreezeOptions, FreezeReport, WatchedFreeze, recover_frozen_state};
