//! `cargo xtask build` and `cargo xtask run`.

use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;

use anyhow::{Result, bail};

use crate::say;
use crate::setup::{self, HostChecks};
use crate::util::{cargo_user, command, display, is_root, run, target_dir};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Release,
    Debug,
}

impl Profile {
    fn dir(self) -> &'static str {
        match self {
            Profile::Release => "release",
            Profile::Debug => "debug",
        }
    }
}

pub fn agent_bin(profile: Profile) -> PathBuf {
    target_dir().join(profile.dir()).join("tracer")
}

/// Builds the agent with the pinned user toolchain; tracer/build.rs builds the kernel side
/// with the pinned nightly through aya-build, which finds bpf-linker and LLVM 22 on PATH.
pub fn build_agent(profile: Profile) -> Result<PathBuf> {
    let mut cmd = cargo_user();
    cmd.args(["build", "-p", "tracer"]);
    if profile == Profile::Release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    Ok(agent_bin(profile))
}

pub fn build(profile: Profile, host_checks: HostChecks) -> Result<PathBuf> {
    setup::setup(setup::Options {
        host_checks,
        python_venv: false,
        jaeger: false,
    })?;
    build_agent(profile)
}

pub fn run_agent(profile: Profile, agent_args: &[String]) -> Result<()> {
    // Checked before building: a build that ends in "permission denied" wastes minutes.
    if !is_root() {
        bail!(
            "the agent loads eBPF programs and must run as root: \
             sudo -E env \"PATH=$PATH\" cargo xtask run ..."
        );
    }
    let bin = build(profile, HostChecks::FailFirst)?;
    let mut cmd = command(&bin);
    cmd.args(agent_args);
    say!("$ {}", display(&cmd));
    // exec, so Ctrl-C and the exit status belong to the agent itself.
    let err = cmd.exec();
    Err(anyhow::Error::new(err).context(format!("could not exec {}", bin.display())))
}
