//! Containers: which container a process runs in (from its cgroup), what the container runtime
//! and Kubernetes call it, and the cgroup ids the kernel lets through when the user selects
//! containers. All optional: without a runtime socket or a cluster, containers are known by
//! id only; without container flags nothing here filters.

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

use std::time::Duration;

use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use tracing::warn;

pub use filter::ContainerFilter;
pub use table::ContainerTable;
pub use watcher::{Update, Watcher};

/// How often the watcher looks for new containers (a container started after the agent is
/// traced from at most this long after its cgroup appears).
pub const REFRESH_EVERY: Duration = Duration::from_secs(1);

/// Runs the watcher on its own thread (its API calls block); updates arrive on the channel.
pub fn spawn(mut watcher: Watcher) -> anyhow::Result<UnboundedReceiver<Update>> {
    let (tx, rx) = unbounded_channel();
    std::thread::Builder::new()
        .name("containers".into())
        .spawn(move || {
            let mut warned_truncated = false;
            loop {
                std::thread::sleep(REFRESH_EVERY);
                let update = watcher.refresh();
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
