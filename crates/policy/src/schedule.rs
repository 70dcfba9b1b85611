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

#[cfg(test)]
mod tests {
    use jiff::Timestamp;
    use proptest::prelude::*;

    use crate::Policy;

    fn policy(zone: &str, schedule: &str) -> Policy {
        let text =
            format!("time_zone = \"{zone}\"\n[schedule]\n{schedule}\n[retention]\ndaily = 7\n");
        match Policy::from_toml_str(&text, "test.toml") {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        }
    }

    /// The instant of a local wall time (must be unambiguous) in `zone`.
    fn local(zone: &str, civil: &str) -> Timestamp {
        let text = format!("{civil}[{zone}]");
        match text.parse::<jiff::ZonedDateTime>() {
            Ok(z) => z.timestamp(),
            Err(e) => panic!("{text}: {e}"),
        }
    }

    /// All runs in `[from, to)` (local wall times in the policy's zone), displayed with offset.
    fn runs_between(p: &Policy, from: &str, to: &str) -> Vec<String> {
        let zone = p.time_zone_name().to_string();
        let (from, to) = (local(&zone, from), local(&zone, to));
        let start = from
            .checked_sub(jiff::SignedDuration::from_nanos(1))
            .unwrap_or(from);
        p.runs_after(start)
            .take_while(|t| *t < to)
            .map(|t| p.display_time(t))
            .collect()
    }

    fn on_day<'a>(runs: &'a [String], day: &str) -> Vec<&'a str> {
        runs.iter()
            .filter(|r| r.starts_with(day))
            .map(|r| r.as_str())
            .collect()
    }

    fn assert_strictly_increasing(p: &Policy, runs: &[String]) {
        let zone = p.time_zone_name().to_string();
        let ts: Vec<Timestamp> = runs
            .iter()
            .map(|r| {
                r.parse::<jiff::ZonedDateTime>()
                    .map(|z| z.timestamp())
                    .unwrap_or_else(|e| panic!("{r} in {zone}: {e}"))
            })
            .collect();
        assert!(
            ts.windows(2).all(|w| w[0] < w[1]),
            "not increasing: {runs:?}"
        );
    }

    const BERLIN: &str = "Europe/Berlin";
    const NEW_YORK: &str = "America/New_York";

    #[test]
    fn daily_berlin_march_spring_forward() {
        let p = policy(BERLIN, "frequency = \"daily\"\ntimes = [\"02:30\"]");
        let runs = runs_between(&p, "2026-03-01T00:00", "2026-04-01T00:00");
        assert_eq!(runs.len(), 31, "one run a day, none skipped: {runs:?}");
        assert_strictly_increasing(&p, &runs);
        // 2026-03-29 (last Sunday of March): 02:00 CET -> 03:00 CEST; 02:30 does not exist
        // and runs at the end of the gap.
        assert_eq!(
            runs[26..30],
            [
                "2026-03-27T02:30:00+01:00[Europe/Berlin]",
                "2026-03-28T02:30:00+01:00[Europe/Berlin]",
                "2026-03-29T03:00:00+02:00[Europe/Berlin]",
                "2026-03-30T02:30:00+02:00[Europe/Berlin]",
            ]
        );
    }

    #[test]
    fn daily_berlin_october_fall_back_runs_once_at_earlier_instant() {
        let p = policy(BERLIN, "frequency = \"daily\"\ntimes = [\"02:30\"]");
        let runs = runs_between(&p, "2026-10-01T00:00", "2026-11-01T00:00");
        assert_eq!(runs.len(), 31, "one run a day, none doubled: {runs:?}");
        assert_strictly_increasing(&p, &runs);
        // 2026-10-25: 03:00 CEST -> 02:00 CET; 02:30 shows twice and runs only the first time.
        assert_eq!(
            runs[23..26],
            [
                "2026-10-24T02:30:00+02:00[Europe/Berlin]",
                "2026-10-25T02:30:00+02:00[Europe/Berlin]",
                "2026-10-26T02:30:00+01:00[Europe/Berlin]",
            ]
        );
        assert_eq!(
            p.next_runs("2026-10-25T00:00:00Z".parse().unwrap_or_default(), 2)
                .iter()
                .map(|t| t.to_string())
                .collect::<Vec<_>>(),
            ["2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"],
            "no second run at 02:30 CET (01:30Z)"
        );
    }

    #[test]
    fn two_times_inside_one_gap_are_one_run() {
        let p = policy(
            BERLIN,
            "frequency = \"daily\"\ntimes = [\"02:00\", \"02:30\", \"03:00\", \"23:00\"]",
        );
        let runs = runs_between(&p, "2026-03-01T00:00", "2026-04-01T00:00");
        // 4 a day, except on 2026-03-29 where 02:00, 02:30 and 03:00 are all 03:00 CEST.
        assert_eq!(runs.len(), 31 * 4 - 2);
        assert_eq!(
            on_day(&runs, "2026-03-29"),
            [
                "2026-03-29T03:00:00+02:00[Europe/Berlin]",
                "2026-03-29T23:00:00+02:00[Europe/Berlin]",
            ]
        );
        assert_strictly_increasing(&p, &runs);
    }

    #[test]
    fn weekly_berlin_october() {
        let p = policy(
            BERLIN,
            "frequency = \"weekly\"\nweekdays = [\"sunday\", \"wednesday\"]\ntimes = [\"02:30\"]",
        );
        let runs = runs_between(&p, "2026-10-01T00:00", "2026-11-01T00:00");
        assert_eq!(
            runs,
            [
                "2026-10-04T02:30:00+02:00[Europe/Berlin]",
                "2026-10-07T02:30:00+02:00[Europe/Berlin]",
                "2026-10-11T02:30:00+02:00[Europe/Berlin]",
                "2026-10-14T02:30:00+02:00[Europe/Berlin]",
                "2026-10-18T02:30:00+02:00[Europe/Berlin]",
                "2026-10-21T02:30:00+02:00[Europe/Berlin]",
                "2026-10-25T02:30:00+02:00[Europe/Berlin]",
                "2026-10-28T02:30:00+01:00[Europe/Berlin]",
            ]
        );
        let march = runs_between(&p, "2026-03-01T00:00", "2026-04-01T00:00");
        assert_eq!(march.len(), 9); // Sundays 1, 8, 15, 22, 29; Wednesdays 4, 11, 18, 25
        assert_eq!(
            on_day(&march, "2026-03-29"),
            ["2026-03-29T03:00:00+02:00[Europe/Berlin]"]
        );
    }

    #[test]
    fn every_4_hours_berlin_march_and_october() {
        let p = policy(
            BERLIN,
            "frequency = \"hourly\"\nevery_hours = 4\nwindow_start = \"00:00\"\nwindow_hours = 24",
        );
        let march = runs_between(&p, "2026-03-01T00:00", "2026-04-01T00:00");
        assert_eq!(march.len(), 31 * 6);
        assert_strictly_increasing(&p, &march);
        assert_eq!(
            on_day(&march, "2026-03-29"),
            [
                "2026-03-29T00:00:00+01:00[Europe/Berlin]",
                "2026-03-29T04:00:00+02:00[Europe/Berlin]", // 3 hours after the previous run
                "2026-03-29T08:00:00+02:00[Europe/Berlin]",
                "2026-03-29T12:00:00+02:00[Europe/Berlin]",
                "2026-03-29T16:00:00+02:00[Europe/Berlin]",
                "2026-03-29T20:00:00+02:00[Europe/Berlin]",
            ]
        );
        let october = runs_between(&p, "2026-10-01T00:00", "2026-11-01T00:00");
        assert_eq!(october.len(), 31 * 6);
        assert_strictly_increasing(&p, &october);
        assert_eq!(
            on_day(&october, "2026-10-25"),
            [
                "2026-10-25T00:00:00+02:00[Europe/Berlin]",
                "2026-10-25T04:00:00+01:00[Europe/Berlin]", // 5 hours after the previous run
                "2026-10-25T08:00:00+01:00[Europe/Berlin]",
                "2026-10-25T12:00:00+01:00[Europe/Berlin]",
                "2026-10-25T16:00:00+01:00[Europe/Berlin]",
                "2026-10-25T20:00:00+01:00[Europe/Berlin]",
            ]
        );
    }

    #[test]
    fn every_4_hours_with_slots_inside_the_changes() {
        // Slots at 02:00, 06:00, ...: 02:00 is in the gap in March and in the overlap in October.
        let p = policy(
            BERLIN,
            "frequency = \"hourly\"\nevery_hours = 4\nwindow_start = \"02:00\"",
        );
        let march = runs_between(&p, "2026-03-01T00:00", "2026-04-01T00:00");
        assert_eq!(march.len(), 31 * 6);
        assert_eq!(
            on_day(&march, "2026-03-29")[..2],
            [
                "2026-03-29T03:00:00+02:00[Europe/Berlin]",
                "2026-03-29T06:00:00+02:00[Europe/Berlin]",
            ]
        );
        let october = runs_between(&p, "2026-10-01T00:00", "2026-11-01T00:00");
        assert_eq!(october.len(), 31 * 6);
        assert_eq!(
            on_day(&october, "2026-10-25")[..2],
            [
                "2026-10-25T02:00:00+02:00[Europe/Berlin]",
                "2026-10-25T06:00:00+01:00[Europe/Berlin]",
            ]
        );
        assert_strictly_increasing(&p, &october);
    }

    #[test]
    fn new_york_march_and_november() {
        let daily = policy(
            NEW_YORK,
            "frequency = \"daily\"\ntimes = [\"01:30\", \"02:30\"]",
        );
        // 2026-03-08: 02:00 EST -> 03:00 EDT.
        let march = runs_between(&daily, "2026-03-01T00:00", "2026-04-01T00:00");
        assert_eq!(march.len(), 62);
        assert_eq!(
            on_day(&march, "2026-03-08"),
            [
                "2026-03-08T01:30:00-05:00[America/New_York]",
                "2026-03-08T03:00:00-04:00[America/New_York]",
            ]
        );
        // 2026-11-01: 02:00 EDT -> 01:00 EST; 01:30 shows twice and runs once, in EDT.
        let november = runs_between(&daily, "2026-11-01T00:00", "2026-12-01T00:00");
        assert_eq!(november.len(), 60);
        assert_eq!(
            on_day(&november, "2026-11-01"),
            [
                "2026-11-01T01:30:00-04:00[America/New_York]",
                "2026-11-01T02:30:00-05:00[America/New_York]",
            ]
        );

        let hourly = policy(
            NEW_YORK,
            "frequency = \"hourly\"\nevery_hours = 4\nwindow_start = \"01:00\"\nwindow_hours = 24",
        );
        let november = runs_between(&hourly, "2026-11-01T00:00", "2026-12-01T00:00");
        assert_eq!(november.len(), 30 * 6);
        assert_strictly_increasing(&hourly, &november);
        assert_eq!(
            on_day(&november, "2026-11-01"),
            [
                "2026-11-01T01:00:00-04:00[America/New_York]",
                "2026-11-01T05:00:00-05:00[America/New_York]",
                "2026-11-01T09:00:00-05:00[America/New_York]",
                "2026-11-01T13:00:00-05:00[America/New_York]",
                "2026-11-01T17:00:00-05:00[America/New_York]",
                "2026-11-01T21:00:00-05:00[America/New_York]",
            ]
        );
        let march = runs_between(&hourly, "2026-03-01T00:00", "2026-04-01T00:00");
        assert_eq!(march.len(), 31 * 6);
        assert_eq!(
            on_day(&march, "2026-03-08")[..2],
            [
                "2026-03-08T01:00:00-05:00[America/New_York]",
                "2026-03-08T05:00:00-04:00[America/New_York]",
            ]
        );
    }

    #[test]
    fn window_past_midnight_and_short_windows() {
        let p = policy(
            "UTC",
            "frequency = \"hourly\"\nevery_hours = 4\nwindow_start = \"20:00\"\nwindow_hours = 12",
        );
        let runs: Vec<String> = p
            .next_runs(local("UTC", "2026-06-01T12:00"), 4)
            .iter()
            .map(|t| t.to_string())
            .collect();
        assert_eq!(
            runs,
            [
                "2026-06-01T20:00:00Z",
                "2026-06-02T00:00:00Z",
                "2026-06-02T04:00:00Z",
                "2026-06-02T20:00:00Z",
            ]
        );
        // Starting inside a window that began the day before.
        let runs: Vec<String> = p
            .next_runs(local("UTC", "2026-06-02T01:00"), 2)
            .iter()
            .map(|t| t.to_string())
            .collect();
        assert_eq!(runs, ["2026-06-02T04:00:00Z", "2026-06-02T20:00:00Z"]);
        // A window shorter than the interval runs once a day.
        let p = policy(
            "UTC",
            "frequency = \"hourly\"\nevery_hours = 12\nwindow_start = \"06:00\"\nwindow_hours = 4",
        );
        let runs = runs_between(&p, "2026-06-01T00:00", "2026-07-01T00:00");
        assert_eq!(runs.len(), 30);
        // 24-hourly: once a day at the window start.
        let p = policy(
            "UTC",
            "frequency = \"hourly\"\nevery_hours = 24\nwindow_start = \"06:00\"",
        );
        assert_eq!(
            runs_between(&p, "2026-06-01T00:00", "2026-07-01T00:00").len(),
            30
        );
    }

    #[test]
    fn ends_of_time_do_not_panic() {
        let p = policy(
            "Europe/Berlin",
            "frequency = \"weekly\"\nweekdays = [\"monday\"]\ntimes = [\"02:30\"]",
        );
        assert_eq!(p.next_runs(Timestamp::MAX, 3), []);
        assert_eq!(p.next_runs(Timestamp::MIN, 2).len(), 2);
        let near_end = Timestamp::MAX
            .checked_sub(jiff::SignedDuration::from_hours(24 * 20))
            .unwrap_or(Timestamp::MAX);
        assert!(p.next_runs(near_end, 10).len() < 10);
    }

    #[test]
    fn next_runs_is_strictly_after() {
        let p = policy("UTC", "frequency = \"daily\"\ntimes = [\"02:30\"]");
        let at = local("UTC", "2026-06-01T02:30");
        let runs = p.next_runs(at, 1);
        assert_eq!(runs, [local("UTC", "2026-06-02T02:30")]);
        assert_eq!(p.next_runs(at, 0), []);
        assert_eq!(crate::next_runs(&p, at, 3).len(), 3);
    }

    proptest! {
        /// For any month, zone and hourly schedule, runs are strictly increasing and every
        /// local day has exactly its configured runs, across any daylight-saving change.
        #[test]
        fn no_run_is_skipped_or_doubled(
            day in 0i64..730,
            zone in prop::sample::select(vec![
                "UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe",
                "America/Santiago", "Asia/Kolkata", "Europe/London",
            ]),
            every in prop::sample::select(vec![4u8, 6, 8, 12, 24]),
            start_h in 0u8..24,
            start_m in prop::sample::select(vec![0u8, 15, 30]),
            window in 1u8..=24,
        ) {
            let window = window.min(24 - start_h); // keep the window inside one local day
            let p = policy(zone, &format!(
                "frequency = \"hourly\"\nevery_hours = {every}\n\
                 window_start = \"{start_h:02}:{start_m:02}\"\nwindow_hours = {window}"
            ));
            let first = jiff::civil::date(2026, 1, 1)
                .checked_add(jiff::Span::new().days(day))
                .unwrap_or(jiff::civil::date(2026, 1, 1));
            let last = first.checked_add(jiff::Span::new().days(30)).unwrap_or(first);
            let runs = runs_between(&p, &format!("{first}T00:00"), &format!("{last}T00:00"));
            let per_day = usize::from(window.div_ceil(every));
            // The window is clipped to end by midnight, so all its slots fall on its own day.
            prop_assert_eq!(runs.len(), 30 * per_day, "{:?}", runs);
            assert_strictly_increasing(&p, &runs);

            let daily = policy(zone, "frequency = \"daily\"\ntimes = [\"00:15\", \"02:30\", \"12:00\"]");
            let runs = runs_between(&daily, &format!("{first}T00:00"), &format!("{last}T00:00"));
            prop_assert_eq!(runs.len(), 90, "{:?}", runs);
            assert_strictly_increasing(&daily, &runs);
        }
    }
}
