//! The client against a real `qemu-nbd` (qemu-utils): bytes, holes, and dirty-bitmap extents
//! checked against what the test wrote. Skips with a message when qemu-nbd is missing, unless
//! BULWARK_REQUIRE_SERVERS=1 or BULWARK_REQUIRE_ROOT_TESTS=1 (CI), which make it fail instead.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use bulwark_nbd::{
    Address, BASE_ALLOCATION, Client, ClientOptions, Error, STATE_DIRTY, STATE_HOLE,
    dirty_bitmap_context,
};
use common::{QemuNbd, pattern, run, tools_or_skip};

const MIB: u64 = 1 << 20;

/// A sparse raw image: 16 MiB with data at a few places, and the bytes expected.
fn sparse_raw(dir: &std::path::Path) -> (std::path::PathBuf, Vec<u8>) {
    use std::io::{Seek, SeekFrom, Write};
    let path = dir.join("disk.raw");
    let mut f = std::fs::File::create(&path).unwrap();
    f.set_len(16 * MIB).unwrap();
    let mut expected = vec![0u8; 16 * MIB as usize];
    for (i, (offset, len)) in [
        (0u64, 64usize << 10),
        (3 * MIB, MIB as usize),
        (9 * MIB + 4096, 12288),
        (16 * MIB - 4096, 4096),
    ]
    .into_iter()
    .enumerate()
    {
        let data = pattern(len, i as u64 + 1);
        f.seek(SeekFrom::Start(offset)).unwrap();
        f.write_all(&data).unwrap();
        expected[offset as usize..offset as usize + len].copy_from_slice(&data);
    }
    f.sync_all().unwrap();
    (path, expected)
}

#[test]
fn reads_bytes_and_holes_from_qemu_nbd() {
    if !tools_or_skip("reads_bytes_and_holes_from_qemu_nbd", &["qemu-nbd"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (image, expected) = sparse_raw(dir.path());
    let server = QemuNbd::start(dir.path(), "disk", &["-f", "raw"], &image);
    let client = Client::connect(
        Address::Unix(server.socket.clone()),
        ClientOptions::new("disk").meta_context(BASE_ALLOCATION),
    )
    .unwrap();
    assert_eq!(client.size(), 16 * MIB);
    assert!(client.info().read_only());
    assert!(client.info().structured_replies);

    // The whole disk in one call (split at the server's maximum payload).
    let mut all = vec![0xeeu8; expected.len()];
    let stats = client.read(0, &mut all).unwrap();
    assert!(all == expected, "bytes read differ from the image");
    assert!(
        stats.hole_bytes >= 8 * MIB,
        "holes not sent as holes: {stats:?}"
    );
    assert_eq!(stats.data_bytes + stats.hole_bytes, 16 * MIB);

    // Unaligned small reads, including ones that straddle data and holes.
    for (offset, len) in [
        (1u64, 7usize),
        (3 * MIB - 5, 10),
        (9 * MIB + 4000, 9000),
        (16 * MIB - 1, 1),
    ] {
        let mut buf = vec![0xeeu8; len];
        client.read(offset, &mut buf).unwrap();
        assert_eq!(
            buf[..],
            expected[offset as usize..offset as usize + len],
            "at {offset}"
        );
    }

    // base:allocation: every byte in a hole extent is zero in the image, and the big unwritten
    // stretch 4..9 MiB is reported as a hole.
    let map = client.map(BASE_ALLOCATION, 0, client.size()).unwrap();
    let mut at = 0;
    for e in &map {
        assert_eq!(e.offset, at, "extents not contiguous: {map:?}");
        at += e.length;
        if e.flags & STATE_HOLE != 0 {
            let r = e.offset as usize..(e.offset + e.length) as usize;
            assert!(
                expected[r].iter().all(|&b| b == 0),
                "data inside hole {e:?}"
            );
        }
    }
    assert_eq!(at, 16 * MIB);
    assert!(
        map.iter().any(|e| e.flags & STATE_HOLE != 0
            && e.offset <= 4 * MIB
            && e.offset + e.length >= 9 * MIB),
        "no hole reported over 4..9 MiB: {map:?}"
    );
    assert!(
        map.iter().any(|e| e.flags & STATE_HOLE == 0
            && e.offset <= 3 * MIB
            && e.offset + e.length >= 4 * MIB),
        "data at 3..4 MiB not reported as data: {map:?}"
    );

    // Past the end: a clear error, before anything is sent.
    let err = client.read(16 * MIB - 4096, &mut [0u8; 8192]).unwrap_err();
    assert!(matches!(err, Error::InvalidRequest { .. }), "{err}");
    assert!(
        err.to_string().contains("\"disk\"") && err.to_string().contains("16773120"),
        "{err}"
    );
}

#[test]
fn threads_share_the_client() {
    if !tools_or_skip("threads_share_the_client", &["qemu-nbd"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (image, expected) = sparse_raw(dir.path());
    let server = QemuNbd::start(dir.path(), "disk", &["-f", "raw"], &image);
    let client = Arc::new(
        Client::connect(
            Address::Unix(server.socket.clone()),
            ClientOptions::new("disk").connections(3),
        )
        .unwrap(),
    );
    let expected = Arc::new(expected);
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let (client, expected) = (client.clone(), expected.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                for i in 0..64u64 {
                    let offset = ((t * 64 + i) * 4096 * 7) % (16 * MIB - (64 << 10));
                    client.read(offset, &mut buf).unwrap();
                    assert!(buf[..] == expected[offset as usize..offset as usize + buf.len()]);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn dirty_bitmap_extents_match_the_writes() {
    if !tools_or_skip(
        "dirty_bitmap_extents_match_the_writes",
        &["qemu-nbd", "qemu-img", "qemu-io"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    let img = image.to_str().unwrap();
    run("qemu-img", ["create", "-q", "-f", "qcow2", img, "32M"]);
    // Written before the bitmap exists: data, but not dirty.
    run(
        "qemu-io",
        ["-f", "qcow2", "-c", "write -q -P 0x11 0 1M", img],
    );
    run("qemu-img", ["bitmap", "--add", "-f", "qcow2", img, "b0"]);
    // Written after: dirty (64 KiB granularity; all aligned to it).
    let dirty = [(2 * MIB, 64u64 << 10), (5 * MIB, 3 * MIB), (31 * MIB, MIB)];
    for (i, (offset, len)) in dirty.iter().enumerate() {
        let cmd = format!("write -q -P {} {offset} {len}", 0x21 + i);
        run("qemu-io", ["-f", "qcow2", "-c", cmd.as_str(), img]);
    }
    let mut expected = vec![0u8; 32 * MIB as usize];
    expected[..MIB as usize].fill(0x11);
    for (i, &(offset, len)) in dirty.iter().enumerate() {
        expected[offset as usize..(offset + len) as usize].fill(0x21 + i as u8);
    }

    let server = QemuNbd::start(dir.path(), "vm-os", &["-f", "qcow2", "-B", "b0"], &image);
    let bitmap = dirty_bitmap_context("b0");
    let client = Client::connect(
        Address::Unix(server.socket.clone()),
        ClientOptions::new("vm-os")
            .meta_context(BASE_ALLOCATION)
            .meta_context(bitmap.clone()),
    )
    .unwrap();
    assert_eq!(client.size(), 32 * MIB);

    let dirty_extents: Vec<(u64, u64)> = client
        .map(&bitmap, 0, client.size())
        .unwrap()
        .into_iter()
        .filter(|e| e.flags & STATE_DIRTY != 0)
        .map(|e| (e.offset, e.length))
        .collect();
    assert_eq!(dirty_extents, dirty.to_vec());

    // One block status answers both contexts.
    let status = client.block_status(0, 8 * MIB).unwrap();
    assert!(status.extents(BASE_ALLOCATION).is_some() && status.extents(&bitmap).is_some());
    assert!(status.extents("qemu:allocation-depth").is_none());

    let mut all = vec![0xeeu8; expected.len()];
    let stats = client.read(0, &mut all).unwrap();
    assert!(all == expected, "bytes read differ from what qemu-io wrote");
    assert!(stats.hole_bytes > 0, "{stats:?}");

    // A bitmap the export lacks, and an export the server lacks, are clear errors.
    let err = Client::connect(
        Address::Unix(server.socket.clone()),
        ClientOptions::new("vm-os").meta_context(dirty_bitmap_context("nope")),
    )
    .unwrap_err();
    assert!(
        matches!(&err, Error::NoMetaContext { context, .. } if context == "qemu:dirty-bitmap:nope"),
        "{err}"
    );
    let err = Client::connect(
        Address::Unix(server.socket.clone()),
        ClientOptions::new("other"),
    )
    .unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Refused {
                option: "NBD_OPT_GO",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn reads_over_tcp() {
    if !tools_or_skip("reads_over_tcp", &["qemu-nbd"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (image, expected) = sparse_raw(dir.path());
    let port = common::free_port();
    let server = QemuNbd::start_tcp(port, "disk", &["-f", "raw"], &image);
    let client = Client::connect(
        Address::Tcp(format!("127.0.0.1:{port}")),
        ClientOptions::new("disk"),
    )
    .unwrap();
    let mut buf = vec![0u8; 4 * MIB as usize];
    client.read(2 * MIB, &mut buf).unwrap();
    assert!(buf[..] == expected[2 * MIB as usize..6 * MIB as usize]);
    drop(server);
}
