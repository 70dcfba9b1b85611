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
