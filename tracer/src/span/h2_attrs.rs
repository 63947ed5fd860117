//! OpenTelemetry attributes, name and status of an HTTP/2 stream, gRPC or plain.
//!
//! gRPC status to span status follows the RPC conventions: every non-OK code is an error on
//! a CLIENT span; on a SERVER span only the codes that say the server failed (UNKNOWN,
//! DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS) are.

use std::net::SocketAddr;

use super::{
    http_attrs,
    model::{AttrValue, SpanKind, SpanStatus},
};
use crate::protocol::http2::{Direction, Http2Stream, StreamEnd};

/// gRPC codes that are the server's fault.
const SERVER_FAULT_CODES: [u32; 6] = [2, 4, 12, 13, 14, 15];

const GRPC_CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// Whether a non-OK gRPC `code` makes a span of `kind` an error: every one for a client, only
/// the server's own faults for a server.
pub fn grpc_is_fault(kind: SpanKind, code: u32) -> bool {
    code != 0 && (kind == SpanKind::Client || SERVER_FAULT_CODES.contains(&code))
}

/// The name of a gRPC status code (`NOT_FOUND`), or its number when unknown.
pub fn grpc_code_name(code: u32) -> String {
    GRPC_CODE_NAMES
        .get(code as usize)
        .map_or_else(|| code.to_string(), |n| (*n).to_string())
}

/// Span name: `pkg.Service/Method` for gRPC, `METHOD /path` otherwise (`HTTP` when the
/// request headers were not decoded).
pub fn span_name(stream: &Http2Stream) -> String {
    let grpc = stream.is_grpc() || stream.grpc_status().is_some();
    if let Some((service, method)) = stream.grpc_method().filter(|_| grpc) {
        return format!("{service}/{method}");
    }
    match (stream.method(), stream.path()) {
        (Some(m), Some(p)) => format!("{m} {}", path_of(p)),
        (Some(m), None) => m.to_string(),
        _ if grpc => "grpc".to_string(),
        _ => "HTTP".to_string(),
    }
}

fn path_of(target: &str) -> &str {
    target.split(['?', '#']).next().unwrap_or(target)
}

/// Why the stream ended without both END_STREAMs, as (error.type, description).
fn abnormal_end(end: StreamEnd) -> Option<(String, String)> {
    match end {
        StreamEnd::Complete => None,
        StreamEnd::Reset { code, by } => {
            let who = match by {
                Direction::ClientToServer => "client",
                Direction::ServerToClient => "server",
            };
            let code = code.map_or_else(|| "unknown".into(), |c| c.to_string());
            Some((
                "rst_stream".into(),
                format!("stream reset by the {who} (code {code})"),
            ))
        }
        StreamEnd::GoAway { code, .. } => Some((
            "goaway".into(),
            format!("connection going away (code {code}) before the stream ended"),
        )),
        StreamEnd::ConnectionClosed => Some((
            "no_response".into(),
            "connection closed before the stream ended".into(),
        )),
        StreamEnd::Lost => Some((
            "capture_lost".into(),
            "stream state dropped by the tracer".into(),
        )),
    }
}

pub fn attributes(
    kind: SpanKind,
    stream: &Http2Stream,
    peer: Option<SocketAddr>,
) -> (Vec<(String, AttrValue)>, SpanStatus) {
    let mut attrs: Vec<(String, AttrValue)> = Vec::with_capacity(18);
    let mut put = |k: &str, v: AttrValue| attrs.push((k.to_string(), v));
    // A gRPC status also says gRPC when the content-type was an unknown HPACK reference.
    let grpc = stream.is_grpc() || stream.grpc_status().is_some();
    put("network.protocol.name", AttrValue::Str("http".into()));
    put("network.protocol.version", AttrValue::Str("2".into()));
    if let Some(method) = stream.method() {
        put("http.request.method", AttrValue::Str(method.to_string()));
    }
    if let Some(path) = stream.path() {
        put("url.path", AttrValue::Str(path_of(path).to_string()));
    }
    if let Some(scheme) = stream.scheme() {
        put("url.scheme", AttrValue::Str(scheme.to_string()));
    }
    http_attrs::push_addresses(&mut attrs, kind, stream.authority(), peer);
    let mut put = |k: &str, v: AttrValue| attrs.push((k.to_string(), v));
    if let Some(ua) = stream
        .request
        .headers
        .as_ref()
        .and_then(|h| h.get("user-agent"))
    {
        put(
            "user_agent.original",
            AttrValue::Str(ua.chars().take(256).collect()),
        );
    }
    let status = stream.status();
    if let Some(code) = status {
        put("http.response.status_code", AttrValue::Int(i64::from(code)));
    }
    if stream.request.body.exact {
        put(
            "http.request.body.size",
            AttrValue::Int(clamp(stream.request.body.bytes)),
        );
    }
    if stream.response.body.exact {
        put(
            "http.response.body.size",
            AttrValue::Int(clamp(stream.response.body.bytes)),
        );
    }
    let grpc_status = stream.grpc_status();
    if grpc {
        put("rpc.system", AttrValue::Str("grpc".into()));
        if let Some((service, method)) = stream.grpc_method() {
            put("rpc.service", AttrValue::Str(service.to_string()));
            put("rpc.method", AttrValue::Str(method.to_string()));
        }
        if let Some(code) = grpc_status {
            put("rpc.grpc.status_code", AttrValue::Int(i64::from(code)));
        }
        // Lower bounds unless exact; both are reported so a reader can tell.
        put(
            "difytrace.grpc.request_messages",
            AttrValue::Int(clamp(stream.request.body.grpc_messages)),
        );
        put(
            "difytrace.grpc.response_messages",
            AttrValue::Int(clamp(stream.response.body.grpc_messages)),
        );
    }
    let headers_partial = [&stream.request, &stream.response].iter().any(|h| {
        h.headers.as_ref().is_some_and(|b| b.partial)
            || h.trailers.as_ref().is_some_and(|b| b.partial)
    }) || stream.request.headers.is_none();
    if headers_partial {
        put("difytrace.partial_headers", AttrValue::Bool(true));
    }
    if stream.partial() {
        put("difytrace.partial", AttrValue::Bool(true));
    }

    let mut error: Option<(String, String)> = None;
    if grpc && let Some(code) = grpc_status {
        let fault = grpc_is_fault(kind, code);
        if fault {
            let message = stream
                .grpc_message()
                .filter(|m| !m.is_empty())
                .unwrap_or_else(|| grpc_code_name(code));
            error = Some((grpc_code_name(code), message));
        }
    } else if let Some(code) = status
        && (code >= 500 || (code >= 400 && kind == SpanKind::Client))
    {
        error = Some((code.to_string(), code.to_string()));
    }
    if error.is_none()
        && (status.is_none() || (grpc && grpc_status.is_none()))
        && let Some(abnormal) = abnormal_end(stream.end)
    {
        error = Some(abnormal);
    }
    let span_status = match error {
        Some((error_type, description)) => {
            attrs.push(("error.type".into(), AttrValue::Str(error_type)));
            SpanStatus::Error(description)
        }
        None => SpanStatus::Unset,
    };
    (attrs, span_status)
}

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::http2::{ChunkTs, HeaderBlock, StreamHalf};

    fn block(fields: &[(&str, &str)]) -> HeaderBlock {
        HeaderBlock {
            fields: fields
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    fn stream(
        request: HeaderBlock,
        response: HeaderBlock,
        trailers: Option<HeaderBlock>,
    ) -> Http2Stream {
        let ts = ChunkTs {
            enter_ns: 1,
            exit_ns: 2,
        };
        Http2Stream {
            stream_id: 1,
            request: StreamHalf {
                headers: Some(request),
                first: Some(ts),
                end: Some(ts),
                ..Default::default()
            },
            response: StreamHalf {
                headers: Some(response),
                trailers,
                first: Some(ts),
                end: Some(ts),
                ..Default::default()
            },
            informational: 0,
            started: ts,
            ended: ts,
            end: StreamEnd::Complete,
            missed_start: false,
            sync_lost: false,
        }
    }

    fn grpc_request() -> HeaderBlock {
        block(&[
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/grpc.examples.echo.Echo/UnaryEcho"),
            (":authority", "127.0.0.1:50051"),
            ("content-type", "application/grpc"),
        ])
    }

    fn attr<'a>(attrs: &'a [(String, AttrValue)], k: &str) -> Option<&'a AttrValue> {
        attrs.iter().find(|(n, _)| n == k).map(|(_, v)| v)
    }

    #[test]
    fn grpc_ok_and_not_found() {
        let ok = stream(
            grpc_request(),
            block(&[(":status", "200"), ("content-type", "application/grpc")]),
            Some(block(&[("grpc-status", "0")])),
        );
        assert_eq!(span_name(&ok), "grpc.examples.echo.Echo/UnaryEcho");
        let (attrs, status) = attributes(SpanKind::Server, &ok, None);
        assert_eq!(status, SpanStatus::Unset);
        assert_eq!(
            attr(&attrs, "rpc.system"),
            Some(&AttrValue::Str("grpc".into()))
        );
        assert_eq!(
            attr(&attrs, "rpc.method"),
            Some(&AttrValue::Str("UnaryEcho".into()))
        );
        assert_eq!(
            attr(&attrs, "rpc.grpc.status_code"),
            Some(&AttrValue::Int(0))
        );

        // Trailers-only NOT_FOUND: an error for the client, not the server's fault.
        let nf = stream(
            grpc_request(),
            block(&[
                (":status", "200"),
                ("content-type", "application/grpc"),
                ("grpc-status", "5"),
                ("grpc-message", "no%20such"),
            ]),
            None,
        );
        let (attrs, status) = attributes(SpanKind::Client, &nf, None);
        assert_eq!(status, SpanStatus::Error("no such".into()));
        assert_eq!(
            attr(&attrs, "error.type"),
            Some(&AttrValue::Str("NOT_FOUND".into()))
        );
        let (_, status) = attributes(SpanKind::Server, &nf, None);
        assert_eq!(status, SpanStatus::Unset);
        let mut internal = nf.clone();
        if let Some(h) = internal.response.headers.as_mut() {
            h.fields[2].1 = "13".into();
        }
        assert!(matches!(
            attributes(SpanKind::Server, &internal, None).1,
            SpanStatus::Error(_)
        ));
    }

    #[test]
    fn plain_http2_and_resets() {
        let mut s = stream(
            block(&[
                (":method", "GET"),
                (":path", "/a?token=x"),
                (":authority", "h:8443"),
            ]),
            block(&[(":status", "503")]),
            None,
        );
        assert_eq!(span_name(&s), "GET /a");
        let (attrs, status) = attributes(SpanKind::Server, &s, None);
        assert_eq!(status, SpanStatus::Error("503".into()));
        assert_eq!(attr(&attrs, "url.path"), Some(&AttrValue::Str("/a".into())));
        s.response.headers = None;
        s.end = StreamEnd::Reset {
            code: Some(8),
            by: Direction::ClientToServer,
        };
        let (attrs, status) = attributes(SpanKind::Client, &s, None);
        assert!(matches!(status, SpanStatus::Error(ref m) if m.contains("reset by the client")));
        assert_eq!(
            attr(&attrs, "error.type"),
            Some(&AttrValue::Str("rst_stream".into()))
        );
    }

    #[test]
    fn missing_request_headers_are_partial() {
        let mut s = stream(grpc_request(), block(&[(":status", "200")]), None);
        s.request.headers = None;
        s.missed_start = true;
        let (attrs, _) = attributes(SpanKind::Server, &s, None);
        assert_eq!(
            attr(&attrs, "difytrace.partial_headers"),
            Some(&AttrValue::Bool(true))
        );
        assert_eq!(span_name(&s), "HTTP");
    }
}
