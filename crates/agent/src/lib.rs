//! bulwark-agent: the guest agent. It serves the controller ↔ agent protocol
//! (`bulwark-protocol`) and drives consistency inside the guest (`bulwark-quiesce` carries out
//! what the `bulwark-consistency` model decides).
//!
//! * [`Config`]: the TOML configuration (see [`config`] for the format).
//! * [`AgentCore`] / [`AgentConnection`]: the protocol [`Handler`](bulwark_protocol::Handler):
//!   `Hello` (identity, capabilities, levels offered), `Prepare` (pre-scripts after the
//!   permission checks), `Freeze{timeout}` (one at a time, watchdog + guardian + state file),
//!   `Thaw` (idempotent; held continuously or why not; post-scripts), `Status`, `Ping`.
//! * [`run`]: the whole agent: single-instance lock, thaw of a frozen state a killed agent left
//!   ([`recover_frozen_state`](bulwark_quiesce::recover_frozen_state)), the listener (Unix
//!   socket or TCP with mutual TLS), and SIGTERM/SIGINT handling that thaws before exit.
//!
//! The binary must call
//! [`bulwark_quiesce::guardian::dispatch_guardian`] first thing in `main`: freezes are
//! guarded by the agent binary re-executed as the guardian process.
//!
//! Layers that thaw a frozen guest, from first to last: the controller's `Thaw`; the close of
//! the connection that froze; the in-process watchdog at the deadline; the guardian process at
//! the deadline or as soon as the agent dies (even by SIGKILL); the state file at the next start.

mod agent;
pub mod config;

use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;

use bulwark_protocol::{ServeOptions, TlsFiles, TlsListener, UnixSocketListener, server_config};
use bulwark_quiesce::guardian::GuardianCommand;

pub use agent::{AGENT_VERSION, AgentConnection, AgentCore};
pub use config::{Config, FreezeConfig, Listen, ScriptsConfig, TlsConfig};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration file is not valid.
    #[error("{}: {message}", .path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A listen address is not `unix:/PATH`, `tcp:HOST:PORT` or `virtio-serial:PORT_NAME`.
    #[error("{given:?}: {reason}")]
    Listen {
        /// What was given.
        given: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A file operation failed.
    #[error("{action} {}: {source}", .path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Another agent holds the state directory's lock.
    #[error("another bulwark-agent is running (it holds {})", .lock.display())]
    AlreadyRunning {
        /// The lock file.
        lock: PathBuf,
    },
    /// The listener or TLS setup failed.
    #[error(transparent)]
    Protocol(#[from] bulwark_protocol::Error),
    /// Recovering the frozen state failed.
    #[error(transparent)]
    Quiesce(#[from] bulwark_quiesce::Error),
}

fn io(path: &std::path::Path, action: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_owned();
    move |source| Error::Io {
        path,
        action,
        source,
    }
}

/// Runs the agent until SIGTERM or SIGINT: takes the single-instance lock in `state_dir`,
/// thaws what a killed predecessor left frozen, listens, and on a signal thaws (and runs the
/// post-scripts) before returning.
///
/// Prints one line `listening on unix:PATH`, `listening on tcp:ADDR` or
/// `listening on virtio-serial:NAME (DEVICE)` on standard output
/// once it accepts connections (with the real port when the configuration says port 0).
pub async fn run(config: Config) -> Result<(), Error> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&config.state_dir)
        .map_err(io(&config.state_dir, "creating the state directory"))?;
    let lock_path = config.lock_file();
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io(&lock_path, "opening the lock file"))?;
    if rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        return Err(Error::AlreadyRunning { lock: lock_path });
    }
    if let Some(report) = bulwark_quiesce::recover_frozen_state(&config.state_file())? {
        tracing::warn!(
            thawed = ?report.thawed,
            not_frozen = ?report.not_frozen,
            failed = ?report.failed,
            previous_pid = report.state.pid,
            "found the frozen state of a previous agent"
        );
    }
    let guardian = match GuardianCommand::current_exe() {
        Ok(g) => Some(g),
        Err(e) => {
            tracing::warn!(error = %e, "no guardian process: cannot find the agent binary");
            None
        }
    };
    let core = AgentCore::new(config.clone(), guardian);
    let options = ServeOptions::default();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(io(&config.path, "installing the SIGTERM handler"))?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(io(&config.path, "installing the SIGINT handler"))?;
    let make = {
        let core = core.clone();
        move |_peer: &str| core.connection()
    };
    let served = async {
        match &config.listen {
            Listen::Unix(path) => {
                let listener = UnixSocketListener::bind(path)?;
                announce(&format!("unix:{}", path.display()));
                listener.run(options, make).await;
            }
            Listen::Tcp(addr) => {
                let Some(tls) = &config.tls else {
                    return Err(Error::Config {
                        path: config.path.clone(),
                        message: "tcp needs [tls]".into(),
                    });
                };
                let files = TlsFiles {
                    ca_cert: tls.ca.clone(),
                    cert: tls.cert.clone(),
                    key: tls.key.clone(),
                };
                let server = server_config(&files)?;
                let sock = tokio::net::lookup_host(addr.as_str())
                    .await
                    .map_err(io(&config.path, "resolving the listen address"))?
                    .next()
                    .ok_or_else(|| Error::Config {
                        path: config.path.clone(),
                        message: format!("listen address {addr} resolves to nothing"),
                    })?;
                let listener = TlsListener::bind(sock, server).await?;
                announce(&format!("tcp:{}", listener.local_addr()?));
                listener.run(options, make).await;
            }
            Listen::VirtioSerial(name) => {
                let device = bulwark_protocol::find_port(name)?;
                let mut listener = bulwark_protocol::VirtioPortListener::open(&device)?;
                announce(&format!("virtio-serial:{name} ({})", device.display()));
                return Err(listener.run(options, make).await.into());
            }
        }
        Ok::<(), Error>(())
    };
    let result = tokio::select! {
        r = served => r,
        _ = term.recv() => { tracing::info!("SIGTERM"); Ok(()) }
        _ = int.recv() => { tracing::info!("SIGINT"); Ok(()) }
    };
    core.shutdown().await;
    drop(lock);
    result
}

fn announce(what: &str) {
    tracing::info!(listen = what, "bulwark-agent serving");
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "listening on {what}");
    let _ = out.flush();
}
