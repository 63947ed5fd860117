//! End-to-end: Dify plugin invocations over stdio pipes become spans.
//!
//! A real `dify_plugin` (0.7.4, from PyPI) tool plugin runs under a Go stand-in for the plugin
//! daemon that launches it exactly as dify-plugin-daemon does (`.venv/bin/python -m main` in
//! its working directory, stdin/stdout pipes) and sends tool invocations in the daemon's
//! format. The agent watches the daemon by comm; the plugin is watched as its child. Nothing
//! in the plugin or the daemon knows about tracing.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use difytrace_tests::agent::Agent;
use difytrace_tests::otlp_receiver::{OtlpReceiver, ReceivedSpan, summarize};
use difytrace_tests::plugin::{DAEMON_COMM, PluginFixture, tools_missing};
use difytrace_tests::python::Downstream;

const WAIT: Duration = Duration::from_secs(60);
const RUN_TIMEOUT: Duration = Duration::from_secs(120);
/// OTLP `STATUS_CODE_ERROR`.
const STATUS_ERROR: i32 = 2;

struct Setup {
    _e2e: difytrace_tests::E2e,
    fixture: PluginFixture,
    rx: OtlpReceiver,
    agent: Agent,
}

fn setup(test: &str) -> Result<Option<Setup>> {
    let Some(e2e) = difytrace_tests::e2e(test) else {
        return Ok(None);
    };
    let missing = tools_missing();
    if !missing.is_empty() {
        return Ok(difytrace_tests::prerequisite_missing(test, &missing));
    }
    let fixture = PluginFixture::prepare()?;
    let rx = OtlpReceiver::start()?;
    let agent = Agent::start(&[
        "--comm",
        DAEMON_COMM,
        "--otlp-endpoint",
        &rx.grpc_endpoint(),
    ])?;
    Ok(Some(Setup {
        _e2e: e2e,
        fixture,
        rx,
        agent,
    }))
}

fn session_of(s: &ReceivedSpan) -> Option<String> {
    s.attr_str("dify.plugin.session_id")
}

/// The SERVER (plugin side) and CLIENT (daemon side) invocation spans of every session.
fn invocation_pairs(
    spans: &[ReceivedSpan],
    sessions: &BTreeSet<String>,
) -> BTreeMap<String, (Option<ReceivedSpan>, Option<ReceivedSpan>)> {
    let mut out: BTreeMap<String, (Option<ReceivedSpan>, Option<ReceivedSpan>)> = BTreeMap::new();
    for s in spans {
        let Some(id) = session_of(s) else { continue };
        if !sessions.contains(&id) || !s.name.starts_with("plugin invoke") {
            continue;
        }
        let entry = out.entry(id).or_default();
        if s.is_server() {
            entry.0 = Some(s.clone());
        } else if s.is_client() {
            entry.1 = Some(s.clone());
        }
    }
    out
}

fn all_pairs_complete(spans: &[ReceivedSpan], sessions: &BTreeSet<String>) -> bool {
    let pairs = invocation_pairs(spans, sessions);
    pairs.len() == sessions.len() && pairs.values().all(|(s, c)| s.is_some() && c.is_some())
}

/// Checks one session's two spans: names, services, ids, linking, timing.
fn check_pair(server: &ReceivedSpan, client: &ReceivedSpan, plugin_service: &str) -> Result<()> {
    ensure!(
        server.name == "plugin invoke_tool" && client.name == "plugin invoke_tool",
        "span names: {} / {}",
        server.summary(),
        client.summary()
    );
    ensure!(
        server.res_str("service.name").as_deref() == Some(plugin_service),
        "plugin service name: {}",
        server.summary()
    );
    ensure!(
        client.res_str("service.name").as_deref() == Some(DAEMON_COMM),
        "daemon service name: {}",
        client.summary()
    );
    for s in [server, client] {
        ensure!(
            s.attr_str("dify.plugin.action").as_deref() == Some("invoke_tool")
                && s.attr_str("dify.plugin.type").as_deref() == Some("tool")
                && s.attr_str("dify.plugin.provider").as_deref() == Some("echo_tool"),
            "request attributes: {}",
            s.summary()
        );
        ensure!(
            !s.mentions("dummy-api-key-not-a-secret"),
            "credentials leaked: {}",
            s.summary()
        );
    }
    ensure!(
        server.trace_id == client.trace_id && server.parent_span_id == client.span_id,
        "plugin span is not the daemon span's child:\n  {}\n  {}",
        server.summary(),
        client.summary()
    );
    // Both ends name the pipe the request crossed and the process at its other end.
    ensure!(
        server.attr_int("difytrace.pipe.inode").is_some()
            && server.attr_int("difytrace.pipe.inode") == client.attr_int("difytrace.pipe.inode")
            && server.attr_int("difytrace.peer.pid") == client.pid().map(i64::from)
            && client.attr_int("difytrace.peer.pid") == server.pid().map(i64::from),
        "pipe inode / peer pids:\n  {}\n  {}",
        server.summary(),
        client.summary()
    );
    // The plugin's side lies within the daemon's (same clock, both from the kernel).
    ensure!(
        server.start_ns >= client.start_ns && server.end_ns <= client.end_ns + 1_000_000,
        "plugin span not inside daemon span:\n  {}\n  {}",
        server.summary(),
        client.summary()
    );
    ensure!(
        server.duration() < Duration::from_secs(30),
        "duration: {}",
        server.summary()
    );
    Ok(())
}

#[test]
fn tool_invocation_is_a_server_span_under_the_daemon_client_span() -> Result<()> {
    let Some(s) = setup("tool_invocation_is_a_server_span_under_the_daemon_client_span")? else {
        return Ok(());
    };
    let run = s
        .fixture
        .run(&["-mode", "echo", "-chunks", "3"], RUN_TIMEOUT)?;
    ensure!(run.sessions.len() == 1, "daemon output:\n{}", run.stdout);
    let sessions: BTreeSet<String> = run.sessions.iter().map(|r| r.id.clone()).collect();
    let spans =
        s.rx.wait_for(|sp| all_pairs_complete(sp, &sessions), WAIT)
            .map_err(|e| s.agent.annotate(e))?;
    let pairs = invocation_pairs(&spans, &sessions);
    let (server, client) = pairs.values().next().context("one pair")?;
    let (server, client) = (
        server.as_ref().context("server")?,
        client.as_ref().context("client")?,
    );
    check_pair(server, client, &s.fixture.plugin_service())?;
    ensure!(
        server.attr_str("dify.plugin.tool").as_deref() == Some("echo"),
        "{}",
        server.summary()
    );
    ensure!(
        server.attr_int("dify.plugin.chunks") == Some(3)
            && server.pid() == Some(run.plugin_pid)
            && client.pid() == Some(run.daemon_pid),
        "chunks / pids (plugin {}, daemon {}): {}",
        run.plugin_pid,
        run.daemon_pid,
        server.summary()
    );
    ensure!(
        server.status_code != STATUS_ERROR,
        "unexpected error: {}",
        server.summary()
    );
    // Heartbeats, logs and the startup manifest line are not spans.
    let extra: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|sp| sp.pid() == Some(run.plugin_pid) && session_of(sp).is_none())
        .collect();
    ensure!(
        extra.is_empty(),
        "spans without a session from the plugin:\n{}",
        summarize(&spans, 20)
    );
    let stats = s.agent.stop_with_stats()?;
    ensure!(
        stats.get("plugin_open") == Some(&0),
        "open invocations left: {stats:?}"
    );
    Ok(())
}

#[test]
fn tool_error_is_an_error_span_with_its_message() -> Result<()> {
    let Some(s) = setup("tool_error_is_an_error_span_with_its_message")? else {
        return Ok(());
    };
    let run = s
        .fixture
        .run(&["-mode", "error", "-text", "tool went wrong"], RUN_TIMEOUT)?;
    let sessions: BTreeSet<String> = run.sessions.iter().map(|r| r.id.clone()).collect();
    ensure!(sessions.len() == 1, "daemon output:\n{}", run.stdout);
    let spans =
        s.rx.wait_for(|sp| all_pairs_complete(sp, &sessions), WAIT)
            .map_err(|e| s.agent.annotate(e))?;
    let pairs = invocation_pairs(&spans, &sessions);
    let (server, client) = pairs.values().next().context("one pair")?;
    let (server, client) = (
        server.as_ref().context("server")?,
        client.as_ref().context("client")?,
    );
    check_pair(server, client, &s.fixture.plugin_service())?;
    for sp in [server, client] {
        ensure!(
            sp.status_code == STATUS_ERROR
                && sp.status_message.contains("tool went wrong")
                && sp.attr_str("error.type").as_deref() == Some("EchoToolFailure"),
            "expected an error span with the tool's message: {} (status {} {:?})",
            sp.summary(),
            sp.status_code,
            sp.status_message
        );
    }
    Ok(())
}

#[test]
fn plugin_outbound_http_call_is_a_child_of_the_invocation() -> Result<()> {
    let Some(s) = setup("plugin_outbound_http_call_is_a_child_of_the_invocation")? else {
        return Ok(());
    };
    let downstream = Downstream::start()?;
    let url = format!("http://127.0.0.1:{}/downstream/data", downstream.port());
    let run = s.fixture.run(
        &["-mode", "http", "-url", &url, "-expect-status", "200"],
        RUN_TIMEOUT,
    )?;
    let sessions: BTreeSet<String> = run.sessions.iter().map(|r| r.id.clone()).collect();
    ensure!(sessions.len() == 1, "daemon output:\n{}", run.stdout);
    let plugin_pid = run.plugin_pid;
    let spans =
        s.rx.wait_for(
            |sp| {
                all_pairs_complete(sp, &sessions)
                    && sp.iter().any(|x| {
                        x.is_client()
                            && x.pid() == Some(plugin_pid)
                            && x.attr_str("url.path").as_deref() == Some("/downstream/data")
                    })
            },
            WAIT,
        )
        .map_err(|e| s.agent.annotate(e))?;
    let pairs = invocation_pairs(&spans, &sessions);
    let (server, _) = pairs.values().next().context("one pair")?;
    let server = server.as_ref().context("server")?;
    let http = spans
        .iter()
        .find(|x| {
            x.is_client()
                && x.pid() == Some(plugin_pid)
                && x.attr_str("url.path").as_deref() == Some("/downstream/data")
        })
        .context("HTTP client span")?;
    ensure!(
        http.trace_id == server.trace_id && http.parent_span_id == server.span_id,
        "HTTP call not under the invocation:\n  {}\n  {}",
        http.summary(),
        server.summary()
    );
    ensure!(
        http.attr_int("http.response.status_code") == Some(200)
            && http.start_ns >= server.start_ns
            && http.end_ns <= server.end_ns,
        "HTTP span: {}",
        http.summary()
    );
    Ok(())
}

#[test]
fn fifty_concurrent_sessions_on_one_plugin_are_kept_apart() -> Result<()> {
    let Some(s) = setup("fifty_concurrent_sessions_on_one_plugin_are_kept_apart")? else {
        return Ok(());
    };
    // -print-raw: each tool call also prints a non-JSON line on the plugin's stdout.
    let run = s.fixture.run(
        &[
            "-mode",
            "echo",
            "-sessions",
            "50",
            "-chunks",
            "2",
            "-print-raw",
        ],
        RUN_TIMEOUT,
    )?;
    let sessions: BTreeSet<String> = run.sessions.iter().map(|r| r.id.clone()).collect();
    ensure!(sessions.len() == 50, "daemon output:\n{}", run.stdout);
    let spans =
        s.rx.wait_for(|sp| all_pairs_complete(sp, &sessions), WAIT)
            .map_err(|e| s.agent.annotate(e))?;
    let pairs = invocation_pairs(&spans, &sessions);
    let mut span_ids = BTreeSet::new();
    for (id, (server, client)) in &pairs {
        let (server, client) = (
            server.as_ref().context("server")?,
            client.as_ref().context("client")?,
        );
        check_pair(server, client, &s.fixture.plugin_service()).with_context(|| id.clone())?;
        ensure!(
            server.attr_int("dify.plugin.chunks") == Some(2),
            "chunks of {id}: {}",
            server.summary()
        );
        span_ids.insert(server.span_id.clone());
    }
    ensure!(span_ids.len() == 50, "server spans are not distinct");
    let traces: BTreeSet<&String> = pairs
        .values()
        .filter_map(|(sv, _)| sv.as_ref().map(|x| &x.trace_id))
        .collect();
    ensure!(traces.len() == 50, "sessions share traces");
    let stats = s.agent.stop_with_stats()?;
    ensure!(
        stats.get("stdio_not_json").copied().unwrap_or(0) >= 1
            && stats.get("plugin_open") == Some(&0),
        "stats: {stats:?}"
    );
    Ok(())
}

#[test]
fn killed_plugin_ends_its_sessions_in_error() -> Result<()> {
    let Some(s) = setup("killed_plugin_ends_its_sessions_in_error")? else {
        return Ok(());
    };
    let run = s.fixture.run(
        &[
            "-mode",
            "sleep",
            "-sleep-seconds",
            "30",
            "-kill-after",
            "1s",
        ],
        RUN_TIMEOUT,
    )?;
    let sessions: BTreeSet<String> = run.sessions.iter().map(|r| r.id.clone()).collect();
    ensure!(
        sessions.len() == 1 && run.sessions[0].result.starts_with("no-end"),
        "daemon output:\n{}",
        run.stdout
    );
    let spans =
        s.rx.wait_for(|sp| all_pairs_complete(sp, &sessions), WAIT)
            .map_err(|e| s.agent.annotate(e))?;
    let pairs = invocation_pairs(&spans, &sessions);
    let (server, client) = pairs.values().next().context("one pair")?;
    let (server, client) = (
        server.as_ref().context("server")?,
        client.as_ref().context("client")?,
    );
    check_pair(server, client, &s.fixture.plugin_service())?;
    for sp in [server, client] {
        ensure!(
            sp.status_code == STATUS_ERROR && sp.status_message.contains("exited"),
            "expected an error for the killed plugin: {} ({:?})",
            sp.summary(),
            sp.status_message
        );
        ensure!(
            sp.duration() >= Duration::from_millis(900) && sp.duration() < Duration::from_secs(20),
            "span should last about until the kill: {}",
            sp.summary()
        );
    }
    let stats = s.agent.stop_with_stats()?;
    ensure!(stats.get("plugin_open") == Some(&0), "stats: {stats:?}");
    Ok(())
}

#[test]
fn backwards_invocations_are_children_of_the_invocation() -> Result<()> {
    let Some(s) = setup("backwards_invocations_are_children_of_the_invocation")? else {
        return Ok(());
    };
    let run = s.fixture.run(&["-mode", "storage"], RUN_TIMEOUT)?;
    let sessions: BTreeSet<String> = run.sessions.iter().map(|r| r.id.clone()).collect();
    ensure!(sessions.len() == 1, "daemon output:\n{}", run.stdout);
    let id = sessions.iter().next().context("session")?.clone();
    let spans =
        s.rx.wait_for(
            |sp| {
                all_pairs_complete(sp, &sessions)
                    && sp
                        .iter()
                        .filter(|x| x.name.starts_with("plugin backwards_invoke"))
                        .count()
                        >= 2
            },
            WAIT,
        )
        .map_err(|e| s.agent.annotate(e))?;
    let pairs = invocation_pairs(&spans, &sessions);
    let server = pairs
        .get(&id)
        .and_then(|p| p.0.clone())
        .context("server span")?;
    let backwards: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|x| x.name == "plugin backwards_invoke storage")
        .collect();
    ensure!(backwards.len() == 2, "{}", summarize(&spans, 20));
    for b in backwards {
        ensure!(
            b.is_client()
                && b.parent_span_id == server.span_id
                && b.trace_id == server.trace_id
                && session_of(b).as_deref() == Some(id.as_str())
                && b.attr_str("dify.plugin.backwards_request_id").is_some()
                && b.status_code != STATUS_ERROR,
            "backwards span: {}",
            b.summary()
        );
    }
    Ok(())
}

#[test]
fn daemon_http_request_is_the_parent_of_its_plugin_invocation() -> Result<()> {
    let Some(s) = setup("daemon_http_request_is_the_parent_of_its_plugin_invocation")? else {
        return Ok(());
    };
    const REQUESTS: usize = 5;
    let port = difytrace_tests::procs::free_port();
    let listen = format!("127.0.0.1:{port}");
    let daemon = s.fixture.start(&[
        "-mode",
        "echo",
        "-sessions",
        &REQUESTS.to_string(),
        "-listen",
        &listen,
    ])?;
    daemon.wait_line("listening on", WAIT)?;
    let addr = difytrace_tests::procs::local(port);
    let path = "/plugin/tenant-1/dispatch/tool/invoke";
    let mut sent = BTreeSet::new();
    for _ in 0..REQUESTS {
        let r = difytrace_tests::procs::http_request(
            addr,
            "POST",
            path,
            &[
                ("Content-Type", "application/json"),
                ("X-Api-Key", "dummy-inner-key"),
            ],
            br#"{"user_id":"u","data":{"provider":"echo_tool","tool":"echo"}}"#,
        )?;
        ensure!(
            r.status == 200 && r.text().contains("\"code\":0"),
            "dispatch answer: {r:?}"
        );
        sent.insert(
            r.header("x-session-id")
                .context("X-Session-Id")?
                .to_string(),
        );
    }
    let run = daemon.wait(RUN_TIMEOUT)?;
    let sessions: BTreeSet<String> = run.sessions.iter().map(|r| r.id.clone()).collect();
    ensure!(sessions == sent, "daemon output:\n{}", run.stdout);
    let daemon_pid = run.daemon_pid;
    let spans =
        s.rx.wait_for(
            |sp| {
                all_pairs_complete(sp, &sessions)
                    && sp
                        .iter()
                        .filter(|x| {
                            x.is_server()
                                && x.pid() == Some(daemon_pid)
                                && x.attr_str("url.path").as_deref() == Some(path)
                        })
                        .count()
                        == REQUESTS
            },
            WAIT,
        )
        .map_err(|e| s.agent.annotate(e))?;
    let pairs = invocation_pairs(&spans, &sessions);
    for (id, (server, client)) in &pairs {
        let (server, client) = (
            server.as_ref().context("server")?,
            client.as_ref().context("client")?,
        );
        check_pair(server, client, &s.fixture.plugin_service()).with_context(|| id.clone())?;
        // The daemon's goroutine reads the request and writes it to the plugin without
        // blocking in between, so the thread that received it is the one that wrote the line.
        let http = spans
            .iter()
            .find(|x| x.span_id == client.parent_span_id)
            .with_context(|| {
                format!("parent of {}:\n{}", client.summary(), summarize(&spans, 40))
            })?;
        ensure!(
            http.is_server()
                && http.pid() == Some(daemon_pid)
                && http.attr_str("url.path").as_deref() == Some(path)
                && http.trace_id == client.trace_id
                && !http.mentions("dummy-inner-key"),
            "invocation parent is not the dispatch request: {}",
            http.summary()
        );
        ensure!(
            client.start_ns >= http.start_ns && client.end_ns <= http.end_ns,
            "invocation not within the dispatch request:\n  {}\n  {}",
            client.summary(),
            http.summary()
        );
    }
    Ok(())
}
