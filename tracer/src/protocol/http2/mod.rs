//! HTTP/2 (RFC 9113) with HPACK (RFC 7541) and gRPC message framing over captured socket
//! bytes: one parser per connection, fed both directions in order.
//!
//! The caller hands over each direction's bytes as they were captured, split anywhere, plus
//! gaps of known length (bytes moved but not captured) and the close. Frames are cut by their
//! 9-byte headers; DATA payloads are counted, never buffered; header blocks (HEADERS or
//! PUSH_PROMISE plus CONTINUATION) are buffered up to [`MAX_HEADER_BLOCK_BYTES`] and decoded
//! once whole. Out come [`Http2Event`]s, the last of each stream a [`Http2Stream`] summary
//! that holds what one span needs.
//!
//! HPACK is our own decoder (`hpack/`), not a crate. Of the crates on crates.io,
//! `hpack` 0.3 and `httlib-hpack` 0.1 panic on a one-byte truncated size update (`[0x3f]`),
//! and none of them (`loona-hpack`/`fluke-hpack` included) can decode a block whose dynamic
//! table is partly unknown: they stop at the first reference they cannot resolve, which loses
//! the rest of the block and every table insertion in it. A tracer that attaches to
//! connections already in use meets that case all the time, so the decoder here models the
//! dynamic table as "entries inserted since we started watching" in front of an unknown tail;
//! `hpack/table.rs` says why the index math stays correct without knowing the tail.
//!
//! Gaps: one that ends inside the frame it started in keeps frame sync (lengths are known):
//! DATA bytes are counted as `uncaptured`, and a header block is decoded up to the gap,
//! marked partial, and the direction's dynamic table forgotten (the lost part may have
//! inserted entries). A gap across a frame boundary, or [`Http2Conn::lost`] records, loses
//! frame sync: the direction looks for a boundary again (`resync.rs`), its table is forgotten
//! and streams open at the time are marked [`Http2Stream::sync_lost`]. Timestamps are the
//! HTTP/1 parser's [`ChunkTs`], so the stream layer hands both parsers the same value; any
//! split of the same bytes gives the same events.
//!
//! Never wrong, sometimes partial: a header field that cannot be decoded for sure (a reference
//! into the unknown tail, a field in a lost or over-long part of a block) is left out and its
//! block marked [`HeaderBlock::partial`]; it is never guessed.
//!
//! Secrets: the values of [`SECRET_HEADERS`] are replaced by [`REDACTED`] while decoding, so
//! they are neither kept in the dynamic table nor handed on. (The HTTP/1 parser keeps every
//! header and leaves it to `span/` to read only harmless ones; here the dynamic table would
//! otherwise hold secrets for the connection's lifetime.)

mod conn;
mod frame;
pub mod grpc;
mod hpack;
mod reader;
mod resync;
mod stream;
#[cfg(test)]
mod tests;

pub use crate::protocol::http1::ChunkTs;
pub use conn::Http2Conn;
pub use hpack::HpackError;

/// What a client sends first on a connection that starts as HTTP/2 (RFC 9113 §3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longest header block (all its HEADERS/CONTINUATION fragments) buffered for decoding; the
/// rest is counted in [`Http2Counters::header_bytes_dropped`] and the block decoded as a
/// truncated one.
pub const MAX_HEADER_BLOCK_BYTES: usize = 64 * 1024;
/// Header block bytes buffered by one connection, both directions together. Besides these,
/// a direction looking for a frame boundary holds at most about
/// `2 * (MAX_RESYNC_FRAME_LEN + 18) + 8 KiB` bytes (see `resync.rs`); nothing else grows with
/// the input.
pub const MAX_CONN_BUFFERED_BYTES: usize = 96 * 1024;
/// Header fields kept per block; the rest are counted in [`HeaderBlock::dropped_fields`].
pub const MAX_HEADERS: usize = 64;
/// Bytes of names plus values kept per block; the rest are counted as dropped.
pub const MAX_HEADER_BYTES: usize = 8 * 1024;
/// Dynamic table entries (RFC 7541 size units) remembered per direction; older ones join the
/// unknown tail, whatever table size the peers agreed on.
pub const MAX_DYNAMIC_TABLE_BYTES: usize = 64 * 1024;
/// Streams tracked per connection; beyond it the oldest is ended as [`StreamEnd::Lost`].
pub const MAX_STREAMS: usize = 256;
/// Ids of ended streams remembered so late frames on them do not open new ones.
pub const RECENTLY_CLOSED: usize = 64;
/// Frame length a resync accepts while the receiver's SETTINGS_MAX_FRAME_SIZE is unknown.
pub const DEFAULT_MAX_FRAME_SIZE: u32 = 16 * 1024;
/// Largest frame a resync will buffer to check the frame header after it, even if the peer
/// allows larger frames; resync then lands on a later, smaller frame.
pub const MAX_RESYNC_FRAME_LEN: u32 = 32 * 1024;
/// Header names whose values are never kept (compared ignoring ASCII case).
pub const SECRET_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "x-inner-api-key",
    "api-key",
];
/// Value that stands in for a secret header's value.
pub const REDACTED: &str = "[REDACTED]";

/// One direction of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    ClientToServer,
    ServerToClient,
}

impl Direction {
    pub fn other(self) -> Self {
        match self {
            Direction::ClientToServer => Direction::ServerToClient,
            Direction::ServerToClient => Direction::ClientToServer,
        }
    }

    fn index(self) -> usize {
        match self {
            Direction::ClientToServer => 0,
            Direction::ServerToClient => 1,
        }
    }
}

/// Where in the connection the first fed bytes sit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnStart {
    /// At its start: the client's first bytes must be the [`PREFACE`] (else the connection is
    /// not HTTP/2), and both HPACK tables start empty. For h2c upgrades, build the parser
    /// after the 101 response.
    Preface,
    /// Somewhere in the middle: each direction looks for a frame boundary (see `resync.rs`)
    /// and the dynamic tables are unknown. A client direction that does start with the
    /// preface is taken as a fresh start after all.
    MidStream,
}

/// A decoded header block: the fields in order, names as sent (lowercase in valid HTTP/2).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HeaderBlock {
    /// At most [`MAX_HEADERS`] fields and [`MAX_HEADER_BYTES`] bytes; secret values are
    /// [`REDACTED`].
    pub fields: Vec<(String, String)>,
    /// Fields left out because they referred to dynamic table entries we never saw.
    pub unknown_fields: u32,
    /// Fields decoded but not kept because of the bounds above.
    pub dropped_fields: u32,
    /// Fields are missing: unknown ones, or part of the block was lost, too long or broken.
    /// Dropped fields alone do not make a block partial.
    pub partial: bool,
}

impl HeaderBlock {
    /// Value of the first field called `name`, ignoring ASCII case.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// `:status` as a number, if present and well-formed.
    pub fn status(&self) -> Option<u16> {
        let v = self.get(":status")?;
        if v.len() != 3 || !v.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        v.parse().ok()
    }

    fn push(&mut self, name: &str, value: &str) {
        let kept: usize = self.fields.iter().map(|(n, v)| n.len() + v.len()).sum();
        if self.fields.len() < MAX_HEADERS && kept + name.len() + value.len() <= MAX_HEADER_BYTES {
            self.fields.push((name.to_owned(), value.to_owned()));
        } else {
            self.dropped_fields = self.dropped_fields.saturating_add(1);
        }
    }

    fn unknown(&mut self) {
        self.unknown_fields = self.unknown_fields.saturating_add(1);
        self.partial = true;
    }
}

/// What a header block is to its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadersKind {
    Request,
    /// A 1xx response, before the final one.
    Informational,
    /// The final response head; with `end_stream`, a gRPC "trailers-only" response.
    Response,
    RequestTrailers,
    ResponseTrailers,
}

/// DATA of one direction of one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyStats {
    /// Payload bytes without padding, captured or lost in gaps.
    pub bytes: u64,
    /// Of `bytes`, those lost in gaps inside frames we otherwise saw.
    pub uncaptured: u64,
    /// False once whole frames of this direction may have been missed (frame sync was lost)
    /// or a gap hid where data ended and padding began: `bytes` is then a lower bound.
    pub exact: bool,
    pub frames: u32,
    /// gRPC messages (1-byte flag, 4-byte big-endian length, payload) whose last byte was
    /// seen; a lower bound unless `grpc_exact`.
    pub grpc_messages: u64,
    /// The stream is gRPC, this direction's messages were followed from the first DATA byte,
    /// and no gap hid a message's length prefix.
    pub grpc_exact: bool,
}

impl Default for BodyStats {
    fn default() -> Self {
        Self {
            bytes: 0,
            uncaptured: 0,
            exact: true,
            frames: 0,
            grpc_messages: 0,
            grpc_exact: false,
        }
    }
}

/// One direction of one stream.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StreamHalf {
    /// Request headers, or the final response headers.
    pub headers: Option<HeaderBlock>,
    pub trailers: Option<HeaderBlock>,
    pub body: BodyStats,
    /// The chunk holding the first byte of this direction's first frame on the stream.
    pub first: Option<ChunkTs>,
    /// The chunk holding the last byte of the frame (or header block) that carried
    /// END_STREAM in this direction.
    pub end: Option<ChunkTs>,
}

/// Why a stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// END_STREAM in both directions.
    Complete,
    /// RST_STREAM sent in `by`; `code` is `None` if a gap hid it.
    Reset {
        code: Option<u32>,
        by: Direction,
    },
    /// A GOAWAY sent in `by` whose last stream id is below this stream's.
    GoAway {
        code: u32,
        by: Direction,
    },
    ConnectionClosed,
    /// Dropped unfinished to stay within [`MAX_STREAMS`].
    Lost,
}

/// Everything seen of one stream, emitted once when it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Http2Stream {
    pub stream_id: u32,
    pub request: StreamHalf,
    pub response: StreamHalf,
    /// 1xx responses seen before the final one.
    pub informational: u32,
    /// The chunk holding the first byte of the stream's first frame we saw.
    pub started: ChunkTs,
    /// The chunk (or gap, or close) that ended it.
    pub ended: ChunkTs,
    pub end: StreamEnd,
    /// The first frame we saw of this stream was not the request's HEADERS: the parser
    /// started (or resynced) in the middle of it.
    pub missed_start: bool,
    /// Frame sync was lost in some direction while the stream was open.
    pub sync_lost: bool,
}

impl Http2Stream {
    fn request_header(&self, name: &str) -> Option<&str> {
        self.request.headers.as_ref()?.get(name)
    }

    pub fn method(&self) -> Option<&str> {
        self.request_header(":method")
    }

    pub fn path(&self) -> Option<&str> {
        self.request_header(":path")
    }

    pub fn authority(&self) -> Option<&str> {
        self.request_header(":authority")
    }

    pub fn scheme(&self) -> Option<&str> {
        self.request_header(":scheme")
    }

    /// Final response status.
    pub fn status(&self) -> Option<u16> {
        self.response.headers.as_ref()?.status()
    }

    /// The request or response content-type says gRPC.
    pub fn is_grpc(&self) -> bool {
        [&self.request.headers, &self.response.headers]
            .into_iter()
            .flatten()
            .filter_map(|h| h.get("content-type"))
            .any(grpc::is_grpc_content_type)
    }

    /// Service and method from a gRPC `:path`.
    pub fn grpc_method(&self) -> Option<(&str, &str)> {
        grpc::split_path(self.path()?)
    }

    /// The block that carries the gRPC status: the trailers, or for a trailers-only
    /// response the response headers.
    fn grpc_status_block(&self) -> Option<&HeaderBlock> {
        self.response
            .trailers
            .as_ref()
            .filter(|t| t.get("grpc-status").is_some())
            .or(self.response.headers.as_ref())
    }

    pub fn grpc_status(&self) -> Option<u32> {
        grpc::parse_status(self.grpc_status_block()?.get("grpc-status")?)
    }

    /// `grpc-message`, percent-decoded.
    pub fn grpc_message(&self) -> Option<String> {
        Some(grpc::percent_decode(
            self.grpc_status_block()?.get("grpc-message")?,
        ))
    }

    /// Something about this stream is not known for sure: a header block is partial or
    /// missing, a body count is a lower bound, or frames were missed.
    pub fn partial(&self) -> bool {
        let half = |h: &StreamHalf| {
            h.headers.as_ref().is_some_and(|b| b.partial)
                || h.trailers.as_ref().is_some_and(|b| b.partial)
                || !h.body.exact
        };
        self.missed_start
            || self.sync_lost
            || self.request.headers.is_none()
            || half(&self.request)
            || half(&self.response)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Http2Event {
    /// The first frame of a stream was seen.
    StreamStarted {
        stream_id: u32,
        ts: ChunkTs,
    },
    /// A header block was decoded; `ts` is the chunk holding its last byte.
    Headers {
        stream_id: u32,
        kind: HeadersKind,
        block: HeaderBlock,
        end_stream: bool,
        ts: ChunkTs,
    },
    /// A DATA frame ended; `len` excludes padding, `grpc_messages` counts the gRPC messages
    /// whose last byte was in it.
    Data {
        stream_id: u32,
        dir: Direction,
        len: u64,
        grpc_messages: u32,
        end_stream: bool,
        ts: ChunkTs,
    },
    GoAway {
        dir: Direction,
        last_stream_id: u32,
        error_code: u32,
        ts: ChunkTs,
    },
    StreamEnded(Box<Http2Stream>),
    Error {
        dir: Direction,
        error: Http2Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Http2Error {
    #[error("connection does not start with the HTTP/2 client preface")]
    NotHttp2,
    #[error("invalid header for a frame of type {kind:#x}; frame sync lost")]
    BadFrameHeader { kind: u8 },
    #[error("bytes lost across a frame boundary; frame sync lost")]
    SyncLost,
    #[error("padding longer than the frame")]
    BadPadding,
    #[error("header block not continued by CONTINUATION on its stream")]
    ContinuationExpected,
    #[error("CONTINUATION without a header block to continue")]
    UnexpectedContinuation,
    #[error("header block too long; decoded only its start")]
    HeaderBlockTooLong,
    #[error("HPACK: {0}")]
    Hpack(#[from] HpackError),
}

/// Counters of one connection; drops and guesses are counted here, never silent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Http2Counters {
    pub frames: u64,
    /// Frames of a type RFC 9113 does not define, skipped.
    pub unknown_frames: u64,
    pub header_blocks: u64,
    /// Header block bytes not buffered because of [`MAX_HEADER_BLOCK_BYTES`] or
    /// [`MAX_CONN_BUFFERED_BYTES`].
    pub header_bytes_dropped: u64,
    /// Header blocks decoded only in part (too long, gap, broken, interrupted).
    pub truncated_blocks: u64,
    pub hpack_errors: u64,
    /// Fields left out because they referred to unknown dynamic table entries.
    pub unknown_fields: u64,
    /// Header blocks on streams we do not track (server push, ended or unknown streams).
    pub ignored_blocks: u64,
    /// Times a direction lost frame sync (a gap across a frame boundary, a bad header).
    pub sync_losses: u64,
    /// Times a direction found a frame boundary again.
    pub resyncs: u64,
    /// Resyncs cut short by a gap or close before a boundary was confirmed.
    pub resync_failures: u64,
    /// Bytes skipped while looking for a frame boundary.
    pub resync_skipped_bytes: u64,
    /// Streams ended as [`StreamEnd::Lost`] to stay within [`MAX_STREAMS`].
    pub streams_evicted: u64,
}
