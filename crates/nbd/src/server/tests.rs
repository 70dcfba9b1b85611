//! Property tests of the server's decoders (options, requests) driven from arbitrary bytes, and
//! round trips of the server against the crate's own client.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;

use super::*;
use crate::client::{BASE_ALLOCATION, Client, ClientOptions};
use crate::testing::largest_allocation;

/// Blocks of this size that are all zero are holes.
const BLOCK: usize = 4096;

/// An in-memory disk (unit tests only).
#[derive(Debug)]
pub(crate) struct MemBackend {
    data: Bytes,
    /// Per block: all zero.
    zero: Vec<bool>,
}

impl MemBackend {
    pub(crate) fn new(data: Vec<u8>) -> Self {
        let zero = data
            .chunks(BLOCK)
            .map(|b| b.iter().all(|&x| x == 0))
            .collect();
        MemBackend {
            data: data.into(),
            zero,
        }
    }
}

#[async_trait::async_trait]
impl Backend for MemBackend {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
    async fn read(&self, offset: u64, len: u32) -> io::Result<Vec<Piece>> {
        let (mut at, end) = (offset as usize, offset as usize + len as usize);
        let mut out = Vec::new();
        while at < end {
            let next = ((at / BLOCK + 1) * BLOCK).min(end);
            let slice = self.data.slice(at..next);
            let piece = if self.zero[at / BLOCK] {
                Piece::Hole((next - at) as u32)
            } else {
                Piece::Data(slice)
            };
            match (out.last_mut(), piece) {
                (Some(Piece::Hole(n)), Piece::Hole(m)) => *n += m,
                (_, piece) => out.push(piece),
            }
            at = next;
        }
        Ok(out)
    }
    async fn block_status(&self, offset: u64, len: u32) -> io::Result<Vec<Extent>> {
        let (mut at, end) = (offset, offset + u64::from(len));
        let mut out = Vec::new();
        // A few extents per answer, as a real backend would: the client asks again.
        while at < end && out.len() < 64 {
            let next = ((at / BLOCK as u64 + 1) * BLOCK as u64).min(end);
            let zero = self.zero[at as usize / BLOCK];
            out.push(Extent {
                offset: at,
                length: next - at,
                flags: if zero { STATE_HOLE | STATE_ZERO } else { 0 },
            });
            at = next;
        }
        Ok(out)
    }
}

fn shared(size: usize, options: ServerOptions) -> Shared {
    let mut data = vec![0u8; size];
    for (i, b) in data.iter_mut().enumerate().take(size / 2) {
        *b = (i % 251) as u8 | 1;
    }
    Shared {
        backend: Arc::new(MemBackend::new(data)),
        buffered: Semaphore::new(options.max_buffered),
        options,
    }
}

/// Runs one connection over `input` on a current-thread runtime; returns the largest allocation.
fn drive(input: Vec<u8>) -> usize {
    static SHARED: std::sync::OnceLock<Shared> = std::sync::OnceLock::new();
    let shared = SHARED.get_or_init(|| {
        let mut options = ServerOptions::new("disk");
        options.max_request = 1 << 20;
        options.max_buffered = 1 << 20;
        shared(1 << 20, options)
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let (_, largest) = largest_allocation(|| {
        rt.block_on(async {
            let (_tx, rx) = watch::channel(false);
            let _ = serve_connection(&input[..], tokio::io::sink(), shared, rx).await;
        })
    });
    largest
}

/// A client's side of a handshake to GO with structured replies and base:allocation, as bytes.
fn client_prefix() -> Vec<u8> {
    let mut b = (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    b.extend_from_slice(&encode_option(OPT_STRUCTURED_REPLY, 0));
    let mut p = Vec::new();
    put_string32(&mut p, "disk");
    p.extend_from_slice(&1u32.to_be_bytes());
    put_string32(&mut p, BASE_ALLOCATION);
    b.extend_from_slice(&encode_option(OPT_SET_META_CONTEXT, p.len() as u32));
    b.extend_from_slice(&p);
    let mut p = Vec::new();
    put_string32(&mut p, "disk");
    p.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&encode_option(OPT_GO, p.len() as u32));
    b.extend_from_slice(&p);
    b
}

/// Cap on any single allocation while serving garbage: the 64 KiB write buffer or a read of
/// at most `max_request` (1 MiB here) is the largest legitimate one.
const ALLOCATION_CAP: usize = (1 << 20) + (64 << 10);

#[test]
fn a_huge_option_is_refused_before_allocating() {
    let mut input = CLIENT_FIXED_NEWSTYLE.to_be_bytes().to_vec();
    input.extend_from_slice(&encode_option(OPT_GO, u32::MAX));
    let largest = drive(input);
    assert!(largest <= 128 << 10, "allocated {largest}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn option_payload_parsers_never_panic(p in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_info_request(&p);
        let _ = parse_meta_request(&p);
    }

    #[test]
    fn meta_requests_round_trip(
        name in "[a-z]{0,20}",
        queries in prop::collection::vec("[a-z:]{0,30}", 0..8),
    ) {
        let mut p = Vec::new();
        put_string32(&mut p, &name);
        p.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in &queries {
            put_string32(&mut p, q);
        }
        prop_assert_eq!(parse_meta_request(&p), Some((name.clone(), queries)));
        let mut p = Vec::new();
        put_string32(&mut p, &name);
        p.extend_from_slice(&2u16.to_be_bytes());
        p.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        p.extend_from_slice(&INFO_NAME.to_be_bytes());
        prop_assert_eq!(parse_info_request(&p), Some((name, vec![INFO_BLOCK_SIZE, INFO_NAME])));
    }

    #[test]
    fn wire_extents_never_panic(
        extents in prop::collection::vec((0u64..1 << 34, 0u64..1 << 33, any::<u32>()), 0..20),
        offset in 0u64..1 << 34,
        len in 1u32..u32::MAX,
        limit in 1usize..10,
    ) {
        let extents: Vec<Extent> = extents
            .into_iter()
            .map(|(offset, length, flags)| Extent { offset, length, flags })
            .collect();
        if let Ok(out) = wire_extents(&extents, offset, len, limit) {
            let total: u64 = out.iter().map(|&(n, _)| u64::from(n)).sum();
            prop_assert!(total <= u64::from(len) && out.len() <= limit && !out.is_empty());
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_nor_allocate_much(
        bytes in prop::collection::vec(any::<u8>(), 0..4096),
        prefix: bool,
    ) {
        let mut input = if prefix { client_prefix() } else { Vec::new() };
        input.extend_from_slice(&bytes);
        let largest = drive(input);
        prop_assert!(largest <= ALLOCATION_CAP, "allocated {largest}");
    }

    #[test]
    fn arbitrary_requests_never_panic_nor_allocate_much(
        requests in prop::collection::vec((any::<u16>(), 0u16..12, 0u64..(2 << 20), any::<u32>()), 1..20),
    ) {
        let mut input = client_prefix();
        for (i, (flags, command, offset, length)) in requests.into_iter().enumerate() {
            let r = Request { flags, command, cookie: i as u64, offset, length };
            input.extend_from_slice(&r.encode());
        }
        let largest = drive(input);
        prop_assert!(largest <= ALLOCATION_CAP, "allocated {largest}");
    }
}

/// A layout of 4 KiB blocks: `None` a hole, `Some(seed)` data.
fn disk_from(blocks: &[Option<u8>]) -> Vec<u8> {
    let mut data = vec![0u8; blocks.len() * BLOCK];
    for (i, b) in blocks.iter().enumerate() {
        if let Some(seed) = b {
            for (j, x) in data[i * BLOCK..(i + 1) * BLOCK].iter_mut().enumerate() {
                *x = seed.wrapping_add(j as u8) | 1;
            }
        }
    }
    data
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Our server and our client agree: bytes and allocation of random sparse disks.
    #[test]
    fn server_and_client_round_trip(
        blocks in prop::collection::vec(prop::option::of(any::<u8>()), 1..64),
        reads in prop::collection::vec((any::<prop::sample::Index>(), 1usize..40000), 1..8),
    ) {
        let data = disk_from(&blocks);
        let dir = tempfile::tempdir().unwrap();
        let address = Address::Unix(dir.path().join("s.sock"));
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let backend = Arc::new(MemBackend::new(data.clone()));
        let server = rt.block_on(Server::bind(&address, backend, ServerOptions::new("disk"))).unwrap();
        let stop = server.shutdown_handle();
        let running = rt.spawn(server.run());
        let client = Client::connect(address, ClientOptions::new("disk").meta_context(BASE_ALLOCATION)).unwrap();
        for (at, len) in reads {
            let offset = at.index(data.len());
            let len = len.min(data.len() - offset);
            let mut buf = vec![0xeeu8; len];
            client.read(offset as u64, &mut buf).unwrap();
            prop_assert!(buf[..] == data[offset..offset + len]);
        }
        let map = client.map(BASE_ALLOCATION, 0, client.size()).unwrap();
        let mut at = 0usize;
        for e in &map {
            prop_assert_eq!(e.offset as usize, at);
            let hole = e.flags & STATE_HOLE != 0;
            let (first, last) = (at / BLOCK, (at + e.length as usize) / BLOCK);
            for (i, block) in blocks.iter().enumerate().take(last).skip(first) {
                prop_assert_eq!(hole, block.is_none(), "block {} in {:?}", i, e);
            }
            at += e.length as usize;
        }
        prop_assert_eq!(at, data.len());
        drop(client);
        stop.shutdown();
        rt.block_on(running).unwrap().unwrap();
    }
}
