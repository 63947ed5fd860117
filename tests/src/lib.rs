//! Harness for the difytrace end-to-end tests.
//!
//! The tests in `tests/` start the real agent binary (as root), real processes for it to
//! watch (gunicorn + Flask, plain Python HTTP servers) and a receiver for what it exports:
//! either the in-test OTLP receiver of [`otlp_receiver`] or a real Jaeger ([`jaeger`]).
//!
//! Environment read by the harness:
//! - `DIFYTRACE_BIN`: the agent binary (default `$CARGO_TARGET_DIR/release/tracer` when
//!   that exists, else `<workspace>/target/release/tracer`).
//! - `DIFYTRACE_PYTHON`: a Python with flask and gunicorn installed (default
//!   `<workspace>/target/venv/bin/python` when it exists, else `python3`).
//! - `DIFYTRACE_JAEGER`: the Jaeger binary (default `$HOME/go/bin/jaeger`, else `jaeger` on
//!   `PATH`).
//! - `DIFYTRACE_SKIP_E2E=1`: end-to-end tests whose prerequisites are missing (root, agent
//!   binary, Jaeger) print "skipped" and pass instead of failing.
//! - `DIFYTRACE_KEEP_TMP=1`: keep the temporary directories (logs, app files) of every test,
//!   not only of failed ones.

pub mod agent;
pub mod agentstats;
pub mod bpfmaps;
pub mod cgroups;
pub mod cri;
pub mod difystack;
pub mod docker;
pub mod genai;
pub mod goapp;
pub mod grpc;
pub mod jaeger;
pub mod kube_tools;
pub mod nginx;
pub mod otlp_receiver;
pub mod plugin;
pub mod procs;
pub mod python;
mod tempdir;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub use tempdir::TempDir;

/// The cargo workspace this crate belongs to.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate lives inside the workspace")
        .to_path_buf()
}

/// Whether the user asked to skip end-to-end tests whose prerequisites are missing.
pub fn skip_requested() -> bool {
    matches!(
        std::env::var("DIFYTRACE_SKIP_E2E").as_deref(),
        Ok("1") | Ok("true") | Ok("yes")
    )
}

static E2E_LOCK: Mutex<()> = Mutex::new(());

/// Held by a running end-to-end test: tests of one binary run one at a time, since each
/// starts its own agent that would otherwise also see the other tests' processes.
pub struct E2e {
    _lock: MutexGuard<'static, ()>,
}

/// Checks what every end-to-end test needs (root, the agent binary) and serialises the
/// tests. Returns `None` (after printing "skipped") when something is missing and
/// `DIFYTRACE_SKIP_E2E=1`; panics with a clear message when something is missing otherwise.
pub fn e2e(test: &str) -> Option<E2e> {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root privileges (the agent loads eBPF programs)".to_string());
    }
    let bin = agent::agent_binary();
    if !bin.is_file() {
        missing.push(format!(
            "the agent binary {} (build it with `cargo +1.99.0 build --release -p tracer` or set DIFYTRACE_BIN)",
            bin.display()
        ));
    }
    if !missing.is_empty() {
        return prerequisite_missing(test, &missing);
    }
    let lock = E2E_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    Some(E2e { _lock: lock })
}

/// Shared reaction to missing prerequisites: skip (when asked to) or fail loudly.
pub fn prerequisite_missing<T>(test: &str, missing: &[String]) -> Option<T> {
    let what = missing.join("; ");
    if skip_requested() {
        println!("skipped {test}: missing {what} (DIFYTRACE_SKIP_E2E=1)");
        eprintln!("skipped {test}: missing {what} (DIFYTRACE_SKIP_E2E=1)");
        None
    } else {
        panic!(
            "end-to-end test {test} cannot run: missing {what}. \
             Set DIFYTRACE_SKIP_E2E=1 to skip end-to-end tests instead of failing."
        );
    }
}

/// Polls `f` every `every` until it returns `Some` or `timeout` passes.
pub fn poll<T>(timeout: Duration, every: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// Last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].join("\n")
}

/// Reads a file as (lossy) UTF-8; an empty string when it cannot be read.
pub fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}
