//! bulwark-notify: tells people when backups need them.
//!
//! * [`Event`]: what happened ([`EventKind`]: a failed job, a job completed with warnings, a
//!   consistency below the policy's wish, an overdue VM, a verify that found damage), the VM,
//!   the job, a summary and details. Its `id` is stable for one occurrence, so receivers can
//!   drop duplicates.
//! * [`config`]: the `[notify]` section of the daemon's configuration: webhook and SMTP
//!   routes, each with the event kinds it takes; secrets inline or in files.
//! * [`sign`]: webhooks are POSTed as JSON with an HMAC-SHA256 signature of
//!   `TIMESTAMP.BODY` in a header.
//! * [`Notifier`]: one bounded queue and one worker per route, retries with exponential
//!   backoff ([`backoff`]); [`Notifier::notify`] never waits, so a dead receiver never holds
//!   up a job, and a full queue drops (and counts) instead of growing.
//!
//! ```
//! use bulwark_notify::sign;
//! let body = br#"{"kind":"job_failed"}"#;
//! let header = sign::signature(b"0123456789abcdef", 1_764_381_600, body);
//! assert!(sign::verify(b"0123456789abcdef", 1_764_381_600, body, &header));
//! assert!(!sign::verify(b"another key.....", 1_764_381_600, body, &header));
//! ```

pub mod config;
mod deliver;
mod event;
pub mod sign;

pub use config::{NotifyConfig, RawNotify};
pub use deliver::{Notifier, Stats, backoff};
pub use event::{Event, EventKind};

/// Errors of the notifier.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The HTTP or SMTP client could not be built.
    #[error("notification client: {0}")]
    Client(String),
}
