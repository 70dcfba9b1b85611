//! `GET /metrics`: Prometheus metrics (OpenMetrics text, through `prometheus-client`).
//!
//! Job counts, bytes and last successes come from the job history (so they survive restarts),
//! through the API's in-memory view of it ([`crate::view`]: at most a quarter second behind);
//! the duration and freeze-window histograms count the jobs that ended since the daemon
//! started; vault sizes are the last storage measurement (a new one is made in the background
//! when it is older than 15 s, so a scrape never waits for a listing of the vault).

use std::sync::atomic::AtomicU64;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bulwark_daemon::history::JobState;
use jiff::Timestamp;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::api::Shared;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmLabel {
    vm: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabel {
    operation: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmState {
    vm: String,
    state: String,
}

fn durations() -> Histogram {
    // 1 s to about 9 hours.
    Histogram::new(exponential_buckets(1.0, 2.0, 16))
}

fn freezes() -> Histogram {
    // 10 ms to about 20 s.
    Histogram::new(exponential_buckets(0.01, 2.0, 12))
}

/// The histograms fed by job ends.
#[derive(Debug, Clone)]
pub(crate) struct JobHistograms {
    duration: Family<VmLabel, Histogram>,
    freeze: Family<VmLabel, Histogram>,
}

impl JobHistograms {
    /// Empty histograms, fed from the daemon's job ends by a task of their own.
    pub(crate) fn start(control: &bulwark_daemon::control::Control) -> JobHistograms {
        let h = JobHistograms {
            duration: Family::new_with_constructor(durations),
            freeze: Family::new_with_constructor(freezes),
        };
        let mut ended = control.subscribe();
        let fed = h.clone();
        tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                let e = match ended.recv().await {
                    Ok(e) => e,
                    Err(RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "metrics missed job ends");
                        continue;
                    }
                    Err(RecvError::Closed) => return,
                };
                let vm = VmLabel {
                    vm: e.record.vm.clone(),
                };
                if e.record.state != JobState::Skipped
                    && let Some(end) = e.record.ended
                {
                    let secs = end.duration_since(e.record.started).as_secs_f64().max(0.0);
                    fed.duration.get_or_create(&vm).observe(secs);
                }
                if let Some(ms) = e.freeze_window_ms {
                    fed.freeze.get_or_create(&vm).observe(ms as f64 / 1000.0);
                }
            }
        });
        h
    }
}

const STATES: [JobState; 6] = [
    JobState::InProgress,
    JobState::Completed,
    JobState::CompletedWithWarnings,
    JobState::Failed,
    JobState::Cancelled,
    JobState::Skipped,
];

/// The handler: OpenMetrics when the scraper accepts it, else the Prometheus text format
/// 0.0.4 (what `promtool check metrics` reads).
pub(crate) async fn metrics(State(app): State<Shared>, headers: axum::http::HeaderMap) -> Response {
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    match render(&app).await {
        Ok(text) if openmetrics => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            to_prometheus_text(&text),
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "metrics failed");
            (StatusCode::INTERNAL_SERVER_ERROR, e).into_response()
        }
    }
}

/// OpenMetrics to the Prometheus text format: a counter family's metadata takes the `_total`
/// name of its samples, `# UNIT` and `# EOF` go.
fn to_prometheus_text(om: &str) -> String {
    let counters: std::collections::HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((p, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(name) {
                    out.push_str(&format!("{p}{name}_total {tail}\n"));
                } else {
                    out.push_str(line);
                    out.push('\n');
                }
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

async fn render(app: &Shared) -> Result<String, String> {
    let hv = crate::api::history_view(app).await.map_err(|e| e.1)?;
    let totals = &hv.totals;
    let mut reg = Registry::default();

    let jobs = Family::<VmState, Gauge>::default();
    let read = Family::<VmLabel, Counter>::default();
    let uploaded = Family::<VmLabel, Counter>::default();
    let last_ok = Family::<VmLabel, Gauge<f64, AtomicU64>>::default();
    let overdue = Family::<VmLabel, Gauge>::default();
    let now = Timestamp::now();
    for vm in &app.h.config.vms {
        let label = VmLabel {
            vm: vm.name.clone(),
        };
        for s in STATES {
            let _ = jobs.get_or_create(&VmState {
                vm: vm.name.clone(),
                state: s.to_string(),
            });
        }
        let _ = read.get_or_create(&label);
        let _ = uploaded.get_or_create(&label);
        let p = app.protection(vm, hv.jobs_of(&vm.name), now);
        overdue
            .get_or_create(&label)
            .set(i64::from(p["overdue"] == true));
    }
    for t in totals {
        let label = VmLabel { vm: t.vm.clone() };
        jobs.get_or_create(&VmState {
            vm: t.vm.clone(),
            state: t.state.to_string(),
        })
        .set(i64::try_from(t.jobs).unwrap_or(i64::MAX));
        read.get_or_create(&label).inc_by(t.bytes_read);
        uploaded.get_or_create(&label).inc_by(t.bytes_uploaded);
        if matches!(
            t.state,
            JobState::Completed | JobState::CompletedWithWarnings
        ) && let Some(end) = t.last_ended
        {
            let g = last_ok.get_or_create(&label);
            let secs = end.as_millisecond() as f64 / 1000.0;
            if secs > g.get() {
                g.set(secs);
            }
        }
    }
    reg.register(
        "bulwark_jobs",
        "Jobs in the history by VM and state (InProgress: running now)",
        jobs,
    );
    reg.register_with_unit(
        "bulwark_backup_read",
        "Bytes read from snapshots by the VM's recorded jobs",
        Unit::Bytes,
        read,
    );
    reg.register_with_unit(
        "bulwark_backup_uploaded",
        "Stored bytes uploaded to the vault by the VM's recorded jobs",
        Unit::Bytes,
        uploaded,
    );
    reg.register_with_unit(
        "bulwark_last_success_timestamp",
        "When the VM's latest successful backup job ended (Unix time)",
        Unit::Seconds,
        last_ok,
    );
    reg.register(
        "bulwark_vm_overdue",
        "1 when a scheduled run of the VM passed its grace period with no success since",
        overdue,
    );
    reg.register_with_unit(
        "bulwark_job_duration",
        "Duration of backup jobs that ended since the daemon started",
        Unit::Seconds,
        app.histograms.duration.clone(),
    );
    reg.register_with_unit(
        "bulwark_freeze_window",
        "How long guests were frozen, jobs since the daemon started",
        Unit::Seconds,
        app.histograms.freeze.clone(),
    );
    // Lease refusals since the daemon started, by operation (every operation shown, zero
    // until it happens).
    let conflicts = Family::<OperationLabel, Counter>::default();
    let counted = app.h.control.lease_conflicts();
    for op in ["backup", "prune", "gc"] {
        let _ = conflicts.get_or_create(&OperationLabel {
            operation: op.into(),
        });
    }
    for (op, n) in counted {
        conflicts
            .get_or_create(&OperationLabel { operation: op })
            .inc_by(n);
    }
    reg.register(
        "bulwark_lease_conflicts",
        "Vault lease refusals (another operation held a conflicting lease) since the daemon started",
        conflicts,
    );
    // Agent reachability: VMs with an agent, once a job has tried it.
    let agents = Family::<VmLabel, Gauge>::default();
    let seen_at = Family::<VmLabel, Gauge<f64, AtomicU64>>::default();
    for (vm, seen) in app.h.control.agents() {
        let label = VmLabel { vm };
        agents.get_or_create(&label).set(i64::from(seen.reachable));
        seen_at
            .get_or_create(&label)
            .set(seen.at.as_millisecond() as f64 / 1000.0);
    }
    reg.register(
        "bulwark_agent_reachable",
        "1 when the VM's guest agent answered at the last quiesce attempt, 0 when it did not",
        agents,
    );
    reg.register_with_unit(
        "bulwark_agent_last_attempt_timestamp",
        "When the VM's guest agent was last tried (Unix time)",
        Unit::Seconds,
        seen_at,
    );
    if let Some(n) = &app.h.notifier {
        let s = n.stats();
        let outcomes = Family::<OutcomeLabel, Counter>::default();
        for (outcome, v) in [
            ("sent", s.sent),
            ("failed", s.failed),
            ("dropped", s.dropped),
            ("retried", s.retries),
        ] {
            outcomes
                .get_or_create(&OutcomeLabel {
                    outcome: outcome.into(),
                })
                .inc_by(v);
        }
        reg.register(
            "bulwark_notifications",
            "Notification deliveries (one per event and route) since the daemon started, by outcome (retried: failed attempts tried again)",
            outcomes,
        );
    }
    if let Ok((s, _)) = app.storage().await {
        let stored: Gauge = Gauge::default();
        stored.set(i64::try_from(s.stored).unwrap_or(i64::MAX));
        let logical: Gauge = Gauge::default();
        logical.set(i64::try_from(s.logical).unwrap_or(i64::MAX));
        let points: Gauge = Gauge::default();
        points.set(i64::try_from(s.points).unwrap_or(i64::MAX));
        reg.register_with_unit(
            "bulwark_vault_stored",
            "Bytes of every object in the vault",
            Unit::Bytes,
            stored,
        );
        reg.register_with_unit(
            "bulwark_vault_logical",
            "Sum of the disk sizes of the vault's live points",
            Unit::Bytes,
            logical,
        );
        reg.register(
            "bulwark_vault_points",
            "Live recovery points in the vault",
            points,
        );
    }
    let mut out = String::new();
    encode(&mut out, &reg).map_err(|e| e.to_string())?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn counters_take_their_total_name() {
        let om = "# HELP a_bytes Bytes.\n# TYPE a_bytes counter\n# UNIT a_bytes bytes\na_bytes_total 3\n# HELP g G.\n# TYPE g gauge\ng 1\n# EOF\n";
        assert_eq!(
            super::to_prometheus_text(om),
            "# HELP a_bytes_total Bytes.\n# TYPE a_bytes_total counter\na_bytes_total 3\n# HELP g G.\n# TYPE g gauge\ng 1\n"
        );
    }
}
