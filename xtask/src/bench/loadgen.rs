//! The project's own load generator, `tests/fixtures/grpcload` (Go): gRPC unary calls for the
//! grpc-go target, and HTTP at a fixed rate for every target. Debian's wrk has no fixed-rate
//! mode (wrk2 is not packaged), so fixed-rate runs use it for HTTP too. At a fixed rate each
//! request is due at start + i/rate and its latency runs from that due time, so a stalled
//! server (or agent) shows in the percentiles instead of slowing the sender down.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::WrkResult;
use crate::say;
use crate::util::{command, display, workspace_root};

/// Where the fixture lives.
const SOURCE: &str = "tests/fixtures/grpcload";

/// What one target is loaded with.
#[derive(Debug, Clone)]
pub(super) enum Workload {
    /// HTTP/1.1: wrk at saturation (with a Lua script for POSTs), loadgen at a fixed rate.
    Http {
        url: String,
        wrk_script: Option<PathBuf>,
        /// A JSON body to POST (instead of a GET).
        post_json: Option<String>,
    },
    /// gRPC `UnaryEcho` of the echo service at `target` (host:port): always loadgen.
    Grpc { target: String },
}

/// Builds the load generator into `dir` (once per bench run).
pub(super) fn build(dir: &Path) -> Result<PathBuf> {
    let bin = dir.join("loadgen");
    if bin.is_file() {
        return Ok(bin);
    }
    let mut cmd = command("go");
    cmd.current_dir(workspace_root().join(SOURCE))
        .args(["build", "-o"])
        .arg(&bin)
        .arg(".");
    say!("$ {}", display(&cmd));
    crate::util::capture(&mut cmd)
        .context("building tests/fixtures/grpcload (is `go` on PATH?)")?;
    Ok(bin)
}

/// The loadgen command line for `workload`, without the binary.
pub(super) fn args(
    workload: &Workload,
    workers: u32,
    conns: u32,
    secs: u64,
    rate: Option<u32>,
) -> Vec<String> {
    let mut args: Vec<String> = Vec::new();
    match workload {
        Workload::Http { url, post_json, .. } => {
            args.extend(["-proto".into(), "http".into(), "-url".into(), url.clone()]);
            if let Some(body) = post_json {
                args.extend([
                    "-method".into(),
                    "POST".into(),
                    "-body".into(),
                    body.clone(),
                    "-header".into(),
                    "Content-Type: application/json".into(),
                ]);
            }
        }
        Workload::Grpc { target } => {
            args.extend([
                "-proto".into(),
                "grpc".into(),
                "-target".into(),
                target.clone(),
                "-conns".into(),
                conns.to_string(),
            ]);
        }
    }
    args.extend([
        "-c".into(),
        workers.to_string(),
        "-d".into(),
        format!("{secs}s"),
    ]);
    if let Some(rate) = rate {
        args.extend(["-rate".into(), rate.to_string()]);
    }
    args
}

/// Runs loadgen and reads its JSON line.
pub(super) fn run(bin: &Path, args: &[String]) -> Result<WrkResult> {
    let mut cmd = command(bin);
    cmd.args(args);
    let out = crate::util::capture(&mut cmd)?;
    parse(&out).with_context(|| format!("could not read loadgen's output:\n{out}"))
}

/// loadgen's one-line JSON object (flat; numbers and one string) as a [`WrkResult`].
pub(super) fn parse(out: &str) -> Result<WrkResult> {
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with('{'))
        .context("no JSON line")?;
    let num = |key: &str| field(line, key).and_then(|v| v.parse::<f64>().ok());
    let Some(rps) = num("rps") else {
        bail!("no rps field");
    };
    let mut errors = Vec::new();
    if let Some(n) = num("errors").filter(|n| *n > 0.0) {
        let first = field(line, "first_error").unwrap_or_default();
        errors.push(format!("{n:.0} failed requests (first: {first})"));
    }
    if let Some(n) = num("late").filter(|n| *n > 0.0) {
        errors.push(format!(
            "{n:.0} requests never started: the rate was not kept"
        ));
    }
    Ok(WrkResult {
        requests_per_sec: rps,
        p50_us: num("p50_us"),
        p99_us: num("p99_us"),
        errors,
    })
}

/// The raw value of `"key":` in a flat JSON object: a number as written, a string unquoted
/// (escapes other than `\"` and `\\` kept as they are).
fn field(line: &str, key: &str) -> Option<String> {
    let pat = format!("\"{key}\":");
    let rest = line[line.find(&pat)? + pat.len()..].trim_start();
    if let Some(s) = rest.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = s.chars();
        while let Some(c) = chars.next() {
            match c {
                '"' => return Some(out),
                '\\' => out.push(chars.next()?),
                c => out.push(c),
            }
        }
        None
    } else {
        let end = rest.find([',', '}']).unwrap_or(rest.len());
        Some(rest[..end].trim().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_loadgen_json() {
        let out = r#"{"proto":"grpc","mode":"fixed-rate","rate":500,"workers":16,"requests":5000,"errors":2,"late":0,"seconds":10,"rps":500,"p50_us":412.5,"p90_us":600,"p99_us":1490.25,"p999_us":3000,"max_us":9000,"first_error":"rpc error: code = Unavailable, desc = \"x\""}"#;
        let r = parse(out).unwrap();
        assert_eq!(r.requests_per_sec, 500.0);
        assert_eq!(r.p50_us, Some(412.5));
        assert_eq!(r.p99_us, Some(1490.25));
        assert_eq!(
            r.errors,
            vec![
                "2 failed requests (first: rpc error: code = Unavailable, desc = \"x\")"
                    .to_string()
            ]
        );
        assert!(parse("no json").is_err());
        assert!(parse(r#"{"requests":1}"#).is_err());
    }

    #[test]
    fn command_lines() {
        let grpc = Workload::Grpc {
            target: "127.0.0.1:9".into(),
        };
        assert_eq!(
            args(&grpc, 16, 2, 10, Some(500)).join(" "),
            "-proto grpc -target 127.0.0.1:9 -conns 2 -c 16 -d 10s -rate 500"
        );
        let post = Workload::Http {
            url: "http://127.0.0.1:9/x".into(),
            wrk_script: None,
            post_json: Some("{}".into()),
        };
        assert_eq!(
            args(&post, 4, 2, 3, None).join(" "),
            "-proto http -url http://127.0.0.1:9/x -method POST -body {} -header Content-Type: application/json -c 4 -d 3s"
        );
    }
}
