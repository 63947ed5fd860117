//! Records shared by the kernel programs and the agent. Plain `#[repr(C)]` data, no logic.
#![no_std]

/// Bytes of one syscall buffer (or one iovec) copied per data event. A power of two so the
/// kernel side can bound lengths with a mask the verifier understands.
pub const MAX_CAPTURE: usize = 4096;
/// Iovecs of one readv/writev/sendmsg/recvmsg that are copied; bytes beyond them are
/// reported as a gap so byte counts stay exact.
pub const MAX_IOVECS: usize = 32;
/// Capacity of the watched-process map.
pub const MAX_WATCHED: u32 = 16384;
/// Capacity of the socket map (tgid, fd) -> connection.
pub const MAX_SOCKETS: u32 = 65536;
/// Capacity of the map of fds known not to be followed (files, unix sockets, ...), so the
/// kernel side classifies each fd of a watched process once rather than on every read.
pub const MAX_OTHER_FDS: u32 = 65536;
/// Bytes copied from the end of a buffer larger than MAX_CAPTURE, as a separate chunk: line
/// and chunk terminators sit there, and framing needs them even when the middle is skipped.
pub const TAIL_CAPTURE: u32 = 128;
/// Syscalls in flight (one per thread) whose arguments are kept until their exit.
pub const MAX_INFLIGHT: u32 = 16384;
/// Ring buffer size in bytes (a power of two, multiple of the page size).
pub const RING_BYTES: u32 = 8 << 20;
/// Unread bytes in the ring buffer above which the kernel side wakes the agent at once.
/// Below it records wait for the agent's periodic drain: one wake-up per record would cost
/// the traced host more than the copying does.
pub const RING_WAKEUP_BYTES: u64 = 1 << 20;

/// First byte of every ring buffer record.
pub mod kind {
    pub const DATA: u8 = 1;
    pub const CONNECT: u8 = 2;
    pub const ACCEPT: u8 = 3;
    pub const CLOSE: u8 = 4;
    pub const EXEC: u8 = 5;
    pub const EXIT: u8 = 6;
    pub const FORK: u8 = 7;
    /// A pipe or FIFO fd of a watched process, seen for the first time.
    pub const PIPE: u8 = 8;
    /// A connect() of the agent itself (its exports), with the local address: a traced
    /// collector that accepts from there must not be traced (no feedback loop).
    pub const OWN_CONNECT: u8 = 9;
}

/// Direction of a data event relative to the process that made the syscall.
pub mod direction {
    /// The process wrote these bytes (write, writev, sendto, sendmsg).
    pub const EGRESS: u8 = 0;
    /// The process read these bytes (read, readv, recvfrom, recvmsg).
    pub const INGRESS: u8 = 1;
}

/// Role of a socket as learned from the syscall that created it.
pub mod role {
    pub const UNKNOWN: u8 = 0;
    /// Created by connect(): the process is the client.
    pub const CLIENT: u8 = 1;
    /// Created by accept(): the process is the server.
    pub const SERVER: u8 = 2;
    /// A pipe or FIFO (found by walking the fd table).
    pub const PIPE: u8 = 3;
    /// Followed fd whose bytes user space does not want (e.g. a pipe that carries no JSON
    /// lines): the entry stays so the fd is not classified again, but nothing is copied.
    pub const IGNORED: u8 = 4;
}

/// Bits of the kernel side's FEATURES load-time setting.
pub mod feature {
    /// Kernel offsets for the fd-table walk are known.
    pub const FD_WALK: u32 = 1;
    /// Pipes are followed (needs FD_WALK).
    pub const FOLLOW_PIPES: u32 = 2;
    /// Sockets' local addresses are read at accept/connect (needs FD_WALK).
    pub const SOCK_LOCAL: u32 = 4;
}

/// Indexes into the per-CPU drop counter array.
pub mod counter {
    /// A data event could not be reserved in the ring buffer.
    pub const DATA_RESERVE_FAILED: u32 = 0;
    /// Copying user memory failed; the event was sent with no captured bytes.
    pub const COPY_FAILED: u32 = 1;
    /// A control event (connect/accept/close/exec/exit) could not be reserved.
    pub const CONTROL_RESERVE_FAILED: u32 = 2;
    /// The in-flight syscall map was full.
    pub const INFLIGHT_FULL: u32 = 3;
    /// The socket map refused an insert.
    pub const SOCKET_MAP_FULL: u32 = 4;
    /// Data events produced.
    pub const DATA_EVENTS: u32 = 5;
    /// Control events produced.
    pub const CONTROL_EVENTS: u32 = 6;
    /// Iovecs beyond MAX_IOVECS, reported as gaps.
    pub const IOVEC_OVERFLOW: u32 = 7;
    /// Walking the fd table of a task failed (a kernel read faulted).
    pub const FD_WALK_FAILED: u32 = 8;
    /// The map of unfollowed fds refused an insert.
    pub const OTHER_FD_MAP_FULL: u32 = 9;
    pub const COUNT: u32 = 10;
}

/// One syscall's (or one iovec's) bytes on a socket.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DataEvent {
    pub kind: u8,
    pub direction: u8,
    /// Index of this chunk within the syscall (iovec number); 0 for plain read/write.
    pub chunk: u8,
    /// `role` of the fd (socket or pipe) when the record was made.
    pub role: u8,
    pub fd: i32,
    pub tgid: u32,
    pub tid: u32,
    /// Generation of the socket behind `fd`, assigned when it was accepted or connected.
    pub conn_id: u64,
    pub ts_enter_ns: u64,
    pub ts_exit_ns: u64,
    pub cgroup_id: u64,
    /// Bytes the syscall really moved for this chunk.
    pub total_len: u64,
    /// Bytes of `buf` that hold data (<= MAX_CAPTURE, <= total_len).
    pub captured_len: u32,
    /// Per-socket sequence number of data records, counted also for records that could not
    /// be written, so user space can tell that a record of this connection was lost.
    pub seq: u32,
    pub buf: [u8; MAX_CAPTURE],
}

/// A socket address in a fixed layout (IPv4 as v4-mapped IPv6).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct SockAddr {
    /// AF_INET (2), AF_INET6 (10) or 0 when unknown.
    pub family: u16,
    /// Host byte order.
    pub port: u16,
    pub _pad: u32,
    pub addr: [u8; 16],
}

/// connect / accept / close of a tracked socket.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConnEvent {
    pub kind: u8,
    pub role: u8,
    pub _pad: [u8; 2],
    pub fd: i32,
    pub tgid: u32,
    pub tid: u32,
    pub conn_id: u64,
    pub ts_ns: u64,
    pub cgroup_id: u64,
    pub peer: SockAddr,
    /// Local address of a socket (accept/connect), read from the kernel's socket; family 0
    /// when unknown. With `peer` it names the connection across processes.
    pub local: SockAddr,
    /// Inode number of a pipe (its two ends share it); 0 for sockets.
    pub inode: u64,
    /// Command name of the process: short-lived clients are often gone before user space
    /// can read /proc, and this is then all that names them.
    pub comm: [u8; 16],
}

/// exec / exit / fork of a process.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProcEvent {
    pub kind: u8,
    pub _pad: [u8; 3],
    pub tgid: u32,
    /// Parent tgid for FORK; 0 otherwise.
    pub parent_tgid: u32,
    pub _pad2: u32,
    pub ts_ns: u64,
    pub cgroup_id: u64,
    pub comm: [u8; 16],
}

/// Value of the socket map.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct SockInfo {
    pub conn_id: u64,
    pub role: u8,
    pub _pad: [u8; 3],
    /// Sequence number of the next data record of this socket.
    pub seq: u32,
}

/// Key of the socket map: tgid in the high half, fd in the low half.
#[inline(always)]
pub const fn sock_key(tgid: u32, fd: i32) -> u64 {
    ((tgid as u64) << 32) | (fd as u32 as u64)
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain repr(C) data without padding-dependent invariants.
    unsafe impl aya::Pod for super::SockInfo {}
}
