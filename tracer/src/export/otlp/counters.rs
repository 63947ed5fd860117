//! Span counters and rate-limited warnings, shared by the caller and the exporter thread.

use std::{
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use super::{WARN_INTERVAL, transport::SendError};

/// Counters and warning limits shared by the caller and the exporter thread.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) queued: AtomicU64,
    pub(super) sent: AtomicU64,
    pub(super) dropped: AtomicU64,
    pub(super) resources: AtomicU64,
    /// Of `dropped`: spans that found a queue full.
    pub(super) queue_full: AtomicU64,
    /// Of `dropped`: queued spans that were not delivered (exports failing or refused).
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

    /// Spans lost before they were queued.
    pub(super) fn drop_spans(&self, spans: usize, why: &'static str) {
        if spans == 0 {
            return;
        }
        let total = self.dropped.fetch_add(spans as u64, Ordering::Relaxed) + spans as u64;
        // The callers name the reason in words; both queues' reasons end the same way.
        if why.ends_with("queue full") {
            self.queue_full.fetch_add(spans as u64, Ordering::Relaxed);
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

    /// Queued spans lost without being delivered: the oldest of a full queue while exports
    /// fail, spans of a request the backend refused for good, spans still held at shutdown.
    pub(super) fn drop_queued(&self, spans: usize, why: &'static str) {
        if spans == 0 {
            return;
        }
        let total = self.dropped.fetch_add(spans as u64, Ordering::Relaxed) + spans as u64;
        self.failed_spans.fetch_add(spans as u64, Ordering::Relaxed);
        if let Some(suppressed) = self.drop_warn.check() {
            tracing::warn!(
                reason = why,
                dropped_total = total,
                suppressed,
                "OTLP export is dropping spans"
            );
        }
    }

    /// An export the backend accepted, `rejected` of its `spans` excepted (partial success).
    pub(super) fn export_ok(&self, spans: usize, rejected: usize, message: &str) {
        let rejected = rejected.min(spans);
        self.sent
            .fetch_add((spans - rejected) as u64, Ordering::Relaxed);
        if self.failing.swap(false, Ordering::Relaxed) {
            tracing::info!("OTLP export works again");
        }
        if rejected > 0 {
            self.drop_queued(rejected, "rejected by the backend");
            if let Some(suppressed) = self.export_warn.check() {
                tracing::warn!(
                    spans,
                    rejected,
                    message,
                    suppressed_failures = suppressed,
                    "OTLP export partly rejected by the backend"
                );
            }
        }
    }

    /// A failed export. Retryable: its spans stay queued for the next attempt; otherwise they
    /// are dropped (the backend refuses them, sending them again cannot help).
    pub(super) fn export_failed(&self, spans: usize, error: &SendError) {
        self.failed_exports.fetch_add(1, Ordering::Relaxed);
        self.failing.store(true, Ordering::Relaxed);
        if !error.retryable {
            self.dropped.fetch_add(spans as u64, Ordering::Relaxed);
            self.failed_spans.fetch_add(spans as u64, Ordering::Relaxed);
        }
        if let Some(suppressed) = self.export_warn.check() {
            if error.retryable {
                tracing::warn!(
                    %error,
                    spans,
                    suppressed_failures = suppressed,
                    "OTLP export failed; spans kept for a retry, the oldest beyond the queue size dropped"
                );
            } else {
                tracing::warn!(
                    %error,
                    spans,
                    suppressed_failures = suppressed,
                    "OTLP export failed; spans dropped (the backend refused them)"
                );
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
