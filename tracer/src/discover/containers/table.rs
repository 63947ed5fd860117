//! The event loop's view of containers: the identity of a process, from its cgroup and what
//! the watcher learned from the runtime and Kubernetes.

use std::{collections::HashMap, sync::Arc};

use crate::span::model::ContainerIdentity;

use super::{
    cgroup_fs::is_within,
    cgroup_path::{container_of_proc, unified_path},
};

/// Containers seen at once, at most (one entry per container, dropped with it).
const MAX_CONTAINERS: usize = 16384;

#[derive(Debug, Default)]
pub struct ContainerTable {
    by_id: HashMap<String, Arc<ContainerIdentity>>,
    /// `--cgroup` paths: their processes carry the cgroup as identity.
    cgroups: Vec<String>,
}

impl ContainerTable {
    pub fn new(cgroups: Vec<String>) -> Self {
        Self {
            by_id: HashMap::new(),
            cgroups,
        }
    }

    /// What the watcher learned; true when something changed.
    pub fn learn(&mut self, identities: &[Arc<ContainerIdentity>]) -> bool {
        for identity in identities {
            if self.by_id.len() >= MAX_CONTAINERS && !self.by_id.contains_key(&identity.id) {
                break;
            }
            self.by_id.insert(identity.id.clone(), identity.clone());
        }
        !identities.is_empty()
    }

    /// A container that went away.
    pub fn forget(&mut self, id: &str) {
        self.by_id.remove(id);
    }

    /// The best identity known for a container id.
    pub fn by_id(&self, id: &str) -> Option<&Arc<ContainerIdentity>> {
        self.by_id.get(id)
    }

    /// The identity of a process, from the text of its `/proc/<pid>/cgroup`.
    pub fn identity_of(&self, proc_cgroup: &str) -> Option<Arc<ContainerIdentity>> {
        if let Some(c) = container_of_proc(proc_cgroup) {
            if let Some(known) = self.by_id.get(&c.id) {
                return Some(known.clone());
            }
            return Some(Arc::new(ContainerIdentity {
                runtime: Some(c.runtime.name()),
                cgroup_path: unified_path(proc_cgroup).unwrap_or_default().to_string(),
                id: c.id,
                ..Default::default()
            }));
        }
        let path = unified_path(proc_cgroup)?;
        self.cgroups.iter().any(|c| is_within(path, c)).then(|| {
            Arc::new(ContainerIdentity {
                cgroup_path: path.to_string(),
                ..Default::default()
            })
        })
    }

    /// The identity of a running process; None for a host process or one that is gone.
    pub fn identity_of_pid(&self, pid: u32) -> Option<Arc<ContainerIdentity>> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        self.identity_of(&text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "5d2e1e6a0f4b4c8e9a7d3b2c1f0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e";

    #[test]
    fn identity_from_cgroup_and_watcher() {
        let mut table = ContainerTable::new(vec!["/difytrace-test".into()]);
        let proc_cgroup = format!("1:name=systemd:/docker/{ID}\n0::/docker/{ID}\n");
        let bare = table.identity_of(&proc_cgroup).expect("container");
        assert_eq!(bare.id, ID);
        assert_eq!(bare.runtime, Some("docker"));
        assert_eq!(bare.name, None);
        table.learn(&[Arc::new(ContainerIdentity {
            id: ID.into(),
            name: Some("api".into()),
            ..(*bare).clone()
        })]);
        assert_eq!(
            table
                .identity_of(&proc_cgroup)
                .and_then(|c| c.name.clone())
                .as_deref(),
            Some("api")
        );
        let plain = table
            .identity_of("0::/difytrace-test/inner\n")
            .expect("selected cgroup");
        assert_eq!(
            (plain.id.as_str(), plain.cgroup_path.as_str()),
            ("", "/difytrace-test/inner")
        );
        assert_eq!(table.identity_of("0::/user.slice\n"), None);
        assert_eq!(table.identity_of("0::/\n"), None);
    }

    #[test]
    fn own_process_is_readable() {
        // This test's own process: a host process or a container, never an error.
        let table = ContainerTable::default();
        let _ = table.identity_of_pid(std::process::id());
        assert_eq!(table.identity_of_pid(u32::MAX), None);
    }
}
