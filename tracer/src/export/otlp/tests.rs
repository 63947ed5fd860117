use std::time::UNIX_EPOCH;

use opentelemetry::{
    Key, KeyValue, Value,
    trace::{SpanId, SpanKind as OtelSpanKind, Status},
};

use super::{
    counters::RateLimit, dispatch::shutdown_all, endpoint::http_traces_url, pipeline::Entry, *,
};
use crate::span::model::{AttrValue, ProcessResource, SpanKind, SpanLink, SpanStatus};

fn sample() -> FinishedSpan {
    let start = UNIX_EPOCH + Duration::from_nanos(1_795_628_401_123_456_789);
    FinishedSpan {
        trace_id: *b"0123456789abcdef",
        span_id: *b"spanid01",
        parent_span_id: Some(*b"parent01"),
        parent_is_remote: true,
        kind: SpanKind::Client,
        name: "POST /v1/sandbox/run".into(),
        start,
        end: start + Duration::from_micros(12_345),
        attributes: vec![
            ("http.request.method".into(), AttrValue::Str("POST".into())),
            ("http.response.status_code".into(), AttrValue::Int(200)),
            ("dify.streamed".into(), AttrValue::Bool(true)),
            ("gen_ai.temperature".into(), AttrValue::F64(0.5)),
        ],
        links: vec![SpanLink {
            trace_id: [7; 16],
            span_id: [8; 8],
            attributes: vec![("link.reason".into(), AttrValue::Str("traceparent".into()))],
        }],
        status: SpanStatus::Error("boom".into()),
        resource: Arc::new(ProcessResource {
            service_name: "sandbox".into(),
            pid: 42,
            executable_name: "sandbox".into(),
            host_name: "node-1".into(),
            container: None,
        }),
    }
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attrs
        .iter()
        .find(|kv| kv.key == Key::from(key.to_string()))
        .map(|kv| &kv.value)
}

#[test]
fn span_data_conversion() {
    let span = sample();
    let (start, end) = (span.start, span.end);
    let data = to_span_data(span, &scope());
    assert_eq!(
        data.span_context.trace_id().to_bytes(),
        *b"0123456789abcdef"
    );
    assert_eq!(data.span_context.span_id().to_bytes(), *b"spanid01");
    assert!(data.span_context.is_sampled());
    assert!(!data.span_context.is_remote());
    assert_eq!(data.parent_span_id.to_bytes(), *b"parent01");
    assert!(data.parent_span_is_remote);
    assert_eq!(data.span_kind, OtelSpanKind::Client);
    assert_eq!(data.name, "POST /v1/sandbox/run");
    assert_eq!(data.start_time, start);
    assert_eq!(data.end_time, end);
    assert_eq!(
        attr(&data.attributes, "http.request.method"),
        Some(&Value::from("POST"))
    );
    assert_eq!(
        attr(&data.attributes, "http.response.status_code"),
        Some(&Value::I64(200))
    );
    assert_eq!(
        attr(&data.attributes, "dify.streamed"),
        Some(&Value::Bool(true))
    );
    assert_eq!(
        attr(&data.attributes, "gen_ai.temperature"),
        Some(&Value::F64(0.5))
    );
    assert_eq!(data.links.len(), 1);
    assert_eq!(data.links[0].span_context.trace_id().to_bytes(), [7; 16]);
    assert_eq!(data.links[0].span_context.span_id().to_bytes(), [8; 8]);
    assert_eq!(
        attr(&data.links[0].attributes, "link.reason"),
        Some(&Value::from("traceparent"))
    );
    assert_eq!(
        data.status,
        Status::Error {
            description: "boom".into()
        }
    );
    assert_eq!(data.instrumentation_scope.name(), "difytrace");
}

#[test]
fn root_span_has_invalid_parent() {
    let mut span = sample();
    span.parent_span_id = None;
    span.kind = SpanKind::Server;
    span.status = SpanStatus::Unset;
    let data = to_span_data(span, &scope());
    assert_eq!(data.parent_span_id, SpanId::INVALID);
    assert!(!data.parent_span_is_remote);
    assert_eq!(data.span_kind, OtelSpanKind::Server);
    assert_eq!(data.status, Status::Unset);
}

#[test]
fn resource_attributes() {
    let r = otel_resource(&sample().resource);
    assert_eq!(
        r.get(&Key::from_static_str("service.name")),
        Some(Value::from("sandbox"))
    );
    assert_eq!(
        r.get(&Key::from_static_str("process.pid")),
        Some(Value::I64(42))
    );
    assert_eq!(
        r.get(&Key::from_static_str("process.executable.name")),
        Some(Value::from("sandbox"))
    );
    assert_eq!(
        r.get(&Key::from_static_str("host.name")),
        Some(Value::from("node-1"))
    );
    let nameless = otel_resource(&ProcessResource {
        service_name: String::new(),
        pid: 1,
        executable_name: "gunicorn".into(),
        host_name: String::new(),
        container: None,
    });
    assert_eq!(
        nameless.get(&Key::from_static_str("service.name")),
        Some(Value::from("unknown_service:gunicorn"))
    );
    assert_eq!(nameless.get(&Key::from_static_str("host.name")), None);
}

#[test]
fn http_endpoint_gets_the_traces_path() {
    assert_eq!(http_traces_url("http://h:4318"), "http://h:4318/v1/traces");
    assert_eq!(http_traces_url("http://h:4318/"), "http://h:4318/v1/traces");
    assert_eq!(
        http_traces_url("http://h:4318/v1/traces"),
        "http://h:4318/v1/traces"
    );
    assert_eq!(
        http_traces_url("https://gw/otlp"),
        "https://gw/otlp/v1/traces"
    );
}

#[test]
fn endpoint_precedence() {
    let none = |_: &str| None;
    let t = Target::resolve(OtlpProtocol::HttpProtobuf, Some("http://h:4318"), none);
    assert_eq!(t.endpoint.as_deref(), Some("http://h:4318/v1/traces"));
    let t = Target::resolve(OtlpProtocol::Grpc, Some("http://h:4317"), none);
    assert_eq!(t.endpoint.as_deref(), Some("http://h:4317"));
    let t = Target::resolve(OtlpProtocol::Grpc, Some("  "), none);
    assert_eq!(t.endpoint, None);

    // The configured value is the generic variable and the signal one is set: crate's turn.
    let env = |name: &str| match name {
        OTEL_EXPORTER_OTLP_ENDPOINT => Some("http://generic:4318".to_string()),
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT => Some("http://traces:4318/x".to_string()),
        _ => None,
    };
    let t = Target::resolve(OtlpProtocol::HttpProtobuf, Some("http://generic:4318"), env);
    assert_eq!(t.endpoint, None);
    // An endpoint given on the command line wins over both.
    let t = Target::resolve(OtlpProtocol::HttpProtobuf, Some("http://cli:4318"), env);
    assert_eq!(t.endpoint.as_deref(), Some("http://cli:4318/v1/traces"));
}

/// Pipelines exporting over gRPC to `addr`, `queue_size` spans queued per resource.
fn grpc_factory(addr: std::net::SocketAddr, queue_size: usize) -> Factory {
    Factory {
        target: Target {
            protocol: OtlpProtocol::Grpc,
            endpoint: Some(format!("http://{addr}")),
        },
        queue_size,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lru_eviction_idle_retirement_and_queue_bound() {
    use crate::export::tests::{resource, span, start_grpc, wait_for};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut rx = start_grpc(listener).await;
    let factory = grpc_factory(addr, 16);
    let shared = Arc::new(Shared::new());
    let mut d = Dispatcher::new(
        factory,
        Arc::clone(&shared),
        Limits {
            max_resources: 2,
            idle_timeout: Duration::from_millis(300),
            sweep_interval: Duration::from_secs(3600),
        },
    );
    let (a, b, c) = (resource("a", 1), resource("b", 2), resource("c", 3));
    d.handle(span(1, &a));
    tokio::time::sleep(Duration::from_millis(5)).await;
    d.handle(span(2, &b));
    d.handle(span(3, &c));
    assert_eq!(d.entries.len(), 2);
    assert!(
        !d.entries.contains_key(&*a),
        "the least recently used goes first"
    );
    assert_eq!(shared.resources.load(Ordering::Relaxed), 2);
    // The retired pipeline was flushed, not thrown away.
    let seen = wait_for(&mut rx, &[1], Duration::from_secs(5)).await;
    assert_eq!(seen[&1].resource["service.name"], "a");

    tokio::time::sleep(Duration::from_millis(400)).await;
    d.sweep(Instant::now());
    assert!(d.entries.is_empty());
    assert_eq!(shared.resources.load(Ordering::Relaxed), 0);
    let seen = wait_for(&mut rx, &[2, 3], Duration::from_secs(5)).await;
    assert_eq!(seen.len(), 2);

    // A burst beyond the per-resource queue: every span is either queued or counted.
    let dropped_before = shared.dropped.load(Ordering::Relaxed);
    let queued_before = shared.queued.load(Ordering::Relaxed);
    for n in 0..200u8 {
        d.handle(span(n, &a));
    }
    let queued = shared.queued.load(Ordering::Relaxed) - queued_before;
    let dropped = shared.dropped.load(Ordering::Relaxed) - dropped_before;
    assert_eq!(queued + dropped, 200);
    assert!(queued >= 16, "queued {queued}");
    let entries: Vec<Entry> = d.entries.drain().map(|(_, e)| e).collect();
    tokio::task::block_in_place(|| {
        shutdown_all(entries, Instant::now() + Duration::from_secs(5));
    });
}

#[test]
fn rate_limit_lets_one_through_per_interval() {
    let limit = RateLimit::new(Duration::from_secs(3600));
    assert_eq!(limit.check(), Some(0));
    assert_eq!(limit.check(), None);
    assert_eq!(limit.check(), None);
    let limit = RateLimit::new(Duration::ZERO);
    assert_eq!(limit.check(), Some(0));
    assert_eq!(limit.check(), Some(0));
}

/// Spans of exports that failed while the backend was down reach it once it is back, even
/// when the resource makes no new span to carry them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_spans_are_sent_without_new_traffic() {
    use crate::export::tests::{resource, span, start_grpc, wait_for};

    // A port nobody listens on yet.
    let addr = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        l.local_addr().expect("addr")
    };
    let factory = grpc_factory(addr, 16);
    let shared = Arc::new(Shared::new());
    let mut d = Dispatcher::new(factory, Arc::clone(&shared), Limits::DEFAULT);
    let a = resource("a", 1);
    let deadline = Instant::now() + Duration::from_secs(60);
    // The first failing batch is lost (a healthy pipeline does not copy its batches)...
    d.handle(span(1, &a));
    while !shared.is_failing() {
        assert!(Instant::now() < deadline, "the export never failed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ... the next ones are kept.
    d.handle(span(2, &a));
    d.handle(span(3, &a));
    while d.entries[&*a].retry.len() < 2 {
        assert!(Instant::now() < deadline, "spans 2 and 3 never held");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The backend comes back; no new span is made.
    let listener = tokio::net::TcpListener::bind(addr).await.expect("rebind");
    let mut rx = start_grpc(listener).await;
    let seen = loop {
        d.requeue_held();
        let seen = wait_for(&mut rx, &[2, 3], Duration::from_secs(3)).await;
        if seen.len() == 2 {
            break seen;
        }
        assert!(Instant::now() < deadline, "held spans never delivered");
    };
    assert_eq!(seen[&2].resource["service.name"], "a");
    // Counted once the export call returns, a moment after the receiver has them.
    while shared.sent.load(Ordering::Relaxed) < 2 {
        assert!(
            Instant::now() < deadline,
            "delivered spans never counted as sent"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(shared.sent.load(Ordering::Relaxed), 2);
    assert_eq!(d.entries[&*a].retry.len(), 0);
    let entries: Vec<Entry> = d.entries.drain().map(|(_, e)| e).collect();
    tokio::task::block_in_place(|| {
        shutdown_all(entries, Instant::now() + Duration::from_secs(5));
    });
}
