//! Plugin invocations over stdio as spans.
//!
//! The daemon writes a request line with a session id to a plugin's stdin; the plugin answers
//! on its stdout with session events until `end`. Each side gets a span for the session: CLIENT
//! in the process that wrote the request (the daemon), SERVER in the one that read it (the
//! plugin), the SERVER a child of the CLIENT. A backwards invocation (the plugin asking the
//! daemon to call Dify) is a CLIENT span of the plugin under its invocation.
//!
//! Only the session id correlates lines, and both ends see the same line (one writes it, the
//! other reads it): which end a line belongs to follows from the direction the process moved
//! it in, so no pipe needs to be paired with its other end.

use std::{collections::HashMap, sync::Arc};

use super::{
    builder::{SpanIds, child_of, root_ids},
    clock::Clock,
    model::{AttrValue, FinishedSpan, ProcessResource, SpanKind, SpanStatus},
};
use crate::protocol::stdio::{BackwardsEvent, ChunkFacts, Kind, Request, SessionEvent, StdioLine};

/// Open invocations (both sides) tracked at once.
pub const MAX_OPEN_INVOCATIONS: usize = 65536;
/// Open backwards invocations tracked at once.
pub const MAX_OPEN_BACKWARDS: usize = 16384;
/// An invocation with no line for this long is ended as abandoned.
pub const INVOCATION_IDLE_NS: u64 = 30 * 60 * 1_000_000_000;

#[derive(Debug, Default, Clone, Copy)]
pub struct PluginCounters {
    pub invocations: u64,
    /// Session events whose session was not open in that process (started before the agent).
    pub orphan_events: u64,
    /// Invocations ended because their process exited (or the other side's did).
    pub ended_by_exit: u64,
    pub dropped_full: u64,
    pub abandoned: u64,
    /// Plugin-side invocations started from the daemon's request because the plugin's read
    /// of it was not captured.
    pub adopted: u64,
    pub heartbeats: u64,
    pub logs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// Wrote the request: the daemon.
    Client,
    /// Read the request: the plugin.
    Server,
}

struct Invocation {
    ids: SpanIds,
    side: Side,
    session_id: String,
    request: Request,
    start_ns: u64,
    last_ns: u64,
    chunks: u64,
    response_bytes: u64,
    request_bytes: u64,
    error: Option<(Option<String>, Option<String>)>,
    partial: bool,
    /// The process on the other end, once its side of the same session was seen.
    peer_tgid: Option<u32>,
    /// Inode of the pipe the request line crossed (both ends share it); 0 when unknown.
    pipe_inode: u64,
    /// Model facts of the stream chunks, last value wins (usage is in the last chunk).
    model_facts: ChunkFacts,
}

struct Backwards {
    ids: SpanIds,
    session_id: String,
    request_id: String,
    invoke_type: Option<String>,
    start_ns: u64,
    responses: u64,
    /// When the last answer arrived (the SDK stops reading after the answers it needs, so
    /// the daemon's `end` may never be read when the session ends first).
    last_response_ns: u64,
}

/// Why a span ends without its `end` event.
#[derive(Debug, Clone, Copy)]
enum Abort {
    ProcessExited,
    PeerExited,
    Idle,
}

impl Abort {
    fn message(self) -> &'static str {
        match self {
            Abort::ProcessExited => "process exited before the session ended",
            Abort::PeerExited => "plugin process exited before the session ended",
            Abort::Idle => "no end of session seen",
        }
    }
}

#[derive(Default)]
pub struct PluginSessions {
    /// (tgid, session id) -> open invocation of that process.
    open: HashMap<(u32, String), Invocation>,
    /// (tgid, backwards request id) -> open backwards invocation of that plugin process.
    backwards: HashMap<(u32, String), Backwards>,
    pub counters: PluginCounters,
}

impl PluginSessions {
    pub fn open_len(&self) -> usize {
        self.open.len() + self.backwards.len()
    }

    /// The invocation a request made by `tgid` outside any thread context belongs to: the
    /// latest open SERVER invocation of that plugin process. Plugin runtimes run each session
    /// on a green thread of one OS thread, so a thread cannot tell sessions apart; with one
    /// session at a time (the common case) this is exact.
    pub fn context_for(&self, tgid: u32) -> Option<SpanIds> {
        self.open
            .iter()
            .filter(|((t, _), inv)| *t == tgid && inv.side == Side::Server)
            .max_by_key(|(_, inv)| inv.start_ns)
            .map(|(_, inv)| inv.ids)
    }

    /// Whether `tgid` has sessions open on either side, or backwards invocations it answers:
    /// its outbound requests may then be work for one of them.
    pub fn has_open_work(&self, tgid: u32) -> bool {
        self.open.keys().any(|(t, _)| *t == tgid)
    }

    /// The plugin-side span of the only session open in plugin process `tgid`.
    pub fn only_server_session(&self, tgid: u32) -> Option<SpanIds> {
        let mut server = self
            .open
            .iter()
            .filter(|((t, _), inv)| *t == tgid && inv.side == Side::Server);
        let (_, only) = server.next()?;
        server.next().is_none().then_some(only.ids)
    }

    /// What a line written by `tgid` names as the work of its writer: in a plugin, a line of
    /// session S names S's plugin-side span; in the daemon, an answer to backwards request
    /// B names the plugin's span of B. With whether the line ends that work.
    pub fn named_by_line(&self, tgid: u32, line: &StdioLine) -> Option<(SpanIds, bool)> {
        match (&line.message.kind, &line.message.session_id) {
            (Kind::Session(event), Some(session)) => {
                let inv = self.open.get(&(tgid, session.clone()))?;
                (inv.side == Side::Server).then_some((inv.ids, matches!(event, SessionEvent::End)))
            }
            (
                Kind::BackwardsResponse {
                    backwards_request_id: Some(id),
                    event,
                },
                _,
            ) => {
                let b = self
                    .backwards
                    .iter()
                    .find(|((t, r), _)| *t != tgid && r == id)
                    .map(|(_, b)| b.ids)?;
                Some((
                    b,
                    matches!(event, BackwardsEvent::End | BackwardsEvent::Error(_)),
                ))
            }
            _ => None,
        }
    }

    /// One JSON line moved by `tgid` (read when `ingress`). `thread_parent` is the span active
    /// on the moving thread, if any (the daemon's inbound request).
    #[allow(clippy::too_many_arguments)]
    pub fn on_line(
        &mut self,
        tgid: u32,
        inode: u64,
        ingress: bool,
        line: &StdioLine,
        thread_parent: Option<SpanIds>,
        clock: Clock,
        resources: &mut dyn FnMut(u32) -> Arc<ProcessResource>,
        out: &mut Vec<FinishedSpan>,
    ) {
        let session = line.message.session_id.clone();
        match (&line.message.kind, session) {
            (Kind::Request(request), Some(session)) => {
                let side = if ingress { Side::Server } else { Side::Client };
                self.start(
                    tgid,
                    side,
                    session,
                    request.clone(),
                    line,
                    inode,
                    thread_parent,
                );
            }
            (Kind::Session(event), Some(session)) => {
                // The plugin writes session events; the daemon reads them.
                let side = if ingress { Side::Client } else { Side::Server };
                self.session_event(tgid, side, &session, event, line, clock, resources, out);
            }
            (
                Kind::BackwardsResponse {
                    backwards_request_id: Some(id),
                    event,
                },
                _,
            ) if ingress => self.backwards_response(tgid, id, event, line, clock, resources, out),
            (
                Kind::BackwardsResponse {
                    backwards_request_id: Some(id),
                    event: event @ (BackwardsEvent::End | BackwardsEvent::Error(_)),
                },
                _,
            ) => self.backwards_ended_by_daemon(tgid, id, event, line, clock, resources, out),
            (Kind::Heartbeat, _) => self.counters.heartbeats += 1,
            (Kind::Log { .. }, _) => self.counters.logs += 1,
            _ => {}
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn start(
        &mut self,
        tgid: u32,
        side: Side,
        session_id: String,
        request: Request,
        line: &StdioLine,
        pipe_inode: u64,
        thread_parent: Option<SpanIds>,
    ) {
        if self.open.len() >= MAX_OPEN_INVOCATIONS {
            self.counters.dropped_full += 1;
            return;
        }
        // The other end of the same session, in another process.
        let other = self
            .open
            .iter()
            .find(|((t, s), inv)| *t != tgid && *s == session_id && inv.side != side)
            .map(|((t, _), inv)| (*t, inv.ids));
        let ids = match (side, other, thread_parent) {
            (Side::Server, Some((_, client)), _) => child_of(&client),
            (Side::Client, _, Some(parent)) => child_of(&parent),
            _ => root_ids(),
        };
        let start_ns = match side {
            // A client starts when it begins writing, a server once it has the request.
            Side::Client => line.first.enter_ns,
            Side::Server => line.last.exit_ns,
        };
        let invocation = Invocation {
            ids,
            side,
            session_id: session_id.clone(),
            request,
            start_ns,
            last_ns: line.last.exit_ns,
            chunks: 0,
            response_bytes: 0,
            request_bytes: line.len,
            error: None,
            partial: line.holes,
            peer_tgid: other.map(|(t, _)| t),
            pipe_inode,
            model_facts: ChunkFacts::default(),
        };
        if let Some((peer, _)) = other
            && let Some(peer_inv) = self.open.get_mut(&(peer, session_id.clone()))
        {
            peer_inv.peer_tgid = Some(tgid);
            // Ring order across CPUs can put the plugin's read before the daemon's write: the
            // server then started as a root and moves under the client now.
            if side == Side::Client {
                peer_inv.ids = child_of(&ids);
            }
        }
        self.counters.invocations += 1;
        self.open.insert((tgid, session_id), invocation);
    }

    #[allow(clippy::too_many_arguments)]
    fn session_event(
        &mut self,
        tgid: u32,
        side: Side,
        session_id: &str,
        event: &SessionEvent,
        line: &StdioLine,
        clock: Clock,
        resources: &mut dyn FnMut(u32) -> Arc<ProcessResource>,
        out: &mut Vec<FinishedSpan>,
    ) {
        let key = (tgid, session_id.to_string());
        if side == Side::Server && !self.open.contains_key(&key) {
            self.adopt_server_side(tgid, session_id);
        }
        let Some(inv) = self.open.get_mut(&key).filter(|inv| inv.side == side) else {
            self.counters.orphan_events += 1;
            return;
        };
        inv.last_ns = line.last.exit_ns;
        inv.partial |= line.holes;
        match event {
            SessionEvent::Stream(facts) => {
                inv.chunks += 1;
                inv.response_bytes += line.len;
                let m = &mut inv.model_facts;
                for (slot, new) in [
                    (&mut m.model, &facts.model),
                    (&mut m.prompt_tokens, &facts.prompt_tokens),
                    (&mut m.completion_tokens, &facts.completion_tokens),
                    (&mut m.finish_reason, &facts.finish_reason),
                ] {
                    if new.is_some() {
                        slot.clone_from(new);
                    }
                }
            }
            SessionEvent::Error {
                error_type,
                message,
            } => inv.error = Some((error_type.clone(), message.clone())),
            SessionEvent::Invoke {
                invoke_type,
                backwards_request_id,
            } => {
                if side == Side::Server
                    && let Some(request_id) = backwards_request_id
                    && self.backwards.len() < MAX_OPEN_BACKWARDS
                {
                    let backwards = Backwards {
                        ids: child_of(&inv.ids),
                        session_id: session_id.to_string(),
                        request_id: request_id.clone(),
                        invoke_type: invoke_type.clone(),
                        start_ns: line.first.enter_ns,
                        responses: 0,
                        last_response_ns: 0,
                    };
                    self.backwards.insert((tgid, request_id.clone()), backwards);
                }
            }
            SessionEvent::End => {
                if let Some(inv) = self.open.remove(&key) {
                    let end_ns = line.last.exit_ns;
                    out.push(finish(inv, end_ns, None, clock, resources(tgid)));
                }
                if side == Side::Server {
                    self.end_backwards_of(
                        tgid,
                        session_id,
                        line.last.exit_ns,
                        clock,
                        resources,
                        out,
                    );
                }
            }
            SessionEvent::Other(_) => {}
        }
    }

    /// The plugin answers a session whose request line it read without us seeing it (it sat
    /// in the uncaptured middle of a large read, or its record was lost), while the daemon's
    /// write of it was seen: the plugin's side starts as the daemon's did, marked partial.
    fn adopt_server_side(&mut self, tgid: u32, session_id: &str) {
        let Some(client) = self
            .open
            .iter()
            .find(|((t, s), inv)| *t != tgid && s == session_id && inv.side == Side::Client)
            .map(|((t, _), inv)| {
                (
                    *t,
                    inv.ids,
                    inv.request.clone(),
                    inv.start_ns,
                    inv.pipe_inode,
                )
            })
        else {
            return;
        };
        let (client_tgid, client_ids, request, start_ns, pipe_inode) = client;
        if self.open.len() >= MAX_OPEN_INVOCATIONS {
            self.counters.dropped_full += 1;
            return;
        }
        if let Some(c) = self.open.get_mut(&(client_tgid, session_id.to_string())) {
            c.peer_tgid = Some(tgid);
        }
        self.counters.invocations += 1;
        self.counters.adopted += 1;
        self.open.insert(
            (tgid, session_id.to_string()),
            Invocation {
                ids: child_of(&client_ids),
                side: Side::Server,
                session_id: session_id.to_string(),
                request,
                start_ns,
                last_ns: start_ns,
                chunks: 0,
                response_bytes: 0,
                request_bytes: 0,
                error: None,
                partial: true,
                peer_tgid: Some(client_tgid),
                pipe_inode,
                model_facts: ChunkFacts::default(),
            },
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn backwards_response(
        &mut self,
        tgid: u32,
        request_id: &str,
        event: &BackwardsEvent,
        line: &StdioLine,
        clock: Clock,
        resources: &mut dyn FnMut(u32) -> Arc<ProcessResource>,
        out: &mut Vec<FinishedSpan>,
    ) {
        let key = (tgid, request_id.to_string());
        let error = match event {
            BackwardsEvent::Response | BackwardsEvent::Other(_) => {
                if let Some(b) = self.backwards.get_mut(&key) {
                    b.responses += 1;
                    b.last_response_ns = line.last.exit_ns;
                }
                return;
            }
            BackwardsEvent::End => None,
            BackwardsEvent::Error(message) => Some(
                message
                    .clone()
                    .unwrap_or_else(|| "backwards invocation failed".into()),
            ),
        };
        if let Some(b) = self.backwards.remove(&key) {
            out.push(finish_backwards(
                b,
                line.last.exit_ns,
                error,
                clock,
                resources(tgid),
            ));
        }
    }

    /// The daemon (`tgid`) writes the last answer of backwards request `request_id`: the
    /// invocation is over, also when the plugin, having what it needed, never reads that
    /// line. Its span ends when that write starts, which is after the daemon's own call for
    /// it (to the API's inner API) has ended, so that call lies inside it.
    #[allow(clippy::too_many_arguments)]
    fn backwards_ended_by_daemon(
        &mut self,
        tgid: u32,
        request_id: &str,
        event: &BackwardsEvent,
        line: &StdioLine,
        clock: Clock,
        resources: &mut dyn FnMut(u32) -> Arc<ProcessResource>,
        out: &mut Vec<FinishedSpan>,
    ) {
        let Some(key) = self
            .backwards
            .keys()
            .find(|(t, r)| *t != tgid && r == request_id)
            .cloned()
        else {
            return;
        };
        let error = match event {
            BackwardsEvent::Error(message) => Some(
                message
                    .clone()
                    .unwrap_or_else(|| "backwards invocation failed".into()),
            ),
            _ => None,
        };
        if let Some(b) = self.backwards.remove(&key) {
            let end = line.first.enter_ns.max(b.start_ns);
            out.push(finish_backwards(b, end, error, clock, resources(key.0)));
        }
    }

    /// The session ended with backwards invocations still open: answered ones end at their
    /// last answer, unanswered ones in error.
    fn end_backwards_of(
        &mut self,
        tgid: u32,
        session_id: &str,
        ts_ns: u64,
        clock: Clock,
        resources: &mut dyn FnMut(u32) -> Arc<ProcessResource>,
        out: &mut Vec<FinishedSpan>,
    ) {
        let keys: Vec<(u32, String)> = self
            .backwards
            .iter()
            .filter(|((t, _), b)| *t == tgid && b.session_id == session_id)
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            if let Some(b) = self.backwards.remove(&key) {
                let (end, error) = if b.responses > 0 {
                    (b.last_response_ns, None)
                } else {
                    (
                        ts_ns,
                        Some("session ended before the backwards invocation was answered".into()),
                    )
                };
                out.push(finish_backwards(b, end, error, clock, resources(tgid)));
            }
        }
    }

    /// A process exited: its open invocations end in error, and so do the daemon-side
    /// invocations whose plugin it was.
    pub fn process_exited(
        &mut self,
        tgid: u32,
        ts_ns: u64,
        clock: Clock,
        resources: &mut dyn FnMut(u32) -> Arc<ProcessResource>,
        out: &mut Vec<FinishedSpan>,
    ) {
        let keys: Vec<(u32, String)> = self
            .open
            .iter()
            .filter(|((t, _), inv)| *t == tgid || inv.peer_tgid == Some(tgid))
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            if let Some(inv) = self.open.remove(&key) {
                let abort = if key.0 == tgid {
                    Abort::ProcessExited
                } else {
                    Abort::PeerExited
                };
                self.counters.ended_by_exit += 1;
                out.push(finish(inv, ts_ns, Some(abort), clock, resources(key.0)));
            }
        }
        let keys: Vec<(u32, String)> = self
            .backwards
            .keys()
            .filter(|(t, _)| *t == tgid)
            .cloned()
            .collect();
        for key in keys {
            if let Some(b) = self.backwards.remove(&key) {
                out.push(finish_backwards(
                    b,
                    ts_ns,
                    Some(Abort::ProcessExited.message().into()),
                    clock,
                    resources(key.0),
                ));
            }
        }
    }

    /// Ends invocations that saw no line for INVOCATION_IDLE_NS.
    pub fn evict_idle(
        &mut self,
        now_ns: u64,
        clock: Clock,
        resources: &mut dyn FnMut(u32) -> Arc<ProcessResource>,
        out: &mut Vec<FinishedSpan>,
    ) {
        let keys: Vec<(u32, String)> = self
            .open
            .iter()
            .filter(|(_, inv)| now_ns.saturating_sub(inv.last_ns) > INVOCATION_IDLE_NS)
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            if let Some(inv) = self.open.remove(&key) {
                self.counters.abandoned += 1;
                let end = inv.last_ns;
                out.push(finish(inv, end, Some(Abort::Idle), clock, resources(key.0)));
            }
        }
        self.backwards
            .retain(|_, b| now_ns.saturating_sub(b.start_ns) <= INVOCATION_IDLE_NS);
    }
}

fn str_attr(attrs: &mut Vec<(String, AttrValue)>, key: &str, value: &Option<String>) {
    if let Some(v) = value {
        attrs.push((key.into(), AttrValue::Str(v.clone())));
    }
}

/// OTel GenAI attributes of a model invocation: from the request line and the last values
/// the stream chunks carried.
fn model_attrs(attributes: &mut Vec<(String, AttrValue)>, inv: &Invocation) {
    let op = match inv.request.action.as_deref() {
        Some("invoke_llm") => Some("chat"),
        Some("invoke_text_embedding") => Some("embeddings"),
        _ => None,
    };
    if let Some(op) = op {
        attributes.push(("gen_ai.operation.name".into(), AttrValue::Str(op.into())));
        str_attr(attributes, "gen_ai.provider.name", &inv.request.provider);
    }
    let m = &inv.model_facts;
    str_attr(attributes, "gen_ai.response.model", &m.model);
    for (key, value) in [
        ("gen_ai.usage.input_tokens", &m.prompt_tokens),
        ("gen_ai.usage.output_tokens", &m.completion_tokens),
    ] {
        if let Some(n) = value.as_deref().and_then(|v| v.parse::<i64>().ok()) {
            attributes.push((key.into(), AttrValue::Int(n)));
        }
    }
    if let Some(reason) = &m.finish_reason {
        attributes.push((
            "gen_ai.response.finish_reasons".into(),
            AttrValue::StrList(vec![reason.clone()]),
        ));
    }
}

fn finish(
    inv: Invocation,
    end_ns: u64,
    abort: Option<Abort>,
    clock: Clock,
    resource: Arc<ProcessResource>,
) -> FinishedSpan {
    let action = inv.request.action.as_deref().unwrap_or("unknown");
    let mut attributes = vec![
        (
            "dify.plugin.session_id".to_string(),
            AttrValue::Str(inv.session_id.clone()),
        ),
        ("dify.plugin.action".into(), AttrValue::Str(action.into())),
        (
            "dify.plugin.chunks".into(),
            AttrValue::Int(inv.chunks as i64),
        ),
        (
            "dify.plugin.request_bytes".into(),
            AttrValue::Int(inv.request_bytes as i64),
        ),
    ];
    if inv.side == Side::Server {
        attributes.push((
            "dify.plugin.response_bytes".into(),
            AttrValue::Int(inv.response_bytes as i64),
        ));
    }
    str_attr(
        &mut attributes,
        "dify.plugin.type",
        &inv.request.plugin_type,
    );
    str_attr(
        &mut attributes,
        "dify.plugin.provider",
        &inv.request.provider,
    );
    str_attr(&mut attributes, "dify.plugin.tool", &inv.request.tool);
    str_attr(&mut attributes, "gen_ai.request.model", &inv.request.model);
    model_attrs(&mut attributes, &inv);
    if inv.partial {
        attributes.push(("difytrace.partial".into(), AttrValue::Bool(true)));
    }
    if inv.pipe_inode != 0 {
        attributes.push((
            "difytrace.pipe.inode".into(),
            AttrValue::Int(inv.pipe_inode as i64),
        ));
    }
    if let Some(peer) = inv.peer_tgid {
        attributes.push(("difytrace.peer.pid".into(), AttrValue::Int(i64::from(peer))));
    }
    let status = match (&inv.error, abort) {
        (Some((error_type, message)), _) => {
            str_attr(&mut attributes, "error.type", error_type);
            SpanStatus::Error(
                message
                    .clone()
                    .unwrap_or_else(|| "plugin returned an error".into()),
            )
        }
        (None, Some(abort)) => {
            attributes.push((
                "error.type".into(),
                AttrValue::Str("difytrace.session_aborted".into()),
            ));
            SpanStatus::Error(abort.message().into())
        }
        (None, None) => SpanStatus::Unset,
    };
    FinishedSpan {
        trace_id: inv.ids.trace_id,
        span_id: inv.ids.span_id,
        parent_span_id: inv.ids.parent_span_id,
        parent_is_remote: inv.ids.parent_is_remote,
        kind: match inv.side {
            Side::Client => SpanKind::Client,
            Side::Server => SpanKind::Server,
        },
        name: format!("plugin {action}"),
        start: clock.to_system_time(inv.start_ns),
        end: clock.to_system_time(end_ns.max(inv.start_ns)),
        attributes,
        links: Vec::new(),
        status,
        resource,
    }
}

fn finish_backwards(
    b: Backwards,
    end_ns: u64,
    error: Option<String>,
    clock: Clock,
    resource: Arc<ProcessResource>,
) -> FinishedSpan {
    let kind = b.invoke_type.as_deref().unwrap_or("unknown");
    let mut attributes = vec![
        (
            "dify.plugin.session_id".to_string(),
            AttrValue::Str(b.session_id),
        ),
        (
            "dify.plugin.backwards_request_id".into(),
            AttrValue::Str(b.request_id),
        ),
        (
            "dify.plugin.backwards_type".into(),
            AttrValue::Str(kind.into()),
        ),
        (
            "dify.plugin.chunks".into(),
            AttrValue::Int(b.responses as i64),
        ),
    ];
    let status = match error {
        Some(message) => {
            attributes.push((
                "error.type".into(),
                AttrValue::Str("difytrace.backwards_error".into()),
            ));
            SpanStatus::Error(message)
        }
        None => SpanStatus::Unset,
    };
    FinishedSpan {
        trace_id: b.ids.trace_id,
        span_id: b.ids.span_id,
        parent_span_id: b.ids.parent_span_id,
        parent_is_remote: false,
        kind: SpanKind::Client,
        name: format!("plugin backwards_invoke {kind}"),
        start: clock.to_system_time(b.start_ns),
        end: clock.to_system_time(end_ns.max(b.start_ns)),
        attributes,
        links: Vec::new(),
        status,
        resource,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{
        http1::ChunkTs,
        stdio::{StdioLine, classify},
    };

    const DAEMON: u32 = 100;
    const PLUGIN: u32 = 200;

    fn line(json: &str, t: u64) -> StdioLine {
        StdioLine {
            message: classify(json.as_bytes()),
            len: json.len() as u64,
            holes: false,
            overlong: false,
            first: ChunkTs {
                enter_ns: t,
                exit_ns: t + 1,
            },
            last: ChunkTs {
                enter_ns: t,
                exit_ns: t + 1,
            },
            ctx: 1,
        }
    }

    fn request(s: &str) -> String {
        format!(
            r#"{{"session_id":"{s}","event":"request","data":{{"action":"invoke_tool","type":"tool","tool":"echo"}}}}"#
        )
    }

    fn session(s: &str, kind: &str, data: &str) -> String {
        format!(
            r#"{{"event":"session","session_id":"{s}","data":{{"type":"{kind}","data":{data}}}}}"#
        )
    }

    struct Run {
        sessions: PluginSessions,
        out: Vec<FinishedSpan>,
    }

    impl Run {
        fn new() -> Self {
            Self {
                sessions: PluginSessions::default(),
                out: Vec::new(),
            }
        }

        fn feed(&mut self, tgid: u32, ingress: bool, json: &str, t: u64) {
            let mut res = |pid: u32| {
                Arc::new(ProcessResource {
                    service_name: format!("svc-{pid}"),
                    pid,
                    executable_name: "x".into(),
                    host_name: "h".into(),
                    container: None,
                })
            };
            self.sessions.on_line(
                tgid,
                7,
                ingress,
                &line(json, t),
                None,
                Clock::now(),
                &mut res,
                &mut self.out,
            );
        }

        fn exit(&mut self, tgid: u32, t: u64) {
            let mut res = |pid: u32| {
                Arc::new(ProcessResource {
                    service_name: format!("svc-{pid}"),
                    pid,
                    executable_name: "x".into(),
                    host_name: "h".into(),
                    container: None,
                })
            };
            self.sessions
                .process_exited(tgid, t, Clock::now(), &mut res, &mut self.out);
        }

        fn span(&self, pid: u32, kind: SpanKind) -> &FinishedSpan {
            self.out
                .iter()
                .find(|s| s.resource.pid == pid && s.kind == kind)
                .unwrap_or_else(|| panic!("no {kind:?} span of {pid}: {:?}", self.out))
        }
    }

    #[test]
    fn both_sides_of_a_session_link_even_when_the_read_comes_first() {
        let mut r = Run::new();
        // The plugin's read reached the ring before the daemon's write.
        r.feed(PLUGIN, true, &request("s1"), 10);
        r.feed(DAEMON, false, &request("s1"), 9);
        r.feed(PLUGIN, false, &session("s1", "stream", "{}"), 20);
        r.feed(DAEMON, true, &session("s1", "stream", "{}"), 21);
        r.feed(PLUGIN, false, &session("s1", "end", "{}"), 30);
        r.feed(DAEMON, true, &session("s1", "end", "{}"), 31);
        let server = r.span(PLUGIN, SpanKind::Server);
        let client = r.span(DAEMON, SpanKind::Client);
        assert_eq!(server.trace_id, client.trace_id);
        assert_eq!(server.parent_span_id, Some(client.span_id));
        assert_eq!(server.name, "plugin invoke_tool");
        assert_eq!(server.attr("dify.plugin.chunks"), Some(&AttrValue::Int(1)));
        assert_eq!(
            server.attr("difytrace.peer.pid"),
            Some(&AttrValue::Int(100))
        );
        assert_eq!(r.sessions.open_len(), 0);
    }

    #[test]
    fn an_unseen_request_is_adopted_from_the_daemon_side() {
        let mut r = Run::new();
        r.feed(DAEMON, false, &request("s2"), 5);
        r.feed(PLUGIN, false, &session("s2", "end", "{}"), 50);
        let server = r.span(PLUGIN, SpanKind::Server);
        assert_eq!(
            server.attr("difytrace.partial"),
            Some(&AttrValue::Bool(true))
        );
        assert_eq!(r.sessions.counters.adopted, 1);
    }

    #[test]
    fn errors_exits_and_backwards_invocations() {
        let mut r = Run::new();
        r.feed(DAEMON, false, &request("e"), 1);
        r.feed(PLUGIN, true, &request("e"), 2);
        r.feed(
            PLUGIN,
            false,
            &session("e", "error", r#"{"error_type":"X","message":"bad"}"#),
            3,
        );
        r.feed(PLUGIN, false, &session("e", "end", "{}"), 4);
        let server = r.span(PLUGIN, SpanKind::Server);
        assert_eq!(server.status, SpanStatus::Error("bad".into()));
        assert_eq!(server.attr("error.type"), Some(&AttrValue::Str("X".into())));

        let mut r = Run::new();
        r.feed(DAEMON, false, &request("k"), 1);
        r.feed(PLUGIN, true, &request("k"), 2);
        r.feed(
            PLUGIN,
            false,
            &session(
                "k",
                "invoke",
                r#"{"type":"storage","backwards_request_id":"b1","request":{}}"#,
            ),
            3,
        );
        r.feed(
            PLUGIN,
            true,
            r#"{"session_id":"k","event":"backwards_response","data":{"backwards_request_id":"b1","event":"end","message":"","data":null}}"#,
            4,
        );
        let backwards = r
            .out
            .iter()
            .find(|s| s.name == "plugin backwards_invoke storage")
            .expect("backwards span")
            .clone();
        assert_eq!(backwards.kind, SpanKind::Client);
        r.exit(PLUGIN, 10);
        let server = r.span(PLUGIN, SpanKind::Server);
        let client = r.span(DAEMON, SpanKind::Client);
        assert_eq!(backwards.parent_span_id, Some(server.span_id));
        assert!(matches!(server.status, SpanStatus::Error(_)));
        assert!(matches!(client.status, SpanStatus::Error(_)));
        assert_eq!(r.sessions.open_len(), 0);
    }

    #[test]
    fn the_daemons_last_answer_ends_a_backwards_invocation_the_plugin_stopped_reading() {
        let mut r = Run::new();
        r.feed(DAEMON, false, &request("q"), 1);
        r.feed(PLUGIN, true, &request("q"), 2);
        let invoke = session(
            "q",
            "invoke",
            r#"{"type":"tool","backwards_request_id":"b7","request":{}}"#,
        );
        r.feed(PLUGIN, false, &invoke, 3);
        r.feed(DAEMON, true, &invoke, 4);
        let answer = r#"{"session_id":"q","event":"backwards_response","data":{"backwards_request_id":"b7","event":"response","message":"struct","data":{}}}"#;
        r.feed(DAEMON, false, answer, 5);
        r.feed(PLUGIN, true, answer, 6);
        // The daemon's own call for it ends, then it writes `end` at 20; the plugin has what
        // it needs and never reads that line.
        let end = r#"{"session_id":"q","event":"backwards_response","data":{"backwards_request_id":"b7","event":"end","message":"end","data":{}}}"#;
        r.feed(DAEMON, false, end, 20);
        let b = r
            .out
            .iter()
            .find(|s| s.name == "plugin backwards_invoke tool")
            .expect("backwards span");
        assert_eq!(b.resource.pid, PLUGIN);
        assert_eq!(
            b.end.duration_since(b.start).ok(),
            Some(std::time::Duration::from_nanos(17)),
            "from the plugin's write (3) to the start of the daemon's write of `end` (20)"
        );
        r.feed(PLUGIN, false, &session("q", "end", "{}"), 22);
        assert_eq!(
            r.out
                .iter()
                .filter(|s| s.name == "plugin backwards_invoke tool")
                .count(),
            1
        );
    }

    #[test]
    fn a_backwards_invocation_answered_but_not_ended_closes_with_its_session() {
        let mut r = Run::new();
        r.feed(DAEMON, false, &request("q"), 1);
        r.feed(PLUGIN, true, &request("q"), 2);
        let invoke = session(
            "q",
            "invoke",
            r#"{"type":"storage","backwards_request_id":"b9","request":{}}"#,
        );
        r.feed(PLUGIN, false, &invoke, 3);
        r.feed(
            PLUGIN,
            true,
            r#"{"session_id":"q","event":"backwards_response","data":{"backwards_request_id":"b9","event":"response","message":"struct","data":{"data":"ok"}}}"#,
            4,
        );
        // The tool took its answer and finished; the daemon's `end` comes later, or never.
        r.feed(PLUGIN, false, &session("q", "end", "{}"), 6);
        r.feed(DAEMON, true, &session("q", "end", "{}"), 7);
        let b = r
            .out
            .iter()
            .find(|s| s.name == "plugin backwards_invoke storage")
            .expect("backwards span");
        assert_eq!(b.status, SpanStatus::Unset);
        // It ends at its answer (exit 5), not at the session's end.
        assert_eq!(
            b.end.duration_since(b.start).ok(),
            Some(std::time::Duration::from_nanos(2))
        );
        assert_eq!(r.sessions.open_len(), 0);
    }
}
