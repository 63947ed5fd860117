//! One stream while it is open: the summary being filled in and the gRPC message framers.

use super::{
    ChunkTs, Direction, HeaderBlock, HeadersKind, Http2Stream, StreamEnd, StreamHalf,
    grpc::MessageFramer,
};

#[derive(Debug, Clone)]
pub(super) struct StreamState {
    pub(super) summary: Http2Stream,
    /// Per direction, present while gRPC messages are followed: only from the first DATA byte
    /// of a direction whose opening HEADERS we saw, since a framer started mid-body would
    /// count garbage.
    framers: [Option<MessageFramer>; 2],
}

impl StreamState {
    pub(super) fn new(stream_id: u32, started: ChunkTs, missed_start: bool) -> Self {
        Self {
            summary: Http2Stream {
                stream_id,
                request: StreamHalf::default(),
                response: StreamHalf::default(),
                informational: 0,
                started,
                ended: started,
                end: StreamEnd::ConnectionClosed,
                missed_start,
                sync_lost: false,
            },
            framers: [None, None],
        }
    }

    pub(super) fn half(&mut self, dir: Direction) -> &mut StreamHalf {
        match dir {
            Direction::ClientToServer => &mut self.summary.request,
            Direction::ServerToClient => &mut self.summary.response,
        }
    }

    /// The first byte of a frame of this stream in `dir` arrived in chunk `ts`.
    pub(super) fn frame_seen(&mut self, dir: Direction, ts: ChunkTs) {
        let half = self.half(dir);
        if half.first.is_none() {
            half.first = Some(ts);
        }
    }

    /// Files a decoded header block and says what it was.
    pub(super) fn headers(&mut self, dir: Direction, block: &HeaderBlock) -> HeadersKind {
        let s = &self.summary;
        let has_pseudo = block.fields.iter().any(|(n, _)| n.starts_with(':'));
        // A stream we joined late may show us trailers first; a block with no pseudo-header
        // that is not missing anything cannot be a request or response head.
        let looks_like_trailers = s.missed_start && !has_pseudo && !block.partial;
        let kind = match dir {
            Direction::ClientToServer => {
                if s.request.headers.is_none() && !looks_like_trailers {
                    HeadersKind::Request
                } else {
                    HeadersKind::RequestTrailers
                }
            }
            Direction::ServerToClient => {
                if s.response.headers.is_some() || looks_like_trailers {
                    HeadersKind::ResponseTrailers
                } else if block.status().is_some_and(|st| st < 200) {
                    HeadersKind::Informational
                } else {
                    HeadersKind::Response
                }
            }
        };
        let block = block.clone();
        match kind {
            HeadersKind::Request => {
                self.summary.request.headers = Some(block);
                if self.summary.is_grpc() {
                    self.framers[0] = Some(MessageFramer::default());
                }
            }
            HeadersKind::Response => {
                self.summary.response.headers = Some(block);
                if self.summary.is_grpc() {
                    self.framers[1] = Some(MessageFramer::default());
                }
            }
            HeadersKind::Informational => {
                self.summary.informational = self.summary.informational.saturating_add(1);
            }
            HeadersKind::RequestTrailers => self.summary.request.trailers = Some(block),
            HeadersKind::ResponseTrailers => self.summary.response.trailers = Some(block),
        }
        kind
    }

    /// DATA payload bytes (padding excluded); returns gRPC messages that ended in them.
    pub(super) fn data(&mut self, dir: Direction, bytes: &[u8]) -> u32 {
        let body = &mut self.half(dir).body;
        body.bytes = body.bytes.saturating_add(bytes.len() as u64);
        let ended = self.framers[dir.index()]
            .as_mut()
            .map_or(0, |f| f.bytes(bytes));
        self.count_messages(dir, ended);
        ended
    }

    /// DATA payload bytes lost in a gap; returns gRPC messages that ended in them.
    pub(super) fn data_gap(&mut self, dir: Direction, n: u64) -> u32 {
        let body = &mut self.half(dir).body;
        body.bytes = body.bytes.saturating_add(n);
        body.uncaptured = body.uncaptured.saturating_add(n);
        let ended = self.framers[dir.index()].as_mut().map_or(0, |f| f.gap(n));
        self.count_messages(dir, ended);
        ended
    }

    fn count_messages(&mut self, dir: Direction, n: u32) {
        let body = &mut self.half(dir).body;
        body.grpc_messages = body.grpc_messages.saturating_add(u64::from(n));
    }

    pub(super) fn data_frame_done(&mut self, dir: Direction, inexact: bool) {
        let body = &mut self.half(dir).body;
        body.frames = body.frames.saturating_add(1);
        if inexact {
            body.exact = false;
        }
    }

    /// Frames of `dir` may have been missed while the stream was open.
    pub(super) fn lose_sync(&mut self, dir: Direction) {
        self.summary.sync_lost = true;
        self.half(dir).body.exact = false;
        if let Some(f) = self.framers[dir.index()].as_mut() {
            *f = MessageFramer::Lost;
        }
    }

    /// END_STREAM in `dir`; true once both directions have ended.
    pub(super) fn end_half(&mut self, dir: Direction, ts: ChunkTs) -> bool {
        self.half(dir).end = Some(ts);
        self.summary.request.end.is_some() && self.summary.response.end.is_some()
    }

    pub(super) fn finish(mut self, end: StreamEnd, ts: ChunkTs) -> Http2Stream {
        for (i, dir) in [Direction::ClientToServer, Direction::ServerToClient]
            .into_iter()
            .enumerate()
        {
            let exact = self
                .framers
                .get(i)
                .and_then(Option::as_ref)
                .is_some_and(|f| !f.is_lost());
            self.half(dir).body.grpc_exact = exact;
        }
        self.summary.end = end;
        self.summary.ended = ts;
        self.summary
    }
}
