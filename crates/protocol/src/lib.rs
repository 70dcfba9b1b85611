//! bulwark-protocol: the controller ↔ guest-agent protocol.
//!
//! - **Wire format**: each frame is a `u32` big-endian payload length followed by the payload,
//!   at most [`MAX_FRAME_LEN`] (64 KiB) bytes, checked before anything is allocated. The
//!   payload is a JSON envelope: `{"v":1,"id":7,"body":{"type":"freeze","timeout_ms":30000}}`
//!   for a [`RequestEnvelope`], `{"v":1,"id":7,"body":{"type":"frozen",...}}` for a
//!   [`ResponseEnvelope`] (`id` is `null` when answering a frame that could not be decoded).
//! - **Messages**: [`Request`] (`hello`, `prepare`, `freeze`, `thaw`, `status`, `ping`) and
//!   [`Response`] (`hello_ok`, `prepared`, `frozen`, `thawed`, `status`, `pong`, `error`).
//!   See [`message`] for the evolution rules (unknown fields, capabilities and enum values are
//!   tolerated).
//! - **Rules** enforced by [`serve`] on the agent: `Hello` first with version negotiation,
//!   request ids strictly increasing per connection, bad frames answered with an `error`
//!   reply (and the connection closed when the framing is broken).
//! - **Transports**: TCP with mutual TLS ([`server_config`], [`client_config`],
//!   [`connect_tcp`], [`TlsListener`]), Unix socket with mode 0600 ([`UnixSocketListener`],
//!   [`connect_unix`]), a virtio-serial port in the guest reached through QEMU's chardev socket
//!   on the host ([`VirtioPortListener`], [`connect_virtio_serial`]; see the `virtio` module
//!   docs for its session sync and what it authenticates), or any `AsyncRead + AsyncWrite` stream via [`Connection::new`].
//! - **Enrollment**: the controller's CA and the certificates it issues ([`ensure_ca`],
//!   [`enroll_agent`], [`enroll_controller`], [`CertificateAuthority`]).
//!
//! This crate only frames and checks; what `Prepare`, `Freeze` and `Thaw` do is the agent's
//! [`Handler`].
//!
//! # Example
//!
//! A request and its reply over an in-memory stream (the same code runs over TLS or a Unix
//! socket):
//!
//! ```
//! use bulwark_protocol::{
//!     AgentIdentity, Client, Connection, ErrorReply, Handler, Hello, HelloOk, Request, Response,
//!     ServeOptions, CAP_FSFREEZE, serve,
//! };
//!
//! struct Agent;
//!
//! impl Handler for Agent {
//!     async fn hello(&mut self, _hello: &Hello, version: u16) -> Result<HelloOk, ErrorReply> {
//!         Ok(HelloOk {
//!             version,
//!             agent: AgentIdentity { hostname: "web1".into(), agent_version: "0.1.0".into() },
//!             capabilities: vec![CAP_FSFREEZE.into()],
//!             levels: vec![bulwark_consistency::Level::Crash, bulwark_consistency::Level::FileSystem],
//!         })
//!     }
//!     async fn handle(&mut self, request: Request) -> Response {
//!         match request {
//!             Request::Ping => Response::Pong,
//!             other => Response::error(
//!                 bulwark_protocol::ErrorCode::Unsupported,
//!                 format!("{} is not implemented here", other.name()),
//!             ),
//!         }
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), bulwark_protocol::Error> {
//! let (controller_side, agent_side) = tokio::io::duplex(64 * 1024);
//! let agent = tokio::spawn(serve(
//!     Connection::new(agent_side, "controller"),
//!     Agent,
//!     ServeOptions::default(),
//! ));
//!
//! let mut client = Client::new(Connection::new(controller_side, "agent"));
//! let hello = client.hello("bulwark-controller", "0.1.0", &[]).await?;
//! assert_eq!(hello.agent.hostname, "web1");
//! assert!(hello.has_capability(CAP_FSFREEZE));
//! client.ping().await?;
//! let err = client.prepare().await.unwrap_err();
//! assert!(matches!(err, bulwark_protocol::Error::Remote { .. }));
//!
//! drop(client); // closes the stream: the agent's serve() returns Ok(())
//! agent.await.expect("agent task").expect("clean close");
//! # Ok(()) }
//! ```
//!
//! Over TCP the controller does
//! `Client::new(connect_tcp(addr, "web1.example.org", client_config(&files)?).await?)`, and the
//! agent `TlsListener::bind(addr, server_config(&files)?).await?.run(options, |_peer| handler)`.

mod client;
mod codec;
mod enroll;
mod error;
pub mod message;
mod server;
mod tls;
mod unix;
mod virtio;

pub use client::Client;
pub use codec::{
    Connection, FRAME_HEADER_LEN, MAX_FRAME_LEN, decode_request, decode_response, encode_request,
    encode_response, read_frame, write_frame,
};
pub use enroll::{
    CA_CERT_FILE, CA_KEY_FILE, CA_VALIDITY, CLOCK_SKEW, CaFiles, CertificateAuthority, Enrollment,
    IssuedCert, LEAF_VALIDITY, enroll, enroll_agent, enroll_controller, ensure_ca,
};
pub use error::Error;
pub use message::{
    AgentIdentity, AgentState, CAP_FSFREEZE, CAP_SCRIPTS, CAP_WATCHDOG, ErrorCode, ErrorReply,
    Frozen, Hello, HelloOk, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN, Prepared, Request,
    RequestEnvelope, Response, ResponseEnvelope, ScriptOutcome, ScriptStatus, StatusReport, Thawed,
    VersionRange,
};
pub use server::{Handler, ServeOptions, serve};
pub use tls::{
    CONNECT_TIMEOUT, ClientTlsStream, PendingTls, ServerTlsStream, TlsFiles, TlsListener,
    client_config, connect_tcp, server_config,
};
pub use unix::{SOCKET_MODE, UnixSocketListener, connect_unix};
pub use virtio::{
    NONCE_LEN, SYNC_ACK, SYNC_DISCARD_LIMIT, SYNC_MAGIC, SYNC_TIMEOUT, VIRTIO_PORTS_DIR,
    VirtioPortListener, connect_virtio_serial, find_port,
};

/// Re-exported so that users can name TLS types without depending on rustls themselves.
pub use rustls;
