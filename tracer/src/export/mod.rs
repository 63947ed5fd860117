//! Exporters: console and OTLP.
//!
//! [`Exporter::export`] is called from the agent's event loop and never blocks: each sink has
//! a bounded queue drained by its own thread, and a span that finds a queue full is dropped
//! and counted in [`ExportStats::spans_dropped`].

pub mod console;
pub mod console_tree;
pub mod otlp;

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::Context as _;

pub use crate::cli::OtlpProtocol;
use crate::span::model::FinishedSpan;
use console::ConsoleSink;
pub use console::format_span_line;
use otlp::OtlpSink;

/// Longest [`Exporter::shutdown`] waits for queued spans to go out.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Where spans go.
#[derive(Debug, Clone)]
pub struct ExportConfig {
    /// OTLP endpoint. With http/protobuf it is a base URL (`http://host:4318`) and
    /// `/v1/traces` is appended unless already there. When None, OTLP is still used if
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set.
    pub otlp_endpoint: Option<String>,
    pub protocol: OtlpProtocol,
    /// Print spans on stdout even when exporting OTLP.
    pub console: bool,
}

/// Counters since start.
#[derive(Debug, Default, Clone, Copy)]
pub struct ExportStats {
    /// Lines written to stdout.
    pub spans_exported_console: u64,
    /// Spans accepted into an OTLP batch queue.
    pub spans_queued_otlp: u64,
    /// Spans lost: a full queue, an unwritable stdout, OTLP spans not delivered (the oldest
    /// of a full queue while exports fail, refused by the backend, still queued at shutdown),
    /// or spans offered after shutdown.
    pub spans_dropped: u64,
    /// Traced processes (OTLP resources) the OTLP exporter knows now.
    pub resources: u64,
    /// Spans the OTLP backend accepted.
    pub spans_sent_otlp: u64,
    /// Of `spans_dropped`: spans that found an OTLP queue full.
    pub spans_dropped_queue_full: u64,
    /// Of `spans_dropped`: queued OTLP spans not delivered.
    pub spans_dropped_export_failed: u64,
    /// OTLP exports (requests) that failed; their spans are retried unless refused.
    pub export_errors: u64,
    /// Spans inside the OTLP queues now.
    pub otlp_queue_len: u64,
    /// What the console's trace trees did (zero without console output).
    pub(crate) tree: console::ConsoleTreeStats,
}

/// Fans finished spans out to the console and/or OTLP.
#[derive(Debug)]
pub struct Exporter {
    console: Option<ConsoleSink>,
    otlp: Option<OtlpSink>,
    console_dropped: AtomicU64,
}

impl Exporter {
    /// Called inside a tokio multi-thread runtime (the gRPC exporter's connections run on it).
    /// Console output when no endpoint is configured or `console` is set.
    pub fn new(cfg: ExportConfig) -> anyhow::Result<Self> {
        let want_otlp = cfg
            .otlp_endpoint
            .as_deref()
            .is_some_and(|e| !e.trim().is_empty())
            || otlp::env_requests_otlp();
        let otlp = if want_otlp {
            let sink = OtlpSink::new(cfg.protocol, cfg.otlp_endpoint.as_deref())
                .context("cannot set up OTLP export")?;
            tracing::info!(target = %sink.describe(), "exporting spans over OTLP");
            Some(sink)
        } else {
            None
        };
        let console = if cfg.console || otlp.is_none() {
            Some(ConsoleSink::stdout().context("cannot set up console output")?)
        } else {
            None
        };
        Ok(Self {
            console,
            otlp,
            console_dropped: AtomicU64::new(0),
        })
    }

    /// Never blocks the caller (the event loop of the agent); drops and counts when queues are
    /// full.
    pub fn export(&self, span: FinishedSpan) {
        self.export_batch(vec![span]);
    }

    /// As [`Exporter::export`] for several spans: they reach the OTLP side as one hand-off.
    pub fn export_batch(&self, spans: Vec<FinishedSpan>) {
        if let Some(console) = &self.console {
            for span in &spans {
                if !console.send_span(span) {
                    self.console_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if let Some(otlp) = &self.otlp {
            otlp.export(spans);
        }
    }

    pub fn stats(&self) -> ExportStats {
        let mut stats = ExportStats {
            spans_dropped: self.console_dropped.load(Ordering::Relaxed),
            ..ExportStats::default()
        };
        if let Some(console) = &self.console {
            stats.spans_exported_console = console.written();
            stats.spans_dropped += console.failed();
            stats.tree = console.tree_stats();
        }
        if let Some(otlp) = &self.otlp {
            let c = otlp.counters();
            stats.spans_queued_otlp = c.queued;
            stats.spans_sent_otlp = c.sent;
            stats.spans_dropped += c.dropped;
            stats.resources = c.resources;
            stats.spans_dropped_queue_full = c.queue_full;
            stats.spans_dropped_export_failed = c.failed_spans;
            stats.export_errors = c.failed_exports;
            stats.otlp_queue_len = c.queued.saturating_sub(c.sent + c.failed_spans);
        }
        stats
    }

    /// Flushes what is queued, waiting at most [`SHUTDOWN_TIMEOUT`], and stops; later spans
    /// are dropped. Blocks; call it while the runtime still runs (gRPC sends on it).
    pub fn shutdown(&self) {
        let on_worker = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if on_worker {
            // Called from async code: let the runtime move this worker's other tasks (such as
            // the gRPC connection the flush needs) elsewhere while we wait.
            tokio::task::block_in_place(|| self.shutdown_blocking());
        } else {
            self.shutdown_blocking();
        }
    }

    fn shutdown_blocking(&self) {
        let deadline = Instant::now() + SHUTDOWN_TIMEOUT;
        if let Some(otlp) = &self.otlp {
            otlp.shutdown(deadline);
        }
        if let Some(console) = &self.console {
            console.shutdown(deadline);
        }
        let stats = self.stats();
        tracing::debug!(?stats, "exporter stopped");
    }
}

#[cfg(test)]
mod tests;
