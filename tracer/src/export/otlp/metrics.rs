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

use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, metrics_service_client::MetricsServiceClient,
};
use prost::Message as _;

use super::{OtlpError, counters::RateLimit, metrics_encode::encode};
use crate::{cli::OtlpProtocol, metrics::Snapshot};

/// Snapshots waiting for the exporter thread.
pub const QUEUE: usize = 2;
/// Longest one export may take.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
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

enum Transport {
    Grpc {
        client: MetricsServiceClient<tonic::transport::Channel>,
        runtime: tokio::runtime::Handle,
    },
    Http {
        client: reqwest::blocking::Client,
        url: String,
    },
}

impl Transport {
    fn send(&mut self, request: ExportMetricsServiceRequest) -> Result<(), String> {
        match self {
            Transport::Grpc { client, runtime } => {
                let call = client.export(request);
                runtime
                    .block_on(async { tokio::time::timeout(EXPORT_TIMEOUT, call).await })
                    .map_err(|_| "timed out".to_string())?
                    .map(drop)
                    .map_err(|status| format!("{}: {}", status.code(), status.message()))
            }
            Transport::Http { client, url } => {
                let response = client
                    .post(url.as_str())
                    .header("content-type", "application/x-protobuf")
                    .body(request.encode_to_vec())
                    .send()
                    .map_err(|e| e.to_string())?;
                if response.status().is_success() {
                    Ok(())
                } else {
                    Err(format!("HTTP {}", response.status()))
                }
            }
        }
    }
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
        let transport = match protocol {
            OtlpProtocol::Grpc => {
                let runtime =
                    tokio::runtime::Handle::try_current().map_err(|_| OtlpError::NoRuntime)?;
                let channel = {
                    let _guard = runtime.enter();
                    tonic::transport::Channel::from_shared(endpoint.clone())
                        .map_err(|e| OtlpError::Endpoint(e.to_string()))?
                        .timeout(EXPORT_TIMEOUT)
                        .connect_lazy()
                };
                Transport::Grpc {
                    client: MetricsServiceClient::new(channel),
                    runtime,
                }
            }
            OtlpProtocol::HttpProtobuf => {
                // Built on a plain thread: the blocking client must not be created or dropped
                // inside the async context the caller is in.
                let client = thread::scope(|s| {
                    s.spawn(|| {
                        reqwest::blocking::Client::builder()
                            .timeout(EXPORT_TIMEOUT)
                            .build()
                    })
                    .join()
                })
                .map_err(|_| OtlpError::Panicked)?
                .map_err(|e| OtlpError::Endpoint(e.to_string()))?;
                Transport::Http {
                    client,
                    url: endpoint.clone(),
                }
            }
        };
        let counters = Arc::new(Counters::default());
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let handle = thread::Builder::new()
            .name("difytrace-metrics".into())
            .spawn({
                let counters = Arc::clone(&counters);
                move || run(&rx, transport, &counters, &host)
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

fn run(rx: &Receiver<Snapshot>, mut transport: Transport, counters: &Counters, host: &str) {
    let agent_start = SystemTime::now();
    let warn = RateLimit::new(Duration::from_secs(30));
    while let Ok(snapshot) = rx.recv() {
        let request = encode(&snapshot, SystemTime::now(), agent_start, host);
        match transport.send(request) {
            Ok(()) => {
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
