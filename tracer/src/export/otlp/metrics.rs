//! OTLP metrics export: the event loop hands a [`Snapshot`] every `--metrics-interval` to a
//! thread of its own (a bounded queue of [`QUEUE`]; a full queue drops the snapshot and counts
//! it), which encodes it ([`super::metrics_encode`]) and sends it to the traces' endpoint,
//! over gRPC (tonic, on the agent's runtime) or http/protobuf (`/v1/metrics`). A failed export
//! is counted and not retried: the next snapshot is cumulative and carries the same counts.

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
        mpsc::{self, Receiver, SyncSender},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant, SystemTime},
};

use prost::Message as _;

use super::{
    OtlpError, Settings,
    counters::RateLimit,
    metrics_encode::encode,
    transport::{Signal, Transport},
};
use crate::{cli::OtlpProtocol, metrics::Snapshot};

/// Snapshots waiting for the exporter thread.
pub const QUEUE: usize = 2;
/// Signal-specific endpoint, used verbatim when set (the OTLP exporter spec).
pub const OTEL_EXPORTER_OTLP_METRICS_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT";
const HTTP_METRICS_PATH: &str = "/v1/metrics";

/// Where metrics go: the metrics endpoint variable, else the configured (traces) endpoint
/// with the metrics path for http/protobuf. None: no endpoint known, no OTLP metrics.
pub fn metrics_endpoint(
    protocol: OtlpProtocol,
    configured: Option<&str>,
    env: impl Fn(&str) -> Option<String>,
) -> Option<String> {
    if let Some(ep) = env(OTEL_EXPORTER_OTLP_METRICS_ENDPOINT).filter(|v| !v.trim().is_empty()) {
        return Some(ep.trim().to_string());
    }
    let base = configured.map(str::trim).filter(|e| !e.is_empty())?;
    Some(match protocol {
        OtlpProtocol::Grpc => base.to_string(),
        OtlpProtocol::HttpProtobuf => {
            let base = base.trim_end_matches('/');
            let base = base.strip_suffix("/v1/traces").unwrap_or(base);
            if base.ends_with(HTTP_METRICS_PATH) {
                base.to_string()
            } else {
                format!("{base}{HTTP_METRICS_PATH}")
            }
        }
    })
}

/// Counters of the metrics exporter.
#[derive(Debug, Default)]
struct Counters {
    exports: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
}

/// (exports that succeeded, exports that failed, snapshots dropped on a full queue)
#[derive(Debug, Default, Clone, Copy)]
pub struct MetricsExportStats {
    pub exports: u64,
    pub failed: u64,
    pub dropped: u64,
}

/// The OTLP metrics exporter.
#[derive(Debug)]
pub struct MetricsSink {
    tx: Mutex<Option<SyncSender<Snapshot>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    counters: Arc<Counters>,
    endpoint: String,
}

impl MetricsSink {
    /// Called inside the agent's tokio runtime (gRPC runs on it).
    pub fn new(protocol: OtlpProtocol, endpoint: String, host: String) -> Result<Self, OtlpError> {
        // OTEL_EXPORTER_OTLP_[METRICS_]HEADERS and _TIMEOUT, as for spans.
        let settings =
            Settings::from_env("METRICS", Duration::ZERO, |name| std::env::var(name).ok());
        let transport = Transport::new_off_runtime(
            protocol,
            &endpoint,
            Signal::Metrics,
            settings.timeout,
            &settings.headers,
        )?;
        let counters = Arc::new(Counters::default());
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let handle = thread::Builder::new()
            .name("difytrace-metrics".into())
            .spawn({
                let counters = Arc::clone(&counters);
                move || run(&rx, transport, settings.timeout, &counters, &host)
            })
            .map_err(|source| OtlpError::Spawn {
                name: "difytrace-metrics",
                source,
            })?;
        Ok(Self {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(handle)),
            counters,
            endpoint,
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Never blocks: a full queue drops the snapshot (counted).
    pub fn send(&self, snapshot: Snapshot) {
        let tx = self.tx.lock().unwrap_or_else(PoisonError::into_inner);
        let queued = tx.as_ref().is_some_and(|tx| tx.try_send(snapshot).is_ok());
        if !queued {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn stats(&self) -> MetricsExportStats {
        MetricsExportStats {
            exports: self.counters.exports.load(Ordering::Relaxed),
            failed: self.counters.failed.load(Ordering::Relaxed),
            dropped: self.counters.dropped.load(Ordering::Relaxed),
        }
    }

    /// Sends what is queued (the caller queues a last snapshot first) and stops, by
    /// `deadline` at the latest. Blocks.
    pub fn shutdown(&self, deadline: Instant) {
        self.tx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(handle) = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            return;
        };
        while !handle.is_finished() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        if handle.is_finished() {
            let _ = handle.join();
        } else {
            tracing::warn!("OTLP metrics not flushed before the shutdown deadline");
        }
    }
}

fn run(
    rx: &Receiver<Snapshot>,
    mut transport: Transport,
    timeout: Duration,
    counters: &Counters,
    host: &str,
) {
    let agent_start = SystemTime::now();
    let warn = RateLimit::new(Duration::from_secs(30));
    while let Ok(snapshot) = rx.recv() {
        let request = encode(&snapshot, SystemTime::now(), agent_start, host);
        match transport.send(request.encode_to_vec(), timeout) {
            Ok(_reply) => {
                counters.exports.fetch_add(1, Ordering::Relaxed);
            }
            Err(err) => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = warn.check() {
                    tracing::warn!(error = %err, suppressed_failures = suppressed, "OTLP metrics export failed; this snapshot is dropped");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_endpoint_counts_failed_exports() {
        // Port 1 on loopback: nothing listens there, the connection is refused at once.
        let sink = MetricsSink::new(
            OtlpProtocol::HttpProtobuf,
            "http://127.0.0.1:1/v1/metrics".into(),
            "h".into(),
        )
        .expect("sink");
        sink.send(Snapshot::default());
        sink.shutdown(Instant::now() + Duration::from_secs(20));
        let stats = sink.stats();
        assert_eq!((stats.exports, stats.failed, stats.dropped), (0, 1, 0));
        sink.send(Snapshot::default());
        assert_eq!(
            sink.stats().dropped,
            1,
            "a snapshot after shutdown is dropped"
        );
    }

    #[test]
    fn endpoints() {
        let none = |_: &str| None;
        assert_eq!(
            metrics_endpoint(OtlpProtocol::HttpProtobuf, Some("http://h:4318/"), none).as_deref(),
            Some("http://h:4318/v1/metrics")
        );
        assert_eq!(
            metrics_endpoint(
                OtlpProtocol::HttpProtobuf,
                Some("http://h:4318/v1/traces"),
                none
            )
            .as_deref(),
            Some("http://h:4318/v1/metrics")
        );
        assert_eq!(
            metrics_endpoint(OtlpProtocol::Grpc, Some("http://h:4317"), none).as_deref(),
            Some("http://h:4317")
        );
        assert_eq!(metrics_endpoint(OtlpProtocol::Grpc, None, none), None);
        let env = |k: &str| {
            (k == OTEL_EXPORTER_OTLP_METRICS_ENDPOINT).then(|| "http://m:1/x".to_string())
        };
        assert_eq!(
            metrics_endpoint(OtlpProtocol::HttpProtobuf, Some("http://h:4318"), env).as_deref(),
            Some("http://m:1/x")
        );
    }
}
