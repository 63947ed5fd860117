//! Parser throughput in MB/s (criterion, `Throughput::Bytes`): the pure parsers the agent
//! runs on every captured chunk, fed the way the stream layer feeds them (one `feed` per
//! syscall's bytes), on realistic inputs:
//!
//! - HTTP/1.1: a Dify-style `POST /plugin/<tenant>/dispatch/tool/invoke` with a JSON body and
//!   its `text/event-stream` chunked answer (request and response sides);
//! - HTTP/2: a recorded grpc-go h2c connection (`src/protocol/http2/testdata/grpc_health.bin`,
//!   both directions in read order), and 16 gRPC unary streams on one connection with HPACK
//!   as grpc-go encodes them (literals with incremental indexing on the first stream,
//!   dynamic-table references after, the traceparent a literal without indexing);
//! - stdio: the plugin daemon's and a plugin's newline-delimited JSON lines (request,
//!   stream chunks, end) for 64 sessions.
//!
//! Run: `cargo +1.99.0 bench -p tracer --bench parsers` (add `-- --measurement-time 2` for
//! a quick look). Not part of `cargo xtask test`: benchmarks report, they do not assert.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tracer::protocol::http1::{ChunkTs, Http1Parser, Side};
use tracer::protocol::http2::{ConnStart, Direction, Http2Conn, PREFACE};
use tracer::protocol::stdio::StdioStream;

const TS: ChunkTs = ChunkTs {
    enter_ns: 1,
    exit_ns: 2,
};

// ---------------------------------------------------------------------------------------
// HTTP/1.1

fn http1_request() -> Vec<u8> {
    let body = br#"{"user_id":"3f1d6a2e-5b8c-4e0f-9a7d-1c2b3d4e5f60","conversation_id":"9b2e4c6d-8f0a-4b1c-a3d5-e7f9a1b3c5d7","app_id":"c4d5e6f7-0819-4a2b-8c3d-4e5f60718293","message_id":"0a1b2c3d-4e5f-4607-8192-a3b4c5d6e7f8","data":{"provider":"echo_tool","tool":"echo","credentials":{"api_key":"dummy"},"tool_parameters":{"text":"hello from difytrace","chunks":3}}}"#;
    let mut req = format!(
        "POST /plugin/5f8a9c1e-2b3d-4e5f-a6b7-c8d9e0f1a2b3/dispatch/tool/invoke HTTP/1.1\r\n\
         Host: plugin_daemon:5002\r\n\
         Accept: */*\r\n\
         Accept-Encoding: gzip, deflate\r\n\
         Connection: keep-alive\r\n\
         User-Agent: python-httpx/0.28.1\r\n\
         X-Api-Key: lYkiYYT6owG+71oLerGzA7GXCgOT++6ovaezWAjpCjf+Sjc3ZtU+qUEi\r\n\
         X-Plugin-ID: difytrace/echo_tool\r\n\
         Content-Type: application/json\r\n\
         traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    req
}

fn http1_response() -> Vec<u8> {
    let mut resp = b"HTTP/1.1 200 OK\r\n\
        Content-Type: text/event-stream\r\n\
        Cache-Control: no-cache\r\n\
        Date: Thu, 26 Nov 2026 05:00:00 GMT\r\n\
        Transfer-Encoding: chunked\r\n\r\n"
        .to_vec();
    for i in 0..3 {
        let event = format!(
            "data: {{\"code\":0,\"message\":\"success\",\"data\":{{\"type\":\"text\",\"message\":{{\"text\":\"hello from difytrace [{i}]\"}},\"meta\":null}}}}\n\n"
        );
        resp.extend_from_slice(format!("{:x}\r\n", event.len()).as_bytes());
        resp.extend_from_slice(event.as_bytes());
        resp.extend_from_slice(b"\r\n");
    }
    resp.extend_from_slice(b"0\r\n\r\n");
    resp
}

fn bench_http1(c: &mut Criterion) {
    let req = http1_request();
    let resp = http1_response();
    // Exchanges per iteration: one kept-alive connection's worth, so parser set-up is
    // amortised as it is in the agent.
    const EXCHANGES: usize = 64;
    let mut g = c.benchmark_group("http1");
    g.throughput(Throughput::Bytes(
        ((req.len() + resp.len()) * EXCHANGES) as u64,
    ));
    g.bench_function("post_json_and_sse_answer", |b| {
        let mut out = Vec::new();
        b.iter(|| {
            let mut rq = Http1Parser::new(Side::Request);
            let mut rs = Http1Parser::new(Side::Response);
            for _ in 0..EXCHANGES {
                rq.feed(black_box(&req), TS, &mut out);
                rs.push_request_method("POST");
                rs.feed(black_box(&resp), TS, &mut out);
                out.clear();
            }
        })
    });
    g.finish();
}

// ---------------------------------------------------------------------------------------
// HTTP/2

/// (direction, bytes of one read) of the recorded grpc-go connection.
fn recorded_grpc() -> Vec<(Direction, Vec<u8>)> {
    let mut rest: &[u8] = include_bytes!("../src/protocol/http2/testdata/grpc_health.bin");
    let mut out = Vec::new();
    while rest.len() >= 5 {
        let dir = match rest[0] {
            b'C' => Direction::ClientToServer,
            _ => Direction::ServerToClient,
        };
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let Some(bytes) = rest.get(5..5 + len) else {
            break;
        };
        out.push((dir, bytes.to_vec()));
        rest = &rest[5 + len..];
    }
    out
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK string literal, not Huffman-coded (lengths < 127 here).
fn hpack_str(out: &mut Vec<u8>, s: &str) {
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

/// Literal with incremental indexing, new name (0x40), or indexed name (0x40 | idx).
fn lit_indexed(out: &mut Vec<u8>, name_idx: u8, name: &str, value: &str) {
    out.push(0x40 | name_idx);
    if name_idx == 0 {
        hpack_str(out, name);
    }
    hpack_str(out, value);
}

/// Literal without indexing, new name.
fn lit_plain(out: &mut Vec<u8>, name: &str, value: &str) {
    out.push(0x00);
    hpack_str(out, name);
    hpack_str(out, value);
}

/// 16 unary `UnaryEcho` calls on one h2c connection, as two byte streams of one read per
/// frame group, HPACK-encoded the way grpc-go does it.
fn sixteen_grpc_streams() -> Vec<(Direction, Vec<u8>)> {
    const C: Direction = Direction::ClientToServer;
    const S: Direction = Direction::ServerToClient;
    let settings = frame(0x4, 0, 0, &[]);
    let mut reads = vec![(C, [PREFACE.to_vec(), settings.clone()].concat())];
    reads.push((S, settings.clone()));
    let message = |text: &str| {
        // gRPC length prefix + protobuf field 1 (string).
        let mut m = vec![0u8, 0, 0, 0, (text.len() + 2) as u8, 0x0a, text.len() as u8];
        m.extend_from_slice(text.as_bytes());
        m
    };
    for i in 0..16u32 {
        let id = 1 + 2 * i;
        let mut h = Vec::new();
        h.push(0x83); // :method POST
        h.push(0x86); // :scheme http
        let trace = format!("00-0af7651916cd43dd8448eb211c8031{i:02x}-b7ad6b71692033{i:02x}-01");
        if i == 0 {
            lit_indexed(&mut h, 4, "", "/grpc.examples.echo.Echo/UnaryEcho"); // :path
            lit_indexed(&mut h, 1, "", "127.0.0.1:50051"); // :authority
            lit_indexed(&mut h, 31, "", "application/grpc"); // content-type
            lit_indexed(&mut h, 0, "user-agent", "grpc-go/1.85.0");
            lit_indexed(&mut h, 0, "te", "trailers");
            lit_indexed(&mut h, 0, "grpc-timeout", "9999m");
        } else {
            // Dynamic table, newest first: grpc-timeout 62, te 63, user-agent 64,
            // content-type 65, :authority 66, :path 67.
            h.extend_from_slice(&[0x80 | 67, 0x80 | 66, 0x80 | 65, 0x80 | 64, 0x80 | 63]);
            h.push(0x80 | 62);
        }
        lit_plain(&mut h, "traceparent", &trace);
        let headers = frame(0x1, 0x4, id, &h); // END_HEADERS
        let data = frame(0x0, 0x1, id, &message(&format!("hello {i}"))); // END_STREAM
        reads.push((C, [headers, data].concat()));

        let mut rh = Vec::new();
        rh.push(0x88); // :status 200
        if i == 0 {
            lit_indexed(&mut rh, 31, "", "application/grpc");
        } else {
            // After the first trailers: grpc-message 62, grpc-status 63, content-type 64.
            rh.push(0x80 | 64);
        }
        let mut trailers = Vec::new();
        if i == 0 {
            lit_indexed(&mut trailers, 0, "grpc-status", "0");
            lit_indexed(&mut trailers, 0, "grpc-message", "");
        } else {
            trailers.extend_from_slice(&[0x80 | 63, 0x80 | 62]);
        }
        reads.push((
            S,
            [
                frame(0x1, 0x4, id, &rh),
                frame(0x0, 0, id, &message(&format!("hello {i}"))),
                frame(0x1, 0x5, id, &trailers), // END_HEADERS | END_STREAM
            ]
            .concat(),
        ));
    }
    reads
}

fn run_http2(reads: &[(Direction, Vec<u8>)], out: &mut Vec<tracer::protocol::http2::Http2Event>) {
    let mut conn = Http2Conn::new(ConnStart::Preface);
    for (dir, bytes) in reads {
        conn.feed(*dir, black_box(bytes), TS, out);
    }
    conn.close(TS, out);
    out.clear();
}

fn bench_http2(c: &mut Criterion) {
    let mut g = c.benchmark_group("http2");
    for (name, reads) in [
        ("recorded_grpc_go_health", recorded_grpc()),
        ("grpc_16_unary_streams_hpack", sixteen_grpc_streams()),
    ] {
        let bytes: usize = reads.iter().map(|(_, b)| b.len()).sum();
        // The input must parse into spans, or the number measures the error path.
        let mut out = Vec::new();
        let mut conn = Http2Conn::new(ConnStart::Preface);
        for (dir, b) in &reads {
            conn.feed(*dir, b, TS, &mut out);
        }
        conn.close(TS, &mut out);
        let k = conn.counters();
        assert_eq!(
            (
                k.hpack_errors,
                k.unknown_fields,
                k.truncated_blocks,
                k.sync_losses
            ),
            (0, 0, 0, 0),
            "{name}: parse trouble {k:?}"
        );
        assert!(!out.is_empty(), "{name}: no events");
        g.throughput(Throughput::Bytes(bytes as u64));
        g.bench_function(name, |b| {
            let mut out = Vec::new();
            b.iter(|| run_http2(&reads, &mut out))
        });
    }
    g.finish();
}

// ---------------------------------------------------------------------------------------
// plugin stdio

/// The daemon's request lines and the plugin's answer lines of `sessions` tool invocations,
/// as the two pipe directions (one write per line, as both sides flush per message).
fn stdio_lines(sessions: usize) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let mut to_plugin = Vec::new();
    let mut from_plugin = Vec::new();
    for i in 0..sessions {
        let sid = format!("6f1c2a9e-3b4d-4e5f-8a7b-{i:012x}");
        to_plugin.push(format!(
            "{{\"session_id\":\"{sid}\",\"conversation_id\":\"9b2e4c6d-8f0a-4b1c-a3d5-e7f9a1b3c5d7\",\"message_id\":\"0a1b2c3d-4e5f-4607-8192-a3b4c5d6e7f8\",\"app_id\":\"c4d5e6f7-0819-4a2b-8c3d-4e5f60718293\",\"endpoint_id\":null,\"context\":null,\"event\":\"request\",\"data\":{{\"action\":\"invoke_tool\",\"credential_type\":\"api-key\",\"credentials\":{{\"api_key\":\"dummy\"}},\"provider\":\"echo_tool\",\"tool\":\"echo\",\"tool_parameters\":{{\"chunks\":3,\"text\":\"hello from difytrace\"}},\"type\":\"tool\",\"user_id\":\"3f1d6a2e-5b8c-4e0f-9a7d-1c2b3d4e5f60\"}}}}\n"
        ).into_bytes());
        for k in 0..3 {
            from_plugin.push(format!(
                "{{\"event\":\"session\",\"session_id\":\"{sid}\",\"data\":{{\"type\":\"stream\",\"data\":{{\"type\":\"text\",\"message\":{{\"text\":\"hello from difytrace [{k}]\"}},\"meta\":null}}}}}}\n\n"
            ).into_bytes());
        }
        from_plugin.push(
            format!("{{\"event\":\"session\",\"session_id\":\"{sid}\",\"data\":{{\"type\":\"end\",\"data\":{{}}}}}}\n\n")
                .into_bytes(),
        );
    }
    (to_plugin, from_plugin)
}

fn bench_stdio(c: &mut Criterion) {
    let (to_plugin, from_plugin) = stdio_lines(64);
    let bytes: usize = to_plugin.iter().chain(&from_plugin).map(Vec::len).sum();
    let mut g = c.benchmark_group("stdio");
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function("plugin_json_lines_64_sessions", |b| {
        let mut out = Vec::new();
        b.iter(|| {
            let mut down = StdioStream::new();
            let mut up = StdioStream::new();
            for line in &to_plugin {
                down.feed(black_box(line), line.len() as u64, TS, 0, &mut out);
            }
            for line in &from_plugin {
                up.feed(black_box(line), line.len() as u64, TS, 0, &mut out);
            }
            assert_eq!(out.len(), 64 * 5);
            out.clear();
        })
    });
    g.finish();
}

criterion_group!(parsers, bench_http1, bench_http2, bench_stdio);
criterion_main!(parsers);
