//! Finding a frame boundary in bytes of unknown position (a connection joined mid-way, or
//! after a gap across frame borders).
//!
//! Heuristic, on purpose conservative, and independent of how the bytes were chunked:
//! offset `p` is accepted as a frame start only if
//! 1. the 9 bytes at `p` pass [`FrameHeader::is_plausible`]: a type RFC 9113 defines (not
//!    PUSH_PROMISE), no undefined flag, reserved bit clear, the type's length and stream-id
//!    rules, odd stream ids, no empty DATA without END_STREAM, no empty HEADERS or SETTINGS,
//!    and a length within the receiver's SETTINGS_MAX_FRAME_SIZE (default 16 KiB, and never
//!    more than [`MAX_RESYNC_FRAME_LEN`], so the frame can be buffered whole);
//! 2. its payload is plausible for its type (padding within the frame, WINDOW_UPDATE
//!    increment not zero, defined error codes, defined SETTINGS ids); and
//! 3. the next 9 bytes after its payload pass the same header test, with the receiver's
//!    length limit.
//!
//! Several candidates may be waiting for their bytes at once (a false one in a binary payload
//! may claim a long length); the boundary taken is the one whose check completes first in
//! byte order (then the earliest), so a false candidate cannot hold up a real one behind it,
//! and the choice depends only on the bytes, never on how they were chunked. Bytes before it
//! are skipped and counted. Frames longer than the limit are never landed on; resync then
//! finds the next shorter frame.

use super::{
    ChunkTs, DEFAULT_MAX_FRAME_SIZE, MAX_RESYNC_FRAME_LEN,
    frame::{
        self, FrameHeader, GOAWAY, HEADER_LEN, MAX_ERROR_CODE, RST_STREAM, SETTINGS, WINDOW_UPDATE,
    },
};

/// Compact the buffer once this many skipped bytes sit at its front.
const COMPACT_AT: usize = 4096;
/// Input taken per look at the candidates; bounds what is buffered past a boundary.
const SLICE: usize = 4096;
/// Highest SETTINGS identifier in use (SETTINGS_NO_RFC7540_PRIORITIES, RFC 9218).
const MAX_SETTING_ID: u16 = 0x9;

/// Bytes held while candidate boundaries are judged.
#[derive(Debug, Clone, Default)]
pub(super) struct Resync {
    buf: Vec<u8>,
    /// Offsets below this have had their 9 bytes looked at as a frame header.
    parsed: usize,
    /// Candidates whose header is plausible, waiting for their payload and the next header:
    /// (offset where the check completes, offset of the candidate).
    pending: Vec<(usize, usize)>,
    /// (offset in `buf`, timestamp) where bytes of another chunk begin, oldest first.
    marks: Vec<(usize, ChunkTs)>,
}

/// Bytes to parse again, per chunk they came from.
pub(super) type Replay = Vec<(Vec<u8>, ChunkTs)>;

/// What one call made of the input.
pub(super) struct Step {
    /// Input bytes moved into the buffer.
    pub(super) used: usize,
    /// Buffered bytes skipped as not being a frame start.
    pub(super) skipped: u64,
    /// A boundary was confirmed: the bytes from it on, per chunk, to be parsed as frames.
    pub(super) replay: Option<Replay>,
}

impl Resync {
    /// Forgets the bytes held; returns how many there were.
    pub(super) fn abandon(&mut self) -> usize {
        let n = self.buf.len();
        self.buf.clear();
        self.buf.shrink_to(COMPACT_AT);
        self.parsed = 0;
        self.pending.clear();
        self.marks.clear();
        n
    }

    /// Buffers known bytes that precede the next input (a failed preface or frame header).
    pub(super) fn push(&mut self, bytes: &[u8], ts: ChunkTs) {
        self.append(bytes, ts);
    }

    /// Takes input and judges candidates; `max_frame` is the receiver's
    /// SETTINGS_MAX_FRAME_SIZE if known.
    pub(super) fn step(&mut self, input: &[u8], ts: ChunkTs, max_frame: Option<u32>) -> Step {
        let limit = max_frame.unwrap_or(DEFAULT_MAX_FRAME_SIZE);
        let first_limit = limit.min(MAX_RESYNC_FRAME_LEN);
        let mut used = 0;
        let mut skipped = 0u64;
        loop {
            if let Some(p) = self.decide(first_limit, limit) {
                skipped += p as u64;
                return Step {
                    used,
                    skipped,
                    replay: Some(self.take_replay(p)),
                };
            }
            skipped += self.trim() as u64;
            let rest = input.get(used..).unwrap_or_default();
            if rest.is_empty() {
                return Step {
                    used,
                    skipped,
                    replay: None,
                };
            }
            let take = rest.len().min(SLICE);
            self.append(rest.get(..take).unwrap_or_default(), ts);
            used += take;
        }
    }

    /// Looks at the header of every new offset and decides every candidate whose bytes are
    /// all there; returns the winning offset, if any.
    fn decide(&mut self, first_limit: u32, limit: u32) -> Option<usize> {
        let n = self.buf.len();
        while self.parsed + HEADER_LEN <= n {
            let p = self.parsed;
            self.parsed += 1;
            if let Some(h) = header_at(&self.buf, p)
                && h.is_plausible(first_limit)
            {
                self.pending.push((p + 2 * HEADER_LEN + h.len as usize, p));
            }
        }
        let buf = &self.buf;
        let mut best: Option<(usize, usize)> = None;
        self.pending.retain(|&(end, p)| {
            if end > n {
                return true;
            }
            if confirmed(buf, p, limit) && best.is_none_or(|b| (end, p) < b) {
                best = Some((end, p));
            }
            false
        });
        best.map(|(_, p)| p)
    }

    /// Drops bytes no candidate can start in any more; returns how many.
    fn trim(&mut self) -> usize {
        let keep = self
            .pending
            .iter()
            .map(|&(_, p)| p)
            .min()
            .unwrap_or(self.parsed)
            .min(self.parsed);
        if keep < COMPACT_AT && keep * 2 < self.buf.len() {
            return 0;
        }
        self.buf.drain(..keep);
        self.parsed -= keep;
        for c in &mut self.pending {
            c.0 -= keep;
            c.1 -= keep;
        }
        // Keep the last mark at or before the new front, moved to 0, and all after it.
        let from = self
            .marks
            .iter()
            .rposition(|&(off, _)| off <= keep)
            .unwrap_or(0);
        self.marks.drain(..from);
        for m in &mut self.marks {
            m.0 = m.0.saturating_sub(keep);
        }
        keep
    }

    fn append(&mut self, bytes: &[u8], ts: ChunkTs) {
        if bytes.is_empty() {
            return;
        }
        if self.marks.last().is_none_or(|&(_, t)| t != ts) {
            self.marks.push((self.buf.len(), ts));
        }
        self.buf.extend_from_slice(bytes);
    }

    fn take_replay(&mut self, from: usize) -> Replay {
        let mut out = Vec::new();
        for (i, &(off, ts)) in self.marks.iter().enumerate() {
            let end = self
                .marks
                .get(i + 1)
                .map_or(self.buf.len(), |&(next, _)| next);
            let start = off.max(from);
            if start < end
                && let Some(bytes) = self.buf.get(start..end)
            {
                out.push((bytes.to_vec(), ts));
            }
        }
        self.abandon();
        out
    }
}

fn header_at(b: &[u8], at: usize) -> Option<FrameHeader> {
    let h: &[u8; HEADER_LEN] = b.get(at..at + HEADER_LEN)?.try_into().ok()?;
    Some(FrameHeader::parse(h))
}

/// The candidate at `p`, whose header is plausible and whose bytes are all in `buf`, has a
/// plausible payload and a plausible header after it.
fn confirmed(buf: &[u8], p: usize, limit: u32) -> bool {
    let Some(h) = header_at(buf, p) else {
        return false;
    };
    let end = p + HEADER_LEN + h.len as usize;
    let Some(payload) = buf.get(p + HEADER_LEN..end) else {
        return false;
    };
    payload_plausible(&h, payload) && header_at(buf, end).is_some_and(|n| n.is_plausible(limit))
}

fn payload_plausible(h: &FrameHeader, p: &[u8]) -> bool {
    let word = |at: usize| {
        p.get(at..at + 4)
            .and_then(|w| w.try_into().ok())
            .map(u32::from_be_bytes)
    };
    if h.is_padded() {
        let pad = u32::from(p.first().copied().unwrap_or(0));
        if 1 + h.extra_prefix() + pad > h.len {
            return false;
        }
    }
    match h.kind {
        WINDOW_UPDATE => word(0).is_some_and(|w| w & 0x7fff_ffff != 0),
        RST_STREAM => word(0).is_some_and(|c| c <= MAX_ERROR_CODE),
        GOAWAY => word(4).is_some_and(|c| c <= MAX_ERROR_CODE),
        SETTINGS => p.chunks(6).all(|s| {
            let id = u16::from_be_bytes([
                s.first().copied().unwrap_or(0),
                s.get(1).copied().unwrap_or(0),
            ]);
            (1..=MAX_SETTING_ID).contains(&id) && id != 7
        }),
        frame::DATA | frame::HEADERS | frame::PRIORITY | frame::PING | frame::CONTINUATION => true,
        _ => false,
    }
}
