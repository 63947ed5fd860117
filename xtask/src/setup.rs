//! `cargo xtask setup`: installs what building, running and testing the agent needs.
//!
//! Every step checks first and installs only what is missing, so a re-run on a ready
//! machine takes seconds. Each step says what it found or did.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::say;
use crate::util::{
    EBPF_TOOLCHAIN, LLVM_PREFIX, USER_TOOLCHAIN, cargo_user, command, is_root, kernel_version,
    probe, run, venv_dir, venv_python,
};

/// Oldest kernel the agent supports: ring buffers, BTF everywhere, and the tracepoint and
/// uprobe features the probes rely on are all there from 6.1 (an LTS) on.
const MIN_KERNEL: (u32, u32) = (6, 1);
const BTF_VMLINUX: &str = "/sys/kernel/btf/vmlinux";
const TRACEFS: &str = "/sys/kernel/tracing";

const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages: LLVM 22 and what linking bpf-linker against it needs, then the load
/// generator, the reverse proxy, capsh and the `openssl` command (the TLS tests'
/// self-signed certificate) used by benchmarks and end-to-end tests.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "wrk",
    "nginx",
    // capsh, for tests/capabilities.rs
    "libcap2-bin",
    // the TLS tests' self-signed certificate
    "openssl",
    // Container tests: a private dockerd, and the Debian Python files its test image is
    // built from (tests/src/docker.rs).
    "docker.io",
    "python3-flask",
    "gunicorn",
    "python3-gevent",
    // tests/tests/cri.rs: a private containerd with its CRI plugin (docker.io pulls these in
    // too; named so the CRI test does not depend on that).
    "containerd",
    "runc",
    // tests/tests/robustness.rs reads the agent's kernel maps from outside.
    "bpftool",
];
/// Pinned so a CI run tomorrow tests against the same servers as today.
const PYTHON_PACKAGES: &[&str] = &[
    "flask==3.1.3",
    "gunicorn==27.0.1",
    "gevent==26.9.0",
    "httpx==0.28.1",
    // gunicorn's gevent worker imports it without declaring it.
    "packaging==26.4",
];
/// `import` names matching PYTHON_PACKAGES, to tell whether the venv is complete.
const PYTHON_IMPORTS: &str = "import flask, gunicorn, gevent, httpx, packaging";
const JAEGER_MODULE: &str = "github.com/jaegertracing/jaeger";
const JAEGER_VERSION: &str = "v1.76.0";
/// Go tools the deploy/ tests run (tests/tests/deploy_manifests.rs): (module, package, version).
const KUBE_TOOLS: &[(&str, &str, &str)] = &[
    (
        "github.com/yannh/kubeconform",
        "github.com/yannh/kubeconform/cmd/kubeconform",
        "v0.8.0",
    ),
    ("helm.sh/helm/v3", "helm.sh/helm/v3/cmd/helm", "v3.22.0"),
];

/// What to do about the host facts (kernel, BTF, root) that setup cannot change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostChecks {
    /// Report problems and carry on (building does not need them).
    Warn,
    /// Install everything first, then fail if a host fact is wrong (`cargo xtask setup`).
    FailAtEnd,
    /// Fail before installing anything (running the agent or its tests cannot work).
    FailFirst,
}

#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub host_checks: HostChecks,
    /// Python venv with flask, gunicorn, gevent (tests and benchmarks).
    pub python_venv: bool,
    /// Jaeger all-in-one (end-to-end tests).
    pub jaeger: bool,
}

pub fn setup(opts: Options) -> Result<()> {
    let start = std::time::Instant::now();
    let mut host_problems = check_host();
    if opts.host_checks == HostChecks::FailFirst && !host_problems.is_empty() {
        bail!(
            "this host cannot run the agent:\n  - {}",
            host_problems.join("\n  - ")
        );
    }

    ensure_toolchain(USER_TOOLCHAIN, &["clippy", "rustfmt"])?;
    ensure_toolchain(EBPF_TOOLCHAIN, &["rust-src"])?;
    ensure_apt_packages(APT_PACKAGES)?;
    ensure_bpf_linker()?;
    host_problems.extend(ensure_tracefs()?);
    if opts.python_venv {
        ensure_python_venv()?;
    }
    if opts.jaeger {
        ensure_jaeger()?;
        // with the other end-to-end test tools
        for (module, package, version) in KUBE_TOOLS {
            ensure_go_tool(module, package, version)?;
        }
    }

    if !host_problems.is_empty() {
        let list = host_problems.join("\n  - ");
        match opts.host_checks {
            HostChecks::Warn => say!("warning: the agent will not run on this host:\n  - {list}"),
            HostChecks::FailAtEnd | HostChecks::FailFirst => {
                bail!("this host cannot run the agent:\n  - {list}")
            }
        }
    }
    say!(
        "setup done in {}",
        crate::util::fmt_duration(start.elapsed())
    );
    Ok(())
}

/// Kernel version, BTF and privileges; returns what is wrong, in words a user can act on.
fn check_host() -> Vec<String> {
    let mut problems = Vec::new();
    match kernel_version() {
        Ok((major, minor, release)) => {
            if (major, minor) < MIN_KERNEL {
                problems.push(format!(
                    "kernel {release} is too old: difytrace needs Linux >= {}.{}",
                    MIN_KERNEL.0, MIN_KERNEL.1
                ));
            } else {
                say!(
                    "kernel {release}: ok (>= {}.{})",
                    MIN_KERNEL.0,
                    MIN_KERNEL.1
                );
            }
        }
        Err(e) => problems.push(format!("cannot tell the kernel version: {e:#}")),
    }
    if Path::new(BTF_VMLINUX).exists() {
        say!("{BTF_VMLINUX}: present");
    } else {
        problems.push(format!(
            "{BTF_VMLINUX} is missing: the kernel must be built with CONFIG_DEBUG_INFO_BTF=y"
        ));
    }
    if is_root() {
        say!("running as root: ok");
    } else {
        problems.push(
            "not running as root: loading eBPF programs needs root (CAP_BPF, CAP_PERFMON, \
             CAP_SYS_ADMIN); run with sudo"
                .to_string(),
        );
    }
    problems
}

fn ensure_toolchain(name: &str, components: &[&str]) -> Result<()> {
    let listed = probe(command("rustup").args(["toolchain", "list"])).context(
        "`rustup toolchain list` failed: rustup is required (https://rustup.rs) to install \
         the pinned toolchains",
    )?;
    let installed = listed.lines().any(|l| {
        l.split_whitespace()
            .next()
            .is_some_and(|t| t.starts_with(&format!("{name}-")) || t == name)
    });
    let missing: Vec<&str> = if installed {
        let have = probe(command("rustup").args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            name,
        ]))
        .unwrap_or_default();
        components
            .iter()
            .copied()
            .filter(|c| {
                !have
                    .lines()
                    .any(|l| l == *c || l.starts_with(&format!("{c}-")))
            })
            .collect()
    } else {
        components.to_vec()
    };
    if installed && missing.is_empty() {
        say!("toolchain {name} ({}): present", components.join(", "));
        return Ok(());
    }
    say!(
        "toolchain {name}: installing ({})",
        if installed {
            format!("missing components {}", missing.join(", "))
        } else {
            "not installed".to_string()
        }
    );
    // `rustup toolchain install` on an existing toolchain just adds the components.
    run(command("rustup").args([
        "toolchain",
        "install",
        name,
        "--profile",
        "minimal",
        "--component",
        &components.join(","),
    ]))
    .with_context(|| format!("installing toolchain {name}"))
}

/// Debian packages that `dpkg-query` does not report as installed.
fn missing_apt_packages(packages: &[&str]) -> Option<Vec<String>> {
    // dpkg-query exits non-zero when any package is unknown but still prints the others.
    let out = command("dpkg-query")
        .args(["-W", "-f=${Package} ${Status}\n"])
        .args(packages)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let listing = String::from_utf8_lossy(&out.stdout);
    let installed: Vec<&str> = listing
        .lines()
        .filter(|l| l.ends_with(" install ok installed"))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    Some(
        packages
            .iter()
            .filter(|p| !installed.contains(p))
            .map(|p| p.to_string())
            .collect(),
    )
}

fn ensure_apt_packages(packages: &[&str]) -> Result<()> {
    let Some(missing) = missing_apt_packages(packages) else {
        say!(
            "warning: no dpkg-query here (not Debian?): make sure these are installed: {}",
            packages.join(" ")
        );
        return Ok(());
    };
    if missing.is_empty() {
        say!("Debian packages ({}): present", packages.join(" "));
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages: {0}; run as root, or `sudo apt-get install {0}`",
            missing.join(" ")
        );
    }
    say!("Debian packages: installing {}", missing.join(" "));
    // The package lists may be absent or stale on a fresh machine.
    run(command("apt-get")
        .args(["update", "-q"])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(command("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .context("installing Debian packages")
}

fn ensure_bpf_linker() -> Result<()> {
    if let Some(out) = probe(command("bpf-linker").arg("--version")) {
        if out.split_whitespace().any(|w| w == BPF_LINKER_VERSION) {
            say!("bpf-linker {BPF_LINKER_VERSION}: present");
            return Ok(());
        }
        say!(
            "bpf-linker: found {:?}, want {BPF_LINKER_VERSION}; reinstalling",
            out.trim()
        );
    } else {
        say!("bpf-linker: not found; installing {BPF_LINKER_VERSION} (takes a few minutes)");
    }
    // Built against Debian's LLVM 22 so it matches the pinned nightly's LLVM; the default
    // features would download a prebuilt LLVM instead.
    run(cargo_user()
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("LLVM_PREFIX", LLVM_PREFIX))
    .context("installing bpf-linker")
}

/// Mounts tracefs when it is missing; without root that is left as a host problem.
fn ensure_tracefs() -> Result<Option<String>> {
    // The sched tracepoints are attached by name through tracefs, and their record layouts
    // are read from it; without it the agent cannot start.
    if Path::new(TRACEFS).join("events").exists() {
        say!("tracefs at {TRACEFS}: mounted");
        return Ok(None);
    }
    if !is_root() {
        return Ok(Some(format!(
            "tracefs is not mounted at {TRACEFS}; as root: mount -t tracefs nodev {TRACEFS}"
        )));
    }
    say!("tracefs: mounting at {TRACEFS}");
    run(command("mount").args(["-t", "tracefs", "nodev", TRACEFS])).context("mounting tracefs")?;
    Ok(None)
}

fn ensure_python_venv() -> Result<()> {
    let venv = venv_dir();
    let python = venv_python();
    if python.exists() && probe(command(&python).args(["-c", PYTHON_IMPORTS])).is_some() {
        say!(
            "Python venv {} ({}): present",
            venv.display(),
            PYTHON_PACKAGES.join(", ")
        );
        return Ok(());
    }
    if !python.exists() {
        say!("Python venv: creating {}", venv.display());
        run(command("python3").arg("-m").arg("venv").arg(&venv)).context(
            "creating the Python venv (on Debian without pyenv: apt-get install python3-venv)",
        )?;
    }
    say!("Python venv: installing {}", PYTHON_PACKAGES.join(" "));
    run(command(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(PYTHON_PACKAGES))
    .context("installing the Python test packages")
}

/// `$(go env GOPATH)/bin/jaeger`, where the end-to-end tests look for it.
pub fn jaeger_bin() -> Result<PathBuf> {
    let gopath = crate::util::capture(command("go").args(["env", "GOPATH"]))
        .context("`go env GOPATH` failed: Go is needed to build Jaeger")?;
    // GOPATH may be a list; `go install` writes to the first entry.
    let first = gopath
        .trim()
        .split(':')
        .next()
        .filter(|p| !p.is_empty())
        .context("`go env GOPATH` is empty")?;
    Ok(Path::new(first).join("bin").join("jaeger"))
}

fn ensure_jaeger() -> Result<()> {
    let bin = jaeger_bin()?;
    if jaeger_has_version(&bin) {
        say!("Jaeger {JAEGER_VERSION} at {}: present", bin.display());
        return Ok(());
    }
    say!(
        "Jaeger: building {JAEGER_VERSION} into {} (takes several minutes)",
        bin.display()
    );
    // `go install github.com/jaegertracing/jaeger/cmd/jaeger@v1.76.0` is refused: that
    // module's go.mod has a replace directive. So fetch the module through the module proxy
    // and build it as the main module, where the replace applies, stamping the version the
    // way Jaeger's own release build does.
    let info = crate::util::capture(command("go").args([
        "mod",
        "download",
        "-json",
        &format!("{JAEGER_MODULE}@{JAEGER_VERSION}"),
    ]))
    .context("downloading the Jaeger module")?;
    let dir = json_string_field(&info, "Dir")
        .context("`go mod download -json` did not say where the module is")?;
    let bin_dir = bin.parent().context("jaeger path has no parent")?;
    std::fs::create_dir_all(bin_dir).with_context(|| format!("creating {}", bin_dir.display()))?;
    run(command("go")
        .current_dir(&dir)
        .args(["build", "-trimpath", "-ldflags"])
        .arg(format!(
            "-s -w -X {JAEGER_MODULE}/internal/version.latestVersion={JAEGER_VERSION}"
        ))
        .arg("-o")
        .arg(&bin)
        .arg("./cmd/jaeger"))
    .context("building Jaeger")?;
    if !jaeger_has_version(&bin) {
        bail!(
            "{} was built but does not report {JAEGER_VERSION}",
            bin.display()
        );
    }
    Ok(())
}

/// `go install <package>@<version>` into `$(go env GOPATH)/bin` unless that binary is
/// already built from `module` at `version`.
fn ensure_go_tool(module: &str, package: &str, version: &str) -> Result<()> {
    let name = package.rsplit('/').next().unwrap_or(package);
    let bin = jaeger_bin()?.with_file_name(name);
    let built_from = |out: String| {
        out.lines().any(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            fields.first() == Some(&"mod")
                && fields.get(1) == Some(&module)
                && fields.get(2) == Some(&version)
        })
    };
    if bin.exists()
        && probe(command("go").arg("version").arg("-m").arg(&bin)).is_some_and(built_from)
    {
        say!("{name} {version} at {}: present", bin.display());
        return Ok(());
    }
    say!("{name}: installing {package}@{version}");
    run(command("go")
        .arg("install")
        .arg(format!("{package}@{version}")))
    .with_context(|| format!("installing {name}"))
}

fn jaeger_has_version(bin: &Path) -> bool {
    if !bin.exists() {
        return false;
    }
    // A release-style build stamps the version; `go version -m` covers a plain `go install`.
    let minor = JAEGER_VERSION
        .rsplit_once('.')
        .map_or(JAEGER_VERSION, |(m, _)| m);
    let stamped = probe(command(bin).arg("version")).is_some_and(|out| out.contains(minor));
    stamped
        || probe(command("go").arg("version").arg("-m").arg(bin)).is_some_and(|out| {
            out.lines().any(|l| {
                let fields: Vec<&str> = l.split_whitespace().collect();
                fields.get(1) == Some(&JAEGER_MODULE) && fields.get(2) == Some(&JAEGER_VERSION)
            })
        })
}

/// The string value of `"key": "value"` in go's indented JSON output (no JSON crate here:
/// xtask keeps its dependencies minimal).
fn json_string_field(json: &str, key: &str) -> Option<String> {
    let needle = format!("\"{key}\":");
    let rest = json[json.find(&needle)? + needle.len()..].trim_start();
    let rest = rest.strip_prefix('"')?;
    let mut value = String::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(value),
            '\\' => value.push(chars.next()?),
            c => value.push(c),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_field() {
        let json =
            "{\n\t\"Path\": \"github.com/x/y\",\n\t\"Dir\": \"/root/go/pkg/mod/a\\\\b@v1\"\n}";
        assert_eq!(
            json_string_field(json, "Path").as_deref(),
            Some("github.com/x/y")
        );
        assert_eq!(
            json_string_field(json, "Dir").as_deref(),
            Some("/root/go/pkg/mod/a\\b@v1")
        );
        assert_eq!(json_string_field(json, "Zip"), None);
    }
}
