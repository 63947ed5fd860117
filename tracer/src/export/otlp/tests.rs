//! The exporter thread against in-process receivers: request grouping, partial success,
//! retries once the backend is back, queue bounds, shutdown with a dead backend.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::atomic::AtomicU64,
    time::{Duration, Instant},
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value,
};
use tokio::{net::TcpListener, sync::mpsc as tokio_mpsc};

use super::{
    counters::RateLimit,
    dispatch::Outcome,
    endpoint::http_traces_url,
    transport::{Signal, Transport},
    *,
};
use crate::{
    export::tests::{resource, span},
    span::model::ProcessResource,
};

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
    let url = |p, c, env: &dyn Fn(&str) -> Option<String>| Target::resolve(p, c, env).url;
    assert_eq!(
        url(OtlpProtocol::HttpProtobuf, Some("http://h:4318"), &none),
        "http://h:4318/v1/traces"
    );
    assert_eq!(
        url(OtlpProtocol::Grpc, Some("http://h:4317"), &none),
        "http://h:4317"
    );
    // Nothing configured: the spec's defaults.
    assert_eq!(
        url(OtlpProtocol::Grpc, Some("  "), &none),
        "http://localhost:4317"
    );
    assert_eq!(
        url(OtlpProtocol::HttpProtobuf, None, &none),
        "http://localhost:4318/v1/traces"
    );

    let env = |name: &str| match name {
        OTEL_EXPORTER_OTLP_ENDPOINT => Some("http://generic:4318".to_string()),
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT => Some("http://traces:4318/x".to_string()),
        _ => None,
    };
    // The configured value is the generic variable and the signal one is set: the signal's,
    // verbatim.
    assert_eq!(
        url(
            OtlpProtocol::HttpProtobuf,
            Some("http://generic:4318"),
            &env
        ),
        "http://traces:4318/x"
    );
    assert_eq!(
        url(OtlpProtocol::HttpProtobuf, None, &env),
        "http://traces:4318/x"
    );
    // An endpoint given on the command line wins over both.
    assert_eq!(
        url(OtlpProtocol::HttpProtobuf, Some("http://cli:4318"), &env),
        "http://cli:4318/v1/traces"
    );
    // The generic variable alone is a base URL.
    let generic = |name: &str| {
        (name == OTEL_EXPORTER_OTLP_ENDPOINT).then(|| "http://generic:4318/".to_string())
    };
    assert_eq!(
        url(OtlpProtocol::HttpProtobuf, None, &generic),
        "http://generic:4318/v1/traces"
    );
    assert_eq!(
        url(OtlpProtocol::Grpc, None, &generic),
        "http://generic:4318/"
    );
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

fn limits() -> Limits {
    Limits {
        max_queue: 2048,
        max_batch: 512,
        schedule_delay: Duration::from_millis(100),
        max_resources: MAX_RESOURCES,
        idle_timeout: RESOURCE_IDLE_TIMEOUT,
    }
}

fn get(shared: &Shared, counter: impl Fn(&Shared) -> &AtomicU64) -> u64 {
    counter(shared).load(Ordering::Relaxed)
}

#[test]
fn full_queue_drops_and_counts() {
    let shared = Shared::new();
    let mut b = Batcher::new(
        Limits {
            max_queue: 16,
            ..limits()
        },
        vec![],
    );
    let a = resource("a", 1);
    let now = Instant::now();
    for n in 0..200u8 {
        b.admit(span(n, &a), now, &shared);
    }
    // Exports work: the new spans beyond the queue are the ones dropped.
    assert_eq!(b.pending(), 16);
    assert_eq!(get(&shared, |s| &s.queued), 16);
    assert_eq!(get(&shared, |s| &s.queue_full), 184);
    assert_eq!(get(&shared, |s| &s.dropped), 184);

    // An export fails: its spans are held, and while exports fail the oldest make room.
    let batch = b.next_batch().expect("a batch");
    assert_eq!(batch.spans, 16);
    b.failed(&batch);
    b.attempted(false, now);
    assert_eq!(b.held(&a), 16);
    for n in 200..210u8 {
        b.admit(span(n, &a), now, &shared);
    }
    assert_eq!(b.pending(), 16);
    assert_eq!(b.held(&a), 6);
    assert_eq!(get(&shared, |s| &s.queued), 26);
    assert_eq!(get(&shared, |s| &s.failed_spans), 10);
    assert_eq!(
        get(&shared, |s| &s.queue_full),
        184,
        "not a full queue drop"
    );
    assert_eq!(get(&shared, |s| &s.dropped), 194);
    // The held spans are retried after the backoff, not at once.
    let due = b.next_export(now).expect("spans queued");
    assert!(
        due >= now + Duration::from_millis(100),
        "{due:?} vs {now:?}"
    );
}

#[test]
fn export_is_due_on_a_full_batch_or_after_the_delay() {
    let shared = Shared::new();
    let mut b = Batcher::new(
        Limits {
            max_batch: 4,
            ..limits()
        },
        vec![],
    );
    let now = Instant::now();
    assert_eq!(b.next_export(now), None, "idle: no wake-up");
    let a = resource("a", 1);
    b.admit(span(1, &a), now, &shared);
    assert_eq!(b.next_export(now), Some(now + Duration::from_millis(100)));
    for n in 2..=5 {
        b.admit(span(n, &a), now, &shared);
    }
    assert_eq!(b.next_export(now), Some(now), "a full batch");
    let batch = b.next_batch().expect("batch");
    assert_eq!(batch.spans, 4, "at most max_batch");
    b.sent(&batch);
    assert_eq!(b.pending(), 1);
}

#[test]
fn lru_eviction_and_idle_retirement() {
    let shared = Shared::new();
    let mut b = Batcher::new(
        Limits {
            max_resources: 2,
            idle_timeout: Duration::from_millis(300),
            ..limits()
        },
        vec![],
    );
    let (a, bb, c) = (resource("a", 1), resource("b", 2), resource("c", 3));
    let t0 = Instant::now();
    b.admit(span(1, &a), t0, &shared);
    b.admit(span(2, &bb), t0 + Duration::from_millis(5), &shared);
    let batch = b.next_batch().expect("batch");
    b.sent(&batch);
    // Both empty now; a is the least recently used.
    b.admit(span(3, &c), t0 + Duration::from_millis(10), &shared);
    assert_eq!(b.resources(), 2);
    assert!(!b.has(&a) && b.has(&bb) && b.has(&c));
    assert_eq!(get(&shared, |s| &s.dropped), 0, "an empty one was retired");
    // Every resource has spans: the least recently used goes with its spans, counted.
    b.admit(span(4, &a), t0 + Duration::from_millis(15), &shared);
    assert!(!b.has(&bb));
    b.admit(span(5, &bb), t0 + Duration::from_millis(20), &shared);
    assert!(!b.has(&c));
    assert_eq!(get(&shared, |s| &s.failed_spans), 1, "c's span");
    // Idle ones with nothing queued are retired; ones with spans stay.
    let batch = b.next_batch().expect("batch");
    b.sent(&batch);
    b.admit(span(6, &a), t0 + Duration::from_millis(400), &shared);
    b.sweep(t0 + Duration::from_millis(500));
    assert!(b.has(&a), "has a span");
    assert!(!b.has(&bb), "idle since 20 ms");
}

/// Records whole requests (with their `authorization` metadata); answers with `reject`
/// spans rejected when nonzero.
struct Recorder {
    tx: tokio_mpsc::UnboundedSender<(Option<String>, ExportTraceServiceRequest)>,
    reject: i64,
}

#[tonic::async_trait]
impl TraceService for Recorder {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let auth = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let _ = self.tx.send((auth, request.into_inner()));
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: (self.reject > 0).then(|| ExportTracePartialSuccess {
                rejected_spans: self.reject,
                error_message: "too old".into(),
            }),
        }))
    }
}

async fn start_recorder(
    listener: TcpListener,
    reject: i64,
) -> tokio_mpsc::UnboundedReceiver<(Option<String>, ExportTraceServiceRequest)> {
    let (tx, rx) = tokio_mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Recorder { tx, reject }))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    rx
}

/// An exporter thread's state over gRPC to `addr`, outside its thread.
fn dispatcher(
    addr: SocketAddr,
    limits: Limits,
    in_channel: Arc<AtomicUsize>,
) -> (Dispatcher, Arc<Shared>) {
    let transport = Transport::new(
        OtlpProtocol::Grpc,
        &format!("http://{addr}"),
        Signal::Traces,
        Duration::from_secs(2),
        &[("authorization".into(), "Bearer g".into())],
        Some(tokio::runtime::Handle::current()),
    )
    .expect("transport");
    let shared = Arc::new(Shared::new());
    let d = Dispatcher::new(
        Batcher::new(
            limits,
            vec![("deployment.environment".into(), "test".into())],
        ),
        transport,
        Arc::clone(&shared),
        in_channel,
        Duration::from_secs(2),
        Duration::from_secs(3600),
    );
    (d, shared)
}

fn attrs(r: &opentelemetry_proto::tonic::resource::v1::Resource) -> HashMap<String, String> {
    r.attributes
        .iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(any_value::Value::StringValue(s)) => s.clone(),
                Some(any_value::Value::IntValue(i)) => i.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), v)
        })
        .collect()
}

async fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    l.local_addr().expect("addr")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_carries_every_resource() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut rx = start_recorder(listener, 1).await;
    let (mut d, shared) = dispatcher(addr, limits(), Arc::new(AtomicUsize::new(0)));
    let (api, worker) = (resource("api", 100), resource("worker", 200));
    let d = tokio::task::spawn_blocking(move || {
        let now = Instant::now();
        for (n, r) in [(1, &api), (2, &worker), (3, &api)] {
            d.batcher.admit(span(n, r), now, &shared);
        }
        assert_eq!(
            d.export_once(Instant::now() + Duration::from_secs(5)),
            Outcome::Delivered
        );
        assert_eq!(
            d.export_once(Instant::now() + Duration::from_secs(5)),
            Outcome::Idle
        );
        (d, shared)
    })
    .await
    .expect("join");
    let (_d, shared) = d;
    let (auth, req) = rx.recv().await.expect("one request");
    assert_eq!(
        auth.as_deref(),
        Some("Bearer g"),
        "headers go out as gRPC metadata"
    );
    assert_eq!(req.resource_spans.len(), 2, "{req:?}");
    let mut by_service = HashMap::new();
    for rs in &req.resource_spans {
        let a = attrs(rs.resource.as_ref().expect("resource"));
        assert_eq!(a["deployment.environment"], "test");
        assert_eq!(a["host.name"], "test-host");
        assert_eq!(rs.scope_spans.len(), 1);
        let ss = &rs.scope_spans[0];
        let scope = ss.scope.as_ref().expect("scope");
        assert_eq!(scope.name, "difytrace");
        assert_eq!(scope.version, env!("CARGO_PKG_VERSION"));
        let ids: Vec<u8> = ss.spans.iter().map(|s| s.span_id[0]).collect();
        by_service.insert(a["service.name"].clone(), (a["process.pid"].clone(), ids));
    }
    assert_eq!(by_service["api"], ("100".to_string(), vec![1, 3]));
    assert_eq!(by_service["worker"], ("200".to_string(), vec![2]));
    // The receiver rejected one of the three: dropped, not sent.
    assert_eq!(get(&shared, |s| &s.sent), 2);
    assert_eq!(get(&shared, |s| &s.dropped), 1);
    assert_eq!(get(&shared, |s| &s.failed_spans), 1);
}

/// Spans of exports that failed while the backend was down reach it once it is back, with
/// no new span to carry them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_spans_are_sent_without_new_traffic() {
    let addr = free_addr().await;
    let in_channel = Arc::new(AtomicUsize::new(0));
    let (d, shared) = dispatcher(addr, limits(), Arc::clone(&in_channel));
    let (tx, rx) = mpsc::sync_channel(16);
    let thread = std::thread::spawn(move || d.run(&rx));
    let a = resource("a", 1);
    in_channel.fetch_add(3, Ordering::AcqRel);
    tx.send(Msg::Spans((1..=3).map(|n| span(n, &a)).collect()))
        .expect("send");
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(&shared, |s| &s.failed_exports) == 0 {
        assert!(Instant::now() < deadline, "the export never failed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get(&shared, |s| &s.dropped), 0, "held, not dropped");
    // The backend comes back; no new span is made.
    let listener = TcpListener::bind(addr).await.expect("rebind");
    let mut rx = start_recorder(listener, 0).await;
    let (_, req) = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("held spans never delivered")
        .expect("request");
    let ids: Vec<u8> = req.resource_spans[0].scope_spans[0]
        .spans
        .iter()
        .map(|s| s.span_id[0])
        .collect();
    assert_eq!(ids, vec![1, 2, 3]);
    while get(&shared, |s| &s.sent) < 3 {
        assert!(Instant::now() < deadline, "delivered spans never counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get(&shared, |s| &s.dropped), 0);
    assert_eq!(in_channel.load(Ordering::Relaxed), 0);
    let (done_tx, done_rx) = mpsc::sync_channel(1);
    tx.send(Msg::Shutdown {
        deadline: Instant::now() + Duration::from_secs(2),
        done: done_tx,
    })
    .expect("shutdown");
    tokio::task::spawn_blocking(move || {
        done_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("flushed");
        thread.join().expect("thread");
    })
    .await
    .expect("join");
    assert_eq!(get(&shared, |s| &s.resources), 0);
}

/// A backend that accepts connections and never answers (the worst case: every send waits
/// for its timeout).
fn black_hole() -> (std::net::TcpListener, SocketAddr) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    (l, addr)
}

async fn shutdown_with_dead_backend(protocol: OtlpProtocol) {
    let (_hole, addr) = black_hole();
    let sink = OtlpSink::new(protocol, Some(&format!("http://{addr}"))).expect("sink");
    let a = resource("a", 1);
    sink.export((0..5).map(|n| span(n, &a)).collect());
    // Past the schedule delay: a send is under way and hangs.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sink.export((5..10).map(|n| span(n, &a)).collect());
    let start = Instant::now();
    tokio::task::block_in_place(|| sink.shutdown(start + Duration::from_secs(1)));
    let took = start.elapsed();
    assert!(
        took < Duration::from_millis(1500),
        "{protocol:?}: shutdown took {took:?}"
    );
    let c = sink.counters();
    assert_eq!(c.sent, 0);
    // Spans offered after shutdown are counted.
    sink.export(vec![span(11, &a)]);
    assert!(sink.counters().dropped > c.dropped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_shutdown_with_a_dead_backend_returns_by_the_deadline() {
    shutdown_with_dead_backend(OtlpProtocol::Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_shutdown_with_a_dead_backend_returns_by_the_deadline() {
    shutdown_with_dead_backend(OtlpProtocol::HttpProtobuf).await;
}

/// Nothing listens: every span is dropped and counted by the time shutdown returns, the
/// channel's bound included.
#[test]
fn refused_backend_counts_every_span() {
    let sink = OtlpSink::new(OtlpProtocol::HttpProtobuf, Some("http://127.0.0.1:1")).expect("sink");
    let a = resource("a", 1);
    let many = DISPATCH_QUEUE + 1000;
    sink.export((0..many).map(|n| span(n as u8, &a)).collect());
    let c = sink.counters();
    assert!(c.queue_full >= 1000, "{c:?}");
    sink.shutdown(Instant::now() + Duration::from_secs(5));
    let c = sink.counters();
    assert_eq!(c.sent, 0);
    assert_eq!(c.dropped as usize, many, "{c:?}");
    assert_eq!(c.queued, c.failed_spans, "queued then not delivered: {c:?}");
    assert_eq!(c.resources, 0);
}

#[test]
fn resource_key_is_the_process() {
    // Two Arcs of equal processes share one queue.
    let shared = Shared::new();
    let mut b = Batcher::new(limits(), vec![]);
    let now = Instant::now();
    b.admit(span(1, &resource("a", 1)), now, &shared);
    b.admit(span(2, &resource("a", 1)), now, &shared);
    assert_eq!(b.resources(), 1);
    let other: Arc<ProcessResource> = resource("a", 2);
    b.admit(span(3, &other), now, &shared);
    assert_eq!(b.resources(), 2);
}

/// Answers one HTTP request per entry of `statuses` and hands back each request's head.
fn http_once(statuses: &'static [u16]) -> (SocketAddr, std::thread::JoinHandle<Vec<String>>) {
    use std::io::{Read as _, Write as _};
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let handle = std::thread::spawn(move || {
        let mut heads = Vec::new();
        for status in statuses {
            let (mut conn, _) = l.accept().expect("accept");
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let head_end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                let n = conn.read(&mut chunk).expect("read");
                assert!(n > 0, "connection closed mid-request");
                buf.extend_from_slice(&chunk[..n]);
            };
            let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < head_end + len {
                let n = conn.read(&mut chunk).expect("read body");
                assert!(n > 0, "connection closed mid-body");
                buf.extend_from_slice(&chunk[..n]);
            }
            heads.push(head);
            let reply =
                format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            conn.write_all(reply.as_bytes()).expect("write");
        }
        heads
    });
    (addr, handle)
}

#[test]
fn http_transport_sends_headers_and_classifies_failures() {
    let (addr, server) = http_once(&[200, 400, 503]);
    let headers = settings::key_values("authorization=Bearer%20t0k,x-tenant=a");
    let mut t = Transport::new(
        OtlpProtocol::HttpProtobuf,
        &format!("http://{addr}/v1/traces"),
        Signal::Traces,
        Duration::from_secs(5),
        &headers,
        None,
    )
    .expect("transport");
    let timeout = Duration::from_secs(5);
    assert!(t.send(vec![1, 2, 3], timeout).is_ok());
    let refused = t.send(vec![1], timeout).expect_err("400");
    assert!(!refused.retryable, "{refused}");
    let busy = t.send(vec![1], timeout).expect_err("503");
    assert!(busy.retryable, "{busy}");
    let heads = server.join().expect("server");
    assert!(heads[0].starts_with("post /v1/traces "), "{}", heads[0]);
    assert!(
        heads[0].contains("authorization: bearer t0k\r\n"),
        "{}",
        heads[0]
    );
    assert!(heads[0].contains("x-tenant: a\r\n"), "{}", heads[0]);
    assert!(heads[0].contains("content-type: application/x-protobuf\r\n"));
    // Nothing listens any more: a connection error, worth a retry.
    let gone = t.send(vec![1], timeout).expect_err("refused");
    assert!(gone.retryable, "{gone}");
}

#[test]
fn bad_endpoints_are_refused_at_start() {
    for (protocol, url) in [
        (OtlpProtocol::HttpProtobuf, "not a url"),
        (OtlpProtocol::HttpProtobuf, "ftp://h/x"),
    ] {
        let err = Transport::new(
            protocol,
            url,
            Signal::Traces,
            Duration::from_secs(1),
            &[],
            None,
        )
        .expect_err(url);
        assert!(err.to_string().contains("bad OTLP endpoint"), "{err}");
    }
}
