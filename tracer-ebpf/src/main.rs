//! Kernel side of difytrace: syscall and scheduler tracepoints that copy socket bytes and
//! connection lifecycle out to a ring buffer for the watched processes. Decides nothing that
//! user space can decide: no parsing here.
#![no_std]
#![no_main]

mod go;
mod grpc;
mod native;
mod process;
mod syscalls;
mod tls;
mod util;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
