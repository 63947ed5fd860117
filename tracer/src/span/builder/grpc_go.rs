//! What grpc-go's uprobes (`tracer-ebpf/src/grpc.rs`) say about the HTTP/2 streams the wire
//! parser rebuilds: which goroutine serves or issued each stream, its method and its final
//! status, straight from the process.
//!
//! Facts name a stream by (tgid, fd, HTTP/2 stream id), the same stream the parser reports
//! on that connection, so matching is exact; the connection generation (`conn_id`) is the
//! one the fd held when its HTTP/2 requests were last seen, and a connection's facts go when
//! it closes.
//!
//! - Server: the handler goroutine (`handleStream`) becomes the stream's execution context,
//!   so its outbound calls are the SERVER span's children. Until it starts, a stream of a
//!   connection grpc-go is known to serve is active on a context of its own, not on the
//!   connection's reader goroutine (which reads every stream of the connection and spawns
//!   every handler, so its spawn chain would hand a handler's leftover goroutines to
//!   whichever stream is newest there).
//! - Client: `NewStream` runs on the goroutine that makes the call and assigns the stream id
//!   before it returns; its entry is reported before the stream's HEADERS can reach the
//!   wire. A stream the parser sees before its NewStream returned belongs to the one
//!   goroutine inside NewStream on that connection; with several, none until the return
//!   says which (then the span moves under it, unless its server end already took its ids).
//! - Method and status fill what the wire could not decode (`difytrace.partial_headers`,
//!   an agent started on a connection in use); a value the wire decoded is never replaced,
//!   and a disagreement is counted. A client learns its status after the parser ended the
//!   stream (the status is read from the trailers the parser just saw), so a CLIENT span
//!   whose status the wire hid waits for it, at most [`HOLD_NS`].

use crate::fast_map::HashMap;

use tracer_common::go_op;

use super::{MAX_ACTIVE_THREADS, SpanBuilder, deactivate, reparented};
use crate::{
    protocol::http2::{Http2Stream, StreamEnd, grpc::split_path},
    span::{
        clock::monotonic_ns,
        h2_attrs,
        model::{AttrValue, FinishedSpan, SpanStatus},
    },
    stream::{ConnKey, ExecCtx, Role, goroutine_ctx, goroutine_of},
};

/// Connections (tgid, fd) with facts at once; beyond it all are dropped and counted.
pub const MAX_CONNS: usize = 65_536;
/// Facts kept per connection for streams not ended yet; beyond it they are dropped.
pub const MAX_CALLS_PER_CONN: usize = 4096;
/// Goroutines inside NewStream at once.
pub const MAX_OPENING: usize = 65_536;
/// CLIENT spans waiting for their status at once (the oldest goes out beyond it).
pub const MAX_HELD: usize = 16_384;
/// How long a CLIENT span waits for the status its process read.
pub const HOLD_NS: u64 = 2_000_000_000;

/// Bit 62 of a placeholder's goroutine: never set in a user-space goroutine address.
const PLACEHOLDER_BIT: u64 = 1 << 62;

/// A stream of a connection grpc-go serves, before its handler starts: a context of its own.
fn placeholder_ctx(fd: i32, stream_id: u32) -> ExecCtx {
    goroutine_ctx(PLACEHOLDER_BIT | (u64::from(fd as u32) << 32) | u64::from(stream_id))
}

/// A real goroutine's context (not a placeholder, not a thread).
fn is_goroutine(ctx: ExecCtx) -> bool {
    goroutine_of(ctx).is_some_and(|g| g & PLACEHOLDER_BIT == 0)
}

/// The context of a client stream no goroutine is known for yet: serves nothing.
fn unowned_ctx() -> ExecCtx {
    goroutine_ctx(0)
}

/// A grpc-go uprobe's report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrpcFact {
    /// `handleStream`: goroutine `g` starts serving stream `stream_id` of server connection
    /// `fd`; `method` is None when it could not be read whole.
    ServerStart {
        tgid: u32,
        g: u64,
        fd: i32,
        stream_id: u32,
        method: Option<String>,
        ts_ns: u64,
    },
    /// The handler on `g` returned (a RET probe, only with `--go-handler-returns`).
    ServerEnd { tgid: u32, g: u64, ts_ns: u64 },
    /// The server wrote status `code` for the stream, on goroutine `g`: grpc-go does so on
    /// the handler's goroutine once the handler returned, so this also ends the handler.
    ServerStatus {
        tgid: u32,
        g: u64,
        fd: i32,
        stream_id: u32,
        code: u32,
        ts_ns: u64,
    },
    /// Goroutine `g` entered NewStream on client connection `fd`.
    ClientOpen { tgid: u32, g: u64, fd: i32 },
    /// NewStream returned on `g`: stream `stream_id` (None: no stream) of `fd` (None:
    /// unknown).
    ClientStream {
        tgid: u32,
        g: u64,
        fd: Option<i32>,
        stream_id: Option<u32>,
        method: Option<String>,
    },
    /// The client closed the stream with status `code`.
    ClientStatus {
        tgid: u32,
        fd: i32,
        stream_id: u32,
        code: u32,
    },
}

impl GrpcFact {
    /// The fact of a Go uprobe record with a `go_op::GRPC_*` op, from its fields; None for
    /// other ops.
    #[allow(clippy::too_many_arguments)]
    pub fn from_go(
        op: u8,
        tgid: u32,
        g: u64,
        other: u64,
        value: i32,
        text: &str,
        text_truncated: bool,
        ts_ns: u64,
    ) -> Option<GrpcFact> {
        let method = (!text_truncated && text.starts_with('/')).then(|| text.to_string());
        let (low, high) = (other as u32, (other >> 32) as u32);
        Some(match op {
            go_op::GRPC_SERVER_START => GrpcFact::ServerStart {
                tgid,
                g,
                fd: value,
                stream_id: low,
                method,
                ts_ns,
            },
            go_op::GRPC_SERVER_END => GrpcFact::ServerEnd { tgid, g, ts_ns },
            go_op::GRPC_SERVER_STATUS => GrpcFact::ServerStatus {
                tgid,
                g,
                fd: value,
                stream_id: low,
                code: high,
                ts_ns,
            },
            go_op::GRPC_CLIENT_OPEN => GrpcFact::ClientOpen { tgid, g, fd: value },
            go_op::GRPC_CLIENT_STREAM => GrpcFact::ClientStream {
                tgid,
                g,
                fd: (value >= 0).then_some(value),
                stream_id: (low != 0).then_some(low),
                method,
            },
            go_op::GRPC_CLIENT_STATUS => GrpcFact::ClientStatus {
                tgid,
                fd: value,
                stream_id: low,
                code: high,
            },
            _ => return None,
        })
    }
}

/// What the hooks did, for the `stats` line.
#[derive(Debug, Default, Clone, Copy)]
pub struct GrpcCounters {
    /// Handlers started (`handleStream`).
    pub server_starts: u64,
    /// Of those, the ones whose stream the wire parser had: now served by the handler's
    /// goroutine.
    pub server_bound: u64,
    /// Handlers whose stream the wire parser did not have (no span to bind).
    pub server_unmatched: u64,
    /// Client streams opened (NewStream returned a stream).
    pub client_streams: u64,
    /// CLIENT spans whose goroutine came from NewStream.
    pub client_owned: u64,
    /// Client streams seen on the wire while several goroutines were inside NewStream on
    /// their connection: owned once NewStream returned.
    pub client_ambiguous: u64,
    /// ... of which the server end had taken the ids already: left unowned.
    pub client_late: u64,
    /// Spans whose rpc.service/rpc.method came from a hook (the wire's `:path` was hidden).
    pub methods_filled: u64,
    /// Spans whose rpc.grpc.status_code came from a hook (the wire's trailers were hidden).
    pub statuses_filled: u64,
    /// A hook and the wire disagreed on a method, status or owner (the wire was kept).
    pub mismatches: u64,
    /// CLIENT spans held for their status, and those released without it.
    pub held: u64,
    pub held_expired: u64,
    /// Facts dropped at their bounds.
    pub evicted: u64,
}

impl GrpcCounters {
    /// `key=value` fields for the stats line; `no_socket` is the kernel side's count of hook
    /// calls that named no followed socket.
    pub fn stats(&self, no_socket: u64) -> String {
        format!(
            "go_grpc_server_starts={} go_grpc_server_bound={} go_grpc_server_unmatched={} go_grpc_client_streams={} go_grpc_client_owned={} go_grpc_client_ambiguous={} go_grpc_client_late={} go_grpc_methods_filled={} go_grpc_statuses_filled={} go_grpc_mismatches={} go_grpc_held={} go_grpc_held_expired={} go_grpc_evicted={} go_grpc_no_socket={no_socket}",
            self.server_starts,
            self.server_bound,
            self.server_unmatched,
            self.client_streams,
            self.client_owned,
            self.client_ambiguous,
            self.client_late,
            self.methods_filled,
            self.statuses_filled,
            self.mismatches,
            self.held,
            self.held_expired,
            self.evicted,
        )
    }
}

/// What the hooks said about one stream.
#[derive(Debug, Default, Clone)]
struct Call {
    /// The goroutine serving (server) or issuing (client) the stream.
    g: Option<u64>,
    method: Option<String>,
    status: Option<u32>,
    /// Client: seen on the wire with no single goroutine to own it; decided at NewStream's
    /// return.
    undecided: bool,
}

/// Facts of one (tgid, fd).
#[derive(Debug, Default)]
struct ConnCalls {
    /// The connection generation of the fd's newest HTTP/2 request, and its role.
    conn: Option<(u64, Role)>,
    calls: HashMap<u32, Call>,
    /// Goroutines inside NewStream on this connection.
    opening: Vec<u64>,
    /// grpc-go's server transport (a handler started for it) or client transport (a
    /// NewStream named it) runs this connection: its streams are all known to the hooks.
    grpc_server: bool,
    grpc_client: bool,
}

struct Held {
    span: FinishedSpan,
    since_ns: u64,
}

/// grpc-go facts per process and connection.
#[derive(Default)]
pub struct GrpcGo {
    conns: HashMap<(u32, i32), ConnCalls>,
    /// (tgid, goroutine) -> fd, for goroutines inside NewStream.
    opening: HashMap<(u32, u64), i32>,
    /// (tgid, handler goroutine) -> (fd, stream id) of the stream it serves.
    handlers: HashMap<(u32, u64), (i32, u32)>,
    /// (tgid, fd, stream id) -> CLIENT span waiting for its status.
    held: HashMap<(u32, i32, u32), Held>,
    /// Spans ready to go out (held ones that got their status or timed out).
    ready: Vec<FinishedSpan>,
    pub counters: GrpcCounters,
}

impl GrpcGo {
    fn conn_mut(&mut self, tgid: u32, fd: i32) -> &mut ConnCalls {
        if self.conns.len() >= MAX_CONNS && !self.conns.contains_key(&(tgid, fd)) {
            self.counters.evicted += self.conns.len() as u64;
            self.conns.clear();
        }
        self.conns.entry((tgid, fd)).or_default()
    }

    /// The call of (tgid, fd, stream), created if missing (within the per-connection bound).
    fn call_mut(&mut self, tgid: u32, fd: i32, stream_id: u32) -> &mut Call {
        let mut evicted = 0;
        let conn = {
            if self.conns.len() >= MAX_CONNS && !self.conns.contains_key(&(tgid, fd)) {
                evicted += self.conns.len() as u64;
                self.conns.clear();
            }
            self.conns.entry((tgid, fd)).or_default()
        };
        if conn.calls.len() >= MAX_CALLS_PER_CONN && !conn.calls.contains_key(&stream_id) {
            evicted += conn.calls.len() as u64;
            conn.calls.clear();
        }
        self.counters.evicted += evicted;
        conn.calls.entry(stream_id).or_default()
    }

    /// The connection generation and role the fd held at its newest HTTP/2 request.
    fn conn_of(&self, tgid: u32, fd: i32) -> Option<(ConnKey, Role)> {
        let (conn_id, role) = self.conns.get(&(tgid, fd))?.conn?;
        Some((ConnKey { tgid, fd, conn_id }, role))
    }

    fn close_opening(&mut self, tgid: u32, g: u64) {
        if let Some(fd) = self.opening.remove(&(tgid, g))
            && let Some(conn) = self.conns.get_mut(&(tgid, fd))
        {
            conn.opening.retain(|o| *o != g);
        }
    }

    /// The connection `key` closed: its facts go, its held spans go out as they are.
    pub(super) fn closed(&mut self, key: ConnKey) {
        let (tgid, fd) = (key.tgid, key.fd);
        let ours = self
            .conns
            .get(&(tgid, fd))
            .is_some_and(|c| c.conn.is_none_or(|(id, _)| id == key.conn_id));
        if ours && let Some(conn) = self.conns.remove(&(tgid, fd)) {
            for g in conn.opening {
                self.opening.remove(&(tgid, g));
            }
        }
        let held: Vec<(u32, i32, u32)> = self
            .held
            .keys()
            .filter(|(t, f, _)| *t == tgid && *f == fd)
            .copied()
            .collect();
        self.release(&held);
    }

    pub(super) fn forget_process(&mut self, tgid: u32) {
        self.conns.retain(|(t, _), _| *t != tgid);
        self.opening.retain(|(t, _), _| *t != tgid);
        self.handlers.retain(|(t, _), _| *t != tgid);
        let held: Vec<(u32, i32, u32)> =
            self.held.keys().filter(|k| k.0 == tgid).copied().collect();
        self.release(&held);
    }

    /// Held spans older than [`HOLD_NS`] at `now_ns` (all with `u64::MAX`) are ready.
    pub(super) fn expire(&mut self, now_ns: u64) {
        let due: Vec<(u32, i32, u32)> = self
            .held
            .iter()
            .filter(|(_, h)| now_ns.saturating_sub(h.since_ns) >= HOLD_NS || now_ns == u64::MAX)
            .map(|(k, _)| *k)
            .collect();
        self.release(&due);
    }

    fn release(&mut self, keys: &[(u32, i32, u32)]) {
        for k in keys {
            if let Some(h) = self.held.remove(k) {
                self.counters.held_expired += 1;
                self.ready.push(h.span);
            }
        }
    }

    fn hold(&mut self, key: (u32, i32, u32), span: FinishedSpan) {
        if self.held.len() >= MAX_HELD
            && let Some(oldest) = self
                .held
                .iter()
                .min_by_key(|(_, h)| h.since_ns)
                .map(|(k, _)| *k)
        {
            self.release(&[oldest]);
        }
        self.counters.held += 1;
        self.held.insert(
            key,
            Held {
                span,
                since_ns: monotonic_ns(),
            },
        );
    }

    /// The spans released since the last call.
    pub(super) fn take_ready(&mut self) -> Vec<FinishedSpan> {
        std::mem::take(&mut self.ready)
    }

    pub fn len(&self) -> usize {
        self.conns
            .values()
            .map(|c| c.calls.len() + c.opening.len())
            .sum::<usize>()
            + self.handlers.len()
            + self.held.len()
            + self.ready.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl SpanBuilder {
    /// A fact from grpc-go's uprobes.
    pub(super) fn on_grpc(&mut self, fact: GrpcFact) {
        match fact {
            GrpcFact::ServerStart {
                tgid,
                g,
                fd,
                stream_id,
                method,
                ts_ns,
            } => self.grpc_server_start(tgid, g, fd, stream_id, method, ts_ns),
            GrpcFact::ServerEnd { tgid, g, ts_ns } => {
                if let Some(&(fd, stream_id)) = self.grpc.handlers.get(&(tgid, g)) {
                    self.grpc_handler_done(tgid, g, fd, stream_id, ts_ns);
                }
            }
            GrpcFact::ServerStatus {
                tgid,
                g,
                fd,
                stream_id,
                code,
                ts_ns,
            } => {
                self.grpc_status(tgid, fd, stream_id, code);
                if self.grpc.handlers.get(&(tgid, g)) == Some(&(fd, stream_id)) {
                    self.grpc_handler_done(tgid, g, fd, stream_id, ts_ns);
                }
            }
            GrpcFact::ClientStatus {
                tgid,
                fd,
                stream_id,
                code,
            } => self.grpc_status(tgid, fd, stream_id, code),
            GrpcFact::ClientOpen { tgid, g, fd } => {
                self.grpc.close_opening(tgid, g);
                if self.grpc.opening.len() >= MAX_OPENING {
                    self.grpc.counters.evicted += self.grpc.opening.len() as u64;
                    self.grpc.opening.clear();
                    for conn in self.grpc.conns.values_mut() {
                        conn.opening.clear();
                    }
                }
                self.grpc.opening.insert((tgid, g), fd);
                let conn = self.grpc.conn_mut(tgid, fd);
                conn.opening.push(g);
                conn.grpc_client = true;
            }
            GrpcFact::ClientStream {
                tgid,
                g,
                fd,
                stream_id,
                method,
            } => {
                self.grpc.close_opening(tgid, g);
                let (Some(fd), Some(stream_id)) = (fd, stream_id) else {
                    return;
                };
                self.grpc.counters.client_streams += 1;
                let call = self.grpc.call_mut(tgid, fd, stream_id);
                let other_owner = call.g.is_some_and(|owner| owner != g);
                let undecided = std::mem::take(&mut call.undecided);
                call.g = Some(g);
                call.method = method;
                if other_owner {
                    self.grpc.counters.mismatches += 1;
                }
                if undecided {
                    self.grpc_decide(tgid, fd, stream_id, g);
                }
            }
        }
    }

    fn grpc_server_start(
        &mut self,
        tgid: u32,
        g: u64,
        fd: i32,
        stream_id: u32,
        method: Option<String>,
        ts_ns: u64,
    ) {
        self.grpc.counters.server_starts += 1;
        let key = match self.grpc.conn_of(tgid, fd) {
            Some((key, role)) => (role == Role::Server).then_some(key),
            // The process's first streams came before it was known to have these hooks: its
            // connections were not noted. The fd names one connection of the process.
            None => {
                let key = self
                    .pending_h2
                    .keys()
                    .find(|(k, id)| k.tgid == tgid && k.fd == fd && *id == stream_id)
                    .map(|(k, _)| *k);
                if let Some(k) = key {
                    self.grpc.conn_mut(tgid, fd).conn = Some((k.conn_id, Role::Server));
                }
                key
            }
        };
        let pending = key.and_then(|key| Some(key).zip(self.pending_h2.get_mut(&(key, stream_id))));
        let Some((key, p)) = pending else {
            // The parser has no such stream (its connection is not followed as HTTP/2, or its
            // headers were never seen): nothing to bind, nothing to keep.
            self.grpc.counters.server_unmatched += 1;
            return;
        };
        if let Some(conn) = self.grpc.conns.get_mut(&(tgid, fd)) {
            conn.grpc_server = true;
        }
        let ctx = goroutine_ctx(g);
        let ids = p.ids;
        let read_on = p.ctx;
        if p.ctx != ctx {
            deactivate(&mut self.active, tgid, p.ctx, ids.span_id);
            p.ctx = ctx;
        }
        self.grpc_unpark_streams(key, stream_id, read_on);
        // handleStream serves one stream at a time, at the start of a new goroutine (or a
        // stream worker's loop): whatever else is active on `g` is from an earlier goroutine
        // that had the same struct (the runtime reuses them), never this handler's.
        if let Some(stack) = self.active.get_mut(&(tgid, ctx)) {
            stack.retain(|s| s.span_id == ids.span_id);
        }
        let stack_known = self.active.contains_key(&(tgid, ctx));
        if self.active.len() < MAX_ACTIVE_THREADS || stack_known {
            let stack = self.active.entry((tgid, ctx)).or_default();
            if !stack.iter().any(|s| s.span_id == ids.span_id) {
                stack.push(ids);
            }
        }
        self.goroutines
            .handler_started(tgid, g, Some(ids.span_id), ts_ns);
        self.grpc.counters.server_bound += 1;
        if self.grpc.handlers.len() >= MAX_OPENING {
            self.grpc.counters.evicted += self.grpc.handlers.len() as u64;
            self.grpc.handlers.clear();
        }
        self.grpc.handlers.insert((tgid, g), (fd, stream_id));
        let call = self.grpc.call_mut(tgid, fd, stream_id);
        call.g = Some(g);
        call.method = method;
    }

    /// The handler of stream `stream_id` of `key` starts; its request was read on goroutine
    /// `read_on` (the connection's first streams, before it was known to be grpc-go's). The
    /// other streams read there whose handlers have not started are moved to contexts of
    /// their own: the goroutine that read them serves none of them. It is the connection's
    /// reader, whose spawn chain reaches every handler, or a goroutine that has exited
    /// (grpc-go reads a new connection's first frames on the goroutine that accepted it,
    /// which ends once the reader starts) and whose struct the runtime may hand to this very
    /// handler: left there, those streams would sit above this handler's own and take its
    /// outbound calls.
    fn grpc_unpark_streams(&mut self, key: ConnKey, stream_id: u32, read_on: ExecCtx) {
        let tgid = key.tgid;
        if !is_goroutine(read_on)
            || self
                .active
                .get(&(tgid, read_on))
                .is_none_or(|stack| stack.is_empty())
        {
            return;
        }
        let calls = self.grpc.conns.get(&(tgid, key.fd)).map(|c| &c.calls);
        let waiting: Vec<u32> = self
            .pending_h2
            .iter()
            .filter(|((k, sid), p)| {
                *k == key
                    && *sid != stream_id
                    && p.ctx == read_on
                    && calls
                        .and_then(|c| c.get(sid))
                        .is_none_or(|call| call.g.is_none())
            })
            .map(|((_, sid), _)| *sid)
            .collect();
        for sid in waiting {
            let Some(p) = self.pending_h2.get_mut(&(key, sid)) else {
                continue;
            };
            let ids = p.ids;
            let own = placeholder_ctx(key.fd, sid);
            p.ctx = own;
            deactivate(&mut self.active, tgid, read_on, ids.span_id);
            if self.active.len() < MAX_ACTIVE_THREADS {
                self.active.entry((tgid, own)).or_default().push(ids);
            }
        }
    }

    /// The handler of stream `stream_id` on `g` is done: its duration is known, and the
    /// goroutine may run something else now, so it no longer serves the stream.
    fn grpc_handler_done(&mut self, tgid: u32, g: u64, fd: i32, stream_id: u32, ts_ns: u64) {
        self.grpc.handlers.remove(&(tgid, g));
        self.goroutines.handler_ended(tgid, g, ts_ns);
        if let Some((key, _)) = self.grpc.conn_of(tgid, fd)
            && let Some(p) = self.pending_h2.get(&(key, stream_id))
        {
            deactivate(&mut self.active, tgid, goroutine_ctx(g), p.ids.span_id);
        }
    }

    fn grpc_status(&mut self, tgid: u32, fd: i32, stream_id: u32, code: u32) {
        if let Some(mut held) = self.grpc.held.remove(&(tgid, fd, stream_id)) {
            let call = Call {
                status: Some(code),
                ..Call::default()
            };
            fill_status(&mut held.span, &call, true, &mut self.grpc.counters);
            self.grpc.ready.push(held.span);
            return;
        }
        // Kept only for a stream still open: a client reports its status after the wire
        // ended the stream, and a stream that did not need it leaves nothing behind.
        let open = self
            .grpc
            .conn_of(tgid, fd)
            .is_some_and(|(key, _)| self.pending_h2.contains_key(&(key, stream_id)))
            || self
                .grpc
                .conns
                .get(&(tgid, fd))
                .is_some_and(|c| c.calls.contains_key(&stream_id));
        if open {
            let call = self.grpc.call_mut(tgid, fd, stream_id);
            call.status.get_or_insert(code);
        }
    }

    /// NewStream returned on `g` for a client stream the span layer already has, with no
    /// owner: the span moves under what `g` serves, unless its server end took its ids.
    fn grpc_decide(&mut self, tgid: u32, fd: i32, stream_id: u32, g: u64) {
        let Some((key, _)) = self.grpc.conn_of(tgid, fd) else {
            return;
        };
        let ctx = goroutine_ctx(g);
        let parent = self.serving(tgid, ctx);
        let Some(p) = self.pending_h2.get_mut(&(key, stream_id)) else {
            return;
        };
        if p.linked {
            self.grpc.counters.client_late += 1;
            return;
        }
        p.ctx = ctx;
        if let Some(parent) = parent {
            p.ids = reparented(p.ids, &parent);
        }
        self.grpc.counters.client_owned += 1;
    }

    /// The execution context of the HTTP/2 request on (`key`, `stream_id`) that the wire
    /// gave to `ctx` (the goroutine that moved its bytes).
    pub(super) fn grpc_request_ctx(
        &mut self,
        key: ConnKey,
        role: Role,
        stream_id: u32,
        ctx: ExecCtx,
    ) -> ExecCtx {
        let (tgid, fd) = (key.tgid, key.fd);
        // Only connections the hooks named have facts.
        let Some(conn) = self.grpc.conns.get_mut(&(tgid, fd)) else {
            return ctx;
        };
        conn.conn = Some((key.conn_id, role));
        match role {
            // The reader goroutine read it; the handler, once started, serves it.
            Role::Server if conn.grpc_server => placeholder_ctx(fd, stream_id),
            Role::Server => ctx,
            Role::Client => {
                if let Some(g) = conn.calls.get(&stream_id).and_then(|c| c.g) {
                    self.grpc.counters.client_owned += 1;
                    return goroutine_ctx(g);
                }
                match conn.opening.as_slice() {
                    // No NewStream in flight on a grpc-go connection: its facts were lost.
                    [] if conn.grpc_client => unowned_ctx(),
                    [] => ctx,
                    // Its NewStream is the only one that has not returned yet.
                    &[g] => {
                        self.grpc.call_mut(tgid, fd, stream_id).g = Some(g);
                        self.grpc.counters.client_owned += 1;
                        goroutine_ctx(g)
                    }
                    _ => {
                        self.grpc.call_mut(tgid, fd, stream_id).undecided = true;
                        self.grpc.counters.client_ambiguous += 1;
                        unowned_ctx()
                    }
                }
            }
        }
    }

    /// An HTTP/2 stream's span is made: what the hooks said of it fills what the wire hid.
    /// A CLIENT span whose status only its process knows waits for it (None here).
    pub(super) fn grpc_finished(
        &mut self,
        key: ConnKey,
        role: Role,
        stream: &Http2Stream,
        mut span: FinishedSpan,
    ) -> Option<FinishedSpan> {
        let (tgid, fd, sid) = (key.tgid, key.fd, stream.stream_id);
        let call = self
            .grpc
            .conns
            .get_mut(&(tgid, fd))
            .filter(|c| c.conn.is_none_or(|(id, _)| id == key.conn_id))
            .and_then(|c| c.calls.remove(&sid));
        if role == Role::Server
            && let Some(ns) = self.goroutines.take_handler_duration(&span.span_id)
        {
            span.attributes.push((
                "difytrace.handler.duration_ns".into(),
                AttrValue::Int(i64::try_from(ns).unwrap_or(i64::MAX)),
            ));
        }
        let Some(call) = call else {
            return Some(span);
        };
        fill_method(&mut span, stream, &call, &mut self.grpc.counters);
        let hidden = status_hidden(stream);
        fill_status(&mut span, &call, hidden, &mut self.grpc.counters);
        let waits = role == Role::Client
            && call.g.is_some()
            && call.status.is_none()
            && stream.grpc_status().is_none()
            && hidden;
        if waits {
            self.grpc.hold((tgid, fd, sid), span);
            return None;
        }
        Some(span)
    }

    /// Spans the grpc-go facts released (held CLIENT spans), through the same last steps as
    /// every span.
    pub fn grpc_flush(&mut self, out: &mut Vec<FinishedSpan>) {
        if self.grpc.ready.is_empty() {
            return;
        }
        let from = out.len();
        out.extend(self.grpc.take_ready());
        self.finalize(out, from);
    }
}

/// The stream ended normally, but the block that carries its gRPC status (trailers, or a
/// trailers-only response) could not be decoded whole.
fn status_hidden(stream: &Http2Stream) -> bool {
    if stream.end != StreamEnd::Complete {
        return false;
    }
    match (&stream.response.trailers, &stream.response.headers) {
        (Some(t), _) => t.partial,
        (None, Some(h)) => h.partial,
        (None, None) => false,
    }
}

fn path_of(target: &str) -> &str {
    target.split(['?', '#']).next().unwrap_or(target)
}

fn attr<'a>(span: &'a FinishedSpan, key: &str) -> Option<&'a AttrValue> {
    span.attributes
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

fn set_attr(span: &mut FinishedSpan, key: &str, value: AttrValue) {
    match span.attributes.iter_mut().find(|(k, _)| k == key) {
        Some((_, v)) => *v = value,
        None => span.attributes.push((key.to_string(), value)),
    }
}

/// The wire's gRPC facts are there only when it knew the stream was gRPC; a hook's fact
/// says it is.
fn mark_grpc(span: &mut FinishedSpan, stream: &Http2Stream) {
    if attr(span, "rpc.system").is_some() {
        return;
    }
    set_attr(span, "rpc.system", AttrValue::Str("grpc".into()));
    let clamp = |n: u64| AttrValue::Int(i64::try_from(n).unwrap_or(i64::MAX));
    set_attr(
        span,
        "difytrace.grpc.request_messages",
        clamp(stream.request.body.grpc_messages),
    );
    set_attr(
        span,
        "difytrace.grpc.response_messages",
        clamp(stream.response.body.grpc_messages),
    );
}

fn fill_method(
    span: &mut FinishedSpan,
    stream: &Http2Stream,
    call: &Call,
    counters: &mut GrpcCounters,
) {
    let Some(method) = &call.method else {
        return;
    };
    let from_wire = match stream.path() {
        Some(path) if path_of(path) != method => {
            counters.mismatches += 1;
            return;
        }
        // The wire's own `:path`, but it could not tell the stream was gRPC (its
        // content-type and status were hidden): the hook says it is.
        Some(_) if attr(span, "rpc.method").is_none() => true,
        Some(_) => return,
        None => false,
    };
    let Some((service, name)) = split_path(method) else {
        return;
    };
    mark_grpc(span, stream);
    set_attr(span, "rpc.service", AttrValue::Str(service.to_string()));
    set_attr(span, "rpc.method", AttrValue::Str(name.to_string()));
    if !from_wire {
        set_attr(
            span,
            "difytrace.grpc.method_source",
            AttrValue::Str("uprobe".into()),
        );
    }
    span.name = format!("{service}/{name}");
    counters.methods_filled += 1;
}

/// The hook's status on `span` when the wire's was `hidden` (else only compared).
fn fill_status(span: &mut FinishedSpan, call: &Call, hidden: bool, counters: &mut GrpcCounters) {
    let Some(code) = call.status else {
        return;
    };
    match attr(span, "rpc.grpc.status_code") {
        Some(AttrValue::Int(wire)) => {
            if *wire != i64::from(code) {
                counters.mismatches += 1;
            }
            return;
        }
        Some(_) => return,
        None if !hidden => return,
        None => {}
    }
    set_attr(
        span,
        "rpc.grpc.status_code",
        AttrValue::Int(i64::from(code)),
    );
    if attr(span, "rpc.system").is_none() {
        set_attr(span, "rpc.system", AttrValue::Str("grpc".into()));
    }
    set_attr(
        span,
        "difytrace.grpc.status_source",
        AttrValue::Str("uprobe".into()),
    );
    counters.statuses_filled += 1;
    if h2_attrs::grpc_is_fault(span.kind, code) && span.status == SpanStatus::Unset {
        let name = h2_attrs::grpc_code_name(code);
        set_attr(span, "error.type", AttrValue::Str(name.clone()));
        span.status = SpanStatus::Error(name);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::{GoFact, ResourceSource};
    use super::*;
    use crate::protocol::http1::ChunkTs;
    use crate::protocol::http2::{BodyStats, HeaderBlock, StreamHalf};
    use crate::span::model::ProcessResource;
    use crate::span::model::SpanKind;
    use crate::stream::StreamEvent;

    struct Resources;

    impl ResourceSource for Resources {
        fn resource(&mut self, tgid: u32) -> Arc<ProcessResource> {
            Arc::new(ProcessResource {
                service_name: "svc".into(),
                pid: tgid,
                executable_name: "grpcfixture".into(),
                host_name: "h".into(),
                container: None,
            })
        }
    }

    const SERVER: ConnKey = ConnKey {
        tgid: 10,
        fd: 5,
        conn_id: 1,
    };
    const CLIENT: ConnKey = ConnKey {
        tgid: 10,
        fd: 6,
        conn_id: 2,
    };
    const READER: u64 = 0x900;
    const LOOPY: u64 = 0x777;

    fn block(fields: &[(&str, &str)], unknown: u32) -> HeaderBlock {
        HeaderBlock {
            fields: fields
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            unknown_fields: unknown,
            dropped_fields: 0,
            partial: unknown > 0,
        }
    }

    /// Request headers as a warmed-up grpc-go client sends them, seen from mid-connection
    /// (`path` None: only `:method` and `:scheme` are static-table entries), or whole.
    fn request(path: Option<&str>) -> HeaderBlock {
        match path {
            Some(p) => block(
                &[
                    (":method", "POST"),
                    (":scheme", "http"),
                    (":path", p),
                    ("content-type", "application/grpc"),
                ],
                0,
            ),
            None => block(&[(":method", "POST"), (":scheme", "http")], 5),
        }
    }

    /// A complete unary stream; `status` None: the trailers could not be decoded.
    fn stream(id: u32, path: Option<&str>, status: Option<u32>) -> Http2Stream {
        let ts = ChunkTs {
            enter_ns: 1_000,
            exit_ns: 2_000,
        };
        let half = |headers, trailers| StreamHalf {
            headers: Some(headers),
            trailers,
            body: BodyStats {
                grpc_messages: 1,
                ..BodyStats::default()
            },
            first: Some(ts),
            end: Some(ts),
        };
        let (response, trailers) = match status {
            Some(code) => (
                block(
                    &[(":status", "200"), ("content-type", "application/grpc")],
                    0,
                ),
                block(&[("grpc-status", &code.to_string())], 0),
            ),
            None => (block(&[(":status", "200")], 1), block(&[], 2)),
        };
        Http2Stream {
            stream_id: id,
            request: half(request(path), None),
            response: half(response, Some(trailers)),
            informational: 0,
            started: ts,
            ended: ts,
            end: StreamEnd::Complete,
            missed_start: false,
            sync_lost: false,
        }
    }

    #[derive(Default)]
    struct World {
        b: SpanBuilder,
        spans: Vec<FinishedSpan>,
    }

    impl World {
        fn req(&mut self, key: ConnKey, role: Role, ctx: ExecCtx, id: u32, path: Option<&str>) {
            let ev = StreamEvent::H2Request {
                key,
                role,
                ctx,
                peer: None,
                local: None,
                stream_id: id,
                headers: Box::new(request(path)),
            };
            self.b.on_event(ev, &mut Resources, &mut self.spans);
        }

        fn end(&mut self, key: ConnKey, role: Role, s: Http2Stream) {
            let ev = StreamEvent::H2Stream {
                key,
                role,
                peer: None,
                stream: Box::new(s),
            };
            self.b.on_event(ev, &mut Resources, &mut self.spans);
        }

        fn fact(&mut self, f: GrpcFact) {
            self.b.on_go(GoFact::Grpc(f));
            self.b.grpc_flush(&mut self.spans);
        }

        fn start(&mut self, g: u64, id: u32, method: &str) {
            self.fact(GrpcFact::ServerStart {
                tgid: 10,
                g,
                fd: SERVER.fd,
                stream_id: id,
                method: Some(method.into()),
                ts_ns: 100,
            });
        }

        fn open(&mut self, g: u64) {
            self.fact(GrpcFact::ClientOpen {
                tgid: 10,
                g,
                fd: CLIENT.fd,
            });
        }

        fn opened(&mut self, g: u64, id: u32, method: &str) {
            self.fact(GrpcFact::ClientStream {
                tgid: 10,
                g,
                fd: Some(CLIENT.fd),
                stream_id: Some(id),
                method: Some(method.into()),
            });
        }

        fn span(&self, kind: SpanKind, name: &str) -> &FinishedSpan {
            self.spans
                .iter()
                .find(|s| s.kind == kind && s.name == name)
                .unwrap_or_else(|| panic!("no {kind:?} span {name}: {:#?}", self.spans))
        }
    }

    fn int(s: &FinishedSpan, k: &str) -> Option<i64> {
        match s.attr(k) {
            Some(AttrValue::Int(v)) => Some(*v),
            _ => None,
        }
    }

    fn string(s: &FinishedSpan, k: &str) -> Option<String> {
        match s.attr(k) {
            Some(AttrValue::Str(v)) => Some(v.clone()),
            _ => None,
        }
    }

    /// A handler started on its own goroutine (the reader goroutine read the request) makes
    /// an outbound call, written by the client connection's writer goroutine: the call is
    /// the SERVER span's child.
    #[test]
    fn the_handler_goroutine_serves_the_stream_and_owns_its_calls() {
        let mut w = World::default();
        w.req(
            SERVER,
            Role::Server,
            goroutine_ctx(READER),
            1,
            Some("/a.S/M"),
        );
        w.start(0x100, 1, "/a.S/M");
        w.open(0x100);
        w.opened(0x100, 1, "/b.T/N");
        w.req(
            CLIENT,
            Role::Client,
            goroutine_ctx(LOOPY),
            1,
            Some("/b.T/N"),
        );
        w.end(CLIENT, Role::Client, stream(1, Some("/b.T/N"), Some(0)));
        // The status, written on the handler's goroutine, ends the handler; a RET probe's
        // end after it (with --go-handler-returns) changes nothing.
        w.fact(GrpcFact::ServerStatus {
            tgid: 10,
            g: 0x100,
            fd: SERVER.fd,
            stream_id: 1,
            code: 0,
            ts_ns: 350,
        });
        w.fact(GrpcFact::ServerEnd {
            tgid: 10,
            g: 0x100,
            ts_ns: 400,
        });
        w.end(SERVER, Role::Server, stream(1, Some("/a.S/M"), Some(0)));
        let server = w.span(SpanKind::Server, "a.S/M");
        let client = w.span(SpanKind::Client, "b.T/N");
        assert_eq!(client.parent_span_id, Some(server.span_id));
        assert_eq!(client.trace_id, server.trace_id);
        assert_eq!(int(server, "difytrace.handler.duration_ns"), Some(250));
        let c = w.b.grpc.counters;
        assert_eq!((c.server_bound, c.client_owned, c.mismatches), (1, 1, 0));
        assert_eq!(w.b.active_len(), 0);
        assert!(w.b.grpc.is_empty(), "facts of ended streams are gone");
    }

    /// Once a process is known to have the server hooks, a stream waits for its handler on
    /// a context of its own: a goroutine the reader spawned (not a handler) serves nothing.
    #[test]
    fn the_reader_goroutine_serves_no_stream_of_a_hooked_server() {
        let mut w = World::default();
        w.req(
            SERVER,
            Role::Server,
            goroutine_ctx(READER),
            1,
            Some("/a.S/M"),
        );
        w.start(0x100, 1, "/a.S/M");
        w.req(
            SERVER,
            Role::Server,
            goroutine_ctx(READER),
            3,
            Some("/a.S/M"),
        );
        w.b.on_go(GoFact::Spawn {
            tgid: 10,
            parent: READER,
            child: 0x901,
        });
        w.req(
            CLIENT,
            Role::Client,
            goroutine_ctx(0x901),
            1,
            Some("/b.T/N"),
        );
        w.end(CLIENT, Role::Client, stream(1, Some("/b.T/N"), Some(0)));
        let client = w.span(SpanKind::Client, "b.T/N");
        assert_eq!(client.parent_span_id, None);
    }

    /// The run that failed the chained-call e2e test: grpc-go reads a new connection's
    /// first frames (four requests here) on the goroutine that accepted it, which then
    /// spawns the reader and exits, and the runtime gives its struct to the first handler.
    /// The three streams still waiting for their handlers were left above the first
    /// handler's own span on that goroutine, so its outbound call went under stream 7.
    #[test]
    fn a_handler_on_the_reused_struct_of_the_goroutine_that_read_its_request() {
        const ACCEPTED: u64 = 0x500;
        let mut w = World::default();
        for id in [1, 3, 5, 7] {
            let path = format!("/a.S/M{id}");
            w.req(
                SERVER,
                Role::Server,
                goroutine_ctx(ACCEPTED),
                id,
                Some(&path),
            );
        }
        w.b.on_go(GoFact::Spawn {
            tgid: 10,
            parent: ACCEPTED,
            child: READER,
        });
        w.b.on_go(GoFact::Spawn {
            tgid: 10,
            parent: READER,
            child: ACCEPTED,
        });
        for (g, id) in [(ACCEPTED, 1), (0x200, 3), (0x300, 5), (0x400, 7)] {
            w.start(g, id, &format!("/a.S/M{id}"));
            w.open(g);
            w.opened(g, id, &format!("/b.T/N{id}"));
            let path = format!("/b.T/N{id}");
            w.req(CLIENT, Role::Client, goroutine_ctx(LOOPY), id, Some(&path));
        }
        for id in [1, 3, 5, 7] {
            let path = format!("/b.T/N{id}");
            w.end(CLIENT, Role::Client, stream(id, Some(&path), Some(0)));
            w.fact(GrpcFact::ServerStatus {
                tgid: 10,
                g: [ACCEPTED, 0x200, 0x300, 0x400][(id as usize) / 2],
                fd: SERVER.fd,
                stream_id: id,
                code: 0,
                ts_ns: 300,
            });
            let path = format!("/a.S/M{id}");
            w.end(SERVER, Role::Server, stream(id, Some(&path), Some(0)));
        }
        for id in [1, 3, 5, 7] {
            let server = w.span(SpanKind::Server, &format!("a.S/M{id}"));
            let client = w.span(SpanKind::Client, &format!("b.T/N{id}"));
            assert_eq!(
                client.parent_span_id,
                Some(server.span_id),
                "call of stream {id}"
            );
        }
        assert_eq!(w.b.active_len(), 0);
    }

    /// The connection's first requests were read by its reader goroutine, whose spawn chain
    /// reaches every goroutine of the connection: once one handler starts, the streams still
    /// waiting for theirs are no longer the reader's, so a goroutine it spawned that is no
    /// handler serves none of them.
    #[test]
    fn streams_waiting_for_their_handler_leave_the_reader_at_the_first_start() {
        let mut w = World::default();
        for id in [1, 3] {
            let path = format!("/a.S/M{id}");
            w.req(SERVER, Role::Server, goroutine_ctx(READER), id, Some(&path));
        }
        w.b.on_go(GoFact::Spawn {
            tgid: 10,
            parent: READER,
            child: 0x100,
        });
        w.start(0x100, 1, "/a.S/M1");
        w.b.on_go(GoFact::Spawn {
            tgid: 10,
            parent: READER,
            child: 0x901,
        });
        // An HTTP/2 connection the hooks never named, written by that goroutine.
        let other = ConnKey {
            tgid: 10,
            fd: 7,
            conn_id: 3,
        };
        w.req(other, Role::Client, goroutine_ctx(0x901), 1, Some("/c.U/P"));
        w.end(other, Role::Client, stream(1, Some("/c.U/P"), Some(0)));
        let client = w.span(SpanKind::Client, "c.U/P");
        assert_eq!(client.parent_span_id, None);
    }

    /// Headers hidden by HPACK state from before the agent: method and status come from the
    /// hooks; what the wire did decode is kept, and a disagreement is counted.
    #[test]
    fn hidden_method_and_status_are_filled_and_decoded_ones_kept() {
        let mut w = World::default();
        w.req(SERVER, Role::Server, goroutine_ctx(READER), 1, None);
        w.start(0x100, 1, "/a.S/M");
        w.fact(GrpcFact::ServerStatus {
            tgid: 10,
            g: 0x100,
            fd: SERVER.fd,
            stream_id: 1,
            code: 5,
            ts_ns: 300,
        });
        w.end(SERVER, Role::Server, stream(1, None, None));
        let s = w.span(SpanKind::Server, "a.S/M");
        assert_eq!(string(s, "rpc.system").as_deref(), Some("grpc"));
        assert_eq!(string(s, "rpc.service").as_deref(), Some("a.S"));
        assert_eq!(string(s, "rpc.method").as_deref(), Some("M"));
        assert_eq!(int(s, "rpc.grpc.status_code"), Some(5));
        assert_eq!(
            s.attr("difytrace.partial_headers"),
            Some(&AttrValue::Bool(true))
        );
        assert_eq!(
            string(s, "difytrace.grpc.method_source").as_deref(),
            Some("uprobe")
        );
        // NOT_FOUND is the caller's problem, not the server's.
        assert_eq!(s.status, SpanStatus::Unset);

        // The wire decoded another path and status: both kept, two disagreements.
        w.req(
            SERVER,
            Role::Server,
            goroutine_ctx(READER),
            3,
            Some("/a.S/X"),
        );
        w.start(0x200, 3, "/a.S/M");
        w.fact(GrpcFact::ServerStatus {
            tgid: 10,
            g: 0x200,
            fd: SERVER.fd,
            stream_id: 3,
            code: 13,
            ts_ns: 300,
        });
        w.end(SERVER, Role::Server, stream(3, Some("/a.S/X"), Some(0)));
        let s = w.span(SpanKind::Server, "a.S/X");
        assert_eq!(int(s, "rpc.grpc.status_code"), Some(0));
        assert_eq!(s.attr("difytrace.grpc.method_source"), None);
        let c = w.b.grpc.counters;
        assert_eq!(
            (c.methods_filled, c.statuses_filled, c.mismatches),
            (1, 1, 2)
        );
    }

    /// A client learns its status from trailers the wire could not decode, after the wire
    /// ended the stream: the span waits for it, or goes out without it after HOLD_NS.
    #[test]
    fn a_client_span_waits_for_its_hidden_status() {
        let mut w = World::default();
        for (g, id) in [(0x100u64, 1u32), (0x200, 3)] {
            w.open(g);
            w.opened(g, id, "/a.S/M");
            w.req(CLIENT, Role::Client, goroutine_ctx(LOOPY), id, None);
            w.end(CLIENT, Role::Client, stream(id, None, None));
        }
        assert!(w.spans.is_empty(), "held: {:#?}", w.spans);
        w.fact(GrpcFact::ClientStatus {
            tgid: 10,
            fd: CLIENT.fd,
            stream_id: 1,
            code: 5,
        });
        assert_eq!(w.spans.len(), 1);
        let s = &w.spans[0];
        assert_eq!(s.name, "a.S/M");
        assert_eq!(int(s, "rpc.grpc.status_code"), Some(5));
        assert_eq!(s.status, SpanStatus::Error("NOT_FOUND".into()));
        assert_eq!(string(s, "error.type").as_deref(), Some("NOT_FOUND"));
        // The other one times out.
        let later = monotonic_ns() + HOLD_NS + 1;
        w.b.evict_idle(later, &mut Resources, &mut w.spans);
        assert_eq!(w.spans.len(), 2);
        assert_eq!(int(&w.spans[1], "rpc.grpc.status_code"), None);
        let c = w.b.grpc.counters;
        assert_eq!((c.held, c.held_expired), (2, 1));
        // A status for a stream already out leaves nothing behind.
        w.fact(GrpcFact::ClientStatus {
            tgid: 10,
            fd: CLIENT.fd,
            stream_id: 3,
            code: 0,
        });
        assert!(w.b.grpc.is_empty());
    }

    /// Two handlers call out on one connection at once, and the wire shows the first stream
    /// before either NewStream returned: the stream has no owner until its NewStream says
    /// whose it is, and then sits under that handler's span.
    #[test]
    fn concurrent_new_streams_are_owned_at_return() {
        let mut w = World::default();
        w.req(
            SERVER,
            Role::Server,
            goroutine_ctx(READER),
            1,
            Some("/a.S/One"),
        );
        w.req(
            SERVER,
            Role::Server,
            goroutine_ctx(READER),
            3,
            Some("/a.S/Two"),
        );
        w.start(0x100, 1, "/a.S/One");
        w.start(0x200, 3, "/a.S/Two");
        w.open(0x100);
        w.open(0x200);
        w.req(
            CLIENT,
            Role::Client,
            goroutine_ctx(LOOPY),
            1,
            Some("/b.T/N"),
        );
        w.opened(0x100, 3, "/b.T/N");
        w.opened(0x200, 1, "/b.T/N");
        w.req(
            CLIENT,
            Role::Client,
            goroutine_ctx(LOOPY),
            3,
            Some("/b.T/N"),
        );
        w.end(CLIENT, Role::Client, stream(1, Some("/b.T/N"), Some(0)));
        w.end(CLIENT, Role::Client, stream(3, Some("/b.T/N"), Some(0)));
        w.end(SERVER, Role::Server, stream(1, Some("/a.S/One"), Some(0)));
        w.end(SERVER, Role::Server, stream(3, Some("/a.S/Two"), Some(0)));
        let one = w.span(SpanKind::Server, "a.S/One").span_id;
        let two = w.span(SpanKind::Server, "a.S/Two").span_id;
        let parents: Vec<_> = w
            .spans
            .iter()
            .filter(|s| s.kind == SpanKind::Client)
            .map(|s| s.parent_span_id)
            .collect();
        // Stream 1 is the second handler's call, stream 3 the first's.
        assert_eq!(parents, [Some(two), Some(one)]);
        let c = w.b.grpc.counters;
        assert_eq!(
            (c.client_ambiguous, c.client_owned, c.client_late),
            (1, 2, 0)
        );
    }

    #[test]
    fn facts_decode_from_go_records() {
        let f = GrpcFact::from_go(
            go_op::GRPC_SERVER_STATUS,
            1,
            2,
            (5u64 << 32) | 7,
            9,
            "",
            false,
            42,
        );
        assert_eq!(
            f,
            Some(GrpcFact::ServerStatus {
                tgid: 1,
                g: 2,
                fd: 9,
                stream_id: 7,
                code: 5,
                ts_ns: 42,
            })
        );
        // A cut-off method is never used.
        let f = GrpcFact::from_go(go_op::GRPC_SERVER_START, 1, 2, 7, 9, "/a.S/M", true, 0);
        assert!(matches!(
            f,
            Some(GrpcFact::ServerStart { method: None, .. })
        ));
        let f = GrpcFact::from_go(go_op::GRPC_CLIENT_STREAM, 1, 2, 0, -1, "", false, 0);
        assert!(matches!(
            f,
            Some(GrpcFact::ClientStream {
                fd: None,
                stream_id: None,
                ..
            })
        ));
        assert_eq!(
            GrpcFact::from_go(go_op::SPAWN, 1, 2, 3, 4, "", false, 0),
            None
        );
    }
}
