//! `bulwark-qga-freeze`: the QGA half of a quiesced backup, as a process of its own, so that a
//! test can SIGSTOP it while the guest is frozen (the controller's `--agent qga:` wiring is not
//! in the controller yet; this drives the same library calls: `bulwark_qemu::qga`).
//!
//! `bulwark-qga-freeze SOCKET DEADLINE_MS HOLD_MS [MOUNT...]`: connects, prints
//! `info VERSION FSFREEZE`, arms the watchdog for DEADLINE_MS, freezes (the listed mounts, or
//! all), prints `frozen N`, holds HOLD_MS (the snapshot phase), disarms the watchdog, thaws and
//! prints `thawed N fired=BOOL status=STATUS`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bulwark_qemu::qga::{Qga, QgaWatchdog, dispatch_watchdog};

fn main() -> ExitCode {
    if let Some(code) = dispatch_watchdog() {
        return code;
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(socket), Some(deadline), Some(hold)) = (
        args.first().map(PathBuf::from),
        args.get(1).and_then(|a| a.parse::<u64>().ok()),
        args.get(2).and_then(|a| a.parse::<u64>().ok()),
    ) else {
        eprintln!("usage: bulwark-qga-freeze SOCKET DEADLINE_MS HOLD_MS [MOUNT...]");
        return ExitCode::from(2);
    };
    let mounts: Vec<String> = args[3..].to_vec();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let mut qga = Qga::connect(&socket, Duration::from_secs(30)).await?;
        let info = qga.info().await?;
        println!("info {} {}", info.version, info.fsfreeze);
        let exe = std::env::current_exe().map_err(|e| bulwark_qemu::Error::File {
            path: PathBuf::from("/proc/self/exe"),
            source: e,
        })?;
        let watchdog = QgaWatchdog::spawn(&exe, &qga, Duration::from_millis(deadline))?;
        let frozen = match qga
            .freeze((!mounts.is_empty()).then_some(mounts.as_slice()))
            .await
        {
            Ok(n) => n,
            Err(e) => {
                // Whatever the freeze did, thaw before failing.
                watchdog.disarm();
                let _ = qga.thaw().await;
                return Err(e);
            }
        };
        println!("frozen {frozen}");
        tokio::time::sleep(Duration::from_millis(hold)).await;
        let fired = watchdog.disarm();
        let thawed = qga.thaw().await?;
        let status = qga.status().await?;
        println!("thawed {thawed} fired={fired} status={status:?}");
        Ok::<(), bulwark_qemu::Error>(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
