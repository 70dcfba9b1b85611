//! Schedules and the run-time calculation, including the daylight-saving rule.

use std::collections::VecDeque;
use std::fmt;

use jiff::civil::{Date, DateTime, Time, Weekday};
use jiff::tz::{AmbiguousOffset, TimeZone};
use jiff::{SignedDuration, Timestamp};

/// The hourly intervals a schedule may use.
pub const HOURLY_INTERVALS: [u8; 5] = [4, 6, 8, 12, 24];

/// When backups run, in wall-clock time of the policy's time zone.
///
/// See the crate documentation for how wall times that fall into a daylight-saving change are
/// turned into instants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schedule {
    /// Every day at each of `times` (sorted, distinct).
    Daily {
        /// Wall-clock times of day.
        times: Vec<Time>,
    },
    /// On each of `weekdays` at each of `times` (both sorted, distinct).
    Weekly {
        /// Days of the week (Monday first).
        weekdays: Vec<Weekday>,
        /// Wall-clock times of day.
        times: Vec<Time>,
    },
    /// Every `every_hours` hours inside a daily window: at `window_start`, `window_start +
    /// every_hours`, ... for as long as the offset is below `window_hours`. The window may run
    /// past midnight.
    Hourly {
        /// One of [`HOURLY_INTERVALS`].
        every_hours: u8,
        /// Wall-clock start of the window.
        window_start: Time,
        /// Length of the window in hours, 1 to 24.
        window_hours: u8,
    },
}

impl Schedule {
    /// Whether this is an hourly schedule (it allows up to 30 instant-restore days).
    pub fn is_hourly(&self) -> bool {
        matches!(self, Schedule::Hourly { .. })
    }

    /// The wall-clock run times whose window starts on `date`, in increasing order. For an hourly
    /// window that runs past midnight some of them fall on the next day.
    fn wall_times(&self, date: Date) -> Vec<DateTime> {
        match self {
            Schedule::Daily { times } => times.iter().map(|t| date.to_datetime(*t)).collect(),
            Schedule::Weekly { weekdays, times } => {
                if weekdays.contains(&date.weekday()) {
                    times.iter().map(|t| date.to_datetime(*t)).collect()
                } else {
                    Vec::new()
                }
            }
            Schedule::Hourly {
                every_hours,
                window_start,
                window_hours,
            } => {
                let start = date.to_datetime(*window_start);
                let step = i64::from((*every_hours).max(1));
                (0..i64::from(*window_hours))
                    .step_by(usize::try_from(step).unwrap_or(1))
                    .filter_map(|h| start.checked_add(SignedDuration::from_hours(h)).ok())
                    .collect()
            }
        }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let times = |times: &[Time]| {
            times
                .iter()
                .map(|t| hhmm(*t))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self {
            Schedule::Daily { times: t } => write!(f, "daily at {}", times(t)),
            Schedule::Weekly { weekdays, times: t } => {
                let days = weekdays
                    .iter()
                    .map(|d| weekday_name(*d))
                    .collect::<Vec<_>>()
                    .join(", ");
                write!(f, "weekly on {days} at {}", times(t))
            }
            Schedule::Hourly {
                every_hours,
                window_start,
                window_hours,
            } => write!(
                f,
                "every {every_hours} hours from {} for {window_hours} hours",
                hhmm(*window_start)
            ),
        }
    }
}

/// `HH:MM` of a time of day.
pub(crate) fn hhmm(t: Time) -> String {
    format!("{:02}:{:02}", t.hour(), t.minute())
}

/// The lower-case English name of a weekday, as written in policy files.
pub(crate) fn weekday_name(d: Weekday) -> &'static str {
    match d {
        Weekday::Monday => "monday",
        Weekday::Tuesday => "tuesday",
        Weekday::Wednesday => "wednesday",
        Weekday::Thursday => "thursday",
        Weekday::Friday => "friday",
        Weekday::Saturday => "saturday",
        Weekday::Sunday => "sunday",
    }
}

/// The instant at which a wall-clock time of `tz` runs.
///
/// - Unambiguous wall time: its only instant.
/// - Wall time in a spring-forward gap (it never shows on the clock): the first instant after
///   the gap, i.e. the instant of the transition itself (02:30 in Europe/Berlin on the last
///   Sunday of March runs at 03:00 CEST).
/// - Wall time in a fall-back overlap (it shows twice): the earlier instant only.
///
/// `None` only at the ends of the representable time range.
pub fn wall_to_instant(tz: &TimeZone, dt: DateTime) -> Option<Timestamp> {
    match tz.to_ambiguous_timestamp(dt).offset() {
        AmbiguousOffset::Unambiguous { offset } => offset.to_timestamp(dt).ok(),
        AmbiguousOffset::Fold { before, .. } => before.to_timestamp(dt).ok(),
        AmbiguousOffset::Gap { before, .. } => {
            // With the offset from before the gap, the wall time lands after the transition
            // (by as much as it lies inside the gap); the transition is the latest one at or
            // before that instant.
            let past = before.to_timestamp(dt).ok()?;
            let probe = past.checked_add(SignedDuration::from_nanos(1)).ok()?;
            match tz.preceding(probe).next() {
                Some(t) if t.timestamp() <= past => Some(t.timestamp()),
                _ => Some(past),
            }
        }
    }
}

/// How many consecutive days without any run the iterator tolerates before it stops. A valid
/// schedule runs at least once a week, so this is only reached at the end of time.
const MAX_EMPTY_DAYS: u32 = 400;

/// The run instants of a schedule after a given instant, in increasing order, without
/// duplicates. Made by [`Policy::runs_after`](crate::Policy::runs_after).
#[derive(Debug, Clone)]
pub struct Runs<'a> {
    schedule: &'a Schedule,
    tz: &'a TimeZone,
    after: Timestamp,
    next_date: Option<Date>,
    pending: VecDeque<Timestamp>,
    last: Option<Timestamp>,
}

impl<'a> Runs<'a> {
    pub(crate) fn new(schedule: &'a Schedule, tz: &'a TimeZone, after: Timestamp) -> Runs<'a> {
        // Start a day early: a window that began yesterday may still have runs after `after`.
        let local = tz.to_datetime(after).date();
        let next_date = Some(local.yesterday().unwrap_or(local));
        Runs {
            schedule,
            tz,
            after,
            next_date,
            pending: VecDeque::new(),
            last: None,
        }
    }
}

impl Iterator for Runs<'_> {
    type Item = Timestamp;

    fn next(&mut self) -> Option<Timestamp> {
        let mut empty_days = 0;
        loop {
            while let Some(t) = self.pending.pop_front() {
                // Two wall times can map to the same instant (both inside one gap): run once.
                if t > self.after && self.last.is_none_or(|l| t > l) {
                    self.last = Some(t);
                    return Some(t);
                }
            }
            if empty_days > MAX_EMPTY_DAYS {
                return None;
            }
            let date = self.next_date?;
            self.next_date = date.tomorrow().ok();
            let mut instants: Vec<Timestamp> = self
                .schedule
                .wall_times(date)
                .into_iter()
                .filter_map(|dt| wall_to_instant(self.tz, dt))
                .collect();
            instants.sort();
            if instants.iter().all(|t| *t <= self.after) {
                empty_days += 1;
            } else {
                empty_days = 0;
            }
            self.pending.extend(instants);
        }
    }
}
