//! Fuzzes the GenAI body inspector (JSON and event-stream bodies, with holes) and the
//! redaction of captured bodies.
//!
//! Input: byte 0 picks the inspector (0: request JSON, 1: response JSON, 2: event stream)
//! and whether content is kept (bit 2); the rest is data cut into operations:
//!   0xFE      end of a chunk (the next data byte starts a new feed)
//!   0xFD n    a hole of `n` bytes
//!   0xFB b    the literal byte `b`
//!
//! Besides "never panic": with no holes, the facts do not depend on how the body was split
//! into chunks (all chunks carry the same timestamp here).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tracer::protocol::{genai::BodyInspector, http1::ChunkTs};
use tracer::span::genai::redact::{redact_body, redact_inline, redact_json};

enum Op {
    Feed(Vec<u8>),
    Gap(u64),
}

fn decode(data: &[u8]) -> Vec<Op> {
    let mut ops = Vec::new();
    let mut cur = Vec::new();
    let mut it = data.iter().copied();
    while let Some(b) = it.next() {
        match b {
            0xFE => {
                if !cur.is_empty() {
                    ops.push(Op::Feed(std::mem::take(&mut cur)));
                }
            }
            0xFD => {
                if !cur.is_empty() {
                    ops.push(Op::Feed(std::mem::take(&mut cur)));
                }
                ops.push(Op::Gap(u64::from(it.next().unwrap_or(1))));
            }
            0xFB => cur.push(it.next().unwrap_or(0xFB)),
            _ => cur.push(b),
        }
    }
    if !cur.is_empty() {
        ops.push(Op::Feed(cur));
    }
    ops
}

fn inspector(mode: u8) -> BodyInspector {
    let content = mode & 4 != 0;
    match mode & 3 {
        0 => BodyInspector::request(content),
        1 => BodyInspector::response(false, content),
        _ => BodyInspector::response(true, content),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let ops = decode(rest);
    let ts = ChunkTs {
        enter_ns: 1,
        exit_ns: 2,
    };
    let mut split = inspector(mode);
    let mut bytes = Vec::new();
    let mut holes = false;
    for op in &ops {
        match op {
            Op::Feed(b) => {
                split.feed(b, ts);
                bytes.extend_from_slice(b);
            }
            Op::Gap(n) => {
                split.gap(*n);
                holes |= *n > 0;
            }
        }
    }
    let split = split.finish();
    if !holes {
        let mut single = inspector(mode);
        for b in &bytes {
            single.feed(std::slice::from_ref(b), ts);
        }
        assert_eq!(split, single.finish(), "facts depend on the chunking");
    }
    let _ = redact_body(&bytes);
    if let Ok(text) = std::str::from_utf8(&bytes) {
        let _ = redact_json(text);
        let _ = redact_inline(text);
    }
});
