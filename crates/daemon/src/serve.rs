//! `serve`: everything `bulwark-controller serve` does between reading its configuration and
//! stopping: lock the state directory, open the history and the vault, wire the scheduler to
//! the backup runner, the snapshot store and the vault's retention, run until a signal.

use std::fmt;
use std::sync::Arc;

use bulwark_consistency::Level;
use bulwark_controller::tiers::SnapshotStore;
use bulwark_vault::{CreateOptions, OpenOptions, Vault};
use jiff::Timestamp;

use crate::Error;
use crate::config::Config;
use crate::daemon::{
    BackupRunner, Daemon, DaemonOptions, DaemonSummary, RetentionMaintenance, StateLock,
    SystemClock, VmSchedule, lock_state_dir,
};
use crate::history::{History, STOPPED_DURING_JOB};

/// What the front end decides: how to open the vault, and whether to run every VM at once.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// Vault options (key, store settings), built by the binary.
    pub vault: OpenOptions,
    /// Also run every VM once at start (trigger `manual`).
    pub run_now: bool,
    /// The program that runs the watchdog of `qga:` agents: the binary itself, whose `main`
    /// calls `bulwark_qemu::qga::dispatch_watchdog` first thing.
    pub qga_watchdog: Option<std::path::PathBuf>,
}

/// The plan of a configuration at an instant: per VM its disks, schedule, next run, kept
/// snapshots and agent. What `serve --check` (and `serve`, at start) shows.
#[derive(Debug)]
pub struct Plan<'a> {
    /// The configuration.
    pub config: &'a Config,
    /// The instant the next runs are computed after.
    pub now: Timestamp,
}

impl fmt::Display for Plan<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for vm in &self.config.vms {
            let name = &vm.name;
            let when = VmSchedule::of(vm)
                .next_after(self.now)
                .map(|t| vm.policy.display_time(t))
                .unwrap_or_else(|| "never".into());
            let how = match vm.schedule_override {
                Some(d) => format!("every {}s (schedule_override_seconds)", d.as_secs()),
                None => vm.policy.schedule().to_string(),
            };
            let days = vm.policy.retention().instant_restore_days;
            let kept = if vm.keep_snapshots {
                format!("snapshots kept {days} day(s)")
            } else {
                "snapshots not kept".to_string()
            };
            let disks = match &vm.qmp {
                Some(q) if q.disks.is_empty() => {
                    format!("every writable disk through QMP {}", q.socket)
                }
                Some(q) => format!("disk(s) {} through QMP {}", q.disks.join(", "), q.socket),
                None => format!("{} disk(s)", vm.disks.len()),
            };
            writeln!(f, "vm {name}: {disks}, {how}, next run {when}, {kept}")?;
            let c = vm.policy.consistency();
            match &vm.agent {
                Some(agent) => writeln!(
                    f,
                    "vm {name}: quiesced through the agent at {} (wanted {}, minimum {})",
                    agent.address, c.wanted, c.minimum
                )?,
                None if c.wanted > Level::Crash => writeln!(
                    f,
                    "vm {name}: no agent: crash-consistent (the policy wants {})",
                    c.wanted
                )?,
                None => {}
            }
        }
        Ok(())
    }
}

/// What a front end (the HTTP API) reads and drives while the daemon runs: the configuration,
/// the vault, the job history, the kept snapshots and the daemon's control handle.
#[derive(Debug, Clone)]
pub struct Handles {
    /// The configuration the daemon runs.
    pub config: Arc<Config>,
    /// The open vault.
    pub vault: Vault,
    /// The job history.
    pub history: History,
    /// Kept snapshots (instant restore).
    pub store: SnapshotStore,
    /// Run now, cancel, live progress, job ends.
    pub control: crate::control::Control,
    /// Where notifications go (`[notify]`), if configured.
    pub notifier: Option<bulwark_notify::Notifier>,
}

/// A daemon ready to run: the state directory locked, the history and the vault open.
/// Its `Display` says what happened while opening (jobs recovered, vault created).
#[derive(Debug)]
pub struct Server {
    daemon: Daemon,
    handles: Handles,
    _lock: StateLock,
    recovered: usize,
    created: Option<String>,
}

impl Server {
    /// Locks `config.state_dir` (one daemon per state directory), opens the job history
    /// (marking jobs a stopped daemon left running as failed), opens or creates the vault,
    /// creates the snapshot directory and wires the scheduler.
    pub async fn open(config: &Config, options: ServeOptions) -> Result<Server, Error> {
        let now = Timestamp::now();
        let lock = lock_state_dir(&config.state_dir)?;
        let (history, recovered) = History::open(&config.state_dir, now)?;
        let (vault, created) =
            Vault::open_or_create_with(&config.vault, &CreateOptions::default(), &options.vault)
                .await
                .map_err(|e| Error::Controller(e.into()))?;
        let created = created.then(|| vault.location().to_string());
        std::fs::create_dir_all(&config.snapshot_dir).map_err(|source| Error::Io {
            path: config.snapshot_dir.clone(),
            source,
        })?;
        if config.vms.iter().any(|vm| vm.qmp.is_some()) {
            std::fs::create_dir_all(&config.runtime_dir).map_err(|source| Error::Io {
                path: config.runtime_dir.clone(),
                source,
            })?;
        }
        let store = SnapshotStore::new(config.snapshot_dir.clone());
        let runner = Arc::new(BackupRunner {
            vault: vault.clone(),
            store: store.clone(),
            provider: config.snapshot_provider,
            upload_concurrency: config.upload_concurrency,
            runtime_dir: config.runtime_dir.clone(),
            qga_watchdog: options.qga_watchdog.clone(),
        });
        let mut daemon_options = DaemonOptions::from_config(config);
        daemon_options.run_now = options.run_now;
        let daemon = Daemon::new(
            config.vms.clone(),
            history.clone(),
            Arc::new(SystemClock),
            runner,
            daemon_options,
        )
        .with_snapshot_store(store.clone());
        let maintenance = RetentionMaintenance::new(
            vault.clone(),
            Some(store.clone()),
            config.prune,
            config.gc_interval,
            now,
        )
        .counting_in(daemon.control());
        let daemon = daemon.with_maintenance(Arc::new(maintenance));
        let notifier = match &config.notify {
            Some(n) => {
                let notifier = bulwark_notify::Notifier::start(n)?;
                crate::alerts::spawn(
                    notifier.clone(),
                    &daemon.control(),
                    history.clone(),
                    config.vms.iter().cloned().map(Arc::new).collect(),
                    overdue_grace(config),
                    now,
                );
                Some(notifier)
            }
            None => None,
        };
        let handles = Handles {
            config: Arc::new(config.clone()),
            vault,
            history,
            store,
            control: daemon.control(),
            notifier,
        };
        Ok(Server {
            daemon,
            handles,
            _lock: lock,
            recovered,
            created,
        })
    }

    /// The handles a front end needs while the daemon runs.
    pub fn handles(&self) -> Handles {
        self.handles.clone()
    }

    /// Runs until SIGTERM or SIGINT, then lets running jobs finish within the shutdown
    /// timeout.
    pub async fn run_until_signalled(self) -> Result<DaemonSummary, Error> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).map_err(|source| Error::Io {
            path: "SIGTERM".into(),
            source,
        })?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::warn!("shutting down: no new jobs; waiting for running jobs");
        };
        self.daemon.run(shutdown).await
    }
}

/// The grace before a missed run makes a VM overdue: `[notify]`'s, else `[http]`'s, else an
/// hour.
pub fn overdue_grace(config: &Config) -> std::time::Duration {
    config
        .notify
        .as_ref()
        .and_then(|n| n.overdue_grace)
        .or(config.http.as_ref().map(|h| h.overdue_grace))
        .unwrap_or(std::time::Duration::from_secs(3600))
}

impl fmt::Display for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.recovered > 0 {
            writeln!(
                f,
                "{} job(s) left in progress by a stopped daemon marked Failed (\"{STOPPED_DURING_JOB}\")",
                self.recovered
            )?;
        }
        if let Some(location) = &self.created {
            writeln!(f, "created a new vault at {location}")?;
        }
        Ok(())
    }
}

impl fmt::Display for DaemonSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "stopped: {} job(s) started, {} run(s) skipped, {} cancelled",
            self.started, self.skipped, self.cancelled
        )
    }
}

/// One line: id, VM, trigger, scheduled and start times, duration, state, phases, point, error.
impl fmt::Display for crate::history::JobRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let short = |t: Option<Timestamp>| {
            t.map(|t| t.strftime("%Y-%m-%d %H:%M:%S").to_string())
                .unwrap_or_else(|| "-".into())
        };
        let secs = self
            .ended
            .map(|e| format!("{}s", e.duration_since(self.started).as_secs()))
            .unwrap_or_else(|| "-".into());
        let (id, vm, trigger, state) = (self.id, &self.vm, &self.trigger, &self.state);
        let (scheduled, started) = (short(self.scheduled), short(Some(self.started)));
        let (snap, xfer) = (&self.snapshot, &self.transfer);
        write!(
            f,
            "{id:>5} {vm:<16} {trigger:<9} sched {scheduled:<19} start {started:<19} {secs:>6} \
             {state:<21} snap {snap:<9} xfer {xfer:<9} {} {}",
            self.outcome.point.as_deref().unwrap_or("-"),
            self.outcome.error.as_deref().unwrap_or("")
        )
    }
}
