//! The agent's configuration, built from the command line.

use std::path::PathBuf;

use anyhow::Context as _;

use crate::{
    cli::{Cli, OtlpProtocol},
    discover::{containers::ContainerFilter, naming::NameRule, selection::Selection},
};

#[derive(Debug, Clone)]
pub struct Config {
    pub selection: Selection,
    pub name_rules: Vec<NameRule>,
    pub otlp_endpoint: Option<String>,
    pub otlp_protocol: OtlpProtocol,
    pub console: bool,
    pub ready_file: Option<PathBuf>,
    pub stats_interval_secs: u64,
    /// Follow pipes as well as sockets (plugin stdio).
    pub follow_pipes: bool,
    /// Capacity of the kernel's socket map, when not its default.
    pub max_sockets: Option<u32>,
    /// Put uprobes on Go binaries.
    pub go_uprobes: bool,
    /// Also probe the RETs of Go HTTP handlers (handler duration).
    pub go_handler_returns: bool,
    /// Put uprobes on greenlet's switch (gevent).
    pub greenlets: bool,
    /// Put uprobes on nginx.
    pub nginx_uprobes: bool,
    /// Capture TLS plaintext (OpenSSL and Go crypto/tls uprobes).
    pub tls: bool,
    /// Serve Prometheus metrics here.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Seconds between OTLP metrics exports; 0 = none.
    pub metrics_interval_secs: u64,
    /// Most series per metric.
    pub metrics_max_series: usize,
    /// Container selection (kernel filter by cgroup).
    pub containers: ContainerFilter,
    pub docker_socket: PathBuf,
    pub k8s_node_name: Option<String>,
    /// `--cri-socket`s (empty: the runtimes' default sockets that exist).
    pub cri_sockets: Vec<PathBuf>,
    /// `--kubelet-url`: pods from the kubelet instead of the API server.
    pub kubelet_url: Option<String>,
    pub kubelet_insecure_tls: bool,
    /// Body prefix to export per HTTP/1 message (0: none).
    pub capture_body_bytes: usize,
    /// Export prompts and completions.
    pub capture_genai_content: bool,
}

impl Config {
    pub fn from_cli(cli: &Cli) -> anyhow::Result<Self> {
        let name_rules = cli
            .service_names
            .iter()
            .map(|s| s.parse::<NameRule>())
            .collect::<Result<Vec<_>, _>>()
            .context("parsing --service-name")?;
        let k8s_labels = cli
            .k8s_pod_labels
            .iter()
            .map(|l| crate::discover::containers::kubernetes::parse_label(l))
            .collect::<Result<Vec<_>, _>>()
            .map_err(anyhow::Error::msg)
            .context("parsing --k8s-pod-label")?;
        if let Some(empty) = cli.containers.iter().find(|c| c.trim().is_empty()) {
            anyhow::bail!("--container needs a name or id, got {empty:?}");
        }
        let otlp_endpoint = cli.otlp_endpoint.clone().filter(|e| !e.trim().is_empty());
        Ok(Self {
            selection: Selection {
                pids: cli.pids.clone(),
                comms: cli.comms.clone(),
                exes: cli.exes.clone(),
            },
            name_rules,
            console: cli.console || otlp_endpoint.is_none(),
            otlp_endpoint,
            otlp_protocol: cli.otlp_protocol,
            ready_file: cli.ready_file.clone(),
            stats_interval_secs: cli.stats_interval,
            follow_pipes: !cli.no_pipes,
            max_sockets: cli.max_sockets,
            go_uprobes: !cli.no_go,
            go_handler_returns: cli.go_handler_returns,
            greenlets: !cli.no_greenlets,
            nginx_uprobes: !cli.no_nginx,
            tls: !cli.no_tls,
            metrics_addr: cli.metrics_addr,
            metrics_interval_secs: cli.metrics_interval,
            metrics_max_series: cli.metrics_max_series,
            containers: ContainerFilter {
                containers: cli.containers.clone(),
                cgroups: cli.cgroups.clone(),
                k8s_namespaces: cli.k8s_namespaces.clone(),
                k8s_labels,
            },
            docker_socket: cli.docker_socket.clone(),
            k8s_node_name: cli.k8s_node_name.clone().filter(|n| !n.trim().is_empty()),
            cri_sockets: cli.cri_sockets.clone(),
            kubelet_url: cli.kubelet_url.clone().filter(|u| !u.trim().is_empty()),
            kubelet_insecure_tls: cli.kubelet_insecure_tls,
            capture_body_bytes: cli.capture_bodies.unwrap_or(0),
            capture_genai_content: cli.capture_genai_content,
        })
    }
}
