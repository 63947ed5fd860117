//! The gRPC fixtures of `tests/fixtures/grpc`: a grpc-go server and client (one binary,
//! `grpcfixture`) and a grpcio (Python, C-core) client, all speaking the echo service of
//! `google.golang.org/grpc/examples` (`grpc.examples.echo.Echo`) over h2c on loopback.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use difytrace_tests::grpc::{GrpcFixture, GrpcServer};
//! let fx = GrpcFixture::prepare()?;
//! let server = GrpcServer::start(&fx)?;
//! let run = fx.go_client(&["-target", &server.target(), "-mode", "mixed", "-count", "6"])?;
//! assert_eq!(run.calls.len(), 6);
//! let rpcs = server.wait_rpcs(6, std::time::Duration::from_secs(10))?;
//! assert_eq!(rpcs[0].peer, run.conns.first().map(|c| c.local));
//! # Ok(()) }
//! ```
//!
//! Binaries and the venv go to `<target>/grpcfixture` and `<target>/grpc-venv`, where
//! target is `$CARGO_TARGET_DIR` or `<workspace>/target`. `go` must be on `PATH` (the
//! module cache is filled from the Go module proxy on the first build) and `python3` must
//! have `venv` and `pip` (grpcio from PyPI on the first run).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, ExitStatus};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::procs::{Proc, free_port, local};
use crate::{TempDir, workspace_root};

/// The service of the fixtures.
pub const SERVICE: &str = "grpc.examples.echo.Echo";
/// `:path` of the unary method.
pub const UNARY_METHOD: &str = "/grpc.examples.echo.Echo/UnaryEcho";
/// `:path` of the server-streaming method.
pub const STREAM_METHOD: &str = "/grpc.examples.echo.Echo/ServerStreamingEcho";
/// Binary name, and so the comm, of the Go server, client and relay.
pub const GO_COMM: &str = "grpcfixture";
/// Binary name and comm of the stripped build ([`GrpcFixture::stripped`]).
pub const STRIPPED_COMM: &str = "grpcfx-stripped";
/// gRPC status NOT_FOUND, what `-mode fail` calls return.
pub const NOT_FOUND: u32 = 5;
/// Messages per server-streaming call unless `-stream-n` says otherwise.
pub const DEFAULT_STREAM_N: u32 = 3;

/// Longest a client run may take by default (the clients give up by themselves after
/// `-max-time`, 60 s unless given, plus `-wait-before` and `-hold`).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(300);
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The fixture's directory in the repository.
pub fn fixtures_dir() -> PathBuf {
    workspace_root().join("tests/fixtures/grpc")
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// What the fixtures need on this machine and is missing (`go`, `python3`), for
/// [`crate::prerequisite_missing`].
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

/// The prepared fixtures.
#[derive(Debug, Clone)]
pub struct GrpcFixture {
    /// The Go program (`server`, `client`, `h2dump` subcommands).
    pub bin: PathBuf,
    /// The venv's python, with the pinned grpcio.
    pub python: PathBuf,
    /// `tests/fixtures/grpc/client.py`.
    pub client_py: PathBuf,
}

static PREPARED: Mutex<Option<GrpcFixture>> = Mutex::new(None);

impl GrpcFixture {
    /// Builds `<target>/grpcfixture` (`go build`; fast when nothing changed) and makes the
    /// venv `<target>/grpc-venv` (`setup.py`; nothing to do when grpcio is there). Done
    /// once per test binary.
    pub fn prepare() -> Result<GrpcFixture> {
        let mut prepared = PREPARED.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(fx) = prepared.as_ref() {
            return Ok(fx.clone());
        }
        let dir = fixtures_dir();
        let target = target_dir();
        let bin = target.join(GO_COMM);
        let out = Command::new("go")
            .args(["build", "-o"])
            .arg(&bin)
            .arg(".")
            .current_dir(&dir)
            .output()
            .context("running go build for tests/fixtures/grpc")?;
        ensure!(
            out.status.success(),
            "go build in {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let out = Command::new("python3")
            .arg(dir.join("setup.py"))
            .arg(target.join("grpc-venv"))
            .output()
            .context("running tests/fixtures/grpc/setup.py")?;
        ensure!(
            out.status.success(),
            "grpc venv setup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let python = PathBuf::from(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .last()
                .context("setup.py printed no python path")?
                .trim(),
        );
        ensure!(
            python.exists(),
            "setup.py printed {}, which does not exist",
            python.display()
        );
        let fx = GrpcFixture {
            bin,
            python,
            client_py: dir.join("client.py"),
        };
        *prepared = Some(fx.clone());
        Ok(fx)
    }

    /// The same program built stripped (`-ldflags=-s -w`: no symbols, no DWARF) as
    /// `<target>/grpcfx-stripped` (so its comm is [`STRIPPED_COMM`]); `bin` of the returned
    /// fixture.
    pub fn stripped(&self) -> Result<GrpcFixture> {
        let bin = target_dir().join(STRIPPED_COMM);
        let out = Command::new("go")
            .args(["build", "-ldflags=-s -w", "-o"])
            .arg(&bin)
            .arg(".")
            .current_dir(fixtures_dir())
            .output()
            .context("running go build -ldflags=-s -w for tests/fixtures/grpc")?;
        ensure!(
            out.status.success(),
            "stripped go build failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(GrpcFixture {
            bin,
            ..self.clone()
        })
    }

    /// Runs `grpcfixture client ARGS` to completion (within [`CLIENT_TIMEOUT`]); fails
    /// unless it exits 0, i.e. unless every call returned what its mode expects.
    pub fn go_client(&self, args: &[&str]) -> Result<ClientRun> {
        self.go_client_spawn(args)?.wait(CLIENT_TIMEOUT)
    }

    /// Starts `grpcfixture client ARGS` and returns while it runs (for `-wait-before` and
    /// `-hold`: see [`RunningClient::wait_line`]).
    pub fn go_client_spawn(&self, args: &[&str]) -> Result<RunningClient> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("client").args(args);
        RunningClient::spawn("grpcfixture-client", cmd)
    }

    /// Runs `client.py ARGS` under the venv's python to completion; fails unless it exits 0.
    pub fn python_client(&self, args: &[&str]) -> Result<ClientRun> {
        self.python_client_spawn(args)?.wait(CLIENT_TIMEOUT)
    }

    /// Starts `client.py ARGS` and returns while it runs.
    pub fn python_client_spawn(&self, args: &[&str]) -> Result<RunningClient> {
        let mut cmd = Command::new(&self.python);
        cmd.arg(&self.client_py)
            .args(args)
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1");
        RunningClient::spawn("grpc-python-client", cmd)
    }
}

// ---------------------------------------------------------------------------------------
// server

/// A running `grpcfixture server` on 127.0.0.1 (stopped on drop).
pub struct GrpcServer {
    // Field order matters: the process stops before its directory goes.
    proc: Proc,
    port: u16,
    _dir: TempDir,
}

impl GrpcServer {
    /// Starts the server on a free port and returns once it listens. Readiness is its
    /// `listening on` line, not a probe connection, so that the only connections the
    /// server ever sees are the test's.
    pub fn start(fixture: &GrpcFixture) -> Result<GrpcServer> {
        Self::start_with(fixture, &[])
    }

    /// [`GrpcServer::start`] with more flags, e.g. `["-downstream", "127.0.0.1:PORT"]`.
    pub fn start_with(fixture: &GrpcFixture, args: &[&str]) -> Result<GrpcServer> {
        let mut last_err = None;
        // A port free a moment ago can be taken before the server binds it: retry.
        for _ in 0..3 {
            match Self::start_on_with(fixture, free_port(), args) {
                Ok(s) => return Ok(s),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.expect("three attempts"))
    }

    /// Starts the server on `127.0.0.1:port`.
    pub fn start_on(fixture: &GrpcFixture, port: u16) -> Result<GrpcServer> {
        Self::start_on_with(fixture, port, &[])
    }

    fn start_on_with(fixture: &GrpcFixture, port: u16, args: &[&str]) -> Result<GrpcServer> {
        let dir = TempDir::new("grpc-server")?;
        let mut cmd = Command::new(&fixture.bin);
        cmd.arg("server")
            .arg("-listen")
            .arg(local(port).to_string())
            .args(args);
        let mut proc = Proc::spawn("grpcfixture-server", cmd, dir.path())?;
        wait_listening(&mut proc, START_TIMEOUT)?;
        Ok(GrpcServer {
            proc,
            port,
            _dir: dir,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        local(self.port)
    }

    /// `127.0.0.1:PORT`, for `-target`.
    pub fn target(&self) -> String {
        self.addr().to_string()
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The RPCs handled so far (one `rpc ...` line each, printed when the handler returns).
    pub fn rpcs(&self) -> Vec<ServerRpc> {
        parse_server_rpcs(&self.proc.stdout())
    }

    /// Waits until at least `n` RPCs were handled; returns all of them.
    pub fn wait_rpcs(&self, n: usize, timeout: Duration) -> Result<Vec<ServerRpc>> {
        crate::poll(timeout, Duration::from_millis(50), || {
            let r = self.rpcs();
            (r.len() >= n).then_some(r)
        })
        .with_context(|| {
            format!(
                "grpc server handled fewer than {n} RPCs within {timeout:?}\n{}",
                self.proc.log_tail(40)
            )
        })
    }

    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }

    pub fn logs(&self, n: usize) -> String {
        self.proc.log_tail(n)
    }
}

/// Waits for the `listening on ADDR` line of a server or relay; fails early if it exits.
fn wait_listening(proc: &mut Proc, timeout: Duration) -> Result<SocketAddr> {
    let got = crate::poll(timeout, Duration::from_millis(20), || {
        if let Some(a) = parse_listening(&proc.stdout()) {
            return Some(Ok(a));
        }
        proc.try_exit().map(Err)
    });
    match got {
        Some(Ok(a)) => Ok(a),
        Some(Err(st)) => bail!(
            "{} exited ({st}) before listening\n{}",
            proc.name(),
            proc.log_tail(40)
        ),
        None => bail!(
            "{} did not print `listening on` within {timeout:?}\n{}",
            proc.name(),
            proc.log_tail(40)
        ),
    }
}

/// A `grpcfixture h2dump` relay: accepts on a free loopback port, forwards to `upstream`
/// and prints every HTTP/2 frame and HPACK field representation (see the README).
pub struct H2Dump {
    proc: Proc,
    port: u16,
    _dir: TempDir,
}

impl H2Dump {
    pub fn start(fixture: &GrpcFixture, upstream: SocketAddr) -> Result<H2Dump> {
        let dir = TempDir::new("grpc-h2dump")?;
        let mut cmd = Command::new(&fixture.bin);
        cmd.arg("h2dump")
            .args(["-listen", "127.0.0.1:0", "-target"])
            .arg(upstream.to_string());
        let mut proc = Proc::spawn("grpcfixture-h2dump", cmd, dir.path())?;
        let addr = wait_listening(&mut proc, START_TIMEOUT)?;
        Ok(H2Dump {
            proc,
            port: addr.port(),
            _dir: dir,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        local(self.port)
    }

    /// `127.0.0.1:PORT`, for a client's `-target`.
    pub fn target(&self) -> String {
        self.addr().to_string()
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Everything printed so far.
    pub fn output(&self) -> String {
        self.proc.stdout()
    }
}

// ---------------------------------------------------------------------------------------
// clients

/// A client started by [`GrpcFixture::go_client_spawn`] or
/// [`GrpcFixture::python_client_spawn`] (stopped on drop if still running).
pub struct RunningClient {
    // Field order matters: the process stops before its directory goes.
    proc: Proc,
    _dir: TempDir,
}

impl RunningClient {
    fn spawn(name: &str, cmd: Command) -> Result<RunningClient> {
        let dir = TempDir::new(name)?;
        let proc = Proc::spawn(name, cmd, dir.path())?;
        Ok(RunningClient { proc, _dir: dir })
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Output so far.
    pub fn stdout(&self) -> String {
        self.proc.stdout()
    }

    /// Waits until the client printed a line starting with `prefix` (e.g. `warm-up done`,
    /// `calls done`, `holding`); returns that line. Fails early when the client exits
    /// without printing it.
    pub fn wait_line(&mut self, prefix: &str, timeout: Duration) -> Result<String> {
        let proc = &mut self.proc;
        let got = crate::poll(timeout, Duration::from_millis(20), || {
            let find = |out: String| {
                out.lines()
                    .find(|l| l.starts_with(prefix))
                    .map(str::to_string)
            };
            if let Some(l) = find(proc.stdout()) {
                return Some(Ok(l));
            }
            // Exited: look once more (the line may have come just before the exit).
            proc.try_exit().map(|st| find(proc.stdout()).ok_or(st))
        });
        match got {
            Some(Ok(l)) => Ok(l),
            Some(Err(st)) => bail!(
                "{} exited ({st}) without printing `{prefix}`\n{}",
                proc.name(),
                proc.log_tail(40)
            ),
            None => bail!(
                "{} printed no `{prefix}` line within {timeout:?}\n{}",
                proc.name(),
                proc.log_tail(40)
            ),
        }
    }

    /// Waits for `warm-up done` (after the warm-up call of `-wait-before`: the connection
    /// exists and both HPACK dynamic tables hold the request and response headers).
    pub fn wait_warmup(&mut self, timeout: Duration) -> Result<String> {
        self.wait_line("warm-up done", timeout)
    }

    /// Waits for the client to exit; fails unless it exited 0.
    pub fn wait(self, timeout: Duration) -> Result<ClientRun> {
        let run = self.wait_any(timeout)?;
        ensure!(
            run.success(),
            "gRPC client {} failed (exit {:?}):\n{}\n{}",
            run.pid,
            run.exit_code,
            run.stdout,
            run.stderr
        );
        Ok(run)
    }

    /// Waits for the client to exit, whatever its exit status (see [`ClientRun::exit_code`]).
    pub fn wait_any(mut self, timeout: Duration) -> Result<ClientRun> {
        let pid = self.proc.pid();
        let status = self.proc.wait_exit(timeout);
        let (stdout, stderr) = (self.proc.stdout(), self.proc.stderr());
        let Some(status) = status else {
            self.proc.stop();
            bail!("gRPC client {pid} did not finish within {timeout:?}:\n{stdout}\n{stderr}");
        };
        let mut run = parse_client_output(&stdout);
        run.pid = pid;
        run.exit_code = status.code();
        run.status = Some(status);
        run.stderr = stderr;
        Ok(run)
    }

    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }
}

// ---------------------------------------------------------------------------------------
// output parsing

/// One measured call, from a client's
/// `call N kind=K method=M code=C status=S msgs=N ok=B duration=Xms` line.
#[derive(Debug, Clone, PartialEq)]
pub struct CallReport {
    /// 1-based.
    pub index: u32,
    /// `unary`, `stream`, `fail`, `chain` or `chainfail`.
    pub kind: String,
    /// The `:path`, e.g. [`UNARY_METHOD`].
    pub method: String,
    /// gRPC status code (0 OK, 5 NOT_FOUND, …).
    pub code: u32,
    /// Its canonical name (`OK`, `NOT_FOUND`, …).
    pub status: String,
    /// Response messages received.
    pub msgs: u32,
    /// The call returned what its kind expects.
    pub ok: bool,
    pub duration_ms: f64,
    pub line: String,
}

/// One TCP connection of a client to its target (`conn n=N local=A remote=B`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnReport {
    pub n: u32,
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

/// What one client run printed (see the README for the lines).
#[derive(Debug, Clone, Default)]
pub struct ClientRun {
    pub pid: u32,
    /// `impl=` of the first line: `grpc-go/1.85.0` or `grpc-python/1.85.3`.
    pub implementation: Option<String>,
    /// TCP connections to the target, in the order they were seen.
    pub conns: Vec<ConnReport>,
    /// The `warm-up done` line, when there was a warm-up call.
    pub warmup: Option<String>,
    /// The measured calls.
    pub calls: Vec<CallReport>,
    /// `conns=` of the `calls done` line (the client's own count of TCP connections).
    pub conns_reported: Option<u32>,
    /// The client printed `done` (every call as expected, connection closed).
    pub done: bool,
    pub exit_code: Option<i32>,
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

impl ClientRun {
    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }

    /// The client side of its first connection.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.conns.first().map(|c| c.local)
    }

    /// Calls of one kind (`unary`, `stream`, `fail`).
    pub fn calls_of(&self, kind: &str) -> Vec<&CallReport> {
        self.calls.iter().filter(|c| c.kind == kind).collect()
    }
}

/// One RPC the server handled (`rpc method=M code=C status=S msgs=N peer=A duration=Xms
/// [md:key=value]...`).
#[derive(Debug, Clone, PartialEq)]
pub struct ServerRpc {
    pub method: String,
    pub code: u32,
    pub status: String,
    /// Response messages sent.
    pub msgs: u32,
    /// The client's address (its side of the connection).
    pub peer: Option<SocketAddr>,
    pub duration_ms: f64,
    /// Request metadata beyond the standard headers (`user-agent`, `content-type`, `te`,
    /// `grpc-*`), e.g. `traceparent`; spaces in values are printed as `%20`.
    pub metadata: Vec<(String, String)>,
    pub line: String,
}

impl ServerRpc {
    /// The first value of request metadata `key`.
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.metadata
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

fn duration_ms(line: &str) -> f64 {
    field(line, "duration")
        .and_then(|d| d.strip_suffix("ms"))
        .and_then(|d| d.parse().ok())
        .unwrap_or(0.0)
}

/// Parses one `call ...` line.
pub fn parse_call_line(line: &str) -> Option<CallReport> {
    let rest = line.strip_prefix("call ")?;
    Some(CallReport {
        index: rest.split_whitespace().next()?.parse().ok()?,
        kind: field(line, "kind")?.to_string(),
        method: field(line, "method")?.to_string(),
        code: field(line, "code")?.parse().ok()?,
        status: field(line, "status")?.to_string(),
        msgs: field(line, "msgs")?.parse().ok()?,
        ok: field(line, "ok")? == "true",
        duration_ms: duration_ms(line),
        line: line.to_string(),
    })
}

/// Parses what a client (Go or Python) printed. `pid`, `exit_code`, `status` and `stderr`
/// are left for the caller.
pub fn parse_client_output(stdout: &str) -> ClientRun {
    let mut run = ClientRun {
        stdout: stdout.to_string(),
        ..Default::default()
    };
    for line in stdout.lines() {
        if line.starts_with("client ") {
            run.implementation = field(line, "impl").map(str::to_string);
        } else if line.starts_with("conn ") {
            let conn = (|| {
                Some(ConnReport {
                    n: field(line, "n")?.parse().ok()?,
                    local: field(line, "local")?.parse().ok()?,
                    remote: field(line, "remote")?.parse().ok()?,
                })
            })();
            run.conns.extend(conn);
        } else if line.starts_with("warm-up done") {
            run.warmup = Some(line.to_string());
        } else if line.starts_with("calls done") {
            run.conns_reported = field(line, "conns").and_then(|c| c.parse().ok());
        } else if line == "done" {
            run.done = true;
        } else if let Some(call) = parse_call_line(line) {
            run.calls.push(call);
        }
    }
    run
}

/// The address of a `listening on ADDR` line.
pub fn parse_listening(stdout: &str) -> Option<SocketAddr> {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("listening on "))
        .and_then(|a| a.trim().parse().ok())
}

/// The server's `rpc ...` lines.
pub fn parse_server_rpcs(stdout: &str) -> Vec<ServerRpc> {
    stdout
        .lines()
        .filter_map(|line| {
            line.strip_prefix("rpc ")?;
            let metadata = line
                .split_whitespace()
                .filter_map(|w| w.strip_prefix("md:")?.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            Some(ServerRpc {
                method: field(line, "method")?.to_string(),
                code: field(line, "code")?.parse().ok()?,
                status: field(line, "status")?.to_string(),
                msgs: field(line, "msgs")?.parse().ok()?,
                peer: field(line, "peer").and_then(|p| p.parse().ok()),
                duration_ms: duration_ms(line),
                metadata,
                line: line.to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GO_OUT: &str = "client pid=11063 target=127.0.0.1:50999 mode=mixed count=3 impl=grpc-go/1.85.0\n\
        conn n=1 local=127.0.0.1:53776 remote=127.0.0.1:50999\n\
        warm-up done code=0 status=OK wait=300ms\n\
        call 1 kind=unary method=/grpc.examples.echo.Echo/UnaryEcho code=0 status=OK msgs=1 ok=true duration=0.533ms\n\
        call 2 kind=stream method=/grpc.examples.echo.Echo/ServerStreamingEcho code=0 status=OK msgs=3 ok=true duration=0.185ms\n\
        call 3 kind=fail method=/grpc.examples.echo.Echo/UnaryEcho code=5 status=NOT_FOUND msgs=0 ok=true duration=0.145ms\n\
        calls done count=3 ok=3 failed=0 conns=1\n\
        holding 200ms\n\
        done\n";

    #[test]
    fn parses_go_client_output() {
        let run = parse_client_output(GO_OUT);
        assert_eq!(run.implementation.as_deref(), Some("grpc-go/1.85.0"));
        assert_eq!(
            run.conns,
            vec![ConnReport {
                n: 1,
                local: "127.0.0.1:53776".parse().unwrap(),
                remote: "127.0.0.1:50999".parse().unwrap(),
            }]
        );
        assert_eq!(run.local_addr(), Some("127.0.0.1:53776".parse().unwrap()));
        assert_eq!(
            run.warmup.as_deref(),
            Some("warm-up done code=0 status=OK wait=300ms")
        );
        assert_eq!(run.calls.len(), 3);
        let c = &run.calls[1];
        assert_eq!(
            (c.index, c.kind.as_str(), c.method.as_str()),
            (2, "stream", STREAM_METHOD)
        );
        assert_eq!(
            (c.code, c.status.as_str(), c.msgs, c.ok),
            (0, "OK", 3, true)
        );
        assert!((c.duration_ms - 0.185).abs() < 1e-9);
        let f = &run.calls_of("fail")[0];
        assert_eq!(
            (f.code, f.status.as_str(), f.msgs),
            (NOT_FOUND, "NOT_FOUND", 0)
        );
        assert_eq!(f.method, UNARY_METHOD);
        assert_eq!(run.conns_reported, Some(1));
        assert!(run.done);
        // the exit status is filled in by the runner, not the parser
        assert!(!run.success());
    }

    #[test]
    fn parses_python_client_output_and_failures() {
        let out = "client pid=11650 target=127.0.0.1:50999 mode=unary count=2 impl=grpc-python/1.85.3\n\
            call 1 kind=unary method=/grpc.examples.echo.Echo/UnaryEcho code=14 status=UNAVAILABLE msgs=0 ok=false duration=0.788ms\n\
            conn n=1 local=127.0.0.1:46322 remote=127.0.0.1:50999\n\
            call 2 kind=unary method=/grpc.examples.echo.Echo/UnaryEcho code=5 status=NOT_FOUND msgs=0 ok=false duration=4.808ms\n\
            calls done count=2 ok=0 failed=2 conns=1\n";
        let run = parse_client_output(out);
        assert_eq!(run.implementation.as_deref(), Some("grpc-python/1.85.3"));
        assert_eq!(run.conns.len(), 1);
        assert_eq!(run.calls.len(), 2);
        assert!(run.calls.iter().all(|c| !c.ok));
        assert_eq!(run.calls[0].status, "UNAVAILABLE");
        assert_eq!(run.calls[1].code, NOT_FOUND);
        assert!(run.warmup.is_none());
        assert!(!run.done);
    }

    #[test]
    fn ignores_malformed_lines() {
        let out = "call x kind=unary\ncall 1 kind=unary method=/a code=zero status=OK msgs=1 ok=true\n\
            conn n=1 local=nowhere remote=127.0.0.1:1\ncalls\n";
        let run = parse_client_output(out);
        assert!(run.calls.is_empty());
        assert!(run.conns.is_empty());
        assert_eq!(run.conns_reported, None);
        assert!(parse_call_line("calls done count=1 ok=1 failed=0 conns=1").is_none());
    }

    #[test]
    fn parses_server_output() {
        let out = "listening on 127.0.0.1:50999\n\
            rpc method=/grpc.examples.echo.Echo/UnaryEcho code=0 status=OK msgs=1 peer=127.0.0.1:53744 duration=0.018ms md:traceparent=00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\n\
            rpc method=/grpc.examples.echo.Echo/ServerStreamingEcho code=0 status=OK msgs=3 peer=127.0.0.1:53756 duration=0.043ms\n\
            rpc method=/grpc.examples.echo.Echo/UnaryEcho code=5 status=NOT_FOUND msgs=0 peer=127.0.0.1:53754 duration=0.013ms md:a=1 md:a=2 md:x-y=p%20q\n\
            stopping on terminated\nserver stopped\n";
        assert_eq!(
            parse_listening(out),
            Some("127.0.0.1:50999".parse().unwrap())
        );
        assert_eq!(parse_listening("starting\n"), None);
        let rpcs = parse_server_rpcs(out);
        assert_eq!(rpcs.len(), 3);
        assert_eq!(rpcs[0].method, UNARY_METHOD);
        assert_eq!(
            rpcs[0].metadata("traceparent"),
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        );
        assert_eq!(rpcs[0].peer, Some("127.0.0.1:53744".parse().unwrap()));
        assert_eq!((rpcs[1].method.as_str(), rpcs[1].msgs), (STREAM_METHOD, 3));
        assert!(rpcs[1].metadata.is_empty());
        assert_eq!(
            (rpcs[2].code, rpcs[2].status.as_str()),
            (NOT_FOUND, "NOT_FOUND")
        );
        assert_eq!(rpcs[2].metadata("a"), Some("1"));
        assert_eq!(rpcs[2].metadata.len(), 3);
        assert_eq!(rpcs[2].metadata("x-y"), Some("p%20q"));
        assert!((rpcs[2].duration_ms - 0.013).abs() < 1e-9);
    }
}
