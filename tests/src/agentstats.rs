//! What the agent says about itself: its `stats` log lines (`key=value` counters) and its
//! memory as the kernel sees it.

use std::collections::BTreeMap;

use anyhow::{Context, Result};

/// Counters of one `stats` line.
pub type Stats = BTreeMap<String, u64>;

/// The `key=value` fields of a `stats` log line, or `None` when `line` is not one.
pub fn parse_stats_line(line: &str) -> Option<Stats> {
    let rest = &line[line.find(" stats ")? + " stats ".len()..];
    let fields: Stats = rest
        .split_whitespace()
        .filter_map(|w| {
            let (k, v) = w.split_once('=')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect();
    (!fields.is_empty()).then_some(fields)
}

/// Every `stats` line of the agent's log, oldest first.
pub fn stats_lines(log: &str) -> Vec<Stats> {
    log.lines().filter_map(parse_stats_line).collect()
}

/// The newest `stats` line of the log.
pub fn last_stats(log: &str) -> Option<Stats> {
    log.lines().rev().find_map(parse_stats_line)
}

/// One counter of a stats line (a missing counter is an error naming it).
pub fn counter(stats: &Stats, key: &str) -> Result<u64> {
    stats
        .get(key)
        .copied()
        .with_context(|| format!("no `{key}` in the agent's stats line {stats:?}"))
}

/// (VmRSS, VmHWM) of `pid` in KiB, from `/proc/<pid>/status`.
pub fn memory_kib(pid: u32) -> Result<(u64, u64)> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |name: &str| -> Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {name} in {path}"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// The `age_ms` of the agent's "cgroup selected" debug line that contains `id` (a container
/// id, or `cgroup=<path> `): milliseconds from the cgroup's creation to its entry in the
/// kernel filter.
pub fn selected_age_ms(log: &str, id: &str) -> Option<f64> {
    log.lines()
        .filter(|l| l.contains("cgroup selected") && l.contains(id))
        .find_map(|l| {
            let rest = l.split("age_ms=").nth(1)?;
            rest.split_whitespace().next()?.parse().ok()
        })
}

/// User + system CPU seconds `pid` has used, from `/proc/<pid>/stat`.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) may hold spaces; the fields after it are plain numbers.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("no command name in {path}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks = |i: usize| -> Result<f64> {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .with_context(|| format!("no CPU time field in {path}"))
    };
    // SAFETY: sysconf only reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    Ok((ticks(11)? + ticks(12)?) / hz)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_stats_lines() {
        let log = "2026-11-26T04:39:22Z  INFO tracer::agent: tracing\n\
                   2026-11-26T04:39:32Z  INFO tracer::agent: stats events=5 dropped=0 spans=2 conns_evicted=7 go_grpc_held=0\n\
                   2026-11-26T04:39:33Z  INFO tracer::agent: stats events=9 dropped=1 spans=3\n";
        let all = stats_lines(log);
        assert_eq!(all.len(), 2);
        assert_eq!(all[0]["conns_evicted"], 7);
        let last = last_stats(log).unwrap();
        assert_eq!(counter(&last, "events").unwrap(), 9);
        assert!(counter(&last, "nope").is_err());
        assert!(parse_stats_line("no stats here").is_none());
    }

    #[test]
    fn reads_own_memory() {
        let (rss, hwm) = memory_kib(std::process::id()).unwrap();
        assert!(rss > 0 && hwm >= rss);
    }
}
