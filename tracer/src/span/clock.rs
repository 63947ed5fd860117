//! Kernel timestamps (CLOCK_MONOTONIC, what bpf_ktime_get_ns returns) to wall-clock time.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// Unix time in ns at monotonic 0.
    offset_ns: i128,
}

impl Clock {
    /// Samples both clocks now.
    pub fn now() -> Self {
        let mono = monotonic_ns();
        let real = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(0);
        Self {
            offset_ns: real - mono as i128,
        }
    }

    pub fn to_system_time(&self, mono_ns: u64) -> SystemTime {
        let unix = (mono_ns as i128 + self.offset_ns).max(0);
        UNIX_EPOCH + Duration::from_nanos(u64::try_from(unix).unwrap_or(u64::MAX))
    }
}

/// The current CLOCK_MONOTONIC in ns.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
}
