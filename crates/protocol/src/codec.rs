//! Framing and encoding: `u32` big-endian payload length, then a JSON envelope.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::Error;
use crate::message::{RequestEnvelope, ResponseEnvelope};

/// Largest payload a frame may carry (64 KiB). A larger length prefix is rejected before
/// anything is allocated. Every message of this protocol is far smaller.
pub const MAX_FRAME_LEN: usize = 64 * 1024;

/// Length of the frame header: the payload length as a big-endian `u32`.
pub const FRAME_HEADER_LEN: usize = 4;

/// Reads one frame and returns its payload.
///
/// Returns `Ok(None)` when the peer closed the connection cleanly before the first header
/// byte. A length prefix above [`MAX_FRAME_LEN`] gives [`Error::FrameTooLarge`] without
/// reading or allocating the payload; a close in the middle of a frame gives
/// [`Error::Truncated`]. `peer` only labels errors.
pub async fn read_frame<R>(reader: &mut R, peer: &str) -> Result<Option<Vec<u8>>, Error>
where
    R: AsyncRead + Unpin + ?Sized,
{
    let mut header = [0u8; FRAME_HEADER_LEN];
    let mut got = 0;
    while got < FRAME_HEADER_LEN {
        let n = match reader.read(&mut header[got..]).await {
            Ok(n) => n,
            // TLS peers that vanish without close_notify: a close like any other when it
            // happens between frames.
            Err(e) if got == 0 && e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
            Err(source) => return Err(io_error(peer, "reading a frame header", source)),
        };
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(Error::Truncated {
                peer: peer.to_owned(),
                part: "header",
                expected: FRAME_HEADER_LEN,
                got,
            });
        }
        got += n;
    }
    let len = u32::from_be_bytes(header);
    let len = check_len(u64::from(len), peer)?;
    let mut payload = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = reader
            .read(&mut payload[got..])
            .await
            .map_err(|source| io_error(peer, "reading a frame payload", source))?;
        if n == 0 {
            return Err(Error::Truncated {
                peer: peer.to_owned(),
                part: "payload",
                expected: len,
                got,
            });
        }
        got += n;
    }
    Ok(Some(payload))
}

/// Writes one frame (header and payload in a single write) and flushes.
///
/// A payload above [`MAX_FRAME_LEN`] gives [`Error::FrameTooLarge`] and writes nothing.
pub async fn write_frame<W>(writer: &mut W, payload: &[u8], peer: &str) -> Result<(), Error>
where
    W: AsyncWrite + Unpin + ?Sized,
{
    let len = check_len(payload.len() as u64, peer)?;
    let mut buf = Vec::with_capacity(FRAME_HEADER_LEN + len);
    // `check_len` guarantees len <= MAX_FRAME_LEN < u32::MAX.
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    buf.extend_from_slice(payload);
    writer
        .write_all(&buf)
        .await
        .map_err(|source| io_error(peer, "writing a frame", source))?;
    writer
        .flush()
        .await
        .map_err(|source| io_error(peer, "flushing a frame", source))
}

fn check_len(len: u64, peer: &str) -> Result<usize, Error> {
    match usize::try_from(len) {
        Ok(l) if l <= MAX_FRAME_LEN => Ok(l),
        _ => Err(Error::FrameTooLarge {
            peer: peer.to_owned(),
            len,
            max: MAX_FRAME_LEN,
        }),
    }
}

pub(crate) fn io_error(peer: &str, action: &'static str, source: std::io::Error) -> Error {
    Error::Io {
        peer: peer.to_owned(),
        action,
        source,
    }
}

/// Encodes a request envelope into a frame payload (JSON).
pub fn encode_request(envelope: &RequestEnvelope, peer: &str) -> Result<Vec<u8>, Error> {
    encode(envelope, envelope.body.name(), peer)
}

/// Encodes a response envelope into a frame payload (JSON).
pub fn encode_response(envelope: &ResponseEnvelope, peer: &str) -> Result<Vec<u8>, Error> {
    encode(envelope, envelope.body.name(), peer)
}

fn encode<T: serde::Serialize>(
    value: &T,
    message_type: &'static str,
    peer: &str,
) -> Result<Vec<u8>, Error> {
    let bytes = serde_json::to_vec(value).map_err(|source| Error::Encode {
        peer: peer.to_owned(),
        message_type,
        source,
    })?;
    if bytes.len() > MAX_FRAME_LEN {
        return Err(Error::MessageTooLarge {
            peer: peer.to_owned(),
            message_type,
            len: bytes.len(),
            max: MAX_FRAME_LEN,
        });
    }
    Ok(bytes)
}

/// The envelope with the body left undecoded, so that a bad body can still be answered
/// with the request's id.
#[derive(serde::Deserialize)]
struct RawEnvelope<Id> {
    v: u16,
    id: Id,
    body: serde_json::Value,
}

/// Decodes a frame payload into a request envelope.
///
/// Two stages: the envelope (`v`, `id`, `body`) first, then the body. A payload that is not an
/// envelope gives [`Error::Malformed`]; an envelope whose body is not a known request gives
/// [`Error::UnknownMessage`] with the id, so the server can answer it and carry on.
pub fn decode_request(payload: &[u8], peer: &str) -> Result<RequestEnvelope, Error> {
    let raw: RawEnvelope<u64> =
        serde_json::from_slice(payload).map_err(|source| Error::Malformed {
            peer: peer.to_owned(),
            kind: "request",
            len: payload.len(),
            source,
        })?;
    let message_type = raw
        .body
        .get("type")
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned);
    match serde_json::from_value(raw.body) {
        Ok(body) => Ok(RequestEnvelope {
            v: raw.v,
            id: raw.id,
            body,
        }),
        Err(source) => Err(Error::UnknownMessage {
            peer: peer.to_owned(),
            id: raw.id,
            message_type,
            source,
        }),
    }
}

/// Decodes a frame payload into a response envelope. Anything unexpected gives
/// [`Error::Malformed`].
pub fn decode_response(payload: &[u8], peer: &str) -> Result<ResponseEnvelope, Error> {
    let malformed = |source| Error::Malformed {
        peer: peer.to_owned(),
        kind: "response",
        len: payload.len(),
        source,
    };
    let raw: RawEnvelope<Option<u64>> = serde_json::from_slice(payload).map_err(malformed)?;
    let body = serde_json::from_value(raw.body).map_err(malformed)?;
    Ok(ResponseEnvelope {
        v: raw.v,
        id: raw.id,
        body,
    })
}

/// A framed byte stream (TCP+TLS, Unix socket, or an in-memory duplex in tests), labelled
/// with its peer for errors and logs.
///
/// This is the low-level layer: it sends and receives envelopes and enforces nothing about
/// ids or versions. Controllers use [`Client`](crate::Client) on top of it, agents
/// [`serve`](crate::serve).
#[derive(Debug)]
pub struct Connection<S> {
    io: S,
    peer: String,
}

impl<S> Connection<S> {
    /// Wraps a stream; `peer` labels errors and logs (e.g. the remote address).
    pub fn new(io: S, peer: impl Into<String>) -> Connection<S> {
        Connection {
            io,
            peer: peer.into(),
        }
    }

    /// The peer label.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// The underlying stream (e.g. to look at the TLS session).
    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// The underlying stream, mutably (e.g. to write raw bytes in tests).
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.io
    }

    /// Unwraps the stream.
    pub fn into_inner(self) -> S {
        self.io
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// Sends a request envelope.
    pub async fn send_request(&mut self, envelope: &RequestEnvelope) -> Result<(), Error> {
        let payload = encode_request(envelope, &self.peer)?;
        write_frame(&mut self.io, &payload, &self.peer).await
    }

    /// Receives a request envelope; `Ok(None)` when the peer closed cleanly between frames.
    pub async fn recv_request(&mut self) -> Result<Option<RequestEnvelope>, Error> {
        match read_frame(&mut self.io, &self.peer).await? {
            Some(payload) => decode_request(&payload, &self.peer).map(Some),
            None => Ok(None),
        }
    }

    /// Sends a response envelope.
    pub async fn send_response(&mut self, envelope: &ResponseEnvelope) -> Result<(), Error> {
        let payload = encode_response(envelope, &self.peer)?;
        write_frame(&mut self.io, &payload, &self.peer).await
    }

    /// Receives a response envelope; a clean close gives [`Error::Closed`].
    pub async fn recv_response(&mut self) -> Result<ResponseEnvelope, Error> {
        match read_frame(&mut self.io, &self.peer).await? {
            Some(payload) => decode_response(&payload, &self.peer),
            None => Err(Error::Closed {
                peer: self.peer.clone(),
            }),
        }
    }

    /// Closes the write side (TLS: sends close_notify). Errors are ignored: the peer may
    /// already be gone.
    pub async fn shutdown(&mut self) {
        let _ = self.io.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Request;

    #[tokio::test]
    async fn frame_roundtrip_and_clean_eof() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        write_frame(&mut a, b"hello", "t").await.unwrap();
        drop(a);
        assert_eq!(
            read_frame(&mut b, "t").await.unwrap().as_deref(),
            Some(&b"hello"[..])
        );
        assert!(read_frame(&mut b, "t").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn oversized_header_rejected_without_payload() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        let err = read_frame(&mut b, "t").await.unwrap_err();
        assert!(matches!(err, Error::FrameTooLarge { len, .. } if len == u64::from(u32::MAX)));
    }

    #[tokio::test]
    async fn truncated_header_and_payload() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(&[0, 0]).await.unwrap();
        drop(a);
        let err = read_frame(&mut b, "t").await.unwrap_err();
        assert!(matches!(
            err,
            Error::Truncated {
                part: "header",
                got: 2,
                ..
            }
        ));

        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(&[0, 0, 0, 10, 1, 2, 3]).await.unwrap();
        drop(a);
        let err = read_frame(&mut b, "t").await.unwrap_err();
        assert!(matches!(
            err,
            Error::Truncated {
                part: "payload",
                expected: 10,
                got: 3,
                ..
            }
        ));
    }

    #[test]
    fn oversized_payload_not_written() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut out = Vec::new();
            let big = vec![0u8; MAX_FRAME_LEN + 1];
            let err = write_frame(&mut out, &big, "t").await.unwrap_err();
            assert!(matches!(err, Error::FrameTooLarge { .. }));
            assert!(out.is_empty());
        });
    }

    #[test]
    fn wire_format_is_stable() {
        let env = RequestEnvelope {
            v: 1,
            id: 7,
            body: Request::Freeze { timeout_ms: 30_000 },
        };
        let json = String::from_utf8(encode_request(&env, "t").unwrap()).unwrap();
        assert_eq!(
            json,
            r#"{"v":1,"id":7,"body":{"type":"freeze","timeout_ms":30000}}"#
        );
    }

    #[test]
    fn unknown_body_keeps_id() {
        let err =
            decode_request(br#"{"v":1,"id":9,"body":{"type":"format_disk"}}"#, "t").unwrap_err();
        match err {
            Error::UnknownMessage {
                id, message_type, ..
            } => {
                assert_eq!(id, 9);
                assert_eq!(message_type.as_deref(), Some("format_disk"));
            }
            other => panic!("unexpected {other:?}"),
        }
        let err = decode_request(b"\xff\x00garbage", "t").unwrap_err();
        assert!(matches!(err, Error::Malformed { len: 9, .. }));
    }

    #[test]
    fn unknown_fields_and_values_tolerated() {
        let env = decode_response(
            br#"{"v":1,"id":3,"extra":1,"body":{"type":"status","state":"hibernating","new_field":[1]}}"#,
            "t",
        )
        .unwrap();
        assert_eq!(
            env.body,
            crate::Response::Status(crate::StatusReport {
                state: crate::AgentState::Unknown,
                deadline_unix_ms: None,
                mounts: vec![],
            })
        );
    }
}
