//! End-to-end robustness under churn, outage and many connections (issue G):
//!
//! - process churn: gunicorn workers recycled every 50 requests, a worker killed mid-request,
//!   the agent itself restarted under load; afterwards the agent's kernel maps hold nothing
//!   of dead processes, and no span names the wrong process;
//! - the OTLP backend down for 60 s under load: the agent neither blocks nor grows without
//!   bound, counts what it dropped, and delivers again once the backend is back;
//! - 100k idle connections of a watched process: the agent stays within its documented
//!   memory bound, counts the connections it evicted, and still traces a new request.
//!
//! Ring-buffer overrun under a burst is `tests/overload.rs`; a worker dying mid-request
//! (the ERROR span) is `tests/faults.rs`. No timing assertions here: every wait is for an
//! outcome, with a generous limit.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::*;
use difytrace_tests::agent::Agent;
use difytrace_tests::agentstats::{counter, cpu_seconds, last_stats, memory_kib};
use difytrace_tests::bpfmaps::{self, MapInfo};
use difytrace_tests::otlp_receiver::{OtlpReceiver, ReceivedSpan, summarize};
use difytrace_tests::procs::{http_get, pid_alive};
use difytrace_tests::python::{DEMO_APP, Gunicorn, GunicornOpts, check_flask_gunicorn};

/// Spans may be slow to arrive while other suites load the machine.
const WAIT: Duration = Duration::from_secs(120);
/// Two housekeeping ticks of the agent (5 s each) and some slack.
const SWEEP_WAIT: Duration = Duration::from_secs(20);

/// Routes added to [`DEMO_APP`]: `GET /slow/<token>` prints `slow <pid>` and sleeps 60 s
/// (a request to kill its worker in the middle of).
const CHURN_ROUTES: &str = r#"
import sys
import time


@app.get("/slow/<token>")
def slow(token):
    sys.stdout.write("slow %d\n" % os.getpid())
    sys.stdout.flush()
    time.sleep(60)
    return "slow"
"#;

fn signal(pid: u32, sig: i32) -> Result<()> {
    // SAFETY: plain syscall on a pid this test started.
    let rc = unsafe { libc::kill(pid as i32, sig) };
    ensure!(
        rc == 0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// SERVER spans by url.path, for the paths in `paths` only.
fn server_paths(spans: &[ReceivedSpan], paths: &HashSet<String>) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for s in spans.iter().filter(|s| s.is_server()) {
        if let Some(p) = s.attr_str("url.path")
            && paths.contains(&p)
        {
            *out.entry(p).or_insert(0) += 1;
        }
    }
    out
}

/// `n` GETs of `/users/<prefix>-<i>` with `in_flight` at once; the responses.
fn load(g: &Gunicorn, prefix: &str, n: usize, in_flight: usize) -> Result<Vec<Sent>> {
    let addr = g.addr();
    difytrace_tests::procs::concurrently(
        0..n,
        in_flight,
        || (),
        |_, i| get(addr, &format!("/users/{prefix}-{i}"), &[]),
    )
    .into_iter()
    .collect()
}

/// Keys of the agent's per-process maps whose process is gone, with the map they sit in,
/// once they stay so for [`SWEEP_WAIT`]: the agent removes the fd entries of exited
/// processes on its 5 s housekeeping tick, and a process may be exiting while a dump is read.
fn dead_process_entries(maps: &[MapInfo]) -> Result<Vec<(String, u32, usize)>> {
    let look = || -> Result<BTreeMap<(String, u32), usize>> {
        let mut dead = BTreeMap::new();
        for m in maps {
            for key in bpfmaps::map_keys(m.id)? {
                if let Some(tgid) = bpfmaps::key_tgid(&m.name, &key)
                    && !pid_alive(tgid)
                {
                    *dead.entry((m.name.clone(), tgid)).or_insert(0) += 1;
                }
            }
        }
        Ok(dead)
    };
    let deadline = std::time::Instant::now() + SWEEP_WAIT;
    loop {
        let dead = look()?;
        if dead.is_empty() || std::time::Instant::now() >= deadline {
            return Ok(dead
                .into_iter()
                .map(|((name, tgid), n)| (name, tgid, n))
                .collect());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Entry counts of the per-process maps, for failure messages and the test log.
fn map_sizes(maps: &[MapInfo]) -> Result<String> {
    let mut out = Vec::new();
    for m in maps {
        if bpfmaps::key_tgid(&m.name, &[0; 16]).is_some() {
            out.push(format!("{}={}", m.name, bpfmaps::map_keys(m.id)?.len()));
        }
    }
    Ok(out.join(" "))
}

/// Workers recycled every 50 requests over 2000 requests, one worker SIGKILLed while it
/// serves a request, the agent SIGTERMed under load and started again: every request gets
/// exactly one SERVER span naming the worker that served it, the maps hold nothing of dead
/// processes, and the restarted agent traces new requests and exports nothing stale.
#[test]
fn process_churn_leaves_no_stale_state() -> Result<()> {
    let Some(_e2e) = difytrace_tests::e2e("process_churn_leaves_no_stale_state") else {
        return Ok(());
    };
    bpfmaps::bpftool()?;
    check_flask_gunicorn()?;
    let mut g = Gunicorn::start(
        &format!("{DEMO_APP}\n{CHURN_ROUTES}"),
        &GunicornOpts {
            max_requests: Some(50),
            ..GunicornOpts::default()
        },
    )?;
    let rx = OtlpReceiver::start()?;
    let mut agent = Agent::start(&[
        "--comm",
        "gunicorn",
        "--otlp-endpoint",
        &rx.grpc_endpoint(),
        "--stats-interval",
        "1",
    ])?;
    let maps: Vec<MapInfo> = bpfmaps::maps_of(agent.pid())?
        .into_iter()
        .filter(|m| bpfmaps::key_tgid(&m.name, &[0; 16]).is_some())
        .collect();
    ensure!(
        maps.iter().any(|m| m.name == "WATCHED") && maps.iter().any(|m| m.name == "SOCKETS"),
        "the agent's maps lack WATCHED or SOCKETS: {maps:?}"
    );

    let mut sent = load(&g, "churn-a", 1000, 4)?;

    // A worker killed while it serves a request: the client sees the connection end.
    let slow = std::thread::scope(|s| -> Result<u32> {
        let addr = g.addr();
        let client = s.spawn(move || http_get(addr, "/slow/killed", &[]));
        let pid = difytrace_tests::poll(WAIT, Duration::from_millis(50), || {
            g.proc().stdout().lines().find_map(|l| {
                l.trim()
                    .strip_prefix("slow ")
                    .and_then(|p| p.trim().parse::<u32>().ok())
            })
        })
        .with_context(|| format!("no `slow <pid>` line\n{}", g.logs(40)))?;
        signal(pid, libc::SIGKILL)?;
        let answer = client
            .join()
            .map_err(|_| anyhow::anyhow!("client panicked"))?;
        ensure!(
            answer.is_err(),
            "GET /slow/killed answered although its worker was killed: {answer:?}"
        );
        Ok(pid)
    })?;
    sent.extend(load(&g, "churn-b", 1000, 4)?);

    let served_by: BTreeSet<u32> = sent.iter().map(|r| r.worker_pid).collect();
    ensure!(
        served_by.len() >= 30,
        "max_requests=50 should have recycled the workers ~40 times; served by {served_by:?}"
    );
    let paths: HashSet<String> = sent.iter().map(|r| r.path.clone()).collect();
    let spans = rx
        .wait_for(|s| server_paths(s, &paths).len() == paths.len(), WAIT)
        .map_err(|e| agent.annotate(e))?;
    let by_path = server_paths(&spans, &paths);
    let doubled: Vec<_> = by_path.iter().filter(|(_, n)| **n != 1).collect();
    ensure!(
        doubled.is_empty(),
        "requests with more than one SERVER span: {doubled:?}"
    );
    // No span carries the identity of another process (a recycled pid's stale facts).
    for r in &sent {
        let s = spans
            .iter()
            .find(|s| s.is_server() && s.attr_str("url.path").as_deref() == Some(&r.path))
            .expect("counted above");
        ensure!(
            s.pid() == Some(r.worker_pid),
            "{} was served by pid {} but its span says pid {:?}: {}",
            r.path,
            r.worker_pid,
            s.pid(),
            s.summary()
        );
    }

    // Wait for the dead workers to be reaped, then look at the kernel maps.
    difytrace_tests::poll(WAIT, Duration::from_millis(100), || {
        (!pid_alive(slow)).then_some(())
    })
    .with_context(|| format!("killed worker {slow} still alive"))?;
    std::thread::sleep(Duration::from_secs(2));
    agent.ensure_running()?;
    let sizes = map_sizes(&maps)?;
    eprintln!("after churn ({} workers served): {sizes}", served_by.len());
    let leaked = dead_process_entries(&maps)?;
    ensure!(
        leaked.is_empty(),
        "the agent's maps still hold entries of exited processes (map, tgid, entries): {leaked:?}; sizes {sizes}\n{}",
        agent.logs(40)
    );
    // The agent restarted under load.
    let old_maps: Vec<u32> = maps.iter().map(|m| m.id).collect();
    let stop = AtomicBool::new(false);
    let during = AtomicUsize::new(0);
    let rx2 = OtlpReceiver::start()?;
    let (agent2, restart_ns) = std::thread::scope(|s| -> Result<(Agent, u64)> {
        let addr = g.addr();
        let (stop, during) = (&stop, &during);
        let loader = s.spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let _ = http_get(addr, &format!("/users/restart-{i}"), &[]);
                during.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        });
        std::thread::sleep(Duration::from_secs(1));
        signal(agent.pid(), libc::SIGTERM)?;
        let status = difytrace_tests::poll(WAIT, Duration::from_millis(50), || agent.exit_status())
            .context("the agent did not exit on SIGTERM")?;
        ensure!(status.success(), "agent exited with {status} on SIGTERM");
        let restart_ns = wall_ns();
        let agent2 = Agent::start(&[
            "--comm",
            "gunicorn",
            "--otlp-endpoint",
            &rx2.grpc_endpoint(),
            "--stats-interval",
            "1",
        ])?;
        std::thread::sleep(Duration::from_secs(1));
        stop.store(true, Ordering::Relaxed);
        loader
            .join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))?;
        Ok((agent2, restart_ns))
    })?;
    ensure!(
        during.load(Ordering::Relaxed) > 0,
        "no request ran across the restart"
    );
    for id in &old_maps {
        ensure!(
            bpfmaps::map_info(*id)?.is_none(),
            "map {id} of the stopped agent still exists"
        );
    }
    let mut agent2 = agent2;
    let after: Vec<Sent> = (0..10)
        .map(|i| get(g.addr(), &format!("/users/after-restart-{i}"), &[]))
        .collect::<Result<_>>()?;
    let after_paths: HashSet<String> = after.iter().map(|r| r.path.clone()).collect();
    let spans2 = rx2
        .wait_for(|s| server_paths(s, &after_paths).len() == after.len(), WAIT)
        .map_err(|e| agent2.annotate(e))?;
    for r in &after {
        let n = servers_for(&spans2, r).len();
        ensure!(n == 1, "{n} SERVER spans for {} after the restart", r.path);
    }
    // Nothing the new agent exported started before the old one stopped, or is a request
    // of the earlier phases.
    let stale: Vec<ReceivedSpan> = spans2
        .iter()
        .filter(|s| {
            s.attr_str("server.port") == Some(g.port().to_string())
                && (s.start_ns < restart_ns
                    || s.attr_str("url.path")
                        .is_some_and(|p| p.starts_with("/users/churn-")))
        })
        .cloned()
        .collect();
    ensure!(
        stale.is_empty(),
        "the restarted agent exported spans of before its start:\n{}",
        summarize(&stale, 10)
    );
    agent2.ensure_running()?;
    let final_stats = agent2.stop_with_stats()?;
    eprintln!("restarted agent: {final_stats:?}");
    Ok(())
}

fn wall_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// How long the OTLP backend is down (the issue's 60 s).
const OUTAGE: Duration = Duration::from_secs(60);
/// Pause between two requests of the outage load (one client: modest load, ~50–80 req/s).
const OUTAGE_PACE: Duration = Duration::from_millis(10);
/// What the export side may hold while the backend is down: the exporter thread's channel,
/// and per traced process one queue holding new spans and those of failed exports alike
/// (`tracer/src/export/otlp/mod.rs`: DISPATCH_QUEUE, OTLP_QUEUE_PER_RESOURCE).
const DISPATCH_QUEUE: usize = 8192;
const QUEUE_PER_RESOURCE: usize = 2048;
/// Spans of failed exports kept per traced process for the retry.
const HELD_PER_RESOURCE: usize = 2048;
/// Growth of the agent's RSS allowed over the outage: the queues above full of spans
/// (a few KiB each) fit in well under this.
const OUTAGE_RSS_GROWTH_KIB: u64 = 96 * 1024;

/// The OTLP backend goes away for 60 s while a gunicorn is loaded: the agent keeps
/// building spans (nothing blocks), its memory stays within what its queues hold, it counts
/// what it could not deliver, and once the backend is back on the same port it delivers
/// again; in the end every span it built was either delivered or counted as dropped.
#[test]
fn otlp_backend_down_for_a_minute_under_load() -> Result<()> {
    let Some(_e2e) = difytrace_tests::e2e("otlp_backend_down_for_a_minute_under_load") else {
        return Ok(());
    };
    check_flask_gunicorn()?;
    let g = Gunicorn::start(DEMO_APP, &GunicornOpts::default())?;
    let rx = OtlpReceiver::start()?;
    let port = rx.grpc_addr().port();
    let mut agent = Agent::start(&[
        "--comm",
        "gunicorn",
        "--otlp-endpoint",
        &rx.grpc_endpoint(),
        "--stats-interval",
        "1",
    ])?;
    let before: Vec<Sent> = (0..5)
        .map(|i| get(g.addr(), &format!("/users/before-{i}"), &[]))
        .collect::<Result<_>>()?;
    rx.wait_for(|s| all_served(s, &before), WAIT)
        .map_err(|e| agent.annotate(e))?;
    // Let the batch that carried them be acknowledged before the backend goes.
    std::thread::sleep(Duration::from_secs(2));
    let delivered_before = rx.spans().len();
    drop(rx);

    let stop = AtomicBool::new(false);
    let outage_sent = AtomicUsize::new(0);
    let (rss, stats_at_start) = std::thread::scope(|s| -> Result<(Vec<u64>, u64)> {
        let addr = g.addr();
        let (stop, outage_sent) = (&stop, &outage_sent);
        let loader = s.spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                if http_get(addr, &format!("/users/outage-{i}"), &[]).is_ok() {
                    outage_sent.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
                std::thread::sleep(OUTAGE_PACE);
            }
        });
        let spans_at_start = last_stats(&agent.stderr())
            .map(|st| st.get("spans").copied().unwrap_or(0))
            .unwrap_or(0);
        let mut rss = Vec::new();
        let start = std::time::Instant::now();
        while start.elapsed() < OUTAGE {
            std::thread::sleep(Duration::from_secs(2));
            agent.ensure_running()?;
            rss.push(memory_kib(agent.pid())?.0);
        }
        stop.store(true, Ordering::Relaxed);
        loader
            .join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))?;
        Ok((rss, spans_at_start))
    })?;
    let sent_during = outage_sent.load(Ordering::Relaxed);
    // The stats line a second after the load stopped.
    std::thread::sleep(Duration::from_millis(1500));
    let at_end = last_stats(&agent.stderr()).context("no stats line")?;
    eprintln!(
        "outage: {sent_during} requests; agent RSS KiB every 2 s: {rss:?}; stats at the end {at_end:?}"
    );
    ensure!(
        sent_during >= 1000,
        "only {sent_during} requests during the outage"
    );
    // Nothing blocked: the spans of (nearly) all outage requests were built.
    let built = counter(&at_end, "spans")?.saturating_sub(stats_at_start);
    ensure!(
        built as usize + 10 >= sent_during,
        "the agent built {built} spans for {sent_during} requests while the backend was down"
    );
    let dropped = counter(&at_end, "export_dropped")?;
    ensure!(
        dropped > 0,
        "no span counted as dropped after {sent_during} spans met a backend that is down"
    );
    let (first, last) = (rss[0], rss.iter().copied().max().unwrap_or(0));
    ensure!(
        last <= first + OUTAGE_RSS_GROWTH_KIB,
        "agent RSS grew from {first} KiB to {last} KiB during the outage: {rss:?}"
    );
    // No steady growth: the second half of the outage peaks no higher than the first half
    // did plus a little (queues fill in the first seconds, then spans are dropped).
    let half = rss.len() / 2;
    let first_half = rss[..half].iter().copied().max().unwrap_or(0);
    let second_half = rss[half..].iter().copied().max().unwrap_or(0);
    ensure!(
        second_half <= first_half + 16 * 1024,
        "agent RSS still growing in the second half of the outage: {rss:?}"
    );

    // The backend is back on the same port.
    let rx = OtlpReceiver::start_on(
        difytrace_tests::procs::local(port),
        difytrace_tests::procs::local(0),
    )
    .with_context(|| format!("binding the receiver again on port {port}"))?;
    let after: Vec<Sent> = (0..20)
        .map(|i| get(g.addr(), &format!("/users/after-outage-{i}"), &[]))
        .collect::<Result<_>>()?;
    let spans = rx
        .wait_for(|s| all_served(s, &after), WAIT)
        .map_err(|e| agent.annotate(e))?;
    for r in &after {
        let n = servers_for(&spans, r).len();
        ensure!(n == 1, "{n} SERVER spans for {} after the outage", r.path);
    }
    let resources = spans
        .iter()
        .filter_map(|s| s.pid())
        .collect::<BTreeSet<u32>>()
        .len()
        .max(1);
    let final_stats = agent.stop_with_stats()?;
    let delivered_after = rx.spans();
    let outage_delivered = delivered_after
        .iter()
        .filter(|s| s.mentions("/users/outage-"))
        .count();
    eprintln!(
        "after recovery: {outage_delivered} outage spans delivered, {} spans received in all; final stats {final_stats:?}",
        delivered_after.len()
    );
    let capacity = DISPATCH_QUEUE + resources * QUEUE_PER_RESOURCE;
    ensure!(
        outage_delivered <= capacity,
        "{outage_delivered} spans of the outage delivered, more than the queues hold ({capacity})"
    );
    // What fits is delivered once the backend is back: at least one retry buffer's worth
    // (or every outage request, if fewer), whatever the split over the workers. Half of it,
    // since a worker recycled or a batch cut off at the switch may take a share.
    let fits = HELD_PER_RESOURCE.min(sent_during);
    ensure!(
        outage_delivered >= fits / 2,
        "only {outage_delivered} spans of the outage delivered once the backend was back (of {sent_during} requests; at least {} fit)",
        fits / 2
    );
    let produced = counter(&final_stats, "spans")?;
    let sent_total = counter(&final_stats, "export_sent")?;
    let dropped_total = counter(&final_stats, "export_dropped")?;
    ensure!(
        produced == sent_total + dropped_total,
        "spans built {produced} != sent {sent_total} + dropped {dropped_total}"
    );
    // Every acknowledged batch was stored by a receiver; a batch cut off when the first
    // receiver went away may have been stored without its acknowledgement.
    let received = (delivered_before + delivered_after.len()) as u64;
    ensure!(
        (sent_total..=sent_total + 512).contains(&received),
        "the receivers got {received} spans, the agent counts {sent_total} as sent"
    );
    Ok(())
}

/// Idle connections the watched processes open (the issue's 100k).
const IDLE_CONNS: usize = 100_000;
/// Processes holding them, on each side: the fd limit here is 20000 per process and a
/// container's root may not raise it (no CAP_SYS_RESOURCE), so the connections are spread
/// over several client processes (forked by one watched parent) and as many servers.
const IDLE_PROCS: usize = 7;
/// Listening ports per server, so no (source, destination) pair runs short of the ~28k
/// ephemeral ports.
const IDLE_PORTS_PER_SERVER: usize = 2;
/// The agent's user-side connection table (`tracer/src/stream/table.rs`: MAX_CONNS).
const MAX_CONNS: u64 = 32_768;
/// The kernel's SOCKETS capacity without `--max-sockets` (tracer_common::MAX_SOCKETS).
const DEFAULT_SOCKETS: u64 = 65_536;
/// The documented bound on the agent's memory with any number of idle connections
/// (docs/benchmarks.md, "Bounded memory").
const IDLE_RSS_BOUND_KIB: u64 = 256 * 1024;

/// Answers every `GET` with a small response and keeps the connection open. Not watched.
/// argv: the ports to listen on; prints `ready` once listening.
const IDLE_SERVER: &str = r#"
import resource, selectors, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
sel = selectors.EpollSelector()
for port in sys.argv[1:]:
    l = socket.socket()
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("127.0.0.1", int(port)))
    l.listen(4096)
    l.setblocking(False)
    sel.register(l, selectors.EVENT_READ, None)
print("ready", flush=True)
RESP = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nContent-Type: text/plain\r\n\r\nidle"
while True:
    for key, _ in sel.select():
        if key.data is None:
            while True:
                try:
                    c, _ = key.fileobj.accept()
                except (BlockingIOError, OSError):
                    break
                c.setblocking(False)
                sel.register(c, selectors.EVENT_READ, b"")
        else:
            c = key.fileobj
            try:
                data = c.recv(4096)
            except ConnectionError:
                data = b""
            if not data:
                sel.unregister(c)
                c.close()
            elif b"\r\n\r\n" in data:
                c.sendall(RESP)
"#;

/// The watched parent: waits for `go` on stdin, forks one child per port group (argv:
/// connections in all, then one comma-separated port group per child); each child opens
/// its share of the connections (one request each, answer read, connection kept) and holds
/// them until the parent goes. The parent prints `open N` once all are open; then
/// `req PATH` makes one request on a new connection and prints `ok STATUS`.
const IDLE_CLIENT: &str = r#"
import os, resource, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
count = int(sys.argv[1])
groups = [[int(p) for p in g.split(",")] for g in sys.argv[2:]]
def request(port, path):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: idle\r\n\r\n")
    got = b""
    while not got.endswith(b"idle"):
        chunk = s.recv(4096)
        if not chunk:
            raise RuntimeError("closed: %r" % got)
        got += chunk
    return s, got
print("waiting", flush=True)
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "go":
        share = count // len(groups)
        done_r, done_w = os.pipe()
        hold_r, hold_w = os.pipe()
        for n, ports in enumerate(groups):
            if os.fork() == 0:
                os.close(done_r)
                os.close(hold_w)
                mine = share + (count - share * len(groups) if n == 0 else 0)
                held = [request(ports[i % len(ports)], "/idle/%d/%d" % (n, i))[0] for i in range(mine)]
                os.write(done_w, b"%d\n" % len(held))
                os.read(hold_r, 1)  # until the parent goes
                os._exit(0)
        os.close(done_w)
        os.close(hold_r)
        total, buf = 0, b""
        with os.fdopen(done_r, "rb") as done:
            for _ in groups:
                total += int(done.readline())
        print("open %d" % total, flush=True)
    elif cmd[0] == "req":
        s, got = request(groups[0][0], cmd[1])
        s.close()
        print("ok " + got.split()[1].decode(), flush=True)
"#;

/// A watched process holds 100k idle connections (one request each): the agent's memory
/// stays under the documented bound, its connection table stays at its capacity with the
/// connections beyond it counted as evicted, and a request made after that is traced.
#[test]
fn hundred_thousand_idle_connections_keep_the_agent_bounded() -> Result<()> {
    use std::io::{BufRead as _, BufReader, Write as _};
    use std::process::{Command, Stdio};

    let Some(_e2e) =
        difytrace_tests::e2e("hundred_thousand_idle_connections_keep_the_agent_bounded")
    else {
        return Ok(());
    };
    let python = difytrace_tests::python::python3();
    let dir = difytrace_tests::TempDir::new("idle")?;
    let mut servers = Vec::new();
    let mut groups = Vec::new();
    for n in 0..IDLE_PROCS {
        let ports: Vec<String> = (0..IDLE_PORTS_PER_SERVER)
            .map(|_| difytrace_tests::procs::free_port().to_string())
            .collect();
        let mut cmd = Command::new(&python);
        cmd.arg("-c").arg(IDLE_SERVER).args(&ports);
        let server =
            difytrace_tests::procs::Proc::spawn(&format!("idle-server-{n}"), cmd, dir.path())?;
        difytrace_tests::poll(WAIT, Duration::from_millis(50), || {
            server.stdout().contains("ready").then_some(())
        })
        .with_context(|| format!("idle server {n} not ready\n{}", server.log_tail(20)))?;
        servers.push(server);
        groups.push(ports.join(","));
    }

    let mut client = Command::new(&python)
        .arg("-c")
        .arg(IDLE_CLIENT)
        .arg(IDLE_CONNS.to_string())
        .args(&groups)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the idle client")?;
    let result = (|| -> Result<()> {
        let mut input = client.stdin.take().context("client stdin")?;
        let mut output = BufReader::new(client.stdout.take().context("client stdout")?);
        let mut line = String::new();
        output.read_line(&mut line)?;
        ensure!(line.trim() == "waiting", "idle client said {line:?}");
        let client_pid = client.id().to_string();
        // Console spans (to a file): 100k spans through an in-test receiver would measure
        // the receiver.
        let mut agent = Agent::start(&["--pid", &client_pid, "--stats-interval", "1"])?;
        let baseline = memory_kib(agent.pid())?.0;

        writeln!(input, "go")?;
        line.clear();
        output.read_line(&mut line)?;
        ensure!(
            line.trim() == format!("open {IDLE_CONNS}"),
            "idle client: {line:?}"
        );
        // The agent catches up with what the connections produced (it may lag far behind
        // on a loaded machine: ~3 records per connection).
        let caught_up = |st: &difytrace_tests::agentstats::Stats| {
            let get = |k: &str| st.get(k).copied().unwrap_or(0);
            get("conns") + get("conns_evicted") + get("dropped") >= IDLE_CONNS as u64
        };
        let stats = difytrace_tests::poll(WAIT * 2, Duration::from_secs(1), || {
            last_stats(&agent.stderr()).filter(caught_up)
        });
        agent.ensure_running()?;
        let (rss, peak) = memory_kib(agent.pid())?;
        let stats = stats.with_context(|| {
            format!(
                "the agent did not account for the {IDLE_CONNS} connections; last stats {:?}",
                last_stats(&agent.stderr())
            )
        })?;
        eprintln!(
            "{IDLE_CONNS} idle connections: agent RSS {baseline} KiB before, {rss} KiB after, peak {peak} KiB; stats {stats:?}"
        );
        ensure!(
            peak <= IDLE_RSS_BOUND_KIB,
            "agent peak RSS {peak} KiB above the documented bound {IDLE_RSS_BOUND_KIB} KiB"
        );
        let conns = counter(&stats, "conns")?;
        let evicted = counter(&stats, "conns_evicted")?;
        ensure!(
            conns <= MAX_CONNS,
            "{conns} connections tracked, above the table's {MAX_CONNS}"
        );
        // Every connection is either still in the table or counted as evicted (unless its
        // connect record itself was lost, which `dropped` counts: checked by the wait above).
        ensure!(
            evicted >= (IDLE_CONNS as u64).saturating_sub(MAX_CONNS + counter(&stats, "dropped")?),
            "{IDLE_CONNS} connections opened, {conns} tracked, only {evicted} counted as evicted"
        );

        // The kernel's SOCKETS map (65536 entries by default) cannot hold the 100k client
        // ends either: the evictions are counted (each map walk, every 5 s).
        let evicted = difytrace_tests::poll(WAIT, Duration::from_secs(1), || {
            last_stats(&agent.stderr())
                .and_then(|st| st.get("sockets_evicted").copied())
                .filter(|n| *n >= IDLE_CONNS as u64 - DEFAULT_SOCKETS)
        })
        .with_context(|| {
            format!(
                "{IDLE_CONNS} connections in a map of {DEFAULT_SOCKETS}: sockets_evicted {:?}",
                last_stats(&agent.stderr()).and_then(|st| st.get("sockets_evicted").copied())
            )
        })?;
        eprintln!("sockets_evicted={evicted}");

        writeln!(input, "req /after-idle")?;
        line.clear();
        output.read_line(&mut line)?;
        ensure!(line.trim() == "ok 200", "idle client: {line:?}");
        agent
            .wait_stdout(|out| out.contains("/after-idle"), WAIT)
            .context("the request after the idle connections was not traced")?;
        drop(input);
        Ok(())
    })();
    let _ = client.kill();
    let _ = client.wait();
    result
}

/// SOCKETS capacity in the eviction test (`--max-sockets`): small, so a few thousand
/// connections overflow it.
const SMALL_SOCKETS: u64 = 1024;
/// Connections the eviction test opens below that capacity (two entries each: the connect
/// and the accept are both in the watched process), then beyond it.
const BELOW_CAPACITY_CONNS: u64 = 150;
const BEYOND_CAPACITY_CONNS: u64 = 1500;
/// How long the eviction test opens and closes connections below capacity: over two walks.
const CHURN_SECS: u64 = 11;
/// The map walk runs every 5 s; under load it may take a few rounds to be still.
const MAP_COUNT_WAIT: Duration = Duration::from_secs(60);

/// Connects to itself and keeps every connection: prints `waiting`; for each `open N` on
/// stdin makes N connections to its own listener, accepts each (both ends stay open) and
/// prints `open TOTAL`; for `churn SECS` connects, accepts and closes both ends over and
/// over for that long (some hundreds a second) and prints `churned N`.
const SELF_CONNECTOR: &str = r#"
import resource, socket, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
l = socket.socket()
l.bind(("127.0.0.1", 0))
l.listen(4096)
port = l.getsockname()[1]
held = []
print("waiting", flush=True)
for line in sys.stdin:
    cmd, arg = line.split()
    if cmd == "open":
        for _ in range(int(arg)):
            c = socket.create_connection(("127.0.0.1", port))
            s, _ = l.accept()
            held += [c, s]
        print("open %d" % (len(held) // 2), flush=True)
    else:
        n, end = 0, time.monotonic() + float(arg)
        while time.monotonic() < end:
            c = socket.create_connection(("127.0.0.1", port))
            s, _ = l.accept()
            c.close()
            s.close()
            n += 1
            time.sleep(0.002)  # a few thousand, not a whole port range in TIME_WAIT
        print("churned %d" % n, flush=True)
"#;

/// `difytrace_map_entries` and `difytrace_map_evictions_total` of SOCKETS in one scrape of
/// the agent's Prometheus endpoint (both come from the same walk of the map).
fn sockets_entries_and_evictions(addr: std::net::SocketAddr) -> Result<(u64, u64)> {
    let r = http_get(addr, "/metrics", &[]).context("GET /metrics")?;
    ensure!(r.status == 200, "GET /metrics: {}", r.status);
    let text = r.text();
    let value = |name: &str| -> Result<u64> {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{name}{{")) && l.contains("map=\"SOCKETS\""))
            .with_context(|| format!("no {name} for SOCKETS in /metrics"))?;
        let v: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("bad sample {line:?}"))?;
        Ok(v as u64)
    };
    Ok((
        value("difytrace_map_entries")?,
        value("difytrace_map_evictions_total")?,
    ))
}

/// The kernel evicts from a full LRU map without a word; the agent counts it. With SOCKETS
/// sized to 1024 entries, a watched process holding 150 connections (300 entries) evicts
/// nothing, and once it holds 1650 (3300 entries) every entry created is either in the map
/// or counted as evicted: evictions = created - entries, at least created - capacity. The
/// stats line carries the same count as `sockets_evicted`.
#[test]
fn a_full_socket_map_counts_its_evictions() -> Result<()> {
    use std::io::{BufRead as _, BufReader, Write as _};
    use std::process::{Command, Stdio};

    let Some(_e2e) = difytrace_tests::e2e("a_full_socket_map_counts_its_evictions") else {
        return Ok(());
    };
    let mut proc = Command::new(difytrace_tests::python::python3())
        .arg("-c")
        .arg(SELF_CONNECTOR)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the self-connecting process")?;
    let result = (|| -> Result<()> {
        let mut input = proc.stdin.take().context("stdin")?;
        let mut output = BufReader::new(proc.stdout.take().context("stdout")?);
        let mut line = String::new();
        output.read_line(&mut line)?;
        ensure!(line.trim() == "waiting", "self connector said {line:?}");
        let metrics = difytrace_tests::procs::local(difytrace_tests::procs::free_port());
        let rx = OtlpReceiver::start()?;
        // No pipes: the process's stdin and stdout would be SOCKETS entries too.
        let agent = Agent::start(&[
            "--pid",
            &proc.id().to_string(),
            "--no-pipes",
            "--max-sockets",
            &SMALL_SOCKETS.to_string(),
            "--metrics-addr",
            &metrics.to_string(),
            "--otlp-endpoint",
            &rx.grpc_endpoint(),
            "--metrics-interval",
            "1",
            "--stats-interval",
            "1",
        ])?;
        let mut ask = |cmd: &str| -> Result<String> {
            writeln!(input, "{cmd}")?;
            line.clear();
            output.read_line(&mut line)?;
            Ok(line.trim().to_string())
        };

        let said = ask(&format!("open {BELOW_CAPACITY_CONNS}"))?;
        ensure!(
            said == format!("open {BELOW_CAPACITY_CONNS}"),
            "self connector: {said:?}"
        );
        let created = 2 * BELOW_CAPACITY_CONNS;
        let below = difytrace_tests::poll(MAP_COUNT_WAIT, Duration::from_millis(500), || {
            sockets_entries_and_evictions(metrics)
                .ok()
                .filter(|(entries, _)| *entries >= created)
        })
        .with_context(|| {
            format!(
                "SOCKETS never showed the {created} entries; last {:?}",
                sockets_entries_and_evictions(metrics)
            )
        })?;
        eprintln!(
            "{created} entries created, capacity {SMALL_SOCKETS}: (entries, evicted) = {below:?}"
        );
        ensure!(
            below == (created, 0),
            "below capacity: (entries, evicted) = {below:?}, want ({created}, 0)"
        );
        // Connections opened and closed while the map is walked (two walks at least): the
        // closes are counted, none reads as an eviction.
        let said = ask(&format!("churn {CHURN_SECS}"))?;
        ensure!(said.starts_with("churned "), "self connector: {said:?}");
        let churned = difytrace_tests::poll(MAP_COUNT_WAIT, Duration::from_millis(500), || {
            sockets_entries_and_evictions(metrics)
                .ok()
                .filter(|(entries, evicted)| *entries == created || *evicted > 0)
        })
        .with_context(|| {
            format!(
                "SOCKETS never came back to {created} entries after the churn; last {:?}",
                sockets_entries_and_evictions(metrics)
            )
        })?;
        eprintln!("{said} below capacity: (entries, evicted) = {churned:?}");
        ensure!(
            churned == (created, 0),
            "after churn below capacity: (entries, evicted) = {churned:?}, want ({created}, 0)"
        );

        let said = ask(&format!("open {BEYOND_CAPACITY_CONNS}"))?;
        ensure!(
            said == format!("open {}", BELOW_CAPACITY_CONNS + BEYOND_CAPACITY_CONNS),
            "self connector: {said:?}"
        );
        let created = 2 * (BELOW_CAPACITY_CONNS + BEYOND_CAPACITY_CONNS);
        // Exact once the map is still for a walk: each entry created is there or evicted.
        let beyond = difytrace_tests::poll(MAP_COUNT_WAIT, Duration::from_millis(500), || {
            sockets_entries_and_evictions(metrics)
                .ok()
                .filter(|(entries, evicted)| entries + evicted == created)
        })
        .with_context(|| {
            format!(
                "entries + evictions never reached the {created} entries created; last {:?}",
                sockets_entries_and_evictions(metrics)
            )
        })?;
        eprintln!(
            "{created} entries created, capacity {SMALL_SOCKETS}: (entries, evicted) = {beyond:?}"
        );
        let (entries, evicted) = beyond;
        ensure!(
            entries <= SMALL_SOCKETS && evicted >= created - SMALL_SOCKETS,
            "beyond capacity: {entries} entries, {evicted} evicted of {created} created"
        );
        // The same count over OTLP (self-telemetry, `_total` dropped).
        rx.wait_for_points(
            |points| {
                points.iter().any(|p| {
                    p.service == "difytrace"
                        && p.metric == "difytrace_map_evictions"
                        && p.attr_str("map").as_deref() == Some("SOCKETS")
                        && p.value == evicted as f64
                })
            },
            MAP_COUNT_WAIT,
        )
        .context("difytrace_map_evictions{map=SOCKETS} over OTLP")?;
        let stats = agent.stop_with_stats()?;
        ensure!(
            stats.get("sockets_evicted") == Some(&evicted),
            "stats line: sockets_evicted={:?}, /metrics said {evicted}",
            stats.get("sockets_evicted")
        );
        Ok(())
    })();
    let _ = proc.kill();
    let _ = proc.wait();
    result
}

/// An agent with nothing to trace sits idle: no thread spins. Regression for the container
/// watcher, whose inotify wait stopped blocking when it had no filter and no runtime to ask
/// and burned a whole core. A spinning thread uses about one CPU-second per second; an idle
/// agent a few hundredths. Not a benchmark: the bound is twenty times the idle figure.
#[test]
fn idle_agent_uses_no_cpu() -> Result<()> {
    let Some(_e2e) = difytrace_tests::e2e("idle_agent_uses_no_cpu") else {
        return Ok(());
    };
    const WINDOW: Duration = Duration::from_secs(6);
    const MAX_CPU_SECONDS: f64 = 1.5;
    let cases: [&[&str]; 2] = [
        &["--comm", "dt-idle-none"],
        &[
            "--comm",
            "dt-idle-none",
            "--container",
            "dt-idle-no-such-container",
        ],
    ];
    let mut report = Vec::new();
    for args in cases {
        let agent = Agent::start(args)?;
        // Past the start-up work (loading programs, the first walks).
        std::thread::sleep(Duration::from_secs(2));
        let before = cpu_seconds(agent.pid())?;
        std::thread::sleep(WINDOW);
        let used = cpu_seconds(agent.pid())? - before;
        let logs = agent.logs(40);
        agent.stop()?;
        report.push(format!("{args:?}: {used:.2} CPU-s in {WINDOW:?}"));
        ensure!(
            used < MAX_CPU_SECONDS,
            "idle agent {args:?} used {used:.2} CPU-s in {WINDOW:?} (a thread spins?)\n{logs}"
        );
    }
    eprintln!("idle agent CPU: {}", report.join("; "));
    Ok(())
}
