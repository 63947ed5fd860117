//! HTTP/1.x over captured socket bytes: one parser per direction of one connection.
//!
//! The kernel side hands over, per syscall, a captured prefix of a few KiB plus the real byte
//! count; the difference is a gap of known length and unknown content. So the parser is a
//! byte-level state machine that buffers only the head and chunk-size lines and merely counts
//! body bytes: a 1 MB body of which 4 KiB were captured still ends at exactly the right byte,
//! and any split of the same bytes into chunks yields the same messages.
//!
//! Event order: when something ends a message early (a gap, a bad chunk line, close), the
//! partial message is emitted first and the error that ended it second.

use crate::protocol::genai::BodyFacts;

mod framing;
mod head;
mod parser;
#[cfg(test)]
mod tests;

pub use parser::Http1Parser;

/// Longest head (start line, headers and the blank line) buffered before giving up on it.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Headers kept per message; the rest are counted in `dropped_headers`.
pub const MAX_HEADERS: usize = 64;
/// Bytes of header names plus values kept per message; the rest are counted as dropped.
pub const MAX_HEADER_BYTES: usize = 8 * 1024;
/// Body bytes kept per message, from its start.
pub const MAX_BODY_PREFIX: usize = 1024;
/// Longest chunk-size line (size plus extensions) accepted in a chunked body.
pub const MAX_CHUNK_LINE_BYTES: usize = 1024;
/// Request methods queued on a response parser; the oldest is dropped beyond this.
pub const MAX_PENDING_METHODS: usize = 256;
/// Longest method token recognised in a request line.
pub const MAX_METHOD_LEN: usize = 32;

/// Kernel timestamps of the syscall that moved one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChunkTs {
    pub enter_ns: u64,
    pub exit_ns: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartLine {
    Request { method: String, target: String },
    Response { status: u16, reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Http1Message {
    pub start_line: StartLine,
    /// The `x` of `HTTP/1.x`.
    pub minor_version: u8,
    /// Names as received, in order; at most [`MAX_HEADERS`] and [`MAX_HEADER_BYTES`].
    pub headers: Vec<(String, String)>,
    pub dropped_headers: u32,
    /// Body bytes moved, captured or not; for chunked bodies the sum of the chunk sizes.
    pub body_len: u64,
    /// The first bytes of the de-chunked body, up to [`MAX_BODY_PREFIX`] and up to the first
    /// gap (later bytes would not be contiguous with it).
    pub body_prefix: Vec<u8>,
    /// Timestamps of the chunk holding the first byte of the message.
    pub first: ChunkTs,
    /// Timestamps of the chunk (or gap, or close) holding its last byte.
    pub last: ChunkTs,
    /// Part of the head was lost in a gap: headers are those seen before it, the body unknown.
    pub head_truncated: bool,
    /// The message ended (close, gap, framing error) before its body or trailers did.
    pub body_incomplete: bool,
    /// Facts read from the body of a Dify or model-API route (see `protocol::genai`).
    pub genai: Option<Box<BodyFacts>>,
}

impl Http1Message {
    /// Value of the first header called `name`, ignoring ASCII case.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Http1Event {
    Message(Http1Message),
    Error(Http1Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Http1Error {
    #[error("stream is not HTTP/1.x")]
    NotHttp,
    #[error("malformed start line")]
    BadStartLine,
    #[error("malformed header line")]
    BadHeader,
    #[error("invalid Content-Length")]
    BadContentLength,
    #[error("conflicting Content-Length values")]
    ConflictingContentLength,
    #[error("request Transfer-Encoding does not end in chunked")]
    BadTransferEncoding,
    #[error("message head too long")]
    HeadTooLong,
    #[error("bytes lost inside a message head")]
    GapInHead,
    #[error("connection closed inside a message head")]
    IncompleteHead,
    #[error("malformed chunk size line")]
    BadChunkSize,
    #[error("chunk size line too long")]
    ChunkLineTooLong,
    #[error("chunk data not followed by a line end")]
    BadChunkEnd,
    #[error("bytes lost inside a chunk size line")]
    GapInChunkSize,
    #[error("chunked trailer section too long")]
    TrailersTooLong,
    #[error("bytes lost inside chunked trailers")]
    GapInTrailers,
}

/// Which direction of the connection a parser decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Client to server.
    Request,
    /// Server to client.
    Response,
}
