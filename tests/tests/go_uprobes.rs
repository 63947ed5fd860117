//! End-to-end: Go uprobes on a plugin-daemon-shaped gin server (`tests/fixtures/godaemon`).
//!
//! The daemon (comm `godaemon`) serves gin's `POST /plugin/:tenant_id/dispatch/tool/invoke`
//! and calls `GET /tool/<tenant>` on the tool server (comm `gotool`) from a *new goroutine*,
//! through a shared keep-alive `http.Client`. From syscalls alone the outbound call cannot be
//! tied to the request: Go multiplexes goroutines over a few threads, and the client's bytes
//! are written by the transport's own goroutines. With uprobes the agent must give, for every
//! tenant `t-i`:
//! - a SERVER span in the daemon: `url.path` `/plugin/t-i/dispatch/tool/invoke`, method POST,
//!   status 200, `http.route` `/plugin/:tenant_id/dispatch/tool/invoke`, named
//!   `POST /plugin/:tenant_id/dispatch/tool/invoke`; with `--go-handler-returns` also the
//!   handler's duration from the RET uprobes (`difytrace.handler.duration_ns`) inside the
//!   span, and without it no such attribute (the route then comes from the handler
//!   goroutine's next syscall, not from a RET probe);
//! - a CLIENT span in the daemon, `url.path` `/tool/t-i`, child of that SERVER span (same
//!   trace) and within its time range;
//! - a SERVER span in the tool, `url.path` `/tool/t-i`, child of that CLIENT span;
//!
//! for Go 1.26 and Go 1.21 binaries, with and without symbol tables, and for 100 concurrent
//! requests without one tenant's call landing under another's request. The agent reports
//! how many Go binaries got uprobes in its `go_binaries` stats counter.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use difytrace_tests::agent::Agent;
use difytrace_tests::goapp::{
    self, DAEMON_COMM, GoApp, GoDaemon, GoTool, GoVariant, Invocation, ROUTE, TOOL_COMM,
    invoke_concurrent, invoke_path, invoke_sequential, tool_path,
};
use difytrace_tests::otlp_receiver::{OtlpReceiver, ReceivedSpan, summarize};

/// How long spans may take to reach the receiver (agent batching included).
const SPAN_WAIT: Duration = Duration::from_secs(60);
/// Longest the agent may take to attach its uprobes to a new binary.
const ATTACH_WAIT: Duration = Duration::from_secs(20);
/// Problems of one kind listed in a failure message at most.
const MAX_PROBLEMS_PER_KIND: usize = 12;

/// Tests of this binary run one at a time, the fixture-only one included (an agent started
/// by another test would trace its processes too).
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn prerequisites(test: &str) -> Result<Option<(difytrace_tests::E2e, GoApp)>> {
    let Some(e2e) = difytrace_tests::e2e(test) else {
        return Ok(None);
    };
    let missing = goapp::tools_missing();
    if !missing.is_empty() {
        return Ok(difytrace_tests::prerequisite_missing(test, &missing));
    }
    Ok(Some((e2e, GoApp::prepare()?)))
}

// ---------------------------------------------------------------------------------------
// what is expected

/// One run of requests against one variant.
struct Expect<'a> {
    variant: &'a GoVariant,
    daemon_pid: u32,
    tool_pid: u32,
    tenants: Vec<String>,
    /// The agent ran with `--go-handler-returns`.
    handler_returns: bool,
}

fn path_spans<'s>(
    spans: &'s [ReceivedSpan],
    pid: u32,
    server: bool,
    path: &str,
) -> Vec<&'s ReceivedSpan> {
    spans
        .iter()
        .filter(|s| {
            s.pid() == Some(pid)
                && if server { s.is_server() } else { s.is_client() }
                && s.attr_str("url.path").as_deref() == Some(path)
        })
        .collect()
}

impl Expect<'_> {
    fn daemon_servers<'s>(&self, spans: &'s [ReceivedSpan], t: &str) -> Vec<&'s ReceivedSpan> {
        path_spans(spans, self.daemon_pid, true, &invoke_path(t))
    }

    fn daemon_clients<'s>(&self, spans: &'s [ReceivedSpan], t: &str) -> Vec<&'s ReceivedSpan> {
        path_spans(spans, self.daemon_pid, false, &tool_path(t))
    }

    fn tool_servers<'s>(&self, spans: &'s [ReceivedSpan], t: &str) -> Vec<&'s ReceivedSpan> {
        path_spans(spans, self.tool_pid, true, &tool_path(t))
    }

    /// Every tenant has its three spans (maybe wrong ones): time to check.
    fn all_present(&self, spans: &[ReceivedSpan]) -> bool {
        self.tenants.iter().all(|t| {
            !self.daemon_servers(spans, t).is_empty()
                && !self.daemon_clients(spans, t).is_empty()
                && !self.tool_servers(spans, t).is_empty()
        })
    }

    /// The tenant of a daemon SERVER span, from its `url.path`.
    fn tenant_of_server(&self, s: &ReceivedSpan) -> Option<String> {
        if s.pid() != Some(self.daemon_pid) || !s.is_server() {
            return None;
        }
        let path = s.attr_str("url.path")?;
        let rest = path.strip_prefix("/plugin/")?;
        let (tenant, tail) = rest.split_once('/')?;
        (tail == "dispatch/tool/invoke").then(|| tenant.to_string())
    }

    /// What a span's parent is, in words.
    fn describe_parent(&self, spans: &[ReceivedSpan], child: &ReceivedSpan) -> String {
        if child.parent_span_id.is_empty() {
            return "no parent (a root span)".to_string();
        }
        match spans.iter().find(|s| s.span_id == child.parent_span_id) {
            Some(p) => match self.tenant_of_server(p) {
                Some(t) => format!("the daemon SERVER span of {t} ({})", p.span_id),
                None => format!("another span: {}", p.summary()),
            },
            None => format!(
                "span {} (not among the {} received spans)",
                child.parent_span_id,
                spans.len()
            ),
        }
    }

    /// Spans of the daemon and tool processes only.
    fn own_spans(&self, spans: &[ReceivedSpan]) -> Vec<ReceivedSpan> {
        let mut own: Vec<ReceivedSpan> = spans
            .iter()
            .filter(|s| s.pid() == Some(self.daemon_pid) || s.pid() == Some(self.tool_pid))
            .cloned()
            .collect();
        own.sort_by_key(|s| s.start_ns);
        own
    }
}

/// Kinds of problem, in the order a failure message lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Problem {
    Missing,
    Duplicated,
    ClientParent,
    ClientOutside,
    ToolParent,
    ServerAttrs,
}

impl Problem {
    fn title(self) -> &'static str {
        match self {
            Problem::Missing => "missing spans",
            Problem::Duplicated => "duplicate spans",
            Problem::ClientParent => "daemon CLIENT spans with a wrong parent",
            Problem::ClientOutside => "daemon CLIENT spans outside their SERVER span",
            Problem::ToolParent => "tool SERVER spans not children of their CLIENT span",
            Problem::ServerAttrs => {
                "daemon SERVER spans with a wrong route, name, method or status"
            }
        }
    }
}

/// What [`check`] found.
#[derive(Default)]
struct Report {
    problems: Vec<(Problem, String)>,
    /// Tenants lacking one of their three spans.
    missing: usize,
    /// Tenants with more than one span of a kind.
    duplicated: usize,
    /// Daemon SERVER spans with a wrong route, name, method or status.
    server_attrs_wrong: usize,
    /// CLIENT spans whose parent is not their tenant's SERVER span...
    client_parent_wrong: usize,
    /// ... of which with no parent at all,
    client_parent_root: usize,
    /// ... of which under another tenant's SERVER span,
    client_parent_other_tenant: usize,
    /// ... of which under something else.
    client_parent_other: usize,
    /// CLIENT spans outside their SERVER span's time range.
    client_outside: usize,
    /// Tool SERVER spans that are not children of their CLIENT span.
    tool_parent_wrong: usize,
}

impl Report {
    fn headline(&self, exp: &Expect) -> String {
        format!(
            "variant {} ({}, daemon pid {}, tool pid {}), {} requests: {} tenants missing a span, \
             {} with duplicate spans, {} daemon SERVER spans with wrong route/name/method/status, \
             {} CLIENT spans with a wrong parent ({} root, {} under another tenant's SERVER span, \
             {} other), {} CLIENT spans outside their SERVER span, {} tool SERVER spans not \
             children of their CLIENT span",
            exp.variant.name,
            exp.variant.go_version,
            exp.daemon_pid,
            exp.tool_pid,
            exp.tenants.len(),
            self.missing,
            self.duplicated,
            self.server_attrs_wrong,
            self.client_parent_wrong,
            self.client_parent_root,
            self.client_parent_other_tenant,
            self.client_parent_other,
            self.client_outside,
            self.tool_parent_wrong,
        )
    }
}

/// Checks the three spans of every tenant; collects every problem.
fn check(spans: &[ReceivedSpan], exp: &Expect) -> Report {
    let mut r = Report::default();
    // Dify dispatch routes are named by kind and action (docs/genai.md); the gin route
    // template is still checked in http.route.
    let want_name = "dispatch tool/invoke".to_string();
    for t in &exp.tenants {
        let servers = exp.daemon_servers(spans, t);
        let clients = exp.daemon_clients(spans, t);
        let tools = exp.tool_servers(spans, t);
        let mut missing = Vec::new();
        for (what, found) in [
            ("daemon SERVER", &servers),
            ("daemon CLIENT", &clients),
            ("tool SERVER", &tools),
        ] {
            match found.len() {
                0 => missing.push(what),
                1 => {}
                n => {
                    r.duplicated += 1;
                    r.problems.push((
                        Problem::Duplicated,
                        format!(
                            "{t}: {n} {what} spans (want 1):\n{}",
                            found
                                .iter()
                                .map(|s| format!("    {}", s.summary()))
                                .collect::<Vec<_>>()
                                .join("\n")
                        ),
                    ));
                }
            }
        }
        if !missing.is_empty() {
            r.missing += 1;
            r.problems.push((
                Problem::Missing,
                format!("{t}: no {} span", missing.join(", no ")),
            ));
        }

        if let Some(server) = servers.first() {
            let mut wrong = Vec::new();
            if server.attr_str("http.route").as_deref() != Some(ROUTE) {
                wrong.push(format!("http.route={:?}", server.attr_str("http.route")));
            }
            if server.name != want_name {
                wrong.push(format!("name={:?}", server.name));
            }
            if server.attr_str("http.request.method").as_deref() != Some("POST") {
                wrong.push(format!(
                    "http.request.method={:?}",
                    server.attr_str("http.request.method")
                ));
            }
            if server.attr_int("http.response.status_code") != Some(200) {
                wrong.push(format!(
                    "http.response.status_code={:?} (want the integer 200)",
                    server.attr("http.response.status_code")
                ));
            }
            // The handler's own run (ServeHTTP's entry to its return, from the RET uprobes)
            // lies inside the span the wire gives. Without the RET probes there is none.
            let wire_ns = server.end_ns.saturating_sub(server.start_ns);
            match server.attr_int("difytrace.handler.duration_ns") {
                Some(ns) if exp.handler_returns && ns > 0 && (ns as u64) <= wire_ns => {}
                None if !exp.handler_returns => {}
                other => wrong.push(format!(
                    "difytrace.handler.duration_ns={other:?} (want {})",
                    if exp.handler_returns {
                        format!("0 < it <= the span's {wire_ns} ns")
                    } else {
                        "none: no --go-handler-returns".to_string()
                    }
                )),
            }
            if !wrong.is_empty() {
                r.server_attrs_wrong += 1;
                r.problems.push((
                    Problem::ServerAttrs,
                    format!(
                        "{t}: daemon SERVER span {} {:?} has {} (want route {ROUTE:?}, name {want_name:?}, POST, 200)",
                        server.span_id,
                        server.name,
                        wrong.join(", "),
                    ),
                ));
            }
        }

        if let (Some(server), Some(client)) = (servers.first(), clients.first()) {
            if client.parent_span_id != server.span_id || client.trace_id != server.trace_id {
                r.client_parent_wrong += 1;
                let parent = spans.iter().find(|s| s.span_id == client.parent_span_id);
                if client.parent_span_id.is_empty() {
                    r.client_parent_root += 1;
                } else if parent.is_some_and(|p| exp.tenant_of_server(p).is_some()) {
                    r.client_parent_other_tenant += 1;
                } else {
                    r.client_parent_other += 1;
                }
                r.problems.push((
                    Problem::ClientParent,
                    format!(
                        "{t}: CLIENT span {} (trace {}) has as parent {}; want the SERVER span of {t}, {} (trace {})",
                        client.span_id,
                        client.trace_id,
                        exp.describe_parent(spans, client),
                        server.span_id,
                        server.trace_id
                    ),
                ));
            }
            if client.start_ns < server.start_ns || client.end_ns > server.end_ns {
                r.client_outside += 1;
                r.problems.push((
                    Problem::ClientOutside,
                    format!(
                        "{t}: CLIENT span [{}, {}] not within its SERVER span [{}, {}] \
                     (starts {:+} ns, ends {:+} ns relative)",
                        client.start_ns,
                        client.end_ns,
                        server.start_ns,
                        server.end_ns,
                        client.start_ns as i128 - server.start_ns as i128,
                        client.end_ns as i128 - server.end_ns as i128,
                    ),
                ));
            }
        }

        if let (Some(client), Some(tool)) = (clients.first(), tools.first())
            && (tool.parent_span_id != client.span_id || tool.trace_id != client.trace_id)
        {
            r.tool_parent_wrong += 1;
            r.problems.push((Problem::ToolParent, format!(
                "{t}: tool SERVER span {} (trace {}) has as parent {}; want the CLIENT span {} (trace {})",
                tool.span_id,
                tool.trace_id,
                exp.describe_parent(spans, tool),
                client.span_id,
                client.trace_id
            )));
        }
    }
    r.problems.sort_by_key(|(kind, _)| *kind);
    r
}

/// The problems grouped by kind, at most [`MAX_PROBLEMS_PER_KIND`] of each.
fn list_problems(r: &Report) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < r.problems.len() {
        let kind = r.problems[i].0;
        let of_kind: Vec<&String> = r.problems[i..]
            .iter()
            .take_while(|(k, _)| *k == kind)
            .map(|(_, p)| p)
            .collect();
        i += of_kind.len();
        out.push_str(&format!(
            "{} ({}{}):\n",
            kind.title(),
            of_kind.len(),
            if of_kind.len() > MAX_PROBLEMS_PER_KIND {
                format!(", first {MAX_PROBLEMS_PER_KIND} shown")
            } else {
                String::new()
            }
        ));
        for p in of_kind.iter().take(MAX_PROBLEMS_PER_KIND) {
            out.push_str("  ");
            out.push_str(p);
            out.push('\n');
        }
    }
    out
}

/// Counts of the received spans of the daemon and tool by (process, kind, route or path
/// shape), for failure messages.
fn span_counts(spans: &[ReceivedSpan], exp: &Expect) -> String {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for s in exp.own_spans(spans) {
        let who = if s.pid() == Some(exp.daemon_pid) {
            DAEMON_COMM
        } else {
            TOOL_COMM
        };
        let path = s.attr_str("url.path").unwrap_or_default();
        let shape = if path.starts_with("/plugin/") {
            "/plugin/*/dispatch/tool/invoke"
        } else if path.starts_with("/tool/") {
            "/tool/*"
        } else {
            path.as_str()
        };
        let parent = if s.parent_span_id.is_empty() {
            "root"
        } else {
            "child"
        };
        *counts
            .entry(format!("{who} {:?} {shape} {parent}", s.kind))
            .or_default() += 1;
    }
    counts
        .iter()
        .map(|(k, n)| format!("  {n:4}  {k}\n"))
        .collect()
}

/// Fails with a full account unless [`check`] found nothing.
fn ensure_clean(spans: &[ReceivedSpan], exp: &Expect) -> Result<()> {
    let r = check(spans, exp);
    if r.problems.is_empty() {
        return Ok(());
    }
    let own = exp.own_spans(spans);
    bail!(
        "{}\n\n{}\nspans of the daemon and tool by kind ({} of {} received):\n{}\nlast spans:\n{}",
        r.headline(exp),
        list_problems(&r),
        own.len(),
        spans.len(),
        span_counts(spans, exp),
        summarize(&own, 60),
    )
}

// ---------------------------------------------------------------------------------------
// one run

/// The agent watching `godaemon` and `gotool`, exporting to `rx`.
fn start_agent(rx: &OtlpReceiver, handler_returns: bool) -> Result<Agent> {
    let endpoint = rx.grpc_endpoint();
    let mut args = vec![
        "--comm",
        DAEMON_COMM,
        "--comm",
        TOOL_COMM,
        "--otlp-endpoint",
        &endpoint,
    ];
    if handler_returns {
        args.push("--go-handler-returns");
    }
    Agent::start(&args)
}

/// Receiver, agent, tool and daemon of `variant`; `n` requests (all at once when
/// `concurrent`); then every span checked and the agent's `go_binaries` counter. The error
/// carries the agent's stats and logs. `handler_returns`: run the agent with
/// `--go-handler-returns`.
fn run_variant(
    variant: &GoVariant,
    n: usize,
    concurrent: bool,
    handler_returns: bool,
) -> Result<()> {
    let rx = OtlpReceiver::start()?;
    let mut agent = start_agent(&rx, handler_returns)?;
    let tool = GoTool::start(variant)?;
    let daemon = GoDaemon::start(variant, tool.addr())?;
    // The agent reads each binary off its event loop and attaches a moment later; requests
    // before that would be linked by thread.
    let pids = [tool.pid(), daemon.pid()];
    agent
        .wait_stderr(
            |log| {
                pids.iter().all(|p| {
                    log.lines().any(|l| {
                        l.contains("Go uprobes attached") && l.contains(&format!("/proc/{p}/exe"))
                    })
                })
            },
            ATTACH_WAIT,
        )
        .with_context(|| format!("variant {}: uprobes never attached", variant.name))?;
    let sent = if concurrent {
        invoke_concurrent(daemon.addr(), n)
    } else {
        invoke_sequential(daemon.addr(), n)
    };
    let sent: Vec<Invocation> = match sent {
        Ok(s) => s,
        Err(e) => {
            return Err(agent.annotate(e.context(format!(
                "variant {}: the fixture itself failed\ndaemon:\n{}\ntool:\n{}",
                variant.name,
                daemon.logs(30),
                tool.logs(30)
            ))));
        }
    };
    let exp = Expect {
        variant,
        daemon_pid: daemon.pid(),
        tool_pid: tool.pid(),
        tenants: sent.iter().map(|i| i.tenant.clone()).collect(),
        handler_returns,
    };
    // Wait for every span; if some never come, check what came (the report says what is
    // missing).
    let (spans, waited) = match rx.wait_for(|s| exp.all_present(s), SPAN_WAIT) {
        Ok(s) => (s, None),
        Err(e) => (rx.spans(), Some(e)),
    };
    let checked = ensure_clean(&spans, &exp);
    let logs = agent.logs(120);
    let stats = agent.stop_with_stats();
    let stats_text = match &stats {
        Ok(s) => format!("{s:?}"),
        Err(e) => format!("unavailable: {e:#}"),
    };
    let go_binaries = stats
        .as_ref()
        .ok()
        .and_then(|s| s.get("go_binaries").copied());
    if let Err(e) = checked {
        let waited = waited
            .map(|w| {
                format!(
                    "\n(not every span arrived within {SPAN_WAIT:?}: {})",
                    first_line(&w.to_string())
                )
            })
            .unwrap_or_default();
        bail!(
            "{e:#}{waited}\n\nagent go_binaries: {go_binaries:?} (want >= 1)\nagent stats: {stats_text}\n\nagent logs:\n{logs}"
        );
    }
    ensure!(
        go_binaries >= Some(1),
        "variant {} ({}): spans right, but the agent's go_binaries counter is {go_binaries:?} \
         (want >= 1); stats: {stats_text}\n\nagent logs:\n{logs}",
        variant.name,
        variant.go_version
    );
    Ok(())
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// tests

#[test]
fn gin_route_and_goroutine_parent() -> Result<()> {
    let _serial = serial();
    let Some((_e2e, app)) = prerequisites("gin_route_and_goroutine_parent")? else {
        return Ok(());
    };
    run_variant(app.variant("go1.26")?, 10, false, false)
}

/// The same with the handlers' RET probes on: the spans also carry the handler's duration.
#[test]
fn handler_returns_give_handler_duration() -> Result<()> {
    let _serial = serial();
    let Some((_e2e, app)) = prerequisites("handler_returns_give_handler_duration")? else {
        return Ok(());
    };
    run_variant(app.variant("go1.26")?, 10, false, true)
}

#[test]
fn stripped_and_old_go_same_spans() -> Result<()> {
    let _serial = serial();
    let Some((_e2e, app)) = prerequisites("stripped_and_old_go_same_spans")? else {
        return Ok(());
    };
    // Every variant, each with its own agent; all reported together.
    let mut failed = Vec::new();
    let mut passed = Vec::new();
    for v in &app.variants {
        match run_variant(v, 5, false, false) {
            Ok(()) => passed.push(format!("{} ({})", v.name, v.go_version)),
            Err(e) => failed.push(format!("=== {} ({}) ===\n{e:#}", v.name, v.go_version)),
        }
    }
    ensure!(
        failed.is_empty(),
        "{} of {} variants failed (passed: {passed:?}):\n\n{}",
        failed.len(),
        app.variants.len(),
        failed.join("\n\n")
    );
    Ok(())
}

#[test]
fn hundred_concurrent_requests_no_cross_talk() -> Result<()> {
    let _serial = serial();
    let Some((_e2e, app)) = prerequisites("hundred_concurrent_requests_no_cross_talk")? else {
        return Ok(());
    };
    run_variant(app.variant("go1.26")?, 100, true, false)
}

/// No agent, no root: every variant builds, reports its Go version, and the daemon and tool
/// answer concurrent requests right.
#[test]
fn fixture_variants_build_and_answer() -> Result<()> {
    let _serial = serial();
    let missing = goapp::tools_missing();
    if !missing.is_empty() {
        let _: Option<()> =
            difytrace_tests::prerequisite_missing("fixture_variants_build_and_answer", &missing);
        return Ok(());
    }
    let app = GoApp::prepare()?;
    ensure!(app.variants.len() == 4, "{:?}", app.variants);
    for v in &app.variants {
        let version_ok = if v.name.starts_with("go1.21") {
            v.go_version == goapp::OLD_TOOLCHAIN
        } else {
            v.go_version.starts_with("go1.")
        };
        ensure!(
            version_ok && v.daemon_bin.is_file() && v.tool_bin.is_file(),
            "variant {v:?}"
        );
        let tool = GoTool::start(v)?;
        let daemon = GoDaemon::start(v, tool.addr())?;
        ensure!(daemon.health()?.status == 200, "GET /health");
        let sent = invoke_concurrent(daemon.addr(), 20)?;
        ensure!(sent.len() == 20 && sent[19].tenant == "t-19", "{sent:?}");
        let _ = invoke_sequential(daemon.addr(), 3)?;
    }
    Ok(())
}
