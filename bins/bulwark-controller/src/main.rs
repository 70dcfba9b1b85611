//! `bulwark-controller`: back up, restore and verify VM disks. A thin CLI over the
//! `bulwark-controller` library.

mod agent_cmd;
mod assets;
mod daemon_cmd;
mod demo;
mod export_cmd;
mod files_cmd;
mod keys;
mod retention_cmd;
mod ui;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use std::sync::Arc;

use bulwark_controller::tiers::SnapshotStore;
use bulwark_controller::{
    BackupRequest, KeepSnapshots, Quiesce, RestoreRequest, run_backup, run_restore,
};
use bulwark_snapshot::{ImageDisk, ImageSnapshotter};
use bulwark_vault::{CreateOptions, Vault};
use clap::{Args, Parser, Subcommand};

/// Consistent, incremental backup of virtual-machine disks.
///
/// Bulwark snapshots each disk of a VM (a reflink clone where the file system allows it),
/// then transfers only the blocks that changed since the previous backup into a vault: a
/// local directory, or object storage. Every recovery point is complete: restoring one reads
/// one manifest per disk, never a chain.
///
/// Start with `bulwark-controller demo`, which does all of it on a sample disk image.
#[derive(Debug, Parser)]
#[command(name = "bulwark-controller", version, propagate_version = true)]
#[command(after_help = "Examples:
  bulwark-controller demo
  bulwark-controller backup --vault /srv/vault --vm web01 --disk os=/var/lib/libvirt/images/web01.img
  bulwark-controller list --vault /srv/vault --vm web01
  bulwark-controller restore --vault /srv/vault --vm web01 --disk os --to /tmp/web01-os.img
  bulwark-controller verify --vault /srv/vault

Logs go to stderr; set BULWARK_LOG=debug (or -v) for more.")]
struct Cli {
    /// More log output (-v: debug, -vv: trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(flatten)]
    keys: keys::GlobalKeyArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create an empty vault (a backup creates one too when there is none).
    Init(InitArgs),
    /// Back up the disks of a VM: snapshot them, transfer the changed blocks, commit a point.
    Backup(BackupArgs),
    /// List recovery points.
    List(ListArgs),
    /// Restore one disk of a recovery point to a sparse raw image, verifying every block.
    Restore(RestoreArgs),
    /// Check that every committed point restores: reads and verifies every object it needs.
    Verify(VerifyArgs),
    /// Make a sample disk image, back it up twice, restore and verify it (nothing to prepare).
    Demo(demo::DemoArgs),
    /// Run the scheduled daemon: back up each configured VM at its policy's times.
    Serve(daemon_cmd::ServeArgs),
    /// Show the daemon's job history.
    Jobs(daemon_cmd::JobsArgs),
    /// Create and manage the master keys of encrypted vaults.
    #[command(subcommand)]
    Key(keys::KeyCommand),
    /// Enroll a guest agent: issue its certificate and key (and the controller's, first time).
    Enroll(agent_cmd::EnrollArgs),
    /// Apply a policy's retention to a VM: soft-delete the points it does not keep, purge
    /// those soft-deleted longer ago than its soft-delete days.
    Prune(retention_cmd::PruneArgs),
    /// Bring a soft-deleted recovery point back.
    Undelete(retention_cmd::UndeleteArgs),
    /// Garbage collection: free blocks and manifests no live or soft-deleted point needs.
    Gc(retention_cmd::GcArgs),
    /// List soft-deleted recovery points (same as `list --deleted`).
    ListDeleted(retention_cmd::ListDeletedArgs),
    /// Show the leases of running backups, prunes and garbage collection.
    Locks(retention_cmd::LocksArgs),
    /// Check a policy file, or show when it runs next.
    #[command(subcommand)]
    Policy(retention_cmd::PolicyCommand),
    /// Files from a point without a full restore: ls, get, cat (read in user space).
    #[command(subcommand)]
    Files(files_cmd::FilesCommand),
    /// Serve a point's disk read-only over NBD until SIGTERM/SIGINT.
    Export(export_cmd::ExportArgs),
}

#[derive(Debug, Args)]
struct VaultArg {
    /// The vault: a directory path, file://PATH, az://CONTAINER[/PREFIX] or s3://BUCKET[/PREFIX]
    /// (credentials and endpoints from the AZURE_*/AWS_* environment variables).
    #[arg(long, env = "BULWARK_VAULT", value_name = "PATH|URL")]
    vault: String,
}

#[derive(Debug, Args)]
struct InitArgs {
    #[command(flatten)]
    vault: VaultArg,
    /// Block size of the disks in this vault: a power of two from 64KiB to 16MiB.
    #[arg(long, default_value = "1MiB", value_parser = ui::parse_size)]
    block_size: u64,
    /// zstd level for stored blocks (0 stores them uncompressed).
    #[arg(long, default_value_t = 1)]
    compression_level: i32,
    #[command(flatten)]
    encrypt: keys::EncryptArgs,
}

#[derive(Debug, Args)]
struct BackupArgs {
    #[command(flatten)]
    vault: VaultArg,
    /// The VM's name (letters, digits, '.', '_', '-').
    #[arg(long)]
    vm: String,
    /// A disk as [NAME=]PATH; repeat for each disk. Without NAME, the file name is used.
    #[arg(long = "disk", required = true, value_name = "[NAME=]PATH")]
    disks: Vec<String>,
    /// How to snapshot: reflink (FICLONE, instant), copy (sparse copy), or auto.
    #[arg(long, default_value = "auto")]
    snapshot: bulwark_snapshot::Provider,
    /// Where snapshot files go (default: .bulwark-snapshots beside each image; a reflink needs
    /// the same file system).
    #[arg(long, value_name = "DIR")]
    snapshot_dir: Option<PathBuf>,
    /// Keep the snapshots in --snapshot-dir for N days for instant restore (default: they are
    /// removed after the transfer).
    #[arg(long, value_name = "N", requires = "snapshot_dir", value_parser = clap::value_parser!(u32).range(1..))]
    keep_snapshot_days: Option<u32>,
    /// Do not keep a reflink clone of the last snapshot for change tracking. By default it is
    /// kept (in <snapshot dir>/<VM>/.base/) and the next backup reads only the blocks whose
    /// extents changed since; it holds on to the blocks the guest overwrites until then.
    #[arg(long)]
    no_change_tracking: bool,
    /// Blocks uploaded at once per disk.
    #[arg(long, default_value_t = 16)]
    upload_concurrency: usize,
    /// How long to wait while a garbage collection holds the vault (e.g. 0, 90s, 10m).
    #[arg(long, default_value = "10m", value_parser = retention_cmd::parse_duration)]
    lease_wait: std::time::Duration,
    #[command(flatten)]
    quiesce: agent_cmd::QuiesceArgs,
    /// Print one JSON object with the point and per-disk statistics.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct ListArgs {
    #[command(flatten)]
    vault: VaultArg,
    /// Only this VM.
    #[arg(long)]
    vm: Option<String>,
    /// List soft-deleted points instead (see `prune`, `undelete`).
    #[arg(long)]
    deleted: bool,
    /// Kept snapshots (the daemon's snapshot_dir, or backup's --snapshot-dir): show each
    /// point's tier (snapshot, snapshot and vault, vault).
    #[arg(long, value_name = "DIR")]
    snapshot_dir: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct RestoreArgs {
    #[command(flatten)]
    vault: VaultArg,
    /// The VM.
    #[arg(long)]
    vm: String,
    /// The point: an id from `list`, or `latest`.
    #[arg(long, default_value = "latest")]
    point: String,
    /// The disk's name in the point.
    #[arg(long)]
    disk: String,
    /// The raw image to write (written beside it first, renamed into place when complete).
    #[arg(long, value_name = "PATH")]
    to: PathBuf,
    /// Replace the target if it exists.
    #[arg(long)]
    force: bool,
    /// Blocks fetched at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Kept snapshots (the daemon's snapshot_dir): restore from the point's kept snapshot when
    /// there is one, verified block by block against the vault's manifest.
    #[arg(long, value_name = "DIR")]
    snapshot_dir: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct VerifyArgs {
    #[command(flatten)]
    vault: VaultArg,
    /// Only this VM's points.
    #[arg(long)]
    vm: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    if let Some(code) = assets::dispatch() {
        return code;
    }
    let cli = Cli::parse();
    keys::init(&cli.keys);
    ui::init_logging(cli.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Init(a) => {
            keys::check_init(&a.encrypt)?;
            let vault = Vault::create_with(
                &a.vault.vault,
                &create_options(a.block_size, a.compression_level)?,
                &keys::vault_options()?,
            )
            .await?;
            println!(
                "created vault {} at {}",
                vault.config().id,
                vault.location()
            );
        }
        Command::Backup(a) => backup(a).await?,
        Command::List(a) => list(a).await?,
        Command::Restore(a) => restore(a).await?,
        Command::Verify(a) => return verify(a).await,
        Command::Demo(a) => return demo::run(a).await,
        Command::Serve(a) => return daemon_cmd::serve(a).await,
        Command::Jobs(a) => return daemon_cmd::jobs(a),
        Command::Key(a) => return keys::run(a),
        Command::Enroll(a) => return agent_cmd::enroll(a),
        Command::Prune(a) => return retention_cmd::prune(a).await,
        Command::Undelete(a) => return retention_cmd::undelete(a).await,
        Command::Gc(a) => return retention_cmd::gc(a).await,
        Command::ListDeleted(a) => return retention_cmd::list_deleted_cmd(a).await,
        Command::Locks(a) => return retention_cmd::locks(a).await,
        Command::Policy(a) => return retention_cmd::policy(a),
        Command::Files(a) => return files_cmd::run(a).await,
        Command::Export(a) => return export_cmd::run(a).await,
    }
    Ok(ExitCode::SUCCESS)
}

fn create_options(block_size: u64, level: i32) -> Result<CreateOptions> {
    let block_size = u32::try_from(block_size)
        .ok()
        .and_then(|b| bulwark_blockdiff::BlockSize::new(b).ok())
        .context("--block-size must be a power of two from 64KiB to 16MiB")?;
    if !(0..=22).contains(&level) {
        bail!("--compression-level must be 0 (off) to 22");
    }
    Ok(CreateOptions {
        block_size,
        zstd_level: (level > 0).then_some(level),
    })
}

async fn backup(a: BackupArgs) -> Result<()> {
    let disks = a
        .disks
        .iter()
        .map(|d| ImageDisk::parse(d))
        .collect::<Result<Vec<_>, _>>()?;
    bulwark_vault::validate_name("vm", &a.vm)?;
    let mut snapshotter = ImageSnapshotter::new(disks)?;
    snapshotter.provider = a.snapshot;
    snapshotter.dir = a.snapshot_dir.clone();
    snapshotter.change_tracking = !a.no_change_tracking;
    let mut req = BackupRequest::new(a.vm, Arc::new(snapshotter));
    req.upload_concurrency = a.upload_concurrency;
    req.lease = req.lease.waiting(a.lease_wait);
    if a.quiesce.is_set() {
        let (agent, options) = agent_cmd::target(&a.quiesce)?;
        req.quiesce = Some(Quiesce { agent, options });
    }
    if let Some(days) = a.keep_snapshot_days {
        let dir = a
            .snapshot_dir
            .context("--keep-snapshot-days needs --snapshot-dir")?;
        req.keep_snapshots = Some(KeepSnapshots {
            store: SnapshotStore::new(dir),
            days,
        });
    }
    let progress = ui::Bars::new(!a.json);
    req.observer = progress.clone();
    let (vault, created) = Vault::open_or_create_with(
        &a.vault.vault,
        &CreateOptions::default(),
        &keys::vault_options()?,
    )
    .await?;
    if created {
        eprintln!("created a new vault at {}", vault.location());
    }
    let report = run_backup(req, &vault).await?;
    progress.clear();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}", report.point);
        for d in &report.disks {
            eprintln!(
                "  {}: {} in {} blocks, {} changed, {} read, {} uploaded{}",
                d.name,
                ui::human(d.size),
                d.stats.blocks,
                d.stats.changed_blocks,
                ui::human(d.stats.bytes_read),
                ui::human(d.stats.bytes_uploaded),
                d.previous_point
                    .as_ref()
                    .map(|p| format!(" (compared with {p})"))
                    .unwrap_or_default()
            );
        }
    }
    Ok(())
}

async fn list(a: ListArgs) -> Result<()> {
    if a.deleted {
        retention_cmd::list_deleted(&a.vault.vault, a.vm.as_deref(), a.json).await?;
        return Ok(());
    }
    if let Some(dir) = &a.snapshot_dir {
        return daemon_cmd::list(&a.vault.vault, dir, a.vm.as_deref(), a.json).await;
    }
    let vault = Vault::open_with(&a.vault.vault, &keys::vault_options()?).await?;
    let list = vault.list_points(a.vm.as_deref()).await?;
    if a.json {
        let broken: Vec<_> = list
            .broken
            .iter()
            .map(|(k, e)| serde_json::json!({"key": k, "error": e.to_string()}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"points": list.points, "broken": broken})
            )?
        );
        return Ok(());
    }
    if list.points.is_empty() && list.broken.is_empty() {
        eprintln!("no recovery points");
    }
    for p in &list.points {
        let size: u64 = p.disks.iter().map(|d| d.size).sum();
        let disks: Vec<_> = p.disks.iter().map(|d| d.name.as_str()).collect();
        println!(
            "{:<20} {:<32} {:<20} {:<12} {:>10}  {}",
            p.vm,
            p.id,
            p.created.strftime("%Y-%m-%d %H:%M:%S UTC"),
            p.consistency.reached,
            ui::human(size),
            disks.join(",")
        );
    }
    for (k, e) in &list.broken {
        println!("BROKEN {k}: {e}");
    }
    Ok(())
}

async fn restore(a: RestoreArgs) -> Result<()> {
    let vault = Vault::open_with(&a.vault.vault, &keys::vault_options()?).await?;
    let progress = ui::Bars::new(!a.json);
    let mut req = RestoreRequest::new(a.vm, a.point, a.disk, a.to);
    req.force = a.force;
    req.concurrency = a.concurrency;
    req.snapshots = a.snapshot_dir.clone().map(SnapshotStore::new);
    req.observer = progress.clone();
    let report = run_restore(req, &vault).await?;
    if a.snapshot_dir.is_some() {
        progress.clear();
        return daemon_cmd::show_restore(&report, a.json);
    }
    progress.clear();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        eprintln!(
            "restored {}/{} disk {} to {}: {} ({} written, {} blocks left as holes)",
            report.vm,
            report.point,
            report.disk,
            report.to.display(),
            ui::human(report.size),
            ui::human(report.bytes_written),
            report.zero_blocks
        );
    }
    Ok(())
}

async fn verify(a: VerifyArgs) -> Result<ExitCode> {
    let vault = Vault::open_with(&a.vault.vault, &keys::vault_options()?).await?;
    let bars = ui::Bars::new(!a.json);
    let cb = bars.clone();
    let report = vault
        .verify(a.vm.as_deref(), &move |done, total| {
            cb.set("verify", done, total)
        })
        .await?;
    bars.clear();
    if a.json {
        let problems: Vec<_> = report
            .problems
            .iter()
            .map(|p| serde_json::json!({"key": p.key, "error": p.message, "points": p.points}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "ok": report.is_ok(), "points": report.points, "manifests": report.manifests,
                "blocks": report.blocks, "bytes": report.bytes, "problems": problems,
            }))?
        );
    } else {
        for p in &report.problems {
            println!(
                "BAD {}: {} (breaks {})",
                p.key,
                p.message,
                p.points.join(", ")
            );
        }
        let verdict = if report.is_ok() { "OK" } else { "FAILED" };
        println!(
            "{verdict}: {} points, {} manifests, {} blocks ({}) verified; {} problems",
            report.points,
            report.manifests,
            report.blocks,
            ui::human(report.bytes),
            report.problems.len()
        );
    }
    Ok(if report.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }
}
