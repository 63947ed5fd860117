//! `tracer check`: what the kernel and this process offer, one line per item with OK or
//! MISSING and what it means for tracing. Exit code 0 when everything the agent needs is
//! there. The BPF items are real probes (aya's feature probes load a trivial program or
//! create a map, then close it), not guesses from the kernel version.

use std::{fmt::Write as _, path::Path};

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{self, BpfHelper, UProbeMultiFeature},
};

use crate::probes::{MIN_KERNEL, btf, kernel_release};

/// How much an item matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// The agent cannot run without it.
    Required,
    /// A feature is off or degraded without it.
    Optional,
    /// Reported for information only.
    Info,
}

/// One checked item.
#[derive(Debug, Clone)]
pub struct Item {
    pub name: &'static str,
    pub ok: bool,
    pub need: Need,
    /// What was found, and what it means when missing.
    pub detail: String,
}

fn item(name: &'static str, ok: bool, need: Need, detail: impl Into<String>) -> Item {
    Item {
        name,
        ok,
        need,
        detail: detail.into(),
    }
}

/// Capability bits of CapEff (linux/capability.h).
const CAPS: [(&str, u32, Need, &str); 5] = [
    (
        "CAP_BPF",
        39,
        Need::Optional,
        "load BPF programs and maps (or CAP_SYS_ADMIN)",
    ),
    (
        "CAP_PERFMON",
        38,
        Need::Optional,
        "attach tracepoints and uprobes (or CAP_SYS_ADMIN)",
    ),
    (
        "CAP_SYS_ADMIN",
        21,
        Need::Optional,
        "covers CAP_BPF + CAP_PERFMON; mounting tracefs",
    ),
    (
        "CAP_SYS_PTRACE",
        19,
        Need::Optional,
        "read other processes' /proc/<pid>/{exe,maps,root,fd} (Go, greenlet, nginx hooks, sockets at start)",
    ),
    (
        "CAP_DAC_READ_SEARCH",
        2,
        Need::Optional,
        "read binaries and /proc entries of other users",
    ),
];

/// Parses the hex CapEff line of /proc/self/status.
fn cap_eff(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line.trim_start_matches("CapEff:").trim(), 16).ok()
}

/// Mount point of the first mount of filesystem type `fstype` in a /proc/mounts text.
fn mount_point(mounts: &str, fstype: &str) -> Option<String> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, point, kind) = (fields.next()?, fields.next()?, fields.next()?);
        (kind == fstype).then(|| point.to_string())
    })
}

fn probe(name: &'static str, need: Need, result: Result<bool, String>, what: &str) -> Item {
    match result {
        Ok(true) => item(name, true, need, format!("supported: {what}")),
        Ok(false) => item(
            name,
            false,
            need,
            format!("not supported by this kernel: {what}"),
        ),
        Err(err) => item(name, false, need, format!("probe failed ({err}): {what}")),
    }
}

/// Runs every check.
pub fn items() -> Vec<Item> {
    let mut out = Vec::new();
    out.push(item(
        "architecture",
        cfg!(target_arch = "x86_64"),
        Need::Required,
        format!(
            "{} (the kernel side reads x86_64 syscall registers)",
            std::env::consts::ARCH
        ),
    ));
    out.push(match kernel_release() {
        Ok((release, version)) => item(
            "kernel",
            version >= MIN_KERNEL,
            Need::Required,
            format!("{release} (>= {}.{} needed)", MIN_KERNEL.0, MIN_KERNEL.1),
        ),
        Err(err) => item("kernel", false, Need::Required, format!("{err:#}")),
    });
    let btf = btf::Btf::from_sys_fs();
    out.push(match &btf {
        Ok(_) => item(
            "BTF",
            true,
            Need::Required,
            "/sys/kernel/btf/vmlinux parsed (kernel struct offsets come from it)",
        ),
        Err(err) => item(
            "BTF",
            false,
            Need::Required,
            format!("{err:#}: no CONFIG_DEBUG_INFO_BTF"),
        ),
    });
    if let Ok(btf) = &btf {
        out.push(match btf::FdWalkOffsets::from_btf(btf) {
            Ok(_) => item(
                "BTF fd walk",
                true,
                Need::Optional,
                "task->files->fdt offsets found: pipes (plugin stdio) are followed",
            ),
            Err(err) => item(
                "BTF fd walk",
                false,
                Need::Optional,
                format!("{err}: pipes (plugin stdio) are not followed"),
            ),
        });
        out.push(match btf::SockOffsets::from_btf(btf) {
            Ok(_) => item(
                "BTF socket",
                true,
                Need::Optional,
                "file->socket->sk offsets found: both ends of a local connection are linked",
            ),
            Err(err) => item(
                "BTF socket",
                false,
                Need::Optional,
                format!("{err}: no cross-process linking"),
            ),
        });
    }
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let tracefs = mount_point(&mounts, "tracefs");
    out.push(match &tracefs {
        Some(point) => item("tracefs", true, Need::Optional, format!("mounted at {point}")),
        None => item("tracefs", false, Need::Optional, "not mounted: the agent mounts it at /sys/kernel/tracing at start (needs CAP_SYS_ADMIN)"),
    });
    let sched = Path::new("/sys/kernel/tracing/events/sched/sched_process_fork/format");
    out.push(item(
        "sched tracepoints",
        sched.exists() || tracefs.is_none(),
        Need::Required,
        if sched.exists() {
            "sched_process_fork/exec/exit found (process tracking)".to_string()
        } else if tracefs.is_none() {
            "not visible until tracefs is mounted".to_string()
        } else {
            format!("{} missing: no process tracking", sched.display())
        },
    ));
    out.push(probe(
        "ring buffer",
        Need::Required,
        sys::is_map_supported(MapType::RingBuf).map_err(|e| e.to_string()),
        "BPF_MAP_TYPE_RINGBUF created and closed (the agent's event channel)",
    ));
    out.push(probe(
        "raw tracepoints",
        Need::Required,
        sys::is_program_supported(ProgramType::RawTracePoint).map_err(|e| e.to_string()),
        "a trivial raw_tracepoint program loaded and unloaded (sys_enter/sys_exit hooks)",
    ));
    out.push(probe(
        "tracepoints",
        Need::Required,
        sys::is_program_supported(ProgramType::TracePoint).map_err(|e| e.to_string()),
        "tracepoint programs (sched_process_* hooks)",
    ));
    out.push(probe(
        "cgroup id helper",
        Need::Required,
        sys::is_helper_supported(
            ProgramType::RawTracePoint,
            BpfHelper::BPF_FUNC_get_current_cgroup_id,
        )
        .map_err(|e| e.to_string()),
        "bpf_get_current_cgroup_id (every record carries the cgroup)",
    ));
    let uprobe_pmu = Path::new("/sys/bus/event_source/devices/uprobe").exists();
    let uprobe_prog = sys::is_program_supported(ProgramType::KProbe).map_err(|e| e.to_string());
    out.push(match uprobe_prog {
        Ok(true) if uprobe_pmu => item("uprobes", true, Need::Optional, "uprobe PMU and kprobe-type programs: Go, greenlet and nginx hooks work"),
        Ok(true) => item("uprobes", false, Need::Optional, "no uprobe PMU (/sys/bus/event_source/devices/uprobe): Go, gevent and nginx are linked by thread"),
        other => probe("uprobes", Need::Optional, other, "uprobe programs: without them Go, gevent and nginx are linked by thread"),
    });
    out.push(probe(
        "uprobe_multi",
        Need::Info,
        sys::is_uprobe_multi_supported(UProbeMultiFeature::LinkCreation).map_err(|e| e.to_string()),
        "multi-uprobe links (not used: one link per hook)",
    ));
    let kprobes = Path::new("/sys/bus/event_source/devices/kprobe").exists();
    out.push(item(
        "kprobes",
        kprobes,
        Need::Info,
        if kprobes {
            "kprobe PMU present (not used)"
        } else {
            "no kprobe PMU (not needed: only tracepoints and uprobes are used)"
        },
    ));
    out.push(match mount_point(&mounts, "cgroup2") {
        Some(point) => item(
            "cgroup v2",
            true,
            Need::Optional,
            format!("mounted at {point} (cgroup ids name containers)"),
        ),
        None => item(
            "cgroup v2",
            false,
            Need::Optional,
            "not mounted: cgroup ids cannot be mapped to containers",
        ),
    });
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let caps = cap_eff(&status).unwrap_or(0);
    let has = |bit: u32| caps & (1u64 << bit) != 0;
    for (name, bit, need, what) in CAPS {
        out.push(item(name, has(bit), need, what));
    }
    out.push(item(
        "BPF privileges",
        has(21) || (has(39) && has(38)),
        Need::Required,
        format!("CapEff={caps:016x}: needs CAP_SYS_ADMIN, or CAP_BPF + CAP_PERFMON"),
    ));
    out.push(memlock());
    for (name, path, meaning) in [
        (
            "unprivileged_bpf_disabled",
            "/proc/sys/kernel/unprivileged_bpf_disabled",
            "only matters without CAP_BPF",
        ),
        (
            "perf_event_paranoid",
            "/proc/sys/kernel/perf_event_paranoid",
            "only matters without CAP_PERFMON",
        ),
        (
            "lockdown",
            "/sys/kernel/security/lockdown",
            "\"confidentiality\" forbids reading kernel memory from BPF",
        ),
    ] {
        let value = std::fs::read_to_string(path).map(|s| s.trim().to_string());
        let ok = match (name, &value) {
            ("lockdown", Ok(v)) => !v.contains("[confidentiality]"),
            (_, v) => v.is_ok(),
        };
        let need = if name == "lockdown" {
            Need::Required
        } else {
            Need::Info
        };
        let found = value.unwrap_or_else(|e| format!("unreadable ({e})"));
        out.push(item(
            name,
            ok || (name == "lockdown" && found.starts_with("unreadable")),
            need,
            format!("{found} ({meaning})"),
        ));
    }
    out
}

fn memlock() -> Item {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscall with a valid pointer.
    let ret = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) };
    let text = |v: libc::rlim_t| {
        if v == libc::RLIM_INFINITY {
            "unlimited".to_string()
        } else {
            format!("{} KiB", v / 1024)
        }
    };
    if ret != 0 {
        return item("memlock rlimit", false, Need::Info, "getrlimit failed");
    }
    item(
        "memlock rlimit",
        true,
        Need::Info,
        format!(
            "soft {} / hard {} (kernels >= 5.11 charge BPF maps to the cgroup instead; the agent raises it anyway)",
            text(lim.rlim_cur),
            text(lim.rlim_max)
        ),
    )
}

/// The report, one line per item, and whether everything required is there.
pub fn report(items: &[Item]) -> (String, bool) {
    let mut out = String::new();
    let mut missing = Vec::new();
    for it in items {
        let status = match (it.ok, it.need) {
            (true, _) => "OK",
            (false, Need::Required) => "MISSING",
            (false, Need::Optional) => "MISSING (optional)",
            (false, Need::Info) => "NO (info)",
        };
        let _ = writeln!(out, "{status:<19} {:<26} {}", it.name, it.detail);
        if !it.ok && it.need == Need::Required {
            missing.push(it.name);
        }
    }
    if missing.is_empty() {
        out.push_str("everything the agent needs is present\n");
    } else {
        let _ = writeln!(out, "missing for the agent: {}", missing.join(", "));
    }
    (out, missing.is_empty())
}

/// Prints the report; the process exit code.
pub fn run() -> i32 {
    let (text, ok) = report(&items());
    print!("{text}");
    if ok { 0 } else { 1 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_caps_and_mounts() {
        assert_eq!(
            cap_eff("Name:\tx\nCapEff:\t000001fffeffffff\n"),
            Some(0x1fffeffffff)
        );
        let mounts = "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\nnodev /sys/kernel/tracing tracefs rw 0 0\n";
        assert_eq!(
            mount_point(mounts, "tracefs").as_deref(),
            Some("/sys/kernel/tracing")
        );
        assert_eq!(
            mount_point(mounts, "cgroup2").as_deref(),
            Some("/sys/fs/cgroup/unified")
        );
        assert_eq!(mount_point(mounts, "debugfs"), None);
    }

    #[test]
    fn report_lists_what_is_missing() {
        let items = vec![
            item("a", true, Need::Required, "x"),
            item("b", false, Need::Optional, "y"),
            item("c", false, Need::Required, "z"),
        ];
        let (text, ok) = report(&items);
        assert!(!ok);
        assert!(text.contains("MISSING (optional)"));
        assert!(text.ends_with("missing for the agent: c\n"), "{text}");
    }
}
