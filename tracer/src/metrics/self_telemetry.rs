//! The agent's own counters as one snapshot: the `stats` log line and the self-telemetry
//! metrics (Prometheus and OTLP) are both rendered from it, so a counter is read in one place.

use std::borrow::Cow;

/// Kind of a self-telemetry metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelfKind {
    Counter,
    Gauge,
}

/// One self-telemetry data point, named the Prometheus way (`difytrace_events_total`).
#[derive(Debug, Clone, PartialEq)]
pub struct SelfMetric {
    pub name: Cow<'static, str>,
    pub help: &'static str,
    pub kind: SelfKind,
    pub labels: Vec<(&'static str, String)>,
    pub value: f64,
}

/// Entries of one kernel map: how many now, how many it can hold, and for the LRU maps whose
/// churn is counted, how many it evicted since start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapOccupancy {
    pub name: String,
    pub entries: u64,
    pub capacity: u64,
    pub evicted: Option<u64>,
}

/// Every counter of the agent at one moment, in the order of the `stats` line.
#[derive(Debug, Clone, Default)]
pub struct SelfStats {
    /// `key=value` pairs of the stats line, in order.
    pub entries: Vec<(Cow<'static, str>, u64)>,
    pub maps: Vec<MapOccupancy>,
    /// Records per metric family that went to its overflow series.
    pub overflow: Vec<(&'static str, u64)>,
    pub rss_bytes: u64,
    pub cpu_seconds: f64,
}

/// Stats keys that are one kind of kernel event, with the `kind` label they get.
const EVENTS: [(&str, &str); 5] = [
    ("data_events", "data"),
    ("control_events", "control"),
    ("go_events", "go"),
    ("nginx_events", "nginx"),
    ("greenlet_switches", "greenlet_switch"),
];

/// Stats keys that count something lost, with the `reason` label they get.
const DROPS: [(&str, &str); 24] = [
    ("data_lost", "ring_full_data"),
    ("control_lost", "ring_full_control"),
    ("go_dropped", "ring_full_go"),
    ("nginx_dropped", "ring_full_nginx"),
    ("copy_failed", "copy_failed"),
    ("inflight_full", "inflight_map_full"),
    ("socket_map_full", "socket_map_full"),
    ("other_fd_map_full", "other_fd_map_full"),
    ("iovec_overflow", "iovec_overflow"),
    ("go_inflight_full", "go_inflight_map_full"),
    ("decode_errors", "decode_error"),
    ("lost_records", "sequence_hole"),
    ("stdio_lost_records", "stdio_sequence_hole"),
    ("parse_errors", "parser_error_http1"),
    ("h2_errors", "parser_error_http2"),
    ("conns_evicted", "connection_evicted"),
    ("unmatched_responses", "unmatched_response"),
    ("late_fallback", "late_fallback"),
    ("trace_facts_evicted", "trace_facts_evicted"),
    ("go_evicted", "goroutine_evicted"),
    ("go_grpc_evicted", "grpc_call_evicted"),
    ("export_queue_full", "export_queue_full"),
    ("export_failed", "export_failed"),
    ("graph_evicted", "service_graph_evicted"),
];

/// Stats keys that count the entries a kernel LRU map evicted, with the `map` label they get.
pub const MAP_EVICTIONS: [(&str, &str); 2] = [
    ("sockets_evicted", "SOCKETS"),
    ("other_fds_evicted", "OTHER_FDS"),
];

/// Stats keys that count spans written out, with the `exporter` label they get.
const EXPORTED: [(&str, &str); 2] = [("export_sent", "otlp"), ("console_written", "console")];

/// Stats keys that are a level, not a count.
const GAUGES: [&str; 15] = [
    "conns",
    "pending",
    "active_threads",
    "watched",
    "pipes",
    "plugin_open",
    "trace_facts",
    "late_held",
    "go_grpc_held",
    "resources",
    "otlp_queue",
    "tree_traces_held",
    "tree_spans_held",
    "graph_waiting",
    "go_binaries",
];

/// Sums of other keys (kept in the line for the bench): not exported twice.
const SUMS: [&str; 3] = ["events", "dropped", "export_dropped"];

impl SelfStats {
    pub fn push(&mut self, key: impl Into<Cow<'static, str>>, value: u64) {
        self.entries.push((key.into(), value));
    }

    /// Appends the `key=value` pairs of a line such as `a=1 b=2`; anything else is skipped.
    pub fn push_line(&mut self, line: &str) {
        for pair in line.split_whitespace() {
            if let Some((k, v)) = pair.split_once('=')
                && let Ok(v) = v.parse::<u64>()
            {
                self.push(k.to_string(), v);
            }
        }
    }

    pub fn get(&self, key: &str) -> Option<u64> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
    }

    /// The body of the `stats` log line: `key=value` pairs separated by spaces.
    pub fn line(&self) -> String {
        let mut out = String::with_capacity(self.entries.len() * 20);
        for (k, v) in &self.entries {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(k);
            out.push('=');
            out.push_str(&v.to_string());
        }
        out.push_str(&format!(
            " rss_bytes={} cpu_seconds={:.2}",
            self.rss_bytes, self.cpu_seconds
        ));
        out
    }

    /// The snapshot as metrics.
    pub fn metrics(&self) -> Vec<SelfMetric> {
        let mut out = Vec::with_capacity(self.entries.len() + 2 * self.maps.len() + 4);
        let metric = |name: Cow<'static, str>, help, kind, labels, value: u64| SelfMetric {
            name,
            help,
            kind,
            labels,
            value: value as f64,
        };
        for (key, value) in &self.entries {
            let key = key.as_ref();
            if SUMS.contains(&key) {
                continue;
            }
            if let Some((_, kind)) = EVENTS.iter().find(|(k, _)| *k == key) {
                out.push(metric(
                    "difytrace_events_total".into(),
                    "Records the kernel side produced, per kind.",
                    SelfKind::Counter,
                    vec![("kind", (*kind).to_string())],
                    *value,
                ));
            } else if let Some((_, reason)) = DROPS.iter().find(|(k, _)| *k == key) {
                out.push(metric(
                    "difytrace_drops_total".into(),
                    "Things lost, per reason (kernel maps and ring, parsers, tables, export).",
                    SelfKind::Counter,
                    vec![("reason", (*reason).to_string())],
                    *value,
                ));
            } else if let Some((_, map)) = MAP_EVICTIONS.iter().find(|(k, _)| *k == key) {
                out.push(metric(
                    "difytrace_map_evictions_total".into(),
                    "Entries a kernel LRU map evicted because it was full (their state is lost).",
                    SelfKind::Counter,
                    vec![("map", (*map).to_string())],
                    *value,
                ));
            } else if let Some((_, exporter)) = EXPORTED.iter().find(|(k, _)| *k == key) {
                out.push(metric(
                    "difytrace_spans_exported_total".into(),
                    "Spans written out: accepted by the OTLP backend, or printed on stdout.",
                    SelfKind::Counter,
                    vec![("exporter", (*exporter).to_string())],
                    *value,
                ));
            } else if GAUGES.contains(&key) {
                out.push(metric(
                    format!("difytrace_{key}").into(),
                    "Current level (see docs/metrics.md).",
                    SelfKind::Gauge,
                    Vec::new(),
                    *value,
                ));
            } else {
                out.push(metric(
                    format!("difytrace_{key}_total").into(),
                    "Count since start (see docs/metrics.md).",
                    SelfKind::Counter,
                    Vec::new(),
                    *value,
                ));
            }
        }
        for map in &self.maps {
            out.push(metric(
                "difytrace_map_entries".into(),
                "Entries in a kernel map now.",
                SelfKind::Gauge,
                vec![("map", map.name.clone())],
                map.entries,
            ));
            out.push(metric(
                "difytrace_map_capacity".into(),
                "Entries a kernel map can hold.",
                SelfKind::Gauge,
                vec![("map", map.name.clone())],
                map.capacity,
            ));
        }
        for (family, n) in &self.overflow {
            out.push(metric(
                "difytrace_metric_overflow_total".into(),
                "Records folded into a metric's otel.metric.overflow series (series cap reached).",
                SelfKind::Counter,
                vec![("metric", (*family).to_string())],
                *n,
            ));
        }
        out.push(metric(
            "process_resident_memory_bytes".into(),
            "Resident memory of the agent.",
            SelfKind::Gauge,
            Vec::new(),
            self.rss_bytes,
        ));
        out.push(SelfMetric {
            name: "process_cpu_seconds_total".into(),
            help: "CPU time of the agent (user + system).",
            kind: SelfKind::Counter,
            labels: Vec::new(),
            value: self.cpu_seconds,
        });
        out
    }
}

/// Resident memory (bytes) and CPU time (seconds) of this process, from /proc/self.
pub fn process_usage() -> (u64, f64) {
    // SAFETY: sysconf has no preconditions.
    let (page, ticks) = unsafe {
        (
            libc::sysconf(libc::_SC_PAGESIZE),
            libc::sysconf(libc::_SC_CLK_TCK),
        )
    };
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * u64::try_from(page).unwrap_or(4096));
    let cpu = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| cpu_ticks(&s))
        .map_or(0.0, |t| t as f64 / (ticks.max(1) as f64));
    (rss, cpu)
}

/// utime + stime of a /proc/<pid>/stat line (fields 14 and 15; the comm before them may
/// contain spaces and parentheses, so fields are counted after the last ')').
fn cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_keeps_order_and_metrics_group_events_and_drops() {
        let mut s = SelfStats::default();
        s.push("events", 10);
        s.push("data_events", 7);
        s.push("control_events", 3);
        s.push("lost_records", 2);
        s.push("conns", 4);
        s.push_line("go_grpc_held=1 junk go_grpc_evicted=5");
        assert!(s.line().starts_with("events=10 data_events=7 control_events=3 lost_records=2 conns=4 go_grpc_held=1 go_grpc_evicted=5 rss_bytes="));
        let m = s.metrics();
        assert!(
            !m.iter()
                .any(|m| m.name == "difytrace_events_total" && m.labels.is_empty())
        );
        let events: f64 = m
            .iter()
            .filter(|m| m.name == "difytrace_events_total")
            .map(|m| m.value)
            .sum();
        assert_eq!(events, 10.0);
        let hole = m
            .iter()
            .find(|m| m.labels == vec![("reason", "sequence_hole".to_string())]);
        assert_eq!(hole.map(|m| m.value), Some(2.0));
        let conns = m.iter().find(|m| m.name == "difytrace_conns");
        assert_eq!(conns.map(|m| m.kind), Some(SelfKind::Gauge));
        assert!(
            m.iter()
                .any(|m| m.name == "difytrace_drops_total" && m.value == 5.0)
        );
    }

    #[test]
    fn map_evictions_are_one_counter_labelled_by_map() {
        let mut s = SelfStats::default();
        s.push("sockets_evicted", 7);
        s.push("other_fds_evicted", 0);
        assert!(
            s.line()
                .starts_with("sockets_evicted=7 other_fds_evicted=0 ")
        );
        let m = s.metrics();
        let evictions: Vec<_> = m
            .iter()
            .filter(|m| m.name == "difytrace_map_evictions_total")
            .map(|m| (m.labels.clone(), m.value, m.kind))
            .collect();
        assert_eq!(
            evictions,
            vec![
                (vec![("map", "SOCKETS".to_string())], 7.0, SelfKind::Counter),
                (
                    vec![("map", "OTHER_FDS".to_string())],
                    0.0,
                    SelfKind::Counter
                ),
            ]
        );
        assert!(!m.iter().any(|m| m.name.contains("sockets_evicted")));
    }

    #[test]
    fn cpu_ticks_skip_a_comm_with_spaces() {
        let stat = "42 (a b) c) S 1 2 3 4 5 6 7 8 9 10 150 25 0 0 20 0 1 0";
        assert_eq!(cpu_ticks(stat), Some(175));
        let (rss, _) = process_usage();
        assert!(rss > 0);
    }
}
