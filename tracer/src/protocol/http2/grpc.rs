//! gRPC over HTTP/2: the request path, the status trailers and the length-prefixed messages
//! in DATA frames (see grpc/grpc `doc/PROTOCOL-HTTP2.md`).

/// Service and method of a gRPC `:path` "/pkg.Service/Method".
pub fn split_path(path: &str) -> Option<(&str, &str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    let valid = |s: &str| !s.is_empty() && !s.contains(['/', '?', '#']);
    (valid(service) && valid(method)).then_some((service, method))
}

/// `grpc-status`: a decimal code.
pub fn parse_status(v: &str) -> Option<u32> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

/// `grpc-message` is percent-encoded UTF-8; a malformed escape is kept as it is, as the spec
/// asks of receivers.
pub fn percent_decode(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let escaped = (b == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match escaped {
            Some(x) => {
                out.push(x);
                i += 3;
            }
            None => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `application/grpc`, optionally with `+codec` or parameters; not gRPC-Web, whose framing
/// differs.
pub fn is_grpc_content_type(v: &str) -> bool {
    let v = v.trim_start();
    let Some(rest) = v
        .get(..16)
        .filter(|p| p.eq_ignore_ascii_case("application/grpc"))
        .and_then(|_| v.get(16..))
    else {
        return false;
    };
    rest.is_empty() || rest.starts_with(['+', ';', ' '])
}

/// Follows the length-prefixed messages of one direction of one stream across DATA frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum MessageFramer {
    /// Bytes of the 5-byte prefix (flag and length) seen so far.
    Prefix {
        buf: [u8; 5],
        have: u8,
    },
    Payload {
        left: u64,
    },
    /// A gap hid a prefix: message borders are unknown from here on.
    Lost,
}

impl Default for MessageFramer {
    fn default() -> Self {
        MessageFramer::Prefix {
            buf: [0; 5],
            have: 0,
        }
    }
}

impl MessageFramer {
    /// Feeds DATA payload bytes; returns how many messages ended in them.
    pub(super) fn bytes(&mut self, mut data: &[u8]) -> u32 {
        let mut ended = 0u32;
        while !data.is_empty() {
            match self {
                MessageFramer::Prefix { buf, have } => {
                    let have_n = usize::from(*have);
                    let take = (5 - have_n).min(data.len());
                    if let (Some(dst), Some(src)) =
                        (buf.get_mut(have_n..have_n + take), data.get(..take))
                    {
                        dst.copy_from_slice(src);
                    }
                    data = data.get(take..).unwrap_or_default();
                    *have += take as u8;
                    if *have == 5 {
                        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
                        if len == 0 {
                            ended = ended.saturating_add(1);
                            *self = MessageFramer::default();
                        } else {
                            *self = MessageFramer::Payload {
                                left: u64::from(len),
                            };
                        }
                    }
                }
                MessageFramer::Payload { left } => {
                    let take = (*left).min(data.len() as u64);
                    *left -= take;
                    data = data.get(take as usize..).unwrap_or_default();
                    if *left == 0 {
                        ended = ended.saturating_add(1);
                        *self = MessageFramer::default();
                    }
                }
                MessageFramer::Lost => return ended,
            }
        }
        ended
    }

    /// `n` DATA payload bytes were lost; returns how many messages ended in them.
    pub(super) fn gap(&mut self, n: u64) -> u32 {
        match self {
            MessageFramer::Payload { left } if n < *left => {
                *left -= n;
                0
            }
            MessageFramer::Payload { left } if n == *left => {
                *self = MessageFramer::default();
                1
            }
            MessageFramer::Prefix { have: 0, .. } if n == 0 => 0,
            MessageFramer::Payload { .. } | MessageFramer::Prefix { .. } => {
                *self = MessageFramer::Lost;
                0
            }
            MessageFramer::Lost => 0,
        }
    }

    pub(super) fn is_lost(&self) -> bool {
        *self == MessageFramer::Lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(
            split_path("/helloworld.Greeter/SayHello"),
            Some(("helloworld.Greeter", "SayHello"))
        );
        assert_eq!(
            split_path("/grpc.health.v1.Health/Check"),
            Some(("grpc.health.v1.Health", "Check"))
        );
        for bad in ["", "/", "//M", "/S/", "S/M", "/S/M/x", "/S/M?x=1", "/S"] {
            assert_eq!(split_path(bad), None, "{bad}");
        }
    }

    #[test]
    fn statuses_and_messages() {
        assert_eq!(parse_status("0"), Some(0));
        assert_eq!(parse_status("14"), Some(14));
        assert_eq!(parse_status(""), None);
        assert_eq!(parse_status("-1"), None);
        assert_eq!(parse_status("99999999999"), None);
        assert_eq!(percent_decode("not%20found"), "not found");
        assert_eq!(percent_decode("%E2%82%AC 5%"), "€ 5%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("100%25"), "100%");
    }

    #[test]
    fn content_types() {
        assert!(is_grpc_content_type("application/grpc"));
        assert!(is_grpc_content_type("application/grpc+proto"));
        assert!(is_grpc_content_type("Application/GRPC; charset=utf-8"));
        assert!(!is_grpc_content_type("application/grpc-web"));
        assert!(!is_grpc_content_type("application/json"));
        assert!(!is_grpc_content_type("application/grp"));
    }

    #[test]
    fn messages_across_splits_and_gaps() {
        let mut m = MessageFramer::default();
        // Two messages: 3 bytes, then empty, then a third of 10 bytes split.
        let data = [
            0, 0, 0, 0, 3, b'a', b'b', b'c', 0, 0, 0, 0, 0, 1, 0, 0, 0, 10, 1, 2,
        ];
        assert_eq!(m.bytes(&data), 2);
        assert_eq!(m, MessageFramer::Payload { left: 8 });
        assert_eq!(m.gap(5), 0);
        assert_eq!(m.bytes(&[1, 2]), 0);
        assert_eq!(m.gap(1), 1);
        assert_eq!(m.bytes(&[0, 0]), 0);
        assert_eq!(m.gap(1), 0);
        assert!(m.is_lost());
        assert_eq!(m.bytes(&[0, 0, 0, 0, 0]), 0);
    }
}
