//! Process and environment helpers shared by the subcommands.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// User-side toolchain: aya 0.16 needs rustc >= 1.98 and 1.99.0 is the one known to work.
pub const USER_TOOLCHAIN: &str = "1.99.0";
/// Kernel-side toolchain: its LLVM (22) must match bpf-linker's; tracer/build.rs names it too.
pub const EBPF_TOOLCHAIN: &str = "nightly-2026-06-20";
/// Debian's LLVM 22, which bpf-linker is built against.
pub const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// Prints a progress line, marked so it stands out between the children's output.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        eprintln!("xtask: {}", format_args!($($arg)*))
    };
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .expect("xtask's manifest dir always has a parent (the workspace)")
        .to_path_buf()
}

pub fn target_dir() -> PathBuf {
    // Honour a relocated target dir so `run`/`test`/`bench` find the binary cargo built.
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        _ => workspace_root().join("target"),
    }
}

pub fn venv_dir() -> PathBuf {
    target_dir().join("venv")
}

pub fn venv_python() -> PathBuf {
    venv_dir().join("bin").join("python")
}

pub fn cargo_home() -> PathBuf {
    if let Some(home) = std::env::var_os("CARGO_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(home);
    }
    home_dir().join(".cargo")
}

fn home_dir() -> PathBuf {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

/// PATH for every child: LLVM 22 first (aya-build and bpf-linker must find that LLVM, not
/// another one on the machine), then cargo's bin dir (rustup proxies, bpf-linker), then the
/// caller's PATH.
pub fn child_path() -> OsString {
    let mut dirs = vec![
        PathBuf::from(LLVM_PREFIX).join("bin"),
        cargo_home().join("bin"),
    ];
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    let mut seen = Vec::new();
    dirs.retain(|d| {
        if seen.contains(d) {
            false
        } else {
            seen.push(d.clone());
            true
        }
    });
    std::env::join_paths(dirs).unwrap_or_else(|_| std::env::var_os("PATH").unwrap_or_default())
}

/// A command with a clean environment for children.
///
/// `cargo xtask` runs under the default toolchain's cargo, which leaves its own traces in
/// the environment (RUSTUP_TOOLCHAIN, CARGO, the package's CARGO_PKG_*, LD_LIBRARY_PATH
/// pointing into the default toolchain). Those must not leak into `cargo +1.99.0 ...` or
/// into the agent, so they are removed here.
pub fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    cmd.env("PATH", child_path());
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let leaked = matches!(
            key,
            "RUSTUP_TOOLCHAIN"
                | "RUSTUP_TOOLCHAIN_SOURCE"
                | "RUST_RECURSION_COUNT"
                | "CARGO"
                | "RUSTC"
                | "RUSTDOC"
                | "CARGO_MANIFEST_DIR"
                | "CARGO_MANIFEST_PATH"
                | "CARGO_CRATE_NAME"
                | "CARGO_BIN_NAME"
                | "CARGO_PRIMARY_PACKAGE"
        ) || key.starts_with("CARGO_PKG_");
        if leaked {
            cmd.env_remove(key);
        }
    }
    match clean_ld_library_path() {
        Some(v) => cmd.env("LD_LIBRARY_PATH", v),
        None => cmd.env_remove("LD_LIBRARY_PATH"),
    };
    cmd
}

/// LD_LIBRARY_PATH without the entries `cargo run` added (target dir, toolchain libs).
fn clean_ld_library_path() -> Option<OsString> {
    let current = std::env::var_os("LD_LIBRARY_PATH")?;
    let rustup_home = std::env::var_os("RUSTUP_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home_dir().join(".rustup"));
    let target = target_dir();
    let kept: Vec<PathBuf> = std::env::split_paths(&current)
        .filter(|p| !p.starts_with(&rustup_home) && !p.starts_with(&target))
        .collect();
    if kept.is_empty() {
        None
    } else {
        std::env::join_paths(kept).ok()
    }
}

/// `cargo +<user toolchain> <args>` in the workspace root.
pub fn cargo_user() -> Command {
    let mut cmd = command("cargo");
    cmd.arg(format!("+{USER_TOOLCHAIN}"))
        .current_dir(workspace_root());
    cmd
}

/// A command line for humans: program and arguments, quoted where needed.
pub fn display(cmd: &Command) -> String {
    let mut out = String::new();
    let _ = write!(out, "{}", quote(&cmd.get_program().to_string_lossy()));
    for arg in cmd.get_args() {
        let _ = write!(out, " {}", quote(&arg.to_string_lossy()));
    }
    out
}

fn quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=+@,%".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Runs a command with inherited stdio, echoing it first; fails on a non-zero exit.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = display(cmd);
    say!("$ {line}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs a command quietly and returns its stdout when it exits 0; None when it cannot start
/// or fails. For "is it already there?" checks, where failing just means "no".
pub fn probe(cmd: &mut Command) -> Option<String> {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command quietly and returns stdout; fails with stderr on a non-zero exit.
pub fn capture(cmd: &mut Command) -> Result<String> {
    let line = display(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Kernel release as (major, minor), from /proc/sys/kernel/osrelease (e.g. "6.18.44-x").
pub fn kernel_version() -> Result<(u32, u32, String)> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("reading /proc/sys/kernel/osrelease")?
        .trim()
        .to_string();
    let (major, minor) = parse_kernel_release(&release)
        .with_context(|| format!("unexpected kernel release {release:?}"))?;
    Ok((major, minor, release))
}

fn parse_kernel_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(['.', '-', '+']);
    let major = parts.next()?.parse().ok()?;
    let minor_digits: String = parts
        .next()?
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    Some((major, minor_digits.parse().ok()?))
}

/// Formats a duration as seconds with one decimal, or minutes and seconds when long.
pub fn fmt_duration(d: std::time::Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        format!("{secs:.1}s")
    } else {
        let whole = d.as_secs();
        format!("{}m{:02}s", whole / 60, whole % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_release_parses() {
        assert_eq!(parse_kernel_release("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(parse_kernel_release("5.15.0-91-generic"), Some((5, 15)));
        assert_eq!(parse_kernel_release("6.1"), Some((6, 1)));
        assert_eq!(parse_kernel_release("6.10rc1"), Some((6, 10)));
        assert_eq!(parse_kernel_release("garbage"), None);
    }

    #[test]
    fn quoting() {
        assert_eq!(quote("--release"), "--release");
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), r"'it'\''s'");
    }
}
