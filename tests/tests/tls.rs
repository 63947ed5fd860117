//! End-to-end: TLS plaintext. A fake OpenAI-compatible model provider over HTTPS (Go,
//! crypto/tls, self-signed certificate; `tests/fixtures/tls`) answers streamed (SSE with a
//! usage chunk) and plain chat completions; a Python client (httpx over Python's ssl, i.e.
//! OpenSSL's libssl.so.3) and a Go client (crypto/tls) call it. The agent must make the
//! spans from the plaintext its uprobes capture (method, path, status, body sizes, Dify ids
//! from the bodies, `tls=true`), and nothing from the ciphertext on the same sockets.
//!
//! Needs root, the release agent, `go`, `openssl` and a Python with httpx.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use common::SPAN_WAIT;
use difytrace_tests::agent::Agent;
use difytrace_tests::otlp_receiver::{AttrValue, OtlpReceiver, ReceivedSpan, summarize};
use difytrace_tests::procs::Proc;
use difytrace_tests::{TempDir, poll, python, workspace_root};

/// Comms of the provider and the Go client: hard links of one binary, so one inode (and one
/// set of uprobes) with two names.
const PROVIDER_COMM: &str = "tlsprovider";
const GO_CLIENT_COMM: &str = "tlsgoclient";
const PATH: &str = "/v1/chat/completions";

/// What a client printed for one request.
#[derive(Debug, Clone)]
struct Answer {
    stream: bool,
    status: i64,
    request_bytes: i64,
    response_bytes: i64,
}

struct Fixture {
    dir: TempDir,
    provider_bin: PathBuf,
    client_bin: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// What the tests need and the machine lacks.
fn missing_tools() -> Vec<String> {
    let mut missing = Vec::new();
    let ok = |cmd: &mut Command| cmd.output().map(|o| o.status.success()).unwrap_or(false);
    if !ok(Command::new("go")
        .arg("version")
        .env("GOTOOLCHAIN", "local"))
    {
        missing.push("`go` on PATH".to_string());
    }
    if !ok(Command::new("openssl").arg("version")) {
        missing.push("`openssl` on PATH".to_string());
    }
    if !ok(Command::new(python::python()).args(["-c", "import httpx"])) {
        missing.push(format!("httpx for {}", python::python().display()));
    }
    missing
}

/// Builds the fixture (stripped: `-ldflags=-s -w`) and makes a self-signed certificate for
/// 127.0.0.1 in a fresh temp dir.
fn prepare(test: &str, stripped: bool) -> Result<Fixture> {
    let dir = TempDir::new(test)?;
    let bin = dir.join("tlsfake");
    let mut build = Command::new("go");
    build
        .arg("build")
        .arg("-o")
        .arg(&bin)
        .env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "-mod=mod")
        .current_dir(workspace_root().join("tests/fixtures/tls"));
    if stripped {
        build.arg("-ldflags=-s -w");
    }
    build.arg(".");
    run(&mut build, "go build of tests/fixtures/tls")?;
    let provider_bin = dir.join(PROVIDER_COMM);
    let client_bin = dir.join(GO_CLIENT_COMM);
    std::fs::hard_link(&bin, &provider_bin)?;
    std::fs::hard_link(&bin, &client_bin)?;
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    run(
        Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args(["-subj", "/CN=localhost"])
            .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert),
        "openssl req (self-signed certificate)",
    )?;
    Ok(Fixture {
        dir,
        provider_bin,
        client_bin,
        cert,
        key,
    })
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    ensure!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

impl Fixture {
    /// The provider, listening on a port of its choosing; returns it and the URL.
    fn start_provider(&self, h2: bool) -> Result<(Proc, String)> {
        let port_file = self.dir.join("port");
        let mut cmd = Command::new(&self.provider_bin);
        cmd.arg("server")
            .arg("-cert")
            .arg(&self.cert)
            .arg("-key")
            .arg(&self.key)
            .arg("-port-file")
            .arg(&port_file);
        if h2 {
            cmd.arg("-h2");
        }
        let mut provider = Proc::spawn(PROVIDER_COMM, cmd, self.dir.path())?;
        let port = poll(Duration::from_secs(20), Duration::from_millis(50), || {
            std::fs::read_to_string(&port_file).ok()
        });
        let Some(port) = port else {
            bail!(
                "the provider wrote no port: {}",
                provider.log_tail(20) + &format!(" (running: {})", provider.is_running())
            );
        };
        Ok((provider, format!("https://127.0.0.1:{}{PATH}", port.trim())))
    }

    fn go_file(&self) -> PathBuf {
        self.dir.join("go")
    }

    /// The Python client (httpx), waiting for the go file.
    fn start_python_client(&self, url: &str) -> Result<Proc> {
        let mut cmd = Command::new(python::python());
        cmd.arg(workspace_root().join("tests/fixtures/tls/client.py"))
            .arg(url)
            .arg(&self.cert)
            .arg(self.go_file());
        Proc::spawn("pyclient", cmd, self.dir.path())
    }

    /// The Go client, waiting for the go file.
    fn start_go_client(&self, url: &str, h2: bool) -> Result<Proc> {
        let mut cmd = Command::new(&self.client_bin);
        cmd.arg("client")
            .arg("-url")
            .arg(url)
            .arg("-ca")
            .arg(&self.cert)
            .arg("-go-file")
            .arg(self.go_file());
        if h2 {
            cmd.arg("-h2");
        }
        Proc::spawn(GO_CLIENT_COMM, cmd, self.dir.path())
    }

    fn go(&self) -> Result<()> {
        std::fs::write(self.go_file(), b"go\n").context("writing the go file")
    }
}

/// Waits for a client to finish and reads its two answers (streamed, then plain).
fn answers(client: &mut Proc) -> Result<Vec<Answer>> {
    let status = client
        .wait_exit(Duration::from_secs(60))
        .with_context(|| format!("{} did not finish", client.name()))?;
    ensure!(
        status.success(),
        "{} failed ({status}):\n{}",
        client.name(),
        client.log_tail(30)
    );
    let mut out = Vec::new();
    for line in client.stdout().lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("client line {line:?}"))?;
        let int = |k: &str| v.get(k).and_then(|x| x.as_i64()).unwrap_or(-1);
        out.push(Answer {
            stream: v.get("stream").and_then(|x| x.as_bool()).unwrap_or(false),
            status: int("status"),
            request_bytes: int("request_bytes"),
            response_bytes: int("response_bytes"),
        });
    }
    ensure!(
        out.len() == 2 && out.iter().all(|a| a.status == 200),
        "{}: unexpected answers {out:?}\n{}",
        client.name(),
        client.log_tail(30)
    );
    Ok(out)
}

fn is_chat(s: &ReceivedSpan) -> bool {
    s.attr_str("url.path").as_deref() == Some(PATH)
}

fn spans_of(spans: &[ReceivedSpan], pid: u32) -> Vec<ReceivedSpan> {
    spans
        .iter()
        .filter(|s| s.pid() == Some(pid))
        .cloned()
        .collect()
}

/// Every span of `pid` is a chat completion of `kind` with method, status and `tls=true`, and
/// there are exactly `want` of them: nothing else (no span from ciphertext).
fn check_tls_spans(
    spans: &[ReceivedSpan],
    pid: u32,
    what: &str,
    client: bool,
    want: usize,
) -> Result<Vec<ReceivedSpan>> {
    let mine = spans_of(spans, pid);
    ensure!(
        mine.len() == want,
        "{what} (pid {pid}): want {want} spans, got {}:\n{}",
        mine.len(),
        summarize(&mine, 20)
    );
    for s in &mine {
        let ok = is_chat(s)
            && s.is_client() == client
            && s.is_server() == !client
            && s.attr_str("http.request.method").as_deref() == Some("POST")
            && s.attr_int("http.response.status_code") == Some(200)
            && s.attr("tls").and_then(AttrValue::as_bool) == Some(true)
            && s.attr_str("url.scheme").as_deref() == Some("https");
        ensure!(
            ok,
            "{what}: not a TLS chat completion span: {}",
            s.summary()
        );
    }
    Ok(mine)
}

/// The model call's GenAI attributes, read from the plaintext bodies: the fake provider
/// answers model `fake-gpt` with 11 prompt and 7 completion tokens, streamed (usage in the
/// last chunk) or not.
fn check_genai(mine: &[ReceivedSpan], what: &str) -> Result<()> {
    for s in mine {
        let ok = s.attr_str("gen_ai.operation.name").as_deref() == Some("chat")
            && s.attr_str("gen_ai.provider.name").as_deref() == Some("openai")
            && s.attr_str("gen_ai.request.model").as_deref() == Some("fake-gpt")
            && s.attr_int("gen_ai.usage.input_tokens") == Some(11)
            && s.attr_int("gen_ai.usage.output_tokens") == Some(7);
        ensure!(
            ok,
            "{what}: no model and token usage from the plaintext: {}",
            s.summary()
        );
    }
    Ok(())
}

/// The client's spans match its answers one to one in body sizes: the plaintext bodies
/// reached the parser whole (the streamed answer is chunked SSE).
fn check_body_sizes(mine: &[ReceivedSpan], answers: &[Answer], what: &str) -> Result<()> {
    let mut want: Vec<(i64, i64)> = answers
        .iter()
        .map(|a| (a.request_bytes, a.response_bytes))
        .collect();
    let mut got: Vec<(i64, i64)> = mine
        .iter()
        .map(|s| {
            (
                s.attr_int("http.request.body.size").unwrap_or(-1),
                s.attr_int("http.response.body.size").unwrap_or(-1),
            )
        })
        .collect();
    want.sort();
    got.sort();
    ensure!(
        want == got,
        "{what}: body sizes (request, response) of the spans {got:?}, sent/received {want:?}:\n{}",
        summarize(mine, 10)
    );
    ensure!(
        answers.iter().any(|a| a.stream) && answers.iter().any(|a| !a.stream),
        "{what}: {answers:?}"
    );
    Ok(())
}

/// The Dify ids the bodies carry reached the trace roots: `conversation_id` from the request
/// body, `message_id` from the response body (the first SSE chunk, or the JSON answer).
fn check_body_ids(spans: &[ReceivedSpan], roots: &[ReceivedSpan], prefix: &str) -> Result<()> {
    let mut seen = BTreeSet::new();
    for root in roots {
        let conv = root.attr_str("dify.conversation_id");
        let msg = root.attr_str("dify.message_id");
        seen.insert((conv.clone(), msg.clone()));
        ensure!(
            conv.as_deref()
                .is_some_and(|c| c.starts_with(&format!("conv-{prefix}-")))
                && msg.as_deref().is_some_and(|m| m.starts_with("msg-tls-")),
            "root span without the ids of its bodies: {}\nall:\n{}",
            root.summary(),
            summarize(spans, 20)
        );
    }
    let want: BTreeSet<_> = [
        (
            Some(format!("conv-{prefix}-true")),
            Some("msg-tls-stream".to_string()),
        ),
        (
            Some(format!("conv-{prefix}-false")),
            Some("msg-tls-plain".to_string()),
        ),
    ]
    .into();
    ensure!(seen == want, "ids on the roots {seen:?}, want {want:?}");
    Ok(())
}

/// Every provider SERVER span is the child of one of the clients' CLIENT spans (the two
/// ends of one TLS connection, paired like plain ones).
fn check_linked(servers: &[ReceivedSpan], clients: &[ReceivedSpan]) -> Result<()> {
    for s in servers {
        ensure!(
            clients
                .iter()
                .any(|c| c.span_id == s.parent_span_id && c.trace_id == s.trace_id),
            "provider span not under a client span: {}",
            s.summary()
        );
    }
    Ok(())
}

fn start_agent(rx: &OtlpReceiver, py_pid: Option<u32>, extra: &[&str]) -> Result<Agent> {
    let mut args: Vec<String> = vec![
        "--comm".into(),
        PROVIDER_COMM.into(),
        "--comm".into(),
        GO_CLIENT_COMM.into(),
        "--otlp-endpoint".into(),
        rx.grpc_endpoint(),
    ];
    if let Some(pid) = py_pid {
        args.extend(["--pid".into(), pid.to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    Agent::start(&args)
}

fn prerequisites(test: &str) -> Option<difytrace_tests::E2e> {
    let e2e = difytrace_tests::e2e(test)?;
    let missing = missing_tools();
    if !missing.is_empty() {
        return difytrace_tests::prerequisite_missing(test, &missing);
    }
    Some(e2e)
}

/// The main scenario: Python (OpenSSL) and Go (crypto/tls) clients, Go provider, HTTP/1.1.
#[test]
fn openssl_and_go_tls_plaintext_spans() -> Result<()> {
    let Some(_e2e) = prerequisites("openssl_and_go_tls_plaintext_spans") else {
        return Ok(());
    };
    let fx = prepare("tls-main", false)?;
    let (provider, url) = fx.start_provider(false)?;
    // The Python client is running (httpx, and so libssl, imported) before the agent starts:
    // its libssl is found in its maps at start-up.
    let mut py = fx.start_python_client(&url)?;
    let rx = OtlpReceiver::start()?;
    let mut agent = start_agent(&rx, Some(py.pid()), &[])?;
    agent
        .wait_stderr(
            |log| {
                log.contains("OpenSSL uprobes attached")
                    && log.contains("Go uprobes attached")
                    && log.contains("crypto/tls.(*Conn).Read")
            },
            Duration::from_secs(30),
        )
        .map_err(|e| agent.annotate(e))?;
    // Started after the agent: watched from its exec (comm), hooked as the same inode.
    let mut goc = fx.start_go_client(&url, false)?;
    std::thread::sleep(Duration::from_millis(500));
    fx.go()?;
    let py_answers = answers(&mut py)?;
    let go_answers = answers(&mut goc)?;
    let (py_pid, go_pid, provider_pid) = (py.pid(), goc.pid(), provider.pid());

    let spans = rx
        .wait_for(
            |s| {
                spans_of(s, py_pid).iter().filter(|s| is_chat(s)).count() >= 2
                    && spans_of(s, go_pid).iter().filter(|s| is_chat(s)).count() >= 2
                    && spans_of(s, provider_pid)
                        .iter()
                        .filter(|s| is_chat(s))
                        .count()
                        >= 4
            },
            SPAN_WAIT,
        )
        .map_err(|e| agent.annotate(e))?;
    // Late spans (a garbage one would come with the connection's close) get a moment.
    std::thread::sleep(Duration::from_secs(2));
    let spans = rx.spans().into_iter().chain(spans).collect::<Vec<_>>();
    let spans = dedup(spans);

    let py_spans = check_tls_spans(&spans, py_pid, "python client", true, 2)?;
    let go_spans = check_tls_spans(&spans, go_pid, "go client", true, 2)?;
    let servers = check_tls_spans(&spans, provider_pid, "provider", false, 4)?;
    check_body_sizes(&py_spans, &py_answers, "python client")?;
    check_body_sizes(&go_spans, &go_answers, "go client")?;
    check_genai(&py_spans, "python client")?;
    check_genai(&go_spans, "go client")?;
    check_genai(&servers, "provider")?;
    let clients: Vec<ReceivedSpan> = py_spans.iter().chain(&go_spans).cloned().collect();
    check_linked(&servers, &clients)?;
    check_body_ids(&spans, &py_spans, "py")?;
    check_body_ids(&spans, &go_spans, "go")?;

    let stats = agent.stop_with_stats()?;
    ensure!(
        stats.get("parse_errors") == Some(&0) && stats.get("not_http") == Some(&0),
        "ciphertext reached the HTTP parsers: {stats:?}"
    );
    Ok(())
}

/// Go's client and server with ALPN h2: the plaintext goes through the HTTP/2 parser.
#[test]
fn go_http2_over_tls() -> Result<()> {
    let Some(_e2e) = prerequisites("go_http2_over_tls") else {
        return Ok(());
    };
    let fx = prepare("tls-h2", false)?;
    let (provider, url) = fx.start_provider(true)?;
    let rx = OtlpReceiver::start()?;
    let mut agent = start_agent(&rx, None, &[])?;
    agent
        .wait_stderr(
            |log| log.contains("crypto/tls.(*Conn).Read"),
            Duration::from_secs(30),
        )
        .map_err(|e| agent.annotate(e))?;
    let mut goc = fx.start_go_client(&url, true)?;
    std::thread::sleep(Duration::from_millis(500));
    fx.go()?;
    let go_answers = answers(&mut goc)?;
    ensure!(
        goc.stdout().contains("HTTP/2.0"),
        "the client did not speak HTTP/2: {}",
        goc.stdout()
    );
    let (go_pid, provider_pid) = (goc.pid(), provider.pid());
    rx.wait_for(
        |s| {
            spans_of(s, go_pid).iter().filter(|s| is_chat(s)).count() >= 2
                && spans_of(s, provider_pid)
                    .iter()
                    .filter(|s| is_chat(s))
                    .count()
                    >= 2
        },
        SPAN_WAIT,
    )
    .map_err(|e| agent.annotate(e))?;
    std::thread::sleep(Duration::from_secs(2));
    let spans = rx.spans();
    let go_spans = check_tls_spans(&spans, go_pid, "go client (h2)", true, 2)?;
    let servers = check_tls_spans(&spans, provider_pid, "provider (h2)", false, 2)?;
    check_linked(&servers, &go_spans)?;
    ensure!(go_answers.len() == 2);
    Ok(())
}

/// A stripped provider gets no crypto/tls hooks (the log says why); its ciphertext makes no
/// span, and the Python client's plaintext is still traced.
#[test]
fn stripped_go_binary_has_no_tls_hooks_and_no_garbage_spans() -> Result<()> {
    let Some(_e2e) = prerequisites("stripped_go_binary_has_no_tls_hooks_and_no_garbage_spans")
    else {
        return Ok(());
    };
    let fx = prepare("tls-stripped", true)?;
    let (provider, url) = fx.start_provider(false)?;
    let mut py = fx.start_python_client(&url)?;
    let rx = OtlpReceiver::start()?;
    let mut agent = start_agent(&rx, Some(py.pid()), &[])?;
    agent
        .wait_stderr(
            |log| log.contains("OpenSSL uprobes attached") && log.contains("Go uprobes attached"),
            Duration::from_secs(30),
        )
        .map_err(|e| agent.annotate(e))?;
    let log = agent.stderr();
    let line = log
        .lines()
        .find(|l| l.contains("Go uprobes attached"))
        .unwrap_or_default();
    ensure!(
        line.contains("crypto/tls.Conn.conn: only read from DWARF")
            && line.contains("(\"crypto/tls.(*Conn).Write\", \"no offsets for TlsConnConn")
            && !line.contains("hooks=[\"crypto/tls"),
        "the attach log does not say why the stripped binary has no TLS hooks:\n{line}"
    );
    fx.go()?;
    let py_answers = answers(&mut py)?;
    let py_pid = py.pid();
    rx.wait_for(
        |s| spans_of(s, py_pid).iter().filter(|s| is_chat(s)).count() >= 2,
        SPAN_WAIT,
    )
    .map_err(|e| agent.annotate(e))?;
    std::thread::sleep(Duration::from_secs(2));
    let spans = rx.spans();
    let py_spans = check_tls_spans(&spans, py_pid, "python client", true, 2)?;
    check_body_sizes(&py_spans, &py_answers, "python client")?;
    let garbage = spans_of(&spans, provider.pid());
    ensure!(
        garbage.is_empty(),
        "spans from the unhooked provider's ciphertext:\n{}",
        summarize(&garbage, 10)
    );
    let stats = agent.stop_with_stats()?;
    ensure!(
        stats.get("parse_errors") == Some(&0),
        "ciphertext reached the HTTP parsers: {stats:?}"
    );
    Ok(())
}

/// A Python process that starts after the agent and imports `ssl` only then: its libssl is
/// found by re-reading its maps (the agent follows it as the child of a watched shell).
#[test]
fn python_importing_ssl_after_the_agent_started_is_hooked() -> Result<()> {
    let Some(_e2e) = prerequisites("python_importing_ssl_after_the_agent_started_is_hooked") else {
        return Ok(());
    };
    let fx = prepare("tls-late", false)?;
    let (_provider, url) = fx.start_provider(false)?;
    let start = fx.dir.join("start");
    // The shell waits for the agent, then execs Python (same pid, watched through --pid).
    let script = format!(
        "while [ ! -f '{}' ]; do sleep 0.05; done; exec '{}' '{}' '{}' '{}' '{}'",
        start.display(),
        python::python().display(),
        workspace_root()
            .join("tests/fixtures/tls/client.py")
            .display(),
        url,
        fx.cert.display(),
        fx.go_file().display()
    );
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(script);
    let mut py = Proc::spawn("latepy", cmd, fx.dir.path())?;
    let rx = OtlpReceiver::start()?;
    let mut agent = start_agent(&rx, Some(py.pid()), &[])?;
    ensure!(
        !agent.stderr().contains("OpenSSL uprobes attached"),
        "libssl hooked before Python started:\n{}",
        agent.logs(40)
    );
    std::fs::write(&start, b"start\n")?;
    agent
        .wait_stderr(
            |log| log.contains("OpenSSL uprobes attached"),
            Duration::from_secs(30),
        )
        .map_err(|e| agent.annotate(e))?;
    fx.go()?;
    let py_answers = answers(&mut py)?;
    let py_pid = py.pid();
    rx.wait_for(
        |s| spans_of(s, py_pid).iter().filter(|s| is_chat(s)).count() >= 2,
        SPAN_WAIT,
    )
    .map_err(|e| agent.annotate(e))?;
    std::thread::sleep(Duration::from_secs(2));
    let spans = rx.spans();
    let py_spans = check_tls_spans(&spans, py_pid, "python client (late)", true, 2)?;
    check_body_sizes(&py_spans, &py_answers, "python client (late)")?;
    Ok(())
}

/// `--no-tls`: no TLS hooks at all, and the HTTPS traffic of both sides gives no span and
/// no parse error (its records are still recognised as TLS).
#[test]
fn no_tls_flag_gives_no_hooks_and_no_garbage_spans() -> Result<()> {
    let Some(_e2e) = prerequisites("no_tls_flag_gives_no_hooks_and_no_garbage_spans") else {
        return Ok(());
    };
    let fx = prepare("tls-off", false)?;
    let (provider, url) = fx.start_provider(false)?;
    let mut py = fx.start_python_client(&url)?;
    let rx = OtlpReceiver::start()?;
    let mut agent = start_agent(&rx, Some(py.pid()), &["--no-tls"])?;
    agent
        .wait_stderr(
            |log| log.contains("Go uprobes attached"),
            Duration::from_secs(30),
        )
        .map_err(|e| agent.annotate(e))?;
    fx.go()?;
    answers(&mut py)?;
    std::thread::sleep(Duration::from_secs(3));
    let log = agent.stderr();
    ensure!(
        !log.contains("OpenSSL uprobes attached") && !log.contains("\"crypto/tls.(*Conn).Read\""),
        "TLS hooks attached despite --no-tls:\n{}",
        agent.logs(40)
    );
    let spans = rx.spans();
    let bad: Vec<ReceivedSpan> = spans
        .iter()
        .filter(|s| s.pid() == Some(py.pid()) || s.pid() == Some(provider.pid()))
        .cloned()
        .collect();
    ensure!(
        bad.is_empty(),
        "spans from ciphertext with --no-tls:\n{}",
        summarize(&bad, 10)
    );
    let stats = agent.stop_with_stats()?;
    ensure!(
        stats.get("parse_errors") == Some(&0) && stats.get("not_http") == Some(&0),
        "ciphertext reached the HTTP parsers: {stats:?}"
    );
    Ok(())
}

/// Spans by (trace, span) id, once each.
fn dedup(spans: Vec<ReceivedSpan>) -> Vec<ReceivedSpan> {
    let mut seen = BTreeSet::new();
    spans
        .into_iter()
        .filter(|s| seen.insert((s.trace_id.clone(), s.span_id.clone())))
        .collect()
}
