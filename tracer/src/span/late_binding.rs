//! Outbound requests whose parent is only known afterwards.
//!
//! A plugin runtime runs each session on a pooled worker (a greenlet under gevent, or a
//! thread) and nothing on the wire says which session a worker took from the queue until it
//! writes a line of that session to stdout, usually after its outbound calls. The plugin
//! daemon answers a backwards invocation the same way: the goroutine that calls the API's
//! `/inner/api` writes the answer lines for its backwards request afterwards. A worker
//! serves one session (one backwards request) at a time, so the first such line it writes
//! names what all its unbound work since the previous one was for.
//!
//! Such a request gets a provisional trace of its own; every span of that trace (its CLIENT
//! span, and the SERVER spans it causes in other processes) is held back until the worker
//! names its session. Then the spans move into the session's trace, the provisional root
//! under the session's span, and go out. A trace not resolved in time goes out under the
//! parent the request would have had without this (the latest session, or none).

use std::collections::HashMap;

use super::builder::SpanIds;
use super::model::FinishedSpan;
use crate::stream::ExecCtx;

/// Provisional traces open at once (the oldest is settled with its fallback beyond).
pub const MAX_PROVISIONAL: usize = 16384;
/// Spans held at once (the oldest trace is settled beyond).
pub const MAX_HELD_SPANS: usize = 16384;
/// How long a held span waits for its worker to name its session.
pub const HOLD_NS: u64 = 10_000_000_000;

/// What a provisional trace becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Target {
    trace_id: [u8; 16],
    /// The parent of the provisional root span; None keeps it a root.
    parent: Option<[u8; 8]>,
    parent_is_remote: bool,
}

impl Target {
    fn of(parent: Option<&SpanIds>, remote: bool) -> Option<Target> {
        parent.map(|p| Target {
            trace_id: p.trace_id,
            parent: Some(p.span_id),
            parent_is_remote: remote,
        })
    }
}

struct Provisional {
    tgid: u32,
    ctx: ExecCtx,
    /// The provisional root span (the outbound request's CLIENT span).
    root: [u8; 8],
    fallback: Option<Target>,
    order: u64,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct LateBindingCounters {
    /// Outbound requests given a provisional trace.
    pub provisional: u64,
    /// Provisional traces resolved by their worker's next session line.
    pub resolved: u64,
    /// Provisional traces settled with their fallback (timeout, eviction, exit).
    pub fallback: u64,
    /// Outbound requests whose worker had named its session before.
    pub bound: u64,
}

#[derive(Default)]
pub struct LateBinding {
    provisional: HashMap<[u8; 16], Provisional>,
    by_ctx: HashMap<(u32, ExecCtx), Vec<[u8; 16]>>,
    /// Settled provisional traces: later spans of them are rewritten the same way.
    settled: HashMap<[u8; 16], (Option<Target>, [u8; 8])>,
    /// Spans of unresolved provisional traces, with when they were held.
    held: HashMap<[u8; 16], Vec<(u64, FinishedSpan)>>,
    held_len: usize,
    /// (tgid, ctx) -> the span its worker named last (until that session ends).
    bound: HashMap<(u32, ExecCtx), SpanIds>,
    next_order: u64,
    /// Spans released since the last `take_released`.
    released: Vec<FinishedSpan>,
    pub counters: LateBindingCounters,
}

impl LateBinding {
    /// The span `ctx` of `tgid` works for, if its worker named one.
    pub fn bound(&mut self, tgid: u32, ctx: ExecCtx) -> Option<SpanIds> {
        let ids = self.bound.get(&(tgid, ctx)).copied()?;
        self.counters.bound += 1;
        Some(ids)
    }

    /// An outbound request of `ctx` got the provisional ids `ids` (a fresh root);
    /// `fallback` is the parent it gets if its worker never names a session.
    pub fn provisional(
        &mut self,
        tgid: u32,
        ctx: ExecCtx,
        ids: &SpanIds,
        fallback: Option<&SpanIds>,
        fallback_is_remote: bool,
    ) {
        if self.provisional.len() >= MAX_PROVISIONAL
            && let Some(oldest) = self
                .provisional
                .iter()
                .min_by_key(|(_, p)| p.order)
                .map(|(t, _)| *t)
        {
            self.settle(oldest, None);
        }
        self.next_order += 1;
        self.counters.provisional += 1;
        self.provisional.insert(
            ids.trace_id,
            Provisional {
                tgid,
                ctx,
                root: ids.span_id,
                fallback: Target::of(fallback, fallback_is_remote),
                order: self.next_order,
            },
        );
        self.by_ctx
            .entry((tgid, ctx))
            .or_default()
            .push(ids.trace_id);
    }

    /// `ctx` of `tgid` wrote a line of the session (or backwards request) whose span is
    /// `ids`: its provisional traces move under it, and its next requests too.
    pub fn named(&mut self, tgid: u32, ctx: ExecCtx, ids: SpanIds) {
        self.bound.insert((tgid, ctx), ids);
        let traces = self.by_ctx.remove(&(tgid, ctx)).unwrap_or_default();
        let target = Target::of(Some(&ids), false);
        for trace in traces {
            if self.provisional.contains_key(&trace) {
                self.counters.resolved += 1;
                self.settle(trace, Some(target));
            }
        }
    }

    /// The session `ctx` worked for ended: its next work is for another one.
    pub fn unbind(&mut self, tgid: u32, ctx: ExecCtx) {
        self.bound.remove(&(tgid, ctx));
    }

    /// Settles `trace`: to `target` when given, else to its fallback; releases its held
    /// spans.
    fn settle(&mut self, trace: [u8; 16], target: Option<Option<Target>>) {
        let Some(p) = self.provisional.remove(&trace) else {
            return;
        };
        if let Some(list) = self.by_ctx.get_mut(&(p.tgid, p.ctx)) {
            list.retain(|t| *t != trace);
            if list.is_empty() {
                self.by_ctx.remove(&(p.tgid, p.ctx));
            }
        }
        let target = match target {
            Some(t) => t,
            None => {
                self.counters.fallback += 1;
                p.fallback
            }
        };
        self.settled.insert(trace, (target, p.root));
        if self.settled.len() > 2 * MAX_PROVISIONAL {
            // Spans of a trace settled that long ago are not coming any more.
            self.settled.clear();
            self.settled.insert(trace, (target, p.root));
        }
        if let Some(spans) = self.held.remove(&trace) {
            self.held_len -= spans.len();
            for (_, mut span) in spans {
                rewrite(&mut span, target, p.root);
                self.released.push(span);
            }
        }
    }

    /// A finished span: held (returns None) while its trace is provisional, rewritten when
    /// its trace was settled.
    pub fn apply(&mut self, mut span: FinishedSpan, now_ns: u64) -> Option<FinishedSpan> {
        if let Some((target, root)) = self.settled.get(&span.trace_id).copied() {
            rewrite(&mut span, target, root);
            return Some(span);
        }
        if !self.provisional.contains_key(&span.trace_id) {
            return Some(span);
        }
        if self.held_len >= MAX_HELD_SPANS
            && let Some(oldest) = self
                .held
                .iter()
                .filter_map(|(t, spans)| spans.first().map(|(at, _)| (*at, *t)))
                .min()
                .map(|(_, t)| t)
        {
            self.settle(oldest, None);
        }
        self.held_len += 1;
        self.held
            .entry(span.trace_id)
            .or_default()
            .push((now_ns, span));
        None
    }

    /// Settles with their fallback the provisional traces whose spans waited too long, those
    /// of `tgid` when it exited (`Some`), or all of them at shutdown (`flush`).
    pub fn expire(&mut self, now_ns: u64, exited: Option<u32>, flush: bool) {
        let due: Vec<[u8; 16]> = self
            .provisional
            .iter()
            .filter(|(trace, p)| {
                flush
                    || exited == Some(p.tgid)
                    || self.held.get(*trace).is_some_and(|spans| {
                        spans
                            .first()
                            .is_some_and(|(at, _)| now_ns.saturating_sub(*at) >= HOLD_NS)
                    })
            })
            .map(|(t, _)| *t)
            .collect();
        for trace in due {
            self.settle(trace, None);
        }
        if let Some(tgid) = exited {
            self.bound.retain(|(t, _), _| *t != tgid);
        }
    }

    /// The spans settled since the last call, ready to go out.
    pub fn take_released(&mut self) -> Vec<FinishedSpan> {
        std::mem::take(&mut self.released)
    }

    pub fn held_len(&self) -> usize {
        self.held_len
    }

    pub fn len(&self) -> usize {
        self.provisional.len() + self.bound.len() + self.settled.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn rewrite(span: &mut FinishedSpan, target: Option<Target>, root: [u8; 8]) {
    let Some(target) = target else {
        return;
    };
    span.trace_id = target.trace_id;
    if span.span_id == root && span.parent_span_id.is_none() {
        span.parent_span_id = target.parent;
        span.parent_is_remote = target.parent_is_remote;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::SystemTime;

    use super::*;
    use crate::span::model::{ProcessResource, SpanKind, SpanStatus};

    fn ids(t: u8, s: u8) -> SpanIds {
        SpanIds {
            trace_id: [t; 16],
            span_id: [s; 8],
            parent_span_id: None,
            parent_is_remote: false,
        }
    }

    fn span(trace: u8, id: u8, parent: Option<u8>) -> FinishedSpan {
        FinishedSpan {
            trace_id: [trace; 16],
            span_id: [id; 8],
            parent_span_id: parent.map(|p| [p; 8]),
            parent_is_remote: false,
            kind: SpanKind::Client,
            name: "GET /tool".into(),
            start: SystemTime::UNIX_EPOCH,
            end: SystemTime::UNIX_EPOCH,
            attributes: Vec::new(),
            links: Vec::new(),
            status: SpanStatus::Unset,
            resource: Arc::new(ProcessResource {
                service_name: "plugin".into(),
                pid: 7,
                executable_name: "python".into(),
                host_name: "h".into(),
                container: None,
            }),
        }
    }

    #[test]
    fn spans_wait_for_their_worker_to_name_its_session() {
        let mut lb = LateBinding::default();
        let mut out = Vec::new();
        let latest = ids(9, 90);
        // Worker 1 calls out (provisional trace 1, root span 10); the tool's SERVER span
        // (trace 1, child of 10) finishes first, then the CLIENT span.
        lb.provisional(7, 1, &ids(1, 10), Some(&latest), false);
        assert!(lb.apply(span(1, 11, Some(10)), 0).is_none());
        assert!(lb.apply(span(1, 10, None), 1).is_none());
        assert_eq!(lb.held_len(), 2);
        // An unrelated span passes.
        assert!(lb.apply(span(5, 50, None), 1).is_some());
        // Worker 1 writes a line of session 3 (span 30).
        lb.named(7, 1, ids(3, 30));
        out.extend(lb.take_released());
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|s| s.trace_id == [3; 16]));
        let root = out.iter().find(|s| s.span_id == [10; 8]).unwrap();
        assert_eq!(root.parent_span_id, Some([30; 8]));
        let child = out.iter().find(|s| s.span_id == [11; 8]).unwrap();
        assert_eq!(child.parent_span_id, Some([10; 8]));
        // A late span of the settled trace is rewritten on the way.
        let late = lb.apply(span(1, 12, Some(10)), 2).unwrap();
        assert_eq!(late.trace_id, [3; 16]);
        // The worker is bound now: its next request has a parent at once.
        assert_eq!(lb.bound(7, 1).map(|i| i.span_id), Some([30; 8]));
        lb.unbind(7, 1);
        assert_eq!(lb.bound(7, 1), None);
        assert_eq!(lb.counters.resolved, 1);
    }

    #[test]
    fn unnamed_traces_fall_back_after_the_hold_time() {
        let mut lb = LateBinding::default();
        let mut out = Vec::new();
        lb.provisional(7, 2, &ids(1, 10), Some(&ids(9, 90)), false);
        assert!(lb.apply(span(1, 10, None), 100).is_none());
        lb.expire(100 + HOLD_NS - 1, None, false);
        assert!(lb.take_released().is_empty());
        lb.expire(100 + HOLD_NS, None, false);
        out.extend(lb.take_released());
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].trace_id, [9; 16]);
        assert_eq!(out[0].parent_span_id, Some([90; 8]));
        // Without a fallback the span stays a root of its own trace.
        lb.provisional(7, 2, &ids(2, 20), None, false);
        assert!(lb.apply(span(2, 20, None), 0).is_none());
        lb.expire(0, None, true);
        out.extend(lb.take_released());
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].trace_id, [2; 16]);
        assert_eq!(out[1].parent_span_id, None);
        assert_eq!(lb.counters.fallback, 2);
    }

    #[test]
    fn holding_is_bounded() {
        let mut lb = LateBinding::default();
        let mut out = Vec::new();
        for i in 0..(MAX_HELD_SPANS + 10) as u32 {
            let mut t = [0u8; 16];
            t[..4].copy_from_slice(&i.to_le_bytes());
            t[15] = 1;
            let s = SpanIds {
                trace_id: t,
                span_id: [1; 8],
                parent_span_id: None,
                parent_is_remote: false,
            };
            lb.provisional(7, u64::from(i), &s, None, false);
            let mut sp = span(0, 1, None);
            sp.trace_id = t;
            let _ = lb.apply(sp, u64::from(i));
        }
        out.extend(lb.take_released());
        assert!(lb.held_len() <= MAX_HELD_SPANS);
        assert!(out.len() >= 10);
    }
}
