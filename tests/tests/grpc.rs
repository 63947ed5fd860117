//! End-to-end: HTTP/2 and gRPC from the wire.
//!
//! A grpc-go server (the echo service of google.golang.org/grpc/examples) and clients built in
//! the test (grpc-go, and Python's grpcio from PyPI), all on h2c over loopback. The agent
//! watches them by comm and must give each RPC a SERVER span and a CLIENT span with the
//! service, method and status, the SERVER span a child of the CLIENT span (the two ends of
//! the same connection), and never a wrong header value when it starts on a connection
//! already in use.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use difytrace_tests::agent::Agent;
use difytrace_tests::grpc::{
    ClientRun, GO_COMM, GrpcFixture, GrpcServer, NOT_FOUND, SERVICE, STREAM_METHOD, UNARY_METHOD,
    tools_missing,
};
use difytrace_tests::otlp_receiver::{OtlpReceiver, ReceivedSpan, summarize};

const WAIT: Duration = Duration::from_secs(60);
/// OTLP `STATUS_CODE_ERROR`.
const STATUS_ERROR: i32 = 2;
/// comm of the venv's python (its `bin/python` is a symlink named python).
const PYTHON_COMM: &str = "python";

fn prerequisites(test: &str) -> Result<Option<(difytrace_tests::E2e, GrpcFixture)>> {
    let Some(e2e) = difytrace_tests::e2e(test) else {
        return Ok(None);
    };
    let missing = tools_missing();
    if !missing.is_empty() {
        return Ok(difytrace_tests::prerequisite_missing(test, &missing));
    }
    Ok(Some((e2e, GrpcFixture::prepare()?)))
}

fn rpc_spans(spans: &[ReceivedSpan], pid: u32, server: bool) -> Vec<&ReceivedSpan> {
    let mut out: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.pid() == Some(pid) && s.is_server() == server && s.is_client() != server)
        .filter(|s| s.attr_str("network.protocol.version").as_deref() == Some("2"))
        .collect();
    out.sort_by_key(|s| s.start_ns);
    out
}

/// Every call of `run` has exactly one CLIENT span from the client and one SERVER span from
/// the server, in call order, with the right method, status and message count, the SERVER
/// span the child of the CLIENT span.
fn check_calls(spans: &[ReceivedSpan], run: &ClientRun, server_pid: u32) -> Result<()> {
    let clients = rpc_spans(spans, run.pid, false);
    let servers: Vec<&ReceivedSpan> = rpc_spans(spans, server_pid, true)
        .into_iter()
        .filter(|s| clients.iter().any(|c| c.span_id == s.parent_span_id))
        .collect();
    ensure!(
        clients.len() == run.calls.len() && servers.len() == run.calls.len(),
        "{} calls, {} client spans, {} linked server spans:\n{}",
        run.calls.len(),
        clients.len(),
        servers.len(),
        summarize(spans, 40)
    );
    for ((call, client), server) in run.calls.iter().zip(&clients).zip(&servers) {
        let method = call
            .method
            .rsplit('/')
            .next()
            .context("method name")?
            .to_string();
        for s in [*client, *server] {
            ensure!(
                s.name == format!("{SERVICE}/{method}")
                    && s.attr_str("rpc.service").as_deref() == Some(SERVICE)
                    && s.attr_str("rpc.method").as_deref() == Some(method.as_str())
                    && s.attr_int("rpc.grpc.status_code") == Some(i64::from(call.code))
                    && s.attr_str("url.path").as_deref() == Some(call.method.as_str())
                    && s.attr_str("network.protocol.version").as_deref() == Some("2"),
                "call {} ({}): {}",
                call.index,
                call.line,
                s.summary()
            );
        }
        ensure!(
            server.trace_id == client.trace_id && server.parent_span_id == client.span_id,
            "server span not the client span's child:\n  {}\n  {}",
            server.summary(),
            client.summary()
        );
        ensure!(
            server.start_ns >= client.start_ns && server.end_ns <= client.end_ns,
            "server span not within the client span:\n  {}\n  {}",
            server.summary(),
            client.summary()
        );
        if call.kind == "stream" {
            ensure!(
                server.attr_int("difytrace.grpc.response_messages") == Some(i64::from(call.msgs))
                    && client.attr_int("difytrace.grpc.response_messages")
                        == Some(i64::from(call.msgs)),
                "stream of {} messages: {}",
                call.msgs,
                server.summary()
            );
        }
        if call.code == NOT_FOUND {
            // An error for the caller; for the server, answering NOT_FOUND is not a failure.
            ensure!(
                client.status_code == STATUS_ERROR
                    && client.attr_str("error.type").as_deref() == Some("NOT_FOUND")
                    && server.status_code != STATUS_ERROR,
                "NOT_FOUND statuses:\n  {}\n  {}",
                client.summary(),
                server.summary()
            );
        } else {
            ensure!(
                client.status_code != STATUS_ERROR && server.status_code != STATUS_ERROR,
                "unexpected error:\n  {}\n  {}",
                client.summary(),
                server.summary()
            );
        }
    }
    Ok(())
}

#[test]
fn grpc_go_unary_stream_and_error_calls() -> Result<()> {
    let Some((_e2e, fx)) = prerequisites("grpc_go_unary_stream_and_error_calls")? else {
        return Ok(());
    };
    let rx = OtlpReceiver::start()?;
    let agent = Agent::start(&["--comm", GO_COMM, "--otlp-endpoint", &rx.grpc_endpoint()])?;
    let server = GrpcServer::start(&fx)?;
    let target = server.target();
    let run = fx.go_client(&["-target", &target, "-mode", "mixed", "-count", "6"])?;
    ensure!(run.calls.len() == 6, "client output:\n{}", run.stdout);
    let (client_pid, server_pid) = (run.pid, server.pid());
    let spans = rx
        .wait_for(
            |s| {
                rpc_spans(s, client_pid, false).len() >= 6
                    && rpc_spans(s, server_pid, true).len() >= 6
            },
            WAIT,
        )
        .map_err(|e| agent.annotate(e))?;
    check_calls(&spans, &run, server_pid).map_err(|e| agent.annotate(e))?;
    let stats = agent.stop_with_stats()?;
    ensure!(
        stats.get("h2_errors") == Some(&0) && stats.get("cross_process_links") >= Some(&6),
        "stats: {stats:?}"
    );
    Ok(())
}

#[test]
fn python_grpcio_client_against_the_go_server() -> Result<()> {
    let Some((_e2e, fx)) = prerequisites("python_grpcio_client_against_the_go_server")? else {
        return Ok(());
    };
    let rx = OtlpReceiver::start()?;
    let agent = Agent::start(&[
        "--comm",
        GO_COMM,
        "--comm",
        PYTHON_COMM,
        "--otlp-endpoint",
        &rx.grpc_endpoint(),
    ])?;
    let server = GrpcServer::start(&fx)?;
    let target = server.target();
    // grpcio writes with sendmsg and many iovecs, and sends its metadata as literals.
    let run = fx.python_client(&["-target", &target, "-mode", "mixed", "-count", "3"])?;
    ensure!(run.calls.len() == 3, "client output:\n{}", run.stdout);
    let (client_pid, server_pid) = (run.pid, server.pid());
    let spans = rx
        .wait_for(
            |s| {
                rpc_spans(s, client_pid, false).len() >= 3
                    && rpc_spans(s, server_pid, true).len() >= 3
            },
            WAIT,
        )
        .map_err(|e| agent.annotate(e))?;
    check_calls(&spans, &run, server_pid).map_err(|e| agent.annotate(e))?;
    Ok(())
}

#[test]
fn agent_started_on_a_connection_in_use_never_reports_wrong_values() -> Result<()> {
    let Some((_e2e, fx)) =
        prerequisites("agent_started_on_a_connection_in_use_never_reports_wrong_values")?
    else {
        return Ok(());
    };
    let server = GrpcServer::start(&fx)?;
    let target = server.target();
    // One warm-up call fills both HPACK dynamic tables before the agent looks.
    let mut client = fx.go_client_spawn(&[
        "-target",
        &target,
        "-mode",
        "mixed",
        "-count",
        "6",
        "-wait-before",
        "4s",
    ])?;
    client.wait_warmup(WAIT)?;
    let rx = OtlpReceiver::start()?;
    let agent = Agent::start(&["--comm", GO_COMM, "--otlp-endpoint", &rx.grpc_endpoint()])?;
    let run = client.wait(Duration::from_secs(120))?;
    ensure!(run.calls.len() == 6, "client output:\n{}", run.stdout);
    let (client_pid, server_pid) = (run.pid, server.pid());
    let spans = rx
        .wait_for(
            |s| {
                rpc_spans(s, client_pid, false).len() >= 6
                    && rpc_spans(s, server_pid, true).len() >= 6
            },
            WAIT,
        )
        .map_err(|e| agent.annotate(e))?;
    let mut partial = 0;
    for (side, pid) in [("client", client_pid), ("server", server_pid)] {
        let got = rpc_spans(&spans, pid, side == "server");
        ensure!(
            got.len() == run.calls.len(),
            "{side}: {} spans for {} calls:\n{}",
            got.len(),
            run.calls.len(),
            summarize(&spans, 40)
        );
        for (call, s) in run.calls.iter().zip(&got) {
            if s.attr("difytrace.partial_headers").is_some() {
                partial += 1;
            }
            // What is there must be right; what could not be decoded is left out.
            let wrong = |key: &str, want: &str| s.attr_str(key).is_some_and(|v| v != want);
            let method = call.method.rsplit('/').next().unwrap_or_default();
            ensure!(
                !wrong("url.path", &call.method)
                    && !wrong("rpc.method", method)
                    && !wrong("rpc.service", SERVICE)
                    && s.attr_int("rpc.grpc.status_code")
                        .is_none_or(|c| c == i64::from(call.code)),
                "{side} span of call {} ({}) has a wrong value: {}",
                call.index,
                call.line,
                s.summary()
            );
        }
    }
    // grpc-go indexes every request header after the warm-up: the UnaryEcho calls cannot be
    // decoded in full from mid-connection, and must say so.
    ensure!(
        partial >= 2,
        "no span marked difytrace.partial_headers:\n{}",
        summarize(&spans, 40)
    );
    let methods: BTreeSet<String> = spans
        .iter()
        .filter_map(|s| s.attr_str("url.path"))
        .collect();
    ensure!(
        methods
            .iter()
            .all(|m| m == UNARY_METHOD || m == STREAM_METHOD),
        "unexpected paths: {methods:?}"
    );
    Ok(())
}
