//! OTLP span export (gRPC or http/protobuf), encoded directly from our spans.
//!
//! The event loop hands spans over in batches (one channel message per drain, never
//! blocking: a full channel drops and counts). One exporter thread ([`dispatch`]) moves each
//! span into its protobuf form, queues it under its process's resource ([`batcher`]: every
//! traced process is its own OTLP resource, built once) and sends one
//! `ExportTraceServiceRequest` carrying the spans of every resource with spans waiting, when
//! a batch is full or the schedule delay has passed ([`transport`], shared with the metrics
//! exporter). Failed requests stay queued and are sent again with a backoff, within the
//! per-resource bound.

mod batcher;
mod counters;
mod dispatch;
mod endpoint;
pub mod metrics;
mod metrics_encode;
mod settings;
mod span_encode;
#[cfg(test)]
mod tests;
pub(crate) mod transport;

use std::{
    env, io,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc::{self, SyncSender, TrySendError},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use thiserror::Error;

pub(crate) use endpoint::env_requests_otlp;
pub(crate) use settings::Settings;

use crate::{cli::OtlpProtocol, span::model::FinishedSpan};
use batcher::{Batcher, Limits};
use counters::Shared;
use dispatch::{Dispatcher, Msg};
use endpoint::Target;
use transport::{Signal, Transport};

/// Most traced processes with spans queued or sent recently; beyond it the least recently
/// used one without queued spans is forgotten.
pub const MAX_RESOURCES: usize = 256;
/// Spans held per traced process, waiting or kept from failed exports (default;
/// `OTEL_BSP_MAX_QUEUE_SIZE` wins). Beyond it: while exports fail, the oldest is dropped for
/// the new one; otherwise the new one is dropped.
pub const OTLP_QUEUE_PER_RESOURCE: usize = settings::DEFAULT_MAX_QUEUE;
/// Spans handed over by the event loop and not yet taken by the exporter thread.
pub const DISPATCH_QUEUE: usize = 8192;
/// Batches (channel messages) in flight to the exporter thread; the span bound above is the
/// one that matters.
const DISPATCH_MESSAGES: usize = 1024;
/// A resource that queued nothing for this long (typically an exited process) is forgotten.
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
const OTEL_RESOURCE_ATTRIBUTES: &str = "OTEL_RESOURCE_ATTRIBUTES";
const HTTP_TRACES_PATH: &str = "/v1/traces";

/// Errors setting up OTLP export.
#[derive(Debug, Error)]
pub enum OtlpError {
    #[error("the gRPC exporter needs a tokio runtime: create the exporter inside one")]
    NoRuntime,
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
    /// Spans accepted into a resource's queue.
    pub(crate) queued: u64,
    /// Spans the backend accepted.
    pub(crate) sent: u64,
    /// Spans lost, for any reason.
    pub(crate) dropped: u64,
    /// Resources (traced processes) known to the exporter now.
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
    /// Spans in the channel (bounded by [`DISPATCH_QUEUE`]).
    in_channel: Arc<AtomicUsize>,
    closed: AtomicBool,
    dispatcher: Mutex<Option<JoinHandle<()>>>,
    target: Target,
}

impl OtlpSink {
    /// `endpoint` is the configured one (None: OTEL_EXPORTER_OTLP_* or the default).
    pub(crate) fn new(protocol: OtlpProtocol, endpoint: Option<&str>) -> Result<Self, OtlpError> {
        let env = |name: &str| env::var(name).ok();
        let target = Target::resolve(protocol, endpoint, env);
        let settings = Settings::from_env("TRACES", DEFAULT_SCHEDULED_DELAY, env);
        let env_attrs = env(OTEL_RESOURCE_ATTRIBUTES)
            .map(|v| settings::key_values(&v))
            .unwrap_or_default();
        // tonic's lazily connected channel runs its connection tasks on the agent's runtime;
        // the exporter thread only waits for replies.
        let runtime = tokio::runtime::Handle::try_current().ok();
        if protocol == OtlpProtocol::Grpc && runtime.is_none() {
            return Err(OtlpError::NoRuntime);
        }
        let limits = Limits {
            max_queue: settings.max_queue,
            max_batch: settings.max_batch,
            schedule_delay: settings.schedule_delay,
            max_resources: MAX_RESOURCES,
            idle_timeout: RESOURCE_IDLE_TIMEOUT,
        };
        let shared = Arc::new(Shared::new());
        let in_channel = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::sync_channel(DISPATCH_MESSAGES);
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let handle = thread::Builder::new()
            .name("difytrace-otlp".into())
            .spawn({
                let (shared, in_channel, url) = (
                    Arc::clone(&shared),
                    Arc::clone(&in_channel),
                    target.url.clone(),
                );
                move || {
                    // Built here, on a plain thread: the blocking HTTP client must not be
                    // created or dropped inside the caller's async context.
                    let transport = Transport::new(
                        protocol,
                        &url,
                        Signal::Traces,
                        settings.timeout,
                        &settings.headers,
                        runtime,
                    );
                    let transport = match transport {
                        Ok(t) => {
                            let _ = ready_tx.send(Ok(()));
                            t
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let batcher = Batcher::new(limits, env_attrs);
                    Dispatcher::new(
                        batcher,
                        transport,
                        shared,
                        in_channel,
                        settings.timeout,
                        SWEEP_INTERVAL,
                    )
                    .run(&rx);
                }
            })
            .map_err(|source| OtlpError::Spawn {
                name: "difytrace-otlp",
                source,
            })?;
        // A bad endpoint fails the start, not the first export.
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = handle.join();
                return Err(e);
            }
            Err(_) => {
                let _ = handle.join();
                return Err(OtlpError::Panicked);
            }
        }
        Ok(Self {
            tx,
            shared,
            in_channel,
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
        format!("{protocol} {}", self.target.url)
    }

    /// Hands `spans` to the exporter thread as one message. Never blocks: what does not fit
    /// into the channel is dropped and counted.
    pub(crate) fn export(&self, mut spans: Vec<FinishedSpan>) {
        if spans.is_empty() {
            return;
        }
        if self.closed.load(Ordering::Relaxed) {
            self.shared.drop_spans(spans.len(), "exporter shut down");
            return;
        }
        let room = DISPATCH_QUEUE.saturating_sub(self.in_channel.load(Ordering::Acquire));
        if spans.len() > room {
            self.shared
                .drop_spans(spans.len() - room, "dispatch queue full");
            spans.truncate(room);
            if spans.is_empty() {
                return;
            }
        }
        let n = spans.len();
        self.in_channel.fetch_add(n, Ordering::AcqRel);
        let why = match self.tx.try_send(Msg::Spans(spans)) {
            Ok(()) => return,
            Err(TrySendError::Full(_)) => "dispatch queue full",
            Err(TrySendError::Disconnected(_)) => "dispatcher gone",
        };
        self.in_channel.fetch_sub(n, Ordering::AcqRel);
        self.shared.drop_spans(n, why);
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

    /// Sends what is queued and stops, returning by `deadline` at the latest.
    pub(crate) fn shutdown(&self, deadline: Instant) {
        if self.closed.swap(true, Ordering::Relaxed) {
            return;
        }
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        // The channel may be full while the exporter thread is inside a send: wait for room,
        // but not past the deadline.
        let mut msg = Msg::Shutdown {
            deadline,
            done: done_tx,
        };
        loop {
            match self.tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Full(back)) if Instant::now() < deadline => {
                    msg = back;
                    thread::sleep(Duration::from_millis(5));
                }
                Err(TrySendError::Full(_)) => {
                    tracing::warn!("OTLP export not flushed before the shutdown deadline");
                    return;
                }
                Err(TrySendError::Disconnected(_)) => {
                    tracing::warn!("OTLP exporter thread already gone at shutdown");
                    return;
                }
            }
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
            tracing::warn!("OTLP exporter thread panicked");
        }
    }
}
