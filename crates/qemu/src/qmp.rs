//! A QMP session over a Unix socket: the `qapi` crate's typed commands and tokio client, with a
//! bound on the length of any line QEMU sends and a time limit on every command.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use qapi::futures::{QapiService, QmpStreamTokio};
use tokio::io::{AsyncRead, ReadBuf, WriteHalf};
use tokio::net::UnixStream;

use crate::Error;

/// The longest line (one QMP message) accepted from QEMU. `query-block` of a VM with dozens of
/// disks is a few hundred KiB; anything longer is refused instead of buffered without bound.
pub const MAX_LINE: usize = 16 << 20;

type Service = QapiService<QmpStreamTokio<WriteHalf<UnixStream>>>;

/// The identity of the QEMU process at the other end of the socket (from `SO_PEERCRED` and
/// `/proc/PID/stat`): a restarted QEMU has another pid or another start time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuIdentity {
    /// The process id.
    pub pid: u32,
    /// The process start time in clock ticks since boot (field 22 of `/proc/PID/stat`).
    pub start_time: u64,
    /// The process's user and group ids.
    pub owner: Option<(u32, u32)>,
}

/// An open QMP session with capabilities negotiated.
pub struct Qmp {
    socket: PathBuf,
    service: Service,
    events: tokio::task::JoinHandle<()>,
    timeout: Duration,
    identity: Option<QemuIdentity>,
    version: (u64, u64, u64),
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("socket", &self.socket)
            .field("identity", &self.identity)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.events.abort();
    }
}

impl Qmp {
    /// Connects to `socket` (a path, or `unix:PATH`), reads the greeting and negotiates
    /// capabilities. Each command then has `timeout` to answer.
    pub async fn connect(socket: &str, timeout: Duration) -> Result<Qmp, Error> {
        let path = PathBuf::from(socket.strip_prefix("unix:").unwrap_or(socket));
        let connect = async {
            let stream = UnixStream::connect(&path)
                .await
                .map_err(|source| Error::Connect {
                    socket: path.clone(),
                    source,
                })?;
            let identity = peer_identity(&stream);
            let (read, write) = tokio::io::split(stream);
            let negotiation = QmpStreamTokio::open_split(LineLimit::new(read), write)
                .await
                .map_err(|source| Error::Io {
                    socket: path.clone(),
                    what: "reading the greeting".into(),
                    source,
                })?;
            let v = &negotiation.capabilities.QMP.version.qemu;
            let version = (v.major as u64, v.minor as u64, v.micro as u64);
            let stream = negotiation.negotiate().await.map_err(|source| Error::Io {
                socket: path.clone(),
                what: "qmp_capabilities".into(),
                source,
            })?;
            let (service, events) = stream.spawn_tokio();
            Ok::<_, Error>((service, events, identity, version))
        };
        let (service, events, identity, version) = tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| Error::Timeout {
            socket: path.clone(),
            // A QMP monitor serves one client at a time: a silent socket is most often one that
            // libvirt or another tool holds.
            command: "greeting (is another client, e.g. libvirt, connected to this monitor? give Bulwark a -qmp socket of its own)".into(),
            secs: timeout.as_secs(),
        })??;
        tracing::debug!(socket = %path.display(), ?version, ?identity, "QMP connected");
        Ok(Qmp {
            socket: path,
            service,
            events,
            timeout,
            identity,
            version,
        })
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// QEMU's version (major, minor, micro).
    pub fn version(&self) -> (u64, u64, u64) {
        self.version
    }

    /// The identity of the QEMU process, when the kernel told it.
    pub fn identity(&self) -> Option<&QemuIdentity> {
        self.identity.as_ref()
    }

    /// Runs one typed command. `subject` names what it acts on, for errors.
    pub async fn run<C>(&self, command: C, subject: &str) -> Result<C::Ok, Error>
    where
        C: qapi::qmp::QmpCommand,
    {
        let name = if subject.is_empty() {
            C::NAME.to_string()
        } else {
            format!("{} {subject}", C::NAME)
        };
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(self.timeout, self.service.execute(command)).await;
        tracing::debug!(command = %name, micros = started.elapsed().as_micros() as u64, "QMP");
        match result {
            Err(_) => Err(Error::Timeout {
                socket: self.socket.clone(),
                command: name,
                secs: self.timeout.as_secs(),
            }),
            Ok(Ok(ok)) => Ok(ok),
            Ok(Err(qapi::ExecuteError::Qapi(e))) => Err(Error::Command {
                socket: self.socket.clone(),
                command: name,
                class: format!("{:?}", e.class),
                desc: e.desc,
            }),
            Ok(Err(qapi::ExecuteError::Io(source))) => Err(Error::Io {
                socket: self.socket.clone(),
                what: name,
                source,
            }),
        }
    }

    /// Runs a command whose arguments are given as JSON (checked against the command's typed
    /// schema before sending): for the commands whose argument types have dozens of optional
    /// fields (`blockdev-add`, `block-export-add`).
    pub async fn run_json<C>(&self, args: serde_json::Value, subject: &str) -> Result<C::Ok, Error>
    where
        C: qapi::qmp::QmpCommand + serde::de::DeserializeOwned,
    {
        let command: C = serde_json::from_value(args).map_err(|e| Error::Io {
            socket: self.socket.clone(),
            what: format!("{} {subject}: building the arguments", C::NAME),
            source: io::Error::new(io::ErrorKind::InvalidInput, e),
        })?;
        self.run(command, subject).await
    }

    /// Runs a human monitor command (`human-monitor-command`) and returns its output. For tests
    /// and diagnostics only; Bulwark's own steps use typed commands.
    pub async fn hmp(&self, command_line: &str) -> Result<String, Error> {
        self.run(
            qapi::qmp::human_monitor_command {
                command_line: command_line.to_string(),
                cpu_index: None,
            },
            command_line,
        )
        .await
    }
}

fn peer_identity(stream: &UnixStream) -> Option<QemuIdentity> {
    use std::os::fd::AsFd;
    let cred = rustix::net::sockopt::socket_peercred(stream.as_fd()).ok()?;
    let pid = cred.pid.as_raw_nonzero().get() as u32;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(QemuIdentity {
        pid,
        start_time: parse_start_time(&stat)?,
        owner: Some((cred.uid.as_raw(), cred.gid.as_raw())),
    })
}

/// Field 22 (starttime) of a `/proc/PID/stat` line; the command name (field 2) may hold spaces
/// and parentheses, so fields are counted from the last `)`.
pub(crate) fn parse_start_time(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    // After ")" come fields 3.. ; starttime is field 22, the 20th of those.
    after.split_whitespace().nth(19)?.parse().ok()
}

/// Refuses lines longer than [`MAX_LINE`], so that a broken peer cannot make the JSON-lines
/// decoder buffer without bound.
struct LineLimit<R> {
    inner: R,
    since_newline: usize,
}

impl<R> LineLimit<R> {
    fn new(inner: R) -> Self {
        LineLimit {
            inner,
            since_newline: 0,
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for LineLimit<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let mut overlong = false;
                for &b in &buf.filled()[before..] {
                    if b == b'\n' {
                        this.since_newline = 0;
                    } else {
                        this.since_newline += 1;
                        overlong |= this.since_newline > MAX_LINE;
                    }
                }
                if overlong {
                    buf.set_filled(before);
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("QMP message longer than {MAX_LINE} bytes"),
                    )));
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[test]
    fn start_time_counts_from_the_last_parenthesis() {
        let stat = "1234 (qemu (x) y) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 987654 20";
        assert_eq!(parse_start_time(stat), Some(987654));
        assert_eq!(parse_start_time("garbage"), None);
        assert_eq!(parse_start_time("1 (a) S 1"), None);
    }

    #[tokio::test]
    async fn overlong_lines_are_refused() {
        let mut ok = LineLimit::new(&b"{}\n{}\n"[..]);
        let mut out = Vec::new();
        ok.read_to_end(&mut out).await.unwrap();
        let long = vec![b'x'; MAX_LINE + 1];
        let mut bad = LineLimit::new(&long[..]);
        let err = bad.read_to_end(&mut Vec::new()).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
