//! `bulwark-controller instant-restore`: run a VM from a recovery point at once, and move its
//! disk to local storage while it runs (see `bulwark_controller::instant`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bulwark_controller::instant::{InstantExport, InstantRequest, JOB_PREFIX};
use clap::Args;
use tokio::signal::unix::{SignalKind, signal};

use crate::ui;

#[derive(Debug, Args)]
#[command(after_help = "Steps:
  1. The point's disk is served read-only over NBD on --socket (blocks fetched from the vault on
     demand and verified) and the qcow2 --overlay is created with that export as its backing
     file. The command prints `ready OVERLAY` on standard output and the QEMU arguments that
     attach the overlay on standard error. Start the VM on the overlay now: it runs at once, its
     writes go to the overlay, never to the vault.
  2. With --qmp, once that QMP socket answers (start QEMU with
     -qmp unix:PATH,server=on,wait=off), QEMU's block-stream job copies every block of the
     point into the overlay while the VM runs. When QEMU reports the overlay without backing
     file, the export stops and the command exits 0: the VM runs on a standalone local disk.
     Without --qmp the export serves until SIGTERM/SIGINT (the overlay then still needs it).
  SIGTERM/SIGINT during the stream cancels the job and stops the export: the VM's reads of
  blocks not yet copied then fail (QEMU retries for 60 s, so restarting the export on the same
  socket within that time is safe).

Example:
  bulwark-controller instant-restore --vault /srv/vault --vm web01 --disk os \\
      --overlay /var/lib/images/web01-os.qcow2 --qmp unix:/run/web01.qmp &
  qemu-system-x86_64 ... -qmp unix:/run/web01.qmp,server=on,wait=off \\
      -drive id=os,file=/var/lib/images/web01-os.qcow2,format=qcow2,if=none \\
      -device virtio-blk-pci,drive=os")]
pub struct InstantArgs {
    #[command(flatten)]
    at: crate::PointDiskArg,
    /// The qcow2 overlay to create (must not exist); the VM runs on it.
    #[arg(long, value_name = "PATH")]
    overlay: PathBuf,
    /// The export's Unix socket (default: the overlay's path with `.nbd` appended).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// The QMP socket of the VM that runs on the overlay: stream the point into the overlay
    /// through it, then stop the export.
    #[arg(long, value_name = "unix:PATH")]
    qmp: Option<String>,
    /// The VM's block device running on the overlay (default: found by the overlay's path).
    #[arg(long, requires = "qmp")]
    device: Option<String>,
    /// How long to wait for the QMP socket to answer.
    #[arg(long, default_value = "10m", value_parser = ui::parse_duration)]
    qmp_wait: Duration,
    /// Most bytes per second the stream copies (e.g. 50MiB; 0: no limit). The guest's own
    /// reads are served at once whatever it is.
    #[arg(long, default_value = "0", value_parser = ui::parse_size)]
    speed: u64,
    #[command(flatten)]
    reader: crate::ReaderArgs,
    /// Print a JSON report at the end.
    #[arg(long)]
    json: bool,
}

/// Runs `instant-restore`.
pub async fn run(a: InstantArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let vault = crate::open(&a.at.vault).await?;
    let mut req = InstantRequest::new(&a.at.vm, &a.at.point, &a.at.disk, &a.overlay);
    req.socket = a.socket.clone();
    req.disk_options = a.reader.options();
    let export = InstantExport::start(&vault, &req).await?;
    let ready = started.elapsed();
    eprintln!(
        "serving {} ({}, read-only) on {}; overlay {} created in {} ms. Attach it with:\n  {}",
        export.label(),
        bulwark_vault::HumanBytes(export.size()),
        export.socket().display(),
        export.overlay().display(),
        ready.as_millis(),
        export.qemu_args(&a.at.disk).join(" ")
    );
    println!("ready {}", export.overlay().display());

    let Some(qmp_address) = a.qmp.clone() else {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        let stats = export.stop().await?;
        eprintln!(
            "stopped; fetched {} blocks ({}) from the vault. The overlay still needs this export \
             as its backing file until it is streamed (rerun with --qmp, or qemu-img rebase).",
            stats.blocks_fetched,
            bulwark_vault::HumanBytes(stats.bytes_fetched)
        );
        return Ok(ExitCode::SUCCESS);
    };

    // Wait for the VM's QMP socket, serving the export meanwhile.
    let wait_start = Instant::now();
    let qmp = loop {
        let attempt = tokio::select! {
            r = bulwark_qemu::Qmp::connect(&qmp_address, Duration::from_secs(30)) => r,
            _ = term.recv() => { export.stop().await?; bail!("stopped by SIGTERM before the VM's QMP socket answered") }
            _ = int.recv() => { export.stop().await?; bail!("stopped by SIGINT before the VM's QMP socket answered") }
        };
        match attempt {
            Ok(q) => break q,
            Err(bulwark_qemu::Error::Connect { .. }) if wait_start.elapsed() < a.qmp_wait => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => {
                export.stop().await?;
                return Err(e).context(format!("connecting to {qmp_address}"));
            }
        }
    };
    eprintln!("QMP {qmp_address} connected; streaming the point into the overlay");
    let bars = ui::Bars::new(!a.json);
    let cb = bars.clone();
    let progress = move |done, total| cb.set("stream", done, total);
    let job = format!("{JOB_PREFIX}{}", a.at.disk);
    let streamed = tokio::select! {
        r = export.stream(&qmp, a.device.as_deref(), a.speed, &progress) => r.map_err(anyhow::Error::from),
        _ = term.recv() => Err(anyhow::anyhow!("stopped by SIGTERM")),
        _ = int.recv() => Err(anyhow::anyhow!("stopped by SIGINT")),
    };
    bars.clear();
    let report = match streamed {
        Ok(r) => r,
        Err(e) => {
            let _ = bulwark_qemu::cancel_stream(&qmp, &job).await;
            export.stop().await?;
            return Err(e).context(
                "streaming stopped: the overlay still has the export as backing file; \
                 rerun instant-restore on a new overlay, or restart the export",
            );
        }
    };
    let overlay = export.overlay().to_path_buf();
    let stats = export.stop().await?;
    let total = started.elapsed();
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "overlay": overlay,
                "ready_ms": ready.as_millis() as u64,
                "streamed": report.ran,
                "stream_bytes": report.bytes,
                "stream_ms": report.elapsed.as_millis() as u64,
                "total_ms": total.as_millis() as u64,
                "blocks_fetched": stats.blocks_fetched,
                "bytes_fetched": stats.bytes_fetched,
                "cache_hits": stats.cache_hits,
            })
        );
    }
    eprintln!(
        "done: {} is standalone ({} streamed in {:.1} s); export stopped after fetching {} blocks \
         ({}) from the vault",
        overlay.display(),
        bulwark_vault::HumanBytes(report.bytes),
        report.elapsed.as_secs_f64(),
        stats.blocks_fetched,
        bulwark_vault::HumanBytes(stats.bytes_fetched)
    );
    Ok(ExitCode::SUCCESS)
}
