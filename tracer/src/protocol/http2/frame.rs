//! Frame headers (RFC 9113 §4.1) and the rules a header must follow for its type.

pub(super) const HEADER_LEN: usize = 9;

pub(super) const DATA: u8 = 0x0;
pub(super) const HEADERS: u8 = 0x1;
pub(super) const PRIORITY: u8 = 0x2;
pub(super) const RST_STREAM: u8 = 0x3;
pub(super) const SETTINGS: u8 = 0x4;
pub(super) const PUSH_PROMISE: u8 = 0x5;
pub(super) const PING: u8 = 0x6;
pub(super) const GOAWAY: u8 = 0x7;
pub(super) const WINDOW_UPDATE: u8 = 0x8;
pub(super) const CONTINUATION: u8 = 0x9;

pub(super) const END_STREAM: u8 = 0x1;
pub(super) const ACK: u8 = 0x1;
pub(super) const END_HEADERS: u8 = 0x4;
pub(super) const PADDED: u8 = 0x8;
pub(super) const PRIORITY_FLAG: u8 = 0x20;

pub(super) const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;
pub(super) const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;

/// Highest error code RFC 9113 defines (HTTP_1_1_REQUIRED).
pub(super) const MAX_ERROR_CODE: u32 = 0xd;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FrameHeader {
    pub(super) len: u32,
    pub(super) kind: u8,
    pub(super) flags: u8,
    pub(super) stream_id: u32,
    /// The reserved bit before the stream id, which senders must leave unset.
    pub(super) reserved: bool,
}

impl FrameHeader {
    pub(super) fn parse(b: &[u8; HEADER_LEN]) -> Self {
        let [l0, l1, l2, kind, flags, s0, s1, s2, s3] = *b;
        let raw = u32::from_be_bytes([s0, s1, s2, s3]);
        Self {
            len: u32::from_be_bytes([0, l0, l1, l2]),
            kind,
            flags,
            stream_id: raw & 0x7fff_ffff,
            reserved: raw & 0x8000_0000 != 0,
        }
    }

    pub(super) fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// Frames whose payload is a header block fragment or DATA, possibly padded.
    pub(super) fn carries_content(&self) -> bool {
        matches!(self.kind, DATA | HEADERS | PUSH_PROMISE | CONTINUATION)
    }

    pub(super) fn is_padded(&self) -> bool {
        matches!(self.kind, DATA | HEADERS | PUSH_PROMISE) && self.has(PADDED)
    }

    /// Payload bytes between the pad length and the content.
    pub(super) fn extra_prefix(&self) -> u32 {
        match self.kind {
            HEADERS if self.has(PRIORITY_FLAG) => 5,
            PUSH_PROMISE => 4,
            _ => 0,
        }
    }

    /// Whether a peer could have sent this header at all; a frame that breaks these rules
    /// means we are reading something other than a frame header. Unknown types pass (they
    /// are skipped), and undefined flags pass (receivers must ignore them).
    pub(super) fn is_valid(&self) -> bool {
        let on_stream = self.stream_id != 0;
        match self.kind {
            DATA | HEADERS | CONTINUATION | PUSH_PROMISE => {
                let prefix = u32::from(self.is_padded()) + self.extra_prefix();
                on_stream && self.len >= prefix
            }
            PRIORITY => on_stream && self.len == 5,
            RST_STREAM => on_stream && self.len == 4,
            SETTINGS => {
                !on_stream
                    && if self.has(ACK) {
                        self.len == 0
                    } else {
                        self.len.is_multiple_of(6)
                    }
            }
            PING => !on_stream && self.len == 8,
            GOAWAY => !on_stream && self.len >= 8,
            WINDOW_UPDATE => self.len == 4,
            _ => true,
        }
    }

    /// The flags RFC 9113 defines for this type.
    fn defined_flags(&self) -> u8 {
        match self.kind {
            DATA => END_STREAM | PADDED,
            HEADERS => END_STREAM | END_HEADERS | PADDED | PRIORITY_FLAG,
            PUSH_PROMISE => END_HEADERS | PADDED,
            CONTINUATION => END_HEADERS,
            SETTINGS | PING => ACK,
            _ => 0,
        }
    }

    /// The stricter test a frame header found by scanning must pass (see `resync.rs`):
    /// a type this parser knows, no flag or bit a sender must leave unset, a length within
    /// `max_len`, odd stream ids for streams (we follow client-initiated ones), and no
    /// empty frame where real senders never send one.
    pub(super) fn is_plausible(&self, max_len: u32) -> bool {
        if self.kind > CONTINUATION
            || self.kind == PUSH_PROMISE
            || self.reserved
            || self.flags & !self.defined_flags() != 0
            || self.len > max_len
            || !self.is_valid()
        {
            return false;
        }
        let odd = !self.stream_id.is_multiple_of(2);
        match self.kind {
            DATA => odd && (self.len > 0 || self.has(END_STREAM)),
            HEADERS | CONTINUATION => {
                odd && self.len > u32::from(self.is_padded()) + self.extra_prefix()
            }
            RST_STREAM | PRIORITY => odd,
            SETTINGS => self.has(ACK) || self.len > 0,
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(len: u32, kind: u8, flags: u8, stream_id: u32) -> FrameHeader {
        let l = len.to_be_bytes();
        let s = stream_id.to_be_bytes();
        FrameHeader::parse(&[l[1], l[2], l[3], kind, flags, s[0], s[1], s[2], s[3]])
    }

    #[test]
    fn parses_fields() {
        let h = FrameHeader::parse(&[0x01, 0x02, 0x03, 0x01, 0x25, 0x80, 0, 0, 0x05]);
        assert_eq!(
            h,
            FrameHeader {
                len: 0x010203,
                kind: HEADERS,
                flags: 0x25,
                stream_id: 5,
                reserved: true
            }
        );
    }

    #[test]
    fn validity_rules() {
        assert!(hdr(0, SETTINGS, 0, 0).is_valid());
        assert!(!hdr(0, SETTINGS, 0, 1).is_valid());
        assert!(!hdr(6, SETTINGS, ACK, 0).is_valid());
        assert!(!hdr(7, SETTINGS, 0, 0).is_valid());
        assert!(!hdr(0, DATA, 0, 0).is_valid());
        assert!(!hdr(0, DATA, PADDED, 1).is_valid());
        assert!(!hdr(5, HEADERS, PADDED | PRIORITY_FLAG, 1).is_valid());
        assert!(hdr(6, HEADERS, PADDED | PRIORITY_FLAG, 1).is_valid());
        assert!(!hdr(3, RST_STREAM, 0, 1).is_valid());
        assert!(hdr(4, WINDOW_UPDATE, 0, 0).is_valid());
        assert!(hdr(123, 0xfa, 0xff, 0).is_valid());
    }

    #[test]
    fn plausibility_is_stricter() {
        assert!(hdr(10, HEADERS, END_HEADERS, 1).is_plausible(16384));
        assert!(!hdr(10, HEADERS, END_HEADERS, 2).is_plausible(16384));
        assert!(!hdr(10, HEADERS, 0x40, 1).is_plausible(16384));
        assert!(!hdr(16385, DATA, 0, 1).is_plausible(16384));
        assert!(!hdr(0, DATA, 0, 1).is_plausible(16384));
        assert!(hdr(0, DATA, END_STREAM, 1).is_plausible(16384));
        assert!(!hdr(0, SETTINGS, 0, 0).is_plausible(16384));
        assert!(hdr(0, SETTINGS, ACK, 0).is_plausible(16384));
        assert!(!hdr(4, 0x0a, 0, 0).is_plausible(16384));
    }
}
