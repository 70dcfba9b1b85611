//! Property tests of the client's decoders: the handshake, READ replies and BLOCK_STATUS replies
//! driven from arbitrary bytes never panic and never allocate beyond their caps; well-formed
//! replies decode to exactly what was encoded.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;

use super::*;
use crate::testing::{FakeStream, largest_allocation};

/// The largest single allocation any decoder may make: the 256 KiB read buffer, or the
/// per-reply bookkeeping (at most `MAX_CHUNKS` ranges of 16 bytes, a 1 MiB block status chunk).
const ALLOCATION_CAP: usize = MAX_CHUNKS * 16 + MAX_BLOCK_STATUS_PAYLOAD as usize;

fn conn(input: Vec<u8>, contexts: &[&str]) -> Conn<FakeStream> {
    Conn {
        io: BufReader::with_capacity(4096, FakeStream::new(input)),
        export: "disk".into(),
        cookie: 0,
        context_ids: (0..contexts.len()).map(|i| (i as u32 + 7, i)).collect(),
        context_names: contexts.iter().map(|c| c.to_string()).collect(),
        info: ExportInfo {
            size: 1 << 30,
            flags: TFLAG_HAS_FLAGS | TFLAG_READ_ONLY,
            min_block: 1,
            preferred_block: 4096,
            max_payload: MAX_READ_REQUEST,
            structured_replies: true,
        },
    }
}

fn chunk(out: &mut Vec<u8>, flags: u16, kind: u16, cookie: u64, payload: &[u8]) {
    let h = ChunkHeader {
        flags,
        kind,
        cookie,
        length: payload.len() as u32,
    };
    out.extend_from_slice(&h.encode());
    out.extend_from_slice(payload);
}

/// A READ reply for `layout` (data or hole pieces) starting at `offset`, chunks in `order`.
fn encode_read_reply(offset: u64, layout: &[(bool, Vec<u8>)], order: &[usize]) -> Vec<u8> {
    let mut starts = Vec::new();
    let mut at = offset;
    for (_, piece) in layout {
        starts.push(at);
        at += piece.len() as u64;
    }
    let mut out = Vec::new();
    for (n, &i) in order.iter().enumerate() {
        let (hole, piece) = &layout[i];
        let flags = if n + 1 == order.len() {
            REPLY_FLAG_DONE
        } else {
            0
        };
        let mut p = starts[i].to_be_bytes().to_vec();
        if *hole {
            p.extend_from_slice(&(piece.len() as u32).to_be_bytes());
            chunk(&mut out, flags, REPLY_TYPE_OFFSET_HOLE, 1, &p);
        } else {
            p.extend_from_slice(piece);
            chunk(&mut out, flags, REPLY_TYPE_OFFSET_DATA, 1, &p);
        }
    }
    out
}

fn layout_strategy() -> impl Strategy<Value = (Vec<(bool, Vec<u8>)>, Vec<usize>)> {
    prop::collection::vec(
        (any::<bool>(), 1usize..3000).prop_flat_map(|(hole, n)| {
            if hole {
                Just((true, vec![0u8; n])).boxed()
            } else {
                prop::collection::vec(any::<u8>(), n)
                    .prop_map(|d| (false, d))
                    .boxed()
            }
        }),
        1..12,
    )
    .prop_flat_map(|layout| {
        let order: Vec<usize> = (0..layout.len()).collect();
        (Just(layout), Just(order).prop_shuffle())
    })
}

/// A valid greeting: NBDMAGIC, IHAVEOPT, fixed newstyle + no zeroes.
fn greeting() -> Vec<u8> {
    let mut g = NBDMAGIC.to_be_bytes().to_vec();
    g.extend_from_slice(&IHAVEOPT.to_be_bytes());
    g.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    g
}

fn option_reply(out: &mut Vec<u8>, option: u32, kind: u32, payload: &[u8]) {
    out.extend_from_slice(&encode_option_reply(option, kind, payload.len() as u32));
    out.extend_from_slice(payload);
}

/// What a well-behaved server answers to structured replies, one meta context, and GO.
fn good_handshake(size: u64) -> Vec<u8> {
    let mut s = greeting();
    option_reply(&mut s, OPT_STRUCTURED_REPLY, REP_ACK, &[]);
    let mut ctx = 9u32.to_be_bytes().to_vec();
    ctx.extend_from_slice(BASE_ALLOCATION.as_bytes());
    option_reply(&mut s, OPT_SET_META_CONTEXT, REP_META_CONTEXT, &ctx);
    option_reply(&mut s, OPT_SET_META_CONTEXT, REP_ACK, &[]);
    let mut info = INFO_EXPORT.to_be_bytes().to_vec();
    info.extend_from_slice(&size.to_be_bytes());
    info.extend_from_slice(&(TFLAG_HAS_FLAGS | TFLAG_READ_ONLY).to_be_bytes());
    option_reply(&mut s, OPT_GO, REP_INFO, &info);
    let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [1u32, 4096, 1 << 20] {
        bs.extend_from_slice(&v.to_be_bytes());
    }
    option_reply(&mut s, OPT_GO, REP_INFO, &bs);
    option_reply(&mut s, OPT_GO, REP_ACK, &[]);
    s
}

#[test]
fn addresses_parse_and_display() {
    for s in ["unix:/run/x.sock", "tcp:127.0.0.1:10809", "tcp:[::1]:10809"] {
        let a: Address = s.parse().unwrap();
        assert_eq!(a.to_string(), s);
    }
    for bad in [
        "",
        "unix:",
        "tcp:host",
        "tcp::1",
        "tcp:h:99999",
        "/run/x.sock",
    ] {
        assert!(bad.parse::<Address>().is_err(), "{bad}");
    }
}

#[test]
fn good_handshake_negotiates() {
    let c = Conn::handshake(
        FakeStream::new(good_handshake(12345)),
        "disk",
        &[BASE_ALLOCATION.to_string()],
    )
    .unwrap();
    assert_eq!(c.info.size, 12345);
    assert_eq!(c.info.max_payload, 1 << 20);
    assert_eq!(c.context_ids, vec![(9, 0)]);
    assert!(c.info.structured_replies);
}

#[test]
fn hole_chunks_are_zeroed_and_gaps_refused() {
    let layout = vec![
        (false, vec![7u8; 10]),
        (true, vec![0u8; 20]),
        (false, vec![9u8; 5]),
    ];
    let bytes = encode_read_reply(100, &layout, &[2, 0, 1]);
    let mut c = conn(bytes, &[]);
    let mut buf = vec![0xeeu8; 35];
    let stats = c.read_reply(1, 100, &mut buf, "test").unwrap();
    assert_eq!(&buf[..10], &[7u8; 10]);
    assert_eq!(&buf[10..30], &[0u8; 20]);
    assert_eq!(&buf[30..], &[9u8; 5]);
    assert_eq!((stats.data_bytes, stats.hole_bytes), (15, 20));

    // The same reply without the hole chunk leaves a gap: refused, not garbage.
    let bytes = encode_read_reply(100, &layout[..1], &[0]);
    let mut c = conn(bytes, &[]);
    let err = c
        .read_reply(1, 100, &mut buf, "READ at offset 100 length 35")
        .unwrap_err();
    assert!(
        err.to_string().contains("no data or hole for offset 110"),
        "{err}"
    );
}

#[test]
fn error_chunk_names_offset_and_errno() {
    let mut bytes = Vec::new();
    let mut p = EIO.to_be_bytes().to_vec();
    p.extend_from_slice(&4u16.to_be_bytes());
    p.extend_from_slice(b"bad!");
    chunk(&mut bytes, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 1, &p);
    let mut c = conn(bytes, &[]);
    let err = c.read_reply(1, 4096, &mut [0u8; 512], "x").unwrap_err();
    assert!(
        matches!(
            err,
            Error::Command {
                errno: EIO,
                offset: 4096,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("EIO") && err.to_string().contains("bad!"),
        "{err}"
    );
}

#[test]
fn data_chunk_longer_than_the_request_is_refused_before_reading_it() {
    let mut bytes = Vec::new();
    // Claims 1 GiB of data for a 512-byte read.
    let h = ChunkHeader {
        flags: REPLY_FLAG_DONE,
        kind: REPLY_TYPE_OFFSET_DATA,
        cookie: 1,
        length: 1 << 30,
    };
    bytes.extend_from_slice(&h.encode());
    let mut c = conn(bytes, &[]);
    let (r, largest) = largest_allocation(|| c.read_reply(1, 0, &mut [0u8; 512], "x"));
    assert!(matches!(r, Err(Error::Protocol { .. })));
    assert!(largest < 4096, "allocated {largest}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn read_replies_round_trip((layout, order) in layout_strategy(), offset in 0u64..1 << 40) {
        let expected: Vec<u8> = layout.iter().flat_map(|(_, p)| p.clone()).collect();
        let mut c = conn(encode_read_reply(offset, &layout, &order), &[]);
        let mut buf = vec![0xeeu8; expected.len()];
        let stats = c.read_reply(1, offset, &mut buf, "test").unwrap();
        prop_assert_eq!(buf, expected);
        let holes: usize = layout.iter().filter(|(h, _)| *h).map(|(_, p)| p.len()).sum();
        prop_assert_eq!(stats.hole_bytes, holes as u64);
    }

    #[test]
    fn mutated_read_replies_never_panic(
        (layout, order) in layout_strategy(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let len: usize = layout.iter().map(|(_, p)| p.len()).sum();
        let mut bytes = encode_read_reply(0, &layout, &order);
        for (at, v) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= v;
        }
        bytes.truncate(cut.index(bytes.len() + 1));
        let mut c = conn(bytes, &[]);
        let mut buf = vec![0u8; len];
        let (_, largest) = largest_allocation(|| c.read_reply(1, 0, &mut buf, "test"));
        prop_assert!(largest <= ALLOCATION_CAP, "allocated {largest}");
    }

    #[test]
    fn arbitrary_read_replies_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..4096),
        structured_prefix: bool,
        len in 1usize..70000,
    ) {
        let mut input = Vec::new();
        if structured_prefix {
            input.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
            input.extend_from_slice(&[0, 0, 0, 1]);
            input.extend_from_slice(&1u64.to_be_bytes());
        }
        input.extend_from_slice(&bytes);
        let mut c = conn(input, &[]);
        let mut buf = vec![0u8; len];
        let (_, largest) = largest_allocation(|| c.read_reply(1, 0, &mut buf, "test"));
        prop_assert!(largest <= ALLOCATION_CAP, "allocated {largest}");
    }

    #[test]
    fn block_status_replies_round_trip(
        extents in prop::collection::vec((1u32..1 << 20, 0u32..4), 1..50),
        offset in 0u64..1 << 40,
    ) {
        let total: u64 = extents.iter().map(|&(l, _)| u64::from(l)).sum();
        let mut bytes = Vec::new();
        for (n, id) in [7u32, 8].into_iter().enumerate() {
            let mut p = id.to_be_bytes().to_vec();
            for &(l, f) in &extents {
                p.extend_from_slice(&l.to_be_bytes());
                p.extend_from_slice(&f.to_be_bytes());
            }
            chunk(&mut bytes, if n == 1 { REPLY_FLAG_DONE } else { 0 }, REPLY_TYPE_BLOCK_STATUS, 1, &p);
        }
        let mut c = conn(bytes, &["base:allocation", "qemu:dirty-bitmap:b"]);
        let status = c.block_status_reply(1, offset, total.min(u64::from(u32::MAX)) as u32, "t").unwrap();
        for name in ["base:allocation", "qemu:dirty-bitmap:b"] {
            let got = status.extents(name).unwrap();
            prop_assert_eq!(got.len(), extents.len());
            let mut at = offset;
            for (e, &(l, f)) in got.iter().zip(&extents) {
                prop_assert_eq!((e.offset, e.length, e.flags), (at, u64::from(l), f));
                at += u64::from(l);
            }
        }
    }

    #[test]
    fn arbitrary_block_status_replies_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..4096),
        kind_prefix in prop::option::of(any::<u16>()),
        length in 1u32..u32::MAX,
    ) {
        let mut input = Vec::new();
        if let Some(kind) = kind_prefix {
            input.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
            input.extend_from_slice(&0u16.to_be_bytes());
            input.extend_from_slice(&kind.to_be_bytes());
            input.extend_from_slice(&1u64.to_be_bytes());
        }
        input.extend_from_slice(&bytes);
        let mut c = conn(input, &["base:allocation"]);
        let (_, largest) = largest_allocation(|| c.block_status_reply(1, 0, length, "t"));
        prop_assert!(largest <= ALLOCATION_CAP, "allocated {largest}");
    }

    #[test]
    fn arbitrary_handshakes_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..2048),
        prefix in 0usize..4,
    ) {
        // Start from a greeting, or a greeting plus a valid reply or two, then garbage.
        let good = good_handshake(1 << 20);
        let cut = [0, 18, 38, 80][prefix].min(good.len());
        let mut input = good[..cut].to_vec();
        input.extend_from_slice(&bytes);
        let (_, largest) = largest_allocation(|| {
            Conn::handshake(FakeStream::new(input), "disk", &[BASE_ALLOCATION.to_string()])
        });
        prop_assert!(largest <= 256 << 10, "allocated {largest}");
    }

    #[test]
    fn mutated_handshakes_never_panic(
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut input = good_handshake(1 << 20);
        for (at, v) in flips {
            let i = at.index(input.len());
            input[i] ^= v;
        }
        let (_, largest) = largest_allocation(|| {
            Conn::handshake(FakeStream::new(input), "disk", &[BASE_ALLOCATION.to_string()])
        });
        prop_assert!(largest <= 256 << 10, "allocated {largest}");
    }
}
