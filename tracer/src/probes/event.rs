//! Decoding of ring buffer records. The kernel writes them, but a short or unknown record is
//! still reported as an error rather than trusted.

use std::{
    mem::size_of,
    net::{IpAddr, Ipv6Addr, SocketAddr},
};

use thiserror::Error;
use tracer_common::{
    ConnEvent, DataEvent, GoEvent, MAX_CAPTURE, NginxEvent, ProcEvent, SockAddr, kind,
};

/// One socket data chunk, borrowing the captured bytes from the ring buffer.
#[derive(Debug, Clone, Copy)]
pub struct DataChunk<'a> {
    pub tgid: u32,
    pub tid: u32,
    pub fd: i32,
    pub conn_id: u64,
    pub ingress: bool,
    pub ts_enter_ns: u64,
    pub ts_exit_ns: u64,
    pub cgroup_id: u64,
    /// Bytes really moved by the syscall for this chunk.
    pub total_len: u64,
    /// The captured prefix of those bytes.
    pub captured: &'a [u8],
    /// Per-socket record sequence number (holes mean lost records).
    pub seq: u32,
    /// Whether the fd is a pipe (else a socket).
    pub pipe: bool,
    /// The goroutine that made the syscall, when the process is Go, or the greenlet marked
    /// with `GREENLET_MARK` (else meaningless).
    pub goroutine: u64,
    /// TLS plaintext from the TLS uprobes (`kind::TLS_DATA`), not the socket's own bytes.
    pub tls: bool,
}

/// A Go uprobe's report (see `tracer_common::go_op`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoRecord {
    pub op: u8,
    pub tgid: u32,
    pub tid: u32,
    pub ts_ns: u64,
    pub g: u64,
    pub other: u64,
    pub value: i32,
    pub method: String,
    /// The path or route, lossy UTF-8, at most GO_TEXT bytes of it.
    pub text: String,
    /// `text` is a prefix of a longer string.
    pub text_truncated: bool,
}

#[derive(Debug, Clone)]
pub enum Event<'a> {
    Data(DataChunk<'a>),
    Conn(ConnEvent),
    Proc(ProcEvent),
    Go(GoRecord),
    Nginx(NginxEvent),
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("empty record")]
    Empty,
    #[error("record of kind {kind} is {len} bytes, expected at least {want}")]
    Short { kind: u8, len: usize, want: usize },
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
}

fn read<T: Copy>(bytes: &[u8], kind: u8) -> Result<T, DecodeError> {
    if bytes.len() < size_of::<T>() {
        return Err(DecodeError::Short {
            kind,
            len: bytes.len(),
            want: size_of::<T>(),
        });
    }
    // SAFETY: length checked; T is a plain repr(C) record; unaligned read.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// Decodes one record.
pub fn decode(bytes: &[u8]) -> Result<Event<'_>, DecodeError> {
    let Some(&record_kind) = bytes.first() else {
        return Err(DecodeError::Empty);
    };
    match record_kind {
        kind::DATA | kind::TLS_DATA => {
            let header = size_of::<DataEvent>() - MAX_CAPTURE;
            if bytes.len() < header {
                return Err(DecodeError::Short {
                    kind: record_kind,
                    len: bytes.len(),
                    want: header,
                });
            }
            // The header fields are read one by one so that the 4 KiB buffer is never copied.
            let u32_at =
                |o: usize| u32::from_ne_bytes(bytes[o..o + 4].try_into().unwrap_or([0; 4]));
            let u64_at =
                |o: usize| u64::from_ne_bytes(bytes[o..o + 8].try_into().unwrap_or([0; 8]));
            let captured_len = (u32_at(OFF_CAPTURED) as usize).min(MAX_CAPTURE);
            let buf_start = OFF_BUF;
            let buf_end = (buf_start + captured_len).min(bytes.len());
            Ok(Event::Data(DataChunk {
                ingress: bytes[1] == tracer_common::direction::INGRESS,
                fd: u32_at(OFF_FD) as i32,
                tgid: u32_at(OFF_TGID),
                tid: u32_at(OFF_TID),
                conn_id: u64_at(OFF_CONN),
                ts_enter_ns: u64_at(OFF_ENTER),
                ts_exit_ns: u64_at(OFF_EXIT),
                cgroup_id: u64_at(OFF_CGROUP),
                total_len: u64_at(OFF_TOTAL),
                captured: &bytes[buf_start..buf_end],
                seq: u32_at(OFF_SEQ),
                pipe: bytes[OFF_ROLE] == tracer_common::role::PIPE,
                goroutine: u64_at(OFF_GOROUTINE),
                tls: record_kind == kind::TLS_DATA,
            }))
        }
        kind::CONNECT | kind::ACCEPT | kind::CLOSE | kind::PIPE | kind::OWN_CONNECT => {
            Ok(Event::Conn(read(bytes, record_kind)?))
        }
        kind::EXEC | kind::EXIT | kind::FORK => Ok(Event::Proc(read(bytes, record_kind)?)),
        kind::GO => {
            let ev: GoEvent = read(bytes, record_kind)?;
            let method_len = usize::from(ev.method_len).min(ev.method.len());
            let text_len = (ev.text_len as usize).min(ev.text.len());
            Ok(Event::Go(GoRecord {
                op: ev.op,
                tgid: ev.tgid,
                tid: ev.tid,
                ts_ns: ev.ts_ns,
                g: ev.g,
                other: ev.other,
                value: ev.value,
                method: String::from_utf8_lossy(&ev.method[..method_len]).into_owned(),
                text: String::from_utf8_lossy(&ev.text[..text_len]).into_owned(),
                text_truncated: ev.text_total as usize > text_len,
            }))
        }
        kind::NGINX => Ok(Event::Nginx(read(bytes, record_kind)?)),
        other => Err(DecodeError::UnknownKind(other)),
    }
}

const OFF_ROLE: usize = std::mem::offset_of!(DataEvent, role);
const OFF_FD: usize = std::mem::offset_of!(DataEvent, fd);
const OFF_TGID: usize = std::mem::offset_of!(DataEvent, tgid);
const OFF_TID: usize = std::mem::offset_of!(DataEvent, tid);
const OFF_CONN: usize = std::mem::offset_of!(DataEvent, conn_id);
const OFF_ENTER: usize = std::mem::offset_of!(DataEvent, ts_enter_ns);
const OFF_EXIT: usize = std::mem::offset_of!(DataEvent, ts_exit_ns);
const OFF_CGROUP: usize = std::mem::offset_of!(DataEvent, cgroup_id);
const OFF_TOTAL: usize = std::mem::offset_of!(DataEvent, total_len);
const OFF_CAPTURED: usize = std::mem::offset_of!(DataEvent, captured_len);
const OFF_SEQ: usize = std::mem::offset_of!(DataEvent, seq);
const OFF_GOROUTINE: usize = std::mem::offset_of!(DataEvent, goroutine);
const OFF_BUF: usize = std::mem::offset_of!(DataEvent, buf);

/// A kernel address record as a std address; None when the family is unknown.
pub fn socket_addr(addr: &SockAddr) -> Option<SocketAddr> {
    if addr.family != 2 && addr.family != 10 {
        return None;
    }
    let v6 = Ipv6Addr::from(addr.addr);
    let ip = match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    };
    Some(SocketAddr::new(ip, addr.port))
}

/// The process name in a comm field.
pub fn comm_str(comm: &[u8; 16]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_short_and_unknown_records() {
        assert_eq!(decode(&[]).unwrap_err(), DecodeError::Empty);
        assert!(matches!(
            decode(&[kind::DATA, 0, 0]),
            Err(DecodeError::Short { .. })
        ));
        assert!(matches!(
            decode(&[kind::CLOSE; 8]),
            Err(DecodeError::Short { .. })
        ));
        assert_eq!(decode(&[99; 64]).unwrap_err(), DecodeError::UnknownKind(99));
    }

    #[test]
    fn decodes_a_data_record_without_trusting_captured_len() {
        let mut bytes = vec![0u8; size_of::<DataEvent>()];
        bytes[0] = kind::DATA;
        bytes[1] = tracer_common::direction::INGRESS;
        bytes[OFF_TGID..OFF_TGID + 4].copy_from_slice(&42u32.to_ne_bytes());
        bytes[OFF_TOTAL..OFF_TOTAL + 8].copy_from_slice(&10_000u64.to_ne_bytes());
        bytes[OFF_CAPTURED..OFF_CAPTURED + 4].copy_from_slice(&u32::MAX.to_ne_bytes());
        bytes[OFF_BUF..OFF_BUF + 3].copy_from_slice(b"GET");
        // A record cut short must not make the captured slice run past it.
        let cut = &bytes[..OFF_BUF + 100];
        let Ok(Event::Data(chunk)) = decode(cut) else {
            panic!("not data")
        };
        assert_eq!(chunk.tgid, 42);
        assert!(chunk.ingress);
        assert_eq!(chunk.total_len, 10_000);
        assert_eq!(chunk.captured.len(), 100);
        assert_eq!(&chunk.captured[..3], b"GET");
    }

    #[test]
    fn maps_v4_mapped_addresses_back_to_v4() {
        let mut addr = SockAddr {
            family: 2,
            port: 8080,
            ..Default::default()
        };
        addr.addr[10] = 0xff;
        addr.addr[11] = 0xff;
        addr.addr[12..].copy_from_slice(&[127, 0, 0, 1]);
        assert_eq!(socket_addr(&addr), Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(socket_addr(&SockAddr::default()), None);
    }
}
