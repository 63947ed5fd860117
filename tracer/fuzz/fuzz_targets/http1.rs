//! Fuzzes the HTTP/1 parser with chunk splits, gaps and closes, not just byte contents.
//!
//! Input layout: byte 0 picks the side (bit 0) and how many request methods to queue on a
//! response parser (bits 1..=3); that many bytes follow, each picking a method. The rest is
//! data, cut into operations by control bytes:
//!   0xFE      end of a chunk (the next data byte starts a new feed)
//!   0xFD n    gap of `n` bytes for n < 0xC0, else of 2^(n - 0xC0) bytes
//!   0xFC      close
//!   0xFA      the other direction moved (`peer_moved`)
//!   0xFB b    the literal byte `b` (so control values can be fed too)
//!
//! Besides "never panic", it checks the resumability promise: when feeding each gap-free run
//! of data as one chunk produced no error (so resync, which looks at chunk starts, never ran),
//! the given chunking and 1-byte chunks must give the same events, timestamps aside.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tracer::protocol::http1::{
    ChunkTs, Http1Event, Http1Parser, MAX_BODY_PREFIX, MAX_HEADERS, Side,
};

const METHODS: [&str; 4] = ["GET", "HEAD", "CONNECT", "POST"];

#[derive(Clone)]
enum Op {
    Feed(Vec<u8>),
    Gap(u64),
    Close,
    PeerMoved,
}

fn decode(data: &[u8]) -> Option<(Side, Vec<&'static str>, Vec<Op>)> {
    let (&first, rest) = data.split_first()?;
    let side = if first & 1 == 0 {
        Side::Request
    } else {
        Side::Response
    };
    let n_methods = usize::from((first >> 1) & 7);
    let methods = rest
        .iter()
        .take(n_methods)
        .map(|&b| METHODS[usize::from(b) % METHODS.len()])
        .collect();
    let mut bytes = rest.iter().skip(n_methods).copied();
    let mut ops = Vec::new();
    let mut cur = Vec::new();
    let flush = |cur: &mut Vec<u8>, ops: &mut Vec<Op>| {
        if !cur.is_empty() {
            ops.push(Op::Feed(std::mem::take(cur)));
        }
    };
    while let Some(b) = bytes.next() {
        match b {
            0xFE => flush(&mut cur, &mut ops),
            0xFD => {
                flush(&mut cur, &mut ops);
                let n = bytes.next().unwrap_or(1);
                let len = if n < 0xC0 {
                    u64::from(n)
                } else {
                    1u64 << (n - 0xC0).min(63)
                };
                ops.push(Op::Gap(len));
            }
            0xFC => {
                flush(&mut cur, &mut ops);
                ops.push(Op::Close);
            }
            0xFA => {
                flush(&mut cur, &mut ops);
                ops.push(Op::PeerMoved);
            }
            0xFB => cur.push(bytes.next().unwrap_or(0xFB)),
            _ => cur.push(b),
        }
    }
    flush(&mut cur, &mut ops);
    Some((side, methods, ops))
}

fn run(side: Side, methods: &[&str], ops: &[Op]) -> Vec<Http1Event> {
    let mut p = Http1Parser::new(side);
    for m in methods {
        p.push_request_method(m);
    }
    let mut out = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let ts = ChunkTs {
            enter_ns: i as u64,
            exit_ns: i as u64 + 1,
        };
        match op {
            Op::Feed(b) => p.feed(b, ts, &mut out),
            Op::Gap(n) => p.gap(*n, ts, &mut out),
            Op::Close => p.close(ts, &mut out),
            Op::PeerMoved => p.peer_moved(),
        }
        let _ = (p.is_idle(), p.is_not_http(), p.is_tunnel());
    }
    for e in &mut out {
        if let Http1Event::Message(m) = e {
            assert!(m.body_prefix.len() <= MAX_BODY_PREFIX);
            assert!(m.body_prefix.len() as u64 <= m.body_len);
            assert!(m.headers.len() <= MAX_HEADERS);
            m.first = ChunkTs::default();
            m.last = ChunkTs::default();
        }
    }
    out
}

/// Joins neighbouring feeds, or splits every feed into single bytes.
fn rechunk(ops: &[Op], bytewise: bool) -> Vec<Op> {
    let mut out: Vec<Op> = Vec::new();
    for op in ops {
        match (op, out.last_mut()) {
            (Op::Feed(b), _) if bytewise => {
                out.extend(b.iter().map(|&x| Op::Feed(vec![x])));
            }
            (Op::Feed(b), Some(Op::Feed(prev))) => prev.extend_from_slice(b),
            _ => out.push(op.clone()),
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((side, methods, ops)) = decode(data) else {
        return;
    };
    let given = run(side, &methods, &ops);
    let merged_ops = rechunk(&ops, false);
    let merged = run(side, &methods, &merged_ops);
    if merged.iter().any(|e| matches!(e, Http1Event::Error(_))) {
        return;
    }
    assert_eq!(given, merged, "given chunking differs from merged feeds");
    let bytewise = run(side, &methods, &rechunk(&ops, true));
    assert_eq!(bytewise, merged, "1-byte chunks differ from merged feeds");
});
