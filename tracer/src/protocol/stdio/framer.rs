//! Newline framing of one direction of a pipe, from captured prefixes and byte counts.
//!
//! The kernel side copies the head (and, for large writes, the last TAIL_CAPTURE bytes) of
//! each syscall, so a line can have holes. Only the bytes before a line's first hole are kept
//! (they are contiguous and hold the fields that name the event); later bytes of the line are
//! counted, and scanned for the newline that ends it. A newline inside a hole is unknowable:
//! the lines on both sides of it are then read as one, which the `holes` flag reports.

use crate::protocol::http1::ChunkTs;

/// Bytes kept from the start of a line for classification.
pub const LINE_KEEP: usize = 16 * 1024;
/// The daemon's own line limit (bufio.Scanner max in dify-plugin-daemon); a longer line is
/// cut off here and counted as overlong.
pub const MAX_LINE: u64 = 5 << 20;

/// One line (or what could be seen of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// The contiguous start of the line, at most LINE_KEEP bytes, without the newline.
    pub head: Vec<u8>,
    /// Length of the whole line in bytes, without the newline.
    pub len: u64,
    /// Some bytes of the line were not captured.
    pub holes: bool,
    /// Cut off at MAX_LINE without a newline.
    pub overlong: bool,
    /// Syscall that moved the first byte, and the one that moved the newline.
    pub first: ChunkTs,
    pub last: ChunkTs,
    /// Execution context (thread, goroutine) that moved the first byte; opaque here.
    pub ctx: u64,
}

#[derive(Debug, Default)]
pub struct LineFramer {
    head: Vec<u8>,
    len: u64,
    holes: bool,
    /// A hole was met: later captured bytes of this line are not contiguous with `head`.
    head_closed: bool,
    first: Option<(ChunkTs, u64)>,
}

impl LineFramer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes of the line being assembled so far.
    pub fn pending_len(&self) -> u64 {
        self.len
    }

    /// One syscall's chunk: `captured` is the start of the `total` bytes it moved.
    pub fn feed(
        &mut self,
        captured: &[u8],
        total: u64,
        ts: ChunkTs,
        ctx: u64,
        out: &mut Vec<Line>,
    ) {
        let mut rest = captured;
        while !rest.is_empty() {
            match rest.iter().position(|b| *b == b'\n') {
                Some(nl) => {
                    self.take(&rest[..nl], ts, ctx);
                    self.end_line(ts, out);
                    rest = &rest[nl + 1..];
                }
                None => {
                    self.take(rest, ts, ctx);
                    rest = &[];
                }
            }
            if self.len > MAX_LINE {
                self.cut_overlong(ts, out);
            }
        }
        let uncaptured = total.saturating_sub(captured.len() as u64);
        if uncaptured > 0 {
            self.gap(uncaptured, ts, ctx);
            if self.len > MAX_LINE {
                self.cut_overlong(ts, out);
            }
        }
    }

    /// Bytes that were moved but never seen at all (lost records).
    pub fn gap(&mut self, len: u64, ts: ChunkTs, ctx: u64) {
        if self.first.is_none() {
            self.first = Some((ts, ctx));
        }
        self.len = self.len.saturating_add(len);
        self.holes = true;
        self.head_closed = true;
    }

    fn take(&mut self, bytes: &[u8], ts: ChunkTs, ctx: u64) {
        if bytes.is_empty() {
            return;
        }
        if self.first.is_none() {
            self.first = Some((ts, ctx));
        }
        if !self.head_closed && self.head.len() < LINE_KEEP {
            let room = LINE_KEEP - self.head.len();
            self.head.extend_from_slice(&bytes[..bytes.len().min(room)]);
        }
        self.len = self.len.saturating_add(bytes.len() as u64);
    }

    fn end_line(&mut self, ts: ChunkTs, out: &mut Vec<Line>) {
        let blank = !self.holes && self.head.iter().all(u8::is_ascii_whitespace);
        if self.first.is_some() && !blank {
            out.push(self.finish(ts, false));
        }
        self.reset();
    }

    fn cut_overlong(&mut self, ts: ChunkTs, out: &mut Vec<Line>) {
        out.push(self.finish(ts, true));
        self.reset();
        // The rest of the line up to its newline is junk: treat it as a hole-only line.
        self.holes = true;
        self.head_closed = true;
    }

    fn finish(&mut self, ts: ChunkTs, overlong: bool) -> Line {
        let (first, ctx) = self.first.unwrap_or((ts, 0));
        let mut head = std::mem::take(&mut self.head);
        if head.last() == Some(&b'\r') && !self.head_closed {
            head.pop();
        }
        Line {
            head,
            len: self.len,
            holes: self.holes,
            overlong,
            first,
            last: ts,
            ctx,
        }
    }

    fn reset(&mut self) {
        self.head.clear();
        self.len = 0;
        self.holes = false;
        self.head_closed = false;
        self.first = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(n: u64) -> ChunkTs {
        ChunkTs {
            enter_ns: n,
            exit_ns: n + 1,
        }
    }

    fn feed_all(parts: &[(&[u8], u64)]) -> Vec<Line> {
        let mut f = LineFramer::new();
        let mut out = Vec::new();
        for (i, (bytes, total)) in parts.iter().enumerate() {
            f.feed(bytes, *total, ts(i as u64 * 10), 7, &mut out);
        }
        out
    }

    #[test]
    fn splits_lines_and_skips_blank_ones() {
        let data = b"{\"a\":1}\n\n{\"b\":2}\r\n\n";
        let lines = feed_all(&[(data, data.len() as u64)]);
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].head, b"{\"a\":1}");
        assert_eq!(lines[1].head, b"{\"b\":2}");
        assert!(!lines[0].holes);
    }

    #[test]
    fn every_split_gives_the_same_lines() {
        let data: &[u8] = b"{\"event\":\"heartbeat\"}\n\n{\"x\":\"y\"}\n";
        let whole = feed_all(&[(data, data.len() as u64)]);
        for cut in 0..=data.len() {
            let (a, b) = data.split_at(cut);
            let split = feed_all(&[(a, a.len() as u64), (b, b.len() as u64)]);
            let heads: Vec<_> = split.iter().map(|l| (&l.head, l.len)).collect();
            let want: Vec<_> = whole.iter().map(|l| (&l.head, l.len)).collect();
            assert_eq!(heads, want, "cut at {cut}");
        }
    }

    #[test]
    fn a_line_written_in_two_syscalls_spans_them() {
        // The SDK writes the JSON and its "\n\n" with two writes.
        let lines = feed_all(&[(b"{\"a\":1}", 7), (b"\n\n", 2)]);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].first, ts(0));
        assert_eq!(lines[0].last, ts(10));
    }

    #[test]
    fn head_and_tail_capture_keeps_the_head_and_counts_the_rest() {
        // A 10000-byte line: head chunk (4096 captured of 9871), tail chunk (128 + newline).
        let head = vec![b'{'; 4096];
        let mut tail = vec![b'x'; 128];
        tail[127] = b'\n';
        let lines = feed_all(&[(&head, 10000 - 128), (&tail, 128)]);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].head.len(), 4096);
        assert_eq!(lines[0].len, 9999);
        assert!(lines[0].holes);
    }

    #[test]
    fn overlong_lines_are_cut_at_the_daemon_limit() {
        let mut f = LineFramer::new();
        let mut out = Vec::new();
        f.feed(b"{", MAX_LINE + 10, ts(0), 1, &mut out);
        assert_eq!(out.len(), 1);
        assert!(out[0].overlong);
        f.feed(b"junk\n{\"a\":1}\n", 13, ts(1), 1, &mut out);
        assert_eq!(out.len(), 3);
        assert!(out[1].holes && out[1].head.is_empty());
        assert_eq!(out[2].head, b"{\"a\":1}");
    }
}
