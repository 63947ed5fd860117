//! The agent's eBPF maps seen from outside, through Debian's `bpftool`: which maps a process
//! holds (its fds' `/proc/<pid>/fdinfo`), their names, and the keys they hold now. Used to
//! check that per-process kernel state goes away with the process.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// One map held by a process.
#[derive(Debug, Clone)]
pub struct MapInfo {
    pub id: u32,
    pub name: String,
    pub kind: String,
    pub key_size: usize,
    pub max_entries: u64,
}

/// `bpftool`, or an error saying how to get it.
pub fn bpftool() -> Result<&'static str> {
    for p in ["/usr/sbin/bpftool", "/usr/bin/bpftool", "/sbin/bpftool"] {
        if Path::new(p).is_file() {
            return Ok(p);
        }
    }
    bail!("bpftool not found (Debian package `bpftool`; `cargo xtask setup` installs it)")
}

fn bpftool_json(args: &[&str]) -> Result<serde_json::Value> {
    let out = Command::new(bpftool()?)
        .arg("-j")
        .args(args)
        .output()
        .with_context(|| format!("running bpftool {args:?}"))?;
    if !out.status.success() {
        bail!(
            "bpftool {args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("bpftool {args:?}: not JSON"))
}

/// Map ids behind the fds of `pid` (from `map_id:` in `/proc/<pid>/fdinfo/<fd>`).
pub fn map_ids_of(pid: u32) -> Result<Vec<u32>> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let Ok(entry) = entry else { continue };
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        if let Some(id) = text
            .lines()
            .find_map(|l| l.strip_prefix("map_id:"))
            .and_then(|v| v.trim().parse().ok())
        {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// What `bpftool map show id N` says; `None` when no such map exists (any more).
pub fn map_info(id: u32) -> Result<Option<MapInfo>> {
    let out = Command::new(bpftool()?)
        .args(["-j", "map", "show", "id", &id.to_string()])
        .output()
        .context("running bpftool map show")?;
    if !out.status.success() {
        return Ok(None);
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("bpftool map show: not JSON")?;
    Ok(Some(MapInfo {
        id,
        name: v["name"].as_str().unwrap_or_default().to_string(),
        kind: v["type"].as_str().unwrap_or_default().to_string(),
        key_size: v["bytes_key"].as_u64().unwrap_or(0) as usize,
        max_entries: v["max_entries"].as_u64().unwrap_or(0),
    }))
}

/// Every map `pid` holds.
pub fn maps_of(pid: u32) -> Result<Vec<MapInfo>> {
    let mut maps = Vec::new();
    for id in map_ids_of(pid)? {
        if let Some(m) = map_info(id)? {
            maps.push(m);
        }
    }
    Ok(maps)
}

/// The keys a hash map holds now, as raw bytes.
pub fn map_keys(id: u32) -> Result<Vec<Vec<u8>>> {
    let v = bpftool_json(&["map", "dump", "id", &id.to_string()])?;
    let entries = v.as_array().context("bpftool map dump: not a JSON array")?;
    entries
        .iter()
        .map(|e| {
            e["key"]
                .as_array()
                .context("entry without a raw key")?
                .iter()
                .map(|b| {
                    let s = b.as_str().context("key byte is not a string")?;
                    u8::from_str_radix(s.trim_start_matches("0x"), 16)
                        .with_context(|| format!("key byte {s:?}"))
                })
                .collect()
        })
        .collect()
}

/// Little-endian u64 from the first 8 bytes of `key`.
pub fn key_u64(key: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(key.get(..8)?.try_into().ok()?))
}

/// The process (tgid) a key of one of the agent's per-process maps belongs to, by map name:
/// `WATCHED` is keyed by tgid (or tid, for threads); `SOCKETS`, `OTHER_FDS` by
/// `tgid << 32 | fd`; `INFLIGHT`, `GREENLETS`, `NGX_*` by `tgid << 32 | tid`; `GO_INFLIGHT`
/// by `[tgid << 8 | hook, goroutine]`. `None` for maps not keyed by process.
pub fn key_tgid(map: &str, key: &[u8]) -> Option<u32> {
    match map {
        "WATCHED" => Some(u32::from_le_bytes(key.get(..4)?.try_into().ok()?)),
        "SOCKETS" | "OTHER_FDS" | "INFLIGHT" | "GREENLETS" | "NGX_REQUEST" | "NGX_PEER" => {
            Some((key_u64(key)? >> 32) as u32)
        }
        "GO_INFLIGHT" => Some((key_u64(key)? >> 8) as u32),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_their_process() {
        let sock = ((4242u64 << 32) | 7).to_le_bytes();
        assert_eq!(key_tgid("SOCKETS", &sock), Some(4242));
        assert_eq!(key_tgid("INFLIGHT", &sock), Some(4242));
        assert_eq!(key_tgid("WATCHED", &4242u32.to_le_bytes()), Some(4242));
        let mut go = ((4242u64 << 8) | 3).to_le_bytes().to_vec();
        go.extend_from_slice(&9u64.to_le_bytes());
        assert_eq!(key_tgid("GO_INFLIGHT", &go), Some(4242));
        assert_eq!(key_tgid("EVENTS", &sock), None);
        assert_eq!(key_tgid("SOCKETS", &[1, 2]), None);
    }
}
