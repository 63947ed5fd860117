//! Attaches the C-code hooks of `tracer-ebpf/src/native.rs`: the greenlet switch in
//! greenlet's extension module, and nginx's upstream set-up in the nginx executable. Both are
//! found by symbol name (greenlet >= 2 is C++ and keeps its symbols; nginx exports its own
//! for dynamic modules), so no per-version offsets are needed.

use std::path::Path;

use anyhow::Context as _;
use aya::{
    Ebpf,
    programs::{
        UProbe,
        uprobe::{UProbeAttachLocation, UProbeScope},
    },
};

/// The function that runs on the greenlet switched to, once per switch.
pub const GREENLET_SWITCH_SYMBOL: &str = "_ZN8greenlet8Greenlet21g_switchstack_successEv";

/// (program, symbol) pairs attached to an nginx executable.
const NGINX_HOOKS: [(&str, &str); 4] = [
    ("ngx_upstream_init", "ngx_http_upstream_init"),
    ("ngx_upstream_init_ret", "ngx_http_upstream_init"),
    ("ngx_connect_peer", "ngx_event_connect_peer"),
    ("ngx_connect_peer_ret", "ngx_event_connect_peer"),
];

/// A file the native hooks apply to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NativeKind {
    /// greenlet's `_greenlet*.so` (gevent's execution contexts).
    Greenlet,
    /// An nginx executable.
    Nginx,
}

impl NativeKind {
    fn programs(self) -> Vec<(&'static str, &'static str)> {
        match self {
            NativeKind::Greenlet => vec![("greenlet_switched", GREENLET_SWITCH_SYMBOL)],
            NativeKind::Nginx => NGINX_HOOKS.to_vec(),
        }
    }
}

/// Attaches native hooks; programs are verified on first use.
#[derive(Default)]
pub struct NativeAttacher {
    loaded: Vec<&'static str>,
}

impl NativeAttacher {
    /// Attaches every hook of `kind` to the file at `target` (any process mapping it fires
    /// them; the programs ignore unwatched ones). All or nothing: a partial set of nginx hooks
    /// would link nothing.
    pub fn attach(
        &mut self,
        ebpf: &mut Ebpf,
        kind: NativeKind,
        target: &Path,
    ) -> anyhow::Result<()> {
        let mut links = Vec::new();
        for (prog, symbol) in kind.programs() {
            let program: &mut UProbe = ebpf
                .program_mut(prog)
                .with_context(|| format!("program {prog} missing from the object"))?
                .try_into()
                .with_context(|| format!("program {prog} is not a uprobe"))?;
            if !self.loaded.contains(&prog) {
                program
                    .load()
                    .with_context(|| format!("verifier rejected {prog}"))?;
                self.loaded.push(prog);
            }
            match program.attach(
                [UProbeAttachLocation::Symbol(symbol)],
                target,
                UProbeScope::AllProcesses,
            ) {
                Ok(link) => links.push((prog, link)),
                Err(err) => {
                    for (prog, link) in links {
                        if let Ok(p) = ebpf
                            .program_mut(prog)
                            .context("program")
                            .and_then(|p| <&mut UProbe>::try_from(p).map_err(Into::into))
                        {
                            let _ = p.detach(link);
                        }
                    }
                    return Err(err).with_context(|| {
                        format!("attaching {prog} at {symbol} in {}", target.display())
                    });
                }
            }
        }
        Ok(())
    }
}
