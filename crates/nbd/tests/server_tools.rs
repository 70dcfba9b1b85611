//! The server against real clients: `qemu-img convert`/`compare`, `nbdinfo --map`, `nbdcopy`
//! (libnbd-bin). Skips with a message when they are missing, unless BULWARK_REQUIRE_SERVERS=1
//! or BULWARK_REQUIRE_ROOT_TESTS=1 (CI), which make it fail instead.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use bulwark_nbd::{Address, Client, ClientOptions, Error, ServerOptions};
use common::{BLOCK, TestServer, run, sparse_disk, tools_or_skip};

#[test]
fn qemu_img_converts_and_compares() {
    if !tools_or_skip("qemu_img_converts_and_compares", &["qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = sparse_disk();
    let original = dir.path().join("original.raw");
    std::fs::write(&original, &data).unwrap();
    let server = TestServer::start(
        Address::Unix(dir.path().join("s.sock")),
        data.clone(),
        ServerOptions::new("disk"),
    );
    let uri = server.uri("disk");

    let out = dir.path().join("out.raw");
    run(
        "qemu-img",
        [
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            uri.as_str(),
            out.to_str().unwrap(),
        ],
    );
    assert!(
        std::fs::read(&out).unwrap() == data,
        "qemu-img convert read different bytes"
    );

    let qcow = dir.path().join("out.qcow2");
    run(
        "qemu-img",
        [
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            uri.as_str(),
            qcow.to_str().unwrap(),
        ],
    );
    run(
        "qemu-img",
        [
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            uri.as_str(),
            qcow.to_str().unwrap(),
        ],
    );
    run(
        "qemu-img",
        [
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            original.to_str().unwrap(),
            uri.as_str(),
        ],
    );

    // qemu-img compare can fail: one byte changed in the file is found.
    let mut changed = data.clone();
    changed[5 * BLOCK + 17] ^= 1;
    std::fs::write(&original, &changed).unwrap();
    let status = Command::new("qemu-img")
        .args([
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            original.to_str().unwrap(),
            uri.as_str(),
        ])
        .output()
        .unwrap();
    assert_eq!(
        status.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&status.stdout)
    );
}

/// Expected `nbdinfo --map` lines (offset, length, type) for the disk: 0 data, 3 hole,zero.
fn expected_map(data: &[u8]) -> Vec<(u64, u64, u32)> {
    let mut out: Vec<(u64, u64, u32)> = Vec::new();
    for (i, block) in data.chunks(BLOCK).enumerate() {
        let kind = if block.iter().all(|&b| b == 0) { 3 } else { 0 };
        match out.last_mut() {
            Some(last) if last.2 == kind => last.1 += block.len() as u64,
            _ => out.push(((i * BLOCK) as u64, block.len() as u64, kind)),
        }
    }
    out
}

fn merged(map: Vec<(u64, u64, u32)>) -> Vec<(u64, u64, u32)> {
    let mut out: Vec<(u64, u64, u32)> = Vec::new();
    for e in map {
        match out.last_mut() {
            Some(last) if last.2 == e.2 && last.0 + last.1 == e.0 => last.1 += e.1,
            _ => out.push(e),
        }
    }
    out
}

#[test]
fn nbdinfo_maps_and_nbdcopy_copies() {
    if !tools_or_skip("nbdinfo_maps_and_nbdcopy_copies", &["nbdinfo", "nbdcopy"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = sparse_disk();
    let server = TestServer::start(
        Address::Unix(dir.path().join("s.sock")),
        data.clone(),
        ServerOptions::new("disk"),
    );
    let uri = server.uri("disk");

    let size = run("nbdinfo", ["--size", uri.as_str()]);
    assert_eq!(
        String::from_utf8_lossy(&size.stdout).trim(),
        data.len().to_string()
    );

    let map = run("nbdinfo", ["--map", uri.as_str()]);
    let map: Vec<(u64, u64, u32)> = String::from_utf8_lossy(&map.stdout)
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(merged(map), expected_map(&data));

    // Several connections at once (nbdcopy opens 4 when the server allows multi-conn).
    let out = dir.path().join("copy.raw");
    run(
        "nbdcopy",
        ["--connections=4", uri.as_str(), out.to_str().unwrap()],
    );
    assert!(
        std::fs::read(&out).unwrap() == data,
        "nbdcopy read different bytes"
    );

    // A listing names the export.
    let list = run("nbdinfo", ["--list", "--json", uri.as_str()]);
    assert!(String::from_utf8_lossy(&list.stdout).contains("\"export-name\": \"disk\""));
}

#[test]
fn tcp_listener_serves() {
    if !tools_or_skip("tcp_listener_serves", &["nbdinfo"]) {
        return;
    }
    let data = sparse_disk();
    let server = TestServer::start(
        Address::Tcp("127.0.0.1:0".into()),
        data.clone(),
        ServerOptions::new("disk"),
    );
    let size = run("nbdinfo", ["--size", server.uri("disk").as_str()]);
    assert_eq!(
        String::from_utf8_lossy(&size.stdout).trim(),
        data.len().to_string()
    );
    let client = Client::connect(server.address.clone(), ClientOptions::new("disk")).unwrap();
    let mut buf = vec![0u8; 3 * BLOCK];
    client.read(99 * BLOCK as u64, &mut buf).unwrap();
    assert!(buf[..] == data[99 * BLOCK..102 * BLOCK]);
}

#[test]
fn shutdown_closes_connections_and_removes_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    let mut server = TestServer::start(
        Address::Unix(socket.clone()),
        sparse_disk(),
        ServerOptions::new("disk"),
    );
    let client = Client::connect(
        server.address.clone(),
        ClientOptions::new("disk").connections(1),
    )
    .unwrap();
    client.read(0, &mut [0u8; 4096]).unwrap();
    server.stop();
    assert!(!socket.exists(), "socket left behind");
    let err = client.read(0, &mut [0u8; 4096]).unwrap_err();
    assert!(
        matches!(err, Error::Io { .. } | Error::Connect { .. }),
        "{err}"
    );
}

#[test]
fn the_client_replaces_a_dead_connection() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    let data = sparse_disk();
    let mut first = TestServer::start(
        Address::Unix(socket.clone()),
        data.clone(),
        ServerOptions::new("disk"),
    );
    let client = Client::connect(
        Address::Unix(socket.clone()),
        ClientOptions::new("disk").connections(1),
    )
    .unwrap();
    first.stop();
    let _second = TestServer::start(
        Address::Unix(socket.clone()),
        data.clone(),
        ServerOptions::new("disk"),
    );
    // The pooled connection died with the first server: that read fails, naming the export
    // and offset; the connection is dropped and the next read dials the new server.
    let mut buf = vec![0u8; 4096];
    let err = client.read(8192, &mut buf).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(
        err.to_string().contains("\"disk\"") && err.to_string().contains("offset 8192"),
        "{err}"
    );
    client.read(8192, &mut buf).unwrap();
    assert!(buf[..] == data[8192..12288]);
}

/// The instant-recovery storage path of issue 13 with QEMU's own block layer: a qcow2 overlay
/// whose backing file is our export takes the writes; pulling the backing data into the overlay
/// (`qemu-img rebase -b ''`, what block-stream does live) makes it complete, after which the
/// export can stop.
#[test]
fn a_qcow2_overlay_runs_on_the_export_and_outlives_it() {
    if !tools_or_skip(
        "a_qcow2_overlay_runs_on_the_export_and_outlives_it",
        &["qemu-img", "qemu-io"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = sparse_disk();
    let mut server = TestServer::start(
        Address::Unix(dir.path().join("s.sock")),
        data.clone(),
        ServerOptions::new("disk"),
    );
    let uri = server.uri("disk");
    let overlay = dir.path().join("overlay.qcow2");
    let ov = overlay.to_str().unwrap();
    run(
        "qemu-img",
        [
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            uri.as_str(),
            "-F",
            "raw",
            ov,
        ],
    );
    run(
        "qemu-io",
        ["-f", "qcow2", "-c", "write -q -P 0x77 1M 64k", ov],
    );
    let mut expected = data.clone();
    expected[1 << 20..(1 << 20) + (64 << 10)].fill(0x77);

    let out = dir.path().join("out.raw");
    run(
        "qemu-img",
        ["convert", "-O", "raw", ov, out.to_str().unwrap()],
    );
    assert!(
        std::fs::read(&out).unwrap() == expected,
        "overlay over the export reads wrong bytes"
    );

    run("qemu-img", ["rebase", "-f", "qcow2", "-b", "", ov]);
    server.stop();
    std::fs::remove_file(&out).unwrap();
    run(
        "qemu-img",
        ["convert", "-O", "raw", ov, out.to_str().unwrap()],
    );
    assert!(
        std::fs::read(&out).unwrap() == expected,
        "streamed overlay differs"
    );
}
