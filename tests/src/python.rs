//! Python side of the tests: the interpreter with flask + gunicorn, a Flask app served by
//! gunicorn (started through its console script so that its comm is `gunicorn`), and a
//! plain `http.server` downstream service (comm `python3`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::procs::{self, Proc, children_of, free_port, local, wait_port_of};
use crate::{TempDir, workspace_root};

/// The Python that has flask and gunicorn: `DIFYTRACE_PYTHON`, else the workspace venv
/// `<workspace>/target/venv/bin/python` when it exists, else `python3` on `PATH`.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("DIFYTRACE_PYTHON").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let venv = workspace_root().join("target/venv/bin/python");
    if venv.exists() {
        return venv;
    }
    PathBuf::from("python3")
}

/// Runs `python -c code` and returns its trimmed stdout.
pub fn python_eval(code: &str) -> Result<String> {
    let py = python();
    let out = Command::new(&py)
        .arg("-c")
        .arg(code)
        .output()
        .with_context(|| format!("running {}", py.display()))?;
    if !out.status.success() {
        bail!(
            "{} -c {code:?} failed ({}): {}",
            py.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Fails with a clear message unless flask and gunicorn import.
pub fn check_flask_gunicorn() -> Result<()> {
    python_eval("import flask, gunicorn").with_context(|| {
        format!(
            "{} lacks flask/gunicorn: set DIFYTRACE_PYTHON to a venv's python with them \
             (e.g. python3 -m venv target/venv && target/venv/bin/pip install flask gunicorn gevent)",
            python().display()
        )
    })?;
    Ok(())
}

/// The `gunicorn` console script of [`python()`]'s installation (its scripts directory),
/// else `gunicorn` on `PATH`.
pub fn gunicorn_bin() -> Result<PathBuf> {
    let py = python();
    // A venv's python is usually a symlink: the script sits next to the link, not the target.
    if py.components().count() > 1
        && let Some(dir) = py.parent()
    {
        let cand = dir.join("gunicorn");
        if cand.is_file() {
            return Ok(cand);
        }
    }
    let scripts = python_eval("import sysconfig; print(sysconfig.get_path('scripts'))")?;
    let cand = Path::new(&scripts).join("gunicorn");
    if cand.is_file() {
        return Ok(cand);
    }
    if let Some(p) = which("gunicorn") {
        return Ok(p);
    }
    bail!(
        "no gunicorn console script next to {} nor in {scripts} nor on PATH",
        py.display()
    )
}

/// An interpreter for helper services whose comm is `python3` (never `gunicorn`): the
/// `python3` next to [`python()`], else `python3` on `PATH`.
pub fn python3() -> PathBuf {
    let py = python();
    if py.components().count() > 1
        && let Some(dir) = py.parent()
    {
        let cand = dir.join("python3");
        if cand.exists() {
            return cand;
        }
    }
    PathBuf::from("python3")
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The Flask app used by the tests (module `app`, object `app`).
///
/// - `GET /hello` → `hello`
/// - `GET /users/<id>` → JSON `{"id": id, "name": "user-<id>"}`
/// - `GET /chain` (and `GET /chain/<token>`, for a path unique to one test) → calls
///   `GET /downstream/data` on `127.0.0.1:$DOWNSTREAM_PORT` with urllib and returns
///   `chain:<its body>`
/// - `GET /fail` → 500
///
/// Every response carries `X-Worker-Pid` (the pid of the worker that served it).
pub const DEMO_APP: &str = r#"
import os
import urllib.request

from flask import Flask, jsonify

app = Flask(__name__)
DOWNSTREAM = "http://127.0.0.1:%s" % os.environ.get("DOWNSTREAM_PORT", "9")


@app.after_request
def add_worker_pid(resp):
    resp.headers["X-Worker-Pid"] = str(os.getpid())
    return resp


@app.get("/hello")
def hello():
    return "hello"


@app.get("/users/<user_id>")
def user(user_id):
    return jsonify(id=user_id, name="user-" + user_id)


@app.get("/chain")
@app.get("/chain/<token>")
def chain(token=None):
    with urllib.request.urlopen(DOWNSTREAM + "/downstream/data", timeout=10) as r:
        body = r.read().decode()
    return "chain:" + body


@app.get("/fail")
def fail():
    return "failure", 500
"#;

/// How to run gunicorn.
#[derive(Debug, Clone)]
pub struct GunicornOpts {
    pub workers: u32,
    pub worker_class: String,
    pub threads: Option<u32>,
    /// `--max-requests` (with jitter 0): a worker is replaced after that many requests.
    pub max_requests: Option<u32>,
    /// `--name`.
    pub name: Option<String>,
    /// `MODULE:OBJECT`; the app source is written to `MODULE.py`.
    pub app: String,
    pub env: Vec<(String, String)>,
    pub extra_args: Vec<String>,
}

impl Default for GunicornOpts {
    fn default() -> Self {
        GunicornOpts {
            workers: 2,
            worker_class: "sync".into(),
            threads: None,
            max_requests: None,
            name: None,
            app: "app:app".into(),
            env: Vec::new(),
            extra_args: Vec::new(),
        }
    }
}

impl GunicornOpts {
    /// Sets `DOWNSTREAM_PORT` for [`DEMO_APP`]'s `/chain`.
    pub fn downstream(mut self, port: u16) -> Self {
        self.env.push(("DOWNSTREAM_PORT".into(), port.to_string()));
        self
    }
}

/// `gunicorn --help` of `bin` (asked once per binary).
fn gunicorn_help(bin: &Path) -> String {
    static CACHE: std::sync::Mutex<Vec<(PathBuf, String)>> = std::sync::Mutex::new(Vec::new());
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, help)) = cache.iter().find(|(b, _)| b == bin) {
        return help.clone();
    }
    let help = Command::new(bin)
        .arg("--help")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    cache.push((bin.to_path_buf(), help.clone()));
    help
}

/// Whether the gunicorn of [`gunicorn_bin`] knows the option `flag` (e.g. `--no-control-socket`).
pub fn gunicorn_has_flag(flag: &str) -> bool {
    gunicorn_bin()
        .map(|b| {
            gunicorn_help(&b)
                .split(|c: char| c.is_whitespace() || c == ',' || c == '=')
                .any(|w| w == flag)
        })
        .unwrap_or(false)
}

fn supports_no_control_socket(bin: &Path) -> bool {
    gunicorn_help(bin).contains("--no-control-socket")
}

/// A running gunicorn (master in its own process group; dropped = stopped).
pub struct Gunicorn {
    // Field order matters: the process stops before its directory goes.
    proc: Proc,
    port: u16,
    workers: u32,
    dir: TempDir,
}

impl Gunicorn {
    /// Writes `app_source` into a temp dir and starts `<venv>/bin/gunicorn` there on
    /// 127.0.0.1 with a free port; returns once it accepts connections and all workers
    /// are forked.
    pub fn start(app_source: &str, opts: &GunicornOpts) -> Result<Gunicorn> {
        let bin = gunicorn_bin()?;
        let dir = TempDir::new("gunicorn")?;
        let module = opts.app.split(':').next().unwrap_or("app");
        std::fs::write(dir.join(&format!("{module}.py")), app_source)?;
        let port = free_port();
        let mut cmd = Command::new(&bin);
        cmd.current_dir(dir.path());
        if supports_no_control_socket(&bin) {
            // Newer gunicorn otherwise shares one control socket path (~/.gunicorn) between
            // all instances. First on the line, away from the app argument.
            cmd.arg("--no-control-socket");
        }
        cmd.arg("--workers")
            .arg(opts.workers.to_string())
            .arg("--worker-class")
            .arg(&opts.worker_class)
            .arg("--bind")
            .arg(format!("127.0.0.1:{port}"))
            .args(["--access-logfile", "-", "--error-logfile", "-"])
            .args([
                "--log-level",
                "info",
                "--timeout",
                "30",
                "--graceful-timeout",
                "5",
            ]);
        if let Some(t) = opts.threads {
            cmd.arg("--threads").arg(t.to_string());
        }
        if let Some(m) = opts.max_requests {
            cmd.arg("--max-requests")
                .arg(m.to_string())
                .args(["--max-requests-jitter", "0"]);
        }
        if let Some(n) = &opts.name {
            cmd.arg("--name").arg(n);
        }

        cmd.args(&opts.extra_args).arg(&opts.app);
        cmd.env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1");
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let mut proc = Proc::spawn("gunicorn", cmd, dir.path())?;
        wait_port_of(&mut proc, local(port), Duration::from_secs(30))?;
        let mut g = Gunicorn {
            proc,
            port,
            workers: opts.workers,
            dir,
        };
        g.wait_workers(Duration::from_secs(30))?;
        Ok(g)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        local(self.port)
    }

    pub fn master_pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Current worker pids (children of the master).
    pub fn worker_pids(&self) -> Vec<u32> {
        children_of(self.proc.pid())
    }

    /// Waits until all configured workers are forked; returns their pids.
    pub fn wait_workers(&mut self, timeout: Duration) -> Result<Vec<u32>> {
        let want = self.workers as usize;
        let master = self.proc.pid();
        let got = crate::poll(timeout, Duration::from_millis(50), || {
            let w = children_of(master);
            (w.len() >= want).then_some(w)
        });
        match got {
            Some(w) => Ok(w),
            None => bail!(
                "gunicorn has {:?} workers, wanted {want}\n{}",
                children_of(master),
                self.proc.log_tail(40)
            ),
        }
    }

    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn logs(&self, n: usize) -> String {
        self.proc.log_tail(n)
    }
}

/// A plain Python `http.server` (comm `python3`): `GET <any path>` → `downstream-ok`.
pub const DOWNSTREAM_SERVER: &str = r#"
import http.server
import sys


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = b"downstream-ok"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        sys.stderr.write("downstream: " + (fmt % args) + "\n")


http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"#;

/// A running downstream service.
pub struct Downstream {
    proc: Proc,
    port: u16,
    _dir: TempDir,
}

impl Downstream {
    pub fn start() -> Result<Downstream> {
        let dir = TempDir::new("downstream")?;
        let port = free_port();
        let mut cmd = Command::new(python3());
        cmd.arg("-c")
            .arg(DOWNSTREAM_SERVER)
            .arg(port.to_string())
            .env("PYTHONUNBUFFERED", "1");
        let mut proc = Proc::spawn("downstream", cmd, dir.path())?;
        wait_port_of(&mut proc, local(port), Duration::from_secs(20))?;
        Ok(Downstream {
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

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn comm(&self) -> Option<String> {
        procs::comm_of(self.proc.pid())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::procs::{HttpConn, comm_of, http_get, pid_alive};

    /// Runs without the agent (and without root): the app answers under the harness, with
    /// the comm values the agent selects on.
    #[test]
    fn gunicorn_flask_and_downstream_answer() {
        if let Err(e) = check_flask_gunicorn() {
            if crate::skip_requested() {
                println!("skipped: {e:#}");
                return;
            }
            panic!("{e:#}");
        }
        let down = Downstream::start().unwrap();
        assert_eq!(down.comm().as_deref(), Some("python3"));
        let mut g =
            Gunicorn::start(DEMO_APP, &GunicornOpts::default().downstream(down.port())).unwrap();
        let master = g.master_pid();
        assert_eq!(comm_of(master).as_deref(), Some("gunicorn"));
        let workers = g.worker_pids();
        assert_eq!(workers.len(), 2, "{workers:?}");
        for w in &workers {
            assert_eq!(comm_of(*w).as_deref(), Some("gunicorn"));
        }

        let r = http_get(g.addr(), "/hello", &[]).unwrap();
        assert_eq!((r.status, r.text().as_str()), (200, "hello"));
        let pid: u32 = r.header("x-worker-pid").unwrap().parse().unwrap();
        assert!(workers.contains(&pid), "{pid} not in {workers:?}");

        let r = http_get(g.addr(), "/users/42", &[]).unwrap();
        assert_eq!(r.status, 200);
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["id"], "42");

        let r = http_get(
            g.addr(),
            "/chain",
            &[(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )],
        )
        .unwrap();
        assert_eq!((r.status, r.text().as_str()), (200, "chain:downstream-ok"));

        let r = http_get(g.addr(), "/fail", &[]).unwrap();
        assert_eq!(r.status, 500);

        // sync workers close after each response, whatever the client asks
        let mut c = HttpConn::connect(g.addr()).unwrap();
        let r = c.get("/hello", &[("Connection", "keep-alive")]).unwrap();
        assert_eq!(r.status, 200);
        assert!(c.is_closed());

        let log = g.logs(50);
        assert!(log.contains("GET /users/42"), "{log}");
        let dir = g.dir().to_path_buf();
        g.proc().stop();
        assert!(!pid_alive(master));
        drop(g);
        assert!(!dir.exists() || std::env::var_os("DIFYTRACE_KEEP_TMP").is_some());
    }

    #[test]
    fn gthread_workers_keep_connections_alive() {
        if check_flask_gunicorn().is_err() {
            return; // reported by the test above
        }
        let opts = GunicornOpts {
            worker_class: "gthread".into(),
            threads: Some(2),
            workers: 1,
            ..Default::default()
        };
        let g = Gunicorn::start(DEMO_APP, &opts).unwrap();
        let mut c = HttpConn::connect(g.addr()).unwrap();
        let mut pids = Vec::new();
        for i in 0..4 {
            let r = c.get(&format!("/users/{i}"), &[]).unwrap();
            assert_eq!(r.status, 200);
            pids.push(r.header("x-worker-pid").unwrap().to_string());
        }
        assert!(!c.is_closed());
        assert_eq!(c.sent, 4);
        pids.dedup();
        assert_eq!(pids.len(), 1);
    }

    #[test]
    fn max_requests_recycles_workers() {
        if check_flask_gunicorn().is_err() {
            return; // reported by the first test
        }
        let opts = GunicornOpts {
            max_requests: Some(3),
            ..Default::default()
        };
        let g = Gunicorn::start(DEMO_APP, &opts).unwrap();
        let before = g.worker_pids();
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..20 {
            let r = http_get(g.addr(), &format!("/users/{i}"), &[]).unwrap();
            assert_eq!(r.status, 200);
            seen.insert(r.header("x-worker-pid").unwrap().parse::<u32>().unwrap());
        }
        let new: Vec<_> = seen.iter().filter(|p| !before.contains(p)).collect();
        assert!(
            !new.is_empty(),
            "no recycled worker served: before {before:?} seen {seen:?}"
        );
    }
}
