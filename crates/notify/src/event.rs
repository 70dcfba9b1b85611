//! What a notification says: its kind, the VM, a one-line summary and the details.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// The kinds of notification, as the configuration's `events = [...]` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum EventKind {
    /// A backup job failed.
    JobFailed,
    /// A backup job completed with warnings.
    JobWarnings,
    /// A point's consistency is below what the VM's policy wants.
    ConsistencyBelow,
    /// A VM had no successful backup within its schedule plus the grace period.
    VmOverdue,
    /// A verify found damaged objects or points.
    VerifyDamage,
}

impl EventKind {
    /// Every kind.
    pub const ALL: [EventKind; 5] = [
        EventKind::JobFailed,
        EventKind::JobWarnings,
        EventKind::ConsistencyBelow,
        EventKind::VmOverdue,
        EventKind::VerifyDamage,
    ];

    /// The configuration's and the JSON body's name.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::JobFailed => "job_failed",
            EventKind::JobWarnings => "job_warnings",
            EventKind::ConsistencyBelow => "consistency_below",
            EventKind::VmOverdue => "vm_overdue",
            EventKind::VerifyDamage => "verify_damage",
        }
    }

    /// Words for a mail subject.
    pub fn title(self) -> &'static str {
        match self {
            EventKind::JobFailed => "backup failed",
            EventKind::JobWarnings => "backup completed with warnings",
            EventKind::ConsistencyBelow => "consistency below the policy",
            EventKind::VmOverdue => "VM overdue",
            EventKind::VerifyDamage => "verify found damage",
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for EventKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
                format!("unknown event {s:?} (known: {})", names.join(", "))
            })
    }
}

/// One notification: the JSON body of a webhook, and the subject and text of a mail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Stable for one occurrence (retries repeat it), so a receiver can drop duplicates:
    /// e.g. `job-12-job_failed`, `overdue-web01-1764381600`.
    pub id: String,
    /// What happened.
    pub kind: EventKind,
    /// When it was noticed.
    pub at: Timestamp,
    /// The VM, when it concerns one.
    pub vm: Option<String>,
    /// The job, when it concerns one.
    pub job: Option<i64>,
    /// One line for a person.
    pub summary: String,
    /// Everything else (the job record, the verify problems, ...).
    pub details: serde_json::Value,
}

impl Event {
    /// The webhook body: the event as compact JSON.
    pub fn body(&self) -> Vec<u8> {
        // Serialising plain data to a Vec cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// A mail subject: `[bulwark] backup failed: web01 (job 12)`.
    pub fn subject(&self) -> String {
        let mut s = format!("[bulwark] {}", self.kind.title());
        if let Some(vm) = &self.vm {
            s.push_str(&format!(": {vm}"));
        }
        if let Some(job) = self.job {
            s.push_str(&format!(" (job {job})"));
        }
        s
    }

    /// A mail text: the summary, then the details as indented JSON.
    pub fn text(&self) -> String {
        let details = serde_json::to_string_pretty(&self.details).unwrap_or_default();
        format!(
            "{}\n\nevent: {}\nid: {}\nat: {}\n\n{details}\n",
            self.summary, self.kind, self.id, self.at
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn kinds_round_trip_by_name() {
        for k in EventKind::ALL {
            assert_eq!(k.as_str().parse::<EventKind>().unwrap(), k);
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
        }
        let e = "job_fail".parse::<EventKind>().unwrap_err();
        assert!(e.contains("known: job_failed"), "{e}");
    }

    #[test]
    fn body_subject_and_text() {
        let e = Event {
            id: "job-3-job_failed".into(),
            kind: EventKind::JobFailed,
            at: "2026-11-29T02:00:00Z".parse().unwrap(),
            vm: Some("web01".into()),
            job: Some(3),
            summary: "vm web01: job 3 failed: disk gone".into(),
            details: serde_json::json!({"error": "disk gone"}),
        };
        let back: Event = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(back, e);
        assert_eq!(e.subject(), "[bulwark] backup failed: web01 (job 3)");
        assert!(e.text().starts_with("vm web01: job 3 failed"));
    }
}
