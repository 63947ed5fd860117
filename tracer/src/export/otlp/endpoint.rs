//! Where spans go: the configured endpoint and the OTEL_EXPORTER_OTLP_* variables, resolved.

use std::env;

use super::{HTTP_TRACES_PATH, OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT};
use crate::cli::OtlpProtocol;

/// Where and how to send, after applying the precedence rules; `endpoint: None` leaves the
/// endpoint to the crate (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_EXPORTER_OTLP_ENDPOINT,
/// default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Target {
    pub(super) protocol: OtlpProtocol,
    pub(super) endpoint: Option<String>,
}

impl Target {
    pub(super) fn resolve(
        protocol: OtlpProtocol,
        configured: Option<&str>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Self {
        let configured = configured.map(str::trim).filter(|e| !e.is_empty());
        let env = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        let endpoint = match configured {
            // The configured endpoint is usually OTEL_EXPORTER_OTLP_ENDPOINT read by clap. The
            // spec lets the signal-specific variable win over that one, so in that case the
            // crate resolves it (verbatim, no path appended).
            Some(ep)
                if env(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT).is_some()
                    && env(OTEL_EXPORTER_OTLP_ENDPOINT).as_deref().map(str::trim) == Some(ep) =>
            {
                None
            }
            Some(ep) => Some(match protocol {
                OtlpProtocol::Grpc => ep.to_string(),
                OtlpProtocol::HttpProtobuf => http_traces_url(ep),
            }),
            None => None,
        };
        Self { protocol, endpoint }
    }
}

/// The configured endpoint has the meaning of OTEL_EXPORTER_OTLP_ENDPOINT: a base URL to which
/// the signal path is appended. The crate posts to a programmatic endpoint verbatim, so the
/// path is appended here unless it is already there.
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
