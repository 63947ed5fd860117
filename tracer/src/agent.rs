//! The agent's event loop: ring buffer records through stream, protocol and span layers to
//! the exporters, plus the process bookkeeping that keeps the kernel's selection current.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};
use tracer_common::{ConnEvent, ProcEvent, counter, go_op, kind, role};
use tracing::{debug, info, warn};

use crate::{
    config::Config,
    discover::{
        containers::{self, ContainerTable},
        go_binaries::{GoBinaries, Inspected},
        gobin::GoVersion,
        naming,
        native_targets::{NativeTarget, NativeTargets},
        plugin_runtime, procfs,
        selection::Selection,
        self_sockets::SelfSockets,
        tls_targets::{TlsTarget, TlsTargets},
    },
    export::{
        ExportConfig, Exporter,
        otlp::metrics::{MetricsSink, metrics_endpoint},
    },
    metrics::{
        Snapshot, SpanMetrics,
        maps::MapCounts,
        self_telemetry::{self, SelfStats},
        server,
    },
    probes::{
        KernelSelection, Probes,
        event::{self, DataChunk, Event, GoRecord},
    },
    protocol::http1::ChunkTs,
    span::{
        builder::{GoFact, ResourceSource, SpanBuilder},
        clock::{Clock, monotonic_ns},
        model::{FinishedSpan, ProcessResource},
    },
    stream::{
        ConnKey, ConnTable, PipeTable, PipeVerdict, Role, Source, StreamEvent, fd_ctx,
        goroutine_ctx, greenlet_ctx, marked_greenlet,
    },
};

/// Records handled before the loop looks at timers and signals again.
const RING_BATCH: usize = 4096;
/// How often the ring buffer is read when the kernel side did not ask for it: records wait
/// at most this long, and the agent wakes this often instead of once per record.
const DRAIN_EVERY: Duration = Duration::from_millis(5);
/// While the ring stays empty the period doubles up to this, so an idle agent wakes rarely.
const DRAIN_IDLE_MAX: Duration = Duration::from_millis(80);
/// How often idle connections are swept.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(5);
/// How often Python processes without greenlet yet are looked at again (gevent is imported
/// after exec; requests served before the hook are linked by thread).
const NATIVE_RESCAN_EVERY: Duration = Duration::from_millis(500);
/// Sockets seeded from /proc at start, at most (the kernel map holds MAX_SOCKETS).
const MAX_SEEDED_SOCKETS: usize = 16384;
/// Seeded sockets get generations from this range, apart from kernel timestamps.
const SEEDED_CONN_ID_BASE: u64 = 1 << 63;

/// service.name and friends per process, read from /proc the first time a process is seen
/// (while it is alive) and kept until it exits.
pub struct ProcessCache {
    rules: Vec<naming::NameRule>,
    host_name: String,
    known: HashMap<u32, Arc<ProcessResource>>,
    /// child -> parent of recent forks (threads included: the kernel reports both), oldest
    /// first in `fork_order`; bounded by MAX_FORKS.
    forks: HashMap<u32, u32>,
    fork_order: std::collections::VecDeque<u32>,
    /// Container identities (resource attributes).
    pub containers: ContainerTable,
}

/// Forks remembered for naming children that are gone before they were named.
const MAX_FORKS: usize = 16384;

impl ProcessCache {
    pub fn new(rules: Vec<naming::NameRule>) -> Self {
        Self {
            rules,
            host_name: host_name(),
            known: HashMap::new(),
            forks: HashMap::new(),
            fork_order: std::collections::VecDeque::new(),
            containers: ContainerTable::default(),
        }
    }

    fn note_fork(&mut self, child: u32, parent: u32) {
        if self.forks.insert(child, parent).is_none() {
            self.fork_order.push_back(child);
        }
        while self.fork_order.len() > MAX_FORKS {
            if let Some(old) = self.fork_order.pop_front() {
                self.forks.remove(&old);
            }
        }
    }

    /// The resource of a process that is gone, from its parent's when it was forked while
    /// we watched (a fork without exec keeps its parent's executable and command line).
    fn inherited(&self, tgid: u32) -> Option<Arc<ProcessResource>> {
        let parent = self.forks.get(&tgid)?;
        let parent = self.known.get(parent)?;
        Some(Arc::new(ProcessResource {
            pid: tgid,
            ..(**parent).clone()
        }))
    }

    fn ensure(&mut self, tgid: u32) {
        self.ensure_named(tgid, None);
    }

    /// As `ensure`, with the command name the kernel reported, used when /proc is too late.
    fn ensure_named(&mut self, tgid: u32, comm: Option<&str>) {
        if !self.known.contains_key(&tgid) {
            let resource = self.read(tgid, comm);
            self.known.insert(tgid, resource);
        }
    }

    fn read(&self, tgid: u32, comm: Option<&str>) -> Arc<ProcessResource> {
        let facts = procfs::read_process(tgid);
        if facts.is_none()
            && let Some(resource) = self.inherited(tgid)
        {
            return resource;
        }
        let facts = facts.unwrap_or_else(|| procfs::ProcFacts {
            tgid,
            comm: comm
                .filter(|c| !c.is_empty())
                .map_or_else(|| format!("pid-{tgid}"), str::to_string),
            ..Default::default()
        });
        self.resource_of(&facts)
    }

    /// Names a process that was just read from /proc (adoption at start reads them all).
    fn ensure_from_facts(&mut self, facts: &procfs::ProcFacts) {
        if !self.known.contains_key(&facts.tgid) {
            let resource = self.resource_of(facts);
            self.known.insert(facts.tgid, resource);
        }
    }

    fn resource_of(&self, facts: &procfs::ProcFacts) -> Arc<ProcessResource> {
        let tgid = facts.tgid;
        debug!(tgid, ?facts, "naming process");
        let executable_name = facts
            .exe
            .as_deref()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| facts.comm.clone());
        let service_name = match plugin_runtime::identify(facts) {
            Some(plugin) if naming::by_rule(facts, &self.rules).is_none() => {
                plugin.service_name(&self.daemon_service(facts.ppid))
            }
            _ => naming::service_name(facts, &self.rules),
        };
        Arc::new(ProcessResource {
            service_name,
            pid: tgid,
            executable_name,
            host_name: self.host_name.clone(),
            container: self.containers.identity_of_pid(tgid),
        })
    }

    /// Service name of the process that started a plugin runtime (the plugin daemon).
    fn daemon_service(&self, ppid: u32) -> String {
        if let Some(known) = self.known.get(&ppid) {
            return known.service_name.clone();
        }
        procfs::read_process(ppid)
            .map(|facts| naming::service_name(&facts, &self.rules))
            .unwrap_or_else(|| "plugin-daemon".into())
    }

    fn forget(&mut self, tgid: u32) {
        self.known.remove(&tgid);
    }

    /// Processes named before their container's names were known get them now.
    fn relabel_containers(&mut self) {
        for resource in self.known.values_mut() {
            if let Some(c) = &resource.container
                && let Some(better) = self.containers.by_id(&c.id)
                && !c.id.is_empty()
                && better != c
            {
                *resource = Arc::new(ProcessResource {
                    container: Some(better.clone()),
                    ..(**resource).clone()
                });
            }
        }
    }
}

impl ResourceSource for ProcessCache {
    fn resource(&mut self, tgid: u32) -> Arc<ProcessResource> {
        self.ensure(tgid);
        match self.known.get(&tgid) {
            Some(r) => r.clone(),
            None => self.read(tgid, None),
        }
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Counters of the user-space side.
#[derive(Debug, Default, Clone, Copy)]
pub struct AgentCounters {
    pub records: u64,
    pub decode_errors: u64,
    /// Connections from the agent's own sockets, ignored.
    pub own_connections: u64,
    /// Spans handed to the exporters.
    pub spans: u64,
}

pub struct Agent {
    probes: Probes,
    selection: Selection,
    conns: ConnTable,
    pipes: PipeTable,
    builder: SpanBuilder,
    procs: ProcessCache,
    own_sockets: SelfSockets,
    go: GoBinaries,
    native: NativeTargets,
    tls: TlsTargets,
    exporter: Exporter,
    counters: AgentCounters,
    stream_events: Vec<StreamEvent>,
    spans: Vec<FinishedSpan>,
    metrics: SpanMetrics,
    /// Spans feed the RED metrics and service graph: only when something reads them (a
    /// Prometheus endpoint or OTLP metrics); otherwise that work is skipped.
    record_metrics: bool,
    map_counts: MapCounts,
    metrics_sink: Option<MetricsSink>,
}

impl Agent {
    /// Handles one ring buffer record.
    pub fn handle_record(&mut self, bytes: &[u8]) {
        self.counters.records += 1;
        match event::decode(bytes) {
            Ok(Event::Data(chunk)) => self.on_data(&chunk),
            Ok(Event::Conn(conn)) => self.on_conn(&conn),
            Ok(Event::Proc(proc_event)) => self.on_proc(&proc_event),
            Ok(Event::Go(record)) => self.on_go(record),
            Ok(Event::Nginx(ev)) => {
                self.builder
                    .nginx_upstream(ev.tgid, ev.downstream_fd, ev.upstream_fd)
            }
            Err(err) => {
                self.counters.decode_errors += 1;
                debug!(%err, "undecodable ring buffer record");
            }
        }
        self.drain();
    }

    fn on_data(&mut self, chunk: &DataChunk<'_>) {
        self.procs.ensure(chunk.tgid);
        let ctx = if let Some(greenlet) = marked_greenlet(chunk.goroutine) {
            greenlet_ctx(greenlet)
        } else if chunk.goroutine != 0 && self.go.is_hooked(chunk.tgid) {
            goroutine_ctx(chunk.goroutine)
        } else if !chunk.pipe && self.native.is_nginx(chunk.tgid) {
            fd_ctx(chunk.fd)
        } else {
            u64::from(chunk.tid)
        };
        let key = ConnKey {
            tgid: chunk.tgid,
            fd: chunk.fd,
            conn_id: chunk.conn_id,
        };
        let ts = ChunkTs {
            enter_ns: chunk.ts_enter_ns,
            exit_ns: chunk.ts_exit_ns,
        };
        if chunk.pipe {
            let verdict = self.pipes.data(
                key,
                ctx,
                chunk.ingress,
                chunk.captured,
                chunk.total_len,
                chunk.seq,
                ts,
                &mut self.stream_events,
            );
            if verdict == PipeVerdict::Mute {
                self.probes.mute_fd(key.tgid, key.fd, key.conn_id);
            }
            return;
        }
        let source = if chunk.tls {
            Source::TlsPlaintext
        } else {
            Source::Socket
        };
        self.conns.data(
            source,
            key,
            ctx,
            chunk.ingress,
            chunk.captured,
            chunk.total_len,
            chunk.seq,
            ts,
            &mut self.stream_events,
        );
    }

    fn on_conn(&mut self, conn: &ConnEvent) {
        let key = ConnKey {
            tgid: conn.tgid,
            fd: conn.fd,
            conn_id: conn.conn_id,
        };
        match conn.kind {
            kind::ACCEPT | kind::CONNECT => {
                let comm = event::comm_str(&conn.comm);
                self.procs.ensure_named(conn.tgid, Some(&comm));
                let conn_role = match conn.role {
                    role::CLIENT => Some(Role::Client),
                    role::SERVER => Some(Role::Server),
                    _ => None,
                };
                let peer = event::socket_addr(&conn.peer);
                let local = event::socket_addr(&conn.local);
                if conn.kind == kind::ACCEPT
                    && let Some(peer) = peer
                    && self.own_sockets.is_own(peer, local, conn.ts_ns)
                {
                    // The agent's own export, received by a traced collector. Records already
                    // in the ring for it are dropped by the ignored entry.
                    self.probes.forget_socket(conn.tgid, conn.fd);
                    self.conns.ignore(key, conn.ts_ns, &mut self.stream_events);
                    self.counters.own_connections += 1;
                    return;
                }
                self.conns
                    .open(key, conn_role, peer, conn.ts_ns, &mut self.stream_events);
                self.conns.set_local(key, local);
            }
            kind::OWN_CONNECT => {
                if let Some(local) = event::socket_addr(&conn.local) {
                    let remote = event::socket_addr(&conn.peer);
                    self.own_sockets.add(local, remote);
                    // The collector's accept may have reached us first.
                    for key in self.conns.keys_with_peer(local, remote) {
                        self.probes.forget_socket(key.tgid, key.fd);
                        self.conns.ignore(key, conn.ts_ns, &mut self.stream_events);
                        self.counters.own_connections += 1;
                    }
                }
            }
            kind::PIPE => {
                let comm = event::comm_str(&conn.comm);
                self.procs.ensure_named(conn.tgid, Some(&comm));
                self.pipes.open(key, conn.inode, conn.ts_ns);
            }
            kind::CLOSE if conn.role == role::PIPE || conn.role == role::IGNORED => {
                self.pipes.close(key);
            }
            kind::CLOSE => self.conns.close(key, conn.ts_ns, &mut self.stream_events),
            _ => {}
        }
    }

    fn on_proc(&mut self, proc_event: &ProcEvent) {
        match proc_event.kind {
            kind::EXEC => {
                // Named again from its new executable, now: a short-lived process may be
                // gone by the time its records are read.
                self.procs.forget(proc_event.tgid);
                self.procs.ensure(proc_event.tgid);
                if self.selection.exes.is_empty() {
                    // Only watched processes report their exec.
                    self.note_binaries(proc_event.tgid);
                    return;
                }
                if let Some(facts) = procfs::read_process(proc_event.tgid)
                    && self.selection.matches(&facts)
                {
                    info!(pid = facts.tgid, comm = %facts.comm, "watching new process");
                    self.probes.watch(facts.tgid);
                    self.note_binaries(facts.tgid);
                }
            }
            kind::FORK => {
                self.procs
                    .note_fork(proc_event.tgid, proc_event.parent_tgid);
                self.go.note_fork(proc_event.tgid, proc_event.parent_tgid);
                self.native
                    .note_fork(proc_event.tgid, proc_event.parent_tgid);
                self.tls.note_fork(proc_event.tgid, proc_event.parent_tgid);
            }
            kind::EXIT => {
                let fds =
                    self.conns
                        .exit(proc_event.tgid, proc_event.ts_ns, &mut self.stream_events);
                let pipe_fds = self.pipes.exit(proc_event.tgid);
                for fd in fds.into_iter().chain(pipe_fds) {
                    self.probes.forget_socket(proc_event.tgid, fd);
                }
                self.drain();
                self.builder.process_exited(
                    proc_event.tgid,
                    proc_event.ts_ns,
                    &mut self.procs,
                    &mut self.spans,
                );
                self.export_spans();
                self.procs.forget(proc_event.tgid);
                self.probes.process_exited(proc_event.tgid);
                self.go.forget_process(proc_event.tgid);
                self.native.forget_process(proc_event.tgid);
                self.tls.forget_process(proc_event.tgid);
            }
            _ => {}
        }
    }

    /// A watched process appeared or exec'd: its executable (Go? nginx?) and libraries
    /// (greenlet?) may want uprobes.
    fn note_binaries(&mut self, tgid: u32) {
        self.go.note_process(tgid);
        let targets = self.native.note_process(tgid, Instant::now());
        self.attach_native(targets, tgid);
        let libs = self.tls.note_process(tgid, Instant::now());
        self.attach_tls(libs);
    }

    /// Python processes that had not imported gevent yet are looked at again.
    pub fn rescan_native(&mut self) {
        let targets = self.native.rescan(Instant::now());
        self.attach_native(targets, 0);
        let libs = self.tls.rescan(Instant::now());
        self.attach_tls(libs);
    }

    fn attach_tls(&mut self, targets: Vec<TlsTarget>) {
        for target in targets {
            let hooked = match self.probes.attach_tls(&target.path) {
                Some(Ok(attached)) => {
                    info!(file = %target.path.display(), symbols = ?attached.symbols, missing = ?attached.missing, "OpenSSL uprobes attached (TLS plaintext)");
                    true
                }
                Some(Err(err)) => {
                    warn!(file = %target.path.display(), "attaching OpenSSL uprobes failed (its TLS traffic is not traced): {err:#}");
                    false
                }
                None => false,
            };
            self.tls.settle(&target, hooked);
        }
    }

    fn attach_native(&mut self, targets: Vec<NativeTarget>, tgid: u32) {
        for target in targets {
            let hooked = match self.probes.attach_native(target.kind, &target.path) {
                Some(Ok(())) => {
                    info!(kind = ?target.kind, file = %target.path.display(), "native uprobes attached");
                    true
                }
                Some(Err(err)) => {
                    warn!(kind = ?target.kind, file = %target.path.display(), "attaching native uprobes failed (linked by thread): {err:#}");
                    false
                }
                None => false,
            };
            self.native.settle(&target, hooked, tgid);
        }
    }

    fn on_go(&mut self, record: GoRecord) {
        let GoRecord {
            op,
            tgid,
            g,
            other,
            value,
            method,
            text,
            ts_ns,
            ..
        } = record;
        let fact = match op {
            go_op::SERVER_START => GoFact::HandlerStart {
                tgid,
                g,
                method,
                path: text,
                ts_ns,
            },
            go_op::SERVER_END => GoFact::HandlerEnd { tgid, g, ts_ns },
            go_op::SPAWN => GoFact::Spawn {
                tgid,
                parent: g,
                child: other,
            },
            go_op::CLIENT_START => GoFact::ClientStart { tgid, g, fd: value },
            go_op::ROUTE if !record.text_truncated => GoFact::Route {
                tgid,
                g,
                route: text,
            },
            _ => match crate::span::builder::grpc_go::GrpcFact::from_go(
                op,
                tgid,
                g,
                other,
                value,
                &text,
                record.text_truncated,
                ts_ns,
            ) {
                Some(fact) => GoFact::Grpc(fact),
                None => return,
            },
        };
        self.builder.on_go(fact);
        self.builder.grpc_flush(&mut self.spans);
    }

    /// The worker's verdict on an executable: a supported Go binary gets its uprobes, and
    /// the processes running it switch to goroutine contexts.
    fn on_inspected(&mut self, inspected: Inspected) {
        let Inspected { file, path, result } = inspected;
        let binary = match result {
            Ok(Some(binary)) => binary,
            Ok(None) => {
                self.go.settle(file, false);
                return;
            }
            Err(err) => {
                warn!(path = %path.display(), %err, "cannot read Go binary facts; its processes are linked by thread");
                self.go.unhooked(file);
                return;
            }
        };
        let version = binary.info.go_version;
        if !version.is_some_and(GoVersion::supported) {
            warn!(
                path = %path.display(),
                go = %binary.info.go_version_raw,
                "Go binary outside the supported range go1.19 .. go1.27: no uprobes, syscall capture only (linked by thread)"
            );
            self.go.unhooked(file);
            return;
        }
        // The process the path named may be gone; any process still running the file will do.
        let target = std::iter::once(path.clone())
            .chain(
                self.go
                    .waiting(file)
                    .iter()
                    .map(|t| std::path::PathBuf::from(format!("/proc/{t}/exe"))),
            )
            .find(|p| p.exists())
            .unwrap_or(path);
        let missing: Vec<String> = binary
            .offsets
            .missing(&binary.info)
            .iter()
            .map(ToString::to_string)
            .collect();
        match self.probes.attach_go(&target, &binary) {
            Some(Ok(attached)) if !attached.hooks.is_empty() => {
                info!(
                    offsets_missing = ?missing,
                    binary = %target.display(),
                    go = %binary.info.go_version_raw,
                    module = %binary.info.main_module,
                    stripped = binary.stripped,
                    dwarf = binary.has_dwarf,
                    hooks = ?attached.hooks,
                    skipped = ?attached.skipped,
                    "Go uprobes attached"
                );
                let tgids = self.go.settle(file, true);
                debug!(?tgids, "processes now linked by goroutine");
            }
            Some(Ok(attached)) => {
                warn!(binary = %target.display(), skipped = ?attached.skipped, offsets_missing = ?missing, "no Go hook could be attached");
                self.go.unhooked(file);
            }
            Some(Err(err)) => {
                warn!(binary = %target.display(), "attaching Go uprobes failed: {err:#}");
                self.go.unhooked(file);
            }
            None => {
                self.go.settle(file, false);
            }
        }
    }

    fn drain(&mut self) {
        if self.stream_events.is_empty() {
            return;
        }
        for event in self.stream_events.drain(..) {
            self.builder
                .on_event(event, &mut self.procs, &mut self.spans);
        }
        // Exported once per ring drain (drain_ring_counted), not per record.
    }

    /// Hands the finished spans over as one batch (one hand-off to the OTLP thread).
    fn export_spans(&mut self) {
        if self.spans.is_empty() {
            return;
        }
        let now = Instant::now();
        for span in &self.spans {
            self.counters.spans += 1;
            if self.record_metrics {
                self.metrics.record(span, now);
            }
        }
        let capacity = self.spans.len();
        let spans = std::mem::replace(&mut self.spans, Vec::with_capacity(capacity));
        self.exporter.export_batch(spans);
    }

    /// Handles at most RING_BATCH records; true when the ring is empty afterwards. Bounded so
    /// the timer and signal arms stay responsive under load.
    fn drain_ring(&mut self, ring: &mut RingBuf<MapData>) -> bool {
        self.drain_ring_counted(ring).1
    }

    /// As `drain_ring`, also returning how many records were handled.
    fn drain_ring_counted(&mut self, ring: &mut RingBuf<MapData>) -> (usize, bool) {
        for handled in 0..RING_BATCH {
            let Some(item) = ring.next() else {
                self.export_spans();
                return (handled, true);
            };
            self.handle_record(&item);
        }
        self.export_spans();
        (RING_BATCH, false)
    }

    /// Spans still waiting for their parent go out as they are.
    fn flush_held(&mut self) {
        self.builder.flush(&mut self.spans);
        self.export_spans();
    }

    /// Periodic housekeeping.
    pub fn tick(&mut self) {
        self.own_sockets.refresh();
        self.probes.sweep_exited();
        let now = monotonic_ns();
        self.conns.evict_idle(now, &mut self.stream_events);
        self.pipes.evict_idle(now);
        self.drain();
        self.builder
            .evict_idle(now, &mut self.procs, &mut self.spans);
        self.export_spans();
        self.metrics.tick(Instant::now());
    }

    /// One line of self-statistics, in a stable `key=value` format (the bench parses it).
    pub fn log_stats(&self) {
        info!("stats {}", self.self_stats().line());
    }

    /// Every counter of the agent, in the order of the stats line (new keys are appended, so
    /// the line's existing prefix stays stable for the bench). The metrics endpoint and the
    /// OTLP self-telemetry read the same snapshot.
    pub fn self_stats(&self) -> SelfStats {
        let k = self.probes.counters();
        let export = self.exporter.stats();
        let kc = |c: u32| k[c as usize];
        let events = kc(counter::DATA_EVENTS) + kc(counter::CONTROL_EVENTS);
        let dropped = kc(counter::DATA_RESERVE_FAILED) + kc(counter::CONTROL_RESERVE_FAILED);
        let s = &self.conns.counters;
        let b = &self.builder.counters;
        let p = &self.pipes.counters;
        let inv = &self.builder.plugins.counters;
        let g = &self.builder.goroutines.counters;
        let tc = &self.builder.context.counters;
        let lb = &self.builder.late.counters;
        // Map occupancy is counted off the loop; walking WATCHED here would stall the loop
        // for every scrape and export. Before the first count, the map is walked once.
        let maps = self.map_counts.get();
        let watched = maps
            .iter()
            .find(|m| m.name == "WATCHED")
            .map_or_else(|| self.probes.watched_len() as u64, |m| m.entries);
        let mut st = SelfStats::default();
        for (key, value) in [
            ("events", events),
            ("dropped", dropped),
            ("spans", self.counters.spans),
            ("export_dropped", export.spans_dropped),
            ("copy_failed", kc(counter::COPY_FAILED)),
            ("inflight_full", kc(counter::INFLIGHT_FULL)),
            ("socket_map_full", kc(counter::SOCKET_MAP_FULL)),
            ("iovec_overflow", kc(counter::IOVEC_OVERFLOW)),
            ("fd_walk_failed", kc(counter::FD_WALK_FAILED)),
            ("other_fd_map_full", kc(counter::OTHER_FD_MAP_FULL)),
            ("records", self.counters.records),
            ("decode_errors", self.counters.decode_errors),
            ("own_connections", self.counters.own_connections),
            ("chunks", s.chunks),
            ("messages", s.messages),
            ("parse_errors", s.parse_errors),
            ("not_http", s.not_http),
            ("h2_conns", s.h2_conns),
            ("h2_streams", s.h2_streams),
            ("h2_errors", s.h2_errors),
            ("lost_records", s.lost_records),
            ("conns", self.conns.len() as u64),
            ("conns_evicted", s.evicted),
            ("pending", self.builder.pending_len() as u64),
            ("active_threads", self.builder.active_len() as u64),
            ("unmatched_responses", b.unmatched_responses),
            ("no_response", b.no_response),
            ("cross_process_links", b.cross_process_links),
            ("h2_headerless", b.h2_headerless),
            ("watched", watched),
            ("pipes", self.pipes.len() as u64),
            ("pipes_muted", p.muted),
            ("stdio_lines", p.lines),
            ("stdio_not_json", p.not_json_lines),
            ("stdio_lost_records", p.lost_records),
            ("plugin_invocations", inv.invocations),
            ("plugin_open", self.builder.plugins.open_len() as u64),
            ("plugin_orphan_events", inv.orphan_events),
            ("plugin_adopted", inv.adopted),
            ("go_binaries", self.go.counters.hooked),
            ("go_unhooked", self.go.counters.unhooked),
            ("go_events", kc(counter::GO_EVENTS)),
            ("go_dropped", kc(counter::GO_RESERVE_FAILED)),
            ("go_inflight_full", kc(counter::GO_INFLIGHT_FULL)),
            ("go_spawns", g.spawns),
            ("go_client_starts", g.client_starts),
            ("go_client_owned", g.client_owned),
            ("go_routes", g.routes),
            ("go_handler_starts", g.handler_starts),
            ("go_handler_rebound", g.handler_rebound),
            ("go_evicted", g.evicted),
            ("greenlet_libs", self.native.counters.greenlet_hooked),
            ("greenlet_switches", kc(counter::GREENLET_SWITCHES)),
            ("greenlet_rescans", self.native.rescanned() as u64),
            ("nginx_binaries", self.native.counters.nginx_hooked),
            ("nginx_events", kc(counter::NGINX_EVENTS)),
            ("nginx_dropped", kc(counter::NGINX_RESERVE_FAILED)),
            ("native_failed", self.native.counters.failed),
            ("trace_joined", tc.joined),
            ("trace_not_joined", tc.not_joined),
            ("dify_roots", tc.dify_roots),
            ("trace_facts", self.builder.context.len() as u64),
            ("trace_facts_evicted", tc.evicted),
            ("late_provisional", lb.provisional),
            ("late_resolved", lb.resolved),
            ("late_fallback", lb.fallback),
            ("late_bound", lb.bound),
            ("late_held", self.builder.late.held_len() as u64),
            ("exited_fd_entries", self.probes.exited_fd_entries),
            ("export_queued", export.spans_queued_otlp),
            ("export_sent", export.spans_sent_otlp),
        ] {
            st.push(key, value);
        }
        st.push_line(
            &self
                .builder
                .grpc
                .counters
                .stats(kc(counter::GRPC_NO_SOCKET)),
        );
        let tree = &export.tree;
        let metrics_export = self
            .metrics_sink
            .as_ref()
            .map(MetricsSink::stats)
            .unwrap_or_default();
        for (key, value) in [
            ("data_events", kc(counter::DATA_EVENTS)),
            ("control_events", kc(counter::CONTROL_EVENTS)),
            ("data_lost", kc(counter::DATA_RESERVE_FAILED)),
            ("control_lost", kc(counter::CONTROL_RESERVE_FAILED)),
            ("export_queue_full", export.spans_dropped_queue_full),
            ("export_failed", export.spans_dropped_export_failed),
            ("export_errors", export.export_errors),
            ("otlp_queue", export.otlp_queue_len),
            ("resources", export.resources),
            ("console_written", export.spans_exported_console),
            ("tree_traces_printed", tree.counters.traces_printed),
            ("tree_single_span_traces", tree.counters.single_span_traces),
            ("tree_evicted_full", tree.counters.evicted_full),
            ("tree_evicted_no_root", tree.counters.evicted_no_root),
            ("tree_spans_evicted", tree.counters.spans_evicted),
            ("tree_flushed_at_stop", tree.counters.flushed_at_stop),
            ("tree_late_spans", tree.counters.late_spans),
            ("tree_traces_held", tree.traces_held),
            ("tree_spans_held", tree.spans_held),
            ("tree_lines_failed", tree.lines_failed),
            ("metrics_exports", metrics_export.exports),
            ("metrics_export_errors", metrics_export.failed),
            ("metrics_dropped", metrics_export.dropped),
            ("tls_libs", self.tls.counters.hooked),
            ("tls_lib_failures", self.tls.counters.failed),
            ("tls_rescans", self.tls.rescanned() as u64),
            ("tls_events", kc(counter::TLS_EVENTS)),
            ("tls_no_socket", kc(counter::TLS_NO_SOCKET)),
            (
                "tls_ciphertext_skipped",
                kc(counter::TLS_CIPHERTEXT_SKIPPED),
            ),
            ("tls_conns", s.tls_conns),
            ("tls_ciphertext_conns", s.tls_ciphertext_conns),
            ("tls_ciphertext_chunks", s.tls_ciphertext_chunks),
        ] {
            st.push(key, value);
        }
        for (key, map) in self_telemetry::MAP_EVICTIONS {
            let evicted = maps.iter().find(|m| m.name == map).and_then(|m| m.evicted);
            st.push(key, evicted.unwrap_or(0));
        }
        self.metrics.push_stats(&mut st);
        st.maps = maps;
        (st.rss_bytes, st.cpu_seconds) = self_telemetry::process_usage();
        st
    }

    /// Metrics and self-telemetry, for a scrape or an OTLP export.
    pub fn metrics_snapshot(&self) -> Snapshot {
        self.metrics.snapshot(self.self_stats())
    }

    /// Hands a snapshot to the OTLP metrics exporter (never blocks).
    fn export_metrics(&self) {
        if let Some(sink) = &self.metrics_sink {
            sink.send(self.metrics_snapshot());
        }
    }
}

/// Loads the probes, applies the selection to running processes, and runs until SIGINT/SIGTERM.
pub async fn run(config: Config) -> anyhow::Result<()> {
    crate::probes::check_kernel()?;
    let selection = config.selection.clone();
    crate::protocol::genai::capture::configure(
        config.capture_body_bytes,
        config.capture_genai_content,
    );
    let trace_all = selection.is_everything();
    let mut watcher = container_watcher(&config)?;
    let kernel_selection = KernelSelection {
        cgroup_filter: config.containers.is_active(),
        trace_all,
        comms: selection.comms.clone(),
        emit_exec: !selection.exes.is_empty(),
        follow_pipes: config.follow_pipes,
        go_uprobes: config.go_uprobes,
        go_handler_returns: config.go_handler_returns,
        greenlets: config.greenlets,
        nginx: config.nginx_uprobes,
        tls: config.tls,
        max_sockets: config.max_sockets,
    };
    let mut probes = Probes::load(&kernel_selection)?;
    let mut own_sockets = SelfSockets::new();
    if probes.reads_local_addresses() {
        own_sockets.reported_by_kernel();
    }
    let ring = probes.take_ring().context("ring buffer already taken")?;

    let exporter = Exporter::new(ExportConfig {
        otlp_endpoint: config.otlp_endpoint.clone(),
        protocol: config.otlp_protocol,
        console: config.console,
    })
    .context("setting up the exporters")?;

    // The metrics endpoint is bound before anything runs, so a taken port fails the start.
    let metrics_listener = match config.metrics_addr {
        Some(addr) => Some(
            server::bind(addr)
                .await
                .with_context(|| format!("cannot serve metrics on {addr}"))?,
        ),
        None => None,
    };
    let metrics_sink = match metrics_endpoint(
        config.otlp_protocol,
        config.otlp_endpoint.as_deref(),
        |name| std::env::var(name).ok(),
    ) {
        Some(endpoint) if config.metrics_interval_secs > 0 => {
            let sink = MetricsSink::new(config.otlp_protocol, endpoint, host_name())
                .context("cannot set up OTLP metrics export")?;
            info!(
                endpoint = sink.endpoint(),
                interval_secs = config.metrics_interval_secs,
                "exporting metrics over OTLP"
            );
            Some(sink)
        }
        _ => None,
    };
    let map_counts = MapCounts::start(probes.map_ids(), Some(probes.churn_sources()));

    let (go, mut go_inspected) = GoBinaries::start()?;
    let mut agent = Agent {
        probes,
        selection,
        go,
        native: NativeTargets::new(config.greenlets, config.nginx_uprobes),
        tls: TlsTargets::new(config.tls),
        conns: ConnTable::new(),
        pipes: PipeTable::new(),
        builder: SpanBuilder::new(Clock::now()),
        procs: ProcessCache::new(config.name_rules.clone()),
        own_sockets,
        exporter,
        counters: AgentCounters::default(),
        stream_events: Vec::new(),
        spans: Vec::new(),
        metrics: SpanMetrics::new(config.metrics_max_series),
        record_metrics: metrics_listener.is_some() || metrics_sink.is_some(),
        map_counts,
        metrics_sink,
    };
    // Scrapes ask the loop for a snapshot; the sender lives as long as the loop even without
    // an endpoint, so the receiving arm simply never fires then.
    let (scrape_tx, mut scrapes) = tokio::sync::mpsc::channel(server::REQUEST_QUEUE);
    if let Some(listener) = metrics_listener {
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, "serving Prometheus metrics at /metrics");
        }
        tokio::spawn(server::serve(listener, scrape_tx.clone()));
    }
    agent.procs.containers = ContainerTable::new(
        watcher
            .as_ref()
            .map(|w| w.filter().cgroups.clone())
            .unwrap_or_default(),
    );
    // The containers that run now, before adoption: with a container filter, only their
    // processes are adopted.
    let mut container_updates = None;
    let mut in_containers = None;
    if let Some(mut w) = watcher.take() {
        let first = w.refresh();
        for given in w.unmatched_containers() {
            warn!(
                container = given,
                "--container names no running container yet (a name needs the Docker API socket, a CRI socket or Kubernetes; an id needs 12+ hex digits); it is picked up when it appears"
            );
        }
        let fs = w.cgroup_fs().clone();
        let pids = agent.apply_container_update(&first, &fs);
        in_containers = config.containers.is_active().then_some(pids);
        if w.has_work() {
            container_updates = Some((containers::spawn(w)?, fs));
        }
    }
    let watched = agent.adopt_running_processes(trace_all, in_containers.as_ref());
    if trace_all && config.containers.is_active() {
        info!(
            processes = watched,
            "tracing every process of the selected containers"
        );
    } else if trace_all {
        info!("tracing every process on this host");
    } else {
        info!(
            processes = watched,
            "tracing the selected processes and their children"
        );
    }
    if let Some(path) = &config.ready_file {
        std::fs::write(path, format!("{}\n", std::process::id()))
            .with_context(|| format!("writing ready file {}", path.display()))?;
    }

    // SAFETY: the RingBuf owns its map fd and moves into the AsyncFd, so the fd stays open
    // and the same for the AsyncFd's whole life.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|err| anyhow::anyhow!("registering the ring buffer with tokio: {err}"))?;
    let mut housekeeping = tokio::time::interval(HOUSEKEEPING_EVERY);
    let mut native_rescan = tokio::time::interval(NATIVE_RESCAN_EVERY);
    // A zero interval disables the stats line; the timer then fires too rarely to matter.
    let stats_every = match config.stats_interval_secs {
        0 => Duration::from_secs(u64::from(u32::MAX)),
        secs => Duration::from_secs(secs),
    };
    let mut stats =
        tokio::time::interval_at(tokio::time::Instant::now() + stats_every, stats_every);
    let metrics_every = match config.metrics_interval_secs {
        0 => Duration::from_secs(u64::from(u32::MAX)),
        secs => Duration::from_secs(secs),
    };
    let mut metrics_export =
        tokio::time::interval_at(tokio::time::Instant::now() + metrics_every, metrics_every);
    // Both listeners live across loop passes so a signal arriving mid-batch is not lost.
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut drain_period = DRAIN_EVERY;
    let mut next_drain = tokio::time::Instant::now() + drain_period;
    loop {
        tokio::select! {
            // The kernel side wakes us only when the ring is filling up.
            guard = ring.readable_mut() => {
                let mut guard = guard.context("waiting on the ring buffer")?;
                // Readiness is cleared only once the ring is empty, or records left behind
                // would wait for the next wake-up.
                if agent.drain_ring(guard.get_inner_mut()) {
                    guard.clear_ready();
                }
            }
            _ = tokio::time::sleep_until(next_drain) => {
                let (handled, _) = agent.drain_ring_counted(ring.get_mut());
                drain_period = if handled > 0 {
                    DRAIN_EVERY
                } else {
                    (drain_period * 2).min(DRAIN_IDLE_MAX)
                };
                next_drain = tokio::time::Instant::now() + drain_period;
            }
            Some(inspected) = go_inspected.recv() => agent.on_inspected(inspected),
            Some((update, fs)) = next_container_update(&mut container_updates) => {
                let pids = agent.apply_container_update(&update, fs);
                if !pids.is_empty() {
                    agent.adopt_running_processes(trace_all, Some(&pids));
                }
            }
            _ = housekeeping.tick() => agent.tick(),
            _ = native_rescan.tick() => agent.rescan_native(),
            _ = stats.tick() => agent.log_stats(),
            _ = metrics_export.tick() => agent.export_metrics(),
            Some(reply) = scrapes.recv() => {
                let _ = reply.send(agent.metrics_snapshot());
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    agent.drain_ring(ring.get_mut());
    agent.flush_held();
    info!("shutting down");
    agent.metrics.settle_all();
    agent.log_stats();
    agent.exporter.shutdown();
    agent.export_metrics();
    if let Some(sink) = &agent.metrics_sink {
        let flush = || sink.shutdown(std::time::Instant::now() + crate::export::SHUTDOWN_TIMEOUT);
        // The gRPC export of the last snapshot runs on this runtime: let it move this
        // worker's other tasks elsewhere while we wait.
        if tokio::runtime::Handle::current().runtime_flavor()
            == tokio::runtime::RuntimeFlavor::MultiThread
        {
            tokio::task::block_in_place(flush);
        } else {
            flush();
        }
    }
    drop(scrape_tx);
    // Once more with what the exporter's flush delivered or dropped: the last line's export
    // counters then add up (spans = export_sent + export_dropped when exporting OTLP).
    agent.log_stats();
    Ok(())
}

impl Agent {
    /// Watches the running processes the selection names (and their descendants) and seeds
    /// their open sockets, so connections from before the agent started are traced too.
    /// `only`, when given, limits adoption to those processes (the ones in selected
    /// containers).
    fn adopt_running_processes(
        &mut self,
        trace_all: bool,
        only: Option<&std::collections::HashSet<u32>>,
    ) -> usize {
        let procs: Vec<procfs::ProcFacts> = procfs::all_pids()
            .into_iter()
            .filter_map(procfs::read_process)
            .collect();
        let me = std::process::id();
        let chosen: Vec<u32> = if trace_all {
            procs.iter().map(|p| p.tgid).filter(|t| *t != me).collect()
        } else {
            self.selection
                .select(&procs)
                .into_iter()
                .filter(|t| *t != me)
                .collect()
        };
        let chosen: Vec<u32> = match only {
            Some(only) => chosen.into_iter().filter(|t| only.contains(t)).collect(),
            None => chosen,
        };
        let mut seeded = 0usize;
        // Adoption runs again for containers that appear later: generations never repeat.
        static SEEDED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let mut next_conn_id =
            SEEDED_CONN_ID_BASE + SEEDED.load(std::sync::atomic::Ordering::Relaxed);
        let mut tables: HashMap<String, HashMap<u64, procfs::TcpSocket>> = HashMap::new();
        let now = monotonic_ns();
        for &tgid in &chosen {
            self.note_binaries(tgid);
            if !trace_all {
                self.probes.watch(tgid);
                // Named now: a process that exits before its first record is read (a
                // recycled worker) would otherwise be gone from /proc.
                if let Some(facts) = procs.iter().find(|p| p.tgid == tgid) {
                    self.procs.ensure_from_facts(facts);
                }
            }
            let fds = procfs::socket_fds(tgid);
            if fds.is_empty() {
                continue;
            }
            // One TCP table per network namespace, not per process.
            let netns = std::fs::read_link(format!("/proc/{tgid}/ns/net"))
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_else(|_| format!("pid-{tgid}"));
            let table = tables
                .entry(netns)
                .or_insert_with(|| procfs::tcp_sockets(tgid));
            let listening: Vec<u16> = fds
                .iter()
                .filter_map(|(_, inode)| table.get(inode))
                .filter(|s| s.state == procfs::TCP_LISTEN)
                .map(|s| s.local.port())
                .collect();
            for (fd, inode) in fds {
                // Only established TCP connections carry requests; listening and Unix
                // sockets would only cost map entries.
                let Some(sock) = table.get(&inode) else {
                    continue;
                };
                if sock.state != procfs::TCP_ESTABLISHED || seeded >= MAX_SEEDED_SOCKETS {
                    continue;
                }
                next_conn_id += 1;
                self.probes.seed_socket(tgid, fd, next_conn_id);
                let role = if listening.contains(&sock.local.port()) {
                    Role::Server
                } else {
                    Role::Client
                };
                let key = ConnKey {
                    tgid,
                    fd,
                    conn_id: next_conn_id,
                };
                self.conns.open_existing(
                    key,
                    Some(role),
                    Some(sock.remote),
                    now,
                    &mut self.stream_events,
                );
                self.conns.set_local(key, Some(sock.local));
                seeded += 1;
            }
        }
        SEEDED.store(
            next_conn_id - SEEDED_CONN_ID_BASE,
            std::sync::atomic::Ordering::Relaxed,
        );
        if seeded >= MAX_SEEDED_SOCKETS {
            warn!(seeded, "not every pre-existing socket was seeded");
        }
        debug!(seeded, "pre-existing sockets seeded");
        chosen.len()
    }
}

/// The container watcher, when anything about containers can be learned or must be
/// enforced; an error only when container flags were given and cannot work here.
fn container_watcher(config: &Config) -> anyhow::Result<Option<containers::Watcher>> {
    let filter = &config.containers;
    let Some(fs) = containers::cgroup_fs::CgroupFs::discover() else {
        if filter.is_active() {
            anyhow::bail!(
                "--container/--cgroup/--k8s-* need a cgroup2 hierarchy (pure v2 or hybrid), and this host has none mounted"
            );
        }
        debug!("no cgroup2 mount: containers are known from /proc/<pid>/cgroup only");
        return Ok(None);
    };
    let mut filter = filter.clone();
    filter.cgroups = filter.cgroups.iter().map(|c| fs.user_path(c)).collect();
    for cgroup in &filter.cgroups {
        if fs.id_of(cgroup).is_none() {
            warn!(%cgroup, root = %fs.root.display(), "--cgroup names no cgroup (yet): it is picked up when it appears");
        }
    }
    let docker = containers::docker_api::DockerApi::new(&config.docker_socket);
    if docker.present() {
        info!(socket = %config.docker_socket.display(), "container names from the Docker API");
    } else {
        debug!(socket = %config.docker_socket.display(), "no Docker API socket: containers are known by id");
    }
    let kube = match &config.kubelet_url {
        Some(url) => match containers::kubelet::source(url, config.kubelet_insecure_tls) {
            Ok(kube) => {
                info!(%url, "pod metadata from the kubelet");
                Some(kube)
            }
            Err(err) => {
                warn!("no pod metadata from the kubelet {url}: {err:#}");
                None
            }
        },
        None => {
            match containers::kube_client::KubeSource::in_cluster(config.k8s_node_name.as_deref()) {
                Ok(kube) => kube,
                Err(err) => {
                    warn!("no Kubernetes metadata: {err:#}");
                    None
                }
            }
        }
    };
    let cri: Vec<_> = containers::cri::sockets(&config.cri_sockets)
        .into_iter()
        .map(|socket| {
            if socket.exists() {
                info!(socket = %socket.display(), "container names and pods from CRI");
            } else {
                warn!(socket = %socket.display(), "--cri-socket does not exist (yet): it is used once it appears");
            }
            containers::cri::CriApi::new(socket, config.k8s_node_name.clone())
        })
        .collect();
    if filter.wants_kubernetes() && kube.is_none() && cri.is_empty() {
        warn!(
            "--k8s-namespace/--k8s-pod-label given, but neither a Kubernetes API nor a CRI socket is reachable (not in a pod?): they select nothing"
        );
    }
    if filter.is_active() {
        info!(filter = ?filter, cgroup2 = %fs.root.display(), "tracing only the selected containers");
    }
    Ok(Some(
        containers::Watcher::new(fs, filter, Some(docker), kube).with_cri(cri),
    ))
}

/// The next container update, or never when there is no watcher.
async fn next_container_update(
    updates: &mut Option<(
        tokio::sync::mpsc::UnboundedReceiver<containers::Update>,
        containers::cgroup_fs::CgroupFs,
    )>,
) -> Option<(containers::Update, &containers::cgroup_fs::CgroupFs)> {
    match updates {
        Some((rx, fs)) => rx.recv().await.map(|u| (u, &*fs)),
        None => std::future::pending().await,
    }
}

impl Agent {
    /// Applies what the container watcher found: identities for resources, and the cgroups
    /// the kernel filter lets through. Returns the processes now in newly selected cgroups.
    fn apply_container_update(
        &mut self,
        update: &containers::Update,
        fs: &containers::cgroup_fs::CgroupFs,
    ) -> std::collections::HashSet<u32> {
        for id in &update.gone {
            self.procs.containers.forget(id);
        }
        if self.procs.containers.learn(&update.identities) {
            self.procs.relabel_containers();
        }
        for &id in &update.removed {
            self.probes.unselect_cgroup(id);
        }
        let mut pids = std::collections::HashSet::new();
        for dir in &update.added {
            match self.probes.select_cgroup(dir.id) {
                Ok(()) => {
                    // age_ms: from the cgroup's creation to its entry in the kernel filter
                    // (for cgroups that predate the agent, simply their age).
                    debug!(
                        cgroup = %dir.path,
                        id = dir.id,
                        age_ms = fs.age(&dir.path).map(|a| a.as_secs_f64() * 1e3),
                        "cgroup selected"
                    );
                    pids.extend(fs.procs(&dir.path));
                }
                Err(err) => warn!("{err:#}"),
            }
        }
        pids
    }
}
