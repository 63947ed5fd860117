//! Scheduler tracepoints that keep the watched set current: children of watched processes are
//! watched from their first instruction, execs matching a command filter become watched, and
//! exits are reported so user space can drop per-process state.

use aya_ebpf::{
    bindings::BPF_RB_FORCE_WAKEUP,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        generated::bpf_get_current_cgroup_id,
    },
    macros::tracepoint,
    programs::TracePointContext,
};
use tracer_common::{ProcEvent, counter, kind};

use crate::util::{
    COMM_FILTER, EVENTS, WATCHED, bump, current_if_watched, emit_exec, fork_child_pid_offset,
    greenlets, trace_all, wakeup_flags,
};

#[inline(always)]
fn emit_proc(event_kind: u8, tgid: u32, parent_tgid: u32, flags: u64) {
    let event = ProcEvent {
        kind: event_kind,
        _pad: [0; 3],
        tgid,
        parent_tgid,
        _pad2: 0,
        ts_ns: unsafe { bpf_ktime_get_ns() },
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    };
    if EVENTS.output(&event, flags).is_err() {
        bump(counter::CONTROL_RESERVE_FAILED);
    } else {
        bump(counter::CONTROL_EVENTS);
    }
}

#[tracepoint]
pub fn sched_process_fork(ctx: TracePointContext) -> u32 {
    if trace_all() {
        return 0;
    }
    if current_if_watched().is_none() {
        return 0;
    }
    // SAFETY: offset inside the record, read from its tracefs format by user space.
    let Ok(child) = (unsafe { ctx.read_at::<i32>(fork_child_pid_offset()) }) else {
        return 0;
    };
    if child > 0 {
        let _ = WATCHED.insert(&(child as u32), &1, 0);
        // A child that forks without exec and is gone before user space reads /proc (a
        // recycled worker) is still named: after its parent.
        let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
        emit_proc(kind::FORK, child as u32, parent, wakeup_flags());
    }
    0
}

#[tracepoint]
pub fn sched_process_exec(_ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    if !trace_all()
        && let Ok(comm) = bpf_get_current_comm()
        // SAFETY: presence test only.
        && unsafe { COMM_FILTER.get(&comm) }.is_some()
    {
        let _ = WATCHED.insert(&tgid, &1, 0);
    }
    // Watched processes report every exec: what names them (exe, cmdline) just changed,
    // e.g. a pyenv shim that is bash until it execs python.
    // The agent is woken at once: it names the process from /proc, which a short-lived
    // process may have left by the next periodic drain.
    if emit_exec() || current_if_watched().is_some() {
        emit_proc(kind::EXEC, tgid, 0, BPF_RB_FORCE_WAKEUP as u64);
    }
    0
}

#[tracepoint]
pub fn sched_process_exit(_ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    let tid = id as u32;
    if greenlets() {
        // A later thread with the same id must not inherit this one's greenlet.
        let _ = crate::native::GREENLETS.remove(&id);
    }
    if tid != tgid {
        if !trace_all() {
            // Only a thread: drop the entry its creation may have added.
            let _ = WATCHED.remove(&tid);
        }
        return 0;
    }
    if current_if_watched().is_none() {
        return 0;
    }
    if !trace_all() {
        let _ = WATCHED.remove(&tgid);
    }
    emit_proc(kind::EXIT, tgid, 0, wakeup_flags());
    0
}
