//! The Go linker's build-info blob (`.go.buildinfo`): the toolchain version and the module
//! list, i.e. what `go version -m` prints. It decides which struct layouts apply, so it is the
//! first thing read from a Go binary; its absence means "not a Go binary".
//!
//! Blob layout (cmd/link, debug/buildinfo): a 32-byte header, 16-byte aligned:
//! `"\xff Go buildinf:"` (14 bytes), pointer size (1), flags (1), then either
//! - flags & 2 (Go >= 1.18): padding to 32, then the version string and the modinfo string,
//!   each prefixed by its length as a uvarint;
//! - else (Go < 1.18): two pointers (pointer size and byte order from the header, flags & 1 =
//!   big endian) to Go string headers `{data, len}` of the version and modinfo strings.

use std::collections::BTreeMap;

use super::elf::Elf;
use super::{BuildInfo, GoVersion};

/// The magic that starts the blob.
pub const MAGIC: &[u8; 14] = b"\xff Go buildinf:";
/// The blob's fixed header.
const HEADER_LEN: usize = 32;
/// The linker aligns the blob to this, so searches only look at these offsets.
const ALIGN: usize = 16;
/// Length of each sentinel that cmd/go puts around the modinfo text.
const SENTINEL_LEN: usize = 16;

const FLAG_BIG_ENDIAN: u8 = 0x1;
const FLAG_INLINE_STRINGS: u8 = 0x2;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildInfoError {
    #[error("buildinfo is {len} bytes, shorter than its {HEADER_LEN}-byte header")]
    TooShort { len: usize },
    #[error("buildinfo does not start with the \"\\xff Go buildinf:\" magic")]
    NoMagic,
    #[error("buildinfo {what} length is not a valid uvarint")]
    BadLength { what: &'static str },
    #[error("buildinfo {what} string runs past the end ({len} bytes claimed)")]
    Truncated { what: &'static str, len: u64 },
    #[error("buildinfo uses the pre-Go 1.18 pointer format, which needs the whole file")]
    PointerFormat,
    #[error("buildinfo pointer size {0} is neither 4 nor 8")]
    PointerSize(u8),
    #[error("buildinfo {what} pointer {addr:#x} does not point into the file")]
    BadPointer { what: &'static str, addr: u64 },
    #[error("buildinfo has an empty Go version")]
    NoVersion,
}

/// Parses a blob that starts at the magic (the bytes of `.go.buildinfo`). Only the Go >= 1.18
/// inline format can be parsed from the blob alone; the older format yields
/// [`BuildInfoError::PointerFormat`] (use [`parse_buildinfo_with`]).
pub fn parse_buildinfo(blob: &[u8]) -> Result<BuildInfo, BuildInfoError> {
    parse_buildinfo_with(blob, |_, _| None)
}

/// Like [`parse_buildinfo`], following the pre-1.18 format's pointers with `read(vaddr, len)`.
pub fn parse_buildinfo_with<'f>(
    blob: &[u8],
    read: impl Fn(u64, u64) -> Option<&'f [u8]>,
) -> Result<BuildInfo, BuildInfoError> {
    let header = blob
        .get(..HEADER_LEN)
        .ok_or(BuildInfoError::TooShort { len: blob.len() })?;
    if !header.starts_with(MAGIC) {
        return Err(BuildInfoError::NoMagic);
    }
    let ptr_size = header[14];
    let flags = header[15];
    let (version, modinfo) = if flags & FLAG_INLINE_STRINGS != 0 {
        let rest = &blob[HEADER_LEN..];
        let (version, rest) = varint_string(rest, "version")?;
        let (modinfo, _) = varint_string(rest, "modinfo")?;
        decode(version, modinfo)
    } else {
        let width = match ptr_size {
            4 | 8 => usize::from(ptr_size),
            other => return Err(BuildInfoError::PointerSize(other)),
        };
        let big = flags & FLAG_BIG_ENDIAN != 0;
        let word = |bytes: &[u8]| read_word(bytes, width, big);
        let version_ptr = word(&header[16..]).ok_or(BuildInfoError::PointerFormat)?;
        let modinfo_ptr = word(&header[16 + width..]).ok_or(BuildInfoError::PointerFormat)?;
        let string_at = |what: &'static str, addr: u64| -> Result<&'f [u8], BuildInfoError> {
            let string_header =
                read(addr, 2 * width as u64).ok_or(BuildInfoError::BadPointer { what, addr })?;
            let data = word(string_header).ok_or(BuildInfoError::BadPointer { what, addr })?;
            let len = string_header
                .get(width..)
                .and_then(word)
                .ok_or(BuildInfoError::BadPointer { what, addr })?;
            if len == 0 {
                return Ok(&[]);
            }
            read(data, len).ok_or(BuildInfoError::BadPointer { what, addr: data })
        };
        // A blob read without the file cannot follow pointers at all: say so rather than
        // reporting a bad pointer.
        if read(version_ptr, 0).is_none() && read(modinfo_ptr, 0).is_none() {
            return Err(BuildInfoError::PointerFormat);
        }
        decode(
            string_at("version", version_ptr)?,
            string_at("modinfo", modinfo_ptr)?,
        )
    };
    if version.is_empty() {
        return Err(BuildInfoError::NoVersion);
    }
    let mut info = BuildInfo {
        go_version: GoVersion::parse(&version),
        go_version_raw: version,
        ..BuildInfo::default()
    };
    if let Some(text) = modinfo {
        parse_modinfo(&text, &mut info);
    }
    Ok(info)
}

/// The version string and the modinfo text without its framing (None when unframed).
fn decode(version: &[u8], modinfo: &[u8]) -> (String, Option<String>) {
    (
        String::from_utf8_lossy(version).into_owned(),
        strip_sentinels(modinfo).map(|text| String::from_utf8_lossy(text).into_owned()),
    )
}

/// Fills `path`, `main_module` and `deps` from modinfo text (sentinels already removed):
/// tab-separated lines `path\t<pkg>`, `mod\t<module>\t<version>[\t<sum>]`,
/// `dep\t<module>\t<version>[\t<sum>]` and `=>\t<module>\t<version>[\t<sum>]`, the last
/// replacing the line before it. Unknown lines (`build`, `go`) are skipped.
pub fn parse_modinfo(text: &str, info: &mut BuildInfo) {
    let mut deps = BTreeMap::new();
    // The dep that a following `=>` line replaces.
    let mut last_dep: Option<String> = None;
    for line in text.lines() {
        let mut fields = line.split('\t');
        let kind = fields.next().unwrap_or_default();
        let first = fields.next().unwrap_or_default();
        let second = fields.next().unwrap_or_default();
        match kind {
            "path" => info.path = first.to_string(),
            "mod" => {
                info.main_module = first.to_string();
                last_dep = None;
            }
            "dep" if !first.is_empty() => {
                deps.insert(first.to_string(), second.to_string());
                last_dep = Some(first.to_string());
            }
            "=>" => {
                // A replacement by a local directory has no version; the required version
                // is then the best guess of the code's layout, so it stays.
                if let Some(dep) = last_dep.take()
                    && !second.is_empty()
                {
                    deps.insert(dep, second.to_string());
                }
            }
            _ => last_dep = None,
        }
    }
    info.deps = deps;
}

/// The build info of an ELF file: `.go.buildinfo` when the section headers are there, else
/// the first 16-byte aligned magic in a writable segment (where the linker puts the blob).
/// `Ok(None)`: no blob, so not a Go binary.
pub(super) fn read_from_elf(elf: &Elf<'_>) -> Result<Option<BuildInfo>, BuildInfoError> {
    let read = |vaddr: u64, len: u64| elf.read(vaddr, len);
    if let Some(section) = elf.section(".go.buildinfo")
        && let Some(at) = find_magic(section.data)
    {
        return parse_buildinfo_with(&section.data[at..], read).map(Some);
    }
    for seg in elf.loads().iter().filter(|seg| seg.writable()) {
        let Some(bytes) = elf.segment_bytes(seg) else {
            continue;
        };
        // Alignment is of the address; segments are page-aligned in practice, but do not
        // rely on it.
        let skew = (ALIGN - (seg.vaddr % ALIGN as u64) as usize) % ALIGN;
        if let Some(at) = bytes.get(skew..).and_then(find_magic) {
            return parse_buildinfo_with(&bytes[skew + at..], read).map(Some);
        }
    }
    Ok(None)
}

/// Offset of the first 16-byte aligned magic in `bytes`.
fn find_magic(bytes: &[u8]) -> Option<usize> {
    (0..bytes.len())
        .step_by(ALIGN)
        .find(|&at| bytes[at..].starts_with(MAGIC))
}

/// A uvarint-length-prefixed string and what follows it.
fn varint_string<'a>(
    bytes: &'a [u8],
    what: &'static str,
) -> Result<(&'a [u8], &'a [u8]), BuildInfoError> {
    let (len, used) = uvarint(bytes).ok_or(BuildInfoError::BadLength { what })?;
    let rest = &bytes[used..];
    let n = usize::try_from(len)
        .ok()
        .filter(|&n| n <= rest.len())
        .ok_or(BuildInfoError::Truncated { what, len })?;
    Ok(rest.split_at(n))
}

/// Go's `binary.Uvarint`: (value, bytes used); None when truncated or longer than 64 bits.
fn uvarint(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, &byte) in bytes.iter().enumerate().take(10) {
        let low = u64::from(byte & 0x7f);
        if i == 9 && byte > 1 {
            return None;
        }
        value |= low << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

fn read_word(bytes: &[u8], width: usize, big: bool) -> Option<u64> {
    let bytes = bytes.get(..width)?;
    let mut buf = [0u8; 8];
    if big {
        buf[8 - width..].copy_from_slice(bytes);
        Some(u64::from_be_bytes(buf))
    } else {
        buf[..width].copy_from_slice(bytes);
        Some(u64::from_le_bytes(buf))
    }
}

/// cmd/go frames the modinfo text with two 16-byte sentinels; debug/buildinfo recognises the
/// framing by the newline that ends the text just before the closing sentinel.
fn strip_sentinels(modinfo: &[u8]) -> Option<&[u8]> {
    let len = modinfo.len();
    if len > 2 * SENTINEL_LEN && modinfo[len - SENTINEL_LEN - 1] == b'\n' {
        Some(&modinfo[SENTINEL_LEN..len - SENTINEL_LEN])
    } else {
        None
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const START: &[u8; 16] = b"0w\xaf\x0c\x92t\x08\x02A\xe1\xc1\x07\xe6\xd6\x18\xe6";
    const END: &[u8; 16] = b"\xf92C1\x86\x18 r\x00\x82B\x10A\x16\xd8\xf2";

    fn put_uvarint(out: &mut Vec<u8>, mut value: u64) {
        while value >= 0x80 {
            out.push((value as u8) | 0x80);
            value >>= 7;
        }
        out.push(value as u8);
    }

    fn framed(modinfo: &str) -> Vec<u8> {
        let mut out = START.to_vec();
        out.extend_from_slice(modinfo.as_bytes());
        out.extend_from_slice(END);
        out
    }

    /// A Go >= 1.18 blob.
    pub(crate) fn inline_blob(version: &str, modinfo: &[u8]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.push(8);
        out.push(FLAG_INLINE_STRINGS);
        out.resize(HEADER_LEN, 0);
        put_uvarint(&mut out, version.len() as u64);
        out.extend_from_slice(version.as_bytes());
        put_uvarint(&mut out, modinfo.len() as u64);
        out.extend_from_slice(modinfo);
        out
    }

    const MODINFO: &str = "path\texample.com/daemon/cmd/server\n\
        mod\texample.com/daemon\t(devel)\t\n\
        dep\tgithub.com/gin-gonic/gin\tv1.9.1\th1:abc=\n\
        dep\tgolang.org/x/net\tv0.17.0\th1:def=\n\
        =>\tgolang.org/x/net\tv0.20.0\th1:ghi=\n\
        dep\tgithub.com/local/fork\tv1.2.3\n\
        =>\t../fork\t\t\n\
        build\t-buildmode=exe\n\
        build\tGOARCH=amd64\n";

    #[test]
    fn inline_format() {
        let blob = inline_blob("go1.22.0 X:boringcrypto", &framed(MODINFO));
        let info = parse_buildinfo(&blob).expect("parses");
        assert_eq!(info.go_version_raw, "go1.22.0 X:boringcrypto");
        assert_eq!(info.go_version, Some(GoVersion::new(1, 22, 0)));
        assert_eq!(info.path, "example.com/daemon/cmd/server");
        assert_eq!(info.main_module, "example.com/daemon");
        let deps: Vec<(&str, &str)> = info
            .deps
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            deps,
            [
                ("github.com/gin-gonic/gin", "v1.9.1"),
                ("github.com/local/fork", "v1.2.3"),
                ("golang.org/x/net", "v0.20.0"),
            ]
        );
    }

    #[test]
    fn no_module_info() {
        // `go build file.go` outside a module still records a version; the modinfo may be
        // empty or unframed, which leaves the module fields empty.
        for modinfo in [&b""[..], b"path\tcommand-line-arguments\n"] {
            let info = parse_buildinfo(&inline_blob("go1.21.13", modinfo)).expect("parses");
            assert_eq!(info.go_version, Some(GoVersion::new(1, 21, 13)));
            assert_eq!(info.path, "");
            assert!(info.deps.is_empty());
        }
    }

    #[test]
    fn pointer_format() {
        // Header at 0x1000: pointers to string headers at 0x2000 and 0x2010, whose data is at
        // 0x3000 and 0x3100.
        let modinfo = framed("path\tex/a\nmod\tex/a\t(devel)\t\n");
        let mut blob = MAGIC.to_vec();
        blob.push(8);
        blob.push(0);
        blob.extend_from_slice(&0x2000u64.to_le_bytes());
        blob.extend_from_slice(&0x2010u64.to_le_bytes());
        let mut headers = Vec::new();
        for (addr, len) in [(0x3000u64, 9u64), (0x3100, modinfo.len() as u64)] {
            headers.extend_from_slice(&addr.to_le_bytes());
            headers.extend_from_slice(&len.to_le_bytes());
        }
        let version = b"go1.17.13";
        let read = |addr: u64, len: u64| -> Option<&[u8]> {
            let (base, bytes): (u64, &[u8]) = match addr {
                0x2000..0x2020 => (0x2000, &headers[..]),
                0x3000..0x3009 => (0x3000, &version[..]),
                0x3100..0x3200 => (0x3100, &modinfo[..]),
                _ => return None,
            };
            let at = usize::try_from(addr - base).ok()?;
            bytes.get(at..at.checked_add(usize::try_from(len).ok()?)?)
        };
        let info = parse_buildinfo_with(&blob, read).expect("parses");
        assert_eq!(info.go_version_raw, "go1.17.13");
        assert_eq!(info.main_module, "ex/a");
        assert_eq!(
            parse_buildinfo(&blob),
            Err(BuildInfoError::PointerFormat),
            "without the file the pointers cannot be followed"
        );
        // Pointers into nowhere.
        let mut bad = blob.clone();
        bad[16..24].copy_from_slice(&0x2100u64.to_le_bytes());
        assert_eq!(
            parse_buildinfo_with(&bad, read),
            Err(BuildInfoError::BadPointer {
                what: "version",
                addr: 0x2100
            })
        );
        bad[14] = 3;
        assert_eq!(
            parse_buildinfo_with(&bad, read),
            Err(BuildInfoError::PointerSize(3))
        );
    }

    #[test]
    fn malformed_blobs_are_errors() {
        let good = inline_blob("go1.26.8", &framed(MODINFO));
        assert_eq!(
            parse_buildinfo(&good[..20]),
            Err(BuildInfoError::TooShort { len: 20 })
        );
        let mut bad = good.clone();
        bad[0] = 0;
        assert_eq!(parse_buildinfo(&bad), Err(BuildInfoError::NoMagic));
        // Version length beyond the end.
        let mut bad = good[..HEADER_LEN].to_vec();
        bad.extend_from_slice(&[0xff, 0x01, b'g']);
        assert_eq!(
            parse_buildinfo(&bad),
            Err(BuildInfoError::Truncated {
                what: "version",
                len: 255
            })
        );
        // A varint that never ends.
        let mut bad = good[..HEADER_LEN].to_vec();
        bad.extend_from_slice(&[0x80; 12]);
        assert_eq!(
            parse_buildinfo(&bad),
            Err(BuildInfoError::BadLength { what: "version" })
        );
        assert_eq!(
            parse_buildinfo(&inline_blob("", b"")),
            Err(BuildInfoError::NoVersion)
        );
        // Every truncation of a good blob either parses or is an error; none panics.
        for len in 0..good.len() {
            let _ = parse_buildinfo(&good[..len]);
        }
    }

    #[test]
    fn uvarints() {
        assert_eq!(uvarint(&[0]), Some((0, 1)));
        assert_eq!(uvarint(&[0xac, 0x02]), Some((300, 2)));
        assert_eq!(uvarint(&[0x80]), None);
        assert_eq!(
            uvarint(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]),
            Some((u64::MAX, 10))
        );
        assert_eq!(
            uvarint(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02]),
            None
        );
    }

    #[test]
    fn magic_search_is_aligned() {
        let mut bytes = vec![0u8; 64];
        bytes[8..22].copy_from_slice(MAGIC);
        assert_eq!(find_magic(&bytes), None);
        bytes[32..46].copy_from_slice(MAGIC);
        assert_eq!(find_magic(&bytes), Some(32));
        // A magic cut off by the end is not found.
        assert_eq!(find_magic(&bytes[..40]), None);
    }
}
