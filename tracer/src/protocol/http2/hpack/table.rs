//! The HPACK dynamic table as far as we know it.
//!
//! The table is modelled as the entries inserted since we started watching (`entries`, newest
//! first, so dynamic index 1 is `entries[0]`), followed by a tail of older entries that may be
//! unknown. Lookups are correct without knowing the tail or the table's maximum size:
//!
//! - The real table is always the `k` most recent insertions for some `k` (insertion adds at
//!   the front; eviction, a smaller size limit and an oversized entry all remove from the old
//!   end or empty it). So the real table is a prefix of "our entries, then the tail".
//! - A valid reference to dynamic index `i <= k` therefore finds `entries[i - 1]` when
//!   `i <= entries.len()`, whatever happened to the tail; anything further back is a tail
//!   entry we never saw, and is reported as unknown rather than guessed.
//! - Keeping an entry the peer already evicted is harmless (a valid block never refers to it);
//!   dropping one the peer still has only makes a later reference unknown. So our own eviction
//!   serves memory and error detection, not correctness.
//!
//! What breaks the model is an insertion we did not see (a lost or undecodable part of a block):
//! every entry we know then sits at an unknown offset, so they all join the tail
//! ([`DynamicTable::forget`]). The tail becomes known to be empty again only by proof: when the
//! maximum size is known and our own entries alone leave no room for even one more 32-byte
//! entry, the peer must have evicted the whole tail.

use std::collections::VecDeque;

use crate::protocol::http2::MAX_DYNAMIC_TABLE_BYTES;

/// RFC 7541 §4.1: an entry's size is its name and value lengths plus 32.
pub(super) const ENTRY_OVERHEAD: usize = 32;
/// The table size both peers start with (RFC 9113 §6.5.2).
pub(super) const INITIAL_MAX_SIZE: usize = 4096;
/// Longest entry whose contents we store; a longer one is kept as a placeholder of the right
/// size, and references to it are unknown.
const MAX_STORED_ENTRY: usize = 8 * 1024;

#[derive(Debug, Clone)]
struct Entry {
    /// `None` when the name was itself an unknown reference or the entry was too long to keep.
    field: Option<(String, String)>,
    /// RFC 7541 size; a lower bound when the name was unknown.
    size: usize,
}

/// Result of looking up a dynamic index.
pub(super) enum Lookup<'a> {
    Known(&'a str, &'a str),
    /// An entry we never saw (or did not keep).
    Unknown,
    /// Beyond the end of a table we know completely: the block is broken.
    Invalid,
}

#[derive(Debug, Clone)]
pub(super) struct DynamicTable {
    entries: VecDeque<Entry>,
    /// Sum of `entries` sizes (a lower bound if some sizes are).
    bytes: usize,
    /// Nothing older than `entries` is left in the peer's table.
    tail_empty: bool,
    /// The table's current maximum size, if known.
    max_size: Option<usize>,
}

impl DynamicTable {
    /// The table of a connection watched from its start.
    pub(super) fn fresh() -> Self {
        Self {
            entries: VecDeque::new(),
            bytes: 0,
            tail_empty: true,
            max_size: Some(INITIAL_MAX_SIZE),
        }
    }

    /// The table of a connection joined in the middle.
    pub(super) fn unknown() -> Self {
        Self {
            entries: VecDeque::new(),
            bytes: 0,
            tail_empty: false,
            max_size: None,
        }
    }

    /// `index` is 1-based within the dynamic table (HPACK index minus 61).
    pub(super) fn get(&self, index: usize) -> Lookup<'_> {
        match index.checked_sub(1).and_then(|i| self.entries.get(i)) {
            Some(Entry {
                field: Some((n, v)),
                ..
            }) => Lookup::Known(n, v),
            Some(Entry { field: None, .. }) => Lookup::Unknown,
            None if self.tail_empty => Lookup::Invalid,
            None => Lookup::Unknown,
        }
    }

    /// Adds an entry (RFC 7541 §4.4); `field` is `None` when its name is unknown, and then
    /// `size` is a lower bound.
    pub(super) fn insert(&mut self, field: Option<(String, String)>, size: usize) {
        if let Some(max) = self.max_size {
            if size > max {
                // An entry larger than the table empties it and is not added.
                self.clear_known_empty();
                return;
            }
            self.note_room(max, size);
            while self.bytes + size > max {
                self.pop_oldest();
            }
        }
        let field = field.filter(|_| size <= MAX_STORED_ENTRY);
        self.entries.push_front(Entry { field, size });
        self.bytes = self.bytes.saturating_add(size);
        while self.bytes > MAX_DYNAMIC_TABLE_BYTES {
            self.pop_oldest();
            // What we drop for memory is still in the peer's table, at indices we now
            // cannot resolve.
            self.tail_empty = false;
        }
    }

    /// A dynamic table size update (RFC 7541 §6.3).
    pub(super) fn set_max_size(&mut self, max: usize) {
        self.max_size = Some(max);
        self.note_room(max, 0);
        while self.bytes > max {
            self.pop_oldest();
        }
    }

    /// Insertions were missed: nothing we know has a known index any more, and the maximum
    /// size may have changed too.
    pub(super) fn forget(&mut self) {
        *self = Self::unknown();
    }

    pub(super) fn tail_is_known_empty(&self) -> bool {
        self.tail_empty
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    #[cfg(test)]
    pub(super) fn size(&self) -> usize {
        self.bytes
    }

    /// With `incoming` bytes about to be added under maximum `max`: if our own entries leave
    /// no room for one more entry, no tail entry can survive the peer's eviction.
    fn note_room(&mut self, max: usize, incoming: usize) {
        if self.bytes + incoming + ENTRY_OVERHEAD > max {
            self.tail_empty = true;
        }
    }

    fn clear_known_empty(&mut self) {
        self.entries.clear();
        self.bytes = 0;
        self.tail_empty = true;
    }

    fn pop_oldest(&mut self) {
        match self.entries.pop_back() {
            Some(e) => self.bytes = self.bytes.saturating_sub(e.size),
            None => self.bytes = 0,
        }
    }
}
