//! `serve` (the scheduled daemon), `jobs` (its history), and the two-tier parts of `backup`,
//! `list` and `restore` (kept snapshots).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use bulwark_controller::RestoreReport;
use bulwark_controller::tiers::{SnapshotStore, Tier};
use bulwark_daemon::config::Config;
use bulwark_daemon::daemon::{
    BackupRunner, Daemon, DaemonOptions, RetentionMaintenance, SystemClock, VmSchedule,
    lock_state_dir,
};
use bulwark_daemon::history::{History, JobRecord};
use bulwark_vault::{CreateOptions, Vault};
use clap::Args;
use jiff::Timestamp;

use crate::ui;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The daemon's configuration file (TOML: vault, state_dir, concurrency, [[vm]] entries
    /// with disks and a policy).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Also run every VM once right away (trigger "manual").
    #[arg(long)]
    run_now: bool,
    /// Only check the configuration and show each VM's next run; do not start.
    #[arg(long)]
    check: bool,
}

#[derive(Debug, Args)]
pub struct JobsArgs {
    /// The daemon's state directory (state_dir in its configuration).
    #[arg(long, value_name = "DIR")]
    state_dir: PathBuf,
    /// Only this VM's jobs.
    #[arg(long)]
    vm: Option<String>,
    /// At most this many jobs, newest first.
    #[arg(long, default_value_t = 50)]
    limit: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `serve`: validates everything first; any error ends it before a job runs.
pub async fn serve(a: ServeArgs) -> Result<ExitCode> {
    let config = Config::load(&a.config)?;
    let now = Timestamp::now();
    if a.check {
        println!("configuration {} is valid", a.config.display());
    }
    for vm in &config.vms {
        let next = VmSchedule::of(vm).next_after(now);
        let when = next
            .map(|t| vm.policy.display_time(t))
            .unwrap_or_else(|| "never".into());
        let how = match vm.schedule_override {
            Some(d) => format!("every {}s (schedule_override_seconds)", d.as_secs()),
            None => vm.policy.schedule().to_string(),
        };
        let kept = if vm.keep_snapshots {
            format!(
                "snapshots kept {} day(s)",
                vm.policy.retention().instant_restore_days
            )
        } else {
            "snapshots not kept".to_string()
        };
        eprintln!(
            "vm {}: {} disk(s), {how}, next run {when}, {kept}",
            vm.name,
            vm.disks.len()
        );
        let c = vm.policy.consistency();
        match &vm.agent {
            Some(agent) => eprintln!(
                "vm {}: quiesced through the agent at {} (wanted {}, minimum {})",
                vm.name, agent.address, c.wanted, c.minimum
            ),
            None if c.wanted > bulwark_consistency::Level::Crash => eprintln!(
                "vm {}: no agent: crash-consistent (the policy wants {})",
                vm.name, c.wanted
            ),
            None => {}
        }
    }
    if a.check {
        return Ok(ExitCode::SUCCESS);
    }
    let _lock = lock_state_dir(&config.state_dir)?;
    let (history, recovered) = History::open(&config.state_dir, now)?;
    if recovered > 0 {
        eprintln!(
            "{recovered} job(s) left in progress by a stopped daemon marked Failed (\"{}\")",
            bulwark_daemon::history::STOPPED_DURING_JOB
        );
    }
    let (vault, created) = Vault::open_or_create_with(
        &config.vault,
        &CreateOptions::default(),
        &crate::keys::vault_options()?,
    )
    .await
    .with_context(|| format!("vault {}", config.vault))?;
    if created {
        eprintln!("created a new vault at {}", vault.location());
    }
    std::fs::create_dir_all(&config.snapshot_dir)
        .with_context(|| format!("snapshot_dir {}", config.snapshot_dir.display()))?;
    let store = SnapshotStore::new(config.snapshot_dir.clone());
    let maintenance = Arc::new(RetentionMaintenance::new(
        vault.clone(),
        Some(store.clone()),
        config.prune,
        config.gc_interval,
        now,
    ));
    let runner = Arc::new(BackupRunner {
        vault,
        store: store.clone(),
        provider: config.snapshot_provider,
        upload_concurrency: config.upload_concurrency,
    });
    let mut options = DaemonOptions::from_config(&config);
    options.run_now = a.run_now;
    let daemon = Daemon::new(
        config.vms.clone(),
        history,
        Arc::new(SystemClock),
        runner,
        options,
    )
    .with_snapshot_store(store)
    .with_maintenance(maintenance);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot watch SIGTERM")?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        eprintln!("shutting down: no new jobs; waiting for running jobs");
    };
    eprintln!(
        "serving {} VM(s) from {} (pid {}); state in {}",
        config.vms.len(),
        a.config.display(),
        std::process::id(),
        config.state_dir.display()
    );
    let summary = daemon.run(shutdown).await?;
    eprintln!(
        "stopped: {} job(s) started, {} run(s) skipped, {} cancelled",
        summary.started, summary.skipped, summary.cancelled
    );
    Ok(ExitCode::SUCCESS)
}

fn short(t: Option<Timestamp>) -> String {
    t.map(|t| t.strftime("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| "-".into())
}

/// `jobs`: the daemon's job history.
pub fn jobs(a: JobsArgs) -> Result<ExitCode> {
    let history = History::open_read_only(&a.state_dir)?;
    let jobs: Vec<JobRecord> = history.jobs(a.vm.as_deref(), a.limit)?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "jobs": jobs }))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    if jobs.is_empty() {
        eprintln!("no jobs");
    }
    for j in &jobs {
        let secs = j
            .ended
            .map(|e| format!("{}s", e.duration_since(j.started).as_secs()))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:>5} {:<16} {:<9} sched {:<19} start {:<19} {:>6} {:<21} snap {:<9} xfer {:<9} {} {}",
            j.id,
            j.vm,
            j.trigger,
            short(j.scheduled),
            short(Some(j.started)),
            secs,
            j.state,
            j.snapshot,
            j.transfer,
            j.point.as_deref().unwrap_or("-"),
            j.error.as_deref().unwrap_or("")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `list --snapshot-dir DIR`: every point with its tier.
pub async fn list(vault: &str, snapshot_dir: &Path, vm: Option<&str>, json: bool) -> Result<()> {
    let vault = Vault::open_with(vault, &crate::keys::vault_options()?).await?;
    let list = vault.list_points(vm).await?;
    let store = SnapshotStore::new(snapshot_dir);
    let kept: Vec<_> = store
        .list(vm)?
        .into_iter()
        .filter(|k| k.present())
        .collect();
    let has_kept = |vm: &str, id: &str| kept.iter().any(|k| k.vm == vm && k.point == id);
    let snapshot_only: Vec<_> = kept
        .iter()
        .filter(|k| !list.points.iter().any(|p| p.vm == k.vm && p.id == k.point))
        .collect();
    if json {
        let mut points = Vec::new();
        for p in &list.points {
            let mut v = serde_json::to_value(p)?;
            if let Some(o) = v.as_object_mut() {
                let tier = Tier::of(has_kept(&p.vm, &p.id), true).unwrap_or(Tier::Vault);
                o.insert("tier".into(), serde_json::to_value(tier)?);
            }
            points.push(v);
        }
        for k in &snapshot_only {
            points.push(serde_json::json!({
                "id": k.point, "vm": k.vm, "created": k.created, "tier": Tier::Snapshot,
                "snapshot_state": k.state, "expires": k.expires,
                "disks": k.disks.iter().map(|d| serde_json::json!({"name": d.name, "size": d.size})).collect::<Vec<_>>(),
            }));
        }
        let broken: Vec<_> = list
            .broken
            .iter()
            .map(|(k, e)| serde_json::json!({"key": k, "error": e.to_string()}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"points": points, "broken": broken}))?
        );
        return Ok(());
    }
    if list.points.is_empty() && snapshot_only.is_empty() {
        eprintln!("no recovery points");
    }
    for p in &list.points {
        let size: u64 = p.disks.iter().map(|d| d.size).sum();
        let tier = Tier::of(has_kept(&p.vm, &p.id), true).unwrap_or(Tier::Vault);
        println!(
            "{:<20} {:<32} {:<20} {:<12} {:>10}  {}",
            p.vm,
            p.id,
            p.created.strftime("%Y-%m-%d %H:%M:%S UTC"),
            p.consistency.reached,
            ui::human(size),
            tier.as_str()
        );
    }
    for k in snapshot_only {
        let size: u64 = k.disks.iter().map(|d| d.size).sum();
        println!(
            "{:<20} {:<32} {:<20} {:<12} {:>10}  snapshot (transfer {:?})",
            k.vm,
            k.point,
            k.created.strftime("%Y-%m-%d %H:%M:%S UTC"),
            "-",
            ui::human(size),
            k.state
        );
    }
    for (k, e) in &list.broken {
        println!("BROKEN {k}: {e}");
    }
    Ok(())
}

/// The output of `restore --snapshot-dir DIR`: which tier, verified or not.
pub fn show_restore(r: &RestoreReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    if let Some(why) = &r.snapshot_rejected {
        eprintln!("kept snapshot rejected ({why}); restored from the vault");
    }
    eprintln!(
        "restored {}/{} disk {} to {} from the {}{}: {}",
        r.vm,
        r.point,
        r.disk,
        r.to.display(),
        match r.source {
            Tier::Snapshot => "kept snapshot (fast path)",
            _ => "vault",
        },
        if r.verified {
            ", every block verified"
        } else {
            ", NOT verified (the point never reached the vault)"
        },
        ui::human(r.size)
    );
    Ok(())
}
