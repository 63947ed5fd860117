//! Builders for HTTP/2 bytes: frames, and header blocks in chosen HPACK representations.

use super::super::hpack::huffman_encode;

// The frame layer's own constants: a test that builds frames speaks the same numbers.
pub(super) use super::super::frame::{
    ACK, CONTINUATION, DATA, END_HEADERS, END_STREAM, GOAWAY, HEADERS, PADDED, PING, PRIORITY,
    PRIORITY_FLAG, PUSH_PROMISE, RST_STREAM, SETTINGS, WINDOW_UPDATE,
};

pub(super) fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut v = vec![len[1], len[2], len[3], kind, flags];
    v.extend_from_slice(&stream.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

pub(super) fn headers(stream: u32, flags: u8, block: &[u8]) -> Vec<u8> {
    frame(HEADERS, flags, stream, block)
}

pub(super) fn data(stream: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
    frame(DATA, flags, stream, payload)
}

/// `payload` wrapped in padding: pad length byte, `prefix`, payload, `pad` zero bytes.
pub(super) fn padded(prefix: &[u8], payload: &[u8], pad: u8) -> Vec<u8> {
    let mut v = vec![pad];
    v.extend_from_slice(prefix);
    v.extend_from_slice(payload);
    v.extend(std::iter::repeat_n(0u8, usize::from(pad)));
    v
}

pub(super) fn settings(params: &[(u16, u32)]) -> Vec<u8> {
    let mut p = Vec::new();
    for (id, v) in params {
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(&v.to_be_bytes());
    }
    frame(SETTINGS, 0, 0, &p)
}

pub(super) fn settings_ack() -> Vec<u8> {
    frame(SETTINGS, ACK, 0, &[])
}

pub(super) fn rst(stream: u32, code: u32) -> Vec<u8> {
    frame(RST_STREAM, 0, stream, &code.to_be_bytes())
}

pub(super) fn goaway(last: u32, code: u32) -> Vec<u8> {
    let mut p = last.to_be_bytes().to_vec();
    p.extend_from_slice(&code.to_be_bytes());
    p.extend_from_slice(b"debug");
    frame(GOAWAY, 0, 0, &p)
}

pub(super) fn ping(ack: bool) -> Vec<u8> {
    frame(
        PING,
        if ack { ACK } else { 0 },
        0,
        &[1, 2, 3, 4, 5, 6, 7, 8],
    )
}

pub(super) fn window_update(stream: u32, inc: u32) -> Vec<u8> {
    frame(WINDOW_UPDATE, 0, stream, &inc.to_be_bytes())
}

pub(super) fn priority(stream: u32) -> Vec<u8> {
    frame(PRIORITY, 0, stream, &[0, 0, 0, 0, 15])
}

/// A gRPC length-prefixed message.
pub(super) fn grpc_msg(payload: &[u8]) -> Vec<u8> {
    let mut v = vec![0];
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// One HPACK representation.
#[derive(Clone, Copy)]
pub(super) enum F<'a> {
    /// Indexed field.
    Idx(u32),
    /// Literal with incremental indexing, literal name.
    Inc(&'a str, &'a str),
    /// Same, Huffman-coded strings.
    IncH(&'a str, &'a str),
    /// Literal with incremental indexing, indexed name.
    IncN(u32, &'a str),
    /// Literal without indexing, literal name.
    Lit(&'a str, &'a str),
    /// Literal without indexing, indexed name, Huffman value.
    LitNH(u32, &'a str),
    /// Literal never indexed, indexed name.
    Never(u32, &'a str),
    SizeUpdate(u32),
}

fn int(out: &mut Vec<u8>, first: u8, prefix_bits: u8, v: u32) {
    let max = (1u32 << prefix_bits) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    let mut rest = v - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

fn string(out: &mut Vec<u8>, s: &str, huffman: bool) {
    if huffman {
        let h = huffman_encode(s.as_bytes());
        int(out, 0x80, 7, h.len() as u32);
        out.extend(h);
    } else {
        int(out, 0, 7, s.len() as u32);
        out.extend_from_slice(s.as_bytes());
    }
}

pub(super) fn block(fields: &[F]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in fields {
        match *f {
            F::Idx(i) => int(&mut out, 0x80, 7, i),
            F::Inc(n, v) => {
                out.push(0x40);
                string(&mut out, n, false);
                string(&mut out, v, false);
            }
            F::IncH(n, v) => {
                out.push(0x40);
                string(&mut out, n, true);
                string(&mut out, v, true);
            }
            F::IncN(i, v) => {
                int(&mut out, 0x40, 6, i);
                string(&mut out, v, false);
            }
            F::Lit(n, v) => {
                out.push(0);
                string(&mut out, n, false);
                string(&mut out, v, false);
            }
            F::LitNH(i, v) => {
                int(&mut out, 0, 4, i);
                string(&mut out, v, true);
            }
            F::Never(i, v) => {
                int(&mut out, 0x10, 4, i);
                string(&mut out, v, false);
            }
            F::SizeUpdate(s) => int(&mut out, 0x20, 5, s),
        }
    }
    out
}

// Static table indices used below (RFC 7541 Appendix A).
pub(super) const METHOD_GET: u32 = 2;
pub(super) const METHOD_POST: u32 = 3;
pub(super) const PATH: u32 = 4;
pub(super) const SCHEME_HTTP: u32 = 6;
pub(super) const STATUS_200: u32 = 8;
pub(super) const AUTHORITY: u32 = 1;
pub(super) const AUTHORIZATION: u32 = 23;
pub(super) const CONTENT_TYPE: u32 = 31;
pub(super) const USER_AGENT: u32 = 58;
