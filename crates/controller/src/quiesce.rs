//! The quiesced backup job: the guest agent prepares and freezes the guest around the snapshot
//! phase, and the recovery point records the consistency level reached and why.
//!
//! A backup with [`crate::BackupRequest::quiesce`] set runs, in order:
//!
//! 1. **Plan**: connect to the agent (Unix socket, TCP with mutual TLS, or the Unix socket of
//!    the QEMU chardev behind the guest's virtio-serial port) and `Hello`; or, for a guest that
//!    runs only qemu-guest-agent (`qga:unix:PATH`), resynchronise and ask `guest-info`. An
//!    absent or unauthenticated agent plans `crash` with the reason, if the minimum allows
//!    ([`bulwark_consistency::plan`]); otherwise the job fails before anything is touched.
//! 2. **Prepare** (application wanted): the agent's pre-scripts. A failure without
//!    `continue_on_failure` fails the job; with it, or when the agent refuses its scripts, the
//!    level drops to `file_system`.
//! 3. **Freeze{timeout}**: the agent freezes its mounts and arms its watchdog and guardian.
//!    With qemu-ga (which has no deadline of its own) the controller first starts its
//!    [`QgaWatchdog`] process (the program in [`QuiesceOptions::qga_watchdog`], whose `main`
//!    calls [`bulwark_qemu::qga::dispatch_watchdog`]), which thaws through QGA at the deadline
//!    whatever the controller is doing, then sends `guest-fsfreeze-freeze` (every file system
//!    qemu-ga can freeze). qemu-ga has no pre/post scripts here: at most `file_system`.
//! 4. **Snapshot**: the snapshotter's `take` (its `prepare` ran before the pre-scripts).
//! 5. **Thaw**: the agent thaws and runs its post-scripts. The freeze window is measured from
//!    the `Frozen` reply to the `Thawed` reply (minus the post-scripts' run time, which comes
//!    after the thaw). If the freeze was not held continuously (the watchdog fired first), the
//!    point is downgraded to `crash` with that reason.
//! 6. **Transfer** with the [`ConsistencyRecord`] from
//!    [`bulwark_consistency::resolve`] and the agent's identity on the point. A level below
//!    the minimum fails the job: no point is committed.
//!
//! The snapshots are always taken between a successful freeze and the thaw; the thaw is sent
//! even when the snapshot fails. With qemu-ga, a controller that dies while the guest is frozen
//! leaves the thaw to its watchdog process (at the freeze deadline); if both are killed, the
//! guest stays frozen until someone thaws it (`virsh domfsthaw`, or `guest-fsfreeze-thaw`).

use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

use bulwark_consistency::scripts::{Phase, ScriptFailure, ScriptReport};
use bulwark_consistency::{
    AgentStatus, Capabilities, FreezeObserved, Level, Observed, PreScripts, ScriptsAvailability,
    Step, plan, resolve,
};
use bulwark_protocol::{
    CAP_FSFREEZE, CAP_SCRIPTS, Client, Connection, ErrorCode, HelloOk, Prepared, ScriptOutcome,
    ScriptStatus, Thawed, TlsFiles, client_config, connect_tcp, connect_unix,
    connect_virtio_serial,
};
use bulwark_qemu::qga::{FreezeStatus, Qga, QgaInfo, QgaWatchdog};
use bulwark_vault::{ConsistencyRecord, Vault};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::Error;
use crate::job::{BackupRequest, Quiesce, Snapped};

/// Default freeze timeout asked of the agent (it may cap it lower).
pub const DEFAULT_FREEZE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a `Prepare` or `Thaw` may take (they run scripts, capped at 600 s by the agent).
const SCRIPT_REPLY_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// How long any other reply may take.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long connecting to a guest agent and its first answer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Where the agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAddress {
    /// `unix:/path/to/socket`.
    Unix(PathBuf),
    /// `tcp:HOST:PORT` (mutual TLS).
    Tcp {
        /// Host name or IP address; the agent's certificate must name it.
        host: String,
        /// Port.
        port: u16,
    },
    /// `virtio-serial:unix:PATH`: Bulwark's agent in the guest on a virtio-serial port, reached
    /// through the Unix socket of the QEMU chardev behind it (see `bulwark_protocol`'s
    /// virtio-serial transport: only the host can write to the port; nothing cryptographic).
    VirtioSerial(PathBuf),
    /// `qga:unix:PATH`: a guest that runs only qemu-guest-agent, reached through the Unix
    /// socket of the QEMU chardev behind its `org.qemu.guest_agent.0` port.
    Qga(PathBuf),
}

impl FromStr for AgentAddress {
    type Err = Error;

    /// Parses `unix:/PATH`, `tcp:HOST:PORT` (`tcp:[::1]:7070` for IPv6),
    /// `virtio-serial:unix:PATH` or `qga:unix:PATH`.
    fn from_str(s: &str) -> Result<AgentAddress, Error> {
        let bad = |why: &str| Error::InvalidAgentAddress {
            address: s.to_string(),
            why: why.to_string(),
        };
        for (prefix, make) in [
            (
                "virtio-serial:",
                AgentAddress::VirtioSerial as fn(PathBuf) -> AgentAddress,
            ),
            ("qga:", AgentAddress::Qga),
        ] {
            if let Some(rest) = s.strip_prefix(prefix) {
                return match rest.strip_prefix("unix:") {
                    Some(p) if !p.is_empty() => Ok(make(PathBuf::from(p))),
                    _ => Err(bad(&format!(
                        "expected {prefix}unix:PATH (the Unix socket of the QEMU chardev behind the guest's port)"
                    ))),
                };
            }
        }
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(bad("no socket path"));
            }
            return Ok(AgentAddress::Unix(PathBuf::from(p)));
        }
        let Some(rest) = s.strip_prefix("tcp:") else {
            return Err(bad(
                "expected unix:PATH, tcp:HOST:PORT, virtio-serial:unix:PATH or qga:unix:PATH",
            ));
        };
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| bad("expected tcp:HOST:PORT"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| bad(&format!("bad port {port:?}")))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("no host"));
        }
        Ok(AgentAddress::Tcp {
            host: host.to_owned(),
            port,
        })
    }
}

impl std::fmt::Display for AgentAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentAddress::Unix(p) => write!(f, "unix:{}", p.display()),
            AgentAddress::Tcp { host, port } if host.contains(':') => {
                write!(f, "tcp:[{host}]:{port}")
            }
            AgentAddress::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            AgentAddress::VirtioSerial(p) => write!(f, "virtio-serial:unix:{}", p.display()),
            AgentAddress::Qga(p) => write!(f, "qga:unix:{}", p.display()),
        }
    }
}

/// The agent of a VM and how to authenticate to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentTarget {
    /// Where it listens.
    pub address: AgentAddress,
    /// The controller's TLS files (needed for TCP): `ca.pem`, `controller.pem`,
    /// `controller.key` from `bulwark-controller enroll`.
    pub tls: Option<TlsFiles>,
    /// The name the agent's certificate must carry (default: the host of the address).
    pub server_name: Option<String>,
}

impl AgentTarget {
    /// The target named by the CLI's `--agent ADDRESS [--tls-dir DIR] [--agent-name NAME]`:
    /// a TCP address needs the controller's TLS directory from `enroll`.
    pub fn from_options(
        address: &str,
        tls_dir: Option<&std::path::Path>,
        server_name: Option<String>,
    ) -> Result<AgentTarget, Error> {
        let address: AgentAddress = address.parse()?;
        if matches!(address, AgentAddress::Tcp { .. }) && tls_dir.is_none() {
            return Err(Error::InvalidAgentAddress {
                address: address.to_string(),
                why: "a tcp: agent needs --tls-dir (the controller's files from `enroll`)".into(),
            });
        }
        Ok(AgentTarget {
            address,
            tls: tls_dir.map(AgentTarget::tls_dir),
            server_name,
        })
    }

    /// The controller's TLS files in `dir`: `ca.pem`, `controller.pem`, `controller.key`.
    pub fn tls_dir(dir: &std::path::Path) -> TlsFiles {
        TlsFiles {
            ca_cert: dir.join("ca.pem"),
            cert: dir.join("controller.pem"),
            key: dir.join("controller.key"),
        }
    }
}

/// What a quiesced job wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuiesceOptions {
    /// The level wanted; `None`: the best the agent offers (`file_system` is recorded as wanted
    /// when the agent cannot be reached).
    pub wanted: Option<Level>,
    /// The lowest level acceptable: below it the job fails and commits nothing.
    pub minimum: Level,
    /// The freeze timeout asked of the agent (its watchdog thaws at this deadline).
    pub freeze_timeout: Duration,
    /// Test hook: sleep this long in the snapshot phase, while frozen (to let the watchdog fire
    /// in tests). Never set it in production.
    pub snapshot_delay: Option<Duration>,
    /// The program that runs the watchdog of a `qga:` agent: one whose `main` calls
    /// [`bulwark_qemu::qga::dispatch_watchdog`] first thing (the binary passes itself). Without
    /// it a `qga:` agent is never asked to freeze (the guest would have no deadline).
    pub qga_watchdog: Option<PathBuf>,
}

impl Default for QuiesceOptions {
    fn default() -> Self {
        QuiesceOptions {
            wanted: None,
            minimum: Level::Crash,
            freeze_timeout: DEFAULT_FREEZE_TIMEOUT,
            snapshot_delay: None,
            qga_watchdog: None,
        }
    }
}

/// A connected, greeted agent.
enum AgentLink {
    Unix(Client<tokio::net::UnixStream>),
    Tls(Box<Client<bulwark_protocol::ClientTlsStream>>),
}

macro_rules! with_client {
    ($link:expr, $c:ident => $body:expr) => {
        match $link {
            AgentLink::Unix($c) => $body,
            AgentLink::Tls($c) => $body,
        }
    };
}

async fn greet<S: AsyncRead + AsyncWrite + Unpin>(
    conn: Connection<S>,
) -> Result<(Client<S>, HelloOk), bulwark_protocol::Error> {
    let mut client = Client::new(conn);
    client.set_reply_timeout(Some(REPLY_TIMEOUT));
    let hello = client
        .hello("bulwark-controller", env!("CARGO_PKG_VERSION"), &[])
        .await?;
    Ok((client, hello))
}

/// A qemu-guest-agent session: the connection, what `guest-info` said, the host name, and the
/// watchdog while the guest is frozen.
struct QgaLink {
    qga: Qga,
    info: QgaInfo,
    hostname: Option<String>,
    watchdog: Option<QgaWatchdog>,
}

async fn connect_qga(path: &std::path::Path) -> Result<QgaLink, String> {
    let mut qga = Qga::connect(path, CONNECT_TIMEOUT)
        .await
        .map_err(|e| e.to_string())?;
    let info = qga.info().await.map_err(|e| e.to_string())?;
    let hostname = qga.host_name().await.ok();
    // The freeze syncs the guest's file systems first: give it as long as any agent reply.
    qga.set_timeout(REPLY_TIMEOUT);
    Ok(QgaLink {
        qga,
        info,
        hostname,
        watchdog: None,
    })
}

async fn connect(target: &AgentTarget) -> Result<(AgentLink, HelloOk), String> {
    match &target.address {
        AgentAddress::Unix(path) => {
            let conn = connect_unix(path).await.map_err(|e| e.to_string())?;
            let (c, h) = greet(conn).await.map_err(|e| e.to_string())?;
            Ok((AgentLink::Unix(c), h))
        }
        AgentAddress::VirtioSerial(path) => {
            let conn = connect_virtio_serial(path)
                .await
                .map_err(|e| e.to_string())?;
            let (c, h) = greet(conn).await.map_err(|e| e.to_string())?;
            Ok((AgentLink::Unix(c), h))
        }
        AgentAddress::Qga(_) => Err("qemu-guest-agent does not speak the Bulwark protocol".into()),
        AgentAddress::Tcp { host, port } => {
            let files = target.tls.as_ref().ok_or_else(|| {
                "no controller TLS files (--tls-dir): the agent only speaks mutual TLS over TCP"
                    .to_string()
            })?;
            let config = client_config(files).map_err(|e| e.to_string())?;
            let name = target.server_name.as_deref().unwrap_or(host);
            let conn = connect_tcp(socket_string(host, *port), name, config)
                .await
                .map_err(|e| e.to_string())?;
            let (c, h) = greet(conn).await.map_err(|e| e.to_string())?;
            Ok((AgentLink::Tls(Box::new(c)), h))
        }
    }
}

fn socket_string(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn capabilities(hello: &HelloOk) -> Capabilities {
    Capabilities {
        freeze: hello.has_capability(CAP_FSFREEZE) && hello.levels.contains(&Level::FileSystem),
        // Scripts the agent refuses are still announced: `Prepare` then says why.
        pre_scripts: if hello.has_capability(CAP_SCRIPTS) {
            ScriptsAvailability::Configured
        } else {
            ScriptsAvailability::NotConfigured
        },
        post_scripts: hello.has_capability(CAP_SCRIPTS),
    }
}

/// The agent's script outcome as the consistency crate's report (for the reason texts).
fn report(phase: Phase, o: &ScriptOutcome) -> ScriptReport {
    let failure = match o.status {
        ScriptStatus::Succeeded => None,
        ScriptStatus::Failed => Some(match o.exit_code {
            Some(code) => ScriptFailure::Exited { code },
            None => ScriptFailure::SpawnFailed {
                error: o.message.clone().unwrap_or_else(|| "failed".into()),
            },
        }),
        ScriptStatus::TimedOut => Some(ScriptFailure::TimedOut {
            after_ms: o.duration_ms / u64::from(o.attempts.max(1)),
        }),
        ScriptStatus::Refused => Some(ScriptFailure::Refused {
            reason: o.message.clone().unwrap_or_else(|| "refused".into()),
        }),
        ScriptStatus::Skipped | ScriptStatus::Unknown => Some(ScriptFailure::SpawnFailed {
            error: format!("not run: {}", o.message.as_deref().unwrap_or("skipped")),
        }),
    };
    let tail = match o.status {
        ScriptStatus::Failed | ScriptStatus::TimedOut if o.exit_code.is_some() => {
            o.message.clone().unwrap_or_default()
        }
        ScriptStatus::TimedOut => o.message.clone().unwrap_or_default(),
        _ => String::new(),
    };
    ScriptReport {
        phase,
        path: PathBuf::from(&o.path),
        attempts: o.attempts,
        failure,
        stdout_tail: String::new(),
        stderr_tail: tail,
        output_bytes: 0,
        duration_ms: o.duration_ms,
    }
}

fn pre_scripts_observed(p: &Prepared) -> PreScripts {
    match p
        .scripts
        .iter()
        .find(|o| o.status != ScriptStatus::Succeeded)
    {
        Some(o) => PreScripts::Failed(report(Phase::Pre, o)),
        None if p.scripts.is_empty() => PreScripts::NotRun,
        None => PreScripts::Succeeded,
    }
}

fn agent_error(target: &AgentTarget, message: String) -> Error {
    Error::Agent {
        agent: target.address.to_string(),
        message,
    }
}

/// The snapshot phase quiesced by the guest agent; see the module documentation. Fails when
/// the level would fall below the minimum.
pub(crate) async fn snapshot(
    req: &BackupRequest,
    vault: &Vault,
    q: &Quiesce,
    point: &str,
) -> Result<Snapped, Error> {
    let start = Instant::now();
    let mut session = Session::plan(&q.agent, &q.options, req.observer.as_ref()).await?;
    // The slow part of the snapshot before anything is frozen.
    let pending = req
        .snapshotter
        .prepare(&req.vm, point)
        .await
        .map_err(|source| Error::Snapshot {
            vm: req.vm.clone(),
            source,
        })?;
    session.pre_scripts().await?;
    session.freeze().await;
    // The only step while frozen.
    if let Some(d) = q.options.snapshot_delay {
        tokio::time::sleep(d).await;
    }
    let taken = pending.take().await.map_err(|source| Error::Snapshot {
        vm: req.vm.clone(),
        source,
    });
    // Thaw also after a failed snapshot, and after a Prepare without freeze (post-scripts).
    let freeze_window_ms = session.thaw().await;
    let sources = taken?;
    let consistency = match session.resolve(freeze_window_ms) {
        Ok(c) => c,
        Err(e) => {
            for s in sources {
                let _ = s
                    .release(bulwark_snapshot::Outcome::Failed { keep: false })
                    .await;
            }
            return Err(e);
        }
    };
    let agent = match (&session.hello, &session.qga) {
        (Some(h), _) => Some(agent_record(vault, &req.vm, &q.agent, h).await),
        (None, Some(g)) => Some(qga_record(vault, &req.vm, &q.agent, g).await),
        (None, None) => None,
    };
    Ok(Snapped {
        sources,
        consistency,
        agent,
        elapsed_ms: start.elapsed().as_millis() as u64,
    })
}

/// One quiesce session with the agent: plan, pre-scripts, freeze, thaw, resolve.
struct Session<'a> {
    target: &'a AgentTarget,
    link: Option<AgentLink>,
    hello: Option<HelloOk>,
    /// A `qga:` agent's session (then `link` and `hello` are `None`).
    qga: Option<QgaLink>,
    qga_watchdog: Option<PathBuf>,
    wanted: Level,
    minimum: Level,
    freeze_timeout: Duration,
    plan: bulwark_consistency::Plan,
    observed: Observed,
    prepared_ran: bool,
    frozen_at: Option<Instant>,
}

impl<'a> Session<'a> {
    /// Connects and greets the agent, and plans the level. An absent agent plans `crash` with
    /// the reason if the minimum allows; otherwise this fails before anything is touched.
    async fn plan(
        target: &'a AgentTarget,
        opts: &QuiesceOptions,
        observer: &dyn crate::Observer,
    ) -> Result<Session<'a>, Error> {
        let (link, hello, qga, status) = if let AgentAddress::Qga(path) = &target.address {
            match connect_qga(path).await {
                Ok(g) => {
                    tracing::info!(version = %g.info.version, fsfreeze = g.info.fsfreeze, hostname = ?g.hostname, "qemu-guest-agent answered");
                    let caps = Capabilities {
                        freeze: g.info.fsfreeze,
                        pre_scripts: ScriptsAvailability::NotConfigured,
                        post_scripts: false,
                    };
                    (None, None, Some(g), AgentStatus::Reachable(caps))
                }
                Err(reason) => {
                    let reason = format!("{}: {reason}", target.address);
                    tracing::warn!(%reason, "qemu-guest-agent unreachable");
                    (None, None, None, AgentStatus::Unreachable { reason })
                }
            }
        } else {
            match connect(target).await {
                Ok((link, hello)) => {
                    tracing::info!(agent = %hello.agent.hostname, version = %hello.agent.agent_version, levels = ?hello.levels, capabilities = ?hello.capabilities, "agent greeted");
                    let caps = capabilities(&hello);
                    (Some(link), Some(hello), None, AgentStatus::Reachable(caps))
                }
                Err(reason) => {
                    let address = target.address.to_string();
                    let reason = if reason.contains(&address) {
                        reason
                    } else {
                        format!("{address}: {reason}")
                    };
                    tracing::warn!(%reason, "agent unreachable");
                    (None, None, None, AgentStatus::Unreachable { reason })
                }
            }
        };
        observer.agent(match &status {
            AgentStatus::Unreachable { reason } => Some(reason),
            AgentStatus::Reachable(_) => None,
        });
        let wanted = opts.wanted.unwrap_or_else(|| {
            let best = match (&hello, &qga) {
                (Some(h), _) => h.levels.iter().copied().max().unwrap_or(Level::Crash),
                (None, Some(g)) if !g.info.fsfreeze => Level::Crash,
                _ => Level::FileSystem,
            };
            best.max(opts.minimum)
        });
        let the_plan = plan(wanted, opts.minimum, &status)?;
        tracing::info!(target = %the_plan.target, steps = ?the_plan.steps, reasons = ?the_plan.reasons, "plan");
        let mut observed = Observed::default();
        if let AgentStatus::Unreachable { reason } = &status {
            observed.agent_unreachable = Some(reason.clone());
        }
        Ok(Session {
            target,
            link,
            hello,
            qga,
            qga_watchdog: opts.qga_watchdog.clone(),
            wanted,
            minimum: opts.minimum,
            freeze_timeout: opts.freeze_timeout,
            plan: the_plan,
            observed,
            prepared_ran: false,
            frozen_at: None,
        })
    }

    /// The agent's pre-scripts, when application consistency is planned. A failure without
    /// `continue_on_failure` fails the job; with it, the level drops.
    async fn pre_scripts(&mut self) -> Result<(), Error> {
        let (true, Some(link)) = (self.plan.has(Step::PreScripts), self.link.as_mut()) else {
            return Ok(());
        };
        let reply = with_client!(link, c => {
            c.set_reply_timeout(Some(SCRIPT_REPLY_TIMEOUT));
            let r = c.prepare().await;
            c.set_reply_timeout(Some(REPLY_TIMEOUT));
            r
        });
        match reply {
            Ok(p) => {
                self.prepared_ran = true;
                tracing::info!(level = %p.level, reasons = ?p.reasons, "prepared");
                self.observed.pre_scripts = pre_scripts_observed(&p);
                // The agent went on after a failure: continue_on_failure is set there.
                self.observed.continue_on_failure = p.level < Level::Application;
            }
            Err(bulwark_protocol::Error::Remote {
                code: ErrorCode::PrepareFailed,
                message,
                ..
            }) => {
                return Err(agent_error(
                    self.target,
                    format!("the pre-scripts failed: {message}"),
                ));
            }
            Err(e) => {
                self.observed.agent_unreachable = Some(format!("prepare failed: {e}"));
            }
        }
        Ok(())
    }

    /// Freezes the guest's mounts (the agent arms its watchdog and guardian).
    async fn freeze(&mut self) {
        if self.observed.agent_unreachable.is_some() || !self.plan.has(Step::Freeze) {
            return;
        }
        if self.qga.is_some() {
            return self.freeze_qga().await;
        }
        let Some(link) = self.link.as_mut() else {
            return;
        };
        let timeout = self.freeze_timeout;
        match with_client!(link, c => c.freeze(timeout).await) {
            Ok(f) => {
                tracing::info!(mounts = ?f.mounts, timeout_ms = f.timeout_ms, "frozen");
                self.frozen_at = Some(Instant::now());
            }
            Err(e) => {
                tracing::warn!(error = %e, "freeze failed");
                self.observed.freeze = FreezeObserved::Failed {
                    reason: e.to_string(),
                };
            }
        }
    }

    /// qemu-ga: arm the watchdog process, then `guest-fsfreeze-freeze`. A failed freeze is
    /// thawed at once (it may have frozen some file systems).
    async fn freeze_qga(&mut self) {
        let timeout = self.freeze_timeout;
        let Some(g) = self.qga.as_mut() else {
            return;
        };
        let Some(program) = self.qga_watchdog.as_deref() else {
            self.observed.freeze = FreezeObserved::Failed {
                reason: "no watchdog program is configured for qemu-guest-agent (the guest \
                         would have no freeze deadline): not frozen"
                    .into(),
            };
            return;
        };
        let watchdog = match QgaWatchdog::spawn(program, &g.qga, timeout) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "the QGA watchdog did not start: not freezing");
                self.observed.freeze = FreezeObserved::Failed {
                    reason: format!("the QGA watchdog did not start: {e}"),
                };
                return;
            }
        };
        match g.qga.freeze(None).await {
            Ok(n) => {
                tracing::info!(file_systems = n, deadline_ms = timeout.as_millis() as u64, watchdog = ?watchdog.pid(), "frozen through qemu-guest-agent");
                g.watchdog = Some(watchdog);
                self.frozen_at = Some(Instant::now());
            }
            Err(e) => {
                tracing::warn!(error = %e, "guest-fsfreeze-freeze failed; thawing");
                watchdog.disarm();
                if let Err(t) = g.qga.thaw().await {
                    tracing::warn!(error = %t, "thaw after the failed freeze failed");
                }
                self.observed.freeze = FreezeObserved::Failed {
                    reason: e.to_string(),
                };
            }
        }
    }

    /// qemu-ga: disarm the watchdog, `guest-fsfreeze-thaw` (again on a new connection if the
    /// first fails), `guest-fsfreeze-status`. Returns the freeze window.
    async fn thaw_qga(&mut self) -> Option<u64> {
        let frozen_at = self.frozen_at?;
        let g = self.qga.as_mut()?;
        let timeout_ms = self.freeze_timeout.as_millis() as u64;
        let fired = g.watchdog.take().is_some_and(QgaWatchdog::disarm);
        let mut thawed = g.qga.thaw().await;
        if let Err(e) = &thawed {
            tracing::warn!(error = %e, "guest-fsfreeze-thaw failed; once more on a new connection");
            let socket = g.qga.socket().to_path_buf();
            thawed = match Qga::connect(&socket, CONNECT_TIMEOUT).await {
                Ok(mut again) => again.thaw().await,
                Err(e) => Err(e),
            };
        }
        let window = frozen_at.elapsed().as_millis() as u64;
        self.observed.freeze = match thawed {
            Err(e) => FreezeObserved::NotHeldContinuously {
                reason: format!("the thaw failed (the guest may still be frozen): {e}"),
            },
            Ok(_) if fired => FreezeObserved::NotHeldContinuously {
                reason: format!(
                    "the QGA watchdog thawed the guest at the {timeout_ms} ms freeze deadline, before the snapshot was taken"
                ),
            },
            Ok(n) => {
                tracing::info!(
                    file_systems = n,
                    window_ms = window,
                    "thawed through qemu-guest-agent"
                );
                FreezeObserved::Held
            }
        };
        match g.qga.status().await {
            Ok(FreezeStatus::Thawed) => {}
            Ok(FreezeStatus::Frozen) => {
                tracing::error!("qemu-guest-agent still reports the guest frozen after the thaw")
            }
            Err(e) => tracing::warn!(error = %e, "guest-fsfreeze-status failed"),
        }
        Some(window)
    }

    /// Thaws (and runs the post-scripts). Returns the freeze window: from the `Frozen` reply
    /// to the `Thawed` reply, minus the post-scripts' run time (they run after the thaw).
    async fn thaw(&mut self) -> Option<u64> {
        if self.qga.is_some() {
            // The session (kept for the point's agent record) closes when the job drops it.
            return self.thaw_qga().await;
        }
        let mut freeze_window_ms = None;
        let frozen_at = self.frozen_at;
        if let Some(link) = self.link.as_mut()
            && (frozen_at.is_some() || self.prepared_ran)
        {
            let reply = with_client!(link, c => {
                c.set_reply_timeout(Some(SCRIPT_REPLY_TIMEOUT));
                c.thaw().await
            });
            let thawed_at = Instant::now();
            match reply {
                Ok(t) => {
                    observe_thaw(&mut self.observed, &t, frozen_at.is_some());
                    if let Some(at) = frozen_at {
                        let post: u64 = t.post_scripts.iter().map(|o| o.duration_ms).sum();
                        let window = thawed_at.saturating_duration_since(at).as_millis() as u64;
                        freeze_window_ms = Some(window.saturating_sub(post));
                    }
                }
                Err(e) if frozen_at.is_some() => {
                    self.observed.freeze = FreezeObserved::NotHeldContinuously {
                        reason: format!("the thaw failed: {e}"),
                    };
                }
                Err(e) => tracing::warn!(error = %e, "thaw (post-scripts) failed"),
            }
        }
        if frozen_at.is_some() && matches!(self.observed.freeze, FreezeObserved::NotAttempted) {
            self.observed.freeze = FreezeObserved::NotHeldContinuously {
                reason: "no thaw reply".into(),
            };
        }
        self.link = None;
        freeze_window_ms
    }

    /// The consistency reached ([`bulwark_consistency::resolve`]); an error below the minimum.
    fn resolve(&self, freeze_window_ms: Option<u64>) -> Result<ConsistencyRecord, Error> {
        let outcome = resolve(self.wanted, self.minimum, &self.observed)?;
        let mut reasons = self.plan.reasons.clone();
        for r in outcome.reasons.iter().chain(&outcome.warnings) {
            if !reasons.contains(r) {
                reasons.push(r.clone());
            }
        }
        let record = ConsistencyRecord {
            reached: outcome.level,
            wanted: self.wanted,
            reasons,
            freeze_window_ms,
        };
        tracing::info!(reached = %record.reached, wanted = %record.wanted, reasons = ?record.reasons, freeze_window_ms, "consistency");
        Ok(record)
    }
}

fn observe_thaw(observed: &mut Observed, t: &Thawed, was_frozen: bool) {
    if was_frozen {
        observed.freeze = if t.held_continuously {
            FreezeObserved::Held
        } else {
            FreezeObserved::NotHeldContinuously {
                reason: t
                    .reason
                    .clone()
                    .unwrap_or_else(|| "the agent did not say why".into()),
            }
        };
    }
    observed.post_script_failures = t
        .post_scripts
        .iter()
        .filter(|o| o.status != ScriptStatus::Succeeded)
        .map(|o| report(Phase::Post, o))
        .collect();
}

/// The `agent` field of the point: identity, version, capabilities, levels, and whether this
/// is the first backup of the VM with this agent (like a cloud service's extension install).
async fn agent_record(
    vault: &Vault,
    vm: &str,
    target: &AgentTarget,
    h: &HelloOk,
) -> serde_json::Value {
    let previous = vault.latest_point(vm).await.ok().flatten();
    let known = previous
        .as_ref()
        .and_then(|p| p.agent.as_ref())
        .and_then(|a| a.get("hostname"))
        .and_then(|v| v.as_str())
        .is_some_and(|host| host == h.agent.hostname);
    if !known {
        tracing::info!(agent = %h.agent.hostname, version = %h.agent.agent_version, vm, "first backup of this VM with this agent");
    }
    serde_json::json!({
        "kind": "bulwark-agent",
        "hostname": h.agent.hostname,
        "agent_version": h.agent.agent_version,
        "protocol_version": h.version,
        "capabilities": h.capabilities,
        "levels": h.levels,
        "address": target.address.to_string(),
        "first_contact": !known,
    })
}

/// The `agent` field of the point for a qemu-guest-agent: its kind, version and address.
async fn qga_record(
    vault: &Vault,
    vm: &str,
    target: &AgentTarget,
    g: &QgaLink,
) -> serde_json::Value {
    let previous = vault.latest_point(vm).await.ok().flatten();
    let known = previous
        .as_ref()
        .and_then(|p| p.agent.as_ref())
        .and_then(|a| a.get("kind"))
        .and_then(|v| v.as_str())
        == Some("qemu-ga");
    let levels = if g.info.fsfreeze {
        vec![Level::Crash, Level::FileSystem]
    } else {
        vec![Level::Crash]
    };
    serde_json::json!({
        "kind": "qemu-ga",
        "hostname": g.hostname,
        "agent_version": g.info.version,
        "capabilities": if g.info.fsfreeze { vec!["fsfreeze"] } else { Vec::new() },
        "levels": levels,
        "address": target.address.to_string(),
        "first_contact": !known,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        assert_eq!(
            "unix:/run/a.sock".parse::<AgentAddress>().unwrap(),
            AgentAddress::Unix("/run/a.sock".into())
        );
        let t: AgentAddress = "tcp:127.0.0.1:7070".parse().unwrap();
        assert_eq!(t.to_string(), "tcp:127.0.0.1:7070");
        let v6: AgentAddress = "tcp:[::1]:7".parse().unwrap();
        assert_eq!(
            v6,
            AgentAddress::Tcp {
                host: "::1".into(),
                port: 7
            }
        );
        assert_eq!(v6.to_string(), "tcp:[::1]:7");
        for (text, want) in [
            (
                "virtio-serial:unix:/run/vm1-agent.sock",
                AgentAddress::VirtioSerial("/run/vm1-agent.sock".into()),
            ),
            (
                "qga:unix:/run/vm1-qga.sock",
                AgentAddress::Qga("/run/vm1-qga.sock".into()),
            ),
        ] {
            let got: AgentAddress = text.parse().unwrap();
            assert_eq!(got, want);
            assert_eq!(got.to_string(), text);
        }
        for bad in [
            "",
            "unix:",
            "tcp:host",
            "tcp::1",
            "tcp:h:x",
            "http://h",
            "qga:",
            "qga:unix:",
            "qga:/run/x.sock",
            "virtio-serial:org.bulwark.agent.0",
            "virtio-serial:unix:",
        ] {
            assert!(bad.parse::<AgentAddress>().is_err(), "{bad}");
        }
    }

    #[test]
    fn script_outcomes_become_reasons() {
        let o = ScriptOutcome {
            path: "/etc/pre.sh".into(),
            status: ScriptStatus::Failed,
            exit_code: Some(3),
            attempts: 1,
            duration_ms: 5,
            message: Some("boom".into()),
        };
        assert_eq!(
            report(Phase::Pre, &o).describe(),
            "pre-script /etc/pre.sh exited with status 3 (stderr: boom)"
        );
        let refused = ScriptOutcome {
            status: ScriptStatus::Refused,
            exit_code: None,
            message: Some("writable by group".into()),
            ..o
        };
        assert!(
            report(Phase::Pre, &refused)
                .describe()
                .contains("refused: writable by group")
        );
    }
}
