//! What frames mean: header blocks, streams and their ends. The byte-level reading is
//! `reader.rs`'s; this side sees whole frame headers, payload content and frame ends.

use std::collections::{BTreeMap, VecDeque};

use super::{
    ChunkTs, ConnStart, Direction, HeaderBlock, Http2Counters, Http2Error, Http2Event,
    MAX_CONN_BUFFERED_BYTES, MAX_HEADER_BLOCK_BYTES, MAX_STREAMS, RECENTLY_CLOSED, StreamEnd,
    frame::{self, FrameHeader},
    hpack,
    reader::FrameReader,
    stream::StreamState,
};

/// Decoder of one HTTP/2 connection, both directions. See the [module docs](super).
#[derive(Debug, Clone)]
pub struct Http2Conn {
    /// Indexed by [`Direction::index`].
    readers: [FrameReader; 2],
    core: Core,
}

impl Http2Conn {
    pub fn new(start: ConnStart) -> Self {
        let mid = start == ConnStart::MidStream;
        Self {
            readers: [
                FrameReader::new(Direction::ClientToServer, Some(!mid), mid),
                FrameReader::new(Direction::ServerToClient, None, mid),
            ],
            core: Core::new(!mid),
        }
    }

    /// Captured bytes of one chunk in `dir`.
    pub fn feed(&mut self, dir: Direction, data: &[u8], ts: ChunkTs, out: &mut Vec<Http2Event>) {
        if self.core.stopped() {
            return;
        }
        let Self { readers, core } = self;
        if let Some(r) = readers.get_mut(dir.index()) {
            r.feed(data, ts, core, out);
        }
        if core.not_http2 {
            // Nothing more is parsed; what the other direction held is counted as dropped
            // now, so the counters do not depend on where its input was cut.
            for r in readers.iter_mut() {
                r.close(core);
            }
        }
    }

    /// `len` bytes moved in `dir` but not captured.
    pub fn gap(&mut self, dir: Direction, len: u64, ts: ChunkTs, out: &mut Vec<Http2Event>) {
        if self.core.stopped() {
            return;
        }
        let Self { readers, core } = self;
        if let Some(r) = readers.get_mut(dir.index()) {
            r.gap(len, ts, core, out);
        }
    }

    /// Bytes of unknown length were lost in both directions (capture records dropped).
    pub fn lost(&mut self, ts: ChunkTs, out: &mut Vec<Http2Event>) {
        if self.core.stopped() {
            return;
        }
        let Self { readers, core } = self;
        for r in readers.iter_mut() {
            r.lose_sync(ts, core, out);
        }
    }

    /// The connection closed: every open stream ends as [`StreamEnd::ConnectionClosed`]
    /// (also those a connection found not to be HTTP/2 had opened before).
    pub fn close(&mut self, ts: ChunkTs, out: &mut Vec<Http2Event>) {
        if self.core.closed {
            return;
        }
        let Self { readers, core } = self;
        for r in readers.iter_mut() {
            r.close(core);
        }
        core.close(ts, out);
    }

    pub fn counters(&self) -> &Http2Counters {
        &self.core.counters
    }

    /// The connection started with something other than the client preface; input is ignored.
    pub fn is_not_http2(&self) -> bool {
        self.core.not_http2
    }

    /// Streams open now.
    pub fn open_streams(&self) -> usize {
        self.core.streams.len()
    }
}

/// A frame whose last payload byte was consumed (or lost).
pub(super) struct FrameDone {
    pub(super) hdr: FrameHeader,
    /// Chunk holding its last byte.
    pub(super) ts: ChunkTs,
    pub(super) control: Control,
    /// Where content ended and padding began is unknown.
    pub(super) inexact: bool,
    pub(super) bad_padding: bool,
}

/// The fields of a control frame that matter here.
pub(super) enum Control {
    None,
    Reset { code: Option<u32> },
    GoAway { last_stream_id: u32, code: u32 },
}

/// A header block being gathered from HEADERS/PUSH_PROMISE and CONTINUATION frames.
#[derive(Debug, Clone)]
struct PendingBlock {
    stream_id: u32,
    /// PUSH_PROMISE: decoded only to keep the table right.
    push: bool,
    /// A CONTINUATION whose start we never saw: not decodable.
    orphan: bool,
    end_stream: bool,
    first: ChunkTs,
    buf: Vec<u8>,
    /// Bytes of the block are missing (gap, limit, bad padding); nothing more is appended.
    truncated: bool,
    too_long: bool,
}

/// Frame semantics of a connection; the readers drive it.
#[derive(Debug, Clone)]
pub(super) struct Core {
    decoders: [hpack::Decoder; 2],
    blocks: [Option<PendingBlock>; 2],
    /// SETTINGS_MAX_FRAME_SIZE limiting each direction (announced by its receiver).
    max_frame: [Option<u32>; 2],
    streams: BTreeMap<u32, StreamState>,
    recently_closed: VecDeque<u32>,
    highest_stream: u32,
    /// We saw the connection from its start and never lost a byte's position since: a
    /// stream id at or below `highest_stream` that is not open has ended.
    history_complete: bool,
    /// DATA payload bytes of the current frame per direction, for its event.
    data_len: [u64; 2],
    data_messages: [u32; 2],
    not_http2: bool,
    closed: bool,
    counters: Http2Counters,
}

impl Core {
    fn new(fresh: bool) -> Self {
        Self {
            decoders: [hpack::Decoder::new(fresh), hpack::Decoder::new(fresh)],
            blocks: [None, None],
            max_frame: [None, None],
            streams: BTreeMap::new(),
            recently_closed: VecDeque::new(),
            highest_stream: 0,
            history_complete: fresh,
            data_len: [0; 2],
            data_messages: [0; 2],
            not_http2: false,
            closed: false,
            counters: Http2Counters::default(),
        }
    }

    fn stopped(&self) -> bool {
        self.not_http2 || self.closed
    }

    pub(super) fn max_frame(&self, dir: Direction) -> Option<u32> {
        self.max_frame.get(dir.index()).copied().flatten()
    }

    /// The client direction began with the preface: its table starts empty.
    pub(super) fn preface_seen(&mut self, dir: Direction) {
        if let Some(d) = self.decoders.get_mut(dir.index())
            && !d.table_known()
        {
            *d = hpack::Decoder::new(true);
        }
    }

    pub(super) fn not_http2(&mut self, dir: Direction, out: &mut Vec<Http2Event>) {
        self.not_http2 = true;
        out.push(Http2Event::Error {
            dir,
            error: Http2Error::NotHttp2,
        });
    }

    pub(super) fn resync_skipped(&mut self, n: u64) {
        self.counters.resync_skipped_bytes = self.counters.resync_skipped_bytes.saturating_add(n);
    }

    pub(super) fn resynced(&mut self) {
        self.counters.resyncs = self.counters.resyncs.saturating_add(1);
    }

    pub(super) fn resync_failed(&mut self, dropped: u64) {
        self.counters.resync_failures = self.counters.resync_failures.saturating_add(1);
        self.resync_skipped(dropped);
    }

    pub(super) fn frame_start(
        &mut self,
        dir: Direction,
        hdr: &FrameHeader,
        first: ChunkTs,
        out: &mut Vec<Http2Event>,
    ) {
        self.counters.frames = self.counters.frames.saturating_add(1);
        let d = dir.index();
        if let Some(block) = self.blocks.get(d).and_then(Option::as_ref) {
            if hdr.kind == frame::CONTINUATION && hdr.stream_id == block.stream_id {
                return;
            }
            out.push(Http2Event::Error {
                dir,
                error: Http2Error::ContinuationExpected,
            });
            self.finish_block(dir, true, first, out);
        }
        let block = |push, orphan| PendingBlock {
            stream_id: hdr.stream_id,
            push,
            orphan,
            end_stream: hdr.has(frame::END_STREAM),
            first,
            buf: Vec::new(),
            truncated: false,
            too_long: false,
        };
        match hdr.kind {
            frame::HEADERS => self.set_block(dir, block(false, false)),
            frame::PUSH_PROMISE => self.set_block(dir, block(true, false)),
            frame::CONTINUATION => {
                out.push(Http2Event::Error {
                    dir,
                    error: Http2Error::UnexpectedContinuation,
                });
                // The block's start, and whatever it inserted into the table, is gone.
                self.decoder(dir).forget();
                self.set_block(dir, block(false, true));
            }
            frame::DATA => {
                if let Some(d) = self.data_len.get_mut(d) {
                    *d = 0;
                }
                if let Some(m) = self.data_messages.get_mut(dir.index()) {
                    *m = 0;
                }
                if let Some(s) = self.stream_for(hdr.stream_id, dir, false, first, out) {
                    s.frame_seen(dir, first);
                }
            }
            frame::PRIORITY
            | frame::RST_STREAM
            | frame::SETTINGS
            | frame::PING
            | frame::GOAWAY
            | frame::WINDOW_UPDATE => {}
            _ => self.counters.unknown_frames = self.counters.unknown_frames.saturating_add(1),
        }
    }

    fn set_block(&mut self, dir: Direction, block: PendingBlock) {
        if let Some(slot) = self.blocks.get_mut(dir.index()) {
            *slot = Some(block);
        }
    }

    fn decoder(&mut self, dir: Direction) -> &mut hpack::Decoder {
        let [c2s, s2c] = &mut self.decoders;
        match dir {
            Direction::ClientToServer => c2s,
            Direction::ServerToClient => s2c,
        }
    }

    /// Content bytes (padding and prefixes stripped) of DATA or a header block fragment.
    pub(super) fn content(
        &mut self,
        dir: Direction,
        hdr: &FrameHeader,
        bytes: &[u8],
        _out: &mut Vec<Http2Event>,
    ) {
        let d = dir.index();
        if hdr.kind == frame::DATA {
            if let Some(n) = self.data_len.get_mut(d) {
                *n = n.saturating_add(bytes.len() as u64);
            }
            let ended = match self.streams.get_mut(&hdr.stream_id) {
                Some(s) => s.data(dir, bytes),
                None => 0,
            };
            self.add_messages(dir, ended);
            return;
        }
        let held: usize = self
            .blocks
            .iter()
            .flatten()
            .map(|b| b.buf.len())
            .sum::<usize>();
        let Some(block) = self.blocks.get_mut(d).and_then(Option::as_mut) else {
            return;
        };
        if block.orphan || (block.truncated && !block.too_long) {
            return;
        }
        let room = MAX_HEADER_BLOCK_BYTES
            .saturating_sub(block.buf.len())
            .min(MAX_CONN_BUFFERED_BYTES.saturating_sub(held));
        let take = if block.truncated {
            0
        } else {
            room.min(bytes.len())
        };
        block
            .buf
            .extend_from_slice(bytes.get(..take).unwrap_or_default());
        if take < bytes.len() {
            block.truncated = true;
            block.too_long = true;
            self.counters.header_bytes_dropped = self
                .counters
                .header_bytes_dropped
                .saturating_add((bytes.len() - take) as u64);
        }
    }

    /// Content bytes lost in a gap.
    pub(super) fn content_gap(
        &mut self,
        dir: Direction,
        hdr: &FrameHeader,
        n: u64,
        _out: &mut Vec<Http2Event>,
    ) {
        let d = dir.index();
        if hdr.kind == frame::DATA {
            if let Some(len) = self.data_len.get_mut(d) {
                *len = len.saturating_add(n);
            }
            let ended = match self.streams.get_mut(&hdr.stream_id) {
                Some(s) => s.data_gap(dir, n),
                None => 0,
            };
            self.add_messages(dir, ended);
            return;
        }
        if let Some(block) = self.blocks.get_mut(d).and_then(Option::as_mut) {
            block.truncated = true;
        }
    }

    fn add_messages(&mut self, dir: Direction, n: u32) {
        if let Some(m) = self.data_messages.get_mut(dir.index()) {
            *m = m.saturating_add(n);
        }
    }

    /// One SETTINGS parameter sent in `dir`.
    pub(super) fn setting(&mut self, dir: Direction, id: u16, value: u32) {
        match id {
            // Limits what the other side's encoder, i.e. the reverse direction, may use.
            frame::SETTINGS_HEADER_TABLE_SIZE => {
                self.decoder(dir.other()).settings_table_size(value)
            }
            frame::SETTINGS_MAX_FRAME_SIZE => {
                if let Some(m) = self.max_frame.get_mut(dir.other().index()) {
                    *m = Some(value.clamp(super::DEFAULT_MAX_FRAME_SIZE, 0x00ff_ffff));
                }
            }
            _ => {}
        }
    }

    /// A gap hid (part of) a SETTINGS frame in `dir`: the limit it may have set is unknown.
    pub(super) fn settings_lost(&mut self, dir: Direction) {
        // The size-update check is only a plausibility test, so an unknown limit means none.
        self.decoder(dir.other()).settings_table_size(u32::MAX);
    }

    pub(super) fn frame_end(&mut self, dir: Direction, f: &FrameDone, out: &mut Vec<Http2Event>) {
        let hdr = &f.hdr;
        let id = hdr.stream_id;
        match hdr.kind {
            frame::DATA => {
                let len = self.data_len.get(dir.index()).copied().unwrap_or(0);
                let grpc_messages = self.data_messages.get(dir.index()).copied().unwrap_or(0);
                let end_stream = hdr.has(frame::END_STREAM);
                let Some(s) = self.streams.get_mut(&id) else {
                    return;
                };
                s.data_frame_done(dir, f.inexact);
                out.push(Http2Event::Data {
                    stream_id: id,
                    dir,
                    len,
                    grpc_messages,
                    end_stream,
                    ts: f.ts,
                });
                if end_stream {
                    self.end_half(id, dir, f.ts, out);
                }
            }
            frame::HEADERS | frame::PUSH_PROMISE | frame::CONTINUATION => {
                if f.bad_padding {
                    out.push(Http2Event::Error {
                        dir,
                        error: Http2Error::BadPadding,
                    });
                    if let Some(b) = self.blocks.get_mut(dir.index()).and_then(Option::as_mut) {
                        b.truncated = true;
                    }
                }
                if hdr.has(frame::END_HEADERS) {
                    self.finish_block(dir, false, f.ts, out);
                }
            }
            frame::RST_STREAM => {
                if let Control::Reset { code } = f.control {
                    self.end_stream(id, StreamEnd::Reset { code, by: dir }, f.ts, out);
                }
            }
            frame::GOAWAY => {
                if let Control::GoAway {
                    last_stream_id,
                    code,
                } = f.control
                {
                    out.push(Http2Event::GoAway {
                        dir,
                        last_stream_id,
                        error_code: code,
                        ts: f.ts,
                    });
                    // A server's GOAWAY says client streams above the id were never
                    // processed; a client's only concerns server-initiated (push) streams.
                    if dir == Direction::ServerToClient {
                        let above: Vec<u32> = self
                            .streams
                            .range(last_stream_id.saturating_add(1)..)
                            .map(|(&k, _)| k)
                            .collect();
                        for k in above {
                            self.end_stream(k, StreamEnd::GoAway { code, by: dir }, f.ts, out);
                        }
                    }
                }
            }
            frame::SETTINGS if hdr.has(frame::ACK) => self.decoder(dir).settings_acked(),
            _ => {}
        }
    }

    /// Decodes the pending block of `dir` and files it with its stream.
    fn finish_block(
        &mut self,
        dir: Direction,
        cut_short: bool,
        ts: ChunkTs,
        out: &mut Vec<Http2Event>,
    ) {
        let Some(block) = self.blocks.get_mut(dir.index()).and_then(Option::take) else {
            return;
        };
        self.counters.header_blocks = self.counters.header_blocks.saturating_add(1);
        if block.orphan {
            self.counters.ignored_blocks = self.counters.ignored_blocks.saturating_add(1);
            return;
        }
        let truncated = block.truncated || cut_short;
        let mut decoded = HeaderBlock::default();
        if let Err(e) = self
            .decoder(dir)
            .decode(&block.buf, truncated, &mut decoded)
        {
            self.counters.hpack_errors = self.counters.hpack_errors.saturating_add(1);
            out.push(Http2Event::Error {
                dir,
                error: Http2Error::Hpack(e),
            });
        }
        if truncated {
            self.counters.truncated_blocks = self.counters.truncated_blocks.saturating_add(1);
        }
        if block.too_long {
            out.push(Http2Event::Error {
                dir,
                error: Http2Error::HeaderBlockTooLong,
            });
        }
        self.counters.unknown_fields = self
            .counters
            .unknown_fields
            .saturating_add(u64::from(decoded.unknown_fields));
        if block.push {
            self.counters.ignored_blocks = self.counters.ignored_blocks.saturating_add(1);
            return;
        }
        let id = block.stream_id;
        let Some(s) = self.stream_for(id, dir, true, block.first, out) else {
            self.counters.ignored_blocks = self.counters.ignored_blocks.saturating_add(1);
            return;
        };
        s.frame_seen(dir, block.first);
        let kind = s.headers(dir, &decoded);
        out.push(Http2Event::Headers {
            stream_id: id,
            kind,
            block: decoded,
            end_stream: block.end_stream,
            ts,
        });
        if block.end_stream {
            self.end_half(id, dir, ts, out);
        }
    }

    /// The open stream `id`, opened now if a frame of it may start one.
    fn stream_for(
        &mut self,
        id: u32,
        dir: Direction,
        headers: bool,
        first: ChunkTs,
        out: &mut Vec<Http2Event>,
    ) -> Option<&mut StreamState> {
        if !self.streams.contains_key(&id) {
            // Even ids are server pushes, which we do not follow.
            if id.is_multiple_of(2)
                || self.recently_closed.contains(&id)
                || (self.history_complete && id <= self.highest_stream)
            {
                return None;
            }
            if self.streams.len() >= MAX_STREAMS {
                self.evict(first, out);
            }
            let missed_start = !(headers && dir == Direction::ClientToServer);
            self.highest_stream = self.highest_stream.max(id);
            self.streams
                .insert(id, StreamState::new(id, first, missed_start));
            out.push(Http2Event::StreamStarted {
                stream_id: id,
                ts: first,
            });
        }
        self.streams.get_mut(&id)
    }

    /// Ends the stream least likely to still be alive: the oldest whose frames may have been
    /// lost, else the oldest.
    fn evict(&mut self, ts: ChunkTs, out: &mut Vec<Http2Event>) {
        let victim = self
            .streams
            .iter()
            .find(|(_, s)| s.summary.sync_lost)
            .or_else(|| self.streams.iter().next())
            .map(|(&k, _)| k);
        if let Some(k) = victim {
            self.counters.streams_evicted = self.counters.streams_evicted.saturating_add(1);
            self.end_stream(k, StreamEnd::Lost, ts, out);
        }
    }

    fn end_half(&mut self, id: u32, dir: Direction, ts: ChunkTs, out: &mut Vec<Http2Event>) {
        let both = self
            .streams
            .get_mut(&id)
            .is_some_and(|s| s.end_half(dir, ts));
        if both {
            self.end_stream(id, StreamEnd::Complete, ts, out);
        }
    }

    fn end_stream(&mut self, id: u32, end: StreamEnd, ts: ChunkTs, out: &mut Vec<Http2Event>) {
        let Some(s) = self.streams.remove(&id) else {
            return;
        };
        if self.recently_closed.len() >= RECENTLY_CLOSED {
            self.recently_closed.pop_front();
        }
        self.recently_closed.push_back(id);
        out.push(Http2Event::StreamEnded(Box::new(s.finish(end, ts))));
    }

    /// Frame sync was lost in `dir`: the block in progress is cut short, the table is
    /// forgotten (lost frames may have inserted entries), and open streams' counts in `dir`
    /// become lower bounds.
    pub(super) fn sync_lost(
        &mut self,
        dir: Direction,
        error: Http2Error,
        ts: ChunkTs,
        out: &mut Vec<Http2Event>,
    ) {
        self.counters.sync_losses = self.counters.sync_losses.saturating_add(1);
        out.push(Http2Event::Error { dir, error });
        self.finish_block(dir, true, ts, out);
        self.decoder(dir).forget();
        self.history_complete = false;
        for s in self.streams.values_mut() {
            s.lose_sync(dir);
        }
    }

    fn close(&mut self, ts: ChunkTs, out: &mut Vec<Http2Event>) {
        for dir in [Direction::ClientToServer, Direction::ServerToClient] {
            self.finish_block(dir, true, ts, out);
        }
        let open: Vec<u32> = self.streams.keys().copied().collect();
        for id in open {
            self.end_stream(id, StreamEnd::ConnectionClosed, ts, out);
        }
        self.closed = true;
    }
}
