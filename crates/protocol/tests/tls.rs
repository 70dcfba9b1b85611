//! Mutual TLS over real loopback TCP, with certificates from the enrollment functions.

#![allow(clippy::unwrap_used)] // test code: a panic is a failure report

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bulwark_protocol::rustls::pki_types::CertificateDer;
use bulwark_protocol::rustls::pki_types::pem::PemObject;
use bulwark_protocol::rustls::{self, ClientConfig, RootCertStore};
use bulwark_protocol::{
    AgentState, CAP_FSFREEZE, Client, ClientTlsStream, Connection, Error, ErrorCode, Hello,
    MAX_FRAME_LEN, Request, RequestEnvelope, Response, ServeOptions, TlsFiles, TlsListener,
    VersionRange, client_config, connect_tcp, server_config, write_frame,
};
use common::{Pki, ToyAgent, pki};
use tokio::io::AsyncWriteExt;

const LOCALHOST: &str = "127.0.0.1:0";

async fn start_agent(agent: &TlsFiles) -> SocketAddr {
    let listener = TlsListener::bind(LOCALHOST.parse().unwrap(), server_config(agent).unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let toy = ToyAgent::new();
    tokio::spawn(async move {
        listener
            .run(ServeOptions::default(), move |_peer| toy.clone())
            .await
    });
    addr
}

async fn connect(pki: &Pki, addr: SocketAddr) -> Connection<ClientTlsStream> {
    connect_tcp(addr, "localhost", client_config(&pki.controller).unwrap())
        .await
        .unwrap()
}

async fn hello_client(pki: &Pki, addr: SocketAddr) -> Client<ClientTlsStream> {
    let mut client = Client::new(connect(pki, addr).await);
    client.set_reply_timeout(Some(Duration::from_secs(10)));
    client.hello("test-controller", "0.0.0", &[]).await.unwrap();
    client
}

fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(pki: &Pki) -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&pki.controller.ca_cert).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    Arc::new(roots)
}

fn hello_request(id: u64) -> RequestEnvelope {
    RequestEnvelope {
        v: 1,
        id,
        body: Request::Hello(Hello {
            versions: VersionRange::SUPPORTED,
            client_name: "raw".into(),
            client_version: "0".into(),
            capabilities: vec!["future-thing".into()],
        }),
    }
}

fn request(id: u64, body: Request) -> RequestEnvelope {
    RequestEnvelope { v: 1, id, body }
}

fn error_code(response: &Response) -> Option<ErrorCode> {
    match response {
        Response::Error(e) => Some(e.code),
        _ => None,
    }
}

#[tokio::test]
async fn valid_client_runs_a_full_cycle() {
    let pki = pki();
    let addr = start_agent(&pki.agent).await;
    let mut client = Client::new(connect(&pki, addr).await);
    let hello = client
        .hello("test-controller", "0.0.0", &["x-unknown"])
        .await
        .unwrap();
    assert_eq!(hello.version, 1);
    assert_eq!(hello.agent.hostname, "toy");
    assert!(hello.has_capability(CAP_FSFREEZE));
    assert_eq!(
        client.prepare().await.unwrap().level,
        bulwark_consistency::Level::Application
    );
    let frozen = client.freeze(Duration::from_secs(30)).await.unwrap();
    assert_eq!(frozen.timeout_ms, 30_000);
    assert_eq!(client.status().await.unwrap().state, AgentState::Frozen);
    let thawed = client.thaw().await.unwrap();
    assert!(thawed.held_continuously);
    assert_eq!(client.status().await.unwrap().state, AgentState::Idle);
    client.ping().await.unwrap();

    // The agent certificate also names 127.0.0.1; the address may be given as a string.
    let target = format!("127.0.0.1:{}", addr.port());
    let conn = connect_tcp(target, "127.0.0.1", client_config(&pki.controller).unwrap())
        .await
        .unwrap();
    let mut by_ip = Client::new(conn);
    by_ip.hello("test-controller", "0.0.0", &[]).await.unwrap();
    by_ip.ping().await.unwrap();
}

/// Runs one handshake on a fresh listener and asserts both that the agent's side failed and
/// that the controller could not get an answer.
async fn assert_client_rejected(agent: &TlsFiles, client: Arc<ClientConfig>, expected: &str) {
    let listener = TlsListener::bind(LOCALHOST.parse().unwrap(), server_config(agent).unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let server = async {
        let pending = listener.accept().await.unwrap();
        pending.handshake(Duration::from_secs(10)).await
    };
    let controller = async {
        match connect_tcp(addr, "localhost", client).await {
            // TLS 1.3: the client finishes its side before the server checks its certificate;
            // the refusal arrives as an alert on the first read.
            Ok(conn) => {
                let mut c = Client::new(conn);
                c.set_reply_timeout(Some(Duration::from_secs(10)));
                c.hello("intruder", "0", &[]).await.map(|_| ())
            }
            Err(e) => Err(e),
        }
    };
    let (server, controller) = tokio::join!(server, controller);
    let server_err = server.expect_err("the agent accepted the handshake");
    assert!(
        matches!(server_err, Error::Handshake { .. }),
        "{server_err:?}"
    );
    let client_err = controller.expect_err("the intruder got an answer");
    assert!(
        !matches!(client_err, Error::Remote { .. }),
        "{client_err:?}"
    );
    let reason = server_err.to_string();
    assert!(
        reason.contains(expected),
        "agent said {reason:?}, expected {expected:?}"
    );
}

#[tokio::test]
async fn client_without_certificate_is_rejected() {
    let pki = pki();
    let config = ClientConfig::builder_with_provider(ring())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots(&pki))
        .with_no_client_auth();
    assert_client_rejected(&pki.agent, Arc::new(config), "peer sent no certificates").await;
}

#[tokio::test]
async fn client_with_certificate_from_another_ca_is_rejected() {
    let pki = pki();
    let other = common::pki();
    let files = TlsFiles {
        ca_cert: pki.controller.ca_cert.clone(),
        cert: other.controller.cert.clone(),
        key: other.controller.key.clone(),
    };
    // Both test CAs have the same name, so the agent finds "its" CA and the signature fails.
    assert_client_rejected(&pki.agent, client_config(&files).unwrap(), "BadSignature").await;

    // A CA under another name: unknown issuer.
    let ca = bulwark_protocol::CertificateAuthority::generate("Someone else's CA").unwrap();
    let mut files = ca
        .issue_controller("controller")
        .unwrap()
        .write(&other.dir.path().join("x"))
        .unwrap();
    files.ca_cert = pki.controller.ca_cert.clone();
    assert_client_rejected(&pki.agent, client_config(&files).unwrap(), "UnknownIssuer").await;
}

#[tokio::test]
async fn self_signed_client_is_rejected() {
    let pki = pki();
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["controller".to_owned()]).unwrap();
    let dir = pki.dir.path().join("selfsigned");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("c.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("c.key"), signing_key.serialize_pem()).unwrap();
    let files = TlsFiles {
        ca_cert: pki.controller.ca_cert.clone(),
        cert: dir.join("c.pem"),
        key: dir.join("c.key"),
    };
    assert_client_rejected(&pki.agent, client_config(&files).unwrap(), "UnknownIssuer").await;
}

#[tokio::test]
async fn agent_certificate_cannot_act_as_controller() {
    // Same CA, but the agent certificate only allows serverAuth.
    let pki = pki();
    let files = TlsFiles {
        ca_cert: pki.agent.ca_cert.clone(),
        cert: pki.agent.cert.clone(),
        key: pki.agent.key.clone(),
    };
    assert_client_rejected(
        &pki.agent,
        client_config(&files).unwrap(),
        "extended key usage for client authentication",
    )
    .await;
}

#[tokio::test]
async fn controller_rejects_an_impostor_agent() {
    let pki = pki();
    let other = common::pki();
    // An agent with a certificate from another CA.
    let addr = start_agent(&other.agent).await;
    let err = connect_tcp(addr, "localhost", client_config(&pki.controller).unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Handshake { .. }), "{err:?}");

    // A genuine agent, dialled under a name its certificate does not carry.
    let addr = start_agent(&pki.agent).await;
    let err = connect_tcp(
        addr,
        "db1.example.org",
        client_config(&pki.controller).unwrap(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Handshake { .. }), "{err:?}");

    // The controller's own (clientAuth-only) certificate used as a server certificate.
    let fake = TlsFiles {
        ca_cert: pki.controller.ca_cert.clone(),
        cert: pki.controller.cert.clone(),
        key: pki.controller.key.clone(),
    };
    let addr = start_agent(&fake).await;
    let err = connect_tcp(addr, "controller", client_config(&pki.controller).unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Handshake { .. }), "{err:?}");
}

#[tokio::test]
async fn garbage_and_oversized_frames_get_an_error_and_the_agent_keeps_serving() {
    let pki = pki();
    let addr = start_agent(&pki.agent).await;

    // A client that sent half a header and hangs there does not block anybody.
    let mut stuck = connect(&pki, addr).await;
    stuck.get_mut().write_all(&[0, 0]).await.unwrap();
    stuck.get_mut().flush().await.unwrap();

    let cases: Vec<(Vec<u8>, ErrorCode)> = vec![
        // Text where a length prefix belongs: "GET " = 0x47455420 bytes.
        (
            b"GET / HTTP/1.1\r\nHost: agent\r\n\r\n".to_vec(),
            ErrorCode::FrameTooLarge,
        ),
        // Exactly one byte over the limit.
        (
            ((MAX_FRAME_LEN + 1) as u32).to_be_bytes().to_vec(),
            ErrorCode::FrameTooLarge,
        ),
        (u32::MAX.to_be_bytes().to_vec(), ErrorCode::FrameTooLarge),
        // A well-formed frame around garbage.
        (
            [&[0u8, 0, 0, 6][..], b"\xff\xfe{[}]"].concat(),
            ErrorCode::Malformed,
        ),
        // JSON, but not an envelope.
        ([&[0u8, 0, 0, 2][..], b"{}"].concat(), ErrorCode::Malformed),
    ];
    for (bytes, code) in cases {
        let mut conn = connect(&pki, addr).await;
        conn.get_mut().write_all(&bytes).await.unwrap();
        conn.get_mut().flush().await.unwrap();
        let reply = conn.recv_response().await.unwrap();
        assert_eq!(reply.id, None);
        assert_eq!(error_code(&reply.body), Some(code), "{bytes:?}: {reply:?}");
        // The agent closed this connection...
        let after = conn.recv_response().await.unwrap_err();
        assert!(
            matches!(after, Error::Closed { .. } | Error::Io { .. }),
            "{after:?}"
        );
        // ...and still serves everybody else.
        let mut good = hello_client(&pki, addr).await;
        good.ping().await.unwrap();
    }
    drop(stuck);
}

#[tokio::test]
async fn unknown_message_is_answered_and_the_connection_stays_open() {
    let pki = pki();
    let addr = start_agent(&pki.agent).await;
    let mut conn = connect(&pki, addr).await;
    conn.send_request(&hello_request(1)).await.unwrap();
    assert!(matches!(
        conn.recv_response().await.unwrap().body,
        Response::HelloOk(_)
    ));
    let frame = br#"{"v":1,"id":2,"body":{"type":"run_command","argv":["rm","-rf","/"]}}"#;
    write_frame(conn.get_mut(), frame, "test").await.unwrap();
    let reply = conn.recv_response().await.unwrap();
    assert_eq!(reply.id, Some(2));
    assert_eq!(error_code(&reply.body), Some(ErrorCode::UnknownMessage));
    // Its id counts: 2 again is a replay.
    conn.send_request(&request(2, Request::Ping)).await.unwrap();
    let reply = conn.recv_response().await.unwrap();
    assert_eq!(error_code(&reply.body), Some(ErrorCode::ReplayedRequestId));
    conn.send_request(&request(3, Request::Ping)).await.unwrap();
    assert_eq!(conn.recv_response().await.unwrap().body, Response::Pong);
}

#[tokio::test]
async fn replayed_and_out_of_order_request_ids_are_rejected() {
    let pki = pki();
    let addr = start_agent(&pki.agent).await;
    let mut conn = connect(&pki, addr).await;

    conn.send_request(&request(1, Request::Ping)).await.unwrap();
    let reply = conn.recv_response().await.unwrap();
    assert_eq!(error_code(&reply.body), Some(ErrorCode::HelloRequired));

    conn.send_request(&hello_request(5)).await.unwrap();
    assert!(matches!(
        conn.recv_response().await.unwrap().body,
        Response::HelloOk(_)
    ));

    conn.send_request(&request(6, Request::Freeze { timeout_ms: 1000 }))
        .await
        .unwrap();
    assert!(matches!(
        conn.recv_response().await.unwrap().body,
        Response::Frozen(_)
    ));

    // Replay of the same id, then an older one: both refused, neither executed.
    for id in [6, 4, 0] {
        conn.send_request(&request(id, Request::Thaw))
            .await
            .unwrap();
        let reply = conn.recv_response().await.unwrap();
        assert_eq!(reply.id, Some(id));
        assert_eq!(
            error_code(&reply.body),
            Some(ErrorCode::ReplayedRequestId),
            "{reply:?}"
        );
    }
    conn.send_request(&request(7, Request::Status))
        .await
        .unwrap();
    match conn.recv_response().await.unwrap().body {
        Response::Status(s) => assert_eq!(s.state, AgentState::Frozen),
        other => panic!("{other:?}"),
    }
    // Gaps are fine: strictly increasing, not consecutive.
    conn.send_request(&request(100, Request::Thaw))
        .await
        .unwrap();
    assert!(matches!(
        conn.recv_response().await.unwrap().body,
        Response::Thawed(_)
    ));

    // Ids are per connection: a new connection may start over.
    let mut other = connect(&pki, addr).await;
    other.send_request(&hello_request(1)).await.unwrap();
    assert!(matches!(
        other.recv_response().await.unwrap().body,
        Response::HelloOk(_)
    ));
}

async fn start_agent_with(agent: &TlsFiles, options: ServeOptions) -> SocketAddr {
    let listener = TlsListener::bind(LOCALHOST.parse().unwrap(), server_config(agent).unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let toy = ToyAgent::new();
    tokio::spawn(async move { listener.run(options, move |_peer| toy.clone()).await });
    addr
}

/// Whether the agent closes `tcp` within `within` (end of stream or reset).
async fn closed_within(tcp: &mut tokio::net::TcpStream, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(within, tcp.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test]
async fn connections_not_yet_authenticated_are_capped() {
    let pki = pki();
    let options = ServeOptions {
        max_unauthenticated: 2,
        handshake_timeout: Duration::from_secs(20),
        ..ServeOptions::default()
    };
    let addr = start_agent_with(&pki.agent, options).await;
    // Two connections that never start TLS hold both handshake slots.
    let mut idle1 = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _idle2 = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A third is closed at once instead of waiting for its handshake.
    let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert!(
        closed_within(&mut third, Duration::from_secs(3)).await,
        "a connection over the cap was kept open"
    );
    // The slots are not taken by anyone else: once one idle connection goes, a real
    // controller gets through.
    assert!(!closed_within(&mut idle1, Duration::from_millis(100)).await);
    drop(idle1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut client = hello_client(&pki, addr).await;
    client.ping().await.unwrap();
}

#[tokio::test]
async fn a_connection_that_never_says_hello_is_closed_at_the_handshake_deadline() {
    let pki = pki();
    let options = ServeOptions {
        handshake_timeout: Duration::from_millis(500),
        idle_timeout: Some(Duration::from_secs(300)),
        ..ServeOptions::default()
    };
    let addr = start_agent_with(&pki.agent, options).await;
    let mut conn = connect(&pki, addr).await;
    let started = std::time::Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(5), conn.recv_response())
        .await
        .expect("the agent kept a connection without hello open");
    // A timeout reply, then the close (or the close straight away).
    if let Ok(reply) = r {
        assert_eq!(
            error_code(&reply.body),
            Some(ErrorCode::Timeout),
            "{reply:?}"
        );
        assert!(conn.recv_response().await.unwrap_err().is_closed());
    }
    assert!(started.elapsed() < Duration::from_secs(3));
    // After hello, the idle timeout (minutes) applies instead.
    let mut client = hello_client(&pki, addr).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    client.ping().await.unwrap();
}
