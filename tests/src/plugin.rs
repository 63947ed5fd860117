//! The Dify plugin fixtures of `tests/fixtures/plugin`: a real `dify_plugin` tool plugin in a
//! daemon-style working directory, and a Go stand-in for the plugin daemon that spawns it on
//! stdin/stdout pipes and sends it tool invocations.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::procs::Proc;
use crate::{TempDir, workspace_root};

/// The fixture's plugin, as its manifest names it.
pub const PLUGIN_NAME: &str = "echo_tool";
pub const PLUGIN_VERSION: &str = "0.0.1";
/// comm of the Go stand-in daemon (its binary's name).
pub const DAEMON_COMM: &str = "plugindaemon";

/// The prepared fixtures: plugin working directory and daemon binary.
pub struct PluginFixture {
    pub workdir: PathBuf,
    pub daemon_bin: PathBuf,
}

/// One session as the stand-in daemon reports it (`session <id> mode=.. chunks=.. result=..`).
#[derive(Debug, Clone)]
pub struct SessionReport {
    pub id: String,
    pub chunks: u32,
    pub result: String,
    pub line: String,
}

/// What one run of the daemon printed.
#[derive(Debug)]
pub struct DaemonRun {
    pub plugin_pid: u32,
    pub daemon_pid: u32,
    pub sessions: Vec<SessionReport>,
    pub stdout: String,
    pub stderr: String,
}

impl PluginFixture {
    /// Lays out the plugin (venv with dify_plugin from PyPI on the first run) and builds the
    /// daemon. Both are reused across runs.
    pub fn prepare() -> Result<PluginFixture> {
        let root = workspace_root();
        let fixtures = root.join("tests/fixtures/plugin");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        let out = Command::new("python3")
            .arg(fixtures.join("setup.py"))
            .arg(target.join("plugin-work"))
            .output()
            .context("running tests/fixtures/plugin/setup.py")?;
        ensure!(
            out.status.success(),
            "plugin setup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let workdir = PathBuf::from(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .last()
                .context("setup.py printed no working directory")?
                .trim(),
        );
        ensure!(
            workdir.join("manifest.yaml").is_file(),
            "no manifest in {}",
            workdir.display()
        );
        let daemon_bin = target.join(DAEMON_COMM);
        let out = Command::new("go")
            .args(["build", "-o"])
            .arg(&daemon_bin)
            .arg(".")
            .current_dir(fixtures.join("daemon"))
            .output()
            .context("running go build for the plugin daemon stand-in")?;
        ensure!(
            out.status.success(),
            "go build failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(PluginFixture {
            workdir,
            daemon_bin,
        })
    }

    /// The service name difytrace gives the plugin process.
    pub fn plugin_service(&self) -> String {
        format!("{DAEMON_COMM}_plugin_{PLUGIN_NAME}_{PLUGIN_VERSION}")
    }

    /// Runs the daemon with `args` (after `-workdir`) until it exits, within `timeout`.
    pub fn run(&self, args: &[&str], timeout: Duration) -> Result<DaemonRun> {
        self.start(args)?.wait(timeout)
    }

    /// Starts the daemon with `args` (after `-workdir`) and returns while it runs.
    pub fn start(&self, args: &[&str]) -> Result<RunningDaemon> {
        let dir = TempDir::new("plugindaemon")?;
        let mut cmd = Command::new(&self.daemon_bin);
        cmd.arg("-workdir").arg(&self.workdir).args(args);
        let proc = Proc::spawn(DAEMON_COMM, cmd, dir.path())?;
        Ok(RunningDaemon {
            proc,
            _dir: dir,
            kill_expected: args.contains(&"-kill-after"),
        })
    }
}

/// A daemon started by [`PluginFixture::start`].
pub struct RunningDaemon {
    proc: Proc,
    _dir: TempDir,
    kill_expected: bool,
}

impl RunningDaemon {
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Waits until the daemon printed a line starting with `prefix`; returns that line.
    pub fn wait_line(&self, prefix: &str, timeout: Duration) -> Result<String> {
        crate::poll(timeout, Duration::from_millis(50), || {
            self.proc
                .stdout()
                .lines()
                .find(|l| l.starts_with(prefix))
                .map(str::to_string)
        })
        .with_context(|| {
            format!(
                "plugin daemon printed no `{prefix}` line within {timeout:?}:\n{}",
                self.proc.log_tail(40)
            )
        })
    }

    /// Waits for the daemon to exit and returns what it reported.
    pub fn wait(mut self, timeout: Duration) -> Result<DaemonRun> {
        let daemon_pid = self.proc.pid();
        let status = self.proc.wait_exit(timeout);
        let (stdout, stderr) = (self.proc.stdout(), self.proc.stderr());
        let Some(status) = status else {
            self.proc.stop();
            bail!("plugin daemon did not finish within {timeout:?}:\n{stdout}\n{stderr}");
        };
        // With -kill-after the daemon reports the sessions the kill interrupted (exit 3).
        ensure!(
            status.success() || self.kill_expected,
            "plugin daemon failed ({status}):\n{stdout}\n{stderr}"
        );
        Ok(DaemonRun {
            plugin_pid: parse_plugin_pid(&stdout).unwrap_or(0),
            daemon_pid,
            sessions: parse_sessions(&stdout),
            stdout,
            stderr,
        })
    }
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// `session <id> mode=echo chunks=3 result=end ...` lines.
pub fn parse_sessions(stdout: &str) -> Vec<SessionReport> {
    stdout
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("session ")?;
            let id = rest.split_whitespace().next()?.to_string();
            Some(SessionReport {
                id,
                chunks: field(line, "chunks")?.parse().ok()?,
                result: field(line, "result")?.to_string(),
                line: line.to_string(),
            })
        })
        .collect()
}

/// `plugin started pid=<n> ...`.
pub fn parse_plugin_pid(stdout: &str) -> Option<u32> {
    stdout
        .lines()
        .find(|l| l.starts_with("plugin started"))
        .and_then(|l| field(l, "pid"))
        .and_then(|p| p.parse().ok())
}

/// Whether the fixture's prerequisites (python3 with venv/pip, go) are on this machine.
pub fn tools_missing() -> Vec<String> {
    let mut missing = Vec::new();
    for (tool, arg) in [("python3", "--version"), ("go", "version")] {
        let ok = Command::new(tool)
            .arg(arg)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !ok {
            missing.push(format!("`{tool}` on PATH"));
        }
    }
    missing
}

/// The directory of the fixture sources (for error messages).
pub fn fixtures_dir() -> PathBuf {
    workspace_root().join("tests/fixtures/plugin")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_daemon_report() {
        let out = "plugin started pid=9035 cmd=\"x -m main\" cwd=/w\nplugin ready (first heartbeat) pid=9035 after=530ms\nsession 209f8a86-f5be mode=echo chunks=3 result=end first_chunk=10.9ms duration=11.0ms\nsession 2a91 mode=error chunks=1 result=error+end duration=9ms error_type=E error=\"x y\"\n";
        assert_eq!(parse_plugin_pid(out), Some(9035));
        let s = parse_sessions(out);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].id, "209f8a86-f5be");
        assert_eq!(s[0].chunks, 3);
        assert_eq!(s[1].result, "error+end");
    }
}
