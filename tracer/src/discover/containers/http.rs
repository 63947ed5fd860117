//! Just enough HTTP/1.1 to ask a local API one question per connection: one GET, the
//! response read to its end (Content-Length, chunked, or until close). Pure parsing of the
//! response; the transport is the caller's.

/// Responses larger than this are refused (a pod list of a busy node is a few MiB).
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HttpError {
    #[error("malformed HTTP response: {0}")]
    Malformed(&'static str),
    #[error("HTTP status {status}: {body}")]
    Status { status: u16, body: String },
    #[error("response incomplete")]
    Incomplete,
    #[error("response larger than {MAX_RESPONSE_BYTES} bytes")]
    TooLarge,
}

/// The request bytes of a GET, with the connection closed after the answer.
pub fn get_request(host: &str, path: &str, bearer: Option<&str>) -> Vec<u8> {
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: application/json\r\nUser-Agent: difytrace\r\nConnection: close\r\n"
    );
    if let Some(token) = bearer {
        req.push_str("Authorization: Bearer ");
        req.push_str(token);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req.into_bytes()
}

/// The body of a complete response (`raw` holds everything read until the peer closed), or
/// why there is none. A non-2xx status is an error carrying the start of the body.
pub fn response_body(raw: &[u8]) -> Result<Vec<u8>, HttpError> {
    let head_end = find(raw, b"\r\n\r\n").ok_or(HttpError::Incomplete)?;
    let head = std::str::from_utf8(&raw[..head_end])
        .map_err(|_| HttpError::Malformed("head not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or(HttpError::Malformed("no status line"))?;
    let mut parts = status_line.split(' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(HttpError::Malformed("not HTTP/1.x"));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or(HttpError::Malformed("bad status code"))?;
    let mut content_length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(HttpError::Malformed("bad header line"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| HttpError::Malformed("bad Content-Length"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }
    let rest = &raw[head_end + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(len) = content_length {
        rest.get(..len).ok_or(HttpError::Incomplete)?.to_vec()
    } else {
        rest.to_vec()
    };
    if !(200..300).contains(&status) {
        let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
        return Err(HttpError::Status { status, body: text });
    }
    Ok(body)
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, HttpError> {
    let mut body = Vec::new();
    loop {
        let line_end = find(rest, b"\r\n").ok_or(HttpError::Incomplete)?;
        let size_text = std::str::from_utf8(&rest[..line_end])
            .map_err(|_| HttpError::Malformed("bad chunk size"))?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| HttpError::Malformed("bad chunk size"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        if body.len() + size > MAX_RESPONSE_BYTES {
            return Err(HttpError::TooLarge);
        }
        body.extend_from_slice(rest.get(..size).ok_or(HttpError::Incomplete)?);
        rest = rest.get(size + 2..).ok_or(HttpError::Incomplete)?;
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads a stream to its end, at most MAX_RESPONSE_BYTES. A TLS peer that closes without
/// close_notify ends the stream too (many servers do): the response's own framing, checked by
/// `response_body`, tells a cut-off answer from a complete one.
pub fn read_all(stream: &mut impl std::io::Read) -> std::io::Result<Vec<u8>> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(raw),
            Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(raw),
            Ok(n) => {
                raw.extend_from_slice(&buf[..n]);
                if raw.len() > MAX_RESPONSE_BYTES {
                    return Err(std::io::Error::other("response too large"));
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_chunked_and_close() {
        let raw =
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n[]";
        assert_eq!(response_body(raw).unwrap(), b"[]");
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n[{}\r\n1;x=y\r\n]\r\n0\r\n\r\n";
        assert_eq!(response_body(raw).unwrap(), b"[{}]");
        let raw = b"HTTP/1.0 200 OK\r\n\r\nuntil close";
        assert_eq!(response_body(raw).unwrap(), b"until close");
    }

    #[test]
    fn errors_are_typed() {
        let raw = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 9\r\n\r\nforbidden";
        assert_eq!(
            response_body(raw),
            Err(HttpError::Status {
                status: 403,
                body: "forbidden".into()
            })
        );
        assert_eq!(
            response_body(b"HTTP/1.1 200 OK\r\n"),
            Err(HttpError::Incomplete)
        );
        assert_eq!(
            response_body(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab"),
            Err(HttpError::Incomplete)
        );
        assert!(matches!(
            response_body(b"SSH-2.0\r\n\r\n"),
            Err(HttpError::Malformed(_))
        ));
        assert!(matches!(
            response_body(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
            Err(HttpError::Malformed(_))
        ));
        assert_eq!(
            response_body(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab"),
            Err(HttpError::Incomplete)
        );
    }

    #[test]
    fn request_shape() {
        let req =
            String::from_utf8(get_request("docker", "/containers/json", Some("t0k"))).unwrap();
        assert!(req.starts_with("GET /containers/json HTTP/1.1\r\nHost: docker\r\n"));
        assert!(req.contains("Authorization: Bearer t0k\r\n"));
        assert!(req.ends_with("\r\n\r\n"));
    }
}
