//! End-to-end checks of the OTLP path against tiny in-process receivers: a tonic gRPC
//! TraceService and a bare-bones HTTP/1.1 server decoding the protobuf body.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value,
    trace::v1::span::SpanKind as ProtoKind,
};
use prost::Message as _;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};

use super::*;
use crate::span::model::{AttrValue, ProcessResource, SpanKind, SpanStatus};

/// One received span with the resource it came under.
#[derive(Debug, Clone)]
pub(super) struct Got {
    pub(super) resource: HashMap<String, String>,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
    name: String,
    kind: i32,
    attributes: HashMap<String, String>,
}

fn any_text(v: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(f)) => f.to_string(),
        other => format!("{other:?}"),
    }
}

fn flatten(req: ExportTraceServiceRequest) -> Vec<Got> {
    let mut out = Vec::new();
    for rs in req.resource_spans {
        let resource: HashMap<String, String> = rs
            .resource
            .map(|r| r.attributes)
            .unwrap_or_default()
            .into_iter()
            .map(|kv| (kv.key, any_text(kv.value.as_ref())))
            .collect();
        for ss in rs.scope_spans {
            for s in ss.spans {
                out.push(Got {
                    resource: resource.clone(),
                    trace_id: s.trace_id,
                    span_id: s.span_id,
                    parent_span_id: s.parent_span_id,
                    name: s.name,
                    kind: s.kind,
                    attributes: s
                        .attributes
                        .into_iter()
                        .map(|kv| (kv.key, any_text(kv.value.as_ref())))
                        .collect(),
                });
            }
        }
    }
    out
}

struct GrpcReceiver(mpsc::UnboundedSender<Got>);

#[tonic::async_trait]
impl TraceService for GrpcReceiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for got in flatten(request.into_inner()) {
            let _ = self.0.send(got);
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

pub(super) async fn start_grpc(listener: TcpListener) -> mpsc::UnboundedReceiver<Got> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(GrpcReceiver(tx)))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    rx
}

/// What the HTTP receiver saw besides the spans.
#[derive(Debug, Clone)]
struct HttpMeta {
    path: String,
    content_type: String,
}

async fn start_http(
    listener: TcpListener,
) -> (
    mpsc::UnboundedReceiver<Got>,
    mpsc::UnboundedReceiver<HttpMeta>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (meta_tx, meta_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            tokio::spawn(serve_http(conn, tx.clone(), meta_tx.clone()));
        }
    });
    (rx, meta_rx)
}

/// Serves keep-alive HTTP/1.1 POSTs with a Content-Length body; enough for reqwest.
async fn serve_http(
    mut conn: TcpStream,
    tx: mpsc::UnboundedSender<Got>,
    meta_tx: mpsc::UnboundedSender<HttpMeta>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let mut lines = head.split("\r\n");
        let path = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .unwrap_or_default()
            .to_string();
        let mut len = 0usize;
        let mut content_type = String::new();
        for l in lines {
            if let Some((k, v)) = l.split_once(':') {
                match k.trim().to_ascii_lowercase().as_str() {
                    "content-length" => len = v.trim().parse().unwrap_or(0),
                    "content-type" => content_type = v.trim().to_string(),
                    _ => {}
                }
            }
        }
        while buf.len() < head_end + len {
            let mut chunk = [0u8; 65536];
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let body: Vec<u8> = buf.drain(..head_end + len).skip(head_end).collect();
        let _ = meta_tx.send(HttpMeta { path, content_type });
        if let Ok(req) = ExportTraceServiceRequest::decode(body.as_slice()) {
            for got in flatten(req) {
                let _ = tx.send(got);
            }
        }
        conn.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n",
        )
        .await?;
    }
}

pub(super) fn resource(service: &str, pid: u32) -> Arc<ProcessResource> {
    Arc::new(ProcessResource {
        service_name: service.into(),
        pid,
        executable_name: format!("{service}-bin"),
        host_name: "test-host".into(),
        container: None,
    })
}

pub(super) fn span(n: u8, resource: &Arc<ProcessResource>) -> FinishedSpan {
    let start = SystemTime::now();
    FinishedSpan {
        trace_id: [n; 16],
        span_id: [n; 8],
        parent_span_id: Some([n.wrapping_add(100); 8]),
        parent_is_remote: false,
        kind: SpanKind::Server,
        name: format!("GET /span/{n}"),
        start,
        end: start + Duration::from_millis(3),
        attributes: vec![
            ("http.request.method".into(), AttrValue::Str("GET".into())),
            ("url.path".into(), AttrValue::Str(format!("/span/{n}"))),
            ("http.response.status_code".into(), AttrValue::Int(200)),
        ],
        links: Vec::new(),
        status: SpanStatus::Unset,
        resource: Arc::clone(resource),
    }
}

/// Collects received spans until `want` span ids are all seen or `timeout` passes.
pub(super) async fn wait_for(
    rx: &mut mpsc::UnboundedReceiver<Got>,
    want: &[u8],
    timeout: Duration,
) -> HashMap<u8, Got> {
    let mut seen = HashMap::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while want.iter().any(|n| !seen.contains_key(n)) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(got)) => {
                if let Some(&n) = got.span_id.first() {
                    seen.insert(n, got);
                }
            }
            _ => break,
        }
    }
    seen
}

/// Shows the exporter's own warnings in the output of failing tests.
fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("tracer=debug")
        .with_test_writer()
        .try_init();
}

fn exporter(protocol: OtlpProtocol, addr: SocketAddr) -> Exporter {
    init_logs();
    Exporter::new(ExportConfig {
        otlp_endpoint: Some(format!("http://{addr}")),
        protocol,
        console: false,
    })
    .expect("exporter")
}

fn check_span(got: &Got, n: u8, res: &ProcessResource) {
    assert_eq!(got.trace_id, vec![n; 16]);
    assert_eq!(got.span_id, vec![n; 8]);
    assert_eq!(got.parent_span_id, vec![n.wrapping_add(100); 8]);
    assert_eq!(got.name, format!("GET /span/{n}"));
    assert_eq!(got.kind, ProtoKind::Server as i32);
    assert_eq!(got.attributes["url.path"], format!("/span/{n}"));
    assert_eq!(got.attributes["http.response.status_code"], "200");
    assert_eq!(got.resource["service.name"], res.service_name);
    assert_eq!(got.resource["process.pid"], res.pid.to_string());
    assert_eq!(got.resource["process.executable.name"], res.executable_name);
    assert_eq!(got.resource["host.name"], res.host_name);
}

async fn delivers_with_resources(
    protocol: OtlpProtocol,
) -> Option<mpsc::UnboundedReceiver<HttpMeta>> {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (mut rx, meta) = match protocol {
        OtlpProtocol::Grpc => (start_grpc(listener).await, None),
        OtlpProtocol::HttpProtobuf => {
            let (rx, meta) = start_http(listener).await;
            (rx, Some(meta))
        }
    };
    let exporter = exporter(protocol, addr);
    let api = resource("api", 100);
    let daemon = resource("plugin-daemon", 200);
    exporter.export(span(1, &api));
    exporter.export(span(2, &daemon));
    exporter.export(span(3, &api));

    let seen = wait_for(&mut rx, &[1, 2, 3], Duration::from_secs(10)).await;
    assert_eq!(seen.len(), 3, "received: {seen:?}");
    check_span(&seen[&1], 1, &api);
    check_span(&seen[&2], 2, &daemon);
    check_span(&seen[&3], 3, &api);

    let stats = exporter.stats();
    assert_eq!(stats.spans_queued_otlp, 3);
    assert_eq!(stats.resources, 2);
    assert_eq!(stats.spans_dropped, 0);
    assert_eq!(stats.spans_exported_console, 0);

    // Queued spans go out at shutdown without waiting for the batch timer.
    exporter.export(span(4, &daemon));
    exporter.shutdown();
    let seen = wait_for(&mut rx, &[4], Duration::from_secs(2)).await;
    check_span(&seen[&4], 4, &daemon);
    let stats = exporter.stats();
    assert_eq!(stats.spans_sent_otlp, 4);
    assert_eq!(stats.resources, 0);

    // After shutdown spans are counted, not sent.
    exporter.export(span(5, &daemon));
    assert_eq!(exporter.stats().spans_dropped, 1);
    meta
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_delivers_spans_with_resources() {
    delivers_with_resources(OtlpProtocol::Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_delivers_spans_to_v1_traces() {
    let mut meta = delivers_with_resources(OtlpProtocol::HttpProtobuf)
        .await
        .expect("http meta");
    let first = meta.recv().await.expect("one request");
    assert_eq!(first.path, "/v1/traces");
    assert_eq!(first.content_type, "application/x-protobuf");
}

/// The agent starts before the collector: spans produced once it is up must arrive.
async fn endpoint_comes_up_later(protocol: OtlpProtocol) {
    let addr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        probe.local_addr().expect("addr")
    };
    let exporter = exporter(protocol, addr);
    let res = resource("late", 300);
    exporter.export(span(10, &res));
    // Long enough for the first batch to be tried against the closed port and given up.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let listener = TcpListener::bind(addr).await.expect("rebind the port");
    let mut rx = match protocol {
        OtlpProtocol::Grpc => start_grpc(listener).await,
        OtlpProtocol::HttpProtobuf => start_http(listener).await.0,
    };
    let up = tokio::time::Instant::now();
    exporter.export(span(11, &res));
    exporter.export(span(12, &res));
    let seen = wait_for(&mut rx, &[11, 12], Duration::from_secs(8)).await;
    assert!(
        seen.contains_key(&11) && seen.contains_key(&12),
        "spans exported after the endpoint came up did not arrive: {seen:?}"
    );
    check_span(&seen[&12], 12, &res);
    eprintln!(
        "{protocol:?}: delivered {:?} after the endpoint came up; stats {:?}",
        up.elapsed(),
        exporter.stats()
    );
    exporter.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_endpoint_down_at_start_then_up() {
    endpoint_comes_up_later(OtlpProtocol::Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_endpoint_down_at_start_then_up() {
    endpoint_comes_up_later(OtlpProtocol::HttpProtobuf).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_endpoint_fails_at_start() {
    let err = Exporter::new(ExportConfig {
        otlp_endpoint: Some("not a url".into()),
        protocol: OtlpProtocol::Grpc,
        console: false,
    })
    .expect_err("must fail");
    assert!(format!("{err:#}").contains("OTLP"), "{err:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_only_without_endpoint() {
    if otlp::env_requests_otlp() {
        return;
    }
    let exporter = Exporter::new(ExportConfig {
        otlp_endpoint: None,
        protocol: OtlpProtocol::Grpc,
        console: false,
    })
    .expect("exporter");
    exporter.export(span(42, &resource("console", 7)));
    exporter.shutdown();
    let stats = exporter.stats();
    assert_eq!(stats.spans_exported_console, 1);
    assert_eq!(stats.spans_queued_otlp, 0);
    assert_eq!(stats.resources, 0);
}

#[test]
fn grpc_without_runtime_is_an_error() {
    let err = Exporter::new(ExportConfig {
        otlp_endpoint: Some("http://127.0.0.1:4317".into()),
        protocol: OtlpProtocol::Grpc,
        console: false,
    })
    .expect_err("must fail");
    assert!(format!("{err:#}").contains("tokio runtime"), "{err:#}");
}
