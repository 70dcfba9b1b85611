//! What the daemon tells its [`Notifier`]: every job end that needs a person (failed,
//! completed with warnings, consistency below the policy's wish) and every VM that became
//! overdue (no success within its schedule plus the grace period), once per overdue episode.
//!
//! * Job ends come from [`Control::subscribe`]; each event's id is `job-ID-KIND`.
//! * Overdue is checked every few seconds (a quarter of the grace period, between 1 and 30
//!   seconds) from the job history: a VM is overdue when a scheduled run passed more than
//!   `grace` ago with no successful job since (without a success yet, only runs since the
//!   daemon started count). An episode is the time between two successes: the VM is reported
//!   once when it becomes overdue, not at every check, and again only after a success ended
//!   the episode. The id is `overdue-VM-LAST_SUCCESS` (`never` without one), so a receiver
//!   can also drop the repeat a daemon restart makes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bulwark_consistency::Level;
use bulwark_notify::{Event, EventKind, Notifier};
use jiff::{SignedDuration, Timestamp};
use serde_json::json;

use crate::config::VmConfig;
use crate::control::{Control, JobEnded};
use crate::daemon::VmSchedule;
use crate::history::{History, JobState};

/// The events a job end calls for.
pub fn job_events(e: &JobEnded, now: Timestamp) -> Vec<Event> {
    let r = &e.record;
    let mut kinds = Vec::new();
    match r.state {
        JobState::Failed => kinds.push(EventKind::JobFailed),
        JobState::CompletedWithWarnings => kinds.push(EventKind::JobWarnings),
        _ => {}
    }
    let reached = r
        .outcome
        .consistency
        .as_deref()
        .and_then(|c| c.parse::<Level>().ok());
    let wanted = e.consistency_wanted.parse::<Level>().ok();
    let below = matches!(
        r.state,
        JobState::Completed | JobState::CompletedWithWarnings
    ) && matches!((reached, wanted), (Some(a), Some(w)) if a < w);
    if below {
        kinds.push(EventKind::ConsistencyBelow);
    }
    kinds
        .into_iter()
        .map(|kind| {
            let summary = match kind {
                EventKind::JobFailed => format!(
                    "vm {}: job {} failed: {}",
                    r.vm,
                    r.id,
                    r.outcome.error.as_deref().unwrap_or("no error recorded")
                ),
                EventKind::JobWarnings => format!(
                    "vm {}: job {} completed with warnings: {}",
                    r.vm,
                    r.id,
                    r.outcome.consistency_reasons.join("; ")
                ),
                _ => format!(
                    "vm {}: job {} reached {} consistency, the policy wants {}",
                    r.vm,
                    r.id,
                    r.outcome.consistency.as_deref().unwrap_or("?"),
                    e.consistency_wanted
                ),
            };
            Event {
                id: format!("job-{}-{kind}", r.id),
                kind,
                at: now,
                vm: Some(r.vm.clone()),
                job: Some(r.id),
                summary,
                details: json!({
                    "job": r,
                    "consistency_wanted": e.consistency_wanted,
                }),
            }
        })
        .collect()
}

/// The run `vm` is overdue for at `now`: the latest scheduled run after its last success (or
/// after `started` without one) that passed more than `grace` ago.
pub fn missed_run(
    schedule: &VmSchedule,
    last_success: Option<Timestamp>,
    started: Timestamp,
    grace: Duration,
    now: Timestamp,
) -> Option<Timestamp> {
    let since = last_success.unwrap_or(started);
    let grace = SignedDuration::try_from(grace).unwrap_or(SignedDuration::MAX);
    let limit = now.checked_sub(grace).ok()?;
    if limit <= since {
        return None;
    }
    schedule.latest_in(since, limit)
}

/// Remembers, per VM, the episode (its last success) already reported overdue.
#[derive(Debug, Default)]
pub struct OverdueTracker {
    reported: HashMap<String, Option<Timestamp>>,
}

impl OverdueTracker {
    /// Whether an overdue VM (`missed` is `Some`) is to be reported now: the first time in its
    /// episode. A VM that is not overdue forgets its report.
    pub fn check(
        &mut self,
        vm: &str,
        last_success: Option<Timestamp>,
        missed: Option<Timestamp>,
    ) -> bool {
        match missed {
            None => {
                self.reported.remove(vm);
                false
            }
            Some(_) => {
                let before = self.reported.insert(vm.to_string(), last_success);
                before != Some(last_success)
            }
        }
    }
}

/// The event of an overdue VM.
pub fn overdue_event(
    vm: &str,
    last_success: Option<Timestamp>,
    missed: Timestamp,
    grace: Duration,
    now: Timestamp,
) -> Event {
    let episode = last_success.map_or("never".to_string(), |t| t.as_second().to_string());
    let since = match last_success {
        Some(t) => format!("the last success ended {t}"),
        None => "no successful backup yet".to_string(),
    };
    Event {
        id: format!("overdue-{vm}-{episode}"),
        kind: EventKind::VmOverdue,
        at: now,
        vm: Some(vm.to_string()),
        job: None,
        summary: format!(
            "vm {vm}: overdue: the run of {missed} passed {}s ago without a successful backup; {since}",
            now.duration_since(missed).as_secs()
        ),
        details: json!({
            "missed_run": missed,
            "last_success": last_success,
            "grace_seconds": grace.as_secs(),
        }),
    }
}

/// Feeds `notifier` from the daemon: job ends from `control`, overdue VMs from `history`,
/// until the runtime stops.
pub fn spawn(
    notifier: Notifier,
    control: &Control,
    history: History,
    vms: Vec<Arc<VmConfig>>,
    grace: Duration,
    started: Timestamp,
) {
    let mut ended = control.subscribe();
    let n = notifier.clone();
    tokio::spawn(async move {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            match ended.recv().await {
                Ok(e) => {
                    for ev in job_events(&e, Timestamp::now()) {
                        n.notify(ev);
                    }
                }
                Err(RecvError::Lagged(k)) => {
                    tracing::error!(missed = k, "notifications missed job ends")
                }
                Err(RecvError::Closed) => return,
            }
        }
    });
    if !notifier.wants(EventKind::VmOverdue) {
        return;
    }
    let tick = (grace / 4).clamp(Duration::from_secs(1), Duration::from_secs(30));
    tokio::spawn(async move {
        let mut tracker = OverdueTracker::default();
        let mut every = tokio::time::interval(tick);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let now = Timestamp::now();
            for vm in &vms {
                let last = match history.last_success(&vm.name) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(vm = %vm.name, error = %e, "overdue check: cannot read the history");
                        continue;
                    }
                };
                let missed = missed_run(&VmSchedule::of(vm), last, started, grace, now);
                if tracker.check(&vm.name, last, missed)
                    && let Some(m) = missed
                {
                    notifier.notify(overdue_event(&vm.name, last, m, grace, now));
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{JobOutcome, JobRecord, PhaseState, Trigger};

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn ended(state: JobState, consistency: Option<&str>, wanted: &str) -> JobEnded {
        JobEnded {
            record: JobRecord {
                id: 7,
                vm: "web01".into(),
                trigger: Trigger::Scheduled,
                scheduled: None,
                started: t("2026-11-29T02:00:00Z"),
                ended: Some(t("2026-11-29T02:01:00Z")),
                snapshot: PhaseState::Completed,
                transfer: PhaseState::Completed,
                state,
                outcome: JobOutcome {
                    point: None,
                    consistency: consistency.map(String::from),
                    consistency_reasons: vec!["no guest agent".into()],
                    bytes_read: 0,
                    bytes_new: 0,
                    bytes_uploaded: 0,
                    error: Some("disk gone".into()),
                },
            },
            freeze_window_ms: None,
            consistency_wanted: wanted.into(),
        }
    }

    fn kinds(e: &JobEnded) -> Vec<EventKind> {
        job_events(e, t("2026-11-29T03:00:00Z"))
            .iter()
            .map(|e| e.kind)
            .collect()
    }

    #[test]
    fn job_ends_and_their_events() {
        assert_eq!(
            kinds(&ended(JobState::Failed, None, "crash")),
            [EventKind::JobFailed]
        );
        assert!(kinds(&ended(JobState::Completed, Some("crash"), "crash")).is_empty());
        assert!(kinds(&ended(JobState::Cancelled, None, "crash")).is_empty());
        assert!(kinds(&ended(JobState::Skipped, None, "crash")).is_empty());
        assert_eq!(
            kinds(&ended(
                JobState::CompletedWithWarnings,
                Some("crash"),
                "file_system"
            )),
            [EventKind::JobWarnings, EventKind::ConsistencyBelow]
        );
        assert_eq!(
            kinds(&ended(
                JobState::Completed,
                Some("file_system"),
                "application"
            )),
            [EventKind::ConsistencyBelow]
        );
        let e = &job_events(
            &ended(JobState::Failed, None, "crash"),
            Timestamp::UNIX_EPOCH,
        )[0];
        assert_eq!(e.id, "job-7-job_failed");
        assert_eq!(e.job, Some(7));
        assert!(e.summary.contains("disk gone"), "{}", e.summary);
    }

    #[test]
    fn overdue_after_schedule_plus_grace() {
        let every = VmSchedule::Every(Duration::from_secs(3600));
        let grace = Duration::from_secs(600);
        let started = t("2026-11-29T00:30:00Z");
        let ok = Some(t("2026-11-29T00:05:00Z"));
        // The 01:00 run passed, but within the grace.
        assert_eq!(
            missed_run(&every, ok, started, grace, t("2026-11-29T01:09:00Z")),
            None
        );
        assert_eq!(
            missed_run(&every, ok, started, grace, t("2026-11-29T01:11:00Z")),
            Some(t("2026-11-29T01:00:00Z"))
        );
        // A success after the run: not overdue.
        let later = Some(t("2026-11-29T01:02:00Z"));
        assert_eq!(
            missed_run(&every, later, started, grace, t("2026-11-29T01:30:00Z")),
            None
        );
        // Never a success: only runs since the start count.
        assert_eq!(
            missed_run(&every, None, started, grace, t("2026-11-29T00:59:00Z")),
            None
        );
        assert_eq!(
            missed_run(&every, None, started, grace, t("2026-11-29T01:10:01Z")),
            Some(t("2026-11-29T01:00:00Z"))
        );
    }

    #[test]
    fn overdue_is_reported_once_per_episode() {
        let mut tr = OverdueTracker::default();
        let ok1 = Some(t("2026-11-29T00:05:00Z"));
        let miss = Some(t("2026-11-29T01:00:00Z"));
        assert!(!tr.check("a", ok1, None));
        assert!(tr.check("a", ok1, miss));
        // Every later check of the same episode: nothing, even as more runs are missed.
        assert!(!tr.check("a", ok1, miss));
        assert!(!tr.check("a", ok1, Some(t("2026-11-29T02:00:00Z"))));
        // Another VM is its own episode.
        assert!(tr.check("b", None, miss));
        // A success ends the episode; overdue again later is a new one.
        let ok2 = Some(t("2026-11-29T02:30:00Z"));
        assert!(!tr.check("a", ok2, None));
        assert!(tr.check("a", ok2, Some(t("2026-11-29T04:00:00Z"))));
        // A success that is itself already late again (no check in between): a new episode.
        let ok3 = Some(t("2026-11-29T04:10:00Z"));
        assert!(tr.check("a", ok3, Some(t("2026-11-29T06:00:00Z"))));
        let ev = overdue_event(
            "a",
            ok3,
            t("2026-11-29T06:00:00Z"),
            Duration::ZERO,
            t("2026-11-29T06:00:05Z"),
        );
        assert_eq!(
            ev.id,
            format!("overdue-a-{}", t("2026-11-29T04:10:00Z").as_second())
        );
    }
}
