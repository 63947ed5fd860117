//! Which watched processes run Go binaries that have uprobes. Each executable file (by
//! device and inode, so a binary shared by many processes, or reached through different
//! paths, is read once) is inspected off the event loop by a worker thread: reading and
//! decoding a large binary takes tens of milliseconds the ring buffer cannot wait.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tracing::{debug, warn};

use super::gobin::{self, GoBinary};

/// Executables larger than this are not inspected (no Go service is that big; a huge file
/// would only cost the agent memory).
pub const MAX_BINARY_BYTES: u64 = 1 << 30;

/// (device, inode) of an executable.
pub type FileKey = (u64, u64);

/// A binary inspected by the worker.
#[derive(Debug)]
pub struct Inspected {
    pub file: FileKey,
    /// How it was read (`/proc/<pid>/exe`), also the uprobe target.
    pub path: PathBuf,
    pub result: Result<Option<GoBinary>, String>,
}

#[derive(Debug)]
enum FileState {
    /// Being inspected; these processes wait for the verdict.
    Inspecting(Vec<u32>),
    /// Has uprobes: its processes use goroutine contexts.
    Hooked,
    /// Not Go, unsupported, or the hooks failed: its processes are linked by thread.
    Plain,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct GoBinaryCounters {
    /// Go binaries with uprobes.
    pub hooked: u64,
    /// Go binaries left without uprobes (unsupported version, no symbols, attach failed).
    pub unhooked: u64,
}

/// The registry of executables and of the processes that run hooked Go binaries.
pub struct GoBinaries {
    files: HashMap<FileKey, FileState>,
    hooked_tgids: HashSet<u32>,
    jobs: std::sync::mpsc::Sender<(FileKey, PathBuf)>,
    pub counters: GoBinaryCounters,
}

impl GoBinaries {
    /// The registry and the receiver of the worker's verdicts (for the event loop).
    pub fn start() -> anyhow::Result<(Self, UnboundedReceiver<Inspected>)> {
        let (jobs, job_rx) = std::sync::mpsc::channel::<(FileKey, PathBuf)>();
        let (done_tx, done_rx) = unbounded_channel();
        std::thread::Builder::new()
            .name("go-inspect".into())
            .spawn(move || inspect_worker(job_rx, done_tx))
            .map_err(|err| anyhow::anyhow!("starting the Go binary inspector thread: {err}"))?;
        Ok((
            Self {
                files: HashMap::new(),
                hooked_tgids: HashSet::new(),
                jobs,
                counters: GoBinaryCounters::default(),
            },
            done_rx,
        ))
    }

    /// Whether `tgid` runs a Go binary with uprobes.
    pub fn is_hooked(&self, tgid: u32) -> bool {
        self.hooked_tgids.contains(&tgid)
    }

    /// A watched process appeared or exec'd: look at its executable.
    pub fn note_process(&mut self, tgid: u32) {
        self.hooked_tgids.remove(&tgid);
        let path = PathBuf::from(format!("/proc/{tgid}/exe"));
        let Ok(meta) = std::fs::metadata(&path) else {
            return;
        };
        let file = (meta.dev(), meta.ino());
        match self.files.get_mut(&file) {
            Some(FileState::Hooked) => {
                self.hooked_tgids.insert(tgid);
            }
            Some(FileState::Inspecting(waiting)) => waiting.push(tgid),
            Some(FileState::Plain) => {}
            None => {
                if meta.len() > MAX_BINARY_BYTES {
                    self.files.insert(file, FileState::Plain);
                    return;
                }
                self.files.insert(file, FileState::Inspecting(vec![tgid]));
                if self.jobs.send((file, path)).is_err() {
                    warn!("the Go binary inspector thread is gone");
                    self.files.insert(file, FileState::Plain);
                }
            }
        }
    }

    /// A forked child runs its parent's binary until it execs.
    pub fn note_fork(&mut self, child: u32, parent: u32) {
        if self.hooked_tgids.contains(&parent) {
            self.hooked_tgids.insert(child);
        }
    }

    pub fn forget_process(&mut self, tgid: u32) {
        self.hooked_tgids.remove(&tgid);
    }

    /// The verdict on a file: `hooked` says whether uprobes were attached. Returns the
    /// processes that now use goroutine contexts.
    pub fn settle(&mut self, file: FileKey, hooked: bool) -> Vec<u32> {
        let waiting = match self.files.insert(
            file,
            if hooked {
                FileState::Hooked
            } else {
                FileState::Plain
            },
        ) {
            Some(FileState::Inspecting(waiting)) => waiting,
            _ => Vec::new(),
        };
        if hooked {
            self.counters.hooked += 1;
            self.hooked_tgids.extend(waiting.iter().copied());
            waiting
        } else {
            Vec::new()
        }
    }

    /// A Go binary that gets no uprobes (unsupported, unreadable, attach failed): counted,
    /// and its processes stay linked by thread.
    pub fn unhooked(&mut self, file: FileKey) {
        self.counters.unhooked += 1;
        self.settle(file, false);
    }

    /// Processes waiting for the verdict on `file` (one of them gives the uprobe target).
    pub fn waiting(&self, file: FileKey) -> &[u32] {
        match self.files.get(&file) {
            Some(FileState::Inspecting(waiting)) => waiting,
            _ => &[],
        }
    }
}

fn inspect_worker(
    jobs: std::sync::mpsc::Receiver<(FileKey, PathBuf)>,
    done: UnboundedSender<Inspected>,
) {
    let wanted = crate::probes::go::wanted_functions();
    while let Ok((file, path)) = jobs.recv() {
        let result = gobin::inspect(&path, &wanted).map_err(|err| err.to_string());
        debug!(path = %path.display(), ok = result.is_ok(), "executable inspected");
        if done.send(Inspected { file, path, result }).is_err() {
            return;
        }
    }
}
