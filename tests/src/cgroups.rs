//! cgroup2 directories a test makes for its own processes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result};

/// The cgroup2 mount point (pure v2: /sys/fs/cgroup; hybrid: /sys/fs/cgroup/unified).
pub fn cgroup2_root() -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        if after.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        before.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// A cgroup of the test's own: its processes killed and the directory removed on drop.
pub struct OwnCgroup {
    pub dir: PathBuf,
}

impl OwnCgroup {
    /// Makes `parent/name`.
    pub fn create(parent: &Path, name: &str) -> Result<OwnCgroup> {
        let dir = parent.join(name);
        std::fs::create_dir(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
        Ok(OwnCgroup { dir })
    }

    /// The pids in it now.
    pub fn procs(&self) -> Vec<u32> {
        std::fs::read_to_string(self.dir.join("cgroup.procs"))
            .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }
}

impl Drop for OwnCgroup {
    fn drop(&mut self) {
        for pid in self.procs() {
            // SAFETY: plain kill(2) of processes the test put there.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("could not remove cgroup {}", self.dir.display());
    }
}
