//! Loads the kernel programs, attaches them, and hands ring buffer records to the pipeline.

pub mod btf;
pub mod churn;
pub mod event;
pub mod go;
pub mod native;
pub mod privileges;
pub mod tls;
pub mod tracefs;

use std::os::fd::AsRawFd as _;

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::{RawTracePoint, TracePoint},
};
use tracer_common::{SockInfo, counter, sock_key};
use tracing::{debug, info, warn};

/// Map update flag: only replace an existing entry.
const BPF_EXIST: u64 = 2;

/// The object built by tracer/build.rs from tracer-ebpf.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"));

/// Raw tracepoints, each served by the program of the same name.
const RAW_TRACEPOINTS: [&str; 2] = ["sys_enter", "sys_exit"];
/// sched tracepoints, each served by the program of the same name.
const SCHED_TRACEPOINTS: [&str; 3] = [
    "sched_process_fork",
    "sched_process_exec",
    "sched_process_exit",
];

/// What the kernel side should select, decided by the CLI.
#[derive(Debug, Clone, Default)]
pub struct KernelSelection {
    pub trace_all: bool,
    pub comms: Vec<String>,
    pub emit_exec: bool,
    /// Follow pipes and FIFOs (plugin stdio) as well as sockets.
    pub follow_pipes: bool,
    /// Put uprobes on Go binaries (goroutine-aware linking, routes).
    pub go_uprobes: bool,
    /// Also the RET probes of Go HTTP handlers (`go::Return::HandlerRets`).
    pub go_handler_returns: bool,
    /// Greenlet contexts for gevent processes (uprobes on greenlet's switch).
    pub greenlets: bool,
    /// nginx upstream uprobes.
    pub nginx: bool,
    /// TLS plaintext uprobes (OpenSSL, Go crypto/tls).
    pub tls: bool,
    /// Only tasks in the cgroups user space puts in CGROUP_FILTER are traced (containers).
    pub cgroup_filter: bool,
    /// Capacity of the SOCKETS map, when not its default (`tracer_common::MAX_SOCKETS`).
    pub max_sockets: Option<u32>,
}

/// The kernel struct offsets for walking an fd to its inode (pipes) and to its socket's
/// local address (connection identity across processes); None for what the kernel's BTF
/// does not have, which turns that feature off.
fn kernel_offsets() -> (Option<btf::FdWalkOffsets>, Option<btf::SockOffsets>) {
    let btf = match btf::Btf::from_sys_fs() {
        Ok(btf) => btf,
        Err(err) => {
            warn!("pipes and local socket addresses are not followed: {err:#}");
            return (None, None);
        }
    };
    let walk = btf::FdWalkOffsets::from_btf(&btf)
        .inspect(|o| debug!(offsets = ?o, "fd walk offsets from kernel BTF"))
        .inspect_err(|err| warn!("pipes (plugin stdio) are not followed: {err}"))
        .ok();
    let sock = btf::SockOffsets::from_btf(&btf)
        .inspect(|o| debug!(offsets = ?o, "socket offsets from kernel BTF"))
        .inspect_err(|err| {
            warn!("local socket addresses are unknown (no cross-process linking): {err}")
        })
        .ok();
    (walk, sock)
}

/// Loaded and attached programs plus handles on the maps user space writes.
pub struct Probes {
    /// Kept alive: dropping it detaches everything. Go uprobes are attached later, per
    /// binary.
    ebpf: Ebpf,
    go: Option<go::GoAttacher>,
    native: native::NativeAttacher,
    native_kinds: Vec<native::NativeKind>,
    /// None when TLS capture is off.
    tls: Option<tls::TlsAttacher>,
    ring: Option<RingBuf<MapData>>,
    watched: BpfHashMap<MapData, u32, u8>,
    sockets: BpfHashMap<MapData, u64, SockInfo>,
    /// fds known not to be followed, keyed like `sockets`.
    other_fds: BpfHashMap<MapData, u64, u8>,
    /// Processes that exited since the last [`Probes::sweep_exited`].
    exited: std::collections::HashSet<u32>,
    /// `SOCKETS` and `OTHER_FDS` entries of exited processes removed by the sweep.
    pub exited_fd_entries: u64,
    counters: PerCpuArray<MapData, u64>,
    cgroup_filter: BpfHashMap<MapData, u64, u8>,
    /// `tracer_common::feature` bits the kernel side was loaded with.
    features: u32,
    /// (name, kernel id) of every hash map, for counting their entries (self-telemetry).
    map_ids: Vec<(String, u32)>,
    /// Kernel id of COUNTERS, for the map-counting thread.
    counters_map_id: u32,
    /// Entries user space itself put into and took out of SOCKETS and OTHER_FDS.
    churn: std::sync::Arc<churn::FdMapChurn>,
}

/// Kernel counters summed over CPUs, indexed by `tracer_common::counter`.
pub type KernelCounters = [u64; counter::COUNT as usize];

impl Probes {
    pub fn load(selection: &KernelSelection) -> anyhow::Result<Self> {
        privileges::check()?;
        tracefs::ensure_mounted()?;
        bump_memlock_rlimit();
        let fork_child_pid_offset =
            tracefs::field_offset("sched", "sched_process_fork", "child_pid")
                .context("reading the sched_process_fork record layout")?;
        let trace_all = u8::from(selection.trace_all);
        let emit_exec = u8::from(selection.emit_exec);
        let cgroup_filter_on = u8::from(selection.cgroup_filter);
        let agent_tgid = std::process::id();
        let (walk, sock) = kernel_offsets();
        let mut features = 0u32;
        if walk.is_some() {
            features |= tracer_common::feature::FD_WALK;
            if selection.follow_pipes {
                features |= tracer_common::feature::FOLLOW_PIPES;
            }
            if sock.is_some() {
                features |= tracer_common::feature::SOCK_LOCAL;
            }
        }
        if selection.go_uprobes {
            features |= tracer_common::feature::GO_GOROUTINES;
        }
        if selection.greenlets {
            features |= tracer_common::feature::GREENLETS;
        }
        if selection.tls {
            features |= tracer_common::feature::TLS;
        }
        let walk = walk.unwrap_or_default();
        let sock = sock.unwrap_or_default();
        let mut loader = EbpfLoader::new();
        if let Some(n) = selection.max_sockets {
            loader.map_max_entries("SOCKETS", n);
        }
        let mut ebpf = loader
            .override_global("TRACE_ALL", &trace_all, true)
            .override_global("EMIT_EXEC", &emit_exec, true)
            .override_global("CGROUP_FILTER_ON", &cgroup_filter_on, true)
            .override_global("AGENT_TGID", &agent_tgid, true)
            .override_global("FORK_CHILD_PID_OFFSET", &fork_child_pid_offset, true)
            .override_global("FEATURES", &features, true)
            .override_global("OFF_FILE_PRIVATE", &sock.file_private, true)
            .override_global("OFF_SOCKET_SK", &sock.socket_sk, true)
            .override_global("OFF_SKC_FAMILY", &sock.skc_family, true)
            .override_global("OFF_SKC_NUM", &sock.skc_num, true)
            .override_global("OFF_SKC_RCV_SADDR", &sock.skc_rcv_saddr, true)
            .override_global("OFF_SKC_V6_RCV_SADDR", &sock.skc_v6_rcv_saddr, true)
            .override_global("OFF_TASK_FILES", &walk.task_files, true)
            .override_global("OFF_FILES_FDT", &walk.files_fdt, true)
            .override_global("OFF_FDT_MAX_FDS", &walk.fdt_max_fds, true)
            .override_global("OFF_FDT_FD", &walk.fdt_fd, true)
            .override_global("OFF_FILE_INODE", &walk.file_inode, true)
            .override_global("OFF_INODE_MODE", &walk.inode_mode, true)
            .override_global("OFF_INODE_INO", &walk.inode_ino, true)
            .load(EBPF_OBJECT)
            .context("loading the eBPF object (is this root on Linux >= 6.1 with BTF?)")?;

        for prog in RAW_TRACEPOINTS {
            attach_raw_tracepoint(&mut ebpf, prog)?;
        }
        for prog in SCHED_TRACEPOINTS {
            attach_tracepoint(&mut ebpf, prog, "sched")?;
        }
        let attached = RAW_TRACEPOINTS.len() + SCHED_TRACEPOINTS.len();

        let mut comm_filter: BpfHashMap<_, [u8; 16], u8> =
            BpfHashMap::try_from(ebpf.take_map("COMM_FILTER").context("map COMM_FILTER")?)?;
        for comm in &selection.comms {
            comm_filter
                .insert(&comm_key(comm), &1, 0)
                .with_context(|| format!("adding comm filter {comm}"))?;
        }
        let map_ids = hash_map_ids(&ebpf);
        let counters_map_id = match ebpf.map("COUNTERS") {
            Some(aya::maps::Map::PerCpuArray(data)) => data.info().context("map COUNTERS")?.id(),
            _ => bail!("map COUNTERS missing from the object"),
        };
        let ring = RingBuf::try_from(ebpf.take_map("EVENTS").context("map EVENTS")?)?;
        let watched = BpfHashMap::try_from(ebpf.take_map("WATCHED").context("map WATCHED")?)?;
        let sockets = BpfHashMap::try_from(ebpf.take_map("SOCKETS").context("map SOCKETS")?)?;
        let other_fds = BpfHashMap::try_from(ebpf.take_map("OTHER_FDS").context("map OTHER_FDS")?)?;
        let counters = PerCpuArray::try_from(ebpf.take_map("COUNTERS").context("map COUNTERS")?)?;
        let cgroup_filter = BpfHashMap::try_from(
            ebpf.take_map("CGROUP_FILTER")
                .context("map CGROUP_FILTER")?,
        )?;
        info!(
            programs = attached,
            ring_fd = ring.as_raw_fd(),
            "eBPF programs attached"
        );
        let go = if selection.go_uprobes {
            Some(
                go::GoAttacher::new(&mut ebpf)?
                    .with_tls(selection.tls)
                    .with_handler_returns(selection.go_handler_returns),
            )
        } else {
            None
        };
        let native_kinds = [
            (selection.greenlets, native::NativeKind::Greenlet),
            (selection.nginx, native::NativeKind::Nginx),
        ]
        .into_iter()
        .filter_map(|(on, kind)| on.then_some(kind))
        .collect();
        Ok(Self {
            ebpf,
            go,
            native: native::NativeAttacher::default(),
            native_kinds,
            tls: selection.tls.then(tls::TlsAttacher::default),
            ring: Some(ring),
            watched,
            sockets,
            other_fds,
            exited: std::collections::HashSet::new(),
            exited_fd_entries: 0,
            counters,
            cgroup_filter,
            features,
            map_ids,
            counters_map_id,
            churn: std::sync::Arc::default(),
        })
    }

    /// Whether the kernel side reads sockets' local addresses (and reports the agent's own
    /// connects).
    pub fn reads_local_addresses(&self) -> bool {
        self.features & tracer_common::feature::SOCK_LOCAL != 0
    }

    /// Attaches the Go hooks to `binary` (found at `target`); None when Go uprobes are off.
    pub fn attach_go(
        &mut self,
        target: &std::path::Path,
        binary: &crate::discover::gobin::GoBinary,
    ) -> Option<anyhow::Result<go::Attached>> {
        let go = self.go.as_mut()?;
        Some(go.attach(&mut self.ebpf, target, binary))
    }

    /// The ring buffer, handed once to the event loop.
    /// Attaches the hooks of `kind` to `target`; None when they are turned off.
    pub fn attach_native(
        &mut self,
        kind: native::NativeKind,
        target: &std::path::Path,
    ) -> Option<anyhow::Result<()>> {
        if !self.native_kinds.contains(&kind) {
            return None;
        }
        Some(self.native.attach(&mut self.ebpf, kind, target))
    }

    /// Attaches the OpenSSL hooks to the libssl at `target`; None when TLS capture is off.
    pub fn attach_tls(
        &mut self,
        target: &std::path::Path,
    ) -> Option<anyhow::Result<tls::AttachedSsl>> {
        let tls = self.tls.as_mut()?;
        Some(tls.attach(&mut self.ebpf, target))
    }

    pub fn take_ring(&mut self) -> Option<RingBuf<MapData>> {
        self.ring.take()
    }

    /// Starts following a process in the kernel.
    pub fn watch(&mut self, tgid: u32) {
        if let Err(err) = self.watched.insert(&tgid, &1, 0) {
            warn!(tgid, %err, "cannot watch process (map full?)");
        }
    }

    /// Seeds a socket that existed before the agent started, so its data is captured.
    pub fn seed_socket(&mut self, tgid: u32, fd: i32, conn_id: u64) {
        let info = SockInfo {
            conn_id,
            role: tracer_common::role::UNKNOWN,
            tls: 0,
            _pad: [0; 2],
            seq: 0,
        };
        let sockets = &self.churn.sockets;
        if let Err(err) = sockets.insert(&mut self.sockets, sock_key(tgid, fd), &info) {
            debug!(tgid, fd, %err, "cannot seed socket");
        }
    }

    /// Keeps the kernel's entry for a followed fd but stops the copying of its bytes (a pipe
    /// that turned out not to carry anything parsed).
    pub fn mute_fd(&mut self, tgid: u32, fd: i32, conn_id: u64) {
        let key = sock_key(tgid, fd);
        // Only the same generation, and only while it exists: muting an fd that was closed
        // (and perhaps reused by the next pipe) would silence the wrong one.
        match self.sockets.get(&key, 0) {
            Ok(mut info) if info.conn_id == conn_id => {
                info.role = tracer_common::role::IGNORED;
                if let Err(err) = self.sockets.insert(&key, &info, BPF_EXIST) {
                    debug!(tgid, fd, %err, "cannot mute fd");
                }
            }
            _ => {}
        }
    }

    /// Drops the kernel's entry for a socket of a process that exited.
    pub fn forget_socket(&mut self, tgid: u32, fd: i32) {
        self.churn
            .sockets
            .remove(&mut self.sockets, &sock_key(tgid, fd));
    }

    /// Lets the tasks of a cgroup through the kernel's container filter.
    pub fn select_cgroup(&mut self, cgroup_id: u64) -> anyhow::Result<()> {
        self.cgroup_filter
            .insert(&cgroup_id, &1, 0)
            .with_context(|| format!("selecting cgroup {cgroup_id} (map full?)"))
    }

    /// Takes a cgroup out of the kernel's container filter.
    pub fn unselect_cgroup(&mut self, cgroup_id: u64) {
        let _ = self.cgroup_filter.remove(&cgroup_id);
    }

    /// Notes a process exit for [`Probes::sweep_exited`]. A process that exits holding fds
    /// leaves their (tgid, fd) entries behind: the kernel closes them without a close()
    /// syscall. Left there, they would fill the LRU maps and, once the pid is reused, make a
    /// new process's fd look like a socket (or like an fd not to follow) that it is not.
    pub fn process_exited(&mut self, tgid: u32) {
        self.exited.insert(tgid);
    }

    /// Removes the `SOCKETS` and `OTHER_FDS` entries of the processes that exited since the
    /// last sweep. One pass over both maps for all of them, so a burst of exits costs one
    /// walk, not one per process.
    pub fn sweep_exited(&mut self) {
        if self.exited.is_empty() {
            return;
        }
        let exited = std::mem::take(&mut self.exited);
        let of_exited = |key: &u64| exited.contains(&((key >> 32) as u32));
        let stale: Vec<u64> = self
            .sockets
            .keys()
            .filter_map(Result::ok)
            .filter(of_exited)
            .collect();
        for key in &stale {
            self.churn.sockets.remove(&mut self.sockets, key);
        }
        let stale_other: Vec<u64> = self
            .other_fds
            .keys()
            .filter_map(Result::ok)
            .filter(of_exited)
            .collect();
        for key in &stale_other {
            self.churn.other_fds.remove(&mut self.other_fds, key);
        }
        let removed = (stale.len() + stale_other.len()) as u64;
        if removed > 0 {
            debug!(
                processes = exited.len(),
                removed, "removed fd entries of exited processes"
            );
        }
        self.exited_fd_entries += removed;
    }

    /// Number of entries in the watched map (for self-statistics).
    pub fn watched_len(&self) -> usize {
        self.watched.keys().count()
    }

    /// (name, kernel id) of every hash map of the object.
    pub fn map_ids(&self) -> Vec<(String, u32)> {
        self.map_ids.clone()
    }

    /// What the map-counting thread needs to derive the evictions of SOCKETS and OTHER_FDS.
    pub fn churn_sources(&self) -> churn::ChurnSources {
        churn::ChurnSources {
            counters_map_id: self.counters_map_id,
            user: self.churn.clone(),
        }
    }

    pub fn counters(&self) -> KernelCounters {
        let mut out = [0u64; counter::COUNT as usize];
        for (index, slot) in out.iter_mut().enumerate() {
            *slot = counter_sum(&self.counters, index as u32);
        }
        out
    }
}

/// One COUNTERS slot summed over the CPUs (0 when it cannot be read).
pub fn counter_sum(counters: &PerCpuArray<MapData, u64>, index: u32) -> u64 {
    counters
        .get(&index, 0)
        .map(|values| values.iter().copied().fold(0, u64::wrapping_add))
        .unwrap_or(0)
}

/// (name, id) of the object's hash maps (LRU or not), while they are all still in it.
fn hash_map_ids(ebpf: &Ebpf) -> Vec<(String, u32)> {
    ebpf.maps()
        .filter_map(|(name, map)| match map {
            aya::maps::Map::HashMap(data) | aya::maps::Map::LruHashMap(data) => {
                Some((name.to_string(), data.info().ok()?.id()))
            }
            _ => None,
        })
        .collect()
}

fn attach_raw_tracepoint(ebpf: &mut Ebpf, prog: &str) -> anyhow::Result<()> {
    let program: &mut RawTracePoint = ebpf
        .program_mut(prog)
        .with_context(|| format!("program {prog} missing from the object"))?
        .try_into()
        .with_context(|| format!("program {prog} is not a raw tracepoint"))?;
    program
        .load()
        .with_context(|| format!("verifier rejected {prog}"))?;
    program
        .attach(prog)
        .with_context(|| format!("attaching raw tracepoint {prog}"))?;
    Ok(())
}

fn attach_tracepoint(ebpf: &mut Ebpf, prog: &str, category: &str) -> anyhow::Result<()> {
    let program: &mut TracePoint = ebpf
        .program_mut(prog)
        .with_context(|| format!("program {prog} missing from the object"))?
        .try_into()
        .with_context(|| format!("program {prog} is not a tracepoint"))?;
    program
        .load()
        .with_context(|| format!("verifier rejected {prog}"))?;
    program
        .attach(category, prog)
        .with_context(|| format!("attaching {category}/{prog}"))?;
    Ok(())
}

/// The kernel stores comm as 16 NUL-padded bytes, at most 15 of them text.
pub fn comm_key(comm: &str) -> [u8; 16] {
    let mut key = [0u8; 16];
    for (dst, src) in key.iter_mut().zip(comm.as_bytes().iter().take(15)) {
        *dst = *src;
    }
    key
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
fn bump_memlock_rlimit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
    if ret != 0 {
        debug!("cannot raise RLIMIT_MEMLOCK; fine on kernels >= 5.11");
    }
}

/// Oldest kernel supported (major, minor).
pub const MIN_KERNEL: (u32, u32) = (6, 1);

/// The running kernel's release string and its (major, minor).
pub fn kernel_release() -> anyhow::Result<(String, (u32, u32))> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("reading /proc/sys/kernel/osrelease")?;
    let release = release.trim().to_string();
    let mut parts = release.split(['.', '-']);
    let major: u32 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((release, (major, minor)))
}

/// Fails with a clear message on kernels older than the supported floor.
pub fn check_kernel() -> anyhow::Result<()> {
    if !cfg!(target_arch = "x86_64") {
        // The kernel side reads syscall arguments from x86_64 pt_regs and numbers.
        bail!("difytrace supports x86_64 only for now");
    }
    let (release, (major, minor)) = kernel_release()?;
    if (major, minor) < MIN_KERNEL {
        bail!("kernel {release} is too old: difytrace needs Linux >= 6.1");
    }
    if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        bail!(
            "kernel BTF (/sys/kernel/btf/vmlinux) is missing: difytrace needs CONFIG_DEBUG_INFO_BTF"
        );
    }
    Ok(())
}
