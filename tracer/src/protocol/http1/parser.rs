//! The byte-level state machine of one direction of one connection.

use std::collections::VecDeque;

use super::{
    ChunkTs, Http1Error, Http1Event, Http1Message, MAX_BODY_PREFIX, MAX_CHUNK_LINE_BYTES,
    MAX_HEAD_BYTES, MAX_PENDING_METHODS, Side, StartLine,
    framing::{Framing, parse_chunk_size},
    head::{LineScan, parse_head, parse_start_line},
};
use crate::protocol::genai::{BodyInspector, capture, route_of};

/// Head buffer capacity kept between messages.
const HEAD_KEEP_CAPACITY: usize = 2048;

/// What a response needs to know about the request it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MethodKind {
    Head,
    Connect,
    Other,
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

/// Decoder of one direction of one HTTP/1.x connection. See the [module docs](super).
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
    /// Per request awaiting its response: its method, and whether its route's bodies are
    /// inspected.
    pending: VecDeque<(MethodKind, bool)>,
    dropped_methods: u64,
    /// Reads the body of the current message when its route matters.
    inspector: Option<Box<BodyInspector>>,
    /// The response being framed answers a request whose route is inspected.
    inspect_next: bool,
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
            inspector: None,
            inspect_next: false,
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
        self.push_request(method, "");
    }

    /// Like [`Self::push_request_method`], with the request target, so the response of a
    /// route that matters (`protocol::genai::route_of`) has its body read.
    pub fn push_request(&mut self, method: &str, target: &str) {
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
        self.pending.push_back((kind, route_of(target).is_some()));
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
                self.body_bytes(rest.get(..take).unwrap_or_default(), ts);
                match remaining.saturating_sub(take as u64) {
                    0 => self.end_message(ts, false, out),
                    left => self.state = State::Body { remaining: left },
                }
                take
            }
            State::ChunkSize => self.step_chunk_size(rest, ts, out),
            State::ChunkData { remaining } => {
                let take = take_len(remaining, rest.len());
                self.body_bytes(rest.get(..take).unwrap_or_default(), ts);
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
                self.body_bytes(rest, ts);
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
        self.inspect_next = false;
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
                let (method, inspect) = self
                    .pending
                    .pop_front()
                    .unwrap_or((MethodKind::Other, false));
                self.inspect_next = inspect;
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
        self.inspector = self.inspector_for(&msg).map(Box::new);
        self.msg = Some(msg);
        self.body_gap = false;
        self.state = state;
    }

    /// A body inspector when the message's route matters and its body is JSON or events.
    fn inspector_for(&self, msg: &Http1Message) -> Option<BodyInspector> {
        let content_type = msg
            .header("content-type")
            .unwrap_or("")
            .to_ascii_lowercase();
        let json = content_type.is_empty() || content_type.contains("json");
        match &msg.start_line {
            StartLine::Request { target, .. } => {
                let path = target.split(['?', '#']).next().unwrap_or(target);
                (route_of(path).is_some() && json)
                    .then(|| BodyInspector::request(capture::content()))
            }
            StartLine::Response { .. } if self.inspect_next => {
                if content_type.contains("text/event-stream") {
                    Some(BodyInspector::response(true, capture::content()))
                } else {
                    json.then(|| BodyInspector::response(false, capture::content()))
                }
            }
            StartLine::Response { .. } => None,
        }
    }

    fn body_bytes(&mut self, bytes: &[u8], ts: ChunkTs) {
        let Some(msg) = self.msg.as_mut() else {
            return;
        };
        if let Some(inspector) = self.inspector.as_mut() {
            inspector.feed(bytes, ts);
        }
        msg.body_len = msg.body_len.saturating_add(bytes.len() as u64);
        if !self.body_gap {
            let keep_max = MAX_BODY_PREFIX.max(capture::body_bytes());
            let room = keep_max.saturating_sub(msg.body_prefix.len());
            let keep = bytes.get(..room.min(bytes.len())).unwrap_or_default();
            msg.body_prefix.extend_from_slice(keep);
        }
    }

    fn body_lost(&mut self, n: u64) {
        if let Some(inspector) = self.inspector.as_mut() {
            inspector.gap(n);
        }
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
        self.lose_framing(ts, out);
        out.push(Http1Event::Error(error));
    }

    /// Ends the message in progress as incomplete and waits for the other direction.
    fn lose_framing(&mut self, ts: ChunkTs, out: &mut Vec<Http1Event>) {
        self.end_message(ts, true, out);
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
        // Which requests the lost records answered is unknown.
        self.pending.clear();
        self.lose_framing(ts, out);
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
        let inspector = self.inspector.take();
        if let Some(mut msg) = self.msg.take() {
            msg.last = ts;
            msg.body_incomplete = incomplete;
            msg.genai = inspector.map(|i| Box::new(i.finish()));
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
