//! The agent under test: started with arguments, logs to files, waited for through its
//! ready file, stopped on drop (SIGINT, then SIGKILL), logs printed when a test fails.

use std::path::PathBuf;
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::procs::Proc;
use crate::{TempDir, tail, workspace_root};

/// How long the agent gets to attach its probes.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The agent binary: `DIFYTRACE_BIN`, else `<workspace>/target/release/tracer` (or under
/// `CARGO_TARGET_DIR` when that is set).
pub fn agent_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("DIFYTRACE_BIN").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(t).join("release").join("tracer");
        if p.is_file() {
            return p;
        }
    }
    workspace_root()
        .join("target")
        .join("release")
        .join("tracer")
}

/// A running agent.
pub struct Agent {
    proc: Proc,
    dir: TempDir,
    args: Vec<String>,
    ready_file: PathBuf,
}

impl Agent {
    /// Starts the agent with `args` (plus `--ready-file`) and waits for it to be ready.
    pub fn start<S: AsRef<str>>(args: &[S]) -> Result<Agent> {
        Self::start_with_timeout(args, READY_TIMEOUT)
    }

    pub fn start_with_timeout<S: AsRef<str>>(args: &[S], ready_timeout: Duration) -> Result<Agent> {
        Self::start_launched(|bin| Command::new(bin), args, ready_timeout)
    }

    /// As [`Agent::start`], with extra environment variables.
    pub fn start_with_env<S: AsRef<str>>(args: &[S], env: &[(&str, &str)]) -> Result<Agent> {
        Self::start_inner(|bin| Command::new(bin), args, env, READY_TIMEOUT)
    }

    /// Like [`Agent::start_with_timeout`], with the command that runs the agent built by
    /// `launcher` from the binary's path (e.g. under capsh); the arguments are appended.
    pub fn start_launched<S: AsRef<str>>(
        launcher: impl FnOnce(&std::path::Path) -> Command,
        args: &[S],
        ready_timeout: Duration,
    ) -> Result<Agent> {
        Self::start_inner(launcher, args, &[], ready_timeout)
    }

    fn start_inner<S: AsRef<str>>(
        launcher: impl FnOnce(&std::path::Path) -> Command,
        args: &[S],
        env: &[(&str, &str)],
        ready_timeout: Duration,
    ) -> Result<Agent> {
        let bin = agent_binary();
        if !bin.is_file() {
            bail!(
                "agent binary {} not found (build it with `cargo +1.99.0 build --release -p tracer` or set DIFYTRACE_BIN)",
                bin.display()
            );
        }
        let dir = TempDir::new("agent")?;
        let ready_file = dir.join("ready");
        let args: Vec<String> = args.iter().map(|a| a.as_ref().to_string()).collect();
        let mut cmd = launcher(&bin);
        cmd.args(&args)
            .arg("--ready-file")
            .arg(&ready_file)
            // the agent's own traffic and state stay out of the tests' way
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_PROTOCOL")
            .envs(env.iter().copied());
        if std::env::var_os("RUST_BACKTRACE").is_none() {
            cmd.env("RUST_BACKTRACE", "1");
        }
        let mut proc = Proc::spawn("tracer", cmd, dir.path())?;
        proc.stop_signal = libc::SIGINT;
        proc.stop_grace = Duration::from_secs(10);
        proc.print_logs_on_drop = false; // Agent's drop prints them
        let mut agent = Agent {
            proc,
            dir,
            args,
            ready_file,
        };
        agent.wait_ready(ready_timeout)?;
        Ok(agent)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            if self.ready_file.exists() {
                return Ok(());
            }
            if let Some(st) = self.proc.try_exit() {
                bail!(
                    "agent exited ({st}) before it was ready; args {:?}\n{}",
                    self.args,
                    self.logs(200)
                );
            }
            if start.elapsed() >= timeout {
                bail!(
                    "agent not ready (no {}) after {timeout:?}; args {:?}\n{}",
                    self.ready_file.display(),
                    self.args,
                    self.logs(200)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// Directory holding the agent's stdout/stderr files and ready file.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    pub fn stdout(&self) -> String {
        self.proc.stdout()
    }

    pub fn stderr(&self) -> String {
        self.proc.stderr()
    }

    /// Last `n` lines of stdout and stderr, labelled, for failure messages.
    pub fn logs(&self, n: usize) -> String {
        self.proc.log_tail(n)
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }

    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.proc.try_exit()
    }

    /// Fails (with the logs) unless the agent is still running.
    pub fn ensure_running(&mut self) -> Result<()> {
        if let Some(st) = self.proc.try_exit() {
            bail!("agent exited unexpectedly ({st})\n{}", self.logs(200));
        }
        Ok(())
    }

    /// Waits until the agent's stdout satisfies `pred`; returns the stdout.
    pub fn wait_stdout(
        &mut self,
        mut pred: impl FnMut(&str) -> bool,
        timeout: Duration,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.stdout();
            if pred(&out) {
                return Ok(out);
            }
            if Instant::now() >= deadline {
                bail!(
                    "timed out after {timeout:?} waiting for the agent's stdout; stdout tail:\n{}\n{}",
                    tail(&out, 80),
                    self.logs(60)
                );
            }
            self.ensure_running()?;
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the agent's stderr (its log) satisfies `pred`.
    pub fn wait_stderr(
        &mut self,
        mut pred: impl FnMut(&str) -> bool,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&self.stderr()) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "timed out after {timeout:?} waiting for the agent's log\n{}",
                    self.logs(60)
                );
            }
            self.ensure_running()?;
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Adds the agent's log tail to an error.
    pub fn annotate(&self, e: anyhow::Error) -> anyhow::Error {
        e.context(format!("agent logs:\n{}", self.logs(120)))
    }

    /// Stops the agent (SIGINT, SIGKILL after 10 s) and returns its exit status.
    pub fn stop(mut self) -> Result<ExitStatus> {
        self.proc.stop().context("agent exit status unavailable")
    }

    /// Stops the agent and returns the `key=value` fields of its last `stats` log line (the
    /// one it prints on the way out).
    pub fn stop_with_stats(mut self) -> Result<std::collections::BTreeMap<String, u64>> {
        let status = self.proc.stop().context("agent exit status unavailable")?;
        anyhow::ensure!(status.success(), "agent exited with {status}");
        let stderr = self.stderr();
        let line = stderr
            .lines()
            .rev()
            .find(|l| l.contains(" stats "))
            .context("no stats line in the agent's log")?;
        Ok(line
            .split_whitespace()
            .filter_map(|w| {
                let (k, v) = w.split_once('=')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.proc.stop();
        // Printed output is captured by the test harness and shown only for failing tests
        // (panicking or returning Err), or with --nocapture.
        eprintln!(
            "agent {:?} (pid {}, {}):\n{}",
            self.args,
            self.proc.pid(),
            match self.proc.try_exit() {
                Some(st) => st.to_string(),
                None => "running".to_string(),
            },
            self.proc.log_tail(150)
        );
    }
}
