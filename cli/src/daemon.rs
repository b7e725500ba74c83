//! `migrate daemon`: runs the node daemon (engine::daemon) until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use engine::daemon::{Daemon, DaemonConfig};
use engine::runtime::Podman;

use crate::output::{parse_size, Output};

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  migrate daemon --listen 0.0.0.0:7400 --certs /etc/migrate/certs --state /var/lib/migrate
In the lab, `migrate lab up` starts one daemon per node.")]
pub struct DaemonArgs {
    /// UDP address to listen on (control and transfers).
    #[arg(long, default_value = "0.0.0.0:7400")]
    listen: SocketAddr,
    /// This node's certificate folder (ca.crt, node.crt, node.key from `migrate certs init`).
    #[arg(long)]
    certs: PathBuf,
    /// State directory: chunk store and work files of migrations in progress (0700).
    #[arg(long, default_value = "/var/lib/migrate")]
    state: PathBuf,
    /// Cap of the chunk store (e.g. 20G); least recently used chunks go first.
    #[arg(long, value_parser = parse_size)]
    store_cap: Option<u64>,
    /// Seconds a transfer waits for a dropped connection to come back.
    #[arg(long, default_value_t = 20)]
    resume_timeout: u64,
    /// Seconds a silent peer keeps its connection (QUIC idle timeout).
    #[arg(long, default_value_t = 20)]
    idle_timeout: u64,
    /// zstd level of the chunks this node sends.
    #[arg(long, default_value_t = 1)]
    level: i32,
}

/// Runs the daemon in the foreground.
pub fn run(args: DaemonArgs, out: &Output) -> anyhow::Result<()> {
    let mut config = DaemonConfig::new(args.listen, args.certs, args.state);
    config.store_cap = args.store_cap;
    config.level = args.level;
    config.resume_timeout = Duration::from_secs(args.resume_timeout);
    config.idle_timeout = Duration::from_secs(args.idle_timeout);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        let daemon =
            Daemon::bind(config, Arc::new(Podman::local())).context("starting the node daemon")?;
        out.line(format!(
            "migrate daemon of {} listening on {}",
            daemon.node().name,
            daemon.local_addr()?
        ));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = daemon.serve() => {}
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        Ok(())
    })
}
