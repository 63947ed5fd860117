//! The host's view of cgroups when the agent itself runs in a container (hostPID, /proc of
//! the host): its own cgroup namespace and mount namespace may be private, so
//! `/proc/<pid>/cgroup` would print paths relative to the agent's cgroup and its
//! /sys/fs/cgroup would show only its own subtree. Pid 1 (the host's init under hostPID) has
//! the host's view; on a host, pid 1's namespaces are the agent's and nothing changes.

use std::{fs, os::fd::AsRawFd as _, path::PathBuf};

use tracing::{debug, info, warn};

use super::cgroup_fs::cgroup2_mount;

/// Joins pid 1's cgroup namespace when it differs from the agent's. Must run before any other
/// thread starts: setns changes the calling thread only, and threads inherit it.
pub fn join_host_cgroup_namespace() {
    let (Ok(own), Ok(init)) = (
        fs::read_link("/proc/self/ns/cgroup"),
        fs::read_link("/proc/1/ns/cgroup"),
    ) else {
        debug!("pid 1's cgroup namespace is not readable: staying in the agent's own");
        return;
    };
    if own == init {
        return;
    }
    let file = match fs::File::open("/proc/1/ns/cgroup") {
        Ok(file) => file,
        Err(err) => {
            warn!(
                "cannot open pid 1's cgroup namespace ({err}): container cgroup paths are relative to the agent's own"
            );
            return;
        }
    };
    // SAFETY: setns with a namespace fd we own and the matching type.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWCGROUP) };
    if rc == 0 {
        info!(from = %own.display(), to = %init.display(), "joined the host's cgroup namespace");
    } else {
        warn!(
            err = %std::io::Error::last_os_error(),
            "cannot join pid 1's cgroup namespace (needs CAP_SYS_ADMIN): container cgroup paths are relative to the agent's own"
        );
    }
}

/// The cgroup2 hierarchy as the host mounts it: from pid 1's mount table, reached through
/// `/proc/1/root` when pid 1 lives in another mount namespace; else from the agent's own.
pub fn cgroup2_root() -> Option<PathBuf> {
    let own_mnt = fs::read_link("/proc/self/ns/mnt").ok();
    let init_mnt = fs::read_link("/proc/1/ns/mnt").ok();
    if own_mnt.is_some()
        && own_mnt != init_mnt
        && let Ok(mountinfo) = fs::read_to_string("/proc/1/mountinfo")
        && let Some(mount) = cgroup2_mount(&mountinfo)
    {
        let through_init =
            PathBuf::from("/proc/1/root").join(mount.strip_prefix("/").unwrap_or(&mount));
        if through_init.is_dir() {
            debug!(root = %through_init.display(), "cgroup2 hierarchy of the host, through pid 1");
            return Some(through_init);
        }
    }
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    cgroup2_mount(&mountinfo)
}

/// A host path as the agent can reach it: the path itself when it exists, else the same path
/// under `/proc/1/root` when pid 1 (the host's init under hostPID) has another mount
/// namespace and the path exists there; None when neither exists.
pub fn host_path(path: &std::path::Path) -> Option<PathBuf> {
    if path.exists() {
        return Some(path.to_path_buf());
    }
    let own_mnt = fs::read_link("/proc/self/ns/mnt").ok()?;
    let init_mnt = fs::read_link("/proc/1/ns/mnt").ok()?;
    if own_mnt == init_mnt {
        return None;
    }
    let through_init = PathBuf::from("/proc/1/root").join(path.strip_prefix("/").unwrap_or(path));
    through_init.exists().then_some(through_init)
}
