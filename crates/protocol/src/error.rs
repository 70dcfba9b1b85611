//! The error type of this crate.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::message::{ErrorCode, VersionRange};

/// Everything that can go wrong, with where (peer, file) and what (frame length, message type).
///
/// `peer` is a label such as `"127.0.0.1:4711"` or `"unix:/run/bulwark/agent.sock"`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing the connection failed.
    #[error("{peer}: I/O error while {action}: {source}")]
    Io {
        /// The peer.
        peer: String,
        /// What we were doing, e.g. `"reading a frame"`.
        action: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A frame's length prefix exceeds the limit. Nothing was allocated.
    #[error("{peer}: frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// The peer.
        peer: String,
        /// The announced payload length.
        len: u64,
        /// The limit.
        max: usize,
    },
    /// The peer closed the connection in the middle of a frame.
    #[error("{peer}: connection closed after {got} of {expected} bytes of a frame {part}")]
    Truncated {
        /// The peer.
        peer: String,
        /// `"header"` or `"payload"`.
        part: &'static str,
        /// Bytes expected.
        expected: usize,
        /// Bytes received.
        got: usize,
    },
    /// The peer closed the connection cleanly, between frames, when a frame was expected.
    #[error("{peer}: connection closed by the peer")]
    Closed {
        /// The peer.
        peer: String,
    },
    /// A frame's payload is not a valid envelope (or, for responses, not a known response).
    #[error("{peer}: malformed {kind} frame of {len} bytes: {source}")]
    Malformed {
        /// The peer.
        peer: String,
        /// `"request"` or `"response"`.
        kind: &'static str,
        /// Payload length.
        len: usize,
        /// The decoder's complaint.
        #[source]
        source: serde_json::Error,
    },
    /// The envelope decoded but its body is not a request we know.
    #[error(
        "{peer}: request id {id}: unknown or invalid message of type {message_type:?}: {source}"
    )]
    UnknownMessage {
        /// The peer.
        peer: String,
        /// The request id from the envelope.
        id: u64,
        /// The `type` field, if there was one.
        message_type: Option<String>,
        /// The decoder's complaint.
        #[source]
        source: serde_json::Error,
    },
    /// Encoding a message produced more than the frame limit.
    #[error("{peer}: {message_type} message encodes to {len} bytes, over the limit of {max}")]
    MessageTooLarge {
        /// The peer.
        peer: String,
        /// The message type.
        message_type: &'static str,
        /// Encoded length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Encoding a message failed (should not happen for the types of this crate).
    #[error("{peer}: cannot encode {message_type} message: {source}")]
    Encode {
        /// The peer.
        peer: String,
        /// The message type.
        message_type: &'static str,
        /// The encoder's complaint.
        #[source]
        source: serde_json::Error,
    },
    /// A request id was not greater than the previous one on this connection.
    #[error("{peer}: request id {id} of {message_type} is not greater than the previous id {last}")]
    ReplayedRequestId {
        /// The peer.
        peer: String,
        /// The offending id.
        id: u64,
        /// The last accepted id.
        last: u64,
        /// The message type of the rejected request.
        message_type: String,
    },
    /// The reply carries another id than the request.
    #[error("{peer}: reply {message_type} has id {got:?}, expected {expected}")]
    IdMismatch {
        /// The peer.
        peer: String,
        /// The id sent.
        expected: u64,
        /// The id received.
        got: Option<u64>,
        /// The reply's message type.
        message_type: &'static str,
    },
    /// The agent answered with an [`ErrorReply`](crate::ErrorReply).
    #[error("{peer}: agent refused {request}: {code}: {message}")]
    Remote {
        /// The peer.
        peer: String,
        /// The request's message type.
        request: &'static str,
        /// The agent's error code.
        code: ErrorCode,
        /// The agent's message.
        message: String,
    },
    /// The agent answered with a response that does not fit the request.
    #[error("{peer}: unexpected reply {got} to {request}")]
    UnexpectedResponse {
        /// The peer.
        peer: String,
        /// The request's message type.
        request: &'static str,
        /// The reply's message type.
        got: &'static str,
    },
    /// The version ranges of both sides do not overlap.
    #[error("{peer}: no common protocol version: we speak {ours}, the peer speaks {theirs}")]
    NoCommonVersion {
        /// The peer.
        peer: String,
        /// Our range.
        ours: VersionRange,
        /// The peer's range.
        theirs: VersionRange,
    },
    /// Something was not done in time.
    #[error("{peer}: timed out after {after:?} while {action}")]
    Timeout {
        /// The peer.
        peer: String,
        /// What we were doing.
        action: &'static str,
        /// The limit that expired.
        after: Duration,
    },
    /// The TLS handshake failed: the peer's certificate was refused, it sent none, or the
    /// connection broke during the handshake.
    #[error("{peer}: TLS handshake failed: {source}")]
    Handshake {
        /// The peer.
        peer: String,
        /// The cause (rustls errors are wrapped in `io::Error`).
        #[source]
        source: io::Error,
    },
    /// The name to verify the agent's certificate against is not a valid DNS name or IP.
    #[error("invalid server name {name:?}: {message}")]
    InvalidServerName {
        /// The name.
        name: String,
        /// Why.
        message: String,
    },
    /// Building a TLS configuration failed.
    #[error("TLS configuration ({what}): {source}")]
    TlsConfig {
        /// Which part.
        what: &'static str,
        /// The cause.
        #[source]
        source: rustls::Error,
    },
    /// Building the client certificate verifier failed (e.g. no usable CA certificate).
    #[error("TLS client verifier: {0}")]
    ClientVerifier(#[from] rustls::server::VerifierBuilderError),
    /// A PEM file could not be read or holds nothing usable.
    #[error("{}: {what}: {message}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What we looked for, e.g. `"CA certificate"`.
        what: &'static str,
        /// Why it failed.
        message: String,
    },
    /// A file operation failed (enrollment, socket creation).
    #[error("{}: {action}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What we were doing.
        action: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// An argument was rejected (e.g. an agent name with a `/`).
    #[error("invalid {what} {value:?}: {message}")]
    InvalidArgument {
        /// What the argument is.
        what: &'static str,
        /// Its value.
        value: String,
        /// Why it is refused.
        message: String,
    },
    /// Certificate or key generation failed.
    #[error("certificate generation ({what}): {source}")]
    CertGen {
        /// What we were generating.
        what: &'static str,
        /// The cause.
        #[source]
        source: rcgen::Error,
    },
}

impl Error {
    /// The error code to send to the peer when this error happened while serving it, if the
    /// error is the peer's fault and a reply still makes sense.
    pub(crate) fn reply_code(&self) -> Option<ErrorCode> {
        match self {
            Error::FrameTooLarge { .. } => Some(ErrorCode::FrameTooLarge),
            Error::Malformed { .. } => Some(ErrorCode::Malformed),
            Error::UnknownMessage { .. } => Some(ErrorCode::UnknownMessage),
            Error::ReplayedRequestId { .. } => Some(ErrorCode::ReplayedRequestId),
            Error::Timeout { .. } => Some(ErrorCode::Timeout),
            _ => None,
        }
    }

    /// Whether this is a clean close by the peer between frames.
    pub fn is_closed(&self) -> bool {
        matches!(self, Error::Closed { .. })
    }
}
