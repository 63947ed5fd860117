//! Requests to spans: identity, parent/child linking, W3C traceparent.

pub mod builder;
pub mod clock;
pub mod conn_ends;
pub mod genai;
pub mod goroutines;
pub mod h2_attrs;
pub mod http_attrs;
pub mod late_binding;
pub mod model;
pub mod plugin;
pub mod trace_context;
pub mod traceparent;
