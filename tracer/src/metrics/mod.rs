//! Metrics: RED metrics and the service graph from finished spans, the agent's self-telemetry,
//! a Prometheus `/metrics` endpoint, and snapshots for the OTLP metrics exporter
//! (`export::otlp::metrics`). Everything is recorded on the event loop without locks; readers
//! get a [`Snapshot`] (a clone) and do their formatting elsewhere. Names, attributes and
//! units: docs/metrics.md.

pub mod maps;
pub mod prometheus;
pub mod red;
pub mod self_telemetry;
pub mod server;
pub mod service_graph;
pub mod store;

use std::time::{Instant, SystemTime};

use red::RedMetrics;
use self_telemetry::SelfStats;
use service_graph::ServiceGraph;
use store::Family;

use crate::span::model::FinishedSpan;

/// Everything a reader of the metrics needs, at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub families: Vec<Family>,
    pub self_stats: SelfStats,
}

/// The span-derived metrics.
#[derive(Debug, Clone)]
pub struct SpanMetrics {
    red: RedMetrics,
    graph: ServiceGraph,
}

impl SpanMetrics {
    pub fn new(max_series: usize) -> Self {
        let start = SystemTime::now();
        Self {
            red: RedMetrics::new(max_series, start),
            graph: ServiceGraph::new(max_series, start),
        }
    }

    pub fn record(&mut self, span: &FinishedSpan, now: Instant) {
        self.red.record(span);
        self.graph.record(span, now);
    }

    /// Settles service-graph spans that waited for their partner long enough.
    pub fn tick(&mut self, now: Instant) {
        self.graph.expire(now);
    }

    /// At shutdown: every waiting span becomes what it is alone.
    pub fn settle_all(&mut self) {
        self.graph.settle_all();
    }

    fn families(&self) -> impl Iterator<Item = &Family> {
        self.red.families().into_iter().chain(self.graph.families())
    }

    /// Its own counters, appended to the agent's stats.
    pub fn push_stats(&self, stats: &mut SelfStats) {
        let c = self.graph.counters;
        stats.push("graph_paired", c.paired);
        stats.push("graph_unpaired_clients", c.unpaired_clients);
        stats.push("graph_unpaired_servers", c.unpaired_servers);
        stats.push("graph_evicted", c.evicted);
        stats.push("graph_waiting", self.graph.waiting() as u64);
        stats.overflow = self
            .families()
            .filter(|f| f.overflowed > 0)
            .map(|f| (f.name, f.overflowed))
            .collect();
    }

    /// A copy of every family, with `stats` for the self-telemetry.
    pub fn snapshot(&self, self_stats: SelfStats) -> Snapshot {
        Snapshot {
            families: self.families().cloned().collect(),
            self_stats,
        }
    }
}
