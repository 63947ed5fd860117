//! Maps, load-time settings and small helpers shared by the hook families.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_current_pid_tgid, generated::bpf_get_current_cgroup_id},
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use tracer_common::{
    DataEvent, MAX_INFLIGHT, MAX_OTHER_FDS, MAX_SOCKETS, MAX_WATCHED, RING_BYTES,
    RING_WAKEUP_BYTES, SockInfo, counter, map_update,
};

/// Load-time settings, written by the agent with `EbpfLoader::override_global`.
/// 1 when every process on the host is traced (no selection given).
#[unsafe(no_mangle)]
static TRACE_ALL: u8 = 0;
/// The agent's own tgid: its exports must never be traced.
#[unsafe(no_mangle)]
static AGENT_TGID: u32 = 0;
/// 1 when only tasks whose cgroup (v2 id) is in CGROUP_FILTER are traced (container
/// selection); 0 keeps the host-wide behaviour without the helper call.
#[unsafe(no_mangle)]
static CGROUP_FILTER_ON: u8 = 0;
/// 1 when user space wants exec events (it matches executables by path).
#[unsafe(no_mangle)]
static EMIT_EXEC: u8 = 0;
/// Offset of `child_pid` in the sched_process_fork record; the layout changed across kernels
/// (inline comm arrays before 6.x, __data_loc strings after), so user space reads it from tracefs.
#[unsafe(no_mangle)]
static FORK_CHILD_PID_OFFSET: u32 = 20;

/// Kernel struct offsets for the fd walk (task_struct.files, files_struct.fdt, fdtable.max_fds,
/// fdtable.fd, file.f_inode, inode.i_mode, inode.i_ino), read from BTF by user space.
/// What of it may be used is in FEATURES (`tracer_common::feature`): the offsets that could
/// not be found turn their feature off, and the user may turn pipes off.
#[unsafe(no_mangle)]
static FEATURES: u32 = 0;
/// Offsets from a file to its socket's local address (file.private_data, socket.sk, and in
/// struct sock_common skc_family, skc_num, skc_rcv_saddr, skc_v6_rcv_saddr).
#[unsafe(no_mangle)]
static OFF_FILE_PRIVATE: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SOCKET_SK: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SKC_FAMILY: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SKC_NUM: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SKC_RCV_SADDR: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SKC_V6_RCV_SADDR: u32 = 0;
#[unsafe(no_mangle)]
static OFF_TASK_FILES: u32 = 0;
#[unsafe(no_mangle)]
static OFF_FILES_FDT: u32 = 0;
#[unsafe(no_mangle)]
static OFF_FDT_MAX_FDS: u32 = 0;
#[unsafe(no_mangle)]
static OFF_FDT_FD: u32 = 0;
#[unsafe(no_mangle)]
static OFF_FILE_INODE: u32 = 0;
#[unsafe(no_mangle)]
static OFF_INODE_MODE: u32 = 0;
#[unsafe(no_mangle)]
static OFF_INODE_INO: u32 = 0;

/// The fd-walk offsets, in the order of the globals above.
#[derive(Clone, Copy)]
pub struct FdWalk {
    pub task_files: u64,
    pub files_fdt: u64,
    pub fdt_max_fds: u64,
    pub fdt_fd: u64,
    pub file_inode: u64,
    pub inode_mode: u64,
    pub inode_ino: u64,
}

/// Offsets from a socket's file to its local address.
#[derive(Clone, Copy)]
pub struct SockWalk {
    pub file_private: u64,
    pub socket_sk: u64,
    pub skc_family: u64,
    pub skc_num: u64,
    pub skc_rcv_saddr: u64,
    pub skc_v6_rcv_saddr: u64,
}

#[inline(always)]
fn feature(bit: u32) -> bool {
    // SAFETY: read of a load-time constant; volatile so the compiler keeps the load.
    unsafe { core::ptr::read_volatile(&FEATURES) & bit != 0 }
}

#[inline(always)]
pub fn go_goroutines() -> bool {
    feature(tracer_common::feature::GO_GOROUTINES)
}

#[inline(always)]
pub fn greenlets() -> bool {
    feature(tracer_common::feature::GREENLETS)
}

#[inline(always)]
pub fn tls() -> bool {
    feature(tracer_common::feature::TLS)
}

#[inline(always)]
pub fn follow_pipes() -> bool {
    feature(tracer_common::feature::FOLLOW_PIPES)
}

/// The socket-address offsets, or None when unknown.
#[inline(always)]
pub fn sock_walk() -> Option<SockWalk> {
    // SAFETY: reads of load-time constants; volatile so the compiler keeps the loads.
    unsafe {
        if !feature(tracer_common::feature::SOCK_LOCAL) {
            return None;
        }
        Some(SockWalk {
            file_private: core::ptr::read_volatile(&OFF_FILE_PRIVATE) as u64,
            socket_sk: core::ptr::read_volatile(&OFF_SOCKET_SK) as u64,
            skc_family: core::ptr::read_volatile(&OFF_SKC_FAMILY) as u64,
            skc_num: core::ptr::read_volatile(&OFF_SKC_NUM) as u64,
            skc_rcv_saddr: core::ptr::read_volatile(&OFF_SKC_RCV_SADDR) as u64,
            skc_v6_rcv_saddr: core::ptr::read_volatile(&OFF_SKC_V6_RCV_SADDR) as u64,
        })
    }
}

/// The fd-walk offsets, or None when they are unknown.
#[inline(always)]
pub fn fd_walk() -> Option<FdWalk> {
    // SAFETY: reads of load-time constants; volatile so the compiler keeps the loads.
    unsafe {
        if !feature(tracer_common::feature::FD_WALK) {
            return None;
        }
        Some(FdWalk {
            task_files: core::ptr::read_volatile(&OFF_TASK_FILES) as u64,
            files_fdt: core::ptr::read_volatile(&OFF_FILES_FDT) as u64,
            fdt_max_fds: core::ptr::read_volatile(&OFF_FDT_MAX_FDS) as u64,
            fdt_fd: core::ptr::read_volatile(&OFF_FDT_FD) as u64,
            file_inode: core::ptr::read_volatile(&OFF_FILE_INODE) as u64,
            inode_mode: core::ptr::read_volatile(&OFF_INODE_MODE) as u64,
            inode_ino: core::ptr::read_volatile(&OFF_INODE_INO) as u64,
        })
    }
}

#[inline(always)]
pub fn trace_all() -> bool {
    // SAFETY: read of a load-time constant; volatile so the compiler keeps the load.
    unsafe { core::ptr::read_volatile(&TRACE_ALL) != 0 }
}

#[inline(always)]
fn cgroup_filter_on() -> bool {
    // SAFETY: read of a load-time constant; volatile so the compiler keeps the load.
    unsafe { core::ptr::read_volatile(&CGROUP_FILTER_ON) != 0 }
}

/// Whether the current task's cgroup is selected (always true without a cgroup filter).
#[inline(always)]
fn current_cgroup_selected() -> bool {
    if !cgroup_filter_on() {
        return true;
    }
    // SAFETY: helper without arguments; the value is only tested for presence.
    unsafe { CGROUP_FILTER.get(&bpf_get_current_cgroup_id()) }.is_some()
}

#[inline(always)]
pub fn emit_exec() -> bool {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(&EMIT_EXEC) != 0 }
}

#[inline(always)]
pub fn fork_child_pid_offset() -> usize {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(&FORK_CHILD_PID_OFFSET) as usize }
}

/// Whether the current task belongs to the agent.
#[inline(always)]
pub fn current_is_agent() -> Option<u64> {
    let id = bpf_get_current_pid_tgid();
    ((id >> 32) as u32 == agent_tgid()).then_some(id)
}

#[inline(always)]
fn agent_tgid() -> u32 {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(&AGENT_TGID) }
}

/// All records for user space.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);

/// Watched tgids (and, harmlessly, tids of their threads: a fork hook cannot tell a thread
/// from a process, and thread entries are removed when the thread exits).
#[map]
pub static WATCHED: HashMap<u32, u8> = HashMap::with_max_entries(MAX_WATCHED, 0);

/// Cgroup v2 ids (a container's cgroup and its descendants) whose tasks may be traced, when
/// CGROUP_FILTER_ON. Kept current by user space as containers come and go.
#[map]
pub static CGROUP_FILTER: HashMap<u64, u8> = HashMap::with_max_entries(MAX_SELECTED_CGROUPS, 0);
const MAX_SELECTED_CGROUPS: u32 = 16384;

/// Command names whose exec makes a process watched.
#[map]
pub static COMM_FILTER: HashMap<[u8; 16], u8> = HashMap::with_max_entries(64, 0);

/// (tgid, fd) -> connection, for sockets of watched processes. LRU so that sockets of
/// processes that vanished without a close cannot fill it.
#[map]
pub static SOCKETS: LruHashMap<u64, SockInfo> = LruHashMap::with_max_entries(MAX_SOCKETS, 0);

/// (tgid, fd) of watched processes known not to be followed (regular files, unix sockets,
/// ...): their reads and writes then cost one lookup, not an fd-table walk. LRU and apart
/// from SOCKETS so a process with many files cannot push connections out.
#[map]
pub static OTHER_FDS: LruHashMap<u64, u8> = LruHashMap::with_max_entries(MAX_OTHER_FDS, 0);

/// Per-CPU assembly slot for a data record (too big for the 512-byte BPF stack).
#[map]
pub static SCRATCH: PerCpuArray<DataEvent> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU counters, indexed by `tracer_common::counter`.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Arguments of a syscall between its enter and exit, keyed by pid_tgid.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Inflight {
    pub op: u8,
    pub direction: u8,
    pub _pad: [u8; 2],
    pub fd: i32,
    /// Buffer, iovec array, msghdr or sockaddr pointer, by `op`.
    pub ptr: u64,
    /// Buffer length or iovec count.
    pub len: u64,
    pub ts_enter_ns: u64,
    /// Peer address read at connect enter (the user buffer is only sure to be valid then).
    pub family: u16,
    pub port: u16,
    pub _pad2: u32,
    pub addr: [u8; 16],
    /// r14 at entry: the goroutine, for Go processes.
    pub goroutine: u64,
}

#[map]
pub static INFLIGHT: LruHashMap<u64, Inflight> = LruHashMap::with_max_entries(MAX_INFLIGHT, 0);

/// Flags for a ring buffer write: no wake-up unless the agent is falling behind.
#[inline(always)]
pub fn wakeup_flags() -> u64 {
    if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= RING_WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

#[inline(always)]
pub fn bump(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while we run.
        unsafe { *slot += 1 };
    }
}

/// -EEXIST from an update with BPF_NOEXIST: the key has an entry.
const ERR_EXISTS: i32 = -17;

/// Puts `value` at `key` in an LRU map whose churn is counted, bumping `created` when the
/// entry is a new one. The agent derives the entries the kernel evicted (silently, when the
/// map is full) as created - removed - live, so a replacement must not count as created:
/// a stale entry for the same key (an fd closed without a close() we saw: close_range,
/// exec) is replaced without a count.
#[inline(always)]
pub fn put_counted<K, V>(
    map: &LruHashMap<K, V>,
    key: &K,
    value: &V,
    created: u32,
) -> Result<(), i32> {
    match map.insert(key, value, map_update::NOEXIST) {
        Ok(()) => {
            bump(created);
            Ok(())
        }
        Err(ERR_EXISTS) => map.insert(key, value, map_update::ANY),
        Err(err) => Err(err),
    }
}

/// Removes `key`, which a lookup just found, from an LRU map whose churn is counted. The
/// removal is counted before the delete, so the agent's walk of the map never misses an entry
/// that is not counted yet (which would read as an eviction); a delete that finds the entry
/// gone already (another CPU removed it, or the LRU evicted it) is taken back with `missed`.
#[inline(always)]
pub fn remove_counted<K, V>(map: &LruHashMap<K, V>, key: &K, removed: u32, missed: u32) {
    bump(removed);
    if map.remove(key).is_err() {
        bump(missed);
    }
}

/// (pid_tgid, tgid) of the current task, or None when it is not watched.
#[inline(always)]
pub fn current_if_watched() -> Option<(u64, u32)> {
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    if tgid == agent_tgid() || !current_cgroup_selected() {
        return None;
    }
    if trace_all() {
        return Some((id, tgid));
    }
    // SAFETY: the value is only tested for presence.
    if unsafe { WATCHED.get(&tgid) }.is_some() {
        Some((id, tgid))
    } else {
        None
    }
}
