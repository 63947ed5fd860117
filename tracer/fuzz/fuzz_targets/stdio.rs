//! Fuzzes the plugin stdio layer: line framing over captured prefixes with uncaptured rests
//! and gaps, and the classification of every line.
//!
//! Input: operations separated by control bytes:
//!   0xFE      end of a chunk (the next data byte starts a new feed)
//!   0xFD n    the chunk just ended moved `n * 97` more bytes than were captured
//!   0xFC n    gap (lost records) of `n` bytes
//!   0xFB b    the literal byte `b`
//!
//! Besides "never panic": with no uncaptured bytes and no gaps, any chunking of the same bytes
//! gives the same lines, and the JSON-prefix scanner is prefix-monotone on complete lines
//! (what a cut-off line yields is what the whole line yields, or nothing).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tracer::protocol::{
    http1::ChunkTs,
    stdio::{StdioLine, StdioStream, scan},
};

enum Op {
    Feed(Vec<u8>, u64),
    Gap(u64),
}

fn decode(data: &[u8]) -> Vec<Op> {
    let mut ops = Vec::new();
    let mut cur = Vec::new();
    let mut it = data.iter().copied();
    while let Some(b) = it.next() {
        match b {
            0xFE => ops.push(Op::Feed(std::mem::take(&mut cur), 0)),
            0xFD => {
                let extra = u64::from(it.next().unwrap_or(0)) * 97;
                ops.push(Op::Feed(std::mem::take(&mut cur), extra));
            }
            0xFC => {
                if !cur.is_empty() {
                    ops.push(Op::Feed(std::mem::take(&mut cur), 0));
                }
                ops.push(Op::Gap(u64::from(it.next().unwrap_or(0))));
            }
            0xFB => cur.push(it.next().unwrap_or(0xFB)),
            other => cur.push(other),
        }
    }
    if !cur.is_empty() {
        ops.push(Op::Feed(cur, 0));
    }
    ops
}

fn run(ops: &[Op]) -> Vec<StdioLine> {
    let mut stream = StdioStream::new();
    let mut out = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let ts = ChunkTs {
            enter_ns: i as u64,
            exit_ns: i as u64,
        };
        match op {
            Op::Feed(bytes, extra) => {
                stream.feed(bytes, bytes.len() as u64 + extra, ts, 1, &mut out)
            }
            Op::Gap(n) => stream.gap(*n, ts, 1),
        }
    }
    out
}

fn shape(lines: &[StdioLine]) -> Vec<(Vec<u8>, u64, bool)> {
    lines
        .iter()
        .map(|l| (format!("{:?}", l.message).into_bytes(), l.len, l.holes))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let ops = decode(data);
    let lines = run(&ops);
    for line in &lines {
        assert!(line.first.enter_ns <= line.last.enter_ns);
    }
    let clean = ops
        .iter()
        .all(|op| matches!(op, Op::Feed(_, 0)));
    if clean {
        let bytes: Vec<u8> = ops
            .iter()
            .flat_map(|op| match op {
                Op::Feed(b, _) => b.clone(),
                Op::Gap(_) => Vec::new(),
            })
            .collect();
        let whole = run(&[Op::Feed(bytes.clone(), 0)]);
        let single: Vec<Op> = bytes.iter().map(|b| Op::Feed(vec![*b], 0)).collect();
        assert_eq!(shape(&lines), shape(&whole));
        assert_eq!(shape(&run(&single)), shape(&whole));
    }
    // Prefix monotonicity of the scanner on the raw input.
    let wanted = ["event", "session_id", "data.type", "data.data.message"];
    let full = scan(data, &wanted);
    for cut in [data.len() / 3, data.len() / 2, data.len().saturating_sub(1)] {
        let part = scan(&data[..cut], &wanted);
        if !part.invalid {
            for (p, f) in part.values.iter().zip(&full.values) {
                if let Some(p) = p {
                    assert!(full.invalid || f.as_ref() == Some(p), "{p:?} vs {f:?}");
                }
            }
        }
    }
});
