//! Pure parsers over captured bytes: no I/O, resumable across chunk borders, never panic.

pub mod genai;
pub mod http1;
pub mod http2;
pub mod stdio;
