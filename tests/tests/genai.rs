//! End-to-end: Dify and LLM semantics read from the wire.
//!
//! Real processes (`tests/fixtures/genai`): a Go stand-in for the plugin daemon serving
//! `POST /plugin/{tenant}/dispatch/llm/invoke` as a chunked event stream and forwarding to a
//! model plugin over stdio (a Python process speaking dify_plugin's stdio protocol, not the
//! SDK itself); a fake OpenAI/Anthropic provider and sandbox; an httpx client. Nothing in them
//! knows about tracing; the agent selects them by comm.

mod common;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use difytrace_tests::agent::Agent;
use difytrace_tests::genai::{GenAiStack, tools_missing};
use difytrace_tests::otlp_receiver::{AttrValue, OtlpReceiver, ReceivedSpan};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);
/// OTLP `STATUS_CODE_ERROR`.
const STATUS_ERROR: i32 = 2;

struct Setup {
    _e2e: difytrace_tests::E2e,
    stack: GenAiStack,
    rx: OtlpReceiver,
    agent: Agent,
}

/// `gen_ai.response.finish_reasons`, only when it came as a string array (the conventions'
/// type).
fn reasons(s: &ReceivedSpan) -> Vec<String> {
    match s.attr("gen_ai.response.finish_reasons") {
        Some(AttrValue::Array(a)) => a.iter().map(|v| v.to_string()).collect(),
        _ => Vec::new(),
    }
}

fn setup(test: &str, extra: &[&str]) -> Result<Option<Setup>> {
    let Some(e2e) = difytrace_tests::e2e(test) else {
        return Ok(None);
    };
    let missing = tools_missing();
    if !missing.is_empty() {
        return Ok(difytrace_tests::prerequisite_missing(test, &missing));
    }
    // The processes run first, so the agent finds them (renamed) when it starts.
    let stack = GenAiStack::start()?;
    let rx = OtlpReceiver::start()?;
    let mut args = GenAiStack::comm_args();
    args.extend(["--otlp-endpoint".to_string(), rx.grpc_endpoint()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let agent = Agent::start(&args)?;
    Ok(Some(Setup {
        _e2e: e2e,
        stack,
        rx,
        agent,
    }))
}

/// The span of process `pid` of the given kind whose attribute `key` is `value`.
fn find<'a>(
    spans: &'a [ReceivedSpan],
    pid: u32,
    server: bool,
    key: &str,
    value: &str,
) -> Option<&'a ReceivedSpan> {
    spans.iter().find(|s| {
        s.pid() == Some(pid) && s.is_server() == server && s.attr_str(key).as_deref() == Some(value)
    })
}

fn int(s: &ReceivedSpan, key: &str) -> Option<i64> {
    s.attr_int(key)
}

#[test]
fn dispatch_llm_stream_has_tenant_plugin_model_tokens_and_timeout_errors() -> Result<()> {
    let Some(mut t) = setup(
        "dispatch_llm_stream_has_tenant_plugin_model_tokens_and_timeout_errors",
        &[],
    )?
    else {
        return Ok(());
    };
    let (daemon, client) = (t.stack.daemon.pid(), t.stack.client.pid());
    let ok_path = "/plugin/tenant-genai-ok/dispatch/llm/invoke";
    let slow_path = "/plugin/tenant-genai-slow/dispatch/llm/invoke";
    let answer = t.stack.client.request(&json!({
        "url": t.stack.daemon_url(ok_path),
        "headers": {"X-Plugin-ID": "langgenius/openai", "X-Api-Key": "daemon-key-SECRET-1"},
        "json": {"user_id": "u1", "conversation_id": "c1", "data": {
            "provider": "openai", "model_type": "llm", "model": "gpt-4o-mini",
            "credentials": {"openai_api_key": "sk-cred-SECRET-2"},
            "prompt_messages": [{"role": "user", "content": "hi"}],
            "model_parameters": {}, "stream": true}},
        "stream": true,
    }))?;
    ensure!(
        answer.status == 200 && answer.body.contains("\"completion_tokens\":4"),
        "dispatch answer: {answer:?}"
    );
    let answer = t.stack.client.request(&json!({
        "url": t.stack.daemon_url(slow_path),
        "headers": {"X-Plugin-ID": "langgenius/openai"},
        "json": {"user_id": "u1", "data": {"provider": "openai", "model": "slow-model",
            "model_parameters": {"sleep": 3}}},
        "stream": true,
    }))?;
    ensure!(
        answer.body.contains("killed by timeout"),
        "timeout answer: {answer:?}"
    );

    let spans =
        t.rx.wait_for(
            |s| {
                find(s, daemon, true, "dify.tenant_id", "tenant-genai-ok").is_some()
                    && find(s, daemon, true, "dify.tenant_id", "tenant-genai-slow").is_some()
                    && find(s, client, false, "dify.tenant_id", "tenant-genai-ok").is_some()
                    && s.iter().any(|x| {
                        x.name == "plugin invoke_llm"
                            && x.is_server()
                            && x.attr_int("gen_ai.usage.input_tokens").is_some()
                    })
            },
            WAIT,
        )
        .map_err(|e| t.agent.annotate(e))?;

    for (who, server) in [(daemon, true), (client, false)] {
        let s = find(&spans, who, server, "dify.tenant_id", "tenant-genai-ok")
            .context("dispatch span")?;
        let summary = s.summary();
        ensure!(s.name == "dispatch llm/invoke", "name: {summary}");
        ensure!(
            s.attr_str("dify.plugin.id").as_deref() == Some("langgenius/openai")
                && s.attr_str("dify.dispatch.kind").as_deref() == Some("llm")
                && s.attr_str("dify.dispatch.action").as_deref() == Some("invoke")
                && s.attr_str("gen_ai.operation.name").as_deref() == Some("chat")
                && s.attr_str("gen_ai.provider.name").as_deref() == Some("openai")
                && s.attr_str("gen_ai.request.model").as_deref() == Some("gpt-4o-mini")
                && s.attr_str("gen_ai.response.model").as_deref() == Some("gpt-4o-mini"),
            "dispatch attributes: {summary}"
        );
        ensure!(
            int(s, "gen_ai.usage.input_tokens") == Some(21)
                && int(s, "gen_ai.usage.output_tokens") == Some(4),
            "usage: {summary}"
        );
        ensure!(reasons(s) == ["stop"], "finish reasons: {summary}");
        // Four text chunks and the usage chunk.
        ensure!(int(s, "dify.stream.chunks") == Some(5), "chunks: {summary}");
        let ttfc = s
            .attr("dify.stream.time_to_first_chunk_ms")
            .and_then(|v| v.as_f64())
            .context("time to first chunk")?;
        let total_ms = s.duration().as_secs_f64() * 1e3;
        ensure!(
            ttfc > 0.0 && ttfc <= total_ms,
            "time to first chunk {ttfc} ms of {total_ms} ms: {summary}"
        );
        ensure!(s.status_code != STATUS_ERROR, "status: {summary}");
    }

    for (who, server) in [(daemon, true), (client, false)] {
        let Some(s) = find(&spans, who, server, "dify.tenant_id", "tenant-genai-slow") else {
            ensure!(!server, "no daemon span for the slow dispatch");
            continue;
        };
        let summary = s.summary();
        ensure!(
            s.status_code == STATUS_ERROR
                && s.status_message == "killed by timeout"
                && s.attr_str("error.type").as_deref() == Some("PluginDaemonInternalServerError"),
            "timeout span: {summary}"
        );
    }

    // The plugin's side of the stdio invocation carries the same model facts.
    let plugin = spans
        .iter()
        .find(|x| {
            x.name == "plugin invoke_llm"
                && x.is_server()
                && x.attr_str("gen_ai.request.model").as_deref() == Some("gpt-4o-mini")
        })
        .context("plugin invocation span")?;
    ensure!(
        plugin.attr_str("gen_ai.provider.name").as_deref() == Some("openai")
            && plugin.attr_str("gen_ai.operation.name").as_deref() == Some("chat")
            && int(plugin, "gen_ai.usage.input_tokens") == Some(21)
            && int(plugin, "gen_ai.usage.output_tokens") == Some(4),
        "plugin span: {}",
        plugin.summary()
    );

    for s in &spans {
        for secret in ["daemon-key-SECRET-1", "sk-cred-SECRET-2"] {
            ensure!(!s.mentions(secret), "{secret} leaked: {}", s.summary());
        }
    }
    t.agent.ensure_running()?;
    Ok(())
}

#[test]
fn model_provider_and_sandbox_calls_have_gen_ai_attributes() -> Result<()> {
    let Some(mut t) = setup(
        "model_provider_and_sandbox_calls_have_gen_ai_attributes",
        &[],
    )?
    else {
        return Ok(());
    };
    let port = t.stack.provider_port;
    let (provider, client) = (t.stack.provider.pid(), t.stack.client.pid());
    let url = move |p: &str| format!("http://127.0.0.1:{port}{p}");
    let c = &mut t.stack.client;
    c.request(&json!({"url": url("/v1/chat/completions"), "stream": true,
        "headers": {"Authorization": "Bearer sk-openai-SECRET-3"},
        "json": {"model": "gpt-4o", "stream": true, "stream_options": {"include_usage": true},
                 "messages": [{"role": "user", "content": "hi"}]}}))?;
    c.request(&json!({"url": url("/v1/chat/completions"),
        "json": {"model": "gpt-4o", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}}))?;
    c.request(&json!({"url": url("/v1/embeddings"),
        "json": {"model": "text-embedding-3-small", "input": "hello"}}))?;
    c.request(&json!({"url": url("/v1/messages"), "stream": true,
        "headers": {"X-Api-Key": "sk-ant-SECRET-4"},
        "json": {"model": "claude-x", "max_tokens": 100, "stream": true,
                 "messages": [{"role": "user", "content": "salut"}]}}))?;
    c.request(&json!({"url": url("/v1/sandbox/run"),
        "headers": {"X-Api-Key": "sandbox-SECRET-5"},
        "json": {"language": "python3", "code": "raise SystemExit(1)", "preload": "",
                 "enable_network": false}}))?;

    let want = |s: &[ReceivedSpan]| {
        [client, provider].into_iter().all(|svc| {
            let server = svc == provider;
            find(s, svc, server, "gen_ai.response.id", "chatcmpl-fake1").is_some()
                && find(s, svc, server, "gen_ai.response.id", "chatcmpl-fake2").is_some()
                && find(s, svc, server, "gen_ai.operation.name", "embeddings").is_some()
                && find(s, svc, server, "gen_ai.provider.name", "anthropic").is_some()
                && find(s, svc, server, "dify.sandbox.language", "python3").is_some()
        })
    };
    let spans = t.rx.wait_for(want, WAIT).map_err(|e| t.agent.annotate(e))?;
    for svc in [client, provider] {
        let server = svc == provider;
        let get = |k: &str, v: &str| find(&spans, svc, server, k, v).expect("waited for");

        let s = get("gen_ai.response.id", "chatcmpl-fake1");
        ensure!(
            s.attr_str("gen_ai.operation.name").as_deref() == Some("chat")
                && s.attr_str("gen_ai.provider.name").as_deref() == Some("openai")
                && s.attr_str("gen_ai.request.model").as_deref() == Some("gpt-4o")
                && s.attr_str("gen_ai.response.model").as_deref() == Some("gpt-4o-2024")
                && int(s, "gen_ai.usage.input_tokens") == Some(11)
                && int(s, "gen_ai.usage.output_tokens") == Some(3)
                && reasons(s) == ["stop"]
                && int(s, "dify.stream.chunks") == Some(4),
            "streamed chat ({svc}): {}",
            s.summary()
        );

        let s = get("gen_ai.response.id", "chatcmpl-fake2");
        ensure!(
            int(s, "gen_ai.usage.input_tokens") == Some(13)
                && int(s, "gen_ai.usage.output_tokens") == Some(5)
                && int(s, "gen_ai.request.max_tokens") == Some(5)
                && reasons(s) == ["length"]
                && s.attr("dify.stream.chunks").is_none(),
            "plain chat ({svc}): {}",
            s.summary()
        );

        let s = get("gen_ai.operation.name", "embeddings");
        ensure!(
            s.attr_str("gen_ai.request.model").as_deref() == Some("text-embedding-3-small")
                && int(s, "gen_ai.usage.input_tokens") == Some(6),
            "embeddings ({svc}): {}",
            s.summary()
        );

        let s = get("gen_ai.provider.name", "anthropic");
        ensure!(
            s.attr_str("gen_ai.response.id").as_deref() == Some("msg_fake3")
                && s.attr_str("gen_ai.request.model").as_deref() == Some("claude-x")
                && int(s, "gen_ai.usage.input_tokens") == Some(25)
                && int(s, "gen_ai.usage.output_tokens") == Some(15)
                && reasons(s) == ["end_turn"],
            "anthropic ({svc}): {}",
            s.summary()
        );

        let s = get("dify.sandbox.language", "python3");
        ensure!(
            int(s, "dify.sandbox.exit_code") == Some(1)
                && s.attr_str("dify.sandbox.error").as_deref() == Some("exit status 1"),
            "sandbox ({svc}): {}",
            s.summary()
        );
    }
    for s in &spans {
        // Content is off by default: neither prompts nor completions are exported.
        ensure!(
            s.attr("gen_ai.input.messages").is_none()
                && s.attr("gen_ai.output.messages").is_none()
                && s.attr("http.request.body").is_none(),
            "content exported without being asked: {}",
            s.summary()
        );
        for secret in ["sk-openai-SECRET-3", "sk-ant-SECRET-4", "sandbox-SECRET-5"] {
            ensure!(!s.mentions(secret), "{secret} leaked: {}", s.summary());
        }
    }
    t.agent.ensure_running()?;
    Ok(())
}

#[test]
fn genai_content_is_exported_only_when_asked_and_redacted() -> Result<()> {
    let Some(mut t) = setup(
        "genai_content_is_exported_only_when_asked_and_redacted",
        &["--capture-genai-content"],
    )?
    else {
        return Ok(());
    };
    let url = format!(
        "http://127.0.0.1:{}/v1/chat/completions",
        t.stack.provider_port
    );
    let provider = t.stack.provider.pid();
    t.stack.client.request(&json!({"url": url, "stream": true,
        "json": {"model": "gpt-4o", "stream": true,
                 "messages": [{"role": "user", "content": "what is 2+2", "api_key": "sk-inline-SECRET-6"}]}}))?;
    let s =
        t.rx.wait_for_span(
            |s| {
                s.pid() == Some(provider)
                    && s.attr_str("gen_ai.response.id").as_deref() == Some("chatcmpl-fake1")
            },
            WAIT,
        )
        .map_err(|e| t.agent.annotate(e))?;
    let input = s
        .attr_str("gen_ai.input.messages")
        .context("input messages")?;
    ensure!(
        input.contains("what is 2+2") && input.contains("[REDACTED]"),
        "input: {input}"
    );
    let output = s
        .attr_str("gen_ai.output.messages")
        .context("output messages")?;
    ensure!(output.contains("Hi there"), "output: {output}");
    ensure!(!s.mentions("sk-inline-SECRET-6"), "leak: {}", s.summary());
    Ok(())
}
