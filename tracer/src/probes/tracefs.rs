//! tracefs: mounted when missing, and the source of tracepoint record layouts.

use std::{fs, path::Path};

use anyhow::{Context as _, anyhow};
use tracing::info;

const TRACEFS: &str = "/sys/kernel/tracing";

/// Mounts tracefs at /sys/kernel/tracing when it is not there yet (syscall tracepoints need it).
pub fn ensure_mounted() -> anyhow::Result<()> {
    if Path::new(TRACEFS).join("events").exists() {
        return Ok(());
    }
    info!("mounting tracefs at {TRACEFS}");
    // Mounting needs CAP_SYS_ADMIN, which a container normally lacks: there the host's
    // tracefs has to be mounted in (deploy/kubernetes/daemonset.yaml).
    const HINT: &str = "mounting needs CAP_SYS_ADMIN and a mount binary; in a container, \
                        mount the host's /sys/kernel/tracing into it";
    let status = std::process::Command::new("mount")
        .args(["-t", "tracefs", "nodev", TRACEFS])
        .status()
        .with_context(|| {
            format!("tracefs is not mounted at {TRACEFS}; running mount -t tracefs ({HINT})")
        })?;
    if !status.success() {
        return Err(anyhow!(
            "tracefs is not mounted at {TRACEFS} and mount -t tracefs nodev {TRACEFS} failed: {status} ({HINT})"
        ));
    }
    Ok(())
}

/// Offset of `field` in the record of tracepoint `category/name`, from its format file.
pub fn field_offset(category: &str, name: &str, field: &str) -> anyhow::Result<u32> {
    let path = Path::new(TRACEFS)
        .join("events")
        .join(category)
        .join(name)
        .join("format");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    parse_field_offset(&text, field)
        .ok_or_else(|| anyhow!("no field {field} in {}", path.display()))
}

/// Finds `offset:N;` on the line declaring `field`.
pub fn parse_field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let decl = line.trim().strip_prefix("field:")?;
        let (decl, rest) = decl.split_once(';')?;
        let name = decl.split_whitespace().last()?;
        let name = name.split('[').next()?;
        if name != field {
            return None;
        }
        rest.split(';')
            .find_map(|part| part.trim().strip_prefix("offset:"))
            .and_then(|n| n.trim().parse().ok())
    })
}

#[cfg(test)]
mod tests {
    use super::parse_field_offset;

    #[test]
    fn finds_child_pid_in_both_layouts() {
        let new = "\tfield:__data_loc char[] child_comm;\toffset:16;\tsize:4;\tsigned:0;\n\tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;\n";
        assert_eq!(parse_field_offset(new, "child_pid"), Some(20));
        let old = "\tfield:char child_comm[16];\toffset:28;\tsize:16;\tsigned:0;\n\tfield:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;\n";
        assert_eq!(parse_field_offset(old, "child_pid"), Some(44));
        assert_eq!(parse_field_offset(old, "child_comm"), Some(28));
        assert_eq!(parse_field_offset(old, "nope"), None);
    }
}
