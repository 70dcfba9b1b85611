//! Property tests of the codec: garbage never panics, every message roundtrips.

#![allow(clippy::unwrap_used)] // test code: a panic is a failure report

use bulwark_consistency::Level;
use bulwark_protocol::{
    AgentIdentity, AgentState, Connection, ErrorCode, ErrorReply, Frozen, Hello, HelloOk,
    MAX_FRAME_LEN, Prepared, Request, RequestEnvelope, Response, ResponseEnvelope, ScriptOutcome,
    ScriptStatus, ServeOptions, StatusReport, Thawed, VersionRange, decode_request,
    decode_response, encode_request, encode_response, read_frame, serve, write_frame,
};
use proptest::prelude::*;
use tokio::io::AsyncWriteExt;

mod common;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![any::<String>(), "[a-z0-9./_-]{0,24}"]
}

fn level() -> impl Strategy<Value = Level> {
    prop::sample::select(Level::ALL.to_vec())
}

fn version_range() -> impl Strategy<Value = VersionRange> {
    (any::<u16>(), any::<u16>()).prop_map(|(min, max)| VersionRange { min, max })
}

fn script_outcome() -> impl Strategy<Value = ScriptOutcome> {
    (
        text(),
        prop::sample::select(vec![
            ScriptStatus::Succeeded,
            ScriptStatus::Failed,
            ScriptStatus::TimedOut,
            ScriptStatus::Refused,
            ScriptStatus::Skipped,
            ScriptStatus::Unknown,
        ]),
        any::<Option<i32>>(),
        any::<u32>(),
        any::<u64>(),
        proptest::option::of(text()),
    )
        .prop_map(
            |(path, status, exit_code, attempts, duration_ms, message)| ScriptOutcome {
                path,
                status,
                exit_code,
                attempts,
                duration_ms,
                message,
            },
        )
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (
            version_range(),
            text(),
            text(),
            prop::collection::vec(text(), 0..4)
        )
            .prop_map(|(versions, client_name, client_version, capabilities)| {
                Request::Hello(Hello {
                    versions,
                    client_name,
                    client_version,
                    capabilities,
                })
            }),
        Just(Request::Prepare),
        any::<u64>().prop_map(|timeout_ms| Request::Freeze { timeout_ms }),
        Just(Request::Thaw),
        Just(Request::Status),
        Just(Request::Ping),
    ]
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop::sample::select(vec![
        ErrorCode::FrameTooLarge,
        ErrorCode::Malformed,
        ErrorCode::UnknownMessage,
        ErrorCode::ReplayedRequestId,
        ErrorCode::HelloRequired,
        ErrorCode::NoCommonVersion,
        ErrorCode::VersionMismatch,
        ErrorCode::BadRequest,
        ErrorCode::Busy,
        ErrorCode::InvalidState,
        ErrorCode::PrepareFailed,
        ErrorCode::FreezeFailed,
        ErrorCode::ThawFailed,
        ErrorCode::Unsupported,
        ErrorCode::Timeout,
        ErrorCode::Internal,
        ErrorCode::Unknown,
    ])
}

fn response() -> impl Strategy<Value = Response> {
    let scripts = || prop::collection::vec(script_outcome(), 0..4);
    let strings = || prop::collection::vec(text(), 0..4);
    prop_oneof![
        (
            any::<u16>(),
            text(),
            text(),
            strings(),
            prop::collection::vec(level(), 0..4)
        )
            .prop_map(|(version, hostname, agent_version, capabilities, levels)| {
                Response::HelloOk(HelloOk {
                    version,
                    agent: AgentIdentity {
                        hostname,
                        agent_version,
                    },
                    capabilities,
                    levels,
                })
            }),
        (scripts(), level(), strings()).prop_map(|(scripts, level, reasons)| {
            Response::Prepared(Prepared {
                scripts,
                level,
                reasons,
            })
        }),
        (strings(), any::<u64>(), any::<u64>()).prop_map(|(mounts, timeout_ms, deadline)| {
            Response::Frozen(Frozen {
                mounts,
                timeout_ms,
                deadline_unix_ms: deadline,
            })
        }),
        (
            any::<bool>(),
            proptest::option::of(text()),
            any::<u64>(),
            scripts()
        )
            .prop_map(|(held_continuously, reason, frozen_for_ms, post_scripts)| {
                Response::Thawed(Thawed {
                    held_continuously,
                    reason,
                    frozen_for_ms,
                    post_scripts,
                })
            }),
        (
            prop::sample::select(vec![
                AgentState::Idle,
                AgentState::Prepared,
                AgentState::Frozen,
                AgentState::Unknown
            ]),
            any::<Option<u64>>(),
            strings()
        )
            .prop_map(|(state, deadline_unix_ms, mounts)| {
                Response::Status(StatusReport {
                    state,
                    deadline_unix_ms,
                    mounts,
                })
            }),
        Just(Response::Pong),
        (error_code(), text())
            .prop_map(|(code, message)| Response::Error(ErrorReply { code, message })),
    ]
}

/// Random JSON values, to fuzz the decoder with inputs that get past the JSON parser.
fn json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        prop::sample::select(vec![
            "hello",
            "prepare",
            "freeze",
            "thaw",
            "status",
            "ping",
            "hello_ok",
            "prepared",
            "frozen",
            "thawed",
            "pong",
            "error",
            "type",
            "v",
            "id",
            "body",
            "versions",
            "timeout_ms",
            "code",
            "state",
            "frozen_for_ms",
        ])
        .prop_map(serde_json::Value::from),
        text().prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            prop::collection::btree_map(
                prop::sample::select(vec![
                    "type",
                    "v",
                    "id",
                    "body",
                    "versions",
                    "min",
                    "max",
                    "timeout_ms",
                    "code",
                    "message",
                    "state",
                    "mounts",
                    "client_name",
                    "client_version",
                    "x",
                ])
                .prop_map(str::to_owned),
                inner,
                0..6
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_request(&bytes, "fuzz");
        let _ = decode_response(&bytes, "fuzz");
    }

    #[test]
    fn decoding_arbitrary_json_never_panics(value in json(), id in any::<u64>(), v in any::<u16>()) {
        let bytes = serde_json::to_vec(&value).unwrap();
        let _ = decode_request(&bytes, "fuzz");
        let _ = decode_response(&bytes, "fuzz");
        // The same value as the body of a valid envelope.
        let wrapped = serde_json::json!({"v": v, "id": id, "body": value});
        let bytes = serde_json::to_vec(&wrapped).unwrap();
        if let Err(e) = decode_request(&bytes, "fuzz") {
            // A valid envelope always keeps its id for the error reply.
            let keeps_id = matches!(e, bulwark_protocol::Error::UnknownMessage { id: got, .. } if got == id);
            prop_assert!(keeps_id, "{e:?}");
        }
        let _ = decode_response(&bytes, "fuzz");
    }

    #[test]
    fn reading_frames_from_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..1024)) {
        rt().block_on(async {
            let mut input: &[u8] = &bytes;
            // Read until the stream is exhausted or an error: never a panic, never a hang.
            while let Ok(Some(payload)) = read_frame(&mut input, "fuzz").await {
                let _ = decode_request(&payload, "fuzz");
            }
        });
    }

    #[test]
    fn serving_arbitrary_bytes_never_panics(
        prefix in prop::collection::vec(request(), 0..3),
        bytes in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        rt().block_on(async {
            let (mut client, agent) = tokio::io::duplex(MAX_FRAME_LEN * 2);
            let server = tokio::spawn(serve(
                Connection::new(agent, "fuzz"),
                common::ToyAgent::new(),
                ServeOptions::default(),
            ));
            for (i, body) in prefix.into_iter().enumerate() {
                let env = RequestEnvelope { v: 1, id: i as u64, body };
                let payload = encode_request(&env, "fuzz").unwrap();
                write_frame(&mut client, &payload, "fuzz").await.unwrap();
            }
            client.write_all(&bytes).await.unwrap();
            client.shutdown().await.unwrap();
            // Drain replies so the agent never blocks on a full pipe.
            let mut conn = Connection::new(client, "fuzz");
            while conn.recv_response().await.is_ok() {}
            // The task ends (Ok or a typed error), it does not panic.
            let joined = server.await;
            assert!(joined.is_ok(), "serve panicked: {joined:?}");
        });
    }

    #[test]
    fn every_request_roundtrips(body in request(), id in any::<u64>(), v in any::<u16>()) {
        let env = RequestEnvelope { v, id, body };
        let back = rt().block_on(async {
            let mut wire = Vec::new();
            write_frame(&mut wire, &encode_request(&env, "t").unwrap(), "t").await.unwrap();
            let mut input: &[u8] = &wire;
            let payload = read_frame(&mut input, "t").await.unwrap().unwrap();
            assert!(input.is_empty());
            decode_request(&payload, "t").unwrap()
        });
        prop_assert_eq!(back, env);
    }

    #[test]
    fn every_response_roundtrips(body in response(), id in any::<Option<u64>>(), v in any::<u16>()) {
        let env = ResponseEnvelope { v, id, body };
        let back = rt().block_on(async {
            let mut wire = Vec::new();
            write_frame(&mut wire, &encode_response(&env, "t").unwrap(), "t").await.unwrap();
            let mut input: &[u8] = &wire;
            let payload = read_frame(&mut input, "t").await.unwrap().unwrap();
            decode_response(&payload, "t").unwrap()
        });
        prop_assert_eq!(back, env);
    }

    #[test]
    fn any_length_above_the_limit_is_rejected(len in (MAX_FRAME_LEN as u32 + 1)..=u32::MAX) {
        // Only the header is available: a reader that tried to read the payload would hit EOF
        // and report `Truncated` instead.
        let header = len.to_be_bytes();
        let err = rt().block_on(async {
            let mut input: &[u8] = &header;
            read_frame(&mut input, "t").await.unwrap_err()
        });
        let rejected = matches!(err, bulwark_protocol::Error::FrameTooLarge { len: l, .. } if l == u64::from(len));
        prop_assert!(rejected, "{err:?}");
    }
}
