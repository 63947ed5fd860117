//! Which OpenSSL libraries get the TLS plaintext hooks (`probes::tls`): every `libssl`
//! mapped by a watched process, found in `/proc/<pid>/maps` and opened through
//! `/proc/<pid>/root` (so a container's own libssl is hooked, not the host's file of the same
//! name). Each file, by (device, inode), is attached once.
//!
//! Python loads `_ssl` (and with it libssl) when `ssl` is first imported, which a plugin or
//! an HTTP client library does after exec: a Python process whose maps do not show libssl
//! yet is looked at again for a while, like the greenlet module (`native_targets`).

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How long after a Python process appears its maps are re-read for libssl.
pub const RESCAN_WINDOW: Duration = Duration::from_secs(60);
/// Processes re-read at once, at most.
pub const MAX_RESCANNED: usize = 4096;

/// (device, inode) of a file.
pub type FileKey = (u64, u64);

/// A libssl to attach the hooks to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsTarget {
    pub file: FileKey,
    /// The file as reachable from the agent (`/proc/<pid>/root/<path in maps>`).
    pub path: PathBuf,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct TlsCounters {
    /// libssl files with hooks.
    pub hooked: u64,
    /// libssl files whose hooks could not be attached (see the log).
    pub failed: u64,
}

pub struct TlsTargets {
    enabled: bool,
    /// Files already decided (hooked or failed).
    files: HashMap<FileKey, bool>,
    /// Python processes without libssl so far, until when to look again.
    rescan: HashMap<u32, Instant>,
    pub counters: TlsCounters,
}

impl TlsTargets {
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            files: HashMap::new(),
            rescan: HashMap::new(),
            counters: TlsCounters::default(),
        }
    }

    /// A watched process appeared or exec'd: its libssl files not hooked yet.
    pub fn note_process(&mut self, tgid: u32, now: Instant) -> Vec<TlsTarget> {
        self.rescan.remove(&tgid);
        if !self.enabled {
            return Vec::new();
        }
        let Ok(maps) = std::fs::read_to_string(format!("/proc/{tgid}/maps")) else {
            return Vec::new();
        };
        let libs = libssl_paths(&maps);
        if libs.is_empty() {
            if maps.contains("python") && self.rescan.len() < MAX_RESCANNED {
                self.rescan.insert(tgid, now + RESCAN_WINDOW);
            }
            return Vec::new();
        }
        self.targets(tgid, &libs)
    }

    fn targets(&mut self, tgid: u32, libs: &[&str]) -> Vec<TlsTarget> {
        let mut out: Vec<TlsTarget> = Vec::new();
        for lib in libs {
            let path = PathBuf::from(format!("/proc/{tgid}/root{lib}"));
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            let file = (meta.dev(), meta.ino());
            if self.files.contains_key(&file) || out.iter().any(|t| t.file == file) {
                continue;
            }
            out.push(TlsTarget { file, path });
        }
        out
    }

    /// A forked child runs its parent's code until it execs.
    pub fn note_fork(&mut self, child: u32, parent: u32) {
        if let Some(until) = self.rescan.get(&parent).copied()
            && self.rescan.len() < MAX_RESCANNED
        {
            self.rescan.insert(child, until);
        }
    }

    pub fn forget_process(&mut self, tgid: u32) {
        self.rescan.remove(&tgid);
    }

    /// Looks again at the Python processes that had no libssl yet.
    pub fn rescan(&mut self, now: Instant) -> Vec<TlsTarget> {
        self.rescan.retain(|_, until| *until > now);
        let tgids: Vec<u32> = self.rescan.keys().copied().collect();
        let mut out: Vec<TlsTarget> = Vec::new();
        for tgid in tgids {
            let Ok(maps) = std::fs::read_to_string(format!("/proc/{tgid}/maps")) else {
                self.rescan.remove(&tgid);
                continue;
            };
            let libs = libssl_paths(&maps);
            if libs.is_empty() {
                continue;
            }
            self.rescan.remove(&tgid);
            for target in self.targets(tgid, &libs) {
                if !out.iter().any(|t| t.file == target.file) {
                    out.push(target);
                }
            }
        }
        out
    }

    /// The outcome of attaching `target`'s hooks.
    pub fn settle(&mut self, target: &TlsTarget, hooked: bool) {
        self.files.insert(target.file, hooked);
        if hooked {
            self.counters.hooked += 1;
        } else {
            self.counters.failed += 1;
        }
    }

    pub fn rescanned(&self) -> usize {
        self.rescan.len()
    }
}

/// The paths of OpenSSL's libssl (`libssl.so.3`, `libssl.so.1.1`, a wheel's bundled
/// `libssl-<hash>.so.3`) in a `/proc/<pid>/maps` text, each once, in order of appearance.
pub fn libssl_paths(maps: &str) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for path in maps
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
    {
        let name = path.rsplit('/').next().unwrap_or(path);
        if path.starts_with('/')
            && name.starts_with("libssl")
            && name.contains(".so")
            && !out.contains(&path)
        {
            out.push(path);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_libssl_in_maps() {
        let maps = "\
7f1c2a000000-7f1c2a010000 r--p 00000000 08:01 1234 /usr/lib/x86_64-linux-gnu/libssl.so.3
7f1c2a010000-7f1c2a080000 r-xp 00010000 08:01 1234 /usr/lib/x86_64-linux-gnu/libssl.so.3
7f1c2b000000-7f1c2b00a000 r-xp 0000a000 08:01 5678 /usr/lib/x86_64-linux-gnu/libcrypto.so.3
7f1c2c000000-7f1c2c00a000 r-xp 0000a000 08:01 9999 /venv/lib/python3.11/site-packages/x.libs/libssl-8f1e7d2a.so.1.1
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
";
        assert_eq!(
            libssl_paths(maps),
            vec![
                "/usr/lib/x86_64-linux-gnu/libssl.so.3",
                "/venv/lib/python3.11/site-packages/x.libs/libssl-8f1e7d2a.so.1.1"
            ]
        );
        assert!(libssl_paths("7f-8f r-xp 0 08:01 1 /usr/lib/libc.so.6\n").is_empty());
    }
}
