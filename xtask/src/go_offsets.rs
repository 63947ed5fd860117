//! `cargo xtask go-offsets`: regenerates the Go struct offsets table the agent falls back on
//! for stripped binaries (tracer/src/discover/gobin/offsets_table.json).
//!
//! It builds xtask/go-offsets-probe (unstripped) with every release of every supported Go
//! minor that the module proxy serves, and hands the binaries to the tracer's `go_offsets`
//! example, which reads their DWARF and writes the table. Every release is needed because
//! patch releases do change layouts (go1.26.11 moved net/http.response.status). The newest
//! release of each minor is built with every gin version below, the others with one gin
//! version only (the standard library's layouts are what they measure). Combinations that
//! do not build (gin or its dependencies need a newer Go) are skipped and listed: the table
//! then simply has no entry for them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::say;
use crate::util::{capture, cargo_user, command, fmt_duration, run, target_dir, workspace_root};

/// Go minors the agent supports (tracer's gobin::MIN_SUPPORTED..=MAX_SUPPORTED).
const GO_MINORS: std::ops::RangeInclusive<u32> = 19..=27;
const GIN: &str = "github.com/gin-gonic/gin";
const GIN_VERSIONS: &[&str] = &[
    "v1.7.7", "v1.8.1", "v1.9.0", "v1.9.1", "v1.10.0", "v1.10.1", "v1.11.0", "v1.12.0",
];
/// The gin version the older patch releases are built with: it builds with every supported
/// Go (go1.19 included), and it is the probe's own (go.mod), so its dependencies are
/// already in the module cache.
const STD_GIN: &str = "v1.10.1";
/// The probe's module path (its go.mod is rewritten for each build).
const PROBE_MODULE: &str = "difytrace.dev/go-offsets-probe";
const TABLE: &str = "tracer/src/discover/gobin/offsets_table.json";

pub fn go_offsets() -> Result<()> {
    let started = Instant::now();
    let releases = releases()?;
    let work = target_dir().join("go-offsets");
    let mut built = Vec::new();
    let mut skipped = Vec::new();
    for (toolchain, newest) in &releases {
        let gins = if *newest { GIN_VERSIONS } else { &[STD_GIN] };
        for gin in gins {
            let dir = work.join(format!("{toolchain}-gin-{gin}"));
            let t = Instant::now();
            match build_probe(toolchain, gin, &dir) {
                Ok(bin) => {
                    say!(
                        "built {toolchain} + gin {gin} ({})",
                        fmt_duration(t.elapsed())
                    );
                    built.push(bin);
                }
                Err(e) => {
                    let error = format!("{e:#}");
                    let reason = reason(&error);
                    say!("skip {toolchain} + gin {gin}: {reason}");
                    skipped.push(format!("{toolchain} + gin {gin}: {reason}"));
                }
            }
        }
    }
    if built.is_empty() {
        bail!("no probe binary built");
    }
    let table = workspace_root().join(TABLE);
    run(cargo_user()
        .args([
            "run",
            "--release",
            "-p",
            "tracer",
            "--example",
            "go_offsets",
            "--",
        ])
        .arg("--table")
        .arg(&table)
        .args(&built))
    .context("measuring the probe binaries")?;
    say!("skipped {} combinations:", skipped.len());
    for s in &skipped {
        say!("  {s}");
    }
    say!(
        "wrote {} from {} binaries in {}",
        table.display(),
        built.len(),
        fmt_duration(started.elapsed())
    );
    Ok(())
}

/// A `go` command that runs exactly `toolchain` (downloaded on first use), builds without
/// cgo (the traced structs do not depend on it, and old toolchains need no C compiler then)
/// and may update go.mod/go.sum.
fn go(toolchain: &str, dir: &Path) -> Command {
    let mut cmd = command("go");
    cmd.current_dir(dir)
        .env("GOTOOLCHAIN", toolchain)
        .env("GOFLAGS", "-mod=mod -buildvcs=false")
        .env("GOWORK", "off")
        .env("CGO_ENABLED", "0");
    cmd
}

/// Every release of each supported Go minor in the proxy's toolchain list for this host's
/// GOOS/GOARCH (`v0.0.1-go1.21.13.linux-amd64` -> `go1.21.13`), oldest first, each with
/// whether it is the newest of its minor.
fn releases() -> Result<Vec<(String, bool)>> {
    let tmp = std::env::temp_dir();
    let platform = capture(go("local", &tmp).args(["env", "GOOS", "GOARCH"]))
        .context("asking go for GOOS/GOARCH (is Go installed?)")?
        .split_whitespace()
        .collect::<Vec<_>>()
        .join("-");
    let list = capture(go("local", &tmp).args(["list", "-m", "-versions", "golang.org/toolchain"]))
        .context("listing the toolchains the Go module proxy serves")?;
    let suffix = format!(".{platform}");
    let mut out = Vec::new();
    for minor in GO_MINORS {
        let mut found: Vec<(u32, &str)> = list
            .split_whitespace()
            .filter_map(|v| v.strip_prefix("v0.0.1-")?.strip_suffix(suffix.as_str()))
            .filter_map(|name| Some((release(name, minor)?, name)))
            .collect();
        found.sort();
        let Some(&(newest, _)) = found.last() else {
            bail!("the module proxy serves no go1.{minor} toolchain for {platform}");
        };
        let names: Vec<&str> = found.iter().map(|(_, name)| *name).collect();
        say!("go1.{minor}: {}", names.join(" "));
        out.extend(
            found
                .iter()
                .map(|&(patch, name)| (name.to_string(), patch == newest)),
        );
    }
    Ok(out)
}

/// The patch number of `go1.<minor>[.<patch>]`; None for other minors and pre-releases.
fn release(name: &str, minor: u32) -> Option<u32> {
    let rest = name.strip_prefix(&format!("go1.{minor}"))?;
    if rest.is_empty() {
        return Some(0);
    }
    rest.strip_prefix('.')?.parse().ok()
}

/// Builds the probe with `toolchain` and gin `gin` in a fresh `dir`. The go.mod starts
/// empty so that gin brings its own minimum dependencies, as in a real build of that gin.
fn build_probe(toolchain: &str, gin: &str, dir: &Path) -> Result<PathBuf> {
    let probe = workspace_root().join("xtask/go-offsets-probe");
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for file in ["main.go", "go.sum"] {
        std::fs::copy(probe.join(file), dir.join(file))
            .with_context(|| format!("copying {file} of {}", probe.display()))?;
    }
    std::fs::write(
        dir.join("go.mod"),
        format!("module {PROBE_MODULE}\n\ngo 1.19\n"),
    )
    .context("writing go.mod")?;
    capture(go(toolchain, dir).args(["get", &format!("{GIN}@{gin}")]))
        .with_context(|| format!("go get gin {gin}"))?;
    capture(go(toolchain, dir).args(["build", "-o", "probe", "."])).context("go build")?;
    Ok(dir.join("probe"))
}

/// The line of a failed build that says why: Go's "requires go >= 1.23" when there is one
/// (old toolchains print it as a note after the compile errors), else the last line.
fn reason(error: &str) -> &str {
    let mut lines = error.lines().map(str::trim).filter(|l| !l.is_empty());
    let last = lines.clone().next_back().unwrap_or(error);
    lines.find(|l| l.contains("requires go")).unwrap_or(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toolchain_names() {
        assert_eq!(release("go1.21.13", 21), Some(13));
        assert_eq!(release("go1.20", 20), Some(0));
        assert_eq!(release("go1.210.1", 21), None);
        assert_eq!(release("go1.26rc1", 26), None);
        assert_eq!(release("go1.22.1", 21), None);
    }
}
