//! `cargo xtask test`: what CI runs (.ci/run), from an empty machine to a test report.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::agent::{Profile, build_agent};
use crate::say;
use crate::setup::{self, HostChecks};
use crate::util::{cargo_user, fmt_duration, run, venv_python};

/// Packages that are linted and tested on the host. tracer-ebpf is left out: it only
/// builds for the BPF target (tracer's build script builds it).
const HOST_PACKAGES: &[&str] = &["tracer", "tracer-common", "xtask", "difytrace-tests"];
/// xtask's own unit tests are cheap, so they run too.
const TEST_PACKAGES: &[&str] = &["tracer", "tracer-common", "difytrace-tests", "xtask"];

/// Seconds per fuzz target in `cargo xtask test`.
const FUZZ_SECONDS: u32 = 20;

struct Step {
    name: &'static str,
    took: Duration,
    result: Result<()>,
}

/// `extra` goes to the test binaries after `--test-threads=1` (a name filter, say).
pub fn test(extra: &[String]) -> Result<()> {
    let started = Instant::now();
    let mut steps: Vec<Step> = Vec::new();
    let mut timed = |name: &'static str, f: &mut dyn FnMut() -> Result<()>| -> bool {
        say!("== {name}");
        let t = Instant::now();
        let result = f();
        let ok = result.is_ok();
        if let Err(e) = &result {
            say!("{name} failed: {e:#}");
        }
        steps.push(Step {
            name,
            took: t.elapsed(),
            result,
        });
        ok
    };

    // Without the toolchains, the agent build or the host facts, nothing after can run.
    let mut ok = timed("setup", &mut || {
        setup::setup(setup::Options {
            host_checks: HostChecks::FailFirst,
            python_venv: true,
            jaeger: true,
        })
    });
    if ok {
        // Formatting and lints do not block the tests: one run reports all problems.
        timed("fmt", &mut || {
            run(cargo_user().args(["fmt", "--all", "--", "--check"]))
        });
        timed("clippy", &mut || {
            let mut cmd = cargo_user();
            cmd.arg("clippy");
            for p in HOST_PACKAGES {
                cmd.args(["-p", p]);
            }
            run(cmd.args(["--all-targets", "--", "-D", "warnings"]))
        });
        ok = timed("build agent", &mut || {
            build_agent(Profile::Release).map(|_| ())
        });
    }
    if ok {
        timed("tests", &mut || {
            let jaeger = setup::jaeger_bin()?;
            let mut cmd = cargo_user();
            cmd.args(["test", "--release"]);
            for p in TEST_PACKAGES {
                cmd.args(["-p", p]);
            }
            cmd.args(["--", "--test-threads=1"])
                .args(extra)
                .env("DIFYTRACE_BIN", crate::agent::agent_bin(Profile::Release))
                .env("DIFYTRACE_PYTHON", venv_python())
                .env("DIFYTRACE_JAEGER", jaeger);
            run(&mut cmd)
        });
    }

    if ok {
        // Bounded: CI time is shared; longer runs are `cargo xtask fuzz --seconds N`.
        timed("fuzz", &mut || crate::fuzz::fuzz(FUZZ_SECONDS));
    }

    say!("summary:");
    for s in &steps {
        let status = if s.result.is_ok() { "ok" } else { "FAILED" };
        say!("  {:<12} {:<7} {:>8}", s.name, status, fmt_duration(s.took));
    }
    say!(
        "  {:<12} {:<7} {:>8}",
        "total",
        "",
        fmt_duration(started.elapsed())
    );
    let failed: Vec<&str> = steps
        .iter()
        .filter(|s| s.result.is_err())
        .map(|s| s.name)
        .collect();
    if !failed.is_empty() {
        bail!("failed: {}", failed.join(", "));
    }
    Ok(())
}
