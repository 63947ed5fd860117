//! End-to-end: the agent traces HTTP/1.1 served by Flask on gunicorn (sync workers) and the
//! requests those workers send, and exports spans to an in-test OTLP receiver.
//!
//! Needs root and the release agent binary; see the crate docs for the environment.
//! Every test starts its own agent, gunicorn and receiver on fresh ports; the tests of this
//! binary run one at a time (`difytrace_tests::e2e`).

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::*;
use difytrace_tests::agent::Agent;
use difytrace_tests::otlp_receiver::{OtlpReceiver, Transport, summarize};
use difytrace_tests::procs::{HttpConn, free_port, local};
use difytrace_tests::python::{DEMO_APP, Downstream, Gunicorn, GunicornOpts, check_flask_gunicorn};

/// Downstream service + gunicorn (2 sync workers) running the demo app.
fn start_app(opts: GunicornOpts) -> Result<(Downstream, Gunicorn)> {
    check_flask_gunicorn()?;
    let down = Downstream::start()?;
    let g = Gunicorn::start(DEMO_APP, &opts.downstream(down.port()))?;
    Ok((down, g))
}

/// No span at all may come from `pid` (an unwatched process).
fn ensure_no_spans_from(
    spans: &[difytrace_tests::otlp_receiver::ReceivedSpan],
    pid: u32,
    what: &str,
) -> Result<()> {
    let bad: Vec<_> = spans
        .iter()
        .filter(|s| s.pid() == Some(pid))
        .cloned()
        .collect();
    ensure!(
        bad.is_empty(),
        "spans from {what} (pid {pid}), which is not selected:\n{}",
        summarize(&bad, 20)
    );
    Ok(())
}

/// The main scenario: gRPC export, gunicorn already running when the agent starts.
#[test]
fn grpc_server_and_client_spans() -> Result<()> {
    let Some(_e2e) = difytrace_tests::e2e("grpc_server_and_client_spans") else {
        return Ok(());
    };
    let (down, g) = start_app(GunicornOpts::default())?;
    let rx = OtlpReceiver::start()?;
    let agent = start_agent(&rx)?;

    let mut sent = vec![
        get(g.addr(), "/hello", &[])?,
        get(g.addr(), "/users/42", &[])?,
        get(g.addr(), "/chain", &[])?,
        get(g.addr(), "/fail", &[])?,
    ];
    for i in 0..4 {
        sent.push(get(g.addr(), &format!("/users/seq-{i}"), &[])?);
    }
    ensure!(
        sent[0].body == "hello" && sent[0].status == 200,
        "{:?}",
        sent[0]
    );
    ensure!(sent[2].body == "chain:downstream-ok", "{:?}", sent[2]);
    ensure!(sent[3].status == 500, "{:?}", sent[3]);
    let workers = g.worker_pids();
    for r in &sent {
        ensure!(
            workers.contains(&r.worker_pid),
            "{r:?} not from a worker {workers:?}"
        );
    }

    let spans = rx.wait_for(
        |s| all_served(s, &sent) && !clients_to(s, down.port()).is_empty(),
        SPAN_WAIT,
    )?;
    check_server_spans(&spans, &sent, "app", g.port())?;
    let chain = servers_for(&spans, &sent[2])[0];
    let client = client_of(&spans, chain, down.port())?;
    check_client_child(client, chain, down.port())?;
    ensure!(
        chain.parent_span_id.is_empty(),
        "/chain without traceparent should be a root span: {}",
        chain.summary()
    );

    // Stopping the agent flushes what it still holds: after that, nothing more can come.
    let status = agent.stop()?;
    ensure!(
        status.success(),
        "agent did not exit cleanly on SIGINT: {status}"
    );
    let spans = rx.spans();
    ensure_one_server_span_each(&spans, &sent)?;
    ensure!(
        clients_to(&spans, down.port()).len() == 1,
        "want exactly one CLIENT span to the downstream port:\n{}",
        summarize(&spans, 40)
    );
    ensure_no_spans_from(&spans, down.pid(), "the downstream python3 server")?;
    ensure!(
        rx.export_requests().1 == 0 && rx.errors().is_empty(),
        "receiver errors: {:?}",
        rx.errors()
    );
    ensure!(spans.iter().all(|s| s.transport == Transport::Grpc));
    Ok(())
}

/// An incoming W3C traceparent is honoured; secret header values never leave the host.
#[test]
fn traceparent_honored_and_secrets_not_exported() -> Result<()> {
    let Some(_e2e) = difytrace_tests::e2e("traceparent_honored_and_secrets_not_exported") else {
        return Ok(());
    };
    let (down, g) = start_app(GunicornOpts::default())?;
    let rx = OtlpReceiver::start()?;
    let _agent = start_agent(&rx)?;

    let trace_id = random_hex(32);
    let parent_id = random_hex(16);
    let traceparent = format!("00-{trace_id}-{parent_id}-01");
    let secrets = [
        format!("sk-auth-{}", random_hex(20)),
        format!("cookie-{}", random_hex(20)),
        format!("apikey-{}", random_hex(20)),
    ];
    let auth = format!("Bearer {}", secrets[0]);
    let cookie = format!("session={}", secrets[1]);
    let chain = get(
        g.addr(),
        "/chain",
        &[
            ("traceparent", &traceparent),
            ("Authorization", &auth),
            ("Cookie", &cookie),
            ("X-Api-Key", &secrets[2]),
        ],
    )?;
    ensure!(chain.status == 200, "{chain:?}");
    let hello = get(g.addr(), "/hello", &[("Authorization", &auth)])?;

    let spans = rx.wait_for(
        |s| {
            all_served(s, &[chain.clone(), hello.clone()]) && !clients_to(s, down.port()).is_empty()
        },
        SPAN_WAIT,
    )?;
    let server = servers_for(&spans, &chain)[0];
    check_server_span(server, &chain, "app", g.port())?;
    ensure!(
        server.trace_id == trace_id && server.parent_span_id == parent_id,
        "SERVER span should continue traceparent {traceparent}: {}",
        server.summary()
    );
    let client = client_of(&spans, server, down.port())?;
    check_client_child(client, server, down.port())?;
    ensure!(client.trace_id == trace_id);
    let h = servers_for(&spans, &hello)[0];
    ensure!(
        h.trace_id != trace_id,
        "/hello got the traceparent of another request: {}",
        h.summary()
    );

    for secret in &secrets {
        let leaks: Vec<_> = spans
            .iter()
            .filter(|s| s.mentions(secret))
            .cloned()
            .collect();
        ensure!(
            leaks.is_empty(),
            "secret {secret:?} exported:\n{}",
            summarize(&leaks, 10)
        );
    }
    Ok(())
}

/// OTLP over HTTP/protobuf; the agent is started before gunicorn (selection at exec).
#[test]
fn http_protobuf_export_and_exec_time_selection() -> Result<()> {
    let Some(_e2e) = difytrace_tests::e2e("http_protobuf_export_and_exec_time_selection") else {
        return Ok(());
    };
    check_flask_gunicorn()?;
    let rx = OtlpReceiver::start()?;
    let mut agent = Agent::start(&[
        "--comm",
        "gunicorn",
        "--otlp-protocol",
        "http/protobuf",
        "--otlp-endpoint",
        &rx.http_endpoint(),
    ])?;
    let (down, g) = start_app(GunicornOpts::default())?;
    let sent = vec![
        get(g.addr(), "/hello", &[])?,
        get(g.addr(), "/users/7", &[])?,
        get(g.addr(), "/chain", &[])?,
    ];
    let spans = rx.wait_for(
        |s| all_served(s, &sent) && !clients_to(s, down.port()).is_empty(),
        SPAN_WAIT,
    )?;
    check_server_spans(&spans, &sent, "app", g.port())?;
    let chain = servers_for(&spans, &sent[2])[0];
    check_client_child(client_of(&spans, chain, down.port())?, chain, down.port())?;
    ensure!(spans.iter().all(|s| s.transport == Transport::Http));
    ensure!(rx.export_requests().0 == 0, "unexpected gRPC exports");
    ensure!(rx.errors().is_empty(), "receiver errors: {:?}", rx.errors());
    agent.ensure_running()?;
    Ok(())
}

/// Several requests on one kept-alive connection (gthread workers keep connections open;
/// sync workers close after every response).
#[test]
fn keep_alive_requests_on_one_connection() -> Result<()> {
    let Some(_e2e) = difytrace_tests::e2e("keep_alive_requests_on_one_connection") else {
        return Ok(());
    };
    let (_down, g) = start_app(GunicornOpts {
        worker_class: "gthread".into(),
        threads: Some(2),
        ..Default::default()
    })?;
    let rx = OtlpReceiver::start()?;
    let _agent = start_agent(&rx)?;

    let mut conn = HttpConn::connect(g.addr())?;
    let mut sent = Vec::new();
    for i in 0..6 {
        let path = if i == 3 {
            "/fail".to_string()
        } else {
            format!("/users/ka-{i}")
        };
        let r = conn.get(&path, &[("Connection", "keep-alive")])?;
        sent.push(Sent::from_response("GET", &path, g.port(), &r)?);
    }
    ensure!(
        !conn.is_closed() && conn.sent == 6,
        "gunicorn closed the kept-alive connection"
    );
    let spans = rx.wait_for(|s| all_served(s, &sent), SPAN_WAIT)?;
    let mut prev_end = 0;
    for r in &sent {
        let s = servers_for(&spans, r)[0];
        check_server_span(s, r, "app", g.port())
            .with_context(|| format!("{} {}", r.method, r.path))?;
        ensure!(
            s.start_ns >= prev_end,
            "requests on one connection overlap: {}",
            s.summary()
        );
        prev_end = s.end_ns;
    }
    ensure_one_server_span_each(&spans, &sent)?;
    Ok(())
}

/// Without an OTLP endpoint the agent prints one line per span on stdout.
#[test]
fn console_mode_prints_spans() -> Result<()> {
    let Some(_e2e) = difytrace_tests::e2e("console_mode_prints_spans") else {
        return Ok(());
    };
    let (_down, g) = start_app(GunicornOpts::default())?;
    let mut agent = Agent::start(&["--comm", "gunicorn"])?;
    let r = get(g.addr(), "/hello", &[])?;
    ensure!(r.status == 200);
    let line_ok = |l: &str| {
        ["SERVER", "GET", "/hello", "200"]
            .iter()
            .all(|w| l.contains(w))
    };
    agent
        .wait_stdout(|out| out.lines().any(line_ok), SPAN_WAIT)
        .context("no stdout line with SERVER, GET, /hello and 200")?;
    // A finished trace is also printed as a tree: the root, then its CLIENT hop indented.
    ensure!(get(g.addr(), "/chain", &[])?.status == 200);
    let tree = |out: &str| {
        let lines: Vec<&str> = out.lines().collect();
        lines.windows(3).any(|w| {
            w[0].starts_with("trace ")
                && w[1].starts_with("  SERVER app GET /chain 200")
                && w[2].starts_with("    CLIENT app GET /downstream/data 200")
                && w[1..]
                    .iter()
                    .all(|l| l.contains(" +") && l.contains(" self "))
        })
    };
    agent
        .wait_stdout(tree, SPAN_WAIT)
        .context("no trace tree for /chain on stdout")?;
    Ok(())
}

/// `--pid <gunicorn master>`: workers forked before the agent started and workers forked
/// later (recycled by --max-requests) are traced; another gunicorn is not.
#[test]
fn pid_selection_follows_forked_and_recycled_workers() -> Result<()> {
    let Some(_e2e) = difytrace_tests::e2e("pid_selection_follows_forked_and_recycled_workers")
    else {
        return Ok(());
    };
    let (_down, g) = start_app(GunicornOpts {
        max_requests: Some(3),
        ..Default::default()
    })?;
    let (_down2, other) = start_app(GunicornOpts::default())?;
    let initial: BTreeSet<u32> = g.worker_pids().into_iter().collect();
    let rx = OtlpReceiver::start()?;
    let mut agent = Agent::start(&[
        "--pid",
        &g.master_pid().to_string(),
        "--otlp-endpoint",
        &rx.grpc_endpoint(),
    ])?;

    let mut sent = Vec::new();
    for i in 0..14 {
        sent.push(get(g.addr(), &format!("/users/pid-{i}"), &[])?);
    }
    let other_sent = vec![
        get(other.addr(), "/users/other-0", &[])?,
        get(other.addr(), "/users/other-1", &[])?,
    ];
    let served_by: BTreeSet<u32> = sent.iter().map(|r| r.worker_pid).collect();
    let recycled: BTreeSet<u32> = served_by.difference(&initial).copied().collect();
    ensure!(
        !recycled.is_empty(),
        "no request was served by a worker forked after the agent started (initial {initial:?}, served by {served_by:?}); is --max-requests working?"
    );
    ensure!(
        served_by.iter().any(|p| initial.contains(p)),
        "no request was served by a worker that existed before the agent"
    );

    let spans = rx.wait_for(|s| all_served(s, &sent), SPAN_WAIT)?;
    for r in &sent {
        check_server_span(servers_for(&spans, r)[0], r, "app", g.port()).with_context(|| {
            format!(
                "{} {} (worker {}, new: {})",
                r.method,
                r.path,
                r.worker_pid,
                recycled.contains(&r.worker_pid)
            )
        })?;
    }
    agent.ensure_running()?;
    drop(agent); // flushes
    let spans = rx.spans();
    ensure_one_server_span_each(&spans, &sent)?;
    for r in &other_sent {
        ensure!(
            servers_with_path(&spans, &r.path).is_empty(),
            "span for {} served by the other gunicorn (pid {}), which is not selected",
            r.path,
            r.worker_pid
        );
    }
    ensure_no_spans_from(&spans, other.master_pid(), "the other gunicorn's master")?;
    Ok(())
}

/// The OTLP endpoint is down when the agent starts; once it is up, spans arrive and the
/// agent has kept running.
#[test]
fn endpoint_down_at_start_then_recovers() -> Result<()> {
    let Some(_e2e) = difytrace_tests::e2e("endpoint_down_at_start_then_recovers") else {
        return Ok(());
    };
    let (_down, g) = start_app(GunicornOpts::default())?;
    let port = free_port();
    let mut agent = Agent::start(&[
        "--comm",
        "gunicorn",
        "--otlp-endpoint",
        &format!("http://127.0.0.1:{port}"),
    ])?;
    for i in 0..4 {
        get(g.addr(), &format!("/users/early-{i}"), &[])?;
    }
    // Give the exporter time to try (and fail) at least once.
    std::thread::sleep(Duration::from_secs(8));
    agent.ensure_running()?;

    let rx = OtlpReceiver::start_on(local(port), local(0))
        .with_context(|| format!("binding the receiver on the agent's endpoint port {port}"))?;
    let mut late = Vec::new();
    for i in 0..4 {
        late.push(get(g.addr(), &format!("/users/late-{i}"), &[])?);
    }
    let spans = rx
        .wait_for(|s| all_served(s, &late), SPAN_WAIT)
        .map_err(|e| agent.annotate(e))?;
    for r in &late {
        check_server_span(servers_for(&spans, r)[0], r, "app", g.port())?;
    }
    agent.ensure_running()?;
    Ok(())
}

/// service.name comes from gunicorn's command line: `--name`, else the app module, also
/// when a boolean option stands right before the app argument.
#[test]
fn service_name_from_gunicorn_cmdline() -> Result<()> {
    let Some(_e2e) = difytrace_tests::e2e("service_name_from_gunicorn_cmdline") else {
        return Ok(());
    };
    let (_d1, named) = start_app(GunicornOpts {
        name: Some("billing".into()),
        ..Default::default()
    })?;
    // Boolean options (no value) just before `shop:app`.
    let mut flags = vec!["--preload".to_string()];
    if difytrace_tests::python::gunicorn_has_flag("--no-control-socket") {
        flags.push("--no-control-socket".into());
    }
    let (_d2, shop) = start_app(GunicornOpts {
        app: "shop:app".into(),
        extra_args: flags.clone(),
        ..Default::default()
    })?;
    let rx = OtlpReceiver::start()?;
    let _agent = start_agent(&rx)?;
    let a = get(named.addr(), "/users/named", &[])?;
    let b = get(shop.addr(), "/users/shop", &[])?;
    let spans = rx.wait_for(|s| all_served(s, &[a.clone(), b.clone()]), SPAN_WAIT)?;
    check_server_span(servers_for(&spans, &a)[0], &a, "billing", named.port())
        .context("gunicorn --name billing ... app:app")?;
    check_server_span(servers_for(&spans, &b)[0], &b, "shop", shop.port())
        .with_context(|| format!("gunicorn ... {} shop:app", flags.join(" ")))?;
    Ok(())
}
