//! The agent tracing the whole host while it exports over http/protobuf to a collector on
//! the same host (here the in-test receiver, inside this traced test process): the
//! collector's side of the agent's own exports must not become spans, or every export would
//! produce a span to export, forever.

mod common;

use std::time::Duration;

use anyhow::{Result, ensure};
use common::*;
use difytrace_tests::{
    agent::Agent,
    otlp_receiver::{OtlpReceiver, summarize},
    procs::http_get,
    python::Downstream,
};

#[test]
fn own_exports_are_not_traced_in_whole_host_mode() -> Result<()> {
    let Some(_e2e) = difytrace_tests::e2e("own_exports_are_not_traced_in_whole_host_mode") else {
        return Ok(());
    };
    let rx = OtlpReceiver::start()?;
    let agent = Agent::start(&[
        "--otlp-endpoint",
        &rx.http_endpoint(),
        "--otlp-protocol",
        "http/protobuf",
    ])?;
    let downstream = Downstream::start()?;
    let me = std::process::id();
    // Several export rounds (the batch delay is 1 s), each carrying some traffic.
    for round in 0..4 {
        let path = format!("/self-export/{round}/{}", random_hex(6));
        let response = http_get(downstream.addr(), &path, &[])?;
        ensure!(response.status == 200, "downstream answered {response:?}");
        std::thread::sleep(Duration::from_millis(700));
    }
    let last = "/self-export/3/";
    let spans = rx
        .wait_for(
            |spans| {
                spans
                    .iter()
                    .any(|s| s.attr_str("url.path").is_some_and(|p| p.starts_with(last)))
            },
            SPAN_WAIT,
        )
        .map_err(|e| agent.annotate(e))?;
    // Give one more export round the chance to show a feedback span.
    std::thread::sleep(Duration::from_secs(2));
    let spans = if rx.spans().len() > spans.len() {
        rx.spans()
    } else {
        spans
    };
    let own: Vec<_> = spans
        .iter()
        .filter(|s| s.pid() == Some(me) && s.attr_str("url.path").as_deref() == Some("/v1/traces"))
        .cloned()
        .collect();
    ensure!(
        own.is_empty(),
        "the receiver's side of the agent's own exports became spans:\n{}",
        summarize(&own, 10)
    );
    Ok(())
}
