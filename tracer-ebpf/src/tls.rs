//! TLS plaintext: uprobes on OpenSSL (`SSL_write`, `SSL_read` and their `_ex` forms, as
//! Python's `_ssl` calls them) and on Go's `crypto/tls.(*Conn).Write` / `Read`. Their bytes go
//! out as `kind::TLS_DATA` records under the fd, connection id and sequence numbers of the
//! socket underneath, so user space parses them in that connection's stream.
//!
//! The socket fd: OpenSSL hands out an `SSL*`, not an fd. While a thread is inside one of the
//! hooked calls (an entry in SSL_CALLS), the read/write syscall it makes names the socket:
//! `ciphertext()` notes that fd in the call and remembers it per `SSL*` (SSL_FDS) for calls
//! served from OpenSSL's buffers without a syscall. Go's `tls.Conn` holds its `net.Conn`, walked
//! to the fd like the other Go hooks do.
//!
//! The ciphertext: syscalls made inside an SSL call, and every syscall on a socket marked TLS
//! (`SockInfo.tls`, set when its first plaintext is reported), are not copied. Handshake
//! bytes before that still are; user space recognises TLS records and drops them.
//!
//! OpenSSL is C: its return is caught with uretprobes. Go functions get RET-offset probes
//! (see `go.rs`).

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::{map, uprobe, uretprobe},
    maps::LruHashMap,
    programs::{ProbeContext, RetProbeContext},
};
use tracer_common::{
    GREENLET_MARK, MAX_GO_INFLIGHT, MAX_SSL_FDS, MAX_SSL_INFLIGHT, counter, direction, kind, role,
    sock_key,
};

use crate::{
    go,
    syscalls::{emit_buffer, inflight, op},
    util::{SOCKETS, bump, current_if_watched, greenlets, tls},
};

/// An OpenSSL read or write in progress on a thread (pid_tgid -> call).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SslCall {
    pub ssl: u64,
    pub buf: u64,
    /// `size_t *readbytes` / `*written` of the `_ex` forms; 0 for the int-returning ones.
    pub len_ptr: u64,
    pub ts_enter_ns: u64,
    /// Bytes handed to the call (`num`).
    pub num: u64,
    /// The socket the call's syscall used; -1 until one is seen.
    pub fd: i32,
    pub direction: u8,
    pub ex: u8,
    /// A write's plaintext was already reported, at its first socket write.
    pub emitted: u8,
    pub _pad: u8,
}

#[map]
static SSL_CALLS: LruHashMap<u64, SslCall> = LruHashMap::with_max_entries(MAX_SSL_INFLIGHT, 0);

/// (tgid, `SSL*`) -> the socket fd its last syscall used.
#[map]
static SSL_FDS: LruHashMap<[u64; 2], i32> = LruHashMap::with_max_entries(MAX_SSL_FDS, 0);

/// A Go `(*tls.Conn).Read` between its entry and a RET, by (tgid, goroutine).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct GoTlsRead {
    pub buf: u64,
    pub ts_enter_ns: u64,
    pub fd: i32,
    pub _pad: u32,
}

#[map]
static GO_TLS_READS: LruHashMap<[u64; 2], GoTlsRead> =
    LruHashMap::with_max_entries(MAX_GO_INFLIGHT, 0);

/// Called by the syscall hooks for a followed fd: whether this syscall's bytes are TLS
/// ciphertext whose plaintext the uprobes report (then they are not copied).
///
/// A write's plaintext is reported here, at its first socket write, rather than when
/// SSL_write returns: the peer may read, answer and be traced in between, and a request
/// seen after its answer cannot be paired with the server's side any more.
#[inline(always)]
pub fn ciphertext(id: u64, tgid: u32, fd: i32, dir: u8) -> bool {
    if !tls() {
        return false;
    }
    if let Some(call) = SSL_CALLS.get_ptr_mut(&id) {
        // SAFETY: map value pointer of this thread's own entry.
        let c = unsafe { *call };
        // One SSL call uses one socket: a second fd means the entry is stale (its return
        // was never seen) and this syscall is not the call's.
        if c.fd < 0 || c.fd == fd {
            let first_write =
                dir == direction::EGRESS && c.direction == direction::EGRESS && c.emitted == 0;
            // SAFETY: as above.
            unsafe {
                (*call).fd = fd;
                if first_write {
                    (*call).emitted = 1;
                }
            }
            if first_write && c.num > 0 {
                emit_plaintext(
                    id,
                    tgid,
                    fd,
                    direction::EGRESS,
                    c.buf,
                    c.num,
                    c.ts_enter_ns,
                    greenlet_ctx(id),
                );
            }
            bump(counter::TLS_CIPHERTEXT_SKIPPED);
            return true;
        }
    }
    // SAFETY: the flag is copied out.
    match unsafe { SOCKETS.get(&sock_key(tgid, fd)) } {
        Some(info) if info.tls != 0 => {
            bump(counter::TLS_CIPHERTEXT_SKIPPED);
            true
        }
        _ => false,
    }
}

/// Marks (tgid, fd) as a TLS socket; false when it is no followed socket.
#[inline(always)]
fn mark_tls(key: u64) -> bool {
    let Some(sock) = SOCKETS.get_ptr_mut(&key) else {
        return false;
    };
    // SAFETY: map value pointer; a concurrent writer can only write the same flag.
    unsafe {
        if (*sock).role == role::IGNORED || (*sock).role == role::PIPE {
            return false;
        }
        (*sock).tls = 1;
    }
    true
}

/// Reports `n` plaintext bytes at `buf` moved on socket `fd`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn emit_plaintext(
    id: u64,
    tgid: u32,
    fd: i32,
    dir: u8,
    buf: u64,
    n: u64,
    ts_enter_ns: u64,
    ctx: u64,
) {
    let key = sock_key(tgid, fd);
    if !mark_tls(key) {
        bump(counter::TLS_NO_SOCKET);
        return;
    }
    let mut saved = inflight(op::BUF, dir, fd, buf, n);
    saved.ts_enter_ns = ts_enter_ns;
    saved.goroutine = ctx;
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    emit_buffer(kind::TLS_DATA, id, &saved, key, buf, n, now);
    bump(counter::TLS_EVENTS);
}

/// The thread's current greenlet, marked, as the syscall records carry it.
#[inline(always)]
fn greenlet_ctx(id: u64) -> u64 {
    if !greenlets() {
        return 0;
    }
    // SAFETY: copied out of the map value.
    match unsafe { crate::native::GREENLETS.get(&id) } {
        Some(g) => (*g & ((1 << 48) - 1)) | GREENLET_MARK,
        None => 0,
    }
}

#[inline(always)]
fn ssl_enter(ctx: &ProbeContext, dir: u8, ex: bool) -> u32 {
    if !tls() {
        return 0;
    }
    let Some((id, _)) = current_if_watched() else {
        return 0;
    };
    // SAFETY: the context's pt_regs, readable directly by a probe program.
    let (ssl, buf, num, len_ptr) = unsafe {
        let r = &*ctx.regs;
        // `num` is an int for the plain forms: its upper half is not defined.
        let num = if ex { r.rdx } else { r.rdx & 0xffff_ffff };
        (r.rdi, r.rsi, num, if ex { r.rcx } else { 0 })
    };
    let call = SslCall {
        ssl,
        buf,
        len_ptr,
        // SAFETY: helper without arguments.
        ts_enter_ns: unsafe { bpf_ktime_get_ns() },
        num: if num > i32::MAX as u64 && !ex { 0 } else { num },
        fd: -1,
        direction: dir,
        ex: u8::from(ex),
        emitted: 0,
        _pad: 0,
    };
    let _ = SSL_CALLS.insert(&id, &call, 0);
    0
}

/// `int SSL_write(SSL *ssl, const void *buf, int num)`.
#[uprobe(multi)]
pub fn ssl_write_enter(ctx: ProbeContext) -> u32 {
    ssl_enter(&ctx, direction::EGRESS, false)
}

/// `int SSL_write_ex(SSL *s, const void *buf, size_t num, size_t *written)`.
#[uprobe(multi)]
pub fn ssl_write_ex_enter(ctx: ProbeContext) -> u32 {
    ssl_enter(&ctx, direction::EGRESS, true)
}

/// `int SSL_read(SSL *ssl, void *buf, int num)`.
#[uprobe(multi)]
pub fn ssl_read_enter(ctx: ProbeContext) -> u32 {
    ssl_enter(&ctx, direction::INGRESS, false)
}

/// `int SSL_read_ex(SSL *s, void *buf, size_t num, size_t *readbytes)`.
#[uprobe(multi)]
pub fn ssl_read_ex_enter(ctx: ProbeContext) -> u32 {
    ssl_enter(&ctx, direction::INGRESS, true)
}

/// The return of any of the four: what moved is the return value (> 0), or for the `_ex`
/// forms `*len_ptr` when they return 1. A write's buffer is still the caller's, a read's
/// now holds the plaintext.
#[uretprobe(multi)]
pub fn ssl_ret(ctx: RetProbeContext) -> u32 {
    let Some((id, tgid)) = current_if_watched() else {
        return 0;
    };
    // SAFETY: copied out before the entry is removed.
    let Some(call) = (unsafe { SSL_CALLS.get(&id) }).copied() else {
        return 0;
    };
    let _ = SSL_CALLS.remove(&id);
    // SAFETY: the context's pt_regs, readable directly by a probe program.
    let ret = unsafe { (*ctx.regs).rax } as i32;
    let n: u64 = if call.ex != 0 {
        if ret == 1 {
            go::read_user::<u64>(call.len_ptr).unwrap_or(0)
        } else {
            0
        }
    } else if ret > 0 {
        ret as u64
    } else {
        0
    };
    let fd_key = [tgid as u64, call.ssl];
    let fd = if call.fd >= 0 {
        let _ = SSL_FDS.insert(&fd_key, &call.fd, 0);
        call.fd
    } else {
        // SAFETY: copied out.
        match unsafe { SSL_FDS.get(&fd_key) } {
            Some(fd) => *fd,
            None => {
                if n > 0 {
                    bump(counter::TLS_NO_SOCKET);
                }
                return 0;
            }
        }
    };
    // A write reported at its first socket write is done.
    if n == 0 || call.emitted != 0 {
        return 0;
    }
    emit_plaintext(
        id,
        tgid,
        fd,
        call.direction,
        call.buf,
        n,
        call.ts_enter_ns,
        greenlet_ctx(id),
    );
    0
}

/// The fd under a `*tls.Conn` (`c.conn`, a net.Conn, walked like the other Go hooks).
#[inline(always)]
fn go_tls_fd(c: u64, off: &tracer_common::GoOffsets) -> Option<i32> {
    go::net_conn_fd(go::field(c, off.tls_conn_conn), off)
}

/// `crypto/tls.(*Conn).Write(c, b []byte)`: rax = c, rbx/rcx = b's pointer and length. The
/// plaintext is whole at entry; its records are written on this goroutine afterwards.
#[uprobe(multi)]
pub fn go_tls_write_enter(ctx: ProbeContext) -> u32 {
    if !tls() {
        return 0;
    }
    let Some((id, tgid, off)) = go::setup(&ctx) else {
        return 0;
    };
    let r = go::regs(&ctx);
    if r.rcx == 0 {
        return 0;
    }
    let Some(fd) = go_tls_fd(r.rax, &off) else {
        bump(counter::TLS_NO_SOCKET);
        return 0;
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    emit_plaintext(id, tgid, fd, direction::EGRESS, r.rbx, r.rcx, now, r.r14);
    0
}

/// `crypto/tls.(*Conn).Read(c, b []byte)`: remembers b for the RET, and marks the socket so
/// the records read inside are not copied.
#[uprobe(multi)]
pub fn go_tls_read_enter(ctx: ProbeContext) -> u32 {
    if !tls() {
        return 0;
    }
    let Some((_, tgid, off)) = go::setup(&ctx) else {
        return 0;
    };
    let r = go::regs(&ctx);
    let Some(fd) = go_tls_fd(r.rax, &off) else {
        bump(counter::TLS_NO_SOCKET);
        return 0;
    };
    if !mark_tls(sock_key(tgid, fd)) {
        bump(counter::TLS_NO_SOCKET);
        return 0;
    }
    let read = GoTlsRead {
        buf: r.rbx,
        // SAFETY: helper without arguments.
        ts_enter_ns: unsafe { bpf_ktime_get_ns() },
        fd,
        _pad: 0,
    };
    if GO_TLS_READS
        .insert(&[tgid as u64, r.r14], &read, 0)
        .is_err()
    {
        bump(counter::GO_INFLIGHT_FULL);
    }
    0
}

/// A RET of `(*tls.Conn).Read`: rax = n.
#[uprobe(multi)]
pub fn go_tls_read_ret(ctx: ProbeContext) -> u32 {
    let Some((id, tgid, _)) = go::setup(&ctx) else {
        return 0;
    };
    let r = go::regs(&ctx);
    let k = [tgid as u64, r.r14];
    // SAFETY: copied out before the entry is removed.
    let Some(read) = (unsafe { GO_TLS_READS.get(&k) }).copied() else {
        return 0;
    };
    let _ = GO_TLS_READS.remove(&k);
    let n = r.rax as i64;
    if n <= 0 {
        return 0;
    }
    emit_plaintext(
        id,
        tgid,
        read.fd,
        direction::INGRESS,
        read.buf,
        n as u64,
        read.ts_enter_ns,
        r.r14,
    );
    0
}
