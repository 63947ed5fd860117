//! Which processes to watch, and what they are: /proc scans, exec/exit events, service names.

pub mod containers;
pub mod go_binaries;
pub mod gobin;
pub mod naming;
pub mod native_targets;
pub mod plugin_runtime;
pub mod procfs;
pub mod selection;
pub mod self_sockets;
pub mod tls_targets;
