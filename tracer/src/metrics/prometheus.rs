//! The Prometheus text exposition format (version 0.0.4) of a [`Snapshot`].
//!
//! OTel names map the way the OTel Prometheus exporter maps them: dots become underscores,
//! the unit `s` adds `_seconds`, counters end in `_total`; the service becomes the
//! `service_name` label.

use std::fmt::Write as _;

use super::{
    Snapshot,
    self_telemetry::SelfKind,
    store::{Family, Kind, Value},
};

/// Content type of the exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Prometheus name of an OTel metric.
pub fn metric_name(family: &Family) -> String {
    let mut name = sanitize(family.name);
    if family.unit == "s" && !name.ends_with("_seconds") {
        name.push_str("_seconds");
    }
    if family.kind == Kind::Counter && !name.ends_with("_total") {
        name.push_str("_total");
    }
    name
}

/// `[a-zA-Z0-9_]` only (a leading digit gets a `_`).
pub fn sanitize(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

fn escape(value: &str, out: &mut String) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// `{a="x",b="y"}` (empty when there are no labels).
fn labels<'a>(
    pairs: impl IntoIterator<Item = (String, &'a str)>,
    extra: Option<(&str, &str)>,
) -> String {
    let mut out = String::new();
    for (k, v) in pairs
        .into_iter()
        .map(|(k, v)| (k, v.to_string()))
        .chain(extra.map(|(k, v)| (k.to_string(), v.to_string())))
    {
        out.push(if out.is_empty() { '{' } else { ',' });
        out.push_str(&k);
        out.push_str("=\"");
        escape(&v, &mut out);
        out.push('"');
    }
    if !out.is_empty() {
        out.push('}');
    }
    out
}

fn number(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn render_family(family: &Family, out: &mut String) {
    if family.series.is_empty() {
        return;
    }
    let name = metric_name(family);
    let kind = match family.kind {
        Kind::Counter => "counter",
        Kind::Histogram(_) => "histogram",
    };
    let _ = writeln!(out, "# HELP {name} {}", family.description);
    let _ = writeln!(out, "# TYPE {name} {kind}");
    let mut series: Vec<_> = family.series.iter().collect();
    series.sort_by(|a, b| a.0.cmp(b.0));
    for (key, value) in series {
        let attr_values: Vec<(String, String)> = key
            .attrs
            .iter()
            .map(|(k, v)| (sanitize(k), v.to_string()))
            .collect();
        let service = (!key.service.is_empty())
            .then(|| ("service_name".to_string(), key.service.to_string()));
        let pairs: Vec<(String, String)> = service.into_iter().chain(attr_values).collect();
        let pairs = || pairs.iter().map(|(k, v)| (k.clone(), v.as_str()));
        match value {
            Value::Counter(c) => {
                let _ = writeln!(out, "{name}{} {}", labels(pairs(), None), number(*c));
            }
            Value::Histogram(h) => {
                let Kind::Histogram(bounds) = family.kind else {
                    continue;
                };
                let mut cumulative = 0u64;
                for (i, n) in h.buckets.iter().enumerate() {
                    cumulative += n;
                    let le = bounds
                        .get(i)
                        .map_or_else(|| "+Inf".to_string(), |b| number(*b));
                    let _ = writeln!(
                        out,
                        "{name}_bucket{} {cumulative}",
                        labels(pairs(), Some(("le", &le)))
                    );
                }
                let l = labels(pairs(), None);
                let _ = writeln!(out, "{name}_sum{l} {}", number(h.sum));
                let _ = writeln!(out, "{name}_count{l} {}", h.count);
            }
        }
    }
}

/// The whole exposition: span-derived metrics, then self-telemetry.
pub fn render(snapshot: &Snapshot) -> String {
    let mut out = String::with_capacity(16 * 1024);
    for family in &snapshot.families {
        render_family(family, &mut out);
    }
    let metrics = snapshot.self_stats.metrics();
    let mut seen: Vec<&str> = Vec::new();
    for m in &metrics {
        let name = m.name.as_ref();
        if seen.contains(&name) {
            continue;
        }
        seen.push(name);
        let kind = match m.kind {
            SelfKind::Counter => "counter",
            SelfKind::Gauge => "gauge",
        };
        let _ = writeln!(out, "# HELP {name} {}", m.help);
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for same in metrics.iter().filter(|o| o.name == m.name) {
            let l = labels(
                same.labels.iter().map(|(k, v)| (k.to_string(), v.as_str())),
                None,
            );
            let _ = writeln!(out, "{name}{l} {}", number(same.value));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::SystemTime};

    use super::*;
    use crate::metrics::{
        self_telemetry::SelfStats,
        store::{DURATION_BOUNDS, LabelValue, SeriesKey},
    };

    #[test]
    fn histogram_and_counter_exposition() {
        let mut h = Family::new(
            "http.server.request.duration",
            "d",
            "s",
            Kind::Histogram(DURATION_BOUNDS),
            10,
            SystemTime::UNIX_EPOCH,
        );
        let key = SeriesKey {
            service: Arc::from("api"),
            attrs: vec![
                ("http.request.method", LabelValue::Str("GET".into())),
                ("http.route", LabelValue::Str("/a\"b\\".into())),
                ("http.response.status_code", LabelValue::Int(200)),
            ],
        };
        h.record(key.clone(), 0.003);
        h.record(key, 0.2);
        let mut c = Family::new(
            "traces_service_graph_request_total",
            "r",
            "1",
            Kind::Counter,
            10,
            SystemTime::UNIX_EPOCH,
        );
        c.add(
            SeriesKey {
                service: Arc::from(""),
                attrs: vec![
                    ("client", LabelValue::Str("a".into())),
                    ("server", LabelValue::Str("b".into())),
                ],
            },
            3.0,
        );
        let mut stats = SelfStats::default();
        stats.push("data_events", 5);
        stats.push("control_events", 1);
        let text = render(&Snapshot {
            families: vec![h, c],
            self_stats: stats,
        });
        let l = r#"service_name="api",http_request_method="GET",http_route="/a\"b\\",http_response_status_code="200""#;
        assert!(
            text.contains("# TYPE http_server_request_duration_seconds histogram\n"),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "http_server_request_duration_seconds_bucket{{{l},le=\"0.005\"}} 1\n"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "http_server_request_duration_seconds_bucket{{{l},le=\"0.25\"}} 2\n"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "http_server_request_duration_seconds_bucket{{{l},le=\"+Inf\"}} 2\n"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "http_server_request_duration_seconds_count{{{l}}} 2\n"
            )),
            "{text}"
        );
        assert!(
            text.contains("traces_service_graph_request_total{client=\"a\",server=\"b\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE difytrace_events_total counter\ndifytrace_events_total{kind=\"data\"} 5\ndifytrace_events_total{kind=\"control\"} 1\n"), "{text}");
        assert_eq!(text.matches("# TYPE difytrace_events_total").count(), 1);
    }
}
