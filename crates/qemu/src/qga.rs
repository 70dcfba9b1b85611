//! A qemu-guest-agent (QGA) client: file-system freeze of a guest that runs only qemu-ga,
//! through the Unix socket of the QEMU chardev behind its virtio-serial port
//! (`org.qemu.guest_agent.0`).
//!
//! * [`Qga::connect`] connects and resynchronises the stream with `guest-sync-delimited`
//!   (a `0xFF` byte resets qemu-ga's parser; everything before the matching `0xFF` + reply —
//!   answers a dead client left behind — is discarded, at most [`MAX_DISCARD`] bytes). Every
//!   command is preceded by such a sync, so a reply that arrives late (or one the watchdog's
//!   thaw produced) is never taken for the answer to the next command.
//! * [`Qga::info`] (`guest-info`: the agent's version), [`Qga::freeze`]
//!   (`guest-fsfreeze-freeze` / `-freeze-list`), [`Qga::thaw`], [`Qga::status`].
//! * [`QgaWatchdog`]: qemu-ga has no freeze deadline of its own on Linux, so the controller
//!   enforces it. The watchdog is a **separate process** (this program re-executed, see
//!   [`dispatch_watchdog`]) holding a duplicate of the QGA connection: at the deadline it sends
//!   `guest-fsfreeze-thaw` itself, whatever the controller is doing — stalled in a transfer,
//!   stopped by SIGSTOP, or dead. The controller disarms it (kills it) before its own thaw.
//!
//! What remains: if the watchdog process is killed too (e.g. `kill -9` of both), or the host
//! side of the channel breaks, qemu-ga leaves the guest frozen until someone thaws it
//! (`virsh domfsthaw`, or a new `Qga::connect` + [`Qga::thaw`]).
//!
//! ```no_run
//! # async fn f() -> Result<(), bulwark_qemu::Error> {
//! use std::{path::Path, time::Duration};
//! use bulwark_qemu::qga::{Qga, QgaWatchdog};
//! let mut qga = Qga::connect(Path::new("/run/vm1-qga.sock"), Duration::from_secs(10)).await?;
//! let info = qga.info().await?;
//! println!("qemu-ga {}", info.version);
//! let watchdog = QgaWatchdog::spawn(&std::env::current_exe().unwrap(), &qga, Duration::from_secs(30))?;
//! qga.freeze(None).await?;
//! // ... snapshot ...
//! let fired = watchdog.disarm();
//! qga.thaw().await?;
//! assert!(!fired, "the freeze was not held until the snapshot");
//! # Ok(()) }
//! ```

use std::ffi::OsStr;
use std::io::{BufRead, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::Error;

/// Longest reply line accepted.
pub const MAX_REPLY: usize = 1 << 20;
/// Most stale bytes discarded while resynchronising.
pub const MAX_DISCARD: usize = 4 << 20;
/// The first argument that makes [`dispatch_watchdog`] run the watchdog.
pub const WATCHDOG_ARG: &str = "__bulwark-qga-watchdog";

fn qga_error(socket: &Path, what: impl Into<String>, message: impl Into<String>) -> Error {
    Error::Qga {
        socket: socket.to_owned(),
        what: what.into(),
        message: message.into(),
    }
}

/// What `guest-info` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QgaInfo {
    /// qemu-ga's version, e.g. `7.2.22`.
    pub version: String,
    /// Whether `guest-fsfreeze-freeze` is enabled in this agent.
    pub fsfreeze: bool,
}

/// What `guest-fsfreeze-status` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreezeStatus {
    /// Nothing frozen.
    Thawed,
    /// Frozen.
    Frozen,
}

/// A QGA session on a Unix socket.
#[derive(Debug)]
pub struct Qga {
    stream: BufReader<UnixStream>,
    socket: PathBuf,
    next_sync: u64,
    timeout: Duration,
}

impl Qga {
    /// Connects to the chardev socket and resynchronises. `timeout` bounds the connect, the
    /// sync and every later command except the freeze (which gets its own limit).
    pub async fn connect(socket: &Path, timeout: Duration) -> Result<Qga, Error> {
        let stream = tokio::time::timeout(timeout, UnixStream::connect(socket))
            .await
            .map_err(|_| {
                qga_error(
                    socket,
                    "connect",
                    format!("no connection within {timeout:?}"),
                )
            })?
            .map_err(|source| Error::Connect {
                socket: socket.to_owned(),
                source,
            })?;
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64 & 0x3FFF_FFFF_FFFF)
            .unwrap_or(1);
        let mut qga = Qga {
            stream: BufReader::new(stream),
            socket: socket.to_owned(),
            next_sync: seed,
            timeout,
        };
        qga.sync().await?;
        Ok(qga)
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Changes the limit on every later command (and sync).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// `guest-sync-delimited`: afterwards the next line read answers the next command.
    pub async fn sync(&mut self) -> Result<(), Error> {
        self.next_sync += 1;
        let id = self.next_sync;
        let timeout = self.timeout;
        let socket = self.socket.clone();
        tokio::time::timeout(timeout, self.sync_inner(id))
            .await
            .map_err(|_| {
                qga_error(
                    &socket,
                    "guest-sync-delimited",
                    format!("no answer within {timeout:?} (is qemu-ga running in the guest?)"),
                )
            })?
    }

    async fn sync_inner(&mut self, id: u64) -> Result<(), Error> {
        let mut req = vec![0xFF];
        req.extend_from_slice(
            json!({"execute": "guest-sync-delimited", "arguments": {"id": id}})
                .to_string()
                .as_bytes(),
        );
        req.push(b'\n');
        self.write(&req, "guest-sync-delimited").await?;
        let mut discarded = 0usize;
        loop {
            // Skip to the delimiter.
            loop {
                let b = self.stream.read_u8().await.map_err(|e| {
                    qga_error(
                        &self.socket,
                        "guest-sync-delimited",
                        format!("reading: {e}"),
                    )
                })?;
                if b == 0xFF {
                    break;
                }
                discarded += 1;
                if discarded > MAX_DISCARD {
                    return Err(qga_error(
                        &self.socket,
                        "guest-sync-delimited",
                        format!("no sync reply within {MAX_DISCARD} bytes"),
                    ));
                }
            }
            let line = self.read_line("guest-sync-delimited").await?;
            if serde_json::from_slice::<Value>(&line)
                .ok()
                .and_then(|v| v.get("return").and_then(Value::as_u64))
                == Some(id)
            {
                if discarded > 0 {
                    tracing::debug!(socket = %self.socket.display(), discarded, "resynchronised");
                }
                return Ok(());
            }
            discarded += line.len();
        }
    }

    async fn write(&mut self, bytes: &[u8], what: &str) -> Result<(), Error> {
        let s = self.stream.get_mut();
        s.write_all(bytes)
            .await
            .map_err(|e| qga_error(&self.socket, what, format!("writing: {e}")))
    }

    async fn read_line(&mut self, what: &str) -> Result<Vec<u8>, Error> {
        let mut line = Vec::new();
        let n = (&mut self.stream)
            .take(MAX_REPLY as u64 + 1)
            .read_until(b'\n', &mut line)
            .await
            .map_err(|e| qga_error(&self.socket, what, format!("reading: {e}")))?;
        if n == 0 {
            return Err(qga_error(&self.socket, what, "the connection closed"));
        }
        if line.len() > MAX_REPLY {
            return Err(qga_error(
                &self.socket,
                what,
                format!("reply line over {MAX_REPLY} bytes"),
            ));
        }
        Ok(line)
    }

    /// Syncs, runs `command` and returns its `return` value.
    async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, Error> {
        self.sync().await?;
        let mut req = match arguments {
            Some(a) => json!({"execute": command, "arguments": a}),
            None => json!({"execute": command}),
        }
        .to_string()
        .into_bytes();
        req.push(b'\n');
        let socket = self.socket.clone();
        let run = async {
            self.write(&req, command).await?;
            let line = self.read_line(command).await?;
            let v: Value = serde_json::from_slice(&line)
                .map_err(|e| qga_error(&self.socket, command, format!("unreadable reply: {e}")))?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            let err = v.get("error");
            let class = err
                .and_then(|e| e.get("class"))
                .and_then(Value::as_str)
                .unwrap_or("?");
            let desc = err
                .and_then(|e| e.get("desc"))
                .and_then(Value::as_str)
                .unwrap_or("(no description)");
            Err(qga_error(&self.socket, command, format!("{class}: {desc}")))
        };
        tokio::time::timeout(timeout, run)
            .await
            .map_err(|_| qga_error(&socket, command, format!("no answer within {timeout:?}")))?
    }

    /// `guest-info`: version, and whether fsfreeze is available.
    pub async fn info(&mut self) -> Result<QgaInfo, Error> {
        let v = self.execute("guest-info", None, self.timeout).await?;
        let version = v
            .get("version")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_owned();
        let fsfreeze = v
            .get("supported_commands")
            .and_then(Value::as_array)
            .is_some_and(|cmds| {
                cmds.iter().any(|c| {
                    c.get("name").and_then(Value::as_str) == Some("guest-fsfreeze-freeze")
                        && c.get("enabled").and_then(Value::as_bool) != Some(false)
                })
            });
        Ok(QgaInfo { version, fsfreeze })
    }

    /// `guest-get-host-name`: the guest's host name.
    pub async fn host_name(&mut self) -> Result<String, Error> {
        let v = self
            .execute("guest-get-host-name", None, self.timeout)
            .await?;
        v.get("host-name")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| {
                qga_error(
                    &self.socket,
                    "guest-get-host-name",
                    format!("unexpected reply {v}"),
                )
            })
    }

    /// Freezes every file system of the guest (`None`) or the listed mount points
    /// (`guest-fsfreeze-freeze-list`). Returns how many were frozen. Waits at most `timeout`
    /// (the guest syncs its file systems first).
    pub async fn freeze(&mut self, mountpoints: Option<&[String]>) -> Result<u64, Error> {
        let (cmd, args) = match mountpoints {
            Some(m) => (
                "guest-fsfreeze-freeze-list",
                Some(json!({"mountpoints": m})),
            ),
            None => ("guest-fsfreeze-freeze", None),
        };
        let v = self.execute(cmd, args, self.timeout).await?;
        v.as_u64()
            .ok_or_else(|| qga_error(&self.socket, cmd, format!("unexpected reply {v}")))
    }

    /// `guest-fsfreeze-thaw`: returns how many file systems were thawed (0 when none was
    /// frozen: thawing is idempotent).
    pub async fn thaw(&mut self) -> Result<u64, Error> {
        let v = self
            .execute("guest-fsfreeze-thaw", None, self.timeout)
            .await?;
        v.as_u64().ok_or_else(|| {
            qga_error(
                &self.socket,
                "guest-fsfreeze-thaw",
                format!("unexpected reply {v}"),
            )
        })
    }

    /// `guest-fsfreeze-status`.
    pub async fn status(&mut self) -> Result<FreezeStatus, Error> {
        let v = self
            .execute("guest-fsfreeze-status", None, self.timeout)
            .await?;
        match v.as_str() {
            Some("thawed") => Ok(FreezeStatus::Thawed),
            Some("frozen") => Ok(FreezeStatus::Frozen),
            _ => Err(qga_error(
                &self.socket,
                "guest-fsfreeze-status",
                format!("unexpected reply {v}"),
            )),
        }
    }

    fn dup_fd(&self) -> std::io::Result<OwnedFd> {
        self.stream.get_ref().as_fd().try_clone_to_owned()
    }
}

/// The watchdog process that thaws through QGA at the freeze deadline. Dropping it without
/// [`disarm`](QgaWatchdog::disarm) leaves it running: it thaws at the deadline.
#[derive(Debug)]
pub struct QgaWatchdog {
    child: Option<Child>,
    deadline: Instant,
}

impl QgaWatchdog {
    /// Starts `program` (which must call [`dispatch_watchdog`] first thing in `main`) as the
    /// watchdog of `qga`'s connection, in its own process group (a signal to the controller's
    /// group does not reach it), firing `after` from now. Returns once it is armed.
    pub fn spawn(program: &Path, qga: &Qga, after: Duration) -> Result<QgaWatchdog, Error> {
        let deadline = Instant::now() + after;
        let fail = |m: String| qga_error(&qga.socket, "starting the watchdog", m);
        let fd = qga.dup_fd().map_err(|e| fail(format!("dup: {e}")))?;
        let mut child = Command::new(program)
            .arg(WATCHDOG_ARG)
            .arg(after.as_millis().max(1).to_string())
            .arg(&qga.socket)
            .stdin(Stdio::from(fd))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()
            .map_err(|e| fail(format!("{}: {e}", program.display())))?;
        let mut armed = [0u8; 1];
        let ok = child
            .stdout
            .take()
            .map(|mut out| out.read_exact(&mut armed).is_ok() && armed[0] == b'R')
            .unwrap_or(false);
        if !ok {
            let _ = child.kill();
            let _ = child.wait();
            return Err(fail(format!(
                "{} did not arm (does its main call dispatch_watchdog?)",
                program.display()
            )));
        }
        tracing::debug!(pid = child.id(), ?after, "QGA watchdog armed");
        Ok(QgaWatchdog {
            child: Some(child),
            deadline,
        })
    }

    /// The watchdog's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// When it fires.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Stops the watchdog. Returns `true` if it had already fired (or the deadline has
    /// passed): the freeze was then not held continuously.
    pub fn disarm(mut self) -> bool {
        let past = Instant::now() >= self.deadline;
        let Some(mut child) = self.child.take() else {
            return past;
        };
        let exited = matches!(child.try_wait(), Ok(Some(_)));
        let _ = child.kill();
        let _ = child.wait();
        exited || past
    }
}

/// If this process was started as a QGA watchdog (its first argument is [`WATCHDOG_ARG`]),
/// runs it and returns its exit code; otherwise returns `None` at once. Call it first thing in
/// `main` of any program that uses [`QgaWatchdog`].
///
/// The watchdog: standard input is the QGA connection. It writes `R` on standard output when
/// armed, sleeps until the deadline, then sends `0xFF` + `guest-sync-delimited` +
/// `guest-fsfreeze-thaw` and waits (10 s at most) for the thaw's answer.
pub fn dispatch_watchdog() -> Option<ExitCode> {
    let mut args = std::env::args_os().skip(1);
    if args.next().is_none_or(|a| a != OsStr::new(WATCHDOG_ARG)) {
        return None;
    }
    let ms: Option<u64> = args.next().and_then(|a| a.to_str()?.parse().ok());
    let socket = args.next().map(PathBuf::from).unwrap_or_default();
    let Some(ms) = ms else {
        eprintln!("bulwark QGA watchdog: usage: {WATCHDOG_ARG} MILLISECONDS SOCKET");
        return Some(ExitCode::from(2));
    };
    Some(watchdog_main(Duration::from_millis(ms), &socket))
}

fn watchdog_main(after: Duration, socket: &Path) -> ExitCode {
    let started = Instant::now();
    let stream = match std::io::stdin().as_fd().try_clone_to_owned() {
        Ok(fd) => std::os::unix::net::UnixStream::from(fd),
        Err(e) => {
            eprintln!("bulwark QGA watchdog: no connection on stdin: {e}");
            return ExitCode::from(2);
        }
    };
    let mut out = std::io::stdout();
    if out.write_all(b"R").and_then(|()| out.flush()).is_err() {
        eprintln!("bulwark QGA watchdog: the controller went away before arming; thawing now");
    } else {
        std::thread::sleep(after.saturating_sub(started.elapsed()));
    }
    eprintln!(
        "bulwark QGA watchdog: freeze deadline of {after:?} reached on {}: thawing",
        socket.display()
    );
    match watchdog_thaw(&stream) {
        Ok(n) => {
            eprintln!(
                "bulwark QGA watchdog: thawed {n} file system(s) {:?} after arming",
                started.elapsed()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bulwark QGA watchdog: thaw failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn watchdog_thaw(stream: &std::os::unix::net::UnixStream) -> Result<u64, String> {
    let limit = Some(Duration::from_secs(10));
    stream.set_read_timeout(limit).map_err(|e| e.to_string())?;
    stream.set_write_timeout(limit).map_err(|e| e.to_string())?;
    let id = u64::from(std::process::id()) << 20 | 0xBEEF;
    let mut req = vec![0xFF];
    req.extend_from_slice(
        format!(
            "{}\n{}\n",
            json!({"execute": "guest-sync-delimited", "arguments": {"id": id}}),
            json!({"execute": "guest-fsfreeze-thaw"})
        )
        .as_bytes(),
    );
    let mut w = Patient {
        stream,
        give_up: Instant::now() + Duration::from_secs(10),
    };
    w.write_all(&req).map_err(|e| format!("writing: {e}"))?;
    // The descriptor is shared with the controller, whose async runtime made it non-blocking
    // (a flag of the shared open file description): retry "would block" until the limit.
    let give_up = Instant::now() + Duration::from_secs(10);
    let mut r = std::io::BufReader::new(Patient { stream, give_up }.take(MAX_DISCARD as u64));
    let mut synced = false;
    loop {
        let mut line = Vec::new();
        let n = r
            .read_until(b'\n', &mut line)
            .map_err(|e| format!("reading: {e}"))?;
        if n == 0 {
            return Err("the connection closed".into());
        }
        let text = line.strip_prefix(&[0xFF]).unwrap_or(&line);
        let Ok(v) = serde_json::from_slice::<Value>(text) else {
            continue;
        };
        if !synced {
            synced = v.get("return").and_then(Value::as_u64) == Some(id);
            continue;
        }
        if let Some(n) = v.get("return").and_then(Value::as_u64) {
            return Ok(n);
        }
        return Err(format!("qemu-ga refused the thaw: {v}"));
    }
}

/// Blocking reads and writes on a possibly non-blocking socket: "would block" is retried every
/// 5 ms until `give_up`.
struct Patient<'a> {
    stream: &'a std::os::unix::net::UnixStream,
    give_up: Instant,
}

impl Patient<'_> {
    fn retry<T>(
        &mut self,
        mut op: impl FnMut(&std::os::unix::net::UnixStream) -> std::io::Result<T>,
    ) -> std::io::Result<T> {
        loop {
            match op(self.stream) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= self.give_up {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "no answer in time",
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                r => return r,
            }
        }
    }
}

impl Read for Patient<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.retry(|mut s| s.read(buf))
    }
}

impl Write for Patient<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.retry(|mut s| s.write(buf))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
