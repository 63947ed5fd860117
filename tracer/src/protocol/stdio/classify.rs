//! What a plugin stdio line is, from the fields at its start.
//!
//! Shapes (dify-plugin-daemon's stdio writer and dify_plugin 0.7.4's
//! core/server/__base/response_writer.py, core/runtime.py, core/entities/plugin/io.py):
//! - daemon -> plugin: `{"session_id", ..., "event": "request", "data": {"user_id", "type",
//!   "action", <request fields>}}` and `{"session_id", "event": "backwards_response", "data":
//!   {"backwards_request_id", "event": "response"|"error"|"end", "message", "data"}}`.
//! - plugin -> daemon: `{"event": "session"|"heartbeat"|"log"|"error", "session_id", "data"}`
//!   where a session's data is `{"type": "stream"|"end"|"error"|"invoke", "data": {...}}`; an
//!   error's inner data is `{"error_type", "message", "args"}`, an invoke's is `{"type",
//!   "backwards_request_id", "request"}`.

use super::json_prefix;

/// The paths read from every line, in the order of the `F_*` indexes below.
const WANTED: [&str; 20] = [
    "event",
    "session_id",
    "data.type",
    "data.action",
    "data.provider",
    "data.tool",
    "data.model",
    "data.backwards_request_id",
    "data.event",
    "data.message",
    "data.data.type",
    "data.data.backwards_request_id",
    "data.data.message",
    "data.data.error_type",
    "data.error",
    "data.user_id",
    "data.data.model",
    "data.data.delta.usage.prompt_tokens",
    "data.data.delta.usage.completion_tokens",
    "data.data.delta.finish_reason",
];
const F_EVENT: usize = 0;
const F_SESSION: usize = 1;
const F_TYPE: usize = 2;
const F_ACTION: usize = 3;
const F_PROVIDER: usize = 4;
const F_TOOL: usize = 5;
const F_MODEL: usize = 6;
const F_BACKWARDS_ID: usize = 7;
const F_INNER_EVENT: usize = 8;
const F_MESSAGE: usize = 9;
const F_DATA_TYPE: usize = 10;
const F_DATA_BACKWARDS_ID: usize = 11;
const F_DATA_MESSAGE: usize = 12;
const F_DATA_ERROR_TYPE: usize = 13;
const F_ERROR: usize = 14;
const F_USER: usize = 15;
const F_CHUNK_MODEL: usize = 16;
const F_PROMPT_TOKENS: usize = 17;
const F_COMPLETION_TOKENS: usize = 18;
const F_FINISH_REASON: usize = 19;

/// A plugin invocation request (daemon -> plugin).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// tool, model, endpoint, agent_strategy, ... (`data.type`).
    pub plugin_type: Option<String>,
    /// invoke_tool, invoke_llm, ... (`data.action`).
    pub action: Option<String>,
    pub provider: Option<String>,
    pub tool: Option<String>,
    pub model: Option<String>,
    pub user_id: Option<String>,
}

/// What a stream chunk says about a model call (an `LLMResultChunk`: `model`, and in
/// `delta` the `usage` of the last chunk and its `finish_reason`); empty for other chunks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChunkFacts {
    pub model: Option<String>,
    pub prompt_tokens: Option<String>,
    pub completion_tokens: Option<String>,
    pub finish_reason: Option<String>,
}

/// What a session event of the plugin says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    Stream(ChunkFacts),
    End,
    Error {
        error_type: Option<String>,
        message: Option<String>,
    },
    /// A backwards invocation: the plugin asks the daemon to call Dify.
    Invoke {
        invoke_type: Option<String>,
        backwards_request_id: Option<String>,
    },
    Other(String),
}

/// The daemon's answer to a backwards invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackwardsEvent {
    Response,
    Error(Option<String>),
    End,
    Other(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Request(Request),
    BackwardsResponse {
        backwards_request_id: Option<String>,
        event: BackwardsEvent,
    },
    Session(SessionEvent),
    Heartbeat,
    Log {
        message: Option<String>,
    },
    /// A plugin-level error event (not tied to a session).
    Error {
        message: Option<String>,
    },
    /// JSON whose event is unknown or missing.
    OtherJson(Option<String>),
    /// Not JSON (a plugin printing to stdout), or nothing captured to tell.
    NotJson,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub kind: Kind,
    pub session_id: Option<String>,
}

/// Classifies a line from its captured start.
pub fn classify(head: &[u8]) -> Message {
    let start = head
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(head.len());
    let head = &head[start..];
    if head.first() != Some(&b'{') {
        return Message {
            kind: Kind::NotJson,
            session_id: None,
        };
    }
    let scan = json_prefix::scan(head, &WANTED);
    if scan.invalid {
        return Message {
            kind: Kind::NotJson,
            session_id: None,
        };
    }
    let mut v = scan.values;
    let mut take = |i: usize| v.get_mut(i).and_then(Option::take);
    let session_id = take(F_SESSION).filter(|s| !s.is_empty());
    let kind = match take(F_EVENT).as_deref() {
        Some("request") => Kind::Request(Request {
            plugin_type: take(F_TYPE),
            action: take(F_ACTION),
            provider: take(F_PROVIDER),
            tool: take(F_TOOL),
            model: take(F_MODEL),
            user_id: take(F_USER),
        }),
        Some("backwards_response") => Kind::BackwardsResponse {
            backwards_request_id: take(F_BACKWARDS_ID),
            event: match take(F_INNER_EVENT).as_deref() {
                Some("response") => BackwardsEvent::Response,
                Some("end") => BackwardsEvent::End,
                Some("error") => BackwardsEvent::Error(take(F_MESSAGE)),
                other => BackwardsEvent::Other(other.unwrap_or("").to_string()),
            },
        },
        Some("session") => Kind::Session(match take(F_TYPE).as_deref() {
            Some("stream") => SessionEvent::Stream(ChunkFacts {
                model: take(F_CHUNK_MODEL),
                prompt_tokens: take(F_PROMPT_TOKENS),
                completion_tokens: take(F_COMPLETION_TOKENS),
                finish_reason: take(F_FINISH_REASON),
            }),
            Some("end") => SessionEvent::End,
            Some("error") => SessionEvent::Error {
                error_type: take(F_DATA_ERROR_TYPE),
                message: take(F_DATA_MESSAGE),
            },
            Some("invoke") => SessionEvent::Invoke {
                invoke_type: take(F_DATA_TYPE),
                backwards_request_id: take(F_DATA_BACKWARDS_ID),
            },
            other => SessionEvent::Other(other.unwrap_or("").to_string()),
        }),
        Some("heartbeat") => Kind::Heartbeat,
        Some("log") => Kind::Log {
            message: take(F_MESSAGE),
        },
        Some("error") => Kind::Error {
            message: take(F_ERROR).or_else(|| take(F_MESSAGE)),
        },
        other => Kind::OtherJson(other.map(str::to_string)),
    };
    Message { kind, session_id }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemon_request() {
        let m = classify(
            br#"{"session_id":"s1","conversation_id":null,"message_id":null,"app_id":null,"endpoint_id":null,"context":{},"event":"request","data":{"user_id":"u","type":"tool","action":"invoke_tool","provider":"echo","tool":"echo","credentials":{"api_key":"x"},"tool_parameters":{"text":"hi"}}}"#,
        );
        assert_eq!(m.session_id.as_deref(), Some("s1"));
        let Kind::Request(r) = m.kind else {
            panic!("not a request: {m:?}")
        };
        assert_eq!(r.plugin_type.as_deref(), Some("tool"));
        assert_eq!(r.action.as_deref(), Some("invoke_tool"));
        assert_eq!(r.tool.as_deref(), Some("echo"));
        assert_eq!(r.user_id.as_deref(), Some("u"));
    }

    #[test]
    fn sdk_session_events() {
        let stream = classify(br#"{"event":"session","session_id":"s1","data":{"type":"stream","data":{"type":"text","message":{"text":"a"}}}}"#);
        assert_eq!(
            stream.kind,
            Kind::Session(SessionEvent::Stream(ChunkFacts::default()))
        );
        let last = classify(br#"{"event":"session","session_id":"s1","data":{"type":"stream","data":{"model":"gpt-4o","prompt_messages":[{"role":"user","content":"hi"}],"system_fingerprint":null,"delta":{"index":3,"message":{"role":"assistant","content":""},"usage":{"prompt_tokens":12,"prompt_unit_price":"0","completion_tokens":7,"total_tokens":19},"finish_reason":"stop"}}}}"#);
        assert_eq!(
            last.kind,
            Kind::Session(SessionEvent::Stream(ChunkFacts {
                model: Some("gpt-4o".into()),
                prompt_tokens: Some("12".into()),
                completion_tokens: Some("7".into()),
                finish_reason: Some("stop".into()),
            }))
        );
        let err = classify(br#"{"event":"session","session_id":"s1","data":{"type":"error","data":{"error_type":"ValueError","message":"boom","args":{}}}}"#);
        assert_eq!(
            err.kind,
            Kind::Session(SessionEvent::Error {
                error_type: Some("ValueError".into()),
                message: Some("boom".into())
            })
        );
        let invoke = classify(br#"{"event":"session","session_id":"s1","data":{"type":"invoke","data":{"type":"llm","backwards_request_id":"b1","request":{}}}}"#);
        assert_eq!(
            invoke.kind,
            Kind::Session(SessionEvent::Invoke {
                invoke_type: Some("llm".into()),
                backwards_request_id: Some("b1".into())
            })
        );
        let end =
            classify(br#"{"event":"session","session_id":"s1","data":{"type":"end","data":{}}}"#);
        assert_eq!(end.kind, Kind::Session(SessionEvent::End));
    }

    #[test]
    fn backwards_response_heartbeat_log_and_garbage() {
        let b = classify(br#"{"session_id":"s1","event":"backwards_response","data":{"backwards_request_id":"b1","event":"error","message":"denied","data":null}}"#);
        assert_eq!(
            b.kind,
            Kind::BackwardsResponse {
                backwards_request_id: Some("b1".into()),
                event: BackwardsEvent::Error(Some("denied".into()))
            }
        );
        let h = classify(br#"{"event":"heartbeat","session_id":null,"data":{}}"#);
        assert_eq!(h.kind, Kind::Heartbeat);
        assert_eq!(h.session_id, None);
        let l = classify(br#"{"event":"log","session_id":null,"data":{"level":"INFO","message":"hello","timestamp":1.0}}"#);
        assert_eq!(
            l.kind,
            Kind::Log {
                message: Some("hello".into())
            }
        );
        assert_eq!(classify(b"hello world").kind, Kind::NotJson);
        assert_eq!(classify(b"{not json").kind, Kind::NotJson);
        assert_eq!(classify(b"").kind, Kind::NotJson);
    }

    #[test]
    fn a_cut_off_request_still_names_its_session() {
        let m = classify(br#"{"session_id":"s9","event":"request","data":{"user_id":"u","type":"model","action":"invoke_llm","provider":"openai","model":"gpt-4o","credentials":{"api_key":"sk-"#);
        assert_eq!(m.session_id.as_deref(), Some("s9"));
        let Kind::Request(r) = m.kind else {
            panic!("{m:?}")
        };
        assert_eq!(r.action.as_deref(), Some("invoke_llm"));
        assert_eq!(r.model.as_deref(), Some("gpt-4o"));
    }
}
