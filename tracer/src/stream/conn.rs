//! One connection of one process, seen from that process.

use std::net::SocketAddr;

use crate::protocol::{
    http1::{ChunkTs, Http1Event, Http1Parser, Side},
    http2::{ConnStart, Http2Conn, PREFACE},
};

/// A connection as the kernel named it: the fd of a process plus the generation of the socket
/// behind it, so a reused fd number is a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey {
    pub tgid: u32,
    pub fd: i32,
    pub conn_id: u64,
}

/// Which end of the connection the process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// It sends requests.
    Client,
    /// It receives requests.
    Server,
}

/// What is known about TLS on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Tls {
    /// Nothing says it carries TLS.
    #[default]
    No,
    /// Its socket bytes are TLS records (seen before any plaintext): they are not parsed.
    Ciphertext,
    /// The TLS uprobes report its plaintext, which is what is parsed.
    Plaintext,
}

/// How many recent chunks per direction remember their thread.
const CTX_HISTORY: usize = 16;

/// Parsing state of one connection.
pub struct Conn {
    pub role: Option<Role>,
    pub peer: Option<SocketAddr>,
    /// Our own address on the connection, when the kernel side could read it.
    pub local: Option<SocketAddr>,
    pub last_seen_ns: u64,
    /// Chunks seen before the role was known; after too many the stream is given up.
    pub unknown_chunks: u32,
    pub not_http: bool,
    /// Sequence number the next data record should carry; None until the first one when
    /// the connection's start was not seen.
    pub next_seq: Option<u32>,
    /// The connection was in use before we saw it (seeded from /proc, or met without its
    /// accept/connect): its first bytes may be anywhere in a message.
    pub mid_stream: bool,
    /// Whether any data was seen yet.
    pub seen_data: bool,
    /// An HTTP/1 message was parsed: the connection is not HTTP/2.
    pub h1_seen: bool,
    /// Set once the connection speaks HTTP/2; the HTTP/1 parsers are then unused.
    pub h2: Option<Box<Http2Conn>>,
    pub tls: Tls,
    /// Never parsed (the agent's own connection, see `ConnTable::ignore`).
    pub ignored: bool,
    requests: Http1Parser,
    responses: Http1Parser,
    /// (exit timestamp, ctx) of recent chunks per direction: [requests, responses].
    ctxs: [[(u64, u64); CTX_HISTORY]; 2],
    ctx_next: [usize; 2],
}

/// Which parser a chunk goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Requests,
    Responses,
}

impl Conn {
    pub fn new(role: Option<Role>, peer: Option<SocketAddr>, now_ns: u64) -> Self {
        Self {
            role,
            peer,
            local: None,
            last_seen_ns: now_ns,
            unknown_chunks: 0,
            not_http: false,
            next_seq: Some(0),
            mid_stream: false,
            seen_data: false,
            h1_seen: false,
            h2: None,
            tls: Tls::No,
            ignored: false,
            requests: Http1Parser::new(Side::Request),
            responses: Http1Parser::new(Side::Response),
            ctxs: [[(0, 0); CTX_HISTORY]; 2],
            ctx_next: [0; 2],
        }
    }

    /// The first plaintext of a TLS connection: whatever its socket bytes made of the parsers
    /// is dropped, and the plaintext is parsed from a clean start (HTTP/2 detection
    /// included). Identity, role and sequence numbers stay.
    pub fn start_plaintext(&mut self) {
        let mut fresh = Conn::new(self.role, self.peer, self.last_seen_ns);
        fresh.local = self.local;
        fresh.next_seq = self.next_seq;
        fresh.mid_stream = self.mid_stream;
        fresh.tls = Tls::Plaintext;
        *self = fresh;
    }

    /// The flow of a chunk in the given direction, once the role is known.
    pub fn flow(&self, ingress: bool) -> Option<Flow> {
        match (self.role?, ingress) {
            (Role::Server, true) | (Role::Client, false) => Some(Flow::Requests),
            (Role::Server, false) | (Role::Client, true) => Some(Flow::Responses),
        }
    }

    /// Remembers which execution context moved a chunk of `flow` (see `ctx_at`).
    pub fn note_ctx(&mut self, flow: Flow, ts: ChunkTs, ctx: u64) {
        let slot = flow as usize;
        self.ctxs[slot][self.ctx_next[slot] % CTX_HISTORY] = (ts.exit_ns, ctx);
        self.ctx_next[slot] = self.ctx_next[slot].wrapping_add(1);
    }

    pub fn feed(
        &mut self,
        flow: Flow,
        data: &[u8],
        gap: u64,
        ts: ChunkTs,
        ctx: u64,
        out: &mut Vec<Http1Event>,
    ) {
        self.note_ctx(flow, ts, ctx);
        let (parser, other) = match flow {
            Flow::Requests => (&mut self.requests, &mut self.responses),
            Flow::Responses => (&mut self.responses, &mut self.requests),
        };
        other.peer_moved();
        if !data.is_empty() {
            parser.feed(data, ts, out);
        }
        if gap > 0 {
            parser.gap(gap, ts, out);
        }
    }

    /// The thread that moved the chunk with this exit timestamp (the first byte of a message).
    pub fn ctx_at(&self, flow: Flow, exit_ns: u64) -> Option<u64> {
        self.ctxs[flow as usize]
            .iter()
            .find(|(ts, ctx)| *ts == exit_ns && *ctx != 0)
            .map(|(_, ctx)| *ctx)
    }

    /// Responses on this connection answer requests with these methods, in order.
    pub fn note_request_method(&mut self, method: &str) {
        self.responses.push_request_method(method);
    }

    /// Like `note_request_method`, with the target, so the responses of Dify and model-API
    /// routes have their bodies read.
    pub fn note_request(&mut self, method: &str, target: &str) {
        self.responses.push_request(method, target);
    }

    /// Checks a record's sequence number; returns how many records before it were lost.
    pub fn check_seq(&mut self, seq: u32) -> u32 {
        records_lost(&mut self.next_seq, seq)
    }

    /// Records were lost: both directions end what they had and wait for a clean start.
    pub fn lost(
        &mut self,
        ts: ChunkTs,
        requests: &mut Vec<Http1Event>,
        responses: &mut Vec<Http1Event>,
    ) {
        self.requests.lost(ts, requests);
        self.responses.lost(ts, responses);
    }

    pub fn close(
        &mut self,
        ts: ChunkTs,
        requests: &mut Vec<Http1Event>,
        responses: &mut Vec<Http1Event>,
    ) {
        self.requests.close(ts, requests);
        self.responses.close(ts, responses);
    }

    pub fn gave_up(&self) -> bool {
        if let Some(h2) = &self.h2 {
            return self.not_http || h2.is_not_http2();
        }
        self.not_http || self.requests.is_not_http() || self.responses.is_not_http()
    }
}

/// Checks a record's per-fd sequence number against the expected one (None: anything goes,
/// the start was not seen) and advances it; returns how many records before it were lost.
pub fn records_lost(next_seq: &mut Option<u32>, seq: u32) -> u32 {
    let lost = match *next_seq {
        None => 0,
        Some(expected) => {
            let ahead = seq.wrapping_sub(expected);
            // Far "ahead" means behind: a record reordered between two threads writing the
            // same fd, not a loss.
            if ahead >= 1 << 31 {
                return 0;
            }
            ahead
        }
    };
    *next_seq = Some(seq.wrapping_add(1));
    lost
}

/// Whether the first bytes of a connection say HTTP/2, and how to start its parser. `role`
/// is what accept/connect (or /proc) said, if anything.
pub fn detect_http2(
    first: &[u8],
    ingress: bool,
    role: Option<Role>,
    mid_stream: bool,
) -> Option<(Role, ConnStart)> {
    // The client preface (or as much of it as this chunk holds) names the client.
    let n = first.len().min(PREFACE.len());
    if n >= 4 && first[..n] == PREFACE[..n] {
        let role = if ingress { Role::Server } else { Role::Client };
        return Some((role, ConnStart::Preface));
    }
    let role = role?;
    let from_server = matches!(
        (role, ingress),
        (Role::Server, false) | (Role::Client, true)
    );
    if !mid_stream {
        // A fresh connection whose server speaks first: HTTP/2 servers send SETTINGS at
        // once, often before the client's preface is read.
        return (from_server && is_settings_frame(first)).then_some((role, ConnStart::Preface));
    }
    (looks_like_frame(first) && !looks_like_http1(first)).then_some((role, ConnStart::MidStream))
}

/// A SETTINGS frame header (type 4, stream 0, length a multiple of 6).
fn is_settings_frame(b: &[u8]) -> bool {
    b.len() >= 9
        && b[3] == 4
        && b[5..9] == [0, 0, 0, 0]
        && (u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2])) % 6 == 0
}

/// A plausible frame header: known type, length within the default maximum, reserved bit
/// clear. The parser checks further as it resyncs.
fn looks_like_frame(b: &[u8]) -> bool {
    if b.len() < 9 {
        return false;
    }
    let len = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
    b[3] <= 9 && len <= 16384 && b[5] & 0x80 == 0
}

fn looks_like_http1(b: &[u8]) -> bool {
    b.starts_with(b"HTTP/1.") || looks_like_request(b)
}

/// Whether `b` starts with a TLS record header: content type change_cipher_spec (20), alert
/// (21), handshake (22) or application data (23), version 3.x (SSL 3.0 to TLS 1.3's legacy
/// 3.3), and a length within a record's limit (2^14 plus expansion). No HTTP/1 or HTTP/2
/// stream starts like that.
pub fn looks_like_tls_record(b: &[u8]) -> bool {
    if b.len() < 5 {
        return false;
    }
    let len = u16::from_be_bytes([b[3], b[4]]);
    (20..=23).contains(&b[0]) && b[1] == 3 && b[2] <= 4 && len > 0 && len <= 16384 + 2048
}

/// Guess the role of a connection from its first bytes: a request line marks the sender as
/// the client, a status line marks it as the server.
pub fn infer_role(first: &[u8], ingress: bool) -> Option<Role> {
    let sends_request = if first.starts_with(b"HTTP/1.") {
        false
    } else if looks_like_request(first) {
        true
    } else {
        return None;
    };
    // The process receiving a request is the server; the process sending one, the client.
    Some(match (sends_request, ingress) {
        (true, true) | (false, false) => Role::Server,
        (true, false) | (false, true) => Role::Client,
    })
}

fn looks_like_request(data: &[u8]) -> bool {
    const METHODS: &[&[u8]] = &[
        b"GET ",
        b"POST ",
        b"PUT ",
        b"DELETE ",
        b"HEAD ",
        b"OPTIONS ",
        b"PATCH ",
        b"CONNECT ",
        b"TRACE ",
    ];
    METHODS.iter().any(|m| data.starts_with(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_from_first_bytes() {
        assert_eq!(infer_role(b"GET / HTTP/1.1\r\n", true), Some(Role::Server));
        assert_eq!(infer_role(b"GET / HTTP/1.1\r\n", false), Some(Role::Client));
        assert_eq!(infer_role(b"HTTP/1.1 200 OK\r\n", true), Some(Role::Client));
        assert_eq!(
            infer_role(b"HTTP/1.1 200 OK\r\n", false),
            Some(Role::Server)
        );
        assert_eq!(infer_role(b"\x16\x03\x01", true), None);
    }

    #[test]
    fn tls_records_are_recognised() {
        // A ClientHello's record header, an application data record, an alert.
        assert!(looks_like_tls_record(
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc"
        ));
        assert!(looks_like_tls_record(b"\x17\x03\x03\x00\x45rest"));
        assert!(looks_like_tls_record(b"\x15\x03\x03\x00\x02\x01\x00"));
        assert!(!looks_like_tls_record(b"GET / HTTP/1.1\r\n"));
        assert!(!looks_like_tls_record(b"PRI * HTTP/2.0\r\n"));
        // An HTTP/2 SETTINGS frame header, a too long record, a short chunk.
        assert!(!looks_like_tls_record(
            b"\x00\x00\x12\x04\x00\x00\x00\x00\x00"
        ));
        assert!(!looks_like_tls_record(b"\x17\x03\x03\xff\xff"));
        assert!(!looks_like_tls_record(b"\x16\x03"));
    }
}
