//! Which files of the watched processes get the native hooks (`probes::native`): greenlet's
//! extension module, found in a process's memory maps, and nginx executables.
//!
//! gevent is imported after exec (by gunicorn's master before it forks its workers, by a
//! plugin at start-up), so a Python process whose maps do not show greenlet yet is looked at
//! again for a while.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::probes::native::NativeKind;

/// How long after a Python process appears its maps are re-read for greenlet.
pub const RESCAN_WINDOW: Duration = Duration::from_secs(60);
/// Processes re-read at once, at most (the oldest leave first).
pub const MAX_RESCANNED: usize = 4096;

/// (device, inode) of a file.
pub type FileKey = (u64, u64);

/// A file to attach hooks to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NativeTarget {
    pub kind: NativeKind,
    pub file: FileKey,
    /// The file as reachable from the agent (through `/proc/<pid>/root` or `/exe`).
    pub path: PathBuf,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct NativeCounters {
    pub greenlet_hooked: u64,
    pub nginx_hooked: u64,
    /// Files whose hooks could not be attached (see the log for why).
    pub failed: u64,
}

pub struct NativeTargets {
    greenlets: bool,
    nginx: bool,
    /// Files already decided (hooked or failed), so each is attached once.
    files: HashMap<FileKey, bool>,
    nginx_tgids: HashSet<u32>,
    /// Python processes without greenlet so far, until when to look again.
    rescan: HashMap<u32, Instant>,
    pub counters: NativeCounters,
}

impl NativeTargets {
    /// Looks for greenlet modules and nginx executables as far as each is turned on.
    pub fn new(greenlets: bool, nginx: bool) -> Self {
        Self {
            greenlets,
            nginx,
            files: HashMap::new(),
            nginx_tgids: HashSet::new(),
            rescan: HashMap::new(),
            counters: NativeCounters::default(),
        }
    }

    /// Whether `tgid` runs an nginx with hooks.
    pub fn is_nginx(&self, tgid: u32) -> bool {
        self.nginx_tgids.contains(&tgid)
    }

    /// A watched process appeared or exec'd: the files of it that want hooks, not yet seen.
    pub fn note_process(&mut self, tgid: u32, now: Instant) -> Vec<NativeTarget> {
        self.nginx_tgids.remove(&tgid);
        self.rescan.remove(&tgid);
        let mut out = Vec::new();
        let exe = PathBuf::from(format!("/proc/{tgid}/exe"));
        if self.nginx
            && is_nginx_exe(&exe)
            && let Ok(meta) = std::fs::metadata(&exe)
        {
            let file = (meta.dev(), meta.ino());
            match self.files.get(&file) {
                Some(true) => {
                    self.nginx_tgids.insert(tgid);
                }
                Some(false) => {}
                None => {
                    // Marked now: the caller attaches right away, and `settle` unmarks the
                    // process when that fails.
                    self.nginx_tgids.insert(tgid);
                    out.push(NativeTarget {
                        kind: NativeKind::Nginx,
                        file,
                        path: exe,
                    });
                }
            }
            return out;
        }
        if !self.greenlets {
            return out;
        }
        let Ok(maps) = std::fs::read_to_string(format!("/proc/{tgid}/maps")) else {
            return out;
        };
        match greenlet_module(&maps) {
            Some(path) => out.extend(self.greenlet_target(tgid, path)),
            None if maps.contains("python") && self.rescan.len() < MAX_RESCANNED => {
                self.rescan.insert(tgid, now + RESCAN_WINDOW);
            }
            None => {}
        }
        out
    }

    fn greenlet_target(&mut self, tgid: u32, path: &str) -> Option<NativeTarget> {
        let path = PathBuf::from(format!("/proc/{tgid}/root{path}"));
        let meta = std::fs::metadata(&path).ok()?;
        let file = (meta.dev(), meta.ino());
        if self.files.contains_key(&file) {
            return None;
        }
        Some(NativeTarget {
            kind: NativeKind::Greenlet,
            file,
            path,
        })
    }

    /// A forked child runs its parent's code until it execs.
    pub fn note_fork(&mut self, child: u32, parent: u32) {
        if self.nginx_tgids.contains(&parent) {
            self.nginx_tgids.insert(child);
        }
        if let Some(until) = self.rescan.get(&parent).copied()
            && self.rescan.len() < MAX_RESCANNED
        {
            self.rescan.insert(child, until);
        }
    }

    pub fn forget_process(&mut self, tgid: u32) {
        self.nginx_tgids.remove(&tgid);
        self.rescan.remove(&tgid);
    }

    /// Looks again at the Python processes that had no greenlet yet.
    pub fn rescan(&mut self, now: Instant) -> Vec<NativeTarget> {
        self.rescan.retain(|_, until| *until > now);
        let tgids: Vec<u32> = self.rescan.keys().copied().collect();
        let mut out = Vec::new();
        for tgid in tgids {
            let Ok(maps) = std::fs::read_to_string(format!("/proc/{tgid}/maps")) else {
                self.rescan.remove(&tgid);
                continue;
            };
            if let Some(path) = greenlet_module(&maps) {
                self.rescan.remove(&tgid);
                if let Some(target) = self.greenlet_target(tgid, path)
                    && !out.iter().any(|t: &NativeTarget| t.file == target.file)
                {
                    out.push(target);
                }
            }
        }
        out
    }

    /// The outcome of attaching `target`'s hooks.
    pub fn settle(&mut self, target: &NativeTarget, hooked: bool, tgid: u32) {
        self.files.insert(target.file, hooked);
        match (target.kind, hooked) {
            (NativeKind::Greenlet, true) => self.counters.greenlet_hooked += 1,
            (NativeKind::Nginx, true) => self.counters.nginx_hooked += 1,
            (NativeKind::Nginx, false) => {
                self.nginx_tgids.remove(&tgid);
                self.counters.failed += 1;
            }
            (NativeKind::Greenlet, false) => self.counters.failed += 1,
        }
    }

    pub fn rescanned(&self) -> usize {
        self.rescan.len()
    }
}

/// Whether the executable is an nginx (the name is what every build keeps; the hooks' symbols
/// decide the rest when they are attached).
fn is_nginx_exe(exe: &Path) -> bool {
    std::fs::read_link(exe)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .is_some_and(|name| name == "nginx" || name.starts_with("nginx-") || name == "openresty")
}

/// The path of greenlet's extension module in a `/proc/<pid>/maps` text, if mapped.
pub fn greenlet_module(maps: &str) -> Option<&str> {
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| {
            let name = path.rsplit('/').next().unwrap_or(path);
            path.starts_with('/') && name.starts_with("_greenlet") && name.ends_with(".so")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_greenlet_module_in_maps() {
        let maps = "\
7f1c2a000000-7f1c2a010000 r--p 00000000 08:01 1234 /usr/lib/libpython3.11.so.1.0
7f1c2b000000-7f1c2b00a000 r-xp 0000a000 08:01 5678 /venv/lib/python3.11/site-packages/greenlet/_greenlet.cpython-311-x86_64-linux-gnu.so
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
";
        assert_eq!(
            greenlet_module(maps),
            Some(
                "/venv/lib/python3.11/site-packages/greenlet/_greenlet.cpython-311-x86_64-linux-gnu.so"
            )
        );
        assert_eq!(
            greenlet_module("7f-8f r-xp 0 08:01 1 /usr/lib/libc.so.6\n"),
            None
        );
        // A deleted file (upgraded under a running process) still names the module.
        assert!(greenlet_module("7f-8f r-xp 0 08:01 1 /x/_greenlet.so (deleted)\n").is_some());
    }
}
