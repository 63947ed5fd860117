//! Where spans go: the configured endpoint and the OTEL_EXPORTER_OTLP_* variables, resolved
//! per the OTLP exporter spec.

use std::env;

use super::{HTTP_TRACES_PATH, OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT};
use crate::cli::OtlpProtocol;

const DEFAULT_GRPC: &str = "http://localhost:4317";
const DEFAULT_HTTP: &str = "http://localhost:4318/v1/traces";

/// Where and how to send, after applying the precedence rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Target {
    pub(super) protocol: OtlpProtocol,
    /// The gRPC endpoint, or the full URL http/protobuf posts to.
    pub(super) url: String,
}

impl Target {
    /// Precedence: an endpoint given on the command line; the signal's variable (verbatim);
    /// the generic variable (a base URL for http/protobuf); the spec's default.
    pub(super) fn resolve(
        protocol: OtlpProtocol,
        configured: Option<&str>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Self {
        let configured = configured.map(str::trim).filter(|e| !e.is_empty());
        let env = |name: &str| {
            env(name)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let traces = env(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT);
        let generic = env(OTEL_EXPORTER_OTLP_ENDPOINT);
        // The configured endpoint is usually OTEL_EXPORTER_OTLP_ENDPOINT read by clap; the
        // spec lets the signal's variable win over that one.
        let base = match configured {
            Some(ep) if traces.is_some() && generic.as_deref() == Some(ep) => None,
            Some(ep) => Some(ep.to_string()),
            None if traces.is_some() => None,
            None => generic,
        };
        let url = match (base, traces) {
            (Some(base), _) => match protocol {
                OtlpProtocol::Grpc => base,
                OtlpProtocol::HttpProtobuf => http_traces_url(&base),
            },
            (None, Some(traces)) => traces,
            (None, None) => match protocol {
                OtlpProtocol::Grpc => DEFAULT_GRPC.to_string(),
                OtlpProtocol::HttpProtobuf => DEFAULT_HTTP.to_string(),
            },
        };
        Self { protocol, url }
    }
}

/// A base URL (the meaning of OTEL_EXPORTER_OTLP_ENDPOINT) with the signal path appended,
/// unless it is already there.
pub(super) fn http_traces_url(base: &str) -> String {
    let base = base.trim_end_matches('/');
    if base.ends_with(HTTP_TRACES_PATH) {
        base.to_string()
    } else {
        format!("{base}{HTTP_TRACES_PATH}")
    }
}

/// True when the environment alone asks for OTLP (no endpoint configured).
pub(crate) fn env_requests_otlp() -> bool {
    env::var(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT).is_ok_and(|v| !v.trim().is_empty())
}
