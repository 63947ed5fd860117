//! OTLP exporter (gRPC or http/protobuf) on top of the opentelemetry SDK.
//!
//! Spans are not produced through the OpenTelemetry tracing API: each [`FinishedSpan`] is
//! converted to an SDK [`SpanData`] and handed to a [`BatchSpanProcessor`], which batches it
//! and drives an `opentelemetry-otlp` exporter (retries with backoff included).
//!
//! An OTLP exporter carries exactly one resource, and every traced process is its own resource,
//! so there is one processor + exporter per distinct [`ProcessResource`], created on first use,
//! bounded by [`MAX_RESOURCES`] and retired when idle. A dispatcher thread owns them; the
//! caller only pays for a `try_send` into a bounded queue.
//!
//! [`SpanData`]: opentelemetry_sdk::trace::SpanData
//! [`BatchSpanProcessor`]: opentelemetry_sdk::trace::BatchSpanProcessor
//! [`ProcessResource`]: crate::span::model::ProcessResource

mod convert;
mod counters;
mod dispatch;
mod endpoint;
pub mod metrics;
mod metrics_encode;
mod pipeline;
#[cfg(test)]
mod tests;

use std::{
    env, io,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
        mpsc::{self, SyncSender, TrySendError},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use opentelemetry_otlp::ExporterBuildError;
use thiserror::Error;

pub(crate) use convert::{otel_resource, scope, to_span_data};
pub(crate) use endpoint::env_requests_otlp;

use crate::{cli::OtlpProtocol, span::model::FinishedSpan};
use counters::Shared;
use dispatch::{Dispatcher, Limits, Msg};
use endpoint::Target;
use pipeline::Factory;

/// Most traced processes with a live exporter at once. Each one costs a thread (the SDK's
/// batch processor) and a connection; beyond it the least recently used one is retired.
pub const MAX_RESOURCES: usize = 256;
/// Spans waiting in one resource's batch processor (default; `OTEL_BSP_MAX_QUEUE_SIZE` wins).
pub const OTLP_QUEUE_PER_RESOURCE: usize = 2048;
/// Spans waiting for the dispatcher thread.
pub const DISPATCH_QUEUE: usize = 8192;
/// A resource that exported nothing for this long (typically an exited process) is retired.
pub const RESOURCE_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// How often idle resources are looked for.
const SWEEP_INTERVAL: Duration = Duration::from_secs(30);
/// Batch delay unless `OTEL_BSP_SCHEDULE_DELAY` is set; shorter than the SDK's 5 s so traces
/// show up in the backend while someone is still looking at the request.
const DEFAULT_SCHEDULED_DELAY: Duration = Duration::from_secs(1);
/// At most one warning per this interval for each kind of export trouble.
const WARN_INTERVAL: Duration = Duration::from_secs(30);

const OTEL_EXPORTER_OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
pub(crate) const OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
const OTEL_BSP_MAX_QUEUE_SIZE: &str = "OTEL_BSP_MAX_QUEUE_SIZE";
const OTEL_BSP_SCHEDULE_DELAY: &str = "OTEL_BSP_SCHEDULE_DELAY";
const HTTP_TRACES_PATH: &str = "/v1/traces";

/// Errors setting up OTLP export.
#[derive(Debug, Error)]
pub enum OtlpError {
    #[error("the gRPC exporter needs a tokio runtime: create the exporter inside one")]
    NoRuntime,
    #[error("cannot build the OTLP span exporter")]
    Build(#[from] ExporterBuildError),
    #[error("cannot spawn thread {name}")]
    Spawn {
        name: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("a thread building the OTLP exporter panicked")]
    Panicked,
    #[error("bad OTLP endpoint: {0}")]
    Endpoint(String),
}

/// Span counters of the OTLP side, since start.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct OtlpCounters {
    /// Spans accepted into a resource's batch queue.
    pub(crate) queued: u64,
    /// Spans the backend accepted.
    pub(crate) sent: u64,
    /// Spans lost, for any reason.
    pub(crate) dropped: u64,
    /// Resources with a live exporter now.
    pub(crate) resources: u64,
    /// Of `dropped`: a queue was full.
    pub(crate) queue_full: u64,
    /// Of `dropped`: their export failed.
    pub(crate) failed_spans: u64,
    /// Failed exports (batches).
    pub(crate) failed_exports: u64,
}

/// The OTLP side of the exporter.
#[derive(Debug)]
pub(crate) struct OtlpSink {
    tx: SyncSender<Msg>,
    shared: Arc<Shared>,
    closed: AtomicBool,
    dispatcher: Mutex<Option<JoinHandle<()>>>,
    target: Target,
}

impl OtlpSink {
    /// `endpoint` is the configured one (None: the crate reads the environment).
    pub(crate) fn new(protocol: OtlpProtocol, endpoint: Option<&str>) -> Result<Self, OtlpError> {
        let target = Target::resolve(protocol, endpoint, |name| env::var(name).ok());
        let queue_size = env::var(OTEL_BSP_MAX_QUEUE_SIZE)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or(OTLP_QUEUE_PER_RESOURCE);
        let factory = Factory {
            target: target.clone(),
            queue_size,
        };
        // tonic's lazily connected channel spawns its connection tasks on the runtime that is
        // current when the exporter is built; exporters are built on the dispatcher thread,
        // which enters this handle for that. The SDK's batch thread then only awaits replies.
        let runtime = tokio::runtime::Handle::try_current().ok();
        if protocol == OtlpProtocol::Grpc && runtime.is_none() {
            return Err(OtlpError::NoRuntime);
        }

        // Build one exporter up front so a bad endpoint or OTEL_* value fails the start, not
        // the first span. On a plain thread: the blocking HTTP client must not be dropped
        // inside the async context the caller is in.
        thread::scope(|s| -> Result<(), OtlpError> {
            let handle = thread::Builder::new()
                .name("difytrace-otlp-check".into())
                .spawn_scoped(s, || {
                    let _rt = runtime.as_ref().map(tokio::runtime::Handle::enter);
                    factory.exporter().map(drop)
                })
                .map_err(|source| OtlpError::Spawn {
                    name: "difytrace-otlp-check",
                    source,
                })?;
            handle.join().map_err(|_| OtlpError::Panicked)??;
            Ok(())
        })?;

        let shared = Arc::new(Shared::new());
        let (tx, rx) = mpsc::sync_channel(DISPATCH_QUEUE);
        let dispatcher = Dispatcher::new(factory, Arc::clone(&shared), Limits::DEFAULT);
        let handle = thread::Builder::new()
            .name("difytrace-otlp".into())
            .spawn(move || {
                let _rt = runtime.as_ref().map(tokio::runtime::Handle::enter);
                dispatcher.run(&rx);
            })
            .map_err(|source| OtlpError::Spawn {
                name: "difytrace-otlp",
                source,
            })?;
        Ok(Self {
            tx,
            shared,
            closed: AtomicBool::new(false),
            dispatcher: Mutex::new(Some(handle)),
            target,
        })
    }

    /// Human-readable destination, for the start-up log line.
    pub(crate) fn describe(&self) -> String {
        let protocol = match self.target.protocol {
            OtlpProtocol::Grpc => "grpc",
            OtlpProtocol::HttpProtobuf => "http/protobuf",
        };
        match &self.target.endpoint {
            Some(ep) => format!("{protocol} {ep}"),
            None => format!("{protocol} (endpoint from OTEL_EXPORTER_OTLP_* or default)"),
        }
    }

    pub(crate) fn export(&self, span: FinishedSpan) {
        if self.closed.load(Ordering::Relaxed) {
            self.shared.drop_span("exporter shut down");
            return;
        }
        match self.tx.try_send(Msg::Span(span)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.shared.drop_span("dispatch queue full"),
            Err(TrySendError::Disconnected(_)) => self.shared.drop_span("dispatcher gone"),
        }
    }

    pub(crate) fn counters(&self) -> OtlpCounters {
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let s = &self.shared;
        OtlpCounters {
            queued: get(&s.queued),
            sent: get(&s.sent),
            dropped: get(&s.dropped),
            resources: get(&s.resources),
            queue_full: get(&s.queue_full),
            failed_spans: get(&s.failed_spans),
            failed_exports: get(&s.failed_exports),
        }
    }

    /// Flushes every resource's queue and stops, returning by `deadline` at the latest.
    pub(crate) fn shutdown(&self, deadline: Instant) {
        if self.closed.swap(true, Ordering::Relaxed) {
            return;
        }
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        // Blocking send: the dispatcher never blocks for long, so room comes soon; if it is
        // gone the send fails at once.
        if self
            .tx
            .send(Msg::Shutdown {
                deadline,
                done: done_tx,
            })
            .is_err()
        {
            tracing::warn!("OTLP dispatcher already gone at shutdown");
            return;
        }
        let wait = deadline.saturating_duration_since(Instant::now());
        if done_rx.recv_timeout(wait).is_err() {
            tracing::warn!("OTLP export not flushed before the shutdown deadline");
            return;
        }
        let handle = self
            .dispatcher
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(handle) = handle
            && handle.join().is_err()
        {
            tracing::warn!("OTLP dispatcher thread panicked");
        }
    }
}
