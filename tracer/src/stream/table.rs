//! All connections of the watched processes, bounded, with what they produced.

use std::net::SocketAddr;

use crate::fast_map::HashMap;

use tracing::debug;

use super::ExecCtx;
use super::conn::{
    Conn, ConnKey, Flow, Role, Tls, detect_http2, infer_role, looks_like_tls_record,
};
use crate::protocol::{
    http1::{ChunkTs, Http1Event, Http1Message, StartLine},
    http2::{Direction, HeaderBlock, HeadersKind, Http2Conn, Http2Event, Http2Stream},
    stdio::StdioLine,
};

/// Connections tracked at once; beyond it the least recently active one is evicted.
pub const MAX_CONNS: usize = 32768;
/// Connections evicted together when the table is full (1/32 of it).
const EVICT_BATCH: usize = MAX_CONNS / 32;
/// A connection silent for this long is dropped (its close was lost, or it idles forever).
pub const IDLE_EVICT_NS: u64 = 15 * 60 * 1_000_000_000;
/// Chunks of a connection whose role cannot be inferred before it is given up.
const MAX_UNKNOWN_CHUNKS: u32 = 4;

/// What the stream layer hands to the span layer.
#[derive(Debug, Clone)]
pub enum StreamEvent {
    /// A complete HTTP/1.1 message. `ctx` moved its last byte (a request) or its first
    /// (a response).
    Message {
        key: ConnKey,
        role: Role,
        ctx: ExecCtx,
        peer: Option<SocketAddr>,
        local: Option<SocketAddr>,
        message: Box<Http1Message>,
    },
    /// The connection is gone: requests still waiting for an answer end here.
    Closed { key: ConnKey, ts_ns: u64 },
    /// Records of the connection were lost (ring buffer full): requests waiting for an
    /// answer end here, since their answer may be among the lost records.
    Lost { key: ConnKey, ts_ns: u64 },
    /// The request headers of an HTTP/2 stream were decoded. `ctx` moved their last byte.
    H2Request {
        key: ConnKey,
        role: Role,
        ctx: ExecCtx,
        peer: Option<SocketAddr>,
        local: Option<SocketAddr>,
        stream_id: u32,
        headers: Box<HeaderBlock>,
    },
    /// An HTTP/2 stream ended (complete, reset, or its connection went away).
    H2Stream {
        key: ConnKey,
        role: Role,
        peer: Option<SocketAddr>,
        stream: Box<Http2Stream>,
    },
    /// The connection carries TLS and its plaintext is captured from now on: its spans say
    /// `tls=true`. Sent once per connection, before any message parsed from the plaintext.
    Tls { key: ConnKey },
    /// A JSON line on a pipe (plugin stdio). `ingress`: the process read it.
    Stdio {
        key: ConnKey,
        inode: u64,
        ingress: bool,
        line: Box<StdioLine>,
    },
}

/// Counters of what the stream layer saw and gave up on.
#[derive(Debug, Default, Clone, Copy)]
pub struct StreamCounters {
    pub chunks: u64,
    pub messages: u64,
    pub parse_errors: u64,
    pub evicted: u64,
    pub not_http: u64,
    /// Connections that speak HTTP/2.
    pub h2_conns: u64,
    /// HTTP/2 streams ended.
    pub h2_streams: u64,
    /// HTTP/2 framing or HPACK errors.
    pub h2_errors: u64,
    /// Data records the kernel side could not deliver, from sequence-number holes.
    pub lost_records: u64,
    /// Connections whose TLS plaintext is parsed.
    pub tls_conns: u64,
    /// Connections whose socket bytes were recognised as TLS records.
    pub tls_ciphertext_conns: u64,
    /// Socket chunks of TLS connections dropped unparsed (handshake, records before the
    /// kernel side knew the socket).
    pub tls_ciphertext_chunks: u64,
}

/// Where a chunk's bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The socket's own bytes (syscalls).
    Socket,
    /// Plaintext from the TLS uprobes.
    TlsPlaintext,
}

#[derive(Default)]
pub struct ConnTable {
    conns: HashMap<ConnKey, Conn>,
    /// The current generation of each (tgid, fd), to flush a connection whose close was missed.
    by_fd: HashMap<(u32, i32), u64>,
    pub counters: StreamCounters,
    scratch: Vec<Http1Event>,
    /// Reused buffers for what both parsers emit when a connection ends.
    ends: (Vec<Http1Event>, Vec<Http1Event>),
    h2_scratch: Vec<Http2Event>,
}

impl ConnTable {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// accept() or connect() created a connection.
    pub fn open(
        &mut self,
        key: ConnKey,
        role: Option<Role>,
        peer: Option<SocketAddr>,
        ts_ns: u64,
        out: &mut Vec<StreamEvent>,
    ) {
        self.replace_generation(key, ts_ns, out);
        self.make_room(out);
        self.conns.insert(key, Conn::new(role, peer, ts_ns));
    }

    /// Connections whose peer is `peer` and whose own address is `local` (when both known).
    pub fn keys_with_peer(&self, peer: SocketAddr, local: Option<SocketAddr>) -> Vec<ConnKey> {
        self.conns
            .iter()
            .filter(|(_, c)| {
                c.peer == Some(peer) && (local.is_none() || c.local.is_none() || c.local == local)
            })
            .map(|(k, _)| *k)
            .collect()
    }

    /// Our own address on a connection (from the kernel's socket, or /proc).
    pub fn set_local(&mut self, key: ConnKey, local: Option<SocketAddr>) {
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.local = local;
        }
    }

    /// A connection that was in use before the agent started (seeded from /proc): its first
    /// captured bytes may be anywhere in a message.
    pub fn open_existing(
        &mut self,
        key: ConnKey,
        role: Option<Role>,
        peer: Option<SocketAddr>,
        ts_ns: u64,
        out: &mut Vec<StreamEvent>,
    ) {
        self.open(key, role, peer, ts_ns, out);
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.mid_stream = true;
        }
    }

    /// A connection whose bytes must not be parsed (e.g. the agent's own export): records
    /// still in flight for it are dropped until it closes.
    pub fn ignore(&mut self, key: ConnKey, ts_ns: u64, out: &mut Vec<StreamEvent>) {
        self.open(key, None, None, ts_ns, out);
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.not_http = true;
            conn.ignored = true;
        }
    }

    /// A chunk of bytes moved on a connection: the socket's own, or TLS plaintext from the
    /// TLS uprobes (numbered with the socket's records).
    #[allow(clippy::too_many_arguments)]
    pub fn data(
        &mut self,
        source: Source,
        key: ConnKey,
        ctx: ExecCtx,
        ingress: bool,
        captured: &[u8],
        total_len: u64,
        seq: u32,
        ts: ChunkTs,
        out: &mut Vec<StreamEvent>,
    ) {
        let chunk = Chunk {
            key,
            ctx,
            ingress,
            captured,
            total_len,
            seq,
            ts,
        };
        self.chunk(source, chunk, out);
    }

    fn chunk(&mut self, source: Source, chunk: Chunk<'_>, out: &mut Vec<StreamEvent>) {
        let Chunk {
            key,
            ctx,
            ingress,
            captured,
            total_len,
            seq,
            ts,
        } = chunk;
        self.counters.chunks += 1;
        let implicit = !self.conns.contains_key(&key);
        if implicit {
            // A socket from before the agent started, or one whose accept was not seen.
            self.open(key, None, None, ts.exit_ns, out);
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if implicit {
            conn.next_seq = None;
            conn.mid_stream = true;
        }
        conn.last_seen_ns = ts.exit_ns;
        let lost = conn.check_seq(seq);
        if lost > 0 {
            self.counters.lost_records += u64::from(lost);
            end_both(
                &mut self.ends,
                &mut self.h2_scratch,
                &mut self.counters,
                key,
                conn,
                End::Lost,
                ts,
                out,
            );
            out.push(StreamEvent::Lost {
                key,
                ts_ns: ts.enter_ns,
            });
        }
        if !self.tls_admits(source, key, captured, out) {
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        // HTTP/2 is recognised from a connection's first bytes, or, for one in use before we
        // saw it, from any chunk until it has shown HTTP/1.
        if conn.h2.is_none()
            && (!conn.seen_data || (conn.mid_stream && !conn.h1_seen))
            && let Some((role, start)) = detect_http2(captured, ingress, conn.role, conn.mid_stream)
        {
            conn.role = Some(role);
            conn.not_http = false;
            conn.h2 = Some(Box::new(Http2Conn::new(start)));
            self.counters.h2_conns += 1;
        }
        conn.seen_data = true;
        if conn.gave_up() {
            return;
        }
        if conn.h2.is_some() {
            let gap = total_len.saturating_sub(captured.len() as u64);
            feed_h2(
                &mut self.h2_scratch,
                &mut self.counters,
                key,
                conn,
                ingress,
                captured,
                gap,
                ts,
                ctx,
                out,
            );
            return;
        }
        if conn.role.is_none() {
            conn.role = infer_role(captured, ingress);
            if conn.role.is_none() {
                conn.unknown_chunks += 1;
                if conn.unknown_chunks >= MAX_UNKNOWN_CHUNKS {
                    conn.not_http = true;
                    self.counters.not_http += 1;
                }
                return;
            }
        }
        let Some(flow) = conn.flow(ingress) else {
            return;
        };
        let gap = total_len.saturating_sub(captured.len() as u64);
        let mut events = std::mem::take(&mut self.scratch);
        events.clear();
        conn.feed(flow, captured, gap, ts, ctx, &mut events);
        let was_http = !conn.gave_up();
        if !was_http {
            self.counters.not_http += 1;
        }
        for event in events.drain(..) {
            emit(&mut self.counters, key, conn, flow, event, out);
        }
        self.scratch = events;
    }

    /// Whether a chunk goes to the parsers, as far as TLS decides: a TLS connection's socket
    /// bytes never do (its first ones are recognised as TLS records); its first plaintext
    /// restarts the parsers on the plaintext.
    fn tls_admits(
        &mut self,
        source: Source,
        key: ConnKey,
        captured: &[u8],
        out: &mut Vec<StreamEvent>,
    ) -> bool {
        let Some(conn) = self.conns.get_mut(&key) else {
            return false;
        };
        match (source, conn.tls) {
            (Source::Socket, Tls::Ciphertext | Tls::Plaintext) => {
                self.counters.tls_ciphertext_chunks += 1;
                false
            }
            (Source::Socket, Tls::No) => {
                // Only before the connection showed HTTP: a body may hold anything.
                let fresh = !conn.h1_seen && conn.h2.is_none();
                if fresh && looks_like_tls_record(captured) {
                    conn.tls = Tls::Ciphertext;
                    self.counters.tls_ciphertext_conns += 1;
                    self.counters.tls_ciphertext_chunks += 1;
                    return false;
                }
                true
            }
            (Source::TlsPlaintext, _) if conn.ignored => false,
            (Source::TlsPlaintext, Tls::Plaintext) => true,
            (Source::TlsPlaintext, Tls::No | Tls::Ciphertext) => {
                // What the parsers held came from ciphertext (or nothing): it ends unreported.
                conn.start_plaintext();
                self.counters.tls_conns += 1;
                out.push(StreamEvent::Tls { key });
                true
            }
        }
    }

    /// The process closed the fd.
    pub fn close(&mut self, key: ConnKey, ts_ns: u64, out: &mut Vec<StreamEvent>) {
        if let Some(current) = self.by_fd.get(&(key.tgid, key.fd))
            && *current == key.conn_id
        {
            self.by_fd.remove(&(key.tgid, key.fd));
        }
        self.finish(key, ts_ns, out);
    }

    /// The process exited: every connection of it ends. Returns their fds.
    pub fn exit(&mut self, tgid: u32, ts_ns: u64, out: &mut Vec<StreamEvent>) -> Vec<i32> {
        let keys: Vec<ConnKey> = self
            .conns
            .keys()
            .filter(|k| k.tgid == tgid)
            .copied()
            .collect();
        self.by_fd.retain(|(t, _), _| *t != tgid);
        let fds = keys.iter().map(|k| k.fd).collect();
        for key in keys {
            self.finish(key, ts_ns, out);
        }
        fds
    }

    /// Drops connections idle for longer than IDLE_EVICT_NS.
    pub fn evict_idle(&mut self, now_ns: u64, out: &mut Vec<StreamEvent>) {
        let stale: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| now_ns.saturating_sub(c.last_seen_ns) > IDLE_EVICT_NS)
            .map(|(k, _)| *k)
            .collect();
        for key in stale {
            self.counters.evicted += 1;
            self.by_fd.remove(&(key.tgid, key.fd));
            self.finish(key, now_ns, out);
        }
    }

    fn replace_generation(&mut self, key: ConnKey, ts_ns: u64, out: &mut Vec<StreamEvent>) {
        if let Some(old) = self.by_fd.insert((key.tgid, key.fd), key.conn_id)
            && old != key.conn_id
        {
            let old_key = ConnKey {
                conn_id: old,
                ..key
            };
            self.finish(old_key, ts_ns, out);
        }
    }

    /// At capacity, evicts the [`EVICT_BATCH`] least recently active connections at once:
    /// finding the oldest is a pass over the whole table, and one pass per new connection
    /// (a watched process holding many idle connections and opening more) cost the agent so
    /// much that the ring buffer overran.
    fn make_room(&mut self, out: &mut Vec<StreamEvent>) {
        if self.conns.len() < MAX_CONNS {
            return;
        }
        let mut by_age: Vec<(u64, ConnKey)> = self
            .conns
            .iter()
            .map(|(k, c)| (c.last_seen_ns, *k))
            .collect();
        let n = EVICT_BATCH.min(by_age.len());
        if n == 0 {
            return;
        }
        by_age.select_nth_unstable_by_key(n - 1, |(seen, _)| *seen);
        debug!(
            evicted = n,
            "connection table full: evicting the least recently active"
        );
        for &(seen, key) in &by_age[..n] {
            self.counters.evicted += 1;
            self.by_fd.remove(&(key.tgid, key.fd));
            self.finish(key, seen, out);
        }
    }

    fn finish(&mut self, key: ConnKey, ts_ns: u64, out: &mut Vec<StreamEvent>) {
        let Some(mut conn) = self.conns.remove(&key) else {
            return;
        };
        let ts = ChunkTs {
            enter_ns: ts_ns,
            exit_ns: ts_ns,
        };
        end_both(
            &mut self.ends,
            &mut self.h2_scratch,
            &mut self.counters,
            key,
            &mut conn,
            End::Closed,
            ts,
            out,
        );
        out.push(StreamEvent::Closed { key, ts_ns });
    }
}

/// One chunk of bytes as the table takes it.
struct Chunk<'a> {
    key: ConnKey,
    ctx: ExecCtx,
    ingress: bool,
    captured: &'a [u8],
    total_len: u64,
    seq: u32,
    ts: ChunkTs,
}

/// One chunk of an HTTP/2 connection through its parser.
#[allow(clippy::too_many_arguments)]
fn feed_h2(
    scratch: &mut Vec<Http2Event>,
    counters: &mut StreamCounters,
    key: ConnKey,
    conn: &mut Conn,
    ingress: bool,
    captured: &[u8],
    gap: u64,
    ts: ChunkTs,
    ctx: u64,
    out: &mut Vec<StreamEvent>,
) {
    let Some(role) = conn.role else { return };
    let dir = match (role, ingress) {
        (Role::Server, true) | (Role::Client, false) => Direction::ClientToServer,
        (Role::Server, false) | (Role::Client, true) => Direction::ServerToClient,
    };
    let flow = match dir {
        Direction::ClientToServer => Flow::Requests,
        Direction::ServerToClient => Flow::Responses,
    };
    conn.note_ctx(flow, ts, ctx);
    scratch.clear();
    if let Some(h2) = conn.h2.as_mut() {
        if !captured.is_empty() {
            h2.feed(dir, captured, ts, scratch);
        }
        if gap > 0 {
            h2.gap(dir, gap, ts, scratch);
        }
    }
    for event in scratch.drain(..) {
        emit_h2(counters, key, conn, role, event, out);
    }
}

fn emit_h2(
    counters: &mut StreamCounters,
    key: ConnKey,
    conn: &Conn,
    role: Role,
    event: Http2Event,
    out: &mut Vec<StreamEvent>,
) {
    match event {
        Http2Event::Headers {
            stream_id,
            kind: HeadersKind::Request,
            block,
            ts,
            ..
        } => {
            let ctx = conn
                .ctx_at(Flow::Requests, ts.exit_ns)
                .unwrap_or(u64::from(key.tgid));
            out.push(StreamEvent::H2Request {
                key,
                role,
                ctx,
                peer: conn.peer,
                local: conn.local,
                stream_id,
                headers: Box::new(block),
            });
        }
        Http2Event::StreamEnded(stream) => {
            counters.h2_streams += 1;
            out.push(StreamEvent::H2Stream {
                key,
                role,
                peer: conn.peer,
                stream,
            });
        }
        Http2Event::Error { dir, error } => {
            counters.h2_errors += 1;
            debug!(?key, ?dir, %error, "HTTP/2 parse error");
        }
        _ => {}
    }
}

/// How a connection's parsers are ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Closed,
    Lost,
}

/// Ends both directions of `conn` and emits what the parsers still held.
#[allow(clippy::too_many_arguments)]
fn end_both(
    ends: &mut (Vec<Http1Event>, Vec<Http1Event>),
    h2_scratch: &mut Vec<Http2Event>,
    counters: &mut StreamCounters,
    key: ConnKey,
    conn: &mut Conn,
    how: End,
    ts: ChunkTs,
    out: &mut Vec<StreamEvent>,
) {
    if let (Some(h2), Some(role)) = (conn.h2.as_mut(), conn.role) {
        h2_scratch.clear();
        match how {
            End::Closed => h2.close(ts, h2_scratch),
            End::Lost => h2.lost(ts, h2_scratch),
        }
        for event in h2_scratch.drain(..) {
            emit_h2(counters, key, conn, role, event, out);
        }
        return;
    }
    let (requests, responses) = ends;
    requests.clear();
    responses.clear();
    match how {
        End::Closed => conn.close(ts, requests, responses),
        End::Lost => conn.lost(ts, requests, responses),
    }
    for event in requests.drain(..) {
        emit(counters, key, conn, Flow::Requests, event, out);
    }
    for event in responses.drain(..) {
        emit(counters, key, conn, Flow::Responses, event, out);
    }
}

fn emit(
    counters: &mut StreamCounters,
    key: ConnKey,
    conn: &mut Conn,
    flow: Flow,
    event: Http1Event,
    out: &mut Vec<StreamEvent>,
) {
    let Some(role) = conn.role else { return };
    match event {
        Http1Event::Message(message) => {
            counters.messages += 1;
            conn.h1_seen = true;
            if flow == Flow::Requests
                && let StartLine::Request { method, target } = &message.start_line
            {
                conn.note_request(method, target);
            }
            // A request is attributed to whoever moved its last byte: a Go server's background
            // reader may have taken its first byte, while the goroutine that serves it reads
            // the rest.
            let ctx = match flow {
                Flow::Requests => conn.ctx_at(flow, message.last.exit_ns),
                Flow::Responses => None,
            }
            .or_else(|| conn.ctx_at(flow, message.first.exit_ns))
            .unwrap_or(u64::from(key.tgid));
            out.push(StreamEvent::Message {
                key,
                role,
                ctx,
                peer: conn.peer,
                local: conn.local,
                message: Box::new(message),
            });
        }
        Http1Event::Error(err) => {
            counters.parse_errors += 1;
            debug!(?key, %err, "HTTP/1.1 parse error");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_table_evicts_the_least_recently_active_in_one_batch() {
        let mut table = ConnTable::new();
        let mut out = Vec::new();
        let key = |i: usize| ConnKey {
            tgid: 7,
            fd: i as i32,
            conn_id: i as u64 + 1,
        };
        for i in 0..MAX_CONNS {
            table.open(key(i), Some(Role::Client), None, 1_000 + i as u64, &mut out);
        }
        assert_eq!((table.len(), table.counters.evicted), (MAX_CONNS, 0));
        table.open(
            key(MAX_CONNS),
            Some(Role::Client),
            None,
            u64::MAX / 2,
            &mut out,
        );
        assert_eq!(table.len(), MAX_CONNS - EVICT_BATCH + 1);
        assert_eq!(table.counters.evicted, EVICT_BATCH as u64);
        // The oldest ones went, each reported as closed; the newest stayed.
        let closed: Vec<ConnKey> = out
            .iter()
            .filter_map(|e| match e {
                StreamEvent::Closed { key, .. } => Some(*key),
                _ => None,
            })
            .collect();
        assert_eq!(closed.len(), EVICT_BATCH);
        assert!(closed.iter().all(|k| (k.fd as usize) < EVICT_BATCH));
        assert!(table.conns.contains_key(&key(MAX_CONNS)));
        assert!(table.conns.contains_key(&key(EVICT_BATCH)));
        // Room again: the next connections evict nothing until the table is full again.
        table.open(
            key(MAX_CONNS + 1),
            Some(Role::Client),
            None,
            u64::MAX / 2,
            &mut out,
        );
        assert_eq!(table.counters.evicted, EVICT_BATCH as u64);
    }
}
