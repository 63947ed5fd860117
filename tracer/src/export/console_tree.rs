//! Console trace trees: once a trace's root span has finished, the whole trace is printed as
//! an indented tree with per-hop durations, so "which hop is slow" is answered in a terminal.
//!
//! [`TraceBuffer`] holds the spans of each trace until its root arrives (bounded by
//! [`TREE_MAX_TRACES`], [`TREE_MAX_SPANS`] and [`TREE_ROOT_WAIT`]); [`render_trace`] turns the
//! spans of one trace into lines and is a pure function. Example:
//!
//! ```text
//! trace 4bf92f3577b34da6a3ce929d0e0e4736: 3 spans, 25.101ms, at 2026-11-25T17:40:01.123Z
//!   SERVER app GET /chain 200                      25.101ms    +0.000ms  self  3.200ms
//!     CLIENT app GET /downstream/data 200          21.901ms    +1.500ms  self 20.000ms  <- slowest
//!       SERVER down GET /downstream/data 200        1.901ms    +2.000ms  self  1.901ms
//! ```
//!
//! Tree lines never start with a digit, so they are easy to tell from the per-span lines
//! (which start with a timestamp).

use std::{
    collections::{BTreeMap, VecDeque},
    fmt::Write as _,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use super::console::{rfc3339_millis, span_head};
use crate::fast_map::{HashMap, HashSet};
use crate::span::model::{FinishedSpan, SpanStatus, hex};

/// Traces whose spans are held while waiting for their root. When a new trace would exceed
/// it, the oldest trace is printed as it is (marked incomplete).
pub const TREE_MAX_TRACES: usize = 1024;

/// Spans held over all waiting traces; beyond it the oldest trace is printed as it is.
pub const TREE_MAX_SPANS: usize = 16_384;

/// How long a trace waits for its root (counted from its first finished span) before it is
/// printed as it is, marked incomplete. Generous because the slow traces are the interesting
/// ones: a streamed chat turn easily runs for a minute after its first hop finished. Memory
/// stays bounded by [`TREE_MAX_TRACES`] and [`TREE_MAX_SPANS`] whatever this is.
pub const TREE_ROOT_WAIT: Duration = Duration::from_secs(120);

/// A span whose parent is remote (a traceparent header) is the root only if its parent does
/// not turn up, traced by us, within this long.
pub const TREE_REMOTE_ROOT_GRACE: Duration = Duration::from_secs(2);

/// Printed traces remembered so that a span finishing after its root is printed as a late
/// line of that trace rather than starting a new one.
pub const TREE_MAX_DONE: usize = 4096;

/// How long a printed trace is remembered for late spans.
pub const TREE_LATE_WINDOW: Duration = Duration::from_secs(60);

/// Longest tree printed for one trace; the rest is summarised in one line.
pub const TREE_MAX_LINES: usize = 500;

/// A complete trace (or one flushed at shutdown) with fewer spans is not drawn: its span line
/// already says all a tree would. Evicted traces are always drawn, to show what was evicted.
pub const TREE_MIN_SPANS: usize = 2;

/// Longest label (kind, service, method, path, status) printed in a tree line.
const MAX_LABEL_CHARS: usize = 80;

/// Widest label column; deeper or longer labels push the numbers to the right.
const MAX_LABEL_COLUMN: usize = 72;

/// Deepest indentation; deeper spans are drawn at this depth.
const MAX_INDENT_DEPTH: usize = 32;

/// What the tree needs of a span (a slim copy: the buffer holds thousands of them).
#[derive(Debug, Clone, PartialEq)]
pub struct TreeSpan {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: Option<[u8; 8]>,
    pub parent_is_remote: bool,
    /// `SERVER app GET /chain 200`, as in the per-span line.
    pub label: String,
    pub error: bool,
    pub start: SystemTime,
    pub end: SystemTime,
}

impl TreeSpan {
    pub fn of(span: &FinishedSpan) -> Self {
        let mut label = span_head(span);
        if let Some((cut, _)) = label.char_indices().nth(MAX_LABEL_CHARS) {
            label.truncate(cut);
            label.push_str("...");
        }
        Self {
            trace_id: span.trace_id,
            span_id: span.span_id,
            parent_span_id: span.parent_span_id,
            parent_is_remote: span.parent_is_remote,
            label,
            error: matches!(span.status, SpanStatus::Error(_)),
            start: span.start,
            end: span.end,
        }
    }
}

/// Why a trace is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceEnd {
    /// Its root (a span without parent, or with a remote parent) finished.
    Root,
    /// Evicted to make room: the buffer was full.
    BufferFull,
    /// No root came within [`TREE_ROOT_WAIT`].
    NoRoot,
    /// The agent is stopping.
    Stopping,
}

impl TraceEnd {
    fn note(self) -> String {
        match self {
            Self::Root => String::new(),
            Self::BufferFull => " INCOMPLETE (evicted: trace buffer full)".into(),
            Self::NoRoot => format!(
                " INCOMPLETE (no root span within {}s)",
                TREE_ROOT_WAIT.as_secs()
            ),
            Self::Stopping => " INCOMPLETE (agent stopping before the root span finished)".into(),
        }
    }
}

/// Nanoseconds since the epoch (negative before it).
fn ns(t: SystemTime) -> i128 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    }
}

fn len_ns(s: &TreeSpan) -> i128 {
    (ns(s.end) - ns(s.start)).max(0)
}

/// `12.345ms`; with `signed`, `+12.345ms` / `-0.200ms`.
fn fmt_ms(nanos: i128, signed: bool) -> String {
    let micros = nanos / 1000;
    let sign = match (signed, micros < 0) {
        (_, true) => "-",
        (true, false) => "+",
        (false, false) => "",
    };
    let m = micros.unsigned_abs();
    format!("{sign}{}.{:03}ms", m / 1000, m % 1000)
}

/// The span shown as the root: the earliest span without a parent; else, when
/// `absent_parent_roots`, the earliest one whose parent is not among `spans`.
fn pick_root(
    spans: &[TreeSpan],
    ids: &HashMap<[u8; 8], usize>,
    absent_parent_roots: bool,
) -> Option<usize> {
    let earliest = |pred: &dyn Fn(&TreeSpan) -> bool| {
        spans
            .iter()
            .enumerate()
            .filter(|(_, s)| pred(s))
            .min_by_key(|(i, s)| (ns(s.start), *i))
            .map(|(i, _)| i)
    };
    earliest(&|s| s.parent_span_id.is_none()).or_else(|| {
        if absent_parent_roots {
            earliest(&|s| s.parent_span_id.is_none_or(|p| !ids.contains_key(&p)))
        } else {
            None
        }
    })
}

/// Time of `[start, end)` not covered by any of `kids` (clipped to the span).
fn self_time(span: &TreeSpan, kids: &[&TreeSpan]) -> i128 {
    let (lo, hi) = (ns(span.start), ns(span.end).max(ns(span.start)));
    let mut iv: Vec<(i128, i128)> = kids
        .iter()
        .map(|k| (ns(k.start).max(lo), ns(k.end).min(hi)))
        .filter(|(a, b)| a < b)
        .collect();
    iv.sort_unstable();
    let mut covered = 0;
    let mut cur: Option<(i128, i128)> = None;
    for (a, b) in iv {
        match cur {
            Some((ca, cb)) if a <= cb => cur = Some((ca, cb.max(b))),
            Some((ca, cb)) => {
                covered += cb - ca;
                cur = Some((a, b));
            }
            None => cur = Some((a, b)),
        }
    }
    if let Some((ca, cb)) = cur {
        covered += cb - ca;
    }
    (hi - lo - covered).max(0)
}

/// One row of the tree before formatting.
struct Row {
    idx: usize,
    depth: usize,
    /// The span's parent was not seen; it is drawn under the root (or at the top).
    orphan: bool,
    self_ns: i128,
}

/// Renders one trace as lines (header first). Children are sorted by start time; spans whose
/// parent never arrived (or that only reach each other in a cycle) are drawn under the root
/// marked `[orphan]`; each line shows the span's duration, its start offset from the root,
/// and its self time (the part not covered by its children). The hop with the largest self
/// time is marked `<- slowest`. Pure; any input is accepted.
pub fn render_trace(spans: &[TreeSpan], end: TraceEnd) -> Vec<String> {
    let Some(first) = spans.first() else {
        return Vec::new();
    };
    let n = spans.len();
    let mut ids: HashMap<[u8; 8], usize> = HashMap::with_capacity_and_hasher(n, Default::default());
    for (i, s) in spans.iter().enumerate() {
        ids.entry(s.span_id).or_insert(i);
    }
    let parent_of = |i: usize| -> Option<usize> {
        spans[i]
            .parent_span_id
            .and_then(|p| ids.get(&p).copied())
            .filter(|&p| p != i)
    };
    let by_start =
        |v: &mut Vec<usize>| v.sort_by_key(|&i| (ns(spans[i].start), spans[i].span_id, i));
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); n];
    for i in 0..n {
        if let Some(p) = parent_of(i) {
            children[p].push(i);
        }
    }
    for c in &mut children {
        by_start(c);
    }
    let root = pick_root(spans, &ids, end == TraceEnd::Root);

    // Everything the root does not reach becomes an orphan subtree: first the spans whose
    // parent is missing, then any left over (parent links that form a cycle).
    let mut reached = vec![false; n];
    let mark = |from: usize, reached: &mut Vec<bool>| {
        let mut stack = vec![from];
        while let Some(i) = stack.pop() {
            if !std::mem::replace(&mut reached[i], true) {
                stack.extend(children[i].iter().copied());
            }
        }
    };
    if let Some(r) = root {
        mark(r, &mut reached);
    }
    let mut order: Vec<usize> = (0..n).collect();
    by_start(&mut order);
    let mut orphans = Vec::new();
    for pass in 0..2 {
        for &i in &order {
            if !reached[i] && (pass == 1 || parent_of(i).is_none()) {
                orphans.push(i);
                mark(i, &mut reached);
            }
        }
    }
    by_start(&mut orphans);

    // Depth-first, children in start order.
    let mut rows: Vec<Row> = Vec::with_capacity(n);
    let mut seen = vec![false; n];
    let mut stack: Vec<(usize, usize, bool)> = Vec::new();
    match root {
        Some(r) => stack.push((r, 0, false)),
        None => stack.extend(orphans.iter().rev().map(|&i| (i, 0, true))),
    }
    while let Some((i, depth, orphan)) = stack.pop() {
        if std::mem::replace(&mut seen[i], true) {
            continue;
        }
        // The root's children are its own and the orphans, interleaved by start time.
        let mut next: Vec<(usize, bool)> = children[i].iter().map(|&k| (k, false)).collect();
        if Some(i) == root {
            next.extend(orphans.iter().map(|&k| (k, true)));
        }
        next.sort_by_key(|&(k, _)| (ns(spans[k].start), spans[k].span_id, k));
        let kids: Vec<&TreeSpan> = next.iter().map(|&(k, _)| &spans[k]).collect();
        rows.push(Row {
            idx: i,
            depth,
            orphan,
            self_ns: self_time(&spans[i], &kids),
        });
        stack.extend(next.into_iter().rev().map(|(k, o)| (k, depth + 1, o)));
    }

    let origin = match root {
        Some(r) => ns(spans[r].start),
        None => spans
            .iter()
            .map(|s| ns(s.start))
            .min()
            .unwrap_or(ns(first.start)),
    };
    let total = match root {
        Some(r) => len_ns(&spans[r]),
        None => (spans.iter().map(|s| ns(s.end)).max().unwrap_or(origin) - origin).max(0),
    };
    let slowest = if rows.len() >= 2 {
        rows.iter()
            .enumerate()
            .filter(|(_, r)| r.self_ns > 0)
            .max_by_key(|(pos, r)| (r.self_ns, std::cmp::Reverse(*pos)))
            .map(|(pos, _)| pos)
    } else {
        None
    };

    let mut out = Vec::with_capacity(rows.len().min(TREE_MAX_LINES) + 2);
    out.push(format!(
        "trace {}{}: {} span{}, {}, at {}",
        hex(&first.trace_id),
        end.note(),
        n,
        if n == 1 { "" } else { "s" },
        fmt_ms(total, false),
        rfc3339_millis(UNIX_EPOCH + Duration::from_nanos(u64::try_from(origin).unwrap_or(0))),
    ));
    let indent = |depth: usize| 2 + 2 * depth.min(MAX_INDENT_DEPTH);
    let width = rows
        .iter()
        .map(|r| indent(r.depth) + spans[r.idx].label.chars().count())
        .max()
        .unwrap_or(0)
        .min(MAX_LABEL_COLUMN);
    let shown = rows.len().min(TREE_MAX_LINES);
    for (pos, row) in rows.iter().enumerate().take(shown) {
        let s = &spans[row.idx];
        let mut line = String::with_capacity(128);
        let _ = write!(line, "{:pad$}{}", "", s.label, pad = indent(row.depth));
        let used = indent(row.depth) + s.label.chars().count();
        let _ = write!(
            line,
            "{:pad$}  {:>10}  {:>11}  self {:>10}",
            "",
            fmt_ms(len_ns(s), false),
            fmt_ms(ns(s.start) - origin, true),
            fmt_ms(row.self_ns, false),
            pad = width.saturating_sub(used),
        );
        if row.orphan {
            match s.parent_span_id {
                Some(p) => {
                    let _ = write!(line, "  [orphan: parent {} not seen]", hex(&p));
                }
                None => line.push_str("  [orphan]"),
            }
        }
        if s.error {
            line.push_str("  [error]");
        }
        if slowest == Some(pos) {
            line.push_str("  <- slowest");
        }
        out.push(line);
    }
    if rows.len() > shown {
        out.push(format!("  ... {} more spans not shown", rows.len() - shown));
    }
    out
}

/// The line for a span that finished after its trace was printed.
pub fn render_late(span: &TreeSpan, root_start: SystemTime) -> String {
    let mut line = format!(
        "trace {}: late span  {}  {}  {}",
        hex(&span.trace_id),
        span.label,
        fmt_ms(len_ns(span), false),
        fmt_ms(ns(span.start) - ns(root_start), true),
    );
    if let Some(p) = span.parent_span_id {
        let _ = write!(line, "  parent {}", hex(&p));
    }
    if span.error {
        line.push_str("  [error]");
    }
    line
}

/// What the trace buffer did, since start.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TreeCounters {
    /// Trees printed (complete or not).
    pub traces_printed: u64,
    /// Traces of one span, not drawn (see [`TREE_MIN_SPANS`]).
    pub single_span_traces: u64,
    /// Traces printed early, incomplete, because [`TREE_MAX_TRACES`] or [`TREE_MAX_SPANS`]
    /// was reached.
    pub evicted_full: u64,
    /// Traces printed incomplete because no root came within [`TREE_ROOT_WAIT`].
    pub evicted_no_root: u64,
    /// Spans in the traces of `evicted_full` and `evicted_no_root`.
    pub spans_evicted: u64,
    /// Traces printed incomplete because the agent stopped.
    pub flushed_at_stop: u64,
    /// Spans printed as late lines (they finished after their trace was printed).
    pub late_spans: u64,
}

#[derive(Debug)]
struct Pending {
    seq: u64,
    first_seen: Instant,
    spans: Vec<TreeSpan>,
    /// Set when a span with a remote parent finished: print at this time unless the real
    /// root (or the remote parent) shows up first.
    ready_at: Option<Instant>,
    /// Parent ids of the spans with a remote parent.
    remote_parents: HashSet<[u8; 8]>,
}

/// Per-trace span buffer. Not thread-safe by itself; the console writer thread owns it.
/// Every call returns the lines to print.
#[derive(Debug, Default)]
pub struct TraceBuffer {
    pending: HashMap<[u8; 16], Pending>,
    /// Pending traces by arrival (oldest first).
    order: BTreeMap<u64, [u8; 16]>,
    seq: u64,
    spans: usize,
    /// Printed traces: root start, and when printed.
    done: HashMap<[u8; 16], (SystemTime, Instant)>,
    done_order: VecDeque<([u8; 16], Instant)>,
    max_traces: usize,
    max_spans: usize,
    counters: TreeCounters,
}

impl TraceBuffer {
    pub fn new() -> Self {
        Self::with_limits(TREE_MAX_TRACES, TREE_MAX_SPANS)
    }

    pub fn with_limits(max_traces: usize, max_spans: usize) -> Self {
        Self {
            max_traces: max_traces.max(1),
            max_spans: max_spans.max(1),
            ..Self::default()
        }
    }

    pub fn counters(&self) -> TreeCounters {
        self.counters
    }

    /// Traces and spans held now.
    pub fn held(&self) -> (usize, usize) {
        (self.pending.len(), self.spans)
    }

    /// Takes one finished span.
    pub fn push(&mut self, span: TreeSpan, now: Instant) -> Vec<String> {
        let mut out = Vec::new();
        self.expire_done(now);
        if let Some(&(root_start, _)) = self.done.get(&span.trace_id) {
            self.counters.late_spans += 1;
            out.push(render_late(&span, root_start));
            return out;
        }
        let trace_id = span.trace_id;
        let is_root = span.parent_span_id.is_none();
        let remote_root = span.parent_is_remote && span.parent_span_id.is_some();
        let pending = match self.pending.get_mut(&trace_id) {
            Some(p) => p,
            None => {
                self.seq += 1;
                self.order.insert(self.seq, trace_id);
                self.pending.entry(trace_id).or_insert(Pending {
                    seq: self.seq,
                    first_seen: now,
                    spans: Vec::new(),
                    ready_at: None,
                    remote_parents: HashSet::default(),
                })
            }
        };
        // A remote parent that turns up (traced by us after all) restarts the wait, so its
        // own root can still arrive.
        if remote_root || pending.remote_parents.contains(&span.span_id) {
            pending.ready_at = Some(now + TREE_REMOTE_ROOT_GRACE);
        }
        if remote_root && let Some(parent) = span.parent_span_id {
            pending.remote_parents.insert(parent);
        }
        pending.spans.push(span);
        self.spans += 1;
        if is_root {
            out.extend(self.finish(&trace_id, TraceEnd::Root, now));
        }
        while self.pending.len() > self.max_traces || self.spans > self.max_spans {
            let Some((_, oldest)) = self.order.first_key_value().map(|(k, v)| (*k, *v)) else {
                break;
            };
            out.extend(self.finish(&oldest, TraceEnd::BufferFull, now));
        }
        out.extend(self.evict_aged(now));
        out
    }

    /// Prints traces whose remote-parent root has waited long enough and evicts traces whose
    /// root did not come within [`TREE_ROOT_WAIT`]. Call it periodically.
    pub fn tick(&mut self, now: Instant) -> Vec<String> {
        let mut out = Vec::new();
        let mut ready: Vec<(u64, [u8; 16])> = self
            .pending
            .iter()
            .filter(|(_, p)| p.ready_at.is_some_and(|t| t <= now))
            .map(|(id, p)| (p.seq, *id))
            .collect();
        ready.sort_unstable();
        for (_, id) in ready {
            out.extend(self.finish(&id, TraceEnd::Root, now));
        }
        out.extend(self.evict_aged(now));
        self.expire_done(now);
        out
    }

    /// Prints, incomplete, the traces whose root did not come within [`TREE_ROOT_WAIT`].
    fn evict_aged(&mut self, now: Instant) -> Vec<String> {
        let mut out = Vec::new();
        while let Some((_, oldest)) = self.order.first_key_value().map(|(k, v)| (*k, *v)) {
            let expired = self
                .pending
                .get(&oldest)
                .is_none_or(|p| now.saturating_duration_since(p.first_seen) >= TREE_ROOT_WAIT);
            if !expired {
                break;
            }
            out.extend(self.finish(&oldest, TraceEnd::NoRoot, now));
        }
        out
    }

    /// Prints every waiting trace as it is (the agent is stopping).
    pub fn drain_all(&mut self, now: Instant) -> Vec<String> {
        let mut out = Vec::new();
        while let Some((_, oldest)) = self.order.first_key_value().map(|(k, v)| (*k, *v)) {
            out.extend(self.finish(&oldest, TraceEnd::Stopping, now));
        }
        out
    }

    fn finish(&mut self, trace_id: &[u8; 16], end: TraceEnd, now: Instant) -> Vec<String> {
        let Some(p) = self.pending.remove(trace_id) else {
            // Only an index entry was left behind; drop it.
            self.order.retain(|_, id| id != trace_id);
            return Vec::new();
        };
        self.order.remove(&p.seq);
        self.spans = self.spans.saturating_sub(p.spans.len());
        let n = p.spans.len() as u64;
        match end {
            TraceEnd::Root => {}
            TraceEnd::BufferFull => {
                self.counters.evicted_full += 1;
                self.counters.spans_evicted += n;
            }
            TraceEnd::NoRoot => {
                self.counters.evicted_no_root += 1;
                self.counters.spans_evicted += n;
            }
            TraceEnd::Stopping => self.counters.flushed_at_stop += 1,
        }
        let drawn = p.spans.len() >= TREE_MIN_SPANS
            || matches!(end, TraceEnd::BufferFull | TraceEnd::NoRoot);
        let lines = if drawn {
            self.counters.traces_printed += 1;
            render_trace(&p.spans, end)
        } else {
            self.counters.single_span_traces += 1;
            Vec::new()
        };
        let root_start = p
            .spans
            .iter()
            .filter(|s| s.parent_span_id.is_none())
            .map(|s| s.start)
            .min()
            .or_else(|| p.spans.iter().map(|s| s.start).min())
            .unwrap_or(UNIX_EPOCH);
        self.done.insert(*trace_id, (root_start, now));
        self.done_order.push_back((*trace_id, now));
        self.expire_done(now);
        lines
    }

    fn expire_done(&mut self, now: Instant) {
        while let Some(&(id, at)) = self.done_order.front() {
            let old = now.saturating_duration_since(at) >= TREE_LATE_WINDOW;
            if !old && self.done_order.len() <= TREE_MAX_DONE {
                break;
            }
            self.done_order.pop_front();
            // Only forget the trace if this entry is its latest.
            if self.done.get(&id).is_some_and(|&(_, t)| t == at) {
                self.done.remove(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::span::model::{AttrValue, ProcessResource, SpanKind};

    const T: [u8; 16] = [0xab; 16];

    fn at_tenth_ms(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_795_628_401) + Duration::from_micros(ms * 100)
    }

    /// A span of trace `T`; times in tenths of a millisecond.
    fn fspan(id: u8, parent: Option<u8>, path: &str, start: u64, end: u64) -> FinishedSpan {
        FinishedSpan {
            trace_id: T,
            span_id: [id; 8],
            parent_span_id: parent.map(|p| [p; 8]),
            parent_is_remote: false,
            kind: if path.starts_with("/c/") {
                SpanKind::Client
            } else {
                SpanKind::Server
            },
            name: format!("GET {path}"),
            start: at_tenth_ms(start),
            end: at_tenth_ms(end),
            attributes: vec![
                ("http.request.method".into(), AttrValue::Str("GET".into())),
                ("url.path".into(), AttrValue::Str(path.into())),
                ("http.response.status_code".into(), AttrValue::Int(200)),
            ],
            links: Vec::new(),
            status: SpanStatus::Unset,
            resource: Arc::new(ProcessResource {
                service_name: "app".into(),
                pid: 1,
                executable_name: "python3".into(),
                host_name: "h".into(),
                container: None,
            }),
        }
    }

    fn ts(id: u8, parent: Option<u8>, path: &str, start: u64, end: u64) -> TreeSpan {
        TreeSpan::of(&fspan(id, parent, path, start, end))
    }

    /// Lines with runs of spaces collapsed, for stable comparisons.
    fn squeeze(lines: &[String]) -> Vec<String> {
        lines
            .iter()
            .map(|l| {
                let lead = l.len() - l.trim_start().len();
                format!(
                    "{}{}",
                    " ".repeat(lead),
                    l.split_whitespace().collect::<Vec<_>>().join(" ")
                )
            })
            .collect()
    }

    #[test]
    fn tree_orders_children_indents_and_marks_slowest() {
        // root 0..250 (25ms), children given out of order.
        let spans = vec![
            ts(3, Some(1), "/c/late", 150, 200),
            ts(2, Some(1), "/c/early", 10, 130),
            ts(4, Some(2), "/down", 20, 40),
            ts(1, None, "/chain", 0, 250),
        ];
        let lines = render_trace(&spans, TraceEnd::Root);
        assert_eq!(
            squeeze(&lines),
            vec![
                "trace abababababababababababababababab: 4 spans, 25.000ms, at 2026-11-25T17:40:01.000Z",
                "  SERVER app GET /chain 200 25.000ms +0.000ms self 8.000ms",
                "    CLIENT app GET /c/early 200 12.000ms +1.000ms self 10.000ms <- slowest",
                "      SERVER app GET /down 200 2.000ms +2.000ms self 2.000ms",
                "    CLIENT app GET /c/late 200 5.000ms +15.000ms self 5.000ms",
            ]
        );
        // The numbers line up in one column.
        let col = |l: &String| l.find("ms").unwrap_or(0);
        assert!(
            lines[1..].iter().all(|l| col(l) == col(&lines[1])),
            "{lines:#?}"
        );
        assert!(
            lines
                .iter()
                .all(|l| !l.starts_with(|c: char| c.is_ascii_digit()))
        );
    }

    #[test]
    fn overlapping_children_count_once_in_self_time() {
        let spans = vec![
            ts(1, None, "/r", 0, 100),
            ts(2, Some(1), "/c/a", 10, 60),
            ts(3, Some(1), "/c/b", 40, 90),
            // Sticks out past the parent's end: only the covered part counts.
            ts(4, Some(1), "/c/c", 95, 300),
        ];
        let lines = squeeze(&render_trace(&spans, TraceEnd::Root));
        assert!(lines[1].ends_with("self 1.500ms"), "{lines:#?}");
        assert!(lines[4].contains("+9.500ms"), "{lines:#?}");
    }

    #[test]
    fn orphans_go_under_the_root_with_a_marker() {
        let spans = vec![
            ts(1, None, "/r", 0, 100),
            ts(5, Some(9), "/lost", 30, 50),
            ts(6, Some(5), "/c/under-lost", 35, 45),
            ts(2, Some(1), "/c/a", 10, 20),
        ];
        let lines = squeeze(&render_trace(&spans, TraceEnd::Root));
        assert_eq!(lines.len(), 5, "{lines:#?}");
        assert!(
            lines[2].starts_with("    CLIENT app GET /c/a "),
            "{lines:#?}"
        );
        assert!(
            lines[3].starts_with("    SERVER app GET /lost ")
                && lines[3].contains("[orphan: parent 0909090909090909 not seen]"),
            "{lines:#?}"
        );
        assert!(
            lines[4].starts_with("      CLIENT app GET /c/under-lost "),
            "{lines:#?}"
        );
        assert!(!lines[4].contains("orphan"), "{lines:#?}");
        // The orphan covers part of the root's time.
        assert!(lines[1].contains("self 7.000ms"), "{lines:#?}");
    }

    #[test]
    fn cycles_and_duplicates_are_printed_once() {
        let spans = vec![
            ts(1, None, "/r", 0, 100),
            ts(7, Some(8), "/x", 10, 20),
            ts(8, Some(7), "/y", 15, 25),
            ts(9, Some(9), "/self", 30, 40),
            ts(1, None, "/dup", 50, 60),
        ];
        let lines = render_trace(&spans, TraceEnd::Root);
        assert_eq!(lines.len(), 1 + spans.len(), "{lines:#?}");
        for path in ["/r", "/x", "/y", "/self", "/dup"] {
            let hits = lines
                .iter()
                .filter(|l| l.contains(&format!("GET {path} ")))
                .count();
            assert_eq!(hits, 1, "{path}: {lines:#?}");
        }
    }

    #[test]
    fn incomplete_trace_without_root_and_hostile_times() {
        let mut spans = vec![
            ts(2, Some(1), "/c/a", 20, 30),
            ts(3, Some(1), "/c/b", 10, 15),
        ];
        spans[0].end = UNIX_EPOCH; // ends before it starts
        let lines = squeeze(&render_trace(&spans, TraceEnd::NoRoot));
        assert!(
            lines[0].contains("INCOMPLETE (no root span within 120s): 2 spans"),
            "{lines:#?}"
        );
        assert!(
            lines[1].starts_with("  CLIENT app GET /c/b ") && lines[1].contains("+0.000ms"),
            "{lines:#?}"
        );
        assert!(
            lines[1].contains("[orphan: parent 0101010101010101 not seen]"),
            "{lines:#?}"
        );
        assert!(lines[2].contains(" 0.000ms +1.000ms"), "{lines:#?}");
        assert!(render_trace(&[], TraceEnd::Root).is_empty());
        // A single span is never "the slowest".
        let one = render_trace(&[ts(1, None, "/r", 0, 10)], TraceEnd::Root);
        assert!(!one[1].contains("slowest"), "{one:#?}");
    }

    #[test]
    fn deep_and_long_traces_stay_bounded() {
        let mut spans: Vec<TreeSpan> = (0..=200u32)
            .map(|i| {
                let mut s = ts(0, None, "/d", u64::from(i), 1000 - u64::from(i));
                s.span_id = [
                    0,
                    0,
                    0,
                    0,
                    i.to_be_bytes()[0],
                    i.to_be_bytes()[1],
                    i.to_be_bytes()[2],
                    i.to_be_bytes()[3],
                ];
                s.parent_span_id = i.checked_sub(1).map(|p| {
                    let b = p.to_be_bytes();
                    [0, 0, 0, 0, b[0], b[1], b[2], b[3]]
                });
                s
            })
            .collect();
        let lines = render_trace(&spans, TraceEnd::Root);
        assert_eq!(lines.len(), 202);
        assert!(
            lines
                .iter()
                .all(|l| l.len() < 2 + 2 * MAX_INDENT_DEPTH + 200),
            "{}",
            lines[201]
        );
        let extra: Vec<TreeSpan> = (0..TREE_MAX_LINES as u32)
            .map(|i| {
                let mut s = ts(9, Some(0), "/w", 5, 6);
                s.span_id = [
                    1,
                    0,
                    0,
                    0,
                    i.to_be_bytes()[0],
                    i.to_be_bytes()[1],
                    i.to_be_bytes()[2],
                    i.to_be_bytes()[3],
                ];
                s
            })
            .collect();
        spans.extend(extra);
        let lines = render_trace(&spans, TraceEnd::Root);
        assert_eq!(lines.len(), 1 + TREE_MAX_LINES + 1);
        assert_eq!(lines[TREE_MAX_LINES + 1], "  ... 201 more spans not shown");
    }

    #[test]
    fn label_is_cut() {
        let long = format!("/{}", "x".repeat(500));
        let s = ts(1, None, &long, 0, 1);
        assert!(s.label.ends_with("...") && s.label.chars().count() == MAX_LABEL_CHARS + 3);
    }

    #[test]
    fn buffer_prints_when_the_root_arrives_then_late_lines() {
        let now = Instant::now();
        let mut b = TraceBuffer::new();
        assert!(b.push(ts(2, Some(1), "/c/a", 10, 20), now).is_empty());
        assert_eq!(b.held(), (1, 1));
        let lines = b.push(ts(1, None, "/r", 0, 100), now);
        assert_eq!(lines.len(), 3, "{lines:#?}");
        assert_eq!(b.held(), (0, 0));
        let late = b.push(ts(3, Some(1), "/c/late", 90, 120), now);
        assert_eq!(
            late,
            vec![
                "trace abababababababababababababababab: late span  CLIENT app GET /c/late 200  3.000ms  +9.000ms  parent 0101010101010101"
            ]
        );
        assert_eq!(b.held(), (0, 0));
        let c = b.counters();
        assert_eq!((c.traces_printed, c.late_spans, c.evicted_full), (1, 1, 0));
        // Past the late window the trace is forgotten: a new span starts a new buffer.
        assert!(
            b.push(ts(4, Some(1), "/c/later", 90, 120), now + TREE_LATE_WINDOW)
                .is_empty()
        );
        assert_eq!(b.held(), (1, 1));
    }

    fn in_trace(mut s: TreeSpan, t: u8) -> TreeSpan {
        s.trace_id = [t; 16];
        s
    }

    #[test]
    fn buffer_evicts_oldest_trace_when_full() {
        let now = Instant::now();
        let mut b = TraceBuffer::with_limits(2, 3);
        assert!(
            b.push(in_trace(ts(2, Some(1), "/c/a", 0, 1), 1), now)
                .is_empty()
        );
        assert!(
            b.push(in_trace(ts(2, Some(1), "/c/a", 0, 1), 2), now)
                .is_empty()
        );
        // A third trace: the first is printed, incomplete.
        let out = b.push(in_trace(ts(2, Some(1), "/c/a", 0, 1), 3), now);
        assert!(
            out[0].starts_with("trace 01010101") && out[0].contains("INCOMPLETE (evicted"),
            "{out:#?}"
        );
        assert_eq!(b.held(), (2, 2));
        // Span cap: two more spans of trace 3 push out trace 2.
        assert!(
            b.push(in_trace(ts(3, Some(1), "/c/b", 0, 1), 3), now)
                .is_empty()
        );
        let out = b.push(in_trace(ts(4, Some(1), "/c/c", 0, 1), 3), now);
        assert!(out[0].starts_with("trace 02020202"), "{out:#?}");
        assert_eq!(b.held(), (1, 3));
        // One trace larger than the span cap evicts itself.
        let out = b.push(in_trace(ts(5, Some(1), "/c/d", 0, 1), 3), now);
        assert!(
            out[0].starts_with("trace 03030303") && out[0].contains(": 4 spans"),
            "{out:#?}"
        );
        assert_eq!(b.held(), (0, 0));
        let c = b.counters();
        assert_eq!(
            (c.evicted_full, c.spans_evicted, c.traces_printed),
            (3, 6, 3)
        );
        // A span of an evicted trace is a late line now, not a new buffer.
        assert!(b.push(in_trace(ts(1, None, "/r", 0, 1), 3), now)[0].contains("late span"));
    }

    #[test]
    fn buffer_evicts_traces_without_root_by_age() {
        let now = Instant::now();
        let mut b = TraceBuffer::new();
        b.push(in_trace(ts(2, Some(1), "/c/a", 0, 1), 1), now);
        b.push(
            in_trace(ts(2, Some(1), "/c/a", 0, 1), 2),
            now + TREE_ROOT_WAIT / 3,
        );
        assert!(
            b.tick(now + TREE_ROOT_WAIT - Duration::from_millis(1))
                .is_empty()
        );
        let out = b.tick(now + TREE_ROOT_WAIT);
        assert_eq!(out.len(), 2, "{out:#?}");
        assert!(
            out[0].starts_with("trace 01010101") && out[0].contains("no root"),
            "{out:#?}"
        );
        assert_eq!(b.held(), (1, 1));
        // Also evicted by age on a new span, without a tick.
        let out = b.push(
            in_trace(ts(2, Some(1), "/c/a", 0, 1), 3),
            now + TREE_ROOT_WAIT + Duration::from_secs(41),
        );
        assert!(out[0].starts_with("trace 02020202"), "{out:#?}");
        assert_eq!(b.counters().evicted_no_root, 2);
        b.push(
            in_trace(ts(3, Some(1), "/c/b", 0, 1), 3),
            now + TREE_ROOT_WAIT + Duration::from_secs(41),
        );
        // A single-span trace at shutdown is not drawn (its span line says it all).
        b.push(
            in_trace(ts(2, Some(1), "/c/a", 0, 1), 4),
            now + TREE_ROOT_WAIT + Duration::from_secs(41),
        );
        let out = b.drain_all(now + TREE_ROOT_WAIT + Duration::from_secs(42));
        assert_eq!(out.len(), 3, "{out:#?}");
        assert!(
            out[0].starts_with("trace 03030303") && out[0].contains("INCOMPLETE (agent stopping"),
            "{out:#?}"
        );
        assert_eq!(b.held(), (0, 0));
        let c = b.counters();
        assert_eq!((c.flushed_at_stop, c.single_span_traces), (2, 1));
    }

    #[test]
    fn bounds_hold_under_a_flood_of_rootless_traces() {
        let now = Instant::now();
        let mut b = TraceBuffer::new();
        let mut printed = 0usize;
        for i in 0..(3 * TREE_MAX_SPANS) as u32 {
            let mut s = ts(2, Some(1), "/c/a", 0, 1);
            let t = (i % (2 * TREE_MAX_TRACES as u32)).to_be_bytes();
            s.trace_id[..4].copy_from_slice(&t);
            s.span_id[..4].copy_from_slice(&i.to_be_bytes());
            printed += b.push(s, now).len();
            let (traces, spans) = b.held();
            assert!(traces <= TREE_MAX_TRACES && spans <= TREE_MAX_SPANS);
        }
        let c = b.counters();
        assert!(c.evicted_full > 0 && printed > 0);
        // Every span is either held, in an evicted tree, or a late line.
        assert_eq!(
            b.held().1 as u64 + c.spans_evicted + c.late_spans,
            3 * TREE_MAX_SPANS as u64
        );
    }

    #[test]
    fn remote_parent_root_waits_for_a_traced_parent() {
        let now = Instant::now();
        let mut b = TraceBuffer::new();
        let mut callback = ts(3, Some(2), "/inner", 20, 40);
        callback.parent_is_remote = true;
        assert!(b.push(callback.clone(), now).is_empty());
        // The remote parent is one of ours after all: keep waiting for the real root.
        assert!(
            b.push(
                ts(2, Some(1), "/c/daemon", 10, 50),
                now + Duration::from_secs(1)
            )
            .is_empty()
        );
        assert!(b.tick(now + TREE_REMOTE_ROOT_GRACE).is_empty());
        let out = b.push(ts(1, None, "/r", 0, 100), now + Duration::from_secs(2));
        let out = squeeze(&out);
        assert_eq!(out.len(), 4, "{out:#?}");
        assert!(
            out[3].starts_with("      SERVER app GET /inner "),
            "{out:#?}"
        );

        // A remote parent that never shows up: the span is the root after the grace time.
        let mut b = TraceBuffer::new();
        assert!(b.push(callback, now).is_empty());
        assert!(b.push(ts(4, Some(3), "/c/x", 25, 30), now).is_empty());
        assert!(
            b.tick(now + TREE_REMOTE_ROOT_GRACE - Duration::from_millis(1))
                .is_empty()
        );
        let out = squeeze(&b.tick(now + TREE_REMOTE_ROOT_GRACE));
        assert!(!out[0].contains("INCOMPLETE"), "{out:#?}");
        assert!(
            out[1].starts_with("  SERVER app GET /inner ") && !out[1].contains("orphan"),
            "{out:#?}"
        );
        assert!(out[2].starts_with("    CLIENT app GET /c/x "), "{out:#?}");
    }
}
