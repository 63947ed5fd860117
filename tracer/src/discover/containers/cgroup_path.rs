//! Which container a cgroup path belongs to, from the shapes container runtimes give their
//! cgroups. Pure: the input is a line of `/proc/<pid>/cgroup` or a path under the cgroup2
//! mount.
//!
//! Shapes (cgroupfs driver first, systemd driver second):
//! - docker: `/docker/<id>`, `/system.slice/docker-<id>.scope`
//! - containerd / CRI: `/kubepods/<qos>/pod<uid>/<id>`,
//!   `/kubepods.slice/.../cri-containerd-<id>.scope`, and containerd's own `/<namespace>/<id>`
//! - cri-o: `/kubepods/.../crio-<id>`, `.../crio-<id>.scope`
//! - podman: `/machine.slice/libpod-<id>.scope`, `/libpod_parent/libpod-<id>`
//!
//! A path below a container's cgroup (a container that makes its own sub-cgroups, or the
//! `.../init.scope` of a systemd container) belongs to that container.

/// Container runtimes, as named by their cgroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Runtime {
    Docker,
    Containerd,
    CriO,
    Podman,
    /// A bare id under a Kubernetes pod cgroup (cgroupfs driver): the runtime does not say.
    Kubernetes,
}

impl Runtime {
    /// The `container.runtime.name` value.
    pub fn name(self) -> &'static str {
        match self {
            Runtime::Docker => "docker",
            Runtime::Containerd => "containerd",
            Runtime::CriO => "cri-o",
            Runtime::Podman => "podman",
            Runtime::Kubernetes => "kubernetes",
        }
    }
}

/// A container named by a cgroup path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ContainerRef {
    /// The full id, 64 lower-case hex digits.
    pub id: String,
    pub runtime: Runtime,
    /// The Kubernetes pod uid when the path has a `pod<uid>` component.
    pub pod_uid: Option<String>,
}

/// The cgroup v2 path of a process, from the text of `/proc/<pid>/cgroup` (the `0::` line).
/// On a pure v1 host there is none.
pub fn unified_path(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(str::trim_end)
}

/// The container of a process, from the text of `/proc/<pid>/cgroup`: the v2 line first, then
/// every v1 line (a v1-only host, or a hybrid one whose runtime only uses the v1 controllers).
pub fn container_of_proc(proc_cgroup: &str) -> Option<ContainerRef> {
    if let Some(found) = unified_path(proc_cgroup).and_then(container_of_path) {
        return Some(found);
    }
    proc_cgroup.lines().find_map(|line| {
        // hierarchy-id:controllers:path; the path may contain ':'.
        let mut parts = line.splitn(3, ':');
        let _hierarchy = parts.next()?;
        let _controllers = parts.next()?;
        container_of_path(parts.next()?)
    })
}

/// The container a cgroup path belongs to: the deepest component with a container shape
/// decides, so a sub-cgroup of a container belongs to it.
pub fn container_of_path(path: &str) -> Option<ContainerRef> {
    let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    let pod_uid = components.iter().find_map(|c| pod_uid_of(c));
    let mut found = None;
    for (i, component) in components.iter().enumerate() {
        let parent = i.checked_sub(1).map(|p| components[p]);
        if let Some((id, runtime)) = container_component(component, parent, pod_uid.is_some()) {
            // The outermost container wins: a container nested in another one is the inner
            // runtime's business, and the outer one is what a user names.
            found = Some((id, runtime));
            break;
        }
    }
    let (id, runtime) = found?;
    Some(ContainerRef {
        id: id.to_ascii_lowercase(),
        runtime,
        pod_uid,
    })
}

/// A component that names a container, with its runtime.
fn container_component<'a>(
    component: &'a str,
    parent: Option<&str>,
    in_pod: bool,
) -> Option<(&'a str, Runtime)> {
    let unscoped = component.strip_suffix(".scope").unwrap_or(component);
    for (prefix, runtime) in [
        ("docker-", Runtime::Docker),
        ("cri-containerd-", Runtime::Containerd),
        ("crio-", Runtime::CriO),
        ("libpod-", Runtime::Podman),
    ] {
        if let Some(id) = unscoped.strip_prefix(prefix)
            && is_full_id(id)
        {
            return Some((id, runtime));
        }
    }
    if !is_full_id(component) {
        return None;
    }
    let runtime = match parent {
        Some("docker") => Runtime::Docker,
        Some(p) if p.starts_with("libpod") => Runtime::Podman,
        _ if in_pod => Runtime::Kubernetes,
        // containerd outside Kubernetes puts a task at /<namespace>/<id>.
        Some(_) => Runtime::Containerd,
        None => return None,
    };
    Some((component, runtime))
}

/// `pod<uid>` (cgroupfs) or `kubepods-<qos>-pod<uid_with_underscores>.slice` (systemd).
fn pod_uid_of(component: &str) -> Option<String> {
    let unsliced = component.strip_suffix(".slice").unwrap_or(component);
    let at = unsliced.rfind("pod")?;
    let before = &unsliced[..at];
    if !(before.is_empty() || before.ends_with('-')) {
        return None;
    }
    let uid = unsliced[at + 3..].replace('_', "-");
    let is_uid = uid.len() == 36
        && uid.bytes().enumerate().all(|(i, b)| {
            matches!(i, 8 | 13 | 18 | 23) == (b == b'-') && (b == b'-' || b.is_ascii_hexdigit())
        });
    is_uid.then(|| uid.to_ascii_lowercase())
}

/// 64 hex digits: what docker, containerd, cri-o and podman use as container ids.
pub fn is_full_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f4e0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7";

    fn of(path: &str) -> Option<(String, Runtime)> {
        container_of_path(path).map(|c| (c.id, c.runtime))
    }

    #[test]
    fn docker_shapes() {
        assert_eq!(
            of(&format!("/docker/{ID}")),
            Some((ID.into(), Runtime::Docker))
        );
        assert_eq!(
            of(&format!("/system.slice/docker-{ID}.scope")),
            Some((ID.into(), Runtime::Docker))
        );
        // A container's own sub-cgroup belongs to it.
        assert_eq!(
            of(&format!("/system.slice/docker-{ID}.scope/init.scope")),
            Some((ID.into(), Runtime::Docker))
        );
    }

    #[test]
    fn kubernetes_shapes() {
        let c = container_of_path(&format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice/cri-containerd-{ID}.scope"
        ))
        .expect("cri-containerd");
        assert_eq!(c.id, ID);
        assert_eq!(c.runtime, Runtime::Containerd);
        assert_eq!(
            c.pod_uid.as_deref(),
            Some("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0")
        );
        let c = container_of_path(&format!(
            "/kubepods/besteffort/pod0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0/{ID}"
        ))
        .expect("cgroupfs driver");
        assert_eq!((c.id.as_str(), c.runtime), (ID, Runtime::Kubernetes));
        assert_eq!(
            c.pod_uid.as_deref(),
            Some("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0")
        );
        assert_eq!(
            of(&format!(
                "/kubepods.slice/kubepods-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice/crio-{ID}.scope"
            )),
            Some((ID.into(), Runtime::CriO))
        );
        assert_eq!(
            of(&format!(
                "/kubepods/pod0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0/crio-{ID}"
            )),
            Some((ID.into(), Runtime::CriO))
        );
        // The pod cgroup itself is no container.
        assert_eq!(
            of("/kubepods/besteffort/pod0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"),
            None
        );
    }

    #[test]
    fn podman_and_containerd_shapes() {
        assert_eq!(
            of(&format!("/machine.slice/libpod-{ID}.scope")),
            Some((ID.into(), Runtime::Podman))
        );
        assert_eq!(
            of(&format!("/libpod_parent/libpod-{ID}")),
            Some((ID.into(), Runtime::Podman))
        );
        assert_eq!(
            of(&format!(
                "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container"
            )),
            Some((ID.into(), Runtime::Podman))
        );
        assert_eq!(
            of(&format!("/default/{ID}")),
            Some((ID.into(), Runtime::Containerd))
        );
        // libpod's conmon is not the container.
        assert_eq!(
            of(&format!("/machine.slice/libpod-conmon-{ID}.scope")),
            None
        );
    }

    #[test]
    fn host_paths_are_no_container() {
        for path in [
            "/",
            "",
            "/user.slice/user-0.slice/session-3.scope",
            "/system.slice/docker.service",
            "/docker",
            "/docker/abc",
            &format!("/{ID}"),
            &format!("/system.slice/docker-{}.scope", &ID[..63]),
        ] {
            assert_eq!(of(path), None, "{path}");
        }
    }

    #[test]
    fn proc_cgroup_files() {
        // cgroup v1 + v2 hybrid, as measured on the dev machines.
        let hybrid = format!(
            "12:pids:/docker/{ID}\n11:memory:/docker/{ID}\n1:name=systemd:/docker/{ID}\n0::/docker/{ID}\n"
        );
        assert_eq!(unified_path(&hybrid), Some(&*format!("/docker/{ID}")));
        let c = container_of_proc(&hybrid).expect("hybrid");
        assert_eq!((c.id.as_str(), c.runtime), (ID, Runtime::Docker));
        // Pure v2.
        let v2 = format!("0::/system.slice/docker-{ID}.scope\n");
        assert_eq!(
            container_of_proc(&v2).map(|c| c.runtime),
            Some(Runtime::Docker)
        );
        // Pure v1: only controller lines.
        let v1 = format!(
            "4:cpu,cpuacct:/kubepods/burstable/pod0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0/{ID}\n"
        );
        assert_eq!(unified_path(&v1), None);
        assert_eq!(
            container_of_proc(&v1).map(|c| c.runtime),
            Some(Runtime::Kubernetes)
        );
        // A host process.
        assert_eq!(container_of_proc("12:pids:/\n0::/\n"), None);
        assert_eq!(unified_path("0::/\n"), Some("/"));
        assert_eq!(container_of_proc("garbage\n\n::\n"), None);
    }
}
