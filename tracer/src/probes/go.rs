//! Uprobes on Go binaries: registers a binary's field offsets with the kernel side and
//! attaches the hooks of `tracer-ebpf/src/go.rs` at its functions' entries and RET
//! instructions (uretprobes only on a function that runs on the system stack: they break when
//! Go moves a goroutine's stack).

use std::path::Path;

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    maps::{Array, MapData},
    programs::{
        UProbe,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeScope},
    },
};
use tracer_common::{GO_OFFSET_UNKNOWN, GoOffsets, MAX_GO_BINARIES};

use crate::discover::gobin::{Field, GoBinary};

/// The fields every grpc-go hook reads to name its connection's fd.
const GRPC_FD: [Field; 3] = [Field::NetConnFd, Field::NetFdPfd, Field::PollFdSysfd];

/// Functions hooked, with the program at their entry and the one at their RETs.
pub const HOOKS: [Hook; 10] = [
    Hook {
        function: "net/http.serverHandler.ServeHTTP",
        entry: "go_serve_enter",
        ret: Some(Return::HandlerRets("go_serve_ret")),
        needs: &[],
    },
    Hook {
        function: "net/http.(*persistConn).roundTrip",
        entry: "go_roundtrip_enter",
        ret: None,
        needs: &[
            Field::PersistConnConn,
            Field::PersistConnTlsState,
            Field::NetConnFd,
            Field::NetFdPfd,
            Field::PollFdSysfd,
        ],
    },
    Hook {
        function: "runtime.newproc1",
        entry: "go_newproc_enter",
        ret: Some(Return::Uretprobe("go_newproc_exit")),
        needs: &[],
    },
    Hook {
        function: "github.com/gin-gonic/gin.(*Engine).handleHTTPRequest",
        entry: "go_gin_enter",
        ret: Some(Return::HandlerRets("go_gin_ret")),
        needs: &[Field::GinContextFullPath],
    },
    // grpc-go (see tracer-ebpf/src/grpc.rs). Field offsets from DWARF only.
    Hook {
        function: "google.golang.org/grpc.(*Server).handleStream",
        entry: "go_grpc_server_enter",
        ret: Some(Return::HandlerRets("go_grpc_server_ret")),
        needs: &[
            Field::GrpcServerStreamStream,
            Field::GrpcStreamMethod,
            Field::GrpcStreamId,
            Field::GrpcHttp2ServerConn,
            GRPC_FD[0],
            GRPC_FD[1],
            GRPC_FD[2],
        ],
    },
    Hook {
        function: "google.golang.org/grpc/internal/transport.(*http2Server).writeStatus",
        entry: "go_grpc_server_status",
        ret: None,
        needs: &[
            Field::GrpcServerStreamStream,
            Field::GrpcStreamId,
            Field::GrpcHttp2ServerConn,
            Field::GrpcStatusS,
            Field::GrpcStatusCode,
            GRPC_FD[0],
            GRPC_FD[1],
            GRPC_FD[2],
        ],
    },
    Hook {
        function: "google.golang.org/grpc/internal/transport.(*http2Client).NewStream",
        entry: "go_grpc_client_enter",
        ret: Some(Return::Rets("go_grpc_client_ret")),
        needs: &[
            Field::GrpcClientStreamStream,
            Field::GrpcClientStreamCt,
            Field::GrpcStreamMethod,
            Field::GrpcStreamId,
            Field::GrpcHttp2ClientConn,
            GRPC_FD[0],
            GRPC_FD[1],
            GRPC_FD[2],
        ],
    },
    Hook {
        function: "google.golang.org/grpc/internal/transport.(*http2Client).closeStream",
        entry: "go_grpc_client_status",
        ret: None,
        needs: &[
            Field::GrpcClientStreamStream,
            Field::GrpcStreamId,
            Field::GrpcHttp2ClientConn,
            Field::GrpcStatusS,
            Field::GrpcStatusCode,
            GRPC_FD[0],
            GRPC_FD[1],
            GRPC_FD[2],
        ],
    },
    // crypto/tls plaintext (see tracer-ebpf/src/tls.rs). `Conn.conn` from DWARF only.
    Hook {
        function: "crypto/tls.(*Conn).Write",
        entry: "go_tls_write_enter",
        ret: None,
        needs: &[Field::TlsConnConn, GRPC_FD[0], GRPC_FD[1], GRPC_FD[2]],
    },
    Hook {
        function: "crypto/tls.(*Conn).Read",
        entry: "go_tls_read_enter",
        ret: Some(Return::Rets("go_tls_read_ret")),
        needs: &[Field::TlsConnConn, GRPC_FD[0], GRPC_FD[1], GRPC_FD[2]],
    },
];

/// Whether a hook belongs to TLS capture (left off with `--no-tls`).
fn is_tls_hook(hook: &Hook) -> bool {
    hook.entry.starts_with("go_tls_")
}

/// One hooked function.
#[derive(Debug, Clone, Copy)]
pub struct Hook {
    pub function: &'static str,
    pub entry: &'static str,
    pub ret: Option<Return>,
    /// Offsets without which the hook would read nothing useful.
    pub needs: &'static [Field],
}

/// How a hook sees its function return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Return {
    /// A program at every RET instruction. The kernel single-steps each RET after the
    /// program, a second trap that costs about ten microseconds of the traced thread on the
    /// VMs measured (docs/benchmarks.md).
    Rets(&'static str),
    /// Like `Rets`, but only with `--go-handler-returns`: what it adds (net/http's handler
    /// duration; gin's route, which the next syscall reports anyway; grpc-go's handler end,
    /// which its status write on the same goroutine gives a moment earlier) is not worth its
    /// cost on every request by default.
    HandlerRets(&'static str),
    /// A uretprobe at the entry probe, for a function that runs on the system stack (g0's,
    /// which Go never moves): its return costs a syscall, not a breakpoint and a single-step.
    Uretprobe(&'static str),
}

impl Return {
    fn program(self) -> &'static str {
        match self {
            Return::Rets(p) | Return::HandlerRets(p) | Return::Uretprobe(p) => p,
        }
    }
}

/// The names of the functions the hooks need, for `gobin::inspect`.
pub fn wanted_functions() -> Vec<&'static str> {
    HOOKS.iter().map(|h| h.function).collect()
}

/// Go binaries registered with the kernel side.
pub struct GoAttacher {
    offsets: Array<MapData, GoOffsets>,
    next_id: u32,
    loaded: bool,
    /// Attach the crypto/tls hooks.
    tls: bool,
    /// Attach the `Return::HandlerRets` programs.
    handler_returns: bool,
}

/// What was attached to one binary.
#[derive(Debug, Default)]
pub struct Attached {
    pub hooks: Vec<&'static str>,
    /// Hooks left off, with why.
    pub skipped: Vec<(&'static str, String)>,
}

impl GoAttacher {
    pub fn new(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        let offsets = Array::try_from(ebpf.take_map("GO_OFFSETS").context("map GO_OFFSETS")?)?;
        Ok(Self {
            offsets,
            next_id: 0,
            loaded: false,
            tls: true,
            handler_returns: false,
        })
    }

    /// With `false`, the crypto/tls hooks are not attached.
    pub fn with_tls(mut self, tls: bool) -> Self {
        self.tls = tls;
        self
    }

    /// With `true`, the `Return::HandlerRets` programs are attached too.
    pub fn with_handler_returns(mut self, on: bool) -> Self {
        self.handler_returns = on;
        self
    }

    /// The return program of `hook` that this agent attaches, if any.
    fn return_program(&self, hook: &Hook) -> Option<Return> {
        hook.ret
            .filter(|r| self.handler_returns || !matches!(r, Return::HandlerRets(_)))
    }

    fn load_programs(&mut self, ebpf: &mut Ebpf) -> anyhow::Result<()> {
        if self.loaded {
            return Ok(());
        }
        for hook in HOOKS.iter().filter(|h| self.tls || !is_tls_hook(h)) {
            let ret = self.return_program(hook).map(Return::program);
            for prog in std::iter::once(hook.entry).chain(ret) {
                let program: &mut UProbe = ebpf
                    .program_mut(prog)
                    .with_context(|| format!("program {prog} missing from the object"))?
                    .try_into()
                    .with_context(|| format!("program {prog} is not a uprobe"))?;
                program
                    .load()
                    .with_context(|| format!("verifier rejected {prog}"))?;
            }
        }
        self.loaded = true;
        Ok(())
    }

    /// Registers `binary` (reachable at `target`, e.g. `/proc/<pid>/exe`) and attaches every
    /// hook whose function and offsets it has.
    pub fn attach(
        &mut self,
        ebpf: &mut Ebpf,
        target: &Path,
        binary: &GoBinary,
    ) -> anyhow::Result<Attached> {
        if self.next_id >= MAX_GO_BINARIES {
            bail!("{MAX_GO_BINARIES} Go binaries already have uprobes");
        }
        self.load_programs(ebpf)?;
        let id = self.next_id;
        self.offsets
            .set(id, &kernel_offsets(binary), 0)
            .context("writing the binary's offsets")?;
        self.next_id += 1;
        let mut attached = Attached::default();
        for hook in HOOKS.iter().filter(|h| self.tls || !is_tls_hook(h)) {
            let Some(func) = binary.funcs.get(hook.function) else {
                attached
                    .skipped
                    .push((hook.function, "function not in the binary".into()));
                continue;
            };
            let missing: Vec<String> = hook
                .needs
                .iter()
                .filter(|f| {
                    binary.offsets.get(**f).is_none()
                        && f.alternative()
                            .is_none_or(|a| binary.offsets.get(a).is_none())
                })
                .map(|f| format!("{f:?}"))
                .collect();
            if !missing.is_empty() {
                attached.skipped.push((
                    hook.function,
                    format!("no offsets for {}", missing.join(", ")),
                ));
                continue;
            }
            let ret = self.return_program(hook);
            if matches!(ret, Some(Return::Rets(_) | Return::HandlerRets(_)))
                && func.ret_offsets.is_empty()
            {
                attached
                    .skipped
                    .push((hook.function, "no RET instruction found".into()));
                continue;
            }
            attach_points(ebpf, hook.entry, &[func.entry_probe_offset], id, target)
                .with_context(|| format!("{} entry", hook.function))?;
            match ret {
                Some(Return::Rets(prog) | Return::HandlerRets(prog)) => {
                    attach_points(ebpf, prog, &func.ret_offsets, id, target)
                        .with_context(|| format!("{} RETs", hook.function))?;
                }
                // At the entry probe: the stack-check jump comes before the frame is set
                // up, so the return address is still on top of the stack there.
                Some(Return::Uretprobe(prog)) => {
                    attach_points(ebpf, prog, &[func.entry_probe_offset], id, target)
                        .with_context(|| format!("{} return", hook.function))?;
                }
                None => {}
            }
            attached.hooks.push(hook.function);
        }
        Ok(attached)
    }
}

fn attach_points(
    ebpf: &mut Ebpf,
    prog: &str,
    offsets: &[u64],
    cookie: u32,
    target: &Path,
) -> anyhow::Result<()> {
    let program: &mut UProbe = ebpf
        .program_mut(prog)
        .with_context(|| format!("program {prog} missing"))?
        .try_into()
        .with_context(|| format!("program {prog} is not a uprobe"))?;
    let points = offsets.iter().map(|&offset| UProbeAttachPoint {
        location: UProbeAttachLocation::AbsoluteOffset(offset),
        cookie: Some(u64::from(cookie)),
    });
    // The program keeps the link for the agent's life: the binary may start new processes
    // any time.
    program
        .attach(points, target, UProbeScope::AllProcesses)
        .with_context(|| format!("attaching {prog} to {}", target.display()))?;
    Ok(())
}

/// The kernel's view of a binary's offsets.
pub fn kernel_offsets(binary: &GoBinary) -> GoOffsets {
    let get = |field: Field| {
        binary
            .offsets
            .get(field)
            .and_then(|o| u32::try_from(o).ok())
            .unwrap_or(GO_OFFSET_UNKNOWN)
    };
    // The embedded common stream: by value (offset, 0) or as a pointer (offset, 1).
    let embedded = |by_value: Field, by_pointer: Field| match (get(by_value), get(by_pointer)) {
        (v, _) if v != GO_OFFSET_UNKNOWN => (v, 0),
        (_, p) if p != GO_OFFSET_UNKNOWN => (p, 1),
        _ => (GO_OFFSET_UNKNOWN, 0),
    };
    let server_stream = embedded(
        Field::GrpcServerStreamStream,
        Field::GrpcServerStreamStreamPtr,
    );
    let client_stream = embedded(
        Field::GrpcClientStreamStream,
        Field::GrpcClientStreamStreamPtr,
    );
    GoOffsets {
        request_method: get(Field::RequestMethod),
        request_url: get(Field::RequestUrl),
        url_path: get(Field::UrlPath),
        persist_conn_conn: get(Field::PersistConnConn),
        persist_conn_tls_state: get(Field::PersistConnTlsState),
        net_conn_fd: get(Field::NetConnFd),
        net_fd_pfd: get(Field::NetFdPfd),
        poll_fd_sysfd: get(Field::PollFdSysfd),
        gin_context_full_path: get(Field::GinContextFullPath),
        grpc_server_stream_stream: server_stream.0,
        grpc_server_stream_deref: server_stream.1,
        grpc_client_stream_stream: client_stream.0,
        grpc_client_stream_deref: client_stream.1,
        grpc_stream_method: get(Field::GrpcStreamMethod),
        grpc_stream_id: get(Field::GrpcStreamId),
        grpc_client_stream_ct: get(Field::GrpcClientStreamCt),
        grpc_http2_server_conn: get(Field::GrpcHttp2ServerConn),
        grpc_http2_client_conn: get(Field::GrpcHttp2ClientConn),
        grpc_status_s: get(Field::GrpcStatusS),
        grpc_status_code: get(Field::GrpcStatusCode),
        tls_conn_conn: get(Field::TlsConnConn),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discover::gobin::{GoOffsets as BinaryOffsets, OffsetsSource};

    fn binary(fields: &[(Field, u64)]) -> GoBinary {
        let mut offsets = BinaryOffsets::default();
        for &(f, o) in fields {
            offsets.fields.insert(f, o);
            offsets.sources.insert(f, OffsetsSource::Dwarf);
        }
        GoBinary {
            path: "/bin/x".into(),
            info: Default::default(),
            funcs: Default::default(),
            stripped: false,
            has_dwarf: true,
            offsets,
        }
    }

    /// The embedded common stream is read by value or through its pointer, whichever the
    /// binary's DWARF declares; neither known leaves it unknown.
    #[test]
    fn grpc_stream_embedding_by_value_or_pointer() {
        let k = kernel_offsets(&binary(&[
            (Field::GrpcServerStreamStream, 8),
            (Field::GrpcClientStreamStreamPtr, 0),
            (Field::GrpcStreamMethod, 16),
            (Field::GrpcStreamId, 108),
            (Field::GrpcHttp2ServerConn, 16),
        ]));
        assert_eq!(
            (k.grpc_server_stream_stream, k.grpc_server_stream_deref),
            (8, 0)
        );
        assert_eq!(
            (k.grpc_client_stream_stream, k.grpc_client_stream_deref),
            (0, 1)
        );
        assert_eq!((k.grpc_stream_method, k.grpc_stream_id), (16, 108));
        assert_eq!(k.grpc_http2_server_conn, 16);
        assert_eq!(k.grpc_status_code, GO_OFFSET_UNKNOWN);
        let k = kernel_offsets(&binary(&[(Field::GrpcStreamId, 108)]));
        assert_eq!(k.grpc_server_stream_stream, GO_OFFSET_UNKNOWN);
    }

    /// Every hook's programs exist under the names the kernel side exports, and a hook
    /// needing grpc fields needs the fd walk too.
    #[test]
    fn grpc_hooks_need_their_fields() {
        for hook in HOOKS.iter().filter(|h| h.entry.starts_with("go_grpc_")) {
            for f in GRPC_FD {
                assert!(hook.needs.contains(&f), "{}", hook.function);
            }
            assert!(
                hook.needs.contains(&Field::GrpcStreamId),
                "{}",
                hook.function
            );
        }
        assert_eq!(
            HOOKS
                .iter()
                .filter(|h| h.entry.starts_with("go_grpc_"))
                .count(),
            4
        );
    }
}
