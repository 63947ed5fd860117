//! The OTEL_* variables of the span exporter, parsed. Pure: the environment comes in as a
//! function, so tests need not touch the process environment.

use std::time::Duration;

/// Spans held per resource unless `OTEL_BSP_MAX_QUEUE_SIZE` says otherwise.
pub(super) const DEFAULT_MAX_QUEUE: usize = 2048;
/// Spans per export unless `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` says otherwise (the spec's value).
pub(super) const DEFAULT_MAX_BATCH: usize = 512;
/// Longest one export may take unless `OTEL_EXPORTER_OTLP[_TRACES]_TIMEOUT` says otherwise.
pub(crate) const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

const OTEL_BSP_MAX_QUEUE_SIZE: &str = "OTEL_BSP_MAX_QUEUE_SIZE";
const OTEL_BSP_MAX_EXPORT_BATCH_SIZE: &str = "OTEL_BSP_MAX_EXPORT_BATCH_SIZE";
const OTEL_BSP_SCHEDULE_DELAY: &str = "OTEL_BSP_SCHEDULE_DELAY";
const OTEL_EXPORTER_OTLP_TIMEOUT: &str = "OTEL_EXPORTER_OTLP_TIMEOUT";
const OTEL_EXPORTER_OTLP_HEADERS: &str = "OTEL_EXPORTER_OTLP_HEADERS";

/// How spans are batched and sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Settings {
    /// Spans held per resource (waiting or kept from failed exports).
    pub(crate) max_queue: usize,
    /// Spans in one export request, at most.
    pub(crate) max_batch: usize,
    /// Longest a span waits before an export is due.
    pub(crate) schedule_delay: Duration,
    /// Longest one export may take.
    pub(crate) timeout: Duration,
    /// Extra request headers (gRPC metadata).
    pub(crate) headers: Vec<(String, String)>,
}

impl Settings {
    /// `signal` is `TRACES` or `METRICS`: its specific variables win over the generic ones.
    pub(crate) fn from_env(
        signal: &str,
        default_delay: Duration,
        env: impl Fn(&str) -> Option<String>,
    ) -> Self {
        let number = |name: &str| {
            env(name)
                .and_then(|v| v.trim().parse::<u64>().ok())
                .filter(|&n| n > 0)
        };
        let max_queue = number(OTEL_BSP_MAX_QUEUE_SIZE)
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(DEFAULT_MAX_QUEUE);
        // The spec: a batch larger than the queue is clamped to it.
        let max_batch = number(OTEL_BSP_MAX_EXPORT_BATCH_SIZE)
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(DEFAULT_MAX_BATCH)
            .min(max_queue);
        let schedule_delay = number(OTEL_BSP_SCHEDULE_DELAY)
            .map(Duration::from_millis)
            .unwrap_or(default_delay);
        let timeout = number(&format!("OTEL_EXPORTER_OTLP_{signal}_TIMEOUT"))
            .or_else(|| number(OTEL_EXPORTER_OTLP_TIMEOUT))
            .map(Duration::from_millis)
            .unwrap_or(DEFAULT_EXPORT_TIMEOUT);
        // The signal's list replaces the generic one, it is not merged with it.
        let headers = env(&format!("OTEL_EXPORTER_OTLP_{signal}_HEADERS"))
            .or_else(|| env(OTEL_EXPORTER_OTLP_HEADERS))
            .map(|v| key_values(&v))
            .unwrap_or_default();
        Self {
            max_queue,
            max_batch,
            schedule_delay,
            timeout,
            headers,
        }
    }
}

/// A `key1=value1,key2=value2` list (OTEL_RESOURCE_ATTRIBUTES, OTEL_EXPORTER_OTLP_HEADERS):
/// keys and values trimmed, values percent-decoded; entries without `=`, with an empty key
/// or a value that does not decode are skipped.
pub(crate) fn key_values(list: &str) -> Vec<(String, String)> {
    list.split(',')
        .filter_map(|entry| {
            let (key, value) = entry.split_once('=')?;
            let key = key.trim();
            if key.is_empty() {
                return None;
            }
            Some((key.to_string(), percent_decode(value.trim())?))
        })
        .collect()
}

/// `%XX` escapes decoded; None when an escape is malformed or the result is not UTF-8.
pub(crate) fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_value_lists() {
        assert_eq!(
            key_values(" a = 1 ,b=x%20y%2Cz,,bad, =v,c=%zz,d=%E2%9C%93"),
            vec![
                ("a".to_string(), "1".to_string()),
                ("b".to_string(), "x y,z".to_string()),
                ("d".to_string(), "✓".to_string()),
            ]
        );
        assert_eq!(key_values(""), vec![]);
        assert_eq!(percent_decode("100%"), None);
        assert_eq!(percent_decode("a%2"), None);
    }

    #[test]
    fn defaults_and_overrides() {
        let delay = Duration::from_secs(1);
        let s = Settings::from_env("TRACES", delay, |_| None);
        assert_eq!(
            s,
            Settings {
                max_queue: 2048,
                max_batch: 512,
                schedule_delay: delay,
                timeout: Duration::from_secs(10),
                headers: vec![],
            }
        );
        let env = |k: &str| {
            Some(
                match k {
                    "OTEL_BSP_MAX_QUEUE_SIZE" => "100",
                    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE" => "500",
                    "OTEL_BSP_SCHEDULE_DELAY" => "250",
                    "OTEL_EXPORTER_OTLP_TIMEOUT" => "2000",
                    "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT" => "3000",
                    "OTEL_EXPORTER_OTLP_HEADERS" => "generic=1",
                    "OTEL_EXPORTER_OTLP_TRACES_HEADERS" => "authorization=Bearer%20t",
                    _ => return None,
                }
                .to_string(),
            )
        };
        let s = Settings::from_env("TRACES", delay, env);
        assert_eq!(s.max_queue, 100);
        assert_eq!(s.max_batch, 100, "clamped to the queue");
        assert_eq!(s.schedule_delay, Duration::from_millis(250));
        assert_eq!(s.timeout, Duration::from_secs(3));
        assert_eq!(
            s.headers,
            vec![("authorization".to_string(), "Bearer t".to_string())]
        );
        let s = Settings::from_env("METRICS", delay, env);
        assert_eq!(s.timeout, Duration::from_secs(2));
        assert_eq!(s.headers, vec![("generic".to_string(), "1".to_string())]);
        let bad = |k: &str| (k == "OTEL_BSP_MAX_QUEUE_SIZE").then(|| "lots".to_string());
        assert_eq!(Settings::from_env("TRACES", delay, bad).max_queue, 2048);
    }
}
