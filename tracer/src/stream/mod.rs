//! Per-connection byte streams: captured chunks, in order and with direction, turned into
//! HTTP/1.1 messages by the protocol parsers.

pub mod conn;
pub mod table;

pub use conn::{ConnKey, Role};
pub use table::{ConnTable, StreamCounters, StreamEvent};
