//! A metrics [`Snapshot`] as an OTLP `ExportMetricsServiceRequest`: one resource per service
//! (`service.name`, `host.name`), cumulative temporality, explicit-bucket histograms. The
//! agent's own series (self-telemetry, service graph, overflow) go under the agent's resource
//! (`service.name=difytrace`). Self-telemetry counters lose the Prometheus `_total` suffix.

use std::{collections::BTreeMap, time::SystemTime};

use opentelemetry_proto::tonic::{
    collector::metrics::v1::ExportMetricsServiceRequest,
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    metrics::v1::{
        AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
        ResourceMetrics, ScopeMetrics, Sum, metric::Data, number_data_point,
    },
    resource::v1::Resource,
};

use crate::metrics::{
    Snapshot,
    self_telemetry::SelfKind,
    store::{Family, Kind, LabelValue, Value},
};

/// service.name of the agent's own resource.
pub const AGENT_SERVICE: &str = "difytrace";

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn label(key: &str, value: &LabelValue) -> KeyValue {
    kv(
        key,
        match value {
            LabelValue::Str(s) => any_value::Value::StringValue(s.clone()),
            LabelValue::Int(i) => any_value::Value::IntValue(*i),
            LabelValue::Bool(b) => any_value::Value::BoolValue(*b),
        },
    )
}

/// The series of `family` that belong to `service`, as one OTLP metric (None if it has none).
fn family_metric(family: &Family, service: &str, now: u64) -> Option<Metric> {
    let start = nanos(family.start);
    let mut series: Vec<_> = family
        .series
        .iter()
        .filter(|(k, _)| &*k.service == service)
        .collect();
    if series.is_empty() {
        return None;
    }
    series.sort_by(|a, b| a.0.cmp(b.0));
    let cumulative = AggregationTemporality::Cumulative as i32;
    let data = match family.kind {
        Kind::Counter => Data::Sum(Sum {
            data_points: series
                .iter()
                .filter_map(|(k, v)| match v {
                    Value::Counter(c) => Some(NumberDataPoint {
                        attributes: k.attrs.iter().map(|(a, v)| label(a, v)).collect(),
                        start_time_unix_nano: start,
                        time_unix_nano: now,
                        value: Some(number_data_point::Value::AsDouble(*c)),
                        ..Default::default()
                    }),
                    Value::Histogram(_) => None,
                })
                .collect(),
            aggregation_temporality: cumulative,
            is_monotonic: true,
        }),
        Kind::Histogram(bounds) => Data::Histogram(Histogram {
            data_points: series
                .iter()
                .filter_map(|(k, v)| match v {
                    Value::Histogram(h) => Some(HistogramDataPoint {
                        attributes: k.attrs.iter().map(|(a, v)| label(a, v)).collect(),
                        start_time_unix_nano: start,
                        time_unix_nano: now,
                        count: h.count,
                        sum: Some(h.sum),
                        bucket_counts: h.buckets.clone(),
                        explicit_bounds: bounds.to_vec(),
                        min: (h.count > 0).then_some(h.min),
                        max: (h.count > 0).then_some(h.max),
                        ..Default::default()
                    }),
                    Value::Counter(_) => None,
                })
                .collect(),
            aggregation_temporality: cumulative,
        }),
    };
    Some(Metric {
        name: family.name.to_string(),
        description: family.description.to_string(),
        unit: family.unit.to_string(),
        data: Some(data),
        ..Default::default()
    })
}

/// The self-telemetry of `snapshot` as OTLP metrics.
fn self_metrics(snapshot: &Snapshot, start: u64, now: u64) -> Vec<Metric> {
    let mut by_name: BTreeMap<String, (SelfKind, &'static str, Vec<NumberDataPoint>)> =
        BTreeMap::new();
    for m in snapshot.self_stats.metrics() {
        let name = match m.kind {
            SelfKind::Counter => m.name.trim_end_matches("_total").to_string(),
            SelfKind::Gauge => m.name.to_string(),
        };
        let point = NumberDataPoint {
            attributes: m
                .labels
                .iter()
                .map(|(k, v)| kv(k, any_value::Value::StringValue(v.clone())))
                .collect(),
            start_time_unix_nano: if m.kind == SelfKind::Counter {
                start
            } else {
                0
            },
            time_unix_nano: now,
            value: Some(number_data_point::Value::AsDouble(m.value)),
            ..Default::default()
        };
        by_name
            .entry(name)
            .or_insert_with(|| (m.kind, m.help, Vec::new()))
            .2
            .push(point);
    }
    by_name
        .into_iter()
        .map(|(name, (kind, help, data_points))| Metric {
            name,
            description: help.to_string(),
            data: Some(match kind {
                SelfKind::Counter => Data::Sum(Sum {
                    data_points,
                    aggregation_temporality: AggregationTemporality::Cumulative as i32,
                    is_monotonic: true,
                }),
                SelfKind::Gauge => Data::Gauge(Gauge { data_points }),
            }),
            ..Default::default()
        })
        .collect()
}

/// The request for `snapshot`, taken at `at`; `host` goes on every resource as `host.name`.
pub fn encode(
    snapshot: &Snapshot,
    at: SystemTime,
    agent_start: SystemTime,
    host: &str,
) -> ExportMetricsServiceRequest {
    let now = nanos(at);
    let mut services: Vec<&str> = snapshot
        .families
        .iter()
        .flat_map(|f| f.series.keys().map(|k| &*k.service))
        .collect();
    services.push("");
    services.sort_unstable();
    services.dedup();
    let scope = InstrumentationScope {
        name: "difytrace".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        ..Default::default()
    };
    let resource_metrics = services
        .into_iter()
        .map(|service| {
            let mut metrics: Vec<Metric> = snapshot
                .families
                .iter()
                .filter_map(|f| family_metric(f, service, now))
                .collect();
            let name = if service.is_empty() {
                metrics.extend(self_metrics(snapshot, nanos(agent_start), now));
                AGENT_SERVICE
            } else {
                service
            };
            ResourceMetrics {
                resource: Some(Resource {
                    attributes: vec![
                        kv("service.name", any_value::Value::StringValue(name.into())),
                        kv("host.name", any_value::Value::StringValue(host.into())),
                    ],
                    ..Default::default()
                }),
                scope_metrics: vec![ScopeMetrics {
                    scope: Some(scope.clone()),
                    metrics,
                    ..Default::default()
                }],
                ..Default::default()
            }
        })
        .collect();
    ExportMetricsServiceRequest { resource_metrics }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::metrics::{
        self_telemetry::SelfStats,
        store::{DURATION_BOUNDS, SeriesKey},
    };

    #[test]
    fn one_resource_per_service_and_the_agent_one() {
        let start = SystemTime::UNIX_EPOCH;
        let mut h = Family::new(
            "http.server.request.duration",
            "d",
            "s",
            Kind::Histogram(DURATION_BOUNDS),
            10,
            start,
        );
        for service in ["api", "web", "api"] {
            h.record(
                SeriesKey {
                    service: Arc::from(service),
                    attrs: vec![("http.response.status_code", LabelValue::Int(200))],
                },
                0.02,
            );
        }
        let mut stats = SelfStats::default();
        stats.push("data_events", 9);
        stats.push("conns", 2);
        let req = encode(
            &Snapshot {
                families: vec![h],
                self_stats: stats,
            },
            SystemTime::now(),
            start,
            "host1",
        );
        let names: Vec<String> = req
            .resource_metrics
            .iter()
            .map(|rm| {
                match &rm.resource.as_ref().unwrap().attributes[0]
                    .value
                    .as_ref()
                    .unwrap()
                    .value
                {
                    Some(any_value::Value::StringValue(s)) => s.clone(),
                    _ => String::new(),
                }
            })
            .collect();
        assert_eq!(names, vec!["difytrace", "api", "web"]);
        let api = &req.resource_metrics[1].scope_metrics[0].metrics[0];
        let Some(Data::Histogram(hist)) = &api.data else {
            panic!("not a histogram");
        };
        assert_eq!(hist.data_points[0].count, 2);
        assert_eq!(
            hist.data_points[0].bucket_counts.len(),
            DURATION_BOUNDS.len() + 1
        );
        let agent = &req.resource_metrics[0].scope_metrics[0].metrics;
        assert!(
            agent
                .iter()
                .any(|m| m.name == "difytrace_events" && matches!(m.data, Some(Data::Sum(_))))
        );
        assert!(
            agent
                .iter()
                .any(|m| m.name == "difytrace_conns" && matches!(m.data, Some(Data::Gauge(_))))
        );
    }
}
