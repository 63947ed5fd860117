//! Occupancy of the kernel's hash maps, counted from user space on a thread of its own so the
//! event loop never walks a map: every [`COUNT_EVERY`] each map is opened by id and its keys
//! are walked with `BPF_MAP_GET_NEXT_KEY` (one syscall per entry; a full 64 Ki-entry map takes
//! some milliseconds, off the hot path).
//!
//! The same walk gives the entries SOCKETS and OTHER_FDS evicted. An LRU map evicts silently
//! when it is full, and nothing here can hook the eviction (no kprobes/fentry on the kernels
//! this runs on), so it is derived: every entry that was created is either still there, or
//! was removed by a delete, or was evicted. Creations and deletes are counted where they
//! happen (kernel side: COUNTERS; user side: `probes::churn`), so
//! `evicted = created - removed - live`. The walk takes a while, so the counts are read
//! around it: creations before (fewer), removals after (more), which makes each sample a
//! lower bound of the evictions so far. The total is the largest sample yet: it never goes
//! back, and it is exact whenever the map is still for a walk.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    sync::{Arc, Mutex, PoisonError},
    thread,
    time::Duration,
};

use aya::maps::{Map, MapData, MapInfo, PerCpuArray};
use tracer_common::counter;

use super::self_telemetry::MapOccupancy;
use crate::probes::{
    churn::{ChurnSources, FdMapChurn, UserChurn},
    counter_sum,
};

/// How often the maps are counted.
pub const COUNT_EVERY: Duration = Duration::from_secs(5);
/// `BPF_MAP_GET_NEXT_KEY` command of bpf(2).
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
/// Largest key walked (the agent's keys are at most 16 bytes).
const MAX_KEY: usize = 64;

/// The latest counts, shared with the counting thread.
#[derive(Debug, Clone, Default)]
pub struct MapCounts {
    shared: Arc<Mutex<Vec<MapOccupancy>>>,
}

impl MapCounts {
    /// Starts counting the maps with these (name, id), and deriving the evictions of the fd
    /// maps from `churn`; they are counted once before this returns so the first snapshot
    /// has them. The thread ends when every handle is dropped.
    pub fn start(maps: Vec<(String, u32)>, churn: Option<ChurnSources>) -> Self {
        let counts = Self::default();
        let opened: Vec<(String, MapInfo)> = maps
            .into_iter()
            .filter_map(|(name, id)| match MapInfo::from_id(id) {
                Ok(info) => Some((name, info)),
                Err(err) => {
                    tracing::debug!(map = %name, %err, "cannot open map for counting");
                    None
                }
            })
            .collect();
        let mut derived = churn.and_then(DerivedEvictions::open);
        counts.publish(count_all(&opened, derived.as_mut()));
        let shared = Arc::downgrade(&counts.shared);
        let spawned = thread::Builder::new()
            .name("difytrace-maps".into())
            .spawn(move || {
                loop {
                    thread::sleep(COUNT_EVERY);
                    let Some(shared) = shared.upgrade() else {
                        return;
                    };
                    let counts = count_all(&opened, derived.as_mut());
                    *shared.lock().unwrap_or_else(PoisonError::into_inner) = counts;
                }
            });
        if let Err(err) = spawned {
            tracing::warn!(%err, "cannot start the map counting thread; map occupancy stays at its first count");
        }
        counts
    }

    fn publish(&self, counts: Vec<MapOccupancy>) {
        *self.shared.lock().unwrap_or_else(PoisonError::into_inner) = counts;
    }

    pub fn get(&self) -> Vec<MapOccupancy> {
        self.shared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

fn count_all(
    maps: &[(String, MapInfo)],
    mut derived: Option<&mut DerivedEvictions>,
) -> Vec<MapOccupancy> {
    maps.iter()
        .filter_map(|(name, info)| {
            let churn = derived.as_deref_mut().and_then(|d| d.of(name));
            let created = churn.as_ref().map(|(c, _)| c.created());
            let entries = count_keys(info)
                .inspect_err(|err| tracing::debug!(map = %name, %err, "cannot count map"))
                .ok()?;
            let evicted = match (churn, created) {
                (Some((churn, evictions)), Some(created)) => {
                    Some(evictions.sample(created, churn.removed(), entries))
                }
                _ => None,
            };
            Some(MapOccupancy {
                name: name.clone(),
                entries,
                capacity: u64::from(info.max_entries()),
                evicted,
            })
        })
        .collect()
}

/// Evictions of an LRU map, derived from samples of its churn and its occupancy.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Evictions {
    total: u64,
}

impl Evictions {
    /// One sample: `created` read before the walk that found `live` entries, `removed` read
    /// after it. Returns the evictions so far: never less than a previous answer.
    pub fn sample(&mut self, created: u64, removed: u64, live: u64) -> u64 {
        // An entry created during the walk and seen by it, or a walk that restarted and saw
        // entries twice, only lower the sample; what is left is never more than the truth.
        let seen = created.saturating_sub(removed).saturating_sub(live);
        self.total = self.total.max(seen);
        self.total
    }

    pub fn total(&self) -> u64 {
        self.total
    }
}

/// Where the creations and removals of one map are counted.
struct ChurnIndexes {
    map: &'static str,
    created: u32,
    removed: u32,
    /// Deletes counted as removals that found the entry gone already.
    remove_missed: u32,
    user: fn(&FdMapChurn) -> &UserChurn,
}

/// The maps whose evictions are derived.
const DERIVED: [ChurnIndexes; 2] = [
    ChurnIndexes {
        map: "SOCKETS",
        created: counter::SOCKETS_CREATED,
        removed: counter::SOCKETS_REMOVED,
        remove_missed: counter::SOCKETS_REMOVE_MISSED,
        user: |c| &c.sockets,
    },
    ChurnIndexes {
        map: "OTHER_FDS",
        created: counter::OTHER_FDS_CREATED,
        removed: counter::OTHER_FDS_REMOVED,
        remove_missed: counter::OTHER_FDS_REMOVE_MISSED,
        user: |c| &c.other_fds,
    },
];

/// The counting thread's handles on the churn counters, and the evictions so far.
struct DerivedEvictions {
    kernel: PerCpuArray<MapData, u64>,
    user: std::sync::Arc<FdMapChurn>,
    evictions: [Evictions; DERIVED.len()],
}

/// One map's churn, read from the kernel's and user space's counters.
struct Churn<'a> {
    kernel: &'a PerCpuArray<MapData, u64>,
    indexes: &'a ChurnIndexes,
    user: &'a UserChurn,
}

impl Churn<'_> {
    fn kernel_sum(&self, index: u32) -> u64 {
        counter_sum(self.kernel, index)
    }

    fn created(&self) -> u64 {
        self.kernel_sum(self.indexes.created) + self.user.created()
    }

    fn removed(&self) -> u64 {
        // Missed deletes are read first: one counted between the two reads is still in
        // `removed`, so the sum errs high (fewer evictions), never low.
        let missed = self.kernel_sum(self.indexes.remove_missed);
        let removed = self.kernel_sum(self.indexes.removed) + self.user.removed();
        removed.saturating_sub(missed)
    }
}

impl DerivedEvictions {
    fn open(sources: ChurnSources) -> Option<Self> {
        let kernel = MapData::from_id(sources.counters_map_id)
            .map_err(anyhow::Error::from)
            .and_then(|data| Ok(PerCpuArray::try_from(Map::PerCpuArray(data))?))
            .inspect_err(|err| {
                tracing::warn!(%err, "cannot open COUNTERS: map evictions are not counted");
            })
            .ok()?;
        Some(Self {
            kernel,
            user: sources.user,
            evictions: [Evictions::default(); DERIVED.len()],
        })
    }

    /// The churn and the evictions of `map`, when they are derived.
    fn of(&mut self, map: &str) -> Option<(Churn<'_>, &mut Evictions)> {
        let i = DERIVED.iter().position(|d| d.map == map)?;
        let indexes = &DERIVED[i];
        Some((
            Churn {
                kernel: &self.kernel,
                indexes,
                user: (indexes.user)(&self.user),
            },
            &mut self.evictions[i],
        ))
    }
}

/// bpf_attr for BPF_MAP_GET_NEXT_KEY.
#[repr(C)]
struct NextKeyAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
}

/// Number of keys in the map, walked with BPF_MAP_GET_NEXT_KEY. Entries may come and go
/// meanwhile: the count is a moment's estimate, bounded by the map's capacity.
fn count_keys(info: &MapInfo) -> std::io::Result<u64> {
    let key_size = info.key_size() as usize;
    if key_size == 0 || key_size > MAX_KEY {
        return Err(std::io::Error::other(format!("key size {key_size}")));
    }
    let fd = info.fd().map_err(std::io::Error::other)?;
    let raw = fd.as_fd().as_raw_fd();
    let mut key = [0u8; MAX_KEY];
    let mut next = [0u8; MAX_KEY];
    let mut first = true;
    let mut n = 0u64;
    let limit = u64::from(info.max_entries()).saturating_mul(2).max(1);
    while n < limit {
        let attr = NextKeyAttr {
            map_fd: u32::try_from(raw).map_err(std::io::Error::other)?,
            _pad: 0,
            // A null key asks for the first key.
            key: if first { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
        };
        // SAFETY: attr points at valid key buffers of at least key_size bytes for the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_GET_NEXT_KEY,
                &attr as *const NextKeyAttr,
                std::mem::size_of::<NextKeyAttr>(),
            )
        };
        if ret != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENOENT) {
                break;
            }
            return Err(err);
        }
        n += 1;
        first = false;
        key[..key_size].copy_from_slice(&next[..key_size]);
    }
    Ok(n.min(u64::from(info.max_entries())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evictions_are_created_minus_removed_minus_live() {
        let mut e = Evictions::default();
        // 100 created, 10 closed, 90 there: nothing evicted.
        assert_eq!(e.sample(100, 10, 90), 0);
        // A map of 64 after 200 creations and 10 closes: 126 evicted.
        assert_eq!(e.sample(200, 10, 64), 126);
        // Closes of what is left later do not read as evictions.
        assert_eq!(e.sample(200, 74, 0), 126);
        assert_eq!(e.total(), 126);
    }

    #[test]
    fn evictions_never_go_back() {
        let mut e = Evictions::default();
        assert_eq!(e.sample(1000, 0, 500), 500);
        // A walk that restarted counted entries twice (or saw ones created after the
        // creations were read): the sample is lower, the total stays.
        assert_eq!(e.sample(1000, 0, 900), 500);
        assert_eq!(e.sample(1010, 0, 490), 520);
    }

    #[test]
    fn a_sample_above_the_counts_is_zero_not_a_wrap() {
        let mut e = Evictions::default();
        // Removals read after the walk may exceed what was created before it.
        assert_eq!(e.sample(5, 7, 0), 0);
        assert_eq!(e.sample(5, 0, 9), 0);
        assert_eq!(e.sample(0, 0, 0), 0);
    }

    #[test]
    fn reading_around_the_walk_keeps_each_sample_a_lower_bound() {
        // Replays churn against a model of the map: creations read before a walk, removals
        // after, live counted in between with any interleaving; the sample never exceeds the
        // evictions that really happened by the end of the walk.
        let mut e = Evictions::default();
        let (mut created, mut removed, mut live, mut evicted) = (0u64, 0u64, 0u64, 0u64);
        let capacity = 8u64;
        for round in 0..50u64 {
            let created_read = created;
            // During the walk: some creations (each may evict), some removals.
            let mut walked = live;
            for _ in 0..(round % 5) {
                created += 1;
                if live == capacity {
                    evicted += 1;
                } else {
                    live += 1;
                }
                walked += 1; // seen by the walk: only lowers the sample
            }
            for _ in 0..(round % 3).min(live) {
                removed += 1;
                live -= 1;
                walked -= 1; // the removal is counted before the entry goes
            }
            let removed_read = removed;
            let total = e.sample(created_read, removed_read, walked.min(capacity));
            assert!(total <= evicted, "round {round}: {total} > {evicted}");
        }
        // Still: the exact count.
        assert_eq!(e.sample(created, removed, live), evicted);
    }
}
