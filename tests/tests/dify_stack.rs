//! End-to-end: the trace of every request through a whole Dify-shaped stack of real processes
//! on loopback (harness `tests/src/difystack.rs`, fixtures `tests/fixtures/difystack`):
//! Debian's nginx in front of a Flask api on gunicorn with gevent workers, a Go sandbox that
//! runs code in a python child, the Go plugin-daemon stand-in with a real `dify_plugin` plugin
//! on stdin/stdout, a Go tool service the plugin calls, and the plugin's backwards invocation
//! that the daemon forwards to the api's inner API.
//!
//! The agent watches the stack by comm (`nginx`, `gunicorn`, `difysandbox`, `plugindaemon`,
//! `difytool`; the plugin and the sandbox's python children as their children) and exports to
//! the in-test OTLP receiver. 200 chat requests go through nginx, 20 in flight; every one must
//! be answered right, then its trace must be exactly this tree (span keys in brackets):
//!
//! ```text
//! nginx SERVER POST /v1/chat-messages                          [nginx.server] root, dify.conversation_id
//! └ nginx CLIENT POST /v1/chat-messages                        [nginx.client]
//!   └ api SERVER POST /v1/chat-messages                        [api.server]
//!     ├ api CLIENT POST /v1/sandbox/run                        [api.sandbox]
//!     │ └ sandbox SERVER POST /v1/sandbox/run                  [sandbox.server]
//!     └ api CLIENT POST /plugin/<tenant>/dispatch/tool/invoke  [api.dispatch]
//!       └ daemon SERVER POST /plugin/<tenant>/dispatch/...     [daemon.server]
//!         └ daemon CLIENT "plugin invoke_tool"                 [daemon.invoke]
//!           └ plugin SERVER "plugin invoke_tool"               [plugin.invoke]
//!             ├ plugin CLIENT GET /tool/<i>                    [plugin.get]
//!             │ └ tool SERVER GET /tool/<i>                    [tool.server]
//!             └ plugin CLIENT "plugin backwards_invoke tool"   [plugin.backwards]
//!               └ daemon CLIENT POST /inner/api/invoke/tool    [daemon.inner] (or under plugin.invoke)
//!                 └ api SERVER POST /inner/api/invoke/tool     [api.inner] links to the daemon's traceparent
//! ```
//!
//! one trace per request with no span of another request in it, the expected service names,
//! every child within its parent's time range (1 ms slack), and no secret in any span.
//!
//! The stack runs once for all the tests of this file but the Jaeger one (a shared run); each
//! test checks one aspect of every request's tree, so that what already works shows as
//! passing. A failing test prints a table of its problems over all requests, the expected
//! tree, and the received trace of a few failing requests as an indented tree (kind, service,
//! name, ids, parent, timing; `<= [key]` marks the span that matched an expected node, `#n`
//! the request numbers a span carries).
//!
//! Needs root, the agent binary, nginx, go, python3 with venv/pip (the plugin's venv comes
//! from PyPI on the first run) and the test venv with flask, gunicorn, gevent and httpx; the
//! Jaeger test also a Jaeger binary.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use difytrace_tests::agent::Agent;
use difytrace_tests::difystack::{
    COMMS, ChatOutcome, Component, DifyStack, Expected, Hop, Numbering, Problem, ProblemKind,
    RequestIds, SECRETS, Served, SpanIndex, SpanView, StackFixtures, TreeCheck, check_outcomes,
    check_tree, drive, expected_tree, problem_table, render_expected, render_request,
    tools_missing,
};
use difytrace_tests::jaeger::{Jaeger, require_jaeger};
use difytrace_tests::nginx::require_nginx;
use difytrace_tests::otlp_receiver::OtlpReceiver;

/// Requests of the shared run, and how many are in flight at once.
const REQUESTS: usize = 200;
const IN_FLIGHT: usize = 20;
/// Requests of the Jaeger run (all in flight at once); the middle one is fetched.
const JAEGER_REQUESTS: usize = 5;
/// Longest the agent may take to attach its uprobes to a new Go binary.
const ATTACH_WAIT: Duration = Duration::from_secs(30);
/// Longest wait for spans after the load, and how long without a new span ends it early.
const SPAN_WAIT: Duration = Duration::from_secs(60);
const SPAN_QUIET: Duration = Duration::from_secs(5);
/// Failing requests whose trace a failure message prints.
const TREES_SHOWN: usize = 3;

fn services() -> BTreeMap<Component, String> {
    Component::ALL.iter().map(|c| (*c, c.service())).collect()
}

/// Checks root, the agent binary and the stack's tools; `None` when the test is skipped.
fn prerequisites(test: &str) -> Option<difytrace_tests::E2e> {
    let e2e = difytrace_tests::e2e(test)?;
    require_nginx(test)?;
    let missing = tools_missing();
    if !missing.is_empty() {
        return difytrace_tests::prerequisite_missing(test, &missing);
    }
    Some(e2e)
}

/// The agent selecting exactly the stack's processes, exporting over OTLP/gRPC to `endpoint`.
fn start_agent(endpoint: &str) -> Result<Agent> {
    let mut args: Vec<&str> = Vec::new();
    for c in COMMS {
        args.extend(["--comm", c]);
    }
    args.extend(["--otlp-endpoint", endpoint]);
    Agent::start(&args)
}

/// Waits until the agent attached its uprobes to every Go process of the stack: requests
/// before that would be linked by thread, not goroutine.
fn wait_uprobes(agent: &mut Agent, stack: &DifyStack) -> Result<()> {
    let pids = stack.go_pids();
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
        .with_context(|| {
            format!("uprobes never attached to the stack's Go processes {pids:?} (sandbox, tool, daemon)")
        })
}

// ---------------------------------------------------------------------------------------
// the shared run

struct StackRun {
    outcomes: Vec<ChatOutcome>,
    served: Vec<Served>,
    index: SpanIndex,
    checks: Vec<TreeCheck>,
    expected: Vec<Vec<Expected>>,
    /// Every expected span was received before the wait ended.
    complete: bool,
    context: String,
}

enum Shared {
    Skipped,
    Failed(String),
    Ran(Box<StackRun>),
}

static RUN: OnceLock<Shared> = OnceLock::new();

/// The shared run, made by the first test that asks (holding the end-to-end lock while it
/// runs).
fn shared() -> &'static Shared {
    RUN.get_or_init(|| {
        let Some(_e2e) = prerequisites("dify_stack") else {
            return Shared::Skipped;
        };
        match run_stack() {
            Ok(r) => Shared::Ran(Box::new(r)),
            Err(e) => Shared::Failed(format!("{e:#}")),
        }
    })
}

fn run_stack() -> Result<StackRun> {
    let fx = StackFixtures::prepare()?;
    let rx = OtlpReceiver::start()?;
    let mut agent = start_agent(&rx.grpc_endpoint())?;
    let stack = DifyStack::start(&fx).map_err(|e| agent.annotate(e))?;
    wait_uprobes(&mut agent, &stack).map_err(|e| agent.annotate(e))?;
    let pids = stack.pids();

    let started = Instant::now();
    let outcomes = drive(stack.addr(), 0..REQUESTS, IN_FLIGHT);
    let load_time = started.elapsed();
    let served = stack.served();
    let numbering = Numbering::new(&served, &outcomes);
    let services = services();
    let expected: Vec<Vec<Expected>> = (0..REQUESTS)
        .map(|i| {
            expected_tree(
                &RequestIds::new(i, outcomes.get(i), &served),
                &pids,
                &services,
            )
        })
        .collect();

    // Until every expected span is there, or no span came for SPAN_QUIET, or SPAN_WAIT.
    let wait_start = Instant::now();
    let (mut last_count, mut last_change) = (usize::MAX, Instant::now());
    let (index, complete) = loop {
        let spans: Vec<SpanView> = rx.spans().iter().map(SpanView::from_received).collect();
        let count = spans.len();
        let index = SpanIndex::new(spans, |s| numbering.numbers(s));
        let complete = expected.iter().enumerate().all(|(i, tree)| {
            let candidates = index.with_number(i);
            tree.iter()
                .all(|e| candidates.iter().any(|&k| e.matches(&index.spans[k])))
        });
        if count != last_count {
            (last_count, last_change) = (count, Instant::now());
        }
        if complete || last_change.elapsed() >= SPAN_QUIET || wait_start.elapsed() >= SPAN_WAIT {
            break (index, complete);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let span_wait = wait_start.elapsed();
    let checks: Vec<TreeCheck> = expected
        .iter()
        .enumerate()
        .map(|(i, tree)| check_tree(&index, tree, i, &SECRETS))
        .collect();

    let logs = agent.logs(80);
    let args = agent.args().to_vec();
    let stats = match agent.stop_with_stats() {
        Ok(s) => format!("{s:?}"),
        Err(e) => format!("unavailable: {e:#}"),
    };
    let mut context = String::new();
    let _ = writeln!(
        context,
        "run: {REQUESTS} requests, {IN_FLIGHT} in flight, load {load_time:?}; {} spans received, \
         span wait {span_wait:?} ({}); {} requests reported by the daemon",
        index.len(),
        if complete {
            "every expected span arrived"
        } else {
            "ended before every expected span arrived"
        },
        served.len()
    );
    // Spans of the stack's processes that belong to no request: junk, or spans whose marks
    // the agent lost (other processes the comms match, e.g. another test's gunicorn, are
    // left out).
    let stack_pids: Vec<u32> = pids.values().flatten().copied().collect();
    let mut unclaimed: BTreeMap<String, usize> = BTreeMap::new();
    for (k, s) in index.spans.iter().enumerate() {
        if index.numbers_of(k).is_empty() && s.pid.is_some_and(|p| stack_pids.contains(&p)) {
            *unclaimed
                .entry(format!("{} {} {:?}", s.kind, s.service, s.name))
                .or_default() += 1;
        }
    }
    let _ = writeln!(
        context,
        "spans of the stack's processes that carry no request number: {unclaimed:?}"
    );
    let _ = writeln!(context, "pids: {pids:?}");
    let _ = writeln!(context, "agent args: {args:?}");
    let _ = writeln!(context, "agent stats at exit: {stats}");
    let _ = writeln!(context, "agent log tail:\n{logs}");
    let _ = writeln!(context, "stack logs:\n{}", stack.logs(15));
    Ok(StackRun {
        outcomes,
        served,
        index,
        checks,
        expected,
        complete,
        context,
    })
}

/// Fails, with the problems of every request that `filter` keeps, unless there are none.
fn verdict(what: &str, filter: impl Fn(&Problem) -> bool) -> Result<()> {
    let run = match shared() {
        Shared::Skipped => return Ok(()),
        Shared::Failed(e) => bail!("the shared run of the stack failed: {e}"),
        Shared::Ran(r) => r,
    };
    let failing: Vec<&TreeCheck> = run
        .checks
        .iter()
        .filter(|c| c.problems.iter().any(&filter))
        .collect();
    if failing.is_empty() {
        println!(
            "{what}: all {} requests right ({} spans received)",
            run.checks.len(),
            run.index.len()
        );
        return Ok(());
    }
    let never = run
        .checks
        .iter()
        .flat_map(|c| &c.problems)
        .filter(|p| p.kind == ProblemKind::Missing)
        .count();
    let mut msg = format!(
        "{what}: {} of {} requests are wrong{}\n\nproblems (kind [expected span]: requests, one example):\n{}",
        failing.len(),
        run.checks.len(),
        if run.complete {
            String::new()
        } else {
            format!(" ({never} expected spans of the run never arrived)")
        },
        problem_table(&run.checks, &filter)
    );
    // The first failing requests, and the one with the most problems of this kind.
    let mut shown: Vec<&TreeCheck> = failing.iter().take(TREES_SHOWN - 1).copied().collect();
    if let Some(worst) = failing
        .iter()
        .max_by_key(|c| c.problems.iter().filter(|p| filter(p)).count())
        && !shown.iter().any(|c| c.number == worst.number)
    {
        shown.push(worst);
    }
    for c in shown {
        let _ = write!(
            msg,
            "\n--- request #{} (conversation {}): expected\n{}problems:\n",
            c.number,
            run.outcomes
                .get(c.number)
                .map(|o| o.conversation_id.as_str())
                .unwrap_or("?"),
            run.expected
                .get(c.number)
                .map(|e| render_expected(e))
                .unwrap_or_default()
        );
        for p in c.problems.iter().filter(|p| filter(p)) {
            let _ = writeln!(msg, "  - {:?}: {}", p.kind, p.detail);
        }
        let _ = write!(msg, "received:\n{}", render_request(&run.index, c));
    }
    let _ = write!(msg, "\n{}", run.context);
    bail!(msg)
}

// ---------------------------------------------------------------------------------------
// the aspects of the shared run

#[test]
fn every_request_through_the_stack_is_answered() -> Result<()> {
    let run = match shared() {
        Shared::Skipped => return Ok(()),
        Shared::Failed(e) => bail!("the shared run of the stack failed: {e}"),
        Shared::Ran(r) => r,
    };
    check_outcomes(&run.outcomes).with_context(|| run.context.clone())?;
    let mut numbers: Vec<usize> = run.served.iter().filter_map(|s| s.i).collect();
    numbers.sort_unstable();
    numbers.dedup();
    anyhow::ensure!(
        numbers == (0..REQUESTS).collect::<Vec<_>>()
            && run
                .served
                .iter()
                .all(|s| s.result == "end" && s.invokes == 1),
        "the daemon did not report one clean session with one backwards invocation per request: \
         {:?}\n{}",
        run.served,
        run.context
    );
    Ok(())
}

#[test]
fn every_span_is_exported_once_with_its_service() -> Result<()> {
    verdict(
        "each expected span exactly once, with its service.name",
        |p| {
            matches!(
                p.kind,
                ProblemKind::Missing | ProblemKind::Duplicate | ProblemKind::WrongService
            )
        },
    )
}

#[test]
fn cross_process_hops_are_parent_and_child() -> Result<()> {
    verdict(
        "client and server ends of each hop between processes are parent and child",
        |p| p.kind == ProblemKind::WrongParent && p.hop == Some(Hop::CrossProcess),
    )
}

#[test]
fn in_process_spans_follow_their_request() -> Result<()> {
    verdict(
        "the root has no parent and spans inside one process hang under the request they serve \
         (nginx events, gevent greenlets, goroutines, plugin sessions)",
        |p| {
            p.kind == ProblemKind::NotRoot
                || (p.kind == ProblemKind::WrongParent && p.hop == Some(Hop::InProcess))
        },
    )
}

#[test]
fn each_request_is_one_trace_of_its_own() -> Result<()> {
    verdict(
        "one trace per request, holding no span of another request",
        |p| matches!(p.kind, ProblemKind::SplitTrace | ProblemKind::CrossTalk),
    )
}

#[test]
fn child_spans_lie_within_their_parents() -> Result<()> {
    verdict(
        "every span within its expected parent's time range (1 ms slack)",
        |p| p.kind == ProblemKind::NotNested,
    )
}

#[test]
fn daemon_traceparent_is_a_link_not_the_parent() -> Result<()> {
    verdict(
        "the api's inner API span links to the traceparent the daemon sent (its parent is the \
         daemon's CLIENT span)",
        |p| p.kind == ProblemKind::MissingLink,
    )
}

#[test]
fn root_span_carries_the_dify_conversation() -> Result<()> {
    verdict(
        "the root span carries dify.conversation_id of its chat request",
        |p| p.kind == ProblemKind::MissingAttr,
    )
}

#[test]
fn no_secret_is_exported() -> Result<()> {
    verdict(
        "no API key, inner API key, app key or tool credential in any span",
        |p| p.kind == ProblemKind::SecretLeak,
    )
}

// ---------------------------------------------------------------------------------------
// Jaeger

/// A second, short run exporting to a real Jaeger: one request's trace is fetched by id
/// (`GET /api/traces/<id>`, the id found through the client's User-Agent on nginx's span)
/// and must be the same tree.
#[test]
fn jaeger_shows_the_same_tree() -> Result<()> {
    let test = "jaeger_shows_the_same_tree";
    let Some(_e2e) = prerequisites(test) else {
        return Ok(());
    };
    let Some(jaeger_bin) = require_jaeger(test) else {
        return Ok(());
    };
    let fx = StackFixtures::prepare()?;
    let jaeger = Jaeger::start_bin(&jaeger_bin)?;
    let mut agent = start_agent(&jaeger.otlp_grpc_endpoint())?;
    let stack = DifyStack::start(&fx).map_err(|e| agent.annotate(e))?;
    wait_uprobes(&mut agent, &stack).map_err(|e| agent.annotate(e))?;
    let outcomes = drive(stack.addr(), 0..JAEGER_REQUESTS, JAEGER_REQUESTS);
    check_outcomes(&outcomes).map_err(|e| agent.annotate(e))?;
    let served = stack.served();
    let numbering = Numbering::new(&served, &outcomes);
    let k = JAEGER_REQUESTS / 2;
    let expected = expected_tree(
        &RequestIds::new(k, outcomes.get(k), &served),
        &stack.pids(),
        &services(),
    );

    // The trace of request k's nginx SERVER span, found by search...
    let ua = format!("difystack-client/{k}");
    let deadline = Instant::now() + SPAN_WAIT;
    let trace_id = loop {
        let found = jaeger
            .traces(&Component::Nginx.service(), &[("user_agent.original", &ua)])
            .unwrap_or_default()
            .into_iter()
            .find(|t| {
                t.spans
                    .iter()
                    .any(|s| s.kind() == "server" && s.tag("user_agent.original") == Some(&ua))
            });
        if let Some(t) = found {
            break t.trace_id;
        }
        if Instant::now() >= deadline {
            bail!(
                "Jaeger has no trace of service {:?} with an nginx SERVER span tagged \
                 user_agent.original={ua:?} after {SPAN_WAIT:?}; services {:?}\n{}\n{}",
                Component::Nginx.service(),
                jaeger.services().unwrap_or_default(),
                jaeger.logs(20),
                agent.logs(80)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    // ... then fetched by id until it holds the whole tree or stops growing.
    let (mut last_len, mut last_change) = (0, Instant::now());
    let trace = loop {
        let t = jaeger
            .trace(&trace_id)?
            .with_context(|| format!("GET /api/traces/{trace_id} found nothing"))?;
        if t.spans.len() != last_len {
            (last_len, last_change) = (t.spans.len(), Instant::now());
        }
        if t.spans.len() >= expected.len() && last_change.elapsed() >= Duration::from_secs(2)
            || last_change.elapsed() >= SPAN_QUIET
            || Instant::now() >= deadline
        {
            break t;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let spans: Vec<SpanView> = trace.spans.iter().map(SpanView::from_jaeger).collect();
    let index = SpanIndex::new(spans, |s| numbering.numbers(s));
    let check = check_tree(&index, &expected, k, &SECRETS);
    if !check.ok() {
        let mut msg = format!(
            "request #{k}'s trace {trace_id} in Jaeger ({} spans) is not the expected tree \
             (only this trace was fetched: a span \"missing\" here may sit in another trace)\n\
             expected:\n{}problems:\n",
            trace.spans.len(),
            render_expected(&expected)
        );
        for p in &check.problems {
            let _ = writeln!(msg, "  - {:?}: {}", p.kind, p.detail);
        }
        let _ = write!(
            msg,
            "received (this trace only):\n{}\nagent:\n{}",
            render_request(&index, &check),
            agent.logs(60)
        );
        bail!(msg);
    }
    agent.ensure_running()?;
    Ok(())
}
