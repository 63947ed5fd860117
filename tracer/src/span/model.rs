//! A finished span, as the span layer hands it to the exporters.

use std::{sync::Arc, time::SystemTime};

/// OpenTelemetry span kind (only the kinds difytrace produces).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    Server,
    Client,
    Internal,
}

/// An attribute value.
#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    Str(String),
    Int(i64),
    Bool(bool),
    F64(f64),
    /// A list of strings (e.g. `gen_ai.response.finish_reasons`).
    StrList(Vec<String>),
}

/// Who produced a span: one entry per traced process (the OTel resource).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProcessResource {
    pub service_name: String,
    pub pid: u32,
    pub executable_name: String,
    pub host_name: String,
    /// The container (or selected cgroup) the process runs in; None on the host.
    pub container: Option<Arc<ContainerIdentity>>,
}

/// Where a process runs when it runs in a container: what its cgroup says (id, runtime) and,
/// when reachable, what the container runtime and Kubernetes say. Every field may be missing
/// but the cgroup's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ContainerIdentity {
    /// Full container id (64 hex digits); empty for a plain cgroup selected with `--cgroup`.
    pub id: String,
    /// `docker`, `containerd`, `cri-o`, `podman`, `kubernetes` (a bare id in a pod cgroup).
    pub runtime: Option<&'static str>,
    /// The cgroup v2 path (as `/proc/<pid>/cgroup` prints it) of the container or cgroup.
    pub cgroup_path: String,
    pub name: Option<String>,
    /// Image name without tag or digest.
    pub image_name: Option<String>,
    pub image_tag: Option<String>,
    pub k8s: Option<K8sIdentity>,
}

/// The Kubernetes view of a container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct K8sIdentity {
    pub pod_name: String,
    pub pod_uid: String,
    pub namespace: String,
    pub container_name: String,
    pub node_name: String,
}

/// Span status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpanStatus {
    Unset,
    Error(String),
}

/// A link to another span context (e.g. an incoming traceparent that lost to an inferred parent).
#[derive(Debug, Clone, PartialEq)]
pub struct SpanLink {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub attributes: Vec<(String, AttrValue)>,
}

/// A span ready for export.
#[derive(Debug, Clone)]
pub struct FinishedSpan {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: Option<[u8; 8]>,
    /// True when the parent came from a remote traceparent header.
    pub parent_is_remote: bool,
    pub kind: SpanKind,
    pub name: String,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(String, AttrValue)>,
    pub links: Vec<SpanLink>,
    pub status: SpanStatus,
    pub resource: Arc<ProcessResource>,
}

impl FinishedSpan {
    /// The value of attribute `key`, if set.
    pub fn attr(&self, key: &str) -> Option<&AttrValue> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }
}

/// Lower-case hex of an id.
pub fn hex(bytes: &[u8]) -> String {
    // A table, not `write!("{b:02x}")` per byte: ids are formatted for every span exported.
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}
