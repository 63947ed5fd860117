//! End-to-end: HTTP/2 and gRPC from the wire.
//!
//! A grpc-go server (the echo service of google.golang.org/grpc/examples) and clients built in
//! the test (grpc-go, and Python's grpcio from PyPI), all on h2c over loopback. The agent
//! watches them by comm and must give each RPC a SERVER span and a CLIENT span with the
//! service, method and status, the SERVER span a child of the CLIENT span (the two ends of
//! the same connection), and never a wrong header value when it starts on a connection
//! already in use. With grpc-go's uprobes (`tracer-ebpf/src/grpc.rs`), a Go handler's
//! outbound calls are children of its SERVER span, and a Go process's spans have the right
//! method and status even where the wire's HPACK state was missing.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use difytrace_tests::agent::Agent;
use difytrace_tests::grpc::{
    ClientRun, GO_COMM, GrpcFixture, GrpcServer, NOT_FOUND, SERVICE, STREAM_METHOD, STRIPPED_COMM,
    UNARY_METHOD, tools_missing,
};
use difytrace_tests::otlp_receiver::{OtlpReceiver, ReceivedSpan, summarize};

const WAIT: Duration = Duration::from_secs(60);
/// How long the agent may take to read a Go binary and attach its uprobes.
const ATTACH_WAIT: Duration = Duration::from_secs(30);
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

/// Waits until the agent attached grpc-go uprobes to the binary of one of `pids` (one
/// binary: the agent reads it once, for the first of its processes it meets).
fn wait_grpc_uprobes(agent: &mut Agent, pids: &[u32]) -> Result<()> {
    agent
        .wait_stderr(
            |log| {
                log.lines().any(|l| {
                    // The attached hooks, not the skipped ones.
                    let hooks = l
                        .split_once(" hooks=[")
                        .and_then(|(_, rest)| rest.split_once(']'))
                        .map_or("", |(hooks, _)| hooks);
                    l.contains("Go uprobes attached")
                        && pids.iter().any(|p| l.contains(&format!("/proc/{p}/exe")))
                        && [
                            "(*Server).handleStream",
                            "(*http2Server).writeStatus",
                            "(*http2Client).NewStream",
                            "(*http2Client).closeStream",
                        ]
                        .iter()
                        .all(|h| hooks.contains(h))
                })
            },
            ATTACH_WAIT,
        )
        .context("grpc-go uprobes never attached")
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

/// A grpc-go server whose handler calls another grpc-go server (`chain` calls, half of them
/// failing downstream with NOT_FOUND), four calls at once on one connection at each hop:
/// every call is one trace client -> server -> the handler's outbound call -> downstream
/// server, with method and status right at each hop. Without the uprobes the outbound call
/// could only be linked by the goroutine that wrote its frames (the downstream connection's
/// writer, started at the server's start-up, which serves no request).
#[test]
fn grpc_go_handler_calls_are_children_of_their_server_span() -> Result<()> {
    let Some((_e2e, fx)) =
        prerequisites("grpc_go_handler_calls_are_children_of_their_server_span")?
    else {
        return Ok(());
    };
    let rx = OtlpReceiver::start()?;
    let mut agent = Agent::start(&["--comm", GO_COMM, "--otlp-endpoint", &rx.grpc_endpoint()])?;
    let down = GrpcServer::start(&fx)?;
    let front = GrpcServer::start_with(&fx, &["-downstream", &down.target()])?;
    wait_grpc_uprobes(&mut agent, &[down.pid(), front.pid()]).map_err(|e| agent.annotate(e))?;
    const N: usize = 8;
    let run = fx.go_client(&[
        "-target",
        &front.target(),
        "-mode",
        "chain",
        "-count",
        &N.to_string(),
        "-parallel",
        "4",
    ])?;
    ensure!(run.calls.len() == N, "client output:\n{}", run.stdout);
    let (client_pid, front_pid, down_pid) = (run.pid, front.pid(), down.pid());
    let spans = rx
        .wait_for(
            |s| {
                rpc_spans(s, client_pid, false).len() >= N
                    && rpc_spans(s, front_pid, true).len() >= N
                    && rpc_spans(s, front_pid, false).len() >= N
                    && rpc_spans(s, down_pid, true).len() >= N
            },
            WAIT,
        )
        .map_err(|e| agent.annotate(e))?;
    let clients = rpc_spans(&spans, client_pid, false);
    let children = |pid: u32, server: bool, parent: &ReceivedSpan| -> Vec<&ReceivedSpan> {
        rpc_spans(&spans, pid, server)
            .into_iter()
            .filter(|s| s.parent_span_id == parent.span_id)
            .collect()
    };
    let name = format!("{SERVICE}/UnaryEcho");
    let mut codes = BTreeSet::new();
    for c in &clients {
        let code = c.attr_int("rpc.grpc.status_code");
        let [server] = children(front_pid, true, c)[..] else {
            bail!(
                "not one SERVER child of {}:\n{}",
                c.summary(),
                summarize(&spans, 60)
            );
        };
        let [call] = children(front_pid, false, server)[..] else {
            bail!(
                "not one outbound call under {}:\n{}",
                server.summary(),
                summarize(&spans, 60)
            );
        };
        let [downstream] = children(down_pid, true, call)[..] else {
            bail!(
                "not one SERVER child of {}:\n{}",
                call.summary(),
                summarize(&spans, 60)
            );
        };
        for s in [*c, server, call, downstream] {
            ensure!(
                s.trace_id == c.trace_id
                    && s.name == name
                    && s.attr_str("rpc.method").as_deref() == Some("UnaryEcho")
                    && s.attr_str("rpc.service").as_deref() == Some(SERVICE)
                    && s.attr_int("rpc.grpc.status_code") == code,
                "call {}: {}",
                c.summary(),
                s.summary()
            );
        }
        // The handler's own run, from its uprobes: it contains the outbound call.
        let handler_ns = server
            .attr_int("difytrace.handler.duration_ns")
            .with_context(|| format!("no handler duration: {}", server.summary()))?;
        ensure!(
            handler_ns > 0 && call.start_ns >= server.start_ns && call.end_ns <= server.end_ns,
            "outbound call not inside its SERVER span:\n  {}\n  {}",
            server.summary(),
            call.summary()
        );
        codes.extend(code);
    }
    ensure!(
        codes == BTreeSet::from([0, i64::from(NOT_FOUND)]),
        "status codes {codes:?}"
    );
    let stats = agent.stop_with_stats()?;
    let stat = |k: &str| stats.get(k).copied().unwrap_or(0);
    ensure!(
        stat("go_grpc_server_bound") >= 2 * N as u64
            && stat("go_grpc_client_owned") >= 2 * N as u64
            && stat("go_grpc_mismatches") == 0
            && stat("go_grpc_no_socket") == 0
            && stat("h2_errors") == 0,
        "stats: {stats:?}"
    );
    Ok(())
}

/// The agent starts while a Go client and server hold a warmed-up connection (both HPACK
/// dynamic tables unknown to it): every later call still gets both spans, whatever the wire
/// could not decode is left out or marked partial, and the grpc-go uprobes give the method
/// and status the wire hid (a NOT_FOUND among them), never a wrong one.
#[test]
fn agent_started_on_a_connection_in_use_never_reports_wrong_values() -> Result<()> {
    let Some((_e2e, fx)) =
        prerequisites("agent_started_on_a_connection_in_use_never_reports_wrong_values")?
    else {
        return Ok(());
    };
    let server = GrpcServer::start(&fx)?;
    let target = server.target();
    // One warm-up call fills both HPACK dynamic tables before the agent looks; the wait
    // leaves the agent time to attach its uprobes before the measured calls.
    let mut client = fx.go_client_spawn(&[
        "-target",
        &target,
        "-mode",
        "mixed",
        "-count",
        "6",
        "-wait-before",
        "8s",
    ])?;
    client.wait_warmup(WAIT)?;
    let rx = OtlpReceiver::start()?;
    let mut agent = Agent::start(&["--comm", GO_COMM, "--otlp-endpoint", &rx.grpc_endpoint()])?;
    wait_grpc_uprobes(&mut agent, &[server.pid(), client.pid()]).map_err(|e| agent.annotate(e))?;
    ensure!(
        !client.stdout().contains("\ncall 1 "),
        "the measured calls began before the uprobes were attached:\n{}",
        client.stdout()
    );
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
    let mut from_uprobes = 0;
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
            if s.attr("difytrace.grpc.method_source").is_some() {
                from_uprobes += 1;
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
            // Both ends are grpc-go with uprobes: what the wire hid, they tell.
            ensure!(
                s.name == format!("{SERVICE}/{method}")
                    && s.attr_str("rpc.method").as_deref() == Some(method)
                    && s.attr_str("rpc.service").as_deref() == Some(SERVICE)
                    && s.attr_int("rpc.grpc.status_code") == Some(i64::from(call.code)),
                "{side} span of call {} ({}) lacks the method or status: {}",
                call.index,
                call.line,
                s.summary()
            );
            if call.code == NOT_FOUND && side == "client" {
                ensure!(
                    s.status_code == STATUS_ERROR
                        && s.attr_str("error.type").as_deref() == Some("NOT_FOUND"),
                    "NOT_FOUND call {}: {}",
                    call.index,
                    s.summary()
                );
            }
        }
    }
    // The two ends of each call are linked (the connection's addresses and the stream id
    // are known even mid-connection).
    let clients = rpc_spans(&spans, client_pid, false);
    for s in rpc_spans(&spans, server_pid, true) {
        ensure!(
            clients.iter().any(|c| c.span_id == s.parent_span_id),
            "server span not under a client span: {}",
            s.summary()
        );
    }
    // The UnaryEcho requests are one dynamic-table index per field: their method can only
    // have come from the uprobes.
    ensure!(
        from_uprobes >= 2,
        "no method from the uprobes:\n{}",
        summarize(&spans, 40)
    );
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
    let stats = agent.stop_with_stats()?;
    let stat = |k: &str| stats.get(k).copied().unwrap_or(0);
    ensure!(
        stat("go_grpc_methods_filled") >= 2
            && stat("go_grpc_statuses_filled") >= 2
            && stat("go_grpc_mismatches") == 0,
        "stats: {stats:?}"
    );
    Ok(())
}

/// grpc-go's field offsets come from DWARF only: a stripped binary gets no grpc hooks, the
/// agent says why, and its calls are still traced from the wire.
#[test]
fn stripped_grpc_go_binary_is_traced_from_the_wire_and_says_why() -> Result<()> {
    let Some((_e2e, fx)) =
        prerequisites("stripped_grpc_go_binary_is_traced_from_the_wire_and_says_why")?
    else {
        return Ok(());
    };
    let fx = fx.stripped()?;
    let rx = OtlpReceiver::start()?;
    let mut agent = Agent::start(&[
        "--comm",
        STRIPPED_COMM,
        "--otlp-endpoint",
        &rx.grpc_endpoint(),
    ])?;
    let server = GrpcServer::start(&fx)?;
    let server_pid = server.pid();
    agent
        .wait_stderr(
            |log| {
                log.lines().any(|l| {
                    l.contains("Go uprobes attached")
                        && l.contains(&format!("/proc/{server_pid}/exe"))
                        && l.contains("(*Server).handleStream\", \"no offsets for")
                        && l.contains("only read from DWARF, and the binary has none (stripped)")
                })
            },
            ATTACH_WAIT,
        )
        .map_err(|e| agent.annotate(e))?;
    let run = fx.go_client(&["-target", &server.target(), "-mode", "mixed", "-count", "3"])?;
    let client_pid = run.pid;
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
    let stats = agent.stop_with_stats()?;
    ensure!(
        stats.get("go_grpc_server_starts") == Some(&0)
            && stats.get("go_grpc_client_streams") == Some(&0),
        "stats: {stats:?}"
    );
    Ok(())
}
