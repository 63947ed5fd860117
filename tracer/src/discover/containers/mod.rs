//! Containers: which container a process runs in (from its cgroup), what the container runtime
//! and Kubernetes call it, and the cgroup ids the kernel lets through when the user selects
//! containers. All optional: without a runtime socket or a cluster, containers are known by
//! id only; without container flags nothing here filters.

pub mod cgroup_events;
pub mod cgroup_fs;
pub mod cgroup_path;
pub mod cri;
pub mod docker_api;
pub mod filter;
pub mod host_view;
pub mod http;
pub mod kube_client;
pub mod kubelet;
pub mod kubernetes;
pub mod table;
pub mod watcher;

use std::time::{Duration, Instant};

use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use tracing::{debug, warn};

pub use filter::ContainerFilter;
pub use table::ContainerTable;
pub use watcher::{Update, Watcher};

/// How often the watcher walks the cgroup tree when nothing woke it. New cgroup directories
/// wake it at once (inotify, cgroup_events.rs); this walk is the fallback and catches what
/// inotify cannot see (sub-cgroups inside containers, a host beyond MAX_WATCHES).
pub const REFRESH_EVERY: Duration = Duration::from_secs(1);

/// Runs the watcher on its own thread (its API calls block); updates arrive on the channel.
pub fn spawn(mut watcher: Watcher) -> anyhow::Result<UnboundedReceiver<Update>> {
    let (tx, rx) = unbounded_channel();
    watcher.watch_cgroup_events();
    std::thread::Builder::new()
        .name("containers".into())
        .spawn(move || {
            let mut warned_truncated = false;
            loop {
                let wake = watcher.wait();
                let woke = Instant::now();
                let update = watcher.refresh();
                if !wake.created.is_empty() {
                    debug!(
                        created = ?wake.created,
                        overflow = wake.overflow,
                        selected = update.added.len(),
                        refresh_us = woke.elapsed().as_micros() as u64,
                        "new cgroups"
                    );
                }
                if update.truncated && !warned_truncated {
                    warn!(
                        max = cgroup_fs::MAX_CGROUP_DIRS,
                        "more cgroups than the watcher walks; some containers may be missed"
                    );
                    warned_truncated = true;
                }
                if !update.is_empty() && tx.send(update).is_err() {
                    return;
                }
            }
        })
        .map_err(|err| anyhow::anyhow!("starting the container watcher thread: {err}"))?;
    Ok(rx)
}
