//! Fuzzes the readers of Go binaries: an executable on the host (or in a container) is
//! outside data, and a crafted one must not crash the agent. The first byte picks the
//! reader; the rest is its input.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tracer::discover::gobin::{buildinfo, inspect_bytes, pclntab, ret};

const WANTED: [&str; 2] = ["runtime.newproc1", "net/http.serverHandler.ServeHTTP"];

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 5 {
        0 => {
            let _ = buildinfo::parse_buildinfo(rest);
        }
        1 => {
            let _ = pclntab::parse_pclntab(rest, None);
        }
        2 => {
            let _ = pclntab::parse_pclntab(rest, Some(0x401000));
        }
        3 => {
            let entry = 0x401000;
            if let Ok(rets) = ret::find_rets(rest, entry) {
                for r in rets {
                    assert!(r >= entry && r < entry + rest.len() as u64);
                }
            }
            let probe = ret::entry_probe_point(rest, entry);
            assert!(probe >= entry && probe <= entry + rest.len() as u64);
        }
        _ => {
            let _ = inspect_bytes(Path::new("fuzz"), rest, &WANTED);
        }
    }
});
