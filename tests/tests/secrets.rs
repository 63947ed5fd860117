//! End-to-end: secrets never leave the host.
//!
//! The same secret values go through every protocol the agent reads: HTTP/1.1 (a Flask app
//! on gunicorn, and httpx to the plugin daemon stand-in), HTTP/2 + gRPC metadata (grpc-go
//! client and server) and plugin stdio (the daemon's request line to the model plugin, with
//! `credentials`). Headers Authorization, Cookie, Set-Cookie, X-Api-Key, Proxy-Authorization
//! and X-Inner-Api-Key, and JSON fields api_key / password / token / credentials. With
//! and without `--capture-bodies` / `--capture-genai-content`, no exported span (attributes,
//! events, links, resource, status) may contain any of the values.

mod common;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use difytrace_tests::agent::Agent;
use difytrace_tests::genai::{self, GenAiStack};
use difytrace_tests::grpc::{GO_COMM, GrpcFixture, GrpcServer, UNARY_METHOD};
use difytrace_tests::otlp_receiver::{OtlpReceiver, ReceivedSpan};
use difytrace_tests::procs::{free_port, http_get, local};
use difytrace_tests::python::{Gunicorn, GunicornOpts};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(40);

/// Every secret value sent; each is unique so a leak names its path.
const SECRETS: [&str; 13] = [
    "authz-SECRET-h1",
    "cookie-SECRET-h1",
    "xapikey-SECRET-h1",
    "proxyauth-SECRET-h1",
    "inner-SECRET-h1",
    "bodyapikey-SECRET-h1",
    "bodypassword-SECRET-h1",
    "setcookie-SECRET-h1",
    "resptoken-SECRET-h1",
    "daemonkey-SECRET-stdio",
    "credential-SECRET-stdio",
    "grpcauthz-SECRET-h2",
    "grpcapikey-SECRET-h2",
];

const APP: &str = r#"
from flask import Flask, jsonify, request

app = Flask(__name__)


@app.post("/secrets/echo")
def echo():
    body = request.get_json(force=True, silent=True) or {}
    resp = jsonify(ok=True, user=body.get("user"), access_token="resptoken-SECRET-h1")
    resp.headers["Set-Cookie"] = "sid=setcookie-SECRET-h1; HttpOnly"
    return resp
"#;

fn run(test: &str, extra: &[&str]) -> Result<()> {
    let Some(_e2e) = difytrace_tests::e2e(test) else {
        return Ok(());
    };
    let mut missing = genai::tools_missing();
    missing.extend(difytrace_tests::grpc::tools_missing());
    if !missing.is_empty() {
        difytrace_tests::prerequisite_missing::<()>(test, &missing);
        return Ok(());
    }
    let grpc = GrpcFixture::prepare()?;
    let gunicorn = Gunicorn::start(APP, &GunicornOpts::default())?;
    let mut stack = GenAiStack::start()?;
    let rx = OtlpReceiver::start()?;
    let mut args = GenAiStack::comm_args();
    for c in ["gunicorn", GO_COMM] {
        args.extend(["--comm".to_string(), c.to_string()]);
    }
    args.extend(["--otlp-endpoint".to_string(), rx.grpc_endpoint()]);
    // Metrics too, both ways: their labels must not carry a secret either.
    let metrics_addr = local(free_port());
    args.extend([
        "--metrics-addr".to_string(),
        metrics_addr.to_string(),
        "--metrics-interval".to_string(),
        "1".to_string(),
    ]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut agent = Agent::start(&args)?;
    let grpc_server = GrpcServer::start(&grpc)?;

    // HTTP/1.1 to gunicorn: every secret header and secret-named body fields.
    let answer = stack.client.request(&json!({
        "url": format!("http://127.0.0.1:{}/secrets/echo", gunicorn.port()),
        "headers": {
            "Authorization": "Bearer authz-SECRET-h1",
            "Cookie": "sid=cookie-SECRET-h1",
            "X-Api-Key": "xapikey-SECRET-h1",
            "Proxy-Authorization": "Basic proxyauth-SECRET-h1",
            "X-Inner-Api-Key": "inner-SECRET-h1",
        },
        "json": {"user": "alice", "api_key": "bodyapikey-SECRET-h1",
                 "nested": {"password": "bodypassword-SECRET-h1"}},
    }))?;
    ensure!(answer.status == 200, "gunicorn answer: {answer:?}");

    // HTTP/1.1 to the daemon and plugin stdio: X-Api-Key and model credentials.
    let answer = stack.client.request(&json!({
        "url": stack.daemon_url("/plugin/tenant-secrets/dispatch/llm/invoke"),
        "headers": {"X-Plugin-ID": "langgenius/openai", "X-Api-Key": "daemonkey-SECRET-stdio"},
        "json": {"user_id": "u", "data": {"provider": "openai", "model": "gpt-4o-mini",
            "credentials": {"openai_api_key": "credential-SECRET-stdio"},
            "prompt_messages": [{"role": "user", "content": "hi"}]}},
        "stream": true,
    }))?;
    ensure!(answer.status == 200, "daemon answer: {answer:?}");

    // HTTP/2 + gRPC metadata.
    grpc.go_client(&[
        "-target",
        &grpc_server.target(),
        "-mode",
        "unary",
        "-metadata",
        "authorization=Bearer grpcauthz-SECRET-h2",
        "-metadata",
        "x-api-key=grpcapikey-SECRET-h2",
    ])?;

    let gunicorn_port = i64::from(gunicorn.port());
    let is_echo = |s: &ReceivedSpan| {
        s.is_server()
            && s.attr_str("url.path").as_deref() == Some("/secrets/echo")
            && s.attr_int("server.port") == Some(gunicorn_port)
    };
    let spans = rx
        .wait_for(
            |s| {
                s.iter().any(is_echo)
                    && s.iter().any(|x| {
                        x.is_server()
                            && x.attr_str("dify.tenant_id").as_deref() == Some("tenant-secrets")
                    })
                    && s.iter()
                        .any(|x| x.name == "plugin invoke_llm" && x.is_server())
                    && s.iter().any(|x| {
                        x.is_server()
                            && x.pid() == Some(grpc_server.pid())
                            && x.name.contains(UNARY_METHOD.trim_start_matches('/'))
                    })
            },
            WAIT,
        )
        .map_err(|e| agent.annotate(e))?;
    // Late spans (client ends) too.
    std::thread::sleep(Duration::from_secs(2));
    let spans = rx.spans().into_iter().chain(spans).collect::<Vec<_>>();
    for s in &spans {
        for secret in SECRETS {
            ensure!(!s.mentions(secret), "{secret} leaked in: {}", s.summary());
        }
    }
    let echo = spans.iter().find(|s| is_echo(s)).context("echo span")?;
    if extra.contains(&"--capture-bodies") {
        // Bodies were asked for: they are there, with the secrets replaced.
        let body = echo
            .attr_str("http.request.body")
            .context("no http.request.body with --capture-bodies")?;
        ensure!(
            body.contains("alice") && body.contains("[REDACTED]"),
            "request body: {body}"
        );
        let body = echo
            .attr_str("http.response.body")
            .context("no http.response.body with --capture-bodies")?;
        ensure!(body.contains("[REDACTED]"), "response body: {body}");
    } else {
        ensure!(
            echo.attr("http.request.body").is_none(),
            "body exported without --capture-bodies: {}",
            echo.summary()
        );
    }
    // The httpx client's own CLIENT spans were exported too (not a vacuous pass).
    ensure!(
        spans
            .iter()
            .any(|s| s.pid() == Some(stack.client.pid()) && s.is_client()),
        "no span of the httpx client"
    );
    check_metrics(&agent, &rx, metrics_addr)?;
    agent.ensure_running()?;
    drop(stack);
    Ok(())
}

/// The Prometheus page and the OTLP metrics, once they hold the echo request's series, carry
/// no secret.
fn check_metrics(agent: &Agent, rx: &OtlpReceiver, addr: std::net::SocketAddr) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let page = http_get(addr, "/metrics", &[])
            .context("GET /metrics")?
            .text();
        let points = format!("{:?}", rx.metric_points());
        let complete = page.contains("http_server_request_duration")
            && points.contains("http.server.request.duration");
        if complete {
            for secret in SECRETS {
                ensure!(!page.contains(secret), "{secret} leaked into /metrics");
                ensure!(
                    !points.contains(secret),
                    "{secret} leaked into OTLP metrics"
                );
            }
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(agent.annotate(anyhow::anyhow!(
                "no request metrics after 20 s (OTLP metric requests: {})",
                rx.metric_requests()
            )));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn secrets_never_exported_by_default() -> Result<()> {
    run("secrets_never_exported_by_default", &[])
}

#[test]
fn secrets_never_exported_with_body_and_content_capture() -> Result<()> {
    run(
        "secrets_never_exported_with_body_and_content_capture",
        &["--capture-bodies", "--capture-genai-content"],
    )
}
