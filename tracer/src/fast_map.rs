//! Hash maps for the agent's per-event tables. std's default SipHash showed as a few percent
//! of the agent's CPU under load, hashing small integer keys (pids, fds, goroutines, span
//! ids) millions of times a second; foldhash is several times faster on such keys and still
//! seeded per process, so keys that come from traffic (metric labels) cannot be aimed at one
//! bucket without knowing the seed.

pub type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
pub type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
