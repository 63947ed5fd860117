//! A whole Dify-shaped stack of real processes on loopback (`tests/fixtures/difystack`), the
//! load that drives it, and helpers to check and print the trace of each request as a tree.
//!
//! ```text
//! client ─▶ nginx ─▶ api (Flask on gunicorn, 2 gevent workers)
//!                     ├─▶ sandbox (Go)  POST /v1/sandbox/run ─ python3 child, code on fd 3
//!                     └─▶ plugin daemon (Go stand-in) POST /plugin/<tenant>/dispatch/tool/invoke
//!                          └─ stdin/stdout ─▶ plugin (dify_plugin 0.7.4, tool `dify_stack`)
//!                                              ├─▶ tool (Go)  GET /tool/<i>
//!                                              └─ backwards invocation ─▶ daemon
//!                                                   └─▶ api  POST /inner/api/invoke/tool
//! ```
//!
//! Every request `i` leaves its number where the tracer can see it: the client's
//! `User-Agent: difystack-client/<i>` (forwarded by nginx), the api's outbound
//! `User-Agent: difystack-api/<i>`, the tenant in the dispatch path ([`tenant_id`]), the tool
//! path `/tool/<i>`, the daemon's `User-Agent: difystack-daemon/<i>` towards the inner API,
//! and through the daemon's `served ...` report the plugin session id and the traceparent
//! of its inner API call ([`Numbering`]).
//!
//! The tree helpers ([`SpanView`], [`SpanIndex`], [`Expected`], [`check_tree`],
//! [`render_forest`]) do not depend on the stack: they take spans from the in-test OTLP
//! receiver or from Jaeger, an expected tree, and say what differs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};

use crate::jaeger::JaegerSpan;
use crate::nginx::{NGINX_COMM, Nginx};
use crate::otlp_receiver::{Kind, ReceivedSpan};
use crate::plugin::{DAEMON_COMM, PLUGIN_NAME, PLUGIN_VERSION, PluginFixture};
use crate::procs::{HttpConn, Proc, concurrently, free_port, local};
use crate::python::{Gunicorn, GunicornOpts};
use crate::{TempDir, workspace_root};

/// comm (and binary name) of the sandbox.
pub const SANDBOX_COMM: &str = "difysandbox";
/// comm (and binary name) of the tool service the plugin calls.
pub const TOOL_COMM: &str = "difytool";
/// comm of the api's processes (gunicorn's console script).
pub const API_COMM: &str = "gunicorn";
/// Every comm of the stack, for the agent's `--comm`. The plugin and the sandbox's python
/// children are watched as children of the daemon and the sandbox.
pub const COMMS: [&str; 5] = [NGINX_COMM, API_COMM, SANDBOX_COMM, DAEMON_COMM, TOOL_COMM];

/// The service API key of the app (`Authorization: Bearer app-...`); a dummy.
pub const APP_API_KEY: &str = "app-difystack0dummy0key00000";
/// The app the requests belong to.
pub const APP_ID: &str = "3b2f7c9e-1a4d-4e8f-a6b5-0c9d8e7f6a51";
/// X-Api-Key of the sandbox (Dify's default value).
pub const SANDBOX_API_KEY: &str = "dify-sandbox";
/// X-Api-Key of the plugin daemon; a dummy.
pub const PLUGIN_DAEMON_KEY: &str = "dummy-plugin-daemon-key-not-a-secret";
/// X-Inner-Api-Key of the api's inner API; a dummy.
pub const INNER_API_KEY: &str = "dummy-inner-api-key-not-a-secret";
/// The tool credential the api passes in the dispatch body (see api.py); a dummy.
pub const TOOL_CREDENTIAL: &str = "dummy-api-key-not-a-secret";
/// Values that must never appear in an exported span.
pub const SECRETS: [&str; 5] = [
    APP_API_KEY,
    SANDBOX_API_KEY,
    PLUGIN_DAEMON_KEY,
    INNER_API_KEY,
    TOOL_CREDENTIAL,
];

/// How long a stack process gets to listen.
const START_TIMEOUT: Duration = Duration::from_secs(60);

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// The fixture's directory in the repository.
pub fn fixtures_dir() -> PathBuf {
    workspace_root().join("tests/fixtures/difystack")
}

/// The tenant of request `i`: UUID-shaped, the number in its last group (as api.py makes it).
pub fn tenant_id(i: usize) -> String {
    format!("5e1f0000-0000-4000-8000-{i:012}")
}

/// The request number of a [`tenant_id`].
pub fn number_of_tenant(tenant: &str) -> Option<usize> {
    tenant
        .strip_prefix("5e1f0000-0000-4000-8000-")
        .filter(|n| n.len() == 12 && n.bytes().all(|b| b.is_ascii_digit()))?
        .parse()
        .ok()
}

/// `/plugin/<tenant of i>/dispatch/tool/invoke`.
pub fn dispatch_path(i: usize) -> String {
    format!("/plugin/{}/dispatch/tool/invoke", tenant_id(i))
}

/// `/tool/<i>`.
pub fn tool_path(i: usize) -> String {
    format!("/tool/{i}")
}

/// The answer api.py gives request `i` when every hop answered for `i`.
pub fn expected_answer(i: usize) -> String {
    format!(
        "request {i}: sandbox={i} plugin=[tool_id={i} inner={i} tenant={}]",
        tenant_id(i)
    )
}

/// A random version 4 UUID (conversation ids).
pub fn random_uuid(salt: u64) -> String {
    let mut words = [0u64; 2];
    for (k, w) in words.iter_mut().enumerate() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(salt);
        h.write_usize(k);
        h.write_u128(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        *w = h.finish();
    }
    let hex = format!("{:016x}{:016x}", words[0], words[1]);
    format!(
        "{}-{}-4{}-{:x}{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[13..16],
        8 + (u8::from_str_radix(&hex[16..17], 16).unwrap_or(0) & 3),
        &hex[17..20],
        &hex[20..32]
    )
}

// ---------------------------------------------------------------------------------------
// prerequisites and build

/// What the stack needs on this machine and is missing, for [`crate::prerequisite_missing`].
pub fn tools_missing() -> Vec<String> {
    let mut missing = crate::plugin::tools_missing();
    if crate::nginx::nginx_bin().is_none() {
        missing.push("nginx (`apt-get install nginx`, or set DIFYTRACE_NGINX)".into());
    }
    if let Err(e) = crate::python::python_eval("import flask, gunicorn, gevent, httpx") {
        missing.push(format!(
            "flask, gunicorn, gevent and httpx in {} (DIFYTRACE_PYTHON; `cargo xtask setup \
             --with-test-deps` makes target/venv): {e:#}",
            crate::python::python().display()
        ));
    }
    missing
}

/// Prepared fixtures: the plugin (venv + daemon binary), the sandbox/tool binary and the api
/// source.
pub struct StackFixtures {
    pub plugin: PluginFixture,
    /// `<target>/difystack/difysandbox`.
    pub sandbox_bin: PathBuf,
    /// `<target>/difystack/difytool`, a copy of the same binary.
    pub tool_bin: PathBuf,
    pub api_source: String,
}

impl StackFixtures {
    /// Lays out the plugin, builds the daemon (see [`PluginFixture::prepare`]) and the
    /// sandbox (only when its sources or the machine's `go` changed: a stamp next to it).
    pub fn prepare() -> Result<StackFixtures> {
        let plugin = PluginFixture::prepare()?;
        let (sandbox_bin, tool_bin) = build_sandbox()?;
        let api = fixtures_dir().join("api.py");
        let api_source =
            std::fs::read_to_string(&api).with_context(|| format!("reading {}", api.display()))?;
        Ok(StackFixtures {
            plugin,
            sandbox_bin,
            tool_bin,
            api_source,
        })
    }
}

/// FNV-1a, 64 bit, over the sources and the `go version`: stable across Rust releases.
fn sandbox_digest(dir: &Path, go_version: &str) -> Result<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            name == "go.mod" || name == "go.sum" || name.ends_with(".go")
        })
        .collect();
    files.sort();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes.iter().chain(&[0xff]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    feed(go_version.as_bytes());
    for f in files {
        feed(f.file_name().unwrap_or_default().as_encoded_bytes());
        feed(&std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?);
    }
    Ok(format!("{h:016x}"))
}

fn build_sandbox() -> Result<(PathBuf, PathBuf)> {
    let src = fixtures_dir().join("sandbox");
    let dir = target_dir().join("difystack");
    let sandbox_bin = dir.join(SANDBOX_COMM);
    let tool_bin = dir.join(TOOL_COMM);
    let stamp = dir.join("stamp");
    let go = Command::new("go")
        .arg("version")
        .env("GOTOOLCHAIN", "local")
        .output()
        .context("running `go version`")?;
    ensure!(
        go.status.success(),
        "`go version` failed: {}",
        String::from_utf8_lossy(&go.stderr)
    );
    let key = sandbox_digest(&src, String::from_utf8_lossy(&go.stdout).trim())?;
    if crate::read_lossy(&stamp).trim() == key && sandbox_bin.is_file() && tool_bin.is_file() {
        return Ok((sandbox_bin, tool_bin));
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let _ = std::fs::remove_file(&stamp);
    let tmp = dir.join(format!(".{SANDBOX_COMM}.tmp"));
    let started = Instant::now();
    let out = Command::new("go")
        .args(["build", "-buildvcs=false", "-o"])
        .arg(&tmp)
        .arg(".")
        .current_dir(&src)
        .env("GOTOOLCHAIN", "local")
        .output()
        .context("running go build for tests/fixtures/difystack/sandbox")?;
    ensure!(
        out.status.success(),
        "go build of tests/fixtures/difystack/sandbox failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "built tests/fixtures/difystack/sandbox in {:?}",
        started.elapsed()
    );
    // Two names for one program: each service gets its own comm.
    let tool_tmp = dir.join(format!(".{TOOL_COMM}.tmp"));
    std::fs::copy(&tmp, &tool_tmp)
        .with_context(|| format!("copying {} to {}", tmp.display(), tool_tmp.display()))?;
    std::fs::rename(&tool_tmp, &tool_bin)?;
    std::fs::rename(&tmp, &sandbox_bin)?;
    std::fs::write(&stamp, format!("{key}\n"))
        .with_context(|| format!("writing {}", stamp.display()))?;
    Ok((sandbox_bin, tool_bin))
}

// ---------------------------------------------------------------------------------------
// the processes

/// The parts of the stack, for expectations and messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    Nginx,
    Api,
    Sandbox,
    Daemon,
    Plugin,
    Tool,
}

impl Component {
    pub const ALL: [Component; 6] = [
        Component::Nginx,
        Component::Api,
        Component::Sandbox,
        Component::Daemon,
        Component::Plugin,
        Component::Tool,
    ];

    /// Short name in trees and messages.
    pub fn label(self) -> &'static str {
        match self {
            Component::Nginx => "nginx",
            Component::Api => "api",
            Component::Sandbox => "sandbox",
            Component::Daemon => "daemon",
            Component::Plugin => "plugin",
            Component::Tool => "tool",
        }
    }

    /// The `service.name` the agent gives it by default: the executable's name, gunicorn's
    /// app module, the daemon's name + `_plugin_<name>_<version>` for a plugin runtime.
    pub fn service(self) -> String {
        match self {
            Component::Nginx => NGINX_COMM.into(),
            Component::Api => "api".into(),
            Component::Sandbox => SANDBOX_COMM.into(),
            Component::Daemon => DAEMON_COMM.into(),
            Component::Plugin => format!("{DAEMON_COMM}_plugin_{PLUGIN_NAME}_{PLUGIN_VERSION}"),
            Component::Tool => TOOL_COMM.into(),
        }
    }
}

/// One answered dispatch request, as the daemon reported it (`served ...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    pub session_id: String,
    pub tenant: String,
    /// The request number from the tool parameters.
    pub i: Option<usize>,
    pub chunks: u32,
    pub invokes: u32,
    pub result: String,
    /// The traceparents the daemon sent on its inner API calls for this request.
    pub traceparents: Vec<String>,
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// The `served ...` lines of the daemon's stdout.
pub fn parse_served(stdout: &str) -> Vec<Served> {
    stdout
        .lines()
        .filter(|l| l.starts_with("served "))
        .filter_map(|line| {
            Some(Served {
                session_id: field(line, "session")?.to_string(),
                tenant: field(line, "tenant")?.to_string(),
                i: field(line, "i").and_then(|v| v.parse().ok()),
                chunks: field(line, "chunks")?.parse().ok()?,
                invokes: field(line, "invokes")?.parse().ok()?,
                result: field(line, "result")?.to_string(),
                traceparents: field(line, "traceparents")
                    .unwrap_or_default()
                    .split(',')
                    .filter(|t| !t.is_empty())
                    .map(str::to_string)
                    .collect(),
            })
        })
        .collect()
}

/// Spawns `bin args` and waits for the `listening ADDR` line the Go fixtures print.
fn spawn_go(name: &str, bin: &Path, args: &[&str], dir: &Path) -> Result<(Proc, SocketAddr)> {
    let mut cmd = Command::new(bin);
    cmd.args(args);
    let mut proc = Proc::spawn(name, cmd, dir)?;
    let got = crate::poll(START_TIMEOUT, Duration::from_millis(20), || {
        if let Some(a) = proc
            .stdout()
            .lines()
            .find_map(|l| l.strip_prefix("listening "))
            .and_then(|a| a.trim().parse::<SocketAddr>().ok())
        {
            return Some(Ok(a));
        }
        proc.try_exit().map(Err)
    });
    match got {
        Some(Ok(addr)) => Ok((proc, addr)),
        Some(Err(st)) => bail!(
            "{name} exited ({st}) before listening\n{}",
            proc.log_tail(40)
        ),
        None => bail!(
            "{name} printed no `listening` line within {START_TIMEOUT:?}\n{}",
            proc.log_tail(40)
        ),
    }
}

/// The running stack. Dropped in field order: the front (nginx) first.
pub struct DifyStack {
    nginx: Nginx,
    api: Gunicorn,
    daemon: Proc,
    sandbox: Proc,
    tool: Proc,
    plugin_pid: u32,
    _dir: TempDir,
}

impl DifyStack {
    /// Starts tool, sandbox, api, daemon (+ plugin, ready) and nginx; returns once all of
    /// them accept connections.
    pub fn start(fx: &StackFixtures) -> Result<DifyStack> {
        let dir = TempDir::new("difystack")?;
        let (tool, tool_addr) = spawn_go(
            TOOL_COMM,
            &fx.tool_bin,
            &["-mode", "tool", "-listen", "127.0.0.1:0"],
            dir.path(),
        )?;
        let (sandbox, sandbox_addr) = spawn_go(
            SANDBOX_COMM,
            &fx.sandbox_bin,
            &[
                "-mode",
                "sandbox",
                "-listen",
                "127.0.0.1:0",
                "-api-key",
                SANDBOX_API_KEY,
            ],
            dir.path(),
        )?;
        // The api and the daemon call each other: the daemon's port is picked first.
        let daemon_addr = local(free_port());
        let env = [
            ("CODE_EXECUTION_ENDPOINT", format!("http://{sandbox_addr}")),
            ("CODE_EXECUTION_API_KEY", SANDBOX_API_KEY.to_string()),
            ("PLUGIN_DAEMON_URL", format!("http://{daemon_addr}")),
            ("PLUGIN_DAEMON_KEY", PLUGIN_DAEMON_KEY.to_string()),
            ("INNER_API_KEY_FOR_PLUGIN", INNER_API_KEY.to_string()),
            ("DIFYSTACK_APP_API_KEY", APP_API_KEY.to_string()),
            ("DIFYSTACK_APP_ID", APP_ID.to_string()),
            ("DIFYSTACK_TOOL_URL", format!("http://{tool_addr}")),
        ];
        let api = Gunicorn::start(
            &fx.api_source,
            &GunicornOpts {
                workers: 2,
                worker_class: "gevent".into(),
                app: "api:app".into(),
                env: env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect(),
                ..Default::default()
            },
        )
        .context("starting the api (gunicorn, gevent workers)")?;
        let inner_api = format!("http://{}/inner/api", api.addr());
        let listen = daemon_addr.to_string();
        let mut cmd = Command::new(&fx.plugin.daemon_bin);
        cmd.arg("-workdir").arg(&fx.plugin.workdir).args([
            "-mode",
            "difystack",
            "-listen",
            &listen,
            // It serves until it is stopped: far more sessions and time than a test uses.
            "-sessions",
            "100000",
            "-timeout",
            "30m",
            "-inner-api",
            &inner_api,
            "-inner-api-key",
            INNER_API_KEY,
            "-server-key",
            PLUGIN_DAEMON_KEY,
        ]);
        let mut daemon = Proc::spawn(DAEMON_COMM, cmd, dir.path())?;
        let ready = crate::poll(START_TIMEOUT, Duration::from_millis(50), || {
            if daemon
                .stdout()
                .lines()
                .any(|l| l.starts_with("listening on"))
            {
                return Some(Ok(()));
            }
            daemon.try_exit().map(Err)
        });
        match ready {
            Some(Ok(())) => {}
            Some(Err(st)) => bail!(
                "the plugin daemon exited ({st}) before listening\n{}",
                daemon.log_tail(40)
            ),
            None => bail!(
                "the plugin daemon did not listen within {START_TIMEOUT:?} (plugin not ready?)\n{}",
                daemon.log_tail(40)
            ),
        }
        let plugin_pid = crate::plugin::parse_plugin_pid(&daemon.stdout())
            .with_context(|| format!("no `plugin started` line\n{}", daemon.log_tail(20)))?;
        let nginx = Nginx::start(api.addr()).context("starting nginx")?;
        Ok(DifyStack {
            nginx,
            api,
            daemon,
            sandbox,
            tool,
            plugin_pid,
            _dir: dir,
        })
    }

    /// Where clients connect (nginx).
    pub fn addr(&self) -> SocketAddr {
        self.nginx.addr()
    }

    pub fn nginx(&self) -> &Nginx {
        &self.nginx
    }

    pub fn api(&self) -> &Gunicorn {
        &self.api
    }

    /// The Go processes (sandbox, tool, daemon): the agent attaches uprobes to each.
    pub fn go_pids(&self) -> [u32; 3] {
        [self.sandbox.pid(), self.tool.pid(), self.daemon.pid()]
    }

    pub fn plugin_pid(&self) -> u32 {
        self.plugin_pid
    }

    /// The pids of each component now (gunicorn and nginx: master and workers).
    pub fn pids(&self) -> BTreeMap<Component, Vec<u32>> {
        let mut api = vec![self.api.master_pid()];
        api.extend(self.api.worker_pids());
        BTreeMap::from([
            (Component::Nginx, self.nginx.pids()),
            (Component::Api, api),
            (Component::Sandbox, vec![self.sandbox.pid()]),
            (Component::Daemon, vec![self.daemon.pid()]),
            (Component::Plugin, vec![self.plugin_pid]),
            (Component::Tool, vec![self.tool.pid()]),
        ])
    }

    /// What the daemon reported so far.
    pub fn served(&self) -> Vec<Served> {
        parse_served(&self.daemon.stdout())
    }

    /// Log tails of every process, for failure messages.
    pub fn logs(&self, n: usize) -> String {
        format!(
            "{}{}{}{}{}",
            self.nginx.logs(n),
            self.api.logs(n),
            self.daemon.log_tail(n),
            self.sandbox.log_tail(n),
            self.tool.log_tail(n)
        )
    }
}

// ---------------------------------------------------------------------------------------
// load

/// One `POST /v1/chat-messages` sent through nginx, and its outcome.
#[derive(Debug, Clone)]
pub struct ChatOutcome {
    pub i: usize,
    pub conversation_id: String,
    /// `None` when no response was read.
    pub status: Option<u16>,
    pub body: String,
    /// Connection or read error.
    pub error: Option<String>,
    /// From the write of the request to the end of the response.
    pub elapsed: Duration,
}

impl ChatOutcome {
    /// What is wrong with the outcome: anything but 200 with Dify's blocking answer for
    /// this request (its conversation, and every hop's answer for `i`). `None` when right.
    pub fn problem(&self) -> Option<String> {
        let i = self.i;
        if let Some(e) = &self.error {
            return Some(format!("#{i}: {e}"));
        }
        if self.status != Some(200) {
            return Some(format!(
                "#{i}: status {:?}, body {}",
                self.status, self.body
            ));
        }
        let json: serde_json::Value = match serde_json::from_str(&self.body) {
            Ok(v) => v,
            Err(e) => return Some(format!("#{i}: body {:?} is not JSON: {e}", self.body)),
        };
        let want = expected_answer(i);
        if json["event"] != "message"
            || json["conversation_id"].as_str() != Some(self.conversation_id.as_str())
            || json["answer"].as_str() != Some(want.as_str())
        {
            return Some(format!(
                "#{i}: wrong answer {} (want event message, conversation_id {}, answer {want:?})",
                self.body, self.conversation_id
            ));
        }
        None
    }
}

/// The chat request body of request `i`.
pub fn chat_body(i: usize, conversation_id: &str) -> String {
    serde_json::json!({
        "inputs": {},
        "query": format!("q-{i}"),
        "response_mode": "blocking",
        "user": format!("u-{i}"),
        "conversation_id": conversation_id,
    })
    .to_string()
}

/// Sends request `i` on `conn` (reconnecting when the previous one was closed).
fn chat(addr: SocketAddr, conn: &mut Option<HttpConn>, i: usize) -> ChatOutcome {
    let conversation_id = random_uuid(i as u64);
    let mut out = ChatOutcome {
        i,
        conversation_id,
        status: None,
        body: String::new(),
        error: None,
        elapsed: Duration::ZERO,
    };
    let started = Instant::now();
    let result = (|| -> Result<crate::procs::HttpResponse> {
        if conn.as_ref().is_none_or(HttpConn::is_closed) {
            *conn = Some(HttpConn::connect(addr)?);
        }
        let c = conn.as_mut().context("no connection")?;
        let ua = format!("difystack-client/{i}");
        let auth = format!("Bearer {APP_API_KEY}");
        c.request(
            "POST",
            "/v1/chat-messages",
            &[
                ("Authorization", auth.as_str()),
                ("Content-Type", "application/json"),
                ("User-Agent", ua.as_str()),
            ],
            chat_body(i, &out.conversation_id).as_bytes(),
        )
    })();
    out.elapsed = started.elapsed();
    match result {
        Ok(r) => {
            out.status = Some(r.status);
            out.body = r.text();
        }
        Err(e) => {
            // The connection is in an unknown state: the next request opens a new one.
            *conn = None;
            out.error = Some(format!("{e:#}"));
        }
    }
    out
}

/// Sends requests `numbers` to `addr` with at most `in_flight` at a time (worker threads,
/// each with its own keep-alive connection, released together); returns every outcome in
/// number order. Never fails: see [`check_outcomes`].
pub fn drive(addr: SocketAddr, numbers: Range<usize>, in_flight: usize) -> Vec<ChatOutcome> {
    concurrently(numbers, in_flight, || None, |conn, i| chat(addr, conn, i))
}

/// Fails unless every request got its right answer; the error lists the bad ones.
pub fn check_outcomes(outcomes: &[ChatOutcome]) -> Result<()> {
    let bad: Vec<String> = outcomes.iter().filter_map(ChatOutcome::problem).collect();
    ensure!(
        bad.is_empty(),
        "{} of {} chat requests through nginx failed:\n  {}",
        bad.len(),
        outcomes.len(),
        bad.iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n  ")
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// spans, from any backend

/// A span reduced to what the tree checks need, from the OTLP receiver or from Jaeger.
#[derive(Debug, Clone, PartialEq)]
pub struct SpanView {
    pub trace_id: String,
    pub span_id: String,
    /// "" for a root span.
    pub parent_span_id: String,
    /// `SERVER`, `CLIENT`, `INTERNAL`, ...
    pub kind: String,
    pub name: String,
    pub service: String,
    pub pid: Option<u32>,
    pub start_ns: u64,
    pub end_ns: u64,
    /// Span attributes in string form.
    pub attrs: BTreeMap<String, String>,
    /// (trace id, span id) of every link.
    pub links: Vec<(String, String)>,
    /// Status ERROR.
    pub error: bool,
}

impl SpanView {
    pub fn from_received(s: &ReceivedSpan) -> SpanView {
        let kind = match s.kind {
            Kind::Server => "SERVER",
            Kind::Client => "CLIENT",
            Kind::Internal => "INTERNAL",
            Kind::Producer => "PRODUCER",
            Kind::Consumer => "CONSUMER",
            Kind::Unspecified => "UNSPECIFIED",
        };
        SpanView {
            trace_id: s.trace_id.clone(),
            span_id: s.span_id.clone(),
            parent_span_id: s.parent_span_id.clone(),
            kind: kind.into(),
            name: s.name.clone(),
            service: s.res_str("service.name").unwrap_or_default(),
            pid: s.pid(),
            start_ns: s.start_ns,
            end_ns: s.end_ns,
            attrs: s
                .attributes
                .iter()
                .map(|(k, v)| (k.clone(), v.to_string()))
                .collect(),
            links: s
                .links
                .iter()
                .map(|l| (l.trace_id.clone(), l.span_id.clone()))
                .collect(),
            error: s.status_code == 2,
        }
    }

    /// Jaeger's query API form: `span.kind` tag, CHILD_OF reference as the parent,
    /// FOLLOWS_FROM references as links, microsecond times.
    pub fn from_jaeger(s: &JaegerSpan) -> SpanView {
        SpanView {
            trace_id: s.trace_id.clone(),
            span_id: s.span_id.clone(),
            parent_span_id: s.parent().to_string(),
            kind: s.kind().to_ascii_uppercase(),
            name: s.operation.clone(),
            service: s.service.clone(),
            pid: s
                .process_tags
                .get("process.pid")
                .and_then(|p| p.parse().ok()),
            start_ns: s.start_us.saturating_mul(1000),
            end_ns: s
                .start_us
                .saturating_add(s.duration_us)
                .saturating_mul(1000),
            attrs: s
                .tags
                .iter()
                .filter(|(k, _)| k.as_str() != "span.kind")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            links: s
                .references
                .iter()
                .filter(|(t, _, _)| t == "FOLLOWS_FROM")
                .map(|(_, trace, span)| (trace.clone(), span.clone()))
                .collect(),
            error: s.tags.get("error").is_some_and(|v| v == "true")
                || s.tags.get("otel.status_code").is_some_and(|v| v == "ERROR"),
        }
    }

    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attrs.get(key).map(String::as_str)
    }

    /// Whether `needle` appears in the name or an attribute key or value.
    pub fn mentions(&self, needle: &str) -> bool {
        self.name.contains(needle)
            || self
                .attrs
                .iter()
                .any(|(k, v)| k.contains(needle) || v.contains(needle))
    }

    /// One line: kind, service, name, what identifies it, ids, duration, and the start
    /// relative to `t0` when given.
    pub fn line(&self, t0: Option<u64>) -> String {
        let mut s = format!("{} {} {:?}", self.kind, self.service, self.name);
        for (key, short) in [
            ("url.path", "path"),
            ("user_agent.original", "ua"),
            ("dify.plugin.session_id", "session"),
            ("http.response.status_code", "status"),
        ] {
            if let Some(v) = self.attr(key)
                && !self.name.contains(v)
            {
                let _ = write!(s, " {short}={v}");
            }
        }
        let _ = write!(
            s,
            " span={} parent={} trace={} pid={}",
            short_id(&self.span_id),
            if self.parent_span_id.is_empty() {
                "-".to_string()
            } else {
                short_id(&self.parent_span_id)
            },
            short_id(&self.trace_id),
            self.pid
                .map(|p| p.to_string())
                .unwrap_or_else(|| "?".into()),
        );
        if let Some(t0) = t0 {
            let _ = write!(
                s,
                " +{:.1}ms",
                self.start_ns.saturating_sub(t0) as f64 / 1e6
            );
        }
        let _ = write!(
            s,
            " {:.1}ms",
            self.end_ns.saturating_sub(self.start_ns) as f64 / 1e6
        );
        if !self.links.is_empty() {
            let links: Vec<String> = self
                .links
                .iter()
                .map(|(t, sp)| format!("{}/{}", short_id(t), short_id(sp)))
                .collect();
            let _ = write!(s, " links=[{}]", links.join(","));
        }
        if self.error {
            s.push_str(" ERROR");
        }
        s
    }
}

/// `#3,#17`.
fn hash_list(nums: &BTreeSet<usize>) -> String {
    nums.iter()
        .map(|n| format!("#{n}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The first 8 hex digits of an id (enough to tell spans of one test apart).
fn short_id(id: &str) -> String {
    id.chars().take(8).collect()
}

/// Spans with the request numbers each one carries, indexed by number, trace and id.
pub struct SpanIndex {
    pub spans: Vec<SpanView>,
    numbers: Vec<BTreeSet<usize>>,
    by_number: HashMap<usize, Vec<usize>>,
    by_trace: HashMap<String, Vec<usize>>,
    by_id: HashMap<String, usize>,
}

impl SpanIndex {
    /// `numbers` says which request numbers a span carries.
    pub fn new(spans: Vec<SpanView>, numbers: impl Fn(&SpanView) -> BTreeSet<usize>) -> SpanIndex {
        let nums: Vec<BTreeSet<usize>> = spans.iter().map(&numbers).collect();
        let mut by_number: HashMap<usize, Vec<usize>> = HashMap::new();
        let mut by_trace: HashMap<String, Vec<usize>> = HashMap::new();
        let mut by_id = HashMap::new();
        for (k, s) in spans.iter().enumerate() {
            for n in &nums[k] {
                by_number.entry(*n).or_default().push(k);
            }
            by_trace.entry(s.trace_id.clone()).or_default().push(k);
            by_id.insert(s.span_id.clone(), k);
        }
        SpanIndex {
            spans,
            numbers: nums,
            by_number,
            by_trace,
            by_id,
        }
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Spans carrying request number `n`.
    pub fn with_number(&self, n: usize) -> Vec<usize> {
        self.by_number.get(&n).cloned().unwrap_or_default()
    }

    pub fn in_trace(&self, trace_id: &str) -> Vec<usize> {
        self.by_trace.get(trace_id).cloned().unwrap_or_default()
    }

    pub fn by_span_id(&self, span_id: &str) -> Option<usize> {
        self.by_id.get(span_id).copied()
    }

    pub fn numbers_of(&self, k: usize) -> &BTreeSet<usize> {
        &self.numbers[k]
    }
}

// ---------------------------------------------------------------------------------------
// expected trees

/// Where an expected span's parent must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParentRule {
    /// A root span: no parent.
    Root,
    /// The span matched by this node.
    Of(&'static str),
    /// The span matched by one of these nodes.
    OneOf(Vec<&'static str>),
}

impl ParentRule {
    fn keys(&self) -> Vec<&'static str> {
        match self {
            ParentRule::Root => Vec::new(),
            ParentRule::Of(k) => vec![k],
            ParentRule::OneOf(ks) => ks.clone(),
        }
    }
}

/// How a span reaches its parent, for grouping problems.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hop {
    /// The root of the trace.
    Root,
    /// Parent and child in one process (thread, greenlet, goroutine, plugin session).
    InProcess,
    /// Parent and child in two processes (a connection or a pipe between them).
    CrossProcess,
}

/// One span of an expected tree.
#[derive(Debug, Clone)]
pub struct Expected {
    /// Short unique key, e.g. `api.sandbox`.
    pub key: &'static str,
    /// What it is, in words: `api CLIENT POST /v1/sandbox/run`.
    pub what: String,
    /// Processes it may come from (identification).
    pub pids: Vec<u32>,
    /// `SERVER`, `CLIENT`, ...
    pub kind: &'static str,
    /// The exact span name, when it identifies the span.
    pub name: Option<String>,
    /// Attributes that identify it (all must be equal).
    pub attrs: Vec<(&'static str, String)>,
    /// Its `service.name`.
    pub service: String,
    pub parent: ParentRule,
    pub hop: Hop,
    /// Attributes it must carry (not used to find it).
    pub require: Vec<(&'static str, String)>,
    /// Links it must carry: (trace id, span id).
    pub links: Vec<(String, String)>,
}

impl Expected {
    pub fn matches(&self, s: &SpanView) -> bool {
        s.kind == self.kind
            && s.pid.is_some_and(|p| self.pids.contains(&p))
            && self.name.as_ref().is_none_or(|n| &s.name == n)
            && self
                .attrs
                .iter()
                .all(|(k, v)| s.attr(k) == Some(v.as_str()))
    }
}

/// Kinds of problem, in the order reports list them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProblemKind {
    /// No span matched the node.
    Missing,
    /// More than one span matched it.
    Duplicate,
    /// Its `service.name` is not the expected one.
    WrongService,
    /// The root has a parent.
    NotRoot,
    /// Its parent is not the span of the expected parent node.
    WrongParent,
    /// The request's spans are in more than one trace.
    SplitTrace,
    /// A span of the request's trace carries another request's number.
    CrossTalk,
    /// It does not lie within its expected parent's time range (1 ms allowed).
    NotNested,
    /// A required link is absent.
    MissingLink,
    /// A required attribute is absent or different.
    MissingAttr,
    /// A secret value appears in a span.
    SecretLeak,
}

impl ProblemKind {
    pub fn title(self) -> &'static str {
        match self {
            ProblemKind::Missing => "span missing",
            ProblemKind::Duplicate => "more than one span",
            ProblemKind::WrongService => "wrong service.name",
            ProblemKind::NotRoot => "root span has a parent",
            ProblemKind::WrongParent => "wrong parent",
            ProblemKind::SplitTrace => "request split over several traces",
            ProblemKind::CrossTalk => "span of another request in the trace",
            ProblemKind::NotNested => "not within its parent's time range",
            ProblemKind::MissingLink => "link missing",
            ProblemKind::MissingAttr => "attribute missing or wrong",
            ProblemKind::SecretLeak => "secret exported",
        }
    }
}

/// One problem of one request's tree.
#[derive(Debug, Clone)]
pub struct Problem {
    pub kind: ProblemKind,
    /// The expected node it is about ("" for the whole request).
    pub node: &'static str,
    pub hop: Option<Hop>,
    pub detail: String,
}

/// The outcome of [`check_tree`] for one request.
#[derive(Debug, Clone)]
pub struct TreeCheck {
    pub number: usize,
    /// Node key -> index in the [`SpanIndex`] of the span that matched it (the first one
    /// when several did).
    pub found: BTreeMap<&'static str, usize>,
    pub problems: Vec<Problem>,
}

impl TreeCheck {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// The trace ids the request's spans are in, most used first.
    pub fn traces(&self, index: &SpanIndex) -> Vec<String> {
        let mut count: BTreeMap<&str, usize> = BTreeMap::new();
        for &k in self.found.values() {
            *count.entry(index.spans[k].trace_id.as_str()).or_default() += 1;
        }
        let mut v: Vec<(&str, usize)> = count.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        v.into_iter().map(|(t, _)| t.to_string()).collect()
    }
}

/// Allowed clock difference when comparing a child's range with its parent's.
pub const NESTING_SLACK_NS: u64 = 1_000_000;

/// Checks request `number` against `expected`: every node found exactly once among the spans
/// carrying `number`, services, parents, one trace, no other request's spans in it, nesting,
/// links, required attributes, and no `secrets` in any span of its trace.
pub fn check_tree(
    index: &SpanIndex,
    expected: &[Expected],
    number: usize,
    secrets: &[&str],
) -> TreeCheck {
    let mut problems = Vec::new();
    let mut found: BTreeMap<&'static str, usize> = BTreeMap::new();
    let candidates = index.with_number(number);
    let node = |key: &str| expected.iter().find(|e| e.key == key);
    for e in expected {
        let hits: Vec<usize> = candidates
            .iter()
            .copied()
            .filter(|&k| e.matches(&index.spans[k]))
            .collect();
        match hits.as_slice() {
            [] => problems.push(Problem {
                kind: ProblemKind::Missing,
                node: e.key,
                hop: Some(e.hop),
                detail: format!("no {} span", e.what),
            }),
            [one] => {
                found.insert(e.key, *one);
            }
            [first, ..] => {
                found.insert(e.key, *first);
                let lines: Vec<String> = hits
                    .iter()
                    .map(|&k| format!("      {}", index.spans[k].line(None)))
                    .collect();
                problems.push(Problem {
                    kind: ProblemKind::Duplicate,
                    node: e.key,
                    hop: Some(e.hop),
                    detail: format!("{} spans for {}:\n{}", hits.len(), e.what, lines.join("\n")),
                });
            }
        }
    }
    for e in expected {
        let Some(&k) = found.get(e.key) else {
            // A link or attribute that cannot be checked is not there either: say so under
            // its own kind too, so that a check of links or attributes never passes on a
            // missing span.
            if !e.links.is_empty() {
                problems.push(Problem {
                    kind: ProblemKind::MissingLink,
                    node: e.key,
                    hop: Some(e.hop),
                    detail: format!("no {} span to carry its links", e.what),
                });
            }
            if !e.require.is_empty() {
                problems.push(Problem {
                    kind: ProblemKind::MissingAttr,
                    node: e.key,
                    hop: Some(e.hop),
                    detail: format!("no {} span to carry its attributes", e.what),
                });
            }
            continue;
        };
        let s = &index.spans[k];
        if s.service != e.service {
            problems.push(Problem {
                kind: ProblemKind::WrongService,
                node: e.key,
                hop: Some(e.hop),
                detail: format!(
                    "{} has service.name {:?}, want {:?}",
                    e.what, s.service, e.service
                ),
            });
        }
        // parent
        match &e.parent {
            ParentRule::Root => {
                if !s.parent_span_id.is_empty() {
                    problems.push(Problem {
                        kind: ProblemKind::NotRoot,
                        node: e.key,
                        hop: Some(e.hop),
                        detail: format!(
                            "{} should be a root span; its parent is {}",
                            e.what,
                            describe_span_id(index, expected, &found, &s.parent_span_id)
                        ),
                    });
                }
            }
            rule => {
                let want: Vec<usize> = rule
                    .keys()
                    .iter()
                    .filter_map(|pk| found.get(pk).copied())
                    .collect();
                // With its parent node missing the parent cannot be checked (Missing says so).
                if !want.is_empty()
                    && !want
                        .iter()
                        .any(|&p| index.spans[p].span_id == s.parent_span_id)
                {
                    let wanted: Vec<String> = rule
                        .keys()
                        .iter()
                        .filter_map(|pk| node(pk))
                        .map(|n| n.what.clone())
                        .collect();
                    problems.push(Problem {
                        kind: ProblemKind::WrongParent,
                        node: e.key,
                        hop: Some(e.hop),
                        detail: format!(
                            "{} should be a child of {}; its parent is {}",
                            e.what,
                            wanted.join(" or "),
                            describe_span_id(index, expected, &found, &s.parent_span_id)
                        ),
                    });
                }
            }
        }
        // nesting, against the first expected parent that was found (timing holds whatever
        // the linking did)
        if let Some((pnode, p)) = e
            .parent
            .keys()
            .iter()
            .find_map(|pk| Some((node(pk)?, found.get(pk).copied()?)))
        {
            let ps = &index.spans[p];
            if s.start_ns + NESTING_SLACK_NS < ps.start_ns
                || s.end_ns > ps.end_ns + NESTING_SLACK_NS
            {
                problems.push(Problem {
                    kind: ProblemKind::NotNested,
                    node: e.key,
                    hop: Some(e.hop),
                    detail: format!(
                        "{} [{}, {}] is not within {} [{}, {}] (starts {:+.3} ms, ends {:+.3} ms \
                         relative to it)",
                        e.what,
                        s.start_ns,
                        s.end_ns,
                        pnode.what,
                        ps.start_ns,
                        ps.end_ns,
                        (s.start_ns as f64 - ps.start_ns as f64) / 1e6,
                        (s.end_ns as f64 - ps.end_ns as f64) / 1e6,
                    ),
                });
            }
        }
        for (t, sp) in &e.links {
            if !s.links.iter().any(|(lt, ls)| lt == t && ls == sp) {
                problems.push(Problem {
                    kind: ProblemKind::MissingLink,
                    node: e.key,
                    hop: Some(e.hop),
                    detail: format!(
                        "{} should link to {t}/{sp} (the traceparent it was sent with); links: {:?}",
                        e.what, s.links
                    ),
                });
            }
        }
        for (key, want) in &e.require {
            if s.attr(key) != Some(want.as_str()) {
                problems.push(Problem {
                    kind: ProblemKind::MissingAttr,
                    node: e.key,
                    hop: Some(e.hop),
                    detail: format!(
                        "{} should carry {key}={want:?}; it has {:?}",
                        e.what,
                        s.attr(key)
                    ),
                });
            }
        }
    }
    // one trace
    let mut traces: BTreeMap<&str, Vec<&'static str>> = BTreeMap::new();
    for (key, &k) in &found {
        traces
            .entry(index.spans[k].trace_id.as_str())
            .or_default()
            .push(key);
    }
    if traces.len() > 1 {
        let groups: Vec<String> = traces
            .iter()
            .map(|(t, keys)| format!("{} ({})", short_id(t), keys.join(", ")))
            .collect();
        problems.push(Problem {
            kind: ProblemKind::SplitTrace,
            node: "",
            hop: None,
            detail: format!("{} traces: {}", traces.len(), groups.join("; ")),
        });
    }
    // Other requests' spans in its trace (the root's, else the one most of its spans are
    // in: a span of this request that went elsewhere is a SplitTrace, not this); secrets in
    // any of its traces.
    let main_trace = found
        .get(
            expected
                .iter()
                .find(|e| e.parent == ParentRule::Root)
                .map_or("", |e| e.key),
        )
        .map(|&k| index.spans[k].trace_id.as_str())
        .or_else(|| {
            traces
                .iter()
                .max_by_key(|(_, keys)| keys.len())
                .map(|(t, _)| *t)
        })
        .unwrap_or_default();
    let mut foreign = Vec::new();
    let mut leaks = Vec::new();
    for t in traces.keys() {
        for k in index.in_trace(t) {
            let s = &index.spans[k];
            let others: Vec<usize> = index
                .numbers_of(k)
                .iter()
                .copied()
                .filter(|&n| n != number)
                .collect();
            if *t == main_trace && !others.is_empty() {
                let others: BTreeSet<usize> = others.into_iter().collect();
                foreign.push(format!(
                    "      {} carries {}",
                    s.line(None),
                    hash_list(&others)
                ));
            }
            for secret in secrets {
                if s.mentions(secret) {
                    leaks.push(format!("      {} mentions {secret:?}", s.line(None)));
                }
            }
        }
    }
    if !foreign.is_empty() {
        let n = foreign.len();
        foreign.truncate(6);
        problems.push(Problem {
            kind: ProblemKind::CrossTalk,
            node: "",
            hop: None,
            detail: format!(
                "{n} spans of other requests in its trace {}:\n{}",
                short_id(main_trace),
                foreign.join("\n")
            ),
        });
    }
    if !leaks.is_empty() {
        problems.push(Problem {
            kind: ProblemKind::SecretLeak,
            node: "",
            hop: None,
            detail: leaks.join("\n"),
        });
    }
    problems.sort_by_key(|p| p.kind);
    TreeCheck {
        number,
        found,
        problems,
    }
}

/// A span id in words: the expected node it matched, or the span, or "not received".
fn describe_span_id(
    index: &SpanIndex,
    expected: &[Expected],
    found: &BTreeMap<&'static str, usize>,
    span_id: &str,
) -> String {
    if span_id.is_empty() {
        return "none (a root span)".into();
    }
    if let Some((key, _)) = found
        .iter()
        .find(|(_, k)| index.spans[**k].span_id == span_id)
        && let Some(e) = expected.iter().find(|e| e.key == *key)
    {
        return format!("{} [{key}]", e.what);
    }
    if let Some(e) = expected
        .iter()
        .find(|e| e.links.iter().any(|(_, sp)| sp == span_id))
    {
        return format!(
            "{span_id}, the span id of the traceparent header sent to {} (it should only be \
             a link of that span)",
            e.what
        );
    }
    match index.by_span_id(span_id) {
        Some(k) => {
            let nums = index.numbers_of(k);
            let whose = if nums.is_empty() {
                String::new()
            } else {
                format!(" (of request {})", hash_list(nums))
            };
            format!("{}{whose}", index.spans[k].line(None))
        }
        None => format!("{} (not among the {} spans received)", span_id, index.len()),
    }
}

/// The expected tree as indented text, for failure messages.
pub fn render_expected(expected: &[Expected]) -> String {
    fn walk(expected: &[Expected], parent: Option<&str>, depth: usize, out: &mut String) {
        for e in expected {
            let first_parent = e.parent.keys().first().copied();
            if first_parent == parent {
                let alt = match &e.parent {
                    ParentRule::OneOf(ks) if ks.len() > 1 => {
                        format!(" (or under {})", ks[1..].join(", "))
                    }
                    _ => String::new(),
                };
                let _ = writeln!(
                    out,
                    "  {}{} [{}] service={}{alt}",
                    "  ".repeat(depth),
                    e.what,
                    e.key,
                    e.service
                );
                walk(expected, Some(e.key), depth + 1, out);
            }
        }
    }
    let mut out = String::new();
    walk(expected, None, 0, &mut out);
    out
}

/// The spans `set` (indices into `index`) as an indented forest by parent id, ordered by start
/// time. A span whose parent is not in the set starts a tree of its own, headed by what its
/// parent is. `tag` adds a note to a span's line (e.g. the expected node it matched).
pub fn render_forest(index: &SpanIndex, set: &[usize], tag: &dyn Fn(usize) -> String) -> String {
    let mut set: Vec<usize> = set.to_vec();
    set.sort_unstable();
    set.dedup();
    set.sort_by_key(|&k| (index.spans[k].start_ns, k));
    let t0 = set
        .iter()
        .map(|&k| index.spans[k].start_ns)
        .min()
        .unwrap_or(0);
    let ids: BTreeSet<&str> = set
        .iter()
        .map(|&k| index.spans[k].span_id.as_str())
        .collect();
    let mut children: HashMap<&str, Vec<usize>> = HashMap::new();
    let mut roots = Vec::new();
    for &k in &set {
        let p = index.spans[k].parent_span_id.as_str();
        if !p.is_empty() && ids.contains(p) && p != index.spans[k].span_id {
            children.entry(p).or_default().push(k);
        } else {
            roots.push(k);
        }
    }
    struct Walker<'a> {
        index: &'a SpanIndex,
        t0: u64,
        children: HashMap<&'a str, Vec<usize>>,
        tag: &'a dyn Fn(usize) -> String,
        seen: BTreeSet<usize>,
        out: String,
    }
    impl Walker<'_> {
        fn walk(&mut self, k: usize, depth: usize) {
            // A parent cycle (ids reused by a confused exporter) must not loop forever.
            if !self.seen.insert(k) {
                return;
            }
            let s = &self.index.spans[k];
            let _ = writeln!(
                self.out,
                "    {}{}{}",
                "  ".repeat(depth),
                s.line(Some(self.t0)),
                (self.tag)(k)
            );
            let kids = self.children.get(s.span_id.as_str()).cloned();
            for c in kids.unwrap_or_default() {
                self.walk(c, depth + 1);
            }
        }
    }
    let mut w = Walker {
        index,
        t0,
        children,
        tag,
        seen: BTreeSet::new(),
        out: String::new(),
    };
    for r in roots {
        let s = &index.spans[r];
        let head = if s.parent_span_id.is_empty() {
            "(root)".to_string()
        } else {
            match index.by_span_id(&s.parent_span_id) {
                Some(p) => {
                    let nums = index.numbers_of(p);
                    format!(
                        "(parent not shown here: {}{})",
                        index.spans[p].line(Some(t0)),
                        if nums.is_empty() {
                            String::new()
                        } else {
                            format!(", of request {}", hash_list(nums))
                        }
                    )
                }
                None => format!("(parent {} was not received)", short_id(&s.parent_span_id)),
            }
        };
        let _ = writeln!(w.out, "  {head}");
        w.walk(r, 0);
    }
    w.out
}

/// What to show for one request: the spans of its trace(s) and the spans that matched its
/// nodes, each tagged with its node key and the request numbers it carries.
pub fn render_request(index: &SpanIndex, check: &TreeCheck) -> String {
    let mut set: Vec<usize> = check.found.values().copied().collect();
    for t in check.traces(index) {
        set.extend(index.in_trace(&t));
    }
    let keys: HashMap<usize, &str> = check.found.iter().map(|(key, &k)| (k, *key)).collect();
    let tag = |k: usize| {
        let mut t = String::new();
        if let Some(key) = keys.get(&k) {
            let _ = write!(t, "  <= [{key}]");
        }
        let nums = index.numbers_of(k);
        if !nums.is_empty() {
            let _ = write!(t, " {}", hash_list(nums));
        }
        t
    };
    render_forest(index, &set, &tag)
}

/// Per problem kind and node: how many requests have it, and one example.
pub fn problem_table(checks: &[TreeCheck], filter: &dyn Fn(&Problem) -> bool) -> String {
    let mut table: BTreeMap<(ProblemKind, &'static str), (usize, String)> = BTreeMap::new();
    for c in checks {
        let mut seen = BTreeSet::new();
        for p in c.problems.iter().filter(|p| filter(p)) {
            if !seen.insert((p.kind, p.node)) {
                continue;
            }
            let entry = table
                .entry((p.kind, p.node))
                .or_insert_with(|| (0, format!("#{}: {}", c.number, p.detail)));
            entry.0 += 1;
        }
    }
    let mut out = String::new();
    for ((kind, node), (n, example)) in &table {
        let node = if node.is_empty() { "request" } else { node };
        let example = example
            .lines()
            .take(8)
            .collect::<Vec<_>>()
            .join("\n        ");
        let _ = writeln!(
            out,
            "  {kind:?} [{node}] ({}): {n} of {} requests\n      e.g. {example}",
            kind.title(),
            checks.len()
        );
    }
    out
}

// ---------------------------------------------------------------------------------------
// the stack's expected tree

/// Request numbers from what the fixtures reported (daemon sessions and traceparents) and
/// from the client's conversations.
#[derive(Debug, Clone, Default)]
pub struct Numbering {
    sessions: HashMap<String, usize>,
    /// trace id of a traceparent the daemon sent -> request number.
    link_traces: HashMap<String, usize>,
    conversations: HashMap<String, usize>,
}

/// A W3C traceparent, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Traceparent {
    pub trace_id: String,
    pub span_id: String,
}

impl Traceparent {
    pub fn parse(s: &str) -> Option<Traceparent> {
        let mut parts = s.split('-');
        let (_version, trace, span) = (parts.next()?, parts.next()?, parts.next()?);
        (trace.len() == 32 && span.len() == 16).then(|| Traceparent {
            trace_id: trace.to_ascii_lowercase(),
            span_id: span.to_ascii_lowercase(),
        })
    }
}

impl Numbering {
    pub fn new(served: &[Served], outcomes: &[ChatOutcome]) -> Numbering {
        let mut n = Numbering::default();
        for s in served {
            let Some(i) = s.i.or_else(|| number_of_tenant(&s.tenant)) else {
                continue;
            };
            n.sessions.insert(s.session_id.clone(), i);
            for tp in s.traceparents.iter().filter_map(|t| Traceparent::parse(t)) {
                n.link_traces.insert(tp.trace_id, i);
            }
        }
        for o in outcomes {
            n.conversations.insert(o.conversation_id.clone(), o.i);
        }
        n
    }

    /// The session id of request `i`, as the daemon reported it.
    pub fn session_of(&self, i: usize) -> Option<&str> {
        self.sessions
            .iter()
            .find(|(_, n)| **n == i)
            .map(|(s, _)| s.as_str())
    }

    /// The request numbers a span carries.
    pub fn numbers(&self, s: &SpanView) -> BTreeSet<usize> {
        let mut out = BTreeSet::new();
        if let Some(ua) = s.attr("user_agent.original") {
            for prefix in ["difystack-client/", "difystack-api/", "difystack-daemon/"] {
                if let Some(n) = ua.strip_prefix(prefix).and_then(|n| n.parse().ok()) {
                    out.insert(n);
                }
            }
        }
        if let Some(path) = s.attr("url.path") {
            if let Some(n) = path.strip_prefix("/tool/").and_then(|n| n.parse().ok()) {
                out.insert(n);
            }
            if let Some(n) = path
                .strip_prefix("/plugin/")
                .and_then(|r| r.split('/').next())
                .and_then(number_of_tenant)
            {
                out.insert(n);
            }
        }
        for key in ["dify.plugin.session_id", "dify.session_id"] {
            if let Some(n) = s.attr(key).and_then(|id| self.sessions.get(id)) {
                out.insert(*n);
            }
        }
        if let Some(n) = s
            .attr("dify.conversation_id")
            .and_then(|id| self.conversations.get(id))
        {
            out.insert(*n);
        }
        for (t, _) in &s.links {
            if let Some(n) = self.link_traces.get(t) {
                out.insert(*n);
            }
        }
        out
    }
}

/// What is known of request `i` beyond its number.
#[derive(Debug, Clone)]
pub struct RequestIds {
    pub i: usize,
    pub conversation_id: String,
    pub session_id: Option<String>,
    pub traceparents: Vec<Traceparent>,
}

impl RequestIds {
    pub fn new(i: usize, outcome: Option<&ChatOutcome>, served: &[Served]) -> RequestIds {
        let s = served.iter().find(|s| s.i == Some(i));
        RequestIds {
            i,
            conversation_id: outcome
                .map(|o| o.conversation_id.clone())
                .unwrap_or_default(),
            session_id: s.map(|s| s.session_id.clone()),
            traceparents: s
                .map(|s| {
                    s.traceparents
                        .iter()
                        .filter_map(|t| Traceparent::parse(t))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

/// The trace request `i` must have (see the module docs); `pids` and `services` per
/// component.
pub fn expected_tree(
    ids: &RequestIds,
    pids: &BTreeMap<Component, Vec<u32>>,
    services: &BTreeMap<Component, String>,
) -> Vec<Expected> {
    let i = ids.i;
    let client_ua = format!("difystack-client/{i}");
    let api_ua = format!("difystack-api/{i}");
    let daemon_ua = format!("difystack-daemon/{i}");
    // Without the daemon's report the plugin spans cannot be found: an id nothing has.
    let session = ids
        .session_id
        .clone()
        .unwrap_or_else(|| format!("<no session reported for #{i}>"));
    let node = |key: &'static str,
                c: Component,
                kind: &'static str,
                what: String,
                name: Option<String>,
                attrs: Vec<(&'static str, String)>,
                parent: ParentRule,
                hop: Hop| Expected {
        key,
        what: format!("{} {kind} {what}", c.label()),
        pids: pids.get(&c).cloned().unwrap_or_default(),
        kind,
        name,
        attrs,
        service: services.get(&c).cloned().unwrap_or_else(|| c.service()),
        parent,
        hop,
        require: Vec::new(),
        links: Vec::new(),
    };
    let http = |method: &str, path: String, ua: &str| {
        vec![
            ("http.request.method", method.to_string()),
            ("url.path", path),
            ("user_agent.original", ua.to_string()),
        ]
    };
    let chat = "/v1/chat-messages".to_string();
    let sandbox = "/v1/sandbox/run".to_string();
    let inner = "/inner/api/invoke/tool".to_string();
    let mut root = node(
        "nginx.server",
        Component::Nginx,
        "SERVER",
        format!("POST {chat}"),
        None,
        http("POST", chat.clone(), &client_ua),
        ParentRule::Root,
        Hop::Root,
    );
    // The chat request and answer carry the conversation; Dify's chat answer carries no
    // workflow_run_id nor app_id (advanced-chat blocking converter), so only it is required.
    root.require = vec![("dify.conversation_id", ids.conversation_id.clone())];
    let mut inner_server = node(
        "api.inner",
        Component::Api,
        "SERVER",
        format!("POST {inner}"),
        None,
        http("POST", inner.clone(), &daemon_ua),
        ParentRule::Of("daemon.inner"),
        Hop::CrossProcess,
    );
    inner_server.links = ids
        .traceparents
        .iter()
        .map(|t| (t.trace_id.clone(), t.span_id.clone()))
        .collect();
    vec![
        root,
        node(
            "nginx.client",
            Component::Nginx,
            "CLIENT",
            format!("POST {chat}"),
            None,
            http("POST", chat.clone(), &client_ua),
            ParentRule::Of("nginx.server"),
            Hop::InProcess,
        ),
        node(
            "api.server",
            Component::Api,
            "SERVER",
            format!("POST {chat}"),
            None,
            http("POST", chat.clone(), &client_ua),
            ParentRule::Of("nginx.client"),
            Hop::CrossProcess,
        ),
        node(
            "api.sandbox",
            Component::Api,
            "CLIENT",
            format!("POST {sandbox}"),
            None,
            http("POST", sandbox.clone(), &api_ua),
            ParentRule::Of("api.server"),
            Hop::InProcess,
        ),
        node(
            "sandbox.server",
            Component::Sandbox,
            "SERVER",
            format!("POST {sandbox}"),
            None,
            http("POST", sandbox, &api_ua),
            ParentRule::Of("api.sandbox"),
            Hop::CrossProcess,
        ),
        node(
            "api.dispatch",
            Component::Api,
            "CLIENT",
            format!("POST {}", dispatch_path(i)),
            None,
            http("POST", dispatch_path(i), &api_ua),
            ParentRule::Of("api.server"),
            Hop::InProcess,
        ),
        node(
            "daemon.server",
            Component::Daemon,
            "SERVER",
            format!("POST {}", dispatch_path(i)),
            None,
            http("POST", dispatch_path(i), &api_ua),
            ParentRule::Of("api.dispatch"),
            Hop::CrossProcess,
        ),
        node(
            "daemon.invoke",
            Component::Daemon,
            "CLIENT",
            "\"plugin invoke_tool\"".into(),
            Some("plugin invoke_tool".into()),
            vec![("dify.plugin.session_id", session.clone())],
            ParentRule::Of("daemon.server"),
            Hop::InProcess,
        ),
        node(
            "plugin.invoke",
            Component::Plugin,
            "SERVER",
            "\"plugin invoke_tool\"".into(),
            Some("plugin invoke_tool".into()),
            vec![("dify.plugin.session_id", session.clone())],
            ParentRule::Of("daemon.invoke"),
            Hop::CrossProcess,
        ),
        node(
            "plugin.get",
            Component::Plugin,
            "CLIENT",
            format!("GET {}", tool_path(i)),
            None,
            vec![
                ("http.request.method", "GET".into()),
                ("url.path", tool_path(i)),
            ],
            ParentRule::Of("plugin.invoke"),
            Hop::InProcess,
        ),
        node(
            "tool.server",
            Component::Tool,
            "SERVER",
            format!("GET {}", tool_path(i)),
            None,
            vec![
                ("http.request.method", "GET".into()),
                ("url.path", tool_path(i)),
            ],
            ParentRule::Of("plugin.get"),
            Hop::CrossProcess,
        ),
        node(
            "plugin.backwards",
            Component::Plugin,
            "CLIENT",
            "\"plugin backwards_invoke tool\"".into(),
            Some("plugin backwards_invoke tool".into()),
            vec![("dify.plugin.session_id", session)],
            ParentRule::Of("plugin.invoke"),
            Hop::InProcess,
        ),
        node(
            "daemon.inner",
            Component::Daemon,
            "CLIENT",
            format!("POST {inner}"),
            None,
            http("POST", inner, &daemon_ua),
            // The daemon makes the call for the plugin's backwards invocation: under that
            // span, or at least under the plugin's side of the session.
            ParentRule::OneOf(vec!["plugin.backwards", "plugin.invoke"]),
            Hop::CrossProcess,
        ),
        inner_server,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(id: &str, parent: &str, trace: &str, pid: u32, kind: &str, path: &str) -> SpanView {
        SpanView {
            trace_id: trace.repeat(32 / trace.len()),
            span_id: id.repeat(16 / id.len()),
            parent_span_id: if parent.is_empty() {
                String::new()
            } else {
                parent.repeat(16 / parent.len())
            },
            kind: kind.into(),
            name: format!("GET {path}"),
            service: format!("svc{pid}"),
            pid: Some(pid),
            start_ns: 1_000_000_000,
            end_ns: 2_000_000_000,
            attrs: BTreeMap::from([("url.path".to_string(), path.to_string())]),
            links: Vec::new(),
            error: false,
        }
    }

    /// A two-node tree: SERVER /r/<n> in pid 1, CLIENT /tool/<n> in pid 2 under it.
    fn tree(n: usize) -> Vec<Expected> {
        let e = |key, pid: u32, kind, path: String, parent, hop| Expected {
            key,
            what: format!("{kind} {path}"),
            pids: vec![pid],
            kind,
            name: None,
            attrs: vec![("url.path", path)],
            service: format!("svc{pid}"),
            parent,
            hop,
            require: Vec::new(),
            links: Vec::new(),
        };
        vec![
            e(
                "root",
                1,
                "SERVER",
                format!("/r/{n}"),
                ParentRule::Root,
                Hop::Root,
            ),
            e(
                "call",
                2,
                "CLIENT",
                format!("/tool/{n}"),
                ParentRule::Of("root"),
                Hop::CrossProcess,
            ),
        ]
    }

    fn numbers(s: &SpanView) -> BTreeSet<usize> {
        s.attr("url.path")
            .and_then(|p| p.rsplit('/').next())
            .and_then(|n| n.parse().ok())
            .into_iter()
            .collect()
    }

    #[test]
    fn a_right_tree_has_no_problem() {
        let index = SpanIndex::new(
            vec![
                span("a", "", "1", 1, "SERVER", "/r/7"),
                span("b", "a", "1", 2, "CLIENT", "/tool/7"),
            ],
            numbers,
        );
        let c = check_tree(&index, &tree(7), 7, &["secret"]);
        assert!(c.ok(), "{:?}", c.problems);
        assert_eq!(c.found.len(), 2);
        let text = render_request(&index, &c);
        assert!(text.contains("  (root)\n"), "{text}");
        assert!(
            text.contains("\n      CLIENT svc2 \"GET /tool/7\""),
            "{text}"
        );
        assert!(text.contains("<= [call] #7"), "{text}");
    }

    #[test]
    fn wrong_parents_split_traces_cross_talk_and_secrets_are_found() {
        let mut leaky = span("d", "c", "2", 2, "CLIENT", "/tool/8");
        leaky.attrs.insert("x".into(), "a secret value".into());
        let index = SpanIndex::new(
            vec![
                span("a", "", "1", 1, "SERVER", "/r/7"),
                // request 7's call went under request 8's root, in its trace
                span("b", "c", "2", 2, "CLIENT", "/tool/7"),
                span("c", "", "2", 1, "SERVER", "/r/8"),
                leaky,
            ],
            numbers,
        );
        let c = check_tree(&index, &tree(7), 7, &["secret"]);
        let kinds: Vec<ProblemKind> = c.problems.iter().map(|p| p.kind).collect();
        assert_eq!(
            kinds,
            [
                ProblemKind::WrongParent,
                ProblemKind::SplitTrace,
                ProblemKind::SecretLeak
            ]
        );
        assert!(
            c.problems[0].detail.contains("(of request #8)"),
            "{}",
            c.problems[0].detail
        );
        // request 8's own trace holds request 7's call
        let c8 = check_tree(&index, &tree(8), 8, &[]);
        assert!(
            c8.problems.iter().any(|p| p.kind == ProblemKind::CrossTalk),
            "{:?}",
            c8.problems
        );
        let table = problem_table(&[c.clone(), c8], &|_| true);
        assert!(table.contains("WrongParent [call]"), "{table}");
        // both of its traces are shown: its own root, and request 8's tree holding its call
        let text = render_request(&index, &c);
        assert!(
            text.matches("(root)").count() == 2
                && text.contains("  SERVER svc1 \"GET /r/8\"")
                && text.contains("<= [call] #7"),
            "{text}"
        );
    }

    #[test]
    fn missing_duplicate_and_badly_nested_spans() {
        let mut late = span("b", "a", "1", 2, "CLIENT", "/tool/7");
        late.end_ns = 2_000_000_000 + 2 * NESTING_SLACK_NS;
        let index = SpanIndex::new(
            vec![
                span("a", "", "1", 1, "SERVER", "/r/7"),
                late,
                span("e", "a", "1", 2, "CLIENT", "/tool/7"),
            ],
            numbers,
        );
        let c = check_tree(&index, &tree(7), 7, &[]);
        let kinds: Vec<ProblemKind> = c.problems.iter().map(|p| p.kind).collect();
        assert_eq!(kinds, [ProblemKind::Duplicate, ProblemKind::NotNested]);
        let mut t = tree(7);
        t[1].links = vec![("f".repeat(32), "e".repeat(16))];
        let only_root = SpanIndex::new(vec![span("a", "", "1", 1, "SERVER", "/r/7")], numbers);
        let c = check_tree(&only_root, &t, 7, &[]);
        let kinds: Vec<ProblemKind> = c.problems.iter().map(|p| p.kind).collect();
        assert_eq!(kinds, [ProblemKind::Missing, ProblemKind::MissingLink]);
    }

    #[test]
    fn stack_identifiers() {
        assert_eq!(tenant_id(17), "5e1f0000-0000-4000-8000-000000000017");
        assert_eq!(number_of_tenant(&tenant_id(17)), Some(17));
        assert_eq!(
            number_of_tenant("5e1f0000-0000-4000-8000-00000000001x"),
            None
        );
        assert_eq!(
            dispatch_path(3),
            "/plugin/5e1f0000-0000-4000-8000-000000000003/dispatch/tool/invoke"
        );
        let u = random_uuid(1);
        let groups: Vec<usize> = u.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12], "{u}");
        assert!(
            u.as_bytes()[14] == b'4' && b"89ab".contains(&u.as_bytes()[19]),
            "{u}"
        );
        assert_ne!(random_uuid(1), random_uuid(1));
        let tp =
            Traceparent::parse("00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01").unwrap();
        assert_eq!(tp.trace_id, "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(tp.span_id, "b7ad6b7169203331");
        assert!(Traceparent::parse("00-xyz-01").is_none());
    }

    #[test]
    fn daemon_reports_and_numbering() {
        let out = "plugin started pid=9 cmd=x\nlistening on 127.0.0.1:1\n\
                   served session=s-1 tenant=5e1f0000-0000-4000-8000-000000000004 i=4 chunks=1 invokes=1 result=end traceparents=00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\n\
                   served session=s-2 tenant=t i= chunks=0 invokes=0 result=no-end traceparents=\n";
        let served = parse_served(out);
        assert_eq!(served.len(), 2);
        assert_eq!(served[0].i, Some(4));
        assert_eq!(served[0].traceparents.len(), 1);
        assert_eq!((served[1].i, served[1].traceparents.len()), (None, 0));
        let n = Numbering::new(&served, &[]);
        assert_eq!(n.session_of(4), Some("s-1"));
        let mut s = span("a", "", "1", 1, "SERVER", "/inner/api/invoke/tool");
        assert!(n.numbers(&s).is_empty());
        s.links = vec![("0af7651916cd43dd8448eb211c80319c".into(), "x".into())];
        s.attrs
            .insert("user_agent.original".into(), "difystack-daemon/4".into());
        s.attrs
            .insert("dify.plugin.session_id".into(), "s-1".into());
        assert_eq!(n.numbers(&s), BTreeSet::from([4]));
        s.attrs.insert("url.path".into(), dispatch_path(5));
        assert_eq!(n.numbers(&s), BTreeSet::from([4, 5]));
        let ids = RequestIds::new(4, None, &served);
        let pids = BTreeMap::from([(Component::Api, vec![1])]);
        let t = expected_tree(&ids, &pids, &BTreeMap::new());
        assert_eq!(t.len(), 14);
        let inner = t.iter().find(|e| e.key == "api.inner").unwrap();
        assert_eq!(inner.links.len(), 1);
        assert_eq!(inner.service, "api");
        assert!(
            render_expected(&t).contains(
                "\n                    api SERVER POST /inner/api/invoke/tool [api.inner]"
            )
        );
    }

    #[test]
    fn answers_are_judged() {
        let ok = ChatOutcome {
            i: 2,
            conversation_id: "c".into(),
            status: Some(200),
            body: serde_json::json!({"event": "message", "conversation_id": "c", "answer": expected_answer(2)})
                .to_string(),
            error: None,
            elapsed: Duration::ZERO,
        };
        assert!(ok.problem().is_none());
        let mut other = ok.clone();
        other.body = other.body.replace("sandbox=2", "sandbox=3");
        assert!(other.problem().unwrap().contains("wrong answer"));
        let mut failed = ok.clone();
        failed.status = Some(500);
        assert!(check_outcomes(&[ok, failed]).is_err());
    }
}
