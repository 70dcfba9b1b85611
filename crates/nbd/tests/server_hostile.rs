//! A hostile client against the server: garbage, oversized requests, reads past the end,
//! writes, a flood of connections, and clients that never read their replies. The server answers
//! with errors, ends only the offending connection, keeps serving, and its memory stays bounded.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use bulwark_nbd::{Address, Backend, Client, ClientOptions, Extent, Piece, ServerOptions};
use common::{BLOCK, MemBackend, TestServer, sparse_disk};

const REQUEST_MAGIC: u32 = 0x2560_9513;
const STRUCTURED_MAGIC: u32 = 0x668e_33ef;
const SIMPLE_MAGIC: u32 = 0x6744_6698;

/// A hand-driven connection that has done the handshake (structured replies, base:allocation).
struct Raw(UnixStream);

impl Raw {
    fn connect(path: &std::path::Path) -> Raw {
        let mut s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        s.write_all(&3u32.to_be_bytes()).unwrap();
        let mut raw = Raw(s);
        raw.option(8, &[]);
        let mut p = Vec::new();
        p.extend_from_slice(&4u32.to_be_bytes());
        p.extend_from_slice(b"disk");
        p.extend_from_slice(&1u32.to_be_bytes());
        p.extend_from_slice(&15u32.to_be_bytes());
        p.extend_from_slice(b"base:allocation");
        raw.option(10, &p);
        let mut p = Vec::new();
        p.extend_from_slice(&4u32.to_be_bytes());
        p.extend_from_slice(b"disk");
        p.extend_from_slice(&0u16.to_be_bytes());
        raw.option(7, &p);
        raw
    }

    /// Sends an option and reads replies up to the ACK.
    fn option(&mut self, option: u32, payload: &[u8]) {
        let mut m = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        m.extend_from_slice(payload);
        self.0.write_all(&m).unwrap();
        loop {
            let mut h = [0u8; 20];
            self.0.read_exact(&mut h).unwrap();
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
            let mut p = vec![0u8; len as usize];
            self.0.read_exact(&mut p).unwrap();
            assert!(kind < 1 << 31, "option {option} refused: {kind:#x}");
            if kind == 1 {
                return;
            }
        }
    }

    fn send(&mut self, command: u16, cookie: u64, offset: u64, length: u32) {
        let mut r = REQUEST_MAGIC.to_be_bytes().to_vec();
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&command.to_be_bytes());
        r.extend_from_slice(&cookie.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&length.to_be_bytes());
        self.0.write_all(&r).unwrap();
    }

    /// Reads a whole reply: (error number, data bytes received).
    fn reply(&mut self, cookie: u64) -> (u32, Vec<u8>) {
        let mut data = Vec::new();
        loop {
            let mut h = [0u8; 16];
            self.0.read_exact(&mut h).unwrap();
            let magic = u32::from_be_bytes(h[0..4].try_into().unwrap());
            assert_eq!(u64::from_be_bytes(h[8..16].try_into().unwrap()), cookie);
            if magic == SIMPLE_MAGIC {
                return (u32::from_be_bytes(h[4..8].try_into().unwrap()), data);
            }
            assert_eq!(magic, STRUCTURED_MAGIC);
            let flags = u16::from_be_bytes(h[4..6].try_into().unwrap());
            let kind = u16::from_be_bytes(h[6..8].try_into().unwrap());
            let mut l = [0u8; 4];
            self.0.read_exact(&mut l).unwrap();
            let mut p = vec![0u8; u32::from_be_bytes(l) as usize];
            self.0.read_exact(&mut p).unwrap();
            match kind {
                1 => data.extend_from_slice(&p[8..]),
                2 => data.resize(
                    data.len() + u32::from_be_bytes(p[8..12].try_into().unwrap()) as usize,
                    0,
                ),
                0x8001 => return (u32::from_be_bytes(p[0..4].try_into().unwrap()), data),
                _ => {}
            }
            if flags & 1 != 0 {
                return (0, data);
            }
        }
    }

    /// True when the server closed this connection.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Ok(0) | Err(_))
    }
}

#[test]
fn bad_requests_get_errors_and_the_connection_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    let data = sparse_disk();
    let size = data.len() as u64;
    let mut options = ServerOptions::new("disk");
    options.max_request = 1 << 20;
    let _server = TestServer::start(Address::Unix(socket.clone()), data.clone(), options);
    let mut c = Raw::connect(&socket);

    // (command, offset, length, expected errno): a read over max_request, past the end, straddling the
    // end, zero length, block status past the end, trim, unknown command, flush.
    let cases = [
        (0u16, 0u64, 2u32 << 20, 75u32),
        (0, size, 4096, 22),
        (0, size - 4096, 8192, 22),
        (0, u64::MAX - 100, 4096, 22),
        (0, 0, 0, 22),
        (7, size, 4096, 22),
        (4, 0, 4096, 1),
        (42, 0, 4096, 22),
        (3, 0, 0, 0),
    ];
    for (i, &(command, offset, length, errno)) in cases.iter().enumerate() {
        c.send(command, i as u64, offset, length);
        assert_eq!(
            c.reply(i as u64).0,
            errno,
            "case {i}: {command} {offset} {length}"
        );
    }
    // A write: its payload is skipped, then refused with EPERM.
    c.send(1, 100, 0, 4096);
    c.0.write_all(&[0xaa; 4096]).unwrap();
    assert_eq!(c.reply(100).0, 1);

    // The same connection still reads correctly.
    c.send(0, 101, 7 * BLOCK as u64 - 10, 100);
    let (errno, got) = c.reply(101);
    assert_eq!(errno, 0);
    assert!(got[..] == data[7 * BLOCK - 10..7 * BLOCK + 90]);

    // Garbage ends this connection only.
    c.0.write_all(&[0x55; 28]).unwrap();
    assert!(c.closed(), "server kept a connection that sent garbage");
    let client =
        Client::connect(Address::Unix(socket.clone()), ClientOptions::new("disk")).unwrap();
    let mut buf = vec![0u8; 4096];
    client.read(0, &mut buf).unwrap();
    assert!(buf[..] == data[..4096]);

    // Garbage during the handshake, and a huge option, end those connections only.
    for junk in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &[
            0u8, 0, 0, 3, 0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54, 0, 0, 0, 7, 0xff, 0xff,
            0xff, 0xff,
        ][..],
    ] {
        let mut s = UnixStream::connect(&socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        s.write_all(junk).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        assert!(
            rest.len() < 64,
            "answered garbage with {} bytes",
            rest.len()
        );
    }
    client.read(4096, &mut buf).unwrap();
}

#[test]
fn a_flood_of_connections_is_capped_and_timed_out() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    let mut options = ServerOptions::new("disk");
    options.max_connections = 8;
    options.handshake_timeout = Duration::from_millis(500);
    let _server = TestServer::start(Address::Unix(socket.clone()), sparse_disk(), options);

    // 200 connections that never speak: 8 are held until the handshake timeout, the rest are
    // closed at once.
    let mut flood: Vec<UnixStream> = (0..200)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    let start = Instant::now();
    let mut closed = 0;
    for s in &mut flood {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut all = Vec::new();
        let _ = s.read_to_end(&mut all);
        closed += 1;
    }
    assert_eq!(closed, 200);
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "flood took {:?}",
        start.elapsed()
    );
    drop(flood);

    // Afterwards a real client is served.
    let deadline = Instant::now() + Duration::from_secs(10);
    let client = loop {
        match Client::connect(Address::Unix(socket.clone()), ClientOptions::new("disk")) {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                eprintln!("retrying after {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("server stopped serving after the flood: {e}"),
        }
    };
    client.read(0, &mut [0u8; 65536]).unwrap();
}

/// Copies every read into fresh memory, as a real (vault) backend does.
#[derive(Debug)]
struct Copying(MemBackend);

#[bulwark_nbd::async_trait]
impl Backend for Copying {
    fn size(&self) -> u64 {
        self.0.size()
    }
    async fn read(&self, offset: u64, len: u32) -> std::io::Result<Vec<Piece>> {
        let mut out = vec![0u8; len as usize];
        let mut at = 0;
        for p in self.0.read(offset, len).await? {
            if let Piece::Data(d) = p {
                out[at..at + d.len()].copy_from_slice(&d);
                at += d.len();
            } else if let Piece::Hole(n) = p {
                at += n as usize;
            }
        }
        Ok(vec![Piece::Data(out.into())])
    }
    async fn block_status(&self, offset: u64, len: u32) -> std::io::Result<Vec<Extent>> {
        self.0.block_status(offset, len).await
    }
}

#[test]
fn clients_that_never_read_cannot_grow_memory() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    let mut options = ServerOptions::new("disk");
    options.max_connections = 32;
    options.max_request = 4 << 20;
    options.max_buffered = 16 << 20;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let backend = std::sync::Arc::new(Copying(MemBackend::new(vec![0x5a; 64 << 20])));
    let server = rt
        .block_on(bulwark_nbd::Server::bind(
            &Address::Unix(socket.clone()),
            backend,
            options,
        ))
        .unwrap();
    let stop = server.shutdown_handle();
    let running = rt.spawn(server.run());

    let before = common::rss();
    // 30 clients each ask for 20 reads of 4 MiB (2.4 GiB in all) and never read a reply.
    let mut greedy: Vec<Raw> = (0..30).map(|_| Raw::connect(&socket)).collect();
    for (i, c) in greedy.iter_mut().enumerate() {
        for k in 0..20u64 {
            c.send(0, k, ((i as u64 * 20 + k) % 15) * (4 << 20), 4 << 20);
        }
    }
    std::thread::sleep(Duration::from_secs(3));
    let grown = common::rss().saturating_sub(before);
    eprintln!("memory grew by {} MiB", grown >> 20);
    assert!(grown < 48 << 20, "memory grew by {} MiB", grown >> 20);

    // Meanwhile a polite client cannot get data until buffered reads drain, but once the greedy
    // ones go away it is served.
    drop(greedy);
    let client = Client::connect(Address::Unix(socket), ClientOptions::new("disk")).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    client.read(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
    drop(client);
    stop.shutdown();
    rt.block_on(running).unwrap().unwrap();
}

/// Takes 300 ms for every read, as a slow vault would.
#[derive(Debug)]
struct Slow(MemBackend);

#[bulwark_nbd::async_trait]
impl Backend for Slow {
    fn size(&self) -> u64 {
        self.0.size()
    }
    async fn read(&self, offset: u64, len: u32) -> std::io::Result<Vec<Piece>> {
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.0.read(offset, len).await
    }
}

#[test]
fn pipelined_reads_on_one_connection_are_served_concurrently() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    let data = sparse_disk();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let backend = std::sync::Arc::new(Slow(MemBackend::new(data.clone())));
    let server = rt
        .block_on(bulwark_nbd::Server::bind(
            &Address::Unix(socket.clone()),
            backend,
            ServerOptions::new("disk"),
        ))
        .unwrap();
    let stop = server.shutdown_handle();
    let running = rt.spawn(server.run());

    let mut c = Raw::connect(&socket);
    let start = Instant::now();
    for k in 0..10u64 {
        c.send(0, k, k * BLOCK as u64 * 7, 4096);
    }
    // Replies may come in any order; each is one DONE chunk here (data or hole).
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..10 {
        let mut h = [0u8; 20];
        c.0.read_exact(&mut h).unwrap();
        assert_eq!(
            u32::from_be_bytes(h[0..4].try_into().unwrap()),
            STRUCTURED_MAGIC
        );
        assert_eq!(
            u16::from_be_bytes(h[4..6].try_into().unwrap()),
            1,
            "one chunk per reply"
        );
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let mut p = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
        c.0.read_exact(&mut p).unwrap();
        let offset = (cookie * BLOCK as u64 * 7) as usize;
        assert_eq!(
            u64::from_be_bytes(p[0..8].try_into().unwrap()),
            offset as u64
        );
        assert!(p[8..] == data[offset..offset + 4096], "cookie {cookie}");
        seen.insert(cookie);
    }
    let took = start.elapsed();
    assert_eq!(seen.len(), 10);
    // One at a time would take 3 s.
    assert!(
        took < Duration::from_millis(1500),
        "10 pipelined reads took {took:?}"
    );
    drop(c);
    stop.shutdown();
    rt.block_on(running).unwrap().unwrap();
}
