//! The Go "plugin daemon"-shaped fixture of `tests/fixtures/godaemon` (gin + net/http), for
//! the end-to-end tests of the agent's Go uprobes.
//!
//! One Go program, built in four variants (two Go versions, each with and without symbol
//! tables) and installed under two names per variant, so that the daemon and the tool it
//! calls are different comms:
//!
//! - [`GoDaemon`] (comm [`DAEMON_COMM`]): gin's `POST /plugin/:tenant_id/dispatch/tool/invoke`
//!   reads the body, calls `GET <tool>/tool/<tenant_id>` from a new goroutine through one
//!   shared keep-alive `http.Client`, and answers `200 {"tenant":"...","tool_status":200}`.
//! - [`GoTool`] (comm [`TOOL_COMM`]): plain net/http, `GET /tool/<id>` answers
//!   `{"id":"<id>","ok":true}` after a delay (20 ms unless told), so that requests overlap.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use difytrace_tests::goapp::{GoApp, GoDaemon, GoTool, invoke_concurrent};
//! let app = GoApp::prepare()?;
//! let v = app.variant("go1.21-stripped")?;
//! let tool = GoTool::start(v)?;
//! let daemon = GoDaemon::start(v, tool.addr())?;
//! let sent = invoke_concurrent(daemon.addr(), 100)?; // t-0 .. t-99, all answered 200
//! assert_eq!(sent[7].tenant, "t-7");
//! # Ok(()) }
//! ```
//!
//! Binaries go to `<target>/godaemon/<variant>/{godaemon,gotool}`, where target is
//! `$CARGO_TARGET_DIR` or `<workspace>/target`; a variant is rebuilt only when the fixture's
//! sources, its build settings or the machine's `go` changed (a stamp file next to them).
//! `go` must be on `PATH`; the module cache is filled from the Go module proxy on the first
//! build, and so is the old toolchain ([`OLD_TOOLCHAIN`], through `GOTOOLCHAIN`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::procs::{HttpConn, HttpResponse, Proc, concurrently, http_get};
use crate::{TempDir, workspace_root};

/// Binary name, and so the comm, of the daemon.
pub const DAEMON_COMM: &str = "godaemon";
/// Binary name, and so the comm, of the tool server (the same program).
pub const TOOL_COMM: &str = "gotool";
/// The gin route of the daemon's dispatch handler.
pub const ROUTE: &str = "/plugin/:tenant_id/dispatch/tool/invoke";
/// The old Go the `go1.21*` variants are built with (`GOTOOLCHAIN`).
pub const OLD_TOOLCHAIN: &str = "go1.21.13";
/// The tool's delay before each answer unless told otherwise.
pub const DEFAULT_TOOL_DELAY: Duration = Duration::from_millis(20);
/// The variants [`GoApp::prepare`] builds, in this order.
pub const VARIANTS: [&str; 4] = ["go1.26", "go1.26-stripped", "go1.21", "go1.21-stripped"];

const START_TIMEOUT: Duration = Duration::from_secs(20);

/// `t-<i>`, the tenant id of the `i`-th request of a load.
pub fn tenant(i: usize) -> String {
    format!("t-{i}")
}

/// The daemon's path for `tenant`: `/plugin/<tenant>/dispatch/tool/invoke`.
pub fn invoke_path(tenant: &str) -> String {
    format!("/plugin/{tenant}/dispatch/tool/invoke")
}

/// The tool's path the daemon calls for `tenant`: `/tool/<tenant>`.
pub fn tool_path(tenant: &str) -> String {
    format!("/tool/{tenant}")
}

/// The fixture's directory in the repository.
pub fn fixtures_dir() -> PathBuf {
    workspace_root().join("tests/fixtures/godaemon")
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// What the fixture needs on this machine and is missing (`go`), for
/// [`crate::prerequisite_missing`].
pub fn tools_missing() -> Vec<String> {
    let ok = Command::new("go")
        .arg("version")
        .env("GOTOOLCHAIN", "local")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if ok {
        Vec::new()
    } else {
        vec!["`go` on PATH".to_string()]
    }
}

// ---------------------------------------------------------------------------------------
// build

/// One built variant of the fixture.
#[derive(Debug, Clone)]
pub struct GoVariant {
    /// `go1.26`, `go1.26-stripped`, `go1.21` or `go1.21-stripped`.
    pub name: String,
    /// The `GOTOOLCHAIN` it was built with: `local` (the machine's go) or [`OLD_TOOLCHAIN`].
    pub toolchain: String,
    /// Built with `-ldflags=-s -w` (no symbol table, no DWARF; `.gopclntab` stays).
    pub stripped: bool,
    /// The Go version recorded in the binary (`go version BIN`), e.g. `go1.26.8`.
    pub go_version: String,
    /// `<target>/godaemon/<name>`.
    pub dir: PathBuf,
    /// `<dir>/godaemon`.
    pub daemon_bin: PathBuf,
    /// `<dir>/gotool`, a copy of the same binary.
    pub tool_bin: PathBuf,
    /// How long `go build` took, or `None` when the binaries were up to date.
    pub build_time: Option<Duration>,
}

/// The prepared fixture: every variant of [`VARIANTS`], built.
#[derive(Debug, Clone)]
pub struct GoApp {
    pub variants: Vec<GoVariant>,
}

static PREPARED: Mutex<Option<GoApp>> = Mutex::new(None);

impl GoApp {
    /// Builds the four variants into `<target>/godaemon/<variant>/` (only those whose
    /// sources or settings changed). Done once per test binary.
    pub fn prepare() -> Result<GoApp> {
        let mut prepared = PREPARED.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(app) = prepared.as_ref() {
            return Ok(app.clone());
        }
        let local_go = go_version_output()?;
        let sources = source_digest(&fixtures_dir())?;
        let mut variants = Vec::new();
        for name in VARIANTS {
            variants.push(build_variant(name, &local_go, sources)?);
        }
        let app = GoApp { variants };
        *prepared = Some(app.clone());
        Ok(app)
    }

    /// The variant called `name` (one of [`VARIANTS`]).
    pub fn variant(&self, name: &str) -> Result<&GoVariant> {
        self.variants
            .iter()
            .find(|v| v.name == name)
            .with_context(|| format!("no fixture variant {name:?} (have {VARIANTS:?})"))
    }
}

/// `go version` of the machine's go (GOTOOLCHAIN=local).
fn go_version_output() -> Result<String> {
    let out = Command::new("go")
        .arg("version")
        .env("GOTOOLCHAIN", "local")
        .output()
        .context("running `go version`")?;
    ensure!(
        out.status.success(),
        "`go version` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// FNV-1a over the fixture's `go.mod`, `go.sum` and `*.go` files (names and contents).
fn source_digest(dir: &Path) -> Result<u64> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            name == "go.mod" || name == "go.sum" || name.ends_with(".go")
        })
        .collect();
    files.sort();
    let mut h = Fnv::default();
    for f in files {
        h.write(f.file_name().unwrap_or_default().as_encoded_bytes());
        h.write(&std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?);
    }
    Ok(h.0)
}

/// FNV-1a, 64 bit: a digest that stays the same across Rust releases (for the stamp file).
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes.iter().chain(&[0xff]) {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

fn variant_settings(name: &str) -> Result<(&'static str, bool)> {
    Ok(match name {
        "go1.26" => ("local", false),
        "go1.26-stripped" => ("local", true),
        "go1.21" => (OLD_TOOLCHAIN, false),
        "go1.21-stripped" => (OLD_TOOLCHAIN, true),
        _ => bail!("unknown variant {name:?}"),
    })
}

fn build_variant(name: &str, local_go: &str, sources: u64) -> Result<GoVariant> {
    let (toolchain, stripped) = variant_settings(name)?;
    let dir = target_dir().join("godaemon").join(name);
    let daemon_bin = dir.join(DAEMON_COMM);
    let tool_bin = dir.join(TOOL_COMM);
    let stamp_path = dir.join("stamp");
    let mut key = Fnv(sources);
    key.write(name.as_bytes());
    key.write(toolchain.as_bytes());
    key.write(&[u8::from(stripped)]);
    if toolchain == "local" {
        key.write(local_go.as_bytes());
    }
    let key = format!("{:016x}", key.0);

    let mut variant = GoVariant {
        name: name.to_string(),
        toolchain: toolchain.to_string(),
        stripped,
        go_version: String::new(),
        dir: dir.clone(),
        daemon_bin: daemon_bin.clone(),
        tool_bin: tool_bin.clone(),
        build_time: None,
    };
    // stamp: "<key>\n<go version>\n", written last
    let stamp = crate::read_lossy(&stamp_path);
    let mut lines = stamp.lines();
    if lines.next() == Some(key.as_str())
        && daemon_bin.is_file()
        && tool_bin.is_file()
        && let Some(v) = lines.next().filter(|v| v.starts_with("go"))
    {
        variant.go_version = v.to_string();
        return Ok(variant);
    }

    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let _ = std::fs::remove_file(&stamp_path);
    let tmp = dir.join(format!(".{DAEMON_COMM}.tmp"));
    let mut cmd = Command::new("go");
    cmd.args(["build", "-buildvcs=false"]);
    if stripped {
        cmd.arg("-ldflags=-s -w");
    }
    cmd.arg("-o")
        .arg(&tmp)
        .arg(".")
        .current_dir(fixtures_dir())
        .env("GOTOOLCHAIN", toolchain);
    let started = Instant::now();
    let out = cmd
        .output()
        .with_context(|| format!("running go build for tests/fixtures/godaemon ({name})"))?;
    ensure!(
        out.status.success(),
        "go build of tests/fixtures/godaemon, variant {name} (GOTOOLCHAIN={toolchain}), failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    variant.build_time = Some(started.elapsed());
    eprintln!(
        "built tests/fixtures/godaemon variant {name} (GOTOOLCHAIN={toolchain}) in {:?}",
        started.elapsed()
    );
    variant.go_version = binary_go_version(&tmp)?;
    if toolchain != "local" {
        ensure!(
            variant.go_version == toolchain,
            "variant {name}: built with GOTOOLCHAIN={toolchain} but the binary says {}",
            variant.go_version
        );
    }
    let tool_tmp = dir.join(format!(".{TOOL_COMM}.tmp"));
    std::fs::copy(&tmp, &tool_tmp)
        .with_context(|| format!("copying {} to {}", tmp.display(), tool_tmp.display()))?;
    std::fs::rename(&tool_tmp, &tool_bin)?;
    std::fs::rename(&tmp, &daemon_bin)?;
    std::fs::write(&stamp_path, format!("{key}\n{}\n", variant.go_version))
        .with_context(|| format!("writing {}", stamp_path.display()))?;
    Ok(variant)
}

/// The Go version a binary was built with (`go version BIN` → `go1.26.8`).
pub fn binary_go_version(bin: &Path) -> Result<String> {
    let out = Command::new("go")
        .arg("version")
        .arg(bin)
        .env("GOTOOLCHAIN", "local")
        .output()
        .context("running `go version BIN`")?;
    ensure!(
        out.status.success(),
        "`go version {}` failed: {}",
        bin.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.rsplit(": ")
        .next()
        .map(|v| v.trim().to_string())
        .filter(|v| v.starts_with("go"))
        .with_context(|| format!("unexpected `go version BIN` output {text:?}"))
}

// ---------------------------------------------------------------------------------------
// processes

/// Spawns a fixture process and waits for its `listening ADDR` line.
fn spawn_listening(name: &str, bin: &Path, args: &[String]) -> Result<(Proc, SocketAddr, TempDir)> {
    let dir = TempDir::new(name)?;
    let mut cmd = Command::new(bin);
    cmd.args(args);
    let mut proc = Proc::spawn(name, cmd, dir.path())?;
    let got = crate::poll(START_TIMEOUT, Duration::from_millis(20), || {
        if let Some(a) = parse_listening(&proc.stdout()) {
            return Some(Ok(a));
        }
        proc.try_exit().map(Err)
    });
    match got {
        Some(Ok(addr)) => Ok((proc, addr, dir)),
        Some(Err(st)) => bail!(
            "{name} {args:?} exited ({st}) before listening\n{}",
            proc.log_tail(40)
        ),
        None => bail!(
            "{name} {args:?} printed no `listening` line within {START_TIMEOUT:?}\n{}",
            proc.log_tail(40)
        ),
    }
}

/// The address of a `listening ADDR` line.
pub fn parse_listening(stdout: &str) -> Option<SocketAddr> {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("listening "))
        .and_then(|a| a.trim().parse().ok())
}

/// A running tool server (`gotool -mode tool`) on 127.0.0.1 (stopped on drop).
pub struct GoTool {
    // Field order matters: the process stops before its directory goes.
    proc: Proc,
    addr: SocketAddr,
    variant: String,
    _dir: TempDir,
}

impl GoTool {
    /// Starts the tool of `variant` on a port the kernel picks, answering after
    /// [`DEFAULT_TOOL_DELAY`]; returns once it listens.
    pub fn start(variant: &GoVariant) -> Result<GoTool> {
        Self::start_with_delay(variant, DEFAULT_TOOL_DELAY)
    }

    /// Starts the tool of `variant`, answering each request after `delay`.
    pub fn start_with_delay(variant: &GoVariant, delay: Duration) -> Result<GoTool> {
        let args = vec![
            "-mode".to_string(),
            "tool".to_string(),
            "-listen".to_string(),
            "127.0.0.1:0".to_string(),
            "-delay".to_string(),
            format!("{}us", delay.as_micros()),
        ];
        let (proc, addr, dir) = spawn_listening(TOOL_COMM, &variant.tool_bin, &args)?;
        Ok(GoTool {
            proc,
            addr,
            variant: variant.name.clone(),
            _dir: dir,
        })
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn variant(&self) -> &str {
        &self.variant
    }

    pub fn logs(&self, n: usize) -> String {
        self.proc.log_tail(n)
    }

    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }
}

/// A running daemon (`godaemon -mode daemon`) on 127.0.0.1 (stopped on drop).
pub struct GoDaemon {
    // Field order matters: the process stops before its directory goes.
    proc: Proc,
    addr: SocketAddr,
    tool: SocketAddr,
    variant: String,
    _dir: TempDir,
}

impl GoDaemon {
    /// Starts the daemon of `variant` on a port the kernel picks, calling the tool server
    /// at `tool`; returns once it listens.
    pub fn start(variant: &GoVariant, tool: SocketAddr) -> Result<GoDaemon> {
        ensure!(
            tool.ip().is_loopback(),
            "the tool must be on loopback, not {tool}"
        );
        let args = vec![
            "-mode".to_string(),
            "daemon".to_string(),
            "-listen".to_string(),
            "127.0.0.1:0".to_string(),
            "-tool".to_string(),
            format!("http://{tool}"),
        ];
        let (proc, addr, dir) = spawn_listening(DAEMON_COMM, &variant.daemon_bin, &args)?;
        Ok(GoDaemon {
            proc,
            addr,
            tool,
            variant: variant.name.clone(),
            _dir: dir,
        })
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The tool server it calls.
    pub fn tool_addr(&self) -> SocketAddr {
        self.tool
    }

    pub fn variant(&self) -> &str {
        &self.variant
    }

    /// `GET /health` (a plain net/http route, no gin, no outbound call).
    pub fn health(&self) -> Result<HttpResponse> {
        http_get(self.addr, "/health", &[])
    }

    pub fn logs(&self, n: usize) -> String {
        self.proc.log_tail(n)
    }

    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }
}

// ---------------------------------------------------------------------------------------
// load

/// One `POST /plugin/<tenant>/dispatch/tool/invoke` sent to the daemon, and its outcome.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// `i` of `t-<i>`.
    pub index: usize,
    pub tenant: String,
    /// The request path.
    pub path: String,
    /// The client side of the connection (one connection per request, `Connection: close`).
    pub local: Option<SocketAddr>,
    /// `None` when no response was read.
    pub status: Option<u16>,
    pub body: String,
    /// Connection or read error.
    pub error: Option<String>,
    /// From connect to the end of the response.
    pub elapsed: Duration,
}

impl Invocation {
    /// What is wrong with the outcome: anything but 200 with
    /// `{"tenant":"<its tenant>","tool_status":200}`. `None` when right.
    pub fn problem(&self) -> Option<String> {
        if let Some(e) = &self.error {
            return Some(format!("{}: {e}", self.tenant));
        }
        if self.status != Some(200) {
            return Some(format!(
                "{}: status {:?}, body {}",
                self.tenant, self.status, self.body
            ));
        }
        let json: serde_json::Value = match serde_json::from_str(&self.body) {
            Ok(v) => v,
            Err(e) => {
                return Some(format!(
                    "{}: body {:?} is not JSON: {e}",
                    self.tenant, self.body
                ));
            }
        };
        let tenant = json.get("tenant").and_then(|t| t.as_str());
        let tool_status = json.get("tool_status").and_then(|t| t.as_i64());
        if tenant != Some(self.tenant.as_str()) || tool_status != Some(200) {
            return Some(format!(
                "{}: wrong answer {} (want tenant {:?}, tool_status 200)",
                self.tenant, self.body, self.tenant
            ));
        }
        None
    }

    pub fn ok(&self) -> bool {
        self.problem().is_none()
    }
}

/// A Dify-shaped dispatch body (no credentials).
pub fn request_body(tenant: &str) -> String {
    serde_json::json!({
        "user_id": "u-1",
        "conversation_id": "",
        "app_id": "app-1",
        "message_id": "",
        "data": {
            "provider": "echo",
            "tool": "echo",
            "tool_parameters": { "tenant": tenant },
        },
    })
    .to_string()
}

/// Sends request `t-<index>` on a fresh connection (`Connection: close`) and reads the answer.
pub fn invoke(daemon: SocketAddr, index: usize) -> Invocation {
    let tenant = tenant(index);
    let path = invoke_path(&tenant);
    let body = request_body(&tenant);
    let mut inv = Invocation {
        index,
        tenant,
        path,
        local: None,
        status: None,
        body: String::new(),
        error: None,
        elapsed: Duration::ZERO,
    };
    let started = Instant::now();
    let result = (|| -> Result<HttpResponse> {
        ensure!(
            daemon.ip().is_loopback(),
            "not a loopback address: {daemon}"
        );
        // 20 s read and write timeouts; the tool answers within milliseconds.
        let mut conn = HttpConn::connect(daemon)?;
        inv.local = conn.local_addr().ok();
        conn.request(
            "POST",
            &inv.path,
            &[
                ("Content-Type", "application/json"),
                ("X-Plugin-ID", "difytrace/echo"),
                ("Connection", "close"),
            ],
            body.as_bytes(),
        )
    })();
    inv.elapsed = started.elapsed();
    match result {
        Ok(r) => {
            inv.status = Some(r.status);
            inv.body = r.text();
        }
        Err(e) => inv.error = Some(format!("{e:#}")),
    }
    inv
}

/// Sends requests `t-0` .. `t-<n-1>` with at most `concurrency` in flight (worker threads
/// released together), one connection each; returns every outcome, in index order. Never
/// fails: see [`check_invocations`].
pub fn invoke_many(daemon: SocketAddr, n: usize, concurrency: usize) -> Vec<Invocation> {
    concurrently(0..n, concurrency, || (), |_, i| invoke(daemon, i))
}

/// Fails unless every invocation got 200 and its own tenant back; the error lists the bad
/// ones.
pub fn check_invocations(invs: &[Invocation]) -> Result<()> {
    let bad: Vec<String> = invs.iter().filter_map(Invocation::problem).collect();
    ensure!(
        bad.is_empty(),
        "{} of {} requests to the daemon failed:\n  {}",
        bad.len(),
        invs.len(),
        bad.join("\n  ")
    );
    Ok(())
}

/// `t-0` .. `t-<n-1>` one after the other; fails unless all were answered right.
pub fn invoke_sequential(daemon: SocketAddr, n: usize) -> Result<Vec<Invocation>> {
    let invs = invoke_many(daemon, n, 1);
    check_invocations(&invs)?;
    Ok(invs)
}

/// `t-0` .. `t-<n-1>` all at once (n threads); fails unless all were answered right.
pub fn invoke_concurrent(daemon: SocketAddr, n: usize) -> Result<Vec<Invocation>> {
    let invs = invoke_many(daemon, n, n);
    check_invocations(&invs)?;
    Ok(invs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inv(status: Option<u16>, body: &str) -> Invocation {
        Invocation {
            index: 3,
            tenant: tenant(3),
            path: invoke_path("t-3"),
            local: None,
            status,
            body: body.to_string(),
            error: None,
            elapsed: Duration::ZERO,
        }
    }

    #[test]
    fn paths_and_tenants() {
        assert_eq!(tenant(42), "t-42");
        assert_eq!(invoke_path("t-1"), "/plugin/t-1/dispatch/tool/invoke");
        assert_eq!(tool_path("t-1"), "/tool/t-1");
        let body: serde_json::Value = serde_json::from_str(&request_body("t-9")).unwrap();
        assert_eq!(body["data"]["tool_parameters"]["tenant"], "t-9");
    }

    #[test]
    fn judges_answers() {
        assert!(inv(Some(200), r#"{"tenant":"t-3","tool_status":200}"#).ok());
        let wrong = inv(Some(200), r#"{"tenant":"t-4","tool_status":200}"#);
        assert!(wrong.problem().unwrap().contains("wrong answer"));
        assert!(!inv(Some(200), r#"{"tenant":"t-3","tool_status":500}"#).ok());
        assert!(!inv(Some(502), r#"{"tenant":"t-3","error":"x"}"#).ok());
        assert!(!inv(Some(200), "not json").ok());
        let mut e = inv(None, "");
        e.error = Some("connection refused".into());
        assert_eq!(e.problem().unwrap(), "t-3: connection refused");
        assert!(
            check_invocations(&[inv(Some(200), r#"{"tenant":"t-3","tool_status":200}"#)]).is_ok()
        );
        let err = check_invocations(&[e]).unwrap_err().to_string();
        assert!(err.contains("1 of 1 requests"), "{err}");
    }

    #[test]
    fn parses_listening_line() {
        assert_eq!(
            parse_listening("listening 127.0.0.1:40123\n"),
            Some("127.0.0.1:40123".parse().unwrap())
        );
        assert_eq!(parse_listening("starting\n"), None);
        assert_eq!(parse_listening("listening on 127.0.0.1:1\n"), None);
    }

    #[test]
    fn digest_is_stable() {
        let mut a = Fnv::default();
        a.write(b"go.mod");
        let mut b = Fnv::default();
        b.write(b"go.mod");
        assert_eq!(a.0, b.0);
        // field boundaries count: "ab" + "c" differs from "a" + "bc"
        let (mut x, mut y) = (Fnv::default(), Fnv::default());
        x.write(b"ab");
        x.write(b"c");
        y.write(b"a");
        y.write(b"bc");
        assert_ne!(x.0, y.0);
        assert!(variant_settings("go1.20").is_err());
        assert_eq!(
            variant_settings("go1.21-stripped").unwrap(),
            (OLD_TOOLCHAIN, true)
        );
    }
}
