//! The periodic look at the host's containers, on its own thread (API calls block): which
//! cgroups exist, which containers they are, what the runtime and Kubernetes call them, and
//! which cgroup ids the kernel's filter should let through.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use tracing::{debug, info, warn};

use crate::span::model::ContainerIdentity;

use super::{
    REFRESH_EVERY,
    cgroup_events::{CgroupEvents, Wake},
    cgroup_fs::{CgroupDir, CgroupFs},
    cgroup_path::{ContainerRef, container_of_path},
    cri::{CriApi, CriContainer},
    docker_api::{DockerApi, DockerContainer, split_image},
    filter::ContainerFilter,
    kube_client::KubeSource,
    kubernetes::PodContainer,
};

/// How many refreshes a container may stay unknown to the runtime API before the agent stops
/// asking (a container that is being created is listed a moment after its cgroup exists).
const LOOKUP_TRIES: u8 = 18;
/// Retries of a container the runtime API did not list yet: LOOKUP_QUICK_TRIES every
/// LOOKUP_RETRY_QUICK, then twice as long each time up to REFRESH_EVERY (about 3.5 s over
/// LOOKUP_TRIES). A `--container <name>` selection needs the listing, and Docker lists a
/// started container only once runc has started it, 20-50 ms after runc made its cgroup
/// (measured with Debian's docker.io 20.10: the look on the inotify wake-up always misses it).
const LOOKUP_RETRY_QUICK: Duration = Duration::from_millis(20);
const LOOKUP_QUICK_TRIES: u8 = 10;
/// The pod list is read again at least this often, and at most this often when unknown
/// containers appear.
const PODS_EVERY: Duration = Duration::from_secs(30);
const PODS_AT_MOST_EVERY: Duration = Duration::from_secs(2);

/// What changed since the last refresh.
#[derive(Debug, Default)]
pub struct Update {
    /// Containers seen for the first time or whose names changed.
    pub identities: Vec<Arc<ContainerIdentity>>,
    /// Cgroups the kernel filter must now let through.
    pub added: Vec<CgroupDir>,
    /// Cgroup ids to take out of the kernel filter (the cgroup is gone or no longer
    /// selected).
    pub removed: Vec<u64>,
    /// Containers whose cgroups are gone.
    pub gone: Vec<String>,
    /// The cgroup walk hit MAX_CGROUP_DIRS.
    pub truncated: bool,
}

impl Update {
    pub fn is_empty(&self) -> bool {
        self.identities.is_empty()
            && self.added.is_empty()
            && self.removed.is_empty()
            && self.gone.is_empty()
    }
}

struct Known {
    identity: Arc<ContainerIdentity>,
    labels: BTreeMap<String, String>,
    /// Runtime API lists that did not have it yet.
    misses: u8,
}

pub struct Watcher {
    fs: CgroupFs,
    filter: ContainerFilter,
    docker: Option<DockerApi>,
    kube: Option<KubeSource>,
    pods: HashMap<String, PodContainer>,
    pods_read: Option<Instant>,
    known: HashMap<String, Known>,
    selected: HashMap<u64, String>,
    docker_failing: bool,
    kube_failing: bool,
    /// CRI sockets (containerd, cri-o), asked after the Docker API.
    cri: Vec<CriApi>,
    /// The CRI sockets whose last call failed (logged once until they answer again).
    cri_failing: Vec<bool>,
    /// The CRI sockets that answered at least once (the first answer is logged).
    cri_answered: Vec<bool>,
    /// Word of new cgroups between walks (None: the periodic walk alone).
    events: Option<CgroupEvents>,
    /// Watches the last walk added (their directories' children may predate the watch).
    new_watches: usize,
    /// When to ask the runtime API again for containers it did not list yet.
    retry_in: Option<Duration>,
}

impl Watcher {
    pub fn new(
        fs: CgroupFs,
        filter: ContainerFilter,
        docker: Option<DockerApi>,
        kube: Option<KubeSource>,
    ) -> Self {
        Self {
            fs,
            filter,
            docker,
            kube,
            pods: HashMap::new(),
            pods_read: None,
            known: HashMap::new(),
            selected: HashMap::new(),
            docker_failing: false,
            kube_failing: false,
            cri: Vec::new(),
            cri_failing: Vec::new(),
            cri_answered: Vec::new(),
            events: None,
            new_watches: 0,
            retry_in: None,
        }
    }

    /// Wakes on new cgroup directories (inotify) instead of waiting for the next walk; without
    /// inotify the walk alone finds them.
    pub fn watch_cgroup_events(&mut self) {
        match CgroupEvents::new(self.fs.clone()) {
            Ok(mut events) => {
                // Watched before the thread's first wait, which then walks at once: a cgroup
                // made since the agent's first walk is not left for REFRESH_EVERY.
                let (dirs, _) = self.fs.walk();
                self.new_watches = events.watch(&dirs);
                self.events = Some(events);
            }
            Err(err) => warn!(
                "no inotify on the cgroup tree ({err}): new containers are found by the walk every {REFRESH_EVERY:?}"
            ),
        }
    }

    /// Waits until the next refresh is due: a cgroup directory was made, a container the
    /// runtime did not list yet is due for another look, or REFRESH_EVERY passed.
    pub fn wait(&mut self) -> Wake {
        let mut timeout = self.retry_in.unwrap_or(REFRESH_EVERY).min(REFRESH_EVERY);
        if self.new_watches > 0 {
            // A directory watched only now may have had children made before its watch.
            timeout = Duration::ZERO;
        }
        let Some(events) = self.events.as_mut() else {
            std::thread::sleep(timeout);
            return Wake::default();
        };
        match events.wait(timeout) {
            Ok(wake) => wake,
            Err(err) => {
                warn!(
                    "reading cgroup events failed ({err}): new containers are found by the walk every {REFRESH_EVERY:?}"
                );
                self.events = None;
                std::thread::sleep(timeout);
                Wake::default()
            }
        }
    }

    /// Also asks these CRI sockets for names, images and pods.
    pub fn with_cri(mut self, cri: Vec<CriApi>) -> Self {
        self.cri_failing = vec![false; cri.len()];
        self.cri_answered = vec![false; cri.len()];
        self.cri = cri;
        self
    }

    /// Whether refreshing can learn anything (a filter to keep current, or names to ask for).
    pub fn has_work(&self) -> bool {
        self.filter.is_active()
            || self.docker.is_some()
            || self.kube.is_some()
            || !self.cri.is_empty()
    }

    /// One look at the host.
    pub fn refresh(&mut self) -> Update {
        let mut update = Update::default();
        let names_to_learn = self.kube.is_some()
            || self.docker.as_ref().is_some_and(DockerApi::present)
            || self.cri.iter().any(CriApi::present);
        if !self.filter.is_active() && !names_to_learn {
            // Nothing to enforce and nobody to ask: ids come from /proc/<pid>/cgroup alone.
            // The fresh watches' children are of no interest either: without this the next
            // wait would not block (a spinning thread, a whole core).
            self.new_watches = 0;
            return update;
        }
        let (dirs, truncated) = self.fs.walk();
        update.truncated = truncated;
        if let Some(events) = self.events.as_mut() {
            self.new_watches = events.watch(&dirs);
            if self.new_watches > 0 {
                debug!(
                    added = self.new_watches,
                    watching = events.watching(),
                    "watching cgroup directories for new containers"
                );
            }
        }
        let mut containers: HashMap<String, (ContainerRef, Vec<&CgroupDir>)> = HashMap::new();
        let mut plain: Vec<&CgroupDir> = Vec::new();
        for dir in &dirs {
            match container_of_path(&dir.path) {
                Some(c) => containers
                    .entry(c.id.clone())
                    .or_insert_with(|| (c, Vec::new()))
                    .1
                    .push(dir),
                None => plain.push(dir),
            }
        }
        self.learn_names(&containers, &mut update);
        self.retry_in = self.lookup_retry();
        self.known.retain(|id, _| {
            let alive = containers.contains_key(id);
            if !alive {
                update.gone.push(id.clone());
            }
            alive
        });
        if self.filter.is_active() {
            let mut now: HashMap<u64, &CgroupDir> = HashMap::new();
            for (id, (_, dirs)) in &containers {
                if let Some(known) = self.known.get(id)
                    && self
                        .filter
                        .matches_container(&known.identity, &known.labels)
                {
                    now.extend(dirs.iter().map(|d| (d.id, *d)));
                }
            }
            for dir in plain {
                if self.filter.matches_cgroup(&dir.path) {
                    now.insert(dir.id, dir);
                }
            }
            let gone: Vec<u64> = self
                .selected
                .keys()
                .filter(|id| !now.contains_key(id))
                .copied()
                .collect();
            for id in gone {
                if let Some(path) = self.selected.remove(&id) {
                    debug!(cgroup = %path, "cgroup left the selection");
                }
                update.removed.push(id);
            }
            for (id, dir) in now {
                if self.selected.insert(id, dir.path.clone()).is_none() {
                    update.added.push((*dir).clone());
                }
            }
        }
        update
    }

    /// Identities for new containers (and retries for the ones the APIs did not know yet).
    fn learn_names(
        &mut self,
        containers: &HashMap<String, (ContainerRef, Vec<&CgroupDir>)>,
        update: &mut Update,
    ) {
        let unknown: Vec<&String> = containers
            .keys()
            .filter(|id| {
                self.known
                    .get(*id)
                    .is_none_or(|k| k.misses > 0 && k.misses < LOOKUP_TRIES)
            })
            .collect();
        if unknown.is_empty() && !self.pods_due(false) {
            return;
        }
        let (listed, cri_listed) = if unknown.is_empty() {
            (HashMap::new(), HashMap::new())
        } else {
            (self.docker_list(), self.cri_list())
        };
        if self.pods_due(!unknown.is_empty()) {
            self.read_pods();
        }
        for (id, (cref, dirs)) in containers {
            let own_path = dirs
                .iter()
                .map(|d| d.path.as_str())
                .min_by_key(|p| p.len())
                .unwrap_or_default();
            let was = self.known.get(id);
            let docker = listed.get(id);
            let cri = cri_listed.get(id);
            let pod = self.pods.get(id);
            let mut identity = ContainerIdentity {
                id: id.clone(),
                runtime: Some(cref.runtime.name()),
                cgroup_path: own_path.to_string(),
                ..Default::default()
            };
            let mut labels = BTreeMap::new();
            if let Some(was) = was {
                identity.name = was.identity.name.clone();
                identity.image_name = was.identity.image_name.clone();
                identity.image_tag = was.identity.image_tag.clone();
                // CRI is only asked about new containers: what it said stays.
                identity.runtime = was.identity.runtime;
                identity.k8s = was.identity.k8s.clone();
                labels = was.labels.clone();
            }
            if let Some(d) = docker {
                identity.name = d.name.clone();
                let (name, tag) = d.image.as_deref().map(split_image).unwrap_or_default();
                identity.image_name = name;
                identity.image_tag = tag;
            }
            if let Some(c) = cri {
                if docker.is_none() {
                    identity.name = c.name.clone();
                    let (name, tag) = c.image.as_deref().map(split_image).unwrap_or_default();
                    identity.image_name = name;
                    identity.image_tag = tag;
                }
                if let Some(runtime) = c.runtime {
                    identity.runtime = Some(runtime);
                }
                if c.k8s.is_some() {
                    identity.k8s = c.k8s.clone();
                    labels = c.pod_labels.clone();
                }
            }
            if let Some(p) = pod {
                identity.k8s = Some(p.identity.clone());
                labels = p.labels.clone();
                if identity.image_name.is_none() {
                    let (name, tag) = p.image.as_deref().map(split_image).unwrap_or_default();
                    identity.image_name = name;
                    identity.image_tag = tag;
                }
            }
            let asked = (self.docker.is_some() || !self.cri.is_empty())
                && !unknown.is_empty()
                && unknown.contains(&id);
            let misses = match (was, docker.is_some() || cri.is_some() || pod.is_some()) {
                (_, true) => 0,
                (Some(w), false) if asked => w.misses.saturating_add(1),
                (None, false) if asked => 1,
                (Some(w), false) => w.misses,
                (None, false) => 0,
            };
            let changed = was.is_none_or(|w| *w.identity != identity);
            let identity = if changed {
                let identity = Arc::new(identity);
                if was.is_none() {
                    info!(
                        container = %identity.id,
                        name = identity.name.as_deref().unwrap_or("-"),
                        runtime = identity.runtime.unwrap_or("-"),
                        cgroup = %identity.cgroup_path,
                        "container found"
                    );
                }
                update.identities.push(identity.clone());
                identity
            } else {
                was.map(|w| w.identity.clone()).unwrap_or_default()
            };
            self.known.insert(
                id.clone(),
                Known {
                    identity,
                    labels,
                    misses,
                },
            );
        }
    }

    /// How soon to ask the runtime API again: containers it did not list yet are asked for
    /// with a growing pause.
    fn lookup_retry(&self) -> Option<Duration> {
        if !self.docker.as_ref().is_some_and(DockerApi::present) {
            return None;
        }
        self.known
            .values()
            .filter(|k| k.misses > 0 && k.misses < LOOKUP_TRIES)
            .map(|k| lookup_pause(k.misses))
            .min()
    }

    fn docker_list(&mut self) -> HashMap<String, DockerContainer> {
        let Some(api) = &self.docker else {
            return HashMap::new();
        };
        if !api.present() {
            return HashMap::new();
        }
        match api.list() {
            Ok(list) => {
                if self.docker_failing {
                    info!(socket = %api.socket().display(), "container runtime API answers again");
                    self.docker_failing = false;
                }
                list.into_iter().map(|c| (c.id.clone(), c)).collect()
            }
            Err(err) => {
                if !self.docker_failing {
                    warn!("container names unknown (ids only): {err}");
                    self.docker_failing = true;
                }
                HashMap::new()
            }
        }
    }

    /// The running containers of every CRI socket that answers, by id.
    fn cri_list(&mut self) -> HashMap<String, CriContainer> {
        let mut all = HashMap::new();
        let states = self
            .cri_failing
            .iter_mut()
            .zip(self.cri_answered.iter_mut());
        for (api, (failing, answered)) in self.cri.iter().zip(states) {
            if !api.present() {
                continue;
            }
            match api.list() {
                Ok(list) => {
                    if *failing {
                        info!(socket = %api.socket().display(), "CRI answers again");
                        *failing = false;
                    }
                    if !*answered {
                        info!(
                            socket = %api.socket().display(),
                            runtime = %list.runtime,
                            listed = list.containers.len(),
                            "CRI answers"
                        );
                        *answered = true;
                    }
                    all.extend(list.containers.into_iter().map(|c| (c.id.clone(), c)));
                }
                Err(err) => {
                    if !*failing {
                        if err.is_unimplemented() {
                            // Docker's own containerd has its CRI plugin off: common, harmless.
                            info!(socket = %api.socket().display(), "no CRI service on this socket (CRI plugin disabled?); not used for container names");
                        } else {
                            warn!("container names from CRI unknown (ids only): {err}");
                        }
                        *failing = true;
                    }
                }
            }
        }
        all
    }

    fn pods_due(&self, unknown: bool) -> bool {
        if self.kube.is_none() {
            return false;
        }
        match self.pods_read {
            None => true,
            Some(at) => {
                at.elapsed() >= PODS_EVERY || (unknown && at.elapsed() >= PODS_AT_MOST_EVERY)
            }
        }
    }

    fn read_pods(&mut self) {
        let Some(kube) = &self.kube else {
            return;
        };
        self.pods_read = Some(Instant::now());
        match kube.pods() {
            Ok(pods) => {
                if self.kube_failing {
                    info!("Kubernetes API answers again");
                    self.kube_failing = false;
                }
                self.pods = pods;
            }
            Err(err) => {
                if !self.kube_failing {
                    warn!("Kubernetes pod names unknown: {err:#}");
                    self.kube_failing = true;
                }
            }
        }
    }

    /// The `--container` values that name no container seen so far.
    pub fn unmatched_containers(&self) -> Vec<&str> {
        self.filter
            .containers
            .iter()
            .filter(|given| {
                let alone = ContainerFilter {
                    containers: vec![(*given).clone()],
                    ..Default::default()
                };
                !self
                    .known
                    .values()
                    .any(|k| alone.matches_container(&k.identity, &k.labels))
            })
            .map(String::as_str)
            .collect()
    }

    /// The selection this watcher enforces (with `--cgroup` paths made relative to the
    /// hierarchy).
    pub fn filter(&self) -> &ContainerFilter {
        &self.filter
    }

    pub fn cgroup_fs(&self) -> &CgroupFs {
        &self.fs
    }
}

/// The pause before the next look for a container the runtime API missed `misses` times.
fn lookup_pause(misses: u8) -> Duration {
    let doublings = misses.saturating_sub(LOOKUP_QUICK_TRIES).min(16);
    LOOKUP_RETRY_QUICK
        .saturating_mul(1 << doublings)
        .min(REFRESH_EVERY)
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;

    const A: &str = "aa0000000000000000000000000000000000000000000000000000000000000a";
    const B: &str = "bb0000000000000000000000000000000000000000000000000000000000000b";

    /// A directory tree shaped like a cgroup2 hierarchy (the walk only needs directories and
    /// their inode numbers).
    fn tree(name: &str) -> PathBuf {
        let root =
            std::env::temp_dir().join(format!("difytrace-watcher-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for dir in [
            format!("docker/{A}/sub"),
            format!("docker/{B}"),
            "my.slice/job".to_string(),
            "user.slice".to_string(),
        ] {
            std::fs::create_dir_all(root.join(dir)).expect("test tree");
        }
        root
    }

    fn watcher(root: &Path, filter: ContainerFilter) -> Watcher {
        Watcher::new(CgroupFs { root: root.into() }, filter, None, None)
    }

    fn paths(dirs: &[CgroupDir]) -> Vec<String> {
        let mut p: Vec<String> = dirs.iter().map(|d| d.path.clone()).collect();
        p.sort();
        p
    }

    #[test]
    fn selects_a_container_with_its_sub_cgroups_and_follows_changes() {
        let root = tree("select");
        let mut w = watcher(
            &root,
            ContainerFilter {
                containers: vec![A[..12].to_string()],
                cgroups: vec!["/my.slice".into()],
                ..Default::default()
            },
        );
        let first = w.refresh();
        assert_eq!(
            paths(&first.added),
            vec![
                format!("/docker/{A}"),
                format!("/docker/{A}/sub"),
                "/my.slice".to_string(),
                "/my.slice/job".to_string(),
            ]
        );
        assert_eq!(first.identities.len(), 2, "both containers named by id");
        assert!(w.unmatched_containers().is_empty());
        // Nothing changed: nothing to say.
        assert!(w.refresh().is_empty());
        // A goes away: its cgroups leave the filter, its identity is gone.
        std::fs::remove_dir_all(root.join(format!("docker/{A}"))).unwrap();
        let gone = w.refresh();
        assert_eq!(gone.removed.len(), 2);
        assert_eq!(gone.gone, vec![A.to_string()]);
        assert_eq!(w.unmatched_containers(), vec![&A[..12]]);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn lookups_are_retried_quickly_then_less_often() {
        assert_eq!(lookup_pause(1), LOOKUP_RETRY_QUICK);
        assert_eq!(lookup_pause(LOOKUP_QUICK_TRIES), LOOKUP_RETRY_QUICK);
        assert_eq!(lookup_pause(LOOKUP_QUICK_TRIES + 1), LOOKUP_RETRY_QUICK * 2);
        assert_eq!(lookup_pause(LOOKUP_TRIES), REFRESH_EVERY);
        assert_eq!(lookup_pause(u8::MAX), REFRESH_EVERY);
        let total: Duration = (1..LOOKUP_TRIES).map(lookup_pause).sum();
        assert!(
            total > Duration::from_secs(3) && total < Duration::from_secs(6),
            "{total:?}"
        );
    }

    #[test]
    fn names_without_an_api_match_nothing() {
        let root = tree("names");
        let mut w = watcher(
            &root,
            ContainerFilter {
                containers: vec!["api".into()],
                ..Default::default()
            },
        );
        let first = w.refresh();
        assert!(first.added.is_empty());
        assert_eq!(w.unmatched_containers(), vec!["api"]);
        // Without a filter or an API to ask there is nothing to walk for.
        let mut idle = watcher(&root, ContainerFilter::default());
        assert!(!idle.has_work());
        assert!(idle.refresh().is_empty());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
