//! bulwark-policy: backup policies as a pure model — schedule, retention (grandfather-father-son),
//! consistency wanted, block size. Parse and validate a TOML text, compute the next run times,
//! compute which recovery points to keep. No I/O: the caller reads the file.
//!
//! ```
//! use bulwark_policy::{Policy, PointInfo};
//! use jiff::Timestamp;
//!
//! let text = r#"
//! time_zone = "Europe/Berlin"
//!
//! [schedule]
//! frequency = "daily"
//! times = ["02:30"]
//!
//! [retention]
//! daily = 7
//! weekly = { count = 4, weekday = "sunday" }
//! monthly = { count = 12, day = "last" }
//! "#;
//! let policy = Policy::from_toml_str(text, "policy.toml")?;
//! println!("{policy}"); // the summary `policy check` prints
//!
//! // The next three runs after a given instant (`policy next`).
//! let after: Timestamp = "2026-03-28T12:00:00Z".parse()?;
//! let runs = policy.next_runs(after, 3);
//! // 2026-03-29 is the spring-forward day in Berlin: 02:30 does not exist, so that run
//! // happens at the end of the gap, 03:00 CEST.
//! let shown: Vec<String> = runs.iter().map(|t| policy.display_time(*t)).collect();
//! assert_eq!(shown, [
//!     "2026-03-29T03:00:00+02:00[Europe/Berlin]",
//!     "2026-03-30T02:30:00+02:00[Europe/Berlin]",
//!     "2026-03-31T02:30:00+02:00[Europe/Berlin]",
//! ]);
//!
//! // Which recovery points to keep now.
//! let mut points = Vec::new();
//! for d in 1..=20 {
//!     let time: Timestamp = format!("2026-11-{d:02}T01:30:00Z").parse()?;
//!     points.push(PointInfo::new(format!("p{d:02}"), time));
//! }
//! let now: Timestamp = "2026-11-20T12:00:00Z".parse()?;
//! let keep = policy.keep_set(&points, now);
//! for (id, reasons) in keep.iter() {
//!     let reasons: Vec<String> = reasons.iter().map(|r| r.to_string()).collect();
//!     println!("keep {id}: {}", reasons.join(", "));
//! }
//! assert!(keep.contains("p20")); // the newest point is always kept
//! assert!(keep.contains("p15")); // Sunday 2026-11-15: "weekly 2026-W46"
//! assert!(!keep.contains("p10"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Policy file
//!
//! See `examples/policy.toml` in this crate for a commented example. Fields:
//!
//! | field | meaning |
//! |---|---|
//! | `name` | optional, 1–64 of `[A-Za-z0-9._-]` |
//! | `time_zone` | required IANA name (`"Europe/Berlin"`, `"UTC"`) |
//! | `block_size` | power of two, 64 KiB–16 MiB, as bytes or `"1MiB"`/`"256KiB"`; default 1 MiB |
//! | `schedule.frequency` | `"daily"`, `"weekly"` or `"hourly"` |
//! | `schedule.times` | daily and weekly: `["HH:MM", ...]` |
//! | `schedule.weekdays` | weekly: `["monday", ...]` |
//! | `schedule.every_hours` | hourly: 4, 6, 8, 12 or 24 |
//! | `schedule.window_start`, `schedule.window_hours` | hourly: window start (`"HH:MM"`, default `"00:00"`) and length (1–24 hours, default 24) |
//! | `retention.daily` | 1–9999 days |
//! | `retention.weekly` | `{ count = 1–5163, weekday = "sunday" }` (weekday defaults to sunday) |
//! | `retention.monthly` | `{ count = 1–1188, day = 1–28 or "last" }` (day defaults to 1) |
//! | `retention.yearly` | `{ count = 1–99, month = "january", day = 1–28 or "last" }` (defaults january, 1) |
//! | `retention.instant_restore_days` | 1–5 (daily, weekly schedules) or 1–30 (hourly); default 2 |
//! | `retention.soft_delete_days` | 1–180, default 14 |
//! | `consistency.wanted`, `consistency.minimum` | `crash`, `file_system`, `application`; defaults application and crash; minimum ≤ wanted |
//!
//! Unknown fields are errors. Every error names the file, the line and the field, and says what
//! is allowed: `policy.toml:7: schedule.every_hours: hourly interval must be one of 4, 6, 8, 12,
//! 24, got 5`.
//!
//! # Time zones and daylight saving
//!
//! Run times are wall-clock times in the policy's time zone, resolved with jiff's time zone
//! database: the system's `/usr/share/zoneinfo` (or `TZDIR`), falling back to a copy bundled
//! into the binary when the system has none. Each scheduled wall time runs **exactly once**:
//!
//! - a wall time that does not exist (in the spring-forward gap, e.g. 02:30 on the last Sunday
//!   of March in Europe/Berlin) runs at the first instant after the gap — the transition
//!   itself, 03:00 local time;
//! - a wall time that exists twice (in the fall-back overlap, e.g. 02:30 on the last Sunday of
//!   October in Europe/Berlin) runs once, at the earlier instant (02:30 CEST, not 02:30 CET);
//! - if two scheduled wall times land on the same instant (both inside one gap) they are one
//!   run.
//!
//! Hourly schedules step in wall-clock hours too (`window_start + k * every_hours`), so a day
//! always has the same number of runs; across a change the elapsed time between two runs is
//! one hour shorter or longer than the interval.
//!
//! # Retention
//!
//! [`Policy::keep_set`] keeps, in the policy's time zone and relative to `now`:
//!
//! - **newest**: the newest point, always;
//! - **daily N**: the last point of each of the N calendar days ending with today;
//! - **weekly N on W**: for each of the N ISO weeks (Monday–Sunday) ending with the current
//!   week, the first point taken on or after weekday W of that week;
//! - **monthly N on D**: for each of the N months ending with the current month, the first
//!   point taken on or after day D (or the last day) of that month;
//! - **yearly N on M/D**: for each of the N years ending with the current year, the first
//!   point taken on or after day D of month M.
//!
//! When a week, month or year has no point on or after its designated day (the day has not come
//! yet, or its backup failed at the end of the period), its last point stands in, so a failed
//! Sunday backup does not leave a hole in the weekly history. A point is kept if any rule keeps
//! it; [`KeepSet::reasons`] tells which (`"daily 2026-11-24"`, `"weekly 2026-W47"`,
//! `"monthly 2026-11"`, `"yearly 2026"`, `"newest"`). The result does not depend on the order
//! of the points, and applying it to its own output keeps everything.
//!
//! Instant-restore days and soft-delete days are carried for the controller (snapshot expiry,
//! garbage collection); they do not change the keep-set.

mod error;
mod parse;
mod retention;
mod schedule;

use std::fmt;

pub use bulwark_consistency::Level;
use jiff::Timestamp;
use jiff::tz::TimeZone;

pub use error::Error;
pub use retention::{
    DAILY_MAX, DayOfMonth, INSTANT_RESTORE_DEFAULT, INSTANT_RESTORE_MAX_DAILY,
    INSTANT_RESTORE_MAX_HOURLY, KeepSet, MONTHLY_MAX, MonthlyRule, PointInfo, Reason, Retention,
    SOFT_DELETE_DEFAULT, SOFT_DELETE_MAX, WEEKLY_MAX, WeeklyRule, YEARLY_MAX, YearlyRule,
};
pub use schedule::{HOURLY_INTERVALS, Runs, Schedule, wall_to_instant};

/// Smallest block size (64 KiB).
pub const BLOCK_SIZE_MIN: u32 = 64 * 1024;
/// Largest block size (16 MiB).
pub const BLOCK_SIZE_MAX: u32 = 16 * 1024 * 1024;
/// Default block size (1 MiB).
pub const BLOCK_SIZE_DEFAULT: u32 = 1024 * 1024;
/// Longest policy name.
pub const NAME_MAX: usize = 64;

/// The consistency a policy asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Consistency {
    /// The level to try for.
    pub wanted: Level,
    /// The weakest level accepted; a job that reaches less fails. Always `<= wanted`.
    pub minimum: Level,
}

/// A validated backup policy. Made only by [`Policy::from_toml_str`], so its values are always
/// within the documented bounds.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    name: Option<String>,
    file: String,
    time_zone: TimeZone,
    schedule: Schedule,
    retention: Retention,
    consistency: Consistency,
    block_size: u32,
}

impl Policy {
    /// Parses and validates a policy. `file_name` is only used in error messages and the
    /// summary (pass the path as the user gave it).
    pub fn from_toml_str(text: &str, file_name: &str) -> Result<Policy, Error> {
        parse::parse(text, file_name)
    }

    /// The policy's name, if it has one.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// The display name of the file it was parsed from.
    pub fn file_name(&self) -> &str {
        &self.file
    }

    /// The time zone of the schedule and of retention's days, weeks, months and years.
    pub fn time_zone(&self) -> &TimeZone {
        &self.time_zone
    }

    /// The time zone's IANA name (`"UTC"` if it has none).
    pub fn time_zone_name(&self) -> &str {
        self.time_zone.iana_name().unwrap_or("UTC")
    }

    /// When backups run.
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// What to keep.
    pub fn retention(&self) -> &Retention {
        &self.retention
    }

    /// Consistency wanted and accepted.
    pub fn consistency(&self) -> Consistency {
        self.consistency
    }

    /// Block size in bytes: a power of two from [`BLOCK_SIZE_MIN`] to [`BLOCK_SIZE_MAX`].
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// The run instants strictly after `after`, in increasing order, without duplicates.
    pub fn runs_after(&self, after: Timestamp) -> Runs<'_> {
        Runs::new(&self.schedule, &self.time_zone, after)
    }

    /// The first `count` run instants strictly after `after` (for `policy next --count N`).
    pub fn next_runs(&self, after: Timestamp, count: usize) -> Vec<Timestamp> {
        self.runs_after(after).take(count).collect()
    }

    /// An instant in the policy's time zone, as `2026-03-29T03:00:00+02:00[Europe/Berlin]`.
    pub fn display_time(&self, t: Timestamp) -> String {
        t.to_zoned_datetime(self.time_zone.clone()).to_string()
    }

    /// The points to keep at `now` (see the crate documentation for the rules).
    pub fn keep_set(&self, points: &[PointInfo], now: Timestamp) -> KeepSet {
        self.retention.keep_set(&self.time_zone, points, now)
    }
}

/// A pure function form of [`Policy::next_runs`].
pub fn next_runs(policy: &Policy, after: Timestamp, count: usize) -> Vec<Timestamp> {
    policy.next_runs(after, count)
}

/// A pure function form of [`Policy::keep_set`].
pub fn keep_set(policy: &Policy, points: &[PointInfo], now: Timestamp) -> KeepSet {
    policy.keep_set(points, now)
}

/// Human-readable block size: `1 MiB`, `256 KiB`.
fn size(bytes: u32) -> String {
    if bytes % (1024 * 1024) == 0 {
        format!("{} MiB", bytes / (1024 * 1024))
    } else {
        format!("{} KiB", bytes / 1024)
    }
}

/// The multi-line summary `bulwark-controller policy check` prints.
impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(n) => writeln!(f, "policy {n} ({})", self.file)?,
            None => writeln!(f, "policy {}", self.file)?,
        }
        writeln!(f, "  time zone:       {}", self.time_zone_name())?;
        writeln!(f, "  schedule:        {}", self.schedule)?;
        writeln!(f, "  retention:       {}", self.retention)?;
        writeln!(
            f,
            "  instant restore: {} days",
            self.retention.instant_restore_days
        )?;
        writeln!(
            f,
            "  soft delete:     {} days",
            self.retention.soft_delete_days
        )?;
        writeln!(
            f,
            "  consistency:     wanted {}, minimum {}",
            self.consistency.wanted, self.consistency.minimum
        )?;
        write!(f, "  block size:      {}", size(self.block_size))
    }
}
