//! Retention commands: `prune`, `undelete`, `gc`, `list-deleted`, `locks`, and
//! `policy check|next`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bulwark_policy::Policy;
use bulwark_vault::{GcOptions, LeaseOptions};
use clap::{Args, Subcommand};
use jiff::Timestamp;

use crate::ui::{self, parse_duration};
use crate::{VaultArg, open};

#[derive(Debug, Args)]
pub struct PruneArgs {
    #[command(flatten)]
    vault: VaultArg,
    /// The VM whose points to prune.
    #[arg(long)]
    vm: String,
    /// The policy file (TOML) whose retention applies.
    #[arg(long, value_name = "FILE")]
    policy: PathBuf,
    /// Show what would be deleted and purged, change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Evaluate retention as of this instant instead of now (e.g. 2026-12-01T00:00:00Z).
    #[arg(long, value_name = "TIME")]
    now: Option<Timestamp>,
    /// Declare that no other Bulwark process writes to this vault meanwhile. Required on a
    /// store that ignores conditional (create-only) writes, where leases cannot keep two
    /// writers apart (`init` records whether the store honours them).
    #[arg(long)]
    single_writer: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct UndeleteArgs {
    #[command(flatten)]
    vault: VaultArg,
    /// The VM.
    #[arg(long)]
    vm: String,
    /// The soft-deleted point's id (see `list-deleted`).
    #[arg(long)]
    point: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    #[command(flatten)]
    vault: VaultArg,
    /// Unreferenced objects younger than this are kept (e.g. 1h, 30m, 90s, 2d, 0).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    grace: Duration,
    /// How long to wait for running backups and prunes to finish (default: refuse at once).
    #[arg(long, default_value = "0", value_parser = parse_duration)]
    wait: Duration,
    /// Count what would be freed, delete nothing.
    #[arg(long)]
    dry_run: bool,
    /// Declare that no other Bulwark process writes to this vault meanwhile. Required on a
    /// store that ignores conditional (create-only) writes, where leases cannot keep two
    /// writers apart (`init` records whether the store honours them).
    #[arg(long)]
    single_writer: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct ListDeletedArgs {
    #[command(flatten)]
    vault: VaultArg,
    /// Only this VM.
    #[arg(long)]
    vm: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct LocksArgs {
    #[command(flatten)]
    vault: VaultArg,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Parse and validate a policy file and print its summary.
    Check {
        /// The policy file (TOML).
        file: PathBuf,
    },
    /// Show the next run times of a policy's schedule, in its time zone.
    Next {
        /// The policy file (TOML).
        file: PathBuf,
        /// How many runs to show.
        #[arg(long, default_value_t = 5)]
        count: usize,
        /// Runs after this instant (default: now), e.g. 2026-03-28T12:00:00Z.
        #[arg(long, value_name = "TIME")]
        after: Option<Timestamp>,
    },
}

fn read_policy(file: &PathBuf) -> Result<Policy> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read policy file {}", file.display()))?;
    // The error names the file, line and field: print it as is.
    Ok(Policy::from_toml_str(&text, &file.display().to_string())?)
}

fn json(value: &impl serde::Serialize) -> Result<serde_json::Value> {
    Ok(serde_json::to_value(value)?)
}

pub async fn prune(a: PruneArgs) -> Result<()> {
    let policy = read_policy(&a.policy)?;
    let vault = open(&a.vault).await?;
    let now = a.now.unwrap_or_else(Timestamp::now);
    let mut lease = LeaseOptions::default().waiting(bulwark_controller::PRUNE_LEASE_WAIT);
    lease.single_writer = a.single_writer;
    let report =
        bulwark_controller::prune_with(&vault, &a.vm, &policy, now, a.dry_run, &lease).await?;
    ui::show(a.json, &json(&report)?, &report, false, "")
}

pub async fn undelete(a: UndeleteArgs) -> Result<()> {
    let vault = open(&a.vault).await?;
    let point = bulwark_controller::undelete(&vault, &a.vm, &a.point).await?;
    let text = format!(
        "{}\nrecovery point {}/{} is live again",
        point.id, point.vm, point.id
    );
    ui::show(a.json, &json(&point)?, &text, false, "")
}

pub async fn gc(a: GcArgs) -> Result<()> {
    let vault = open(&a.vault).await?;
    let mut lease = LeaseOptions::default().waiting(a.wait);
    lease.single_writer = a.single_writer;
    let (grace, dry_run) = (a.grace, a.dry_run);
    let options = GcOptions {
        grace,
        dry_run,
        lease,
    };
    let report = bulwark_controller::gc(&vault, &options).await?;
    ui::show(a.json, &json(&report)?, &report, false, "")
}

pub async fn list_deleted(a: ListDeletedArgs) -> Result<()> {
    crate::list_deleted(&a.vault, a.vm.as_deref(), a.json).await
}

pub async fn locks(a: LocksArgs) -> Result<()> {
    let leases = bulwark_vault::lease::list_leases(&open(&a.vault).await?).await?;
    let listing = bulwark_vault::LeaseListing {
        leases,
        now: Timestamp::now(),
    };
    let none = "no leases: no backup, prune or GC is running";
    ui::show(
        a.json,
        &listing.to_json(),
        &listing,
        listing.leases.is_empty(),
        none,
    )
}

pub fn policy(cmd: PolicyCommand) -> Result<()> {
    match cmd {
        PolicyCommand::Check { file } => println!("{}", read_policy(&file)?),
        PolicyCommand::Next { file, count, after } => {
            let policy = read_policy(&file)?;
            if count == 0 {
                bail!("--count must be at least 1");
            }
            for t in policy.next_runs(after.unwrap_or_else(Timestamp::now), count) {
                println!("{}", policy.display_time(t));
            }
        }
    }
    Ok(())
}
