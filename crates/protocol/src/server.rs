//! The agent side: a request loop that enforces the protocol rules and hands valid requests to
//! a [`Handler`].

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::codec::Connection;
use crate::error::Error;
use crate::message::{
    ErrorCode, ErrorReply, Hello, HelloOk, Request, Response, ResponseEnvelope, VersionRange,
};

/// What the agent does with requests. [`serve`] calls it only for requests that passed every
/// protocol check (authenticated transport, increasing id, version agreed).
///
/// Implement it with `async fn`; the futures must be `Send` so connections can be spawned.
/// One value serves one connection; share state between connections (the freeze lock, the
/// watchdog) through an `Arc` inside.
pub trait Handler: Send {
    /// Answers a `Hello` whose version range overlaps ours. The `version` of the returned
    /// [`HelloOk`] is overwritten with `version`, the agreed one. Return an error to refuse
    /// the client.
    fn hello(
        &mut self,
        hello: &Hello,
        version: u16,
    ) -> impl Future<Output = Result<HelloOk, ErrorReply>> + Send;

    /// Answers any request other than `Hello`. Return [`Response::Error`] for failures.
    fn handle(&mut self, request: Request) -> impl Future<Output = Response> + Send;
}

/// Settings of [`serve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeOptions {
    /// The protocol versions offered.
    pub versions: VersionRange,
    /// Close a connection that sends no complete frame for this long (a frozen agent must not
    /// wait forever on a vanished controller; the watchdog is the real guard). `None`: never.
    pub idle_timeout: Option<Duration>,
    /// Limit of a TLS handshake in the listeners' `run` loops, and of the time from the start
    /// of [`serve`] to a successful `Hello`: a connection that has not agreed a version by
    /// then is closed.
    pub handshake_timeout: Duration,
    /// How many accepted connections may be in their TLS handshake at once (not yet
    /// authenticated) in [`TlsListener::run`](crate::TlsListener::run); more are closed at
    /// once, without a task each.
    pub max_unauthenticated: usize,
}

impl Default for ServeOptions {
    /// All supported versions, 5 minutes idle timeout, 10 seconds handshake timeout, 32
    /// unauthenticated connections.
    fn default() -> ServeOptions {
        ServeOptions {
            versions: VersionRange::SUPPORTED,
            idle_timeout: Some(Duration::from_secs(300)),
            handshake_timeout: Duration::from_secs(10),
            max_unauthenticated: 32,
        }
    }
}

/// How long a best-effort error reply before closing may take.
const ERROR_REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves one connection until the peer closes it or breaks the protocol.
///
/// Rules, in order, for every frame:
/// 1. A length prefix above [`MAX_FRAME_LEN`](crate::MAX_FRAME_LEN), a payload that is not an
///    envelope, or a close in the middle of a frame: the framing can no longer be trusted, so
///    an `Error` reply (`frame_too_large` / `malformed`, id `null`) is sent if possible and the
///    connection is **closed**; `serve` returns that error.
/// 2. An envelope whose body is not a known request: `unknown_message` reply with its id, the
///    connection **stays open** (a newer controller may try a newer message).
/// 3. An id not strictly greater than the previous one: `replayed_request_id`, the request is
///    **not executed**, the connection stays open.
/// 4. Before a successful `Hello`, anything else gets `hello_required`; a `Hello` without a
///    common version gets `no_common_version`; a second `Hello` gets `bad_request`.
/// 5. After `Hello`, an envelope version other than the agreed one gets `version_mismatch`.
/// 6. Otherwise the [`Handler`] answers.
///
/// Returns `Ok(())` when the peer closed cleanly between frames.
pub async fn serve<S, H>(
    mut conn: Connection<S>,
    mut handler: H,
    options: ServeOptions,
) -> Result<(), Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
    H: Handler,
{
    let mut last_id: Option<u64> = None;
    let mut agreed: Option<u16> = None;
    let hello_by = tokio::time::Instant::now() + options.handshake_timeout;
    loop {
        // Before `Hello` the connection has until `hello_by`; after, `idle_timeout` per request.
        let limit = match agreed {
            None => Some((
                hello_by.saturating_duration_since(tokio::time::Instant::now()),
                "waiting for hello",
            )),
            Some(_) => options.idle_timeout.map(|t| (t, "waiting for a request")),
        };
        let received = match limit {
            None => conn.recv_request().await,
            Some((after, action)) => tokio::time::timeout(after, conn.recv_request())
                .await
                .unwrap_or_else(|_| {
                    Err(Error::Timeout {
                        peer: conn.peer().to_owned(),
                        action,
                        after,
                    })
                }),
        };
        let reply_v = agreed.unwrap_or(options.versions.max);
        let envelope = match received {
            Ok(Some(envelope)) => envelope,
            Ok(None) => {
                tracing::debug!(peer = conn.peer(), "connection closed by the peer");
                return Ok(());
            }
            Err(Error::UnknownMessage {
                peer,
                id,
                message_type,
                source,
            }) => {
                tracing::warn!(%peer, id, ?message_type, error = ?source, "unknown request");
                let body = if last_id.is_some_and(|last| id <= last) {
                    replayed(id, last_id)
                } else {
                    last_id = Some(id);
                    Response::error(
                        ErrorCode::UnknownMessage,
                        format!(
                            "unknown or invalid request of type {}: {source}",
                            message_type.as_deref().unwrap_or("(none)")
                        ),
                    )
                };
                send(&mut conn, reply_v, Some(id), body).await?;
                continue;
            }
            Err(e) => {
                if let Some(code) = e.reply_code() {
                    tracing::warn!(error = ?e, "closing the connection after a bad frame");
                    let reply = send(
                        &mut conn,
                        reply_v,
                        None,
                        Response::error(code, e.to_string()),
                    );
                    let _ = tokio::time::timeout(ERROR_REPLY_TIMEOUT, reply).await;
                    let _ = tokio::time::timeout(ERROR_REPLY_TIMEOUT, conn.shutdown()).await;
                }
                return Err(e);
            }
        };

        let id = envelope.id;
        let request_type = envelope.body.name();
        if last_id.is_some_and(|last| id <= last) {
            tracing::warn!(
                peer = conn.peer(),
                id,
                last = last_id,
                request = request_type,
                "replayed or out-of-order request id"
            );
            send(&mut conn, reply_v, Some(id), replayed(id, last_id)).await?;
            continue;
        }
        last_id = Some(id);
        tracing::debug!(peer = conn.peer(), id, request = request_type, "request");

        let body = match (agreed, envelope.body) {
            (None, Request::Hello(hello)) => match options.versions.negotiate(hello.versions) {
                None => Response::error(
                    ErrorCode::NoCommonVersion,
                    format!(
                        "the agent speaks protocol versions {}, the client {}",
                        options.versions, hello.versions
                    ),
                ),
                Some(version) => match handler.hello(&hello, version).await {
                    Ok(mut ok) => {
                        ok.version = version;
                        agreed = Some(version);
                        tracing::info!(
                            peer = conn.peer(),
                            version,
                            client = ?hello.client_name,
                            client_version = ?hello.client_version,
                            "hello"
                        );
                        Response::HelloOk(ok)
                    }
                    Err(e) => Response::Error(e),
                },
            },
            (None, other) => Response::error(
                ErrorCode::HelloRequired,
                format!("{} before hello", other.name()),
            ),
            (Some(_), Request::Hello(_)) => Response::error(
                ErrorCode::BadRequest,
                "the version was already agreed on this connection",
            ),
            (Some(version), other) if envelope.v != version => Response::error(
                ErrorCode::VersionMismatch,
                format!(
                    "{} carries version {}, the agreed version is {version}",
                    other.name(),
                    envelope.v
                ),
            ),
            (Some(_), other) => handler.handle(other).await,
        };
        if let Response::Error(e) = &body {
            tracing::debug!(peer = conn.peer(), id, request = request_type, code = %e.code, message = ?e.message, "error reply");
        }
        send(&mut conn, agreed.unwrap_or(reply_v), Some(id), body).await?;
    }
}

fn replayed(id: u64, last: Option<u64>) -> Response {
    Response::error(
        ErrorCode::ReplayedRequestId,
        format!(
            "request id {id} is not greater than the previous id {}",
            last.unwrap_or(0)
        ),
    )
}

async fn send<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    v: u16,
    id: Option<u64>,
    body: Response,
) -> Result<(), Error> {
    conn.send_response(&ResponseEnvelope { v, id, body }).await
}
