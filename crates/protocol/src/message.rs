//! The messages: requests (controller → agent), responses (agent → controller) and the
//! envelopes that carry them in a frame.
//!
//! Evolution rules, so that old and new peers keep talking:
//! - unknown JSON fields are ignored, and every field added after version 1 must carry
//!   `#[serde(default)]`;
//! - capabilities are free-form strings; a peer ignores the ones it does not know;
//! - the enums that describe states and outcomes have an `Unknown` catch-all, so a new value
//!   from a newer peer decodes instead of failing the whole message;
//! - the shape of [`Hello`] and [`HelloOk`] is frozen forever: they are exchanged before a
//!   version is agreed.

use std::fmt;

use bulwark_consistency::Level;
use serde::{Deserialize, Serialize};

/// The oldest protocol version this crate speaks.
pub const PROTOCOL_VERSION_MIN: u16 = 1;
/// The newest protocol version this crate speaks.
pub const PROTOCOL_VERSION_MAX: u16 = 1;

/// Capability: the agent can freeze file systems (FIFREEZE).
pub const CAP_FSFREEZE: &str = "fsfreeze";
/// Capability: the agent runs pre/post scripts from its own config (application consistency).
pub const CAP_SCRIPTS: &str = "scripts";
/// Capability: the agent has a watchdog that thaws at the freeze deadline on its own.
pub const CAP_WATCHDOG: &str = "watchdog";

/// An inclusive range of protocol versions, `min..=max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VersionRange {
    /// Oldest version spoken.
    pub min: u16,
    /// Newest version spoken.
    pub max: u16,
}

impl VersionRange {
    /// The versions this crate speaks: [`PROTOCOL_VERSION_MIN`]`..=`[`PROTOCOL_VERSION_MAX`].
    pub const SUPPORTED: VersionRange = VersionRange {
        min: PROTOCOL_VERSION_MIN,
        max: PROTOCOL_VERSION_MAX,
    };

    /// The newest version both ranges contain, or `None` if they do not overlap (or one of
    /// them is empty, `min > max`).
    ///
    /// ```
    /// use bulwark_protocol::VersionRange;
    /// let ours = VersionRange { min: 1, max: 3 };
    /// assert_eq!(ours.negotiate(VersionRange { min: 2, max: 5 }), Some(3));
    /// assert_eq!(ours.negotiate(VersionRange { min: 4, max: 5 }), None);
    /// ```
    pub fn negotiate(self, theirs: VersionRange) -> Option<u16> {
        let lo = self.min.max(theirs.min);
        let hi = self.max.min(theirs.max);
        (lo <= hi).then_some(hi)
    }

    /// Whether `version` lies in the range.
    pub fn contains(self, version: u16) -> bool {
        self.min <= version && version <= self.max
    }
}

impl fmt::Display for VersionRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..={}", self.min, self.max)
    }
}

/// A request, sent by the controller (client) to the agent (server).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// First message of every connection: version range and who is asking. Answered by
    /// [`Response::HelloOk`] or [`Response::Error`] ([`ErrorCode::NoCommonVersion`]).
    Hello(Hello),
    /// Run the pre-scripts (application consistency). Answered by [`Response::Prepared`].
    Prepare,
    /// Freeze the configured mounts and arm the watchdog. Answered by [`Response::Frozen`].
    Freeze {
        /// How long the freeze may last before the agent's watchdog thaws on its own. The
        /// agent may cap it; the effective value is in [`Frozen::timeout_ms`].
        timeout_ms: u64,
    },
    /// Thaw (idempotent) and run the post-scripts. Answered by [`Response::Thawed`].
    Thaw,
    /// Where the agent stands. Answered by [`Response::Status`].
    Status,
    /// Liveness check. Answered by [`Response::Pong`].
    Ping,
}

impl Request {
    /// The wire name of the message type (`"hello"`, `"freeze"`, ...), for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Hello(_) => "hello",
            Request::Prepare => "prepare",
            Request::Freeze { .. } => "freeze",
            Request::Thaw => "thaw",
            Request::Status => "status",
            Request::Ping => "ping",
        }
    }
}

/// The body of [`Request::Hello`]. Frozen shape: see the module docs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol versions the client speaks.
    pub versions: VersionRange,
    /// Client program name, e.g. `"bulwark-controller"`.
    pub client_name: String,
    /// Client program version, e.g. `"0.1.0"`.
    pub client_version: String,
    /// Client capabilities. Unknown strings are ignored.
    #[serde(default)]
    pub capabilities: Vec<String>,
}

/// A response, sent by the agent (server) to the controller (client).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    /// Answer to [`Request::Hello`]: a version was agreed.
    HelloOk(HelloOk),
    /// Answer to [`Request::Prepare`].
    Prepared(Prepared),
    /// Answer to [`Request::Freeze`]: the mounts are frozen until the deadline.
    Frozen(Frozen),
    /// Answer to [`Request::Thaw`].
    Thawed(Thawed),
    /// Answer to [`Request::Status`].
    Status(StatusReport),
    /// Answer to [`Request::Ping`].
    Pong,
    /// Any request can be answered by an error instead; so is any bad frame.
    Error(ErrorReply),
}

impl Response {
    /// The wire name of the message type (`"hello_ok"`, `"error"`, ...), for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Response::HelloOk(_) => "hello_ok",
            Response::Prepared(_) => "prepared",
            Response::Frozen(_) => "frozen",
            Response::Thawed(_) => "thawed",
            Response::Status(_) => "status",
            Response::Pong => "pong",
            Response::Error(_) => "error",
        }
    }

    /// Shorthand for `Response::Error(ErrorReply::new(code, message))`.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Response {
        Response::Error(ErrorReply::new(code, message))
    }
}

/// The body of [`Response::HelloOk`]. Frozen shape: see the module docs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloOk {
    /// The version chosen: the newest one both sides speak. Every later envelope on this
    /// connection carries it.
    pub version: u16,
    /// Who answered.
    pub agent: AgentIdentity,
    /// What the agent can do, e.g. [`CAP_FSFREEZE`], [`CAP_SCRIPTS`]. Unknown strings are
    /// ignored.
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// The consistency levels the agent can offer with its current configuration.
    #[serde(default)]
    pub levels: Vec<Level>,
}

impl HelloOk {
    /// Whether the agent announced capability `cap`.
    pub fn has_capability(&self, cap: &str) -> bool {
        self.capabilities.iter().any(|c| c == cap)
    }
}

/// Who the agent is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentIdentity {
    /// The guest's host name.
    pub hostname: String,
    /// The agent program version.
    pub agent_version: String,
}

/// The body of [`Response::Prepared`]: what the pre-scripts did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prepared {
    /// One outcome per configured pre-script, in the order they ran.
    #[serde(default)]
    pub scripts: Vec<ScriptOutcome>,
    /// The best level still reachable after the pre-scripts: `Application` if they all
    /// succeeded, lower if one failed with continue-on-failure or scripts were refused.
    pub level: Level,
    /// Why `level` is lower than `Application`, one entry per cause.
    #[serde(default)]
    pub reasons: Vec<String>,
}

/// The outcome of one pre- or post-script.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScriptOutcome {
    /// The script path from the agent's config (the controller never sends scripts).
    pub path: String,
    /// How it ended.
    pub status: ScriptStatus,
    /// Exit code of the last attempt, if it exited.
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// Attempts made (retries + 1).
    #[serde(default)]
    pub attempts: u32,
    /// Total time spent, all attempts.
    #[serde(default)]
    pub duration_ms: u64,
    /// Human-readable detail (stderr tail, refusal reason).
    #[serde(default)]
    pub message: Option<String>,
}

/// How a script ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScriptStatus {
    /// Exited 0.
    Succeeded,
    /// Exited non-zero or was killed.
    Failed,
    /// Ran past its timeout and was killed.
    TimedOut,
    /// Not run: unsafe ownership or permissions.
    Refused,
    /// Not run: e.g. an earlier script failed without continue-on-failure.
    Skipped,
    /// A status this version does not know (sent by a newer peer).
    #[serde(other)]
    Unknown,
}

/// The body of [`Response::Frozen`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frozen {
    /// The mount points frozen, in the order they were frozen.
    pub mounts: Vec<String>,
    /// The effective timeout (the requested one, possibly capped by the agent).
    pub timeout_ms: u64,
    /// When the watchdog thaws on its own: milliseconds since the Unix epoch, agent clock.
    pub deadline_unix_ms: u64,
}

/// The body of [`Response::Thawed`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Thawed {
    /// Whether the mounts stayed frozen from `Frozen` until this thaw. `false` if the
    /// watchdog fired first, a thaw failed part-way, or nothing was frozen: the point must
    /// then be downgraded to Crash.
    pub held_continuously: bool,
    /// Why `held_continuously` is false.
    #[serde(default)]
    pub reason: Option<String>,
    /// How long the mounts were frozen.
    #[serde(default)]
    pub frozen_for_ms: u64,
    /// One outcome per configured post-script, in the order they ran.
    #[serde(default)]
    pub post_scripts: Vec<ScriptOutcome>,
}

/// The body of [`Response::Status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// Where the agent stands.
    pub state: AgentState,
    /// The watchdog deadline while frozen: milliseconds since the Unix epoch, agent clock.
    #[serde(default)]
    pub deadline_unix_ms: Option<u64>,
    /// The mounts currently frozen.
    #[serde(default)]
    pub mounts: Vec<String>,
}

/// The agent's state machine: `Idle` → `Prepared` → `Frozen` → `Idle`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentState {
    /// Nothing in progress.
    Idle,
    /// Pre-scripts ran; waiting for `Freeze` (or `Thaw` to run the post-scripts).
    Prepared,
    /// Mounts frozen; the watchdog is armed.
    Frozen,
    /// A state this version does not know (sent by a newer peer).
    #[serde(other)]
    Unknown,
}

/// The body of [`Response::Error`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// Machine-readable category.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub message: String,
}

impl ErrorReply {
    /// An error reply.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrorReply {
        ErrorReply {
            code,
            message: message.into(),
        }
    }
}

/// Machine-readable error categories of [`ErrorReply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame's length prefix exceeds [`MAX_FRAME_LEN`](crate::MAX_FRAME_LEN). The
    /// connection is closed.
    FrameTooLarge,
    /// The payload is not a valid envelope (not JSON, missing `v`/`id`). The connection is
    /// closed.
    Malformed,
    /// The envelope is fine but the body is not a request this agent knows (unknown `type`,
    /// missing or mistyped fields). The connection stays open.
    UnknownMessage,
    /// The request id is not greater than the previous one on this connection. The request
    /// was not executed; the connection stays open.
    ReplayedRequestId,
    /// A request other than `Hello` arrived before the version was agreed.
    HelloRequired,
    /// `Hello` carried a version range that does not overlap the agent's.
    NoCommonVersion,
    /// The envelope's version is not the one agreed in `Hello`.
    VersionMismatch,
    /// The request is well formed but not acceptable (e.g. a second `Hello`).
    BadRequest,
    /// Another operation (e.g. a freeze from another connection) holds the lock.
    Busy,
    /// The request does not fit the current state (e.g. `Freeze` while frozen).
    InvalidState,
    /// `Prepare` failed and the agent cannot continue.
    PrepareFailed,
    /// `Freeze` failed; the agent thawed whatever it had frozen.
    FreezeFailed,
    /// `Thaw` failed.
    ThawFailed,
    /// The agent does not support this request (capability missing or disabled in its config).
    Unsupported,
    /// The agent timed out waiting for the peer.
    Timeout,
    /// A bug or unexpected condition in the agent.
    Internal,
    /// A code this version does not know (sent by a newer peer).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The wire name, e.g. `"replayed_request_id"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::Malformed => "malformed",
            ErrorCode::UnknownMessage => "unknown_message",
            ErrorCode::ReplayedRequestId => "replayed_request_id",
            ErrorCode::HelloRequired => "hello_required",
            ErrorCode::NoCommonVersion => "no_common_version",
            ErrorCode::VersionMismatch => "version_mismatch",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Busy => "busy",
            ErrorCode::InvalidState => "invalid_state",
            ErrorCode::PrepareFailed => "prepare_failed",
            ErrorCode::FreezeFailed => "freeze_failed",
            ErrorCode::ThawFailed => "thaw_failed",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Internal => "internal",
            ErrorCode::Unknown => "unknown",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request as it travels: `{"v": 1, "id": 7, "body": {"type": "ping"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestEnvelope {
    /// Protocol version of the body. For `Hello`, any version the client speaks (the shape of
    /// `Hello` never changes); afterwards exactly the agreed version.
    pub v: u16,
    /// Request id: strictly increasing within a connection (the server rejects anything else).
    pub id: u64,
    /// The request.
    pub body: Request,
}

/// A response as it travels: `{"v": 1, "id": 7, "body": {"type": "pong"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseEnvelope {
    /// Protocol version of the body: the agreed one, or before agreement the server's newest.
    pub v: u16,
    /// The id of the request answered; `None` when the request could not be decoded far
    /// enough to learn it.
    pub id: Option<u64>,
    /// The response.
    pub body: Response,
}
