//! Raw sys_enter/sys_exit tracepoints on the socket and pipe paths: for writes, enter records
//! the arguments and its time, exit copies what the syscall really moved; reads are handled
//! at exit alone, from the argument registers the kernel saved at entry. Sockets are followed once learned
//! from accept/connect (or seeded by user space); pipes once a read or write on an unknown fd
//! finds a FIFO inode behind it in the task's fd table. Every other fd of a watched process
//! is classified once and then costs two map lookups.
//!
//! Raw tracepoints rather than the per-syscall ones: those build a perf record for every
//! hooked syscall of every process before the program even runs; here the syscalls of no
//! interest cost a compare.

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_user,
        generated::{self, bpf_get_current_cgroup_id, bpf_get_current_task},
    },
    macros::raw_tracepoint,
    programs::RawTracePointContext,
};
use tracer_common::{
    ConnEvent, DataEvent, GREENLET_MARK, MAX_CAPTURE, MAX_IOVECS, SockAddr, SockInfo, TAIL_CAPTURE,
    counter, direction, kind, role, sock_key,
};

use crate::util::{
    EVENTS, FdWalk, INFLIGHT, Inflight, OTHER_FDS, SCRATCH, SOCKETS, bump, current_if_watched,
    current_is_agent, fd_walk, follow_pipes, go_goroutines, greenlets, put_counted, remove_counted,
    sock_walk, wakeup_flags,
};

/// What the saved pointer of an in-flight syscall points at.
pub(crate) mod op {
    pub const BUF: u8 = 1;
    pub const IOVEC: u8 = 2;
    pub const MSGHDR: u8 = 3;
    pub const ACCEPT: u8 = 4;
    pub const CONNECT: u8 = 5;
}

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const MSG_PEEK: u64 = 2;
const EINPROGRESS: i64 = 115;
const S_IFMT: u16 = 0o170000;
const S_IFIFO: u16 = 0o010000;

/// x86_64 syscall numbers of the hooked calls.
mod nr {
    pub const READ: u64 = 0;
    pub const WRITE: u64 = 1;
    pub const CLOSE: u64 = 3;
    pub const READV: u64 = 19;
    pub const WRITEV: u64 = 20;
    pub const CONNECT: u64 = 42;
    pub const ACCEPT: u64 = 43;
    pub const SENDTO: u64 = 44;
    pub const RECVFROM: u64 = 45;
    pub const SENDMSG: u64 = 46;
    pub const RECVMSG: u64 = 47;
    pub const DUP2: u64 = 33;
    pub const ACCEPT4: u64 = 288;
    pub const DUP3: u64 = 292;
}

/// Offsets in x86_64 `struct pt_regs` of the first four syscall arguments (di, si, dx, r10)
/// and of orig_ax (the syscall number, still there at exit).
const PT_REGS_ARGS: [usize; 4] = [112, 104, 96, 56];
const PT_REGS_ORIG_AX: usize = 120;
const PT_REGS_R14: usize = 8;

#[inline(always)]
fn read_regs_u64(regs: u64, offset: usize) -> u64 {
    // SAFETY: kernel pointer handed to the tracepoint; read through the helper.
    unsafe { bpf_probe_read_kernel((regs as usize + offset) as *const u64) }.unwrap_or(0)
}

/// sys_enter(struct pt_regs *regs, long id): dispatch on the syscall number first, so the
/// other syscalls of the host cost a compare.
#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn sys_enter(ctx: RawTracePointContext) -> i32 {
    let id: u64 = ctx.arg(1);
    let regs: u64 = ctx.arg(0);
    // Reads are handled at exit alone (see `exit_read`).
    match id {
        nr::WRITE => enter_write(regs, op::BUF, true),
        nr::WRITEV => enter_write(regs, op::IOVEC, true),
        nr::SENDTO => enter_write(regs, op::BUF, false),
        nr::SENDMSG => enter_write(regs, op::MSGHDR, false),
        nr::ACCEPT | nr::ACCEPT4 => enter_accept(regs),
        nr::CONNECT => enter_connect(regs),
        // dup2/dup3 close their target fd silently: forget what was known about it.
        nr::CLOSE => enter_close(regs, 0),
        nr::DUP2 | nr::DUP3 => enter_close(regs, 1),
        _ => {}
    }
    0
}

/// sys_exit(struct pt_regs *regs, long ret).
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn sys_exit(ctx: RawTracePointContext) -> i32 {
    let regs: u64 = ctx.arg(0);
    let id = read_regs_u64(regs, PT_REGS_ORIG_AX);
    let ret: i64 = ctx.arg(1);
    match id {
        nr::READ => exit_read(regs, ret, op::BUF, None, true),
        nr::READV => exit_read(regs, ret, op::IOVEC, None, true),
        nr::RECVFROM => exit_read(regs, ret, op::BUF, Some(3), false),
        nr::RECVMSG => exit_read(regs, ret, op::MSGHDR, Some(2), false),
        nr::WRITE | nr::WRITEV | nr::SENDTO | nr::SENDMSG => exit_write(ret),
        nr::ACCEPT | nr::ACCEPT4 => exit_accept(ret),
        nr::CONNECT => exit_connect(ret),
        _ => {}
    }
    0
}

/// Whether the data of (tgid, fd) is copied. An fd not met before is classified here when
/// the syscall could be on a pipe: pipes become followed, everything else is remembered as
/// not followed.
#[inline(always)]
fn is_followed(id: u64, tgid: u32, fd: i32, may_be_pipe: bool) -> bool {
    let key = sock_key(tgid, fd);
    // SAFETY: the role is copied out at once.
    if let Some(info) = unsafe { SOCKETS.get(&key) } {
        return info.role != role::IGNORED;
    }
    if !may_be_pipe || !follow_pipes() {
        return false;
    }
    let Some(walk) = fd_walk() else {
        return false;
    };
    // SAFETY: presence test only.
    if unsafe { OTHER_FDS.get(&key) }.is_some() {
        return false;
    }
    match fd_inode(&walk, fd) {
        Some((mode, ino)) if mode & S_IFMT == S_IFIFO => {
            track_pipe(id, fd, ino);
            true
        }
        Some(_) => {
            if put_counted(&OTHER_FDS, &key, &0, counter::OTHER_FDS_CREATED).is_err() {
                bump(counter::OTHER_FD_MAP_FULL);
            }
            false
        }
        None => {
            bump(counter::FD_WALK_FAILED);
            false
        }
    }
}

#[inline(always)]
fn read_kernel<T: Copy>(addr: u64) -> Option<T> {
    if addr == 0 {
        return None;
    }
    // SAFETY: kernel memory read through the helper, which faults safely.
    unsafe { bpf_probe_read_kernel(addr as *const T) }.ok()
}

/// The `struct file` behind `fd` of the current task: current->files->fdt->fd[fd].
#[inline(always)]
fn fd_file(walk: &FdWalk, fd: i32) -> Option<u64> {
    if fd < 0 {
        return None;
    }
    // SAFETY: returns the current task pointer; only ever read through the helper.
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = read_kernel(task + walk.task_files)?;
    let fdt: u64 = read_kernel(files + walk.files_fdt)?;
    let max_fds: u32 = read_kernel(fdt + walk.fdt_max_fds)?;
    if fd as u32 >= max_fds {
        return None;
    }
    let fds: u64 = read_kernel(fdt + walk.fdt_fd)?;
    read_kernel(fds + 8 * fd as u64)
}

/// (i_mode, i_ino) of the inode behind `fd` of the current task.
#[inline(always)]
fn fd_inode(walk: &FdWalk, fd: i32) -> Option<(u16, u64)> {
    let file = fd_file(walk, fd)?;
    let inode: u64 = read_kernel(file + walk.file_inode)?;
    let mode: u16 = read_kernel(inode + walk.inode_mode)?;
    let ino: u64 = read_kernel(inode + walk.inode_ino)?;
    Some((mode, ino))
}

/// Local address of the socket behind `fd`: file->private_data (struct socket) ->sk, whose
/// struct sock_common holds family, local port and address.
#[inline(always)]
fn sock_local(fd: i32, out: &mut SockAddr) {
    let (Some(walk), Some(sw)) = (fd_walk(), sock_walk()) else {
        return;
    };
    let Some(file) = fd_file(&walk, fd) else {
        return;
    };
    let Some(socket) = read_kernel::<u64>(file + sw.file_private) else {
        return;
    };
    let Some(sk) = read_kernel::<u64>(socket + sw.socket_sk) else {
        return;
    };
    let family: u16 = read_kernel(sk + sw.skc_family).unwrap_or(0);
    if family == AF_INET {
        if let Some(v4) = read_kernel::<[u8; 4]>(sk + sw.skc_rcv_saddr) {
            out.addr[10] = 0xff;
            out.addr[11] = 0xff;
            out.addr[12] = v4[0];
            out.addr[13] = v4[1];
            out.addr[14] = v4[2];
            out.addr[15] = v4[3];
            out.family = family;
        }
    } else if family == AF_INET6
        && let Some(v6) = read_kernel::<[u8; 16]>(sk + sw.skc_v6_rcv_saddr)
    {
        out.addr = v6;
        out.family = family;
    }
    // skc_num is in host byte order already.
    out.port = read_kernel(sk + sw.skc_num).unwrap_or(0);
}

#[inline(always)]
fn track_pipe(id: u64, fd: i32, ino: u64) {
    let Some(conn_id) = follow(id, fd, role::PIPE) else {
        return;
    };
    emit_conn(
        kind::PIPE,
        role::PIPE,
        id,
        fd,
        conn_id,
        SockAddr::default(),
        false,
        ino,
    );
}

/// Starts following (tgid, fd) as a new connection of `fd_role`; its generation, or None
/// when SOCKETS refused the entry.
#[inline(always)]
fn follow(id: u64, fd: i32, fd_role: u8) -> Option<u64> {
    let conn_id = unsafe { bpf_ktime_get_ns() };
    let info = SockInfo {
        conn_id,
        role: fd_role,
        tls: 0,
        _pad: [0; 2],
        seq: 0,
    };
    let key = sock_key((id >> 32) as u32, fd);
    if put_counted(&SOCKETS, &key, &info, counter::SOCKETS_CREATED).is_err() {
        bump(counter::SOCKET_MAP_FULL);
        return None;
    }
    Some(conn_id)
}

#[inline(always)]
fn save(id: u64, inflight: &Inflight) {
    if INFLIGHT.insert(&id, inflight, 0).is_err() {
        bump(counter::INFLIGHT_FULL);
    }
}

#[inline(always)]
pub(crate) fn inflight(op: u8, dir: u8, fd: i32, ptr: u64, len: u64) -> Inflight {
    Inflight {
        op,
        direction: dir,
        _pad: [0; 2],
        fd,
        ptr,
        len,
        ts_enter_ns: unsafe { bpf_ktime_get_ns() },
        family: 0,
        port: 0,
        _pad2: 0,
        addr: [0; 16],
        goroutine: 0,
    }
}

/// The arguments of a data syscall of a watched process on a followed fd, or None when its
/// data is not to be copied. `regs` are the syscall's saved user registers, which still hold
/// the arguments (and Go's r14) at exit.
#[inline(always)]
fn data_args(
    regs: u64,
    op: u8,
    dir: u8,
    peek_flags_arg: Option<usize>,
    may_be_pipe: bool,
) -> Option<(u64, Inflight)> {
    let (id, tgid) = current_if_watched()?;
    let fd = read_regs_u64(regs, PT_REGS_ARGS[0]) as i32;
    if !is_followed(id, tgid, fd, may_be_pipe) {
        return None;
    }
    if crate::tls::ciphertext(id, tgid, fd, dir) {
        // Its plaintext comes from the TLS library's uprobes.
        return None;
    }
    if let Some(i) = peek_flags_arg
        && read_regs_u64(regs, PT_REGS_ARGS[i & 3]) & MSG_PEEK != 0
    {
        // Peeked bytes are read again later; copying them now would duplicate them.
        return None;
    }
    let ptr = read_regs_u64(regs, PT_REGS_ARGS[1]);
    let len = read_regs_u64(regs, PT_REGS_ARGS[2]);
    let mut saved = inflight(op, dir, fd, ptr, len);
    if go_goroutines() {
        // Go keeps the running goroutine in r14 and its syscall stubs leave it there.
        saved.goroutine = read_regs_u64(regs, PT_REGS_R14);
        crate::go::route_at_syscall(id, tgid, saved.goroutine);
    }
    if greenlets() {
        // SAFETY: copied out of the map value.
        if let Some(g) = unsafe { crate::native::GREENLETS.get(&id) } {
            saved.goroutine = (*g & ((1 << 48) - 1)) | GREENLET_MARK;
        }
    }
    Some((id, saved))
}

/// Enter of a write-side syscall: its arguments are kept for the exit, which copies what it
/// really wrote, and its start time is the request's or response's (a client's span starts
/// when it begins writing).
#[inline(always)]
fn enter_write(regs: u64, op: u8, may_be_pipe: bool) {
    if let Some((id, saved)) = data_args(regs, op, direction::EGRESS, None, may_be_pipe) {
        save(id, &saved);
    }
}

/// A read-side syscall, handled at its exit alone: nothing is kept at its entry, so the many
/// reads that find no data (EAGAIN on non-blocking sockets, most of Go's first reads) cost a
/// compare, and a successful one saves two map updates. Its record's enter time is its exit
/// time: what a read's data means starts when the read returns.
#[inline(always)]
fn exit_read(regs: u64, ret: i64, op: u8, peek_flags_arg: Option<usize>, may_be_pipe: bool) {
    if ret <= 0 {
        return;
    }
    if let Some((id, saved)) = data_args(regs, op, direction::INGRESS, peek_flags_arg, may_be_pipe)
    {
        emit_data(id, &saved, ret as u64);
    }
}

/// The taken in-flight record of the current thread, if any.
#[inline(always)]
fn take_inflight() -> Option<(u64, Inflight)> {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: copied out before the entry is removed.
    let saved = unsafe { INFLIGHT.get(&id) }.copied()?;
    let _ = INFLIGHT.remove(&id);
    Some((id, saved))
}

/// Copies one chunk (a whole buffer or one iovec) into a ring buffer record. The record is
/// assembled in a per-CPU scratch slot and output with only the captured bytes, so small
/// messages take a small part of the ring instead of a whole 4 KiB slot.
#[inline(always)]
fn emit_chunk(id: u64, saved: &Inflight, key: u64, src: u64, total: u64, chunk: u8, now: u64) {
    emit_record(kind::DATA, id, saved, key, src, total, chunk, now);
}

/// [`emit_chunk`] for a record of `record_kind` (`kind::DATA`, or `kind::TLS_DATA` for
/// plaintext from the TLS uprobes, which shares the socket's sequence numbers).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn emit_record(
    record_kind: u8,
    id: u64,
    saved: &Inflight,
    key: u64,
    src: u64,
    total: u64,
    chunk: u8,
    now: u64,
) {
    // The sequence number advances before anything can fail, so a lost record shows as a
    // hole in the numbers user space sees.
    let (conn_id, seq, fd_role) = match SOCKETS.get_ptr_mut(&key) {
        // SAFETY: map value pointer; a concurrent writer on another CPU can at worst repeat
        // a number, which reads as no loss.
        Some(sock) => unsafe {
            let seq = (*sock).seq;
            (*sock).seq = seq.wrapping_add(1);
            ((*sock).conn_id, seq, (*sock).role)
        },
        None => (0, 0, role::UNKNOWN),
    };
    let Some(ev) = SCRATCH.get_ptr_mut(0) else {
        bump(counter::DATA_RESERVE_FAILED);
        return;
    };
    let mut captured: u32 = if total > MAX_CAPTURE as u64 {
        MAX_CAPTURE as u32
    } else {
        total as u32
    };
    if src == 0 {
        captured = 0;
    }
    // SAFETY: `ev` is this CPU's scratch slot of size_of::<DataEvent>(); nothing else runs on
    // this CPU while the program does.
    unsafe {
        (*ev).kind = record_kind;
        (*ev).direction = saved.direction;
        (*ev).chunk = chunk;
        (*ev).role = fd_role;
        (*ev).fd = saved.fd;
        (*ev).tgid = (id >> 32) as u32;
        (*ev).tid = id as u32;
        (*ev).conn_id = conn_id;
        (*ev).ts_enter_ns = saved.ts_enter_ns;
        (*ev).ts_exit_ns = now;
        (*ev).cgroup_id = bpf_get_current_cgroup_id();
        (*ev).total_len = total;
        (*ev).seq = seq;
        (*ev).goroutine = saved.goroutine;
        if captured > 0 {
            let dst = (*ev).buf.as_mut_ptr() as *mut core::ffi::c_void;
            let size = bounded(captured);
            if generated::bpf_probe_read_user(dst, size, src as *const core::ffi::c_void) != 0 {
                bump(counter::COPY_FAILED);
                captured = 0;
            }
        }
        (*ev).captured_len = captured;
        let len = DATA_HEADER_BYTES as u64 + bounded(captured) as u64;
        let ret = generated::bpf_ringbuf_output(
            &raw const EVENTS as *mut core::ffi::c_void,
            ev as *mut core::ffi::c_void,
            len,
            wakeup_flags(),
        );
        if ret != 0 {
            bump(counter::DATA_RESERVE_FAILED);
            return;
        }
    }
    bump(counter::DATA_EVENTS);
}

/// Bytes of a data record before its buffer.
const DATA_HEADER_BYTES: usize = core::mem::offset_of!(DataEvent, buf);

/// `n` clamped to MAX_CAPTURE in a form whose bound the verifier can see.
#[inline(always)]
fn bounded(n: u32) -> u32 {
    // black_box: LLVM can prove the bound on some paths and then drop the mask, leaving a
    // register whose range the verifier cannot see.
    let n = core::hint::black_box(n) & (MAX_CAPTURE as u32 * 2 - 1);
    if n > MAX_CAPTURE as u32 {
        MAX_CAPTURE as u32
    } else {
        n
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
struct IoVec {
    base: u64,
    len: u64,
}

/// Emits one record per iovec up to MAX_IOVECS, then one uncaptured record for the rest, so
/// the byte count of the syscall is always accounted for.
#[inline(always)]
fn emit_iovecs(id: u64, saved: &Inflight, key: u64, iov: u64, count: u64, moved: u64, now: u64) {
    let mut remaining = moved;
    let mut i: usize = 0;
    while i < MAX_IOVECS {
        if remaining == 0 || i as u64 >= count {
            break;
        }
        // SAFETY: user pointer read through the helper; failure ends the walk.
        let Ok(v) = (unsafe { bpf_probe_read_user((iov as *const IoVec).wrapping_add(i)) }) else {
            break;
        };
        let take = if v.len < remaining { v.len } else { remaining };
        if take > 0 {
            emit_chunk(id, saved, key, v.base, take, i as u8, now);
            remaining -= take;
        }
        i += 1;
    }
    if remaining > 0 {
        bump(counter::IOVEC_OVERFLOW);
        emit_chunk(id, saved, key, 0, remaining, MAX_IOVECS as u8, now);
    }
}

/// Copies `moved` bytes of one plain buffer as records of `record_kind`: head and tail when
/// it is larger than MAX_CAPTURE, the middle counted, not copied.
#[inline(always)]
pub(crate) fn emit_buffer(
    record_kind: u8,
    id: u64,
    saved: &Inflight,
    key: u64,
    ptr: u64,
    moved: u64,
    now: u64,
) {
    if moved > MAX_CAPTURE as u64 {
        let head = moved - TAIL_CAPTURE as u64;
        emit_record(record_kind, id, saved, key, ptr, head, 0, now);
        emit_record(
            record_kind,
            id,
            saved,
            key,
            ptr + head,
            TAIL_CAPTURE as u64,
            1,
            now,
        );
    } else {
        emit_record(record_kind, id, saved, key, ptr, moved, 0, now);
    }
}

/// Exit of a write-side syscall: copy what it moved.
#[inline(always)]
fn exit_write(moved: i64) {
    let Some((id, saved)) = take_inflight() else {
        return;
    };
    if moved <= 0 {
        return;
    }
    emit_data(id, &saved, moved as u64);
}

/// Copies what a data syscall moved (`moved` > 0 bytes), by the shape of its buffer.
#[inline(always)]
fn emit_data(id: u64, saved: &Inflight, moved: u64) {
    let now = unsafe { bpf_ktime_get_ns() };
    let key = sock_key((id >> 32) as u32, saved.fd);
    match saved.op {
        op::BUF => emit_buffer(kind::DATA, id, saved, key, saved.ptr, moved, now),
        op::IOVEC => emit_iovecs(id, saved, key, saved.ptr, saved.len, moved, now),
        op::MSGHDR => {
            // struct msghdr: msg_iov at 16, msg_iovlen at 24 (x86_64 and arm64 alike).
            let msg = saved.ptr;
            let iov = unsafe { bpf_probe_read_user((msg + 16) as *const u64) }.unwrap_or(0);
            let count = unsafe { bpf_probe_read_user((msg + 24) as *const u64) }.unwrap_or(0);
            if iov != 0 {
                emit_iovecs(id, saved, key, iov, count, moved, now);
            } else {
                emit_chunk(id, saved, key, 0, moved, 0, now);
            }
        }
        _ => {}
    }
}

/// Reads a sockaddr from user memory into our fixed layout.
#[inline(always)]
fn read_sockaddr(ptr: u64) -> SockAddr {
    let mut out = SockAddr::default();
    if ptr == 0 {
        return out;
    }
    let family = unsafe { bpf_probe_read_user(ptr as *const u16) }.unwrap_or(0);
    out.family = family;
    let port_be = unsafe { bpf_probe_read_user((ptr + 2) as *const u16) }.unwrap_or(0);
    out.port = u16::from_be(port_be);
    if family == AF_INET {
        if let Ok(v4) = unsafe { bpf_probe_read_user((ptr + 4) as *const [u8; 4]) } {
            out.addr[10] = 0xff;
            out.addr[11] = 0xff;
            out.addr[12] = v4[0];
            out.addr[13] = v4[1];
            out.addr[14] = v4[2];
            out.addr[15] = v4[3];
        }
    } else if family == AF_INET6 {
        if let Ok(v6) = unsafe { bpf_probe_read_user((ptr + 8) as *const [u8; 16]) } {
            out.addr = v6;
        }
    }
    out
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn emit_conn(
    event_kind: u8,
    sock_role: u8,
    id: u64,
    fd: i32,
    conn_id: u64,
    peer: SockAddr,
    local_of_fd: bool,
    inode: u64,
) {
    // Written in place in the ring: a ConnEvent on the stack of sys_exit, with the records
    // the syscall paths already keep there, goes over the 512-byte BPF stack.
    let Some(mut entry) = EVENTS.reserve::<ConnEvent>(0) else {
        bump(counter::CONTROL_RESERVE_FAILED);
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points at a reserved, exclusively owned ConnEvent-sized slot; every field
    // is written before it is submitted.
    unsafe {
        (*ev).kind = event_kind;
        (*ev).role = sock_role;
        (*ev)._pad = [0; 2];
        (*ev).fd = fd;
        (*ev).tgid = (id >> 32) as u32;
        (*ev).tid = id as u32;
        (*ev).conn_id = conn_id;
        (*ev).ts_ns = bpf_ktime_get_ns();
        (*ev).cgroup_id = bpf_get_current_cgroup_id();
        (*ev).peer = peer;
        (*ev).local = SockAddr::default();
        if local_of_fd {
            sock_local(fd, &mut (*ev).local);
        }
        (*ev).inode = inode;
        (*ev).comm = bpf_get_current_comm().unwrap_or([0; 16]);
    }
    entry.submit(wakeup_flags());
    bump(counter::CONTROL_EVENTS);
}

#[inline(always)]
fn track(id: u64, fd: i32, sock_role: u8, event_kind: u8, peer: SockAddr) {
    let Some(conn_id) = follow(id, fd, sock_role) else {
        return;
    };
    emit_conn(event_kind, sock_role, id, fd, conn_id, peer, true, 0);
}

#[inline(always)]
fn enter_accept(regs: u64) {
    let Some((id, _)) = current_if_watched() else {
        return;
    };
    let fd = read_regs_u64(regs, PT_REGS_ARGS[0]) as i32;
    save(
        id,
        &inflight(op::ACCEPT, 0, fd, read_regs_u64(regs, PT_REGS_ARGS[1]), 0),
    );
}

#[inline(always)]
fn exit_accept(new_fd: i64) {
    let Some((id, saved)) = take_inflight() else {
        return;
    };
    if saved.op != op::ACCEPT || new_fd < 0 {
        return;
    }
    let peer = read_sockaddr(saved.ptr);
    if peer.family != 0 && peer.family != AF_INET && peer.family != AF_INET6 {
        return;
    }
    track(id, new_fd as i32, role::SERVER, kind::ACCEPT, peer);
}

#[inline(always)]
fn enter_connect(regs: u64) {
    // The agent's own connects are reported too (see kind::OWN_CONNECT), never traced.
    let own = current_is_agent();
    let Some(id) = own.or_else(|| current_if_watched().map(|(id, _)| id)) else {
        return;
    };
    let peer = read_sockaddr(read_regs_u64(regs, PT_REGS_ARGS[1]));
    if peer.family != AF_INET && peer.family != AF_INET6 {
        return;
    }
    let fd = read_regs_u64(regs, PT_REGS_ARGS[0]) as i32;
    let mut saved = inflight(op::CONNECT, u8::from(own.is_some()), fd, 0, 0);
    saved.family = peer.family;
    saved.port = peer.port;
    saved.addr = peer.addr;
    save(id, &saved);
}

#[inline(always)]
fn exit_connect(r: i64) {
    let Some((id, saved)) = take_inflight() else {
        return;
    };
    if saved.op != op::CONNECT || (r != 0 && r != -EINPROGRESS) {
        return;
    }
    let peer = SockAddr {
        family: saved.family,
        port: saved.port,
        _pad: 0,
        addr: saved.addr,
    };
    if saved.direction == 1 {
        emit_conn(
            kind::OWN_CONNECT,
            role::CLIENT,
            id,
            saved.fd,
            0,
            peer,
            true,
            0,
        );
        return;
    }
    track(id, saved.fd, role::CLIENT, kind::CONNECT, peer);
}

/// close(fd), or dup2/dup3 onto fd (`fd_arg` 1), for a watched process.
#[inline(always)]
fn enter_close(regs: u64, fd_arg: usize) {
    let Some((id, tgid)) = current_if_watched() else {
        return;
    };
    let fd = read_regs_u64(regs, PT_REGS_ARGS[fd_arg & 3]) as i32;
    let key = sock_key(tgid, fd);
    // SAFETY: presence test only.
    if unsafe { OTHER_FDS.get(&key) }.is_some() {
        remove_counted(
            &OTHER_FDS,
            &key,
            counter::OTHER_FDS_REMOVED,
            counter::OTHER_FDS_REMOVE_MISSED,
        );
    }
    // SAFETY: copied out before removal.
    let Some(info) = (unsafe { SOCKETS.get(&key) }).copied() else {
        return;
    };
    remove_counted(
        &SOCKETS,
        &key,
        counter::SOCKETS_REMOVED,
        counter::SOCKETS_REMOVE_MISSED,
    );
    emit_conn(
        kind::CLOSE,
        info.role,
        id,
        fd,
        info.conn_id,
        SockAddr::default(),
        false,
        0,
    );
}
