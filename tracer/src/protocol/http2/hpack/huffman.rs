//! Huffman decoding of HPACK string literals (RFC 7541 §5.2, Appendix B).
//!
//! The code is canonical (within one bit length, codes rise with the symbol value; a test
//! checks it), so a symbol is found from the bits read so far with three small tables per
//! length instead of a tree.

use super::{HpackError, tables::HUFFMAN_CODES};

const EOS: u16 = 256;
const MAX_BITS: usize = 30;

struct Canonical {
    /// First (smallest) code of each length.
    first: [u32; MAX_BITS + 1],
    /// Number of codes of each length.
    count: [u32; MAX_BITS + 1],
    /// Index in `symbols` of the first code of each length.
    offset: [u16; MAX_BITS + 1],
    /// Symbols ordered by (length, code).
    symbols: [u16; 257],
}

const fn build() -> Canonical {
    let mut c = Canonical {
        first: [0; MAX_BITS + 1],
        count: [0; MAX_BITS + 1],
        offset: [0; MAX_BITS + 1],
        symbols: [0; 257],
    };
    let mut k = 0;
    let mut len = 1;
    while len <= MAX_BITS {
        c.offset[len] = k as u16;
        let mut s = 0;
        while s < HUFFMAN_CODES.len() {
            let (code, bits) = HUFFMAN_CODES[s];
            if bits as usize == len {
                if c.count[len] == 0 {
                    c.first[len] = code;
                }
                c.count[len] += 1;
                c.symbols[k] = s as u16;
                k += 1;
            }
            s += 1;
        }
        len += 1;
    }
    c
}

static CANONICAL: Canonical = build();

/// Appends the decoded octets of `input` to `out`.
pub(super) fn decode(input: &[u8], out: &mut Vec<u8>) -> Result<(), HpackError> {
    let c = &CANONICAL;
    let mut code: u32 = 0;
    let mut len: usize = 0;
    for &byte in input {
        for shift in (0..8).rev() {
            code = (code << 1) | u32::from((byte >> shift) & 1);
            len += 1;
            let (Some(&first), Some(&count), Some(&offset)) =
                (c.first.get(len), c.count.get(len), c.offset.get(len))
            else {
                // Every 30-bit sequence is a code, so this only guards the table's shape.
                return Err(HpackError::BadHuffman);
            };
            let rank = code.wrapping_sub(first);
            if count == 0 || code < first || rank >= count {
                continue;
            }
            let sym = usize::from(offset)
                .checked_add(rank as usize)
                .and_then(|i| c.symbols.get(i))
                .copied()
                .ok_or(HpackError::BadHuffman)?;
            if sym == EOS {
                return Err(HpackError::BadHuffman);
            }
            out.push(sym as u8);
            code = 0;
            len = 0;
        }
    }
    // Padding is the most significant bits of EOS (all ones), shorter than a byte.
    if len > 7 || code != (1u32 << len) - 1 {
        return Err(HpackError::BadHuffman);
    }
    Ok(())
}

/// Huffman-encodes `input` (for tests, which build blocks by hand).
#[cfg(test)]
pub(crate) fn encode(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut acc: u64 = 0;
    let mut bits = 0u32;
    for &b in input {
        let (code, len) = HUFFMAN_CODES[usize::from(b)];
        acc = (acc << len) | u64::from(code);
        bits += u32::from(len);
        while bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    if bits > 0 {
        let pad = 8 - bits;
        out.push(((acc << pad) | ((1 << pad) - 1)) as u8);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_is_canonical() {
        let mut order: Vec<usize> = (0..HUFFMAN_CODES.len()).collect();
        order.sort_by_key(|&s| (HUFFMAN_CODES[s].1, s));
        let mut code = 0u32;
        let mut prev_len = HUFFMAN_CODES[order[0]].1;
        for (i, &s) in order.iter().enumerate() {
            let (c, len) = HUFFMAN_CODES[s];
            if i > 0 {
                code = (code + 1) << (len - prev_len);
            }
            prev_len = len;
            assert_eq!(c, code, "symbol {s}");
        }
        assert_eq!(HUFFMAN_CODES[256], (0x3fff_ffff, 30));
    }

    #[test]
    fn every_symbol_round_trips() {
        let all: Vec<u8> = (0..=255).collect();
        let mut out = Vec::new();
        decode(&encode(&all), &mut out).unwrap();
        assert_eq!(out, all);
    }

    #[test]
    fn rfc_examples() {
        // RFC 7541 C.4.1: "www.example.com".
        let enc = [
            0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff,
        ];
        let mut out = Vec::new();
        decode(&enc, &mut out).unwrap();
        assert_eq!(out, b"www.example.com");
        assert_eq!(encode(b"www.example.com"), enc);
    }

    #[test]
    fn bad_padding_and_eos_are_errors() {
        let mut out = Vec::new();
        // 'a' is 00011 (5 bits); padding with zeros is not EOS.
        assert_eq!(decode(&[0x18], &mut out), Err(HpackError::BadHuffman));
        // A whole byte of padding is too long.
        assert_eq!(decode(&[0x1f, 0xff], &mut out), Err(HpackError::BadHuffman));
        // EOS itself (30 ones) inside a string.
        assert_eq!(
            decode(&[0xff, 0xff, 0xff, 0xff], &mut out),
            Err(HpackError::BadHuffman)
        );
        out.clear();
        assert_eq!(decode(&[0x1f], &mut out), Ok(()));
        assert_eq!(out, b"a");
    }
}
