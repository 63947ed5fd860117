//! Per-connection and per-pipe byte streams: captured chunks, in order and with direction,
//! turned into HTTP/1.1 messages and plugin stdio lines by the protocol parsers.

pub mod conn;
pub mod pipes;
pub mod table;

pub use conn::{ConnKey, Role};
pub use pipes::{PipeCounters, PipeTable, PipeVerdict};
pub use table::{ConnTable, StreamCounters, StreamEvent};
