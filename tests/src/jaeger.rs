//! A real Jaeger (in-memory storage) on loopback ports, and its HTTP query API.
//!
//! Two flavours of the binary are handled, told apart by `--help`:
//! - Jaeger v2 (`cmd/jaeger`, an OpenTelemetry collector build): started with a generated
//!   YAML config that enables only the OTLP receiver and the query extension, every
//!   listener on 127.0.0.1, internal metrics off.
//! - Jaeger v1 all-in-one (`cmd/all-in-one`): every `--*host-port` flag it lists is set to
//!   a free 127.0.0.1 port.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::TempDir;
use crate::procs::{Proc, free_port, http_get, local, wait_port_of};

/// The Jaeger binary: `DIFYTRACE_JAEGER`, else `$HOME/go/bin/jaeger`, else `jaeger` on `PATH`.
pub fn jaeger_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("DIFYTRACE_JAEGER").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    if let Some(home) = std::env::var_os("HOME") {
        let p = PathBuf::from(home).join("go/bin/jaeger");
        if p.is_file() {
            return Some(p);
        }
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join("jaeger"))
        .find(|p| p.is_file())
}

/// The Jaeger binary, or skip/fail like [`crate::e2e`] when there is none.
pub fn require_jaeger(test: &str) -> Option<PathBuf> {
    match jaeger_bin() {
        Some(p) if p.is_file() => Some(p),
        other => crate::prerequisite_missing(
            test,
            &[format!(
                "the Jaeger binary ({}; set DIFYTRACE_JAEGER or install it into $HOME/go/bin/jaeger)",
                other
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "not found".into())
            )],
        ),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    V1AllInOne,
    V2,
}

/// A running Jaeger.
pub struct Jaeger {
    proc: Proc,
    flavour: Flavour,
    otlp_grpc: u16,
    otlp_http: u16,
    query_http: u16,
    _dir: TempDir,
}

/// One span as the query API returns it.
#[derive(Debug, Clone)]
pub struct JaegerSpan {
    /// 32 lowercase hex digits.
    pub trace_id: String,
    pub span_id: String,
    pub operation: String,
    /// (refType, traceID, spanID)
    pub references: Vec<(String, String, String)>,
    pub start_us: u64,
    pub duration_us: u64,
    pub tags: BTreeMap<String, String>,
    pub service: String,
    pub process_tags: BTreeMap<String, String>,
}

impl JaegerSpan {
    /// The span id of the CHILD_OF reference, "" for none.
    pub fn parent(&self) -> &str {
        self.references
            .iter()
            .find(|(t, _, _)| t == "CHILD_OF")
            .map(|(_, _, s)| s.as_str())
            .unwrap_or("")
    }

    /// `span.kind` tag (`server`, `client`, ...).
    pub fn kind(&self) -> &str {
        self.tags.get("span.kind").map(String::as_str).unwrap_or("")
    }

    pub fn tag(&self, k: &str) -> Option<&str> {
        self.tags.get(k).map(String::as_str)
    }

    pub fn summary(&self) -> String {
        format!(
            "{} {:?} service={} trace={} span={} parent={} tags={:?}",
            self.kind(),
            self.operation,
            self.service,
            self.trace_id,
            self.span_id,
            self.parent(),
            self.tags
        )
    }
}

#[derive(Debug, Clone)]
pub struct JaegerTrace {
    pub trace_id: String,
    pub spans: Vec<JaegerSpan>,
}

impl JaegerTrace {
    pub fn summary(&self) -> String {
        let mut s = format!("trace {}:\n", self.trace_id);
        for sp in &self.spans {
            s.push_str("    ");
            s.push_str(&sp.summary());
            s.push('\n');
        }
        s
    }
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn pad_id(id: &str, len: usize) -> String {
    let id = id.to_ascii_lowercase();
    if id.len() >= len {
        id
    } else {
        format!("{}{id}", "0".repeat(len - id.len()))
    }
}

fn tag_map(v: &Value) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for t in v.as_array().into_iter().flatten() {
        let k = t["key"].as_str().unwrap_or_default().to_string();
        let val = match &t["value"] {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        m.insert(k, val);
    }
    m
}

/// Parses the body of `GET /api/traces`.
pub fn parse_traces(body: &Value) -> Vec<JaegerTrace> {
    let mut out = Vec::new();
    for t in body["data"].as_array().into_iter().flatten() {
        let procs = &t["processes"];
        let spans = t["spans"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                let p = &procs[s["processID"].as_str().unwrap_or_default()];
                JaegerSpan {
                    trace_id: pad_id(s["traceID"].as_str().unwrap_or_default(), 32),
                    span_id: pad_id(s["spanID"].as_str().unwrap_or_default(), 16),
                    operation: s["operationName"].as_str().unwrap_or_default().to_string(),
                    references: s["references"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|r| {
                            (
                                r["refType"].as_str().unwrap_or_default().to_string(),
                                pad_id(r["traceID"].as_str().unwrap_or_default(), 32),
                                pad_id(r["spanID"].as_str().unwrap_or_default(), 16),
                            )
                        })
                        .collect(),
                    start_us: s["startTime"].as_u64().unwrap_or(0),
                    duration_us: s["duration"].as_u64().unwrap_or(0),
                    tags: tag_map(&s["tags"]),
                    service: p["serviceName"].as_str().unwrap_or_default().to_string(),
                    process_tags: tag_map(&p["tags"]),
                }
            })
            .collect();
        out.push(JaegerTrace {
            trace_id: pad_id(t["traceID"].as_str().unwrap_or_default(), 32),
            spans,
        });
    }
    out
}

fn v2_config(otlp_grpc: u16, otlp_http: u16, query_http: u16, query_grpc: u16) -> String {
    format!(
        r#"service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    resource:
      service.name: jaeger
    metrics:
      level: none
    logs:
      level: info

extensions:
  jaeger_query:
    enable_tracing: false
    storage:
      traces: memstore
    http:
      endpoint: 127.0.0.1:{query_http}
    grpc:
      endpoint: 127.0.0.1:{query_grpc}
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 100000

receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{otlp_grpc}
      http:
        endpoint: 127.0.0.1:{otlp_http}

processors:
  batch:
    timeout: 200ms

exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
"#
    )
}

/// `--…host-port` flags listed in a v1 `--help` output.
fn host_port_flags(help: &str) -> Vec<String> {
    let mut flags = Vec::new();
    for word in help.split(|c: char| c.is_whitespace() || c == '=' || c == ',') {
        if let Some(f) = word.strip_prefix("--")
            && f.ends_with("host-port")
            && !flags.iter().any(|x| x == f)
        {
            flags.push(f.to_string());
        }
    }
    flags
}

impl Jaeger {
    /// Starts `jaeger_bin()` with in-memory storage, all listeners on 127.0.0.1.
    pub fn start() -> Result<Jaeger> {
        let bin = jaeger_bin().context("no Jaeger binary (DIFYTRACE_JAEGER)")?;
        Self::start_bin(&bin)
    }

    pub fn start_bin(bin: &std::path::Path) -> Result<Jaeger> {
        let help = Command::new(bin)
            .arg("--help")
            .output()
            .with_context(|| format!("running {} --help", bin.display()))?;
        let help = format!(
            "{}{}",
            String::from_utf8_lossy(&help.stdout),
            String::from_utf8_lossy(&help.stderr)
        );
        let dir = TempDir::new("jaeger")?;
        let (otlp_grpc, otlp_http, query_http) = (free_port(), free_port(), free_port());
        let mut cmd = Command::new(bin);
        cmd.current_dir(dir.path());
        let flavour;
        if help.contains("collector.otlp.grpc.host-port") {
            flavour = Flavour::V1AllInOne;
            for flag in host_port_flags(&help) {
                let port = match flag.as_str() {
                    "collector.otlp.grpc.host-port" => otlp_grpc,
                    "collector.otlp.http.host-port" => otlp_http,
                    "query.http-server.host-port" => query_http,
                    _ => free_port(),
                };
                cmd.arg(format!("--{flag}=127.0.0.1:{port}"));
            }
            cmd.env("SPAN_STORAGE_TYPE", "memory");
        } else if help.contains("--config") {
            flavour = Flavour::V2;
            let config = dir.join("config.yaml");
            std::fs::write(
                &config,
                v2_config(otlp_grpc, otlp_http, query_http, free_port()),
            )?;
            cmd.arg("--config").arg(&config);
        } else {
            bail!(
                "{} --help shows neither v1 (--collector.otlp.grpc.host-port) nor v2 (--config) flags:\n{help}",
                bin.display()
            );
        }
        let mut proc = Proc::spawn("jaeger", cmd, dir.path())?;
        for port in [otlp_grpc, otlp_http, query_http] {
            wait_port_of(&mut proc, local(port), Duration::from_secs(60))?;
        }
        Ok(Jaeger {
            proc,
            flavour,
            otlp_grpc,
            otlp_http,
            query_http,
            _dir: dir,
        })
    }

    pub fn flavour(&self) -> Flavour {
        self.flavour
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// `http://127.0.0.1:<port>` of the OTLP gRPC receiver.
    pub fn otlp_grpc_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.otlp_grpc)
    }

    /// `http://127.0.0.1:<port>` of the OTLP HTTP receiver (base URL).
    pub fn otlp_http_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.otlp_http)
    }

    pub fn query_addr(&self) -> SocketAddr {
        local(self.query_http)
    }

    pub fn logs(&self, n: usize) -> String {
        self.proc.log_tail(n)
    }

    /// `GET path` on the query HTTP API, parsed as JSON.
    pub fn get_json(&self, path: &str) -> Result<Value> {
        let r = http_get(self.query_addr(), path, &[("Accept", "application/json")])?;
        if r.status != 200 {
            bail!("GET {path}: {} {}", r.status, r.text());
        }
        serde_json::from_slice(&r.body)
            .with_context(|| format!("GET {path}: not JSON: {}", r.text()))
    }

    /// Service names known to Jaeger.
    pub fn services(&self) -> Result<Vec<String>> {
        let v = self.get_json("/api/services")?;
        Ok(v["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect())
    }

    /// Traces of `service` (last hour, up to 100) that have a span with all of `tags`
    /// (string values), through `GET /api/traces?service=…&tags=…`.
    pub fn traces(&self, service: &str, tags: &[(&str, &str)]) -> Result<Vec<JaegerTrace>> {
        let mut path = format!(
            "/api/traces?service={}&lookback=1h&limit=100",
            percent_encode(service)
        );
        if !tags.is_empty() {
            let map: serde_json::Map<String, Value> = tags
                .iter()
                .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
                .collect();
            path.push_str("&tags=");
            path.push_str(&percent_encode(&Value::Object(map).to_string()));
        }
        Ok(parse_traces(&self.get_json(&path)?))
    }

    /// One trace by id (32 hex digits).
    pub fn trace(&self, trace_id: &str) -> Result<Option<JaegerTrace>> {
        let r = http_get(self.query_addr(), &format!("/api/traces/{trace_id}"), &[])?;
        if r.status == 404 {
            return Ok(None);
        }
        if r.status != 200 {
            bail!("GET /api/traces/{trace_id}: {} {}", r.status, r.text());
        }
        let v: Value = serde_json::from_slice(&r.body)?;
        Ok(parse_traces(&v).into_iter().next())
    }

    /// Polls `GET /api/traces?service=…&tags=…` until a trace satisfies `pred`.
    pub fn wait_for_trace(
        &self,
        service: &str,
        tags: &[(&str, &str)],
        pred: impl Fn(&JaegerTrace) -> bool,
        timeout: Duration,
    ) -> Result<JaegerTrace> {
        let deadline = Instant::now() + timeout;
        let mut last = Vec::new();
        let mut last_err = None;
        loop {
            match self.traces(service, tags) {
                Ok(traces) => {
                    if let Some(t) = traces.iter().find(|t| pred(t)) {
                        return Ok(t.clone());
                    }
                    last = traces;
                }
                Err(e) => last_err = Some(e),
            }
            if Instant::now() >= deadline {
                let seen: String = last.iter().map(JaegerTrace::summary).collect();
                bail!(
                    "no matching trace of service {service:?} with tags {tags:?} in Jaeger after \
                     {timeout:?}; services {:?}; last query error {:?}; traces seen:\n{seen}\n{}",
                    self.services().unwrap_or_default(),
                    last_err.map(|e| e.to_string()),
                    self.logs(40)
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_query_api_traces() {
        let body: Value = serde_json::from_str(
            r#"{"data":[{"traceID":"af7651916cd43dd8448eb211c80319c","spans":[
                {"traceID":"af7651916cd43dd8448eb211c80319c","spanID":"b7ad6b7169203331","operationName":"GET /chain",
                 "references":[],"startTime":10,"duration":5,"processID":"p1",
                 "tags":[{"key":"span.kind","type":"string","value":"server"},{"key":"http.response.status_code","type":"int64","value":200}]},
                {"traceID":"af7651916cd43dd8448eb211c80319c","spanID":"1","operationName":"GET",
                 "references":[{"refType":"CHILD_OF","traceID":"af7651916cd43dd8448eb211c80319c","spanID":"b7ad6b7169203331"}],
                 "startTime":11,"duration":2,"processID":"p1","tags":[{"key":"span.kind","type":"string","value":"client"}]}],
              "processes":{"p1":{"serviceName":"app","tags":[{"key":"process.pid","type":"int64","value":7}]}}}]}"#,
        )
        .unwrap();
        let t = &parse_traces(&body)[0];
        assert_eq!(t.trace_id, "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(t.spans[0].kind(), "server");
        assert_eq!(t.spans[0].tag("http.response.status_code"), Some("200"));
        assert_eq!(t.spans[1].parent(), "b7ad6b7169203331");
        assert_eq!(t.spans[1].span_id, "0000000000000001");
        assert_eq!(t.spans[1].service, "app");
        assert_eq!(t.spans[1].process_tags["process.pid"], "7");
    }

    #[test]
    fn percent_encodes() {
        assert_eq!(
            percent_encode(r#"{"a":"/b c"}"#),
            "%7B%22a%22%3A%22%2Fb%20c%22%7D"
        );
    }

    #[test]
    fn finds_host_port_flags() {
        let help = "      --admin.http.host-port string   The host:port (e.g. 127.0.0.1:14269 or :14269)\n\
                    --collector.otlp.grpc.host-port string  x\n  --query.http-server.host-port=foo";
        assert_eq!(
            host_port_flags(help),
            [
                "admin.http.host-port",
                "collector.otlp.grpc.host-port",
                "query.http-server.host-port"
            ]
        );
    }

    /// Starts the installed Jaeger, sends it one span over OTLP/gRPC and finds it through
    /// the query API. Needs no root and no agent.
    #[test]
    fn jaeger_starts_and_answers_queries() {
        let Some(bin) = require_jaeger("jaeger_starts_and_answers_queries") else {
            return;
        };
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
        use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
        use opentelemetry_proto::tonic::resource::v1::Resource;
        use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, span};

        let j = Jaeger::start_bin(&bin).unwrap();
        let listening = crate::procs::listening_sockets(j.pid());
        assert!(listening.len() >= 3, "{listening:?}");
        for a in &listening {
            assert!(
                a.ip().is_loopback(),
                "Jaeger listens on {a} ({listening:?})"
            );
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        let kv = |k: &str, v: any_value::Value| KeyValue {
            key: k.into(),
            value: Some(AnyValue { value: Some(v) }),
            ..Default::default()
        };
        let span = |id: u8, parent: Vec<u8>, kind: span::SpanKind, name: &str| Span {
            trace_id: vec![0x42; 16],
            span_id: vec![id; 8],
            parent_span_id: parent,
            name: name.into(),
            kind: kind as i32,
            start_time_unix_nano: now - 5_000_000 + id as u64,
            end_time_unix_nano: now - 1_000_000,
            attributes: vec![kv(
                "url.path",
                any_value::Value::StringValue("/chain".into()),
            )],
            ..Default::default()
        };
        let req = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv(
                        "service.name",
                        any_value::Value::StringValue("harness-check".into()),
                    )],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans: vec![
                        span(1, vec![], span::SpanKind::Server, "GET /chain"),
                        span(2, vec![1; 8], span::SpanKind::Client, "GET"),
                    ],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let endpoint = j.otlp_grpc_endpoint();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                let mut c = TraceServiceClient::connect(endpoint).await.unwrap();
                c.export(req).await.unwrap();
            });
        let t = j
            .wait_for_trace(
                "harness-check",
                &[("url.path", "/chain")],
                |t| t.spans.len() == 2,
                Duration::from_secs(30),
            )
            .unwrap();
        let none = j.traces("harness-check", &[("url.path", "/nope")]).unwrap();
        assert!(none.is_empty(), "tag filter ignored: {none:?}");
        assert_eq!(t.trace_id, "42".repeat(16));
        let server = t.spans.iter().find(|s| s.kind() == "server").unwrap();
        let client = t.spans.iter().find(|s| s.kind() == "client").unwrap();
        assert_eq!(server.operation, "GET /chain");
        assert_eq!(client.parent(), server.span_id);
        assert_eq!(server.tag("url.path"), Some("/chain"));
        assert!(j.services().unwrap().contains(&"harness-check".to_string()));
        assert!(j.trace(&t.trace_id).unwrap().is_some());
    }
}
