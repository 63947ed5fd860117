//! Occupancy of the kernel's hash maps, counted from user space on a thread of its own so the
//! event loop never walks a map: every [`COUNT_EVERY`] each map is opened by id and its keys
//! are walked with `BPF_MAP_GET_NEXT_KEY` (one syscall per entry; a full 64 Ki-entry map takes
//! some milliseconds, off the hot path).

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    sync::{Arc, Mutex, PoisonError},
    thread,
    time::Duration,
};

use aya::maps::MapInfo;

use super::self_telemetry::MapOccupancy;

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
    /// Starts counting the maps with these (name, id); they are counted once before this
    /// returns so the first snapshot has them. The thread ends when every handle is dropped.
    pub fn start(maps: Vec<(String, u32)>) -> Self {
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
        counts.publish(count_all(&opened));
        let shared = Arc::downgrade(&counts.shared);
        let spawned = thread::Builder::new()
            .name("difytrace-maps".into())
            .spawn(move || {
                loop {
                    thread::sleep(COUNT_EVERY);
                    let Some(shared) = shared.upgrade() else {
                        return;
                    };
                    let counts = count_all(&opened);
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

fn count_all(maps: &[(String, MapInfo)]) -> Vec<MapOccupancy> {
    maps.iter()
        .filter_map(|(name, info)| {
            let entries = count_keys(info)
                .inspect_err(|err| tracing::debug!(map = %name, %err, "cannot count map"))
                .ok()?;
            Some(MapOccupancy {
                name: name.clone(),
                entries,
                capacity: u64::from(info.max_entries()),
            })
        })
        .collect()
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
