//! difytrace agent entry point.

use std::io::IsTerminal as _;

use clap::Parser as _;
use tracer::{
    agent, check,
    cli::{Cli, Command},
    config::Config,
};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cli.log_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    if let Some(Command::Check) = cli.command {
        std::process::exit(check::run());
    }
    let config = Config::from_cli(&cli)?;
    // Before any thread starts (a namespace change applies to the calling thread only).
    tracer::discover::containers::host_view::join_host_cgroup_namespace();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // Spawned rather than run by block_on: the worker that sees the ring buffer become
    // readable then runs the loop itself instead of waking the main thread.
    runtime.block_on(async { tokio::spawn(agent::run(config)).await })?
}
