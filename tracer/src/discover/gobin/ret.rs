//! The RET instructions of a function. A uretprobe rewrites the return address on the stack,
//! which breaks Go: the runtime copies goroutine stacks when they grow and walks them for GC
//! and tracebacks, and finds a trampoline address where it expects one of its functions. So a
//! function's returns are hooked with plain uprobes on each RET instead.
//!
//! The code is decoded linearly from the entry: Go functions are contiguous and hold no data
//! (jump tables live in .rodata), so every instruction boundary is found. A byte 0xC3 inside
//! another instruction (an immediate, a displacement) is not a RET, and a uprobe placed there
//! would corrupt that instruction; decoding rather than byte-searching is what avoids that.

use iced_x86::{Decoder, DecoderError, DecoderOptions, Instruction, Mnemonic};

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RetError {
    #[error("invalid x86-64 instruction at {addr:#x}")]
    Invalid { addr: u64 },
    #[error("instruction at {addr:#x} runs past the end of the function")]
    Truncated { addr: u64 },
}

/// Instructions of a Go prologue looked at for the stack check.
const PROLOGUE_INSTRUCTIONS: usize = 3;

/// Where an entry uprobe costs least: the conditional jump of the stack-growth check that
/// opens almost every Go function (`CMP SP|R12, 0x10(R14)` then `JBE morestack`). The
/// kernel emulates a jump, while the first instruction (the compare) must be single-stepped
/// out of line: a second trap on every call. The argument registers are untouched up to
/// the jump. A function without that prologue (no stack check) is probed at its entry.
/// When the stack must grow, the jump goes to morestack, which calls the function again:
/// that rare call is reported twice.
pub fn entry_probe_point(code: &[u8], entry: u64) -> u64 {
    let mut decoder = Decoder::with_ip(64, code, entry, DecoderOptions::NONE);
    let mut instruction = Instruction::default();
    let mut compared_to_g = false;
    for _ in 0..PROLOGUE_INSTRUCTIONS {
        if !decoder.can_decode() {
            break;
        }
        decoder.decode_out(&mut instruction);
        if instruction.is_invalid() {
            break;
        }
        match instruction.mnemonic() {
            Mnemonic::Cmp => {
                compared_to_g = instruction.memory_base() == iced_x86::Register::R14;
            }
            Mnemonic::Jbe if compared_to_g => return instruction.ip(),
            Mnemonic::Lea => {}
            _ => break,
        }
    }
    entry
}

/// Virtual addresses of the near RET instructions (`C3`, `C2 iw`, with any prefixes) in
/// `code`, which is the function's bytes from its entry at `entry` to its end. An undecodable
/// instruction is an error rather than a guess: from there on, boundaries are unknown.
pub fn find_rets(code: &[u8], entry: u64) -> Result<Vec<u64>, RetError> {
    let mut decoder = Decoder::with_ip(64, code, entry, DecoderOptions::NONE);
    let mut instruction = Instruction::default();
    let mut rets = Vec::new();
    while decoder.can_decode() {
        decoder.decode_out(&mut instruction);
        if instruction.is_invalid() {
            let addr = instruction.ip();
            return Err(match decoder.last_error() {
                DecoderError::NoMoreBytes => RetError::Truncated { addr },
                _ => RetError::Invalid { addr },
            });
        }
        // Mnemonic::Ret is the near return only (far returns are Retf).
        if instruction.mnemonic() == Mnemonic::Ret {
            rets.push(instruction.ip());
        }
    }
    Ok(rets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_probe_goes_on_the_stack_check_jump() {
        // CMPQ SP, 0x10(R14); JBE rel32; PUSHQ BP (runtime.newproc1, go1.26)
        let code = [
            0x49, 0x3b, 0x66, 0x10, 0x0f, 0x86, 0xa0, 0x04, 0x00, 0x00, 0x55,
        ];
        assert_eq!(entry_probe_point(&code, 0x45b460), 0x45b464);
        // LEAQ -0x128(SP), R12; CMPQ R12, 0x10(R14); JBE rel32 (a big frame)
        let code = [
            0x4c, 0x8d, 0xa4, 0x24, 0xd8, 0xfe, 0xff, 0xff, 0x4d, 0x3b, 0x66, 0x10, 0x0f, 0x86,
            0x95, 0x09, 0x00, 0x00,
        ];
        assert_eq!(entry_probe_point(&code, 0x75ffc0), 0x75ffcc);
        // No stack check (a NOSPLIT leaf): the entry itself.
        let code = [0x48, 0x89, 0xc3, 0xc3];
        assert_eq!(entry_probe_point(&code, 0x1000), 0x1000);
        // A compare against something other than the goroutine is not the check.
        let code = [0x48, 0x39, 0xd8, 0x76, 0x02, 0xc3];
        assert_eq!(entry_probe_point(&code, 0x2000), 0x2000);
        // Truncated or garbage: the entry.
        assert_eq!(entry_probe_point(&[0x49, 0x3b], 0x3000), 0x3000);
        assert_eq!(entry_probe_point(&[], 0x3000), 0x3000);
    }

    #[test]
    fn plain_returns() {
        // push rbp; mov rbp,rsp; pop rbp; ret
        let code = [0x55, 0x48, 0x89, 0xe5, 0x5d, 0xc3];
        assert_eq!(find_rets(&code, 0x401000), Ok(vec![0x401005]));
        // ret 8 (C2 08 00), then int3 padding.
        let code = [0x90, 0xc2, 0x08, 0x00, 0xcc, 0xcc];
        assert_eq!(find_rets(&code, 0x1000), Ok(vec![0x1001]));
        // Two exits: test eax,eax; je +1; ret; ret.
        let code = [0x85, 0xc0, 0x74, 0x01, 0xc3, 0xc3];
        assert_eq!(find_rets(&code, 0), Ok(vec![4, 5]));
        assert_eq!(find_rets(&[], 0), Ok(vec![]));
    }

    #[test]
    fn c3_inside_other_instructions_is_not_a_ret() {
        let code = [
            0xb8, 0xc3, 0xc3, 0xc3, 0xc3, // mov eax, 0xc3c3c3c3
            0x48, 0x8b, 0x83, 0xc3, 0x00, 0x00, 0x00, // mov rax, [rbx+0xc3]
            0x49, 0x3b, 0x66, 0x10, // cmp rsp, [r14+0x10] (Go's stack check)
            0x48, 0x8d, 0x05, 0xc3, 0xc2, 0x00, 0x00, // lea rax, [rip+0xc2c3]
            0xc3, // ret
        ];
        assert_eq!(find_rets(&code, 0x500000), Ok(vec![0x500000 + 23]));
    }

    #[test]
    fn far_return_is_not_counted() {
        // retf; retf 4; ret
        let code = [0xcb, 0xca, 0x04, 0x00, 0xc3];
        assert_eq!(find_rets(&code, 0x10), Ok(vec![0x14]));
    }

    #[test]
    fn undecodable_code_is_an_error() {
        // 0x06 (push es) is invalid in 64-bit mode.
        let code = [0x90, 0x06, 0xc3];
        assert_eq!(
            find_rets(&code, 0x2000),
            Err(RetError::Invalid { addr: 0x2001 })
        );
        // mov eax, imm32 cut short: the C3 is part of the immediate, not a RET.
        let code = [0xc3, 0xb8, 0xc3, 0xc3];
        assert_eq!(
            find_rets(&code, 0x3000),
            Err(RetError::Truncated { addr: 0x3001 })
        );
    }
}
