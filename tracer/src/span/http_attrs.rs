//! OpenTelemetry HTTP semantic-convention attributes from a request/response pair.
//! Only named, harmless headers are read: secrets (Authorization, Cookie, X-Api-Key, ...) are
//! never copied into a span, so there is nothing to redact later.

use std::net::SocketAddr;

use super::model::{AttrValue, SpanKind, SpanStatus};
use crate::protocol::http1::{Http1Message, StartLine};

/// Method and path of a request (path without the query string, which may carry secrets).
pub fn method_and_path(request: &Http1Message) -> (&str, &str) {
    match &request.start_line {
        StartLine::Request { method, target } => (method.as_str(), path_of(target)),
        StartLine::Response { .. } => ("", ""),
    }
}

fn path_of(target: &str) -> &str {
    // Absolute-form targets (proxies): keep only the path.
    let target = match target.find("://") {
        Some(i) => target
            .get(i + 3..)
            .and_then(|rest| rest.find('/').map(|p| &rest[p..]))
            .unwrap_or("/"),
        None => target,
    };
    target.split(['?', '#']).next().unwrap_or(target)
}

/// Host header split into host and optional port.
fn host_and_port(host: &str) -> (&str, Option<u16>) {
    if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        let (addr, tail) = rest.split_once(']').unwrap_or((rest, ""));
        return (addr, tail.strip_prefix(':').and_then(|p| p.parse().ok()));
    }
    match host.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h, p.parse().ok()),
        _ => (host, None),
    }
}

fn status_of(response: Option<&Http1Message>) -> Option<u16> {
    match &response?.start_line {
        StartLine::Response { status, .. } => Some(*status),
        StartLine::Request { .. } => None,
    }
}

/// Span name: `METHOD /path`.
pub fn span_name(request: &Http1Message) -> String {
    let (method, path) = method_and_path(request);
    if path.is_empty() {
        method.to_string()
    } else {
        format!("{method} {path}")
    }
}

/// Attributes and status for an HTTP span.
/// What ended a request: its response, or why it got none.
#[derive(Debug, Clone, Copy)]
pub enum Outcome<'a> {
    Response(&'a Http1Message),
    /// The connection closed (or its process exited) first.
    ConnectionClosed,
    /// Records of the connection were lost by the capture: not the peer's fault.
    CaptureLost,
}

impl<'a> Outcome<'a> {
    pub fn response(self) -> Option<&'a Http1Message> {
        match self {
            Outcome::Response(r) => Some(r),
            Outcome::ConnectionClosed | Outcome::CaptureLost => None,
        }
    }
}

pub fn attributes(
    kind: SpanKind,
    request: &Http1Message,
    outcome: Outcome<'_>,
    peer: Option<SocketAddr>,
) -> (Vec<(String, AttrValue)>, SpanStatus) {
    let response = outcome.response();
    let mut attrs: Vec<(String, AttrValue)> = Vec::with_capacity(14);
    let mut put = |k: &str, v: AttrValue| attrs.push((k.to_string(), v));
    let (method, path) = method_and_path(request);
    put("http.request.method", AttrValue::Str(method.to_string()));
    put("url.path", AttrValue::Str(path.to_string()));
    put("url.scheme", AttrValue::Str("http".into()));
    put(
        "network.protocol.version",
        AttrValue::Str(format!("1.{}", request.minor_version)),
    );
    push_addresses(&mut attrs, kind, request.header("host"), peer);
    let mut put = |k: &str, v: AttrValue| attrs.push((k.to_string(), v));
    if let Some(ua) = request.header("user-agent") {
        put(
            "user_agent.original",
            AttrValue::Str(ua.chars().take(256).collect()),
        );
    }
    // A body whose framing was lost has no known size: better none than a wrong one.
    if !request.body_incomplete {
        put(
            "http.request.body.size",
            AttrValue::Int(clamp(request.body_len)),
        );
    }
    let status = status_of(response);
    if let Some(code) = status {
        put("http.response.status_code", AttrValue::Int(i64::from(code)));
    }
    if let Some(resp) = response
        && !resp.body_incomplete
    {
        put(
            "http.response.body.size",
            AttrValue::Int(clamp(resp.body_len)),
        );
    }
    if request.head_truncated
        || request.body_incomplete
        || response.is_some_and(|r| r.head_truncated || r.body_incomplete)
    {
        put("difytrace.truncated", AttrValue::Bool(true));
    }
    let span_status = match status {
        // Server spans: only 5xx is the server's fault; client spans: 4xx too.
        Some(code) if code >= 500 => SpanStatus::Error(code.to_string()),
        Some(code) if code >= 400 && kind == SpanKind::Client => {
            SpanStatus::Error(code.to_string())
        }
        Some(_) => SpanStatus::Unset,
        None => SpanStatus::Error(match outcome {
            Outcome::CaptureLost => "records of this connection were lost".into(),
            _ => "connection closed before a response".into(),
        }),
    };
    if let SpanStatus::Error(reason) = &span_status {
        let error_type = match (status, outcome) {
            (Some(_), _) => reason.clone(),
            (None, Outcome::CaptureLost) => "capture_lost".into(),
            (None, _) => "no_response".into(),
        };
        attrs.push(("error.type".into(), AttrValue::Str(error_type)));
    }
    (attrs, span_status)
}

/// server.*, client.* and network.peer.* from the Host header (HTTP/1) or :authority (HTTP/2)
/// and the connection's peer.
pub(super) fn push_addresses(
    attrs: &mut Vec<(String, AttrValue)>,
    kind: SpanKind,
    host: Option<&str>,
    peer: Option<SocketAddr>,
) {
    let mut put = |k: &str, v: AttrValue| attrs.push((k.to_string(), v));
    if let Some(host) = host {
        let (h, p) = host_and_port(host);
        if !h.is_empty() {
            put("server.address", AttrValue::Str(h.to_string()));
        }
        if let Some(p) = p.filter(|_| kind == SpanKind::Server) {
            put("server.port", AttrValue::Int(i64::from(p)));
        }
    } else if kind == SpanKind::Client
        && let Some(peer) = peer
    {
        put("server.address", AttrValue::Str(peer.ip().to_string()));
    }
    if let Some(peer) = peer {
        put(
            "network.peer.address",
            AttrValue::Str(peer.ip().to_string()),
        );
        put("network.peer.port", AttrValue::Int(i64::from(peer.port())));
        match kind {
            SpanKind::Client => put("server.port", AttrValue::Int(i64::from(peer.port()))),
            _ => {
                put("client.address", AttrValue::Str(peer.ip().to_string()));
                put("client.port", AttrValue::Int(i64::from(peer.port())));
            }
        }
    }
}

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_drop_query_and_scheme() {
        assert_eq!(path_of("/a/b?token=secret"), "/a/b");
        assert_eq!(path_of("http://x:80/y?z"), "/y");
        assert_eq!(path_of("http://x"), "/");
        assert_eq!(path_of("*"), "*");
    }

    #[test]
    fn hosts() {
        assert_eq!(host_and_port("a.b:8080"), ("a.b", Some(8080)));
        assert_eq!(host_and_port("a.b"), ("a.b", None));
        assert_eq!(host_and_port("[::1]:81"), ("::1", Some(81)));
        assert_eq!(host_and_port("::1"), ("::1", None));
    }
}
