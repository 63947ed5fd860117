//! Service graph edges (client service → server service) from pairs of spans, as Tempo's
//! and Beyla's service graphs count them.
//!
//! A SERVER span whose parent is local (not a remote traceparent) is, by the linking rules
//! (docs/linking.md), the child of the CLIENT span at the other end of its connection or pipe.
//! Whichever of the two finishes first waits here, keyed by the CLIENT span's id, for at most
//! [`PAIR_WINDOW`]; a pair makes one edge. A CLIENT span left alone makes an edge to its
//! peer as the agent saw it (`peer.service`, else `server.address:server.port`), marked
//! `connection_type="virtual_node"`; a lone SERVER span is only counted.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use super::{
    red::duration_seconds,
    store::{DURATION_BOUNDS, Family, Kind, LabelValue, SeriesKey},
};
use crate::span::model::{AttrValue, FinishedSpan, SpanKind, SpanStatus};

/// How long the first span of a pair waits for the other one.
pub const PAIR_WINDOW: Duration = Duration::from_secs(5);
/// Spans waiting for their partner, at most (the oldest is settled first beyond it).
pub const MAX_WAITING: usize = 16384;

#[derive(Debug, Clone)]
struct Side {
    service: Arc<str>,
    seconds: f64,
    failed: bool,
    /// CLIENT side only: the peer as the agent saw it.
    peer: Option<String>,
}

/// Counters of the pairing itself.
#[derive(Debug, Default, Clone, Copy)]
pub struct GraphCounters {
    pub paired: u64,
    pub unpaired_clients: u64,
    pub unpaired_servers: u64,
    /// Settled early because [`MAX_WAITING`] was reached.
    pub evicted: u64,
}

#[derive(Debug, Clone)]
pub struct ServiceGraph {
    pub requests: Family,
    pub failed: Family,
    pub server_seconds: Family,
    pub client_seconds: Family,
    pub counters: GraphCounters,
    clients: HashMap<[u8; 8], Side>,
    /// Keyed by the parent (CLIENT) span id.
    servers: HashMap<[u8; 8], Side>,
    /// Arrival order: (when, CLIENT span id, is the waiting side the client).
    order: VecDeque<(Instant, [u8; 8], bool)>,
}

impl ServiceGraph {
    pub fn new(max_series: usize, start: SystemTime) -> Self {
        let family = |name, description, kind| {
            Family::new(
                name,
                description,
                if matches!(kind, Kind::Counter) {
                    "1"
                } else {
                    "s"
                },
                kind,
                max_series,
                start,
            )
        };
        Self {
            requests: family(
                "traces_service_graph_request_total",
                "Requests between two services (client → server edges).",
                Kind::Counter,
            ),
            failed: family(
                "traces_service_graph_request_failed_total",
                "Failed requests between two services.",
                Kind::Counter,
            ),
            server_seconds: family(
                "traces_service_graph_request_server_seconds",
                "Duration of the requests of an edge as the server measured them.",
                Kind::Histogram(DURATION_BOUNDS),
            ),
            client_seconds: family(
                "traces_service_graph_request_client_seconds",
                "Duration of the requests of an edge as the client measured them.",
                Kind::Histogram(DURATION_BOUNDS),
            ),
            counters: GraphCounters::default(),
            clients: HashMap::new(),
            servers: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    pub fn families(&self) -> [&Family; 4] {
        [
            &self.requests,
            &self.failed,
            &self.server_seconds,
            &self.client_seconds,
        ]
    }

    /// Spans waiting for their partner now.
    pub fn waiting(&self) -> usize {
        self.clients.len() + self.servers.len()
    }

    pub fn record(&mut self, span: &FinishedSpan, now: Instant) {
        let side = |peer| Side {
            service: Arc::from(span.resource.service_name.as_str()),
            seconds: duration_seconds(span),
            failed: matches!(span.status, SpanStatus::Error(_)),
            peer,
        };
        match span.kind {
            SpanKind::Client => {
                let client = side(Some(peer_name(span)));
                if let Some(server) = self.servers.remove(&span.span_id) {
                    self.edge(&client, &server, false);
                } else {
                    self.wait(span.span_id, client, true, now);
                }
            }
            SpanKind::Server => {
                let Some(parent) = span.parent_span_id.filter(|_| !span.parent_is_remote) else {
                    return;
                };
                let server = side(None);
                if let Some(client) = self.clients.remove(&parent) {
                    self.edge(&client, &server, false);
                } else {
                    self.wait(parent, server, false, now);
                }
            }
            SpanKind::Internal => {}
        }
    }

    fn wait(&mut self, id: [u8; 8], side: Side, is_client: bool, now: Instant) {
        let table = if is_client {
            &mut self.clients
        } else {
            &mut self.servers
        };
        if table.insert(id, side).is_none() {
            self.order.push_back((now, id, is_client));
        }
        while self.waiting() > MAX_WAITING {
            let Some((_, id, is_client)) = self.order.pop_front() else {
                break;
            };
            if self.settle(id, is_client) {
                self.counters.evicted += 1;
            }
        }
    }

    /// Settles what waited longer than [`PAIR_WINDOW`].
    pub fn expire(&mut self, now: Instant) {
        while let Some(&(at, id, is_client)) = self.order.front() {
            if now.saturating_duration_since(at) < PAIR_WINDOW {
                break;
            }
            self.order.pop_front();
            self.settle(id, is_client);
        }
    }

    /// Settles everything still waiting (at shutdown).
    pub fn settle_all(&mut self) {
        while let Some((_, id, is_client)) = self.order.pop_front() {
            self.settle(id, is_client);
        }
    }

    /// A span that found no partner; true when it was still waiting.
    fn settle(&mut self, id: [u8; 8], is_client: bool) -> bool {
        if is_client {
            let Some(client) = self.clients.remove(&id) else {
                return false;
            };
            self.counters.unpaired_clients += 1;
            let server = Side {
                service: Arc::from(client.peer.as_deref().unwrap_or("unknown")),
                seconds: client.seconds,
                failed: false,
                peer: None,
            };
            self.edge(&client, &server, true);
        } else {
            if self.servers.remove(&id).is_none() {
                return false;
            }
            self.counters.unpaired_servers += 1;
        }
        true
    }

    fn edge(&mut self, client: &Side, server: &Side, virtual_node: bool) {
        if !virtual_node {
            self.counters.paired += 1;
        }
        let mut attrs = vec![
            ("client", LabelValue::Str(client.service.to_string())),
            ("server", LabelValue::Str(server.service.to_string())),
        ];
        if virtual_node {
            attrs.push(("connection_type", LabelValue::Str("virtual_node".into())));
        }
        let key = SeriesKey {
            service: Arc::from(""),
            attrs,
        };
        self.requests.add(key.clone(), 1.0);
        if client.failed || server.failed {
            self.failed.add(key.clone(), 1.0);
        }
        self.client_seconds.record(key.clone(), client.seconds);
        if !virtual_node {
            self.server_seconds.record(key, server.seconds);
        }
    }
}

/// The peer of a CLIENT span as the agent saw it: `peer.service` when set, else
/// `server.address:server.port`, else `server.address`.
fn peer_name(span: &FinishedSpan) -> String {
    let text = |key| match span.attr(key) {
        Some(AttrValue::Str(s)) if !s.is_empty() => Some(s.clone()),
        Some(AttrValue::Int(i)) => Some(i.to_string()),
        _ => None,
    };
    if let Some(service) = text("peer.service") {
        return service;
    }
    match (text("server.address"), text("server.port")) {
        (Some(a), Some(p)) if a.contains(':') => format!("[{a}]:{p}"),
        (Some(a), Some(p)) => format!("{a}:{p}"),
        (Some(a), None) => a,
        (None, _) => "unknown".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{red::tests::span, store::Value};

    fn edge_count(g: &ServiceGraph, client: &str, server: &str) -> f64 {
        g.requests
            .series
            .iter()
            .filter(|(k, _)| {
                k.attrs
                    .contains(&("client", LabelValue::Str(client.into())))
                    && k.attrs
                        .contains(&("server", LabelValue::Str(server.into())))
            })
            .map(|(_, v)| match v {
                Value::Counter(c) => *c,
                Value::Histogram(h) => h.count as f64,
            })
            .sum()
    }

    #[test]
    fn pairs_in_either_order_and_counts_failures() {
        let mut g = ServiceGraph::new(100, SystemTime::UNIX_EPOCH);
        let now = Instant::now();
        for server_first in [true, false, true] {
            let client = span("web", SpanKind::Client, 10, &[]);
            let mut server = span("api", SpanKind::Server, 8, &[]);
            server.parent_span_id = Some(client.span_id);
            if server_first {
                server.status = SpanStatus::Error("500".into());
                g.record(&server, now);
                g.record(&client, now);
            } else {
                g.record(&client, now);
                g.record(&server, now);
            }
        }
        assert_eq!(edge_count(&g, "web", "api"), 3.0);
        assert_eq!(g.failed.series.values().next(), Some(&Value::Counter(2.0)));
        assert_eq!(g.waiting(), 0);
        assert_eq!(g.counters.paired, 3);
    }

    #[test]
    fn lone_clients_become_edges_to_their_peer_and_remote_parents_are_ignored() {
        let mut g = ServiceGraph::new(100, SystemTime::UNIX_EPOCH);
        let now = Instant::now();
        g.record(
            &span(
                "api",
                SpanKind::Client,
                3,
                &[
                    ("server.address", AttrValue::Str("10.1.2.3".into())),
                    ("server.port", AttrValue::Int(443)),
                ],
            ),
            now,
        );
        let mut remote = span("api", SpanKind::Server, 3, &[]);
        remote.parent_span_id = Some([9; 8]);
        remote.parent_is_remote = true;
        g.record(&remote, now);
        let mut orphan = span("api", SpanKind::Server, 3, &[]);
        orphan.parent_span_id = Some([7; 8]);
        g.record(&orphan, now);
        assert_eq!(g.waiting(), 2);
        g.expire(now + Duration::from_secs(1));
        assert_eq!(g.waiting(), 2);
        g.expire(now + PAIR_WINDOW);
        assert_eq!(g.waiting(), 0);
        assert_eq!(edge_count(&g, "api", "10.1.2.3:443"), 1.0);
        assert_eq!(g.counters.unpaired_clients, 1);
        assert_eq!(g.counters.unpaired_servers, 1);
        assert!(g.server_seconds.series.is_empty());
    }

    #[test]
    fn waiting_spans_are_bounded() {
        let mut g = ServiceGraph::new(10, SystemTime::UNIX_EPOCH);
        let now = Instant::now();
        for _ in 0..MAX_WAITING + 5 {
            let mut s = span("api", SpanKind::Server, 1, &[]);
            s.parent_span_id = Some(rand::random());
            g.record(&s, now);
        }
        assert_eq!(g.waiting(), MAX_WAITING);
        assert_eq!(g.counters.evicted, 5);
    }
}
