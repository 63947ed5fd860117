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
        go_binaries::{GoBinaries, Inspected},
        gobin::GoVersion,
        naming,
        native_targets::{NativeTarget, NativeTargets},
        plugin_runtime, procfs,
        selection::Selection,
        self_sockets::SelfSockets,
    },
    export::{ExportConfig, Exporter},
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
        ConnKey, ConnTable, PipeTable, PipeVerdict, Role, StreamEvent, fd_ctx, goroutine_ctx,
        greenlet_ctx, marked_greenlet,
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
    exporter: Exporter,
    counters: AgentCounters,
    stream_events: Vec<StreamEvent>,
    spans: Vec<FinishedSpan>,
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
        self.conns.data(
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
    }

    /// Python processes that had not imported gevent yet are looked at again.
    pub fn rescan_native(&mut self) {
        let targets = self.native.rescan(Instant::now());
        self.attach_native(targets, 0);
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
        self.export_spans();
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
        self.export_spans();
    }

    fn export_spans(&mut self) {
        for span in self.spans.drain(..) {
            self.counters.spans += 1;
            self.exporter.export(span);
        }
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
                return (handled, true);
            };
            self.handle_record(&item);
        }
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
    }

    /// One line of self-statistics, in a stable `key=value` format (the bench parses it).
    pub fn log_stats(&self) {
        let k = self.probes.counters();
        let export = self.exporter.stats();
        let events = k[counter::DATA_EVENTS as usize] + k[counter::CONTROL_EVENTS as usize];
        let dropped =
            k[counter::DATA_RESERVE_FAILED as usize] + k[counter::CONTROL_RESERVE_FAILED as usize];
        let s = &self.conns.counters;
        let b = &self.builder.counters;
        let p = &self.pipes.counters;
        let inv = &self.builder.plugins.counters;
        let g = &self.builder.goroutines.counters;
        let tc = &self.builder.context.counters;
        let lb = &self.builder.late.counters;
        info!(
            "stats events={events} dropped={dropped} spans={} export_dropped={} copy_failed={} inflight_full={} socket_map_full={} iovec_overflow={} fd_walk_failed={} other_fd_map_full={} records={} decode_errors={} own_connections={} chunks={} messages={} parse_errors={} not_http={} h2_conns={} h2_streams={} h2_errors={} lost_records={} conns={} conns_evicted={} pending={} active_threads={} unmatched_responses={} no_response={} cross_process_links={} h2_headerless={} watched={} pipes={} pipes_muted={} stdio_lines={} stdio_not_json={} stdio_lost_records={} plugin_invocations={} plugin_open={} plugin_orphan_events={} plugin_adopted={} go_binaries={} go_unhooked={} go_events={} go_dropped={} go_inflight_full={} go_spawns={} go_client_starts={} go_client_owned={} go_routes={} go_handler_starts={} go_handler_rebound={} go_evicted={} greenlet_libs={} greenlet_switches={} greenlet_rescans={} nginx_binaries={} nginx_events={} nginx_dropped={} native_failed={} trace_joined={} trace_not_joined={} dify_roots={} trace_facts={} trace_facts_evicted={} late_provisional={} late_resolved={} late_fallback={} late_bound={} late_held={} exited_fd_entries={} export_queued={} export_sent={} {}",
            self.counters.spans,
            export.spans_dropped,
            k[counter::COPY_FAILED as usize],
            k[counter::INFLIGHT_FULL as usize],
            k[counter::SOCKET_MAP_FULL as usize],
            k[counter::IOVEC_OVERFLOW as usize],
            k[counter::FD_WALK_FAILED as usize],
            k[counter::OTHER_FD_MAP_FULL as usize],
            self.counters.records,
            self.counters.decode_errors,
            self.counters.own_connections,
            s.chunks,
            s.messages,
            s.parse_errors,
            s.not_http,
            s.h2_conns,
            s.h2_streams,
            s.h2_errors,
            s.lost_records,
            self.conns.len(),
            s.evicted,
            self.builder.pending_len(),
            self.builder.active_len(),
            b.unmatched_responses,
            b.no_response,
            b.cross_process_links,
            b.h2_headerless,
            self.probes.watched_len(),
            self.pipes.len(),
            p.muted,
            p.lines,
            p.not_json_lines,
            p.lost_records,
            inv.invocations,
            self.builder.plugins.open_len(),
            inv.orphan_events,
            inv.adopted,
            self.go.counters.hooked,
            self.go.counters.unhooked,
            k[counter::GO_EVENTS as usize],
            k[counter::GO_RESERVE_FAILED as usize],
            k[counter::GO_INFLIGHT_FULL as usize],
            g.spawns,
            g.client_starts,
            g.client_owned,
            g.routes,
            g.handler_starts,
            g.handler_rebound,
            g.evicted,
            self.native.counters.greenlet_hooked,
            k[counter::GREENLET_SWITCHES as usize],
            self.native.rescanned(),
            self.native.counters.nginx_hooked,
            k[counter::NGINX_EVENTS as usize],
            k[counter::NGINX_RESERVE_FAILED as usize],
            self.native.counters.failed,
            tc.joined,
            tc.not_joined,
            tc.dify_roots,
            self.builder.context.len(),
            tc.evicted,
            lb.provisional,
            lb.resolved,
            lb.fallback,
            lb.bound,
            self.builder.late.held_len(),
            self.probes.exited_fd_entries,
            export.spans_queued_otlp,
            export.spans_sent_otlp,
            self.builder
                .grpc
                .counters
                .stats(k[counter::GRPC_NO_SOCKET as usize]),
        );
    }
}

/// Loads the probes, applies the selection to running processes, and runs until SIGINT/SIGTERM.
pub async fn run(config: Config) -> anyhow::Result<()> {
    crate::probes::check_kernel()?;
    let selection = config.selection.clone();
    let trace_all = selection.is_everything();
    let kernel_selection = KernelSelection {
        trace_all,
        comms: selection.comms.clone(),
        emit_exec: !selection.exes.is_empty(),
        follow_pipes: config.follow_pipes,
        go_uprobes: config.go_uprobes,
        greenlets: config.greenlets,
        nginx: config.nginx_uprobes,
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

    let (go, mut go_inspected) = GoBinaries::start()?;
    let mut agent = Agent {
        probes,
        selection,
        go,
        native: NativeTargets::new(config.greenlets, config.nginx_uprobes),
        conns: ConnTable::new(),
        pipes: PipeTable::new(),
        builder: SpanBuilder::new(Clock::now()),
        procs: ProcessCache::new(config.name_rules.clone()),
        own_sockets,
        exporter,
        counters: AgentCounters::default(),
        stream_events: Vec::new(),
        spans: Vec::new(),
    };
    let watched = agent.adopt_running_processes(trace_all);
    if trace_all {
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
            _ = housekeeping.tick() => agent.tick(),
            _ = native_rescan.tick() => agent.rescan_native(),
            _ = stats.tick() => agent.log_stats(),
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    agent.drain_ring(ring.get_mut());
    agent.flush_held();
    info!("shutting down");
    agent.log_stats();
    agent.exporter.shutdown();
    // Once more with what the exporter's flush delivered or dropped: the last line's export
    // counters then add up (spans = export_sent + export_dropped when exporting OTLP).
    agent.log_stats();
    Ok(())
}

impl Agent {
    /// Watches the running processes the selection names (and their descendants) and seeds
    /// their open sockets, so connections from before the agent started are traced too.
    fn adopt_running_processes(&mut self, trace_all: bool) -> usize {
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
        let mut seeded = 0usize;
        let mut next_conn_id = SEEDED_CONN_ID_BASE;
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
        if seeded >= MAX_SEEDED_SOCKETS {
            warn!(seeded, "not every pre-existing socket was seeded");
        }
        debug!(seeded, "pre-existing sockets seeded");
        chosen.len()
    }
}
