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

/// Flags of a map update (`bpf_map_update_elem`), shared by both sides.
pub mod map_update {
    /// Create or replace.
    pub const ANY: u64 = 0;
    /// Create only: fails with EEXIST when the key has an entry.
    pub const NOEXIST: u64 = 1;
}

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
    /// A Go uprobe fired (see `go_op`).
    pub const GO: u8 = 10;
    /// nginx picked the upstream connection for a downstream request (`NginxEvent`).
    pub const NGINX: u8 = 11;
    /// Plaintext of a TLS connection, from the TLS library's uprobes (a `DataEvent`; its
    /// fd, conn_id and seq are those of the socket underneath).
    pub const TLS_DATA: u8 = 12;
}

/// What a `GoEvent` reports.
pub mod go_op {
    /// `net/http.serverHandler.ServeHTTP` entered: `g` starts serving `method` `text` (path).
    pub const SERVER_START: u8 = 1;
    /// ServeHTTP returned on `g` (a RET probe): the handler is done.
    pub const SERVER_END: u8 = 2;
    /// `net/http.(*persistConn).roundTrip` entered on `g`; `value` is the connection's fd.
    pub const CLIENT_START: u8 = 3;
    /// `runtime.newproc1` returned: goroutine `g` created goroutine `other`.
    pub const SPAWN: u8 = 4;
    /// gin matched a route for the request `g` serves; `text` is the route template.
    pub const ROUTE: u8 = 5;
    /// grpc-go `(*Server).handleStream` entered: handler goroutine `g` serves stream `other`
    /// (its HTTP/2 stream id) of server connection `value` (fd); `text` is the method
    /// (`/pkg.Service/Method`).
    pub const GRPC_SERVER_START: u8 = 6;
    /// handleStream returned on `g` (a RET probe): the handler is done.
    pub const GRPC_SERVER_END: u8 = 7;
    /// grpc-go `(*http2Server).writeStatus`: stream `other & 0xffff_ffff` of server
    /// connection `value` ends with gRPC status `other >> 32`.
    pub const GRPC_SERVER_STATUS: u8 = 8;
    /// grpc-go `(*http2Client).NewStream` entered on `g` for client connection `value`.
    pub const GRPC_CLIENT_OPEN: u8 = 9;
    /// NewStream returned on `g` (a RET probe): stream `other` (0: no stream, the call
    /// failed) of client connection `value` (-1 when unknown) carries method `text`.
    pub const GRPC_CLIENT_STREAM: u8 = 10;
    /// grpc-go `(*http2Client).closeStream`: stream `other & 0xffff_ffff` of client
    /// connection `value` ends with gRPC status `other >> 32`.
    pub const GRPC_CLIENT_STATUS: u8 = 11;
}

/// Bytes of a path or route copied into a `GoEvent`.
pub const GO_TEXT: usize = 128;
/// Go binaries with uprobes at once (each has its own field offsets).
pub const MAX_GO_BINARIES: u32 = 256;
/// Goroutines between a hook's entry and its RET probe at once.
pub const MAX_GO_INFLIGHT: u32 = 16384;
/// An unknown field offset in `GoOffsets`: the hooks that need it do nothing.
pub const GO_OFFSET_UNKNOWN: u32 = u32::MAX;

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
    /// Data records carry the Go goroutine (register r14 at syscall entry).
    pub const GO_GOROUTINES: u32 = 8;
    /// Data records carry the thread's current greenlet (marked with `GREENLET_MARK`) when
    /// a greenlet switch was seen on the thread.
    pub const GREENLETS: u32 = 16;
    /// TLS plaintext is captured by uprobes (OpenSSL, Go crypto/tls), and the ciphertext of
    /// sockets known to carry TLS is not copied.
    pub const TLS: u32 = 32;
}

/// OpenSSL calls (SSL_read/SSL_write and their `_ex` forms) in progress at once, one per
/// thread.
pub const MAX_SSL_INFLIGHT: u32 = 16384;
/// `SSL*` objects whose socket fd is remembered at once.
pub const MAX_SSL_FDS: u32 = 65536;

/// Top 16 bits of `DataEvent::goroutine` when it holds a greenlet (a user-space pointer fits
/// in the low 48 bits). A Go goroutine or a stray register never carries this pattern there.
pub const GREENLET_MARK: u64 = 0x4752 << 48;
/// Threads whose current greenlet is remembered at once.
pub const MAX_GREENLET_THREADS: u32 = 16384;
/// nginx threads between a hook's entry and its return at once.
pub const MAX_NGINX_INFLIGHT: u32 = 4096;

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
    /// A Go uprobe event could not be reserved in the ring buffer.
    pub const GO_RESERVE_FAILED: u32 = 10;
    /// Go uprobe events produced.
    pub const GO_EVENTS: u32 = 11;
    /// A Go hook's entry state could not be saved for its RET probe (map full).
    pub const GO_INFLIGHT_FULL: u32 = 12;
    /// Greenlet switches seen in watched processes.
    pub const GREENLET_SWITCHES: u32 = 13;
    /// nginx upstream events produced.
    pub const NGINX_EVENTS: u32 = 14;
    /// An nginx event could not be reserved in the ring buffer.
    pub const NGINX_RESERVE_FAILED: u32 = 15;
    /// A grpc-go hook could not name a followed socket of the process from its transport
    /// (a read faulted, the connection is not a plain `*net.TCPConn`, or its fd is not
    /// followed): no event.
    pub const GRPC_NO_SOCKET: u32 = 16;
    /// TLS plaintext records produced (OpenSSL and Go crypto/tls uprobes).
    pub const TLS_EVENTS: u32 = 17;
    /// A TLS call whose socket could not be named (no fd seen for the `SSL*`, or the fd
    /// is not a followed socket): its plaintext was not reported.
    pub const TLS_NO_SOCKET: u32 = 18;
    /// Syscalls on TLS sockets whose ciphertext was not copied.
    pub const TLS_CIPHERTEXT_SKIPPED: u32 = 19;
    /// SOCKETS entries the kernel side created (an insert that found no entry for the key).
    /// With the removals below, user space derives the entries the LRU map evicted.
    pub const SOCKETS_CREATED: u32 = 20;
    /// SOCKETS entries the kernel side removed (close), counted before the delete.
    pub const SOCKETS_REMOVED: u32 = 21;
    /// Of those, deletes that found the entry gone already (another CPU, or the LRU):
    /// subtracted again.
    pub const SOCKETS_REMOVE_MISSED: u32 = 22;
    /// The same three for OTHER_FDS.
    pub const OTHER_FDS_CREATED: u32 = 23;
    pub const OTHER_FDS_REMOVED: u32 = 24;
    pub const OTHER_FDS_REMOVE_MISSED: u32 = 25;
    pub const COUNT: u32 = 26;
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
    /// The Go goroutine (runtime.g pointer, from r14) that made the syscall when the process
    /// is a Go binary with uprobes and GO_GOROUTINES is on; meaningless otherwise.
    pub goroutine: u64,
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

/// A Go uprobe's report.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct GoEvent {
    pub kind: u8,
    /// `go_op`.
    pub op: u8,
    /// Bytes of `method` used.
    pub method_len: u8,
    pub _pad: u8,
    pub tgid: u32,
    pub tid: u32,
    /// By `op`: the status (SERVER_END), the fd (CLIENT_START).
    pub value: i32,
    pub ts_ns: u64,
    /// The goroutine (runtime.g pointer) the hook ran on; the parent for SPAWN.
    pub g: u64,
    /// The new goroutine (SPAWN).
    pub other: u64,
    /// Bytes of `text` used, and the string's real length.
    pub text_len: u32,
    pub text_total: u32,
    pub method: [u8; 16],
    /// The path (SERVER_START) or route template (ROUTE).
    pub text: [u8; GO_TEXT],
}

/// nginx connected (or took from its keep-alive cache) the upstream connection `upstream_fd`
/// for the request that arrived on `downstream_fd`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NginxEvent {
    pub kind: u8,
    pub _pad: [u8; 3],
    pub tgid: u32,
    pub tid: u32,
    pub downstream_fd: i32,
    pub upstream_fd: i32,
    pub _pad2: u32,
    pub ts_ns: u64,
}

/// Field offsets of one Go binary, indexed by the attach cookie of its uprobes;
/// `GO_OFFSET_UNKNOWN` where the binary's layout is not known.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GoOffsets {
    pub request_method: u32,
    pub request_url: u32,
    pub url_path: u32,
    pub persist_conn_conn: u32,
    pub persist_conn_tls_state: u32,
    pub net_conn_fd: u32,
    pub net_fd_pfd: u32,
    pub poll_fd_sysfd: u32,
    pub gin_context_full_path: u32,
    /// grpc-go: `transport.ServerStream.Stream`, the embedded common stream.
    pub grpc_server_stream_stream: u32,
    /// 1 when that member is a `*Stream` (older releases), 0 when the struct itself.
    pub grpc_server_stream_deref: u32,
    /// `transport.ClientStream.Stream`, and whether it is a pointer.
    pub grpc_client_stream_stream: u32,
    pub grpc_client_stream_deref: u32,
    /// `transport.Stream.method` (string).
    pub grpc_stream_method: u32,
    /// `transport.Stream.id` (uint32), the HTTP/2 stream id.
    pub grpc_stream_id: u32,
    /// `transport.ClientStream.ct` (*http2Client).
    pub grpc_client_stream_ct: u32,
    /// `transport.http2Server.conn` (net.Conn).
    pub grpc_http2_server_conn: u32,
    /// `transport.http2Client.conn` (net.Conn).
    pub grpc_http2_client_conn: u32,
    /// `internal/status.Status.s` (*spb.Status).
    pub grpc_status_s: u32,
    /// `googleapis/rpc/status.Status.Code` (int32).
    pub grpc_status_code: u32,
    /// `crypto/tls.Conn.conn` (net.Conn), the connection under TLS.
    pub tls_conn_conn: u32,
}

impl Default for GoOffsets {
    fn default() -> Self {
        Self {
            request_method: GO_OFFSET_UNKNOWN,
            request_url: GO_OFFSET_UNKNOWN,
            url_path: GO_OFFSET_UNKNOWN,
            persist_conn_conn: GO_OFFSET_UNKNOWN,
            persist_conn_tls_state: GO_OFFSET_UNKNOWN,
            net_conn_fd: GO_OFFSET_UNKNOWN,
            net_fd_pfd: GO_OFFSET_UNKNOWN,
            poll_fd_sysfd: GO_OFFSET_UNKNOWN,
            gin_context_full_path: GO_OFFSET_UNKNOWN,
            grpc_server_stream_stream: GO_OFFSET_UNKNOWN,
            grpc_server_stream_deref: 0,
            grpc_client_stream_stream: GO_OFFSET_UNKNOWN,
            grpc_client_stream_deref: 0,
            grpc_stream_method: GO_OFFSET_UNKNOWN,
            grpc_stream_id: GO_OFFSET_UNKNOWN,
            grpc_client_stream_ct: GO_OFFSET_UNKNOWN,
            grpc_http2_server_conn: GO_OFFSET_UNKNOWN,
            grpc_http2_client_conn: GO_OFFSET_UNKNOWN,
            grpc_status_s: GO_OFFSET_UNKNOWN,
            grpc_status_code: GO_OFFSET_UNKNOWN,
            tls_conn_conn: GO_OFFSET_UNKNOWN,
        }
    }
}

/// Value of the socket map.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct SockInfo {
    pub conn_id: u64,
    pub role: u8,
    /// 1 once the socket is known to carry TLS whose plaintext the uprobes report: its
    /// ciphertext is then not copied.
    pub tls: u8,
    pub _pad: [u8; 2],
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
    // SAFETY: plain repr(C) u32 fields.
    unsafe impl aya::Pod for super::GoOffsets {}
}
