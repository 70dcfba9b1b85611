//! TOML → [`Policy`]: deserialization into raw, spanned structures, then validation with
//! file/line/field error messages.

use std::ops::Range;

use bulwark_consistency::Level;
use jiff::civil::{Time, Weekday};
use jiff::tz::TimeZone;
use serde::Deserialize;
use toml::{Spanned, Value};

use crate::retention::{
    DAILY_MAX, DayOfMonth, INSTANT_RESTORE_DEFAULT, INSTANT_RESTORE_MAX_DAILY,
    INSTANT_RESTORE_MAX_HOURLY, MONTHLY_MAX, MonthlyRule, Retention, SOFT_DELETE_DEFAULT,
    SOFT_DELETE_MAX, WEEKLY_MAX, WeeklyRule, YEARLY_MAX, YearlyRule,
};
use crate::schedule::{HOURLY_INTERVALS, Schedule};
use crate::{
    BLOCK_SIZE_DEFAULT, BLOCK_SIZE_MAX, BLOCK_SIZE_MIN, Consistency, Error, NAME_MAX, Policy,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    name: Option<Spanned<String>>,
    time_zone: Spanned<String>,
    block_size: Option<Spanned<Value>>,
    schedule: Spanned<RawSchedule>,
    retention: Spanned<RawRetention>,
    consistency: Option<Spanned<RawConsistency>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchedule {
    frequency: Spanned<String>,
    times: Option<Spanned<Vec<Spanned<String>>>>,
    weekdays: Option<Spanned<Vec<Spanned<String>>>>,
    every_hours: Option<Spanned<i64>>,
    window_start: Option<Spanned<String>>,
    window_hours: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetention {
    daily: Option<Spanned<i64>>,
    weekly: Option<Spanned<RawWeekly>>,
    monthly: Option<Spanned<RawMonthly>>,
    yearly: Option<Spanned<RawYearly>>,
    instant_restore_days: Option<Spanned<i64>>,
    soft_delete_days: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWeekly {
    count: Spanned<i64>,
    weekday: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMonthly {
    count: Spanned<i64>,
    day: Option<Spanned<Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawYearly {
    count: Spanned<i64>,
    month: Option<Spanned<String>>,
    day: Option<Spanned<Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConsistency {
    wanted: Option<Spanned<String>>,
    minimum: Option<Spanned<String>>,
}

/// The text being parsed and its display name, to turn spans into `file:line`.
struct Ctx<'a> {
    text: &'a str,
    file: &'a str,
}

impl Ctx<'_> {
    fn line(&self, span: &Range<usize>) -> usize {
        line_of(self.text, span.start)
    }

    fn invalid(&self, span: &Range<usize>, field: &str, message: impl Into<String>) -> Error {
        Error::Invalid {
            file: self.file.to_string(),
            line: self.line(span),
            field: field.to_string(),
            message: message.into(),
        }
    }

    /// A field that `frequency` does not allow.
    fn not_for(&self, span: &Range<usize>, field: &str, frequency: &str, hint: &str) -> Error {
        self.invalid(
            span,
            field,
            format!(
                "not allowed for {} {frequency} schedule{hint}",
                article(frequency)
            ),
        )
    }
}

fn article(word: &str) -> &'static str {
    if word.starts_with('h') || word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// 1-based line of a byte offset (clamped to the text).
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

pub(crate) fn parse(text: &str, file: &str) -> Result<Policy, Error> {
    let cx = Ctx { text, file };
    // First as plain TOML, so that syntax errors are told apart from shape errors.
    if let Err(e) = toml::from_str::<toml::Table>(text) {
        return Err(Error::Syntax {
            file: file.to_string(),
            line: e.span().map_or(1, |s| line_of(text, s.start)),
            message: first_line(e.message()),
        });
    }
    let raw: RawPolicy = toml::from_str(text).map_err(|e| shape_error(&cx, &e))?;
    validate(&cx, raw)
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").trim().to_string()
}

/// Turns a deserialization error into [`Error::UnknownField`] or [`Error::Shape`], finding the
/// field's dotted path from the text around the span.
fn shape_error(cx: &Ctx<'_>, e: &toml::de::Error) -> Error {
    let message = first_line(e.message());
    let span = e.span().unwrap_or(0..0);
    let line = cx.line(&span);
    let file = cx.file.to_string();
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let name = rest.split('`').next().unwrap_or("");
        let allowed = rest
            .split_once("expected ")
            .map(|(_, a)| a.trim_start_matches("one of ").to_string())
            .unwrap_or_else(|| "none".to_string());
        return Error::UnknownField {
            file,
            line,
            field: field_path(cx.text, &span, Some(name)),
            allowed,
        };
    }
    if let Some(rest) = message.strip_prefix("missing field `") {
        let name = rest.split('`').next().unwrap_or("");
        let table = table_path(cx.text, &span);
        let field = if table.is_empty() {
            name.to_string()
        } else {
            format!("{table}.{name}")
        };
        return Error::Shape {
            file,
            line,
            field,
            message: format!("required field `{name}` is missing"),
        };
    }
    Error::Shape {
        file,
        line,
        field: field_path(cx.text, &span, None),
        message: message
            .replace("expected i64", "expected an integer")
            .replace("expected u8", "expected an integer"),
    }
}

/// The `[table]` header in force at `span` (text of the nearest header line at or before the
/// span's line; empty for the root table). When the span starts at a header line, that header.
fn table_path(text: &str, span: &Range<usize>) -> String {
    let start = span.start.min(text.len());
    let upto = text.get(..start).unwrap_or("");
    let this_line_end = text
        .get(start..)
        .and_then(|r| r.find('\n'))
        .map_or(text.len(), |i| start + i);
    let scope = text.get(..this_line_end).unwrap_or(upto);
    for line in scope.lines().rev() {
        let t = line.trim();
        if t.starts_with('[') {
            return t
                .trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("")
                .trim()
                .to_string();
        }
    }
    String::new()
}

fn is_bare_key(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
}

/// Best-effort dotted path of the key at (or whose value is at) `span`. `key` is the key's
/// name when it is known (unknown-field errors); otherwise the key before the nearest `=` to
/// the left of the span on its line. Inline tables (`weekly = { count = 4 }`) add their key.
fn field_path(text: &str, span: &Range<usize>, key: Option<&str>) -> String {
    let start = span.start.min(text.len());
    let line_start = text
        .get(..start)
        .and_then(|t| t.rfind('\n'))
        .map_or(0, |i| i + 1);
    let before = text.get(line_start..start).unwrap_or("");
    let key = match key {
        // A dotted key (`schedule.every_hour = 4`): the span is on its last part.
        Some(k) => match before.trim_start() {
            prefix if prefix.ends_with('.') && is_bare_key(prefix) => format!("{prefix}{k}"),
            _ => k.to_string(),
        },
        None => before
            .rfind('=')
            .and_then(|i| before.get(..i))
            .map(|b| {
                b.trim_end()
                    .rsplit(|c: char| c == '{' || c == ',' || c.is_whitespace())
                    .next()
                    .unwrap_or("")
                    .trim_matches('"')
                    .to_string()
            })
            .unwrap_or_default(),
    };
    // The inline table the key sits in: `outer = { ... key`.
    let inline = before.find('{').and_then(|brace| {
        let head = before.get(..brace)?.trim_end().strip_suffix('=')?.trim();
        is_bare_key(head).then(|| head.to_string())
    });
    let table = table_path(text, span);
    let mut parts: Vec<&str> = Vec::new();
    if !table.is_empty() {
        parts.push(&table);
    }
    if let Some(i) = inline.as_deref() {
        parts.push(i);
    }
    if is_bare_key(&key) {
        parts.push(&key);
    }
    if parts.is_empty() {
        "(policy)".to_string()
    } else {
        parts.join(".")
    }
}

/// Parses `HH:MM` (00:00 to 23:59).
fn parse_time(cx: &Ctx<'_>, s: &Spanned<String>, field: &str) -> Result<Time, Error> {
    let bad = || {
        cx.invalid(
            &s.span(),
            field,
            format!(
                "time must be \"HH:MM\" from 00:00 to 23:59, got {:?}",
                s.get_ref()
            ),
        )
    };
    let (h, m) = s.get_ref().trim().split_once(':').ok_or_else(bad)?;
    let two_digits = |x: &str| x.len() == 2 && x.bytes().all(|b| b.is_ascii_digit());
    if !two_digits(h) || !two_digits(m) {
        return Err(bad());
    }
    let h: i8 = h.parse().map_err(|_| bad())?;
    let m: i8 = m.parse().map_err(|_| bad())?;
    if !(0..24).contains(&h) || !(0..60).contains(&m) {
        return Err(bad());
    }
    Time::new(h, m, 0, 0).map_err(|_| bad())
}

const WEEKDAYS: [(&str, Weekday); 7] = [
    ("monday", Weekday::Monday),
    ("tuesday", Weekday::Tuesday),
    ("wednesday", Weekday::Wednesday),
    ("thursday", Weekday::Thursday),
    ("friday", Weekday::Friday),
    ("saturday", Weekday::Saturday),
    ("sunday", Weekday::Sunday),
];

fn parse_weekday(cx: &Ctx<'_>, s: &Spanned<String>, field: &str) -> Result<Weekday, Error> {
    let given = s.get_ref().trim().to_ascii_lowercase();
    WEEKDAYS
        .iter()
        .find(|(name, _)| *name == given || (given.len() == 3 && name.starts_with(&given)))
        .map(|(_, d)| *d)
        .ok_or_else(|| {
            cx.invalid(
                &s.span(),
                field,
                format!(
                    "weekday must be one of monday, tuesday, wednesday, thursday, friday, \
                     saturday, sunday, got {:?}",
                    s.get_ref()
                ),
            )
        })
}

fn parse_month(cx: &Ctx<'_>, s: &Spanned<String>, field: &str) -> Result<i8, Error> {
    let given = s.get_ref().trim().to_ascii_lowercase();
    (1..=12i8)
        .find(|m| {
            let name = crate::retention::month_name(*m);
            name == given || (given.len() == 3 && name.starts_with(&given))
        })
        .ok_or_else(|| {
            cx.invalid(
                &s.span(),
                field,
                format!(
                    "month must be one of january, february, march, april, may, june, july, \
                     august, september, october, november, december, got {:?}",
                    s.get_ref()
                ),
            )
        })
}

fn parse_day(cx: &Ctx<'_>, v: Option<&Spanned<Value>>, field: &str) -> Result<DayOfMonth, Error> {
    let Some(v) = v else {
        return Ok(DayOfMonth::Day(1));
    };
    match v.get_ref() {
        Value::Integer(d) if (1..=28).contains(d) => {
            Ok(DayOfMonth::Day(u8::try_from(*d).unwrap_or(1)))
        }
        Value::String(s) if s.trim().eq_ignore_ascii_case("last") => Ok(DayOfMonth::Last),
        other => Err(cx.invalid(
            &v.span(),
            field,
            format!(
                "day must be 1 to 28 or \"last\", got {}",
                toml_display(other)
            ),
        )),
    }
}

fn toml_display(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

fn count(cx: &Ctx<'_>, v: &Spanned<i64>, field: &str, what: &str, max: u32) -> Result<u32, Error> {
    let n = *v.get_ref();
    if n < 1 || n > i64::from(max) {
        return Err(cx.invalid(
            &v.span(),
            field,
            format!("{what} must be 1 to {max}, got {n}"),
        ));
    }
    u32::try_from(n).map_err(|_| cx.invalid(&v.span(), field, "out of range"))
}

fn parse_level(cx: &Ctx<'_>, s: &Spanned<String>, field: &str) -> Result<Level, Error> {
    s.get_ref().parse::<Level>().map_err(|_| {
        cx.invalid(
            &s.span(),
            field,
            format!(
                "consistency level must be one of crash, file_system, application, got {:?}",
                s.get_ref()
            ),
        )
    })
}

fn parse_block_size(cx: &Ctx<'_>, v: &Spanned<Value>) -> Result<u32, Error> {
    let bad = || {
        cx.invalid(
            &v.span(),
            "block_size",
            format!(
                "block size must be a power of two from 64 KiB to 16 MiB (for example \"1MiB\", \
                 \"256KiB\" or 1048576), got {}",
                toml_display(v.get_ref())
            ),
        )
    };
    let bytes: u64 = match v.get_ref() {
        Value::Integer(n) => u64::try_from(*n).map_err(|_| bad())?,
        Value::String(s) => {
            let s = s.trim();
            let (num, mult) = if let Some(n) = s.strip_suffix("MiB") {
                (n, 1024 * 1024)
            } else if let Some(n) = s.strip_suffix("KiB") {
                (n, 1024)
            } else {
                (s, 1)
            };
            let n: u64 = num.trim().parse().map_err(|_| bad())?;
            n.checked_mul(mult).ok_or_else(bad)?
        }
        _ => return Err(bad()),
    };
    if !bytes.is_power_of_two()
        || bytes < u64::from(BLOCK_SIZE_MIN)
        || bytes > u64::from(BLOCK_SIZE_MAX)
    {
        return Err(bad());
    }
    u32::try_from(bytes).map_err(|_| bad())
}

fn validate(cx: &Ctx<'_>, raw: RawPolicy) -> Result<Policy, Error> {
    let name = match &raw.name {
        None => None,
        Some(n) => {
            let s = n.get_ref();
            let ok = !s.is_empty()
                && s.len() <= NAME_MAX
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
                && s != "."
                && s != "..";
            if !ok {
                return Err(cx.invalid(
                    &n.span(),
                    "name",
                    format!(
                        "name must be 1 to {NAME_MAX} characters of letters, digits, '.', '_' \
                         and '-', got {s:?}"
                    ),
                ));
            }
            Some(s.clone())
        }
    };

    let zone = raw.time_zone.get_ref().trim();
    // `localtime` and `posixrules` are files of the host's zoneinfo directory that stand for
    // whatever the host is configured with: a policy must not change with the machine.
    let host_dependent = ["localtime", "posixrules"]
        .iter()
        .any(|n| n.eq_ignore_ascii_case(zone));
    let time_zone = TimeZone::get(zone)
        .ok()
        .filter(|_| !host_dependent)
        .ok_or_else(|| Error::UnknownTimeZone {
            file: cx.file.to_string(),
            line: cx.line(&raw.time_zone.span()),
            field: "time_zone".to_string(),
            zone: raw.time_zone.get_ref().clone(),
        })?;

    let block_size = match &raw.block_size {
        None => BLOCK_SIZE_DEFAULT,
        Some(v) => parse_block_size(cx, v)?,
    };

    let schedule_span = raw.schedule.span();
    let schedule = validate_schedule(cx, raw.schedule.into_inner(), &schedule_span)?;
    let retention_span = raw.retention.span();
    let retention = validate_retention(
        cx,
        raw.retention.into_inner(),
        &retention_span,
        schedule.is_hourly(),
    )?;

    let mut consistency = Consistency {
        wanted: Level::Application,
        minimum: Level::Crash,
    };
    if let Some(c) = raw.consistency {
        let c = c.into_inner();
        if let Some(w) = &c.wanted {
            consistency.wanted = parse_level(cx, w, "consistency.wanted")?;
        }
        if let Some(m) = &c.minimum {
            consistency.minimum = parse_level(cx, m, "consistency.minimum")?;
            if consistency.minimum > consistency.wanted {
                return Err(cx.invalid(
                    &m.span(),
                    "consistency.minimum",
                    format!(
                        "minimum {} is above wanted {}; the minimum must be at or below the \
                         wanted level (crash < file_system < application)",
                        consistency.minimum, consistency.wanted
                    ),
                ));
            }
        }
    }

    Ok(Policy {
        name,
        file: cx.file.to_string(),
        time_zone,
        schedule,
        retention,
        consistency,
        block_size,
    })
}

fn parse_times(
    cx: &Ctx<'_>,
    times: Option<&Spanned<Vec<Spanned<String>>>>,
    table: &Range<usize>,
    frequency: &str,
) -> Result<Vec<Time>, Error> {
    let missing = |span: &Range<usize>| {
        cx.invalid(
            span,
            "schedule.times",
            format!(
                "a {frequency} schedule needs at least one time, such as times = [\"02:30\"] \
                 (\"HH:MM\", 00:00 to 23:59)"
            ),
        )
    };
    let Some(list) = times else {
        return Err(missing(table));
    };
    if list.get_ref().is_empty() {
        return Err(missing(&list.span()));
    }
    let mut out: Vec<Time> = Vec::new();
    for s in list.get_ref() {
        let t = parse_time(cx, s, "schedule.times")?;
        if out.contains(&t) {
            return Err(cx.invalid(
                &s.span(),
                "schedule.times",
                format!("time {:?} is listed twice", s.get_ref()),
            ));
        }
        out.push(t);
    }
    out.sort();
    Ok(out)
}

fn validate_schedule(
    cx: &Ctx<'_>,
    raw: RawSchedule,
    table: &Range<usize>,
) -> Result<Schedule, Error> {
    let frequency = raw.frequency.get_ref().trim().to_ascii_lowercase();
    match frequency.as_str() {
        "daily" | "weekly" => {
            if let Some(v) = &raw.every_hours {
                return Err(cx.not_for(
                    &v.span(),
                    "schedule.every_hours",
                    &frequency,
                    " (only for frequency = \"hourly\")",
                ));
            }
            if let Some(v) = &raw.window_start {
                return Err(cx.not_for(
                    &v.span(),
                    "schedule.window_start",
                    &frequency,
                    " (only for frequency = \"hourly\")",
                ));
            }
            if let Some(v) = &raw.window_hours {
                return Err(cx.not_for(
                    &v.span(),
                    "schedule.window_hours",
                    &frequency,
                    " (only for frequency = \"hourly\")",
                ));
            }
            let times = parse_times(cx, raw.times.as_ref(), table, &frequency)?;
            if frequency == "daily" {
                if let Some(v) = &raw.weekdays {
                    return Err(cx.not_for(
                        &v.span(),
                        "schedule.weekdays",
                        "daily",
                        " (only for frequency = \"weekly\")",
                    ));
                }
                return Ok(Schedule::Daily { times });
            }
            let missing = |span: &Range<usize>| {
                cx.invalid(
                    span,
                    "schedule.weekdays",
                    "a weekly schedule needs at least one weekday, such as weekdays = \
                     [\"sunday\"] (monday to sunday)",
                )
            };
            let Some(list) = &raw.weekdays else {
                return Err(missing(table));
            };
            if list.get_ref().is_empty() {
                return Err(missing(&list.span()));
            }
            let mut weekdays = Vec::new();
            for s in list.get_ref() {
                let d = parse_weekday(cx, s, "schedule.weekdays")?;
                if weekdays.contains(&d) {
                    return Err(cx.invalid(
                        &s.span(),
                        "schedule.weekdays",
                        format!("weekday {:?} is listed twice", s.get_ref()),
                    ));
                }
                weekdays.push(d);
            }
            weekdays.sort_by_key(|d| d.to_monday_zero_offset());
            Ok(Schedule::Weekly { weekdays, times })
        }
        "hourly" => {
            if let Some(v) = &raw.times {
                return Err(cx.not_for(
                    &v.span(),
                    "schedule.times",
                    "hourly",
                    " (use window_start, window_hours and every_hours)",
                ));
            }
            if let Some(v) = &raw.weekdays {
                return Err(cx.not_for(
                    &v.span(),
                    "schedule.weekdays",
                    "hourly",
                    " (only for frequency = \"weekly\")",
                ));
            }
            let Some(every) = &raw.every_hours else {
                return Err(cx.invalid(
                    table,
                    "schedule.every_hours",
                    "an hourly schedule needs every_hours, one of 4, 6, 8, 12, 24",
                ));
            };
            let every_hours = HOURLY_INTERVALS
                .iter()
                .copied()
                .find(|h| i64::from(*h) == *every.get_ref())
                .ok_or_else(|| {
                    cx.invalid(
                        &every.span(),
                        "schedule.every_hours",
                        format!(
                            "hourly interval must be one of 4, 6, 8, 12, 24, got {}",
                            every.get_ref()
                        ),
                    )
                })?;
            let window_start = match &raw.window_start {
                None => Time::midnight(),
                Some(s) => parse_time(cx, s, "schedule.window_start")?,
            };
            let window_hours = match &raw.window_hours {
                None => 24,
                Some(v) => {
                    let h = *v.get_ref();
                    if !(1..=24).contains(&h) {
                        return Err(cx.invalid(
                            &v.span(),
                            "schedule.window_hours",
                            format!(
                                "the window must last 1 to 24 hours (it repeats every day), \
                                 got {h}"
                            ),
                        ));
                    }
                    u8::try_from(h).unwrap_or(24)
                }
            };
            Ok(Schedule::Hourly {
                every_hours,
                window_start,
                window_hours,
            })
        }
        _ => Err(cx.invalid(
            &raw.frequency.span(),
            "schedule.frequency",
            format!(
                "frequency must be one of \"daily\", \"weekly\", \"hourly\", got {:?}",
                raw.frequency.get_ref()
            ),
        )),
    }
}

fn validate_retention(
    cx: &Ctx<'_>,
    raw: RawRetention,
    table: &Range<usize>,
    hourly: bool,
) -> Result<Retention, Error> {
    let daily = match &raw.daily {
        None => None,
        Some(v) => Some(count(cx, v, "retention.daily", "daily count", DAILY_MAX)?),
    };
    let weekly = match &raw.weekly {
        None => None,
        Some(w) => {
            let w = w.get_ref();
            Some(WeeklyRule {
                count: count(
                    cx,
                    &w.count,
                    "retention.weekly.count",
                    "weekly count",
                    WEEKLY_MAX,
                )?,
                weekday: match &w.weekday {
                    None => Weekday::Sunday,
                    Some(s) => parse_weekday(cx, s, "retention.weekly.weekday")?,
                },
            })
        }
    };
    let monthly = match &raw.monthly {
        None => None,
        Some(m) => {
            let m = m.get_ref();
            Some(MonthlyRule {
                count: count(
                    cx,
                    &m.count,
                    "retention.monthly.count",
                    "monthly count",
                    MONTHLY_MAX,
                )?,
                day: parse_day(cx, m.day.as_ref(), "retention.monthly.day")?,
            })
        }
    };
    let yearly = match &raw.yearly {
        None => None,
        Some(y) => {
            let y = y.get_ref();
            Some(YearlyRule {
                count: count(
                    cx,
                    &y.count,
                    "retention.yearly.count",
                    "yearly count",
                    YEARLY_MAX,
                )?,
                month: match &y.month {
                    None => 1,
                    Some(s) => parse_month(cx, s, "retention.yearly.month")?,
                },
                day: parse_day(cx, y.day.as_ref(), "retention.yearly.day")?,
            })
        }
    };
    if daily.is_none() && weekly.is_none() && monthly.is_none() && yearly.is_none() {
        return Err(cx.invalid(
            table,
            "retention",
            "at least one of daily, weekly, monthly, yearly is required",
        ));
    }
    let instant_restore_days = match &raw.instant_restore_days {
        None => INSTANT_RESTORE_DEFAULT,
        Some(v) => {
            let (max, kind) = if hourly {
                (INSTANT_RESTORE_MAX_HOURLY, "an hourly")
            } else {
                (INSTANT_RESTORE_MAX_DAILY, "a daily or weekly")
            };
            let n = *v.get_ref();
            if n < 1 || n > i64::from(max) {
                return Err(cx.invalid(
                    &v.span(),
                    "retention.instant_restore_days",
                    format!("instant-restore days must be 1 to {max} for {kind} schedule, got {n}"),
                ));
            }
            u32::try_from(n).unwrap_or(INSTANT_RESTORE_DEFAULT)
        }
    };
    let soft_delete_days = match &raw.soft_delete_days {
        None => SOFT_DELETE_DEFAULT,
        Some(v) => count(
            cx,
            v,
            "retention.soft_delete_days",
            "soft-delete days",
            SOFT_DELETE_MAX,
        )?,
    };
    Ok(Retention {
        daily,
        weekly,
        monthly,
        yearly,
        instant_restore_days,
        soft_delete_days,
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use crate::{Error, Policy};

    const BASE: &str = "\
time_zone = \"Europe/Berlin\"

[schedule]
frequency = \"daily\"
times = [\"02:30\"]

[retention]
daily = 7
";

    /// The error message for `text` (which must be rejected).
    fn error(text: &str) -> String {
        match Policy::from_toml_str(text, "policy.toml") {
            Ok(p) => panic!("accepted:\n{text}\nas\n{p}"),
            Err(e) => e.to_string(),
        }
    }

    fn with(from: &str, to: &str) -> String {
        assert!(BASE.contains(from), "{from}");
        BASE.replacen(from, to, 1)
    }

    #[test]
    fn base_and_example_parse() {
        let p = Policy::from_toml_str(BASE, "policy.toml").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.time_zone_name(), "Europe/Berlin");
        assert_eq!(p.block_size(), 1 << 20);
        assert_eq!(p.retention().instant_restore_days, 2);
        assert_eq!(p.retention().soft_delete_days, 14);
        assert_eq!(p.consistency().wanted, crate::Level::Application);
        assert_eq!(p.consistency().minimum, crate::Level::Crash);

        let text = include_str!("../examples/policy.toml");
        let p =
            Policy::from_toml_str(text, "examples/policy.toml").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            p.to_string(),
            "\
policy gold (examples/policy.toml)
  time zone:       Europe/Berlin
  schedule:        daily at 02:30
  retention:       daily 7, weekly 4 (on sunday), monthly 12 (on last day), yearly 2 (on last day of december)
  instant restore: 2 days
  soft delete:     14 days
  consistency:     wanted application, minimum crash
  block size:      1 MiB"
        );
    }

    #[test]
    fn all_fields_and_spellings() {
        let text = "\
name = \"vm-db_01\"
time_zone = \"America/New_York\"
block_size = 65536

[schedule]
frequency = \"Weekly\"
weekdays = [\"sat\", \"Monday\"]
times = [\"23:59\", \"00:00\"]

[retention.weekly]
count = 5163
weekday = \"sat\"

[retention.monthly]
count = 1188
day = 28

[retention.yearly]
count = 99
month = \"feb\"
day = \"last\"

[retention]
instant_restore_days = 5
soft_delete_days = 180

[consistency]
wanted = \"file_system\"
minimum = \"file_system\"
";
        // (TOML allows [retention] after its sub-tables.)
        let p = Policy::from_toml_str(text, "p.toml").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.name(), Some("vm-db_01"));
        assert_eq!(p.block_size(), 64 * 1024);
        assert_eq!(
            p.schedule().to_string(),
            "weekly on monday, saturday at 00:00, 23:59"
        );
        assert_eq!(
            p.retention().to_string(),
            "weekly 5163 (on saturday), monthly 1188 (on day 28), yearly 99 (on last day of february)"
        );
        let hourly = with(
            "frequency = \"daily\"\ntimes = [\"02:30\"]",
            "frequency = \"hourly\"\nevery_hours = 6\nwindow_start = \"06:30\"\nwindow_hours = 12",
        )
        .replace("daily = 7", "daily = 9999\ninstant_restore_days = 30");
        let p = Policy::from_toml_str(&hourly, "p.toml").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            p.schedule().to_string(),
            "every 6 hours from 06:30 for 12 hours"
        );
        assert_eq!(p.retention().instant_restore_days, 30);
        for (size, bytes) in [
            ("\"16MiB\"", 16u32 << 20),
            ("\"256KiB\"", 256 << 10),
            ("\"1 MiB\"", 1 << 20),
        ] {
            let p = Policy::from_toml_str(&format!("block_size = {size}\n{BASE}"), "p.toml")
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(p.block_size(), bytes);
        }
    }

    #[test]
    fn malformed_toml() {
        assert_eq!(
            error("time_zone = \"Europe/Berlin\"\n[schedule\nfrequency = 1\n"),
            "policy.toml:2: malformed TOML: unclosed table, expected `]`"
        );
        assert_eq!(
            error("time_zone = \"Europe/Berlin\"\nname = \"unterminated\n"),
            "policy.toml:2: malformed TOML: invalid basic string, expected `\"`"
        );
        let e = error(&format!("{BASE}daily = 8\n"));
        assert!(e.starts_with("policy.toml:9: malformed TOML: "), "{e}");
        assert!(matches!(
            Policy::from_toml_str("x = ", "f"),
            Err(Error::Syntax { line: 1, .. })
        ));
    }

    #[test]
    fn unknown_fields() {
        assert_eq!(
            error(&with(
                "times = [\"02:30\"]",
                "times = [\"02:30\"]\nevery_hour = 4"
            )),
            "policy.toml:6: schedule.every_hour: unknown field; allowed here: `frequency`, \
             `times`, `weekdays`, `every_hours`, `window_start`, `window_hours`"
        );
        assert_eq!(
            error(&with(
                "daily = 7",
                "daily = 7\nweekly = { count = 4, wekday = \"sunday\" }"
            )),
            "policy.toml:9: retention.weekly.wekday: unknown field; allowed here: `count` or `weekday`"
        );
        assert_eq!(
            error(&format!("colour = \"red\"\n{BASE}")),
            "policy.toml:1: colour: unknown field; allowed here: `name`, `time_zone`, \
             `block_size`, `schedule`, `retention`, `consistency`"
        );
        assert_eq!(
            error(&format!(
                "{BASE}\n[consistency]\nwanted = \"crash\"\nmaximum = \"crash\"\n"
            )),
            "policy.toml:12: consistency.maximum: unknown field; allowed here: `wanted` or `minimum`"
        );
        assert_eq!(
            error("time_zone = \"UTC\"\nschedule.frequency = \"daily\"\nschedule.timez = []\n"),
            "policy.toml:3: schedule.timez: unknown field; allowed here: `frequency`, \
             `times`, `weekdays`, `every_hours`, `window_start`, `window_hours`"
        );
        assert_eq!(
            error("time_zone = \"UTC\"\nschedule.frequency = 4\n"),
            "policy.toml:2: schedule.frequency: invalid type: integer `4`, expected a string"
        );
    }

    #[test]
    fn wrong_types_and_missing_fields() {
        assert_eq!(
            error(&with("daily = 7", "daily = \"seven\"")),
            "policy.toml:8: retention.daily: invalid type: string \"seven\", expected an integer"
        );
        assert_eq!(
            error(&with(
                "daily = 7",
                "daily = 7\nweekly = { count = \"four\" }"
            )),
            "policy.toml:9: retention.weekly.count: invalid type: string \"four\", expected an integer"
        );
        assert_eq!(
            error(&with("frequency = \"daily\"\n", "")),
            "policy.toml:3: schedule.frequency: required field `frequency` is missing"
        );
        assert_eq!(
            error(&with("time_zone = \"Europe/Berlin\"\n", "")),
            "policy.toml:1: time_zone: required field `time_zone` is missing"
        );
        assert_eq!(
            error(&with("[retention]\ndaily = 7\n", "")),
            "policy.toml:1: retention: required field `retention` is missing"
        );
        assert_eq!(
            error(""),
            "policy.toml:1: time_zone: required field `time_zone` is missing"
        );
    }

    #[test]
    fn impossible_schedules() {
        let hourly = |rest: &str| {
            with(
                "frequency = \"daily\"\ntimes = [\"02:30\"]",
                &format!("frequency = \"hourly\"\n{rest}"),
            )
        };
        assert_eq!(
            error(&hourly("every_hours = 5")),
            "policy.toml:5: schedule.every_hours: hourly interval must be one of 4, 6, 8, 12, 24, got 5"
        );
        assert_eq!(
            error(&hourly("every_hours = 4\nwindow_hours = 25")),
            "policy.toml:6: schedule.window_hours: the window must last 1 to 24 hours (it \
             repeats every day), got 25"
        );
        assert_eq!(
            error(&hourly("every_hours = 4\nwindow_hours = 0")),
            "policy.toml:6: schedule.window_hours: the window must last 1 to 24 hours (it \
             repeats every day), got 0"
        );
        assert_eq!(
            error(&hourly("window_start = \"08:00\"")),
            "policy.toml:3: schedule.every_hours: an hourly schedule needs every_hours, one of 4, 6, 8, 12, 24"
        );
        assert_eq!(
            error(&hourly("every_hours = 4\nwindow_start = \"8am\"")),
            "policy.toml:6: schedule.window_start: time must be \"HH:MM\" from 00:00 to 23:59, got \"8am\""
        );
        assert_eq!(
            error(&hourly("every_hours = 4\ntimes = [\"01:00\"]")),
            "policy.toml:6: schedule.times: not allowed for an hourly schedule (use window_start, \
             window_hours and every_hours)"
        );
        assert_eq!(
            error(&with("times = [\"02:30\"]", "times = []")),
            "policy.toml:5: schedule.times: a daily schedule needs at least one time, such as \
             times = [\"02:30\"] (\"HH:MM\", 00:00 to 23:59)"
        );
        assert_eq!(
            error(&with("times = [\"02:30\"]\n", "")),
            "policy.toml:3: schedule.times: a daily schedule needs at least one time, such as \
             times = [\"02:30\"] (\"HH:MM\", 00:00 to 23:59)"
        );
        for bad in [
            "25:00", "24:00", "12:60", "2:30", "02:30:00", "", "ab:cd", "+1:30",
        ] {
            assert_eq!(
                error(&with("02:30", bad)),
                format!(
                    "policy.toml:5: schedule.times: time must be \"HH:MM\" from 00:00 to 23:59, got {bad:?}"
                )
            );
        }
        assert_eq!(
            error(&with(
                "times = [\"02:30\"]",
                "times = [\"02:30\", \"02:30\"]"
            )),
            "policy.toml:5: schedule.times: time \"02:30\" is listed twice"
        );
        assert_eq!(
            error(&with("frequency = \"daily\"", "frequency = \"weekly\"")),
            "policy.toml:3: schedule.weekdays: a weekly schedule needs at least one weekday, \
             such as weekdays = [\"sunday\"] (monday to sunday)"
        );
        assert_eq!(
            error(&with(
                "frequency = \"daily\"",
                "frequency = \"weekly\"\nweekdays = [\"funday\"]"
            )),
            "policy.toml:5: schedule.weekdays: weekday must be one of monday, tuesday, \
             wednesday, thursday, friday, saturday, sunday, got \"funday\""
        );
        assert_eq!(
            error(&with(
                "frequency = \"daily\"",
                "frequency = \"daily\"\nweekdays = [\"monday\"]"
            )),
            "policy.toml:5: schedule.weekdays: not allowed for a daily schedule (only for \
             frequency = \"weekly\")"
        );
        assert_eq!(
            error(&with(
                "frequency = \"daily\"",
                "frequency = \"daily\"\nevery_hours = 4"
            )),
            "policy.toml:5: schedule.every_hours: not allowed for a daily schedule (only for \
             frequency = \"hourly\")"
        );
        assert_eq!(
            error(&with("frequency = \"daily\"", "frequency = \"monthly\"")),
            "policy.toml:4: schedule.frequency: frequency must be one of \"daily\", \"weekly\", \
             \"hourly\", got \"monthly\""
        );
    }

    #[test]
    fn retention_out_of_range() {
        for (from, to, expected) in [
            (
                "daily = 7",
                "daily = 0",
                "policy.toml:8: retention.daily: daily count must be 1 to 9999, got 0",
            ),
            (
                "daily = 7",
                "daily = 10000",
                "policy.toml:8: retention.daily: daily count must be 1 to 9999, got 10000",
            ),
            (
                "daily = 7",
                "daily = -3",
                "policy.toml:8: retention.daily: daily count must be 1 to 9999, got -3",
            ),
            (
                "daily = 7",
                "weekly = { count = 0 }",
                "policy.toml:8: retention.weekly.count: weekly count must be 1 to 5163, got 0",
            ),
            (
                "daily = 7",
                "monthly = { count = 1189 }",
                "policy.toml:8: retention.monthly.count: monthly count must be 1 to 1188, got 1189",
            ),
            (
                "daily = 7",
                "yearly = { count = 100 }",
                "policy.toml:8: retention.yearly.count: yearly count must be 1 to 99, got 100",
            ),
            (
                "daily = 7",
                "monthly = { count = 12, day = 31 }",
                "policy.toml:8: retention.monthly.day: day must be 1 to 28 or \"last\", got 31",
            ),
            (
                "daily = 7",
                "monthly = { count = 12, day = \"first\" }",
                "policy.toml:8: retention.monthly.day: day must be 1 to 28 or \"last\", got \"first\"",
            ),
            (
                "daily = 7",
                "yearly = { count = 2, month = \"smarch\" }",
                "policy.toml:8: retention.yearly.month: month must be one of january, february, march, april, may, june, july, august, september, october, november, december, got \"smarch\"",
            ),
            (
                "daily = 7",
                "weekly = { count = 2, weekday = \"sundae\" }",
                "policy.toml:8: retention.weekly.weekday: weekday must be one of monday, tuesday, wednesday, thursday, friday, saturday, sunday, got \"sundae\"",
            ),
            (
                "daily = 7",
                "daily = 7\ninstant_restore_days = 6",
                "policy.toml:9: retention.instant_restore_days: instant-restore days must be 1 to 5 for a daily or weekly schedule, got 6",
            ),
            (
                "daily = 7",
                "daily = 7\ninstant_restore_days = 0",
                "policy.toml:9: retention.instant_restore_days: instant-restore days must be 1 to 5 for a daily or weekly schedule, got 0",
            ),
            (
                "daily = 7",
                "daily = 7\nsoft_delete_days = 0",
                "policy.toml:9: retention.soft_delete_days: soft-delete days must be 1 to 180, got 0",
            ),
            (
                "daily = 7",
                "soft_delete_days = 30",
                "policy.toml:7: retention: at least one of daily, weekly, monthly, yearly is required",
            ),
        ] {
            assert_eq!(error(&with(from, to)), expected);
        }
        let hourly = with(
            "frequency = \"daily\"\ntimes = [\"02:30\"]",
            "frequency = \"hourly\"\nevery_hours = 4",
        )
        .replace("daily = 7", "daily = 7\ninstant_restore_days = 31");
        assert_eq!(
            error(&hourly),
            "policy.toml:9: retention.instant_restore_days: instant-restore days must be 1 to 30 for an hourly schedule, got 31"
        );
    }

    #[test]
    fn time_zone_consistency_block_size_name() {
        assert_eq!(
            error(&with("Europe/Berlin", "Mars/Olympus_Mons")),
            "policy.toml:1: time_zone: unknown time zone \"Mars/Olympus_Mons\": expected an IANA \
             name such as \"Europe/Berlin\", \"America/New_York\" or \"UTC\""
        );
        for zone in [
            "localtime",
            "posixrules",
            "",
            "../../etc/passwd",
            "/usr/share/zoneinfo/UTC",
        ] {
            assert!(
                matches!(
                    Policy::from_toml_str(&with("Europe/Berlin", zone), "f"),
                    Err(Error::UnknownTimeZone { .. })
                ),
                "{zone:?}"
            );
        }
        // IANA names are matched without regard to case and shown in their canonical form.
        let p = Policy::from_toml_str(&with("Europe/Berlin", "europe/berlin"), "f");
        assert_eq!(
            p.map(|p| p.time_zone_name().to_string()).ok().as_deref(),
            Some("Europe/Berlin")
        );
        assert!(matches!(
            Policy::from_toml_str(&with("Europe/Berlin", "Europe/Berln"), "f"),
            Err(Error::UnknownTimeZone { zone, line: 1, .. }) if zone == "Europe/Berln"
        ));
        assert_eq!(
            error(&format!(
                "{BASE}\n[consistency]\nwanted = \"file_system\"\nminimum = \"application\"\n"
            )),
            "policy.toml:12: consistency.minimum: minimum application is above wanted \
             file_system; the minimum must be at or below the wanted level (crash < file_system \
             < application)"
        );
        assert_eq!(
            error(&format!(
                "{BASE}\n[consistency]\nminimum = \"application\"\nwanted = \"crash\"\n"
            )),
            "policy.toml:11: consistency.minimum: minimum application is above wanted \
             crash; the minimum must be at or below the wanted level (crash < file_system \
             < application)"
        );
        assert_eq!(
            error(&format!("{BASE}\n[consistency]\nwanted = \"fast\"\n")),
            "policy.toml:11: consistency.wanted: consistency level must be one of crash, \
             file_system, application, got \"fast\""
        );
        for bad in [
            "\"3MiB\"",
            "\"32KiB\"",
            "\"32MiB\"",
            "1000000",
            "-1",
            "\"big\"",
            "true",
        ] {
            let e = error(&format!("block_size = {bad}\n{BASE}"));
            assert!(
                e.starts_with("policy.toml:1: block_size: block size must be a power of two from 64 KiB to 16 MiB"),
                "{e}"
            );
        }
        let e = error(&format!("name = \"../etc\"\n{BASE}"));
        assert_eq!(
            e,
            "policy.toml:1: name: name must be 1 to 64 characters of letters, digits, '.', '_' \
             and '-', got \"../etc\""
        );
    }

    #[test]
    fn errors_expose_line_and_field() {
        let err = Policy::from_toml_str(&with("daily = 7", "daily = 0"), "p.toml");
        let Err(e) = err else { panic!("accepted") };
        assert_eq!(e.line(), 8);
        assert_eq!(e.field(), Some("retention.daily"));
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC*") {
            let _ = Policy::from_toml_str(&text, "fuzz.toml");
        }

        #[test]
        fn mutated_policies_never_panic(
            pos in 0usize..2000,
            len in 0usize..8,
            insert in "[\\[\\]{}=\"',.#\\n a-z0-9:-]{0,12}",
        ) {
            let text = include_str!("../examples/policy.toml");
            let mut bytes = text.as_bytes().to_vec();
            let pos = pos % (bytes.len() + 1);
            let end = (pos + len).min(bytes.len());
            bytes.splice(pos..end, insert.bytes());
            if let Ok(s) = String::from_utf8(bytes) {
                match Policy::from_toml_str(&s, "fuzz.toml") {
                    Ok(p) => {
                        let _ = p.to_string();
                        let _ = p.next_runs(jiff::Timestamp::UNIX_EPOCH, 3);
                    }
                    Err(e) => prop_assert!(e.to_string().starts_with("fuzz.toml:")),
                }
            }
        }
    }
}
