//! `bulwark-controller export`: serves one disk of a recovery point read-only over NBD, until
//! SIGTERM or SIGINT. Blocks are fetched from the vault on demand and verified.

use std::net::IpAddr;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use bulwark_nbd::Address;
use bulwark_recovery::ExportOptions;
use clap::Args;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    at: crate::PointDiskArg,
    /// Where to listen: unix:PATH (must not exist) or tcp:127.0.0.1:PORT (loopback only).
    #[arg(long, value_name = "unix:PATH|tcp:127.0.0.1:PORT")]
    nbd: String,
    #[command(flatten)]
    reader: crate::ReaderArgs,
    /// Most clients at once.
    #[arg(long, default_value_t = 16)]
    max_connections: usize,
}

/// Parses `--nbd`, refusing TCP addresses that are not loopback: the export has no
/// authentication or encryption.
fn parse_address(s: &str) -> Result<Address> {
    let address: Address = s.parse()?;
    if let Address::Tcp(hostport) = &address {
        let host = hostport
            .rsplit_once(':')
            .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
            .unwrap_or_default();
        let loopback =
            host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if !loopback {
            bail!(
                "--nbd {s}: only loopback TCP addresses (127.0.0.1, ::1) are allowed: the export has no authentication"
            );
        }
    }
    Ok(address)
}

/// Runs `export`.
pub async fn run(a: ExportArgs) -> Result<ExitCode> {
    let address = parse_address(&a.nbd)?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let vault = crate::open(&a.at.vault).await?;
    let mut options = ExportOptions::default();
    options.disk = a.reader.options();
    options.max_connections = a.max_connections;
    let (server, backend) =
        bulwark_recovery::export(&vault, &a.at.vm, &a.at.point, &a.at.disk, &address, options)
            .await?;
    let disk = backend.disk();
    eprintln!(
        "serving {} ({}, read-only) on {} export {:?}; SIGTERM or Ctrl-C stops",
        disk.label(),
        bulwark_vault::HumanBytes(disk.size()),
        server.address(),
        a.at.disk
    );
    let stop = server.shutdown_handle();
    let mut run = tokio::spawn(server.run());
    let result = tokio::select! {
        r = &mut run => r,
        _ = term.recv() => { stop.shutdown(); run.await }
        _ = int.recv() => { stop.shutdown(); run.await }
    };
    result.context("nbd server task failed")??;
    let s = disk.stats();
    eprintln!(
        "stopped; fetched {} blocks ({}) from the vault, {} cache hits",
        s.blocks_fetched,
        bulwark_vault::HumanBytes(s.bytes_fetched),
        s.cache_hits
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::parse_address;

    #[test]
    fn only_loopback_tcp() {
        assert!(parse_address("tcp:127.0.0.1:10809").is_ok());
        assert!(parse_address("tcp:[::1]:10809").is_ok());
        assert!(parse_address("unix:/tmp/x.sock").is_ok());
        assert!(parse_address("tcp:0.0.0.0:10809").is_err());
        assert!(parse_address("tcp:192.168.1.2:10809").is_err());
        assert!(parse_address("tcp:example.invalid:10809").is_err());
    }
}
