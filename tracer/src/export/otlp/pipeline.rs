//! One resource's pipeline: an OTLP exporter behind the SDK's batch processor, and the
//! factory that builds both.

use std::{
    env,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use opentelemetry_otlp::{ExporterBuildError, Protocol, WithExportConfig as _};
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    trace::{BatchConfig, BatchConfigBuilder, BatchSpanProcessor, SpanData, SpanExporter},
};

use super::{
    DEFAULT_SCHEDULED_DELAY, OTEL_BSP_SCHEDULE_DELAY, OtlpError, counters::Shared,
    endpoint::Target, otel_resource,
};
use crate::{cli::OtlpProtocol, span::model::ProcessResource};

/// Wraps the OTLP exporter to count what it delivers and to free room in the admission
/// counter: the SDK's batch processor does not expose its drop count, so the dispatcher keeps
/// its own count of spans inside the processor and never offers more than the processor's
/// queue holds. Drops are then all decided (and counted) by the dispatcher.
///
/// It also keeps what a failed export could not deliver while the backend is down, so an
/// outage costs only what does not fit: the SDK's processor would drop every failed batch
/// and take the next one. The batch is copied only while exports are failing (a healthy
/// pipeline pays nothing); the first batch that fails is lost.
#[derive(Debug)]
struct CountingExporter<E> {
    inner: E,
    in_processor: Arc<AtomicUsize>,
    shared: Arc<Shared>,
    retry: Arc<RetryBuffer>,
}

/// Spans of failed exports, oldest first, sent again ahead of the next batch (or put back
/// into the processor by the dispatcher when no new batch comes: `Dispatcher::requeue_held`).
#[derive(Debug)]
pub(super) struct RetryBuffer {
    spans: Mutex<Vec<SpanData>>,
    capacity: usize,
}

impl RetryBuffer {
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.spans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub(super) fn take(&self) -> Vec<SpanData> {
        std::mem::take(&mut *self.spans.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Keeps `failed` (older than anything held since) for the next export; returns how many
    /// of the oldest did not fit.
    fn keep(&self, mut failed: Vec<SpanData>) -> usize {
        let mut held = self.spans.lock().unwrap_or_else(PoisonError::into_inner);
        failed.append(&mut held);
        let over = failed.len().saturating_sub(self.capacity);
        failed.drain(..over);
        *held = failed;
        over
    }
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        // The processor drained these from its queue before calling us.
        self.in_processor.fetch_sub(batch.len(), Ordering::AcqRel);
        let mut retried = self.retry.take();
        let batch = if retried.is_empty() {
            batch
        } else {
            retried.extend(batch);
            retried
        };
        let spans = batch.len();
        let copy = self.shared.is_failing().then(|| batch.clone());
        let export = self.inner.export(batch);
        let (shared, retry) = (&self.shared, &self.retry);
        async move {
            let result = export.await;
            match (&result, copy) {
                (Err(e), Some(copy)) => {
                    let dropped = retry.keep(copy);
                    shared.export_held(spans, dropped, e);
                }
                _ => shared.export_done(spans, &result),
            }
            result
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        // Spans still held once the processor's final flush has run were never delivered.
        let held = self.retry.take().len();
        if held > 0 {
            self.shared.drop_held(held);
        }
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
pub(super) struct Factory {
    pub(super) target: Target,
    pub(super) queue_size: usize,
}

impl Factory {
    pub(super) fn exporter(&self) -> Result<opentelemetry_otlp::SpanExporter, ExporterBuildError> {
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

    pub(super) fn pipeline(
        &self,
        resource: &ProcessResource,
        shared: &Arc<Shared>,
    ) -> Result<Entry, OtlpError> {
        let in_processor = Arc::new(AtomicUsize::new(0));
        let retry = Arc::new(RetryBuffer {
            spans: Mutex::new(Vec::new()),
            capacity: self.queue_size,
        });
        let mut exporter = CountingExporter {
            inner: self.exporter()?,
            in_processor: Arc::clone(&in_processor),
            shared: Arc::clone(shared),
            retry: Arc::clone(&retry),
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
            retry,
            last_used: Instant::now(),
        })
    }
}

/// One resource's pipeline.
#[derive(Debug)]
pub(super) struct Entry {
    pub(super) processor: BatchSpanProcessor,
    /// Spans handed to the processor and not yet passed on to the exporter.
    pub(super) in_processor: Arc<AtomicUsize>,
    /// Spans of its failed exports waiting for the next one.
    pub(super) retry: Arc<RetryBuffer>,
    pub(super) last_used: Instant,
}
