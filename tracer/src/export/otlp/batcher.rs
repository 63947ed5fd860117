//! Spans waiting for export, one queue per traced process (OTLP resource), and the choice
//! of what goes into the next request and when. No I/O: the exporter thread
//! ([`super::dispatch`]) sends what [`Batcher::next_batch`] picks and reports back.
//!
//! Each queue holds at most `max_queue` spans, new ones and those of failed exports alike
//! (the first `held` of a queue were in a failed request). A full queue while exports fail
//! drops its oldest span for the new one (outage: the newest are worth more); a full queue
//! while exports work rejects the new span (the backend is slower than the traffic).

use std::{
    collections::VecDeque,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use opentelemetry_proto::tonic::{
    common::v1::InstrumentationScope, resource::v1::Resource, trace::v1::Span,
};

use super::{
    counters::Shared,
    span_encode::{encode_request, resource, span},
};
use crate::{
    fast_map::HashMap,
    span::model::{FinishedSpan, ProcessResource},
};

/// First wait after a failed export before spans of failed exports alone are sent again.
pub(super) const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Longest such wait.
pub(super) const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Sizes and delays, fixed at start.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub(super) max_queue: usize,
    pub(super) max_batch: usize,
    pub(super) schedule_delay: Duration,
    pub(super) max_resources: usize,
    pub(super) idle_timeout: Duration,
}

/// One traced process's spans.
#[derive(Debug)]
struct Queue {
    /// Built once, sent with every request that has spans of this process.
    resource: Resource,
    /// Oldest first, with the time each was queued.
    spans: VecDeque<(Instant, Span)>,
    /// How many of the front spans were in a failed request.
    held: usize,
    last_used: Instant,
}

impl Queue {
    /// When the oldest span never tried yet was queued.
    fn oldest_fresh(&self) -> Option<Instant> {
        self.spans.get(self.held).map(|(t, _)| *t)
    }
}

/// What one request carries: that many spans from the front of each named queue.
#[derive(Debug, Default)]
pub(super) struct Batch {
    parts: Vec<(Arc<ProcessResource>, usize)>,
    pub(super) spans: usize,
}

/// The queues of every traced process.
#[derive(Debug)]
pub(super) struct Batcher {
    limits: Limits,
    queues: HashMap<Arc<ProcessResource>, Queue>,
    /// OTEL_RESOURCE_ATTRIBUTES, parsed once.
    env_attrs: Vec<(String, String)>,
    scope: InstrumentationScope,
    /// Exports are failing: when the last one was tried, and when spans of failed exports
    /// alone are worth another try.
    last_attempt: Option<Instant>,
    retry_at: Option<Instant>,
    backoff: Duration,
}

impl Batcher {
    pub(super) fn new(limits: Limits, env_attrs: Vec<(String, String)>) -> Self {
        Self {
            limits,
            queues: HashMap::default(),
            env_attrs,
            scope: super::span_encode::scope(),
            last_attempt: None,
            retry_at: None,
            backoff: Duration::ZERO,
        }
    }

    fn failing(&self) -> bool {
        self.retry_at.is_some()
    }

    pub(super) fn resources(&self) -> usize {
        self.queues.len()
    }

    /// Spans queued in all.
    pub(super) fn pending(&self) -> usize {
        self.queues.values().map(|q| q.spans.len()).sum()
    }

    /// Queues `s` (or drops it, counted in `shared`).
    pub(super) fn admit(&mut self, s: FinishedSpan, now: Instant, shared: &Shared) {
        let failing = self.failing();
        let max_queue = self.limits.max_queue;
        // One lookup for the common case: the process is known.
        let queue = match self.queues.get_mut(&*s.resource) {
            Some(queue) => queue,
            None => self.new_queue(&s.resource, now, shared),
        };
        queue.last_used = now;
        if queue.spans.len() >= max_queue {
            if !failing && queue.held == 0 {
                shared.drop_spans(1, "per-resource queue full");
                return;
            }
            queue.spans.pop_front();
            queue.held = queue.held.saturating_sub(1);
            shared.drop_queued(
                1,
                "backend unreachable and the queue full: oldest span dropped",
            );
        }
        queue.spans.push_back((now, span(s)));
        shared.queued.fetch_add(1, Ordering::Relaxed);
    }

    fn new_queue(
        &mut self,
        process: &Arc<ProcessResource>,
        now: Instant,
        shared: &Shared,
    ) -> &mut Queue {
        if self.queues.len() >= self.limits.max_resources {
            self.evict_lru(shared);
        }
        tracing::debug!(service = %process.service_name, pid = process.pid, "new OTLP resource");
        self.queues.entry(Arc::clone(process)).or_insert(Queue {
            resource: resource(process, &self.env_attrs),
            spans: VecDeque::new(),
            held: 0,
            last_used: now,
        })
    }

    /// When the next export is due (`now` at the latest when it is due already); None when
    /// nothing is queued.
    pub(super) fn next_export(&self, now: Instant) -> Option<Instant> {
        let mut fresh = 0;
        let mut held = 0;
        let mut oldest_fresh: Option<Instant> = None;
        for q in self.queues.values() {
            held += q.held;
            fresh += q.spans.len() - q.held;
            if let Some(t) = q.oldest_fresh() {
                oldest_fresh = Some(oldest_fresh.map_or(t, |o| o.min(t)));
            }
        }
        let fresh_due = oldest_fresh.map(|t| t + self.limits.schedule_delay);
        match (self.retry_at, self.last_attempt) {
            (Some(retry_at), last) => {
                // Failing: spans of failed exports wait for the backoff; new spans try at
                // most once per schedule delay ("the next flush"), however many there are.
                let flush = fresh_due
                    .map(|due| last.map_or(due, |l| due.max(l + self.limits.schedule_delay)));
                let retry = (held > 0).then_some(retry_at);
                match (flush, retry) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
            // Working again with spans of failed exports left, or a full batch: now.
            (None, _) if held > 0 || fresh >= self.limits.max_batch => Some(now),
            (None, _) => fresh_due,
        }
    }

    /// The spans of the next request, oldest queues first, at most `max_batch`; None when
    /// nothing is queued. The spans stay queued until [`Batcher::sent`] or
    /// [`Batcher::failed`].
    pub(super) fn next_batch(&self) -> Option<Batch> {
        let mut queues: Vec<(&Arc<ProcessResource>, &Queue)> = self
            .queues
            .iter()
            .filter(|(_, q)| !q.spans.is_empty())
            .collect();
        if queues.is_empty() {
            return None;
        }
        queues.sort_by_key(|(_, q)| q.spans.front().map(|(t, _)| *t));
        let mut batch = Batch::default();
        for (key, q) in queues {
            let take = q.spans.len().min(self.limits.max_batch - batch.spans);
            if take == 0 {
                break;
            }
            batch.parts.push((Arc::clone(key), take));
            batch.spans += take;
        }
        Some(batch)
    }

    /// Appends the encoded `ExportTraceServiceRequest` of `batch` to `out`.
    pub(super) fn encode(&self, batch: &Batch, out: &mut Vec<u8>) {
        let groups: Vec<(&Resource, Vec<&Span>)> = batch
            .parts
            .iter()
            .filter_map(|(key, n)| {
                let q = self.queues.get(key)?;
                Some((
                    &q.resource,
                    q.spans.iter().take(*n).map(|(_, s)| s).collect(),
                ))
            })
            .collect();
        encode_request(&self.scope, &groups, out);
    }

    /// The backend took the batch (or refused it for good): its spans leave the queues.
    pub(super) fn sent(&mut self, batch: &Batch) {
        for (key, n) in &batch.parts {
            if let Some(q) = self.queues.get_mut(key) {
                q.spans.drain(..(*n).min(q.spans.len()));
                q.held = q.held.saturating_sub(*n);
            }
        }
    }

    /// Bookkeeping of an attempt: `ok` resets the backoff.
    pub(super) fn attempted(&mut self, ok: bool, now: Instant) {
        if ok {
            self.retry_at = None;
            self.last_attempt = None;
            self.backoff = Duration::ZERO;
        } else {
            self.backoff = (self.backoff * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
            self.retry_at = Some(now + self.backoff);
            self.last_attempt = Some(now);
        }
    }

    /// The batch failed and may be sent again: its spans stay, marked as held.
    pub(super) fn failed(&mut self, batch: &Batch) {
        for (key, n) in &batch.parts {
            if let Some(q) = self.queues.get_mut(key) {
                q.held = q.held.max((*n).min(q.spans.len()));
            }
        }
    }

    /// Every queued span leaves, undelivered (shutdown); returns how many.
    pub(super) fn clear(&mut self) -> usize {
        let n = self.pending();
        self.queues.clear();
        n
    }

    /// Retires resources that queued nothing for the idle timeout and hold nothing
    /// (typically exited processes).
    pub(super) fn sweep(&mut self, now: Instant) {
        let before = self.queues.len();
        let idle = self.limits.idle_timeout;
        self.queues
            .retain(|_, q| !q.spans.is_empty() || now.duration_since(q.last_used) < idle);
        if self.queues.len() < before {
            tracing::debug!(
                count = before - self.queues.len(),
                "retiring idle OTLP resources"
            );
        }
    }

    /// Makes room for a new resource: the least recently used one without queued spans goes;
    /// if every one has spans, the least recently used one goes with its spans (counted).
    fn evict_lru(&mut self, shared: &Shared) {
        let lru = |empty_only: bool| {
            self.queues
                .iter()
                .filter(|(_, q)| !empty_only || q.spans.is_empty())
                .min_by_key(|(_, q)| q.last_used)
                .map(|(k, _)| Arc::clone(k))
        };
        let Some(key) = lru(true).or_else(|| lru(false)) else {
            return;
        };
        if let Some(q) = self.queues.remove(&key) {
            tracing::debug!(service = %key.service_name, pid = key.pid, spans = q.spans.len(), "OTLP resource limit reached; retiring the least recently used one");
            shared.drop_queued(q.spans.len(), "resource limit reached");
        }
    }

    #[cfg(test)]
    pub(super) fn held(&self, key: &ProcessResource) -> usize {
        self.queues.get(key).map_or(0, |q| q.held)
    }

    #[cfg(test)]
    pub(super) fn has(&self, key: &ProcessResource) -> bool {
        self.queues.contains_key(key)
    }
}
