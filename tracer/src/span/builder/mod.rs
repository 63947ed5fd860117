//! Pairs requests with responses per connection and gives each pair its place in a trace.
//!
//! Linking inside a process: a SERVER span is "active" on the thread that received its
//! request from the moment the request is complete until its response is complete; a CLIENT
//! request started on that thread meanwhile is its child (sync workers, thread-per-request).
//! A CLIENT request outside any thread context in a plugin process belongs to the plugin
//! invocation being served (see `plugin`).

use std::{collections::VecDeque, net::SocketAddr, sync::Arc};

use rand::Rng as _;

use super::{
    clock::Clock,
    clock::monotonic_ns,
    conn_ends::ConnEnds,
    genai,
    goroutines::Goroutines,
    h2_attrs,
    http_attrs::{self, Outcome},
    late_binding::LateBinding,
    model::{AttrValue, FinishedSpan, ProcessResource, SpanKind, SpanLink, SpanStatus},
    plugin::PluginSessions,
    trace_context::TraceContext,
    traceparent,
};
use crate::fast_map::{HashMap, HashSet};
use crate::{
    protocol::{
        http1::{ChunkTs, Http1Message, StartLine},
        http2::Http2Stream,
    },
    stream::{ConnKey, ExecCtx, Role, StreamEvent, fd_ctx, goroutine_ctx, goroutine_of},
};

/// What a Go process's uprobes report, as the span layer uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GoFact {
    /// A handler (`serverHandler.ServeHTTP`) starts on goroutine `g` at `ts_ns`.
    HandlerStart {
        tgid: u32,
        g: u64,
        method: String,
        path: String,
        ts_ns: u64,
    },
    /// The handler running on goroutine `g` returned at `ts_ns`.
    HandlerEnd { tgid: u32, g: u64, ts_ns: u64 },
    /// `parent` created goroutine `child`.
    Spawn { tgid: u32, parent: u64, child: u64 },
    /// Goroutine `g` asks for a request on client connection `fd`.
    ClientStart { tgid: u32, g: u64, fd: i32 },
    /// The request goroutine `g` serves matched route template `route`.
    Route { tgid: u32, g: u64, route: String },
    /// A grpc-go hook's report (`grpc_go`).
    Grpc(grpc_go::GrpcFact),
}

pub mod grpc_go;

/// Requests waiting for their response on one connection (pipelining depth bound).
pub const MAX_PENDING_PER_CONN: usize = 64;
/// Server spans active on threads at once.
pub const MAX_ACTIVE_THREADS: usize = 65536;

/// Ids of a span, fixed when its request is seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanIds {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: Option<[u8; 8]>,
    pub parent_is_remote: bool,
}

struct Pending {
    ids: SpanIds,
    ctx: ExecCtx,
    request: Box<Http1Message>,
    peer: Option<SocketAddr>,
    /// Paired with the request on the other end of the connection (both ends traced).
    linked: bool,
    /// The request's own `traceparent`, kept as a link when it is not the span's parent.
    incoming: Option<traceparent::TraceParent>,
}

struct PendingH2 {
    ids: SpanIds,
    ctx: u64,
    linked: bool,
    incoming: Option<traceparent::TraceParent>,
}

/// HTTP/2 streams waiting for their end, at most (beyond it the oldest are dropped).
pub const MAX_PENDING_H2: usize = 65536;

#[derive(Debug, Default, Clone, Copy)]
pub struct BuilderCounters {
    pub spans: u64,
    pub unmatched_responses: u64,
    pub pending_dropped: u64,
    pub no_response: u64,
    /// SERVER spans made children of the CLIENT span at the other end of their connection.
    pub cross_process_links: u64,
    /// HTTP/2 streams ended without any decoded header block (no span made).
    pub h2_headerless: u64,
}

/// Where a span's resource comes from (the process cache of the agent).
pub trait ResourceSource {
    fn resource(&mut self, tgid: u32) -> Arc<ProcessResource>;
}

#[derive(Default)]
pub struct SpanBuilder {
    pending: HashMap<ConnKey, (Role, VecDeque<Pending>)>,
    /// HTTP/2 streams whose request headers were seen, by (connection, stream id).
    pending_h2: HashMap<(ConnKey, u32), PendingH2>,
    /// Open SERVER spans per (tgid, ctx), innermost last.
    active: HashMap<(u32, ExecCtx), Vec<SpanIds>>,
    pub counters: BuilderCounters,
    clock: Option<Clock>,
    pub plugins: PluginSessions,
    pub goroutines: Goroutines,
    ends: ConnEnds,
    pub context: TraceContext,
    pub late: LateBinding,
    pub grpc: grpc_go::GrpcGo,
    /// Connections whose spans come from TLS plaintext (`tls=true`).
    tls_conns: HashSet<ConnKey>,
}

impl SpanBuilder {
    pub fn new(clock: Clock) -> Self {
        Self {
            clock: Some(clock),
            ..Default::default()
        }
    }

    pub fn pending_len(&self) -> usize {
        self.pending.values().map(|(_, q)| q.len()).sum::<usize>() + self.pending_h2.len()
    }

    pub fn active_len(&self) -> usize {
        self.active.len()
    }

    pub fn on_event(
        &mut self,
        event: StreamEvent,
        resources: &mut dyn ResourceSource,
        out: &mut Vec<FinishedSpan>,
    ) {
        let from = out.len();
        self.on_event_inner(event, resources, out);
        self.finalize(out, from);
    }

    /// The spans made since `from` in `out`: held while their parent is not known yet (see
    /// `late_binding`), given what their trace learned, plus the held spans just settled.
    fn finalize(&mut self, out: &mut Vec<FinishedSpan>, from: usize) {
        let now = monotonic_ns();
        let new: Vec<FinishedSpan> = out.drain(from..).collect();
        for span in new {
            if let Some(span) = self.late.apply(span, now) {
                out.push(span);
            }
        }
        out.extend(self.late.take_released());
        for span in &mut out[from..] {
            self.context.apply(span);
        }
    }

    /// At shutdown: the held spans go out with their fallback parents.
    pub fn flush(&mut self, out: &mut Vec<FinishedSpan>) {
        let from = out.len();
        self.late.expire(monotonic_ns(), None, true);
        self.grpc.expire(u64::MAX);
        out.extend(self.grpc.take_ready());
        self.finalize(out, from);
    }

    fn on_event_inner(
        &mut self,
        event: StreamEvent,
        resources: &mut dyn ResourceSource,
        out: &mut Vec<FinishedSpan>,
    ) {
        match event {
            StreamEvent::Message {
                key,
                role,
                ctx,
                peer,
                local,
                message,
            } => match message.start_line {
                StartLine::Request { .. } => {
                    self.ends.note(key, role, local, peer);
                    self.on_request(key, role, ctx, peer, message)
                }
                StartLine::Response { status, .. } => {
                    if (100..200).contains(&status) && status != 101 {
                        return;
                    }
                    self.on_response(key, message, resources, out);
                }
            },
            StreamEvent::Closed { key, ts_ns } => {
                self.on_closed(key, ts_ns, Outcome::ConnectionClosed, resources, out);
                self.ends.forget(key);
                self.grpc.closed(key);
                self.tls_conns.remove(&key);
            }
            StreamEvent::Tls { key } => {
                self.tls_conns.insert(key);
            }
            StreamEvent::Lost { key, ts_ns } => {
                self.on_closed(key, ts_ns, Outcome::CaptureLost, resources, out)
            }
            StreamEvent::H2Request {
                key,
                role,
                ctx,
                peer,
                local,
                stream_id,
                headers,
            } => {
                self.ends.note(key, role, local, peer);
                let ctx = self.grpc_request_ctx(key, role, stream_id, ctx);
                let incoming = headers.get("traceparent").and_then(traceparent::parse);
                let link = match role {
                    Role::Server => self.client_end_h2(key, stream_id),
                    Role::Client => None,
                };
                let linked = link.is_some();
                let ids = self.ids_for(key, role, ctx, incoming, link);
                let linked =
                    linked || (role == Role::Client && self.relink_server_h2(key, stream_id, &ids));
                if self.pending_h2.len() >= MAX_PENDING_H2 {
                    self.counters.pending_dropped += 1;
                    if let Some(k) = self.pending_h2.keys().next().copied()
                        && let Some(dropped) = self.pending_h2.remove(&k)
                    {
                        deactivate(&mut self.active, k.0.tgid, dropped.ctx, dropped.ids.span_id);
                    }
                }
                self.pending_h2.insert(
                    (key, stream_id),
                    PendingH2 {
                        ids,
                        ctx,
                        linked,
                        incoming,
                    },
                );
            }
            StreamEvent::H2Stream {
                key,
                role,
                peer,
                stream,
            } => {
                // A stream of which no header block was decoded says nothing (and on a
                // connection joined mid-stream it may be another protocol's bytes taken for
                // frames): no span.
                if stream.request.headers.is_none() && stream.response.headers.is_none() {
                    self.counters.h2_headerless += 1;
                    if let Some(p) = self.pending_h2.remove(&(key, stream.stream_id))
                        && role == Role::Server
                    {
                        deactivate(&mut self.active, key.tgid, p.ctx, p.ids.span_id);
                    }
                    return;
                }
                let span = self.finish_h2(key, role, peer, &stream, resources);
                out.extend(self.grpc_finished(key, role, &stream, span));
            }
            StreamEvent::Stdio {
                key,
                inode,
                ingress,
                line,
            } => {
                let thread_parent = self
                    .active
                    .get(&(key.tgid, line.ctx))
                    .and_then(|stack| stack.last())
                    .copied();
                let clock = self.clock();
                // Looked up before the line is applied: an `end` closes what it names.
                let named = (!ingress)
                    .then(|| self.plugins.named_by_line(key.tgid, &line))
                    .flatten();
                self.plugins.on_line(
                    key.tgid,
                    inode,
                    ingress,
                    &line,
                    thread_parent,
                    clock,
                    &mut |tgid| resources.resource(tgid),
                    out,
                );
                if let Some((ids, ends)) = named {
                    self.late.named(key.tgid, line.ctx, ids);
                    if ends {
                        self.late.unbind(key.tgid, line.ctx);
                    }
                }
            }
        }
    }

    fn clock(&self) -> Clock {
        self.clock.unwrap_or_else(Clock::now)
    }

    /// A process exited: its open plugin sessions (and their daemon sides) end in error.
    pub fn process_exited(
        &mut self,
        tgid: u32,
        ts_ns: u64,
        resources: &mut dyn ResourceSource,
        out: &mut Vec<FinishedSpan>,
    ) {
        let clock = self.clock();
        let from = out.len();
        self.plugins
            .process_exited(tgid, ts_ns, clock, &mut |t| resources.resource(t), out);
        self.late.expire(monotonic_ns(), Some(tgid), false);
        self.finalize(out, from);
        self.forget_process(tgid);
    }

    /// Ends plugin sessions that went silent.
    pub fn evict_idle(
        &mut self,
        now_ns: u64,
        resources: &mut dyn ResourceSource,
        out: &mut Vec<FinishedSpan>,
    ) {
        let clock = self.clock();
        let from = out.len();
        self.plugins
            .evict_idle(now_ns, clock, &mut |t| resources.resource(t), out);
        self.late.expire(now_ns, None, false);
        self.grpc.expire(now_ns);
        out.extend(self.grpc.take_ready());
        self.finalize(out, from);
    }

    fn on_request(
        &mut self,
        key: ConnKey,
        role: Role,
        ctx: ExecCtx,
        peer: Option<SocketAddr>,
        request: Box<Http1Message>,
    ) {
        // A Go client's request is written by its connection's writer goroutine; the uprobe
        // on roundTrip named the goroutine that asked for it.
        let ctx = match role {
            Role::Client => self
                .goroutines
                .take_client_owner(key.tgid, key.fd)
                .unwrap_or(ctx),
            Role::Server => ctx,
        };
        let incoming = request.header("traceparent").and_then(traceparent::parse);
        let link = match role {
            Role::Server => self.client_end_h1(key),
            Role::Client => None,
        };
        let linked = link.is_some();
        let ids = self.ids_for(key, role, ctx, incoming, link);
        let linked = linked || (role == Role::Client && self.relink_server_h1(key, &ids));
        let (_, queue) = self
            .pending
            .entry(key)
            .or_insert_with(|| (role, VecDeque::new()));
        if queue.len() >= MAX_PENDING_PER_CONN
            && let Some(dropped) = queue.pop_front()
        {
            self.counters.pending_dropped += 1;
            if role == Role::Server {
                deactivate(&mut self.active, key.tgid, dropped.ctx, dropped.ids.span_id);
            }
        }
        queue.push_back(Pending {
            ids,
            ctx,
            request,
            peer,
            linked,
            incoming,
        });
    }

    /// The CLIENT request at the other end of a SERVER connection that has no server
    /// request yet: the oldest one not paired.
    fn client_end_h1(&mut self, key: ConnKey) -> Option<SpanIds> {
        let client = self.ends.other_end(key)?;
        let (_, queue) = self.pending.get_mut(&client)?;
        let pending = queue.iter_mut().find(|p| !p.linked)?;
        pending.linked = true;
        self.counters.cross_process_links += 1;
        Some(pending.ids)
    }

    fn client_end_h2(&mut self, key: ConnKey, stream_id: u32) -> Option<SpanIds> {
        let client = self.ends.other_end(key)?;
        let pending = self.pending_h2.get_mut(&(client, stream_id))?;
        if pending.linked {
            return None;
        }
        pending.linked = true;
        self.counters.cross_process_links += 1;
        Some(pending.ids)
    }

    /// The server's read of a request can reach us before the client's write of it (the two
    /// records come from different CPUs): a SERVER span already started as a root moves under
    /// the CLIENT span that now appears.
    fn relink_server_h1(&mut self, key: ConnKey, client: &SpanIds) -> bool {
        let Some(server) = self.ends.other_end(key) else {
            return false;
        };
        let Some((_, queue)) = self.pending.get_mut(&server) else {
            return false;
        };
        let Some(pending) = queue
            .iter_mut()
            .find(|p| may_move_under_client(p.linked, &p.ids))
        else {
            return false;
        };
        pending.linked = true;
        move_under(
            &mut self.active,
            server.tgid,
            pending.ctx,
            &mut pending.ids,
            client,
        );
        self.counters.cross_process_links += 1;
        true
    }

    fn relink_server_h2(&mut self, key: ConnKey, stream_id: u32, client: &SpanIds) -> bool {
        let Some(server) = self.ends.other_end(key) else {
            return false;
        };
        let Some(pending) = self.pending_h2.get_mut(&(server, stream_id)) else {
            return false;
        };
        if !may_move_under_client(pending.linked, &pending.ids) {
            return false;
        }
        pending.linked = true;
        move_under(
            &mut self.active,
            server.tgid,
            pending.ctx,
            &mut pending.ids,
            client,
        );
        self.counters.cross_process_links += 1;
        true
    }

    /// The ids of a new request's span: a SERVER span under the CLIENT span at the other end
    /// of its connection (`link`), else an incoming traceparent; a CLIENT span under the span
    /// its thread serves, else a traceparent. A SERVER span becomes active on its thread.
    fn ids_for(
        &mut self,
        key: ConnKey,
        role: Role,
        ctx: u64,
        incoming: Option<traceparent::TraceParent>,
        link: Option<SpanIds>,
    ) -> SpanIds {
        match role {
            Role::Server => {
                let ids = match (link, incoming) {
                    (Some(client), _) => child_of(&client),
                    (None, Some(tp)) => under_traceparent(&tp),
                    (None, None) => root_ids(),
                };
                if self.active.len() < MAX_ACTIVE_THREADS
                    || self.active.contains_key(&(key.tgid, ctx))
                {
                    self.active.entry((key.tgid, ctx)).or_default().push(ids);
                }
                self.goroutines.request_active(key.tgid, ctx, ids.span_id);
                ids
            }
            Role::Client => {
                let inferred = match self.serving(key.tgid, ctx) {
                    Some(ids) => Some(ids),
                    None => match self.worker_context(key.tgid, ctx, incoming) {
                        Ok(parent) => parent,
                        Err(provisional) => return provisional,
                    },
                };
                if let (Some(parent), Some(tp)) = (inferred, incoming) {
                    self.context.app_context(parent.trace_id, tp);
                }
                match (inferred, incoming) {
                    (Some(parent), _) => child_of(&parent),
                    // The application propagates its own context: our span sits under it.
                    (None, Some(tp)) => under_traceparent(&tp),
                    (None, None) => root_ids(),
                }
            }
        }
    }

    /// The parent of an outbound request made outside any SERVER context by a process that
    /// works for plugin sessions (a plugin runtime, or the daemon answering backwards
    /// invocations): the session its worker named, the only session open, or else (`Err`)
    /// provisional ids resolved when the worker names its session (`late_binding`).
    fn worker_context(
        &mut self,
        tgid: u32,
        ctx: ExecCtx,
        incoming: Option<traceparent::TraceParent>,
    ) -> Result<Option<SpanIds>, SpanIds> {
        if !self.plugins.has_open_work(tgid) {
            return Ok(None);
        }
        if let Some(ids) = self.late.bound(tgid, ctx) {
            return Ok(Some(ids));
        }
        if let Some(ids) = self.plugins.only_server_session(tgid) {
            return Ok(Some(ids));
        }
        let ids = root_ids();
        let (fallback, remote) = match (self.plugins.context_for(tgid), incoming) {
            (Some(latest), _) => (Some(latest), false),
            (None, Some(tp)) => (
                Some(SpanIds {
                    trace_id: tp.trace_id,
                    span_id: tp.span_id,
                    parent_span_id: None,
                    parent_is_remote: true,
                }),
                true,
            ),
            (None, None) => (None, false),
        };
        self.late
            .provisional(tgid, ctx, &ids, fallback.as_ref(), remote);
        Err(ids)
    }

    /// The SERVER span the execution context `ctx` works for: its own, else (goroutines)
    /// that of the nearest goroutine up its spawn chain.
    fn serving(&self, tgid: u32, ctx: ExecCtx) -> Option<SpanIds> {
        self.goroutines
            .lineage(tgid, ctx)
            .into_iter()
            .find_map(|c| self.active.get(&(tgid, c)).and_then(|stack| stack.last()))
            .copied()
    }

    /// A fact from a Go process's uprobes.
    pub fn on_go(&mut self, fact: GoFact) {
        match fact {
            GoFact::Spawn {
                tgid,
                parent,
                child,
            } => self.goroutines.spawned(tgid, parent, child),
            GoFact::ClientStart { tgid, g, fd } => {
                self.goroutines.client_start(tgid, fd, goroutine_ctx(g))
            }
            GoFact::Route { tgid, g, route } => {
                if let Some(ids) = self
                    .active
                    .get(&(tgid, goroutine_ctx(g)))
                    .and_then(|stack| stack.last())
                {
                    self.goroutines.set_route(ids.span_id, route);
                } else {
                    self.goroutines.early_route(tgid, g, route);
                }
            }
            GoFact::HandlerStart {
                tgid,
                g,
                method,
                path,
                ts_ns,
            } => {
                let span_id = self.handler_started(tgid, goroutine_ctx(g), &method, &path);
                self.goroutines.handler_started(tgid, g, span_id, ts_ns);
            }
            GoFact::HandlerEnd { tgid, g, ts_ns } => self.goroutines.handler_ended(tgid, g, ts_ns),
            GoFact::Grpc(fact) => self.on_grpc(fact),
        }
    }

    /// nginx set up upstream connection `upstream_fd` for the request that came in on
    /// `downstream_fd`: that request's span is the parent of the next request written there.
    pub fn nginx_upstream(&mut self, tgid: u32, downstream_fd: i32, upstream_fd: i32) {
        self.goroutines
            .client_start(tgid, upstream_fd, fd_ctx(downstream_fd));
    }

    /// A Go handler starts on `ctx`. Normally its request was read by the same goroutine and
    /// is active there already; if another goroutine read the request's last byte, the
    /// oldest unanswered request of the process with this method and path moves to `ctx`.
    /// Returns the span id of the request the handler serves.
    fn handler_started(
        &mut self,
        tgid: u32,
        ctx: ExecCtx,
        method: &str,
        path: &str,
    ) -> Option<[u8; 8]> {
        if let Some(ids) = self.active.get(&(tgid, ctx)).and_then(|s| s.last()) {
            self.goroutines.counters.handler_starts += 1;
            return Some(ids.span_id);
        }
        let candidate = self
            .pending
            .iter_mut()
            .filter(|(k, (role, _))| k.tgid == tgid && *role == Role::Server)
            .filter_map(|(_, (_, queue))| queue.front_mut())
            .filter(|p| p.ctx != ctx && goroutine_of(p.ctx).is_some())
            .filter(|p| {
                let (m, full) = http_attrs::method_and_path(&p.request);
                m == method && full == path
            })
            .min_by_key(|p| p.request.first.exit_ns);
        let pending = candidate?;
        let old = pending.ctx;
        pending.ctx = ctx;
        let ids = pending.ids;
        deactivate(&mut self.active, tgid, old, ids.span_id);
        self.active.entry((tgid, ctx)).or_default().push(ids);
        self.goroutines.counters.handler_rebound += 1;
        Some(ids.span_id)
    }

    /// The span of an ended HTTP/2 stream.
    fn finish_h2(
        &mut self,
        key: ConnKey,
        role: Role,
        peer: Option<SocketAddr>,
        stream: &Http2Stream,
        resources: &mut dyn ResourceSource,
    ) -> FinishedSpan {
        let kind = match role {
            Role::Server => SpanKind::Server,
            Role::Client => SpanKind::Client,
        };
        let (ids, incoming) = match self.pending_h2.remove(&(key, stream.stream_id)) {
            Some(p) => {
                if role == Role::Server {
                    deactivate(&mut self.active, key.tgid, p.ctx, p.ids.span_id);
                }
                (p.ids, p.incoming)
            }
            // Its request headers were never decoded (the stream began before we looked).
            None => (root_ids(), None),
        };
        let request_first = stream.request.first.unwrap_or(stream.started);
        let start_ns = match role {
            Role::Server => request_first.exit_ns,
            Role::Client => request_first.enter_ns,
        };
        let end_ns =
            response_end_ns(role, &stream.response.end.unwrap_or(stream.ended)).max(start_ns);
        let (mut attributes, status) = h2_attrs::attributes(kind, stream, peer);
        self.mark_tls(key, &mut attributes);
        let clock = self.clock();
        self.counters.spans += 1;
        FinishedSpan {
            trace_id: ids.trace_id,
            span_id: ids.span_id,
            parent_span_id: ids.parent_span_id,
            parent_is_remote: ids.parent_is_remote,
            kind,
            name: h2_attrs::span_name(stream),
            start: clock.to_system_time(start_ns),
            end: clock.to_system_time(end_ns),
            attributes,
            links: traceparent_link(&ids, incoming),
            status,
            resource: resources.resource(key.tgid),
        }
    }

    fn on_response(
        &mut self,
        key: ConnKey,
        response: Box<Http1Message>,
        resources: &mut dyn ResourceSource,
        out: &mut Vec<FinishedSpan>,
    ) {
        let Some((role, queue)) = self.pending.get_mut(&key) else {
            self.counters.unmatched_responses += 1;
            return;
        };
        let role = *role;
        let Some(pending) = queue.pop_front() else {
            self.counters.unmatched_responses += 1;
            return;
        };
        if queue.is_empty() {
            self.pending.remove(&key);
        }
        let end_ns = response_end_ns(role, &response.last);
        out.push(self.finish(
            key,
            role,
            pending,
            Outcome::Response(&response),
            end_ns,
            resources,
        ));
    }

    fn on_closed(
        &mut self,
        key: ConnKey,
        ts_ns: u64,
        outcome: Outcome<'static>,
        resources: &mut dyn ResourceSource,
        out: &mut Vec<FinishedSpan>,
    ) {
        let Some((role, queue)) = self.pending.remove(&key) else {
            return;
        };
        for pending in queue {
            self.counters.no_response += 1;
            out.push(self.finish(key, role, pending, outcome, ts_ns, resources));
        }
    }

    fn finish(
        &mut self,
        key: ConnKey,
        role: Role,
        pending: Pending,
        outcome: Outcome<'_>,
        end_ns: u64,
        resources: &mut dyn ResourceSource,
    ) -> FinishedSpan {
        let kind = match role {
            Role::Server => SpanKind::Server,
            Role::Client => SpanKind::Client,
        };
        if role == Role::Server {
            deactivate(&mut self.active, key.tgid, pending.ctx, pending.ids.span_id);
        }
        // A server's request starts when it is received; a client's when it starts sending.
        let start_ns = match role {
            Role::Server => pending.request.first.exit_ns,
            Role::Client => pending.request.first.enter_ns,
        };
        let end_ns = end_ns.max(start_ns);
        let (mut attributes, mut status) =
            http_attrs::attributes(kind, &pending.request, outcome, pending.peer);
        let mut name = http_attrs::span_name(&pending.request);
        if role == Role::Server
            && let Some(route) = self.goroutines.take_route(&pending.ids.span_id)
        {
            let (method, _) = http_attrs::method_and_path(&pending.request);
            name = format!("{method} {route}");
            attributes.push(("http.route".into(), AttrValue::Str(route)));
        }
        if role == Role::Server
            && let Some(ns) = self.goroutines.take_handler_duration(&pending.ids.span_id)
        {
            attributes.push((
                "difytrace.handler.duration_ns".into(),
                AttrValue::Int(i64::try_from(ns).unwrap_or(i64::MAX)),
            ));
        }
        self.mark_tls(key, &mut attributes);
        let genai = genai::http::http_span(kind, &pending.request, outcome.response(), start_ns);
        attributes.extend(genai.attrs);
        if let Some(n) = genai.name {
            name = n;
        }
        if let Some((error_type, message)) = genai.error {
            attributes.retain(|(k, _)| k != "error.type");
            attributes.push(("error.type".into(), AttrValue::Str(error_type)));
            status = SpanStatus::Error(message);
        }
        self.context
            .body(pending.ids.trace_id, &pending.request.body_prefix);
        if let Some(response) = outcome.response() {
            self.context
                .body(pending.ids.trace_id, &response.body_prefix);
        }
        let clock = self.clock();
        self.counters.spans += 1;
        FinishedSpan {
            trace_id: pending.ids.trace_id,
            span_id: pending.ids.span_id,
            parent_span_id: pending.ids.parent_span_id,
            parent_is_remote: pending.ids.parent_is_remote,
            kind,
            name,
            start: clock.to_system_time(start_ns),
            end: clock.to_system_time(end_ns),
            attributes,
            links: traceparent_link(&pending.ids, pending.incoming),
            status,
            resource: resources.resource(key.tgid),
        }
    }

    /// `tls=true` (and `url.scheme=https` where a scheme was set) on a span of a connection
    /// whose plaintext came from the TLS uprobes.
    fn mark_tls(&self, key: ConnKey, attributes: &mut Vec<(String, AttrValue)>) {
        if !self.tls_conns.contains(&key) {
            return;
        }
        for (k, v) in attributes.iter_mut() {
            if k == "url.scheme" {
                *v = AttrValue::Str("https".into());
            }
        }
        attributes.push(("tls".into(), AttrValue::Bool(true)));
    }

    /// Drops what belongs to an exited process that no Closed event covered.
    pub fn forget_process(&mut self, tgid: u32) {
        self.tls_conns.retain(|k| k.tgid != tgid);
        self.active.retain(|(t, _), _| *t != tgid);
        self.pending.retain(|k, _| k.tgid != tgid);
        self.pending_h2.retain(|(k, _), _| k.tgid != tgid);
        self.ends.forget_process(tgid);
        self.goroutines.forget_process(tgid);
        self.grpc.forget_process(tgid);
    }
}

/// When a response ends for the span of `role`: a client has it once its read returns; a
/// server has handed its last bytes over once its write starts. The write's return can come
/// after the client's read returned (the kernel side runs in between), and a SERVER span must
/// not outlast the CLIENT span that contains it.
fn response_end_ns(role: Role, last: &ChunkTs) -> u64 {
    match role {
        Role::Server => last.enter_ns,
        Role::Client => last.exit_ns,
    }
}

/// A request's own traceparent that did not become its span's parent (our inferred parent
/// won, or it is the context a client propagates): kept as a span link.
fn traceparent_link(ids: &SpanIds, incoming: Option<traceparent::TraceParent>) -> Vec<SpanLink> {
    match incoming {
        Some(tp) if ids.parent_span_id != Some(tp.span_id) => vec![SpanLink {
            trace_id: tp.trace_id,
            span_id: tp.span_id,
            attributes: vec![("link.reason".into(), AttrValue::Str("traceparent".into()))],
        }],
        _ => Vec::new(),
    }
}

fn deactivate(
    active: &mut HashMap<(u32, ExecCtx), Vec<SpanIds>>,
    tgid: u32,
    ctx: u64,
    span_id: [u8; 8],
) {
    if let Some(stack) = active.get_mut(&(tgid, ctx)) {
        stack.retain(|ids| ids.span_id != span_id);
        if stack.is_empty() {
            active.remove(&(tgid, ctx));
        }
    }
}

/// Whether a SERVER span started before its CLIENT end appeared may move under it: not paired
/// yet, and a root or under a traceparent (the connection's other end wins over a header).
fn may_move_under_client(linked: bool, ids: &SpanIds) -> bool {
    !linked && (ids.parent_span_id.is_none() || ids.parent_is_remote)
}

/// `ids` moved under `parent`, keeping its span id.
fn reparented(ids: SpanIds, parent: &SpanIds) -> SpanIds {
    SpanIds {
        trace_id: parent.trace_id,
        span_id: ids.span_id,
        parent_span_id: Some(parent.span_id),
        parent_is_remote: false,
    }
}

/// Moves the span `ids`, active on `ctx` of `tgid`, under `parent`, keeping its span id.
fn move_under(
    active: &mut HashMap<(u32, ExecCtx), Vec<SpanIds>>,
    tgid: u32,
    ctx: ExecCtx,
    ids: &mut SpanIds,
    parent: &SpanIds,
) {
    let old = *ids;
    *ids = reparented(old, parent);
    reactivate(active, tgid, ctx, old.span_id, *ids);
}

/// Replaces the active entry of span `span_id` on a thread by `ids`.
fn reactivate(
    active: &mut HashMap<(u32, ExecCtx), Vec<SpanIds>>,
    tgid: u32,
    ctx: u64,
    span_id: [u8; 8],
    ids: SpanIds,
) {
    if let Some(stack) = active.get_mut(&(tgid, ctx)) {
        for entry in stack.iter_mut().filter(|e| e.span_id == span_id) {
            *entry = ids;
        }
    }
}

pub(super) fn root_ids() -> SpanIds {
    let mut trace_id = [0u8; 16];
    while trace_id == [0; 16] {
        rand::rng().fill(&mut trace_id);
    }
    SpanIds {
        trace_id,
        span_id: new_span_id(),
        parent_span_id: None,
        parent_is_remote: false,
    }
}

/// New ids for a child of `parent`.
pub(super) fn child_of(parent: &SpanIds) -> SpanIds {
    SpanIds {
        trace_id: parent.trace_id,
        span_id: new_span_id(),
        parent_span_id: Some(parent.span_id),
        parent_is_remote: false,
    }
}

/// New ids for a child of a remote context.
fn under_traceparent(tp: &traceparent::TraceParent) -> SpanIds {
    SpanIds {
        trace_id: tp.trace_id,
        span_id: new_span_id(),
        parent_span_id: Some(tp.span_id),
        parent_is_remote: true,
    }
}

pub(super) fn new_span_id() -> [u8; 8] {
    let mut id = [0u8; 8];
    while id == [0; 8] {
        rand::rng().fill(&mut id);
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        protocol::http1::ChunkTs,
        span::model::{AttrValue, SpanStatus},
        stream::{ConnTable, Source},
    };

    struct Fixed;
    impl ResourceSource for Fixed {
        fn resource(&mut self, tgid: u32) -> Arc<ProcessResource> {
            Arc::new(ProcessResource {
                service_name: "app".into(),
                pid: tgid,
                executable_name: "python3".into(),
                host_name: "h".into(),
                container: None,
            })
        }
    }

    struct World {
        conns: ConnTable,
        builder: SpanBuilder,
        spans: Vec<FinishedSpan>,
        now: u64,
        seqs: HashMap<ConnKey, u32>,
    }

    impl World {
        fn new() -> Self {
            Self {
                conns: ConnTable::new(),
                builder: SpanBuilder::new(Clock::now()),
                spans: Vec::new(),
                now: 1_000,
                seqs: HashMap::default(),
            }
        }
        /// A record the kernel numbered but never delivered.
        fn drop_record(&mut self, key: ConnKey) {
            *self.seqs.entry(key).or_default() += 1;
        }
        fn pump(&mut self, events: Vec<StreamEvent>) {
            for e in events {
                self.builder.on_event(e, &mut Fixed, &mut self.spans);
            }
        }
        fn open(&mut self, key: ConnKey, role: Role) {
            let mut out = Vec::new();
            self.conns.open(
                key,
                Some(role),
                Some("127.0.0.1:9000".parse().unwrap()),
                self.now,
                &mut out,
            );
            self.pump(out);
        }
        fn io(&mut self, key: ConnKey, ctx: u64, ingress: bool, bytes: &[u8]) {
            self.io_from(Source::Socket, key, ctx, ingress, bytes);
        }
        /// Plaintext from the TLS uprobes (numbered with the socket's records).
        fn io_tls(&mut self, key: ConnKey, ctx: u64, ingress: bool, bytes: &[u8]) {
            self.io_from(Source::TlsPlaintext, key, ctx, ingress, bytes);
        }
        fn io_from(&mut self, source: Source, key: ConnKey, ctx: u64, ingress: bool, bytes: &[u8]) {
            self.now += 1_000;
            let ts = ChunkTs {
                enter_ns: self.now,
                exit_ns: self.now + 10,
            };
            let mut out = Vec::new();
            let seq = self.seqs.entry(key).or_default();
            let this = *seq;
            *seq += 1;
            self.conns.data(
                source,
                key,
                ctx,
                ingress,
                bytes,
                bytes.len() as u64,
                this,
                ts,
                &mut out,
            );
            self.pump(out);
        }
        fn close(&mut self, key: ConnKey) {
            self.now += 1_000;
            let mut out = Vec::new();
            self.conns.close(key, self.now, &mut out);
            self.pump(out);
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

    /// A client process (tgid 20) calling a server process (tgid 30) on this host; both
    /// ends know both addresses. `server_first`: the server's read of the request reaches
    /// the builder before the client's write of it.
    fn two_processes(server_first: bool) -> Vec<FinishedSpan> {
        two_processes_with(server_first, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    }

    fn two_processes_with(server_first: bool, request: &[u8]) -> Vec<FinishedSpan> {
        let client_end = ConnKey {
            tgid: 20,
            fd: 7,
            conn_id: 3,
        };
        let server_end = ConnKey {
            tgid: 30,
            fd: 8,
            conn_id: 4,
        };
        let c: SocketAddr = "127.0.0.1:41000".parse().unwrap();
        let s: SocketAddr = "127.0.0.1:8000".parse().unwrap();
        let mut w = World::new();
        let mut out = Vec::new();
        w.conns
            .open(client_end, Some(Role::Client), Some(s), w.now, &mut out);
        w.conns.set_local(client_end, Some(c));
        w.conns
            .open(server_end, Some(Role::Server), Some(c), w.now, &mut out);
        w.conns.set_local(server_end, Some(s));
        w.pump(out);
        if server_first {
            w.io(server_end, 31, true, request);
            w.io(client_end, 21, false, request);
        } else {
            w.io(client_end, 21, false, request);
            w.io(server_end, 31, true, request);
        }
        let response: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        w.io(server_end, 31, false, response);
        w.io(client_end, 21, true, response);
        assert_eq!(w.builder.counters.cross_process_links, 1);
        w.spans
    }

    #[test]
    fn server_span_is_the_child_of_the_client_span_at_the_other_end() {
        for server_first in [false, true] {
            let spans = two_processes(server_first);
            let server = spans.iter().find(|s| s.kind == SpanKind::Server).unwrap();
            let client = spans.iter().find(|s| s.kind == SpanKind::Client).unwrap();
            assert_eq!(
                server.trace_id, client.trace_id,
                "server_first={server_first}"
            );
            assert_eq!(server.parent_span_id, Some(client.span_id));
            assert_eq!(client.parent_span_id, None);
        }
    }

    /// The plugin daemon sends a fresh traceparent on every call: where the connection's
    /// other end is traced, that CLIENT span stays the parent (whichever end is seen first)
    /// and the header becomes a link.
    #[test]
    fn inferred_parent_wins_over_traceparent_which_becomes_a_link() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let request = format!(
            "POST /inner/api/invoke/tool HTTP/1.1\r\nHost: a\r\ntraceparent: {tp}\r\nContent-Length: 0\r\n\r\n"
        );
        for server_first in [false, true] {
            let spans = two_processes_with(server_first, request.as_bytes());
            let server = spans.iter().find(|s| s.kind == SpanKind::Server).unwrap();
            let client = spans.iter().find(|s| s.kind == SpanKind::Client).unwrap();
            assert_eq!(
                server.parent_span_id,
                Some(client.span_id),
                "server_first={server_first}"
            );
            assert!(!server.parent_is_remote);
            assert_eq!(server.trace_id, client.trace_id);
            assert_eq!(server.links.len(), 1, "server_first={server_first}");
            assert_eq!(
                crate::span::model::hex(&server.links[0].span_id),
                "00f067aa0ba902b7"
            );
        }
    }

    /// Two concurrent Go requests: each handler goroutine spawns a worker that calls out;
    /// the calls are written by the client connections' writer goroutines on whatever
    /// thread. The roundTrip and spawn facts put each call under its own request.
    #[test]
    fn go_calls_follow_goroutines_not_threads() {
        let g = goroutine_ctx;
        let mut w = World::new();
        let servers = [
            ConnKey {
                tgid: 10,
                fd: 5,
                conn_id: 1,
            },
            ConnKey {
                tgid: 10,
                fd: 8,
                conn_id: 3,
            },
        ];
        let clients = [
            ConnKey {
                tgid: 10,
                fd: 6,
                conn_id: 2,
            },
            ConnKey {
                tgid: 10,
                fd: 9,
                conn_id: 4,
            },
        ];
        for k in servers {
            w.open(k, Role::Server);
        }
        for k in clients {
            w.open(k, Role::Client);
        }
        // Handler goroutines 0x100 / 0x200 read their requests; a background reader
        // (0x900) took the first byte of the second one.
        w.io(
            servers[0],
            g(0x100),
            true,
            b"POST /plugin/a/dispatch/tool/invoke HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        );
        w.io(servers[1], g(0x900), true, b"P");
        w.io(
            servers[1],
            g(0x200),
            true,
            b"OST /plugin/b/dispatch/tool/invoke HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        );
        for (i, handler) in [0x100u64, 0x200].into_iter().enumerate() {
            w.builder.on_go(GoFact::HandlerStart {
                tgid: 10,
                g: handler,
                method: "POST".into(),
                path: format!("/plugin/{}/dispatch/tool/invoke", ["a", "b"][i]),
                ts_ns: 5_000,
            });
            w.builder.on_go(GoFact::HandlerEnd {
                tgid: 10,
                g: handler,
                ts_ns: 7_500,
            });
            w.builder.on_go(GoFact::Route {
                tgid: 10,
                g: handler,
                route: "/plugin/:tenant_id/dispatch/tool/invoke".into(),
            });
            w.builder.on_go(GoFact::Spawn {
                tgid: 10,
                parent: handler,
                child: handler + 1,
            });
        }
        // The second worker asks first, on the first connection; both requests are written
        // by one writer goroutine (0x777), which must not matter.
        w.builder.on_go(GoFact::ClientStart {
            tgid: 10,
            g: 0x201,
            fd: clients[0].fd,
        });
        w.io(
            clients[0],
            g(0x777),
            false,
            b"GET /tool/b HTTP/1.1\r\nHost: t\r\n\r\n",
        );
        w.builder.on_go(GoFact::ClientStart {
            tgid: 10,
            g: 0x101,
            fd: clients[1].fd,
        });
        w.io(
            clients[1],
            g(0x777),
            false,
            b"GET /tool/a HTTP/1.1\r\nHost: t\r\n\r\n",
        );
        for k in clients {
            w.io(
                k,
                g(0x778),
                true,
                b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            );
        }
        for k in servers {
            w.io(
                k,
                g(0x100),
                false,
                b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            );
        }
        let by_path = |p: &str| {
            w.spans
                .iter()
                .find(|s| {
                    s.attributes
                        .iter()
                        .any(|(k, v)| k == "url.path" && *v == AttrValue::Str(p.into()))
                })
                .unwrap_or_else(|| panic!("no span for {p}"))
        };
        for t in ["a", "b"] {
            let server = by_path(&format!("/plugin/{t}/dispatch/tool/invoke"));
            let client = by_path(&format!("/tool/{t}"));
            assert_eq!(client.parent_span_id, Some(server.span_id), "tenant {t}");
            assert_eq!(client.trace_id, server.trace_id);
            // Dispatch routes are named by kind and action; the Go route stays in http.route.
            assert_eq!(server.name, "dispatch tool/invoke");
            assert_eq!(
                server.attr("difytrace.handler.duration_ns"),
                Some(&AttrValue::Int(2_500))
            );
            assert!(server.attributes.iter().any(|(k, v)| k == "http.route"
                && *v == AttrValue::Str("/plugin/:tenant_id/dispatch/tool/invoke".into())));
        }
        assert_eq!(w.builder.goroutines.counters.client_owned, 2);
        assert_eq!(w.builder.goroutines.counters.handler_starts, 2);
    }

    /// gin's route is reported at the handler goroutine's next data syscall, which may be
    /// the read of the request body's last bytes: the route comes before the request is
    /// complete (active) on the goroutine and still lands on its span; a route left by an
    /// earlier handler on the goroutine does not.
    #[test]
    fn go_route_reported_before_the_request_is_complete() {
        let g = goroutine_ctx;
        let mut w = World::new();
        w.open(SERVER, Role::Server);
        // A stale route of an earlier handler on the goroutine, then the new handler.
        w.builder.on_go(GoFact::Route {
            tgid: 10,
            g: 0x100,
            route: "/stale".into(),
        });
        w.io(
            SERVER,
            g(0x100),
            true,
            b"POST /plugin/t/dispatch/tool/invoke HTTP/1.1\r\nContent-Length: 4\r\n\r\nab",
        );
        w.builder.on_go(GoFact::HandlerStart {
            tgid: 10,
            g: 0x100,
            method: "POST".into(),
            path: "/plugin/t/dispatch/tool/invoke".into(),
            ts_ns: 5_000,
        });
        w.builder.on_go(GoFact::Route {
            tgid: 10,
            g: 0x100,
            route: "/plugin/:tenant_id/dispatch/tool/invoke".into(),
        });
        w.io(SERVER, g(0x100), true, b"cd");
        w.io(
            SERVER,
            g(0x100),
            false,
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        );
        let server = w
            .spans
            .iter()
            .find(|s| s.kind == SpanKind::Server)
            .expect("server span");
        assert_eq!(
            server.attr("http.route"),
            Some(&AttrValue::Str(
                "/plugin/:tenant_id/dispatch/tool/invoke".into()
            ))
        );
    }

    /// A request read entirely by another goroutine than the one whose handler serves it
    /// moves to the handler's goroutine when the handler starts.
    #[test]
    fn go_handler_start_moves_a_request_read_elsewhere() {
        let g = goroutine_ctx;
        let mut w = World::new();
        w.open(SERVER, Role::Server);
        w.open(CLIENT, Role::Client);
        w.io(SERVER, g(0x900), true, b"GET /a?x=1 HTTP/1.1\r\n\r\n");
        // A different path does not match; the right one does.
        w.builder.on_go(GoFact::HandlerStart {
            tgid: 10,
            g: 0x200,
            method: "GET".into(),
            path: "/b".into(),
            ts_ns: 1,
        });
        assert_eq!(w.builder.goroutines.counters.handler_rebound, 0);
        w.builder.on_go(GoFact::HandlerStart {
            tgid: 10,
            g: 0x200,
            method: "GET".into(),
            path: "/a".into(),
            ts_ns: 1,
        });
        assert_eq!(w.builder.goroutines.counters.handler_rebound, 1);
        w.builder.on_go(GoFact::ClientStart {
            tgid: 10,
            g: 0x200,
            fd: CLIENT.fd,
        });
        w.io(CLIENT, g(0x777), false, b"GET /down HTTP/1.1\r\n\r\n");
        w.io(
            CLIENT,
            g(0x778),
            true,
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        );
        w.io(
            SERVER,
            g(0x200),
            false,
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        );
        let server = w.spans.iter().find(|s| s.kind == SpanKind::Server).unwrap();
        let client = w.spans.iter().find(|s| s.kind == SpanKind::Client).unwrap();
        assert_eq!(client.parent_span_id, Some(server.span_id));
        assert_eq!(w.builder.active_len(), 0);
    }

    #[test]
    fn client_call_inside_a_server_request_is_its_child() {
        let mut w = World::new();
        w.open(SERVER, Role::Server);
        w.io(
            SERVER,
            11,
            true,
            b"GET /chain?x=secret HTTP/1.1\r\nHost: a:8000\r\nAuthorization: Bearer s3cret\r\n\r\n",
        );
        w.open(CLIENT, Role::Client);
        w.io(
            CLIENT,
            11,
            false,
            b"GET /down HTTP/1.1\r\nHost: b:9000\r\n\r\n",
        );
        w.io(
            CLIENT,
            11,
            true,
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        );
        w.close(CLIENT);
        w.io(
            SERVER,
            11,
            false,
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        );
        w.close(SERVER);
        assert_eq!(w.spans.len(), 2);
        let client = &w.spans[0];
        let server = &w.spans[1];
        assert_eq!(client.kind, SpanKind::Client);
        assert_eq!(server.kind, SpanKind::Server);
        assert_eq!(server.name, "GET /chain");
        assert_eq!(client.trace_id, server.trace_id);
        assert_eq!(client.parent_span_id, Some(server.span_id));
        assert_eq!(server.parent_span_id, None);
        assert!(client.start >= server.start && client.end <= server.end);
        assert_eq!(
            server.attr("http.response.status_code"),
            Some(&AttrValue::Int(200))
        );
        assert_eq!(
            server.attr("url.path"),
            Some(&AttrValue::Str("/chain".into()))
        );
        assert_eq!(client.attr("server.port"), Some(&AttrValue::Int(9000)));
        let all = format!("{:?}", w.spans);
        assert!(
            !all.contains("s3cret") && !all.contains("secret"),
            "a secret leaked: {all}"
        );
        assert_eq!(w.builder.active_len(), 0);
        assert_eq!(w.builder.pending_len(), 0);
    }

    #[test]
    fn other_threads_do_not_inherit_and_traceparent_is_honored() {
        let mut w = World::new();
        w.open(SERVER, Role::Server);
        w.io(SERVER, 11, true, b"GET /a HTTP/1.1\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\r\n");
        w.open(CLIENT, Role::Client);
        w.io(CLIENT, 12, false, b"GET /b HTTP/1.1\r\n\r\n");
        w.io(
            CLIENT,
            12,
            true,
            b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n",
        );
        w.io(SERVER, 11, false, b"HTTP/1.1 204 No Content\r\n\r\n");
        let (client, server) = (&w.spans[0], &w.spans[1]);
        assert_ne!(client.trace_id, server.trace_id);
        assert_eq!(client.parent_span_id, None);
        assert_eq!(client.status, SpanStatus::Error("500".into()));
        assert_eq!(server.trace_id[0], 0x4b);
        assert_eq!(
            server.parent_span_id,
            Some([0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7])
        );
        assert!(server.parent_is_remote);
    }

    #[test]
    fn keep_alive_pairs_in_order_and_close_ends_the_unanswered() {
        let mut w = World::new();
        w.open(SERVER, Role::Server);
        w.io(
            SERVER,
            11,
            true,
            b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n",
        );
        w.io(
            SERVER,
            11,
            false,
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na",
        );
        w.close(SERVER);
        assert_eq!(w.spans.len(), 2);
        assert_eq!(w.spans[0].name, "GET /1");
        assert_eq!(w.spans[0].status, SpanStatus::Unset);
        assert_eq!(w.spans[1].name, "GET /2");
        assert!(matches!(w.spans[1].status, SpanStatus::Error(_)));
        assert_eq!(w.builder.counters.no_response, 1);
    }

    #[test]
    fn lost_records_end_waiting_requests_and_do_not_shift_pairs() {
        let mut w = World::new();
        w.open(SERVER, Role::Server);
        w.io(SERVER, 11, true, b"GET /1 HTTP/1.1\r\n\r\n");
        // The response to /1 is lost in the ring buffer.
        w.drop_record(SERVER);
        w.io(SERVER, 11, true, b"GET /2 HTTP/1.1\r\n\r\n");
        w.io(
            SERVER,
            11,
            false,
            b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n",
        );
        w.io(SERVER, 11, true, b"GET /3 HTTP/1.1\r\n\r\n");
        w.io(
            SERVER,
            11,
            false,
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        );
        assert_eq!(w.conns.counters.lost_records, 1);
        let names: Vec<_> = w.spans.iter().map(|s| s.name.as_str()).collect();
        // /1 ends as lost; /2 arrived right after the hole and is not trusted; the 202 is
        // not wrongly given to /1; /3 pairs normally.
        assert_eq!(names, ["GET /1", "GET /3"], "{:?}", w.spans);
        assert_eq!(
            w.spans[0].attr("error.type"),
            Some(&AttrValue::Str("capture_lost".into()))
        );
        assert_eq!(
            w.spans[1].attr("http.response.status_code"),
            Some(&AttrValue::Int(200))
        );
        assert_eq!(w.builder.active_len(), 0);
    }

    #[test]
    fn unknown_role_is_inferred_from_the_first_bytes() {
        let mut w = World::new();
        let key = ConnKey {
            tgid: 10,
            fd: 7,
            conn_id: 9,
        };
        w.io(
            key,
            11,
            true,
            b"POST /x HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
        );
        w.io(
            key,
            11,
            false,
            b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
        );
        assert_eq!(w.spans.len(), 1);
        assert_eq!(w.spans[0].kind, SpanKind::Server);
        assert_eq!(
            w.spans[0].attr("http.request.body.size"),
            Some(&AttrValue::Int(3))
        );
    }

    /// A TLS connection: the handshake's records (socket bytes) make nothing and count no
    /// parse error; the plaintext from the uprobes makes one span with `tls=true` and the
    /// https scheme; a later ciphertext record (e.g. close_notify) is dropped too.
    #[test]
    fn tls_plaintext_makes_the_span_and_ciphertext_nothing() {
        let mut w = World::new();
        let key = ConnKey {
            tgid: 10,
            fd: 7,
            conn_id: 9,
        };
        w.open(key, Role::Client);
        // ClientHello record header (and a few bytes of it), then the server's answer.
        w.io(
            key,
            11,
            false,
            b"\x16\x03\x01\x00\xf4\x01\x00\x00\xf0\x03\x03",
        );
        w.io(
            key,
            11,
            true,
            b"\x16\x03\x03\x00\x7a\x02\x00\x00\x76\x03\x03",
        );
        w.io_tls(
            key,
            11,
            false,
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: api\r\nContent-Length: 2\r\n\r\n{}",
        );
        w.io_tls(
            key,
            11,
            true,
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        );
        w.io(key, 11, true, b"\x15\x03\x03\x00\x1a\x00\x00");
        w.close(key);
        assert_eq!(w.spans.len(), 1, "{:?}", w.spans);
        let span = &w.spans[0];
        assert_eq!(span.kind, SpanKind::Client);
        assert_eq!(span.attr("tls"), Some(&AttrValue::Bool(true)));
        assert_eq!(
            span.attr("url.scheme"),
            Some(&AttrValue::Str("https".into()))
        );
        assert_eq!(
            span.attr("http.response.body.size"),
            Some(&AttrValue::Int(5))
        );
        assert_eq!(w.conns.counters.parse_errors, 0);
        assert_eq!(w.conns.counters.tls_ciphertext_chunks, 3);
        assert_eq!(w.conns.counters.tls_conns, 1);
    }

    /// A plain connection is not marked.
    #[test]
    fn plain_connections_have_no_tls_attribute() {
        let mut w = World::new();
        let key = ConnKey {
            tgid: 10,
            fd: 8,
            conn_id: 1,
        };
        w.open(key, Role::Client);
        w.io(key, 11, false, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        w.io(
            key,
            11,
            true,
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        );
        assert_eq!(w.spans.len(), 1);
        assert_eq!(w.spans[0].attr("tls"), None);
    }
}
