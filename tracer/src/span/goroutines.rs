//! What Go uprobes tell about goroutines: which goroutine spawned which, which goroutine
//! asked for the next request on a client connection, and the route a server request
//! matched. Goroutines hop between OS threads, so in a Go process these replace the thread
//! as the execution context that links an outbound request to the inbound one it serves.

use crate::fast_map::HashMap;

use crate::stream::{ExecCtx, goroutine_ctx, goroutine_of};

/// Spawn edges kept at most (beyond it the oldest half is dropped and counted).
pub const MAX_SPAWN_EDGES: usize = 262_144;
/// Ancestors walked to find the request a goroutine works for.
pub const MAX_ANCESTORS: usize = 32;
/// Client connections whose requesting goroutine is remembered at most.
pub const MAX_CLIENT_OWNERS: usize = 65_536;
/// Routes of server spans not finished yet, at most.
pub const MAX_ROUTES: usize = 65_536;

#[derive(Debug, Default, Clone, Copy)]
pub struct GoroutineCounters {
    pub spawns: u64,
    pub client_starts: u64,
    /// CLIENT requests whose goroutine was named by the roundTrip uprobe.
    pub client_owned: u64,
    pub routes: u64,
    /// Handler entries that confirmed the goroutine of a server request.
    pub handler_starts: u64,
    /// Handler entries whose request was moved to the handler's goroutine.
    pub handler_rebound: u64,
    /// Spawn edges or other entries dropped at their bound.
    pub evicted: u64,
}

/// (span id if known yet, start) of a running handler.
type RunningHandler = (Option<[u8; 8]>, u64);

/// Spawn chains, client connection owners and routes per Go process.
#[derive(Debug, Default)]
pub struct Goroutines {
    /// (tgid, child goroutine) -> parent goroutine, with the order of insertion.
    parents: HashMap<(u32, u64), (u64, u64)>,
    next_order: u64,
    /// (tgid, fd) -> the context (a goroutine; for nginx, its downstream connection) whose
    /// request will be written on that client connection next.
    client_owner: HashMap<(u32, i32), ExecCtx>,
    /// Server span id -> route template.
    routes: HashMap<[u8; 8], String>,
    /// (tgid, goroutine) -> (span id, start) of the handler running there; no span id yet
    /// when the handler started before its request was complete on the wire (it reads the
    /// body itself).
    handlers: HashMap<(u32, u64), RunningHandler>,
    /// Server span id -> how long its handler ran.
    handler_durations: HashMap<[u8; 8], u64>,
    /// (tgid, goroutine) -> a route reported before the handler's request was complete on
    /// the wire (the syscall reporting it is the one reading the body's last bytes); it goes
    /// to the request once that becomes active on the goroutine.
    early_routes: HashMap<(u32, u64), String>,
    pub counters: GoroutineCounters,
}

impl Goroutines {
    /// `parent` created `child`. A goroutine struct is reused after its goroutine exits; the
    /// newest edge wins.
    pub fn spawned(&mut self, tgid: u32, parent: u64, child: u64) {
        self.counters.spawns += 1;
        if self.parents.len() >= MAX_SPAWN_EDGES {
            self.evict_oldest_edges();
        }
        self.next_order += 1;
        self.parents
            .insert((tgid, child), (parent, self.next_order));
    }

    fn evict_oldest_edges(&mut self) {
        let mut orders: Vec<u64> = self.parents.values().map(|(_, o)| *o).collect();
        let mid = orders.len() / 2;
        let (_, cut, _) = orders.select_nth_unstable(mid);
        let cut = *cut;
        let before = self.parents.len();
        self.parents.retain(|_, (_, order)| *order > cut);
        self.counters.evicted += (before - self.parents.len()) as u64;
    }

    /// `owner` starts a request on the client connection `fd`.
    pub fn client_start(&mut self, tgid: u32, fd: i32, owner: ExecCtx) {
        self.counters.client_starts += 1;
        if self.client_owner.len() >= MAX_CLIENT_OWNERS
            && !self.client_owner.contains_key(&(tgid, fd))
        {
            self.counters.evicted += self.client_owner.len() as u64;
            self.client_owner.clear();
        }
        self.client_owner.insert((tgid, fd), owner);
    }

    /// The context that asked for the request now seen on (tgid, fd), if a uprobe said so.
    pub fn take_client_owner(&mut self, tgid: u32, fd: i32) -> Option<ExecCtx> {
        let owner = self.client_owner.remove(&(tgid, fd))?;
        self.counters.client_owned += 1;
        Some(owner)
    }

    /// The contexts to look in for the request `ctx` works for: itself, then the goroutines
    /// that spawned it, nearest first.
    pub fn lineage(&self, tgid: u32, ctx: ExecCtx) -> Vec<ExecCtx> {
        let mut out = vec![ctx];
        let Some(mut g) = goroutine_of(ctx) else {
            return out;
        };
        while out.len() <= MAX_ANCESTORS {
            let Some(&(parent, _)) = self.parents.get(&(tgid, g)) else {
                break;
            };
            if parent == g || out.contains(&goroutine_ctx(parent)) {
                break;
            }
            out.push(goroutine_ctx(parent));
            g = parent;
        }
        out
    }

    pub fn set_route(&mut self, span_id: [u8; 8], route: String) {
        self.counters.routes += 1;
        if self.routes.len() >= MAX_ROUTES {
            self.counters.evicted += self.routes.len() as u64;
            self.routes.clear();
        }
        self.routes.insert(span_id, route);
    }

    /// Goroutine `g` reported its handler's route while no request was active on it yet.
    pub fn early_route(&mut self, tgid: u32, g: u64, route: String) {
        if self.early_routes.len() >= MAX_ROUTES {
            self.counters.evicted += self.early_routes.len() as u64;
            self.early_routes.clear();
        }
        self.early_routes.insert((tgid, g), route);
    }

    pub fn take_route(&mut self, span_id: &[u8; 8]) -> Option<String> {
        self.routes.remove(span_id)
    }

    /// The handler of span `span_id` (None: not known yet) started on goroutine `g`.
    pub fn handler_started(&mut self, tgid: u32, g: u64, span_id: Option<[u8; 8]>, ts_ns: u64) {
        // A route left from an earlier handler on this goroutine is not this one's.
        self.early_routes.remove(&(tgid, g));
        if self.handlers.len() >= MAX_ROUTES {
            self.counters.evicted += self.handlers.len() as u64;
            self.handlers.clear();
        }
        self.handlers.insert((tgid, g), (span_id, ts_ns));
    }

    /// The request of span `span_id` became active on `ctx`: a handler already running
    /// there serves it.
    pub fn request_active(&mut self, tgid: u32, ctx: ExecCtx, span_id: [u8; 8]) {
        let Some(g) = goroutine_of(ctx) else {
            return;
        };
        if let Some((span, _)) = self.handlers.get_mut(&(tgid, g))
            && span.is_none()
        {
            *span = Some(span_id);
        }
        if let Some(route) = self.early_routes.remove(&(tgid, g)) {
            self.set_route(span_id, route);
        }
    }

    /// The handler on goroutine `g` returned: its span gets the handler's duration.
    pub fn handler_ended(&mut self, tgid: u32, g: u64, ts_ns: u64) {
        let Some((Some(span_id), start)) = self.handlers.remove(&(tgid, g)) else {
            return;
        };
        if self.handler_durations.len() >= MAX_ROUTES {
            self.counters.evicted += self.handler_durations.len() as u64;
            self.handler_durations.clear();
        }
        self.handler_durations
            .insert(span_id, ts_ns.saturating_sub(start));
    }

    pub fn take_handler_duration(&mut self, span_id: &[u8; 8]) -> Option<u64> {
        self.handler_durations.remove(span_id)
    }

    pub fn forget_process(&mut self, tgid: u32) {
        self.parents.retain(|(t, _), _| *t != tgid);
        self.client_owner.retain(|(t, _), _| *t != tgid);
        self.handlers.retain(|(t, _), _| *t != tgid);
        self.early_routes.retain(|(t, _), _| *t != tgid);
    }

    pub fn len(&self) -> usize {
        self.parents.len()
            + self.client_owner.len()
            + self.routes.len()
            + self.handlers.len()
            + self.handler_durations.len()
            + self.early_routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lineage_walks_spawn_chain_and_stops_at_cycles() {
        let mut gs = Goroutines::default();
        gs.spawned(1, 0xa, 0xb);
        gs.spawned(1, 0xb, 0xc);
        gs.spawned(2, 0xc, 0xa); // another process: not followed
        assert_eq!(
            gs.lineage(1, goroutine_ctx(0xc)),
            vec![goroutine_ctx(0xc), goroutine_ctx(0xb), goroutine_ctx(0xa)]
        );
        // A reused goroutine struct can close a loop; the walk ends.
        gs.spawned(1, 0xc, 0xa);
        assert_eq!(gs.lineage(1, goroutine_ctx(0xc)).len(), 3);
        // Threads have no lineage.
        assert_eq!(gs.lineage(1, 77), vec![77]);
    }

    #[test]
    fn client_owner_is_taken_once() {
        let mut gs = Goroutines::default();
        gs.client_start(1, 7, goroutine_ctx(0xf0));
        assert_eq!(gs.take_client_owner(1, 7), Some(goroutine_ctx(0xf0)));
        assert_eq!(gs.take_client_owner(1, 7), None);
    }

    #[test]
    fn spawn_edges_are_bounded() {
        let mut gs = Goroutines::default();
        for i in 0..(MAX_SPAWN_EDGES as u64 + 10) {
            gs.spawned(1, i, i + 1_000_000_000);
        }
        assert!(gs.parents.len() <= MAX_SPAWN_EDGES);
        assert!(gs.counters.evicted > 0);
        // The newest edges survive.
        let last = MAX_SPAWN_EDGES as u64 + 9;
        assert_eq!(gs.lineage(1, goroutine_ctx(last + 1_000_000_000)).len(), 2);
    }
}
