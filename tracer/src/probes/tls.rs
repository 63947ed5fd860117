//! Attaches the OpenSSL hooks of `tracer-ebpf/src/tls.rs` to a `libssl` found in a watched
//! process's maps. The functions are found by their exported names, which OpenSSL keeps
//! stable across releases (the `_ex` forms exist since 1.1.1); no offsets are needed.
//! The Go crypto/tls hooks are attached with the other Go hooks (`probes::go`).

use std::path::Path;

use anyhow::Context as _;
use aya::{
    Ebpf,
    programs::{
        UProbe,
        uprobe::{UProbeAttachLocation, UProbeScope},
    },
};

/// (entry program, symbol). Every symbol also gets the `ssl_ret` uretprobe.
pub const OPENSSL_HOOKS: [(&str, &str); 4] = [
    ("ssl_write_enter", "SSL_write"),
    ("ssl_write_ex_enter", "SSL_write_ex"),
    ("ssl_read_enter", "SSL_read"),
    ("ssl_read_ex_enter", "SSL_read_ex"),
];
/// The uretprobe on all four.
const RET_PROGRAM: &str = "ssl_ret";

/// Which hooks a library got.
#[derive(Debug, Default)]
pub struct AttachedSsl {
    pub symbols: Vec<&'static str>,
    /// Symbols the library does not export (OpenSSL before 1.1.1 has no `_ex` forms).
    pub missing: Vec<&'static str>,
}

/// Attaches the OpenSSL hooks; programs are verified on first use.
#[derive(Default)]
pub struct TlsAttacher {
    loaded: bool,
}

impl TlsAttacher {
    fn load(&mut self, ebpf: &mut Ebpf) -> anyhow::Result<()> {
        if self.loaded {
            return Ok(());
        }
        for prog in OPENSSL_HOOKS
            .iter()
            .map(|(p, _)| *p)
            .chain(std::iter::once(RET_PROGRAM))
        {
            program(ebpf, prog)?
                .load()
                .with_context(|| format!("verifier rejected {prog}"))?;
        }
        self.loaded = true;
        Ok(())
    }

    /// Attaches entry and return probes of every hooked function `target` exports (any
    /// process mapping the file fires them; the programs ignore unwatched ones). A symbol
    /// the library lacks is skipped; none at all is an error.
    pub fn attach(&mut self, ebpf: &mut Ebpf, target: &Path) -> anyhow::Result<AttachedSsl> {
        self.load(ebpf)?;
        let mut out = AttachedSsl::default();
        for (prog, symbol) in OPENSSL_HOOKS {
            // The return probe first: an entry without its return would leave the thread
            // marked as inside an SSL call.
            match attach_symbol(ebpf, RET_PROGRAM, symbol, target) {
                Ok(()) => {}
                Err(err) => {
                    tracing::debug!(symbol, file = %target.display(), "OpenSSL symbol not hooked: {err:#}");
                    out.missing.push(symbol);
                    continue;
                }
            }
            attach_symbol(ebpf, prog, symbol, target)
                .with_context(|| format!("attaching {prog} at {symbol}"))?;
            out.symbols.push(symbol);
        }
        anyhow::ensure!(
            !out.symbols.is_empty(),
            "{} exports none of SSL_read, SSL_write, SSL_read_ex, SSL_write_ex",
            target.display()
        );
        Ok(out)
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, prog: &str) -> anyhow::Result<&'a mut UProbe> {
    ebpf.program_mut(prog)
        .with_context(|| format!("program {prog} missing from the object"))?
        .try_into()
        .with_context(|| format!("program {prog} is not a uprobe"))
}

fn attach_symbol(ebpf: &mut Ebpf, prog: &str, symbol: &str, target: &Path) -> anyhow::Result<()> {
    // The link lives as long as the program: the library stays mapped by new processes.
    program(ebpf, prog)?
        .attach(
            [UProbeAttachLocation::Symbol(symbol)],
            target,
            UProbeScope::AllProcesses,
        )
        .with_context(|| format!("attaching {prog} to {symbol} in {}", target.display()))?;
    Ok(())
}
