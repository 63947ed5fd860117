//! Word of new cgroups as they are made: inotify on the cgroup2 directories (cgroupfs reports
//! a mkdir there as IN_CREATE of a directory), so the watcher looks at a container's cgroup
//! right after the runtime creates it instead of at its next periodic walk. The walk stays
//! the source of truth; this only says when to walk.
//!
//! Watched: every directory of a walk that is not inside a container. Container runtimes and
//! Kubernetes make a container's cgroup in such a directory (`/docker`, `/system.slice`, a
//! pod's slice, ...); a container's own sub-cgroups are left to the periodic walk, which keeps
//! the number of watches to the host's structure, not to what containers do inside.

use std::{
    collections::{HashMap, HashSet},
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    time::Duration,
};

use tracing::{debug, warn};

use super::{
    cgroup_fs::{CgroupDir, CgroupFs},
    cgroup_path::container_of_path,
};

/// Watches at most this many directories; on a host with more, the directories beyond it are
/// covered by the periodic walk only (and the agent says so once).
pub const MAX_WATCHES: usize = 8192;

/// The part of a `struct inotify_event` before its name.
const EVENT_HEADER: usize = 16;

/// What woke the wait.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Wake {
    /// Cgroup paths created since the last wait (directories only).
    pub created: Vec<String>,
    /// The kernel's event queue overflowed: anything may have changed.
    pub overflow: bool,
}

impl Wake {
    pub fn is_empty(&self) -> bool {
        self.created.is_empty() && !self.overflow
    }
}

/// One record of an inotify read.
#[derive(Debug, PartialEq, Eq)]
pub struct RawEvent<'a> {
    pub wd: i32,
    pub mask: u32,
    pub name: &'a [u8],
}

/// The records of one inotify read (`struct inotify_event` with its NUL-padded name); a cut
/// record at the end is dropped (the kernel never returns one, but the input is not trusted).
pub fn parse_events(buf: &[u8]) -> Vec<RawEvent<'_>> {
    let mut out = Vec::new();
    let mut rest = buf;
    while rest.len() >= EVENT_HEADER {
        let word = |at: usize| [rest[at], rest[at + 1], rest[at + 2], rest[at + 3]];
        let wd = i32::from_ne_bytes(word(0));
        let mask = u32::from_ne_bytes(word(4));
        let len = u32::from_ne_bytes(word(12)) as usize;
        let Some(name) = rest.get(EVENT_HEADER..EVENT_HEADER + len) else {
            break;
        };
        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        out.push(RawEvent {
            wd,
            mask,
            name: &name[..end],
        });
        rest = &rest[EVENT_HEADER + len..];
    }
    out
}

/// An inotify instance over the cgroup2 hierarchy's directories.
pub struct CgroupEvents {
    fd: OwnedFd,
    fs: CgroupFs,
    by_wd: HashMap<i32, String>,
    watched: HashSet<String>,
    warned_full: bool,
}

impl CgroupEvents {
    pub fn new(fs: CgroupFs) -> io::Result<Self> {
        // SAFETY: inotify_init1 takes flags only; the fd it returns is ours.
        let raw = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Self {
            fd,
            fs,
            by_wd: HashMap::new(),
            watched: HashSet::new(),
            warned_full: false,
        })
    }

    /// How many directories are watched.
    pub fn watching(&self) -> usize {
        self.watched.len()
    }

    /// Watches the directories of a walk that are not watched yet and not inside a
    /// container; returns how many watches were added.
    pub fn watch(&mut self, dirs: &[CgroupDir]) -> usize {
        let mut added = 0;
        for dir in dirs {
            if self.watched.contains(&dir.path) || container_of_path(&dir.path).is_some() {
                continue;
            }
            if self.watched.len() >= MAX_WATCHES {
                self.warn_full(None);
                break;
            }
            match self.add_watch(&dir.path) {
                Ok(wd) => {
                    // The same directory under a new name (rename) gives the same wd back.
                    if let Some(old) = self.by_wd.insert(wd, dir.path.clone()) {
                        self.watched.remove(&old);
                    }
                    self.watched.insert(dir.path.clone());
                    added += 1;
                }
                // Gone between the walk and now.
                Err(err) if err.raw_os_error() == Some(libc::ENOENT) => {}
                Err(err) if err.raw_os_error() == Some(libc::ENOSPC) => {
                    self.warn_full(Some(err));
                    break;
                }
                Err(err) => debug!(cgroup = %dir.path, "no inotify watch: {err}"),
            }
        }
        added
    }

    fn warn_full(&mut self, err: Option<io::Error>) {
        if !self.warned_full {
            warn!(
                watches = self.watched.len(),
                limit = MAX_WATCHES,
                err = err.map(|e| e.to_string()).unwrap_or_default(),
                "cannot watch every cgroup directory (fs.inotify.max_user_watches?): containers made elsewhere are found by the periodic walk only"
            );
            self.warned_full = true;
        }
    }

    fn add_watch(&self, path: &str) -> io::Result<i32> {
        let dir = self.fs.dir(path);
        let c_path = CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // IN_ONLYDIR: a cgroup turned into something else is not ours to watch.
        let mask = libc::IN_CREATE | libc::IN_ONLYDIR;
        // SAFETY: a valid NUL-terminated path and our inotify fd.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c_path.as_ptr(), mask) };
        if wd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(wd)
    }

    /// Waits up to `timeout` for directories to be created below a watched one.
    pub fn wait(&mut self, timeout: Duration) -> io::Result<Wake> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                return Ok(Wake::default());
            }
            return Err(err);
        }
        let mut wake = Wake::default();
        // Room for many records with names of cgroup length (a burst of containers).
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: reading into a buffer we own, at most its length.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast::<libc::c_void>(),
                    buf.len(),
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EAGAIN) => break,
                    Some(libc::EINTR) => continue,
                    _ => return Err(err),
                }
            }
            if n == 0 {
                break;
            }
            let len = usize::try_from(n).unwrap_or(0).min(buf.len());
            for event in parse_events(&buf[..len]) {
                self.note(&event, &mut wake);
            }
        }
        Ok(wake)
    }

    fn note(&mut self, event: &RawEvent<'_>, wake: &mut Wake) {
        if event.mask & libc::IN_Q_OVERFLOW != 0 {
            wake.overflow = true;
            return;
        }
        if event.mask & libc::IN_IGNORED != 0 {
            // The directory is gone (or unwatched): its wd may be handed out again.
            if let Some(path) = self.by_wd.remove(&event.wd) {
                self.watched.remove(&path);
            }
            return;
        }
        if event.mask & libc::IN_CREATE == 0 || event.mask & libc::IN_ISDIR == 0 {
            return;
        }
        let Some(parent) = self.by_wd.get(&event.wd) else {
            return;
        };
        let name = String::from_utf8_lossy(event.name);
        let path = if parent == "/" {
            format!("/{name}")
        } else {
            format!("{parent}/{name}")
        };
        wake.created.push(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(wd: i32, mask: u32, name: &[u8], padded: usize) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&wd.to_ne_bytes());
        out.extend_from_slice(&mask.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out.extend_from_slice(&(padded as u32).to_ne_bytes());
        let mut n = name.to_vec();
        n.resize(padded, 0);
        out.extend_from_slice(&n);
        out
    }

    #[test]
    fn parses_records_and_drops_a_cut_one() {
        let mut buf = record(1, libc::IN_CREATE | libc::IN_ISDIR, b"docker", 16);
        buf.extend(record(2, libc::IN_IGNORED, b"", 0));
        buf.extend(record(3, libc::IN_CREATE, b"cut", 16)[..20].to_vec());
        let events = parse_events(&buf);
        assert_eq!(
            events,
            vec![
                RawEvent {
                    wd: 1,
                    mask: libc::IN_CREATE | libc::IN_ISDIR,
                    name: b"docker"
                },
                RawEvent {
                    wd: 2,
                    mask: libc::IN_IGNORED,
                    name: b""
                },
            ]
        );
        assert!(parse_events(&[0u8; 7]).is_empty());
    }

    #[test]
    fn reports_directories_made_below_watched_ones_but_not_inside_containers() {
        let root = std::env::temp_dir().join(format!("difytrace-events-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let container = "docker/aa0000000000000000000000000000000000000000000000000000000000000a";
        std::fs::create_dir_all(root.join(container)).expect("test tree");
        let fs = CgroupFs { root: root.clone() };
        let mut events = CgroupEvents::new(fs.clone()).expect("inotify");
        let (dirs, _) = fs.walk();
        // "/" and "/docker"; the container's own directory is left to the walk.
        assert_eq!(events.watch(&dirs), 2);
        assert_eq!(events.watch(&dirs), 0, "nothing new to watch");
        std::fs::create_dir(root.join("docker/new")).unwrap();
        std::fs::create_dir(root.join(format!("{container}/inner"))).unwrap();
        std::fs::write(root.join("docker/a-file"), b"").unwrap();
        let wake = events.wait(Duration::from_secs(1)).expect("wait");
        assert_eq!(wake.created, vec!["/docker/new".to_string()]);
        assert!(!wake.overflow);
        let (dirs, _) = fs.walk();
        assert_eq!(events.watch(&dirs), 1, "the new directory is watched");
        assert_eq!(events.watching(), 3);
        // Removing a watched directory releases its watch.
        std::fs::remove_dir(root.join("docker/new")).unwrap();
        let idle = events.wait(Duration::from_millis(100)).expect("wait");
        assert!(idle.is_empty());
        assert_eq!(events.watching(), 2);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
