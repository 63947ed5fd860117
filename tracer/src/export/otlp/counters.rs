//! Span counters and rate-limited warnings, shared by the caller, the dispatcher and the
//! exporters.

use std::{
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use opentelemetry_sdk::error::OTelSdkResult;

use super::WARN_INTERVAL;

/// Counters and warning limits shared by the caller, the dispatcher and the exporters.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) queued: AtomicU64,
    pub(super) sent: AtomicU64,
    pub(super) dropped: AtomicU64,
    pub(super) resources: AtomicU64,
    /// Of `dropped`: spans that found a queue full.
    pub(super) queue_full: AtomicU64,
    /// Of `dropped`: spans of exports that failed after the exporter's retries.
    pub(super) failed_spans: AtomicU64,
    /// Exports (batches) that failed.
    pub(super) failed_exports: AtomicU64,
    failing: AtomicBool,
    pub(super) export_warn: RateLimit,
    drop_warn: RateLimit,
}

impl Shared {
    pub(super) fn new() -> Self {
        Self {
            queued: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            resources: AtomicU64::new(0),
            queue_full: AtomicU64::new(0),
            failed_spans: AtomicU64::new(0),
            failed_exports: AtomicU64::new(0),
            failing: AtomicBool::new(false),
            export_warn: RateLimit::new(WARN_INTERVAL),
            drop_warn: RateLimit::new(WARN_INTERVAL),
        }
    }

    pub(super) fn drop_span(&self, why: &'static str) {
        let total = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        // The callers name the reason in words; both queues' reasons end the same way.
        if why.ends_with("queue full") {
            self.queue_full.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(suppressed) = self.drop_warn.check() {
            tracing::warn!(
                reason = why,
                dropped_total = total,
                suppressed,
                "OTLP export is dropping spans"
            );
        }
    }

    /// Exports are failing: batches are then kept for a retry.
    pub(super) fn is_failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }

    /// A failed export whose spans are kept for the next one, but for the `dropped` oldest
    /// that did not fit.
    pub(super) fn export_held(
        &self,
        spans: usize,
        dropped: usize,
        e: &opentelemetry_sdk::error::OTelSdkError,
    ) {
        self.failed_exports.fetch_add(1, Ordering::Relaxed);
        if dropped > 0 {
            self.dropped.fetch_add(dropped as u64, Ordering::Relaxed);
            self.failed_spans
                .fetch_add(dropped as u64, Ordering::Relaxed);
        }
        if let Some(suppressed) = self.export_warn.check() {
            tracing::warn!(
                error = %e,
                spans,
                dropped,
                suppressed_failures = suppressed,
                "OTLP export failed; spans kept for the next export, the oldest beyond the queue size dropped"
            );
        }
    }

    /// Held spans never delivered (the agent stops while the backend is down).
    pub(super) fn drop_held(&self, spans: usize) {
        self.dropped.fetch_add(spans as u64, Ordering::Relaxed);
        self.failed_spans.fetch_add(spans as u64, Ordering::Relaxed);
    }

    pub(super) fn export_done(&self, spans: usize, result: &OTelSdkResult) {
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
                self.failed_spans.fetch_add(spans as u64, Ordering::Relaxed);
                self.failed_exports.fetch_add(1, Ordering::Relaxed);
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
pub(super) struct RateLimit {
    base: Instant,
    interval_ms: u64,
    /// Milliseconds since `base` plus one of the last event let through; 0 = never.
    last_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimit {
    pub(super) fn new(interval: Duration) -> Self {
        Self {
            base: Instant::now(),
            interval_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
            last_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(events suppressed since the last one let through)` when this one may be logged.
    pub(super) fn check(&self) -> Option<u64> {
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
