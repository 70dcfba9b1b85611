//! `bulwark-controller`: back up, restore and verify VM disks. A thin CLI over the
//! `bulwark-controller` library.

mod agent_cmd;
mod api_cmd;
mod daemon_cmd;
mod export_cmd;
mod files_cmd;
mod instant_cmd;
mod keys;
mod mount_cmd;
mod retention_cmd;
mod ui;
mod vault_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};

use bulwark_controller::tiers::{SnapshotStore, TieredList};
use bulwark_controller::{BackupRequest, KeepSnapshots, RestoreRequest, run_backup};
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
    Demo(ui::DemoArgs),
    /// Run the scheduled daemon: back up each configured VM at its policy's times.
    Serve(daemon_cmd::ServeArgs),
    /// Show the daemon's job history (or `jobs cancel ID`: cancel a running job).
    Jobs(daemon_cmd::JobsCmd),
    /// Ask the running daemon to back up a VM now (through its HTTP API).
    RunNow(api_cmd::RunNowArgs),
    /// API tokens for the daemon's HTTP API.
    #[command(subcommand)]
    Token(api_cmd::TokenCommand),
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
    /// Vault repair: `vault undelete` brings back objects hidden by plain deletes in an
    /// immutable S3 vault.
    #[command(subcommand)]
    Vault(vault_cmd::VaultCmd),
    /// Files from a point without a full restore: ls, get, cat (read in user space).
    #[command(subcommand)]
    Files(files_cmd::FilesCommand),
    /// Serve a point's disk read-only over NBD until SIGTERM/SIGINT.
    Export(export_cmd::ExportArgs),
    /// Run a VM from a point at once: serve the point over NBD as the backing file of a new
    /// qcow2 overlay, then (with --qmp) stream it into the overlay while the VM runs.
    InstantRestore(instant_cmd::InstantArgs),
    /// Mount a point's disk read-only as an image file (FUSE) until SIGTERM/SIGINT. Mounting
    /// the guest file system inside it is at your own risk: it is untrusted input.
    Mount(mount_cmd::MountArgs),
}

#[derive(Debug, Args)]
struct VaultArg {
    /// The vault: a directory path, file://PATH, az://CONTAINER[/PREFIX] or s3://BUCKET[/PREFIX]
    /// (credentials and endpoints from the AZURE_*/AWS_* environment variables).
    #[arg(long, env = "BULWARK_VAULT", value_name = "PATH|URL")]
    vault: String,
}

/// One disk of one recovery point, as every command that reads a point names it.
#[derive(Debug, Args)]
struct PointDiskArg {
    #[command(flatten)]
    vault: VaultArg,
    /// The VM.
    #[arg(long)]
    vm: String,
    /// The point: an id from `list`, or `latest`.
    #[arg(long, default_value = "latest")]
    point: String,
    /// The disk's name in the point (also the NBD export name when it is served).
    #[arg(long)]
    disk: String,
}

/// How a point's disk is read on demand: verified blocks, through a bounded cache.
#[derive(Debug, Args)]
struct ReaderArgs {
    /// Block cache size.
    #[arg(long, default_value = "64MiB", value_parser = ui::parse_size)]
    cache: u64,
    /// Blocks fetched at once for one large read.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Blocks fetched ahead of a sequential reader.
    #[arg(long, default_value_t = 4)]
    readahead: u32,
}

impl ReaderArgs {
    fn options(&self) -> bulwark_recovery::DiskOptions {
        bulwark_recovery::DiskOptions {
            cache_bytes: self.cache,
            readahead_blocks: self.readahead,
            concurrency: self.concurrency,
        }
    }
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
    /// Make the vault immutable: every object write-once for N days, in compliance mode (S3
    /// Object Lock; the bucket must have been created with Object Lock enabled; its default
    /// retention is set to N days). Nobody with the vault's credentials can delete a locked
    /// version; prune and GC hide objects and free their space after the retention. Refused
    /// for local directories (not enforceable) and Azure (not supported).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=36500))]
    immutable_days: Option<u32>,
    /// Tests only: an immutable vault whose objects are locked for N seconds, each by its own
    /// retention after its PUT (a bucket default cannot be shorter than a day).
    #[arg(long, value_name = "N", hide = true, conflicts_with = "immutable_days")]
    immutable_test_seconds: Option<u64>,
}

#[derive(Debug, Args)]
struct BackupArgs {
    #[command(flatten)]
    vault: VaultArg,
    /// The VM's name (letters, digits, '.', '_', '-').
    #[arg(long)]
    vm: String,
    /// Take the VM over from the host that owns it in the vault (each VM is backed up by
    /// its owner only; the first backup claims it). Use it once the old owner no longer
    /// backs the VM up: its next backup of the VM is refused.
    #[arg(long)]
    take_over: bool,
    /// A disk: of a running VM (with --qmp) its block device name as `query-block` reports it
    /// (e.g. `os` for `-drive id=os,...`); of a stopped VM its image as [NAME=]PATH (qcow2 or
    /// raw). Repeat for each disk. With --qmp and no --disk: every writable disk of the VM.
    #[arg(long = "disk", value_name = "NAME | [NAME=]PATH")]
    disks: Vec<String>,
    /// The running VM's QMP socket (`unix:PATH`): its disks are taken at one instant by QEMU
    /// (copy-before-write fleecing), read over NBD, and an incremental reads only what QEMU's
    /// dirty bitmap marks changed.
    #[arg(long, value_name = "unix:PATH")]
    qmp: Option<String>,
    /// For image files: auto (qcow2 through qemu-storage-daemon; raw: a reflink on XFS or
    /// btrfs, else read in place), reflink, copy (a sparse copy of each raw image), or in-place
    /// (no snapshot: qcow2 through qemu-storage-daemon, raw read directly; either way locked
    /// the way QEMU locks images, so no VM can open them for writing meanwhile).
    #[arg(long, default_value = "auto")]
    snapshot: bulwark_controller::sources::SnapshotMode,
    /// Private directory for the NBD sockets of QEMU's exports. A later backup finds here what
    /// a killed one left behind.
    #[arg(long, value_name = "DIR", default_value = "/run/bulwark")]
    runtime_dir: PathBuf,
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
    /// Ask the vault (HEAD) whether every block of the previous point is still there before
    /// reusing it; a missing one is read from the disk and stored again. Blocks `verify`
    /// recorded as bad are re-read always.
    #[arg(long)]
    check_known: bool,
    /// How long to wait while a garbage collection holds the vault (e.g. 0, 90s, 10m).
    #[arg(long, default_value = "10m", value_parser = ui::parse_duration)]
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
    at: PointDiskArg,
    /// The image to write (written beside it first, renamed into place when complete).
    #[arg(long, value_name = "PATH")]
    to: PathBuf,
    /// The image format: raw (sparse) or qcow2 (through `qemu-img convert`).
    #[arg(long, default_value = "raw")]
    format: bulwark_controller::sources::ImageFormat,
    /// Replace the target if it exists (a regular file only: a symbolic link or a device is
    /// always refused; see --in-place for devices).
    #[arg(long, conflicts_with = "in_place")]
    force: bool,
    /// Repair an existing target (an image file, or a block device that is not mounted) in
    /// place: read it, compare each block with the point's manifest and write only the blocks
    /// that differ; an image file is set to the disk's size. An interrupted run is safe to
    /// run again. Reports the bytes compared and written.
    #[arg(long, conflicts_with_all = ["snapshot_dir", "format"])]
    in_place: bool,
    /// Blocks fetched at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Kept snapshots (the daemon's snapshot_dir): restore from the point's kept snapshot when
    /// there is one, verified block by block against the vault's manifest.
    #[arg(long, value_name = "DIR")]
    snapshot_dir: Option<PathBuf>,
    /// DANGER: restore a point that never reached the vault from its kept snapshot as it is,
    /// NOT verified (there is no manifest to verify it against). Without it such a point is
    /// refused.
    #[arg(long, requires = "snapshot_dir")]
    trust_unverified_snapshot: bool,
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
    // First thing: this process may be the watchdog of a qemu-guest-agent freeze.
    if let Some(code) = bulwark_qemu::qga::dispatch_watchdog() {
        return code;
    }
    // `generate-assets --out DIR` (hidden): man pages and completions for the package.
    if let Some(code) = bulwark_cli_assets::dispatch(
        std::env::args_os(),
        <Cli as clap::CommandFactory>::command,
        bulwark_cli_assets::ManPages::PerCommand,
    ) {
        return code;
    }
    let cli = Cli::parse();
    if matches!(cli.command, Command::Serve(_)) {
        keep_daemon_rss_flat();
    }
    keys::init(&cli.keys);
    ui::init_logging(cli.verbose);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build();
    let result = match runtime {
        Ok(r) => r.block_on(run(cli.command)),
        Err(e) => Err(anyhow::anyhow!("cannot start the async runtime: {e}")),
    };
    result.unwrap_or_else(|e| {
        eprintln!("error: {}", ui::error_text(&e));
        ExitCode::FAILURE
    })
}

/// For the long-lived `serve` daemon: glibc malloc serves allocations of 256 KiB and more (the
/// backups' block and compression buffers) from `mmap` and returns them on free. With glibc's
/// default (a threshold that rises after the first large free), a daemon backing up 4 VMs every
/// 10 s kept a flat live heap (25.7 MiB in heaptrack over 56 jobs) while its RSS grew by about
/// 4 MiB every 30 s with no request at all: freed buffers stayed resident in the malloc arenas.
/// With the fixed threshold it grew by under 1 MiB over three such rounds (BENCHMARKS.md, "HTTP
/// API under load"). One-shot commands exit and keep glibc's default.
fn keep_daemon_rss_flat() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a tunable of glibc's allocator (it takes the arena locks
    // itself); it is called before the async runtime starts any thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}

/// Opens the vault of a command with this run's options (key file, store settings).
async fn open(vault: &VaultArg) -> Result<Vault> {
    Ok(Vault::open_with(&vault.vault, &keys::vault_options()?).await?)
}

async fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Init(a) => {
            keys::check_init(&a.encrypt)?;
            let options = create_options(a.block_size, a.compression_level)?;
            let retention = match (a.immutable_days, a.immutable_test_seconds) {
                (Some(d), _) => Some(bulwark_vault::immutable::Retention::Days(d)),
                (None, Some(s)) => Some(bulwark_vault::immutable::Retention::Seconds(s)),
                (None, None) => None,
            };
            let open = keys::vault_options()?;
            let v = match retention {
                Some(r) => Vault::create_immutable_with(&a.vault.vault, &options, &open, r).await?,
                None => Vault::create_with(&a.vault.vault, &options, &open).await?,
            };
            println!("created vault {} at {}", v.config().id, v.location());
            if let Some(i) = v.immutability() {
                println!(
                    "immutable: {} {} mode, every object locked for {} s ({})",
                    i.mechanism, i.mode, i.retention_secs, i.applied
                );
            }
        }
        Command::Backup(a) => backup(a).await?,
        Command::List(a) if a.deleted => list_deleted(&a.vault, a.vm.as_deref(), a.json).await?,
        Command::List(a) => list(a).await?,
        Command::Restore(a) => restore(a).await?,
        Command::Verify(a) => {
            let vault = open(&a.vault).await?;
            let bars = ui::Bars::new(!a.json);
            let cb = bars.clone();
            let progress = move |done, total| cb.set("verify", done, total);
            let (report, health) =
                bulwark_controller::verify(&vault, a.vm.as_deref(), &progress).await?;
            bars.clear();
            let mut json = report.to_json();
            json["bad_blocks_recorded"] = health.recorded.into();
            json["bad_block_records_cleared"] = health.cleared.into();
            ui::show(a.json, &json, &report, false, "")?;
            if !a.json && health.recorded > 0 {
                eprintln!(
                    "{} bad block(s) recorded in the vault: `list` names the points that need them; the next backup of a disk that still holds the data heals them",
                    health.recorded
                );
            }
            return Ok(ui::exit(report.is_ok()));
        }
        Command::Demo(a) => {
            let report = bulwark_controller::run_demo(a.request()?).await?;
            println!("{report}");
            return Ok(ui::exit(report.is_ok()));
        }
        Command::Serve(a) => daemon_cmd::serve(a).await?,
        Command::Jobs(a) => match a.command {
            Some(daemon_cmd::JobsSub::Cancel(c)) => api_cmd::cancel(c).await?,
            None => daemon_cmd::jobs(a.list)?,
        },
        Command::RunNow(a) => api_cmd::run_now(a).await?,
        Command::Token(a) => api_cmd::token(a)?,
        Command::Key(a) => keys::run(a)?,
        Command::Enroll(a) => agent_cmd::enroll(a)?,
        Command::Prune(a) => retention_cmd::prune(a).await?,
        Command::Undelete(a) => retention_cmd::undelete(a).await?,
        Command::Vault(c) => vault_cmd::run(c).await?,
        Command::Gc(a) => retention_cmd::gc(a).await?,
        Command::ListDeleted(a) => retention_cmd::list_deleted(a).await?,
        Command::Locks(a) => retention_cmd::locks(a).await?,
        Command::Policy(a) => retention_cmd::policy(a)?,
        Command::Files(a) => return files_cmd::run(a).await,
        Command::Export(a) => return export_cmd::run(a).await,
        Command::InstantRestore(a) => return instant_cmd::run(a).await,
        Command::Mount(a) => return mount_cmd::run(a).await,
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
    let zstd_level = (level > 0).then_some(level);
    Ok(CreateOptions {
        block_size,
        zstd_level,
    })
}

async fn backup(a: BackupArgs) -> Result<()> {
    bulwark_vault::validate_name("vm", &a.vm)?;
    std::fs::create_dir_all(&a.runtime_dir)
        .with_context(|| format!("create the runtime directory {}", a.runtime_dir.display()))?;
    let spec = bulwark_controller::sources::SourceSpec {
        qmp: a.qmp.clone(),
        disks: a.disks.clone(),
        mode: a.snapshot,
        snapshot_dir: a.snapshot_dir.clone(),
        change_tracking: !a.no_change_tracking,
        socket_dir: a.runtime_dir.clone(),
        keep_snapshots: a.keep_snapshot_days.is_some(),
    };
    let snapshotter = bulwark_controller::sources::snapshotter(&spec)?;
    let mut req = BackupRequest::new(a.vm, snapshotter);
    req.upload_concurrency = a.upload_concurrency;
    req.check_known = a.check_known;
    req.take_over = a.take_over;
    req.lease = req.lease.waiting(a.lease_wait);
    req.quiesce = a.quiesce.quiesce()?;
    if let (Some(days), Some(dir)) = (a.keep_snapshot_days, a.snapshot_dir) {
        let store = SnapshotStore::new(dir);
        req.keep_snapshots = Some(KeepSnapshots { store, days });
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
        eprint!("{report}");
    }
    Ok(())
}

async fn list(a: ListArgs) -> Result<()> {
    let vault = open(&a.vault).await?;
    let vm = a.vm.as_deref();
    if let Some(dir) = &a.snapshot_dir {
        let list = TieredList::load(&vault, &SnapshotStore::new(dir), vm).await?;
        return ui::show(
            a.json,
            &list.to_json(),
            &list,
            list.is_empty(),
            "no recovery points",
        );
    }
    let list = vault.list_points_with_health(vm).await?;
    let empty = list.points.is_empty() && list.broken.is_empty();
    ui::show(a.json, &list.to_json(), &list, empty, "no recovery points")
}

async fn list_deleted(vault: &VaultArg, vm: Option<&str>, json: bool) -> Result<()> {
    let list = open(vault).await?.list_deleted(vm).await?;
    let empty = list.points.is_empty() && list.broken.is_empty();
    ui::show(
        json,
        &list.to_json(),
        &list,
        empty,
        "no soft-deleted recovery points",
    )
}

async fn restore(a: RestoreArgs) -> Result<()> {
    let vault = open(&a.at.vault).await?;
    let progress = ui::Bars::new(!a.json);
    let mut req = RestoreRequest::new(a.at.vm, a.at.point, a.at.disk, a.to);
    req.force = a.force;
    req.concurrency = a.concurrency;
    if a.in_place {
        req.observer = progress.clone();
        let report = bulwark_controller::run_restore_in_place(req, &vault).await?;
        progress.clear();
        if a.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            eprint!("{report}");
        }
        return Ok(());
    }
    let trust = a.trust_unverified_snapshot;
    req.snapshots = a
        .snapshot_dir
        .map(|d| SnapshotStore::new(d).trusting_unverified(trust));
    req.observer = progress.clone();
    let report = bulwark_controller::sources::run_restore_as(req, a.format, &vault).await?;
    progress.clear();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        eprintln!("{report}");
    }
    Ok(())
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
