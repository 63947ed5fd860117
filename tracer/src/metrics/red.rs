//! RED metrics (rate, errors, duration) from finished SERVER and CLIENT spans, named after the
//! OTel semantic conventions: `http.{server,client}.request.duration`,
//! `rpc.{server,client}.duration`, `dify.plugin.invocation.duration` for plugin stdio
//! sessions, and `gen_ai.client.token.usage`. Request rate is a histogram's count, errors are
//! the series with `error.type`. Only low-cardinality attributes become series attributes:
//! never a URL path, a header value or body content.

use std::{sync::Arc, time::SystemTime};

use super::store::{DURATION_BOUNDS, Family, Kind, LabelValue, SeriesKey, TOKEN_BOUNDS};
use crate::span::model::{AttrValue, FinishedSpan, SpanKind};

/// Methods kept as they are; anything else is `_OTHER` (semconv), so garbage requests cannot
/// create series.
const KNOWN_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];
/// Longest attribute value kept in a series (longer values are cut).
const MAX_VALUE_LEN: usize = 128;
/// Optional Dify / GenAI attributes copied onto HTTP and plugin series when the span has them.
const DIFY_KEYS: [&str; 5] = [
    "dify.plugin.id",
    "dify.dispatch.kind",
    "dify.dispatch.action",
    "gen_ai.request.model",
    "gen_ai.provider.name",
];

/// The RED families.
#[derive(Debug, Clone)]
pub struct RedMetrics {
    pub http_server: Family,
    pub http_client: Family,
    pub rpc_server: Family,
    pub rpc_client: Family,
    pub plugin: Family,
    pub tokens: Family,
}

impl RedMetrics {
    pub fn new(max_series: usize, start: SystemTime) -> Self {
        let hist = |name, description| {
            Family::new(
                name,
                description,
                "s",
                Kind::Histogram(DURATION_BOUNDS),
                max_series,
                start,
            )
        };
        Self {
            http_server: hist(
                "http.server.request.duration",
                "Duration of HTTP server requests.",
            ),
            http_client: hist(
                "http.client.request.duration",
                "Duration of HTTP client requests.",
            ),
            rpc_server: hist("rpc.server.duration", "Duration of gRPC server calls."),
            rpc_client: hist("rpc.client.duration", "Duration of gRPC client calls."),
            plugin: hist(
                "dify.plugin.invocation.duration",
                "Duration of Dify plugin invocations over stdio.",
            ),
            tokens: Family::new(
                "gen_ai.client.token.usage",
                "Tokens used by LLM calls, as reported in their responses.",
                "{token}",
                Kind::Histogram(TOKEN_BOUNDS),
                max_series,
                start,
            ),
        }
    }

    pub fn families(&self) -> [&Family; 6] {
        [
            &self.http_server,
            &self.http_client,
            &self.rpc_server,
            &self.rpc_client,
            &self.plugin,
            &self.tokens,
        ]
    }

    /// Records one finished span (INTERNAL spans are not requests and are skipped).
    pub fn record(&mut self, span: &FinishedSpan) {
        if span.kind == SpanKind::Internal {
            return;
        }
        let service: Arc<str> = Arc::from(span.resource.service_name.as_str());
        let seconds = duration_seconds(span);
        let client = span.kind == SpanKind::Client;
        if span.attr("rpc.system").is_some() {
            let mut attrs = Vec::with_capacity(5);
            for key in [
                "rpc.system",
                "rpc.service",
                "rpc.method",
                "rpc.grpc.status_code",
            ] {
                push(&mut attrs, span, key);
            }
            push(&mut attrs, span, "error.type");
            let family = if client {
                &mut self.rpc_client
            } else {
                &mut self.rpc_server
            };
            family.record(
                SeriesKey {
                    service: service.clone(),
                    attrs,
                },
                seconds,
            );
        } else if let Some(AttrValue::Str(method)) = span.attr("http.request.method") {
            let method = if KNOWN_METHODS.contains(&method.as_str()) {
                method.clone()
            } else {
                "_OTHER".to_string()
            };
            let mut attrs = vec![("http.request.method", LabelValue::Str(method))];
            // Only a route a framework declared; the raw path would be one series per URL.
            push(&mut attrs, span, "http.route");
            push(&mut attrs, span, "http.response.status_code");
            push(&mut attrs, span, "error.type");
            if client {
                push(&mut attrs, span, "server.address");
                push(&mut attrs, span, "server.port");
            }
            for key in DIFY_KEYS {
                push(&mut attrs, span, key);
            }
            let family = if client {
                &mut self.http_client
            } else {
                &mut self.http_server
            };
            family.record(
                SeriesKey {
                    service: service.clone(),
                    attrs,
                },
                seconds,
            );
        } else if span.attr("dify.plugin.action").is_some() {
            let side = if client { "client" } else { "server" };
            let mut attrs = vec![("span.kind", LabelValue::Str(side.into()))];
            for key in [
                "dify.plugin.action",
                "dify.plugin.type",
                "dify.plugin.provider",
            ] {
                push(&mut attrs, span, key);
            }
            for key in DIFY_KEYS {
                push(&mut attrs, span, key);
            }
            push(&mut attrs, span, "error.type");
            self.plugin.record(
                SeriesKey {
                    service: service.clone(),
                    attrs,
                },
                seconds,
            );
        }
        // Tokens are counted by the side that made the call, as the semconv asks, so a
        // sum over services does not count one call twice.
        if client {
            for (key, token_type) in [
                ("gen_ai.usage.input_tokens", "input"),
                ("gen_ai.usage.output_tokens", "output"),
            ] {
                let Some(AttrValue::Int(n)) = span.attr(key) else {
                    continue;
                };
                let mut attrs = vec![("gen_ai.token.type", LabelValue::Str(token_type.into()))];
                push(&mut attrs, span, "gen_ai.request.model");
                push(&mut attrs, span, "gen_ai.provider.name");
                push(&mut attrs, span, "dify.plugin.id");
                self.tokens.record(
                    SeriesKey {
                        service: service.clone(),
                        attrs,
                    },
                    *n as f64,
                );
            }
        }
    }
}

/// The span's duration in seconds (0 when the clock went backwards).
pub fn duration_seconds(span: &FinishedSpan) -> f64 {
    span.end
        .duration_since(span.start)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Appends the span's attribute `key`, when present, as a series attribute.
fn push(attrs: &mut Vec<(&'static str, LabelValue)>, span: &FinishedSpan, key: &'static str) {
    let value = match span.attr(key) {
        Some(AttrValue::Str(s)) if !s.is_empty() => {
            LabelValue::Str(s.chars().take(MAX_VALUE_LEN).collect())
        }
        Some(AttrValue::Int(i)) => LabelValue::Int(*i),
        Some(AttrValue::Bool(b)) => LabelValue::Bool(*b),
        _ => return,
    };
    attrs.push((key, value));
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        metrics::store::Value,
        span::model::{ProcessResource, SpanStatus},
    };

    pub(crate) fn span(
        service: &str,
        kind: SpanKind,
        ms: u64,
        attrs: &[(&str, AttrValue)],
    ) -> FinishedSpan {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        FinishedSpan {
            trace_id: [1; 16],
            span_id: rand::random(),
            parent_span_id: None,
            parent_is_remote: false,
            kind,
            name: "x".into(),
            start,
            end: start + Duration::from_millis(ms),
            attributes: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            links: Vec::new(),
            status: SpanStatus::Unset,
            resource: Arc::new(ProcessResource {
                service_name: service.into(),
                pid: 1,
                executable_name: "x".into(),
                host_name: "h".into(),
                container: None,
            }),
        }
    }

    fn s(v: &str) -> AttrValue {
        AttrValue::Str(v.into())
    }

    fn count(f: &Family, pred: impl Fn(&SeriesKey) -> bool) -> u64 {
        f.series
            .iter()
            .filter(|(k, _)| pred(k))
            .map(|(_, v)| match v {
                Value::Histogram(h) => h.count,
                Value::Counter(c) => *c as u64,
            })
            .sum()
    }

    fn has(k: &SeriesKey, key: &str, v: LabelValue) -> bool {
        k.attrs.iter().any(|(a, b)| *a == key && *b == v)
    }

    #[test]
    fn http_server_spans_by_route_and_status_never_by_path() {
        let mut red = RedMetrics::new(100, SystemTime::UNIX_EPOCH);
        for i in 0..5 {
            let code = if i < 2 { 500 } else { 200 };
            let mut attrs = vec![
                ("http.request.method", s("GET")),
                ("url.path", s(&format!("/items/{i}"))),
                ("http.route", s("/items/:id")),
                ("http.response.status_code", AttrValue::Int(code)),
                ("http.request.header.authorization", s("secret")),
            ];
            if code == 500 {
                attrs.push(("error.type", s("500")));
            }
            red.record(&span("api", SpanKind::Server, 20, &attrs));
        }
        let f = &red.http_server;
        assert_eq!(f.series.len(), 2);
        assert_eq!(
            count(f, |k| has(k, "error.type", LabelValue::Str("500".into()))),
            2
        );
        assert_eq!(
            count(f, |k| has(
                k,
                "http.response.status_code",
                LabelValue::Int(200)
            )),
            3
        );
        for key in f.series.keys() {
            assert_eq!(&*key.service, "api");
            assert!(
                key.attrs
                    .iter()
                    .all(|(a, _)| *a != "url.path" && !a.contains("header"))
            );
        }
    }

    #[test]
    fn unknown_methods_are_other_and_grpc_goes_to_rpc() {
        let mut red = RedMetrics::new(100, SystemTime::UNIX_EPOCH);
        red.record(&span(
            "a",
            SpanKind::Client,
            1,
            &[("http.request.method", s("FOO\u{1}"))],
        ));
        red.record(&span(
            "a",
            SpanKind::Server,
            1,
            &[
                ("rpc.system", s("grpc")),
                ("rpc.service", s("echo.Echo")),
                ("rpc.method", s("Say")),
                ("rpc.grpc.status_code", AttrValue::Int(5)),
                ("error.type", s("5")),
                ("http.request.method", s("POST")),
            ],
        ));
        assert!(red.http_client.series.keys().all(|k| has(
            k,
            "http.request.method",
            LabelValue::Str("_OTHER".into())
        )));
        assert_eq!(
            count(&red.rpc_server, |k| has(
                k,
                "rpc.grpc.status_code",
                LabelValue::Int(5)
            )),
            1
        );
        assert!(red.http_server.series.is_empty());
    }

    #[test]
    fn tokens_from_client_spans_with_usage() {
        let mut red = RedMetrics::new(100, SystemTime::UNIX_EPOCH);
        let attrs = [
            ("http.request.method", s("POST")),
            ("gen_ai.request.model", s("gpt-x")),
            ("gen_ai.usage.input_tokens", AttrValue::Int(12)),
            ("gen_ai.usage.output_tokens", AttrValue::Int(30)),
        ];
        red.record(&span("api", SpanKind::Client, 5, &attrs));
        red.record(&span("daemon", SpanKind::Server, 5, &attrs));
        assert_eq!(red.tokens.series.len(), 2);
        let sum: f64 = red
            .tokens
            .series
            .values()
            .map(|v| match v {
                Value::Histogram(h) => h.sum,
                Value::Counter(c) => *c,
            })
            .sum();
        assert_eq!(sum, 42.0);
        assert!(red.http_client.series.keys().all(|k| has(
            k,
            "gen_ai.request.model",
            LabelValue::Str("gpt-x".into())
        )));
    }
}
