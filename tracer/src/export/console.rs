//! Console exporter: one human-readable line per finished span on stdout, and each finished
//! trace as an indented tree with per-hop durations (see [`super::console_tree`]).

use std::{
    fmt::Write as _,
    io::{self, Write},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use thiserror::Error;

use super::console_tree::{TraceBuffer, TreeCounters, TreeSpan};
use crate::span::model::{AttrValue, FinishedSpan, SpanKind, SpanStatus, hex};

/// Lines waiting for the writer thread. Stdout can be a slow pipe; beyond this many the agent
/// drops lines instead of stalling its event loop.
pub const CONSOLE_QUEUE: usize = 8192;

/// Longest error description printed; the line must stay readable.
const MAX_ERROR_CHARS: usize = 200;

/// Errors of the console sink.
#[derive(Debug, Error)]
pub enum ConsoleError {
    #[error("cannot spawn the console writer thread")]
    Spawn(#[source] io::Error),
}

/// Formats `span` as one line (no trailing newline):
///
/// `2026-11-25T17:40:01.123Z SERVER app GET /hello 200 12.345ms trace=.. span=.. parent=.. pid=1234 peer=..`
///
/// The timestamp is the span start. Method and path fall back to the two words of the span
/// name when the span has no `http.request.method` (`plugin invoke_tool`), status to `-`.
/// Plugin sessions carry `session=`. `peer=` is `server.address:server.port` for
/// CLIENT spans and `client.address:client.port` for SERVER spans, when known; `error=` follows
/// when the span status is an error.
pub fn format_span_line(span: &FinishedSpan) -> String {
    let mut line = String::with_capacity(192);
    line.push_str(&rfc3339_millis(span.start));
    line.push(' ');
    push_head(&mut line, span);
    let micros = span
        .end
        .duration_since(span.start)
        .unwrap_or(Duration::ZERO)
        .as_micros();
    let _ = write!(
        line,
        " {}.{:03}ms trace={} span={} parent={} pid={}",
        micros / 1000,
        micros % 1000,
        hex(&span.trace_id),
        hex(&span.span_id),
        span.parent_span_id
            .map(|p| hex(&p))
            .unwrap_or_else(|| "-".to_string()),
        span.resource.pid,
    );
    if let Some(peer) = peer(span) {
        line.push_str(" peer=");
        push_token(&mut line, &peer);
    }
    if let Some(container) = &span.resource.container {
        line.push_str(" container=");
        push_token(&mut line, container_label(container));
    }
    if let Some(session) = span.attr("dify.plugin.session_id") {
        line.push_str(" session=");
        push_token(&mut line, &attr_text(session));
    }
    if let SpanStatus::Error(description) = &span.status {
        // Quoted and escaped because descriptions are free text that may hold spaces.
        let short: String = description.chars().take(MAX_ERROR_CHARS).collect();
        let _ = write!(line, " error=\"{}\"", short.escape_debug());
    }
    line
}

/// A container's name, else its short id, else (a plain cgroup) its cgroup path.
fn container_label(c: &crate::span::model::ContainerIdentity) -> &str {
    if let Some(k8s) = &c.k8s {
        return &k8s.pod_name;
    }
    match &c.name {
        Some(name) => name,
        None if !c.id.is_empty() => c.id.get(..12).unwrap_or(&c.id),
        None => &c.cgroup_path,
    }
}

/// `SERVER app GET /hello 200`: kind, service, method and path (or the two words of the
/// name), status; the part of the span line that names the span. Also the tree label.
pub(crate) fn span_head(span: &FinishedSpan) -> String {
    let mut head = String::with_capacity(96);
    push_head(&mut head, span);
    head
}

fn push_head(line: &mut String, span: &FinishedSpan) {
    line.push_str(match span.kind {
        SpanKind::Server => "SERVER",
        SpanKind::Client => "CLIENT",
        SpanKind::Internal => "INTERNAL",
    });
    line.push(' ');
    push_token(line, &span.resource.service_name);
    line.push(' ');
    match span
        .attr("http.request.method")
        .filter(|_| span.attr("rpc.system").is_none())
    {
        Some(method) => {
            push_token(line, &attr_text(method));
            line.push(' ');
            match span.attr("url.path") {
                Some(path) => push_token(line, &attr_text(path)),
                None => line.push('-'),
            }
        }
        None if span.attr("rpc.system").is_some() => {
            // `grpc pkg.Service/Method`.
            push_token(
                line,
                &span.attr("rpc.system").map(attr_text).unwrap_or_default(),
            );
            line.push(' ');
            push_token(line, &span.name);
        }
        None => {
            // Other spans are named `<system> <operation>` (e.g. `plugin invoke_tool`): two
            // tokens, like method and path.
            let mut words = span.name.splitn(2, ' ');
            push_token(line, words.next().unwrap_or("-"));
            line.push(' ');
            match words.next() {
                Some(rest) => push_token(line, rest),
                None => line.push('-'),
            }
        }
    }
    line.push(' ');
    let status = match span.attr("rpc.system") {
        Some(_) => span.attr("rpc.grpc.status_code"),
        None => span.attr("http.response.status_code"),
    };
    match status {
        Some(status) => push_token(line, &attr_text(status)),
        None => line.push('-'),
    }
}

/// The other end of the request, as `address:port`.
fn peer(span: &FinishedSpan) -> Option<String> {
    let (addr_key, port_key) = match span.kind {
        SpanKind::Client => ("server.address", "server.port"),
        SpanKind::Server => ("client.address", "client.port"),
        SpanKind::Internal => return None,
    };
    let addr = attr_text(span.attr(addr_key)?);
    let Some(port) = span.attr(port_key) else {
        return Some(addr);
    };
    // Bracketed so the port separator stays unambiguous for IPv6 addresses.
    if addr.contains(':') && !addr.starts_with('[') {
        Some(format!("[{addr}]:{}", attr_text(port)))
    } else {
        Some(format!("{addr}:{}", attr_text(port)))
    }
}

fn attr_text(value: &AttrValue) -> String {
    match value {
        AttrValue::Str(s) => s.clone(),
        AttrValue::Int(i) => i.to_string(),
        AttrValue::Bool(b) => b.to_string(),
        AttrValue::F64(f) => f.to_string(),
        AttrValue::StrList(l) => format!("[{}]", l.join(",")),
    }
}

/// Appends `text` as one whitespace-free token. The values come from traced traffic, so
/// whitespace and control characters are percent-escaped to keep one span per line and the
/// columns splittable on spaces. Empty values print as `-`.
fn push_token(line: &mut String, text: &str) {
    if text.is_empty() {
        line.push('-');
        return;
    }
    for c in text.chars() {
        if c.is_whitespace() || c.is_control() {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                let _ = write!(line, "%{b:02X}");
            }
        } else {
            line.push(c);
        }
    }
}

/// `YYYY-MM-DDThh:mm:ss.mmmZ` in UTC; times before the epoch print as the epoch.
pub(crate) fn rfc3339_millis(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = since.as_secs();
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's `civil_from_days`),
/// so the console needs no date crate.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// One queued item: a span line and, for the trace tree, what the tree needs of the span.
#[derive(Debug)]
struct Queued {
    line: String,
    tree: Option<TreeSpan>,
}

/// What the console tree did (see [`TreeCounters`]), plus tree lines that could not be
/// written. Shared with the writer thread.
#[derive(Debug, Default)]
struct TreeStats {
    traces_printed: AtomicU64,
    single_span_traces: AtomicU64,
    evicted_full: AtomicU64,
    evicted_no_root: AtomicU64,
    spans_evicted: AtomicU64,
    flushed_at_stop: AtomicU64,
    late_spans: AtomicU64,
    /// Traces and spans held now, waiting for their root.
    traces_held: AtomicU64,
    spans_held: AtomicU64,
    lines_failed: AtomicU64,
}

impl TreeStats {
    fn publish(&self, buffer: &TraceBuffer) {
        let c = buffer.counters();
        let (traces, spans) = buffer.held();
        for (cell, v) in [
            (&self.traces_printed, c.traces_printed),
            (&self.single_span_traces, c.single_span_traces),
            (&self.evicted_full, c.evicted_full),
            (&self.evicted_no_root, c.evicted_no_root),
            (&self.spans_evicted, c.spans_evicted),
            (&self.flushed_at_stop, c.flushed_at_stop),
            (&self.late_spans, c.late_spans),
            (&self.traces_held, traces as u64),
            (&self.spans_held, spans as u64),
        ] {
            cell.store(v, Ordering::Relaxed);
        }
    }
}

/// Counters of the console trace trees.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConsoleTreeStats {
    pub(crate) counters: TreeCounters,
    pub(crate) traces_held: u64,
    pub(crate) spans_held: u64,
    /// Tree lines that could not be written (stdout closed).
    pub(crate) lines_failed: u64,
}

/// Writes formatted lines to stdout from its own thread, so a slow or stuck reader of stdout
/// never blocks the agent. The same thread keeps the per-trace buffer of the trace trees
/// ([`TraceBuffer`]) and wakes every [`TREE_TICK`] to print or evict what waited long enough.
#[derive(Debug)]
pub(crate) struct ConsoleSink {
    /// None once shut down; dropping the sender is what tells the writer to finish.
    tx: Mutex<Option<SyncSender<Queued>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    written: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    tree: Arc<TreeStats>,
}

/// How often the writer thread looks for traces to print or evict when no span arrives.
pub const TREE_TICK: Duration = Duration::from_millis(250);

impl ConsoleSink {
    pub(crate) fn stdout() -> Result<Self, ConsoleError> {
        Self::with_writer(|| io::stdout().lock())
    }

    /// `open` runs on the writer thread for every burst of lines: holding the stdout lock only
    /// while writing leaves it free for anyone else who prints (e.g. a log subscriber).
    fn with_writer<W, F>(open: F) -> Result<Self, ConsoleError>
    where
        W: Write,
        F: Fn() -> W + Send + 'static,
    {
        let (tx, rx) = mpsc::sync_channel::<Queued>(CONSOLE_QUEUE);
        let written = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let tree = Arc::new(TreeStats::default());
        let writer = thread::Builder::new()
            .name("difytrace-console".into())
            .spawn({
                let written = Arc::clone(&written);
                let failed = Arc::clone(&failed);
                let tree = Arc::clone(&tree);
                move || write_lines(&rx, open, &written, &failed, &tree)
            })
            .map_err(ConsoleError::Spawn)?;
        Ok(Self {
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            written,
            failed,
            tree,
        })
    }

    /// Queues the line of `span` and hands the span to the trace tree; false when dropped.
    pub(crate) fn send_span(&self, span: &FinishedSpan) -> bool {
        self.queue(Queued {
            line: format_span_line(span),
            tree: Some(TreeSpan::of(span)),
        })
    }

    /// Queues one line (no tree); false when it was dropped.
    #[cfg(test)]
    pub(crate) fn send(&self, line: String) -> bool {
        self.queue(Queued { line, tree: None })
    }

    fn queue(&self, item: Queued) -> bool {
        let tx = self.tx.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(tx) = tx.as_ref() else {
            return false;
        };
        match tx.try_send(item) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
        }
    }

    /// Span lines written to stdout (tree lines are not counted).
    pub(crate) fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Span lines that were queued but could not be written (stdout closed).
    pub(crate) fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Counters of the trace trees, as of the writer's last batch.
    pub(crate) fn tree_stats(&self) -> ConsoleTreeStats {
        let t = &self.tree;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ConsoleTreeStats {
            counters: TreeCounters {
                traces_printed: get(&t.traces_printed),
                single_span_traces: get(&t.single_span_traces),
                evicted_full: get(&t.evicted_full),
                evicted_no_root: get(&t.evicted_no_root),
                spans_evicted: get(&t.spans_evicted),
                flushed_at_stop: get(&t.flushed_at_stop),
                late_spans: get(&t.late_spans),
            },
            traces_held: get(&t.traces_held),
            spans_held: get(&t.spans_held),
            lines_failed: get(&t.lines_failed),
        }
    }

    /// Writes out what is queued, waiting at most until `deadline`. Traces still waiting for
    /// their root are printed as they are (marked incomplete).
    pub(crate) fn shutdown(&self, deadline: Instant) {
        // Closing the channel ends the writer once it has drained the queue.
        self.tx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(writer) = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            return;
        };
        while !writer.is_finished() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        if writer.is_finished() {
            if writer.join().is_err() {
                tracing::warn!("console writer thread panicked");
            }
        } else {
            tracing::warn!("console output not drained before the shutdown deadline");
        }
    }
}

/// How long the writer waits after the first line of a burst before writing it out.
const BATCH_GATHER: Duration = Duration::from_millis(2);

/// A line to write: a span line (counted in `written`/`failed`) or a tree line.
struct OutLine {
    text: String,
    span: bool,
}

/// The stdout side of the writer thread.
struct Output<'a, W: Write, F: Fn() -> W> {
    open: F,
    written: &'a AtomicU64,
    failed: &'a AtomicU64,
    tree: &'a TreeStats,
    broken: bool,
}

impl<W: Write, F: Fn() -> W> Output<'_, W, F> {
    fn fail(&self, span_lines: u64, tree_lines: u64) {
        self.failed.fetch_add(span_lines, Ordering::Relaxed);
        self.tree
            .lines_failed
            .fetch_add(tree_lines, Ordering::Relaxed);
    }

    /// Writes a batch, one flush at the end.
    fn write(&mut self, lines: Vec<OutLine>) {
        if lines.is_empty() {
            return;
        }
        let count = |ls: &[OutLine]| {
            let spans = ls.iter().filter(|l| l.span).count() as u64;
            (spans, ls.len() as u64 - spans)
        };
        if self.broken {
            let (s, t) = count(&lines);
            self.fail(s, t);
            return;
        }
        let mut out = io::BufWriter::new((self.open)());
        let (mut pending_spans, mut pending_tree) = (0u64, 0u64);
        for (pos, line) in lines.iter().enumerate() {
            let res = out
                .write_all(line.text.as_bytes())
                .and_then(|()| out.write_all(b"\n"));
            if let Err(e) = res {
                // Typically EPIPE: nobody reads stdout any more. Keep draining so the
                // senders never block, and count instead of retrying forever.
                tracing::warn!(error = %e, "stdout is not writable; console output stops");
                let (s, t) = count(&lines[pos..]);
                self.fail(pending_spans + s, pending_tree + t);
                self.broken = true;
                return;
            }
            if line.span {
                pending_spans += 1;
            } else {
                pending_tree += 1;
            }
        }
        // One flush per drained batch: whoever reads the pipe still sees every span as soon
        // as the queue is empty, without a write syscall per line under load.
        match out.flush() {
            Ok(()) => {
                self.written.fetch_add(pending_spans, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!(error = %e, "stdout is not writable; console output stops");
                self.fail(pending_spans, pending_tree);
                self.broken = true;
            }
        }
    }
}

fn tree_lines(lines: Vec<String>) -> impl Iterator<Item = OutLine> {
    lines.into_iter().map(|text| OutLine { text, span: false })
}

fn write_lines<W: Write>(
    rx: &Receiver<Queued>,
    open: impl Fn() -> W,
    written: &AtomicU64,
    failed: &AtomicU64,
    tree: &TreeStats,
) {
    let mut out = Output {
        open,
        written,
        failed,
        tree,
        broken: false,
    };
    let mut buffer = TraceBuffer::new();
    loop {
        let mut next = match rx.recv_timeout(TREE_TICK) {
            Ok(first) => {
                // Spans arrive in bursts (one per ring buffer drain); waiting a moment lets a
                // burst gather so the thread wakes once per burst, not once per span.
                thread::sleep(BATCH_GATHER);
                Some(first)
            }
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let mut batch = Vec::new();
        while let Some(item) = next {
            batch.push(OutLine {
                text: item.line,
                span: true,
            });
            if let Some(span) = item.tree {
                batch.extend(tree_lines(buffer.push(span, Instant::now())));
            }
            next = rx.try_recv().ok();
        }
        batch.extend(tree_lines(buffer.tick(Instant::now())));
        out.write(batch);
        tree.publish(&buffer);
    }
    out.write(tree_lines(buffer.drain_all(Instant::now())).collect());
    tree.publish(&buffer);
    let c = buffer.counters();
    let lost = tree.lines_failed.load(Ordering::Relaxed);
    if c.evicted_full + c.evicted_no_root + lost > 0 {
        tracing::info!(
            evicted_full = c.evicted_full,
            evicted_no_root = c.evicted_no_root,
            spans_evicted = c.spans_evicted,
            lines_failed = lost,
            "console trace trees printed incomplete because of their bounds"
        );
    }
    tracing::debug!(
        traces_printed = c.traces_printed,
        evicted_full = c.evicted_full,
        evicted_no_root = c.evicted_no_root,
        spans_evicted = c.spans_evicted,
        flushed_at_stop = c.flushed_at_stop,
        late_spans = c.late_spans,
        "console trace trees stopped"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::span::model::{ProcessResource, SpanLink};

    fn at(secs: u64, micros: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros)
    }

    fn span(kind: SpanKind, attrs: Vec<(&str, AttrValue)>) -> FinishedSpan {
        FinishedSpan {
            trace_id: [
                0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e,
                0x47, 0x36,
            ],
            span_id: [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7],
            parent_span_id: Some([1, 2, 3, 4, 5, 6, 7, 8]),
            parent_is_remote: false,
            kind,
            name: "GET /hello".into(),
            start: at(1_795_628_401, 123_456),
            end: at(1_795_628_401, 135_801),
            attributes: attrs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            links: Vec::<SpanLink>::new(),
            status: SpanStatus::Unset,
            resource: Arc::new(ProcessResource {
                service_name: "app".into(),
                pid: 1234,
                executable_name: "python3".into(),
                host_name: "node-1".into(),
                container: None,
            }),
        }
    }

    fn s(v: &str) -> AttrValue {
        AttrValue::Str(v.into())
    }

    #[test]
    fn server_line() {
        let span = span(
            SpanKind::Server,
            vec![
                ("http.request.method", s("GET")),
                ("url.path", s("/hello")),
                ("http.response.status_code", AttrValue::Int(200)),
            ],
        );
        assert_eq!(
            format_span_line(&span),
            "2026-11-25T17:40:01.123Z SERVER app GET /hello 200 12.345ms \
             trace=4bf92f3577b34da6a3ce929d0e0e4736 span=00f067aa0ba902b7 \
             parent=0102030405060708 pid=1234"
        );
    }

    #[test]
    fn client_line_with_peer_and_no_parent() {
        let mut span = span(
            SpanKind::Client,
            vec![
                ("http.request.method", s("POST")),
                ("url.path", s("/plugin/t1/dispatch/tool/invoke")),
                ("http.response.status_code", AttrValue::Int(500)),
                ("server.address", s("10.0.0.5")),
                ("server.port", AttrValue::Int(5002)),
            ],
        );
        span.parent_span_id = None;
        span.status = SpanStatus::Error("killed by \"timeout\"\n".into());
        let line = format_span_line(&span);
        assert!(
            line.starts_with(
                "2026-11-25T17:40:01.123Z CLIENT app POST /plugin/t1/dispatch/tool/invoke 500 "
            ),
            "{line}"
        );
        assert!(
            line.ends_with(
                " parent=- pid=1234 peer=10.0.0.5:5002 error=\"killed by \\\"timeout\\\"\\n\""
            ),
            "{line}"
        );
    }

    #[test]
    fn ipv6_peer_is_bracketed_and_server_peer_is_the_client() {
        let client = span(
            SpanKind::Client,
            vec![
                ("server.address", s("::1")),
                ("server.port", AttrValue::Int(80)),
            ],
        );
        assert!(format_span_line(&client).ends_with(" peer=[::1]:80"));
        let server = span(
            SpanKind::Server,
            vec![
                ("client.address", s("10.1.1.1")),
                ("server.address", s("x")),
            ],
        );
        assert!(format_span_line(&server).ends_with(" peer=10.1.1.1"));
    }

    #[test]
    fn falls_back_to_name_and_dashes() {
        let mut span = span(SpanKind::Internal, vec![("server.address", s("10.0.0.5"))]);
        span.name = "plugin invoke".into();
        span.resource = Arc::new(ProcessResource {
            service_name: String::new(),
            ..(*span.resource).clone()
        });
        let line = format_span_line(&span);
        assert!(
            line.starts_with("2026-11-25T17:40:01.123Z INTERNAL - plugin invoke - 12.345ms "),
            "{line}"
        );
        assert!(!line.contains("peer="), "{line}");
        span.name = "single".into();
        span.attributes
            .push(("dify.plugin.session_id".into(), s("s 1")));
        let line = format_span_line(&span);
        assert!(line.contains(" - single - - 12.345ms "), "{line}");
        assert!(line.contains(" session=s%201"), "{line}");
    }

    #[test]
    fn hostile_values_stay_on_one_line() {
        let span = span(
            SpanKind::Server,
            vec![
                ("http.request.method", s("GET")),
                ("url.path", s("/a b\r\nX: y\t\u{1b}[31m")),
                ("http.response.status_code", AttrValue::Int(200)),
            ],
        );
        let line = format_span_line(&span);
        assert!(
            line.contains(" /a%20b%0D%0AX:%20y%09%1B[31m 200 "),
            "{line}"
        );
        assert!(!line.chars().any(char::is_control), "{line}");
    }

    #[test]
    fn grpc_status_and_end_before_start() {
        let mut span = span(
            SpanKind::Client,
            vec![
                ("http.request.method", s("POST")),
                ("url.path", s("/pkg.Svc/Call")),
                ("http.response.status_code", AttrValue::Int(200)),
                ("rpc.system", s("grpc")),
                ("rpc.grpc.status_code", AttrValue::Int(14)),
            ],
        );
        span.name = "pkg.Svc/Call".into();
        span.end = span.start - Duration::from_secs(1);
        let line = format_span_line(&span);
        assert!(line.contains(" grpc pkg.Svc/Call 14 0.000ms "), "{line}");
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339_millis(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339_millis(at(951_868_799, 999_999)),
            "2000-02-29T23:59:59.999Z"
        );
        assert_eq!(
            rfc3339_millis(UNIX_EPOCH - Duration::from_secs(5)),
            "1970-01-01T00:00:00.000Z"
        );
    }

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| io::Error::other("poisoned"))?
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn sink_writes_every_queued_line_before_shutdown_returns() {
        let out = Shared::default();
        let sink = ConsoleSink::with_writer({
            let out = out.clone();
            move || out.clone()
        })
        .expect("spawn writer");
        for i in 0..100 {
            assert!(sink.send(format!("line {i}")));
        }
        sink.shutdown(Instant::now() + Duration::from_secs(5));
        assert!(!sink.send("late".into()));
        let text = String::from_utf8(out.0.lock().expect("lock").clone()).expect("utf8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 100);
        assert_eq!(lines[99], "line 99");
        assert_eq!(sink.written(), 100);
        assert_eq!(sink.failed(), 0);
    }

    #[test]
    fn sink_prints_the_tree_when_the_root_arrives_and_leftovers_at_shutdown() {
        let out = Shared::default();
        let sink = ConsoleSink::with_writer({
            let out = out.clone();
            move || out.clone()
        })
        .expect("spawn writer");
        let path = |p: &str| vec![("http.request.method", s("GET")), ("url.path", s(p))];
        let mut child = span(SpanKind::Client, path("/down"));
        child.span_id = [9; 8];
        child.parent_span_id = Some([7; 8]);
        let mut root = span(SpanKind::Server, path("/chain"));
        root.span_id = [7; 8];
        root.parent_span_id = None;
        root.start = child.start - Duration::from_millis(1);
        root.end = child.end + Duration::from_millis(1);
        let mut other = span(SpanKind::Server, path("/other"));
        other.trace_id = [5; 16];
        assert!(sink.send_span(&child));
        assert!(sink.send_span(&root));
        assert!(sink.send_span(&other));
        sink.shutdown(Instant::now() + Duration::from_secs(5));
        let text = String::from_utf8(out.0.lock().expect("lock").clone()).expect("utf8");
        let lines: Vec<&str> = text.lines().collect();
        // The single-span trace left at shutdown is not drawn.
        assert_eq!(lines.len(), 3 + 3, "{text}");
        assert!(lines[0].contains(" CLIENT app GET /down - "), "{text}");
        assert!(lines[1].contains(" SERVER app GET /chain - "), "{text}");
        assert!(
            lines[2].starts_with("trace 4bf92f3577b34da6a3ce929d0e0e4736: 2 spans, 14.345ms"),
            "{text}"
        );
        assert!(lines[3].starts_with("  SERVER app GET /chain -"), "{text}");
        assert!(lines[4].starts_with("    CLIENT app GET /down -"), "{text}");
        assert!(lines[4].ends_with("<- slowest"), "{text}");
        assert!(lines[5].contains(" SERVER app GET /other - "), "{text}");
        // Only span lines count as exported spans.
        assert_eq!(sink.written(), 3);
        let t = sink.tree_stats();
        assert_eq!(t.counters.traces_printed, 1);
        assert_eq!(t.counters.single_span_traces, 1);
        assert_eq!(t.counters.flushed_at_stop, 1);
        assert_eq!((t.traces_held, t.spans_held, t.lines_failed), (0, 0, 0));
    }

    #[test]
    fn shows_the_container_by_name_else_short_id() {
        use crate::span::model::ContainerIdentity;
        let with = |c: ContainerIdentity| {
            let mut span = span(SpanKind::Server, vec![]);
            span.resource = Arc::new(ProcessResource {
                container: Some(Arc::new(c)),
                ..(*span.resource).clone()
            });
            format_span_line(&span)
        };
        let id = "5d2e1e6a0f4b".repeat(5) + "abcd";
        let named = with(ContainerIdentity {
            id: id.clone(),
            name: Some("api".into()),
            ..Default::default()
        });
        assert!(named.ends_with(" container=api"), "{named}");
        let bare = with(ContainerIdentity {
            id,
            ..Default::default()
        });
        assert!(bare.ends_with(" container=5d2e1e6a0f4b"), "{bare}");
        let plain = with(ContainerIdentity {
            cgroup_path: "/my.slice/x".into(),
            ..Default::default()
        });
        assert!(plain.ends_with(" container=/my.slice/x"), "{plain}");
    }
}
