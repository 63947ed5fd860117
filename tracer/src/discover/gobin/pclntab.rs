//! Function entry points from the Go runtime's own symbol table, `.gopclntab`. The runtime
//! needs it for stack unwinding, so it survives `-ldflags=-s -w` (which drops `.symtab` and
//! DWARF): it is how stripped binaries still get uprobes.
//!
//! Layout (runtime/symtab.go `pcHeader`, little-endian words of `ptrSize` bytes):
//!
//! ```text
//! magic u32 | pad u8 u8 | minLC u8 | ptrSize u8 | nfunc | nfiles | [textStart] |
//! funcnameOffset | cuOffset | filetabOffset | pctabOffset | pclnOffset
//! ```
//!
//! `textStart` exists from Go 1.18 on (the Go 1.16/1.17 header lacks it and its function
//! table holds absolute addresses); Go 1.26 stopped filling it (it needs a relocation), so it
//! is then read from the runtime's `moduledata`, which points at the table. The function table
//! (`functab`) at `pclnOffset` holds `nfunc` pairs (entry, funcoff) and a final entry that is
//! the end of the text; since Go 1.18 both are u32 offsets from `textStart`. `funcoff` points
//! (from `pclnOffset`) at a `_func` record: entry (u32 offset since 1.18, else an address),
//! then `nameOff` i32 into `funcnametab`, which holds NUL-terminated names; later its `funcID`
//! (0 for ordinary functions, else a special or generated one such as a wrapper) and, since Go
//! 1.18, a `flag` byte that says whether the function is written in assembly.
//!
//! A name can occur twice, once per calling convention: an assembly function (ABI0) and the
//! wrapper that lets Go code call it with register arguments (ABIInternal), or a Go function
//! and the ABI0 wrapper through which assembly calls it. `.symtab` gives the ABI0 one a
//! `.abi0` suffix; the pclntab does not. Lookups by name want the ABIInternal one, the one Go
//! code calls: an ordinary Go function first, then a wrapper, then assembly.

use std::collections::HashMap;
use std::fmt;

use super::elf::Elf;

/// Go 1.16 and 1.17.
pub const MAGIC_GO116: u32 = 0xffff_fffa;
/// Go 1.18 and 1.19.
pub const MAGIC_GO118: u32 = 0xffff_fff0;
/// Go 1.20 and later.
pub const MAGIC_GO120: u32 = 0xffff_fff1;
/// Go 1.2 to 1.15: a different layout, and older than anything with the register ABI.
const MAGIC_GO12: u32 = 0xffff_fffb;

/// Word offsets inside the runtime's `moduledata`: `pcHeader`, then six slices (three words
/// each) `funcnametab`..`ftab`, `findfunctab`, `minpc`, `maxpc`, `text`. Unchanged from Go
/// 1.16 to 1.26.
const MODULEDATA_FUNCNAMETAB: u64 = 1;
const MODULEDATA_TEXT: u64 = 22;

/// Offset of `_func.funcID`: after the entry and nameOff, seven u32 fields (Go 1.20 added
/// `startLine`, one more). The `flag` byte follows it (Go >= 1.17).
const FUNC_ID_GO116: usize = 8 + 4 * 8;
const FUNC_ID_GO118: usize = 4 + 4 * 8;
const FUNC_ID_GO120: usize = 4 + 4 * 9;
/// `abi.FuncIDNormal`, the same in every release (the other values are renumbered).
const FUNC_ID_NORMAL: u8 = 0;
/// `abi.FuncFlagAsm`, Go >= 1.18.
const FUNC_FLAG_ASM: u8 = 1 << 2;

/// Which header layout a table has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Go116,
    Go118,
    Go120,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Go116 => "Go 1.16-1.17",
            Format::Go118 => "Go 1.18-1.19",
            Format::Go120 => "Go 1.20+",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PclntabError {
    #[error("pclntab is {len} bytes, too short for its header")]
    TooShort { len: usize },
    #[error("pclntab magic {0:#010x} unknown")]
    UnknownMagic(u32),
    #[error("pclntab magic {0:#010x} is the Go 1.2-1.15 format, which is not supported")]
    TooOld(u32),
    #[error("pclntab header invalid: {0}")]
    BadHeader(&'static str),
    #[error("pclntab {what} at {offset:#x} (+{len:#x}) lies outside the {size:#x}-byte table")]
    OutOfBounds {
        what: &'static str,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("pclntab function {index}: entry offset {entry:#x} comes before the previous one")]
    Unsorted { index: u64, entry: u64 },
    #[error(
        "pclntab function {index}: _func entry {func_entry:#x} differs from functab {entry:#x}"
    )]
    EntryMismatch {
        index: u64,
        entry: u64,
        func_entry: u64,
    },
    #[error("pclntab function {index}: name offset {offset} is outside funcnametab")]
    BadName { index: u64, offset: i64 },
    #[error(
        "pclntab has no text start (the header field is 0 and neither the moduledata nor \
         runtime.text gives one)"
    )]
    NoTextStart,
    #[error("pclntab text start {text_start:#x} puts function {name} outside executable code")]
    TextStartMismatch { text_start: u64, name: String },
    #[error("no .gopclntab section, and no pclntab header in the loaded segments")]
    NotFound,
}

/// The table header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub format: Format,
    pub ptr_size: u8,
    pub nfunc: u64,
    pub nfiles: u64,
    /// Base of the function entry offsets; 0 when not stored (Go 1.16/1.17 have no such field,
    /// Go >= 1.26 leave it 0).
    pub text_start: u64,
    pub funcname_offset: u64,
    pub cu_offset: u64,
    pub filetab_offset: u64,
    pub pctab_offset: u64,
    pub pcln_offset: u64,
}

impl Header {
    pub fn parse(data: &[u8]) -> Result<Header, PclntabError> {
        let too_short = PclntabError::TooShort { len: data.len() };
        let magic = read_u32(data, 0).ok_or(too_short.clone())?;
        let format = match magic {
            MAGIC_GO116 => Format::Go116,
            MAGIC_GO118 => Format::Go118,
            MAGIC_GO120 => Format::Go120,
            MAGIC_GO12 => return Err(PclntabError::TooOld(magic)),
            other => return Err(PclntabError::UnknownMagic(other)),
        };
        let fixed = data.get(4..8).ok_or(too_short.clone())?;
        let (pad1, pad2, min_lc, ptr_size) = (fixed[0], fixed[1], fixed[2], fixed[3]);
        if pad1 != 0 || pad2 != 0 {
            return Err(PclntabError::BadHeader("padding bytes are not zero"));
        }
        if !matches!(min_lc, 1 | 2 | 4) {
            return Err(PclntabError::BadHeader(
                "minimum instruction size not 1, 2 or 4",
            ));
        }
        if !matches!(ptr_size, 4 | 8) {
            return Err(PclntabError::BadHeader("pointer size not 4 or 8"));
        }
        let width = usize::from(ptr_size);
        let word =
            |index: usize| read_word(data, 8 + index * width, width).ok_or(too_short.clone());
        // Go 1.18 inserted textStart after nfiles; later fields shift by one word.
        let (text_start, shift) = match format {
            Format::Go116 => (0, 0),
            Format::Go118 | Format::Go120 => (word(2)?, 1),
        };
        Ok(Header {
            format,
            ptr_size,
            nfunc: word(0)?,
            nfiles: word(1)?,
            text_start,
            funcname_offset: word(2 + shift)?,
            cu_offset: word(3 + shift)?,
            filetab_offset: word(4 + shift)?,
            pctab_offset: word(5 + shift)?,
            pcln_offset: word(6 + shift)?,
        })
    }

    /// Whether entries are offsets from a text start (Go >= 1.18) rather than addresses.
    pub fn entries_are_offsets(&self) -> bool {
        self.format != Format::Go116
    }
}

/// One function of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Func {
    pub name: String,
    /// Virtual address of the entry.
    pub entry: u64,
    /// The next function's entry (or the end of the text): the end including the padding
    /// after the function, which the linker fills with INT3.
    pub end: u64,
    /// Not an ordinary function: a wrapper or a special runtime function (`funcID` not 0).
    pub special: bool,
    /// Written in assembly (Go >= 1.18 tables say so; false when unknown).
    pub asm: bool,
}

impl Func {
    /// Preference among functions of one name (lower first); see the module comment.
    fn rank(&self) -> u8 {
        match (self.asm, self.special) {
            (false, false) => 0,
            (false, true) => 1,
            (true, _) => 2,
        }
    }
}

/// The function table of a binary, sorted by entry, with a name index.
#[derive(Debug, Clone)]
pub struct FuncTable {
    format: Format,
    text_start: u64,
    funcs: Vec<Func>,
    by_name: HashMap<String, usize>,
}

impl FuncTable {
    /// Parses the table in `data` (which starts at the header). `text_start` is the base of
    /// the entry offsets for Go >= 1.18 tables (see [`parse_pclntab`]); ignored for Go 1.16.
    pub fn parse(data: &[u8], header: &Header, text_start: u64) -> Result<Self, PclntabError> {
        let size = data.len() as u64;
        let width = u64::from(header.ptr_size);
        // Go >= 1.18 stores u32 entry offsets and u32 func offsets; Go 1.16 two words.
        let field = if header.entries_are_offsets() {
            4
        } else {
            width
        };
        let out_of_bounds = |what, offset, len| PclntabError::OutOfBounds {
            what,
            offset,
            len,
            size,
        };
        let nfunc = header.nfunc;
        let functab_len = nfunc
            .checked_mul(2 * field)
            .and_then(|n| n.checked_add(field))
            .ok_or(out_of_bounds("functab", header.pcln_offset, u64::MAX))?;
        let functab_end = header
            .pcln_offset
            .checked_add(functab_len)
            .filter(|&end| end <= size)
            .ok_or(out_of_bounds("functab", header.pcln_offset, functab_len))?;
        if header.funcname_offset > size {
            return Err(out_of_bounds("funcnametab", header.funcname_offset, 0));
        }
        // funcnametab is followed by cutab; names must not run into it.
        let names_end = if header.cu_offset > header.funcname_offset && header.cu_offset <= size {
            header.cu_offset
        } else {
            size
        };
        let names = slice(data, header.funcname_offset, names_end).ok_or(out_of_bounds(
            "funcnametab",
            header.funcname_offset,
            0,
        ))?;
        let functab = slice(data, header.pcln_offset, functab_end).ok_or(out_of_bounds(
            "functab",
            header.pcln_offset,
            functab_len,
        ))?;
        let pclntable = slice(data, header.pcln_offset, size).ok_or(out_of_bounds(
            "pclntable",
            header.pcln_offset,
            0,
        ))?;

        let entry_word = |i: u64| -> Option<u64> {
            let at = usize::try_from(i.checked_mul(2 * field)?).ok()?;
            read_word(functab, at, field as usize)
        };
        let to_addr = |raw: u64| -> Option<u64> {
            if header.entries_are_offsets() {
                text_start.checked_add(raw)
            } else {
                Some(raw)
            }
        };
        // The bounds check above makes every functab read succeed; the fallbacks below are
        // for the arithmetic, never taken on a table that passed it.
        let functab_err = || out_of_bounds("functab", header.pcln_offset, functab_len);

        let mut funcs = Vec::with_capacity(usize::try_from(nfunc).unwrap_or(0));
        let mut by_name = HashMap::with_capacity(funcs.capacity());
        let mut next_raw = entry_word(0).ok_or_else(functab_err)?;
        for index in 0..nfunc {
            let raw = next_raw;
            let funcoff = {
                let at = usize::try_from(index * 2 * field + field).map_err(|_| functab_err())?;
                read_word(functab, at, field as usize).ok_or_else(functab_err)?
            };
            next_raw = entry_word(index + 1).ok_or_else(functab_err)?;
            if next_raw < raw {
                return Err(PclntabError::Unsorted {
                    index: index + 1,
                    entry: next_raw,
                });
            }
            let func = usize::try_from(funcoff)
                .ok()
                .and_then(|at| pclntable.get(at..))
                .ok_or(out_of_bounds(
                    "_func",
                    header.pcln_offset.saturating_add(funcoff),
                    8,
                ))?;
            let func_err = || out_of_bounds("_func", header.pcln_offset.saturating_add(funcoff), 8);
            let func_entry = read_word(func, 0, field as usize).ok_or_else(func_err)?;
            if func_entry != raw {
                return Err(PclntabError::EntryMismatch {
                    index,
                    entry: raw,
                    func_entry,
                });
            }
            let name_off = read_u32(func, field as usize).ok_or_else(func_err)? as i32;
            let name = name_at(names, name_off).ok_or(PclntabError::BadName {
                index,
                offset: i64::from(name_off),
            })?;
            let func_id_at = match header.format {
                Format::Go116 => FUNC_ID_GO116,
                Format::Go118 => FUNC_ID_GO118,
                Format::Go120 => FUNC_ID_GO120,
            };
            let func_id = *func.get(func_id_at).ok_or_else(func_err)?;
            let asm = match header.format {
                // The 1.17 flag byte has no assembly bit, 1.16 no flag byte.
                Format::Go116 => false,
                Format::Go118 | Format::Go120 => {
                    func.get(func_id_at + 1).ok_or_else(func_err)? & FUNC_FLAG_ASM != 0
                }
            };
            let entry = to_addr(raw).ok_or_else(functab_err)?;
            let end = to_addr(next_raw).ok_or_else(functab_err)?;
            let func = Func {
                name,
                entry,
                end,
                special: func_id != FUNC_ID_NORMAL,
                asm,
            };
            let index = funcs.len();
            by_name
                .entry(func.name.clone())
                .and_modify(|kept: &mut usize| {
                    if funcs
                        .get(*kept)
                        .is_some_and(|other: &Func| func.rank() < other.rank())
                    {
                        *kept = index;
                    }
                })
                .or_insert(index);
            funcs.push(func);
        }
        Ok(FuncTable {
            format: header.format,
            text_start: if header.entries_are_offsets() {
                text_start
            } else {
                0
            },
            funcs,
            by_name,
        })
    }

    /// (entry, end) virtual addresses of the function called `name`.
    pub fn find(&self, name: &str) -> Option<(u64, u64)> {
        let func = self.funcs.get(*self.by_name.get(name)?)?;
        Some((func.entry, func.end))
    }

    /// Functions in address order.
    pub fn iter(&self) -> std::slice::Iter<'_, Func> {
        self.funcs.iter()
    }

    pub fn len(&self) -> usize {
        self.funcs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.funcs.is_empty()
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// The base that entry offsets were added to (0 for Go 1.16 tables).
    pub fn text_start(&self) -> u64 {
        self.text_start
    }
}

impl<'a> IntoIterator for &'a FuncTable {
    type Item = &'a Func;
    type IntoIter = std::slice::Iter<'a, Func>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// Parses a table from its bytes alone: the header's text start when stored, else
/// `text_start` (which a Go >= 1.26 table needs from elsewhere).
pub fn parse_pclntab(data: &[u8], text_start: Option<u64>) -> Result<FuncTable, PclntabError> {
    let header = Header::parse(data)?;
    let base = match (header.entries_are_offsets(), header.text_start, text_start) {
        (false, _, _) => 0,
        (true, stored, _) if stored != 0 => stored,
        (true, _, Some(given)) => given,
        (true, _, None) => return Err(PclntabError::NoTextStart),
    };
    FuncTable::parse(data, &header, base)
}

/// The function table of an ELF file. The table is found by section name (`.gopclntab`;
/// `.data.rel.ro.gopclntab` in PIE built by Go 1.18-1.25), else by the `runtime.pclntab`
/// symbol, else by scanning the loaded segments for a header that parses into a consistent
/// table (files without section headers).
pub(super) fn read_from_elf(elf: &Elf<'_>) -> Result<FuncTable, PclntabError> {
    for name in [".gopclntab", ".data.rel.ro.gopclntab"] {
        if let Some(section) = elf.section(name)
            && section.addr != 0
        {
            return table_at(elf, section.addr, section.data);
        }
    }
    if let (Some(start), Some(end)) = (
        elf.symbol("runtime.pclntab"),
        elf.symbol("runtime.epclntab"),
    ) && let Some(data) = end.checked_sub(start).and_then(|len| elf.read(start, len))
    {
        return table_at(elf, start, data);
    }
    scan(elf)
}

/// Looks for the table in every loaded segment. The magic alone is 4 bytes and may occur by
/// chance, so a candidate counts only when its whole table parses and lands in code.
fn scan(elf: &Elf<'_>) -> Result<FuncTable, PclntabError> {
    // Enough for any real binary; bounds the work on adversarial input.
    const MAX_CANDIDATES: usize = 64;
    let mut tried = 0;
    let mut last_error = PclntabError::NotFound;
    for seg in elf.loads() {
        let Some(bytes) = elf.segment_bytes(seg) else {
            continue;
        };
        // The header is pointer-aligned (the linker aligns it to 16 or 32).
        let skew = ((8 - seg.vaddr % 8) % 8) as usize;
        let mut at = skew;
        while let Some(window) = bytes.get(at..at + 8) {
            let magic = u32::from_le_bytes([window[0], window[1], window[2], window[3]]);
            let plausible = matches!(magic, MAGIC_GO116 | MAGIC_GO118 | MAGIC_GO120)
                && window[4] == 0
                && window[5] == 0
                && window[7] == 8;
            if plausible {
                tried += 1;
                match table_at(elf, seg.vaddr + at as u64, &bytes[at..]) {
                    Ok(table) => {
                        tracing::debug!(
                            vaddr = seg.vaddr + at as u64,
                            "pclntab found by scanning (no section headers)"
                        );
                        return Ok(table);
                    }
                    Err(err) => last_error = err,
                }
                if tried >= MAX_CANDIDATES {
                    return Err(last_error);
                }
            }
            at += 8;
        }
    }
    Err(last_error)
}

/// The table whose header is at `vaddr` (bytes `data`), with its text start resolved and its
/// entries checked to be code.
fn table_at(elf: &Elf<'_>, vaddr: u64, data: &[u8]) -> Result<FuncTable, PclntabError> {
    let header = Header::parse(data)?;
    let text_start = if !header.entries_are_offsets() {
        0
    } else if header.text_start != 0 {
        header.text_start
    } else {
        text_start_from_elf(elf, vaddr, &header).ok_or(PclntabError::NoTextStart)?
    };
    let table = FuncTable::parse(data, &header, text_start)?;
    // A wrong text start (or a table that is not one) shows as entries outside the code.
    if let Some(bad) = table.iter().find(|func| !elf.is_executable(func.entry)) {
        return Err(PclntabError::TextStartMismatch {
            text_start,
            name: bad.name.clone(),
        });
    }
    Ok(table)
}

/// The text start when the header does not have it (Go >= 1.26): the `text` field of the
/// runtime's `moduledata`, whose first field points at the table. Then `runtime.text`. The
/// `.text` section address is not used: with external linking the C start-up code comes first.
fn text_start_from_elf(elf: &Elf<'_>, pclntab: u64, header: &Header) -> Option<u64> {
    if header.ptr_size == 8
        && let Some(moduledata) = find_moduledata(elf, pclntab, header)
        && let Some(text) = elf.read_u64(moduledata.saturating_add(MODULEDATA_TEXT * 8))
        && text != 0
        && elf.is_executable(text)
    {
        return Some(text);
    }
    elf.symbol("runtime.text").filter(|&text| text != 0)
}

/// Address of the `moduledata` that describes the table at `pclntab`: the `.go.module`
/// section (Go >= 1.26), else a search of the writable segments for the table's address
/// followed by its funcnametab's address.
fn find_moduledata(elf: &Elf<'_>, pclntab: u64, header: &Header) -> Option<u64> {
    let funcnametab = pclntab.checked_add(header.funcname_offset)?;
    let is_moduledata = |at: u64| {
        elf.read_u64(at) == Some(pclntab)
            && elf.read_u64(at.saturating_add(MODULEDATA_FUNCNAMETAB * 8)) == Some(funcnametab)
    };
    if let Some(section) = elf.section(".go.module")
        && is_moduledata(section.addr)
    {
        return Some(section.addr);
    }
    let needle = pclntab.to_le_bytes();
    for seg in elf.loads().iter().filter(|seg| seg.writable()) {
        let Some(bytes) = elf.segment_bytes(seg) else {
            continue;
        };
        let skew = ((8 - seg.vaddr % 8) % 8) as usize;
        let mut at = skew;
        while let Some(window) = bytes.get(at..at + 8) {
            if window == needle && is_moduledata(seg.vaddr + at as u64) {
                return Some(seg.vaddr + at as u64);
            }
            at += 8;
        }
    }
    None
}

/// The NUL-terminated name at `offset` of funcnametab.
fn name_at(names: &[u8], offset: i32) -> Option<String> {
    let rest = names.get(usize::try_from(offset).ok()?..)?;
    let len = rest.iter().position(|&b| b == 0)?;
    // Names are UTF-8 in practice; a stray byte must not lose the function.
    Some(String::from_utf8_lossy(&rest[..len]).into_owned())
}

fn slice(data: &[u8], start: u64, end: u64) -> Option<&[u8]> {
    data.get(usize::try_from(start).ok()?..usize::try_from(end).ok()?)
}

fn read_u32(data: &[u8], at: usize) -> Option<u32> {
    let bytes = data.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

/// A little-endian word of 4 or 8 bytes.
fn read_word(data: &[u8], at: usize, width: usize) -> Option<u64> {
    match width {
        4 => read_u32(data, at).map(u64::from),
        8 => {
            let bytes = data.get(at..at.checked_add(8)?)?;
            Some(u64::from_le_bytes(bytes.try_into().ok()?))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a table the way the Go linker lays it out, for `funcs` (name, entry offset)
    /// ending at `end`. A `#...` suffix of a name marks its kind and is not stored.
    fn synth(format: Format, text_start: u64, funcs: &[(&str, u64)], end: u64) -> Vec<u8> {
        let words = if format == Format::Go116 { 7 } else { 8 };
        let header_len = 8 + words * 8;
        let mut names = Vec::new();
        let mut name_offs = Vec::new();
        for (name, _) in funcs {
            name_offs.push(names.len() as i32);
            let name = name.split('#').next().unwrap_or(name);
            names.extend_from_slice(name.as_bytes());
            names.push(0);
        }
        let funcname_offset = header_len as u64;
        let cu_offset = funcname_offset + names.len() as u64;
        let pcln_offset = cu_offset; // empty cutab, filetab and pctab
        let field = if format == Format::Go116 { 8 } else { 4 };
        let functab_len = (funcs.len() * 2 + 1) * field;
        let mut pclntable = vec![0u8; functab_len];
        let put = |buf: &mut Vec<u8>, at: usize, value: u64| {
            buf[at..at + field].copy_from_slice(&value.to_le_bytes()[..field]);
        };
        for (i, (_, entry)) in funcs.iter().enumerate() {
            let funcoff = pclntable.len() as u64;
            put(&mut pclntable, i * 2 * field, *entry);
            put(&mut pclntable, i * 2 * field + field, funcoff);
            // _func: entry, nameOff, ..., funcID, flag (the rest of the record is not read).
            // Name suffixes: `#asm` assembly, `#wrapper` a wrapper (funcID 21 here).
            let id_at = match format {
                Format::Go116 => FUNC_ID_GO116,
                Format::Go118 => FUNC_ID_GO118,
                Format::Go120 => FUNC_ID_GO120,
            };
            let has_flag = format != Format::Go116;
            let mut record = vec![0u8; id_at + 1 + usize::from(has_flag)];
            record[..field].copy_from_slice(&entry.to_le_bytes()[..field]);
            record[field..field + 4].copy_from_slice(&name_offs[i].to_le_bytes());
            if funcs[i].0.ends_with("#wrapper") {
                record[id_at] = 21;
            }
            if has_flag && funcs[i].0.ends_with("#asm") {
                record[id_at + 1] = FUNC_FLAG_ASM;
            }
            pclntable.extend_from_slice(&record);
        }
        put(&mut pclntable, funcs.len() * 2 * field, end);

        let magic = match format {
            Format::Go116 => MAGIC_GO116,
            Format::Go118 => MAGIC_GO118,
            Format::Go120 => MAGIC_GO120,
        };
        let mut out = magic.to_le_bytes().to_vec();
        out.extend_from_slice(&[0, 0, 1, 8]);
        let mut header_words = vec![funcs.len() as u64, 0];
        if format != Format::Go116 {
            header_words.push(text_start);
        }
        header_words.extend_from_slice(&[
            funcname_offset,
            cu_offset,
            cu_offset,
            cu_offset,
            pcln_offset,
        ]);
        for word in header_words {
            out.extend_from_slice(&word.to_le_bytes());
        }
        assert_eq!(out.len(), header_len);
        out.extend_from_slice(&names);
        out.extend_from_slice(&pclntable);
        out
    }

    const FUNCS: [(&str, u64); 4] = [
        ("internal/abi.Kind.String", 0x0),
        ("runtime.newproc1", 0x40),
        ("net/http.serverHandler.ServeHTTP", 0x1a0),
        ("net/http.(*persistConn).roundTrip", 0x400),
    ];

    #[test]
    fn go120_table() {
        let data = synth(Format::Go120, 0x401000, &FUNCS, 0x5c3);
        let table = parse_pclntab(&data, None).expect("parses");
        assert_eq!(table.format(), Format::Go120);
        assert_eq!(table.len(), 4);
        assert_eq!(table.text_start(), 0x401000);
        assert_eq!(table.find("runtime.newproc1"), Some((0x401040, 0x4011a0)));
        assert_eq!(
            table.find("net/http.(*persistConn).roundTrip"),
            Some((0x401400, 0x4015c3))
        );
        assert_eq!(table.find("runtime.newproc"), None);
        let names: Vec<&str> = table.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, FUNCS.map(|(name, _)| name));
    }

    #[test]
    fn go118_and_go116_tables() {
        let data = synth(Format::Go118, 0x401000, &FUNCS, 0x5c3);
        let table = parse_pclntab(&data, None).expect("parses");
        assert_eq!(table.format(), Format::Go118);
        assert_eq!(
            table.find("net/http.serverHandler.ServeHTTP"),
            Some((0x4011a0, 0x401400))
        );
        // Go 1.16: absolute entries.
        let absolute = FUNCS.map(|(name, off)| (name, 0x401000 + off));
        let data = synth(Format::Go116, 0, &absolute, 0x4015c3);
        let table = parse_pclntab(&data, Some(0x999)).expect("parses");
        assert_eq!(table.format(), Format::Go116);
        assert_eq!(table.text_start(), 0);
        assert_eq!(table.find("runtime.newproc1"), Some((0x401040, 0x4011a0)));
    }

    #[test]
    fn abi_internal_wins_over_abi0() {
        for format in [Format::Go118, Format::Go120] {
            let funcs = [
                // Assembly and its ABIInternal wrapper.
                ("runtime.osyield#asm", 0x0),
                ("runtime.other", 0x20),
                ("runtime.osyield#wrapper", 0x40),
                ("runtime.morestack#wrapper", 0x60),
                ("runtime.morestack#asm", 0x80),
                // A Go function and the ABI0 wrapper that assembly calls.
                ("internal/bytealg.countGeneric#wrapper", 0xa0),
                ("internal/bytealg.countGeneric", 0xc0),
            ];
            let table = parse_pclntab(&synth(format, 0x1000, &funcs, 0xe0), None).expect("parses");
            assert_eq!(table.find("runtime.osyield"), Some((0x1040, 0x1060)));
            assert_eq!(table.find("runtime.morestack"), Some((0x1060, 0x1080)));
            assert_eq!(
                table.find("internal/bytealg.countGeneric"),
                Some((0x10c0, 0x10e0))
            );
            assert_eq!(table.iter().filter(|f| f.asm).count(), 2);
            assert_eq!(table.iter().filter(|f| f.special).count(), 3);
        }
    }

    #[test]
    fn text_start_from_outside() {
        // Go >= 1.26 leaves the header field 0.
        let data = synth(Format::Go120, 0, &FUNCS, 0x5c3);
        assert_eq!(
            parse_pclntab(&data, None).err(),
            Some(PclntabError::NoTextStart)
        );
        let table = parse_pclntab(&data, Some(0xa4480)).expect("parses");
        assert_eq!(
            table.find("internal/abi.Kind.String"),
            Some((0xa4480, 0xa44c0))
        );
    }

    #[test]
    fn magics() {
        let mut data = synth(Format::Go120, 0x401000, &FUNCS, 0x5c3);
        data[..4].copy_from_slice(&0x1234_5678u32.to_le_bytes());
        assert_eq!(
            parse_pclntab(&data, None).err(),
            Some(PclntabError::UnknownMagic(0x1234_5678))
        );
        assert_eq!(
            parse_pclntab(&data, None).err().map(|e| e.to_string()),
            Some("pclntab magic 0x12345678 unknown".to_string())
        );
        data[..4].copy_from_slice(&MAGIC_GO12.to_le_bytes());
        assert_eq!(
            parse_pclntab(&data, None).err(),
            Some(PclntabError::TooOld(MAGIC_GO12))
        );
        let mut data = synth(Format::Go120, 0x401000, &FUNCS, 0x5c3);
        data[7] = 3;
        assert!(matches!(
            parse_pclntab(&data, None),
            Err(PclntabError::BadHeader(_))
        ));
    }

    #[test]
    fn truncated_tables_are_errors() {
        let data = synth(Format::Go120, 0x401000, &FUNCS, 0x5c3);
        for len in 0..data.len() {
            // Cutting off the end loses at least the last _func record's tail or the name.
            let result = parse_pclntab(&data[..len], None);
            assert!(
                result.is_err(),
                "truncated to {len} bytes parsed: {result:?}"
            );
        }
    }

    #[test]
    fn garbage_never_panics() {
        let good = synth(Format::Go120, 0x401000, &FUNCS, 0x5c3);
        // xorshift: deterministic noise over everything after the magic and fixed bytes.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..2000 {
            let mut data = good.clone();
            let flips = 1 + round % 16;
            for _ in 0..flips {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let at = 8 + (state as usize) % (data.len() - 8);
                data[at] = (state >> 32) as u8;
            }
            let _ = parse_pclntab(&data, Some(0x401000));
        }
        // Pure noise.
        let noise: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let mut data = MAGIC_GO120.to_le_bytes().to_vec();
        data.extend_from_slice(&[0, 0, 1, 8]);
        data.extend_from_slice(&noise);
        assert!(parse_pclntab(&data, Some(0x401000)).is_err());
    }

    #[test]
    fn inconsistent_tables_are_errors() {
        // A huge function count must fail the bounds check, not allocate.
        let mut data = synth(Format::Go120, 0x401000, &FUNCS, 0x5c3);
        data[8..16].copy_from_slice(&(u64::MAX / 4).to_le_bytes());
        assert!(matches!(
            parse_pclntab(&data, None),
            Err(PclntabError::OutOfBounds {
                what: "functab",
                ..
            })
        ));
        // Entries out of order.
        let unsorted = [FUNCS[0], FUNCS[2], FUNCS[1], FUNCS[3]];
        let data = synth(Format::Go120, 0x401000, &unsorted, 0x5c3);
        assert_eq!(
            parse_pclntab(&data, None).err(),
            Some(PclntabError::Unsorted {
                index: 2,
                entry: 0x40
            })
        );
        // A name offset past funcnametab.
        let mut data = synth(Format::Go120, 0x401000, &FUNCS, 0x5c3);
        let header = Header::parse(&data).expect("header");
        let func0 = header.pcln_offset as usize + (FUNCS.len() * 2 + 1) * 4;
        data[func0 + 4..func0 + 8].copy_from_slice(&100_000i32.to_le_bytes());
        assert_eq!(
            parse_pclntab(&data, None).err(),
            Some(PclntabError::BadName {
                index: 0,
                offset: 100_000
            })
        );
        // _func disagreeing with functab (a wrong layout guess).
        data[func0..func0 + 4].copy_from_slice(&7u32.to_le_bytes());
        assert!(matches!(
            parse_pclntab(&data, None),
            Err(PclntabError::EntryMismatch { index: 0, .. })
        ));
    }
}
