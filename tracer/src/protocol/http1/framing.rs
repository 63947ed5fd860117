//! Where a message body ends: the framing headers of a head and the chunk-size lines of a
//! chunked body.

use super::{
    Http1Error,
    head::{header_lines, parse_header_line, strip_eol, trim_ows},
};

/// The headers that decide where a message ends. Read from the raw head rather than the kept
/// headers, so dropping headers for space never changes framing.
#[derive(Debug, Default)]
pub(super) struct Framing {
    pub(super) content_length: Option<u64>,
    pub(super) content_length_error: Option<Http1Error>,
    pub(super) has_te: bool,
    pub(super) chunked_last: bool,
    pub(super) upgrade: bool,
}

impl Framing {
    pub(super) fn from_headers(head: &[u8], start_line_end: usize) -> Self {
        let mut f = Framing::default();
        for line in header_lines(head, start_line_end) {
            let Ok((name, value)) = parse_header_line(line) else {
                continue;
            };
            if name.eq_ignore_ascii_case(b"content-length") {
                f.add_content_length(value);
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                f.has_te = true;
                // The last coding named, across repeated headers, is the one that delimits.
                for coding in value.split(|&b| b == b',') {
                    let coding = coding.split(|&b| b == b';').next().unwrap_or_default();
                    let coding = trim_ows(coding);
                    if !coding.is_empty() {
                        f.chunked_last = coding.eq_ignore_ascii_case(b"chunked");
                    }
                }
            } else if name.eq_ignore_ascii_case(b"upgrade") {
                f.upgrade = true;
            }
        }
        f
    }

    /// Repeated or comma-listed identical values are one length (RFC 9112 §6.3 item 5);
    /// differing ones are an error, since a guess could desynchronise the stream.
    fn add_content_length(&mut self, value: &[u8]) {
        if self.content_length_error.is_some() {
            return;
        }
        for item in value.split(|&b| b == b',') {
            let item = trim_ows(item);
            let Some(n) = parse_decimal(item) else {
                self.content_length_error = Some(Http1Error::BadContentLength);
                return;
            };
            match self.content_length {
                Some(old) if old != n => {
                    self.content_length_error = Some(Http1Error::ConflictingContentLength);
                    return;
                }
                _ => self.content_length = Some(n),
            }
        }
    }
}

fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &b| {
        if !b.is_ascii_digit() {
            return None;
        }
        acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

/// `size [; extensions] CRLF`, size in hex.
pub(super) fn parse_chunk_size(line: &[u8]) -> Result<u64, Http1Error> {
    let line = strip_eol(line);
    let digits_end = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    let digits = line.get(..digits_end).unwrap_or_default();
    let tail = trim_ows(line.get(digits_end..).unwrap_or_default());
    // Only whitespace, then optionally extensions (not interpreted), may follow the size.
    if digits.is_empty() || !(tail.is_empty() || tail.starts_with(b";")) {
        return Err(Http1Error::BadChunkSize);
    }
    digits.iter().try_fold(0u64, |acc, &b| {
        let d = char::from(b).to_digit(16).ok_or(Http1Error::BadChunkSize)?;
        acc.checked_mul(16)
            .and_then(|v| v.checked_add(u64::from(d)))
            .ok_or(Http1Error::BadChunkSize)
    })
}
