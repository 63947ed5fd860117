//! Per-connection and per-pipe byte streams: captured chunks, in order and with direction,
//! turned into HTTP/1.1 messages and plugin stdio lines by the protocol parsers.

pub mod conn;
pub mod pipes;
pub mod table;

pub use conn::{ConnKey, Role};

/// Who moved a chunk of bytes, for linking a process's outbound requests to the inbound one
/// it serves: a thread id, or in a Go process with uprobes a goroutine ([`goroutine_ctx`]).
pub type ExecCtx = u64;

/// The execution context of a goroutine (its runtime.g address, tagged so it never equals a
/// thread id).
pub fn goroutine_ctx(g: u64) -> ExecCtx {
    g | 1 << 63
}
pub use pipes::{PipeCounters, PipeTable, PipeVerdict};
pub use table::{ConnTable, StreamCounters, StreamEvent};
