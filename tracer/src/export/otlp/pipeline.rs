//! One resource's pipeline: an OTLP exporter behind the SDK's batch processor, and the
//! factory that builds both.

use std::{
    env,
    sync::{
        Arc,
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

/// One resource's pipeline.
#[derive(Debug)]
pub(super) struct Entry {
    pub(super) processor: BatchSpanProcessor,
    /// Spans handed to the processor and not yet passed on to the exporter.
    pub(super) in_processor: Arc<AtomicUsize>,
    pub(super) last_used: Instant,
}
