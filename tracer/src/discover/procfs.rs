//! Reading facts about processes from /proc. Every read may fail (the process may be gone).

use std::{
    collections::HashMap,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
};

/// What /proc says about one process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcFacts {
    pub tgid: u32,
    pub ppid: u32,
    pub comm: String,
    pub exe: Option<PathBuf>,
    pub cmdline: Vec<String>,
}

/// Reads `/proc/<tgid>`; None when the process is gone.
pub fn read_process(tgid: u32) -> Option<ProcFacts> {
    let base = PathBuf::from(format!("/proc/{tgid}"));
    let stat = fs::read_to_string(base.join("stat")).ok()?;
    let (comm, ppid) = parse_stat(&stat)?;
    let exe = fs::read_link(base.join("exe")).ok();
    let cmdline = fs::read(base.join("cmdline"))
        .map(|raw| split_cmdline(&raw))
        .unwrap_or_default();
    Some(ProcFacts {
        tgid,
        ppid,
        comm,
        exe,
        cmdline,
    })
}

/// comm and ppid from `/proc/<pid>/stat`. comm may hold spaces and parentheses, so the fields
/// after it are found from the last ')'.
pub fn parse_stat(stat: &str) -> Option<(String, u32)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_string();
    let mut rest = stat.get(close + 1..)?.split_whitespace();
    let _state = rest.next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some((comm, ppid))
}

pub fn split_cmdline(raw: &[u8]) -> Vec<String> {
    raw.split(|&b| b == 0)
        .filter(|part| !part.is_empty())
        .map(|part| String::from_utf8_lossy(part).into_owned())
        .collect()
}

/// All numeric entries of /proc.
pub fn all_pids() -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Socket fds of a process with their inode (fd links that read `socket:[inode]`).
pub fn socket_fds(tgid: u32) -> Vec<(i32, u64)> {
    let Ok(dir) = fs::read_dir(format!("/proc/{tgid}/fd")) else {
        return Vec::new();
    };
    dir.filter_map(|entry| {
        let entry = entry.ok()?;
        let fd: i32 = entry.file_name().to_str()?.parse().ok()?;
        let target = fs::read_link(entry.path()).ok()?;
        let inode = target
            .to_str()?
            .strip_prefix("socket:[")?
            .strip_suffix(']')?
            .parse()
            .ok()?;
        Some((fd, inode))
    })
    .collect()
}

/// TCP state as /proc/net/tcp prints it.
pub const TCP_ESTABLISHED: u8 = 0x01;
pub const TCP_LISTEN: u8 = 0x0A;

/// One row of `/proc/<pid>/net/tcp{,6}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSocket {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: u8,
}

/// The TCP sockets of the network namespace `tgid` lives in, by inode.
pub fn tcp_sockets(tgid: u32) -> HashMap<u64, TcpSocket> {
    let mut out = HashMap::new();
    for file in ["tcp", "tcp6"] {
        if let Ok(text) = fs::read_to_string(format!("/proc/{tgid}/net/{file}")) {
            out.extend(parse_tcp_table(&text));
        }
    }
    out
}

/// Parses the text of /proc/net/tcp or tcp6 into (inode, socket) pairs; bad rows are skipped.
pub fn parse_tcp_table(text: &str) -> impl Iterator<Item = (u64, TcpSocket)> + '_ {
    text.lines().skip(1).filter_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let local = parse_hex_addr(fields.get(1)?)?;
        let remote = parse_hex_addr(fields.get(2)?)?;
        let state = u8::from_str_radix(fields.get(3)?, 16).ok()?;
        let inode = fields.get(9)?.parse().ok()?;
        Some((
            inode,
            TcpSocket {
                local,
                remote,
                state,
            },
        ))
    })
}

/// `0100007F:1F90` (IPv4) or 32 hex digits `:port` (IPv6); each 32-bit word is in host
/// (little-endian) byte order.
fn parse_hex_addr(field: &str) -> Option<SocketAddr> {
    let (addr, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(
            u32::from_str_radix(addr, 16).ok()?.to_le_bytes(),
        )),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                let word = u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok()?;
                chunk.copy_from_slice(&word.to_le_bytes());
            }
            let v6 = Ipv6Addr::from(bytes);
            match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            }
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_odd_comm() {
        let stat = "1234 (gunicorn: a (b)) S 77 1234 1234 0 -1 4194560";
        assert_eq!(parse_stat(stat), Some(("gunicorn: a (b)".to_string(), 77)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn tcp_tables() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 0100007F:A2B4 01 00000000:00000000 00:00000000 00000000     0        0 12345 1 0 20 4 30 10 -1\n   1: garbage\n";
        let rows: Vec<_> = parse_tcp_table(v4).collect();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].0, 12345);
        assert_eq!(rows[0].1.local, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(rows[0].1.remote, "127.0.0.1:41652".parse().unwrap());
        assert_eq!(rows[0].1.state, TCP_ESTABLISHED);
        let v6 = "header\n   0: 00000000000000000000000001000000:0050 0000000000000000FFFF00000100007F:C350 0A 0 0 0 0 0 777\n";
        let rows: Vec<_> = parse_tcp_table(v6).collect();
        assert_eq!(rows[0].1.local, "[::1]:80".parse().unwrap());
        assert_eq!(rows[0].1.remote, "127.0.0.1:50000".parse().unwrap());
        assert_eq!(rows[0].1.state, TCP_LISTEN);
        assert_eq!(rows[0].0, 777);
    }

    #[test]
    fn reads_own_process() {
        let me = read_process(std::process::id()).expect("own /proc entry");
        assert!(!me.comm.is_empty());
        assert!(me.exe.is_some());
        assert!(!me.cmdline.is_empty());
    }
}
