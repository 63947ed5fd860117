//! The byte-level frame reader of one direction: preface, 9-byte headers, payloads (split
//! into padding, prefix and content), gaps, and resync. What the frames mean is `conn.rs`'s.

use super::{
    ChunkTs, Direction, Http2Error, Http2Event, PREFACE,
    conn::{Control, Core, FrameDone},
    frame::{self, FrameHeader, HEADER_LEN},
    resync::{Replay, Resync},
};

#[derive(Debug, Clone)]
enum State {
    /// Matching the client preface; `strict`: a mismatch means the connection is not HTTP/2.
    Preface {
        matched: usize,
        strict: bool,
    },
    Header {
        buf: [u8; HEADER_LEN],
        have: usize,
    },
    Payload(Payload),
    Resync,
    /// Not HTTP/2: input is ignored.
    Dead,
}

/// Where the current payload's pad length stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pad {
    /// Not padded, or the pad length byte was read: this many padding bytes end the payload.
    Known(u32),
    /// Padded, pad length byte not reached yet.
    Pending,
    /// The pad length byte was lost in a gap: content runs to the end as far as we know.
    Lost,
}

#[derive(Debug, Clone)]
struct Payload {
    hdr: FrameHeader,
    /// Payload bytes consumed, captured or not.
    pos: u32,
    pad: Pad,
    /// The first bytes of a control frame (RST_STREAM code, GOAWAY ids) or the SETTINGS
    /// entry being read.
    small: [u8; 8],
    /// A gap hit `small` (or a SETTINGS entry).
    small_lost: bool,
    bad_padding: bool,
}

impl Payload {
    fn new(hdr: FrameHeader) -> Self {
        Self {
            hdr,
            pos: 0,
            pad: if hdr.is_padded() {
                Pad::Pending
            } else {
                Pad::Known(0)
            },
            small: [0; 8],
            small_lost: false,
            bad_padding: false,
        }
    }

    fn remaining(&self) -> u32 {
        self.hdr.len.saturating_sub(self.pos)
    }

    /// Offset where content starts.
    fn content_start(&self) -> u32 {
        u32::from(self.hdr.is_padded()) + self.hdr.extra_prefix()
    }

    /// Offset where content ends (padding starts).
    fn content_end(&self) -> u32 {
        match self.pad {
            Pad::Known(p) => self.hdr.len.saturating_sub(p).max(self.content_start()),
            Pad::Pending | Pad::Lost => self.hdr.len,
        }
    }

    /// Length of the run of bytes from `pos` that is all one kind, and that kind.
    fn segment(&self) -> (Segment, u32) {
        let pos = self.pos;
        if self.hdr.carries_content() {
            if self.pad == Pad::Pending {
                return (Segment::PadLength, 1);
            }
            let start = self.content_start();
            if pos < start {
                return (Segment::Skip, start - pos);
            }
            let end = self.content_end();
            if pos < end {
                return (Segment::Content, end - pos);
            }
            return (Segment::Skip, self.remaining());
        }
        // Fixed-size fields are cut at the payload end: a frame may hold fewer bytes than
        // the field (RST_STREAM has 4 of the 8), and the next frame's bytes are not ours.
        match self.hdr.kind {
            frame::SETTINGS => (Segment::Small, (6 - pos % 6).min(self.remaining())),
            frame::RST_STREAM | frame::GOAWAY if pos < 8 => {
                (Segment::Small, (8 - pos).min(self.remaining()))
            }
            _ => (Segment::Skip, self.remaining()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Segment {
    PadLength,
    Content,
    Small,
    Skip,
}

#[derive(Debug, Clone)]
pub(super) struct FrameReader {
    dir: Direction,
    state: State,
    /// Chunk holding the current frame's first byte.
    frame_first: ChunkTs,
    resync: Resync,
}

impl FrameReader {
    /// `preface`: `Some(strict)` if this is the client direction and the preface may come
    /// first; `None` otherwise. `mid_stream`: the position is unknown.
    pub(super) fn new(dir: Direction, preface: Option<bool>, mid_stream: bool) -> Self {
        let state = match preface {
            Some(strict) => State::Preface { matched: 0, strict },
            None if mid_stream => State::Resync,
            None => State::Header {
                buf: [0; HEADER_LEN],
                have: 0,
            },
        };
        Self {
            dir,
            state,
            frame_first: ChunkTs::default(),
            resync: Resync::default(),
        }
    }

    pub(super) fn feed(
        &mut self,
        data: &[u8],
        ts: ChunkTs,
        core: &mut Core,
        out: &mut Vec<Http2Event>,
    ) {
        // Bytes a resync confirmed are parsed again as frames before the rest of the input;
        // a stack, since parsing them may itself lose sync and resync within them.
        let mut stack: Vec<(Vec<u8>, usize, ChunkTs)> = Vec::new();
        let mut pos = 0usize;
        let mut stalls = 0u32;
        loop {
            let (input, its) = match stack.last() {
                Some((bytes, at, t)) => (bytes.get(*at..).unwrap_or_default(), *t),
                None => (data.get(pos..).unwrap_or_default(), ts),
            };
            if input.is_empty() {
                if stack.pop().is_none() {
                    return;
                }
                continue;
            }
            let (used, replay) = self.step(input, its, core, out);
            match stack.last_mut() {
                Some((_, at, _)) => *at += used,
                None => pos += used,
            }
            if let Some(replay) = replay {
                stack.extend(replay.into_iter().rev().map(|(b, t)| (b, 0, t)));
            }
            if used == 0 {
                // Every zero-byte step moves to a state that consumes; this bound only turns
                // a logic slip into dropped bytes instead of a hang.
                stalls += 1;
                debug_assert!(stalls < 8, "http2 reader stalled in {:?}", self.state);
                if stalls >= 8 {
                    return;
                }
            } else {
                stalls = 0;
            }
        }
    }

    /// Consumes a prefix of `input`; returns its length and bytes to parse again first.
    fn step(
        &mut self,
        input: &[u8],
        ts: ChunkTs,
        core: &mut Core,
        out: &mut Vec<Http2Event>,
    ) -> (usize, Option<Replay>) {
        match &mut self.state {
            State::Dead => (input.len(), None),
            State::Preface { matched, strict } => {
                if *matched == 0 {
                    self.frame_first = ts;
                }
                let want = PREFACE.get(*matched..).unwrap_or_default();
                let same = want.iter().zip(input).take_while(|(a, b)| a == b).count();
                *matched += same;
                if *matched == PREFACE.len() {
                    core.preface_seen(self.dir);
                    self.expect_header();
                } else if same < want.len().min(input.len()) {
                    // A mismatch (not just the end of the input).
                    let matched = *matched;
                    if *strict {
                        core.not_http2(self.dir, out);
                        self.state = State::Dead;
                        return (input.len(), None);
                    }
                    // Not a fresh connection after all: what matched may still hold a frame
                    // start, so resync looks at it too.
                    let first = self.frame_first;
                    self.resync
                        .push(PREFACE.get(..matched).unwrap_or_default(), first);
                    self.state = State::Resync;
                }
                (same, None)
            }
            State::Header { buf, have } => {
                if *have == 0 {
                    self.frame_first = ts;
                }
                let take = (HEADER_LEN - *have).min(input.len());
                if let (Some(dst), Some(src)) =
                    (buf.get_mut(*have..*have + take), input.get(..take))
                {
                    dst.copy_from_slice(src);
                }
                *have += take;
                if *have == HEADER_LEN {
                    let bytes = *buf;
                    self.header_done(&bytes, ts, core, out);
                }
                (take, None)
            }
            State::Payload(_) => (self.payload_bytes(input, ts, core, out), None),
            State::Resync => {
                let step = self.resync.step(input, ts, core.max_frame(self.dir));
                core.resync_skipped(step.skipped);
                if step.replay.is_some() {
                    core.resynced();
                    self.expect_header();
                }
                (step.used, step.replay)
            }
        }
    }

    fn expect_header(&mut self) {
        self.state = State::Header {
            buf: [0; HEADER_LEN],
            have: 0,
        };
    }

    fn header_done(
        &mut self,
        bytes: &[u8; HEADER_LEN],
        ts: ChunkTs,
        core: &mut Core,
        out: &mut Vec<Http2Event>,
    ) {
        let hdr = FrameHeader::parse(bytes);
        if !hdr.is_valid() {
            core.sync_lost(
                self.dir,
                Http2Error::BadFrameHeader { kind: hdr.kind },
                ts,
                out,
            );
            // A frame may start inside these 9 bytes.
            self.resync.push(bytes, self.frame_first);
            self.state = State::Resync;
            return;
        }
        core.frame_start(self.dir, &hdr, self.frame_first, out);
        self.state = State::Payload(Payload::new(hdr));
        if hdr.len == 0 {
            self.payload_done(ts, core, out);
        }
    }

    fn payload_bytes(
        &mut self,
        input: &[u8],
        ts: ChunkTs,
        core: &mut Core,
        out: &mut Vec<Http2Event>,
    ) -> usize {
        let State::Payload(p) = &mut self.state else {
            return 0;
        };
        let (seg, seg_len) = p.segment();
        let take = (seg_len.min(p.remaining()) as usize).min(input.len());
        let bytes = input.get(..take).unwrap_or_default();
        match seg {
            Segment::PadLength => {
                let pad = u32::from(bytes.first().copied().unwrap_or(0));
                if p.content_start() + pad > p.hdr.len {
                    // The padding claims more than the frame holds: the content is unknown.
                    p.bad_padding = true;
                    p.pad = Pad::Known(p.hdr.len);
                } else {
                    p.pad = Pad::Known(pad);
                }
            }
            Segment::Content => core.content(self.dir, &p.hdr, bytes, out),
            Segment::Small => {
                let at = if p.hdr.kind == frame::SETTINGS {
                    (p.pos % 6) as usize
                } else {
                    p.pos as usize
                };
                if let Some(dst) = p.small.get_mut(at..at + take) {
                    dst.copy_from_slice(bytes);
                }
                if p.hdr.kind == frame::SETTINGS && (p.pos as usize + take).is_multiple_of(6) {
                    if !p.small_lost {
                        let [a, b, c, d, e, f, _, _] = p.small;
                        core.setting(
                            self.dir,
                            u16::from_be_bytes([a, b]),
                            u32::from_be_bytes([c, d, e, f]),
                        );
                    }
                    p.small_lost = false;
                }
            }
            Segment::Skip => {}
        }
        p.pos += take as u32;
        if p.remaining() == 0 {
            self.payload_done(ts, core, out);
        }
        take
    }

    fn payload_done(&mut self, ts: ChunkTs, core: &mut Core, out: &mut Vec<Http2Event>) {
        let State::Payload(p) = &self.state else {
            return;
        };
        let [a, b, c, d, e, f, g, h] = p.small;
        let control = match p.hdr.kind {
            frame::RST_STREAM => Control::Reset {
                code: (!p.small_lost).then(|| u32::from_be_bytes([a, b, c, d])),
            },
            frame::GOAWAY if !p.small_lost => Control::GoAway {
                last_stream_id: u32::from_be_bytes([a, b, c, d]) & 0x7fff_ffff,
                code: u32::from_be_bytes([e, f, g, h]),
            },
            _ => Control::None,
        };
        let done = FrameDone {
            hdr: p.hdr,
            ts,
            control,
            inexact: p.pad == Pad::Lost || p.bad_padding,
            bad_padding: p.bad_padding,
        };
        self.expect_header();
        core.frame_end(self.dir, &done, out);
    }

    /// `n` bytes moved but not captured.
    pub(super) fn gap(
        &mut self,
        mut n: u64,
        ts: ChunkTs,
        core: &mut Core,
        out: &mut Vec<Http2Event>,
    ) {
        while n > 0 {
            match &mut self.state {
                State::Dead => return,
                State::Preface { matched, .. } => {
                    // The preface is fixed, so lost preface bytes are known bytes.
                    let take = PREFACE
                        .len()
                        .saturating_sub(*matched)
                        .min(usize::try_from(n).unwrap_or(usize::MAX));
                    *matched += take;
                    n -= take as u64;
                    if *matched >= PREFACE.len() {
                        core.preface_seen(self.dir);
                        self.expect_header();
                    }
                }
                State::Header { .. } => {
                    core.sync_lost(self.dir, Http2Error::SyncLost, ts, out);
                    self.state = State::Resync;
                    return;
                }
                State::Payload(p) => {
                    let take = n.min(u64::from(p.remaining()));
                    if take == 0 {
                        self.payload_done(ts, core, out);
                        continue;
                    }
                    self.payload_gap(take as u32, ts, core, out);
                    n -= take;
                }
                State::Resync => {
                    let dropped = self.resync.abandon();
                    if dropped > 0 {
                        core.resync_failed(dropped as u64);
                    }
                    return;
                }
            }
        }
    }

    fn payload_gap(&mut self, mut n: u32, ts: ChunkTs, core: &mut Core, out: &mut Vec<Http2Event>) {
        while n > 0 {
            let State::Payload(p) = &mut self.state else {
                return;
            };
            let (seg, seg_len) = p.segment();
            let take = seg_len.min(p.remaining()).min(n);
            match seg {
                Segment::PadLength => p.pad = Pad::Lost,
                Segment::Content => core.content_gap(self.dir, &p.hdr, u64::from(take), out),
                Segment::Small => p.small_lost = true,
                Segment::Skip => {}
            }
            if p.hdr.kind == frame::SETTINGS {
                if seg == Segment::Small && (p.pos + take).is_multiple_of(6) {
                    p.small_lost = false;
                }
                core.settings_lost(self.dir);
            }
            p.pos += take;
            n -= take;
            if p.remaining() == 0 {
                self.payload_done(ts, core, out);
                return;
            }
        }
    }

    /// Loses frame sync (records lost, of unknown length).
    pub(super) fn lose_sync(&mut self, ts: ChunkTs, core: &mut Core, out: &mut Vec<Http2Event>) {
        match self.state {
            State::Dead => {}
            State::Resync => {
                let dropped = self.resync.abandon();
                if dropped > 0 {
                    core.resync_failed(dropped as u64);
                }
            }
            _ => {
                core.sync_lost(self.dir, Http2Error::SyncLost, ts, out);
                self.state = State::Resync;
            }
        }
    }

    /// The connection closed; a frame cut short ends here.
    pub(super) fn close(&mut self, core: &mut Core) {
        if let State::Resync = self.state {
            let dropped = self.resync.abandon();
            if dropped > 0 {
                core.resync_failed(dropped as u64);
            }
        }
        self.state = State::Dead;
    }
}
