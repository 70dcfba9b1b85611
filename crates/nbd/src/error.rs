//! The crate's one error type.

use std::io;

/// Everything that can go wrong talking NBD. Each variant names the export (or address) and,
/// for commands, the offset and length of the request that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The connection to the server could not be made.
    #[error("nbd {address}: cannot connect: {source}")]
    Connect {
        /// Where we tried to connect ("unix:/run/x.sock", "tcp:127.0.0.1:10809").
        address: String,
        /// The underlying error.
        source: io::Error,
    },
    /// Reading or writing the socket failed (including a server that hung up or timed out).
    #[error("nbd export {export:?}: I/O error during {during}: {source}")]
    Io {
        /// The export's name.
        export: String,
        /// What was being done ("handshake", "READ at offset 4096 length 65536").
        during: String,
        /// The underlying error.
        source: io::Error,
    },
    /// The server broke the protocol (bad magic, a length that disagrees with the request, a
    /// reply too large, ...). The connection is dropped.
    #[error("nbd export {export:?}: protocol violation during {during}: {detail}")]
    Protocol {
        /// The export's name.
        export: String,
        /// What was being done.
        during: String,
        /// What was wrong.
        detail: String,
    },
    /// The server refused an option during the handshake (unknown export, unsupported option).
    #[error("nbd export {export:?}: server refused {option}: {detail}")]
    Refused {
        /// The export's name.
        export: String,
        /// The option's name ("NBD_OPT_GO").
        option: &'static str,
        /// The server's reason.
        detail: String,
    },
    /// A metadata context we asked for (e.g. `qemu:dirty-bitmap:NAME`) is not offered.
    #[error("nbd export {export:?}: the server does not offer meta context {context:?}")]
    NoMetaContext {
        /// The export's name.
        export: String,
        /// The context asked for.
        context: String,
    },
    /// The server answered a command with an error.
    #[error(
        "nbd export {export:?}: {command} at offset {offset} length {length} failed: {errno_name} ({errno}){message}"
    )]
    Command {
        /// The export's name.
        export: String,
        /// The command ("READ", "BLOCK_STATUS").
        command: &'static str,
        /// The request's offset.
        offset: u64,
        /// The request's length.
        length: u64,
        /// The error number the server sent.
        errno: u32,
        /// Its name ("EINVAL").
        errno_name: &'static str,
        /// The server's message, if any (with a leading ": ").
        message: String,
    },
    /// The caller asked for something the export cannot give (past its end, an unknown
    /// context, structured replies the server lacks).
    #[error("nbd export {export:?}: invalid request: {detail}")]
    InvalidRequest {
        /// The export's name.
        export: String,
        /// What was wrong.
        detail: String,
    },
    /// A server could not listen on its address.
    #[error("nbd server {address}: cannot listen: {source}")]
    Listen {
        /// The address ("unix:/run/x.sock").
        address: String,
        /// The underlying error.
        source: io::Error,
    },
    /// An address string is neither `unix:PATH` nor `tcp:HOST:PORT`.
    #[error("nbd: invalid address {0:?}: expected unix:PATH or tcp:HOST:PORT")]
    InvalidAddress(String),
    /// A server's options are inconsistent.
    #[error("nbd server: invalid options: {0}")]
    ServerOptions(String),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
