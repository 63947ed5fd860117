//! The agent's own TCP sockets. The kernel side never traces the agent, but a traced
//! collector that receives the agent's exports would otherwise produce a span per export,
//! which is exported in turn: a loop. Connections accepted from one of these local addresses
//! are therefore ignored, when the accepting socket is the one the agent connected to: since
//! Linux lets one local port connect to different destinations, a traced service's client
//! can share a port number with the agent's export socket, and must not be taken for it.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use super::procfs;
use crate::span::clock::monotonic_ns;

pub struct SelfSockets {
    pid: u32,
    /// Local address -> the remote addresses the agent is connected to from it (None when
    /// unknown, which then matches any).
    local: HashMap<SocketAddr, HashSet<Option<SocketAddr>>>,
    /// CLOCK_MONOTONIC of the last read; a connection accepted after it may be missing.
    read_ns: u64,
    /// The kernel side reports the agent's connects with their local address: /proc is not
    /// read for every unknown loopback peer.
    reported_by_kernel: bool,
}

/// Own sockets remembered at once (closed ones are not reported, so the set is re-read
/// from /proc when it reaches this).
const MAX_OWN_SOCKETS: usize = 4096;

impl SelfSockets {
    pub fn new() -> Self {
        Self {
            pid: std::process::id(),
            local: HashMap::new(),
            read_ns: 0,
            reported_by_kernel: false,
        }
    }

    /// From now on the kernel side reports every connect of the agent (it can read sockets'
    /// local addresses), so /proc is only read periodically.
    pub fn reported_by_kernel(&mut self) {
        self.reported_by_kernel = true;
    }

    /// One of the agent's own connects, from `local` to `remote`, as the kernel side saw it.
    pub fn add(&mut self, local: SocketAddr, remote: Option<SocketAddr>) {
        self.reported_by_kernel = true;
        if self.local.len() >= MAX_OWN_SOCKETS {
            self.refresh();
        }
        self.local.entry(local).or_default().insert(remote);
    }

    fn matches(&self, peer: SocketAddr, server: Option<SocketAddr>) -> bool {
        self.local.get(&peer).is_some_and(|remotes| {
            server.is_none() || remotes.contains(&None) || remotes.contains(&server)
        })
    }

    /// True when `peer`, accepted at `accepted_ns` (CLOCK_MONOTONIC) on a socket whose
    /// own address is `server` (when known), is a socket of the agent itself.
    pub fn is_own(
        &mut self,
        peer: SocketAddr,
        server: Option<SocketAddr>,
        accepted_ns: u64,
    ) -> bool {
        if self.matches(peer, server) {
            return true;
        }
        // Exports to a collector on this host go through loopback; any other peer is only
        // matched once a periodic refresh has seen it, so the common case is a set lookup.
        // The set is re-read only when it is older than the connection in question.
        // Reading /proc for every accepted loopback connection costs more than all the rest
        // of the agent's work under load; once the kernel side reports the agent's connects
        // it is not needed (an accept seen before its connect's report is undone then).
        if self.reported_by_kernel || !peer.ip().is_loopback() || self.read_ns >= accepted_ns {
            return false;
        }
        self.refresh();
        self.matches(peer, server)
    }

    /// Re-reads the local addresses of the agent's sockets: a handful of getsockname calls,
    /// cheap enough to run whenever a new loopback peer shows up.
    pub fn refresh(&mut self) {
        self.read_ns = monotonic_ns();
        let mut local: HashMap<SocketAddr, HashSet<Option<SocketAddr>>> = HashMap::new();
        for (fd, _) in procfs::socket_fds(self.pid) {
            if let Some(addr) = sock_addr(fd, libc::getsockname) {
                local
                    .entry(addr)
                    .or_default()
                    .insert(sock_addr(fd, libc::getpeername));
            }
        }
        self.local = local;
    }
}

type AddrCall =
    unsafe extern "C" fn(libc::c_int, *mut libc::sockaddr, *mut libc::socklen_t) -> libc::c_int;

/// The local (`getsockname`) or remote (`getpeername`) address of one of this process's
/// socket fds.
fn sock_addr(fd: i32, call: AddrCall) -> Option<SocketAddr> {
    // SAFETY: sockaddr_storage is plain data; the call writes at most `len` bytes.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: valid pointers to owned storage; a stale fd only yields an error or an
    // unrelated address, which is harmless here.
    let rc = unsafe { call(fd, (&raw mut storage).cast(), &mut len) };
    if rc != 0 {
        return None;
    }
    match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin: libc::sockaddr_in = unsafe { std::ptr::read((&raw const storage).cast()) };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::new(IpAddr::V4(ip), u16::from_be(sin.sin_port)))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6: libc::sockaddr_in6 = unsafe { std::ptr::read((&raw const storage).cast()) };
            let v6 = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            let ip = v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4);
            Some(SocketAddr::new(ip, u16::from_be(sin6.sin6_port)))
        }
        _ => None,
    }
}

impl Default for SelfSockets {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_listening_socket_is_recognised() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let server = listener.local_addr().expect("addr");
        let client = std::net::TcpStream::connect(server).expect("connect");
        let mut own = SelfSockets::new();
        let now = monotonic_ns();
        let local = client.local_addr().expect("local");
        assert!(own.is_own(local, Some(server), now));
        assert!(own.is_own(local, None, now));
        // The same port connected elsewhere (Linux allows it) is someone else's socket.
        assert!(!own.is_own(local, Some("127.0.0.1:9".parse().expect("addr")), now));
        assert!(!own.is_own("127.0.0.1:1".parse().expect("addr"), None, now));
        assert!(!own.is_own("10.1.2.3:4".parse().expect("addr"), None, now));
        // A connection opened after the last read is found without waiting.
        let late = std::net::TcpStream::connect(server).expect("connect");
        assert!(own.is_own(
            late.local_addr().expect("local"),
            Some(server),
            monotonic_ns()
        ));
    }

    #[test]
    fn reported_connects_match_by_both_ends() {
        let mut own = SelfSockets::new();
        let agent: SocketAddr = "127.0.0.1:40000".parse().expect("addr");
        let collector: SocketAddr = "127.0.0.1:4317".parse().expect("addr");
        own.add(agent, Some(collector));
        let now = monotonic_ns();
        assert!(own.is_own(agent, Some(collector), now));
        assert!(!own.is_own(agent, Some("127.0.0.1:8080".parse().expect("addr")), now));
    }
}
