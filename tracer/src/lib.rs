//! difytrace agent library: probes -> stream -> protocol -> span -> export.

pub mod agent;
pub mod check;
pub mod cli;
pub mod config;
pub mod discover;
pub mod export;
pub mod fast_map;
pub mod metrics;
pub mod probes;
pub mod protocol;
pub mod span;
pub mod stream;
