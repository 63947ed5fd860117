//! The cgroup2 hierarchy as the agent sees it: where it is mounted, and its directories with
//! their cgroup ids (the inode number of a cgroup2 directory is the id the kernel's
//! `bpf_get_current_cgroup_id()` returns).

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// Directories below the root visited at most per walk; a node with more cgroups than this
/// is walked partially (and says so).
pub const MAX_CGROUP_DIRS: usize = 65536;
/// How deep the walk goes (Kubernetes' systemd layout is 4 deep at the container, plus what
/// a container makes below itself).
pub const MAX_DEPTH: usize = 10;

/// The mount point of the cgroup2 filesystem in a `/proc/self/mountinfo` text: the first one
/// (a pure v2 host mounts it at /sys/fs/cgroup, a hybrid one at /sys/fs/cgroup/unified).
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        let fs_type = after.split_whitespace().next()?;
        if fs_type != "cgroup2" {
            return None;
        }
        // id parent major:minor root mount-point ...
        let mount_point = before.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_octal(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(oct) = bytes.get(i + 1..i + 4)
            && oct.iter().all(|b| (b'0'..=b'7').contains(b))
        {
            out.push((oct[0] - b'0') * 64 + (oct[1] - b'0') * 8 + (oct[2] - b'0'));
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup2 hierarchy of this host.
#[derive(Debug, Clone)]
pub struct CgroupFs {
    pub root: PathBuf,
}

/// One cgroup directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupDir {
    /// The path relative to the hierarchy's root, starting with '/', as `/proc/<pid>/cgroup`
    /// prints it.
    pub path: String,
    pub id: u64,
}

impl CgroupFs {
    /// Finds the cgroup2 mount; None on a cgroup v1-only host.
    pub fn discover() -> Option<Self> {
        super::host_view::cgroup2_root().map(|root| Self { root })
    }

    /// The cgroup id of a path (as `/proc/<pid>/cgroup` prints it).
    pub fn id_of(&self, path: &str) -> Option<u64> {
        fs::metadata(self.dir(path)).ok().map(|m| m.ino())
    }

    /// The directory of a cgroup path.
    pub fn dir(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    /// Turns what a user gave (`/sys/fs/cgroup/unified/x`, or `/x` relative to the root)
    /// into a cgroup path.
    pub fn user_path(&self, given: &str) -> String {
        let given_path = Path::new(given);
        let relative = given_path
            .strip_prefix(&self.root)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|_| given.trim_start_matches('/').to_string());
        format!("/{}", relative.trim_end_matches('/'))
    }

    /// Every cgroup directory (the root included), breadth first, at most MAX_CGROUP_DIRS;
    /// the flag says whether the walk was cut short.
    pub fn walk(&self) -> (Vec<CgroupDir>, bool) {
        self.walk_from("/")
    }

    /// As `walk`, from the cgroup `path` down.
    pub fn walk_from(&self, path: &str) -> (Vec<CgroupDir>, bool) {
        let mut out = Vec::new();
        let Some(id) = self.id_of(path) else {
            return (out, false);
        };
        let start = if path == "/" {
            String::new()
        } else {
            path.trim_end_matches('/').to_string()
        };
        out.push(CgroupDir {
            path: if start.is_empty() {
                "/".into()
            } else {
                start.clone()
            },
            id,
        });
        let mut frontier = vec![(start, 0usize)];
        let mut truncated = false;
        while let Some((rel, depth)) = frontier.pop() {
            if depth >= MAX_DEPTH {
                continue;
            }
            let Ok(entries) = fs::read_dir(self.dir(&rel)) else {
                continue;
            };
            for entry in entries.flatten() {
                // file_type() does not follow links and comes from readdir: no stat for files.
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                if out.len() >= MAX_CGROUP_DIRS {
                    truncated = true;
                    break;
                }
                let Ok(meta) = entry.metadata() else {
                    continue;
                };
                let child = format!("{rel}/{}", entry.file_name().to_string_lossy());
                out.push(CgroupDir {
                    path: child.clone(),
                    id: meta.ino(),
                });
                frontier.push((child, depth + 1));
            }
        }
        (out, truncated)
    }

    /// How long ago a cgroup directory was made, from its modification time (cgroupfs sets it
    /// at creation, at clock-tick precision, and moves it when a child cgroup is made).
    pub fn age(&self, path: &str) -> Option<std::time::Duration> {
        let modified = fs::metadata(self.dir(path)).ok()?.modified().ok()?;
        std::time::SystemTime::now().duration_since(modified).ok()
    }

    /// The processes in a cgroup (not its descendants), in the agent's pid namespace.
    pub fn procs(&self, path: &str) -> Vec<u32> {
        fs::read_to_string(self.dir(path).join("cgroup.procs"))
            .map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }
}

/// Whether `path` is `ancestor` or below it.
pub fn is_within(path: &str, ancestor: &str) -> bool {
    let ancestor = ancestor.trim_end_matches('/');
    ancestor.is_empty()
        || path == ancestor
        || path
            .strip_prefix(ancestor)
            .is_some_and(|rest| rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount() {
        let hybrid = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(cgroup2_mount(hybrid), Some("/sys/fs/cgroup/unified".into()));
        let v2 = "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(cgroup2_mount(v2), Some("/sys/fs/cgroup".into()));
        assert_eq!(
            cgroup2_mount("32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"),
            None
        );
        let odd = "41 31 0:38 / /host\\040root/cg rw - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount(odd), Some("/host root/cg".into()));
        assert_eq!(cgroup2_mount("garbage\n - \n"), None);
    }

    #[test]
    fn user_paths_and_ancestry() {
        let fs = CgroupFs {
            root: "/sys/fs/cgroup/unified".into(),
        };
        assert_eq!(fs.user_path("/sys/fs/cgroup/unified/a/b/"), "/a/b");
        assert_eq!(fs.user_path("/a/b"), "/a/b");
        assert_eq!(fs.user_path("a"), "/a");
        assert!(is_within("/a/b", "/a"));
        assert!(is_within("/a", "/a/"));
        assert!(!is_within("/ab", "/a"));
        assert!(is_within("/x", "/"));
    }

    #[test]
    fn walks_this_host() {
        // Every Linux host this runs on has a cgroup2 mount (pure or hybrid).
        let Some(fs) = CgroupFs::discover() else {
            return;
        };
        let (dirs, _) = fs.walk();
        assert_eq!(dirs[0].path, "/");
        assert!(dirs.iter().all(|d| d.path.starts_with('/') && d.id != 0));
        let own = std::fs::read_to_string("/proc/self/cgroup").expect("own cgroup");
        let own_path = super::super::cgroup_path::unified_path(&own).expect("v2 line");
        assert!(
            dirs.iter().any(|d| d.path == own_path),
            "{own_path} not walked"
        );
    }
}
