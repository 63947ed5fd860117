//! All connections of the watched processes, bounded, with what they produced.

use std::{collections::HashMap, net::SocketAddr};

use tracing::debug;

use super::conn::{Conn, ConnKey, Flow, Role, infer_role};
use crate::protocol::{
    http1::{ChunkTs, Http1Event, Http1Message, StartLine},
    stdio::StdioLine,
};

/// Connections tracked at once; beyond it the least recently active one is evicted.
pub const MAX_CONNS: usize = 32768;
/// A connection silent for this long is dropped (its close was lost, or it idles forever).
pub const IDLE_EVICT_NS: u64 = 15 * 60 * 1_000_000_000;
/// Chunks of a connection whose role cannot be inferred before it is given up.
const MAX_UNKNOWN_CHUNKS: u32 = 4;

/// What the stream layer hands to the span layer.
#[derive(Debug, Clone)]
pub enum StreamEvent {
    /// A complete HTTP/1.1 message. `tid` is the thread that moved its first byte.
    Message {
        key: ConnKey,
        role: Role,
        tid: u32,
        peer: Option<SocketAddr>,
        message: Box<Http1Message>,
    },
    /// The connection is gone: requests still waiting for an answer end here.
    Closed { key: ConnKey, ts_ns: u64 },
    /// Records of the connection were lost (ring buffer full): requests waiting for an
    /// answer end here, since their answer may be among the lost records.
    Lost { key: ConnKey, ts_ns: u64 },
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
    /// Data records the kernel side could not deliver, from sequence-number holes.
    pub lost_records: u64,
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

    /// A connection whose bytes must not be parsed (e.g. the agent's own export): records
    /// still in flight for it are dropped until it closes.
    pub fn ignore(&mut self, key: ConnKey, ts_ns: u64, out: &mut Vec<StreamEvent>) {
        self.open(key, None, None, ts_ns, out);
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.not_http = true;
        }
    }

    /// A chunk of bytes moved on a connection.
    #[allow(clippy::too_many_arguments)]
    pub fn data(
        &mut self,
        key: ConnKey,
        tid: u32,
        ingress: bool,
        captured: &[u8],
        total_len: u64,
        seq: u32,
        ts: ChunkTs,
        out: &mut Vec<StreamEvent>,
    ) {
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
        }
        conn.last_seen_ns = ts.exit_ns;
        let lost = conn.check_seq(seq);
        if lost > 0 {
            self.counters.lost_records += u64::from(lost);
            end_both(
                &mut self.ends,
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
        if conn.gave_up() {
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
        conn.feed(flow, captured, gap, ts, tid, &mut events);
        let was_http = !conn.gave_up();
        if !was_http {
            self.counters.not_http += 1;
        }
        for event in events.drain(..) {
            emit(&mut self.counters, key, conn, flow, event, out);
        }
        self.scratch = events;
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

    fn make_room(&mut self, out: &mut Vec<StreamEvent>) {
        if self.conns.len() < MAX_CONNS {
            return;
        }
        if let Some(oldest) = self
            .conns
            .iter()
            .min_by_key(|(_, c)| c.last_seen_ns)
            .map(|(k, _)| *k)
        {
            debug!(
                ?oldest,
                "connection table full: evicting the least recently active"
            );
            self.counters.evicted += 1;
            self.by_fd.remove(&(oldest.tgid, oldest.fd));
            let now = self.conns.get(&oldest).map(|c| c.last_seen_ns).unwrap_or(0);
            self.finish(oldest, now, out);
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

/// How a connection's parsers are ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Closed,
    Lost,
}

/// Ends both directions of `conn` and emits what the parsers still held.
fn end_both(
    ends: &mut (Vec<Http1Event>, Vec<Http1Event>),
    counters: &mut StreamCounters,
    key: ConnKey,
    conn: &mut Conn,
    how: End,
    ts: ChunkTs,
    out: &mut Vec<StreamEvent>,
) {
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
            if flow == Flow::Requests
                && let StartLine::Request { method, .. } = &message.start_line
            {
                conn.note_request_method(method);
            }
            let tid = conn.tid_at(flow, message.first.exit_ns).unwrap_or(key.tgid);
            out.push(StreamEvent::Message {
                key,
                role,
                tid,
                peer: conn.peer,
                message: Box::new(message),
            });
        }
        Http1Event::Error(err) => {
            counters.parse_errors += 1;
            debug!(?key, %err, "HTTP/1.1 parse error");
        }
    }
}
