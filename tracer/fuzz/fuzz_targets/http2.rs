//! Fuzzes the HTTP/2 parser with both directions, chunk splits, gaps, lost records and
//! closes, not just byte contents.
//!
//! Input layout: byte 0 picks how the connection starts (bit 0: mid-stream, else at the
//! preface) and whether the client direction gets the preface put in front (bit 1), so the
//! frame layer is reached without the fuzzer having to find 24 exact bytes. The rest is
//! client-to-server data, cut into operations by control bytes:
//!   0xFE      end of a chunk (the next data byte starts a new feed)
//!   0xFA      end of a chunk, and following data goes the other way
//!   0xFD n    gap of `n` bytes for n < 0xC0, else of 2^(n - 0xC0) bytes, this direction
//!   0xF9      records lost (both directions)
//!   0xFC      close
//!   0xFB b    the literal byte `b` (so control values can be fed too)
//!
//! Besides "never panic", it checks that chunking does not matter (the given chunks, each
//! direction's neighbouring feeds merged, and 1-byte chunks give the same events and
//! counters, timestamps aside), that secret values never come out, and the size bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tracer::protocol::http2::{
    ChunkTs, ConnStart, Direction, HeaderBlock, Http2Conn, Http2Counters, Http2Event,
    MAX_HEADER_BYTES, MAX_HEADERS, PREFACE, REDACTED, SECRET_HEADERS,
};

#[derive(Clone)]
enum Op {
    Feed(Direction, Vec<u8>),
    Gap(Direction, u64),
    Lost,
    Close,
}

fn decode(data: &[u8]) -> Option<(ConnStart, Vec<Op>)> {
    let (&first, rest) = data.split_first()?;
    let start = if first & 1 == 0 {
        ConnStart::Preface
    } else {
        ConnStart::MidStream
    };
    let mut ops = Vec::new();
    if first & 2 != 0 {
        ops.push(Op::Feed(Direction::ClientToServer, PREFACE.to_vec()));
    }
    let mut dir = Direction::ClientToServer;
    let mut bytes = rest.iter().copied();
    let mut cur = Vec::new();
    let flush = |cur: &mut Vec<u8>, ops: &mut Vec<Op>, dir| {
        if !cur.is_empty() {
            ops.push(Op::Feed(dir, std::mem::take(cur)));
        }
    };
    while let Some(b) = bytes.next() {
        match b {
            0xFE => flush(&mut cur, &mut ops, dir),
            0xFA => {
                flush(&mut cur, &mut ops, dir);
                dir = dir.other();
            }
            0xFD => {
                flush(&mut cur, &mut ops, dir);
                let n = bytes.next().unwrap_or(1);
                let len = if n < 0xC0 {
                    u64::from(n)
                } else {
                    1u64 << (n - 0xC0).min(63)
                };
                ops.push(Op::Gap(dir, len));
            }
            0xF9 => {
                flush(&mut cur, &mut ops, dir);
                ops.push(Op::Lost);
            }
            0xFC => {
                flush(&mut cur, &mut ops, dir);
                ops.push(Op::Close);
            }
            0xFB => cur.push(bytes.next().unwrap_or(0xFB)),
            _ => cur.push(b),
        }
    }
    flush(&mut cur, &mut ops, dir);
    Some((start, ops))
}

fn check_block(b: &mut HeaderBlock) {
    assert!(b.fields.len() <= MAX_HEADERS);
    let bytes: usize = b.fields.iter().map(|(n, v)| n.len() + v.len()).sum();
    assert!(bytes <= MAX_HEADER_BYTES);
    for (n, v) in &b.fields {
        if SECRET_HEADERS.iter().any(|s| s.eq_ignore_ascii_case(n)) {
            assert_eq!(v, REDACTED, "secret {n} leaked");
        }
    }
}

/// Checks the bounds and clears the timestamps, which follow the chunking.
fn normalize(e: &mut Http2Event) {
    let zero = ChunkTs::default();
    match e {
        Http2Event::StreamStarted { ts, .. }
        | Http2Event::Data { ts, .. }
        | Http2Event::GoAway { ts, .. } => *ts = zero,
        Http2Event::Headers { ts, block, .. } => {
            *ts = zero;
            check_block(block);
        }
        Http2Event::StreamEnded(s) => {
            s.started = zero;
            s.ended = zero;
            for half in [&mut s.request, &mut s.response] {
                half.first = half.first.map(|_| zero);
                half.end = half.end.map(|_| zero);
                half.headers.iter_mut().for_each(check_block);
                half.trailers.iter_mut().for_each(check_block);
                assert!(half.body.uncaptured <= half.body.bytes);
            }
            let _ = (s.grpc_status(), s.grpc_message(), s.grpc_method(), s.partial());
        }
        Http2Event::Error { .. } => {}
    }
}

fn run(start: ConnStart, ops: &[Op]) -> (Vec<Http2Event>, Http2Counters) {
    let mut conn = Http2Conn::new(start);
    let mut out = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let ts = ChunkTs {
            enter_ns: i as u64,
            exit_ns: i as u64 + 1,
        };
        match op {
            Op::Feed(dir, b) => conn.feed(*dir, b, ts, &mut out),
            Op::Gap(dir, n) => conn.gap(*dir, *n, ts, &mut out),
            Op::Lost => conn.lost(ts, &mut out),
            Op::Close => conn.close(ts, &mut out),
        }
    }
    // Every stream ends by the close.
    conn.close(ChunkTs::default(), &mut out);
    assert_eq!(conn.open_streams(), 0);
    out.iter_mut().for_each(normalize);
    (out, *conn.counters())
}

/// Joins neighbouring feeds of one direction, or splits every feed into single bytes.
fn rechunk(ops: &[Op], bytewise: bool) -> Vec<Op> {
    let mut out: Vec<Op> = Vec::new();
    for op in ops {
        match (op, out.last_mut()) {
            (Op::Feed(dir, b), _) if bytewise => {
                out.extend(b.iter().map(|&x| Op::Feed(*dir, vec![x])));
            }
            (Op::Feed(dir, b), Some(Op::Feed(prev_dir, prev))) if dir == prev_dir => {
                prev.extend_from_slice(b)
            }
            _ => out.push(op.clone()),
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((start, ops)) = decode(data) else {
        return;
    };
    let given = run(start, &ops);
    let merged = run(start, &rechunk(&ops, false));
    assert_eq!(given, merged, "given chunking differs from merged feeds");
    let bytewise = run(start, &rechunk(&ops, true));
    assert_eq!(bytewise, merged, "1-byte chunks differ from merged feeds");
});
