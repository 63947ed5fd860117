//! Facts about Go binaries, read from the file alone (no process is touched): the Go version
//! and modules from `.go.buildinfo`, function entry points from `.gopclntab` (so stripped
//! binaries work), the RET instructions of a function (uprobes on them replace uretprobes,
//! which crash Go when goroutine stacks move), and the struct field offsets the kernel side
//! needs (from DWARF, else from the generated per-version table).

pub mod buildinfo;
pub mod dwarf;
mod elf;
pub mod offsets;
pub mod pclntab;
pub mod ret;

use std::collections::BTreeMap;
use std::fmt;

pub use inspect::{GoBinError, GoBinary, inspect, inspect_bytes};

mod inspect;

/// A Go release, as in `go1.26.8` (pre-releases such as `go1.27rc1` have `patch` 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GoVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl GoVersion {
    pub const fn new(major: u32, minor: u32, patch: u32) -> Self {
        Self {
            major,
            minor,
            patch,
        }
    }

    /// Parses `go1.21.13`, `go1.21`, `go1.27rc1`, `go1.22.0 X:boringcrypto` and the like.
    pub fn parse(text: &str) -> Option<GoVersion> {
        let rest = text.trim().strip_prefix("go")?;
        let rest = rest.split([' ', '-', '+']).next()?;
        let mut parts = rest.split('.');
        let major = leading_number(parts.next()?)?;
        let minor = leading_number(parts.next()?)?;
        let patch = parts.next().and_then(leading_number).unwrap_or(0);
        Some(GoVersion::new(major, minor, patch))
    }

    /// Whether uprobes support this version (register ABI, buildinfo and pclntab formats
    /// and struct layouts known to the offsets table).
    pub fn supported(self) -> bool {
        (MIN_SUPPORTED..=MAX_SUPPORTED).contains(&GoVersion::new(self.major, self.minor, 0))
    }
}

fn leading_number(s: &str) -> Option<u32> {
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    s[..end].parse().ok()
}

impl fmt::Display for GoVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "go{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Oldest Go release whose binaries get uprobes.
pub const MIN_SUPPORTED: GoVersion = GoVersion::new(1, 19, 0);
/// Newest Go release (minor) whose binaries get uprobes.
pub const MAX_SUPPORTED: GoVersion = GoVersion::new(1, 27, 0);

/// What `.go.buildinfo` says about a binary.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BuildInfo {
    /// As written by the linker, e.g. `go1.26.8`.
    pub go_version_raw: String,
    /// Parsed `go_version_raw`, when it parses.
    pub go_version: Option<GoVersion>,
    /// The main package's import path (`path` line).
    pub path: String,
    /// The main module (`mod` line), e.g. `example.com/daemon`.
    pub main_module: String,
    /// Dependencies (`dep` lines, with `=>` replacements applied): module -> version.
    pub deps: BTreeMap<String, String>,
}

/// A function of the binary, as uprobes need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoFunc {
    /// Full symbol name, e.g. `net/http.serverHandler.ServeHTTP`.
    pub name: String,
    /// Virtual address of the entry.
    pub entry: u64,
    /// Virtual address one past the last instruction.
    pub end: u64,
    /// File offset of the entry.
    pub entry_offset: u64,
    /// File offset where the entry uprobe goes: the prologue's stack-check jump when there is
    /// one (see `ret::entry_probe_point`), else the entry.
    pub entry_probe_offset: u64,
    /// File offsets of every RET instruction of the function.
    pub ret_offsets: Vec<u64>,
}

/// Struct fields whose offsets the kernel side reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Field {
    /// `net/http.Request.Method` (string).
    RequestMethod,
    /// `net/http.Request.URL` (*url.URL).
    RequestUrl,
    /// `net/url.URL.Path` (string).
    UrlPath,
    /// `net/http.persistConn.conn` (net.Conn interface).
    PersistConnConn,
    /// `net/http.persistConn.tlsState` (*tls.ConnectionState): non-nil on TLS connections,
    /// whose `conn` is not a *net.TCPConn.
    PersistConnTlsState,
    /// `net.conn.fd` (*netFD), the only field of the conn that TCPConn embeds.
    NetConnFd,
    /// `net.netFD.pfd` (internal/poll.FD).
    NetFdPfd,
    /// `internal/poll.FD.Sysfd` (int).
    PollFdSysfd,
    /// `net/http.response.status` (int), the status a handler wrote. In the table for a
    /// handler-end hook; no hook reads it yet.
    ResponseStatus,
    /// `github.com/gin-gonic/gin.Context.fullPath` (string), the route template.
    GinContextFullPath,
    /// grpc-go `transport.ServerStream.Stream`, the common stream embedded by value (newer
    /// releases).
    GrpcServerStreamStream,
    /// The same member embedded as a pointer, `*Stream` (older releases, e.g. v1.76).
    GrpcServerStreamStreamPtr,
    /// grpc-go `transport.ClientStream.Stream`, embedded by value.
    GrpcClientStreamStream,
    /// ... embedded as a pointer.
    GrpcClientStreamStreamPtr,
    /// grpc-go `transport.ClientStream.ct` (*http2Client).
    GrpcClientStreamCt,
    /// grpc-go `transport.Stream.method` (string), `/pkg.Service/Method`.
    GrpcStreamMethod,
    /// grpc-go `transport.Stream.id` (uint32), the HTTP/2 stream id.
    GrpcStreamId,
    /// grpc-go `transport.http2Server.conn` (net.Conn).
    GrpcHttp2ServerConn,
    /// grpc-go `transport.http2Client.conn` (net.Conn).
    GrpcHttp2ClientConn,
    /// grpc-go `internal/status.Status.s` (*spb.Status).
    GrpcStatusS,
    /// `google.golang.org/genproto/googleapis/rpc/status.Status.Code` (int32).
    GrpcStatusCode,
    /// `crypto/tls.Conn.conn` (net.Conn), the connection under TLS.
    TlsConnConn,
}

impl Field {
    /// The fields of the offsets table (`offsets_table.json`): standard library and gin.
    pub const ALL: [Field; 10] = [
        Field::RequestMethod,
        Field::RequestUrl,
        Field::UrlPath,
        Field::PersistConnConn,
        Field::PersistConnTlsState,
        Field::NetConnFd,
        Field::NetFdPfd,
        Field::PollFdSysfd,
        Field::ResponseStatus,
        Field::GinContextFullPath,
    ];

    /// Fields read from DWARF only: no table covers them (their layouts vary with the
    /// module's version), so a stripped binary leaves the hooks that need them off.
    pub const DWARF_ONLY: [Field; 12] = [
        Field::GrpcServerStreamStream,
        Field::GrpcServerStreamStreamPtr,
        Field::GrpcClientStreamStream,
        Field::GrpcClientStreamStreamPtr,
        Field::GrpcClientStreamCt,
        Field::GrpcStreamMethod,
        Field::GrpcStreamId,
        Field::GrpcHttp2ServerConn,
        Field::GrpcHttp2ClientConn,
        Field::GrpcStatusS,
        Field::GrpcStatusCode,
        Field::TlsConnConn,
    ];

    /// Every field: the table's, then the DWARF-only ones.
    pub fn every() -> impl Iterator<Item = Field> {
        Field::ALL.into_iter().chain(Field::DWARF_ONLY)
    }

    /// Whether the offsets table may hold this field.
    pub fn in_table(self) -> bool {
        !Field::DWARF_ONLY.contains(&self)
    }

    /// (DWARF type name, member name).
    pub fn dwarf_name(self) -> (&'static str, &'static str) {
        match self {
            Field::RequestMethod => ("net/http.Request", "Method"),
            Field::RequestUrl => ("net/http.Request", "URL"),
            Field::UrlPath => ("net/url.URL", "Path"),
            Field::PersistConnConn => ("net/http.persistConn", "conn"),
            Field::PersistConnTlsState => ("net/http.persistConn", "tlsState"),
            Field::NetConnFd => ("net.conn", "fd"),
            Field::NetFdPfd => ("net.netFD", "pfd"),
            Field::PollFdSysfd => ("internal/poll.FD", "Sysfd"),
            Field::ResponseStatus => ("net/http.response", "status"),
            Field::GinContextFullPath => ("github.com/gin-gonic/gin.Context", "fullPath"),
            Field::GrpcServerStreamStream | Field::GrpcServerStreamStreamPtr => {
                (GRPC_TRANSPORT_SERVER_STREAM, "Stream")
            }
            Field::GrpcClientStreamStream | Field::GrpcClientStreamStreamPtr => {
                (GRPC_TRANSPORT_CLIENT_STREAM, "Stream")
            }
            Field::GrpcClientStreamCt => (GRPC_TRANSPORT_CLIENT_STREAM, "ct"),
            Field::GrpcStreamMethod => {
                ("google.golang.org/grpc/internal/transport.Stream", "method")
            }
            Field::GrpcStreamId => ("google.golang.org/grpc/internal/transport.Stream", "id"),
            Field::GrpcHttp2ServerConn => (
                "google.golang.org/grpc/internal/transport.http2Server",
                "conn",
            ),
            Field::GrpcHttp2ClientConn => (
                "google.golang.org/grpc/internal/transport.http2Client",
                "conn",
            ),
            Field::GrpcStatusS => ("google.golang.org/grpc/internal/status.Status", "s"),
            Field::GrpcStatusCode => (
                "google.golang.org/genproto/googleapis/rpc/status.Status",
                "Code",
            ),
            Field::TlsConnConn => ("crypto/tls.Conn", "conn"),
        }
    }

    /// The field that names the same member declared the other way (by value / pointer).
    pub fn alternative(self) -> Option<Field> {
        match self {
            Field::GrpcServerStreamStream => Some(Field::GrpcServerStreamStreamPtr),
            Field::GrpcServerStreamStreamPtr => Some(Field::GrpcServerStreamStream),
            Field::GrpcClientStreamStream => Some(Field::GrpcClientStreamStreamPtr),
            Field::GrpcClientStreamStreamPtr => Some(Field::GrpcClientStreamStream),
            _ => None,
        }
    }

    /// What the member's type must be for this field: two fields can name one member that
    /// different releases declare differently.
    pub fn member_kind(self) -> MemberKind {
        match self {
            Field::GrpcServerStreamStream | Field::GrpcClientStreamStream => MemberKind::Struct,
            Field::GrpcServerStreamStreamPtr | Field::GrpcClientStreamStreamPtr => {
                MemberKind::Pointer
            }
            _ => MemberKind::Any,
        }
    }

    /// The module whose version decides the layout: `None` for the standard library (the
    /// Go version decides), else the module path.
    pub fn module(self) -> Option<&'static str> {
        match self {
            Field::GinContextFullPath => Some("github.com/gin-gonic/gin"),
            Field::GrpcStatusCode => Some("google.golang.org/genproto/googleapis/rpc"),
            // Standard library, but not in the table (TLS hooks are DWARF-only).
            Field::TlsConnConn => None,
            f if !f.in_table() => Some("google.golang.org/grpc"),
            _ => None,
        }
    }
}

/// What a member's type must be (see [`Field::member_kind`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberKind {
    Any,
    /// A struct embedded by value.
    Struct,
    Pointer,
}

const GRPC_TRANSPORT_SERVER_STREAM: &str = "google.golang.org/grpc/internal/transport.ServerStream";
const GRPC_TRANSPORT_CLIENT_STREAM: &str = "google.golang.org/grpc/internal/transport.ClientStream";

/// Where a binary's offsets came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetsSource {
    Dwarf,
    Table,
}

/// Field offsets of one binary. A field is absent when the binary does not contain the type
/// (e.g. no gin) or neither DWARF nor the table knows it; the hooks that need it stay off.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GoOffsets {
    pub fields: BTreeMap<Field, u64>,
    /// Per field, where its offset came from.
    pub sources: BTreeMap<Field, OffsetsSource>,
    /// The binary's DWARF was read.
    pub dwarf: bool,
}

impl GoOffsets {
    pub fn get(&self, field: Field) -> Option<u64> {
        self.fields.get(&field).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse() {
        assert_eq!(GoVersion::parse("go1.26.8"), Some(GoVersion::new(1, 26, 8)));
        assert_eq!(GoVersion::parse("go1.21"), Some(GoVersion::new(1, 21, 0)));
        assert_eq!(
            GoVersion::parse("go1.27rc1"),
            Some(GoVersion::new(1, 27, 0))
        );
        assert_eq!(
            GoVersion::parse("go1.22.0 X:boringcrypto"),
            Some(GoVersion::new(1, 22, 0))
        );
        assert_eq!(GoVersion::parse("devel +abc"), None);
        assert!(GoVersion::new(1, 19, 13).supported());
        assert!(GoVersion::new(1, 27, 3).supported());
        assert!(!GoVersion::new(1, 18, 10).supported());
        assert!(!GoVersion::new(1, 28, 0).supported());
    }
}
