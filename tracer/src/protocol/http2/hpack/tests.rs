//! RFC 7541 Appendix C examples, plus the unknown-table mode.

use super::*;

fn hex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
    digits
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}

fn decode_ok(d: &mut Decoder, block: &[u8]) -> HeaderBlock {
    let mut out = HeaderBlock::default();
    d.decode(block, false, &mut out).unwrap();
    out
}

fn pairs(b: &HeaderBlock) -> Vec<(&str, &str)> {
    b.fields
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect()
}

/// A decoder of a fresh connection whose table size the peer set to 256, as in C.5/C.6.
fn decoder_256() -> Decoder {
    let mut d = Decoder::new(true);
    // Size update to 256: 001 11111, then 256 - 31 = 225 = 0xe1 0x01.
    assert!(decode_ok(&mut d, &[0x3f, 0xe1, 0x01]).fields.is_empty());
    d
}

#[test]
fn c1_integers() {
    assert_eq!(integer(&[0x0a], 0, 5), Ok((10, 1)));
    assert_eq!(integer(&[0x1f, 0x9a, 0x0a], 0, 5), Ok((1337, 3)));
    assert_eq!(integer(&[0x2a], 0, 8), Ok((42, 1)));
    assert_eq!(integer(&[0x1f, 0x9a], 0, 5), Err(HpackError::Truncated));
    assert_eq!(
        integer(&[0x1f, 0xff, 0xff, 0xff, 0xff, 0x0f], 0, 5),
        Err(HpackError::IntegerOverflow)
    );
    assert_eq!(
        integer(&[0x1f, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00], 0, 5),
        Err(HpackError::IntegerOverflow)
    );
    assert_eq!(
        integer(&[0x7f, 0x80, 0xff, 0xff, 0xff, 0x0f], 0, 7),
        Ok((u32::MAX, 6))
    );
}

#[test]
fn c2_field_representations() {
    let mut d = Decoder::new(true);
    let b = decode_ok(
        &mut d,
        &hex("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572"),
    );
    assert_eq!(pairs(&b), [("custom-key", "custom-header")]);
    assert_eq!((d.table().len(), d.table().size()), (1, 55));

    let mut d = Decoder::new(true);
    let b = decode_ok(&mut d, &hex("040c 2f73 616d 706c 652f 7061 7468"));
    assert_eq!(pairs(&b), [(":path", "/sample/path")]);
    assert_eq!(d.table().len(), 0);

    let b = decode_ok(&mut d, &hex("1008 7061 7373 776f 7264 0673 6563 7265 74"));
    assert_eq!(pairs(&b), [("password", "secret")]);
    assert_eq!(d.table().len(), 0);

    let b = decode_ok(&mut d, &[0x82]);
    assert_eq!(pairs(&b), [(":method", "GET")]);
}

fn request_sequence(blocks: [&str; 3]) {
    let mut d = Decoder::new(true);
    let b = decode_ok(&mut d, &hex(blocks[0]));
    assert_eq!(
        pairs(&b),
        [
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/"),
            (":authority", "www.example.com"),
        ]
    );
    assert_eq!((d.table().len(), d.table().size()), (1, 57));
    let b = decode_ok(&mut d, &hex(blocks[1]));
    assert_eq!(
        pairs(&b),
        [
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/"),
            (":authority", "www.example.com"),
            ("cache-control", "no-cache"),
        ]
    );
    assert_eq!((d.table().len(), d.table().size()), (2, 110));
    let b = decode_ok(&mut d, &hex(blocks[2]));
    assert_eq!(
        pairs(&b),
        [
            (":method", "GET"),
            (":scheme", "https"),
            (":path", "/index.html"),
            (":authority", "www.example.com"),
            ("custom-key", "custom-value"),
        ]
    );
    assert_eq!((d.table().len(), d.table().size()), (3, 164));
    assert!(!b.partial);
}

#[test]
fn c3_requests_without_huffman() {
    request_sequence([
        "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
        "8286 84be 5808 6e6f 2d63 6163 6865",
        "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
    ]);
}

#[test]
fn c4_requests_with_huffman() {
    request_sequence([
        "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
        "8286 84be 5886 a8eb 1064 9cbf",
        "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
    ]);
}

const DATE1: &str = "Mon, 21 Oct 2013 20:13:21 GMT";
const DATE2: &str = "Mon, 21 Oct 2013 20:13:22 GMT";
const LOC: &str = "https://www.example.com";

fn response_sequence(blocks: [&str; 3]) {
    let mut d = decoder_256();
    let b = decode_ok(&mut d, &hex(blocks[0]));
    assert_eq!(
        pairs(&b),
        [
            (":status", "302"),
            ("cache-control", "private"),
            ("date", DATE1),
            ("location", LOC),
        ]
    );
    assert_eq!((d.table().len(), d.table().size()), (4, 222));
    let b = decode_ok(&mut d, &hex(blocks[1]));
    assert_eq!(
        pairs(&b),
        [
            (":status", "307"),
            ("cache-control", "private"),
            ("date", DATE1),
            ("location", LOC),
        ]
    );
    assert_eq!((d.table().len(), d.table().size()), (4, 222));
    let b = decode_ok(&mut d, &hex(blocks[2]));
    // The set-cookie value is a secret: replaced, though the table size counts the real one.
    assert_eq!(
        pairs(&b),
        [
            (":status", "200"),
            ("cache-control", "private"),
            ("date", DATE2),
            ("location", LOC),
            ("content-encoding", "gzip"),
            ("set-cookie", REDACTED),
        ]
    );
    assert_eq!((d.table().len(), d.table().size()), (3, 215));
    // Index 62 is the set-cookie entry: still redacted when referred to.
    assert_eq!(
        pairs(&decode_ok(&mut d, &[0xbe])),
        [("set-cookie", REDACTED)]
    );
    assert_eq!(pairs(&decode_ok(&mut d, &[0xc0])), [("date", DATE2)]);
    // Index 65 is past the end of a table we know completely.
    let mut out = HeaderBlock::default();
    assert_eq!(
        d.decode(&[0xc1], false, &mut out),
        Err(HpackError::BadIndex)
    );
}

#[test]
fn c5_responses_without_huffman() {
    response_sequence([
        "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
        "4803 3330 37c1 c0bf",
        "88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d 54c0 5a04 677a 6970 7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049 5541 5851 5745 4f49 553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e 3d31",
    ]);
}

#[test]
fn c6_responses_with_huffman() {
    response_sequence([
        "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6 2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
        "4883 640e ffc1 c0bf",
        "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab 77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f 9587 3160 65c0 03ed 4ee5 b106 3d50 07",
    ]);
}

/// Literal with incremental indexing and a literal name.
fn lit_indexed(name: &str, value: &str) -> Vec<u8> {
    let mut v = vec![0x40, name.len() as u8];
    v.extend_from_slice(name.as_bytes());
    v.push(value.len() as u8);
    v.extend_from_slice(value.as_bytes());
    v
}

#[test]
fn unknown_table_resolves_only_what_it_saw_inserted() {
    let mut d = Decoder::new(false);
    // Static references and literals decode; dynamic index 62 is unknown.
    let mut block = vec![0x82, 0x84, 0xbe];
    block.extend(lit_indexed("x-a", "1"));
    let b = decode_ok(&mut d, &block);
    assert_eq!(
        pairs(&b),
        [(":method", "GET"), (":path", "/"), ("x-a", "1")]
    );
    assert_eq!(b.unknown_fields, 1);
    assert!(b.partial);

    // x-a is now index 62; an older unknown entry at 63 stays unknown.
    let mut block = vec![0xbe, 0xbf];
    block.extend(lit_indexed("x-b", "2"));
    block.extend([0xbe, 0xbf, 0xc0]);
    let b = decode_ok(&mut d, &block);
    assert_eq!(
        pairs(&b),
        [("x-a", "1"), ("x-b", "2"), ("x-b", "2"), ("x-a", "1")]
    );
    assert_eq!(b.unknown_fields, 2);
    assert!(!d.table_known());

    // A literal whose name refers to an unknown entry is left out, and still takes index 62.
    let b = decode_ok(&mut d, &[0x7f, 0x01, 0x01, b'v', 0xbe, 0xbf, 0xc0]);
    assert_eq!(pairs(&b), [("x-b", "2"), ("x-a", "1")]);
    assert_eq!(b.unknown_fields, 2);
}

#[test]
fn size_update_proves_the_unknown_tail_gone() {
    let mut d = Decoder::new(false);
    // Size update to 0 empties the table, then to 4096.
    let mut block = vec![0x20, 0x3f, 0xe1, 0x1f];
    block.extend(lit_indexed("x-a", "1"));
    let b = decode_ok(&mut d, &block);
    assert_eq!(pairs(&b), [("x-a", "1")]);
    assert!(d.table_known());
    let mut out = HeaderBlock::default();
    assert_eq!(
        d.decode(&[0xbf], false, &mut out),
        Err(HpackError::BadIndex)
    );

    // A small maximum that our own entries fill also proves it.
    let mut d = Decoder::new(false);
    let b = decode_ok(&mut d, &lit_indexed("x-a", "1"));
    assert!(!b.partial && !d.table_known());
    // Max 50: x-a (36 bytes) leaves no room for another entry (>= 32).
    let b = decode_ok(&mut d, &[0x3f, 0x13, 0xbe]);
    assert_eq!(pairs(&b), [("x-a", "1")]);
    assert!(d.table_known());
    // Max 4096 with one 36-byte entry: older ones may still be there.
    let mut d = Decoder::new(false);
    decode_ok(&mut d, &lit_indexed("x-a", "1"));
    decode_ok(&mut d, &[0x3f, 0xe1, 0x1f]);
    assert!(!d.table_known());
}

#[test]
fn truncated_block_keeps_whole_fields_and_forgets_the_table() {
    let mut d = Decoder::new(true);
    let mut block = lit_indexed("x-a", "1");
    block.extend(lit_indexed("x-long", "abcdef"));
    let cut = block.len() - 3;
    let mut out = HeaderBlock::default();
    d.decode(&block[..cut], true, &mut out).unwrap();
    assert_eq!(pairs(&out), [("x-a", "1")]);
    assert!(out.partial);
    assert!(!d.table_known());
    // x-a was inserted before the cut, but what came after may have inserted more.
    let b = decode_ok(&mut d, &[0xbe]);
    assert_eq!(b.unknown_fields, 1);
    // Without the truncated flag, the same bytes are an error.
    let mut d = Decoder::new(true);
    let mut out = HeaderBlock::default();
    assert_eq!(
        d.decode(&block[..cut], false, &mut out),
        Err(HpackError::Truncated)
    );
    assert_eq!(pairs(&out), [("x-a", "1")]);
}

#[test]
fn size_update_rules() {
    let mut d = Decoder::new(true);
    let mut out = HeaderBlock::default();
    assert_eq!(
        d.decode(&[0x82, 0x20], false, &mut out),
        Err(HpackError::LateSizeUpdate)
    );
    let mut d = Decoder::new(true);
    // 4097 is above the initial SETTINGS_HEADER_TABLE_SIZE.
    let mut out = HeaderBlock::default();
    assert_eq!(
        d.decode(&[0x3f, 0xe2, 0x1f], false, &mut out),
        Err(HpackError::SizeUpdateTooLarge)
    );
    let mut d = Decoder::new(true);
    d.settings_table_size(8192);
    decode_ok(&mut d, &[0x3f, 0xe2, 0x1f]);
    d.settings_acked();
    decode_ok(&mut d, &[0x3f, 0xe1, 0x3f]);
    d.settings_table_size(100);
    // Until the ack, the old limit still holds.
    decode_ok(&mut d, &[0x3f, 0xe1, 0x3f]);
    d.settings_acked();
    let mut out = HeaderBlock::default();
    assert_eq!(
        d.decode(&[0x3f, 0xe1, 0x3f], false, &mut out),
        Err(HpackError::SizeUpdateTooLarge)
    );
}

#[test]
fn secrets_are_redacted_in_every_representation() {
    let mut d = Decoder::new(true);
    // authorization by static name index 23, with indexing.
    let mut block = vec![0x57, 0x06];
    block.extend_from_slice(b"Bearer");
    // cookie, literal name, never indexed.
    block.extend([0x10, 0x06]);
    block.extend_from_slice(b"Cookie");
    block.extend([0x03]);
    block.extend_from_slice(b"a=b");
    // x-api-key, literal name, Huffman value, without indexing.
    let value = huffman::encode(b"sk-123");
    block.extend([0x00, 0x09]);
    block.extend_from_slice(b"x-api-key");
    block.push(0x80 | value.len() as u8);
    block.extend(value);
    let b = decode_ok(&mut d, &block);
    assert_eq!(
        pairs(&b),
        [
            ("authorization", REDACTED),
            ("Cookie", REDACTED),
            ("x-api-key", REDACTED)
        ]
    );
    assert_eq!(
        pairs(&decode_ok(&mut d, &[0xbe])),
        [("authorization", REDACTED)]
    );
    // Static entries 23 and 55 (authorization, set-cookie with empty values).
    assert_eq!(
        pairs(&decode_ok(&mut d, &[0x97, 0xb7])),
        [("authorization", REDACTED), ("set-cookie", REDACTED)]
    );
    // The entry's size is that of the real value.
    assert_eq!(d.table().size(), 13 + 6 + 32);
}

#[test]
fn garbage_never_panics() {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for round in 0..20_000 {
        let len = round % 40;
        let block: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        for fresh in [true, false] {
            let mut d = Decoder::new(fresh);
            let mut out = HeaderBlock::default();
            let _ = d.decode(&block, round % 3 == 0, &mut out);
            let _ = d.decode(&block, false, &mut out);
        }
    }
    for b in 0..=255u8 {
        for tail in [
            &[][..],
            &[0xff][..],
            &[0x80][..],
            &[0xff, 0xff, 0xff, 0xff, 0xff][..],
        ] {
            let mut block = vec![b];
            block.extend_from_slice(tail);
            let mut d = Decoder::new(true);
            let _ = d.decode(&block, false, &mut HeaderBlock::default());
        }
    }
}
