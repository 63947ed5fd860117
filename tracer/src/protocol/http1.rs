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

use std::collections::VecDeque;

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
/// Head buffer capacity kept between messages.
const HEAD_KEEP_CAPACITY: usize = 2048;

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

/// What a response needs to know about the request it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MethodKind {
    Head,
    Connect,
    Other,
}

const VERSION_PREFIX: &[u8; 7] = b"HTTP/1.";

/// Incremental recogniser of one start line. It runs byte by byte so that a stream that is not
/// HTTP is rejected at its first wrong byte, whatever the chunking, and so that resync does not
/// buffer long lines that cannot be a start line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineScan {
    /// Request: bytes of the method seen.
    Method(u8),
    Target {
        seen: bool,
    },
    /// Request: bytes of `HTTP/1.` matched; at 7 the minor digit is due.
    ReqVersion(u8),
    ReqEnd,
    /// Response: bytes of `HTTP/1.` matched; at 7 the minor digit is due.
    RespVersion(u8),
    RespSp,
    /// Response: status digits seen.
    Status(u8),
    Reason,
    Cr,
    Done,
}

impl LineScan {
    fn new(side: Side) -> Self {
        match side {
            Side::Request => LineScan::Method(0),
            Side::Response => LineScan::RespVersion(0),
        }
    }

    /// The next state, or `None` if `b` cannot continue a start line.
    fn step(self, b: u8) -> Option<Self> {
        use LineScan::*;
        let line_end = |b: u8| match b {
            b'\r' => Some(Cr),
            b'\n' => Some(Done),
            _ => None,
        };
        match self {
            Method(n) => {
                if b == b' ' && n > 0 {
                    Some(Target { seen: false })
                } else if usize::from(n) < MAX_METHOD_LEN
                    && (b.is_ascii_uppercase()
                        || (n > 0 && (b.is_ascii_digit() || b == b'-' || b == b'_')))
                {
                    Some(Method(n.saturating_add(1)))
                } else {
                    None
                }
            }
            Target { seen } => {
                if b == b' ' && seen {
                    Some(ReqVersion(0))
                } else if b > b' ' && b != 0x7f {
                    Some(Target { seen: true })
                } else {
                    None
                }
            }
            ReqVersion(i) => match VERSION_PREFIX.get(usize::from(i)) {
                Some(&want) => (b == want).then_some(ReqVersion(i.saturating_add(1))),
                None => b.is_ascii_digit().then_some(ReqEnd),
            },
            ReqEnd => line_end(b),
            RespVersion(i) => match VERSION_PREFIX.get(usize::from(i)) {
                Some(&want) => (b == want).then_some(RespVersion(i.saturating_add(1))),
                None => b.is_ascii_digit().then_some(RespSp),
            },
            RespSp => (b == b' ').then_some(Status(0)),
            Status(0) => (b'1'..=b'9').contains(&b).then_some(Status(1)),
            Status(n @ (1 | 2)) => b.is_ascii_digit().then_some(Status(n.saturating_add(1))),
            Status(_) => match b {
                b' ' => Some(Reason),
                _ => line_end(b),
            },
            Reason => match b {
                b'\r' | b'\n' => line_end(b),
                b'\t' => Some(Reason),
                _ if b < b' ' || b == 0x7f => None,
                _ => Some(Reason),
            },
            Cr => (b == b'\n').then_some(Done),
            Done => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between messages; blank lines are skipped.
    Start,
    /// Buffering a head in `head`.
    Head,
    /// Content-Length body.
    Body {
        remaining: u64,
    },
    /// Buffering a chunk-size line in `line`.
    ChunkSize,
    ChunkData {
        remaining: u64,
    },
    /// The line end after chunk data.
    ChunkDataEnd {
        seen_cr: bool,
    },
    /// Trailer lines after the last chunk, skipped up to the blank line.
    Trailers {
        line_has_content: bool,
        bytes: usize,
    },
    /// Response body delimited by the connection closing.
    UntilClose,
    /// After an upgrade or CONNECT: the bytes are another protocol.
    Tunnel,
    /// The framing of a body was lost (a gap or an error inside chunk framing). The rest of
    /// the body cannot be told from a next message, so nothing is parsed until the other
    /// direction moves (see `peer_moved`): scanning it for start lines would turn body text
    /// into phantom messages.
    LostBody,
    /// After an error: looking for a start line at a chunk start or line start.
    Resync {
        at_line_start: bool,
    },
    NotHttp,
}

/// How the body of a message is delimited.
enum BodyKind {
    None,
    Length(u64),
    Chunked,
    UntilClose,
    /// No body, and the connection switches protocol after the head.
    Tunnel,
}

/// Decoder of one direction of one HTTP/1.x connection. See the module docs.
#[derive(Debug, Clone)]
pub struct Http1Parser {
    side: Side,
    state: State,
    /// Nothing has been interpreted yet, so a bad first start line means "not HTTP".
    fresh: bool,
    /// The last request asked to switch protocols (CONNECT, Upgrade): if what follows is not a
    /// request, it is the new protocol rather than an error.
    upgrade_pending: bool,
    head: Vec<u8>,
    /// Length of the start line inside `head`, 0 while it is incomplete.
    start_line_end: usize,
    /// Start of the header line being buffered inside `head`.
    line_start: usize,
    scan: LineScan,
    /// The head began at a resync candidate and has not yet shown a full start line, so
    /// failing it is silent.
    tentative: bool,
    head_first: ChunkTs,
    /// Chunk-size line being buffered.
    line: Vec<u8>,
    /// Message whose head is done and whose body is being counted.
    msg: Option<Http1Message>,
    /// A gap hit the current body, so `body_prefix` is frozen.
    body_gap: bool,
    pending: VecDeque<MethodKind>,
    dropped_methods: u64,
}

impl Http1Parser {
    pub fn new(side: Side) -> Self {
        Self {
            side,
            state: State::Start,
            fresh: true,
            upgrade_pending: false,
            head: Vec::new(),
            start_line_end: 0,
            line_start: 0,
            scan: LineScan::new(side),
            tentative: false,
            head_first: ChunkTs::default(),
            line: Vec::new(),
            msg: None,
            body_gap: false,
            pending: VecDeque::new(),
            dropped_methods: 0,
        }
    }

    pub fn side(&self) -> Side {
        self.side
    }

    /// Captured bytes of one chunk.
    pub fn feed(&mut self, data: &[u8], ts: ChunkTs, out: &mut Vec<Http1Event>) {
        match &mut self.state {
            State::NotHttp | State::Tunnel => return,
            // A new syscall is the likeliest place for a new message to begin.
            State::Resync { at_line_start } => *at_line_start = true,
            _ => {}
        }
        let mut rest = data;
        let mut stalls = 0u32;
        while !rest.is_empty() {
            let used = self.step(rest, ts, out);
            if used == 0 {
                // Every zero-byte step changes state to one that consumes; this bound only
                // turns a logic slip into dropped bytes instead of a hang.
                stalls = stalls.saturating_add(1);
                debug_assert!(stalls < 8, "http1 parser stalled in {:?}", self.state);
                if stalls >= 8 {
                    return;
                }
            } else {
                stalls = 0;
            }
            rest = rest.get(used..).unwrap_or_default();
        }
    }

    /// `n` bytes that were moved by the syscall but not captured.
    pub fn gap(&mut self, n: u64, ts: ChunkTs, out: &mut Vec<Http1Event>) {
        let mut n = n;
        while n > 0 {
            match self.state {
                State::Start => {
                    self.fresh = false;
                    out.push(Http1Event::Error(Http1Error::GapInHead));
                    self.state = State::Resync {
                        at_line_start: false,
                    };
                }
                State::Head => self.gap_in_head(ts, out),
                State::Body { remaining } => {
                    let take = n.min(remaining);
                    n -= take;
                    self.body_lost(take);
                    match remaining.saturating_sub(take) {
                        0 => self.end_message(ts, false, out),
                        left => self.state = State::Body { remaining: left },
                    }
                }
                State::ChunkData { remaining } => {
                    let take = n.min(remaining);
                    n -= take;
                    self.body_lost(take);
                    self.state = match remaining.saturating_sub(take) {
                        0 => State::ChunkDataEnd { seen_cr: false },
                        left => State::ChunkData { remaining: left },
                    };
                }
                State::ChunkDataEnd { seen_cr } => {
                    // The lost line end is assumed to be the CRLF every sender writes.
                    let need = if seen_cr { 1 } else { 2 };
                    let take = n.min(need);
                    n -= take;
                    if take == need {
                        self.line.clear();
                        self.state = State::ChunkSize;
                    } else {
                        self.state = State::ChunkDataEnd { seen_cr: true };
                    }
                }
                State::ChunkSize => self.abort_body(Http1Error::GapInChunkSize, ts, out),
                State::Trailers { .. } => {
                    // The body itself arrived whole; only where the message ends is unknown.
                    self.end_message(ts, false, out);
                    out.push(Http1Event::Error(Http1Error::GapInTrailers));
                    self.state = State::LostBody;
                }
                State::UntilClose => {
                    self.body_lost(n);
                    n = 0;
                }
                State::Resync { .. } => {
                    self.state = State::Resync {
                        at_line_start: false,
                    };
                    n = 0;
                }
                State::Tunnel | State::NotHttp | State::LostBody => n = 0,
            }
        }
    }

    /// The connection closed. Ends a read-until-close body; a message whose head was complete
    /// but whose body was not is emitted with `body_incomplete`.
    pub fn close(&mut self, ts: ChunkTs, out: &mut Vec<Http1Event>) {
        match self.state {
            State::Head => {
                if !self.tentative && !self.head.is_empty() {
                    out.push(Http1Event::Error(Http1Error::IncompleteHead));
                }
                self.reset_head();
                self.state = State::Start;
            }
            State::Body { .. }
            | State::ChunkSize
            | State::ChunkData { .. }
            | State::ChunkDataEnd { .. }
            | State::Trailers { .. } => self.end_message(ts, true, out),
            State::UntilClose => self.end_message(ts, false, out),
            State::Start | State::Resync { .. } | State::LostBody => self.state = State::Start,
            State::Tunnel | State::NotHttp => {}
        }
        self.pending.clear();
        self.upgrade_pending = false;
    }

    /// Response side only (ignored on the request side): the method of the next request sent
    /// on this connection, in order, so HEAD responses get no body and a 2xx to CONNECT turns
    /// the stream into an opaque tunnel.
    pub fn push_request_method(&mut self, method: &str) {
        if self.side != Side::Response {
            return;
        }
        let kind = match method {
            "HEAD" => MethodKind::Head,
            "CONNECT" => MethodKind::Connect,
            _ => MethodKind::Other,
        };
        if self.pending.len() >= MAX_PENDING_METHODS {
            self.pending.pop_front();
            self.dropped_methods = self.dropped_methods.saturating_add(1);
        }
        self.pending.push_back(kind);
    }

    /// Methods dropped because more than [`MAX_PENDING_METHODS`] were queued.
    pub fn dropped_methods(&self) -> u64 {
        self.dropped_methods
    }

    /// True while the parser is between messages (nothing buffered), including while it is
    /// looking for the next message after an error.
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Start | State::Resync { .. })
    }

    /// True once the stream's first bytes were not an HTTP/1.x start line; further input is
    /// ignored.
    pub fn is_not_http(&self) -> bool {
        self.state == State::NotHttp
    }

    /// True once the connection switched to another protocol (101, 2xx to CONNECT, or on the
    /// request side non-HTTP bytes after an upgrade request); further input is ignored.
    pub fn is_tunnel(&self) -> bool {
        self.state == State::Tunnel
    }

    /// Consumes a prefix of `rest` (possibly none, if the state changes) and returns its length.
    fn step(&mut self, rest: &[u8], ts: ChunkTs, out: &mut Vec<Http1Event>) -> usize {
        match self.state {
            State::Start => {
                // Blank lines between messages are tolerated (RFC 9112 §2.2), e.g. a CRLF some
                // clients add after a POST body.
                let skip = rest
                    .iter()
                    .take_while(|&&b| b == b'\r' || b == b'\n')
                    .count();
                if skip == 0 {
                    self.begin_head(ts, false);
                }
                skip
            }
            State::Resync { at_line_start } => {
                if at_line_start
                    && let Some(&b) = rest.first()
                    && LineScan::new(self.side).step(b).is_some()
                {
                    self.begin_head(ts, true);
                    return 0;
                }
                match rest.iter().position(|&b| b == b'\n') {
                    Some(p) => {
                        self.state = State::Resync {
                            at_line_start: true,
                        };
                        p + 1
                    }
                    None => {
                        self.state = State::Resync {
                            at_line_start: false,
                        };
                        rest.len()
                    }
                }
            }
            State::Head => self.step_head(rest, ts, out),
            State::Body { remaining } => {
                let take = take_len(remaining, rest.len());
                self.body_bytes(rest.get(..take).unwrap_or_default());
                match remaining.saturating_sub(take as u64) {
                    0 => self.end_message(ts, false, out),
                    left => self.state = State::Body { remaining: left },
                }
                take
            }
            State::ChunkSize => self.step_chunk_size(rest, ts, out),
            State::ChunkData { remaining } => {
                let take = take_len(remaining, rest.len());
                self.body_bytes(rest.get(..take).unwrap_or_default());
                self.state = match remaining.saturating_sub(take as u64) {
                    0 => State::ChunkDataEnd { seen_cr: false },
                    left => State::ChunkData { remaining: left },
                };
                take
            }
            State::ChunkDataEnd { seen_cr } => match rest.first() {
                Some(b'\r') if !seen_cr => {
                    self.state = State::ChunkDataEnd { seen_cr: true };
                    1
                }
                Some(b'\n') => {
                    self.line.clear();
                    self.state = State::ChunkSize;
                    1
                }
                _ => {
                    self.abort_body(Http1Error::BadChunkEnd, ts, out);
                    0
                }
            },
            State::Trailers {
                mut line_has_content,
                mut bytes,
            } => {
                for (i, &b) in rest.iter().enumerate() {
                    if bytes >= MAX_HEAD_BYTES {
                        self.end_message(ts, false, out);
                        out.push(Http1Event::Error(Http1Error::TrailersTooLong));
                        self.state = State::Resync {
                            at_line_start: false,
                        };
                        return i;
                    }
                    bytes += 1;
                    match b {
                        b'\n' if !line_has_content => {
                            self.end_message(ts, false, out);
                            return i + 1;
                        }
                        b'\n' => line_has_content = false,
                        b'\r' => {}
                        _ => line_has_content = true,
                    }
                }
                self.state = State::Trailers {
                    line_has_content,
                    bytes,
                };
                rest.len()
            }
            State::UntilClose => {
                self.body_bytes(rest);
                rest.len()
            }
            State::Tunnel | State::NotHttp | State::LostBody => rest.len(),
        }
    }

    fn begin_head(&mut self, ts: ChunkTs, tentative: bool) {
        self.reset_head();
        self.tentative = tentative;
        self.head_first = ts;
        self.state = State::Head;
    }

    fn reset_head(&mut self) {
        self.head.clear();
        // An agent holds a parser per connection; one huge head must not pin 16 KiB on each.
        self.head.shrink_to(HEAD_KEEP_CAPACITY);
        self.start_line_end = 0;
        self.line_start = 0;
        self.scan = LineScan::new(self.side);
        self.tentative = false;
    }

    fn step_head(&mut self, rest: &[u8], ts: ChunkTs, out: &mut Vec<Http1Event>) -> usize {
        if self.start_line_end == 0 {
            for (i, &b) in rest.iter().enumerate() {
                if self.head.len() >= MAX_HEAD_BYTES {
                    self.head_too_long(out);
                    return i;
                }
                let Some(next) = self.scan.step(b) else {
                    self.reject_start_line(out);
                    return i;
                };
                self.head.push(b);
                self.scan = next;
                if next == LineScan::Done {
                    self.start_line_end = self.head.len();
                    self.line_start = self.head.len();
                    // A whole valid start line: from here on this is a message, not a guess.
                    self.tentative = false;
                    self.fresh = false;
                    self.upgrade_pending = false;
                    return i + 1;
                }
            }
            return rest.len();
        }

        let (take, line_done) = match rest.iter().position(|&b| b == b'\n') {
            Some(p) => (p + 1, true),
            None => (rest.len(), false),
        };
        let room = MAX_HEAD_BYTES.saturating_sub(self.head.len());
        if take > room {
            // Fail at the first byte that does not fit, so the outcome is split-independent.
            self.head_too_long(out);
            return room;
        }
        self.head
            .extend_from_slice(rest.get(..take).unwrap_or_default());
        if line_done {
            let line = self.head.get(self.line_start..).unwrap_or_default();
            if line == b"\n" || line == b"\r\n" {
                self.head_complete(ts, out);
            } else {
                self.line_start = self.head.len();
            }
        }
        take
    }

    fn reject_start_line(&mut self, out: &mut Vec<Http1Event>) {
        let tentative = self.tentative;
        self.reset_head();
        // The byte that failed is not consumed, and the bytes before it held no line end, so
        // resync sees every later line start.
        self.state = State::Resync {
            at_line_start: false,
        };
        if tentative {
            return;
        }
        if self.upgrade_pending {
            self.upgrade_pending = false;
            self.state = State::Tunnel;
        } else if self.fresh {
            self.fresh = false;
            self.state = State::NotHttp;
            out.push(Http1Event::Error(Http1Error::NotHttp));
        } else {
            out.push(Http1Event::Error(Http1Error::BadStartLine));
        }
    }

    fn head_too_long(&mut self, out: &mut Vec<Http1Event>) {
        let tentative = self.tentative;
        if !tentative {
            self.note_response_status();
            self.fresh = false;
            out.push(Http1Event::Error(Http1Error::HeadTooLong));
        }
        self.reset_head();
        self.state = State::Resync {
            at_line_start: false,
        };
    }

    fn gap_in_head(&mut self, ts: ChunkTs, out: &mut Vec<Http1Event>) {
        if !self.tentative {
            self.fresh = false;
            if self.start_line_end > 0 {
                // Big heads (cookies, long URLs) are the usual victims; what was captured still
                // names the request, so emit it rather than lose the span.
                let headers_end = self.line_start;
                let parsed = self
                    .head
                    .get(..headers_end)
                    .and_then(|h| parse_head(h, self.start_line_end).ok());
                self.note_response_status();
                if let Some(mut msg) = parsed {
                    msg.first = self.head_first;
                    msg.last = ts;
                    msg.head_truncated = true;
                    msg.body_incomplete = true;
                    out.push(Http1Event::Message(msg));
                }
            }
            out.push(Http1Event::Error(Http1Error::GapInHead));
        }
        self.reset_head();
        self.state = State::Resync {
            at_line_start: false,
        };
    }

    /// A response head that will not become a message still answered a request, unless it
    /// was an interim 1xx.
    fn note_response_status(&mut self) {
        if self.side != Side::Response {
            return;
        }
        let line = self.head.get(..self.start_line_end).unwrap_or_default();
        if let Ok((StartLine::Response { status, .. }, _)) = parse_start_line(line)
            && consumes_method(status)
        {
            self.pending.pop_front();
        }
    }

    fn head_complete(&mut self, ts: ChunkTs, out: &mut Vec<Http1Event>) {
        let parsed = parse_head(&self.head, self.start_line_end);
        let mut msg = match parsed {
            Ok(msg) => msg,
            Err(e) => {
                self.note_response_status();
                self.reset_head();
                out.push(Http1Event::Error(e));
                self.state = State::Resync {
                    at_line_start: true,
                };
                return;
            }
        };
        let framing = Framing::from_headers(&self.head, self.start_line_end);
        msg.first = self.head_first;
        msg.last = ts;
        self.reset_head();
        let kind = match self.body_kind(&msg, &framing) {
            Ok(kind) => kind,
            Err(e) => {
                out.push(Http1Event::Error(e));
                self.state = State::Resync {
                    at_line_start: true,
                };
                return;
            }
        };
        match kind {
            BodyKind::None | BodyKind::Length(0) => {
                out.push(Http1Event::Message(msg));
                self.state = State::Start;
            }
            BodyKind::Tunnel => {
                out.push(Http1Event::Message(msg));
                self.state = State::Tunnel;
            }
            BodyKind::Length(n) => self.begin_body(msg, State::Body { remaining: n }),
            BodyKind::Chunked => {
                self.line.clear();
                self.begin_body(msg, State::ChunkSize);
            }
            BodyKind::UntilClose => self.begin_body(msg, State::UntilClose),
        }
    }

    /// RFC 9112 §6.3, plus the request method a response answers.
    fn body_kind(&mut self, msg: &Http1Message, f: &Framing) -> Result<BodyKind, Http1Error> {
        let length = |f: &Framing, none: BodyKind| match (f.content_length_error, f.content_length)
        {
            (Some(e), _) => Err(e),
            (None, Some(n)) => Ok(BodyKind::Length(n)),
            (None, None) => Ok(none),
        };
        match &msg.start_line {
            StartLine::Request { method, .. } => {
                if method == "CONNECT" {
                    self.upgrade_pending = true;
                    return Ok(BodyKind::None);
                }
                self.upgrade_pending = f.upgrade;
                if f.has_te {
                    // A request cannot be delimited by close, so anything but chunked last
                    // leaves its length unknowable (RFC 9112 §6.3 item 4).
                    if f.chunked_last {
                        Ok(BodyKind::Chunked)
                    } else {
                        Err(Http1Error::BadTransferEncoding)
                    }
                } else {
                    length(f, BodyKind::None)
                }
            }
            StartLine::Response { status, .. } => {
                let status = *status;
                if status == 101 {
                    self.pending.pop_front();
                    return Ok(BodyKind::Tunnel);
                }
                if status < 200 {
                    // Interim responses precede the real answer to the same request.
                    return Ok(BodyKind::None);
                }
                let method = self.pending.pop_front().unwrap_or(MethodKind::Other);
                if method == MethodKind::Head || status == 204 || status == 304 {
                    return Ok(BodyKind::None);
                }
                if method == MethodKind::Connect && (200..300).contains(&status) {
                    return Ok(BodyKind::Tunnel);
                }
                if f.has_te {
                    Ok(if f.chunked_last {
                        BodyKind::Chunked
                    } else {
                        BodyKind::UntilClose
                    })
                } else {
                    length(f, BodyKind::UntilClose)
                }
            }
        }
    }

    fn begin_body(&mut self, msg: Http1Message, state: State) {
        self.msg = Some(msg);
        self.body_gap = false;
        self.state = state;
    }

    fn body_bytes(&mut self, bytes: &[u8]) {
        let Some(msg) = self.msg.as_mut() else {
            return;
        };
        msg.body_len = msg.body_len.saturating_add(bytes.len() as u64);
        if !self.body_gap {
            let room = MAX_BODY_PREFIX.saturating_sub(msg.body_prefix.len());
            let keep = bytes.get(..room.min(bytes.len())).unwrap_or_default();
            msg.body_prefix.extend_from_slice(keep);
        }
    }

    fn body_lost(&mut self, n: u64) {
        if let Some(msg) = self.msg.as_mut() {
            msg.body_len = msg.body_len.saturating_add(n);
        }
        self.body_gap = true;
    }

    fn step_chunk_size(&mut self, rest: &[u8], ts: ChunkTs, out: &mut Vec<Http1Event>) -> usize {
        let (take, line_done) = match rest.iter().position(|&b| b == b'\n') {
            Some(p) => (p + 1, true),
            None => (rest.len(), false),
        };
        let room = MAX_CHUNK_LINE_BYTES.saturating_sub(self.line.len());
        if take > room {
            self.abort_body(Http1Error::ChunkLineTooLong, ts, out);
            return room;
        }
        self.line
            .extend_from_slice(rest.get(..take).unwrap_or_default());
        if line_done {
            match parse_chunk_size(&self.line) {
                Ok(0) => {
                    self.state = State::Trailers {
                        line_has_content: false,
                        bytes: 0,
                    }
                }
                Ok(n) => self.state = State::ChunkData { remaining: n },
                Err(e) => self.abort_body(e, ts, out),
            }
            self.line.clear();
        }
        take
    }

    /// Ends the current body early because of `error`, then resyncs.
    fn abort_body(&mut self, error: Http1Error, ts: ChunkTs, out: &mut Vec<Http1Event>) {
        self.end_message(ts, true, out);
        out.push(Http1Event::Error(error));
        self.line.clear();
        self.state = State::LostBody;
    }

    /// Records of this connection were lost (the ring buffer was full): whatever was in
    /// progress ends incomplete, and nothing is parsed until the other direction moves,
    /// since the next bytes may be the middle of a message.
    pub fn lost(&mut self, ts: ChunkTs, out: &mut Vec<Http1Event>) {
        match self.state {
            State::Tunnel | State::NotHttp => return,
            State::Head => self.reset_head(),
            _ => {}
        }
        self.fresh = false;
        self.end_message(ts, true, out);
        self.line.clear();
        // Which requests the lost records answered is unknown.
        self.pending.clear();
        self.state = State::LostBody;
    }

    /// The other direction of the connection carried bytes. A body whose framing was lost
    /// ends there: a server answers after the whole request, a client asks again after the
    /// whole response.
    pub fn peer_moved(&mut self) {
        if self.state == State::LostBody {
            self.state = State::Start;
        }
    }

    /// Emits the message being counted, if any, and waits for the next one.
    fn end_message(&mut self, ts: ChunkTs, incomplete: bool, out: &mut Vec<Http1Event>) {
        if let Some(mut msg) = self.msg.take() {
            msg.last = ts;
            msg.body_incomplete = incomplete;
            out.push(Http1Event::Message(msg));
        }
        self.body_gap = false;
        self.state = State::Start;
    }
}

/// Bytes of a body with `remaining` bytes left that lie in a chunk of `avail` bytes.
fn take_len(remaining: u64, avail: usize) -> usize {
    usize::try_from(remaining).map_or(avail, |r| r.min(avail))
}

fn consumes_method(status: u16) -> bool {
    status == 101 || status >= 200
}

/// Strips a trailing LF and then a trailing CR.
fn strip_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', tail @ ..] = v {
        v = tail;
    }
    while let [head @ .., b' ' | b'\t'] = v {
        v = head;
    }
    v
}

/// RFC 9110 token characters.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn parse_minor(version: &[u8]) -> Option<u8> {
    match version {
        [b'H', b'T', b'T', b'P', b'/', b'1', b'.', d] if d.is_ascii_digit() => Some(d - b'0'),
        _ => None,
    }
}

/// Parses a start line (line end optional) into its parts and the HTTP/1 minor version.
fn parse_start_line(line: &[u8]) -> Result<(StartLine, u8), Http1Error> {
    let line = strip_eol(line);
    let mut parts = line.splitn(3, |&b| b == b' ');
    let first = parts.next().unwrap_or_default();
    let second = parts.next().ok_or(Http1Error::BadStartLine)?;
    let third = parts.next();
    if let Some(minor) = parse_minor(first) {
        let status = match second {
            [a, b, c] if [a, b, c].iter().all(|d| d.is_ascii_digit()) && *a != b'0' => {
                u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0')
            }
            _ => return Err(Http1Error::BadStartLine),
        };
        let reason = lossy(third.unwrap_or_default());
        return Ok((StartLine::Response { status, reason }, minor));
    }
    let minor = third
        .and_then(parse_minor)
        .ok_or(Http1Error::BadStartLine)?;
    let method_ok = !first.is_empty()
        && first.len() <= MAX_METHOD_LEN
        && first
            .iter()
            .all(|&b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !method_ok || second.is_empty() || second.iter().any(|&b| b <= b' ' || b == 0x7f) {
        return Err(Http1Error::BadStartLine);
    }
    Ok((
        StartLine::Request {
            method: lossy(first),
            target: lossy(second),
        },
        minor,
    ))
}

/// Splits `name: value`, trimming optional whitespace around the value.
fn parse_header_line(line: &[u8]) -> Result<(&[u8], &[u8]), Http1Error> {
    let colon = line
        .iter()
        .position(|&b| b == b':')
        .ok_or(Http1Error::BadHeader)?;
    let name = line.get(..colon).unwrap_or_default();
    let value = line.get(colon + 1..).unwrap_or_default();
    // Whitespace before the colon (and so obs-fold lines) is rejected, as RFC 9112 §5.1 asks.
    if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
        return Err(Http1Error::BadHeader);
    }
    Ok((name, trim_ows(value)))
}

/// Header lines of `head` after its start line, up to the blank line or the end.
fn header_lines(head: &[u8], start_line_end: usize) -> impl Iterator<Item = &[u8]> {
    head.get(start_line_end..)
        .unwrap_or_default()
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .take_while(|l| !l.is_empty())
}

/// Parses a head (or the complete lines of a truncated one) into a message without body.
fn parse_head(head: &[u8], start_line_end: usize) -> Result<Http1Message, Http1Error> {
    let (start_line, minor_version) =
        parse_start_line(head.get(..start_line_end).unwrap_or_default())?;
    let mut headers = Vec::new();
    let mut kept_bytes = 0usize;
    let mut dropped_headers = 0u32;
    for line in header_lines(head, start_line_end) {
        let (name, value) = parse_header_line(line)?;
        let size = name.len() + value.len();
        if headers.len() < MAX_HEADERS && kept_bytes + size <= MAX_HEADER_BYTES {
            kept_bytes += size;
            headers.push((lossy(name), lossy(value)));
        } else {
            dropped_headers = dropped_headers.saturating_add(1);
        }
    }
    Ok(Http1Message {
        start_line,
        minor_version,
        headers,
        dropped_headers,
        body_len: 0,
        body_prefix: Vec::new(),
        first: ChunkTs::default(),
        last: ChunkTs::default(),
        head_truncated: false,
        body_incomplete: false,
    })
}

/// The headers that decide where a message ends. Read from the raw head rather than the kept
/// headers, so dropping headers for space never changes framing.
#[derive(Debug, Default)]
struct Framing {
    content_length: Option<u64>,
    content_length_error: Option<Http1Error>,
    has_te: bool,
    chunked_last: bool,
    upgrade: bool,
}

impl Framing {
    fn from_headers(head: &[u8], start_line_end: usize) -> Self {
        let mut f = Framing::default();
        for line in header_lines(head, start_line_end) {
            let Ok((name, value)) = parse_header_line(line) else {
                continue;
            };
            if name.eq_ignore_ascii_case(b"content-length") {
                f.add_content_length(value);
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                f.has_te = true;
                // The last coding named, across repeated headers, is the one that delimits.
                for coding in value.split(|&b| b == b',') {
                    let coding = coding.split(|&b| b == b';').next().unwrap_or_default();
                    let coding = trim_ows(coding);
                    if !coding.is_empty() {
                        f.chunked_last = coding.eq_ignore_ascii_case(b"chunked");
                    }
                }
            } else if name.eq_ignore_ascii_case(b"upgrade") {
                f.upgrade = true;
            }
        }
        f
    }

    /// Repeated or comma-listed identical values are one length (RFC 9112 §6.3 item 5);
    /// differing ones are an error, since a guess could desynchronise the stream.
    fn add_content_length(&mut self, value: &[u8]) {
        if self.content_length_error.is_some() {
            return;
        }
        for item in value.split(|&b| b == b',') {
            let item = trim_ows(item);
            let Some(n) = parse_decimal(item) else {
                self.content_length_error = Some(Http1Error::BadContentLength);
                return;
            };
            match self.content_length {
                Some(old) if old != n => {
                    self.content_length_error = Some(Http1Error::ConflictingContentLength);
                    return;
                }
                _ => self.content_length = Some(n),
            }
        }
    }
}

fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &b| {
        if !b.is_ascii_digit() {
            return None;
        }
        acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

/// `size [; extensions] CRLF`, size in hex.
fn parse_chunk_size(line: &[u8]) -> Result<u64, Http1Error> {
    let line = strip_eol(line);
    let digits_end = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    let digits = line.get(..digits_end).unwrap_or_default();
    let tail = trim_ows(line.get(digits_end..).unwrap_or_default());
    // Only whitespace, then optionally extensions (not interpreted), may follow the size.
    if digits.is_empty() || !(tail.is_empty() || tail.starts_with(b";")) {
        return Err(Http1Error::BadChunkSize);
    }
    digits.iter().try_fold(0u64, |acc, &b| {
        let d = char::from(b).to_digit(16).ok_or(Http1Error::BadChunkSize)?;
        acc.checked_mul(16)
            .and_then(|v| v.checked_add(u64::from(d)))
            .ok_or(Http1Error::BadChunkSize)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        Feed(Vec<u8>),
        Gap(u64),
        Close,
        /// The other direction of the connection carried bytes.
        PeerMoved,
    }

    fn feed(b: impl AsRef<[u8]>) -> Op {
        Op::Feed(b.as_ref().to_vec())
    }

    /// Op `i` happens at a distinct, recognisable time.
    fn ts(i: usize) -> ChunkTs {
        let n = (i as u64 + 1) * 100;
        ChunkTs {
            enter_ns: n,
            exit_ns: n + 1,
        }
    }

    fn run_parser(p: &mut Http1Parser, ops: &[Op]) -> Vec<Http1Event> {
        let mut out = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            match op {
                Op::Feed(b) => p.feed(b, ts(i), &mut out),
                Op::Gap(n) => p.gap(*n, ts(i), &mut out),
                Op::Close => p.close(ts(i), &mut out),
                Op::PeerMoved => p.peer_moved(),
            }
        }
        out
    }

    fn run(side: Side, methods: &[&str], ops: &[Op]) -> Vec<Http1Event> {
        let mut p = Http1Parser::new(side);
        for m in methods {
            p.push_request_method(m);
        }
        run_parser(&mut p, ops)
    }

    fn strip_ts(events: Vec<Http1Event>) -> Vec<Http1Event> {
        events
            .into_iter()
            .map(|e| match e {
                Http1Event::Message(mut m) => {
                    m.first = ChunkTs::default();
                    m.last = ChunkTs::default();
                    Http1Event::Message(m)
                }
                e => e,
            })
            .collect()
    }

    fn messages(events: &[Http1Event]) -> Vec<&Http1Message> {
        events
            .iter()
            .filter_map(|e| match e {
                Http1Event::Message(m) => Some(m),
                Http1Event::Error(_) => None,
            })
            .collect()
    }

    fn errors(events: &[Http1Event]) -> Vec<Http1Error> {
        events
            .iter()
            .filter_map(|e| match e {
                Http1Event::Error(e) => Some(*e),
                Http1Event::Message(_) => None,
            })
            .collect()
    }

    fn method_target(m: &Http1Message) -> (&str, &str) {
        match &m.start_line {
            StartLine::Request { method, target } => (method, target),
            StartLine::Response { .. } => panic!("expected a request, got {m:?}"),
        }
    }

    fn status(m: &Http1Message) -> u16 {
        match &m.start_line {
            StartLine::Response { status, .. } => *status,
            StartLine::Request { .. } => panic!("expected a response, got {m:?}"),
        }
    }

    fn chunked(parts: &[&[u8]]) -> Vec<u8> {
        let mut v = Vec::new();
        for p in parts {
            v.extend_from_slice(format!("{:x}\r\n", p.len()).as_bytes());
            v.extend_from_slice(p);
            v.extend_from_slice(b"\r\n");
        }
        v.extend_from_slice(b"0\r\n\r\n");
        v
    }

    // ---- recorded byte sequences -------------------------------------------------------

    const CURL_GET: &[u8] = b"GET /index.html HTTP/1.1\r\nHost: example.com\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n";
    const OK_13: &[u8] =
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\nHello, world!";
    const GUNICORN: &[u8] = b"HTTP/1.1 200 OK\r\nServer: gunicorn\r\nDate: Tue, 25 Nov 2025 17:33:02 GMT\r\nConnection: close\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: 5\r\n\r\nhello";
    /// Python's http.client sends head and a bytes body in one send().
    const PY_CLIENT: &[u8] = b"POST /v1/sandbox/run HTTP/1.1\r\nHost: sandbox:8194\r\nAccept-Encoding: identity\r\nContent-Length: 64\r\nX-Api-Key: dify-sandbox\r\nContent-Type: application/json\r\n\r\n{\"language\":\"python3\",\"code\":\"print(1)\",\"enable_network\":false}\n";
    const CHUNKED_WIKI: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\nTrailer: Expires\r\n\r\n4;name=value\r\nWiki\r\n5\r\npedia\r\nE ; foo=\"bar\"\r\n in\r\n\r\nchunks.\r\n0\r\nExpires: Wed, 21 Oct 2015 07:28:00 GMT\r\n\r\nHTTP/1.1 204 No Content\r\nServer: x\r\n\r\n";

    struct Recording {
        name: &'static str,
        side: Side,
        methods: Vec<&'static str>,
        ops: Vec<Op>,
    }

    fn rec(name: &'static str, side: Side, methods: &[&'static str], ops: Vec<Op>) -> Recording {
        Recording {
            name,
            side,
            methods: methods.to_vec(),
            ops,
        }
    }

    /// The captured first 4096 bytes of a POST whose body is `len` bytes, and the rest's size.
    fn big_post(len: usize) -> (Vec<u8>, u64) {
        let mut v = format!(
            "POST /upload HTTP/1.1\r\nHost: api:5001\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\n\r\n"
        )
        .into_bytes();
        let total = v.len() + len;
        v.extend((0..4096 - v.len()).map(|i| (i % 251) as u8));
        (v, (total - 4096) as u64)
    }

    fn recordings() -> Vec<Recording> {
        let sse = {
            let mut v = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            v.extend(chunked(&[
                b"data: {\"code\":0,\"message\":\"success\",\"data\":{\"delta\":\"Hel\"}}\n\n",
                b"data: {\"code\":0,\"message\":\"success\",\"data\":{\"delta\":{\"usage\":{\"total_tokens\":7}}}}\n\n",
            ]));
            v
        };
        let big = big_post(1_000_000);
        vec![
            rec("simple get", Side::Request, &[], vec![feed(CURL_GET)]),
            rec("simple 200", Side::Response, &["GET"], vec![feed(OK_13)]),
            rec(
                "keep-alive requests",
                Side::Request,
                &[],
                vec![
                    feed(CURL_GET),
                    feed(b"POST /api/chat HTTP/1.1\r\nHost: api\r\nContent-Length: 11\r\n\r\n{\"q\":\"hi\"}\n"),
                    feed(b"GET /health HTTP/1.1\r\nHost: api\r\n\r\n"),
                ],
            ),
            rec(
                "pipelined requests",
                Side::Request,
                &[],
                vec![feed(
                    b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nPUT /b HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nxyzDELETE /c?x=1 HTTP/1.1\r\nHost: h\r\n\r\n",
                )],
            ),
            rec("chunked with extensions and trailers", Side::Response, &["GET", "GET"], vec![feed(CHUNKED_WIKI)]),
            rec("plugin daemon sse", Side::Response, &["POST"], vec![feed(&sse)]),
            rec(
                "100-continue",
                Side::Response,
                &["POST", "HEAD", "GET"],
                vec![
                    feed(b"HTTP/1.1 100 Continue\r\n\r\n"),
                    feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
                    feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"),
                    feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n!"),
                ],
            ),
            rec(
                "101 upgrade",
                Side::Response,
                &["GET"],
                vec![
                    feed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x05hello"),
                    feed(b"\x81\x7e\x00\x04HTTP/1.1 200 OK\r\n\r\n"),
                ],
            ),
            rec(
                "upgrade request then frames",
                Side::Request,
                &[],
                vec![
                    feed(b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"),
                    feed(b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"),
                ],
            ),
            rec(
                "head then 200",
                Side::Response,
                &["HEAD", "GET"],
                vec![feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")],
            ),
            rec(
                "204 and 304",
                Side::Response,
                &["DELETE", "GET", "GET"],
                vec![
                    feed(b"HTTP/1.1 204 No Content\r\nDate: x\r\n\r\n"),
                    feed(b"HTTP/1.1 304 Not Modified\r\nETag: \"abc\"\r\nContent-Length: 99\r\n\r\n"),
                    feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"),
                ],
            ),
            rec(
                "read until close",
                Side::Response,
                &["GET"],
                vec![feed(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nsome data\n"), feed(b"more"), Op::Close],
            ),
            rec(
                "big body with gap",
                Side::Request,
                &[],
                vec![feed(&big.0), Op::Gap(big.1), feed(CURL_GET)],
            ),
            rec(
                "chunked body with gaps",
                Side::Response,
                &["GET", "GET"],
                vec![
                    feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2000\r\nabcd"),
                    Op::Gap(0x2000 - 4 + 1),
                    feed(b"\n10\r\n0123456789"),
                    Op::Gap(6 + 2),
                    feed(b"0\r\n\r\n"),
                    feed(GUNICORN),
                ],
            ),
            rec(
                "garbage first",
                Side::Request,
                &[],
                vec![feed(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"), feed(CURL_GET)],
            ),
            rec(
                "garbage mid-stream",
                Side::Request,
                &[],
                vec![feed(CURL_GET), feed(b"\x00\x01 junk junk\r\nmore junk\n"), feed(b"GET /after HTTP/1.1\r\n\r\n")],
            ),
            rec(
                "malformed header",
                Side::Request,
                &[],
                vec![feed(b"GET /a HTTP/1.1\r\nHost a\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")],
            ),
            rec("gunicorn", Side::Response, &["GET"], vec![feed(GUNICORN), Op::Close]),
            rec("python http.client", Side::Request, &[], vec![feed(PY_CLIENT)]),
            rec(
                "bare lf and leading blank lines",
                Side::Request,
                &[],
                vec![feed(b"\r\nGET /x HTTP/1.0\nHost: h\nContent-Length: 2\n\nab\r\nGET /y HTTP/1.1\n\n")],
            ),
            rec(
                "chunked request",
                Side::Request,
                &[],
                vec![feed(b"POST /inner/api/invoke/llm HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")],
            ),
            rec(
                "gap in head",
                Side::Request,
                &[],
                vec![
                    feed(b"GET /big HTTP/1.1\r\nHost: h\r\nCookie: aaaa"),
                    Op::Gap(5000),
                    feed(b"GET /next HTTP/1.1\r\n\r\n"),
                ],
            ),
            rec(
                "gap in chunk size",
                Side::Response,
                &["GET", "GET"],
                vec![
                    feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n1"),
                    Op::Gap(100),
                    // Until the client asks again, whatever follows is the lost body.
                    feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
                    Op::PeerMoved,
                    feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
                ],
            ),
            rec(
                "connect tunnel",
                Side::Response,
                &["CONNECT"],
                vec![feed(b"HTTP/1.1 200 Connection Established\r\n\r\n\x16\x03\x03\x00\x7a\x02")],
            ),
            rec(
                "close mid body",
                Side::Response,
                &["GET"],
                vec![feed(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial"), Op::Close],
            ),
        ]
    }

    fn recording(name: &str) -> Recording {
        recordings()
            .into_iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("no recording {name}"))
    }

    fn run_rec(name: &str) -> Vec<Http1Event> {
        let r = recording(name);
        run(r.side, &r.methods, &r.ops)
    }

    // ---- behaviour ---------------------------------------------------------------------

    #[test]
    fn simple_get_and_200() {
        let ev = run_rec("simple get");
        let m = messages(&ev);
        assert_eq!(m.len(), 1, "{ev:?}");
        assert_eq!(method_target(m[0]), ("GET", "/index.html"));
        assert_eq!(m[0].minor_version, 1);
        assert_eq!(m[0].header("host"), Some("example.com"));
        assert_eq!(m[0].header("USER-AGENT"), Some("curl/8.5.0"));
        assert_eq!(m[0].headers.len(), 3);
        assert_eq!((m[0].body_len, m[0].first, m[0].last), (0, ts(0), ts(0)));

        let ev = run_rec("simple 200");
        let m = messages(&ev);
        assert_eq!(m.len(), 1, "{ev:?}");
        assert_eq!(
            m[0].start_line,
            StartLine::Response {
                status: 200,
                reason: "OK".into()
            }
        );
        assert_eq!(m[0].body_len, 13);
        assert_eq!(m[0].body_prefix, b"Hello, world!");
        assert!(!m[0].body_incomplete && !m[0].head_truncated);
    }

    #[test]
    fn keep_alive_requests() {
        let ev = run_rec("keep-alive requests");
        assert!(errors(&ev).is_empty(), "{ev:?}");
        let m = messages(&ev);
        let lines: Vec<_> = m.iter().map(|m| method_target(m)).collect();
        assert_eq!(
            lines,
            [
                ("GET", "/index.html"),
                ("POST", "/api/chat"),
                ("GET", "/health")
            ]
        );
        assert_eq!(m[1].body_prefix, b"{\"q\":\"hi\"}\n");
        assert_eq!((m[1].first, m[1].last), (ts(1), ts(1)));
        assert_eq!(m[2].first, ts(2));
    }

    #[test]
    fn pipelined_requests() {
        let ev = run_rec("pipelined requests");
        assert!(errors(&ev).is_empty(), "{ev:?}");
        let m = messages(&ev);
        let lines: Vec<_> = m.iter().map(|m| method_target(m)).collect();
        assert_eq!(lines, [("GET", "/a"), ("PUT", "/b"), ("DELETE", "/c?x=1")]);
        assert_eq!(m[1].body_prefix, b"xyz");
    }

    #[test]
    fn chunked_extensions_and_trailers() {
        let ev = run_rec("chunked with extensions and trailers");
        assert!(errors(&ev).is_empty(), "{ev:?}");
        let m = messages(&ev);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].body_len, 4 + 5 + 14);
        assert_eq!(m[0].body_prefix, b"Wikipedia in\r\n\r\nchunks.");
        assert!(!m[0].body_incomplete);
        assert_eq!(m[0].header("trailer"), Some("Expires"));
        assert_eq!(status(m[1]), 204);
    }

    #[test]
    fn plugin_daemon_sse_stream() {
        let ev = run_rec("plugin daemon sse");
        let m = messages(&ev);
        assert_eq!(m.len(), 1, "{ev:?}");
        assert!(m[0].body_prefix.starts_with(b"data: {\"code\":0"));
        assert!(m[0].body_prefix.ends_with(b"\"total_tokens\":7}}}}\n\n"));
        assert_eq!(m[0].body_len, m[0].body_prefix.len() as u64);
    }

    #[test]
    fn continue_does_not_consume_method() {
        let ev = run_rec("100-continue");
        assert!(errors(&ev).is_empty(), "{ev:?}");
        let m = messages(&ev);
        let got: Vec<_> = m.iter().map(|m| (status(m), m.body_len)).collect();
        // The 200 to HEAD carries no body, so the last 200 is read as its own message.
        assert_eq!(got, [(100, 0), (200, 2), (200, 0), (200, 1)]);
        assert_eq!((m[0].first, m[1].first), (ts(0), ts(1)));
    }

    #[test]
    fn upgrade_switches_to_tunnel() {
        let r = recording("101 upgrade");
        let mut p = Http1Parser::new(r.side);
        p.push_request_method("GET");
        let ev = run_parser(&mut p, &r.ops);
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(status(messages(&ev)[0]), 101);
        assert!(p.is_tunnel() && !p.is_not_http());

        let r = recording("upgrade request then frames");
        let mut p = Http1Parser::new(r.side);
        let ev = run_parser(&mut p, &r.ops);
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert!(p.is_tunnel());

        let r = recording("connect tunnel");
        let mut p = Http1Parser::new(r.side);
        p.push_request_method("CONNECT");
        let ev = run_parser(&mut p, &r.ops);
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert!(p.is_tunnel());
    }

    #[test]
    fn declined_upgrade_keeps_parsing() {
        let ev = run(
            Side::Request,
            &[],
            &[
                feed(b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n"),
                feed(b"GET /plain HTTP/1.1\r\n\r\n"),
            ],
        );
        assert_eq!(messages(&ev).len(), 2, "{ev:?}");
    }

    #[test]
    fn head_response_has_no_body() {
        let ev = run_rec("head then 200");
        assert!(errors(&ev).is_empty(), "{ev:?}");
        let m = messages(&ev);
        assert_eq!(m.len(), 2);
        assert_eq!(
            (m[0].body_len, m[0].header("content-length")),
            (0, Some("1234"))
        );
        assert_eq!(m[1].body_prefix, b"hi");
    }

    #[test]
    fn no_body_for_204_and_304() {
        let ev = run_rec("204 and 304");
        assert!(errors(&ev).is_empty(), "{ev:?}");
        let got: Vec<_> = messages(&ev)
            .iter()
            .map(|m| (status(m), m.body_len))
            .collect();
        assert_eq!(got, [(204, 0), (304, 0), (200, 1)]);
    }

    #[test]
    fn read_until_close() {
        let ev = run_rec("read until close");
        let m = messages(&ev);
        assert_eq!(m.len(), 1, "{ev:?}");
        assert_eq!(m[0].minor_version, 0);
        assert_eq!(m[0].body_prefix, b"some data\nmore");
        assert_eq!((m[0].first, m[0].last), (ts(0), ts(2)));
        assert!(!m[0].body_incomplete);
    }

    #[test]
    fn close_mid_body_is_incomplete() {
        let ev = run_rec("close mid body");
        let m = messages(&ev);
        assert_eq!(m.len(), 1, "{ev:?}");
        assert!(m[0].body_incomplete);
        assert_eq!((m[0].body_len, m[0].last), (7, ts(1)));
    }

    #[test]
    fn big_body_with_gap_ends_on_count() {
        let ev = run_rec("big body with gap");
        assert!(errors(&ev).is_empty(), "{ev:?}");
        let m = messages(&ev);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].body_len, 1_000_000);
        assert_eq!(m[0].body_prefix.len(), MAX_BODY_PREFIX);
        assert_eq!(m[0].body_prefix.get(..3), Some(&[0u8, 1, 2][..]));
        assert_eq!((m[0].first, m[0].last), (ts(0), ts(1)));
        assert!(!m[0].body_incomplete);
        assert_eq!(method_target(m[1]), ("GET", "/index.html"));

        let ev = run_rec("chunked body with gaps");
        assert!(errors(&ev).is_empty(), "{ev:?}");
        let m = messages(&ev);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].body_len, 0x2000 + 0x10);
        // The prefix stops at the first gap: later bytes would not follow on from it.
        assert_eq!(m[0].body_prefix, b"abcd");
        assert_eq!(m[0].last, ts(4));
        assert_eq!(m[1].body_prefix, b"hello");
    }

    #[test]
    fn garbage_first_is_not_http() {
        let r = recording("garbage first");
        let mut p = Http1Parser::new(r.side);
        let ev = run_parser(&mut p, &r.ops);
        assert_eq!(ev, [Http1Event::Error(Http1Error::NotHttp)]);
        assert!(p.is_not_http());

        // HTTP/2 with prior knowledge is not HTTP/1.x either.
        let mut p = Http1Parser::new(Side::Request);
        let mut out = Vec::new();
        p.feed(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", ts(0), &mut out);
        assert_eq!(out, [Http1Event::Error(Http1Error::NotHttp)]);

        let mut p = Http1Parser::new(Side::Response);
        p.feed(b"+OK\r\n", ts(0), &mut out);
        assert!(p.is_not_http());
    }

    #[test]
    fn garbage_mid_stream_recovers() {
        let ev = run_rec("garbage mid-stream");
        assert_eq!(errors(&ev), [Http1Error::BadStartLine]);
        let m = messages(&ev);
        assert_eq!(m.len(), 2);
        assert_eq!(method_target(m[1]), ("GET", "/after"));
        assert_eq!(m[1].first, ts(2));
    }

    #[test]
    fn malformed_header_then_recovery() {
        let ev = run_rec("malformed header");
        assert_eq!(ev.first(), Some(&Http1Event::Error(Http1Error::BadHeader)));
        let m = messages(&ev);
        assert_eq!(m.len(), 1, "{ev:?}");
        assert_eq!(method_target(m[0]), ("GET", "/b"));

        let ev = run(
            Side::Request,
            &[],
            &[feed(
                b"GET /a HTTP/1.1\r\n folded: x\r\n\r\nGET /b HTTP/1.1\r\n\r\n",
            )],
        );
        assert_eq!(errors(&ev), [Http1Error::BadHeader]);
        assert_eq!(messages(&ev).len(), 1);
    }

    #[test]
    fn gunicorn_response() {
        let ev = run_rec("gunicorn");
        let m = messages(&ev);
        assert_eq!(m.len(), 1, "{ev:?}");
        assert_eq!(m[0].header("server"), Some("gunicorn"));
        assert_eq!(
            m[0].header("content-type"),
            Some("text/html; charset=utf-8")
        );
        assert_eq!(m[0].body_prefix, b"hello");
        assert_eq!(m[0].last, ts(0));
    }

    #[test]
    fn python_http_client_request() {
        let ev = run_rec("python http.client");
        let m = messages(&ev);
        assert_eq!(m.len(), 1, "{ev:?}");
        assert_eq!(method_target(m[0]), ("POST", "/v1/sandbox/run"));
        assert_eq!(m[0].header("accept-encoding"), Some("identity"));
        assert_eq!(m[0].body_len, 64);
        assert!(m[0].body_prefix.starts_with(b"{\"language\""));
    }

    #[test]
    fn bare_lf_and_chunked_request() {
        let ev = run_rec("bare lf and leading blank lines");
        assert!(errors(&ev).is_empty(), "{ev:?}");
        let m = messages(&ev);
        assert_eq!(m.len(), 2);
        assert_eq!(
            (m[0].header("host"), m[0].body_prefix.as_slice()),
            (Some("h"), &b"ab"[..])
        );
        assert_eq!(method_target(m[1]), ("GET", "/y"));

        let ev = run_rec("chunked request");
        assert!(errors(&ev).is_empty(), "{ev:?}");
        assert_eq!(messages(&ev)[0].body_prefix, b"abc");
    }

    #[test]
    fn gap_in_head_emits_truncated_message_then_recovers() {
        let ev = run_rec("gap in head");
        assert_eq!(errors(&ev), [Http1Error::GapInHead]);
        let m = messages(&ev);
        assert_eq!(m.len(), 2, "{ev:?}");
        assert!(m[0].head_truncated && m[0].body_incomplete);
        assert_eq!(method_target(m[0]), ("GET", "/big"));
        // Only complete header lines are kept.
        assert_eq!(m[0].headers, [("Host".to_string(), "h".to_string())]);
        assert_eq!(method_target(m[1]), ("GET", "/next"));
    }

    #[test]
    fn lost_chunk_framing_makes_no_phantom_messages() {
        // A chunked request body whose size line fell into a gap, followed by body text that
        // looks like requests: nothing is parsed until the server answers.
        let ev = run(
            Side::Request,
            &[],
            &[
                feed(b"POST /up HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n0123456789abcdef\r\n1"),
                Op::Gap(50),
                feed(b"\r\nGET /phantom HTTP/1.1\r\nHost: x\r\n\r\n"),
                feed(b"0\r\n\r\n"),
                Op::PeerMoved,
                feed(b"GET /real HTTP/1.1\r\n\r\n"),
            ],
        );
        let m = messages(&ev);
        assert_eq!(m.len(), 2, "{ev:?}");
        assert_eq!(method_target(m[0]), ("POST", "/up"));
        assert!(m[0].body_incomplete);
        assert_eq!(method_target(m[1]), ("GET", "/real"));
    }

    #[test]
    fn gap_in_chunk_size_resyncs() {
        let ev = run_rec("gap in chunk size");
        assert_eq!(errors(&ev), [Http1Error::GapInChunkSize]);
        let m = messages(&ev);
        assert_eq!(m.len(), 2, "{ev:?}");
        assert!(m[0].body_incomplete);
        assert_eq!(m[0].body_len, 3);
        assert_eq!((status(m[1]), m[1].body_len), (200, 0));
    }

    #[test]
    fn content_length_errors() {
        for (head, err) in [
            (
                &b"Content-Length: 5\r\nContent-Length: 6\r\n"[..],
                Http1Error::ConflictingContentLength,
            ),
            (
                b"Content-Length: 5, 6\r\n",
                Http1Error::ConflictingContentLength,
            ),
            (b"Content-Length: -1\r\n", Http1Error::BadContentLength),
            (
                b"Content-Length: 99999999999999999999999\r\n",
                Http1Error::BadContentLength,
            ),
            (b"Content-Length:\r\n", Http1Error::BadContentLength),
            (
                b"Transfer-Encoding: gzip\r\n",
                Http1Error::BadTransferEncoding,
            ),
        ] {
            let mut req = b"POST / HTTP/1.1\r\n".to_vec();
            req.extend_from_slice(head);
            req.extend_from_slice(b"\r\nGET /next HTTP/1.1\r\n\r\n");
            let ev = run(Side::Request, &[], &[feed(&req)]);
            assert_eq!(errors(&ev), [err], "{}", String::from_utf8_lossy(head));
            assert_eq!(messages(&ev).len(), 1);
        }
        // Agreeing repeats are one length.
        let ev = run(
            Side::Request,
            &[],
            &[feed(
                b"POST / HTTP/1.1\r\nContent-Length: 2\r\ncontent-length: 2, 2\r\n\r\nok",
            )],
        );
        assert_eq!(messages(&ev)[0].body_prefix, b"ok");
    }

    #[test]
    fn transfer_encoding_overrides_length_and_unknown_coding_reads_to_close() {
        let ev = run(
            Side::Response,
            &[],
            &[
                feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n"),
                feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\nzzz"),
                Op::Close,
            ],
        );
        let m = messages(&ev);
        assert_eq!(m.len(), 2, "{ev:?}");
        assert_eq!(m[0].body_prefix, b"ab");
        assert_eq!((m[1].body_len, m[1].body_incomplete), (3, false));
    }

    #[test]
    fn bad_chunk_lines() {
        for body in [&b"zz\r\n"[..], b"5 x\r\nhello\r\n", b"3\r\nabcX"] {
            let mut resp = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            resp.extend_from_slice(body);
            let ev = run(
                Side::Response,
                &[],
                &[feed(&resp), feed(OK_13), Op::PeerMoved, feed(OK_13)],
            );
            let m = messages(&ev);
            assert_eq!(m.len(), 2, "{ev:?}");
            assert!(m[0].body_incomplete);
            assert_eq!(m[1].body_prefix, b"Hello, world!");
        }
        let mut resp = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        resp.extend(std::iter::repeat_n(b'0', MAX_CHUNK_LINE_BYTES + 1));
        let ev = run(Side::Response, &[], &[feed(&resp)]);
        assert_eq!(errors(&ev), [Http1Error::ChunkLineTooLong]);
    }

    #[test]
    fn head_too_long_resyncs() {
        let mut req = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..MAX_HEAD_BYTES / 32 {
            req.extend_from_slice(format!("X-Filler-{i:05}: {:>14}\r\n", "v").as_bytes());
        }
        req.extend_from_slice(b"\r\n");
        let ev = run(Side::Request, &[], &[feed(&req), feed(CURL_GET)]);
        assert_eq!(errors(&ev), [Http1Error::HeadTooLong]);
        assert_eq!(messages(&ev).len(), 1);
    }

    #[test]
    fn header_bounds_are_counted() {
        let mut req = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..MAX_HEADERS + 5 {
            req.extend_from_slice(format!("H{i}: v\r\n").as_bytes());
        }
        req.extend_from_slice(format!("Big: {}\r\n\r\n", "x".repeat(MAX_HEADER_BYTES)).as_bytes());
        let ev = run(Side::Request, &[], &[feed(&req)]);
        let m = messages(&ev);
        assert_eq!(m[0].headers.len(), MAX_HEADERS);
        assert_eq!(m[0].dropped_headers, 6);
    }

    #[test]
    fn close_inside_head_reports_it() {
        let ev = run(
            Side::Request,
            &[],
            &[feed(b"GET / HTTP/1.1\r\nHo"), Op::Close],
        );
        assert_eq!(ev, [Http1Event::Error(Http1Error::IncompleteHead)]);
    }

    #[test]
    fn pending_methods_are_bounded() {
        let mut p = Http1Parser::new(Side::Response);
        for _ in 0..MAX_PENDING_METHODS + 3 {
            p.push_request_method("GET");
        }
        assert_eq!(p.dropped_methods(), 3);
        assert!(p.is_idle());
    }

    #[test]
    fn idle_only_between_messages() {
        let mut p = Http1Parser::new(Side::Request);
        let mut out = Vec::new();
        p.feed(
            b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\na",
            ts(0),
            &mut out,
        );
        assert!(!p.is_idle());
        p.feed(b"b", ts(1), &mut out);
        assert!(p.is_idle());
        assert_eq!(messages(&out)[0].last, ts(1));
    }

    // ---- resumability ------------------------------------------------------------------

    /// Rebuilds `ops` with each feed also split before every fed byte (counted across all
    /// feeds) for which `cut` holds; gaps and closes stay where they were.
    fn resplit(ops: &[Op], cut: impl Fn(usize) -> bool) -> Vec<Op> {
        let mut out = Vec::new();
        let mut offset = 0;
        for op in ops {
            let Op::Feed(bytes) = op else {
                out.push(op.clone());
                continue;
            };
            let mut from = 0;
            for i in 1..bytes.len() {
                if cut(offset + i) {
                    out.push(feed(&bytes[from..i]));
                    from = i;
                }
            }
            out.push(feed(&bytes[from..]));
            offset += bytes.len();
        }
        out
    }

    #[test]
    fn any_split_gives_the_same_messages() {
        for r in recordings() {
            let whole = strip_ts(run(r.side, &r.methods, &r.ops));
            assert!(!whole.is_empty(), "{}", r.name);
            let fed: usize = r
                .ops
                .iter()
                .map(|op| match op {
                    Op::Feed(b) => b.len(),
                    _ => 0,
                })
                .sum();
            for at in 0..=fed {
                let ops = resplit(&r.ops, |i| i == at);
                let split = strip_ts(run(r.side, &r.methods, &ops));
                assert_eq!(split, whole, "{}: split at {at}", r.name);
            }
            let ops = resplit(&r.ops, |_| true);
            let bytewise = strip_ts(run(r.side, &r.methods, &ops));
            assert_eq!(bytewise, whole, "{}: 1-byte chunks", r.name);
        }
    }

    #[test]
    fn every_byte_value_after_each_prefix_never_panics() {
        // A cheap sweep of the fuzz target's job: each prefix of a real exchange followed
        // by each possible byte, gap and close.
        for r in recordings()
            .iter()
            .filter(|r| r.name != "big body with gap")
        {
            let Some(Op::Feed(bytes)) = r.ops.first() else {
                continue;
            };
            for cut in 0..bytes.len().min(200) {
                for b in [0u8, b'\n', b'\r', b' ', b'G', b'H', b'0', 0xff] {
                    let mut p = Http1Parser::new(r.side);
                    let mut out = Vec::new();
                    p.feed(bytes.get(..cut).unwrap(), ts(0), &mut out);
                    p.feed(&[b], ts(1), &mut out);
                    p.gap(u64::MAX, ts(2), &mut out);
                    p.feed(bytes, ts(3), &mut out);
                    p.close(ts(4), &mut out);
                }
            }
        }
    }
}
