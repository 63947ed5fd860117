//! What a trace learns while its requests go by, applied to its spans as they finish:
//!
//! - **Joining the application's own trace.** When a process we trace propagates its own
//!   W3C context on an outbound request (Dify's API with `ENABLE_OTEL` does), that request's
//!   trace id is the application's trace. Our trace adopts it, so the application's spans and
//!   ours end up in one trace; the first foreign context seen in a trace wins (the plugin
//!   daemon's fresh per-call traceparents must not split the trace again later).
//! - **Dify ids.** `conversation_id`, `workflow_run_id`, `app_id` and `message_id` seen in a
//!   request or response body of the trace go onto its root span as `dify.*` attributes,
//!   with a link to the application's context when there was one. Dify's own tracing keys
//!   its workflow traces by these ids, so a user can jump from one trace to the other.
//!
//! Both are kept per trace in two generations of bounded maps, so memory stays flat.

use std::collections::HashMap;

use super::model::{AttrValue, FinishedSpan, SpanLink};
use super::traceparent::TraceParent;

/// Traces remembered at once per generation.
pub const MAX_TRACES: usize = 32768;

/// The Dify ids recognised in bodies, and their attribute names.
const DIFY_IDS: [(&str, &str); 4] = [
    ("conversation_id", "dify.conversation_id"),
    ("workflow_run_id", "dify.workflow_run_id"),
    ("app_id", "dify.app_id"),
    ("message_id", "dify.message_id"),
];
/// An id longer than this is not an id.
const MAX_ID_LEN: usize = 64;

#[derive(Debug, Default, Clone)]
struct TraceFacts {
    /// The application's context this trace adopted.
    joined: Option<TraceParent>,
    dify: [Option<String>; DIFY_IDS.len()],
}

#[derive(Debug, Default, Clone, Copy)]
pub struct TraceContextCounters {
    /// Traces that adopted an application's trace id.
    pub joined: u64,
    /// Foreign contexts not adopted because spans of the trace were already out (they stay
    /// links).
    pub not_joined: u64,
    /// Root spans given Dify ids.
    pub dify_roots: u64,
    /// Traces forgotten to stay within MAX_TRACES (their later spans keep our trace id).
    pub evicted: u64,
}

/// A map bounded by keeping two generations of at most MAX_TRACES entries: when the current
/// one is full, the previous one is dropped (counted) and the current one takes its place.
struct Generations<V> {
    current: HashMap<[u8; 16], V>,
    previous: HashMap<[u8; 16], V>,
}

impl<V: Default> Generations<V> {
    fn new() -> Self {
        Self {
            current: HashMap::new(),
            previous: HashMap::new(),
        }
    }

    fn get(&self, key: &[u8; 16]) -> Option<&V> {
        self.current.get(key).or_else(|| self.previous.get(key))
    }

    /// The entry of `key`, made when missing; `evicted` counts the entries dropped for it.
    fn entry(&mut self, key: [u8; 16], evicted: &mut u64) -> &mut V {
        if !self.current.contains_key(&key) {
            let carried = self.previous.remove(&key);
            if self.current.len() >= MAX_TRACES {
                *evicted += self.previous.len() as u64;
                self.previous = std::mem::take(&mut self.current);
            }
            self.current.insert(key, carried.unwrap_or_default());
        }
        self.current.entry(key).or_default()
    }

    fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }
}

/// Per-trace facts: only traces that have some, so a trace with none costs a set entry.
pub struct TraceContext {
    facts: Generations<TraceFacts>,
    /// Traces of which a span was handed out already: adopting another trace id for them
    /// now would cut them in two.
    exported: Generations<()>,
    pub counters: TraceContextCounters,
}

impl Default for TraceContext {
    fn default() -> Self {
        Self {
            facts: Generations::new(),
            exported: Generations::new(),
            counters: TraceContextCounters::default(),
        }
    }
}

impl TraceContext {
    /// A request of trace `ours` carries the application's own context `theirs` (an outbound
    /// request it propagates its trace on). The first such context of a trace is adopted.
    pub fn app_context(&mut self, ours: [u8; 16], theirs: TraceParent) {
        if theirs.trace_id == ours || self.facts.get(&ours).is_some_and(|f| f.joined.is_some()) {
            return;
        }
        if self.exported.get(&ours).is_some() {
            self.counters.not_joined += 1;
            return;
        }
        self.facts.entry(ours, &mut self.counters.evicted).joined = Some(theirs);
        self.counters.joined += 1;
    }

    /// A body of a request or response of trace `trace` (a prefix of it, maybe cut).
    pub fn body(&mut self, trace: [u8; 16], body: &[u8]) {
        if body.len() < 8 || memchr_id(body).is_none() {
            return;
        }
        let found: Vec<(usize, String)> = DIFY_IDS
            .iter()
            .enumerate()
            .filter_map(|(i, (key, _))| json_string_field(body, key).map(|v| (i, v)))
            .collect();
        if found.is_empty() {
            return;
        }
        let facts = self.facts.entry(trace, &mut self.counters.evicted);
        for (i, value) in found {
            facts.dify[i].get_or_insert(value);
        }
    }

    /// Gives a finished span what its trace learned: the adopted trace id, and on the root
    /// span the Dify ids and a link to the application's context.
    pub fn apply(&mut self, span: &mut FinishedSpan) {
        let mut evicted = 0;
        self.exported.entry(span.trace_id, &mut evicted);
        let Some(facts) = self.facts.get(&span.trace_id) else {
            return;
        };
        let is_root = span.parent_span_id.is_none() || span.parent_is_remote;
        if is_root {
            let mut any = false;
            for (i, (_, attr)) in DIFY_IDS.iter().enumerate() {
                if let Some(v) = &facts.dify[i] {
                    span.attributes
                        .push(((*attr).to_string(), AttrValue::Str(v.clone())));
                    any = true;
                }
            }
            if any {
                self.counters.dify_roots += 1;
            }
            if let Some(app) = facts.joined {
                span.links.push(SpanLink {
                    trace_id: app.trace_id,
                    span_id: app.span_id,
                    attributes: vec![(
                        "link.reason".into(),
                        AttrValue::Str("application trace".into()),
                    )],
                });
            }
        }
        if let Some(app) = facts.joined {
            span.trace_id = app.trace_id;
        }
    }

    /// Traces with facts remembered.
    pub fn len(&self) -> usize {
        self.facts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Whether `body` mentions any `..._id"` at all (most bodies do not: skip them fast).
fn memchr_id(body: &[u8]) -> Option<usize> {
    body.windows(4).position(|w| w == b"_id\"")
}

/// The string value of the first `"key": "value"` in a JSON text (maybe cut short), when
/// it looks like an id: a JSON parse would fail on a cut body, and the ids Dify uses are
/// plain ASCII (UUIDs), so no escapes are decoded.
pub fn json_string_field(body: &[u8], key: &str) -> Option<String> {
    let needle = format!("\"{key}\"");
    let needle = needle.as_bytes();
    let mut from = 0;
    while let Some(pos) = find(&body[from..], needle) {
        let mut i = from + pos + needle.len();
        from = i;
        i += skip_ws(&body[i..]);
        if body.get(i) != Some(&b':') {
            continue;
        }
        i += 1;
        i += skip_ws(&body[i..]);
        if body.get(i) != Some(&b'"') {
            continue;
        }
        i += 1;
        let rest = &body[i..];
        let end = rest.iter().position(|b| *b == b'"')?;
        let value = &rest[..end];
        if value.is_empty()
            || value.len() > MAX_ID_LEN
            || !value
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
        {
            continue;
        }
        return std::str::from_utf8(value).ok().map(str::to_string);
    }
    None
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn skip_ws(bytes: &[u8]) -> usize {
    bytes
        .iter()
        .take_while(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
        .count()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::SystemTime;

    use super::*;
    use crate::span::model::{ProcessResource, SpanKind, SpanStatus};

    fn span(trace: u8, parent: Option<u8>) -> FinishedSpan {
        FinishedSpan {
            trace_id: [trace; 16],
            span_id: [trace.wrapping_add(1); 8],
            parent_span_id: parent.map(|p| [p; 8]),
            parent_is_remote: false,
            kind: SpanKind::Server,
            name: "POST /v1/chat-messages".into(),
            start: SystemTime::UNIX_EPOCH,
            end: SystemTime::UNIX_EPOCH,
            attributes: Vec::new(),
            links: Vec::new(),
            status: SpanStatus::Unset,
            resource: Arc::new(ProcessResource {
                service_name: "api".into(),
                pid: 1,
                executable_name: "python".into(),
                host_name: "h".into(),
                container: None,
            }),
        }
    }

    #[test]
    fn finds_ids_in_json_and_sse_even_when_cut() {
        let body = br#"{"inputs": {}, "query": "hi", "conversation_id" : "1c7e0c2a-0000-4000-8000-00000000000a", "user": "u"}"#;
        assert_eq!(
            json_string_field(body, "conversation_id").as_deref(),
            Some("1c7e0c2a-0000-4000-8000-00000000000a")
        );
        let sse = b"data: {\"event\": \"workflow_started\", \"workflow_run_id\": \"wr-1\", \"data\": {\"id\": \"wr-1\"";
        assert_eq!(
            json_string_field(sse, "workflow_run_id").as_deref(),
            Some("wr-1")
        );
        // Cut inside the value: not an id.
        assert_eq!(json_string_field(b"{\"app_id\": \"abc", "app_id"), None);
        // Not a string, or not an id: skipped, a later one is taken.
        let body = br#"{"app_id": null, "x": {"app_id": "has space"}, "app_id": "a-2"}"#;
        assert_eq!(json_string_field(body, "app_id").as_deref(), Some("a-2"));
        assert_eq!(json_string_field(b"{}", "app_id"), None);
    }

    #[test]
    fn root_gets_dify_ids_and_every_span_the_adopted_trace() {
        let mut ctx = TraceContext::default();
        ctx.body(
            [1; 16],
            br#"{"user_id":"u","conversation_id":"c-1","app_id":"app-9","message_id":"m-3","data":{}}"#,
        );
        let theirs = TraceParent {
            trace_id: [9; 16],
            span_id: [8; 8],
            flags: 1,
        };
        ctx.app_context([1; 16], theirs);
        // A later, different context (the daemon's fresh traceparent) does not win.
        ctx.app_context(
            [1; 16],
            TraceParent {
                trace_id: [7; 16],
                span_id: [7; 8],
                flags: 1,
            },
        );
        let mut child = span(1, Some(5));
        ctx.apply(&mut child);
        assert_eq!(child.trace_id, [9; 16]);
        assert!(child.attr("dify.conversation_id").is_none());
        let mut root = span(1, None);
        ctx.apply(&mut root);
        assert_eq!(root.trace_id, [9; 16]);
        assert_eq!(
            root.attr("dify.conversation_id"),
            Some(&AttrValue::Str("c-1".into()))
        );
        assert_eq!(
            root.attr("dify.app_id"),
            Some(&AttrValue::Str("app-9".into()))
        );
        assert_eq!(
            root.attr("dify.message_id"),
            Some(&AttrValue::Str("m-3".into()))
        );
        assert_eq!(root.links.len(), 1);
        assert_eq!(root.links[0].span_id, [8; 8]);
        // A trace that already handed out a span keeps its id (no split).
        ctx.app_context([1; 16], theirs);
        let mut early = span(3, Some(4));
        ctx.apply(&mut early);
        ctx.app_context([3; 16], theirs);
        let mut late = span(3, None);
        ctx.apply(&mut late);
        assert_eq!(late.trace_id, [3; 16]);
        assert_eq!(ctx.counters.not_joined, 1);
        // Another trace is untouched.
        let mut other = span(2, None);
        ctx.apply(&mut other);
        assert_eq!(other.trace_id, [2; 16]);
        assert!(other.attributes.is_empty() && other.links.is_empty());
        assert_eq!(ctx.counters.joined, 1);
    }

    #[test]
    fn memory_is_bounded() {
        let mut ctx = TraceContext::default();
        for i in 0..(MAX_TRACES * 3) as u32 {
            let mut t = [0u8; 16];
            t[..4].copy_from_slice(&i.to_le_bytes());
            ctx.body(t, br#"{"app_id":"a"}"#);
        }
        assert!(ctx.len() <= 2 * MAX_TRACES);
        assert!(ctx.counters.evicted > 0);
    }
}
