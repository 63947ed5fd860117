//! The Container Runtime Interface (CRI, `runtime.v1.RuntimeService` over gRPC on a unix
//! socket) of containerd and cri-o: names, images and pod identity of running containers on
//! a node where the Kubernetes API is not reachable (or not used). Optional: without a CRI
//! socket containers are known by id (or by the Docker API / Kubernetes API) only.
//!
//! Only the few messages and fields the agent reads are declared here; field numbers are
//! those of k8s.io/cri-api `pkg/apis/runtime/v1/api.proto` (protobuf skips the rest).

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    time::Duration,
};

use tonic::transport::{Endpoint, Uri};

use crate::span::model::K8sIdentity;

/// How long one CRI call may take (connecting included); the container refresh waits for it.
const TIMEOUT: Duration = Duration::from_secs(2);
/// Where containerd and cri-o put their CRI socket by default.
pub const DEFAULT_SOCKETS: [&str; 2] = ["/run/containerd/containerd.sock", "/run/crio/crio.sock"];

/// The labels the kubelet puts on every container it creates through CRI.
pub const LABEL_POD_NAME: &str = "io.kubernetes.pod.name";
pub const LABEL_POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
pub const LABEL_POD_UID: &str = "io.kubernetes.pod.uid";
pub const LABEL_CONTAINER_NAME: &str = "io.kubernetes.container.name";
/// Sandbox labels under this prefix are the kubelet's, not the pod's own labels.
const KUBELET_LABEL_PREFIX: &str = "io.kubernetes.";

/// The runtime.v1 messages the agent sends and reads.
pub mod proto {
    use std::collections::HashMap;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct VersionRequest {
        #[prost(string, tag = "1")]
        pub version: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct VersionResponse {
        #[prost(string, tag = "1")]
        pub version: String,
        #[prost(string, tag = "2")]
        pub runtime_name: String,
        #[prost(string, tag = "3")]
        pub runtime_version: String,
        #[prost(string, tag = "4")]
        pub runtime_api_version: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ContainerStateValue {
        #[prost(int32, tag = "1")]
        pub state: i32,
    }

    /// `ContainerState.CONTAINER_RUNNING`.
    pub const CONTAINER_RUNNING: i32 = 1;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ContainerFilter {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(message, optional, tag = "2")]
        pub state: Option<ContainerStateValue>,
        #[prost(string, tag = "3")]
        pub pod_sandbox_id: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ListContainersRequest {
        #[prost(message, optional, tag = "1")]
        pub filter: Option<ContainerFilter>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ContainerMetadata {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(uint32, tag = "2")]
        pub attempt: u32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ImageSpec {
        #[prost(string, tag = "1")]
        pub image: String,
        /// What the user wrote in the pod spec (newer kubelets put the image id in `image`).
        #[prost(string, tag = "18")]
        pub user_specified_image: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Container {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(string, tag = "2")]
        pub pod_sandbox_id: String,
        #[prost(message, optional, tag = "3")]
        pub metadata: Option<ContainerMetadata>,
        #[prost(message, optional, tag = "4")]
        pub image: Option<ImageSpec>,
        #[prost(string, tag = "5")]
        pub image_ref: String,
        #[prost(int32, tag = "6")]
        pub state: i32,
        #[prost(map = "string, string", tag = "8")]
        pub labels: HashMap<String, String>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ListContainersResponse {
        #[prost(message, repeated, tag = "1")]
        pub containers: Vec<Container>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ListPodSandboxRequest {}

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodSandboxMetadata {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub uid: String,
        #[prost(string, tag = "3")]
        pub namespace: String,
        #[prost(uint32, tag = "4")]
        pub attempt: u32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodSandbox {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(message, optional, tag = "2")]
        pub metadata: Option<PodSandboxMetadata>,
        #[prost(int32, tag = "3")]
        pub state: i32,
        #[prost(map = "string, string", tag = "5")]
        pub labels: HashMap<String, String>,
    }

    /// `PodSandboxState.SANDBOX_READY`.
    pub const SANDBOX_READY: i32 = 0;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ListPodSandboxResponse {
        #[prost(message, repeated, tag = "1")]
        pub items: Vec<PodSandbox>,
    }
}

/// A running container as a CRI runtime lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CriContainer {
    /// Full id, lower-case.
    pub id: String,
    /// The runtime's name for it (for the kubelet's containers, the pod spec's name).
    pub name: Option<String>,
    /// The image as the user named it (`repo/name:tag`), or the image id.
    pub image: Option<String>,
    /// The runtime (`containerd`, `cri-o`) from the Version call.
    pub runtime: Option<&'static str>,
    /// Pod identity, when its pod sandbox or the kubelet's labels name one.
    pub k8s: Option<K8sIdentity>,
    /// The pod's own labels (the sandbox's, without the kubelet's `io.kubernetes.*`).
    pub pod_labels: BTreeMap<String, String>,
}

/// One answer of a CRI socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CriListing {
    /// The runtime's name and version as it reports them (for logs).
    pub runtime: String,
    /// Running containers and ready sandboxes.
    pub containers: Vec<CriContainer>,
}

#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("connecting to {path}: {source}")]
    Connect {
        path: PathBuf,
        source: tonic::transport::Error,
    },
    #[error("{call} on {path}: {status}")]
    Call {
        path: PathBuf,
        call: &'static str,
        status: Box<tonic::Status>,
    },
    #[error("CRI client runtime: {0}")]
    Runtime(std::io::Error),
}

impl CriError {
    /// The socket answers gRPC but not the CRI service (e.g. Docker's own containerd, whose
    /// CRI plugin is disabled).
    pub fn is_unimplemented(&self) -> bool {
        matches!(self, CriError::Call { status, .. } if status.code() == tonic::Code::Unimplemented)
    }
}

/// One CRI socket.
#[derive(Debug, Clone)]
pub struct CriApi {
    socket: PathBuf,
    /// This node's name, for the `k8s.node.name` of pods (CRI does not know it).
    node_name: Option<String>,
}

impl CriApi {
    pub fn new(socket: impl Into<PathBuf>, node_name: Option<String>) -> Self {
        Self {
            socket: socket.into(),
            node_name,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Whether the socket exists at all (a node without this runtime has none: no error).
    pub fn present(&self) -> bool {
        self.socket.exists()
    }

    /// The running containers, with their pods. Blocks (up to a few TIMEOUTs); runs the gRPC
    /// calls on a thread of its own so that it works from async code too.
    pub fn list(&self) -> Result<CriListing, CriError> {
        std::thread::scope(|scope| {
            let call = scope.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(CriError::Runtime)?;
                rt.block_on(self.list_async())
            });
            call.join().unwrap_or_else(|_| {
                Err(CriError::Runtime(std::io::Error::other(
                    "CRI client thread panicked",
                )))
            })
        })
    }

    async fn list_async(&self) -> Result<CriListing, CriError> {
        let channel = self.connect().await?;
        // gRPC's default 4 MiB would cut a busy node's lists short; the same cap as the pod
        // list's.
        let mut grpc = tonic::client::Grpc::new(channel)
            .max_decoding_message_size(super::http::MAX_RESPONSE_BYTES);
        let version: proto::VersionResponse = self
            .call(
                &mut grpc,
                "Version",
                proto::VersionRequest {
                    version: "v1".into(),
                },
            )
            .await?;
        let containers: proto::ListContainersResponse = self
            .call(
                &mut grpc,
                "ListContainers",
                proto::ListContainersRequest {
                    filter: Some(proto::ContainerFilter {
                        state: Some(proto::ContainerStateValue {
                            state: proto::CONTAINER_RUNNING,
                        }),
                        ..Default::default()
                    }),
                },
            )
            .await?;
        let sandboxes: proto::ListPodSandboxResponse = self
            .call(&mut grpc, "ListPodSandbox", proto::ListPodSandboxRequest {})
            .await?;
        let runtime = runtime_name(&version.runtime_name);
        Ok(CriListing {
            runtime: format!("{} {}", version.runtime_name, version.runtime_version),
            containers: map_containers(
                runtime,
                containers.containers,
                &sandboxes.items,
                self.node_name.as_deref(),
            ),
        })
    }

    async fn connect(&self) -> Result<tonic::transport::Channel, CriError> {
        let socket = self.socket.clone();
        // The URI is required by the API but unused: the connector always dials the socket.
        Endpoint::from_static("http://cri.local")
            .connect_timeout(TIMEOUT)
            .timeout(TIMEOUT)
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                async move {
                    tokio::net::UnixStream::connect(socket)
                        .await
                        .map(hyper_util::rt::TokioIo::new)
                }
            }))
            .await
            .map_err(|source| CriError::Connect {
                path: self.socket.clone(),
                source,
            })
    }

    async fn call<Req, Resp>(
        &self,
        grpc: &mut tonic::client::Grpc<tonic::transport::Channel>,
        method: &'static str,
        request: Req,
    ) -> Result<Resp, CriError>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let fail = |status: tonic::Status| CriError::Call {
            path: self.socket.clone(),
            call: method,
            status: Box::new(status),
        };
        grpc.ready()
            .await
            .map_err(|err| fail(tonic::Status::unavailable(err.to_string())))?;
        let path = format!("/runtime.v1.RuntimeService/{method}");
        let path = ::http::uri::PathAndQuery::try_from(path)
            .map_err(|err| fail(tonic::Status::internal(err.to_string())))?;
        let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
        grpc.unary(tonic::Request::new(request), path, codec)
            .await
            .map(tonic::Response::into_inner)
            .map_err(fail)
    }
}

/// The `container.runtime.name` for a CRI Version answer's runtime name.
pub fn runtime_name(reported: &str) -> Option<&'static str> {
    match reported.to_ascii_lowercase().as_str() {
        "containerd" => Some("containerd"),
        "cri-o" | "crio" => Some("cri-o"),
        _ => None,
    }
}

/// Containers with what their pod sandboxes say. The kubelet's labels on a container win
/// over its sandbox's metadata (they are what the kubelet itself reads back); a container
/// with neither has no pod identity. Ready sandboxes are listed too (containerd and cri-o
/// run each as a "pause" container with the sandbox's id and a cgroup of its own): they
/// carry their pod, with no container name.
pub fn map_containers(
    runtime: Option<&'static str>,
    containers: Vec<proto::Container>,
    sandboxes: &[proto::PodSandbox],
    node_name: Option<&str>,
) -> Vec<CriContainer> {
    let by_id: HashMap<&str, &proto::PodSandbox> =
        sandboxes.iter().map(|s| (s.id.as_str(), s)).collect();
    let mut out: Vec<CriContainer> = containers
        .into_iter()
        .filter(|c| !c.id.is_empty())
        .map(|c| {
            let sandbox = by_id.get(c.pod_sandbox_id.as_str()).copied();
            let meta = sandbox.and_then(|s| s.metadata.as_ref());
            let label = |key: &str| c.labels.get(key).filter(|v| !v.is_empty()).cloned();
            let name = c
                .metadata
                .as_ref()
                .map(|m| m.name.clone())
                .filter(|n| !n.is_empty());
            let pod_name = label(LABEL_POD_NAME).or_else(|| meta.map(|m| m.name.clone()));
            let k8s = pod_name
                .filter(|n| !n.is_empty())
                .map(|pod_name| K8sIdentity {
                    pod_name,
                    pod_uid: label(LABEL_POD_UID)
                        .or_else(|| meta.map(|m| m.uid.clone()))
                        .unwrap_or_default(),
                    namespace: label(LABEL_POD_NAMESPACE)
                        .or_else(|| meta.map(|m| m.namespace.clone()))
                        .unwrap_or_default(),
                    container_name: label(LABEL_CONTAINER_NAME)
                        .or_else(|| name.clone())
                        .unwrap_or_default(),
                    node_name: node_name.unwrap_or_default().to_string(),
                });
            let pod_labels = sandbox.map(|s| own_labels(&s.labels)).unwrap_or_default();
            let image = c
                .image
                .as_ref()
                .and_then(|i| {
                    [&i.user_specified_image, &i.image]
                        .into_iter()
                        .find(|s| !s.is_empty())
                        .cloned()
                })
                .or_else(|| Some(c.image_ref.clone()).filter(|r| !r.is_empty()));
            CriContainer {
                id: c.id.to_ascii_lowercase(),
                name,
                image,
                runtime,
                k8s,
                pod_labels,
            }
        })
        .collect();
    for sandbox in sandboxes {
        let Some(meta) = sandbox.metadata.as_ref() else {
            continue;
        };
        if sandbox.id.is_empty() || sandbox.state != proto::SANDBOX_READY || meta.name.is_empty() {
            continue;
        }
        out.push(CriContainer {
            id: sandbox.id.to_ascii_lowercase(),
            name: None,
            image: None,
            runtime,
            k8s: Some(K8sIdentity {
                pod_name: meta.name.clone(),
                pod_uid: meta.uid.clone(),
                namespace: meta.namespace.clone(),
                container_name: String::new(),
                node_name: node_name.unwrap_or_default().to_string(),
            }),
            pod_labels: own_labels(&sandbox.labels),
        });
    }
    out
}

/// A sandbox's labels without the kubelet's own `io.kubernetes.*` ones: the pod's labels.
fn own_labels(labels: &HashMap<String, String>) -> BTreeMap<String, String> {
    labels
        .iter()
        .filter(|(k, _)| !k.starts_with(KUBELET_LABEL_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The CRI sockets to ask: the given ones, else the runtimes' default sockets that exist.
/// A host path the agent's own mount namespace lacks is reached through pid 1's root (the
/// agent in a pod with hostPID needs no socket mount); a given socket that exists nowhere
/// yet is kept as given.
pub fn sockets(given: &[PathBuf]) -> Vec<PathBuf> {
    if !given.is_empty() {
        return given
            .iter()
            .map(|p| super::host_view::host_path(p).unwrap_or_else(|| p.clone()))
            .collect();
    }
    DEFAULT_SOCKETS
        .iter()
        .filter_map(|s| super::host_view::host_path(Path::new(s)))
        .collect()
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    const ID: &str = "3F4E0A1B2C3D4E5F60718293A4B5C6D7E8F90A1B2C3D4E5F60718293A4B5C6D7";

    fn kubelet_container() -> proto::Container {
        proto::Container {
            id: ID.into(),
            pod_sandbox_id: "sb1".into(),
            metadata: Some(proto::ContainerMetadata {
                name: "api".into(),
                attempt: 0,
            }),
            image: Some(proto::ImageSpec {
                image: "sha256:0c2f".into(),
                user_specified_image: "langgenius/dify-api:1.4.0".into(),
            }),
            image_ref: "sha256:0c2f".into(),
            state: proto::CONTAINER_RUNNING,
            labels: [
                (LABEL_POD_NAME, "dify-api-7c9f8d6b5-x2x4q"),
                (LABEL_POD_NAMESPACE, "dify"),
                (LABEL_POD_UID, "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"),
                (LABEL_CONTAINER_NAME, "api"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        }
    }

    fn sandbox() -> proto::PodSandbox {
        proto::PodSandbox {
            id: "sb1".into(),
            metadata: Some(proto::PodSandboxMetadata {
                name: "dify-api-7c9f8d6b5-x2x4q".into(),
                uid: "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0".into(),
                namespace: "dify".into(),
                attempt: 0,
            }),
            state: 0,
            labels: [
                ("app", "dify-api"),
                (LABEL_POD_NAME, "dify-api-7c9f8d6b5-x2x4q"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        }
    }

    #[test]
    fn kubelet_containers_carry_their_pod() {
        // Through the wire format, as a runtime would send it.
        let bytes = proto::ListContainersResponse {
            containers: vec![kubelet_container()],
        }
        .encode_to_vec();
        let decoded = proto::ListContainersResponse::decode(bytes.as_slice()).unwrap();
        let got = map_containers(
            Some("containerd"),
            decoded.containers,
            &[sandbox()],
            Some("node-1"),
        );
        assert_eq!(got.len(), 2, "the container and its sandbox");
        let c = &got[0];
        assert_eq!(c.id, ID.to_ascii_lowercase());
        assert_eq!(c.name.as_deref(), Some("api"));
        assert_eq!(c.image.as_deref(), Some("langgenius/dify-api:1.4.0"));
        assert_eq!(c.runtime, Some("containerd"));
        assert_eq!(
            c.k8s,
            Some(K8sIdentity {
                pod_name: "dify-api-7c9f8d6b5-x2x4q".into(),
                pod_uid: "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0".into(),
                namespace: "dify".into(),
                container_name: "api".into(),
                node_name: "node-1".into(),
            })
        );
        // The pod's own label, not the kubelet's.
        assert_eq!(
            c.pod_labels.iter().collect::<Vec<_>>(),
            vec![(&"app".to_string(), &"dify-api".to_string())]
        );
        let pause = &got[1];
        assert_eq!((pause.id.as_str(), pause.name.as_deref()), ("sb1", None));
        let pod = pause.k8s.as_ref().expect("the sandbox's pod");
        assert_eq!(
            (pod.pod_name.as_str(), pod.container_name.as_str()),
            ("dify-api-7c9f8d6b5-x2x4q", "")
        );
        assert_eq!(pause.pod_labels, c.pod_labels);
        // A sandbox that is not ready has no running process to name.
        let mut stopped = sandbox();
        stopped.state = 1;
        assert_eq!(map_containers(None, Vec::new(), &[stopped], None).len(), 0);
    }

    #[test]
    fn sandbox_metadata_without_kubelet_labels_and_plain_containers() {
        let mut c = kubelet_container();
        c.labels.clear();
        c.image = Some(proto::ImageSpec {
            image: "docker.io/library/nginx:1.27".into(),
            user_specified_image: String::new(),
        });
        let mut plain = kubelet_container();
        plain.id = "aa00000000000000000000000000000000000000000000000000000000000002".into();
        plain.labels.clear();
        plain.pod_sandbox_id = "gone".into();
        plain.image = None;
        let got = map_containers(None, vec![c, plain], &[sandbox()], None);
        assert_eq!(got.len(), 3);
        let k8s = got[0].k8s.as_ref().expect("pod from the sandbox");
        assert_eq!(
            (k8s.pod_name.as_str(), k8s.namespace.as_str()),
            ("dify-api-7c9f8d6b5-x2x4q", "dify")
        );
        assert_eq!(k8s.container_name, "api");
        assert_eq!(k8s.node_name, "");
        assert_eq!(
            got[0].image.as_deref(),
            Some("docker.io/library/nginx:1.27")
        );
        assert_eq!(got[1].k8s, None);
        assert_eq!(got[1].image.as_deref(), Some("sha256:0c2f"));
        assert!(got[1].pod_labels.is_empty());
    }

    #[test]
    fn runtime_names() {
        assert_eq!(runtime_name("containerd"), Some("containerd"));
        assert_eq!(runtime_name("cri-o"), Some("cri-o"));
        assert_eq!(runtime_name("frakti"), None);
    }

    #[test]
    fn missing_socket_is_an_error_not_a_panic() {
        let api = CriApi::new("/nonexistent/difytrace/containerd.sock", None);
        assert!(!api.present());
        let err = api.list().unwrap_err();
        assert!(matches!(err, CriError::Connect { .. }), "{err}");
        assert!(!err.is_unimplemented());
    }

    #[test]
    fn given_sockets_are_used_as_given() {
        let given = vec![PathBuf::from("/tmp/x.sock")];
        assert_eq!(sockets(&given), given);
    }
}
