//! Small helpers over the ELF container of a Go binary: sections by name, PT_LOAD segments,
//! virtual address -> file offset (uprobes attach by file offset, not by address), and reads
//! at a virtual address (Go's tables point at each other by address).
//!
//! Only 64-bit little-endian x86-64 files are handled: that is the only target the kernel
//! side has uprobes for, and it keeps every read here one fixed width and byte order.

use object::elf::{EM_X86_64, PF_W, PF_X, PT_LOAD};
use object::read::elf::{ElfFile64, ProgramHeader as _};
use object::{Endianness, Object, ObjectSection, ObjectSymbol};

/// Length of the ELF64 file header; enough to tell whether a file is worth reading whole.
pub const HEADER_LEN: usize = 64;

/// What the first bytes of a file say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Not an ELF file at all (script, data, ...).
    NotElf,
    /// ELF, but not 64-bit little-endian x86-64.
    Foreign,
    /// 64-bit little-endian x86-64 ELF.
    X86_64,
}

/// Classifies a file from its first bytes (at least [`HEADER_LEN`] for a positive answer).
pub fn classify(header: &[u8]) -> Kind {
    if header.len() < HEADER_LEN || !header.starts_with(b"\x7fELF") {
        return Kind::NotElf;
    }
    // e_ident[EI_CLASS] = ELFCLASS64, e_ident[EI_DATA] = ELFDATA2LSB, e_machine at 18.
    let machine = u16::from_le_bytes([header[18], header[19]]);
    if header[4] == 2 && header[5] == 1 && machine == EM_X86_64.0 {
        Kind::X86_64
    } else {
        Kind::Foreign
    }
}

/// Why a file could not be read as ELF.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ElfError {
    #[error("not a little-endian x86-64 ELF64 file")]
    NotX86_64,
    #[error("malformed ELF: {0}")]
    Malformed(object::Error),
}

/// A PT_LOAD program header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub vaddr: u64,
    pub memsz: u64,
    pub offset: u64,
    pub filesz: u64,
    pub flags: u32,
}

impl Segment {
    pub fn writable(&self) -> bool {
        self.flags & PF_W.0 != 0
    }

    pub fn executable(&self) -> bool {
        self.flags & PF_X.0 != 0
    }

    /// Whether `vaddr` lies in the file-backed part (the tail up to memsz is zero-fill, .bss,
    /// and has no file offset).
    fn contains_file_backed(&self, vaddr: u64) -> bool {
        vaddr >= self.vaddr && vaddr - self.vaddr < self.filesz
    }
}

/// A section found by name.
#[derive(Debug, Clone, Copy)]
pub struct Section<'data> {
    /// sh_addr (0 for sections that are not loaded, such as .symtab).
    pub addr: u64,
    /// The section's bytes as stored in the file (not decompressed).
    pub data: &'data [u8],
}

/// A parsed ELF file with its PT_LOAD segments at hand.
pub struct Elf<'data> {
    data: &'data [u8],
    file: ElfFile64<'data, Endianness>,
    loads: Vec<Segment>,
}

impl<'data> Elf<'data> {
    /// Parses an x86-64 ELF64 file. Callers check [`classify`] first; this fails on anything
    /// else, and on files whose headers point outside the file.
    pub fn parse(data: &'data [u8]) -> Result<Self, ElfError> {
        if classify(data) != Kind::X86_64 {
            return Err(ElfError::NotX86_64);
        }
        let file = ElfFile64::<Endianness>::parse(data).map_err(ElfError::Malformed)?;
        let endian = file.endian();
        let loads = file
            .elf_program_headers()
            .iter()
            .filter(|ph| ph.p_type(endian) == PT_LOAD)
            .map(|ph| Segment {
                vaddr: ph.p_vaddr(endian),
                memsz: ph.p_memsz(endian),
                offset: ph.p_offset(endian),
                filesz: ph.p_filesz(endian),
                flags: ph.p_flags(endian).0,
            })
            // A segment whose ends overflow is not one a loader would map; dropping it here
            // lets every address computed inside a segment be plain arithmetic.
            .filter(|seg| {
                seg.vaddr.checked_add(seg.memsz.max(seg.filesz)).is_some()
                    && seg.offset.checked_add(seg.filesz).is_some()
            })
            .collect();
        Ok(Elf { data, file, loads })
    }

    pub fn loads(&self) -> &[Segment] {
        &self.loads
    }

    /// The section called `name`, if the file has section headers and one of that name.
    pub fn section(&self, name: &str) -> Option<Section<'data>> {
        let section = self.file.section_by_name(name)?;
        // NOBITS sections (.bss) have no file bytes; callers never want those.
        let data = section.data().ok()?;
        Some(Section {
            addr: section.address(),
            data,
        })
    }

    pub fn has_section(&self, name: &str) -> bool {
        self.file.section_by_name(name).is_some()
    }

    /// File offset of a virtual address, through the PT_LOAD segment that maps it.
    pub fn vaddr_to_offset(&self, vaddr: u64) -> Option<u64> {
        let seg = self.segment_of(vaddr)?;
        seg.offset.checked_add(vaddr - seg.vaddr)
    }

    /// `len` bytes at a virtual address; None unless they all lie in one segment's file-backed
    /// part (a table that straddles segments or runs into .bss is not one we wrote).
    pub fn read(&self, vaddr: u64, len: u64) -> Option<&'data [u8]> {
        let seg = self.segment_of(vaddr)?;
        let within = vaddr - seg.vaddr;
        if within.checked_add(len)? > seg.filesz {
            return None;
        }
        let start = usize::try_from(seg.offset.checked_add(within)?).ok()?;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        self.data.get(start..end)
    }

    /// A little-endian u64 at a virtual address (a pointer in Go's data).
    pub fn read_u64(&self, vaddr: u64) -> Option<u64> {
        let bytes = self.read(vaddr, 8)?;
        Some(u64::from_le_bytes(bytes.try_into().ok()?))
    }

    /// The file-backed bytes of a segment.
    pub fn segment_bytes(&self, seg: &Segment) -> Option<&'data [u8]> {
        let start = usize::try_from(seg.offset).ok()?;
        let end = start.checked_add(usize::try_from(seg.filesz).ok()?)?;
        self.data.get(start..end)
    }

    /// Whether `vaddr` is file-backed code.
    pub fn is_executable(&self, vaddr: u64) -> bool {
        self.segment_of(vaddr).is_some_and(|seg| seg.executable())
    }

    /// Whether the file has a static symbol table (`go build -ldflags=-s` drops it).
    pub fn has_symtab(&self) -> bool {
        self.file.symbol_table().is_some()
    }

    /// Address of a `.symtab` symbol.
    pub fn symbol(&self, name: &str) -> Option<u64> {
        self.file
            .symbols()
            .find(|sym| sym.name_bytes().ok() == Some(name.as_bytes()))
            .map(|sym| sym.address())
    }

    /// `.symtab` symbols of type STT_FUNC, as (name, address).
    #[cfg(test)]
    pub fn func_symbols(&self) -> Vec<(String, u64)> {
        self.file
            .symbols()
            .filter(|sym| sym.elf_symbol().st_type() == object::elf::STT_FUNC)
            .filter_map(|sym| Some((sym.name().ok()?.to_string(), sym.address())))
            .collect()
    }

    fn segment_of(&self, vaddr: u64) -> Option<&Segment> {
        self.loads
            .iter()
            .find(|seg| seg.contains_file_backed(vaddr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_headers() {
        assert_eq!(classify(b""), Kind::NotElf);
        assert_eq!(classify(b"#!/bin/sh\n"), Kind::NotElf);
        let mut header = [0u8; HEADER_LEN];
        header[..4].copy_from_slice(b"\x7fELF");
        header[4] = 2;
        header[5] = 1;
        header[18..20].copy_from_slice(&EM_X86_64.0.to_le_bytes());
        assert_eq!(classify(&header), Kind::X86_64);
        // aarch64
        header[18..20].copy_from_slice(&183u16.to_le_bytes());
        assert_eq!(classify(&header), Kind::Foreign);
        // 32-bit
        header[18..20].copy_from_slice(&EM_X86_64.0.to_le_bytes());
        header[4] = 1;
        assert_eq!(classify(&header), Kind::Foreign);
        // Short header: never read past the end.
        assert_eq!(classify(&header[..20]), Kind::NotElf);
    }

    #[test]
    fn garbage_does_not_parse() {
        let mut data = vec![0u8; 200];
        data[..4].copy_from_slice(b"\x7fELF");
        data[4] = 2;
        data[5] = 1;
        data[18..20].copy_from_slice(&EM_X86_64.0.to_le_bytes());
        // Program headers said to be far outside the file.
        data[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        data[54..56].copy_from_slice(&56u16.to_le_bytes());
        data[56..58].copy_from_slice(&3u16.to_le_bytes());
        assert!(Elf::parse(&data).is_err());
        assert!(Elf::parse(b"not elf").is_err());
    }
}
