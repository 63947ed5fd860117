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

/// The execution context of a goroutine (its runtime.g address).
pub fn goroutine_ctx(g: u64) -> ExecCtx {
    g | GOROUTINE_TAG
}

/// The goroutine of an execution context, or None for a thread.
pub fn goroutine_of(ctx: ExecCtx) -> Option<u64> {
    (ctx & GOROUTINE_TAG != 0).then_some(ctx & !GOROUTINE_TAG)
}
pub use pipes::{PipeCounters, PipeTable, PipeVerdict};
pub use table::{ConnTable, StreamCounters, StreamEvent};
