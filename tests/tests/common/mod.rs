//! Helpers shared by the end-to-end test binaries.
#![allow(dead_code)]

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};
use difytrace_tests::agent::Agent;
use difytrace_tests::otlp_receiver::{OtlpReceiver, ReceivedSpan, summarize};
use difytrace_tests::procs::{HttpResponse, http_get};

/// How long spans may take to reach a receiver (agent batching included).
pub const SPAN_WAIT: Duration = Duration::from_secs(30);

/// The agent watching processes named `gunicorn`, exporting to `rx` over OTLP/gRPC.
pub fn start_agent(rx: &OtlpReceiver) -> Result<Agent> {
    Agent::start(&["--comm", "gunicorn", "--otlp-endpoint", &rx.grpc_endpoint()])
}

/// A request the test sent, and what the server said.
#[derive(Debug, Clone)]
pub struct Sent {
    pub method: String,
    pub path: String,
    /// The server's port.
    pub port: u16,
    pub status: u16,
    /// `X-Worker-Pid` of the response: the gunicorn worker that served it.
    pub worker_pid: u32,
    pub body: String,
}

impl Sent {
    pub fn from_response(method: &str, path: &str, port: u16, r: &HttpResponse) -> Result<Sent> {
        let worker_pid = r
            .header("x-worker-pid")
            .with_context(|| format!("{method} {path}: no X-Worker-Pid in {r:?}"))?
            .parse()?;
        Ok(Sent {
            method: method.into(),
            path: path.into(),
            port,
            status: r.status,
            worker_pid,
            body: r.text(),
        })
    }
}

/// `GET path` on a fresh connection.
pub fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<Sent> {
    let r = http_get(addr, path, headers).with_context(|| format!("GET {path}"))?;
    Sent::from_response("GET", path, addr.port(), &r)
}

/// Random lowercase hex of `n` digits (n <= 32).
pub fn random_hex(n: usize) -> String {
    let mut s = String::new();
    while s.len() < n {
        let mut h = RandomState::new().build_hasher();
        h.write_u128(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos(),
        );
        s.push_str(&format!("{:016x}", h.finish()));
    }
    s.truncate(n);
    s
}

/// A SERVER span for `req`: its path, and the worker that answered or the server's port
/// (other gunicorns on the host, from other test runs or benchmarks, may serve the same
/// paths).
pub fn is_server_for(s: &ReceivedSpan, req: &Sent) -> bool {
    s.is_server()
        && s.attr_str("url.path").as_deref() == Some(req.path.as_str())
        && (s.pid() == Some(req.worker_pid)
            || s.attr_str("server.port") == Some(req.port.to_string()))
}

/// SERVER spans for `req`.
pub fn servers_for<'a>(spans: &'a [ReceivedSpan], req: &Sent) -> Vec<&'a ReceivedSpan> {
    spans.iter().filter(|s| is_server_for(s, req)).collect()
}

/// SERVER spans whose `url.path` is `path`, from any process.
pub fn servers_with_path<'a>(spans: &'a [ReceivedSpan], path: &str) -> Vec<&'a ReceivedSpan> {
    spans
        .iter()
        .filter(|s| s.is_server() && s.attr_str("url.path").as_deref() == Some(path))
        .collect()
}

/// Exactly one SERVER span per request sent.
pub fn ensure_one_server_span_each(spans: &[ReceivedSpan], sent: &[Sent]) -> Result<()> {
    for r in sent {
        let servers = servers_for(spans, r);
        let n = servers.len();
        ensure!(
            n == 1,
            "{n} SERVER spans for {} {} (want exactly 1):\n{}",
            r.method,
            r.path,
            summarize(&servers.into_iter().cloned().collect::<Vec<_>>(), 10)
        );
    }
    Ok(())
}

/// True once every request in `sent` has a SERVER span.
pub fn all_served(spans: &[ReceivedSpan], sent: &[Sent]) -> bool {
    sent.iter()
        .all(|r| spans.iter().any(|s| is_server_for(s, r)))
}

/// Span duration is positive and below 10 s.
pub fn check_duration(s: &ReceivedSpan) -> Result<()> {
    ensure!(
        s.end_ns > s.start_ns && s.duration() < Duration::from_secs(10),
        "implausible duration {:?} (start {} end {}): {}",
        s.duration(),
        s.start_ns,
        s.end_ns,
        s.summary()
    );
    Ok(())
}

/// The SERVER span of `req` as gunicorn's worker saw it.
pub fn check_server_span(s: &ReceivedSpan, req: &Sent, service: &str, port: u16) -> Result<()> {
    let ctx = || s.summary();
    ensure!(s.is_server(), "not a SERVER span: {}", ctx());
    ensure!(
        s.attr_str("http.request.method").as_deref() == Some(req.method.as_str()),
        "http.request.method should be {}: {}",
        req.method,
        ctx()
    );
    ensure!(
        s.attr_str("url.path").as_deref() == Some(req.path.as_str()),
        "url.path should be {}: {}",
        req.path,
        ctx()
    );
    ensure!(
        s.attr_int("http.response.status_code") == Some(i64::from(req.status)),
        "http.response.status_code should be the integer {}: {}",
        req.status,
        ctx()
    );
    let by_path = format!("{} {}", req.method, req.path);
    let by_route = s
        .attr_str("http.route")
        .map(|r| format!("{} {r}", req.method));
    ensure!(
        s.name == by_path || Some(&s.name) == by_route.as_ref(),
        "span name should be {by_path:?} (or method + http.route): {}",
        ctx()
    );
    ensure!(
        s.res_str("service.name").as_deref() == Some(service),
        "service.name should be {service:?}: {}",
        ctx()
    );
    ensure!(
        s.pid() == Some(req.worker_pid),
        "process.pid should be {} (the worker that answered): {}",
        req.worker_pid,
        ctx()
    );
    ensure!(
        s.res_str("host.name").is_some_and(|h| !h.is_empty()),
        "resource host.name missing: {:?}",
        s.resource
    );
    ensure!(
        s.res_str("process.executable.name")
            .is_some_and(|h| !h.is_empty()),
        "resource process.executable.name missing: {:?}",
        s.resource
    );
    if let Some(p) = s.attr_str("server.port") {
        ensure!(
            p == port.to_string(),
            "server.port should be {port}: {}",
            ctx()
        );
    }
    for key in ["client.address", "network.peer.address"] {
        if let Some(a) = s.attr_str(key) {
            ensure!(a == "127.0.0.1", "{key} should be 127.0.0.1: {}", ctx());
        }
    }
    check_duration(s)
}

/// [`check_server_span`] for the (first) SERVER span of each request in `sent`; each must
/// have one.
pub fn check_server_spans(
    spans: &[ReceivedSpan],
    sent: &[Sent],
    service: &str,
    port: u16,
) -> Result<()> {
    for r in sent {
        check_server_span(servers_for(spans, r)[0], r, service, port)
            .with_context(|| format!("{} {}", r.method, r.path))?;
    }
    Ok(())
}

/// The CLIENT span a worker made to the downstream service while serving `server`.
pub fn check_client_child(
    client: &ReceivedSpan,
    server: &ReceivedSpan,
    downstream_port: u16,
) -> Result<()> {
    let ctx = || format!("client {}\nserver {}", client.summary(), server.summary());
    ensure!(client.is_client(), "not a CLIENT span: {}", ctx());
    ensure!(
        client.attr_str("server.port") == Some(downstream_port.to_string()),
        "server.port should be the downstream port {downstream_port}: {}",
        ctx()
    );
    ensure!(
        client.attr_int("http.response.status_code") == Some(200),
        "http.response.status_code should be the integer 200: {}",
        ctx()
    );
    ensure!(
        client.attr_str("http.request.method").as_deref() == Some("GET"),
        "http.request.method should be GET: {}",
        ctx()
    );
    if let Some(p) = client.attr_str("url.path") {
        ensure!(p == "/downstream/data", "url.path: {}", ctx());
    }
    ensure!(
        client.trace_id == server.trace_id,
        "CLIENT span not in the SERVER span's trace: {}",
        ctx()
    );
    ensure!(
        client.parent_span_id == server.span_id,
        "CLIENT span's parent should be the SERVER span: {}",
        ctx()
    );
    ensure!(
        client.pid() == server.pid(),
        "CLIENT and SERVER spans from different processes: {}",
        ctx()
    );
    ensure!(
        client.start_ns >= server.start_ns && client.end_ns <= server.end_ns,
        "CLIENT span [{}, {}] not within SERVER span [{}, {}]: {}",
        client.start_ns,
        client.end_ns,
        server.start_ns,
        server.end_ns,
        ctx()
    );
    check_duration(client)
}

/// CLIENT spans to `port`.
pub fn clients_to(spans: &[ReceivedSpan], port: u16) -> Vec<&ReceivedSpan> {
    spans
        .iter()
        .filter(|s| s.is_client() && s.attr_str("server.port") == Some(port.to_string()))
        .collect()
}

/// The CLIENT span to `downstream_port` that belongs to `server`: by parent id, else (to
/// report what is wrong with it) one from the same process that overlaps it in time.
pub fn client_of<'a>(
    spans: &'a [ReceivedSpan],
    server: &ReceivedSpan,
    downstream_port: u16,
) -> Result<&'a ReceivedSpan> {
    let clients = clients_to(spans, downstream_port);
    if let Some(c) = clients.iter().find(|c| c.parent_span_id == server.span_id) {
        return Ok(c);
    }
    clients
        .iter()
        .find(|c| c.pid() == server.pid() && c.start_ns < server.end_ns && c.end_ns > server.start_ns)
        .copied()
        .with_context(|| {
            format!(
                "no CLIENT span to port {downstream_port} for SERVER span {}\nCLIENT spans to that port:\n{}",
                server.summary(),
                clients.iter().map(|c| format!("  {}\n", c.summary())).collect::<String>()
            )
        })
}
