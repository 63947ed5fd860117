//! The dispatcher thread: routes each span to its resource's pipeline, creating pipelines on
//! first use and retiring the least recently used and the idle ones.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::Ordering,
        mpsc::{Receiver, RecvTimeoutError, SyncSender},
    },
    thread,
    time::{Duration, Instant},
};

use opentelemetry::InstrumentationScope;
use opentelemetry_sdk::trace::SpanProcessor as _;

use super::{
    MAX_RESOURCES, RESOURCE_IDLE_TIMEOUT, SWEEP_INTERVAL,
    counters::Shared,
    pipeline::{Entry, Factory},
    scope, to_span_data,
};
use crate::{
    export::SHUTDOWN_TIMEOUT,
    span::model::{FinishedSpan, ProcessResource},
};

/// How often resources with spans of failed exports and no new traffic get them re-queued.
const REQUEUE_INTERVAL: Duration = Duration::from_secs(1);

/// Bounds of the resource table (constants in production, small in tests).
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub(super) max_resources: usize,
    pub(super) idle_timeout: Duration,
    pub(super) sweep_interval: Duration,
}

impl Limits {
    pub(super) const DEFAULT: Self = Self {
        max_resources: MAX_RESOURCES,
        idle_timeout: RESOURCE_IDLE_TIMEOUT,
        sweep_interval: SWEEP_INTERVAL,
    };
}

#[derive(Debug)]
pub(super) enum Msg {
    Span(FinishedSpan),
    Shutdown {
        deadline: Instant,
        done: SyncSender<()>,
    },
}

/// Owns the per-resource pipelines; runs on its own thread.
pub(super) struct Dispatcher {
    factory: Factory,
    shared: Arc<Shared>,
    limits: Limits,
    pub(super) entries: HashMap<ProcessResource, Entry>,
    scope: InstrumentationScope,
    next_sweep: Instant,
    next_requeue: Instant,
}

impl Dispatcher {
    pub(super) fn new(factory: Factory, shared: Arc<Shared>, limits: Limits) -> Self {
        Self {
            factory,
            shared,
            limits,
            entries: HashMap::new(),
            scope: scope(),
            next_sweep: Instant::now() + limits.sweep_interval,
            next_requeue: Instant::now() + REQUEUE_INTERVAL,
        }
    }

    pub(super) fn run(mut self, rx: &Receiver<Msg>) {
        loop {
            let wait = self
                .next_sweep
                .min(self.next_requeue)
                .saturating_duration_since(Instant::now());
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
                    shutdown_all(entries, Instant::now() + SHUTDOWN_TIMEOUT);
                    return;
                }
            }
            let now = Instant::now();
            if now >= self.next_requeue {
                self.next_requeue = now + REQUEUE_INTERVAL;
                self.requeue_held();
            }
            if now >= self.next_sweep {
                self.next_sweep = now + self.limits.sweep_interval;
                self.sweep(now);
            }
        }
    }

    pub(super) fn handle(&mut self, span: FinishedSpan) {
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

    /// Spans kept from failed exports ride along with the next batch; a resource that gets
    /// no new span would hold them until it is retired. Those go back into their processor
    /// (whose next export sends them, or keeps them again while the backend is still down).
    pub(super) fn requeue_held(&mut self) {
        for entry in self.entries.values() {
            if entry.in_processor.load(Ordering::Acquire) > 0 {
                // A batch is coming anyway and takes the held spans with it.
                continue;
            }
            let held = entry.retry.take();
            if held.is_empty() {
                continue;
            }
            tracing::debug!(
                spans = held.len(),
                "re-queueing spans of failed OTLP exports"
            );
            entry.in_processor.fetch_add(held.len(), Ordering::AcqRel);
            for span in held {
                entry.processor.on_end(span);
            }
        }
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

    pub(super) fn sweep(&mut self, now: Instant) {
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
            .spawn(move || shutdown_all(entries, Instant::now() + SHUTDOWN_TIMEOUT));
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
pub(super) fn shutdown_all(entries: Vec<Entry>, deadline: Instant) {
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
