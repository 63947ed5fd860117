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

use std::{
    borrow::Cow,
    collections::HashMap,
    env, io,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use opentelemetry::{
    InstrumentationScope, KeyValue, StringValue, Value,
    trace::{
        Link, SpanContext, SpanId, SpanKind as OtelSpanKind, Status, TraceFlags, TraceId,
        TraceState,
    },
};
use opentelemetry_otlp::{ExporterBuildError, Protocol, WithExportConfig as _};
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    resource::EnvResourceDetector,
    trace::{
        BatchConfig, BatchConfigBuilder, BatchSpanProcessor, SpanData, SpanEvents, SpanExporter,
        SpanLinks, SpanProcessor as _,
    },
};
use thiserror::Error;

use crate::{
    cli::OtlpProtocol,
    span::model::{AttrValue, FinishedSpan, ProcessResource, SpanKind, SpanStatus},
};

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
}

/// Where and how to send, after applying the precedence rules; `endpoint: None` leaves the
/// endpoint to the crate (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_EXPORTER_OTLP_ENDPOINT,
/// default).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    protocol: OtlpProtocol,
    endpoint: Option<String>,
}

impl Target {
    fn resolve(
        protocol: OtlpProtocol,
        configured: Option<&str>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Self {
        let configured = configured.map(str::trim).filter(|e| !e.is_empty());
        let env = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        let endpoint = match configured {
            // The configured endpoint is usually OTEL_EXPORTER_OTLP_ENDPOINT read by clap. The
            // spec lets the signal-specific variable win over that one, so in that case the
            // crate resolves it (verbatim, no path appended).
            Some(ep)
                if env(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT).is_some()
                    && env(OTEL_EXPORTER_OTLP_ENDPOINT).as_deref().map(str::trim) == Some(ep) =>
            {
                None
            }
            Some(ep) => Some(match protocol {
                OtlpProtocol::Grpc => ep.to_string(),
                OtlpProtocol::HttpProtobuf => http_traces_url(ep),
            }),
            None => None,
        };
        Self { protocol, endpoint }
    }
}

/// The configured endpoint has the meaning of OTEL_EXPORTER_OTLP_ENDPOINT: a base URL to which
/// the signal path is appended. The crate posts to a programmatic endpoint verbatim, so the
/// path is appended here unless it is already there.
fn http_traces_url(base: &str) -> String {
    let base = base.trim_end_matches('/');
    if base.ends_with(HTTP_TRACES_PATH) {
        base.to_string()
    } else {
        format!("{base}{HTTP_TRACES_PATH}")
    }
}

/// True when the environment alone asks for OTLP (no endpoint configured).
pub(crate) fn env_requests_otlp() -> bool {
    env::var(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT).is_ok_and(|v| !v.trim().is_empty())
}

/// Counters and warning limits shared by the caller, the dispatcher and the exporters.
#[derive(Debug)]
struct Shared {
    queued: AtomicU64,
    sent: AtomicU64,
    dropped: AtomicU64,
    resources: AtomicU64,
    failing: AtomicBool,
    export_warn: RateLimit,
    drop_warn: RateLimit,
}

impl Shared {
    fn new() -> Self {
        Self {
            queued: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            resources: AtomicU64::new(0),
            failing: AtomicBool::new(false),
            export_warn: RateLimit::new(WARN_INTERVAL),
            drop_warn: RateLimit::new(WARN_INTERVAL),
        }
    }

    fn drop_span(&self, why: &'static str) {
        let total = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(suppressed) = self.drop_warn.check() {
            tracing::warn!(
                reason = why,
                dropped_total = total,
                suppressed,
                "OTLP export is dropping spans"
            );
        }
    }

    fn export_done(&self, spans: usize, result: &OTelSdkResult) {
        match result {
            Ok(()) => {
                self.sent.fetch_add(spans as u64, Ordering::Relaxed);
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("OTLP export works again");
                }
            }
            Err(e) => {
                // The exporter already retried with backoff: these spans are lost.
                self.dropped.fetch_add(spans as u64, Ordering::Relaxed);
                self.failing.store(true, Ordering::Relaxed);
                if let Some(suppressed) = self.export_warn.check() {
                    tracing::warn!(
                        error = %e,
                        spans,
                        suppressed_failures = suppressed,
                        "OTLP export failed; spans dropped"
                    );
                }
            }
        }
    }
}

/// Lets one event through per interval and counts the others.
#[derive(Debug)]
struct RateLimit {
    base: Instant,
    interval_ms: u64,
    /// Milliseconds since `base` plus one of the last event let through; 0 = never.
    last_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimit {
    fn new(interval: Duration) -> Self {
        Self {
            base: Instant::now(),
            interval_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
            last_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(events suppressed since the last one let through)` when this one may be logged.
    fn check(&self) -> Option<u64> {
        let now = u64::try_from(self.base.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        let last = self.last_ms.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= self.interval_ms;
        if due
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Wraps the OTLP exporter to count what it delivers and to free room in the admission
/// counter: the SDK's batch processor does not expose its drop count, so the dispatcher keeps
/// its own count of spans inside the processor and never offers more than the processor's
/// queue holds. Drops are then all decided (and counted) by the dispatcher.
#[derive(Debug)]
struct CountingExporter<E> {
    inner: E,
    in_processor: Arc<AtomicUsize>,
    shared: Arc<Shared>,
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let spans = batch.len();
        // The processor drained these from its queue before calling us.
        self.in_processor.fetch_sub(spans, Ordering::AcqRel);
        let export = self.inner.export(batch);
        let shared = &self.shared;
        async move {
            let result = export.await;
            shared.export_done(spans, &result);
            result
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Builds exporters; everything it needs is fixed at start.
#[derive(Debug, Clone)]
struct Factory {
    target: Target,
    queue_size: usize,
}

impl Factory {
    fn exporter(&self) -> Result<opentelemetry_otlp::SpanExporter, ExporterBuildError> {
        let builder = opentelemetry_otlp::SpanExporter::builder();
        match self.target.protocol {
            OtlpProtocol::Grpc => {
                let mut b = builder.with_tonic();
                if let Some(ep) = &self.target.endpoint {
                    b = b.with_endpoint(ep.clone());
                }
                b.build()
            }
            OtlpProtocol::HttpProtobuf => {
                // Explicit so that OTEL_EXPORTER_OTLP_PROTOCOL=grpc in the environment cannot
                // contradict the transport chosen on the command line.
                let mut b = builder.with_http().with_protocol(Protocol::HttpBinary);
                if let Some(ep) = &self.target.endpoint {
                    b = b.with_endpoint(ep.clone());
                }
                b.build()
            }
        }
    }

    fn batch_config(&self) -> BatchConfig {
        // BatchConfigBuilder::default() reads the other OTEL_BSP_* variables.
        let mut builder = BatchConfigBuilder::default().with_max_queue_size(self.queue_size);
        if env::var_os(OTEL_BSP_SCHEDULE_DELAY).is_none() {
            builder = builder.with_scheduled_delay(DEFAULT_SCHEDULED_DELAY);
        }
        builder.build()
    }

    fn pipeline(
        &self,
        resource: &ProcessResource,
        shared: &Arc<Shared>,
    ) -> Result<Entry, OtlpError> {
        let in_processor = Arc::new(AtomicUsize::new(0));
        let mut exporter = CountingExporter {
            inner: self.exporter()?,
            in_processor: Arc::clone(&in_processor),
            shared: Arc::clone(shared),
        };
        // Set on the exporter before the processor thread exists, so no batch can go out
        // with the empty default resource.
        exporter.set_resource(&otel_resource(resource));
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(self.batch_config())
            .build();
        Ok(Entry {
            processor,
            in_processor,
            last_used: Instant::now(),
        })
    }
}

/// The OTel resource of one traced process.
pub(crate) fn otel_resource(p: &ProcessResource) -> Resource {
    let service = if p.service_name.is_empty() {
        // The spec's fallback for a missing service.name.
        format!("unknown_service:{}", p.executable_name)
    } else {
        p.service_name.clone()
    };
    let mut attrs = vec![
        KeyValue::new("service.name", service),
        KeyValue::new("process.pid", i64::from(p.pid)),
    ];
    if !p.executable_name.is_empty() {
        attrs.push(KeyValue::new(
            "process.executable.name",
            p.executable_name.clone(),
        ));
    }
    if !p.host_name.is_empty() {
        attrs.push(KeyValue::new("host.name", p.host_name.clone()));
    }
    // OTEL_RESOURCE_ATTRIBUTES adds deployment-wide facts (cluster, environment); what we know
    // about the process comes later and wins. OTEL_SERVICE_NAME is deliberately not applied:
    // one agent exports many services.
    Resource::builder_empty()
        .with_detector(Box::new(EnvResourceDetector::new()))
        .with_attributes(attrs)
        .build()
}

/// The instrumentation scope every exported span carries.
pub(crate) fn scope() -> InstrumentationScope {
    InstrumentationScope::builder("difytrace")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build()
}

/// Converts our span into the SDK's export form. Every span we export was recorded, hence the
/// sampled flag; the span itself is local to the traced process, only its parent can be remote.
pub(crate) fn to_span_data(span: FinishedSpan, scope: &InstrumentationScope) -> SpanData {
    let span_context = SpanContext::new(
        TraceId::from_bytes(span.trace_id),
        SpanId::from_bytes(span.span_id),
        TraceFlags::SAMPLED,
        false,
        TraceState::default(),
    );
    let mut links = SpanLinks::default();
    links.links = span
        .links
        .into_iter()
        .map(|l| {
            Link::new(
                SpanContext::new(
                    TraceId::from_bytes(l.trace_id),
                    SpanId::from_bytes(l.span_id),
                    TraceFlags::SAMPLED,
                    true,
                    TraceState::default(),
                ),
                l.attributes.into_iter().map(key_value).collect(),
                0,
            )
        })
        .collect();
    SpanData {
        span_context,
        parent_span_id: span
            .parent_span_id
            .map_or(SpanId::INVALID, SpanId::from_bytes),
        parent_span_is_remote: span.parent_span_id.is_some() && span.parent_is_remote,
        span_kind: match span.kind {
            SpanKind::Server => OtelSpanKind::Server,
            SpanKind::Client => OtelSpanKind::Client,
            SpanKind::Internal => OtelSpanKind::Internal,
        },
        name: Cow::Owned(span.name),
        start_time: span.start,
        end_time: span.end,
        attributes: span.attributes.into_iter().map(key_value).collect(),
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links,
        status: match span.status {
            SpanStatus::Unset => Status::Unset,
            SpanStatus::Error(description) => Status::Error {
                description: Cow::Owned(description),
            },
        },
        instrumentation_scope: scope.clone(),
    }
}

fn key_value((key, value): (String, AttrValue)) -> KeyValue {
    let value = match value {
        AttrValue::Str(s) => Value::String(StringValue::from(s)),
        AttrValue::Int(i) => Value::I64(i),
        AttrValue::Bool(b) => Value::Bool(b),
        AttrValue::F64(f) => Value::F64(f),
    };
    KeyValue::new(key, value)
}

/// Bounds of the resource table (constants in production, small in tests).
#[derive(Debug, Clone, Copy)]
struct Limits {
    max_resources: usize,
    idle_timeout: Duration,
    sweep_interval: Duration,
}

impl Limits {
    const DEFAULT: Self = Self {
        max_resources: MAX_RESOURCES,
        idle_timeout: RESOURCE_IDLE_TIMEOUT,
        sweep_interval: SWEEP_INTERVAL,
    };
}

/// One resource's pipeline.
#[derive(Debug)]
struct Entry {
    processor: BatchSpanProcessor,
    /// Spans handed to the processor and not yet passed on to the exporter.
    in_processor: Arc<AtomicUsize>,
    last_used: Instant,
}

#[derive(Debug)]
enum Msg {
    Span(FinishedSpan),
    Shutdown {
        deadline: Instant,
        done: SyncSender<()>,
    },
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

    /// (queued, sent, dropped, resources)
    pub(crate) fn counters(&self) -> (u64, u64, u64, u64) {
        (
            self.shared.queued.load(Ordering::Relaxed),
            self.shared.sent.load(Ordering::Relaxed),
            self.shared.dropped.load(Ordering::Relaxed),
            self.shared.resources.load(Ordering::Relaxed),
        )
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

/// Owns the per-resource pipelines; runs on its own thread.
struct Dispatcher {
    factory: Factory,
    shared: Arc<Shared>,
    limits: Limits,
    entries: HashMap<ProcessResource, Entry>,
    scope: InstrumentationScope,
    next_sweep: Instant,
}

impl Dispatcher {
    fn new(factory: Factory, shared: Arc<Shared>, limits: Limits) -> Self {
        Self {
            factory,
            shared,
            limits,
            entries: HashMap::new(),
            scope: scope(),
            next_sweep: Instant::now() + limits.sweep_interval,
        }
    }

    fn run(mut self, rx: &Receiver<Msg>) {
        loop {
            let wait = self.next_sweep.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(Msg::Span(span)) => self.handle(span),
                Ok(Msg::Shutdown { deadline, done }) => {
                    // Spans that raced with the shutdown flag still get their chance.
                    while let Ok(msg) = rx.try_recv() {
                        if let Msg::Span(span) = msg {
                            self.handle(span);
                        }
                    }
                    let entries = self.entries.drain().map(|(_, e)| e).collect();
                    self.shared.resources.store(0, Ordering::Relaxed);
                    shutdown_all(entries, deadline);
                    let _ = done.send(());
                    return;
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    // The exporter was dropped without shutdown: flush in the background.
                    let entries = self.entries.drain().map(|(_, e)| e).collect();
                    shutdown_all(entries, Instant::now() + super::SHUTDOWN_TIMEOUT);
                    return;
                }
            }
            let now = Instant::now();
            if now >= self.next_sweep {
                self.next_sweep = now + self.limits.sweep_interval;
                self.sweep(now);
            }
        }
    }

    fn handle(&mut self, span: FinishedSpan) {
        let resource = Arc::clone(&span.resource);
        if !self.entries.contains_key(&*resource) {
            if self.entries.len() >= self.limits.max_resources {
                self.evict_lru();
            }
            match self.factory.pipeline(&resource, &self.shared) {
                Ok(entry) => {
                    tracing::debug!(service = %resource.service_name, pid = resource.pid, "new OTLP resource");
                    self.entries.insert((*resource).clone(), entry);
                    self.publish_resources();
                }
                Err(e) => {
                    if let Some(suppressed) = self.shared.export_warn.check() {
                        tracing::warn!(error = %e, suppressed_failures = suppressed, "cannot create an OTLP exporter");
                    }
                    self.shared.drop_span("no exporter");
                    return;
                }
            }
        }
        let Some(entry) = self.entries.get_mut(&*resource) else {
            return;
        };
        entry.last_used = Instant::now();
        let before = entry.in_processor.fetch_add(1, Ordering::AcqRel);
        if before >= self.factory.queue_size {
            entry.in_processor.fetch_sub(1, Ordering::AcqRel);
            self.shared.drop_span("per-resource queue full");
            return;
        }
        entry.processor.on_end(to_span_data(span, &self.scope));
        self.shared.queued.fetch_add(1, Ordering::Relaxed);
    }

    fn evict_lru(&mut self) {
        let Some(key) = self
            .entries
            .iter()
            .min_by_key(|(_, e)| e.last_used)
            .map(|(k, _)| k.clone())
        else {
            return;
        };
        if let Some(entry) = self.entries.remove(&key) {
            tracing::debug!(service = %key.service_name, pid = key.pid, "OTLP resource limit reached; retiring the least recently used one");
            self.retire(vec![entry]);
        }
    }

    fn sweep(&mut self, now: Instant) {
        let idle: Vec<ProcessResource> = self
            .entries
            .iter()
            .filter(|(_, e)| now.duration_since(e.last_used) >= self.limits.idle_timeout)
            .map(|(k, _)| k.clone())
            .collect();
        let retired: Vec<Entry> = idle.iter().filter_map(|k| self.entries.remove(k)).collect();
        if !retired.is_empty() {
            tracing::debug!(count = retired.len(), "retiring idle OTLP resources");
            self.retire(retired);
        }
    }

    /// Flushes and stops pipelines off the dispatcher thread: a flush can take as long as the
    /// export timeout when the backend is down, and the dispatcher must keep admitting spans.
    fn retire(&self, entries: Vec<Entry>) {
        self.publish_resources();
        let spawned = thread::Builder::new()
            .name("difytrace-otlp-retire".into())
            .spawn(move || shutdown_all(entries, Instant::now() + super::SHUTDOWN_TIMEOUT));
        if let Err(e) = spawned {
            // The entries went down with the closure: their processor threads see the closed
            // channel and exit, losing what they held.
            tracing::warn!(error = %e, "cannot spawn a thread to flush retired OTLP resources");
        }
    }

    fn publish_resources(&self) {
        self.shared
            .resources
            .store(self.entries.len() as u64, Ordering::Relaxed);
    }
}

/// Shuts the processors down in parallel, so the whole takes one timeout, not one per
/// resource.
fn shutdown_all(entries: Vec<Entry>, deadline: Instant) {
    if entries.is_empty() {
        return;
    }
    let timeout = deadline.saturating_duration_since(Instant::now());
    thread::scope(|s| {
        for entry in &entries {
            let spawned = thread::Builder::new()
                .name("difytrace-otlp-flush".into())
                .spawn_scoped(s, move || entry.processor.shutdown_with_timeout(timeout));
            if spawned.is_err() {
                // Out of threads: flush this one here instead.
                let _ = entry.processor.shutdown_with_timeout(timeout);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use opentelemetry::Key;

    use super::*;
    use crate::span::model::SpanLink;

    fn sample() -> FinishedSpan {
        let start = UNIX_EPOCH + Duration::from_nanos(1_795_628_401_123_456_789);
        FinishedSpan {
            trace_id: *b"0123456789abcdef",
            span_id: *b"spanid01",
            parent_span_id: Some(*b"parent01"),
            parent_is_remote: true,
            kind: SpanKind::Client,
            name: "POST /v1/sandbox/run".into(),
            start,
            end: start + Duration::from_micros(12_345),
            attributes: vec![
                ("http.request.method".into(), AttrValue::Str("POST".into())),
                ("http.response.status_code".into(), AttrValue::Int(200)),
                ("dify.streamed".into(), AttrValue::Bool(true)),
                ("gen_ai.temperature".into(), AttrValue::F64(0.5)),
            ],
            links: vec![SpanLink {
                trace_id: [7; 16],
                span_id: [8; 8],
                attributes: vec![("link.reason".into(), AttrValue::Str("traceparent".into()))],
            }],
            status: SpanStatus::Error("boom".into()),
            resource: Arc::new(ProcessResource {
                service_name: "sandbox".into(),
                pid: 42,
                executable_name: "sandbox".into(),
                host_name: "node-1".into(),
            }),
        }
    }

    fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a Value> {
        attrs
            .iter()
            .find(|kv| kv.key == Key::from(key.to_string()))
            .map(|kv| &kv.value)
    }

    #[test]
    fn span_data_conversion() {
        let span = sample();
        let (start, end) = (span.start, span.end);
        let data = to_span_data(span, &scope());
        assert_eq!(
            data.span_context.trace_id().to_bytes(),
            *b"0123456789abcdef"
        );
        assert_eq!(data.span_context.span_id().to_bytes(), *b"spanid01");
        assert!(data.span_context.is_sampled());
        assert!(!data.span_context.is_remote());
        assert_eq!(data.parent_span_id.to_bytes(), *b"parent01");
        assert!(data.parent_span_is_remote);
        assert_eq!(data.span_kind, OtelSpanKind::Client);
        assert_eq!(data.name, "POST /v1/sandbox/run");
        assert_eq!(data.start_time, start);
        assert_eq!(data.end_time, end);
        assert_eq!(
            attr(&data.attributes, "http.request.method"),
            Some(&Value::from("POST"))
        );
        assert_eq!(
            attr(&data.attributes, "http.response.status_code"),
            Some(&Value::I64(200))
        );
        assert_eq!(
            attr(&data.attributes, "dify.streamed"),
            Some(&Value::Bool(true))
        );
        assert_eq!(
            attr(&data.attributes, "gen_ai.temperature"),
            Some(&Value::F64(0.5))
        );
        assert_eq!(data.links.len(), 1);
        assert_eq!(data.links[0].span_context.trace_id().to_bytes(), [7; 16]);
        assert_eq!(data.links[0].span_context.span_id().to_bytes(), [8; 8]);
        assert_eq!(
            attr(&data.links[0].attributes, "link.reason"),
            Some(&Value::from("traceparent"))
        );
        assert_eq!(
            data.status,
            Status::Error {
                description: "boom".into()
            }
        );
        assert_eq!(data.instrumentation_scope.name(), "difytrace");
    }

    #[test]
    fn root_span_has_invalid_parent() {
        let mut span = sample();
        span.parent_span_id = None;
        span.kind = SpanKind::Server;
        span.status = SpanStatus::Unset;
        let data = to_span_data(span, &scope());
        assert_eq!(data.parent_span_id, SpanId::INVALID);
        assert!(!data.parent_span_is_remote);
        assert_eq!(data.span_kind, OtelSpanKind::Server);
        assert_eq!(data.status, Status::Unset);
    }

    #[test]
    fn resource_attributes() {
        let r = otel_resource(&sample().resource);
        assert_eq!(
            r.get(&Key::from_static_str("service.name")),
            Some(Value::from("sandbox"))
        );
        assert_eq!(
            r.get(&Key::from_static_str("process.pid")),
            Some(Value::I64(42))
        );
        assert_eq!(
            r.get(&Key::from_static_str("process.executable.name")),
            Some(Value::from("sandbox"))
        );
        assert_eq!(
            r.get(&Key::from_static_str("host.name")),
            Some(Value::from("node-1"))
        );
        let nameless = otel_resource(&ProcessResource {
            service_name: String::new(),
            pid: 1,
            executable_name: "gunicorn".into(),
            host_name: String::new(),
        });
        assert_eq!(
            nameless.get(&Key::from_static_str("service.name")),
            Some(Value::from("unknown_service:gunicorn"))
        );
        assert_eq!(nameless.get(&Key::from_static_str("host.name")), None);
    }

    #[test]
    fn http_endpoint_gets_the_traces_path() {
        assert_eq!(http_traces_url("http://h:4318"), "http://h:4318/v1/traces");
        assert_eq!(http_traces_url("http://h:4318/"), "http://h:4318/v1/traces");
        assert_eq!(
            http_traces_url("http://h:4318/v1/traces"),
            "http://h:4318/v1/traces"
        );
        assert_eq!(
            http_traces_url("https://gw/otlp"),
            "https://gw/otlp/v1/traces"
        );
    }

    #[test]
    fn endpoint_precedence() {
        let none = |_: &str| None;
        let t = Target::resolve(OtlpProtocol::HttpProtobuf, Some("http://h:4318"), none);
        assert_eq!(t.endpoint.as_deref(), Some("http://h:4318/v1/traces"));
        let t = Target::resolve(OtlpProtocol::Grpc, Some("http://h:4317"), none);
        assert_eq!(t.endpoint.as_deref(), Some("http://h:4317"));
        let t = Target::resolve(OtlpProtocol::Grpc, Some("  "), none);
        assert_eq!(t.endpoint, None);

        // The configured value is the generic variable and the signal one is set: crate's turn.
        let env = |name: &str| match name {
            OTEL_EXPORTER_OTLP_ENDPOINT => Some("http://generic:4318".to_string()),
            OTEL_EXPORTER_OTLP_TRACES_ENDPOINT => Some("http://traces:4318/x".to_string()),
            _ => None,
        };
        let t = Target::resolve(OtlpProtocol::HttpProtobuf, Some("http://generic:4318"), env);
        assert_eq!(t.endpoint, None);
        // An endpoint given on the command line wins over both.
        let t = Target::resolve(OtlpProtocol::HttpProtobuf, Some("http://cli:4318"), env);
        assert_eq!(t.endpoint.as_deref(), Some("http://cli:4318/v1/traces"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lru_eviction_idle_retirement_and_queue_bound() {
        use crate::export::tests::{resource, span, start_grpc, wait_for};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut rx = start_grpc(listener).await;
        let factory = Factory {
            target: Target {
                protocol: OtlpProtocol::Grpc,
                endpoint: Some(format!("http://{addr}")),
            },
            queue_size: 16,
        };
        let shared = Arc::new(Shared::new());
        let mut d = Dispatcher::new(
            factory,
            Arc::clone(&shared),
            Limits {
                max_resources: 2,
                idle_timeout: Duration::from_millis(300),
                sweep_interval: Duration::from_secs(3600),
            },
        );
        let (a, b, c) = (resource("a", 1), resource("b", 2), resource("c", 3));
        d.handle(span(1, &a));
        tokio::time::sleep(Duration::from_millis(5)).await;
        d.handle(span(2, &b));
        d.handle(span(3, &c));
        assert_eq!(d.entries.len(), 2);
        assert!(
            !d.entries.contains_key(&*a),
            "the least recently used goes first"
        );
        assert_eq!(shared.resources.load(Ordering::Relaxed), 2);
        // The retired pipeline was flushed, not thrown away.
        let seen = wait_for(&mut rx, &[1], Duration::from_secs(5)).await;
        assert_eq!(seen[&1].resource["service.name"], "a");

        tokio::time::sleep(Duration::from_millis(400)).await;
        d.sweep(Instant::now());
        assert!(d.entries.is_empty());
        assert_eq!(shared.resources.load(Ordering::Relaxed), 0);
        let seen = wait_for(&mut rx, &[2, 3], Duration::from_secs(5)).await;
        assert_eq!(seen.len(), 2);

        // A burst beyond the per-resource queue: every span is either queued or counted.
        let dropped_before = shared.dropped.load(Ordering::Relaxed);
        let queued_before = shared.queued.load(Ordering::Relaxed);
        for n in 0..200u8 {
            d.handle(span(n, &a));
        }
        let queued = shared.queued.load(Ordering::Relaxed) - queued_before;
        let dropped = shared.dropped.load(Ordering::Relaxed) - dropped_before;
        assert_eq!(queued + dropped, 200);
        assert!(queued >= 16, "queued {queued}");
        let entries: Vec<Entry> = d.entries.drain().map(|(_, e)| e).collect();
        tokio::task::block_in_place(|| {
            shutdown_all(entries, Instant::now() + Duration::from_secs(5));
        });
    }

    #[test]
    fn rate_limit_lets_one_through_per_interval() {
        let limit = RateLimit::new(Duration::from_secs(3600));
        assert_eq!(limit.check(), Some(0));
        assert_eq!(limit.check(), None);
        assert_eq!(limit.check(), None);
        let limit = RateLimit::new(Duration::ZERO);
        assert_eq!(limit.check(), Some(0));
        assert_eq!(limit.check(), Some(0));
    }
}
