//! `bulwark-agent`: the guest agent. A thin CLI over the `bulwark-agent` library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// The Bulwark guest agent: quiesces applications (pre/post scripts) and freezes file systems
/// (FIFREEZE, with a watchdog and a guardian process) for the controller's snapshots.
///
/// It serves a Unix socket (root only) or TCP with mutual TLS, as its configuration says.
#[derive(Debug, Parser)]
#[command(name = "bulwark-agent", version)]
#[command(
    after_help = "Example configuration: see the bulwark-agent crate's config module.

Logs go to stderr; set BULWARK_LOG=debug for more."
)]
struct Cli {
    /// The TOML configuration file (must be owned by root and not group/other-writable for
    /// scripts to run).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
}

fn main() -> ExitCode {
    // The freeze guardian re-executes this binary: dispatch before anything else.
    if let Some(code) = bulwark_quiesce::guardian::dispatch_guardian(std::env::args_os().skip(1)) {
        return code;
    }
    // `generate-assets --out DIR` (hidden): man pages and completions for the package.
    if let Some(code) = bulwark_cli_assets::dispatch(
        std::env::args_os(),
        <Cli as clap::CommandFactory>::command,
        bulwark_cli_assets::ManPages::Single { section: "8" },
    ) {
        return code;
    }
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("BULWARK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let config = match bulwark_agent::Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
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
    match runtime.block_on(bulwark_agent::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
