//! Struct field offsets from a Go binary's DWARF.
//!
//! The Go linker writes one `DW_TAG_structure_type` per Go struct type, named by its full
//! import path (`net/http.Request`), with a `DW_TAG_member` child per field carrying
//! `DW_AT_data_member_location`. All types sit in one compile unit (`runtime`'s), but that is
//! the linker's habit, not a promise, so every unit is walked, and the walk stops as soon as
//! every wanted struct has been seen. The linker zlib-compresses the sections
//! (`SHF_COMPRESSED` in every supported release; old linkers named them `.zdebug_*`);
//! `object` finds and inflates both.
//!
//! Pure: bytes in, offsets out. Malformed DWARF is an error, never a panic; the caller then
//! falls back to the offsets table.

use std::borrow::Cow;
use std::collections::BTreeMap;

use gimli::{AttributeValue, EndianSlice, Reader, RunTimeEndian};
use object::{Object, ObjectSection};

use super::{Field, MemberKind};

/// Why no offsets could be read from DWARF.
#[derive(Debug, thiserror::Error)]
pub enum DwarfError {
    #[error("not a readable ELF file: {0}")]
    Elf(#[source] object::Error),
    /// Stripped (`-ldflags=-s -w`, `strip`) or built without DWARF.
    #[error("the binary has no DWARF (.debug_info is absent)")]
    NoDwarf,
    #[error("section {section}: {source}")]
    Section {
        section: &'static str,
        #[source]
        source: object::Error,
    },
    #[error("malformed DWARF in {section}: {source}")]
    Malformed {
        section: &'static str,
        #[source]
        source: gimli::Error,
    },
}

type Slice<'a> = EndianSlice<'a, RunTimeEndian>;

/// Offsets of every table [`Field`] (`Field::ALL`) whose struct and member the binary's DWARF
/// describes. Fields of types the binary does not contain (no gin, no HTTP client) are simply
/// not in the map.
pub fn field_offsets(elf: &[u8]) -> Result<BTreeMap<Field, u64>, DwarfError> {
    field_offsets_of(elf, &Field::ALL)
}

/// As [`field_offsets`], for the given fields. The walk ends once every struct they belong
/// to was seen, so a field of a type the binary does not have costs a walk of all of DWARF:
/// ask only for what the binary's modules can contain.
pub fn field_offsets_of(elf: &[u8], fields: &[Field]) -> Result<BTreeMap<Field, u64>, DwarfError> {
    let file = object::File::parse(elf).map_err(DwarfError::Elf)?;
    let endian = if file.is_little_endian() {
        RunTimeEndian::Little
    } else {
        RunTimeEndian::Big
    };
    let section = |name: &'static str| -> Result<Option<Cow<'_, [u8]>>, DwarfError> {
        match file.section_by_name(name) {
            None => Ok(None),
            Some(s) => s
                .uncompressed_data()
                .map(Some)
                .map_err(|source| DwarfError::Section {
                    section: name,
                    source,
                }),
        }
    };
    // Only what names and member offsets need: .debug_line, .debug_loclists and the rest
    // are most of the DWARF and are never decompressed.
    let info = section(".debug_info")?.ok_or(DwarfError::NoDwarf)?;
    let abbrev = section(".debug_abbrev")?.unwrap_or_default();
    // Go writes names inline (DW_FORM_string); other producers use .debug_str.
    let strings = section(".debug_str")?.unwrap_or_default();
    walk(
        gimli::DebugInfo::new(&info, endian),
        gimli::DebugAbbrev::new(&abbrev, endian),
        gimli::DebugStr::new(&strings, endian),
        fields,
    )
}

/// A struct type we look for, and the members of it we want.
struct Wanted {
    type_name: &'static str,
    members: Vec<(&'static str, Field)>,
    seen: bool,
}

fn wanted(fields: &[Field]) -> Vec<Wanted> {
    let mut out: Vec<Wanted> = Vec::new();
    for &field in fields {
        let (type_name, member) = field.dwarf_name();
        match out.iter_mut().find(|w| w.type_name == type_name) {
            Some(w) => w.members.push((member, field)),
            None => out.push(Wanted {
                type_name,
                members: vec![(member, field)],
                seen: false,
            }),
        }
    }
    out
}

fn walk(
    info: gimli::DebugInfo<Slice<'_>>,
    abbrev: gimli::DebugAbbrev<Slice<'_>>,
    strings: gimli::DebugStr<Slice<'_>>,
    fields: &[Field],
) -> Result<BTreeMap<Field, u64>, DwarfError> {
    let bad_info = |source| DwarfError::Malformed {
        section: ".debug_info",
        source,
    };
    let mut wanted = wanted(fields);
    let mut found = BTreeMap::new();
    // Go's units all share one abbreviation table; parse it once, not once per unit.
    let mut abbrevs: Option<(gimli::DebugAbbrevOffset, gimli::Abbreviations)> = None;
    let mut units = info.units();
    while let Some(header) = units.next().map_err(bad_info)? {
        let offset = header.debug_abbrev_offset();
        let table = match abbrevs {
            Some((cached, ref table)) if cached == offset => table,
            _ => {
                let table =
                    header
                        .abbreviations(&abbrev)
                        .map_err(|source| DwarfError::Malformed {
                            section: ".debug_abbrev",
                            source,
                        })?;
                &abbrevs.insert((offset, table)).1
            }
        };
        let mut entries = header.entries_raw(table, None).map_err(bad_info)?;
        // The wanted struct whose members are being read, and the depth of those members.
        let mut inside: Option<(usize, isize)> = None;
        while !entries.is_empty() {
            let depth = entries.next_depth();
            let Some(entry) = entries.read_abbreviation().map_err(bad_info)? else {
                continue;
            };
            if inside.is_some_and(|(_, member_depth)| depth < member_depth) {
                inside = None;
                if wanted.iter().all(|w| w.seen) {
                    return Ok(found);
                }
            }
            match (entry.tag(), inside) {
                (gimli::DW_TAG_structure_type, None) => {
                    let mut name = None;
                    for spec in entry.attributes() {
                        let attr = entries.read_attribute(*spec).map_err(bad_info)?;
                        if attr.name() == gimli::DW_AT_name {
                            name = attr_str(attr.value(), &strings);
                        }
                    }
                    // A struct without children is a declaration: keep looking.
                    let index = name
                        .and_then(|n| wanted.iter().position(|w| !w.seen && w.is(n)))
                        .filter(|_| entry.has_children());
                    if let Some(index) = index {
                        wanted[index].seen = true;
                        inside = Some((index, depth + 1));
                    }
                }
                (gimli::DW_TAG_member, Some((index, member_depth))) if depth == member_depth => {
                    let (mut name, mut location, mut ty) = (None, None, None);
                    for spec in entry.attributes() {
                        let attr = entries.read_attribute(*spec).map_err(bad_info)?;
                        match attr.name() {
                            gimli::DW_AT_name => name = attr_str(attr.value(), &strings),
                            gimli::DW_AT_data_member_location => {
                                location = member_location(attr.value());
                            }
                            gimli::DW_AT_type => ty = Some(attr.value()),
                            _ => {}
                        }
                    }
                    let (Some(name), Some(location)) = (name, location) else {
                        continue;
                    };
                    for &(member, field) in &wanted[index].members {
                        if member.as_bytes() != name {
                            continue;
                        }
                        let fits = match field.member_kind() {
                            MemberKind::Any => true,
                            kind => {
                                let tag =
                                    ty.and_then(|t| type_tag(&info, &abbrev, &header, table, t));
                                tag == Some(match kind {
                                    MemberKind::Pointer => gimli::DW_TAG_pointer_type,
                                    _ => gimli::DW_TAG_structure_type,
                                })
                            }
                        };
                        if fits {
                            found.insert(field, location);
                        }
                    }
                }
                _ => entries
                    .skip_attributes(entry.attributes())
                    .map_err(bad_info)?,
            }
        }
        // Also covers a wanted struct that was the unit's last DIE.
        if wanted.iter().all(|w| w.seen) {
            return Ok(found);
        }
    }
    Ok(found)
}

/// The tag of the type a `DW_AT_type` names, through typedefs (Go names each struct type
/// with a typedef of it). References point into this unit or, as Go writes them, into
/// `.debug_info` at large.
fn type_tag(
    info: &gimli::DebugInfo<Slice<'_>>,
    abbrev: &gimli::DebugAbbrev<Slice<'_>>,
    header: &gimli::UnitHeader<Slice<'_>>,
    table: &gimli::Abbreviations,
    value: AttributeValue<Slice<'_>>,
) -> Option<gimli::DwTag> {
    let mut value = value;
    // A few hops at most: a typedef chain longer than this is not Go's.
    for _ in 0..8 {
        let (tag, next) = type_entry(info, abbrev, header, table, value)?;
        match (tag, next) {
            (gimli::DW_TAG_typedef, Some(next)) => value = next,
            (tag, _) => return Some(tag),
        }
    }
    None
}

/// The tag and `DW_AT_type` of the DIE a reference names.
fn type_entry<'a>(
    info: &gimli::DebugInfo<Slice<'a>>,
    abbrev: &gimli::DebugAbbrev<Slice<'a>>,
    header: &gimli::UnitHeader<Slice<'a>>,
    table: &gimli::Abbreviations,
    value: AttributeValue<Slice<'a>>,
) -> Option<(gimli::DwTag, Option<AttributeValue<Slice<'a>>>)> {
    let of = |e: gimli::DebuggingInformationEntry<'_, '_, Slice<'a>>| {
        let ty = e.attr_value(gimli::DW_AT_type).ok().flatten();
        (e.tag(), ty)
    };
    let global = match value {
        AttributeValue::UnitRef(offset) => return header.entry(table, offset).ok().map(of),
        AttributeValue::DebugInfoRef(offset) => offset,
        _ => return None,
    };
    if let Some(offset) = global.to_unit_offset(header) {
        return header.entry(table, offset).ok().map(of);
    }
    let mut units = info.units();
    while let Ok(Some(other)) = units.next() {
        if let Some(offset) = global.to_unit_offset(&other) {
            let table = other.abbreviations(abbrev).ok()?;
            return other.entry(&table, offset).ok().map(of);
        }
    }
    None
}

impl Wanted {
    fn is(&self, name: &[u8]) -> bool {
        self.type_name.as_bytes() == name
    }
}

/// The bytes of a name attribute, borrowed from the section (no allocation). Forms that need
/// a unit's string-offsets base (`DW_FORM_strx*`) are not used by Go and count as no name.
fn attr_str<'a>(
    value: AttributeValue<Slice<'a>>,
    strings: &gimli::DebugStr<Slice<'a>>,
) -> Option<&'a [u8]> {
    match value {
        AttributeValue::String(s) => Some(s.slice()),
        AttributeValue::DebugStrRef(offset) => strings.get_str(offset).ok().map(|s| s.slice()),
        _ => None,
    }
}

/// `DW_AT_data_member_location`: a constant (what Go writes), or the `DW_OP_plus_uconst N`
/// expression older DWARF producers use for the same thing.
fn member_location(value: AttributeValue<Slice<'_>>) -> Option<u64> {
    match value {
        AttributeValue::Exprloc(expr) => {
            let mut r = expr.0;
            let op = r.read_u8().ok()?;
            let n = r.read_uleb128().ok()?;
            (op == gimli::DW_OP_plus_uconst.0 && r.is_empty()).then_some(n)
        }
        other => other.udata_value(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DW_FORM_STRING: u8 = 0x08;
    const DW_FORM_UDATA: u8 = 0x0f;
    const DW_FORM_EXPRLOC: u8 = 0x18;
    const DW_FORM_REF4: u8 = 0x13;
    const LE: RunTimeEndian = RunTimeEndian::Little;

    /// Abbreviations: 1 unit, 2 struct with children, 3 member (udata offset), 4 struct
    /// without children (a declaration), 5 member with an exprloc offset.
    fn abbrev() -> Vec<u8> {
        let (name, loc) = (
            gimli::DW_AT_name.0 as u8,
            gimli::DW_AT_data_member_location.0 as u8,
        );
        let (unit, st, member) = (
            gimli::DW_TAG_compile_unit.0 as u8,
            gimli::DW_TAG_structure_type.0 as u8,
            gimli::DW_TAG_member.0 as u8,
        );
        let mut a = vec![1, unit, 1, name, DW_FORM_STRING, 0, 0];
        a.extend([2, st, 1, name, DW_FORM_STRING, 0, 0]);
        a.extend([3, member, 0, name, DW_FORM_STRING, loc, DW_FORM_UDATA, 0, 0]);
        a.extend([4, st, 0, name, DW_FORM_STRING, 0, 0]);
        a.extend([
            5,
            member,
            0,
            name,
            DW_FORM_STRING,
            loc,
            DW_FORM_EXPRLOC,
            0,
            0,
        ]);
        // 6 member with a type reference, 7 pointer type, 8 typedef of a type reference.
        let ty = gimli::DW_AT_type.0 as u8;
        a.extend([
            6,
            member,
            0,
            name,
            DW_FORM_STRING,
            loc,
            DW_FORM_UDATA,
            ty,
            DW_FORM_REF4,
        ]);
        a.extend([0, 0]);
        a.extend([7, gimli::DW_TAG_pointer_type.0 as u8, 0, 0, 0]);
        a.extend([8, gimli::DW_TAG_typedef.0 as u8, 0, ty, DW_FORM_REF4, 0, 0]);
        a.push(0);
        a
    }

    fn cstr(out: &mut Vec<u8>, s: &str) {
        out.extend(s.as_bytes());
        out.push(0);
    }

    fn member(out: &mut Vec<u8>, name: &str, offset: u8) {
        out.push(3);
        cstr(out, name);
        out.push(offset);
    }

    /// One DWARF 4 unit with the given DIE bytes as the children of its root.
    fn unit(children: &[u8]) -> Vec<u8> {
        let mut body = vec![4, 0, 0, 0, 0, 0, 8]; // version 4, abbrev offset 0, 8-byte addresses
        body.push(1);
        cstr(&mut body, "runtime");
        body.extend(children);
        body.push(0);
        let mut out = u32::try_from(body.len())
            .expect("small")
            .to_le_bytes()
            .to_vec();
        out.extend(body);
        out
    }

    fn run(info: &[u8]) -> Result<BTreeMap<Field, u64>, DwarfError> {
        run_for(info, &Field::ALL)
    }

    fn run_for(info: &[u8], fields: &[Field]) -> Result<BTreeMap<Field, u64>, DwarfError> {
        let abbrev = abbrev();
        walk(
            gimli::DebugInfo::new(info, LE),
            gimli::DebugAbbrev::new(&abbrev, LE),
            gimli::DebugStr::new(&[], LE),
            fields,
        )
    }

    fn sample() -> Vec<u8> {
        let mut d = Vec::new();
        // A declaration of a wanted type first: no members, must not end the search.
        d.push(4);
        cstr(&mut d, "net/url.URL");
        // An unwanted struct with a member of a wanted name.
        d.push(2);
        cstr(&mut d, "example.com/x.T");
        member(&mut d, "Path", 99);
        d.push(0);
        d.push(2);
        cstr(&mut d, "net/http.Request");
        member(&mut d, "Method", 0);
        member(&mut d, "URL", 16);
        // A struct nested in the wanted one (Go does not, DWARF may): not its members.
        d.push(2);
        cstr(&mut d, "inner");
        member(&mut d, "Method", 77);
        d.push(0);
        d.push(0);
        d.push(2);
        cstr(&mut d, "net/url.URL");
        d.push(5);
        cstr(&mut d, "Path");
        d.extend([2, gimli::DW_OP_plus_uconst.0, 56]); // exprloc: length 2, plus_uconst 56
        d.push(0);
        d
    }

    #[test]
    fn finds_members_of_wanted_structs_only() {
        let found = run(&unit(&sample())).expect("walks");
        let want = BTreeMap::from([
            (Field::RequestMethod, 0),
            (Field::RequestUrl, 16),
            (Field::UrlPath, 56),
        ]);
        assert_eq!(found, want);
    }

    #[test]
    fn types_spread_over_units_are_found() {
        let mut info = unit(&sample()[..]);
        let mut d = Vec::new();
        d.push(2);
        cstr(&mut d, "internal/poll.FD");
        member(&mut d, "Sysfd", 16);
        d.push(0);
        info.extend(unit(&d));
        let found = run(&info).expect("walks");
        assert_eq!(found.get(&Field::PollFdSysfd), Some(&16));
        assert_eq!(found.get(&Field::RequestUrl), Some(&16));
    }

    /// grpc-go embeds its common stream by value in newer releases and as a pointer in older
    /// ones: the member's type decides which field it is.
    #[test]
    fn embedded_member_by_value_or_pointer() {
        // Children of the unit's root start after the 11-byte header and the root DIE.
        let base = 11 + 1 + "runtime".len() + 1;
        let mut d = Vec::new();
        let pointer = base + d.len();
        d.push(7);
        let structure = base + d.len();
        d.push(4);
        cstr(&mut d, "google.golang.org/grpc/internal/transport.Stream");
        // Go's members name the struct through a typedef of it.
        let by_value = base + d.len();
        d.push(8);
        d.extend(u32::try_from(structure).expect("small").to_le_bytes());
        let typed_member = |d: &mut Vec<u8>, offset: u8, ty: usize| {
            d.push(6);
            cstr(d, "Stream");
            d.push(offset);
            d.extend(u32::try_from(ty).expect("small").to_le_bytes());
        };
        d.push(2);
        cstr(
            &mut d,
            "google.golang.org/grpc/internal/transport.ServerStream",
        );
        typed_member(&mut d, 8, pointer);
        d.push(0);
        d.push(2);
        cstr(
            &mut d,
            "google.golang.org/grpc/internal/transport.ClientStream",
        );
        typed_member(&mut d, 0, by_value);
        d.push(0);
        let all: Vec<Field> = Field::every().collect();
        let found = run_for(&unit(&d), &all).expect("walks");
        assert_eq!(
            found,
            BTreeMap::from([
                (Field::GrpcServerStreamStreamPtr, 8),
                (Field::GrpcClientStreamStream, 0),
            ])
        );
    }

    #[test]
    fn malformed_dwarf_is_an_error_never_a_panic() {
        let info = unit(&sample());
        for len in 0..info.len() {
            let _ = run(&info[..len]);
        }
        for i in 0..info.len() {
            for value in [0x00, 0x01, 0x05, 0x7f, 0x80, 0xff] {
                let mut bad = info.clone();
                bad[i] = value;
                let _ = run(&bad);
            }
        }
        // An abbreviation code the table does not have.
        assert!(matches!(
            run(&unit(&[9])),
            Err(DwarfError::Malformed { .. })
        ));
    }

    #[test]
    fn not_elf_is_a_typed_error() {
        assert!(matches!(field_offsets(b"hello"), Err(DwarfError::Elf(_))));
        assert!(matches!(field_offsets(&[]), Err(DwarfError::Elf(_))));
    }

    #[test]
    fn wanted_groups_members_by_type() {
        let w = wanted(&Field::ALL);
        let request = w.iter().find(|w| w.type_name == "net/http.Request");
        let members: Vec<&str> = request
            .map(|r| r.members.iter().map(|m| m.0).collect())
            .unwrap_or_default();
        assert_eq!(members, ["Method", "URL"]);
        let fields: usize = w.iter().map(|w| w.members.len()).sum();
        assert_eq!(fields, Field::ALL.len());
    }

    /// The real thing: the probe program built by the machine's Go.
    #[test]
    fn real_go_binary() {
        let probe = super::super::offsets::tests::probe_build();
        let bytes = std::fs::read(&probe.unstripped).expect("read probe");
        let found = field_offsets(&bytes).expect("DWARF");
        assert_eq!(
            found.len(),
            Field::ALL.len(),
            "every field found: {found:?}"
        );
        let stripped = std::fs::read(&probe.stripped).expect("read stripped probe");
        assert!(matches!(field_offsets(&stripped), Err(DwarfError::NoDwarf)));
    }
}
