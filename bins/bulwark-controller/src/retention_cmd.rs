//! Retention commands: `prune`, `undelete`, `gc`, `list-deleted`, `locks`, and
//! `policy check|next`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bulwark_policy::Policy;
use bulwark_vault::lease::list_leases;
use bulwark_vault::{GcOptions, LeaseOptions, Vault};
use clap::{Args, Subcommand};
use jiff::Timestamp;

use crate::{VaultArg, ui};

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

/// Parses `90s`, `30m`, `1h`, `2d`, `0` (seconds without a unit).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90s, 30m, 1h or 2d"))?;
    let secs = match unit.trim() {
        "" | "s" => 1,
        "m" | "min" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => {
            return Err(format!(
                "unknown duration unit {other:?} (use s, m, h or d)"
            ));
        }
    };
    n.checked_mul(secs)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{s:?} is too long"))
}

fn read_policy(file: &PathBuf) -> Result<Policy> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read policy file {}", file.display()))?;
    // The error names the file, line and field: print it as is.
    Policy::from_toml_str(&text, &file.display().to_string()).map_err(|e| anyhow::anyhow!("{e}"))
}

fn json(value: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub async fn prune(a: PruneArgs) -> Result<ExitCode> {
    let policy = read_policy(&a.policy)?;
    let vault = Vault::open_with(&a.vault.vault, &crate::keys::vault_options()?).await?;
    let now = a.now.unwrap_or_else(Timestamp::now);
    let report = bulwark_controller::prune(&vault, &a.vm, &policy, now, a.dry_run).await?;
    if a.json {
        json(&report)?;
    } else {
        let (del, pur) = if a.dry_run {
            ("would delete", "would purge")
        } else {
            ("deleted", "purged")
        };
        for k in &report.kept {
            println!("keep   {}  ({})", k.id, k.reasons.join(", "));
        }
        for id in &report.deleted {
            println!("{del} {id}");
        }
        for id in &report.purged {
            println!("{pur} {id}");
        }
        for k in &report.broken {
            println!("BROKEN {k} (left alone)");
        }
        eprintln!(
            "{}: {} kept, {} soft-deleted (kept {} days, `undelete` brings them back), {} purged",
            report.vm,
            report.kept.len(),
            report.deleted.len(),
            report.soft_delete_days,
            report.purged.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn undelete(a: UndeleteArgs) -> Result<ExitCode> {
    let vault = Vault::open_with(&a.vault.vault, &crate::keys::vault_options()?).await?;
    let point = bulwark_controller::undelete(&vault, &a.vm, &a.point).await?;
    if a.json {
        json(&point)?;
    } else {
        println!("{}", point.id);
        eprintln!("recovery point {}/{} is live again", point.vm, point.id);
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn gc(a: GcArgs) -> Result<ExitCode> {
    let vault = Vault::open_with(&a.vault.vault, &crate::keys::vault_options()?).await?;
    let options = GcOptions {
        grace: a.grace,
        dry_run: a.dry_run,
        lease: LeaseOptions::default().waiting(a.wait),
    };
    let r = bulwark_controller::gc(&vault, &options).await?;
    if a.json {
        json(&r)?;
    } else {
        let verb = if r.dry_run { "would free" } else { "freed" };
        println!(
            "{verb} {} blocks ({}) and {} orphan manifests ({}); kept {} referenced blocks of {} live and {} soft-deleted points, {} unreferenced blocks younger than {}s",
            r.blocks_freed,
            ui::human(r.bytes_freed),
            r.manifests_freed,
            ui::human(r.manifest_bytes_freed),
            r.blocks_referenced,
            r.live_points,
            r.deleted_points,
            r.blocks_young,
            r.grace_secs
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn list_deleted(vault: &str, vm: Option<&str>, as_json: bool) -> Result<ExitCode> {
    let vault = Vault::open_with(vault, &crate::keys::vault_options()?).await?;
    let list = vault.list_deleted(vm).await?;
    if as_json {
        let broken: Vec<_> = list
            .broken
            .iter()
            .map(|(k, e)| serde_json::json!({"key": k, "error": e.to_string()}))
            .collect();
        json(&serde_json::json!({"deleted": list.points, "broken": broken}))?;
        return Ok(ExitCode::SUCCESS);
    }
    if list.points.is_empty() && list.broken.is_empty() {
        eprintln!("no soft-deleted recovery points");
    }
    for d in &list.points {
        println!(
            "{:<20} {:<32} {:<20} deleted {}  {}",
            d.point.vm,
            d.point.id,
            d.point.created.strftime("%Y-%m-%d %H:%M:%S UTC"),
            d.deleted.strftime("%Y-%m-%d %H:%M:%S UTC"),
            d.reason
        );
    }
    for (k, e) in &list.broken {
        println!("BROKEN {k}: {e}");
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn list_deleted_cmd(a: ListDeletedArgs) -> Result<ExitCode> {
    list_deleted(&a.vault.vault, a.vm.as_deref(), a.json).await
}

pub async fn locks(a: LocksArgs) -> Result<ExitCode> {
    let vault = Vault::open_with(&a.vault.vault, &crate::keys::vault_options()?).await?;
    let leases = list_leases(&vault).await?;
    let now = Timestamp::now();
    if a.json {
        let items: Vec<_> = leases
            .iter()
            .map(|(k, r)| match r {
                Ok(r) => serde_json::json!({"key": k, "lease": r, "live": r.is_live(now)}),
                Err(e) => serde_json::json!({"key": k, "error": e.to_string()}),
            })
            .collect();
        json(&items)?;
        return Ok(ExitCode::SUCCESS);
    }
    if leases.is_empty() {
        eprintln!("no leases: no backup, prune or GC is running");
    }
    for (k, r) in &leases {
        match r {
            Ok(r) => println!(
                "{k}: {}{}",
                r.describe(),
                if r.is_live(now) { "" } else { " (expired)" }
            ),
            Err(e) => println!("BROKEN {e}"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn policy(cmd: PolicyCommand) -> Result<ExitCode> {
    match cmd {
        PolicyCommand::Check { file } => {
            let policy = read_policy(&file)?;
            println!("{policy}");
        }
        PolicyCommand::Next { file, count, after } => {
            let policy = read_policy(&file)?;
            if count == 0 {
                bail!("--count must be at least 1");
            }
            let after = after.unwrap_or_else(Timestamp::now);
            for t in policy.next_runs(after, count) {
                println!("{}", policy.display_time(t));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("5y").unwrap_err().contains("unit"));
        assert!(parse_duration("99999999999999999999d").is_err());
    }
}
