//! The user's container selection: `--container ID|NAME`, `--cgroup PATH`, `--k8s-namespace`,
//! `--k8s-pod-label k=v`. A container is selected when it matches any `--container` (or lies
//! in a `--cgroup`), or, when Kubernetes filters are given, when its pod is in one of the
//! namespaces (if any are given) and carries every label (if any are given).

use std::collections::BTreeMap;

use crate::span::model::ContainerIdentity;

use super::cgroup_fs::is_within;

/// A `--container` value shorter than this is a name only: a short hex word is too likely
/// to be a name, and too likely to match many ids.
pub const MIN_ID_PREFIX: usize = 12;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerFilter {
    /// `--container`: id prefixes (12+ hex digits) or names.
    pub containers: Vec<String>,
    /// `--cgroup`: cgroup v2 paths, relative to the hierarchy's root.
    pub cgroups: Vec<String>,
    pub k8s_namespaces: Vec<String>,
    pub k8s_labels: Vec<(String, String)>,
}

impl ContainerFilter {
    /// Whether any container flag was given (the kernel then filters by cgroup).
    pub fn is_active(&self) -> bool {
        !self.containers.is_empty() || !self.cgroups.is_empty() || self.wants_kubernetes()
    }

    /// Whether selection needs pod metadata.
    pub fn wants_kubernetes(&self) -> bool {
        !self.k8s_namespaces.is_empty() || !self.k8s_labels.is_empty()
    }

    /// Whether a container is selected; `labels` are its pod's.
    pub fn matches_container(
        &self,
        identity: &ContainerIdentity,
        labels: &BTreeMap<String, String>,
    ) -> bool {
        if self.containers.iter().any(|c| names(identity, c)) {
            return true;
        }
        if self
            .cgroups
            .iter()
            .any(|c| is_within(&identity.cgroup_path, c))
        {
            return true;
        }
        if !self.wants_kubernetes() {
            return false;
        }
        let Some(k8s) = &identity.k8s else {
            return false;
        };
        (self.k8s_namespaces.is_empty() || self.k8s_namespaces.contains(&k8s.namespace))
            && self
                .k8s_labels
                .iter()
                .all(|(k, v)| labels.get(k) == Some(v))
    }

    /// Whether a cgroup that is no container is selected (by `--cgroup`).
    pub fn matches_cgroup(&self, path: &str) -> bool {
        self.cgroups.iter().any(|c| is_within(path, c))
    }
}

/// Whether `given` names the container: an id prefix, its runtime name, or its Kubernetes
/// container name (`name`, `pod/name` or `namespace/pod/name`).
fn names(identity: &ContainerIdentity, given: &str) -> bool {
    let lower = given.to_ascii_lowercase();
    if !identity.id.is_empty()
        && lower.len() >= MIN_ID_PREFIX
        && lower.bytes().all(|b| b.is_ascii_hexdigit())
        && identity.id.starts_with(&lower)
    {
        return true;
    }
    if identity.name.as_deref() == Some(given.trim_start_matches('/')) {
        return true;
    }
    identity.k8s.as_ref().is_some_and(|k| {
        given == k.container_name
            || given == format!("{}/{}", k.pod_name, k.container_name)
            || given == format!("{}/{}/{}", k.namespace, k.pod_name, k.container_name)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::span::model::K8sIdentity;

    const ID: &str = "5d2e1e6a0f4b4c8e9a7d3b2c1f0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e";

    fn docker(name: &str) -> ContainerIdentity {
        ContainerIdentity {
            id: ID.into(),
            runtime: Some("docker"),
            cgroup_path: format!("/docker/{ID}"),
            name: Some(name.into()),
            ..Default::default()
        }
    }

    #[test]
    fn by_id_prefix_and_name() {
        let none = BTreeMap::new();
        let f = ContainerFilter {
            containers: vec!["5D2E1E6A0F4B".into()],
            ..Default::default()
        };
        assert!(f.is_active());
        assert!(f.matches_container(&docker("x"), &none));
        // Too short to be an id: a name, which this is not.
        let f = ContainerFilter {
            containers: vec!["5d2e1e".into()],
            ..Default::default()
        };
        assert!(!f.matches_container(&docker("x"), &none));
        let f = ContainerFilter {
            containers: vec!["api".into()],
            ..Default::default()
        };
        assert!(f.matches_container(&docker("api"), &none));
        assert!(!f.matches_container(&docker("api2"), &none));
        assert!(!ContainerFilter::default().is_active());
    }

    #[test]
    fn by_cgroup_and_kubernetes() {
        let none = BTreeMap::new();
        let f = ContainerFilter {
            cgroups: vec!["/docker".into()],
            ..Default::default()
        };
        assert!(f.matches_container(&docker("a"), &none));
        assert!(f.matches_cgroup("/docker/x/y"));
        assert!(!f.matches_cgroup("/dockerd"));
        let mut pod = docker("k8s_api_x");
        pod.k8s = Some(K8sIdentity {
            pod_name: "dify-api-1".into(),
            namespace: "dify".into(),
            container_name: "api".into(),
            ..Default::default()
        });
        let labels = BTreeMap::from([("app".to_string(), "dify-api".to_string())]);
        let f = ContainerFilter {
            k8s_namespaces: vec!["dify".into()],
            k8s_labels: vec![("app".into(), "dify-api".into())],
            ..Default::default()
        };
        assert!(f.matches_container(&pod, &labels));
        assert!(!f.matches_container(&pod, &none), "label missing");
        assert!(!f.matches_container(&docker("a"), &labels), "no pod");
        let f = ContainerFilter {
            k8s_namespaces: vec!["other".into()],
            ..Default::default()
        };
        assert!(!f.matches_container(&pod, &labels));
        let f = ContainerFilter {
            containers: vec!["dify/dify-api-1/api".into()],
            ..Default::default()
        };
        assert!(f.matches_container(&pod, &none));
    }
}
