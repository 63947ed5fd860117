//! The exporter thread: takes the batches of spans the event loop hands over, queues them per
//! resource ([`Batcher`]) and sends one request at a time when one is due, retrying what
//! failed with a backoff. Sends block this thread only; while one is under way new spans wait
//! in the channel (bounded by [`super::DISPATCH_QUEUE`] spans).

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
        mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError},
    },
    time::{Duration, Instant},
};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use prost::Message as _;

use super::{
    batcher::{Batch, Batcher},
    counters::Shared,
    transport::Transport,
};
use crate::{export::SHUTDOWN_TIMEOUT, span::model::FinishedSpan};

#[derive(Debug)]
pub(super) enum Msg {
    Spans(Vec<FinishedSpan>),
    Shutdown {
        deadline: Instant,
        done: SyncSender<()>,
    },
}

/// How one export went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// Nothing was queued.
    Idle,
    Delivered,
    /// Refused for good: its spans were dropped.
    Refused,
    /// Failed; its spans stay queued for a retry.
    Failed,
}

/// Owns the queues and the transport; runs on its own thread.
pub(super) struct Dispatcher {
    pub(super) batcher: Batcher,
    transport: Transport,
    shared: Arc<Shared>,
    /// Spans sent into the channel and not yet taken out (the sender's bound).
    in_channel: Arc<AtomicUsize>,
    timeout: Duration,
    sweep_interval: Duration,
    next_sweep: Instant,
    /// Size of the last request, to allocate the next one at once.
    last_request: usize,
}

impl Dispatcher {
    pub(super) fn new(
        batcher: Batcher,
        transport: Transport,
        shared: Arc<Shared>,
        in_channel: Arc<AtomicUsize>,
        timeout: Duration,
        sweep_interval: Duration,
    ) -> Self {
        Self {
            batcher,
            transport,
            shared,
            in_channel,
            timeout,
            sweep_interval,
            next_sweep: Instant::now() + sweep_interval,
            last_request: 0,
        }
    }

    pub(super) fn run(mut self, rx: &Receiver<Msg>) {
        loop {
            // Whatever is waiting first, so a request carries the newest spans too.
            loop {
                match rx.try_recv() {
                    Ok(msg) => {
                        if !self.handle(msg, rx) {
                            return;
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        // The sink was dropped without a shutdown.
                        self.flush(Instant::now() + SHUTDOWN_TIMEOUT);
                        return;
                    }
                }
            }
            let now = Instant::now();
            if now >= self.next_sweep {
                self.next_sweep = now + self.sweep_interval;
                self.batcher.sweep(now);
                self.publish_resources();
            }
            let due = self.batcher.next_export(now);
            if due.is_some_and(|due| due <= now) {
                self.export_once(now + self.timeout);
                continue;
            }
            // Nothing due: sleep until something is, a message comes, or the sweep.
            let wake = due.map_or(self.next_sweep, |d| d.min(self.next_sweep));
            match rx.recv_timeout(wake.saturating_duration_since(now)) {
                Ok(msg) => {
                    if !self.handle(msg, rx) {
                        return;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.flush(Instant::now() + SHUTDOWN_TIMEOUT);
                    return;
                }
            }
        }
    }

    /// False once the thread is to end.
    fn handle(&mut self, msg: Msg, rx: &Receiver<Msg>) -> bool {
        match msg {
            Msg::Spans(spans) => {
                self.admit(spans);
                true
            }
            Msg::Shutdown { deadline, done } => {
                // Spans that raced with the shutdown flag still get their chance.
                while let Ok(msg) = rx.try_recv() {
                    if let Msg::Spans(spans) = msg {
                        self.admit(spans);
                    }
                }
                self.flush(deadline);
                let _ = done.send(());
                false
            }
        }
    }

    pub(super) fn admit(&mut self, spans: Vec<FinishedSpan>) {
        self.in_channel.fetch_sub(spans.len(), Ordering::AcqRel);
        let now = Instant::now();
        for s in spans {
            self.batcher.admit(s, now, &self.shared);
        }
        self.publish_resources();
    }

    /// Sends the next batch, waiting at most until `deadline`.
    pub(super) fn export_once(&mut self, deadline: Instant) -> Outcome {
        let Some(batch) = self.batcher.next_batch() else {
            return Outcome::Idle;
        };
        let mut body = Vec::with_capacity(self.last_request);
        self.batcher.encode(&batch, &mut body);
        self.last_request = body.len();
        let now = Instant::now();
        let timeout = self.timeout.min(deadline.saturating_duration_since(now));
        let outcome = match self.transport.send(body, timeout) {
            Ok(reply) => {
                self.delivered(&batch, &reply);
                Outcome::Delivered
            }
            Err(error) => {
                self.shared.export_failed(batch.spans, &error);
                if error.retryable {
                    self.batcher.failed(&batch);
                    Outcome::Failed
                } else {
                    self.batcher.sent(&batch);
                    Outcome::Refused
                }
            }
        };
        self.batcher
            .attempted(outcome == Outcome::Delivered, Instant::now());
        outcome
    }

    fn delivered(&mut self, batch: &Batch, reply: &[u8]) {
        // A reply that does not decode still means the request was taken.
        let partial = ExportTraceServiceResponse::decode(reply)
            .ok()
            .and_then(|r| r.partial_success);
        let (rejected, message) = partial.map_or((0, String::new()), |p| {
            (
                usize::try_from(p.rejected_spans).unwrap_or(0),
                p.error_message,
            )
        });
        self.shared.export_ok(batch.spans, rejected, &message);
        self.batcher.sent(batch);
    }

    /// Sends everything queued until done, the backend fails, or `deadline`; what is left is
    /// dropped and counted.
    pub(super) fn flush(&mut self, deadline: Instant) {
        while Instant::now() < deadline {
            match self.export_once(deadline) {
                Outcome::Idle | Outcome::Failed => break,
                Outcome::Delivered | Outcome::Refused => {}
            }
        }
        let left = self.batcher.clear();
        self.shared
            .drop_queued(left, "not delivered before the shutdown deadline");
        self.publish_resources();
    }

    fn publish_resources(&self) {
        self.shared
            .resources
            .store(self.batcher.resources() as u64, Ordering::Relaxed);
    }
}
