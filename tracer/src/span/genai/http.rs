//! GenAI and Dify attributes of an HTTP span, from the facts its bodies' inspectors read.

use super::redact::{redact_body, redact_inline, redact_json};
use crate::{
    protocol::{
        genai::{
            BodyFacts, CodeError, Route, capture,
            inspect::{
                P_CODE, P_COMPLETION_TOKENS, P_DATA_COMPLETION_TOKENS, P_DATA_ERROR,
                P_DATA_EXIT_CODE, P_DATA_MODEL, P_DATA_PROMPT_TOKENS, P_ID, P_INPUT_TOKENS,
                P_MESSAGE_ID, P_MESSAGE_INPUT_TOKENS, P_MESSAGE_MODEL, P_MESSAGE_OUTPUT_TOKENS,
                P_MODEL, P_OUTPUT_TOKENS, P_PROMPT_TOKENS, Q_DIFY_MODEL, Q_LANGUAGE, Q_MAX_TOKENS,
                Q_MODEL, Q_PROVIDER, Q_TEMPERATURE,
            },
            route_of,
        },
        http1::Http1Message,
    },
    span::{
        http_attrs::method_and_path,
        model::{AttrValue, SpanKind},
    },
};

/// What the GenAI layer adds to an HTTP span.
#[derive(Debug, Default)]
pub struct GenAiHttp {
    pub attrs: Vec<(String, AttrValue)>,
    /// Replaces the span name (`dispatch <kind>/<action>`).
    pub name: Option<String>,
    /// The body said the call failed although HTTP said 200: (error.type, message).
    pub error: Option<(String, String)>,
}

struct Out(Vec<(String, AttrValue)>);

impl Out {
    fn str(&mut self, k: &str, v: Option<&str>) {
        if let Some(v) = v.filter(|v| !v.is_empty()) {
            self.0.push((k.into(), AttrValue::Str(v.to_string())));
        }
    }
    fn int(&mut self, k: &str, v: Option<&str>) {
        if let Some(n) = v.and_then(|v| v.parse::<i64>().ok()) {
            self.0.push((k.into(), AttrValue::Int(n)));
        }
    }
    fn f64(&mut self, k: &str, v: Option<&str>) {
        if let Some(n) = v.and_then(|v| v.parse::<f64>().ok()) {
            self.0.push((k.into(), AttrValue::F64(n)));
        }
    }
}

/// Attributes of an HTTP span: GenAI/Dify facts of known routes, and captured bodies when
/// `--capture-bodies` asked for them. `start_ns` is the span's start (kernel clock).
pub fn http_span(
    kind: SpanKind,
    request: &Http1Message,
    response: Option<&Http1Message>,
    start_ns: u64,
) -> GenAiHttp {
    let mut g = GenAiHttp::default();
    let mut out = Out(Vec::new());
    let (_, path) = method_and_path(request);
    if let Some(route) = route_of(path) {
        let rq = request.genai.as_deref();
        let rs = response.and_then(|r| r.genai.as_deref());
        route_attrs(&mut g, &mut out, &route, request, rq, rs);
        if let Some(rs) = rs {
            stream_attrs(&mut out, kind, rs, start_ns);
        }
        if capture::content() {
            content_attrs(&mut out, rq, rs);
        }
    }
    let cap = capture::body_bytes();
    if cap > 0 {
        body_attr(&mut out, "http.request.body", &request.body_prefix, cap);
        if let Some(r) = response {
            body_attr(&mut out, "http.response.body", &r.body_prefix, cap);
        }
    }
    g.attrs = out.0;
    g
}

fn route_attrs(
    g: &mut GenAiHttp,
    out: &mut Out,
    route: &Route,
    request: &Http1Message,
    rq: Option<&BodyFacts>,
    rs: Option<&BodyFacts>,
) {
    let q = |i: usize| rq.and_then(|f| f.value(i));
    let p = |i: usize| rs.and_then(|f| f.value(i));
    match route {
        Route::Dispatch {
            tenant,
            kind,
            action,
        } => {
            g.name = Some(format!("dispatch {kind}/{action}"));
            out.str("dify.tenant_id", Some(tenant));
            out.str("dify.dispatch.kind", Some(kind));
            out.str("dify.dispatch.action", Some(action));
            out.str("dify.plugin.id", request.header("x-plugin-id"));
            let op = match kind.as_str() {
                "llm" => Some("chat"),
                "text_embedding" => Some("embeddings"),
                _ => None,
            };
            out.str("gen_ai.operation.name", op);
            out.str("gen_ai.provider.name", q(Q_PROVIDER));
            out.str("gen_ai.request.model", q(Q_DIFY_MODEL));
            out.str("gen_ai.response.model", p(P_DATA_MODEL));
            out.int("gen_ai.usage.input_tokens", p(P_DATA_PROMPT_TOKENS));
            out.int("gen_ai.usage.output_tokens", p(P_DATA_COMPLETION_TOKENS));
            if let Some(e) = rs.and_then(|f| f.code_error.as_ref()) {
                g.error = Some(dify_error(e));
            }
        }
        Route::ChatCompletions | Route::Completions | Route::Embeddings => {
            let op = match route {
                Route::ChatCompletions => "chat",
                Route::Completions => "text_completion",
                _ => "embeddings",
            };
            out.str("gen_ai.operation.name", Some(op));
            // The OpenAI API, whoever serves it.
            out.str("gen_ai.provider.name", Some("openai"));
            out.str("gen_ai.request.model", q(Q_MODEL));
            out.int("gen_ai.request.max_tokens", q(Q_MAX_TOKENS));
            out.f64("gen_ai.request.temperature", q(Q_TEMPERATURE));
            out.str("gen_ai.response.id", p(P_ID));
            out.str("gen_ai.response.model", p(P_MODEL));
            out.int("gen_ai.usage.input_tokens", p(P_PROMPT_TOKENS));
            out.int("gen_ai.usage.output_tokens", p(P_COMPLETION_TOKENS));
        }
        Route::AnthropicMessages => {
            out.str("gen_ai.operation.name", Some("chat"));
            out.str("gen_ai.provider.name", Some("anthropic"));
            out.str("gen_ai.request.model", q(Q_MODEL));
            out.int("gen_ai.request.max_tokens", q(Q_MAX_TOKENS));
            out.f64("gen_ai.request.temperature", q(Q_TEMPERATURE));
            // Streams carry id, model and input tokens in message_start, output tokens
            // (cumulative) in message_delta; plain answers carry them at the top level.
            out.str("gen_ai.response.id", p(P_ID).or(p(P_MESSAGE_ID)));
            out.str("gen_ai.response.model", p(P_MODEL).or(p(P_MESSAGE_MODEL)));
            out.int(
                "gen_ai.usage.input_tokens",
                p(P_INPUT_TOKENS).or(p(P_MESSAGE_INPUT_TOKENS)),
            );
            out.int(
                "gen_ai.usage.output_tokens",
                p(P_OUTPUT_TOKENS).or(p(P_MESSAGE_OUTPUT_TOKENS)),
            );
        }
        Route::SandboxRun => {
            out.str("dify.sandbox.language", q(Q_LANGUAGE));
            out.int("dify.sandbox.exit_code", p(P_DATA_EXIT_CODE));
            let error = p(P_DATA_ERROR).map(redact_inline);
            out.str("dify.sandbox.error", error.as_deref());
            if let Some(e) = rs.and_then(|f| f.code_error.as_ref()) {
                out.int("dify.sandbox.code", p(P_CODE));
                g.error = Some((
                    "dify.sandbox.error".into(),
                    e.message.as_deref().map(redact_inline).unwrap_or_default(),
                ));
            }
        }
    }
    if let Some(rs) = rs
        && !rs.finish_reasons.is_empty()
    {
        out.0.push((
            "gen_ai.response.finish_reasons".into(),
            AttrValue::StrList(rs.finish_reasons.clone()),
        ));
    }
}

/// Dify's error message is itself JSON: `{"message", "error_type", "args"}`.
fn dify_error(e: &CodeError) -> (String, String) {
    let text = e.message.clone().unwrap_or_default();
    let inner: Option<serde_json::Value> = serde_json::from_str(&text).ok();
    let field = |k: &str| {
        inner
            .as_ref()
            .and_then(|v| v.get(k))
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    let error_type = field("error_type").unwrap_or_else(|| format!("dify.code.{}", e.code));
    let message = field("message").unwrap_or(text);
    (error_type, redact_inline(&message))
}

fn stream_attrs(out: &mut Out, kind: SpanKind, rs: &BodyFacts, start_ns: u64) {
    if !rs.sse {
        return;
    }
    if let Some(n) = rs.events {
        out.0
            .push(("dify.stream.chunks".into(), AttrValue::Int(i64::from(n))));
    }
    if let Some(first) = rs.first_event {
        // A client has the chunk when its read returns; a server sent it when its write began.
        let at = match kind {
            SpanKind::Client => first.exit_ns,
            _ => first.enter_ns,
        };
        if at >= start_ns && start_ns > 0 {
            out.0.push((
                "dify.stream.time_to_first_chunk_ms".into(),
                AttrValue::F64((at - start_ns) as f64 / 1e6),
            ));
        }
    }
}

fn content_attrs(out: &mut Out, rq: Option<&BodyFacts>, rs: Option<&BodyFacts>) {
    if let Some((raw, cut)) = rq.and_then(|f| f.content.as_ref()) {
        let mut text = redact_json(raw);
        if *cut {
            text.push('…');
        }
        out.0
            .push(("gen_ai.input.messages".into(), AttrValue::Str(text)));
    }
    if let Some((text, cut)) = rs.and_then(|f| f.content.as_ref()) {
        let mut text = redact_inline(text);
        if *cut {
            text.push('…');
        }
        let messages = serde_json::json!([{
            "role": "assistant",
            "parts": [{"type": "text", "content": text}],
        }]);
        out.0.push((
            "gen_ai.output.messages".into(),
            AttrValue::Str(messages.to_string()),
        ));
    }
}

fn body_attr(out: &mut Out, key: &str, prefix: &[u8], cap: usize) {
    if prefix.is_empty() {
        return;
    }
    let cut = prefix.get(..cap.min(prefix.len())).unwrap_or_default();
    if let Some(text) = redact_body(cut) {
        out.0.push((key.into(), AttrValue::Str(text)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::http1::{ChunkTs, Http1Event, Http1Parser, Side};

    fn ts(n: u64) -> ChunkTs {
        ChunkTs {
            enter_ns: n,
            exit_ns: n + 1,
        }
    }

    fn parse(side: Side, target: Option<&str>, bytes: &[&[u8]]) -> Http1Message {
        let mut p = Http1Parser::new(side);
        if let Some(t) = target {
            p.push_request("POST", t);
        }
        let mut out = Vec::new();
        for (i, b) in bytes.iter().enumerate() {
            p.feed(b, ts(1000 * (i as u64 + 1)), &mut out);
        }
        match out.pop() {
            Some(Http1Event::Message(m)) => m,
            other => panic!("no message: {other:?}"),
        }
    }

    fn attr<'a>(g: &'a GenAiHttp, k: &str) -> Option<&'a AttrValue> {
        g.attrs.iter().find(|(key, _)| key == k).map(|(_, v)| v)
    }

    #[test]
    fn dispatch_timeout_span() {
        let body =
            br#"{"data":{"provider":"openai","model":"slow","credentials":{"api_key":"sk-x"}}}"#;
        let head = format!(
            "POST /plugin/t1/dispatch/llm/invoke HTTP/1.1\r\nX-Plugin-ID: a/b\r\nX-Api-Key: k\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let req = parse(Side::Request, None, &[head.as_bytes(), body]);
        let event: &[u8] = br#"data: {"code":-500,"message":"{\"message\":\"killed by timeout\",\"error_type\":\"PluginDaemonInternalServerError\",\"args\":null}","data":null}"#;
        let resp_head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: {}\r\n\r\n",
            event.len() + 2
        );
        let resp = parse(
            Side::Response,
            Some("/plugin/t1/dispatch/llm/invoke"),
            &[resp_head.as_bytes(), event, b"\n\n"],
        );
        let g = http_span(SpanKind::Server, &req, Some(&resp), 500);
        assert_eq!(g.name.as_deref(), Some("dispatch llm/invoke"));
        assert_eq!(
            g.error,
            Some((
                "PluginDaemonInternalServerError".into(),
                "killed by timeout".into()
            ))
        );
        assert_eq!(
            attr(&g, "dify.tenant_id"),
            Some(&AttrValue::Str("t1".into()))
        );
        assert_eq!(
            attr(&g, "dify.plugin.id"),
            Some(&AttrValue::Str("a/b".into()))
        );
        assert_eq!(
            attr(&g, "gen_ai.request.model"),
            Some(&AttrValue::Str("slow".into()))
        );
        assert_eq!(attr(&g, "dify.stream.chunks"), Some(&AttrValue::Int(1)));
        // The event's chunk was written at 2000 (server side: write start), the span began at 500.
        assert_eq!(
            attr(&g, "dify.stream.time_to_first_chunk_ms"),
            Some(&AttrValue::F64(1500.0 / 1e6))
        );
        assert!(
            !g.attrs
                .iter()
                .any(|(_, v)| matches!(v, AttrValue::Str(s) if s.contains("sk-x")))
        );
    }
}
