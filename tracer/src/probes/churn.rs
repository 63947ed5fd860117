//! Entries created in and removed from the LRU maps whose evictions the agent derives
//! (`SOCKETS`, `OTHER_FDS`). The kernel side counts its own inserts and deletes in COUNTERS;
//! the ones user space makes (seeding, the sweep of exited processes) are counted here, and
//! the map-counting thread (`metrics::maps`) adds both up.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use aya::maps::{HashMap as BpfHashMap, MapData, MapError};
use aya::sys::SyscallError;
use tracer_common::map_update;

/// Entries user space created in and removed from one map.
#[derive(Debug, Default)]
pub struct UserChurn {
    created: AtomicU64,
    removed: AtomicU64,
}

impl UserChurn {
    pub fn created(&self) -> u64 {
        self.created.load(Ordering::Acquire)
    }

    pub fn removed(&self) -> u64 {
        self.removed.load(Ordering::Acquire)
    }

    /// Puts `value` at `key`, counting it when the entry is new (a replacement is not a
    /// creation: the derivation would read it as an eviction).
    pub fn insert<V: aya::Pod>(
        &self,
        map: &mut BpfHashMap<MapData, u64, V>,
        key: u64,
        value: &V,
    ) -> Result<(), MapError> {
        match map.insert(&key, value, map_update::NOEXIST) {
            Ok(()) => {
                self.created.fetch_add(1, Ordering::AcqRel);
                Ok(())
            }
            Err(err) if is_errno(&err, libc::EEXIST) => map.insert(&key, value, map_update::ANY),
            Err(err) => Err(err),
        }
    }

    /// Removes `key` if it is there. Counted before the delete and taken back when nothing
    /// was deleted, so a walk of the map in between never finds an entry missing that is not
    /// counted (which would read as an eviction, and evictions never go back).
    pub fn remove<V: aya::Pod>(&self, map: &mut BpfHashMap<MapData, u64, V>, key: &u64) -> bool {
        self.removed.fetch_add(1, Ordering::AcqRel);
        let removed = map.remove(key).is_ok();
        if !removed {
            self.removed.fetch_sub(1, Ordering::AcqRel);
        }
        removed
    }
}

fn is_errno(err: &MapError, errno: i32) -> bool {
    matches!(err, MapError::SyscallError(SyscallError { io_error, .. })
        if io_error.raw_os_error() == Some(errno))
}

/// User space's churn of the two fd maps.
#[derive(Debug, Default)]
pub struct FdMapChurn {
    pub sockets: UserChurn,
    pub other_fds: UserChurn,
}

/// What the map-counting thread needs to derive the fd maps' evictions.
#[derive(Debug, Clone)]
pub struct ChurnSources {
    /// Kernel id of the per-CPU COUNTERS array (opened again by the counting thread).
    pub counters_map_id: u32,
    pub user: Arc<FdMapChurn>,
}
