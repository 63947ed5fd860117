//! Uprobes on grpc-go (google.golang.org/grpc, the releases with `transport.ServerStream` and
//! `transport.ClientStream`): which goroutine serves or issued which HTTP/2 stream, its
//! method, and its final status, straight from the process. The HTTP/2 parser rebuilds the
//! same streams from the wire; these facts name them by (fd, stream id) so user space
//! matches them exactly, and fill in what HPACK state missing from the wire hid (an agent
//! started on a connection in use).
//!
//! Hooks (register ABI; r14 is the running goroutine; one attach cookie per binary selects
//! its field offsets, all read from the binary's DWARF):
//! - `grpc.(*Server).handleStream(s, t ServerTransport, stream *ServerStream)` entry and RETs:
//!   rbx/rcx = t (itab, data = *http2Server), rdi = stream. Runs on the handler goroutine.
//! - `transport.(*http2Server).writeStatus(t, s *ServerStream, st *status.Status)` entry.
//! - `transport.(*http2Client).NewStream(t, ctx, callHdr, handler)` entry (rax = t) and RETs
//!   (rax = the *ClientStream, whose id is assigned inside NewStream).
//! - `transport.(*http2Client).closeStream(t, s, err, rst, rstCode, st, mdata, eos)` entry:
//!   rax = t, rbx = s, r9 = st.
//!
//! A transport's fd is read through its `conn` (net.Conn interface whose data is taken for
//! a `*net.TCPConn`) and only reported when the (tgid, fd) pair is a socket the syscall hooks
//! follow: a connection of another type (TLS, a wrapper) gives either a failed read or a
//! number that names no followed socket, never an event.

use aya_ebpf::{macros::uprobe, programs::ProbeContext};
use tracer_common::{GoOffsets, counter, go_op, role, sock_key};

use crate::{
    go::{
        CLOSED_SYSFD, emit, field, go_string, net_conn_sysfd, read_user, regs, setup, sysfd_as_fd,
    },
    util::{SOCKETS, bump},
};

/// The fd behind the `net.Conn` interface at `conn_field`, when it names a socket of `tgid`
/// that the syscall hooks follow.
#[inline(always)]
fn conn_fd(tgid: u32, conn_field: Option<u64>, off: &GoOffsets) -> Option<i32> {
    let sysfd = net_conn_sysfd(conn_field, off);
    // grpc-go closes a transport's connection before the streams still open on it (a
    // client's Close, a transport that failed): a hook on a closed connection, no socket
    // missed.
    if sysfd == Some(CLOSED_SYSFD) {
        return None;
    }
    let Some(fd) = sysfd.and_then(sysfd_as_fd) else {
        bump(counter::GRPC_NO_SOCKET);
        return None;
    };
    // SAFETY: the value is copied out at once.
    let followed =
        unsafe { SOCKETS.get(&sock_key(tgid, fd)) }.is_some_and(|s| s.role != role::PIPE);
    if !followed {
        bump(counter::GRPC_NO_SOCKET);
        return None;
    }
    Some(fd)
}

/// The common `transport.Stream` embedded in a ServerStream or ClientStream at `at`: the
/// struct itself, or what the `*Stream` there points to (`deref`, older releases).
#[inline(always)]
fn common_stream(stream: u64, at: u32, deref: u32) -> Option<u64> {
    let member = field(stream, at)?;
    if deref != 0 {
        read_user(member)
    } else {
        Some(member)
    }
}

/// The HTTP/2 stream id of the common stream at `common`.
#[inline(always)]
fn stream_id(common: Option<u64>, off: &GoOffsets) -> Option<u32> {
    common
        .and_then(|s| field(s, off.grpc_stream_id))
        .and_then(read_user)
}

/// A `*status.Status`'s code (internal/status.Status.s -> spb.Status.Code); None for a nil
/// status or a failed read.
#[inline(always)]
fn status_code(st: u64, off: &GoOffsets) -> Option<u32> {
    let s: u64 = field(st, off.grpc_status_s).and_then(read_user)?;
    let code: i32 = field(s, off.grpc_status_code).and_then(read_user)?;
    u32::try_from(code).ok()
}

/// `(*Server).handleStream` entered: the handler goroutine starts serving a stream.
#[uprobe(multi)]
pub fn go_grpc_server_enter(ctx: ProbeContext) -> u32 {
    let Some((id, tgid, off)) = setup(&ctx) else {
        return 0;
    };
    let r = regs(&ctx);
    let common = common_stream(
        r.rdi,
        off.grpc_server_stream_stream,
        off.grpc_server_stream_deref,
    );
    let Some(sid) = stream_id(common, &off) else {
        return 0;
    };
    let Some(fd) = conn_fd(tgid, field(r.rcx, off.grpc_http2_server_conn), &off) else {
        return 0;
    };
    let method = go_string(common.and_then(|s| field(s, off.grpc_stream_method)));
    emit(
        id,
        go_op::GRPC_SERVER_START,
        r.r14,
        u64::from(sid),
        fd,
        None,
        method,
    );
    0
}

/// A RET of handleStream: the handler on this goroutine is done.
#[uprobe(multi)]
pub fn go_grpc_server_ret(ctx: ProbeContext) -> u32 {
    let Some((id, _, _)) = setup(&ctx) else {
        return 0;
    };
    let r = regs(&ctx);
    emit(id, go_op::GRPC_SERVER_END, r.r14, 0, 0, None, None);
    0
}

/// `(*http2Server).writeStatus(t, s, st)`: rax = t, rbx = s, rcx = st.
#[uprobe(multi)]
pub fn go_grpc_server_status(ctx: ProbeContext) -> u32 {
    let r = regs(&ctx);
    report_status(
        &ctx,
        go_op::GRPC_SERVER_STATUS,
        r.r14,
        r.rax,
        r.rbx,
        r.rcx,
        |off| {
            (
                off.grpc_http2_server_conn,
                off.grpc_server_stream_stream,
                off.grpc_server_stream_deref,
            )
        },
    )
}

/// A stream's final status, from a hook on goroutine `g` whose arguments are the transport,
/// the stream and the `*status.Status`; `layout` picks the side's (transport conn, stream's common part, deref)
/// offsets.
#[inline(always)]
fn report_status(
    ctx: &ProbeContext,
    op: u8,
    g: u64,
    transport: u64,
    stream: u64,
    status: u64,
    layout: impl Fn(&GoOffsets) -> (u32, u32, u32),
) -> u32 {
    let Some((id, tgid, off)) = setup(ctx) else {
        return 0;
    };
    let (conn_at, stream_at, deref) = layout(&off);
    let Some(sid) = stream_id(common_stream(stream, stream_at, deref), &off) else {
        return 0;
    };
    let Some(code) = status_code(status, &off) else {
        return 0;
    };
    let Some(fd) = conn_fd(tgid, field(transport, conn_at), &off) else {
        return 0;
    };
    let packed = u64::from(sid) | (u64::from(code) << 32);
    emit(id, op, g, packed, fd, None, None);
    0
}

/// `(*http2Client).NewStream` entered: goroutine `g` opens a stream on this connection.
#[uprobe(multi)]
pub fn go_grpc_client_enter(ctx: ProbeContext) -> u32 {
    let Some((id, tgid, off)) = setup(&ctx) else {
        return 0;
    };
    let r = regs(&ctx);
    let Some(fd) = conn_fd(tgid, field(r.rax, off.grpc_http2_client_conn), &off) else {
        return 0;
    };
    emit(id, go_op::GRPC_CLIENT_OPEN, r.r14, 0, fd, None, None);
    0
}

/// A RET of NewStream: rax = the new *ClientStream (nil on error), its id already assigned.
/// Always reported, so user space can close the goroutine's open NewStream.
#[uprobe(multi)]
pub fn go_grpc_client_ret(ctx: ProbeContext) -> u32 {
    let Some((id, tgid, off)) = setup(&ctx) else {
        return 0;
    };
    let r = regs(&ctx);
    let stream = r.rax;
    let common = common_stream(
        stream,
        off.grpc_client_stream_stream,
        off.grpc_client_stream_deref,
    );
    let sid = stream_id(common, &off).unwrap_or(0);
    let ct: Option<u64> = if sid != 0 {
        field(stream, off.grpc_client_stream_ct).and_then(read_user)
    } else {
        None
    };
    let fd = match ct {
        Some(ct) => conn_fd(tgid, field(ct, off.grpc_http2_client_conn), &off).unwrap_or(-1),
        None => -1,
    };
    let (sid, method) = if fd >= 0 {
        (
            sid,
            go_string(common.and_then(|s| field(s, off.grpc_stream_method))),
        )
    } else {
        (0, None)
    };
    emit(
        id,
        go_op::GRPC_CLIENT_STREAM,
        r.r14,
        u64::from(sid),
        fd,
        None,
        method,
    );
    0
}

/// `(*http2Client).closeStream(t, s, err, rst, rstCode, st, ...)`: the stream's final status
/// as the client saw it (from its own, always complete, HPACK state); rax = t, rbx = s,
/// r9 = st.
#[uprobe(multi)]
pub fn go_grpc_client_status(ctx: ProbeContext) -> u32 {
    let r = regs(&ctx);
    report_status(
        &ctx,
        go_op::GRPC_CLIENT_STATUS,
        r.r14,
        r.rax,
        r.rbx,
        r.r9,
        |off| {
            (
                off.grpc_http2_client_conn,
                off.grpc_client_stream_stream,
                off.grpc_client_stream_deref,
            )
        },
    )
}
