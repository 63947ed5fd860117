//! Uprobes on Go binaries (register ABI, Go >= 1.17): which goroutine serves which request,
//! which goroutine started which client request, and which goroutine spawned which.
//!
//! Go functions never get uretprobes: the trampoline they plant on the stack breaks when Go
//! moves a goroutine's stack. User space finds each function's RET instructions instead and
//! attaches the `*_ret` programs there. Each attach point's cookie is the binary's index in
//! GO_OFFSETS, since binaries built by different Go releases lay their structs out
//! differently.
//!
//! Argument registers (ABIInternal): rax, rbx, rcx, rdi, rsi, r8, ...; r14 is the running
//! goroutine (runtime.g).

use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_ktime_get_ns, bpf_probe_read_user,
        generated::{self, bpf_get_attach_cookie},
    },
    macros::{map, uprobe, uretprobe},
    maps::{Array, LruHashMap},
    programs::{ProbeContext, RetProbeContext},
};
use tracer_common::{
    GO_OFFSET_UNKNOWN, GO_TEXT, GoEvent, GoOffsets, MAX_GO_BINARIES, MAX_GO_INFLIGHT, counter,
    go_op, kind,
};

use crate::util::{EVENTS, bump, current_if_watched, wakeup_flags};

/// Field offsets per Go binary, indexed by attach cookie; written by user space.
#[map]
pub static GO_OFFSETS: Array<GoOffsets> = Array::with_max_entries(MAX_GO_BINARIES, 0);

/// What a hook's entry saved for its RET probe: key (tgid << 8 | hook, goroutine or thread).
#[map]
static GO_INFLIGHT: LruHashMap<[u64; 2], u64> = LruHashMap::with_max_entries(MAX_GO_INFLIGHT, 0);

/// Hook ids in GO_INFLIGHT keys.
mod hook {
    pub const NEWPROC: u64 = 2;
    pub const GIN: u64 = 3;
}

/// The argument registers the hooks read (ABIInternal), and the goroutine (r14).
pub(crate) struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdi: u64,
    pub r9: u64,
    pub r14: u64,
}

#[inline(always)]
pub(crate) fn regs(ctx: &ProbeContext) -> Regs {
    // SAFETY: the context's pt_regs, readable directly by a probe program.
    unsafe {
        let r = &*ctx.regs;
        Regs {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdi: r.rdi,
            r9: r.r9,
            r14: r.r14,
        }
    }
}

/// (pid_tgid, tgid, offsets) when the current process is watched and its binary's offsets
/// are registered.
#[inline(always)]
pub(crate) fn setup(ctx: &ProbeContext) -> Option<(u64, u32, GoOffsets)> {
    let (id, tgid) = current_if_watched()?;
    // SAFETY: helper call on this program's context.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) } as u32;
    let offsets = *GO_OFFSETS.get(cookie)?;
    Some((id, tgid, offsets))
}

#[inline(always)]
pub(crate) fn read_user<T: Copy>(addr: u64) -> Option<T> {
    if addr == 0 {
        return None;
    }
    // SAFETY: user memory read through the helper, which faults safely.
    unsafe { bpf_probe_read_user(addr as *const T) }.ok()
}

/// `base + offset` when the offset is known.
#[inline(always)]
pub(crate) fn field(base: u64, offset: u32) -> Option<u64> {
    if base == 0 || offset == GO_OFFSET_UNKNOWN {
        None
    } else {
        Some(base + offset as u64)
    }
}

/// A Go string header (pointer, length) at `addr`.
#[inline(always)]
pub(crate) fn go_string(addr: Option<u64>) -> Option<(u64, u64)> {
    let addr = addr?;
    let ptr: u64 = read_user(addr)?;
    let len: u64 = read_user(addr + 8)?;
    Some((ptr, len))
}

#[inline(always)]
fn key(tgid: u32, hook: u64, who: u64) -> [u64; 2] {
    [((tgid as u64) << 8) | hook, who]
}

#[inline(always)]
fn remember(k: &[u64; 2], value: u64) {
    if GO_INFLIGHT.insert(k, &value, 0).is_err() {
        bump(counter::GO_INFLIGHT_FULL);
    }
}

#[inline(always)]
fn take(k: &[u64; 2]) -> Option<u64> {
    // SAFETY: copied out before the entry is removed.
    let value = unsafe { GO_INFLIGHT.get(k) }.copied()?;
    let _ = GO_INFLIGHT.remove(k);
    Some(value)
}

/// Emits one event; `text` is a Go string copied (a prefix of GO_TEXT bytes) into it,
/// `method` another (16 bytes at most).
#[inline(always)]
pub(crate) fn emit(
    id: u64,
    op: u8,
    g: u64,
    other: u64,
    value: i32,
    method: Option<(u64, u64)>,
    text: Option<(u64, u64)>,
) {
    let Some(mut entry) = EVENTS.reserve::<GoEvent>(0) else {
        bump(counter::GO_RESERVE_FAILED);
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points at a reserved, exclusively owned GoEvent-sized slot; every field
    // is written before it is submitted.
    unsafe {
        (*ev).kind = kind::GO;
        (*ev).op = op;
        (*ev)._pad = 0;
        (*ev).tgid = (id >> 32) as u32;
        (*ev).tid = id as u32;
        (*ev).value = value;
        (*ev).ts_ns = bpf_ktime_get_ns();
        (*ev).g = g;
        (*ev).other = other;
        (*ev).method_len = 0;
        (*ev).text_len = 0;
        (*ev).text_total = 0;
        if let Some((ptr, len)) = method {
            let n = if len > 16 { 16 } else { len as u32 };
            let n = core::hint::black_box(n) & 31;
            if n > 0 && n <= 16 {
                let dst = (*ev).method.as_mut_ptr() as *mut core::ffi::c_void;
                if generated::bpf_probe_read_user(dst, n, ptr as *const core::ffi::c_void) == 0 {
                    (*ev).method_len = n as u8;
                }
            }
        }
        if let Some((ptr, len)) = text {
            (*ev).text_total = len.min(u32::MAX as u64) as u32;
            let n = if len > GO_TEXT as u64 {
                GO_TEXT as u32
            } else {
                len as u32
            };
            let n = core::hint::black_box(n) & (GO_TEXT as u32 * 2 - 1);
            if n > 0 && n <= GO_TEXT as u32 {
                let dst = (*ev).text.as_mut_ptr() as *mut core::ffi::c_void;
                if generated::bpf_probe_read_user(dst, n, ptr as *const core::ffi::c_void) == 0 {
                    (*ev).text_len = n;
                }
            }
        }
    }
    entry.submit(wakeup_flags());
    bump(counter::GO_EVENTS);
}

/// `net/http.serverHandler.ServeHTTP(sh, rw ResponseWriter, req *Request)`: rax = sh,
/// rbx/rcx = rw, rdi = req.
#[uprobe(multi)]
pub fn go_serve_enter(ctx: ProbeContext) -> u32 {
    let Some((id, _, off)) = setup(&ctx) else {
        return 0;
    };
    let r = regs(&ctx);
    let method = go_string(field(r.rdi, off.request_method));
    let url: Option<u64> = field(r.rdi, off.request_url).and_then(read_user);
    let path = go_string(url.and_then(|u| field(u, off.url_path)));
    emit(id, go_op::SERVER_START, r.r14, 0, 0, method, path);
    0
}

/// A RET of ServeHTTP: the handler running on this goroutine is done.
#[uprobe(multi)]
pub fn go_serve_ret(ctx: ProbeContext) -> u32 {
    let Some((id, _, _)) = setup(&ctx) else {
        return 0;
    };
    let r = regs(&ctx);
    emit(id, go_op::SERVER_END, r.r14, 0, 0, None, None);
    0
}

/// `net/http.(*persistConn).roundTrip(pc, req)`: rax = pc. The request's bytes are written
/// later by the connection's writeLoop goroutine; this names the goroutine that asked.
#[uprobe(multi)]
pub fn go_roundtrip_enter(ctx: ProbeContext) -> u32 {
    let Some((id, _, off)) = setup(&ctx) else {
        return 0;
    };
    let r = regs(&ctx);
    // A TLS connection's conn is a *tls.Conn, not the *net.TCPConn walked below.
    let tls: u64 = field(r.rax, off.persist_conn_tls_state)
        .and_then(read_user)
        .unwrap_or(1);
    if tls != 0 {
        return 0;
    }
    if let Some(fd) = net_conn_fd(field(r.rax, off.persist_conn_conn), &off) {
        emit(id, go_op::CLIENT_START, r.r14, 0, fd, None, None);
    }
    0
}

/// `poll.FD.Sysfd` of a closed netFD (Go's `badFD`).
pub(crate) const CLOSED_SYSFD: i64 = -1;

/// `pfd.Sysfd` of the `net.Conn` interface value at `conn`, taking its data for a
/// `*net.TCPConn` (conn → netFD → pfd.Sysfd); None when a read fails.
#[inline(always)]
pub(crate) fn net_conn_sysfd(conn: Option<u64>, off: &GoOffsets) -> Option<i64> {
    // net.Conn interface: (itab, data).
    let tcp_conn: u64 = conn.and_then(|a| read_user(a + 8))?;
    let netfd: u64 = field(tcp_conn, off.net_conn_fd).and_then(read_user)?;
    field(netfd, off.net_fd_pfd)
        .and_then(|p| field(p, off.poll_fd_sysfd))
        .and_then(read_user)
}

/// The fd of the `net.Conn` interface value at `conn` (see [`net_conn_sysfd`]); None when a
/// read fails or the number is no fd.
#[inline(always)]
pub(crate) fn net_conn_fd(conn: Option<u64>, off: &GoOffsets) -> Option<i32> {
    net_conn_sysfd(conn, off).and_then(sysfd_as_fd)
}

/// A `pfd.Sysfd` as an fd number; None when it is none (negative, or beyond an int).
#[inline(always)]
pub(crate) fn sysfd_as_fd(sysfd: i64) -> Option<i32> {
    (0..=i64::from(i32::MAX))
        .contains(&sysfd)
        .then_some(sysfd as i32)
}

/// `runtime.newproc1(fn, callergp, callerpc, ...) *g`: rbx = the creating goroutine. It runs
/// on the system stack (r14 is g0 there), so entry and return meet by thread.
#[uprobe(multi)]
pub fn go_newproc_enter(ctx: ProbeContext) -> u32 {
    let Some((id, tgid)) = current_if_watched() else {
        return 0;
    };
    let r = regs(&ctx);
    remember(&key(tgid, hook::NEWPROC, id), r.rbx);
    0
}

/// newproc1's return: rax = the new goroutine. A uretprobe, unlike every other Go hook: the
/// system stack (g0's) is never moved, so the return address the kernel swaps survives, and
/// the return costs one syscall instead of a RET probe's breakpoint plus single-step.
#[uretprobe(multi)]
pub fn go_newproc_exit(ctx: RetProbeContext) -> u32 {
    let Some((id, tgid)) = current_if_watched() else {
        return 0;
    };
    let Some(parent) = take(&key(tgid, hook::NEWPROC, id)) else {
        return 0;
    };
    // SAFETY: the context's pt_regs, readable directly by a probe program.
    let child = unsafe { (*ctx.regs).rax };
    if parent != 0 && child != 0 {
        emit(id, go_op::SPAWN, parent, child, 0, None, None);
    }
    0
}

/// `gin.(*Engine).handleHTTPRequest(engine, c *Context)`: rbx = c. The route it matches
/// (`c.fullPath`) is set before any handler runs, so it is read at the goroutine's next data
/// syscall (`route_at_syscall`) rather than at a RET probe, whose single-step trap costs
/// several times a syscall's capture; `go_gin_ret` still reads it when RET probes are on.
#[uprobe(multi)]
pub fn go_gin_enter(ctx: ProbeContext) -> u32 {
    let Some((_, tgid, off)) = setup(&ctx) else {
        return 0;
    };
    let r = regs(&ctx);
    let Some(full_path) = field(r.rbx, off.gin_context_full_path) else {
        return 0;
    };
    remember(&key(tgid, hook::GIN, r.r14), full_path);
    0
}

/// A RET of handleHTTPRequest: the route matched, unless a syscall reported it already.
#[uprobe(multi)]
pub fn go_gin_ret(ctx: ProbeContext) -> u32 {
    let Some((id, tgid, _)) = setup(&ctx) else {
        return 0;
    };
    let r = regs(&ctx);
    report_route(id, tgid, r.r14);
    0
}

/// Called at a data syscall of goroutine `g`: reports the gin route its handler matched.
#[inline(always)]
pub(crate) fn route_at_syscall(id: u64, tgid: u32, g: u64) {
    report_route(id, tgid, g);
}

#[inline(always)]
fn report_route(id: u64, tgid: u32, g: u64) {
    let Some(full_path) = take(&key(tgid, hook::GIN, g)) else {
        return;
    };
    let route = go_string(Some(full_path));
    if let Some((_, len)) = route
        && len > 0
    {
        emit(id, go_op::ROUTE, g, 0, 0, None, route);
    }
}
