//! The agent works with the capability set of docs/capabilities.md and nothing more, and
//! says clearly what is missing when it lacks one.
//!
//! The agent runs as uid 0 under `capsh --drop=<every other capability>`: dropped from the
//! bounding set, a capability cannot come back at the exec of the agent, so its effective
//! set is exactly the chosen one (checked in /proc/<pid>/status). It traces gunicorn with a
//! gevent worker: syscall tracepoints, the /proc scan, and the greenlet uprobe put on a
//! library inside another process's mappings (a `uprobe_multi` link, like every uprobe of
//! the agent: no CAP_SYS_ADMIN, which perf uprobes need on Linux >= 6.16).
//!
//! Needs root, the release agent, capsh (Debian package libcap2-bin) and the Python venv.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use common::*;
use difytrace_tests::agent::{Agent, READY_TIMEOUT};
use difytrace_tests::otlp_receiver::OtlpReceiver;
use difytrace_tests::python::{DEMO_APP, Downstream, Gunicorn, GunicornOpts, check_flask_gunicorn};

/// The agent's capabilities (docs/capabilities.md; the same list is in the DaemonSet and
/// the Helm chart, and tests/deploy_manifests.rs checks that).
const CAPABILITIES: &[&str] = &[
    "cap_bpf",
    "cap_perfmon",
    "cap_sys_ptrace",
    "cap_dac_read_search",
];

/// Every capability this kernel knows, by name, in number order.
fn all_capabilities() -> Result<Vec<String>> {
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .context("reading /proc/sys/kernel/cap_last_cap")?
        .trim()
        .parse()
        .context("parsing cap_last_cap")?;
    let mask = (1u64 << (last + 1)) - 1;
    let out = Command::new("capsh")
        .arg(format!("--decode={mask:#x}"))
        .output()
        .context("running capsh (Debian: apt-get install libcap2-bin)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let names = text
        .trim()
        .split_once('=')
        .with_context(|| format!("capsh --decode printed {text:?}"))?
        .1;
    let names: Vec<String> = names.split(',').map(str::to_string).collect();
    ensure!(
        names.len() == last as usize + 1,
        "capsh named {} capabilities, the kernel has {}",
        names.len(),
        last + 1
    );
    Ok(names)
}

/// Numbers of the named capabilities.
fn numbers(all: &[String], names: &[&str]) -> Result<BTreeSet<u32>> {
    names
        .iter()
        .map(|n| {
            all.iter()
                .position(|a| a == n)
                .map(|i| i as u32)
                .with_context(|| format!("unknown capability {n}"))
        })
        .collect()
}

/// Capability numbers set in a `CapXxx:` line of /proc/<pid>/status.
fn status_caps(pid: u32, field: &str) -> Result<BTreeSet<u32>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?
        .trim();
    let mask = u64::from_str_radix(hex, 16).with_context(|| format!("{field}: {hex}"))?;
    Ok((0..64).filter(|b| mask & (1 << b) != 0).collect())
}

/// A command that runs the agent binary under capsh with only `keep` left.
fn under_capsh(all: &[String], keep: &[&str]) -> impl FnOnce(&Path) -> Command {
    let drop: Vec<String> = all
        .iter()
        .filter(|c| !keep.contains(&c.as_str()))
        .cloned()
        .collect();
    move |bin: &Path| {
        let mut cmd = Command::new("capsh");
        cmd.arg(format!("--drop={}", drop.join(",")))
            .arg(format!("--shell={}", bin.display()))
            .arg("--");
        cmd
    }
}

fn capsh_available(test: &str) -> bool {
    if Command::new("capsh").arg("--help").output().is_ok() {
        return true;
    }
    difytrace_tests::prerequisite_missing::<()>(
        test,
        &["capsh (Debian package libcap2-bin)".to_string()],
    );
    false
}

/// gunicorn with one gevent worker, calling a downstream from `/chain`.
fn gevent_app() -> Result<(Downstream, Gunicorn)> {
    check_flask_gunicorn()?;
    let down = Downstream::start()?;
    let opts = GunicornOpts {
        workers: 1,
        worker_class: "gevent".into(),
        ..GunicornOpts::default()
    }
    .downstream(down.port());
    let g = Gunicorn::start(DEMO_APP, &opts)?;
    Ok((down, g))
}

/// Starts the agent under capsh with `keep` only, on `g`, exporting to `rx`; checks that
/// its effective, permitted and bounding sets are exactly `keep`.
fn start_with(
    all: &[String],
    keep: &[&str],
    g: &Gunicorn,
    rx: &OtlpReceiver,
    extra: &[&str],
) -> Result<Agent> {
    let mut args = vec![
        "--pid".to_string(),
        g.master_pid().to_string(),
        "--otlp-endpoint".to_string(),
        rx.grpc_endpoint(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    let agent = Agent::start_launched(under_capsh(all, keep), &args, READY_TIMEOUT)?;
    // capsh exec'ed the agent: its pid is the agent's
    let comm = difytrace_tests::procs::comm_of(agent.pid());
    ensure!(
        comm.as_deref() == Some("tracer"),
        "pid {} is {comm:?}",
        agent.pid()
    );
    let want = numbers(all, keep)?;
    for field in ["CapEff", "CapPrm", "CapBnd"] {
        let have = status_caps(agent.pid(), field)?;
        ensure!(
            have == want,
            "{field} of the agent is {have:?}, want {want:?} ({keep:?})"
        );
    }
    ensure!(
        status_caps(agent.pid(), "CapAmb")?.is_empty(),
        "the agent has ambient capabilities"
    );
    Ok(agent)
}

/// `/hello` and `/chain` on `g`: SERVER spans for both, `/chain`'s CLIENT span to the
/// downstream under its SERVER span.
fn ensure_traced(g: &Gunicorn, down: &Downstream, rx: &OtlpReceiver) -> Result<()> {
    let sent = vec![get(g.addr(), "/hello", &[])?, get(g.addr(), "/chain", &[])?];
    ensure!(sent[1].body == "chain:downstream-ok", "{:?}", sent[1]);
    let spans = rx.wait_for(
        |s| all_served(s, &sent) && !clients_to(s, down.port()).is_empty(),
        SPAN_WAIT,
    )?;
    let chain = servers_for(&spans, &sent[1])[0];
    let client = client_of(&spans, chain, down.port())?;
    check_client_child(client, chain, down.port())
}

/// No permission error anywhere in the agent's log.
fn ensure_no_permission_errors(agent: &Agent, keep: &[&str]) -> Result<()> {
    let stderr = agent.stderr();
    for bad in [
        "Operation not permitted",
        "Permission denied",
        "missing CAP_",
    ] {
        ensure!(
            !stderr.contains(bad),
            "the agent met {bad:?} with {keep:?}:\n{}",
            agent.logs(40)
        );
    }
    Ok(())
}

/// The documented set: everything works, the greenlet uprobe included, and no permission
/// error is logged.
#[test]
fn documented_set_traces_with_greenlet_uprobes() -> Result<()> {
    let test = "documented_set_traces_with_greenlet_uprobes";
    let Some(_e2e) = difytrace_tests::e2e(test) else {
        return Ok(());
    };
    if !capsh_available(test) {
        return Ok(());
    }
    let all = all_capabilities()?;
    let keep = CAPABILITIES.to_vec();
    let (down, g) = gevent_app()?;
    let rx = OtlpReceiver::start()?;
    let mut agent = start_with(&all, &keep, &g, &rx, &[])?;
    // the greenlet uprobe sits in the worker's mapping of greenlet's extension module,
    // found through /proc/<pid>/maps and opened through /proc/<pid>/root
    agent
        .wait_stderr(
            |log| {
                log.lines()
                    .any(|l| l.contains("native uprobes attached") && l.contains("Greenlet"))
            },
            Duration::from_secs(60),
        )
        .context("the greenlet uprobe was not attached")?;
    agent
        .wait_stderr(
            |log| log.lines().any(|l| l.contains("OpenSSL uprobes attached")),
            Duration::from_secs(60),
        )
        .context("the OpenSSL uprobes were not attached")?;
    ensure_traced(&g, &down, &rx)?;
    agent.ensure_running()?;
    ensure_no_permission_errors(&agent, &keep)?;
    let status = agent.stop()?;
    ensure!(status.success(), "agent did not exit cleanly: {status}");
    Ok(())
}

/// The agent started with `keep` only must exit, with a message naming `expect`.
fn fails_without(test: &str, keep: &[&str], expect: &[&str]) -> Result<()> {
    let Some(_e2e) = difytrace_tests::e2e(test) else {
        return Ok(());
    };
    if !capsh_available(test) {
        return Ok(());
    }
    let all = all_capabilities()?;
    match Agent::start_launched(under_capsh(&all, keep), &["--pid", "1"], READY_TIMEOUT) {
        Ok(agent) => bail!("the agent started with only {keep:?}:\n{}", agent.logs(40)),
        Err(e) => {
            let msg = format!("{e:#}");
            for word in expect {
                ensure!(
                    msg.contains(word),
                    "the agent's error does not say {word:?}:\n{msg}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn without_cap_bpf_the_agent_says_so() -> Result<()> {
    fails_without(
        "without_cap_bpf_the_agent_says_so",
        &["cap_perfmon", "cap_sys_ptrace", "cap_dac_read_search"],
        &["missing capabilities", "CAP_BPF", "docs/capabilities.md"],
    )
}

#[test]
fn without_cap_perfmon_the_agent_says_so() -> Result<()> {
    fails_without(
        "without_cap_perfmon_the_agent_says_so",
        &["cap_bpf", "cap_sys_ptrace", "cap_dac_read_search"],
        &[
            "missing capabilities",
            "CAP_PERFMON",
            "docs/capabilities.md",
        ],
    )
}
