//! Sends encoded OTLP export requests, for spans and metrics alike: gRPC (tonic, on the
//! agent's runtime) or http/protobuf (reqwest's blocking client). Bodies go out as bytes
//! already encoded, so a request that fails can be sent again without copying what it was
//! built from.

use std::{thread, time::Duration};

use http::{HeaderMap, HeaderName, HeaderValue, uri::PathAndQuery};
use prost::bytes::{Buf as _, BufMut as _};
use tonic::{
    Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    metadata::MetadataMap,
    transport::Channel,
};

use super::OtlpError;
use crate::cli::OtlpProtocol;

/// Which export service a transport talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Signal {
    Traces,
    Metrics,
}

impl Signal {
    fn grpc_path(self) -> &'static str {
        match self {
            Signal::Traces => "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
            Signal::Metrics => "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
        }
    }
}

/// A failed send.
#[derive(Debug, Clone)]
pub(crate) struct SendError {
    pub(crate) message: String,
    /// The OTLP spec's retryable failures (the backend is unreachable, overloaded or slow);
    /// the others mean the request itself is refused and sending it again cannot help.
    pub(crate) retryable: bool,
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// One connection to the backend. Owned by one exporter thread; `send` blocks it.
pub(crate) enum Transport {
    Grpc {
        grpc: tonic::client::Grpc<Channel>,
        runtime: tokio::runtime::Handle,
        path: PathAndQuery,
        metadata: MetadataMap,
    },
    Http {
        client: reqwest::blocking::Client,
        url: String,
        headers: HeaderMap,
    },
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Transport::Grpc { path, .. } => write!(f, "Transport::Grpc({path})"),
            Transport::Http { url, .. } => write!(f, "Transport::Http({url})"),
        }
    }
}

impl Transport {
    /// gRPC needs `runtime` (its connection tasks run there). The HTTP client must not be
    /// created inside an async context: call this from a plain thread.
    pub(crate) fn new(
        protocol: OtlpProtocol,
        url: &str,
        signal: Signal,
        timeout: Duration,
        headers: &[(String, String)],
        runtime: Option<tokio::runtime::Handle>,
    ) -> Result<Self, OtlpError> {
        let headers = header_map(headers);
        match protocol {
            OtlpProtocol::Grpc => {
                let runtime = runtime.ok_or(OtlpError::NoRuntime)?;
                let channel = {
                    let _guard = runtime.enter();
                    Channel::from_shared(url.to_string())
                        .map_err(|e| OtlpError::Endpoint(format!("{url}: {e}")))?
                        .timeout(timeout)
                        .connect_lazy()
                };
                Ok(Transport::Grpc {
                    grpc: tonic::client::Grpc::new(channel),
                    runtime,
                    path: PathAndQuery::from_static(signal.grpc_path()),
                    metadata: MetadataMap::from_headers(headers),
                })
            }
            OtlpProtocol::HttpProtobuf => {
                let parsed = reqwest::Url::parse(url)
                    .map_err(|e| OtlpError::Endpoint(format!("{url}: {e}")))?;
                if !matches!(parsed.scheme(), "http" | "https") {
                    return Err(OtlpError::Endpoint(format!("{url}: not an http(s) URL")));
                }
                let client = reqwest::blocking::Client::builder()
                    .timeout(timeout)
                    .user_agent(concat!("difytrace/", env!("CARGO_PKG_VERSION")))
                    .build()
                    .map_err(|e| OtlpError::Endpoint(e.to_string()))?;
                Ok(Transport::Http {
                    client,
                    url: url.to_string(),
                    headers,
                })
            }
        }
    }

    /// Builds the transport on a short-lived plain thread, for callers inside the runtime.
    pub(crate) fn new_off_runtime(
        protocol: OtlpProtocol,
        url: &str,
        signal: Signal,
        timeout: Duration,
        headers: &[(String, String)],
    ) -> Result<Self, OtlpError> {
        let runtime = tokio::runtime::Handle::try_current().ok();
        thread::scope(|s| {
            s.spawn(|| Self::new(protocol, url, signal, timeout, headers, runtime))
                .join()
        })
        .map_err(|_| OtlpError::Panicked)?
    }

    /// Sends one encoded export request and returns the encoded response, waiting at most
    /// `timeout`.
    pub(crate) fn send(&mut self, body: Vec<u8>, timeout: Duration) -> Result<Vec<u8>, SendError> {
        match self {
            Transport::Grpc {
                grpc,
                runtime,
                path,
                metadata,
            } => {
                let call = async {
                    grpc.ready().await.map_err(|e| SendError {
                        message: format!("connection: {e}"),
                        retryable: true,
                    })?;
                    let mut request = tonic::Request::new(body);
                    *request.metadata_mut() = metadata.clone();
                    grpc.unary(request, path.clone(), RawCodec)
                        .await
                        .map(tonic::Response::into_inner)
                        .map_err(|status| SendError {
                            message: format!("{:?}: {}", status.code(), status.message()),
                            retryable: grpc_retryable(status.code()),
                        })
                };
                runtime
                    .block_on(async { tokio::time::timeout(timeout, call).await })
                    .map_err(|_| SendError {
                        message: "timed out".into(),
                        retryable: true,
                    })?
            }
            Transport::Http {
                client,
                url,
                headers,
            } => {
                let response = client
                    .post(url.as_str())
                    .headers(headers.clone())
                    .header("content-type", "application/x-protobuf")
                    .timeout(timeout)
                    .body(body)
                    .send()
                    .map_err(|e| SendError {
                        message: error_chain(&e),
                        retryable: true,
                    })?;
                let status = response.status();
                if !status.is_success() {
                    return Err(SendError {
                        message: format!("HTTP {status}"),
                        retryable: matches!(status.as_u16(), 429 | 502 | 503 | 504),
                    });
                }
                response.bytes().map(|b| b.to_vec()).map_err(|e| SendError {
                    message: format!("reading the response: {}", error_chain(&e)),
                    retryable: true,
                })
            }
        }
    }
}

/// The spec's retryable gRPC codes, and Unknown: tonic reports some broken connections so.
fn grpc_retryable(code: tonic::Code) -> bool {
    use tonic::Code;
    matches!(
        code,
        Code::Cancelled
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::OutOfRange
            | Code::Unavailable
            | Code::DataLoss
            | Code::Unknown
    )
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// Headers from OTEL_EXPORTER_OTLP_*HEADERS; ones HTTP cannot carry are skipped with a warning.
fn header_map(pairs: &[(String, String)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (key, value) in pairs {
        match (
            HeaderName::from_bytes(key.to_ascii_lowercase().as_bytes()),
            HeaderValue::from_str(value),
        ) {
            (Ok(name), Ok(value)) => {
                map.append(name, value);
            }
            _ => tracing::warn!(header = %key, "OTLP header ignored: not a valid HTTP header"),
        }
    }
    map
}

/// Passes already encoded messages through, and hands back the encoded reply.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}
