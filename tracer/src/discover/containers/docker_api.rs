//! The Docker Engine API (also served by podman's compatible socket) over its unix socket:
//! names and images of running containers. Optional: without the socket containers are known
//! by id only.

use std::{
    io::Write as _,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use super::http::{self, HttpError};

/// How long one API call may take; the agent's container refresh waits for it.
const TIMEOUT: Duration = Duration::from_secs(2);

/// A running container as the API lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerContainer {
    pub id: String,
    pub name: Option<String>,
    /// The image as the container was started from (`repo/name:tag`, or an image id).
    pub image: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("connecting to {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("talking to {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("unexpected container list: {0}")]
    Json(#[from] serde_json::Error),
}

/// A Docker Engine API endpoint on a unix socket.
#[derive(Debug, Clone)]
pub struct DockerApi {
    socket: PathBuf,
}

impl DockerApi {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Whether the socket exists at all (a host without Docker has none: no error then).
    pub fn present(&self) -> bool {
        self.socket.exists()
    }

    /// The running containers.
    pub fn list(&self) -> Result<Vec<DockerContainer>, DockerError> {
        let body = self.get("/containers/json")?;
        Ok(parse_list(&body)?)
    }

    fn get(&self, path: &str) -> Result<Vec<u8>, DockerError> {
        let io = |source| DockerError::Io {
            path: self.socket.clone(),
            source,
        };
        let mut stream =
            UnixStream::connect(&self.socket).map_err(|source| DockerError::Connect {
                path: self.socket.clone(),
                source,
            })?;
        stream.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
        stream.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
        stream
            .write_all(&http::get_request("docker", path, None))
            .map_err(io)?;
        let raw = http::read_all(&mut stream).map_err(io)?;
        Ok(http::response_body(&raw)?)
    }
}

#[derive(Deserialize)]
struct ListEntry {
    #[serde(rename = "Id")]
    id: String,
    #[serde(rename = "Names", default)]
    names: Option<Vec<String>>,
    #[serde(rename = "Image", default)]
    image: Option<String>,
}

/// The body of `GET /containers/json`.
pub fn parse_list(body: &[u8]) -> Result<Vec<DockerContainer>, serde_json::Error> {
    let entries: Vec<ListEntry> = serde_json::from_slice(body)?;
    Ok(entries
        .into_iter()
        .map(|e| DockerContainer {
            id: e.id.to_ascii_lowercase(),
            // Names carry a leading '/'; links add more names with further slashes.
            name: e
                .names
                .unwrap_or_default()
                .into_iter()
                .map(|n| n.trim_start_matches('/').to_string())
                .find(|n| !n.contains('/')),
            image: e.image.filter(|i| !i.is_empty()),
        })
        .collect())
}

/// Splits an image reference into name and tag: `reg:5000/a/b:1.2@sha256:…` → (`reg:5000/a/b`,
/// `1.2`). A bare image id (`sha256:…`) has no name.
pub fn split_image(image: &str) -> (Option<String>, Option<String>) {
    let without_digest = image.split('@').next().unwrap_or(image);
    if without_digest.starts_with("sha256:") {
        return (None, None);
    }
    let last_slash = without_digest.rfind('/').map_or(0, |i| i + 1);
    match without_digest[last_slash..].rfind(':') {
        Some(colon) => {
            let at = last_slash + colon;
            (
                Some(without_digest[..at].to_string()),
                Some(without_digest[at + 1..].to_string()),
            )
        }
        None => (Some(without_digest.to_string()), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Recorded from dockerd 20.10 (`GET /containers/json`), trimmed.
    const LIST: &str = r#"[{"Id":"5D2E1E6A0F4B4C8E9A7D3B2C1F0E9D8C7B6A5F4E3D2C1B0A9F8E7D6C5B4A3F2E","Names":["/difytrace-a"],"Image":"difytrace-test:1","ImageID":"sha256:0c2f","Command":"/usr/bin/python3 -m gunicorn","Created":1764130000,"Ports":[],"Labels":{},"State":"running","Status":"Up 2 seconds","HostConfig":{"NetworkMode":"host"},"NetworkSettings":{"Networks":{"host":{}}},"Mounts":[]},
{"Id":"aa00000000000000000000000000000000000000000000000000000000000001","Names":["/web/db","/db"],"Image":"sha256:1234","State":"running"}]"#;

    #[test]
    fn parses_the_container_list() {
        let list = parse_list(LIST.as_bytes()).unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(
            list[0].id,
            "5d2e1e6a0f4b4c8e9a7d3b2c1f0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e"
        );
        assert_eq!(list[0].name.as_deref(), Some("difytrace-a"));
        assert_eq!(list[0].image.as_deref(), Some("difytrace-test:1"));
        // A link name (`/web/db`) is not the container's own.
        assert_eq!(list[1].name.as_deref(), Some("db"));
        assert!(parse_list(b"{\"message\":\"page not found\"}").is_err());
        assert!(parse_list(b"[{\"Names\":[]}]").is_err());
    }

    #[test]
    fn image_names_and_tags() {
        assert_eq!(split_image("nginx"), (Some("nginx".into()), None));
        assert_eq!(
            split_image("nginx:1.27"),
            (Some("nginx".into()), Some("1.27".into()))
        );
        assert_eq!(
            split_image("reg.local:5000/langgenius/dify-api:1.4.0@sha256:abcd"),
            (
                Some("reg.local:5000/langgenius/dify-api".into()),
                Some("1.4.0".into())
            )
        );
        assert_eq!(
            split_image("reg.local:5000/dify-api"),
            (Some("reg.local:5000/dify-api".into()), None)
        );
        assert_eq!(split_image("sha256:0c2f"), (None, None));
    }

    #[test]
    fn missing_socket_is_an_error_not_a_panic() {
        let api = DockerApi::new("/nonexistent/difytrace/docker.sock");
        assert!(!api.present());
        assert!(matches!(api.list(), Err(DockerError::Connect { .. })));
    }
}
