//! The real agent binary over TCP with mutual TLS (root: it freezes a real guest).
//!
//! Enrollment through `bulwark-controller enroll`; a quiesced backup with the enrolled
//! identity works; a client without a certificate, with a certificate from another CA, with
//! garbage, an oversized frame or a replayed request id gets nothing done (no freeze), and the
//! agent keeps serving.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

#[path = "agent_common/mod.rs"]
mod agent_common;

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use agent_common::*;
use bulwark_protocol::rustls;
use bulwark_protocol::rustls::pki_types::pem::PemObject;
use bulwark_protocol::{
    AgentState, Client, ErrorCode, Request, RequestEnvelope, Response, TlsFiles, client_config,
    connect_tcp,
};
use bulwark_tests::*;
use tokio::io::AsyncWriteExt;

const TOOLS: &[&str] = &["mkfs.ext4", "mkfs.xfs", "losetup", "fsfreeze"];

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A raw TLS client without any client certificate (rustls, blocking).
fn no_cert_exchange(addr: &str, ca: &Path, frame: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let sock = std::net::TcpStream::connect(addr)?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    tls.write_all(frame)?;
    tls.flush()?;
    let mut out = Vec::new();
    tls.read_to_end(&mut out)?;
    Ok(out)
}

fn frame(envelope: &RequestEnvelope) -> Vec<u8> {
    let payload = serde_json::to_vec(envelope).unwrap();
    let mut f = (payload.len() as u32).to_be_bytes().to_vec();
    f.extend(payload);
    f
}

#[test]
fn mutual_tls_agent_refuses_unauthenticated_and_malformed_clients_and_keeps_serving() {
    if !root_or_skip("agent_mtls", TOOLS) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca = dir.join("ca");
    let agent_tls = dir.join("agent-tls");
    let out = controller([
        "enroll",
        "--ca-dir",
        ca.to_str().unwrap(),
        "--out",
        agent_tls.to_str().unwrap(),
        "--agent",
        "guest1",
        "--san",
        "127.0.0.1",
    ]);
    assert!(out.status.success(), "enroll: {}", stderr_of(&out));
    assert!(stdout_of(&out).contains("[tls]"));
    let controller_tls = ca.join("controller");
    for f in ["ca.pem", "controller.pem", "controller.key"] {
        assert!(controller_tls.join(f).exists(), "{f}");
    }

    let guest = Guest::new(dir, 64 * MIB, 512 * MIB);
    let text = format!(
        "listen = \"tcp:127.0.0.1:0\"\nstate_dir = \"{}\"\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n[freeze]\nmounts = [\"{}\"]\n",
        dir.join("state").display(),
        agent_tls.join("ca.pem").display(),
        agent_tls.join("guest1.pem").display(),
        agent_tls.join("guest1.key").display(),
        guest.mnt().display()
    );
    let config = write_config(dir, "agent.toml", &text, 0o600);
    let mut agent = AgentProc::start(&config);
    let listen = agent.listen.clone();
    let addr = listen.strip_prefix("tcp:").unwrap().to_owned();
    let vault = dir.join("vault");

    // The enrolled controller: a file-system-consistent backup.
    let tls_dir = controller_tls.to_str().unwrap();
    let r = backup_json(
        &vault,
        "vm",
        &guest,
        &["--agent", &listen, "--tls-dir", tls_dir],
    );
    assert_eq!(r["consistency"], "file_system", "{r:#}");

    // A controller certificate from another CA: refused, the CLI falls back to crash with
    // the reason, or fails with --min-consistency file_system.
    let other = dir.join("other-ca");
    bulwark_protocol::ensure_ca(&other, "Impostor CA").unwrap();
    bulwark_protocol::enroll_controller(&other, &other.join("controller"), "controller").unwrap();
    std::fs::copy(ca.join("ca.pem"), other.join("controller/ca.pem")).unwrap();
    let impostor = other.join("controller");
    let r = backup_json(
        &vault,
        "vm",
        &guest,
        &[
            "--agent",
            &listen,
            "--tls-dir",
            impostor.to_str().unwrap(),
            "--consistency",
            "file_system",
        ],
    );
    assert_eq!(r["consistency"], "crash", "{r:#}");
    assert!(reasons(&r).contains("agent unreachable"), "{}", reasons(&r));
    let out = backup(
        &vault,
        "vm",
        &guest,
        &[
            "--agent",
            &listen,
            "--tls-dir",
            impostor.to_str().unwrap(),
            "--min-consistency",
            "file_system",
        ],
    );
    assert!(!out.status.success());

    let good = TlsFiles {
        ca_cert: controller_tls.join("ca.pem"),
        cert: controller_tls.join("controller.pem"),
        key: controller_tls.join("controller.key"),
    };
    let bad = TlsFiles {
        ca_cert: ca.join("ca.pem"),
        cert: impostor.join("controller.pem"),
        key: impostor.join("controller.key"),
    };
    // The agent's state as seen by the enrolled controller: what the refused clients below
    // must not have changed.
    let state = || {
        rt().block_on(async {
            let conn = connect_tcp(addr.as_str(), "127.0.0.1", client_config(&good).unwrap())
                .await
                .unwrap();
            let mut c = Client::new(conn);
            c.set_reply_timeout(Some(Duration::from_secs(10)));
            c.hello("test", "0", &[]).await.unwrap();
            c.status().await.unwrap().state
        })
    };
    let rt = rt();
    rt.block_on(async {
        // Wrong certificate, straight at the protocol. With TLS 1.3 the client finishes its
        // side of the handshake before the agent checks the certificate, so the connection
        // opens and the first request is what fails.
        let conn = connect_tcp(addr.as_str(), "127.0.0.1", client_config(&bad).unwrap())
            .await
            .expect("the TCP connection and the client's side of TLS 1.3 complete");
        let mut c = Client::new(conn);
        c.set_reply_timeout(Some(Duration::from_secs(10)));
        assert!(c.hello("impostor", "0", &[]).await.is_err());
        assert!(c.freeze(Duration::from_secs(30)).await.is_err());
    });
    assert_eq!(state(), AgentState::Idle, "the impostor froze the guest");

    // No client certificate at all: a Hello and a Freeze written blind get no reply.
    let hello = RequestEnvelope {
        v: 1,
        id: 1,
        body: Request::Hello(bulwark_protocol::Hello {
            versions: bulwark_protocol::VersionRange::SUPPORTED,
            client_name: "anonymous".into(),
            client_version: "0".into(),
            capabilities: vec![],
        }),
    };
    let freeze = RequestEnvelope {
        v: 1,
        id: 2,
        body: Request::Freeze { timeout_ms: 30_000 },
    };
    let blind = [frame(&hello), frame(&freeze)].concat();
    // The agent answers with a TLS alert (certificate required) or closes: never a protocol
    // reply. A failure to connect at all would prove nothing, so it fails the test.
    match no_cert_exchange(&addr, &ca.join("ca.pem"), &blind) {
        Ok(reply) => assert!(reply.is_empty(), "an anonymous client got a reply"),
        Err(e) => {
            let text = e.to_string().to_lowercase();
            assert!(
                text.contains("alert") || text.contains("certificate") || text.contains("reset"),
                "the anonymous client failed for another reason than the agent's refusal: {e}"
            );
        }
    }
    assert_eq!(state(), AgentState::Idle, "the blind Freeze was executed");

    // Plain TCP garbage.
    {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(b"\x16\x03\x01\x00\x05hello garbage that is no TLS at all");
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
    }

    rt.block_on(async {
        let connect = || async {
            let conn = connect_tcp(addr.as_str(), "127.0.0.1", client_config(&good).unwrap())
                .await
                .unwrap();
            let mut c = Client::new(conn);
            c.set_reply_timeout(Some(Duration::from_secs(10)));
            c.hello("test", "0", &[]).await.unwrap();
            c
        };
        // Garbage inside an authenticated connection: `malformed`, connection closed.
        let mut c = connect().await;
        let io = c.connection_mut().get_mut();
        io.write_all(&[0, 0, 0, 12]).await.unwrap();
        io.write_all(b"not json!!!!").await.unwrap();
        io.flush().await.unwrap();
        let reply = c.connection_mut().recv_response().await.unwrap();
        match reply.body {
            Response::Error(e) => assert_eq!(e.code, ErrorCode::Malformed),
            other => panic!("{other:?}"),
        }
        assert!(c.ping().await.is_err(), "the connection should be closed");

        // An oversized length: `frame_too_large`, closed, nothing allocated.
        let mut c = connect().await;
        let io = c.connection_mut().get_mut();
        io.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        io.flush().await.unwrap();
        let reply = c.connection_mut().recv_response().await.unwrap();
        match reply.body {
            Response::Error(e) => assert_eq!(e.code, ErrorCode::FrameTooLarge),
            other => panic!("{other:?}"),
        }

        // A replayed id: the Freeze is not executed.
        let mut c = connect().await;
        let conn = c.connection_mut();
        conn.send_request(&RequestEnvelope {
            v: 1,
            id: 5,
            body: Request::Ping,
        })
        .await
        .unwrap();
        assert_eq!(conn.recv_response().await.unwrap().body, Response::Pong);
        conn.send_request(&RequestEnvelope {
            v: 1,
            id: 5,
            body: Request::Freeze { timeout_ms: 30_000 },
        })
        .await
        .unwrap();
        match conn.recv_response().await.unwrap().body {
            Response::Error(e) => assert_eq!(e.code, ErrorCode::ReplayedRequestId),
            other => panic!("replayed freeze answered {other:?}"),
        }
        conn.send_request(&RequestEnvelope {
            v: 1,
            id: 6,
            body: Request::Status,
        })
        .await
        .unwrap();
        match conn.recv_response().await.unwrap().body {
            Response::Status(s) => assert_eq!(s.state, AgentState::Idle),
            other => panic!("{other:?}"),
        }
    });

    // Still serving: another quiesced backup.
    assert!(agent.alive(), "the agent died:\n{}", agent.log_text());
    let r = backup_json(
        &vault,
        "vm",
        &guest,
        &["--agent", &listen, "--tls-dir", tls_dir],
    );
    assert_eq!(r["consistency"], "file_system", "{r:#}");
    let log = agent.log_text();
    assert!(
        log.contains("TLS handshake refused") || log.contains("connection ended with an error"),
        "{log}"
    );
}
