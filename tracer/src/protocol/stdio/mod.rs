//! Dify plugin stdio: newline-delimited JSON between the plugin daemon and a plugin process,
//! framed from captured pipe bytes and classified by event.

mod classify;
mod framer;
mod json_prefix;

pub use classify::{BackwardsEvent, ChunkFacts, Kind, Message, Request, SessionEvent, classify};
pub use framer::{LINE_KEEP, Line, LineFramer, MAX_LINE};
pub use json_prefix::{MAX_VALUE, Scan, scan};

use crate::protocol::http1::ChunkTs;

/// A classified line of one pipe direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StdioLine {
    pub message: Message,
    /// Length of the whole line in bytes.
    pub len: u64,
    /// Some of its bytes were not captured.
    pub holes: bool,
    pub overlong: bool,
    pub first: ChunkTs,
    pub last: ChunkTs,
    pub ctx: u64,
}

/// One direction of a pipe: bytes in, classified lines out.
#[derive(Debug, Default)]
pub struct StdioStream {
    framer: LineFramer,
    lines: Vec<Line>,
}

impl StdioStream {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn feed(
        &mut self,
        captured: &[u8],
        total: u64,
        ts: ChunkTs,
        ctx: u64,
        out: &mut Vec<StdioLine>,
    ) {
        self.framer.feed(captured, total, ts, ctx, &mut self.lines);
        self.flush(out);
    }

    /// Records of this pipe were lost: `len` bytes (or an unknown amount when 0) are missing.
    pub fn gap(&mut self, len: u64, ts: ChunkTs, ctx: u64) {
        self.framer.gap(len, ts, ctx);
    }

    fn flush(&mut self, out: &mut Vec<StdioLine>) {
        for line in self.lines.drain(..) {
            out.push(StdioLine {
                message: classify(&line.head),
                len: line.len,
                holes: line.holes,
                overlong: line.overlong,
                first: line.first,
                last: line.last,
                ctx: line.ctx,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ECHO_STDIN: &[u8] =
        include_bytes!("../../../../tests/fixtures/plugin/recorded/echo.stdin");
    const ECHO_STDOUT: &[u8] =
        include_bytes!("../../../../tests/fixtures/plugin/recorded/echo.stdout");
    const ERROR_STDOUT: &[u8] =
        include_bytes!("../../../../tests/fixtures/plugin/recorded/error.stdout");
    const STORAGE_STDIN: &[u8] =
        include_bytes!("../../../../tests/fixtures/plugin/recorded/storage.stdin");
    const STORAGE_STDOUT: &[u8] =
        include_bytes!("../../../../tests/fixtures/plugin/recorded/storage.stdout");

    fn kinds(bytes: &[u8], chunk: usize) -> Vec<(Kind, Option<String>)> {
        let mut stream = StdioStream::new();
        let mut out = Vec::new();
        let ts = ChunkTs {
            enter_ns: 1,
            exit_ns: 2,
        };
        for part in bytes.chunks(chunk.max(1)) {
            stream.feed(part, part.len() as u64, ts, 1, &mut out);
        }
        out.into_iter()
            .map(|l| (l.message.kind, l.message.session_id))
            .collect()
    }

    #[test]
    fn recorded_sdk_output_classifies_at_any_chunking() {
        let whole = kinds(ECHO_STDOUT, usize::MAX);
        let streams = whole
            .iter()
            .filter(|(k, _)| *k == Kind::Session(SessionEvent::Stream(Default::default())))
            .count();
        assert_eq!(streams, 3, "{whole:?}");
        assert!(whole.contains(&(Kind::Heartbeat, None)), "{whole:?}");
        let last = whole.last().expect("lines");
        assert_eq!(last.0, Kind::Session(SessionEvent::End));
        assert!(last.1.is_some());
        // The startup manifest line has no event: other JSON, never a session event.
        assert!(
            matches!(whole[0].0, Kind::OtherJson(None)),
            "{:?}",
            whole[0]
        );
        for chunk in [1, 2, 7, 64, 4096] {
            assert_eq!(kinds(ECHO_STDOUT, chunk), whole, "chunk size {chunk}");
        }
    }

    #[test]
    fn recorded_request_error_and_backwards_traffic() {
        let req = kinds(ECHO_STDIN, usize::MAX);
        assert_eq!(req.len(), 1);
        let Kind::Request(r) = &req[0].0 else {
            panic!("{req:?}")
        };
        assert_eq!(r.action.as_deref(), Some("invoke_tool"));
        assert_eq!(r.tool.as_deref(), Some("echo"));
        assert_eq!(r.provider.as_deref(), Some("echo_tool"));

        let err = kinds(ERROR_STDOUT, usize::MAX);
        let error = err
            .iter()
            .find_map(|(k, _)| match k {
                Kind::Session(SessionEvent::Error {
                    error_type,
                    message,
                }) => Some((error_type.clone(), message.clone())),
                _ => None,
            })
            .expect("an error event");
        assert_eq!(error.0.as_deref(), Some("EchoToolFailure"));
        assert!(error.1.is_some());
        // The SDK still ends the session after an error.
        assert_eq!(
            err.last().map(|l| &l.0),
            Some(&Kind::Session(SessionEvent::End))
        );

        let invokes: Vec<_> = kinds(STORAGE_STDOUT, usize::MAX)
            .into_iter()
            .filter_map(|(k, _)| match k {
                Kind::Session(SessionEvent::Invoke {
                    invoke_type,
                    backwards_request_id,
                }) => Some((invoke_type, backwards_request_id)),
                _ => None,
            })
            .collect();
        assert_eq!(invokes.len(), 2);
        assert!(
            invokes
                .iter()
                .all(|(t, id)| t.as_deref() == Some("storage") && id.is_some())
        );
        let answers: Vec<_> = kinds(STORAGE_STDIN, usize::MAX)
            .into_iter()
            .filter_map(|(k, _)| match k {
                Kind::BackwardsResponse {
                    backwards_request_id,
                    event,
                } => Some((backwards_request_id, event)),
                _ => None,
            })
            .collect();
        assert!(
            answers.iter().any(|(_, e)| *e == BackwardsEvent::End),
            "{answers:?}"
        );
        for (id, _) in &answers {
            assert!(
                invokes.iter().any(|(_, i)| i == id),
                "{id:?} answers no invoke"
            );
        }
    }
}
