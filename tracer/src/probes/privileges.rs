//! The capabilities the agent needs, checked once at start: a missing one is named here
//! rather than surfacing as a bare EPERM from deep inside a bpf() or perf_event_open() call,
//! or as spans that silently never come. Why each is needed: docs/capabilities.md.

use anyhow::{Context as _, bail};
use tracing::warn;

const CAP_DAC_OVERRIDE: u32 = 1;
const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// What is missing from an effective capability set, for the hooks asked for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Missing {
    /// Without these the agent cannot start.
    pub fatal: Vec<&'static str>,
    /// Without these it runs, with what is lost.
    pub degraded: Vec<&'static str>,
}

/// `CapEff` of a /proc/<pid>/status text.
pub fn parse_cap_eff(status: &str) -> Option<u64> {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    u64::from_str_radix(hex, 16).ok()
}

/// What `effective` lacks. Every uprobe is a `uprobe_multi` link (BPF_LINK_CREATE, with
/// CAP_BPF + CAP_PERFMON), not a perf uprobe, which Linux >= 6.16 opens only with
/// CAP_SYS_ADMIN: so no hook needs CAP_SYS_ADMIN.
pub fn assess(effective: u64) -> Missing {
    let has = |cap: u32| effective & (1u64 << cap) != 0;
    let admin = has(CAP_SYS_ADMIN);
    let mut missing = Missing::default();
    if !has(CAP_BPF) && !admin {
        missing
            .fatal
            .push("CAP_BPF (create BPF maps, load BPF programs)");
    }
    if !has(CAP_PERFMON) && !admin {
        missing
            .fatal
            .push("CAP_PERFMON (load tracing programs, open tracepoint perf events)");
    }
    if !has(CAP_SYS_PTRACE) {
        missing.degraded.push(
            "CAP_SYS_PTRACE: /proc/<pid>/exe, maps, root and fd of other processes cannot be \
             read, so no Go, greenlet or nginx uprobes, and connections opened before the \
             agent started are not followed",
        );
    }
    if !has(CAP_DAC_READ_SEARCH) && !has(CAP_DAC_OVERRIDE) {
        missing.degraded.push(
            "CAP_DAC_READ_SEARCH: /proc/<pid>/fd of processes of other users cannot be \
             listed, so their connections opened before the agent started are not followed",
        );
    }
    missing
}

/// Reads the agent's own effective set; fails naming what is missing when it cannot work,
/// warns for what only degrades it.
pub fn check() -> anyhow::Result<()> {
    let status = std::fs::read_to_string("/proc/self/status")
        .context("reading /proc/self/status for the agent's capabilities")?;
    let effective = parse_cap_eff(&status).context("no CapEff line in /proc/self/status")?;
    let missing = assess(effective);
    if !missing.fatal.is_empty() {
        bail!(
            "missing capabilities: {}. The agent needs CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE and \
             CAP_DAC_READ_SEARCH, or root; \
             see docs/capabilities.md",
            missing.fatal.join("; ")
        );
    }
    for what in missing.degraded {
        warn!("missing {what}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BPF: u64 = 1 << CAP_BPF;
    const PERFMON: u64 = 1 << CAP_PERFMON;
    const PTRACE: u64 = 1 << CAP_SYS_PTRACE;
    const DAC: u64 = 1 << CAP_DAC_READ_SEARCH;
    const ADMIN: u64 = 1 << CAP_SYS_ADMIN;

    #[test]
    fn parses_cap_eff() {
        let status = "Name:\ttracer\nCapPrm:\t000000c000080004\nCapEff:\t000000c000080004\n";
        assert_eq!(parse_cap_eff(status), Some(0xc0_0008_0004));
        assert_eq!(parse_cap_eff("Name:\tx\n"), None);
        assert_eq!(parse_cap_eff("CapEff:\tzz\n"), None);
    }

    #[test]
    fn the_documented_set_is_enough() {
        assert_eq!(assess(BPF | PERFMON | PTRACE | DAC), Missing::default());
    }

    #[test]
    fn names_each_missing_capability() {
        let m = assess(PERFMON | PTRACE | DAC);
        assert_eq!(m.fatal.len(), 1);
        assert!(m.fatal[0].starts_with("CAP_BPF"));
        let m = assess(BPF | PTRACE | DAC);
        assert!(m.fatal[0].starts_with("CAP_PERFMON"));
        let m = assess(BPF | PERFMON);
        assert!(m.fatal.is_empty());
        assert!(m.degraded[0].starts_with("CAP_SYS_PTRACE"));
        assert!(m.degraded[1].starts_with("CAP_DAC_READ_SEARCH"));
        // CAP_SYS_ADMIN alone covers BPF and perf (pre-5.8 style)
        assert!(assess(ADMIN | PTRACE | DAC).fatal.is_empty());
    }
}
