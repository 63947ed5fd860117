//! Per-connection and per-pipe byte streams: captured chunks, in order and with direction,
//! turned into HTTP/1.1 messages and plugin stdio lines by the protocol parsers.

pub mod conn;
pub mod pipes;
pub mod table;

pub use conn::{ConnKey, Role};

/// Who moved a chunk of bytes, for linking a process's outbound requests to the inbound one
/// it serves: a thread id, or in a Go process with uprobes a goroutine ([`goroutine_ctx`]).
pub type ExecCtx = u64;

/// Marks a goroutine's execution context (a runtime.g address is a user-space address, below
/// this bit), so it never equals a thread id.
const GOROUTINE_TAG: u64 = 1 << 63;
/// Marks a greenlet's execution context (its greenlet::Greenlet address).
const GREENLET_TAG: u64 = 1 << 62;
/// Marks a connection's execution context (event-loop servers such as nginx, where the
/// downstream connection is what a request's work is tied to).
const FD_TAG: u64 = 1 << 61;

/// The execution context of a greenlet.
pub fn greenlet_ctx(greenlet: u64) -> ExecCtx {
    (greenlet & ((1 << 48) - 1)) | GREENLET_TAG
}

/// The execution context of the connection on `fd`.
pub fn fd_ctx(fd: i32) -> ExecCtx {
    u64::from(fd as u32) | FD_TAG
}

/// The greenlet a data record names (`tracer_common::GREENLET_MARK` in its goroutine field).
pub fn marked_greenlet(raw: u64) -> Option<u64> {
    (raw & !((1 << 48) - 1) == tracer_common::GREENLET_MARK).then_some(raw & ((1 << 48) - 1))
}

/// The execution context of a goroutine (its runtime.g address).
pub fn goroutine_ctx(g: u64) -> ExecCtx {
    g | GOROUTINE_TAG
}

/// The goroutine of an execution context, or None for a thread.
pub fn goroutine_of(ctx: ExecCtx) -> Option<u64> {
    (ctx & GOROUTINE_TAG != 0).then_some(ctx & !GOROUTINE_TAG)
}
pub use pipes::{PipeCounters, PipeTable, PipeVerdict};
pub use table::{ConnTable, Source, StreamCounters, StreamEvent};
