//! The controller side: typed calls over a [`Connection`].

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::codec::Connection;
use crate::error::Error;
use crate::message::{
    Frozen, Hello, HelloOk, Prepared, Request, RequestEnvelope, Response, StatusReport, Thawed,
    VersionRange,
};

/// A controller's connection to an agent: numbers the requests, matches the replies and turns
/// them into typed results.
///
/// Call [`hello`](Client::hello) first; the agent refuses everything else before it. After any
/// error other than [`Error::Remote`] the connection should be dropped: the stream may be out
/// of step.
#[derive(Debug)]
pub struct Client<S> {
    conn: Connection<S>,
    next_id: u64,
    version: u16,
    versions: VersionRange,
    reply_timeout: Option<Duration>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// Wraps a connection. Ids start at 1; no reply timeout.
    pub fn new(conn: Connection<S>) -> Client<S> {
        Client {
            conn,
            next_id: 1,
            version: crate::PROTOCOL_VERSION_MAX,
            versions: VersionRange::SUPPORTED,
            reply_timeout: None,
        }
    }

    /// Limits how long each call waits for its reply ([`Error::Timeout`] after that). Keep it
    /// above the agent's script timeouts: `Prepare` and `Thaw` run scripts.
    pub fn set_reply_timeout(&mut self, timeout: Option<Duration>) {
        self.reply_timeout = timeout;
    }

    /// Offers another version range in [`hello`](Client::hello) (tests, staged upgrades).
    pub fn set_versions(&mut self, versions: VersionRange) {
        self.versions = versions;
    }

    /// The peer label.
    pub fn peer(&self) -> &str {
        self.conn.peer()
    }

    /// The version in use: the agreed one after `hello`.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// The underlying connection (e.g. to send hand-made envelopes in tests).
    pub fn connection_mut(&mut self) -> &mut Connection<S> {
        &mut self.conn
    }

    /// Unwraps the connection.
    pub fn into_inner(self) -> Connection<S> {
        self.conn
    }

    /// Negotiates the version. Fails with [`Error::Remote`] (code `no_common_version`) when the
    /// agent speaks no version of ours, and with [`Error::NoCommonVersion`] if the agent
    /// chose a version outside our range.
    pub async fn hello(
        &mut self,
        client_name: &str,
        client_version: &str,
        capabilities: &[&str],
    ) -> Result<HelloOk, Error> {
        let hello = Hello {
            versions: self.versions,
            client_name: client_name.to_owned(),
            client_version: client_version.to_owned(),
            capabilities: capabilities.iter().map(|c| (*c).to_owned()).collect(),
        };
        // Hello travels with our newest version; its shape is the same in every version.
        self.version = self.versions.max;
        match self.call(Request::Hello(hello)).await? {
            Response::HelloOk(ok) if self.versions.contains(ok.version) => {
                self.version = ok.version;
                Ok(ok)
            }
            Response::HelloOk(ok) => Err(Error::NoCommonVersion {
                peer: self.peer().to_owned(),
                ours: self.versions,
                theirs: VersionRange {
                    min: ok.version,
                    max: ok.version,
                },
            }),
            other => Err(self.unexpected("hello", other)),
        }
    }

    /// Asks the agent to run its pre-scripts.
    pub async fn prepare(&mut self) -> Result<Prepared, Error> {
        match self.call(Request::Prepare).await? {
            Response::Prepared(p) => Ok(p),
            other => Err(self.unexpected("prepare", other)),
        }
    }

    /// Asks the agent to freeze its mounts for at most `timeout` (millisecond precision).
    pub async fn freeze(&mut self, timeout: Duration) -> Result<Frozen, Error> {
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        match self.call(Request::Freeze { timeout_ms }).await? {
            Response::Frozen(f) => Ok(f),
            other => Err(self.unexpected("freeze", other)),
        }
    }

    /// Asks the agent to thaw and run its post-scripts.
    pub async fn thaw(&mut self) -> Result<Thawed, Error> {
        match self.call(Request::Thaw).await? {
            Response::Thawed(t) => Ok(t),
            other => Err(self.unexpected("thaw", other)),
        }
    }

    /// Asks the agent where it stands.
    pub async fn status(&mut self) -> Result<StatusReport, Error> {
        match self.call(Request::Status).await? {
            Response::Status(s) => Ok(s),
            other => Err(self.unexpected("status", other)),
        }
    }

    /// Checks that the agent answers.
    pub async fn ping(&mut self) -> Result<(), Error> {
        match self.call(Request::Ping).await? {
            Response::Pong => Ok(()),
            other => Err(self.unexpected("ping", other)),
        }
    }

    /// Sends `request` with the next id and waits for its reply. The reply is returned as is,
    /// including [`Response::Error`]; the typed methods above turn that into
    /// [`Error::Remote`].
    pub async fn call(&mut self, request: Request) -> Result<Response, Error> {
        let id = self.next_id;
        self.next_id = self.next_id.saturating_add(1);
        let envelope = RequestEnvelope {
            v: self.version,
            id,
            body: request,
        };
        self.conn.send_request(&envelope).await?;
        let reply = match self.reply_timeout {
            None => self.conn.recv_response().await?,
            Some(after) => tokio::time::timeout(after, self.conn.recv_response())
                .await
                .map_err(|_| Error::Timeout {
                    peer: self.peer().to_owned(),
                    action: "waiting for a reply",
                    after,
                })??,
        };
        if reply.id != Some(id) {
            return Err(Error::IdMismatch {
                peer: self.peer().to_owned(),
                expected: id,
                got: reply.id,
                message_type: reply.body.name(),
            });
        }
        Ok(reply.body)
    }

    fn unexpected(&self, request: &'static str, got: Response) -> Error {
        match got {
            Response::Error(e) => Error::Remote {
                peer: self.peer().to_owned(),
                request,
                code: e.code,
                message: e.message,
            },
            other => Error::UnexpectedResponse {
                peer: self.peer().to_owned(),
                request,
                got: other.name(),
            },
        }
    }
}
