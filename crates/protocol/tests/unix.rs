//! Unix socket transport: mode 0600, roundtrip, stale and foreign files.

#![allow(clippy::unwrap_used)] // test code: a panic is a failure report

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

use bulwark_protocol::{
    AgentState, Client, SOCKET_MODE, ServeOptions, UnixSocketListener, connect_unix,
};
use bulwark_tests::Needs;
use common::ToyAgent;

#[tokio::test]
async fn roundtrip_over_a_0600_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let listener = UnixSocketListener::bind(&path).unwrap();

    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, SOCKET_MODE);
    assert_eq!(SOCKET_MODE, 0o600);
    // Owned by whoever runs the agent (root in production): same owner as a file we create.
    std::fs::write(dir.path().join("probe"), b"").unwrap();
    let me = std::fs::metadata(dir.path().join("probe")).unwrap();
    std::fs::remove_file(dir.path().join("probe")).unwrap();
    assert_eq!(meta.uid(), me.uid());
    // Nothing but the socket in the directory: the temporary name is gone.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

    let toy = ToyAgent::new();
    let server = tokio::spawn(async move {
        listener
            .run(ServeOptions::default(), move |_| toy.clone())
            .await
    });

    let conn = connect_unix(&path).await.unwrap();
    assert!(conn.peer().starts_with("unix:"));
    let mut client = Client::new(conn);
    let hello = client.hello("test", "0", &[]).await.unwrap();
    assert_eq!(hello.agent.hostname, "toy");
    client
        .freeze(std::time::Duration::from_millis(500))
        .await
        .unwrap();
    assert_eq!(client.status().await.unwrap().state, AgentState::Frozen);
    assert!(client.thaw().await.unwrap().held_continuously);
    client.ping().await.unwrap();

    // Dropping the listener removes its socket.
    server.abort();
    let _ = server.await;
    assert!(!path.exists());
}

#[tokio::test]
async fn stale_socket_is_replaced_but_other_files_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");

    // A socket left by a crashed agent.
    let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
    drop(stale);
    let listener = UnixSocketListener::bind(&path).unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    drop(listener);
    assert!(!path.exists());

    // A regular file is never clobbered.
    std::fs::write(&path, b"important").unwrap();
    let err = UnixSocketListener::bind(&path).unwrap_err();
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"important");
}

#[tokio::test]
async fn connecting_to_a_missing_socket_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = connect_unix(&dir.path().join("nope.sock"))
        .await
        .unwrap_err();
    assert!(matches!(err, bulwark_protocol::Error::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("nope.sock"));
}

/// Defence in depth: even if the socket's mode were widened by mistake, a peer that is neither
/// root nor the owner gets no answer. Needs root (to run a client as `nobody`) and python3.
#[tokio::test]
async fn peers_other_than_root_or_owner_are_dropped() {
    const TEST: &str = "protocol unix::peers_other_than_root_or_owner_are_dropped";
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("probe"), b"").unwrap();
    if std::fs::metadata(dir.path().join("probe")).unwrap().uid() != 0 {
        bulwark_tests::skip(
            TEST,
            Needs::Root,
            "needs root (files it makes must be owned by 0)",
        );
        return;
    }
    if std::process::Command::new("python3")
        .arg("-c")
        .arg("pass")
        .status()
        .is_err()
    {
        bulwark_tests::skip(TEST, Needs::Root, "needs the `python3` command");
        return;
    }
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.path().join("agent.sock");
    let listener = UnixSocketListener::bind(&path).unwrap();
    // The misconfiguration: world-connectable.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let toy = ToyAgent::new();
    tokio::spawn(async move {
        listener
            .run(ServeOptions::default(), move |_| toy.clone())
            .await
    });

    let script = r#"
import json, socket, struct, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(sys.argv[1])
body = json.dumps({"v": 1, "id": 1, "body": {"type": "ping"}}).encode()
try:
    s.sendall(struct.pack(">I", len(body)) + body)
    print("closed" if s.recv(4) == b"" else "answered")
except (ConnectionResetError, BrokenPipeError):
    print("closed")
"#;
    let run_as = |uid: Option<u32>| {
        let script = script.to_owned();
        let path = path.clone();
        tokio::task::spawn_blocking(move || {
            use std::os::unix::process::CommandExt;
            let mut cmd = std::process::Command::new("python3");
            cmd.arg("-c").arg(script).arg(path);
            if let Some(uid) = uid {
                cmd.uid(uid).gid(uid);
            }
            let out = cmd.output().unwrap();
            assert!(out.status.success(), "{out:?}");
            String::from_utf8(out.stdout).unwrap().trim().to_owned()
        })
    };
    assert_eq!(run_as(Some(65534)).await.unwrap(), "closed");
    // Root still gets an answer (hello_required, since it skipped hello).
    assert_eq!(run_as(None).await.unwrap(), "answered");
}
