//! End-to-end against a real backend: the agent exports to Jaeger (in-memory, loopback
//! only) and the trace of a `/chain/<token>` request is read back through Jaeger's HTTP
//! query API (`GET /api/traces?service=app&tags={"url.path":…}`).
//!
//! The agent watches this test's gunicorn by `--pid` and the path is unique, so that other
//! gunicorns on the host (another test run, a benchmark) cannot crowd the trace out.
//!
//! Needs root, the release agent binary and a Jaeger binary (`DIFYTRACE_JAEGER`, else
//! `$HOME/go/bin/jaeger`, else `jaeger` on PATH).

mod common;

use std::path::Path;

use anyhow::{Context, Result, ensure};
use common::*;
use difytrace_tests::agent::Agent;
use difytrace_tests::jaeger::{Jaeger, JaegerSpan, JaegerTrace, require_jaeger};
use difytrace_tests::otlp_receiver::Transport;
use difytrace_tests::python::{DEMO_APP, Downstream, Gunicorn, GunicornOpts, check_flask_gunicorn};

fn is_chain_server(s: &JaegerSpan, path: &str) -> bool {
    s.kind() == "server" && s.tag("url.path") == Some(path)
}

/// The trace holds the /chain SERVER span and a CLIENT span to the downstream port that is
/// its child.
fn chain_trace_complete(t: &JaegerTrace, path: &str, downstream_port: u16) -> bool {
    let port = downstream_port.to_string();
    t.spans.iter().any(|server| {
        is_chain_server(server, path)
            && t.spans.iter().any(|c| {
                c.kind() == "client"
                    && c.tag("server.port") == Some(port.as_str())
                    && c.parent() == server.span_id
            })
    })
}

fn check_chain_trace(t: &JaegerTrace, chain: &Sent, downstream_port: u16) -> Result<()> {
    let server = t
        .spans
        .iter()
        .find(|s| is_chain_server(s, &chain.path))
        .with_context(|| t.summary())?;
    let client = t
        .spans
        .iter()
        .find(|s| s.kind() == "client" && s.parent() == server.span_id)
        .with_context(|| t.summary())?;
    ensure!(server.service == "app", "service: {}", t.summary());
    ensure!(
        server.process_tags.get("process.pid") == Some(&chain.worker_pid.to_string()),
        "process.pid should be {}: {:?}",
        chain.worker_pid,
        server.process_tags
    );
    ensure!(
        server.tag("http.request.method") == Some("GET"),
        "{}",
        t.summary()
    );
    ensure!(
        server.tag("http.response.status_code") == Some("200"),
        "{}",
        t.summary()
    );
    ensure!(
        client.tag("server.port") == Some(downstream_port.to_string().as_str()),
        "{}",
        t.summary()
    );
    ensure!(
        client.tag("http.response.status_code") == Some("200"),
        "{}",
        t.summary()
    );
    ensure!(client.trace_id == server.trace_id, "{}", t.summary());
    ensure!(
        client.start_us >= server.start_us
            && client.start_us + client.duration_us <= server.start_us + server.duration_us + 1,
        "CLIENT span not within the SERVER span: {}",
        t.summary()
    );
    ensure!(
        server.duration_us > 0 && server.duration_us < 10_000_000,
        "{}",
        t.summary()
    );
    Ok(())
}

fn setup(test: &str) -> Option<(difytrace_tests::E2e, std::path::PathBuf)> {
    let e2e = difytrace_tests::e2e(test)?;
    let bin = require_jaeger(test)?;
    Some((e2e, bin))
}

/// What a test runs; dropped in this order (the agent first, Jaeger last).
struct Stack {
    agent: Agent,
    g: Gunicorn,
    down: Downstream,
    jaeger: Jaeger,
}

/// Jaeger (binary `bin`), the downstream service, gunicorn running the demo app, and the
/// agent watching that gunicorn by `--pid` and exporting to Jaeger over `transport`.
fn start_stack(bin: &Path, transport: Transport) -> Result<Stack> {
    check_flask_gunicorn()?;
    let jaeger = Jaeger::start_bin(bin)?;
    let down = Downstream::start()?;
    let g = Gunicorn::start(DEMO_APP, &GunicornOpts::default().downstream(down.port()))?;
    let pid = g.master_pid().to_string();
    let (protocol, endpoint): (&[&str], _) = match transport {
        Transport::Grpc => (&[], jaeger.otlp_grpc_endpoint()),
        Transport::Http => (
            &["--otlp-protocol", "http/protobuf"],
            jaeger.otlp_http_endpoint(),
        ),
    };
    let mut args = vec!["--pid", pid.as_str()];
    args.extend_from_slice(protocol);
    args.extend(["--otlp-endpoint", endpoint.as_str()]);
    let agent = Agent::start(&args)?;
    Ok(Stack {
        agent,
        g,
        down,
        jaeger,
    })
}

#[test]
fn jaeger_receives_linked_chain_trace_over_grpc() -> Result<()> {
    let Some((_e2e, bin)) = setup("jaeger_receives_linked_chain_trace_over_grpc") else {
        return Ok(());
    };
    let mut st = start_stack(&bin, Transport::Grpc)?;

    let path = format!("/chain/{}", random_hex(12));
    let chain = get(st.g.addr(), &path, &[])?;
    ensure!(
        chain.status == 200 && chain.body == "chain:downstream-ok",
        "{chain:?}"
    );
    let t = st
        .jaeger
        .wait_for_trace(
            "app",
            &[("url.path", &path)],
            |t| chain_trace_complete(t, &path, st.down.port()),
            SPAN_WAIT * 2,
        )
        .map_err(|e| st.agent.annotate(e))?;
    check_chain_trace(&t, &chain, st.down.port())?;
    st.agent.ensure_running()?;
    Ok(())
}

/// Same through OTLP/HTTP; the trace is found by the id given in `traceparent`.
#[test]
fn jaeger_receives_trace_over_http_protobuf() -> Result<()> {
    let Some((_e2e, bin)) = setup("jaeger_receives_trace_over_http_protobuf") else {
        return Ok(());
    };
    let mut st = start_stack(&bin, Transport::Http)?;

    let trace_id = random_hex(32);
    let parent = random_hex(16);
    let path = format!("/chain/{}", random_hex(12));
    let chain = get(
        st.g.addr(),
        &path,
        &[("traceparent", &format!("00-{trace_id}-{parent}-01"))],
    )?;
    ensure!(chain.status == 200, "{chain:?}");
    let t = st
        .jaeger
        .wait_for_trace(
            "app",
            &[("url.path", &path)],
            |t| t.trace_id == trace_id && chain_trace_complete(t, &path, st.down.port()),
            SPAN_WAIT * 2,
        )
        .map_err(|e| st.agent.annotate(e))?;
    check_chain_trace(&t, &chain, st.down.port())?;
    ensure!(
        st.jaeger.trace(&trace_id)?.is_some(),
        "GET /api/traces/{trace_id} does not find the trace"
    );
    let server = t.spans.iter().find(|s| is_chain_server(s, &path)).unwrap();
    ensure!(
        server.parent() == parent,
        "SERVER span should have the traceparent's parent: {}",
        t.summary()
    );
    st.agent.ensure_running()?;
    Ok(())
}
