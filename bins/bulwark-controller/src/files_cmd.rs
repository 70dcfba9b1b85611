//! `bulwark-controller files ls|get|cat`: files from a recovery point without restoring the
//! disk. The guest's file system is read in user space (never mounted on the host), and only
//! the vault blocks the request needs are fetched.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use bulwark_recovery::files::{self, GetOptions, Kind, Report, Source};
use clap::{Args, Subcommand};

/// Read files of a point's disk.
#[derive(Debug, Subcommand)]
pub enum FilesCommand {
    /// List a directory (or show one file) of the point's file system.
    Ls(LsArgs),
    /// Copy files, symlinks and directories out, keeping modes, times, symlinks and (as
    /// root) owners. `/a/b` is written to `TO/a/b`; nothing already there is replaced.
    Get(GetArgs),
    /// Write one file's bytes to standard output.
    Cat(CatArgs),
}

#[derive(Debug, Args)]
pub struct Common {
    #[command(flatten)]
    at: crate::PointDiskArg,
    /// Read partition N (MBR slot or GPT entry number) instead of the whole disk.
    #[arg(long, value_name = "N")]
    partition: Option<u32>,
    #[command(flatten)]
    reader: crate::ReaderArgs,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

impl Common {
    fn source(&self) -> Source {
        Source {
            vm: self.at.vm.clone(),
            point: self.at.point.clone(),
            disk: self.at.disk.clone(),
            partition: self.partition,
            options: self.reader.options(),
        }
    }
}

#[derive(Debug, Args)]
pub struct LsArgs {
    #[command(flatten)]
    common: Common,
    /// The path in the guest file system.
    #[arg(default_value = "/")]
    path: String,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    #[command(flatten)]
    common: Common,
    /// Paths in the guest file system.
    #[arg(required = true)]
    paths: Vec<String>,
    /// An existing directory to write them into.
    #[arg(long, value_name = "DIR")]
    to: PathBuf,
}

#[derive(Debug, Args)]
pub struct CatArgs {
    #[command(flatten)]
    common: Common,
    /// The file in the guest file system.
    path: String,
}

/// Runs a `files` subcommand.
pub async fn run(cmd: FilesCommand) -> Result<ExitCode> {
    match cmd {
        FilesCommand::Ls(a) => {
            let vault = crate::open(&a.common.at.vault).await?;
            let (entries, report) = files::list(&vault, &a.common.source(), &a.path).await?;
            if a.common.json {
                let out = serde_json::json!({ "entries": entries, "report": report });
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                let mut out = std::io::stdout().lock();
                for e in &entries {
                    let kind = match e.kind {
                        Kind::File => '-',
                        Kind::Dir => 'd',
                        Kind::Symlink => 'l',
                        Kind::Other => '?',
                    };
                    let mtime = e
                        .mtime
                        .and_then(|t| jiff::Timestamp::from_second(t).ok())
                        .map_or_else(|| "-".to_string(), |t| t.to_string());
                    let target = e
                        .target
                        .as_ref()
                        .map(|t| format!(" -> {t}"))
                        .unwrap_or_default();
                    writeln!(
                        out,
                        "{kind}{:04o} {:>6}:{:<6} {:>12} {mtime} {}{target}",
                        e.mode, e.uid, e.gid, e.size, e.path
                    )?;
                }
                summary(&report, false);
            }
        }
        FilesCommand::Get(a) => {
            let vault = crate::open(&a.common.at.vault).await?;
            let options = GetOptions {
                owner: rustix::process::geteuid().is_root(),
            };
            let report = files::get(&vault, &a.common.source(), &a.paths, &a.to, options)
                .await
                .with_context(|| format!("files get into {}", a.to.display()))?;
            if a.common.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                summary(&report, true);
            }
        }
        FilesCommand::Cat(a) => {
            let vault = crate::open(&a.common.at.vault).await?;
            let (_, report) =
                files::cat(&vault, &a.common.source(), &a.path, std::io::stdout()).await?;
            if a.common.json {
                eprintln!("{}", serde_json::to_string_pretty(&report)?);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn summary(r: &Report, wrote: bool) {
    let what = if wrote { "wrote" } else { "listed" };
    eprintln!(
        "{what} {} files, {} directories, {} symlinks ({}) from {}/{} disk {}; fetched {} blocks ({}) from the vault",
        r.files,
        r.dirs,
        r.symlinks,
        bulwark_vault::HumanBytes(r.bytes_written),
        r.vm,
        r.point,
        r.disk,
        r.fetch.blocks_fetched,
        bulwark_vault::HumanBytes(r.vault_bytes_down),
    );
    for s in &r.skipped {
        eprintln!("skipped {s}");
    }
}
