//! Wire constants and fixed-size headers of the NBD protocol (fixed newstyle, structured replies).
//!
//! Everything on the wire is big-endian. The header types here have an `encode` and a `decode`
//! that never panic: `decode` takes a fixed-size array, so the only failures are wrong magics.

/// "NBDMAGIC": the first 8 bytes a server sends.
pub(crate) const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": the newstyle magic, and the prefix of every option the client sends.
pub(crate) const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The oldstyle magic (not supported).
pub(crate) const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// The magic of every option reply.
pub(crate) const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// The magic of a transmission request.
pub(crate) const REQUEST_MAGIC: u32 = 0x2560_9513;
/// The magic of a simple reply.
pub(crate) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// The magic of a structured reply chunk.
pub(crate) const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub(crate) const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub(crate) const FLAG_NO_ZEROES: u16 = 2;
pub(crate) const CLIENT_FIXED_NEWSTYLE: u32 = 1;
pub(crate) const CLIENT_NO_ZEROES: u32 = 2;

// Options.
pub(crate) const OPT_EXPORT_NAME: u32 = 1;
pub(crate) const OPT_ABORT: u32 = 2;
pub(crate) const OPT_LIST: u32 = 3;
pub(crate) const OPT_STARTTLS: u32 = 5;
pub(crate) const OPT_INFO: u32 = 6;
pub(crate) const OPT_GO: u32 = 7;
pub(crate) const OPT_STRUCTURED_REPLY: u32 = 8;
pub(crate) const OPT_LIST_META_CONTEXT: u32 = 9;
pub(crate) const OPT_SET_META_CONTEXT: u32 = 10;

// Option reply types.
pub(crate) const REP_ACK: u32 = 1;
pub(crate) const REP_SERVER: u32 = 2;
pub(crate) const REP_INFO: u32 = 3;
pub(crate) const REP_META_CONTEXT: u32 = 4;
pub(crate) const REP_FLAG_ERROR: u32 = 1 << 31;
pub(crate) const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub(crate) const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub(crate) const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub(crate) const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

// Info types (NBD_OPT_INFO / NBD_OPT_GO).
pub(crate) const INFO_EXPORT: u16 = 0;
pub(crate) const INFO_NAME: u16 = 1;
pub(crate) const INFO_DESCRIPTION: u16 = 2;
pub(crate) const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub(crate) const TFLAG_HAS_FLAGS: u16 = 1;
pub(crate) const TFLAG_READ_ONLY: u16 = 1 << 1;
pub(crate) const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub(crate) const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// Commands.
pub(crate) const CMD_READ: u16 = 0;
pub(crate) const CMD_WRITE: u16 = 1;
pub(crate) const CMD_DISC: u16 = 2;
pub(crate) const CMD_FLUSH: u16 = 3;
pub(crate) const CMD_TRIM: u16 = 4;
pub(crate) const CMD_CACHE: u16 = 5;
pub(crate) const CMD_WRITE_ZEROES: u16 = 6;
pub(crate) const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub(crate) const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

// Structured reply chunk flags and types.
pub(crate) const REPLY_FLAG_DONE: u16 = 1;
pub(crate) const REPLY_TYPE_NONE: u16 = 0;
pub(crate) const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub(crate) const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub(crate) const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub(crate) const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
pub(crate) const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

// Error numbers on the wire.
pub(crate) const EPERM: u32 = 1;
pub(crate) const EIO: u32 = 5;
pub(crate) const EINVAL: u32 = 22;
pub(crate) const EOVERFLOW: u32 = 75;
pub(crate) const ENOTSUP: u32 = 95;

/// The longest string (export name, context name, message) either side accepts: the protocol's
/// own limit.
pub(crate) const MAX_STRING: usize = 4096;

/// The name of a wire error number, for messages.
pub(crate) fn errno_name(errno: u32) -> &'static str {
    match errno {
        EPERM => "EPERM",
        EIO => "EIO",
        12 => "ENOMEM",
        EINVAL => "EINVAL",
        28 => "ENOSPC",
        EOVERFLOW => "EOVERFLOW",
        ENOTSUP => "ENOTSUP",
        108 => "ESHUTDOWN",
        _ => "unknown error",
    }
}

/// The name of a command, for messages.
pub(crate) fn command_name(command: u16) -> &'static str {
    match command {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_DISC => "DISC",
        CMD_FLUSH => "FLUSH",
        CMD_TRIM => "TRIM",
        CMD_CACHE => "CACHE",
        CMD_WRITE_ZEROES => "WRITE_ZEROES",
        CMD_BLOCK_STATUS => "BLOCK_STATUS",
        _ => "unknown command",
    }
}

/// The name of an option, for messages.
pub(crate) fn option_name(option: u32) -> &'static str {
    match option {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        OPT_ABORT => "NBD_OPT_ABORT",
        OPT_LIST => "NBD_OPT_LIST",
        OPT_STARTTLS => "NBD_OPT_STARTTLS",
        OPT_INFO => "NBD_OPT_INFO",
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        _ => "unknown option",
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_be_bytes(a)
}
fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}
fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Reads a big-endian u16/u32/u64 at `at` of a slice, `None` when the slice is too short.
pub(crate) fn get16(b: &[u8], at: usize) -> Option<u16> {
    (b.len() >= at.checked_add(2)?).then(|| be16(b, at))
}
/// See [`get16`].
pub(crate) fn get32(b: &[u8], at: usize) -> Option<u32> {
    (b.len() >= at.checked_add(4)?).then(|| be32(b, at))
}
/// See [`get16`].
pub(crate) fn get64(b: &[u8], at: usize) -> Option<u64> {
    (b.len() >= at.checked_add(8)?).then(|| be64(b, at))
}

/// A transmission request (28 bytes on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Request {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    pub const SIZE: usize = 28;

    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// `Err(magic)` when the magic is wrong.
    pub fn decode(b: &[u8; Self::SIZE]) -> Result<Self, u32> {
        let magic = be32(b, 0);
        if magic != REQUEST_MAGIC {
            return Err(magic);
        }
        Ok(Request {
            flags: be16(b, 4),
            command: be16(b, 6),
            cookie: be64(b, 8),
            offset: be64(b, 16),
            length: be32(b, 24),
        })
    }
}

/// A structured reply chunk's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChunkHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub length: u32,
}

impl ChunkHeader {
    pub const SIZE: usize = 20;

    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..20].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// What the first 16 bytes of a reply say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReplyStart {
    /// A complete simple reply.
    Simple { error: u32, cookie: u64 },
    /// A structured chunk: 4 more bytes (the payload length) follow.
    Chunk { flags: u16, kind: u16, cookie: u64 },
}

/// Decodes the first 16 bytes of a reply; `Err(magic)` for an unknown magic.
pub(crate) fn decode_reply_start(b: &[u8; 16]) -> Result<ReplyStart, u32> {
    match be32(b, 0) {
        SIMPLE_REPLY_MAGIC => Ok(ReplyStart::Simple {
            error: be32(b, 4),
            cookie: be64(b, 8),
        }),
        STRUCTURED_REPLY_MAGIC => Ok(ReplyStart::Chunk {
            flags: be16(b, 4),
            kind: be16(b, 6),
            cookie: be64(b, 8),
        }),
        magic => Err(magic),
    }
}

/// Encodes a simple reply header.
pub(crate) fn encode_simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// Encodes an option request header (16 bytes; the payload follows).
pub(crate) fn encode_option(option: u32, length: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[8..12].copy_from_slice(&option.to_be_bytes());
    b[12..16].copy_from_slice(&length.to_be_bytes());
    b
}

/// Decodes an option request header into (option, payload length); `Err(magic)` for a wrong magic.
pub(crate) fn decode_option(b: &[u8; 16]) -> Result<(u32, u32), u64> {
    let magic = be64(b, 0);
    if magic != IHAVEOPT {
        return Err(magic);
    }
    Ok((be32(b, 8), be32(b, 12)))
}

/// Encodes an option reply header (20 bytes; the payload follows).
pub(crate) fn encode_option_reply(option: u32, kind: u32, length: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    b[8..12].copy_from_slice(&option.to_be_bytes());
    b[12..16].copy_from_slice(&kind.to_be_bytes());
    b[16..20].copy_from_slice(&length.to_be_bytes());
    b
}

/// Decodes an option reply header into (option, reply type, payload length).
pub(crate) fn decode_option_reply(b: &[u8; 20]) -> Result<(u32, u32, u32), u64> {
    let magic = be64(b, 0);
    if magic != OPTION_REPLY_MAGIC {
        return Err(magic);
    }
    Ok((be32(b, 8), be32(b, 12), be32(b, 16)))
}

/// Appends a length-prefixed (u32) string.
pub(crate) fn put_string32(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Reads a u32-length-prefixed string at `*at` of `b`, advancing `*at`; `None` when it does not
/// fit in `b`, is longer than [`MAX_STRING`], or is not UTF-8.
pub(crate) fn take_string32(b: &[u8], at: &mut usize) -> Option<String> {
    let len = usize::try_from(get32(b, *at)?).ok()?;
    let start = at.checked_add(4)?;
    let end = start.checked_add(len)?;
    if len > MAX_STRING || end > b.len() {
        return None;
    }
    let s = std::str::from_utf8(&b[start..end]).ok()?.to_owned();
    *at = end;
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn request_round_trips(flags: u16, command: u16, cookie: u64, offset: u64, length: u32) {
            let r = Request { flags, command, cookie, offset, length };
            prop_assert_eq!(Request::decode(&r.encode()), Ok(r));
        }

        #[test]
        fn request_decode_never_panics(b: [u8; 28]) {
            let _ = Request::decode(&b);
        }

        #[test]
        fn chunk_header_round_trips(flags: u16, kind: u16, cookie: u64, length: u32) {
            let h = ChunkHeader { flags, kind, cookie, length };
            let b = h.encode();
            let mut start = [0u8; 16];
            start.copy_from_slice(&b[..16]);
            prop_assert_eq!(decode_reply_start(&start), Ok(ReplyStart::Chunk { flags, kind, cookie }));
            prop_assert_eq!(get32(&b, 16), Some(length));
        }

        #[test]
        fn simple_reply_round_trips(error: u32, cookie: u64) {
            prop_assert_eq!(
                decode_reply_start(&encode_simple_reply(error, cookie)),
                Ok(ReplyStart::Simple { error, cookie })
            );
        }

        #[test]
        fn option_headers_round_trip(option: u32, kind: u32, length: u32) {
            prop_assert_eq!(decode_option(&encode_option(option, length)), Ok((option, length)));
            prop_assert_eq!(
                decode_option_reply(&encode_option_reply(option, kind, length)),
                Ok((option, kind, length))
            );
        }

        #[test]
        fn strings_round_trip_and_never_panic(s in "\\PC{0,64}", junk: Vec<u8>) {
            let mut b = Vec::new();
            put_string32(&mut b, &s);
            let mut at = 0;
            prop_assert_eq!(take_string32(&b, &mut at), Some(s));
            prop_assert_eq!(at, b.len());
            let mut at = 0;
            let _ = take_string32(&junk, &mut at);
            prop_assert!(at <= junk.len());
        }
    }
}
