//! The struct field offsets of one Go binary: from its DWARF when it has one, else from a
//! table measured on real builds (`offsets_table.json`, written by `cargo xtask go-offsets`).
//!
//! The table is never stretched. Standard-library layouts are keyed by Go release: an entry
//! covers the patch releases of one minor from the first to the last it was measured with
//! (every release the module proxy served in between was measured too, and patch releases
//! are cumulative, so a layout equal at both ends holds in between). Minor alone is not
//! enough: go1.26.11 moved `net/http.response.status` from 120 to 128. gin's `Context` is
//! keyed by gin's exact version and the Go minor it was built with; the fields before
//! `fullPath` are interfaces, pointers, slices and integers, whose sizes no Go patch changes.
//! A binary whose key is not in the table gets no offset for that field (and the hooks that
//! need it stay off) rather than a neighbouring version's, which could read garbage.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use tracing::{debug, error};

use super::{BuildInfo, Field, GoOffsets, GoVersion, MemberKind, OffsetsSource, dwarf};

/// The generated table, embedded at build time.
const EMBEDDED_TABLE: &str = include_str!("offsets_table.json");

/// Offsets for `elf`, a Go binary described by `info`: DWARF first, field by field; the
/// embedded table for what DWARF did not give. Never fails: a field nobody knows is absent,
/// and [`GoOffsets::missing`] says why.
pub fn resolve(elf: &[u8], info: &BuildInfo) -> GoOffsets {
    // Types of modules the binary does not use cannot be in it: not looked for, so the walk
    // can end early.
    let fields: Vec<Field> = Field::every()
        .filter(|f| f.module().is_none_or(|m| uses_module(info, m)))
        .collect();
    let (from_dwarf, has_dwarf) = match dwarf::field_offsets_of(elf, &fields) {
        Ok(found) => (found, true),
        Err(e) => {
            // Routine for stripped binaries; the table takes over.
            debug!(error = %e, "no DWARF offsets; using the offsets table");
            (BTreeMap::new(), false)
        }
    };
    let mut offsets = resolve_with(&from_dwarf, info, OffsetsTable::embedded());
    offsets.dwarf = has_dwarf;
    offsets
}

/// [`resolve`] with the DWARF offsets already read and a given table.
pub fn resolve_with(
    from_dwarf: &BTreeMap<Field, u64>,
    info: &BuildInfo,
    table: &OffsetsTable,
) -> GoOffsets {
    let mut out = GoOffsets::default();
    for field in Field::every() {
        let (offset, source) = match from_dwarf.get(&field) {
            Some(&offset) => (offset, OffsetsSource::Dwarf),
            None => match table.lookup(field, info) {
                Ok(offset) => (offset, OffsetsSource::Table),
                Err(_) => continue,
            },
        };
        out.fields.insert(field, offset);
        out.sources.insert(field, source);
    }
    out
}

impl GoOffsets {
    /// The fields this binary may need but has no offset for, and why, from the embedded
    /// table; for the caller's log ("no offsets for go1.18.10", "no offsets for
    /// github.com/gin-gonic/gin v1.6.3 with go1.21"). Fields of modules the binary does not
    /// use are not listed.
    pub fn missing(&self, info: &BuildInfo) -> Vec<Missing> {
        let table = OffsetsTable::embedded();
        Field::every()
            // One of two declarations of a member is enough; the by-value one speaks for both.
            .filter(|field| field.member_kind() != MemberKind::Pointer)
            .filter(|field| {
                self.get(*field).is_none()
                    && field.alternative().is_none_or(|a| self.get(a).is_none())
            })
            .filter_map(|field| table.lookup(field, info).err())
            .filter(|m| m.reason != MissingReason::ModuleNotUsed)
            .map(|mut m| {
                if m.reason == MissingReason::DwarfOnly && self.dwarf {
                    m.reason = MissingReason::NotInDwarf;
                }
                m
            })
            .collect()
    }
}

/// A field without an offset, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub field: Field,
    pub reason: MissingReason,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MissingReason {
    /// The buildinfo's Go version did not parse.
    NoGoVersion { raw: String },
    /// A pre-release (`go1.27rc1`): layouts may still change before the release, and
    /// [`GoVersion`] reads it as patch 0, so it is never looked up.
    PreRelease { raw: String },
    /// No table entry covers this Go release.
    GoNotInTable { go: GoVersion },
    /// The table has no entry for this module version built with this Go minor.
    ModuleNotInTable {
        module: &'static str,
        version: String,
        go: GoVersion,
    },
    /// The entry exists but did not measure this field (the type was not in the build).
    NotMeasured,
    /// The binary does not depend on the field's module (no gin): nothing is missing.
    ModuleNotUsed,
    /// A field only DWARF gives (grpc-go's), and the binary has none (stripped).
    DwarfOnly,
    /// A field only DWARF gives, and the binary's DWARF does not describe it (a release with
    /// another layout).
    NotInDwarf,
}

/// Whether the binary `info` describes is built with `module` (a dependency, or the main
/// module itself).
fn uses_module(info: &BuildInfo, module: &str) -> bool {
    info.deps.contains_key(module) || info.main_module == module
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", field_key(self.field))?;
        match &self.reason {
            MissingReason::NoGoVersion { raw } => write!(f, "unknown Go version {raw:?}"),
            MissingReason::PreRelease { raw } => write!(f, "Go pre-release {raw:?}"),
            MissingReason::GoNotInTable { go } => write!(f, "no offsets for {go}"),
            MissingReason::ModuleNotInTable {
                module,
                version,
                go,
            } => write!(
                f,
                "no offsets for {module} {version} with go{}.{}",
                go.major, go.minor
            ),
            MissingReason::NotMeasured => write!(f, "not measured for this version"),
            MissingReason::ModuleNotUsed => write!(f, "module not used"),
            MissingReason::DwarfOnly => {
                write!(
                    f,
                    "only read from DWARF, and the binary has none (stripped)"
                )
            }
            MissingReason::NotInDwarf => write!(f, "not in the binary's DWARF"),
        }
    }
}

/// Why a table does not load.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("offsets table is not valid JSON of the expected shape: {0}")]
    Json(#[from] serde_json::Error),
    #[error("offsets table: unknown field {0:?}")]
    UnknownField(String),
    #[error("offsets table: {field:?} does not belong in {entry}")]
    MisplacedField { field: String, entry: String },
    #[error("offsets table: bad Go minor {0:?} (want e.g. \"1.21\")")]
    BadGoMinor(String),
    #[error("offsets table: {version:?} is not a go{minor} release")]
    BadMeasuredWith { version: String, minor: String },
    #[error("offsets table: {0} appears twice")]
    Duplicate(String),
    #[error("offsets table: conflicting offsets for {field} in {entry}: {a} and {b}")]
    Conflict {
        field: String,
        entry: String,
        a: u64,
        b: u64,
    },
}

/// The file format. Field keys are `<DWARF type>.<member>` (`net/http.Request.Method`), so
/// the file reads on its own.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TableFile {
    #[serde(default)]
    comment: String,
    /// Standard-library layouts: per Go minor, one entry per run of patch releases that
    /// share a layout.
    std: Vec<StdEntry>,
    /// Third-party layouts, per module version and the Go minors measured with it.
    modules: Vec<ModuleEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StdEntry {
    /// `1.21`.
    go: String,
    /// The toolchains measured, `["go1.21.0", "go1.21.6", "go1.21.13"]`: the entry covers
    /// go1.21.0 to go1.21.13.
    measured_with: Vec<String>,
    offsets: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModuleEntry {
    module: String,
    version: String,
    /// Go minors this module version was built and measured with (`["1.21", "1.22"]`).
    go: Vec<String>,
    offsets: BTreeMap<String, u64>,
}

type Minor = (u32, u32);
type Offsets = BTreeMap<Field, u64>;

/// Standard-library offsets for the patch releases `first..=last` of one minor.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PatchRange {
    first: u32,
    last: u32,
    offsets: BTreeMap<Field, u64>,
}

/// The offsets table, parsed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct OffsetsTable {
    /// Ranges sorted and disjoint.
    std: BTreeMap<Minor, Vec<PatchRange>>,
    /// (module, version, Go minor) -> offsets.
    modules: BTreeMap<(String, String, Minor), BTreeMap<Field, u64>>,
}

impl OffsetsTable {
    /// The table compiled into the agent, parsed on first use. A table that does not parse
    /// is a build defect (a unit test guards it); the agent then runs on DWARF alone.
    pub fn embedded() -> &'static OffsetsTable {
        static TABLE: OnceLock<OffsetsTable> = OnceLock::new();
        TABLE.get_or_init(|| {
            OffsetsTable::parse(EMBEDDED_TABLE).unwrap_or_else(|e| {
                error!(error = %e, "embedded Go offsets table unusable; DWARF only");
                OffsetsTable::default()
            })
        })
    }

    pub fn parse(json: &str) -> Result<OffsetsTable, TableError> {
        let file: TableFile = serde_json::from_str(json)?;
        let mut table = OffsetsTable::default();
        for entry in file.std {
            let minor = parse_minor(&entry.go)?;
            let where_ = format!("std entry go{}", entry.go);
            let offsets = parse_offsets(&entry.offsets, None, &where_)?;
            let mut patches = Vec::new();
            for version in &entry.measured_with {
                let bad = || TableError::BadMeasuredWith {
                    version: version.clone(),
                    minor: entry.go.clone(),
                };
                let go = GoVersion::parse(version).ok_or_else(bad)?;
                if (go.major, go.minor) != minor || pre_release(version) {
                    return Err(bad());
                }
                patches.push(go.patch);
            }
            let (Some(&first), Some(&last)) = (patches.iter().min(), patches.iter().max()) else {
                return Err(TableError::BadMeasuredWith {
                    version: String::new(),
                    minor: entry.go.clone(),
                });
            };
            let ranges = table.std.entry(minor).or_default();
            if ranges.iter().any(|r| first <= r.last && r.first <= last) {
                return Err(TableError::Duplicate(format!(
                    "go{}.{first}..go{}.{last}",
                    entry.go, entry.go
                )));
            }
            ranges.push(PatchRange {
                first,
                last,
                offsets,
            });
            ranges.sort_by_key(|r| r.first);
        }
        for entry in file.modules {
            let where_ = format!("{} {}", entry.module, entry.version);
            let offsets = parse_offsets(&entry.offsets, Some(&entry.module), &where_)?;
            for go in &entry.go {
                let key = (
                    entry.module.clone(),
                    entry.version.clone(),
                    parse_minor(go)?,
                );
                if table.modules.insert(key, offsets.clone()).is_some() {
                    return Err(TableError::Duplicate(format!("{where_} with go{go}")));
                }
            }
        }
        Ok(table)
    }

    /// The table's offset of `field` for the binary `info` describes; never a neighbour's.
    pub fn lookup(&self, field: Field, info: &BuildInfo) -> Result<u64, Missing> {
        let missing = |reason| Missing { field, reason };
        let version = match field.module() {
            None => None,
            Some(module) => match info.deps.get(module) {
                Some(version) => Some((module, version)),
                None if !field.in_table() && uses_module(info, module) => {
                    return Err(missing(MissingReason::DwarfOnly));
                }
                None => return Err(missing(MissingReason::ModuleNotUsed)),
            },
        };
        if !field.in_table() {
            return Err(missing(MissingReason::DwarfOnly));
        }
        let raw = &info.go_version_raw;
        let Some(go) = info.go_version else {
            let raw = raw.clone();
            return Err(missing(MissingReason::NoGoVersion { raw }));
        };
        if pre_release(raw) {
            let raw = raw.clone();
            return Err(missing(MissingReason::PreRelease { raw }));
        }
        let minor = (go.major, go.minor);
        let entry = match version {
            None => self
                .std
                .get(&minor)
                .and_then(|ranges| {
                    ranges
                        .iter()
                        .find(|r| (r.first..=r.last).contains(&go.patch))
                })
                .map(|r| &r.offsets)
                .ok_or(MissingReason::GoNotInTable { go }),
            Some((module, version)) => self
                .modules
                .get(&(module.to_string(), version.clone(), minor))
                .ok_or_else(|| MissingReason::ModuleNotInTable {
                    module,
                    version: version.clone(),
                    go,
                }),
        }
        .map_err(missing)?;
        entry
            .get(&field)
            .copied()
            .ok_or(missing(MissingReason::NotMeasured))
    }
}

/// `go1.27rc1`, `go1.22beta1`: a letter inside the version number (a suffix after a space,
/// such as ` X:boringcrypto`, is not part of it).
fn pre_release(raw: &str) -> bool {
    let number = raw.trim().trim_start_matches("go");
    let number = number.split([' ', '-', '+']).next().unwrap_or("");
    number.bytes().any(|b| b.is_ascii_alphabetic())
}

/// The table's name for a field: `net/http.Request.Method`.
pub fn field_key(field: Field) -> String {
    let (ty, member) = field.dwarf_name();
    format!("{ty}.{member}")
}

fn field_from_key(key: &str) -> Option<Field> {
    Field::ALL.into_iter().find(|f| {
        let (ty, member) = f.dwarf_name();
        key.strip_prefix(ty)
            .and_then(|rest| rest.strip_prefix('.'))
            .is_some_and(|rest| rest == member)
    })
}

fn parse_minor(text: &str) -> Result<Minor, TableError> {
    let bad = || TableError::BadGoMinor(text.to_string());
    let (major, minor) = text.split_once('.').ok_or_else(bad)?;
    let number = |s: &str| {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        s.parse::<u32>().map_err(|_| bad())
    };
    Ok((number(major)?, number(minor)?))
}

/// Field keys to fields, checking each belongs where it stands: standard-library fields in
/// std entries (`module` None), a module's fields in that module's entries.
fn parse_offsets(
    raw: &BTreeMap<String, u64>,
    module: Option<&str>,
    entry: &str,
) -> Result<BTreeMap<Field, u64>, TableError> {
    raw.iter()
        .map(|(key, &offset)| {
            let field = field_from_key(key).ok_or_else(|| TableError::UnknownField(key.clone()))?;
            if field.module() != module {
                return Err(TableError::MisplacedField {
                    field: key.clone(),
                    entry: entry.to_string(),
                });
            }
            Ok((field, offset))
        })
        .collect()
}

/// One measured binary, as the table generator (`examples/go_offsets.rs`) sees it.
#[derive(Debug, Clone)]
pub struct Measurement {
    pub go: GoVersion,
    /// Module -> version, from the buildinfo.
    pub deps: BTreeMap<String, String>,
    /// DWARF offsets.
    pub offsets: BTreeMap<Field, u64>,
}

/// Renders measurements as a table file, in a stable order. std: per Go minor, the measured
/// patch releases in order, consecutive ones with one layout grouped in one entry. modules:
/// by module, version (semantic order) and Go minors, the minors that share one layout
/// grouped. Two measurements that disagree on a layout they must share (same Go release,
/// or same module version and Go minor) are an error, not a silent pick.
pub fn render_table(measurements: &[Measurement], comment: &str) -> Result<String, TableError> {
    let mut std: BTreeMap<GoVersion, BTreeMap<Field, u64>> = BTreeMap::new();
    let mut modules: BTreeMap<(String, String, Minor), BTreeMap<Field, u64>> = BTreeMap::new();
    for m in measurements {
        let minor = (m.go.major, m.go.minor);
        for (&field, &offset) in m.offsets.iter().filter(|(f, _)| f.in_table()) {
            let (entry, map) = match field.module() {
                None => (m.go.to_string(), std.entry(m.go).or_default()),
                Some(module) => {
                    // A type found in DWARF but not in the deps (a vendored copy, a
                    // replacement without version) has no key to file it under.
                    let Some(version) = m.deps.get(module) else {
                        continue;
                    };
                    let key = (module.to_string(), version.clone(), minor);
                    let entry = format!("{module} {version} with go{}.{}", minor.0, minor.1);
                    (entry, modules.entry(key).or_default())
                }
            };
            if let Some(&old) = map.get(&field)
                && old != offset
            {
                return Err(TableError::Conflict {
                    field: field_key(field),
                    entry,
                    a: old,
                    b: offset,
                });
            }
            map.insert(field, offset);
        }
    }
    let keys = |offsets: &BTreeMap<Field, u64>| -> BTreeMap<String, u64> {
        offsets.iter().map(|(&f, &o)| (field_key(f), o)).collect()
    };
    let mut file = TableFile {
        comment: comment.to_string(),
        ..TableFile::default()
    };
    // `std` iterates in version order: a new entry starts at a new minor or a new layout.
    let mut runs: Vec<(GoVersion, Vec<GoVersion>, &BTreeMap<Field, u64>)> = Vec::new();
    for (go, offsets) in &std {
        match runs.last_mut() {
            Some((first, versions, o)) if first.minor == go.minor && *o == offsets => {
                versions.push(*go);
            }
            _ => runs.push((*go, vec![*go], offsets)),
        }
    }
    for (first, versions, offsets) in runs {
        file.std.push(StdEntry {
            go: format!("{}.{}", first.major, first.minor),
            measured_with: versions.iter().map(GoVersion::to_string).collect(),
            offsets: keys(offsets),
        });
    }
    // Group the Go minors of one module version that measured the same layout.
    // (module, version) -> [(Go minors, their shared layout)].
    type Groups = Vec<(Vec<Minor>, Offsets)>;
    let mut grouped: BTreeMap<(String, String), Groups> = BTreeMap::new();
    for ((module, version, minor), offsets) in modules {
        let groups = grouped.entry((module, version)).or_default();
        match groups.iter_mut().find(|(_, o)| *o == offsets) {
            Some((minors, _)) => minors.push(minor),
            None => groups.push((vec![minor], offsets)),
        }
    }
    let mut entries: Vec<ModuleEntry> = Vec::new();
    for ((module, version), groups) in grouped {
        for (minors, offsets) in groups {
            entries.push(ModuleEntry {
                module: module.clone(),
                version: version.clone(),
                go: minors.iter().map(|(a, b)| format!("{a}.{b}")).collect(),
                offsets: keys(&offsets),
            });
        }
    }
    // Module versions in semantic-version order (v1.9.1 before v1.10.0), not text order.
    entries.sort_by_key(|e| {
        let first = e.go.first().and_then(|g| parse_minor(g).ok());
        (e.module.clone(), version_key(&e.version), first)
    });
    file.modules = entries;
    let mut json = serde_json::to_string_pretty(&file)?;
    json.push('\n');
    Ok(json)
}

/// `v1.10.1` -> [1, 10, 1] (pre-release and build suffixes sort after by text).
fn version_key(version: &str) -> (Vec<u64>, String) {
    let core = version.trim_start_matches('v');
    let (numbers, rest) = match core.find(['-', '+']) {
        Some(i) => (&core[..i], &core[i..]),
        None => (core, ""),
    };
    let parts = numbers
        .split('.')
        .map(|p| p.parse().unwrap_or(u64::MAX))
        .collect();
    (parts, rest.to_string())
}

#[cfg(test)]
pub(super) mod tests {
    use std::path::{Path, PathBuf};
    use std::process::{Command, Output};
    use std::time::SystemTime;

    use super::*;

    const GIN: &str = "github.com/gin-gonic/gin";

    fn info(go: &str, gin: Option<&str>) -> BuildInfo {
        BuildInfo {
            go_version_raw: go.to_string(),
            go_version: GoVersion::parse(go),
            deps: gin
                .map(|v| (GIN.to_string(), v.to_string()))
                .into_iter()
                .collect(),
            ..BuildInfo::default()
        }
    }

    /// go1.21.0 to go1.21.13 share a layout; go1.22.0 to go1.22.5 have one, go1.22.8 to
    /// go1.22.12 another (nothing measured in between).
    const SMALL: &str = r#"{
        "std": [
            {"go": "1.21", "measured_with": ["go1.21.0", "go1.21.6", "go1.21.13"],
             "offsets": {"net/http.Request.Method": 0, "net/http.Request.URL": 16}},
            {"go": "1.22", "measured_with": ["go1.22.8", "go1.22.12"],
             "offsets": {"net/http.Request.Method": 0, "net/http.Request.URL": 32}},
            {"go": "1.22", "measured_with": ["go1.22.0", "go1.22.5"],
             "offsets": {"net/http.Request.Method": 0, "net/http.Request.URL": 24}}
        ],
        "modules": [
            {"module": "github.com/gin-gonic/gin", "version": "v1.9.1", "go": ["1.21", "1.22"],
             "offsets": {"github.com/gin-gonic/gin.Context.fullPath": 112}}
        ]
    }"#;

    fn small() -> OffsetsTable {
        OffsetsTable::parse(SMALL).expect("small table parses")
    }

    #[test]
    fn embedded_table_parses_and_covers_every_supported_minor() {
        let table = OffsetsTable::parse(EMBEDDED_TABLE).expect("embedded table parses");
        for minor in super::super::MIN_SUPPORTED.minor..=super::super::MAX_SUPPORTED.minor {
            let ranges = table.std.get(&(1, minor));
            let ranges = ranges.unwrap_or_else(|| panic!("no std entry for go1.{minor}"));
            for range in ranges {
                for field in Field::ALL.into_iter().filter(|f| f.module().is_none()) {
                    assert!(
                        range.offsets.contains_key(&field),
                        "go1.{minor} lacks {field:?}"
                    );
                }
            }
        }
        assert!(table.modules.keys().any(|(m, _, _)| m == GIN));
    }

    #[test]
    fn lookup_hit() {
        let t = small();
        let i = info("go1.22.5", Some("v1.9.1"));
        assert_eq!(t.lookup(Field::RequestUrl, &i), Ok(24));
        assert_eq!(t.lookup(Field::GinContextFullPath, &i), Ok(112));
        assert_eq!(
            t.lookup(Field::RequestUrl, &info("go1.22.10", None)),
            Ok(32)
        );
        // Between two measured releases with one layout.
        assert_eq!(t.lookup(Field::RequestUrl, &info("go1.21.3", None)), Ok(16));
        // A suffix is not a pre-release.
        let boring = info("go1.21.13 X:boringcrypto", None);
        assert_eq!(t.lookup(Field::RequestUrl, &boring), Ok(16));
    }

    #[test]
    fn unknown_go_release_is_absent_not_guessed() {
        let t = small();
        let i = info("go1.23.1", Some("v1.9.1"));
        let go = GoVersion::new(1, 23, 1);
        let err = t.lookup(Field::RequestMethod, &i).unwrap_err();
        assert_eq!(err.reason, MissingReason::GoNotInTable { go });
        assert_eq!(
            err.to_string(),
            "net/http.Request.Method: no offsets for go1.23.1"
        );
        // gin v1.9.1 is known, but not with go1.23.
        let err = t.lookup(Field::GinContextFullPath, &i).unwrap_err();
        assert!(matches!(err.reason, MissingReason::ModuleNotInTable { .. }));
        // Known minor, but a patch no entry covers: after the newest measured, and in the
        // gap between two layouts.
        for go in ["go1.21.14", "go1.22.6", "go1.22.7"] {
            let err = t.lookup(Field::RequestUrl, &info(go, None)).unwrap_err();
            assert!(
                matches!(err.reason, MissingReason::GoNotInTable { .. }),
                "{go}"
            );
        }
        let err = t
            .lookup(Field::RequestUrl, &info("go1.22rc1", None))
            .unwrap_err();
        assert!(matches!(err.reason, MissingReason::PreRelease { .. }));
    }

    #[test]
    fn unknown_gin_version_is_absent() {
        let t = small();
        let i = info("go1.21.13", Some("v1.6.3"));
        let err = t.lookup(Field::GinContextFullPath, &i).unwrap_err();
        assert_eq!(
            err.to_string(),
            "github.com/gin-gonic/gin.Context.fullPath: no offsets for \
             github.com/gin-gonic/gin v1.6.3 with go1.21"
        );
        let o = resolve_with(&BTreeMap::new(), &i, &t);
        assert_eq!(o.get(Field::GinContextFullPath), None);
        assert_eq!(o.get(Field::RequestUrl), Some(16));
        assert_eq!(
            o.sources.get(&Field::RequestUrl),
            Some(&OffsetsSource::Table)
        );
    }

    #[test]
    fn gin_absent_is_simply_absent() {
        let t = small();
        let i = info("go1.21.13", None);
        let err = t.lookup(Field::GinContextFullPath, &i).unwrap_err();
        assert_eq!(err.reason, MissingReason::ModuleNotUsed);
        let o = resolve_with(&BTreeMap::new(), &i, &t);
        assert_eq!(o.get(Field::GinContextFullPath), None);
        assert_eq!(o.get(Field::RequestUrl), Some(16));
    }

    #[test]
    fn unparsed_go_version_gives_nothing() {
        let t = small();
        let i = info("devel +abc", None);
        let err = t.lookup(Field::RequestMethod, &i).unwrap_err();
        assert!(matches!(err.reason, MissingReason::NoGoVersion { .. }));
    }

    #[test]
    fn dwarf_wins_per_field() {
        let t = small();
        let i = info("go1.21.13", Some("v1.9.1"));
        let dwarf = BTreeMap::from([(Field::RequestUrl, 999)]);
        let o = resolve_with(&dwarf, &i, &t);
        assert_eq!(o.get(Field::RequestUrl), Some(999));
        assert_eq!(
            o.sources.get(&Field::RequestUrl),
            Some(&OffsetsSource::Dwarf)
        );
        assert_eq!(o.get(Field::RequestMethod), Some(0));
        assert_eq!(
            o.sources.get(&Field::RequestMethod),
            Some(&OffsetsSource::Table)
        );
    }

    #[test]
    fn missing_lists_reasons_for_needed_fields_only() {
        let o = GoOffsets::default();
        let missing = o.missing(&info("go1.18.10", None));
        // The table's fields but gin's, and the standard library's DWARF-only one.
        assert_eq!(missing.len(), Field::ALL.len(), "gin is not needed");
        assert!(missing.iter().all(|m| {
            matches!(m.reason, MissingReason::GoNotInTable { .. })
                || (m.field == Field::TlsConnConn && m.reason == MissingReason::DwarfOnly)
        }));
        let missing = o.missing(&info("go1.21.13", Some("v1.6.3")));
        assert!(missing.iter().any(|m| m.field == Field::GinContextFullPath));
    }

    /// grpc-go's layouts come from DWARF only: no table entry, a reason when stripped, and
    /// nothing missing for a binary without grpc.
    #[test]
    fn grpc_fields_are_dwarf_only() {
        let t = small();
        let mut i = info("go1.21.13", None);
        i.deps
            .insert("google.golang.org/grpc".into(), "v1.85.0".into());
        let err = t.lookup(Field::GrpcStreamId, &i).unwrap_err();
        assert_eq!(err.reason, MissingReason::DwarfOnly);
        let dwarf = BTreeMap::from([(Field::GrpcStreamId, 108), (Field::GrpcStreamMethod, 16)]);
        let o = resolve_with(&dwarf, &i, &t);
        assert_eq!(o.get(Field::GrpcStreamId), Some(108));
        assert_eq!(
            o.sources.get(&Field::GrpcStreamId),
            Some(&OffsetsSource::Dwarf)
        );
        let stripped = resolve_with(&BTreeMap::new(), &i, &t);
        assert_eq!(stripped.get(Field::GrpcStreamId), None);
        assert!(
            stripped
                .missing(&i)
                .iter()
                .any(|m| m.field == Field::GrpcStreamId && m.reason == MissingReason::DwarfOnly)
        );
        // Without grpc, no grpc field is missing (the standard library's crypto/tls one is
        // wanted by every binary).
        let plain = info("go1.21.13", None);
        assert!(
            resolve_with(&BTreeMap::new(), &plain, &t)
                .missing(&plain)
                .iter()
                .all(|m| m.field.in_table() || m.field.module().is_none())
        );
        // Never written to or read from the table.
        let m = Measurement {
            go: GoVersion::new(1, 21, 13),
            deps: i.deps.clone(),
            offsets: dwarf,
        };
        let json = render_table(&[m], "").expect("renders");
        assert!(!json.contains("transport"), "{json}");
        let key = field_key(Field::GrpcStreamId);
        let bad = format!(
            r#"{{"std": [{{"go": "1.21", "measured_with": ["go1.21.1"], "offsets": {{"{key}": 1}}}}], "modules": []}}"#
        );
        assert!(matches!(
            OffsetsTable::parse(&bad),
            Err(TableError::UnknownField(_))
        ));
    }

    #[test]
    fn table_errors_are_typed() {
        let err = |json: &str| OffsetsTable::parse(json).unwrap_err();
        assert!(matches!(err("{"), TableError::Json(_)));
        assert!(matches!(
            err(r#"{"std": 3, "modules": []}"#),
            TableError::Json(_)
        ));
        assert!(matches!(
            err(r#"{"std": [], "modules": [], "extra": 1}"#),
            TableError::Json(_)
        ));
        let std = |go: &str, measured: &str, key: &str| {
            format!(
                r#"{{"std": [{{"go": "{go}", "measured_with": [{measured}],
                    "offsets": {{"{key}": 1}}}}], "modules": []}}"#
            )
        };
        let url = "net/http.Request.URL";
        assert!(matches!(
            err(&std("1.21", r#""go1.21.1""#, "net/http.Request.Nope")),
            TableError::UnknownField(_)
        ));
        assert!(matches!(
            err(&std(
                "1.21",
                r#""go1.21.1""#,
                "github.com/gin-gonic/gin.Context.fullPath"
            )),
            TableError::MisplacedField { .. }
        ));
        for bad in ["121", "1.x", "1.", "go1.21", "1.21.3", "-1.2"] {
            assert!(
                matches!(
                    err(&std(bad, r#""go1.21.1""#, url)),
                    TableError::BadGoMinor(_)
                ),
                "{bad}"
            );
        }
        for measured in ["", r#""go1.22.1""#, r#""1.21.1""#, r#""go1.21rc1""#] {
            assert!(
                matches!(
                    err(&std("1.21", measured, url)),
                    TableError::BadMeasuredWith { .. }
                ),
                "{measured}"
            );
        }
        let overlap = r#"{"std": [
            {"go": "1.21", "measured_with": ["go1.21.0", "go1.21.5"], "offsets": {}},
            {"go": "1.21", "measured_with": ["go1.21.5"], "offsets": {}}], "modules": []}"#;
        assert!(matches!(err(overlap), TableError::Duplicate(_)));
        let gin_twice = r#"{"std": [], "modules": [
            {"module": "github.com/gin-gonic/gin", "version": "v1", "go": ["1.21", "1.21"],
             "offsets": {}}]}"#;
        assert!(matches!(err(gin_twice), TableError::Duplicate(_)));
        let wrong_module = r#"{"std": [], "modules": [
            {"module": "example.com/x", "version": "v1", "go": ["1.21"],
             "offsets": {"github.com/gin-gonic/gin.Context.fullPath": 1}}]}"#;
        assert!(matches!(
            err(wrong_module),
            TableError::MisplacedField { .. }
        ));
    }

    #[test]
    fn rendered_table_round_trips_and_groups() {
        let m = |go: GoVersion, gin: &str, url: u64, full: u64| Measurement {
            go,
            deps: BTreeMap::from([(GIN.to_string(), gin.to_string())]),
            offsets: BTreeMap::from([(Field::RequestUrl, url), (Field::GinContextFullPath, full)]),
        };
        let v = GoVersion::new;
        let ms = [
            m(v(1, 22, 12), "v1.10.0", 24, 112),
            m(v(1, 21, 13), "v1.9.1", 16, 112),
            m(v(1, 22, 12), "v1.9.1", 24, 112),
            m(v(1, 21, 13), "v1.10.0", 16, 120),
            m(v(1, 21, 0), "v1.10.0", 16, 120),
            // A layout change inside 1.22: go1.22.0-1 differ from go1.22.12.
            m(v(1, 22, 0), "v1.10.0", 8, 112),
            m(v(1, 22, 1), "v1.10.0", 8, 112),
        ];
        let json = render_table(&ms, "test").expect("renders");
        let t = OffsetsTable::parse(&json).expect("parses back");
        assert_eq!(t.std.len(), 2);
        assert_eq!(
            t.std[&(1, 21)].len(),
            1,
            "one layout from go1.21.0 to go1.21.13"
        );
        assert_eq!(t.std[&(1, 22)].len(), 2);
        assert_eq!(t.lookup(Field::RequestUrl, &info("go1.21.7", None)), Ok(16));
        assert_eq!(t.lookup(Field::RequestUrl, &info("go1.22.1", None)), Ok(8));
        assert!(
            t.lookup(Field::RequestUrl, &info("go1.22.2", None))
                .is_err()
        );
        // v1.9.1 has one layout on both minors: one entry; v1.10.0 has two.
        assert_eq!(json.matches("\"version\": \"v1.9.1\"").count(), 1);
        assert_eq!(json.matches("\"version\": \"v1.10.0\"").count(), 2);
        assert!(json.find("v1.9.1") < json.find("v1.10.0"), "semver order");
        let shuffled: Vec<Measurement> = ms.iter().rev().cloned().collect();
        assert_eq!(
            json,
            render_table(&shuffled, "test").expect("renders"),
            "deterministic"
        );
        let i = info("go1.21.1", Some("v1.10.0"));
        assert_eq!(t.lookup(Field::GinContextFullPath, &i), Ok(120));

        let conflict = [
            m(v(1, 22, 12), "v1.10.0", 24, 112),
            m(v(1, 22, 12), "v1.9.1", 32, 112),
        ];
        assert!(matches!(
            render_table(&conflict, ""),
            Err(TableError::Conflict { .. })
        ));
    }

    /// The machine's Go must agree with the table: guards the generated file against a
    /// stale or wrong generation, using the Go minor and gin version the table was not
    /// necessarily measured with at the same patch (the machine's Go may be older).
    #[test]
    fn table_matches_dwarf_of_a_binary_built_by_the_machines_go() {
        let probe = probe_build();
        let bytes = std::fs::read(&probe.unstripped).expect("read probe");
        let from_dwarf = dwarf::field_offsets(&bytes).expect("the probe has DWARF");
        let table = OffsetsTable::parse(EMBEDDED_TABLE).expect("embedded table parses");
        for field in Field::ALL {
            let from_table = table.lookup(field, &probe.info).unwrap_or_else(|m| {
                panic!("{m} (machine's Go; regenerate with `cargo xtask go-offsets`)")
            });
            assert_eq!(
                from_dwarf.get(&field),
                Some(&from_table),
                "{}",
                field_key(field)
            );
        }

        let with_dwarf = resolve(&bytes, &probe.info);
        let stripped = std::fs::read(&probe.stripped).expect("read stripped probe");
        let without = resolve(&stripped, &probe.info);
        // The table's fields, plus crypto/tls.Conn.conn (DWARF only, the struct's first
        // field), which the stripped build lacks.
        assert_eq!(with_dwarf.fields.len(), Field::ALL.len() + 1);
        assert_eq!(with_dwarf.get(Field::TlsConnConn), Some(0));
        let mut in_table = with_dwarf.fields.clone();
        in_table.remove(&Field::TlsConnConn);
        assert_eq!(in_table, without.fields);
        let all = |o: &GoOffsets, s: OffsetsSource| o.sources.values().all(|x| *x == s);
        assert!(all(&with_dwarf, OffsetsSource::Dwarf));
        assert!(all(&without, OffsetsSource::Table));
        assert_eq!(
            without.missing(&probe.info),
            [Missing {
                field: Field::TlsConnConn,
                reason: MissingReason::DwarfOnly
            }]
        );
    }

    /// xtask/go-offsets-probe built by the machine's Go, with DWARF and stripped.
    pub(in super::super) struct ProbeBuild {
        pub unstripped: PathBuf,
        pub stripped: PathBuf,
        /// From `go version -m`, independent of the agent's buildinfo reader.
        pub info: BuildInfo,
    }

    /// Built once per test process, and kept under the target dir across runs for as long
    /// as the Go version and the probe's sources stay the same.
    pub(in super::super) fn probe_build() -> &'static ProbeBuild {
        static BUILD: OnceLock<ProbeBuild> = OnceLock::new();
        BUILD.get_or_init(build_probe)
    }

    fn go(dir: &Path, args: &[&str]) -> Output {
        let out = Command::new("go")
            .args(args)
            .current_dir(dir)
            .env("GOTOOLCHAIN", "local")
            .env("GOFLAGS", "-buildvcs=false")
            .env("GOWORK", "off")
            .env("CGO_ENABLED", "0")
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "this test needs the Go toolchain, but `go` could not be run ({e}): \
                     install Go >= 1.19 and put it on PATH"
                )
            });
        assert!(
            out.status.success(),
            "`go {}` in {} failed: {}",
            args.join(" "),
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn build_probe() -> ProbeBuild {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../xtask/go-offsets-probe");
        // Checked first: a missing directory would look like a missing `go` below.
        assert!(
            src.join("main.go").is_file(),
            "no probe at {}",
            src.display()
        );
        let go_version = String::from_utf8_lossy(&go(&src, &["env", "GOVERSION"]).stdout)
            .trim()
            .to_string();
        // <target>/<profile>/deps/<test binary> -> <target>/<profile>/go-offsets-probe
        let exe = std::env::current_exe().expect("test binary path");
        let out = exe
            .ancestors()
            .nth(2)
            .expect("test binary lives in <target>/<profile>/deps")
            .join("go-offsets-probe");
        std::fs::create_dir_all(&out).expect("create probe output dir");
        let newest_source = ["main.go", "go.mod", "go.sum"]
            .iter()
            .filter_map(|f| {
                std::fs::metadata(src.join(f))
                    .and_then(|m| m.modified())
                    .ok()
            })
            .max()
            .unwrap_or(SystemTime::now());
        let build = |name: String, ldflags: &str| -> PathBuf {
            let bin = out.join(name);
            let fresh = std::fs::metadata(&bin)
                .and_then(|m| m.modified())
                .is_ok_and(|built| built >= newest_source);
            if !fresh {
                // Build beside and rename, so a concurrent test process never reads half a
                // binary.
                let tmp = out.join(format!("tmp-{}", std::process::id()));
                let tmp_str = tmp.to_str().expect("utf-8 target dir");
                go(&src, &["build", "-ldflags", ldflags, "-o", tmp_str, "."]);
                std::fs::rename(&tmp, &bin).expect("move probe binary into place");
            }
            bin
        };
        let unstripped = build(format!("probe-{go_version}"), "");
        let stripped = build(format!("probe-{go_version}-stripped"), "-s -w");
        let unstripped_str = unstripped.to_str().expect("utf-8 target dir");
        let listing = go(&src, &["version", "-m", unstripped_str]).stdout;
        let info = parse_go_version_m(&String::from_utf8_lossy(&listing));
        assert_eq!(info.go_version_raw, go_version);
        ProbeBuild {
            unstripped,
            stripped,
            info,
        }
    }

    /// `go version -m` output: `<path>: go1.26.8`, then tab-separated `dep` lines, each
    /// possibly followed by a `=>` replacement line.
    fn parse_go_version_m(text: &str) -> BuildInfo {
        let mut info = BuildInfo::default();
        let mut lines = text.lines();
        if let Some((_, go)) = lines.next().and_then(|l| l.rsplit_once(": ")) {
            info.go_version_raw = go.trim().to_string();
            info.go_version = GoVersion::parse(go);
        }
        let mut last = None;
        for line in lines {
            let cols: Vec<&str> = line
                .split('\t')
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .collect();
            match cols.as_slice() {
                ["dep", path, version, ..] => {
                    info.deps.insert(path.to_string(), version.to_string());
                    last = Some(path.to_string());
                }
                ["=>", _, version, ..] => {
                    if let Some(path) = &last {
                        info.deps.insert(path.clone(), version.to_string());
                    }
                }
                _ => {}
            }
        }
        info
    }
}
