//! The blocking NBD client: fixed newstyle handshake, structured replies, meta contexts, reads
//! and block status, over a small pool of connections that several threads share.

use std::io::{self, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::proto::*;

/// The `base:allocation` meta context: extents flagged [`STATE_HOLE`] and/or [`STATE_ZERO`].
pub const BASE_ALLOCATION: &str = "base:allocation";
/// `base:allocation` flag: the extent is not allocated (reads as zeroes).
pub const STATE_HOLE: u32 = 1;
/// `base:allocation` flag: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 2;
/// `qemu:dirty-bitmap:NAME` flag: the extent is dirty (changed since the bitmap started).
pub const STATE_DIRTY: u32 = 1;

/// The meta context name of QEMU's dirty bitmap exported as `name` (`qemu:dirty-bitmap:NAME`).
pub fn dirty_bitmap_context(name: &str) -> String {
    format!("qemu:dirty-bitmap:{name}")
}

/// Largest payload of one READ request the client sends (reads are split above it).
const MAX_READ_REQUEST: u32 = 32 << 20;
/// Largest option reply payload the client accepts during the handshake.
const MAX_OPTION_REPLY: u32 = 64 << 10;
/// Most option replies to one option the client accepts.
const MAX_OPTION_REPLIES: usize = 1024;
/// Most chunks in one structured reply.
const MAX_CHUNKS: usize = 1 << 17;
/// Largest BLOCK_STATUS chunk payload accepted (128 Ki extents, twice what QEMU sends).
const MAX_BLOCK_STATUS_PAYLOAD: u32 = 4 + 8 * (1 << 17);
/// Largest ERROR chunk payload accepted (errno, message length, message, offset).
const MAX_ERROR_PAYLOAD: u32 = 6 + MAX_STRING as u32 + 8;

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Address {
    /// A Unix domain socket.
    Unix(PathBuf),
    /// A TCP `host:port`.
    Tcp(String),
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
            Address::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

impl std::str::FromStr for Address {
    type Err = Error;

    /// Parses `unix:PATH` or `tcp:HOST:PORT` (the form [`Address`] displays as).
    fn from_str(s: &str) -> Result<Self> {
        if let Some(path) = s.strip_prefix("unix:").filter(|p| !p.is_empty()) {
            return Ok(Address::Unix(PathBuf::from(path)));
        }
        if let Some(hostport) = s.strip_prefix("tcp:") {
            let port_ok = hostport
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if port_ok {
                return Ok(Address::Tcp(hostport.to_string()));
            }
        }
        Err(Error::InvalidAddress(s.to_string()))
    }
}

/// How the client connects: which export, which meta contexts, how many connections.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientOptions {
    /// The export's name (NBD_OPT_GO).
    pub export: String,
    /// Meta contexts to select ([`BASE_ALLOCATION`], [`dirty_bitmap_context`]). Connecting
    /// fails with [`Error::NoMetaContext`] when the server lacks one.
    pub meta_contexts: Vec<String>,
    /// Most connections open at once (one request in flight on each). At least 1.
    pub connections: usize,
    /// Read/write timeout of each socket operation; `None` waits for ever.
    pub io_timeout: Option<Duration>,
}

impl ClientOptions {
    /// Options for `export`: no meta contexts, 4 connections, a 120 s I/O timeout.
    pub fn new(export: impl Into<String>) -> Self {
        ClientOptions {
            export: export.into(),
            meta_contexts: Vec::new(),
            connections: 4,
            io_timeout: Some(Duration::from_secs(120)),
        }
    }

    /// Adds a meta context to select.
    pub fn meta_context(mut self, context: impl Into<String>) -> Self {
        self.meta_contexts.push(context.into());
        self
    }

    /// Sets the most connections open at once.
    pub fn connections(mut self, connections: usize) -> Self {
        self.connections = connections;
        self
    }
}

/// What the server said about the export.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags as sent.
    pub flags: u16,
    /// Minimum block size (reads should be aligned to it); 1 when the server did not say.
    pub min_block: u32,
    /// Preferred block size; 4096 when the server did not say.
    pub preferred_block: u32,
    /// Largest payload of one request (the client splits reads to it).
    pub max_payload: u32,
    /// Whether structured replies were negotiated.
    pub structured_replies: bool,
}

impl ExportInfo {
    /// Whether the export is read-only.
    pub fn read_only(&self) -> bool {
        self.flags & TFLAG_READ_ONLY != 0
    }
}

/// How a read was answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReadStats {
    /// Bytes the server sent as data.
    pub data_bytes: u64,
    /// Bytes the server reported as holes (zeroes written into the buffer).
    pub hole_bytes: u64,
}

/// One extent of a block status reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Start, in bytes from the start of the export.
    pub offset: u64,
    /// Length in bytes (never 0).
    pub length: u64,
    /// The context's flags ([`STATE_HOLE`], [`STATE_ZERO`], [`STATE_DIRTY`]).
    pub flags: u32,
}

/// The answer to one NBD_CMD_BLOCK_STATUS: extents per selected meta context, each list
/// starting at the request's offset, contiguous, and clipped to the request's end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockStatus {
    contexts: Vec<(String, Vec<Extent>)>,
}

impl BlockStatus {
    /// The extents of `context`, `None` if it was not selected.
    pub fn extents(&self, context: &str) -> Option<&[Extent]> {
        self.contexts
            .iter()
            .find(|(name, _)| name == context)
            .map(|(_, e)| e.as_slice())
    }
}

/// A socket to the server.
#[derive(Debug)]
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
        }
    }
}

fn open_stream(address: &Address, timeout: Option<Duration>) -> Result<Stream> {
    let connect_err = |source| Error::Connect {
        address: address.to_string(),
        source,
    };
    let stream = match address {
        Address::Unix(path) => {
            let s = UnixStream::connect(path).map_err(connect_err)?;
            s.set_read_timeout(timeout).map_err(connect_err)?;
            s.set_write_timeout(timeout).map_err(connect_err)?;
            Stream::Unix(s)
        }
        Address::Tcp(hostport) => {
            let mut last = None;
            let mut found = None;
            for addr in hostport.to_socket_addrs().map_err(connect_err)? {
                let attempt = match timeout {
                    Some(t) => TcpStream::connect_timeout(&addr, t),
                    None => TcpStream::connect(addr),
                };
                match attempt {
                    Ok(s) => {
                        found = Some(s);
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            let s = found.ok_or_else(|| {
                connect_err(last.unwrap_or_else(|| {
                    io::Error::new(io::ErrorKind::NotFound, "no address to connect to")
                }))
            })?;
            s.set_nodelay(true).map_err(connect_err)?;
            s.set_read_timeout(timeout).map_err(connect_err)?;
            s.set_write_timeout(timeout).map_err(connect_err)?;
            Stream::Tcp(s)
        }
    };
    Ok(stream)
}

/// One negotiated connection. Generic over the stream so that the decoders can be driven
/// from plain bytes in tests.
#[derive(Debug)]
pub(crate) struct Conn<S: Read + Write> {
    io: BufReader<S>,
    export: String,
    cookie: u64,
    /// Server-assigned context id → index into the requested contexts.
    context_ids: Vec<(u32, usize)>,
    /// The requested contexts' names.
    context_names: Vec<String>,
    info: ExportInfo,
}

impl<S: Read + Write> Conn<S> {
    fn protocol(&self, during: impl Into<String>, detail: impl Into<String>) -> Error {
        Error::Protocol {
            export: self.export.clone(),
            during: during.into(),
            detail: detail.into(),
        }
    }

    fn read_exact(&mut self, buf: &mut [u8], during: &str) -> Result<()> {
        match self.io.read_exact(buf) {
            Ok(()) => Ok(()),
            Err(source) => Err(Error::Io {
                export: self.export.clone(),
                during: during.to_string(),
                source,
            }),
        }
    }

    fn write_all(&mut self, buf: &[u8], during: &str) -> Result<()> {
        match self.io.get_mut().write_all(buf) {
            Ok(()) => Ok(()),
            Err(source) => Err(Error::Io {
                export: self.export.clone(),
                during: during.to_string(),
                source,
            }),
        }
    }

    /// Runs the fixed newstyle handshake up to the transmission phase.
    pub(crate) fn handshake(stream: S, export: &str, contexts: &[String]) -> Result<Self> {
        let mut conn = Conn {
            io: BufReader::with_capacity(256 << 10, stream),
            export: export.to_string(),
            cookie: 0,
            context_ids: Vec::new(),
            context_names: contexts.to_vec(),
            info: ExportInfo {
                size: 0,
                flags: 0,
                min_block: 1,
                preferred_block: 4096,
                max_payload: MAX_READ_REQUEST,
                structured_replies: false,
            },
        };
        if export.len() > MAX_STRING {
            return Err(Error::InvalidRequest {
                export: export.chars().take(64).collect(),
                detail: format!("export name longer than {MAX_STRING} bytes"),
            });
        }
        if let Some(c) = contexts.iter().find(|c| c.len() > MAX_STRING) {
            return Err(Error::InvalidRequest {
                export: export.to_string(),
                detail: format!(
                    "meta context {:?}... longer than {MAX_STRING} bytes",
                    c.chars().take(64).collect::<String>()
                ),
            });
        }
        let during = "handshake greeting";
        let mut greeting = [0u8; 18];
        conn.read_exact(&mut greeting[..16], during)?;
        let magic = get64(&greeting, 0).unwrap_or(0);
        let second = get64(&greeting, 8).unwrap_or(0);
        if magic != NBDMAGIC {
            return Err(conn.protocol(during, format!("not an NBD server (magic {magic:#x})")));
        }
        if second == OLDSTYLE_MAGIC {
            return Err(conn.protocol(during, "oldstyle server, only newstyle is supported"));
        }
        if second != IHAVEOPT {
            return Err(conn.protocol(during, format!("unknown newstyle magic {second:#x}")));
        }
        conn.read_exact(&mut greeting[16..18], during)?;
        let flags = get16(&greeting, 16).unwrap_or(0);
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(conn.protocol(during, "server does not speak fixed newstyle"));
        }
        let mut client_flags = CLIENT_FIXED_NEWSTYLE;
        if flags & FLAG_NO_ZEROES != 0 {
            client_flags |= CLIENT_NO_ZEROES;
        }
        conn.write_all(&client_flags.to_be_bytes(), during)?;

        // Structured replies.
        conn.send_option(OPT_STRUCTURED_REPLY, &[])?;
        let (kind, payload) = conn.option_reply(OPT_STRUCTURED_REPLY, 0)?;
        match kind {
            REP_ACK if payload.is_empty() => conn.info.structured_replies = true,
            REP_ACK => {
                return Err(conn.protocol("NBD_OPT_STRUCTURED_REPLY", "ACK with a payload"));
            }
            k if k & REP_FLAG_ERROR != 0 => conn.info.structured_replies = false,
            k => {
                return Err(conn.protocol(
                    "NBD_OPT_STRUCTURED_REPLY",
                    format!("unexpected reply type {k:#x}"),
                ));
            }
        }

        match conn.negotiate(contexts) {
            Ok(()) => Ok(conn),
            Err(e) => {
                if matches!(e, Error::Refused { .. } | Error::NoMetaContext { .. }) {
                    // Say goodbye politely; the server's ACK is not awaited.
                    let _ = conn.send_option(OPT_ABORT, &[]);
                }
                Err(e)
            }
        }
    }

    fn negotiate(&mut self, contexts: &[String]) -> Result<()> {
        let conn = self;
        if !contexts.is_empty() {
            if !conn.info.structured_replies {
                return Err(Error::Refused {
                    export: conn.export.clone(),
                    option: "NBD_OPT_STRUCTURED_REPLY",
                    detail: "structured replies are needed for meta contexts".into(),
                });
            }
            conn.set_meta_contexts()?;
        }
        conn.go()
    }

    fn send_option(&mut self, option: u32, payload: &[u8]) -> Result<()> {
        let during = option_name(option);
        let mut msg = encode_option(option, payload.len() as u32).to_vec();
        msg.extend_from_slice(payload);
        self.write_all(&msg, during)
    }

    /// Reads one option reply to `option`; `count` is how many replies to it came before.
    fn option_reply(&mut self, option: u32, count: usize) -> Result<(u32, Vec<u8>)> {
        let during = option_name(option);
        if count >= MAX_OPTION_REPLIES {
            return Err(self.protocol(during, format!("more than {MAX_OPTION_REPLIES} replies")));
        }
        let mut h = [0u8; 20];
        self.read_exact(&mut h, during)?;
        let (opt, kind, len) = decode_option_reply(&h)
            .map_err(|m| self.protocol(during, format!("bad option reply magic {m:#x}")))?;
        if opt != option {
            return Err(self.protocol(during, format!("reply is for option {opt}")));
        }
        if len > MAX_OPTION_REPLY {
            return Err(self.protocol(
                during,
                format!("option reply of {len} bytes (limit {MAX_OPTION_REPLY})"),
            ));
        }
        let mut payload = vec![0u8; len as usize];
        self.read_exact(&mut payload, during)?;
        Ok((kind, payload))
    }

    fn refused(&self, option: u32, kind: u32, payload: &[u8]) -> Error {
        let reason = match kind {
            REP_ERR_UNSUP => "unsupported",
            REP_ERR_INVALID => "invalid",
            REP_ERR_UNKNOWN => "unknown export",
            REP_ERR_TOO_BIG => "too big",
            k if k & REP_FLAG_ERROR != 0 => "error",
            _ => "unexpected reply",
        };
        let message = String::from_utf8_lossy(&payload[..payload.len().min(MAX_STRING)]);
        Error::Refused {
            export: self.export.clone(),
            option: option_name(option),
            detail: format!("{reason} ({kind:#x}) {message}")
                .trim_end()
                .to_string(),
        }
    }

    fn set_meta_contexts(&mut self) -> Result<()> {
        let mut payload = Vec::new();
        put_string32(&mut payload, &self.export);
        payload.extend_from_slice(&(self.context_names.len() as u32).to_be_bytes());
        for c in &self.context_names {
            put_string32(&mut payload, c);
        }
        self.send_option(OPT_SET_META_CONTEXT, &payload)?;
        let during = "NBD_OPT_SET_META_CONTEXT";
        for count in 0.. {
            let (kind, payload) = self.option_reply(OPT_SET_META_CONTEXT, count)?;
            match kind {
                REP_META_CONTEXT => {
                    let id = get32(&payload, 0)
                        .ok_or_else(|| self.protocol(during, "meta context reply too short"))?;
                    let name = std::str::from_utf8(&payload[4..])
                        .map_err(|_| self.protocol(during, "meta context name is not UTF-8"))?;
                    if let Some(index) = self.context_names.iter().position(|c| c == name) {
                        if self.context_ids.iter().any(|&(i, _)| i == id) {
                            return Err(self.protocol(during, format!("context id {id} reused")));
                        }
                        self.context_ids.push((id, index));
                    }
                }
                REP_ACK => break,
                k => return Err(self.refused(OPT_SET_META_CONTEXT, k, &payload)),
            }
        }
        for (index, name) in self.context_names.iter().enumerate() {
            if !self.context_ids.iter().any(|&(_, i)| i == index) {
                return Err(Error::NoMetaContext {
                    export: self.export.clone(),
                    context: name.clone(),
                });
            }
        }
        Ok(())
    }

    fn go(&mut self) -> Result<()> {
        let mut payload = Vec::new();
        put_string32(&mut payload, &self.export);
        payload.extend_from_slice(&1u16.to_be_bytes());
        payload.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        self.send_option(OPT_GO, &payload)?;
        let during = "NBD_OPT_GO";
        let mut have_export = false;
        for count in 0.. {
            let (kind, payload) = self.option_reply(OPT_GO, count)?;
            match kind {
                REP_INFO => match get16(&payload, 0) {
                    Some(INFO_EXPORT) => {
                        if payload.len() != 12 {
                            return Err(self.protocol(during, "NBD_INFO_EXPORT of wrong length"));
                        }
                        self.info.size = get64(&payload, 2).unwrap_or(0);
                        self.info.flags = get16(&payload, 10).unwrap_or(0);
                        have_export = true;
                    }
                    Some(INFO_BLOCK_SIZE) => {
                        let (Some(min), Some(preferred), Some(max), 14) = (
                            get32(&payload, 2),
                            get32(&payload, 6),
                            get32(&payload, 10),
                            payload.len(),
                        ) else {
                            return Err(
                                self.protocol(during, "NBD_INFO_BLOCK_SIZE of wrong length")
                            );
                        };
                        if !min.is_power_of_two() || min > 64 << 10 || max < min {
                            return Err(self.protocol(
                                during,
                                format!("block sizes min {min} preferred {preferred} max {max}"),
                            ));
                        }
                        self.info.min_block = min;
                        self.info.preferred_block = preferred;
                        // Split reads at the server's limit, rounded down to its minimum block.
                        self.info.max_payload = max.min(MAX_READ_REQUEST) / min * min;
                    }
                    Some(_) => {}
                    None => return Err(self.protocol(during, "empty NBD_REP_INFO")),
                },
                REP_ACK => break,
                k => return Err(self.refused(OPT_GO, k, &payload)),
            }
        }
        if !have_export {
            return Err(self.protocol(during, "ACK without NBD_INFO_EXPORT"));
        }
        if self.info.flags & TFLAG_HAS_FLAGS == 0 {
            return Err(self.protocol(during, "transmission flags lack NBD_FLAG_HAS_FLAGS"));
        }
        Ok(())
    }

    fn next_cookie(&mut self) -> u64 {
        self.cookie = self.cookie.wrapping_add(1);
        self.cookie
    }

    /// Reads `buf.len()` bytes (at most the max payload) at `offset` with one READ request.
    pub(crate) fn read_one(&mut self, offset: u64, buf: &mut [u8]) -> Result<ReadStats> {
        let len = buf.len();
        let during = format!("READ at offset {offset} length {len}");
        let cookie = self.next_cookie();
        let req = Request {
            flags: 0,
            command: CMD_READ,
            cookie,
            offset,
            length: len as u32,
        };
        self.write_all(&req.encode(), &during)?;
        self.read_reply(cookie, offset, buf, &during)
    }

    /// Decodes the reply to a READ of `buf.len()` bytes at `offset` into `buf`.
    pub(crate) fn read_reply(
        &mut self,
        cookie: u64,
        offset: u64,
        buf: &mut [u8],
        during: &str,
    ) -> Result<ReadStats> {
        let len = buf.len() as u64;
        let mut stats = ReadStats::default();
        let mut covered: Vec<(u64, u64)> = Vec::new();
        let mut error: Option<Error> = None;
        let max_chunks = MAX_CHUNKS.min(buf.len().saturating_add(16));
        let mut chunks = 0usize;
        loop {
            let (flags, kind) = match self.reply_start(cookie, during)? {
                ReplyStart::Simple { error: 0, .. } => {
                    if chunks > 0 {
                        return Err(self.protocol(during, "simple reply after structured chunks"));
                    }
                    self.read_exact(buf, during)?;
                    stats.data_bytes = len;
                    return Ok(stats);
                }
                ReplyStart::Simple { error: errno, .. } => {
                    return Err(self.command_error(CMD_READ, offset, len, errno, String::new()));
                }
                ReplyStart::Chunk { flags, kind, .. } => (flags, kind),
            };
            chunks += 1;
            if chunks > max_chunks {
                return Err(self.protocol(during, format!("more than {max_chunks} reply chunks")));
            }
            let mut lb = [0u8; 4];
            self.read_exact(&mut lb, during)?;
            let length = u32::from_be_bytes(lb);
            match kind {
                REPLY_TYPE_NONE => {
                    if length != 0 || flags & REPLY_FLAG_DONE == 0 {
                        return Err(self.protocol(during, "NONE chunk with a payload or not last"));
                    }
                }
                REPLY_TYPE_OFFSET_DATA => {
                    if length <= 8 || u64::from(length) - 8 > len {
                        return Err(self.protocol(
                            during,
                            format!("OFFSET_DATA chunk of {length} bytes for a read of {len}"),
                        ));
                    }
                    let mut ob = [0u8; 8];
                    self.read_exact(&mut ob, during)?;
                    let at = u64::from_be_bytes(ob);
                    let dlen = u64::from(length) - 8;
                    let start = self.chunk_range(at, dlen, offset, len, "OFFSET_DATA", during)?;
                    let (s, e) = (start as usize, (start + dlen) as usize);
                    self.read_exact(&mut buf[s..e], during)?;
                    covered.push((start, start + dlen));
                    stats.data_bytes += dlen;
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    if length != 12 {
                        return Err(self.protocol(
                            during,
                            format!("OFFSET_HOLE chunk of {length} bytes, not 12"),
                        ));
                    }
                    let mut hb = [0u8; 12];
                    self.read_exact(&mut hb, during)?;
                    let at = get64(&hb, 0).unwrap_or(0);
                    let hlen = u64::from(get32(&hb, 8).unwrap_or(0));
                    if hlen == 0 {
                        return Err(self.protocol(during, "OFFSET_HOLE of length 0"));
                    }
                    let start = self.chunk_range(at, hlen, offset, len, "OFFSET_HOLE", during)?;
                    buf[start as usize..(start + hlen) as usize].fill(0);
                    covered.push((start, start + hlen));
                    stats.hole_bytes += hlen;
                }
                k if k & (1 << 15) != 0 => {
                    let e = self.error_chunk(k, length, CMD_READ, offset, len, during)?;
                    error.get_or_insert(e);
                }
                k => {
                    return Err(self.protocol(during, format!("unexpected chunk type {k} to READ")));
                }
            }
            if flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        if let Some(e) = error {
            return Err(e);
        }
        covered.sort_unstable();
        let mut end = 0;
        for &(s, e) in &covered {
            if s != end {
                return Err(self.protocol(
                    during,
                    if s < end {
                        format!("chunks overlap at offset {}", offset + s)
                    } else {
                        format!("no data or hole for offset {}", offset + end)
                    },
                ));
            }
            end = e;
        }
        if end != len {
            return Err(self.protocol(
                during,
                format!("no data or hole for offset {}", offset + end),
            ));
        }
        Ok(stats)
    }

    /// Reads a reply's first 16 bytes and checks the cookie.
    fn reply_start(&mut self, cookie: u64, during: &str) -> Result<ReplyStart> {
        let mut h = [0u8; 16];
        self.read_exact(&mut h, during)?;
        let start = decode_reply_start(&h)
            .map_err(|m| self.protocol(during, format!("bad reply magic {m:#x}")))?;
        let got = match start {
            ReplyStart::Simple { cookie, .. } | ReplyStart::Chunk { cookie, .. } => cookie,
        };
        if got != cookie {
            return Err(self.protocol(during, format!("reply cookie {got}, expected {cookie}")));
        }
        if matches!(start, ReplyStart::Chunk { .. }) && !self.info.structured_replies {
            return Err(self.protocol(during, "structured reply chunk was not negotiated"));
        }
        Ok(start)
    }

    /// Checks that a chunk's `[at, at+n)` lies within the request `[offset, offset+len)`;
    /// returns its start relative to `offset`.
    fn chunk_range(
        &self,
        at: u64,
        n: u64,
        offset: u64,
        len: u64,
        what: &str,
        during: &str,
    ) -> Result<u64> {
        match at.checked_sub(offset) {
            Some(rel) if rel <= len && n <= len - rel => Ok(rel),
            _ => Err(self.protocol(
                during,
                format!("{what} chunk at offset {at} length {n} outside the request"),
            )),
        }
    }

    fn command_error(
        &self,
        command: u16,
        offset: u64,
        length: u64,
        errno: u32,
        message: String,
    ) -> Error {
        Error::Command {
            export: self.export.clone(),
            command: command_name(command),
            offset,
            length,
            errno,
            errno_name: errno_name(errno),
            message,
        }
    }

    /// Reads an error chunk's payload (type `kind`, `length` bytes) into a command error.
    fn error_chunk(
        &mut self,
        kind: u16,
        length: u32,
        command: u16,
        offset: u64,
        len: u64,
        during: &str,
    ) -> Result<Error> {
        if !(6..=MAX_ERROR_PAYLOAD).contains(&length) {
            return Err(self.protocol(during, format!("error chunk of {length} bytes")));
        }
        let mut p = vec![0u8; length as usize];
        self.read_exact(&mut p, during)?;
        let errno = get32(&p, 0).unwrap_or(0);
        let mlen = usize::from(get16(&p, 4).unwrap_or(0));
        if 6 + mlen > p.len() {
            return Err(self.protocol(during, "error message longer than its chunk"));
        }
        if kind == REPLY_TYPE_ERROR_OFFSET && p.len() != 6 + mlen + 8 {
            return Err(self.protocol(during, "ERROR_OFFSET chunk of wrong length"));
        }
        if errno == 0 {
            return Err(self.protocol(during, "error chunk with error 0"));
        }
        let mut message = String::from_utf8_lossy(&p[6..6 + mlen]).into_owned();
        if kind == REPLY_TYPE_ERROR_OFFSET {
            let at = get64(&p, 6 + mlen).unwrap_or(0);
            message = format!("{message} (at offset {at})");
        }
        let message = if message.is_empty() {
            message
        } else {
            format!(": {message}")
        };
        Ok(self.command_error(command, offset, len, errno, message))
    }

    /// One BLOCK_STATUS request for `[offset, offset+length)`.
    pub(crate) fn block_status(&mut self, offset: u64, length: u32) -> Result<BlockStatus> {
        let during = format!("BLOCK_STATUS at offset {offset} length {length}");
        let cookie = self.next_cookie();
        let req = Request {
            flags: 0,
            command: CMD_BLOCK_STATUS,
            cookie,
            offset,
            length,
        };
        self.write_all(&req.encode(), &during)?;
        self.block_status_reply(cookie, offset, length, &during)
    }

    /// Decodes the reply to a BLOCK_STATUS request.
    pub(crate) fn block_status_reply(
        &mut self,
        cookie: u64,
        offset: u64,
        length: u32,
        during: &str,
    ) -> Result<BlockStatus> {
        let end = offset.saturating_add(u64::from(length));
        let mut per_context: Vec<Option<Vec<Extent>>> = vec![None; self.context_names.len()];
        let mut error = None;
        let mut chunks = 0usize;
        loop {
            let (flags, kind) = match self.reply_start(cookie, during)? {
                ReplyStart::Simple { error: errno, .. } if errno != 0 => {
                    return Err(self.command_error(
                        CMD_BLOCK_STATUS,
                        offset,
                        length.into(),
                        errno,
                        String::new(),
                    ));
                }
                ReplyStart::Simple { .. } => {
                    return Err(self.protocol(during, "simple reply to BLOCK_STATUS"));
                }
                ReplyStart::Chunk { flags, kind, .. } => (flags, kind),
            };
            chunks += 1;
            if chunks > self.context_names.len() + 16 {
                return Err(self.protocol(during, "too many reply chunks"));
            }
            let mut lb = [0u8; 4];
            self.read_exact(&mut lb, during)?;
            let plen = u32::from_be_bytes(lb);
            match kind {
                REPLY_TYPE_NONE => {
                    if plen != 0 || flags & REPLY_FLAG_DONE == 0 {
                        return Err(self.protocol(during, "NONE chunk with a payload or not last"));
                    }
                }
                REPLY_TYPE_BLOCK_STATUS => {
                    if plen < 12 || (plen - 4) % 8 != 0 || plen > MAX_BLOCK_STATUS_PAYLOAD {
                        return Err(
                            self.protocol(during, format!("BLOCK_STATUS chunk of {plen} bytes"))
                        );
                    }
                    let mut p = vec![0u8; plen as usize];
                    self.read_exact(&mut p, during)?;
                    let id = get32(&p, 0).unwrap_or(0);
                    let Some(&(_, index)) = self.context_ids.iter().find(|&&(i, _)| i == id) else {
                        return Err(self.protocol(during, format!("unknown context id {id}")));
                    };
                    if per_context[index].is_some() {
                        return Err(
                            self.protocol(during, format!("two chunks for context id {id}"))
                        );
                    }
                    let mut extents = Vec::with_capacity((p.len() - 4) / 8);
                    let mut at = offset;
                    for pair in p[4..].chunks_exact(8) {
                        let elen = u64::from(get32(pair, 0).unwrap_or(0));
                        let eflags = get32(pair, 4).unwrap_or(0);
                        if elen == 0 {
                            return Err(self.protocol(during, "extent of length 0"));
                        }
                        if at >= end {
                            return Err(self.protocol(during, "extents past the request's end"));
                        }
                        let clipped = elen.min(end - at);
                        extents.push(Extent {
                            offset: at,
                            length: clipped,
                            flags: eflags,
                        });
                        at += clipped;
                    }
                    per_context[index] = Some(extents);
                }
                k if k & (1 << 15) != 0 => {
                    let e =
                        self.error_chunk(k, plen, CMD_BLOCK_STATUS, offset, length.into(), during)?;
                    error.get_or_insert(e);
                }
                k => {
                    return Err(
                        self.protocol(during, format!("unexpected chunk type {k} to BLOCK_STATUS"))
                    );
                }
            }
            if flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        if let Some(e) = error {
            return Err(e);
        }
        let mut contexts = Vec::with_capacity(per_context.len());
        for (name, extents) in self.context_names.iter().zip(per_context) {
            let Some(extents) = extents else {
                return Err(self.protocol(during, format!("no extents for context {name}")));
            };
            contexts.push((name.clone(), extents));
        }
        Ok(BlockStatus { contexts })
    }

    /// Sends NBD_CMD_DISC (best effort: the server does not answer).
    fn disconnect(&mut self) {
        let req = Request {
            flags: 0,
            command: CMD_DISC,
            cookie: self.next_cookie(),
            offset: 0,
            length: 0,
        };
        let _ = self.io.get_mut().write_all(&req.encode());
    }
}

/// Whether an error leaves the connection usable (the reply was read in full).
fn keeps_connection(e: &Error) -> bool {
    matches!(e, Error::Command { .. } | Error::InvalidRequest { .. })
}

#[derive(Debug)]
struct PoolState {
    idle: Vec<Conn<Stream>>,
    open: usize,
}

/// A blocking NBD client for one export, safe to share between threads (`Arc<Client>`).
///
/// Each request takes an idle connection from a small pool (opening a new one, up to
/// [`ClientOptions::connections`], when all are busy), so several threads read in parallel.
/// A connection that saw an I/O error or a protocol violation is dropped; the next request
/// opens a fresh one.
#[derive(Debug)]
pub struct Client {
    address: Address,
    options: ClientOptions,
    info: ExportInfo,
    pool: Mutex<PoolState>,
    freed: Condvar,
}

impl Client {
    /// Connects to `address`, negotiates `options.export` and the meta contexts, and keeps the
    /// connection for the pool.
    pub fn connect(address: Address, options: ClientOptions) -> Result<Client> {
        let span = tracing::debug_span!("nbd_connect", %address, export = %options.export);
        let _enter = span.enter();
        let conn = Self::dial(&address, &options)?;
        let info = conn.info.clone();
        tracing::debug!(
            size = info.size,
            flags = info.flags,
            "nbd export negotiated"
        );
        Ok(Client {
            address,
            info,
            options,
            pool: Mutex::new(PoolState {
                idle: vec![conn],
                open: 1,
            }),
            freed: Condvar::new(),
        })
    }

    fn dial(address: &Address, options: &ClientOptions) -> Result<Conn<Stream>> {
        let stream = open_stream(address, options.io_timeout)?;
        Conn::handshake(stream, &options.export, &options.meta_contexts)
    }

    /// What the server said about the export.
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.info.size
    }

    /// The export's name.
    pub fn export(&self) -> &str {
        &self.options.export
    }

    /// A description for messages: `nbd+unix:///EXPORT?socket=PATH` or `nbd://HOST:PORT/EXPORT`.
    pub fn describe(&self) -> String {
        match &self.address {
            Address::Unix(p) => format!("nbd+unix:///{}?socket={}", self.export(), p.display()),
            Address::Tcp(a) => format!("nbd://{a}/{}", self.export()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn checkout(&self) -> Result<Conn<Stream>> {
        let mut state = self.lock();
        loop {
            if let Some(conn) = state.idle.pop() {
                return Ok(conn);
            }
            if state.open < self.options.connections.max(1) {
                state.open += 1;
                drop(state);
                let dialed = Self::dial(&self.address, &self.options).and_then(|c| {
                    if c.info.size != self.info.size {
                        Err(Error::Protocol {
                            export: self.export().to_string(),
                            during: "handshake of another connection".into(),
                            detail: format!(
                                "export size {} differs from the first connection's {}",
                                c.info.size, self.info.size
                            ),
                        })
                    } else {
                        Ok(c)
                    }
                });
                if dialed.is_err() {
                    self.lock().open -= 1;
                    self.freed.notify_one();
                }
                return dialed;
            }
            state = self.freed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn with_conn<T>(&self, f: impl FnOnce(&mut Conn<Stream>) -> Result<T>) -> Result<T> {
        let mut conn = self.checkout()?;
        let result = f(&mut conn);
        let mut state = self.lock();
        match &result {
            Err(e) if !keeps_connection(e) => {
                tracing::warn!(export = %self.export(), error = %e, "nbd connection dropped");
                state.open -= 1;
            }
            _ => state.idle.push(conn),
        }
        drop(state);
        self.freed.notify_one();
        result
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let min = u64::from(self.info.min_block);
        let detail = if offset
            .checked_add(len)
            .is_none_or(|end| end > self.info.size)
        {
            format!(
                "offset {offset} length {len} past the end of the export ({} bytes)",
                self.info.size
            )
        } else if offset % min != 0 || len % min != 0 {
            format!("offset {offset} length {len} not aligned to the server's minimum block {min}")
        } else {
            return Ok(());
        };
        Err(Error::InvalidRequest {
            export: self.export().to_string(),
            detail,
        })
    }

    /// Reads `buf.len()` bytes at `offset` into `buf` (holes become zeroes). Large reads are
    /// split at the server's maximum payload.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<ReadStats> {
        self.check_range(offset, buf.len() as u64)?;
        let max = self.info.max_payload.max(self.info.min_block) as usize;
        let mut stats = ReadStats::default();
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(max);
            let part = &mut buf[done..done + n];
            let at = offset + done as u64;
            let s = self.with_conn(|c| c.read_one(at, part))?;
            stats.data_bytes += s.data_bytes;
            stats.hole_bytes += s.hole_bytes;
            done += n;
        }
        Ok(stats)
    }

    /// One NBD_CMD_BLOCK_STATUS for `[offset, offset+length)` (`length` is capped at 4 GiB - 1
    /// and at the export's end). The server may describe less than asked: the extents end where
    /// its answer ends; ask again from there.
    pub fn block_status(&self, offset: u64, length: u64) -> Result<BlockStatus> {
        if self.options.meta_contexts.is_empty() {
            return Err(Error::InvalidRequest {
                export: self.export().to_string(),
                detail: "block status without any meta context selected".into(),
            });
        }
        let length = length
            .min(
                u64::from(u32::MAX) / u64::from(self.info.min_block)
                    * u64::from(self.info.min_block),
            )
            .min(self.info.size.saturating_sub(offset));
        if length == 0 {
            return Err(Error::InvalidRequest {
                export: self.export().to_string(),
                detail: format!("block status of nothing at offset {offset}"),
            });
        }
        self.check_range(offset, length)?;
        self.with_conn(|c| c.block_status(offset, length as u32))
    }

    /// All extents of `context` in `[offset, offset+length)`, asking as often as needed. Adjacent
    /// extents with equal flags are merged.
    pub fn map(&self, context: &str, offset: u64, length: u64) -> Result<Vec<Extent>> {
        let end = offset.saturating_add(length).min(self.info.size);
        let mut out: Vec<Extent> = Vec::new();
        let mut at = offset;
        while at < end {
            let status = self.block_status(at, end - at)?;
            let extents = status
                .extents(context)
                .ok_or_else(|| Error::InvalidRequest {
                    export: self.export().to_string(),
                    detail: format!("meta context {context:?} was not selected"),
                })?;
            for e in extents {
                match out.last_mut() {
                    Some(last)
                        if last.flags == e.flags && last.offset + last.length == e.offset =>
                    {
                        last.length += e.length
                    }
                    _ => out.push(*e),
                }
                at = e.offset + e.length;
            }
        }
        Ok(out)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let mut state = self.lock();
        for mut conn in state.idle.drain(..) {
            conn.disconnect();
        }
    }
}

#[cfg(test)]
mod tests;
