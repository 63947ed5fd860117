//! Reads the facts a span needs from a message body as it streams, in fixed memory.
//!
//! Two shapes: one JSON document (a request, or a non-streamed answer), or a server-sent
//! event stream whose `data:` lines are JSON documents (Dify's plugin daemon, OpenAI and
//! Anthropic streaming). Bytes lost by the capture (holes) make what they may have changed
//! unknown: a JSON document stops being read; in an event stream the current event is
//! dropped and the values seen so far are forgotten (a later event may have replaced them),
//! and the event count is no longer exact.

use super::json_pick::{JsonPicker, Picked, Want};
use crate::protocol::http1::ChunkTs;

const SCALAR: usize = 256;
/// Longest piece of generated text kept per JSON string (content capture only).
const TEXT: usize = 4096;
/// Longest raw JSON kept of a prompt (content capture only; redacted later).
const RAW: usize = 8192;
/// Longest Dify error message (itself a JSON text holding `error_type` and `message`).
const ERROR_MESSAGE: usize = 1024;
/// Generated text kept per message (content capture only).
pub const MAX_CONTENT: usize = 8192;
/// Distinct finish reasons kept.
const MAX_FINISH_REASONS: usize = 8;

const fn scalar(path: &'static str) -> Want {
    Want {
        path,
        max_len: SCALAR,
        raw: false,
    }
}

/// Paths read from request bodies, in the order of the `Q_*` indexes.
pub static REQUEST_WANTS: [Want; 10] = [
    scalar("model"),
    scalar("stream"),
    scalar("data.provider"),
    scalar("data.model"),
    scalar("language"),
    scalar("max_tokens"),
    scalar("temperature"),
    Want {
        path: "messages",
        max_len: RAW,
        raw: true,
    },
    Want {
        path: "data.prompt_messages",
        max_len: RAW,
        raw: true,
    },
    Want {
        path: "system",
        max_len: RAW,
        raw: true,
    },
];
pub const Q_MODEL: usize = 0;
pub const Q_STREAM: usize = 1;
pub const Q_PROVIDER: usize = 2;
pub const Q_DIFY_MODEL: usize = 3;
pub const Q_LANGUAGE: usize = 4;
pub const Q_MAX_TOKENS: usize = 5;
pub const Q_TEMPERATURE: usize = 6;
const Q_RAW_FIRST: usize = 7;

/// Paths read from response bodies and from each event of a stream, in the order of the
/// `P_*` indexes.
pub static RESPONSE_WANTS: [Want; 26] = [
    scalar("id"),
    scalar("model"),
    scalar("usage.prompt_tokens"),
    scalar("usage.completion_tokens"),
    scalar("usage.input_tokens"),
    scalar("usage.output_tokens"),
    scalar("message.id"),
    scalar("message.model"),
    scalar("message.usage.input_tokens"),
    scalar("message.usage.output_tokens"),
    scalar("code"),
    Want {
        path: "message",
        max_len: ERROR_MESSAGE,
        raw: false,
    },
    scalar("data.model"),
    scalar("data.delta.usage.prompt_tokens"),
    scalar("data.delta.usage.completion_tokens"),
    scalar("data.error"),
    scalar("data.exit_code"),
    scalar("type"),
    // Finish reasons (collected, not last-wins).
    scalar("choices.*.finish_reason"),
    scalar("stop_reason"),
    scalar("delta.stop_reason"),
    scalar("data.delta.finish_reason"),
    // Generated text (content capture only).
    Want {
        path: "choices.*.delta.content",
        max_len: TEXT,
        raw: false,
    },
    Want {
        path: "choices.*.message.content",
        max_len: TEXT,
        raw: false,
    },
    Want {
        path: "delta.text",
        max_len: TEXT,
        raw: false,
    },
    Want {
        path: "data.delta.message.content",
        max_len: TEXT,
        raw: false,
    },
];
pub const P_ID: usize = 0;
pub const P_MODEL: usize = 1;
pub const P_PROMPT_TOKENS: usize = 2;
pub const P_COMPLETION_TOKENS: usize = 3;
pub const P_INPUT_TOKENS: usize = 4;
pub const P_OUTPUT_TOKENS: usize = 5;
pub const P_MESSAGE_ID: usize = 6;
pub const P_MESSAGE_MODEL: usize = 7;
pub const P_MESSAGE_INPUT_TOKENS: usize = 8;
pub const P_MESSAGE_OUTPUT_TOKENS: usize = 9;
pub const P_CODE: usize = 10;
pub const P_MESSAGE: usize = 11;
pub const P_DATA_MODEL: usize = 12;
pub const P_DATA_PROMPT_TOKENS: usize = 13;
pub const P_DATA_COMPLETION_TOKENS: usize = 14;
pub const P_DATA_ERROR: usize = 15;
pub const P_DATA_EXIT_CODE: usize = 16;
pub const P_TYPE: usize = 17;
const P_FINISH_FIRST: usize = 18;
const P_FINISH_LAST: usize = 21;
const P_TEXT_FIRST: usize = 22;

/// A `code != 0` event of a Dify stream (or body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeError {
    pub code: String,
    pub message: Option<String>,
}

/// What the inspector learned from one body.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BodyFacts {
    /// The body was an event stream.
    pub sse: bool,
    /// Last value per wanted path (REQUEST_WANTS or RESPONSE_WANTS), if known.
    pub values: Vec<Option<String>>,
    /// Events whose JSON was read whole; None once a hole made the count unknown.
    pub events: Option<u32>,
    /// The chunk that carried the start of the first event.
    pub first_event: Option<ChunkTs>,
    /// Distinct finish reasons, in order.
    pub finish_reasons: Vec<String>,
    /// The first event (or the body) with a non-zero `code`.
    pub code_error: Option<CodeError>,
    /// Generated text or prompt JSON (content capture only), with whether it was cut.
    pub content: Option<(String, bool)>,
    /// Bytes of the body were lost.
    pub holes: bool,
}

impl BodyFacts {
    pub fn value(&self, i: usize) -> Option<&str> {
        self.values.get(i).and_then(|v| v.as_deref())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// At a line start; `n` bytes of a possible `data:` prefix matched.
    Start { n: u8 },
    /// After `data:`, feeding the event's JSON.
    Data,
    /// A line that is not data, or was hit by a hole.
    Skip,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Request,
    Response,
}

/// See the [module docs](self).
#[derive(Debug, Clone)]
pub struct BodyInspector {
    side: Side,
    picker: JsonPicker,
    line: Line,
    /// Values of the event being read (SSE), merged when it ends whole.
    event: Vec<Picked>,
    facts: BodyFacts,
    content: bool,
    content_len: usize,
    /// A hole was met and no feed followed yet.
    after_hole: bool,
    /// The chunk where the current line began.
    line_ts: ChunkTs,
}

impl BodyInspector {
    /// A request body (one JSON document).
    pub fn request(content: bool) -> Self {
        Self::new(Side::Request, false, content)
    }

    /// A response body: an event stream when `sse`, else one JSON document.
    pub fn response(sse: bool, content: bool) -> Self {
        Self::new(Side::Response, sse, content)
    }

    fn new(side: Side, sse: bool, content: bool) -> Self {
        let wants = Self::wants_of(side);
        Self {
            side,
            picker: JsonPicker::new(wants),
            line: Line::Start { n: 0 },
            event: Vec::new(),
            facts: BodyFacts {
                sse,
                values: vec![None; wants.len()],
                events: sse.then_some(0),
                ..BodyFacts::default()
            },
            content,
            content_len: 0,
            after_hole: false,
            line_ts: ChunkTs::default(),
        }
    }

    fn wants_of(side: Side) -> &'static [Want] {
        match side {
            Side::Request => &REQUEST_WANTS,
            Side::Response => &RESPONSE_WANTS,
        }
    }

    /// Captured body bytes (de-chunked), in order.
    pub fn feed(&mut self, bytes: &[u8], ts: ChunkTs) {
        if !self.facts.sse {
            let mut out = Vec::new();
            self.picker.feed(bytes, &mut out);
            self.merge(out);
            return;
        }
        if std::mem::take(&mut self.after_hole) && self.line == Line::Skip {
            // A new syscall is the likeliest place for a new line to begin; an event read
            // from there still counts only if its JSON is whole.
            self.line = Line::Start { n: 0 };
        }
        let mut rest = bytes;
        while !rest.is_empty() {
            match self.line {
                Line::Start { n } => {
                    let b = rest[0];
                    rest = &rest[1..];
                    const PREFIX: &[u8] = b"data:";
                    if n == 0 {
                        self.line_ts = ts;
                    }
                    if b == b'\n' {
                        self.line = Line::Start { n: 0 };
                    } else if PREFIX.get(usize::from(n)) == Some(&b) {
                        if usize::from(n) + 1 == PREFIX.len() {
                            self.line = Line::Data;
                            self.picker = JsonPicker::new(&RESPONSE_WANTS);
                            self.event.clear();
                            if self.facts.first_event.is_none() {
                                self.facts.first_event = Some(self.line_ts);
                            }
                        } else {
                            self.line = Line::Start { n: n + 1 };
                        }
                    } else if n == 0 && b == b'\r' {
                        // Blank CRLF line.
                    } else {
                        self.line = Line::Skip;
                    }
                }
                Line::Data => {
                    let end = rest.iter().position(|&b| b == b'\n');
                    let (piece, after) = match end {
                        Some(p) => (&rest[..p], &rest[p + 1..]),
                        None => (rest, &[][..]),
                    };
                    let mut out = std::mem::take(&mut self.event);
                    self.picker.feed(piece, &mut out);
                    self.event = out;
                    rest = after;
                    if end.is_some() {
                        self.end_event();
                        self.line = Line::Start { n: 0 };
                    }
                }
                Line::Skip => match rest.iter().position(|&b| b == b'\n') {
                    Some(p) => {
                        rest = &rest[p + 1..];
                        self.line = Line::Start { n: 0 };
                    }
                    None => rest = &[],
                },
            }
        }
    }

    /// `n` body bytes were not captured.
    pub fn gap(&mut self, n: u64) {
        if n == 0 {
            return;
        }
        self.facts.holes = true;
        if !self.facts.sse {
            self.picker.lose();
            return;
        }
        // Whatever the lost bytes held may have replaced what was seen: forget it.
        self.event.clear();
        self.picker.lose();
        self.line = Line::Skip;
        self.after_hole = true;
        self.facts.events = None;
        self.facts.values.iter_mut().for_each(|v| *v = None);
        self.facts.finish_reasons.clear();
    }

    /// The body ended.
    pub fn finish(mut self) -> BodyFacts {
        if self.facts.sse {
            if self.line == Line::Data {
                self.end_event();
            }
        } else {
            let mut out = Vec::new();
            self.picker.finish(&mut out);
            self.merge(out);
            if self.side == Side::Response
                && let Some(code) = self.facts.value(P_CODE)
                && code != "0"
            {
                self.facts.code_error = Some(CodeError {
                    code: code.to_string(),
                    message: self.facts.value(P_MESSAGE).map(str::to_string),
                });
            }
        }
        self.facts
    }

    fn end_event(&mut self) {
        let mut out = std::mem::take(&mut self.event);
        self.picker.finish(&mut out);
        if !self.picker.is_done() {
            // Not JSON (e.g. OpenAI's `[DONE]`), or cut: not an event we can count.
            return;
        }
        if let Some(n) = &mut self.facts.events {
            *n = n.saturating_add(1);
        }
        let code = out
            .iter()
            .find(|p| p.want == P_CODE)
            .map(|p| p.value.clone());
        if self.facts.code_error.is_none()
            && let Some(code) = code
            && code != "0"
        {
            let message = out
                .iter()
                .find(|p| p.want == P_MESSAGE)
                .map(|p| p.value.clone());
            self.facts.code_error = Some(CodeError { code, message });
        }
        self.merge(out);
    }

    fn merge(&mut self, picked: Vec<Picked>) {
        for p in picked {
            match (self.side, p.want) {
                (Side::Response, P_FINISH_FIRST..=P_FINISH_LAST) => {
                    if !self.facts.finish_reasons.contains(&p.value)
                        && self.facts.finish_reasons.len() < MAX_FINISH_REASONS
                    {
                        self.facts.finish_reasons.push(p.value);
                    }
                }
                (Side::Response, i) if i >= P_TEXT_FIRST => self.add_content(&p.value, p.cut),
                (Side::Request, i) if i >= Q_RAW_FIRST => {
                    if self.content && self.facts.content.is_none() {
                        self.facts.content = Some((p.value, p.cut));
                    }
                }
                (_, i) => {
                    if let Some(slot) = self.facts.values.get_mut(i) {
                        *slot = Some(p.value);
                    }
                }
            }
        }
    }

    fn add_content(&mut self, text: &str, cut: bool) {
        if !self.content {
            return;
        }
        let (buf, was_cut) = self
            .facts
            .content
            .get_or_insert_with(|| (String::new(), false));
        let room = MAX_CONTENT.saturating_sub(self.content_len);
        let mut take = text.len().min(room);
        while !text.is_char_boundary(take) {
            take -= 1;
        }
        buf.push_str(&text[..take]);
        self.content_len += take;
        *was_cut |= cut || take < text.len();
    }
}
