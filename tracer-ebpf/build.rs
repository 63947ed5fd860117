use which::which;

/// Rebuild the object when bpf-linker changes: it is what turns the crate into BPF.
fn main() {
    let bpf_linker =
        which("bpf-linker").expect("bpf-linker not found on PATH (run `cargo xtask setup`)");
    println!("cargo:rerun-if-changed={}", bpf_linker.to_string_lossy());
}
