//! Job history: one row per job in an embedded SQLite database (`<state_dir>/jobs.db`).
//!
//! The vault stays the source of truth for recovery points: losing this database loses the
//! history of jobs (and the daemon's memory of the last scheduled run, which only matters for
//! catch-up), never a point.
//!
//! Writes are single-row statements in WAL mode with `synchronous = NORMAL`, a few per job;
//! they are made directly on the calling thread.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use jiff::Timestamp;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::Serialize;

use crate::Error;

/// The database file name inside the state directory.
pub const DB_FILE: &str = "jobs.db";

/// The error recorded for jobs a stopped daemon left in progress.
pub const STOPPED_DURING_JOB: &str = "controller stopped during the job";

/// A stored name that is none of an enum's values (a damaged or newer history).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {name:?}")]
pub struct UnknownName {
    /// The enum.
    pub what: &'static str,
    /// The name found.
    pub name: String,
}

macro_rules! string_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident = $s:literal),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
        pub enum $name { $($(#[$vm])* #[serde(rename = $s)] $v),* }
        impl $name {
            /// The stored and printed name.
            pub fn as_str(self) -> &'static str { match self { $($name::$v => $s),* } }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.as_str()) }
        }
        impl FromStr for $name {
            type Err = UnknownName;
            fn from_str(s: &str) -> Result<Self, UnknownName> {
                match s {
                    $($s => Ok($name::$v),)*
                    other => Err(UnknownName { what: stringify!($name), name: other.to_string() }),
                }
            }
        }
    };
}

string_enum! {
    /// Why a job ran.
    Trigger {
        /// Its scheduled time came.
        Scheduled = "scheduled",
        /// Asked for (`serve --run-now`).
        Manual = "manual",
        /// A run missed while the daemon was down, made once at start.
        CatchUp = "catch-up",
    }
}

string_enum! {
    /// The overall state of a job.
    JobState {
        /// Running (or waiting for a concurrency slot).
        InProgress = "InProgress",
        /// Done, nothing to report.
        Completed = "Completed",
        /// Done, with warnings (e.g. consistency below what the policy wanted).
        CompletedWithWarnings = "CompletedWithWarnings",
        /// Failed; the error says why.
        Failed = "Failed",
        /// Stopped at shutdown.
        Cancelled = "Cancelled",
        /// Not run (the previous job of the VM was still running).
        Skipped = "Skipped",
    }
}

string_enum! {
    /// The state of one phase (snapshot, transfer) of a job.
    PhaseState {
        /// Not started.
        Pending = "pending",
        /// Running.
        Running = "running",
        /// Done.
        Completed = "completed",
        /// Failed.
        Failed = "failed",
        /// Stopped at shutdown.
        Cancelled = "cancelled",
        /// Did not run.
        Skipped = "skipped",
    }
}

/// A phase of a backup job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Snapshot of every disk.
    Snapshot,
    /// Transfer into the vault and commit.
    Transfer,
}

impl Phase {
    fn column(self) -> &'static str {
        match self {
            Phase::Snapshot => "snapshot_state",
            Phase::Transfer => "transfer_state",
        }
    }
}

/// One job as recorded (what `jobs --json` prints).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobRecord {
    /// Job id (increasing).
    pub id: i64,
    /// The VM.
    pub vm: String,
    /// Why it ran.
    pub trigger: Trigger,
    /// The run time it was scheduled for, if any.
    pub scheduled: Option<Timestamp>,
    /// When it started (or was skipped).
    pub started: Timestamp,
    /// When it ended.
    pub ended: Option<Timestamp>,
    /// Snapshot phase.
    pub snapshot: PhaseState,
    /// Transfer phase.
    pub transfer: PhaseState,
    /// Overall state.
    pub state: JobState,
    /// What it produced (flattened: its fields are the record's own in JSON).
    #[serde(flatten)]
    pub outcome: JobOutcome,
}

/// What a job produced: the stored part of [`JobEnd`], read back in [`JobRecord`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct JobOutcome {
    /// The recovery point made, if any.
    pub point: Option<String>,
    /// The consistency level reached.
    pub consistency: Option<String>,
    /// Why the level reached is below the level wanted.
    pub consistency_reasons: Vec<String>,
    /// Bytes read from the snapshots.
    pub bytes_read: u64,
    /// Plain bytes of new blocks.
    pub bytes_new: u64,
    /// Stored bytes uploaded.
    pub bytes_uploaded: u64,
    /// Why it failed, was skipped or cancelled.
    pub error: Option<String>,
}

/// How a job ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobEnd {
    /// Overall state (not `InProgress`).
    pub state: Option<JobState>,
    /// What it produced.
    pub outcome: JobOutcome,
    /// How long the guest was frozen (not stored; told to [`crate::control::Control`]
    /// listeners).
    pub freeze_window_ms: Option<u64>,
}

impl JobEnd {
    /// A job that ended in `state` with only an error to report.
    pub fn with_error(state: JobState, error: String) -> JobEnd {
        JobEnd {
            state: Some(state),
            outcome: JobOutcome {
                error: Some(error),
                ..JobOutcome::default()
            },
            freeze_window_ms: None,
        }
    }
}

/// Jobs of one VM in one state, summed ([`History::totals`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobTotals {
    /// The VM.
    pub vm: String,
    /// The state.
    pub state: JobState,
    /// How many jobs.
    pub jobs: u64,
    /// Bytes they read.
    pub bytes_read: u64,
    /// Bytes they uploaded.
    pub bytes_uploaded: u64,
    /// The latest end among them.
    pub last_ended: Option<Timestamp>,
}

/// The job database. Cheap to clone; all clones share one connection.
#[derive(Debug, Clone)]
pub struct History {
    path: PathBuf,
    conn: Arc<Mutex<Connection>>,
}

mod samples;
pub use samples::{MAX_STORAGE_SAMPLES, StorageSample};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    vm TEXT NOT NULL,
    trigger TEXT NOT NULL,
    scheduled_ms INTEGER,
    started_ms INTEGER NOT NULL,
    ended_ms INTEGER,
    snapshot_state TEXT NOT NULL,
    transfer_state TEXT NOT NULL,
    state TEXT NOT NULL,
    point TEXT,
    consistency TEXT,
    consistency_reasons TEXT NOT NULL DEFAULT '[]',
    bytes_read INTEGER NOT NULL DEFAULT 0,
    bytes_new INTEGER NOT NULL DEFAULT 0,
    bytes_uploaded INTEGER NOT NULL DEFAULT 0,
    error TEXT
);
CREATE INDEX IF NOT EXISTS jobs_vm ON jobs (vm, id);
";

fn ms(t: Timestamp) -> i64 {
    t.as_millisecond()
}

fn ts(ms: i64) -> Timestamp {
    Timestamp::from_millisecond(ms).unwrap_or(Timestamp::UNIX_EPOCH)
}

impl History {
    fn err(&self, source: rusqlite::Error) -> Error {
        Error::History {
            path: self.path.clone(),
            source,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves the connection usable: SQLite statements are
        // atomic on their own.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens (creating) `<state_dir>/jobs.db` for the daemon, and marks every job a stopped
    /// daemon left `InProgress` as `Failed` ("controller stopped during the job"). Returns the
    /// history and how many jobs were so marked. Only the daemon (which holds the state
    /// directory's lock) may call this.
    pub fn open(state_dir: &Path, now: Timestamp) -> Result<(History, usize), Error> {
        std::fs::create_dir_all(state_dir).map_err(|source| Error::Io {
            path: state_dir.to_path_buf(),
            source,
        })?;
        let path = state_dir.join(DB_FILE);
        let conn = Connection::open(&path).map_err(|source| Error::History {
            path: path.clone(),
            source,
        })?;
        let h = History {
            path,
            conn: Arc::new(Mutex::new(conn)),
        };
        h.init()?;
        let n = h.recover(now)?;
        Ok((h, n))
    }

    /// Opens an existing database read-only (for `jobs`), without touching running jobs.
    pub fn open_read_only(state_dir: &Path) -> Result<History, Error> {
        let path = state_dir.join(DB_FILE);
        if !path.is_file() {
            return Err(Error::Io {
                path: path.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no job database here (has the daemon run with this state_dir?)",
                ),
            });
        }
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| Error::History {
            path: path.clone(),
            source,
        })?;
        let h = History {
            path,
            conn: Arc::new(Mutex::new(conn)),
        };
        h.lock()
            .busy_timeout(std::time::Duration::from_secs(5))
            .map_err(|e| h.err(e))?;
        Ok(h)
    }

    /// An in-memory database (tests).
    pub fn in_memory() -> Result<History, Error> {
        let path = PathBuf::from(":memory:");
        let conn = Connection::open_in_memory().map_err(|source| Error::History {
            path: path.clone(),
            source,
        })?;
        let h = History {
            path,
            conn: Arc::new(Mutex::new(conn)),
        };
        h.init()?;
        Ok(h)
    }

    /// A counter that grows with every row this history (any clone of it) inserts, updates or
    /// deletes: SQLite's `total_changes` of the shared connection. Readers that keep a copy of
    /// the history (the HTTP API's view) compare it to know when to read again. Only the
    /// connection's own writes count, which are all of them: the daemon holds the state
    /// directory, so no other process writes this database.
    pub fn changes(&self) -> u64 {
        self.lock().total_changes()
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn init(&self) -> Result<(), Error> {
        let c = self.lock();
        c.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(|e| self.err(e))?;
        if self.path != Path::new(":memory:") {
            c.pragma_update(None, "journal_mode", "WAL")
                .map_err(|e| self.err(e))?;
            c.pragma_update(None, "synchronous", "NORMAL")
                .map_err(|e| self.err(e))?;
        }
        c.execute_batch(SCHEMA).map_err(|e| self.err(e))?;
        c.execute_batch(samples::SCHEMA).map_err(|e| self.err(e))
    }

    /// Marks jobs left `InProgress` as `Failed`; returns how many.
    pub fn recover(&self, now: Timestamp) -> Result<usize, Error> {
        let c = self.lock();
        c.execute(
            "UPDATE jobs SET
                snapshot_state = CASE WHEN snapshot_state IN ('running', 'pending') THEN 'failed' ELSE snapshot_state END,
                transfer_state = CASE WHEN transfer_state = 'running' THEN 'failed'
                                      WHEN transfer_state = 'pending' THEN 'skipped' ELSE transfer_state END,
                state = 'Failed', ended_ms = ?1, error = ?2
             WHERE state = 'InProgress'",
            params![ms(now), STOPPED_DURING_JOB],
        )
        .map_err(|e| self.err(e))
    }

    /// Records a job that starts now; returns its id.
    pub fn start_job(
        &self,
        vm: &str,
        trigger: Trigger,
        scheduled: Option<Timestamp>,
        started: Timestamp,
    ) -> Result<i64, Error> {
        let c = self.lock();
        c.execute(
            "INSERT INTO jobs (vm, trigger, scheduled_ms, started_ms, snapshot_state, transfer_state, state)
             VALUES (?1, ?2, ?3, ?4, 'pending', 'pending', 'InProgress')",
            params![vm, trigger.as_str(), scheduled.map(ms), ms(started)],
        )
        .map_err(|e| self.err(e))?;
        Ok(c.last_insert_rowid())
    }

    /// Records a job that did not run, and why.
    pub fn record_skipped(
        &self,
        vm: &str,
        trigger: Trigger,
        scheduled: Option<Timestamp>,
        at: Timestamp,
        reason: &str,
    ) -> Result<i64, Error> {
        let c = self.lock();
        c.execute(
            "INSERT INTO jobs (vm, trigger, scheduled_ms, started_ms, ended_ms, snapshot_state, transfer_state, state, error)
             VALUES (?1, ?2, ?3, ?4, ?4, 'skipped', 'skipped', 'Skipped', ?5)",
            params![vm, trigger.as_str(), scheduled.map(ms), ms(at), reason],
        )
        .map_err(|e| self.err(e))?;
        Ok(c.last_insert_rowid())
    }

    /// Sets the state of one phase of a job.
    pub fn set_phase(&self, id: i64, phase: Phase, state: PhaseState) -> Result<(), Error> {
        let sql = format!("UPDATE jobs SET {} = ?1 WHERE id = ?2", phase.column());
        self.lock()
            .execute(&sql, params![state.as_str(), id])
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// Records how a job ended. Phases still `running` take the end state; `pending` ones
    /// become `skipped`.
    pub fn finish(&self, id: i64, ended: Timestamp, end: &JobEnd) -> Result<(), Error> {
        let state = end.state.unwrap_or(JobState::Failed);
        let running_to = match state {
            JobState::Cancelled => PhaseState::Cancelled,
            JobState::Completed | JobState::CompletedWithWarnings => PhaseState::Completed,
            _ => PhaseState::Failed,
        };
        let o = &end.outcome;
        let reasons = serde_json::to_string(&o.consistency_reasons).unwrap_or_else(|_| "[]".into());
        self.lock()
            .execute(
                "UPDATE jobs SET state = ?1, ended_ms = ?2, point = ?3, consistency = ?4,
                    consistency_reasons = ?5, bytes_read = ?6, bytes_new = ?7, bytes_uploaded = ?8,
                    error = ?9,
                    snapshot_state = CASE snapshot_state WHEN 'running' THEN ?10 WHEN 'pending' THEN 'skipped' ELSE snapshot_state END,
                    transfer_state = CASE transfer_state WHEN 'running' THEN ?10 WHEN 'pending' THEN 'skipped' ELSE transfer_state END
                 WHERE id = ?11",
                params![
                    state.as_str(),
                    ms(ended),
                    o.point,
                    o.consistency,
                    reasons,
                    o.bytes_read as i64,
                    o.bytes_new as i64,
                    o.bytes_uploaded as i64,
                    o.error,
                    running_to.as_str(),
                    id
                ],
            )
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// Jobs, newest first, optionally of one VM, at most `limit`.
    pub fn jobs(&self, vm: Option<&str>, limit: usize) -> Result<Vec<JobRecord>, Error> {
        self.select(vm, None, limit)
    }

    fn select(
        &self,
        vm: Option<&str>,
        id: Option<i64>,
        limit: usize,
    ) -> Result<Vec<JobRecord>, Error> {
        let c = self.lock();
        let mut stmt = c
            .prepare(
                "SELECT id, vm, trigger, scheduled_ms, started_ms, ended_ms, snapshot_state,
                        transfer_state, state, point, consistency, consistency_reasons,
                        bytes_read, bytes_new, bytes_uploaded, error
                 FROM jobs WHERE (?1 IS NULL OR vm = ?1) AND (?3 IS NULL OR id = ?3)
                 ORDER BY id DESC LIMIT ?2",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![vm, limit.min(i64::MAX as usize) as i64, id], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Option<i64>>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, Option<i64>>(5)?,
                    r.get::<_, String>(6)?,
                    r.get::<_, String>(7)?,
                    r.get::<_, String>(8)?,
                    r.get::<_, Option<String>>(9)?,
                    r.get::<_, Option<String>>(10)?,
                    r.get::<_, String>(11)?,
                    (
                        r.get::<_, i64>(12)?,
                        r.get::<_, i64>(13)?,
                        r.get::<_, i64>(14)?,
                        r.get::<_, Option<String>>(15)?,
                    ),
                ))
            })
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (
                id,
                vm,
                trigger,
                scheduled,
                started,
                ended,
                snap,
                xfer,
                state,
                point,
                consistency,
                reasons,
                (read, new, up, error),
            ) = row.map_err(|e| self.err(e))?;
            let bad = |what: UnknownName| Error::History {
                path: self.path.clone(),
                source: rusqlite::Error::InvalidColumnName(format!("job {id}: {what}")),
            };
            out.push(JobRecord {
                id,
                vm,
                trigger: trigger.parse().map_err(bad)?,
                scheduled: scheduled.map(ts),
                started: ts(started),
                ended: ended.map(ts),
                snapshot: snap.parse().map_err(bad)?,
                transfer: xfer.parse().map_err(bad)?,
                state: state.parse().map_err(bad)?,
                outcome: JobOutcome {
                    point,
                    consistency,
                    consistency_reasons: serde_json::from_str(&reasons).unwrap_or_default(),
                    bytes_read: read.max(0) as u64,
                    bytes_new: new.max(0) as u64,
                    bytes_uploaded: up.max(0) as u64,
                    error,
                },
            });
        }
        Ok(out)
    }

    /// Totals per VM and job state: jobs, bytes read, bytes uploaded, and the latest end of a
    /// successful job (for metrics).
    pub fn totals(&self) -> Result<Vec<JobTotals>, Error> {
        let c = self.lock();
        let mut stmt = c
            .prepare(
                "SELECT vm, state, COUNT(*), SUM(bytes_read), SUM(bytes_uploaded), MAX(ended_ms)
                 FROM jobs GROUP BY vm, state ORDER BY vm, state",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, Option<i64>>(3)?,
                    r.get::<_, Option<i64>>(4)?,
                    r.get::<_, Option<i64>>(5)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (vm, state, jobs, read, up, ended) = row.map_err(|e| self.err(e))?;
            let Ok(state) = state.parse::<JobState>() else {
                continue;
            };
            out.push(JobTotals {
                vm,
                state,
                jobs: jobs.max(0) as u64,
                bytes_read: read.unwrap_or(0).max(0) as u64,
                bytes_uploaded: up.unwrap_or(0).max(0) as u64,
                last_ended: ended.map(ts),
            });
        }
        Ok(out)
    }

    /// One job by id.
    pub fn job(&self, id: i64) -> Result<Option<JobRecord>, Error> {
        Ok(self.select(None, Some(id), 1)?.pop())
    }

    /// The latest run time a scheduled or catch-up job of `vm` was recorded for (whatever its
    /// outcome): the daemon's memory of where the schedule stood, for catch-up after downtime.
    pub fn last_scheduled(&self, vm: &str) -> Result<Option<Timestamp>, Error> {
        self.lock()
            .query_row(
                "SELECT MAX(scheduled_ms) FROM jobs WHERE vm = ?1 AND trigger IN ('scheduled', 'catch-up')",
                params![vm],
                |r| r.get::<_, Option<i64>>(0),
            )
            .optional()
            .map(|o| o.flatten().map(ts))
            .map_err(|e| self.err(e))
    }

    /// When the latest successful job of `vm` (completed, with or without warnings) ended.
    pub fn last_success(&self, vm: &str) -> Result<Option<Timestamp>, Error> {
        let ok = [JobState::Completed, JobState::CompletedWithWarnings].map(JobState::as_str);
        self.lock()
            .query_row(
                "SELECT MAX(ended_ms) FROM jobs WHERE vm = ?1 AND state IN (?2, ?3)",
                params![vm, ok[0], ok[1]],
                |r| r.get::<_, Option<i64>>(0),
            )
            .optional()
            .map(|o| o.flatten().map(ts))
            .map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    /// The JSON of a record (`jobs --json`, the HTTP API) keeps its flat shape: the outcome's
    /// fields are the record's own, in the order they always had.
    #[test]
    fn record_json_is_flat() {
        let h = History::in_memory().unwrap();
        let id = h
            .start_job("web01", Trigger::Manual, None, t("2026-11-25T10:00:00Z"))
            .unwrap();
        h.finish(
            id,
            t("2026-11-25T10:00:02Z"),
            &JobEnd {
                state: Some(JobState::Completed),
                outcome: JobOutcome {
                    point: Some("p1".into()),
                    consistency: Some("crash".into()),
                    consistency_reasons: vec!["r".into()],
                    bytes_read: 1,
                    bytes_new: 2,
                    bytes_uploaded: 3,
                    error: None,
                },
                freeze_window_ms: Some(9),
            },
        )
        .unwrap();
        let json = serde_json::to_string(&h.job(id).unwrap().unwrap()).unwrap();
        assert_eq!(
            json,
            format!(
                "{{\"id\":{id},\"vm\":\"web01\",\"trigger\":\"manual\",\"scheduled\":null,\
                 \"started\":\"2026-11-25T10:00:00Z\",\"ended\":\"2026-11-25T10:00:02Z\",\
                 \"snapshot\":\"skipped\",\"transfer\":\"skipped\",\"state\":\"Completed\",\
                 \"point\":\"p1\",\"consistency\":\"crash\",\"consistency_reasons\":[\"r\"],\
                 \"bytes_read\":1,\"bytes_new\":2,\"bytes_uploaded\":3,\"error\":null}}"
            )
        );
    }

    #[test]
    fn jobs_roundtrip_and_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let (h, n) = History::open(dir.path(), t("2026-11-25T10:00:00Z")).unwrap();
        assert_eq!(n, 0);
        let a = h
            .start_job(
                "web01",
                Trigger::Scheduled,
                Some(t("2026-11-25T10:00:00Z")),
                t("2026-11-25T10:00:01Z"),
            )
            .unwrap();
        h.set_phase(a, Phase::Snapshot, PhaseState::Completed)
            .unwrap();
        h.set_phase(a, Phase::Transfer, PhaseState::Running)
            .unwrap();
        h.finish(
            a,
            t("2026-11-25T10:01:00Z"),
            &JobEnd {
                state: Some(JobState::CompletedWithWarnings),
                outcome: JobOutcome {
                    point: Some("p1".into()),
                    consistency: Some("crash".into()),
                    consistency_reasons: vec!["no agent".into()],
                    bytes_read: 10,
                    bytes_new: 5,
                    bytes_uploaded: 3,
                    error: None,
                },
                freeze_window_ms: None,
            },
        )
        .unwrap();
        let b = h
            .start_job(
                "web01",
                Trigger::CatchUp,
                Some(t("2026-11-25T14:00:00Z")),
                t("2026-11-25T15:00:00Z"),
            )
            .unwrap();
        h.set_phase(b, Phase::Snapshot, PhaseState::Running)
            .unwrap();
        h.record_skipped(
            "db01",
            Trigger::Scheduled,
            None,
            t("2026-11-25T15:00:00Z"),
            "busy",
        )
        .unwrap();
        drop(h);

        // A new daemon: the job left in progress is failed, the others are untouched.
        let (h, n) = History::open(dir.path(), t("2026-11-25T16:00:00Z")).unwrap();
        assert_eq!(n, 1);
        let jobs = h.jobs(Some("web01"), 10).unwrap();
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[0].id, b);
        assert_eq!(jobs[0].state, JobState::Failed);
        assert_eq!(jobs[0].snapshot, PhaseState::Failed);
        assert_eq!(jobs[0].transfer, PhaseState::Skipped);
        assert_eq!(jobs[0].outcome.error.as_deref(), Some(STOPPED_DURING_JOB));
        assert_eq!(jobs[0].ended, Some(t("2026-11-25T16:00:00Z")));
        assert_eq!(jobs[1].state, JobState::CompletedWithWarnings);
        assert_eq!(jobs[1].transfer, PhaseState::Completed);
        assert_eq!(
            jobs[1].outcome.consistency_reasons,
            vec!["no agent".to_string()]
        );
        assert_eq!(jobs[1].outcome.bytes_uploaded, 3);
        assert_eq!(
            h.last_scheduled("web01").unwrap(),
            Some(t("2026-11-25T14:00:00Z"))
        );
        assert_eq!(h.last_scheduled("db01").unwrap(), None);
        assert_eq!(h.last_scheduled("nope").unwrap(), None);
        let ro = History::open_read_only(dir.path()).unwrap();
        assert_eq!(ro.jobs(None, 10).unwrap().len(), 3);
        assert!(History::open_read_only(&dir.path().join("x")).is_err());
    }

    #[test]
    fn changes_count_writes_not_reads() {
        let h = History::in_memory().unwrap();
        let c0 = h.changes();
        let id = h
            .start_job("web01", Trigger::Manual, None, t("2026-11-25T10:00:00Z"))
            .unwrap();
        let c1 = h.changes();
        assert!(c1 > c0, "an insert counts");
        h.jobs(None, 10).unwrap();
        h.totals().unwrap();
        assert_eq!(h.changes(), c1, "reads do not count");
        h.set_phase(id, Phase::Snapshot, PhaseState::Running)
            .unwrap();
        let c2 = h.changes();
        assert!(c2 > c1, "a phase update counts");
        // A clone shares the connection, so its writes count too.
        h.clone()
            .finish(id, t("2026-11-25T10:01:00Z"), &JobEnd::default())
            .unwrap();
        assert!(h.changes() > c2, "a write through a clone counts");
    }
}
