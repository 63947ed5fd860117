//! One Go binary, inspected from its file: build info, the wanted functions with their entry
//! and RET file offsets (what uprobes attach to), and the struct field offsets.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use tracing::{debug, warn};

use super::buildinfo::{self, BuildInfoError};
use super::elf::{self, Elf, ElfError, Kind};
use super::pclntab::{self, PclntabError};
use super::ret::{self, RetError};
use super::{BuildInfo, GoFunc, GoOffsets, offsets};

/// What the agent needs to know about a Go binary to hook it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoBinary {
    pub path: PathBuf,
    pub info: BuildInfo,
    /// The wanted functions that the binary has, by full symbol name. A wanted function that
    /// exists but could not be decoded is left out too (and logged).
    pub funcs: BTreeMap<String, GoFunc>,
    /// No `.symtab` (built with `-ldflags=-s`, or stripped afterwards).
    pub stripped: bool,
    /// `.debug_info` or `.zdebug_info` present.
    pub has_dwarf: bool,
    pub offsets: GoOffsets,
}

#[derive(Debug, thiserror::Error)]
pub enum GoBinError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("malformed ELF: {0}")]
    Elf(object::Error),
    #[error(transparent)]
    BuildInfo(#[from] BuildInfoError),
    #[error(transparent)]
    Pclntab(#[from] PclntabError),
}

/// Why one wanted function is left out.
#[derive(Debug, thiserror::Error)]
enum FuncError {
    #[error("entry {entry:#x} is not in a file-backed segment")]
    NotMapped { entry: u64 },
    #[error("code {entry:#x}..{end:#x} is not all in one file-backed segment")]
    CodeOutside { entry: u64, end: u64 },
    #[error(transparent)]
    Ret(#[from] RetError),
}

/// Inspects the executable at `path` (may be `/proc/<pid>/exe`), looking up the `wanted`
/// functions (full names such as `net/http.(*persistConn).roundTrip`). `Ok(None)` for files
/// that are not x86-64 ELF Go binaries; errors for Go binaries whose tables do not parse.
pub fn inspect(path: &Path, wanted: &[&str]) -> Result<Option<GoBinary>, GoBinError> {
    let io_error = |source| GoBinError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(io_error)?;
    // Most executables on a host are not Go, and some are large: the header decides whether
    // the rest is worth reading.
    let mut data = Vec::with_capacity(elf::HEADER_LEN);
    (&mut file)
        .take(elf::HEADER_LEN as u64)
        .read_to_end(&mut data)
        .map_err(io_error)?;
    if elf::classify(&data) != Kind::X86_64 {
        return Ok(None);
    }
    // The size is a hint only (the file may change while it is read).
    if let Ok(meta) = file.metadata() {
        data.reserve(usize::try_from(meta.len()).unwrap_or(0));
    }
    file.read_to_end(&mut data).map_err(io_error)?;
    inspect_bytes(path, &data, wanted)
}

/// [`inspect`] on the file's bytes, already read.
pub fn inspect_bytes(
    path: &Path,
    data: &[u8],
    wanted: &[&str],
) -> Result<Option<GoBinary>, GoBinError> {
    if elf::classify(data) != Kind::X86_64 {
        return Ok(None);
    }
    let elf = match Elf::parse(data) {
        Ok(elf) => elf,
        Err(ElfError::NotX86_64) => return Ok(None),
        Err(ElfError::Malformed(e)) => return Err(GoBinError::Elf(e)),
    };
    let Some(info) = buildinfo::read_from_elf(&elf)? else {
        return Ok(None);
    };
    let table = pclntab::read_from_elf(&elf)?;
    debug!(
        path = %path.display(),
        go = %info.go_version_raw,
        functions = table.len(),
        format = %table.format(),
        "Go binary"
    );
    let mut funcs = BTreeMap::new();
    for &name in wanted {
        let Some((entry, end)) = table.find(name) else {
            continue;
        };
        match go_func(&elf, name, entry, end) {
            Ok(func) => {
                funcs.insert(name.to_string(), func);
            }
            // The other functions can still be hooked; this one's hooks stay off.
            Err(error) => warn!(
                path = %path.display(),
                function = name,
                %error,
                "Go function left unhooked"
            ),
        }
    }
    let offsets = offsets::resolve(data, &info);
    Ok(Some(GoBinary {
        path: path.to_path_buf(),
        info,
        funcs,
        stripped: !elf.has_symtab(),
        has_dwarf: elf.has_section(".debug_info") || elf.has_section(".zdebug_info"),
        offsets,
    }))
}

fn go_func(elf: &Elf<'_>, name: &str, entry: u64, end: u64) -> Result<GoFunc, FuncError> {
    let entry_offset = elf
        .vaddr_to_offset(entry)
        .ok_or(FuncError::NotMapped { entry })?;
    let code = end
        .checked_sub(entry)
        .and_then(|len| elf.read(entry, len))
        .ok_or(FuncError::CodeOutside { entry, end })?;
    // The code is one contiguous slice of the file, so a RET's file offset is the entry's
    // plus its distance from the entry.
    let entry_probe_offset = entry_offset + (ret::entry_probe_point(code, entry) - entry);
    let ret_offsets = ret::find_rets(code, entry)?
        .into_iter()
        .map(|ret| entry_offset + (ret - entry))
        .collect();
    Ok(GoFunc {
        name: name.to_string(),
        entry,
        end,
        entry_offset,
        entry_probe_offset,
        ret_offsets,
    })
}

#[cfg(test)]
mod tests {
    //! Real Go binaries: built from a small program by the `go` on PATH, for several Go
    //! releases (the `go` command fetches older toolchains through GOTOOLCHAIN), cached by
    //! content under the cargo target directory.

    use std::collections::HashMap;
    use std::process::Command;
    use std::sync::{Arc, Mutex, OnceLock};

    use super::super::pclntab::{Format, FuncTable};
    use super::super::{Field, GoVersion};
    use super::*;

    const GO_MOD: &str = "module example.com/gobintest\n\ngo 1.17\n";

    /// An HTTP server whose handler makes an outbound request, plus goroutines: every hook
    /// family of the Go side has a function here.
    const MAIN_GO: &str = r#"package main

import (
	"fmt"
	"net/http"
	"os"
	"sync"
)

func main() {
	var wg sync.WaitGroup
	for i := 0; i < 4; i++ {
		wg.Add(1)
		go func(n int) { defer wg.Done(); _ = n * n }(i)
	}
	wg.Wait()
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		resp, err := http.Get("http://127.0.0.1:1/")
		if err == nil {
			resp.Body.Close()
		}
		fmt.Fprintf(w, "hello %s %s", r.Method, r.URL.Path)
	})
	if len(os.Args) > 1 {
		_ = http.ListenAndServe(os.Args[1], nil)
	}
}
"#;

    const MODULE: &str = "example.com/gobintest";
    const SERVE_HTTP: &str = "net/http.serverHandler.ServeHTTP";
    const NEWPROC1: &str = "runtime.newproc1";
    const PC_ROUND_TRIP: &str = "net/http.(*persistConn).roundTrip";
    const TRANSPORT_ROUND_TRIP: &str = "net/http.(*Transport).roundTrip";
    const GIN: &str = "github.com/gin-gonic/gin.(*Engine).handleHTTPRequest";
    const WANTED: [&str; 5] = [
        SERVE_HTTP,
        PC_ROUND_TRIP,
        TRANSPORT_ROUND_TRIP,
        NEWPROC1,
        GIN,
    ];

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Flavor {
        Plain,
        /// `-ldflags=-s -w`: no .symtab, no DWARF.
        Stripped,
        /// PIE through the system linker: C start-up code precedes runtime.text.
        PieExternal,
        PieExternalStripped,
    }

    impl Flavor {
        fn args(self) -> &'static [&'static str] {
            match self {
                Flavor::Plain => &[],
                Flavor::Stripped => &["-ldflags=-s -w"],
                Flavor::PieExternal => &["-buildmode=pie", "-ldflags=-linkmode=external"],
                Flavor::PieExternalStripped => {
                    &["-buildmode=pie", "-ldflags=-linkmode=external -s -w"]
                }
            }
        }

        fn cgo(self) -> bool {
            matches!(self, Flavor::PieExternal | Flavor::PieExternalStripped)
        }
    }

    /// FNV-1a: a cache key that stays the same across Rust releases (DefaultHasher may not).
    fn fnv1a(parts: &[&str]) -> u64 {
        let mut hash = 0xcbf2_9ce4_8422_2325u64;
        for part in parts {
            for &byte in part.as_bytes().iter().chain(&[0xff]) {
                hash ^= u64::from(byte);
                hash = hash.wrapping_mul(0x0100_0000_01b3);
            }
        }
        hash
    }

    fn cache_dir() -> PathBuf {
        let base = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .filter(|dir| dir.is_absolute())
            .unwrap_or_else(std::env::temp_dir);
        base.join("gobin-fixtures")
    }

    fn require_go() {
        static CHECKED: OnceLock<()> = OnceLock::new();
        CHECKED.get_or_init(|| match Command::new("go").arg("version").output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => panic!(
                "`go version` failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => panic!(
                "the gobin tests build real Go programs and need `go` on PATH ({e}); \
                 install Go >= 1.21 (https://go.dev/dl/), which fetches the older \
                 toolchains the tests use by itself"
            ),
        });
    }

    /// The program built by Go `version` (e.g. `go1.21.13`) in `flavor`, built once per
    /// content and kept.
    fn fixture(version: &str, flavor: Flavor) -> PathBuf {
        static LOCKS: OnceLock<Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>> = OnceLock::new();
        let flavor_name = format!("{flavor:?}");
        let key = fnv1a(
            &[GO_MOD, MAIN_GO, version, &flavor_name]
                .into_iter()
                .chain(flavor.args().iter().copied())
                .collect::<Vec<_>>(),
        );
        let dir = cache_dir();
        let out = dir.join(format!("{version}-{flavor_name}-{key:016x}"));
        let lock = {
            let mut locks = LOCKS
                .get_or_init(Default::default)
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            locks.entry(out.clone()).or_default().clone()
        };
        let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        if out.exists() {
            return out;
        }
        require_go();
        let src = dir.join(format!("src-{key:016x}-{}", std::process::id()));
        std::fs::create_dir_all(&src).expect("create fixture source dir");
        std::fs::write(src.join("go.mod"), GO_MOD).expect("write go.mod");
        std::fs::write(src.join("main.go"), MAIN_GO).expect("write main.go");
        let tmp = dir.join(format!(
            "{version}-{flavor_name}-{key:016x}.tmp{}",
            std::process::id()
        ));
        let old = GoVersion::parse(version).is_some_and(|v| v < GoVersion::new(1, 18, 0));
        let output = Command::new("go")
            .arg("build")
            .arg("-o")
            .arg(&tmp)
            .args(flavor.args())
            .arg(".")
            .current_dir(&src)
            .env("GOTOOLCHAIN", version)
            // No VCS stamping (the cache may sit inside a git work tree); Go < 1.18 does not
            // know the flag, and GOFLAGS from the environment would break it.
            .env("GOFLAGS", if old { "-mod=mod" } else { "-buildvcs=false" })
            .env("CGO_ENABLED", if flavor.cgo() { "1" } else { "0" })
            .env("GOOS", "linux")
            .env("GOARCH", "amd64")
            .output()
            .expect("run go build");
        assert!(
            output.status.success(),
            "GOTOOLCHAIN={version} go build {:?} failed:\n{}",
            flavor.args(),
            String::from_utf8_lossy(&output.stderr)
        );
        std::fs::rename(&tmp, &out).expect("move fixture into place");
        let _ = std::fs::remove_dir_all(&src);
        out
    }

    fn has_c_compiler() -> bool {
        Command::new("cc")
            .arg("--version")
            .output()
            .is_ok_and(|out| out.status.success())
    }

    fn read(path: &Path) -> Vec<u8> {
        std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
    }

    fn inspect_ok(path: &Path) -> GoBinary {
        inspect(path, &WANTED)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .unwrap_or_else(|| panic!("{}: not recognised as Go", path.display()))
    }

    /// The same file without section headers (as some packers and `sstrip` leave it), so
    /// everything must be found through the program headers.
    fn without_section_headers(data: &[u8]) -> Vec<u8> {
        let mut data = data.to_vec();
        data[0x28..0x30].fill(0); // e_shoff
        data[0x3c..0x40].fill(0); // e_shnum, e_shstrndx
        data
    }

    /// Entry and RETs point at what they should in the file itself.
    fn check_code(data: &[u8], func: &GoFunc) {
        let len = func.end - func.entry;
        assert!(!func.ret_offsets.is_empty(), "{}: no RET", func.name);
        for &ret in &func.ret_offsets {
            assert!(
                (func.entry_offset..func.entry_offset + len).contains(&ret),
                "{}: RET {ret:#x} outside the function",
                func.name
            );
            let byte = data[ret as usize];
            assert!(
                byte == 0xc3 || byte == 0xc2,
                "{}: RET at {ret:#x} is byte {byte:#04x}",
                func.name
            );
        }
        // Every Go function with a stack check (all of these) compares a stack pointer with
        // a stack guard of g: `cmp rsp|r12, [r14+disp8]` (REX 3b 66 ..) within its first
        // instructions.
        // A wrong text start would land elsewhere.
        let entry = func.entry_offset as usize;
        let head = &data[entry..entry + 16];
        assert!(
            head.windows(2).any(|w| w == [0x3b, 0x66]),
            "{}: entry {:#x} does not look like a Go function: {head:02x?}",
            func.name,
            func.entry
        );
    }

    /// Every STT_FUNC symbol of an unstripped binary that the pclntab knows has the same
    /// address there, and the functions this crate hooks are among them.
    fn check_against_symtab(data: &[u8]) -> FuncTable {
        let elf = Elf::parse(data).expect("parse ELF");
        let table = pclntab::read_from_elf(&elf).expect("pclntab");
        let symbols = elf.func_symbols();
        assert!(symbols.len() > 1000, "only {} symbols", symbols.len());
        // Assembly functions are `<name>.abi0` in .symtab and `<name>` in the pclntab, where
        // the ABI wrapper has the same name.
        let mut by_name: HashMap<&str, Vec<&pclntab::Func>> = HashMap::new();
        for func in &table {
            by_name.entry(func.name.as_str()).or_default().push(func);
        }
        let mut symtab_count: HashMap<&str, usize> = HashMap::new();
        for (name, _) in &symbols {
            *symtab_count.entry(name.as_str()).or_default() += 1;
        }
        let mut unexplained = Vec::new();
        let mut checked = 0;
        for (name, addr) in &symbols {
            let (plain, abi0) = match name.strip_suffix(".abi0") {
                Some(stripped) => (stripped, true),
                None => (name.as_str(), false),
            };
            // Go < 1.22 abbreviates type arguments in the pclntab (`F[...]`), .symtab does not.
            let short = abbreviate_type_args(plain);
            let Some(candidates) = by_name.get(plain).or_else(|| by_name.get(short.as_str()))
            else {
                // What only .symtab has: the text markers, imports from C libraries (cgo),
                // C code, deduplicated equality functions (`type:.eq.T.1`), and Go 1.17's
                // defer wrappers (`.dwrap.N`).
                let explained = *addr == 0
                    || name == "runtime.text"
                    || name == "runtime.etext"
                    || name.contains('@')
                    || !name.contains('.')
                    || name.ends_with(".cold")
                    || name.starts_with("type:.eq.")
                    || name.starts_with("type..eq.")
                    || name.contains(".dwrap.");
                if !explained {
                    unexplained.push(name.as_str());
                }
                continue;
            };
            checked += 1;
            let matching: Vec<_> = candidates.iter().filter(|f| f.entry == *addr).collect();
            assert!(
                !matching.is_empty(),
                "{name} at {addr:#x}: pclntab has {candidates:?}"
            );
            // Lookups by name return this symbol unless the name is not its own: Go >= 1.27
            // gives closures of different instantiations one name (twice in .symtab as well),
            // and Go 1.16/1.17 tables have no assembly flag to pick the ABI wrapper by.
            let unique = candidates.len() == 1;
            let own_name = by_name.contains_key(plain) && symtab_count[name.as_str()] == 1;
            if !abi0 && own_name && (unique || table.format() != Format::Go116) {
                assert_eq!(
                    table.find(plain).map(|(entry, _)| entry),
                    Some(*addr),
                    "{name}"
                );
            }
        }
        assert!(
            unexplained.is_empty(),
            "{} functions of .symtab not in pclntab: {unexplained:?}",
            unexplained.len()
        );
        assert!(checked > 1000, "only {checked} functions compared");
        // Functions are in address order and do not overlap.
        for pair in table.iter().collect::<Vec<_>>().windows(2) {
            assert!(pair[0].entry <= pair[0].end);
            assert_eq!(pair[0].end, pair[1].entry);
        }
        table
    }

    /// `pkg.F[a, b].g` -> `pkg.F[...].g`, as Go < 1.22 names generic instantiations in the
    /// pclntab.
    fn abbreviate_type_args(name: &str) -> String {
        let mut out = String::with_capacity(name.len());
        let mut depth = 0usize;
        for c in name.chars() {
            match c {
                '[' => {
                    if depth == 0 {
                        out.push_str("[...]");
                    }
                    depth += 1;
                }
                ']' => depth = depth.saturating_sub(1),
                _ if depth == 0 => out.push(c),
                _ => {}
            }
        }
        out
    }

    fn check_version(version: &str, format: Format) {
        let plain_path = fixture(version, Flavor::Plain);
        let stripped_path = fixture(version, Flavor::Stripped);
        let plain_data = read(&plain_path);
        let stripped_data = read(&stripped_path);
        let plain = inspect_ok(&plain_path);
        let stripped = inspect_ok(&stripped_path);

        let expected = GoVersion::parse(version);
        for bin in [&plain, &stripped] {
            assert_eq!(bin.info.go_version_raw, version);
            assert_eq!(bin.info.go_version, expected);
            assert_eq!(bin.info.path, MODULE);
            assert_eq!(bin.info.main_module, MODULE);
            assert!(bin.info.deps.is_empty(), "{:?}", bin.info.deps);
            let found: Vec<&str> = bin.funcs.keys().map(String::as_str).collect();
            let mut want = vec![SERVE_HTTP, PC_ROUND_TRIP, TRANSPORT_ROUND_TRIP, NEWPROC1];
            want.sort();
            assert_eq!(found, want, "{version}: functions found");
            assert!(!bin.funcs.contains_key(GIN));
        }
        assert!(!plain.stripped && plain.has_dwarf);
        assert!(stripped.stripped && !stripped.has_dwarf);
        for (name, func) in &plain.funcs {
            assert_eq!(func.name, *name);
            check_code(&plain_data, func);
            let other = &stripped.funcs[name];
            check_code(&stripped_data, other);
            assert_eq!(
                (other.entry, other.end),
                (func.entry, func.end),
                "{version} {name}: stripped and unstripped builds differ"
            );
            assert_eq!(other.ret_offsets.len(), func.ret_offsets.len());
        }

        let table = check_against_symtab(&plain_data);
        assert_eq!(table.format(), format);

        // No section headers: build info, pclntab (and its text start) from the segments.
        let headerless = without_section_headers(&stripped_data);
        let bin = inspect_bytes(&stripped_path, &headerless, &WANTED)
            .expect("headerless inspect")
            .expect("headerless is Go");
        assert_eq!(bin.info, stripped.info);
        assert_eq!(bin.funcs, stripped.funcs);
        assert!(bin.stripped && !bin.has_dwarf);
    }

    #[test]
    fn go1_26_binaries() {
        check_version("go1.26.8", Format::Go120);
    }

    #[test]
    fn go1_27_binaries() {
        check_version("go1.27.3", Format::Go120);
    }

    #[test]
    fn go1_25_binaries() {
        check_version("go1.25.0", Format::Go120);
    }

    #[test]
    fn go1_24_binaries() {
        check_version("go1.24.13", Format::Go120);
    }

    #[test]
    fn go1_23_binaries() {
        check_version("go1.23.12", Format::Go120);
    }

    #[test]
    fn go1_22_binaries() {
        check_version("go1.22.12", Format::Go120);
    }

    #[test]
    fn go1_21_binaries() {
        check_version("go1.21.13", Format::Go120);
    }

    #[test]
    fn go1_20_binaries() {
        check_version("go1.20.14", Format::Go120);
    }

    #[test]
    fn go1_19_binaries() {
        check_version("go1.19.13", Format::Go118);
    }

    /// Older than the uprobes support, but the formats (pointer build info, Go 1.16 table)
    /// are still read, so the agent can say which version it is declining.
    #[test]
    fn go1_17_binary() {
        let path = fixture("go1.17.13", Flavor::Plain);
        let data = read(&path);
        let bin = inspect_ok(&path);
        assert_eq!(bin.info.go_version, Some(GoVersion::new(1, 17, 13)));
        assert!(!bin.info.go_version.is_some_and(GoVersion::supported));
        assert_eq!(bin.info.main_module, MODULE);
        for func in bin.funcs.values() {
            check_code(&data, func);
        }
        assert!(bin.funcs.contains_key(SERVE_HTTP) && bin.funcs.contains_key(NEWPROC1));
        let table = check_against_symtab(&data);
        assert_eq!(table.format(), Format::Go116);
    }

    /// With the system linker, the C start-up code sits between the start of .text and
    /// runtime.text; Go 1.26 no longer stores the text start in the pclntab, so it comes
    /// from the moduledata.
    #[test]
    fn go1_26_external_pie() {
        if !has_c_compiler() {
            eprintln!("SKIPPED go1_26_external_pie: no C compiler (cc) for -linkmode=external");
            return;
        }
        let path = fixture("go1.26.8", Flavor::PieExternal);
        let data = read(&path);
        let table = check_against_symtab(&data);
        let elf = Elf::parse(&data).expect("ELF");
        assert_eq!(Some(table.text_start()), elf.symbol("runtime.text"));
        let text_section = elf.section(".text").expect(".text").addr;
        assert_ne!(table.text_start(), text_section, "test needs C code first");
        let bin = inspect_ok(&path);
        for func in bin.funcs.values() {
            check_code(&data, func);
        }

        let stripped_path = fixture("go1.26.8", Flavor::PieExternalStripped);
        let stripped_data = read(&stripped_path);
        let stripped = inspect_ok(&stripped_path);
        assert!(stripped.stripped);
        assert_eq!(
            stripped.funcs.keys().collect::<Vec<_>>(),
            bin.funcs.keys().collect::<Vec<_>>()
        );
        for (name, func) in &stripped.funcs {
            check_code(&stripped_data, func);
            assert_eq!(
                func.end - func.entry,
                bin.funcs[name].end - bin.funcs[name].entry
            );
        }
        let headerless = without_section_headers(&stripped_data);
        let again = inspect_bytes(&stripped_path, &headerless, &WANTED)
            .expect("headerless")
            .expect("Go");
        assert_eq!(again.funcs, stripped.funcs);
    }

    #[test]
    fn broken_pclntab_is_a_clear_error() {
        let path = fixture("go1.26.8", Flavor::Stripped);
        let mut data = read(&path);
        let elf = Elf::parse(&data).expect("ELF");
        let offset = elf
            .vaddr_to_offset(elf.section(".gopclntab").expect("pclntab").addr)
            .expect("mapped") as usize;
        data[offset..offset + 4].copy_from_slice(&0xdead_beefu32.to_le_bytes());
        let err = inspect_bytes(&path, &data, &WANTED).expect_err("must fail");
        assert_eq!(err.to_string(), "pclntab magic 0xdeadbeef unknown");
        // A file cut short is an error or not Go, never a panic.
        let data = read(&path);
        for len in [64, 4096, data.len() / 3, data.len() / 2, data.len() - 1] {
            let _ = inspect_bytes(&path, &data[..len], &WANTED);
        }
    }

    #[test]
    fn offsets_are_wired() {
        let bin = inspect_ok(&fixture("go1.26.8", Flavor::Plain));
        // The resolver is another module's; only check that inspect asks it.
        let _ = bin.offsets.get(Field::RequestMethod);
    }

    #[test]
    fn non_go_files_are_none() {
        // This test binary: x86-64 ELF, but Rust.
        assert!(
            inspect(Path::new("/proc/self/exe"), &WANTED)
                .expect("readable")
                .is_none()
        );
        let dir = cache_dir().join(format!("non-go-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let script = dir.join("script.sh");
        std::fs::write(&script, "#!/bin/sh\necho hi\n").expect("write");
        assert!(inspect(&script, &WANTED).expect("readable").is_none());
        let empty = dir.join("empty");
        std::fs::write(&empty, "").expect("write");
        assert!(inspect(&empty, &WANTED).expect("readable").is_none());
        // An aarch64 ELF header.
        let mut header = vec![0u8; 128];
        header[..4].copy_from_slice(b"\x7fELF");
        header[4] = 2;
        header[5] = 1;
        header[18] = 183;
        let arm = dir.join("arm");
        std::fs::write(&arm, &header).expect("write");
        assert!(inspect(&arm, &WANTED).expect("readable").is_none());
        let _ = std::fs::remove_dir_all(&dir);

        let missing = inspect(Path::new("/nonexistent/gobin"), &WANTED).expect_err("missing");
        assert!(matches!(missing, GoBinError::Io { .. }), "{missing}");
    }
}
