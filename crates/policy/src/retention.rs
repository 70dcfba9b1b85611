//! Grandfather-father-son retention: which recovery points to keep.

use std::collections::BTreeMap;
use std::fmt;

use jiff::Timestamp;
use jiff::civil::{Date, Weekday};
use jiff::tz::TimeZone;

use crate::schedule::weekday_name;

/// Allowed daily count (days).
pub const DAILY_MAX: u32 = 9999;
/// Allowed weekly count (weeks).
pub const WEEKLY_MAX: u32 = 5163;
/// Allowed monthly count (months).
pub const MONTHLY_MAX: u32 = 1188;
/// Allowed yearly count (years).
pub const YEARLY_MAX: u32 = 99;
/// Most instant-restore days for a daily or weekly schedule.
pub const INSTANT_RESTORE_MAX_DAILY: u32 = 5;
/// Most instant-restore days for an hourly schedule.
pub const INSTANT_RESTORE_MAX_HOURLY: u32 = 30;
/// Default instant-restore days.
pub const INSTANT_RESTORE_DEFAULT: u32 = 2;
/// Most soft-delete days.
pub const SOFT_DELETE_MAX: u32 = 180;
/// Default soft-delete days.
pub const SOFT_DELETE_DEFAULT: u32 = 14;

/// A day of the month on which a monthly or yearly point is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DayOfMonth {
    /// Day 1 to 28 (days that every month has).
    Day(u8),
    /// The last day of the month.
    Last,
}

impl DayOfMonth {
    /// The date of this day in the month of `any_day`.
    fn in_month_of(self, any_day: Date) -> Date {
        match self {
            DayOfMonth::Last => any_day.last_of_month(),
            DayOfMonth::Day(d) => {
                let d = i8::try_from(d)
                    .unwrap_or(1)
                    .clamp(1, any_day.days_in_month());
                Date::new(any_day.year(), any_day.month(), d).unwrap_or(any_day)
            }
        }
    }
}

impl fmt::Display for DayOfMonth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DayOfMonth::Day(d) => write!(f, "day {d}"),
            DayOfMonth::Last => f.write_str("last day"),
        }
    }
}

/// Keep one point per ISO week for `count` weeks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeeklyRule {
    /// How many weeks, counting the current one.
    pub count: u32,
    /// The weekday whose point is the week's point.
    pub weekday: Weekday,
}

/// Keep one point per month for `count` months.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MonthlyRule {
    /// How many months, counting the current one.
    pub count: u32,
    /// The day whose point is the month's point.
    pub day: DayOfMonth,
}

/// Keep one point per year for `count` years.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct YearlyRule {
    /// How many years, counting the current one.
    pub count: u32,
    /// The month (1 to 12) whose `day` point is the year's point.
    pub month: i8,
    /// The day in `month`.
    pub day: DayOfMonth,
}

/// Retention of a policy (see the crate documentation for the exact rules).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention {
    /// Keep the last point of each of this many days, counting today.
    pub daily: Option<u32>,
    /// The weekly rule.
    pub weekly: Option<WeeklyRule>,
    /// The monthly rule.
    pub monthly: Option<MonthlyRule>,
    /// The yearly rule.
    pub yearly: Option<YearlyRule>,
    /// Days a host-side snapshot is kept for instant restore (1–5 for daily and weekly
    /// schedules, 1–30 for hourly ones).
    pub instant_restore_days: u32,
    /// Days a pruned point stays soft-deleted before garbage collection may free its blocks.
    pub soft_delete_days: u32,
}

impl fmt::Display for Retention {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(n) = self.daily {
            parts.push(format!("daily {n}"));
        }
        if let Some(w) = self.weekly {
            parts.push(format!(
                "weekly {} (on {})",
                w.count,
                weekday_name(w.weekday)
            ));
        }
        if let Some(m) = self.monthly {
            parts.push(format!("monthly {} (on {})", m.count, m.day));
        }
        if let Some(y) = self.yearly {
            parts.push(format!(
                "yearly {} (on {} of {})",
                y.count,
                y.day,
                month_name(y.month)
            ));
        }
        f.write_str(&parts.join(", "))
    }
}

/// The lower-case English name of a month (1 to 12).
pub(crate) fn month_name(m: i8) -> &'static str {
    const NAMES: [&str; 12] = [
        "january",
        "february",
        "march",
        "april",
        "may",
        "june",
        "july",
        "august",
        "september",
        "october",
        "november",
        "december",
    ];
    usize::try_from(m - 1)
        .ok()
        .and_then(|i| NAMES.get(i))
        .copied()
        .unwrap_or("?")
}

/// A recovery point as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PointInfo {
    /// The point's id (unique per VM).
    pub id: String,
    /// When the point was taken.
    pub time: Timestamp,
}

impl PointInfo {
    /// A point with this id and time.
    pub fn new(id: impl Into<String>, time: Timestamp) -> PointInfo {
        PointInfo {
            id: id.into(),
            time,
        }
    }
}

/// Which rule kept a point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// The newest point is always kept.
    Newest,
    /// The point of this local day.
    Daily(Date),
    /// The point of this ISO week (ISO year, week number).
    Weekly {
        /// ISO week-numbering year.
        year: i16,
        /// ISO week, 1 to 53.
        week: i8,
    },
    /// The point of this month.
    Monthly {
        /// Year.
        year: i16,
        /// Month, 1 to 12.
        month: i8,
    },
    /// The point of this year.
    Yearly(i16),
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Newest => f.write_str("newest"),
            Reason::Daily(d) => write!(f, "daily {d}"),
            Reason::Weekly { year, week } => write!(f, "weekly {year}-W{week:02}"),
            Reason::Monthly { year, month } => write!(f, "monthly {year}-{month:02}"),
            Reason::Yearly(y) => write!(f, "yearly {y}"),
        }
    }
}

/// The points to keep, each with the rules that kept it. Every point not in here may be pruned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeepSet {
    kept: BTreeMap<String, Vec<Reason>>,
}

impl KeepSet {
    /// Whether the point with this id is kept.
    pub fn contains(&self, id: &str) -> bool {
        self.kept.contains_key(id)
    }

    /// The rules that kept this point (sorted, distinct), or `None` if it is not kept.
    pub fn reasons(&self, id: &str) -> Option<&[Reason]> {
        self.kept.get(id).map(Vec::as_slice)
    }

    /// The kept ids, in id order.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.kept.keys().map(String::as_str)
    }

    /// The kept ids with their reasons, in id order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[Reason])> {
        self.kept.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
    }

    /// How many points are kept.
    pub fn len(&self) -> usize {
        self.kept.len()
    }

    /// Whether nothing is kept (only when there were no points).
    pub fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }

    fn add(&mut self, id: &str, reason: Reason) {
        let reasons = self.kept.entry(id.to_string()).or_default();
        if !reasons.contains(&reason) {
            reasons.push(reason);
            reasons.sort();
        }
    }
}

/// A point with its local date.
struct Local<'a> {
    point: &'a PointInfo,
    date: Date,
}

impl Local<'_> {
    /// A total order, so that ties never depend on input order.
    fn key(&self) -> (Timestamp, &str) {
        (self.point.time, self.point.id.as_str())
    }
}

/// The best point of a bucket so far.
struct Candidate<'a, 'p> {
    best: &'a Local<'p>,
    /// Whether `best` was taken on or after the bucket's designated date.
    on_or_after: bool,
}

/// Whether `point` is a better pick for its bucket than `current`. A bucket's point is the
/// first point taken on or after the designated date; when the bucket has no such point (the
/// designated day has not come yet, or its backup failed at the end of the period), the
/// bucket's last point stands in. This is a maximum under a fixed order, so it depends neither
/// on input order nor on which other points of the bucket exist (idempotence).
fn better(current: &Candidate<'_, '_>, point: &Local<'_>, designated: Date) -> bool {
    let after = point.date >= designated;
    match (current.on_or_after, after) {
        (false, true) => true,
        (true, false) => false,
        (true, true) => point.key() < current.best.key(),
        (false, false) => point.key() > current.best.key(),
    }
}

/// For every bucket (`bucket` returns `None` outside the rule's window), its point.
fn select<'a, 'p, K: Ord + Copy>(
    points: &'a [Local<'p>],
    bucket: impl Fn(Date) -> Option<K>,
    designated: impl Fn(Date) -> Date,
) -> BTreeMap<K, &'a Local<'p>> {
    let mut chosen: BTreeMap<K, Candidate<'a, 'p>> = BTreeMap::new();
    for p in points {
        let Some(k) = bucket(p.date) else { continue };
        let d = designated(p.date);
        let candidate = Candidate {
            best: p,
            on_or_after: p.date >= d,
        };
        match chosen.get_mut(&k) {
            None => {
                chosen.insert(k, candidate);
            }
            Some(c) => {
                if better(c, p, d) {
                    *c = candidate;
                }
            }
        }
    }
    chosen.into_iter().map(|(k, c)| (k, c.best)).collect()
}

fn month_index(d: Date) -> i64 {
    i64::from(d.year()) * 12 + i64::from(d.month()) - 1
}

/// Monday of the ISO week of `d`.
fn week_start(d: Date) -> Date {
    let back = i64::from(d.weekday().to_monday_zero_offset());
    d.checked_sub(jiff::Span::new().days(back)).unwrap_or(d)
}

/// Days from `a` to `b` (`b - a`).
fn days_between(a: Date, b: Date) -> i64 {
    a.until(b)
        .map(|s| i64::from(s.get_days()))
        .unwrap_or(i64::MAX)
}

impl Retention {
    /// The points to keep among `points` at time `now`, with local days, weeks, months and
    /// years taken in `tz`. Pure: the result depends only on the arguments, not on their order.
    pub fn keep_set(&self, tz: &TimeZone, points: &[PointInfo], now: Timestamp) -> KeepSet {
        let mut local: Vec<Local<'_>> = points
            .iter()
            .map(|p| Local {
                point: p,
                date: tz.to_datetime(p.time).date(),
            })
            .collect();
        local.sort_by(|a, b| a.key().cmp(&b.key()));
        let mut keep = KeepSet::default();
        let Some(newest) = local.last() else {
            return keep;
        };
        keep.add(&newest.point.id, Reason::Newest);
        let today = tz.to_datetime(now).date();

        if let Some(n) = self.daily {
            let n = i64::from(n);
            // A day's point is its last point; `local` is sorted, so later entries win.
            let mut chosen: BTreeMap<Date, &Local<'_>> = BTreeMap::new();
            for p in local
                .iter()
                .filter(|p| (0..n).contains(&days_between(p.date, today)))
            {
                chosen.insert(p.date, p);
            }
            for (day, p) in chosen {
                keep.add(&p.point.id, Reason::Daily(day));
            }
        }
        if let Some(rule) = self.weekly {
            let n = i64::from(rule.count);
            let this_week = week_start(today);
            let offset = jiff::Span::new().days(i64::from(rule.weekday.to_monday_zero_offset()));
            let chosen = select(
                &local,
                |d| {
                    let ws = week_start(d);
                    let age = days_between(ws, this_week);
                    (0..n.saturating_mul(7)).contains(&age).then_some(ws)
                },
                |d| week_start(d).checked_add(offset).unwrap_or(d),
            );
            for (ws, p) in chosen {
                let iso = ws.iso_week_date();
                keep.add(
                    &p.point.id,
                    Reason::Weekly {
                        year: iso.year(),
                        week: iso.week(),
                    },
                );
            }
        }
        if let Some(rule) = self.monthly {
            let n = i64::from(rule.count);
            let this_month = month_index(today);
            let chosen = select(
                &local,
                |d| {
                    let age = this_month - month_index(d);
                    (0..n).contains(&age).then_some((d.year(), d.month()))
                },
                |d| rule.day.in_month_of(d),
            );
            for ((year, month), p) in chosen {
                keep.add(&p.point.id, Reason::Monthly { year, month });
            }
        }
        if let Some(rule) = self.yearly {
            let n = i64::from(rule.count);
            let this_year = i64::from(today.year());
            let chosen = select(
                &local,
                |d| {
                    let age = this_year - i64::from(d.year());
                    (0..n).contains(&age).then_some(d.year())
                },
                |d| {
                    Date::new(d.year(), rule.month, 1)
                        .map(|first| rule.day.in_month_of(first))
                        .unwrap_or(d)
                },
            );
            for (year, p) in chosen {
                keep.add(&p.point.id, Reason::Yearly(year));
            }
        }
        keep
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use jiff::Timestamp;
    use jiff::civil::{Date, Weekday, date};
    use jiff::tz::TimeZone;
    use proptest::prelude::*;

    use super::*;
    use crate::Policy;

    fn tz(name: &str) -> TimeZone {
        TimeZone::get(name).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// One point a day at `hh:mm` local time from `first` to `last` inclusive, id = the date.
    fn daily_points(zone: &TimeZone, first: Date, last: Date, hh: i8, mm: i8) -> Vec<PointInfo> {
        let mut out = Vec::new();
        let mut d = first;
        while d <= last {
            let t = zone
                .to_ambiguous_timestamp(d.at(hh, mm, 0, 0))
                .compatible()
                .unwrap_or_else(|e| panic!("{d}: {e}"));
            out.push(PointInfo::new(d.to_string(), t));
            d = d.tomorrow().unwrap_or_else(|e| panic!("{e}"));
        }
        out
    }

    fn at(zone: &TimeZone, d: Date, hh: i8) -> Timestamp {
        zone.to_ambiguous_timestamp(d.at(hh, 0, 0, 0))
            .compatible()
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn ids(k: &KeepSet) -> Vec<String> {
        k.ids().map(str::to_string).collect()
    }

    fn reasons(k: &KeepSet, id: &str) -> Vec<String> {
        k.reasons(id)
            .unwrap_or_else(|| panic!("{id} not kept"))
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    fn gfs(monthly_day: DayOfMonth, yearly_month: i8, yearly_day: DayOfMonth) -> Retention {
        Retention {
            daily: Some(7),
            weekly: Some(WeeklyRule {
                count: 4,
                weekday: Weekday::Sunday,
            }),
            monthly: Some(MonthlyRule {
                count: 12,
                day: monthly_day,
            }),
            yearly: Some(YearlyRule {
                count: 2,
                month: yearly_month,
                day: yearly_day,
            }),
            instant_restore_days: 2,
            soft_delete_days: 14,
        }
    }

    /// A year of daily 02:30 points in Europe/Berlin (2025-11-25 .. 2026-11-25, across both
    /// daylight-saving changes), pruned on Wednesday 2026-11-25 at noon with 7 daily, 4 weekly
    /// on Sunday, 12 monthly on the last day, 2 yearly on December 31.
    #[test]
    fn a_year_of_daily_points_gfs_last_day() {
        let berlin = tz("Europe/Berlin");
        let points = daily_points(&berlin, date(2025, 11, 25), date(2026, 11, 25), 2, 30);
        assert_eq!(points.len(), 366);
        let now = at(&berlin, date(2026, 11, 25), 12);
        let keep = gfs(DayOfMonth::Last, 12, DayOfMonth::Last).keep_set(&berlin, &points, now);
        // Hand-computed:
        //   daily 7:    2026-11-19 .. 2026-11-25
        //   weekly 4:   W48 (Nov 23-29, Sunday not yet: its last point, Nov 25), W47 Sun Nov 22,
        //               W46 Sun Nov 15, W45 Sun Nov 8
        //   monthly 12: 2025-12-31, 2026-01-31, 02-28, 03-31, 04-30, 05-31, 06-30, 07-31,
        //               08-31, 09-30, 10-31, and November (30th not yet: Nov 25)
        //   yearly 2:   2025-12-31, and 2026 (Dec 31 not yet: Nov 25)
        let expected = [
            "2025-12-31",
            "2026-01-31",
            "2026-02-28",
            "2026-03-31",
            "2026-04-30",
            "2026-05-31",
            "2026-06-30",
            "2026-07-31",
            "2026-08-31",
            "2026-09-30",
            "2026-10-31",
            "2026-11-08",
            "2026-11-15",
            "2026-11-19",
            "2026-11-20",
            "2026-11-21",
            "2026-11-22",
            "2026-11-23",
            "2026-11-24",
            "2026-11-25",
        ];
        assert_eq!(ids(&keep), expected);
        assert_eq!(
            reasons(&keep, "2026-11-25"),
            [
                "newest",
                "daily 2026-11-25",
                "weekly 2026-W48",
                "monthly 2026-11",
                "yearly 2026"
            ]
        );
        assert_eq!(
            reasons(&keep, "2026-11-22"),
            ["daily 2026-11-22", "weekly 2026-W47"]
        );
        assert_eq!(reasons(&keep, "2026-11-08"), ["weekly 2026-W45"]);
        assert_eq!(reasons(&keep, "2026-03-31"), ["monthly 2026-03"]);
        assert_eq!(
            reasons(&keep, "2025-12-31"),
            ["monthly 2025-12", "yearly 2025"]
        );
    }

    /// The same year with monthly on day 1, yearly on January 1, and a failed Sunday backup.
    #[test]
    fn a_year_of_daily_points_gfs_first_day_and_a_failed_sunday() {
        let berlin = tz("Europe/Berlin");
        let mut points = daily_points(&berlin, date(2025, 11, 25), date(2026, 11, 25), 2, 30);
        points.retain(|p| p.id != "2026-11-15"); // Sunday of W46 failed
        let now = at(&berlin, date(2026, 11, 25), 12);
        let keep = gfs(DayOfMonth::Day(1), 1, DayOfMonth::Day(1)).keep_set(&berlin, &points, now);
        // Hand-computed:
        //   daily 7:    2026-11-19 .. 2026-11-25
        //   weekly 4:   W48 Nov 25 (stand-in), W47 Nov 22, W46: no Sunday, its last point
        //               Sat Nov 14, W45 Nov 8
        //   monthly 12: the 1st of 2025-12 .. 2026-11
        //   yearly 2:   2026-01-01; 2025: the first point on or after Jan 1 2025 (2025-11-25)
        let expected = [
            "2025-11-25",
            "2025-12-01",
            "2026-01-01",
            "2026-02-01",
            "2026-03-01",
            "2026-04-01",
            "2026-05-01",
            "2026-06-01",
            "2026-07-01",
            "2026-08-01",
            "2026-09-01",
            "2026-10-01",
            "2026-11-01",
            "2026-11-08",
            "2026-11-14",
            "2026-11-19",
            "2026-11-20",
            "2026-11-21",
            "2026-11-22",
            "2026-11-23",
            "2026-11-24",
            "2026-11-25",
        ];
        assert_eq!(ids(&keep), expected);
        assert_eq!(reasons(&keep, "2026-11-14"), ["weekly 2026-W46"]);
        assert_eq!(reasons(&keep, "2025-11-25"), ["yearly 2025"]);
        assert_eq!(
            reasons(&keep, "2026-01-01"),
            ["monthly 2026-01", "yearly 2026"]
        );
    }

    #[test]
    fn days_are_local_days() {
        // 2026-11-24T23:30Z is 00:30 on the 25th in Berlin, still the 24th in New York.
        let late: Timestamp = "2026-11-24T23:30:00Z".parse().unwrap_or_default();
        let early: Timestamp = "2026-11-24T12:00:00Z".parse().unwrap_or_default();
        let now: Timestamp = "2026-11-25T20:00:00Z".parse().unwrap_or_default();
        let points = [PointInfo::new("early", early), PointInfo::new("late", late)];
        let r = Retention {
            daily: Some(2),
            weekly: None,
            monthly: None,
            yearly: None,
            instant_restore_days: 2,
            soft_delete_days: 14,
        };
        let berlin = r.keep_set(&tz("Europe/Berlin"), &points, now);
        assert_eq!(reasons(&berlin, "early"), ["daily 2026-11-24"]);
        assert_eq!(reasons(&berlin, "late"), ["newest", "daily 2026-11-25"]);
        let new_york = r.keep_set(&tz("America/New_York"), &points, now);
        assert!(!new_york.contains("early"));
        assert_eq!(reasons(&new_york, "late"), ["newest", "daily 2026-11-24"]);
    }

    #[test]
    fn several_points_a_day_keep_the_last_and_the_first_on_the_designated_day() {
        let utc = tz("UTC");
        // Every 4 hours for two weeks (Mon 2026-11-09 .. Sun 2026-11-22).
        let mut points = Vec::new();
        let mut t = at(&utc, date(2026, 11, 9), 0);
        let end = at(&utc, date(2026, 11, 23), 0);
        while t < end {
            points.push(PointInfo::new(t.to_string(), t));
            t = t
                .checked_add(jiff::SignedDuration::from_hours(4))
                .unwrap_or(end);
        }
        let r = Retention {
            daily: Some(2),
            weekly: Some(WeeklyRule {
                count: 2,
                weekday: Weekday::Sunday,
            }),
            monthly: None,
            yearly: None,
            instant_restore_days: 2,
            soft_delete_days: 14,
        };
        let keep = r.keep_set(&utc, &points, at(&utc, date(2026, 11, 22), 23));
        assert_eq!(
            ids(&keep),
            [
                "2026-11-15T00:00:00Z", // weekly W46: first point on Sunday
                "2026-11-21T20:00:00Z", // daily: last point of Saturday
                "2026-11-22T00:00:00Z", // weekly W47: first point on Sunday
                "2026-11-22T20:00:00Z", // daily and newest
            ]
        );
    }

    #[test]
    fn empty_and_future_points() {
        let utc = tz("UTC");
        let r = gfs(DayOfMonth::Last, 12, DayOfMonth::Last);
        let now = at(&utc, date(2026, 11, 25), 12);
        assert!(r.keep_set(&utc, &[], now).is_empty());
        // A point after `now` (clock skew) is the newest and kept; it counts only for the
        // buckets that contain it and `now`: here none.
        let future = PointInfo::new("future", at(&utc, date(2027, 1, 5), 0));
        let keep = r.keep_set(&utc, &[future], now);
        assert_eq!(reasons(&keep, "future"), ["newest"]);
        assert_eq!(keep.len(), 1);
    }

    #[test]
    fn ends_of_time_do_not_panic() {
        let r = gfs(DayOfMonth::Last, 12, DayOfMonth::Last);
        let points = [
            PointInfo::new("min", Timestamp::MIN),
            PointInfo::new("max", Timestamp::MAX),
            PointInfo::new("epoch", Timestamp::UNIX_EPOCH),
        ];
        for zone in ["UTC", "Europe/Berlin", "Pacific/Kiritimati", "America/Adak"] {
            for now in [Timestamp::MIN, Timestamp::UNIX_EPOCH, Timestamp::MAX] {
                let keep = r.keep_set(&tz(zone), &points, now);
                assert!(keep.contains("max"));
            }
        }
    }

    #[test]
    fn keep_set_via_policy() {
        let text = "time_zone = \"UTC\"\n[schedule]\nfrequency = \"daily\"\ntimes = [\"01:00\"]\n[retention]\ndaily = 3\n";
        let p = Policy::from_toml_str(text, "p.toml").unwrap_or_else(|e| panic!("{e}"));
        let points = daily_points(p.time_zone(), date(2026, 11, 1), date(2026, 11, 10), 1, 0);
        let now = at(p.time_zone(), date(2026, 11, 10), 12);
        let keep = crate::keep_set(&p, &points, now);
        assert_eq!(ids(&keep), ["2026-11-08", "2026-11-09", "2026-11-10"]);
    }

    // ---- properties ----

    fn day_of_month() -> impl Strategy<Value = DayOfMonth> {
        prop_oneof![(1u8..=28).prop_map(DayOfMonth::Day), Just(DayOfMonth::Last)]
    }

    fn weekday() -> impl Strategy<Value = Weekday> {
        (0i8..7).prop_map(|i| Weekday::from_monday_zero_offset(i).unwrap_or(Weekday::Sunday))
    }

    fn retention() -> impl Strategy<Value = Retention> {
        (
            prop::option::of(1u32..40),
            prop::option::of((1u32..12, weekday())),
            prop::option::of((1u32..30, day_of_month())),
            prop::option::of((1u32..4, 1i8..=12, day_of_month())),
        )
            .prop_map(|(daily, weekly, monthly, yearly)| Retention {
                daily,
                weekly: weekly.map(|(count, weekday)| WeeklyRule { count, weekday }),
                monthly: monthly.map(|(count, day)| MonthlyRule { count, day }),
                yearly: yearly.map(|(count, month, day)| YearlyRule { count, month, day }),
                instant_restore_days: 2,
                soft_delete_days: 14,
            })
    }

    /// Points at arbitrary instants over about three years (ids unique), a `now` near the end
    /// (sometimes before the newest point), and a zone.
    fn scenario() -> impl Strategy<Value = (Vec<PointInfo>, Timestamp, TimeZone)> {
        let base = 1_700_000_000i64; // 2023-11-14
        (
            prop::collection::vec(0i64..3 * 365 * 86_400, 0..120),
            -2 * 86_400i64..40 * 86_400,
            prop::sample::select(vec![
                "UTC",
                "Europe/Berlin",
                "America/New_York",
                "Australia/Lord_Howe",
                "Pacific/Kiritimati",
            ]),
        )
            .prop_map(move |(offsets, after_last, zone)| {
                let points: Vec<PointInfo> = offsets
                    .iter()
                    .enumerate()
                    .map(|(i, o)| {
                        PointInfo::new(
                            format!("p{i:03}"),
                            Timestamp::from_second(base + o).unwrap_or_default(),
                        )
                    })
                    .collect();
                let last = offsets.iter().copied().max().unwrap_or(0);
                let now = Timestamp::from_second(base + last + after_last).unwrap_or_default();
                (points, now, tz(zone))
            })
    }

    fn single_rules(r: &Retention) -> Vec<Retention> {
        let none = Retention {
            daily: None,
            weekly: None,
            monthly: None,
            yearly: None,
            ..r.clone()
        };
        let mut out = Vec::new();
        if r.daily.is_some() {
            out.push(Retention {
                daily: r.daily,
                ..none.clone()
            });
        }
        if r.weekly.is_some() {
            out.push(Retention {
                weekly: r.weekly,
                ..none.clone()
            });
        }
        if r.monthly.is_some() {
            out.push(Retention {
                monthly: r.monthly,
                ..none.clone()
            });
        }
        if r.yearly.is_some() {
            out.push(Retention {
                yearly: r.yearly,
                ..none.clone()
            });
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn newest_is_never_dropped((points, now, zone) in scenario(), r in retention()) {
            let keep = r.keep_set(&zone, &points, now);
            prop_assert_eq!(keep.is_empty(), points.is_empty());
            if let Some(newest) = points.iter().max_by_key(|p| (p.time, p.id.clone())) {
                prop_assert!(keep.contains(&newest.id));
                prop_assert!(keep.reasons(&newest.id).is_some_and(|r| r.contains(&Reason::Newest)));
            }
            // Only given ids are kept.
            let given: BTreeSet<&str> = points.iter().map(|p| p.id.as_str()).collect();
            prop_assert!(keep.ids().all(|id| given.contains(id)));
        }

        #[test]
        fn a_point_kept_by_any_single_rule_is_kept((points, now, zone) in scenario(), r in retention()) {
            let keep = r.keep_set(&zone, &points, now);
            for single in single_rules(&r) {
                let part = single.keep_set(&zone, &points, now);
                for (id, reasons) in part.iter() {
                    prop_assert!(keep.contains(id), "{} kept by {:?} alone", id, reasons);
                    let all = keep.reasons(id).unwrap_or_default();
                    prop_assert!(reasons.iter().all(|x| all.contains(x)));
                }
            }
        }

        #[test]
        fn order_does_not_matter(
            (points, now, zone) in scenario(),
            r in retention(),
            seed in any::<u64>(),
        ) {
            let keep = r.keep_set(&zone, &points, now);
            let mut reversed = points.clone();
            reversed.reverse();
            prop_assert_eq!(&r.keep_set(&zone, &reversed, now), &keep);
            // A seeded shuffle (Fisher-Yates with an LCG).
            let mut shuffled = points.clone();
            let mut s = seed;
            for i in (1..shuffled.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let j = usize::try_from(s >> 33).unwrap_or(0) % (i + 1);
                shuffled.swap(i, j);
            }
            prop_assert_eq!(&r.keep_set(&zone, &shuffled, now), &keep);
        }

        #[test]
        fn keep_set_is_idempotent((points, now, zone) in scenario(), r in retention()) {
            let keep = r.keep_set(&zone, &points, now);
            let kept: Vec<PointInfo> = points.iter().filter(|p| keep.contains(&p.id)).cloned().collect();
            let again = r.keep_set(&zone, &kept, now);
            prop_assert_eq!(again.len(), kept.len(), "pruning the kept set dropped points");
            prop_assert_eq!(&again, &keep);
        }

        #[test]
        fn equal_times_are_deterministic(n in 1usize..20, r in retention()) {
            // Many points at the same instant: ties are broken by id, not by position.
            let t = Timestamp::from_second(1_760_000_000).unwrap_or_default();
            let points: Vec<PointInfo> = (0..n).map(|i| PointInfo::new(format!("p{i:02}"), t)).collect();
            let mut reversed = points.clone();
            reversed.reverse();
            let utc = tz("UTC");
            prop_assert_eq!(r.keep_set(&utc, &points, t), r.keep_set(&utc, &reversed, t));
        }
    }

    #[test]
    fn day_of_month_clamps() {
        assert_eq!(
            DayOfMonth::Last.in_month_of(date(2028, 2, 10)),
            date(2028, 2, 29)
        );
        assert_eq!(
            DayOfMonth::Day(28).in_month_of(date(2026, 2, 1)),
            date(2026, 2, 28)
        );
    }
}
