//! `cargo xtask`: one entry point from a fresh machine to a running agent, a test report or
//! a benchmark.
//!
//! This binary is built by the machine's default toolchain, which may be too old for the
//! agent's crates; it installs and calls the pinned toolchains itself (see util.rs).

mod agent;
mod bench;
mod fuzz;
mod go_offsets;
mod setup;
mod testing;
mod util;

use std::process::ExitCode;

use anyhow::{Context, Result, bail};

use agent::Profile;
use setup::HostChecks;

const USAGE: &str = "\
cargo xtask: developer commands for difytrace

USAGE:
    cargo xtask <COMMAND> [OPTIONS]

COMMANDS:
    setup [--with-test-deps]
        Install what is missing: rustup toolchains 1.99.0 and nightly-2026-06-20,
        Debian packages (LLVM 22 dev files, wrk, nginx), bpf-linker 0.13.0; mount tracefs;
        check the kernel (>= 6.1, BTF) and root. --with-test-deps adds the Python venv
        (target/venv: flask, gunicorn, gevent) and Jaeger v1.76.0.
    build [--debug]
        setup, then build the agent (target/release/tracer, or target/debug with --debug).
    run [--debug] [--] [AGENT ARGS...]
        build, then exec the agent as root. Everything after `--`, and every argument
        xtask does not know, goes to the agent: cargo xtask run -- --comm gunicorn
    test [-- TEST ARGS...]
        setup --with-test-deps, fmt check, clippy, build the release agent, run the tests.
        This is what CI runs. TEST ARGS go to the test binaries (a name filter, say).
    bench [--duration SECS] [--rounds N] [--connections C] [--threads T]
          [--warmup SECS] [--targets gunicorn,gevent,go,grpc] [--rate R] [--off-only] [--no-docs]
          [--agent-arg ARG]... [--otlp]
        Load each target (gunicorn/Flask sync workers; the same on gevent workers; the Go
        gin service of tests/fixtures/godaemon calling a Go tool service; the grpc-go echo
        server of tests/fixtures/grpc, loaded by tests/fixtures/grpcload) with wrk,
        alternating rounds without and with the agent (defaults: all targets, 10 s, 3 rounds each, 16
        connections, 2 threads, 2 s warm-up); print a table per target and write it into
        docs/benchmarks.md (not with --no-docs). --rate R: open loop at R req/s with
        tests/fixtures/grpcload for every target (latency from each request's due time).
        --off-only runs the baseline alone (no agent, no root, docs untouched).
        --agent-arg ARG (repeatable) passes ARG to the agent, e.g. --agent-arg=--no-go; the
        results get docs sections of their own. --otlp: the agent exports over OTLP
        (http/protobuf) to a stand-in backend on 127.0.0.1 instead of printing console spans
        (own docs sections too).
    fuzz [--seconds N]
        Run every parser's fuzz target (tracer/fuzz: http1, http2, stdio, gobin) for N seconds
        each (default 60) with cargo-fuzz on the pinned nightly; installs cargo-fuzz when
        missing. `test` runs it for 20 s each.
    go-offsets
        Regenerate tracer/src/discover/gobin/offsets_table.json: build xtask/go-offsets-probe
        with every Go 1.19-1.27 release the module proxy serves (and each gin version with
        the newest of each minor) and read the struct offsets from the DWARF (~30-45 min).
    help
        This text.
";

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        print!("{USAGE}");
        bail!("no command given");
    };
    match command.as_str() {
        "help" | "--help" | "-h" => {
            print!("{USAGE}");
            Ok(())
        }
        "setup" => {
            let mut with_test_deps = false;
            for arg in rest {
                match arg.as_str() {
                    "--with-test-deps" => with_test_deps = true,
                    other => bail!("setup: unknown option {other:?} (see cargo xtask help)"),
                }
            }
            setup::setup(setup::Options {
                host_checks: HostChecks::FailAtEnd,
                python_venv: with_test_deps,
                jaeger: with_test_deps,
            })
        }
        "build" => {
            let mut profile = Profile::Release;
            for arg in rest {
                match arg.as_str() {
                    "--debug" => profile = Profile::Debug,
                    other => bail!("build: unknown option {other:?} (see cargo xtask help)"),
                }
            }
            let bin = agent::build(profile, HostChecks::Warn)?;
            say!("built {}", bin.display());
            Ok(())
        }
        "run" => {
            let (profile, agent_args) = parse_run_args(rest);
            agent::run_agent(profile, &agent_args)
        }
        "test" => {
            let extra = match rest.split_first() {
                None => &[][..],
                Some((dashdash, extra)) if dashdash == "--" => extra,
                Some((other, _)) => {
                    bail!("test: unknown option {other:?}; test binary args go after `--`")
                }
            };
            testing::test(extra)
        }
        "fuzz" => {
            let mut seconds = 60;
            let mut iter = rest.iter();
            while let Some(arg) = iter.next() {
                match arg.as_str() {
                    "--seconds" => {
                        seconds = iter
                            .next()
                            .and_then(|v| v.parse().ok())
                            .context("--seconds needs a number")?;
                    }
                    other => bail!("fuzz: unknown option {other:?} (see cargo xtask help)"),
                }
            }
            fuzz::fuzz(seconds)
        }
        "go-offsets" => go_offsets::go_offsets(),
        "bench" => {
            let mut opts = parse_bench_args(rest)?;
            opts.command_line = format!("cargo xtask bench {}", rest.join(" "))
                .trim_end()
                .to_string();
            bench::bench(&opts)
        }
        other => {
            print!("{USAGE}");
            bail!("unknown command {other:?}")
        }
    }
}

/// xtask's own flags come before `--`; the rest, and anything xtask does not know, is the
/// agent's (so `cargo xtask run --comm gunicorn` works without the `--`).
fn parse_run_args(args: &[String]) -> (Profile, Vec<String>) {
    let mut profile = Profile::Release;
    let mut agent_args = Vec::new();
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        match arg.as_str() {
            "--" => {
                agent_args.extend(iter.cloned());
                break;
            }
            "--debug" => profile = Profile::Debug,
            _ => agent_args.push(arg.clone()),
        }
    }
    (profile, agent_args)
}

fn parse_bench_args(args: &[String]) -> Result<bench::Options> {
    let mut opts = bench::Options::default();
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        // Both `--rounds 5` and `--rounds=5`.
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut value = || -> Result<String> {
            match &inline {
                Some(v) => Ok(v.clone()),
                None => iter
                    .next()
                    .cloned()
                    .with_context(|| format!("bench: {name} needs a value")),
            }
        };
        match name {
            "--duration" => opts.duration_secs = parse_num(name, &value()?)?,
            "--rounds" => opts.rounds = parse_num(name, &value()?)?,
            "--connections" => opts.connections = parse_num(name, &value()?)?,
            "--threads" => opts.threads = parse_num(name, &value()?)?,
            "--warmup" => opts.warmup_secs = parse_num(name, &value()?)?,
            "--targets" => {
                opts.targets = value()?
                    .split(',')
                    .map(bench::Target::parse)
                    .collect::<Result<Vec<_>>>()?
            }
            "--rate" => opts.rate = Some(parse_num(name, &value()?)?),
            "--off-only" => opts.off_only = true,
            "--no-docs" => opts.write_docs = false,
            "--agent-arg" => opts.agent_args.push(value()?),
            "--otlp" => opts.otlp = true,
            other => bail!("bench: unknown option {other:?} (see cargo xtask help)"),
        }
    }
    Ok(opts)
}

fn parse_num<T: std::str::FromStr>(name: &str, value: &str) -> Result<T> {
    value
        .parse()
        .ok()
        .with_context(|| format!("bench: {name} wants a whole number, got {value:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn run_args_go_to_the_agent() {
        let (p, a) = parse_run_args(&strings(&["--comm", "gunicorn", "--debug"]));
        assert_eq!(p, Profile::Debug);
        assert_eq!(a, strings(&["--comm", "gunicorn"]));
        let (p, a) = parse_run_args(&strings(&["--", "--debug", "--pid", "1"]));
        assert_eq!(p, Profile::Release);
        assert_eq!(a, strings(&["--debug", "--pid", "1"]));
    }

    #[test]
    fn bench_args() {
        let o =
            parse_bench_args(&strings(&["--rounds=5", "--duration", "3", "--off-only"])).unwrap();
        assert_eq!((o.rounds, o.duration_secs, o.off_only), (5, 3, true));
        assert_eq!(o.connections, 16);
        assert!(parse_bench_args(&strings(&["--rounds"])).is_err());
        assert!(parse_bench_args(&strings(&["--rounds", "x"])).is_err());
        assert!(parse_bench_args(&strings(&["--bogus"])).is_err());
    }
}
