//! Selection by executable (`--exe`): processes started after the agent are matched when they
//! exec, by the full path of their binary or by its file name.

mod common;

use anyhow::{Context, Result, ensure};
use common::*;
use difytrace_tests::{
    agent::Agent,
    otlp_receiver::{OtlpReceiver, summarize},
    procs::http_get,
    python::{Downstream, python_eval},
};

/// The real interpreter binary behind the venv's `python3` (what /proc/<pid>/exe shows).
fn interpreter_path() -> Result<String> {
    python_eval("import os, sys; print(os.path.realpath(sys.executable))")
        .map(|s| s.trim().to_string())
        .context("resolving the Python interpreter")
}

fn exe_selection(test: &str, exe_arg: &str) -> Result<()> {
    let Some(_e2e) = difytrace_tests::e2e(test) else {
        return Ok(());
    };
    let rx = OtlpReceiver::start()?;
    let agent = Agent::start(&["--exe", exe_arg, "--otlp-endpoint", &rx.grpc_endpoint()])?;
    // Started after the agent: only the exec-time match can select it.
    let downstream = Downstream::start()?;
    let path = format!("/exe-selected/{}", random_hex(8));
    let response = http_get(downstream.addr(), &path, &[])?;
    ensure!(response.status == 200, "downstream answered {response:?}");
    let pid = downstream.pid();
    let spans = rx
        .wait_for(
            |spans| {
                spans.iter().any(|s| {
                    s.pid() == Some(pid) && s.attr_str("url.path").as_deref() == Some(&path)
                })
            },
            SPAN_WAIT,
        )
        .map_err(|e| agent.annotate(e))?;
    let mine: Vec<_> = spans
        .iter()
        .filter(|s| s.pid() == Some(pid))
        .cloned()
        .collect();
    ensure!(
        mine.len() == 1,
        "want exactly one span from the downstream (pid {pid}):\n{}",
        summarize(&mine, 10)
    );
    let span = &mine[0];
    ensure!(
        span.attr_int("http.response.status_code") == Some(200),
        "status: {}",
        span.summary()
    );
    ensure!(
        span.attr_str("http.request.method").as_deref() == Some("GET"),
        "method: {}",
        span.summary()
    );
    Ok(())
}

#[test]
fn exe_selection_by_full_path_at_exec() -> Result<()> {
    let path = interpreter_path()?;
    exe_selection("exe_selection_by_full_path_at_exec", &path)
}

#[test]
fn exe_selection_by_file_name_at_exec() -> Result<()> {
    let path = interpreter_path()?;
    let name = std::path::Path::new(&path)
        .file_name()
        .and_then(|n| n.to_str())
        .context("interpreter path has no file name")?
        .to_string();
    exe_selection("exe_selection_by_file_name_at_exec", &name)
}
