//! HPACK header block decoding (RFC 7541), one decoder per direction, that stays correct when
//! the dynamic table is partly unknown (see `table.rs`).
//!
//! A block is decoded only once whole. A block we have only the start of (the rest lost in a
//! gap or over the size limit) is decoded as far as whole field representations go, and then
//! the table is forgotten, since the lost part may have inserted entries.

mod huffman;
mod table;
mod tables;
#[cfg(test)]
mod tests;

#[cfg(test)]
pub(super) use huffman::encode as huffman_encode;
use table::{DynamicTable, ENTRY_OVERHEAD, Lookup};
use tables::STATIC_TABLE;

use super::{HeaderBlock, REDACTED, SECRET_HEADERS};

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HpackError {
    #[error("index 0 or beyond the end of the table")]
    BadIndex,
    #[error("integer does not fit in 32 bits")]
    IntegerOverflow,
    #[error("block ends inside a field representation")]
    Truncated,
    #[error("invalid Huffman code or padding")]
    BadHuffman,
    #[error("dynamic table size update after a header field")]
    LateSizeUpdate,
    #[error("dynamic table size update above SETTINGS_HEADER_TABLE_SIZE")]
    SizeUpdateTooLarge,
}

/// Decoder for the header blocks of one direction.
#[derive(Debug, Clone)]
pub(super) struct Decoder {
    table: DynamicTable,
    /// SETTINGS_HEADER_TABLE_SIZE acknowledged by the encoder, if known.
    allowed: Option<u32>,
    /// A SETTINGS_HEADER_TABLE_SIZE the decoding peer sent that is not yet acknowledged.
    pending: Option<u32>,
}

impl Decoder {
    pub(super) fn new(fresh: bool) -> Self {
        if fresh {
            Self {
                table: DynamicTable::fresh(),
                allowed: Some(table::INITIAL_MAX_SIZE as u32),
                pending: None,
            }
        } else {
            Self {
                table: DynamicTable::unknown(),
                allowed: None,
                pending: None,
            }
        }
    }

    /// The peer that decodes this direction announced SETTINGS_HEADER_TABLE_SIZE.
    pub(super) fn settings_table_size(&mut self, size: u32) {
        self.pending = Some(size);
    }

    /// This direction's sender acknowledged the peer's SETTINGS.
    pub(super) fn settings_acked(&mut self) {
        if let Some(p) = self.pending.take() {
            self.allowed = Some(p);
        }
    }

    /// Insertions were missed (a header block lost or broken).
    pub(super) fn forget(&mut self) {
        self.table.forget();
    }

    pub(super) fn table_known(&self) -> bool {
        self.table.tail_is_known_empty()
    }

    #[cfg(test)]
    pub(in crate::protocol::http2::hpack) fn table(&self) -> &DynamicTable {
        &self.table
    }

    /// Decodes `block` into `out`. With `truncated`, `block` is only the start of the real
    /// block: decoding stops quietly at its end and the table is forgotten afterwards. On an
    /// error the fields before it are kept, `out` is partial and the table forgotten.
    pub(super) fn decode(
        &mut self,
        block: &[u8],
        truncated: bool,
        out: &mut HeaderBlock,
    ) -> Result<(), HpackError> {
        let result = self.decode_fields(block, out);
        let result = match result {
            Err(HpackError::Truncated) if truncated => Ok(()),
            r => r,
        };
        if truncated || result.is_err() {
            out.partial = true;
            self.table.forget();
        }
        result
    }

    fn decode_fields(&mut self, block: &[u8], out: &mut HeaderBlock) -> Result<(), HpackError> {
        let mut pos = 0;
        let mut seen_field = false;
        while let Some(&b) = block.get(pos) {
            if b & 0x80 != 0 {
                // Indexed header field (§6.1).
                let (index, next) = integer(block, pos, 7)?;
                pos = next;
                seen_field = true;
                match self.lookup(index)? {
                    // Dynamic entries hold redacted values already; static ones are empty,
                    // but a secret header always reads the same.
                    Lookup::Known(name, _) if is_secret(name) => out.push(name, REDACTED),
                    Lookup::Known(name, value) => out.push(name, value),
                    Lookup::Unknown => out.unknown(),
                    Lookup::Invalid => return Err(HpackError::BadIndex),
                }
            } else if b & 0xe0 == 0x20 {
                // Dynamic table size update (§6.3): only before the first field.
                let (size, next) = integer(block, pos, 5)?;
                pos = next;
                if seen_field {
                    return Err(HpackError::LateSizeUpdate);
                }
                let bound = match (self.allowed, self.pending) {
                    (Some(a), Some(p)) => Some(a.max(p)),
                    (a, p) => a.or(p),
                };
                if bound.is_some_and(|bound| size > bound) {
                    return Err(HpackError::SizeUpdateTooLarge);
                }
                self.table.set_max_size(size as usize);
            } else {
                // Literal with incremental indexing (§6.2.1, 01 + 6-bit index), or without
                // indexing / never indexed (§6.2.2-3, 0000 or 0001 + 4-bit index).
                let indexing = b & 0xc0 == 0x40;
                let (index, next) = integer(block, pos, if indexing { 6 } else { 4 })?;
                pos = next;
                seen_field = true;
                let name = if index == 0 {
                    let (name, next) = string(block, pos)?;
                    pos = next;
                    Name::Literal(name)
                } else {
                    match self.lookup(index)? {
                        Lookup::Known(name, _) => Name::Indexed(name.to_owned()),
                        Lookup::Unknown => Name::Unknown,
                        Lookup::Invalid => return Err(HpackError::BadIndex),
                    }
                };
                let (value, next) = string(block, pos)?;
                pos = next;
                let field = match name {
                    Name::Literal(n) => Some((lossy(&n), n.len())),
                    Name::Indexed(n) => {
                        let len = n.len();
                        Some((n, len))
                    }
                    Name::Unknown => None,
                };
                let value_len = value.len();
                let kept = field.map(|(name, name_len)| {
                    let value = if is_secret(&name) {
                        REDACTED.to_owned()
                    } else {
                        lossy(&value)
                    };
                    (name, value, name_len)
                });
                match &kept {
                    Some((n, v, _)) => out.push(n, v),
                    None => out.unknown(),
                }
                if indexing {
                    let name_len = kept.as_ref().map_or(0, |k| k.2);
                    let size = name_len + value_len + ENTRY_OVERHEAD;
                    self.table.insert(kept.map(|(n, v, _)| (n, v)), size);
                }
            }
        }
        Ok(())
    }

    /// `index` is the 1-based HPACK index over static then dynamic table.
    fn lookup(&self, index: u32) -> Result<Lookup<'_>, HpackError> {
        let index = index as usize;
        if index == 0 {
            return Err(HpackError::BadIndex);
        }
        if let Some(&(name, value)) = STATIC_TABLE.get(index - 1) {
            return Ok(Lookup::Known(name, value));
        }
        Ok(self.table.get(index - STATIC_TABLE.len()))
    }
}

enum Name {
    Literal(Vec<u8>),
    Indexed(String),
    Unknown,
}

pub(super) fn is_secret(name: &str) -> bool {
    SECRET_HEADERS.iter().any(|s| s.eq_ignore_ascii_case(name))
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Decodes an integer with an N-bit prefix (§5.1) starting at `pos`; returns it and the
/// position after it.
fn integer(buf: &[u8], pos: usize, prefix_bits: u8) -> Result<(u32, usize), HpackError> {
    let first = *buf.get(pos).ok_or(HpackError::Truncated)?;
    let max_prefix = (1u32 << prefix_bits) - 1;
    let mut value = u32::from(first) & max_prefix;
    if value < max_prefix {
        return Ok((value, pos + 1));
    }
    let mut shift = 0u32;
    let mut i = pos + 1;
    loop {
        let b = *buf.get(i).ok_or(HpackError::Truncated)?;
        i += 1;
        let add = u64::from(b & 0x7f) << shift;
        value = u32::try_from(u64::from(value) + add).map_err(|_| HpackError::IntegerOverflow)?;
        if b & 0x80 == 0 {
            return Ok((value, i));
        }
        shift += 7;
        // Five continuation bytes already carry 35 bits; more is padding or an attack.
        if shift > 28 {
            return Err(HpackError::IntegerOverflow);
        }
    }
}

/// Decodes a string literal (§5.2) starting at `pos`; returns its octets and the position
/// after it.
fn string(buf: &[u8], pos: usize) -> Result<(Vec<u8>, usize), HpackError> {
    let huffman = buf.get(pos).is_some_and(|b| b & 0x80 != 0);
    let (len, start) = integer(buf, pos, 7)?;
    // The length is checked against the bytes we hold before anything is allocated for it.
    let end = start
        .checked_add(len as usize)
        .filter(|&end| end <= buf.len())
        .ok_or(HpackError::Truncated)?;
    let raw = buf.get(start..end).ok_or(HpackError::Truncated)?;
    let octets = if huffman {
        let mut out = Vec::with_capacity(raw.len() + raw.len() / 2);
        huffman::decode(raw, &mut out)?;
        out
    } else {
        raw.to_vec()
    };
    Ok((octets, end))
}
