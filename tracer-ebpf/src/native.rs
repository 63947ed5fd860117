//! Uprobes on C code of the processes around the API: which greenlet a gevent thread is
//! running (so one OS thread serving many requests still tells them apart), and which
//! downstream request an nginx worker opened or reused an upstream connection for (one
//! nginx thread proxies every request at once).
//!
//! C functions keep their frames on a normal stack, so uretprobes are safe here (unlike Go).

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_probe_read_user},
    macros::{map, uprobe, uretprobe},
    maps::LruHashMap,
    programs::{ProbeContext, RetProbeContext},
};
use tracer_common::{MAX_GREENLET_THREADS, MAX_NGINX_INFLIGHT, NginxEvent, counter, kind};

use crate::util::{EVENTS, bump, current_if_watched, wakeup_flags};

/// The greenlet each thread runs now (pid_tgid -> greenlet::Greenlet*), read at syscall entry.
#[map]
pub static GREENLETS: LruHashMap<u64, u64> = LruHashMap::with_max_entries(MAX_GREENLET_THREADS, 0);

/// The `ngx_http_request_t*` whose upstream an nginx thread is setting up (pid_tgid -> r).
#[map]
static NGX_REQUEST: LruHashMap<u64, u64> = LruHashMap::with_max_entries(MAX_NGINX_INFLIGHT, 0);

/// The `ngx_peer_connection_t*` an nginx thread is connecting (pid_tgid -> pc).
#[map]
static NGX_PEER: LruHashMap<u64, u64> = LruHashMap::with_max_entries(MAX_NGINX_INFLIGHT, 0);

/// Offsets that have not changed since nginx 1.0: `ngx_http_request_t.connection` (after a
/// u32 signature), `ngx_connection_t.fd` (after data, read, write pointers) and
/// `ngx_peer_connection_t.connection` (its first field).
const NGX_REQUEST_CONNECTION: u64 = 8;
const NGX_CONNECTION_FD: u64 = 24;
const NGX_PEER_CONNECTION: u64 = 0;

#[inline(always)]
fn arg0(ctx: &ProbeContext) -> u64 {
    // SAFETY: the context's pt_regs, readable directly by a probe program.
    unsafe { (*ctx.regs).rdi }
}

#[inline(always)]
fn read_user<T: Copy>(addr: u64) -> Option<T> {
    if addr == 0 {
        return None;
    }
    // SAFETY: user memory read through the helper, which faults safely.
    unsafe { bpf_probe_read_user(addr as *const T) }.ok()
}

/// `OwnedGreenlet greenlet::Greenlet::g_switchstack_success(this)`: runs on the greenlet just
/// switched to, right after its stack is in place, for every switch (first start included).
/// The returned object has a destructor, so the C++ ABI passes the return slot in rdi and
/// `this` in rsi.
#[uprobe(multi)]
pub fn greenlet_switched(ctx: ProbeContext) -> u32 {
    let Some((id, _)) = current_if_watched() else {
        return 0;
    };
    // SAFETY: the context's pt_regs, readable directly by a probe program.
    let greenlet = unsafe { (*ctx.regs).rsi };
    if greenlet != 0 {
        let _ = GREENLETS.insert(&id, &greenlet, 0);
        bump(counter::GREENLET_SWITCHES);
    }
    0
}

/// `ngx_http_upstream_init(r)`: the request whose upstream connection comes next on this thread.
#[uprobe(multi)]
pub fn ngx_upstream_init(ctx: ProbeContext) -> u32 {
    let Some((id, _)) = current_if_watched() else {
        return 0;
    };
    let r = arg0(&ctx);
    let _ = NGX_REQUEST.insert(&id, &r, 0);
    0
}

#[uretprobe(multi)]
pub fn ngx_upstream_init_ret(_ctx: RetProbeContext) -> u32 {
    let Some((id, _)) = current_if_watched() else {
        return 0;
    };
    let _ = NGX_REQUEST.remove(&id);
    0
}

/// `ngx_event_connect_peer(pc)`, only while a request's upstream is being set up.
#[uprobe(multi)]
pub fn ngx_connect_peer(ctx: ProbeContext) -> u32 {
    let Some((id, _)) = current_if_watched() else {
        return 0;
    };
    // SAFETY: tested for presence only.
    if unsafe { NGX_REQUEST.get(&id) }.is_none() {
        return 0;
    }
    let pc = arg0(&ctx);
    let _ = NGX_PEER.insert(&id, &pc, 0);
    0
}

/// The return of `ngx_event_connect_peer`: `pc->connection` is the new or reused upstream
/// connection (also when the connect is still in progress).
#[uretprobe(multi)]
pub fn ngx_connect_peer_ret(_ctx: RetProbeContext) -> u32 {
    let Some((id, _)) = current_if_watched() else {
        return 0;
    };
    // SAFETY: copied out before the entry is removed.
    let Some(pc) = (unsafe { NGX_PEER.get(&id) }).copied() else {
        return 0;
    };
    let _ = NGX_PEER.remove(&id);
    // SAFETY: copied out.
    let Some(r) = (unsafe { NGX_REQUEST.get(&id) }).copied() else {
        return 0;
    };
    // One step at a time: combining the Options lets the compiler merge paths in a way the
    // verifier rejects (a register read before it is written on one of them).
    let Some(down_conn) = read_user::<u64>(r + NGX_REQUEST_CONNECTION) else {
        return 0;
    };
    let Some(down) = read_user::<i32>(down_conn + NGX_CONNECTION_FD) else {
        return 0;
    };
    let Some(up_conn) = read_user::<u64>(pc + NGX_PEER_CONNECTION) else {
        return 0;
    };
    let Some(up) = read_user::<i32>(up_conn + NGX_CONNECTION_FD) else {
        return 0;
    };
    if down < 0 || up < 0 {
        return 0;
    }
    let Some(mut entry) = EVENTS.reserve::<NginxEvent>(0) else {
        bump(counter::NGINX_RESERVE_FAILED);
        return 0;
    };
    entry.write(NginxEvent {
        kind: kind::NGINX,
        _pad: [0; 3],
        tgid: (id >> 32) as u32,
        tid: id as u32,
        downstream_fd: down,
        upstream_fd: up,
        _pad2: 0,
        // SAFETY: helper without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
    });
    entry.submit(wakeup_flags());
    bump(counter::NGINX_EVENTS);
    0
}
