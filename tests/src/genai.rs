//! The GenAI fixtures (`tests/fixtures/genai`): a Go stand-in for the plugin daemon's LLM
//! dispatch path with a stdio model plugin, a fake model provider + sandbox, and an httpx
//! client driven line by line. Each renames its process (comm) so the agent selects it.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::procs::{Proc, free_port, local, wait_port_of};
use crate::python::python;
use crate::{TempDir, workspace_root};

pub const DAEMON_COMM: &str = "genaidaemon";
pub const PROVIDER_COMM: &str = "genaiprov";
pub const CLIENT_COMM: &str = "genaiclient";
/// How long the daemon lets a plugin invocation run before its "killed by timeout" event.
pub const DAEMON_TIMEOUT: &str = "1500ms";

pub fn fixtures_dir() -> PathBuf {
    workspace_root().join("tests/fixtures/genai")
}

/// Missing tools (go, httpx in the test Python), as prerequisite messages.
pub fn tools_missing() -> Vec<String> {
    let mut out = Vec::new();
    if Command::new("go").arg("version").output().is_err() {
        out.push("go (to build tests/fixtures/genai/daemon)".into());
    }
    if crate::python::python_eval("import httpx").is_err() {
        out.push(format!("httpx in {}", python().display()));
    }
    out
}

/// Builds the daemon stand-in (once per run; `go build` caches).
pub fn build_daemon() -> Result<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let bin = target.join(DAEMON_COMM);
    let out = Command::new("go")
        .args(["build", "-o"])
        .arg(&bin)
        .arg(".")
        .current_dir(fixtures_dir().join("daemon"))
        .output()
        .context("running go build for tests/fixtures/genai/daemon")?;
    ensure!(
        out.status.success(),
        "go build failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(bin)
}

/// The provider, daemon (+ plugin) and client, all running.
pub struct GenAiStack {
    pub provider: Proc,
    pub daemon: Proc,
    pub provider_port: u16,
    pub daemon_port: u16,
    pub client: Client,
    pub dir: TempDir,
}

impl GenAiStack {
    pub fn start() -> Result<GenAiStack> {
        let daemon_bin = build_daemon()?;
        let dir = TempDir::new("genai")?;
        let provider_port = free_port();
        let mut cmd = Command::new(python());
        cmd.arg(fixtures_dir().join("provider.py"))
            .arg(provider_port.to_string())
            .arg(PROVIDER_COMM);
        let mut provider = Proc::spawn(PROVIDER_COMM, cmd, dir.path())?;
        wait_port_of(&mut provider, local(provider_port), Duration::from_secs(20))?;
        let daemon_port = free_port();
        let mut cmd = Command::new(&daemon_bin);
        cmd.arg("-listen")
            .arg(local(daemon_port).to_string())
            .arg("-python")
            .arg(python())
            .arg("-plugin")
            .arg(fixtures_dir().join("llm_plugin.py"))
            .arg("-timeout")
            .arg(DAEMON_TIMEOUT);
        let mut daemon = Proc::spawn(DAEMON_COMM, cmd, dir.path())?;
        wait_port_of(&mut daemon, local(daemon_port), Duration::from_secs(20))?;
        let client = Client::start()?;
        Ok(GenAiStack {
            provider,
            daemon,
            provider_port,
            daemon_port,
            client,
            dir,
        })
    }

    pub fn provider_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.provider_port)
    }

    pub fn daemon_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.daemon_port)
    }

    /// The agent arguments that select the three processes.
    pub fn comm_args() -> Vec<String> {
        [DAEMON_COMM, PROVIDER_COMM, CLIENT_COMM]
            .iter()
            .flat_map(|c| ["--comm".to_string(), c.to_string()])
            .collect()
    }
}

/// `client.py`: one request per line written, one answer per line read.
pub struct Client {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

/// What the client got.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

impl Client {
    pub fn start() -> Result<Client> {
        let mut child = Command::new(python())
            .arg(fixtures_dir().join("client.py"))
            .arg(CLIENT_COMM)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting client.py")?;
        let stdin = child.stdin.take().context("client stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().context("client stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        ensure!(line.trim() == "ready", "client.py said {line:?}");
        Ok(Client {
            child,
            stdin,
            stdout,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends one request (`{"method","url","headers","json","stream"}`) and waits for it.
    pub fn request(&mut self, cmd: &serde_json::Value) -> Result<Answer> {
        writeln!(self.stdin, "{cmd}")?;
        self.stdin.flush()?;
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("client.py exited");
        }
        let v: serde_json::Value = serde_json::from_str(&line).context("client answer")?;
        let answer = Answer {
            status: v["status"].as_u64().unwrap_or(0) as u16,
            body: v["body"].as_str().unwrap_or_default().to_string(),
        };
        ensure!(answer.status != 0, "request failed: {}", answer.body);
        Ok(answer)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
