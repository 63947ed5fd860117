//! End-to-end: the ring buffer overruns under a burst and the agent reports it, then recovers.
//!
//! The agent is frozen (SIGSTOP) while a burst of requests hits a traced gunicorn, so the
//! kernel side fills the 8 MiB ring buffer and has to drop records. Once the agent runs again
//! it must count the drops (kernel counter and sequence holes), keep running, and trace the
//! next request normally.

mod common;

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use common::*;
use difytrace_tests::agent::Agent;
use difytrace_tests::otlp_receiver::OtlpReceiver;
use difytrace_tests::procs::{HttpConn, http_get};
use difytrace_tests::python::{DEMO_APP, Gunicorn, GunicornOpts, check_flask_gunicorn};

/// Requests on the kept-alive connection after the burst, one of which must be traced.
const KEPT_TRIES: usize = 4;
const WAIT: Duration = Duration::from_secs(90);
/// Requests in the burst: each answer is 16 KiB, of which 4 KiB + 128 bytes are copied, so
/// the burst makes several times the 8 MiB of the ring.
const BURST: usize = 8_000;
/// A route with a large answer.
const BIG_ROUTE: &str = r#"
@app.get("/big")
def big():
    return "x" * 16384
"#;
const CLIENT_THREADS: usize = 4;

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

#[test]
fn ring_overrun_under_a_burst_is_counted_and_tracing_recovers() -> Result<()> {
    let Some(_e2e) =
        difytrace_tests::e2e("ring_overrun_under_a_burst_is_counted_and_tracing_recovers")
    else {
        return Ok(());
    };
    check_flask_gunicorn()?;
    // Threaded workers keep connections alive (sync workers close each one), and the kept
    // connection must outlive the burst.
    let g = Gunicorn::start(
        &format!("{DEMO_APP}\n{BIG_ROUTE}"),
        &GunicornOpts {
            worker_class: "gthread".into(),
            threads: Some(4),
            extra_args: vec!["--keep-alive".into(), "120".into()],
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
    let before = get(g.addr(), &format!("/users/{}", random_hex(8)), &[])?;
    rx.wait_for_span(|s| is_server_for(s, &before), WAIT)
        .map_err(|e| agent.annotate(e))?;

    // A connection used before, during and after the overrun: its records in the middle are
    // lost, and the sequence numbers of the ones after say so. (The burst's connections
    // carry one request each; whether one of them straddles the moment the ring fills is
    // luck.)
    let mut kept = HttpConn::connect(g.addr())?;
    kept.get(&format!("/users/{}", random_hex(8)), &[])?;
    signal(agent.pid(), libc::SIGSTOP)?;
    let started = Instant::now();
    let addr = g.addr();
    let workers: Vec<_> = (0..CLIENT_THREADS)
        .map(|_| {
            std::thread::spawn(move || -> Result<usize> {
                let mut ok = 0;
                for _ in 0..BURST / CLIENT_THREADS {
                    if http_get(addr, "/big", &[]).is_ok_and(|r| r.status == 200) {
                        ok += 1;
                    }
                }
                Ok(ok)
            })
        })
        .collect();
    let mut answered = 0;
    for w in workers {
        answered += w
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    }
    let burst_time = started.elapsed();
    let during = kept.get("/big", &[])?;
    ensure!(
        during.status == 200,
        "GET /big on the kept connection: {}",
        during.status
    );
    signal(agent.pid(), libc::SIGCONT)?;
    let after_overrun = kept.get(&format!("/users/{}", random_hex(8)), &[])?;
    ensure!(
        after_overrun.status == 200,
        "request after the overrun on the kept connection: {}",
        after_overrun.status
    );
    ensure!(
        answered > BURST * 9 / 10,
        "the server answered only {answered} of {BURST} requests"
    );

    // The agent drains what the ring held, reports the drops, and traces requests again. The
    // first requests after the thaw may still meet a full ring (the agent has 8 MiB to read),
    // so requests are sent until one is traced.
    let deadline = Instant::now() + WAIT;
    let mut recovered = false;
    while !recovered && Instant::now() < deadline {
        let after = get(g.addr(), &format!("/users/{}", random_hex(8)), &[])?;
        recovered = rx
            .wait_for_span(|s| is_server_for(s, &after), Duration::from_secs(3))
            .is_ok();
    }
    ensure!(
        recovered,
        "no request traced within {WAIT:?} after the burst:\n{}",
        agent.logs(40)
    );
    // The request right after the thaw may have met a full ring too; now that requests are
    // traced again, the kept connection's next records are read for sure, and their sequence
    // numbers show the hole left by the ones lost. The kept connection must be traced again
    // within a few requests. The first one after the hole may go untraced (a known limit,
    // there before session 7's changes too): with both CPUs busy, 3 runs of 7 traced only the
    // second, and a failing run showed `unmatched_responses=1`.
    let mut kept_traced = None;
    for attempt in 1..=KEPT_TRIES {
        let path = format!("/users/{}", random_hex(8));
        let next = Sent::from_response("GET", &path, g.port(), &kept.get(&path, &[])?)?;
        if rx
            .wait_for_span(|s| is_server_for(s, &next), Duration::from_secs(5))
            .is_ok()
        {
            println!("kept connection traced again at request {attempt} after the burst");
            kept_traced = Some(next);
            break;
        }
    }
    ensure!(
        kept_traced.is_some(),
        "none of {KEPT_TRIES} requests on the kept connection traced after the burst:\n{}",
        agent.logs(40)
    );
    agent.ensure_running()?;
    let stats = agent.stop_with_stats()?;
    let dropped = stats.get("dropped").copied().unwrap_or(0);
    let lost = stats.get("lost_records").copied().unwrap_or(0);
    ensure!(
        dropped > 0 && lost > 0,
        "a {BURST}-request burst ({burst_time:?}) against a frozen agent should overrun the ring: dropped={dropped} lost_records={lost}, stats {stats:?}"
    );
    println!(
        "burst of {answered} requests in {burst_time:?}: dropped={dropped} lost_records={lost} spans={:?}",
        stats.get("spans")
    );
    Ok(())
}
