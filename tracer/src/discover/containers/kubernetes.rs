//! Kubernetes identity of containers: the pods of this node, read from the API server with the
//! pod's service account, mapped by container id. Pure parsing here; the transport is in
//! `kube_client`.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

use crate::span::model::K8sIdentity;

/// A container of a pod on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodContainer {
    pub identity: K8sIdentity,
    pub labels: BTreeMap<String, String>,
    pub image: Option<String>,
}

#[derive(Deserialize)]
struct PodList {
    #[serde(default)]
    items: Vec<Pod>,
}

#[derive(Deserialize)]
struct Pod {
    metadata: Metadata,
    #[serde(default)]
    spec: Option<PodSpec>,
    #[serde(default)]
    status: Option<PodStatus>,
}

#[derive(Deserialize)]
struct Metadata {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    uid: String,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodSpec {
    #[serde(default)]
    node_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodStatus {
    #[serde(default)]
    container_statuses: Option<Vec<ContainerStatus>>,
    #[serde(default)]
    init_container_statuses: Option<Vec<ContainerStatus>>,
    #[serde(default)]
    ephemeral_container_statuses: Option<Vec<ContainerStatus>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContainerStatus {
    #[serde(default)]
    name: String,
    /// `containerd://<id>`, `docker://<id>`, `cri-o://<id>`; empty while it starts.
    #[serde(default, rename = "containerID")]
    container_id: Option<String>,
    #[serde(default)]
    image: Option<String>,
}

/// The containers of a `GET /api/v1/pods` answer (or the kubelet's `/pods`), by container id.
pub fn parse_pod_list(body: &[u8]) -> Result<HashMap<String, PodContainer>, serde_json::Error> {
    let list: PodList = serde_json::from_slice(body)?;
    let mut out = HashMap::new();
    for pod in list.items {
        let node = pod.spec.and_then(|s| s.node_name).unwrap_or_default();
        let labels = pod.metadata.labels.unwrap_or_default();
        let Some(status) = pod.status else {
            continue;
        };
        let statuses = [
            status.container_statuses,
            status.init_container_statuses,
            status.ephemeral_container_statuses,
        ];
        for cs in statuses.into_iter().flatten().flatten() {
            let Some(id) = cs.container_id.as_deref().and_then(strip_runtime) else {
                continue;
            };
            out.insert(
                id,
                PodContainer {
                    identity: K8sIdentity {
                        pod_name: pod.metadata.name.clone(),
                        pod_uid: pod.metadata.uid.clone(),
                        namespace: pod.metadata.namespace.clone(),
                        container_name: cs.name,
                        node_name: node.clone(),
                    },
                    labels: labels.clone(),
                    image: cs.image.filter(|i| !i.is_empty()),
                },
            );
        }
    }
    Ok(out)
}

/// `containerd://<id>` → `<id>`, lower-case.
fn strip_runtime(container_id: &str) -> Option<String> {
    let (_, id) = container_id.split_once("://")?;
    (!id.is_empty()).then(|| id.to_ascii_lowercase())
}

/// The API path listing the pods of one node.
pub fn pods_of_node_path(node: &str) -> String {
    let mut encoded = String::with_capacity(node.len());
    for b in node.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_') {
            encoded.push(b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    format!("/api/v1/pods?fieldSelector=spec.nodeName%3D{encoded}")
}

/// `k=v` of `--k8s-pod-label`.
pub fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(format!("expected key=value, got {text:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of a `kubectl get --raw /api/v1/pods?fieldSelector=spec.nodeName=node-1`
    /// answer (Kubernetes 1.31), trimmed to the fields that matter and two pods.
    const PODS: &str = r#"{"kind":"PodList","apiVersion":"v1","metadata":{"resourceVersion":"81234"},"items":[
{"metadata":{"name":"dify-api-7c9f8d6b5-x2x4q","generateName":"dify-api-7c9f8d6b5-","namespace":"dify","uid":"0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0","labels":{"app":"dify-api","pod-template-hash":"7c9f8d6b5"}},
 "spec":{"nodeName":"node-1","containers":[{"name":"api","image":"langgenius/dify-api:1.4.0"}]},
 "status":{"phase":"Running","containerStatuses":[{"name":"api","state":{"running":{"startedAt":"2026-11-26T04:00:00Z"}},"ready":true,"restartCount":0,"image":"docker.io/langgenius/dify-api:1.4.0","imageID":"docker.io/langgenius/dify-api@sha256:aa","containerID":"containerd://3F4E0A1B2C3D4E5F60718293A4B5C6D7E8F90A1B2C3D4E5F60718293A4B5C6D7","started":true}],
   "initContainerStatuses":[{"name":"init-perms","image":"busybox:1.36","containerID":"containerd://aa00000000000000000000000000000000000000000000000000000000000002"}]}},
{"metadata":{"name":"pending-0","namespace":"dify","uid":"u2"},"spec":{"nodeName":"node-1"},
 "status":{"phase":"Pending","containerStatuses":[{"name":"c","image":"x","containerID":""}]}},
{"metadata":{"name":"no-status","namespace":"kube-system","uid":"u3"}}
]}"#;

    #[test]
    fn maps_container_ids_to_pods() {
        let got = parse_pod_list(PODS.as_bytes()).unwrap();
        assert_eq!(got.len(), 2, "{got:?}");
        let api = &got["3f4e0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7"];
        assert_eq!(
            api.identity,
            K8sIdentity {
                pod_name: "dify-api-7c9f8d6b5-x2x4q".into(),
                pod_uid: "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0".into(),
                namespace: "dify".into(),
                container_name: "api".into(),
                node_name: "node-1".into(),
            }
        );
        assert_eq!(api.labels["app"], "dify-api");
        assert_eq!(
            api.image.as_deref(),
            Some("docker.io/langgenius/dify-api:1.4.0")
        );
        let init = &got["aa00000000000000000000000000000000000000000000000000000000000002"];
        assert_eq!(init.identity.container_name, "init-perms");
        assert!(
            parse_pod_list(b"{\"kind\":\"Status\",\"code\":403}")
                .unwrap()
                .is_empty()
        );
        assert!(parse_pod_list(b"[1,2]").is_err());
    }

    #[test]
    fn node_paths_and_labels() {
        assert_eq!(
            pods_of_node_path("ip-10-0-1-2.ec2.internal"),
            "/api/v1/pods?fieldSelector=spec.nodeName%3Dip-10-0-1-2.ec2.internal"
        );
        assert_eq!(
            pods_of_node_path("a b"),
            "/api/v1/pods?fieldSelector=spec.nodeName%3Da%20b"
        );
        assert_eq!(
            parse_label("app=dify-api"),
            Ok(("app".into(), "dify-api".into()))
        );
        assert_eq!(parse_label("tier="), Ok(("tier".into(), String::new())));
        assert!(parse_label("novalue").is_err());
        assert!(parse_label("=x").is_err());
    }
}
