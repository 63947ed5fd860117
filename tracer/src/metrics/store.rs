//! Metric families with a bounded number of series each: cumulative counters and explicit-
//! bucket histograms, keyed by the service that produced them and a few low-cardinality
//! attributes. Owned by the agent's event loop (no locks); snapshots are plain clones.

use std::{sync::Arc, time::SystemTime};

use crate::fast_map::HashMap;

/// Most series one family keeps; further attribute sets go to the overflow series.
pub const DEFAULT_MAX_SERIES: usize = 2000;
/// Attribute of the series that collects everything beyond the cap (the OTel SDK's name).
pub const OVERFLOW_ATTR: &str = "otel.metric.overflow";

/// An attribute value of a series.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LabelValue {
    Str(String),
    Int(i64),
    Bool(bool),
}

impl std::fmt::Display for LabelValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LabelValue::Str(s) => f.write_str(s),
            LabelValue::Int(i) => write!(f, "{i}"),
            LabelValue::Bool(b) => write!(f, "{b}"),
        }
    }
}

/// Identity of one series: the service (OTel resource) and the attributes, in a fixed order.
/// An empty service means the agent itself (self-telemetry, the overflow series).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesKey {
    pub service: Arc<str>,
    pub attrs: Vec<(&'static str, LabelValue)>,
}

/// What a family measures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// Monotonic sum.
    Counter,
    /// Explicit-bucket histogram with these upper bounds (ascending).
    Histogram(&'static [f64]),
}

/// Value of one series.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Counter(f64),
    Histogram(HistogramValue),
}

/// Cumulative explicit-bucket histogram.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramValue {
    /// One count per bound plus the +Inf bucket (not cumulative).
    pub buckets: Vec<u64>,
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
}

impl HistogramValue {
    fn new(bounds: &[f64]) -> Self {
        Self {
            buckets: vec![0; bounds.len() + 1],
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }

    fn record(&mut self, bounds: &[f64], v: f64) {
        // Bucket i holds (bounds[i-1], bounds[i]]: the OTLP and Prometheus convention.
        let i = bounds.partition_point(|b| *b < v);
        if let Some(slot) = self.buckets.get_mut(i) {
            *slot += 1;
        }
        self.count += 1;
        self.sum += v;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }
}

/// One metric: name, unit, kind and its series.
#[derive(Debug, Clone)]
pub struct Family {
    /// OTel name (`http.server.request.duration`).
    pub name: &'static str,
    pub description: &'static str,
    /// UCUM unit (`s`, `{token}`, `1`).
    pub unit: &'static str,
    pub kind: Kind,
    pub series: HashMap<SeriesKey, Value>,
    pub max_series: usize,
    /// Records that went to the overflow series because the cap was reached.
    pub overflowed: u64,
    /// Start of the cumulative period (the agent's start).
    pub start: SystemTime,
}

impl Family {
    pub fn new(
        name: &'static str,
        description: &'static str,
        unit: &'static str,
        kind: Kind,
        max_series: usize,
        start: SystemTime,
    ) -> Self {
        Self {
            name,
            description,
            unit,
            kind,
            series: HashMap::default(),
            max_series: max_series.max(1),
            overflowed: 0,
            start,
        }
    }

    /// The series to record into: `key`'s, or the overflow series once the cap is reached
    /// (the overflow series itself takes the last slot).
    fn slot(&mut self, key: SeriesKey) -> &mut Value {
        let key = if self.series.contains_key(&key) || self.series.len() + 1 < self.max_series {
            key
        } else {
            self.overflowed += 1;
            overflow_key()
        };
        let kind = self.kind;
        self.series.entry(key).or_insert_with(|| match kind {
            Kind::Counter => Value::Counter(0.0),
            Kind::Histogram(bounds) => Value::Histogram(HistogramValue::new(bounds)),
        })
    }

    pub fn add(&mut self, key: SeriesKey, v: f64) {
        if let Value::Counter(c) = self.slot(key) {
            *c += v;
        }
    }

    pub fn record(&mut self, key: SeriesKey, v: f64) {
        let Kind::Histogram(bounds) = self.kind else {
            return;
        };
        if !v.is_finite() {
            return;
        }
        if let Value::Histogram(h) = self.slot(key) {
            h.record(bounds, v);
        }
    }
}

/// The series everything beyond the cap is folded into.
pub fn overflow_key() -> SeriesKey {
    SeriesKey {
        service: Arc::from(""),
        attrs: vec![(OVERFLOW_ATTR, LabelValue::Bool(true))],
    }
}

/// Bucket bounds of request durations in seconds (the OTel HTTP semconv advice).
pub const DURATION_BOUNDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];
/// Bucket bounds of token counts (the OTel GenAI semconv advice).
pub const TOKEN_BOUNDS: &[f64] = &[
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
    16777216.0, 67108864.0,
];

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> SeriesKey {
        SeriesKey {
            service: Arc::from("svc"),
            attrs: vec![("k", LabelValue::Str(s.into()))],
        }
    }

    #[test]
    fn histogram_buckets_are_upper_inclusive() {
        let mut f = Family::new(
            "d",
            "",
            "s",
            Kind::Histogram(&[1.0, 2.0]),
            10,
            SystemTime::UNIX_EPOCH,
        );
        for v in [0.5, 1.0, 1.5, 2.0, 3.0] {
            f.record(key("a"), v);
        }
        let Some(Value::Histogram(h)) = f.series.get(&key("a")) else {
            panic!("no histogram");
        };
        assert_eq!(h.buckets, vec![2, 2, 1]);
        assert_eq!(h.count, 5);
        assert!((h.sum - 8.0).abs() < 1e-9);
        assert_eq!((h.min, h.max), (0.5, 3.0));
    }

    #[test]
    fn series_beyond_the_cap_fold_into_the_overflow_series() {
        let mut f = Family::new("c", "", "1", Kind::Counter, 3, SystemTime::UNIX_EPOCH);
        for i in 0..10 {
            f.add(key(&i.to_string()), 1.0);
        }
        f.add(key("0"), 1.0);
        assert_eq!(f.series.len(), 3);
        assert_eq!(f.series.get(&key("0")), Some(&Value::Counter(2.0)));
        assert_eq!(f.series.get(&overflow_key()), Some(&Value::Counter(8.0)));
        assert_eq!(f.overflowed, 8);
    }
}
