//! The kubelet as the source of pod metadata: `GET /pods` on its HTTPS port (10250) with the
//! service account's bearer token answers the pods of this node, in the API server's PodList
//! shape, without load on the API server and without its RBAC for listing pods (the kubelet
//! asks for `nodes/proxy` instead).
//!
//! Kubelets usually serve a self-signed certificate (one they make at start, unless the
//! cluster enables serverTLSBootstrap), which the cluster CA does not sign: such a kubelet
//! can only be reached with `--kubelet-insecure-tls`, which checks the handshake's signatures
//! but not who signed the certificate (the same trade-off as metrics-server's flag of that
//! name).

use std::sync::Arc;

use anyhow::{Context as _, bail};
use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer, ServerName, UnixTime},
};

use super::kube_client::{KubeSource, service_account_dir, tls_config};

/// The kubelet's authenticated port.
pub const DEFAULT_PORT: u16 = 10250;
/// The kubelet's pod list.
pub const PODS_PATH: &str = "/pods";

/// Host and port of a `--kubelet-url` (`https://host[:port][/]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeletUrl {
    pub host: String,
    pub port: u16,
}

/// Parses `https://10.0.1.2:10250`, `https://[fd00::2]:10250`, `https://node-1`.
pub fn parse_url(url: &str) -> Result<KubeletUrl, String> {
    let Some(rest) = url.trim().strip_prefix("https://") else {
        return Err(format!(
            "{url:?}: the kubelet URL must start with https:// (its read-only http port is off on current clusters)"
        ));
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains('/') || authority.contains('@') || authority.contains('?') {
        return Err(format!(
            "{url:?}: only https://host[:port] is accepted (no path, user or query)"
        ));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("{url:?}: unclosed '[' in the host"))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| format!("{url:?}: junk after the host"))?,
            ),
        };
        (host, port)
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(format!("{url:?}: no host"));
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{url:?}: bad port {p:?}"))?,
    };
    Ok(KubeletUrl {
        host: host.to_string(),
        port,
    })
}

/// The kubelet source: the service account's token, and TLS trusting the cluster CA (or,
/// with `insecure`, any certificate).
pub fn source(url: &str, insecure: bool) -> anyhow::Result<KubeSource> {
    let parsed = parse_url(url).map_err(anyhow::Error::msg)?;
    let dir = service_account_dir();
    let tls = if insecure {
        any_certificate_tls()?
    } else {
        tls_config(&dir.join("ca.crt")).context(
            "the kubelet's certificate is checked against the cluster CA (--kubelet-insecure-tls skips that)",
        )?
    };
    let server_name = ServerName::try_from(parsed.host.clone())
        .with_context(|| format!("{:?} is no host name or IP address", parsed.host))?;
    if !dir.join("token").exists() {
        bail!(
            "no service account token at {}: the kubelet answers /pods only to an authenticated client",
            dir.join("token").display()
        );
    }
    Ok(KubeSource::with_parts(
        parsed.host,
        parsed.port,
        PODS_PATH.to_string(),
        server_name,
        dir.join("token"),
        tls,
    ))
}

/// TLS that accepts any server certificate but still verifies the handshake signatures
/// with the certificate's key.
fn any_certificate_tls() -> anyhow::Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    Ok(config)
}

#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("https://10.0.1.2:10250"),
            Ok(KubeletUrl {
                host: "10.0.1.2".into(),
                port: 10250
            })
        );
        assert_eq!(
            parse_url("https://node-1/"),
            Ok(KubeletUrl {
                host: "node-1".into(),
                port: DEFAULT_PORT
            })
        );
        assert_eq!(
            parse_url("https://[fd00::2]:10250"),
            Ok(KubeletUrl {
                host: "fd00::2".into(),
                port: 10250
            })
        );
        for bad in [
            "http://10.0.1.2:10255",
            "https://",
            "https://10.0.1.2:0",
            "https://10.0.1.2:x",
            "https://10.0.1.2:10250/pods",
            "https://[fd00::2",
            "https://[fd00::2]x",
        ] {
            assert!(parse_url(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn insecure_tls_builds() {
        assert!(any_certificate_tls().is_ok());
    }
}
