//! Pipe byte streams of the watched processes, framed into plugin stdio lines.
//!
//! Any pipe a watched process reads or writes is followed by the kernel side; most carry
//! nothing of interest (a shell pipeline, a self-pipe for wake-ups). A pipe that shows no
//! JSON line early on is muted: the kernel keeps its entry but stops copying its bytes.

use std::collections::HashMap;

use super::{ConnKey, conn::records_lost, table::StreamEvent};
use crate::protocol::{
    http1::ChunkTs,
    stdio::{Kind, StdioStream},
};

/// Pipes tracked at once; beyond it the least recently active one is dropped.
pub const MAX_PIPES: usize = 16384;
/// A pipe silent for this long is forgotten (a plugin waits for requests far longer than an
/// HTTP connection idles, so this is longer than the connection limit).
pub const PIPE_IDLE_EVICT_NS: u64 = 60 * 60 * 1_000_000_000;
/// Non-JSON lines a pipe may carry before its first JSON line without being muted: plugins
/// may print a banner or a warning before they speak the protocol.
const MAX_LINES_BEFORE_JSON: u64 = 8;
/// Bytes a pipe may carry before its first JSON line without being muted.
const MAX_BYTES_BEFORE_JSON: u64 = 256 * 1024;

#[derive(Debug, Default, Clone, Copy)]
pub struct PipeCounters {
    pub pipes: u64,
    pub lines: u64,
    /// Lines that were not JSON (skipped, the stream goes on).
    pub not_json_lines: u64,
    pub overlong_lines: u64,
    /// Pipes muted because they did not carry JSON lines.
    pub muted: u64,
    pub lost_records: u64,
    pub evicted: u64,
}

struct Pipe {
    inode: u64,
    stream: StdioStream,
    next_seq: Option<u32>,
    json_lines: u64,
    other_lines: u64,
    bytes: u64,
    muted: bool,
    last_seen_ns: u64,
}

impl Pipe {
    fn new(inode: u64, ts_ns: u64) -> Self {
        Self {
            inode,
            stream: StdioStream::new(),
            next_seq: None,
            json_lines: 0,
            other_lines: 0,
            bytes: 0,
            muted: false,
            last_seen_ns: ts_ns,
        }
    }
}

/// What the caller should do with the kernel's entry after a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipeVerdict {
    Follow,
    /// Stop copying this pipe's bytes in the kernel.
    Mute,
}

#[derive(Default)]
pub struct PipeTable {
    pipes: HashMap<ConnKey, Pipe>,
    pub counters: PipeCounters,
    lines: Vec<crate::protocol::stdio::StdioLine>,
}

impl PipeTable {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.pipes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pipes.is_empty()
    }

    /// The kernel side met a pipe fd for the first time.
    pub fn open(&mut self, key: ConnKey, inode: u64, ts_ns: u64) {
        if self.pipes.len() >= MAX_PIPES && !self.pipes.contains_key(&key) {
            self.evict_oldest();
        }
        self.counters.pipes += 1;
        self.pipes.insert(key, Pipe::new(inode, ts_ns));
    }

    #[allow(clippy::too_many_arguments)]
    pub fn data(
        &mut self,
        key: ConnKey,
        ctx: u64,
        ingress: bool,
        captured: &[u8],
        total_len: u64,
        seq: u32,
        ts: ChunkTs,
        out: &mut Vec<StreamEvent>,
    ) -> PipeVerdict {
        if !self.pipes.contains_key(&key) {
            // The open record was lost or evicted; the inode is then unknown.
            self.open(key, 0, ts.exit_ns);
        }
        let Some(pipe) = self.pipes.get_mut(&key) else {
            return PipeVerdict::Follow;
        };
        if pipe.muted {
            return PipeVerdict::Mute;
        }
        pipe.last_seen_ns = ts.exit_ns;
        let lost = records_lost(&mut pipe.next_seq, seq);
        if lost > 0 {
            self.counters.lost_records += u64::from(lost);
            pipe.stream.gap(0, ts, ctx);
        }
        pipe.bytes += total_len;
        pipe.stream
            .feed(captured, total_len, ts, ctx, &mut self.lines);
        for line in self.lines.drain(..) {
            self.counters.lines += 1;
            if line.overlong {
                self.counters.overlong_lines += 1;
            }
            if line.message.kind == Kind::NotJson {
                self.counters.not_json_lines += 1;
                pipe.other_lines += 1;
                continue;
            }
            pipe.json_lines += 1;
            out.push(StreamEvent::Stdio {
                key,
                inode: pipe.inode,
                ingress,
                line: Box::new(line),
            });
        }
        let binary = pipe.json_lines == 0 && captured.contains(&0);
        if pipe.json_lines == 0
            && (binary
                || pipe.other_lines >= MAX_LINES_BEFORE_JSON
                || pipe.bytes >= MAX_BYTES_BEFORE_JSON)
        {
            pipe.muted = true;
            self.counters.muted += 1;
            return PipeVerdict::Mute;
        }
        PipeVerdict::Follow
    }

    /// The fd was closed.
    pub fn close(&mut self, key: ConnKey) -> bool {
        self.pipes.remove(&key).is_some()
    }

    /// A process exited: its pipes go, and their fds are returned.
    pub fn exit(&mut self, tgid: u32) -> Vec<i32> {
        let keys: Vec<ConnKey> = self
            .pipes
            .keys()
            .filter(|k| k.tgid == tgid)
            .copied()
            .collect();
        keys.into_iter()
            .filter_map(|k| self.pipes.remove(&k).map(|_| k.fd))
            .collect()
    }

    pub fn evict_idle(&mut self, now_ns: u64) {
        let before = self.pipes.len();
        self.pipes
            .retain(|_, p| now_ns.saturating_sub(p.last_seen_ns) < PIPE_IDLE_EVICT_NS);
        self.counters.evicted += (before - self.pipes.len()) as u64;
    }

    fn evict_oldest(&mut self) {
        if let Some(key) = self
            .pipes
            .iter()
            .min_by_key(|(_, p)| p.last_seen_ns)
            .map(|(k, _)| *k)
        {
            self.pipes.remove(&key);
            self.counters.evicted += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(fd: i32) -> ConnKey {
        ConnKey {
            tgid: 10,
            fd,
            conn_id: 1,
        }
    }

    fn ts(n: u64) -> ChunkTs {
        ChunkTs {
            enter_ns: n,
            exit_ns: n,
        }
    }

    #[test]
    fn json_lines_become_events_and_garbage_is_skipped() {
        let mut t = PipeTable::new();
        let mut out = Vec::new();
        t.open(key(1), 77, 0);
        let data =
            b"hello from print()\n{\"event\":\"heartbeat\",\"session_id\":null,\"data\":{}}\n\n";
        let v = t.data(
            key(1),
            5,
            false,
            data,
            data.len() as u64,
            0,
            ts(1),
            &mut out,
        );
        assert_eq!(v, PipeVerdict::Follow);
        assert_eq!(out.len(), 1);
        assert_eq!(t.counters.not_json_lines, 1);
        let StreamEvent::Stdio { inode, line, .. } = &out[0] else {
            panic!("{out:?}")
        };
        assert_eq!(*inode, 77);
        assert_eq!(line.message.kind, Kind::Heartbeat);
    }

    #[test]
    fn pipes_without_json_are_muted() {
        let mut t = PipeTable::new();
        let mut out = Vec::new();
        t.open(key(2), 1, 0);
        let mut verdict = PipeVerdict::Follow;
        for i in 0..MAX_LINES_BEFORE_JSON {
            verdict = t.data(key(2), 5, true, b"x\n", 2, i as u32, ts(i), &mut out);
        }
        assert_eq!(verdict, PipeVerdict::Mute);
        assert!(out.is_empty());
        let mut bin = PipeTable::new();
        assert_eq!(
            bin.data(key(3), 5, true, b"\0\x01", 2, 0, ts(0), &mut out),
            PipeVerdict::Mute
        );
    }

    #[test]
    fn sequence_holes_are_counted_and_break_the_line() {
        let mut t = PipeTable::new();
        let mut out = Vec::new();
        t.open(key(4), 1, 0);
        t.data(
            key(4),
            5,
            false,
            b"{\"event\":\"hea",
            13,
            0,
            ts(0),
            &mut out,
        );
        t.data(
            key(4),
            5,
            false,
            b"beat\"}\n{\"event\":\"log\"}\n",
            24,
            2,
            ts(1),
            &mut out,
        );
        assert_eq!(t.counters.lost_records, 1);
        assert_eq!(out.len(), 2);
        let StreamEvent::Stdio { line, .. } = &out[0] else {
            panic!()
        };
        // The head before the hole is kept; the event value was cut, so it is unknown.
        assert!(line.holes);
        assert_eq!(line.message.kind, Kind::OtherJson(None));
    }
}
