//! Console exporter: one human-readable line per finished span on stdout.

use std::{
    fmt::Write as _,
    io::{self, Write},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
        mpsc::{self, Receiver, SyncSender, TrySendError},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use thiserror::Error;

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
    line.push_str(match span.kind {
        SpanKind::Server => "SERVER",
        SpanKind::Client => "CLIENT",
        SpanKind::Internal => "INTERNAL",
    });
    line.push(' ');
    push_token(&mut line, &span.resource.service_name);
    line.push(' ');
    match span
        .attr("http.request.method")
        .filter(|_| span.attr("rpc.system").is_none())
    {
        Some(method) => {
            push_token(&mut line, &attr_text(method));
            line.push(' ');
            match span.attr("url.path") {
                Some(path) => push_token(&mut line, &attr_text(path)),
                None => line.push('-'),
            }
        }
        None if span.attr("rpc.system").is_some() => {
            // `grpc pkg.Service/Method`.
            push_token(
                &mut line,
                &span.attr("rpc.system").map(attr_text).unwrap_or_default(),
            );
            line.push(' ');
            push_token(&mut line, &span.name);
        }
        None => {
            // Other spans are named `<system> <operation>` (e.g. `plugin invoke_tool`): two
            // tokens, like method and path.
            let mut words = span.name.splitn(2, ' ');
            push_token(&mut line, words.next().unwrap_or("-"));
            line.push(' ');
            match words.next() {
                Some(rest) => push_token(&mut line, rest),
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
        Some(status) => push_token(&mut line, &attr_text(status)),
        None => line.push('-'),
    }
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

/// Writes formatted lines to stdout from its own thread, so a slow or stuck reader of stdout
/// never blocks the agent.
#[derive(Debug)]
pub(crate) struct ConsoleSink {
    /// None once shut down; dropping the sender is what tells the writer to finish.
    tx: Mutex<Option<SyncSender<String>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    written: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
}

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
        let (tx, rx) = mpsc::sync_channel::<String>(CONSOLE_QUEUE);
        let written = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let writer = thread::Builder::new()
            .name("difytrace-console".into())
            .spawn({
                let written = Arc::clone(&written);
                let failed = Arc::clone(&failed);
                move || write_lines(&rx, open, &written, &failed)
            })
            .map_err(ConsoleError::Spawn)?;
        Ok(Self {
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            written,
            failed,
        })
    }

    /// Queues one line; false when it was dropped.
    pub(crate) fn send(&self, line: String) -> bool {
        let tx = self.tx.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(tx) = tx.as_ref() else {
            return false;
        };
        match tx.try_send(line) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
        }
    }

    /// Lines written to stdout.
    pub(crate) fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Lines that were queued but could not be written (stdout closed).
    pub(crate) fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Writes out what is queued, waiting at most until `deadline`.
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

fn write_lines<W: Write>(
    rx: &Receiver<String>,
    open: impl Fn() -> W,
    written: &AtomicU64,
    failed: &AtomicU64,
) {
    let mut broken = false;
    while let Ok(first) = rx.recv() {
        // Spans arrive in bursts (one per ring buffer drain); waiting a moment lets a burst
        // gather so the thread wakes once per burst, not once per span.
        thread::sleep(BATCH_GATHER);
        let mut out = io::BufWriter::new(open());
        let mut next = Some(first);
        let mut pending = 0u64;
        while let Some(line) = next {
            if broken {
                failed.fetch_add(1, Ordering::Relaxed);
            } else {
                let res = out
                    .write_all(line.as_bytes())
                    .and_then(|()| out.write_all(b"\n"));
                match res {
                    Ok(()) => pending += 1,
                    Err(e) => {
                        // Typically EPIPE: nobody reads stdout any more. Keep draining so the
                        // senders never block, and count instead of retrying forever.
                        tracing::warn!(error = %e, "stdout is not writable; console output stops");
                        failed.fetch_add(1 + pending, Ordering::Relaxed);
                        pending = 0;
                        broken = true;
                    }
                }
            }
            next = rx.try_recv().ok();
        }
        // One flush per drained batch: whoever reads the pipe still sees every span as soon
        // as the queue is empty, without a write syscall per line under load.
        if !broken {
            match out.flush() {
                Ok(()) => {
                    written.fetch_add(pending, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "stdout is not writable; console output stops");
                    failed.fetch_add(pending, Ordering::Relaxed);
                    broken = true;
                }
            }
        }
    }
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
}
