//! `serve` (the scheduled daemon) and `jobs` (its history).

use std::path::PathBuf;

use anyhow::Result;
use bulwark_daemon::config::Config;
use bulwark_daemon::history::History;
use bulwark_daemon::{Plan, ServeOptions, Server};
use clap::Args;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The daemon's configuration file (TOML: vault, state_dir, concurrency, [[vm]] entries
    /// with disks and a policy; a running QEMU VM: qmp = "unix:PATH" and block device names
    /// as disks; agent = "unix:PATH", "tcp:HOST:PORT", "virtio-serial:unix:PATH" or
    /// "qga:unix:PATH").
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
#[command(args_conflicts_with_subcommands = true)]
pub struct JobsCmd {
    #[command(subcommand)]
    pub command: Option<JobsSub>,
    #[command(flatten)]
    pub list: JobsArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum JobsSub {
    /// Cancel a running job through the daemon's API: it stops at its next safe point
    /// (snapshots released, nothing committed) and is recorded Cancelled.
    Cancel(crate::api_cmd::CancelArgs),
}

#[derive(Debug, Args)]
pub struct JobsArgs {
    /// The daemon's state directory (state_dir in its configuration).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
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
pub async fn serve(a: ServeArgs) -> Result<()> {
    let config = Config::load(&a.config)?;
    if a.check {
        println!("configuration {} is valid", a.config.display());
    }
    let now = jiff::Timestamp::now();
    eprint!(
        "{}",
        Plan {
            config: &config,
            now
        }
    );
    if a.check {
        return Ok(());
    }
    let vault = crate::keys::vault_options()?;
    let options = ServeOptions {
        vault,
        run_now: a.run_now,
        qga_watchdog: crate::agent_cmd::watchdog_program(),
    };
    let server = Server::open(&config, options).await?;
    eprint!("{server}");
    // The API is bound before any job runs: a taken port or a bad certificate stops here.
    let _api = match &config.http {
        Some(http) => {
            let api = bulwark_http::Api::bind(server.handles(), http).await?;
            let scheme = if api.is_tls() { "https" } else { "http" };
            if let Some(addr) = api.local_addr() {
                eprintln!("http API on {scheme}://{addr}");
            }
            Some(AbortOnDrop(tokio::spawn(api.serve())))
        }
        None => None,
    };
    let (vms, pid, state) = (
        config.vms.len(),
        std::process::id(),
        config.state_dir.display(),
    );
    let file = a.config.display();
    eprintln!("serving {vms} VM(s) from {file} (pid {pid}); state in {state}");
    eprintln!("{}", server.run_until_signalled().await?);
    Ok(())
}

/// Stops the API's task when `serve` returns.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `jobs`: the daemon's job history.
pub fn jobs(a: JobsArgs) -> Result<()> {
    let Some(state_dir) = &a.state_dir else {
        anyhow::bail!("--state-dir is required (the daemon's state_dir)");
    };
    let jobs = History::open_read_only(state_dir)?.jobs(a.vm.as_deref(), a.limit)?;
    let lines: Vec<String> = jobs.iter().map(ToString::to_string).collect();
    let value = serde_json::json!({ "jobs": jobs });
    crate::ui::show(
        a.json,
        &value,
        &lines.join("\n"),
        jobs.is_empty(),
        "no jobs",
    )
}
