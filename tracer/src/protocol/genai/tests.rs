use super::inspect::*;
use super::json_pick::{JsonPicker, Picked, Want};
use crate::protocol::http1::ChunkTs;

const DIFY: &[u8] = include_bytes!("testdata/dify_llm_stream.sse");
const TIMEOUT: &[u8] = include_bytes!("testdata/dify_timeout.sse");
const OPENAI: &[u8] = include_bytes!("testdata/openai_stream.sse");
const ANTHROPIC: &[u8] = include_bytes!("testdata/anthropic_stream.sse");

fn ts(n: u64) -> ChunkTs {
    ChunkTs {
        enter_ns: n,
        exit_ns: n + 1,
    }
}

/// Feeds `body` split into pieces of `step` bytes.
fn stream(body: &[u8], step: usize, content: bool) -> BodyFacts {
    let mut i = BodyInspector::response(true, content);
    for (n, piece) in body.chunks(step).enumerate() {
        i.feed(piece, ts(n as u64 * 10 + 100));
    }
    i.finish()
}

#[test]
fn dify_stream_usage_model_chunks_any_split() {
    for step in [1, 2, 7, 64, 4096] {
        let f = stream(DIFY, step, false);
        assert_eq!(f.events, Some(3), "step {step}");
        assert_eq!(f.value(P_DATA_PROMPT_TOKENS), Some("12"));
        assert_eq!(f.value(P_DATA_COMPLETION_TOKENS), Some("7"));
        assert_eq!(f.value(P_DATA_MODEL), Some("gpt-4o-mini"));
        assert_eq!(f.finish_reasons, vec!["stop".to_string()]);
        assert_eq!(f.code_error, None);
        assert_eq!(f.first_event, Some(ts(100)));
        // Content is not kept unless asked.
        assert_eq!(f.content, None);
    }
    let f = stream(DIFY, 5, true);
    assert_eq!(f.content, Some(("Hello".to_string(), false)));
}

#[test]
fn dify_timeout_event_is_an_error() {
    let f = stream(TIMEOUT, 3, false);
    let e = f.code_error.expect("error event");
    assert_eq!(e.code, "-500");
    let msg = e.message.expect("message");
    assert!(msg.contains("killed by timeout"), "{msg}");
    assert!(msg.contains("PluginDaemonInternalServerError"), "{msg}");
    assert_eq!(f.events, Some(2));
}

#[test]
fn openai_stream_with_include_usage() {
    let f = stream(OPENAI, 13, true);
    assert_eq!(f.value(P_ID), Some("chatcmpl-1"));
    assert_eq!(f.value(P_MODEL), Some("gpt-4o-mini-2024"));
    assert_eq!(f.value(P_PROMPT_TOKENS), Some("9"));
    assert_eq!(f.value(P_COMPLETION_TOKENS), Some("2"));
    assert_eq!(f.finish_reasons, vec!["stop".to_string()]);
    // `[DONE]` is not a JSON event.
    assert_eq!(f.events, Some(3));
    assert_eq!(f.content, Some(("Hi".to_string(), false)));
}

#[test]
fn anthropic_stream_events() {
    let f = stream(ANTHROPIC, 11, false);
    assert_eq!(f.value(P_MESSAGE_ID), Some("msg_1"));
    assert_eq!(f.value(P_MESSAGE_MODEL), Some("claude-x"));
    assert_eq!(f.value(P_MESSAGE_INPUT_TOKENS), Some("25"));
    assert_eq!(f.value(P_OUTPUT_TOKENS), Some("15"));
    assert_eq!(f.finish_reasons, vec!["end_turn".to_string()]);
    assert_eq!(f.events, Some(4));
}

#[test]
fn a_hole_forgets_what_it_may_have_replaced() {
    // A hole inside the last event: its usage is unknown, and so is the count.
    let cut = DIFY.len() - 40;
    let mut i = BodyInspector::response(true, false);
    i.feed(&DIFY[..cut - 300], ts(1));
    i.gap(300);
    i.feed(&DIFY[cut..], ts(2));
    let f = i.finish();
    assert!(f.holes);
    assert_eq!(f.events, None);
    assert_eq!(f.value(P_DATA_PROMPT_TOKENS), None);
    assert!(f.finish_reasons.is_empty());

    // A hole before the last event: the last event still counts whole.
    let second = DIFY
        .windows(6)
        .rposition(|w| w == b"data: ")
        .expect("last event");
    let mut i = BodyInspector::response(true, false);
    i.feed(&DIFY[..20], ts(1));
    i.gap((second - 20) as u64);
    i.feed(&DIFY[second..], ts(2));
    let f = i.finish();
    assert_eq!(f.value(P_DATA_PROMPT_TOKENS), Some("12"));
    assert_eq!(f.events, None);
}

#[test]
fn request_fields_and_prompt_capture() {
    let body = br#"{"user_id":"u","data":{"provider":"openai","model_type":"llm","model":"gpt-4o","credentials":{"openai_api_key":"sk-XYZ"},"prompt_messages":[{"role":"user","content":"hi \u00e9"}],"stream":true}}"#;
    for step in [1, 3, 1000] {
        let mut i = BodyInspector::request(true);
        for p in body.chunks(step) {
            i.feed(p, ts(1));
        }
        let f = i.finish();
        assert_eq!(f.value(Q_PROVIDER), Some("openai"));
        assert_eq!(f.value(Q_DIFY_MODEL), Some("gpt-4o"));
        let (raw, cut) = f.content.expect("prompt");
        assert!(!cut);
        assert_eq!(raw, r#"[{"role":"user","content":"hi \u00e9"}]"#);
    }
    let mut i = BodyInspector::request(false);
    i.feed(body, ts(1));
    assert_eq!(i.finish().content, None);
}

#[test]
fn json_response_with_a_hole_keeps_what_came_before() {
    let body = br#"{"id":"x","model":"m","choices":[{"index":0,"message":{"content":"long"},"finish_reason":"length"}],"usage":{"prompt_tokens":3,"completion_tokens":4}}"#;
    let mut i = BodyInspector::response(false, false);
    i.feed(&body[..30], ts(1));
    i.gap(10);
    i.feed(&body[40..], ts(2));
    let f = i.finish();
    assert_eq!(f.value(P_MODEL), Some("m"));
    assert_eq!(f.value(P_PROMPT_TOKENS), None);
    let mut i = BodyInspector::response(false, false);
    i.feed(body, ts(1));
    let f = i.finish();
    assert_eq!(f.value(P_PROMPT_TOKENS), Some("3"));
    assert_eq!(f.value(P_COMPLETION_TOKENS), Some("4"));
    assert_eq!(f.finish_reasons, vec!["length".to_string()]);
}

#[test]
fn sandbox_code_error() {
    let body = br#"{"code":-400,"message":"error: operation not permitted","data":null}"#;
    let mut i = BodyInspector::response(false, false);
    i.feed(body, ts(1));
    let f = i.finish();
    assert_eq!(
        f.code_error,
        Some(CodeError {
            code: "-400".into(),
            message: Some("error: operation not permitted".into())
        })
    );
}

static W: [Want; 3] = [
    Want {
        path: "a.*.b",
        max_len: 4,
        raw: false,
    },
    Want {
        path: "n",
        max_len: 16,
        raw: false,
    },
    Want {
        path: "o",
        max_len: 64,
        raw: true,
    },
];

fn pick(text: &[u8]) -> (Vec<Picked>, bool) {
    let mut p = JsonPicker::new(&W);
    let mut out = Vec::new();
    p.feed(text, &mut out);
    p.finish(&mut out);
    (out, p.is_dead())
}

#[test]
fn picker_arrays_cuts_nulls_and_garbage() {
    let (out, dead) = pick(
        r#"{"a":[{"b":"héllo"},{"b":null},{"b":{"x":1}}],"n":-1.5e3,"o":{"k":[1,"}"]}}"#.as_bytes(),
    );
    assert!(!dead);
    let vals: Vec<_> = out
        .iter()
        .map(|p| (p.want, p.value.as_str(), p.cut))
        .collect();
    // "héllo" is cut to 4 bytes without splitting the é.
    assert_eq!(
        vals,
        vec![
            (0, "hél", true),
            (1, "-1.5e3", false),
            (2, r#"{"k":[1,"}"]}"#, false)
        ]
    );
    // A raw scalar ends before its terminator, also at the very end of the text.
    let (out, _) = pick(br#"{"o":12,"n":1}"#);
    assert_eq!(out[0].value, "12");
    let (out, _) = pick(br#"{"o":true}"#);
    assert_eq!(out[0].value, "true");
    // Garbage stops the scan but never panics; deep nesting is refused.
    for bad in [
        &b"{\"a\":[}"[..],
        b"{]",
        b"\"\\q\"",
        b"{\"n\":1 2}",
        &[b'['; 100][..],
    ] {
        let _ = pick(bad);
    }
    let (_, dead) = pick(&[b'['; 100]);
    assert!(dead);
}

#[test]
fn picker_never_panics_on_random_bytes() {
    let mut seed = 0x2545f4914f6cdd1du64;
    for _ in 0..2000 {
        let len = (seed % 64) as usize;
        let mut v = Vec::with_capacity(len);
        for _ in 0..len {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let alphabet = b"{}[]\":,ab\\u0n1 -";
            v.push(alphabet[(seed % alphabet.len() as u64) as usize]);
        }
        let _ = pick(&v);
        let mut i = BodyInspector::response(true, true);
        i.feed(b"data: ", ts(0));
        i.feed(&v, ts(1));
        i.gap(3);
        i.feed(&v, ts(2));
        let _ = i.finish();
    }
}

/// The whole path through the HTTP/1 parsers: a dispatch request, and its chunked event
/// stream answer split across syscalls, one of them partly lost.
#[test]
fn http1_parsers_inspect_dispatch_bodies() {
    use crate::protocol::http1::{Http1Event, Http1Parser, Side};
    let body = br#"{"user_id":"u","data":{"provider":"langgenius/openai/openai","model":"gpt-4o","credentials":{"api_key":"sk-1"}}}"#;
    let mut req = format!(
        "POST /plugin/tenant-1/dispatch/llm/invoke HTTP/1.1\r\nHost: d\r\nX-Plugin-ID: a/b\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    let mut rp = Http1Parser::new(Side::Request);
    let mut out = Vec::new();
    rp.feed(&req, ts(1), &mut out);
    let Some(Http1Event::Message(m)) = out.pop() else {
        panic!("request")
    };
    let facts = m.genai.expect("request inspected");
    assert_eq!(facts.value(Q_PROVIDER), Some("langgenius/openai/openai"));

    let mut resp = Http1Parser::new(Side::Response);
    resp.push_request("POST", "/plugin/tenant-1/dispatch/llm/invoke");
    let mut out = Vec::new();
    resp.feed(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
        ts(2),
        &mut out,
    );
    for (n, event) in DIFY.split_inclusive(|&b| b == b'\n').enumerate() {
        let chunk = format!("{:x}\r\n", event.len());
        resp.feed(chunk.as_bytes(), ts(10 + n as u64), &mut out);
        resp.feed(event, ts(10 + n as u64), &mut out);
        resp.feed(b"\r\n", ts(10 + n as u64), &mut out);
    }
    resp.feed(b"0\r\n\r\n", ts(99), &mut out);
    let Some(Http1Event::Message(m)) = out.pop() else {
        panic!("response")
    };
    let f = m.genai.expect("response inspected");
    assert!(f.sse);
    assert_eq!(f.events, Some(3));
    assert_eq!(f.first_event, Some(ts(10)));
    assert_eq!(f.value(P_DATA_COMPLETION_TOKENS), Some("7"));

    // A route that does not matter is not read.
    let mut resp = Http1Parser::new(Side::Response);
    resp.push_request("GET", "/health");
    let mut out = Vec::new();
    resp.feed(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
        ts(2),
        &mut out,
    );
    let Some(Http1Event::Message(m)) = out.pop() else {
        panic!("response")
    };
    assert!(m.genai.is_none());
}
