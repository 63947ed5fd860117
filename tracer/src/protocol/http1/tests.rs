use super::*;

#[derive(Debug, Clone)]
enum Op {
    Feed(Vec<u8>),
    Gap(u64),
    Close,
    /// The other direction of the connection carried bytes.
    PeerMoved,
}

fn feed(b: impl AsRef<[u8]>) -> Op {
    Op::Feed(b.as_ref().to_vec())
}

/// Op `i` happens at a distinct, recognisable time.
fn ts(i: usize) -> ChunkTs {
    let n = (i as u64 + 1) * 100;
    ChunkTs {
        enter_ns: n,
        exit_ns: n + 1,
    }
}

fn run_parser(p: &mut Http1Parser, ops: &[Op]) -> Vec<Http1Event> {
    let mut out = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        match op {
            Op::Feed(b) => p.feed(b, ts(i), &mut out),
            Op::Gap(n) => p.gap(*n, ts(i), &mut out),
            Op::Close => p.close(ts(i), &mut out),
            Op::PeerMoved => p.peer_moved(),
        }
    }
    out
}

fn run(side: Side, methods: &[&str], ops: &[Op]) -> Vec<Http1Event> {
    let mut p = Http1Parser::new(side);
    for m in methods {
        p.push_request_method(m);
    }
    run_parser(&mut p, ops)
}

fn strip_ts(events: Vec<Http1Event>) -> Vec<Http1Event> {
    events
        .into_iter()
        .map(|e| match e {
            Http1Event::Message(mut m) => {
                m.first = ChunkTs::default();
                m.last = ChunkTs::default();
                Http1Event::Message(m)
            }
            e => e,
        })
        .collect()
}

fn messages(events: &[Http1Event]) -> Vec<&Http1Message> {
    events
        .iter()
        .filter_map(|e| match e {
            Http1Event::Message(m) => Some(m),
            Http1Event::Error(_) => None,
        })
        .collect()
}

fn errors(events: &[Http1Event]) -> Vec<Http1Error> {
    events
        .iter()
        .filter_map(|e| match e {
            Http1Event::Error(e) => Some(*e),
            Http1Event::Message(_) => None,
        })
        .collect()
}

fn method_target(m: &Http1Message) -> (&str, &str) {
    match &m.start_line {
        StartLine::Request { method, target } => (method, target),
        StartLine::Response { .. } => panic!("expected a request, got {m:?}"),
    }
}

fn status(m: &Http1Message) -> u16 {
    match &m.start_line {
        StartLine::Response { status, .. } => *status,
        StartLine::Request { .. } => panic!("expected a response, got {m:?}"),
    }
}

fn chunked(parts: &[&[u8]]) -> Vec<u8> {
    let mut v = Vec::new();
    for p in parts {
        v.extend_from_slice(format!("{:x}\r\n", p.len()).as_bytes());
        v.extend_from_slice(p);
        v.extend_from_slice(b"\r\n");
    }
    v.extend_from_slice(b"0\r\n\r\n");
    v
}

// ---- recorded byte sequences -------------------------------------------------------

const CURL_GET: &[u8] = b"GET /index.html HTTP/1.1\r\nHost: example.com\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n";
const OK_13: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\nHello, world!";
const GUNICORN: &[u8] = b"HTTP/1.1 200 OK\r\nServer: gunicorn\r\nDate: Tue, 25 Nov 2025 17:33:02 GMT\r\nConnection: close\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: 5\r\n\r\nhello";
/// Python's http.client sends head and a bytes body in one send().
const PY_CLIENT: &[u8] = b"POST /v1/sandbox/run HTTP/1.1\r\nHost: sandbox:8194\r\nAccept-Encoding: identity\r\nContent-Length: 64\r\nX-Api-Key: dify-sandbox\r\nContent-Type: application/json\r\n\r\n{\"language\":\"python3\",\"code\":\"print(1)\",\"enable_network\":false}\n";
const CHUNKED_WIKI: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\nTrailer: Expires\r\n\r\n4;name=value\r\nWiki\r\n5\r\npedia\r\nE ; foo=\"bar\"\r\n in\r\n\r\nchunks.\r\n0\r\nExpires: Wed, 21 Oct 2015 07:28:00 GMT\r\n\r\nHTTP/1.1 204 No Content\r\nServer: x\r\n\r\n";

struct Recording {
    name: &'static str,
    side: Side,
    methods: Vec<&'static str>,
    ops: Vec<Op>,
}

fn rec(name: &'static str, side: Side, methods: &[&'static str], ops: Vec<Op>) -> Recording {
    Recording {
        name,
        side,
        methods: methods.to_vec(),
        ops,
    }
}

/// The captured first 4096 bytes of a POST whose body is `len` bytes, and the rest's size.
fn big_post(len: usize) -> (Vec<u8>, u64) {
    let mut v = format!(
        "POST /upload HTTP/1.1\r\nHost: api:5001\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\n\r\n"
    )
    .into_bytes();
    let total = v.len() + len;
    v.extend((0..4096 - v.len()).map(|i| (i % 251) as u8));
    (v, (total - 4096) as u64)
}

fn recordings() -> Vec<Recording> {
    let sse = {
        let mut v = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        v.extend(chunked(&[
            b"data: {\"code\":0,\"message\":\"success\",\"data\":{\"delta\":\"Hel\"}}\n\n",
            b"data: {\"code\":0,\"message\":\"success\",\"data\":{\"delta\":{\"usage\":{\"total_tokens\":7}}}}\n\n",
        ]));
        v
    };
    let big = big_post(1_000_000);
    vec![
        rec("simple get", Side::Request, &[], vec![feed(CURL_GET)]),
        rec("simple 200", Side::Response, &["GET"], vec![feed(OK_13)]),
        rec(
            "keep-alive requests",
            Side::Request,
            &[],
            vec![
                feed(CURL_GET),
                feed(b"POST /api/chat HTTP/1.1\r\nHost: api\r\nContent-Length: 11\r\n\r\n{\"q\":\"hi\"}\n"),
                feed(b"GET /health HTTP/1.1\r\nHost: api\r\n\r\n"),
            ],
        ),
        rec(
            "pipelined requests",
            Side::Request,
            &[],
            vec![feed(
                b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nPUT /b HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nxyzDELETE /c?x=1 HTTP/1.1\r\nHost: h\r\n\r\n",
            )],
        ),
        rec("chunked with extensions and trailers", Side::Response, &["GET", "GET"], vec![feed(CHUNKED_WIKI)]),
        rec("plugin daemon sse", Side::Response, &["POST"], vec![feed(&sse)]),
        rec(
            "100-continue",
            Side::Response,
            &["POST", "HEAD", "GET"],
            vec![
                feed(b"HTTP/1.1 100 Continue\r\n\r\n"),
                feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
                feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"),
                feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n!"),
            ],
        ),
        rec(
            "101 upgrade",
            Side::Response,
            &["GET"],
            vec![
                feed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x05hello"),
                feed(b"\x81\x7e\x00\x04HTTP/1.1 200 OK\r\n\r\n"),
            ],
        ),
        rec(
            "upgrade request then frames",
            Side::Request,
            &[],
            vec![
                feed(b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"),
                feed(b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"),
            ],
        ),
        rec(
            "head then 200",
            Side::Response,
            &["HEAD", "GET"],
            vec![feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")],
        ),
        rec(
            "204 and 304",
            Side::Response,
            &["DELETE", "GET", "GET"],
            vec![
                feed(b"HTTP/1.1 204 No Content\r\nDate: x\r\n\r\n"),
                feed(b"HTTP/1.1 304 Not Modified\r\nETag: \"abc\"\r\nContent-Length: 99\r\n\r\n"),
                feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"),
            ],
        ),
        rec(
            "read until close",
            Side::Response,
            &["GET"],
            vec![feed(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nsome data\n"), feed(b"more"), Op::Close],
        ),
        rec(
            "big body with gap",
            Side::Request,
            &[],
            vec![feed(&big.0), Op::Gap(big.1), feed(CURL_GET)],
        ),
        rec(
            "chunked body with gaps",
            Side::Response,
            &["GET", "GET"],
            vec![
                feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2000\r\nabcd"),
                Op::Gap(0x2000 - 4 + 1),
                feed(b"\n10\r\n0123456789"),
                Op::Gap(6 + 2),
                feed(b"0\r\n\r\n"),
                feed(GUNICORN),
            ],
        ),
        rec(
            "garbage first",
            Side::Request,
            &[],
            vec![feed(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"), feed(CURL_GET)],
        ),
        rec(
            "garbage mid-stream",
            Side::Request,
            &[],
            vec![feed(CURL_GET), feed(b"\x00\x01 junk junk\r\nmore junk\n"), feed(b"GET /after HTTP/1.1\r\n\r\n")],
        ),
        rec(
            "malformed header",
            Side::Request,
            &[],
            vec![feed(b"GET /a HTTP/1.1\r\nHost a\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")],
        ),
        rec("gunicorn", Side::Response, &["GET"], vec![feed(GUNICORN), Op::Close]),
        rec("python http.client", Side::Request, &[], vec![feed(PY_CLIENT)]),
        rec(
            "bare lf and leading blank lines",
            Side::Request,
            &[],
            vec![feed(b"\r\nGET /x HTTP/1.0\nHost: h\nContent-Length: 2\n\nab\r\nGET /y HTTP/1.1\n\n")],
        ),
        rec(
            "chunked request",
            Side::Request,
            &[],
            vec![feed(b"POST /inner/api/invoke/llm HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")],
        ),
        rec(
            "gap in head",
            Side::Request,
            &[],
            vec![
                feed(b"GET /big HTTP/1.1\r\nHost: h\r\nCookie: aaaa"),
                Op::Gap(5000),
                feed(b"GET /next HTTP/1.1\r\n\r\n"),
            ],
        ),
        rec(
            "gap in chunk size",
            Side::Response,
            &["GET", "GET"],
            vec![
                feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n1"),
                Op::Gap(100),
                // Until the client asks again, whatever follows is the lost body.
                feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
                Op::PeerMoved,
                feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
            ],
        ),
        rec(
            "connect tunnel",
            Side::Response,
            &["CONNECT"],
            vec![feed(b"HTTP/1.1 200 Connection Established\r\n\r\n\x16\x03\x03\x00\x7a\x02")],
        ),
        rec(
            "close mid body",
            Side::Response,
            &["GET"],
            vec![feed(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial"), Op::Close],
        ),
    ]
}

fn recording(name: &str) -> Recording {
    recordings()
        .into_iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no recording {name}"))
}

fn run_rec(name: &str) -> Vec<Http1Event> {
    let r = recording(name);
    run(r.side, &r.methods, &r.ops)
}

// ---- behaviour ---------------------------------------------------------------------

#[test]
fn simple_get_and_200() {
    let ev = run_rec("simple get");
    let m = messages(&ev);
    assert_eq!(m.len(), 1, "{ev:?}");
    assert_eq!(method_target(m[0]), ("GET", "/index.html"));
    assert_eq!(m[0].minor_version, 1);
    assert_eq!(m[0].header("host"), Some("example.com"));
    assert_eq!(m[0].header("USER-AGENT"), Some("curl/8.5.0"));
    assert_eq!(m[0].headers.len(), 3);
    assert_eq!((m[0].body_len, m[0].first, m[0].last), (0, ts(0), ts(0)));

    let ev = run_rec("simple 200");
    let m = messages(&ev);
    assert_eq!(m.len(), 1, "{ev:?}");
    assert_eq!(
        m[0].start_line,
        StartLine::Response {
            status: 200,
            reason: "OK".into()
        }
    );
    assert_eq!(m[0].body_len, 13);
    assert_eq!(m[0].body_prefix, b"Hello, world!");
    assert!(!m[0].body_incomplete && !m[0].head_truncated);
}

#[test]
fn keep_alive_requests() {
    let ev = run_rec("keep-alive requests");
    assert!(errors(&ev).is_empty(), "{ev:?}");
    let m = messages(&ev);
    let lines: Vec<_> = m.iter().map(|m| method_target(m)).collect();
    assert_eq!(
        lines,
        [
            ("GET", "/index.html"),
            ("POST", "/api/chat"),
            ("GET", "/health")
        ]
    );
    assert_eq!(m[1].body_prefix, b"{\"q\":\"hi\"}\n");
    assert_eq!((m[1].first, m[1].last), (ts(1), ts(1)));
    assert_eq!(m[2].first, ts(2));
}

#[test]
fn pipelined_requests() {
    let ev = run_rec("pipelined requests");
    assert!(errors(&ev).is_empty(), "{ev:?}");
    let m = messages(&ev);
    let lines: Vec<_> = m.iter().map(|m| method_target(m)).collect();
    assert_eq!(lines, [("GET", "/a"), ("PUT", "/b"), ("DELETE", "/c?x=1")]);
    assert_eq!(m[1].body_prefix, b"xyz");
}

#[test]
fn chunked_extensions_and_trailers() {
    let ev = run_rec("chunked with extensions and trailers");
    assert!(errors(&ev).is_empty(), "{ev:?}");
    let m = messages(&ev);
    assert_eq!(m.len(), 2);
    assert_eq!(m[0].body_len, 4 + 5 + 14);
    assert_eq!(m[0].body_prefix, b"Wikipedia in\r\n\r\nchunks.");
    assert!(!m[0].body_incomplete);
    assert_eq!(m[0].header("trailer"), Some("Expires"));
    assert_eq!(status(m[1]), 204);
}

#[test]
fn plugin_daemon_sse_stream() {
    let ev = run_rec("plugin daemon sse");
    let m = messages(&ev);
    assert_eq!(m.len(), 1, "{ev:?}");
    assert!(m[0].body_prefix.starts_with(b"data: {\"code\":0"));
    assert!(m[0].body_prefix.ends_with(b"\"total_tokens\":7}}}}\n\n"));
    assert_eq!(m[0].body_len, m[0].body_prefix.len() as u64);
}

#[test]
fn continue_does_not_consume_method() {
    let ev = run_rec("100-continue");
    assert!(errors(&ev).is_empty(), "{ev:?}");
    let m = messages(&ev);
    let got: Vec<_> = m.iter().map(|m| (status(m), m.body_len)).collect();
    // The 200 to HEAD carries no body, so the last 200 is read as its own message.
    assert_eq!(got, [(100, 0), (200, 2), (200, 0), (200, 1)]);
    assert_eq!((m[0].first, m[1].first), (ts(0), ts(1)));
}

#[test]
fn upgrade_switches_to_tunnel() {
    let r = recording("101 upgrade");
    let mut p = Http1Parser::new(r.side);
    p.push_request_method("GET");
    let ev = run_parser(&mut p, &r.ops);
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(status(messages(&ev)[0]), 101);
    assert!(p.is_tunnel() && !p.is_not_http());

    let r = recording("upgrade request then frames");
    let mut p = Http1Parser::new(r.side);
    let ev = run_parser(&mut p, &r.ops);
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert!(p.is_tunnel());

    let r = recording("connect tunnel");
    let mut p = Http1Parser::new(r.side);
    p.push_request_method("CONNECT");
    let ev = run_parser(&mut p, &r.ops);
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert!(p.is_tunnel());
}

#[test]
fn declined_upgrade_keeps_parsing() {
    let ev = run(
        Side::Request,
        &[],
        &[
            feed(b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n"),
            feed(b"GET /plain HTTP/1.1\r\n\r\n"),
        ],
    );
    assert_eq!(messages(&ev).len(), 2, "{ev:?}");
}

#[test]
fn head_response_has_no_body() {
    let ev = run_rec("head then 200");
    assert!(errors(&ev).is_empty(), "{ev:?}");
    let m = messages(&ev);
    assert_eq!(m.len(), 2);
    assert_eq!(
        (m[0].body_len, m[0].header("content-length")),
        (0, Some("1234"))
    );
    assert_eq!(m[1].body_prefix, b"hi");
}

#[test]
fn no_body_for_204_and_304() {
    let ev = run_rec("204 and 304");
    assert!(errors(&ev).is_empty(), "{ev:?}");
    let got: Vec<_> = messages(&ev)
        .iter()
        .map(|m| (status(m), m.body_len))
        .collect();
    assert_eq!(got, [(204, 0), (304, 0), (200, 1)]);
}

#[test]
fn read_until_close() {
    let ev = run_rec("read until close");
    let m = messages(&ev);
    assert_eq!(m.len(), 1, "{ev:?}");
    assert_eq!(m[0].minor_version, 0);
    assert_eq!(m[0].body_prefix, b"some data\nmore");
    assert_eq!((m[0].first, m[0].last), (ts(0), ts(2)));
    assert!(!m[0].body_incomplete);
}

#[test]
fn close_mid_body_is_incomplete() {
    let ev = run_rec("close mid body");
    let m = messages(&ev);
    assert_eq!(m.len(), 1, "{ev:?}");
    assert!(m[0].body_incomplete);
    assert_eq!((m[0].body_len, m[0].last), (7, ts(1)));
}

#[test]
fn big_body_with_gap_ends_on_count() {
    let ev = run_rec("big body with gap");
    assert!(errors(&ev).is_empty(), "{ev:?}");
    let m = messages(&ev);
    assert_eq!(m.len(), 2);
    assert_eq!(m[0].body_len, 1_000_000);
    assert_eq!(m[0].body_prefix.len(), MAX_BODY_PREFIX);
    assert_eq!(m[0].body_prefix.get(..3), Some(&[0u8, 1, 2][..]));
    assert_eq!((m[0].first, m[0].last), (ts(0), ts(1)));
    assert!(!m[0].body_incomplete);
    assert_eq!(method_target(m[1]), ("GET", "/index.html"));

    let ev = run_rec("chunked body with gaps");
    assert!(errors(&ev).is_empty(), "{ev:?}");
    let m = messages(&ev);
    assert_eq!(m.len(), 2);
    assert_eq!(m[0].body_len, 0x2000 + 0x10);
    // The prefix stops at the first gap: later bytes would not follow on from it.
    assert_eq!(m[0].body_prefix, b"abcd");
    assert_eq!(m[0].last, ts(4));
    assert_eq!(m[1].body_prefix, b"hello");
}

#[test]
fn garbage_first_is_not_http() {
    let r = recording("garbage first");
    let mut p = Http1Parser::new(r.side);
    let ev = run_parser(&mut p, &r.ops);
    assert_eq!(ev, [Http1Event::Error(Http1Error::NotHttp)]);
    assert!(p.is_not_http());

    // HTTP/2 with prior knowledge is not HTTP/1.x either.
    let mut p = Http1Parser::new(Side::Request);
    let mut out = Vec::new();
    p.feed(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", ts(0), &mut out);
    assert_eq!(out, [Http1Event::Error(Http1Error::NotHttp)]);

    let mut p = Http1Parser::new(Side::Response);
    p.feed(b"+OK\r\n", ts(0), &mut out);
    assert!(p.is_not_http());
}

#[test]
fn garbage_mid_stream_recovers() {
    let ev = run_rec("garbage mid-stream");
    assert_eq!(errors(&ev), [Http1Error::BadStartLine]);
    let m = messages(&ev);
    assert_eq!(m.len(), 2);
    assert_eq!(method_target(m[1]), ("GET", "/after"));
    assert_eq!(m[1].first, ts(2));
}

#[test]
fn malformed_header_then_recovery() {
    let ev = run_rec("malformed header");
    assert_eq!(ev.first(), Some(&Http1Event::Error(Http1Error::BadHeader)));
    let m = messages(&ev);
    assert_eq!(m.len(), 1, "{ev:?}");
    assert_eq!(method_target(m[0]), ("GET", "/b"));

    let ev = run(
        Side::Request,
        &[],
        &[feed(
            b"GET /a HTTP/1.1\r\n folded: x\r\n\r\nGET /b HTTP/1.1\r\n\r\n",
        )],
    );
    assert_eq!(errors(&ev), [Http1Error::BadHeader]);
    assert_eq!(messages(&ev).len(), 1);
}

#[test]
fn gunicorn_response() {
    let ev = run_rec("gunicorn");
    let m = messages(&ev);
    assert_eq!(m.len(), 1, "{ev:?}");
    assert_eq!(m[0].header("server"), Some("gunicorn"));
    assert_eq!(
        m[0].header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert_eq!(m[0].body_prefix, b"hello");
    assert_eq!(m[0].last, ts(0));
}

#[test]
fn python_http_client_request() {
    let ev = run_rec("python http.client");
    let m = messages(&ev);
    assert_eq!(m.len(), 1, "{ev:?}");
    assert_eq!(method_target(m[0]), ("POST", "/v1/sandbox/run"));
    assert_eq!(m[0].header("accept-encoding"), Some("identity"));
    assert_eq!(m[0].body_len, 64);
    assert!(m[0].body_prefix.starts_with(b"{\"language\""));
}

#[test]
fn bare_lf_and_chunked_request() {
    let ev = run_rec("bare lf and leading blank lines");
    assert!(errors(&ev).is_empty(), "{ev:?}");
    let m = messages(&ev);
    assert_eq!(m.len(), 2);
    assert_eq!(
        (m[0].header("host"), m[0].body_prefix.as_slice()),
        (Some("h"), &b"ab"[..])
    );
    assert_eq!(method_target(m[1]), ("GET", "/y"));

    let ev = run_rec("chunked request");
    assert!(errors(&ev).is_empty(), "{ev:?}");
    assert_eq!(messages(&ev)[0].body_prefix, b"abc");
}

#[test]
fn gap_in_head_emits_truncated_message_then_recovers() {
    let ev = run_rec("gap in head");
    assert_eq!(errors(&ev), [Http1Error::GapInHead]);
    let m = messages(&ev);
    assert_eq!(m.len(), 2, "{ev:?}");
    assert!(m[0].head_truncated && m[0].body_incomplete);
    assert_eq!(method_target(m[0]), ("GET", "/big"));
    // Only complete header lines are kept.
    assert_eq!(m[0].headers, [("Host".to_string(), "h".to_string())]);
    assert_eq!(method_target(m[1]), ("GET", "/next"));
}

#[test]
fn lost_chunk_framing_makes_no_phantom_messages() {
    // A chunked request body whose size line fell into a gap, followed by body text that
    // looks like requests: nothing is parsed until the server answers.
    let ev = run(
        Side::Request,
        &[],
        &[
            feed(b"POST /up HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n0123456789abcdef\r\n1"),
            Op::Gap(50),
            feed(b"\r\nGET /phantom HTTP/1.1\r\nHost: x\r\n\r\n"),
            feed(b"0\r\n\r\n"),
            Op::PeerMoved,
            feed(b"GET /real HTTP/1.1\r\n\r\n"),
        ],
    );
    let m = messages(&ev);
    assert_eq!(m.len(), 2, "{ev:?}");
    assert_eq!(method_target(m[0]), ("POST", "/up"));
    assert!(m[0].body_incomplete);
    assert_eq!(method_target(m[1]), ("GET", "/real"));
}

#[test]
fn gap_in_chunk_size_resyncs() {
    let ev = run_rec("gap in chunk size");
    assert_eq!(errors(&ev), [Http1Error::GapInChunkSize]);
    let m = messages(&ev);
    assert_eq!(m.len(), 2, "{ev:?}");
    assert!(m[0].body_incomplete);
    assert_eq!(m[0].body_len, 3);
    assert_eq!((status(m[1]), m[1].body_len), (200, 0));
}

#[test]
fn content_length_errors() {
    for (head, err) in [
        (
            &b"Content-Length: 5\r\nContent-Length: 6\r\n"[..],
            Http1Error::ConflictingContentLength,
        ),
        (
            b"Content-Length: 5, 6\r\n",
            Http1Error::ConflictingContentLength,
        ),
        (b"Content-Length: -1\r\n", Http1Error::BadContentLength),
        (
            b"Content-Length: 99999999999999999999999\r\n",
            Http1Error::BadContentLength,
        ),
        (b"Content-Length:\r\n", Http1Error::BadContentLength),
        (
            b"Transfer-Encoding: gzip\r\n",
            Http1Error::BadTransferEncoding,
        ),
    ] {
        let mut req = b"POST / HTTP/1.1\r\n".to_vec();
        req.extend_from_slice(head);
        req.extend_from_slice(b"\r\nGET /next HTTP/1.1\r\n\r\n");
        let ev = run(Side::Request, &[], &[feed(&req)]);
        assert_eq!(errors(&ev), [err], "{}", String::from_utf8_lossy(head));
        assert_eq!(messages(&ev).len(), 1);
    }
    // Agreeing repeats are one length.
    let ev = run(
        Side::Request,
        &[],
        &[feed(
            b"POST / HTTP/1.1\r\nContent-Length: 2\r\ncontent-length: 2, 2\r\n\r\nok",
        )],
    );
    assert_eq!(messages(&ev)[0].body_prefix, b"ok");
}

#[test]
fn transfer_encoding_overrides_length_and_unknown_coding_reads_to_close() {
    let ev = run(
        Side::Response,
        &[],
        &[
            feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n"),
            feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\nzzz"),
            Op::Close,
        ],
    );
    let m = messages(&ev);
    assert_eq!(m.len(), 2, "{ev:?}");
    assert_eq!(m[0].body_prefix, b"ab");
    assert_eq!((m[1].body_len, m[1].body_incomplete), (3, false));
}

#[test]
fn bad_chunk_lines() {
    for body in [&b"zz\r\n"[..], b"5 x\r\nhello\r\n", b"3\r\nabcX"] {
        let mut resp = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        resp.extend_from_slice(body);
        let ev = run(
            Side::Response,
            &[],
            &[feed(&resp), feed(OK_13), Op::PeerMoved, feed(OK_13)],
        );
        let m = messages(&ev);
        assert_eq!(m.len(), 2, "{ev:?}");
        assert!(m[0].body_incomplete);
        assert_eq!(m[1].body_prefix, b"Hello, world!");
    }
    let mut resp = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    resp.extend(std::iter::repeat_n(b'0', MAX_CHUNK_LINE_BYTES + 1));
    let ev = run(Side::Response, &[], &[feed(&resp)]);
    assert_eq!(errors(&ev), [Http1Error::ChunkLineTooLong]);
}

#[test]
fn head_too_long_resyncs() {
    let mut req = b"GET / HTTP/1.1\r\n".to_vec();
    for i in 0..MAX_HEAD_BYTES / 32 {
        req.extend_from_slice(format!("X-Filler-{i:05}: {:>14}\r\n", "v").as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    let ev = run(Side::Request, &[], &[feed(&req), feed(CURL_GET)]);
    assert_eq!(errors(&ev), [Http1Error::HeadTooLong]);
    assert_eq!(messages(&ev).len(), 1);
}

#[test]
fn header_bounds_are_counted() {
    let mut req = b"GET / HTTP/1.1\r\n".to_vec();
    for i in 0..MAX_HEADERS + 5 {
        req.extend_from_slice(format!("H{i}: v\r\n").as_bytes());
    }
    req.extend_from_slice(format!("Big: {}\r\n\r\n", "x".repeat(MAX_HEADER_BYTES)).as_bytes());
    let ev = run(Side::Request, &[], &[feed(&req)]);
    let m = messages(&ev);
    assert_eq!(m[0].headers.len(), MAX_HEADERS);
    assert_eq!(m[0].dropped_headers, 6);
}

#[test]
fn close_inside_head_reports_it() {
    let ev = run(
        Side::Request,
        &[],
        &[feed(b"GET / HTTP/1.1\r\nHo"), Op::Close],
    );
    assert_eq!(ev, [Http1Event::Error(Http1Error::IncompleteHead)]);
}

#[test]
fn pending_methods_are_bounded() {
    let mut p = Http1Parser::new(Side::Response);
    for _ in 0..MAX_PENDING_METHODS + 3 {
        p.push_request_method("GET");
    }
    assert_eq!(p.dropped_methods(), 3);
    assert!(p.is_idle());
}

#[test]
fn idle_only_between_messages() {
    let mut p = Http1Parser::new(Side::Request);
    let mut out = Vec::new();
    p.feed(
        b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\na",
        ts(0),
        &mut out,
    );
    assert!(!p.is_idle());
    p.feed(b"b", ts(1), &mut out);
    assert!(p.is_idle());
    assert_eq!(messages(&out)[0].last, ts(1));
}

// ---- resumability ------------------------------------------------------------------

/// Rebuilds `ops` with each feed also split before every fed byte (counted across all
/// feeds) for which `cut` holds; gaps and closes stay where they were.
fn resplit(ops: &[Op], cut: impl Fn(usize) -> bool) -> Vec<Op> {
    let mut out = Vec::new();
    let mut offset = 0;
    for op in ops {
        let Op::Feed(bytes) = op else {
            out.push(op.clone());
            continue;
        };
        let mut from = 0;
        for i in 1..bytes.len() {
            if cut(offset + i) {
                out.push(feed(&bytes[from..i]));
                from = i;
            }
        }
        out.push(feed(&bytes[from..]));
        offset += bytes.len();
    }
    out
}

#[test]
fn any_split_gives_the_same_messages() {
    for r in recordings() {
        let whole = strip_ts(run(r.side, &r.methods, &r.ops));
        assert!(!whole.is_empty(), "{}", r.name);
        let fed: usize = r
            .ops
            .iter()
            .map(|op| match op {
                Op::Feed(b) => b.len(),
                _ => 0,
            })
            .sum();
        for at in 0..=fed {
            let ops = resplit(&r.ops, |i| i == at);
            let split = strip_ts(run(r.side, &r.methods, &ops));
            assert_eq!(split, whole, "{}: split at {at}", r.name);
        }
        let ops = resplit(&r.ops, |_| true);
        let bytewise = strip_ts(run(r.side, &r.methods, &ops));
        assert_eq!(bytewise, whole, "{}: 1-byte chunks", r.name);
    }
}

#[test]
fn every_byte_value_after_each_prefix_never_panics() {
    // A cheap sweep of the fuzz target's job: each prefix of a real exchange followed
    // by each possible byte, gap and close.
    for r in recordings()
        .iter()
        .filter(|r| r.name != "big body with gap")
    {
        let Some(Op::Feed(bytes)) = r.ops.first() else {
            continue;
        };
        for cut in 0..bytes.len().min(200) {
            for b in [0u8, b'\n', b'\r', b' ', b'G', b'H', b'0', 0xff] {
                let mut p = Http1Parser::new(r.side);
                let mut out = Vec::new();
                p.feed(bytes.get(..cut).unwrap(), ts(0), &mut out);
                p.feed(&[b], ts(1), &mut out);
                p.gap(u64::MAX, ts(2), &mut out);
                p.feed(bytes, ts(3), &mut out);
                p.close(ts(4), &mut out);
            }
        }
    }
}
