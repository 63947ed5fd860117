//! `cargo xtask fuzz`: every parser's fuzz target for a bounded time (CI runs it).
//!
//! New inputs go to a temporary corpus directory, so the seeds in tracer/fuzz/corpus stay as
//! committed; a crash leaves its input in tracer/fuzz/artifacts/<target>/ and fails the step.

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::say;
use crate::util::{EBPF_TOOLCHAIN, USER_TOOLCHAIN, command, run, workspace_root};

/// The fuzz targets of tracer/fuzz, one per parser.
pub const TARGETS: &[&str] = &["http1", "http2", "stdio", "gobin", "genai"];
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Installs cargo-fuzz when it is missing.
fn ensure_cargo_fuzz() -> Result<()> {
    let present = command("cargo")
        .args(["fuzz", "--version"])
        .output()
        .map(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION)
        })
        .unwrap_or(false);
    if present {
        say!("cargo-fuzz {CARGO_FUZZ_VERSION}: present");
        return Ok(());
    }
    say!("cargo-fuzz: installing {CARGO_FUZZ_VERSION}");
    run(command("cargo").arg(format!("+{USER_TOOLCHAIN}")).args([
        "install",
        "cargo-fuzz",
        "--locked",
        "--version",
        CARGO_FUZZ_VERSION,
    ]))
    .context("installing cargo-fuzz")
}

/// Runs each target for `seconds`.
pub fn fuzz(seconds: u32) -> Result<()> {
    ensure_cargo_fuzz()?;
    let crate_dir = workspace_root().join("tracer");
    for target in TARGETS {
        let scratch: PathBuf = std::env::temp_dir().join(format!("difytrace-fuzz-{target}"));
        // Fresh each run: what a previous run found is not a seed.
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch)
            .with_context(|| format!("creating {}", scratch.display()))?;
        let seeds = crate_dir.join("fuzz/corpus").join(target);
        say!("fuzz {target}: {seconds} s");
        run(command("cargo")
            .arg(format!("+{EBPF_TOOLCHAIN}"))
            .args(["fuzz", "run", target])
            .arg(&scratch)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg("-print_final_stats=1")
            .current_dir(&crate_dir))
        .with_context(|| {
            format!("fuzz target {target} failed (input in tracer/fuzz/artifacts/{target}/)")
        })?;
        let _ = std::fs::remove_dir_all(&scratch);
    }
    Ok(())
}
