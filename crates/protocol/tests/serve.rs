//! The protocol rules of `serve` and `Client`, over in-memory streams.

#![allow(clippy::unwrap_used)] // test code: a panic is a failure report

mod common;

use std::time::Duration;

use bulwark_protocol::{
    Client, Connection, Error, ErrorCode, Hello, Request, RequestEnvelope, Response,
    ResponseEnvelope, ServeOptions, VersionRange, serve,
};
use common::ToyAgent;
use tokio::io::DuplexStream;

fn start(
    options: ServeOptions,
) -> (
    Connection<DuplexStream>,
    tokio::task::JoinHandle<Result<(), Error>>,
) {
    let (client, agent) = tokio::io::duplex(1 << 20);
    let task = tokio::spawn(serve(
        Connection::new(agent, "controller"),
        ToyAgent::new(),
        options,
    ));
    (Connection::new(client, "agent"), task)
}

fn hello(id: u64, v: u16, versions: VersionRange) -> RequestEnvelope {
    RequestEnvelope {
        v,
        id,
        body: Request::Hello(Hello {
            versions,
            client_name: "t".into(),
            client_version: "0".into(),
            capabilities: vec![],
        }),
    }
}

async fn call(conn: &mut Connection<DuplexStream>, env: RequestEnvelope) -> ResponseEnvelope {
    conn.send_request(&env).await.unwrap();
    conn.recv_response().await.unwrap()
}

fn code(r: &ResponseEnvelope) -> Option<ErrorCode> {
    match &r.body {
        Response::Error(e) => Some(e.code),
        _ => None,
    }
}

#[tokio::test]
async fn version_negotiation() {
    let options = ServeOptions {
        versions: VersionRange { min: 1, max: 3 },
        ..ServeOptions::default()
    };
    // No overlap: refused, and the connection may try again.
    let (mut conn, task) = start(options);
    let r = call(&mut conn, hello(1, 9, VersionRange { min: 7, max: 9 })).await;
    assert_eq!(code(&r), Some(ErrorCode::NoCommonVersion));
    // Overlap: the newest common version wins, whatever the envelope's v.
    let r = call(&mut conn, hello(2, 9, VersionRange { min: 2, max: 9 })).await;
    match &r.body {
        Response::HelloOk(ok) => assert_eq!(ok.version, 3),
        other => panic!("{other:?}"),
    }
    assert_eq!(r.v, 3);
    // From now on the envelope must carry version 3.
    let r = call(
        &mut conn,
        RequestEnvelope {
            v: 2,
            id: 3,
            body: Request::Ping,
        },
    )
    .await;
    assert_eq!(code(&r), Some(ErrorCode::VersionMismatch));
    let r = call(
        &mut conn,
        RequestEnvelope {
            v: 3,
            id: 4,
            body: Request::Ping,
        },
    )
    .await;
    assert_eq!(r.body, Response::Pong);
    // A second hello is refused.
    let r = call(&mut conn, hello(5, 3, VersionRange { min: 1, max: 3 })).await;
    assert_eq!(code(&r), Some(ErrorCode::BadRequest));
    drop(conn);
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn nothing_runs_before_hello() {
    let (mut conn, _task) = start(ServeOptions::default());
    for (id, body) in [
        Request::Prepare,
        Request::Freeze { timeout_ms: 1 },
        Request::Thaw,
        Request::Status,
        Request::Ping,
    ]
    .into_iter()
    .enumerate()
    {
        let r = call(
            &mut conn,
            RequestEnvelope {
                v: 1,
                id: id as u64,
                body,
            },
        )
        .await;
        assert_eq!(code(&r), Some(ErrorCode::HelloRequired));
    }
}

#[tokio::test]
async fn client_reports_no_common_version_and_remote_errors() {
    let (conn, _task) = start(ServeOptions::default());
    let mut client = Client::new(conn);
    client.set_versions(VersionRange { min: 50, max: 60 });
    let err = client.hello("t", "0", &[]).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Remote {
                code: ErrorCode::NoCommonVersion,
                ..
            }
        ),
        "{err:?}"
    );
    client.set_versions(VersionRange::SUPPORTED);
    client.hello("t", "0", &[]).await.unwrap();
    client.freeze(Duration::from_secs(1)).await.unwrap();
    let err = client.freeze(Duration::from_secs(1)).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Remote {
                code: ErrorCode::Busy,
                request: "freeze",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("already frozen"));
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let options = ServeOptions {
        idle_timeout: Some(Duration::from_millis(200)),
        ..ServeOptions::default()
    };
    let (mut conn, task) = start(options);
    let r = conn.recv_response().await.unwrap();
    assert_eq!(code(&r), Some(ErrorCode::Timeout));
    assert!(conn.recv_response().await.unwrap_err().is_closed());
    assert!(matches!(task.await.unwrap(), Err(Error::Timeout { .. })));
}

#[tokio::test]
async fn client_detects_a_reply_with_the_wrong_id() {
    let (client_side, agent_side) = tokio::io::duplex(1 << 16);
    let fake_agent = tokio::spawn(async move {
        let mut conn = Connection::new(agent_side, "controller");
        let req = conn.recv_request().await.unwrap().unwrap();
        conn.send_response(&ResponseEnvelope {
            v: 1,
            id: Some(req.id + 1),
            body: Response::Pong,
        })
        .await
        .unwrap();
    });
    let mut client = Client::new(Connection::new(client_side, "agent"));
    let err = client.ping().await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::IdMismatch {
                expected: 1,
                got: Some(2),
                ..
            }
        ),
        "{err:?}"
    );
    fake_agent.await.unwrap();
}

#[tokio::test]
async fn client_reply_timeout() {
    let (client_side, _agent_side) = tokio::io::duplex(1 << 16);
    let mut client = Client::new(Connection::new(client_side, "agent"));
    client.set_reply_timeout(Some(Duration::from_millis(200)));
    let err = client.ping().await.unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
}
