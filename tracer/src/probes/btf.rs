//! Struct member offsets from the running kernel's BTF (/sys/kernel/btf/vmlinux).
//!
//! The kernel side cannot use CO-RE (no relocation support from Rust), so the few kernel
//! struct fields it walks are located here at start-up and handed over as load-time globals.
//! Only what that needs is parsed: the type section's layout and struct/union members.

use std::collections::HashMap;

use thiserror::Error;

const BTF_MAGIC: u16 = 0xeb9f;

/// BTF kinds (include/uapi/linux/btf.h).
mod btf_kind {
    pub const INT: u32 = 1;
    pub const PTR: u32 = 2;
    pub const ARRAY: u32 = 3;
    pub const STRUCT: u32 = 4;
    pub const UNION: u32 = 5;
    pub const ENUM: u32 = 6;
    pub const FWD: u32 = 7;
    pub const TYPEDEF: u32 = 8;
    pub const VOLATILE: u32 = 9;
    pub const CONST: u32 = 10;
    pub const RESTRICT: u32 = 11;
    pub const FUNC: u32 = 12;
    pub const FUNC_PROTO: u32 = 13;
    pub const VAR: u32 = 14;
    pub const DATASEC: u32 = 15;
    pub const FLOAT: u32 = 16;
    pub const DECL_TAG: u32 = 17;
    pub const TYPE_TAG: u32 = 18;
    pub const ENUM64: u32 = 19;
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("not a BTF blob (bad magic or header)")]
    BadHeader,
    #[error("BTF data ends inside type {0}")]
    Truncated(usize),
    #[error("unknown BTF kind {kind} at type {id}")]
    UnknownKind { kind: u32, id: usize },
    #[error("struct {0} not found in kernel BTF")]
    NoStruct(String),
    #[error("member {member} not found in struct {strukt}")]
    NoMember { strukt: String, member: String },
    #[error("member {member} of struct {strukt} is a bitfield")]
    Bitfield { strukt: String, member: String },
}

#[derive(Debug, Clone)]
struct Member {
    name: u32,
    type_id: u32,
    /// Offset in bits from the start of the enclosing struct.
    bit_offset: u32,
    bitfield: bool,
}

#[derive(Debug, Clone)]
struct Type {
    kind: u32,
    name: u32,
    /// Referenced type for modifiers and typedefs.
    ref_type: u32,
    members: Vec<Member>,
}

/// The parsed type section of one BTF blob.
pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
    structs_by_name: HashMap<String, u32>,
}

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    let bytes = data.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

impl Btf {
    pub fn from_sys_fs() -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let path = "/sys/kernel/btf/vmlinux";
        let data = std::fs::read(path).with_context(|| format!("reading {path}"))?;
        Self::parse(&data).with_context(|| format!("parsing {path}"))
    }

    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        let magic = data
            .get(0..2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or(BtfError::BadHeader)?;
        if magic != BTF_MAGIC {
            return Err(BtfError::BadHeader);
        }
        let field = |at| u32_at(data, at).ok_or(BtfError::BadHeader);
        let hdr_len = field(4)? as usize;
        let (type_off, type_len) = (field(8)? as usize, field(12)? as usize);
        let (str_off, str_len) = (field(16)? as usize, field(20)? as usize);
        let section = |off: usize, len: usize| {
            let start = hdr_len.checked_add(off).ok_or(BtfError::BadHeader)?;
            let end = start.checked_add(len).ok_or(BtfError::BadHeader)?;
            data.get(start..end).ok_or(BtfError::BadHeader)
        };
        let type_data = section(type_off, type_len)?;
        let strings = section(str_off, str_len)?.to_vec();

        // Type id 0 is void.
        let mut types = vec![Type {
            kind: 0,
            name: 0,
            ref_type: 0,
            members: Vec::new(),
        }];
        let mut at = 0usize;
        while at < type_data.len() {
            let id = types.len();
            let word = |i: usize| u32_at(type_data, at + 4 * i).ok_or(BtfError::Truncated(id));
            let name = word(0)?;
            let info = word(1)?;
            let size_or_type = word(2)?;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            at += 12;
            let extra = match kind {
                btf_kind::INT | btf_kind::VAR | btf_kind::DECL_TAG => 4,
                btf_kind::ARRAY => 12,
                btf_kind::STRUCT | btf_kind::UNION | btf_kind::DATASEC | btf_kind::ENUM64 => {
                    12 * vlen
                }
                btf_kind::ENUM | btf_kind::FUNC_PROTO => 8 * vlen,
                btf_kind::PTR
                | btf_kind::FWD
                | btf_kind::TYPEDEF
                | btf_kind::VOLATILE
                | btf_kind::CONST
                | btf_kind::RESTRICT
                | btf_kind::FUNC
                | btf_kind::FLOAT
                | btf_kind::TYPE_TAG => 0,
                other => return Err(BtfError::UnknownKind { kind: other, id }),
            };
            let mut members = Vec::new();
            if kind == btf_kind::STRUCT || kind == btf_kind::UNION {
                members.reserve(vlen);
                for m in 0..vlen {
                    let base = at + 12 * m;
                    let get =
                        |i: usize| u32_at(type_data, base + 4 * i).ok_or(BtfError::Truncated(id));
                    let raw_offset = get(2)?;
                    let (bit_offset, bitfield) = if kind_flag {
                        (raw_offset & 0x00ff_ffff, raw_offset >> 24 != 0)
                    } else {
                        (raw_offset, false)
                    };
                    members.push(Member {
                        name: get(0)?,
                        type_id: get(1)?,
                        bit_offset,
                        bitfield,
                    });
                }
            }
            if at + extra > type_data.len() {
                return Err(BtfError::Truncated(id));
            }
            at += extra;
            types.push(Type {
                kind,
                name,
                ref_type: size_or_type,
                members,
            });
        }

        let mut btf = Self {
            types,
            strings,
            structs_by_name: HashMap::new(),
        };
        let mut by_name = HashMap::new();
        for (id, ty) in btf.types.iter().enumerate() {
            // A forward declaration has no members; the first full definition wins.
            if ty.kind == btf_kind::STRUCT && ty.name != 0 {
                let name = btf.string(ty.name).to_string();
                by_name.entry(name).or_insert(id as u32);
            }
        }
        btf.structs_by_name = by_name;
        Ok(btf)
    }

    fn string(&self, offset: u32) -> &str {
        let rest = self.strings.get(offset as usize..).unwrap_or(&[]);
        let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    /// Follows typedefs and qualifiers to the underlying type.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let ty = self.types.get(id as usize)?;
            match ty.kind {
                btf_kind::TYPEDEF
                | btf_kind::VOLATILE
                | btf_kind::CONST
                | btf_kind::RESTRICT
                | btf_kind::TYPE_TAG => id = ty.ref_type,
                _ => return Some(ty),
            }
        }
        None
    }

    /// Byte offset of `member` in `struct <strukt>`, looking through anonymous unions and
    /// structs the way C does.
    pub fn member_offset(&self, strukt: &str, member: &str) -> Result<u32, BtfError> {
        let id = *self
            .structs_by_name
            .get(strukt)
            .ok_or_else(|| BtfError::NoStruct(strukt.into()))?;
        let ty = &self.types[id as usize];
        match self.find_member(ty, member, 0, 0) {
            Some((_, true)) => Err(BtfError::Bitfield {
                strukt: strukt.into(),
                member: member.into(),
            }),
            Some((bits, false)) => Ok(bits / 8),
            None => Err(BtfError::NoMember {
                strukt: strukt.into(),
                member: member.into(),
            }),
        }
    }

    fn find_member(&self, ty: &Type, member: &str, base: u32, depth: u32) -> Option<(u32, bool)> {
        if depth > 8 {
            return None;
        }
        for m in &ty.members {
            let offset = base + m.bit_offset;
            if m.name != 0 {
                if self.string(m.name) == member {
                    return Some((offset, m.bitfield));
                }
                continue;
            }
            if let Some(inner) = self.resolve(m.type_id)
                && (inner.kind == btf_kind::STRUCT || inner.kind == btf_kind::UNION)
                && let Some(found) = self.find_member(inner, member, offset, depth + 1)
            {
                return Some(found);
            }
        }
        None
    }
}

/// Kernel struct offsets the fd walk of the kernel side needs: task -> files -> fdtable ->
/// file -> inode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FdWalkOffsets {
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdt_max_fds: u32,
    pub fdt_fd: u32,
    pub file_inode: u32,
    pub inode_mode: u32,
    pub inode_ino: u32,
}

impl FdWalkOffsets {
    pub fn from_btf(btf: &Btf) -> Result<Self, BtfError> {
        Ok(Self {
            task_files: btf.member_offset("task_struct", "files")?,
            files_fdt: btf.member_offset("files_struct", "fdt")?,
            fdt_max_fds: btf.member_offset("fdtable", "max_fds")?,
            fdt_fd: btf.member_offset("fdtable", "fd")?,
            file_inode: btf.member_offset("file", "f_inode")?,
            inode_mode: btf.member_offset("inode", "i_mode")?,
            inode_ino: btf.member_offset("inode", "i_ino")?,
        })
    }
}

/// Offsets from a socket's `struct file` to its local address, for connection identity
/// across processes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SockOffsets {
    pub file_private: u32,
    pub socket_sk: u32,
    pub skc_family: u32,
    pub skc_num: u32,
    pub skc_rcv_saddr: u32,
    pub skc_v6_rcv_saddr: u32,
}

impl SockOffsets {
    pub fn from_btf(btf: &Btf) -> Result<Self, BtfError> {
        // The walk reads sock_common fields through the struct sock pointer.
        let common = btf.member_offset("sock", "__sk_common")?;
        let at = |member: &str| -> Result<u32, BtfError> {
            Ok(common + btf.member_offset("sock_common", member)?)
        };
        Ok(Self {
            file_private: btf.member_offset("file", "private_data")?,
            socket_sk: btf.member_offset("socket", "sk")?,
            skc_family: at("skc_family")?,
            skc_num: at("skc_num")?,
            skc_rcv_saddr: at("skc_rcv_saddr")?,
            skc_v6_rcv_saddr: at("skc_v6_rcv_saddr")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-built blob: `struct s { int a; union { int b; long c; }; }`.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0s\0a\0b\0c\0long\0".to_vec();
        let mut types = Vec::new();
        let mut push = |words: &[u32]| {
            for w in words {
                types.extend_from_slice(&w.to_le_bytes());
            }
        };
        // 1: int (size 4)
        push(&[1, 1 << 24, 4, 0x0100_0020]);
        // 2: long (size 8)
        push(&[13, 1 << 24, 8, 0x0100_0040]);
        // 3: anonymous union { b: int @0, c: long @0 }
        push(&[0, (5 << 24) | 2, 8, 9, 1, 0, 11, 2, 0]);
        // 4: struct s { a: int @0, <anon union> @64 bits }
        push(&[5, (4 << 24) | 2, 16, 7, 1, 0, 0, 3, 64]);
        let mut out = Vec::new();
        out.extend_from_slice(&BTF_MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for w in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&types);
        out.extend_from_slice(&strings);
        out
    }

    #[test]
    fn finds_direct_and_anonymous_members() {
        let btf = Btf::parse(&blob()).expect("parses");
        assert_eq!(btf.member_offset("s", "a"), Ok(0));
        assert_eq!(btf.member_offset("s", "c"), Ok(8));
        assert!(matches!(
            btf.member_offset("s", "zz"),
            Err(BtfError::NoMember { .. })
        ));
        assert!(matches!(
            btf.member_offset("t", "a"),
            Err(BtfError::NoStruct(_))
        ));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let good = blob();
        for cut in 0..good.len() {
            let _ = Btf::parse(&good[..cut]);
        }
        assert_eq!(Btf::parse(b"nope").err(), Some(BtfError::BadHeader));
    }

    #[test]
    fn running_kernel_has_the_fd_walk_fields() {
        // The machines here have BTF; elsewhere there is nothing to check.
        let Ok(btf) = Btf::from_sys_fs() else {
            return;
        };
        let offsets = FdWalkOffsets::from_btf(&btf).expect("fd walk offsets");
        assert!(offsets.task_files > 0 && offsets.file_inode > 0);
        let sock = SockOffsets::from_btf(&btf).expect("socket offsets");
        assert!(sock.skc_num > 0 && sock.skc_v6_rcv_saddr > sock.skc_num);
    }
}
