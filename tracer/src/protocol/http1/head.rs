//! The message head: the start line, recognised byte by byte while it arrives and parsed once
//! whole, and the header lines after it.

use super::{
    ChunkTs, Http1Error, Http1Message, MAX_HEADER_BYTES, MAX_HEADERS, MAX_METHOD_LEN, Side,
    StartLine,
};

const VERSION_PREFIX: &[u8; 7] = b"HTTP/1.";

/// Incremental recogniser of one start line. It runs byte by byte so that a stream that is not
/// HTTP is rejected at its first wrong byte, whatever the chunking, and so that resync does not
/// buffer long lines that cannot be a start line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LineScan {
    /// Request: bytes of the method seen.
    Method(u8),
    Target {
        seen: bool,
    },
    /// Request: bytes of `HTTP/1.` matched; at 7 the minor digit is due.
    ReqVersion(u8),
    ReqEnd,
    /// Response: bytes of `HTTP/1.` matched; at 7 the minor digit is due.
    RespVersion(u8),
    RespSp,
    /// Response: status digits seen.
    Status(u8),
    Reason,
    Cr,
    Done,
}

impl LineScan {
    pub(super) fn new(side: Side) -> Self {
        match side {
            Side::Request => LineScan::Method(0),
            Side::Response => LineScan::RespVersion(0),
        }
    }

    /// The next state, or `None` if `b` cannot continue a start line.
    pub(super) fn step(self, b: u8) -> Option<Self> {
        use LineScan::*;
        let line_end = |b: u8| match b {
            b'\r' => Some(Cr),
            b'\n' => Some(Done),
            _ => None,
        };
        match self {
            Method(n) => {
                if b == b' ' && n > 0 {
                    Some(Target { seen: false })
                } else if usize::from(n) < MAX_METHOD_LEN
                    && (b.is_ascii_uppercase()
                        || (n > 0 && (b.is_ascii_digit() || b == b'-' || b == b'_')))
                {
                    Some(Method(n.saturating_add(1)))
                } else {
                    None
                }
            }
            Target { seen } => {
                if b == b' ' && seen {
                    Some(ReqVersion(0))
                } else if b > b' ' && b != 0x7f {
                    Some(Target { seen: true })
                } else {
                    None
                }
            }
            ReqVersion(i) => match VERSION_PREFIX.get(usize::from(i)) {
                Some(&want) => (b == want).then_some(ReqVersion(i.saturating_add(1))),
                None => b.is_ascii_digit().then_some(ReqEnd),
            },
            ReqEnd => line_end(b),
            RespVersion(i) => match VERSION_PREFIX.get(usize::from(i)) {
                Some(&want) => (b == want).then_some(RespVersion(i.saturating_add(1))),
                None => b.is_ascii_digit().then_some(RespSp),
            },
            RespSp => (b == b' ').then_some(Status(0)),
            Status(0) => (b'1'..=b'9').contains(&b).then_some(Status(1)),
            Status(n @ (1 | 2)) => b.is_ascii_digit().then_some(Status(n.saturating_add(1))),
            Status(_) => match b {
                b' ' => Some(Reason),
                _ => line_end(b),
            },
            Reason => match b {
                b'\r' | b'\n' => line_end(b),
                b'\t' => Some(Reason),
                _ if b < b' ' || b == 0x7f => None,
                _ => Some(Reason),
            },
            Cr => (b == b'\n').then_some(Done),
            Done => None,
        }
    }
}

/// Strips a trailing LF and then a trailing CR.
pub(super) fn strip_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

pub(super) fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', tail @ ..] = v {
        v = tail;
    }
    while let [head @ .., b' ' | b'\t'] = v {
        v = head;
    }
    v
}

/// RFC 9110 token characters.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn parse_minor(version: &[u8]) -> Option<u8> {
    match version {
        [b'H', b'T', b'T', b'P', b'/', b'1', b'.', d] if d.is_ascii_digit() => Some(d - b'0'),
        _ => None,
    }
}

/// Parses a start line (line end optional) into its parts and the HTTP/1 minor version.
pub(super) fn parse_start_line(line: &[u8]) -> Result<(StartLine, u8), Http1Error> {
    let line = strip_eol(line);
    let mut parts = line.splitn(3, |&b| b == b' ');
    let first = parts.next().unwrap_or_default();
    let second = parts.next().ok_or(Http1Error::BadStartLine)?;
    let third = parts.next();
    if let Some(minor) = parse_minor(first) {
        let status = match second {
            [a, b, c] if [a, b, c].iter().all(|d| d.is_ascii_digit()) && *a != b'0' => {
                u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0')
            }
            _ => return Err(Http1Error::BadStartLine),
        };
        let reason = lossy(third.unwrap_or_default());
        return Ok((StartLine::Response { status, reason }, minor));
    }
    let minor = third
        .and_then(parse_minor)
        .ok_or(Http1Error::BadStartLine)?;
    let method_ok = !first.is_empty()
        && first.len() <= MAX_METHOD_LEN
        && first
            .iter()
            .all(|&b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !method_ok || second.is_empty() || second.iter().any(|&b| b <= b' ' || b == 0x7f) {
        return Err(Http1Error::BadStartLine);
    }
    Ok((
        StartLine::Request {
            method: lossy(first),
            target: lossy(second),
        },
        minor,
    ))
}

/// Splits `name: value`, trimming optional whitespace around the value.
pub(super) fn parse_header_line(line: &[u8]) -> Result<(&[u8], &[u8]), Http1Error> {
    let colon = line
        .iter()
        .position(|&b| b == b':')
        .ok_or(Http1Error::BadHeader)?;
    let name = line.get(..colon).unwrap_or_default();
    let value = line.get(colon + 1..).unwrap_or_default();
    // Whitespace before the colon (and so obs-fold lines) is rejected, as RFC 9112 §5.1 asks.
    if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
        return Err(Http1Error::BadHeader);
    }
    Ok((name, trim_ows(value)))
}

/// Header lines of `head` after its start line, up to the blank line or the end.
pub(super) fn header_lines(head: &[u8], start_line_end: usize) -> impl Iterator<Item = &[u8]> {
    head.get(start_line_end..)
        .unwrap_or_default()
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .take_while(|l| !l.is_empty())
}

/// Parses a head (or the complete lines of a truncated one) into a message without body.
pub(super) fn parse_head(head: &[u8], start_line_end: usize) -> Result<Http1Message, Http1Error> {
    let (start_line, minor_version) =
        parse_start_line(head.get(..start_line_end).unwrap_or_default())?;
    let mut headers = Vec::new();
    let mut kept_bytes = 0usize;
    let mut dropped_headers = 0u32;
    for line in header_lines(head, start_line_end) {
        let (name, value) = parse_header_line(line)?;
        let size = name.len() + value.len();
        if headers.len() < MAX_HEADERS && kept_bytes + size <= MAX_HEADER_BYTES {
            kept_bytes += size;
            headers.push((lossy(name), lossy(value)));
        } else {
            dropped_headers = dropped_headers.saturating_add(1);
        }
    }
    Ok(Http1Message {
        start_line,
        minor_version,
        headers,
        dropped_headers,
        body_len: 0,
        body_prefix: Vec::new(),
        first: ChunkTs::default(),
        last: ChunkTs::default(),
        head_truncated: false,
        body_incomplete: false,
        genai: None,
    })
}
