//! The two ends of one TCP connection between two traced processes of this host.
//!
//! A connection is named by (client address, server address) on both sides: the client knows
//! its local address (from the kernel's socket at connect) and the server's; the server knows
//! its local address and the client's (from accept). When both ends are traced, a SERVER
//! request on one end is the CLIENT request on the other, and its span becomes that span's
//! child: one trace across processes without any header.

use std::{collections::HashMap, net::SocketAddr};

use crate::stream::{ConnKey, Role};

/// (client address, server address).
pub type Tuple = (SocketAddr, SocketAddr);

/// Connections remembered at once (both ends); beyond it new ones are not linked.
pub const MAX_CONN_ENDS: usize = 65536;

#[derive(Default)]
pub struct ConnEnds {
    clients: HashMap<Tuple, ConnKey>,
    servers: HashMap<Tuple, ConnKey>,
    tuple_of: HashMap<ConnKey, (Tuple, Role)>,
}

impl ConnEnds {
    pub fn len(&self) -> usize {
        self.tuple_of.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tuple_of.is_empty()
    }

    /// Records which connection `key` is, when both its addresses are known.
    pub fn note(
        &mut self,
        key: ConnKey,
        role: Role,
        local: Option<SocketAddr>,
        peer: Option<SocketAddr>,
    ) {
        if self.tuple_of.contains_key(&key) || self.tuple_of.len() >= MAX_CONN_ENDS {
            return;
        }
        let (Some(local), Some(peer)) = (local, peer) else {
            return;
        };
        let (tuple, map) = match role {
            Role::Client => ((local, peer), &mut self.clients),
            Role::Server => ((peer, local), &mut self.servers),
        };
        // A newer connection with the same addresses (a reused port) replaces the old one.
        if let Some(old) = map.insert(tuple, key)
            && old != key
        {
            self.tuple_of.remove(&old);
        }
        self.tuple_of.insert(key, (tuple, role));
    }

    /// The other end of `key`'s connection, when it is traced too.
    pub fn other_end(&self, key: ConnKey) -> Option<ConnKey> {
        let (tuple, role) = self.tuple_of.get(&key)?;
        match role {
            Role::Client => self.servers.get(tuple),
            Role::Server => self.clients.get(tuple),
        }
        .copied()
    }

    pub fn forget(&mut self, key: ConnKey) {
        if let Some((tuple, role)) = self.tuple_of.remove(&key) {
            let map = match role {
                Role::Client => &mut self.clients,
                Role::Server => &mut self.servers,
            };
            if map.get(&tuple) == Some(&key) {
                map.remove(&tuple);
            }
        }
    }

    pub fn forget_process(&mut self, tgid: u32) {
        let keys: Vec<ConnKey> = self
            .tuple_of
            .keys()
            .filter(|k| k.tgid == tgid)
            .copied()
            .collect();
        for key in keys {
            self.forget(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(tgid: u32, fd: i32) -> ConnKey {
        ConnKey {
            tgid,
            fd,
            conn_id: 1,
        }
    }

    #[test]
    fn both_ends_find_each_other() {
        let c: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let s: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let mut ends = ConnEnds::default();
        ends.note(key(1, 5), Role::Client, Some(c), Some(s));
        assert_eq!(ends.other_end(key(1, 5)), None);
        ends.note(key(2, 9), Role::Server, Some(s), Some(c));
        assert_eq!(ends.other_end(key(1, 5)), Some(key(2, 9)));
        assert_eq!(ends.other_end(key(2, 9)), Some(key(1, 5)));
        ends.forget_process(2);
        assert_eq!(ends.other_end(key(1, 5)), None);
        // Unknown addresses are not noted.
        ends.note(key(3, 1), Role::Client, None, Some(s));
        assert_eq!(ends.len(), 1);
    }
}
