//! virtio-serial transport: the agent in the guest serves a virtio-serial port, the controller
//! reaches it through the Unix socket of QEMU's chardev on the host.
//!
//! # Sessions on a stream without connections
//!
//! A virtio-serial port is one byte stream for the life of the guest: there is no accept, and
//! bytes a dead controller left half-written (or replies the agent wrote for it) are still in
//! the pipe when the next controller connects. Every session therefore starts with a **sync
//! handshake**, below the framing:
//!
//! 1. the controller writes [`SYNC_MAGIC`] followed by a 16-byte nonce;
//! 2. the agent discards every byte until it sees [`SYNC_MAGIC`], ends the session in progress
//!    if there is one (its handler is dropped, which thaws a freeze that session made), and
//!    answers [`SYNC_ACK`] followed by the same nonce;
//! 3. the controller discards every byte until it sees [`SYNC_ACK`] + its nonce (at most
//!    [`SYNC_DISCARD_LIMIT`] bytes, within [`SYNC_TIMEOUT`]); from there on both sides speak the
//!    ordinary framed protocol ([`serve`], [`Client`](crate::Client)) with its version
//!    negotiation, size limits and request-id rules.
//!
//! [`SYNC_MAGIC`] can never occur inside valid traffic: a frame is a 4-byte length of at most
//! 64 KiB followed by a JSON payload (UTF-8, never a `0xFF` byte, always starting with `{`).
//! The agent also ends a session when the guest reads end-of-file on the port (the host side
//! disconnected).
//!
//! # What this transport authenticates, and what it does not
//!
//! Nothing cryptographic. Only the host side of the chardev can write to the port, so the
//! guest trusts whoever can open that Unix socket on the host (protect it with file modes: QEMU
//! creates it; keep it in a root-only directory). It does **not** authenticate which host
//! process is speaking (any process that can connect to the socket is "the controller"), it
//! does not protect against the hypervisor (which can read and write guest memory anyway), and
//! it gives the host no proof of which guest answered beyond "the VM whose socket this is".
//! Inside the guest, any root process can open the port instead of the agent; the agent holds
//! it open (a virtio port has a single opener) for as long as it runs.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::codec::{Connection, MAX_FRAME_LEN, io_error};
use crate::error::Error;
use crate::server::{Handler, ServeOptions, serve};

/// Starts a session: written by the controller, followed by a 16-byte nonce.
pub const SYNC_MAGIC: [u8; 8] = [0xFF, 0xFE, b'B', b'W', b'S', b'Y', b'N', b'C'];
/// Answers [`SYNC_MAGIC`]: written by the agent, followed by the controller's nonce.
pub const SYNC_ACK: [u8; 8] = [0xFF, 0xFE, b'B', b'W', b'A', b'C', b'K', b'!'];
/// Length of the nonce after [`SYNC_MAGIC`] and [`SYNC_ACK`].
pub const NONCE_LEN: usize = 16;
/// How long the controller waits for [`SYNC_ACK`].
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(15);
/// How many stale bytes the controller discards before [`SYNC_ACK`] at most.
pub const SYNC_DISCARD_LIMIT: usize = 1 << 20;
/// How often the agent looks again at a port whose host side is not connected.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Pause after a readiness event that found nothing to read or no room to write.
const SPURIOUS_PAUSE: Duration = Duration::from_millis(5);
/// Directory where udev (or the test guest's `rc`) names the ports.
pub const VIRTIO_PORTS_DIR: &str = "/dev/virtio-ports";

/// The character device of the virtio-serial port called `name`: `/dev/virtio-ports/NAME` if
/// it exists, else the `/dev/vportNpM` whose `/sys/class/virtio-ports/vportNpM/name` is `name`.
pub fn find_port(name: &str) -> Result<PathBuf, Error> {
    let by_name = Path::new(VIRTIO_PORTS_DIR).join(name);
    if by_name.exists() {
        return Ok(by_name);
    }
    let sys = Path::new("/sys/class/virtio-ports");
    let not_found = |source| Error::File {
        path: by_name.clone(),
        action: "finding the virtio-serial port",
        source,
    };
    let entries = std::fs::read_dir(sys).map_err(not_found)?;
    for entry in entries.flatten() {
        let Ok(found) = std::fs::read_to_string(entry.path().join("name")) else {
            continue;
        };
        if found.trim_end() == name {
            return Ok(Path::new("/dev").join(entry.file_name()));
        }
    }
    Err(not_found(std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!("no virtio-serial port is named {name:?} (is the port configured in QEMU?)"),
    )))
}

/// The longest suffix of `data` that is a proper prefix of `magic`.
fn held_back(data: &[u8], magic: &[u8]) -> usize {
    (1..magic.len().min(data.len() + 1))
        .rev()
        .find(|&k| data[data.len() - k..] == magic[..k])
        .unwrap_or(0)
}

fn find(data: &[u8], magic: &[u8]) -> Option<usize> {
    data.windows(magic.len()).position(|w| w == magic)
}

/// The agent's side: the open port, serving one session after another.
#[derive(Debug)]
pub struct VirtioPortListener {
    port: AsyncFd<std::fs::File>,
    path: PathBuf,
    /// Bytes read from the port and not yet consumed.
    carry: Vec<u8>,
    sessions: u64,
}

impl VirtioPortListener {
    /// Opens the port device `path` (see [`find_port`]). Must be called inside a Tokio runtime.
    pub fn open(path: &Path) -> Result<VirtioPortListener, Error> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc_o_nonblock())
            .open(path)
            .map_err(|source| Error::File {
                path: path.to_owned(),
                action: "opening the virtio-serial port",
                source,
            })?;
        // Non-blocking for sure: a blocking read here would stall the whole session task.
        let flags = rustix::fs::fcntl_getfl(&file).map_err(|e| Error::File {
            path: path.to_owned(),
            action: "reading the port's flags",
            source: e.into(),
        })?;
        rustix::fs::fcntl_setfl(&file, flags | rustix::fs::OFlags::NONBLOCK).map_err(|e| {
            Error::File {
                path: path.to_owned(),
                action: "making the port non-blocking",
                source: e.into(),
            }
        })?;
        // SAFETY: `file` is an open file descriptor owned by the `AsyncFd` from here on; a
        // `std::fs::File` always returns the same descriptor and closes it only when dropped.
        let port = unsafe { AsyncFd::register(file) }.map_err(|e| Error::File {
            path: path.to_owned(),
            action: "registering the virtio-serial port",
            source: e.into_parts().1,
        })?;
        Ok(VirtioPortListener {
            port,
            path: path.to_owned(),
            carry: Vec::new(),
            sessions: 0,
        })
    }

    /// The port device.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn label(&self) -> String {
        format!("virtio-serial:{}", self.path.display())
    }

    /// Reads what the port has; `Ok(0)` when the host side is not connected.
    async fn read_port(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if let Ok(guard) = tokio::time::timeout(POLL_INTERVAL, self.port.readable()).await {
                let mut guard = guard?;
                match guard.try_io(|f| f.get_ref().read(buf)) {
                    Ok(r) => return r,
                    // Tokio never clears a "read closed" readiness (the port reports POLLHUP
                    // while no host is connected), so readable() may keep completing at once:
                    // pause, so that this loop cannot spin without yielding.
                    Err(_would_block) => {
                        tokio::time::sleep(SPURIOUS_PAUSE).await;
                        continue;
                    }
                }
            }
            // No readiness event for a while: look directly (a host connecting does not
            // always raise one).
            match self.port.get_ref().read(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                r => return r,
            }
        }
    }

    /// Writes all of `data`; waits while the host side is not connected.
    async fn write_port(&self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            let written = if let Ok(guard) =
                tokio::time::timeout(POLL_INTERVAL, self.port.writable()).await
            {
                let mut guard = guard?;
                match guard.try_io(|f| f.get_ref().write(data)) {
                    Ok(r) => r?,
                    Err(_would_block) => {
                        tokio::time::sleep(SPURIOUS_PAUSE).await;
                        continue;
                    }
                }
            } else {
                match self.port.get_ref().write(data) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    r => r?,
                }
            };
            data = &data[written..];
        }
        Ok(())
    }

    /// Discards bytes until [`SYNC_MAGIC`] + nonce; returns the nonce.
    async fn await_sync(&mut self) -> Result<[u8; NONCE_LEN], Error> {
        let mut buf = vec![0u8; 4096];
        loop {
            if let Some(p) = find(&self.carry, &SYNC_MAGIC) {
                let start = p + SYNC_MAGIC.len();
                if self.carry.len() >= start + NONCE_LEN {
                    let mut nonce = [0u8; NONCE_LEN];
                    nonce.copy_from_slice(&self.carry[start..start + NONCE_LEN]);
                    self.carry.drain(..start + NONCE_LEN);
                    return Ok(nonce);
                }
                self.carry.drain(..p);
            } else {
                let keep = held_back(&self.carry, &SYNC_MAGIC);
                let drop_len = self.carry.len() - keep;
                if drop_len > 0 {
                    tracing::debug!(
                        port = %self.path.display(),
                        bytes = drop_len,
                        "discarding bytes before a session start"
                    );
                }
                self.carry.drain(..drop_len);
            }
            let n = self
                .read_port(&mut buf)
                .await
                .map_err(|e| io_error(&self.label(), "reading the port", e))?;
            if n == 0 {
                // The host side is not connected.
                tokio::time::sleep(POLL_INTERVAL).await;
                continue;
            }
            self.carry.extend_from_slice(&buf[..n]);
        }
    }

    /// Serves sessions forever, one at a time, each with a fresh handler from
    /// `make_handler(peer_label)`. Returns only when the port fails.
    pub async fn run<F, H>(&mut self, options: ServeOptions, mut make_handler: F) -> Error
    where
        F: FnMut(&str) -> H,
        H: Handler + 'static,
    {
        loop {
            if let Err(e) = self.session(options, &mut make_handler).await {
                match &e {
                    Error::Io { .. } => {
                        tracing::error!(error = %e, "the virtio-serial port failed");
                        return e;
                    }
                    _ => tracing::warn!(error = %e, "session ended with an error"),
                }
            }
        }
    }

    /// Waits for a controller's sync, then serves it until it disconnects, breaks the framing
    /// or a new sync arrives.
    async fn session<F, H>(
        &mut self,
        options: ServeOptions,
        make_handler: &mut F,
    ) -> Result<(), Error>
    where
        F: FnMut(&str) -> H,
        H: Handler + 'static,
    {
        let nonce = self.await_sync().await?;
        self.sessions += 1;
        let peer = format!("{} session {}", self.label(), self.sessions);
        let mut ack = SYNC_ACK.to_vec();
        ack.extend_from_slice(&nonce);
        self.write_port(&ack)
            .await
            .map_err(|e| io_error(&peer, "answering the sync", e))?;
        tracing::info!(%peer, "session started");

        let (mut ours, theirs) = tokio::io::duplex(2 * MAX_FRAME_LEN);
        let handler = make_handler(&peer);
        let serving = tokio::spawn(serve(
            Connection::new(theirs, peer.clone()),
            handler,
            options,
        ));
        let mut from_port = vec![0u8; 8192];
        let mut from_serve = vec![0u8; 8192];
        let result = loop {
            tokio::select! {
                n = self.read_port(&mut from_port) => {
                    let n = match n {
                        Ok(0) => {
                            tracing::info!(%peer, "the host side disconnected");
                            break Ok(());
                        }
                        Ok(n) => n,
                        Err(e) => break Err(io_error(&peer, "reading the port", e)),
                    };
                    tracing::trace!(%peer, bytes = n, "from the host");
                    self.carry.extend_from_slice(&from_port[..n]);
                    let (deliver, resync) = match find(&self.carry, &SYNC_MAGIC) {
                        Some(p) => (p, true),
                        None => (self.carry.len() - held_back(&self.carry, &SYNC_MAGIC), false),
                    };
                    let delivered = ours.write_all(&self.carry[..deliver]).await;
                    self.carry.drain(..deliver);
                    if resync {
                        tracing::info!(%peer, "a new session starts: ending this one");
                        break Ok(());
                    }
                    if delivered.is_err() {
                        // serve() has returned; its result is reported below.
                        break Ok(());
                    }
                }
                n = ours.read(&mut from_serve) => {
                    match n {
                        Ok(0) | Err(_) => break Ok(()),
                        Ok(n) => {
                            tracing::trace!(%peer, bytes = n, "to the host");
                            if let Err(e) = self.write_port(&from_serve[..n]).await {
                                break Err(io_error(&peer, "writing the port", e));
                            }
                        }
                    }
                }
            }
        };
        // Ends serve(): it reads end-of-file (or fails writing) and drops the handler.
        drop(ours);
        match serving.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(%peer, error = %e, "session ended with a protocol error"),
            Err(e) => tracing::error!(%peer, error = %e, "the session task failed"),
        }
        result
    }
}

fn libc_o_nonblock() -> i32 {
    libc::O_NONBLOCK
}

fn nonce() -> [u8; NONCE_LEN] {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0) as u64;
    let mut n = [0u8; NONCE_LEN];
    n[..8].copy_from_slice(&t.to_le_bytes());
    let c = COUNTER.fetch_add(1, Ordering::Relaxed) ^ (u64::from(std::process::id()) << 32);
    n[8..].copy_from_slice(&c.to_le_bytes());
    n
}

/// The controller's side: connects to the chardev's Unix socket on the host and runs the sync
/// handshake (discarding what a previous session left in the stream). The returned connection
/// speaks the ordinary protocol: start with [`Client::hello`](crate::Client::hello).
pub async fn connect_virtio_serial(socket: &Path) -> Result<Connection<UnixStream>, Error> {
    let peer = format!("virtio-serial:unix:{}", socket.display());
    let mut stream = UnixStream::connect(socket)
        .await
        .map_err(|source| io_error(&peer, "connecting", source))?;
    let nonce = nonce();
    let mut sync = SYNC_MAGIC.to_vec();
    sync.extend_from_slice(&nonce);
    let mut want = SYNC_ACK.to_vec();
    want.extend_from_slice(&nonce);
    let started = Instant::now();
    let handshake = async {
        stream
            .write_all(&sync)
            .await
            .map_err(|source| io_error(&peer, "writing the sync", source))?;
        let mut seen: Vec<u8> = Vec::new();
        let mut discarded = 0usize;
        let mut buf = [0u8; 4096];
        loop {
            let n = stream
                .read(&mut buf)
                .await
                .map_err(|source| io_error(&peer, "reading the sync reply", source))?;
            if n == 0 {
                return Err(Error::Closed { peer: peer.clone() });
            }
            seen.extend_from_slice(&buf[..n]);
            if let Some(p) = find(&seen, &want) {
                if seen.len() > p + want.len() {
                    return Err(io_error(
                        &peer,
                        "reading the sync reply",
                        std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            "the agent sent bytes after the sync reply",
                        ),
                    ));
                }
                return Ok(discarded + p);
            }
            let keep = seen.len().min(want.len() - 1);
            let drop_len = seen.len() - keep;
            discarded += drop_len;
            seen.drain(..drop_len);
            if discarded > SYNC_DISCARD_LIMIT {
                return Err(io_error(
                    &peer,
                    "reading the sync reply",
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("no sync reply within {SYNC_DISCARD_LIMIT} bytes"),
                    ),
                ));
            }
        }
    };
    let discarded = tokio::time::timeout(SYNC_TIMEOUT, handshake)
        .await
        .map_err(|_| Error::Timeout {
            peer: peer.clone(),
            action: "waiting for the agent's sync reply (is bulwark-agent running in the guest?)",
            after: SYNC_TIMEOUT,
        })??;
    tracing::debug!(%peer, discarded, elapsed = ?started.elapsed(), "synchronised");
    Ok(Connection::new(stream, peer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_back_keeps_only_magic_prefixes() {
        assert_eq!(held_back(b"abc", &SYNC_MAGIC), 0);
        assert_eq!(held_back(&[1, 0xFF], &SYNC_MAGIC), 1);
        assert_eq!(held_back(&[1, 0xFF, 0xFE, b'B'], &SYNC_MAGIC), 3);
        assert_eq!(held_back(&SYNC_MAGIC[..7], &SYNC_MAGIC), 7);
        assert_eq!(held_back(&[], &SYNC_MAGIC), 0);
    }

    #[test]
    fn magic_never_occurs_in_frames() {
        // A frame with a length whose low bytes are FF FE is followed by '{', not 'B'.
        let mut frame = vec![0, 0, 0xFF, 0xFE, b'{'];
        frame.extend_from_slice(b"\"v\":1}");
        assert_eq!(find(&frame, &SYNC_MAGIC), None);
    }
}
