//! An in-test OTLP trace receiver: gRPC `TraceService/Export` and HTTP `POST /v1/traces`
//! (protobuf body, optionally gzip), both on 127.0.0.1. Received spans are flattened into
//! [`ReceivedSpan`]s; tests wait on them with [`OtlpReceiver::wait_for`].
//!
//! It runs on its own tokio runtime so that tests can stay synchronous.
//!
//! It also receives OTLP metrics (gRPC `MetricsService/Export`, HTTP `POST /v1/metrics`),
//! flattened into [`ReceivedPoint`]s.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
use prost::Message as _;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tonic::codec::CompressionEncoding;

// ---------------------------------------------------------------------------------------
// flattened spans

/// An attribute value, typed as received.
#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    Str(String),
    Bool(bool),
    Int(i64),
    Double(f64),
    Bytes(Vec<u8>),
    Array(Vec<AttrValue>),
    Map(BTreeMap<String, AttrValue>),
    Empty,
}

impl AttrValue {
    fn from_any(v: Option<&AnyValue>) -> AttrValue {
        use any_value::Value;
        match v.and_then(|v| v.value.as_ref()) {
            None => AttrValue::Empty,
            Some(Value::StringValue(s)) => AttrValue::Str(s.clone()),
            Some(Value::BoolValue(b)) => AttrValue::Bool(*b),
            Some(Value::IntValue(i)) => AttrValue::Int(*i),
            Some(Value::DoubleValue(d)) => AttrValue::Double(*d),
            Some(Value::BytesValue(b)) => AttrValue::Bytes(b.clone()),
            Some(Value::ArrayValue(a)) => AttrValue::Array(
                a.values
                    .iter()
                    .map(|v| AttrValue::from_any(Some(v)))
                    .collect(),
            ),
            Some(Value::KvlistValue(kv)) => AttrValue::Map(attr_map(&kv.values)),
            // Only meaningful inside profiles (an index into a string table).
            Some(Value::StringValueStrindex(i)) => AttrValue::Str(format!("<strindex {i}>")),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            AttrValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The value if it was sent as an integer.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            AttrValue::Int(i) => Some(*i),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            AttrValue::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            AttrValue::Double(d) => Some(*d),
            AttrValue::Int(i) => Some(*i as f64),
            _ => None,
        }
    }
}

/// String form: strings as they are, numbers in decimal, bytes in hex.
impl fmt::Display for AttrValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttrValue::Str(s) => f.write_str(s),
            AttrValue::Bool(b) => write!(f, "{b}"),
            AttrValue::Int(i) => write!(f, "{i}"),
            AttrValue::Double(d) => write!(f, "{d}"),
            AttrValue::Bytes(b) => f.write_str(&hex(b)),
            AttrValue::Array(a) => {
                f.write_str("[")?;
                for (i, v) in a.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{v}")?;
                }
                f.write_str("]")
            }
            AttrValue::Map(m) => {
                f.write_str("{")?;
                for (i, (k, v)) in m.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{k}: {v}")?;
                }
                f.write_str("}")
            }
            AttrValue::Empty => Ok(()),
        }
    }
}

fn attr_map(kvs: &[KeyValue]) -> BTreeMap<String, AttrValue> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), AttrValue::from_any(kv.value.as_ref())))
        .collect()
}

/// Lowercase hex; all-zero or empty ids become "".
fn id_hex(b: &[u8]) -> String {
    if b.iter().all(|&x| x == 0) {
        String::new()
    } else {
        hex(b)
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// OTLP span kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Unspecified,
    Internal,
    Server,
    Client,
    Producer,
    Consumer,
}

impl Kind {
    fn from_i32(k: i32) -> Kind {
        match k {
            1 => Kind::Internal,
            2 => Kind::Server,
            3 => Kind::Client,
            4 => Kind::Producer,
            5 => Kind::Consumer,
            _ => Kind::Unspecified,
        }
    }
}

/// How a span reached the receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Grpc,
    Http,
}

#[derive(Debug, Clone)]
pub struct ReceivedLink {
    pub trace_id: String,
    pub span_id: String,
    pub attributes: BTreeMap<String, AttrValue>,
}

/// One received span with its resource, flattened.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub transport: Transport,
    pub resource: BTreeMap<String, AttrValue>,
    pub scope_name: String,
    pub name: String,
    pub kind: Kind,
    /// Lowercase hex, 32 digits.
    pub trace_id: String,
    /// Lowercase hex, 16 digits.
    pub span_id: String,
    /// Lowercase hex, or "" for a root span.
    pub parent_span_id: String,
    pub trace_state: String,
    pub start_ns: u64,
    pub end_ns: u64,
    pub attributes: BTreeMap<String, AttrValue>,
    pub links: Vec<ReceivedLink>,
    pub event_names: Vec<String>,
    pub status_code: i32,
    pub status_message: String,
}

impl ReceivedSpan {
    pub fn attr(&self, key: &str) -> Option<&AttrValue> {
        self.attributes.get(key)
    }

    /// String form of a span attribute.
    pub fn attr_str(&self, key: &str) -> Option<String> {
        self.attr(key).map(|v| v.to_string())
    }

    /// A span attribute sent as an integer.
    pub fn attr_int(&self, key: &str) -> Option<i64> {
        self.attr(key).and_then(AttrValue::as_int)
    }

    pub fn res(&self, key: &str) -> Option<&AttrValue> {
        self.resource.get(key)
    }

    /// String form of a resource attribute.
    pub fn res_str(&self, key: &str) -> Option<String> {
        self.res(key).map(|v| v.to_string())
    }

    /// A resource attribute sent as an integer.
    pub fn res_int(&self, key: &str) -> Option<i64> {
        self.res(key).and_then(AttrValue::as_int)
    }

    /// `process.pid` of the resource, whether sent as int or string.
    pub fn pid(&self) -> Option<u32> {
        self.res_str("process.pid").and_then(|s| s.parse().ok())
    }

    pub fn is_server(&self) -> bool {
        self.kind == Kind::Server
    }

    pub fn is_client(&self) -> bool {
        self.kind == Kind::Client
    }

    pub fn duration(&self) -> Duration {
        Duration::from_nanos(self.end_ns.saturating_sub(self.start_ns))
    }

    /// Whether `needle` appears in the name, any attribute (key or value, span, resource,
    /// link), event name or status message.
    pub fn mentions(&self, needle: &str) -> bool {
        let in_map = |m: &BTreeMap<String, AttrValue>| {
            m.iter()
                .any(|(k, v)| k.contains(needle) || v.to_string().contains(needle))
        };
        self.name.contains(needle)
            || self.status_message.contains(needle)
            || self.trace_state.contains(needle)
            || in_map(&self.attributes)
            || in_map(&self.resource)
            || self.links.iter().any(|l| in_map(&l.attributes))
            || self.event_names.iter().any(|e| e.contains(needle))
    }

    /// One line for failure messages.
    pub fn summary(&self) -> String {
        let attrs: Vec<String> = self
            .attributes
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        format!(
            "{:?} {:?} trace={} span={} parent={} pid={} service={} dur={:?} [{}]",
            self.kind,
            self.name,
            self.trace_id,
            self.span_id,
            if self.parent_span_id.is_empty() {
                "-"
            } else {
                &self.parent_span_id
            },
            self.res_str("process.pid").unwrap_or_default(),
            self.res_str("service.name").unwrap_or_default(),
            self.duration(),
            attrs.join(" "),
        )
    }
}

/// Flattens an export request.
pub fn flatten(req: &ExportTraceServiceRequest, transport: Transport) -> Vec<ReceivedSpan> {
    let mut out = Vec::new();
    for rs in &req.resource_spans {
        let resource = rs
            .resource
            .as_ref()
            .map(|r| attr_map(&r.attributes))
            .unwrap_or_default();
        for ss in &rs.scope_spans {
            let scope_name = ss
                .scope
                .as_ref()
                .map(|s| s.name.clone())
                .unwrap_or_default();
            for s in &ss.spans {
                out.push(ReceivedSpan {
                    transport,
                    resource: resource.clone(),
                    scope_name: scope_name.clone(),
                    name: s.name.clone(),
                    kind: Kind::from_i32(s.kind),
                    trace_id: id_hex(&s.trace_id),
                    span_id: id_hex(&s.span_id),
                    parent_span_id: id_hex(&s.parent_span_id),
                    trace_state: s.trace_state.clone(),
                    start_ns: s.start_time_unix_nano,
                    end_ns: s.end_time_unix_nano,
                    attributes: attr_map(&s.attributes),
                    links: s
                        .links
                        .iter()
                        .map(|l| ReceivedLink {
                            trace_id: id_hex(&l.trace_id),
                            span_id: id_hex(&l.span_id),
                            attributes: attr_map(&l.attributes),
                        })
                        .collect(),
                    event_names: s.events.iter().map(|e| e.name.clone()).collect(),
                    status_code: s.status.as_ref().map(|st| st.code).unwrap_or(0),
                    status_message: s
                        .status
                        .as_ref()
                        .map(|st| st.message.clone())
                        .unwrap_or_default(),
                });
            }
        }
    }
    out
}

/// The spans whose `url.path` starts with `prefix`.
pub fn paths_with(spans: &[ReceivedSpan], prefix: &str) -> Vec<ReceivedSpan> {
    spans
        .iter()
        .filter(|s| {
            s.attr_str("url.path")
                .is_some_and(|p| p.starts_with(prefix))
        })
        .cloned()
        .collect()
}

/// Fails naming the first resource attribute of `span` that is not as `want`s it.
pub fn ensure_resource(span: &ReceivedSpan, want: &[(&str, &str)]) -> anyhow::Result<()> {
    for (key, value) in want {
        anyhow::ensure!(
            span.res_str(key).as_deref() == Some(*value),
            "{key} of {}: {:?}, want {value}",
            span.summary(),
            span.res_str(key)
        );
    }
    Ok(())
}

/// One line per span, at most the last `max`.
pub fn summarize(spans: &[ReceivedSpan], max: usize) -> String {
    let skip = spans.len().saturating_sub(max);
    let mut s = String::new();
    if skip > 0 {
        s.push_str(&format!("  ... {skip} earlier spans not shown\n"));
    }
    for span in &spans[skip..] {
        s.push_str("  ");
        s.push_str(&span.summary());
        s.push('\n');
    }
    s
}

// ---------------------------------------------------------------------------------------
// shared store

#[derive(Default)]
struct Store {
    spans: Mutex<Vec<ReceivedSpan>>,
    changed: Condvar,
    errors: Mutex<Vec<String>>,
    grpc_requests: AtomicUsize,
    http_requests: AtomicUsize,
    points: Mutex<Vec<ReceivedPoint>>,
    metric_requests: AtomicUsize,
}

impl Store {
    fn add(&self, req: &ExportTraceServiceRequest, transport: Transport) {
        let spans = flatten(req, transport);
        match transport {
            Transport::Grpc => self.grpc_requests.fetch_add(1, Ordering::SeqCst),
            Transport::Http => self.http_requests.fetch_add(1, Ordering::SeqCst),
        };
        self.spans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(spans);
        self.changed.notify_all();
    }

    fn add_metrics(&self, req: &ExportMetricsServiceRequest, transport: Transport) {
        self.metric_requests.fetch_add(1, Ordering::SeqCst);
        self.points
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(flatten_metrics(req, transport));
        self.changed.notify_all();
    }

    fn error(&self, e: String) {
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(e);
        self.changed.notify_all();
    }
}

// ---------------------------------------------------------------------------------------
// gRPC

struct GrpcCollector {
    store: Arc<Store>,
}

#[tonic::async_trait]
impl TraceService for GrpcCollector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.store.add(request.get_ref(), Transport::Grpc);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

struct GrpcMetricsCollector {
    store: Arc<Store>,
}

#[tonic::async_trait]
impl MetricsService for GrpcMetricsCollector {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.store.add_metrics(request.get_ref(), Transport::Grpc);
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

// ---------------------------------------------------------------------------------------
// metrics

/// Path of the OTLP/HTTP metrics endpoint.
pub const HTTP_METRICS_PATH: &str = "/v1/metrics";

/// What kind of data point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointKind {
    Sum,
    Gauge,
    Histogram,
}

/// One received data point, with its resource's service name and its metric.
#[derive(Debug, Clone)]
pub struct ReceivedPoint {
    pub service: String,
    pub metric: String,
    pub unit: String,
    pub kind: PointKind,
    pub attrs: BTreeMap<String, AttrValue>,
    /// Sum or gauge value; a histogram's count.
    pub value: f64,
    /// A histogram's sum.
    pub sum: f64,
    pub bucket_counts: Vec<u64>,
    pub time_unix_nano: u64,
    pub transport: Transport,
}

impl ReceivedPoint {
    pub fn attr_str(&self, key: &str) -> Option<String> {
        self.attrs.get(key).map(|v| v.to_string())
    }
}

/// Flattens an export request into data points.
pub fn flatten_metrics(
    req: &ExportMetricsServiceRequest,
    transport: Transport,
) -> Vec<ReceivedPoint> {
    let mut out = Vec::new();
    for rm in &req.resource_metrics {
        let resource = rm
            .resource
            .as_ref()
            .map(|r| attr_map(&r.attributes))
            .unwrap_or_default();
        let service = resource
            .get("service.name")
            .map(|v| v.to_string())
            .unwrap_or_default();
        for sm in &rm.scope_metrics {
            for m in &sm.metrics {
                let point =
                    |kind, attrs: &[KeyValue], value, sum, buckets: Vec<u64>, time| ReceivedPoint {
                        service: service.clone(),
                        metric: m.name.clone(),
                        unit: m.unit.clone(),
                        kind,
                        attrs: attr_map(attrs),
                        value,
                        sum,
                        bucket_counts: buckets,
                        time_unix_nano: time,
                        transport,
                    };
                let number = |v: &Option<number_data_point::Value>| match v {
                    Some(number_data_point::Value::AsDouble(d)) => *d,
                    Some(number_data_point::Value::AsInt(i)) => *i as f64,
                    None => f64::NAN,
                };
                match &m.data {
                    Some(metric::Data::Sum(d)) => out.extend(d.data_points.iter().map(|p| {
                        point(
                            PointKind::Sum,
                            &p.attributes,
                            number(&p.value),
                            0.0,
                            Vec::new(),
                            p.time_unix_nano,
                        )
                    })),
                    Some(metric::Data::Gauge(d)) => out.extend(d.data_points.iter().map(|p| {
                        point(
                            PointKind::Gauge,
                            &p.attributes,
                            number(&p.value),
                            0.0,
                            Vec::new(),
                            p.time_unix_nano,
                        )
                    })),
                    Some(metric::Data::Histogram(d)) => out.extend(d.data_points.iter().map(|p| {
                        point(
                            PointKind::Histogram,
                            &p.attributes,
                            p.count as f64,
                            p.sum.unwrap_or(0.0),
                            p.bucket_counts.clone(),
                            p.time_unix_nano,
                        )
                    })),
                    _ => {}
                }
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// HTTP

/// Path of the OTLP/HTTP traces endpoint.
pub const HTTP_TRACES_PATH: &str = "/v1/traces";

struct HttpRequest {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl HttpRequest {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

async fn read_http_line<R: AsyncBufReadExt + Unpin>(r: &mut R) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    if r.read_until(b'\n', &mut buf).await? == 0 {
        return Ok(None);
    }
    while buf.last().is_some_and(|&b| b == b'\n' || b == b'\r') {
        buf.pop();
    }
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

fn bad(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

async fn read_http_request<R: AsyncBufReadExt + Unpin>(
    r: &mut R,
) -> std::io::Result<Option<HttpRequest>> {
    let line = loop {
        match read_http_line(r).await? {
            None => return Ok(None),
            Some(l) if l.is_empty() => continue,
            Some(l) => break l,
        }
    };
    let mut parts = line.split(' ');
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let mut headers = Vec::new();
    loop {
        let l = read_http_line(r)
            .await?
            .ok_or_else(|| bad("eof in headers"))?;
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let mut req = HttpRequest {
        method,
        path,
        headers,
        body: Vec::new(),
    };
    let chunked = req
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        loop {
            let l = read_http_line(r)
                .await?
                .ok_or_else(|| bad("eof in chunk size"))?;
            let size = usize::from_str_radix(l.split(';').next().unwrap_or_default().trim(), 16)
                .map_err(|_| bad(format!("bad chunk size {l:?}")))?;
            if size == 0 {
                while let Some(t) = read_http_line(r).await? {
                    if t.is_empty() {
                        break;
                    }
                }
                break;
            }
            let start = req.body.len();
            req.body.resize(start + size, 0);
            r.read_exact(&mut req.body[start..]).await?;
            read_http_line(r).await?;
        }
    } else if let Some(len) = req.header("content-length") {
        let len: usize = len.parse().map_err(|_| bad("bad content-length"))?;
        if len > 256 << 20 {
            return Err(bad("body too large"));
        }
        req.body.resize(len, 0);
        r.read_exact(&mut req.body).await?;
    }
    Ok(Some(req))
}

/// Handles one OTLP/HTTP request: (status, content type, body).
fn handle_http(req: &HttpRequest, store: &Store) -> (u16, &'static str, Vec<u8>) {
    let path = req.path.split('?').next().unwrap_or_default();
    if req.method != "POST" || (path != HTTP_TRACES_PATH && path != HTTP_METRICS_PATH) {
        store.error(format!(
            "http: unexpected {} {} (only POST {HTTP_TRACES_PATH} and {HTTP_METRICS_PATH} are served)",
            req.method, req.path
        ));
        return (404, "text/plain", b"not found".to_vec());
    }
    let ctype = req
        .header("content-type")
        .unwrap_or_default()
        .to_ascii_lowercase();
    if !ctype.contains("protobuf") {
        store.error(format!(
            "http: content-type {ctype:?} not supported (expected application/x-protobuf)"
        ));
        return (415, "text/plain", b"only application/x-protobuf".to_vec());
    }
    let body = match req
        .header("content-encoding")
        .map(|s| s.to_ascii_lowercase())
        .as_deref()
    {
        None | Some("") | Some("identity") => req.body.clone(),
        Some("gzip") => {
            let mut out = Vec::new();
            if let Err(e) = flate2::read::GzDecoder::new(&req.body[..]).read_to_end(&mut out) {
                store.error(format!("http: bad gzip body: {e}"));
                return (400, "text/plain", b"bad gzip".to_vec());
            }
            out
        }
        Some(other) => {
            store.error(format!("http: content-encoding {other:?} not supported"));
            return (415, "text/plain", b"unsupported encoding".to_vec());
        }
    };
    if path == HTTP_METRICS_PATH {
        return match ExportMetricsServiceRequest::decode(&body[..]) {
            Ok(export) => {
                store.add_metrics(&export, Transport::Http);
                let resp = ExportMetricsServiceResponse {
                    partial_success: None,
                };
                (200, "application/x-protobuf", resp.encode_to_vec())
            }
            Err(e) => {
                store.error(format!(
                    "http: body is not an ExportMetricsServiceRequest: {e}"
                ));
                (400, "text/plain", b"bad protobuf".to_vec())
            }
        };
    }
    match ExportTraceServiceRequest::decode(&body[..]) {
        Ok(export) => {
            store.add(&export, Transport::Http);
            let resp = ExportTraceServiceResponse {
                partial_success: None,
            };
            (200, "application/x-protobuf", resp.encode_to_vec())
        }
        Err(e) => {
            store.error(format!(
                "http: body is not an ExportTraceServiceRequest: {e}"
            ));
            (400, "text/plain", b"bad protobuf".to_vec())
        }
    }
}

async fn serve_http_conn(stream: tokio::net::TcpStream, store: Arc<Store>) -> std::io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    while let Some(req) = read_http_request(&mut rd).await? {
        let (status, ctype, body) = handle_http(&req, &store);
        let close = req
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let reason = match status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            _ => "Unsupported Media Type",
        };
        let head = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{}\r\n",
            body.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        wr.write_all(head.as_bytes()).await?;
        wr.write_all(&body).await?;
        wr.flush().await?;
        if close {
            break;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// the receiver

/// A running receiver. Dropping it stops both servers.
pub struct OtlpReceiver {
    rt: Option<tokio::runtime::Runtime>,
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    store: Arc<Store>,
}

impl OtlpReceiver {
    /// Both servers on 127.0.0.1 with ports chosen by the kernel.
    pub fn start() -> Result<OtlpReceiver> {
        let any = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        Self::start_on(any, any)
    }

    /// Both servers on the given addresses (port 0 = any).
    pub fn start_on(grpc: SocketAddr, http: SocketAddr) -> Result<OtlpReceiver> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("otlp-receiver")
            .enable_all()
            .build()
            .context("building the receiver's tokio runtime")?;
        let store = Arc::new(Store::default());

        let grpc_std =
            std::net::TcpListener::bind(grpc).with_context(|| format!("binding gRPC on {grpc}"))?;
        let http_std =
            std::net::TcpListener::bind(http).with_context(|| format!("binding HTTP on {http}"))?;
        grpc_std.set_nonblocking(true)?;
        http_std.set_nonblocking(true)?;
        let grpc_addr = grpc_std.local_addr()?;
        let http_addr = http_std.local_addr()?;

        let _guard = rt.enter();
        let grpc_l = tokio::net::TcpListener::from_std(grpc_std)?;
        let http_l = tokio::net::TcpListener::from_std(http_std)?;

        let svc = TraceServiceServer::new(GrpcCollector {
            store: store.clone(),
        })
        .accept_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(64 << 20);
        let metrics_svc = MetricsServiceServer::new(GrpcMetricsCollector {
            store: store.clone(),
        })
        .accept_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(64 << 20);
        let grpc_store = store.clone();
        rt.spawn(async move {
            let incoming = tonic::transport::server::TcpIncoming::from(grpc_l);
            if let Err(e) = tonic::transport::Server::builder()
                .add_service(svc)
                .add_service(metrics_svc)
                .serve_with_incoming(incoming)
                .await
            {
                grpc_store.error(format!("grpc server: {e}"));
            }
        });

        let http_store = store.clone();
        rt.spawn(async move {
            loop {
                match http_l.accept().await {
                    Ok((stream, _)) => {
                        let st = http_store.clone();
                        tokio::spawn(async move {
                            if let Err(e) = serve_http_conn(stream, st.clone()).await
                                && e.kind() != std::io::ErrorKind::UnexpectedEof
                                && e.kind() != std::io::ErrorKind::ConnectionReset
                            {
                                st.error(format!("http connection: {e}"));
                            }
                        });
                    }
                    Err(e) => {
                        http_store.error(format!("http accept: {e}"));
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        drop(_guard);

        Ok(OtlpReceiver {
            rt: Some(rt),
            grpc_addr,
            http_addr,
            store,
        })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// `http://127.0.0.1:<grpc port>`, for `--otlp-endpoint` with `--otlp-protocol grpc`.
    pub fn grpc_endpoint(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    /// `http://127.0.0.1:<http port>` (base URL; the exporter posts to `/v1/traces`).
    pub fn http_endpoint(&self) -> String {
        format!("http://{}", self.http_addr)
    }

    /// All spans received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.store
            .spans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Forgets the spans received so far.
    pub fn clear(&self) {
        self.store
            .spans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Problems seen by the servers (bad paths, bodies, ...).
    pub fn errors(&self) -> Vec<String> {
        self.store
            .errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Export requests received over (gRPC, HTTP).
    pub fn export_requests(&self) -> (usize, usize) {
        (
            self.store.grpc_requests.load(Ordering::SeqCst),
            self.store.http_requests.load(Ordering::SeqCst),
        )
    }

    /// Every metric data point received so far (each export adds a cumulative snapshot).
    pub fn metric_points(&self) -> Vec<ReceivedPoint> {
        self.store
            .points
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Metrics export requests received (gRPC and HTTP).
    pub fn metric_requests(&self) -> usize {
        self.store.metric_requests.load(Ordering::SeqCst)
    }

    /// The points of the latest export that had any point matching `pred` (cumulative
    /// values: the latest export holds the totals).
    pub fn latest_points(&self, pred: impl Fn(&ReceivedPoint) -> bool) -> Vec<ReceivedPoint> {
        let points = self.metric_points();
        let Some(latest) = points
            .iter()
            .filter(|p| pred(p))
            .map(|p| p.time_unix_nano)
            .max()
        else {
            return Vec::new();
        };
        points
            .into_iter()
            .filter(|p| p.time_unix_nano == latest && pred(p))
            .collect()
    }

    /// Waits until `pred` holds for the metric points received so far; returns them.
    pub fn wait_for_points(
        &self,
        mut pred: impl FnMut(&[ReceivedPoint]) -> bool,
        timeout: Duration,
    ) -> Result<Vec<ReceivedPoint>> {
        let deadline = Instant::now() + timeout;
        loop {
            let points = self.metric_points();
            if pred(&points) {
                return Ok(points);
            }
            if Instant::now() >= deadline {
                bail!(
                    "timed out after {timeout:?} waiting for metric points; {} points in {} requests; errors: {:?}",
                    points.len(),
                    self.metric_requests(),
                    self.errors()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until `pred` holds for the spans received so far; returns them.
    /// On timeout the error lists what was received.
    pub fn wait_for(
        &self,
        mut pred: impl FnMut(&[ReceivedSpan]) -> bool,
        timeout: Duration,
    ) -> Result<Vec<ReceivedSpan>> {
        let deadline = Instant::now() + timeout;
        let mut spans = self.store.spans.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if pred(&spans) {
                return Ok(spans.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                let (g, h) = self.export_requests();
                let errors = self.errors();
                bail!(
                    "timed out after {timeout:?} waiting for spans; received {} spans in {g} gRPC + {h} HTTP export requests:\n{}{}",
                    spans.len(),
                    summarize(&spans, 80),
                    if errors.is_empty() {
                        String::new()
                    } else {
                        format!("receiver errors:\n  {}\n", errors.join("\n  "))
                    }
                );
            }
            let wait = (deadline - now).min(Duration::from_millis(250));
            spans = self
                .store
                .changed
                .wait_timeout(spans, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Waits for one span matching `pred` and returns it (the first such).
    pub fn wait_for_span(
        &self,
        pred: impl Fn(&ReceivedSpan) -> bool,
        timeout: Duration,
    ) -> Result<ReceivedSpan> {
        let spans = self.wait_for(|s| s.iter().any(&pred), timeout)?;
        Ok(spans.into_iter().find(|s| pred(s)).expect("matched above"))
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    use opentelemetry_proto::tonic::common::v1::AnyValue;
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, span};
    use std::io::Write as _;

    fn kv(k: &str, v: any_value::Value) -> KeyValue {
        KeyValue {
            key: k.to_string(),
            value: Some(AnyValue { value: Some(v) }),
            ..Default::default()
        }
    }

    fn sample(name: &str) -> ExportTraceServiceRequest {
        use any_value::Value;
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![
                        kv("service.name", Value::StringValue("app".into())),
                        kv("process.pid", Value::IntValue(4242)),
                    ],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans: vec![Span {
                        trace_id: (1..=16).collect(),
                        span_id: vec![0xab; 8],
                        parent_span_id: vec![0; 8],
                        name: name.to_string(),
                        kind: span::SpanKind::Server as i32,
                        start_time_unix_nano: 1_000,
                        end_time_unix_nano: 5_000,
                        attributes: vec![
                            kv("http.request.method", Value::StringValue("GET".into())),
                            kv("http.response.status_code", Value::IntValue(200)),
                        ],
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    fn check(s: &ReceivedSpan, name: &str, transport: Transport) {
        assert_eq!(s.name, name);
        assert_eq!(s.transport, transport);
        assert_eq!(s.kind, Kind::Server);
        assert_eq!(s.trace_id, "0102030405060708090a0b0c0d0e0f10");
        assert_eq!(s.span_id, "abababababababab");
        assert_eq!(s.parent_span_id, "");
        assert_eq!(s.duration(), Duration::from_nanos(4_000));
        assert_eq!(s.attr_int("http.response.status_code"), Some(200));
        assert_eq!(s.attr_str("http.request.method").as_deref(), Some("GET"));
        assert_eq!(s.res_str("service.name").as_deref(), Some("app"));
        assert_eq!(s.pid(), Some(4242));
        assert!(s.mentions("4242"));
        assert!(!s.mentions("secret"));
    }

    #[test]
    fn receives_over_grpc() {
        let rx = OtlpReceiver::start().unwrap();
        let endpoint = rx.grpc_endpoint();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut client = TraceServiceClient::connect(endpoint).await.unwrap();
            client.export(sample("GET /grpc")).await.unwrap();
            // gzip-compressed export too
            let mut client = client.send_compressed(CompressionEncoding::Gzip);
            client.export(sample("GET /grpc-gz")).await.unwrap();
        });
        let spans = rx
            .wait_for(|s| s.len() == 2, Duration::from_secs(10))
            .unwrap();
        check(&spans[0], "GET /grpc", Transport::Grpc);
        check(&spans[1], "GET /grpc-gz", Transport::Grpc);
        assert_eq!(rx.export_requests(), (2, 0));
        assert!(rx.errors().is_empty(), "{:?}", rx.errors());
    }

    #[test]
    fn receives_over_http() {
        let rx = OtlpReceiver::start().unwrap();
        let body = sample("GET /http").encode_to_vec();
        let mut conn = crate::procs::HttpConn::connect(rx.http_addr()).unwrap();
        let ct = ("Content-Type", "application/x-protobuf");
        let r = conn.request("POST", "/v1/traces", &[ct], &body).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("application/x-protobuf"));
        // keep-alive: a gzip body on the same connection
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&sample("GET /http-gz").encode_to_vec())
            .unwrap();
        let gz = gz.finish().unwrap();
        let r = conn
            .request(
                "POST",
                "/v1/traces",
                &[ct, ("Content-Encoding", "gzip")],
                &gz,
            )
            .unwrap();
        assert_eq!(r.status, 200);
        // wrong path and garbage are refused and reported
        let r = conn.request("POST", "/", &[ct], &body).unwrap();
        assert_eq!(r.status, 404);
        let r = conn
            .request("POST", "/v1/traces", &[ct], b"\xff\xff\xff")
            .unwrap();
        assert_eq!(r.status, 400);
        let spans = rx
            .wait_for(|s| s.len() == 2, Duration::from_secs(10))
            .unwrap();
        check(&spans[0], "GET /http", Transport::Http);
        check(&spans[1], "GET /http-gz", Transport::Http);
        assert_eq!(rx.export_requests(), (0, 2));
        assert_eq!(rx.errors().len(), 2, "{:?}", rx.errors());
    }

    #[test]
    fn wait_for_times_out_with_a_summary() {
        let rx = OtlpReceiver::start().unwrap();
        let err = rx
            .wait_for(|s| !s.is_empty(), Duration::from_millis(300))
            .unwrap_err();
        assert!(err.to_string().contains("received 0 spans"), "{err}");
    }

    #[test]
    fn binds_a_given_port() {
        let port = crate::procs::free_port();
        let rx = OtlpReceiver::start_on(
            crate::procs::local(port),
            SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        )
        .unwrap();
        assert_eq!(rx.grpc_addr().port(), port);
        assert_ne!(rx.http_addr().port(), 0);
    }
}
