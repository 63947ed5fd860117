//! Whole-connection tests: byte streams built by hand, fed in every chunking.

mod wire;

use super::*;
use wire::*;

#[derive(Debug, Clone)]
enum Op {
    /// Client to server bytes.
    C(Vec<u8>),
    /// Server to client bytes.
    S(Vec<u8>),
    GapC(u64),
    GapS(u64),
    Lost,
    Close,
}

/// Op `i` happens at a distinct, recognisable time.
fn ts(i: usize) -> ChunkTs {
    let n = (i as u64 + 1) * 100;
    ChunkTs {
        enter_ns: n,
        exit_ns: n + 1,
    }
}

fn run_conn(conn: &mut Http2Conn, ops: &[Op]) -> Vec<Http2Event> {
    let mut out = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        match op {
            Op::C(b) => conn.feed(Direction::ClientToServer, b, ts(i), &mut out),
            Op::S(b) => conn.feed(Direction::ServerToClient, b, ts(i), &mut out),
            Op::GapC(n) => conn.gap(Direction::ClientToServer, *n, ts(i), &mut out),
            Op::GapS(n) => conn.gap(Direction::ServerToClient, *n, ts(i), &mut out),
            Op::Lost => conn.lost(ts(i), &mut out),
            Op::Close => conn.close(ts(i), &mut out),
        }
    }
    out
}

fn run(start: ConnStart, ops: &[Op]) -> (Vec<Http2Event>, Http2Counters) {
    let mut conn = Http2Conn::new(start);
    let events = run_conn(&mut conn, ops);
    (events, *conn.counters())
}

fn ended(events: &[Http2Event]) -> Vec<&Http2Stream> {
    events
        .iter()
        .filter_map(|e| match e {
            Http2Event::StreamEnded(s) => Some(&**s),
            _ => None,
        })
        .collect()
}

fn stream(events: &[Http2Event], id: u32) -> &Http2Stream {
    ended(events)
        .into_iter()
        .find(|s| s.stream_id == id)
        .unwrap_or_else(|| panic!("stream {id} did not end: {events:#?}"))
}

fn errors(events: &[Http2Event]) -> Vec<Http2Error> {
    events
        .iter()
        .filter_map(|e| match e {
            Http2Event::Error { error, .. } => Some(*error),
            _ => None,
        })
        .collect()
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn client_start() -> Vec<u8> {
    cat(&[PREFACE, &settings(&[(2, 0), (4, 4_194_304)])])
}

fn server_start() -> Vec<u8> {
    cat(&[&settings(&[(3, 250), (5, 16_384)]), &settings_ack()])
}

const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

/// A gRPC request head as grpc-go writes it, with a secret. Inserts, newest last:
/// content-type, te, user-agent, traceparent (so afterwards traceparent is index 62).
fn grpc_request(path: &str) -> Vec<u8> {
    block(&[
        F::Idx(METHOD_POST),
        F::Idx(SCHEME_HTTP),
        F::LitNH(PATH, path),
        F::LitNH(AUTHORITY, "localhost:50051"),
        F::IncN(CONTENT_TYPE, "application/grpc"),
        F::Inc("te", "trailers"),
        F::IncN(USER_AGENT, "grpc-go/1.60.0"),
        F::IncH("traceparent", TRACEPARENT),
        F::Never(AUTHORIZATION, "Bearer s3cret"),
    ])
}

/// The next request on the same connection, reusing the entries the first one inserted.
fn grpc_request_again(path: &str) -> Vec<u8> {
    block(&[
        F::Idx(METHOD_POST),
        F::Idx(SCHEME_HTTP),
        F::LitNH(PATH, path),
        F::LitNH(AUTHORITY, "localhost:50051"),
        F::Idx(65),
        F::Idx(64),
        F::Idx(63),
        F::Idx(62),
    ])
}

/// Response head; inserts content-type.
fn grpc_response() -> Vec<u8> {
    block(&[
        F::Idx(STATUS_200),
        F::IncN(CONTENT_TYPE, "application/grpc"),
    ])
}

fn grpc_trailers(status: &str, message: &str) -> Vec<u8> {
    block(&[
        F::Lit("grpc-status", status),
        F::Lit("grpc-message", message),
    ])
}

const REQ_MSG: &[u8] = b"\n\x05world";
const RESP_MSG: &[u8] = b"\n\x0bHello world";

fn unary() -> Vec<Op> {
    vec![
        Op::C(cat(&[
            &client_start(),
            &headers(
                1,
                END_HEADERS,
                &grpc_request("/helloworld.Greeter/SayHello"),
            ),
        ])),
        Op::S(server_start()),
        Op::C(cat(&[
            &settings_ack(),
            &data(1, END_STREAM, &grpc_msg(REQ_MSG)),
        ])),
        Op::S(cat(&[
            &headers(1, END_HEADERS, &grpc_response()),
            &data(1, 0, &grpc_msg(RESP_MSG)),
            &headers(1, END_HEADERS | END_STREAM, &grpc_trailers("0", "")),
        ])),
    ]
}

#[test]
fn unary_grpc_call() {
    let (events, counters) = run(ConnStart::Preface, &unary());
    assert!(errors(&events).is_empty(), "{events:#?}");
    let kinds: Vec<String> = events
        .iter()
        .map(|e| match e {
            Http2Event::StreamStarted { stream_id, .. } => format!("start {stream_id}"),
            Http2Event::Headers {
                kind, end_stream, ..
            } => format!("{kind:?} {end_stream}"),
            Http2Event::Data {
                dir,
                len,
                grpc_messages,
                ..
            } => format!("data {dir:?} {len} {grpc_messages}"),
            Http2Event::StreamEnded(s) => format!("end {:?}", s.end),
            e => format!("{e:?}"),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "start 1",
            "Request false",
            "data ClientToServer 12 1",
            "Response false",
            "data ServerToClient 18 1",
            "ResponseTrailers true",
            "end Complete",
        ]
    );
    let s = stream(&events, 1);
    assert_eq!(s.method(), Some("POST"));
    assert_eq!(s.path(), Some("/helloworld.Greeter/SayHello"));
    assert_eq!(s.grpc_method(), Some(("helloworld.Greeter", "SayHello")));
    assert_eq!(s.authority(), Some("localhost:50051"));
    assert_eq!(s.scheme(), Some("http"));
    assert!(s.is_grpc());
    let req = s.request.headers.as_ref().unwrap();
    assert_eq!(req.get("traceparent"), Some(TRACEPARENT));
    assert_eq!(req.get("user-agent"), Some("grpc-go/1.60.0"));
    assert_eq!(req.get("authorization"), Some(REDACTED));
    assert_eq!(s.status(), Some(200));
    assert_eq!(s.grpc_status(), Some(0));
    assert_eq!(s.grpc_message().as_deref(), Some(""));
    assert_eq!(
        s.request.body,
        BodyStats {
            bytes: 12,
            uncaptured: 0,
            exact: true,
            frames: 1,
            grpc_messages: 1,
            grpc_exact: true,
        }
    );
    assert_eq!(s.response.body.grpc_messages, 1);
    assert!(s.response.body.grpc_exact);
    assert_eq!(s.started, ts(0));
    assert_eq!(s.request.end, Some(ts(2)));
    assert_eq!(s.response.first, Some(ts(3)));
    assert_eq!((s.ended, s.end), (ts(3), StreamEnd::Complete));
    assert!(!s.partial());
    assert_eq!(counters.header_blocks, 3);
    assert_eq!(counters.unknown_fields, 0);
}

fn trailers_only() -> Vec<Op> {
    vec![
        Op::C(cat(&[
            &client_start(),
            &headers(1, END_HEADERS, &grpc_request("/pkg.Users/Get")),
            &data(1, END_STREAM, &grpc_msg(b"id")),
        ])),
        Op::S(cat(&[
            &server_start(),
            &headers(
                1,
                END_HEADERS | END_STREAM,
                &block(&[
                    F::Idx(STATUS_200),
                    F::IncN(CONTENT_TYPE, "application/grpc"),
                    F::Lit("grpc-status", "5"),
                    F::Lit("grpc-message", "user%20not%20found"),
                ]),
            ),
        ])),
    ]
}

#[test]
fn trailers_only_error_response() {
    let (events, _) = run(ConnStart::Preface, &trailers_only());
    assert!(events.iter().any(|e| matches!(
        e,
        Http2Event::Headers {
            kind: HeadersKind::Response,
            end_stream: true,
            ..
        }
    )));
    let s = stream(&events, 1);
    assert_eq!(s.status(), Some(200));
    assert_eq!(s.grpc_status(), Some(5));
    assert_eq!(s.grpc_message().as_deref(), Some("user not found"));
    assert!(s.response.trailers.is_none());
    assert_eq!(s.response.body.bytes, 0);
    assert_eq!(s.end, StreamEnd::Complete);
}

fn server_streaming() -> Vec<Op> {
    let body = cat(&[&grpc_msg(&[1; 10]), &grpc_msg(&[2; 20]), &grpc_msg(&[3; 5])]);
    assert_eq!(body.len(), 50);
    vec![
        Op::C(cat(&[
            &client_start(),
            &headers(
                1,
                END_HEADERS,
                &grpc_request("/routeguide.RouteGuide/ListFeatures"),
            ),
            &data(1, END_STREAM, &grpc_msg(b"rect")),
        ])),
        Op::S(cat(&[
            &server_start(),
            &headers(1, END_HEADERS, &grpc_response()),
            &data(1, 0, &body[..12]),
        ])),
        Op::S(data(1, 0, &body[12..30])),
        Op::S(cat(&[
            &data(1, 0, &body[30..]),
            &headers(1, END_HEADERS | END_STREAM, &grpc_trailers("0", "")),
        ])),
    ]
}

#[test]
fn server_streaming_messages_span_frames() {
    let (events, _) = run(ConnStart::Preface, &server_streaming());
    let per_frame: Vec<(u64, u32)> = events
        .iter()
        .filter_map(|e| match e {
            Http2Event::Data {
                dir: Direction::ServerToClient,
                len,
                grpc_messages,
                ..
            } => Some((*len, *grpc_messages)),
            _ => None,
        })
        .collect();
    assert_eq!(per_frame, [(12, 0), (18, 1), (20, 2)]);
    let s = stream(&events, 1);
    assert_eq!(
        s.grpc_method(),
        Some(("routeguide.RouteGuide", "ListFeatures"))
    );
    assert_eq!(s.response.body.grpc_messages, 3);
    assert_eq!(s.response.body.frames, 3);
    assert_eq!(s.response.body.bytes, 50);
    assert!(s.response.body.grpc_exact && s.response.body.exact);
    assert_eq!(s.grpc_status(), Some(0));
}

fn interleaved() -> Vec<Op> {
    vec![
        Op::C(cat(&[
            &client_start(),
            &headers(1, END_HEADERS, &grpc_request("/pkg.A/One")),
        ])),
        Op::C(headers(3, END_HEADERS, &grpc_request_again("/pkg.B/Two"))),
        Op::S(cat(&[
            &server_start(),
            &headers(3, END_HEADERS, &grpc_response()),
        ])),
        Op::C(cat(&[
            &data(3, END_STREAM, &grpc_msg(b"three")),
            &data(1, 0, &grpc_msg(b"one")),
        ])),
        Op::S(cat(&[
            // The second response reuses content-type at index 62.
            &headers(1, END_HEADERS, &block(&[F::Idx(STATUS_200), F::Idx(62)])),
            &data(1, 0, &grpc_msg(b"r1")),
            &data(3, 0, &grpc_msg(b"r3")),
            &headers(3, END_HEADERS | END_STREAM, &grpc_trailers("0", "")),
        ])),
        Op::C(data(1, END_STREAM, &[])),
        Op::S(headers(
            1,
            END_HEADERS | END_STREAM,
            &grpc_trailers("14", "unavailable"),
        )),
    ]
}

#[test]
fn interleaved_streams() {
    let (events, _) = run(ConnStart::Preface, &interleaved());
    assert!(errors(&events).is_empty(), "{events:#?}");
    let order: Vec<u32> = ended(&events).iter().map(|s| s.stream_id).collect();
    assert_eq!(order, [3, 1]);
    let one = stream(&events, 1);
    let three = stream(&events, 3);
    assert_eq!(one.grpc_method(), Some(("pkg.A", "One")));
    assert_eq!(three.grpc_method(), Some(("pkg.B", "Two")));
    // The second request's head came from the dynamic table: same fields but the path.
    let (h1, h3) = (
        one.request.headers.as_ref().unwrap(),
        three.request.headers.as_ref().unwrap(),
    );
    // All but the never-indexed authorization, which is not in the table.
    assert_eq!(h1.fields.len(), h3.fields.len() + 1);
    for name in [
        "content-type",
        "te",
        "user-agent",
        "traceparent",
        ":authority",
    ] {
        assert_eq!(h1.get(name), h3.get(name), "{name}");
    }
    assert_eq!(one.grpc_status(), Some(14));
    assert_eq!(three.grpc_status(), Some(0));
    assert_eq!(
        one.response.headers.as_ref().unwrap().get("content-type"),
        Some("application/grpc")
    );
    assert_eq!(
        (one.request.body.grpc_messages, one.request.body.frames),
        (1, 2)
    );
    assert!(!one.partial() && !three.partial());
}

fn continuation() -> Vec<Op> {
    let b = block(&[
        F::Idx(METHOD_GET),
        F::Idx(SCHEME_HTTP),
        F::LitNH(PATH, "/v1/sandbox/run?debug=1"),
        F::LitNH(AUTHORITY, "sandbox:8194"),
        F::Inc("x-api-key", "dify-sandbox"),
        F::IncH("accept", "application/json"),
    ]);
    vec![
        Op::C(cat(&[
            &client_start(),
            &headers(1, END_STREAM, &b[..7]),
            &frame(CONTINUATION, 0, 1, &b[7..20]),
        ])),
        Op::C(frame(CONTINUATION, END_HEADERS, 1, &b[20..])),
        Op::S(cat(&[
            &server_start(),
            &headers(1, END_HEADERS, &block(&[F::Idx(STATUS_200)])),
            &data(1, END_STREAM, b"ok"),
        ])),
    ]
}

#[test]
fn continuation_frames_make_one_block() {
    let (events, _) = run(ConnStart::Preface, &continuation());
    assert!(errors(&events).is_empty(), "{events:#?}");
    let s = stream(&events, 1);
    assert_eq!(s.method(), Some("GET"));
    assert_eq!(s.path(), Some("/v1/sandbox/run?debug=1"));
    let req = s.request.headers.as_ref().unwrap();
    assert_eq!(req.get("x-api-key"), Some(REDACTED));
    assert_eq!(req.get("accept"), Some("application/json"));
    // END_STREAM on the HEADERS frame takes effect when the block ends.
    assert_eq!(s.request.end, Some(ts(1)));
    assert_eq!(s.status(), Some(200));
    assert_eq!(s.response.body.bytes, 2);
    assert!(!s.is_grpc() && !s.response.body.grpc_exact);
}

#[test]
fn interrupted_header_block_is_partial() {
    let b = grpc_request("/pkg.A/One");
    let ops = vec![
        Op::C(cat(&[
            &client_start(),
            &headers(1, 0, &b[..10]),
            // Not the CONTINUATION the block needs.
            &headers(3, END_HEADERS, &block(&[F::Idx(METHOD_GET), F::Idx(62)])),
        ])),
        Op::Close,
    ];
    let (events, _) = run(ConnStart::Preface, &ops);
    assert_eq!(errors(&events), [Http2Error::ContinuationExpected]);
    let one = stream(&events, 1);
    assert!(one.request.headers.as_ref().unwrap().partial);
    assert_eq!(one.method(), Some("POST"));
    // The rest of block 1 may have inserted entries: index 62 is not guessed.
    let three = stream(&events, 3);
    let h = three.request.headers.as_ref().unwrap();
    assert_eq!(pairs(h), [(":method", "GET")]);
    assert_eq!(h.unknown_fields, 1);
}

fn pairs(b: &HeaderBlock) -> Vec<(&str, &str)> {
    b.fields
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect()
}

fn padding() -> Vec<Op> {
    let req = grpc_request("/pkg.Pad/Ded");
    vec![
        Op::C(cat(&[
            &client_start(),
            &frame(
                HEADERS,
                END_HEADERS | PADDED | PRIORITY_FLAG,
                1,
                &padded(&[0x80, 0, 0, 0, 15], &req, 7),
            ),
            &frame(
                DATA,
                PADDED | END_STREAM,
                1,
                &padded(&[], &grpc_msg(b"abc"), 10),
            ),
        ])),
        Op::S(cat(&[
            &server_start(),
            &frame(
                HEADERS,
                END_HEADERS | PADDED,
                1,
                &padded(&[], &grpc_response(), 3),
            ),
            &frame(DATA, PADDED, 1, &padded(&[], &grpc_msg(b"xy"), 0)),
            &frame(DATA, PADDED, 1, &padded(&[], &[], 20)),
            &headers(1, END_HEADERS | END_STREAM, &grpc_trailers("0", "")),
        ])),
    ]
}

#[test]
fn padding_is_not_content() {
    let (events, _) = run(ConnStart::Preface, &padding());
    assert!(errors(&events).is_empty(), "{events:#?}");
    let s = stream(&events, 1);
    assert_eq!(s.path(), Some("/pkg.Pad/Ded"));
    assert_eq!((s.request.body.bytes, s.request.body.grpc_messages), (8, 1));
    assert_eq!(
        (
            s.response.body.bytes,
            s.response.body.frames,
            s.response.body.grpc_messages
        ),
        (7, 2, 1)
    );
    assert!(s.response.body.exact && !s.partial());
}

#[test]
fn bad_padding_is_reported() {
    let ops = vec![Op::C(cat(&[
        &client_start(),
        // Pad length 200 in a 6-byte payload.
        &frame(
            HEADERS,
            END_HEADERS | PADDED,
            1,
            &[200, 0x82, 0x86, 0x84, 0, 0],
        ),
        &headers(3, END_HEADERS, &block(&[F::Idx(METHOD_GET)])),
    ]))];
    let (events, _) = run(ConnStart::Preface, &ops);
    assert_eq!(errors(&events), [Http2Error::BadPadding]);
}

fn reset() -> Vec<Op> {
    vec![
        Op::C(cat(&[
            &client_start(),
            &headers(1, END_HEADERS, &grpc_request("/pkg.Chat/Stream")),
            &data(1, 0, &grpc_msg(b"hello")),
        ])),
        Op::S(cat(&[
            &server_start(),
            &headers(1, END_HEADERS, &grpc_response()),
        ])),
        Op::C(rst(1, 8)),
        // In flight when the reset crossed: not a new stream.
        Op::S(data(1, 0, &grpc_msg(b"late"))),
    ]
}

#[test]
fn rst_stream_ends_the_stream() {
    let (events, _) = run(ConnStart::Preface, &reset());
    let s = stream(&events, 1);
    assert_eq!(
        s.end,
        StreamEnd::Reset {
            code: Some(8),
            by: Direction::ClientToServer
        }
    );
    assert_eq!(s.ended, ts(2));
    assert_eq!(s.request.body.grpc_messages, 1);
    assert_eq!(ended(&events).len(), 1);
    let starts = events
        .iter()
        .filter(|e| matches!(e, Http2Event::StreamStarted { .. }))
        .count();
    assert_eq!(starts, 1);
}

/// RST_STREAM (4-byte payload) and GOAWAY (8 bytes and more) with frames after them in
/// the same chunk.
fn control_then_more() -> Vec<Op> {
    let mut ops = reset();
    ops[2] = Op::C(cat(&[
        &rst(1, 8),
        &headers(3, END_HEADERS | END_STREAM, &block(&[F::Idx(METHOD_GET)])),
    ]));
    ops.push(Op::S(cat(&[
        &goaway(3, 0),
        &headers(3, END_HEADERS | END_STREAM, &block(&[F::Idx(STATUS_200)])),
    ])));
    ops
}

#[test]
fn control_frame_followed_by_more_in_one_chunk() {
    let (events, counters) = run(ConnStart::Preface, &control_then_more());
    assert!(errors(&events).is_empty(), "{events:#?}");
    let s = stream(&events, 3);
    assert_eq!(
        (s.method(), s.status(), s.end),
        (Some("GET"), Some(200), StreamEnd::Complete)
    );
    assert_eq!(counters.unknown_frames, 0);
}

fn goaway_ops() -> Vec<Op> {
    vec![
        Op::C(cat(&[
            &client_start(),
            &headers(1, END_HEADERS, &grpc_request("/pkg.A/One")),
            &data(1, END_STREAM, &grpc_msg(b"1")),
            &headers(3, END_HEADERS, &grpc_request_again("/pkg.A/Two")),
            &data(3, END_STREAM, &grpc_msg(b"3")),
        ])),
        Op::S(cat(&[&server_start(), &goaway(1, 0)])),
        Op::S(cat(&[
            &headers(1, END_HEADERS, &grpc_response()),
            &headers(1, END_HEADERS | END_STREAM, &grpc_trailers("0", "")),
        ])),
        Op::Close,
    ]
}

#[test]
fn goaway_ends_streams_above_its_last_id() {
    let (events, _) = run(ConnStart::Preface, &goaway_ops());
    assert!(events.iter().any(|e| matches!(
        e,
        Http2Event::GoAway {
            dir: Direction::ServerToClient,
            last_stream_id: 1,
            error_code: 0,
            ..
        }
    )));
    let three = stream(&events, 3);
    assert_eq!(
        (three.end, three.ended),
        (
            StreamEnd::GoAway {
                code: 0,
                by: Direction::ServerToClient
            },
            ts(1)
        )
    );
    assert_eq!(stream(&events, 1).end, StreamEnd::Complete);
}

/// Text that cannot hold a plausible frame header: every type byte is a letter.
const NOT_FRAMES: &[u8] = b"the tail of some earlier DATA frame, lorem ipsum dolor sit amet";

fn mid_connection() -> Vec<Op> {
    vec![
        Op::C(cat(&[
            NOT_FRAMES,
            &headers(
                5,
                END_HEADERS,
                &block(&[
                    F::Idx(METHOD_POST),
                    F::Idx(SCHEME_HTTP),
                    F::LitNH(PATH, "/pkg.Svc/Get"),
                    // Entries from before we joined: must not be guessed.
                    F::Idx(62),
                    F::Idx(63),
                    F::Inc("x-req-id", "abc"),
                ]),
            ),
            &data(5, END_STREAM, &grpc_msg(b"hi")),
        ])),
        Op::S(cat(&[
            &headers(5, END_HEADERS, &block(&[F::Idx(STATUS_200), F::Idx(62)])),
            &data(5, 0, &grpc_msg(b"yo")),
            &headers(5, END_HEADERS | END_STREAM, &grpc_trailers("0", "")),
        ])),
        Op::C(cat(&[
            &headers(
                7,
                END_HEADERS,
                &block(&[
                    F::Idx(METHOD_POST),
                    F::Idx(SCHEME_HTTP),
                    F::LitNH(PATH, "/pkg.Svc/Put"),
                    // x-req-id, inserted after we joined, then an unknown one.
                    F::Idx(62),
                    F::Idx(64),
                ]),
            ),
            &data(7, END_STREAM, &[]),
        ])),
        Op::S(cat(&[
            &headers(7, END_HEADERS, &block(&[F::Idx(STATUS_200)])),
            &data(7, END_STREAM, b"done"),
        ])),
    ]
}

#[test]
fn mid_connection_marks_unknown_table_references() {
    let (events, counters) = run(ConnStart::MidStream, &mid_connection());
    let five = stream(&events, 5);
    let h = five.request.headers.as_ref().unwrap();
    assert_eq!(
        pairs(h),
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/pkg.Svc/Get"),
            ("x-req-id", "abc")
        ]
    );
    assert!(h.partial);
    assert_eq!(h.unknown_fields, 2);
    assert!(!five.missed_start);
    assert!(five.partial());
    assert_eq!(five.status(), Some(200));
    assert_eq!(five.grpc_status(), Some(0));
    assert_eq!(five.response.headers.as_ref().unwrap().unknown_fields, 1);
    let seven = stream(&events, 7);
    let h = seven.request.headers.as_ref().unwrap();
    assert_eq!(h.get("x-req-id"), Some("abc"));
    assert_eq!(h.unknown_fields, 1);
    assert_eq!(seven.response.body.bytes, 4);
    assert_eq!(counters.resyncs, 2);
    assert_eq!(counters.resync_skipped_bytes, NOT_FRAMES.len() as u64);
    assert_eq!(counters.unknown_fields, 4);
}

#[test]
fn mid_stream_start_that_sees_the_preface_knows_the_table() {
    let ops = vec![
        Op::C(cat(&[
            &client_start(),
            &headers(
                1,
                END_HEADERS | END_STREAM,
                &block(&[F::Idx(METHOD_GET), F::Inc("x-a", "1")]),
            ),
            &headers(
                3,
                END_HEADERS | END_STREAM,
                &block(&[F::Idx(METHOD_GET), F::Idx(62), F::Idx(63)]),
            ),
        ])),
        Op::Close,
    ];
    let (events, _) = run(ConnStart::MidStream, &ops);
    // 63 is past the end of a table known to be complete: a broken block, not an unknown.
    assert_eq!(errors(&events), [Http2Error::Hpack(HpackError::BadIndex)]);
    let h = stream(&events, 3).request.headers.clone().unwrap();
    assert_eq!(pairs(&h), [(":method", "GET"), ("x-a", "1")]);
}

fn table_size_settings() -> Vec<Op> {
    vec![
        // The client lets the server's encoder use 8 KiB.
        Op::C(cat(&[
            PREFACE,
            &settings(&[(1, 8192)]),
            &headers(
                1,
                END_HEADERS | END_STREAM,
                &block(&[F::Idx(METHOD_GET), F::Idx(PATH)]),
            ),
        ])),
        Op::S(cat(&[
            &settings(&[]),
            &settings_ack(),
            &headers(
                1,
                END_HEADERS,
                &block(&[
                    F::SizeUpdate(8192),
                    F::Idx(STATUS_200),
                    F::Inc("x-big", "v"),
                ]),
            ),
            &data(1, END_STREAM, b"a"),
        ])),
        Op::C(cat(&[
            &settings_ack(),
            &headers(
                3,
                END_HEADERS | END_STREAM,
                &block(&[F::Idx(METHOD_GET), F::Idx(PATH)]),
            ),
        ])),
        Op::S(cat(&[
            &headers(3, END_HEADERS, &block(&[F::Idx(STATUS_200), F::Idx(62)])),
            // Size 0 empties the table; index 62 is then past its end.
            &headers(
                3,
                END_HEADERS | END_STREAM,
                &block(&[F::SizeUpdate(0), F::Idx(62)]),
            ),
        ])),
    ]
}

#[test]
fn settings_header_table_size_bounds_size_updates() {
    let (events, counters) = run(ConnStart::Preface, &table_size_settings());
    assert_eq!(errors(&events), [Http2Error::Hpack(HpackError::BadIndex)]);
    let one = stream(&events, 1);
    assert_eq!(
        one.response.headers.as_ref().unwrap().get("x-big"),
        Some("v")
    );
    let three = stream(&events, 3);
    assert_eq!(
        three.response.headers.as_ref().unwrap().get("x-big"),
        Some("v")
    );
    assert!(three.response.trailers.as_ref().unwrap().partial);
    assert_eq!(counters.hpack_errors, 1);

    // Without the client's SETTINGS the same size update is over the limit.
    let mut ops = table_size_settings();
    ops[0] = Op::C(cat(&[
        PREFACE,
        &settings(&[]),
        &headers(
            1,
            END_HEADERS | END_STREAM,
            &block(&[F::Idx(METHOD_GET), F::Idx(PATH)]),
        ),
    ]));
    let (events, _) = run(ConnStart::Preface, &ops);
    assert_eq!(
        errors(&events).first(),
        Some(&Http2Error::Hpack(HpackError::SizeUpdateTooLarge))
    );
    let one = stream(&events, 1);
    assert!(one.response.headers.as_ref().unwrap().partial);
    assert_eq!(one.status(), None);
    // The table is unknown after the error, so index 62 is not guessed either.
    let three = stream(&events, 3);
    assert_eq!(three.response.headers.as_ref().unwrap().get("x-big"), None);
}

/// A unary call whose request message is `len` bytes, the request DATA frame cut at `cut`
/// (from the frame start) with `lost` bytes after it lost.
fn gap_in_data(len: usize, cut: usize, lost: u64) -> Vec<Op> {
    let msg = grpc_msg(&vec![7u8; len]);
    let frame = data(1, END_STREAM, &msg);
    let mut ops = unary();
    let lost_usize = lost as usize;
    ops[2] = Op::C(cat(&[&settings_ack(), &frame[..cut]]));
    ops.insert(3, Op::GapC(lost));
    ops.insert(4, Op::C(frame[cut + lost_usize..].to_vec()));
    ops
}

#[test]
fn gap_inside_data_keeps_the_stream() {
    // 9-byte frame header, 5-byte gRPC prefix, then 20 captured payload bytes.
    let (events, counters) = run(ConnStart::Preface, &gap_in_data(100, 9 + 5 + 20, 60));
    assert!(errors(&events).is_empty(), "{events:#?}");
    let s = stream(&events, 1);
    assert_eq!(s.end, StreamEnd::Complete);
    let body = s.request.body;
    assert_eq!((body.bytes, body.uncaptured, body.exact), (105, 60, true));
    // The gap sat inside the message payload, so the count is still exact.
    assert_eq!((body.grpc_messages, body.grpc_exact), (1, true));
    assert_eq!(s.grpc_status(), Some(0));
    assert_eq!(counters.sync_losses, 0);

    // A gap over the gRPC length prefix: same byte count, message count unknown.
    let (events, _) = run(ConnStart::Preface, &gap_in_data(100, 9 + 2, 30));
    let body = stream(&events, 1).request.body;
    assert_eq!((body.bytes, body.uncaptured, body.exact), (105, 30, true));
    assert!(!body.grpc_exact);
}

fn gap_in_headers() -> Vec<Op> {
    let b = grpc_request("/pkg.A/One");
    let h = headers(1, END_HEADERS, &b);
    vec![
        Op::C(cat(&[&client_start(), &h[..9 + 6]])),
        Op::GapC(20),
        Op::C(cat(&[
            &h[9 + 6 + 20..],
            &data(1, END_STREAM, &grpc_msg(b"x")),
            // In reality 62 is traceparent: we must not claim to know it.
            &headers(3, END_HEADERS, &grpc_request_again("/pkg.A/Two")),
            &data(3, END_STREAM, &grpc_msg(b"y")),
        ])),
        Op::S(cat(&[
            &server_start(),
            &headers(1, END_HEADERS, &grpc_response()),
            &headers(1, END_HEADERS | END_STREAM, &grpc_trailers("0", "")),
            &headers(3, END_HEADERS, &block(&[F::Idx(STATUS_200), F::Idx(62)])),
            &headers(3, END_HEADERS | END_STREAM, &grpc_trailers("0", "")),
        ])),
    ]
}

#[test]
fn gap_inside_header_block_is_partial_never_wrong() {
    let (events, counters) = run(ConnStart::Preface, &gap_in_headers());
    let one = stream(&events, 1);
    let h = one.request.headers.as_ref().unwrap();
    assert!(h.partial);
    assert_eq!(one.method(), Some("POST"));
    assert_eq!(h.get("traceparent"), None);
    assert_eq!(one.end, StreamEnd::Complete);
    assert!(one.partial());
    let three = stream(&events, 3);
    let h = three.request.headers.as_ref().unwrap();
    assert_eq!(three.path(), Some("/pkg.A/Two"));
    assert_eq!(h.unknown_fields, 4);
    for name in ["content-type", "te", "user-agent", "traceparent"] {
        assert_eq!(h.get(name), None, "{name}");
    }
    // The server direction was not touched.
    assert_eq!(
        three.response.headers.as_ref().unwrap().get("content-type"),
        Some("application/grpc")
    );
    assert_eq!(counters.truncated_blocks, 1);
    assert_eq!(counters.sync_losses, 0);
}

fn gap_across_frames() -> Vec<Op> {
    let trailers1 = headers(1, END_HEADERS | END_STREAM, &grpc_trailers("0", ""));
    let resp_data = data(1, 0, &grpc_msg(&[9; 40]));
    vec![
        Op::C(cat(&[
            &client_start(),
            &headers(1, END_HEADERS, &grpc_request("/pkg.A/One")),
            &data(1, END_STREAM, &grpc_msg(b"1")),
            &headers(3, END_HEADERS, &grpc_request_again("/pkg.A/Two")),
            &data(3, END_STREAM, &grpc_msg(b"3")),
        ])),
        Op::S(cat(&[
            &server_start(),
            &headers(1, END_HEADERS, &grpc_response()),
            &resp_data[..20],
        ])),
        // The rest of the DATA frame and all of stream 1's trailers.
        Op::GapS((resp_data.len() - 20 + trailers1.len()) as u64),
        Op::S(cat(&[
            &headers(3, END_HEADERS, &block(&[F::Idx(STATUS_200), F::Idx(62)])),
            &data(3, 0, &grpc_msg(b"r3")),
            &headers(3, END_HEADERS | END_STREAM, &grpc_trailers("0", "")),
        ])),
        Op::Close,
    ]
}

#[test]
fn gap_across_frames_resyncs() {
    let (events, counters) = run(ConnStart::Preface, &gap_across_frames());
    assert_eq!(errors(&events), [Http2Error::SyncLost]);
    let three = stream(&events, 3);
    assert_eq!(three.end, StreamEnd::Complete);
    assert!(three.sync_lost && three.partial());
    let h = three.response.headers.as_ref().unwrap();
    assert_eq!((h.status(), h.unknown_fields), (Some(200), 1));
    assert_eq!(three.grpc_status(), Some(0));
    // Its body was seen whole, but frames of the direction may have been missed.
    assert!(!three.response.body.exact);
    let one = stream(&events, 1);
    assert_eq!(one.end, StreamEnd::ConnectionClosed);
    assert!(one.sync_lost && !one.response.body.grpc_exact);
    assert_eq!((counters.sync_losses, counters.resyncs), (1, 1));
}

fn extras() -> Vec<Op> {
    let mut ops = unary();
    ops.insert(
        1,
        Op::C(cat(&[
            &frame(0xfa, 0xff, 0, b"extension"),
            &ping(false),
            &window_update(0, 65_535),
            &priority(1),
            &window_update(1, 1024),
        ])),
    );
    ops.push(Op::S(cat(&[
        &ping(true),
        &window_update(1, 5),
        &goaway(1, 0),
    ])));
    ops.push(Op::Close);
    ops
}

#[test]
fn control_and_unknown_frames_are_skipped() {
    let (events, counters) = run(ConnStart::Preface, &extras());
    assert!(errors(&events).is_empty(), "{events:#?}");
    assert_eq!(ended(&events).len(), 1);
    assert_eq!(stream(&events, 1).grpc_status(), Some(0));
    assert_eq!(counters.unknown_frames, 1);
}

#[test]
fn close_ends_open_streams() {
    let mut ops = unary();
    ops.truncate(2);
    ops.push(Op::C(data(1, 0, &grpc_msg(b"partial"))));
    ops.push(Op::Close);
    ops.push(Op::C(b"after close".to_vec()));
    let (events, _) = run(ConnStart::Preface, &ops);
    let s = stream(&events, 1);
    assert_eq!((s.end, s.ended), (StreamEnd::ConnectionClosed, ts(3)));
    assert_eq!(s.request.body.grpc_messages, 1);
}

#[test]
fn not_http2() {
    let ops = vec![
        Op::C(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        Op::S(b"HTTP/1.1 200 OK\r\n\r\n".to_vec()),
    ];
    let mut conn = Http2Conn::new(ConnStart::Preface);
    let events = run_conn(&mut conn, &ops);
    assert_eq!(errors(&events), [Http2Error::NotHttp2]);
    assert!(conn.is_not_http2());

    // Server frames seen before the client turned out not to speak HTTP/2 still end.
    let ops = vec![
        Op::S(headers(1, END_HEADERS, &block(&[F::Idx(STATUS_200)]))),
        Op::C(b"GET / HTTP/1.1\r\n\r\n".to_vec()),
        Op::S(data(1, END_STREAM, b"x")),
        Op::Close,
    ];
    let mut conn = Http2Conn::new(ConnStart::Preface);
    let events = run_conn(&mut conn, &ops);
    assert_eq!(stream(&events, 1).end, StreamEnd::ConnectionClosed);
    assert_eq!(conn.open_streams(), 0);
}

fn lost_records() -> Vec<Op> {
    let mut ops = unary();
    ops.insert(2, Op::Lost);
    ops.push(Op::C(cat(&[
        &headers(3, END_HEADERS, &grpc_request_again("/pkg.A/Two")),
        &data(3, END_STREAM, &grpc_msg(b"3")),
    ])));
    ops.push(Op::S(cat(&[
        &headers(3, END_HEADERS, &grpc_response()),
        &headers(3, END_HEADERS | END_STREAM, &grpc_trailers("0", "")),
    ])));
    ops
}

#[test]
fn lost_records_resync_both_directions() {
    let (events, counters) = run(ConnStart::Preface, &lost_records());
    assert_eq!(counters.sync_losses, 2);
    let one = stream(&events, 1);
    assert!(one.sync_lost);
    assert_eq!(one.grpc_status(), Some(0));
    let three = stream(&events, 3);
    assert_eq!(three.path(), Some("/pkg.A/Two"));
    assert_eq!(three.request.headers.as_ref().unwrap().unknown_fields, 4);
}

#[test]
fn over_long_header_block_is_cut_and_counted() {
    let big = "v".repeat(200);
    let mut fields = vec![F::Idx(METHOD_GET), F::LitNH(PATH, "/big")];
    for _ in 0..400 {
        fields.push(F::Lit("x-filler", &big));
    }
    let b = block(&fields);
    assert!(b.len() > MAX_HEADER_BLOCK_BYTES);
    let mut bytes = client_start();
    bytes.extend(headers(1, 0, &b[..16_000]));
    for (i, part) in b[16_000..].chunks(16_000).enumerate() {
        let last = 16_000 + (i + 1) * 16_000 >= b.len();
        bytes.extend(frame(
            CONTINUATION,
            if last { END_HEADERS } else { 0 },
            1,
            part,
        ));
    }
    let ops = vec![Op::C(bytes), Op::C(data(1, END_STREAM, &[])), Op::Close];
    let (events, counters) = run(ConnStart::Preface, &ops);
    assert_eq!(errors(&events), [Http2Error::HeaderBlockTooLong]);
    let s = stream(&events, 1);
    let h = s.request.headers.as_ref().unwrap();
    assert_eq!(s.path(), Some("/big"));
    assert!(h.partial);
    assert!(h.fields.len() <= MAX_HEADERS && h.dropped_fields > 0);
    assert_eq!(
        counters.header_bytes_dropped,
        (b.len() - MAX_HEADER_BLOCK_BYTES) as u64
    );
}

#[test]
fn stream_count_is_bounded() {
    let mut bytes = client_start();
    let n = MAX_STREAMS as u32 + 10;
    for i in 0..n {
        bytes.extend(headers(
            2 * i + 1,
            END_HEADERS,
            &block(&[F::Idx(METHOD_GET)]),
        ));
    }
    let (events, counters) = run(ConnStart::Preface, &[Op::C(bytes), Op::Close]);
    assert_eq!(counters.streams_evicted, 10);
    let lost: Vec<u32> = ended(&events)
        .iter()
        .filter(|s| s.end == StreamEnd::Lost)
        .map(|s| s.stream_id)
        .collect();
    assert_eq!(lost, (0..10).map(|i| 2 * i + 1).collect::<Vec<_>>());
}

/// A binary DATA payload we join in the middle of, then real frames.
fn mid_data_frame() -> Vec<Op> {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let junk: Vec<u8> = (0..3000)
        .map(|i| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            // Protobuf-ish: plenty of zero bytes.
            if i % 3 == 0 { 0 } else { seed as u8 }
        })
        .collect();
    vec![
        Op::C(cat(&[
            &junk[..100],
            &headers(
                11,
                END_HEADERS | END_STREAM,
                &block(&[F::Idx(METHOD_GET), F::LitNH(PATH, "/x")]),
            ),
            &window_update(0, 1000),
        ])),
        Op::S(cat(&[
            &junk,
            &data(9, END_STREAM, &grpc_msg(b"tail")),
            &headers(11, END_HEADERS, &block(&[F::Idx(STATUS_200)])),
            &data(11, END_STREAM, b"body"),
        ])),
        Op::Close,
    ]
}

#[test]
fn joining_inside_a_binary_data_frame() {
    let (events, counters) = run(ConnStart::MidStream, &mid_data_frame());
    let ids: Vec<u32> = ended(&events).iter().map(|s| s.stream_id).collect();
    // Stream 11, and 9 whose request we never saw; nothing made up from the junk.
    assert_eq!(ids, [11, 9], "{events:#?}");
    let nine = stream(&events, 9);
    assert!(nine.missed_start && nine.request.headers.is_none());
    assert_eq!(nine.response.body.bytes, 9);
    let eleven = stream(&events, 11);
    assert_eq!(eleven.path(), Some("/x"));
    assert_eq!(eleven.response.body.bytes, 4);
    assert_eq!(counters.resync_skipped_bytes, 3100);
}

fn server_push() -> Vec<Op> {
    let mut promise = 2u32.to_be_bytes().to_vec();
    promise.extend(block(&[
        F::Idx(METHOD_GET),
        F::Inc("x-pushed", "1"),
        F::LitNH(PATH, "/style.css"),
    ]));
    vec![
        Op::C(cat(&[
            &client_start(),
            &headers(
                1,
                END_HEADERS | END_STREAM,
                &block(&[F::Idx(METHOD_GET), F::Idx(PATH)]),
            ),
        ])),
        Op::S(cat(&[
            &server_start(),
            &frame(PUSH_PROMISE, END_HEADERS, 1, &promise),
            // The promise inserted x-pushed into the server's table.
            &headers(1, END_HEADERS, &block(&[F::Idx(STATUS_200), F::Idx(62)])),
            &headers(2, END_HEADERS, &block(&[F::Idx(STATUS_200)])),
            &data(2, END_STREAM, b"body{}"),
            &data(1, END_STREAM, b"<html>"),
        ])),
    ]
}

#[test]
fn server_push_keeps_the_table_and_is_not_followed() {
    let (events, counters) = run(ConnStart::Preface, &server_push());
    assert!(errors(&events).is_empty(), "{events:#?}");
    let ids: Vec<u32> = ended(&events).iter().map(|s| s.stream_id).collect();
    assert_eq!(ids, [1]);
    let s = stream(&events, 1);
    assert_eq!(
        s.response.headers.as_ref().unwrap().get("x-pushed"),
        Some("1")
    );
    assert_eq!(s.response.body.bytes, 6);
    assert_eq!(counters.ignored_blocks, 2);
}

struct Recording {
    name: &'static str,
    start: ConnStart,
    ops: Vec<Op>,
}

fn recordings() -> Vec<Recording> {
    let r = |name, start, ops| Recording { name, start, ops };
    let fresh = ConnStart::Preface;
    vec![
        r("unary", fresh, unary()),
        r("trailers only", fresh, trailers_only()),
        r("server streaming", fresh, server_streaming()),
        r("interleaved", fresh, interleaved()),
        r("continuation", fresh, continuation()),
        r("padding", fresh, padding()),
        r("reset", fresh, reset()),
        r("control then more", fresh, control_then_more()),
        r("goaway", fresh, goaway_ops()),
        r("mid connection", ConnStart::MidStream, mid_connection()),
        r("table size settings", fresh, table_size_settings()),
        r("gap in data", fresh, gap_in_data(100, 9 + 5 + 20, 60)),
        r("gap over grpc prefix", fresh, gap_in_data(100, 9 + 2, 30)),
        r("gap in headers", fresh, gap_in_headers()),
        r("gap across frames", fresh, gap_across_frames()),
        r("extras", fresh, extras()),
        r("lost records", fresh, lost_records()),
        r("inside binary data", ConnStart::MidStream, mid_data_frame()),
        r("server push", fresh, server_push()),
        r("grpc-go recording", fresh, grpc_go_recording()),
    ]
}

/// Rebuilds `ops` with each feed also split before every fed byte (counted across all
/// feeds) for which `cut` holds; the pieces keep their op's timestamp.
fn resplit(ops: &[Op], cut: impl Fn(usize) -> bool) -> Vec<(usize, Op)> {
    let mut out = Vec::new();
    let mut offset = 0;
    for (i, op) in ops.iter().enumerate() {
        let (bytes, client) = match op {
            Op::C(b) => (b, true),
            Op::S(b) => (b, false),
            _ => {
                out.push((i, op.clone()));
                continue;
            }
        };
        let wrap = |b: &[u8]| {
            if client {
                Op::C(b.to_vec())
            } else {
                Op::S(b.to_vec())
            }
        };
        let mut from = 0;
        for j in 1..bytes.len() {
            if cut(offset + j) {
                out.push((i, wrap(&bytes[from..j])));
                from = j;
            }
        }
        out.push((i, wrap(&bytes[from..])));
        offset += bytes.len();
    }
    out
}

fn run_split(start: ConnStart, ops: &[(usize, Op)]) -> Vec<Http2Event> {
    let mut conn = Http2Conn::new(start);
    let mut out = Vec::new();
    for (i, op) in ops {
        let t = ts(*i);
        match op {
            Op::C(b) => conn.feed(Direction::ClientToServer, b, t, &mut out),
            Op::S(b) => conn.feed(Direction::ServerToClient, b, t, &mut out),
            Op::GapC(n) => conn.gap(Direction::ClientToServer, *n, t, &mut out),
            Op::GapS(n) => conn.gap(Direction::ServerToClient, *n, t, &mut out),
            Op::Lost => conn.lost(t, &mut out),
            Op::Close => conn.close(t, &mut out),
        }
    }
    out
}

#[test]
fn any_split_gives_the_same_events() {
    for r in recordings() {
        let (whole, _) = run(r.start, &r.ops);
        assert!(!whole.is_empty(), "{}", r.name);
        let fed: usize = r
            .ops
            .iter()
            .map(|op| match op {
                Op::C(b) | Op::S(b) => b.len(),
                _ => 0,
            })
            .sum();
        for at in 0..=fed {
            let split = run_split(r.start, &resplit(&r.ops, |i| i == at));
            assert_eq!(split, whole, "{}: split at {at}", r.name);
        }
        let bytewise = run_split(r.start, &resplit(&r.ops, |_| true));
        assert_eq!(bytewise, whole, "{}: 1-byte chunks", r.name);
    }
}

#[test]
fn garbage_never_panics() {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..300 {
        let start = if round % 2 == 0 {
            ConnStart::Preface
        } else {
            ConnStart::MidStream
        };
        let mut conn = Http2Conn::new(start);
        let mut out = Vec::new();
        if round % 3 == 0 {
            conn.feed(Direction::ClientToServer, PREFACE, ts(0), &mut out);
        }
        for i in 0..40 {
            let len = (rand() % 64) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| rand() as u8).collect();
            // Now and then a real-looking frame header with a random payload.
            if rand() % 4 == 0 {
                let kind = (rand() % 11) as u8;
                let flags = rand() as u8;
                bytes = cat(&[&frame(kind, flags, (rand() % 8) as u32, &bytes)]);
            }
            let dir = if rand() % 2 == 0 {
                Direction::ClientToServer
            } else {
                Direction::ServerToClient
            };
            match rand() % 16 {
                0 => conn.gap(dir, rand() % 100, ts(i), &mut out),
                1 => conn.gap(dir, u64::MAX, ts(i), &mut out),
                2 => conn.lost(ts(i), &mut out),
                _ => conn.feed(dir, &bytes, ts(i), &mut out),
            }
        }
        conn.close(ts(99), &mut out);
        assert_eq!(conn.open_streams(), 0);
    }
}

#[test]
fn every_byte_value_after_each_prefix_never_panics() {
    for r in recordings() {
        let fed: Vec<(bool, Vec<u8>)> = r
            .ops
            .iter()
            .filter_map(|op| match op {
                Op::C(b) => Some((true, b.clone())),
                Op::S(b) => Some((false, b.clone())),
                _ => None,
            })
            .collect();
        let Some((client, first)) = fed.first() else {
            continue;
        };
        let dir = if *client {
            Direction::ClientToServer
        } else {
            Direction::ServerToClient
        };
        for cut in (0..first.len().min(300)).step_by(3) {
            for b in [0u8, 1, 4, 9, 0x80, 0xff] {
                let mut conn = Http2Conn::new(r.start);
                let mut out = Vec::new();
                conn.feed(dir, &first[..cut], ts(0), &mut out);
                conn.feed(dir, &[b], ts(1), &mut out);
                conn.gap(dir, 17, ts(2), &mut out);
                for (c, bytes) in &fed {
                    let d = if *c {
                        Direction::ClientToServer
                    } else {
                        Direction::ServerToClient
                    };
                    conn.feed(d, bytes, ts(3), &mut out);
                }
                conn.close(ts(4), &mut out);
            }
        }
    }
}

/// The recorded grpc-go connection (see `testdata/README.md`) as ops, one per relay read.
fn grpc_go_recording() -> Vec<Op> {
    let mut rest: &[u8] = include_bytes!("../testdata/grpc_health.bin");
    let mut ops = Vec::new();
    while let [dir, l0, l1, l2, l3, tail @ ..] = rest {
        let len = u32::from_be_bytes([*l0, *l1, *l2, *l3]) as usize;
        let bytes = tail[..len].to_vec();
        ops.push(if *dir == b'C' {
            Op::C(bytes)
        } else {
            Op::S(bytes)
        });
        rest = &tail[len..];
    }
    ops.push(Op::Close);
    ops
}

#[test]
fn recorded_grpc_go_connection() {
    let (events, counters) = run(ConnStart::Preface, &grpc_go_recording());
    assert!(errors(&events).is_empty(), "{events:#?}");
    assert!(!format!("{events:?}").contains("fixture-secret-token"));
    let ids: Vec<u32> = ended(&events).iter().map(|s| s.stream_id).collect();
    assert_eq!(ids, [1, 3, 5, 7]);
    for s in ended(&events) {
        let req = s.request.headers.as_ref().unwrap();
        assert_eq!(s.method(), Some("POST"));
        assert_eq!(req.get("authorization"), Some(REDACTED));
        assert_eq!(
            req.get("traceparent"),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        assert_eq!(
            req.get("user-agent"),
            Some("difytrace-fixture grpc-go/1.85.0")
        );
        assert!(s.is_grpc() && !s.partial(), "{s:#?}");
        assert_eq!(s.status(), Some(200));
        let want = if s.stream_id == 7 { "Watch" } else { "Check" };
        assert_eq!(s.grpc_method(), Some(("grpc.health.v1.Health", want)));
        assert_eq!(
            (s.request.body.grpc_messages, s.request.body.grpc_exact),
            (1, true)
        );
    }
    for id in [1, 3] {
        let s = stream(&events, id);
        assert_eq!((s.grpc_status(), s.end), (Some(0), StreamEnd::Complete));
        assert_eq!(s.response.body.grpc_messages, 1);
    }
    // Trailers-only: the status sits in the response head.
    let five = stream(&events, 5);
    assert_eq!(five.grpc_status(), Some(5));
    assert_eq!(five.grpc_message().as_deref(), Some("unknown service"));
    assert!(five.response.trailers.is_none());
    assert_eq!(five.end, StreamEnd::Complete);
    // Server streaming, cancelled by the client.
    let seven = stream(&events, 7);
    assert_eq!(
        (
            seven.response.body.grpc_messages,
            seven.response.body.grpc_exact
        ),
        (3, true)
    );
    assert_eq!(
        seven.end,
        StreamEnd::Reset {
            code: Some(8),
            by: Direction::ClientToServer
        }
    );
    assert_eq!(seven.grpc_status(), None);
    assert_eq!(counters.hpack_errors + counters.unknown_fields, 0);
}

/// Every field of `part` is in `full` with the same value.
fn fields_agree(part: Option<&HeaderBlock>, full: Option<&HeaderBlock>, what: &str) {
    let Some(part) = part else {
        return;
    };
    let full = full.unwrap_or_else(|| panic!("{what}: block not in the full run"));
    for f in &part.fields {
        assert!(full.fields.contains(f), "{what}: {f:?} not in {full:?}");
    }
    if !part.partial {
        assert_eq!(part.fields, full.fields, "{what}");
    }
}

/// What the parser says about a stream from part of the bytes never contradicts what it
/// says from all of them.
/// Returns how many streams it compared and how many of them were partial.
fn agrees_with_full_run(
    ops: &[Op],
    start: ConnStart,
    full: &[Http2Event],
    what: &str,
) -> (usize, usize) {
    let (events, _) = run(start, ops);
    let (mut compared, mut partial) = (0, 0);
    for s in ended(&events) {
        compared += 1;
        partial += usize::from(s.partial());
        let Some(f) = ended(full).into_iter().find(|f| f.stream_id == s.stream_id) else {
            panic!("{what}: stream {} made up", s.stream_id);
        };
        let w = format!("{what}, stream {}", s.stream_id);
        let pairs = [
            (&s.request.headers, &f.request.headers),
            (&s.request.trailers, &f.request.trailers),
            (&s.response.headers, &f.response.headers),
            (&s.response.trailers, &f.response.trailers),
        ];
        for (part, whole) in pairs {
            fields_agree(part.as_ref(), whole.as_ref(), &w);
        }
        if s.grpc_status().is_some() {
            assert_eq!(s.grpc_status(), f.grpc_status(), "{w}");
        }
        for (half, full_half) in [(&s.request, &f.request), (&s.response, &f.response)] {
            if half.body.grpc_exact {
                assert_eq!(half.body.grpc_messages, full_half.body.grpc_messages, "{w}");
            }
            if half.body.exact && !s.missed_start {
                assert_eq!(half.body.bytes, full_half.body.bytes, "{w}");
            }
        }
    }
    (compared, partial)
}

#[test]
fn recording_joined_late_or_with_gaps_is_never_wrong() {
    let ops = grpc_go_recording();
    let (full, _) = run(ConnStart::Preface, &ops);
    let mut totals = [(0, 0); 2];
    let mut add = |i: usize, (c, p): (usize, usize)| {
        totals[i].0 += c;
        totals[i].1 += p;
    };
    for k in 1..ops.len() {
        add(
            0,
            agrees_with_full_run(
                &ops[k..],
                ConnStart::MidStream,
                &full,
                &format!("from op {k}"),
            ),
        );
    }
    for (i, op) in ops.iter().enumerate() {
        let gap = match op {
            Op::C(b) => Op::GapC(b.len() as u64),
            Op::S(b) => Op::GapS(b.len() as u64),
            _ => continue,
        };
        let mut with_gap = ops.clone();
        with_gap[i] = gap;
        add(
            1,
            agrees_with_full_run(
                &with_gap,
                ConnStart::Preface,
                &full,
                &format!("gap at op {i}"),
            ),
        );
        // And a gap over only the middle of the record.
        if let Op::C(b) | Op::S(b) = op
            && b.len() > 10
        {
            let client = matches!(op, Op::C(_));
            let wrap = |b: &[u8]| {
                if client {
                    Op::C(b.to_vec())
                } else {
                    Op::S(b.to_vec())
                }
            };
            let gap = (b.len() - 6) as u64;
            let mid = [
                wrap(&b[..3]),
                if client { Op::GapC(gap) } else { Op::GapS(gap) },
                wrap(&b[b.len() - 3..]),
            ];
            let mut with_gap = ops.clone();
            with_gap.splice(i..=i, mid);
            add(
                1,
                agrees_with_full_run(
                    &with_gap,
                    ConnStart::Preface,
                    &full,
                    &format!("mid gap at op {i}"),
                ),
            );
        }
    }
    eprintln!(
        "streams compared, partial: joined late {:?}, with gaps {:?}",
        totals[0], totals[1]
    );
    // Not vacuous: streams were recovered, some of them only in part.
    assert!(
        totals.iter().all(|&(c, p)| c > 0 && p > 0 && p < c),
        "{totals:?}"
    );
}
