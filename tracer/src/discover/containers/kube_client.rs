//! The Kubernetes API server as seen from a pod: the service account's token and CA, the
//! `KUBERNETES_SERVICE_HOST/PORT` address, one HTTPS GET per pod list. Off (None) outside a
//! cluster.

use std::{
    collections::HashMap,
    io::Write as _,
    net::TcpStream,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, bail};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};

use super::{
    http,
    kubernetes::{self, PodContainer},
};

/// Where a pod finds its service account.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// Overrides SERVICE_ACCOUNT_DIR (a token mounted elsewhere; the end-to-end test's stand-in
/// API server).
pub const SERVICE_ACCOUNT_DIR_ENV: &str = "DIFYTRACE_K8S_SERVICE_ACCOUNT_DIR";
const TIMEOUT: Duration = Duration::from_secs(5);

/// What is needed to list this node's pods (from the API server, or from the kubelet: see
/// `kubelet`).
pub struct KubeSource {
    host: String,
    port: u16,
    /// The request path that lists this node's pods.
    path: String,
    /// The name the server's certificate must carry.
    server_name: ServerName<'static>,
    token_file: PathBuf,
    tls: Arc<rustls::ClientConfig>,
}

impl KubeSource {
    /// The in-cluster source, when this runs in a pod (the service host variable is set);
    /// Ok(None) outside a cluster. An error says what is missing in a cluster.
    pub fn in_cluster(node_name: Option<&str>) -> anyhow::Result<Option<Self>> {
        let Ok(host) = std::env::var("KUBERNETES_SERVICE_HOST") else {
            return Ok(None);
        };
        let port = std::env::var("KUBERNETES_SERVICE_PORT")
            .ok()
            .and_then(|p| p.parse().ok())
            .unwrap_or(443);
        let Some(node) = node_name.filter(|n| !n.is_empty()) else {
            bail!(
                "running in Kubernetes but the node name is unknown: set K8S_NODE_NAME (fieldRef spec.nodeName) or --k8s-node-name"
            );
        };
        let dir = service_account_dir();
        let tls = tls_config(&dir.join("ca.crt"))?;
        // The API server's certificate names the service's IP and kubernetes.default.svc.
        let server_name = ServerName::try_from(host.clone())
            .or_else(|_| ServerName::try_from("kubernetes.default.svc".to_string()))
            .context("API server name")?;
        Ok(Some(Self {
            host,
            port,
            path: kubernetes::pods_of_node_path(node),
            server_name,
            token_file: dir.join("token"),
            tls: Arc::new(tls),
        }))
    }

    /// A source with everything given (the kubelet's, built by `kubelet`).
    pub(super) fn with_parts(
        host: String,
        port: u16,
        path: String,
        server_name: ServerName<'static>,
        token_file: PathBuf,
        tls: rustls::ClientConfig,
    ) -> Self {
        Self {
            host,
            port,
            path,
            server_name,
            token_file,
            tls: Arc::new(tls),
        }
    }

    /// The containers of the pods on this node, by container id.
    pub fn pods(&self) -> anyhow::Result<HashMap<String, PodContainer>> {
        // Re-read each time: projected tokens are rotated by the kubelet.
        let token = std::fs::read_to_string(&self.token_file)
            .with_context(|| format!("reading {}", self.token_file.display()))?;
        let body = self.get(&self.path, token.trim())?;
        kubernetes::parse_pod_list(&body).context("parsing the pod list")
    }

    fn get(&self, path: &str, token: &str) -> anyhow::Result<Vec<u8>> {
        let addr = if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let tcp = TcpStream::connect(&addr).with_context(|| format!("connecting to {addr}"))?;
        tcp.set_read_timeout(Some(TIMEOUT))?;
        tcp.set_write_timeout(Some(TIMEOUT))?;
        let conn = rustls::ClientConnection::new(self.tls.clone(), self.server_name.clone())
            .context("starting TLS")?;
        let mut stream = rustls::StreamOwned::new(conn, tcp);
        stream
            .write_all(&http::get_request(&self.host, path, Some(token)))
            .with_context(|| format!("sending to {addr}"))?;
        let raw = http::read_all(&mut stream).with_context(|| format!("reading from {addr}"))?;
        Ok(http::response_body(&raw)?)
    }
}

/// The service account's directory (SERVICE_ACCOUNT_DIR unless overridden).
pub fn service_account_dir() -> PathBuf {
    std::env::var_os(SERVICE_ACCOUNT_DIR_ENV)
        .filter(|d| !d.is_empty())
        .map_or_else(|| PathBuf::from(SERVICE_ACCOUNT_DIR), PathBuf::from)
}

/// TLS trusting only the cluster's CA.
pub(super) fn tls_config(ca_file: &Path) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_file)
        .with_context(|| format!("reading {}", ca_file.display()))?;
    for cert in certs {
        let cert = cert.with_context(|| format!("parsing {}", ca_file.display()))?;
        roots
            .add(cert)
            .with_context(|| format!("adding a CA of {}", ca_file.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outside_a_cluster_it_is_off() {
        // The test runs outside Kubernetes: no service host variable.
        if std::env::var_os("KUBERNETES_SERVICE_HOST").is_none() {
            assert!(KubeSource::in_cluster(Some("node-1")).unwrap().is_none());
        }
    }

    #[test]
    fn a_bad_ca_file_is_a_clear_error() {
        let err = tls_config(Path::new("/nonexistent/ca.crt")).unwrap_err();
        assert!(
            format!("{err:#}").contains("/nonexistent/ca.crt"),
            "{err:#}"
        );
    }
}
