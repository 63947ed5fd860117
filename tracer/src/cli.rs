//! Command line of the agent. Everything it accepts ends up in [`crate::config::Config`].

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OtlpProtocol {
    #[value(name = "grpc")]
    Grpc,
    #[value(name = "http/protobuf")]
    HttpProtobuf,
}

/// difytrace: zero-code distributed tracing for Dify-style stacks, from eBPF.
///
/// With no selection it traces every process on the host. Spans are printed one per line
/// unless an OTLP endpoint is given.
#[derive(Debug, Parser)]
#[command(name = "tracer", version)]
pub struct Cli {
    /// Trace this process and its future children (repeatable).
    #[arg(long = "pid")]
    pub pids: Vec<u32>,
    /// Trace processes whose command name (comm, at most 15 bytes) is this, e.g. gunicorn
    /// (repeatable). Matched at exec in the kernel and on existing processes at start.
    #[arg(long = "comm")]
    pub comms: Vec<String>,
    /// Trace processes running this executable (full path, or a file name) (repeatable).
    #[arg(long = "exe")]
    pub exes: Vec<String>,
    /// Trace only this container: a name (Docker/podman, or a Kubernetes container name,
    /// `pod/container`, `namespace/pod/container`) or an id prefix of 12+ hex digits
    /// (repeatable). Enforced in the kernel by cgroup; containers started later are picked up.
    #[arg(long = "container", value_name = "ID|NAME")]
    pub containers: Vec<String>,
    /// Trace only processes in this cgroup v2 directory or below it: a path relative to the
    /// cgroup2 mount (`/my.slice/x`) or the full directory (repeatable).
    #[arg(long = "cgroup", value_name = "PATH")]
    pub cgroups: Vec<String>,
    /// Trace only pods of this Kubernetes namespace (repeatable).
    #[arg(long = "k8s-namespace", value_name = "NS")]
    pub k8s_namespaces: Vec<String>,
    /// Trace only pods carrying this label (repeatable; all must match).
    #[arg(long = "k8s-pod-label", value_name = "KEY=VALUE")]
    pub k8s_pod_labels: Vec<String>,
    /// This node's name, for listing its pods (Kubernetes metadata).
    #[arg(long, env = "K8S_NODE_NAME")]
    pub k8s_node_name: Option<String>,
    /// Docker Engine API socket (also podman's compatible one), for container names and
    /// images; optional.
    #[arg(long, default_value = "/var/run/docker.sock")]
    pub docker_socket: PathBuf,
    /// CRI socket of containerd or cri-o (runtime.v1 gRPC), for container names, images and
    /// pods when no Kubernetes API is used (repeatable). Default: /run/containerd/containerd.sock
    /// and /run/crio/crio.sock, when they exist.
    #[arg(long = "cri-socket", value_name = "PATH")]
    pub cri_sockets: Vec<PathBuf>,
    /// Read pod metadata from this kubelet (`https://NODE_IP:10250`, GET /pods with the
    /// service account's token) instead of the API server.
    #[arg(long, env = "KUBELET_URL", value_name = "URL")]
    pub kubelet_url: Option<String>,
    /// Accept the kubelet's certificate without checking who signed it: kubelets usually
    /// serve a self-signed one the cluster CA does not sign.
    #[arg(long, env = "KUBELET_INSECURE_TLS")]
    pub kubelet_insecure_tls: bool,
    /// OTLP endpoint, e.g. http://127.0.0.1:4317 (gRPC) or http://127.0.0.1:4318 (HTTP).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// OTLP transport.
    #[arg(
        long,
        env = "OTEL_EXPORTER_OTLP_PROTOCOL",
        value_enum,
        default_value = "grpc"
    )]
    pub otlp_protocol: OtlpProtocol,
    /// Also print spans to stdout when exporting OTLP.
    #[arg(long)]
    pub console: bool,
    /// Override service.name: `pid:1234=name`, `comm:gunicorn=api` or `exe:/usr/bin/x=name`
    /// (repeatable).
    #[arg(long = "service-name", value_name = "SELECTOR=NAME")]
    pub service_names: Vec<String>,
    /// File written once every probe is attached (for scripts and tests).
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// Seconds between self-statistics log lines (events, drops, spans); 0 disables them.
    #[arg(long, default_value_t = 30)]
    pub stats_interval: u64,
    /// Do not follow pipes (plugin stdio); only sockets are traced.
    #[arg(long)]
    pub no_pipes: bool,
    /// Connections (and pipes) the kernel side follows at once (default 65536). Beyond it
    /// the least recently used are evicted and their later data is not followed; counted in
    /// `sockets_evicted` / `difytrace_map_evictions_total{map="SOCKETS"}`.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(64..=4_194_304))]
    pub max_sockets: Option<u32>,
    /// No uprobes on Go binaries: Go processes are then linked by thread, which goroutines
    /// make unreliable.
    #[arg(long)]
    pub no_go: bool,
    /// Also put uprobes on the RET instructions of net/http's, gin's and grpc-go's handlers,
    /// for `difytrace.handler.duration_ns` (the handler's own run time) on net/http SERVER
    /// spans. Off by default: each RET probe costs the traced request a breakpoint plus a
    /// single-step trap (docs/benchmarks.md); the gin route and the gRPC handler's end are
    /// reported without it.
    #[arg(long)]
    pub go_handler_returns: bool,
    /// No uprobes on greenlet's switch: gevent processes (many requests per OS thread) are
    /// then linked by thread, which greenlets make unreliable.
    #[arg(long)]
    pub no_greenlets: bool,
    /// No uprobes on nginx: its upstream requests are then linked by thread, which nginx's
    /// event loop makes unreliable under concurrency.
    #[arg(long)]
    pub no_nginx: bool,
    /// No TLS plaintext capture (uprobes on OpenSSL's SSL_read/SSL_write and Go's
    /// crypto/tls): HTTPS traffic is then not traced.
    #[arg(long)]
    pub no_tls: bool,
    /// Export a prefix of each HTTP/1 body (http.request.body / http.response.body), at
    /// most N bytes (default 4096, at most 65536), with secret-named JSON and form fields
    /// redacted. Off unless given.
    #[arg(long, value_name = "N", num_args = 0..=1, default_missing_value = "4096")]
    pub capture_bodies: Option<usize>,
    /// Export prompts and completions of model calls (gen_ai.input.messages,
    /// gen_ai.output.messages), size-capped and with secret-named fields redacted.
    #[arg(long)]
    pub capture_genai_content: bool,
    /// Log filter (tracing EnvFilter syntax); RUST_LOG wins when set.
    #[arg(long, default_value = "info")]
    pub log_level: String,
    /// Serve Prometheus metrics (RED, service graph, self-telemetry) at http://ADDR/metrics,
    /// e.g. 0.0.0.0:9464. Off by default.
    #[arg(long, value_name = "IP:PORT")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Seconds between OTLP metrics exports (to the OTLP endpoint); 0 disables them.
    #[arg(long, default_value_t = 15)]
    pub metrics_interval: u64,
    /// Most series per metric; further attribute sets are folded into one series with
    /// otel.metric.overflow=true.
    #[arg(long, default_value_t = crate::metrics::store::DEFAULT_MAX_SERIES)]
    pub metrics_max_series: usize,
    /// Without a subcommand the agent runs.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands; running the agent is the default.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print what the kernel offers and what is missing for tracing, then exit (0 when
    /// everything the agent needs is there).
    Check,
}
