//! The read-only async NBD server: fixed newstyle handshake, structured replies, READ (holes as
//! OFFSET_HOLE chunks), BLOCK_STATUS (`base:allocation`), several clients at once.
//!
//! A client that sends garbage loses its own connection and nothing else; a request the server
//! will not serve (past the end, too long, a write) is answered with an error and the
//! connection goes on. Memory is bounded: connections are capped, the handshake is timed,
//! option payloads are capped, and the bytes of reads in flight across all connections are
//! bounded by [`ServerOptions::max_buffered`].

use std::fmt::Debug;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::client::{Address, Extent, STATE_HOLE, STATE_ZERO};
use crate::error::{Error, Result};
use crate::proto::*;

/// One piece of a read's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Piece {
    /// Bytes (never empty).
    Data(Bytes),
    /// A run of zeroes of this many bytes (never 0), sent as an OFFSET_HOLE chunk.
    Hole(u32),
}

/// Where the served bytes come from. Calls are made from the server's tasks, several at once.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + Debug + 'static {
    /// The export's size in bytes.
    fn size(&self) -> u64;

    /// The bytes of `[offset, offset+len)` (always within `size()`), as pieces in order that
    /// cover exactly `len` bytes. An error is sent to the client as EIO with its message.
    async fn read(&self, offset: u64, len: u32) -> io::Result<Vec<Piece>>;

    /// Allocation of `[offset, offset+len)`: extents in order from `offset`, each with
    /// [`STATE_HOLE`] and/or [`STATE_ZERO`] flags or none (data). They may end before
    /// `offset + len` (the client asks again). Default: all data.
    async fn block_status(&self, offset: u64, len: u32) -> io::Result<Vec<Extent>> {
        Ok(vec![Extent {
            offset,
            length: u64::from(len),
            flags: 0,
        }])
    }
}

/// How the server behaves.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerOptions {
    /// The export's name (clients asking for `""`, the default export, get it too).
    pub export: String,
    /// A description sent to clients that ask (NBD_INFO_DESCRIPTION).
    pub description: Option<String>,
    /// Most connections at once; more are closed right after accept.
    pub max_connections: usize,
    /// Time a client has to finish the handshake.
    pub handshake_timeout: Duration,
    /// Largest READ or BLOCK_STATUS length served; longer requests get EINVAL (EOVERFLOW).
    pub max_request: u32,
    /// Most bytes of read data held at once across all connections.
    pub max_buffered: usize,
    /// How long `run` waits for connections to finish their request after shutdown.
    pub shutdown_grace: Duration,
}

impl ServerOptions {
    /// Defaults for `export`: 16 connections, 10 s handshake, 32 MiB requests, 128 MiB buffered.
    pub fn new(export: impl Into<String>) -> Self {
        ServerOptions {
            export: export.into(),
            description: None,
            max_connections: 16,
            handshake_timeout: Duration::from_secs(10),
            max_request: 32 << 20,
            max_buffered: 128 << 20,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// Tells a running [`Server`] to stop: it stops accepting, lets each connection finish its
/// current request, closes them, and `run` returns.
#[derive(Debug, Clone)]
pub struct ShutdownHandle(Arc<watch::Sender<bool>>);

impl ShutdownHandle {
    /// Asks the server to stop (idempotent).
    pub fn shutdown(&self) {
        self.0.send_replace(true);
    }
}

#[derive(Debug)]
enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// A bound, read-only NBD server for one export.
#[derive(Debug)]
pub struct Server {
    listener: Listener,
    address: Address,
    shared: Arc<Shared>,
    shutdown: Arc<watch::Sender<bool>>,
}

#[derive(Debug)]
pub(crate) struct Shared {
    backend: Arc<dyn Backend>,
    options: ServerOptions,
    buffered: Semaphore,
}

/// Option payloads larger than this end the connection.
const MAX_OPTION_PAYLOAD: u32 = 16 << 10;
/// Options one connection may send before it is dropped.
const MAX_OPTIONS: usize = 256;
/// Most extents in one BLOCK_STATUS chunk the server sends.
const MAX_EXTENTS: usize = 1 << 16;
/// Requests one connection may have in flight.
const MAX_IN_FLIGHT: usize = 16;
/// The context id of `base:allocation`.
const BASE_ALLOCATION_ID: u32 = 1;

impl Server {
    /// Listens on `address` (a Unix socket path that must not exist yet, or a TCP `host:port`;
    /// port 0 picks a free one, see [`Server::address`]).
    pub async fn bind(
        address: &Address,
        backend: Arc<dyn Backend>,
        options: ServerOptions,
    ) -> Result<Server> {
        if options.max_request == 0
            || options.max_request as usize > options.max_buffered
            || options.max_connections == 0
            || options.export.len() > MAX_STRING
            || options
                .description
                .as_ref()
                .is_some_and(|d| d.len() > MAX_STRING)
        {
            return Err(Error::ServerOptions(format!(
                "need 0 < max_request <= max_buffered, max_connections > 0, names <= {MAX_STRING} bytes: {options:?}"
            )));
        }
        let listen_err = |source| Error::Listen {
            address: address.to_string(),
            source,
        };
        let (listener, bound) = match address {
            Address::Unix(path) => (
                Listener::Unix(UnixListener::bind(path).map_err(listen_err)?),
                address.clone(),
            ),
            Address::Tcp(hostport) => {
                let l = TcpListener::bind(hostport.as_str())
                    .await
                    .map_err(listen_err)?;
                let local = l.local_addr().map_err(listen_err)?;
                (Listener::Tcp(l), Address::Tcp(local.to_string()))
            }
        };
        let permits = options.max_buffered.min(Semaphore::MAX_PERMITS);
        Ok(Server {
            listener,
            address: bound,
            shared: Arc::new(Shared {
                backend,
                buffered: Semaphore::new(permits),
                options,
            }),
            shutdown: Arc::new(watch::channel(false).0),
        })
    }

    /// The address it listens on (with the actual port for TCP).
    pub fn address(&self) -> &Address {
        &self.address
    }

    /// A handle that stops the server.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shutdown.clone())
    }

    /// Serves until shut down, then closes every connection and removes its Unix socket.
    pub async fn run(self) -> Result<()> {
        let span = tracing::info_span!("nbd_server", address = %self.address, export = %self.shared.options.export);
        self.serve().instrument(span).await
    }

    async fn serve(self) -> Result<()> {
        let connections = Arc::new(Semaphore::new(self.shared.options.max_connections));
        let mut stop = self.shutdown.subscribe();
        let mut tasks = JoinSet::new();
        let mut next_id = 0u64;
        loop {
            while tasks.try_join_next().is_some() {}
            if *stop.borrow() {
                break;
            }
            let accepted = tokio::select! {
                _ = stop.changed() => break,
                a = accept(&self.listener) => a,
            };
            let (reader, writer): (
                Box<dyn AsyncRead + Send + Unpin>,
                Box<dyn AsyncWrite + Send + Unpin>,
            ) = match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "nbd accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = connections.clone().try_acquire_owned() else {
                tracing::warn!(
                    max = self.shared.options.max_connections,
                    "nbd connection refused: too many connections"
                );
                continue;
            };
            next_id += 1;
            let shared = self.shared.clone();
            let stop = self.shutdown.subscribe();
            let conn_span = tracing::debug_span!("nbd_connection", id = next_id);
            tasks.spawn(
                async move {
                    let _permit = permit;
                    match serve_connection(reader, writer, &shared, stop).await {
                        Ok(()) => tracing::debug!("nbd connection closed"),
                        Err(e) => tracing::info!(error = %e, "nbd connection ended"),
                    }
                }
                .instrument(conn_span),
            );
        }
        drop(self.listener);
        let grace = self.shared.options.shutdown_grace;
        if tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} })
            .await
            .is_err()
        {
            tasks.shutdown().await;
        }
        if let Address::Unix(path) = &self.address {
            let _ = std::fs::remove_file(path);
        }
        Ok(())
    }
}

type Halves = (
    Box<dyn AsyncRead + Send + Unpin>,
    Box<dyn AsyncWrite + Send + Unpin>,
);

async fn accept(listener: &Listener) -> io::Result<Halves> {
    Ok(match listener {
        Listener::Unix(l) => {
            let (s, _) = l.accept().await?;
            let (r, w) = s.into_split();
            (Box::new(r), Box::new(w))
        }
        Listener::Tcp(l) => {
            let (s, _) = l.accept().await?;
            s.set_nodelay(true)?;
            let (r, w) = s.into_split();
            (Box::new(r), Box::new(w))
        }
    })
}

/// Why a connection ended other than by the client's DISC or hang-up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnEnd {
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error("protocol violation: {0}")]
    Garbage(String),
    #[error("handshake not finished within {0:?}")]
    HandshakeTimeout(Duration),
}

/// What the handshake agreed on.
#[derive(Debug, Default)]
struct Session {
    structured: bool,
    base_allocation: bool,
}

/// Serves one connection: handshake, then requests until DISC, hang-up, garbage or shutdown.
pub(crate) async fn serve_connection<R, W>(
    reader: R,
    writer: W,
    shared: &Shared,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ConnEnd>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut r = BufReader::with_capacity(16 << 10, reader);
    let mut w = BufWriter::with_capacity(64 << 10, writer);
    let timeout = shared.options.handshake_timeout;
    let session = tokio::select! {
        s = tokio::time::timeout(timeout, handshake(&mut r, &mut w, shared)) => match s {
            Ok(s) => s?,
            Err(_) => return Err(ConnEnd::HandshakeTimeout(timeout)),
        },
        _ = stopped(&mut stop) => return Ok(()),
    };
    let Some(session) = session else {
        return Ok(());
    };
    transmission(&mut r, &mut w, shared, &session, stop).await
}

/// The transmission phase: up to [`MAX_IN_FLIGHT`] READ/BLOCK_STATUS requests are served
/// concurrently (QEMU pipelines its requests); each reply is written whole as it completes.
async fn transmission<R, W>(
    r: &mut R,
    w: &mut W,
    shared: &Shared,
    session: &Session,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ConnEnd>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut in_flight: FuturesUnordered<BoxFuture<'_, Reply<'_>>> = FuturesUnordered::new();
    let mut h = [0u8; Request::SIZE];
    let mut filled = 0;
    // Set at the client's EOF or DISC: no more requests; finish those in flight.
    let mut closing = false;
    loop {
        if closing && in_flight.is_empty() {
            return Ok(());
        }
        tokio::select! {
            biased;
            _ = stopped(&mut stop) => return Ok(()),
            Some(reply) = in_flight.next(), if !in_flight.is_empty() => {
                write_reply(w, session, reply).await?;
                w.flush().await?;
            }
            // `read` is cancel-safe: the bytes of a partial header stay in `h`.
            n = r.read(&mut h[filled..]), if !closing && in_flight.len() < MAX_IN_FLIGHT => {
                let n = n?;
                if n == 0 {
                    if filled > 0 {
                        return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
                    }
                    closing = true;
                    continue;
                }
                filled += n;
                if filled < Request::SIZE {
                    continue;
                }
                filled = 0;
                let req = Request::decode(&h)
                    .map_err(|m| ConnEnd::Garbage(format!("request magic {m:#x}")))?;
                match triage(r, shared, session, req).await? {
                    Next::Disconnect => closing = true,
                    Next::Now(reply) => {
                        write_reply(w, session, reply).await?;
                        w.flush().await?;
                    }
                    Next::Later(work) => in_flight.push(work),
                }
            }
        }
    }
}

/// Resolves once shutdown is asked for (or the server is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` on a clean EOF before the first byte.
async fn read_exact_or_eof<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        let n = r.read(&mut buf[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(false);
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    Ok(true)
}

async fn option_reply<W: AsyncWrite + Unpin>(
    w: &mut W,
    option: u32,
    kind: u32,
    payload: &[u8],
) -> io::Result<()> {
    w.write_all(&encode_option_reply(option, kind, payload.len() as u32))
        .await?;
    w.write_all(payload).await
}

fn export_matches(shared: &Shared, name: &str) -> bool {
    name.is_empty() || name == shared.options.export
}

fn transmission_flags() -> u16 {
    TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN
}

/// The fixed newstyle handshake. `Ok(None)`: the client aborted or hung up.
async fn handshake<R, W>(r: &mut R, w: &mut W, shared: &Shared) -> Result<Option<Session>, ConnEnd>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut greeting = NBDMAGIC.to_be_bytes().to_vec();
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&greeting).await?;
    w.flush().await?;
    let mut cf = [0u8; 4];
    if !read_exact_or_eof(r, &mut cf).await? {
        return Ok(None);
    }
    let client_flags = u32::from_be_bytes(cf);
    if client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0
        || client_flags & CLIENT_FIXED_NEWSTYLE == 0
    {
        return Err(ConnEnd::Garbage(format!("client flags {client_flags:#x}")));
    }
    let no_zeroes = client_flags & CLIENT_NO_ZEROES != 0;
    let mut session = Session::default();
    let size = shared.backend.size();
    for _ in 0..MAX_OPTIONS {
        let mut h = [0u8; 16];
        if !read_exact_or_eof(r, &mut h).await? {
            return Ok(None);
        }
        let (option, len) =
            decode_option(&h).map_err(|m| ConnEnd::Garbage(format!("option magic {m:#x}")))?;
        if len > MAX_OPTION_PAYLOAD {
            return Err(ConnEnd::Garbage(format!(
                "{} with a {len}-byte payload",
                option_name(option)
            )));
        }
        let mut p = vec![0u8; len as usize];
        r.read_exact(&mut p).await?;
        match option {
            OPT_EXPORT_NAME => {
                let name = std::str::from_utf8(&p).unwrap_or("\u{fffd}");
                if !export_matches(shared, name) {
                    return Err(ConnEnd::Garbage(format!(
                        "NBD_OPT_EXPORT_NAME for unknown export {:?}",
                        name.chars().take(64).collect::<String>()
                    )));
                }
                let mut reply = size.to_be_bytes().to_vec();
                reply.extend_from_slice(&transmission_flags().to_be_bytes());
                if !no_zeroes {
                    reply.extend_from_slice(&[0u8; 124]);
                }
                w.write_all(&reply).await?;
                w.flush().await?;
                return Ok(Some(session));
            }
            OPT_ABORT => {
                option_reply(w, option, REP_ACK, &[]).await?;
                w.flush().await?;
                return Ok(None);
            }
            OPT_LIST => {
                if p.is_empty() {
                    let mut s = Vec::new();
                    put_string32(&mut s, &shared.options.export);
                    option_reply(w, option, REP_SERVER, &s).await?;
                    option_reply(w, option, REP_ACK, &[]).await?;
                } else {
                    option_reply(w, option, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data").await?;
                }
            }
            OPT_INFO | OPT_GO => {
                let parsed = parse_info_request(&p);
                match parsed {
                    None => {
                        option_reply(w, option, REP_ERR_INVALID, b"malformed request").await?;
                    }
                    Some((name, _)) if !export_matches(shared, &name) => {
                        option_reply(w, option, REP_ERR_UNKNOWN, b"no such export").await?;
                    }
                    Some((_, infos)) => {
                        let mut export = INFO_EXPORT.to_be_bytes().to_vec();
                        export.extend_from_slice(&size.to_be_bytes());
                        export.extend_from_slice(&transmission_flags().to_be_bytes());
                        option_reply(w, option, REP_INFO, &export).await?;
                        if infos.contains(&INFO_NAME) {
                            let mut n = INFO_NAME.to_be_bytes().to_vec();
                            n.extend_from_slice(shared.options.export.as_bytes());
                            option_reply(w, option, REP_INFO, &n).await?;
                        }
                        if let (true, Some(d)) = (
                            infos.contains(&INFO_DESCRIPTION),
                            &shared.options.description,
                        ) {
                            let mut n = INFO_DESCRIPTION.to_be_bytes().to_vec();
                            n.extend_from_slice(d.as_bytes());
                            option_reply(w, option, REP_INFO, &n).await?;
                        }
                        let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                        for v in [1u32, 4096, shared.options.max_request] {
                            bs.extend_from_slice(&v.to_be_bytes());
                        }
                        option_reply(w, option, REP_INFO, &bs).await?;
                        option_reply(w, option, REP_ACK, &[]).await?;
                        if option == OPT_GO {
                            w.flush().await?;
                            return Ok(Some(session));
                        }
                    }
                }
            }
            OPT_STRUCTURED_REPLY => {
                if p.is_empty() {
                    session.structured = true;
                    option_reply(w, option, REP_ACK, &[]).await?;
                } else {
                    option_reply(w, option, REP_ERR_INVALID, b"takes no data").await?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = option == OPT_SET_META_CONTEXT;
                match parse_meta_request(&p) {
                    None => {
                        option_reply(w, option, REP_ERR_INVALID, b"malformed request").await?;
                    }
                    Some(_) if set && !session.structured => {
                        option_reply(w, option, REP_ERR_INVALID, b"structured replies first")
                            .await?;
                    }
                    Some((name, _)) if !export_matches(shared, &name) => {
                        option_reply(w, option, REP_ERR_UNKNOWN, b"no such export").await?;
                    }
                    Some((_, queries)) => {
                        let base = crate::client::BASE_ALLOCATION;
                        let selected = queries.iter().any(|q| q == base)
                            || (!set
                                && (queries.is_empty() || queries.iter().any(|q| q == "base:")));
                        if set {
                            session.base_allocation = selected;
                        }
                        if selected {
                            let mut c = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                            c.extend_from_slice(base.as_bytes());
                            option_reply(w, option, REP_META_CONTEXT, &c).await?;
                        }
                        option_reply(w, option, REP_ACK, &[]).await?;
                    }
                }
            }
            _ => {
                option_reply(w, option, REP_ERR_UNSUP, b"not supported").await?;
            }
        }
        w.flush().await?;
    }
    Err(ConnEnd::Garbage(format!("more than {MAX_OPTIONS} options")))
}

/// Parses an NBD_OPT_INFO/GO payload: export name and the info types asked for.
pub(crate) fn parse_info_request(p: &[u8]) -> Option<(String, Vec<u16>)> {
    let mut at = 0;
    let name = take_string32(p, &mut at)?;
    let n = usize::from(get16(p, at)?);
    at += 2;
    if p.len() != at.checked_add(n.checked_mul(2)?)? {
        return None;
    }
    let infos = (0..n).filter_map(|i| get16(p, at + 2 * i)).collect();
    Some((name, infos))
}

/// Parses an NBD_OPT_LIST/SET_META_CONTEXT payload: export name and queries.
pub(crate) fn parse_meta_request(p: &[u8]) -> Option<(String, Vec<String>)> {
    let mut at = 0;
    let name = take_string32(p, &mut at)?;
    let n = get32(p, at)?;
    at += 4;
    // Each query takes at least 4 bytes: a count beyond that is a lie, refused before allocating.
    if u64::from(n) > (p.len() as u64 - at as u64) / 4 {
        return None;
    }
    let mut queries = Vec::with_capacity(n as usize);
    for _ in 0..n {
        queries.push(take_string32(p, &mut at)?);
    }
    (at == p.len()).then_some((name, queries))
}

/// A reply, ready to be written.
enum Reply<'a> {
    /// A simple reply (no payload).
    Simple { errno: u32, cookie: u64 },
    /// A refusal: an ERROR chunk for READ/BLOCK_STATUS with structured replies, else simple.
    Error {
        req: Request,
        errno: u32,
        message: String,
    },
    /// A successful read; the permit bounds the bytes held until they are written.
    Read {
        req: Request,
        pieces: Vec<Piece>,
        _permit: tokio::sync::SemaphorePermit<'a>,
    },
    /// A BLOCK_STATUS chunk's payload (context id and extents).
    BlockStatus { req: Request, payload: Vec<u8> },
}

/// What to do with a request.
enum Next<'a> {
    Disconnect,
    Now(Reply<'a>),
    Later(BoxFuture<'a, Reply<'a>>),
}

fn refuse<'a>(req: Request, errno: u32, message: &str) -> Reply<'a> {
    tracing::debug!(
        command = command_name(req.command),
        offset = req.offset,
        length = req.length,
        errno = errno_name(errno),
        message,
        "nbd request refused"
    );
    Reply::Error {
        req,
        errno,
        message: message.to_string(),
    }
}

/// Decides how to answer a request; skips a WRITE's payload to stay in step.
async fn triage<'a, R: AsyncRead + Unpin>(
    r: &mut R,
    shared: &'a Shared,
    session: &Session,
    req: Request,
) -> Result<Next<'a>, ConnEnd> {
    let size = shared.backend.size();
    let max = shared.options.max_request;
    let in_range = req
        .offset
        .checked_add(u64::from(req.length))
        .is_some_and(|end| end <= size);
    let now = |reply| Ok(Next::Now(reply));
    match req.command {
        CMD_DISC => Ok(Next::Disconnect),
        CMD_FLUSH | CMD_CACHE => now(Reply::Simple {
            errno: 0,
            cookie: req.cookie,
        }),
        CMD_WRITE => {
            if req.length > max {
                return Err(ConnEnd::Garbage(format!(
                    "WRITE with a {}-byte payload",
                    req.length
                )));
            }
            let want = u64::from(req.length);
            let skipped = tokio::io::copy(&mut r.take(want), &mut tokio::io::sink()).await?;
            if skipped != want {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
            }
            now(refuse(req, EPERM, "read-only export"))
        }
        CMD_TRIM | CMD_WRITE_ZEROES => now(refuse(req, EPERM, "read-only export")),
        CMD_READ | CMD_BLOCK_STATUS if req.length == 0 => now(refuse(req, EINVAL, "zero length")),
        CMD_READ | CMD_BLOCK_STATUS if !in_range => {
            now(refuse(req, EINVAL, "past the end of the export"))
        }
        CMD_READ if req.length > max => {
            now(refuse(req, EOVERFLOW, "request longer than the maximum"))
        }
        CMD_READ => Ok(Next::Later(Box::pin(read(shared, req)))),
        CMD_BLOCK_STATUS if !session.structured || !session.base_allocation => {
            now(refuse(req, EINVAL, "no meta context selected"))
        }
        CMD_BLOCK_STATUS => Ok(Next::Later(Box::pin(block_status(shared, req)))),
        _ => now(refuse(req, EINVAL, "unknown command")),
    }
}

async fn write_reply<W: AsyncWrite + Unpin>(
    w: &mut W,
    session: &Session,
    reply: Reply<'_>,
) -> io::Result<()> {
    match reply {
        Reply::Simple { errno, cookie } => w.write_all(&encode_simple_reply(errno, cookie)).await,
        Reply::Error {
            req,
            errno,
            message,
        } => {
            if session.structured && matches!(req.command, CMD_READ | CMD_BLOCK_STATUS) {
                let msg = &message.as_bytes()[..message.len().min(MAX_STRING)];
                let mut p = errno.to_be_bytes().to_vec();
                p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
                p.extend_from_slice(msg);
                let h = ChunkHeader {
                    flags: REPLY_FLAG_DONE,
                    kind: REPLY_TYPE_ERROR,
                    cookie: req.cookie,
                    length: p.len() as u32,
                };
                w.write_all(&h.encode()).await?;
                w.write_all(&p).await
            } else {
                w.write_all(&encode_simple_reply(errno, req.cookie)).await
            }
        }
        Reply::Read { req, pieces, .. } => write_read(w, session, &req, &pieces).await,
        Reply::BlockStatus { req, payload } => {
            let h = ChunkHeader {
                flags: REPLY_FLAG_DONE,
                kind: REPLY_TYPE_BLOCK_STATUS,
                cookie: req.cookie,
                length: payload.len() as u32,
            };
            w.write_all(&h.encode()).await?;
            w.write_all(&payload).await
        }
    }
}

/// Checks a backend's read answer: pieces covering exactly `len`, none empty.
fn check_pieces(pieces: &[Piece], len: u32) -> Result<(), String> {
    let mut total = 0u64;
    for p in pieces {
        let n = match p {
            Piece::Data(d) => d.len() as u64,
            Piece::Hole(n) => u64::from(*n),
        };
        if n == 0 {
            return Err("backend returned an empty piece".into());
        }
        total += n;
    }
    if total != u64::from(len) {
        return Err(format!(
            "backend returned {total} bytes for a read of {len}"
        ));
    }
    Ok(())
}

async fn read(shared: &Shared, req: Request) -> Reply<'_> {
    // Bound the bytes held across connections.
    let Ok(permit) = shared.buffered.acquire_many(req.length).await else {
        return refuse(req, EIO, "server closing");
    };
    match shared.backend.read(req.offset, req.length).await {
        Ok(pieces) => match check_pieces(&pieces, req.length) {
            Ok(()) => Reply::Read {
                req,
                pieces,
                _permit: permit,
            },
            Err(m) => {
                tracing::error!(offset = req.offset, length = req.length, "{m}");
                refuse(req, EIO, &m)
            }
        },
        Err(e) => refuse(req, EIO, &e.to_string()),
    }
}

async fn write_read<W: AsyncWrite + Unpin>(
    w: &mut W,
    session: &Session,
    req: &Request,
    pieces: &[Piece],
) -> io::Result<()> {
    if !session.structured {
        w.write_all(&encode_simple_reply(0, req.cookie)).await?;
        let zeroes = [0u8; 64 << 10];
        for p in pieces {
            match p {
                Piece::Data(d) => w.write_all(d).await?,
                Piece::Hole(n) => {
                    let mut left = *n as usize;
                    while left > 0 {
                        let k = left.min(zeroes.len());
                        w.write_all(&zeroes[..k]).await?;
                        left -= k;
                    }
                }
            }
        }
        return Ok(());
    }
    let mut at = req.offset;
    for (i, p) in pieces.iter().enumerate() {
        let flags = if i + 1 == pieces.len() {
            REPLY_FLAG_DONE
        } else {
            0
        };
        match p {
            Piece::Data(d) => {
                let h = ChunkHeader {
                    flags,
                    kind: REPLY_TYPE_OFFSET_DATA,
                    cookie: req.cookie,
                    length: d.len() as u32 + 8,
                };
                w.write_all(&h.encode()).await?;
                w.write_all(&at.to_be_bytes()).await?;
                w.write_all(d).await?;
                at += d.len() as u64;
            }
            Piece::Hole(n) => {
                let h = ChunkHeader {
                    flags,
                    kind: REPLY_TYPE_OFFSET_HOLE,
                    cookie: req.cookie,
                    length: 12,
                };
                w.write_all(&h.encode()).await?;
                w.write_all(&at.to_be_bytes()).await?;
                w.write_all(&n.to_be_bytes()).await?;
                at += u64::from(*n);
            }
        }
    }
    Ok(())
}

/// Turns a backend's extents into wire extents: contiguous from `offset`, clipped to the
/// request, only HOLE/ZERO flags, equal neighbours merged, at most `limit`.
pub(crate) fn wire_extents(
    extents: &[Extent],
    offset: u64,
    len: u32,
    limit: usize,
) -> Result<Vec<(u32, u32)>, String> {
    let end = offset + u64::from(len);
    let mut at = offset;
    let mut out: Vec<(u32, u32)> = Vec::new();
    for e in extents {
        if at >= end || out.len() >= limit {
            break;
        }
        if e.offset != at || e.length == 0 {
            return Err(format!(
                "backend extent at {} length {} where {at} was expected",
                e.offset, e.length
            ));
        }
        let n = e.length.min(end - at) as u32;
        let flags = e.flags & (STATE_HOLE | STATE_ZERO);
        match out.last_mut() {
            Some(last) if last.1 == flags => last.0 += n,
            _ => out.push((n, flags)),
        }
        at += u64::from(n);
    }
    if out.is_empty() {
        return Err("backend returned no extents".into());
    }
    Ok(out)
}

async fn block_status(shared: &Shared, req: Request) -> Reply<'_> {
    let limit = if req.flags & CMD_FLAG_REQ_ONE != 0 {
        1
    } else {
        MAX_EXTENTS
    };
    let extents = match shared.backend.block_status(req.offset, req.length).await {
        Ok(e) => match wire_extents(&e, req.offset, req.length, limit) {
            Ok(e) => e,
            Err(m) => {
                tracing::error!(offset = req.offset, length = req.length, "{m}");
                return refuse(req, EIO, &m);
            }
        },
        Err(e) => return refuse(req, EIO, &e.to_string()),
    };
    let mut payload = Vec::with_capacity(4 + 8 * extents.len());
    payload.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
    for (n, f) in extents {
        payload.extend_from_slice(&n.to_be_bytes());
        payload.extend_from_slice(&f.to_be_bytes());
    }
    Reply::BlockStatus { req, payload }
}

#[cfg(test)]
mod tests;
