//! End-to-end: RED metrics, the service graph and self-telemetry, scraped from the agent's
//! Prometheus endpoint and received over OTLP (gRPC and HTTP), from a real gunicorn + Flask
//! front (`/chain` calls a second gunicorn) and real requests; and `tracer check`.
//!
//! Both gunicorns are selected by pid and named by `--service-name` with names unique to the
//! run, so other gunicorns on the host (other tests) never count.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::*;
use difytrace_tests::agent::{Agent, agent_binary};
use difytrace_tests::otlp_receiver::{OtlpReceiver, PointKind, ReceivedPoint, Transport};
use difytrace_tests::procs::{free_port, http_get, local, raw_exchange};
use difytrace_tests::python::{DEMO_APP, Gunicorn, GunicornOpts, check_flask_gunicorn};

/// The backend `/chain` of [`DEMO_APP`] calls.
const BACK_APP: &str = r#"
import os
from flask import Flask

app = Flask(__name__)


@app.after_request
def add_worker_pid(resp):
    resp.headers["X-Worker-Pid"] = str(os.getpid())
    return resp


@app.get("/downstream/data")
def data():
    return "downstream-ok"
"#;

/// How long metrics may take to show the requests (scrapes and OTLP exports every 2 s).
const METRICS_WAIT: Duration = Duration::from_secs(40);

/// One sample of the exposition: name, labels, value.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the Prometheus text format (what the agent writes: no timestamps, escaped quotes).
fn parse_exposition(text: &str) -> Result<Vec<Sample>> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .with_context(|| format!("no value in {line:?}"))?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v
                .parse()
                .with_context(|| format!("bad value in {line:?}"))?,
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .with_context(|| format!("unclosed labels in {line:?}"))?;
                let mut labels = BTreeMap::new();
                let mut chars = body.chars().peekable();
                while chars.peek().is_some() {
                    let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
                    ensure!(chars.next() == Some('"'), "bad label in {line:?}");
                    let mut value = String::new();
                    while let Some(c) = chars.next() {
                        match c {
                            '\\' => match chars.next() {
                                Some('n') => value.push('\n'),
                                Some(c) => value.push(c),
                                None => break,
                            },
                            '"' => break,
                            c => value.push(c),
                        }
                    }
                    if chars.peek() == Some(&',') {
                        chars.next();
                    }
                    labels.insert(key, value);
                }
                (name.to_string(), labels)
            }
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    Ok(out)
}

fn scrape(addr: SocketAddr) -> Result<Vec<Sample>> {
    let r = http_get(addr, "/metrics", &[]).context("GET /metrics")?;
    ensure!(r.status == 200, "GET /metrics: {} {}", r.status, r.text());
    ensure!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain; version=0.0.4")),
        "content type {:?}",
        r.header("content-type")
    );
    parse_exposition(&r.text())
}

/// Sum of the samples named `name` whose labels include every pair of `want`.
fn total(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            want.iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

/// Scrapes until `pred` holds; returns the last scrape.
fn scrape_until(
    agent: &Agent,
    addr: SocketAddr,
    what: &str,
    pred: impl Fn(&[Sample]) -> bool,
) -> Result<Vec<Sample>> {
    let deadline = std::time::Instant::now() + METRICS_WAIT;
    loop {
        let samples = scrape(addr)?;
        if pred(&samples) {
            return Ok(samples);
        }
        if std::time::Instant::now() >= deadline {
            let ours: Vec<String> = samples
                .iter()
                .filter(|s| s.name.starts_with("http_") || s.name.starts_with("traces_"))
                .map(|s| format!("{} {:?} {}", s.name, s.labels, s.value))
                .collect();
            return Err(agent.annotate(anyhow::anyhow!(
                "metrics never showed {what}; span-derived samples:\n{}",
                ours.join("\n")
            )));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The latest OTLP value of `metric` for `service` with attributes `want`.
fn otlp_total(rx: &OtlpReceiver, service: &str, metric: &str, want: &[(&str, &str)]) -> f64 {
    let pred = |p: &ReceivedPoint| {
        p.service == service
            && p.metric == metric
            && want
                .iter()
                .all(|(k, v)| p.attr_str(k).as_deref() == Some(*v))
    };
    rx.latest_points(pred).iter().map(|p| p.value).sum()
}

struct Stack {
    front: Gunicorn,
    back: Gunicorn,
    front_name: String,
    back_name: String,
}

fn start_stack() -> Result<Stack> {
    check_flask_gunicorn()?;
    let back = Gunicorn::start(BACK_APP, &GunicornOpts::default())?;
    let front = Gunicorn::start(DEMO_APP, &GunicornOpts::default().downstream(back.port()))?;
    let tag = random_hex(6);
    Ok(Stack {
        front_name: format!("mfront-{tag}"),
        back_name: format!("mback-{tag}"),
        front,
        back,
    })
}

fn agent_args(stack: &Stack, extra: &[String]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--pid".into(),
        stack.front.master_pid().to_string(),
        "--pid".into(),
        stack.back.master_pid().to_string(),
        "--service-name".into(),
        format!("pid:{}={}", stack.front.master_pid(), stack.front_name),
        "--service-name".into(),
        format!("pid:{}={}", stack.back.master_pid(), stack.back_name),
        "--metrics-interval".into(),
        "2".into(),
    ];
    args.extend(extra.iter().cloned());
    args
}

/// The main scenario over OTLP/gRPC: 8 `/chain` (200, each calling the backend) and 4
/// `/fail` (500) on the front.
#[test]
fn red_metrics_service_graph_and_self_telemetry() -> Result<()> {
    let Some(_e2e) = difytrace_tests::e2e("red_metrics_service_graph_and_self_telemetry") else {
        return Ok(());
    };
    let stack = start_stack()?;
    let rx = OtlpReceiver::start()?;
    let metrics = local(free_port());
    let agent = Agent::start(&agent_args(
        &stack,
        &[
            "--otlp-endpoint".into(),
            rx.grpc_endpoint(),
            "--metrics-addr".into(),
            metrics.to_string(),
        ],
    ))?;

    const CHAINS: usize = 8;
    const FAILS: usize = 4;
    let mut sent = Vec::new();
    for i in 0..CHAINS + FAILS {
        let path = if i % 3 == 2 { "/fail" } else { "/chain" };
        sent.push(get(stack.front.addr(), path, &[])?);
    }
    ensure!(
        sent.iter().filter(|s| s.status == 500).count() == FAILS,
        "{sent:?}"
    );
    ensure!(
        sent.iter().filter(|s| s.status == 200).count() == CHAINS,
        "{sent:?}"
    );
    rx.wait_for(|s| all_served(s, &sent), SPAN_WAIT)
        .map_err(|e| agent.annotate(e))?;

    let (front, back) = (stack.front_name.as_str(), stack.back_name.as_str());
    let server = "http_server_request_duration_seconds_count";
    let ok = [
        ("service_name", front),
        ("http_response_status_code", "200"),
    ];
    let failed = [
        ("service_name", front),
        ("http_response_status_code", "500"),
        ("error_type", "500"),
    ];
    let edge = [("client", front), ("server", back)];
    let samples = scrape_until(&agent, metrics, "every request and edge", |s| {
        total(s, server, &ok) >= CHAINS as f64
            && total(s, server, &failed) >= FAILS as f64
            && total(s, "traces_service_graph_request_total", &edge) >= CHAINS as f64
    })?;
    // Exact counts: no request counted twice, nothing from other services.
    ensure!(total(&samples, server, &[("service_name", front)]) == (CHAINS + FAILS) as f64);
    ensure!(total(&samples, server, &ok) == CHAINS as f64);
    ensure!(total(&samples, server, &failed) == FAILS as f64);
    ensure!(
        total(
            &samples,
            server,
            &[("service_name", back), ("http_response_status_code", "200")]
        ) == CHAINS as f64
    );
    ensure!(
        total(
            &samples,
            "http_client_request_duration_seconds_count",
            &[
                ("service_name", front),
                ("http_response_status_code", "200"),
                ("server_port", &stack.back.port().to_string()),
            ]
        ) == CHAINS as f64
    );
    ensure!(total(&samples, "traces_service_graph_request_total", &edge) == CHAINS as f64);
    ensure!(total(&samples, "traces_service_graph_request_failed_total", &edge) == 0.0);
    ensure!(
        total(
            &samples,
            "traces_service_graph_request_server_seconds_count",
            &edge
        ) == CHAINS as f64
    );
    // A histogram's +Inf bucket is its count, and buckets are cumulative.
    let inf: f64 = samples
        .iter()
        .filter(|s| {
            s.name == "http_server_request_duration_seconds_bucket"
                && s.labels.get("service_name").map(String::as_str) == Some(front)
                && s.labels.get("le").map(String::as_str) == Some("+Inf")
        })
        .map(|s| s.value)
        .sum();
    ensure!(inf == (CHAINS + FAILS) as f64, "+Inf buckets sum to {inf}");
    // No raw path ever becomes a label, and routes are absent (Flask declares none we see).
    ensure!(
        samples.iter().all(|s| !s
            .labels
            .values()
            .any(|v| v.contains("/chain") || v.contains("/fail"))),
        "a URL path became a label"
    );

    // Self-telemetry.
    ensure!(total(&samples, "difytrace_events_total", &[("kind", "data")]) > 0.0);
    // Every span the receiver has is one the agent exported; the agent counts it when the
    // backend's answer arrives, just after the receiver stored it.
    let ours = rx.spans().len() as f64;
    let exported_otlp =
        |s: &[Sample]| total(s, "difytrace_spans_exported_total", &[("exporter", "otlp")]);
    let samples = scrape_until(&agent, metrics, "the exported spans counted", |s| {
        exported_otlp(s) >= ours
    })?;
    let exported = exported_otlp(&samples);
    let handed = total(&samples, "difytrace_spans_total", &[]);
    ensure!(
        exported >= ours && handed >= exported,
        "spans: receiver saw {ours}, agent exported {exported}, handed out {handed}"
    );
    // Map occupancy is sampled every 5 s off the event loop.
    let samples = scrape_until(&agent, metrics, "the watched processes in WATCHED", |s| {
        total(s, "difytrace_map_entries", &[("map", "WATCHED")]) >= 2.0
    })?;
    ensure!(total(&samples, "difytrace_map_capacity", &[("map", "SOCKETS")]) > 0.0);
    ensure!(total(&samples, "process_resident_memory_bytes", &[]) > 1e6);
    for name in [
        "difytrace_drops_total",
        "difytrace_otlp_queue",
        "process_cpu_seconds_total",
    ] {
        ensure!(samples.iter().any(|s| s.name == name), "no {name}");
    }
    ensure!(
        total(
            &samples,
            "difytrace_drops_total",
            &[("reason", "sequence_hole")]
        ) == 0.0,
        "sequence holes on an idle machine"
    );

    // Bad scrapes get an error and the endpoint keeps answering.
    let garbage = raw_exchange(
        metrics,
        b"\x16\x03\x01\x00garbage\r\n\r\n",
        true,
        Duration::from_secs(5),
    )?;
    ensure!(
        garbage.status() == Some(400),
        "garbage got {:?}",
        garbage.first_line()
    );
    let wrong = http_get(metrics, "/nope", &[])?;
    ensure!(wrong.status == 404, "GET /nope got {}", wrong.status);
    let half = raw_exchange(metrics, b"GET /metr", true, Duration::from_secs(5))?;
    ensure!(
        half.status() == Some(400),
        "a cut request got {:?}",
        half.first_line()
    );
    ensure!(scrape(metrics)?.iter().any(|s| s.name == server));

    // The OTLP receiver gets the same counts.
    let points = rx
        .wait_for_points(
            |_| {
                otlp_total(
                    &rx,
                    front,
                    "http.server.request.duration",
                    &[("http.response.status_code", "200")],
                ) == CHAINS as f64
                    && otlp_total(
                        &rx,
                        front,
                        "http.server.request.duration",
                        &[("error.type", "500")],
                    ) == FAILS as f64
                    && otlp_total(
                        &rx,
                        "difytrace",
                        "traces_service_graph_request_total",
                        &edge,
                    ) == CHAINS as f64
            },
            METRICS_WAIT,
        )
        .map_err(|e| agent.annotate(e))?;
    ensure!(points.iter().all(|p| p.transport == Transport::Grpc));
    let hist = points
        .iter()
        .find(|p| p.service == front && p.metric == "http.server.request.duration")
        .context("no histogram point")?;
    ensure!(
        hist.kind == PointKind::Histogram && hist.unit == "s",
        "{hist:?}"
    );
    ensure!(
        points
            .iter()
            .any(|p| p.service == "difytrace" && p.metric == "difytrace_events"),
        "no self-telemetry over OTLP"
    );

    let stats = agent.stop_with_stats()?;
    for key in ["tree_traces_printed", "metrics_exports", "graph_paired"] {
        ensure!(
            stats.contains_key(key),
            "stats line has no {key}: {stats:?}"
        );
    }
    ensure!(stats["graph_paired"] >= CHAINS as u64, "{stats:?}");
    ensure!(rx.errors().is_empty(), "receiver errors: {:?}", rx.errors());
    Ok(())
}

/// OTLP metrics over http/protobuf (`/v1/metrics`) without a Prometheus endpoint; only the
/// front is traced, so its calls to the back are an edge to the back's address.
#[test]
fn otlp_http_metrics_and_edges_to_untraced_peers() -> Result<()> {
    let Some(_e2e) = difytrace_tests::e2e("otlp_http_metrics_and_edges_to_untraced_peers") else {
        return Ok(());
    };
    let stack = start_stack()?;
    let rx = OtlpReceiver::start()?;
    let front_pid = stack.front.master_pid().to_string();
    let agent = Agent::start(&[
        "--pid",
        &front_pid,
        "--service-name",
        &format!("pid:{front_pid}={}", stack.front_name),
        "--metrics-interval",
        "2",
        "--otlp-protocol",
        "http/protobuf",
        "--otlp-endpoint",
        &rx.http_endpoint(),
    ])?;
    let mut sent = Vec::new();
    for i in 0..5 {
        sent.push(get(
            stack.front.addr(),
            if i < 3 { "/chain" } else { "/hello" },
            &[],
        )?);
    }
    ensure!(sent.iter().all(|s| s.status == 200), "{sent:?}");
    let front = stack.front_name.as_str();
    let peer = format!("127.0.0.1:{}", stack.back.port());
    let edge = [
        ("client", front),
        ("server", peer.as_str()),
        ("connection_type", "virtual_node"),
    ];
    // A lone CLIENT span waits 5 s for a partner, and is settled on the next 5 s tick.
    let points = rx
        .wait_for_points(
            |_| {
                otlp_total(
                    &rx,
                    front,
                    "http.server.request.duration",
                    &[("http.request.method", "GET")],
                ) == sent.len() as f64
                    && otlp_total(
                        &rx,
                        "difytrace",
                        "traces_service_graph_request_total",
                        &edge,
                    ) == 3.0
            },
            METRICS_WAIT,
        )
        .map_err(|e| agent.annotate(e))?;
    ensure!(points.iter().all(|p| p.transport == Transport::Http));
    ensure!(
        otlp_total(
            &rx,
            "difytrace",
            "traces_service_graph_request_server_seconds",
            &edge
        ) == 0.0,
        "a virtual edge has no server side"
    );
    ensure!(rx.errors().is_empty(), "receiver errors: {:?}", rx.errors());
    Ok(())
}

/// `tracer check` as root on this machine: everything the agent needs is there.
#[test]
fn check_reports_kernel_features() -> Result<()> {
    let Some(_e2e) = difytrace_tests::e2e("check_reports_kernel_features") else {
        return Ok(());
    };
    let out = Command::new(agent_binary())
        .arg("check")
        .output()
        .context("running tracer check")?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "tracer check failed ({}):\n{text}",
        out.status
    );
    for item in [
        "BTF",
        "ring buffer",
        "raw tracepoints",
        "uprobes",
        "kernel",
        "BPF privileges",
    ] {
        ensure!(
            text.lines().any(|l| l.starts_with("OK")
                && l.split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
                    .contains(&format!(" {item} "))),
            "no OK line for {item}:\n{text}"
        );
    }
    ensure!(
        text.contains("everything the agent needs is present"),
        "{text}"
    );
    Ok(())
}
